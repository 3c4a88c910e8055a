/* nbdkit-sparsebackup-filter: point-in-time backups (frozen.h).
 *
 * The frozen disk is the disk as it was when backup-begin returned.
 * Rules (doc/design.md, "Point-in-time backups"):
 *
 * - backup-begin takes the write side of FZ.rw, which every change
 *   holds (read side) from before it is issued until it ended: so no
 *   change is in flight when the checkpoint is created and the frozen
 *   state starts (the drain), and none starts until both are done.
 *   Frozen reads hold the read side too, so backup-end waits for them.
 * - A granule (FZ.gbits) is UNSAVED, BUSY (a change is saving it),
 *   SAVED (its old data is in the scratch file at the granule's own
 *   offset) or SAVED_ZERO (its old data read as zero: nothing stored).
 *   A change first saves every granule it touches that is not saved,
 *   and is issued only after that: an UNSAVED granule has not changed
 *   since the freeze.  States only move forward, except BUSY back to
 *   UNSAVED when saving failed and the change is refused.
 * - A frozen read of UNSAVED granules reads the plugin and then checks
 *   that they are still UNSAVED: if one is not, a change may have
 *   overwritten it during the read, and it is read again (from the
 *   scratch file, once saved).  Extents are checked the same way.
 * - Saving fails when the scratch file is full (sparsebackup-scratch-
 *   size) or an I/O fails.  break-backup (default): the backup is
 *   broken (frozen reads fail from then on, backup-end reports it and
 *   deletes the checkpoint), the change goes on, nothing more is saved.
 *   fail-write: the change fails (ENOSPC or EIO), the backup stays
 *   intact.
 *
 * The scratch file is emptied at start, at backup-begin and at
 * backup-end; it is never trusted across a restart (a backup still
 * pending at restart is dropped with its checkpoint, cbt.h).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* pthread_rwlockattr_setkind_np, F_OFD_SETLK */
#endif
#include <config.h>

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
#include "cowmap.h"
#include "zerodetect.h"
#include "sparsebackup.h"
#include "cbt-glue.h"
#include "frozen.h"

/* -D sparsebackup.frozen_read_delay=MS: for tests, sleep MS ms between
 * looking at the granules of a frozen read and reading the plugin (the
 * window in which a change may overwrite them).
 */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_frozen_read_delay = 0;

enum scratch_error { SE_BREAK, SE_FAIL_WRITE };

static char *cfg_scratch_path = NULL;
static uint64_t cfg_scratch_size = UINT64_MAX;  /* no limit */
static enum scratch_error cfg_scratch_error = SE_BREAK;

#define MIN_GBITS 16              /* 64K */
#define MAX_GBITS 20              /* 1M, unless the disk is huge */
#define MAX_GRANULES (UINT64_C (1) << 27)  /* 16M per bitmap */
#define MAX_GRANULE (UINT64_C (64) << 20)
#define SAVE_CHUNK (UINT64_C (4) << 20)   /* bytes read per save */
#define ZERO_QUERY_MIN (UINT64_C (1) << 20) /* ask extents from here */

static struct {
  pthread_rwlock_t rw;          /* see the top */
  pthread_mutex_t lock;         /* active, gen, name */
  int fd;                       /* the scratch file, -1 */
  bool active;
  uint64_t gen;                 /* ++ at each freeze */
  char name[CBT_NAME_MAX + 1];  /* the frozen checkpoint */
  uint64_t size;                /* of the disk */
  unsigned gbits;               /* granule */
  struct cowmap *map;           /* the granule states (cowmap.h); only
                                   replaced with rw held for writing */
} fz = { .fd = -1 };

/* ---- Parameters ------------------------------------------------------- */

