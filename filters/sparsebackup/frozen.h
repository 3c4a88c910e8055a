/* nbdkit-sparsebackup-filter: the frozen disk of a point-in-time
 * backup (frozen.c).
 *
 * With sparsebackup-scratch=FILE, backup-begin (backup.c) activates
 * the frozen disk: the disk as it was at that moment, read by the views
 * "@frozen" and "@frozen:since:X" (views.c) while writes to the live
 * disk go on.  Before a change first touches a granule not saved yet,
 * the granule's old data is stored in the scratch file (copy before
 * write: frozen_save, called by change_begin in disk.c); frozen reads
 * take the saved copy first.  backup-end releases it.
 *
 * A leaf: it calls only the layer below (through the NEXT it is given,
 * and lower.c) and common/ (cowmap, zero detection).  The frozen disk
 * is identified by a generation: a view opened on one fails once it has
 * been released, even if another backup began since.
 */
#ifndef SPARSEBACKUP_FROZEN_H
#define SPARSEBACKUP_FROZEN_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <nbdkit-filter.h>

#include "cbt.h"

/* Open, check and lock the scratch file (sparsebackup-scratch), at
 * start-up.  Nothing to do without it.
 */
extern int frozen_open (void);
extern void frozen_close (void);
extern bool frozen_enabled (void);

/* Start the frozen disk of SIZE bytes for the backup of checkpoint NAME
 * (granules of at least GRANULARITY bytes: the cbt's).  The caller
 * (backup.c) has drained the changes.  -1 with errno and ERR.
 */
extern int frozen_activate (uint64_t size, uint32_t granularity,
                            const char *name, char *err, size_t errlen);
/* End it (backup-end, or its checkpoint was deleted): open views fail
 * from now on, the scratch file is emptied.
 */
extern void frozen_release (void);

/* The frozen disk now: false if none.  Else its generation, the name of
 * its checkpoint and whether it is broken (and why).
 */
struct frozen_info {
  uint64_t gen;
  char name[CBT_NAME_MAX + 1];
  bool broken;
  char why[256];
  uint64_t scratch_used;        /* bytes of old data stored */
};
extern bool frozen_current (struct frozen_info *info);

/* Copy before write: save what a change of [OFFSET, OFFSET+COUNT) will
 * overwrite, reading through NEXT (the default export) in requests of
 * at most MAX_REQUEST bytes.  0: the change may be issued; -1 with *ERR
 * (sparsebackup-scratch-error=fail-write): it must not be.
 */
extern int frozen_save (nbdkit_next *next, uint32_t max_request,
                        uint64_t offset, uint64_t count, int *err);

/* A view of the frozen disk: the generation it opened on, and for
 * errors its export name and the backup's checkpoint.
 */
struct frozen_view {
  uint64_t gen;
  const char *exportname;
  char name[CBT_NAME_MAX + 1];
};

/* Reads and extents of the frozen disk of view V (through NEXT, the
 * view's connection to the default export): they fail once its backup
 * has ended or broken.  frozen_extents adds the extents of [*POS, END),
 * HOLE-only reported as data, at least one with REQ_ONE, and sets *POS
 * to where they end.
 */
extern int frozen_pread (nbdkit_next *next, const struct frozen_view *v,
                         void *buf, uint32_t count, uint64_t offset,
                         uint32_t flags, int *err);
extern int frozen_extents (nbdkit_next *next, const struct frozen_view *v,
                           uint64_t *pos, uint64_t end, uint32_t flags,
                           struct nbdkit_extents *extents, int *err);

#endif /* SPARSEBACKUP_FROZEN_H */
