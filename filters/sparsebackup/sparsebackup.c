/* nbdkit-sparsebackup-filter: keep NBD copies sparse.
 *
 * This file: configuration, the disk state (change tracker, map, scan
 * cache), connections, changes and capabilities.  The write side is in
 * write.c, the read side (pread, extents, cache, scanning) in read.c,
 * statistics in stats.c, the cache of scanned data in scancache.c.  See
 * doc/design.md for the data paths and the map protocol, and the man
 * page for the parameters.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "sparsebackup.h"
#include "cbt-glue.h"
#include "frozen.h"

/* -D sparsebackup.verbose=1: log decisions. */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_verbose = 0;
/* -D sparsebackup.stats=1: print statistics at unload. */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_stats = 0;

#define DEFAULT_BLOCK_SIZE 4096
#define MIN_BLOCK_SIZE 512
#define MAX_BLOCK_SIZE (2 * 1024 * 1024)
#define SCAN_CHUNK (2 * 1024 * 1024)

uint32_t cfg_block_size = 0;
enum detect_zeroes_mode cfg_detect_zeroes = DZ_UNMAP;
enum no_hole_mode cfg_no_hole = NH_HONOUR;
enum scan_mode cfg_scan = SCAN_AUTO;
uint64_t cfg_scan_max = 32 * 1024 * 1024;
uint64_t cfg_scan_cache = 64 * 1024 * 1024;
uint64_t cfg_map_memory = 64 * 1024 * 1024;
int64_t cfg_min_zero_extent = -1;
static char *scan_max_str = NULL;

#define MIN_MAP_MEMORY (64 * 1024)

/* nbdkit refuses data requests larger than this (MAX_REQUEST_SIZE). */
#define MAX_REQUEST (64 * 1024 * 1024)

struct sb_disk disk;

/* Taken to create the map and to reset it when the disk changes size,
 * in .prepare only; the data paths never take it.
 */
static pthread_mutex_t disk_lock = PTHREAD_MUTEX_INITIALIZER;

/* ---- Configuration ---------------------------------------------------- */

static int
parse_size_key (const char *key, const char *value, int64_t *r)
{
  int64_t v = nbdkit_parse_size (value);

  if (v == -1) {
    nbdkit_error ("%s: '%s' is not a valid size", key, value);
    return -1;
  }
  *r = v;
  return 0;
}

int
parse_choice (const char *key, const char *value,
              const struct sb_choice *choices, int *r)
{
  char list[256] = "";
  size_t i, len = 0;

  for (i = 0; choices[i].name != NULL; ++i) {
    if (strcmp (value, choices[i].name) == 0) {
      *r = choices[i].value;
      return 0;
    }
    if (!choices[i].alias && len < sizeof list)
      len += snprintf (list + len, sizeof list - len, "%s%s",
                       len ? ", " : "", choices[i].name);
  }
  nbdkit_error ("%s: '%s' is not one of %s", key, value, list);
  return -1;
}