int
frozen_config (const char *key, const char *value)
{
  if (strcmp (key, "sparsebackup-scratch") == 0) {
    if (value[0] == '\0') {
      nbdkit_error ("%s: '%s' is not a file name", key, value);
      return -1;
    }
    return set_absolute (&cfg_scratch_path, key, value);
  }
  if (strcmp (key, "sparsebackup-scratch-size") == 0) {
    int64_t v = nbdkit_parse_size (value);

    if (v == -1) {
      nbdkit_error ("%s: '%s' is not a valid size", key, value);
      return -1;
    }
    if (v == 0) {
      nbdkit_error ("%s: '%s': the scratch file needs room (at least one "
                    "granule)", key, value);
      return -1;
    }
    cfg_scratch_size = v;
    return 0;
  }
  if (strcmp (key, "sparsebackup-scratch-error") == 0) {
    static const struct sb_choice c[] = {
      { "break-backup", SE_BREAK, false },
      { "fail-write", SE_FAIL_WRITE, false },
      { NULL, 0, false },
    };
    int r;

    if (parse_choice (key, value, c, &r) == -1)
      return -1;
    cfg_scratch_error = r;
    return 0;
  }
  return 1;
}

int
frozen_config_complete (void)
{
  if (cfg_scratch_path &&
      (cfg_cbt_path == NULL || cfg_control_path == NULL)) {
    nbdkit_error ("sparsebackup-scratch: '%s' needs sparsebackup-cbt=FILE "
                  "and sparsebackup-control=SOCKET (backups begin with "
                  "backup-begin)", cfg_scratch_path);
    return -1;
  }
  return 0;
}

bool
frozen_configured (void)
{
  return cfg_scratch_path != NULL;
}

int
frozen_get_ready (void)
{
  pthread_rwlockattr_t a;
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
  struct stat st;
  int fd;

  if (cfg_scratch_path == NULL)
    return 0;
  /* Writers first: backup-begin must not wait for a stream of changes. */
  pthread_rwlockattr_init (&a);
  pthread_rwlockattr_setkind_np (&a,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&fz.rw, &a);
  pthread_rwlockattr_destroy (&a);
  pthread_mutex_init (&fz.lock, NULL);

  if (stat (cfg_scratch_path, &st) == 0 && !S_ISREG (st.st_mode)) {
    nbdkit_error ("sparsebackup-scratch: '%s' is not a regular file",
                  cfg_scratch_path);
    return -1;
  }
  fd = open (cfg_scratch_path, O_RDWR | O_CREAT | O_CLOEXEC, 0600);
  if (fd == -1) {
    nbdkit_error ("sparsebackup-scratch: cannot open '%s': %m",
                  cfg_scratch_path);
    return -1;
  }
  if (fstat (fd, &st) == -1 || !S_ISREG (st.st_mode)) {
    nbdkit_error ("sparsebackup-scratch: '%s' is not a regular file",
                  cfg_scratch_path);
    close (fd);
    return -1;
  }
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1) {
    nbdkit_error ("sparsebackup-scratch: '%s' is in use by another "
                  "process (locked)", cfg_scratch_path);
    close (fd);
    return -1;
  }
  if (ftruncate (fd, 0) == -1) {
    nbdkit_error ("sparsebackup-scratch: cannot empty '%s': %m",
                  cfg_scratch_path);
    close (fd);
    return -1;
  }
  fz.fd = fd;
  return 0;
}

static void
release_state (void)
{
  cowmap_free (fz.map);
  fz.map = NULL;
  fz.active = false;
  if (fz.fd >= 0 && ftruncate (fz.fd, 0) == -1)
    nbdkit_debug ("sparsebackup-scratch: cannot empty '%s': %m",
                  cfg_scratch_path);
}

void
frozen_unload (void)
{
  if (fz.fd >= 0) {
    release_state ();
    close (fz.fd);
    fz.fd = -1;
  }
  free (cfg_scratch_path);
  cfg_scratch_path = NULL;
}

/* ---- Backups ---------------------------------------------------------- */

/* Start the frozen state for checkpoint NAME.  rw held for writing. */
static int
activate (struct cbt *c, const char *name, char *err, size_t errlen)
{
  uint64_t size = cbt_disk_size (c);
  unsigned gbits = MIN_GBITS;

  while ((UINT64_C (1) << gbits) < cbt_granularity (c) && gbits < MAX_GBITS)
    gbits++;
  while (((size - 1) >> gbits) + 1 > MAX_GRANULES)
    gbits++;
  if ((UINT64_C (1) << gbits) > MAX_GRANULE) {
    snprintf (err, errlen, "the disk (%" PRIu64 " bytes) is too large for "
              "a point-in-time backup", size);
    errno = EFBIG;
    return -1;
  }
  release_state ();
  fz.map = cowmap_new (size, gbits);
  if (fz.map == NULL) {
    snprintf (err, errlen, "out of memory for the frozen disk's state "
              "(%" PRIu64 " bytes)", 3 * ((((size - 1) >> gbits) + 64) / 8));
    errno = ENOMEM;
    return -1;
  }
  fz.size = size;
  fz.gbits = gbits;
  snprintf (fz.name, sizeof fz.name, "%s", name);
  fz.gen++;
  fz.active = true;
  nbdkit_debug ("sparsebackup: backup '%s' frozen: granule %" PRIu64
                ", scratch limit %" PRIu64, name, UINT64_C (1) << gbits,
                cfg_scratch_size);
  return 0;
}

