/* sparsebackup-copy: manifests.  A SHA-256 hash (nettle) of every fixed
 * chunk of a disk, with the disk's size and the source (view) it came
 * from, so that a stored backup can be verified later without the
 * source.
 *
 * Format (version 1), a text file, every line ending with LF:
 *
 *   sparsebackup-copy manifest 1
 *   algorithm sha256
 *   size 10737418240
 *   chunk-size 1048576
 *   chunks 10240
 *   source-uri nbd+unix:///@frozen?socket=/run/disk.sock   (escaped)
 *   source-export @frozen                                  (escaped)
 *   source-description the disk as it was at backup-begin c1 (...)
 *   <64 lower-case hex digits: the hash of chunk 0>
 *   ... one line per chunk, in order; the last chunk may be short
 *   sha256 <hex of every byte above>
 *
 * chunk-size is a power of 2 from 4096 to 64M; chunks must be
 * ceil(size / chunk-size) and at most 2^24.  Loading checks all of it,
 * so memory is bounded (32 bytes per chunk).
 *
 * The hasher is fed the whole disk in order (data, zeroes, or "keep":
 * whole chunks whose hash is copied from the base manifest of a delta).
 */

#include <config.h>

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "minmax.h"
#include "ispowerof2.h"
#include "copy.h"

#define MANIFEST_MAGIC "sparsebackup-copy manifest"
#define MANIFEST_VERSION 1

uint64_t
default_chunk_size (uint64_t disk_size)
{
  uint64_t c = DEFAULT_CHUNK_SIZE;

  while (c < MAX_CHUNK_SIZE && (disk_size + c - 1) / c > MAX_CHUNKS)
    c <<= 1;
  return c;
}

static void
alloc_hashes (struct manifest *m)
{
  m->nr_chunks = m->size == 0 ? 0 : (m->size - 1) / m->chunk_size + 1;
  m->hash = calloc (m->nr_chunks ? m->nr_chunks : 1, HASH_SIZE);
  if (m->hash == NULL)
    out_of_memory ();
}

void
manifest_free (struct manifest *m)
{
  free (m->hash);
  free (m->src.uri);
  free (m->src.export);
  free (m->src.description);
  memset (m, 0, sizeof *m);
}

/* ---- The file --------------------------------------------------------- */

static void __attribute__ ((noreturn))
bad_manifest (const char *path, uint64_t lineno, const char *why)
{
  error_msg ("the manifest '%s' is not valid (line %" PRIu64 ": %s)",
             path, lineno, why);
  exit (EXIT_FAILURE);
}

static uint64_t
number_field (struct text_in *t, const char *key)
{
  const char *why, *v = text_in_key (t, key, 20, &why);
  uint64_t n;

  if (v == NULL)
    bad_manifest (t->path, t->lineno, why);
  if (!parse_u64 (v, &n))
    bad_manifest (t->path, t->lineno, "not a decimal number");
  return n;
}

static char *
string_field (struct text_in *t, const char *key)
{
  const char *why, *v = text_in_key (t, key, 3 * MAX_STRING, &why);
  char *s;

  if (v == NULL)
    bad_manifest (t->path, t->lineno, why);
  s = unescape_string (v);
  if (s == NULL)
    bad_manifest (t->path, t->lineno, "a badly escaped or too long string");
  return s;
}

