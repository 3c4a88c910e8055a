/* sparsebackup: nbdkit qcow2 plugin (read-only).
 *
 * The nbdkit glue only: the format is handled by qcow2.c (no nbdkit
 * headers there).
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define NBDKIT_API_VERSION 2
#include <nbdkit-plugin.h>

#include "qcow2.h"

/* -D qcow2.verbose=1: debug messages from the format code. */
NBDKIT_DLL_PUBLIC int qcow2_debug_verbose = 0;

static char *filename;
static char *data_file;
static bool backing = true;
static int64_t l2_cache_size = QCOW2_DEFAULT_L2_CACHE_SIZE;
static unsigned max_depth = QCOW2_MAX_DEPTH;

static struct qcow2_image *image;

/* Stop an extents reply after this many extents (the client asks again). */
#define MAX_EXTENTS_PER_REPLY 65536

static void
q2p_unload (void)
{
  qcow2_close (image);
  image = NULL;
  free (filename);
  free (data_file);
}

static int
q2p_config (const char *key, const char *value)
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
q2p_config_complete (void)
{
  if (filename == NULL) {
    nbdkit_error ("you must supply the file=<FILENAME> parameter "
                  "after the plugin name on the command line");
    return -1;
  }
  return 0;
}

#define q2p_config_help \
  "[file=]<FILENAME>    (required) The qcow2 image to serve (read-only).\n" \
  "backing=<BOOL>       Follow backing files (default true).\n" \
  "max-depth=<N>        Max layers in the chain, 1 to 16 (default 16).\n" \
  "l2-cache-size=<SIZE> L2 cache per layer (default 1M).\n" \
  "data-file=<FILENAME> Override the external data file of the image."

static void
debug_cb (void *opaque, const char *msg)
{
  nbdkit_debug ("%s", msg);
}

static int
q2p_get_ready (void)
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
  if (qcow2_open_file (filename, &opts, &image, err, sizeof err) == -1) {
    nbdkit_error ("%s", err);
    return -1;
  }
  return 0;
}

static void *
q2p_open (int readonly)
{
  return NBDKIT_HANDLE_NOT_NEEDED;
}

static int64_t
q2p_get_size (void *handle)
{
  return (int64_t) qcow2_get_size (image);
}

static int
q2p_can_write (void *handle)
{
  return 0;
}

static int
q2p_can_multi_conn (void *handle)
{
  return 1;
}

static int
q2p_can_extents (void *handle)
{
  return 1;
}

static int
q2p_can_cache (void *handle)
{
  return NBDKIT_CACHE_EMULATE;
}

static int
q2p_block_size (void *handle,
                  uint32_t *minimum, uint32_t *preferred, uint32_t *maximum)
{
  uint32_t cs = qcow2_get_cluster_size (image);

  *minimum = 1;
  *preferred = cs < 4096 ? 4096 : cs;
  *maximum = 0xffffffff;
  return 0;
}

static int
q2p_pread (void *handle, void *buf, uint32_t count, uint64_t offset,
             uint32_t flags)
{
  char err[QCOW2_ERRLEN];

  if (qcow2_pread (image, buf, count, offset, err, sizeof err) == -1) {
    nbdkit_error ("%s", err);
    errno = EIO;
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
q2p_extents (void *handle, uint32_t count, uint64_t offset,
               uint32_t flags, struct nbdkit_extents *extents)
{
  struct extents_ctx c = {
    .extents = extents, .req_one = (flags & NBDKIT_FLAG_REQ_ONE) != 0,
  };
  char err[QCOW2_ERRLEN];

  err[0] = '\0';
  if (qcow2_map (image, offset, count, add_extent, &c,
                 err, sizeof err) == -1) {
    if (err[0])
      nbdkit_error ("%s", err);
    errno = EIO;
    return -1;
  }
  return 0;
}

static struct nbdkit_plugin plugin = {
  .name              = "qcow2",
  .longname          = "nbdkit qcow2 plugin (read-only, sparsebackup)",
  .version           = PACKAGE_VERSION,
  .unload            = q2p_unload,
  .config            = q2p_config,
  .config_complete   = q2p_config_complete,
  .config_help       = q2p_config_help,
  .magic_config_key  = "file",
  .get_ready         = q2p_get_ready,
  .open              = q2p_open,
  .get_size          = q2p_get_size,
  .block_size        = q2p_block_size,
  .can_write         = q2p_can_write,
  .can_multi_conn    = q2p_can_multi_conn,
  .can_extents       = q2p_can_extents,
  .can_cache         = q2p_can_cache,
  .pread             = q2p_pread,
  .extents           = q2p_extents,
  .errno_is_preserved = 1,
};

#define THREAD_MODEL NBDKIT_THREAD_MODEL_PARALLEL

NBDKIT_REGISTER_PLUGIN (plugin)