int
frozen_backup_begin (struct cbt *c, const char *name, char *err,
                     size_t errlen)
{
  int r;

  if (!frozen_configured ())
    return cbt_begin_checkpoint (c, name, err, errlen);
  pthread_rwlock_wrlock (&fz.rw);       /* the drain */
  r = cbt_begin_checkpoint (c, name, err, errlen);
  if (r == 0) {
    pthread_mutex_lock (&fz.lock);
    r = activate (c, name, err, errlen);
    pthread_mutex_unlock (&fz.lock);
    if (r == -1) {
      int e = errno;
      char msg[CBT_ERRLEN];

      if (cbt_checkpoint_fail (c, name, msg, sizeof msg) == -1)
        nbdkit_error ("sparsebackup: backup '%s': %s", name, msg);
      errno = e;
    }
  }
  pthread_rwlock_unlock (&fz.rw);
  return r;
}

int
frozen_backup_end (struct cbt *c, const char *name, bool ok, bool *broken,
                   char *err, size_t errlen)
{
  char why[CBT_ERRLEN];
  bool ours;
  int r;

  *broken = false;
  if (!frozen_configured ())
    return ok ? cbt_checkpoint_confirm (c, name, err, errlen)
              : cbt_checkpoint_fail (c, name, err, errlen);
  pthread_rwlock_wrlock (&fz.rw);       /* no frozen read in flight */
  pthread_mutex_lock (&fz.lock);
  ours = fz.active && strcmp (fz.name, name) == 0;
  pthread_mutex_unlock (&fz.lock);
  *broken = ours && cowmap_broken (fz.map, why, sizeof why);
  if (*broken) {
    r = cbt_checkpoint_fail (c, name, err, errlen);
    if (r == 0) {
      snprintf (err, errlen, "backup '%s' is broken (%s): its checkpoint "
                "was deleted, take the backup again", name, why);
      errno = EIO;
      r = -1;
    }
    else
      *broken = false;
  }
  else
    r = ok ? cbt_checkpoint_confirm (c, name, err, errlen)
           : cbt_checkpoint_fail (c, name, err, errlen);
  /* The checkpoint is good or gone: the frozen disk is no more. */
  if (ours && (r == 0 || *broken)) {
    pthread_mutex_lock (&fz.lock);
    release_state ();
    pthread_mutex_unlock (&fz.lock);
  }
  pthread_rwlock_unlock (&fz.rw);
  return r;
}

int
frozen_checkpoint_delete (struct cbt *c, const char *name, char *err,
                          size_t errlen)
{
  bool ours, broken;

  if (frozen_configured ()) {
    pthread_mutex_lock (&fz.lock);
    ours = fz.active && strcmp (fz.name, name) == 0;
    pthread_mutex_unlock (&fz.lock);
    /* Deleting the frozen backup's checkpoint ends the backup. */
    if (ours)
      return frozen_backup_end (c, name, false, &broken, err, errlen);
  }
  return cbt_checkpoint_delete (c, name, err, errlen);
}

void
frozen_status (char *buf, size_t len)
{
  char limit[32] = "none";
  bool active, broken = false;
  uint64_t used = 0;

  if (!frozen_configured ()) {
    buf[0] = '\0';
    return;
  }
  if (cfg_scratch_size != UINT64_MAX)
    snprintf (limit, sizeof limit, "%" PRIu64, cfg_scratch_size);
  /* rw keeps the map from being replaced meanwhile. */
  pthread_rwlock_rdlock (&fz.rw);
  pthread_mutex_lock (&fz.lock);
  active = fz.active;
  if (active) {
    used = cowmap_used (fz.map);
    broken = cowmap_broken (fz.map, NULL, 0);
  }
  snprintf (buf, len, " frozen=%s scratch-used=%" PRIu64
            " scratch-limit=%s backup=%s", active ? fz.name : "-", used,
            limit, broken ? "broken" : "ok");
  pthread_mutex_unlock (&fz.lock);
  pthread_rwlock_unlock (&fz.rw);
}

