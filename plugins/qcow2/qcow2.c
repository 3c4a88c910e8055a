/* sparsebackup: read-only qcow2 reader (pure C, no nbdkit headers).
 *
 * Written from QEMU's docs/interop/qcow2.txt.  See qcow2.h for the API.
 *
 * Every value read from a file is checked before use: a corrupt or
 * hostile image produces an error message, never an assertion failure,
 * an out-of-bounds access or unbounded memory use.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* SEEK_DATA, SEEK_HOLE */
#endif

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include <zlib.h>
#include <zstd.h>
#include <zstd_errors.h>

#include "qcow2.h"

/* Header fields and constants from the specification. */
#define QCOW2_MAGIC 0x514649fbU         /* "QFI\xfb" */
#define V2_HEADER_LEN 72
#define V3_HEADER_LEN 104

#define INCOMPAT_DIRTY        (UINT64_C(1) << 0)
#define INCOMPAT_CORRUPT      (UINT64_C(1) << 1)
#define INCOMPAT_DATA_FILE    (UINT64_C(1) << 2)
#define INCOMPAT_COMPRESSION  (UINT64_C(1) << 3)
#define INCOMPAT_EXTL2        (UINT64_C(1) << 4)
#define INCOMPAT_KNOWN        (UINT64_C(0x1f))

#define AUTOCLEAR_DATA_FILE_RAW (UINT64_C(1) << 1)

#define EXT_END          0x00000000U
#define EXT_BACKING_FMT  0xe2792acaU
#define EXT_FEATURES     0x6803f857U
#define EXT_DATA_FILE    0x44415441U

#define MAX_NAME_LEN 1023               /* backing / backing format names */
#define MAX_DATA_FILE_NAME_LEN 4096

#define L1_OFFSET_MASK   UINT64_C(0x00fffffffffffe00)
#define L2_OFFSET_MASK   UINT64_C(0x00fffffffffffe00)
#define L2_COMPRESSED    (UINT64_C(1) << 62)
#define L2_COPIED        (UINT64_C(1) << 63)
#define L2_ZERO          UINT64_C(1)

#define COMPRESSION_ZLIB 0
#define COMPRESSION_ZSTD 1

/* L2 tables are cached in slices of at most this many bytes. */
#define MAX_SLICE_BYTES 4096

struct err {
  char *buf;
  size_t len;
};

/* One cached slice of an L2 table (entries in host byte order). */
struct l2slot {
  uint64_t key;                 /* host offset of the slice */
  int32_t next;                 /* next slot in the hash chain, -1 = end */
  int32_t newer, older;         /* LRU list neighbours, -1 = none */
  uint64_t *data;               /* NULL = slot never used */
};

/* The slots are used in order (0 .. nused-1), then the least recently
 * used one is recycled: lookups, hits and evictions are O(1) whatever
 * the cache size, so the lock is held for a few dozen instructions plus
 * the copy of the entries asked for.
 */
struct l2cache {
  pthread_mutex_t lock;
  uint32_t nslots;
  uint32_t nused;
  uint32_t nbuckets;            /* power of 2 */
  struct l2slot *slots;
  int32_t *buckets;
  int32_t newest, oldest;       /* LRU list ends, -1 = empty */
  uint64_t hits, misses;
};

/* Scratch space for reading compressed clusters.  Each request that
 * meets compressed clusters takes one from the pool of its layer and
 * gives it back at the end, so the buffers and decompression contexts
 * are reused instead of being set up again for every request.
 */
struct scratch {
  struct scratch *next;         /* in the pool */
  uint8_t *cbuf;                /* compressed data (2 clusters) */
  uint8_t *obuf;                /* one cluster, for partial reads; lazy */
  ZSTD_DCtx *zctx;              /* lazy */
  z_stream zs;
  bool zs_ok;                   /* zs initialized */
};

struct layer {
  char *name;                   /* for messages and relative names */
  struct qcow2_io io;
  bool raw;                     /* raw backing file */
  uint64_t size;                /* virtual size */
  unsigned depth;               /* 0 = top */

  /* qcow2 only. */
  uint32_t version;
  uint32_t cluster_bits;
  uint64_t cluster_size;
  bool extended_l2;
  uint32_t entry_words;         /* 64-bit words per L2 entry (1 or 2) */
  uint32_t l2_bits;             /* log2 of the entries per L2 table */
  uint32_t slice_bytes;
  uint32_t slice_entries;
  uint32_t l1_size;             /* entries actually needed and loaded */
  uint64_t *l1;                 /* L2 table offsets (0 = none) */
  int compression;
  bool has_data_file;
  bool data_file_raw;
  struct qcow2_io data;         /* the data file if has_data_file */
  char *data_name;
  bool cache_ok;
  struct l2cache cache;
  bool pool_ok;                 /* pool_lock initialized */
  pthread_mutex_t pool_lock;
  struct scratch *pool;         /* free scratch spaces */
  uint32_t pool_n, pool_max;

  struct layer *backing;
};

struct qcow2_image {
  struct layer *top;
  unsigned depth;
  qcow2_debug_fn debug;
  void *debug_opaque;
};

/* Identities of the files in the chain being opened (loop detection). */
struct chain_ids {
  unsigned n;
  uint64_t dev[QCOW2_MAX_DEPTH + 1];
  uint64_t ino[QCOW2_MAX_DEPTH + 1];
};

/* The text of an errno value.  strerror may take glibc's locale lock
 * (through gettext); with the ASan runtime preloaded into nbdkit that
 * was seen to leave the lock held and nbdkit hung at exit, so use the
 * untranslated description where glibc has it.
 */
static const char *
errstr (int errnum)
{
#if defined (__GLIBC__) && defined (__GLIBC_PREREQ)
#if __GLIBC_PREREQ (2, 32)
  const char *s = strerrordesc_np (errnum);
  return s ? s : "unknown error";
#else
  return strerror (errnum);
#endif
#else
  return strerror (errnum);
#endif
}

static void __attribute__ ((format (printf, 3, 4)))
seterr (struct err *e, const char *name, const char *fmt, ...)
{
  va_list ap;
  int n = 0;

  if (e->buf == NULL || e->len == 0)
    return;
  if (name) {
    n = snprintf (e->buf, e->len, "%s: ", name);
    if (n < 0)
      n = 0;
    if ((size_t) n >= e->len)
      return;
  }
  va_start (ap, fmt);
  vsnprintf (e->buf + n, e->len - n, fmt, ap);
  va_end (ap);
}

static void __attribute__ ((format (printf, 2, 3)))
debug (const struct qcow2_options *o, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  if (o->debug == NULL)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  o->debug (o->debug_opaque, msg);
}

static inline uint32_t
be32 (const uint8_t *p)
{
  return ((uint32_t) p[0] << 24) | ((uint32_t) p[1] << 16) |
    ((uint32_t) p[2] << 8) | p[3];
}

