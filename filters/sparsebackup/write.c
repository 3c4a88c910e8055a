/* nbdkit-sparsebackup-filter: the write side.
 *
 * Writes are split at block boundaries into runs of all-zero blocks and
 * data blocks (zero_run).  Zero runs become zero requests (or nothing at
 * all when the map knows them to be zero already), data runs stay writes,
 * and neighbouring pieces of the same kind are coalesced so that a write
 * never costs more plugin calls than it has runs.
 *
 * Every request issued to the plugin that can change the disk is one
 * change (change_begin before, change_end after; doc/design.md, "The map
 * protocol"): a write makes its blocks DATA, a trim or a zero request
 * makes them unknown, and a zero request that succeeded teaches the map
 * ZERO for the blocks it fully covers, as long as no other change
 * touched them meanwhile.  Connections that do not use the map (other
 * export names) are passed through, their changes still tracked.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>

#include <nbdkit-filter.h>

#include "internal.h"
#include "disk.h"
#include "zerodetect.h"

/* Zeroes for emulating zero requests when the plugin cannot zero.  Not
 * const so that it lands in .bss.
 */
#define ZERO_BUF_SIZE (1024 * 1024)
static char zero_buf[ZERO_BUF_SIZE];

/* Flush if the plugin can: durability owed for a FUA request whose
 * pieces did not all carry FUA.
 */
static int
flush_if_possible (nbdkit_next *next, int *err)
{
  int r = next->can_flush (next);

  if (r == -1) {
    *err = EIO;
    return -1;
  }
  if (r == 0)
    return 0;
  return next->flush (next, 0, err);
}

/* A write passed to the plugin. */
static int
write_data (nbdkit_next *next, struct sb_handle *h,
            const void *buf, uint32_t count, uint64_t offset,
            uint32_t flags, int *err)
{
  struct sb_change c;
  int r;

  if (change_begin (&c, h->bm != NULL, offset, count, BM_DATA,
                    err) == -1)
    return -1;
  r = next->pwrite (next, buf, count, offset, flags, err);
  change_end (&c, r == 0);
  if (r == 0)
    STAT_ADD (write_data_bytes, count);
  return r;
}

/* A request that leaves [OFFSET, OFFSET+COUNT) reading as zero: a zero
 * request, or (WRITE_ZEROES) a write of zero_buf (COUNT <= its size).
 * On success the map learns ZERO where no other change intervened.
 */
static int
zeroing (nbdkit_next *next, struct sb_handle *h, bool write_zeroes,
         uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct sb_change c;
  uint64_t snap;
  bool refused;
  int r;

  if (change_begin (&c, h->bm != NULL, offset, count, BM_UNKNOWN,
                    err) == -1)
    return -1;
  /* After change_begin: a change that ended before this snapshot ended
   * before the request was issued, which overwrites it.
   */
  snap = changes_snapshot (disk.changes);
  if (write_zeroes)
    r = next->pwrite (next, zero_buf, count, offset, flags, err);
  else
    r = next->zero (next, count, offset, flags, err);
  if (r == 0 && h->bm)
    blockmap_learn_zero (h->bm, snap, c.ticket, offset, count, true);
  if (r == 0 && !write_zeroes)
    STAT_ADD (zero_bytes, count);
  /* A fast-zero refusal changed nothing; any other failure leaves the
   * contents undefined (the blocks become unknown).
   */
  refused = r == -1 && (flags & NBDKIT_FLAG_FAST_ZERO) &&
    (*err == ENOTSUP || *err == EOPNOTSUPP);
  change_end (&c, r == 0 || refused);
  return r;
}

/* The map does not know whether [OFFSET, OFFSET+COUNT) is zero: if part
 * of it is unknown, ask the plugin's extents once for a large region
 * (never per block) so that zeroing of space already zero can be
 * skipped, on a fresh target too.  Failures only mean no skipping.
 */
static void
learn_target (nbdkit_next *next, struct sb_handle *h,
              uint32_t count, uint64_t offset)
{
  const uint64_t end = offset + count;
  uint64_t pos = offset, run, queried_end;
  int err;

  while (pos < end) {
    enum bm_state st = blockmap_lookup (h->bm, pos, end - pos, &run);

    if (run == 0)
      return;
    if (st == BM_UNKNOWN) {
      int r = next->can_extents (next);

      if (r == 1)
        query_plugin (next, h, pos, end, &queried_end, &err);
      return;
    }
    if (st != BM_ZERO)
      return;                   /* known not all zero */
    pos += run;
  }
}

/* Every block touched by the range is known zero, after asking the
 * plugin if needed.
 */
static bool
known_zero (nbdkit_next *next, struct sb_handle *h,
            uint32_t count, uint64_t offset)
{
  if (blockmap_is_zero (h->bm, offset, count))
    return true;
  learn_target (next, h, count, offset);
  return blockmap_is_zero (h->bm, offset, count);
}

enum piece_kind { PIECE_NONE, PIECE_DATA, PIECE_ZERO, PIECE_SKIP };

