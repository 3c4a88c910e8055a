/* nbdkit-sparsebackup-filter: keep NBD copies sparse.
 *
 * This file: configuration, the per-export block maps, connection
 * lifecycle, capabilities and statistics.  The write side is in write.c,
 * the read side (pread, extents, cache, scanning) in read.c, the cache of
 * scanned data in scancache.c.  See doc/filter-spec.md and the man page.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "sparsebackup.h"

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
const char *cfg_statsfile = NULL;
static char *statsfile_owned = NULL;
static char *scan_max_str = NULL;

struct sb_stats stats;

/* Live export states.  Retired ones (replaced because the size changed)
 * stay alive until their last connection closes.
 */
static pthread_mutex_t exports_lock = PTHREAD_MUTEX_INITIALIZER;
static struct sb_export *exports = NULL;  /* all maps, retired ones too */
static uint64_t export_clock = 0;         /* for least recently used */

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

static int
sparsebackup_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                     const char *key, const char *value)
{
  int64_t v;

  if (strcmp (key, "sparsebackup-block-size") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v < MIN_BLOCK_SIZE || v > MAX_BLOCK_SIZE || (v & (v - 1)) != 0) {
      nbdkit_error ("%s: '%s' is not a power of 2 between 512 and 2M",
                    key, value);
      return -1;
    }
    cfg_block_size = v;
    return 0;
  }
  else if (strcmp (key, "sparsebackup-detect-zeroes") == 0) {
    if (strcmp (value, "unmap") == 0)
      cfg_detect_zeroes = DZ_UNMAP;
    else if (strcmp (value, "on") == 0)
      cfg_detect_zeroes = DZ_ON;
    else if (strcmp (value, "off") == 0)
      cfg_detect_zeroes = DZ_OFF;
    else {
      nbdkit_error ("%s: '%s' is not one of unmap, on, off", key, value);
      return -1;
    }
    return 0;
  }
  else if (strcmp (key, "sparsebackup-no-hole") == 0) {
    if (strcmp (value, "honour") == 0 || strcmp (value, "honor") == 0)
      cfg_no_hole = NH_HONOUR;
    else if (strcmp (value, "ignore") == 0)
      cfg_no_hole = NH_IGNORE;
    else {
      nbdkit_error ("%s: '%s' is not one of honour, ignore", key, value);
      return -1;
    }
    return 0;
  }
  else if (strcmp (key, "sparsebackup-scan") == 0) {
    if (strcmp (value, "auto") == 0)
      cfg_scan = SCAN_AUTO;
    else if (strcmp (value, "always") == 0)
      cfg_scan = SCAN_ALWAYS;
    else if (strcmp (value, "never") == 0)
      cfg_scan = SCAN_NEVER;
    else {
      nbdkit_error ("%s: '%s' is not one of auto, always, never", key, value);
      return -1;
    }
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
  else if (strcmp (key, "sparsebackup-statsfile") == 0) {
    if (value[0] == '\0') {
      nbdkit_error ("%s: '%s' is not a file name", key, value);
      return -1;
    }
    free (statsfile_owned);
    statsfile_owned = nbdkit_absolute_path (value);
    if (statsfile_owned == NULL)
      return -1;
    cfg_statsfile = statsfile_owned;
    return 0;
  }
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
  return next (nxdata);
}

#define sparsebackup_config_help \
  "sparsebackup-block-size=SIZE   Block size of the map (default 4K or the\n" \
  "                               plugin's preferred block size, max 2M).\n" \
  "sparsebackup-detect-zeroes=unmap|on|off\n" \
  "                               Turn zero blocks of writes into zero\n" \
  "                               requests (default unmap).\n" \
  "sparsebackup-no-hole=honour|ignore\n" \
  "                               Honour NO_HOLE on zero requests (default).\n" \
  "sparsebackup-scan=auto|always|never\n" \
  "                               Read blocks to learn which are zero\n" \
  "                               (default auto).\n" \
  "sparsebackup-scan-max=SIZE     Bytes scanned per extents request (32M).\n" \
  "sparsebackup-scan-cache=SIZE   Cache of scanned data, 0 disables (64M).\n" \
  "sparsebackup-statsfile=FILE    Write statistics to FILE at unload."

