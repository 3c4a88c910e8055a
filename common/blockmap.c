/* sparsebackup: the block map.
 *
 * Pure C: no nbdkit headers.  See blockmap.h for the contract.  This file
 * holds the public functions and the memory budget; the representation
 * and its editing (the sequence of runs) are in blockmap-runs.c, the
 * shared types in blockmap-private.h.  This file calls blockmap-runs.c,
 * never the reverse.
 *
 * Memory budget
 * -------------
 * A client that writes alternating data and zero blocks makes one run
 * per block.  The map never holds more than its budget: when an edit
 * takes it over, the runs of two neighbouring chunks at a rotating
 * cursor are replaced by one run (knowledge is forgotten, which is
 * always safe; nothing becomes ZERO), until it is back under 3/4 of the
 * budget.  That run is UNKNOWN, or TRIMMED if any of its blocks was DATA
 * or TRIMMED: blocks the map saw hold data must not be learnt zero from
 * the plugin's extents once forgotten (a layer below that caches writes
 * may report zero over them).  FORGOTTEN counts the bytes that lost
 * their state.
 *
 * Zero knowledge and concurrent changes
 * -------------------------------------
 * The map keeps no record of changes itself: the disk's change tracker
 * (changes.h) does.  Learners pass their snapshot, and the parts of the
 * range that the tracker reports unchanged are edited inside the
 * tracker's callback, so no change can begin between the check and the
 * edit (lock order: tracker, then map).  A change calls blockmap_change
 * after changes_begin, so a learner either sees the change in flight or
 * edited the map before the change cleared it.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include "blockmap.h"
#include "blockmap-private.h"
#include "changes.h"
#include "ispowerof2.h"
#include "minmax.h"

#define MIN_BLKSIZE 512
#define MAX_BLKSIZE (64 * 1024 * 1024)
#define MAX_SIZE (UINT64_C (1) << 63)

/* The smallest memory budget accepted. */
#define MIN_BUDGET (64 * 1024)

/* Clip a byte range to the export and round it outward to blocks.
 * Returns false if nothing is left.
 */
static bool
round_outward (const struct blockmap *bm, uint64_t offset, uint64_t count,
               struct range *r)
{
  uint64_t end;

  if (count == 0 || offset >= bm->size)
    return false;
  end = count > bm->size - offset ? bm->size : offset + count;
  r->first = offset >> bm->blkshift;
  r->end = (end + bm->blksize - 1) >> bm->blkshift;
  return true;
}

/* Clip a byte range to the export and round it inward to blocks; the
 * partial last block of the export counts as a whole block when the range
 * reaches the end.  Returns false if no block is left.
 */
static bool
round_inward (const struct blockmap *bm, uint64_t offset, uint64_t count,
              struct range *r)
{
  uint64_t end;

  if (count == 0 || offset >= bm->size)
    return false;
  end = count > bm->size - offset ? bm->size : offset + count;
  r->first = (offset + bm->blksize - 1) >> bm->blkshift;
  r->end = end == bm->size ? bm->nblocks : end >> bm->blkshift;
  return r->first < r->end;
}

/* Where an edit that must not be lost cannot be made for want of
 * memory, everything is forgotten: TRIMMED, which needs no memory, is
 * never ZERO and is not learnt zero from extents.
 */
static void
reset_lossless (struct blockmap *bm)
{
  bm_reset (bm, BM_TRIMMED);
}

/*----------------------------------------------------------------------
 * The memory budget.
 */

static uint64_t
memory_used (const struct blockmap *bm)
{
  return sizeof *bm
    + bm->chunks_cap * sizeof bm->chunks[0]
    + (bm->nchunks + (bm->spare != NULL)) * sizeof (struct chunk);
}

/* Called after every edit that may have grown the map (lock held). */
static void
enforce_budget (struct blockmap *bm)
{
  const uint64_t target = bm->budget / 4 * 3;

  if (memory_used (bm) <= bm->budget)
    return;
  while (memory_used (bm) > target && bm->nchunks > 1) {
    struct pos p;
    uint64_t a, b, total;
    unsigned st;

    if (bm->evict_cursor >= bm->nblocks)
      bm->evict_cursor = 0;
    p = bm_find (bm, bm->evict_cursor);
    if (p.c + 1 >= bm->nchunks)
      p.c--;                    /* the last two chunks */
    a = p.c == 0 ? 0 : ent_start (bm->chunks[p.c]->e[0]);
    b = p.c + 2 < bm->nchunks ?
      ent_start (bm->chunks[p.c + 2]->e[0]) : bm->nblocks;
    /* What held data stays out of reach of the plugin's extents. */
    total = blocks_to_bytes (bm, a, b);
    st = bm_bytes_not_in (bm, a, b, BM_DATA) < total ||
      bm_bytes_not_in (bm, a, b, BM_TRIMMED) < total ?
      BM_TRIMMED : BM_UNKNOWN;
    bm->forgotten += bm_bytes_not_in (bm, a, b, st);
    if (bm_set_uniform (bm, a, b, st) == -1) {
      bm->forgotten += bm_bytes_not_in (bm, 0, bm->nblocks, BM_TRIMMED);
      reset_lossless (bm);
      break;
    }
    bm->evict_cursor = b;
  }
}

