/* nbdkit-sparsebackup-filter: changed-block tracking (common/cbt.h).
 *
 * This file: the sparsebackup-cbt* parameters, opening the cbt file,
 * the change tracker's recorder (every write, zero and trim of every
 * connection is marked before it is issued, and in write-ahead mode
 * committed), the changes in flight that a new checkpoint must mark
 * again (cbt.h's rule), and the delta views "@since:X".
 *
 * When the file is opened: the cbt needs the disk's size, which the
 * filter learns in .prepare.  The first .prepare of ANY connection
 * (whatever its export name) opens it with that connection's size,
 * under the disk lock; a connection is refused while the file cannot be
 * opened, and so is any later connection of another size.  No change
 * can be issued before that: a connection writes only after .prepare.
 *
 * The disk identity stored in the file is sparsebackup-cbt-id (default
 * empty); cbt_open also checks the disk size and the granularity.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "cbt.h"
#include "sparsebackup.h"
#include "cbt-glue.h"
#include "frozen.h"

char *cfg_cbt_path = NULL;
/* 0: the file's, or CBT_DEFAULT_GRANULARITY for a new file. */
static uint32_t cfg_cbt_gran = 0;
static enum cbt_mode cfg_cbt_mode = CBT_MODE_IN_USE;
static bool cfg_cbt_reset = false;
static char *cfg_cbt_id = NULL;
char *cfg_control_path = NULL;

static struct cbt *the_cbt;             /* published with release */
bool cbt_invalidated = false;           /* checkpoints lost at open */
bool cbt_io_error = false;              /* a mark or commit failed */

/* The changes in flight, as a multiset of the ranges change_begin gave
 * the recorder (change_end removes one equal range).  The lock is held
 * around each mark and its insertion, and around checkpoint creation
 * and the marks again: a change is either marked after the checkpoint,
 * or found here and marked again.
 */
struct range { uint64_t offset, count; };
static pthread_mutex_t inflight_lock = PTHREAD_MUTEX_INITIALIZER;
static struct range *inflight;
static size_t nr_inflight, cap_inflight;

struct cbt *
cbt_get (void)
{
  return __atomic_load_n (&the_cbt, __ATOMIC_ACQUIRE);
}

/* ---- Parameters ------------------------------------------------------- */

/* *P = VALUE made absolute (relative to the current directory). */
int
set_absolute (char **p, const char *key, const char *value)
{
  char *abs = nbdkit_absolute_path (value);

  if (abs == NULL) {
    nbdkit_error ("%s: '%s': cannot make an absolute path", key, value);
    return -1;
  }
  free (*p);
  *p = abs;
  return 0;
}

