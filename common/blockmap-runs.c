/* sparsebackup: the block map's sequence of runs (see blockmap.c for
 * the public functions and the memory budget, blockmap-private.h for
 * the types).  Finding a block's run, and every edit: chunks split and
 * merged, entries spliced, a range set to one state, a state mapping
 * applied to a range.
 *
 * Pure C: no nbdkit headers.  Called by blockmap.c; calls nothing in it
 * (only the inline helpers of blockmap-private.h).
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
 * resets the whole map to TRIMMED ("nothing known, and never zero from
 * extents"), which needs no memory and is always safe.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "blockmap-private.h"

/*----------------------------------------------------------------------
 * Finding a block's run.
 */

/* The run containing BLOCK (BLOCK < nblocks, or 0 for an empty export). */
struct pos
bm_find (const struct blockmap *bm, uint64_t block)
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

/* Forget everything: one run of state ST.  Needs no memory, so it
 * cannot fail.
 */
void
bm_reset (struct blockmap *bm, unsigned st)
{
  size_t c;

  for (c = 1; c < bm->nchunks; c++)
    release_chunk (bm, bm->chunks[c]);
  bm->nchunks = 1;
  bm->chunks[0]->n = 1;
  bm->chunks[0]->e[0] = mkent (0, st);
  bm->nruns = 1;
}

/* Set blocks [A, B) (A < B <= nblocks) to state ST.  Returns -1 (and
 * changes nothing) if memory could not be allocated.
 */
int
bm_set_uniform (struct blockmap *bm, uint64_t a, uint64_t b, unsigned st)
{
  struct pos pi, pj, prev, next;
  uint64_t si, endj, ndel;
  unsigned sti, stj;
  int prev_state;
  bool has_next;
  uint64_t new[3];
  unsigned nn = 0;

  pi = bm_find (bm, a);
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
    pj = bm_find (bm, b - 1);
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
int
bm_transform (struct blockmap *bm, uint64_t a, uint64_t b,
              const unsigned *table)
{
  struct pos p = bm_find (bm, a);
  uint64_t cur = a;

  while (cur < b) {
    uint64_t e = run_end (bm, p);
    unsigned st = ent_state (ent_at (bm, p));
    unsigned ns = table[st];

    if (e > b)
      e = b;
    if (ns != st) {
      if (bm_set_uniform (bm, cur, e, ns) == -1)
        return -1;
      cur = e;
      if (cur < b)
        p = bm_find (bm, cur);
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
uint64_t
bm_bytes_not_in (const struct blockmap *bm, uint64_t a, uint64_t b, unsigned st)
{
  struct pos p = bm_find (bm, a);
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
