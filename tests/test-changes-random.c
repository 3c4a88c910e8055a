/* sparsebackup: unit tests of common/changes.c (the change tracker):
 * allocation failures, the model and threads.
 *
 *  - untracked changes: changes_begin out of memory;
 *  - a randomized comparison against a reference that keeps every change
 *    with its begin and end generations;
 *  - a multi-threaded soundness test: unchanged() never reports a byte
 *    touched by a change that was in flight at some time between the
 *    learner's snapshot and its query.
 *
 * The fixed cases are in test-changes.c; the shared helpers in
 * changes-test-lib.h.
 *
 * Failures print a message; the exit status is 1 if anything failed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "changes.h"

#define TEST_NAME "test-changes-random"
#define TEST_RNG_SEED UINT64_C (0x9E3779B97F4A7C15)
#include "changes-test-lib.h"

/*----------------------------------------------------------------------
 * Untracked changes (out of memory in changes_begin).
 *
 * tests/Makefile.am links test-changes-random with -Wl,--wrap=realloc,
 * so that the tracker's in-flight array can be made to fail to grow.
 * Without the wrap (a hand-made build) the test is skipped.
 */

/* Weak: a build without the wrap links (and skips the test). */
extern void *__real_realloc (void *p, size_t n) __attribute__ ((weak));
void *__wrap_realloc (void *p, size_t n);
static atomic_int fail_realloc;

void *
__wrap_realloc (void *p, size_t n)
{
  if (atomic_load (&fail_realloc)) {
    errno = ENOMEM;
    return NULL;
  }
  return __real_realloc (p, n);
}

static void
test_untracked (void)
{
  struct changes *ch = new_changes (4);
  struct changes_stats st;
  struct parts p;
  uint64_t t, u = 0, fillers[10000], s;
  unsigned i, nf = 0;

  /* Fill the history: generations 1 .. 4. */
  for (i = 0; i < 4; i++) {
    t = begin (ch, 1000, 1);
    changes_end (ch, t);
  }
  /* Begin changes until the array must grow, and fails to. */
  atomic_store (&fail_realloc, 1);
  while (nf < 10000) {
    t = begin (ch, 5000, 1);
    changes_get_stats (ch, &st);
    if (st.untracked > 0) {
      u = t;
      break;
    }
    fillers[nf++] = t;
  }
  atomic_store (&fail_realloc, 0);
  if (u == 0) {
    printf ("untracked: skipped (realloc not wrapped)\n");
    for (i = 0; i < nf; i++)
      changes_end (ch, fillers[i]);
    changes_free (ch);
    return;
  }
  CHECK (u != 0);
  for (i = 0; i < nf; i++)
    changes_end (ch, fillers[i]);
  /* While it is in flight, every question is refused. */
  s = changes_snapshot (ch);
  CHECK_EQ (unchanged (ch, s, 0, 0, 100, &p), 0);
  CHECK_EQ (unchanged (ch, s, u, 0, 100, &p), 0);
  changes_end (ch, u);
  /* Its range is unknown: a snapshot from before it ended never learns. */
  CHECK_EQ (unchanged (ch, s, 0, 0, 100, &p), 0);
  CHECK_EQ (unchanged (ch, changes_snapshot (ch), 0, 0, 100, &p), 100);
  /* ... not even after the history moved on.  KNOWN BUG: push_event sets
   * lost_gen to the overwritten event's generation (older than S), which
   * moves lost_gen back below S: S is answered again, as if the untracked
   * change had never happened.  (Fix: lost_gen = MAX (lost_gen, gen).)
   */
  t = begin (ch, 9000, 1);
  changes_end (ch, t);
  CHECK_EQ (unchanged (ch, s, 0, 0, 100, &p), 0);
  changes_get_stats (ch, &st);
  CHECK_EQ (st.untracked, 1);
  CHECK_EQ (st.inflight, 0);
  changes_free (ch);
  printf ("untracked: done\n");
}

/*----------------------------------------------------------------------
 * Random model test.
 */

#define REF_MAX 20000

struct ref_change {
  uint64_t ticket;
  uint64_t start, end;
  uint64_t begin_gen;           /* generation when it began */
  uint64_t end_gen;             /* 0 while in flight */
};

struct ref {
  unsigned history;
  uint64_t gen;
  struct ref_change c[REF_MAX];
  unsigned n;
  uint64_t ended_gens[REF_MAX]; /* generations of ended changes, in order */
  unsigned nended;
  uint64_t refused, begun;
};

static struct ref ref;
static unsigned failures_before;   /* failures before the random test */

