/* sparsebackup: unit tests of common/cbt*.c (persistent changed-block
 * tracking): crashes at every point, replayed.
 *
 * This program defines pwrite, pwrite64, ftruncate, fdatasync and fsync
 * itself (the library, linked in statically, calls these): on the cbt
 * file under test they do the real call and log it (offset, bytes,
 * where syncs began and ended), together with what the workload saw
 * (marks begun and acknowledged, checkpoint changes begun and
 * returned).  The workload: one thread marks (and commits) while
 * another creates, confirms, fails and deletes checkpoints.  Then, for
 * many points of the log, the file is rebuilt as a crash there leaves
 * it and loaded:
 *
 *  - kill -9 (every write before the point reached the page cache), in
 *    the three modes: in write-ahead and process-safe modes (the same
 *    boot) every mark begun after a checkpoint's creation returned and
 *    acknowledged before the point is in its set, every checkpoint
 *    change that returned is there, and a checkpoint never survives
 *    pending; in in-use mode the same unless the file was in use (then
 *    every checkpoint is dropped);
 *  - power loss: only the writes that a finished sync covered are sure
 *    to be there; each later one is there or not, and may be torn at any
 *    512 byte sector: in write-ahead mode the same checks hold (or, when
 *    the newest superblock itself is torn, every checkpoint is dropped:
 *    the documented fallback); in process-safe mode (another boot) the
 *    file loads, and a file in use loses every checkpoint.
 *
 * And what checkpoint changes write: a confirm writes one table block
 * and one superblock; a delete that merges two records whose pages
 * differ writes no page.
 *
 * Exit status 1 if anything failed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "cbt.h"

#define TEST_NAME "test-cbt-replay"
#include "cbt-test-lib.h"

/* ---- The shim --------------------------------------------------------- */

enum evk {
  EV_WRITE, EV_TRUNC, EV_SYNC_START, EV_SYNC_END,
  EV_MARK_START, EV_MARK_ACK, EV_OP_BEGIN, EV_OP_END,
};

struct ev {
  enum evk kind;
  uint64_t off, len;            /* write, trunc (len), mark */
  uint8_t *data;
  size_t sync;                  /* SYNC_END: index of its SYNC_START */
  char op;                      /* c create, p pending, f confirm, x fail,
                                   d delete */
  char name[16];
  int result;
};

static pthread_mutex_t shim_lock = PTHREAD_MUTEX_INITIALIZER;
static int traced_fd = -1;
static struct ev *evs;
static size_t nev, capev;
static uint64_t bytes_written;

static struct ev *
new_ev (enum evk kind)          /* shim_lock held */
{
  if (nev == capev) {
    capev = capev ? 2 * capev : 4096;
    evs = realloc (evs, capev * sizeof *evs);
    if (evs == NULL)
      abort ();
  }
  memset (&evs[nev], 0, sizeof evs[nev]);
  evs[nev].kind = kind;
  return &evs[nev++];
}

static ssize_t
traced_write (int fd, const void *buf, size_t n, off_t off)
{
  ssize_t r;

  if (fd != traced_fd)
    return syscall (SYS_pwrite64, fd, buf, n, off);
  pthread_mutex_lock (&shim_lock);
  r = syscall (SYS_pwrite64, fd, buf, n, off);
  if (r > 0) {
    struct ev *e = new_ev (EV_WRITE);
    e->off = (uint64_t) off;
    e->len = (uint64_t) r;
    e->data = malloc ((size_t) r);
    memcpy (e->data, buf, (size_t) r);
    bytes_written += (uint64_t) r;
  }
  pthread_mutex_unlock (&shim_lock);
  return r;
}

ssize_t pwrite (int fd, const void *buf, size_t n, off_t off);
ssize_t pwrite64 (int fd, const void *buf, size_t n, off_t off);
int ftruncate (int fd, off_t len);
int ftruncate64 (int fd, off_t len);
int fdatasync (int fd);
int fsync (int fd);

