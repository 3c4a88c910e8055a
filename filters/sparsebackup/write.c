/* nbdkit-sparsebackup-filter: the write side.
 *
 * Writes are split at block boundaries into runs of all-zero blocks and
 * data blocks (zero_run).  Zero runs become zero requests (or nothing at
 * all when the map knows them to be zero already), data runs stay writes,
 * and neighbouring pieces of the same kind are coalesced so that a write
 * never costs more plugin calls than it has runs.
 *
 * Map protocol (shared/notes/nbd-sparseness-rules.md):
 *  - writes and trims: change_begin (tracked) before, change_end after,
 *    in every map (a failed request leaves its blocks unknown);
 *  - zero requests: snapshot before, blockmap_learn_zero (inward) in the
 *    connection's own map after success, change_forget (every map) on
 *    failure.
 * Every scan cache drops the range before any of them is issued.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>

#include <nbdkit-filter.h>

#include "sparsebackup.h"
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
write_data (nbdkit_next *next, struct sb_export *ex,
            const void *buf, uint32_t count, uint64_t offset,
            uint32_t flags, int *err)
{
  struct sb_change c;
  int r;

  change_begin (&c, ex, offset, count, true, BM_DATA);
  r = next->pwrite (next, buf, count, offset, flags, err);
  change_end (&c, r == 0);
  if (r == 0)
    STAT_ADD (write_data_bytes, count);
  return r;
}

/* A zero request passed to the plugin (next->can_zero > NONE).  C is
 * the caller's untracked change covering the range.
 */
static int
zero_request (nbdkit_next *next, struct sb_export *ex, struct sb_change *c,
              uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  uint64_t snap;
  int r;

  snap = blockmap_snapshot (ex->bm);
  r = next->zero (next, count, offset, flags, err);
  if (r == 0) {
    blockmap_learn_zero (ex->bm, snap, offset, count);
    STAT_ADD (zero_bytes, count);
  }
  else if (!((flags & NBDKIT_FLAG_FAST_ZERO) &&
             (*err == ENOTSUP || *err == EOPNOTSUPP)))
    /* Failed: contents undefined (a fast-zero refusal changed nothing),
     * in every map that may describe the same disk.
     */
    change_forget (c, offset, count);
  return r;
}

enum piece_kind { PIECE_NONE, PIECE_DATA, PIECE_ZERO, PIECE_SKIP };

