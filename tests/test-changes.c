/* sparsebackup: unit tests of common/changes.c (the change tracker).
 *
 *  - fixed cases: arguments, snapshots and generations, unchanged() with
 *    changes in flight, ended before / after the snapshot, the EXCEPT
 *    ticket, overlapping / adjacent / unsorted ranges, ranges at the
 *    UINT64_MAX edge, history overflow, the recorder hook, a ticket
 *    ended twice, statistics;
 *  - a randomized comparison against a reference that keeps every change
 *    with its begin and end generations;
 *  - a multi-threaded soundness test: unchanged() never reports a byte
 *    touched by a change that was in flight at some time between the
 *    learner's snapshot and its query.
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

#define TEST_NAME "test-changes"
#define TEST_RNG_SEED UINT64_C (0x9E3779B97F4A7C15)
#include "unit-test.h"

static struct changes *
new_changes (unsigned history)
{
  struct changes *ch = changes_new (history);

  if (ch == NULL) {
    fprintf (stderr, "test-changes: changes_new (%u): %s\n",
             history, strerror (errno));
    exit (EXIT_FAILURE);
  }
  return ch;
}

static uint64_t
begin (struct changes *ch, uint64_t offset, uint64_t count)
{
  uint64_t t = 0;

  if (changes_begin (ch, offset, count, &t) == -1) {
    FAIL ("changes_begin (%" PRIu64 ", %" PRIu64 "): %s",
          offset, count, strerror (errno));
    return 0;
  }
  if (t == 0)
    FAIL ("%s", "changes_begin returned ticket 0");
  return t;
}

/* The parts given to the callback, collected. */
#define MAX_PARTS 4096
struct parts {
  unsigned n;
  bool overflow;
  uint64_t off[MAX_PARTS], len[MAX_PARTS];
};

static void
collect (void *opaque, uint64_t offset, uint64_t count)
{
  struct parts *p = opaque;

  if (p->n == MAX_PARTS) {
    p->overflow = true;
    return;
  }
  p->off[p->n] = offset;
  p->len[p->n] = count;
  p->n++;
}

static uint64_t
unchanged (struct changes *ch, uint64_t snap, uint64_t except,
           uint64_t offset, uint64_t count, struct parts *p)
{
  uint64_t sum = 0, ret;
  unsigned i;

  p->n = 0;
  p->overflow = false;
  ret = changes_unchanged (ch, snap, except, offset, count, collect, p);
  for (i = 0; i < p->n; i++) {
    sum += p->len[i];
    if (p->len[i] == 0)
      FAIL ("part %u of %" PRIu64 "+%" PRIu64 " is empty", i, offset, count);
    if (i > 0 && p->off[i] <= p->off[i - 1] + p->len[i - 1])
      FAIL ("unchanged (%" PRIu64 ", %" PRIu64 ", %" PRIu64 ", %" PRIu64
            "): parts %" PRIu64 "+%" PRIu64 " and %" PRIu64 "+%" PRIu64
            " are not sorted and maximal", snap, except, offset, count,
            p->off[i - 1], p->len[i - 1], p->off[i], p->len[i]);
  }
  if (sum != ret)
    FAIL ("unchanged returned %" PRIu64 ", parts sum %" PRIu64, ret, sum);
  return ret;
}

/* Expect exactly the parts given as (offset, len) pairs, N of them. */
static void
expect_parts (int line, const struct parts *p, unsigned n, ...)
{
  va_list ap;
  unsigned i;
  bool ok = p->n == n;

  va_start (ap, n);
  for (i = 0; i < n; i++) {
    uint64_t o = va_arg (ap, uint64_t), l = va_arg (ap, uint64_t);

    if (ok && (p->off[i] != o || p->len[i] != l))
      ok = false;
  }
  va_end (ap);
  if (!ok) {
    fprintf (stderr, "test-changes: FAIL (line %d): got %u parts:", line,
             p->n);
    for (i = 0; i < p->n; i++)
      fprintf (stderr, " %" PRIu64 "+%" PRIu64, p->off[i], p->len[i]);
    fprintf (stderr, ", expected %u\n", n);
    if (++failures > 20) exit (EXIT_FAILURE);
  }
}
#define U64(x) ((uint64_t) (x))
#define EXPECT_PARTS(p, n, ...) expect_parts (__LINE__, p, n, __VA_ARGS__)
#define EXPECT_NONE(p) expect_parts (__LINE__, p, 0, 0)

