/* nbdkit-sparsebackup-filter: the disk state and its changes (disk.h).
 *
 * The steps of a change (change_begin, change_end), in order:
 *
 *   begin  1. drain and copy before write: with sparsebackup-cbt, take
 *             the read side of DRAIN (backup-begin with a scratch file
 *             and a prepared group backup hold the write side), then,
 *             with a scratch file, save the old data a frozen backup
 *             still needs (frozen_save, through the default export);
 *          2. cbt mark and commit (tracking_mark): recorded, durably in
 *             write-ahead mode, before the change can reach the disk,
 *             and listed in flight;
 *          3. the change tracker (changes_begin): from now on no
 *             learner learns over it;
 *          4. the map: its blocks lose what was known (blockmap_change);
 *          5. the scan cache: its blocks are dropped.
 *   end    1. on failure the map forgets its blocks (unknown);
 *          2. the tracker moves it to the history (changes_end);
 *          3. tracking_end: no longer in flight for a new checkpoint;
 *          4. the drain's read side is released.
 *
 * The lock order of the filter (a lock is only taken while holding
 * those above it, never the other way):
 *
 *   backup_lock (backup.c)         one backup-begin/-end/checkpoint-
 *                                  delete at a time
 *   disk.drain (here)              write side: backup-begin with a
 *                                  scratch file, a prepared group
 *                                  backup (its control client's thread
 *                                  takes and releases it); read side:
 *                                  every change, with sparsebackup-cbt
 *   fz.rw (frozen.c)               write side: activate, release; read
 *                                  side: saves and frozen reads
 *     fz.lock, the cowmap's lock   (leaves)
 *   bg_lock (here)                 calls on the start-up context when
 *                                  the plugin is not fully parallel
 *   ids_lock (tracking.c)          the identities of the checkpoints:
 *                                  a checkpoint change, or a lookup and
 *                                  the map read with it
 *   inflight_lock (tracking.c)     a mark and its listing; a checkpoint
 *                                  and the marks again
 *     the cbt's lock (common/cbt)
 *   disk_lock (here)               creating or resetting the map
 *   the tracker's lock (common/changes), then inside its callbacks
 *     the map's or the scan cache's lock (common/blockmap, scancache)
 *
 * The data paths take only the drain (read), the frozen state's (read),
 * the inflight lock and the leaves below (never ids_lock).
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* pthread_rwlockattr_setkind_np */
#endif
#include <config.h>

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "cleanup.h"
#include "internal.h"
#include "disk.h"
#include "frozen.h"
#include "tracking.h"

#define SCAN_CHUNK (2 * 1024 * 1024)

struct sb_disk disk;

static pthread_rwlock_t drain;
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;

/* The context of the default export opened at start-up (with
 * sparsebackup-cbt), its size and its largest request.  BG_LOCK
 * serialises calls on it unless the plugin is fully parallel.
 */
static nbdkit_next *bg;
static uint64_t bg_size;
static uint32_t bg_max_request;
static bool bg_serialise;
static pthread_mutex_t bg_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- Start-up --------------------------------------------------------- */

int
disk_get_ready (int thread_model)
{
  pthread_rwlockattr_t a;

  /* The tracker exists before any connection, so that no change can be
   * missed by a map created while it is in flight.
   */
  disk.changes = changes_new (CHANGES_HISTORY);
  if (disk.changes == NULL) {
    nbdkit_error ("sparsebackup: cannot create the change tracker: %m");
    return -1;
  }
  /* Writers first: backup-begin must not wait for a stream of changes. */
  pthread_rwlockattr_init (&a);
  pthread_rwlockattr_setkind_np (&a,
                                 PTHREAD_RWLOCK_PREFER_WRITER_NONRECURSIVE_NP);
  pthread_rwlock_init (&drain, &a);
  pthread_rwlockattr_destroy (&a);
  bg_serialise = thread_model < NBDKIT_THREAD_MODEL_PARALLEL;
  return 0;
}

/* What went wrong at start-up, after nbdkit forked: "" if nothing. */
static char startup_error[512];

const char *
disk_startup_error (void)
{
  return startup_error[0] ? startup_error : NULL;
}

/* Open the context of the default export and learn its size. */
static int
open_default_export (nbdkit_backend *backend)
{
  uint32_t minimum = 0, preferred = 0, maximum = 0;
  int64_t size;

  bg = nbdkit_next_context_open (backend, 1, "", 1);
  if (bg == NULL) {
    snprintf (startup_error, sizeof startup_error,
              "sparsebackup-cbt: cannot open the plugin's default export "
              "(export name \"\") at start-up to learn the size of the "
              "disk to track: changed-block tracking needs a plugin that "
              "serves its default export without a client (one that names "
              "its disks after the client's export name, such as ondemand "
              "or file dir=, cannot be tracked)");
    return -1;
  }
  if (bg->prepare (bg) == -1 || (size = bg->get_size (bg)) == -1 ||
      bg->block_size (bg, &minimum, &preferred, &maximum) == -1) {
    snprintf (startup_error, sizeof startup_error,
              "sparsebackup-cbt: cannot get the size of the plugin's "
              "default export at start-up");
    return -1;
  }
  bg_size = size;
  bg_max_request = maximum;
  return 0;
}

