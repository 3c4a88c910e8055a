/* sparsebackup: qcow2 reader: compressed clusters (zlib and zstd) and
 * the per-layer pool of decompression scratch space.
 *
 * zlib clusters are raw deflate streams.  QEMU inflates them with zlib
 * and accepts exactly what fills the cluster; zlib is the reference
 * here too.  When built with libdeflate (configure --with-libdeflate),
 * a stream that zlib and libdeflate provably decode the same way is
 * inflated by libdeflate, which is faster (see q2_inflate); anything
 * else, and anything libdeflate does not decode to exactly one cluster,
 * goes to zlib, whose verdict and message stand.
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
#ifdef HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif

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
#ifdef HAVE_LIBDEFLATE
  if (s->ld)
    libdeflate_free_decompressor (s->ld);
#endif
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

const char *
qcow2_zlib_decoder (void)
{
#ifdef HAVE_LIBDEFLATE
  return "libdeflate " LIBDEFLATE_VERSION_STRING;
#else
  return "zlib";
#endif
}

uint64_t q2_zlib_crosscheck_failures;
bool q2_zlib_crosscheck;

/* Inflate IN into exactly OUTLEN bytes at OUT with zlib, as QEMU does:
 * raw deflate, a 4 KiB window, one call with Z_FINISH; accepted when
 * the output fills OUT, whether the stream ended there (extra input
 * after its end is allowed: the stored size is rounded up to sectors)
 * or goes on (Z_BUF_ERROR).
 */
int
q2_inflate_zlib (struct scratch *s, const uint8_t *in, size_t inlen,
                 uint8_t *out, size_t outlen, const char **why)
{
  z_stream *zs = &s->zs;
  int zr;

  if (!s->zs_ok) {
    memset (zs, 0, sizeof *zs);
    if (inflateInit2 (zs, -12) != Z_OK) {
      *why = "inflateInit2 failed";
      return -1;
    }
    s->zs_ok = true;
  }
  else if (inflateReset (zs) != Z_OK) {
    *why = "inflateReset failed";
    return -1;
  }
  zs->next_in = (uint8_t *) in;
  zs->avail_in = inlen;
  zs->next_out = out;
  zs->avail_out = outlen;
  zr = inflate (zs, Z_FINISH);
  if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) ||
      zs->avail_out != 0) {
    *why = zs->avail_out != 0 && zr >= 0 ? "data too short" :
      zs->msg ? zs->msg : "error";
    return -1;
  }
  return 0;
}

#ifdef HAVE_LIBDEFLATE

/* Whether zlib and libdeflate decode the raw deflate stream IN the same
 * way.  They differ on streams that RFC 1951 forbids, which libdeflate
 * decodes and zlib refuses: more than 286 literal/length or 30 distance
 * codes, the symbols 286, 287 and the distances 30, 31 of the fixed
 * codes, code length repeats running past the end, incomplete codes
 * (libdeflate gives the unused half of a one-codeword code to that
 * codeword, and decodes an empty distance code as distance 1).  Where a
 * block starts is only known by decoding the one before it, so only a
 * stream whose first block is its last is checked: a stored block, or
 * a dynamic block with at most 286 + 30 codes, code length repeats that
 * stay inside, and complete codes (the precode, the literal/length code
 * with end-of-block, the distance code).  zlib's deflate writes complete
 * codes; a cluster holds one block unless it needs more than 32767
 * symbols (zlib's default memLevel 8 makes that 16383).  Anything else
 * is left to zlib.
 */

struct bitrd {
  const uint8_t *p;
  size_t len;
  size_t pos;                   /* in bits */
};

/* The next N (<= 16) bits, least significant first; -1 past the end. */
static int32_t
getbits (struct bitrd *b, unsigned n)
{
  uint32_t v = 0;
  unsigned i;

  if (b->pos + n > 8 * b->len)
    return -1;
  for (i = 0; i < n; ++i, ++b->pos)
    v |= (uint32_t) ((b->p[b->pos / 8] >> (b->pos % 8)) & 1) << i;
  return v;
}

/* 1 if the code lengths LENS[0..N) (each <= 15) fill the code space
 * exactly, 0 if not (incomplete or oversubscribed).
 */
static int
complete_code (const uint8_t *lens, unsigned n)
{
  uint32_t used = 0;            /* in units of 2^-15 */
  unsigned i;

  for (i = 0; i < n; ++i)
    if (lens[i])
      used += UINT32_C(1) << (15 - lens[i]);
  return used == UINT32_C(1) << 15;
}

/* Decode one symbol of the complete canonical code of the precode
 * (lengths PRE[0..19), at most 7 bits), -1 at the end of the input.
 */
static int
precode_symbol (struct bitrd *b, const uint8_t *pre)
{
  unsigned len, code = 0, first = 0, sym;
  unsigned count[8] = { 0 };

  for (sym = 0; sym < 19; ++sym)
    count[pre[sym]]++;
  count[0] = 0;
  for (len = 1; len <= 7; ++len) {
    int32_t bit = getbits (b, 1);
    unsigned idx, k;
    if (bit < 0)
      return -1;
    code = (code << 1) | (unsigned) bit;
    if (code - first < count[len]) {
      /* The (code - first)-th symbol of length LEN, in symbol order. */
      idx = code - first;
      for (sym = 0, k = 0; sym < 19; ++sym)
        if (pre[sym] == len && k++ == idx)
          return sym;
    }
    first = (first + count[len]) << 1;
  }
  return -1;                    /* cannot happen: the code is complete */
}