static uint64_t
ref_lost_gen (void)
{
  if (ref.nended > ref.history)
    return ref.ended_gens[ref.nended - ref.history - 1];
  return 0;
}

/* The expected parts, straight from the definition. */
static uint64_t
ref_unchanged (uint64_t snap, uint64_t except, uint64_t offset,
               uint64_t count, struct parts *p)
{
  static uint64_t iv[REF_MAX][2];
  uint64_t end, cur, given = 0;
  unsigned i, n = 0;

  p->n = 0;
  if (count == 0)
    return 0;
  if (count > UINT64_MAX - offset)
    count = UINT64_MAX - offset;
  end = offset + count;
  if (snap > ref.gen || snap < ref_lost_gen ()) {
    ref.refused += count;
    return 0;
  }
  for (i = 0; i < ref.n; i++) {
    const struct ref_change *c = &ref.c[i];
    bool conflict = c->end_gen == 0 ? c->ticket != except : c->end_gen > snap;

    if (conflict && c->start < end && c->end > offset && c->start < c->end) {
      iv[n][0] = c->start < offset ? offset : c->start;
      iv[n][1] = c->end > end ? end : c->end;
      n++;
    }
  }
  qsort (iv, n, sizeof iv[0], cmp_u64pair);
  cur = offset;
  for (i = 0; i < n; i++) {
    if (iv[i][0] > cur) {
      p->off[p->n] = cur;
      p->len[p->n++] = iv[i][0] - cur;
      given += iv[i][0] - cur;
    }
    if (iv[i][1] > cur)
      cur = iv[i][1];
  }
  if (cur < end) {
    p->off[p->n] = cur;
    p->len[p->n++] = end - cur;
    given += end - cur;
  }
  ref.refused += count - given;
  return given;
}

static void
random_range (uint64_t space, uint64_t *offset, uint64_t *count)
{
  switch (rnd () % 10) {
  case 0:
    *offset = UINT64_MAX - rnd () % 2000;
    *count = rnd () % 3000;
    break;
  case 1:
    *offset = rnd () % space;
    *count = UINT64_MAX - rnd () % 10;
    break;
  case 2:
    *offset = rnd () % space;
    *count = 0;
    break;
  default:
    *offset = rnd () % space;
    *count = 1 + rnd () % (space / 4);
  }
}

static void
test_random_round (unsigned history, uint64_t space, unsigned nops)
{
  struct changes *ch = new_changes (history);
  struct parts got, exp;
  struct changes_stats st;
  uint64_t snaps[4] = { 0 };
  unsigned op, i, inflight;

  memset (&ref, 0, sizeof ref);
  ref.history = history;

  for (op = 0; op < nops && ref.n < REF_MAX && failures == failures_before;
       op++) {
    unsigned sel = rnd () % 100;
    uint64_t offset, count;

    inflight = 0;
    for (i = 0; i < ref.n; i++)
      inflight += ref.c[i].end_gen == 0;

    random_range (space, &offset, &count);
    /* Empty changes inside the space split parts (the known bug shown in
     * test_basic): left out here so the rest is still compared.
     */
    if (count == 0 && sel < 25)
      count = 1;
    if (sel < 25 && inflight < 12) {
      struct ref_change *c = &ref.c[ref.n++];

      c->ticket = begin (ch, offset, count);
      if (count > UINT64_MAX - offset)
        count = UINT64_MAX - offset;
      c->start = offset;
      c->end = offset + count;
      c->begin_gen = ref.gen;
      c->end_gen = 0;
      ref.begun++;
      for (i = 0; i + 1 < ref.n; i++)
        if (ref.c[i].ticket == c->ticket)
          FAIL ("ticket %" PRIu64 " given twice", c->ticket);
    }
    else if (sel < 50) {
      /* End a change in flight, sometimes one already ended. */
      unsigned k = 0, j;
      bool twice = rnd () % 10 == 0;

      for (j = 0; j < ref.n; j++)
        if ((ref.c[j].end_gen == 0) != twice && rnd () % 2 == 0) {
          k = j + 1;
          break;
        }
      if (k == 0)
        continue;
      changes_end (ch, ref.c[k - 1].ticket);
      if (!twice) {
        ref.c[k - 1].end_gen = ++ref.gen;
        ref.ended_gens[ref.nended++] = ref.gen;
      }
    }
    else if (sel < 60) {
      i = rnd () % 4;
      if (i > 0 || rnd () % 50 == 0)
        snaps[i] = changes_snapshot (ch);
      CHECK_EQ (changes_snapshot (ch), ref.gen);
    }
    else {
      uint64_t snap = snaps[rnd () % 4], except = 0, g, e;
      unsigned j;

      if (rnd () % 4 == 0) {
        /* Sometimes a snapshot from the future or a random one. */
        snap = rnd () % 2 ? ref.gen + 1 + rnd () % 3 : rnd () % (ref.gen + 1);
      }
      if (ref.n > 0 && rnd () % 3 == 0)
        except = ref.c[rnd () % ref.n].ticket;
      g = unchanged (ch, snap, except, offset, count, &got);
      e = ref_unchanged (snap, except, offset, count, &exp);
      if (g != e || got.n != exp.n)
        FAIL ("unchanged (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
              ") = %" PRIu64 " in %u parts, expected %" PRIu64 " in %u",
              snap, except, offset, count, g, got.n, e, exp.n);
      else
        for (j = 0; j < got.n; j++)
          if (got.off[j] != exp.off[j] || got.len[j] != exp.len[j]) {
            FAIL ("unchanged part %u = %" PRIu64 "+%" PRIu64 ", expected %"
                  PRIu64 "+%" PRIu64, j, got.off[j], got.len[j],
                  exp.off[j], exp.len[j]);
            break;
          }
    }

    changes_get_stats (ch, &st);
    inflight = 0;
    for (i = 0; i < ref.n; i++)
      inflight += ref.c[i].end_gen == 0;
    CHECK_EQ (st.inflight, inflight);
    CHECK_EQ (st.begun, ref.begun);
    CHECK_EQ (st.untracked, 0);
    CHECK_EQ (st.refused, ref.refused);
  }
  changes_free (ch);
}

