/* sparsebackup: the block map.
 *
 * A map of what is known about every block of an export: unknown, allocated
 * according to the plugin (contents not verified), data (verified to hold
 * non-zero bytes, or written), or zero (known to read as zero).  It is
 * shared by all connections and safe to use from many threads at once.
 *
 * Memory grows with what is known, not with the virtual size: the map is
 * stored as runs of equal state, so a 1 TiB disk with 100 000 extents costs
 * a few MiB.
 *
 * Zero knowledge follows the mirror rules of
 * shared/notes/nbd-sparseness-rules.md:
 *  - before a write or trim is issued, blockmap_write_begin() clears the
 *    zero state of every block it touches (rounded outward);
 *  - zero knowledge is only ever added through blockmap_learn_zero(),
 *    rounded inward, and only if no write touching those blocks was in
 *    flight or finished after the learner's snapshot (blockmap_snapshot());
 *  - on error, blockmap_write_end(..., false) makes the blocks unknown.
 *
 * The state is kept in a small integer so that a persistent "dirty" bit for
 * changed-block tracking can join it later (BM_FLAG_* bits above the state).
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_BLOCKMAP_H
#define SPARSEBACKUP_BLOCKMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum bm_state {
  BM_UNKNOWN   = 0,   /* nothing known: ask the plugin */
  BM_ALLOCATED = 1,   /* plugin reports data; contents not verified */
  BM_DATA      = 2,   /* verified to hold data, or written through us */
  BM_ZERO      = 3,   /* known to read as zero */
};
#define BM_STATE_MASK 3u
/* Reserved for changed-block tracking: bits above BM_STATE_MASK. */

struct blockmap;

/* Create a map for an export of SIZE bytes with blocks of BLKSIZE bytes
 * (a power of 2, 512 .. 64 MiB).  The last block may be partial.  Every
 * block starts BM_UNKNOWN.  Returns NULL and sets errno on failure.
 */
extern struct blockmap *blockmap_new (uint64_t size, uint32_t blksize);
extern void blockmap_free (struct blockmap *bm);

extern uint32_t blockmap_blksize (const struct blockmap *bm);
extern uint64_t blockmap_size (const struct blockmap *bm);

/* The state of the block containing OFFSET, and in *RUN the number of bytes
 * from OFFSET (up to at most LIMIT bytes, and never past the end) that
 * share that state.  *RUN > 0 whenever OFFSET < size and LIMIT > 0.
 */
extern enum bm_state blockmap_lookup (struct blockmap *bm, uint64_t offset,
                                      uint64_t limit, uint64_t *run);

/* True if every block touched by [OFFSET, OFFSET+COUNT) is BM_ZERO.
 * COUNT == 0 is true (nothing to zero) as long as OFFSET <= size; a range
 * reaching past the end of the export is false.
 */
extern bool blockmap_is_zero (struct blockmap *bm,
                              uint64_t offset, uint64_t count);

/* Set blocks to BM_ALLOCATED or BM_DATA (never BM_ZERO: use
 * blockmap_learn_zero), rounded outward.  Only blocks whose state is
 * "weaker" change: UNKNOWN -> ALLOCATED/DATA, ALLOCATED -> DATA; a block
 * already ZERO or DATA is left alone by blockmap_learn_allocated, while
 * blockmap_learn_data (contents seen non-zero, with SNAP from
 * blockmap_snapshot taken before the read) replaces ZERO only if no write
 * intervened, i.e. except on blocks whose zero knowledge was added (by
 * blockmap_learn_zero) after SNAP, which is newer than the read.  If the
 * map can no longer tell (it remembers a bounded number of events), ZERO
 * is replaced: DATA is always safe to believe.  Use these for
 * information from the plugin or from reads.
 */
extern void blockmap_learn_allocated (struct blockmap *bm,
                                      uint64_t offset, uint64_t count);
extern void blockmap_learn_data (struct blockmap *bm, uint64_t snap,
                                 uint64_t offset, uint64_t count);

/* A snapshot of the map's write generation.  Take it BEFORE issuing the
 * request (zero request, read, extents) whose result will teach the map.
 *
 * A zero request is not a "write" for this map: do not wrap it in
 * blockmap_write_begin/end (its own ticket would then block it from
 * learning).  Take a snapshot, issue it, then on success call
 * blockmap_learn_zero (snap, ...), on failure blockmap_forget (...).
 */
extern uint64_t blockmap_snapshot (struct blockmap *bm);

/* Mark the blocks fully inside [OFFSET, OFFSET+COUNT) (rounded inward; a
 * partial last block of the export counts as full when the range reaches
 * the end) as BM_ZERO, unless a write touching them was in flight or ended
 * after SNAP.  Returns the number of bytes newly marked (for statistics).
 * Blocks not touched by such writes are still learnt.  The map remembers
 * the last 4096 completed writes: a SNAP older than that learns nothing.
 */
extern uint64_t blockmap_learn_zero (struct blockmap *bm, uint64_t snap,
                                     uint64_t offset, uint64_t count);

/* Writes and trims.  Call blockmap_write_begin before issuing the request:
 * every block touched (rounded outward) leaves BM_ZERO and becomes NEWSTATE
 * (BM_DATA for a write, BM_UNKNOWN for a trim or anything whose result is
 * undefined).  Then call blockmap_write_end with the ticket, and OK = false
 * if the request failed, which makes the blocks BM_UNKNOWN.  NEWSTATE
 * BM_ZERO is treated as BM_UNKNOWN.  Every ticket must be ended exactly
 * once (an unknown ticket is ignored); while a write is in flight no
 * block it touches can become BM_ZERO.
 */
extern uint64_t blockmap_write_begin (struct blockmap *bm,
                                      uint64_t offset, uint64_t count,
                                      enum bm_state newstate);
extern void blockmap_write_end (struct blockmap *bm, uint64_t ticket,
                                bool ok);

/* Set a range unconditionally to BM_UNKNOWN (rounded outward). */
extern void blockmap_forget (struct blockmap *bm,
                             uint64_t offset, uint64_t count);

/* Statistics. */
struct blockmap_stats {
  uint64_t runs;              /* number of runs stored */
  uint64_t memory;            /* bytes allocated for the map */
  uint64_t bytes[4];          /* bytes in each enum bm_state */
};
extern void blockmap_get_stats (struct blockmap *bm,
                                struct blockmap_stats *stats);

/* For tests and fuzzers: check the internal invariants of the map (runs
 * sorted and merged, chunks well formed, counters consistent).  Returns 0
 * if the map is consistent, -1 (errno EIO) if not.
 */
extern int blockmap_check (struct blockmap *bm);

#endif /* SPARSEBACKUP_BLOCKMAP_H */
