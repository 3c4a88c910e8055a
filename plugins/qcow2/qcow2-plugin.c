/* sparsebackup: nbdkit qcow2 plugin (read-only).
 *
 * The nbdkit glue only: the format is handled by the qcow2-*.c library
 * files (no nbdkit headers there; see qcow2-internal.h).  The library's
 * public API is named qcow2_*, so the nbdkit callbacks are named
 * qcow2_plugin_*.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

/* -D qcow2.verbose=1: debug messages from the format code. */
NBDKIT_DLL_PUBLIC int qcow2_debug_verbose = 0;
/* -D qcow2.bitmap_delay_ms=MS (tests only): wait MS milliseconds before
 * each read of a bitmap directory or table, to make a listing slow.
 */
NBDKIT_DLL_PUBLIC int qcow2_debug_bitmap_delay_ms = 0;

static char *filename;
static char *data_file;
static bool backing = true;
static int64_t l2_cache_size = QCOW2_DEFAULT_L2_CACHE_SIZE;
static unsigned max_depth = QCOW2_MAX_DEPTH;

static struct qcow2_image *image;

/* Stop an extents reply after this many extents (the client asks again). */
#define MAX_EXTENTS_PER_REPLY 65536

static void
qcow2_plugin_unload (void)
{
  qcow2_close (image);
  image = NULL;
  free (filename);
  free (data_file);
}

static int
qcow2_plugin_config (const char *key, const char *value)
{
  if (strcmp (key, "file") == 0) {
    free (filename);
    filename = nbdkit_absolute_path (value);
    if (filename == NULL)
      return -1;
  }
  else if (strcmp (key, "data-file") == 0) {
    free (data_file);
    data_file = nbdkit_absolute_path (value);
    if (data_file == NULL)
      return -1;
  }
  else if (strcmp (key, "backing") == 0) {
    int r = nbdkit_parse_bool (value);
    if (r == -1) {
      nbdkit_error ("backing: '%s' is not a boolean", value);
      return -1;
    }
    backing = r;
  }
  else if (strcmp (key, "l2-cache-size") == 0) {
    int64_t r = nbdkit_parse_size (value);
    if (r == -1) {
      nbdkit_error ("l2-cache-size: '%s' is not a size", value);
      return -1;
    }
    if (r < 4096 || r > INT64_C(1) << 32) {
      nbdkit_error ("l2-cache-size: '%s' is out of range (4K to 4G)", value);
      return -1;
    }
    l2_cache_size = r;
  }
  else if (strcmp (key, "max-depth") == 0) {
    unsigned r;
    if (nbdkit_parse_unsigned ("max-depth", value, &r) == -1)
      return -1;
    if (r < 1 || r > QCOW2_MAX_DEPTH) {
      nbdkit_error ("max-depth: '%s' is out of range (1 to %d)",
                    value, QCOW2_MAX_DEPTH);
      return -1;
    }
    max_depth = r;
  }
  else {
    nbdkit_error ("unknown parameter '%s'", key);
    return -1;
  }
  return 0;
}

static int
qcow2_plugin_config_complete (void)
{
  if (filename == NULL) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter "
                  "after the plugin name on the command line");
    return -1;
  }
  return 0;
}

/* Laid out like nbdkit's own plugins (nbdkit file --help): KEY=<VALUE>
 * placeholders, descriptions from column 23.
 */
#define qcow2_plugin_config_help \
  "[file=]<FILENAME>     The qcow2 image to serve (required, read-only).\n" \
  "backing=<BOOL>        Follow backing files (default true).\n" \
  "max-depth=<N>         Max layers in the chain, 1 to 16 (default 16).\n" \
  "l2-cache-size=<SIZE>  L2 cache per layer (default 1M).\n" \
  "data-file=<FILENAME>  Override the external data file of the image."

/* nbdkit qcow2 --dump-plugin: what this build supports. */
static void
qcow2_plugin_dump_plugin (void)
{
  printf ("qcow2_version=%s\n", PACKAGE_VERSION);
  printf ("qcow2_zlib=yes\n");
  printf ("qcow2_zlib_version=%s\n", zlibVersion ());
  {
    /* "zlib", or "libdeflate VERSION" (with zlib for what it cannot
     * decode exactly like zlib).
     */
    const char *d = qcow2_zlib_decoder ();
    const char *sp = strchr (d, ' ');
    if (sp) {
      printf ("qcow2_zlib_decoder=%.*s\n", (int) (sp - d), d);
      printf ("qcow2_libdeflate_version=%s\n", sp + 1);
    }
    else
      printf ("qcow2_zlib_decoder=%s\n", d);
  }
  printf ("qcow2_zstd=yes\n");
  printf ("qcow2_zstd_version=%s\n", ZSTD_versionString ());
  printf ("qcow2_extended_l2=yes\n");
  printf ("qcow2_external_data_file=yes\n");
  printf ("qcow2_backing_formats=qcow2,raw\n");
  printf ("qcow2_max_depth=%d\n", QCOW2_MAX_DEPTH);
  printf ("qcow2_views=@top,@since:NAME\n");
}

