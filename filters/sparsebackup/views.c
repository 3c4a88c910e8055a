/* nbdkit-sparsebackup-filter: export names and the backup views
 * (views.h).
 *
 * Extents of a view (doc/design.md, "Backup views"): a granule not
 * changed since X is HOLE without ZERO ("not part of this backup");
 * a changed one is answered with the extents of the disk it reads (the
 * live default export for @since:X, the frozen disk for
 * @frozen:since:X), their HOLE-only answers made data.  "@frozen" is
 * the whole frozen disk.
 */

#include <config.h>

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <strings.h>
#include <errno.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "minmax.h"
#include "vector.h"
#include "internal.h"
#include "backup.h"
#include "frozen.h"
#include "lower.h"
#include "tracking.h"
#include "views.h"

#define SINCE_PREFIX "@since:"
#define FROZEN_NAME "@frozen"
#define FROZEN_SINCE_PREFIX "@frozen:since:"

/* ---- Names ------------------------------------------------------------ */

static bool
has_prefix (const char *s, const char *prefix)
{
  return strncmp (s, prefix, strlen (prefix)) == 0;
}

static bool
has_prefix_nocase (const char *s, const char *prefix)
{
  return strncasecmp (s, prefix, strlen (prefix)) == 0;
}

static int
refuse_name (const char *name)
{
  nbdkit_error ("sparsebackup: export '%s' is not a valid backup view: "
                "the views are @frozen, @frozen:since:CHECKPOINT%s "
                "(names are case-sensitive, checkpoint names 1-%d "
                "printable characters without space)", name,
                tracking_enabled () ? " and @since:CHECKPOINT" : "",
                CBT_NAME_MAX);
  return -1;
}

int
views_classify (const char *name, enum export_kind *kind,
                const char **since)
{
  *since = NULL;
  if (name[0] == '\0') {
    *kind = EXPORT_DISK;
    return 0;
  }
  if (has_prefix_nocase (name, FROZEN_NAME)) {
    if (strcmp (name, FROZEN_NAME) == 0) {
      *kind = EXPORT_FROZEN;
      return 0;
    }
    if (has_prefix (name, FROZEN_SINCE_PREFIX) &&
        cbt_name_valid (name + strlen (FROZEN_SINCE_PREFIX))) {
      *kind = EXPORT_FROZEN_SINCE;
      *since = name + strlen (FROZEN_SINCE_PREFIX);
      return 0;
    }
    return refuse_name (name);
  }
  /* Without changed-block tracking "@since:" names belong to the
   * plugin (the qcow2 plugin's @since:BITMAP views).
   */
  if (tracking_enabled () && has_prefix_nocase (name, "@since")) {
    if (has_prefix (name, SINCE_PREFIX) &&
        cbt_name_valid (name + strlen (SINCE_PREFIX))) {
      *kind = EXPORT_SINCE;
      *since = name + strlen (SINCE_PREFIX);
      return 0;
    }
    return refuse_name (name);
  }
  *kind = EXPORT_PASSTHROUGH;
  return 0;
}

/* ---- Binding ---------------------------------------------------------- */

static int
bind_since (struct sb_handle *h)
{
  struct backup_error e;

  if (backup_find_checkpoint (h->since_name, WANT_GOOD, &h->since, NULL,
                              &e) == -1) {
    nbdkit_error ("sparsebackup: export '%s': %s", h->exportname, e.msg);
    return -1;
  }
  return 0;
}

static int
bind_frozen (struct sb_handle *h)
{
  struct cbt_checkpoint_info info;
  struct frozen_info fi;
  ssize_t ks, ku;

  if (!frozen_enabled ()) {
    nbdkit_error ("sparsebackup: export '%s' needs a scratch file "
                  "(sparsebackup-cbt=, -control= and -scratch=FILE)",
                  h->exportname);
    return -1;
  }
  if (!frozen_current (&fi)) {
    nbdkit_error ("sparsebackup: export '%s': no backup in progress "
                  "(it exists from backup-begin to backup-end)",
                  h->exportname);
    return -1;
  }
  if (fi.broken) {
    nbdkit_error ("sparsebackup: export '%s': backup '%s' is broken: %s",
                  h->exportname, fi.name, fi.why);
    return -1;
  }
  h->frozen.gen = fi.gen;
  h->frozen.exportname = h->exportname;
  snprintf (h->frozen.name, sizeof h->frozen.name, "%s", fi.name);
  if (h->kind == EXPORT_FROZEN)
    return 0;
  ku = tracking_find (fi.name, &info, &h->until);
  if (ku == -1) {
    nbdkit_error ("sparsebackup: export '%s': backup '%s' has ended",
                  h->exportname, fi.name);
    return -1;
  }
  if (bind_since (h) == -1)
    return -1;
  ks = tracking_find (h->since.name, &info, NULL);
  if (ks >= ku) {
    nbdkit_error ("sparsebackup: export '%s': checkpoint '%s' is not older "
                  "than the backup '%s'", h->exportname, h->since.name,
                  fi.name);
    return -1;
  }
  return 0;
}

