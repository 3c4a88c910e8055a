/* sparsebackup: qcow2 reader, private declarations shared by its files.
 *
 * Pure C, no nbdkit headers (the fuzz harnesses and unit tests link these
 * files directly).  The public API is qcow2.h.  Where to find things:
 *
 *   qcow2-io.c          error messages, reading files, the memory and
 *                       POSIX I/O backends
 *   qcow2-l2cache.c     the L2 table cache
 *   qcow2-walk.c        the cluster walker: the one lookup of guest
 *                       offsets (L1 -> L2 -> host) serving reads and maps
 *   qcow2-decompress.c  compressed clusters (zlib, zstd), scratch pool
 *   qcow2-read.c        qcow2_pread, qcow2_map and qcow2_map_top
 *   qcow2-header.c      header, header extensions, feature bits, L1 table
 *   qcow2-open.c        opening a layer (its header, then its data file
 *                       and backing file), the public open / close
 *   qcow2-bitmap.c      persistent bitmaps (parsed lazily) for @since
 *
 * Internal functions shared between files are prefixed q2_.
 */

#ifndef SPARSEBACKUP_QCOW2_INTERNAL_H
#define SPARSEBACKUP_QCOW2_INTERNAL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

#include <zlib.h>
#include <zstd.h>

#include "qcow2.h"

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
#define EXT_BITMAPS      0x23852875U
#define BITMAPS_EXT_LEN  24

#define AUTOCLEAR_BITMAPS       (UINT64_C(1) << 0)

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
#define MAX_SLICE_BYTES UINT64_C(4096)

/* Where a failing function writes its message.  ERRNUM is the errno the
 * public function fails with: EIO unless said otherwise (ENOMEM, or the
 * errno of a failed read).
 */
struct err {
  char *buf;
  size_t len;
  int errnum;
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
  struct libdeflate_decompressor *ld; /* lazy (with libdeflate only) */
};

/* Checked bitmap tables remembered per layer. */
#define BM_OK_TABLES 16

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
  uint64_t inflated_fast, inflated_zlib; /* zlib clusters, by decoder */
  uint64_t inflated_zstd;

  /* The bitmaps extension as found in the header, not yet checked:
   * qcow2-bitmap.c parses it only when a bitmap is asked for.
   */
  uint64_t autoclear;
  uint32_t bm_ext_count;        /* times the extension appears */
  uint32_t bm_ext_len;          /* its length (the first one) */
  uint8_t bm_ext[BITMAPS_EXT_LEN]; /* its first bytes (zero-padded) */
  /* Bitmap tables of this layer that passed their check (offset and
   * entries), remembered so that they are not read again; protected by
   * the image's bm_lock.
   */
  uint64_t bm_ok_off[BM_OK_TABLES];
  uint32_t bm_ok_size[BM_OK_TABLES];
  unsigned bm_ok_n, bm_ok_next;

  struct layer *backing;
};

struct qcow2_image {
  struct layer *top;
  unsigned depth;
  qcow2_debug_fn debug;
  void *debug_opaque;
  qcow2_cancel_fn cancel;
  void *cancel_opaque;
  bool bm_lock_ok;
  pthread_mutex_t bm_lock;      /* the layers' bm_ok_* */
};

/* A bitmap of the chain (qcow2-bitmap.c): the checked directory entries
 * of bitmap NAME in the run of layers from the top.
 */
struct bm_layer {
  struct layer *l;
  const char *name;             /* the qcow2_bitmap's */
  uint32_t gbits;               /* granularity = 1 << gbits */
  uint64_t table_off;
  uint32_t table_size;          /* entries */
};

struct qcow2_bitmap {
  char name[1024];
  unsigned n;
  struct bm_layer layers[QCOW2_MAX_DEPTH];
};

/* The bitmap data is read through a window of this many bytes per
 * layer and request (a divisor of every cluster size).
 */
#define BM_WINDOW 512

/* What one request has read of one layer's bitmap, and the last run of
 * equal bits found (a request asks again inside it while the other
 * layers' runs are shorter).
 */
struct bm_cursor {
  bool have_run;
  uint64_t run_first, run_end;  /* bits [run_first, run_end) */
  bool run_set;
  bool have_entry;
  uint64_t tidx, tentry;        /* the last table entry read */
  bool have_win;
  uint64_t win_host;            /* host offset of win */
  uint8_t win[BM_WINDOW];
};

/* Identities of the files in the chain being opened (loop detection). */
struct chain_ids {
  unsigned n;
  uint64_t dev[QCOW2_MAX_DEPTH + 1];
  uint64_t ino[QCOW2_MAX_DEPTH + 1];
};

