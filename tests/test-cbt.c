/* sparsebackup: unit tests of common/cbt*.c (persistent changed-block
 * tracking).
 *
 *  - a model test: random marks, checkpoints created (good and
 *    pending), confirmed, failed, deleted, and clean reopens, in both
 *    durability modes, compared after every step with a reference model
 *    in which every checkpoint simply keeps the set of granules marked
 *    since it was created;
 *  - names;
 *  - in-use detection: a child that marks and exits without closing
 *    leaves a file whose checkpoints are invalidated at the next load;
 *  - write-ahead crash: a child marks + commits in a loop and is killed
 *    with SIGKILL at a random moment; every mark it had committed must
 *    be in the set, and its checkpoints valid (a backup it had begun is
 *    merged back);
 *  - a write error (RLIMIT_FSIZE below the current bitmap) in
 *    write-ahead mode: the commit fails with EIO, and so does everything
 *    after it; the file still loads with what was committed before;
 *  - group commit from several threads.
 *
 * The load checks are in test-cbt-load.c, the shared helpers in
 * cbt-test-lib.h.  Exit status 1 if anything failed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <zlib.h>

#include "cbt.h"

#define TEST_NAME "test-cbt"
#include "cbt-test-lib.h"

static uint64_t rnd_state = 0x2545F4914F6CDD1DULL;

static uint64_t
rnd (void)
{
  rnd_state ^= rnd_state >> 12;
  rnd_state ^= rnd_state << 25;
  rnd_state ^= rnd_state >> 27;
  return rnd_state * 0x2545F4914F6CDD1DULL;
}

/* ---- Reference model ----------------------------------------------- */

struct mcp {
  char name[CBT_NAME_MAX + 1];
  bool pending;
  uint8_t since[NR_GRAN];
};

static struct mcp model[MAX_CPS + 1];
static size_t nmodel;

static void
model_delete (size_t k)
{
  memmove (&model[k], &model[k + 1], (nmodel - k - 1) * sizeof model[0]);
  nmodel--;
}

static void
compare (struct cbt *c, const char *when)
{
  CHECK (cbt_checkpoint_count (c) == nmodel);
  for (size_t i = 0; i < nmodel; ++i) {
    struct cbt_checkpoint_info ci;
    uint8_t *g;

    if (cbt_checkpoint_get (c, i, &ci) == -1) {
      FAIL ("%s: checkpoint %zu missing", when, i);
      continue;
    }
    if (strcmp (ci.name, model[i].name) != 0 ||
        (ci.state == CBT_STATE_PENDING) != model[i].pending)
      FAIL ("%s: checkpoint %zu is '%s' state %d, model '%s' pending %d",
            when, i, ci.name, ci.state, model[i].name, model[i].pending);
    if (model[i].pending)
      continue;
    g = changed_since (c, model[i].name);
    for (size_t j = 0; j < NR_GRAN; ++j)
      if (g[j] != model[i].since[j]) {
        FAIL ("%s: since '%s': granule %zu is %d, model %d", when,
              model[i].name, j, g[j], model[i].since[j]);
        break;
      }
    free (g);
  }
}

