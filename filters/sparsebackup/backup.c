/* nbdkit-sparsebackup-filter: backups and checkpoints (backup.h).
 *
 * BACKUP_LOCK serialises backup-begin, backup-end, checkpoint-delete
 * and group backups (the control socket serves up to 8 clients at
 * once), so that the frozen disk, the pending checkpoint and the
 * scratch file always change together.  A prepared group backup holds
 * it until its commit or abort (bounded by its hold timeout): other
 * backup commands meanwhile answer "busy" at once.
 *
 * backup-begin with a scratch file: the drain (disk_drain: no change in
 * flight, new ones wait), then the pending checkpoint (tracking.c) and
 * the frozen disk (frozen.c), then the changes go on.  Every change is
 * so wholly before the freeze (in the records up to the new checkpoint
 * and in the frozen disk) or wholly after it (recorded after it, and
 * saved first).  Without a scratch file there is no drain: the
 * checkpoint marks the changes in flight again (tracking.c).
 *
 * A group backup (group-prepare, then group-commit or group-abort, all
 * from one control client's thread) splits backup-begin in two: prepare
 * checks what backup-begin would refuse and drains (with or without a
 * scratch file: with sparsebackup-cbt every change takes the drain's
 * read side), commit does the rest.  Between the two, on every server
 * of the group, no change is in flight and none begins, so the
 * checkpoints of all the servers are taken at one point in time.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* pthread_mutex_clocklock */
#endif
#include <config.h>

#include <assert.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "ctlproto.h"
#include "internal.h"
#include "backup.h"
#include "disk.h"
#include "frozen.h"
#include "tracking.h"

/* How long backup-begin may wait for the changes in flight to end, and
 * any backup command for another one to finish.
 */
#define BACKUP_WAIT_MS 60000

static pthread_mutex_t backup_lock = PTHREAD_MUTEX_INITIALIZER;

/* The name of the group backup prepared now ("" if none), for status
 * and the "busy" messages.  GROUP_LOCK is a leaf.
 */
static pthread_mutex_t group_lock = PTHREAD_MUTEX_INITIALIZER;
static char group_name[CBT_NAME_MAX + 1];

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

/* ---- Time ------------------------------------------------------------- */

static void
add_ms (struct timespec *t, uint64_t ms)
{
  t->tv_sec += (time_t) (ms / 1000);
  t->tv_nsec += (long) (ms % 1000) * 1000000;
  if (t->tv_nsec >= 1000000000) {
    t->tv_sec++;
    t->tv_nsec -= 1000000000;
  }
}

/* CLOCK_MONOTONIC now, plus MS. */
static struct timespec
deadline_in (uint64_t ms)
{
  struct timespec t;

  clock_gettime (CLOCK_MONOTONIC, &t);
  add_ms (&t, ms);
  return t;
}

uint64_t
backup_elapsed_us (const struct timespec *a, const struct timespec *b)
{
  int64_t us = (int64_t) (b->tv_sec - a->tv_sec) * 1000000 +
    (b->tv_nsec - a->tv_nsec) / 1000;

  return us < 0 ? 0 : (uint64_t) us;
}

static uint64_t
us_since (const struct timespec *a)
{
  struct timespec now;

  clock_gettime (CLOCK_MONOTONIC, &now);
  return backup_elapsed_us (a, &now);
}

/* ---- The backup lock -------------------------------------------------- */

bool
backup_group_current (char *name, size_t len)
{
  SCOPED_MUTEX (&group_lock);

  snprintf (name, len, "%s", group_name);
  return group_name[0] != '\0';
}

static void
set_group (const char *name)
{
  SCOPED_MUTEX (&group_lock);

  snprintf (group_name, sizeof group_name, "%s", name);
}

/* Take backup_lock by DEADLINE: -1 with E (busy) if a group backup
 * holds it, or if it is still taken at DEADLINE.
 */
