/* sparsebackup: write small qcow2 images whose zstd compressed clusters
 * are shaped the way other zstd writers shape them (used by
 * test-qcow2-zstd-window.sh; run it with no arguments for the usage).
 *
 * QEMU compresses each cluster in one call, so its frames record the
 * content size and ask for a window no larger than the cluster.  A
 * frame written by a streaming compressor that does not know the size
 * in advance (e.g. `zstd -19` reading from a pipe) records no content
 * size and declares the full window of its level, 8 MiB at level 19;
 * QEMU still reads such clusters.  The frames here are made with
 * libzstd's streaming API in the same way, and the program checks that
 * they really declare a window larger than 4 MiB (what a decoder
 * limited to windowLog 22 refuses).
 *
 * KIND good: a 3.5-cluster disk:
 *   cluster 0  one frame, level 19, windowLog 23, no content size
 *   cluster 1  two frames (each half of the cluster), as QEMU accepts
 *   cluster 2  unallocated
 *   cluster 3  one frame like cluster 0, of half a cluster of text and
 *              zeros; only that half is inside the disk (if it is at
 *              least 512 bytes)
 * and RAW receives the expected disk content.
 * KIND big: cluster 0 decompresses to one cluster plus 512 bytes.
 * KIND short: cluster 0 decompresses to half a cluster.
 *
 * The images are complete (refcounts included: `qemu-img check` finds
 * nothing wrong with them).  The fuzz seeds
 * fuzz/corpus/c-zstd-window-{good,big,short}-1k.qcow2 were made with
 * `tests/qcow2-zstd-image 10 KIND FILE`.
 */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zstd.h>

#define die(...)                                        \
  do {                                                  \
    fprintf (stderr, "qcow2-zstd-image: " __VA_ARGS__); \
    fputc ('\n', stderr);                               \
    exit (1);                                           \
  } while (0)

static void
put_be16 (uint8_t *p, uint16_t v)
{
  p[0] = v >> 8;
  p[1] = v;
}

static void
put_be32 (uint8_t *p, uint32_t v)
{
  put_be16 (p, v >> 16);
  put_be16 (p + 2, v);
}

static void
put_be64 (uint8_t *p, uint64_t v)
{
  put_be32 (p, v >> 32);
  put_be32 (p + 4, v);
}

/* Deterministic, compressible text. */
static void
fill_text (uint8_t *p, size_t n, uint32_t seed)
{
  static const char *const words[] = {
    "sparse ", "backup ", "qcow2 ", "cluster ", "zstd ", "window ",
    "frame ", "nbdkit ", "plugin ", "offset ", "\n",
  };
  uint32_t x = seed * 2654435761U + 1;
  size_t i = 0;

  while (i < n) {
    const char *w;
    size_t len;

    x = x * 1103515245U + 12345;
    w = words[(x >> 16) % (sizeof words / sizeof words[0])];
    len = strlen (w);
    if (len > n - i)
      len = n - i;
    memcpy (p + i, w, len);
    i += len;
  }
}

/* Compress LEN bytes with the streaming API, the size unknown to the
 * compressor: no content size in the frame and the window of level 19.
 * Return the frame size.
 */
static size_t
compress_stream (const uint8_t *src, size_t len, uint8_t *dst, size_t cap)
{
  ZSTD_CCtx *cctx = ZSTD_createCCtx ();
  ZSTD_inBuffer in = { src, len, 0 };
  ZSTD_outBuffer out = { dst, cap, 0 };
  size_t r;

  if (cctx == NULL)
    die ("ZSTD_createCCtx failed");
  if (ZSTD_isError (ZSTD_CCtx_setParameter (cctx, ZSTD_c_compressionLevel,
                                            19)) ||
      ZSTD_isError (ZSTD_CCtx_setParameter (cctx, ZSTD_c_windowLog, 23)) ||
      ZSTD_isError (ZSTD_CCtx_setParameter (cctx, ZSTD_c_checksumFlag, 1)))
    die ("ZSTD_CCtx_setParameter failed");
  /* Feed the input with ZSTD_e_continue first, so that the compressor
   * never learns the total size (as when reading a pipe).
   */
  while (in.pos < in.size) {
    r = ZSTD_compressStream2 (cctx, &out, &in, ZSTD_e_continue);
    if (ZSTD_isError (r))
      die ("ZSTD_compressStream2: %s", ZSTD_getErrorName (r));
  }
  do {
    r = ZSTD_compressStream2 (cctx, &out, &in, ZSTD_e_end);
    if (ZSTD_isError (r))
      die ("ZSTD_compressStream2: %s", ZSTD_getErrorName (r));
    if (r != 0 && out.pos == out.size)
      die ("output buffer too small");
  } while (r != 0);
  ZSTD_freeCCtx (cctx);
  return out.pos;
}