struct split {
  nbdkit_next *next;
  struct sb_export *ex;
  struct sb_change *change;     /* untracked change of the whole write */
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
    r = write_data (s->next, s->ex, s->buf + s->start, s->len, off,
                    s->piece_flags, err);
    s->data_pieces++;
    break;
  case PIECE_ZERO:
    r = zero_request (s->next, s->ex, s->change, s->len, off,
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
sb_pwrite (nbdkit_next *next, void *handle,
           const void *buf, uint32_t count, uint64_t offset,
           uint32_t flags, int *err)
{
  struct sb_handle *h = handle;
  struct sb_export *ex = h->ex;
  const bool fua = flags & NBDKIT_FLAG_FUA;
  struct sb_change c;
  int can_fua, can_zero;
  struct split s;
  size_t pos, len;
  bool zero;
  int r = -1;

  /* Unsplit writes (write_data tracks the change in every map). */
  if (cfg_detect_zeroes == DZ_OFF || count == 0)
    return write_data (next, ex, buf, count, offset, flags, err);

  len = zero_run (buf, count, 0, offset, ex->blksize, &zero);
  if (len == count && !zero)
    /* All data: the same single write. */
    return write_data (next, ex, buf, count, offset, flags, err);

  /* Split: every scan cache drops the whole range first (zero pieces are
   * not tracked writes); data pieces track themselves.
   */
  change_begin (&c, ex, offset, count, false, BM_UNKNOWN);

  can_fua = next->can_fua (next);
  can_zero = next->can_zero (next);
  if (can_fua == -1 || can_zero == -1) {
    *err = EIO;
    goto out;
  }

  memset (&s, 0, sizeof s);
  s.next = next;
  s.ex = ex;
  s.change = &c;
  s.buf = buf;
  s.offset = offset;
  s.kind = PIECE_NONE;
  s.piece_flags = fua && can_fua == NBDKIT_FUA_NATIVE ? NBDKIT_FLAG_FUA : 0;
  s.zero_flags = cfg_detect_zeroes == DZ_UNMAP ? NBDKIT_FLAG_MAY_TRIM : 0;

  for (pos = 0; pos < count; pos += len) {
    len = zero_run (buf, count, pos, offset, ex->blksize, &zero);
    if (!zero) {
      if (add_piece (&s, PIECE_DATA, pos, len, err) == -1)
        goto out;
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
          blockmap_is_zero (ex->bm, offset + pos, len))
        k = PIECE_SKIP;
      else if (can_zero == NBDKIT_ZERO_NATIVE)
        k = PIECE_ZERO;
      else
        k = PIECE_DATA;
      if (add_piece (&s, k, pos, len, err) == -1)
        goto out;
    }
  }
  if (issue (&s, err) == -1)
    goto out;

  VERBOSE ("pwrite %" PRIu32 "@%" PRIu64 ": %u data, %u zero, %u skipped "
           "piece(s)", count, offset,
           s.data_pieces, s.zero_pieces, s.skip_pieces);

  if (fua && (s.piece_flags == 0 || s.skip_pieces > 0)) {
    if (flush_if_possible (next, err) == -1)
      goto out;
  }
  r = 0;

 out:
  change_end (&c, true);
  return r;
}

/* The plugin cannot zero: write zero buffers over the parts of the range
 * not known to be zero already (all of it if PROVISION).
 */
static int
emulate_zero (nbdkit_next *next, struct sb_export *ex, struct sb_change *c,
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
    enum bm_state st = blockmap_lookup (ex->bm, pos, end - pos, &run);

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
      uint32_t n = min_u64 (run, min_u64 (ZERO_BUF_SIZE, ex->scan_chunk));
      uint64_t snap = blockmap_snapshot (ex->bm);

      if (next->pwrite (next, zero_buf, n, pos, wflags, err) == -1) {
        change_forget (c, pos, n);
        return -1;
      }
      blockmap_learn_zero (ex->bm, snap, pos, n);
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

int
sb_zero (nbdkit_next *next, void *handle,
         uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct sb_handle *h = handle;
  struct sb_export *ex = h->ex;
  const bool fast = flags & NBDKIT_FLAG_FAST_ZERO;
  const bool fua = flags & NBDKIT_FLAG_FUA;
  /* NO_HOLE honoured: the range must end up provisioned, which a block
   * known to read as zero may not be (it may be a hole).
   */
  const bool provision =
    !(flags & NBDKIT_FLAG_MAY_TRIM) && cfg_no_hole == NH_HONOUR;
  uint32_t zflags;
  struct sb_change c;
  int can_zero, r;

  if (!provision && blockmap_is_zero (ex->bm, offset, count)) {
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

  zflags = flags & (NBDKIT_FLAG_FUA | NBDKIT_FLAG_FAST_ZERO);
  if ((flags & NBDKIT_FLAG_MAY_TRIM) || cfg_no_hole == NH_IGNORE)
    zflags |= NBDKIT_FLAG_MAY_TRIM;

  change_begin (&c, ex, offset, count, false, BM_UNKNOWN);
  if (can_zero > NBDKIT_ZERO_NONE) {
    VERBOSE ("zero %" PRIu32 "@%" PRIu64 ": passed down%s%s%s",
             count, offset,
             zflags & NBDKIT_FLAG_MAY_TRIM ? " may_trim" : "",
             zflags & NBDKIT_FLAG_FUA ? " fua" : "",
             zflags & NBDKIT_FLAG_FAST_ZERO ? " fast" : "");
    r = zero_request (next, ex, &c, count, offset, zflags, err);
  }
  else
    r = emulate_zero (next, ex, &c, count, offset, flags, provision, err);
  change_end (&c, true);
  return r;
}

int
sb_trim (nbdkit_next *next, void *handle,
         uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  struct sb_handle *h = handle;
  struct sb_export *ex = h->ex;
  struct sb_change c;
  int r;

  /* A trim leaves the contents undefined: never known zero. */
  change_begin (&c, ex, offset, count, true, BM_UNKNOWN);
  r = next->trim (next, count, offset, flags, err);
  change_end (&c, r == 0);
  VERBOSE ("trim %" PRIu32 "@%" PRIu64 ": passed down, blocks unknown",
           count, offset);
  return r;
}
