/* sparsebackup: read-only qcow2 reader (pure C, no nbdkit headers).
 *
 * This library reads qcow2 images (versions 2 and 3) and their backing
 * chains.  It knows nothing about nbdkit: files are accessed through a
 * small I/O vtable supplied by the caller (struct qcow2_io), errors are
 * returned as text in a caller-supplied buffer, and nothing reachable
 * from image content asserts or aborts.  The nbdkit glue lives in
 * qcow2-plugin.c; fuzz harnesses and unit tests link this code directly
 * (libqcow2.la).
 *
 * Failures: every function that can fail returns -1, writes a message
 * to the caller's buffer and sets errno: ENOMEM when out of memory, the
 * errno of the failed read or open (a qcow2_io callback's errno), EINVAL
 * for a request beyond the end of the disk, EIO for a corrupt or
 * unsupported image; qcow2_map fails with the errno of a failing
 * callback.
 *
 * Thread safety: once opened, an image may be used by any number of
 * threads at the same time (qcow2_pread and qcow2_map); the L2 cache of
 * each layer is protected by its own lock.  qcow2_close must not race
 * with anything else.
 */

#ifndef SPARSEBACKUP_QCOW2_H
#define SPARSEBACKUP_QCOW2_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Recommended size of error buffers passed to the functions below.
 * Messages are truncated (never overflowed) if the buffer is smaller.
 */
#define QCOW2_ERRLEN 1024

/* Hard limit of the number of layers in a chain (top image included). */
#define QCOW2_MAX_DEPTH 16

/* Default L2 cache size per layer, in bytes. */
#define QCOW2_DEFAULT_L2_CACHE_SIZE (1024 * 1024)

/* Largest L1 table accepted (the same limit as QEMU), in bytes. */
#define QCOW2_MAX_L1_BYTES (32 * 1024 * 1024)

/* Caller-supplied access to one file (image, backing or data file). */
struct qcow2_io {
  void *opaque;                 /* passed to the callbacks */
  uint64_t size;                /* size of the file in bytes */

  /* Read exactly COUNT bytes at OFFSET (offset + count <= size is
   * guaranteed by the caller).  Return 0, or -1 on error (errno may be
   * set).  Must be safe to call from several threads at once.
   */
  int (*pread) (void *opaque, void *buf, size_t count, uint64_t offset);

  /* Optional (may be NULL): release the file.  Called exactly once by
   * the library when it owns the io (see qcow2_open).
   */
  void (*close) (void *opaque);

  /* Optional (may be NULL): allocation of a raw file, used only when the
   * file is a raw backing file.  Store in *LEN the length (> 0, <= COUNT)
   * of the run starting at OFFSET that is uniformly data (*IS_DATA = 1)
   * or a hole reading as zero (*IS_DATA = 0).  Return 0, or -1 (then the
   * range is reported as data).  NULL means "all data".
   */
  int (*extent) (void *opaque, uint64_t offset, uint64_t count,
                 uint64_t *len, int *is_data);

  /* Identity of the file for backing loop detection.  has_id = false
   * when unknown (e.g. in-memory images): loops are then stopped only by
   * the depth limit.
   */
  bool has_id;
  uint64_t dev, ino;
};

/* Open a file named inside an image (a backing file or an external
 * data file).  PATH has already been checked and resolved against the
 * directory of the image naming it.  Fill *IO and return 0, or write a
 * message to ERR and return -1.
 */
typedef int (*qcow2_open_fn) (void *opaque, const char *path,
                              struct qcow2_io *io,
                              char *err, size_t errlen);

/* Debug output (one line, no trailing newline). */
typedef void (*qcow2_debug_fn) (void *opaque, const char *msg);

/* Polled by long bitmap work (listing bitmaps, opening one): return
 * true to stop it (the call then fails with errno ECANCELED), e.g.
 * when the server is shutting down.
 */
typedef bool (*qcow2_cancel_fn) (void *opaque);

struct qcow2_options {
  bool backing;                 /* follow backing files (default true);
                                 * false: unallocated clusters read zero */
  unsigned max_depth;           /* max layers incl. the top, 1..16
                                 * (0 = QCOW2_MAX_DEPTH) */
  uint64_t l2_cache_size;       /* L2 cache bytes per layer
                                 * (0 = QCOW2_DEFAULT_L2_CACHE_SIZE) */
  const char *data_file;        /* if not NULL, overrides the external
                                 * data file named by the top image */
  qcow2_open_fn open_file;      /* opens backing / data files; NULL:
                                 * images needing one are refused */
  void *open_opaque;
  qcow2_debug_fn debug;         /* NULL = no debug output */
  void *debug_opaque;
  qcow2_cancel_fn cancel;       /* NULL = never stop */
  void *cancel_opaque;
};

