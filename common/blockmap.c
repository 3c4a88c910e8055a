/* sparsebackup: the block map.
 *
 * Pure C: no nbdkit headers.  See blockmap.h for the contract.
 *
 * Representation
 * --------------
 * The map is a sorted sequence of runs.  Each run is one 64 bit entry:
 * the index of its first block (shifted left by 8) and its state (low 8
 * bits).  A run lasts until the start of the next run, or the end of the
 * export.  The first run always starts at block 0, and two adjacent runs
 * never have the same state (they are merged), so the number of entries
 * is the number of state changes + 1.
 *
 * The sequence is cut into chunks of at most CHUNK_CAP entries, and an
 * array of chunk pointers is kept in order.  Finding the run of a block
 * is a binary search on the chunks (by their first entry) followed by a
 * binary search inside one chunk.  Editing touches one or a few chunks:
 * a full chunk is split in two halves, and small neighbouring chunks are
 * merged, so memory stays proportional to the number of runs (at worst
 * about 4 entries' worth of memory per run, typically 1.5).
 *
 * Every edit is expressed as "set blocks [A, B) to state S"
 * (set_uniform), which replaces the runs overlapping [A, B) by at most 3
 * runs.  The allocations it may need (one spare chunk, one more slot in
 * the chunk array) are made before anything is changed, so an edit
 * either happens completely or not at all.  Where an edit must not be
 * lost (clearing zero knowledge before a write), a failure to allocate
 * resets the whole map to "unknown", which needs no memory and is always
 * safe.
 *
 * Memory budget
 * -------------
 * A client that writes alternating data and zero blocks makes one run
 * per block.  The map never holds more than its budget: when an edit
 * takes it over, the runs of two neighbouring chunks at a rotating
 * cursor are replaced by one UNKNOWN run (knowledge is forgotten, which
 * is always safe; nothing becomes ZERO), until it is back under 3/4 of
 * the budget.  FORGOTTEN counts the bytes that lost their state.
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
#include "changes.h"
#include "ispowerof2.h"
#include "minmax.h"

#define MIN_BLKSIZE 512
#define MAX_BLKSIZE (64 * 1024 * 1024)
#define MAX_SIZE (UINT64_C (1) << 63)

/* Entries per chunk.  256 * 8 bytes = 2 KiB per chunk. */
#define CHUNK_CAP 256
/* Two neighbouring chunks holding this many entries or fewer together are
 * merged into one.
 */
#define MERGE_THRESHOLD (CHUNK_CAP / 2)

/* The smallest memory budget accepted. */
#define MIN_BUDGET (64 * 1024)

#define STATE_BITS 8
#define STATE_FIELD ((UINT64_C (1) << STATE_BITS) - 1)

struct chunk {
  uint32_t n;                   /* entries used */
  uint64_t e[CHUNK_CAP];        /* start block << STATE_BITS | state */
};

/* A position in the sequence of runs: chunk C, entry K. */
struct pos {
  size_t c;
  uint32_t k;
};

/* A block range [first, end). */
struct range {
  uint64_t first, end;
};

struct blockmap {
  pthread_mutex_t lock;

  /* Immutable after blockmap_new. */
  uint64_t size;
  uint64_t nblocks;
  uint32_t blksize;
  unsigned blkshift;

  /* The runs. */
  struct chunk **chunks;
  size_t nchunks, chunks_cap;
  struct chunk *spare;          /* preallocated for the next split */
  uint64_t nruns;

  /* The disk's change tracker (not owned). */
  struct changes *changes;

  /* Memory budget. */
  uint64_t budget;
  uint64_t evict_cursor;        /* block where the next eviction starts */
  uint64_t forgotten;           /* bytes forgotten for the budget */
};

/*----------------------------------------------------------------------
 * Entries and positions.
 */

static inline uint64_t
mkent (uint64_t start, unsigned state)
{
  return start << STATE_BITS | state;
}

static inline uint64_t
ent_start (uint64_t e)
{
  return e >> STATE_BITS;
}

static inline unsigned
ent_state (uint64_t e)
{
  return e & STATE_FIELD;
}

static inline uint64_t
ent_at (const struct blockmap *bm, struct pos p)
{
  return bm->chunks[p.c]->e[p.k];
}

