/* sparsebackup: qcow2 reader: opening the chain.
 *
 * File names found in images (external data files, backing files),
 * the layers of the backing chain, and the public open / close / query
 * functions.  Opening a qcow2 layer calls qcow2-header.c to read its
 * header and L1 table (q2_read_header), then opens its L2 cache, its
 * external data file and its backing file here; qcow2-header.c calls
 * nothing in this file.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

static void
layer_free (struct layer *l)
{
  while (l) {
    struct layer *next = l->backing;
    if (l->io.close)
      l->io.close (l->io.opaque);
    if (l->has_data_file && l->data.close)
      l->data.close (l->data.opaque);
    if (l->cache_ok)
      q2_cache_free (&l->cache);
    q2_pool_free (l);
    free (l->l1);
    free (l->name);
    free (l->data_name);
    free (l);
    l = next;
  }
}

/* Resolve NAME (from inside image BASE) against BASE's directory. */
static char *
resolve_name (const char *base, const char *name)
{
  const char *slash = strrchr (base, '/');
  size_t dlen;
  char *p;

  if (name[0] == '/' || slash == NULL)
    return strdup (name);
  dlen = slash - base;
  p = malloc (dlen + 1 + strlen (name) + 1);
  if (p == NULL)
    return NULL;
  memcpy (p, base, dlen);
  p[dlen] = '/';
  strcpy (p + dlen + 1, name);
  return p;
}

/* Refuse names that are not plain local file names. */
static int
check_file_name (const char *image, const char *what, const char *name,
                 struct err *e)
{
  const char *colon = strchr (name, ':');
  const char *slash = strchr (name, '/');
  char sbuf[Q2_NAME_BUF];
  const char *sname = q2_short_name (sbuf, name);

  if (name[0] == '\0') {
    q2_seterr (e, image, "%s name is empty", what);
    return -1;
  }
  if (strncmp (name, "json:", 5) == 0) {
    q2_seterr (e, image, "%s name '%s' is a json: pseudo-protocol name, "
               "which is not supported (only local file names are)",
               what, sname);
    return -1;
  }
  if (colon && (slash == NULL || colon < slash)) {
    q2_seterr (e, image, "%s name '%s' looks like a protocol name (':' "
               "before any '/'), which is not supported (only local file "
               "names are; write ./%s for a local file)",
               what, sname, sname);
    return -1;
  }
  return 0;
}

/* Prefix the message of a failed open_file callback for PATH with the
 * image naming it: "IMAGE: cannot open WHAT: PATH: REASON".  The
 * callback's message usually starts with PATH (shortened as here)
 * itself: then PATH is not repeated.
 */
static void
wrap_open_error (struct err *e, const char *image, const char *what,
                 const char *path)
{
  char msg[QCOW2_ERRLEN], spath[Q2_NAME_BUF];
  const char *sp = q2_short_name (spath, path);
  size_t splen = strlen (sp);
  int errnum = e->errnum;

  if (e->buf == NULL || e->len == 0)
    return;
  snprintf (msg, sizeof msg, "%s", e->buf[0] ? e->buf : "unknown error");
  if (strncmp (msg, sp, splen) == 0 && strncmp (msg + splen, ": ", 2) == 0)
    q2_seterr_errno (e, errnum, image, "cannot open %s: %s", what, msg);
  else
    q2_seterr_errno (e, errnum, image, "cannot open %s: %s: %s",
                     what, sp, msg);
}

/* Open PATH (named by layer L as its WHAT) with the caller's opener. */
static int
open_named_file (const struct qcow2_options *o, struct layer *l,
                 const char *what, const char *path, struct qcow2_io *io,
                 struct err *e)
{
  char spath[Q2_NAME_BUF];