static void
test_random (void)
{
  unsigned round;
  double t0 = now ();

  failures_before = failures;
  for (round = 0; round < 40 && failures == failures_before; round++) {
    static const unsigned hist[] = { 1, 3, 8, 64, CHANGES_HISTORY };
    static const uint64_t space[] = { 64, 4096, UINT64_C (1) << 40 };

    test_random_round (hist[round % 5], space[round % 3], 3000);
  }
  printf ("random vs reference: %u rounds, %.2f s\n", round, now () - t0);
}

/*----------------------------------------------------------------------
 * Threads.
 *
 * Each writer does one change at a time and logs it:
 *   changes_begin; B = ++clock; publish range + B; n++;
 *   ...; E = ++clock; publish E; changes_end.
 * A learner reads every writer's n (N0), then takes its snapshot, then
 * S1 = ++clock; ...; S2 = ++clock; changes_unchanged; then checks every
 * logged change i >= N0 - 1 (older ones ended before change N0 - 1
 * began, so before the snapshot) with B < S2 (its begin returned before
 * the query) and (E unpublished or E > S1) (its end was called after the
 * snapshot): it was in flight at some time between snapshot and query,
 * so no byte of it may be reported unchanged.
 */

#define T_WRITERS 4
#define T_LEARNERS 4
#define T_CHANGES 20000
#define T_SPACE 100000

struct wlog {
  _Atomic uint64_t start, end;
  _Atomic uint64_t b, e;
};

struct tw {
  pthread_t tid;
  struct changes *ch;
  uint64_t seed;
  _Atomic unsigned n;
  struct wlog *log;
};

static _Atomic uint64_t t_clock;
static atomic_int t_stop;
static struct tw writers[T_WRITERS];

static void *
writer_main (void *vp)
{
  struct tw *w = vp;
  unsigned i;

  for (i = 0; i < T_CHANGES; i++) {
    uint64_t off = rnd_r (&w->seed) % T_SPACE;
    uint64_t cnt = 1 + rnd_r (&w->seed) % 2000, t;
    struct wlog *l = &w->log[i];

    changes_begin (w->ch, off, cnt, &t);
    atomic_store (&l->start, off);
    atomic_store (&l->end, off + cnt);
    atomic_store (&l->b, atomic_fetch_add (&t_clock, 1) + 1);
    atomic_store (&w->n, i + 1);
    if (rnd_r (&w->seed) % 8 == 0)
      sched_yield ();
    atomic_store (&l->e, atomic_fetch_add (&t_clock, 1) + 1);
    changes_end (w->ch, t);
  }
  return NULL;
}

struct tl {
  pthread_t tid;
  struct changes *ch;
  uint64_t seed;
  unsigned long queries, answered, checked, violations;
  struct parts p;
};