int
views_prepare (struct sb_handle *h)
{
  switch (h->kind) {
  case EXPORT_SINCE:
    return bind_since (h);
  case EXPORT_FROZEN:
  case EXPORT_FROZEN_SINCE:
    return bind_frozen (h);
  case EXPORT_DISK:
  case EXPORT_PASSTHROUGH:
    break;
  }
  abort ();
}

/* The checkpoint the view reads since is still there. */
static int
check_since (struct sb_handle *h, int *err)
{
  if (tracking_ref_alive (&h->since))
    return 0;
  nbdkit_error ("sparsebackup: export '%s': checkpoint '%s' was deleted "
                "while this connection was open: its view is gone",
                h->exportname, h->since.name);
  *err = EIO;
  return -1;
}

/* ---- Reads ------------------------------------------------------------ */

int
views_pread (nbdkit_next *next, struct sb_handle *h, void *buf,
             uint32_t count, uint64_t offset, uint32_t flags, int *err)
{
  switch (h->kind) {
  case EXPORT_SINCE:
    if (check_since (h, err) == -1)
      return -1;
    return next->pread (next, buf, count, offset, flags, err);
  case EXPORT_FROZEN_SINCE:
    if (check_since (h, err) == -1)
      return -1;
    /* fallthrough */
  case EXPORT_FROZEN:
    return frozen_pread (next, &h->frozen, buf, count, offset, flags, err);
  case EXPORT_DISK:
  case EXPORT_PASSTHROUGH:
    break;
  }
  abort ();
}

int
views_can_cache (int lower, struct sb_handle *h)
{
  /* The frozen disk is not the plugin's: nothing to warm there. */
  if (h->kind != EXPORT_SINCE)
    return NBDKIT_CACHE_NONE;
  return lower;
}

int
views_cache (nbdkit_next *next, struct sb_handle *h, uint32_t count,
             uint64_t offset, uint32_t flags, int *err)
{
  assert (h->kind == EXPORT_SINCE);
  if (check_since (h, err) == -1)
    return -1;
  return next->cache (next, count, offset, flags, err);
}

/* ---- Extents ---------------------------------------------------------- */

struct range {
  uint64_t offset, count;
};
DEFINE_VECTOR (range_vector, struct range);

/* The changed ranges of [START, END), for tracking_map_range. */
struct changed {
  uint64_t start, end;
  range_vector v;
  bool one;                     /* REQ_ONE: the first range is enough */
  bool past;                    /* stopped on purpose */
};

static int
collect (uint64_t offset, uint64_t length, void *opaque)
{
  struct changed *k = opaque;
  struct range r;

  if (offset >= k->end || (k->one && k->v.len > 0)) {
    k->past = true;
    return -1;
  }
  if (offset + length <= k->start)
    return 0;
  r.offset = MAX (offset, k->start);
  r.count = MIN (offset + length, k->end) - r.offset;
  return range_vector_append (&k->v, r);
}

/* Fill K with the ranges changed since the view's checkpoint (up to the
 * frozen backup's for @frozen:since:X).
 */
static int
changed_ranges (struct sb_handle *h, struct changed *k, int *err)
{
  char msg[CBT_ERRLEN];

  if (tracking_map_range (&h->since,
                          h->kind == EXPORT_FROZEN_SINCE ? &h->until : NULL,
                          k->start, k->end, collect, k, msg,
                          sizeof msg) == -1 && !k->past) {
    nbdkit_error ("sparsebackup: export '%s': %s", h->exportname,
                  msg[0] ? msg : strerror (errno));
    *err = EIO;
    return -1;
  }
  return 0;
}

/* The extents of the changed range [*POS, END): from the live disk, or
 * from the frozen one.  Sets *POS to where they end.
 */