ssize_t
pwrite (int fd, const void *buf, size_t n, off_t off)
{
  return traced_write (fd, buf, n, off);
}

ssize_t
pwrite64 (int fd, const void *buf, size_t n, off_t off)
{
  return traced_write (fd, buf, n, off);
}

static int
traced_trunc (int fd, off_t len)
{
  int r;

  if (fd != traced_fd)
    return (int) syscall (SYS_ftruncate, fd, len);
  pthread_mutex_lock (&shim_lock);
  r = (int) syscall (SYS_ftruncate, fd, len);
  if (r == 0)
    new_ev (EV_TRUNC)->len = (uint64_t) len;
  pthread_mutex_unlock (&shim_lock);
  return r;
}

int ftruncate (int fd, off_t len) { return traced_trunc (fd, len); }
int ftruncate64 (int fd, off_t len) { return traced_trunc (fd, len); }

static int
traced_sync (int fd, long nr)
{
  size_t start;
  int r;

  if (fd != traced_fd)
    return (int) syscall (nr, fd);
  pthread_mutex_lock (&shim_lock);
  start = nev;
  new_ev (EV_SYNC_START);
  pthread_mutex_unlock (&shim_lock);
  r = (int) syscall (nr, fd);
  pthread_mutex_lock (&shim_lock);
  new_ev (EV_SYNC_END)->sync = start;
  pthread_mutex_unlock (&shim_lock);
  return r;
}

int fdatasync (int fd) { return traced_sync (fd, SYS_fdatasync); }
int fsync (int fd) { return traced_sync (fd, SYS_fsync); }

static void
event (enum evk kind, char op, const char *name, int result,
       uint64_t off, uint64_t len)
{
  struct ev *e;

  pthread_mutex_lock (&shim_lock);
  e = new_ev (kind);
  e->op = op;
  if (name)
    snprintf (e->name, sizeof e->name, "%s", name);
  e->result = result;
  e->off = off;
  e->len = len;
  pthread_mutex_unlock (&shim_lock);
}

static void
reset_log (void)
{
  for (size_t i = 0; i < nev; ++i)
    free (evs[i].data);
  nev = 0;
}

/* ---- The workload ------------------------------------------------------- */

static struct cbt *wl_cbt;
static volatile bool wl_stop;

static void *
marker (void *arg)
{
  uint64_t seed = (uintptr_t) arg;

  for (unsigned i = 0; i < 600 && !wl_stop; ++i) {
    uint64_t off, len, t;

    off = rnd_r (&seed) % DISK;
    len = 1 + rnd_r (&seed) % (3 * GRAN);
    if (rnd_r (&seed) % 50 == 0)
      len = 1 + rnd_r (&seed) % (70000 * (uint64_t) GRAN);
    if (len > DISK - off)
      len = DISK - off;
    event (EV_MARK_START, 0, NULL, 0, off, len);
    if (cbt_mark (wl_cbt, off, len, &t) == -1 || cbt_commit (wl_cbt, t) == -1) {
      FAIL ("mark: %s", strerror (errno));
      break;
    }
    event (EV_MARK_ACK, 0, NULL, 0, off, len);
    usleep (200);               /* spread over the checkpoint changes */
  }
  return NULL;
}