/* The position after P, false if P is the last run. */
static inline bool
pos_next (const struct blockmap *bm, struct pos p, struct pos *next)
{
  if (p.k + 1 < bm->chunks[p.c]->n) {
    next->c = p.c;
    next->k = p.k + 1;
    return true;
  }
  if (p.c + 1 < bm->nchunks) {
    next->c = p.c + 1;
    next->k = 0;
    return true;
  }
  return false;
}

/* The position before P, false if P is the first run. */
static inline bool
pos_prev (const struct blockmap *bm, struct pos p, struct pos *prev)
{
  if (p.k > 0) {
    prev->c = p.c;
    prev->k = p.k - 1;
    return true;
  }
  if (p.c > 0) {
    prev->c = p.c - 1;
    prev->k = bm->chunks[p.c - 1]->n - 1;
    return true;
  }
  return false;
}

/* The end block of the run at P. */
static inline uint64_t
run_end (const struct blockmap *bm, struct pos p)
{
  struct pos next;

  if (pos_next (bm, p, &next))
    return ent_start (ent_at (bm, next));
  return bm->nblocks;
}

/* The run containing BLOCK (BLOCK < nblocks, or 0 for an empty export). */
static struct pos
find (const struct blockmap *bm, uint64_t block)
{
  struct pos p;
  size_t lo, hi;
  uint32_t klo, khi;
  const struct chunk *ch;

  /* Last chunk whose first run starts at or before BLOCK.  Chunk 0
   * starts at block 0, so there is one.
   */
  lo = 0;
  hi = bm->nchunks;
  while (hi - lo > 1) {
    size_t mid = lo + (hi - lo) / 2;

    if (ent_start (bm->chunks[mid]->e[0]) <= block)
      lo = mid;
    else
      hi = mid;
  }
  ch = bm->chunks[lo];

  klo = 0;
  khi = ch->n;
  while (khi - klo > 1) {
    uint32_t mid = klo + (khi - klo) / 2;

    if (ent_start (ch->e[mid]) <= block)
      klo = mid;
    else
      khi = mid;
  }

  p.c = lo;
  p.k = klo;
  return p;
}

/* Bytes covered by blocks [FIRST, END) (the last block may be partial). */
static inline uint64_t
blocks_to_bytes (const struct blockmap *bm, uint64_t first, uint64_t end)
{
  uint64_t b = end << bm->blkshift;

  if (b > bm->size)
    b = bm->size;
  return b - (first << bm->blkshift);
}

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

/*----------------------------------------------------------------------
 * Editing the sequence of runs.
 */

/* Make sure that one split can happen without allocating. */
static int
reserve (struct blockmap *bm)
{
  if (bm->spare == NULL) {
    bm->spare = malloc (sizeof (struct chunk));
    if (bm->spare == NULL)
      return -1;
  }
  if (bm->nchunks + 1 > bm->chunks_cap) {
    size_t cap = bm->chunks_cap * 2;
    struct chunk **chunks;

    chunks = realloc (bm->chunks, cap * sizeof *chunks);
    if (chunks == NULL)
      return -1;
    bm->chunks = chunks;
    bm->chunks_cap = cap;
  }
  return 0;
}

static void
release_chunk (struct blockmap *bm, struct chunk *ch)
{
  if (bm->spare == NULL)
    bm->spare = ch;
  else
    free (ch);
}

/* Remove chunk C from the chunk array (its memory is released). */
static void
remove_chunk (struct blockmap *bm, size_t c)
{
  release_chunk (bm, bm->chunks[c]);
  memmove (&bm->chunks[c], &bm->chunks[c + 1],
           (bm->nchunks - c - 1) * sizeof bm->chunks[0]);
  bm->nchunks--;
}

/* Merge chunk C + 1 into chunk C if both are small. */
static bool
maybe_merge (struct blockmap *bm, size_t c)
{
  struct chunk *a, *b;

  if (c + 1 >= bm->nchunks)
    return false;
  a = bm->chunks[c];
  b = bm->chunks[c + 1];
  if (a->n + b->n > MERGE_THRESHOLD)
    return false;
  memcpy (&a->e[a->n], b->e, b->n * sizeof b->e[0]);
  a->n += b->n;
  remove_chunk (bm, c + 1);
  return true;
}

/* Merge small chunks around chunk C. */
static void
rebalance (struct blockmap *bm, size_t c)
{
  if (c >= bm->nchunks)
    c = bm->nchunks - 1;
  while (c > 0 && maybe_merge (bm, c - 1))
    c--;
  while (maybe_merge (bm, c))
    ;
}