static inline uint64_t
be64 (const uint8_t *p)
{
  return ((uint64_t) be32 (p) << 32) | be32 (p + 4);
}

static inline uint64_t
min64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

/* Read COUNT bytes at OFFSET of IO; bytes past the end of the file read
 * as zero.
 */
static int
io_read (const struct qcow2_io *io, const char *name,
         void *buf, uint64_t count, uint64_t offset, struct err *e)
{
  uint64_t n;

  if (count == 0)
    return 0;
  if (offset >= io->size) {
    memset (buf, 0, count);
    return 0;
  }
  n = min64 (count, io->size - offset);
  if (n > SIZE_MAX) {
    seterr (e, name, "read of 0x%" PRIx64 " bytes is too large", n);
    return -1;
  }
  errno = 0;
  if (io->pread (io->opaque, buf, (size_t) n, offset) == -1) {
    seterr (e, name, "read error at offset 0x%" PRIx64 " (0x%" PRIx64
            " bytes): %s", offset, n,
            errno ? errstr (errno) : "I/O error");
    return -1;
  }
  if (n < count)
    memset ((uint8_t *) buf + n, 0, count - n);
  return 0;
}

/*----------------------------------------------------------------------
 * I/O backends.
 */

static int
mem_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  memcpy (buf, (const uint8_t *) opaque + offset, count);
  return 0;
}

void
qcow2_mem_io (const void *buf, size_t len, struct qcow2_io *io)
{
  memset (io, 0, sizeof *io);
  io->opaque = (void *) buf;
  io->size = len;
  io->pread = mem_pread;
}

static int
posix_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  int fd = (int) (intptr_t) opaque;
  uint8_t *p = buf;

  while (count > 0) {
    ssize_t r = pread (fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      errno = EIO;              /* file shrank under us */
      return -1;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static void
posix_close (void *opaque)
{
  close ((int) (intptr_t) opaque);
}

static int
posix_extent (void *opaque, uint64_t offset, uint64_t count,
              uint64_t *len, int *is_data)
{
#if defined (SEEK_DATA) && defined (SEEK_HOLE)
  int fd = (int) (intptr_t) opaque;
  off_t d, h;

  if (offset > INT64_MAX || count == 0)
    return -1;
  d = lseek (fd, (off_t) offset, SEEK_DATA);
  if (d == -1) {
    if (errno == ENXIO) {       /* only a hole up to the end */
      *len = count;
      *is_data = 0;
      return 0;
    }
    return -1;
  }
  if ((uint64_t) d > offset) {
    *len = min64 ((uint64_t) d - offset, count);
    *is_data = 0;
    return 0;
  }
  h = lseek (fd, (off_t) offset, SEEK_HOLE);
  if (h == -1 || (uint64_t) h <= offset)
    return -1;
  *len = min64 ((uint64_t) h - offset, count);
  *is_data = 1;
  return 0;
#else
#error "SEEK_DATA / SEEK_HOLE are needed"
#endif
}

int
qcow2_posix_open (void *opaque, const char *path, struct qcow2_io *io,
                  char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen };
  struct stat st;
  int fd;

  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1) {
    seterr (&e, path, "open: %s", errstr (errno));
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    seterr (&e, path, "fstat: %s", errstr (errno));
    close (fd);
    return -1;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    seterr (&e, path, "not a regular file or block device");
    close (fd);
    return -1;
  }
  memset (io, 0, sizeof *io);
  io->opaque = (void *) (intptr_t) fd;
  io->pread = posix_pread;
  io->close = posix_close;
  io->extent = posix_extent;
  io->has_id = true;
  io->dev = st.st_dev;
  io->ino = st.st_ino;
  if (S_ISBLK (st.st_mode)) {
    off_t end = lseek (fd, 0, SEEK_END);
    if (end == -1) {
      seterr (&e, path, "lseek: %s", errstr (errno));
      close (fd);
      return -1;
    }
    io->size = end;
  }
  else
    io->size = st.st_size;
  return 0;
}

/*----------------------------------------------------------------------
 * L2 cache: slices of L2 tables, hashed by host offset, LRU eviction.
 * Entries are copied out under the lock so no slice is ever used after
 * it could have been evicted.
 */

static int
cache_init (struct l2cache *c, uint64_t bytes, uint32_t slice_bytes)
{
  uint64_t n = bytes / slice_bytes;
  uint32_t i;

  if (n < 1)
    n = 1;
  if (n > (UINT32_C(1) << 20))
    n = UINT32_C(1) << 20;
  c->nslots = n;
  c->nused = 0;
  c->nbuckets = 1;
  while (c->nbuckets < c->nslots)
    c->nbuckets <<= 1;
  c->slots = calloc (c->nslots, sizeof *c->slots);
  c->buckets = malloc (c->nbuckets * sizeof *c->buckets);
  if (c->slots == NULL || c->buckets == NULL) {
    free (c->slots);
    free (c->buckets);
    return -1;
  }
  for (i = 0; i < c->nbuckets; ++i)
    c->buckets[i] = -1;
  c->newest = c->oldest = -1;
  c->hits = c->misses = 0;
  if (pthread_mutex_init (&c->lock, NULL) != 0) {
    free (c->slots);
    free (c->buckets);
    return -1;
  }
  return 0;
}

static void
cache_free (struct l2cache *c)
{
  uint32_t i;

  for (i = 0; i < c->nused; ++i)
    free (c->slots[i].data);
  free (c->slots);
  free (c->buckets);
  pthread_mutex_destroy (&c->lock);
}

static inline uint32_t
cache_bucket (const struct l2cache *c, uint64_t key)
{
  return (uint32_t) (((key >> 9) * UINT64_C(0x9e3779b97f4a7c15)) >> 32)
    & (c->nbuckets - 1);
}

/* The LRU list (called with the lock held). */
static void
lru_unlink (struct l2cache *c, int32_t i)
{
  struct l2slot *s = &c->slots[i];

  if (s->newer != -1)
    c->slots[s->newer].older = s->older;
  else
    c->newest = s->older;
  if (s->older != -1)
    c->slots[s->older].newer = s->newer;
  else
    c->oldest = s->newer;
}

static void
lru_push (struct l2cache *c, int32_t i)
{
  struct l2slot *s = &c->slots[i];

  s->newer = -1;
  s->older = c->newest;
  if (c->newest != -1)
    c->slots[c->newest].newer = i;
  else
    c->oldest = i;
  c->newest = i;
}

/* Find KEY and make it the most recently used (lock held). */
static struct l2slot *
cache_find (struct l2cache *c, uint64_t key)
{
  int32_t i;

  for (i = c->buckets[cache_bucket (c, key)]; i != -1; i = c->slots[i].next) {
    if (c->slots[i].key == key) {
      if (c->newest != i) {
        lru_unlink (c, i);
        lru_push (c, i);
      }
      return &c->slots[i];
    }
  }
  return NULL;
}

