/* sparsebackup: persistent changed-block tracking (CBT) with checkpoints.
 *
 * A cbt file records which granules (GRANULARITY bytes, a power of 2,
 * default 64 KiB) of one disk (identified by its size and a
 * caller-supplied identity string) changed, per checkpoint interval.
 * The file format is described in doc/cbt-format.md.
 *
 * Checkpoints c0 < c1 < ... < cN-1 form a chain.  The record of ci
 * (i < N-1) is a frozen bitmap on disk: what changed between ci and
 * ci+1.  The record of the last checkpoint is the "current" bitmap,
 * the only one kept in memory (one bit per granule).  "Changed since
 * X" is the union of the records from X to now.  Deleting a checkpoint
 * merges its record into the previous one (deleting c0 drops its
 * record: nobody can ask "since c0" any more).  A checkpoint created
 * pending (for a backup) becomes good with cbt_checkpoint_confirm; a
 * failed one (cbt_checkpoint_fail) or one still pending at the next
 * load is deleted, i.e. merged back: nothing is lost.
 *
 * Durability modes:
 *   CBT_MODE_IN_USE       the file is marked in use (synced) before the
 *                         first change; changes live in memory and are
 *                         stored at cbt_close.  A file found still in
 *                         use at load loses every checkpoint (the load
 *                         succeeds, info->invalidated is set: the next
 *                         backup must be full).
 *   CBT_MODE_WRITE_AHEAD  cbt_mark returns a ticket; cbt_commit waits
 *                         until the marks are on disk (group commit: one
 *                         writer syncs for every waiter).  The filter
 *                         issues the write only after cbt_commit
 *                         returned 0.  After a crash every checkpoint
 *                         stays valid.
 *
 * Rule for the caller (the filter): mark before the change is issued;
 * after cbt_checkpoint_create, mark again every change still in flight
 * (begun before, not yet ended: see changes.h), and in write-ahead mode
 * commit those marks, so that a change landing after the checkpoint is
 * also recorded after it.
 *
 * The file is locked (fcntl F_OFD_SETLK) while open: a second open, in
 * this or another process, fails with EAGAIN.  Every function is
 * thread-safe.  An I/O error while writing the file is sticky: every
 * later call that needs the disk fails with EIO (reopen to recover;
 * the load checks everything).
 *
 * Errors: functions returning int return 0 or -1 with errno set and,
 * where ERR is given, a message of at most ERRLEN bytes naming the
 * field or object at fault.
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_CBT_H
#define SPARSEBACKUP_CBT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define CBT_DEFAULT_GRANULARITY 65536
#define CBT_MIN_GRANULARITY 512
#define CBT_MAX_GRANULARITY (1u << 30)
#define CBT_NAME_MAX 63             /* bytes in a checkpoint name */
#define CBT_IDENTITY_MAX 255        /* bytes in a disk identity */
#define CBT_MAX_CHECKPOINTS 256
#define CBT_MAX_BITMAP (UINT64_C (1) << 30)  /* bytes per bitmap */
#define CBT_ERRLEN 256

enum cbt_mode {
  CBT_MODE_IN_USE = 0,
  CBT_MODE_WRITE_AHEAD = 1,
};

enum cbt_state {
  CBT_STATE_GOOD = 1,
  CBT_STATE_PENDING = 2,
};

struct cbt_options {
  /* Size of the disk in bytes.  0: take it (and the granularity) from
   * the file; only with read_only (inspection, fuzzing).
   */
  uint64_t disk_size;
  /* For a new file: power of 2 in [CBT_MIN_GRANULARITY,
   * CBT_MAX_GRANULARITY]; 0 = CBT_DEFAULT_GRANULARITY.  For an existing
   * file 0 accepts the file's, anything else must match it.
   */
  uint32_t granularity;
  /* The disk's identity (printable ASCII, at most CBT_IDENTITY_MAX
   * bytes, may be empty): an existing file must have the same.
   */
  const char *identity;
  enum cbt_mode mode;
  bool create;      /* create the file if it is missing or empty */
  bool reset;       /* start afresh: discard whatever the file holds */
  bool read_only;   /* look only: no marks, no checkpoint changes */
};

/* What cbt_open found.  MESSAGE is empty when there is nothing to say. */
struct cbt_load_info {
  bool created;                 /* a new, empty set */
  bool invalidated;             /* checkpoints lost: next backup full */
  unsigned dropped;             /* checkpoints dropped (invalidated or
                                   pending at load, merged back) */
  bool fallback;                /* the newest superblock was damaged:
                                   the previous copy was used */
  char message[CBT_ERRLEN];
};

struct cbt_checkpoint_info {
  char name[CBT_NAME_MAX + 1];
  enum cbt_state state;
  uint64_t created;             /* seconds since the epoch */
};

struct cbt_stats {
  uint64_t marks;               /* cbt_mark calls */
  uint64_t commits;             /* cbt_commit calls that had to wait */
  uint64_t syncs;               /* fdatasync calls by commits */
  uint64_t pages_written;       /* bitmap pages written by commits */
};

struct cbt;

/* True if NAME is a valid checkpoint name: 1..CBT_NAME_MAX bytes of
 * printable ASCII without space (0x21..0x7e), not starting with '-'.
 */
extern bool cbt_name_valid (const char *name);

