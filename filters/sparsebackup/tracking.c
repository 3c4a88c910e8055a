/* nbdkit-sparsebackup-filter: changed-block tracking (tracking.h).
 *
 * The cbt file is opened at start-up with the size of the default
 * export (disk.c asks it through a context opened in .after_fork), so
 * a bad path, a locked file or a file of another disk stops nbdkit
 * with the message before any client connects, and the control socket
 * works from the start.  Every connection's size is checked against it
 * in .prepare (disk_check_size).
 *
 * The changes in flight: a multiset of the ranges tracking_mark gave
 * the cbt (tracking_end removes one equal range).  INFLIGHT_LOCK is
 * held around each mark and its insertion, and around the creation of
 * a checkpoint and the marks again: a change is either marked after
 * the checkpoint, or found here and marked again (cbt.h).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* F_OFD_SETLK */
#endif
#include <config.h>

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/stat.h>

#include <nbdkit-filter.h>

#include "cbt.h"
#include "cleanup.h"
#include "minmax.h"
#include "vector.h"
#include "internal.h"
#include "tracking.h"

struct range {
  uint64_t offset, count;
};
DEFINE_VECTOR (range_vector, struct range);

static struct cbt *the_cbt;             /* published with release */
static char lost_reason[CBT_ERRLEN];    /* checkpoints lost at open */
static bool io_error;                   /* a mark or commit failed */

static pthread_mutex_t inflight_lock = PTHREAD_MUTEX_INITIALIZER;
static range_vector inflight = VECTOR_INIT;

bool
tracking_enabled (void)
{
  return cfg_cbt_path != NULL;
}

struct cbt *
tracking_cbt (void)
{
  return __atomic_load_n (&the_cbt, __ATOMIC_ACQUIRE);
}

const char *
tracking_lost_reason (void)
{
  return lost_reason[0] ? lost_reason : NULL;
}

bool
tracking_io_error (void)
{
  return __atomic_load_n (&io_error, __ATOMIC_RELAXED);
}

void
tracking_set_io_error (void)
{
  __atomic_store_n (&io_error, true, __ATOMIC_RELAXED);
}

const char *
tracking_mode_name (enum cbt_mode mode)
{
  switch (mode) {
  case CBT_MODE_IN_USE: return "in-use";
  case CBT_MODE_WRITE_AHEAD: return "write-ahead";
  case CBT_MODE_PROCESS_SAFE: return "process-safe";
  }
  return "?";
}

/* -D sparsebackup.pretend_reboot=1: for tests, open the cbt file as if
 * the machine had booted again since it was last open (another boot
 * id): what process-safe mode does after a power loss.
 */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_pretend_reboot = 0;

/* The kernel's boot id (process-safe mode): -1 with MSG. */
static int
boot_id (char *buf, size_t len, char *msg, size_t msglen)
{
  char err[CBT_ERRLEN];

  if (cbt_read_boot_id (buf, len, err, sizeof err) == -1) {
    snprintf (msg, msglen, "sparsebackup-cbt-mode=process-safe: %s", err);
    return -1;
  }
  if (sparsebackup_debug_pretend_reboot) {
    size_t n = strlen (buf);

    /* Another boot: the same length, another id. */
    buf[n - 1] = buf[n - 1] == 'x' ? 'y' : 'x';
    nbdkit_debug ("sparsebackup: pretending another boot: boot id %s", buf);
  }
  return 0;
}

/* The options of the cbt file; BOOT (CBT_BOOT_ID_MAX + 1 bytes) holds
 * the boot id in process-safe mode.  -1 with MSG.
 */
static int
options (struct cbt_options *opts, uint64_t size, bool read_only, char *boot,
         char *msg, size_t msglen)
{
  memset (opts, 0, sizeof *opts);
  opts->disk_size = size;
  opts->granularity = cfg_cbt_gran;
  opts->identity = cfg_cbt_id ? cfg_cbt_id : "";
  opts->mode = cfg_cbt_mode;
  opts->create = !read_only;
  opts->reset = !read_only && cfg_cbt_reset;
  opts->read_only = read_only;
  if (cfg_cbt_mode == CBT_MODE_PROCESS_SAFE) {
    if (boot_id (boot, CBT_BOOT_ID_MAX + 1, msg, msglen) == -1)
      return -1;
    opts->boot_id = boot;
  }
  return 0;
}