/* What a qcow2 layer's header says, as far as it is needed while
 * opening: read by q2_read_header (qcow2-header.c), used by qcow2-open.c
 * to open the layer's data file and backing file, freed by
 * q2_header_free.
 */
struct header {
  uint8_t *hc;                  /* the first cluster (header area) */
  uint64_t hclen;
  uint32_t header_len;
  uint32_t l1_size;             /* l1_size field (entries) */
  uint64_t l1_offset;
  uint64_t incompat, autoclear;
  uint64_t backing_off;
  uint32_t backing_len;
  const uint8_t *ftable;        /* feature name table, in hc */
  uint32_t ftable_len;
  char *backing_name, *backing_fmt, *data_name;
};

/* The runs produced by the cluster walker (qcow2-walk.c). */
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

/* qcow2-io.c */
extern const char *q2_errstr (int errnum);

/* File names in messages: a name of Q2_NAME_BUF bytes or more is shown
 * as its first and last parts around "...", so that a message naming a
 * few files still fits QCOW2_ERRLEN with its reason.  BUF has
 * Q2_NAME_BUF bytes; returns NAME or BUF.
 */
#define Q2_NAME_BUF 160
extern const char *q2_short_name (char *buf, const char *name);
/* Message "NAME: FMT..." (NAME may be NULL), errno EIO. */
extern void q2_seterr (struct err *e, const char *name, const char *fmt, ...)
  __attribute__ ((format (printf, 3, 4)));
/* The same with errno ERRNUM. */
extern void q2_seterr_errno (struct err *e, int errnum, const char *name,
                             const char *fmt, ...)
  __attribute__ ((format (printf, 4, 5)));
/* "NAME: out of memory", errno ENOMEM. */
extern void q2_seterr_oom (struct err *e, const char *name);
extern void q2_debug (const struct qcow2_options *o, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));
extern int q2_io_read (const struct qcow2_io *io, const char *name,
                       void *buf, uint64_t count, uint64_t offset,
                       struct err *e);

/* qcow2-l2cache.c */
extern int q2_cache_init (struct l2cache *c, uint64_t bytes,
                          uint32_t slice_bytes);
extern void q2_cache_free (struct l2cache *c);
extern int q2_l2_get (struct layer *l, uint64_t l2off, uint32_t idx,
                      uint32_t n, uint64_t *out, struct err *e);

/* qcow2-walk.c */
extern int q2_walk (struct layer *l, uint64_t offset, uint64_t count,
                    run_fn fn, void *opaque, struct err *e);

/* qcow2-decompress.c */
extern int q2_pool_init (struct layer *l, struct err *e);
extern void q2_pool_free (struct layer *l);
extern struct scratch *q2_scratch_get (struct layer *l, struct err *e);
extern void q2_scratch_put (struct layer *l, struct scratch *s);
extern int q2_decompress (struct layer *l, struct scratch *s,
                          const struct run *r, uint8_t *out, struct err *e);
/* Inflate the raw deflate stream IN[0..INLEN) into exactly OUTLEN bytes
 * at OUT, accepting what QEMU accepts (zlib's verdict): 0, or -1 with
 * a static reason in *WHY.  *FAST: libdeflate decoded it.
 * q2_inflate_zlib: the same with zlib only.
 */
extern int q2_inflate (struct scratch *s, const uint8_t *in, size_t inlen,
                       uint8_t *out, size_t outlen, const char **why,
                       bool *fast);
extern int q2_inflate_zlib (struct scratch *s, const uint8_t *in,
                            size_t inlen, uint8_t *out, size_t outlen,
                            const char **why);
/* Tests and fuzzing: when set, every cluster libdeflate decodes is
 * decoded by zlib too; a difference fails the read and is counted.
 */
extern bool q2_zlib_crosscheck;
extern uint64_t q2_zlib_crosscheck_failures;

/* qcow2-header.c */
/* Read qcow2 layer L's header: the geometry and the L1 table into L,
 * what opening the layer needs next into *HD (zeroed by the caller,
 * released by q2_header_free whether this succeeded or not).
 */
extern int q2_read_header (const struct qcow2_options *o, struct layer *l,
                           struct header *hd, struct err *e);
extern void q2_header_free (struct header *h);

/* qcow2-bitmap.c */
/* The run at OFFSET (at most COUNT bytes, COUNT > 0) over which the
 * union of BM's layers is uniformly set (*DIRTY) or clear: its length
 * in *LEN (> 0).  CUR has BM->n cursors, zeroed before the first call.
 */
extern int q2_bitmap_run (const struct qcow2_bitmap *bm,
                          struct bm_cursor *cur, uint64_t offset,
                          uint64_t count, uint64_t *len, bool *dirty,
                          struct err *e);

#endif /* SPARSEBACKUP_QCOW2_INTERNAL_H */
