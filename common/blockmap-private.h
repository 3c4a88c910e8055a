/* sparsebackup: the block map's private header, shared by blockmap.c
 * (the public functions and the memory budget) and blockmap-runs.c (the
 * sequence of runs and its editing).  Not installed, not for the filter.
 *
 * Holds the representation (struct blockmap, chunks, entries, positions),
 * the inline helpers on entries and positions, and the run functions
 * blockmap.c calls.  All of them need the map's lock held.
 *
 * The calls go one way: blockmap.c -> blockmap-runs.c.  blockmap-runs.c
 * calls nothing in blockmap.c and does not include blockmap.h.
 */

#ifndef SPARSEBACKUP_BLOCKMAP_PRIVATE_H
#define SPARSEBACKUP_BLOCKMAP_PRIVATE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

struct changes;

/* Entries per chunk.  256 * 8 bytes = 2 KiB per chunk. */
#define CHUNK_CAP 256
/* Two neighbouring chunks holding this many entries or fewer together are
 * merged into one.
 */
#define MERGE_THRESHOLD (CHUNK_CAP / 2)

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


/* Bytes covered by blocks [FIRST, END) (the last block may be partial). */
static inline uint64_t
blocks_to_bytes (const struct blockmap *bm, uint64_t first, uint64_t end)
{
  uint64_t b = end << bm->blkshift;

  if (b > bm->size)
    b = bm->size;
  return b - (first << bm->blkshift);
}


/* In blockmap-runs.c. */

/* The run containing BLOCK (BLOCK < nblocks, or 0 for an empty export). */
extern struct pos bm_find (const struct blockmap *bm, uint64_t block);

/* Forget everything: the whole map becomes one run of state ST.  Needs
 * no memory, so it cannot fail.
 */
extern void bm_reset (struct blockmap *bm, unsigned st);

/* Set blocks [A, B) (A < B <= nblocks) to state ST.  Returns -1 (and
 * changes nothing) if memory could not be allocated.
 */
extern int bm_set_uniform (struct blockmap *bm, uint64_t a, uint64_t b,
                           unsigned st);

/* Apply the state mapping TABLE to blocks [A, B).  Returns -1 if an edit
 * failed for want of memory (the edits before it stay).
 */
extern int bm_transform (struct blockmap *bm, uint64_t a, uint64_t b,
                         const unsigned *table);

/* Bytes of blocks [A, B) that are not in state ST. */
extern uint64_t bm_bytes_not_in (const struct blockmap *bm, uint64_t a,
                                 uint64_t b, unsigned st);

#endif /* SPARSEBACKUP_BLOCKMAP_PRIVATE_H */
