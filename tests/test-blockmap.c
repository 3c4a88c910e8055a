/* sparsebackup: unit tests of common/blockmap.c.
 *
 *  - fixed cases: argument checking, rounding (outward for writes, inward
 *    for zero knowledge, partial last block), the race rule, failed
 *    writes, learn_data / learn_allocated, huge sizes;
 *  - a randomized comparison against a dense reference model (one byte
 *    per block) that implements the same contract, checking every lookup,
 *    is_zero, snapshot and statistics after every operation;
 *  - a multi-threaded stress on disjoint ranges;
 *  - the memory bound: a 1 TiB map with 100 000 extents.
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

#include "blockmap.h"

#define TEST_NAME "test-blockmap"
#include "unit-test.h"

#define CHECK_EQ(a, b)                                                  \
  do {                                                                  \
    uint64_t a_ = (a), b_ = (b);                                        \
    if (a_ != b_)                                                       \
      FAIL ("%s == %" PRIu64 ", expected %s == %" PRIu64,               \
            #a, a_, #b, b_);                                            \
  } while (0)

static const char *state_names[] = { "UNKNOWN", "ALLOCATED", "DATA", "ZERO" };

/* Deterministic PRNG (xorshift64*), one state per thread. */
static uint64_t
rnd_r (uint64_t *s)
{
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C (2685821657736338717);
}

static uint64_t rng_state = UINT64_C (0x2545F4914F6CDD1D);

static uint64_t
rnd (void)
{
  return rnd_r (&rng_state);
}

static double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct blockmap *
new_map (uint64_t size, uint32_t blksize)
{
  struct blockmap *bm = blockmap_new (size, blksize);

  if (bm == NULL) {
    fprintf (stderr, "test-blockmap: blockmap_new (%" PRIu64 ", %" PRIu32
             "): %s\n", size, blksize, strerror (errno));
    exit (EXIT_FAILURE);
  }
  return bm;
}

/* Check that [OFFSET, OFFSET+LEN) is exactly one run of state ST (the run
 * may extend further).
 */
static void
expect_state (int line, struct blockmap *bm, uint64_t offset, uint64_t len,
              enum bm_state st)
{
  uint64_t run;
  enum bm_state got = blockmap_lookup (bm, offset, len, &run);

  if (got != st || run != len) {
    fprintf (stderr, "test-blockmap: FAIL (line %d): [%" PRIu64 ", +%" PRIu64
             ") is %s for %" PRIu64 " bytes, expected %s\n",
             line, offset, len, state_names[got], run, state_names[st]);
    if (++failures > 20) exit (EXIT_FAILURE);
  }
}
#define EXPECT_STATE(bm, o, l, s) expect_state (__LINE__, bm, o, l, s)

/*----------------------------------------------------------------------
 * Fixed cases.
 */

static void
test_arguments (void)
{
  struct blockmap *bm;
  uint64_t run, snap, t;
  struct blockmap_stats stats;

  errno = 0;
  CHECK (blockmap_new (1000, 256) == NULL && errno == EINVAL);
  errno = 0;
  CHECK (blockmap_new (1000, 1000) == NULL && errno == EINVAL);
  errno = 0;
  CHECK (blockmap_new (1000, 128 * 1024 * 1024) == NULL && errno == EINVAL);
  errno = 0;
  CHECK (blockmap_new ((UINT64_C (1) << 63) + 1, 4096) == NULL &&
         errno == EINVAL);
  errno = 0;
  CHECK (blockmap_new (1000, 0) == NULL && errno == EINVAL);

  bm = new_map (1000, 512);
  CHECK_EQ (blockmap_blksize (bm), 512);
  CHECK_EQ (blockmap_size (bm), 1000);
  blockmap_free (bm);
  blockmap_free (NULL);

  bm = new_map (64 * 1024 * 1024 * 3ULL, 64 * 1024 * 1024);
  EXPECT_STATE (bm, 0, 3 * 64 * 1024 * 1024ULL, BM_UNKNOWN);
  blockmap_free (bm);

  /* An empty export. */
  bm = new_map (0, 4096);
  CHECK_EQ (blockmap_lookup (bm, 0, 100, &run), BM_UNKNOWN);
  CHECK_EQ (run, 0);
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, 4096), 0);
  CHECK (!blockmap_is_zero (bm, 0, 1));
  t = blockmap_write_begin (bm, 0, 100, BM_DATA);
  blockmap_write_end (bm, t, false);
  blockmap_forget (bm, 0, 1);
  blockmap_learn_data (bm, snap, 0, 1);
  blockmap_learn_allocated (bm, 0, 1);
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, 1);
  CHECK_EQ (stats.bytes[0] + stats.bytes[1] + stats.bytes[2] + stats.bytes[3],
            0);
  blockmap_free (bm);

  /* Count 0 is a no-op, LIMIT 0 gives no run, offsets past the end. */
  bm = new_map (10000, 512);
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, 10000), 10000);
  blockmap_forget (bm, 512, 0);
  t = blockmap_write_begin (bm, 512, 0, BM_DATA);
  blockmap_write_end (bm, t, false);
  blockmap_learn_data (bm, snap, 512, 0);
  EXPECT_STATE (bm, 0, 10000, BM_ZERO);
  CHECK_EQ (blockmap_lookup (bm, 0, 0, &run), BM_UNKNOWN);
  CHECK_EQ (run, 0);
  CHECK_EQ (blockmap_lookup (bm, 10000, 10, &run), BM_UNKNOWN);
  CHECK_EQ (run, 0);
  CHECK_EQ (blockmap_lookup (bm, UINT64_MAX, UINT64_MAX, &run), BM_UNKNOWN);
  CHECK_EQ (run, 0);
  CHECK_EQ (blockmap_lookup (bm, 9999, UINT64_MAX, &run), BM_ZERO);
  CHECK_EQ (run, 1);
  CHECK (blockmap_is_zero (bm, 0, 10000));
  CHECK (blockmap_is_zero (bm, 5000, 0));
  CHECK (!blockmap_is_zero (bm, 0, 10001));         /* past the end */
  CHECK (!blockmap_is_zero (bm, 10000, 1));
  CHECK (!blockmap_is_zero (bm, 1, UINT64_MAX));    /* overflow */
  /* Overflowing ranges are clipped. */
  blockmap_forget (bm, 9000, UINT64_MAX);
  EXPECT_STATE (bm, 0, 8704, BM_ZERO);
  EXPECT_STATE (bm, 8704, 10000 - 8704, BM_UNKNOWN);
  blockmap_forget (bm, UINT64_MAX, UINT64_MAX);
  blockmap_forget (bm, 10000, 1);
  EXPECT_STATE (bm, 0, 8704, BM_ZERO);
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, 2);
  CHECK_EQ (stats.bytes[BM_ZERO], 8704);
  CHECK_EQ (stats.bytes[BM_UNKNOWN], 10000 - 8704);
  blockmap_free (bm);

  printf ("arguments: ok\n");
}

