/* sparsebackup: fuzz harness for the qcow2 parser (plugins/qcow2/qcow2-*.c).
 *
 * LLVMFuzzerTestOneInput opens the input as an in-memory qcow2 image
 * (qcow2_open_mem), then maps and reads a few bounded ranges, lists its
 * persistent bitmaps and maps a few of them (qcow2_map_since), and
 * closes it.  Nothing here touches the host filesystem: backing and data files
 * named by the image are served from memory by fuzz_open_file:
 *
 *   name containing "missing"  the open fails (error path)
 *   name containing "eio"      the base image, whose reads fail with EIO
 *                              beyond its L1 table (read error paths)
 *   name containing "raw"      FUZZ_RAW, a fixed 256 KiB raw file with
 *                              two holes (it has an extent callback)
 *   name containing "base"     a small valid qcow2 image built at start-up
 *                              (data, zero and unallocated clusters)
 *   name containing "chain"    the input itself the first time, then the
 *                              base image: a three-layer chain
 *                              input -> input -> base
 *   name containing "loop"     the input itself with a file identity: the
 *                              library must detect the loop
 *   anything else              the input itself without identity: a chain
 *                              stopped by the depth limit
 *
 * Besides what the sanitizers find, the harness aborts when the library
 * breaks its own contract:
 *   - a pread callback outside the file (the library must check bounds),
 *   - an extent callback out of order, empty, with unknown flags or
 *     beyond the requested range,
 *   - a range reported as ZERO that does not read as zeros,
 *   - two reads of the same range that differ,
 *   - a file opened through the callback and never closed, or closed
 *     twice,
 *   - an error without a message or an unterminated message,
 *   - a zlib cluster that libdeflate decoded (the fast path of a
 *     libdeflate build) and zlib, QEMU's decoder, refuses or decodes
 *     differently: every such cluster is decoded by both
 *     (q2_zlib_crosscheck).
 *
 * It builds with gcc (fuzz-main.c provides main) and with clang
 * -fsanitize=fuzzer.  Set QCOW2_FUZZ_VERBOSE=1 to print what each input
 * does (used to check the seed corpus).
 */

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"
#include "qcow2-internal.h"         /* q2_zlib_crosscheck */
#include "ispowerof2.h"
#include "minmax.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

/* Bounds on the work done per input. */
#define MAX_READ (1024 * 1024)            /* largest qcow2_pread */
#define MAX_MAP (64 * 1024 * 1024)        /* largest qcow2_map range */
#define MAX_ZERO_CHECK (256 * 1024)       /* bytes read to check ZERO */
#define MAX_EXTENTS 100000                /* extents recorded per map */
#define FUZZ_DEPTH 4                      /* max_depth of the chain */

#define FUZZ_RAW_SIZE (256 * 1024)

static uint8_t fuzz_raw[FUZZ_RAW_SIZE];
static uint8_t *fuzz_base;
static size_t fuzz_base_len;
static int verbose;

#define die(...)                                                \
  do {                                                          \
    fprintf (stderr, "fuzz-qcow2: " __VA_ARGS__);               \
    fputc ('\n', stderr);                                       \
    abort ();                                                   \
  } while (0)

#define say(...)                                                \
  do {                                                          \
    if (verbose) {                                              \
      fprintf (stderr, "fuzz-qcow2: " __VA_ARGS__);             \
      fputc ('\n', stderr);                                     \
    }                                                           \
  } while (0)

/* ---- The fixed raw file --------------------------------------------- */

/* Holes (reading as zero) of FUZZ_RAW. */
static const struct { uint64_t start, end; } raw_holes[] = {
  { 64 * 1024, 128 * 1024 },
  { 192 * 1024, 256 * 1024 },
};
#define NR_RAW_HOLES (sizeof raw_holes / sizeof raw_holes[0])

