/* sparsebackup: qcow2 reader: reading and mapping the chain
 * (qcow2_pread, qcow2_map, qcow2_map_top, qcow2_map_since), on top of
 * the cluster walker.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "minmax.h"

struct read_ctx {
  uint8_t *buf;                 /* corresponds to guest offset BASE */
  uint64_t base;
  struct scratch *s;            /* taken at the first compressed cluster */
};

static int layer_read (struct layer *l, uint8_t *buf, uint64_t count,
                       uint64_t offset, struct err *e);

static int
read_run (struct layer *l, const struct run *r, void *opaque, struct err *e)
{
  struct read_ctx *c = opaque;
  uint8_t *dst = c->buf + (r->offset - c->base);

  switch (r->type) {
  case RUN_DATA:
    if (l->has_data_file)
      return q2_io_read (&l->data, l->data_name, dst, r->len, r->host, e);
    return q2_io_read (&l->io, l->name, dst, r->len, r->host, e);
  case RUN_ZERO:
    memset (dst, 0, r->len);
    return 0;
  case RUN_UNALLOC:
    if (l->backing)
      return layer_read (l->backing, dst, r->len, r->offset, e);
    memset (dst, 0, r->len);
    return 0;
  case RUN_COMPRESSED:
    if (c->s == NULL) {
      c->s = q2_scratch_get (l, e);
      if (c->s == NULL)
        return -1;
    }
    /* A whole cluster is decompressed straight into the caller's
     * buffer; only part of one goes through a bounce buffer.
     */
    if (r->offset == r->cstart && r->len == l->cluster_size)
      return q2_decompress (l, c->s, r, dst, e);
    if (c->s->obuf == NULL) {
      c->s->obuf = malloc (l->cluster_size);
      if (c->s->obuf == NULL) {
        q2_seterr_oom (e, l->name);
        return -1;
      }
    }
    if (q2_decompress (l, c->s, r, c->s->obuf, e) == -1)
      return -1;
    memcpy (dst, c->s->obuf + (r->offset - r->cstart), r->len);
    return 0;
  }
  q2_seterr (e, l->name, "internal error: bad run type");
  return -1;
}

static int
layer_read (struct layer *l, uint8_t *buf, uint64_t count, uint64_t offset,
            struct err *e)
{
  struct read_ctx c;
  int r;

  if (count == 0)
    return 0;
  if (offset >= l->size) {
    memset (buf, 0, count);
    return 0;
  }
  if (count > l->size - offset) {
    uint64_t in = l->size - offset;
    memset (buf + in, 0, count - in);
    count = in;
  }
  if (l->raw)
    return q2_io_read (&l->io, l->name, buf, count, offset, e);

  c.buf = buf;
  c.base = offset;
  c.s = NULL;
  r = q2_walk (l, offset, count, read_run, &c, e);
  if (c.s)
    q2_scratch_put (l, c.s);
  return r == -1 ? -1 : 0;
}

int
qcow2_pread (struct qcow2_image *img, void *buf, size_t count,
             uint64_t offset, char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen, 0 };

  if (offset > img->top->size || count > img->top->size - offset) {
    q2_seterr (&e, img->top->name, "read beyond the end of the disk "
               "(offset 0x%" PRIx64 ", count 0x%zx)", offset, count);
    errno = EINVAL;
    return -1;
  }
  if (layer_read (img->top, buf, count, offset, &e) == -1) {
    errno = e.errnum ? e.errnum : EIO;
    return -1;
  }
  return 0;
}

/*----------------------------------------------------------------------
 * Mapping.
 */

struct mapper {
  qcow2_extent_fn fn;
  void *opaque;
  struct err *e;                /* errno of a failing callback */
  bool top_only;                /* qcow2_map_top */
  bool since;                   /* qcow2_map_since: zero is ZERO alone */
  bool have;
  uint64_t off, len;
  uint32_t flags;
};

#define ZERO_FLAGS (QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO)

static int
map_out (struct mapper *m, uint64_t off, uint64_t len, uint32_t flags)
{
  int r;

  if (len == 0)
    return 0;
  if (m->since && (flags & QCOW2_EXTENT_ZERO))
    flags = QCOW2_EXTENT_ZERO;
  if (m->have && m->flags == flags && m->off + m->len == off) {
    m->len += len;
    return 0;
  }
  if (m->have) {
    errno = 0;
    r = m->fn (m->opaque, m->off, m->len, m->flags);
    if (r == -1)
      m->e->errnum = errno ? errno : EIO;
    if (r != 0)
      return r;
  }
  m->have = true;
  m->off = off;
  m->len = len;
  m->flags = flags;
  return 0;
}

static int layer_map (struct layer *l, uint64_t offset, uint64_t count,
                      struct mapper *m, struct err *e);