/* Set blocks [A, B) to ST; on failure to allocate forget everything
 * (the edit must not be lost).  Lock held.
 */
static void
set_or_reset (struct blockmap *bm, uint64_t a, uint64_t b, unsigned st)
{
  if (bm_set_uniform (bm, a, b, st) == -1)
    reset_lossless (bm);
  else
    enforce_budget (bm);
}

/*----------------------------------------------------------------------
 * Public functions.
 */

struct blockmap *
blockmap_new (uint64_t size, uint32_t blksize, struct changes *changes,
              uint64_t budget)
{
  struct blockmap *bm;
  int err;

  if (blksize < MIN_BLKSIZE || blksize > MAX_BLKSIZE ||
      !is_power_of_2 (blksize) || size > MAX_SIZE || changes == NULL ||
      budget < MIN_BUDGET) {
    errno = EINVAL;
    return NULL;
  }

  bm = calloc (1, sizeof *bm);
  if (bm == NULL)
    return NULL;
  err = pthread_mutex_init (&bm->lock, NULL);
  if (err != 0) {
    free (bm);
    errno = err;
    return NULL;
  }
  bm->size = size;
  bm->blksize = blksize;
  bm->blkshift = log_2_bits (blksize);
  bm->nblocks = (size >> bm->blkshift) + ((size & (blksize - 1)) != 0);
  bm->changes = changes;
  bm->budget = budget;

  bm->chunks_cap = 4;
  bm->chunks = malloc (bm->chunks_cap * sizeof bm->chunks[0]);
  if (bm->chunks == NULL)
    goto err;
  bm->chunks[0] = malloc (sizeof (struct chunk));
  if (bm->chunks[0] == NULL)
    goto err;
  bm->nchunks = 1;
  bm->chunks[0]->n = 1;
  bm->chunks[0]->e[0] = mkent (0, BM_UNKNOWN);
  bm->nruns = 1;
  return bm;

 err:
  err = errno;
  blockmap_free (bm);
  errno = err;
  return NULL;
}

void
blockmap_free (struct blockmap *bm)
{
  size_t c;

  if (bm == NULL)
    return;
  if (bm->chunks) {
    for (c = 0; c < bm->nchunks; c++)
      free (bm->chunks[c]);
    free (bm->chunks);
  }
  free (bm->spare);
  pthread_mutex_destroy (&bm->lock);
  free (bm);
}

uint32_t
blockmap_blksize (const struct blockmap *bm)
{
  return bm->blksize;
}

uint64_t
blockmap_size (struct blockmap *bm)
{
  uint64_t size;

  pthread_mutex_lock (&bm->lock);
  size = bm->size;
  pthread_mutex_unlock (&bm->lock);
  return size;
}

int
blockmap_resize (struct blockmap *bm, uint64_t size)
{
  if (size > MAX_SIZE) {
    errno = EINVAL;
    return -1;
  }
  pthread_mutex_lock (&bm->lock);
  bm->forgotten += bm_bytes_not_in (bm, 0, bm->nblocks, BM_UNKNOWN);
  bm_reset (bm, BM_UNKNOWN);
  bm->size = size;
  bm->nblocks = (size >> bm->blkshift) + ((size & (bm->blksize - 1)) != 0);
  bm->evict_cursor = 0;
  pthread_mutex_unlock (&bm->lock);
  return 0;
}

enum bm_state
blockmap_lookup (struct blockmap *bm, uint64_t offset, uint64_t limit,
                 uint64_t *run)
{
  struct pos p;
  uint64_t end;
  unsigned st;

  pthread_mutex_lock (&bm->lock);
  if (offset >= bm->size || limit == 0) {
    pthread_mutex_unlock (&bm->lock);
    *run = 0;
    return BM_UNKNOWN;
  }
  limit = MIN (limit, bm->size - offset);
  p = bm_find (bm, offset >> bm->blkshift);
  st = ent_state (ent_at (bm, p));
  end = blocks_to_bytes (bm, 0, run_end (bm, p));
  pthread_mutex_unlock (&bm->lock);

  *run = MIN (end - offset, limit);
  return st;
}

