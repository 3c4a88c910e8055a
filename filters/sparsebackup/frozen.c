/* nbdkit-sparsebackup-filter: the frozen disk of a point-in-time
 * backup (frozen.h).  Rules (doc/design.md, "Point-in-time backups"):
 *
 * - A granule (2^FZ.GBITS bytes, cowmap.h) is UNSAVED, BUSY (a change
 *   is saving it), SAVED (its old data is in the scratch file) or
 *   SAVED_ZERO (its old data read as zero: nothing stored).  A change
 *   first saves every granule it touches that is not saved, and is
 *   issued only after that: an UNSAVED granule has not changed since
 *   the freeze.  States only move forward, except BUSY back to UNSAVED
 *   when saving failed and the change is refused.
 * - The scratch file is compact: a header, then the saved granules in
 *   the order they were saved (cowmap's slots), so it is as large as
 *   what it holds, whatever the size of the disk.
 * - A frozen read of UNSAVED granules reads the disk and then checks
 *   that they are still UNSAVED: if one is not, a change may have
 *   overwritten it during the read, and it is read again (from the
 *   scratch file, once saved).  Extents are checked the same way.
 * - Saving fails when the scratch file is full (sparsebackup-scratch-
 *   size) or an I/O fails.  break-backup (default): the backup is
 *   broken (frozen reads fail from then on), the change goes on, nothing
 *   more is saved.  fail-write: the change fails (ENOSPC or EIO), the
 *   backup stays intact.
 *
 * FZ.RW guards the state's life: saves and frozen reads hold its read
 * side, frozen_activate and frozen_release its write side (it prefers
 * writers).  FZ.LOCK guards the fields that say which disk is frozen.
 * The caller (backup.c) serialises activate and release, and drains the
 * changes around activate (disk.c's drain).
 *
 * The scratch file is opened at start-up without following symbolic
 * links, refused if it is a file the plugin serves or the cbt file, or
 * if it holds anything but a scratch file of ours; it is emptied at
 * start, at activation and at release, and never trusted across a
 * restart (a backup pending at restart is dropped with its checkpoint).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* pthread_rwlockattr_setkind_np, F_OFD_SETLK */
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

#include "cleanup.h"
#include "cowmap.h"
#include "minmax.h"
#include "zerodetect.h"
#include "internal.h"
#include "frozen.h"
#include "lower.h"

/* -D sparsebackup.frozen_read_delay=MS: for tests, sleep MS ms between
 * looking at the granules of a frozen read and reading the plugin (the
 * window in which a change may overwrite them).
 */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_frozen_read_delay = 0;

#define MIN_GBITS 16              /* 64K */
#define MAX_GBITS 20              /* 1M, unless the disk is huge */
#define MAX_GRANULES (UINT64_C (1) << 27)  /* 16M per bitmap */
#define MAX_GRANULE (UINT64_C (64) << 20)
#define SAVE_CHUNK (UINT64_C (4) << 20)   /* bytes read per save */
#define ZERO_QUERY_MIN (UINT64_C (1) << 20) /* ask extents from here */

/* The scratch file's header. */
#define SCRATCH_MAGIC "SBKSCRT\n"
#define SCRATCH_HEADER 4096
#define SCRATCH_VERSION 1

static struct {
  pthread_rwlock_t rw;          /* see the top */
  pthread_mutex_t lock;         /* active, gen, name */
  int fd;                       /* the scratch file, -1 */
  bool active;
  uint64_t gen;                 /* ++ at each activation */
  char name[CBT_NAME_MAX + 1];  /* the frozen checkpoint */
  uint64_t size;                /* of the disk */
  unsigned gbits;               /* granule */
  struct cowmap *map;           /* the granule states (cowmap.h); only
                                   replaced with rw held for writing */
} fz = { .fd = -1 };

bool
frozen_enabled (void)
{
  return cfg_scratch_path != NULL;
}

/* ---- The scratch file ------------------------------------------------- */

static int
write_header (int fd)
{
  char h[SCRATCH_HEADER] = { 0 };
  uint32_t v = SCRATCH_VERSION, hs = SCRATCH_HEADER;

  memcpy (h, SCRATCH_MAGIC, 8);
  memcpy (h + 8, &v, 4);
  memcpy (h + 12, &hs, 4);
  snprintf (h + 16, 80, "sparsebackup scratch file: never trusted");
  return pwrite (fd, h, sizeof h, 0) == (ssize_t) sizeof h ? 0 : -1;
}