/*----------------------------------------------------------------------
 * Fixed cases.
 */

static void
test_basic (void)
{
  struct changes *ch;
  struct changes_stats st;
  struct parts p;
  uint64_t s0, s1, s2, t1, t2, t3;

  errno = 0;
  CHECK (changes_new (0) == NULL && errno == EINVAL);
  changes_free (NULL);

  ch = new_changes (16);
  s0 = changes_snapshot (ch);
  CHECK_EQ (s0, 0);

  /* Nothing changed: everything unchanged, one part. */
  CHECK_EQ (unchanged (ch, s0, 0, 100, 1000, &p), 1000);
  EXPECT_PARTS (&p, 1, U64 (100), U64 (1000));
  CHECK_EQ (unchanged (ch, s0, 0, 100, 0, &p), 0);
  EXPECT_NONE (&p);
  /* A snapshot from the future is refused. */
  CHECK_EQ (unchanged (ch, s0 + 1, 0, 0, 10, &p), 0);
  EXPECT_NONE (&p);

  /* A change in flight: refused for old and new snapshots alike;
   * beginning does not move the generation.
   */
  t1 = begin (ch, 1000, 500);
  CHECK_EQ (changes_snapshot (ch), s0);
  s1 = changes_snapshot (ch);
  CHECK_EQ (unchanged (ch, s0, 0, 0, 2000, &p), 1500);
  EXPECT_PARTS (&p, 2, U64 (0), U64 (1000), U64 (1500), U64 (500));
  CHECK_EQ (unchanged (ch, s1, 0, 0, 2000, &p), 1500);
  /* Inside it, touching only an edge, or adjacent. */
  CHECK_EQ (unchanged (ch, s1, 0, 1100, 100, &p), 0);
  CHECK_EQ (unchanged (ch, s1, 0, 900, 101, &p), 100);
  EXPECT_PARTS (&p, 1, U64 (900), U64 (100));
  CHECK_EQ (unchanged (ch, s1, 0, 1499, 2, &p), 1);
  EXPECT_PARTS (&p, 1, U64 (1500), U64 (1));
  CHECK_EQ (unchanged (ch, s1, 0, 1500, 10, &p), 10);
  CHECK_EQ (unchanged (ch, s1, 0, 990, 10, &p), 10);
  /* EXCEPT: the caller's own change is not a conflict while in flight. */
  CHECK_EQ (unchanged (ch, s1, t1, 0, 2000, &p), 2000);
  EXPECT_PARTS (&p, 1, U64 (0), U64 (2000));
  CHECK_EQ (unchanged (ch, s1, t1 + 1000, 0, 2000, &p), 1500);

  /* It ends: generation 1.  Still a conflict for snapshots before. */
  changes_end (ch, t1);
  s2 = changes_snapshot (ch);
  CHECK_EQ (s2, 1);
  CHECK_EQ (unchanged (ch, s0, 0, 0, 2000, &p), 1500);
  CHECK_EQ (unchanged (ch, s1, 0, 0, 2000, &p), 1500);
  /* EXCEPT does not apply to an ended change. */
  CHECK_EQ (unchanged (ch, s1, t1, 0, 2000, &p), 1500);
  /* Ended before the snapshot: no conflict. */
  CHECK_EQ (unchanged (ch, s2, 0, 0, 2000, &p), 2000);

  /* A ticket ended twice, and a bogus ticket, change nothing. */
  changes_end (ch, t1);
  changes_end (ch, 0);
  changes_end (ch, 987654321);
  CHECK_EQ (changes_snapshot (ch), s2);
  CHECK_EQ (unchanged (ch, s2, 0, 0, 2000, &p), 2000);

  /* Overlapping, adjacent and unsorted changes: the parts are the gaps
   * of their union, sorted, maximal.
   */
  t1 = begin (ch, 5000, 100);             /* [5000, 5100) */
  t2 = begin (ch, 3000, 1000);            /* [3000, 4000) */
  t3 = begin (ch, 3500, 200);             /* inside t2 */
  changes_end (ch, t3);
  t3 = begin (ch, 4000, 10);              /* adjacent to t2 */
  CHECK_EQ (unchanged (ch, s2, 0, 2000, 4000, &p), 1000 + 990 + 900);
  EXPECT_PARTS (&p, 3, U64 (2000), U64 (1000), U64 (4010), U64 (990),
                U64 (5100), U64 (900));
  CHECK_EQ (unchanged (ch, s2, t2, 2000, 4000, &p), 1500 + 300 + 990 + 900);
  EXPECT_PARTS (&p, 4, U64 (2000), U64 (1500), U64 (3700), U64 (300),
                U64 (4010), U64 (990), U64 (5100), U64 (900));
  changes_end (ch, t2);
  changes_end (ch, t1);
  changes_end (ch, t3);
  CHECK_EQ (changes_snapshot (ch), 5);
  CHECK_EQ (unchanged (ch, 3, 0, 2000, 4000, &p), 2000 + 990 + 900);
  CHECK_EQ (unchanged (ch, 4, 0, 2000, 4000, &p), 2000 + 990 + 1000);
  CHECK_EQ (unchanged (ch, 5, 0, 2000, 4000, &p), 4000);

  /* Empty changes move the generation but touch nothing: the part must
   * stay whole (one maximal part), or a learner rounding each part
   * inward to blocks loses the block around the empty change.
   * KNOWN BUG: changes.c add_clipped keeps the empty range [100, 100)
   * and the gap loop splits the part into 0+100 and 100+900.
   */
  t1 = begin (ch, 100, 0);
  CHECK_EQ (unchanged (ch, 5, 0, 0, 1000, &p), 1000);
  changes_end (ch, t1);
  CHECK_EQ (changes_snapshot (ch), 6);
  CHECK_EQ (unchanged (ch, 5, 0, 0, 1000, &p), 1000);

  changes_get_stats (ch, &st);
  CHECK_EQ (st.begun, 6);
  CHECK_EQ (st.inflight, 0);
  CHECK_EQ (st.untracked, 0);
  changes_free (ch);
  printf ("basic: ok\n");
}