static int
add_changed (nbdkit_next *next, struct sb_handle *h, uint64_t *pos,
             uint64_t end, uint32_t flags, struct nbdkit_extents *extents,
             int *err)
{
  struct nbdkit_extents *ex;
  int64_t r;

  if (h->kind == EXPORT_FROZEN_SINCE)
    return frozen_extents (next, &h->frozen, pos, end, flags, extents, err);
  ex = lower_extents (next, *pos, end, flags, err);
  if (ex == NULL && *err != 0)
    return -1;
  r = lower_add_as_data (ex, *pos, end, extents, err);
  nbdkit_extents_free (ex);
  if (r == -1)
    return -1;
  *pos = r;
  return 0;
}

static int
add_unchanged (struct nbdkit_extents *extents, uint64_t a, uint64_t b,
               int *err)
{
  /* Not part of this backup: HOLE without ZERO. */
  if (nbdkit_add_extent (extents, a, b - a, NBDKIT_EXTENT_HOLE) == -1) {
    *err = errno;
    return -1;
  }
  return 0;
}

/* @since:X and @frozen:since:X over [K->START, K->END). */
static int
delta_extents (nbdkit_next *next, struct sb_handle *h, struct changed *k,
               uint32_t flags, struct nbdkit_extents *extents, int *err)
{
  uint64_t pos = k->start;

  if (changed_ranges (h, k, err) == -1)
    return -1;
  for (size_t i = 0; i < k->v.len && pos < k->end; ++i) {
    uint64_t a = MAX (k->v.ptr[i].offset, pos);
    uint64_t b = k->v.ptr[i].offset + k->v.ptr[i].count;

    if (b <= pos)
      continue;
    if (pos < a) {
      if (add_unchanged (extents, pos, a, err) == -1)
        return -1;
      pos = a;
      if (k->one)
        return 0;
    }
    while (pos < b) {
      if (add_changed (next, h, &pos, b, flags, extents, err) == -1)
        return -1;
      if (k->one)
        return 0;
    }
  }
  if (pos < k->end)
    return add_unchanged (extents, pos, k->end, err);
  return 0;
}

int
views_extents (nbdkit_next *next, struct sb_handle *h, uint32_t count,
               uint64_t offset, uint32_t flags,
               struct nbdkit_extents *extents, int *err)
{
  struct changed k = {
    .start = offset, .end = MIN (offset + count, h->size),
    .one = flags & NBDKIT_FLAG_REQ_ONE,
  };
  uint64_t pos = offset;
  int r;

  if (h->kind == EXPORT_FROZEN) {
    while (pos < k.end) {
      if (frozen_extents (next, &h->frozen, &pos, k.end, flags, extents,
                          err) == -1)
        return -1;
      if (k.one)
        break;
    }
    return 0;
  }
  if (check_since (h, err) == -1)
    return -1;
  r = delta_extents (next, h, &k, flags, extents, err);
  range_vector_reset (&k.v);
  return r;
}

/* ---- Listing ---------------------------------------------------------- */

static int
add_export (struct nbdkit_exports *exports, const char *prefix,
            const char *cp, const char *desc)
{
  char name[sizeof FROZEN_SINCE_PREFIX + CBT_NAME_MAX];

  snprintf (name, sizeof name, "%s%s", prefix, cp);
  return nbdkit_add_export (exports, name, desc);
}

int
views_list_exports (struct nbdkit_exports *exports)
{
  struct cbt *c = tracking_cbt ();
  struct cbt_checkpoint_info info;
  struct frozen_info fi;
  char desc[2 * CBT_NAME_MAX + 100];
  bool frozen;

  if (c == NULL)
    return 0;
  frozen = frozen_current (&fi) && !fi.broken;
  if (frozen) {
    snprintf (desc, sizeof desc, "the disk as it was at backup-begin %s "
              "(point-in-time, read-only)", fi.name);
    if (nbdkit_add_export (exports, FROZEN_NAME, desc) == -1)
      return -1;
  }
  for (size_t i = 0; cbt_checkpoint_get (c, i, &info) == 0; ++i) {
    if (frozen && strcmp (info.name, fi.name) == 0)
      frozen = false;           /* no @frozen:since: from here on */
    if (info.state != CBT_STATE_GOOD)
      continue;
    snprintf (desc, sizeof desc, "changes since checkpoint %s "
              "(delta view, read-only)", info.name);
    if (add_export (exports, SINCE_PREFIX, info.name, desc) == -1)
      return -1;
    if (!frozen)
      continue;
    snprintf (desc, sizeof desc, "the disk as it was at backup-begin %s, "
              "changes since checkpoint %s (delta view, read-only)",
              fi.name, info.name);
    if (add_export (exports, FROZEN_SINCE_PREFIX, info.name, desc) == -1)
      return -1;
  }
  return 0;
}
