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
#include <stdint.h>
#include <time.h>

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

/* Group backups: one backup begun on several servers (one per disk) at
 * one point in time, in two phases driven by a controller
 * (sparsebackup-ctl group-begin).  The first, prepare, checks everything
 * backup-begin would check and takes the backup lock and the drain's
 * write side: no change is in flight and new ones wait.  The second,
 * commit, creates the pending checkpoint (and freezes the disk) exactly
 * as backup-begin does, then lets the changes go on; abort lets them go
 * on without a checkpoint.  The hold is bounded: the control client's
 * thread that prepared waits for the next request until the deadline
 * and aborts when it passes, when the connection closes or when nbdkit
 * stops.  Commit and abort must be called by the thread that prepared
 * (a rwlock is unlocked by the thread that locked it).
 */
struct group_hold {
  bool held;                    /* between a prepare and its end */
  char name[CBT_NAME_MAX + 1];
  char since[CBT_NAME_MAX + 1]; /* "" if none */
  uint32_t hold_ms;             /* the bound asked for */
  struct timespec start;        /* when changes began to wait (before
                                   the drain) */
  struct timespec deadline;     /* start + hold_ms (CLOCK_MONOTONIC) */
  uint64_t drain_us;            /* how long the drain took */
};

/* group-prepare NAME [--since SINCE] --hold-timeout HOLD_MS.  0: *G
 * holds the changes until backup_group_commit or backup_group_abort,
 * which must come before G->deadline.
 */
extern int backup_group_prepare (const char *name, const char *since,
                                 uint32_t hold_ms, struct group_hold *g,
                                 struct backup_error *e);
/* group-commit: the pending checkpoint (and the frozen disk), as
 * backup-begin; the changes go on whatever the result.  *HELD_US: how
 * long they were held.
 */
extern int backup_group_commit (struct group_hold *g, uint64_t *held_us,
                                struct backup_error *e);
/* Let the changes go on without a checkpoint (group-abort, or WHY:
 * the hold timed out, the connection closed...: logged as an error
 * when WHY is not NULL).  *HELD_US as above.
 */
extern void backup_group_abort (struct group_hold *g, const char *why,
                                uint64_t *held_us);
/* The name of the group backup prepared now (for status), or false. */
extern bool backup_group_current (char *name, size_t len);
/* Microseconds from A to B. */
extern uint64_t backup_elapsed_us (const struct timespec *a,
                                   const struct timespec *b);

#endif /* SPARSEBACKUP_BACKUP_H */
