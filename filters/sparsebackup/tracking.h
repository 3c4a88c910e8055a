/* nbdkit-sparsebackup-filter: changed-block tracking (tracking.c), the
 * filter's side of the cbt file (common/cbt.h).
 *
 * A leaf: it calls only the cbt library.  The file is opened at
 * start-up (tracking_open, from .after_fork, with the size of the
 * default export); every change is marked before it is issued
 * (tracking_mark) and forgotten from the list of changes in flight when
 * it ends (tracking_end); tracking_checkpoint_begin creates a pending
 * checkpoint and marks every change still in flight again (cbt.h's
 * rule).  Checkpoints are named by the user but referred to by their
 * identity (struct checkpoint_ref): a view bound to a checkpoint fails
 * once that checkpoint is gone, even if another of the same name was
 * created since.
 */
#ifndef SPARSEBACKUP_TRACKING_H
#define SPARSEBACKUP_TRACKING_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cbt.h"

/* One checkpoint, by identity. */
struct checkpoint_ref {
  uint64_t id;                  /* never reused while nbdkit runs */
  char name[CBT_NAME_MAX + 1];
};

/* At .get_ready, before nbdkit forks: what can be checked of the cbt
 * file without the disk's size (a path where it can be created, not a
 * symbolic link, not a file of another parameter, not locked by another
 * server, its format, granularity and identity), so that these
 * mistakes stop nbdkit at start-up.
 */
extern int tracking_check (void);
/* Open (create, lock, check) the cbt file sparsebackup-cbt for a disk
 * of SIZE bytes: -1 with a message in MSG.  Nothing to do without
 * sparsebackup-cbt.
 */
extern int tracking_open (uint64_t size, char *msg, size_t msglen);
extern void tracking_close (void);
extern bool tracking_enabled (void);
/* The open cbt file, or NULL. */
extern struct cbt *tracking_cbt (void);
/* Why every checkpoint was lost when the file was opened (not closed
 * cleanly in in-use mode, ...), or NULL.
 */
extern const char *tracking_lost_reason (void);
/* "in-use", "write-ahead"... as sparsebackup-cbt-mode= spells it. */
extern const char *tracking_mode_name (enum cbt_mode mode);
/* A write to the cbt file failed: every change fails from then on. */
extern bool tracking_io_error (void);
extern void tracking_set_io_error (void);

/* Mark [OFFSET, OFFSET+COUNT) (clipped to the disk) before a change is
 * issued, durably in write-ahead mode, and list it as in flight.  -1
 * with *ERR: the change must not be issued.  tracking_end must follow a
 * tracking_mark that returned 0, with the same range.
 */
extern int tracking_mark (uint64_t offset, uint64_t count, int *err);
extern void tracking_end (uint64_t offset, uint64_t count);

/* Create checkpoint NAME, pending, and mark again the changes in
 * flight.  -1 with errno and ERR.
 */
extern int tracking_checkpoint_begin (const char *name, char *err,
                                      size_t errlen);

/* End the backup of pending checkpoint NAME: confirm it (OK) or delete
 * it (merged back).  Delete checkpoint NAME.  -1 with errno and ERR.
 * Every deletion goes through these, so that identities stay right.
 */
extern int tracking_checkpoint_end (const char *name, bool ok, char *err,
                                    size_t errlen);
extern int tracking_checkpoint_delete (const char *name, char *err,
                                       size_t errlen);

/* Look up checkpoint NAME: its index (0 = oldest), *INFO and *REF, or
 * -1 (ENOENT).
 */
extern ssize_t tracking_find (const char *name,
                              struct cbt_checkpoint_info *info,
                              struct checkpoint_ref *ref);
/* REF still names a checkpoint of the file (not deleted since). */
extern bool tracking_ref_alive (const struct checkpoint_ref *ref);

/* Call EXTENT for every range of [START, END) changed since checkpoint
 * SINCE (up to checkpoint UNTIL if not NULL: the records from SINCE to
 * the one before UNTIL).  -1 with errno and ERR; ENOENT when SINCE or
 * UNTIL is gone.
 */
extern int tracking_map_range (const struct checkpoint_ref *since,
                               const struct checkpoint_ref *until,
                               uint64_t start, uint64_t end,
                               cbt_extent_fn extent, void *opaque,
                               char *err, size_t errlen);

#endif /* SPARSEBACKUP_TRACKING_H */