/* Store the slice KEY (SLICE_BYTES bytes at DATA) in a free or recycled
 * slot (lock held).  Return NULL if out of memory.
 */
static struct l2slot *
cache_insert (struct l2cache *c, uint64_t key, const uint64_t *data,
              uint32_t slice_bytes)
{
  struct l2slot *s;
  int32_t victim;
  int32_t *pp;

  if (c->nused < c->nslots) {
    victim = c->nused;
    s = &c->slots[victim];
    s->data = malloc (slice_bytes);
    if (s->data == NULL)
      return NULL;
    c->nused++;
  }
  else {
    victim = c->oldest;
    s = &c->slots[victim];
    /* Unlink the evicted slice from its hash chain and the LRU list. */
    for (pp = &c->buckets[cache_bucket (c, s->key)]; *pp != -1;
         pp = &c->slots[*pp].next) {
      if (*pp == victim) {
        *pp = s->next;
        break;
      }
    }
    lru_unlink (c, victim);
  }
  s->key = key;
  memcpy (s->data, data, slice_bytes);
  s->next = c->buckets[cache_bucket (c, key)];
  c->buckets[cache_bucket (c, key)] = victim;
  lru_push (c, victim);
  return s;
}

/* Copy N entries of the L2 table at host offset L2OFF, starting at
 * entry IDX, into OUT (entry_words words each).  The entries must lie in
 * one slice.
 */
static int
l2_get (struct layer *l, uint64_t l2off, uint32_t idx, uint32_t n,
        uint64_t *out, struct err *e)
{
  struct l2cache *c = &l->cache;
  uint32_t slice = idx / l->slice_entries;
  uint32_t first = idx % l->slice_entries;
  uint64_t key = l2off + (uint64_t) slice * l->slice_bytes;
  size_t words = (size_t) n * l->entry_words;
  size_t skip = (size_t) first * l->entry_words;
  struct l2slot *s;
  uint64_t data[MAX_SLICE_BYTES / 8];
  uint32_t i;

  pthread_mutex_lock (&c->lock);
  s = cache_find (c, key);
  if (s) {
    c->hits++;
    memcpy (out, s->data + skip, words * sizeof (uint64_t));
    pthread_mutex_unlock (&c->lock);
    return 0;
  }
  c->misses++;
  pthread_mutex_unlock (&c->lock);

  /* Load the slice without holding the lock. */
  if (key > l->io.size || l->io.size - key < l->slice_bytes) {
    seterr (e, l->name, "L2 table at offset 0x%" PRIx64 " extends beyond "
            "the end of the file (size 0x%" PRIx64 ")", l2off, l->io.size);
    return -1;
  }
  if (io_read (&l->io, l->name, data, l->slice_bytes, key, e) == -1)
    return -1;
  for (i = 0; i < l->slice_bytes / 8; ++i)
    data[i] = be64 ((const uint8_t *) &data[i]);
  memcpy (out, data + skip, words * sizeof (uint64_t));

  /* Cache it unless another thread did meanwhile.  If there is no
   * memory for a new slot the slice is simply not cached.
   */
  pthread_mutex_lock (&c->lock);
  if (cache_find (c, key) == NULL)
    cache_insert (c, key, data, l->slice_bytes);
  pthread_mutex_unlock (&c->lock);
  return 0;
}

/*----------------------------------------------------------------------
 * Walking the clusters of one layer: produces coalesced runs.
 */

enum run_type { RUN_DATA, RUN_ZERO, RUN_UNALLOC, RUN_COMPRESSED };

struct run {
  enum run_type type;
  uint64_t offset;              /* guest offset */
  uint64_t len;
  uint64_t host;                /* DATA: host offset of OFFSET
                                 * COMPRESSED: host offset of the data */
  uint64_t csize;               /* COMPRESSED: bytes of compressed data */
  uint64_t cstart;              /* COMPRESSED: guest offset of the cluster */
};

/* Return 0 to continue, 1 to stop, -1 on error. */
typedef int (*run_fn) (struct layer *l, const struct run *r, void *opaque,
                       struct err *e);

struct walker {
  struct layer *l;
  uint64_t start, end;
  bool have;
  struct run pending;
  run_fn fn;
  void *opaque;
  struct err *e;
};

static int
walk_emit (struct walker *w, enum run_type type, uint64_t off, uint64_t len,
           uint64_t host, uint64_t csize)
{
  uint64_t cstart = off;
  int r;

  if (off + len <= w->start || off >= w->end)
    return 0;
  if (off < w->start) {
    uint64_t d = w->start - off;
    off += d;
    len -= d;
    if (type == RUN_DATA)
      host += d;
  }
  if (off + len > w->end)
    len = w->end - off;

  if (w->have && w->pending.type == type && type != RUN_COMPRESSED &&
      w->pending.offset + w->pending.len == off &&
      (type != RUN_DATA || w->pending.host + w->pending.len == host)) {
    w->pending.len += len;
    return 0;
  }
  if (w->have) {
    r = w->fn (w->l, &w->pending, w->opaque, w->e);
    if (r != 0)
      return r;
  }
  w->have = true;
  w->pending.type = type;
  w->pending.offset = off;
  w->pending.len = len;
  w->pending.host = host;
  w->pending.csize = csize;
  w->pending.cstart = cstart;
  return 0;
}

/* Check a standard cluster's host offset. */
static int
check_host_offset (struct layer *l, uint64_t host, uint64_t guest,
                   struct err *e)
{
  const struct qcow2_io *io = l->has_data_file ? &l->data : &l->io;
  const char *name = l->has_data_file ? l->data_name : l->name;

  if (host & (l->cluster_size - 1)) {
    seterr (e, l->name, "data cluster offset 0x%" PRIx64 " (guest offset 0x%"
            PRIx64 ") is not aligned to the cluster size (0x%" PRIx64 ")",
            host, guest, l->cluster_size);
    return -1;
  }
  if (host >= io->size) {
    seterr (e, l->name, "data cluster offset 0x%" PRIx64 " (guest offset 0x%"
            PRIx64 ") is beyond the end of %s (size 0x%" PRIx64 ")",
            host, guest,
            l->has_data_file ? name : "the file", io->size);
    return -1;
  }
  return 0;
}

/* Emit the runs of one cluster at guest offset GUEST with L2 entry E0
 * (and bitmap E1 for extended entries).
 */