bool
blockmap_is_zero (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  struct range r;
  struct pos p;
  bool ret;

  pthread_mutex_lock (&bm->lock);
  if (count == 0)
    ret = offset <= bm->size;
  /* Anything outside the export is not known to be zero. */
  else if (offset >= bm->size || count > bm->size - offset)
    ret = false;
  else {
    round_outward (bm, offset, count, &r);
    p = bm_find (bm, r.first);
    ret = ent_state (ent_at (bm, p)) == BM_ZERO && run_end (bm, p) >= r.end;
  }
  pthread_mutex_unlock (&bm->lock);
  return ret;
}

/* Apply TABLE to the blocks touched by a byte range (rounded outward),
 * lock held.  Failure to allocate only loses what would be learnt, except
 * when LOSSLESS, where the map is reset instead.
 */
static void
transform_bytes (struct blockmap *bm, uint64_t offset, uint64_t count,
                 const unsigned *table, bool lossless)
{
  struct range r;

  if (!round_outward (bm, offset, count, &r))
    return;
  if (bm_transform (bm, r.first, r.end, table) == -1 && lossless)
    reset_lossless (bm);
  enforce_budget (bm);
}

void
blockmap_learn_allocated (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  static const unsigned table[BM_NSTATES] = {
    [BM_UNKNOWN] = BM_ALLOCATED, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO, [BM_TRIMMED] = BM_TRIMMED,
  };

  pthread_mutex_lock (&bm->lock);
  transform_bytes (bm, offset, count, table, false);
  pthread_mutex_unlock (&bm->lock);
}

struct learn_data {
  struct blockmap *bm;
  uint64_t offset, end;         /* the read */
};

/* changes_unchanged callback of blockmap_learn_data: ZERO -> DATA on the
 * blocks of an unchanged part.  At the read's own ends the partial block
 * was seen (outward); at the end of a part that a change cut short, the
 * block was touched by the change (inward).
 */
static void
zero_to_data_cb (void *opaque, uint64_t offset, uint64_t count)
{
  static const unsigned table[BM_NSTATES] = {
    [BM_UNKNOWN] = BM_UNKNOWN, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_DATA, [BM_TRIMMED] = BM_TRIMMED,
  };
  struct learn_data *l = opaque;
  struct blockmap *bm = l->bm;
  uint64_t a, b;

  pthread_mutex_lock (&bm->lock);
  if (offset >= bm->size)
    goto out;
  a = offset == l->offset ? offset >> bm->blkshift
    : (offset + bm->blksize - 1) >> bm->blkshift;
  b = offset + count;
  if (b >= bm->size)
    b = bm->nblocks;
  else if (b == l->end)
    b = (b + bm->blksize - 1) >> bm->blkshift;
  else
    b >>= bm->blkshift;
  /* A block seen to hold data must not stay ZERO. */
  if (a < b && bm_transform (bm, a, b, table) == -1)
    reset_lossless (bm);
  enforce_budget (bm);
 out:
  pthread_mutex_unlock (&bm->lock);
}

void
blockmap_learn_data (struct blockmap *bm, uint64_t snap,
                     uint64_t offset, uint64_t count)
{
  static const unsigned weak_to_data[BM_NSTATES] = {
    [BM_UNKNOWN] = BM_DATA, [BM_ALLOCATED] = BM_DATA,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO, [BM_TRIMMED] = BM_DATA,
  };
  struct range r;
  bool some_zero = false;

  pthread_mutex_lock (&bm->lock);
  if (round_outward (bm, offset, count, &r)) {
    transform_bytes (bm, offset, count, weak_to_data, false);
    some_zero = bm_bytes_not_in (bm, r.first, r.end, BM_ZERO) !=
      blocks_to_bytes (bm, r.first, r.end);
  }
  pthread_mutex_unlock (&bm->lock);

  /* ZERO stays where a change since SNAP may have made it so: that
   * knowledge is newer than the caller's read.
   */
  if (some_zero) {
    struct learn_data l = { .bm = bm, .offset = offset,
                            .end = count > UINT64_MAX - offset ?
                            UINT64_MAX : offset + count };

    changes_unchanged (bm->changes, snap, 0, offset, count,
                       zero_to_data_cb, &l);
  }
}

struct learn_zero {
  struct blockmap *bm;
  bool contents;
  uint64_t learnt;
};

/* changes_unchanged callback of blockmap_learn_zero. */
static void
learn_zero_cb (void *opaque, uint64_t offset, uint64_t count)
{
  /* From extents: never over what was seen to hold data or became
   * undefined (blockmap.h).
   */
  static const unsigned weak_to_zero[BM_NSTATES] = {
    [BM_UNKNOWN] = BM_ZERO, [BM_ALLOCATED] = BM_ZERO,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO, [BM_TRIMMED] = BM_TRIMMED,
  };
  struct learn_zero *l = opaque;
  struct blockmap *bm = l->bm;
  struct range r;
  uint64_t before;

  if (!round_inward (bm, offset, count, &r))
    return;
  pthread_mutex_lock (&bm->lock);
  before = bm_bytes_not_in (bm, r.first, r.end, BM_ZERO);
  if (before > 0) {
    if (l->contents) {
      if (bm_set_uniform (bm, r.first, r.end, BM_ZERO) == 0)
        l->learnt += before;
    }
    else if (bm_transform (bm, r.first, r.end, weak_to_zero) == 0)
      l->learnt += before - bm_bytes_not_in (bm, r.first, r.end, BM_ZERO);
    enforce_budget (bm);
  }
  pthread_mutex_unlock (&bm->lock);
}

