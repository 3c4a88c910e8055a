/* sparsebackup: the private header of the cbt implementation, shared
 * by cbt-io.c (reading and writing the file: geometry, blocks,
 * superblocks, directories, indexes, tables), cbt-rec.c (records and
 * states in memory, publishing a state), cbt.c (marking, commit, queries),
 * cbt-checkpoints.c (checkpoint changes), cbt-load.c (opening,
 * validating, closing) and cbt-v1.c (reading version 1 files).  Not for
 * users of cbt.h, which those files implement.
 *
 * The parts call each other in one direction only (an arrow: "calls"):
 *
 *   cbt-load.c        -> cbt-v1.c, cbt-checkpoints.c (cbt_name_valid,
 *                        cbt_load_entry_head),
 *                        cbt-rec.c, cbt-io.c
 *   cbt-v1.c          -> cbt-checkpoints.c (cbt_name_valid,
 *                        cbt_load_entry_head), cbt-rec.c,
 *                        cbt-io.c
 *   cbt-checkpoints.c -> cbt-rec.c, cbt-io.c
 *   cbt.c             -> cbt-rec.c, cbt-io.c
 *   cbt-rec.c         -> cbt-io.c
 *   cbt-io.c: a leaf (it also holds the helpers every part uses:
 *             cbt_failure, cbt_seterr, cbt_pread_full, cbt_pwrite_full);
 *             the byte codecs, crc and block arithmetic are the static
 *             inline functions below.
 *
 * In memory (doc/cbt-format.md has the file):
 *
 *  - struct mrec: a current record, by page: each page of the bitmap is
 *    NULL (all zero) or allocated, with the block that holds it on disk
 *    (0: none yet) and whether memory is newer than that block.  Marks
 *    set bits in the current record of the state in force.
 *  - struct frec: a frozen record: the sorted index of its pages (page,
 *    crc, block).  Immutable.
 *  - struct state: the checkpoints (names, states, serials, frozen
 *    records) and the current record(s).  Immutable except that marks
 *    change its current record; a checkpoint change builds a new state
 *    and puts it in force (c->st) once it is published.  While a new
 *    checkpoint is being written, the state in force has two current
 *    records: the one being frozen (cur[0], no more marks) and the new
 *    one (cur[1], where marks go): the checkpoints are still the old
 *    ones, and "now" is their union.
 *
 * Every object is reference counted (atomically); readers (cbt_map) take
 * a reference on the state in force and need no lock afterwards.  Every
 * block of the file is reference counted too (c->refs, under
 * alloc_lock): a record, directory, index or table holds its blocks; a
 * block is free when nothing holds it, which happens only after a
 * superblock that no longer names it was published.
 *
 * Locks, in this order: struct_lock (one checkpoint change at a time;
 * held throughout it), lock (the current records' pages, c->st, c->pub,
 * the io token, the write-ahead generations, stats: held only briefly),
 * alloc_lock (the block references).  The io token (c->io_busy, under
 * lock) is held by whoever writes a superblock or commits pages: one at
 * a time, so that superblocks are written in sequence and no superblock
 * is written over unsynced commits.
 */

#ifndef SPARSEBACKUP_CBT_PRIVATE_H
#define SPARSEBACKUP_CBT_PRIVATE_H

#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/types.h>

#include <zlib.h>

#include "cbt.h"
#include "cbt-format.h"

extern const char cbt_magic[8];

/* A page of a current record. */
struct pgent {
  uint8_t *mem;                 /* NULL: all zero */
  uint64_t gen;                 /* write-ahead, process-safe: generation
                                   of its last change */
  uint64_t wgen;                /* process-safe: generation written */
  uint32_t blk;                 /* the block holding it (0: none yet) */
  bool dirty;                   /* memory is newer than the block */
  bool writing;                 /* process-safe: a thread writes it */
};

struct mrec {
  int refs;
  struct pgent *pg;             /* nr_pages */
  uint32_t dir;                 /* first block of its directory (held) */
  uint32_t *dirty, *spare;      /* pages with dirty set; nr_pages each */
  size_t ndirty;
};

/* A page of a frozen record. */
struct fent {
  uint32_t page, crc, blk;
};

struct frec {
  int refs;
  size_t n;
  struct fent *e;               /* sorted by page */
  uint32_t idx_blk, idx_crc;    /* its index on disk (0: empty record) */
};