/* Delete COUNT entries starting at P (P may be one past the end of its
 * chunk).  The entries exist.
 */
static void
delete_entries (struct blockmap *bm, struct pos p, uint64_t count)
{
  size_t c = p.c;
  uint32_t k = p.k;
  size_t first_empty = SIZE_MAX, nempty = 0;

  while (count > 0) {
    struct chunk *ch = bm->chunks[c];
    uint32_t d;

    if (k == ch->n) {
      c++;
      k = 0;
      continue;
    }
    d = ch->n - k;
    if (d > count)
      d = count;
    memmove (&ch->e[k], &ch->e[k + d], (ch->n - k - d) * sizeof ch->e[0]);
    ch->n -= d;
    count -= d;
    if (ch->n == 0) {
      /* Empty chunks are consecutive. */
      if (first_empty == SIZE_MAX)
        first_empty = c;
      nempty++;
    }
  }

  if (nempty > 0) {
    size_t i;

    for (i = first_empty; i < first_empty + nempty; i++)
      release_chunk (bm, bm->chunks[i]);
    memmove (&bm->chunks[first_empty], &bm->chunks[first_empty + nempty],
             (bm->nchunks - first_empty - nempty) * sizeof bm->chunks[0]);
    bm->nchunks -= nempty;
    if (first_empty < c)
      c = first_empty;
  }

  rebalance (bm, c);
}

/* Insert the M (<= 3) entries NEW before position P (P may be one past
 * the end of its chunk).  reserve() must have succeeded.
 */
static void
insert_entries (struct blockmap *bm, struct pos p,
                const uint64_t *new, unsigned m)
{
  struct chunk *ch = bm->chunks[p.c];

  if (ch->n + m > CHUNK_CAP) {
    struct chunk *nc = bm->spare;
    uint32_t half = ch->n / 2;

    /* Appending at the end of a chunk (a map built in order): leave it
     * full and start a new one.
     */
    if (p.k == ch->n)
      half = ch->n;

    bm->spare = NULL;
    nc->n = ch->n - half;
    memcpy (nc->e, &ch->e[half], nc->n * sizeof nc->e[0]);
    ch->n = half;
    memmove (&bm->chunks[p.c + 2], &bm->chunks[p.c + 1],
             (bm->nchunks - p.c - 1) * sizeof bm->chunks[0]);
    bm->chunks[p.c + 1] = nc;
    bm->nchunks++;
    if (p.k > half || (p.k == half && half + m > CHUNK_CAP)) {
      p.c++;
      p.k -= half;
      ch = nc;
    }
  }

  memmove (&ch->e[p.k + m], &ch->e[p.k], (ch->n - p.k) * sizeof ch->e[0]);
  memcpy (&ch->e[p.k], new, m * sizeof new[0]);
  ch->n += m;
}

/* Replace NDEL entries starting at P by the NNEW (<= 3) entries NEW.
 * reserve() must have succeeded.
 */
static void
splice (struct blockmap *bm, struct pos p, uint64_t ndel,
        const uint64_t *new, unsigned nnew)
{
  unsigned i, w = ndel < nnew ? (unsigned) ndel : nnew;

  for (i = 0; i < w; i++) {
    if (p.k == bm->chunks[p.c]->n) {
      p.c++;
      p.k = 0;
    }
    bm->chunks[p.c]->e[p.k++] = new[i];
  }
  if (ndel > w)
    delete_entries (bm, p, ndel - w);
  else if (nnew > w)
    insert_entries (bm, p, new + w, nnew - w);
  bm->nruns = bm->nruns + nnew - ndel;
}

/* Number of entries from A to B inclusive (A <= B). */
static uint64_t
distance (const struct blockmap *bm, struct pos a, struct pos b)
{
  uint64_t d;
  size_t c;

  if (a.c == b.c)
    return b.k - a.k + 1;
  d = bm->chunks[a.c]->n - a.k;
  for (c = a.c + 1; c < b.c; c++)
    d += bm->chunks[c]->n;
  return d + b.k + 1;
}

/* Forget everything.  Needs no memory, so it cannot fail. */
static void
reset_unknown (struct blockmap *bm)
{
  size_t c;

  for (c = 1; c < bm->nchunks; c++)
    release_chunk (bm, bm->chunks[c]);
  bm->nchunks = 1;
  bm->chunks[0]->n = 1;
  bm->chunks[0]->e[0] = mkent (0, BM_UNKNOWN);
  bm->nruns = 1;
}

