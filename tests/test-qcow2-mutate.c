/* sparsebackup: robustness test of the qcow2 library on mutated images.
 *
 *   test-qcow2-mutate [-n ITERATIONS] IMAGE...
 *
 * Each IMAGE (made by qemu-img, no backing file) is loaded into memory.
 * The unmodified image must open, map and read; ranges it reports as
 * ZERO must read as zeros.  Then, for each iteration, a copy is mutated
 * (random bytes, 64-bit fields set to hostile values, in the header
 * cluster and in the metadata clusters) and opened with qcow2_open_mem;
 * whatever opens is mapped and read in bounded ranges.  Every failure
 * must come with a message.  Run under --enable-sanitizers this finds
 * out-of-bounds accesses, leaks and undefined behaviour.
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

#define MAX_IO (1024 * 1024)
#define MAX_MAP (256 * 1024 * 1024)

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t
rnd (void)
{
  rng ^= rng << 13;
  rng ^= rng >> 7;
  rng ^= rng << 17;
  return rng;
}

struct map_check {
  uint64_t next;
  uint64_t start, end;
  uint64_t zero_off[64], zero_len[64];
  unsigned nzero;
  bool bad;
};

static int
on_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct map_check *m = opaque;

  if (offset != m->next || length == 0 || offset + length > m->end ||
      (flags & ~(uint32_t) (QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO))) {
    fprintf (stderr, "bad extent %" PRIu64 " %" PRIu64 " %" PRIu32
             " (expected offset %" PRIu64 ")\n",
             offset, length, flags, m->next);
    m->bad = true;
    return -1;
  }
  m->next = offset + length;
  if ((flags & QCOW2_EXTENT_ZERO) && m->nzero < 64) {
    m->zero_off[m->nzero] = offset;
    m->zero_len[m->nzero] = length;
    m->nzero++;
  }
  return 0;
}

static void
need_message (const char *what, const char *err)
{
  if (err[0] == '\0') {
    fprintf (stderr, "test-qcow2-mutate: %s failed without a message\n",
             what);
    exit (EXIT_FAILURE);
  }
}

/* Exercise an open image.  Return -1 if the library broke its contract. */
static int
exercise (struct qcow2_image *img, bool strict)
{
  uint64_t size = qcow2_get_size (img);
  uint64_t len = size < MAX_MAP ? size : MAX_MAP;
  char err[QCOW2_ERRLEN];
  static uint8_t buf[MAX_IO];
  struct map_check m;
  unsigned i;

  memset (&m, 0, sizeof m);
  m.start = m.next = 0;
  m.end = len;
  err[0] = '\0';
  if (qcow2_map (img, 0, len, on_extent, &m, err, sizeof err) == -1) {
    if (m.bad)
      return -1;
    need_message ("qcow2_map", err);
    if (strict) {
      fprintf (stderr, "map failed: %s\n", err);
      return -1;
    }
  }
  else if (m.next != len) {
    fprintf (stderr, "map stopped at %" PRIu64 " of %" PRIu64 "\n",
             m.next, len);
    return -1;
  }

  /* ZERO extents read as zeros (first 1 MiB of each). */
  for (i = 0; i < m.nzero; ++i) {
    uint64_t n = m.zero_len[i] < MAX_IO ? m.zero_len[i] : MAX_IO;
    uint64_t j;
    err[0] = '\0';
    if (qcow2_pread (img, buf, n, m.zero_off[i], err, sizeof err) == -1) {
      need_message ("qcow2_pread", err);
      if (strict) {
        fprintf (stderr, "read failed: %s\n", err);
        return -1;
      }
      continue;
    }
    for (j = 0; j < n; ++j)
      if (buf[j] != 0) {
        fprintf (stderr, "ZERO extent at %" PRIu64 " reads non-zero\n",
                 m.zero_off[i]);
        return -1;
      }
  }

  /* Random reads. */
  for (i = 0; i < 16 && size > 0; ++i) {
    uint64_t off = rnd () % size;
    uint64_t n = 1 + rnd () % MAX_IO;
    if (n > size - off)
      n = size - off;
    err[0] = '\0';
    if (qcow2_pread (img, buf, n, off, err, sizeof err) == -1) {
      need_message ("qcow2_pread", err);
      if (strict) {
        fprintf (stderr, "read failed: %s\n", err);
        return -1;
      }
    }
  }

  /* Out of range requests are refused. */
  if (qcow2_pread (img, buf, 1, size, err, sizeof err) != -1 ||
      qcow2_map (img, size, 1, on_extent, &m, err, sizeof err) != -1) {
    fprintf (stderr, "request beyond the end accepted\n");
    return -1;
  }
  return 0;
}