static void
test_rounding (void)
{
  const uint64_t bs = 4096, size = 10 * 4096 + 100;
  struct blockmap *bm = new_map (size, bs);
  uint64_t snap, t;

  /* learn_zero rounds inward. */
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 4097, 8192), 4096);
  EXPECT_STATE (bm, 0, 8192, BM_UNKNOWN);
  EXPECT_STATE (bm, 8192, 4096, BM_ZERO);
  EXPECT_STATE (bm, 12288, size - 12288, BM_UNKNOWN);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 1, 4094), 0);      /* < 1 block */
  CHECK_EQ (blockmap_learn_zero (bm, snap, 4095, 4096), 0);   /* straddles */
  CHECK_EQ (blockmap_learn_zero (bm, snap, 8192, 4096), 0);   /* known */

  /* The partial last block counts when the range reaches the end. */
  CHECK_EQ (blockmap_learn_zero (bm, snap, 10 * 4096, 50), 0);
  EXPECT_STATE (bm, 10 * 4096, 100, BM_UNKNOWN);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 10 * 4096, 100), 100);
  EXPECT_STATE (bm, 10 * 4096, 100, BM_ZERO);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 9 * 4096 + 1, UINT64_MAX), 0);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 9 * 4096, UINT64_MAX), 4096);
  EXPECT_STATE (bm, 9 * 4096, 4096 + 100, BM_ZERO);
  CHECK (blockmap_is_zero (bm, 9 * 4096 + 7, 4096));
  CHECK (blockmap_is_zero (bm, size - 1, 1));
  CHECK (!blockmap_is_zero (bm, size - 1, 2));

  /* Writes round outward: 2 bytes across a boundary clear 2 blocks. */
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, size), 4096 * 8);
  CHECK (blockmap_is_zero (bm, 0, size));
  t = blockmap_write_begin (bm, 4095, 2, BM_DATA);
  EXPECT_STATE (bm, 0, 8192, BM_DATA);
  EXPECT_STATE (bm, 8192, size - 8192, BM_ZERO);
  CHECK (!blockmap_is_zero (bm, 4000, 10));
  CHECK (!blockmap_is_zero (bm, 8191, 1));
  CHECK (blockmap_is_zero (bm, 8192, 1));
  blockmap_write_end (bm, t, true);
  EXPECT_STATE (bm, 0, 8192, BM_DATA);

  /* A 1 byte trim in the partial last block. */
  t = blockmap_write_begin (bm, size - 1, 1, BM_UNKNOWN);
  EXPECT_STATE (bm, 10 * 4096, 100, BM_UNKNOWN);
  blockmap_write_end (bm, t, true);
  EXPECT_STATE (bm, 10 * 4096, 100, BM_UNKNOWN);

  /* learn_allocated / learn_data / forget round outward. */
  blockmap_forget (bm, 3 * 4096 + 5, 1);
  EXPECT_STATE (bm, 3 * 4096, 4096, BM_UNKNOWN);
  blockmap_learn_allocated (bm, 3 * 4096 + 4095, 2);
  EXPECT_STATE (bm, 3 * 4096, 4096, BM_ALLOCATED);
  EXPECT_STATE (bm, 4 * 4096, 4096, BM_ZERO);       /* ZERO stays ZERO */
  snap = blockmap_snapshot (bm);
  blockmap_learn_data (bm, snap, 3 * 4096 + 4095, 2);
  EXPECT_STATE (bm, 3 * 4096, 4096, BM_DATA);       /* ALLOCATED -> DATA */
  EXPECT_STATE (bm, 4 * 4096, 4096, BM_DATA);       /* seen data */

  blockmap_free (bm);
  printf ("rounding: ok\n");
}

