/* sparsebackup: unit tests of common/cbt*.c (persistent changed-block
 * tracking).
 *
 *  - a model test: random marks, checkpoints created (good and
 *    pending), confirmed, failed, deleted, and clean reopens, in the
 *    three durability modes, compared after every step with a reference
 *    model in which every checkpoint simply keeps the set of granules
 *    marked since it was created; serials never repeat and name the
 *    same checkpoint as its name (cbt_map_serial, find_serial);
 *  - names, serials of a name deleted and created again, the limit
 *    (EMLINK), write errors (EIO with the cause in the message); the
 *    callback of cbt_checkpoint_create_cb (a mark it makes is after the
 *    new checkpoint);
 *  - in-use detection: a child that marks and exits without closing
 *    leaves a file whose checkpoints are invalidated at the next load;
 *  - kill -9 (SIGKILL) of a child that marks (and commits) in one thread
 *    and creates, confirms, fails and deletes checkpoints in another, in
 *    the three modes: every mark begun after a checkpoint was created is
 *    in its set, every checkpoint change that returned is there, none
 *    pending; in process-safe mode, the same boot keeps everything and
 *    another boot drops every checkpoint with a message;
 *  - a write error (RLIMIT_FSIZE) in write-ahead mode: the commit fails
 *    with EIO, and so does everything after it; the file still loads
 *    with what was committed before;
 *  - group commit from several threads; cbt_map_range; an extent
 *    callback that marks (no lock is held while it runs);
 *  - the file's size: 16 checkpoints of a 1T disk at 512 byte granules
 *    with a few changes each stay small, and confirming a checkpoint
 *    writes one table and one superblock.
 *
 * The load checks are in test-cbt-load.c, crash replays (every kill
 * point, power loss) in test-cbt-replay.c, the shared helpers in
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

static const char *const mode_name[] = {
  "in-use", "write-ahead", "process-safe",
};

/* A random range: anywhere, at page boundaries, long across pages. */
static void
random_range (uint64_t (*rn) (void), uint64_t *off, uint64_t *len)
{
  unsigned kind = rn () % 20;

  if (kind < 10)
    *off = rn () % DISK;
  else if (kind < 15)
    *off = (uint64_t) (rn () % NR_PAGES) * 32768 * GRAN - rn () % (4 * GRAN);
  else
    *off = rn () % (DISK / GRAN) * GRAN;
  if (*off >= DISK)
    *off = DISK - 1;
  *len = kind == 19 ? 1 + rn () % (40000 * GRAN) : 1 + rn () % (GRAN * 20);
  if (*len > DISK - *off)
    *len = DISK - *off;
}

/* ---- Reference model ----------------------------------------------- */

struct mcp {
  char name[CBT_NAME_MAX + 1];
  bool pending;
  uint64_t serial;
  uint8_t since[NR_GRAN];
};

static struct mcp model[MAX_CPS + 1];
static size_t nmodel;
static uint64_t last_serial;

