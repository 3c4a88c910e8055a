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
 * Memory is bounded by a budget given at creation: stored as runs of
 * equal state, a 1 TiB disk with 100 000 extents costs about 1 MiB; a
 * map that would grow past its budget forgets the knowledge of whole
 * chunks of runs until it is back under 3/4 of it: they become UNKNOWN,
 * or TRIMMED where they held DATA or TRIMMED blocks (what the map saw
 * hold data is never learnt zero from extents, even once forgotten).
 *
 * Zero knowledge follows the rules of doc/design.md ("The map
 * protocol"), with the disk's change tracker (changes.h):
 *  - a change (write, zero request, trim) calls changes_begin and then
 *    blockmap_change, which takes every block it touches (rounded
 *    outward) out of BM_ZERO, before it is issued;
 *  - zero knowledge is only ever added through blockmap_learn_zero,
 *    rounded inward, and only on the parts that the tracker reports
 *    unchanged since the learner's snapshot (changes_snapshot);
 *  - on error, blockmap_forget makes the blocks BM_TRIMMED (undefined).
 *
 * The plugin's extents are believed only where the filter has not seen
 * the blocks hold data or become undefined: a layer below that caches
 * (nbdkit's cache filter) may report zero over data it still holds, for
 * example after a trim it does not implement itself.  BM_DATA and
 * BM_TRIMMED blocks become ZERO only from their contents (a read of
 * zeros, a zero request that succeeded), never from extents.
 *
 * Changed-block tracking does not live here: it hangs off the change
 * tracker, at its own granularity.
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
  BM_TRIMMED   = 4,   /* contents undefined since a trim, a failed change
                       * or a change the map could not follow: nothing
                       * known, and zero only from contents (a read of
                       * zeros, a successful zero request), never from
                       * the plugin's extents */
};
#define BM_NSTATES 5

struct blockmap;
struct changes;

/* Create a map for an export of SIZE bytes with blocks of BLKSIZE bytes
 * (a power of 2, 512 .. 64 MiB), whose learners ask CHANGES (not owned,
 * must outlive the map) about concurrent changes, using at most BUDGET
 * bytes of memory (at least 64 KiB).  The last block may be partial.
 * Every block starts BM_UNKNOWN.  Returns NULL and sets errno on failure.
 */
extern struct blockmap *blockmap_new (uint64_t size, uint32_t blksize,
                                      struct changes *changes,
                                      uint64_t budget);
extern void blockmap_free (struct blockmap *bm);

extern uint32_t blockmap_blksize (const struct blockmap *bm);
extern uint64_t blockmap_size (struct blockmap *bm);

/* The disk changed size: forget everything, the map now covers SIZE
 * bytes.  Bracket it with changes_begin/end over the whole disk so that
 * no learner from before can teach the new map.
 */
extern int blockmap_resize (struct blockmap *bm, uint64_t size);

/* The state of the block containing OFFSET, and in *RUN the number of bytes
 * from OFFSET (up to at most LIMIT bytes, and never past the end) that
 * share that state.  *RUN > 0 whenever OFFSET < size and LIMIT > 0; past
 * the end *RUN is 0 and the state BM_UNKNOWN.
 */
extern enum bm_state blockmap_lookup (struct blockmap *bm, uint64_t offset,
                                      uint64_t limit, uint64_t *run);

/* True if every block touched by [OFFSET, OFFSET+COUNT) is BM_ZERO.
 * COUNT == 0 is true (nothing to zero) as long as OFFSET <= size; a range
 * reaching past the end of the export is false.
 */
extern bool blockmap_is_zero (struct blockmap *bm,
                              uint64_t offset, uint64_t count);

/* What the plugin's extents call data: UNKNOWN blocks touched (rounded
 * outward) become BM_ALLOCATED; others (TRIMMED included) are left alone.
 */
extern void blockmap_learn_allocated (struct blockmap *bm,
                                      uint64_t offset, uint64_t count);

/* Contents seen non-zero by a read issued after SNAP: the blocks touched
 * (rounded outward; UNKNOWN, ALLOCATED and TRIMMED ones) become BM_DATA,
 * except that a BM_ZERO block stays
 * ZERO where a change since SNAP touched it (that knowledge is newer than
 * the read), or where the tracker cannot tell (its history overflowed).
 * Keeping ZERO then is still right: a block is ZERO only if it was
 * learnt zero after the last change that began on it.
 */
extern void blockmap_learn_data (struct blockmap *bm, uint64_t snap,
                                 uint64_t offset, uint64_t count);

/* The blocks fully inside [OFFSET, OFFSET+COUNT) (rounded inward; a
 * partial last block of the export counts as full when the range reaches
 * the end) read as zero according to a request issued after SNAP: they
 * become BM_ZERO where no change other than EXCEPT (the caller's own zero
 * request, or 0) touched them since SNAP.  CONTENTS is true when the
 * request saw the contents (a read) or made them (a successful zero
 * request): then BM_DATA and BM_TRIMMED become ZERO too.  From the
 * plugin's extents (CONTENTS false) only UNKNOWN and ALLOCATED blocks
 * become ZERO; DATA and TRIMMED ones stay: a layer below that caches
 * writes may report zero over data it holds (after a trim it passed down
 * without dropping its own copy, after a failure, ...), and believing
 * data is always safe.  Returns the number of bytes newly marked.
 */
extern uint64_t blockmap_learn_zero (struct blockmap *bm, uint64_t snap,
                                     uint64_t except,
                                     uint64_t offset, uint64_t count,
                                     bool contents);

/* A change is about to be issued (after changes_begin).  NEWSTATE is
 *  - BM_UNKNOWN (or BM_ZERO) for a zero request: every block touched
 *    (rounded outward) loses ZERO (becomes UNKNOWN); the others keep
 *    their state until the request has succeeded (blockmap_learn_zero)
 *    or failed (blockmap_forget).  DATA stays DATA meanwhile: a fast
 *    zero refused with ENOTSUP changed nothing, and a layer below that
 *    caches writes may still hold the data;
 *  - BM_TRIMMED for a trim, or a change whose result the map cannot
 *    know (a write through another export name): every block touched
 *    becomes TRIMMED;
 *  - any other state (BM_DATA for a write): every block touched
 *    becomes that state.
 */
extern void blockmap_change (struct blockmap *bm,
                             uint64_t offset, uint64_t count,
                             enum bm_state newstate);

/* A change failed: its contents are undefined.  The range (rounded
 * outward) becomes BM_TRIMMED, unconditionally: never ZERO, and not
 * learnt ZERO from the plugin's extents either (a layer below may hold
 * part of what failed).
 */
extern void blockmap_forget (struct blockmap *bm,
                             uint64_t offset, uint64_t count);

/* Statistics. */
struct blockmap_stats {
  uint64_t runs;              /* number of runs stored */
  uint64_t memory;            /* bytes allocated for the map */
  uint64_t budget;            /* the most it may use */
  uint64_t forgotten;         /* bytes whose state was forgotten for it */
  uint64_t bytes[BM_NSTATES]; /* bytes in each enum bm_state */
};
extern void blockmap_get_stats (struct blockmap *bm,
                                struct blockmap_stats *stats);

/* For tests and fuzzers: check the internal invariants of the map (runs
 * sorted and merged, chunks well formed, counters consistent).  Returns 0
 * if the map is consistent, -1 (errno EIO) if not.
 */
extern int blockmap_check (struct blockmap *bm);

#endif /* SPARSEBACKUP_BLOCKMAP_H */
