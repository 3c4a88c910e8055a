/* test-write-parallel: phase 2, races on the same blocks (see
 * test-write-parallel.c for what is checked).
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

/* ---- phase 2: races on the same blocks ------------------------------- */

/* Every data write of phase 2 fills each block with a pattern naming the
 * request (ID) and the block (B): never zero anywhere.
 */
static void
fill_pattern (uint8_t *buf, uint32_t id, unsigned first, unsigned n)
{
  unsigned b, i;

  for (b = 0; b < n; b++) {
    uint8_t *p = buf + (size_t) b * BLK;
    for (i = 0; i < BLK; i++)
      p[i] = (uint8_t) (1 + (id * 31 + (first + b) * 7 + i) % 255);
    memcpy (p, &id, sizeof id);
    p[0] |= 0x80;               /* never zero */
  }
}

enum race_kind { R_DATA, R_ZERO_WRITE, R_ZERO, R_READ, R_STATUS };

struct race_op {
  enum race_kind kind;
  uint32_t id;
  unsigned first, n;            /* blocks */
  uint8_t *buf;
  int conn;
};

#define MAX_RACE_OPS 4

struct race_worker {
  int conn;
  struct rng rng;
  struct race_op ops[MAX_RACE_OPS];
  int nr_ops;
  uint32_t next_id;
};

static pthread_barrier_t barrier;
static volatile bool race_done;

static int
race_extent_cb (void *vp, const char *metacontext, uint64_t offset,
                uint32_t *entries, size_t nr, int *error)
{
  return 0;
}

static int
race_complete (void *vp, int *error)
{
  struct race_op *op = vp;

  if (*error) {
    fprintf (stderr, "phase 2: conn %d: request kind %d failed: %s\n",
             op->conn, op->kind, strerror (*error));
    failed = 1;
  }
  return 1;
}

static void *
race_worker (void *vp)
{
  struct race_worker *w = vp;
  struct nbd_handle *hh = h[w->conn];
  int i;

  for (;;) {
    pthread_barrier_wait (&barrier);        /* round starts */
    if (race_done)
      break;
    for (i = 0; i < w->nr_ops; i++) {
      struct race_op *op = &w->ops[i];
      uint64_t off = RACE_OFF + (uint64_t) op->first * BLK;
      uint64_t len = (uint64_t) op->n * BLK;
      nbd_completion_callback cb = { .callback = race_complete,
                                     .user_data = op };
      int64_t cookie = -1;

      switch (op->kind) {
      case R_DATA:
      case R_ZERO_WRITE:
        cookie = nbd_aio_pwrite (hh, op->buf, len, off, cb, 0);
        break;
      case R_ZERO:
        cookie = nbd_aio_zero (hh, len, off, cb, 0);
        break;
      case R_READ:
        cookie = nbd_aio_pread (hh, op->buf, len, off, cb, 0);
        break;
      case R_STATUS:
        cookie = nbd_aio_block_status (hh, len, off,
                                       (nbd_extent_callback) {
                                         .callback = race_extent_cb },
                                       cb, 0);
        break;
      }
      if (cookie == -1)
        nbd_die ("phase 2: nbd_aio_*");
    }
    while (nbd_aio_in_flight (hh) > 0)
      if (nbd_poll (hh, -1) == -1)
        nbd_die ("nbd_poll");
    pthread_barrier_wait (&barrier);        /* round done */
  }
  return NULL;
}

static void
expect_block (const uint8_t *got, unsigned blk, const uint8_t *exp,
              const char *what, unsigned round)
{
  if (memcmp (got, exp, BLK) != 0)
    die ("phase 2 round %u: %s: block %u does not hold what the last "
         "completed request wrote", round, what, blk);
}