static void
model_delete (struct cbt *c, size_t k)
{
  uint64_t s = model[k].serial;

  memmove (&model[k], &model[k + 1], (nmodel - k - 1) * sizeof model[0]);
  nmodel--;
  if (c && cbt_checkpoint_find_serial (c, s, NULL) != -1)
    FAIL ("serial %" PRIu64 " still found after its deletion", s);
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
        (ci.state == CBT_STATE_PENDING) != model[i].pending ||
        ci.serial != model[i].serial)
      FAIL ("%s: checkpoint %zu is '%s' state %d serial %" PRIu64 ", model "
            "'%s' pending %d serial %" PRIu64, when, i, ci.name, ci.state,
            ci.serial, model[i].name, model[i].pending, model[i].serial);
    if (cbt_checkpoint_find_serial (c, model[i].serial, &ci) != (ssize_t) i ||
        strcmp (ci.name, model[i].name) != 0)
      FAIL ("%s: serial %" PRIu64 " is not checkpoint %zu", when,
            model[i].serial, i);
    if (model[i].pending)
      continue;
    g = changed_since (c, model[i].name);
    for (size_t j = 0; j < NR_GRAN; ++j)
      if (g[j] != model[i].since[j]) {
        FAIL ("%s: since '%s': granule %zu is %d, model %d", when,
              model[i].name, j, g[j], model[i].since[j]);
        break;
      }
    if (i == 0 && rnd () % 4 == 0) {    /* the same by serial */
      struct set_ctx s = { .gran = GRAN, .disk_size = DISK, .nr = NR_GRAN };

      s.g = calloc (NR_GRAN, 1);
      if (cbt_map_serial (c, model[i].serial, 0, 0, DISK, collect, &s,
                          err, sizeof err) == -1 ||
          memcmp (s.g, g, NR_GRAN) != 0)
        FAIL ("%s: map by serial differs from map by name", when);
      free (s.g);
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
  last_serial = 0;
  for (unsigned step = 0; step < steps; ++step) {
    unsigned op = rnd () % 100;
    char when[64];

    snprintf (when, sizeof when, "mode %s step %u op %u", mode_name[mode],
              step, op);
    if (op < 60) {                      /* mark */
      uint64_t off, len, t;

      random_range (rnd, &off, &len);
      if (cbt_mark (c, off, len, &t) == -1)
        FAIL ("cbt_mark: %s", strerror (errno));
      if (mode != CBT_MODE_WRITE_AHEAD)
        CHECK (t == 0);
      if (cbt_commit (c, t) == -1)
        FAIL ("cbt_commit: %s", strerror (errno));
      CHECK (cbt_is_durable (c, off, len));
      for (size_t i = 0; i < nmodel; ++i)
        memset (model[i].since + off / GRAN, 1,
                (off + len - 1) / GRAN - off / GRAN + 1);
    }
    else if (op < 72) {                 /* create */
      bool pending = rnd () % 2;
      bool busy = nmodel > 0 && model[nmodel - 1].pending;
      struct cbt_checkpoint_info ci;
      char name[32];
      int r;

      if (nmodel == MAX_CPS) {
        r = cbt_checkpoint_delete (c, model[0].name, err, sizeof err);
        CHECK (r == 0);
        model_delete (c, 0);
        continue;
      }
      snprintf (name, sizeof name, "cp-%u", names++ % 5);  /* names recur */
      if (cbt_checkpoint_find (c, name, NULL) >= 0) {
        CHECK (cbt_checkpoint_create (c, name, pending, err, sizeof err)
               == -1 && errno == EEXIST);
        continue;
      }
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
      if (cbt_checkpoint_find (c, name, &ci) != (ssize_t) nmodel ||
          ci.serial <= last_serial)
        FAIL ("create %s: serial %" PRIu64 " after %" PRIu64, name,
              ci.serial, last_serial);
      model[nmodel].serial = last_serial = ci.serial;
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
        model_delete (c, nmodel - 1);
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
      model_delete (c, k);
    }
    else if (op < 95) {                 /* clean reopen */
      struct cbt_load_info info;

      xclose (c);
      c = xopen (&o, &info);
      CHECK (!info.invalidated && !info.created);
      if (nmodel > 0 && model[nmodel - 1].pending) {
        CHECK (info.dropped == 1);      /* pending at load: merged back */
        model_delete (c, nmodel - 1);
      }
    }
    else {                              /* bad calls */
      CHECK (cbt_mark (c, DISK, 1, NULL) == -1 && errno == EINVAL);
      CHECK (cbt_checkpoint_create (c, "bad name", false, err,
                                    sizeof err) == -1 && errno == EINVAL);
      CHECK (cbt_checkpoint_create (c, "-x", false, err,
                                    sizeof err) == -1 && errno == EINVAL);
      CHECK (cbt_map_serial (c, last_serial + 1, 0, 0, DISK, collect, NULL,
                             err, sizeof err) == -1 && errno == ENOENT);
      if (nmodel > 0) {
        CHECK (cbt_checkpoint_create (c, model[0].name, false, err,
                                      sizeof err) == -1 && errno == EEXIST);
        if (model[0].pending)
          CHECK (cbt_map (c, model[0].name, collect, NULL, err,
                          sizeof err) == -1 && errno == EINVAL);
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
    model_delete (c, nmodel - 1);
  compare (c, "final reopen");
  xclose (c);
}

/* ---- Create with a callback ----------------------------------------- */

static int taken_calls;

static void
taken (void *opaque)
{
  uint64_t t;

  taken_calls++;
  /* A mark from the callback on is after the new checkpoint. */
  CHECK (cbt_mark (opaque, 7 * GRAN, 1, &t) == 0 && cbt_commit (opaque, t) == 0);
}

static void
create_cb_test (enum cbt_mode mode)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  struct cbt *c;
  uint8_t *g;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 5 * GRAN, 1, NULL) == 0);
  taken_calls = 0;
  CHECK (cbt_checkpoint_create_cb (c, "a", false, taken, c, err,
                                   sizeof err) == -1 && errno == EEXIST);
  CHECK (taken_calls == 0);
  CHECK (cbt_checkpoint_create_cb (c, "b", true, taken, c, err,
                                   sizeof err) == 0);
  CHECK (taken_calls == 1);
  CHECK (cbt_checkpoint_confirm (c, "b", err, sizeof err) == 0);
  g = changed_since (c, "b");
  CHECK (g[7] && !g[5]);
  free (g);
  g = changed_since (c, "a");
  CHECK (g[7] && g[5]);
  free (g);
  xclose (c);
}