/* ---- Copy before write ----------------------------------------------- */

/* Saving [A, B) failed (lock not held): the granules from DONE on are
 * not saved.  Returns 0 if the change may go on (the backup is broken),
 * -1 with *ERR if it must fail.
 */
static int
save_failed (uint64_t a, uint64_t done, uint64_t b, bool full,
             const char *why, int *err)
{
  cowmap_done (fz.map, a, done, b);
  if (cfg_scratch_error == SE_FAIL_WRITE) {
    nbdkit_error ("sparsebackup: backup '%s': %s: the write is refused "
                  "(sparsebackup-scratch-error=fail-write)", fz.name, why);
    *err = full ? ENOSPC : EIO;
    return -1;
  }
  if (cowmap_break (fz.map, why))
    nbdkit_error ("sparsebackup: backup '%s' is broken: %s: frozen reads "
                  "fail from now on", fz.name, why);
  return 0;
}

/* True if the plugin's extents say [OFF, OFF+LEN) reads as zero (only
 * asked for large runs: a trim or zero request over a hole need not
 * read it).  The granules are BUSY: no change can land meanwhile.
 */
static bool
plugin_says_zero (nbdkit_next *next, uint64_t off, uint64_t len)
{
  struct nbdkit_extents *ex;
  uint64_t p = off;
  int e;

  if (len < ZERO_QUERY_MIN || next->can_extents (next) != 1)
    return false;
  ex = nbdkit_extents_new (off, off + len);
  if (ex == NULL)
    return false;
  if (next->extents (next, len, off, 0, ex, &e) == 0)
    for (size_t i = 0; i < nbdkit_extents_count (ex); ++i) {
      struct nbdkit_extent x = nbdkit_get_extent (ex, i);

      if (x.offset > p || !(x.type & NBDKIT_EXTENT_ZERO))
        break;
      p = x.offset + x.length;
    }
  nbdkit_extents_free (ex);
  return p >= off + len;
}

/* Save the granules [A, B), claimed BUSY (rw held for reading). */
static int
save_run (nbdkit_next *next, uint64_t a, uint64_t b, int *err)
{
  const uint64_t gs = UINT64_C (1) << fz.gbits;
  const uint64_t off = a << fz.gbits;
  const uint64_t len = MIN (b << fz.gbits, fz.size) - off;
  char why[CBT_ERRLEN];
  uint64_t g, done = a;
  char *buf;
  int e = 0;

  if (plugin_says_zero (next, off, len)) {
    for (g = a; g < b; ++g)
      cowmap_set_zero (fz.map, g);
    cowmap_done (fz.map, a, b, b);
    STAT_ADD (frozen_zero_bytes, len);
    return 0;
  }
  buf = malloc (len);
  if (buf == NULL) {
    snprintf (why, sizeof why, "out of memory to save %" PRIu64 " bytes",
              len);
    return save_failed (a, a, b, false, why, err);
  }
  /* In requests the plugin accepts (disk.scan_chunk, once known). */
  for (uint64_t k = 0, n; k < len; k += n) {
    n = MIN (len - k, disk.scan_chunk ? (uint64_t) disk.scan_chunk : len);
    if (next->pread (next, buf + k, n, off + k, 0, &e) == -1) {
      snprintf (why, sizeof why, "cannot read the old data at %" PRIu64
                " (%" PRIu64 " bytes): %s", off + k, n, strerror (e));
      free (buf);
      return save_failed (a, a, b, false, why, err);
    }
  }
  STAT_ADD (frozen_cbw_read_bytes, len);
  for (g = a; g < b; ) {
    uint64_t h = g, n, goff;
    bool zero = is_zero (buf + ((g - a) << fz.gbits),
                         MIN (gs, len - ((g - a) << fz.gbits)));
    ssize_t w = 0;

    if (zero) {
      cowmap_set_zero (fz.map, g);
      STAT_ADD (frozen_zero_bytes, MIN (gs, len - ((g - a) << fz.gbits)));
      done = ++g;
      continue;
    }
    /* A run of granules holding data: one write. */
    while (h + 1 < b &&
           !is_zero (buf + ((h + 1 - a) << fz.gbits),
                     MIN (gs, len - ((h + 1 - a) << fz.gbits))))
      h++;
    goff = g << fz.gbits;
    n = MIN ((h + 1) << fz.gbits, fz.size) - goff;
    if (!cowmap_reserve (fz.map, n, cfg_scratch_size)) {
      snprintf (why, sizeof why, "the scratch file %s is full (%" PRIu64
                " of %" PRIu64 " bytes used, %" PRIu64 " more needed)",
                cfg_scratch_path, cowmap_used (fz.map), cfg_scratch_size, n);
      free (buf);
      return save_failed (a, done, b, true, why, err);
    }
    for (uint64_t k = 0; k < n; k += w) {
      w = pwrite (fz.fd, buf + (goff - off) + k, n - k, goff + k);
      if (w <= 0) {
        bool full = w == -1 && (errno == ENOSPC || errno == EDQUOT);

        snprintf (why, sizeof why, "cannot write the scratch file %s at "
                  "%" PRIu64 ": %s", cfg_scratch_path, goff + k,
                  w == 0 ? "short write" : strerror (errno));
        cowmap_unreserve (fz.map, n);
        free (buf);
        return save_failed (a, done, b, full, why, err);
      }
    }
    STAT_ADD (frozen_saved_bytes, n);
    done = g = h + 1;
  }
  free (buf);
  cowmap_done (fz.map, a, b, b);
  return 0;
}