static int
walk_cluster (struct walker *w, uint64_t guest, uint64_t e0, uint64_t e1)
{
  struct layer *l = w->l;
  struct err *e = w->e;
  uint64_t host;
  bool present;

  if (e0 & L2_COMPRESSED) {
    uint32_t x = 62 - (l->cluster_bits - 8);
    uint64_t desc = e0 & ~(L2_COMPRESSED | L2_COPIED);
    uint64_t coff = desc & ((UINT64_C(1) << x) - 1);
    uint64_t nsec = (desc >> x) + 1;
    uint64_t csize = nsec * 512 - (coff & 511);
    uint64_t fsize = l->io.size;

    if (l->has_data_file) {
      seterr (e, l->name, "compressed cluster at guest offset 0x%" PRIx64
              " in an image with an external data file", guest);
      return -1;
    }
    if (coff >> 56) {
      seterr (e, l->name, "compressed cluster descriptor 0x%" PRIx64
              " (guest offset 0x%" PRIx64 ") has reserved offset bits set",
              e0, guest);
      return -1;
    }
    if (coff >= fsize ||
        coff + csize > ((fsize + 511) & ~UINT64_C(511))) {
      seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
              " (0x%" PRIx64 " bytes, guest offset 0x%" PRIx64
              ") is beyond the end of the file (size 0x%" PRIx64 ")",
              coff, csize, guest, fsize);
      return -1;
    }
    return walk_emit (w, RUN_COMPRESSED, guest, l->cluster_size, coff,
                      csize);
  }

  host = e0 & L2_OFFSET_MASK;
  present = host != 0 || (l->has_data_file && (e0 & L2_COPIED));

  if (!l->extended_l2) {
    if (l->version >= 3 && (e0 & L2_ZERO))
      return walk_emit (w, RUN_ZERO, guest, l->cluster_size, 0, 0);
    if (!present)
      return walk_emit (w, RUN_UNALLOC, guest, l->cluster_size, 0, 0);
    if (check_host_offset (l, host, guest, e) == -1)
      return -1;
    return walk_emit (w, RUN_DATA, guest, l->cluster_size, host, 0);
  }
  else {
    uint32_t alloc = e1 & 0xffffffff, zero = e1 >> 32;
    uint64_t sub = l->cluster_size / 32;
    unsigned i;
    int r;

    if (alloc & zero) {
      seterr (e, l->name, "invalid subcluster bitmap 0x%016" PRIx64
              " at guest offset 0x%" PRIx64
              " (subclusters both allocated and zero)", e1, guest);
      return -1;
    }
    if (alloc) {
      if (!present) {
        seterr (e, l->name, "L2 entry at guest offset 0x%" PRIx64
                " has allocated subclusters (bitmap 0x%016" PRIx64
                ") but no host offset", guest, e1);
        return -1;
      }
      if (check_host_offset (l, host, guest, e) == -1)
        return -1;
    }
    /* Fast path: the whole cluster is uniform. */
    if (alloc == 0xffffffff)
      return walk_emit (w, RUN_DATA, guest, l->cluster_size, host, 0);
    if (zero == 0xffffffff)
      return walk_emit (w, RUN_ZERO, guest, l->cluster_size, 0, 0);
    if (alloc == 0 && zero == 0)
      return walk_emit (w, RUN_UNALLOC, guest, l->cluster_size, 0, 0);
    for (i = 0; i < 32; ++i) {
      uint64_t off = guest + i * sub;
      if (off + sub <= w->start)
        continue;
      if (off >= w->end)
        break;
      if (alloc & (UINT32_C(1) << i))
        r = walk_emit (w, RUN_DATA, off, sub, host + i * sub, 0);
      else if (zero & (UINT32_C(1) << i))
        r = walk_emit (w, RUN_ZERO, off, sub, 0, 0);
      else
        r = walk_emit (w, RUN_UNALLOC, off, sub, 0, 0);
      if (r != 0)
        return r;
    }
    return 0;
  }
}

/* Walk [OFFSET, OFFSET+COUNT) of a qcow2 layer (within its size). */
static int
walk (struct layer *l, uint64_t offset, uint64_t count,
      run_fn fn, void *opaque, struct err *e)
{
  struct walker w = {
    .l = l, .start = offset, .end = offset + count,
    .have = false, .fn = fn, .opaque = opaque, .e = e,
  };
  uint64_t entries[MAX_SLICE_BYTES / 8];
  uint64_t cidx, last;
  uint32_t l2_entries = UINT32_C(1) << l->l2_bits;
  int r;

  if (count == 0)
    return 0;
  cidx = offset >> l->cluster_bits;
  last = (offset + count - 1) >> l->cluster_bits;
  while (cidx <= last) {
    uint64_t l1i = cidx >> l->l2_bits;
    uint32_t l2i = cidx & (l2_entries - 1);
    uint32_t n = l->slice_entries - l2i % l->slice_entries;
    uint64_t l2off;
    uint32_t k;

    if (n > last - cidx + 1)
      n = last - cidx + 1;
    l2off = l1i < l->l1_size ? l->l1[l1i] : 0;
    if (l2off == 0) {
      r = walk_emit (&w, RUN_UNALLOC, cidx << l->cluster_bits,
                     (uint64_t) n << l->cluster_bits, 0, 0);
      if (r != 0)
        return r;
    }
    else {
      if (l2_get (l, l2off, l2i, n, entries, e) == -1)
        return -1;
      for (k = 0; k < n; ++k) {
        uint64_t e0 = entries[k * l->entry_words];
        uint64_t e1 = l->extended_l2 ? entries[k * 2 + 1] : 0;
        r = walk_cluster (&w, (cidx + k) << l->cluster_bits, e0, e1);
        if (r != 0)
          return r;
      }
    }
    cidx += n;
  }
  if (w.have)
    return fn (l, &w.pending, opaque, e);
  return 0;
}

/*----------------------------------------------------------------------
 * Reading.
 */

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

static struct scratch *
scratch_get (struct layer *l, struct err *e)
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
    seterr (e, l->name, "out of memory");
    return NULL;
  }
  return s;
}

