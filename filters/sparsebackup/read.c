/* nbdkit-sparsebackup-filter: the read side.
 *
 * - extents: answered from the block map; unknown ranges are asked of the
 *   plugin once (a large range, never REQ_ONE) or, by policy, scanned.
 * - scanning: blocks are read from the plugin in large chunks, every
 *   block is tested for zeroes, the map learns, and the data is kept in
 *   the scan cache for the client's following read.
 * - pread: known-zero blocks are answered without calling the plugin,
 *   cached data from the cache, the rest from the plugin in as few
 *   requests as possible; what was read teaches the map.
 * - cache (NBD_CMD_CACHE): passed down to a layer that caches; over one
 *   that cannot, scans ahead into the scan cache.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "internal.h"
#include "disk.h"
#include "zerodetect.h"

/* Extents of unknown ranges are asked of the plugin at least this far:
 * nbdcopy asks 128M at a time, so a 1T disk cost 8192 plugin calls
 * (each with its map updates) at 64M; at 1G, 1024.
 */
#define EXTENTS_AHEAD (1024 * 1024 * 1024)

/* sparsebackup-min-zero-extent=auto: the shortest zero run reported as
 * ZERO to a REQ_ONE client (qemu-img), which pays one round trip per
 * extent; see the man page.  Other clients get the exact map.
 */
#define AUTO_MIN_ZERO_REQ_ONE (256 * 1024)

static uint64_t
min_zero_extent (uint32_t flags)
{
  if (cfg_min_zero_extent >= 0)
    return cfg_min_zero_extent;
  return (flags & NBDKIT_FLAG_REQ_ONE) ? AUTO_MIN_ZERO_REQ_ONE : 0;
}

/* The length of the zero run of the map at POS (RUN bytes already
 * looked up), up to END: runs split inside the map are joined.
 */
static uint64_t
zero_run_length (struct blockmap *bm, uint64_t pos, uint64_t end,
                 uint64_t run)
{
  uint64_t more;

  while (pos + run < end &&
         blockmap_lookup (bm, pos + run, end - pos - run, &more) == BM_ZERO &&
         more > 0)
    run += more;
  return run;
}

/* Data runs of a scanned buffer closer than this are cached as one
 * entry (copying the zeros between them), farther ones separately.
 */
#define CACHE_JOIN_GAP (16 * 1024)

/* Teach the map what BUF (LEN bytes read from disk offset OFFSET after
 * changes_snapshot returned SNAP) holds.  If SC, the data runs are kept
 * in the scan cache (runs closer than CACHE_JOIN_GAP as one entry).
 */
static void
learn_buffer (struct blockmap *bm, struct scancache *sc, uint64_t snap,
              const char *buf, size_t len, uint64_t offset)
{
  size_t p, n;
  bool zero;
  size_t f = 0, l = 0;          /* data to cache: [f, l) */

  for (p = 0; p < len; p += n) {
    n = zero_run (buf, len, p, offset, disk.blksize, &zero);
    if (zero)
      blockmap_learn_zero (bm, snap, 0, offset + p, n, true);
    else {
      blockmap_learn_data (bm, snap, offset + p, n);
      if (sc) {
        if (l > f && p - l >= CACHE_JOIN_GAP) {
          scancache_insert (sc, snap, offset + f, buf + f, l - f);
          f = l;
        }
        if (l == f)
          f = p;
        l = p + n;
      }
    }
  }
  if (sc && l > f)
    scancache_insert (sc, snap, offset + f, buf + f, l - f);
}

/* The scan buffer of this thread (disk.scan_chunk bytes), kept for the
 * thread's life: a fresh malloc of megabytes per scan is an mmap, and
 * faulting its pages in cost more than the zero detection.
 */
static pthread_key_t scan_buf_key;
static pthread_once_t scan_buf_once = PTHREAD_ONCE_INIT;
static int scan_buf_key_err;    /* pthread_key_create failed */