static void
workload (enum cbt_mode mode, uint64_t seed)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  char names[8][16];
  int n = 0, k = 0;
  pthread_t th;
  int fd;

  unlink (path);
  fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  if (fd == -1)
    exit (EXIT_FAILURE);
  reset_log ();
  traced_fd = fd;
  if (cbt_open_fd (fd, &o, &wl_cbt, NULL, err, sizeof err) == -1) {
    FAIL ("open: %s", err);
    exit (EXIT_FAILURE);
  }
  wl_stop = false;
  pthread_create (&th, NULL, marker, (void *) (uintptr_t) seed);
  for (int step = 0; step < 40; ++step) {
    unsigned op = (unsigned) (rnd_r (&seed) % 4);
    char name[16];
    int r;

    usleep (1000);              /* marks meanwhile */

    if ((op == 3 && n > 0) || n == 8) {
      int i = (int) (rnd_r (&seed) % (uint64_t) n);

      event (EV_OP_BEGIN, 'd', names[i], 0, 0, 0);
      r = cbt_checkpoint_delete (wl_cbt, names[i], err, sizeof err);
      event (EV_OP_END, 'd', names[i], r, 0, 0);
      CHECK (r == 0);
      memmove (names[i], names[i + 1], (size_t) (n - i - 1) * sizeof names[0]);
      n--;
      continue;
    }
    snprintf (name, sizeof name, "k%d", k++);
    event (EV_OP_BEGIN, op == 0 ? 'c' : 'p', name, 0, 0, 0);
    r = cbt_checkpoint_create (wl_cbt, name, op != 0, err, sizeof err);
    event (EV_OP_END, op == 0 ? 'c' : 'p', name, r, 0, 0);
    CHECK (r == 0);
    strcpy (names[n++], name);
    if (op == 0)
      continue;
    usleep (500);
    op = (unsigned) (rnd_r (&seed) % 3);
    event (EV_OP_BEGIN, op ? 'f' : 'x', name, 0, 0, 0);
    r = op ? cbt_checkpoint_confirm (wl_cbt, name, err, sizeof err)
      : cbt_checkpoint_fail (wl_cbt, name, err, sizeof err);
    event (EV_OP_END, op ? 'f' : 'x', name, r, 0, 0);
    CHECK (r == 0);
    if (!op)
      n--;
  }
  wl_stop = true;
  pthread_join (th, NULL);
  traced_fd = -1;                       /* the close is not replayed */
  xclose (wl_cbt);
}

/* ---- Replaying -------------------------------------------------------- */

static char img_path[300];

/* The file as a crash at event CUT leaves it.  POWER: only writes a
 * finished sync covered are sure; the others are there or not, each of
 * their 512 byte sectors on its own.
 */
