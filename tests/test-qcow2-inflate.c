/* sparsebackup: the inflate of zlib compressed qcow2 clusters accepts
 * exactly what QEMU's (zlib, raw deflate, 4 KiB window, one call with
 * Z_FINISH, accepted when the output fills the cluster) accepts, with
 * the same bytes, whichever decoder the build uses (q2_inflate: libdeflate
 * where it provably agrees with zlib, else zlib), on:
 *
 *  - streams written by zlib's deflate: one block (the libdeflate path),
 *    several blocks, extra bytes after the end, a stream ending short of
 *    the cluster (refused), one going on past it (accepted, cut), far
 *    matches (distances beyond the 4 KiB window), a stored block;
 *  - hand-made streams that RFC 1951 forbids, which zlib refuses and
 *    libdeflate decodes (shown by calling libdeflate directly): 287
 *    literal/length codes, 31 distance codes, symbol 286 of the fixed
 *    code, the unused half of a one-codeword distance code, a code
 *    length repeat running past the end.
 *
 * In a libdeflate build the streams of one final block must be decoded
 * by libdeflate (so that the test fails if the fast path is lost).
 */

#include <config.h>

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <zlib.h>
#ifdef HAVE_LIBDEFLATE
#include <libdeflate.h>
#endif

#include "qcow2-internal.h"

static int failures;

#define CHECK(cond, ...)                                        \
  do {                                                          \
    if (!(cond)) {                                              \
      fprintf (stderr, "FAIL: %s:%d: ", __FILE__, __LINE__);    \
      fprintf (stderr, __VA_ARGS__);                            \
      fprintf (stderr, "\n");                                   \
      failures++;                                               \
    }                                                           \
  } while (0)

/*----------------------------------------------------------------------
 * A raw deflate writer for the hand-made streams.
 */

struct bw {
  uint8_t buf[1 << 18];
  size_t bits;
};

static void
put (struct bw *w, uint32_t v, unsigned n)
{
  unsigned i;

  for (i = 0; i < n; ++i, ++w->bits) {
    if (w->bits % 8 == 0)
      w->buf[w->bits / 8] = 0;
    w->buf[w->bits / 8] |= ((v >> i) & 1) << (w->bits % 8);
  }
}

static size_t
bw_len (const struct bw *w)
{
  return (w->bits + 7) / 8;
}

/* Canonical codes of the lengths LENS[0..N). */
static void
canon (const uint8_t *lens, unsigned n, uint32_t *codes)
{
  unsigned count[16] = { 0 }, next[16], len, s;
  uint32_t code = 0;

  for (s = 0; s < n; ++s)
    count[lens[s]]++;
  count[0] = 0;
  for (len = 1; len < 16; ++len) {
    code = (code + count[len - 1]) << 1;
    next[len] = code;
  }
  for (s = 0; s < n; ++s)
    if (lens[s])
      codes[s] = next[lens[s]]++;
}

/* Huffman codes go most significant bit first. */
static void
put_code (struct bw *w, uint32_t code, unsigned len)
{
  while (len-- > 0)
    put (w, (code >> len) & 1, 1);
}

struct code {
  uint8_t lens[320];
  uint32_t codes[320];
  unsigned n;
};

static void
put_sym (struct bw *w, const struct code *c, unsigned sym)
{
  put_code (w, c->codes[sym], c->lens[sym]);
}

/* A dynamic block header for LIT (NLIT codes) and DIST (NDIST codes);
 * OVERRUN: end the code lengths with a zero repeat running past them.
 * The precode gives lengths 4 to 13 symbols and 5 to 6 (complete).
 */
static void
dynamic_header (struct bw *w, bool final, struct code *lit,
                struct code *dist, bool overrun)
{
  static const uint8_t order[19] = {
    16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15
  };
  struct code pre = { .n = 19 };
  unsigned i;

  for (i = 0; i < 19; ++i)
    pre.lens[i] = i < 13 ? 4 : 5;
  canon (pre.lens, 19, pre.codes);
  canon (lit->lens, lit->n, lit->codes);
  canon (dist->lens, dist->n, dist->codes);
  put (w, final, 1);
  put (w, 2, 2);
  put (w, lit->n - 257, 5);
  put (w, dist->n - 1, 5);
  put (w, 19 - 4, 4);
  for (i = 0; i < 19; ++i)
    put (w, pre.lens[order[i]], 3);
  for (i = 0; i < lit->n + dist->n; ++i) {
    unsigned len = i < lit->n ? lit->lens[i] : dist->lens[i - lit->n];
    if (overrun && i == lit->n + dist->n - 2) {
      put_sym (w, &pre, 18);    /* 11 + 127 zeros where 2 are left */
      put (w, 127, 7);
      return;
    }
    put_sym (w, &pre, len);
  }
}