static void
scratch_put (struct layer *l, struct scratch *s)
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
      seterr (e, l->name, "zlib: inflateInit2 failed");
      return -1;
    }
    s->zs_ok = true;
  }
  else if (inflateReset (zs) != Z_OK) {
    seterr (e, l->name, "zlib: inflateReset failed");
    return -1;
  }
  zs->next_in = s->cbuf;
  zs->avail_in = inlen;
  zs->next_out = out;
  zs->avail_out = l->cluster_size;
  zr = inflate (zs, Z_FINISH);
  if ((zr != Z_STREAM_END && zr != Z_BUF_ERROR && zr != Z_OK) ||
      zs->avail_out != 0) {
    seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
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
      seterr (e, l->name, "out of memory");
      return -1;
    }
  }
  while (out_pos < out_size) {
    size_t fsize, n;

    fsize = ZSTD_findFrameCompressedSize (in + in_pos, inlen - in_pos);
    if (ZSTD_isError (fsize)) {
      if (in_pos > 0)           /* something after the frame(s) */
        seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                " (guest offset 0x%" PRIx64 ") is corrupt: zstd data "
                "too short (0x%zx of 0x%zx bytes)",
                r->host, r->cstart, out_pos, out_size);
      else
        seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                " (guest offset 0x%" PRIx64 ") is corrupt: zstd: %s",
                r->host, r->cstart, ZSTD_getErrorName (fsize));
      return -1;
    }
    n = ZSTD_decompressDCtx (s->zctx, out + out_pos, out_size - out_pos,
                             in + in_pos, fsize);
    if (ZSTD_isError (n)) {
      if (ZSTD_getErrorCode (n) == ZSTD_error_dstSize_tooSmall)
        seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                " (guest offset 0x%" PRIx64 ") is corrupt: zstd data "
                "larger than a cluster (0x%zx bytes)",
                r->host, r->cstart, out_size);
      else
        seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
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
static int
decompress (struct layer *l, struct scratch *s, const struct run *r,
            uint8_t *out, struct err *e)
{
  uint64_t inlen = min64 (r->csize, l->io.size - r->host);

  if (inlen > 2 * l->cluster_size)      /* cannot happen: bounded by nsec */
    inlen = 2 * l->cluster_size;
  if (io_read (&l->io, l->name, s->cbuf, inlen, r->host, e) == -1)
    return -1;
  if (l->compression == COMPRESSION_ZLIB)
    return inflate_cluster (l, s, r, inlen, out, e);
  return zstd_cluster (l, s, r, inlen, out, e);
}

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
      return io_read (&l->data, l->data_name, dst, r->len, r->host, e);
    return io_read (&l->io, l->name, dst, r->len, r->host, e);
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
      c->s = scratch_get (l, e);
      if (c->s == NULL)
        return -1;
    }
    /* A whole cluster is decompressed straight into the caller's
     * buffer; only part of one goes through a bounce buffer.
     */
    if (r->offset == r->cstart && r->len == l->cluster_size)
      return decompress (l, c->s, r, dst, e);
    if (c->s->obuf == NULL) {
      c->s->obuf = malloc (l->cluster_size);
      if (c->s->obuf == NULL) {
        seterr (e, l->name, "out of memory");
        return -1;
      }
    }
    if (decompress (l, c->s, r, c->s->obuf, e) == -1)
      return -1;
    memcpy (dst, c->s->obuf + (r->offset - r->cstart), r->len);
    return 0;
  }
  seterr (e, l->name, "internal error: bad run type");
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
    return io_read (&l->io, l->name, buf, count, offset, e);

  c.buf = buf;
  c.base = offset;
  c.s = NULL;
  r = walk (l, offset, count, read_run, &c, e);
  if (c.s)
    scratch_put (l, c.s);
  return r == -1 ? -1 : 0;
}

int
qcow2_pread (struct qcow2_image *img, void *buf, size_t count,
             uint64_t offset, char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen };

  if (offset > img->top->size || count > img->top->size - offset) {
    seterr (&e, img->top->name, "read beyond the end of the disk "
            "(offset 0x%" PRIx64 ", count 0x%zx)", offset, count);
    return -1;
  }
  return layer_read (img->top, buf, count, offset, &e);
}

/*----------------------------------------------------------------------
 * Mapping.
 */

struct mapper {
  qcow2_extent_fn fn;
  void *opaque;
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
  if (m->have && m->flags == flags && m->off + m->len == off) {
    m->len += len;
    return 0;
  }
  if (m->have) {
    r = m->fn (m->opaque, m->off, m->len, m->flags);
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
    return map_out (m, r->offset, r->len, ZERO_FLAGS);
  case RUN_UNALLOC:
    if (l->backing)
      return layer_map (l->backing, r->offset, r->len, m, e);
    return map_out (m, r->offset, r->len, ZERO_FLAGS);
  }
  seterr (e, l->name, "internal error: bad run type");
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
                        min64 (count, l->io.size - offset),
                        &len, &is_data) == -1 ||
          len == 0 || len > count) {
        len = min64 (count, l->io.size - offset);
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
  return walk (l, offset, count, map_run, m, e);
}

int
qcow2_map (struct qcow2_image *img, uint64_t offset, uint64_t count,
           qcow2_extent_fn fn, void *opaque, char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen };
  struct mapper m = { .fn = fn, .opaque = opaque, .have = false };
  int r;

  if (offset > img->top->size || count > img->top->size - offset) {
    seterr (&e, img->top->name, "map beyond the end of the disk "
            "(offset 0x%" PRIx64 ", count 0x%" PRIx64 ")", offset, count);
    return -1;
  }
  r = layer_map (img->top, offset, count, &m, &e);
  if (r == -1)
    return -1;
  if (r == 1)
    return 0;
  if (m.have && fn (opaque, m.off, m.len, m.flags) == -1)
    return -1;
  return 0;
}

/*----------------------------------------------------------------------
 * Opening.
 */

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
      cache_free (&l->cache);
    if (l->pool_ok) {
      while (l->pool) {
        struct scratch *s = l->pool;
        l->pool = s->next;
        scratch_free (s);
      }
      pthread_mutex_destroy (&l->pool_lock);
    }
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

  if (name[0] == '\0') {
    seterr (e, image, "%s name is empty", what);
    return -1;
  }
  if (strncmp (name, "json:", 5) == 0) {
    seterr (e, image, "%s name '%s' is a json: pseudo-protocol name, "
            "which is not supported (only local file names are)",
            what, name);
    return -1;
  }
  if (colon && (slash == NULL || colon < slash)) {
    seterr (e, image, "%s name '%s' looks like a protocol name (':' before "
            "any '/'), which is not supported (only local file names are; "
            "write ./%s for a local file)", what, name, name);
    return -1;
  }
  return 0;
}

/* Copy a string of LEN bytes from the header (not NUL-terminated). */
static char *
header_string (const char *image, const char *what, const uint8_t *p,
               uint32_t len, struct err *e)
{
  char *s;

  if (memchr (p, 0, len) != NULL) {
    seterr (e, image, "%s contains a NUL byte", what);
    return NULL;
  }
  s = malloc (len + 1);
  if (s == NULL) {
    seterr (e, image, "out of memory");
    return NULL;
  }
  memcpy (s, p, len);
  s[len] = '\0';
  return s;
}