static void
test_races (void)
{
  const uint64_t bs = 512, size = 16 * 512;
  struct blockmap *bm = new_map (size, bs);
  uint64_t snap, snap2, t, t2;
  int i;

  /* A write in flight on block 3 when the zero request ends. */
  snap = blockmap_snapshot (bm);
  t = blockmap_write_begin (bm, 3 * bs, bs, BM_DATA);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, size), size - bs);
  EXPECT_STATE (bm, 0, 3 * bs, BM_ZERO);
  EXPECT_STATE (bm, 3 * bs, bs, BM_DATA);
  EXPECT_STATE (bm, 4 * bs, size - 4 * bs, BM_ZERO);
  /* Even with a snapshot taken after the write began. */
  snap2 = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap2, 3 * bs, bs), 0);
  /* The write ends: still refused for the old snapshots. */
  blockmap_write_end (bm, t, true);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 3 * bs, bs), 0);
  CHECK_EQ (blockmap_learn_zero (bm, snap2, 3 * bs, bs), 0);
  EXPECT_STATE (bm, 3 * bs, bs, BM_DATA);
  /* A snapshot taken after the write ended may learn. */
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 3 * bs, bs), bs);
  CHECK (blockmap_is_zero (bm, 0, size));

  /* A write that began and ended after the snapshot (partial overlap
   * of the range: block 5 only, written as 1 byte).
   */
  snap = blockmap_snapshot (bm);
  t = blockmap_write_begin (bm, 5 * bs + 100, 1, BM_DATA);
  blockmap_write_end (bm, t, true);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 4 * bs, 3 * bs), 0);
  EXPECT_STATE (bm, 5 * bs, bs, BM_DATA);
  CHECK (blockmap_is_zero (bm, 4 * bs, bs));
  CHECK (blockmap_is_zero (bm, 6 * bs, bs));

  /* A write that ended before the snapshot does not block learning. */
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 4 * bs, 3 * bs), bs);
  CHECK (blockmap_is_zero (bm, 0, size));

  /* Writes that do not overlap do not block learning. */
  blockmap_forget (bm, 0, size);
  snap = blockmap_snapshot (bm);
  t = blockmap_write_begin (bm, 10 * bs, bs, BM_DATA);        /* in flight */
  t2 = blockmap_write_begin (bm, 12 * bs, 2 * bs, BM_DATA);
  blockmap_write_end (bm, t2, true);                          /* ended */
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, 10 * bs), 10 * bs);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 11 * bs, bs), bs);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 14 * bs, 2 * bs), 2 * bs);
  /* Adjacent but not overlapping (block boundaries). */
  CHECK_EQ (blockmap_learn_zero (bm, snap, 9 * bs, 2 * bs), 0);
  EXPECT_STATE (bm, 10 * bs, bs, BM_DATA);
  EXPECT_STATE (bm, 12 * bs, 2 * bs, BM_DATA);
  blockmap_write_end (bm, t, true);

  /* ok = false makes the range UNKNOWN, never ZERO. */
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, size), 3 * bs);
  t = blockmap_write_begin (bm, 2 * bs, 3 * bs, BM_DATA);
  EXPECT_STATE (bm, 2 * bs, 3 * bs, BM_DATA);
  blockmap_write_end (bm, t, false);
  EXPECT_STATE (bm, 0, 2 * bs, BM_ZERO);
  EXPECT_STATE (bm, 2 * bs, 3 * bs, BM_UNKNOWN);
  EXPECT_STATE (bm, 5 * bs, size - 5 * bs, BM_ZERO);
  /* Failed trim. */
  t = blockmap_write_begin (bm, 8 * bs, bs, BM_UNKNOWN);
  blockmap_write_end (bm, t, false);
  EXPECT_STATE (bm, 8 * bs, bs, BM_UNKNOWN);

  /* write_begin never sets ZERO, even when asked. */
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, size), 4 * bs);
  t = blockmap_write_begin (bm, 0, bs, BM_ZERO);
  EXPECT_STATE (bm, 0, bs, BM_UNKNOWN);
  blockmap_write_end (bm, t, true);
  EXPECT_STATE (bm, 0, bs, BM_UNKNOWN);
  /* Ending a ticket twice, or a bogus ticket, is harmless. */
  blockmap_write_end (bm, t, false);
  blockmap_write_end (bm, 123456789, false);
  EXPECT_STATE (bm, 0, bs, BM_UNKNOWN);
  EXPECT_STATE (bm, bs, size - bs, BM_ZERO);

  /* Overlapping writes: the first ending does not free the blocks while
   * the second is still in flight.
   */
  blockmap_forget (bm, 0, size);
  t = blockmap_write_begin (bm, 0, 4 * bs, BM_DATA);
  t2 = blockmap_write_begin (bm, 2 * bs, 4 * bs, BM_DATA);
  blockmap_write_end (bm, t, true);
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, 8 * bs), 2 * bs + 2 * bs);
  EXPECT_STATE (bm, 0, 2 * bs, BM_ZERO);
  EXPECT_STATE (bm, 2 * bs, 4 * bs, BM_DATA);
  EXPECT_STATE (bm, 6 * bs, 2 * bs, BM_ZERO);
  blockmap_write_end (bm, t2, true);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, 8 * bs), 0);

  /* learn_data: ZERO -> DATA if no zero knowledge was added after the
   * snapshot; kept if it was (the zero is newer than the read).
   */
  blockmap_forget (bm, 0, size);
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, 4 * bs), 4 * bs);
  snap2 = blockmap_snapshot (bm);        /* "read" issued now */
  blockmap_learn_data (bm, snap2, 0, bs);
  EXPECT_STATE (bm, 0, bs, BM_DATA);
  blockmap_learn_data (bm, snap, bs, bs);  /* read older than the zero */
  EXPECT_STATE (bm, bs, 3 * bs, BM_ZERO);
  blockmap_learn_data (bm, snap, 3 * bs, 2 * bs);  /* mixed */
  EXPECT_STATE (bm, bs, 3 * bs, BM_ZERO);
  EXPECT_STATE (bm, 4 * bs, bs, BM_DATA);

  /* Many writes after the snapshot, elsewhere: once the record of them
   * is lost, learning is refused (conservatively) for old snapshots.
   */
  blockmap_forget (bm, 0, size);
  snap = blockmap_snapshot (bm);
  for (i = 0; i < 100000; i++) {
    t = blockmap_write_begin (bm, 15 * bs, bs, BM_DATA);
    blockmap_write_end (bm, t, true);
  }
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, bs), 0);
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, bs), bs);

  blockmap_free (bm);
  printf ("races: ok\n");
}

/* Sizes up to 2^63, offsets near the top of the range. */
static void
test_huge (void)
{
  const uint64_t size = UINT64_C (1) << 63;
  struct blockmap *bm = new_map (size, 512);
  struct blockmap_stats stats;
  uint64_t snap, t, run;

  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, size - 1000, UINT64_MAX), 512);
  EXPECT_STATE (bm, size - 512, 512, BM_ZERO);
  CHECK (blockmap_is_zero (bm, size - 1, 1));
  CHECK_EQ (blockmap_learn_zero (bm, snap, 0, UINT64_MAX), size - 512);
  CHECK (blockmap_is_zero (bm, 0, size));
  t = blockmap_write_begin (bm, size - 1, UINT64_MAX, BM_DATA);
  EXPECT_STATE (bm, size - 512, 512, BM_DATA);
  blockmap_write_end (bm, t, true);
  CHECK_EQ (blockmap_lookup (bm, 0, UINT64_MAX, &run), BM_ZERO);
  CHECK_EQ (run, size - 512);
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, 2);
  CHECK_EQ (stats.bytes[BM_ZERO], size - 512);
  CHECK_EQ (stats.bytes[BM_DATA], 512);
  blockmap_free (bm);

  /* Odd size, 64 MiB blocks, partial last block. */
  bm = new_map (size - 12345, 64 * 1024 * 1024);
  snap = blockmap_snapshot (bm);
  CHECK_EQ (blockmap_learn_zero (bm, snap, size - 64 * 1024 * 1024,
                                 UINT64_MAX),
            64 * 1024 * 1024 - 12345);
  CHECK (blockmap_is_zero (bm, size - 12346, 1));
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.bytes[BM_ZERO], 64 * 1024 * 1024 - 12345);
  CHECK_EQ (stats.bytes[BM_UNKNOWN], size - 64 * 1024 * 1024);
  blockmap_free (bm);

  printf ("huge sizes: ok\n");
}