static int
sparsebackup_get_ready (int thread_model)
{
  VERBOSE ("ready, thread model %d, block size %" PRIu32 " (0 = auto), "
           "detect-zeroes %d, no-hole %d, scan %d, scan-max %" PRIu64 ", "
           "scan-cache %" PRIu64,
           thread_model, cfg_block_size, (int) cfg_detect_zeroes,
           (int) cfg_no_hole, (int) cfg_scan, cfg_scan_max, cfg_scan_cache);
  return 0;
}

/* ---- Statistics -------------------------------------------------------- */

#define LOAD(field) __atomic_load_n (&stats.field, __ATOMIC_RELAXED)

static void
print_stats (FILE *fp, uint64_t map_runs, uint64_t map_memory)
{
  fprintf (fp, "write-data-bytes: %" PRIu64 "\n", LOAD (write_data_bytes));
  fprintf (fp, "write-zero-bytes: %" PRIu64 "\n", LOAD (write_zero_bytes));
  fprintf (fp, "zero-bytes: %" PRIu64 "\n", LOAD (zero_bytes));
  fprintf (fp, "zero-skipped-bytes: %" PRIu64 "\n",
           LOAD (zero_skipped_bytes));
  fprintf (fp, "requests-avoided: %" PRIu64 "\n", LOAD (requests_avoided));
  fprintf (fp, "read-bytes: %" PRIu64 "\n", LOAD (read_bytes));
  fprintf (fp, "read-map-bytes: %" PRIu64 "\n", LOAD (read_map_bytes));
  fprintf (fp, "read-cache-bytes: %" PRIu64 "\n", LOAD (read_cache_bytes));
  fprintf (fp, "plugin-read-bytes: %" PRIu64 "\n", LOAD (plugin_read_bytes));
  fprintf (fp, "scan-bytes: %" PRIu64 "\n", LOAD (scan_bytes));
  fprintf (fp, "extents-calls: %" PRIu64 "\n", LOAD (extents_calls));
  fprintf (fp, "map-runs: %" PRIu64 "\n", map_runs);
  fprintf (fp, "map-memory: %" PRIu64 "\n", map_memory);
}

static void
sparsebackup_unload (void)
{
  struct sb_export *ex, *nx;
  uint64_t map_runs = 0, map_memory = 0;

  for (ex = exports; ex != NULL; ex = ex->next) {
    struct blockmap_stats bs;
    blockmap_get_stats (ex->bm, &bs);
    map_runs += bs.runs;
    map_memory += bs.memory;
    if (sparsebackup_debug_stats) {
      nbdkit_debug ("sparsebackup: export '%s': map of %" PRIu64 " bytes: "
                    "unknown %" PRIu64 ", allocated %" PRIu64 ", "
                    "data %" PRIu64 ", zero %" PRIu64,
                    ex->name, ex->size,
                    bs.bytes[BM_UNKNOWN], bs.bytes[BM_ALLOCATED],
                    bs.bytes[BM_DATA], bs.bytes[BM_ZERO]);
      if (ex->sc) {
        struct scancache_stats cs;
        scancache_get_stats (ex->sc, &cs);
        nbdkit_debug ("sparsebackup: export '%s': scan cache: "
                      "%" PRIu64 " entries, %" PRIu64 " bytes, "
                      "%" PRIu64 " inserted, %" PRIu64 " refused, "
                      "%" PRIu64 " evicted",
                      ex->name, cs.entries, cs.bytes,
                      cs.inserted, cs.refused, cs.evicted);
      }
    }
  }

  if (sparsebackup_debug_stats) {
    char *s = NULL;
    size_t len = 0;
    FILE *fp = open_memstream (&s, &len);
    if (fp) {
      char *line, *saveptr = NULL;
      print_stats (fp, map_runs, map_memory);
      fclose (fp);
      for (line = strtok_r (s, "\n", &saveptr); line != NULL;
           line = strtok_r (NULL, "\n", &saveptr))
        nbdkit_debug ("sparsebackup: stats: %s", line);
    }
    free (s);
  }

  if (cfg_statsfile) {
    FILE *fp = fopen (cfg_statsfile, "w");
    if (fp == NULL)
      nbdkit_error ("sparsebackup-statsfile: %s: %m", cfg_statsfile);
    else {
      print_stats (fp, map_runs, map_memory);
      if (fclose (fp) == EOF)
        nbdkit_error ("sparsebackup-statsfile: %s: %m", cfg_statsfile);
    }
  }

  for (ex = exports; ex != NULL; ex = nx) {
    nx = ex->next;
    blockmap_free (ex->bm);
    scancache_free (ex->sc);
    free (ex->name);
    free (ex);
  }
  exports = NULL;
  free (statsfile_owned);
  statsfile_owned = NULL;
  cfg_statsfile = NULL;
  free (scan_max_str);
  scan_max_str = NULL;
}