int
frozen_change_begin (nbdkit_next *next, uint64_t offset, uint64_t count,
                     int *err)
{
  uint64_t cursor, g1, max_run, ga, gb;
  bool active;

  if (!frozen_configured ())
    return 0;
  pthread_rwlock_rdlock (&fz.rw);
  pthread_mutex_lock (&fz.lock);
  active = fz.active;
  pthread_mutex_unlock (&fz.lock);
  if (!active || count == 0 || offset >= fz.size)
    return 0;
  max_run = MAX (SAVE_CHUNK >> fz.gbits, UINT64_C (1));
  cursor = offset >> fz.gbits;
  g1 = ((MIN (offset + count, fz.size) - 1) >> fz.gbits) + 1;
  /* Broken with break-backup: cowmap_claim saves nothing more. */
  while (cowmap_claim (fz.map, &cursor, g1, max_run, &ga, &gb) == 1)
    if (save_run (next, ga, gb, err) == -1) {
      pthread_rwlock_unlock (&fz.rw);
      return -1;
    }
  return 0;
}

void
frozen_change_end (void)
{
  if (frozen_configured ())
    pthread_rwlock_unlock (&fz.rw);
}

/* ---- The views --------------------------------------------------------- */

bool
frozen_is_view (const char *exportname)
{
  return cfg_cbt_path != NULL &&
    (strcmp (exportname, FROZEN_NAME) == 0 ||
     strncmp (exportname, FROZEN_SINCE_PREFIX,
              strlen (FROZEN_SINCE_PREFIX)) == 0);
}

int
frozen_view_prepare (struct sb_handle *h)
{
  struct cbt *c = cbt_get ();
  struct cbt_checkpoint_info info;
  char why[COWMAP_REASON_MAX];
  ssize_t ks, kf;

  if (!frozen_configured ()) {
    nbdkit_error ("sparsebackup: export '%s' needs a scratch file "
                  "(sparsebackup-scratch=FILE)", h->exportname);
    return -1;
  }
  pthread_mutex_lock (&fz.lock);
  if (!fz.active) {
    pthread_mutex_unlock (&fz.lock);
    nbdkit_error ("sparsebackup: export '%s': no backup in progress "
                  "(it exists from backup-begin to backup-end)",
                  h->exportname);
    return -1;
  }
  if (cowmap_broken (fz.map, why, sizeof why)) {
    nbdkit_error ("sparsebackup: export '%s': backup '%s' is broken: %s",
                  h->exportname, fz.name, why);
    pthread_mutex_unlock (&fz.lock);
    return -1;
  }
  h->frozen_gen = fz.gen;
  snprintf (h->until, sizeof h->until, "%s", fz.name);
  pthread_mutex_unlock (&fz.lock);
  if (h->since == NULL)
    return 0;
  ks = cbt_view_checkpoint (h->exportname, h->since);
  if (ks == -1)
    return -1;
  kf = cbt_find (c, h->until, &info);
  if (kf <= ks) {
    nbdkit_error ("sparsebackup: export '%s': checkpoint '%s' is not older "
                  "than the backup '%s'", h->exportname, h->since, h->until);
    return -1;
  }
  return 0;
}