/*----------------------------------------------------------------------
 * Dense reference model.  Mirrors the contract in blockmap.h (and the
 * event bookkeeping described at the top of blockmap.c) with one byte per
 * block and an unbounded event list; the map's bounded memory of events
 * (the last 4096 writes, the last 2048 zero learnings) is modelled too, so
 * the comparison is exact, conservative refusals included.
 */

#define MAP_WRITE_RING 4096
#define MAP_ZERO_RING 2048

#define MAX_REF_INFLIGHT 8
#define MAX_REF_EVENTS 100000

struct ref_range {
  uint64_t first, end;
};

struct ref_event {
  uint64_t gen;
  struct ref_range r;
  bool zero;                    /* zero knowledge, or a write ended */
};

struct ref_inflight {
  uint64_t ticket;              /* the map's ticket */
  bool recorded;                /* false if its range was empty */
  struct ref_range r;
};

struct ref {
  uint64_t size, nblocks;
  uint32_t bs;
  unsigned char *st;
  uint64_t gen;
  struct ref_inflight inflight[MAX_REF_INFLIGHT];
  unsigned ninflight;
  struct ref_event *events;
  size_t nevents;
};

/* The generation of the newest event of a kind that the map no longer
 * remembers (0 if none).
 */
static uint64_t
ref_lost_gen (const struct ref *ref, bool zero)
{
  size_t i, seen = 0, ringsize = zero ? MAP_ZERO_RING : MAP_WRITE_RING;

  for (i = ref->nevents; i-- > 0; )
    if (ref->events[i].zero == zero && ++seen > ringsize)
      return ref->events[i].gen;
  return 0;
}

static void
ref_init (struct ref *ref, uint64_t size, uint32_t bs)
{
  memset (ref, 0, sizeof *ref);
  ref->size = size;
  ref->bs = bs;
  ref->nblocks = (size + bs - 1) / bs;
  ref->st = calloc (ref->nblocks + 1, 1);
  ref->events = malloc (sizeof (struct ref_event) * (MAX_REF_EVENTS + 1000));
  if (ref->st == NULL || ref->events == NULL) {
    perror ("malloc");
    exit (EXIT_FAILURE);
  }
}

static void
ref_free (struct ref *ref)
{
  free (ref->st);
  free (ref->events);
}

static bool
ref_outward (const struct ref *ref, uint64_t offset, uint64_t count,
             struct ref_range *r)
{
  uint64_t end;

  if (count == 0 || offset >= ref->size)
    return false;
  end = count > ref->size - offset ? ref->size : offset + count;
  r->first = offset / ref->bs;
  r->end = (end + ref->bs - 1) / ref->bs;
  return true;
}

static bool
ref_inward (const struct ref *ref, uint64_t offset, uint64_t count,
            struct ref_range *r)
{
  uint64_t end;

  if (count == 0 || offset >= ref->size)
    return false;
  end = count > ref->size - offset ? ref->size : offset + count;
  r->first = (offset + ref->bs - 1) / ref->bs;
  r->end = end == ref->size ? ref->nblocks : end / ref->bs;
  return r->first < r->end;
}

static uint64_t
ref_block_bytes (const struct ref *ref, uint64_t b)
{
  uint64_t end = (b + 1) * ref->bs;

  return (end > ref->size ? ref->size : end) - b * ref->bs;
}

static bool
in_range (uint64_t b, struct ref_range r)
{
  return b >= r.first && b < r.end;
}

static uint64_t
ref_learn_zero (struct ref *ref, uint64_t snap, uint64_t offset,
                uint64_t count)
{
  struct ref_range r;
  uint64_t b, learnt = 0, gen = 0;
  unsigned char *conflict;
  size_t i;

  if (!ref_inward (ref, offset, count, &r) || snap > ref->gen ||
      ref_lost_gen (ref, false) > snap)
    return 0;
  conflict = calloc (ref->nblocks, 1);
  if (conflict == NULL)
    exit (EXIT_FAILURE);
  for (b = r.first; b < r.end; b++) {
    for (i = 0; i < ref->ninflight; i++)
      if (ref->inflight[i].recorded && in_range (b, ref->inflight[i].r))
        conflict[b] = 1;
    for (i = ref->nevents; i-- > 0 && ref->events[i].gen > snap; )
      if (!ref->events[i].zero && in_range (b, ref->events[i].r))
        conflict[b] = 1;
  }
  /* Each maximal gap of non-conflicting blocks is learnt as a unit. */
  b = r.first;
  while (b < r.end) {
    struct ref_range gap;
    uint64_t n = 0, j;

    if (conflict[b]) {
      b++;
      continue;
    }
    gap.first = b;
    while (b < r.end && !conflict[b])
      b++;
    gap.end = b;
    for (j = gap.first; j < gap.end; j++)
      if (ref->st[j] != BM_ZERO) {
        n += ref_block_bytes (ref, j);
        ref->st[j] = BM_ZERO;
      }
    if (n > 0) {
      if (gen == 0)
        gen = ++ref->gen;
      ref->events[ref->nevents].gen = gen;
      ref->events[ref->nevents].r = gap;
      ref->events[ref->nevents].zero = true;
      ref->nevents++;
      learnt += n;
    }
  }
  free (conflict);
  return learnt;
}