static void
scan_buf_key_create (void)
{
  scan_buf_key_err = pthread_key_create (&scan_buf_key, free);
}

static char *
scan_buffer (void)
{
  char *buf;

  pthread_once (&scan_buf_once, scan_buf_key_create);
  if (scan_buf_key_err != 0) {
    errno = scan_buf_key_err;
    return NULL;
  }
  buf = pthread_getspecific (scan_buf_key);
  if (buf == NULL) {
    buf = malloc (disk.scan_chunk);
    if (buf == NULL)
      return NULL;
    if (pthread_setspecific (scan_buf_key, buf) != 0) {
      free (buf);
      errno = ENOMEM;
      return NULL;
    }
  }
  return buf;
}

/* Blocks a scan could not read: [START, END), empty if START == END. */
struct unreadable {
  uint64_t start, end;
};

/* Read [B, B+BN) block by block after a chunk failed: each block that
 * cannot be read is left as it was (only a client's own read of it
 * fails), counted, and the first run of them kept in *BAD.
 */
static void
scan_blocks (nbdkit_next *next, struct sb_handle *h, char *buf,
             uint64_t b, uint64_t end, struct unreadable *bad)
{
  for (uint64_t bn; b < end; b += bn) {
    uint64_t snap = changes_snapshot (disk.changes);
    int e;

    bn = MIN ((uint64_t) disk.blksize, end - b);
    if (next->pread (next, buf, bn, b, 0, &e) == -1) {
      VERBOSE ("scan %" PRIu64 "@%" PRIu64 ": unreadable (%s): data",
               bn, b, strerror (e));
      STAT_ADD (scan_unreadable_bytes, bn);
      if (bad->start == bad->end) {
        bad->start = b;
        bad->end = b + bn;
      }
      else if (bad->end == b)
        bad->end = b + bn;
      continue;
    }
    STAT_ADD (scan_bytes, bn);
    STAT_ADD (plugin_read_bytes, bn);
    learn_buffer (h->bm, h->sc, snap, buf, bn, b);
  }
}

/* Scan [START, END) (START block aligned, END block aligned or the size).
 * Reads into a buffer, learns, and caches the data blocks.  A chunk that
 * cannot be read is read again block by block (scan_blocks): blocks that
 * cannot be read are answered as data by the caller (*BAD), as the
 * plugin would have answered them.
 */
static int
scan_range (nbdkit_next *next, struct sb_handle *h,
            uint64_t start, uint64_t end, struct unreadable *bad, int *err)
{
  uint64_t pos;
  char *buf = scan_buffer ();

  if (buf == NULL) {
    *err = errno;
    nbdkit_error ("sparsebackup: scan buffer: %m");
    return -1;
  }

  for (pos = start; pos < end; ) {
    uint32_t n = MIN ((uint64_t) disk.scan_chunk, end - pos);
    uint64_t snap = changes_snapshot (disk.changes);
    int e;

    if (next->pread (next, buf, n, pos, 0, &e) == -1)
      scan_blocks (next, h, buf, pos, pos + n, bad);
    else {
      STAT_ADD (scan_bytes, n);
      STAT_ADD (plugin_read_bytes, n);
      learn_buffer (h->bm, h->sc, snap, buf, n, pos);
      VERBOSE ("scan %" PRIu32 "@%" PRIu64, n, pos);
    }
    pos += n;
  }
  return 0;
}