struct split {
  nbdkit_next *next;
  struct sb_handle *h;
  const char *buf;
  uint64_t offset;              /* disk offset of buf[0] */
  uint32_t piece_flags;         /* FUA or 0 */
  uint32_t zero_flags;          /* MAY_TRIM or 0 */
  unsigned data_pieces, zero_pieces, skip_pieces;
  /* The pending piece. */
  enum piece_kind kind;
  size_t start, len;
};

static int
issue (struct split *s, int *err)
{
  const uint64_t off = s->offset + s->start;
  int r = 0;

  switch (s->kind) {
  case PIECE_NONE:
    break;
  case PIECE_DATA:
    r = write_data (s->next, s->h, s->buf + s->start, s->len, off,
                    s->piece_flags, err);
    s->data_pieces++;
    break;
  case PIECE_ZERO:
    r = zeroing (s->next, s->h, false, s->len, off,
                 s->zero_flags | s->piece_flags, err);
    if (r == 0)
      STAT_ADD (write_zero_bytes, s->len);
    s->zero_pieces++;
    break;
  case PIECE_SKIP:
    STAT_ADD (write_zero_bytes, s->len);
    STAT_ADD (zero_skipped_bytes, s->len);
    STAT_ADD (requests_avoided, 1);
    s->skip_pieces++;
    break;
  }
  s->kind = PIECE_NONE;
  s->len = 0;
  return r;
}

/* Add [START, START+LEN) of kind KIND, coalescing with the pending piece. */
static int
add_piece (struct split *s, enum piece_kind kind, size_t start, size_t len,
           int *err)
{
  if (s->kind == kind && s->start + s->len == start) {
    s->len += len;
    return 0;
  }
  if (issue (s, err) == -1)
    return -1;
  s->kind = kind;
  s->start = start;
  s->len = len;
  return 0;
}

int
sparsebackup_pwrite (nbdkit_next *next, void *handle,
                     const void *buf, uint32_t count, uint64_t offset,
                     uint32_t flags, int *err)
{
  struct sb_handle *h = handle;
  const bool fua = flags & NBDKIT_FLAG_FUA;
  int can_fua, can_zero;
  struct split s;
  size_t pos, len;
  bool zero;

  /* Unsplit writes. */
  if (h->bm == NULL || cfg_detect_zeroes == DZ_OFF || count == 0) {
    if (h->bm == NULL)
      STAT_ADD (passthrough_requests, 1);
    return write_data (next, h, buf, count, offset, flags, err);
  }

  len = zero_run (buf, count, 0, offset, disk.blksize, &zero);
  if (len == count && !zero)
    /* All data: the same single write. */
    return write_data (next, h, buf, count, offset, flags, err);

  can_fua = next->can_fua (next);
  can_zero = next->can_zero (next);
  if (can_fua == -1 || can_zero == -1) {
    *err = EIO;
    return -1;
  }

  memset (&s, 0, sizeof s);
  s.next = next;
  s.h = h;
  s.buf = buf;
  s.offset = offset;
  s.kind = PIECE_NONE;
  s.piece_flags = fua && can_fua == NBDKIT_FUA_NATIVE ? NBDKIT_FLAG_FUA : 0;
  s.zero_flags = cfg_detect_zeroes == DZ_UNMAP ? NBDKIT_FLAG_MAY_TRIM : 0;

  for (pos = 0; pos < count; pos += len) {
    len = zero_run (buf, count, pos, offset, disk.blksize, &zero);
    if (!zero) {
      if (add_piece (&s, PIECE_DATA, pos, len, err) == -1)
        return -1;
    }
    else {
      /* A zero run is skipped if every block it touches is known zero
       * (only under detect-zeroes=unmap: "on" promises allocation, which
       * a known-zero hole does not have), else zeroed with one request
       * (or written, if the plugin has no native zero: a zero request
       * would become the same write anyway).
       */
      enum piece_kind k;

      if (cfg_detect_zeroes == DZ_UNMAP &&
          known_zero (next, h, len, offset + pos))
        k = PIECE_SKIP;
      else if (can_zero == NBDKIT_ZERO_NATIVE)
        k = PIECE_ZERO;
      else
        k = PIECE_DATA;
      if (add_piece (&s, k, pos, len, err) == -1)
        return -1;
    }
  }
  if (issue (&s, err) == -1)
    return -1;

  VERBOSE ("pwrite %" PRIu32 "@%" PRIu64 ": %u data, %u zero, %u skipped "
           "piece(s)", count, offset,
           s.data_pieces, s.zero_pieces, s.skip_pieces);

  if (fua && (s.piece_flags == 0 || s.skip_pieces > 0))
    return flush_if_possible (next, err);
  return 0;
}

/* The plugin cannot zero: write zero buffers over the parts of the range
 * not known to be zero already (all of it if PROVISION).
 */