/* Ranges at the UINT64_MAX edge. */
static void
test_edges (void)
{
  struct changes *ch = new_changes (16);
  struct parts p;
  uint64_t s = changes_snapshot (ch), t;
  const uint64_t M = UINT64_MAX;

  /* Queries are clipped to UINT64_MAX. */
  CHECK_EQ (unchanged (ch, s, 0, M - 10, M, &p), 10);
  EXPECT_PARTS (&p, 1, M - 10, U64 (10));
  CHECK_EQ (unchanged (ch, s, 0, M, 5, &p), 0);
  EXPECT_NONE (&p);
  CHECK_EQ (unchanged (ch, s, 0, 0, M, &p), M);
  EXPECT_PARTS (&p, 1, U64 (0), M);

  /* A change of everything (as for a resize). */
  t = begin (ch, 0, M);
  CHECK_EQ (unchanged (ch, s, 0, 0, M, &p), 0);
  CHECK_EQ (unchanged (ch, s, 0, M - 1, 1, &p), 0);
  CHECK_EQ (unchanged (ch, s, t, M - 1, 1, &p), 1);
  changes_end (ch, t);
  CHECK_EQ (unchanged (ch, s, 0, 12345, 1, &p), 0);
  s = changes_snapshot (ch);

  /* A change whose count overflows is clipped, not wrapped. */
  t = begin (ch, M - 100, 1000);
  CHECK_EQ (unchanged (ch, s, 0, 0, 200, &p), 200);          /* no wrap */
  CHECK_EQ (unchanged (ch, s, 0, M - 200, M, &p), 100);
  EXPECT_PARTS (&p, 1, M - 200, U64 (100));
  changes_end (ch, t);
  t = begin (ch, M, 10);                                      /* empty */
  CHECK_EQ (unchanged (ch, s, 0, M - 200, M, &p), 100);
  changes_end (ch, t);
  /* A change right at 0. */
  s = changes_snapshot (ch);
  t = begin (ch, 0, 1);
  CHECK_EQ (unchanged (ch, s, 0, 0, M, &p), M - 1);
  EXPECT_PARTS (&p, 1, U64 (1), M - 1);
  changes_end (ch, t);
  changes_free (ch);
  printf ("edges: ok\n");
}