static void
init_raw (void)
{
  size_t i, h;

  for (i = 0; i < FUZZ_RAW_SIZE; ++i)
    fuzz_raw[i] = (uint8_t) (0xa5 ^ (i * 31) ^ (i >> 9));
  for (h = 0; h < NR_RAW_HOLES; ++h)
    memset (fuzz_raw + raw_holes[h].start, 0,
            raw_holes[h].end - raw_holes[h].start);
}

/* ---- The built-in qcow2 base image ---------------------------------- */

static void
put_be16 (uint8_t *p, uint16_t v)
{
  p[0] = v >> 8; p[1] = v;
}

static void
put_be32 (uint8_t *p, uint32_t v)
{
  p[0] = v >> 24; p[1] = v >> 16; p[2] = v >> 8; p[3] = v;
}

static void
put_be64 (uint8_t *p, uint64_t v)
{
  put_be32 (p, v >> 32);
  put_be32 (p + 4, (uint32_t) v);
}

/* A qcow2 v3 image with 512 byte clusters and a virtual size of 256 KiB
 * (8 L2 tables of 64 entries, two of them allocated):
 *
 *   cluster 0 header, 1 refcount table, 2 refcount block, 3 L1 table,
 *   4 L2 table for guest [0, 32K), 5 L2 table for guest [96K, 128K),
 *   6..9 data of guest clusters 0..3, 10 data of guest cluster 202,
 *   11 a preallocated zero cluster (guest cluster 7).
 *   Guest cluster 5 is a zero cluster without allocation.
 */
#define BASE_CB 9
#define BASE_CS (1u << BASE_CB)
#define BASE_CLUSTERS 12
#define BASE_SIZE (256 * 1024)

static void
init_base (void)
{
  uint8_t *b;
  unsigned i;
  const uint64_t copied = UINT64_C (1) << 63;

  fuzz_base_len = BASE_CLUSTERS * BASE_CS;
  b = fuzz_base = calloc (1, fuzz_base_len);
  if (b == NULL)
    die ("out of memory");

  memcpy (b, "QFI\xfb", 4);
  put_be32 (b + 4, 3);                  /* version */
  put_be32 (b + 20, BASE_CB);           /* cluster_bits */
  put_be64 (b + 24, BASE_SIZE);         /* size */
  put_be32 (b + 36, 8);                 /* l1_size */
  put_be64 (b + 40, 3 * BASE_CS);       /* l1_table_offset */
  put_be64 (b + 48, 1 * BASE_CS);       /* refcount_table_offset */
  put_be32 (b + 56, 1);                 /* refcount_table_clusters */
  put_be32 (b + 96, 4);                 /* refcount_order */
  put_be32 (b + 100, 104);              /* header_length */
  /* header extensions: only the end marker (zeros) */

  put_be64 (b + 1 * BASE_CS, 2 * BASE_CS);        /* refcount table */
  for (i = 0; i < BASE_CLUSTERS; ++i)             /* refcount block */
    put_be16 (b + 2 * BASE_CS + 2 * i, 1);

  put_be64 (b + 3 * BASE_CS + 0 * 8, copied | 4 * BASE_CS);   /* L1 */
  put_be64 (b + 3 * BASE_CS + 3 * 8, copied | 5 * BASE_CS);

  for (i = 0; i < 4; ++i)                         /* L2 #0 */
    put_be64 (b + 4 * BASE_CS + i * 8, copied | (uint64_t) (6 + i) * BASE_CS);
  put_be64 (b + 4 * BASE_CS + 5 * 8, 1);                  /* zero */
  put_be64 (b + 4 * BASE_CS + 7 * 8, copied | 11 * BASE_CS | 1);
  put_be64 (b + 5 * BASE_CS + 10 * 8, copied | 10 * BASE_CS); /* L2 #3 */

  for (i = 6 * BASE_CS; i < 11 * BASE_CS; ++i)    /* data */
    b[i] = (uint8_t) (0x3c + i * 7);
  memset (b + 11 * BASE_CS, 0xee, BASE_CS);       /* hidden by zero flag */
}

