/* sparsebackup-copy: the copy engine.  The queue of extents filled by
 * block status queries on the source (one ahead); the pieces, cut from
 * the extents in order, each a read (into a free slot) then a write or
 * zero on the target, or done at once (a skipped extent, a zeroed range
 * of a file); all driven by one poll loop over both sockets.
 *
 * Pieces complete out of order, so they are kept in order in a FIFO:
 * the hasher of a manifest is fed from its front (whole chunks in
 * order), and the "watermark" (everything below is done on the target)
 * is where its first unfinished piece starts.  The journal records the
 * watermark only after the target has been synced (write ahead).
 */

#define _GNU_SOURCE
#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <libnbd.h>

#include "minmax.h"
#include "copy.h"

/* ---- Extents ---------------------------------------------------------- */

static void
queue_add (uint64_t offset, uint64_t length, enum kind kind)
{
  struct extent *last = queue.len > head ? &queue.ptr[queue.len - 1] : NULL;

  if (last && last->kind == kind && last->offset + last->length == offset)
    last->length += length;
  else if (extents_append (&queue, (struct extent) {
        .offset = offset, .length = length, .kind = kind }) == -1)
    out_of_memory ();
  queued += length;
}

static enum kind
classify (uint32_t flags)
{
  if (flags & LIBNBD_STATE_ZERO)
    return K_ZERO;
  if ((flags & LIBNBD_STATE_HOLE) && delta)
    return K_SKIP;
  return K_DATA;
}

static int
extents_cb (void *user_data, const char *metacontext, uint64_t offset,
            uint32_t *entries, size_t nr_entries, int *error)
{
  uint64_t pos = offset;
  size_t i;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 ||
      *error || bs_replied)
    return 0;
  bs_replied = true;
  if (offset != bs_offset)
    return 0;                   /* no progress: reported at completion */
  for (i = 0; i + 1 < nr_entries && pos < bs_end; i += 2) {
    uint64_t len = MIN ((uint64_t) entries[i], bs_end - pos);

    if (len == 0)
      continue;
    queue_add (pos, len, classify (entries[i + 1]));
    pos += len;
  }
  bs_reached = pos;
  return 0;
}

static int
extents_done (void *user_data, int *error)
{
  bs_in_flight = false;
  if (*error)
    fail ("%s: block status at offset %" PRIu64 " failed: %s",
          src_label, bs_offset, strerror (*error));
  else if (bs_reached <= bs_offset)
    fail ("%s: block status at offset %" PRIu64 " returned no extents "
          "for that offset", src_label, bs_offset);
  else
    extents_next = bs_reached;
  return 1;
}

/* Ask for the next extents when the queue runs low. */
void
want_extents (void)
{
  uint64_t count;

  if (failed || bs_in_flight || extents_next >= size ||
      queued >= EXTENTS_WINDOW / 2)
    return;
  if (head > 0 && head >= queue.len / 2) {
    /* Drop the extents already done. */
    memmove (queue.ptr, &queue.ptr[head],
             (queue.len - head) * sizeof queue.ptr[0]);
    queue.len -= head;
    head = 0;
  }
  count = MIN ((uint64_t) EXTENTS_WINDOW, size - extents_next);
  if (!have_extents) {
    queue_add (extents_next, count, K_DATA);
    extents_next += count;
    return;
  }
  bs_offset = extents_next;
  bs_end = extents_next + count;
  bs_reached = bs_offset;
  bs_replied = false;
  if (nbd_aio_block_status (src, count, bs_offset,
                            (nbd_extent_callback) { .callback = extents_cb },
                            (nbd_completion_callback) {
                              .callback = extents_done },
                            0) == -1)
    die_nbd ("SRC: block status");
  bs_in_flight = true;
}