/* ---- Connections -------------------------------------------------------- */

static void *
sparsebackup_open (nbdkit_next_open *next, nbdkit_context *nxdata,
                   int readonly, const char *exportname, int is_tls)
{
  struct sb_handle *h;

  if (next (nxdata, readonly, exportname) == -1)
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
  return h;
}

static void
export_free (struct sb_export *ex)
{
  blockmap_free (ex->bm);
  scancache_free (ex->sc);
  free (ex->name);
  free (ex);
}

/* Drop a reference (exports_lock held).  A retired map is freed with its
 * last reference; others stay for later connections.
 */
static void
export_unref (struct sb_export *ex)
{
  struct sb_export **pp;

  ex->refs--;
  if (!ex->retired || ex->refs > 0)
    return;
  for (pp = &exports; *pp != NULL; pp = &(*pp)->next) {
    if (*pp == ex) {
      *pp = ex->next;
      break;
    }
  }
  export_free (ex);
}

static void
sparsebackup_close (void *handle)
{
  struct sb_handle *h = handle;

  if (h->ex) {
    pthread_mutex_lock (&exports_lock);
    export_unref (h->ex);
    pthread_mutex_unlock (&exports_lock);
  }
  free (h->exportname);
  free (h);
}

/* ---- Changes: every map sees every change ----------------------------
 *
 * The plugin may serve one disk under several export names (most plugins
 * ignore the name), and a disk that changed size has an old map still in
 * use by old connections.  A write, trim or zero through any of them can
 * change what another map describes, so every change is applied to every
 * map in the list: writes and trims clear zero state (rounded outward)
 * and are recorded as in flight in every map before they are issued, and
 * every scan cache drops the range.  Zero knowledge is only ever learnt
 * by the map of the connection that saw it.
 */

void
change_begin (struct sb_change *c, struct sb_export *own,
              uint64_t offset, uint64_t count,
              bool track, enum bm_state newstate)
{
  struct sb_export *ex;

  c->n = 0;
  c->track = track;
  pthread_mutex_lock (&exports_lock);
  for (ex = exports; ex != NULL && c->n < MAX_EXPORTS; ex = ex->next) {
    ex->refs++;
    c->e[c->n].ex = ex;
    c->e[c->n].sc_ticket =
      ex->sc ? scancache_invalidate_begin (ex->sc, offset, count) : 0;
    c->e[c->n].bm_ticket =
      track ? blockmap_write_begin (ex->bm, offset, count,
                                    ex == own ? newstate : BM_UNKNOWN) : 0;
    c->n++;
  }
  pthread_mutex_unlock (&exports_lock);
}

void
change_end (struct sb_change *c, bool ok)
{
  unsigned i;

  for (i = 0; i < c->n; ++i) {
    struct sb_export *ex = c->e[i].ex;
    if (c->track)
      blockmap_write_end (ex->bm, c->e[i].bm_ticket, ok);
    if (ex->sc)
      scancache_invalidate_end (ex->sc, c->e[i].sc_ticket);
  }
  pthread_mutex_lock (&exports_lock);
  for (i = 0; i < c->n; ++i)
    export_unref (c->e[i].ex);
  pthread_mutex_unlock (&exports_lock);
  c->n = 0;
}