/* Describe unknown incompatible bits using the feature name table. */
static void
unknown_features (char *out, size_t outlen, uint64_t bits,
                  const uint8_t *table, uint32_t tlen)
{
  size_t used = 0;
  unsigned b;
  uint32_t i;

  out[0] = '\0';
  for (b = 0; b < 64; ++b) {
    const char *fname = NULL;
    char nbuf[47];
    int n;

    if (!(bits & (UINT64_C(1) << b)))
      continue;
    for (i = 0; table && i + 48 <= tlen; i += 48) {
      if (table[i] == 0 && table[i + 1] == b) {
        memcpy (nbuf, table + i + 2, 46);
        nbuf[46] = '\0';
        fname = nbuf;
        break;
      }
    }
    if (fname)
      n = snprintf (out + used, outlen - used, "%sbit %u (%s)",
                    used ? ", " : "", b, fname);
    else
      n = snprintf (out + used, outlen - used, "%sbit %u",
                    used ? ", " : "", b);
    if (n < 0 || (size_t) n >= outlen - used)
      return;
    used += n;
  }
}

/* Prefix the message of a failed open_file callback. */
static void
wrap_open_error (struct err *e, const char *image, const char *what)
{
  char msg[QCOW2_ERRLEN];

  if (e->buf == NULL || e->len == 0)
    return;
  snprintf (msg, sizeof msg, "%s", e->buf[0] ? e->buf : "unknown error");
  seterr (e, image, "cannot open %s: %s", what, msg);
}

static int open_layer (const struct qcow2_options *o, struct qcow2_io *io,
                       const char *name, bool raw, unsigned depth,
                       struct chain_ids *ids, struct layer **ret,
                       struct err *e);

static int
open_qcow2 (const struct qcow2_options *o, struct layer *l,
            struct chain_ids *ids, struct err *e)
{
  uint8_t h[V3_HEADER_LEN];
  uint8_t *hc = NULL;           /* the first cluster (header area) */
  uint64_t hclen;
  uint32_t magic, header_len, crypt, l1_size_hdr, refcount_order = 4;
  uint64_t incompat = 0, autoclear = 0, l1_offset, needed, shift;
  uint64_t backing_off;
  uint32_t backing_len, ext_end, off;
  const uint8_t *ftable = NULL;
  uint32_t ftable_len = 0;
  char *backing_name = NULL, *backing_fmt = NULL, *data_name = NULL;
  uint8_t *l1raw = NULL;
  uint32_t i;
  int ret = -1;

  if (l->io.size < V2_HEADER_LEN) {
    seterr (e, l->name, "file is too small (%" PRIu64 " bytes) to be a "
            "qcow2 image", l->io.size);
    return -1;
  }
  memset (h, 0, sizeof h);
  if (io_read (&l->io, l->name, h, min64 (sizeof h, l->io.size), 0, e) == -1)
    return -1;
  magic = be32 (h);
  if (magic != QCOW2_MAGIC) {
    seterr (e, l->name, "not a qcow2 image (bad magic 0x%08" PRIx32 ")",
            magic);
    return -1;
  }
  l->version = be32 (h + 4);
  if (l->version != 2 && l->version != 3) {
    seterr (e, l->name, "unsupported qcow2 version %" PRIu32
            " (only 2 and 3 are supported)", l->version);
    return -1;
  }
  backing_off = be64 (h + 8);
  backing_len = be32 (h + 16);
  l->cluster_bits = be32 (h + 20);
  l->size = be64 (h + 24);
  crypt = be32 (h + 32);
  l1_size_hdr = be32 (h + 36);
  l1_offset = be64 (h + 40);

  if (l->cluster_bits < 9 || l->cluster_bits > 21) {
    seterr (e, l->name, "cluster_bits %" PRIu32 " is out of range "
            "(supported cluster sizes are 512 bytes to 2 MiB, "
            "cluster_bits 9 to 21)", l->cluster_bits);
    return -1;
  }
  l->cluster_size = UINT64_C(1) << l->cluster_bits;

  if (l->version == 2)
    header_len = V2_HEADER_LEN;
  else {
    if (l->io.size < V3_HEADER_LEN) {
      seterr (e, l->name, "file is too small (%" PRIu64 " bytes) for a "
              "version 3 header", l->io.size);
      return -1;
    }
    incompat = be64 (h + 72);
    autoclear = be64 (h + 88);
    refcount_order = be32 (h + 96);
    header_len = be32 (h + 100);
    if (header_len < V3_HEADER_LEN || header_len % 8 != 0 ||
        header_len > l->cluster_size) {
      seterr (e, l->name, "header_length %" PRIu32 " is invalid (must be "
              "a multiple of 8 between %d and the cluster size %" PRIu64 ")",
              header_len, V3_HEADER_LEN, l->cluster_size);
      return -1;
    }
    if (refcount_order > 6) {
      seterr (e, l->name, "refcount_order %" PRIu32 " is invalid "
              "(at most 6)", refcount_order);
      return -1;
    }
  }
  if (header_len > l->io.size) {
    seterr (e, l->name, "header_length %" PRIu32 " is beyond the end of "
            "the file (size 0x%" PRIx64 ")", header_len, l->io.size);
    return -1;
  }

  if (crypt != 0) {
    seterr (e, l->name, "image is encrypted (crypt_method %" PRIu32 ", %s); "
            "encrypted images are not supported", crypt,
            crypt == 1 ? "AES" : crypt == 2 ? "LUKS" : "unknown method");
    return -1;
  }

  /* Read the header cluster (bounded by 2 MiB). */
  hclen = min64 (l->cluster_size, l->io.size);
  hc = malloc (hclen);
  if (hc == NULL) {
    seterr (e, l->name, "out of memory");
    return -1;
  }
  if (io_read (&l->io, l->name, hc, hclen, 0, e) == -1)
    goto out;

  /* Backing file name location. */
  if (backing_off != 0 && backing_len != 0) {
    if (backing_len > MAX_NAME_LEN) {
      seterr (e, l->name, "backing file name length %" PRIu32 " is too "
              "long (at most %d)", backing_len, MAX_NAME_LEN);
      goto out;
    }
    if (backing_off > hclen || backing_len > hclen - backing_off) {
      seterr (e, l->name, "backing file name at offset 0x%" PRIx64
              " (length %" PRIu32 ") is outside the first cluster of the "
              "file (0x%" PRIx64 " bytes)", backing_off, backing_len, hclen);
      goto out;
    }
    if (backing_off < header_len) {
      seterr (e, l->name, "backing file name at offset 0x%" PRIx64
              " overlaps the header (length %" PRIu32 ")",
              backing_off, header_len);
      goto out;
    }
    backing_name = header_string (l->name, "backing file name",
                                  hc + backing_off, backing_len, e);
    if (backing_name == NULL)
      goto out;
  }