void
phase2 (uint64_t seed)
{
  struct race_worker w[NR_CONN];
  pthread_t th[NR_CONN];
  const uint64_t rlen = RACE_BLOCKS * BLK;
  uint8_t *cur = calloc (1, rlen), *got = malloc (rlen), *buf = malloc (rlen);
  unsigned round, b;
  int c, i, err;
  unsigned long zero_claims = 0;

  if (!cur || !got || !buf)
    die ("malloc: %m");
  memset (w, 0, sizeof w);
  pthread_barrier_init (&barrier, NULL, NR_CONN + 1);
  for (c = 0; c < NR_CONN; c++) {
    w[c].conn = c;
    w[c].rng.s = seed * 8 + c + 17;
    w[c].next_id = c + 1;
    /* The main thread plans the rounds: buffers exist before it does. */
    for (i = 0; i < MAX_RACE_OPS; i++) {
      w[c].ops[i].buf = malloc (RACE_BLOCKS * BLK);
      if (w[c].ops[i].buf == NULL)
        die ("malloc: %m");
      w[c].ops[i].conn = c;
    }
    err = pthread_create (&th[c], NULL, race_worker, &w[c]);
    if (err)
      die ("pthread_create: %s", strerror (err));
  }
  /* Start from zero. */
  if (nbd_zero (h[0], rlen, RACE_OFF, 0) == -1)
    nbd_die ("nbd_zero");

  for (round = 0; round < ROUNDS && !failed; round++) {
    /* Plan the round. */
    for (c = 0; c < NR_CONN; c++) {
      w[c].nr_ops = 1 + rnd_below (&w[c].rng, MAX_RACE_OPS);
      for (i = 0; i < w[c].nr_ops; i++) {
        struct race_op *op = &w[c].ops[i];
        unsigned r = rnd_below (&w[c].rng, 100);
        op->first = rnd_below (&w[c].rng, RACE_BLOCKS);
        op->n = 1 + rnd_below (&w[c].rng, RACE_BLOCKS - op->first);
        op->id = w[c].next_id += NR_CONN;
        op->kind = r < 35 ? R_DATA : r < 55 ? R_ZERO_WRITE :
                   r < 75 ? R_ZERO : r < 88 ? R_READ : R_STATUS;
        if (op->kind == R_DATA)
          fill_pattern (op->buf, op->id, op->first, op->n);
        else if (op->kind == R_ZERO_WRITE)
          memset (op->buf, 0, (size_t) op->n * BLK);
      }
    }
    pthread_barrier_wait (&barrier);        /* go */
    pthread_barrier_wait (&barrier);        /* all done */
    if (failed)
      break;

    /* Every block holds what one of the requests covering it wrote (or
     * its old contents if none did). */
    read_range (h[round % NR_CONN], got, RACE_OFF, rlen);
    for (b = 0; b < RACE_BLOCKS; b++) {
      const uint8_t *g = got + (size_t) b * BLK;
      bool covered = false, ok = false;
      for (c = 0; c < NR_CONN && !ok; c++)
        for (i = 0; i < w[c].nr_ops && !ok; i++) {
          struct race_op *op = &w[c].ops[i];
          if (b < op->first || b >= op->first + op->n ||
              op->kind == R_READ || op->kind == R_STATUS)
            continue;
          covered = true;
          if (op->kind == R_DATA) {
            fill_pattern (buf, op->id, b, 1);
            ok = memcmp (g, buf, BLK) == 0;
          }
          else {
            memset (buf, 0, BLK);
            ok = memcmp (g, buf, BLK) == 0;
          }
        }
      if (!covered)
        ok = memcmp (g, cur + (size_t) b * BLK, BLK) == 0;
      if (!ok)
        die ("phase 2 round %u: block %u holds data no request wrote "
             "(covered by a request: %d)", round, b, covered);
    }
    memcpy (cur, got, rlen);
    for (c = 0; c < NR_CONN; c++)
      check_zero_claims (h[c], RACE_OFF, rlen, cur, "phase 2 after a round");

    /* Ordered: each request waited for, on different connections. */
    {
      struct nbd_handle *a = h[round % NR_CONN];
      struct nbd_handle *bb = h[(round + 1) % NR_CONN];
      struct nbd_handle *cc = h[(round + 2) % NR_CONN];
      struct nbd_handle *d = h[(round + 3) % NR_CONN];
      unsigned k = rnd_below (&w[0].rng, RACE_BLOCKS - 2);
      uint64_t koff = RACE_OFF + (uint64_t) k * BLK;
      uint32_t id = 0x40000000u + round;

      /* a: zero k..k+2 -> d reads zeros; zero claimed is fine. */
      if (nbd_zero (a, 3 * BLK, koff, 0) == -1) nbd_die ("nbd_zero");
      memset (cur + (size_t) k * BLK, 0, 3 * BLK);
      if (nbd_pread (d, got, 3 * BLK, koff, 0) == -1) nbd_die ("nbd_pread");
      for (b = 0; b < 3; b++)
        expect_block (got + b * BLK, k + b, cur + (size_t) (k + b) * BLK,
                      "after zero", round);
      if (all_zero_claimed (cc, koff, 3 * BLK))
        zero_claims++;

      /* b: data into block k -> c reads it; block status never ZERO. */
      fill_pattern (buf, id, k, 1);
      if (nbd_pwrite (bb, buf, BLK, koff, 0) == -1) nbd_die ("nbd_pwrite");
      memcpy (cur + (size_t) k * BLK, buf, BLK);
      if (nbd_pread (cc, got, BLK, koff, 0) == -1) nbd_die ("nbd_pread");
      expect_block (got, k, cur + (size_t) k * BLK, "after write", round);
      check_zero_claims (d, RACE_OFF, rlen, cur, "phase 2 after write");

      /* c: 100 bytes of data in the middle of block k+1 (known zero) ->
       * a reads them, b's block status does not claim ZERO there. */
      memset (buf, 0x5a, 100);
      if (nbd_pwrite (cc, buf, 100, koff + BLK + 1000, 0) == -1)
        nbd_die ("nbd_pwrite");
      memcpy (cur + (size_t) (k + 1) * BLK + 1000, buf, 100);
      check_zero_claims (bb, RACE_OFF, rlen, cur, "phase 2 after small write");
      if (nbd_pread (a, got, 2 * BLK, koff + BLK, 0) == -1)
        nbd_die ("nbd_pread");
      for (b = 0; b < 2; b++)
        expect_block (got + b * BLK, k + 1 + b,
                      cur + (size_t) (k + 1 + b) * BLK,
                      "after small write", round);

      /* d: zeros written as data over block k -> a reads zeros. */
      memset (buf, 0, BLK);
      if (nbd_pwrite (d, buf, BLK, koff, 0) == -1) nbd_die ("nbd_pwrite");
      memset (cur + (size_t) k * BLK, 0, BLK);
      if (nbd_pread (a, got, BLK, koff, 0) == -1) nbd_die ("nbd_pread");
      expect_block (got, k, cur + (size_t) k * BLK, "after zero write",
                    round);
    }
  }
  race_done = true;
  pthread_barrier_wait (&barrier);
  for (c = 0; c < NR_CONN; c++) {
    pthread_join (th[c], NULL);
    for (i = 0; i < MAX_RACE_OPS; i++)
      free (w[c].ops[i].buf);
  }
  pthread_barrier_destroy (&barrier);
  if (failed)
    die ("phase 2: requests failed (see above)");
  fprintf (stderr, "phase 2: %u rounds; zero claimed after %lu of the "
           "ordered zero requests\n", round, zero_claims);
  free (cur);
  free (got);
  free (buf);
}