/* Open (and lock) PATH, creating it with OPTS->create.  On success *CBT
 * is set and INFO (may be NULL) says what the load found.  A file that
 * fails any check is refused (nothing of it is used) with a message
 * naming the field and its value; OPTS->reset starts afresh instead.
 */
extern int cbt_open (const char *path, const struct cbt_options *opts,
                     struct cbt **cbt, struct cbt_load_info *info,
                     char *err, size_t errlen);
/* The same on an open file descriptor, which the cbt owns afterwards
 * (closed by cbt_close, or on failure).
 */
extern int cbt_open_fd (int fd, const struct cbt_options *opts,
                        struct cbt **cbt, struct cbt_load_info *info,
                        char *err, size_t errlen);

/* Store the set, mark the file clean, unlock and free.  Always frees;
 * -1 if storing failed (the next load then sees the file in use).
 */
extern int cbt_close (struct cbt *cbt, char *err, size_t errlen);

extern uint64_t cbt_disk_size (const struct cbt *cbt);
extern uint32_t cbt_granularity (const struct cbt *cbt);
extern enum cbt_mode cbt_mode (const struct cbt *cbt);
extern const char *cbt_identity (const struct cbt *cbt);
extern void cbt_get_stats (struct cbt *cbt, struct cbt_stats *stats);

/* Record that [OFFSET, OFFSET+COUNT) is about to change: every granule
 * touched, rounded outward (clipped to the disk).  In-use mode: the
 * first mark syncs the in-use flag to disk (-1/EIO if that fails).
 * Write-ahead mode: *TICKET (may be NULL in in-use mode) is set to 0 if
 * the granules are already durably recorded, else to the ticket to pass
 * to cbt_commit.  EINVAL: range beyond the disk.  EROFS: read-only.
 */
extern int cbt_mark (struct cbt *cbt, uint64_t offset, uint64_t count,
                     uint64_t *ticket);

/* True if every granule of the range is recorded and, in write-ahead
 * mode, durably so (a cbt_mark would return ticket 0).
 */
extern bool cbt_is_durable (struct cbt *cbt, uint64_t offset,
                            uint64_t count);

/* Write-ahead mode: return once every mark up to TICKET is on disk.
 * One caller writes and syncs for all waiters.  Ticket 0 and in-use
 * mode return 0 at once.  -1/EIO when the write or sync failed (then
 * and afterwards: the filter must fail the client's write).
 */
extern int cbt_commit (struct cbt *cbt, uint64_t ticket);

/* Checkpoints.  Names must be cbt_name_valid and unique (EEXIST).
 * PENDING: created for a backup, at most one at a time (EBUSY); it is
 * the last one until confirmed or failed.  ENOENT: no such checkpoint.
 * ENOSPC: CBT_MAX_CHECKPOINTS reached.  Each change is durable (both
 * modes) when the call returns 0.  They rewrite every record (see
 * doc/cbt-format.md, "Cost") with the lock held: marks wait meanwhile.
 */
extern int cbt_checkpoint_create (struct cbt *cbt, const char *name,
                                  bool pending, char *err, size_t errlen);
extern int cbt_checkpoint_confirm (struct cbt *cbt, const char *name,
                                   char *err, size_t errlen);
/* Delete a pending checkpoint (EINVAL if it is good). */
extern int cbt_checkpoint_fail (struct cbt *cbt, const char *name,
                                char *err, size_t errlen);
/* Delete any checkpoint, merging its record into the previous one. */
extern int cbt_checkpoint_delete (struct cbt *cbt, const char *name,
                                  char *err, size_t errlen);

extern size_t cbt_checkpoint_count (struct cbt *cbt);
/* Checkpoint I (0 = oldest); -1/ENOENT past the end. */
extern int cbt_checkpoint_get (struct cbt *cbt, size_t i,
                               struct cbt_checkpoint_info *info);
/* The newest good checkpoint, or -1/ENOENT. */
extern int cbt_checkpoint_latest_good (struct cbt *cbt,
                                       struct cbt_checkpoint_info *info);

/* Call EXTENT (in order, coalesced, clipped to the disk) for every
 * range that changed since checkpoint SINCE (a good one: EINVAL for a
 * pending one).  EXTENT returning -1 stops the walk (-1 returned, errno
 * kept).  Reads the frozen records from disk in bounded chunks.  The
 * cbt's lock is held during the walk (marks wait): EXTENT must not call
 * back into this cbt, and should be quick (buffer, then send).
 */
typedef int (*cbt_extent_fn) (uint64_t offset, uint64_t length,
                              void *opaque);
extern int cbt_map (struct cbt *cbt, const char *since,
                    cbt_extent_fn extent, void *opaque,
                    char *err, size_t errlen);
/* The same over [START, END) only (granules that overlap it; END is
 * clipped to the disk), and with UNTIL (NULL: now) the changes from
 * SINCE up to checkpoint UNTIL (newer than SINCE, pending or good)
 * only: the union of the records from SINCE to the one before UNTIL.
 * Reads only the bitmap pages that cover the range.
 */
extern int cbt_map_range (struct cbt *cbt, const char *since,
                          const char *until, uint64_t start, uint64_t end,
                          cbt_extent_fn extent, void *opaque,
                          char *err, size_t errlen);

#endif /* SPARSEBACKUP_CBT_H */