/* ---- Serials, the limit ---------------------------------------------- */

static void
serial_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_checkpoint_info a, b;
  struct cbt *c;
  char name[16];
  int r = 0;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "x", false, err, sizeof err) == 0);
  CHECK (cbt_checkpoint_find (c, "x", &a) == 0 && a.serial == 1);
  CHECK (cbt_checkpoint_delete (c, "x", err, sizeof err) == 0);
  CHECK (cbt_checkpoint_create (c, "x", false, err, sizeof err) == 0);
  CHECK (cbt_checkpoint_find (c, "x", &b) == 0 && b.serial == 2);
  CHECK (cbt_checkpoint_find_serial (c, a.serial, NULL) == -1 &&
         errno == ENOENT);
  CHECK (cbt_map_serial (c, a.serial, 0, 0, DISK, collect, NULL, err,
                         sizeof err) == -1 && errno == ENOENT &&
         strstr (err, "serial 1") != NULL);
  /* Serials survive a reopen and never come back. */
  xclose (c);
  o.reset = false;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_find (c, "x", &b) == 0 && b.serial == 2);
  CHECK (cbt_checkpoint_delete (c, "x", err, sizeof err) == 0);
  xclose (c);
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "x", false, err, sizeof err) == 0);
  CHECK (cbt_checkpoint_find (c, "x", &b) == 0 && b.serial == 3);

  /* The limit: its own errno. */
  for (unsigned i = 1; r == 0 && i < CBT_MAX_CHECKPOINTS; ++i) {
    snprintf (name, sizeof name, "n%u", i);
    r = cbt_checkpoint_create (c, name, false, err, sizeof err);
  }
  CHECK (r == 0 && cbt_checkpoint_count (c) == CBT_MAX_CHECKPOINTS);
  CHECK (cbt_checkpoint_create (c, "one-more", false, err, sizeof err) == -1);
  CHECK (errno == EMLINK && strstr (err, "256 checkpoints") != NULL);
  CHECK (cbt_checkpoint_delete (c, "n7", err, sizeof err) == 0);
  CHECK (cbt_checkpoint_create (c, "one-more", false, err, sizeof err) == 0);
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

/* A killed child's record, one line on the pipe (atomic: < PIPE_BUF). */
struct rec {
  char kind;                    /* S mark started, A acknowledged, B op
                                   began, E op ended */
  char op;                      /* c create good, p create pending, f
                                   confirm, x fail, d delete */
  int32_t result;
  uint64_t off, len;
  char name[16];
};

static int rec_fd;

