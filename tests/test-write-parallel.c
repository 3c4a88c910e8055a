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

#define NR_CONN     4
#define DISK_SIZE   (64 * 1024 * 1024ULL)
#define BLK         4096u
#define REGION      (15 * 1024 * 1024ULL)     /* phase 1, per connection */
#define FEATURE_OFF (60 * 1024 * 1024ULL)     /* 1 MiB */
#define RACE_OFF    (62 * 1024 * 1024ULL)
#define RACE_BLOCKS 16
#define MAX_INFLIGHT 16
#define OPS_PER_CONN 300
#define MAX_LEN     (256 * 1024u)
#define ROUNDS      150

static char tmpdir[] = "/tmp/sparsebackup-parallel.XXXXXX";
static char sock[256], disk[256];
static pid_t server_pid = -1;
static struct nbd_handle *h[NR_CONN];

static uint8_t *model;          /* expected contents */
static uint8_t *undef;          /* bitmap: byte is undefined (trimmed) */
static volatile int failed;
static bool no_fast_zero;

/* Wait up to SECS seconds for the server to exit; -1 if it did not. */
static int
wait_server (int secs, int *status)
{
  int i;

  for (i = 0; i < secs * 50; i++) {
    if (waitpid (server_pid, status, WNOHANG) == server_pid)
      return 0;
    usleep (20000);
  }
  return -1;
}

