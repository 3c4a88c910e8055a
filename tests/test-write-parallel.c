/* test-write-parallel: many connections, many requests in flight.
 *
 * Issue 3 (write side) under the parallel thread model.  One nbdkit
 *   nbdkit -f -U SOCK --exit-with-parent --filter=sparsebackup file DISK
 * is started (the in-tree ./nbdkit wrapper, first on $PATH), and four
 * libnbd handles connect to it.
 *
 * Phase 1, disjoint: each connection owns a quarter of the disk and keeps
 * up to 16 requests in flight: random writes (mixing zero and data runs at
 * odd offsets and lengths), zero requests (plain, NO_HOLE, FAST_ZERO),
 * trims and reads.  Requests in flight never overlap byte-wise, but they
 * often share blocks.  A model of the disk follows every completed request
 * (trimmed bytes are undefined until written again); reads are checked
 * against it as they complete, and at the end the whole disk is compared
 * with the model and with the file, and block status from every
 * connection must never claim ZERO over bytes that are not zero.
 *
 * Feature: a megabyte of data overwritten with a plain write of zeros must
 * be a hole in the file and reported as ZERO (fails against a pass-through
 * filter).
 *
 * Phase 2, races: the four connections hammer the SAME 16 blocks with
 * concurrent writes of data, writes of zeros, zero requests, reads and
 * block status (a second server with nbdkit's delay filter below
 * sparsebackup delays plugin writes, widening the window in which a zero
 * request completes while a write is in flight).  After each round: every
 * block holds what one of the requests covering it wrote, and block status
 * never claims ZERO over a non-zero block.  Then an ordered sequence across
 * connections (each request waited for) must read back exactly what the
 * last completed request wrote.
 *
 * Environment: TEST_SEED=N to repeat a run; the seed is printed.
 * Exit 77 (skip) if nbdkit is not available.
 *
 * This file: phase 1, the feature check and main; phase 2 is in
 * write-parallel-races.c, the shared parts in write-parallel-lib.c
 * (write-parallel.h).
 */
#include <config.h>

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* SEEK_DATA */
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <libnbd.h>

#include "write-parallel.h"

/* ---- phase 1 --------------------------------------------------------- */

enum op_type { OP_WRITE, OP_ZERO, OP_FAST_ZERO, OP_TRIM, OP_READ };

struct slot {
  bool busy;
  enum op_type type;
  uint64_t off, len;
  uint8_t *buf;                 /* MAX_LEN */
  int conn;
};

struct worker {
  int conn;
  struct rng rng;
  struct slot slots[MAX_INFLIGHT];
  int inflight;
  unsigned long writes, zeroes, fast, trims, reads;
};

static int
complete_cb (void *vp, int *error)
{
  struct slot *s = vp;
  uint64_t i;

  if (*error) {
    if (s->type == OP_FAST_ZERO && *error == ENOTSUP)
      goto done;                /* changes nothing */
    fprintf (stderr, "conn %d: request type %d [%" PRIu64 ", +%" PRIu64
             ") failed: %s\n", s->conn, s->type, s->off, s->len,
             strerror (*error));
    failed = 1;
    goto done;
  }
  switch (s->type) {
  case OP_WRITE:
    model_write (s->off, s->buf, s->len);
    break;
  case OP_ZERO:
  case OP_FAST_ZERO:
    model_zero (s->off, s->len);
    break;
  case OP_TRIM:
    set_undef (s->off, s->len, true);
    break;
  case OP_READ:
    for (i = 0; i < s->len; i++) {
      uint64_t b = s->off + i;
      if (!is_undef (b) && s->buf[i] != model[b]) {
        fprintf (stderr, "conn %d: read [%" PRIu64 ", +%" PRIu64
                 "): byte %" PRIu64 " is 0x%02x, expected 0x%02x\n",
                 s->conn, s->off, s->len, b, s->buf[i], model[b]);
        failed = 1;
        break;
      }
    }
    break;
  }
 done:
  s->busy = false;
  return 1;                     /* retire the command */
}

/* Fill BUF with runs of zeros and data at odd lengths. */
static void
fill_mixed (struct rng *r, uint8_t *buf, uint64_t len)
{
  uint64_t i = 0, n, k;
  int kind;

  while (i < len) {
    switch (rnd_below (r, 4)) {
    case 0:  n = 1 + rnd_below (r, 300); break;
    case 1:  n = BLK * (1 + rnd_below (r, 3)); break;
    case 2:  n = BLK * (1 + rnd_below (r, 16)) + rnd_below (r, BLK); break;
    default: n = 1 + rnd_below (r, 2 * BLK); break;
    }
    if (n > len - i)
      n = len - i;
    kind = rnd_below (r, 3);    /* 0: zeros, 1-2: data */
    if (kind == 0)
      memset (buf + i, 0, n);
    else
      for (k = 0; k < n; k++)
        buf[i + k] = (uint8_t) (1 + rnd_below (r, 255));
    i += n;
  }
}