static void
init_once (void)
{
  static bool done;
  const char *v;

  if (done)
    return;
  done = true;
  v = getenv ("QCOW2_FUZZ_VERBOSE");
  verbose = v != NULL && *v != '\0' && strcmp (v, "0") != 0;
  init_raw ();
  init_base ();
  q2_zlib_crosscheck = true;
  say ("zlib clusters: %s", qcow2_zlib_decoder ());
}

/* ---- Files served to the library ------------------------------------ */

struct fuzz_state {
  const uint8_t *data;          /* the input */
  size_t size;
  unsigned opened, closed;      /* files served / closed */
  unsigned chain_opens;         /* "chain" names opened */
};

struct mfile {
  struct fuzz_state *st;
  const uint8_t *buf;
  size_t len;
  bool has_holes;               /* FUZZ_RAW */
  uint64_t eio_from;            /* reads beyond this fail (0 = never) */
  bool closed;
};

static int
mfile_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  struct mfile *f = opaque;

  if (f->closed)
    die ("pread on a closed file");
  if (offset > f->len || count > f->len - offset)
    die ("pread beyond the end of a file: offset %" PRIu64 " count %zu "
         "size %zu", offset, count, f->len);
  if (f->eio_from > 0 && offset + count > f->eio_from) {
    errno = EIO;
    return -1;
  }
  memcpy (buf, f->buf + offset, count);
  return 0;
}

static void
mfile_close (void *opaque)
{
  struct mfile *f = opaque;

  if (f->closed)
    die ("file closed twice");
  f->closed = true;
  f->st->closed++;
  free (f);
}

static int
mfile_extent (void *opaque, uint64_t offset, uint64_t count,
              uint64_t *len, int *is_data)
{
  struct mfile *f = opaque;
  uint64_t end;
  size_t h;

  if (count == 0 || offset > f->len || count > f->len - offset)
    die ("extent beyond the end of a file: offset %" PRIu64
         " count %" PRIu64 " size %zu", offset, count, f->len);
  end = offset + count;
  *is_data = 1;
  for (h = 0; h < NR_RAW_HOLES && f->has_holes; ++h) {
    if (offset >= raw_holes[h].start && offset < raw_holes[h].end) {
      *is_data = 0;
      if (end > raw_holes[h].end)
        end = raw_holes[h].end;
      break;
    }
    if (offset < raw_holes[h].start && end > raw_holes[h].start)
      end = raw_holes[h].start;
  }
  *len = end - offset;
  return 0;
}

static int
fuzz_open_file (void *opaque, const char *path, struct qcow2_io *io,
                char *err, size_t errlen)
{
  struct fuzz_state *st = opaque;
  struct mfile *f;

  if (path == NULL)
    die ("open_file called with a NULL path");
  if (strstr (path, "missing") != NULL) {
    snprintf (err, errlen, "%s: no such file (fuzz)", path);
    return -1;
  }

  f = calloc (1, sizeof *f);
  if (f == NULL)
    die ("out of memory");
  f->st = st;
  memset (io, 0, sizeof *io);
  if (strstr (path, "raw") != NULL) {
    f->buf = fuzz_raw;
    f->len = FUZZ_RAW_SIZE;
    f->has_holes = true;
    io->extent = mfile_extent;
    io->has_id = true;
    io->dev = 1; io->ino = 2;
  }
  else if (strstr (path, "eio") != NULL) {
    f->buf = fuzz_base;
    f->len = fuzz_base_len;
    f->eio_from = 4 * BASE_CS;          /* header, refcounts and L1 */
    io->has_id = true;
    io->dev = 1; io->ino = 5;
  }
  else if (strstr (path, "base") != NULL ||
           (strstr (path, "chain") != NULL && st->chain_opens++ > 0)) {
    f->buf = fuzz_base;
    f->len = fuzz_base_len;
    io->has_id = true;
    io->dev = 1; io->ino = 3;
  }
  else {
    f->buf = st->data;
    f->len = st->size;
    if (strstr (path, "loop") != NULL) {
      io->has_id = true;
      io->dev = 1; io->ino = 4;
    }
  }
  io->opaque = f;
  io->size = f->len;
  io->pread = mfile_pread;
  io->close = mfile_close;
  st->opened++;
  say ("open_file %s (%zu bytes)", path, f->len);
  return 0;
}