/* Failures here cannot stop nbdkit cleanly: it has forked (its parent
 * may be waiting for a --run command that would then wait forever for
 * a server that is gone).  They are logged, and every connection and
 * control command is refused with the message.  What can be checked
 * before the fork is checked at .get_ready (tracking_check).
 */
int
disk_after_fork (nbdkit_backend *backend)
{
  char err[sizeof startup_error];

  if (!tracking_enabled ())
    return 0;
  if (open_default_export (backend) == 0 &&
      tracking_open (bg_size, err, sizeof err) == -1)
    snprintf (startup_error, sizeof startup_error, "%s", err);
  if (startup_error[0])
    nbdkit_error ("%s: no connection will be served", startup_error);
  return 0;
}

void
disk_cleanup (void)
{
  if (bg) {
    bg->finalize (bg);
    nbdkit_next_context_close (bg);
    bg = NULL;
  }
}

void
disk_unload (void)
{
  blockmap_free (disk.bm);
  scancache_free (disk.sc);
  changes_free (disk.changes);
  memset (&disk, 0, sizeof disk);
}

/* ---- Connections ------------------------------------------------------ */

int
disk_check_size (const char *exportname, uint64_t size)
{
  if (startup_error[0]) {
    nbdkit_error ("sparsebackup: export '%s': connection refused: %s",
                  exportname, startup_error);
    return -1;
  }
  if (tracking_enabled () && size != bg_size) {
    nbdkit_error ("sparsebackup: export '%s' has size %" PRIu64 " but the "
                  "cbt file %s tracks a disk of %" PRIu64 " bytes (the "
                  "default export's size at start-up): connection refused",
                  exportname, size, cfg_cbt_path, bg_size);
    return -1;
  }
  return 0;
}

/* The block size of the map for this plugin. */
static int
choose_blksize (nbdkit_next *next, uint32_t *blksize, uint32_t *chunk)
{
  uint32_t minimum = 0, preferred = 0, maximum = 0;
  uint32_t b;

  if (next->block_size (next, &minimum, &preferred, &maximum) == -1)
    return -1;

  if (cfg_block_size) {
    b = cfg_block_size;
    /* Scans and detection work in whole blocks. */
    if (maximum > 0 && b > maximum) {
      nbdkit_error ("sparsebackup-block-size: %" PRIu32 " is larger than "
                    "the plugin's maximum block size %" PRIu32,
                    b, maximum);
      return -1;
    }
  }
  else {
    b = DEFAULT_BLOCK_SIZE;
    if (preferred > b)
      b = preferred <= MAX_BLOCK_SIZE ? preferred : MAX_BLOCK_SIZE;
    if (maximum > 0 && b > maximum)   /* the largest power of 2 that fits */
      b = UINT32_C (1) << (31 - __builtin_clz (maximum));
  }
  /* Requests to the plugin must respect its minimum block size. */
  if (minimum > b && minimum <= MAX_BLOCK_SIZE) {
    VERBOSE ("block size raised from %" PRIu32 " to the plugin's minimum "
             "%" PRIu32, b, minimum);
    b = minimum;
  }
  if (!is_power_of_2 (b) || (maximum > 0 && b > maximum)) {
    nbdkit_error ("sparsebackup: the plugin's block sizes (minimum %" PRIu32
                  ", preferred %" PRIu32 ", maximum %" PRIu32 ") leave no "
                  "usable map block size", minimum, preferred, maximum);
    return -1;
  }
  *blksize = b;

  /* Scanning reads SCAN_CHUNK at a time, within the plugin's maximum. */
  *chunk = SCAN_CHUNK;
  if (maximum > 0 && maximum < *chunk)
    *chunk = round_down (maximum, b);
  if (*chunk < b)
    *chunk = b;
  return 0;
}

/* The disk changed size: the map and the cache forget everything,
 * inside a change of the whole disk so that no learner from before can
 * teach the resized map.  disk_lock held.
 */
static int
reset_for_size (uint64_t size)
{
  uint64_t ticket;

  VERBOSE ("the disk changed size from %" PRIu64 " to %" PRIu64
           ": the map forgets everything", blockmap_size (disk.bm), size);
  changes_begin (disk.changes, 0, UINT64_MAX, &ticket);
  blockmap_resize (disk.bm, size);
  if (disk.sc)
    scancache_drop (disk.sc, 0, UINT64_MAX);
  changes_end (disk.changes, ticket);
  return 0;
}

