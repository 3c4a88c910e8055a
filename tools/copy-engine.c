/* sparsebackup-copy: the copy engine.  The queue of extents filled by
 * block status queries on the source (one ahead), and the copy loop:
 * reads into free slots, then writes or zeroes on the target, all driven
 * by one poll loop over both sockets.
 */

#define _GNU_SOURCE             /* fallocate */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include <libnbd.h>

#include "minmax.h"
#include "sparsebackup-copy.h"

/* ---- Extents ---------------------------------------------------------- */

static void
queue_add (uint64_t offset, uint64_t length, enum kind kind)
{
  struct extent *last = queue.len > head ? &queue.ptr[queue.len - 1] : NULL;

  if (last && last->kind == kind && last->offset + last->length == offset)
    last->length += length;
  else if (extents_append (&queue, (struct extent) {
        .offset = offset, .length = length, .kind = kind }) == -1) {
    error_msg ("out of memory for extents");
    exit (EXIT_FAILURE);
  }
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
    fail ("SRC: block status at offset %" PRIu64 " failed: %s",
          bs_offset, strerror (*error));
  else if (bs_reached <= bs_offset)
    fail ("SRC: block status at offset %" PRIu64 " returned no extents "
          "for that offset", bs_offset);
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

/* ---- The copy loop ---------------------------------------------------- */

static int
read_done (void *user_data, int *error)
{
  struct slot *s = user_data;

  s->state = S_READ_DONE;
  s->err = *error;
  return 1;
}

/* Write the slots whose reads have finished. */
static void
finish_reads (void)
{
  unsigned i;

  for (i = 0; i < requests; i++) {
    struct slot *s = &slots[i];

    if (s->state != S_READ_DONE)
      continue;
    if (s->err) {
      fail ("read error on SRC '%s' at offset %" PRIu64 " (%" PRIu64
            " bytes): %s", src_name, s->offset, s->len, strerror (s->err));
      s->state = S_FREE;
    }
    else if (failed)
      s->state = S_FREE;
    else if (dst_nbd)
      start_nbd_write (s);
    else {
      if (write_file (s->buf, s->len, s->offset))
        copied += s->len;
      s->state = S_FREE;
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

/* The largest piece of an extent of KIND that one step handles. */
static uint64_t
piece_max (enum kind kind)
{
  if (kind == K_SKIP || (kind == K_ZERO && !dst_nbd))
    return UINT64_MAX;          /* no request: done here at once */
  if (kind == K_ZERO && dst_can_zero)
    return MAX_ZERO_REQUEST;
  return request_size;          /* a read, or zeroes written as data */
}

/* Start work while there is a free slot and something to do. */
static void
dispatch (void)
{
  struct slot *s;
  struct extent e;

  while (!failed && (s = free_slot ()) != NULL) {
    want_extents ();
    if (head == queue.len)
      return;
    queue_take (piece_max (queue.ptr[head].kind), &e);
    switch (e.kind) {
    case K_SKIP:
      skipped += e.length;
      break;
    case K_ZERO:
      if (!dst_nbd) {
        /* The slot's buffer serves only if zeroes must be written. */
        if (zero_file (s->buf, e.length, e.offset))
          zeroed += e.length;
        break;
      }
      /* fall through */
    case K_DATA:
      s->kind = e.kind;
      s->offset = e.offset;
      s->len = e.length;
      if (e.kind == K_ZERO)
        start_nbd_write (s);
      else {
        s->state = S_READING;
        if (nbd_aio_pread (src, s->buf, s->len, s->offset,
                           (nbd_completion_callback) {
                             .callback = read_done, .user_data = s },
                           0) == -1)
          die_nbd ("SRC: read");
      }
      break;
    }
  }
}

static bool
busy (void)
{
  unsigned i;

  if (bs_in_flight)
    return true;
  for (i = 0; i < requests; i++)
    if (slots[i].state != S_FREE)
      return true;
  return false;
}

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
  r = poll (fds, n, -1);
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
copy (void)
{
  for (;;) {
    finish_reads ();
    dispatch ();
    progress_update (false);
    /* Not busy after dispatch: failed, or nothing is left to do. */
    if (!busy ())
      break;
    poll_once ();
  }
}