int
query_plugin (nbdkit_next *next, struct sb_handle *h,
              uint64_t pos, uint64_t end, uint64_t *queried_end, int *err)
{
  const uint32_t bs = disk.blksize;
  const uint64_t size = MIN (h->size, blockmap_size (h->bm));
  uint64_t qs = round_down (pos, bs);
  /* Whole blocks: what is learnt is rounded inward, and the next
   * request (nbdinfo --map asks 2^32-1 bytes) starts where this one
   * ended.
   */
  uint64_t qlen = MAX (round_up (end, bs) - qs, (uint64_t) EXTENTS_AHEAD);
  uint64_t answered = qs;
  struct nbdkit_extents *exts;
  uint64_t snap;
  size_t i;

  if (qs >= size) {
    *queried_end = end;
    return 0;
  }
  qlen = MIN (qlen, size - qs);
  qlen = MIN (qlen, (uint64_t) UINT32_MAX & ~(uint64_t) (bs - 1));

  exts = nbdkit_extents_new (qs, size);
  if (exts == NULL) {
    *err = errno;
    return -1;
  }
  snap = changes_snapshot (disk.changes);
  STAT_ADD (extents_calls, 1);
  if (next->extents (next, qlen, qs, 0, exts, err) == -1) {
    nbdkit_extents_free (exts);
    return -1;
  }
  for (i = 0; i < nbdkit_extents_count (exts); ++i) {
    const struct nbdkit_extent e = nbdkit_get_extent (exts, i);
    if (e.type & NBDKIT_EXTENT_ZERO)
      /* Never over blocks the map knows hold data: a caching layer
       * below may report zero over data it has not written back.
       */
      blockmap_learn_zero (h->bm, snap, 0, e.offset, e.length, false);
    else
      /* HOLE without ZERO is data as far as a copy is concerned. */
      blockmap_learn_allocated (h->bm, e.offset, e.length);
    answered = e.offset + e.length;
  }
  VERBOSE ("extents: asked the plugin %" PRIu64 "@%" PRIu64 ", %zu extent(s) "
           "up to %" PRIu64, qlen, qs, nbdkit_extents_count (exts), answered);
  nbdkit_extents_free (exts);

  *queried_end = MAX (answered, round_up (pos + 1, bs));
  return 0;
}

/* True if the block at POS (block aligned, before END) is not known
 * yet (to be scanned), with BUDGET left for it.
 */
/* Nothing known of the block: UNKNOWN, or TRIMMED (whose contents are
 * never learnt from the plugin's extents, only from its data).
 */
static bool
unknown (enum bm_state st)
{
  return st == BM_UNKNOWN || st == BM_TRIMMED;
}

static bool
unscanned (struct sb_handle *h, uint64_t pos, uint64_t end, uint64_t budget)
{
  uint64_t run;

  return budget >= disk.blksize &&
    unknown (blockmap_lookup (h->bm, pos, end - pos, &run)) && run > 0;
}

/* One block-status request walking the map (mapped_extents). */
struct walk {
  nbdkit_next *next;
  struct sb_handle *h;
  uint32_t flags;
  bool req_one;
  uint64_t min_zero;            /* shorter zero runs: data (see above) */
  uint64_t end;                 /* never answered past it */
  uint64_t pos;                 /* answered up to here */
  uint64_t budget;              /* bytes left to scan */
  uint64_t queried_end;         /* the plugin's extents asked up to here */
  bool can_extents;
  bool scan_unknown, scan_allocated;
  bool scan_on;                 /* scan on for a REQ_ONE extent */
  int64_t first_type;           /* of the first extent answered, or -1 */
  struct unreadable bad;        /* what this request's scans could not
                                   read: answered as data */
  struct nbdkit_extents *extents;
};

/* Past the end of the map (the disk shrank since this connection
 * opened): data, which is always safe, to the end.
 */
static int
walk_past_map (struct walk *w, int *err)
{
  if (w->first_type != -1 && (w->req_one || w->first_type != 0))
    return 0;
  if (nbdkit_add_extent (w->extents, w->pos, w->end - w->pos, 0) == -1) {
    *err = errno;
    return -1;
  }
  w->pos = w->end;
  return 0;
}

/* REQ_ONE: one extent is answered; do not ask the plugin or scan for a
 * second one the client will not see.  But over a plugin without
 * extents the one extent may go on into the blocks not scanned yet:
 * stopping at the edge of the scanned part would cut it there and cost
 * the client (qemu-img walks the disk twice) a round trip per scan
 * chunk.  There, scan on within the budget; a chunk that turns out to
 * start a second extent is learnt and cached for the client's next
 * request.
 */