static int
sparsebackup_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                     const char *key, const char *value)
{
  int64_t v;

  if (strcmp (key, "sparsebackup-block-size") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v < MIN_BLOCK_SIZE || v > MAX_BLOCK_SIZE || !is_power_of_2 (v)) {
      nbdkit_error ("%s: '%s' is not a power of 2 between 512 and 2M",
                    key, value);
      return -1;
    }
    cfg_block_size = v;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-detect-zeroes") == 0) {
    static const struct sb_choice c[] = {
      { "unmap", DZ_UNMAP, false }, { "on", DZ_ON, false },
      { "off", DZ_OFF, false }, { NULL, 0, false },
    };
    int r;

    if (parse_choice (key, value, c, &r) == -1)
      return -1;
    cfg_detect_zeroes = r;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-no-hole") == 0) {
    static const struct sb_choice c[] = {
      { "honour", NH_HONOUR, false }, { "honor", NH_HONOUR, true },
      { "ignore", NH_IGNORE, false }, { NULL, 0, false },
    };
    int r;

    if (parse_choice (key, value, c, &r) == -1)
      return -1;
    cfg_no_hole = r;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-scan") == 0) {
    static const struct sb_choice c[] = {
      { "auto", SCAN_AUTO, false }, { "always", SCAN_ALWAYS, false },
      { "never", SCAN_NEVER, false }, { NULL, 0, false },
    };
    int r;

    if (parse_choice (key, value, c, &r) == -1)
      return -1;
    cfg_scan = r;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-scan-max") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v < MIN_BLOCK_SIZE) {
      nbdkit_error ("%s: '%s' is smaller than the block size", key, value);
      return -1;
    }
    cfg_scan_max = v;
    free (scan_max_str);
    scan_max_str = strdup (value);
    if (scan_max_str == NULL) {
      nbdkit_error ("strdup: %m");
      return -1;
    }
    return 0;
  }
  else if (strcmp (key, "sparsebackup-scan-cache") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    cfg_scan_cache = v;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-map-memory") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v < MIN_MAP_MEMORY) {
      nbdkit_error ("%s: '%s' is smaller than the minimum, 64K", key, value);
      return -1;
    }
    cfg_map_memory = v;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-min-zero-extent") == 0) {
    if (strcmp (value, "auto") == 0)
      cfg_min_zero_extent = -1;
    else if (parse_size_key (key, value, &cfg_min_zero_extent) == -1)
      return -1;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-statsfile") == 0) {
    if (value[0] == '\0') {
      nbdkit_error ("%s: '%s' is not a file name", key, value);
      return -1;
    }
    return stats_open (value);
  }
  else if ((v = cbt_config (key, value)) != 1)
    return v;
  else if ((v = frozen_config (key, value)) != 1)
    return v;
  else if (strncmp (key, "sparsebackup-", 13) == 0) {
    nbdkit_error ("%s: unknown sparsebackup parameter (value '%s')",
                  key, value);
    return -1;
  }
  else
    return next (nxdata, key, value);
}

static int
sparsebackup_config_complete (nbdkit_next_config_complete *next,
                              nbdkit_backend *nxdata)
{
  /* With the automatic block size, the smallest it can be is 4K. */
  uint32_t b = cfg_block_size ? cfg_block_size : DEFAULT_BLOCK_SIZE;

  if (cfg_scan_max < b) {
    nbdkit_error ("sparsebackup-scan-max: '%s' is smaller than "
                  "the block size (%" PRIu32 ")",
                  scan_max_str ? scan_max_str : "?", b);
    return -1;
  }
  if (cbt_config_complete () == -1 || frozen_config_complete () == -1)
    return -1;
  return next (nxdata);
}

#define sparsebackup_config_help \
  "sparsebackup-block-size=<SIZE> Block size of the map (default 4K or the\n" \
  "                               plugin's preferred block size, max 2M).\n" \
  "sparsebackup-detect-zeroes=unmap|on|off\n" \
  "                               Turn zero blocks of writes into zero\n" \
  "                               requests (default unmap).\n" \
  "sparsebackup-no-hole=honour|ignore\n" \
  "                               Honour NO_HOLE on zero requests (default).\n" \
  "sparsebackup-scan=auto|always|never\n" \
  "                               Read blocks to learn which are zero\n" \
  "                               (default auto).\n" \
  "sparsebackup-scan-max=<SIZE>   Bytes scanned per extents request (32M).\n" \
  "sparsebackup-scan-cache=<SIZE> Cache of scanned data, 0 disables (64M).\n" \
  "sparsebackup-map-memory=<SIZE> Memory budget of the map (64M).\n" \
  "sparsebackup-min-zero-extent=<SIZE>|auto\n" \
  "                               Shorter zero runs between data are\n" \
  "                               reported as data (auto: 256K for REQ_ONE\n" \
  "                               clients, else exact).\n" \
  "sparsebackup-statsfile=<FILE>  Write statistics to FILE at exit.\n" \
  "sparsebackup-cbt=<FILE>        Record every change in FILE (changed-block\n" \
  "                               tracking, delta views @since:CHECKPOINT).\n" \
  "sparsebackup-cbt-granularity=<SIZE>\n" \
  "                               Bytes per tracked granule (64K).\n" \
  "sparsebackup-cbt-mode=in-use|write-ahead\n" \
  "                               Durability of the record (in-use).\n" \
  "sparsebackup-cbt-reset=true    Discard what FILE holds.\n" \
  "sparsebackup-cbt-id=<STRING>   Identity of the disk stored in FILE.\n" \
  "sparsebackup-control=<SOCKET>  Serve the control protocol on SOCKET.\n" \
  "sparsebackup-scratch=<FILE>    Point-in-time backups (@frozen): save\n" \
  "                               the old data of changes in FILE.\n" \
  "sparsebackup-scratch-size=<SIZE>\n" \
  "                               At most SIZE bytes in FILE (no limit).\n" \
  "sparsebackup-scratch-error=break-backup|fail-write\n" \
  "                               When FILE is full or fails (break-backup)."