struct cpe {
  char name[CBT_NAME_MAX + 1];
  uint32_t state;
  uint64_t serial, created;
  struct frec *rec;             /* NULL for the last */
};

struct state {
  int refs;
  size_t n;
  struct cpe cps[CBT_MAX_CHECKPOINTS];
  struct mrec *cur[2];          /* marks go to cur[ncur - 1] */
  int ncur;
  uint32_t table_blk, table_size, table_crc;    /* held (0: no table) */
  uint32_t next_dir;            /* held */
  uint64_t next_serial;
};

/* What a superblock names. */
struct sbv {
  bool in_use;
  uint32_t n;
  uint32_t table_blk, table_size, table_crc;
  uint32_t cur_dir, next_dir;
  uint32_t cur_crc;             /* 0 while in use */
  uint64_t next_serial;
};

struct cbt {
  pthread_mutex_t lock;
  pthread_cond_t cond;          /* the io token */
  pthread_cond_t pcond;         /* process-safe: a page write ended */
  pthread_mutex_t struct_lock;
  pthread_mutex_t alloc_lock;
  int fd;
  bool read_only;
  enum cbt_mode mode;
  char boot_id[CBT_BOOT_ID_MAX + 1];

  uint64_t disk_size;
  unsigned gran_bits;
  uint64_t nr_gran;
  uint64_t bm_bytes;
  uint32_t nr_pages;
  uint32_t dir_bytes, dir_blocks;
  uint32_t empty_crc;           /* crc of an empty current record */
  char identity[CBT_IDENTITY_MAX + 1];

  /* The superblocks. */
  uint64_t seq;
  int active;                   /* slot of the newest superblock */
  int synced_slot;              /* of the newest synced superblock */
  uint64_t compat_other;        /* unknown compatible bits, kept */
  struct sbv pub;               /* what the active superblock names */

  struct state *st;             /* in force (under lock) */

  /* Write-ahead: generations of marks (a page's gen is that of its
   * last change); every mark up to durable_gen is on disk.
   */
  uint64_t mark_gen, durable_gen;
  bool io_busy;                 /* the io token is taken */
  int io_error;                 /* sticky errno of a failed write/sync */

  /* Block references (alloc_lock). */
  uint32_t *refs;
  uint32_t nblk, capblk;        /* blocks the file spans; capacity */
  uint32_t hint;                /* no free block below it */

  struct cbt_stats stats;
};