/* Set blocks [A, B) (A < B <= nblocks) to state ST.  Returns -1 (and
 * changes nothing) if memory could not be allocated.
 */
static int
set_uniform (struct blockmap *bm, uint64_t a, uint64_t b, unsigned st)
{
  struct pos pi, pj, prev, next;
  uint64_t si, endj, ndel;
  unsigned sti, stj;
  int prev_state;
  bool has_next;
  uint64_t new[3];
  unsigned nn = 0;

  pi = find (bm, a);
  si = ent_start (ent_at (bm, pi));
  sti = ent_state (ent_at (bm, pi));
  has_next = pos_next (bm, pi, &next);
  endj = has_next ? ent_start (ent_at (bm, next)) : bm->nblocks;

  /* Nothing to do if [A, B) is inside a single run of state ST. */
  if (sti == st && b <= endj)
    return 0;

  if (reserve (bm) == -1)
    return -1;

  if (b <= endj)
    pj = pi;
  else {
    pj = find (bm, b - 1);
    has_next = pos_next (bm, pj, &next);
    endj = has_next ? ent_start (ent_at (bm, next)) : bm->nblocks;
  }
  stj = ent_state (ent_at (bm, pj));

  if (si < a) {
    new[nn++] = mkent (si, sti);
    prev_state = sti;
  }
  else if (pos_prev (bm, pi, &prev))
    prev_state = ent_state (ent_at (bm, prev));
  else
    prev_state = -1;
  if (prev_state != (int) st)
    new[nn++] = mkent (a, st);

  ndel = distance (bm, pi, pj);
  if (b < endj) {
    if (stj != st)
      new[nn++] = mkent (b, stj);
  }
  else if (has_next && ent_state (ent_at (bm, next)) == st)
    ndel++;                     /* the next run merges into ours */

  splice (bm, pi, ndel, new, nn);
  return 0;
}

/* Apply the state mapping TABLE to blocks [A, B).  Returns -1 if an edit
 * failed for want of memory (the edits before it stay).
 */
static int
transform (struct blockmap *bm, uint64_t a, uint64_t b, const unsigned *table)
{
  struct pos p = find (bm, a);
  uint64_t cur = a;

  while (cur < b) {
    uint64_t e = run_end (bm, p);
    unsigned st = ent_state (ent_at (bm, p));
    unsigned ns = table[st & BM_STATE_MASK];

    if (e > b)
      e = b;
    if (ns != st) {
      if (set_uniform (bm, cur, e, ns) == -1)
        return -1;
      cur = e;
      if (cur < b)
        p = find (bm, cur);
    }
    else {
      cur = e;
      if (cur < b && !pos_next (bm, p, &p))
        break;
    }
  }
  return 0;
}

