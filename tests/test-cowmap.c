/* sparsebackup: unit test of the frozen disk's granule states
 * (common/cowmap.c).
 *
 * 1. The states, runs, checks, reservations and breaking, step by step.
 * 2. The protocol under threads: a simulated disk (one value per
 *    granule) written by writers that save before they write (some of
 *    their saves fail and are undone, the write then not issued, as
 *    with fail-write), read by readers that follow cowmap.h (run; read
 *    the scratch, zeros or the disk, slowly; check).  Every value a
 *    reader accepts must be the value at the freeze; at the end every
 *    granule that changed must be saved with its old value.  With
 *    COWMAP_TEST_NO_CHECK=1 the readers skip cowmap_check: the test
 *    must then find wrong reads (a check that the model can fail).
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowmap.h"

#define TEST_NAME "test-cowmap"
#define TEST_RNG_SEED 0x5eed
#include "unit-test.h"

#define GB 12                   /* 4K granules */
#define GS (UINT64_C (1) << GB)

static void
steps (void)
{
  const uint64_t size = 10 * GS + 100;   /* 11 granules, a partial last */
  struct cowmap *m = cowmap_new (size, GB);
  uint64_t cur = 0, a, b, rend;
  char why[COWMAP_REASON_MAX];

  CHECK (m != NULL);
  CHECK_EQ (cowmap_granules (m), 11);
  CHECK (cowmap_claim (m, &cur, 100, 4, &a, &b) == 1);
  CHECK (a == 0 && b == 4 && cur == 4);
  CHECK (cowmap_claim (m, &cur, 100, 4, &a, &b) == 1);
  CHECK (a == 4 && b == 8);
  /* BUSY granules end runs and fail checks. */
  CHECK (cowmap_check (m, 8 * GS, size) == size);
  CHECK (cowmap_check (m, 3 * GS + 5, size) == 3 * GS + 5);
  cowmap_set_zero (m, 5);
  cowmap_done (m, 4, 8, 8);
  cowmap_done (m, 0, 2, 4);             /* 2, 3: saving failed */
  CHECK (cowmap_run (m, 100, size, &rend) == COW_SAVED && rend == 2 * GS);
  CHECK (cowmap_run (m, 2 * GS, size, &rend) == COW_UNSAVED &&
         rend == 4 * GS);
  CHECK (cowmap_run (m, 4 * GS, size, &rend) == COW_SAVED && rend == 5 * GS);
  CHECK (cowmap_run (m, 5 * GS, size, &rend) == COW_ZERO && rend == 6 * GS);
  CHECK (cowmap_run (m, 6 * GS, 7 * GS + 1, &rend) == COW_SAVED &&
         rend == 7 * GS + 1);
  CHECK (cowmap_run (m, 8 * GS, UINT64_MAX, &rend) == COW_UNSAVED &&
         rend == size);
  CHECK (cowmap_check (m, 2 * GS, 4 * GS) == 4 * GS);
  CHECK (cowmap_check (m, 2 * GS, 5 * GS) == 4 * GS);
  /* A claim skips saved granules and takes the failed ones again. */
  cur = 0;
  CHECK (cowmap_claim (m, &cur, 6, 10, &a, &b) == 1 && a == 2 && b == 4);
  CHECK (cowmap_claim (m, &cur, 6, 10, &a, &b) == 0 && cur == 6);
  cowmap_done (m, 2, 4, 4);
  cur = 9;
  CHECK (cowmap_claim (m, &cur, 50, 10, &a, &b) == 1 && a == 9 && b == 11);
  cowmap_done (m, 9, 11, 11);
  /* Compact storage: slots in the order stored, the limit in bytes. */
  {
    uint64_t slot = 99;

    CHECK (cowmap_slot (m, 7) == UINT64_MAX);
    CHECK (cowmap_store (m, 7, 9, 100, 150, &slot) == 0 && slot == 0);
    errno = 0;
    CHECK (cowmap_store (m, 1, 2, 60, 150, &slot) == -1 && errno == ENOSPC);
    CHECK (cowmap_store (m, 11, 12, 1, 150, &slot) == -1 && errno == EINVAL);
    CHECK (cowmap_store (m, 3, 4, 50, 150, &slot) == 0 && slot == 2);
    CHECK (cowmap_slot (m, 7) == 0 && cowmap_slot (m, 8) == 1);
    CHECK (cowmap_slot (m, 3) == 2 && cowmap_slot (m, 1) == UINT64_MAX);
    CHECK_EQ (cowmap_slots (m), 3);
    cowmap_unstore (m, 90);
    CHECK_EQ (cowmap_used (m), 60);
  }
  /* Breaking. */
  CHECK (!cowmap_broken (m, why, sizeof why) && why[0] == '\0');
  CHECK (cowmap_break (m, "the scratch is full"));
  CHECK (!cowmap_break (m, "another reason"));
  CHECK (cowmap_broken (m, why, sizeof why));
  CHECK (strcmp (why, "the scratch is full") == 0);
  cur = 8;
  CHECK (cowmap_claim (m, &cur, 11, 10, &a, &b) == 0);
  CHECK (cowmap_check (m, 8 * GS, 9 * GS) == 8 * GS);
  cowmap_free (m);

  errno = 0;
  CHECK (cowmap_new (0, GB) == NULL && errno == EINVAL);
  CHECK (cowmap_new (1000, 3) == NULL && errno == EINVAL);
  m = cowmap_new (1, 9);
  CHECK (m != NULL && cowmap_granules (m) == 1);
  cowmap_free (m);
  cowmap_free (NULL);
}