/* Refuse a scratch file that holds anything but a scratch file of
 * ours (ST: its fstat).
 */
static int
check_contents (int fd, const struct stat *st)
{
  char magic[8];

  if (st->st_size == 0)
    return 0;
  if (st->st_size < 8 || pread (fd, magic, 8, 0) != 8 ||
      memcmp (magic, SCRATCH_MAGIC, 8) != 0) {
    nbdkit_error ("sparsebackup-scratch: '%s' exists and holds %" PRIu64
                  " bytes that are not a sparsebackup scratch file: refused "
                  "(it is never overwritten; name a new file, or remove "
                  "this one if it is not needed)", cfg_scratch_path,
                  (uint64_t) st->st_size);
    return -1;
  }
  return 0;
}

int
frozen_open (void)
{
  pthread_rwlockattr_t a;
  struct flock fl = { .l_type = F_WRLCK, .l_whence = SEEK_SET };
  struct stat st;
  int fd;

  if (cfg_scratch_path == NULL)
    return 0;
  /* Writers first: backup-end must not wait for a stream of reads. */
  pthread_rwlockattr_init (&a);
  pthread_rwlockattr_setkind_np (&a,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&fz.rw, &a);
  pthread_rwlockattr_destroy (&a);
  pthread_mutex_init (&fz.lock, NULL);

  if (lstat (cfg_scratch_path, &st) == 0 && !S_ISREG (st.st_mode) &&
      !S_ISLNK (st.st_mode)) {
    nbdkit_error ("sparsebackup-scratch: '%s' is not a regular file",
                  cfg_scratch_path);
    return -1;
  }
  fd = open (cfg_scratch_path, O_RDWR | O_CREAT | O_NOFOLLOW | O_CLOEXEC,
             0600);
  if (fd == -1 && errno == ELOOP) {
    nbdkit_error ("sparsebackup-scratch: '%s' is a symbolic link: refused "
                  "(name the file itself)", cfg_scratch_path);
    return -1;
  }
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
  if (config_check_clash ("sparsebackup-scratch", cfg_scratch_path,
                          &st) == -1 ||
      check_contents (fd, &st) == -1) {
    close (fd);
    return -1;
  }
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1) {
    nbdkit_error ("sparsebackup-scratch: '%s' is in use by another "
                  "process (locked)", cfg_scratch_path);
    close (fd);
    return -1;
  }
  if (ftruncate (fd, 0) == -1 || write_header (fd) == -1) {
    nbdkit_error ("sparsebackup-scratch: cannot write '%s': %m",
                  cfg_scratch_path);
    close (fd);
    return -1;
  }
  fz.fd = fd;
  return 0;
}

/* Empty the scratch file (its header stays).  Not under FZ.RW: the
 * caller serialises it with activations.
 */
static void
empty_scratch (void)
{
  if (fz.fd >= 0 && ftruncate (fz.fd, SCRATCH_HEADER) == -1)
    nbdkit_debug ("sparsebackup-scratch: cannot empty '%s': %m",
                  cfg_scratch_path);
}

void
frozen_close (void)
{
  if (fz.fd >= 0) {
    cowmap_free (fz.map);
    fz.map = NULL;
    fz.active = false;
    empty_scratch ();           /* its header stays: it is ours */
    close (fz.fd);
    fz.fd = -1;
  }
}

/* ---- Activation and release ------------------------------------------ */

/* The granule of the frozen disk: at least 64K and the cbt's
 * granularity (up to 1M), larger for a huge disk.
 */
static int
choose_gbits (uint64_t size, uint32_t granularity, unsigned *gbits,
              char *err, size_t errlen)
{
  unsigned g = MIN_GBITS;

  while ((UINT64_C (1) << g) < granularity && g < MAX_GBITS)
    g++;
  while (((size - 1) >> g) + 1 > MAX_GRANULES)
    g++;
  if ((UINT64_C (1) << g) > MAX_GRANULE) {
    snprintf (err, errlen, "the disk (%" PRIu64 " bytes) is too large for "
              "a point-in-time backup", size);
    errno = EFBIG;
    return -1;
  }
  *gbits = g;
  return 0;
}