static void
say (char kind, char op, const char *name, int result, uint64_t off,
     uint64_t len)
{
  struct rec r = { .kind = kind, .op = op, .result = result, .off = off,
                   .len = len };

  if (name)
    snprintf (r.name, sizeof r.name, "%s", name);
  if (write (rec_fd, &r, sizeof r) != sizeof r)
    _exit (4);
}

static struct cbt *kill_cbt;
static enum cbt_mode kill_mode;

static void *
kill_marker (void *arg)
{
  uint64_t seed = (uintptr_t) arg;

  for (;;) {
    uint64_t off, len, t;

    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    off = (seed >> 20) % DISK;
    len = 1 + (seed >> 8) % (3 * GRAN);
    if (seed % 97 == 0)
      len = 1 + (seed >> 8) % (70000 * (uint64_t) GRAN);
    if (len > DISK - off)
      len = DISK - off;
    say ('S', 0, NULL, 0, off, len);
    if (cbt_mark (kill_cbt, off, len, &t) == -1 ||
        cbt_commit (kill_cbt, t) == -1)
      _exit (3);
    say ('A', 0, NULL, 0, off, len);
  }
  return NULL;
}

/* The child: marks in a thread, checkpoint changes in this one. */
static void __attribute__ ((__noreturn__))
kill_child (enum cbt_mode mode, uint64_t seed)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  char names[8][16];
  int n = 0, k = 0;
  pthread_t th;

  kill_cbt = xopen (&o, NULL);
  kill_mode = mode;
  for (size_t i = 0; i < cbt_checkpoint_count (kill_cbt); ++i) {
    struct cbt_checkpoint_info ci;
    cbt_checkpoint_get (kill_cbt, i, &ci);
    strcpy (names[n++], ci.name);
  }
  pthread_create (&th, NULL, kill_marker, (void *) (uintptr_t) seed);
  for (;;) {
    unsigned op = (unsigned) (rnd_r (&seed) % 4);
    char name[16];
    int r;

    if (op == 3 || n == 8) {            /* delete one */
      int i = n > 0 ? (int) (rnd_r (&seed) % (uint64_t) n) : -1;

      if (i < 0)
        continue;
      say ('B', 'd', names[i], 0, 0, 0);
      r = cbt_checkpoint_delete (kill_cbt, names[i], err, sizeof err);
      say ('E', 'd', names[i], r, 0, 0);
      if (r == -1)
        _exit (5);
      memmove (names[i], names[i + 1], (size_t) (n - i - 1) * sizeof names[0]);
      n--;
      continue;
    }
    snprintf (name, sizeof name, "k%d", k++);
    say ('B', op == 0 ? 'c' : 'p', name, 0, 0, 0);
    r = cbt_checkpoint_create (kill_cbt, name, op != 0, err, sizeof err);
    say ('E', op == 0 ? 'c' : 'p', name, r, 0, 0);
    if (r == -1)
      _exit (6);
    strcpy (names[n++], name);
    if (op == 0)
      continue;
    usleep (rnd_r (&seed) % 2000);      /* a backup */
    op = rnd_r (&seed) % 3;
    say ('B', op ? 'f' : 'x', name, 0, 0, 0);
    r = op ? cbt_checkpoint_confirm (kill_cbt, name, err, sizeof err)
      : cbt_checkpoint_fail (kill_cbt, name, err, sizeof err);
    say ('E', op ? 'f' : 'x', name, r, 0, 0);
    if (r == -1)
      _exit (7);
    if (!op)
      n--;
  }
}

/* What the records say must survive: checkpoints (name, whether it must
 * exist, may exist), and marks begun after each one's creation returned.
 */
struct expect {
  char name[16];
  int must;                     /* 1 must exist (good), 0 may, -1 must not */
  size_t first_mark;            /* index into marks of the first after it */
};

