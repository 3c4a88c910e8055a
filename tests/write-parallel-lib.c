/* test-write-parallel: its shared parts (see write-parallel.h): the
 * globals, cleanup and failing, random numbers (one generator per
 * thread), the model of the disk, the server and the connections, and
 * block status checks.
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

char tmpdir[] = "/tmp/sparsebackup-parallel.XXXXXX";
char sock[256], disk[256];
pid_t server_pid = -1;
struct nbd_handle *h[NR_CONN];

uint8_t *model;          /* expected contents */
uint8_t *undef;          /* bitmap: byte is undefined (trimmed) */
volatile int failed;
bool no_fast_zero;

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

void
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

void __attribute__ ((noreturn, format (printf, 1, 2)))
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

void
nbd_die (const char *what)
{
  die ("%s: %s", what, nbd_get_error ());
}

/* ---- random numbers (one generator per thread) ---------------------- */

static uint64_t
rnd (struct rng *r)
{
  /* xorshift64* */
  r->s ^= r->s >> 12;
  r->s ^= r->s << 25;
  r->s ^= r->s >> 27;
  return r->s * 0x2545F4914F6CDD1DULL;
}

uint64_t
rnd_below (struct rng *r, uint64_t n)
{
  return n ? rnd (r) % n : 0;
}

/* ---- the model ------------------------------------------------------- */

void
set_undef (uint64_t off, uint64_t len, bool u)
{
  uint64_t i;
  for (i = off; i < off + len; i++) {
    if (u) undef[i >> 3] |= 1u << (i & 7);
    else   undef[i >> 3] &= ~(1u << (i & 7));
  }
}

bool
is_undef (uint64_t i)
{
  return undef[i >> 3] & (1u << (i & 7));
}

void
model_write (uint64_t off, const void *buf, uint64_t len)
{
  memcpy (model + off, buf, len);
  set_undef (off, len, false);
}

void
model_zero (uint64_t off, uint64_t len)
{
  memset (model + off, 0, len);
  set_undef (off, len, false);
}

/* ---- the server ------------------------------------------------------ */

void
start_server (const char *const *extra, const char *const *params)
{
  const char *argv[32];
  int i = 0, j, status;
  struct stat st;
  time_t t0;
  char pidfile[sizeof sock + 8];

  /* nbdkit writes its pid file once its socket is listening: the socket
   * file alone appears at bind(), before listen(), and a connection in
   * between is refused (seen under load in the sanitizer build).
   */
  snprintf (pidfile, sizeof pidfile, "%s.pid", sock);
  argv[i++] = "nbdkit";
  argv[i++] = "-f";
  argv[i++] = "--exit-with-parent";
  argv[i++] = "-U";
  argv[i++] = sock;
  argv[i++] = "-P";
  argv[i++] = pidfile;
  argv[i++] = "--filter=sparsebackup";
  for (j = 0; extra && extra[j]; j++)
    argv[i++] = extra[j];
  /* A layer below that advertises fast zero and refuses every one (the
   * file plugin of nbdkit 1.32 has none, and the filter advertises fast
   * zero exactly when the layer below does): fast zeros are answered at
   * once over known-zero blocks and refused elsewhere, on every nbdkit.
   */
  argv[i++] = "--filter=nozero";
  argv[i++] = "file";
  argv[i++] = disk;
  argv[i++] = "zeromode=plugin";
  argv[i++] = "fastzeromode=slow";
  for (j = 0; params && params[j]; j++)
    argv[i++] = params[j];
  argv[i] = NULL;

  unlink (sock);
  unlink (pidfile);
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
  while (stat (pidfile, &st) == -1 || st.st_size == 0 ||
         stat (sock, &st) == -1 || !S_ISSOCK (st.st_mode)) {
    if (waitpid (server_pid, &status, WNOHANG) == server_pid) {
      server_pid = -1;
      if (WIFEXITED (status) && WEXITSTATUS (status) == 126) {
        fprintf (stderr, "test-write-parallel: SKIP: cannot run nbdkit\n");
        cleanup ();
        exit (77);
      }
      die ("nbdkit exited during start-up");
    }
    if (time (NULL) - t0 > 120)
      die ("nbdkit did not write %s and listen on %s within 120 s",
           pidfile, sock);
    usleep (20000);
  }
}

void
stop_server (void)
{
  int status;

  if (server_pid <= 0)
    return;
  kill (server_pid, SIGTERM);
  if (wait_server (120, &status) == -1)
    die ("nbdkit did not exit within 120 s of SIGTERM");
  server_pid = -1;
  if (WIFSIGNALED (status) && WTERMSIG (status) != SIGTERM)
    die ("nbdkit died of signal %d", WTERMSIG (status));
  if (WIFEXITED (status) && WEXITSTATUS (status) != 0)
    die ("nbdkit exited with status %d", WEXITSTATUS (status));
}

void
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
  /* Fast zero is advertised over nozero fastzeromode=slow (at once over
   * known-zero blocks, ENOTSUP otherwise): a deferred failure, so that
   * the rest of the test still runs. */
  if (nbd_can_fast_zero (h[0]) != 1) {
    fprintf (stderr, "test-write-parallel: fast zero is not advertised\n");
    no_fast_zero = true;
  }
}

void
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
void
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

bool
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

/* ---- reading --------------------------------------------------------- */

void
read_range (struct nbd_handle *hh, uint8_t *buf, uint64_t off, uint64_t len)
{
  while (len > 0) {
    uint64_t n = len > (4u << 20) ? (4u << 20) : len;
    if (nbd_pread (hh, buf, n, off, 0) == -1)
      nbd_die ("nbd_pread");
    buf += n; off += n; len -= n;
  }
}