static void *
learner_main (void *vp)
{
  struct tl *l = vp;

  while (!atomic_load (&t_stop)) {
    unsigned n0[T_WRITERS], k, j;
    uint64_t snap, s1, s2, off, cnt;

    for (k = 0; k < T_WRITERS; k++)
      n0[k] = atomic_load (&writers[k].n);
    snap = changes_snapshot (l->ch);
    s1 = atomic_fetch_add (&t_clock, 1) + 1;
    if (rnd_r (&l->seed) % 4 == 0)
      sched_yield ();
    off = rnd_r (&l->seed) % T_SPACE;
    cnt = 1 + rnd_r (&l->seed) % 20000;
    l->p.n = 0;
    l->p.overflow = false;
    s2 = atomic_fetch_add (&t_clock, 1) + 1;
    l->answered += changes_unchanged (l->ch, snap, 0, off, cnt,
                                      collect, &l->p);
    l->queries++;
    if (l->p.overflow)
      l->violations++;

    for (k = 0; k < T_WRITERS; k++) {
      unsigned n1 = atomic_load (&writers[k].n);
      unsigned i = n0[k] > 0 ? n0[k] - 1 : 0;

      for (; i < n1; i++) {
        const struct wlog *w = &writers[k].log[i];
        uint64_t b = atomic_load (&w->b), e = atomic_load (&w->e);
        uint64_t ws = atomic_load (&w->start), we = atomic_load (&w->end);

        if (b == 0 || b >= s2 || (e != 0 && e < s1))
          continue;
        l->checked++;
        for (j = 0; j < l->p.n; j++)
          if (l->p.off[j] < we && l->p.off[j] + l->p.len[j] > ws)
            l->violations++;
      }
    }
  }
  return NULL;
}

static void
test_threads (void)
{
  struct changes *ch = new_changes (CHANGES_HISTORY);
  struct tl learners[T_LEARNERS];
  struct parts p;
  unsigned long queries = 0, answered = 0, checked = 0;
  unsigned i;
  double t0 = now ();

  atomic_store (&t_clock, 0);
  atomic_store (&t_stop, 0);
  for (i = 0; i < T_WRITERS; i++) {
    writers[i].ch = ch;
    writers[i].seed = UINT64_C (0x1234567) * (i + 1);
    atomic_store (&writers[i].n, 0);
    writers[i].log = calloc (T_CHANGES, sizeof (struct wlog));
    if (writers[i].log == NULL)
      exit (EXIT_FAILURE);
  }
  for (i = 0; i < T_LEARNERS; i++) {
    learners[i].ch = ch;
    learners[i].seed = UINT64_C (0x7654321) * (i + 3);
    learners[i].queries = learners[i].answered = 0;
    learners[i].checked = learners[i].violations = 0;
    if (pthread_create (&learners[i].tid, NULL, learner_main,
                        &learners[i]) != 0)
      exit (EXIT_FAILURE);
  }
  for (i = 0; i < T_WRITERS; i++)
    if (pthread_create (&writers[i].tid, NULL, writer_main, &writers[i]) != 0)
      exit (EXIT_FAILURE);
  for (i = 0; i < T_WRITERS; i++)
    pthread_join (writers[i].tid, NULL);
  atomic_store (&t_stop, 1);
  for (i = 0; i < T_LEARNERS; i++) {
    pthread_join (learners[i].tid, NULL);
    if (learners[i].violations)
      FAIL ("learner %u: %lu parts reported over a change in flight", i,
            learners[i].violations);
    queries += learners[i].queries;
    answered += learners[i].answered;
    checked += learners[i].checked;
  }
  CHECK (checked > 0);
  /* Quiet now: a fresh snapshot sees everything unchanged. */
  CHECK_EQ (unchanged (ch, changes_snapshot (ch), 0, 0, T_SPACE, &p),
            T_SPACE);
  CHECK_EQ (changes_snapshot (ch), T_WRITERS * T_CHANGES);
  {
    struct changes_stats st;

    changes_get_stats (ch, &st);
    CHECK_EQ (st.begun, T_WRITERS * T_CHANGES);
    CHECK_EQ (st.inflight, 0);
  }
  for (i = 0; i < T_WRITERS; i++)
    free (writers[i].log);
  changes_free (ch);
  printf ("threads: %d writers x %d changes, %lu queries (%lu bytes "
          "answered, %lu in-flight changes checked) in %.2f s: ok\n",
          T_WRITERS, T_CHANGES, queries, answered, checked, now () - t0);
}

int
main (void)
{
  double t0 = now ();

  test_untracked ();
  test_random ();
  test_threads ();

  if (failures) {
    fprintf (stderr, "test-changes-random: %u failure(s)\n", failures);
    exit (EXIT_FAILURE);
  }
  printf ("test-changes-random: PASS (%.2f s)\n", now () - t0);
  exit (EXIT_SUCCESS);
}