  if (o->open_file == NULL) {
    q2_seterr (e, l->name, "image has %s '%s' but no way to open files "
               "was given", what, q2_short_name (spath, path));
    return -1;
  }
  if (e->buf && e->len)
    e->buf[0] = '\0';
  errno = 0;
  if (o->open_file (o->open_opaque, path, io, e->buf, e->len) == -1) {
    e->errnum = errno ? errno : EIO;
    wrap_open_error (e, l->name, what, path);
    return -1;
  }
  return 0;
}

/* The external data file of L (DATA_NAME: its name in the image). */
static int
open_data_file (const struct qcow2_options *o, struct layer *l,
                const char *data_name, struct err *e)
{
  char *path;

  if (l->depth == 0 && o->data_file)
    path = strdup (o->data_file);
  else if (data_name) {
    if (check_file_name (l->name, "data file", data_name, e) == -1)
      return -1;
    path = resolve_name (l->name, data_name);
  }
  else {
    q2_seterr (e, l->name, "image uses an external data file but does not "
               "name it%s", l->depth == 0 ? " (use data-file=FILE)" : "");
    return -1;
  }
  if (path == NULL) {
    q2_seterr_oom (e, l->name);
    return -1;
  }
  if (open_named_file (o, l, "external data file", path, &l->data,
                       e) == -1) {
    free (path);
    return -1;
  }
  l->data_name = path;
  l->has_data_file = true;
  return 0;
}

static int open_layer (const struct qcow2_options *o, struct qcow2_io *io,
                       const char *name, bool raw, unsigned depth,
                       struct chain_ids *ids, struct layer **ret,
                       struct err *e);

/* Check the backing file named by L, open it and its own chain. */
static int
open_backing (const struct qcow2_options *o, struct layer *l,
              const char *backing_name, const char *backing_fmt,
              struct chain_ids *ids, struct err *e)
{
  struct qcow2_io bio;
  bool braw;
  char *path;
  char sname[Q2_NAME_BUF], sbuf[Q2_NAME_BUF];
  const char *sbacking = q2_short_name (sbuf, backing_name);
  unsigned max_depth = o->max_depth ? o->max_depth : QCOW2_MAX_DEPTH;
  unsigned i;
  int r;

  if (max_depth > QCOW2_MAX_DEPTH)
    max_depth = QCOW2_MAX_DEPTH;
  if (!o->backing) {
    q2_debug (o, "%s: backing file '%s' not opened (backing=false)",
              l->name, backing_name);
    return 0;
  }
  if (check_file_name (l->name, "backing file", backing_name, e) == -1)
    return -1;
  if (backing_fmt == NULL) {
    q2_seterr (e, l->name, "backing file '%s' has no recorded backing "
               "format and will not be probed; record it with "
               "'qemu-img rebase -u -b %s -F FMT %s' (FMT qcow2 or raw), "
               "or use backing=false", sbacking, sbacking,
               q2_short_name (sname, l->name));
    return -1;
  }
  if (strcmp (backing_fmt, "qcow2") == 0)
    braw = false;
  else if (strcmp (backing_fmt, "raw") == 0)
    braw = true;
  else {
    q2_seterr (e, l->name, "backing file '%s' has format '%s', which is not "
               "supported (only qcow2 and raw)", sbacking,
               q2_short_name (sname, backing_fmt));
    return -1;
  }
  if (l->data_file_raw) {
    q2_seterr (e, l->name, "image has a raw external data file "
               "(data-file-raw) and a backing file, which is not allowed");
    return -1;
  }
  if (l->depth + 1 >= max_depth) {
    q2_seterr (e, l->name, "backing chain is longer than the limit of %u "
               "layers (max-depth) at backing file '%s'", max_depth,
               sbacking);
    return -1;
  }
  path = resolve_name (l->name, backing_name);
  if (path == NULL) {
    q2_seterr_oom (e, l->name);
    return -1;
  }
  if (open_named_file (o, l, "backing file", path, &bio, e) == -1) {
    free (path);
    return -1;
  }
  if (bio.has_id) {
    for (i = 0; i < ids->n; ++i) {
      if (ids->dev[i] == bio.dev && ids->ino[i] == bio.ino) {
        q2_seterr (e, l->name, "backing file loop: '%s' is already in the "
                   "backing chain", q2_short_name (sname, path));
        if (bio.close)
          bio.close (bio.opaque);
        free (path);
        return -1;
      }
    }
  }
  r = open_layer (o, &bio, path, braw, l->depth + 1, ids, &l->backing, e);
  free (path);
  return r;
}