static bool
libdeflate_agrees (const uint8_t *in, size_t inlen)
{
  static const uint8_t order[19] = {
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15
  };
  struct bitrd b = { in, inlen, 0 };
  uint8_t pre[19] = { 0 }, lens[286 + 30];
  int32_t bfinal, btype, hlit, hdist, hclen;
  unsigned i, n;

  bfinal = getbits (&b, 1);
  btype = getbits (&b, 2);
  if (bfinal != 1 || btype < 0)
    return false;
  if (btype == 0)
    return true;                /* stored: the same rules in both */
  if (btype != 2)
    return false;
  hlit = getbits (&b, 5);
  hdist = getbits (&b, 5);
  hclen = getbits (&b, 4);
  if (hlit < 0 || hdist < 0 || hclen < 0 || hlit + 257 > 286 ||
      hdist + 1 > 30)
    return false;
  for (i = 0; i < (unsigned) hclen + 4; ++i) {
    int32_t v = getbits (&b, 3);
    if (v < 0)
      return false;
    pre[order[i]] = v;
  }
  if (!complete_code (pre, 19))
    return false;
  n = hlit + 257 + hdist + 1;
  for (i = 0; i < n; ) {
    int sym = precode_symbol (&b, pre);
    int32_t rep;
    uint8_t val = 0;
    if (sym < 0)
      return false;
    if (sym < 16) {
      lens[i++] = sym;
      continue;
    }
    if (sym == 16) {
      if (i == 0)
        return false;
      val = lens[i - 1];
      rep = getbits (&b, 2);
      rep = rep < 0 ? -1 : rep + 3;
    }
    else if (sym == 17) {
      rep = getbits (&b, 3);
      rep = rep < 0 ? -1 : rep + 3;
    }
    else {
      rep = getbits (&b, 7);
      rep = rep < 0 ? -1 : rep + 11;
    }
    if (rep < 0 || i + rep > n)
      return false;
    while (rep-- > 0)
      lens[i++] = val;
  }
  return lens[256] != 0 &&
    complete_code (lens, hlit + 257) &&
    complete_code (lens + hlit + 257, hdist + 1);
}

#endif /* HAVE_LIBDEFLATE */

int
q2_inflate (struct scratch *s, const uint8_t *in, size_t inlen,
            uint8_t *out, size_t outlen, const char **why, bool *fast)
{
  *fast = false;
#ifdef HAVE_LIBDEFLATE
  if (libdeflate_agrees (in, inlen)) {
    size_t got;
    enum libdeflate_result r;

    if (s->ld == NULL) {
      s->ld = libdeflate_alloc_decompressor ();
      if (s->ld == NULL) {
        *why = "out of memory";
        return -1;
      }
    }
    r = libdeflate_deflate_decompress (s->ld, in, inlen, out, outlen, &got);
    if (r == LIBDEFLATE_SUCCESS && got == outlen) {
      *fast = true;
      if (q2_zlib_crosscheck) {
        /* Tests and fuzzing: zlib must agree, byte for byte. */
        uint8_t *o2 = malloc (outlen);
        const char *w;
        if (o2 == NULL) {
          *why = "out of memory";
          return -1;
        }
        if (q2_inflate_zlib (s, in, inlen, o2, outlen, &w) == -1 ||
            memcmp (o2, out, outlen) != 0) {
          __atomic_add_fetch (&q2_zlib_crosscheck_failures, 1,
                              __ATOMIC_SEQ_CST);
          free (o2);
          *why = "libdeflate and zlib disagree";
          return -1;
        }
        free (o2);
      }
      return 0;
    }
    /* Anything else (too short, too long: QEMU accepts the start of a
     * longer stream; corrupt): zlib decides, with its message.
     */
  }
#endif
  return q2_inflate_zlib (s, in, inlen, out, outlen, why);
}

/* Inflate the INLEN bytes of s->cbuf into exactly one cluster at OUT. */
static int
inflate_cluster (struct layer *l, struct scratch *s, const struct run *r,
                 size_t inlen, uint8_t *out, struct err *e)
{
  const char *why;
  bool fast;

  if (q2_inflate (s, s->cbuf, inlen, out, l->cluster_size, &why,
                  &fast) == -1) {
    if (strcmp (why, "out of memory") == 0)
      q2_seterr_oom (e, l->name);
    else
      q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                 " (guest offset 0x%" PRIx64 ") is corrupt: zlib %s",
                 r->host, r->cstart, why);
    return -1;
  }
  __atomic_add_fetch (fast ? &l->inflated_fast : &l->inflated_zlib, 1,
                      __ATOMIC_RELAXED);
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
  if (zstd_cluster (l, s, r, inlen, out, e) == -1)
    return -1;
  __atomic_add_fetch (&l->inflated_zstd, 1, __ATOMIC_RELAXED);
  return 0;
}
