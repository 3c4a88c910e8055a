/* sparsebackup: failure reporting for the C unit tests.
 *
 *   #define TEST_NAME "test-foo"
 *   #include "unit-test.h"
 *   CHECK (x == 1);  FAIL ("got %d", x);  return failures ? 1 : 0;
 *
 * FAIL prints the message with the line number and counts it; after 20
 * failures the program exits (status 1).  CHECK_EQ compares two values
 * as uint64_t and prints both.
 *
 * Also: a deterministic PRNG (xorshift64*), rnd_r() on a per-thread
 * state and rnd() on a global one seeded with TEST_RNG_SEED (both only
 * if TEST_RNG_SEED is defined before the include), now() (monotonic
 * seconds) and cmp_u64pair() (qsort of uint64_t pairs by their first).
 */
#ifndef SPARSEBACKUP_UNIT_TEST_H
#define SPARSEBACKUP_UNIT_TEST_H

#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static unsigned failures;

#define FAIL(fmt, ...)                                                  \
  do {                                                                  \
    fprintf (stderr, TEST_NAME ": FAIL (line %d): " fmt "\n",           \
             __LINE__, __VA_ARGS__);                                    \
    if (++failures > 20) exit (EXIT_FAILURE);                           \
  } while (0)

#define CHECK(cond)                                                     \
  do {                                                                  \
    if (!(cond))                                                        \
      FAIL ("%s", #cond);                                               \
  } while (0)

#define CHECK_EQ(a, b)                                                  \
  do {                                                                  \
    uint64_t a_ = (a), b_ = (b);                                        \
    if (a_ != b_)                                                       \
      FAIL ("%s == %" PRIu64 ", expected %s == %" PRIu64,               \
            #a, a_, #b, b_);                                            \
  } while (0)

/* Deterministic PRNG (xorshift64*), one state per thread. */
static inline uint64_t
rnd_r (uint64_t *s)
{
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * UINT64_C (2685821657736338717);
}

#ifdef TEST_RNG_SEED
static uint64_t rng_state = TEST_RNG_SEED;

static inline uint64_t
rnd (void)
{
  return rnd_r (&rng_state);
}
#endif /* TEST_RNG_SEED */

/* For qsort: pairs of uint64_t (offset, count or end) by their first. */
static inline int
cmp_u64pair (const void *av, const void *bv)
{
  const uint64_t *a = av, *b = bv;

  return a[0] < b[0] ? -1 : a[0] > b[0];
}

static inline double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

#endif /* SPARSEBACKUP_UNIT_TEST_H */