static void
debug_cb (void *opaque, const char *msg)
{
  nbdkit_debug ("%s", msg);
}

/* Long bitmap work (qcow2_list_bitmaps, qcow2_bitmap_open) asks this
 * before each read: stop when nbdkit is shutting down (nbdkit 1.32 has
 * no nbdkit_is_shutdown; nbdkit_nanosleep returns early then, and when
 * the client has gone away) so that a SIGTERM is not kept waiting.
 */
static bool
cancel_cb (void *opaque)
{
  unsigned ms = qcow2_debug_bitmap_delay_ms > 0 ?
    (unsigned) qcow2_debug_bitmap_delay_ms : 0;

  return nbdkit_nanosleep (ms / 1000, (ms % 1000) * 1000000) == -1;
}

static int
qcow2_plugin_get_ready (void)
{
  struct qcow2_options opts;
  char err[QCOW2_ERRLEN];

  qcow2_options_init (&opts);
  opts.backing = backing;
  opts.max_depth = max_depth;
  opts.l2_cache_size = l2_cache_size;
  opts.data_file = data_file;
  opts.open_file = qcow2_posix_open;
  if (qcow2_debug_verbose)
    opts.debug = debug_cb;
  opts.cancel = cancel_cb;
  if (qcow2_open_file (filename, &opts, &image, err, sizeof err) == -1) {
    nbdkit_error ("%s", err);
    return -1;
  }
  return 0;
}

/* Views of the image, chosen by export name.  Names starting with '@'
 * are reserved for views; any other name is the whole chain, as before
 * views existed.
 */
enum view {
  VIEW_CHAIN,                   /* "": content and map of the chain */
  VIEW_TOP,                     /* "@top": content of the chain, map of
                                 * the top image's allocation */
  VIEW_SINCE,                   /* "@since:NAME": content of the chain,
                                 * map of persistent bitmap NAME */
};

#define SINCE_PREFIX "@since:"

struct view_def {
  const char *name;
  enum view view;
  const char *description;
};

static const struct view_def views[] = {
  { "", VIEW_CHAIN, "the disk: content and map of the whole chain" },
  { "@top", VIEW_TOP, "the disk with the map of the top image only: "
    "unallocated there is a hole (not zero), its zero clusters zero" },
  { SINCE_PREFIX, VIEW_SINCE, NULL },   /* one per bitmap, see below */
};
#define NR_VIEWS (sizeof views / sizeof views[0])

/* One connection: its view and, for @since:NAME, the bitmap. */
struct handle {
  const struct view_def *v;
  struct qcow2_bitmap *bm;
};

static int
list_bitmap (void *opaque, const char *name, const struct qcow2_bitmap *bm,
             const char *why)
{
  struct nbdkit_exports *exports = opaque;
  char ename[sizeof SINCE_PREFIX + 1024];
  char desc[1400];              /* room for the longest name */
  uint64_t g;

  if (bm == NULL) {
    nbdkit_debug ("bitmap '%s' is not listed: %s", name, why);
    return 0;
  }
  g = qcow2_bitmap_granularity (bm);
  snprintf (ename, sizeof ename, "%s%s", SINCE_PREFIX, name);
  snprintf (desc, sizeof desc, "the disk with the map of the changes "
            "since checkpoint '%s' (persistent bitmap, granularity %"
            PRIu64 ", %u layer%s): unchanged is a hole",
            name, g, qcow2_bitmap_layers (bm),
            qcow2_bitmap_layers (bm) == 1 ? "" : "s");
  return nbdkit_add_export (exports, ename, desc);
}

static int
qcow2_plugin_list_exports (int readonly, int is_tls,
                           struct nbdkit_exports *exports)
{
  char err[QCOW2_ERRLEN];
  size_t i;

  for (i = 0; i < NR_VIEWS; ++i)
    if (views[i].description &&
        nbdkit_add_export (exports, views[i].name,
                           views[i].description) == -1)
      return -1;
  /* A broken bitmap directory hides the @since views only. */
  err[0] = '\0';
  if (qcow2_list_bitmaps (image, list_bitmap, exports,
                          err, sizeof err) == -1) {
    if (!err[0])
      return -1;                /* nbdkit_add_export failed */
    if (errno == ECANCELED) {
      nbdkit_error ("%s", err);
      errno = ESHUTDOWN;
      return -1;
    }
    nbdkit_debug ("no @since views: %s", err);
  }
  return 0;
}