/* Take the read side and check that H's frozen disk is still there
 * and not broken.
 */
static int
enter (struct sb_handle *h, int *err)
{
  char why[COWMAP_REASON_MAX];
  bool ok;

  pthread_rwlock_rdlock (&fz.rw);
  pthread_mutex_lock (&fz.lock);
  ok = fz.active && fz.gen == h->frozen_gen;
  pthread_mutex_unlock (&fz.lock);
  if (!ok) {
    pthread_rwlock_unlock (&fz.rw);
    nbdkit_error ("sparsebackup: export '%s': backup '%s' has ended",
                  h->exportname, h->until);
    *err = EIO;
    return -1;
  }
  if (cowmap_broken (fz.map, why, sizeof why)) {
    pthread_rwlock_unlock (&fz.rw);
    nbdkit_error ("sparsebackup: export '%s': backup '%s' is broken: %s",
                  h->exportname, h->until, why);
    *err = EIO;
    return -1;
  }
  return 0;
}

static void
leave (void)
{
  pthread_rwlock_unlock (&fz.rw);
}

/* The backup broke during a read of H: fail it (rw released). */
static int
broke (struct sb_handle *h, int *err)
{
  char why[COWMAP_REASON_MAX];

  cowmap_broken (fz.map, why, sizeof why);
  leave ();
  nbdkit_error ("sparsebackup: export '%s': backup '%s' is broken: %s",
                h->exportname, h->until, why);
  *err = EIO;
  return -1;
}

int
frozen_pread (nbdkit_next *next, struct sb_handle *h, void *buf,
              uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  char *b = buf;

  if (enter (h, err) == -1)
    return -1;
  while (pos < end) {
    uint64_t rend;
    enum cow_state st = cowmap_run (fz.map, pos, end, &rend);
    ssize_t r;

    if (st == COW_ZERO) {
      memset (b + (pos - offset), 0, rend - pos);
      pos = rend;
      continue;
    }
    if (st == COW_SAVED) {
      for (uint64_t p = pos; p < rend; p += r) {
        r = pread (fz.fd, b + (p - offset), rend - p, p);
        if (r <= 0) {
          nbdkit_error ("sparsebackup: export '%s': cannot read the scratch "
                        "file %s at %" PRIu64 ": %s", h->exportname,
                        cfg_scratch_path, p,
                        r == 0 ? "unexpected end of file" : strerror (errno));
          *err = EIO;
          leave ();
          return -1;
        }
      }
      STAT_ADD (frozen_scratch_read_bytes, rend - pos);
      pos = rend;
      continue;
    }
    if (sparsebackup_debug_frozen_read_delay > 0)
      usleep (sparsebackup_debug_frozen_read_delay * 1000);
    if (next->pread (next, b + (pos - offset), rend - pos, pos, flags,
                     err) == -1) {
      leave ();
      return -1;
    }
    if (cowmap_broken (fz.map, NULL, 0))
      return broke (h, err);
    /* The rest again, from its new state. */
    pos = cowmap_check (fz.map, pos, rend);
  }
  leave ();
  return 0;
}

