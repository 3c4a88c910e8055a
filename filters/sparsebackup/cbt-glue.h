/* nbdkit-sparsebackup-filter: changed-block tracking (cbt-glue.c) and
 * the control socket (control.c).
 */
#ifndef SPARSEBACKUP_CBT_GLUE_H
#define SPARSEBACKUP_CBT_GLUE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include <nbdkit-filter.h>

#include "cbt.h"

struct sb_handle;

#define SINCE_PREFIX "@since:"
#define CONTROL_PATH_MAX 108    /* sizeof sun_path */

extern char *cfg_cbt_path;      /* NULL: no tracking */
extern char *cfg_control_path;
extern bool cbt_invalidated;
extern bool cbt_io_error;

/* *P = VALUE as an absolute path (nbdkit_absolute_path): file names
 * used after nbdkit may have changed to "/" (it does when it forks into
 * the background).  KEY names the parameter in errors.
 */
extern int set_absolute (char **p, const char *key, const char *value);

/* 0: handled, -1: error, 1: not a cbt parameter. */
extern int cbt_config (const char *key, const char *value);
extern int cbt_config_complete (void);
/* Set the recorder on disk.changes (after it was created). */
extern int cbt_get_ready (void);
/* Open the cbt file with SIZE (first connection), or check SIZE against
 * it.  Disk lock held.
 */
extern int cbt_prepare (const char *exportname, uint64_t size);
extern void cbt_unload (void);
/* The open cbt, or NULL. */
extern struct cbt *cbt_get (void);
/* A change that went through the recorder ended. */
extern void cbt_change_end (uint64_t offset, uint64_t count);

/* A pending checkpoint, with the changes in flight marked again. */
extern int cbt_begin_checkpoint (struct cbt *c, const char *name,
                                 char *err, size_t errlen);
extern ssize_t cbt_find (struct cbt *c, const char *name,
                     struct cbt_checkpoint_info *info);

extern bool cbt_is_view (const char *exportname);
extern int cbt_view_prepare (const char *exportname, uint64_t size);
/* NAME (of export EXPORTNAME) names a good checkpoint: its index, or -1
 * after an error naming what is wrong (invalid, missing, pending).
 */
extern ssize_t cbt_view_checkpoint (const char *exportname,
                                    const char *name);
extern int cbt_view_extents (nbdkit_next *next, struct sb_handle *h,
                             uint32_t count, uint64_t offset, uint32_t flags,
                             struct nbdkit_extents *extents, int *err);
extern int cbt_list_exports (struct nbdkit_exports *exports);

/* The control socket: created at get_ready, served by a thread started
 * at after_fork, removed at unload.
 */
extern int control_open (void);
extern int control_start (void);
extern void control_stop (void);

#endif /* SPARSEBACKUP_CBT_GLUE_H */
