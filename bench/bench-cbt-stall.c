/* sparsebackup: benchmark of the cbt library (common/cbt.h) alone: how
 * long a write waits for its mark while the checkpoints change, and how
 * large the file grows.
 *
 *   bench-cbt-stall FILE [SIZE [GRANULARITY [CHECKPOINTS [MODE [CHANGES]]]]]
 *
 * Defaults: a 1T disk, 512 byte granules, 16 checkpoints, write-ahead
 * mode (in-use, write-ahead or process-safe), 2000 changes per interval.
 * FILE is created afresh (reset).  Set-up: CHECKPOINTS times, CHANGES
 * marks of 4K at random offsets plus one 64M run (at a different place
 * each time), then a good checkpoint.  Then a thread marks 4K at random
 * offsets in a loop (and commits: a write as the filter records it), at
 * most BENCH_MARK_RATE marks a second (environment; default 20000, 0:
 * as fast as it can), while the main thread, after one idle second,
 * does each checkpoint change in turn: create (pending), confirm,
 * create (pending) + fail, delete a middle checkpoint, delete the last,
 * delete the first.  For each: how long the change took, how many marks
 * were made meanwhile, the 99th percentile and the longest of them (a
 * mark that began during the change), and the file's size afterwards.
 * The idle second gives the same figures without a change (on a loaded
 * machine its longest mark is the scheduler's, not the library's).
 *
 * Prints one line per phase; the goal (issue 17) is a longest mark of
 * at most 100 ms whatever the change.  Timings belong here, never in a
 * test.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "cbt.h"

static struct cbt *cbt;
static uint64_t disk_size;
static volatile int phase = -1;         /* -1: none; else index */
static volatile bool stop;

#define MAX_PHASES 16
#define MAX_SAMPLES (1 << 22)
static const char *phase_name[MAX_PHASES];
static double phase_max[MAX_PHASES];    /* seconds */
static float *phase_lat[MAX_PHASES];    /* every mark's, seconds */
static uint64_t phase_marks[MAX_PHASES];
static double mark_rate = 20000;
static double phase_secs[MAX_PHASES];
static uint64_t phase_size[MAX_PHASES];
static int nr_phases;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint64_t
rnd (uint64_t *s)
{
  *s ^= *s >> 12;
  *s ^= *s << 25;
  *s ^= *s >> 27;
  return *s * 0x2545F4914F6CDD1DULL;
}

static void
die (const char *what, const char *err)
{
  fprintf (stderr, "bench-cbt-stall: %s: %s\n", what, err);
  exit (EXIT_FAILURE);
}

static void
mark (uint64_t off, uint64_t len)
{
  uint64_t t;

  if (cbt_mark (cbt, off, len, &t) == -1 || cbt_commit (cbt, t) == -1)
    die ("mark", strerror (errno));
}

static void *
marker (void *arg)
{
  uint64_t s = (uintptr_t) arg, n = 0;
  double start = now ();

  while (!stop) {
    uint64_t off = rnd (&s) % (disk_size / 4096) * 4096;
    int p = phase;
    double t0 = now (), dt;

    if (mark_rate > 0 && n > (t0 - start) * mark_rate) {
      usleep (100);             /* ahead of the rate */
      continue;
    }
    n++;
    mark (off, 4096);
    dt = now () - t0;
    if (p >= 0) {
      pthread_mutex_lock (&mu);
      if (phase_marks[p] < MAX_SAMPLES)
        phase_lat[p][phase_marks[p]] = (float) dt;
      phase_marks[p]++;
      if (dt > phase_max[p])
        phase_max[p] = dt;
      pthread_mutex_unlock (&mu);
    }
  }
  return NULL;
}

static int
cmp_float (const void *a, const void *b)
{
  float x = *(const float *) a, y = *(const float *) b;
  return x < y ? -1 : x > y;
}

/* The 99th percentile of phase P's marks (seconds). */
static double
p99 (int p)
{
  uint64_t n = phase_marks[p] < MAX_SAMPLES ? phase_marks[p] : MAX_SAMPLES;

  if (n == 0)
    return 0;
  qsort (phase_lat[p], n, sizeof (float), cmp_float);
  return phase_lat[p][n * 99 / 100];
}

static uint64_t
file_size (const char *path)
{
  struct stat st;

  return stat (path, &st) == 0 ? (uint64_t) st.st_size : 0;
}

