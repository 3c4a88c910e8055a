/* sparsebackup: persistent changed-block tracking (CBT) with checkpoints.
 *
 * A cbt file records which granules (GRANULARITY bytes, a power of 2,
 * default 64 KiB) of one disk (identified by its size and a
 * caller-supplied identity string) changed, per checkpoint interval.
 * The file format (version 2) is described in doc/cbt-format.md.
 *
 * Checkpoints c0 < c1 < ... < cN-1 form a chain.  The record of ci
 * (i < N-1) is frozen: what changed between ci and ci+1, stored sparse
 * (only the 4 KiB pages of the bitmap that hold a set bit).  The record
 * of the last checkpoint is the "current" one, which marks add to; it is
 * kept in memory by page (only the pages that hold a set bit).
 * "Changed since X" is the union of the records from X to now.
 * Deleting a checkpoint merges its record into the previous one
 * (deleting c0 drops its record: nobody can ask "since c0" any more).
 * A checkpoint created pending (for a backup) becomes good with
 * cbt_checkpoint_confirm; a failed one (cbt_checkpoint_fail) or one
 * still pending at the next load is deleted, i.e. merged back: nothing
 * is lost.
 *
 * Each checkpoint has a serial number (cbt_checkpoint_info.serial),
 * 1, 2, 3... in creation order, never reused within a file, even when a
 * name is deleted and created again: bind to a checkpoint by its serial
 * (cbt_checkpoint_find_serial, cbt_map_serial) to notice that it went.
 *
 * Durability modes (what a crash keeps):
 *   CBT_MODE_IN_USE       the file is marked in use (synced) before the
 *                         first change; changes live in memory and are
 *                         stored at cbt_close.  A file found still in
 *                         use at load loses every checkpoint (the load
 *                         succeeds, info->invalidated is set: the next
 *                         backup must be full).
 *   CBT_MODE_PROCESS_SAFE cbt_mark writes the pages whose bits it newly
 *                         set to the file (a plain write, no sync)
 *                         before it returns, and the file records the
 *                         boot id (cbt_options.boot_id).  After the
 *                         process dies (kill -9) the kernel still holds
 *                         what it wrote: a file left in use by the same
 *                         boot keeps every checkpoint; one left in use
 *                         by another boot (power loss, kernel crash,
 *                         reboot) loses them as in in-use mode.
 *   CBT_MODE_WRITE_AHEAD  cbt_mark returns a ticket; cbt_commit waits
 *                         until the marks are on disk (group commit: one
 *                         writer syncs for every waiter).  The filter
 *                         issues the write only after cbt_commit
 *                         returned 0.  After a crash (also a power loss)
 *                         every checkpoint stays valid.
 *
 * Rule for the caller (the filter): mark before the change is issued;
 * after cbt_checkpoint_create, mark again every change still in flight
 * (begun before, not yet ended: see changes.h), and in write-ahead mode
 * commit those marks, so that a change landing after the checkpoint is
 * also recorded after it.  (A mark counts after the new checkpoint from
 * early in cbt_checkpoint_create, before its I/O: so "changes in
 * flight" are those whose mark may have come before the call returned.)
 *
 * Stalls: no checkpoint change, map query or commit holds the lock that
 * cbt_mark takes for longer than it takes to copy a few pages or to
 * write and sync one superblock, whatever the size of the disk or the
 * number of checkpoints (write-ahead commits wait for the superblock
 * write, not for the whole change).
 *
 * The file is locked (fcntl F_OFD_SETLK) while open: a second open, in
 * this or another process, fails with EAGAIN.  Every function is
 * thread-safe, except cbt_close (call it once, after every other call
 * returned).  A failure to write or sync the file is sticky: every
 * later call that needs the disk fails with EIO (reopen to recover; the
 * load checks everything).
 *
 * Errors: functions returning int return 0 or -1 with errno set and,
 * where ERR is given, a message of at most ERRLEN bytes naming the
 * field or object at fault.  Every failure to read, write or sync the
 * file is EIO whatever the cause (ENOSPC, EDQUOT, EFBIG...), with the
 * cause's text in the message ("... No space left on device").
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_CBT_H
#define SPARSEBACKUP_CBT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define CBT_DEFAULT_GRANULARITY 65536
#define CBT_MIN_GRANULARITY 512
#define CBT_MAX_GRANULARITY (1u << 30)
#define CBT_NAME_MAX 63             /* bytes in a checkpoint name */
#define CBT_IDENTITY_MAX 255        /* bytes in a disk identity */
#define CBT_BOOT_ID_MAX 63          /* bytes in a boot id */
#define CBT_MAX_CHECKPOINTS 256
#define CBT_MAX_BITMAP (UINT64_C (1) << 30)  /* bytes per bitmap */
#define CBT_ERRLEN 512