  /* Header extensions. */
  ext_end = hclen;
  if (backing_name && backing_off < ext_end)
    ext_end = backing_off;
  off = header_len;
  while (off + 8 <= ext_end) {
    uint32_t type = be32 (hc + off);
    uint32_t len = be32 (hc + off + 4);
    const uint8_t *data = hc + off + 8;

    off += 8;
    if (type == EXT_END)
      break;
    if (len > ext_end - off) {
      seterr (e, l->name, "header extension 0x%08" PRIx32 " at offset 0x%"
              PRIx32 " has length %" PRIu32 ", which runs past the end of "
              "the header extension area (0x%" PRIx32 ")",
              type, off - 8, len, ext_end);
      goto out;
    }
    switch (type) {
    case EXT_BACKING_FMT:
      if (len > MAX_NAME_LEN) {
        seterr (e, l->name, "backing format name length %" PRIu32
                " is too long", len);
        goto out;
      }
      free (backing_fmt);
      backing_fmt = header_string (l->name, "backing format name",
                                   data, len, e);
      if (backing_fmt == NULL)
        goto out;
      break;
    case EXT_DATA_FILE:
      if (len > MAX_DATA_FILE_NAME_LEN) {
        seterr (e, l->name, "data file name length %" PRIu32
                " is too long", len);
        goto out;
      }
      free (data_name);
      data_name = header_string (l->name, "data file name", data, len, e);
      if (data_name == NULL)
        goto out;
      break;
    case EXT_FEATURES:
      ftable = data;
      ftable_len = len;
      break;
    default:
      break;                    /* ignored */
    }
    off += (len + 7) & ~UINT32_C(7);
    if (off < len)              /* overflow */
      break;
  }

  /* Feature bits. */
  if (incompat & ~INCOMPAT_KNOWN) {
    char desc[256];
    unknown_features (desc, sizeof desc, incompat & ~INCOMPAT_KNOWN,
                      ftable, ftable_len);
    seterr (e, l->name, "image uses unknown incompatible feature(s): %s "
            "(incompatible_features 0x%" PRIx64 ")", desc, incompat);
    goto out;
  }
  if (incompat & INCOMPAT_CORRUPT) {
    seterr (e, l->name, "image is marked corrupt (incompatible feature bit "
            "1); check and repair it with 'qemu-img check -r all' first");
    goto out;
  }
  if (incompat & INCOMPAT_DIRTY)
    debug (o, "%s: dirty bit set (ignored: refcounts are not used)",
           l->name);
  l->extended_l2 = (incompat & INCOMPAT_EXTL2) != 0;
  if (l->extended_l2 && l->cluster_bits < 14) {
    seterr (e, l->name, "extended L2 entries need a cluster size of at "
            "least 16 KiB (cluster_bits %" PRIu32 ")", l->cluster_bits);
    goto out;
  }
  l->compression = COMPRESSION_ZLIB;
  if (header_len > 104) {
    uint8_t ct = hc[104];
    if (incompat & INCOMPAT_COMPRESSION) {
      if (ct != COMPRESSION_ZSTD) {
        seterr (e, l->name, "unsupported compression_type %u (supported: "
                "0 zlib, 1 zstd)", ct);
        goto out;
      }
      l->compression = ct;
    }
    else if (ct != 0) {
      seterr (e, l->name, "compression_type %u is set but the compression "
              "type feature bit (incompatible bit 3) is not", ct);
      goto out;
    }
  }
  else if (incompat & INCOMPAT_COMPRESSION) {
    seterr (e, l->name, "compression type feature bit (incompatible bit 3) "
            "is set but the header (length %" PRIu32 ") has no "
            "compression_type field", header_len);
    goto out;
  }

  /* Geometry and the L1 table. */
  l->entry_words = l->extended_l2 ? 2 : 1;
  l->l2_bits = l->cluster_bits - (l->extended_l2 ? 4 : 3);
  l->slice_bytes = min64 (l->cluster_size, MAX_SLICE_BYTES);
  l->slice_entries = l->slice_bytes / (8 * l->entry_words);
  if (l->size > INT64_MAX) {
    seterr (e, l->name, "virtual size 0x%" PRIx64 " is too large", l->size);
    goto out;
  }
  shift = l->cluster_bits + l->l2_bits;
  needed = (l->size >> shift) +
    ((l->size & ((UINT64_C(1) << shift) - 1)) != 0);
  if (l1_size_hdr < needed) {
    seterr (e, l->name, "L1 table is too small for the virtual size: "
            "l1_size %" PRIu32 " entries cover 0x%" PRIx64 " bytes, "
            "virtual size 0x%" PRIx64 " needs %" PRIu64 " entries",
            l1_size_hdr, (uint64_t) l1_size_hdr << shift, l->size, needed);
    goto out;
  }
  if ((uint64_t) l1_size_hdr * 8 > QCOW2_MAX_L1_BYTES) {
    seterr (e, l->name, "l1_size %" PRIu32 " entries (%" PRIu64 " bytes) "
            "is larger than the limit of %d bytes", l1_size_hdr,
            (uint64_t) l1_size_hdr * 8, QCOW2_MAX_L1_BYTES);
    goto out;
  }
  if (l1_size_hdr > 0) {
    if (l1_offset & (l->cluster_size - 1)) {
      seterr (e, l->name, "L1 table offset 0x%" PRIx64 " is not aligned to "
              "the cluster size (0x%" PRIx64 ")", l1_offset, l->cluster_size);
      goto out;
    }
    if (l1_offset == 0 || l1_offset >= l->io.size ||
        (uint64_t) l1_size_hdr * 8 > l->io.size - l1_offset) {
      seterr (e, l->name, "L1 table at offset 0x%" PRIx64 " (%" PRIu32
              " entries) is %s (size 0x%" PRIx64 ")", l1_offset,
              l1_size_hdr,
              l1_offset == 0 ? "at offset 0, overlapping the header" :
              "beyond the end of the file", l->io.size);
      goto out;
    }
  }
  l->l1_size = needed;
  if (needed > 0) {
    l->l1 = malloc (needed * 8);
    l1raw = malloc (needed * 8);
    if (l->l1 == NULL || l1raw == NULL) {
      seterr (e, l->name, "out of memory");
      goto out;
    }
    if (io_read (&l->io, l->name, l1raw, needed * 8, l1_offset, e) == -1)
      goto out;
    for (i = 0; i < needed; ++i) {
      uint64_t l2off = be64 (l1raw + 8 * i) & L1_OFFSET_MASK;
      if (l2off & (l->cluster_size - 1)) {
        seterr (e, l->name, "L2 table offset 0x%" PRIx64 " (L1 entry %"
                PRIu32 ") is not aligned to the cluster size (0x%" PRIx64
                ")", l2off, i, l->cluster_size);
        goto out;
      }
      if (l2off != 0 &&
          (l2off >= l->io.size || l->io.size - l2off < l->cluster_size)) {
        seterr (e, l->name, "L2 table offset 0x%" PRIx64 " (L1 entry %"
                PRIu32 ") is beyond the end of the file (size 0x%" PRIx64
                ")", l2off, i, l->io.size);
        goto out;
      }
      l->l1[i] = l2off;
    }
  }