static void
model_test (enum cbt_mode mode, unsigned steps)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  struct cbt *c;
  unsigned names = 0;

  o.reset = true;
  c = xopen (&o, NULL);
  o.reset = false;
  nmodel = 0;
  for (unsigned step = 0; step < steps; ++step) {
    unsigned op = rnd () % 100;
    char when[64];

    snprintf (when, sizeof when, "mode %d step %u op %u", mode, step, op);
    if (op < 60) {                      /* mark */
      uint64_t off = rnd () % DISK, len = 1 + rnd () % (GRAN * 20), t;
      if (rnd () % 4 == 0)
        off -= off % GRAN;
      if (len > DISK - off)
        len = DISK - off;
      if (cbt_mark (c, off, len, &t) == -1)
        FAIL ("cbt_mark: %m%s", "");
      if (mode == CBT_MODE_IN_USE)
        CHECK (t == 0);
      if (cbt_commit (c, t) == -1)
        FAIL ("cbt_commit: %m%s", "");
      CHECK (cbt_is_durable (c, off, len));
      for (size_t i = 0; i < nmodel; ++i)
        for (uint64_t g = off / GRAN; g <= (off + len - 1) / GRAN; ++g)
          model[i].since[g] = 1;
    }
    else if (op < 72) {                 /* create */
      bool pending = rnd () % 2;
      bool busy = nmodel > 0 && model[nmodel - 1].pending;
      char name[32];
      int r;

      if (nmodel == MAX_CPS) {
        r = cbt_checkpoint_delete (c, model[0].name, err, sizeof err);
        CHECK (r == 0);
        model_delete (0);
        continue;
      }
      snprintf (name, sizeof name, "cp-%u", names++);
      r = cbt_checkpoint_create (c, name, pending, err, sizeof err);
      if (busy) {
        CHECK (r == -1 && errno == EBUSY);
        continue;
      }
      if (r == -1) {
        FAIL ("create %s: %s", name, err);
        continue;
      }
      strcpy (model[nmodel].name, name);
      model[nmodel].pending = pending;
      memset (model[nmodel].since, 0, NR_GRAN);
      nmodel++;
    }
    else if (op < 80) {                 /* end a pending backup */
      if (nmodel == 0 || !model[nmodel - 1].pending)
        continue;
      if (rnd () % 2) {
        CHECK (cbt_checkpoint_confirm (c, model[nmodel - 1].name,
                                       err, sizeof err) == 0);
        model[nmodel - 1].pending = false;
      }
      else {
        CHECK (cbt_checkpoint_fail (c, model[nmodel - 1].name,
                                    err, sizeof err) == 0);
        model_delete (nmodel - 1);
      }
    }
    else if (op < 90) {                 /* delete */
      size_t k;

      if (nmodel == 0) {
        CHECK (cbt_checkpoint_delete (c, "nope", err, sizeof err) == -1 &&
               errno == ENOENT);
        continue;
      }
      k = rnd () % nmodel;
      if (cbt_checkpoint_delete (c, model[k].name, err, sizeof err) == -1)
        FAIL ("delete %s: %s", model[k].name, err);
      model_delete (k);
    }
    else if (op < 95) {                 /* clean reopen */
      struct cbt_load_info info;

      xclose (c);
      c = xopen (&o, &info);
      CHECK (!info.invalidated && !info.created);
      if (nmodel > 0 && model[nmodel - 1].pending) {
        CHECK (info.dropped == 1);      /* pending at load: merged back */
        model_delete (nmodel - 1);
      }
    }
    else {                              /* bad calls */
      CHECK (cbt_mark (c, DISK, 1, NULL) == -1 && errno == EINVAL);
      CHECK (cbt_checkpoint_create (c, "bad name", false, err,
                                    sizeof err) == -1 && errno == EINVAL);
      CHECK (cbt_checkpoint_create (c, "-x", false, err,
                                    sizeof err) == -1 && errno == EINVAL);
      if (nmodel > 0) {
        CHECK (cbt_checkpoint_create (c, model[0].name, false, err,
                                      sizeof err) == -1 && errno == EEXIST);
        if (model[0].pending)
          CHECK (cbt_map (c, model[0].name, collect, NULL, err,
                          sizeof err) == -1);
        else
          CHECK (cbt_checkpoint_fail (c, model[0].name, err,
                                      sizeof err) == -1 && errno == EINVAL);
      }
    }
    compare (c, when);
    if (failures)
      break;
  }
  xclose (c);
  /* Round trip: what was stored loads back the same. */
  c = xopen (&o, NULL);
  if (nmodel > 0 && model[nmodel - 1].pending)
    model_delete (nmodel - 1);
  compare (c, "final reopen");
  xclose (c);
}

/* ---- Crashes ------------------------------------------------------- */