static void
fuzz_debug (void *opaque, const char *msg)
{
  size_t len = strlen (msg);    /* let ASan check the string */

  if (verbose)
    fprintf (stderr, "fuzz-qcow2: debug: %.*s\n", (int) len, msg);
}

static void
check_err (const char *what, const char *err, size_t errlen)
{
  if (memchr (err, 0, errlen) == NULL)
    die ("%s: error message not NUL-terminated", what);
  if (err[0] == '\0')
    die ("%s failed without an error message", what);
}

/* ---- Map ------------------------------------------------------------ */

struct extent {
  uint64_t offset, length;
  uint32_t flags;
};

struct map_state {
  uint64_t start, end;          /* requested range */
  uint64_t next;                /* expected offset of the next extent */
  uint32_t last_flags;
  unsigned n;                   /* extents seen */
  unsigned stop_after;          /* return 1 after so many (0 = never) */
  bool record;                  /* record extents in ext */
  struct extent *ext;
  unsigned nr_ext, alloc_ext;
};

static int
map_cb (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  struct map_state *m = opaque;

  if (offset != m->next)
    die ("map: extent at %" PRIu64 ", expected %" PRIu64, offset, m->next);
  if (length == 0)
    die ("map: empty extent at %" PRIu64, offset);
  if (length > m->end - offset)
    die ("map: extent [%" PRIu64 ", +%" PRIu64 ") beyond the end of "
         "the request %" PRIu64, offset, length, m->end);
  if (flags & ~(uint32_t) (QCOW2_EXTENT_HOLE | QCOW2_EXTENT_ZERO))
    die ("map: unknown flags 0x%" PRIx32, flags);
  if (m->n > 0 && flags == m->last_flags)
    die ("map: adjacent extents with the same flags 0x%" PRIx32
         " at %" PRIu64, flags, offset);
  m->next = offset + length;
  m->last_flags = flags;
  m->n++;
  if (m->record && m->nr_ext < MAX_EXTENTS) {
    if (m->nr_ext == m->alloc_ext) {
      struct extent *p;

      m->alloc_ext = m->alloc_ext ? m->alloc_ext * 2 : 64;
      p = realloc (m->ext, m->alloc_ext * sizeof *p);
      if (p == NULL)
        die ("out of memory");
      m->ext = p;
    }
    m->ext[m->nr_ext].offset = offset;
    m->ext[m->nr_ext].length = length;
    m->ext[m->nr_ext].flags = flags;
    m->nr_ext++;
  }
  if (m->stop_after > 0 && m->n >= m->stop_after)
    return 1;
  return 0;
}

/* Map [OFFSET, OFFSET+COUNT) (with TOP, the top image's own map:
 * qcow2_map_top; with BM, the map of that bitmap: qcow2_map_since).
 * Returns the number of recorded extents
 * in *EXT (to be freed) when EXT is not NULL, or -1 on error.
 */
static int
do_map (struct qcow2_image *img, bool top, const struct qcow2_bitmap *bm,
        uint64_t offset, uint64_t count, unsigned stop_after,
        struct extent **ext)
{
  struct map_state m = {
    .start = offset, .end = offset + count, .next = offset,
    .stop_after = stop_after, .record = ext != NULL,
  };
  char *err;
  const size_t errlen = 64;     /* small: exercise truncation */
  int r;