/* The history ring: a snapshot older than the oldest remembered change
 * is refused whole, even where nothing overlapped.
 */
static void
test_history (void)
{
  const unsigned H = 4;
  struct changes *ch = new_changes (H);
  struct changes_stats st;
  struct parts p;
  uint64_t s0, t;
  unsigned i;

  s0 = changes_snapshot (ch);
  for (i = 0; i < H; i++) {
    t = begin (ch, 1000 + i, 1);
    changes_end (ch, t);
  }
  /* H changes ended after S0: all remembered. */
  CHECK_EQ (unchanged (ch, s0, 0, 0, 1000, &p), 1000);
  CHECK_EQ (unchanged (ch, s0, 0, 0, 2000, &p), 2000 - H);
  /* One more overwrites the change of generation 1 > S0. */
  t = begin (ch, 1000, 1);
  changes_end (ch, t);
  CHECK_EQ (unchanged (ch, s0, 0, 0, 1000, &p), 0);
  EXPECT_NONE (&p);
  /* Generation 1 was lost, but a snapshot at 1 needs only 2.. */
  CHECK_EQ (unchanged (ch, 1, 0, 0, 1000, &p), 1000);
  CHECK_EQ (unchanged (ch, 1, 0, 0, 2000, &p), 2000 - H);
  CHECK_EQ (unchanged (ch, changes_snapshot (ch), 0, 0, 2000, &p), 2000);
  changes_get_stats (ch, &st);
  CHECK (st.refused >= 1000);
  /* Changes in flight do not use the ring. */
  for (i = 0; i < 3 * H; i++)
    begin (ch, 3000 + i, 1);
  CHECK_EQ (unchanged (ch, 1, 0, 0, 1000, &p), 1000);
  changes_free (ch);

  /* History 1. */
  ch = new_changes (1);
  t = begin (ch, 0, 1);
  changes_end (ch, t);
  CHECK_EQ (unchanged (ch, 0, 0, 10, 10, &p), 10);
  t = begin (ch, 0, 1);
  changes_end (ch, t);
  CHECK_EQ (unchanged (ch, 0, 0, 10, 10, &p), 0);
  CHECK_EQ (unchanged (ch, 1, 0, 10, 10, &p), 10);
  CHECK_EQ (unchanged (ch, 1, 0, 0, 10, &p), 9);
  changes_free (ch);
  printf ("history: ok\n");
}

/* The recorder hook. */
struct recorder {
  struct changes *ch;
  unsigned calls;
  uint64_t offset, count;
  int fail_errno;               /* fail with this errno, 0: succeed */
  uint64_t snap;                /* a snapshot given to the probe */
  uint64_t probe;               /* unchanged() bytes seen from the hook */
  uint64_t gen;
};