/* Take up to MAX bytes of the first extent in the queue. */
bool
queue_take (uint64_t max, struct extent *out)
{
  struct extent *e;

  if (head == queue.len)
    return false;
  e = &queue.ptr[head];
  *out = *e;
  out->length = MIN (e->length, max);
  e->offset += out->length;
  e->length -= out->length;
  queued -= out->length;
  if (e->length == 0)
    head++;
  return true;
}

/* ---- The pieces in order ---------------------------------------------- */

static pieces fifo = VECTOR_INIT;
static size_t fifo_head;
static uint64_t fifo_base_seq;     /* the seq of fifo.ptr[0] */
static uint64_t next_seq;
/* Below it, the chunks touched by a piece that is not skipped are
 * rehashed whole: skipped parts there are read for the hasher.
 */
static uint64_t rehash_until;

static struct piece *
piece_of (uint64_t seq)
{
  assert (seq >= fifo_base_seq + fifo_head && seq < next_seq);
  return &fifo.ptr[seq - fifo_base_seq];
}

/* Append a piece; returns its seq.  A piece done at once merges into
 * the last one when nothing tells them apart.
 */
static uint64_t
fifo_add (struct piece p)
{
  if (fifo.len > fifo_head) {
    struct piece *last = &fifo.ptr[fifo.len - 1];

    if (p.slot == NULL && last->slot == NULL && p.tgt_done &&
        last->tgt_done && p.hash == last->hash && p.hash != H_DATA &&
        !last->hashed && last->offset + last->len == p.offset) {
      last->len += p.len;
      return next_seq - 1;
    }
  }
  if (fifo_head > 0 && fifo_head >= fifo.len / 2) {
    memmove (fifo.ptr, &fifo.ptr[fifo_head],
             (fifo.len - fifo_head) * sizeof fifo.ptr[0]);
    fifo.len -= fifo_head;
    fifo_base_seq += fifo_head;
    fifo_head = 0;
  }
  if (pieces_append (&fifo, p) == -1)
    out_of_memory ();
  return next_seq++;
}

static void
release_slot (struct slot *s)
{
  s->state = S_FREE;
  s->hash_hold = false;
}

/* Feed the hasher and move the watermark over the finished pieces at
 * the front.
 */
static void
advance (void)
{
  while (fifo_head < fifo.len) {
    struct piece *p = &fifo.ptr[fifo_head];

    if (p->hash != H_NONE && !p->hashed) {
      if (failed)
        return;                 /* no manifest after a failure */
      switch (p->hash) {
      case H_DATA:
        if (p->slot == NULL || p->slot->state == S_READING ||
            p->slot->state == S_READ_DONE)
          return;
        hasher_data (p->offset, p->slot->buf, p->len);
        p->slot->hash_hold = false;
        if (p->slot->state == S_HELD)
          release_slot (p->slot);
        p->slot = NULL;
        break;
      case H_ZERO:
        hasher_zero (p->offset, p->len);
        break;
      case H_KEEP:
        hasher_keep (p->offset, p->len);
        break;
      case H_NONE:
        break;
      }
      p->hashed = true;
    }
    if (!p->tgt_done)
      return;
    /* The part done by an interrupted run is walked again for the
     * hasher: the watermark starts past it.
     */
    watermark = MAX (watermark, p->offset + p->len);
    fifo_head++;
  }
}

/* ---- The copy loop ---------------------------------------------------- */

static int
read_done (void *user_data, int *error)
{
  struct slot *s = user_data;

  s->state = S_READ_DONE;
  s->err = *error;
  return 1;
}

/* An NBD write or zero of slot S completed (ERR: its errno, or 0). */
static void
nbd_write_finished (struct slot *s, int err)
{
  struct piece *p = piece_of (s->seq);

  if (err) {
    fail ("write error on DST '%s' at offset %" PRIu64 ": %s", dst_name,
          s->offset, strerror (err));
    p->slot = NULL;
    release_slot (s);
    return;
  }
  p->tgt_done = true;
  if (s->kind == K_ZERO)
    zeroed += s->len;
  else
    copied += s->len;
  s->state = s->hash_hold ? S_HELD : S_FREE;
  if (s->state == S_FREE)
    p->slot = NULL;
  debug_kill_point ("write");
}