static inline uint32_t
get32 (const uint8_t *p)
{
  return (uint32_t) p[0] | (uint32_t) p[1] << 8 |
    (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static inline uint64_t
get64 (const uint8_t *p)
{
  return (uint64_t) get32 (p) | (uint64_t) get32 (p + 4) << 32;
}

static inline void
put32 (uint8_t *p, uint32_t v)
{
  p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}

static inline void
put64 (uint8_t *p, uint64_t v)
{
  put32 (p, (uint32_t) v);
  put32 (p + 4, (uint32_t) (v >> 32));
}

static inline uint32_t
crc (uint32_t c, const void *buf, size_t len)
{
  return (uint32_t) crc32 (c, buf, (uInt) len);
}

static inline bool
all_zero (const uint8_t *p, size_t len)
{
  for (size_t i = 0; i < len; ++i)
    if (p[i])
      return false;
  return true;
}

static inline bool
printable (const char *s, size_t len, bool space_ok)
{
  for (size_t i = 0; i < len; ++i) {
    unsigned char ch = s[i];
    if (ch < (space_ok ? 0x20 : 0x21) || ch > 0x7e)
      return false;
  }
  return true;
}

static inline uint64_t
blk_off (uint32_t blk)
{
  return (uint64_t) blk << BLOCK_SHIFT;
}

static inline uint32_t
blocks_for (uint64_t bytes)
{
  return (uint32_t) ((bytes + BLOCK - 1) >> BLOCK_SHIFT);
}

/* Bytes of bitmap page P (the last may be short). */
static inline size_t
page_len (const struct cbt *c, uint32_t p)
{
  uint64_t left = c->bm_bytes - (uint64_t) p * PAGE;
  return left < PAGE ? (size_t) left : PAGE;
}

/* The bits of the last bitmap byte beyond the end of the disk. */
static inline uint8_t
tail_mask (const struct cbt *c)
{
  unsigned used = (unsigned) (c->nr_gran % 8);
  return used ? (uint8_t) (0xff << used) : 0;
}

/* Bits beyond the disk set in page P of LEN bytes? */
static inline bool
page_tail_bad (const struct cbt *c, uint32_t p, const uint8_t *buf)
{
  return p + 1 == c->nr_pages && (buf[page_len (c, p) - 1] & tail_mask (c));
}

/* A directory entry's check: crc of the page and block numbers. */
static inline uint32_t
dir_check (uint32_t page, uint32_t blk)
{
  uint8_t b[8];
  put32 (b, page);
  put32 (b + 4, blk);
  return crc (0, b, 8);
}

/* ---- In cbt-io.c ---------------------------------------------------- */

/* Format a message into ERR (if not NULL), set errno to E, return -1:
 * "return cbt_failure (err, errlen, EINVAL, "cbt: ...", ...);".
 */
extern int cbt_failure (char *err, size_t errlen, int e, const char *fmt, ...)
  __attribute__ ((__format__ (__printf__, 4, 5)));
/* Format a message into ERR (if not NULL), keeping errno. */
extern void cbt_seterr (char *err, size_t errlen, const char *fmt, ...)
  __attribute__ ((__format__ (__printf__, 3, 4)));
extern int cbt_pread_full (int fd, void *buf, size_t len, uint64_t off);
extern int cbt_pwrite_full (int fd, const void *buf, size_t len,
                            uint64_t off);
/* A write or sync failed with E: remember it (sticky; lock not held),
 * set errno to EIO and return -1.
 */
extern int cbt_io_failed (struct cbt *c, int e);
/* If an earlier write failed: a message, EIO, -1.  Lock not held. */
extern int cbt_check_io (struct cbt *c, char *err, size_t errlen);

/* The sizes implied by DISK_SIZE and a granule of 2^BITS bytes (the
 * bitmap, its pages, a directory), checked against the limits.
 */
extern int cbt_set_geometry (struct cbt *c, uint64_t disk_size, unsigned bits,
                             char *err, size_t errlen);

/* Loading either version: the checks of a checkpoint entry's name,
 * state and flags (cbt-checkpoints.c).
 */
extern int cbt_load_entry_head (struct state *st, uint32_t i, uint32_t nr,
                                const uint8_t *e, char *err, size_t errlen);

/* Blocks.  cbt_alloc: K contiguous free blocks held once (*BLK the
 * first); -1/EFBIG when the file would be too large, ENOMEM.
 * cbt_hold/cbt_release: one more/less reference on [BLK, BLK+K).
 * cbt_hold_new: the same on blocks found in a file being loaded: -1 if
 * one is already held (an overlap).  cbt_trim_file: shorten the file to
 * its last held block.  They take alloc_lock.
 */
extern int cbt_alloc (struct cbt *c, uint32_t k, uint32_t *blk);
extern void cbt_hold (struct cbt *c, uint32_t blk, uint32_t k);
extern void cbt_release (struct cbt *c, uint32_t blk, uint32_t k);
extern int cbt_hold_new (struct cbt *c, uint32_t blk, uint32_t k);
extern void cbt_trim_file (struct cbt *c);
extern int cbt_blocks_init (struct cbt *c, uint64_t file_size);

/* The io token (lock not held / held). */
extern void cbt_token_take (struct cbt *c);
extern void cbt_token_take_locked (struct cbt *c);
extern void cbt_token_give (struct cbt *c);
extern void cbt_token_give_locked (struct cbt *c);

/* Write the other slot with seq + 1 naming V, and (with SYNC) sync; on
 * success c->pub = *V.  Token held.  Failure is sticky (EIO).
 */
extern int cbt_write_super (struct cbt *c, const struct sbv *v, bool sync);
/* Mark the file in use on disk if it is not yet.  Lock held (released
 * while waiting for the token).  -1/EIO.
 */
extern int cbt_set_in_use_locked (struct cbt *c);

/* Write NB blocks of zeros at BLK.  -1 with errno. */
extern int cbt_write_zeros (struct cbt *c, uint32_t blk, uint32_t nb);
/* Write the directory of M's blocks at DIR (allocated). */
extern int cbt_write_dir (struct cbt *c, const struct mrec *m, uint32_t dir);
/* Allocate and write the index of F (sets idx_blk, idx_crc). */
extern int cbt_write_index (struct cbt *c, struct frec *f);
/* Allocate and write the table of S (sets table_*). */
extern int cbt_write_table (struct cbt *c, struct state *s);
/* The superblock values of state S (current record cur[ncur-1]). */
extern struct sbv cbt_state_sbv (const struct cbt *c, const struct state *s,
                                 uint32_t cur_crc);

/* ---- In cbt-rec.c --------------------------------------------------- */

extern struct mrec *cbt_mrec_new (struct cbt *c, uint32_t dir);
extern void cbt_mrec_unref (struct cbt *c, struct mrec *m);
extern struct frec *cbt_frec_new (size_t n);
extern void cbt_frec_unref (struct cbt *c, struct frec *f);
/* A copy of S (one reference on everything it names), or NULL. */
extern struct state *cbt_state_copy (const struct state *s);
extern struct state *cbt_state_new (void);
extern void cbt_state_ref (struct state *s);
extern void cbt_state_unref (struct cbt *c, struct state *s);
/* Sync, write the superblock V, sync, and put NS in force (its
 * reference is taken over).  On failure NS is released.  Token not
 * held.  (Process-safe mode, in use: no syncs.)
 */
extern int cbt_publish (struct cbt *c, struct state *ns, struct sbv *v,
                        char *err, size_t errlen);
/* The page P of M, allocated zeroed if absent (NULL: ENOMEM).  Lock
 * held.
 */
extern uint8_t *cbt_page_get (struct cbt *c, struct mrec *m, uint32_t p);
/* Bytes [J0, J1] of page P of M (the current record in force) got new
 * bits: dirty, generation, or (process-safe) write the page now (the
 * lock is released meanwhile).  Lock held.  -1/EIO.
 */
extern int cbt_page_changed (struct cbt *c, struct mrec *m, uint32_t p,
                             size_t j0, size_t j1);
/* Process-safe: return once page P of M is written as it is now (lock
 * held, released meanwhile), or every page of M (lock not held).
 */
extern int cbt_ps_write (struct cbt *c, struct mrec *m, uint32_t p);
extern int cbt_ps_flush (struct cbt *c, struct mrec *m);
/* Write every dirty page of the NM records M (and the directory entries
 * of pages new on disk); no sync.  Token held, lock not held.  -1 with
 * errno (the caller makes it sticky).
 */
extern int cbt_write_dirty (struct cbt *c, struct mrec **m, int nm);
/* Write-ahead: return once every mark up to GEN is on disk.  Lock not
 * held.
 */
extern int cbt_commit_upto (struct cbt *c, uint64_t gen);
/* Crc of M as stored clean: its directory, then its pages. */
extern uint32_t cbt_mrec_crc (const struct cbt *c, const struct mrec *m);
/* Read page P (LEN bytes) from BLK into BUF and check it against CRC
 * (unless CHECK is false).  -1/EIO with a message.
 */
extern int cbt_read_page (struct cbt *c, uint32_t blk, uint32_t p,
                          uint8_t *buf, bool check, uint32_t crc_want,
                          char *err, size_t errlen);
/* The frozen record of M (every page on disk already), index written. */
extern struct frec *cbt_freeze (struct cbt *c, struct mrec *m,
                                char *err, size_t errlen);

/* ---- In cbt-checkpoints.c ------------------------------------------- */

/* Delete checkpoint K of the state in force (struct_lock held). */
extern int cbt_delete_cp (struct cbt *c, size_t k, char *err, size_t errlen);

/* ---- In cbt-v1.c ---------------------------------------------------- */

/* Load the version 1 file whose active superblock is SB into a state
 * in memory (c->st, c->pub.in_use, c->refs holding the version 1
 * regions once more: released by the caller after publishing).  *WAL:
 * the writer was in write-ahead mode.  *LEGACY: the regions held
 * (first block, count), to release.
 */
struct cbt_legacy {
  uint32_t *blk, *nb;
  size_t n, cap;
};
extern int cbt_load_v1 (struct cbt *c, const uint8_t *sb, uint64_t file_size,
                        const struct cbt_options *o, bool *wal,
                        struct cbt_legacy *legacy, char *err, size_t errlen);
/* The superblock fields both versions share (up to the identity), and
 * with V1 version 1's reserved bytes; sets the geometry.
 */
extern int cbt_check_header_v1 (struct cbt *c, const uint8_t *sb,
                                const struct cbt_options *o, bool v1,
                                char *err, size_t errlen);
extern int cbt_legacy_add (struct cbt_legacy *l, uint32_t blk, uint32_t nb);
extern void cbt_legacy_release (struct cbt *c, struct cbt_legacy *l);

#endif /* SPARSEBACKUP_CBT_PRIVATE_H */