/* Create the map and the scan cache.  disk_lock held. */
static int
create_map (nbdkit_next *next, uint64_t size)
{
  uint32_t blksize, chunk;
  struct blockmap *bm;
  struct scancache *sc = NULL;

  if (choose_blksize (next, &blksize, &chunk) == -1)
    return -1;
  bm = blockmap_new (size, blksize, disk.changes, cfg_map_memory);
  if (bm == NULL) {
    nbdkit_error ("sparsebackup: cannot create the block map: %m");
    return -1;
  }
  if (cfg_scan_cache > 0) {
    sc = scancache_new (cfg_scan_cache, blksize, disk.changes);
    if (sc == NULL) {
      nbdkit_error ("sparsebackup: cannot create the scan cache: %m");
      blockmap_free (bm);
      return -1;
    }
  }
  disk.blksize = blksize;
  disk.scan_chunk = chunk;
  disk.scan_max = MAX (cfg_scan_max, (uint64_t) blksize);
  __atomic_store_n (&disk.sc, sc, __ATOMIC_RELEASE);
  __atomic_store_n (&disk.bm, bm, __ATOMIC_RELEASE);
  VERBOSE ("new map, size %" PRIu64 ", block size %" PRIu32, size, blksize);
  return 0;
}

int
disk_prepare (nbdkit_next *next, uint64_t size)
{
  SCOPED_MUTEX (&disk_lock);

  if (disk.bm == NULL)
    return create_map (next, size);
  if (blockmap_size (disk.bm) != size)
    return reset_for_size (size);
  return 0;
}

/* ---- Changes -----------------------------------------------------------
 *
 * Every write, trim or zero of every connection, whatever its export
 * name, goes through change_begin/change_end: most plugins serve one
 * disk under every name, so any of them may change what the map
 * describes and what a backup must copy.
 */

/* Step 1 of change_begin: the drain (with sparsebackup-cbt: a backup
 * or a group backup may hold the changes), and copy before write (with
 * a scratch file).
 */
static int
save_for_backup (struct sb_change *c, int *err)
{
  if (!tracking_enabled ())
    return 0;
  pthread_rwlock_rdlock (&drain);
  c->drained = true;
  if (!frozen_enabled ())
    return 0;
  assert (bg != NULL);
  if (bg_serialise) {
    SCOPED_MUTEX (&bg_lock);
    return frozen_save (bg, bg_max_request, c->offset, c->count, err);
  }
  return frozen_save (bg, bg_max_request, c->offset, c->count, err);
}

static void
release_drain (struct sb_change *c)
{
  if (c->drained)
    pthread_rwlock_unlock (&drain);
  c->drained = false;
}

int
change_begin (struct sb_change *c, bool own, uint64_t offset,
              uint64_t count, enum bm_state newstate, int *err)
{
  struct blockmap *bm;
  struct scancache *sc;

  memset (c, 0, sizeof *c);
  c->offset = offset;
  c->count = count;
  if (save_for_backup (c, err) == -1) {
    release_drain (c);
    return -1;
  }
  if (tracking_mark (offset, count, err) == -1) {
    release_drain (c);
    return -1;
  }
  c->tracked = true;
  changes_begin (disk.changes, offset, count, &c->ticket);
  /* After changes_begin: a map created from now on hears of it through
   * the tracker, one created before is edited here.
   */
  bm = __atomic_load_n (&disk.bm, __ATOMIC_ACQUIRE);
  sc = __atomic_load_n (&disk.sc, __ATOMIC_ACQUIRE);
  /* What a change through another export name did is not known to the
   * map: TRIMMED (never learnt zero from the plugin's extents).
   */
  if (bm)
    blockmap_change (bm, offset, count, own ? newstate : BM_TRIMMED);
  if (sc)
    scancache_drop (sc, offset, count);
  return 0;
}

void
change_end (struct sb_change *c, bool ok)
{
  struct blockmap *bm = __atomic_load_n (&disk.bm, __ATOMIC_ACQUIRE);

  assert (c->ticket != 0);
  if (!ok && bm)
    blockmap_forget (bm, c->offset, c->count);
  changes_end (disk.changes, c->ticket);
  if (c->tracked)
    tracking_end (c->offset, c->count);
  release_drain (c);
  c->ticket = 0;
}

int
disk_drain (const struct timespec *deadline)
{
  int r;

  assert (tracking_enabled ());
  r = pthread_rwlock_clockwrlock (&drain, CLOCK_MONOTONIC, deadline);
  if (r != 0) {
    errno = r;
    return -1;
  }
  return 0;
}

void
disk_undrain (void)
{
  pthread_rwlock_unlock (&drain);
}