  if (ext != NULL)
    *ext = NULL;
  if (count == 0)
    return 0;
  err = malloc (errlen);
  if (err == NULL)
    die ("out of memory");
  err[0] = '\0';
  if (bm)
    r = qcow2_map_since (img, bm, offset, count, map_cb, &m, err, errlen);
  else if (top)
    r = qcow2_map_top (img, offset, count, map_cb, &m, err, errlen);
  else
    r = qcow2_map (img, offset, count, map_cb, &m, err, errlen);
  if (r == -1) {
    check_err ("qcow2_map", err, errlen);
    say ("map [%" PRIu64 ", +%" PRIu64 "): error: %s", offset, count, err);
    free (m.ext);
    m.ext = NULL;
    m.nr_ext = 0;
  }
  else {
    if (r != 0)
      die ("qcow2_map returned %d", r);
    /* Unless stopped early, the extents must cover the whole range. */
    if ((stop_after == 0 || m.n < stop_after) && m.next != m.end)
      die ("map [%" PRIu64 ", +%" PRIu64 "): extents end at %" PRIu64,
           offset, count, m.next);
    say ("map [%" PRIu64 ", +%" PRIu64 "): %u extents", offset, count, m.n);
  }
  free (err);
  if (ext != NULL)
    *ext = m.ext;
  return r == -1 ? -1 : (int) m.nr_ext;
}

/* ---- Read ----------------------------------------------------------- */

/* Read [OFFSET, OFFSET+COUNT) into a buffer of exactly COUNT bytes
 * (so that ASan catches any overrun).  Returns the buffer (to be freed)
 * or NULL on a read error.
 */
static uint8_t *
do_pread (struct qcow2_image *img, uint64_t offset, size_t count)
{
  uint8_t *buf;
  char err[QCOW2_ERRLEN];

  buf = malloc (count > 0 ? count : 1);
  if (buf == NULL)
    die ("out of memory");
  err[0] = '\0';
  if (qcow2_pread (img, buf, count, offset, err, sizeof err) == -1) {
    check_err ("qcow2_pread", err, sizeof err);
    say ("pread [%" PRIu64 ", +%zu): error: %s", offset, count, err);
    free (buf);
    return NULL;
  }
  say ("pread [%" PRIu64 ", +%zu): ok", offset, count);
  return buf;
}

static bool
is_zero (const uint8_t *buf, size_t len)
{
  size_t i;

  for (i = 0; i < len; ++i)
    if (buf[i] != 0)
      return false;
  return true;
}

/* Every extent reported as ZERO must read as zeros. */
static void
check_zero_extents (struct qcow2_image *img, const struct extent *ext,
                    int n)
{
  uint64_t budget = MAX_ZERO_CHECK;
  int i;

  for (i = 0; i < n && budget > 0; ++i) {
    uint64_t off, len;

    if (!(ext[i].flags & QCOW2_EXTENT_ZERO))
      continue;
    off = ext[i].offset;
    len = ext[i].length;
    if (len > budget) len = budget;
    budget -= len;
    while (len > 0) {
      size_t n1 = len > MAX_READ ? MAX_READ : (size_t) len;
      uint8_t *buf = do_pread (img, off, n1);

      if (buf != NULL) {
        if (!is_zero (buf, n1))
          die ("[%" PRIu64 ", +%zu) is mapped as zero (flags 0x%" PRIx32
               ") but does not read as zeros", off, n1, ext[i].flags);
        free (buf);
      }
      off += n1;
      len -= n1;
    }
  }
}

/* Read a range twice, with other reads in between (L2 cache eviction),
 * and compare.
 */
static void
check_reread (struct qcow2_image *img, uint64_t size,
              uint64_t offset, size_t count)
{
  uint8_t *a, *b;

  if (count == 0)
    return;
  a = do_pread (img, offset, count);
  if (a == NULL)
    return;
  /* Something far away, to evict cache entries. */
  b = do_pread (img, size - (size > 4096 ? 4096 : size) / 2,
                (size_t) ((size > 4096 ? 4096 : size) / 2));
  free (b);
  b = do_pread (img, offset, count);
  if (b != NULL) {
    if (memcmp (a, b, count) != 0)
      die ("two reads of [%" PRIu64 ", +%zu) differ", offset, count);
    free (b);
  }
  free (a);
}