void
manifest_load (const char *path, struct manifest *m)
{
  struct text_in t;
  struct stat st;
  const char *why, *v;
  uint64_t i, chunks;

  memset (m, 0, sizeof *m);
  if (text_in_open (&t, path) == -1) {
    error_msg ("cannot open the manifest '%s': %s", path, strerror (errno));
    exit (EXIT_FAILURE);
  }
  v = text_in_key (&t, MANIFEST_MAGIC, 10, &why);
  if (v == NULL)
    bad_manifest (path, t.lineno, why);
  if (strcmp (v, "1") != 0)
    bad_manifest (path, t.lineno, "an unknown version (this is version 1)");
  v = text_in_key (&t, "algorithm", 16, &why);
  if (v == NULL)
    bad_manifest (path, t.lineno, why);
  if (strcmp (v, "sha256") != 0)
    bad_manifest (path, t.lineno, "the algorithm is not sha256");
  m->size = number_field (&t, "size");
  if (m->size > INT64_MAX)
    bad_manifest (path, t.lineno, "the size is larger than 2^63-1");
  m->chunk_size = number_field (&t, "chunk-size");
  if (m->chunk_size < MIN_CHUNK_SIZE || m->chunk_size > MAX_CHUNK_SIZE ||
      !is_power_of_2 (m->chunk_size))
    bad_manifest (path, t.lineno,
                  "the chunk size is not a power of 2 from 4096 to 64M");
  chunks = number_field (&t, "chunks");
  if (chunks != (m->size == 0 ? 0 : (m->size - 1) / m->chunk_size + 1))
    bad_manifest (path, t.lineno,
                  "the number of chunks does not match the size");
  if (chunks > MAX_CHUNKS)
    bad_manifest (path, t.lineno, "more than 2^24 chunks");
  m->src.uri = string_field (&t, "source-uri");
  m->src.export = string_field (&t, "source-export");
  m->src.description = string_field (&t, "source-description");
  m->src.size = m->size;
  /* Each chunk takes a line of 65 bytes: a file too short for its count
   * is refused before the hashes are allocated.
   */
  if (fstat (fileno (t.fp), &st) == 0 &&
      (uint64_t) st.st_size / (2 * HASH_SIZE + 1) < chunks)
    bad_manifest (path, t.lineno, "the file is too short for its chunks");
  alloc_hashes (m);
  for (i = 0; i < chunks; i++) {
    if (!text_in_line (&t, 2 * HASH_SIZE, &why))
      bad_manifest (path, t.lineno, why);
    if (!parse_hex (t.line, m->hash[i], HASH_SIZE))
      bad_manifest (path, t.lineno,
                    "a chunk's hash is not 64 lower-case hex digits");
  }
  if (!text_in_end (&t, &why))
    bad_manifest (path, t.lineno, why);
  text_in_close (&t);
}

bool
manifest_save (const char *path, const struct manifest *m)
{
  static const char hexdigits[] = "0123456789abcdef";
  struct text_out t;
  char *uri, *export, *desc, line[2 * HASH_SIZE + 2];
  uint64_t i;
  size_t k;

  if (!text_out_begin (&t, path, MANIFEST_MAGIC, "manifest"))
    return false;
  uri = escape_string (m->src.uri);
  export = escape_string (m->src.export);
  desc = escape_string (m->src.description);
  text_printf (&t, MANIFEST_MAGIC " %d\n", MANIFEST_VERSION);
  text_printf (&t, "algorithm sha256\n");
  text_printf (&t, "size %" PRIu64 "\n", m->size);
  text_printf (&t, "chunk-size %" PRIu64 "\n", m->chunk_size);
  text_printf (&t, "chunks %" PRIu64 "\n", m->nr_chunks);
  text_printf (&t, "source-uri %s\n", uri);
  text_printf (&t, "source-export %s\n", export);
  text_printf (&t, "source-description %s\n", desc);
  free (uri);
  free (export);
  free (desc);
  line[2 * HASH_SIZE] = '\n';
  line[2 * HASH_SIZE + 1] = '\0';
  for (i = 0; i < m->nr_chunks; i++) {
    for (k = 0; k < HASH_SIZE; k++) {
      line[2 * k] = hexdigits[m->hash[i][k] >> 4];
      line[2 * k + 1] = hexdigits[m->hash[i][k] & 15];
    }
    sha256_update (&t.sha, sizeof line - 1, (const uint8_t *) line);
    if (fwrite (line, 1, sizeof line - 1, t.fp) != sizeof line - 1)
      t.error = true;
  }
  return text_out_commit (&t, "manifest");
}

bool
manifest_check_writable (const char *path)
{
  return text_out_check (path, MANIFEST_MAGIC, "manifest");
}