static void
ref_learn_data (struct ref *ref, uint64_t snap, uint64_t offset,
                uint64_t count)
{
  struct ref_range r;
  uint64_t b;
  size_t i;
  bool lost;

  if (!ref_outward (ref, offset, count, &r))
    return;
  lost = ref_lost_gen (ref, true) > snap;
  for (b = r.first; b < r.end; b++) {
    bool protected = false;

    if (ref->st[b] != BM_ZERO) {
      ref->st[b] = BM_DATA;
      continue;
    }
    /* Newest first, stop at SNAP. */
    for (i = ref->nevents; !lost && i-- > 0 && ref->events[i].gen > snap; )
      if (ref->events[i].zero && in_range (b, ref->events[i].r))
        protected = true;
    if (!protected)
      ref->st[b] = BM_DATA;
  }
}

static void
ref_set (struct ref *ref, struct ref_range r, unsigned char st)
{
  uint64_t b;

  for (b = r.first; b < r.end; b++)
    ref->st[b] = st;
}

static void
ref_write_end (struct ref *ref, unsigned i, bool ok)
{
  struct ref_inflight w = ref->inflight[i];

  ref->inflight[i] = ref->inflight[--ref->ninflight];
  if (!w.recorded)
    return;
  ref->gen++;
  ref->events[ref->nevents].gen = ref->gen;
  ref->events[ref->nevents].r = w.r;
  ref->events[ref->nevents].zero = false;
  ref->nevents++;
  if (!ok)
    ref_set (ref, w.r, BM_UNKNOWN);
}

/* Compare everything observable. */
static void
ref_compare (struct blockmap *bm, const struct ref *ref, const char *what)
{
  struct blockmap_stats stats;
  uint64_t offset, bytes[4] = { 0 }, runs = 1, b;
  int k;

  /* Walk the map run by run. */
  offset = 0;
  while (offset < ref->size) {
    uint64_t run, expect_run, e;
    enum bm_state st = blockmap_lookup (bm, offset, UINT64_MAX, &run);

    b = offset / ref->bs;
    e = b;
    while (e < ref->nblocks && ref->st[e] == ref->st[b])
      e++;
    expect_run = (e * ref->bs > ref->size ? ref->size : e * ref->bs) - offset;
    if (st != ref->st[b] || run != expect_run) {
      FAIL ("after %s: lookup (%" PRIu64 ") = %s/%" PRIu64
            ", expected %s/%" PRIu64,
            what, offset, state_names[st], run,
            state_names[ref->st[b]], expect_run);
      return;
    }
    offset += run;
  }

  /* Random lookups with limits, and is_zero. */
  for (k = 0; k < 20; k++) {
    uint64_t off = rnd () % (ref->size + ref->bs);
    uint64_t limit = rnd () % 4 == 0 ? UINT64_MAX : rnd () % (ref->size + 1);
    uint64_t count = rnd () % 3 == 0 ? rnd () % (4 * ref->bs)
      : rnd () % (ref->size + 1);
    uint64_t run, expect_run = 0;
    enum bm_state st = blockmap_lookup (bm, off, limit, &run);
    enum bm_state expect_st = BM_UNKNOWN;
    bool z, expect_z;

    if (off < ref->size && limit > 0) {
      uint64_t e;

      b = off / ref->bs;
      e = b;
      while (e < ref->nblocks && ref->st[e] == ref->st[b])
        e++;
      expect_st = ref->st[b];
      expect_run = (e * ref->bs > ref->size ? ref->size : e * ref->bs) - off;
      if (expect_run > limit)
        expect_run = limit;
    }
    if (st != expect_st || run != expect_run)
      FAIL ("after %s: lookup (%" PRIu64 ", %" PRIu64 ") = %s/%" PRIu64
            ", expected %s/%" PRIu64, what, off, limit,
            state_names[st], run, state_names[expect_st], expect_run);

    z = blockmap_is_zero (bm, off, count);
    if (count == 0)
      expect_z = off <= ref->size;
    else if (off >= ref->size || count > ref->size - off)
      expect_z = false;
    else {
      struct ref_range r;

      ref_outward (ref, off, count, &r);
      expect_z = true;
      for (b = r.first; b < r.end; b++)
        if (ref->st[b] != BM_ZERO)
          expect_z = false;
    }
    if (z != expect_z)
      FAIL ("after %s: is_zero (%" PRIu64 ", %" PRIu64 ") = %d, expected %d",
            what, off, count, z, expect_z);
  }

  /* Statistics. */
  for (b = 0; b < ref->nblocks; b++) {
    bytes[ref->st[b]] += ref_block_bytes (ref, b);
    if (b > 0 && ref->st[b] != ref->st[b - 1])
      runs++;
  }
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, runs);
  for (k = 0; k < 4; k++)
    CHECK_EQ (stats.bytes[k], bytes[k]);

  CHECK_EQ (blockmap_snapshot (bm), ref->gen);
  if (blockmap_check (bm) == -1)
    FAIL ("after %s: blockmap_check found the map inconsistent", what);
}

/* A random byte range: mostly inside, sometimes empty, huge or outside. */
static void
random_range (const struct ref *ref, uint64_t *offset, uint64_t *count)
{
  uint64_t sel = rnd () % 100;

  if (sel < 45) {
    /* Small: a few blocks, unaligned. */
    *offset = rnd () % ref->size;
    *count = 1 + rnd () % (3 * ref->bs);
  }
  else if (sel < 60) {
    /* Aligned blocks. */
    *offset = (rnd () % ref->nblocks) * ref->bs;
    *count = (1 + rnd () % 4) * ref->bs;
  }
  else if (sel < 85) {
    *offset = rnd () % ref->size;
    *count = rnd () % (ref->size / 3 + 1);
  }
  else if (sel < 90) {
    *offset = rnd () % ref->size;
    *count = UINT64_MAX - rnd () % 1000;
  }
  else if (sel < 95) {
    *offset = rnd () % (ref->size + 3 * ref->bs);
    *count = rnd () % 4 == 0 ? 0 : rnd () % (2 * ref->bs);
  }
  else {
    *offset = 0;
    *count = ref->size;
  }
}