/* Literals: 0..254 of 8 bits, 255 and end-of-block of 9 (complete);
 * lengths 257.. of N - 257 more symbols have length 0.
 */
static void
lit_code (struct code *c, unsigned n)
{
  unsigned i;

  memset (c, 0, sizeof *c);
  c->n = n;
  for (i = 0; i < 255; ++i)
    c->lens[i] = 8;
  c->lens[255] = 9;
  c->lens[256] = 9;
}

/*----------------------------------------------------------------------
 * The checks.
 */

static struct scratch scratch;

static uint8_t *
xmalloc (size_t n)
{
  uint8_t *p = malloc (n ? n : 1);
  if (p == NULL) {
    perror ("malloc");
    exit (EXIT_FAILURE);
  }
  return p;
}

/* Inflate IN to OUTLEN bytes both ways; they must agree.  WANT_OK: the
 * expected verdict; FAST: 1 must be libdeflate, 0 must be zlib, -1 any
 * (in a libdeflate build).  EXPECT: the bytes expected, or NULL.
 * Returns the reason of a refusal ("" if accepted).
 */
static const char *
check (const char *what, const uint8_t *in, size_t inlen, size_t outlen,
       bool want_ok, int fast, const uint8_t *expect)
{
  uint8_t *o1 = xmalloc (outlen), *o2 = xmalloc (outlen);
  const char *w1 = "", *w2 = "";
  bool used_fast;
  int r1, r2;

  r1 = q2_inflate (&scratch, in, inlen, o1, outlen, &w1, &used_fast);
  r2 = q2_inflate_zlib (&scratch, in, inlen, o2, outlen, &w2);
  printf ("%-28s %zu -> %zu bytes: %s%s%s (%s)\n", what, inlen, outlen,
          r1 == 0 ? "accepted" : "refused: ", r1 == 0 ? "" : w1,
          "", used_fast ? "libdeflate" : "zlib");
  CHECK (r1 == r2, "%s: q2_inflate %d, zlib %d (%s / %s)", what, r1, r2,
         w1, w2);
  CHECK ((r1 == 0) == want_ok, "%s: %s, expected %s", what,
         r1 == 0 ? "accepted" : "refused", want_ok ? "accepted" : "refused");
  if (r1 == 0 && r2 == 0)
    CHECK (memcmp (o1, o2, outlen) == 0, "%s: the bytes differ", what);
  if (r1 == -1 && r2 == -1)
    CHECK (strcmp (w1, w2) == 0, "%s: '%s' vs zlib's '%s'", what, w1, w2);
  if (r1 == 0 && expect)
    CHECK (memcmp (o1, expect, outlen) == 0, "%s: not the data", what);
#ifdef HAVE_LIBDEFLATE
  if (fast >= 0)
    CHECK (used_fast == (fast == 1), "%s: decoded by %s, expected %s", what,
           used_fast ? "libdeflate" : "zlib", fast ? "libdeflate" : "zlib");
#else
  CHECK (!used_fast, "%s: a fast path without libdeflate", what);
#endif
  free (o1);
  free (o2);
  return r1 == 0 ? "" : w1;
}

/* libdeflate alone decodes IN to exactly OUTLEN bytes (to show that the
 * stream is one where it differs from zlib).
 */
static void
libdeflate_alone_accepts (const char *what, const uint8_t *in, size_t inlen,
                          size_t outlen)
{
#ifdef HAVE_LIBDEFLATE
  struct libdeflate_decompressor *d = libdeflate_alloc_decompressor ();
  uint8_t *o = xmalloc (outlen);
  size_t got = 0;
  enum libdeflate_result r;

  r = libdeflate_deflate_decompress (d, in, inlen, o, outlen, &got);
  CHECK (r == LIBDEFLATE_SUCCESS && got == outlen,
         "%s: libdeflate alone: result %d, %zu bytes (the test no longer "
         "shows a difference)", what, (int) r, got);
  libdeflate_free_decompressor (d);
  free (o);
#endif
}