/* Compress in one call (content size recorded, small window). */
static size_t
compress_simple (const uint8_t *src, size_t len, uint8_t *dst, size_t cap)
{
  size_t r = ZSTD_compress (dst, cap, src, len, 3);

  if (ZSTD_isError (r))
    die ("ZSTD_compress: %s", ZSTD_getErrorName (r));
  return r;
}

/* Check that FRAME declares no content size and a window > 4 MiB, and
 * that a streaming decoder limited to windowLog 22 refuses it.
 */
static void
check_big_window (const uint8_t *frame, size_t len)
{
  uint8_t fhd, wd;
  uint64_t wsize;
  ZSTD_DCtx *dctx;
  uint8_t out[4096];
  ZSTD_inBuffer in = { frame, len, 0 };
  ZSTD_outBuffer ob = { out, sizeof out, 0 };
  size_t r;

  if (ZSTD_getFrameContentSize (frame, len) != ZSTD_CONTENTSIZE_UNKNOWN)
    die ("the frame records its content size");
  fhd = frame[4];
  if (fhd & 0x20)
    die ("the frame is single-segment (no window descriptor)");
  wd = frame[5];
  wsize = UINT64_C(1) << (10 + (wd >> 3));
  wsize += (wsize / 8) * (wd & 7);
  if (wsize <= (UINT64_C(1) << 22))
    die ("the frame declares a window of only %llu bytes",
         (unsigned long long) wsize);

  dctx = ZSTD_createDCtx ();
  if (dctx == NULL)
    die ("ZSTD_createDCtx failed");
  ZSTD_DCtx_setParameter (dctx, ZSTD_d_windowLogMax, 22);
  r = ZSTD_decompressStream (dctx, &ob, &in);
  if (!ZSTD_isError (r))
    die ("a decoder limited to windowLog 22 accepts the frame");
  fprintf (stderr, "qcow2-zstd-image: frame of %zu bytes, no content size, "
           "window %llu bytes (windowLog 22 decoder: %s)\n",
           len, (unsigned long long) wsize, ZSTD_getErrorName (r));
  ZSTD_freeDCtx (dctx);
}