static int
sparsebackup_get_ready (int thread_model)
{
  nbdkit_debug ("sparsebackup: version %s", PACKAGE_VERSION);
  VERBOSE ("ready, thread model %d, block size %" PRIu32 " (0 = auto), "
           "detect-zeroes %d, no-hole %d, scan %d, scan-max %" PRIu64 ", "
           "scan-cache %" PRIu64 ", map-memory %" PRIu64,
           thread_model, cfg_block_size, (int) cfg_detect_zeroes,
           (int) cfg_no_hole, (int) cfg_scan, cfg_scan_max, cfg_scan_cache,
           cfg_map_memory);

  /* The tracker exists before any connection, so that no change can be
   * missed by a map created while it is in flight.
   */
  disk.changes = changes_new (CHANGES_HISTORY);
  if (disk.changes == NULL) {
    nbdkit_error ("sparsebackup: cannot create the change tracker: %m");
    return -1;
  }
  if (cbt_get_ready () == -1 || frozen_get_ready () == -1 ||
      control_open () == -1)
    return -1;
  return 0;
}

static int
sparsebackup_after_fork (nbdkit_backend *nxdata)
{
  return control_start ();
}

static void
sparsebackup_unload (void)
{
  int r = stats_close ();

  control_stop ();
  frozen_unload ();
  cbt_unload ();
  blockmap_free (disk.bm);
  scancache_free (disk.sc);
  changes_free (disk.changes);
  memset (&disk, 0, sizeof disk);
  free (scan_max_str);
  scan_max_str = NULL;
  if (r == -1) {
    /* nbdkit ignores errors at unload: never exit 0 without the
     * statistics the operator asked for.
     */
    fflush (stderr);
    _exit (EXIT_FAILURE);
  }
}

/* ---- Changes -----------------------------------------------------------
 *
 * Every write, trim or zero of every connection, whatever its export
 * name, goes through change_begin/change_end: most plugins serve one
 * disk under every name, so any of them may change what the map
 * describes.
 */

int
change_begin (struct sb_change *c, nbdkit_next *next, bool own,
              uint64_t offset, uint64_t count, enum bm_state newstate,
              int *err)
{
  struct blockmap *bm;
  struct scancache *sc;

  c->offset = offset;
  c->count = count;
  if (frozen_change_begin (next, offset, count, err) == -1)
    return -1;
  if (changes_begin (disk.changes, offset, count, &c->ticket) == -1) {
    *err = errno;
    frozen_change_end ();
    return -1;
  }
  /* After changes_begin: a map created from now on hears of it through
   * the tracker, one created before is edited here.
   */
  bm = __atomic_load_n (&disk.bm, __ATOMIC_ACQUIRE);
  sc = __atomic_load_n (&disk.sc, __ATOMIC_ACQUIRE);
  if (bm)
    blockmap_change (bm, offset, count, own ? newstate : BM_UNKNOWN);
  if (sc)
    scancache_drop (sc, offset, count);
  return 0;
}