void
change_forget (struct sb_change *c, uint64_t offset, uint64_t count)
{
  unsigned i;

  for (i = 0; i < c->n; ++i)
    blockmap_forget (c->e[i].ex->bm, offset, count);
}

/* The block size of the map for this plugin. */
static int
choose_blksize (nbdkit_next *next, uint32_t *blksize, uint32_t *chunk)
{
  uint32_t minimum = 0, preferred = 0, maximum = 0;
  uint32_t b;

  if (next->block_size (next, &minimum, &preferred, &maximum) == -1)
    return -1;

  if (cfg_block_size)
    b = cfg_block_size;
  else {
    b = DEFAULT_BLOCK_SIZE;
    if (preferred > b)
      b = preferred <= MAX_BLOCK_SIZE ? preferred : MAX_BLOCK_SIZE;
  }
  /* Requests to the plugin must respect its minimum block size. */
  if (minimum > b && minimum <= MAX_BLOCK_SIZE) {
    VERBOSE ("block size raised from %" PRIu32 " to the plugin's minimum "
             "%" PRIu32, b, minimum);
    b = minimum;
  }
  *blksize = b;

  /* Scanning reads SCAN_CHUNK at a time, within the plugin's maximum. */
  *chunk = SCAN_CHUNK;
  if (maximum > 0 && maximum < *chunk)
    *chunk = maximum & ~(b - 1);
  if (*chunk < b)
    *chunk = b;
  return 0;
}

/* Find or create the shared state of this export.  The global lock is
 * only taken here and in .close.
 */
static int
sparsebackup_prepare (nbdkit_next *next, void *handle, int readonly)
{
  struct sb_handle *h = handle;
  struct sb_export *ex, **pp;
  int64_t size;
  uint32_t blksize, chunk;
  int r = -1;

  size = next->get_size (next);
  if (size == -1)
    return -1;
  if (choose_blksize (next, &blksize, &chunk) == -1)
    return -1;

  pthread_mutex_lock (&exports_lock);
  for (pp = &exports; (ex = *pp) != NULL; pp = &ex->next) {
    if (!ex->retired && strcmp (ex->name, h->exportname) == 0) {
      if (ex->size == (uint64_t) size && ex->blksize == blksize)
        goto found;
      /* The export changed size (or the plugin its preferred block
       * size): retire the old map.  Connections using it keep it, and it
       * stays in the list until they close so that it sees every change.
       */
      VERBOSE ("export '%s' changed from size %" PRIu64 ", block size "
               "%" PRIu32 " to size %" PRIi64 ", block size %" PRIu32
               ": new map", ex->name, ex->size, ex->blksize, size, blksize);
      ex->retired = true;
      if (ex->refs == 0) {
        *pp = ex->next;
        export_free (ex);
      }
      break;
    }
  }

  /* Bound the number of maps (and of scan caches): forget the least
   * recently used map that no connection uses; refuse when all are busy.
   */
  for (;;) {
    struct sb_export **victim = NULL;
    unsigned n = 0;

    for (pp = &exports; (ex = *pp) != NULL; pp = &ex->next) {
      n++;
      if (ex->refs == 0 &&
          (victim == NULL || ex->last_used < (*victim)->last_used))
        victim = pp;
    }
    if (n < MAX_EXPORTS)
      break;
    if (victim == NULL) {
      nbdkit_error ("sparsebackup: cannot serve export '%s': %d export "
                    "maps are in use at once (the limit)",
                    h->exportname, MAX_EXPORTS);
      errno = EBUSY;
      goto out;
    }
    ex = *victim;
    *victim = ex->next;
    VERBOSE ("export '%s': map dropped (least recently used)", ex->name);
    export_free (ex);
  }

  ex = calloc (1, sizeof *ex);
  if (ex == NULL) {
    nbdkit_error ("calloc: %m");
    goto out;
  }
  ex->name = strdup (h->exportname);
  ex->size = size;
  ex->blksize = blksize;
  ex->scan_max = max_u64 (cfg_scan_max, blksize);
  ex->scan_chunk = chunk;
  ex->bm = blockmap_new (size, blksize);
  if (ex->name == NULL || ex->bm == NULL) {
    nbdkit_error ("sparsebackup: cannot create the block map: %m");
    goto err;
  }
  if (cfg_scan_cache > 0) {
    ex->sc = scancache_new (cfg_scan_cache, blksize);
    if (ex->sc == NULL) {
      nbdkit_error ("sparsebackup: cannot create the scan cache: %m");
      goto err;
    }
  }
  ex->next = exports;
  exports = ex;
  VERBOSE ("export '%s': new map, size %" PRIi64 ", block size %" PRIu32,
           ex->name, size, blksize);

 found:
  ex->refs++;
  ex->last_used = ++export_clock;
  h->ex = ex;
  r = 0;
  goto out;

 err:
  blockmap_free (ex->bm);
  free (ex->name);
  free (ex);
 out:
  pthread_mutex_unlock (&exports_lock);
  return r;
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

  /* Advertise the map's block size as preferred: whole-block writes let
   * zero detection work on every block.
   */
  if (h->ex == NULL)
    return 0;
  if (*minimum == 0) {
    *minimum = 1;
    *preferred = h->ex->blksize;
    *maximum = 0xffffffff;
  }
  else if (*preferred < h->ex->blksize && h->ex->blksize <= *maximum)
    *preferred = h->ex->blksize;
  return 0;
}

