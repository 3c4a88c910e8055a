/* sparsebackup: unit tests of common/blockmap.c, driven through a real
 * change tracker (common/changes.c) exactly like the filter does
 * (helpers in blockmap-test-lib.h).  Threads:
 *
 *  - multi-threaded stress on disjoint ranges, and contention.
 *
 * The other block map tests: test-blockmap.c (fixed cases),
 * test-blockmap-model.c (against a reference model),
 * test-blockmap-memory.c (budget and memory bound).
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

#define TEST_NAME "test-blockmap-threads"
#include "blockmap-test-lib.h"

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
  struct changes *ch;
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
    bool ok;

    if (first + n > THREAD_BLOCKS)
      n = THREAD_BLOCKS - first;

    switch (sel) {
    case 0:                     /* a write, learning attempted meanwhile */
      t = cbegin (td->ch, td->bm, off, n * bs, BM_DATA);
      snap = changes_snapshot (td->ch);
      if (blockmap_learn_zero (td->bm, snap, 0, off, n * bs, true) != 0 ||
          blockmap_is_zero (td->bm, off, bs))
        td->fails++;
      ok = rnd_r (&td->seed) % 4 != 0;
      cend (td->ch, td->bm, t, off, n * bs, ok);
      for (b = first; b < first + n; b++)
        td->st[b] = ok ? BM_DATA : BM_TRIMMED;
      break;
    case 1:
    case 2:                     /* a zero request that succeeded */
      for (b = first; b < first + n; b++)
        exp += bs;              /* none ZERO after blockmap_change */
      t = cbegin (td->ch, td->bm, off, n * bs, BM_UNKNOWN);
      snap = changes_snapshot (td->ch);
      got = blockmap_learn_zero (td->bm, snap, t, off, n * bs, true);
      cend (td->ch, td->bm, t, off, n * bs, true);
      if (got == exp) {
        for (b = first; b < first + n; b++)
          td->st[b] = BM_ZERO;
        td->learnt++;
      }
      else if (got == 0) {
        /* Possible if other threads flooded the tracker's history:
         * the blocks only lost ZERO.
         */
        for (b = first; b < first + n; b++)
          if (td->st[b] == BM_ZERO)
            td->st[b] = BM_UNKNOWN;
        td->refused++;
      }
      else
        td->fails++;
      break;
    case 3:
      snap = changes_snapshot (td->ch);
      blockmap_learn_data (td->bm, snap, off, n * bs);
      /* A ZERO block stays ZERO if the tracker cannot tell whether a
       * change touched it (the other threads may have flooded its
       * history meanwhile): then take what the map says.
       */
      for (b = first; b < first + n; b++) {
        uint64_t run;

        if (td->st[b] == BM_ZERO &&
            blockmap_lookup (td->bm, (base + b) * bs, bs, &run) == BM_ZERO)
          continue;
        td->st[b] = BM_DATA;
      }
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
        td->st[b] = BM_TRIMMED;
    }

    /* Check the range we touched against the local model. */
    for (b = first; b < first + n; b++) {
      uint64_t run;
      enum bm_state st = blockmap_lookup (td->bm, (base + b) * bs, bs, &run);

      if (st != td->st[b] || run != bs)
        td->fails++;
    }
  }
  return NULL;
}

static void
test_threads (void)
{
  struct changes *ch = new_changes (CHANGES_HISTORY);
  struct blockmap *bm;
  struct thread_data td[NTHREADS];
  struct blockmap_stats stats;
  uint64_t bytes[BM_NSTATES] = { 0 }, runs = 1, prev = 256, b;
  unsigned i, k;
  unsigned long learnt = 0, refused = 0;
  double t0;

  /* One extra block at the end, never touched by any thread. */
  bm = new_map ((NTHREADS * THREAD_BLOCKS + 1) * (uint64_t) thread_bs - 7,
                thread_bs, ch);
  t0 = now ();
  for (i = 0; i < NTHREADS; i++) {
    int err;

    td[i].bm = bm;
    td[i].ch = ch;
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
  for (k = 0; k < BM_NSTATES; k++)
    CHECK_EQ (stats.bytes[k], bytes[k]);
  EXPECT_STATE (bm, NTHREADS * THREAD_BLOCKS * (uint64_t) thread_bs,
                thread_bs - 7, BM_UNKNOWN);

  blockmap_free (bm);
  changes_free (ch);
  printf ("threads: %d x %d ops in %.2f s (zero learnt %lu, "
          "refused %lu): ok\n",
          NTHREADS, THREAD_OPS, now () - t0, learnt, refused);
}

/* Contention on the same blocks: writers check that none of their blocks
 * becomes ZERO while their change is in flight, while learners keep
 * learning zero over the whole range (fresh and stale snapshots, contents
 * true and false) and learning data.
 */
#define CONTENTION_BLOCKS 64
#define CONTENTION_WRITES 20000

struct contention {
  struct blockmap *bm;
  struct changes *ch;
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
    t = cbegin (c->ch, c->bm, first * 512 + 1, n * 512 - 2,
                rnd_r (&c->seed) % 2 ? BM_DATA : BM_UNKNOWN);
    for (b = first; b < first + n; b++) {
      uint64_t run;

      if (blockmap_lookup (c->bm, b * 512, 512, &run) == BM_ZERO)
        c->violations++;
    }
    if (blockmap_is_zero (c->bm, first * 512, n * 512))
      c->violations++;
    cend (c->ch, c->bm, t, first * 512 + 1, n * 512 - 2,
          rnd_r (&c->seed) % 8 != 0);
  }
  return NULL;
}

static void *
contention_learner (void *vp)
{
  struct contention *c = vp;
  uint64_t stale = changes_snapshot (c->ch);

  while (!atomic_load (c->stop)) {
    uint64_t snap = changes_snapshot (c->ch);
    bool contents = rnd_r (&c->seed) % 2;

    c->learnt += blockmap_learn_zero (c->bm, snap, 0, 0,
                                      CONTENTION_BLOCKS * 512,
                                      contents) != 0;
    blockmap_learn_zero (c->bm, stale, 0, 0, CONTENTION_BLOCKS * 512,
                         !contents);
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
  struct changes *ch = new_changes (CHANGES_HISTORY);
  struct blockmap *bm = new_map (CONTENTION_BLOCKS * 512, 512, ch);
  struct contention c[4];
  pthread_t tid[4];
  atomic_int stop = 0;
  unsigned i;
  unsigned long learnt = 0;
  double t0 = now ();

  for (i = 0; i < 4; i++) {
    c[i].bm = bm;
    c[i].ch = ch;
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
      FAIL ("contention: %lu blocks ZERO during a change in flight",
            c[i].violations);
    learnt += c[i].learnt;
  }
  if (blockmap_check (bm) == -1)
    FAIL ("%s", "contention: map inconsistent");
  blockmap_free (bm);
  changes_free (ch);
  printf ("contention: 2 writers x %d changes, %lu successful learns, "
          "%.2f s: ok\n", CONTENTION_WRITES, learnt, now () - t0);
}

int
main (void)
{
  double t0 = now ();

  test_threads ();
  test_contention ();

  if (failures) {
    fprintf (stderr, "test-blockmap-threads: %u failure(s)\n", failures);
    exit (EXIT_FAILURE);
  }
  printf ("test-blockmap-threads: PASS (%.2f s)\n", now () - t0);
  exit (EXIT_SUCCESS);
}
