/* sparsebackup: the granule states of a frozen disk (copy before write).
 *
 * A point-in-time ("frozen") view of a disk that goes on being written
 * keeps, per granule (2^GBITS bytes), one of:
 *
 *   UNSAVED  not changed since the freeze: the disk still holds it;
 *   BUSY     a change is saving its old data (claimed by cowmap_claim);
 *   SAVED    its old data is stored elsewhere (the caller's scratch);
 *   ZERO     its old data read as zero (nothing stored).
 *
 * Protocol (the caller's, see filters/sparsebackup/frozen.c):
 *   A change first calls cowmap_claim over its range until it returns 0;
 *   for each run claimed it reads the old data, stores it (marking the
 *   granules that read as zero with cowmap_set_zero) and calls
 *   cowmap_done.  Only then is the change issued.  So an UNSAVED granule
 *   has not changed since the freeze.
 *   A frozen read asks cowmap_run for the state of the run at its
 *   position (waiting while it is BUSY), reads it (SAVED: the scratch,
 *   ZERO: zeros, UNSAVED: the disk) and, for UNSAVED, calls cowmap_check
 *   after the read: only the part before the position it returns was
 *   read right (after it, a change began meanwhile: read it again).
 *   States only move forward, except BUSY back to UNSAVED when saving
 *   failed and the change is not issued (cowmap_done with DONE < B).
 *
 * A map can be broken (cowmap_break, once, with a reason): from then on
 * cowmap_claim saves nothing more (it returns 0), cowmap_check returns
 * its POS (nothing read from the disk is trusted) and cowmap_broken says
 * why.  It also hands out the slots of the caller's compact scratch
 * and counts the bytes stored there (cowmap_store).
 *
 * Runs and checks walk whole 64-granule words at a time.
 *
 * Thread-safe (one internal lock).  Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_COWMAP_H
#define SPARSEBACKUP_COWMAP_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

enum cow_state {
  COW_UNSAVED = 0,
  COW_SAVED,
  COW_ZERO,
};

#define COWMAP_REASON_MAX 256

struct cowmap;

/* A map of a disk of SIZE bytes (> 0) in granules of 2^GBITS bytes,
 * every granule UNSAVED.  NULL with errno (EINVAL, ENOMEM) on failure.
 * Memory: 3 bits per granule, and 4 bytes per granule of each region
 * of 4096 granules in which anything was stored.  At most 2^32 - 1
 * granules.
 */
extern struct cowmap *cowmap_new (uint64_t size, unsigned gbits);
extern void cowmap_free (struct cowmap *m);
extern uint64_t cowmap_granules (const struct cowmap *m);

/* Writers.  Claim (mark BUSY) the next run of UNSAVED granules in
 * [*CURSOR, END) (granule numbers, END clipped to the map), at most
 * MAX_RUN long, skipping saved ones and waiting for BUSY ones: returns 1
 * with the run in [*A, *B) and *CURSOR = *B, or 0 when none is left (or
 * the map is broken).
 */
extern int cowmap_claim (struct cowmap *m, uint64_t *cursor, uint64_t end,
                         uint64_t max_run, uint64_t *a, uint64_t *b);
/* Granule G (claimed) read as zero: ZERO rather than SAVED when done. */
extern void cowmap_set_zero (struct cowmap *m, uint64_t g);
/* The claimed run [A, B) is saved up to DONE: [A, DONE) become SAVED (or
 * ZERO), [DONE, B) UNSAVED again.  Wakes the waiters.
 */
extern void cowmap_done (struct cowmap *m, uint64_t a, uint64_t done,
                         uint64_t b);

/* Compact storage: the claimed granules [A, B), whose old data is not
 * zero, are about to be stored (N bytes, the run clipped to the disk).
 * Counts N against LIMIT and gives them consecutive slots, the first
 * in *SLOT: the caller stores granule G at slot *SLOT + (G - A) of its
 * scratch, which so holds only what was stored, in the order it was.
 * -1 with errno: ENOSPC (LIMIT would be exceeded; nothing counted),
 * ENOMEM.  cowmap_unstore takes back the N bytes of a store that
 * failed (its slots stay unused).  cowmap_used: the bytes stored.
 */
extern int cowmap_store (struct cowmap *m, uint64_t a, uint64_t b,
                         uint64_t n, uint64_t limit, uint64_t *slot);
extern void cowmap_unstore (struct cowmap *m, uint64_t n);
extern uint64_t cowmap_used (struct cowmap *m);
/* The slot of granule G (UINT64_MAX if it was never stored), and the
 * number of slots handed out.
 */
extern uint64_t cowmap_slot (struct cowmap *m, uint64_t g);
extern uint64_t cowmap_slots (struct cowmap *m);

/* Readers (byte positions).  The state of the granule at POS, after
 * waiting while it is BUSY, and in *REND where its run of that state
 * ends (at most END; a BUSY granule also ends it).
 */
extern enum cow_state cowmap_run (struct cowmap *m, uint64_t pos,
                                  uint64_t end, uint64_t *rend);
/* After reading the disk over [POS, END) of UNSAVED granules: where the
 * part that is still UNSAVED ends (POS if the map is broken).
 */
extern uint64_t cowmap_check (struct cowmap *m, uint64_t pos, uint64_t end);

/* Break the map with REASON (the first reason is kept): true if this
 * call broke it.  cowmap_broken copies the reason into BUF (LEN bytes)
 * and returns true if broken.
 */
extern bool cowmap_break (struct cowmap *m, const char *reason);
extern bool cowmap_broken (struct cowmap *m, char *buf, size_t len);

#endif /* SPARSEBACKUP_COWMAP_H */