static int
lock_backup (const struct timespec *deadline, struct backup_error *e)
{
  char group[CBT_NAME_MAX + 1];

  if (pthread_mutex_trylock (&backup_lock) == 0)
    return 0;
  if (backup_group_current (group, sizeof group))
    return fail (e, CTL_E_BUSY, "group backup '%s' is prepared (writes are "
                 "held until its group-commit or group-abort, or its hold "
                 "timeout): try again after it", group);
  if (pthread_mutex_clocklock (&backup_lock, CLOCK_MONOTONIC,
                               deadline) == 0)
    return 0;
  if (backup_group_current (group, sizeof group))
    return fail (e, CTL_E_BUSY, "group backup '%s' is prepared (writes are "
                 "held until its group-commit or group-abort, or its hold "
                 "timeout): try again after it", group);
  return fail (e, CTL_E_BUSY, "another backup command has not finished "
               "(waited %d ms): try again", BACKUP_WAIT_MS);
}

static void
unlock_backup (void)
{
  pthread_mutex_unlock (&backup_lock);
}

/* ---- Checkpoints ------------------------------------------------------ */

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

/* Create the pending checkpoint NAME and, with a scratch file, freeze
 * the disk (backup_lock held; drained with a scratch file).
 */
static int
create_locked (const char *name, struct backup_error *e)
{
  struct cbt *c = tracking_cbt ();
  char msg[CBT_ERRLEN] = "";

  if (tracking_checkpoint_begin (name, msg, sizeof msg) == -1)
    return fail_cbt (e, msg);
  if (!frozen_enabled ())
    return 0;
  if (frozen_activate (cbt_disk_size (c), cbt_granularity (c), name,
                       msg, sizeof msg) == -1) {
    char why[CBT_ERRLEN];

    fail (e, errno == ENOMEM ? CTL_E_INTERNAL : CTL_E_STATE, "backup '%s' "
          "cannot freeze the disk: %s", name, msg);
    if (tracking_checkpoint_end (name, false, why, sizeof why) == -1)
      nbdkit_error ("sparsebackup: backup '%s': %s", name, why);
    return -1;
  }
  return 0;
}

/* The changes did not end by the deadline. */
static int
fail_drain (struct backup_error *e, const char *name, uint64_t ms)
{
  return fail (e, CTL_E_BUSY, "backup '%s': the writes, zero requests and "
               "trims in flight did not end within %" PRIu64 " ms (a slow "
               "or stuck plugin?): nothing was done, try again", name, ms);
}

static int
begin_locked (const char *name, const char *since, struct backup_error *e)
{
  struct checkpoint_ref ref;
  struct timespec deadline;
  int r;

  assert (tracking_cbt () != NULL);
  if (since && backup_find_checkpoint (since, WANT_GOOD, &ref, NULL,
                                      e) == -1)
    return -1;
  if (!frozen_enabled ())
    return create_locked (name, e);
  deadline = deadline_in (BACKUP_WAIT_MS);
  if (disk_drain (&deadline) == -1)
    return fail_drain (e, name, BACKUP_WAIT_MS);
  r = create_locked (name, e);
  disk_undrain ();
  return r;
}

int
backup_begin (const char *name, const char *since, struct backup_error *e)
{
  struct timespec deadline = deadline_in (BACKUP_WAIT_MS);
  int r;

  if (lock_backup (&deadline, e) == -1)
    return -1;
  r = begin_locked (name, since, e);
  unlock_backup ();
  return r;
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
  struct timespec deadline = deadline_in (BACKUP_WAIT_MS);
  int r = -1;

  assert (tracking_cbt () != NULL);
  if (lock_backup (&deadline, e) == -1)
    return -1;
  if (backup_find_checkpoint (name, WANT_PENDING, &ref, NULL, e) == 0)
    r = end_locked (name, ok, e);
  unlock_backup ();
  return r;
}

