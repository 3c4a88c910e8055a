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
 * Zero knowledge and concurrent writes
 * ------------------------------------
 * GEN is a generation counter, returned by blockmap_snapshot.  It is
 * incremented whenever a write ends (blockmap_write_end) and whenever
 * zero knowledge is added (blockmap_learn_zero).  Writes that have begun
 * but not ended are kept in the INFLIGHT array.  Writes that ended, and
 * zero knowledge that was added, are recorded as events (generation +
 * block range) in two bounded rings, one for each kind, so that frequent
 * zero learning never pushes out the record of writes.  When a ring
 * overwrites an event, its generation is remembered in the ring's
 * LOST_GEN so that a question about "after SNAP" that the ring can no
 * longer answer is answered conservatively:
 *
 *  - blockmap_learn_zero (SNAP) refuses blocks touched by any write in
 *    flight or any write event newer than SNAP, and refuses everything if
 *    a write event newer than SNAP has been lost.
 *  - blockmap_learn_data (SNAP) turns ZERO into DATA except on blocks
 *    where zero knowledge was added after SNAP (that knowledge is newer
 *    than the caller's read).  If such events were lost it turns ZERO
 *    into DATA anyway: DATA is always a safe thing to believe.
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

#define MIN_BLKSIZE 512
#define MAX_BLKSIZE (64 * 1024 * 1024)
#define MAX_SIZE (UINT64_C (1) << 63)

/* Entries per chunk.  256 * 8 bytes = 2 KiB per chunk. */
#define CHUNK_CAP 256
/* Two neighbouring chunks holding this many entries or fewer together are
 * merged into one.
 */
#define MERGE_THRESHOLD (CHUNK_CAP / 2)

/* Completed writes and zero knowledge remembered for the race checks.
 * A learner whose snapshot is older than the last WRITE_RING_SIZE writes
 * is refused.
 */
#define WRITE_RING_SIZE 4096
#define ZERO_RING_SIZE 2048

/* Tickets of writes that could not be recorded (out of memory). */
#define TICKET_UNTRACKED (UINT64_C (1) << 63)

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

struct inflight {
  uint64_t ticket;
  struct range r;
};

struct event {
  uint64_t gen;
  struct range r;
};

/* Events in increasing generation order; the oldest are overwritten. */
struct ring {
  struct event *ev;
  size_t size;                  /* capacity */
  size_t next;                  /* slot of the next event */
  size_t len;                   /* events stored (<= size) */
  uint64_t lost_gen;            /* newest event overwritten */
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

  /* Race tracking. */
  uint64_t gen;
  uint64_t next_ticket;
  struct inflight *inflight;
  size_t ninflight, inflight_cap;
  uint64_t untracked;           /* writes in flight we could not record */
  struct ring writes;           /* writes that ended */
  struct ring zeroes;           /* zero knowledge added */
  struct event write_ev[WRITE_RING_SIZE];
  struct event zero_ev[ZERO_RING_SIZE];
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
 * Race tracking.
 */

static void
push_event (struct ring *ring, uint64_t gen, struct range r)
{
  struct event *ev = &ring->ev[ring->next];

  if (ring->len == ring->size)
    ring->lost_gen = ev->gen;   /* overwriting the oldest event */
  else
    ring->len++;
  ev->gen = gen;
  ev->r = r;
  ring->next = (ring->next + 1) % ring->size;
}

/* A growable list of ranges, with room for a few on the stack. */
struct rangelist {
  struct range *v;
  size_t n, cap;
  struct range local[16];
};

static void
rangelist_init (struct rangelist *l)
{
  l->v = l->local;
  l->n = 0;
  l->cap = sizeof l->local / sizeof l->local[0];
}

static void
rangelist_free (struct rangelist *l)
{
  if (l->v != l->local)
    free (l->v);
}

/* Add the part of X inside R, if any.  Returns -1 if out of memory. */
static int
rangelist_add_clipped (struct rangelist *l, struct range x, struct range r)
{
  if (x.end <= r.first || x.first >= r.end)
    return 0;
  if (x.first < r.first)
    x.first = r.first;
  if (x.end > r.end)
    x.end = r.end;
  if (l->n == l->cap) {
    size_t cap = l->cap * 2;
    struct range *v;

    if (l->v == l->local) {
      v = malloc (cap * sizeof *v);
      if (v != NULL)
        memcpy (v, l->local, l->n * sizeof *v);
    }
    else
      v = realloc (l->v, cap * sizeof *v);
    if (v == NULL)
      return -1;
    l->v = v;
    l->cap = cap;
  }
  l->v[l->n++] = x;
  return 0;
}

static int
compare_range (const void *av, const void *bv)
{
  const struct range *a = av, *b = bv;

  return a->first < b->first ? -1 : a->first > b->first;
}

/* Collect the ranges of events newer than SNAP overlapping R. */
static int
collect_events (const struct ring *ring, uint64_t snap, struct range r,
                struct rangelist *l)
{
  size_t i, slot = ring->next;

  /* Newest first; generations decrease going backwards. */
  for (i = 0; i < ring->len; i++) {
    const struct event *ev;

    slot = (slot + ring->size - 1) % ring->size;
    ev = &ring->ev[slot];
    if (ev->gen <= snap)
      break;
    if (rangelist_add_clipped (l, ev->r, r) == -1)
      return -1;
  }
  return 0;
}

/* Sort the list and turn it into the gaps it leaves in R. */
static int
complement (struct rangelist *l, struct range r, struct rangelist *gaps)
{
  uint64_t cur = r.first;
  size_t i;

  qsort (l->v, l->n, sizeof l->v[0], compare_range);
  for (i = 0; i < l->n && cur < r.end; i++) {
    if (l->v[i].first > cur) {
      struct range g = { cur, l->v[i].first };

      if (rangelist_add_clipped (gaps, g, r) == -1)
        return -1;
    }
    if (l->v[i].end > cur)
      cur = l->v[i].end;
  }
  if (cur < r.end) {
    struct range g = { cur, r.end };

    if (rangelist_add_clipped (gaps, g, r) == -1)
      return -1;
  }
  return 0;
}

/*----------------------------------------------------------------------
 * Public functions.
 */

struct blockmap *
blockmap_new (uint64_t size, uint32_t blksize)
{
  struct blockmap *bm;
  int err;

  if (blksize < MIN_BLKSIZE || blksize > MAX_BLKSIZE ||
      (blksize & (blksize - 1)) != 0 || size > MAX_SIZE) {
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
  bm->blkshift = __builtin_ctz (blksize);
  bm->nblocks = (size >> bm->blkshift) + ((size & (blksize - 1)) != 0);

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
  bm->next_ticket = 1;
  bm->writes.ev = bm->write_ev;
  bm->writes.size = WRITE_RING_SIZE;
  bm->zeroes.ev = bm->zero_ev;
  bm->zeroes.size = ZERO_RING_SIZE;
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
  free (bm->inflight);
  pthread_mutex_destroy (&bm->lock);
  free (bm);
}

uint32_t
blockmap_blksize (const struct blockmap *bm)
{
  return bm->blksize;
}

uint64_t
blockmap_size (const struct blockmap *bm)
{
  return bm->size;
}

enum bm_state
blockmap_lookup (struct blockmap *bm, uint64_t offset, uint64_t limit,
                 uint64_t *run)
{
  struct pos p;
  uint64_t end;
  unsigned st;

  if (offset >= bm->size || limit == 0) {
    *run = 0;
    return BM_UNKNOWN;
  }
  if (limit > bm->size - offset)
    limit = bm->size - offset;

  pthread_mutex_lock (&bm->lock);
  p = find (bm, offset >> bm->blkshift);
  st = ent_state (ent_at (bm, p));
  end = run_end (bm, p);
  pthread_mutex_unlock (&bm->lock);

  end = blocks_to_bytes (bm, 0, end);
  *run = end - offset < limit ? end - offset : limit;
  return st & BM_STATE_MASK;
}

bool
blockmap_is_zero (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  struct range r;
  struct pos p;
  bool ret;

  if (count == 0)
    return offset <= bm->size;
  /* Anything outside the export is not known to be zero. */
  if (offset >= bm->size || count > bm->size - offset)
    return false;
  round_outward (bm, offset, count, &r);

  pthread_mutex_lock (&bm->lock);
  p = find (bm, r.first);
  ret = ent_state (ent_at (bm, p)) == BM_ZERO && run_end (bm, p) >= r.end;
  pthread_mutex_unlock (&bm->lock);
  return ret;
}

void
blockmap_learn_allocated (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  static const unsigned table[4] = {
    [BM_UNKNOWN] = BM_ALLOCATED, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_ZERO,
  };
  struct range r;

  if (!round_outward (bm, offset, count, &r))
    return;
  pthread_mutex_lock (&bm->lock);
  /* Failure to allocate only loses information. */
  transform (bm, r.first, r.end, table);
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
  static const unsigned zero_to_data[4] = {
    [BM_UNKNOWN] = BM_UNKNOWN, [BM_ALLOCATED] = BM_ALLOCATED,
    [BM_DATA] = BM_DATA, [BM_ZERO] = BM_DATA,
  };
  struct range r;
  struct rangelist newer, gaps;
  size_t i;

  if (!round_outward (bm, offset, count, &r))
    return;

  rangelist_init (&newer);
  rangelist_init (&gaps);
  pthread_mutex_lock (&bm->lock);

  transform (bm, r.first, r.end, weak_to_data);

  /* Nothing more to do unless some block is ZERO. */
  if (bytes_not_in (bm, r.first, r.end, BM_ZERO) ==
      blocks_to_bytes (bm, r.first, r.end))
    goto out;

  /* ZERO -> DATA except where zero knowledge was added after SNAP.  If
   * we cannot tell (events lost, or out of memory), replace it anyway:
   * believing DATA is always safe, believing ZERO is not.
   */
  if (bm->zeroes.lost_gen > snap ||
      collect_events (&bm->zeroes, snap, r, &newer) == -1) {
    if (transform (bm, r.first, r.end, zero_to_data) == -1)
      goto forget;
  }
  else if (complement (&newer, r, &gaps) == -1) {
    if (transform (bm, r.first, r.end, zero_to_data) == -1)
      goto forget;
  }
  else {
    for (i = 0; i < gaps.n; i++)
      if (transform (bm, gaps.v[i].first, gaps.v[i].end, zero_to_data) == -1)
        goto forget;
  }
  goto out;

 forget:
  /* A block seen to hold data must not stay ZERO. */
  reset_unknown (bm);
 out:
  pthread_mutex_unlock (&bm->lock);
  rangelist_free (&newer);
  rangelist_free (&gaps);
}

uint64_t
blockmap_snapshot (struct blockmap *bm)
{
  uint64_t gen;

  pthread_mutex_lock (&bm->lock);
  gen = bm->gen;
  pthread_mutex_unlock (&bm->lock);
  return gen;
}

uint64_t
blockmap_learn_zero (struct blockmap *bm, uint64_t snap,
                     uint64_t offset, uint64_t count)
{
  struct range r;
  struct rangelist conflicts, gaps;
  uint64_t learnt = 0, gen = 0;
  size_t i;

  if (!round_inward (bm, offset, count, &r))
    return 0;

  rangelist_init (&conflicts);
  rangelist_init (&gaps);
  pthread_mutex_lock (&bm->lock);

  /* Refuse everything if we cannot tell which writes intervened. */
  if (bm->untracked > 0 || bm->writes.lost_gen > snap || snap > bm->gen)
    goto out;
  /* Nothing to learn if it is all known already. */
  if (bytes_not_in (bm, r.first, r.end, BM_ZERO) == 0)
    goto out;

  for (i = 0; i < bm->ninflight; i++)
    if (rangelist_add_clipped (&conflicts, bm->inflight[i].r, r) == -1)
      goto out;
  if (collect_events (&bm->writes, snap, r, &conflicts) == -1)
    goto out;
  if (complement (&conflicts, r, &gaps) == -1)
    goto out;

  for (i = 0; i < gaps.n; i++) {
    uint64_t n = bytes_not_in (bm, gaps.v[i].first, gaps.v[i].end, BM_ZERO);

    if (n == 0)
      continue;
    if (set_uniform (bm, gaps.v[i].first, gaps.v[i].end, BM_ZERO) == -1)
      continue;
    if (gen == 0)
      gen = ++bm->gen;
    push_event (&bm->zeroes, gen, gaps.v[i]);
    learnt += n;
  }

 out:
  pthread_mutex_unlock (&bm->lock);
  rangelist_free (&conflicts);
  rangelist_free (&gaps);
  return learnt;
}

uint64_t
blockmap_write_begin (struct blockmap *bm, uint64_t offset, uint64_t count,
                      enum bm_state newstate)
{
  struct range r;
  uint64_t ticket;
  unsigned st = newstate & BM_STATE_MASK;

  /* Only blockmap_learn_zero makes blocks ZERO. */
  if (st == BM_ZERO)
    st = BM_UNKNOWN;

  pthread_mutex_lock (&bm->lock);
  ticket = bm->next_ticket++;
  if (bm->next_ticket == TICKET_UNTRACKED)
    bm->next_ticket = 1;

  if (round_outward (bm, offset, count, &r)) {
    /* Record the write first, so that no learner can miss it. */
    if (bm->ninflight == bm->inflight_cap) {
      size_t cap = bm->inflight_cap ? bm->inflight_cap * 2 : 16;
      struct inflight *v = realloc (bm->inflight, cap * sizeof *v);

      if (v != NULL) {
        bm->inflight = v;
        bm->inflight_cap = cap;
      }
    }
    if (bm->ninflight < bm->inflight_cap) {
      bm->inflight[bm->ninflight].ticket = ticket;
      bm->inflight[bm->ninflight].r = r;
      bm->ninflight++;
    }
    else {
      /* Out of memory: learn_zero refuses everything until it ends. */
      bm->untracked++;
      ticket |= TICKET_UNTRACKED;
    }

    if (set_uniform (bm, r.first, r.end, st) == -1)
      reset_unknown (bm);
  }
  pthread_mutex_unlock (&bm->lock);
  return ticket;
}

void
blockmap_write_end (struct blockmap *bm, uint64_t ticket, bool ok)
{
  size_t i;

  pthread_mutex_lock (&bm->lock);
  if (ticket & TICKET_UNTRACKED) {
    if (bm->untracked > 0)
      bm->untracked--;
    /* The range is unknown: older snapshots may no longer learn. */
    bm->writes.lost_gen = ++bm->gen;
    if (!ok)
      reset_unknown (bm);
    goto out;
  }

  for (i = 0; i < bm->ninflight; i++)
    if (bm->inflight[i].ticket == ticket)
      break;
  if (i < bm->ninflight) {
    struct range r = bm->inflight[i].r;

    bm->inflight[i] = bm->inflight[bm->ninflight - 1];
    bm->ninflight--;
    push_event (&bm->writes, ++bm->gen, r);
    if (!ok && set_uniform (bm, r.first, r.end, BM_UNKNOWN) == -1)
      reset_unknown (bm);
  }
  /* else: an empty range, or a ticket ended twice: nothing to do. */
 out:
  pthread_mutex_unlock (&bm->lock);
}

void
blockmap_forget (struct blockmap *bm, uint64_t offset, uint64_t count)
{
  struct range r;

  if (!round_outward (bm, offset, count, &r))
    return;
  pthread_mutex_lock (&bm->lock);
  if (set_uniform (bm, r.first, r.end, BM_UNKNOWN) == -1)
    reset_unknown (bm);
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
  stats->memory = sizeof *bm
    + bm->chunks_cap * sizeof bm->chunks[0]
    + (bm->nchunks + (bm->spare != NULL)) * sizeof (struct chunk)
    + bm->inflight_cap * sizeof bm->inflight[0];
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
  size_t c, i;
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
  for (i = 0; i < bm->ninflight; i++)
    if (bm->inflight[i].r.first >= bm->inflight[i].r.end ||
        bm->inflight[i].r.end > bm->nblocks)
      goto out;
  ret = 0;
 out:
  pthread_mutex_unlock (&bm->lock);
  if (ret == -1)
    errno = EIO;
  return ret;
}
