/* sparsebackup: unit tests of common/blockmap.c, driven through a real
 * change tracker (common/changes.c) exactly like the filter does
 * (helpers in blockmap-test-lib.h).  Memory:
 *
 *  - the memory budget: forgetting never makes anything ZERO, and what
 *    was DATA becomes TRIMMED (never learnt zero from extents);
 *  - the memory bound: a 1 TiB map with 100 000 extents.
 *
 * The other block map tests: test-blockmap.c (fixed cases),
 * test-blockmap-model.c (against a reference model),
 * test-blockmap-threads.c (threads).
 *
 * Failures print a message; the exit status is 1 if anything failed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define TEST_NAME "test-blockmap-memory"
#define TEST_RNG_SEED UINT64_C (0x2545F4914F6CDD1D)
#include "blockmap-test-lib.h"

/*----------------------------------------------------------------------
 * The memory budget: alternating DATA and ZERO blocks written over a big
 * map with a small budget.  Memory stays within the budget after every
 * operation, knowledge is forgotten, and forgetting never makes anything
 * ZERO: every block is what it was last made, or UNKNOWN or TRIMMED; a
 * forgotten DATA block is TRIMMED (the plugin's extents must not make it
 * ZERO: a layer below that caches writes may report zero over it).
 */

static void
test_budget (void)
{
  const uint32_t bs = 4096;
  const uint64_t nblocks = 60000, size = nblocks * bs;
  const uint64_t budget = 256 * 1024;
  struct changes *ch = new_changes (CHANGES_HISTORY);
  struct blockmap *bm = new_map_b (size, bs, ch, budget);
  struct blockmap_stats stats;
  unsigned char *want = calloc (nblocks, 1);
  unsigned *order = malloc (nblocks * sizeof *order);
  uint64_t b, i, maxmem = 0, bad = 0, unknown = 0, data_unknown = 0;
  double t0 = now ();

  if (want == NULL || order == NULL)
    exit (EXIT_FAILURE);
  /* First in order, then in random order (splits everywhere). */
  for (i = 0; i < nblocks; i++)
    order[i] = i;
  for (unsigned pass = 0; pass < 2; pass++) {
    if (pass == 1)
      for (i = nblocks - 1; i > 0; i--) {
        unsigned j = rnd () % (i + 1), tmp = order[i];

        order[i] = order[j];
        order[j] = tmp;
      }
    for (i = 0; i < nblocks; i++) {
      b = order[i];
      if (b % 2 == (pass == 0 ? 0 : (b / 2) % 2)) {
        do_write (ch, bm, b * bs, bs);
        want[b] = BM_DATA;
      }
      else {
        do_zero (ch, bm, b * bs, bs);
        want[b] = BM_ZERO;
      }
      /* stats.memory (get_stats walks every run, so here every 16th
       * operation and the last ones; every operation below).
       */
      if (i % 16 == 0 || i > nblocks - 64) {
        blockmap_get_stats (bm, &stats);
        if (stats.memory > maxmem)
          maxmem = stats.memory;
        if (stats.memory > budget)
          FAIL ("budget: memory %" PRIu64 " > budget %" PRIu64
                " after %" PRIu64 " operations", stats.memory, budget, i);
      }
    }
  }
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.budget, budget);
  CHECK (stats.memory <= budget);
  CHECK (stats.forgotten > 0);
  for (b = 0; b < nblocks; b++) {
    uint64_t run;
    enum bm_state st = blockmap_lookup (bm, b * bs, bs, &run);

    if (st == want[b])
      continue;
    if (st == BM_UNKNOWN || st == BM_TRIMMED)
      unknown += bs;
    else
      bad++;
    if (want[b] == BM_DATA && st != BM_TRIMMED)
      data_unknown++;
  }
  if (bad)
    FAIL ("budget: %" PRIu64 " blocks neither what they were made nor "
          "UNKNOWN or TRIMMED", bad);
  if (data_unknown)
    FAIL ("budget: %" PRIu64 " DATA blocks forgotten as other than TRIMMED",
          data_unknown);
  CHECK (unknown > 0);
  CHECK (unknown <= stats.forgotten);
  CHECK_EQ (stats.bytes[BM_UNKNOWN] + stats.bytes[BM_TRIMMED], unknown);
  CHECK (blockmap_check (bm) == 0);
  printf ("budget: %" PRIu64 " blocks, budget %" PRIu64 ": max memory %"
          PRIu64 ", %" PRIu64 " runs kept, %" PRIu64 " bytes forgotten, "
          "%.2f s: ok\n", nblocks, budget, maxmem, stats.runs,
          stats.forgotten, now () - t0);

  /* Alternating extents learnt from a plugin (no changes at all) with
   * the smallest budget, memory checked after every operation: the same
   * bound, nothing never learnt becomes ZERO.
   */
  blockmap_free (bm);
  bm = new_map_b (size, bs, ch, 64 * 1024);
  {
    uint64_t snap = changes_snapshot (ch);

    for (b = 0; b < nblocks / 2; b++) {
      if (b % 3 == 0)
        blockmap_learn_zero (bm, snap, 0, b * bs, bs, false);
      else if (b % 3 == 1)
        blockmap_learn_allocated (bm, b * bs, bs);
      blockmap_get_stats (bm, &stats);
      if (stats.memory > 64 * 1024) {
        FAIL ("budget: memory %" PRIu64 " > 64 KiB after block %" PRIu64,
              stats.memory, b);
        break;
      }
    }
    bad = 0;
    for (b = 0; b < nblocks; b++) {
      uint64_t run;
      enum bm_state st = blockmap_lookup (bm, b * bs, bs, &run);

      if (st == BM_ZERO && b % 3 != 0)
        bad++;
      if (st == BM_ALLOCATED && b % 3 != 1)
        bad++;
      if (st == BM_TRIMMED || st == BM_DATA)    /* nothing held data */
        bad++;
    }
    CHECK_EQ (bad, 0);
    blockmap_get_stats (bm, &stats);
    CHECK (stats.forgotten > 0);
    CHECK (blockmap_check (bm) == 0);
  }
  free (want);
  free (order);
  blockmap_free (bm);
  changes_free (ch);
}