static int
set_string (char **p, const char *value)
{
  free (*p);
  *p = strdup (value);
  if (*p == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  return 0;
}

int
cbt_config (const char *key, const char *value)
{
  if (strcmp (key, "sparsebackup-cbt") == 0) {
    if (value[0] == '\0') {
      nbdkit_error ("%s: '%s' is not a file name", key, value);
      return -1;
    }
    /* Opened by the first connection, after nbdkit may have changed to
     * "/" (it does when it forks into the background): a relative name
     * is taken from the current directory now.
     */
    return set_absolute (&cfg_cbt_path, key, value);
  }
  if (strcmp (key, "sparsebackup-cbt-granularity") == 0) {
    int64_t v = nbdkit_parse_size (value);

    if (v == -1) {
      nbdkit_error ("%s: '%s' is not a valid size", key, value);
      return -1;
    }
    if (v < CBT_MIN_GRANULARITY || v > CBT_MAX_GRANULARITY ||
        !is_power_of_2 (v)) {
      nbdkit_error ("%s: '%s' is not a power of 2 between 512 and 1G",
                    key, value);
      return -1;
    }
    cfg_cbt_gran = v;
    return 0;
  }
  if (strcmp (key, "sparsebackup-cbt-mode") == 0) {
    static const struct sb_choice c[] = {
      { "in-use", CBT_MODE_IN_USE, false },
      { "write-ahead", CBT_MODE_WRITE_AHEAD, false },
      { NULL, 0, false },
    };
    int r;

    if (parse_choice (key, value, c, &r) == -1)
      return -1;
    cfg_cbt_mode = r;
    return 0;
  }
  if (strcmp (key, "sparsebackup-cbt-reset") == 0) {
    int r = nbdkit_parse_bool (value);

    if (r == -1) {
      nbdkit_error ("%s: '%s' is not a boolean", key, value);
      return -1;
    }
    cfg_cbt_reset = r;
    return 0;
  }
  if (strcmp (key, "sparsebackup-cbt-id") == 0) {
    size_t n = strlen (value);

    if (n > CBT_IDENTITY_MAX) {
      nbdkit_error ("%s: '%.40s...' is longer than %d bytes",
                    key, value, CBT_IDENTITY_MAX);
      return -1;
    }
    for (size_t i = 0; i < n; ++i)
      if (value[i] < 0x20 || value[i] > 0x7e) {
        nbdkit_error ("%s: '%s' holds a byte outside printable ASCII "
                      "(0x%02x at %zu)", key, value,
                      (unsigned char) value[i], i);
        return -1;
      }
    return set_string (&cfg_cbt_id, value);
  }
  if (strcmp (key, "sparsebackup-control") == 0) {
    if (value[0] == '\0') {
      nbdkit_error ("%s: '%s' is not a socket path", key, value);
      return -1;
    }
    /* Removed at exit, after nbdkit may have changed to "/". */
    if (set_absolute (&cfg_control_path, key, value) == -1)
      return -1;
    if (strlen (cfg_control_path) >= CONTROL_PATH_MAX) {
      nbdkit_error ("%s: '%s' is longer than a Unix socket path can be "
                    "(%d bytes%s)", key, value, CONTROL_PATH_MAX - 1,
                    value[0] == '/' ? "" : " as an absolute path");
      free (cfg_control_path);
      cfg_control_path = NULL;
      return -1;
    }
    return 0;
  }
  return 1;
}

int
cbt_config_complete (void)
{
  if (cfg_control_path && cfg_cbt_path == NULL) {
    nbdkit_error ("sparsebackup-control: '%s' needs sparsebackup-cbt=FILE",
                  cfg_control_path);
    return -1;
  }
  return 0;
}

/* ---- The recorder ----------------------------------------------------- */

static void
inflight_remove (uint64_t offset, uint64_t count)
{
  for (size_t i = 0; i < nr_inflight; ++i)
    if (inflight[i].offset == offset && inflight[i].count == count) {
      inflight[i] = inflight[--nr_inflight];
      return;
    }
}

/* [OFFSET, OFFSET+COUNT) clipped to the disk: false if nothing is left. */
static bool
clip (struct cbt *c, uint64_t *offset, uint64_t *count)
{
  uint64_t size = cbt_disk_size (c);

  if (*offset >= size)
    return false;
  if (*count > size - *offset)
    *count = size - *offset;
  return *count > 0;
}

static int
recorder (void *opaque, uint64_t offset, uint64_t count)
{
  struct cbt *c = cbt_get ();
  uint64_t off = offset, cnt = count, ticket = 0;
  int r, e;

  if (c == NULL) {              /* cannot happen: see the top */
    nbdkit_error ("sparsebackup: a change before the cbt file was open");
    errno = EIO;
    return -1;
  }
  pthread_mutex_lock (&inflight_lock);
  if (nr_inflight == cap_inflight) {
    size_t n = cap_inflight ? 2 * cap_inflight : 64;
    struct range *p = realloc (inflight, n * sizeof *p);

    if (p == NULL) {
      pthread_mutex_unlock (&inflight_lock);
      nbdkit_error ("sparsebackup: cbt: realloc: %m");
      errno = ENOMEM;
      return -1;
    }
    inflight = p;
    cap_inflight = n;
  }
  r = clip (c, &off, &cnt) ? cbt_mark (c, off, cnt, &ticket) : 0;
  e = errno;
  if (r == 0)
    inflight[nr_inflight++] = (struct range) { offset, count };
  pthread_mutex_unlock (&inflight_lock);
  if (r == 0 && cbt_commit (c, ticket) == 0)
    return 0;

  if (r == 0) {                 /* the commit failed */
    e = errno;
    pthread_mutex_lock (&inflight_lock);
    inflight_remove (offset, count);
    pthread_mutex_unlock (&inflight_lock);
  }
  if (e == EIO)
    __atomic_store_n (&cbt_io_error, true, __ATOMIC_RELAXED);
  nbdkit_error ("sparsebackup: cannot record the change at %" PRIu64
                " (%" PRIu64 " bytes) in the cbt file %s: %s",
                offset, count, cfg_cbt_path, strerror (e));
  errno = e == EIO || e == ENOMEM ? e : EIO;
  return -1;
}

void
cbt_change_end (uint64_t offset, uint64_t count)
{
  if (count == 0 || cbt_get () == NULL)
    return;
  pthread_mutex_lock (&inflight_lock);
  inflight_remove (offset, count);
  pthread_mutex_unlock (&inflight_lock);
}

int
cbt_get_ready (void)
{
  if (cfg_cbt_path)
    changes_set_recorder (disk.changes, recorder, NULL);
  return 0;
}

/* ---- Opening ---------------------------------------------------------- */

int
cbt_prepare (const char *exportname, uint64_t size)
{
  struct cbt *c = cbt_get ();
  struct cbt_options opts = {
    .disk_size = size, .granularity = cfg_cbt_gran,
    .identity = cfg_cbt_id ? cfg_cbt_id : "", .mode = cfg_cbt_mode,
    .create = true, .reset = cfg_cbt_reset,
  };
  struct cbt_load_info info;
  char err[CBT_ERRLEN];

  if (cfg_cbt_path == NULL)
    return 0;
  if (c) {
    if (cbt_disk_size (c) != size) {
      nbdkit_error ("sparsebackup: export '%s' has size %" PRIu64 " but the "
                    "cbt file %s tracks a disk of %" PRIu64 " bytes: "
                    "connection refused", exportname, size, cfg_cbt_path,
                    cbt_disk_size (c));
      return -1;
    }
    return 0;
  }
  if (size == 0) {
    nbdkit_error ("sparsebackup: export '%s' has size 0: the cbt file %s "
                  "needs a disk", exportname, cfg_cbt_path);
    return -1;
  }
  if (cbt_open (cfg_cbt_path, &opts, &c, &info, err, sizeof err) == -1) {
    nbdkit_error ("sparsebackup: cbt file %s: %s", cfg_cbt_path, err);
    return -1;
  }
  if (info.invalidated) {
    cbt_invalidated = true;
    nbdkit_error ("sparsebackup: cbt file %s: %s", cfg_cbt_path,
                  info.message[0] ? info.message :
                  "not closed cleanly: every checkpoint was lost");
  }
  else if (info.message[0])
    nbdkit_debug ("sparsebackup: cbt file %s: %s", cfg_cbt_path,
                  info.message);
  nbdkit_debug ("sparsebackup: cbt file %s open: size %" PRIu64
                ", granularity %" PRIu32 ", mode %s, %zu checkpoints%s",
                cfg_cbt_path, size, cbt_granularity (c),
                cfg_cbt_mode == CBT_MODE_IN_USE ? "in-use" : "write-ahead",
                cbt_checkpoint_count (c), info.created ? " (new)" : "");
  __atomic_store_n (&the_cbt, c, __ATOMIC_RELEASE);
  return 0;
}

void
cbt_unload (void)
{
  struct cbt *c = cbt_get ();
  char err[CBT_ERRLEN];

  if (c && cbt_close (c, err, sizeof err) == -1)
    nbdkit_error ("sparsebackup: cbt file %s: %s", cfg_cbt_path, err);
  the_cbt = NULL;
  free (inflight);
  inflight = NULL;
  nr_inflight = cap_inflight = 0;
  free (cfg_cbt_path);
  free (cfg_cbt_id);
  free (cfg_control_path);
  cfg_cbt_path = cfg_cbt_id = cfg_control_path = NULL;
}

/* ---- Checkpoints -------------------------------------------------------- */

int
cbt_begin_checkpoint (struct cbt *c, const char *name, char *err,
                      size_t errlen)
{
  uint64_t ticket = 0, max = 0;
  int r;

  pthread_mutex_lock (&inflight_lock);
  r = cbt_checkpoint_create (c, name, true, err, errlen);
  /* cbt.h: mark again every change in flight, so that one landing after
   * the checkpoint is recorded after it too.
   */
  for (size_t i = 0; r == 0 && i < nr_inflight; ++i) {
    uint64_t off = inflight[i].offset, cnt = inflight[i].count;

    if (clip (c, &off, &cnt) && cbt_mark (c, off, cnt, &ticket) == -1) {
      snprintf (err, errlen, "cannot mark the changes in flight: %s",
                strerror (errno));
      r = -1;
    }
    if (ticket > max)
      max = ticket;
  }
  pthread_mutex_unlock (&inflight_lock);
  if (r == 0 && cbt_commit (c, max) == -1) {
    snprintf (err, errlen, "cannot commit the changes in flight: %s",
              strerror (errno));
    r = -1;
  }
  if (r == -1 && errno == EIO)
    __atomic_store_n (&cbt_io_error, true, __ATOMIC_RELAXED);
  return r;
}

/* Find checkpoint NAME: its index (0 = oldest) and *INFO, or -1. */
ssize_t
cbt_find (struct cbt *c, const char *name, struct cbt_checkpoint_info *info)
{
  for (size_t i = 0; cbt_checkpoint_get (c, i, info) == 0; ++i)
    if (strcmp (info->name, name) == 0)
      return i;
  return -1;
}

/* ---- Delta views "@since:X" ------------------------------------------- */

/* The filter owns "@since:" names only when it tracks changes; without
 * sparsebackup-cbt they are passed through (the qcow2 plugin has
 * @since:BITMAP views of its own).
 */
bool
cbt_is_view (const char *exportname)
{
  return cfg_cbt_path != NULL &&
    strncmp (exportname, SINCE_PREFIX, strlen (SINCE_PREFIX)) == 0;
}

ssize_t
cbt_view_checkpoint (const char *exportname, const char *name)
{
  struct cbt_checkpoint_info info;
  ssize_t k;

  if (!cbt_name_valid (name)) {
    nbdkit_error ("sparsebackup: export '%s': '%s' is not a valid "
                  "checkpoint name", exportname, name);
    return -1;
  }
  k = cbt_find (cbt_get (), name, &info);
  if (k == -1) {
    nbdkit_error ("sparsebackup: export '%s': no checkpoint '%s'%s",
                  exportname, name, cbt_invalidated ?
                  " (the cbt file was not closed cleanly: every checkpoint "
                  "was lost, a full backup is needed)" : "");
    return -1;
  }
  if (info.state != CBT_STATE_GOOD) {
    nbdkit_error ("sparsebackup: export '%s': checkpoint '%s' is pending: "
                  "its backup has not ended", exportname, name);
    return -1;
  }
  return k;
}

int
cbt_view_prepare (const char *exportname, uint64_t size)
{
  if (cbt_prepare (exportname, size) == -1)
    return -1;
  return cbt_view_checkpoint (exportname,
                              exportname + strlen (SINCE_PREFIX)) == -1
    ? -1 : 0;
}

struct collect {
  uint64_t start, end;
  struct range *v;
  size_t n, cap;
  bool one;                     /* REQ_ONE: the first range is enough */
  bool past;
};

static int
collect_fn (uint64_t offset, uint64_t length, void *opaque)
{
  struct collect *k = opaque;

  if (offset >= k->end || (k->one && k->n > 0)) {
    k->past = true;
    return -1;
  }
  if (offset + length <= k->start)
    return 0;
  if (k->n == k->cap) {
    size_t n = k->cap ? 2 * k->cap : 16;
    struct range *p = realloc (k->v, n * sizeof *p);

    if (p == NULL)
      return -1;
    k->v = p;
    k->cap = n;
  }
  k->v[k->n].offset = MAX (offset, k->start);
  k->v[k->n].count = MIN (offset + length, k->end) - k->v[k->n].offset;
  k->n++;
  return 0;
}

/* The plugin's extents over the changed range [POS, END): added with
 * HOLE-only turned into data.  Sets *POS to where they end.
 */
static int
changed_extents (nbdkit_next *next, int can_ext, uint64_t *pos, uint64_t end,
                 uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  struct nbdkit_extents *ex;
  uint64_t p = *pos;

  if (!can_ext) {
    *pos = end;
    return nbdkit_add_extent (extents, p, end - p, 0) == -1 ? -1 : 0;
  }
  ex = nbdkit_extents_new (p, end);
  if (ex == NULL) {
    *err = errno;
    return -1;
  }
  if (next->extents (next, end - p, p, flags, ex, err) == -1) {
    nbdkit_extents_free (ex);
    return -1;
  }
  for (size_t i = 0; i < nbdkit_extents_count (ex) && p < end; ++i) {
    struct nbdkit_extent e = nbdkit_get_extent (ex, i);
    uint64_t eend = MIN (e.offset + e.length, end);
    uint32_t type = e.type & (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);

    if (eend <= p)
      continue;
    if (e.offset > p)
      break;
    /* A changed block is never HOLE-only in a delta view. */
    if (type == NBDKIT_EXTENT_HOLE)
      type = 0;
    if (nbdkit_add_extent (extents, p, eend - p, type) == -1) {
      *err = errno;
      nbdkit_extents_free (ex);
      return -1;
    }
    p = eend;
  }
  nbdkit_extents_free (ex);
  if (p == *pos) {              /* the plugin said nothing: data */
    if (nbdkit_add_extent (extents, p, end - p, 0) == -1) {
      *err = errno;
      return -1;
    }
    p = end;
  }
  *pos = p;
  return 0;
}

/* The extents of the changed range [*POS, END): from the live disk, or
 * from the frozen one.
 */
static int
changed_part (nbdkit_next *next, struct sb_handle *h, int can_ext,
              uint64_t *pos, uint64_t end, uint32_t flags,
              struct nbdkit_extents *extents, int *err)
{
  if (h->frozen)
    return frozen_extents (next, h, pos, end, flags, extents, err);
  return changed_extents (next, can_ext, pos, end, flags, extents, err);
}

int
cbt_view_extents (nbdkit_next *next, struct sb_handle *h, uint32_t count,
                  uint64_t offset, uint32_t flags,
                  struct nbdkit_extents *extents, int *err)
{
  bool one = flags & NBDKIT_FLAG_REQ_ONE;
  struct collect k = { .start = offset,
                      .end = MIN (offset + count, h->size), .one = one };
  char msg[CBT_ERRLEN];
  uint64_t pos = offset;
  int can_ext, r = -1;

  if (h->since == NULL) {       /* "@frozen": the whole frozen disk */
    while (pos < k.end) {
      if (frozen_extents (next, h, &pos, k.end, flags, extents, err) == -1)
        return -1;
      if (one)
        break;
    }
    return 0;
  }
  /* Only what the request covers; a frozen view: up to the freeze. */
  if (cbt_map_range (cbt_get (), h->since, h->frozen ? h->until : NULL,
                     k.start, k.end, collect_fn, &k, msg,
                     sizeof msg) == -1 && !k.past) {
    if (msg[0] == '\0')
      snprintf (msg, sizeof msg, "%s", strerror (errno));
    nbdkit_error ("sparsebackup: export '%s': %s", h->exportname, msg);
    *err = EIO;
    goto out;
  }
  can_ext = next->can_extents (next);
  if (can_ext == -1) {
    *err = EIO;
    goto out;
  }
  for (size_t i = 0; i < k.n && pos < k.end; ++i) {
    uint64_t a = MAX (k.v[i].offset, pos), b = k.v[i].offset + k.v[i].count;

    if (b <= pos)
      continue;
    if (pos < a) {
      if (nbdkit_add_extent (extents, pos, a - pos,
                             NBDKIT_EXTENT_HOLE) == -1) {
        *err = errno;
        goto out;
      }
      pos = a;
      if (one) {
        r = 0;
        goto out;
      }
    }
    while (pos < b) {
      if (changed_part (next, h, can_ext, &pos, b, flags, extents,
                        err) == -1)
        goto out;
      if (one) {
        r = 0;
        goto out;
      }
    }
  }
  if (pos < k.end &&
      nbdkit_add_extent (extents, pos, k.end - pos,
                         NBDKIT_EXTENT_HOLE) == -1) {
    *err = errno;
    goto out;
  }
  r = 0;
 out:
  free (k.v);
  return r;
}

int
cbt_list_exports (struct nbdkit_exports *exports)
{
  struct cbt *c = cbt_get ();
  struct cbt_checkpoint_info info;
  char name[sizeof SINCE_PREFIX + CBT_NAME_MAX];
  char desc[CBT_NAME_MAX + 80];

  if (c == NULL)
    return 0;
  for (size_t i = 0; cbt_checkpoint_get (c, i, &info) == 0; ++i) {
    if (info.state != CBT_STATE_GOOD)
      continue;
    snprintf (name, sizeof name, "%s%s", SINCE_PREFIX, info.name);
    snprintf (desc, sizeof desc, "changes since checkpoint %s "
              "(delta view, read-only)", info.name);
    if (nbdkit_add_export (exports, name, desc) == -1)
      return -1;
  }
  return 0;
}