static int
write_done (void *user_data, int *error)
{
  nbd_write_finished (user_data, *error);
  return 1;
}

/* Act on the slots whose reads have finished. */
static void
finish_reads (void)
{
  unsigned i;

  for (i = 0; i < requests; i++) {
    struct slot *s = &slots[i];
    struct piece *p;

    if (s->state != S_READ_DONE)
      continue;
    p = piece_of (s->seq);
    if (s->err || failed) {
      if (s->err)
        fail ("read error on %s '%s' at offset %" PRIu64 " (%" PRIu64
              " bytes): %s", src_label, src_name, s->offset, s->len,
              strerror (s->err));
      p->slot = NULL;
      release_slot (s);
    }
    else if (p->tgt == T_DATA && dst_kind == DST_NBD)
      start_nbd_write (s, (nbd_completion_callback) {
                         .callback = write_done, .user_data = s });
    else {
      if (p->tgt == T_DATA) {
        if (!write_file (s->buf, s->len, s->offset)) {
          p->slot = NULL;
          release_slot (s);
          continue;
        }
        copied += s->len;
        p->tgt_done = true;
      }
      else if (s->kind == K_DATA && dst_kind == DST_NONE &&
               s->offset >= write_from)
        copied += s->len;       /* --manifest-only, --verify */
      else
        hash_read += s->len;
      s->state = s->hash_hold ? S_HELD : S_FREE;
      if (s->state == S_FREE)
        p->slot = NULL;
    }
  }
}

static struct slot *
free_slot (void)
{
  unsigned i;

  for (i = 0; i < requests; i++)
    if (slots[i].state == S_FREE)
      return &slots[i];
  return NULL;
}

/* How a skipped extent at OFFSET (the queue's head) is hashed: its
 * chunk is kept whole from the base manifest when the view skips all of
 * it (returns the length to keep, whole chunks), else it is read (0).
 * -1: the extents of the rest of the chunk are not known yet.
 */
static int64_t
skip_keep_length (uint64_t offset)
{
  uint64_t chunk = chunk_size_of_hasher ();
  uint64_t ce = MIN (offset + chunk, size);   /* offset starts a chunk */
  const struct extent *e = &queue.ptr[head];
  uint64_t end = e->offset + e->length;

  assert (offset % chunk == 0 && e->offset == offset);
  if (end >= ce)
    return end == size ? (int64_t) (size - offset)
      : (int64_t) ((end - offset) / chunk * chunk);
  if (end < extents_next)
    return 0;                   /* another kind follows in this chunk */
  return -1;                    /* wait for the next block status */
}

/* Start work while there is something to do and a free slot for work
 * that needs one.
 */