/*----------------------------------------------------------------------
 * 1 TiB, 4 KiB blocks, 100 000 extents.
 */

static void
test_memory (void)
{
  const uint64_t size = UINT64_C (1) << 40;
  const uint32_t bs = 4096;
  const uint64_t nblocks = size / bs;
  const unsigned nextents = 100000;
  const uint64_t ext = nblocks / nextents;      /* blocks per extent */
  struct changes *ch = new_changes (CHANGES_HISTORY);
  struct blockmap *bm;
  struct blockmap_stats stats;
  unsigned i, *order;
  double t0, t_build, t_walk, t_rand;
  uint64_t snap, offset, nlookups, t;

  /* In order: zero, data, zero, data ... (the last extent runs to the end). */
  bm = new_map_b (size, bs, ch, 64 * 1024 * 1024);
  t0 = now ();
  snap = changes_snapshot (ch);
  for (i = 0; i < nextents; i++) {
    uint64_t off = i * ext * bs;
    uint64_t len = i == nextents - 1 ? size - off : ext * bs;

    if (i % 2 == 0)
      blockmap_learn_zero (bm, snap, 0, off, len, false);
    else
      blockmap_learn_data (bm, snap, off, len);
  }
  t_build = now () - t0;
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, nextents);
  CHECK (stats.memory < 8 * 1024 * 1024);
  CHECK_EQ (stats.forgotten, 0);
  printf ("1 TiB map, %u extents built in order: %" PRIu64 " runs, "
          "%" PRIu64 " bytes (%.2f MiB), %.3f s\n",
          nextents, stats.runs, stats.memory,
          stats.memory / 1048576.0, t_build);

  /* Walking the map with lookups (how extents are answered). */
  t0 = now ();
  offset = 0;
  nlookups = 0;
  while (offset < size) {
    uint64_t run;
    enum bm_state st = blockmap_lookup (bm, offset, UINT64_MAX, &run);

    if (st != (nlookups % 2 == 0 ? BM_ZERO : BM_DATA) || run == 0) {
      FAIL ("walk: lookup %" PRIu64 " at %" PRIu64 " = %s", nlookups,
            offset, state_names[st]);
      break;
    }
    offset += run;
    nlookups++;
  }
  t_walk = now () - t0;
  CHECK_EQ (nlookups, nextents);
  blockmap_free (bm);

  /* The same extents inserted in random order (splits everywhere). */
  order = malloc (nextents * sizeof *order);
  if (order == NULL)
    exit (EXIT_FAILURE);
  for (i = 0; i < nextents; i++)
    order[i] = i;
  for (i = nextents - 1; i > 0; i--) {
    unsigned j = rnd () % (i + 1), tmp = order[i];

    order[i] = order[j];
    order[j] = tmp;
  }
  bm = new_map_b (size, bs, ch, 64 * 1024 * 1024);
  t0 = now ();
  snap = changes_snapshot (ch);
  for (i = 0; i < nextents; i++) {
    uint64_t off = order[i] * ext * bs;
    uint64_t len = order[i] == nextents - 1 ? size - off : ext * bs;

    if (order[i] % 2 == 0)
      blockmap_learn_zero (bm, snap, 0, off, len, false);
    else
      blockmap_learn_allocated (bm, off, len);
  }
  t_rand = now () - t0;
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, nextents);
  CHECK (stats.memory < 8 * 1024 * 1024);
  CHECK_EQ (stats.bytes[BM_ZERO], nextents / 2 * ext * bs);
  printf ("1 TiB map, %u extents in random order: %" PRIu64 " runs, "
          "%" PRIu64 " bytes (%.2f MiB), %.3f s; "
          "walk of %" PRIu64 " lookups %.3f s\n",
          nextents, stats.runs, stats.memory, stats.memory / 1048576.0,
          t_rand, nlookups, t_walk);

  /* One write over everything collapses the map. */
  t0 = now ();
  t = cbegin (ch, bm, 0, size, BM_DATA);
  cend (ch, bm, t, 0, size, true);
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, 1);
  CHECK_EQ (stats.bytes[BM_DATA], size);
  printf ("1 TiB map: write over everything %.3f s, memory after %" PRIu64
          " bytes\n", now () - t0, stats.memory);

  free (order);
  blockmap_free (bm);
  changes_free (ch);
}

int
main (void)
{
  double t0 = now ();

  test_budget ();
  test_memory ();

  if (failures) {
    fprintf (stderr, "test-blockmap-memory: %u failure(s)\n", failures);
    exit (EXIT_FAILURE);
  }
  printf ("test-blockmap-memory: PASS (%.2f s)\n", now () - t0);
  exit (EXIT_SUCCESS);
}