static void
kill_test (enum cbt_mode mode, unsigned round)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  struct cbt_load_info info;
  struct cbt *c;
  struct expect ex[64];
  size_t nex = 0, nmarks = 0, cap = 4096;
  uint64_t (*marks)[2] = malloc (cap * sizeof *marks);
  bool *acked = malloc (cap);
  struct rec r;
  unsigned n = 0, kill_after = 100 + (unsigned) (rnd () % 1500);
  uint8_t *copy;
  size_t copy_len;
  int fds[2], status;
  pid_t pid;
  char what[64];

  snprintf (what, sizeof what, "%s kill round %u", mode_name[mode], round);
  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_mark (c, 0, GRAN, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, GRAN, GRAN, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "base2", false, err, sizeof err) == 0);
  xclose (c);
  strcpy (ex[0].name, "base");
  strcpy (ex[1].name, "base2");
  ex[0].must = ex[1].must = 1;
  ex[0].first_mark = ex[1].first_mark = 0;
  nex = 2;
  o.reset = false;
  if (pipe (fds) == -1)
    exit (EXIT_FAILURE);

  pid = fork ();
  if (pid == 0) {
    close (fds[0]);
    rec_fd = fds[1];
    kill_child (mode, rnd_state + round);
  }
  close (fds[1]);
  while (read (fds[0], &r, sizeof r) == sizeof r) {
    if (r.kind == 'S') {
      if (nmarks == cap) {
        cap *= 2;
        marks = realloc (marks, cap * sizeof *marks);
        acked = realloc (acked, cap);
      }
      marks[nmarks][0] = r.off;
      marks[nmarks][1] = r.len;
      acked[nmarks++] = false;
    }
    else if (r.kind == 'A') {
      /* The last started mark with this range not yet acknowledged. */
      for (size_t i = nmarks; i-- > 0; )
        if (!acked[i] && marks[i][0] == r.off && marks[i][1] == r.len) {
          acked[i] = true;
          break;
        }
    }
    else {
      size_t i;

      for (i = 0; i < nex; ++i)
        if (strcmp (ex[i].name, r.name) == 0)
          break;
      if (i == nex && nex < 64) {
        strcpy (ex[nex].name, r.name);
        ex[nex].must = -1;
        ex[nex].first_mark = SIZE_MAX;
        nex++;
      }
      if (i < nex) {
        struct expect *e = &ex[i];
        if (r.kind == 'B' && (r.op == 'c' || r.op == 'f'))
          e->must = 0;          /* may exist from now on */
        else if (r.kind == 'B' && r.op == 'd')
          e->must = 0;          /* may be gone from now on */
        else if (r.kind == 'E' && (r.op == 'c' || r.op == 'p'))
          e->first_mark = nmarks;       /* marks after this are after it */
        if (r.kind == 'E' && (r.op == 'c' || r.op == 'f'))
          e->must = 1;
        else if (r.kind == 'E' && (r.op == 'd' || r.op == 'x'))
          e->must = -1;
        if (r.kind == 'E' && r.op == 'p')
          e->must = -1;         /* pending: dropped at load */
        else if (r.kind == 'B' && r.op == 'p')
          e->must = -1;
      }
    }
    if (++n == kill_after)
      kill (pid, SIGKILL);
  }
  close (fds[0]);
  CHECK (waitpid (pid, &status, 0) == pid);
  if (!WIFSIGNALED (status)) {
    FAIL ("%s: the child exited with status %d", what, WEXITSTATUS (status));
    return;
  }
  read_file (&copy, &copy_len);

  c = xopen (&o, &info);
  if (mode == CBT_MODE_IN_USE) {
    CHECK (info.invalidated && cbt_checkpoint_count (c) == 0);
    CHECK (strstr (info.message, "next backup must be full") != NULL);
  }
  else {
    unsigned checked = 0;

    if (info.invalidated)
      FAIL ("%s: invalidated: %s", what, info.message);
    for (size_t i = 0; i < nex; ++i) {
      struct cbt_checkpoint_info ci;
      ssize_t k = cbt_checkpoint_find (c, ex[i].name, &ci);
      uint8_t *g;

      if (ex[i].must == 1 && (k < 0 || ci.state != CBT_STATE_GOOD))
        FAIL ("%s: checkpoint %s is gone after the kill", what, ex[i].name);
      if (ex[i].must == -1 && k >= 0)
        FAIL ("%s: checkpoint %s is there after the kill", what, ex[i].name);
      if (k < 0)
        continue;
      CHECK (ci.state == CBT_STATE_GOOD);
      g = changed_since (c, ex[i].name);
      for (size_t m = ex[i].first_mark; m < nmarks; ++m) {
        uint64_t g0 = marks[m][0] / GRAN, g1 = (marks[m][0] + marks[m][1] - 1) / GRAN;
        if (!acked[m])
          continue;
        checked++;
        for (uint64_t x = g0; x <= g1; ++x)
          if (!g[x]) {
            FAIL ("%s: a mark of [%" PRIu64 ", +%" PRIu64 ") acknowledged "
                  "after %s was created is not in its set (granule %"
                  PRIu64 ")", what, marks[m][0], marks[m][1], ex[i].name, x);
            m = nmarks;
            break;
          }
      }
      free (g);
    }
    printf ("test-cbt: %s: killed after %u records, %zu marks begun, %u "
            "checked, %zu checkpoints left%s%s\n", what, kill_after, nmarks,
            checked, cbt_checkpoint_count (c), info.message[0] ? ": " : "",
            info.message);
  }
  xclose (c);

  if (mode == CBT_MODE_PROCESS_SAFE) {
    /* The same file found by another boot: everything dropped. */
    write_file (copy, copy_len);
    o.boot_id = BOOT_B;
    c = xopen (&o, &info);
    CHECK (info.invalidated && cbt_checkpoint_count (c) == 0);
    if (strstr (info.message, "another boot") == NULL ||
        strstr (info.message, "next backup must be full") == NULL)
      FAIL ("%s: another boot: message '%s'", what, info.message);
    xclose (c);
    c = xopen (&o, &info);
    CHECK (!info.invalidated && cbt_checkpoint_count (c) == 0);
    xclose (c);
  }
  free (copy);
  free (marks);
  free (acked);
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

