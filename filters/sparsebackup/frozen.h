/* nbdkit-sparsebackup-filter: point-in-time backups (frozen.c).
 *
 * With sparsebackup-scratch=FILE, backup-begin freezes the disk: the
 * views "@frozen" and "@frozen:since:X" read the disk as it was at that
 * moment while writes to the live disk go on.  Before a change first
 * touches a granule not saved yet, the granule's old data is copied
 * into the scratch file (copy-before-write); frozen reads take the
 * saved copy first.  backup-end ends it and empties the scratch file.
 */
#ifndef SPARSEBACKUP_FROZEN_H
#define SPARSEBACKUP_FROZEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "cbt.h"

struct sb_handle;

#define FROZEN_NAME "@frozen"
#define FROZEN_SINCE_PREFIX "@frozen:since:"

/* 0: handled, -1: error, 1: not a scratch parameter. */
extern int frozen_config (const char *key, const char *value);
extern int frozen_config_complete (void);
/* Open (create, lock, empty) the scratch file. */
extern int frozen_get_ready (void);
extern void frozen_unload (void);
extern bool frozen_configured (void);

/* Around every change (change_begin / change_end): saves what the
 * change will overwrite while a backup is frozen.  -1 with *ERR: the
 * change must not be issued (sparsebackup-scratch-error=fail-write).
 * frozen_change_end must follow a frozen_change_begin that returned 0.
 */
extern int frozen_change_begin (nbdkit_next *next, uint64_t offset,
                                uint64_t count, int *err);
extern void frozen_change_end (void);

/* backup-begin / backup-end (control.c).  Without a scratch file they
 * only create / confirm or fail the checkpoint.  frozen_backup_end sets
 * *BROKEN when the backup was broken (then the checkpoint was deleted
 * even with OK and -1 is returned, ERR says why).
 */
extern int frozen_backup_begin (struct cbt *c, const char *name,
                                char *err, size_t errlen);
extern int frozen_backup_end (struct cbt *c, const char *name, bool ok,
                              bool *broken, char *err, size_t errlen);
/* checkpoint-delete: of the frozen backup's checkpoint, the same as
 * frozen_backup_end with --failed.
 */
extern int frozen_checkpoint_delete (struct cbt *c, const char *name,
                                     char *err, size_t errlen);
/* " frozen=NAME scratch-used=N scratch-limit=N backup=ok|broken", or
 * "" without a scratch file.
 */
extern void frozen_status (char *buf, size_t len);

/* The views. */
extern bool frozen_is_view (const char *exportname);
/* Disk lock held, after cbt_prepare. */
extern int frozen_view_prepare (struct sb_handle *h);
extern int frozen_pread (nbdkit_next *next, struct sb_handle *h,
                         void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags, int *err);
/* Extents of the frozen disk over [*POS, END), HOLE-only reported as
 * data; with REQ_ONE in FLAGS at least one.  Sets *POS to where they
 * end.
 */
extern int frozen_extents (nbdkit_next *next, struct sb_handle *h,
                           uint64_t *pos, uint64_t end, uint32_t flags,
                           struct nbdkit_extents *extents, int *err);
extern int frozen_list_exports (struct nbdkit_exports *exports);

#endif /* SPARSEBACKUP_FROZEN_H */