int
main (int argc, char *argv[])
{
  unsigned cb;
  uint64_t cs, vsize, nguest, x, hsize, p, fsize;
  const char *kind;
  uint8_t *img, *raw, *tmp, *l2, *rb;
  size_t cap, n, n2;
  uint64_t coff[4] = { 0 }, clen[4] = { 0 };
  unsigned g;
  FILE *f;

  if (argc < 4 || argc > 5) {
    fprintf (stderr, "usage: qcow2-zstd-image CLUSTER_BITS good|big|short "
             "OUT.qcow2 [OUT.raw]\n");
    exit (2);
  }
  cb = atoi (argv[1]);
  if (cb < 9 || cb > 16)
    die ("CLUSTER_BITS must be 9 to 16");
  kind = argv[2];
  if (strcmp (kind, "good") && strcmp (kind, "big") && strcmp (kind, "short"))
    die ("unknown kind '%s'", kind);
  cs = UINT64_C(1) << cb;
  nguest = 4;
  /* QEMU rounds the virtual size down to 512 bytes. */
  vsize = strcmp (kind, "good") == 0 ? 4 * cs - cs / 2 : 2 * cs;
  vsize &= ~UINT64_C(511);
  x = 62 - (cb - 8);

  /* Clusters: 0 header, 1 refcount table, 2 refcount block, 3 L1,
   * 4 L2, then the compressed data, packed from cluster 5 on.
   */
  cap = 16 * cs + 4096;
  img = calloc (1, 5 * cs + cap + cs);
  raw = calloc (1, nguest * cs);
  tmp = malloc (2 * cs);
  if (img == NULL || raw == NULL || tmp == NULL)
    die ("out of memory");
  hsize = 5 * cs;
  p = hsize;

  if (strcmp (kind, "good") == 0) {
    /* Cluster 0. */
    fill_text (raw, cs, 1);
    n = compress_stream (raw, cs, img + p, cap);
    check_big_window (img + p, n);
    coff[0] = p; clen[0] = n; p += n;
    /* Cluster 1: two frames. */
    fill_text (raw + cs, cs, 2);
    n = compress_simple (raw + cs, cs / 2, img + p, cap);
    n2 = compress_stream (raw + cs + cs / 2, cs / 2, img + p + n, cap);
    coff[1] = p; clen[1] = n + n2; p += n + n2;
    /* Cluster 3: the last, half of it beyond the end of the disk
     * (compressed as a whole cluster with a zero tail, as QEMU does).
     */
    fill_text (raw + 3 * cs, cs / 2, 3);
    n = compress_stream (raw + 3 * cs, cs, img + p, cap);
    check_big_window (img + p, n);
    coff[3] = p; clen[3] = n; p += n;
  }
  else if (strcmp (kind, "big") == 0) {
    fill_text (tmp, cs + 512, 4);
    n = compress_stream (tmp, cs + 512, img + p, cap);
    coff[0] = p; clen[0] = n; p += n;
  }
  else {
    fill_text (tmp, cs / 2, 5);
    n = compress_stream (tmp, cs / 2, img + p, cap);
    coff[0] = p; clen[0] = n; p += n;
  }
  fsize = (p + cs - 1) & ~(cs - 1);

  /* Header (version 3, 112 bytes with the compression type). */
  put_be32 (img, 0x514649fb);
  put_be32 (img + 4, 3);
  put_be32 (img + 20, cb);
  put_be64 (img + 24, vsize);
  put_be32 (img + 36, 1);                     /* l1_size */
  put_be64 (img + 40, 3 * cs);                /* l1_table_offset */
  put_be64 (img + 48, 1 * cs);                /* refcount_table_offset */
  put_be32 (img + 56, 1);                     /* refcount_table_clusters */
  put_be64 (img + 72, UINT64_C(1) << 3);      /* compression type bit */
  put_be32 (img + 96, 4);                     /* refcount_order */
  put_be32 (img + 100, 112);                  /* header_length */
  img[104] = 1;                               /* zstd */
  /* img + 112: end of header extensions (zeros). */

  /* Refcount table and block (16-bit refcounts). */
  put_be64 (img + cs, 2 * cs);
  rb = img + 2 * cs;
  if (fsize / cs > cs / 2)
    die ("image too large for one refcount block");
  for (g = 0; g < 5; ++g)
    put_be16 (rb + 2 * g, 1);

  /* L1 and L2. */
  put_be64 (img + 3 * cs, (UINT64_C(1) << 63) | (4 * cs));
  l2 = img + 4 * cs;
  for (g = 0; g < nguest; ++g) {
    uint64_t nsec, first, last, c;

    if (clen[g] == 0)
      continue;
    first = coff[g] >> 9;
    last = (coff[g] + clen[g] - 1) >> 9;
    nsec = last - first + 1;
    if (nsec > (UINT64_C(1) << (cb - 8)))
      die ("compressed cluster %u too large", g);
    put_be64 (l2 + 8 * g,
              (UINT64_C(1) << 62) | ((nsec - 1) << x) | coff[g]);
    for (c = coff[g] / cs; c <= (coff[g] + clen[g] - 1) / cs; ++c) {
      uint16_t v = (rb[2 * c] << 8 | rb[2 * c + 1]) + 1;
      put_be16 (rb + 2 * c, v);
    }
  }

  f = fopen (argv[3], "wb");
  if (f == NULL || fwrite (img, 1, fsize, f) != fsize || fclose (f) != 0)
    die ("%s: write failed", argv[3]);
  if (argc == 5) {
    f = fopen (argv[4], "wb");
    if (f == NULL || fwrite (raw, 1, vsize, f) != vsize || fclose (f) != 0)
      die ("%s: write failed", argv[4]);
  }
  for (g = 0; g < nguest; ++g)
    if (clen[g])
      printf ("cluster %u: offset 0x%llx, %llu bytes\n", g,
              (unsigned long long) coff[g], (unsigned long long) clen[g]);
  free (img);
  free (raw);
  free (tmp);
  return 0;
}