/* Default mode: a child marks (or not) and exits without closing. */
static void
in_use_test (bool do_mark)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt_load_info info;
  struct cbt *c;
  pid_t pid;
  int status;

  make_good ();
  pid = fork ();
  if (pid == 0) {
    c = xopen (&o, NULL);
    if (do_mark && cbt_mark (c, 5 * GRAN, GRAN, NULL) == -1)
      _exit (2);
    _exit (0);                  /* no cbt_close */
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status) &&
         WEXITSTATUS (status) == 0);
  c = xopen (&o, &info);
  if (do_mark) {
    CHECK (info.invalidated && info.dropped == 3);
    CHECK (strstr (info.message, "next backup must be full") != NULL);
    CHECK (cbt_checkpoint_count (c) == 0);
  }
  else {
    CHECK (!info.invalidated && cbt_checkpoint_count (c) == 3);
  }
  xclose (c);
  if (do_mark) {                /* and the invalidation was stored */
    c = xopen (&o, &info);
    CHECK (!info.invalidated && cbt_checkpoint_count (c) == 0);
    xclose (c);
  }
}

/* Write-ahead mode: a child marks and commits, reporting each committed
 * range on a pipe, until the parent kills it.
 */
static void
wal_crash_test (unsigned round)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t want[NR_GRAN] = { 0 }, *got;
  uint64_t r[2];
  int fds[2], status;
  unsigned n = 0, kill_after = 20 + (unsigned) (rnd () % 300);
  pid_t pid;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 0, GRAN, NULL) == 0);
  xclose (c);
  o.reset = false;
  if (pipe (fds) == -1)
    exit (EXIT_FAILURE);
  want[0] = 1;

  pid = fork ();
  if (pid == 0) {
    uint64_t seed = rnd_state + round;
    close (fds[0]);
    c = xopen (&o, NULL);
    /* Round 1 mod 3: a second checkpoint; 2 mod 3: a backup that is
     * still pending when the child dies (merged back at load).
     */
    if (round % 3 &&
        cbt_checkpoint_create (c, round % 3 == 1 ? "later" : "backup",
                               round % 3 == 2, err, sizeof err) == -1)
      _exit (2);
    for (;;) {
      uint64_t t;
      seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
      r[0] = (seed >> 20) % DISK;
      r[1] = 1 + (seed >> 8) % (3 * GRAN);
      if (r[1] > DISK - r[0])
        r[1] = DISK - r[0];
      if (cbt_mark (c, r[0], r[1], &t) == -1 || cbt_commit (c, t) == -1)
        _exit (3);
      if (write (fds[1], r, sizeof r) != sizeof r)
        _exit (4);
    }
  }
  close (fds[1]);
  while (read (fds[0], r, sizeof r) == sizeof r) {
    for (uint64_t g = r[0] / GRAN; g <= (r[0] + r[1] - 1) / GRAN; ++g)
      want[g] = 1;
    if (++n == kill_after)
      kill (pid, SIGKILL);      /* what it wrote before dying counts */
  }
  close (fds[0]);
  CHECK (waitpid (pid, &status, 0) == pid && WIFSIGNALED (status));

  c = xopen (&o, &info);
  CHECK (!info.invalidated);
  CHECK (info.dropped == (round % 3 == 2 ? 1u : 0u));
  CHECK (cbt_checkpoint_count (c) == (round % 3 == 1 ? 2u : 1u));
  got = changed_since (c, "base");
  for (size_t g = 0; g < NR_GRAN; ++g)
    if (want[g] && !got[g]) {
      FAIL ("round %u: granule %zu was committed but is not in the set "
            "after kill -9", round, g);
      break;
    }
  free (got);
  xclose (c);
}

/* A child leaves the file open in MODE after a mark (committed). */
static void
child_marks (enum cbt_mode mode, uint64_t off, struct cbt_load_info *info)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  pid_t pid = fork ();
  int status;

  if (pid == 0) {
    struct cbt *c = xopen (&o, info);
    uint64_t t;
    if (cbt_mark (c, off, 1, &t) == -1 || cbt_commit (c, t) == -1)
      _exit (2);
    _exit (info->invalidated ? 3 : 0);
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status) &&
         WEXITSTATUS (status) == 0);
}

/* Crashed in write-ahead mode, then reopened and crashed in in-use
 * mode: the second crash must invalidate (its marks were in memory).
 */