/* Bytes of blocks [A, B) that are not in state ST. */
static uint64_t
bytes_not_in (const struct blockmap *bm, uint64_t a, uint64_t b, unsigned st)
{
  struct pos p = find (bm, a);
  uint64_t cur = a, total = 0;

  while (cur < b) {
    uint64_t e = run_end (bm, p);

    if (e > b)
      e = b;
    if (ent_state (ent_at (bm, p)) != st)
      total += blocks_to_bytes (bm, cur, e);
    cur = e;
    if (cur < b && !pos_next (bm, p, &p))
      break;
  }
  return total;
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
    uint64_t a, b;

    if (bm->evict_cursor >= bm->nblocks)
      bm->evict_cursor = 0;
    p = find (bm, bm->evict_cursor);
    if (p.c + 1 >= bm->nchunks)
      p.c--;                    /* the last two chunks */
    a = p.c == 0 ? 0 : ent_start (bm->chunks[p.c]->e[0]);
    b = p.c + 2 < bm->nchunks ?
      ent_start (bm->chunks[p.c + 2]->e[0]) : bm->nblocks;
    bm->forgotten += bytes_not_in (bm, a, b, BM_UNKNOWN);
    if (set_uniform (bm, a, b, BM_UNKNOWN) == -1) {
      bm->forgotten += bytes_not_in (bm, 0, bm->nblocks, BM_UNKNOWN);
      reset_unknown (bm);
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
  if (set_uniform (bm, a, b, st) == -1)
    reset_unknown (bm);
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
  bm->forgotten += bytes_not_in (bm, 0, bm->nblocks, BM_UNKNOWN);
  reset_unknown (bm);
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
  p = find (bm, offset >> bm->blkshift);
  st = ent_state (ent_at (bm, p));
  end = blocks_to_bytes (bm, 0, run_end (bm, p));
  pthread_mutex_unlock (&bm->lock);

  *run = MIN (end - offset, limit);
  return st & BM_STATE_MASK;
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
    p = find (bm, r.first);
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
  if (transform (bm, r.first, r.end, table) == -1 && lossless)
    reset_unknown (bm);
  enforce_budget (bm);
}

void
blockmap_learn_allocated (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  static const unsigned table[4] = {
    [BM_UNKNOWN] = BM_ALLOCATED, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO,
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
  static const unsigned table[4] = {
    [BM_UNKNOWN] = BM_UNKNOWN, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_DATA,
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
  if (a < b && transform (bm, a, b, table) == -1)
    reset_unknown (bm);
  enforce_budget (bm);
 out:
  pthread_mutex_unlock (&bm->lock);
}

void
blockmap_learn_data (struct blockmap *bm, uint64_t snap,
                     uint64_t offset, uint64_t count)
{
  static const unsigned weak_to_data[4] = {
    [BM_UNKNOWN] = BM_DATA, [BM_ALLOCATED] = BM_DATA,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO,
  };
  struct range r;
  bool some_zero = false;

  pthread_mutex_lock (&bm->lock);
  if (round_outward (bm, offset, count, &r)) {
    transform_bytes (bm, offset, count, weak_to_data, false);
    some_zero = bytes_not_in (bm, r.first, r.end, BM_ZERO) !=
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
  static const unsigned weak_to_zero[4] = {
    [BM_UNKNOWN] = BM_ZERO, [BM_ALLOCATED] = BM_ZERO,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO,
  };
  struct learn_zero *l = opaque;
  struct blockmap *bm = l->bm;
  struct range r;
  uint64_t before;

  if (!round_inward (bm, offset, count, &r))
    return;
  pthread_mutex_lock (&bm->lock);
  before = bytes_not_in (bm, r.first, r.end, BM_ZERO);
  if (before > 0) {
    if (l->contents) {
      if (set_uniform (bm, r.first, r.end, BM_ZERO) == 0)
        l->learnt += before;
    }
    else if (transform (bm, r.first, r.end, weak_to_zero) == 0)
      l->learnt += before - bytes_not_in (bm, r.first, r.end, BM_ZERO);
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
    bytes_not_in (bm, r.first, r.end, BM_ZERO) == 0;
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
  static const unsigned zero_to_unknown[4] = {
    [BM_UNKNOWN] = BM_UNKNOWN, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_UNKNOWN,
  };
  struct range out, in;
  unsigned st = newstate & BM_STATE_MASK;
  bool has_in;

  /* Only blockmap_learn_zero makes blocks ZERO. */
  if (st == BM_ZERO)
    st = BM_UNKNOWN;
  pthread_mutex_lock (&bm->lock);
  if (!round_outward (bm, offset, count, &out))
    goto out;
  if (st != BM_UNKNOWN) {
    set_or_reset (bm, out.first, out.end, st);
    goto out;
  }
  /* Blocks only partly covered keep the data of the rest of the block:
   * they only lose ZERO.
   */
  has_in = round_inward (bm, offset, count, &in);
  if (!has_in)
    in.first = in.end = out.end;
  if (out.first < in.first &&
      transform (bm, out.first, in.first, zero_to_unknown) == -1)
    reset_unknown (bm);
  if (in.end < out.end &&
      transform (bm, MAX (in.end, out.first), out.end, zero_to_unknown) == -1)
    reset_unknown (bm);
  if (has_in)
    set_or_reset (bm, in.first, in.end, BM_UNKNOWN);
  else
    enforce_budget (bm);
 out:
  pthread_mutex_unlock (&bm->lock);
}

void
blockmap_forget (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  struct range r;

  pthread_mutex_lock (&bm->lock);
  if (round_outward (bm, offset, count, &r))
    set_or_reset (bm, r.first, r.end, BM_UNKNOWN);
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

      stats->bytes[ent_state (ch->e[k]) & BM_STATE_MASK] +=
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

      if (st > BM_STATE_MASK)
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