/* Set *OPTS to the defaults (backing on, depth 16, 1 MiB cache, no
 * opener, no debug).
 */
extern void qcow2_options_init (struct qcow2_options *opts);

/* An open image with its backing chain. */
struct qcow2_image;

/* Open an image read from IO.  NAME is used in messages and as the base
 * for relative backing / data file names.  The library takes ownership
 * of IO in all cases (io->close is called on failure and at
 * qcow2_close).  Return 0 and set *RET, or -1 with a message in ERR.
 */
extern int qcow2_open (const struct qcow2_io *io, const char *name,
                       const struct qcow2_options *opts,
                       struct qcow2_image **ret,
                       char *err, size_t errlen);

/* Open an image held in memory (BUF must outlive the image).  Backing
 * and data files go through opts->open_file as usual.  This is the
 * entry point for fuzzing.
 */
extern int qcow2_open_mem (const void *buf, size_t len, const char *name,
                           const struct qcow2_options *opts,
                           struct qcow2_image **ret,
                           char *err, size_t errlen);

/* Open a file by path (O_RDONLY).  If opts->open_file is NULL the POSIX
 * opener (qcow2_posix_open) is used for backing and data files.
 */
extern int qcow2_open_file (const char *path,
                            const struct qcow2_options *opts,
                            struct qcow2_image **ret,
                            char *err, size_t errlen);

/* The POSIX opener: open(O_RDONLY|O_CLOEXEC|O_NONBLOCK), fstat (only
 * regular files and block devices are accepted, so a FIFO never blocks
 * the open), pread, SEEK_DATA.  Usable as a qcow2_open_fn (OPAQUE is
 * ignored).
 */
extern int qcow2_posix_open (void *opaque, const char *path,
                             struct qcow2_io *io, char *err, size_t errlen);

/* Fill *IO to read from memory (no close, no identity). */
extern void qcow2_mem_io (const void *buf, size_t len, struct qcow2_io *io);

extern void qcow2_close (struct qcow2_image *img);

/* Virtual size of the image in bytes (<= INT64_MAX). */
extern uint64_t qcow2_get_size (const struct qcow2_image *img);

/* Cluster size of the top image in bytes. */
extern uint32_t qcow2_get_cluster_size (const struct qcow2_image *img);

/* Number of layers opened (1 = no backing file followed). */
extern unsigned qcow2_get_depth (const struct qcow2_image *img);

/* Read COUNT bytes at OFFSET (offset + count <= size).  Return 0, or -1
 * with a message in ERR.
 */
extern int qcow2_pread (struct qcow2_image *img, void *buf, size_t count,
                        uint64_t offset, char *err, size_t errlen);

/* Extent flags (the same values as NBDKIT_EXTENT_HOLE / _ZERO). */
#define QCOW2_EXTENT_HOLE 1     /* not allocated in any layer */
#define QCOW2_EXTENT_ZERO 2     /* reads as zero */

/* Called for consecutive runs in order, adjacent runs having different
 * flags.  Return 0 to continue, 1 to stop early (qcow2_map then returns
 * 0), or -1 to fail (qcow2_map returns -1; write ERR yourself if you
 * want a message).
 */
typedef int (*qcow2_extent_fn) (void *opaque, uint64_t offset,
                                uint64_t length, uint32_t flags);

/* Describe [OFFSET, OFFSET+COUNT) (offset + count <= size): data (flags
 * 0) where any layer of the chain provides data, HOLE|ZERO for zero
 * clusters / subclusters and for ranges unallocated in every layer, at
 * subcluster granularity.  Return 0, or -1 with a message in ERR.
 */
extern int qcow2_map (struct qcow2_image *img, uint64_t offset,
                      uint64_t count, qcow2_extent_fn fn, void *opaque,
                      char *err, size_t errlen);

/* Like qcow2_map, but describe the allocation of the top image only
 * (the contents read by qcow2_pread are still the whole chain's): data
 * (0) where the top image has data, ZERO alone for its zero clusters /
 * subclusters, HOLE alone where it allocates nothing (the contents come
 * from the backing chain, or are zero).  A copy that writes only the
 * data and zero ranges over the same backing chain is an overlay equal
 * to the top image.
 */
extern int qcow2_map_top (struct qcow2_image *img, uint64_t offset,
                          uint64_t count, qcow2_extent_fn fn, void *opaque,
                          char *err, size_t errlen);