static void
build_image (size_t cut, bool power, uint64_t *seed)
{
  size_t durable = 0, cap = 1 << 20;
  uint8_t *f = calloc (1, cap);
  uint64_t len = 0;
  int fd;

  if (power)
    for (size_t i = 0; i < cut; ++i)
      if (evs[i].kind == EV_SYNC_END && evs[i].sync > durable)
        durable = evs[i].sync;
  for (size_t i = 0; i < cut; ++i) {
    const struct ev *e = &evs[i];
    bool sure = !power || i < durable;

    if (e->kind == EV_TRUNC) {
      if (!sure && rnd_r (seed) % 2)
        continue;
      if (e->len < len)
        memset (f + e->len, 0, len - e->len);
      len = e->len;
    }
    else if (e->kind == EV_WRITE) {
      if (e->off + e->len > cap) {
        size_t ncap = cap;
        while (ncap < e->off + e->len)
          ncap *= 2;
        f = realloc (f, ncap);
        memset (f + cap, 0, ncap - cap);
        cap = ncap;
      }
      if (sure)
        memcpy (f + e->off, e->data, e->len);
      else
        for (uint64_t s = e->off / 512 * 512; s < e->off + e->len; s += 512) {
          uint64_t a = s > e->off ? s : e->off;
          uint64_t b = s + 512 < e->off + e->len ? s + 512 : e->off + e->len;
          if (rnd_r (seed) % 2)
            memcpy (f + a, e->data + (a - e->off), b - a);
        }
      if ((sure || rnd_r (seed) % 2) && e->off + e->len > len)
        len = e->off + e->len;
    }
  }
  fd = open (img_path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
  if (fd == -1 || write (fd, f, len) != (ssize_t) len)
    exit (EXIT_FAILURE);
  close (fd);
  free (f);
}

struct expect {
  char name[16];
  int must;                     /* 1 must exist (good), 0 may, -1 must not */
  size_t first_mark;            /* marks begun at or after this event */
};

/* Load the image of a crash at CUT and check it (WHAT says which). */
static bool
check_image (enum cbt_mode mode, size_t cut, bool power, const char *what)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  struct cbt_load_info info;
  struct expect ex[64];
  size_t nex = 0;
  struct cbt *c;
  unsigned before = failures;

  for (size_t i = 0; i < cut; ++i) {
    const struct ev *e = &evs[i];
    size_t j;

    if (e->kind != EV_OP_BEGIN && e->kind != EV_OP_END)
      continue;
    for (j = 0; j < nex; ++j)
      if (strcmp (ex[j].name, e->name) == 0)
        break;
    if (j == nex) {
      if (nex == 64)
        continue;
      strcpy (ex[nex].name, e->name);
      ex[nex].must = -1;
      ex[nex].first_mark = SIZE_MAX;
      nex++;
    }
    if (e->kind == EV_OP_BEGIN) {
      if (e->op == 'c' || e->op == 'f' || (e->op == 'd' && ex[j].must == 1))
        ex[j].must = 0;
    }
    else {
      if (e->op == 'c' || e->op == 'p')
        ex[j].first_mark = i;
      if (e->op == 'c' || e->op == 'f')
        ex[j].must = 1;
      else
        ex[j].must = -1;        /* pending, failed, deleted */
    }
  }

  /* A power loss is another boot. */
  if (power && mode == CBT_MODE_PROCESS_SAFE)
    o.boot_id = BOOT_B;
  /* (create: a kill during the creation of the file leaves zeros.) */
  if (cbt_open (img_path, &o, &c, &info, err, sizeof err) == -1) {
    FAIL ("%s: the file is refused: %s", what, err);
    return false;
  }
  if (info.fallback && !power)
    FAIL ("%s: a fallback without a power loss: %s", what, info.message);
  /* A power loss in process-safe mode is another boot, and the file was
   * in use (marked at open, synced; the close is not replayed): every
   * checkpoint is gone, whether the superblock that survived listed some
   * (then invalidated) or none yet (its newer copies never synced).
   */
  if ((power && mode == CBT_MODE_PROCESS_SAFE) ||
      (info.invalidated && (info.fallback || mode == CBT_MODE_IN_USE))) {
    CHECK (cbt_checkpoint_count (c) == 0);
    cbt_close (c, NULL, 0);
    return failures == before;
  }
  if (info.invalidated)
    FAIL ("%s: invalidated: %s", what, info.message);
  for (size_t j = 0; j < nex; ++j) {
    struct cbt_checkpoint_info ci;
    ssize_t k = cbt_checkpoint_find (c, ex[j].name, &ci);
    struct set_ctx s = { .gran = GRAN, .disk_size = DISK, .nr = NR_GRAN };

    if (ex[j].must == 1 && (k < 0 || ci.state != CBT_STATE_GOOD))
      FAIL ("%s: checkpoint %s is gone (%s)", what, ex[j].name, info.message);
    if (ex[j].must == -1 && k >= 0)
      FAIL ("%s: checkpoint %s is there", what, ex[j].name);
    if (k < 0 || ci.state != CBT_STATE_GOOD)
      continue;
    s.g = calloc (NR_GRAN, 1);
    if (cbt_map (c, ex[j].name, collect, &s, err, sizeof err) == -1)
      FAIL ("%s: map since %s: %s", what, ex[j].name, err);
    /* Every mark begun after its creation returned and acknowledged
     * before the crash.
     */
    for (size_t i = ex[j].first_mark; i < cut; ++i) {
      const struct ev *e = &evs[i];
      bool acked = false;

      if (e->kind != EV_MARK_START)
        continue;
      for (size_t a = i + 1; a < cut && !acked; ++a)
        acked = evs[a].kind == EV_MARK_ACK && evs[a].off == e->off &&
          evs[a].len == e->len;
      if (!acked)
        continue;
      for (uint64_t g = e->off / GRAN; g <= (e->off + e->len - 1) / GRAN; ++g)
        if (!s.g[g]) {
          FAIL ("%s: the mark of [%" PRIu64 ", +%" PRIu64 ") (event %zu) is "
                "not in the set since %s (granule %" PRIu64 ")", what,
                e->off, e->len, i, ex[j].name, g);
          break;
        }
    }
    free (s.g);
  }
  cbt_close (c, NULL, 0);
  return failures == before;
}