static void
ignore (void *opaque, uint64_t offset, uint64_t count)
{
}

static int
recorder (void *opaque, uint64_t offset, uint64_t count)
{
  struct recorder *r = opaque;

  r->calls++;
  r->offset = offset;
  r->count = count;
  /* Called without the lock, before the change is in flight: the tracker
   * can be asked from here, and the change is not yet there.
   */
  r->probe = changes_unchanged (r->ch, r->snap, 0, offset, count,
                                ignore, NULL);
  r->gen = changes_snapshot (r->ch);
  if (r->fail_errno) {
    errno = r->fail_errno;
    return -1;
  }
  return 0;
}

static void
test_recorder (void)
{
  struct changes *ch = new_changes (16);
  struct recorder r = { .ch = ch };
  struct changes_stats st;
  struct parts p;
  uint64_t t, s;

  changes_set_recorder (ch, recorder, &r);
  s = r.snap = changes_snapshot (ch);

  t = begin (ch, 100, 50);
  CHECK_EQ (r.calls, 1);
  CHECK_EQ (r.offset, 100);
  CHECK_EQ (r.count, 50);
  CHECK_EQ (r.probe, 50);               /* not yet in flight */
  CHECK_EQ (unchanged (ch, s, 0, 100, 50, &p), 0);
  changes_end (ch, t);

  /* Count 0: not called. */
  t = begin (ch, 100, 0);
  CHECK_EQ (r.calls, 1);
  changes_end (ch, t);
  /* Overflowing count: called with the clipped range. */
  t = begin (ch, UINT64_MAX - 5, 100);
  CHECK_EQ (r.calls, 2);
  CHECK_EQ (r.offset, UINT64_MAX - 5);
  CHECK_EQ (r.count, 5);
  changes_end (ch, t);

  /* Failure: -1 with errno, nothing recorded, no generation used. */
  s = r.snap = changes_snapshot (ch);
  changes_get_stats (ch, &st);
  r.fail_errno = ENOSPC;
  t = 42;
  errno = 0;
  CHECK (changes_begin (ch, 1000, 10, &t) == -1);
  CHECK_EQ (errno, ENOSPC);
  CHECK_EQ (r.calls, 3);
  CHECK_EQ (unchanged (ch, s, 0, 0, 2000, &p), 2000);
  CHECK_EQ (changes_snapshot (ch), s);
  {
    struct changes_stats st2;

    changes_get_stats (ch, &st2);
    CHECK_EQ (st2.inflight, 0);
    CHECK_EQ (st2.begun, st.begun);
  }
  r.fail_errno = 0;
  t = begin (ch, 1000, 10);
  CHECK_EQ (unchanged (ch, s, 0, 0, 2000, &p), 1990);
  changes_end (ch, t);
  changes_free (ch);
  printf ("recorder: ok\n");
}

/*----------------------------------------------------------------------
 * Untracked changes (out of memory in changes_begin).
 *
 * tests/common.am links test-changes with -Wl,--wrap=realloc, so that
 * the tracker's in-flight array can be made to fail to grow.  Without
 * the wrap (a hand-made build) the test is skipped.
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

static int
cmp_u64pair (const void *av, const void *bv)
{
  const uint64_t *a = av, *b = bv;

  return a[0] < b[0] ? -1 : a[0] > b[0];
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

    if (changes_begin (w->ch, off, cnt, &t) == -1)
      abort ();
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

  test_basic ();
  test_edges ();
  test_history ();
  test_recorder ();
  test_untracked ();
  test_random ();
  test_threads ();

  if (failures) {
    fprintf (stderr, "test-changes: %u failure(s)\n", failures);
    exit (EXIT_FAILURE);
  }
  printf ("test-changes: PASS (%.2f s)\n", now () - t0);
  exit (EXIT_SUCCESS);
}