int
frozen_activate (uint64_t size, uint32_t granularity, const char *name,
                 char *err, size_t errlen)
{
  struct cowmap *map;
  unsigned gbits;

  assert (frozen_enabled () && size > 0);
  if (choose_gbits (size, granularity, &gbits, err, errlen) == -1)
    return -1;
  map = cowmap_new (size, gbits);
  if (map == NULL) {
    snprintf (err, errlen, "out of memory for the frozen disk's state "
              "(%" PRIu64 " bytes)", 3 * ((((size - 1) >> gbits) + 64) / 8));
    errno = ENOMEM;
    return -1;
  }
  empty_scratch ();

  SCOPED_WRLOCK (&fz.rw);
  SCOPED_MUTEX (&fz.lock);
  assert (!fz.active);
  fz.map = map;
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

void
frozen_release (void)
{
  struct cowmap *map;

  {
    SCOPED_WRLOCK (&fz.rw);     /* no save or frozen read in flight */
    SCOPED_MUTEX (&fz.lock);

    map = fz.map;
    fz.map = NULL;
    fz.active = false;
  }
  cowmap_free (map);
  empty_scratch ();
}

bool
frozen_current (struct frozen_info *info)
{
  SCOPED_RDLOCK (&fz.rw);       /* the map is not replaced meanwhile */
  SCOPED_MUTEX (&fz.lock);

  memset (info, 0, sizeof *info);
  if (!frozen_enabled () || !fz.active)
    return false;
  info->gen = fz.gen;
  snprintf (info->name, sizeof info->name, "%s", fz.name);
  info->broken = cowmap_broken (fz.map, info->why, sizeof info->why);
  info->scratch_used = cowmap_used (fz.map);
  return true;
}

/* ---- Copy before write ----------------------------------------------- */

/* Saving the claimed run [A, B) failed: the granules from DONE on are
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

/* Read the old data of [OFF, OFF+LEN) into BUF in requests of at most
 * MAX bytes.  -1 with WHY.
 */
static int
read_old (nbdkit_next *next, uint32_t max, char *buf, uint64_t off,
          uint64_t len, char *why, size_t whylen)
{
  for (uint64_t k = 0, n; k < len; k += n) {
    int e = 0;

    n = MIN (len - k, (uint64_t) max);
    if (next->pread (next, buf + k, n, off + k, 0, &e) == -1) {
      snprintf (why, whylen, "cannot read the old data at %" PRIu64
                " (%" PRIu64 " bytes): %s", off + k, n, strerror (e));
      return -1;
    }
  }
  STAT_ADD (frozen_cbw_read_bytes, len);
  return 0;
}

/* Store the granules [G, H) (claimed, their old data at DATA, N bytes)
 * in consecutive slots of the scratch file.  -1 with WHY and *FULL.
 */
static int
store_run (uint64_t g, uint64_t h, const char *data, uint64_t n,
           bool *full, char *why, size_t whylen)
{
  uint64_t slot, pos;
  ssize_t w = 0;

  if (cowmap_store (fz.map, g, h, n, cfg_scratch_size, &slot) == -1) {
    *full = errno == ENOSPC;
    if (*full)
      snprintf (why, whylen, "the scratch file %s is full (%" PRIu64
                " of %" PRIu64 " bytes used, %" PRIu64 " more needed)",
                cfg_scratch_path, cowmap_used (fz.map), cfg_scratch_size, n);
    else
      snprintf (why, whylen, "out of memory for the scratch file's index");
    return -1;
  }
  pos = SCRATCH_HEADER + (slot << fz.gbits);
  for (uint64_t k = 0; k < n; k += w) {
    w = pwrite (fz.fd, data + k, n - k, pos + k);
    if (w <= 0) {
      *full = w == -1 && (errno == ENOSPC || errno == EDQUOT);
      snprintf (why, whylen, "cannot write the scratch file %s at %"
                PRIu64 ": %s", cfg_scratch_path, pos + k,
                w == 0 ? "short write" : strerror (errno));
      cowmap_unstore (fz.map, n);
      return -1;
    }
  }
  STAT_ADD (frozen_saved_bytes, n);
  return 0;
}

/* The granules [A, B) read into BUF (from disk offset OFF, LEN bytes):
 * note the zero ones, store runs of the others.  -1 with *DONE (the
 * granules before it are saved), WHY and *FULL.
 */
static int
store_granules (uint64_t a, uint64_t b, const char *buf, uint64_t off,
                uint64_t len, uint64_t *done, bool *full, char *why,
                size_t whylen)
{
  const uint64_t gs = UINT64_C (1) << fz.gbits;

  for (uint64_t g = a; g < b; ) {
    uint64_t rel = (g - a) << fz.gbits, h = g + 1, n;

    if (is_zero (buf + rel, MIN (gs, len - rel))) {
      cowmap_set_zero (fz.map, g);
      STAT_ADD (frozen_zero_bytes, MIN (gs, len - rel));
      *done = ++g;
      continue;
    }
    /* A run of granules holding data: one write. */
    while (h < b && !is_zero (buf + ((h - a) << fz.gbits),
                              MIN (gs, len - ((h - a) << fz.gbits))))
      h++;
    n = MIN (h << fz.gbits, fz.size) - (g << fz.gbits);
    if (store_run (g, h, buf + rel, n, full, why, whylen) == -1)
      return -1;
    *done = g = h;
  }
  assert (off + len <= fz.size);
  return 0;
}

/* Save the granules [A, B), claimed BUSY (rw held for reading). */
static int
save_run (nbdkit_next *next, uint32_t max, uint64_t a, uint64_t b, int *err)
{
  const uint64_t off = a << fz.gbits;
  const uint64_t len = MIN (b << fz.gbits, fz.size) - off;
  char why[CBT_ERRLEN];
  CLEANUP_FREE char *buf = NULL;
  uint64_t done = a;
  bool full = false;

  /* A large run the plugin says reads as zero (a trim or zero request
   * over a hole) is not read at all.
   */
  if (len >= ZERO_QUERY_MIN && lower_reads_zero (next, off, len)) {
    for (uint64_t g = a; g < b; ++g)
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
  if (read_old (next, max, buf, off, len, why, sizeof why) == -1)
    return save_failed (a, a, b, false, why, err);
  if (store_granules (a, b, buf, off, len, &done, &full, why,
                      sizeof why) == -1)
    return save_failed (a, done, b, full, why, err);
  cowmap_done (fz.map, a, b, b);
  return 0;
}

int
frozen_save (nbdkit_next *next, uint32_t max_request, uint64_t offset,
             uint64_t count, int *err)
{
  uint64_t cursor, end, max_run, ga, gb;
  SCOPED_RDLOCK (&fz.rw);

  {
    SCOPED_MUTEX (&fz.lock);
    if (!fz.active || count == 0 || offset >= fz.size)
      return 0;
  }
  if (max_request == 0)
    max_request = SAVE_CHUNK;
  max_run = MAX (SAVE_CHUNK >> fz.gbits, UINT64_C (1));
  cursor = offset >> fz.gbits;
  end = ((MIN (offset + count, fz.size) - 1) >> fz.gbits) + 1;
  /* Broken with break-backup: cowmap_claim saves nothing more. */
  while (cowmap_claim (fz.map, &cursor, end, max_run, &ga, &gb) == 1)
    if (save_run (next, max_request, ga, gb, err) == -1)
      return -1;
  return 0;
}

/* ---- Frozen reads ----------------------------------------------------- */

/* With the read side of FZ.RW held: the frozen disk of V is still
 * there and not broken, else -1 with the error logged.
 */
static int
check_view (const struct frozen_view *v, int *err)
{
  char why[COWMAP_REASON_MAX];
  bool ours;

  {
    SCOPED_MUTEX (&fz.lock);
    ours = fz.active && fz.gen == v->gen;
  }
  if (!ours) {
    nbdkit_error ("sparsebackup: export '%s': backup '%s' has ended "
                  "(backup-end, or its checkpoint was deleted)",
                  v->exportname, v->name);
    *err = EIO;
    return -1;
  }
  if (cowmap_broken (fz.map, why, sizeof why)) {
    nbdkit_error ("sparsebackup: export '%s': backup '%s' is broken: %s",
                  v->exportname, v->name, why);
    *err = EIO;
    return -1;
  }
  return 0;
}

/* Read the SAVED granules of [POS, REND) from the scratch file into
 * BUF, one run of consecutive slots at a time.
 */
static int
read_saved (const char *exportname, char *buf, uint64_t pos, uint64_t rend,
            int *err)
{
  const uint64_t gmask = (UINT64_C (1) << fz.gbits) - 1;

  while (pos < rend) {
    uint64_t g = pos >> fz.gbits, slot = cowmap_slot (fz.map, g);
    uint64_t from = SCRATCH_HEADER + (slot << fz.gbits) + (pos & gmask);
    uint64_t n = MIN (rend, (g + 1) << fz.gbits) - pos;
    ssize_t r;

    assert (slot != UINT64_MAX);
    /* Following granules stored in the following slots: one read. */
    while (pos + n < rend &&
           cowmap_slot (fz.map, (pos + n) >> fz.gbits) ==
           slot + (((pos + n) >> fz.gbits) - g))
      n = MIN (rend - pos, n + (UINT64_C (1) << fz.gbits));
    for (uint64_t k = 0; k < n; k += r) {
      r = pread (fz.fd, buf + k, n - k, from + k);
      if (r <= 0) {
        nbdkit_error ("sparsebackup: export '%s': cannot read the scratch "
                      "file %s at %" PRIu64 ": %s", exportname,
                      cfg_scratch_path, from + k,
                      r == 0 ? "unexpected end of file" : strerror (errno));
        *err = EIO;
        return -1;
      }
    }
    STAT_ADD (frozen_scratch_read_bytes, n);
    buf += n;
    pos += n;
  }
  return 0;
}

/* The backup broke during a read of V: fail the read. */
static int
broke (const struct frozen_view *v, int *err)
{
  char why[COWMAP_REASON_MAX];

  cowmap_broken (fz.map, why, sizeof why);
  nbdkit_error ("sparsebackup: export '%s': backup '%s' is broken: %s",
                v->exportname, v->name, why);
  *err = EIO;
  return -1;
}

int
frozen_pread (nbdkit_next *next, const struct frozen_view *v, void *buf,
              uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  const uint64_t end = offset + count;
  uint64_t pos = offset;
  char *b = buf;
  SCOPED_RDLOCK (&fz.rw);

  if (check_view (v, err) == -1)
    return -1;
  while (pos < end) {
    uint64_t rend;
    enum cow_state st = cowmap_run (fz.map, pos, end, &rend);

    switch (st) {
    case COW_ZERO:
      memset (b + (pos - offset), 0, rend - pos);
      pos = rend;
      break;
    case COW_SAVED:
      if (read_saved (v->exportname, b + (pos - offset), pos, rend,
                      err) == -1)
        return -1;
      pos = rend;
      break;
    case COW_UNSAVED:
      if (sparsebackup_debug_frozen_read_delay > 0)
        usleep (sparsebackup_debug_frozen_read_delay * 1000);
      if (next->pread (next, b + (pos - offset), rend - pos, pos, flags,
                       err) == -1)
        return -1;
      if (cowmap_broken (fz.map, NULL, 0))
        return broke (v, err);
      /* The rest again, from its new state. */
      pos = cowmap_check (fz.map, pos, rend);
      break;
    }
  }
  return 0;
}

/* Add [A, B) with TYPE. */
static int
add_extent (struct nbdkit_extents *extents, uint64_t a, uint64_t b,
            uint32_t type, int *err)
{
  if (b > a && nbdkit_add_extent (extents, a, b - a, type) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

/* The layer's extents over the UNSAVED run [POS, REND), added as far
 * as they are still valid after the call: returns where that is, or -1.
 */
static int64_t
unsaved_extents (nbdkit_next *next, uint64_t pos, uint64_t rend,
                 uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  struct nbdkit_extents *ex = lower_extents (next, pos, rend, flags, err);
  uint64_t good;
  int64_t r;

  if (ex == NULL && *err != 0)
    return -1;
  good = cowmap_check (fz.map, pos, rend);
  r = (int64_t) pos;
  if (good > pos)
    r = lower_add_as_data (ex, pos, good, extents, err);
  nbdkit_extents_free (ex);
  return r;
}

int
frozen_extents (nbdkit_next *next, const struct frozen_view *v,
                uint64_t *pos, uint64_t end, uint32_t flags,
                struct nbdkit_extents *extents, int *err)
{
  const bool one = flags & NBDKIT_FLAG_REQ_ONE;
  uint64_t p = *pos;
  SCOPED_RDLOCK (&fz.rw);

  if (check_view (v, err) == -1)
    return -1;
  while (p < end) {
    uint64_t rend;
    enum cow_state st = cowmap_run (fz.map, p, end, &rend);
    int64_t q;

    if (st == COW_UNSAVED) {
      q = unsaved_extents (next, p, rend, flags, extents, err);
      if (q == -1)
        return -1;
      if (cowmap_broken (fz.map, NULL, 0))
        return broke (v, err);
      p = q;
    }
    else {
      if (add_extent (extents, p, rend, st == COW_ZERO ?
                      NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO : 0,
                      err) == -1)
        return -1;
      p = rend;
    }
    if (one && p > *pos)
      break;
  }
  *pos = p;
  return 0;
}