/* Runs and checks across word boundaries against a reference kept here:
 * random claims, done points and zero marks on one thread, then random
 * cowmap_run / cowmap_check / cowmap_claim queries.
 */
static void
words (void)
{
  enum { N = 1000 };
  const uint64_t size = (uint64_t) (N - 1) * GS + 77;
  struct cowmap *m = cowmap_new (size, GB);
  enum cow_state ref[N];
  bool busy[N] = { false };

  memset (ref, 0, sizeof ref);          /* COW_UNSAVED */
  for (int i = 0; i < 300; ++i) {
    uint64_t cur = rnd () % N, end = cur + 1 + rnd () % 150, a, b;

    if (cowmap_claim (m, &cur, end, 1 + rnd () % 100, &a, &b) == 1) {
      uint64_t done = a + rnd () % (b - a + 1);

      for (uint64_t g = a; g < b; ++g) {
        if (ref[g] != COW_UNSAVED || busy[g])
          FAIL ("claimed granule %" PRIu64 " is not unsaved", g);
        if (g < done && rnd () % 3 == 0) {
          cowmap_set_zero (m, g);
          ref[g] = COW_ZERO;
        }
        else if (g < done)
          ref[g] = COW_SAVED;
      }
      cowmap_done (m, a, done, b);
    }
  }
  /* A few runs left BUSY, in disjoint ranges (a claim would wait). */
  for (uint64_t r = 0; r < 3; ++r) {
    uint64_t cur = 100 + r * 300, a, b;

    if (cowmap_claim (m, &cur, cur + 60, 20, &a, &b) == 1)
      for (uint64_t g = a; g < b; ++g)
        busy[g] = true;
  }
  for (int i = 0; i < 20000; ++i) {
    uint64_t pos = rnd () % size, end = pos + 1 + rnd () % (300 * GS);
    uint64_t g = pos >> GB, want_end, want_check, rend;
    enum cow_state st;

    end = end > size ? size : end;
    if (busy[g])
      continue;                         /* cowmap_run would wait */
    st = cowmap_run (m, pos, end, &rend);
    for (want_end = g + 1; (want_end << GB) < end &&
           !busy[want_end] && ref[want_end] == ref[g]; want_end++)
      ;
    want_end = want_end << GB < end ? want_end << GB : end;
    if (st != ref[g] || rend != want_end)
      FAIL ("run at %" PRIu64 ": state %d to %" PRIu64 ", expected %d to %"
            PRIu64, pos, st, rend, ref[g], want_end);
    for (want_check = g; (want_check << GB) < end &&
           ref[want_check] == COW_UNSAVED && !busy[want_check]; want_check++)
      ;
    want_check = want_check << GB < end ? want_check << GB : end;
    if (want_check < pos)
      want_check = pos;
    if (cowmap_check (m, pos, end) != want_check)
      FAIL ("check at %" PRIu64 ": %" PRIu64 ", expected %" PRIu64, pos,
            cowmap_check (m, pos, end), want_check);
  }
  cowmap_free (m);
}

/* ---- The model -------------------------------------------------------- */

#define NG 4096                 /* granules */
#define WRITERS 3
#define READERS 3
#define OPS 2000

static struct cowmap *map;
static _Atomic uint32_t disk[NG];     /* the live disk */
static uint32_t frozen[NG];           /* the truth at the freeze */
static _Atomic uint32_t scratch[NG];  /* saved old values */
static _Atomic uint64_t bad_reads, reads_checked, retries, failed_saves;
static _Atomic uint32_t next_value = 1000;
static bool no_check;

static void *
writer (void *arg)
{
  uint64_t rs = (uintptr_t) arg * 7919 + 1;

  for (int i = 0; i < OPS; ++i) {
    uint64_t g0 = rnd_r (&rs) % NG, n = 1 + rnd_r (&rs) % 8;
    uint64_t g1 = g0 + n > NG ? NG : g0 + n, cur = g0, a, b;
    bool refused = false;

    while (cowmap_claim (map, &cur, g1, 1 + rnd_r (&rs) % 4, &a, &b)) {
      uint64_t done = b;

      if (rnd_r (&rs) % 50 == 0) {      /* saving fails part way */
        done = a + rnd_r (&rs) % (b - a);
        refused = true;
      }
      for (uint64_t g = a; g < done; ++g) {
        uint32_t v = atomic_load (&disk[g]);

        atomic_store (&scratch[g], v);
        if (v == 0)
          cowmap_set_zero (map, g);
      }
      if (rnd_r (&rs) % 4 == 0)
        sched_yield ();
      cowmap_done (map, a, done, b);
      if (refused)
        break;
    }
    if (refused) {                      /* the change is not issued */
      atomic_fetch_add (&failed_saves, 1);
      continue;
    }
    for (uint64_t g = g0; g < g1; ++g)  /* the change: new data or zero */
      atomic_store (&disk[g], rnd_r (&rs) % 5 == 0 ? 0 :
                    atomic_fetch_add (&next_value, 1));
  }
  return NULL;
}