static void
test_random_round (uint64_t size, uint32_t bs, unsigned nops)
{
  struct blockmap *bm = new_map (size, bs);
  struct ref ref;
  uint64_t snaps[4] = { 0, 0, 0, 0 };
  unsigned op;
  char what[64];

  ref_init (&ref, size, bs);

  for (op = 0; op < nops && ref.nevents + ref.nblocks < MAX_REF_EVENTS;
       op++) {
    uint64_t sel = rnd () % 100, offset, count, snap;

    random_range (&ref, &offset, &count);
    snap = snaps[rnd () % 4];

    if (sel < 20) {
      if (ref.ninflight == MAX_REF_INFLIGHT)
        goto end_write;
      {
        static const enum bm_state ns[] = {
          BM_DATA, BM_DATA, BM_DATA, BM_UNKNOWN, BM_ZERO, BM_ALLOCATED
        };
        enum bm_state st = ns[rnd () % 6];
        struct ref_inflight *w = &ref.inflight[ref.ninflight++];

        w->ticket = blockmap_write_begin (bm, offset, count, st);
        w->recorded = ref_outward (&ref, offset, count, &w->r);
        if (w->recorded)
          ref_set (&ref, w->r, st == BM_ZERO ? BM_UNKNOWN : st);
        snprintf (what, sizeof what, "write_begin %s", state_names[st]);
      }
    }
    else if (sel < 38) {
    end_write:
      if (ref.ninflight == 0)
        continue;
      {
        unsigned i = rnd () % ref.ninflight;
        bool ok = rnd () % 5 != 0;

        blockmap_write_end (bm, ref.inflight[i].ticket, ok);
        ref_write_end (&ref, i, ok);
        snprintf (what, sizeof what, "write_end %d", ok);
      }
    }
    else if (sel < 48) {
      /* snaps[0] is long-lived, to reach what the map has forgotten. */
      unsigned i = rnd () % 4;

      if (i > 0 || rnd () % 500 == 0)
        snaps[i] = blockmap_snapshot (bm);
      strcpy (what, "snapshot");
    }
    else if (sel < 75) {
      uint64_t got = blockmap_learn_zero (bm, snap, offset, count);
      uint64_t exp = ref_learn_zero (&ref, snap, offset, count);

      if (got != exp)
        FAIL ("learn_zero (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ") returned %"
              PRIu64 ", expected %" PRIu64, snap, offset, count, got, exp);
      strcpy (what, "learn_zero");
    }
    else if (sel < 85) {
      blockmap_learn_data (bm, snap, offset, count);
      ref_learn_data (&ref, snap, offset, count);
      strcpy (what, "learn_data");
    }
    else if (sel < 93) {
      struct ref_range r;

      blockmap_learn_allocated (bm, offset, count);
      if (ref_outward (&ref, offset, count, &r)) {
        uint64_t b;

        for (b = r.first; b < r.end; b++)
          if (ref.st[b] == BM_UNKNOWN)
            ref.st[b] = BM_ALLOCATED;
      }
      strcpy (what, "learn_allocated");
    }
    else {
      struct ref_range r;

      blockmap_forget (bm, offset, count);
      if (ref_outward (&ref, offset, count, &r))
        ref_set (&ref, r, BM_UNKNOWN);
      strcpy (what, "forget");
    }

    ref_compare (bm, &ref, what);
    if (failures)
      break;
  }

  /* End all writes and compare once more. */
  while (ref.ninflight > 0) {
    blockmap_write_end (bm, ref.inflight[0].ticket, true);
    ref_write_end (&ref, 0, true);
  }
  ref_compare (bm, &ref, "final write_end");

  ref_free (&ref);
  blockmap_free (bm);
}

static void
test_random (void)
{
  unsigned round;

  for (round = 0; round < 60 && !failures; round++) {
    static const uint32_t bss[] = { 512, 4096, 65536 };
    uint32_t bs = bss[round % 3];
    /* Small maps (many merges), and maps of a few thousand blocks so
     * that the map needs many chunks (splits and chunk merges).
     */
    uint64_t nblocks = round % 2 ? 5 + rnd () % 200 : 2000 + rnd () % 4000;
    uint64_t size = nblocks * bs - (round % 4 < 2 ? rnd () % bs : 0);

    /* Every 5th small round is long enough for the map to forget old
     * events (conservative refusals, modelled by the reference).
     */
    test_random_round (size, bs,
                       round % 2 == 0 ? 1500 : round % 5 == 1 ? 40000 : 3000);
  }
  printf ("random vs reference: %u rounds\n", round);
}

/* Many runs, edited everywhere: exercises chunk splits and merges. */
static void
test_many_runs (void)
{
  const uint32_t bs = 512;
  const uint64_t nblocks = 100000, size = nblocks * bs;
  struct blockmap *bm = new_map (size, bs);
  struct ref ref;
  struct blockmap_stats stats;
  uint64_t b, snap;
  unsigned i;

  ref_init (&ref, size, bs);

  /* Alternate every block. */
  for (b = 0; b < nblocks; b += 2) {
    blockmap_learn_allocated (bm, b * bs, bs);
    ref.st[b] = BM_ALLOCATED;
  }
  ref_compare (bm, &ref, "alternate");
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, nblocks);

  /* Random small edits (no zero knowledge events: learn_allocated,
   * learn_data with the current snapshot, forget).
   */
  for (i = 0; i < 20000; i++) {
    uint64_t first = rnd () % nblocks, n = 1 + rnd () % 300;
    struct ref_range r;

    if (first + n > nblocks)
      n = nblocks - first;
    r.first = first;
    r.end = first + n;
    switch (rnd () % 3) {
    case 0:
      blockmap_forget (bm, first * bs, n * bs);
      ref_set (&ref, r, BM_UNKNOWN);
      break;
    case 1:
      blockmap_learn_allocated (bm, first * bs, n * bs);
      for (b = r.first; b < r.end; b++)
        if (ref.st[b] == BM_UNKNOWN)
          ref.st[b] = BM_ALLOCATED;
      break;
    default:
      snap = blockmap_snapshot (bm);
      blockmap_learn_data (bm, snap, first * bs, n * bs);
      ref_learn_data (&ref, snap, first * bs, n * bs);
    }
    if (i % 1000 == 0)
      ref_compare (bm, &ref, "many runs edit");
  }
  ref_compare (bm, &ref, "many runs edits");

  /* Collapse everything: one run, memory given back. */
  blockmap_forget (bm, 0, size);
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, 1);
  CHECK (stats.memory < 256 * 1024);

  ref_free (&ref);
  blockmap_free (bm);
  printf ("many runs: ok\n");
}