static int
delete_locked (const char *name, struct backup_error *e)
{
  struct frozen_info fi;
  struct checkpoint_ref ref;
  char msg[CBT_ERRLEN] = "";

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

int
backup_checkpoint_delete (const char *name, struct backup_error *e)
{
  struct timespec deadline = deadline_in (BACKUP_WAIT_MS);
  int r;

  if (lock_backup (&deadline, e) == -1)
    return -1;
  r = delete_locked (name, e);
  unlock_backup ();
  return r;
}

/* ---- Group backups ---------------------------------------------------- */

/* What backup-begin NAME --since SINCE would refuse, checked without
 * changing anything (backup_lock held).
 */
static int
group_check (const char *name, const char *since, struct backup_error *e)
{
  struct cbt *c = tracking_cbt ();
  struct cbt_checkpoint_info info;
  struct checkpoint_ref ref;
  size_t n = cbt_checkpoint_count (c);

  if (tracking_io_error ())
    return fail (e, CTL_E_IO, "a write to the cbt file %s failed: writes "
                 "are failing until nbdkit is restarted", cfg_cbt_path);
  if (!cbt_name_valid (name))
    return fail (e, CTL_E_INVALID_NAME, "'%.*s' is not a valid checkpoint "
                 "name", CBT_NAME_MAX + 1, name);
  if (since && backup_find_checkpoint (since, WANT_GOOD, &ref, NULL,
                                      e) == -1)
    return -1;
  if (tracking_find (name, &info, NULL) >= 0)
    return fail (e, CTL_E_EXISTS, "checkpoint '%s' exists on this server "
                 "(checkpoint-list shows them): choose another name", name);
  if (n > 0 && cbt_checkpoint_get (c, n - 1, &info) == 0 &&
      info.state == CBT_STATE_PENDING)
    return fail (e, CTL_E_BUSY, "backup '%s' is pending on this server: "
                 "end it first (backup-end %s --ok|--failed)", info.name,
                 info.name);
  if (n >= CBT_MAX_CHECKPOINTS)
    return fail (e, CTL_E_LIMIT, "%d checkpoints exist on this server: "
                 "delete one", CBT_MAX_CHECKPOINTS);
  return 0;
}

int
backup_group_prepare (const char *name, const char *since, uint32_t hold_ms,
                      struct group_hold *g, struct backup_error *e)
{
  struct timespec drained;

  assert (!g->held && tracking_cbt () != NULL);
  assert (hold_ms >= 1 && hold_ms <= CTL_HOLD_MAX_MS);
  memset (g, 0, sizeof *g);
  clock_gettime (CLOCK_MONOTONIC, &g->start);
  g->deadline = g->start;
  add_ms (&g->deadline, hold_ms);
  if (lock_backup (&g->deadline, e) == -1)
    return -1;
  if (group_check (name, since, e) == -1) {
    unlock_backup ();
    return -1;
  }
  /* The hold starts here: from now on new changes wait. */
  clock_gettime (CLOCK_MONOTONIC, &g->start);
  if (disk_drain (&g->deadline) == -1) {
    unlock_backup ();
    return fail_drain (e, name, hold_ms);
  }
  clock_gettime (CLOCK_MONOTONIC, &drained);
  g->drain_us = backup_elapsed_us (&g->start, &drained);
  g->held = true;
  g->hold_ms = hold_ms;
  snprintf (g->name, sizeof g->name, "%s", name);
  snprintf (g->since, sizeof g->since, "%s", since ? since : "");
  set_group (name);
  nbdkit_debug ("sparsebackup: group backup '%s' prepared: writes held "
                "(drained in %" PRIu64 " us, for at most %" PRIu32 " ms)",
                name, g->drain_us, hold_ms);
  return 0;
}

/* The end of a hold: the changes go on. */
static uint64_t
release (struct group_hold *g)
{
  uint64_t us;

  assert (g->held);
  set_group ("");
  disk_undrain ();
  us = us_since (&g->start);
  unlock_backup ();
  g->held = false;
  return us;
}

int
backup_group_commit (struct group_hold *g, uint64_t *held_us,
                     struct backup_error *e)
{
  int r = create_locked (g->name, e);

  *held_us = release (g);
  nbdkit_debug ("sparsebackup: group backup '%s' %s: writes held for "
                "%" PRIu64 " us", g->name, r == 0 ? "committed" : "failed",
                *held_us);
  return r;
}

void
backup_group_abort (struct group_hold *g, const char *why, uint64_t *held_us)
{
  uint64_t us = release (g);

  if (held_us)
    *held_us = us;
  if (why)
    nbdkit_error ("sparsebackup: group backup '%s' aborted, writes resumed "
                  "after %" PRIu64 " us: %s", g->name, us, why);
  else
    nbdkit_debug ("sparsebackup: group backup '%s' aborted: writes held for "
                  "%" PRIu64 " us", g->name, us);
}