static void
accept_value (uint64_t g, uint32_t v)
{
  atomic_fetch_add (&reads_checked, 1);
  if (v != frozen[g])
    atomic_fetch_add (&bad_reads, 1);
}

static void *
reader (void *arg)
{
  uint64_t rs = (uintptr_t) arg * 104729 + 3;
  uint32_t got[NG];

  for (int i = 0; i < OPS; ++i) {
    uint64_t pos = rnd_r (&rs) % (NG * GS);
    uint64_t end = pos + 1 + rnd_r (&rs) % (16 * GS);

    if (end > NG * GS)
      end = NG * GS;
    while (pos < end) {
      uint64_t rend, good, g;
      enum cow_state st = cowmap_run (map, pos, end, &rend);

      if (st == COW_ZERO) {
        for (g = pos >> GB; (g << GB) < rend; ++g)
          accept_value (g, 0);
        pos = rend;
        continue;
      }
      if (st == COW_SAVED) {
        for (g = pos >> GB; (g << GB) < rend; ++g)
          accept_value (g, atomic_load (&scratch[g]));
        pos = rend;
        continue;
      }
      /* UNSAVED: read the disk, slowly (a change may land meanwhile). */
      for (g = pos >> GB; (g << GB) < rend; ++g) {
        got[g] = atomic_load (&disk[g]);
        if (rnd_r (&rs) % 3 == 0)
          sched_yield ();
      }
      good = no_check ? rend : cowmap_check (map, pos, rend);
      if (good < rend)
        atomic_fetch_add (&retries, 1);
      /* (Nothing when the check failed at the first granule: it then
       * returns POS itself, which may be inside that granule.)
       */
      for (g = pos >> GB; good > pos && (g << GB) < good; ++g)
        accept_value (g, got[g]);
      pos = good;
    }
  }
  return NULL;
}

static void
model (void)
{
  pthread_t w[WRITERS], r[READERS];
  uint64_t changed = 0;

  map = cowmap_new (NG * GS, GB);
  CHECK (map != NULL);
  for (int g = 0; g < NG; ++g) {
    frozen[g] = rnd () % 4 == 0 ? 0 : (uint32_t) (g + 1);
    atomic_store (&disk[g], frozen[g]);
  }
  for (uintptr_t i = 0; i < READERS; ++i)
    pthread_create (&r[i], NULL, reader, (void *) i);
  for (uintptr_t i = 0; i < WRITERS; ++i)
    pthread_create (&w[i], NULL, writer, (void *) i);
  for (int i = 0; i < WRITERS; ++i)
    pthread_join (w[i], NULL);
  for (int i = 0; i < READERS; ++i)
    pthread_join (r[i], NULL);

  /* Every changed granule was saved first, with its old value. */
  for (uint64_t g = 0; g < NG; ++g) {
    uint64_t rend;
    enum cow_state st = cowmap_run (map, g * GS, (g + 1) * GS, &rend);

    if (atomic_load (&disk[g]) == frozen[g] && st == COW_UNSAVED)
      continue;
    changed++;
    if (st == COW_UNSAVED)
      FAIL ("granule %" PRIu64 " changed but is not saved", g);
    else if (st == COW_ZERO ? frozen[g] != 0
             : atomic_load (&scratch[g]) != frozen[g])
      FAIL ("granule %" PRIu64 " saved wrong", g);
  }
  printf ("test-cowmap: model: %" PRIu64 " values read and checked, %"
          PRIu64 " wrong, %" PRIu64 " re-reads after a check, %" PRIu64
          " refused changes, %" PRIu64 " of %d granules saved\n",
          (uint64_t) reads_checked, (uint64_t) bad_reads, (uint64_t) retries,
          (uint64_t) failed_saves, changed, NG);
  CHECK (reads_checked > 0 && changed > NG / 2 && failed_saves > 0);
  cowmap_free (map);
}

int
main (void)
{
  const char *e = getenv ("COWMAP_TEST_NO_CHECK");

  no_check = e && strcmp (e, "1") == 0;
  steps ();
  words ();
  model ();
  if (no_check) {
    /* The negative control: wrong reads must have been seen. */
    printf ("test-cowmap: without cowmap_check: %" PRIu64 " wrong reads\n",
            (uint64_t) bad_reads);
    return bad_reads > 0 ? 0 : 1;
  }
  if (bad_reads > 0)
    FAIL ("%" PRIu64 " values read differ from the frozen disk",
          (uint64_t) bad_reads);
  printf ("test-cowmap: %s\n", failures ? "FAIL" : "PASS");
  return failures ? 1 : 0;
}
