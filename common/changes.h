/* sparsebackup: the change tracker.
 *
 * One tracker per disk records every change (write, zero request, trim)
 * that passes through the filter: the changes in flight, and a bounded
 * history of the changes that ended, each with a generation number.
 * Everything that learns about the disk from a request that may race
 * with a change (the block map learning zero or data from a read, from
 * the plugin's extents or from a zero request; the scan cache keeping
 * data it read) asks the tracker first, so that knowledge is never learnt
 * over a change the learner could have missed.  See doc/design.md,
 * "The change tracker".
 *
 * The protocol:
 *   1. A learner takes changes_snapshot() before it issues its request.
 *   2. A change calls changes_begin() before it is issued and
 *      changes_end() after it finished (whether it succeeded or not).
 *   3. After its request, the learner calls changes_unchanged() with its
 *      snapshot: the callback is given every part of the range that no
 *      change touched since the snapshot (none in flight, none ended
 *      after it), and it runs with the tracker's lock held, so no change
 *      can begin between the check and what the callback records.
 * When the tracker cannot tell (its history is bounded, and a change
 * that could not be recorded for want of memory is "untracked") it
 * answers "changed": learning less is always safe.
 *
 * Ranges are in bytes.  Thread safe.  Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_CHANGES_H
#define SPARSEBACKUP_CHANGES_H

#include <stdbool.h>
#include <stdint.h>

struct changes;

/* Changes that ended, remembered for learners (by default). */
#define CHANGES_HISTORY 4096

/* HISTORY >= 1 ended changes are remembered.  NULL + errno on failure. */
extern struct changes *changes_new (unsigned history);
extern void changes_free (struct changes *ch);

/* Begin a change of [OFFSET, OFFSET+COUNT).  Returns the change's ticket
 * (never 0) in *TICKET.  Out of memory it is recorded as "untracked":
 * every learner is answered "changed" until it ends.
 */
extern void changes_begin (struct changes *ch, uint64_t offset, uint64_t count,
                          uint64_t *ticket);

/* End the change TICKET (exactly once; 0 is ignored). */
extern void changes_end (struct changes *ch, uint64_t ticket);

/* The current generation. */
extern uint64_t changes_snapshot (struct changes *ch);

/* Call FN (OPAQUE, offset, count) for every maximal part of
 * [OFFSET, OFFSET+COUNT) that no change touched since SNAP: no change in
 * flight overlaps it (except the change EXCEPT, the caller's own, or 0
 * for none) and none that ended after SNAP did.  FN runs with the
 * tracker's lock held and must not call the tracker.  Returns the number
 * of bytes given to FN.
 */
typedef void (*changes_fn) (void *opaque, uint64_t offset, uint64_t count);
extern uint64_t changes_unchanged (struct changes *ch, uint64_t snap,
                                   uint64_t except,
                                   uint64_t offset, uint64_t count,
                                   changes_fn fn, void *opaque);

struct changes_stats {
  uint64_t begun;               /* changes begun */
  uint64_t inflight;            /* in flight now */
  uint64_t untracked;           /* begun without a record (no memory) */
  uint64_t refused;             /* bytes of learners answered "changed" */
};
extern void changes_get_stats (struct changes *ch, struct changes_stats *st);

#endif /* SPARSEBACKUP_CHANGES_H */