uint64_t
blockmap_learn_zero (struct blockmap *bm, uint64_t snap, uint64_t except,
                     uint64_t offset, uint64_t count, bool contents)
{
  struct learn_zero l = { .bm = bm, .contents = contents, .learnt = 0 };
  struct range r;
  bool known;

  /* Nothing to learn if it is all known already. */
  pthread_mutex_lock (&bm->lock);
  known = !round_inward (bm, offset, count, &r) ||
    bm_bytes_not_in (bm, r.first, r.end, BM_ZERO) == 0;
  pthread_mutex_unlock (&bm->lock);
  if (known)
    return 0;

  changes_unchanged (bm->changes, snap, except, offset, count,
                     learn_zero_cb, &l);
  return l.learnt;
}

void
blockmap_change (struct blockmap *bm, uint64_t offset, uint64_t count,
                 enum bm_state newstate)
{
  static const unsigned zero_to_unknown[BM_NSTATES] = {
    [BM_UNKNOWN] = BM_UNKNOWN, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_UNKNOWN, [BM_TRIMMED] = BM_TRIMMED,
  };
  struct range r;
  unsigned st = newstate;

  /* Only blockmap_learn_zero makes blocks ZERO. */
  if (st == BM_ZERO || st >= BM_NSTATES)
    st = BM_UNKNOWN;
  pthread_mutex_lock (&bm->lock);
  if (!round_outward (bm, offset, count, &r))
    goto out;
  if (st != BM_UNKNOWN)
    set_or_reset (bm, r.first, r.end, st);
  else {
    /* A zero request: the blocks lose ZERO, the rest stays until it
     * has succeeded or failed.
     */
    if (bm_transform (bm, r.first, r.end, zero_to_unknown) == -1)
      reset_lossless (bm);
    enforce_budget (bm);
  }
 out:
  pthread_mutex_unlock (&bm->lock);
}

void
blockmap_forget (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  struct range r;

  pthread_mutex_lock (&bm->lock);
  if (round_outward (bm, offset, count, &r))
    set_or_reset (bm, r.first, r.end, BM_TRIMMED);
  pthread_mutex_unlock (&bm->lock);
}

void
blockmap_get_stats (struct blockmap *bm, struct blockmap_stats *stats)
{
  size_t c;
  uint32_t k;

  memset (stats, 0, sizeof *stats);
  pthread_mutex_lock (&bm->lock);
  stats->runs = bm->nruns;
  stats->memory = memory_used (bm);
  stats->budget = bm->budget;
  stats->forgotten = bm->forgotten;
  for (c = 0; c < bm->nchunks; c++) {
    const struct chunk *ch = bm->chunks[c];

    for (k = 0; k < ch->n; k++) {
      struct pos p = { c, k };
      uint64_t first = ent_start (ch->e[k]);

      stats->bytes[ent_state (ch->e[k])] +=
        blocks_to_bytes (bm, first, run_end (bm, p));
    }
  }
  pthread_mutex_unlock (&bm->lock);
}

int
blockmap_check (struct blockmap *bm)
{
  size_t c;
  uint32_t k;
  uint64_t runs = 0, prev_start = 0;
  unsigned prev_state = 0;
  int ret = -1;

  pthread_mutex_lock (&bm->lock);
  if (bm->nchunks == 0 || bm->nchunks > bm->chunks_cap)
    goto out;
  for (c = 0; c < bm->nchunks; c++) {
    const struct chunk *ch = bm->chunks[c];

    if (ch->n == 0 || ch->n > CHUNK_CAP)
      goto out;
    for (k = 0; k < ch->n; k++) {
      uint64_t start = ent_start (ch->e[k]);
      unsigned st = ent_state (ch->e[k]);

      if (st >= BM_NSTATES)
        goto out;
      if (runs == 0) {
        if (start != 0)
          goto out;
      }
      else if (start <= prev_start || start >= bm->nblocks ||
               st == prev_state)
        goto out;
      prev_start = start;
      prev_state = st;
      runs++;
    }
  }
  if (runs != bm->nruns)
    goto out;
  ret = 0;
 out:
  pthread_mutex_unlock (&bm->lock);
  if (ret == -1)
    errno = EIO;
  return ret;
}