static void
mutate (uint8_t *p, size_t len, size_t cluster)
{
  unsigned n = 1 + rnd () % 4, i;
  static const uint64_t hostile[] = {
    0, 1, 0x1ff, 0x200, 0x8000000000000000ULL, 0x4000000000000000ULL,
    0xffffffffffffffffULL, 0x00fffffffffffe00ULL, 0x7fffffffffffffffULL,
    0x10000, 0xffffffffULL, 0x100000000ULL,
  };

  for (i = 0; i < n; ++i) {
    size_t area = len;
    size_t pos;

    /* Mostly the header cluster and the first metadata clusters. */
    switch (rnd () % 4) {
    case 0: area = len < 512 ? len : 512; break;
    case 1: area = len < 8 * cluster ? len : 8 * cluster; break;
    default: break;
    }
    pos = rnd () % area;
    if (rnd () % 2 && pos + 8 <= len) {
      uint64_t v = hostile[rnd () % (sizeof hostile / sizeof hostile[0])];
      unsigned b;
      pos &= ~(size_t) 7;
      if (rnd () % 2)
        v ^= rnd () & 0xffff;
      for (b = 0; b < 8; ++b)
        p[pos + b] = v >> (56 - 8 * b);
    }
    else
      p[pos] ^= 1 + rnd () % 255;
  }
}

int
main (int argc, char *argv[])
{
  unsigned iterations = 500;
  int i, first = 1;

  if (argc > 2 && strcmp (argv[1], "-n") == 0) {
    iterations = atoi (argv[2]);
    first = 3;
  }
  if (first >= argc) {
    fprintf (stderr, "usage: test-qcow2-mutate [-n N] IMAGE...\n");
    return EXIT_FAILURE;
  }

  for (i = first; i < argc; ++i) {
    struct qcow2_options opts;
    struct qcow2_image *img;
    char err[QCOW2_ERRLEN];
    uint8_t *orig, *copy;
    size_t len, cluster;
    unsigned it, opened = 0;
    FILE *fp;
    long l;

    fp = fopen (argv[i], "rb");
    if (fp == NULL || fseek (fp, 0, SEEK_END) == -1 ||
        (l = ftell (fp)) <= 0) {
      perror (argv[i]);
      return EXIT_FAILURE;
    }
    len = l;
    rewind (fp);
    orig = malloc (len);
    if (orig == NULL || fread (orig, 1, len, fp) != len) {
      perror (argv[i]);
      return EXIT_FAILURE;
    }
    fclose (fp);
    cluster = len > 24 && orig[23] >= 9 && orig[23] <= 21
      ? (size_t) 1 << orig[23] : 65536;

    qcow2_options_init (&opts);
    opts.backing = false;
    opts.l2_cache_size = 8192;  /* tiny: exercise eviction */

    if (qcow2_open_mem (orig, len, argv[i], &opts, &img,
                        err, sizeof err) == -1) {
      fprintf (stderr, "%s: unmodified image does not open: %s\n",
               argv[i], err);
      return EXIT_FAILURE;
    }
    if (exercise (img, true) == -1) {
      fprintf (stderr, "%s: unmodified image failed\n", argv[i]);
      return EXIT_FAILURE;
    }
    qcow2_close (img);

    for (it = 0; it < iterations; ++it) {
      copy = malloc (len);
      if (copy == NULL)
        return EXIT_FAILURE;
      memcpy (copy, orig, len);
      mutate (copy, len, cluster);
      err[0] = '\0';
      if (qcow2_open_mem (copy, len, "mutated", &opts, &img,
                          err, sizeof err) == -1)
        need_message ("qcow2_open_mem", err);
      else {
        opened++;
        if (exercise (img, false) == -1) {
          fprintf (stderr, "%s: iteration %u failed\n", argv[i], it);
          return EXIT_FAILURE;
        }
        qcow2_close (img);
      }
      free (copy);
    }
    printf ("%s: %u mutations, %u opened\n", argv[i], iterations, opened);
    free (orig);
  }
  return EXIT_SUCCESS;
}