static void
debug_layer (const struct qcow2_options *o, const struct layer *l,
             const struct header *hd)
{
  const char *bfmt = hd->backing_fmt;

  q2_debug (o, "layer %u: %s: qcow2 v%" PRIu32 ", size %" PRIu64
            ", cluster %" PRIu64 ", l1 %" PRIu32 " entries%s%s%s%s%s%s%s%s",
            l->depth, l->name, l->version, l->size, l->cluster_size,
            l->l1_size,
            l->extended_l2 ? ", extended L2" : "",
            l->compression == COMPRESSION_ZSTD ? ", zstd" : "",
            l->has_data_file ? ", data file " : "",
            l->has_data_file ? l->data_name : "",
            l->data_file_raw ? " (raw)" : "",
            hd->backing_name ? ", backing " : "",
            hd->backing_name ? hd->backing_name : "",
            bfmt ? (strcmp (bfmt, "raw") == 0 ? " (raw)" : " (qcow2)") : "");
}

/* Open qcow2 layer L: its header and L1 table (qcow2-header.c), its L2
 * cache and scratch pool, its external data file and its backing chain.
 */
static int
open_qcow2 (const struct qcow2_options *o, struct layer *l,
            struct chain_ids *ids, struct err *e)
{
  struct header hd;
  int ret = -1;

  memset (&hd, 0, sizeof hd);
  if (q2_read_header (o, l, &hd, e) == -1)
    goto out;

  if (q2_cache_init (&l->cache, o->l2_cache_size ? o->l2_cache_size
                     : QCOW2_DEFAULT_L2_CACHE_SIZE, l->slice_bytes) == -1) {
    q2_seterr_oom (e, l->name);
    goto out;
  }
  l->cache_ok = true;
  if (q2_pool_init (l, e) == -1)
    goto out;

  if (hd.incompat & INCOMPAT_DATA_FILE) {
    l->data_file_raw = (hd.autoclear & AUTOCLEAR_DATA_FILE_RAW) != 0;
    if (open_data_file (o, l, hd.data_name, e) == -1)
      goto out;
  }
  debug_layer (o, l, &hd);

  if (hd.backing_name &&
      open_backing (o, l, hd.backing_name, hd.backing_fmt, ids, e) == -1)
    goto out;
  ret = 0;
 out:
  q2_header_free (&hd);
  return ret;
}

/* Open one layer and, recursively, its backing chain.  Takes ownership
 * of *IO.
 */
static int
open_layer (const struct qcow2_options *o, struct qcow2_io *io,
            const char *name, bool raw, unsigned depth,
            struct chain_ids *ids, struct layer **ret, struct err *e)
{
  struct layer *l;

  l = calloc (1, sizeof *l);
  if (l)
    l->name = strdup (name);
  if (l == NULL || l->name == NULL) {
    q2_seterr_oom (e, name);
    if (io->close)
      io->close (io->opaque);
    free (l);
    return -1;
  }
  l->io = *io;
  l->depth = depth;
  l->raw = raw;
  if (io->has_id && ids->n < QCOW2_MAX_DEPTH + 1) {
    ids->dev[ids->n] = io->dev;
    ids->ino[ids->n] = io->ino;
    ids->n++;
  }
  if (raw) {
    l->size = io->size;
    q2_debug (o, "layer %u: %s: raw, size %" PRIu64, depth, name, l->size);
  }
  else if (open_qcow2 (o, l, ids, e) == -1) {
    layer_free (l);
    return -1;
  }
  *ret = l;
  return 0;
}