static void
cleanup (void)
{
  char cmd[512];
  int status;

  /* On failure: handles may be in use by other threads, and nbdkit may
   * wait for its connections, so do not ask politely. */
  if (server_pid > 0) {
    kill (server_pid, SIGKILL);
    wait_server (10, &status);
    server_pid = -1;
  }
  snprintf (cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
  if (tmpdir[0] == '/' && strstr (tmpdir, "XXXXXX") == NULL)
    if (system (cmd) == -1) { /* ignore */ }
}

static void __attribute__ ((noreturn, format (printf, 1, 2)))
die (const char *fs, ...)
{
  va_list args;

  va_start (args, fs);
  fprintf (stderr, "test-write-parallel: FAIL: ");
  vfprintf (stderr, fs, args);
  fprintf (stderr, "\n");
  va_end (args);
  cleanup ();
  exit (EXIT_FAILURE);
}

static void
nbd_die (const char *what)
{
  die ("%s: %s", what, nbd_get_error ());
}

/* ---- random numbers (one generator per thread) ---------------------- */

struct rng { uint64_t s; };

static uint64_t
rnd (struct rng *r)
{
  /* xorshift64* */
  r->s ^= r->s >> 12;
  r->s ^= r->s << 25;
  r->s ^= r->s >> 27;
  return r->s * 0x2545F4914F6CDD1DULL;
}

static uint64_t
rnd_below (struct rng *r, uint64_t n)
{
  return n ? rnd (r) % n : 0;
}

/* ---- the model ------------------------------------------------------- */

static void
set_undef (uint64_t off, uint64_t len, bool u)
{
  uint64_t i;
  for (i = off; i < off + len; i++) {
    if (u) undef[i >> 3] |= 1u << (i & 7);
    else   undef[i >> 3] &= ~(1u << (i & 7));
  }
}

static bool
is_undef (uint64_t i)
{
  return undef[i >> 3] & (1u << (i & 7));
}

static void
model_write (uint64_t off, const void *buf, uint64_t len)
{
  memcpy (model + off, buf, len);
  set_undef (off, len, false);
}

static void
model_zero (uint64_t off, uint64_t len)
{
  memset (model + off, 0, len);
  set_undef (off, len, false);
}

/* ---- the server ------------------------------------------------------ */

static void
start_server (const char *const *extra, const char *const *params)
{
  const char *argv[32];
  int i = 0, j, status;
  struct stat st;
  time_t t0;

  argv[i++] = "nbdkit";
  argv[i++] = "-f";
  argv[i++] = "--exit-with-parent";
  argv[i++] = "-U";
  argv[i++] = sock;
  argv[i++] = "--filter=sparsebackup";
  for (j = 0; extra && extra[j]; j++)
    argv[i++] = extra[j];
  argv[i++] = "file";
  argv[i++] = disk;
  for (j = 0; params && params[j]; j++)
    argv[i++] = params[j];
  argv[i] = NULL;

  unlink (sock);
  fprintf (stderr, "starting:");
  for (j = 0; argv[j]; j++)
    fprintf (stderr, " %s", argv[j]);
  fprintf (stderr, "\n");

  server_pid = fork ();
  if (server_pid == -1)
    die ("fork: %m");
  if (server_pid == 0) {
    execvp ("nbdkit", (char **) argv);
    perror ("nbdkit");
    _exit (126);
  }
  t0 = time (NULL);
  while (stat (sock, &st) == -1 || !S_ISSOCK (st.st_mode)) {
    if (waitpid (server_pid, &status, WNOHANG) == server_pid) {
      server_pid = -1;
      if (WIFEXITED (status) && WEXITSTATUS (status) == 126) {
        fprintf (stderr, "test-write-parallel: SKIP: cannot run nbdkit\n");
        cleanup ();
        exit (77);
      }
      die ("nbdkit exited during start-up");
    }
    if (time (NULL) - t0 > 30)
      die ("nbdkit did not create %s", sock);
    usleep (20000);
  }
}

static void
stop_server (void)
{
  int status;

  if (server_pid <= 0)
    return;
  kill (server_pid, SIGTERM);
  if (wait_server (30, &status) == -1)
    die ("nbdkit did not exit within 30 s of SIGTERM");
  server_pid = -1;
  if (WIFSIGNALED (status) && WTERMSIG (status) != SIGTERM)
    die ("nbdkit died of signal %d", WTERMSIG (status));
  if (WIFEXITED (status) && WEXITSTATUS (status) != 0)
    die ("nbdkit exited with status %d", WEXITSTATUS (status));
}

static void
connect_all (void)
{
  int i;

  for (i = 0; i < NR_CONN; i++) {
    h[i] = nbd_create ();
    if (h[i] == NULL)
      nbd_die ("nbd_create");
    if (nbd_add_meta_context (h[i], LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
      nbd_die ("nbd_add_meta_context");
    if (nbd_connect_unix (h[i], sock) == -1)
      nbd_die ("nbd_connect_unix");
    if (nbd_get_size (h[i]) != (int64_t) DISK_SIZE)
      die ("unexpected export size %" PRIi64, nbd_get_size (h[i]));
  }
  /* The filter can always answer fast zero (at once over known-zero
   * blocks, ENOTSUP otherwise): a deferred failure, so that the rest of
   * the test still runs. */
  if (nbd_can_fast_zero (h[0]) != 1) {
    fprintf (stderr, "test-write-parallel: fast zero is not advertised\n");
    no_fast_zero = true;
  }
}

static void
close_all (void)
{
  int i;

  for (i = 0; i < NR_CONN; i++) {
    if (nbd_shutdown (h[i], 0) == -1)
      nbd_die ("nbd_shutdown");
    nbd_close (h[i]);
    h[i] = NULL;
  }
}

/* ---- block status ---------------------------------------------------- */

/* Collect [offset, offset+len) ranges reported with NBD_STATE_ZERO. */
struct zero_ranges {
  uint64_t (*r)[2];
  size_t n, alloc;
  uint64_t next;                /* end of what was reported */
};

static int
extent_cb (void *vp, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr, int *error)
{
  struct zero_ranges *z = vp;
  size_t i;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  for (i = 0; i + 1 < nr; i += 2) {
    if (entries[i] == 0)
      die ("block status: zero-length extent at %" PRIu64, offset);
    if (entries[i + 1] & LIBNBD_STATE_ZERO) {
      if (z->n == z->alloc) {
        z->alloc = z->alloc ? z->alloc * 2 : 64;
        z->r = realloc (z->r, z->alloc * sizeof *z->r);
        if (z->r == NULL)
          die ("realloc: %m");
      }
      z->r[z->n][0] = offset;
      z->r[z->n][1] = entries[i];
      z->n++;
    }
    offset += entries[i];
  }
  z->next = offset;
  return 0;
}

/* Block status over [off, off+len) (several requests if needed); every
 * range claimed ZERO must be zero in CONTENT (the bytes of that range).
 */
static void
check_zero_claims (struct nbd_handle *hh, uint64_t off, uint64_t len,
                   const uint8_t *content, const char *what)
{
  struct zero_ranges z = { 0 };
  uint64_t pos = off, end = off + len, i, k;

  while (pos < end) {
    uint64_t n = end - pos > (1u << 30) ? (1u << 30) : end - pos;
    z.next = pos;
    if (nbd_block_status (hh, n, pos,
                          (nbd_extent_callback) { .callback = extent_cb,
                                                  .user_data = &z }, 0) == -1)
      nbd_die ("nbd_block_status");
    if (z.next <= pos)
      die ("%s: block status made no progress at %" PRIu64, what, pos);
    pos = z.next;
  }
  for (i = 0; i < z.n; i++) {
    uint64_t s = z.r[i][0], e = s + z.r[i][1];
    if (s < off) s = off;
    if (e > end) e = end;
    for (k = s; k < e; k++)
      if (content[k - off] != 0)
        die ("%s: block status claims ZERO over [%" PRIu64 ", %" PRIu64
             ") but byte %" PRIu64 " is 0x%02x", what, z.r[i][0],
             z.r[i][0] + z.r[i][1], k, content[k - off]);
  }
  free (z.r);
}

static bool
all_zero_claimed (struct nbd_handle *hh, uint64_t off, uint64_t len)
{
  struct zero_ranges z = { 0 };
  uint64_t covered = 0, i;

  z.next = off;
  /* Ask repeatedly: a reply may be short. */
  while (z.next < off + len) {
    uint64_t pos = z.next;
    if (nbd_block_status (hh, off + len - pos, pos,
                          (nbd_extent_callback) { .callback = extent_cb,
                                                  .user_data = &z }, 0) == -1)
      nbd_die ("nbd_block_status");
    if (z.next <= pos)
      die ("block status made no progress");
  }
  for (i = 0; i < z.n; i++) {
    uint64_t s = z.r[i][0], e = s + z.r[i][1];
    if (s < off) s = off;
    if (e > off + len) e = off + len;
    if (e > s) covered += e - s;
  }
  free (z.r);
  return covered == len;
}

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
read_range (struct nbd_handle *hh, uint8_t *buf, uint64_t off, uint64_t len)
{
  while (len > 0) {
    uint64_t n = len > (4u << 20) ? (4u << 20) : len;
    if (nbd_pread (hh, buf, n, off, 0) == -1)
      nbd_die ("nbd_pread");
    buf += n; off += n; len -= n;
  }
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

static void
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

static void
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

static void
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
