/* nbdkit-sparsebackup-filter: keep NBD copies sparse, and back up the
 * disk.
 *
 * This file: the filter's callbacks, each dispatching on the kind of
 * export of the connection (views.h): the disk (EXPORT_DISK) goes
 * through the map (read.c, write.c), other names straight to the plugin
 * (their changes still tracked: write.c), the backup views to views.c.
 * See internal.h for the other files, doc/design.md for the data
 * paths and the map protocol, and the man page for the parameters.
 */

#include <config.h>

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <unistd.h>

#include <nbdkit-filter.h>

#include "internal.h"
#include "control.h"
#include "disk.h"
#include "frozen.h"
#include "tracking.h"
#include "views.h"

/* -D sparsebackup.verbose=1: log decisions. */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_verbose = 0;
/* -D sparsebackup.stats=1: print statistics at unload. */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_stats = 0;

/* ---- Life cycle ------------------------------------------------------- */

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
  if (disk_get_ready (thread_model) == -1 || tracking_check () == -1 ||
      frozen_open () == -1 || control_open () == -1)
    return -1;
  return 0;
}

static int
sparsebackup_after_fork (nbdkit_backend *backend)
{
  if (disk_after_fork (backend) == -1)
    return -1;
  return control_start ();
}

static void
sparsebackup_cleanup (nbdkit_backend *backend)
{
  disk_cleanup ();
}

/* The statistics, with what the modules count themselves. */
static int
close_stats (void)
{
  struct blockmap_stats bs;
  struct changes_stats cs;
  struct scancache_stats ss;
  struct cbt_stats ts;
  struct stats_sources src = { .frozen = frozen_enabled () };

  if (disk.bm) {
    blockmap_get_stats (disk.bm, &bs);
    src.bm = disk.bm;
    src.map = &bs;
  }
  if (disk.changes) {
    changes_get_stats (disk.changes, &cs);
    src.changes = &cs;
  }
  if (disk.sc) {
    scancache_get_stats (disk.sc, &ss);
    src.cache = &ss;
  }
  if (tracking_enabled ()) {
    memset (&ts, 0, sizeof ts);
    if (tracking_cbt ())
      cbt_get_stats (tracking_cbt (), &ts);
    src.cbt = &ts;
  }
  return stats_close (&src);
}

static void
sparsebackup_unload (void)
{
  int r = close_stats ();

  control_stop ();
  frozen_close ();
  tracking_close ();
  disk_unload ();
  config_free ();
  if (r == -1) {
    /* nbdkit ignores errors at unload: never exit 0 without the
     * statistics the operator asked for.
     */
    fflush (stderr);
    _exit (EXIT_FAILURE);
  }
}

/* ---- Connections -------------------------------------------------------- */

static void *
sparsebackup_open (nbdkit_next_open *next, nbdkit_context *nxdata,
                   int readonly, const char *exportname, int is_tls)
{
  struct sb_handle *h;
  enum export_kind kind;
  const char *since;

  if (views_classify (exportname, &kind, &since) == -1)
    return NULL;
  /* A view reads the default export, read-only. */
  if (next (nxdata, is_view (kind) ? 1 : readonly,
            is_view (kind) ? "" : exportname) == -1)
    return NULL;

  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  h->kind = kind;
  h->exportname = strdup (exportname);
  if (h->exportname == NULL) {
    nbdkit_error ("strdup: %m");
    free (h);
    return NULL;
  }
  if (since)
    h->since_name = h->exportname + (since - exportname);
  return h;
}

static void
sparsebackup_close (void *handle)
{
  struct sb_handle *h = handle;

  free (h->exportname);
  free (h);
}

static int
sparsebackup_prepare (nbdkit_next *next, void *handle, int readonly)
{
  struct sb_handle *h = handle;
  int64_t size;

  size = next->get_size (next);
  if (size == -1)
    return -1;
  h->size = size;
  /* Every connection may change the disk (or read it, for a view). */
  if (disk_check_size (h->exportname, size) == -1)
    return -1;

  switch (h->kind) {
  case EXPORT_DISK:
    if (disk_prepare (next, size) == -1)
      return -1;
    h->bm = disk.bm;
    h->sc = disk.sc;
    return 0;
  case EXPORT_PASSTHROUGH:
    nbdkit_debug ("sparsebackup: export '%s' is not the default export: "
                  "passed through (no map, no skipping; its changes are "
                  "still tracked)", h->exportname);
    return 0;
  case EXPORT_SINCE:
  case EXPORT_FROZEN:
  case EXPORT_FROZEN_SINCE:
    return views_prepare (h);
  }
  abort ();
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
  if (h->kind != EXPORT_DISK)
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

  if (is_view (h->kind))
    return 0;                   /* the views are read-only */
  return next->can_write (next);
}