static void
mode_switch_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  xclose (c);
  child_marks (CBT_MODE_WRITE_AHEAD, 10 * GRAN, &info);
  child_marks (CBT_MODE_IN_USE, 20 * GRAN, &info);
  o.reset = false;
  c = xopen (&o, &info);
  CHECK (info.invalidated && cbt_checkpoint_count (c) == 0);
  xclose (c);
}

/* ---- Write errors -------------------------------------------------- */

/* In a child: writes at or past the current bitmap fail (EFBIG). */
static void
write_error_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t *f, *got;
  size_t len;
  uint64_t cur_off, t;
  pid_t pid;
  int status;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 3 * GRAN, 1, &t) == 0 && cbt_commit (c, t) == 0);
  xclose (c);
  o.reset = false;
  read_file (&f, &len);
  cur_off = get64 (active_sb (f) + SB_CUR_OFF);
  free (f);

  pid = fork ();
  if (pid == 0) {
    struct rlimit rl = { .rlim_cur = cur_off, .rlim_max = RLIM_INFINITY };
    int code = 0;

    signal (SIGXFSZ, SIG_IGN);
    c = xopen (&o, NULL);
    if (setrlimit (RLIMIT_FSIZE, &rl) == -1)
      _exit (10);
    if (cbt_mark (c, 400 * GRAN, 1, &t) == -1 || t == 0)
      code |= 1;                /* the mark itself is in memory */
    if (cbt_commit (c, t) != -1 || errno != EIO)
      code |= 2;                /* the page write fails */
    if (cbt_mark (c, 500 * GRAN, 1, &t) != -1 || errno != EIO)
      code |= 4;                /* sticky */
    if (cbt_checkpoint_create (c, "x", false, err, sizeof err) != -1 ||
        errno != EIO || strstr (err, "earlier write") == NULL)
      code |= 8;
    if (cbt_close (c, err, sizeof err) != -1)
      code |= 16;
    _exit (code);
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status));
  if (WEXITSTATUS (status) != 0)
    FAIL ("write error child: status %d", WEXITSTATUS (status));
  c = xopen (&o, &info);
  CHECK (!info.invalidated && cbt_checkpoint_count (c) == 1);
  got = changed_since (c, "base");
  CHECK (got[3]);
  free (got);
  xclose (c);
}

/* ---- Group commit from threads ------------------------------------- */

static struct cbt *gc_cbt;

static void *
gc_thread (void *arg)
{
  uint64_t seed = (uintptr_t) arg;

  for (int i = 0; i < 300; ++i) {
    uint64_t t, off;
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    off = (seed >> 16) % DISK;
    /* (cbt_is_durable may be false again at once: another thread may
     * have changed the same page since.)
     */
    if (cbt_mark (gc_cbt, off, 1, &t) == -1 || cbt_commit (gc_cbt, t) == -1)
      return (void *) 1;
  }
  return NULL;
}

static void
group_commit_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  pthread_t th[4];
  struct cbt_stats st;
  void *ret;

  o.reset = true;
  gc_cbt = xopen (&o, NULL);
  for (uintptr_t i = 0; i < 4; ++i)
    pthread_create (&th[i], NULL, gc_thread, (void *) (i + 1));
  for (int i = 0; i < 4; ++i) {
    pthread_join (th[i], &ret);
    CHECK (ret == NULL);
  }
  cbt_get_stats (gc_cbt, &st);
  printf ("test-cbt: group commit: %" PRIu64 " marks, %" PRIu64
          " waiting commits, %" PRIu64 " syncs, %" PRIu64 " pages\n",
          st.marks, st.commits, st.syncs, st.pages_written);
  CHECK (st.syncs <= st.commits && st.syncs > 0);
  xclose (gc_cbt);
}

/* cbt_map_range: granules since FROM until UNTIL over [START, END), as
 * a string of granule numbers ("10 11 20").
 */