static void *
qcow2_plugin_open (int readonly)
{
  const char *name = nbdkit_export_name ();
  struct handle *h;
  size_t i;

  h = calloc (1, sizeof *h);
  if (h == NULL) {
    nbdkit_error ("calloc: %m");
    return NULL;
  }
  if (name == NULL || name[0] != '@') {
    h->v = &views[0];
    return h;
  }
  if (strncmp (name, SINCE_PREFIX, strlen (SINCE_PREFIX)) == 0) {
    char err[QCOW2_ERRLEN];

    if (qcow2_bitmap_open (image, name + strlen (SINCE_PREFIX), &h->bm,
                           err, sizeof err) == -1) {
      nbdkit_error ("view '%s' is not available: %s", name, err);
      free (h);
      return NULL;
    }
    h->v = &views[NR_VIEWS - 1];
    return h;
  }
  for (i = 0; i < NR_VIEWS; ++i)
    if (views[i].description && strcmp (name, views[i].name) == 0) {
      h->v = &views[i];
      return h;
    }
  nbdkit_error ("unknown view '%s' (export names starting with '@' are "
                "views; this plugin has: @top, @since:NAME)", name);
  free (h);
  return NULL;
}

static void
qcow2_plugin_close (void *handle)
{
  struct handle *h = handle;

  qcow2_bitmap_close (h->bm);
  free (h);
}

static int64_t
qcow2_plugin_get_size (void *handle)
{
  return (int64_t) qcow2_get_size (image);
}

static int
qcow2_plugin_can_write (void *handle)
{
  return 0;
}

static int
qcow2_plugin_can_multi_conn (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_extents (void *handle)
{
  return 1;
}

static int
qcow2_plugin_can_cache (void *handle)
{
  return NBDKIT_CACHE_EMULATE;
}

static int
qcow2_plugin_block_size (void *handle, uint32_t *minimum,
                         uint32_t *preferred, uint32_t *maximum)
{
  uint32_t cs = qcow2_get_cluster_size (image);

  *minimum = 1;
  *preferred = cs < 4096 ? 4096 : cs;
  *maximum = 0xffffffff;
  return 0;
}

static int
qcow2_plugin_pread (void *handle, void *buf, uint32_t count,
                    uint64_t offset, uint32_t flags)
{
  char err[QCOW2_ERRLEN];

  if (qcow2_pread (image, buf, count, offset, err, sizeof err) == -1) {
    int errnum = errno;         /* ENOMEM, a read error's errno, EIO... */
    nbdkit_error ("%s", err);
    errno = errnum;
    return -1;
  }
  return 0;
}

struct extents_ctx {
  struct nbdkit_extents *extents;
  bool req_one;
  unsigned n;
};

static int
add_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct extents_ctx *c = opaque;
  uint32_t type = 0;

  if (flags & QCOW2_EXTENT_HOLE)
    type |= NBDKIT_EXTENT_HOLE;
  if (flags & QCOW2_EXTENT_ZERO)
    type |= NBDKIT_EXTENT_ZERO;
  if (nbdkit_add_extent (c->extents, offset, length, type) == -1)
    return -1;
  c->n++;
  if (c->req_one || c->n >= MAX_EXTENTS_PER_REPLY)
    return 1;
  return 0;
}

static int
qcow2_plugin_extents (void *handle, uint32_t count, uint64_t offset,
                      uint32_t flags, struct nbdkit_extents *extents)
{
  struct extents_ctx c = {
    .extents = extents, .req_one = (flags & NBDKIT_FLAG_REQ_ONE) != 0,
  };
  const struct handle *h = handle;
  char err[QCOW2_ERRLEN];
  int r;

  err[0] = '\0';
  if (h->v->view == VIEW_TOP)
    r = qcow2_map_top (image, offset, count, add_extent, &c,
                       err, sizeof err);
  else if (h->v->view == VIEW_SINCE)
    r = qcow2_map_since (image, h->bm, offset, count, add_extent, &c,
                         err, sizeof err);
  else
    r = qcow2_map (image, offset, count, add_extent, &c, err, sizeof err);
  if (r == -1) {
    int errnum = errno;         /* also that of a failed nbdkit_add_extent */
    if (err[0])
      nbdkit_error ("%s", err);
    errno = errnum;
    return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "qcow2",
  .longname          = "nbdkit qcow2 plugin (read-only, sparsebackup)",
  .version           = PACKAGE_VERSION,
  .unload            = qcow2_plugin_unload,
  .config            = qcow2_plugin_config,
  .config_complete   = qcow2_plugin_config_complete,
  .config_help       = qcow2_plugin_config_help,
  .dump_plugin       = qcow2_plugin_dump_plugin,
  .magic_config_key  = "file",
  .get_ready         = qcow2_plugin_get_ready,
  .list_exports      = qcow2_plugin_list_exports,
  .open              = qcow2_plugin_open,
  .close             = qcow2_plugin_close,
  .get_size          = qcow2_plugin_get_size,
  .block_size        = qcow2_plugin_block_size,
  .can_write         = qcow2_plugin_can_write,
  .can_multi_conn    = qcow2_plugin_can_multi_conn,
  .can_extents       = qcow2_plugin_can_extents,
  .can_cache         = qcow2_plugin_can_cache,
  .pread             = qcow2_plugin_pread,
  .extents           = qcow2_plugin_extents,
  .errno_is_preserved = 1,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

NBDKIT_REGISTER_PLUGIN (plugin)
