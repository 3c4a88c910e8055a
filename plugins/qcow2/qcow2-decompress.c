/* sparsebackup: qcow2 reader: compressed clusters (zlib and zstd) and
 * the per-layer pool of decompression scratch space.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2-internal.h"
#include "minmax.h"

/* A layer keeps at most this many bytes of compressed-cluster scratch
 * space for reuse (counting a rough 256 KiB for the decompression
 * context), and at least 2 scratch spaces.
 */
#define POOL_BYTES (64 * 1024 * 1024)

static void
scratch_free (struct scratch *s)
{
  if (s == NULL)
    return;
  free (s->cbuf);
  free (s->obuf);
  ZSTD_freeDCtx (s->zctx);
  if (s->zs_ok)
    inflateEnd (&s->zs);
  free (s);
}

int
q2_pool_init (struct layer *l, struct err *e)
{
  if (pthread_mutex_init (&l->pool_lock, NULL) != 0) {
    q2_seterr (e, l->name, "pthread_mutex_init failed");
    return -1;
  }
  l->pool_ok = true;
  l->pool_max = POOL_BYTES / (3 * l->cluster_size + 256 * 1024);
  if (l->pool_max < 2)
    l->pool_max = 2;
  return 0;
}

void
q2_pool_free (struct layer *l)
{
  if (!l->pool_ok)
    return;
  while (l->pool) {
    struct scratch *s = l->pool;
    l->pool = s->next;
    scratch_free (s);
  }
  pthread_mutex_destroy (&l->pool_lock);
  l->pool_ok = false;
}

struct scratch *
q2_scratch_get (struct layer *l, struct err *e)
{
  struct scratch *s;

  pthread_mutex_lock (&l->pool_lock);
  s = l->pool;
  if (s) {
    l->pool = s->next;
    l->pool_n--;
  }
  pthread_mutex_unlock (&l->pool_lock);
  if (s)
    return s;

  s = calloc (1, sizeof *s);
  if (s)
    s->cbuf = malloc (2 * l->cluster_size);
  if (s == NULL || s->cbuf == NULL) {
    free (s);
    q2_seterr_oom (e, l->name);
    return NULL;
  }
  return s;
}

void
q2_scratch_put (struct layer *l, struct scratch *s)
{
  pthread_mutex_lock (&l->pool_lock);
  if (l->pool_n < l->pool_max) {
    s->next = l->pool;
    l->pool = s;
    l->pool_n++;
    s = NULL;
  }
  pthread_mutex_unlock (&l->pool_lock);
  scratch_free (s);
}

/* Inflate the INLEN bytes of s->cbuf (raw deflate, 4 KiB window, as
 * QEMU writes them) into exactly one cluster at OUT.  Extra input after
 * the end of the stream is allowed (the stored size is rounded up to
 * sectors).
 */
static int
inflate_cluster (struct layer *l, struct scratch *s, const struct run *r,
                 size_t inlen, uint8_t *out, struct err *e)
{
  z_stream *zs = &s->zs;
  int zr;

  if (!s->zs_ok) {
    memset (zs, 0, sizeof *zs);
    if (inflateInit2 (zs, -12) != Z_OK) {
      q2_seterr (e, l->name, "zlib: inflateInit2 failed");
      return -1;
    }
    s->zs_ok = true;
  }
  else if (inflateReset (zs) != Z_OK) {
    q2_seterr (e, l->name, "zlib: inflateReset failed");
    return -1;
  }
  zs->next_in = s->cbuf;
  zs->avail_in = inlen;
  zs->next_out = out;
  zs->avail_out = l->cluster_size;
  zr = inflate (zs, Z_FINISH);
  if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) ||
      zs->avail_out != 0) {
    q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
               " (guest offset 0x%" PRIx64 ") is corrupt: zlib %s",
               r->host, r->cstart,
               zs->avail_out != 0 && zr >= 0 ? "data too short" :
               zs->msg ? zs->msg : "error");
    return -1;
  }
  return 0;
}

/* Decompress the zstd frames at the start of the INLEN bytes of s->cbuf
 * into exactly one cluster at OUT.  Like QEMU, accept one frame or
 * several consecutive ones filling the cluster together, and ignore
 * what follows them (the stored size is rounded up to sectors).
 *
 * Each frame is decoded in one shot into its place in OUT: the output
 * buffer is its own history, so no window buffer is needed whatever
 * window size the frame header declares (a frame compressed without a
 * known content size declares a large one), and the memory used is the
 * fixed decompression context.  A frame decoding to more than the room
 * left in the cluster is an error.
 */
static int
zstd_cluster (struct layer *l, struct scratch *s, const struct run *r,
              size_t inlen, uint8_t *out, struct err *e)
{
  const uint8_t *in = s->cbuf;
  size_t in_pos = 0, out_pos = 0, out_size = l->cluster_size;

  if (s->zctx == NULL) {
    s->zctx = ZSTD_createDCtx ();
    if (s->zctx == NULL) {
      q2_seterr_oom (e, l->name);
      return -1;
    }
  }
  while (out_pos < out_size) {
    size_t fsize, n;

    fsize = ZSTD_findFrameCompressedSize (in + in_pos, inlen - in_pos);
    if (ZSTD_isError (fsize)) {
      if (in_pos > 0)           /* something after the frame(s) */
        q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                   " (guest offset 0x%" PRIx64 ") is corrupt: zstd data "
                   "too short (0x%zx of 0x%zx bytes)",
                   r->host, r->cstart, out_pos, out_size);
      else
        q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                   " (guest offset 0x%" PRIx64 ") is corrupt: zstd: %s",
                   r->host, r->cstart, ZSTD_getErrorName (fsize));
      return -1;
    }
    n = ZSTD_decompressDCtx (s->zctx, out + out_pos, out_size - out_pos,
                             in + in_pos, fsize);
    if (ZSTD_isError (n)) {
      if (ZSTD_getErrorCode (n) == ZSTD_error_dstSize_tooSmall)
        q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                   " (guest offset 0x%" PRIx64 ") is corrupt: zstd data "
                   "larger than a cluster (0x%zx bytes)",
                   r->host, r->cstart, out_size);
      else
        q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                   " (guest offset 0x%" PRIx64 ") is corrupt: zstd: %s",
                   r->host, r->cstart, ZSTD_getErrorName (n));
      return -1;
    }
    in_pos += fsize;            /* fsize > 0: the loop ends */
    out_pos += n;
  }
  return 0;
}

/* Decompress the cluster of run R into OUT (cluster_size bytes). */
int
q2_decompress (struct layer *l, struct scratch *s, const struct run *r,
               uint8_t *out, struct err *e)
{
  uint64_t inlen = MIN (r->csize, l->io.size - r->host);

  if (inlen > 2 * l->cluster_size)      /* cannot happen: bounded by nsec */
    inlen = 2 * l->cluster_size;
  if (q2_io_read (&l->io, l->name, s->cbuf, inlen, r->host, e) == -1)
    return -1;
  if (l->compression == COMPRESSION_ZLIB)
    return inflate_cluster (l, s, r, inlen, out, e);
  return zstd_cluster (l, s, r, inlen, out, e);
}