static int
emulate_zero (nbdkit_next *next, struct sb_handle *h,
              uint32_t count, uint64_t offset, uint32_t flags,
              bool provision, int *err)
{
  const bool fua = flags & NBDKIT_FLAG_FUA;
  uint64_t pos = offset, end = offset + count;
  uint32_t wflags = 0;
  bool skipped = false;
  int can_fua;

  can_fua = next->can_fua (next);
  if (can_fua == -1) {
    *err = EIO;
    return -1;
  }
  if (fua && can_fua == NBDKIT_FUA_NATIVE)
    wflags = NBDKIT_FLAG_FUA;

  while (pos < end) {
    uint64_t run;
    enum bm_state st = blockmap_lookup (h->bm, pos, end - pos, &run);

    if (run == 0)
      run = end - pos;
    if (st == BM_ZERO && !provision) {
      STAT_ADD (zero_skipped_bytes, run);
      skipped = true;
      pos += run;
      continue;
    }
    while (run > 0) {
      /* scan_chunk respects the plugin's maximum request size. */
      uint32_t n = MIN (run, MIN ((uint64_t) ZERO_BUF_SIZE,
                                  (uint64_t) disk.scan_chunk));

      if (zeroing (next, h, true, n, pos, wflags, err) == -1)
        return -1;
      STAT_ADD (write_data_bytes, n);
      pos += n;
      run -= n;
    }
  }
  VERBOSE ("zero %" PRIu32 "@%" PRIu64 ": emulated with writes", count, offset);

  if (fua && (wflags == 0 || skipped))
    return flush_if_possible (next, err);
  return 0;
}

/* A trim, or a zero request of a connection without the map, passed
 * straight to the plugin: its blocks become unknown.
 */
static int
plain_change (nbdkit_next *next, struct sb_handle *h, bool trim,
              uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct sb_change c;
  int r;

  if (h->bm == NULL)
    STAT_ADD (passthrough_requests, 1);
  /* A trim leaves the contents undefined: TRIMMED, never learnt zero
   * from the plugin's extents (a layer below may keep the old data, as
   * nbdkit 1.32's cache filter does).
   */
  if (change_begin (&c, h->bm != NULL, offset, count,
                    trim ? BM_TRIMMED : BM_UNKNOWN, err) == -1)
    return -1;
  if (trim)
    r = next->trim (next, count, offset, flags, err);
  else
    r = next->zero (next, count, offset, flags, err);
  change_end (&c, r == 0);
  return r;
}

int
sparsebackup_zero (nbdkit_next *next, void *handle,
                   uint32_t count, uint64_t offset, uint32_t flags,
                   int *err)
{
  struct sb_handle *h = handle;
  const bool fast = flags & NBDKIT_FLAG_FAST_ZERO;
  const bool fua = flags & NBDKIT_FLAG_FUA;
  /* NO_HOLE honoured: the range must end up provisioned, which a block
   * known to read as zero may not be (it may be a hole).
   */
  const bool provision =
    !(flags & NBDKIT_FLAG_MAY_TRIM) && cfg_no_hole == NH_HONOUR;
  uint32_t zflags;
  int can_zero;

  if (h->bm == NULL)
    return plain_change (next, h, false, count, offset, flags, err);

  if (!provision && known_zero (next, h, count, offset)) {
    VERBOSE ("zero %" PRIu32 "@%" PRIu64 ": skipped, known zero",
             count, offset);
    STAT_ADD (zero_skipped_bytes, count);
    STAT_ADD (requests_avoided, 1);
    if (fua)
      return flush_if_possible (next, err);
    return 0;
  }

  can_zero = next->can_zero (next);
  if (can_zero == -1) {
    *err = EIO;
    return -1;
  }

  if (fast) {
    int can_fast_zero = can_zero > NBDKIT_ZERO_NONE ?
      next->can_fast_zero (next) : 0;
    if (can_fast_zero == -1) {
      *err = EIO;
      return -1;
    }
    if (can_fast_zero == 0) {
      VERBOSE ("zero %" PRIu32 "@%" PRIu64 ": fast zero refused",
               count, offset);
      *err = ENOTSUP;
      return -1;
    }
  }

  if (can_zero == NBDKIT_ZERO_NONE)
    return emulate_zero (next, h, count, offset, flags, provision, err);

  zflags = flags & (NBDKIT_FLAG_FUA | NBDKIT_FLAG_FAST_ZERO);
  if ((flags & NBDKIT_FLAG_MAY_TRIM) || cfg_no_hole == NH_IGNORE)
    zflags |= NBDKIT_FLAG_MAY_TRIM;
  VERBOSE ("zero %" PRIu32 "@%" PRIu64 ": passed down%s%s%s",
           count, offset,
           zflags & NBDKIT_FLAG_MAY_TRIM ? " may_trim" : "",
           zflags & NBDKIT_FLAG_FUA ? " fua" : "",
           zflags & NBDKIT_FLAG_FAST_ZERO ? " fast" : "");
  return zeroing (next, h, false, count, offset, zflags, err);
}

int
sparsebackup_trim (nbdkit_next *next, void *handle,
                   uint32_t count, uint64_t offset, uint32_t flags,
                   int *err)
{
  struct sb_handle *h = handle;

  /* A trim leaves the contents undefined: never known zero. */
  VERBOSE ("trim %" PRIu32 "@%" PRIu64 ": passed down, blocks unknown",
           count, offset);
  return plain_change (next, h, true, count, offset, flags, err);
}