/* Crashed in a durable mode, then reopened and crashed in in-use mode:
 * the second crash must invalidate (its marks were in memory).
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
  child_marks (CBT_MODE_PROCESS_SAFE, 20 * GRAN, &info);
  child_marks (CBT_MODE_IN_USE, 30 * GRAN, &info);
  o.reset = false;
  c = xopen (&o, &info);
  CHECK (info.invalidated && cbt_checkpoint_count (c) == 0);
  xclose (c);
}

/* ---- Write errors -------------------------------------------------- */

/* In a child: the file cannot grow (RLIMIT_FSIZE at its size): the
 * first write to a new block fails with EFBIG, which every call reports
 * as EIO with the cause in the message.
 */
static void
write_error_test (enum cbt_mode mode)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t *got;
  uint64_t t, size;
  pid_t pid;
  int status;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 3 * GRAN, 1, &t) == 0 && cbt_commit (c, t) == 0);
  xclose (c);
  o.reset = false;
  size = file_size ();

  pid = fork ();
  if (pid == 0) {
    struct rlimit rl = { .rlim_cur = size, .rlim_max = RLIM_INFINITY };
    int code = 0, r = 0;

    signal (SIGXFSZ, SIG_IGN);
    c = xopen (&o, NULL);
    if (setrlimit (RLIMIT_FSIZE, &rl) == -1)
      _exit (10);
    if (mode == CBT_MODE_IN_USE) {
      /* Marks stay in memory; a new checkpoint must write them (not a
       * sticky failure: nothing changed yet), so must the close.
       */
      for (uint32_t p = 0; p < NR_PAGES; ++p)
        if (cbt_mark (c, IN_PAGE (p, 77) * GRAN, 1, NULL) == -1)
          code |= 1;
      for (int i = 0; i < 2; ++i)
        if (cbt_checkpoint_create (c, "x", false, err, sizeof err) != -1 ||
            errno != EIO || strstr (err, "File too large") == NULL)
          code |= 2;
      if (cbt_mark (c, 500 * GRAN, 1, &t) == -1)
        code |= 4;
    }
    else {
      /* Each page new on disk needs a block: one of them fails. */
      for (uint32_t p = 0; r == 0 && p < NR_PAGES; ++p)
        r = cbt_mark (c, IN_PAGE (p, 77) * GRAN, 1, &t) == -1 ? -1
          : cbt_commit (c, t);
      if (r != -1 || errno != EIO)
        code |= 2;
      if (cbt_mark (c, 500 * GRAN, 1, &t) != -1 || errno != EIO)
        code |= 4;                /* sticky */
      if (cbt_checkpoint_create (c, "y", false, err, sizeof err) != -1 ||
          errno != EIO || strstr (err, "earlier write") == NULL ||
          strstr (err, "File too large") == NULL)
        code |= 8;
    }
    if (cbt_close (c, err, sizeof err) != -1 ||
        strstr (err, "File too large") == NULL)
      code |= 16;
    _exit (code);
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status));
  if (WEXITSTATUS (status) != 0)
    FAIL ("%s write error child: status %d (%s)", mode_name[mode],
          WEXITSTATUS (status), err);
  o.boot_id = BOOT_A;
  c = xopen (&o, &info);
  CHECK (cbt_checkpoint_count (c) == (mode == CBT_MODE_IN_USE ? 0u : 1u));
  if (mode != CBT_MODE_IN_USE) {
    got = changed_since (c, "base");
    CHECK (got[3]);
    free (got);
  }
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
  const uint64_t P1 = 32768, L = NR_GRAN - 1;

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
  MARK (10); MARK (11); MARK (P1 - 1); MARK (P1);
  CHECK (cbt_checkpoint_create (c, "b", false, err, sizeof err) == 0);
  MARK (20);
  CHECK (cbt_checkpoint_create (c, "c", true, err, sizeof err) == 0);
  MARK (30); MARK (L);
  EXPECT ("a", "c", 0, DISK, "10 11 20 32767 32768");
  EXPECT ("a", "b", 0, DISK, "10 11 32767 32768");
  EXPECT ("b", "c", 0, DISK, "20");
  EXPECT ("a", NULL, 0, DISK, "10 11 20 30 32767 32768 99537");
  EXPECT ("a", NULL, 0, UINT64_MAX, "10 11 20 30 32767 32768 99537");
  EXPECT ("a", NULL, 11 * GRAN + 5, 21 * GRAN, "11 20");
  EXPECT ("a", "c", 11 * GRAN + 5, 20 * GRAN, "11");
  EXPECT ("a", NULL, P1 * GRAN, (P1 + 1) * GRAN, "32768");
  EXPECT ("a", NULL, (P1 - 1) * GRAN + 1, P1 * GRAN + 1, "32767 32768");
  EXPECT ("a", NULL, DISK - 1, DISK, "99537");
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