void
qcow2_options_init (struct qcow2_options *opts)
{
  memset (opts, 0, sizeof *opts);
  opts->backing = true;
  opts->max_depth = QCOW2_MAX_DEPTH;
  opts->l2_cache_size = QCOW2_DEFAULT_L2_CACHE_SIZE;
}

int
qcow2_open (const struct qcow2_io *io, const char *name,
            const struct qcow2_options *opts, struct qcow2_image **ret,
            char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen, 0 };
  struct qcow2_io tmp = *io;
  struct chain_ids ids = { .n = 0 };
  struct qcow2_image *img;
  struct layer *l;

  if (errbuf && errlen)
    errbuf[0] = '\0';
  img = calloc (1, sizeof *img);
  if (img == NULL) {
    q2_seterr_oom (&e, name);
    if (io->close)
      io->close (io->opaque);
    errno = ENOMEM;
    return -1;
  }
  if (open_layer (opts, &tmp, name, false, 0, &ids, &img->top, &e) == -1) {
    free (img);
    errno = e.errnum ? e.errnum : EIO;
    return -1;
  }
  for (l = img->top; l; l = l->backing)
    img->depth++;
  img->debug = opts->debug;
  img->debug_opaque = opts->debug_opaque;
  img->cancel = opts->cancel;
  img->cancel_opaque = opts->cancel_opaque;
  if (pthread_mutex_init (&img->bm_lock, NULL) != 0) {
    q2_seterr (&e, name, "pthread_mutex_init failed");
    layer_free (img->top);
    free (img);
    errno = EIO;
    return -1;
  }
  img->bm_lock_ok = true;
  *ret = img;
  return 0;
}

int
qcow2_open_mem (const void *buf, size_t len, const char *name,
                const struct qcow2_options *opts, struct qcow2_image **ret,
                char *errbuf, size_t errlen)
{
  struct qcow2_io io;

  qcow2_mem_io (buf, len, &io);
  return qcow2_open (&io, name, opts, ret, errbuf, errlen);
}

int
qcow2_open_file (const char *path, const struct qcow2_options *opts,
                 struct qcow2_image **ret, char *errbuf, size_t errlen)
{
  struct qcow2_options o = *opts;
  struct qcow2_io io;

  if (o.open_file == NULL)
    o.open_file = qcow2_posix_open;
  if (qcow2_posix_open (NULL, path, &io, errbuf, errlen) == -1)
    return -1;
  return qcow2_open (&io, path, &o, ret, errbuf, errlen);
}

void
qcow2_close (struct qcow2_image *img)
{
  struct layer *l;

  if (img == NULL)
    return;
  if (img->debug) {
    for (l = img->top; l; l = l->backing) {
      char msg[256];
      if (l->raw || !l->cache_ok)
        continue;
      snprintf (msg, sizeof msg, "layer %u: %s: L2 cache %" PRIu32
                " slices of %" PRIu32 " bytes, %" PRIu64 " hits, %" PRIu64
                " misses", l->depth, l->name, l->cache.nslots,
                l->slice_bytes, l->cache.hits, l->cache.misses);
      img->debug (img->debug_opaque, msg);
      snprintf (msg, sizeof msg, "layer %u: %s: compressed clusters "
                "inflated: %" PRIu64 " by libdeflate, %" PRIu64 " by zlib; "
                "%" PRIu64 " zstd", l->depth, l->name, l->inflated_fast,
                l->inflated_zlib, l->inflated_zstd);
      img->debug (img->debug_opaque, msg);
    }
  }
  layer_free (img->top);
  if (img->bm_lock_ok)
    pthread_mutex_destroy (&img->bm_lock);
  free (img);
}

uint64_t
qcow2_get_size (const struct qcow2_image *img)
{
  return img->top->size;
}

uint32_t
qcow2_get_cluster_size (const struct qcow2_image *img)
{
  return img->top->cluster_size;
}

unsigned
qcow2_get_depth (const struct qcow2_image *img)
{
  return img->depth;
}