enum cbt_mode {
  CBT_MODE_IN_USE = 0,
  CBT_MODE_WRITE_AHEAD = 1,
  CBT_MODE_PROCESS_SAFE = 2,
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
  /* The kernel's boot id (/proc/sys/kernel/random/boot_id without the
   * newline, see cbt_read_boot_id; 1..CBT_BOOT_ID_MAX printable bytes,
   * no space), or NULL.  Required in process-safe mode (stored in the
   * file); in any mode, a file left in use in process-safe mode keeps
   * its checkpoints only if it was left by the same boot, which needs
   * this.  Tests pretend another boot with another string.
   */
  const char *boot_id;
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
  bool converted;               /* a version 1 file, rewritten as
                                   version 2 (or, read-only, read as one) */
  char message[CBT_ERRLEN];
};

struct cbt_checkpoint_info {
  char name[CBT_NAME_MAX + 1];
  enum cbt_state state;
  uint64_t created;             /* seconds since the epoch */
  uint64_t serial;              /* 1, 2, ...: never reused in a file */
};

struct cbt_stats {
  uint64_t marks;               /* cbt_mark calls */
  uint64_t commits;             /* cbt_commit calls that had to wait */
  uint64_t syncs;               /* fdatasync calls by commits */
  uint64_t pages_written;       /* bitmap pages written by commits
                                   (write-ahead) or marks (process-safe) */
};

struct cbt;

/* True if NAME is a valid checkpoint name: 1..CBT_NAME_MAX bytes of
 * printable ASCII without space (0x21..0x7e), not starting with '-'.
 */
extern bool cbt_name_valid (const char *name);

/* Read the kernel's boot id into BUF (at most CBT_BOOT_ID_MAX + 1
 * bytes with the NUL), for cbt_options.boot_id.  Errors: the errno of
 * opening or reading /proc/sys/kernel/random/boot_id; EINVAL if what it
 * holds is not a boot id.
 */
extern int cbt_read_boot_id (char *buf, size_t len, char *err, size_t errlen);

/* Open (and lock) PATH, creating it with OPTS->create.  On success *CBT
 * is set and INFO (may be NULL) says what the load found.  A file that
 * fails any check is refused (nothing of it is used) with a message
 * naming the field and its value; OPTS->reset starts afresh instead.
 * A version 1 file is converted to version 2 (INFO->converted; read-only:
 * read as is).  Errors: the errno of open(2) on PATH; EAGAIN: locked by
 * another open; EINVAL: a bad option or a file that fails a check;
 * ENOENT: the file is empty or missing and OPTS->create is not set;
 * ENOMEM; EIO: reading, writing or syncing the file failed.
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
 * -1/EIO if storing failed (the next load then sees the file in use).
 */
extern int cbt_close (struct cbt *cbt, char *err, size_t errlen);

extern uint64_t cbt_disk_size (const struct cbt *cbt);
extern uint32_t cbt_granularity (const struct cbt *cbt);
extern enum cbt_mode cbt_mode (const struct cbt *cbt);
extern const char *cbt_identity (const struct cbt *cbt);
extern void cbt_get_stats (struct cbt *cbt, struct cbt_stats *stats);

/* Record that [OFFSET, OFFSET+COUNT) is about to change: every granule
 * touched, rounded outward (clipped to the disk).  The first mark after
 * the open writes and syncs the superblock marked in use.  Process-safe
 * mode: the pages whose bits were newly set are written (no sync)
 * before it returns.  Write-ahead mode: *TICKET (may be NULL in the
 * other modes, where it is set to 0) is set to 0 if the granules are
 * already durably recorded, else to the ticket to pass to cbt_commit.
 * Errors: EINVAL: range beyond the disk; EROFS: read-only; EIO: writing
 * the file failed (now or earlier); ENOMEM.
 */
extern int cbt_mark (struct cbt *cbt, uint64_t offset, uint64_t count,
                     uint64_t *ticket);

/* True if every granule of the range is recorded and, in write-ahead
 * mode, durably so (a cbt_mark would return ticket 0).
 */
extern bool cbt_is_durable (struct cbt *cbt, uint64_t offset,
                            uint64_t count);