/* An extent callback may call into the cbt: the walk holds no lock.  (A
 * child with an alarm: a walk holding the lock would hang.)
 */
static int
mark_back (uint64_t off, uint64_t len, void *opaque)
{
  uint64_t t;
  (void) len;
  return cbt_mark (opaque, off, GRAN, &t) == -1 ? -1
    : cbt_commit (opaque, t);
}

static void
callback_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt *c;
  pid_t pid;
  int status;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 5 * GRAN, 1, NULL) == 0);
  CHECK (cbt_mark (c, IN_PAGE (2, 5) * GRAN, 1, NULL) == 0);
  pid = fork ();
  if (pid == 0) {
    alarm (20);
    _exit (cbt_map (c, "a", mark_back, c, err, sizeof err) == 0 ? 0 : 1);
  }
  CHECK (waitpid (pid, &status, 0) == pid);
  if (!WIFEXITED (status) || WEXITSTATUS (status) != 0)
    FAIL ("an extent callback calling cbt_mark: %s",
          WIFSIGNALED (status) ? "hangs (killed by the alarm)" : "fails");
  xclose (c);
}

/* ---- The file's size ------------------------------------------------- */

/* 16 checkpoints of a 1T disk at 512 byte granules (2^31 granules: 256
 * MiB per bitmap, 65536 pages) with a few changes in each interval:
 * the file holds what changed (a few pages per record, their indexes,
 * two directories of 512K), not 16 bitmaps; deleting them all leaves
 * the directories.
 */