static int
sparsebackup_can_zero (nbdkit_next *next, void *handle)
{
  int r = next->can_write (next);

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
  /* Honest: known-zero ranges succeed at once, the rest is passed down
   * with FAST_ZERO or fails at once with ENOTSUP.
   */
  return 1;
}

static int
sparsebackup_can_extents (nbdkit_next *next, void *handle)
{
  return 1;
}

static int
sparsebackup_can_cache (nbdkit_next *next, void *handle)
{
  return NBDKIT_CACHE_NATIVE;
}

static int
sparsebackup_can_multi_conn (nbdkit_next *next, void *handle)
{
  /* The map and the cache are shared by all connections. */
  return next->can_multi_conn (next);
}

/* ---- Data callbacks (write.c, read.c) ---------------------------------- */

static int
sparsebackup_pread (nbdkit_next *next, void *handle,
                    void *buf, uint32_t count, uint64_t offset,
                    uint32_t flags, int *err)
{
  return sb_pread (next, handle, buf, count, offset, flags, err);
}

static int
sparsebackup_pwrite (nbdkit_next *next, void *handle,
                     const void *buf, uint32_t count, uint64_t offset,
                     uint32_t flags, int *err)
{
  return sb_pwrite (next, handle, buf, count, offset, flags, err);
}

static int
sparsebackup_zero (nbdkit_next *next, void *handle,
                   uint32_t count, uint64_t offset, uint32_t flags,
                   int *err)
{
  return sb_zero (next, handle, count, offset, flags, err);
}

static int
sparsebackup_trim (nbdkit_next *next, void *handle,
                   uint32_t count, uint64_t offset, uint32_t flags,
                   int *err)
{
  return sb_trim (next, handle, count, offset, flags, err);
}

static int
sparsebackup_extents (nbdkit_next *next, void *handle,
                      uint32_t count, uint64_t offset, uint32_t flags,
                      struct nbdkit_extents *extents, int *err)
{
  return sb_extents (next, handle, count, offset, flags, extents, err);
}

static int
sparsebackup_cache (nbdkit_next *next, void *handle,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err)
{
  return sb_cache (next, handle, count, offset, flags, err);
}

static struct nbdkit_filter filter = {
  .name              = "sparsebackup",
  .longname          = "nbdkit sparsebackup filter",
  .unload            = sparsebackup_unload,
  .config            = sparsebackup_config,
  .config_complete   = sparsebackup_config_complete,
  .config_help       = sparsebackup_config_help,
  .get_ready         = sparsebackup_get_ready,
  .open              = sparsebackup_open,
  .prepare           = sparsebackup_prepare,
  .close             = sparsebackup_close,
  .block_size        = sparsebackup_block_size,
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