/*----------------------------------------------------------------------
 * Threads on disjoint ranges.
 */

#define NTHREADS 4
#define THREAD_BLOCKS 2048
#define THREAD_OPS 20000
static const uint32_t thread_bs = 4096;

struct thread_data {
  pthread_t tid;
  struct blockmap *bm;
  unsigned idx;
  uint64_t seed;
  unsigned char st[THREAD_BLOCKS];      /* local model of our range */
  unsigned fails;
  unsigned long learnt, refused;
};

static void *
thread_main (void *vp)
{
  struct thread_data *td = vp;
  const uint64_t base = (uint64_t) td->idx * THREAD_BLOCKS;
  const uint64_t bs = thread_bs;
  unsigned op;

  for (op = 0; op < THREAD_OPS && td->fails == 0; op++) {
    uint64_t first = rnd_r (&td->seed) % THREAD_BLOCKS;
    uint64_t n = 1 + rnd_r (&td->seed) % 64, b;
    uint64_t off = (base + first) * bs, snap, t, got, exp = 0;
    uint64_t sel = rnd_r (&td->seed) % 6;

    if (first + n > THREAD_BLOCKS)
      n = THREAD_BLOCKS - first;

    switch (sel) {
    case 0:                     /* a write, learning attempted meanwhile */
      t = blockmap_write_begin (td->bm, off, n * bs, BM_DATA);
      snap = blockmap_snapshot (td->bm);
      if (blockmap_learn_zero (td->bm, snap, off, n * bs) != 0 ||
          blockmap_is_zero (td->bm, off, bs))
        td->fails++;
      blockmap_write_end (td->bm, t, rnd_r (&td->seed) % 4 != 0);
      /* Recompute from the map below: DATA or UNKNOWN, never ZERO. */
      for (b = first; b < first + n; b++)
        td->st[b] = 255;
      break;
    case 1:
    case 2:                     /* a zero request that succeeded */
      snap = blockmap_snapshot (td->bm);
      for (b = first; b < first + n; b++)
        if (td->st[b] != BM_ZERO)
          exp += bs;
      got = blockmap_learn_zero (td->bm, snap, off, n * bs);
      if (got == exp) {
        for (b = first; b < first + n; b++)
          td->st[b] = BM_ZERO;
        td->learnt++;
      }
      else if (got == 0)
        td->refused++;          /* possible if other threads flooded the
                                 * record of writes (conservative) */
      else
        td->fails++;
      break;
    case 3:
      snap = blockmap_snapshot (td->bm);
      blockmap_learn_data (td->bm, snap, off, n * bs);
      for (b = first; b < first + n; b++)
        td->st[b] = BM_DATA;
      break;
    case 4:
      blockmap_learn_allocated (td->bm, off, n * bs);
      for (b = first; b < first + n; b++)
        if (td->st[b] == BM_UNKNOWN)
          td->st[b] = BM_ALLOCATED;
      break;
    default:
      blockmap_forget (td->bm, off, n * bs);
      for (b = first; b < first + n; b++)
        td->st[b] = BM_UNKNOWN;
    }

    /* Check the range we touched against the local model. */
    for (b = first; b < first + n; b++) {
      uint64_t run;
      enum bm_state st = blockmap_lookup (td->bm, (base + b) * bs, bs, &run);

      if (td->st[b] == 255) {
        if (st != BM_DATA && st != BM_UNKNOWN)
          td->fails++;
        td->st[b] = st;
      }
      else if (st != td->st[b] || run != bs)
        td->fails++;
    }
  }
  return NULL;
}

static void
test_threads (void)
{
  struct blockmap *bm;
  struct thread_data td[NTHREADS];
  struct blockmap_stats stats;
  uint64_t bytes[4] = { 0 }, runs = 1, prev = 256, b;
  unsigned i, k;
  unsigned long learnt = 0, refused = 0;
  double t0;

  /* One extra block at the end, never touched by any thread. */
  bm = new_map ((NTHREADS * THREAD_BLOCKS + 1) * (uint64_t) thread_bs - 7,
                thread_bs);
  t0 = now ();
  for (i = 0; i < NTHREADS; i++) {
    int err;

    td[i].bm = bm;
    td[i].idx = i;
    td[i].seed = UINT64_C (0x1234567) * (i + 1);
    td[i].fails = 0;
    td[i].learnt = td[i].refused = 0;
    memset (td[i].st, BM_UNKNOWN, sizeof td[i].st);
    err = pthread_create (&td[i].tid, NULL, thread_main, &td[i]);
    if (err != 0) {
      fprintf (stderr, "pthread_create: %s\n", strerror (err));
      exit (EXIT_FAILURE);
    }
  }
  for (i = 0; i < NTHREADS; i++) {
    pthread_join (td[i].tid, NULL);
    if (td[i].fails)
      FAIL ("thread %u: %u failed checks", i, td[i].fails);
    learnt += td[i].learnt;
    refused += td[i].refused;
  }

  /* The whole map against the union of the local models. */
  for (i = 0; i < NTHREADS; i++)
    for (k = 0; k < THREAD_BLOCKS; k++) {
      uint64_t run;
      enum bm_state st;

      b = (uint64_t) i * THREAD_BLOCKS + k;
      st = blockmap_lookup (bm, b * thread_bs, thread_bs, &run);
      if (st != td[i].st[k] || run != thread_bs)
        FAIL ("after threads: block %" PRIu64 " is %s, expected %s",
              b, state_names[st], state_names[td[i].st[k]]);
      bytes[st] += thread_bs;
      if (prev != 256 && st != prev)
        runs++;
      prev = st;
    }
  if (prev != BM_UNKNOWN)
    runs++;
  bytes[BM_UNKNOWN] += thread_bs - 7;
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, runs);
  for (k = 0; k < 4; k++)
    CHECK_EQ (stats.bytes[k], bytes[k]);
  EXPECT_STATE (bm, NTHREADS * THREAD_BLOCKS * (uint64_t) thread_bs,
                thread_bs - 7, BM_UNKNOWN);

  blockmap_free (bm);
  printf ("threads: %d x %d ops in %.2f s (zero learnt %lu, "
          "refused %lu): ok\n",
          NTHREADS, THREAD_OPS, now () - t0, learnt, refused);
}