static void
size_test (enum cbt_mode mode)
{
  const uint64_t disk = UINT64_C (1) << 40;
  struct cbt_options o = options (disk, 512, mode);
  struct cbt *c;
  uint64_t big, t;
  char name[16];

  o.reset = true;
  c = xopen (&o, NULL);
  for (unsigned k = 0; k < 16; ++k) {
    for (unsigned i = 0; i < 8; ++i) {
      uint64_t off = (rnd () % (disk / 4096)) * 4096;
      CHECK (cbt_mark (c, off, 4096, &t) == 0 && cbt_commit (c, t) == 0);
    }
    snprintf (name, sizeof name, "c%u", k);
    CHECK (cbt_checkpoint_create (c, name, false, err, sizeof err) == 0);
  }
  big = file_size ();
  /* At most: 16 x 8 pages and their index blocks, 3 directories (the
   * current, the next, and the one a new checkpoint frees), tables, and
   * as much again of holes (freed blocks are reused first, but the file
   * ends at its last block in use).  Version 1 held 16 x 256 MiB.
   */
  if (big > (2 + 3 * 128 + 2 * (16 * 8 + 16 + 16)) * (uint64_t) BLOCK)
    FAIL ("%s: 16 checkpoints of 8 changes on a 1T disk: a %" PRIu64
          " byte file", mode_name[mode], big);
  CHECK (cbt_checkpoint_delete (c, "c7", err, sizeof err) == 0);
  for (unsigned k = 0; k < 16; ++k) {
    snprintf (name, sizeof name, "c%u", k);
    if (k != 7)
      CHECK (cbt_checkpoint_delete (c, name, err, sizeof err) == 0);
  }
  xclose (c);
  printf ("test-cbt: %s: 16 checkpoints of a 1T disk at 512 bytes: a %"
          PRIu64 " byte file, %" PRIu64 " once deleted\n", mode_name[mode],
          big, file_size ());
  CHECK (file_size () <= big);
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
  {
    char boot[CBT_BOOT_ID_MAX + 1];
    if (cbt_read_boot_id (boot, sizeof boot, err, sizeof err) == 0)
      CHECK (strlen (boot) == 36 && boot[8] == '-');
    else
      printf ("test-cbt: no boot id here: %s\n", err);
  }

  model_test (CBT_MODE_IN_USE, 800);
  model_test (CBT_MODE_WRITE_AHEAD, 800);
  model_test (CBT_MODE_PROCESS_SAFE, 800);
  printf ("test-cbt: model tests done\n");
  serial_test ();
  create_cb_test (CBT_MODE_IN_USE);
  create_cb_test (CBT_MODE_WRITE_AHEAD);
  create_cb_test (CBT_MODE_PROCESS_SAFE);
  in_use_test (true);
  in_use_test (false);
  for (unsigned round = 0; round < 6; ++round) {
    kill_test (CBT_MODE_IN_USE, round);
    kill_test (CBT_MODE_WRITE_AHEAD, round);
    kill_test (CBT_MODE_PROCESS_SAFE, round);
  }
  printf ("test-cbt: kill tests done\n");
  mode_switch_test ();
  write_error_test (CBT_MODE_IN_USE);
  write_error_test (CBT_MODE_WRITE_AHEAD);
  write_error_test (CBT_MODE_PROCESS_SAFE);
  group_commit_test ();
  map_range_test ();
  callback_test ();
  printf ("test-cbt: map tests done\n");
  size_test (CBT_MODE_IN_USE);
  size_test (CBT_MODE_WRITE_AHEAD);
  size_test (CBT_MODE_PROCESS_SAFE);

  return cbt_test_end ();
}