static int
map_run (struct layer *l, const struct run *r, void *opaque, struct err *e)
{
  struct mapper *m = opaque;

  switch (r->type) {
  case RUN_DATA:
  case RUN_COMPRESSED:
    return map_out (m, r->offset, r->len, 0);
  case RUN_ZERO:
    return map_out (m, r->offset, r->len,
                    m->top_only ? QCOW2_EXTENT_ZERO : ZERO_FLAGS);
  case RUN_UNALLOC:
    if (m->top_only)
      return map_out (m, r->offset, r->len, QCOW2_EXTENT_HOLE);
    if (l->backing)
      return layer_map (l->backing, r->offset, r->len, m, e);
    return map_out (m, r->offset, r->len, ZERO_FLAGS);
  }
  q2_seterr (e, l->name, "internal error: bad run type");
  return -1;
}

static int
layer_map (struct layer *l, uint64_t offset, uint64_t count,
           struct mapper *m, struct err *e)
{
  int r;

  if (count == 0)
    return 0;
  if (offset >= l->size)
    return map_out (m, offset, count, ZERO_FLAGS);
  if (count > l->size - offset) {
    uint64_t in = l->size - offset;
    r = layer_map (l, offset, in, m, e);
    if (r != 0)
      return r;
    return map_out (m, offset + in, count - in, ZERO_FLAGS);
  }
  if (l->raw) {
    while (count > 0) {
      uint64_t len = count;
      int is_data = 1;

      if (offset >= l->io.size)
        return map_out (m, offset, count, ZERO_FLAGS);
      if (l->io.extent == NULL ||
          l->io.extent (l->io.opaque, offset,
                        MIN (count, l->io.size - offset),
                        &len, &is_data) == -1 ||
          len == 0 || len > count) {
        len = MIN (count, l->io.size - offset);
        is_data = 1;
      }
      r = map_out (m, offset, len, is_data ? 0 : ZERO_FLAGS);
      if (r != 0)
        return r;
      offset += len;
      count -= len;
    }
    return 0;
  }
  return q2_walk (l, offset, count, map_run, m, e);
}

/* @since: the unchanged parts are holes, the changed ones mapped like
 * the chain.
 */
static int
since_map (struct qcow2_image *img, const struct qcow2_bitmap *bm,
           uint64_t offset, uint64_t count, struct mapper *m, struct err *e)
{
  struct bm_cursor *cur;
  int r = 0;

  cur = calloc (bm->n, sizeof *cur);
  if (cur == NULL) {
    q2_seterr_oom (e, img->top->name);
    return -1;
  }
  while (count > 0) {
    uint64_t len;
    bool dirty;

    r = q2_bitmap_run (bm, cur, offset, count, &len, &dirty, e);
    if (r == 0)
      r = dirty ? layer_map (img->top, offset, len, m, e)
        : map_out (m, offset, len, QCOW2_EXTENT_HOLE);
    if (r != 0)
      break;
    offset += len;
    count -= len;
  }
  free (cur);
  return r;
}

static int
map_image (struct qcow2_image *img, bool top_only,
           const struct qcow2_bitmap *bm, uint64_t offset, uint64_t count,
           qcow2_extent_fn fn, void *opaque, char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen, 0 };
  struct mapper m = {
    .fn = fn, .opaque = opaque, .e = &e, .top_only = top_only,
    .since = bm != NULL, .have = false,
  };
  int r;

  if (offset > img->top->size || count > img->top->size - offset) {
    q2_seterr (&e, img->top->name, "map beyond the end of the disk "
               "(offset 0x%" PRIx64 ", count 0x%" PRIx64 ")", offset, count);
    errno = EINVAL;
    return -1;
  }
  if (bm)
    r = since_map (img, bm, offset, count, &m, &e);
  else
    r = layer_map (img->top, offset, count, &m, &e);
  if (r == 0 && m.have) {
    errno = 0;
    if (fn (opaque, m.off, m.len, m.flags) == -1) {
      e.errnum = errno ? errno : EIO;
      r = -1;
    }
  }
  if (r == -1) {
    errno = e.errnum ? e.errnum : EIO;
    return -1;
  }
  return 0;
}

int
qcow2_map (struct qcow2_image *img, uint64_t offset, uint64_t count,
           qcow2_extent_fn fn, void *opaque, char *errbuf, size_t errlen)
{
  return map_image (img, false, NULL, offset, count, fn, opaque,
                    errbuf, errlen);
}

int
qcow2_map_top (struct qcow2_image *img, uint64_t offset, uint64_t count,
               qcow2_extent_fn fn, void *opaque, char *errbuf, size_t errlen)
{
  return map_image (img, true, NULL, offset, count, fn, opaque,
                    errbuf, errlen);
}

int
qcow2_map_since (struct qcow2_image *img, const struct qcow2_bitmap *bm,
                 uint64_t offset, uint64_t count,
                 qcow2_extent_fn fn, void *opaque, char *errbuf, size_t errlen)
{
  return map_image (img, false, bm, offset, count, fn, opaque,
                    errbuf, errlen);
}
