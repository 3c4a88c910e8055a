/* nbdkit-sparsebackup-filter: backups and checkpoints (backup.c).
 *
 * backup-begin, backup-end and checkpoint-delete (the control socket's
 * commands): the drain, the checkpoint, the freeze and the thaw; and
 * the one lookup of a checkpoint by name, used by every command, view
 * and option that names one, with one set of messages.
 */
#ifndef SPARSEBACKUP_BACKUP_H
#define SPARSEBACKUP_BACKUP_H

#include <stdbool.h>
#include <stddef.h>

#include "cbt.h"
#include "ctlproto.h"
#include "tracking.h"

/* Why a backup operation or a lookup failed: the control protocol's
 * code and a message for people, naming the checkpoint.
 */
struct backup_error {
  enum ctl_code code;
  char msg[2 * CBT_ERRLEN];
};

/* What a lookup needs of the checkpoint. */
enum checkpoint_want {
  WANT_GOOD,                    /* a base for an incremental (--since) */
  WANT_PENDING,                 /* a backup to end */
  WANT_ANY,                     /* a checkpoint to delete */
};

/* Checkpoint NAME: *REF (and *INFO if not NULL), or -1 with E:
 * invalid-name, no-such-checkpoint (with the reason when every
 * checkpoint was lost when the file was opened), or state when it is
 * pending (WANT_GOOD) or good (WANT_PENDING).  The one lookup of every
 * command and view that names a checkpoint.
 */
extern int backup_find_checkpoint (const char *name,
                                   enum checkpoint_want want,
                                   struct checkpoint_ref *ref,
                                   struct cbt_checkpoint_info *info,
                                   struct backup_error *e);

/* backup-begin NAME [--since SINCE] (SINCE may be NULL). */
extern int backup_begin (const char *name, const char *since,
                         struct backup_error *e);
/* backup-end NAME --ok|--failed.  A frozen backup that broke fails
 * with code broken, even with OK (its checkpoint is deleted).
 */
extern int backup_end (const char *name, bool ok, struct backup_error *e);
/* checkpoint-delete NAME: of the frozen backup's checkpoint, ends it. */
extern int backup_checkpoint_delete (const char *name,
                                     struct backup_error *e);

#endif /* SPARSEBACKUP_BACKUP_H */
