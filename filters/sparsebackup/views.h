/* nbdkit-sparsebackup-filter: export names and the backup views
 * (views.c).
 *
 * Every connection has one kind (struct sb_handle's KIND), worked out
 * once from its export name in .open:
 *
 *   EXPORT_DISK          ""                the disk, with the map
 *   EXPORT_PASSTHROUGH   any other name    the plugin's, no map
 *   EXPORT_SINCE         "@since:X"        what changed since X
 *   EXPORT_FROZEN        "@frozen"         the disk at backup-begin
 *   EXPORT_FROZEN_SINCE  "@frozen:since:X" ... what changed since X
 *
 * The views read the default export, read-only.  Names in the filter's
 * own namespaces ("@frozen..." always, "@since..." with
 * sparsebackup-cbt) are refused unless exactly valid: a typo never
 * serves the live disk.  A view is bound when it opens to the
 * checkpoints and the frozen disk it reads (their identities, not their
 * names) and fails every request once one of them is gone.
 */
#ifndef SPARSEBACKUP_VIEWS_H
#define SPARSEBACKUP_VIEWS_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "internal.h"

/* The kind of export NAME: -1 (logged) if the name is in the filter's
 * namespace but not valid.  *SINCE: where X starts in NAME, or NULL.
 */
extern int views_classify (const char *name, enum export_kind *kind,
                           const char **since);

static inline bool
is_view (enum export_kind kind)
{
  return kind == EXPORT_SINCE || kind == EXPORT_FROZEN ||
    kind == EXPORT_FROZEN_SINCE;
}

/* Bind view H to its checkpoints and frozen disk (in .prepare). */
extern int views_prepare (struct sb_handle *h);

extern int views_pread (nbdkit_next *next, struct sb_handle *h,
                        void *buf, uint32_t count, uint64_t offset,
                        uint32_t flags, int *err);
extern int views_extents (nbdkit_next *next, struct sb_handle *h,
                          uint32_t count, uint64_t offset, uint32_t flags,
                          struct nbdkit_extents *extents, int *err);
extern int views_cache (nbdkit_next *next, struct sb_handle *h,
                        uint32_t count, uint64_t offset, uint32_t flags,
                        int *err);
/* What the view advertises, the layer below can cache LOWER. */
extern int views_can_cache (int lower, struct sb_handle *h);
extern int views_list_exports (struct nbdkit_exports *exports);

#endif /* SPARSEBACKUP_VIEWS_H */