/* Reading or mapping [OFFSET, OFFSET+COUNT) at once and in two pieces
 * split at an unaligned point must agree: same bytes, same extents
 * (merged at the cut), and a piece cannot fail when the whole succeeds.
 */
static void
check_split (struct qcow2_image *img, uint64_t offset, size_t count)
{
  size_t cut;
  uint8_t *whole, *a, *b;
  struct extent *ew, *e1, *e2;
  int nw, n1, n2, i;

  if (count < 2)
    return;
  cut = count / 2 + 3 < count ? count / 2 + 3 : count / 2;

  whole = do_pread (img, offset, count);
  if (whole != NULL) {
    a = do_pread (img, offset, cut);
    b = do_pread (img, offset + cut, count - cut);
    if (a == NULL || b == NULL)
      die ("reading [%" PRIu64 ", +%zu) succeeds but reading its part "
           "[%" PRIu64 ", +%zu) fails", offset, count,
           a == NULL ? offset : offset + cut, a == NULL ? cut : count - cut);
    if (memcmp (whole, a, cut) != 0 ||
        memcmp (whole + cut, b, count - cut) != 0)
      die ("reading [%" PRIu64 ", +%zu) at once and cut at +%zu differ",
           offset, count, cut);
    free (a);
    free (b);
    free (whole);
  }

  nw = do_map (img, false, NULL, offset, count, 0, &ew);
  n1 = do_map (img, false, NULL, offset, cut, 0, &e1);
  n2 = do_map (img, false, NULL, offset + cut, count - cut, 0, &e2);
  if (nw >= 0 && (n1 < 0 || n2 < 0))
    die ("mapping [%" PRIu64 ", +%zu) succeeds but mapping a part of it "
         "fails", offset, count);
  if (nw > 0 && nw < MAX_EXTENTS && n1 > 0 && n1 < MAX_EXTENTS &&
      n2 > 0 && n2 < MAX_EXTENTS) {
    /* Merge the extents of the two pieces at the cut. */
    if (e1[n1 - 1].flags == e2[0].flags) {
      e2[0].offset = e1[n1 - 1].offset;
      e2[0].length += e1[n1 - 1].length;
      n1--;
    }
    if (n1 + n2 != nw)
      die ("mapping [%" PRIu64 ", +%zu) gives %d extents, cut at +%zu "
           "%d", offset, count, nw, cut, n1 + n2);
    for (i = 0; i < nw; ++i) {
      const struct extent *e = i < n1 ? &e1[i] : &e2[i - n1];
      if (e->offset != ew[i].offset || e->length != ew[i].length ||
          e->flags != ew[i].flags)
        die ("mapping [%" PRIu64 ", +%zu) at once and cut at +%zu "
             "differ at extent %d", offset, count, cut, i);
    }
  }
  free (ew);
  free (e1);
  free (e2);
}

/* ---- Bitmaps -------------------------------------------------------- */

#define MAX_BITMAPS 4                     /* bitmaps mapped per input */

struct list_state {
  struct qcow2_image *img;
  uint64_t vsize;
  unsigned n;
};

/* Map each usable bitmap (the first MAX_BITMAPS) like the chain: the
 * extents keep the contract, ZERO reads as zero; opening it by name
 * again must succeed, and agree.
 */