static bool
second_extent_unknown (const struct walk *w, enum bm_state st)
{
  return w->req_one && w->first_type != -1 &&
    (unknown (st) || (st == BM_ALLOCATED && w->scan_allocated)) &&
    !(unknown (st) && w->scan_on);
}

/* Scan from the run at W->POS (RUN bytes of state ST): 1 if it scanned
 * (look again), 0 if the budget is spent, -1 on error.
 */
static int
walk_scan (struct walk *w, uint64_t run, int *err)
{
  const uint32_t bs = disk.blksize;
  uint64_t s = round_down (w->pos, bs);
  uint64_t target = MIN (round_up (w->pos + run, bs), w->h->size);
  uint64_t n = round_down (MIN (w->budget, (uint64_t) disk.scan_chunk), bs);

  if (n == 0)
    return 0;
  n = MIN (n, target - s);
  if (scan_range (w->next, w->h, s, s + n, &w->bad, err) == -1)
    return -1;
  w->budget -= MIN (w->budget, n);
  return 1;
}

/* The zero run at W->POS, RUN bytes as far as the map joins them:
 * its type (ZERO, or data when too short for this client), or -2 when
 * it ends where a scan over a plugin without extents stopped and was
 * scanned on (look again), or -1 on error.
 */
static int64_t
walk_zero_type (struct walk *w, uint64_t *run, int *err)
{
  const uint32_t bs = disk.blksize;
  uint64_t pos = w->pos, end = w->end, more;

  *run = zero_run_length (w->h->bm, pos, end, *run);
  /* It ends where the plugin's last answer ended: ask what follows
   * before judging it short.
   */
  if (*run < w->min_zero && pos + *run < end && w->can_extents &&
      pos + *run >= w->queried_end &&
      blockmap_lookup (w->h->bm, pos + *run, end - pos - *run, &more) ==
      BM_UNKNOWN) {
    if (query_plugin (w->next, w->h, pos + *run, end, &w->queried_end,
                      err) == -1)
      return -1;
    return -2;
  }
  if (*run < w->min_zero && pos + *run < end && w->scan_on &&
      unscanned (w->h, pos + *run, end, w->budget)) {
    /* It ends where the scan stopped: it may go on.  Scan there first,
     * then judge it.
     */
    uint64_t s = pos + *run;
    uint64_t n = MIN (round_down (MIN (w->budget,
                                       (uint64_t) disk.scan_chunk), bs),
                      round_up (end, bs) - s);

    if (scan_range (w->next, w->h, s, MIN (s + n, w->h->size), &w->bad,
                    err) == -1)
      return -1;
    w->budget -= MIN (w->budget, n);
    return -2;
  }
  /* A zero run too short to be worth a round trip (or a zero command)
   * for this client, that does not reach the end of the request (where
   * it may go on), is answered as data: always safe, and it merges with
   * the data around it.
   */
  if (*run >= w->min_zero || pos + *run >= end)
    return NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO;
  STAT_ADD (merged_zero_bytes, *run);
  return 0;
}

/* Answer RUN bytes at W->POS with TYPE: 1 if done, 0 to go on, -1. */
static int
walk_add (struct walk *w, uint64_t run, uint32_t type, int *err)
{
  if (w->req_one && w->first_type != -1 && type != w->first_type)
    return 1;
  if (nbdkit_add_extent (w->extents, w->pos, run, type) == -1) {
    *err = errno;
    return -1;
  }
  if (w->first_type == -1)
    w->first_type = type;
  w->pos += run;
  return 0;
}