void
change_end (struct sb_change *c, bool ok)
{
  struct blockmap *bm = __atomic_load_n (&disk.bm, __ATOMIC_ACQUIRE);

  if (!ok && bm)
    blockmap_forget (bm, c->offset, c->count);
  changes_end (disk.changes, c->ticket);
  cbt_change_end (c->offset, c->count);
  frozen_change_end ();
  c->ticket = 0;
}

/* ---- Connections -------------------------------------------------------- */

static void *
sparsebackup_open (nbdkit_next_open *next, nbdkit_context *nxdata,
                   int readonly, const char *exportname, int is_tls)
{
  struct sb_handle *h;
  bool frozen = frozen_is_view (exportname);
  bool view = frozen || cbt_is_view (exportname);

  /* A delta view reads the default export, read-only. */
  if (next (nxdata, view ? 1 : readonly, view ? "" : exportname) == -1)
    return NULL;

  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->exportname = strdup (exportname);
  if (h->exportname == NULL) {
    nbdkit_error ("strdup: %m");
    free (h);
    return NULL;
  }
  h->view = view;
  h->frozen = frozen;
  if (strncmp (exportname, FROZEN_SINCE_PREFIX,
               strlen (FROZEN_SINCE_PREFIX)) == 0)
    h->since = h->exportname + strlen (FROZEN_SINCE_PREFIX);
  else if (!frozen && view)
    h->since = h->exportname + strlen (SINCE_PREFIX);
  return h;
}