int
main (int argc, char **argv)
{
  const char *path = argc > 1 ? argv[1] : NULL;
  uint64_t size = argc > 2 ? strtoull (argv[2], NULL, 0) : UINT64_C (1) << 40;
  uint32_t gran = argc > 3 ? strtoul (argv[3], NULL, 0) : 512;
  unsigned ncp = argc > 4 ? strtoul (argv[4], NULL, 0) : 16;
  const char *mode = argc > 5 ? argv[5] : "write-ahead";
  unsigned changes = argc > 6 ? strtoul (argv[6], NULL, 0) : 2000;
  struct cbt_options o = {
    .granularity = gran, .identity = "bench", .create = true, .reset = true,
  };
  char err[CBT_ERRLEN], name[32], mid[32], last[32];
  uint64_t s = 42;
  pthread_t th;
  double t0;

  if (getenv ("BENCH_MARK_RATE"))
    mark_rate = strtod (getenv ("BENCH_MARK_RATE"), NULL);
  for (int p = 0; p < MAX_PHASES; ++p) {
    phase_lat[p] = malloc (MAX_SAMPLES * sizeof (float));
    if (phase_lat[p] == NULL)
      die ("malloc", strerror (errno));
  }
  if (path == NULL || size == 0 || ncp < 3) {
    fprintf (stderr, "usage: bench-cbt-stall FILE [SIZE [GRANULARITY "
             "[CHECKPOINTS>=3 [MODE [CHANGES]]]]]\n");
    return EXIT_FAILURE;
  }
  disk_size = o.disk_size = size;
  if (strcmp (mode, "in-use") == 0)
    o.mode = CBT_MODE_IN_USE;
  else if (strcmp (mode, "write-ahead") == 0)
    o.mode = CBT_MODE_WRITE_AHEAD;
#ifdef CBT_BOOT_ID_MAX
  else if (strcmp (mode, "process-safe") == 0) {
    o.mode = CBT_MODE_PROCESS_SAFE;
    o.boot_id = "bench-boot";
  }
#endif
  else
    die ("mode", mode);

  t0 = now ();
  if (cbt_open (path, &o, &cbt, NULL, err, sizeof err) == -1)
    die ("open", err);
  for (unsigned k = 1; k <= ncp; ++k) {
    uint64_t run = UINT64_C (64) << 20;
    uint64_t at = (size / (ncp + 1)) * k;

    for (unsigned i = 0; i < changes; ++i)
      mark (rnd (&s) % (size / 4096) * 4096, 4096);
    if (at + run > size)
      run = size - at;
    if (run)
      mark (at, run);
    snprintf (name, sizeof name, "c%u", k);
    if (cbt_checkpoint_create (cbt, name, false, err, sizeof err) == -1)
      die ("create", err);
  }
  printf ("set-up: %s disk of %" PRIu64 " bytes, granularity %" PRIu32
          ", %u checkpoints of %u random 4K changes + a 64M run: %.1f s, "
          "file %.1f MiB\n", mode, size, gran, ncp, changes, now () - t0,
          file_size (path) / 1048576.0);
  fflush (stdout);

  pthread_create (&th, NULL, marker, (void *) (uintptr_t) 7);

#define PHASE(label, call)                                              \
  do {                                                                  \
    int p_ = nr_phases++;                                               \
    double t_;                                                          \
    phase_name[p_] = (label);                                           \
    t_ = now ();                                                        \
    phase = p_;                                                         \
    if ((call) == -1)                                                   \
      die (label, err);                                                 \
    phase = -1;                                                         \
    phase_secs[p_] = now () - t_;                                       \
    phase_size[p_] = file_size (path);                                  \
    usleep (200000);                                                    \
  } while (0)

  {
    int p = nr_phases++;
    phase_name[p] = "idle (1 s)";
    phase = p;
    sleep (1);
    phase = -1;
    phase_secs[p] = 1;
    phase_size[p] = file_size (path);
  }
  snprintf (name, sizeof name, "c%u", ncp + 1);
  PHASE ("create pending", cbt_checkpoint_create (cbt, name, true,
                                                  err, sizeof err));
  PHASE ("confirm", cbt_checkpoint_confirm (cbt, name, err, sizeof err));
  snprintf (name, sizeof name, "c%u", ncp + 2);
  PHASE ("create pending 2", cbt_checkpoint_create (cbt, name, true,
                                                    err, sizeof err));
  PHASE ("fail", cbt_checkpoint_fail (cbt, name, err, sizeof err));
  snprintf (mid, sizeof mid, "c%u", ncp / 2);
  PHASE ("delete middle", cbt_checkpoint_delete (cbt, mid, err, sizeof err));
  snprintf (last, sizeof last, "c%u", ncp + 1);
  PHASE ("delete last", cbt_checkpoint_delete (cbt, last, err, sizeof err));
  PHASE ("delete first", cbt_checkpoint_delete (cbt, "c1", err, sizeof err));
#undef PHASE

  stop = true;
  pthread_join (th, NULL);
  printf ("marks of 4K at random offsets, at most %.0f a second (0: no "
          "limit), and their times (ms) during each change:\n", mark_rate);
  for (int p = 0; p < nr_phases; ++p)
    printf ("  %-18s took %8.3f s; %7" PRIu64 " marks, 99%% within %7.3f, "
            "the longest %8.3f; file %.1f MiB\n", phase_name[p],
            phase_secs[p], phase_marks[p], p99 (p) * 1000,
            phase_max[p] * 1000, phase_size[p] / 1048576.0);
  t0 = now ();
  if (cbt_close (cbt, err, sizeof err) == -1)
    die ("close", err);
  printf ("close: %.3f s, file %.1f MiB\n", now () - t0,
          file_size (path) / 1048576.0);
  return EXIT_SUCCESS;
}