/* One step of the walk: 1 when the answer is complete, 0 to go on. */
static int
walk_step (struct walk *w, int *err)
{
  uint64_t run;
  enum bm_state st = blockmap_lookup (w->h->bm, w->pos, w->end - w->pos,
                                      &run);
  int64_t type = 0;
  int r;

  if (run == 0)
    return walk_past_map (w, err) == -1 ? -1 : 1;
  /* Blocks this request's scan could not read: data. */
  if (w->pos >= w->bad.start && w->pos < w->bad.end)
    return walk_add (w, MIN (run, w->bad.end - w->pos), 0, err);
  if (second_extent_unknown (w, st))
    return 1;
  if (st == BM_UNKNOWN && w->can_extents && w->pos >= w->queried_end)
    return query_plugin (w->next, w->h, w->pos, w->end, &w->queried_end,
                         err);
  if ((unknown (st) && w->scan_unknown) ||
      (st == BM_ALLOCATED && w->scan_allocated)) {
    r = walk_scan (w, run, err);
    if (r != 0)
      return r == 1 ? 0 : -1;
    /* Budget spent: answer what is known so far. */
    if (w->first_type != -1)
      return 1;
    /* Nothing answered yet (can happen: a change raced the scan, or
     * the scan of the first block was not learnt): report this run as
     * data, which is always safe, to make progress.
     */
  }
  if (st == BM_ZERO) {
    type = walk_zero_type (w, &run, err);
    if (type == -1)
      return -1;
    if (type == -2)
      return 0;
  }
  return walk_add (w, run, type, err);
}

int
mapped_extents (nbdkit_next *next, struct sb_handle *h,
                uint32_t count, uint64_t offset, uint32_t flags,
                struct nbdkit_extents *extents, int *err)
{
  struct walk w = {
    .next = next, .h = h, .flags = flags, .extents = extents,
    .req_one = flags & NBDKIT_FLAG_REQ_ONE,
    .min_zero = min_zero_extent (flags),
    /* Never past the request: nbdkit 1.32.5 asserts on a reply to a
     * request of (nearly) 4 GiB whose first extent is longer than it.
     */
    .end = MIN (offset + count, h->size),
    .pos = offset, .budget = disk.scan_max, .first_type = -1,
  };
  int can_extents = next->can_extents (next);
  int r = 0;

  if (can_extents == -1) {
    *err = EIO;
    return -1;
  }
  w.can_extents = can_extents;
  w.scan_unknown =
    cfg_scan == SCAN_ALWAYS || (cfg_scan == SCAN_AUTO && !can_extents);
  w.scan_allocated = cfg_scan == SCAN_ALWAYS;
  w.scan_on = w.scan_unknown && !can_extents;

  while (w.pos < w.end && r == 0)
    r = walk_step (&w, err);
  if (r == -1)
    return -1;

  VERBOSE ("extents %" PRIu32 "@%" PRIu64 "%s: answered up to %" PRIu64
           ", scanned %" PRIu64,
           count, offset, w.req_one ? " req_one" : "", w.pos,
           disk.scan_max - w.budget);
  return 0;
}

/* Read [OFFSET, OFFSET+COUNT) from the plugin into BUF and learn. */
static int
read_plugin (nbdkit_next *next, struct sb_handle *h,
             char *buf, uint32_t count, uint64_t offset, uint32_t flags,
             int *err)
{
  uint64_t snap = changes_snapshot (disk.changes);

  if (next->pread (next, buf, count, offset, flags, err) == -1)
    return -1;
  STAT_ADD (plugin_read_bytes, count);
  learn_buffer (h->bm, NULL, snap, buf, count, offset);
  return 0;
}

/* The part of a read not answered from the map or the cache yet: read
 * from the plugin in one request when the next answered part comes.
 */
struct gap {
  nbdkit_next *next;
  struct sb_handle *h;
  char *buf;                    /* of the whole read, at OFFSET */
  uint64_t offset;
  uint32_t flags;
  uint64_t start, len;
  bool plugin_called;
};

static int
flush_gap (struct gap *g, int *err)
{
  if (g->len == 0)
    return 0;
  if (read_plugin (g->next, g->h, g->buf + (g->start - g->offset), g->len,
                   g->start, g->flags, err) == -1)
    return -1;
  g->plugin_called = true;
  g->len = 0;
  return 0;
}