static int
list_cb (void *opaque, const char *name, const struct qcow2_bitmap *bm,
         const char *why)
{
  struct list_state *ls = opaque;
  struct qcow2_bitmap *again;
  char err[QCOW2_ERRLEN];
  struct extent *ext = NULL;
  int n;

  if (name == NULL || name[0] == '\0')
    die ("a bitmap without a name");
  if (bm == NULL) {
    if (why == NULL || why[0] == '\0')
      die ("bitmap '%s' unusable without a reason", name);
    say ("bitmap '%s': %s", name, why);
    return 0;
  }
  if (qcow2_bitmap_layers (bm) < 1 ||
      qcow2_bitmap_layers (bm) > qcow2_get_depth (ls->img) ||
      !is_power_of_2 (qcow2_bitmap_granularity (bm)))
    die ("bitmap '%s': %u layers, granularity %" PRIu64, name,
         qcow2_bitmap_layers (bm), qcow2_bitmap_granularity (bm));
  say ("bitmap '%s': %u layers, granularity %" PRIu64, name,
       qcow2_bitmap_layers (bm), qcow2_bitmap_granularity (bm));
  if (ls->n++ >= MAX_BITMAPS || ls->vsize == 0)
    return 0;
  n = do_map (ls->img, false, bm, 0, MIN (ls->vsize, (uint64_t) MAX_MAP), 0,
              &ext);
  if (n > 0)
    check_zero_extents (ls->img, ext, n);
  free (ext);
  /* A listing reads no bitmap table: a listed bitmap may be refused
   * when opened, but only for a bad table entry.
   */
  if (qcow2_bitmap_open (ls->img, name, &again, err, sizeof err) == -1) {
    if (errno != EIO || strstr (err, "bitmap table entry") == NULL)
      die ("bitmap '%s' is listed as usable but does not open: %s",
           name, err);
    say ("bitmap '%s': listed, refused when opened: %s", name, err);
    return 0;
  }
  do_map (ls->img, false, again, ls->vsize / 3,
          MIN (ls->vsize - ls->vsize / 3, UINT64_C(1024) * 1024), 2, NULL);
  qcow2_bitmap_close (again);
  return 0;
}

static void
check_bitmaps (struct qcow2_image *img, uint64_t vsize)
{
  struct list_state ls = { .img = img, .vsize = vsize };
  struct qcow2_bitmap *bm;
  char err[QCOW2_ERRLEN];

  err[0] = '\0';
  if (qcow2_list_bitmaps (img, list_cb, &ls, err, sizeof err) == -1) {
    check_err ("qcow2_list_bitmaps", err, sizeof err);
    say ("bitmaps: error: %s", err);
  }
  err[0] = '\0';
  if (qcow2_bitmap_open (img, "fuzz-no-such-bitmap", &bm, err,
                         sizeof err) == 0)
    die ("a bitmap named fuzz-no-such-bitmap");
  check_err ("qcow2_bitmap_open", err, sizeof err);
}