static void
replay (enum cbt_mode mode, bool power, uint64_t seed, unsigned points)
{
  static const char *const mode_name[] = {
    "in-use", "write-ahead", "process-safe",
  };
  size_t nwrites = 0, checked = 0;
  char what[128];

  workload (mode, seed);
  for (size_t i = 0; i < nev; ++i)
    nwrites += evs[i].kind == EV_WRITE;
  for (unsigned p = 0; p < points && failures == 0; ++p) {
    /* A cut after some write (the first ones: the creation). */
    size_t cut = 1 + (size_t) (rnd_r (&seed) % nev);

    /* Half the time right after a superblock write. */
    if (p % 2) {
      for (size_t i = cut; i < nev; ++i)
        if (evs[i].kind == EV_WRITE && evs[i].off < DATA_START) {
          cut = i + 1;
          break;
        }
    }
    snprintf (what, sizeof what, "%s %s at event %zu of %zu",
              mode_name[mode], power ? "power loss" : "kill", cut, nev);
    build_image (cut, power, &seed);
    check_image (mode, cut, power, what);
    checked++;
  }
  printf ("test-cbt-replay: %s %s: %zu events (%zu writes), %zu crash "
          "points checked\n", mode_name[mode], power ? "power loss" : "kill",
          nev, nwrites, checked);
}

/* ---- What changes write -------------------------------------------------- */

static void
write_size_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt *c;
  uint64_t before;
  int fd;

  unlink (path);
  fd = open (path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
  traced_fd = fd;
  if (cbt_open_fd (fd, &o, &c, NULL, err, sizeof err) == -1)
    exit (EXIT_FAILURE);
  CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, IN_PAGE (0, 1) * GRAN, 1, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "b", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, IN_PAGE (1, 1) * GRAN, 1, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "c", true, err, sizeof err) == 0);
  CHECK (cbt_mark (c, IN_PAGE (2, 1) * GRAN, 1, NULL) == 0);

  before = bytes_written;
  CHECK (cbt_checkpoint_confirm (c, "c", err, sizeof err) == 0);
  if (bytes_written - before != BLOCK + SB_SIZE)
    FAIL ("confirm wrote %" PRIu64 " bytes (a table block and a superblock "
          "are %d)", bytes_written - before, BLOCK + SB_SIZE);
  /* a's and b's records hold different pages: shared, not copied. */
  before = bytes_written;
  CHECK (cbt_checkpoint_delete (c, "b", err, sizeof err) == 0);
  if (bytes_written - before != 3 * BLOCK)
    FAIL ("merging two records wrote %" PRIu64 " bytes (an index block, a "
          "table block and a superblock are %d)", bytes_written - before,
          3 * BLOCK);
  traced_fd = -1;
  xclose (c);
}

int
main (void)
{
  uint64_t seed = 0x9E3779B97F4A7C15ULL;

  cbt_test_start ();
  snprintf (img_path, sizeof img_path, "%s/image", tmpdir);

  write_size_test ();
  replay (CBT_MODE_WRITE_AHEAD, false, seed, 250);
  replay (CBT_MODE_WRITE_AHEAD, true, seed + 1, 250);
  replay (CBT_MODE_PROCESS_SAFE, false, seed + 2, 250);
  replay (CBT_MODE_PROCESS_SAFE, true, seed + 4, 150);
  replay (CBT_MODE_IN_USE, false, seed + 3, 150);

  reset_log ();
  free (evs);
  unlink (img_path);
  return cbt_test_end ();
}
