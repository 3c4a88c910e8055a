/* sparsebackup: helpers shared by the change tracker's unit tests
 * (test-changes.c, test-changes-random.c): making a tracker, beginning a
 * change, unchanged() collecting its parts, and EXPECT_PARTS.
 *
 *   #define TEST_NAME "test-changes-foo"
 *   #define TEST_RNG_SEED ...        (optional, see unit-test.h)
 *   #include "changes-test-lib.h"
 */

#ifndef SPARSEBACKUP_CHANGES_TEST_LIB_H
#define SPARSEBACKUP_CHANGES_TEST_LIB_H

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "changes.h"
#include "unit-test.h"

static inline struct changes *
new_changes (unsigned history)
{
  struct changes *ch = changes_new (history);

  if (ch == NULL) {
    fprintf (stderr, TEST_NAME ": changes_new (%u): %s\n",
             history, strerror (errno));
    exit (EXIT_FAILURE);
  }
  return ch;
}

static inline uint64_t
begin (struct changes *ch, uint64_t offset, uint64_t count)
{
  uint64_t t = 0;

  changes_begin (ch, offset, count, &t);
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

static inline void
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

static inline uint64_t
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
static inline void
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

#endif /* SPARSEBACKUP_CHANGES_TEST_LIB_H */