static void
dispatch (void)
{
  for (;;) {
    struct extent *e;
    struct extent x;
    struct piece p = { 0 };
    struct slot *s = NULL;
    uint64_t max;
    bool read;

    if (failed || stop_signal)
      return;
    want_extents ();
    if (head == queue.len)
      return;
    e = &queue.ptr[head];

    /* Decide what the next piece is, and how long it may be. */
    switch (e->kind) {
    case K_DATA:
      p.tgt = T_DATA;
      p.hash = H_DATA;
      max = request_size;
      break;
    case K_ZERO:
      p.tgt = T_ZERO;
      p.hash = H_ZERO;
      max = dst_kind != DST_NBD ? UINT64_MAX
        : dst_can_zero ? MAX_ZERO_REQUEST : request_size;
      break;
    case K_SKIP:
    default:
      p.tgt = T_NONE;
      p.hash = H_NONE;
      max = UINT64_MAX;
      if (hasher_on ()) {
        if (e->offset < rehash_until) {
          p.hash = H_DATA;
          max = MIN (request_size, rehash_until - e->offset);
        }
        else {
          int64_t keep = skip_keep_length (e->offset);

          if (keep == -1)
            return;             /* busy: the block status is in flight */
          if (keep == 0) {
            rehash_until = MIN (e->offset + chunk_size_of_hasher (), size);
            p.hash = H_DATA;
            max = MIN (request_size, rehash_until - e->offset);
          }
          else {
            p.hash = H_KEEP;
            max = keep;
          }
        }
      }
      break;
    }
    if (!hasher_on ())
      p.hash = H_NONE;
    if (e->offset < write_from) {
      p.tgt = T_NONE;           /* done by the interrupted run */
      max = MIN (max, write_from - e->offset);
      if (p.hash == H_DATA)
        max = MIN (max, (uint64_t) request_size);
    }
    if (dst_kind == DST_NONE)
      p.tgt = T_NONE;
    read = p.hash == H_DATA || p.tgt == T_DATA;
    if (read || (p.tgt == T_ZERO && dst_kind == DST_NBD)) {
      s = free_slot ();
      if (s == NULL)
        return;
    }
    queue_take (max, &x);
    p.offset = x.offset;
    p.len = x.length;
    if (p.hash != H_NONE && p.hash != H_KEEP && hasher_on ()) {
      uint64_t c = chunk_size_of_hasher ();
      uint64_t ce = MIN ((x.offset + x.length - 1) / c * c + c, size);

      rehash_until = MAX (rehash_until, ce);
    }

    /* Counters of what is done at once or never. */
    if (x.offset < write_from)
      resumed += x.length;
    else if (x.kind == K_SKIP)
      skipped += x.length;
    else if (x.kind == K_ZERO && dst_kind == DST_NONE)
      zeroed += x.length;

    if (s == NULL) {
      /* Done at once: a skip, a zeroed range of a file, nothing. */
      if (p.tgt == T_ZERO) {
        if (!zero_file (zero_buf, x.length, x.offset))
          return;
        zeroed += x.length;
      }
      p.tgt_done = true;
      fifo_add (p);
      continue;
    }

    p.tgt_done = p.tgt == T_NONE;
    p.slot = s;
    s->seq = fifo_add (p);
    s->kind = x.kind;
    s->offset = x.offset;
    s->len = x.length;
    s->err = 0;
    s->hash_hold = p.hash == H_DATA;
    if (!read)                  /* a zero request */
      start_nbd_write (s, (nbd_completion_callback) {
                         .callback = write_done, .user_data = s });
    else {
      s->state = S_READING;
      if (nbd_aio_pread (src, s->buf, s->len, s->offset,
                         (nbd_completion_callback) {
                           .callback = read_done, .user_data = s },
                         0) == -1)
        die_nbd ("SRC: read");
    }
  }
}

/* ---- Journal commits -------------------------------------------------- */

static uint64_t committed;         /* the done offset in the journal */
static double committed_at;
static bool flush_in_flight;
static uint64_t flush_target;      /* the watermark the flush covers */
static int flush_err;
static bool flush_done;

static int
flush_cb (void *user_data, int *error)
{
  flush_in_flight = false;
  flush_done = true;
  flush_err = *error;
  return 1;
}

static void
commit (uint64_t done)
{
  if (journal_write (done)) {
    committed = done;
    committed_at = now ();
  }
  else
    failed = true;
}

/* After the target's flush completes, record its watermark. */
static void
finish_flush (void)
{
  if (!flush_done)
    return;
  flush_done = false;
  if (flush_err) {
    fail ("DST '%s': flush: %s", dst_name, strerror (flush_err));
    return;
  }
  debug_kill_point ("sync");
  commit (flush_target);
}

