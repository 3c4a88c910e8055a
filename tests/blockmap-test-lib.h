/* sparsebackup: helpers shared by the block map's unit tests
 * (test-blockmap*.c): making a tracker and a map, a change driven like
 * the filter drives it (changes_begin -> blockmap_change -> ... ->
 * blockmap_forget on failure -> changes_end), whole writes and zero
 * requests, and EXPECT_STATE.
 *
 *   #define TEST_NAME "test-blockmap-foo"
 *   #define TEST_RNG_SEED ...        (optional, see unit-test.h)
 *   #include "blockmap-test-lib.h"
 */

#ifndef SPARSEBACKUP_BLOCKMAP_TEST_LIB_H
#define SPARSEBACKUP_BLOCKMAP_TEST_LIB_H

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "blockmap.h"
#include "changes.h"
#include "unit-test.h"

static const char *state_names[] = {
  "UNKNOWN", "ALLOCATED", "DATA", "ZERO", "TRIMMED"
};

#define BIG_BUDGET (UINT64_C (1) << 30)     /* never forgets in tests */

static inline struct changes *
new_changes (unsigned history)
{
  struct changes *ch = changes_new (history);

  if (ch == NULL) {
    fprintf (stderr, TEST_NAME ": changes_new: %s\n", strerror (errno));
    exit (EXIT_FAILURE);
  }
  return ch;
}

static inline struct blockmap *
new_map_b (uint64_t size, uint32_t blksize, struct changes *ch,
           uint64_t budget)
{
  struct blockmap *bm = blockmap_new (size, blksize, ch, budget);

  if (bm == NULL) {
    fprintf (stderr, "test-blockmap: blockmap_new (%" PRIu64 ", %" PRIu32
             "): %s\n", size, blksize, strerror (errno));
    exit (EXIT_FAILURE);
  }
  return bm;
}

static inline struct blockmap *
new_map (uint64_t size, uint32_t blksize, struct changes *ch)
{
  return new_map_b (size, blksize, ch, BIG_BUDGET);
}

/* A change, the way the filter issues one (sparsebackup.c change_begin
 * and change_end).
 */
static inline uint64_t
cbegin (struct changes *ch, struct blockmap *bm, uint64_t offset,
        uint64_t count, enum bm_state newstate)
{
  uint64_t t = 0;

  changes_begin (ch, offset, count, &t);
  blockmap_change (bm, offset, count, newstate);
  return t;
}

static inline void
cend (struct changes *ch, struct blockmap *bm, uint64_t t,
      uint64_t offset, uint64_t count, bool ok)
{
  if (!ok)
    blockmap_forget (bm, offset, count);
  changes_end (ch, t);
}

/* A whole write / a whole zero request (write.c): the zero request
 * learns zero with its own ticket as EXCEPT.
 */
static inline void
do_write (struct changes *ch, struct blockmap *bm, uint64_t offset,
          uint64_t count)
{
  cend (ch, bm, cbegin (ch, bm, offset, count, BM_DATA), offset, count, true);
}

static inline uint64_t
do_zero (struct changes *ch, struct blockmap *bm, uint64_t offset,
         uint64_t count)
{
  uint64_t t = cbegin (ch, bm, offset, count, BM_UNKNOWN), snap, got;

  snap = changes_snapshot (ch);
  got = blockmap_learn_zero (bm, snap, t, offset, count, true);
  cend (ch, bm, t, offset, count, true);
  return got;
}

/* Forget everything: every block UNKNOWN again (blockmap_forget makes
 * blocks TRIMMED).  A resize to the same size, bracketed like the
 * filter does.
 */
static inline void
all_unknown (struct changes *ch, struct blockmap *bm)
{
  uint64_t t = 0;

  if (changes_begin (ch, 0, UINT64_MAX, &t) == -1 ||
      blockmap_resize (bm, blockmap_size (bm)) == -1) {
    fprintf (stderr, "test-blockmap: all_unknown: %s\n", strerror (errno));
    exit (EXIT_FAILURE);
  }
  changes_end (ch, t);
}

/* Check that [OFFSET, OFFSET+LEN) is exactly one run of state ST (the run
 * may extend further).
 */
static inline void
expect_state (int line, struct blockmap *bm, uint64_t offset, uint64_t len,
              enum bm_state st)
{
  uint64_t run;
  enum bm_state got = blockmap_lookup (bm, offset, len, &run);

  if (got != st || run != len) {
    fprintf (stderr, TEST_NAME ": FAIL (line %d): [%" PRIu64 ", +%" PRIu64
             ") is %s for %" PRIu64 " bytes, expected %s\n",
             line, offset, len, state_names[got], run, state_names[st]);
    if (++failures > 20) exit (EXIT_FAILURE);
  }
}
#define EXPECT_STATE(bm, o, l, s) expect_state (__LINE__, bm, o, l, s)

#endif /* SPARSEBACKUP_BLOCKMAP_TEST_LIB_H */