  if (cache_init (&l->cache, o->l2_cache_size ? o->l2_cache_size
                  : QCOW2_DEFAULT_L2_CACHE_SIZE, l->slice_bytes) == -1) {
    seterr (e, l->name, "out of memory");
    goto out;
  }
  l->cache_ok = true;
  if (pthread_mutex_init (&l->pool_lock, NULL) != 0) {
    seterr (e, l->name, "pthread_mutex_init failed");
    goto out;
  }
  l->pool_ok = true;
  l->pool_max = POOL_BYTES / (3 * l->cluster_size + 256 * 1024);
  if (l->pool_max < 2)
    l->pool_max = 2;

  /* External data file. */
  if (incompat & INCOMPAT_DATA_FILE) {
    const char *dname;
    char *path;

    l->data_file_raw = (autoclear & AUTOCLEAR_DATA_FILE_RAW) != 0;
    if (l->depth == 0 && o->data_file)
      dname = o->data_file;
    else if (data_name) {
      if (check_file_name (l->name, "data file", data_name, e) == -1)
        goto out;
      dname = data_name;
    }
    else {
      seterr (e, l->name, "image uses an external data file but does not "
              "name it%s", l->depth == 0 ? " (use data-file=FILE)" : "");
      goto out;
    }
    if (l->depth == 0 && o->data_file)
      path = strdup (dname);
    else
      path = resolve_name (l->name, dname);
    if (path == NULL) {
      seterr (e, l->name, "out of memory");
      goto out;
    }
    if (o->open_file == NULL) {
      seterr (e, l->name, "image uses an external data file '%s' but no "
              "way to open files was given", path);
      free (path);
      goto out;
    }
    if (e->buf && e->len)
      e->buf[0] = '\0';
    if (o->open_file (o->open_opaque, path, &l->data,
                      e->buf, e->len) == -1) {
      wrap_open_error (e, l->name, "external data file");
      free (path);
      goto out;
    }
    l->data_name = path;
    l->has_data_file = true;
  }

  debug (o, "layer %u: %s: qcow2 v%" PRIu32 ", size %" PRIu64
         ", cluster %" PRIu64 ", l1 %" PRIu32 " entries%s%s%s%s%s%s%s%s",
         l->depth, l->name, l->version, l->size, l->cluster_size,
         l->l1_size,
         l->extended_l2 ? ", extended L2" : "",
         l->compression == COMPRESSION_ZSTD ? ", zstd" : "",
         l->has_data_file ? ", data file " : "",
         l->has_data_file ? l->data_name : "",
         l->data_file_raw ? " (raw)" : "",
         backing_name ? ", backing " : "",
         backing_name ? backing_name : "",
         backing_fmt ? (strcmp (backing_fmt, "raw") == 0 ? " (raw)"
                        : " (qcow2)") : "");

  /* Backing file. */
  if (backing_name) {
    struct qcow2_io bio;
    bool braw;
    char *path;
    unsigned max_depth = o->max_depth ? o->max_depth : QCOW2_MAX_DEPTH;

    if (max_depth > QCOW2_MAX_DEPTH)
      max_depth = QCOW2_MAX_DEPTH;
    if (!o->backing) {
      debug (o, "%s: backing file '%s' not opened (backing=false)",
             l->name, backing_name);
      ret = 0;
      goto out;
    }
    if (check_file_name (l->name, "backing file", backing_name, e) == -1)
      goto out;
    if (backing_fmt == NULL) {
      seterr (e, l->name, "backing file '%s' has no recorded backing format "
              "and will not be probed; record it with "
              "'qemu-img rebase -u -b %s -F FMT %s' (FMT qcow2 or raw), "
              "or use backing=false", backing_name, backing_name, l->name);
      goto out;
    }
    if (strcmp (backing_fmt, "qcow2") == 0)
      braw = false;
    else if (strcmp (backing_fmt, "raw") == 0)
      braw = true;
    else {
      seterr (e, l->name, "backing file '%s' has format '%s', which is not "
              "supported (only qcow2 and raw)", backing_name, backing_fmt);
      goto out;
    }
    if (l->data_file_raw) {
      seterr (e, l->name, "image has a raw external data file "
              "(data-file-raw) and a backing file, which is not allowed");
      goto out;
    }
    if (l->depth + 1 >= max_depth) {
      seterr (e, l->name, "backing chain is longer than the limit of %u "
              "layers (max-depth) at backing file '%s'", max_depth,
              backing_name);
      goto out;
    }
    path = resolve_name (l->name, backing_name);
    if (path == NULL) {
      seterr (e, l->name, "out of memory");
      goto out;
    }
    if (o->open_file == NULL) {
      seterr (e, l->name, "image has backing file '%s' but no way to open "
              "files was given (disable backing)", path);
      free (path);
      goto out;
    }
    if (e->buf && e->len)
      e->buf[0] = '\0';
    if (o->open_file (o->open_opaque, path, &bio, e->buf, e->len) == -1) {
      wrap_open_error (e, l->name, "backing file");
      free (path);
      goto out;
    }
    if (bio.has_id) {
      for (i = 0; i < ids->n; ++i) {
        if (ids->dev[i] == bio.dev && ids->ino[i] == bio.ino) {
          seterr (e, l->name, "backing file loop: '%s' is already in the "
                  "backing chain", path);
          if (bio.close)
            bio.close (bio.opaque);
          free (path);
          goto out;
        }
      }
    }
    if (open_layer (o, &bio, path, braw, l->depth + 1, ids,
                    &l->backing, e) == -1) {
      free (path);
      goto out;
    }
    free (path);
  }

  ret = 0;
 out:
  free (hc);
  free (l1raw);
  free (backing_name);
  free (backing_fmt);
  free (data_name);
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
    seterr (e, name, "out of memory");
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
    debug (o, "layer %u: %s: raw, size %" PRIu64, depth, name, l->size);
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
  struct err e = { errbuf, errlen };
  struct qcow2_io tmp = *io;
  struct chain_ids ids = { .n = 0 };
  struct qcow2_image *img;
  struct layer *l;

  if (errbuf && errlen)
    errbuf[0] = '\0';
  img = calloc (1, sizeof *img);
  if (img == NULL) {
    seterr (&e, name, "out of memory");
    if (io->close)
      io->close (io->opaque);
    return -1;
  }
  if (open_layer (opts, &tmp, name, false, 0, &ids, &img->top, &e) == -1) {
    free (img);
    return -1;
  }
  for (l = img->top; l; l = l->backing)
    img->depth++;
  img->debug = opts->debug;
  img->debug_opaque = opts->debug_opaque;
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
    }
  }
  layer_free (img->top);
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