/* QEMU's deflate: raw, 4 KiB window, memLevel MEMLEVEL. */
static size_t
zdeflate (const uint8_t *in, size_t len, uint8_t *out, size_t outlen,
          int wbits, int memlevel)
{
  z_stream s;

  memset (&s, 0, sizeof s);
  if (deflateInit2 (&s, Z_DEFAULT_COMPRESSION, Z_DEFLATED, wbits, memlevel,
                    Z_DEFAULT_STRATEGY) != Z_OK) {
    fprintf (stderr, "deflateInit2 failed\n");
    exit (EXIT_FAILURE);
  }
  s.next_in = (uint8_t *) in;
  s.avail_in = len;
  s.next_out = out;
  s.avail_out = outlen;
  if (deflate (&s, Z_FINISH) != Z_STREAM_END) {
    fprintf (stderr, "deflate failed\n");
    exit (EXIT_FAILURE);
  }
  deflateEnd (&s);
  return outlen - s.avail_out;
}

#define CS 65536

int
main (void)
{
  static const char b64[] =
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  uint8_t *words = xmalloc (2 * CS), *rnd = xmalloc (CS);
  uint8_t *z = xmalloc (4 * CS), *zz = xmalloc (4 * CS);
  struct bw *w = calloc (1, sizeof *w);
  struct code lit, dist;
  size_t n, i;
  uint32_t seed = 1;

  if (w == NULL)
    return EXIT_FAILURE;
  for (i = 0; i < 2 * CS; ) {
    char word[32];
    int k, len;
    seed = seed * 1103515245 + 12345;
    len = snprintf (word, sizeof word, "w%uq%u ", (seed >> 16) % 4093,
                    (seed >> 8) % 13);
    for (k = 0; k < len && i < 2 * CS; ++k)
      words[i++] = word[k];
  }
  for (i = 0; i < CS; ++i) {
    seed = seed * 1103515245 + 12345;
    rnd[i] = b64[(seed >> 16) % 64];
  }

  /* Written by zlib's deflate. */
  n = zdeflate (words, CS, z, 4 * CS, -12, 9);
  check ("text, one block", z, n, CS, true, 1, words);
  memcpy (zz, z, n);
  memset (zz + n, 0xa5, 512);
  check ("text + 512 bytes after", zz, n + 512, CS, true, 1, words);
  check ("text, in a larger cluster", z, n, 2 * CS, false, -1, NULL);
  n = zdeflate (words, CS - 4096, z, 4 * CS, -12, 9);
  CHECK (strcmp (check ("text ending 4K short", z, n, CS, false, -1, NULL),
                 "data too short") == 0, "not 'data too short'");
  n = zdeflate (words, 2 * CS, z, 4 * CS, -12, 9);
  check ("text going on past the end", z, n, CS, true, 0, words);
  check ("... its first 3/4 only", z, n * 3 / 4, CS, true, 0, words);
  check ("... cut earlier", z, n / 8, CS, false, -1, NULL);
  n = zdeflate (rnd, CS, z, 4 * CS, -12, 9);
  check ("base64, several blocks", z, n, CS, true, 0, rnd);
  n = zdeflate (rnd, CS, z, 4 * CS, -12, 8);
  check ("base64, memLevel 8", z, n, CS, true, 0, rnd);
  for (i = 0; i < CS; ++i)
    zz[i] = rnd[i % 20000];
  n = zdeflate (zz, CS, z, 4 * CS, -15, 9);
  check ("distances up to 20000", z, n, CS, true, -1, zz);
  n = zdeflate (zz, CS, z, 4 * CS, -15, 9);
  z[0] ^= 0x20;                 /* a bit of the first code lengths */
  check ("... damaged", z, n, CS, false, -1, NULL);
  check ("empty input", z, 0, CS, false, 0, NULL);

  /* A stored block. */
  w->bits = 0;
  put (w, 1, 1);
  put (w, 0, 2);
  w->bits = 8;
  put (w, 1024, 16);
  put (w, 0xffff ^ 1024, 16);
  memcpy (w->buf + 5, words, 1024);
  check ("stored block", w->buf, 5 + 1024, 1024, true, 1, words);
  w->buf[3] ^= 1;
  check ("stored block, bad NLEN", w->buf, 5 + 1024, 1024, false, 0, NULL);

  /* Hand-made: a dynamic block of literals, complete codes. */
  lit_code (&lit, 257);
  memset (&dist, 0, sizeof dist);
  dist.n = 2;
  dist.lens[0] = dist.lens[1] = 1;
  w->bits = 0;
  dynamic_header (w, true, &lit, &dist, false);
  for (i = 0; i < 4096; ++i)
    put_sym (w, &lit, words[i]);
  put_sym (w, &lit, 256);
  check ("hand-made, valid", w->buf, bw_len (w), 4096, true, 1, words);

  /* 287 literal/length codes: zlib refuses. */
  lit_code (&lit, 287);
  w->bits = 0;
  dynamic_header (w, true, &lit, &dist, false);
  for (i = 0; i < 4096; ++i)
    put_sym (w, &lit, words[i]);
  put_sym (w, &lit, 256);
  CHECK (strcmp (check ("287 literal/length codes", w->buf, bw_len (w),
                        4096, false, 0, NULL),
                 "too many length or distance symbols") == 0, "message");
  libdeflate_alone_accepts ("287 literal/length codes", w->buf, bw_len (w),
                            4096);

  /* 31 distance codes. */
  lit_code (&lit, 257);
  memset (&dist, 0, sizeof dist);
  dist.n = 31;
  dist.lens[0] = dist.lens[1] = 1;
  w->bits = 0;
  dynamic_header (w, true, &lit, &dist, false);
  for (i = 0; i < 4096; ++i)
    put_sym (w, &lit, words[i]);
  put_sym (w, &lit, 256);
  check ("31 distance codes", w->buf, bw_len (w), 4096, false, 0, NULL);
  libdeflate_alone_accepts ("31 distance codes", w->buf, bw_len (w), 4096);

  /* A code length repeat running past the end. */
  lit_code (&lit, 257);
  memset (&dist, 0, sizeof dist);
  dist.n = 2;
  dist.lens[0] = dist.lens[1] = 1;
  w->bits = 0;
  dynamic_header (w, true, &lit, &dist, true);
  for (i = 0; i < 4096; ++i)
    put_sym (w, &lit, words[i]);
  put_sym (w, &lit, 256);
  check ("repeat past the end", w->buf, bw_len (w), 4096, false, 0, NULL);

  /* A distance code of one codeword, its unused half '1' used. */
  lit_code (&lit, 258);
  lit.lens[256] = 10;            /* end-of-block and length 3 share 9 */
  lit.lens[257] = 10;
  memset (&dist, 0, sizeof dist);
  dist.n = 1;
  dist.lens[0] = 1;
  w->bits = 0;
  dynamic_header (w, true, &lit, &dist, false);
  for (i = 0; i < 4093; ++i)
    put_sym (w, &lit, words[i]);
  put_sym (w, &lit, 257);       /* length 3 */
  put (w, 1, 1);                /* distance codeword '1' */
  put_sym (w, &lit, 256);
  check ("unused distance codeword", w->buf, bw_len (w), 4096, false, 0,
         NULL);
  libdeflate_alone_accepts ("unused distance codeword", w->buf, bw_len (w),
                            4096);

  /* The fixed code's symbol 286. */
  memset (&lit, 0, sizeof lit);
  lit.n = 288;
  for (i = 0; i < 288; ++i)
    lit.lens[i] = i < 144 ? 8 : i < 256 ? 9 : i < 280 ? 7 : 8;
  canon (lit.lens, 288, lit.codes);
  w->bits = 0;
  put (w, 1, 1);
  put (w, 1, 2);
  for (i = 0; i < 4096 - 258; ++i)
    put_sym (w, &lit, 'a');
  put_sym (w, &lit, 286);
  put_code (w, 0, 5);           /* distance 1 */
  put_sym (w, &lit, 256);
  CHECK (strcmp (check ("fixed code, symbol 286", w->buf, bw_len (w), 4096,
                        false, 0, NULL),
                 "invalid literal/length code") == 0, "message");
  libdeflate_alone_accepts ("fixed code, symbol 286", w->buf, bw_len (w),
                            4096);
  /* ... and a valid fixed block (left to zlib). */
  w->bits = 0;
  put (w, 1, 1);
  put (w, 1, 2);
  for (i = 0; i < 4096; ++i)
    put_sym (w, &lit, words[i]);
  put_sym (w, &lit, 256);
  check ("fixed code, valid", w->buf, bw_len (w), 4096, true, 0, words);

  if (scratch.zs_ok)
    inflateEnd (&scratch.zs);
#ifdef HAVE_LIBDEFLATE
  if (scratch.ld)
    libdeflate_free_decompressor (scratch.ld);
#endif
  free (words);
  free (rnd);
  free (z);
  free (zz);
  free (w);
  printf ("zlib clusters are inflated by: %s\n", qcow2_zlib_decoder ());
  if (failures) {
    fprintf (stderr, "%d failures\n", failures);
    return EXIT_FAILURE;
  }
  return EXIT_SUCCESS;
}