static void
extend_gap (struct gap *g, uint64_t pos, uint64_t len)
{
  if (g->len == 0)
    g->start = pos;
  g->len += len;
}

/* Serve [P, PEND) (not known zero) from the scan cache where cached,
 * adding the rest to the gap.
 */
static int
read_cached_or_gap (struct gap *g, uint64_t p, uint64_t pend, int *err)
{
  while (p < pend) {
    size_t got = 0, uncached = pend - p;

    if (g->h->sc)
      got = scancache_read (g->h->sc, g->buf + (p - g->offset), p,
                            pend - p, true, &uncached);
    if (got > 0) {
      if (flush_gap (g, err) == -1)
        return -1;
      STAT_ADD (read_cache_bytes, got);
      p += got;
    }
    else {
      extend_gap (g, p, uncached);
      p += uncached;
    }
  }
  return 0;
}

int
mapped_pread (nbdkit_next *next, struct sb_handle *h,
              void *buf, uint32_t count, uint64_t offset,
              uint32_t flags, int *err)
{
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  struct gap g = {
    .next = next, .h = h, .buf = buf, .offset = offset, .flags = flags,
  };

  while (pos < end) {
    uint64_t run;
    enum bm_state st = blockmap_lookup (h->bm, pos, end - pos, &run);

    if (run == 0)               /* past the end of the map: the plugin */
      run = end - pos;
    else if (st == BM_ZERO) {
      if (flush_gap (&g, err) == -1)
        return -1;
      memset (g.buf + (pos - offset), 0, run);
      STAT_ADD (read_map_bytes, run);
      pos += run;
      continue;
    }
    if (read_cached_or_gap (&g, pos, pos + run, err) == -1)
      return -1;
    pos += run;
  }
  if (flush_gap (&g, err) == -1)
    return -1;
  if (!g.plugin_called && count > 0)
    STAT_ADD (requests_avoided, 1);
  return 0;
}

int
mapped_cache (nbdkit_next *next, struct sb_handle *h,
              uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  const uint32_t bs = disk.blksize;
  uint64_t pos, end, budget;
  struct unreadable bad = { 0, 0 };
  int r = next->can_cache (next);

  if (r == -1) {
    *err = EIO;
    return -1;
  }
  /* A layer below that caches (the nbd plugin, the cache filter, the
   * file plugin), or whose caching nbdkit emulates, gets the whole
   * request.
   */
  if (r != NBDKIT_CACHE_NONE)
    return next->cache (next, count, offset, flags, err);
  if (h->sc == NULL)
    return 0;                   /* (not advertised: can_cache said NONE) */

  pos = round_down (offset, bs);
  end = MIN (round_up (offset + count, bs), h->size);
  /* Scanning more than the cache holds would only evict what was read. */
  budget = round_down (cfg_scan_cache, bs);
  while (pos < end && budget > 0) {
    uint64_t run, p, pend;
    enum bm_state st = blockmap_lookup (h->bm, pos, end - pos, &run);

    if (run == 0)
      break;
    if (st == BM_ZERO) {
      pos += run;
      continue;
    }
    for (p = pos, pend = pos + run; p < pend && budget > 0; ) {
      size_t uncached = pend - p;
      size_t got = scancache_read (h->sc, NULL, p, pend - p, false,
                                   &uncached);
      if (got > 0)
        p += got;
      else {
        uint64_t s = round_down (p, bs);
        uint64_t e = MIN (round_up (p + uncached, bs), h->size);

        e = MIN (e, s + budget);
        /* Unreadable blocks are skipped: caching is advisory. */
        if (scan_range (next, h, s, e, &bad, err) == -1)
          return -1;
        budget -= e - s;
        p = e;
      }
    }
    pos = pend;
  }
  VERBOSE ("cache %" PRIu32 "@%" PRIu64 ": scanned ahead", count, offset);
  return 0;
}
