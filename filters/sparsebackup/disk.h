/* nbdkit-sparsebackup-filter: the disk state and its changes (disk.c).
 *
 * One state for the disk the filter serves, the plugin's default
 * export (export name ""): the change tracker (from .get_ready on), the
 * block map and the scan cache (created by the first connection to the
 * default export, never replaced: a change of size resets them), and,
 * with sparsebackup-cbt, a context of the default export opened at
 * start-up (its size opens the cbt file; copy before write reads the
 * old data through it, whichever export the writer uses).
 *
 * Every write, zero request and trim of every connection, whatever its
 * export name, is one change: change_begin before it is issued,
 * change_end after.  The steps of each, in order, and the lock order of
 * the whole filter are written at the top of disk.c.
 */
#ifndef SPARSEBACKUP_DISK_H
#define SPARSEBACKUP_DISK_H

#include <stdbool.h>
#include <stdint.h>
#include <time.h>

#include <nbdkit-filter.h>

#include "blockmap.h"
#include "changes.h"
#include "scancache.h"

struct sb_disk {
  struct changes *changes;      /* every change of every connection */
  struct blockmap *bm;          /* NULL until created; see disk_map () */
  struct scancache *sc;         /* NULL if sparsebackup-scan-cache=0 */
  uint32_t blksize;             /* of the map */
  uint32_t scan_chunk;          /* bytes per scanning read */
  uint64_t scan_max;            /* cfg_scan_max, at least blksize */
};
extern struct sb_disk disk;

extern int disk_get_ready (int thread_model);
/* With sparsebackup-cbt: open the context of the default export, learn
 * its size, open the cbt file (tracking.c).  A failure is logged and
 * kept (disk_startup_error): every connection is then refused with it.
 */
extern int disk_after_fork (nbdkit_backend *backend);
extern const char *disk_startup_error (void);
extern void disk_cleanup (void);
extern void disk_unload (void);

/* A connection of SIZE bytes to export EXPORTNAME may use the disk:
 * with sparsebackup-cbt its size must be the tracked disk's.
 */
extern int disk_check_size (const char *exportname, uint64_t size);
/* The first connection to the default export creates the map and the
 * scan cache (block size chosen from NEXT's), later ones of another
 * SIZE reset them.
 */
extern int disk_prepare (nbdkit_next *next, uint64_t size);

/* A change (write, zero request, trim) in flight. */
struct sb_change {
  uint64_t ticket;              /* the tracker's */
  uint64_t offset, count;
  bool drained;                 /* holds the drain's read side */
  bool tracked;                 /* listed in flight by tracking.c */
};

/* Before a change of [OFFSET, OFFSET+COUNT) is issued.  NEWSTATE: what
 * its blocks become in the map (BM_DATA for a write, BM_UNKNOWN for a
 * zero request, BM_TRIMMED for a trim), if the change comes through a
 * connection that uses the map (OWN), else BM_TRIMMED.  -1 with *ERR: it must not
 * be issued (nothing to end).  After it, change_end with OK = false if
 * it failed (its blocks become unknown).
 */
extern int change_begin (struct sb_change *c, bool own, uint64_t offset,
                         uint64_t count, enum bm_state newstate, int *err);
extern void change_end (struct sb_change *c, bool ok);

/* The drain (with sparsebackup-cbt): between disk_drain and
 * disk_undrain no change is in flight and none begins (backup-begin
 * with a scratch file, a prepared group backup).  disk_drain waits
 * until DEADLINE (CLOCK_MONOTONIC) at most: -1 with errno ETIMEDOUT if
 * the changes in flight have not ended by then (new ones waited
 * meanwhile).  The thread that drained must undrain.
 */
extern int disk_drain (const struct timespec *deadline);
extern void disk_undrain (void);

#endif /* SPARSEBACKUP_DISK_H */
