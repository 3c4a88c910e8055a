/* sparsebackup: unit test of the scan cache (common/scancache.h).
 *
 * Fixed cases (insert, read, consume, drop, the change check, eviction,
 * the bytes that are not cached), then a random walk against a model:
 * whatever the cache returns must equal the data of the disk as it was
 * when that data entered the cache, and nothing may enter the cache
 * over a change the inserter could have missed.
 */

#include <config.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "changes.h"
#include "scancache.h"

#define TEST_NAME "test-scancache"
#define TEST_RNG_SEED UINT64_C (0x5ca11cac4e)
#include "unit-test.h"

#define B 4096

static void
fill (unsigned char *p, size_t len, unsigned char v)
{
  memset (p, v, len);
}

static void
fixed_cases (void)
{
  struct changes *ch = changes_new (CHANGES_HISTORY);
  struct scancache *sc = scancache_new (4 * B, B, ch);
  unsigned char data[4 * B], out[4 * B];
  struct scancache_stats st;
  size_t uncached;
  uint64_t snap, t;

  CHECK (ch != NULL && sc != NULL);
  CHECK (scancache_new (0, B, ch) == NULL);
  CHECK (scancache_new (B, 3000, ch) == NULL);

  /* Nothing cached: the whole request is uncached. */
  uncached = 0;
  CHECK_EQ (scancache_read (sc, out, 0, B, true, &uncached), 0);
  CHECK_EQ (uncached, B);

  /* Insert two blocks at 8K and read them back. */
  fill (data, 2 * B, 0xab);
  snap = changes_snapshot (ch);
  CHECK (scancache_insert (sc, snap, 2 * B, data, 2 * B));
  uncached = 0;
  CHECK_EQ (scancache_read (sc, out, 0, 4 * B, true, &uncached), 0);
  CHECK_EQ (uncached, 2 * B);   /* up to the entry */
  CHECK_EQ (scancache_read (sc, out, 2 * B, B, true, NULL), B);
  CHECK (out[0] == 0xab && out[B - 1] == 0xab);
  /* Asking only (no buffer) neither copies nor consumes. */
  CHECK_EQ (scancache_read (sc, NULL, 3 * B, B, true, NULL), B);
  /* Reading the second block consumes the entry: it is dropped. */
  CHECK_EQ (scancache_read (sc, out, 3 * B, B, true, NULL), B);
  CHECK_EQ (scancache_read (sc, out, 3 * B, B, true, &uncached), 0);
  scancache_get_stats (sc, &st);
  CHECK_EQ (st.entries, 0);
  CHECK_EQ (st.inserted, 1);

  /* A change that ended after the snapshot: refused. */
  snap = changes_snapshot (ch);
  changes_begin (ch, B, 1, &t);
  changes_end (ch, t);
  CHECK (!scancache_insert (sc, snap, 0, data, 2 * B));
  /* A change in flight over the range: refused too. */
  snap = changes_snapshot (ch);
  changes_begin (ch, 5 * B, 10, &t);
  CHECK (!scancache_insert (sc, snap, 4 * B, data, 2 * B));
  /* ... but not elsewhere. */
  CHECK (scancache_insert (sc, snap, 0, data, B));
  changes_end (ch, t);
  scancache_get_stats (sc, &st);
  CHECK_EQ (st.refused, 2);

  /* drop removes every overlapping entry. */
  CHECK_EQ (scancache_read (sc, NULL, 0, B, false, NULL), B);
  scancache_drop (sc, B - 1, 1);
  CHECK_EQ (scancache_read (sc, NULL, 0, B, false, &uncached), 0);

  /* Eviction: capacity 4 blocks, the least recently read goes first. */
  snap = changes_snapshot (ch);
  fill (data, B, 1);
  CHECK (scancache_insert (sc, snap, 0, data, 2 * B));
  fill (data, B, 2);
  CHECK (scancache_insert (sc, snap, 10 * B, data, 2 * B));
  CHECK_EQ (scancache_read (sc, out, 0, 1, false, NULL), 1);  /* touch */
  CHECK (scancache_insert (sc, snap, 20 * B, data, 2 * B));
  CHECK_EQ (scancache_read (sc, NULL, 10 * B, B, false, NULL), 0);
  CHECK_EQ (scancache_read (sc, NULL, 0, B, false, NULL), B);
  CHECK_EQ (scancache_read (sc, NULL, 20 * B, B, false, NULL), B);
  scancache_get_stats (sc, &st);
  CHECK_EQ (st.evicted, 1);
  CHECK_EQ (st.bytes, 4 * B);

  /* An entry larger than the cache is cut to its capacity. */
  {
    unsigned char *big = calloc (8, B);
    CHECK (scancache_insert (sc, snap, 40 * B, big, 8 * B));
    CHECK_EQ (scancache_read (sc, NULL, 40 * B, 8 * B, false, NULL), 4 * B);
    free (big);
  }

  scancache_free (sc);
  changes_free (ch);
}

/* A random walk: a disk of NB blocks whose block I holds the byte
 * VER[I] everywhere; writes bump versions (change_begin/end around
 * them, the cache dropped as the filter does), scans insert what they
 * read, reads compare.
 */
#define NB 64

static void
random_walk (void)
{
  struct changes *ch = changes_new (CHANGES_HISTORY);
  struct scancache *sc = scancache_new (16 * B, B, ch);
  unsigned char ver[NB] = { 0 };
  unsigned char *buf = malloc (NB * B), *out = malloc (NB * B);

  for (int step = 0; step < 20000; ++step) {
    unsigned a = rnd () % NB, n = 1 + rnd () % 8;

    if (a + n > NB)
      n = NB - a;
    switch (rnd () % 3) {
    case 0: {                   /* a write */
      uint64_t t;
      changes_begin (ch, (uint64_t) a * B, (uint64_t) n * B, &t);
      scancache_drop (sc, (uint64_t) a * B, (uint64_t) n * B);
      for (unsigned i = a; i < a + n; ++i)
        ver[i]++;
      changes_end (ch, t);
      break;
    }
    case 1: {                   /* a scan, maybe racing a write */
      uint64_t snap = changes_snapshot (ch);
      for (unsigned i = a; i < a + n; ++i)
        memset (buf + (size_t) (i - a) * B, ver[i], B);
      if (rnd () % 4 == 0) {    /* a write lands after the read */
        uint64_t t;
        unsigned w = a + rnd () % n;
        changes_begin (ch, (uint64_t) w * B, B, &t);
        scancache_drop (sc, (uint64_t) w * B, B);
        ver[w]++;
        changes_end (ch, t);
      }
      scancache_insert (sc, snap, (uint64_t) a * B, buf, (size_t) n * B);
      break;
    }
    default: {                  /* a read */
      size_t got = scancache_read (sc, out, (uint64_t) a * B,
                                   (size_t) n * B, rnd () % 2, NULL);
      for (size_t k = 0; k < got; ++k)
        if (out[k] != ver[a + k / B]) {
          FAIL ("step %d: byte %zu of block %zu is %u, the disk holds %u",
                step, k % B, a + k / B, out[k], ver[a + k / B]);
          break;
        }
    }
    }
  }
  free (buf);
  free (out);
  scancache_free (sc);
  changes_free (ch);
}

int
main (void)
{
  fixed_cases ();
  random_walk ();
  if (failures == 0)
    printf (TEST_NAME ": all checks passed\n");
  return failures ? 1 : 0;
}