static bool
overlaps (struct worker *w, uint64_t off, uint64_t len)
{
  int i;

  for (i = 0; i < MAX_INFLIGHT; i++)
    if (w->slots[i].busy &&
        off < w->slots[i].off + w->slots[i].len &&
        w->slots[i].off < off + len)
      return true;
  return false;
}

static void *
phase1_worker (void *vp)
{
  struct worker *w = vp;
  struct nbd_handle *hh = h[w->conn];
  uint64_t base = w->conn * REGION;
  int submitted = 0, i, attempts;

  for (i = 0; i < MAX_INFLIGHT; i++) {
    w->slots[i].buf = malloc (MAX_LEN);
    w->slots[i].conn = w->conn;
    if (w->slots[i].buf == NULL)
      die ("malloc: %m");
  }

  while (!failed && (submitted < OPS_PER_CONN || nbd_aio_in_flight (hh) > 0)) {
    struct slot *s = NULL;
    uint64_t off = 0, len = 0;
    int64_t cookie;
    unsigned t;

    if (submitted < OPS_PER_CONN) {
      for (i = 0; i < MAX_INFLIGHT; i++)
        if (!w->slots[i].busy) { s = &w->slots[i]; break; }
    }
    if (s) {
      /* A range that does not overlap any request in flight. */
      for (attempts = 0; attempts < 10; attempts++) {
        switch (rnd_below (&w->rng, 3)) {
        case 0:  len = 1 + rnd_below (&w->rng, MAX_LEN); break;
        case 1:  len = BLK * (1 + rnd_below (&w->rng, MAX_LEN / BLK)); break;
        default: len = 1 + rnd_below (&w->rng, 3 * BLK); break;
        }
        off = base + rnd_below (&w->rng, REGION - len);
        if (rnd_below (&w->rng, 2))
          off &= ~(uint64_t) (BLK - 1);
        if (!overlaps (w, off, len))
          break;
      }
      if (attempts == 10)
        s = NULL;
    }
    if (s == NULL) {
      if (nbd_poll (hh, -1) == -1)
        nbd_die ("nbd_poll");
      continue;
    }

    t = rnd_below (&w->rng, 100);
    s->off = off;
    s->len = len;
    s->busy = true;
    nbd_completion_callback cb = { .callback = complete_cb, .user_data = s };
    if (t < 50) {
      s->type = OP_WRITE;
      fill_mixed (&w->rng, s->buf, len);
      cookie = nbd_aio_pwrite (hh, s->buf, len, off, cb,
                               rnd_below (&w->rng, 8) == 0 ?
                               LIBNBD_CMD_FLAG_FUA : 0);
      w->writes++;
    }
    else if (t < 70) {
      s->type = OP_ZERO;
      cookie = nbd_aio_zero (hh, len, off, cb,
                             rnd_below (&w->rng, 4) == 0 ?
                             LIBNBD_CMD_FLAG_NO_HOLE : 0);
      w->zeroes++;
    }
    else if (t < 78 && !no_fast_zero) {
      s->type = OP_FAST_ZERO;
      cookie = nbd_aio_zero (hh, len, off, cb, LIBNBD_CMD_FLAG_FAST_ZERO);
      w->fast++;
    }
    else if (t < 88) {
      s->type = OP_TRIM;
      cookie = nbd_aio_trim (hh, len, off, cb, 0);
      w->trims++;
    }
    else {
      s->type = OP_READ;
      cookie = nbd_aio_pread (hh, s->buf, len, off, cb, 0);
      w->reads++;
    }
    if (cookie == -1)
      nbd_die ("nbd_aio_*");
    submitted++;
  }
  while (nbd_aio_in_flight (hh) > 0)
    if (nbd_poll (hh, -1) == -1)
      nbd_die ("nbd_poll");
  if (nbd_flush (hh, 0) == -1)
    nbd_die ("nbd_flush");
  for (i = 0; i < MAX_INFLIGHT; i++)
    free (w->slots[i].buf);
  return NULL;
}

static void
read_file (uint8_t *buf, uint64_t off, uint64_t len)
{
  int fd = open (disk, O_RDONLY);
  ssize_t r;

  if (fd == -1)
    die ("open %s: %m", disk);
  while (len > 0) {
    r = pread (fd, buf, len, off);
    if (r <= 0)
      die ("pread %s: %m", disk);
    buf += r; off += r; len -= r;
  }
  close (fd);
}