/* Every can_* asks the layer below first, always: filters below set
 * themselves up in their own can_* (nbdkit's readahead filter only
 * prefetches once its can_cache has been called).
 */
static int
sparsebackup_can_zero (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;
  int r = next->can_zero (next);

  if (r == -1 || h->kind != EXPORT_DISK)
    return r;
  /* A layer that cannot zero at all (nbdkit-nozero-filter
   * zeromode=none) stays so: the zero blocks of writes are then written
   * as data, or skipped where known zero.  Otherwise zero requests are
   * handled here: skipped when known zero, else passed down (emulated
   * by nbdkit with writes where the layer emulates).
   */
  return r == NBDKIT_ZERO_NONE ? NBDKIT_ZERO_NONE : NBDKIT_ZERO_NATIVE;
}

static int
sparsebackup_can_fast_zero (nbdkit_next *next, void *handle)
{
  /* The layer's answer: a fast zero over known-zero blocks succeeds at
   * once, the rest is passed down with FAST_ZERO where it can, and
   * where it cannot (it advertised none) none is asked.
   */
  return next->can_fast_zero (next);
}

static int
sparsebackup_can_extents (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;
  int r = next->can_extents (next);

  if (r == -1 || h->kind == EXPORT_PASSTHROUGH)
    return r;
  return 1;
}

static int
sparsebackup_can_cache (nbdkit_next *next, void *handle)
{
  struct sb_handle *h = handle;
  int r = next->can_cache (next);

  if (r == -1)
    return -1;
  switch (h->kind) {
  case EXPORT_DISK:
    /* Cache requests are passed down to a layer that can cache (or
     * whose caching nbdkit emulates); over one that cannot, they scan
     * ahead into the scan cache, if there is one.
     */
    return h->sc ? NBDKIT_CACHE_NATIVE : r;
  case EXPORT_PASSTHROUGH:
    return r;
  case EXPORT_SINCE:
  case EXPORT_FROZEN:
  case EXPORT_FROZEN_SINCE:
    return views_can_cache (r, h);
  }
  abort ();
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
  return views_list_exports (exports);
}

/* ---- Data ------------------------------------------------------------- */

static int
sparsebackup_pread (nbdkit_next *next, void *handle, void *buf,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err)
{
  struct sb_handle *h = handle;

  STAT_ADD (read_bytes, count);
  switch (h->kind) {
  case EXPORT_DISK:
    return mapped_pread (next, h, buf, count, offset, flags, err);
  case EXPORT_PASSTHROUGH:
    STAT_ADD (passthrough_requests, 1);
    STAT_ADD (plugin_read_bytes, count);
    return next->pread (next, buf, count, offset, flags, err);
  case EXPORT_SINCE:
  case EXPORT_FROZEN:
  case EXPORT_FROZEN_SINCE:
    return views_pread (next, h, buf, count, offset, flags, err);
  }
  abort ();
}

static int
sparsebackup_extents (nbdkit_next *next, void *handle, uint32_t count,
                      uint64_t offset, uint32_t flags,
                      struct nbdkit_extents *extents, int *err)
{
  struct sb_handle *h = handle;

  switch (h->kind) {
  case EXPORT_DISK:
    return mapped_extents (next, h, count, offset, flags, extents, err);
  case EXPORT_PASSTHROUGH:
    STAT_ADD (passthrough_requests, 1);
    return next->extents (next, count, offset, flags, extents, err);
  case EXPORT_SINCE:
  case EXPORT_FROZEN:
  case EXPORT_FROZEN_SINCE:
    return views_extents (next, h, count, offset, flags, extents, err);
  }
  abort ();
}

static int
sparsebackup_cache (nbdkit_next *next, void *handle, uint32_t count,
                    uint64_t offset, uint32_t flags, int *err)
{
  struct sb_handle *h = handle;

  switch (h->kind) {
  case EXPORT_DISK:
    return mapped_cache (next, h, count, offset, flags, err);
  case EXPORT_PASSTHROUGH:
    return next->cache (next, count, offset, flags, err);
  case EXPORT_SINCE:
  case EXPORT_FROZEN:
  case EXPORT_FROZEN_SINCE:
    return views_cache (next, h, count, offset, flags, err);
  }
  abort ();
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
  .cleanup           = sparsebackup_cleanup,
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