static int
range_map (struct cbt *c, const char *from, const char *until,
           uint64_t start, uint64_t end, char *out, size_t outlen)
{
  struct set_ctx s = {
    .gran = cbt_granularity (c), .disk_size = cbt_disk_size (c),
  };
  size_t len = 0;
  int r;

  s.nr = (s.disk_size + s.gran - 1) / s.gran;
  s.g = calloc (s.nr, 1);
  r = cbt_map_range (c, from, until, start, end, collect, &s, err,
                     sizeof err);
  CHECK (!s.bad);
  out[0] = '\0';
  for (uint64_t g = 0; g < s.nr && len < outlen; ++g)
    if (s.g[g])
      len += snprintf (out + len, outlen - len, "%s%" PRIu64,
                       len ? " " : "", g);
  free (s.g);
  return r;
}

static void
map_range_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt *c;
  char got[256];

  unlink (path);
  c = xopen (&o, NULL);
#define MARK(g) CHECK (cbt_mark (c, (uint64_t) (g) * GRAN, 1, NULL) == 0)
#define EXPECT(from, until, start, end, want)                           \
  do {                                                                  \
    if (range_map (c, from, until, start, end, got, sizeof got) == -1)  \
      FAIL ("map_range %s..%s: %s", from, until ? until : "now", err);  \
    else if (strcmp (got, want) != 0)                                   \
      FAIL ("map_range %s..%s [%" PRIu64 ", %" PRIu64 "): '%s', "       \
            "expected '%s'", from, until ? until : "now",               \
            (uint64_t) (start), (uint64_t) (end), got, want);           \
  } while (0)
  MARK (1); MARK (2);
  CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
  MARK (10); MARK (11);
  CHECK (cbt_checkpoint_create (c, "b", false, err, sizeof err) == 0);
  MARK (20);
  CHECK (cbt_checkpoint_create (c, "c", true, err, sizeof err) == 0);
  MARK (30); MARK (NR_GRAN - 1);
  EXPECT ("a", "c", 0, DISK, "10 11 20");
  EXPECT ("a", "b", 0, DISK, "10 11");
  EXPECT ("b", "c", 0, DISK, "20");
  EXPECT ("a", NULL, 0, DISK, "10 11 20 30 699");
  EXPECT ("a", NULL, 0, UINT64_MAX, "10 11 20 30 699");
  EXPECT ("a", NULL, 11 * GRAN + 5, 21 * GRAN, "11 20");
  EXPECT ("a", "c", 11 * GRAN + 5, 20 * GRAN, "11");
  EXPECT ("a", NULL, DISK - 1, DISK, "699");
  EXPECT ("a", NULL, DISK, DISK + 10, "");
  EXPECT ("b", NULL, 12 * GRAN, 20 * GRAN, "");
  CHECK (range_map (c, "b", "a", 0, DISK, got, sizeof got) == -1 &&
         errno == EINVAL);
  CHECK (strstr (err, "checkpoint 'a' is not newer than 'b'") != NULL);
  CHECK (range_map (c, "a", "zz", 0, DISK, got, sizeof got) == -1 &&
         errno == ENOENT);
  CHECK (range_map (c, "c", NULL, 0, DISK, got, sizeof got) == -1 &&
         errno == EINVAL);
#undef MARK
#undef EXPECT
  xclose (c);
  unlink (path);
}

int
main (void)
{
  cbt_test_start ();

  CHECK (cbt_name_valid ("a") && cbt_name_valid ("backup-2024.01_x"));
  CHECK (!cbt_name_valid ("") && !cbt_name_valid ("a b") &&
         !cbt_name_valid ("-a") && !cbt_name_valid ("\x7f"));
  {
    char longname[CBT_NAME_MAX + 2];
    memset (longname, 'n', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    CHECK (!cbt_name_valid (longname));
    longname[CBT_NAME_MAX] = '\0';
    CHECK (cbt_name_valid (longname));
  }

  model_test (CBT_MODE_IN_USE, 1500);
  model_test (CBT_MODE_WRITE_AHEAD, 1500);
  printf ("test-cbt: model tests done\n");
  in_use_test (true);
  in_use_test (false);
  for (unsigned round = 0; round < 6; ++round)
    wal_crash_test (round);
  printf ("test-cbt: crash tests done\n");
  mode_switch_test ();
  write_error_test ();
  group_commit_test ();
  map_range_test ();
  printf ("test-cbt: map range test done\n");

  return cbt_test_end ();
}