/* Persistent bitmaps (qcow2 v3 bitmaps extension), for incremental
 * backups.  A bitmap NAME of the chain is the bitmap NAME of the top
 * image and of the contiguous run of layers below it that have one
 * (down to the first layer without it), as libvirt stores a checkpoint
 * across a chain; every one of them must be enabled ("auto") and not
 * in use (in_use: the image was not closed cleanly, the bitmap may miss
 * changes).  Its changed set is the union over the run.  The bitmaps
 * extension is read and checked only by these functions: a broken
 * bitmap fails here, never in qcow2_open, qcow2_pread or qcow2_map.
 */
struct qcow2_bitmap;

/* Limits: a bitmap QEMU refuses is refused (QEMU's block/qcow2-bitmap.c:
 * granularity 512 bytes to 2 GiB, names of at most 1023 bytes, a table
 * of at most 2^27 entries, and its table size times the cluster size at
 * most QCOW2_BITMAP_MAX_PHYS bytes, that is at most 2^32 bits).
 */
#define QCOW2_BITMAP_MAX_PHYS (UINT64_C(1) << 29)

/* Open bitmap NAME of IMG (see above): its directory entries and its
 * bitmap tables are checked (the tables are read whole, at most 8 MiB
 * each under the limits above; a table that passed is remembered, so
 * another bitmap sharing it, or the same one opened again, does not
 * read it again).  Return 0 and set *RET, or -1 with a message in ERR
 * (errno EIO, ENOENT if there is no such bitmap in the top image,
 * ENOMEM, ECANCELED).
 */
extern int qcow2_bitmap_open (struct qcow2_image *img, const char *name,
                              struct qcow2_bitmap **ret,
                              char *err, size_t errlen);
extern void qcow2_bitmap_close (struct qcow2_bitmap *bm);
/* Granularity (bytes) of the bitmap in the top image. */
extern uint64_t qcow2_bitmap_granularity (const struct qcow2_bitmap *bm);
/* Number of layers whose bitmaps are merged (1 = the top only). */
extern unsigned qcow2_bitmap_layers (const struct qcow2_bitmap *bm);

/* Called for each bitmap of the top image, in directory order: BM is
 * the bitmap as far as a listing checks it (valid during the call
 * only), or NULL with WHY saying why it cannot be used.  Return 0 to
 * continue, -1 to stop (qcow2_list_bitmaps then returns -1 without
 * writing ERR).
 *
 * A listing does bounded work: it checks the directory entries of each
 * bitmap in every layer of its run, but reads no bitmap table (a bitmap
 * whose table is broken is listed, and refused by qcow2_bitmap_open;
 * qcow2_map_since checks each table entry it reads anyway).  It reads
 * each directory of the chain at most once, and the directories below
 * the top together at most QCOW2_LIST_MAX_LOWER_DIR_BYTES: bitmaps
 * whose run reaches further are listed as unusable (they can still be
 * opened).
 */
typedef int (*qcow2_bitmap_fn) (void *opaque, const char *name,
                                const struct qcow2_bitmap *bm,
                                const char *why);

/* Bitmaps beyond the first this many are listed as unusable (each
 * usable one costs a look through the directories of the chain).
 */
#define QCOW2_MAX_LISTED_BITMAPS 256
#define QCOW2_LIST_MAX_LOWER_DIR_BYTES (UINT64_C(64) * 1024 * 1024)

/* List the bitmaps of the top image (none in a version 2 image or if
 * the bitmaps extension is absent or marked inconsistent).  Return 0,
 * or -1 with a message in ERR if the bitmap directory itself is broken.
 */
extern int qcow2_list_bitmaps (struct qcow2_image *img, qcow2_bitmap_fn fn,
                               void *opaque, char *err, size_t errlen);

/* Map [OFFSET, OFFSET+COUNT) through bitmap BM of IMG (the @since view):
 * HOLE alone where no bit is set (unchanged), and where bits are set
 * the chain's map with ZERO alone for what reads as zero, data (0)
 * elsewhere.  Same contract as qcow2_map otherwise.
 */
extern int qcow2_map_since (struct qcow2_image *img,
                            const struct qcow2_bitmap *bm,
                            uint64_t offset, uint64_t count,
                            qcow2_extent_fn fn, void *opaque,
                            char *err, size_t errlen);

/* What inflates zlib compressed clusters in this build: "zlib", or
 * "libdeflate VERSION" (with zlib for the streams libdeflate would
 * decode differently; see qcow2-decompress.c).
 */
extern const char *qcow2_zlib_decoder (void);

#ifdef __cplusplus
}
#endif

#endif /* SPARSEBACKUP_QCOW2_H */