/* ---- Opening ---------------------------------------------------------- */

/* The file's own checks (format, granularity, identity), read-only,
 * before the disk's size is known.  Not for a file that will be reset,
 * nor an empty one or one whose creation was interrupted (zeros where
 * the superblocks go), which the real open creates afresh.
 */
static int
check_contents (const struct stat *st)
{
  struct cbt_options opts;
  char head[8192], err[CBT_ERRLEN], boot[CBT_BOOT_ID_MAX + 1];
  struct cbt *c;
  int fd;
  ssize_t n;
  bool zeros = true;

  if (cfg_cbt_reset || st->st_size == 0)
    return 0;
  fd = open (cfg_cbt_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  n = fd >= 0 ? pread (fd, head, sizeof head, 0) : -1;
  if (fd >= 0)
    close (fd);
  for (ssize_t i = 0; i < n; ++i)
    zeros &= head[i] == 0;
  if (n > 0 && zeros)
    return 0;
  if (options (&opts, 0, true, boot, err, sizeof err) == -1) {
    nbdkit_error ("%s", err);
    return -1;
  }
  if (cbt_open (cfg_cbt_path, &opts, &c, NULL, err, sizeof err) == -1) {
    nbdkit_error ("sparsebackup-cbt: %s: %s", cfg_cbt_path, err);
    return -1;
  }
  cbt_close (c, err, sizeof err);
  return 0;
}

int
tracking_check (void)
{
  struct flock fl = { .l_type = F_RDLCK, .l_whence = SEEK_SET };
  struct stat st;
  int fd;

  if (cfg_cbt_path == NULL)
    return 0;
  if (lstat (cfg_cbt_path, &st) == -1) {
    /* A new file: its directory must let us create it. */
    CLEANUP_FREE char *dir = strdup (cfg_cbt_path);

    if (dir == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    *strrchr (dir, '/') = '\0';
    if (access (dir[0] ? dir : "/", W_OK | X_OK) == -1) {
      nbdkit_error ("sparsebackup-cbt: %s: cannot create the file in '%s': "
                    "%m", cfg_cbt_path, dir[0] ? dir : "/");
      return -1;
    }
    return 0;
  }
  if (S_ISLNK (st.st_mode)) {
    nbdkit_error ("sparsebackup-cbt: %s is a symbolic link: refused (name "
                  "the file itself)", cfg_cbt_path);
    return -1;
  }
  if (!S_ISREG (st.st_mode)) {
    nbdkit_error ("sparsebackup-cbt: %s is not a regular file",
                  cfg_cbt_path);
    return -1;
  }
  if (config_check_clash ("sparsebackup-cbt", cfg_cbt_path, &st) == -1)
    return -1;
  /* Another server holds it: refused before nbdkit forks. */
  fd = open (cfg_cbt_path, O_RDONLY | O_NOFOLLOW | O_CLOEXEC);
  if (fd == -1) {
    nbdkit_error ("sparsebackup-cbt: %s: %m", cfg_cbt_path);
    return -1;
  }
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1) {
    nbdkit_error ("sparsebackup-cbt: %s: the file is in use by another "
                  "process (locked): refused", cfg_cbt_path);
    close (fd);
    return -1;
  }
  close (fd);
  return check_contents (&st);
}

int
tracking_open (uint64_t size, char *msg, size_t msglen)
{
  struct cbt_options opts;
  struct cbt_load_info info;
  char err[CBT_ERRLEN], boot[CBT_BOOT_ID_MAX + 1];
  struct cbt *c;

  if (cfg_cbt_path == NULL)
    return 0;
  assert (tracking_cbt () == NULL);
  if (size == 0) {
    snprintf (msg, msglen, "sparsebackup-cbt: the disk has size 0: the cbt "
              "file %s needs a disk", cfg_cbt_path);
    return -1;
  }
  if (options (&opts, size, false, boot, msg, msglen) == -1)
    return -1;
  if (cbt_open (cfg_cbt_path, &opts, &c, &info, err, sizeof err) == -1) {
    snprintf (msg, msglen, "sparsebackup-cbt: %s: %s", cfg_cbt_path, err);
    return -1;
  }
  if (info.invalidated) {
    snprintf (lost_reason, sizeof lost_reason, "%s", info.message[0] ?
              info.message : "cbt: every checkpoint was lost");
    nbdkit_error ("sparsebackup-cbt: %s: %s", cfg_cbt_path, lost_reason);
  }
  else if (info.message[0])
    nbdkit_debug ("sparsebackup: cbt file %s: %s", cfg_cbt_path,
                  info.message);
  nbdkit_debug ("sparsebackup: cbt file %s open: size %" PRIu64
                ", granularity %" PRIu32 ", mode %s, %zu checkpoints%s",
                cfg_cbt_path, size, cbt_granularity (c),
                tracking_mode_name (cfg_cbt_mode), cbt_checkpoint_count (c),
                info.created ? " (new)" : "");
  __atomic_store_n (&the_cbt, c, __ATOMIC_RELEASE);
  return 0;
}

void
tracking_close (void)
{
  struct cbt *c = tracking_cbt ();
  char err[CBT_ERRLEN];

  if (c && cbt_close (c, err, sizeof err) == -1)
    nbdkit_error ("sparsebackup-cbt: %s: %s", cfg_cbt_path, err);
  the_cbt = NULL;
  range_vector_reset (&inflight);
}

/* ---- Marking ---------------------------------------------------------- */

/* Remove one range equal to [OFFSET, OFFSET+COUNT).  Lock held. */
static void
inflight_remove (uint64_t offset, uint64_t count)
{
  for (size_t i = 0; i < inflight.len; ++i)
    if (inflight.ptr[i].offset == offset && inflight.ptr[i].count == count) {
      inflight.ptr[i] = inflight.ptr[inflight.len - 1];
      inflight.len--;
      return;
    }
  assert (false);               /* tracking_end without tracking_mark */
}

/* [OFFSET, OFFSET+COUNT) clipped to the disk: false if nothing is left. */
static bool
clip (struct cbt *c, uint64_t *offset, uint64_t *count)
{
  uint64_t size = cbt_disk_size (c);

  if (*offset >= size)
    return false;
  *count = MIN (*count, size - *offset);
  return *count > 0;
}

/* Mark under the lock and list the change: -1 with errno. */
static int
mark_listed (struct cbt *c, uint64_t offset, uint64_t count,
             uint64_t *ticket)
{
  uint64_t off = offset, cnt = count;
  SCOPED_MUTEX (&inflight_lock);

  if (range_vector_reserve (&inflight, 1) == -1)
    return -1;
  if (clip (c, &off, &cnt) && cbt_mark (c, off, cnt, ticket) == -1)
    return -1;
  inflight.ptr[inflight.len++] = (struct range) { offset, count };
  return 0;
}

int
tracking_mark (uint64_t offset, uint64_t count, int *err)
{
  struct cbt *c = tracking_cbt ();
  uint64_t ticket = 0;
  int e;

  if (c == NULL)
    return 0;
  if (mark_listed (c, offset, count, &ticket) == 0) {
    if (cbt_commit (c, ticket) == 0)
      return 0;
    e = errno;
    tracking_end (offset, count);
  }
  else
    e = errno;
  if (e == EIO)
    tracking_set_io_error ();
  nbdkit_error ("sparsebackup: cannot record the change at %" PRIu64
                " (%" PRIu64 " bytes) in the cbt file %s: %s",
                offset, count, cfg_cbt_path, strerror (e));
  *err = e == EIO || e == ENOMEM ? e : EIO;
  return -1;
}

void
tracking_end (uint64_t offset, uint64_t count)
{
  SCOPED_MUTEX (&inflight_lock);

  if (tracking_cbt () != NULL)
    inflight_remove (offset, count);
}

/* ---- Checkpoints ------------------------------------------------------ */

/* Marking the changes in flight again once the new checkpoint takes
 * effect (cbt_checkpoint_create_cb's TAKEN, inflight_lock held from
 * before the call): then new changes may be marked again.
 */
struct remark {
  struct cbt *c;
  uint64_t max;                 /* the highest ticket to commit */
  int err;                      /* errno of a mark that failed */
  bool unlocked;
};

static void
remark_inflight (void *opaque)
{
  struct remark *rm = opaque;

  for (size_t i = 0; i < inflight.len && rm->err == 0; ++i) {
    uint64_t off = inflight.ptr[i].offset, cnt = inflight.ptr[i].count;
    uint64_t ticket = 0;

    if (clip (rm->c, &off, &cnt) && cbt_mark (rm->c, off, cnt, &ticket) == -1)
      rm->err = errno;
    rm->max = MAX (rm->max, ticket);
  }
  pthread_mutex_unlock (&inflight_lock);
  rm->unlocked = true;
}

int
tracking_checkpoint_begin (const char *name, char *err, size_t errlen)
{
  struct remark rm = { .c = tracking_cbt () };
  int r;

  assert (rm.c != NULL);
  /* cbt.h: every change in flight when the checkpoint takes effect is
   * marked again, so that one landing after it is recorded after it
   * too.  New changes wait (inflight_lock) only until then, not over
   * the slow part of the creation.
   */
  pthread_mutex_lock (&inflight_lock);
  r = cbt_checkpoint_create_cb (rm.c, name, true, remark_inflight, &rm, err,
                                errlen);
  if (!rm.unlocked)
    pthread_mutex_unlock (&inflight_lock);
  if (r == 0 && rm.err != 0) {
    char why[CBT_ERRLEN];

    /* The new checkpoint would miss them: it goes (merged back). */
    if (cbt_checkpoint_fail (rm.c, name, why, sizeof why) == -1)
      nbdkit_error ("sparsebackup: checkpoint '%s': %s", name, why);
    snprintf (err, errlen, "cannot mark the changes in flight: %s",
              strerror (rm.err));
    errno = rm.err;
    r = -1;
  }
  if (r == 0 && cbt_commit (rm.c, rm.max) == -1) {
    snprintf (err, errlen, "cannot commit the changes in flight: %s",
              strerror (errno));
    r = -1;
  }
  if (r == -1 && errno == EIO)
    tracking_set_io_error ();
  return r;
}

ssize_t
tracking_find (const char *name, struct cbt_checkpoint_info *info,
               struct checkpoint_ref *ref)
{
  struct cbt *c = tracking_cbt ();
  ssize_t k;

  if (c == NULL) {
    errno = ENOENT;
    return -1;
  }
  k = cbt_checkpoint_find (c, name, info);
  if (k >= 0 && ref) {
    ref->id = info->serial;
    snprintf (ref->name, sizeof ref->name, "%s", info->name);
  }
  return k;
}

bool
tracking_ref_alive (const struct checkpoint_ref *ref)
{
  struct cbt *c = tracking_cbt ();

  return c && cbt_checkpoint_find_serial (c, ref->id, NULL) >= 0;
}

int
tracking_checkpoint_end (const char *name, bool ok, char *err,
                         size_t errlen)
{
  struct cbt *c = tracking_cbt ();

  return ok ? cbt_checkpoint_confirm (c, name, err, errlen)
            : cbt_checkpoint_fail (c, name, err, errlen);
}

int
tracking_checkpoint_delete (const char *name, char *err, size_t errlen)
{
  return cbt_checkpoint_delete (tracking_cbt (), name, err, errlen);
}

int
tracking_map_range (const struct checkpoint_ref *since,
                    const struct checkpoint_ref *until,
                    uint64_t start, uint64_t end,
                    cbt_extent_fn extent, void *opaque,
                    char *err, size_t errlen)
{
  int r;

  err[0] = '\0';
  r = cbt_map_serial (tracking_cbt (), since->id, until ? until->id : 0,
                      start, end, extent, opaque, err, errlen);
  if (r == -1 && errno == ENOENT)
    snprintf (err, errlen, "checkpoint '%s' was deleted",
              tracking_ref_alive (since) ? until->name : since->name);
  return r;
}