/* Start making the target durable up to the watermark, and record it. */
static void
maybe_commit (bool now_please)
{
  if (journal_path == NULL || flush_in_flight || failed ||
      watermark <= committed)
    return;
  if (!now_please && watermark - committed < journal_every &&
      now () - committed_at < JOURNAL_SECONDS)
    return;
  if (dst_kind == DST_NBD) {
    if (!dst_can_flush) {
      commit (watermark);       /* no write cache to flush */
      return;
    }
    flush_target = watermark;
    if (nbd_aio_flush (dst_nbd, (nbd_completion_callback) {
          .callback = flush_cb }, 0) == -1)
      die_nbd ("DST: flush");
    flush_in_flight = true;
    return;
  }
  if (sync_file_target ())
    commit (watermark);
}

/* ---- The loop ---------------------------------------------------------- */

static bool
busy (void)
{
  unsigned i;

  if (bs_in_flight || flush_in_flight)
    return true;
  for (i = 0; i < requests; i++)
    if (slots[i].state == S_READING || slots[i].state == S_WRITING ||
        slots[i].state == S_READ_DONE)
      return true;
  return false;
}

static sigset_t unblocked;         /* the mask to wait with */

/* Wait for either connection and let libnbd move on. */
static void
poll_once (void)
{
  struct nbd_handle *hs[2] = { src, dst_nbd };
  struct pollfd fds[2];
  int n = dst_nbd ? 2 : 1, k, r;

  for (k = 0; k < n; k++) {
    unsigned dir = nbd_aio_get_direction (hs[k]);

    fds[k].fd = nbd_aio_get_fd (hs[k]);
    if (fds[k].fd == -1)
      die_nbd (k == 0 ? "SRC" : "DST");
    fds[k].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                    ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
    fds[k].revents = 0;
  }
  /* Signals are blocked except while waiting here: one that arrives
   * during the work of the loop interrupts this wait at once.
   */
  r = ppoll (fds, n, NULL, &unblocked);
  if (r == -1) {
    if (errno == EINTR)
      return;
    error_msg ("poll: %s", strerror (errno));
    exit (EXIT_FAILURE);
  }
  for (k = 0; k < n; k++) {
    if ((fds[k].revents & (POLLIN | POLLHUP | POLLERR)) &&
        nbd_aio_notify_read (hs[k]) == -1)
      die_nbd (k == 0 ? "SRC" : "DST");
    if ((fds[k].revents & POLLOUT) && nbd_aio_notify_write (hs[k]) == -1)
      die_nbd (k == 0 ? "SRC" : "DST");
  }
}

void
engine_init (uint64_t start)
{
  write_from = start;
  watermark = start;
  committed = start;
  committed_at = now ();
  if (hasher_on ())
    extents_next = 0;           /* the part done is read for the hasher */
  else {
    extents_next = start;
    resumed = start;
    watermark = start;
  }
  fifo_base_seq = next_seq = 0;
  if (!hasher_on () && start > 0)
    fifo_add ((struct piece) { .offset = 0, .len = start, .tgt_done = true,
                               .hashed = true });
}

void
copy (void)
{
  sigset_t block;

  sigemptyset (&block);
  sigaddset (&block, SIGINT);
  sigaddset (&block, SIGTERM);
  sigprocmask (SIG_BLOCK, &block, &unblocked);
  sigdelset (&unblocked, SIGINT);
  sigdelset (&unblocked, SIGTERM);

  for (;;) {
    finish_reads ();
    finish_flush ();
    advance ();
    dispatch ();
    advance ();
    maybe_commit (false);
    progress_update (false);
    /* Not busy after dispatch: failed, interrupted, or all done. */
    if (!busy ())
      break;
    poll_once ();
  }
  advance ();
  /* An unfinished copy: record how far it got (a finished one is
   * recorded by main, after the final flush).
   */
  if (watermark < size || failed || stop_signal) {
    bool was_failed = failed;

    failed = false;             /* the target is fine up to watermark */
    maybe_commit (true);
    while (flush_in_flight)
      poll_once ();
    finish_flush ();
    failed = failed || was_failed;
  }
  sigprocmask (SIG_SETMASK, &unblocked, NULL);
  pieces_reset (&fifo);
}