/* ---- Entry point ---------------------------------------------------- */

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct fuzz_state st = { .data = data, .size = size };
  struct qcow2_options opts;
  struct qcow2_image *img = NULL;
  char *err;
  const size_t errlen = QCOW2_ERRLEN;
  uint64_t vsize, mid, len;
  uint32_t cs;
  struct extent *ext = NULL;
  int n;
  uint8_t *buf;

  init_once ();

  qcow2_options_init (&opts);
  /* Some variety derived from the input, so that both sides of each
   * option are covered.
   */
  opts.backing = (size % 8) != 7;
  opts.max_depth = FUZZ_DEPTH;
  opts.l2_cache_size = (size & 1) ? 1 : 4096;   /* tiny: eviction */
  opts.open_file = fuzz_open_file;
  opts.open_opaque = &st;
  opts.debug = fuzz_debug;
  opts.debug_opaque = NULL;

  say ("options: backing=%d l2_cache_size=%" PRIu64,
       opts.backing, opts.l2_cache_size);

  err = malloc (errlen);
  if (err == NULL)
    die ("out of memory");
  err[0] = '\0';
  if (qcow2_open_mem (data, size, "fuzz.qcow2", &opts, &img,
                      err, errlen) == -1) {
    check_err ("qcow2_open_mem", err, errlen);
    say ("open: error: %s", err);
    free (err);
    if (st.closed != st.opened)
      die ("open failed but %u of %u files opened by the library "
           "were not closed", st.opened - st.closed, st.opened);
    return 0;
  }
  free (err);
  if (img == NULL)
    die ("qcow2_open_mem succeeded but returned no image");

  vsize = qcow2_get_size (img);
  if (vsize > INT64_MAX)
    die ("virtual size %" PRIu64 " > INT64_MAX", vsize);
  cs = qcow2_get_cluster_size (img);
  if (cs < 512 || cs > 2 * 1024 * 1024 || !is_power_of_2 (cs))
    die ("cluster size %" PRIu32 " is not a power of 2 in [512, 2M]", cs);
  say ("open: ok: size %" PRIu64 " cluster size %" PRIu32 " depth %u",
       vsize, cs, qcow2_get_depth (img));
  if (qcow2_get_depth (img) < 1 || qcow2_get_depth (img) > FUZZ_DEPTH)
    die ("depth %u outside [1, %d]", qcow2_get_depth (img), FUZZ_DEPTH);

  if (vsize > 0) {
    mid = vsize / 2;

    /* Map the start (recording extents), check ZERO reads as zero. */
    n = do_map (img, false, NULL, 0, MIN (vsize, (uint64_t) MAX_MAP), 0, &ext);
    if (n > 0)
      check_zero_extents (img, ext, n);
    free (ext);
    ext = NULL;

    /* The same with the map of the top image only: its ZERO ranges
     * (zero clusters of the top) read as zero too.
     */
    n = do_map (img, true, NULL, 0, MIN (vsize, (uint64_t) MAX_MAP), 0, &ext);
    if (n > 0)
      check_zero_extents (img, ext, n);
    free (ext);
    ext = NULL;

    /* Map the middle and the end, stopping early once. */
    len = MIN (vsize - mid, UINT64_C(1024) * 1024);
    do_map (img, false, NULL, mid, len, 0, NULL);
    len = MIN (vsize, UINT64_C(1024) * 1024);
    n = do_map (img, false, NULL, vsize - len, len, 0, &ext);
    if (n > 0)
      check_zero_extents (img, ext, n);
    free (ext);
    ext = NULL;
    do_map (img, false, NULL, mid / 3, MIN (vsize - mid / 3, (uint64_t) MAX_MAP),
            3, NULL);

    /* Unaligned, small. */
    do_map (img, false, NULL, mid | 1, MIN (vsize - (mid | 1), UINT64_C(1)), 0,
            NULL);

    /* Reads. */
    buf = do_pread (img, 0, (size_t) MIN (vsize, UINT64_C(65536)));
    free (buf);
    len = MIN (vsize - mid, (uint64_t) MAX_READ);
    buf = do_pread (img, mid, (size_t) len);
    free (buf);
    len = MIN (vsize, UINT64_C(4096) + 7);
    buf = do_pread (img, vsize - len, (size_t) len);
    free (buf);
    if (vsize > 3)
      check_reread (img, vsize, vsize / 3 + 1,
                    (size_t) MIN (vsize - vsize / 3 - 1, UINT64_C(70000)));
    if (vsize > 5)
      check_split (img, vsize / 5 + 1,
                   (size_t) MIN (vsize - vsize / 5 - 1, UINT64_C(150001)));
  }
  buf = do_pread (img, vsize, 0);       /* empty read at the end */
  free (buf);

  /* The bitmaps last: whatever they hold, the disk was read above. */
  check_bitmaps (img, vsize);

  qcow2_close (img);
  if (q2_zlib_crosscheck_failures > 0)
    die ("libdeflate and zlib disagree on a compressed cluster");
  if (st.closed != st.opened)
    die ("%u of %u files opened by the library were not closed",
         st.opened - st.closed, st.opened);
  return 0;
}
