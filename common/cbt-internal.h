/* sparsebackup: the private header of the cbt implementation, shared
 * by cbt-io.c (superblocks, writing whole states), cbt-load.c (opening,
 * validating, closing), cbt.c (marking, durability, commit, queries) and
 * cbt-checkpoints.c.  Not for users of cbt.h.
 *
 * Holds struct cbt and its checkpoint records, the small inline helpers
 * (little-endian fields, crc, checks on names) and the functions one
 * part calls in another.
 */

#ifndef SPARSEBACKUP_CBT_INTERNAL_H
#define SPARSEBACKUP_CBT_INTERNAL_H

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

struct cp {
  char name[CBT_NAME_MAX + 1];
  uint32_t state;
  uint64_t created;
  uint64_t off;                 /* frozen bitmap; 0 for the last */
  uint32_t crc;
};

struct cbt {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  int fd;
  bool read_only;
  enum cbt_mode mode;

  uint64_t disk_size;
  unsigned gran_bits;
  uint64_t nr_gran;
  uint64_t bm_bytes;
  char identity[CBT_IDENTITY_MAX + 1];

  /* The state the active superblock names. */
  uint64_t seq;
  int active;                   /* slot of the newest superblock */
  uint64_t compat_other;        /* unknown compatible bits, kept */
  uint64_t autoclear;           /* cleared at the next write */
  uint64_t table_off;
  uint32_t table_size, table_crc;
  uint64_t cur_off;
  bool in_use_on_disk;
  struct cp cps[CBT_MAX_CHECKPOINTS];
  size_t n;

  uint8_t *cur;                 /* current bitmap, bm_bytes */

  /* Write-ahead bookkeeping: generation of the last change per page. */
  uint64_t *page_gen;
  size_t nr_pages;
  uint64_t mark_gen, durable_gen;
  bool io_busy;                 /* a commit is writing (lock released) */
  int io_error;                 /* sticky errno of a failed write/sync */

  struct cbt_stats stats;
};

/* Set a message and errno, return -1. */
#define FAILWITH(e, ...)                                \
  do {                                                  \
    cbt_seterr (err, errlen, __VA_ARGS__);                  \
    errno = (e);                                        \
    return -1;                                          \
  } while (0)

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

/* Number of bitmap bytes in the chunk starting at POS. */
static inline size_t
chunk_len (const struct cbt *c, uint64_t pos)
{
  uint64_t left = c->bm_bytes - pos;
  return left < CHUNK ? (size_t) left : CHUNK;
}

/* The bits of the last bitmap byte beyond the end of the disk. */
static inline uint8_t
tail_mask (const struct cbt *c)
{
  unsigned used = (unsigned) (c->nr_gran % 8);
  return used ? (uint8_t) (0xff << used) : 0;
}

/* Wait until no commit is writing.  Lock held. */
static inline void
wait_idle (struct cbt *c)
{
  while (c->io_busy)
    pthread_cond_wait (&c->cond, &c->lock);
}

static inline ssize_t
cbt_find_cp (const struct cbt *c, const char *name)
{
  for (size_t i = 0; i < c->n; ++i)
    if (strcmp (c->cps[i].name, name) == 0)
      return (ssize_t) i;
  return -1;
}

struct sbvals {
  uint64_t table_off;
  uint32_t table_size, table_crc;
  uint64_t cur_off;
  uint32_t cur_crc;
  uint32_t nr;
  bool in_use;
};

/* A checkpoint of the new state: its record is the OR of the frozen
 * records of old checkpoints [LO, HI), plus the current bitmap if MEM.
 * The record of the last one is the current bitmap (LO, HI, MEM unused).
 */
struct newcp {
  struct cp cp;
  size_t lo, hi;
  bool mem;
};

/* ---- In cbt-io.c ---------------------------------------------------- */

/* Format a message into ERR (if not NULL), keeping errno. */
extern void cbt_seterr (char *err, size_t errlen, const char *fmt, ...)
  __attribute__ ((__format__ (__printf__, 3, 4)));
extern int cbt_pread_full (int fd, void *buf, size_t len, uint64_t off);
extern int cbt_pwrite_full (int fd, const void *buf, size_t len,
                            uint64_t off);
/* OR bytes [POS, POS+LEN) of the frozen bitmaps of checkpoints
 * [LO, HI) into BUF, reading through TMP (CHUNK bytes).
 */
extern int cbt_or_frozen (struct cbt *c, size_t lo, size_t hi, uint64_t pos,
                          uint8_t *buf, size_t len, uint8_t *tmp);
/* Write the other slot with seq + 1 and sync (lock held or io_busy
 * owner; failure is sticky).
 */
extern int cbt_write_super (struct cbt *c, const struct sbvals *v);
/* The superblock values of the state in memory. */
extern struct sbvals cbt_current_vals (const struct cbt *c, bool in_use,
                                       uint32_t cur_crc);
/* Write the records and the table of NC into free space, sync, publish
 * (lock held, not io_busy).
 */
extern int cbt_write_state (struct cbt *c, const struct newcp *nc, size_t nn,
                            bool zero_current, char *err, size_t errlen);
/* The state in memory as a newcp list (each keeps its own record). */
extern void cbt_same_state (const struct cbt *c, struct newcp *nc);
/* Delete checkpoint K, merging its record into K-1 (dropping it if
 * K == 0).  Lock held, not io_busy.
 */
extern int cbt_delete_cp (struct cbt *c, size_t k, char *err, size_t errlen);

#endif /* SPARSEBACKUP_CBT_INTERNAL_H */
