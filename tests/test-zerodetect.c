/* sparsebackup: unit tests of common/zerodetect.c.
 *
 * Exhaustive on small buffers (every length 0..300 at every alignment
 * 0..15 with a single non-zero byte at every position, guard bytes around
 * the buffer), then large buffers, then zero_run against a byte-by-byte
 * reference.  The throughput figure printed at the end is information,
 * not a pass/fail criterion.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "zerodetect.h"

#define TEST_NAME "test-zerodetect"
#define TEST_RNG_SEED UINT64_C (0x9E3779B97F4A7C15)
#include "unit-test.h"

#define SMALL_MAX 600      /* more than two strides of is_zero, and tails */
#define ALIGN_MAX 16

static void
test_small (void)
{
  /* 64-byte aligned storage, guard bytes on both sides. */
  static unsigned char storage[64 + ALIGN_MAX + SMALL_MAX + 64]
    __attribute__ ((aligned (64)));
  static const unsigned char values[] = { 1, 0x80, 0xff };
  size_t align, len, i, v;
  unsigned long checks = 0;

  for (align = 0; align < ALIGN_MAX; align++) {
    for (len = 0; len <= SMALL_MAX; len++) {
      unsigned char *buf = storage + 64 + align;

      /* Zero buffer surrounded by non-zero guard bytes. */
      memset (storage, 0xa5, sizeof storage);
      memset (buf, 0, len);
      if (!is_zero (buf, len))
        FAIL ("is_zero false on zero buffer align=%zu len=%zu", align, len);
      checks++;

      for (i = 0; i < len; i++) {
        v = (i + len) % (sizeof values);
        buf[i] = values[v];
        if (is_zero (buf, len))
          FAIL ("is_zero true with byte %zu set, align=%zu len=%zu",
                i, align, len);
        buf[i] = 0;
        checks++;
      }
    }
  }
  printf ("small buffers: %lu checks\n", checks);
}

static void
test_large (void)
{
  const size_t len = 64 * 1024 * 1024 + 13;
  unsigned char *storage = calloc (1, len + 64);
  size_t align, k;

  if (storage == NULL) {
    perror ("calloc");
    exit (EXIT_FAILURE);
  }
  for (align = 0; align < 16; align += 5) {
    unsigned char *buf = storage + align;
    size_t l = len - align;
    size_t positions[12];

    if (!is_zero (buf, l))
      FAIL ("is_zero false on large zero buffer align=%zu", align);

    positions[0] = 0;
    positions[1] = 15;
    positions[2] = 16;
    positions[3] = 17;
    positions[4] = l - 1;
    positions[5] = l - 9;
    positions[6] = l / 2;
    positions[7] = 4096;
    for (k = 8; k < 12; k++)
      positions[k] = rnd () % l;

    for (k = 0; k < 12; k++) {
      buf[positions[k]] = 0x10;
      if (is_zero (buf, l))
        FAIL ("is_zero true on large buffer with byte %zu set, align=%zu",
              positions[k], align);
      /* A prefix ending just before the byte is still zero. */
      if (!is_zero (buf, positions[k]))
        FAIL ("is_zero false on prefix of %zu bytes, align=%zu",
              positions[k], align);
      buf[positions[k]] = 0;
    }
  }
  free (storage);
  printf ("large buffers: ok\n");
}

/* Reference zero_run: per-block status computed byte by byte. */
static size_t
ref_zero_run (const unsigned char *buf, size_t len, size_t start,
              unsigned long long offset, unsigned blksize, bool *zero)
{
  size_t pos = start;
  bool first = true, fz = false;

  if (start >= len) {
    *zero = false;
    return 0;
  }
  while (pos < len) {
    size_t end = pos + 1, i;
    bool z = true;

    while (end < len && (offset + end) % blksize != 0)
      end++;
    for (i = pos; i < end; i++)
      if (buf[i])
        z = false;
    if (first) {
      fz = z;
      first = false;
    }
    else if (z != fz)
      break;
    pos = end;
  }
  *zero = fz;
  return pos - start;
}