/* Add [A, B) with TYPE, HOLE-only made data. */
static int
add (struct nbdkit_extents *extents, uint64_t a, uint64_t b, uint32_t type,
     int *err)
{
  if (type == NBDKIT_EXTENT_HOLE)
    type = 0;
  if (b > a && nbdkit_add_extent (extents, a, b - a, type) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

/* The plugin's extents over the UNSAVED run [POS, REND), added as far as
 * they are still valid after the call: returns where that is, or -1.
 */
static int64_t
unsaved_extents (nbdkit_next *next, int can_ext, uint64_t pos,
                 uint64_t rend, uint32_t flags,
                 struct nbdkit_extents *extents, int *err)
{
  struct nbdkit_extents *ex;
  uint64_t good, p = pos;
  int r;

  if (!can_ext)
    return add (extents, pos, rend, 0, err) == -1 ? -1 : (int64_t) rend;
  ex = nbdkit_extents_new (pos, rend);
  r = ex ? next->extents (next, rend - pos, pos, flags, ex, err) : -1;
  if (ex == NULL)
    *err = errno;
  if (r == -1) {
    nbdkit_extents_free (ex);
    return -1;
  }
  good = cowmap_check (fz.map, pos, rend);
  for (size_t i = 0; i < nbdkit_extents_count (ex) && p < good; ++i) {
    struct nbdkit_extent e = nbdkit_get_extent (ex, i);
    uint64_t eend = MIN (e.offset + e.length, good);

    if (eend <= p || e.offset > p)
      continue;
    if (add (extents, p, eend, e.type & (NBDKIT_EXTENT_HOLE |
                                          NBDKIT_EXTENT_ZERO), err) == -1) {
      nbdkit_extents_free (ex);
      return -1;
    }
    p = eend;
  }
  nbdkit_extents_free (ex);
  /* The plugin said nothing about POS: data. */
  if (p == pos && good > pos) {
    if (add (extents, pos, good, 0, err) == -1)
      return -1;
    p = good;
  }
  return p;
}

int
frozen_extents (nbdkit_next *next, struct sb_handle *h, uint64_t *pos,
                uint64_t end, uint32_t flags,
                struct nbdkit_extents *extents, int *err)
{
  const bool one = flags & NBDKIT_FLAG_REQ_ONE;
  uint64_t p = *pos;
  int can_ext = next->can_extents (next);

  if (can_ext == -1) {
    *err = EIO;
    return -1;
  }
  if (enter (h, err) == -1)
    return -1;
  while (p < end) {
    uint64_t rend;
    enum cow_state st = cowmap_run (fz.map, p, end, &rend);
    int64_t q;

    if (st == COW_UNSAVED) {
      q = unsaved_extents (next, can_ext, p, rend, flags, extents, err);
      if (q == -1) {
        leave ();
        return -1;
      }
      if (cowmap_broken (fz.map, NULL, 0))
        return broke (h, err);
      p = q;
    }
    else {
      if (add (extents, p, rend, st == COW_ZERO ?
               NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0, err) == -1) {
        leave ();
        return -1;
      }
      p = rend;
    }
    if (one && p > *pos)
      break;
  }
  leave ();
  *pos = p;
  return 0;
}

int
frozen_list_exports (struct nbdkit_exports *exports)
{
  struct cbt *c = cbt_get ();
  struct cbt_checkpoint_info info;
  char name[sizeof FROZEN_SINCE_PREFIX + CBT_NAME_MAX];
  char desc[2 * CBT_NAME_MAX + 100];
  char frozen[CBT_NAME_MAX + 1];
  bool active;

  if (c == NULL || !frozen_configured ())
    return 0;
  pthread_rwlock_rdlock (&fz.rw);
  pthread_mutex_lock (&fz.lock);
  active = fz.active && !cowmap_broken (fz.map, NULL, 0);
  snprintf (frozen, sizeof frozen, "%s", fz.name);
  pthread_mutex_unlock (&fz.lock);
  pthread_rwlock_unlock (&fz.rw);
  if (!active)
    return 0;
  snprintf (desc, sizeof desc, "the disk as it was at backup-begin %s "
            "(point-in-time, read-only)", frozen);
  if (nbdkit_add_export (exports, FROZEN_NAME, desc) == -1)
    return -1;
  for (size_t i = 0; cbt_checkpoint_get (c, i, &info) == 0; ++i) {
    if (strcmp (info.name, frozen) == 0)
      break;
    if (info.state != CBT_STATE_GOOD)
      continue;
    snprintf (name, sizeof name, "%s%s", FROZEN_SINCE_PREFIX, info.name);
    snprintf (desc, sizeof desc, "the disk as it was at backup-begin %s, "
              "changes since checkpoint %s (delta view, read-only)",
              frozen, info.name);
    if (nbdkit_add_export (exports, name, desc) == -1)
      return -1;
  }
  return 0;
}