static void
sparsebackup_close (void *handle)
{
  struct sb_handle *h = handle;

  free (h->exportname);
  free (h);
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

/* Create the disk's map (first connection to the default export), or
 * reset it if the disk changed size.  disk_lock held.
 */
static int
disk_prepare (nbdkit_next *next, uint64_t size)
{
  uint32_t blksize, chunk;
  struct blockmap *bm;
  struct scancache *sc = NULL;

  if (disk.bm) {
    struct sb_change c;
    int err;

    if (blockmap_size (disk.bm) == size)
      return 0;
    VERBOSE ("the disk changed size from %" PRIu64 " to %" PRIu64
             ": the map forgets everything", blockmap_size (disk.bm), size);
    /* A change of the whole disk: no learner from before may teach the
     * resized map.
     */
    if (changes_begin (disk.changes, 0, UINT64_MAX, &c.ticket) == -1) {
      err = errno;
      nbdkit_error ("sparsebackup: cannot record the change of size: %s",
                    strerror (err));
      return -1;
    }
    blockmap_resize (disk.bm, size);
    if (disk.sc)
      scancache_drop (disk.sc, 0, UINT64_MAX);
    changes_end (disk.changes, c.ticket);
    cbt_change_end (0, UINT64_MAX);
    return 0;
  }

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

static int
sparsebackup_prepare (nbdkit_next *next, void *handle, int readonly)
{
  struct sb_handle *h = handle;
  int64_t size;
  int r;

  size = next->get_size (next);
  if (size == -1)
    return -1;
  h->size = size;

  if (h->view) {
    pthread_mutex_lock (&disk_lock);
    if (h->frozen)
      r = cbt_prepare (h->exportname, size) == -1 ? -1 :
        frozen_view_prepare (h);
    else
      r = cbt_view_prepare (h->exportname, size);
    pthread_mutex_unlock (&disk_lock);
    return r;
  }
  /* Every connection, whatever its name, may change the disk: the cbt
   * file is opened by the first one (cbt-glue.c).
   */
  pthread_mutex_lock (&disk_lock);
  r = cbt_prepare (h->exportname, size);
  pthread_mutex_unlock (&disk_lock);
  if (r == -1)
    return -1;

  /* Only the default export uses the map.  Other names (views beginning
   * with '@' included: the filter owns none yet) are passed through, but
   * their changes still go through the tracker.
   */
  if (h->exportname[0] != '\0') {
    nbdkit_debug ("sparsebackup: export '%s' is not the default export: "
                  "passed through (no map, no skipping)", h->exportname);
    return 0;
  }

  pthread_mutex_lock (&disk_lock);
  r = disk_prepare (next, size);
  pthread_mutex_unlock (&disk_lock);
  if (r == -1)
    return -1;
  h->bm = disk.bm;
  h->sc = disk.sc;
  return 0;
}

/* ---- Capabilities ------------------------------------------------------ */

static int
sparsebackup_block_size (nbdkit_next *next, void *handle,
                         uint32_t *minimum, uint32_t *preferred,
                         uint32_t *maximum)
{
  struct sb_handle *h = handle;

  if (next->block_size (next, minimum, preferred, maximum) == -1)
    return -1;
  if (h->bm == NULL)
    return 0;

  /* Advertise the map's block size as preferred: whole-block writes let
   * zero detection work on every block.  Never advertise more than
   * nbdkit serves in one request.
   */
  if (*minimum == 0) {
    *minimum = 1;
    *preferred = disk.blksize;
    *maximum = MAX_REQUEST;
  }
  else {
    *maximum = MIN (*maximum, (uint32_t) MAX_REQUEST);
    if (*preferred < disk.blksize && disk.blksize <= *maximum)
      *preferred = disk.blksize;
    *preferred = MIN (*preferred, *maximum);
  }
  return 0;
}

static int
sparsebackup_can_write (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;

  if (h->view)
    return 0;                   /* delta views are read-only */
  return next->can_write (next);
}

static int
sparsebackup_can_zero (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;
  int r;

  if (h->bm == NULL)
    return next->can_zero (next);
  r = next->can_write (next);
  if (r == -1)
    return -1;
  /* Zero requests are always handled here: skipped when known zero,
   * emulated with writes if the plugin cannot zero.
   */
  return r ? NBDKIT_ZERO_NATIVE : NBDKIT_ZERO_NONE;
}

static int
sparsebackup_can_fast_zero (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;

  if (h->bm == NULL)
    return next->can_fast_zero (next);
  /* Honest: known-zero ranges succeed at once, the rest is passed down
   * with FAST_ZERO or fails at once with ENOTSUP.
   */
  return 1;
}

static int
sparsebackup_can_extents (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;

  if (h->bm == NULL && !h->view)
    return next->can_extents (next);
  return 1;
}

static int
sparsebackup_can_cache (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;

  if (h->bm == NULL)
    return next->can_cache (next);
  return NBDKIT_CACHE_NATIVE;
}

static int
sparsebackup_can_multi_conn (nbdkit_next *next, void *handle)
{
  /* The map and the cache are shared by all connections. */
  return next->can_multi_conn (next);
}

static int
sparsebackup_list_exports (nbdkit_next_list_exports *next,
                           nbdkit_backend *nxdata, int readonly, int is_tls,
                           struct nbdkit_exports *exports)
{
  if (next (nxdata, readonly, exports) == -1)
    return -1;
  if (frozen_list_exports (exports) == -1)
    return -1;
  return cbt_list_exports (exports);
}

static struct nbdkit_filter filter = {
  .name              = "sparsebackup",
  .longname          = "nbdkit sparsebackup filter",
  .unload            = sparsebackup_unload,
  .config            = sparsebackup_config,
  .config_complete   = sparsebackup_config_complete,
  .config_help       = sparsebackup_config_help,
  .get_ready         = sparsebackup_get_ready,
  .after_fork        = sparsebackup_after_fork,
  .list_exports      = sparsebackup_list_exports,
  .open              = sparsebackup_open,
  .prepare           = sparsebackup_prepare,
  .close             = sparsebackup_close,
  .block_size        = sparsebackup_block_size,
  .can_write         = sparsebackup_can_write,
  .can_zero          = sparsebackup_can_zero,
  .can_fast_zero     = sparsebackup_can_fast_zero,
  .can_extents       = sparsebackup_can_extents,
  .can_cache         = sparsebackup_can_cache,
  .can_multi_conn    = sparsebackup_can_multi_conn,
  .pread             = sparsebackup_pread,
  .pwrite            = sparsebackup_pwrite,
  .zero              = sparsebackup_zero,
  .trim              = sparsebackup_trim,
  .extents           = sparsebackup_extents,
  .cache             = sparsebackup_cache,
};

NBDKIT_REGISTER_FILTER (filter)