static void
test_zero_run (void)
{
  const size_t maxlen = 8192;
  unsigned char *buf = malloc (maxlen);
  unsigned iter;
  unsigned long runs = 0;

  if (buf == NULL) {
    perror ("malloc");
    exit (EXIT_FAILURE);
  }

  for (iter = 0; iter < 3000; iter++) {
    unsigned blksize = 1u << (rnd () % 10);         /* 1 .. 512 */
    size_t len = rnd () % maxlen;
    unsigned long long offset = rnd ();
    size_t i, start;

    if (iter % 7 == 0)
      offset = UINT64_MAX - (rnd () % 1000);         /* wraps around */
    else if (iter % 3 == 0)
      offset &= ~(unsigned long long) (blksize - 1); /* aligned */

    /* Random blocks of zero and data, data bytes anywhere. */
    memset (buf, 0, len);
    for (i = 0; i < len; i++)
      if (rnd () % 1000 < (iter % 5) * 2)
        buf[i] = 1 + rnd () % 255;

    start = 0;
    while (start < len) {
      bool z1, z2;
      size_t r1 = zero_run (buf, len, start, offset, blksize, &z1);
      size_t r2 = ref_zero_run (buf, len, start, offset, blksize, &z2);

      runs++;
      if (r1 != r2 || z1 != z2 || r1 == 0) {
        FAIL ("zero_run len=%zu start=%zu offset=%llu blksize=%u: "
              "got %zu/%d, expected %zu/%d",
              len, start, offset, blksize, r1, z1, r2, z2);
        break;
      }
      /* A run ends on a block boundary or at LEN. */
      if (start + r1 < len && (offset + start + r1) % blksize != 0)
        FAIL ("zero_run ended off a block boundary at %zu", start + r1);
      start += r1;
    }
    if (start < len)
      continue;
    {
      bool z;

      if (zero_run (buf, len, len, offset, blksize, &z) != 0)
        FAIL ("zero_run at START == LEN returned non-zero (len=%zu)", len);
    }
  }

  /* Start in the middle of a block. */
  memset (buf, 0, 4096);
  buf[1000] = 1;
  {
    bool z;
    size_t r = zero_run (buf, 4096, 100, 0, 512, &z);

    if (r != 412 || !z)
      FAIL ("zero_run from mid-block: %zu/%d", r, z);
    r = zero_run (buf, 4096, 512, 0, 512, &z);
    if (r != 512 || z)
      FAIL ("zero_run data block: %zu/%d", r, z);
    r = zero_run (buf, 4096, 1024, 0, 512, &z);
    if (r != 3072 || !z)
      FAIL ("zero_run trailing zeros: %zu/%d", r, z);
  }

  free (buf);
  printf ("zero_run: %lu runs checked\n", runs);
}

static void
throughput (void)
{
  const size_t len = 64 * 1024 * 1024;
  unsigned char *buf = malloc (len);
  double t0, t1;
  int i, n = 8;
  volatile bool sink = false;

  if (buf == NULL)
    return;
  /* Real pages, not the kernel's shared zero page: write data first and
   * use it (otherwise the compiler may turn malloc + memset 0 into calloc).
   */
  memset (buf, 0x55, len);
  if (is_zero (buf, len))
    FAIL ("%s", "is_zero true on a buffer of 0x55");
  memset (buf, 0, len);
  t0 = now ();
  for (i = 0; i < n; i++)
    sink |= !is_zero (buf, len);
  t1 = now ();
  if (sink)
    FAIL ("%s", "is_zero false on zero buffer (throughput)");
  printf ("is_zero throughput (information only): %.1f GB/s "
          "over %d x %zu MiB\n",
          (double) len * n / (t1 - t0) / 1e9, n, len >> 20);
  free (buf);
}

int
main (void)
{
  test_small ();
  test_large ();
  test_zero_run ();
  throughput ();
  if (failures) {
    fprintf (stderr, "test-zerodetect: %u failure(s)\n", failures);
    exit (EXIT_FAILURE);
  }
  printf ("test-zerodetect: PASS\n");
  exit (EXIT_SUCCESS);
}