void
phase1 (uint64_t seed)
{
  struct worker w[NR_CONN];
  pthread_t th[NR_CONN];
  uint8_t *got, *file;
  uint64_t i, undefined = 0;
  int c, err;

  memset (w, 0, sizeof w);
  for (c = 0; c < NR_CONN; c++) {
    w[c].conn = c;
    w[c].rng.s = seed * 4 + c + 1;
    err = pthread_create (&th[c], NULL, phase1_worker, &w[c]);
    if (err)
      die ("pthread_create: %s", strerror (err));
  }
  for (c = 0; c < NR_CONN; c++)
    pthread_join (th[c], NULL);
  if (failed)
    die ("phase 1: requests failed or read wrong data (see above)");
  for (c = 0; c < NR_CONN; c++)
    fprintf (stderr, "phase 1: conn %d: %lu writes, %lu zeroes, "
             "%lu fast zeroes, %lu trims, %lu reads\n", c, w[c].writes,
             w[c].zeroes, w[c].fast, w[c].trims, w[c].reads);

  got = malloc (DISK_SIZE);
  file = malloc (DISK_SIZE);
  if (!got || !file)
    die ("malloc: %m");
  read_range (h[1], got, 0, DISK_SIZE);
  for (i = 0; i < DISK_SIZE; i++) {
    if (is_undef (i)) { undefined++; continue; }
    if (got[i] != model[i])
      die ("phase 1: byte %" PRIu64 " reads 0x%02x, expected 0x%02x",
           i, got[i], model[i]);
  }
  read_file (file, 0, DISK_SIZE);
  if (memcmp (got, file, DISK_SIZE) != 0) {
    for (i = 0; got[i] == file[i]; i++)
      ;
    die ("phase 1: byte %" PRIu64 " reads 0x%02x through nbd but the file "
         "holds 0x%02x", i, got[i], file[i]);
  }
  for (c = 0; c < NR_CONN; c++)
    check_zero_claims (h[c], 0, DISK_SIZE, file, "phase 1");
  fprintf (stderr, "phase 1: contents match the model (%" PRIu64
           " bytes undefined after trims); block status consistent\n",
           undefined);
  free (got);
  free (file);
}

/* ---- feature: zeros written as data become a hole -------------------- */

void
feature_check (void)
{
  const uint64_t len = 1024 * 1024;
  uint8_t *buf = malloc (len);
  int fd;
  off_t d;

  if (!buf) die ("malloc: %m");
  memset (buf, 0xa5, len);
  if (nbd_pwrite (h[1], buf, len, FEATURE_OFF, 0) == -1)
    nbd_die ("nbd_pwrite");
  memset (buf, 0, len);
  if (nbd_pwrite (h[2], buf, len, FEATURE_OFF, 0) == -1)
    nbd_die ("nbd_pwrite");
  if (nbd_flush (h[2], 0) == -1)
    nbd_die ("nbd_flush");
  if (nbd_pread (h[3], buf, len, FEATURE_OFF, 0) == -1)
    nbd_die ("nbd_pread");
  for (uint64_t i = 0; i < len; i++)
    if (buf[i])
      die ("feature: zeros written over data do not read back as zero");
  fd = open (disk, O_RDONLY);
  if (fd == -1)
    die ("open: %m");
  d = lseek (fd, FEATURE_OFF, SEEK_DATA);
  close (fd);
  if (d != -1 && (uint64_t) d < FEATURE_OFF + len)
    die ("feature: 1 MiB of zeros written as data over data is not a hole "
         "in the file (data at %lld): the write was not made sparse",
         (long long) d);
  if (!all_zero_claimed (h[0], FEATURE_OFF, len))
    die ("feature: 1 MiB of zeros written as data is not reported ZERO");
  free (buf);
  fprintf (stderr, "feature: zeros written as data became a hole\n");
}

int
main (int argc, char *argv[])
{
  uint64_t seed;
  const char *s = getenv ("TEST_SEED");
  int fd, c;

  seed = s ? strtoull (s, NULL, 0) : (uint64_t) time (NULL) ^ getpid ();
  fprintf (stderr, "test-write-parallel: TEST_SEED=%" PRIu64 "\n", seed);
  alarm (300);                  /* never hang the test suite */

  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    exit (EXIT_FAILURE);
  }
  snprintf (sock, sizeof sock, "%s/sock", tmpdir);
  snprintf (disk, sizeof disk, "%s/disk.img", tmpdir);
  fd = open (disk, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd == -1 || ftruncate (fd, DISK_SIZE) == -1)
    die ("%s: %m", disk);
  close (fd);

  model = calloc (1, DISK_SIZE);
  undef = calloc (1, DISK_SIZE / 8);
  if (!model || !undef)
    die ("calloc: %m");

  start_server (NULL, NULL);
  connect_all ();
  phase1 (seed);
  feature_check ();
  close_all ();
  stop_server ();

  /* Phase 2 with plugin writes delayed, if the delay filter exists. */
  if (system ("nbdkit --filter=delay null --dump-plugin >/dev/null 2>&1")
      == 0) {
    const char *extra[] = { "--filter=delay", NULL };
    const char *params[] = { "delay-write=1ms", NULL };
    start_server (extra, params);
  }
  else {
    fprintf (stderr, "phase 2: no delay filter, running without it\n");
    start_server (NULL, NULL);
  }
  connect_all ();
  phase2 (seed);
  close_all ();
  stop_server ();

  for (c = 0; c < NR_CONN; c++)
    h[c] = NULL;
  free (model);
  free (undef);
  cleanup ();
  if (no_fast_zero) {
    fprintf (stderr, "test-write-parallel: FAIL: fast zero is not "
             "advertised\n");
    return EXIT_FAILURE;
  }
  fprintf (stderr, "test-write-parallel: OK\n");
  return EXIT_SUCCESS;
}