uint64_t
manifest_compare (const struct manifest *expected, const struct manifest *got,
                  const char *what, unsigned max, uint64_t *first)
{
  uint64_t i, n = 0;

  for (i = 0; i < expected->nr_chunks; i++) {
    uint64_t off = i * expected->chunk_size;
    uint64_t len = MIN (expected->chunk_size, expected->size - off);

    if (memcmp (expected->hash[i], got->hash[i], HASH_SIZE) == 0)
      continue;
    if (n == 0)
      *first = off;
    if (n < max)
      printf (PROG ": %s differs in chunk %" PRIu64 " at offset %" PRIu64
              " (%" PRIu64 " bytes, up to offset %" PRIu64 ")\n",
              what, i, off, len, off + len);
    n++;
  }
  return n;
}

/* ---- The hasher -------------------------------------------------------- */

static struct {
  bool on;
  struct manifest *out;
  const struct manifest *base;
  uint64_t size, chunk;
  uint64_t pos;                    /* everything before it is fed */
  struct sha256_ctx ctx;           /* of the chunk pos is in */
  unsigned char zero_hash[HASH_SIZE];  /* of a whole chunk of zeroes */
} h;

static const unsigned char zeroes[65536];

bool
hasher_on (void)
{
  return h.on;
}

uint64_t
hasher_position (void)
{
  return h.pos;
}

uint64_t
chunk_size_of_hasher (void)
{
  return h.chunk;
}

void
hasher_start (struct manifest *out, uint64_t disk_size, uint64_t chunk,
              const struct manifest *base)
{
  uint64_t i;

  out->size = disk_size;
  out->chunk_size = chunk;
  alloc_hashes (out);
  h.on = true;
  h.out = out;
  h.base = base;
  h.size = disk_size;
  h.chunk = chunk;
  h.pos = 0;
  sha256_init (&h.ctx);
  for (i = 0; i < chunk; i += sizeof zeroes)
    sha256_update (&h.ctx, MIN (chunk - i, (uint64_t) sizeof zeroes),
                   zeroes);
  sha256_digest (&h.ctx, HASH_SIZE, h.zero_hash);   /* and re-inits */
}

/* The chunk that ends at h.pos is complete. */
static void
chunk_done (void)
{
  uint64_t i = (h.pos - 1) / h.chunk;

  sha256_digest (&h.ctx, HASH_SIZE, h.out->hash[i]);
}

void
hasher_data (uint64_t offset, const void *buf, uint64_t len)
{
  const uint8_t *p = buf;

  if (!h.on)
    return;
  assert (offset == h.pos && len <= h.size - h.pos);  /* in order */
  while (len > 0) {
    uint64_t end = MIN ((h.pos / h.chunk + 1) * h.chunk, h.size);
    uint64_t n = MIN (len, end - h.pos);

    sha256_update (&h.ctx, n, p);
    p += n;
    len -= n;
    h.pos += n;
    if (h.pos == end)
      chunk_done ();
  }
}

void
hasher_zero (uint64_t offset, uint64_t len)
{
  if (!h.on)
    return;
  assert (offset == h.pos && len <= h.size - h.pos);
  while (len > 0) {
    uint64_t end = MIN ((h.pos / h.chunk + 1) * h.chunk, h.size);
    uint64_t n = MIN (len, end - h.pos);

    if (h.pos % h.chunk == 0 && n == h.chunk) {
      /* A whole chunk of zeroes: its hash is known. */
      memcpy (h.out->hash[h.pos / h.chunk], h.zero_hash, HASH_SIZE);
      h.pos += n;
      len -= n;
      continue;
    }
    n = MIN (n, (uint64_t) sizeof zeroes);
    sha256_update (&h.ctx, n, zeroes);
    len -= n;
    h.pos += n;
    if (h.pos == end)
      chunk_done ();
  }
}

void
hasher_keep (uint64_t offset, uint64_t len)
{
  uint64_t i;

  if (!h.on)
    return;
  /* Whole chunks only (or up to the end of the disk), with a base. */
  assert (offset == h.pos && len <= h.size - h.pos && h.base != NULL);
  assert (offset % h.chunk == 0 &&
          (len % h.chunk == 0 || offset + len == h.size));
  for (i = offset / h.chunk; len > 0; i++) {
    uint64_t n = MIN (len, h.chunk);

    memcpy (h.out->hash[i], h.base->hash[i], HASH_SIZE);
    len -= n;
    h.pos += n;
  }
}
