/* nbdkit-sparsebackup-filter: backups and checkpoints (backup.h).
 *
 * BACKUP_LOCK serialises backup-begin, backup-end and checkpoint-delete
 * (the control socket serves up to 8 clients at once), so that the
 * frozen disk, the pending checkpoint and the scratch file always
 * change together.
 *
 * backup-begin with a scratch file: the drain (disk_drain: no change in
 * flight, new ones wait), then the pending checkpoint (tracking.c) and
 * the frozen disk (frozen.c), then the changes go on.  Every change is
 * so wholly before the freeze (in the records up to the new checkpoint
 * and in the frozen disk) or wholly after it (recorded after it, and
 * saved first).  Without a scratch file there is no drain: the
 * checkpoint marks the changes in flight again (tracking.c).
 */

#include <config.h>

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "ctlproto.h"
#include "internal.h"
#include "backup.h"
#include "disk.h"
#include "frozen.h"
#include "tracking.h"

static pthread_mutex_t backup_lock = PTHREAD_MUTEX_INITIALIZER;

static int __attribute__ ((__format__ (__printf__, 3, 4)))
fail (struct backup_error *e, enum ctl_code code, const char *fmt, ...)
{
  va_list ap;

  e->code = code;
  va_start (ap, fmt);
  vsnprintf (e->msg, sizeof e->msg, fmt, ap);
  va_end (ap);
  return -1;
}

/* A failure of the cbt library (errno, MSG). */
static int
fail_cbt (struct backup_error *e, const char *msg)
{
  int err = errno;

  if (err == EIO)
    tracking_set_io_error ();
  return fail (e, ctl_code_from_errno (err), "%s",
               msg[0] ? msg : strerror (err));
}

int
backup_find_checkpoint (const char *name, enum checkpoint_want want,
                        struct checkpoint_ref *ref,
                        struct cbt_checkpoint_info *info,
                        struct backup_error *e)
{
  struct cbt_checkpoint_info i;

  if (info == NULL)
    info = &i;
  if (!cbt_name_valid (name))
    return fail (e, CTL_E_INVALID_NAME, "'%.*s' is not a valid checkpoint "
                 "name (1-%d printable characters, no space, not starting "
                 "with '-')", CBT_NAME_MAX + 1, name, CBT_NAME_MAX);
  if (tracking_find (name, info, ref) == -1) {
    if (tracking_lost_reason ())
      return fail (e, CTL_E_NO_SUCH_CHECKPOINT, "no checkpoint '%s': "
                   "every checkpoint was lost when the cbt file %s was "
                   "opened (%s): a full backup is needed (backup-begin NEW "
                   "without --since)", name, cfg_cbt_path,
                   tracking_lost_reason ());
    return fail (e, CTL_E_NO_SUCH_CHECKPOINT, "no checkpoint '%s' "
                 "(checkpoint-list shows them)", name);
  }
  if (want == WANT_GOOD && info->state != CBT_STATE_GOOD)
    return fail (e, CTL_E_STATE, "checkpoint '%s' is pending: its backup "
                 "has not ended (backup-end %s --ok|--failed)", name, name);
  if (want == WANT_PENDING && info->state != CBT_STATE_PENDING)
    return fail (e, CTL_E_STATE, "checkpoint '%s' is not pending: its "
                 "backup has ended", name);
  return 0;
}

/* Freeze the disk for the new pending checkpoint NAME: drained. */
static int
begin_frozen (const char *name, struct backup_error *e)
{
  struct cbt *c = tracking_cbt ();
  char msg[CBT_ERRLEN] = "";
  int r;

  disk_drain ();
  r = tracking_checkpoint_begin (name, msg, sizeof msg);
  if (r == -1)
    fail_cbt (e, msg);
  else if (frozen_activate (cbt_disk_size (c), cbt_granularity (c), name,
                            msg, sizeof msg) == -1) {
    char why[CBT_ERRLEN];

    fail (e, errno == ENOMEM ? CTL_E_INTERNAL : CTL_E_STATE, "backup '%s' "
          "cannot freeze the disk: %s", name, msg);
    if (tracking_checkpoint_end (name, false, why, sizeof why) == -1)
      nbdkit_error ("sparsebackup: backup '%s': %s", name, why);
    r = -1;
  }
  disk_undrain ();
  return r;
}

int
backup_begin (const char *name, const char *since, struct backup_error *e)
{
  struct checkpoint_ref ref;
  char msg[CBT_ERRLEN] = "";
  SCOPED_MUTEX (&backup_lock);

  assert (tracking_cbt () != NULL);
  if (since && backup_find_checkpoint (since, WANT_GOOD, &ref, NULL,
                                      e) == -1)
    return -1;
  if (frozen_enabled ())
    return begin_frozen (name, e);
  if (tracking_checkpoint_begin (name, msg, sizeof msg) == -1)
    return fail_cbt (e, msg);
  return 0;
}

/* NAME is the checkpoint of the frozen backup: *INFO. */
static bool
is_frozen (const char *name, struct frozen_info *info)
{
  return frozen_current (info) && strcmp (info->name, name) == 0;
}

/* End backup NAME (backup_lock held). */
static int
end_locked (const char *name, bool ok, struct backup_error *e)
{
  struct frozen_info fi;
  char msg[CBT_ERRLEN] = "";
  bool frozen = is_frozen (name, &fi);

  if (frozen && fi.broken) {
    if (tracking_checkpoint_end (name, false, msg, sizeof msg) == -1)
      return fail_cbt (e, msg);
    frozen_release ();
    return fail (e, CTL_E_BROKEN, "backup '%s' is broken (%s): its "
                 "checkpoint was deleted, take the backup again",
                 name, fi.why);
  }
  if (tracking_checkpoint_end (name, ok, msg, sizeof msg) == -1)
    return fail_cbt (e, msg);
  /* The checkpoint is good or gone: the frozen disk is no more. */
  if (frozen)
    frozen_release ();
  return 0;
}

int
backup_end (const char *name, bool ok, struct backup_error *e)
{
  struct checkpoint_ref ref;
  SCOPED_MUTEX (&backup_lock);

  assert (tracking_cbt () != NULL);
  if (backup_find_checkpoint (name, WANT_PENDING, &ref, NULL, e) == -1)
    return -1;
  return end_locked (name, ok, e);
}

int
backup_checkpoint_delete (const char *name, struct backup_error *e)
{
  struct frozen_info fi;
  struct checkpoint_ref ref;
  char msg[CBT_ERRLEN] = "";
  SCOPED_MUTEX (&backup_lock);

  assert (tracking_cbt () != NULL);
  if (backup_find_checkpoint (name, WANT_ANY, &ref, NULL, e) == -1)
    return -1;
  /* Deleting the frozen backup's checkpoint ends the backup. */
  if (is_frozen (name, &fi)) {
    if (end_locked (name, false, e) == -1 && e->code != CTL_E_BROKEN)
      return -1;
    return 0;
  }
  if (tracking_checkpoint_delete (name, msg, sizeof msg) == -1)
    return fail_cbt (e, msg);
  return 0;
}