/* Contention on the same blocks: writers check that none of their blocks
 * becomes ZERO while their write is in flight, while learners keep
 * learning zero over the whole range (with fresh and stale snapshots).
 */
#define CONTENTION_BLOCKS 64
#define CONTENTION_WRITES 20000

struct contention {
  struct blockmap *bm;
  uint64_t seed;
  atomic_int *stop;
  unsigned long violations, learnt;
};

static void *
contention_writer (void *vp)
{
  struct contention *c = vp;
  unsigned i;

  for (i = 0; i < CONTENTION_WRITES; i++) {
    uint64_t first = rnd_r (&c->seed) % CONTENTION_BLOCKS;
    uint64_t n = 1 + rnd_r (&c->seed) % 8, b, t;

    if (first + n > CONTENTION_BLOCKS)
      n = CONTENTION_BLOCKS - first;
    t = blockmap_write_begin (c->bm, first * 512 + 1, n * 512 - 2,
                              rnd_r (&c->seed) % 2 ? BM_DATA : BM_UNKNOWN);
    for (b = first; b < first + n; b++) {
      uint64_t run;

      if (blockmap_lookup (c->bm, b * 512, 512, &run) == BM_ZERO)
        c->violations++;
    }
    if (blockmap_is_zero (c->bm, first * 512, n * 512))
      c->violations++;
    blockmap_write_end (c->bm, t, rnd_r (&c->seed) % 8 != 0);
  }
  return NULL;
}

static void *
contention_learner (void *vp)
{
  struct contention *c = vp;
  uint64_t stale = blockmap_snapshot (c->bm);

  while (!atomic_load (c->stop)) {
    uint64_t snap = blockmap_snapshot (c->bm);

    c->learnt += blockmap_learn_zero (c->bm, snap, 0,
                                      CONTENTION_BLOCKS * 512) != 0;
    blockmap_learn_zero (c->bm, stale, 0, CONTENTION_BLOCKS * 512);
    if (rnd_r (&c->seed) % 16 == 0)
      stale = snap;
    if (rnd_r (&c->seed) % 4 == 0)
      blockmap_learn_data (c->bm, snap, (rnd_r (&c->seed) % 64) * 512, 512);
  }
  return NULL;
}

static void
test_contention (void)
{
  struct blockmap *bm = new_map (CONTENTION_BLOCKS * 512, 512);
  struct contention c[4];
  pthread_t tid[4];
  atomic_int stop = 0;
  unsigned i;
  unsigned long learnt = 0;

  for (i = 0; i < 4; i++) {
    c[i].bm = bm;
    c[i].seed = UINT64_C (0xabcdef) * (i + 7);
    c[i].stop = &stop;
    c[i].violations = c[i].learnt = 0;
    if (pthread_create (&tid[i], NULL,
                        i < 2 ? contention_writer : contention_learner,
                        &c[i]) != 0) {
      perror ("pthread_create");
      exit (EXIT_FAILURE);
    }
  }
  pthread_join (tid[0], NULL);
  pthread_join (tid[1], NULL);
  atomic_store (&stop, 1);
  pthread_join (tid[2], NULL);
  pthread_join (tid[3], NULL);
  for (i = 0; i < 4; i++) {
    if (c[i].violations)
      FAIL ("contention: %lu blocks ZERO during a write in flight",
            c[i].violations);
    learnt += c[i].learnt;
  }
  if (blockmap_check (bm) == -1)
    FAIL ("%s", "contention: map inconsistent");
  blockmap_free (bm);
  printf ("contention: 2 writers x %d writes, %lu successful learns: ok\n",
          CONTENTION_WRITES, learnt);
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
  struct blockmap *bm;
  struct blockmap_stats stats;
  unsigned i, *order;
  double t0, t_build, t_walk, t_rand;
  uint64_t snap, offset, nlookups;

  /* In order: zero, data, zero, data ... (the last extent runs to the end). */
  bm = new_map (size, bs);
  t0 = now ();
  snap = blockmap_snapshot (bm);
  for (i = 0; i < nextents; i++) {
    uint64_t off = i * ext * bs;
    uint64_t len = i == nextents - 1 ? size - off : ext * bs;

    if (i % 2 == 0)
      blockmap_learn_zero (bm, snap, off, len);
    else
      blockmap_learn_data (bm, snap, off, len);
  }
  t_build = now () - t0;
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, nextents);
  CHECK (stats.memory < 8 * 1024 * 1024);
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
  bm = new_map (size, bs);
  t0 = now ();
  snap = blockmap_snapshot (bm);
  for (i = 0; i < nextents; i++) {
    uint64_t off = order[i] * ext * bs;
    uint64_t len = order[i] == nextents - 1 ? size - off : ext * bs;

    if (order[i] % 2 == 0)
      blockmap_learn_zero (bm, snap, off, len);
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
  blockmap_write_end (bm, blockmap_write_begin (bm, 0, size, BM_DATA), true);
  blockmap_get_stats (bm, &stats);
  CHECK_EQ (stats.runs, 1);
  CHECK_EQ (stats.bytes[BM_DATA], size);
  printf ("1 TiB map: write over everything %.3f s, memory after %" PRIu64
          " bytes\n", now () - t0, stats.memory);

  free (order);
  blockmap_free (bm);
}

int
main (void)
{
  test_arguments ();
  test_rounding ();
  test_races ();
  test_huge ();
  test_random ();
  test_many_runs ();
  test_threads ();
  test_contention ();
  test_memory ();

  if (failures) {
    fprintf (stderr, "test-blockmap: %u failure(s)\n", failures);
    exit (EXIT_FAILURE);
  }
  printf ("test-blockmap: PASS\n");
  exit (EXIT_SUCCESS);
}