/* Write-ahead mode: return once every mark up to TICKET is on disk.
 * One caller writes and syncs for all waiters.  Ticket 0 and the other
 * modes return 0 at once.  -1/EIO when the write or sync failed (then
 * and afterwards: the filter must fail the client's write).
 */
extern int cbt_commit (struct cbt *cbt, uint64_t ticket);

/* Checkpoints.  Each change is durable when the call returns 0 (in
 * every mode; a pending checkpoint is dropped at load anyway).  Errors:
 * EINVAL: an invalid name, or the wrong state (confirm or fail of a
 * checkpoint that is not pending); EEXIST: the name exists; EBUSY: a
 * checkpoint is pending (create); ENOENT: no such checkpoint; EMLINK:
 * CBT_MAX_CHECKPOINTS exist (create: delete one first); EROFS:
 * read-only; EIO: writing the file failed (now or earlier: see the
 * message); ENOMEM.  Their cost grows with the pages of the records they
 * merge or freeze, never with the disk size (doc/cbt-format.md, "Cost"),
 * and marks go on meanwhile (see "Stalls" above).
 *
 * PENDING: created for a backup, at most one at a time; it is the last
 * one until confirmed or failed.
 */
extern int cbt_checkpoint_create (struct cbt *cbt, const char *name,
                                  bool pending, char *err, size_t errlen);
/* The same, calling TAKEN (OPAQUE) once, if and when the new checkpoint
 * takes effect for marks (a mark from then on is recorded after it):
 * early, before the slow part (the previous record's index, the sync,
 * the superblock).  TAKEN runs with no lock of this cbt held, may call
 * cbt_mark and cbt_commit but no checkpoint function; it is where a
 * caller ends what must bracket that moment (e.g. marks again the
 * changes in flight and lets writes go on) instead of holding it over
 * the whole call.  If the call then fails, the checkpoint is not there
 * (and the failure is sticky: EIO).
 */
extern int cbt_checkpoint_create_cb (struct cbt *cbt, const char *name,
                                     bool pending,
                                     void (*taken) (void *opaque),
                                     void *opaque, char *err, size_t errlen);
/* A pending checkpoint becomes good: a table and a superblock written. */
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
/* The index (0 = oldest) of checkpoint NAME, or of the checkpoint with
 * serial SERIAL, and its *INFO (INFO may be NULL); -1/ENOENT if there is
 * none (a serial whose checkpoint was deleted never comes back).
 */
extern ssize_t cbt_checkpoint_find (struct cbt *cbt, const char *name,
                                    struct cbt_checkpoint_info *info);
extern ssize_t cbt_checkpoint_find_serial (struct cbt *cbt, uint64_t serial,
                                           struct cbt_checkpoint_info *info);

/* Call EXTENT (in order, coalesced, clipped to the disk) for every
 * range that changed since checkpoint SINCE (a good one: EINVAL for a
 * pending one; ENOENT: no such checkpoint).  EXTENT returning -1 stops
 * the walk (-1 returned, errno kept).  The walk reads the checkpoints
 * as they were when it began (a checkpoint deleted meanwhile is still
 * read) and the current record page by page; it holds no lock while
 * it reads the file or calls EXTENT, which may call this cbt (but not
 * cbt_close).  EIO: reading the file failed, or a page does not match
 * its crc.
 */
typedef int (*cbt_extent_fn) (uint64_t offset, uint64_t length,
                              void *opaque);
extern int cbt_map (struct cbt *cbt, const char *since,
                    cbt_extent_fn extent, void *opaque,
                    char *err, size_t errlen);
/* The same over [START, END) only (granules that overlap it; END is
 * clipped to the disk), and with UNTIL (NULL: now) the changes from
 * SINCE up to checkpoint UNTIL (newer than SINCE, pending or good:
 * EINVAL otherwise) only: the union of the records from SINCE to the
 * one before UNTIL.  Reads only the pages that cover the range.
 */
extern int cbt_map_range (struct cbt *cbt, const char *since,
                          const char *until, uint64_t start, uint64_t end,
                          cbt_extent_fn extent, void *opaque,
                          char *err, size_t errlen);
/* The same with the checkpoints given by serial (UNTIL 0: now): ENOENT
 * once the checkpoint SINCE (or UNTIL) was deleted, even if its name
 * exists again.
 */
extern int cbt_map_serial (struct cbt *cbt, uint64_t since, uint64_t until,
                           uint64_t start, uint64_t end,
                           cbt_extent_fn extent, void *opaque,
                           char *err, size_t errlen);

#endif /* SPARSEBACKUP_CBT_H */
