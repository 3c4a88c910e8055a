/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md).
 *
 * On disk: two superblock slots (0 and 4096), then the data area.  A
 * "state" (checkpoint table, frozen bitmaps, current bitmap) is written
 * whole into free space outside the state the active superblock names,
 * synced, and then published by writing the other superblock slot with
 * sequence + 1 and syncing.  A torn superblock fails its crc and the
 * load uses the other slot, whose state is intact.  The only in-place
 * writes are to the current bitmap: they only ever set bits, and happen
 * while the file is marked in use (whose crc is then not checked).
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* F_OFD_SETLK */
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <zlib.h>

#include "cbt.h"
#include "ispowerof2.h"
#include "rounding.h"

/* ---- Format constants (doc/cbt-format.md) --------------------------- */

#define SB_SIZE 4096
#define DATA_START (2 * SB_SIZE)
#define ALIGN 4096
#define PAGE 4096               /* write-ahead unit of the current bitmap */
#define CHUNK 65536             /* bitmap bytes processed at a time */
#define ENTRY_SIZE 128
#define FORMAT_VERSION 1
static const char magic[8] = { 'S', 'B', 'K', 'C', 'B', 'T', '\r', '\n' };

#define INCOMPAT_IN_USE 1
#define INCOMPAT_KNOWN INCOMPAT_IN_USE
#define COMPAT_WRITE_AHEAD 1
#define COMPAT_KNOWN COMPAT_WRITE_AHEAD
#define AUTOCLEAR_KNOWN 0

/* Superblock field offsets. */
#define SB_MAGIC 0
#define SB_VERSION 8
#define SB_HEADER_SIZE 12
#define SB_SEQ 16
#define SB_INCOMPAT 24
#define SB_COMPAT 32
#define SB_AUTOCLEAR 40
#define SB_DISK_SIZE 48
#define SB_GRAN_BITS 56
#define SB_NR_CPS 60
#define SB_TABLE_OFF 64
#define SB_TABLE_SIZE 72
#define SB_TABLE_CRC 76
#define SB_CUR_OFF 80
#define SB_CUR_CRC 88
#define SB_ID_LEN 92
#define SB_ID 96
#define SB_RESERVED (SB_ID + 256)
#define SB_CRC (SB_SIZE - 4)

/* Checkpoint table entry field offsets. */
#define CP_NAME 0
#define CP_STATE 64
#define CP_FLAGS 68
#define CP_BM_OFF 72
#define CP_BM_CRC 80
#define CP_RESERVED1 84
#define CP_CREATED 88
#define CP_RESERVED2 96

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

/* ---- Small helpers ------------------------------------------------- */

static void __attribute__ ((__format__ (__printf__, 3, 4)))
seterr (char *err, size_t errlen, const char *fmt, ...)
{
  va_list ap;
  int saved = errno;

  if (err != NULL && errlen > 0) {
    va_start (ap, fmt);
    vsnprintf (err, errlen, fmt, ap);
    va_end (ap);
  }
  errno = saved;
}

/* Append a sentence to INFO->message. */
static void __attribute__ ((__format__ (__printf__, 2, 3)))
note (struct cbt_load_info *info, const char *fmt, ...)
{
  size_t len = strlen (info->message);
  va_list ap;

  if (len > 0 && len + 2 < sizeof info->message) {
    strcpy (info->message + len, "; ");
    len += 2;
  }
  va_start (ap, fmt);
  vsnprintf (info->message + len, sizeof info->message - len, fmt, ap);
  va_end (ap);
}

/* Set a message and errno, return -1. */
#define FAILWITH(e, ...)                                \
  do {                                                  \
    seterr (err, errlen, __VA_ARGS__);                  \
    errno = (e);                                        \
    return -1;                                          \
  } while (0)

static uint32_t
get32 (const uint8_t *p)
{
  return (uint32_t) p[0] | (uint32_t) p[1] << 8 |
    (uint32_t) p[2] << 16 | (uint32_t) p[3] << 24;
}

static uint64_t
get64 (const uint8_t *p)
{
  return (uint64_t) get32 (p) | (uint64_t) get32 (p + 4) << 32;
}

static void
put32 (uint8_t *p, uint32_t v)
{
  p[0] = v; p[1] = v >> 8; p[2] = v >> 16; p[3] = v >> 24;
}

static void
put64 (uint8_t *p, uint64_t v)
{
  put32 (p, (uint32_t) v);
  put32 (p + 4, (uint32_t) (v >> 32));
}

static uint32_t
crc (uint32_t c, const void *buf, size_t len)
{
  return (uint32_t) crc32 (c, buf, (uInt) len);
}

static bool
all_zero (const uint8_t *p, size_t len)
{
  for (size_t i = 0; i < len; ++i)
    if (p[i])
      return false;
  return true;
}

static bool
printable (const char *s, size_t len, bool space_ok)
{
  for (size_t i = 0; i < len; ++i) {
    unsigned char ch = s[i];
    if (ch < (space_ok ? 0x20 : 0x21) || ch > 0x7e)
      return false;
  }
  return true;
}

bool
cbt_name_valid (const char *name)
{
  size_t len;

  if (name == NULL)
    return false;
  len = strnlen (name, CBT_NAME_MAX + 1);
  return len >= 1 && len <= CBT_NAME_MAX && name[0] != '-' &&
    printable (name, len, false);
}

static int
pread_full (int fd, void *buf, size_t len, uint64_t off)
{
  uint8_t *p = buf;

  while (len > 0) {
    ssize_t r = pread (fd, p, len, (off_t) off);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    if (r == 0) {
      errno = EIO;              /* short file: checked before reading */
      return -1;
    }
    p += r; len -= (size_t) r; off += (uint64_t) r;
  }
  return 0;
}

static int
pwrite_full (int fd, const void *buf, size_t len, uint64_t off)
{
  const uint8_t *p = buf;

  while (len > 0) {
    ssize_t r = pwrite (fd, p, len, (off_t) off);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    p += r; len -= (size_t) r; off += (uint64_t) r;
  }
  return 0;
}

/* Number of bitmap bytes in the chunk starting at POS. */
static size_t
chunk_len (const struct cbt *c, uint64_t pos)
{
  uint64_t left = c->bm_bytes - pos;
  return left < CHUNK ? (size_t) left : CHUNK;
}

/* The bits of the last bitmap byte beyond the end of the disk. */
static uint8_t
tail_mask (const struct cbt *c)
{
  unsigned used = (unsigned) (c->nr_gran % 8);
  return used ? (uint8_t) (0xff << used) : 0;
}

/* OR bytes [POS, POS+LEN) of the frozen bitmaps of checkpoints
 * [LO, HI) into BUF, reading through TMP (CHUNK bytes).
 */
static int
or_frozen (struct cbt *c, size_t lo, size_t hi, uint64_t pos,
           uint8_t *buf, size_t len, uint8_t *tmp)
{
  for (size_t i = lo; i < hi; ++i) {
    if (pread_full (c->fd, tmp, len, c->cps[i].off + pos) == -1)
      return -1;
    for (size_t j = 0; j < len; ++j)
      buf[j] |= tmp[j];
  }
  return 0;
}

/* ---- Superblock ---------------------------------------------------- */

struct sbvals {
  uint64_t table_off;
  uint32_t table_size, table_crc;
  uint64_t cur_off;
  uint32_t cur_crc;
  uint32_t nr;
  bool in_use;
};

/* Write the other slot with seq + 1 and sync.  Called with the lock
 * held or as the io_busy owner.  Failure is sticky.
 */
static int
write_super (struct cbt *c, const struct sbvals *v)
{
  uint8_t sb[SB_SIZE];
  size_t idlen = strlen (c->identity);
  int slot = 1 - c->active;

  memset (sb, 0, sizeof sb);
  memcpy (sb + SB_MAGIC, magic, sizeof magic);
  put32 (sb + SB_VERSION, FORMAT_VERSION);
  put32 (sb + SB_HEADER_SIZE, SB_SIZE);
  put64 (sb + SB_SEQ, c->seq + 1);
  put64 (sb + SB_INCOMPAT, v->in_use ? INCOMPAT_IN_USE : 0);
  put64 (sb + SB_COMPAT, c->compat_other |
         (c->mode == CBT_MODE_WRITE_AHEAD ? COMPAT_WRITE_AHEAD : 0));
  put64 (sb + SB_AUTOCLEAR, 0);
  put64 (sb + SB_DISK_SIZE, c->disk_size);
  put32 (sb + SB_GRAN_BITS, c->gran_bits);
  put32 (sb + SB_NR_CPS, v->nr);
  put64 (sb + SB_TABLE_OFF, v->table_off);
  put32 (sb + SB_TABLE_SIZE, v->table_size);
  put32 (sb + SB_TABLE_CRC, v->table_crc);
  put64 (sb + SB_CUR_OFF, v->cur_off);
  put32 (sb + SB_CUR_CRC, v->in_use ? 0 : v->cur_crc);
  put32 (sb + SB_ID_LEN, (uint32_t) idlen);
  memcpy (sb + SB_ID, c->identity, idlen);
  put32 (sb + SB_CRC, crc (0, sb, SB_CRC));

  if (pwrite_full (c->fd, sb, sizeof sb, (uint64_t) slot * SB_SIZE) == -1 ||
      fdatasync (c->fd) == -1) {
    c->io_error = errno ? errno : EIO;
    return -1;
  }
  c->seq++;
  c->active = slot;
  c->autoclear = 0;
  c->in_use_on_disk = v->in_use;
  return 0;
}

/* The superblock values of the state in memory. */
static struct sbvals
current_vals (const struct cbt *c, bool in_use, uint32_t cur_crc)
{
  struct sbvals v = {
    .table_off = c->table_off, .table_size = c->table_size,
    .table_crc = c->table_crc, .cur_off = c->cur_off, .cur_crc = cur_crc,
    .nr = (uint32_t) c->n, .in_use = in_use,
  };
  return v;
}

/* ---- Writing a whole new state ------------------------------------- */

/* A checkpoint of the new state: its record is the OR of the frozen
 * records of old checkpoints [LO, HI), plus the current bitmap if MEM.
 * The record of the last one is the current bitmap (LO, HI, MEM unused).
 */
struct newcp {
  struct cp cp;
  size_t lo, hi;
  bool mem;
};

/* [LO, HI): the extent of the data area the active state uses. */
static void
active_extent (const struct cbt *c, uint64_t *lo, uint64_t *hi)
{
  uint64_t bm = round_up (c->bm_bytes, ALIGN);

  *lo = UINT64_MAX; *hi = DATA_START;
#define EXTEND(off, len)                                        \
  do {                                                          \
    if ((off) < *lo) *lo = (off);                               \
    if ((off) + (len) > *hi) *hi = (off) + (len);               \
  } while (0)
  if (c->cur_off)
    EXTEND (c->cur_off, bm);
  if (c->table_size)
    EXTEND (c->table_off, (uint64_t) c->table_size);
  for (size_t i = 0; i + 1 < c->n; ++i)
    EXTEND (c->cps[i].off, bm);
#undef EXTEND
}

/* Write the records (the frozen ones, then the current bitmap: zeros if
 * ZERO_CURRENT) and the table of NC into free space, sync, publish.  On
 * success the state in memory becomes NC.  Lock held, not io_busy.
 */
static int
write_state (struct cbt *c, const struct newcp *nc, size_t nn,
             bool zero_current, char *err, size_t errlen)
{
  uint64_t bm = round_up (c->bm_bytes, ALIGN);
  uint64_t table_alloc = round_up ((uint64_t) nn * ENTRY_SIZE, ALIGN);
  uint64_t total = table_alloc + (nn > 1 ? nn - 1 : 0) * bm + bm;
  uint64_t lo, hi, start, cur_off;
  uint32_t cur_crc = 0, table_crc = 0;
  uint8_t *buf = NULL, *tmp = NULL, *table = NULL;
  struct cp newcps[CBT_MAX_CHECKPOINTS];
  struct sbvals v;

  if (c->io_error)
    FAILWITH (EIO, "cbt: an earlier write to the file failed (%s)",
              strerror (c->io_error));
  active_extent (c, &lo, &hi);
  start = DATA_START + total <= lo ? DATA_START : round_up (hi, ALIGN);
  cur_off = start + table_alloc + (nn > 1 ? nn - 1 : 0) * bm;

  buf = malloc (CHUNK);
  tmp = malloc (CHUNK);
  table = calloc (1, table_alloc ? table_alloc : 1);
  if (buf == NULL || tmp == NULL || table == NULL) {
    seterr (err, errlen, "cbt: out of memory");
    goto fail;
  }

  for (size_t i = 0; i < nn; ++i) {
    uint64_t off = i + 1 < nn ? start + table_alloc + i * bm : cur_off;
    bool last = i + 1 == nn;
    uint32_t bcrc = 0;

    newcps[i] = nc[i].cp;
    for (uint64_t pos = 0; pos < c->bm_bytes; pos += CHUNK) {
      size_t len = chunk_len (c, pos);

      memset (buf, 0, len);
      if (!last) {
        if (or_frozen (c, nc[i].lo, nc[i].hi, pos, buf, len, tmp) == -1) {
          seterr (err, errlen, "cbt: reading a checkpoint bitmap: %m");
          goto fail;
        }
        if (nc[i].mem)
          for (size_t j = 0; j < len; ++j)
            buf[j] |= c->cur[pos + j];
      }
      else if (!zero_current)
        memcpy (buf, c->cur + pos, len);
      bcrc = crc (bcrc, buf, len);
      if (pwrite_full (c->fd, buf, len, off + pos) == -1) {
        seterr (err, errlen, "cbt: writing a bitmap: %m");
        goto fail;
      }
    }
    newcps[i].off = last ? 0 : off;
    newcps[i].crc = last ? 0 : bcrc;
    if (last)
      cur_crc = bcrc;
  }
  if (nn == 0) {                /* just the current bitmap */
    for (uint64_t pos = 0; pos < c->bm_bytes; pos += CHUNK) {
      size_t len = chunk_len (c, pos);

      if (zero_current)
        memset (buf, 0, len);
      else
        memcpy (buf, c->cur + pos, len);
      cur_crc = crc (cur_crc, buf, len);
      if (pwrite_full (c->fd, buf, len, cur_off + pos) == -1) {
        seterr (err, errlen, "cbt: writing the current bitmap: %m");
        goto fail;
      }
    }
  }

  for (size_t i = 0; i < nn; ++i) {
    uint8_t *e = table + i * ENTRY_SIZE;

    memcpy (e + CP_NAME, newcps[i].name, strlen (newcps[i].name));
    put32 (e + CP_STATE, newcps[i].state);
    put64 (e + CP_BM_OFF, newcps[i].off);
    put32 (e + CP_BM_CRC, newcps[i].crc);
    put64 (e + CP_CREATED, newcps[i].created);
  }
  table_crc = crc (0, table, nn * ENTRY_SIZE);
  if (nn > 0 &&
      pwrite_full (c->fd, table, nn * ENTRY_SIZE, start) == -1) {
    seterr (err, errlen, "cbt: writing the checkpoint table: %m");
    goto fail;
  }
  if (fdatasync (c->fd) == -1) {
    c->io_error = errno ? errno : EIO;
    seterr (err, errlen, "cbt: syncing the file: %m");
    goto fail;
  }

  v.table_off = nn ? start : 0;
  v.table_size = (uint32_t) (nn * ENTRY_SIZE);
  v.table_crc = nn ? table_crc : 0;
  v.cur_off = cur_off;
  v.cur_crc = cur_crc;
  v.nr = (uint32_t) nn;
  v.in_use = c->in_use_on_disk;
  if (write_super (c, &v) == -1) {
    seterr (err, errlen, "cbt: writing the superblock: %m");
    goto fail;
  }

  c->table_off = v.table_off;
  c->table_size = v.table_size;
  c->table_crc = v.table_crc;
  c->cur_off = cur_off;
  memcpy (c->cps, newcps, nn * sizeof newcps[0]);
  c->n = nn;
  if (zero_current)
    memset (c->cur, 0, c->bm_bytes);
  c->durable_gen = c->mark_gen;   /* everything in memory is on disk */
  /* Beyond the new state and the previous one (which the other
   * superblock names, kept for a damaged newest superblock) is free.
   */
  {
    uint64_t old_hi = hi;

    active_extent (c, &lo, &hi);
    if (ftruncate (c->fd, (off_t) (hi > old_hi ? hi : old_hi)) == -1) {
      /* harmless: the file is just longer */
    }
  }
  free (buf); free (tmp); free (table);
  return 0;

 fail:
  free (buf); free (tmp); free (table);
  errno = c->io_error ? EIO : (errno ? errno : EIO);
  return -1;
}

/* The state in memory as a newcp list (each keeps its own record). */
static void
same_state (const struct cbt *c, struct newcp *nc)
{
  for (size_t i = 0; i < c->n; ++i) {
    nc[i].cp = c->cps[i];
    nc[i].lo = i;
    nc[i].hi = i + 1;
    nc[i].mem = false;
  }
}

/* Delete checkpoint K, merging its record into K-1 (dropping it if
 * K == 0).  Lock held, not io_busy.
 */
static int
delete_cp (struct cbt *c, size_t k, char *err, size_t errlen)
{
  struct newcp nc[CBT_MAX_CHECKPOINTS];
  size_t nn = 0;

  if (k + 1 == c->n && k > 0) {
    /* The record of K is the current bitmap: OR the frozen record of
     * K-1 into it (in memory first: a superset is always safe).
     */
    uint8_t *tmp = malloc (CHUNK);

    if (tmp == NULL)
      FAILWITH (ENOMEM, "cbt: out of memory");
    for (uint64_t pos = 0; pos < c->bm_bytes; pos += CHUNK)
      if (or_frozen (c, k - 1, k, pos, c->cur + pos, chunk_len (c, pos),
                     tmp) == -1) {
        seterr (err, errlen, "cbt: reading checkpoint '%s': %m",
                c->cps[k - 1].name);
        free (tmp);
        return -1;
      }
    free (tmp);
    if (c->page_gen) {
      c->mark_gen++;
      for (size_t p = 0; p < c->nr_pages; ++p)
        c->page_gen[p] = c->mark_gen;
    }
  }
  same_state (c, nc);
  if (k > 0 && k + 1 < c->n)
    nc[k - 1].hi = k + 1;
  for (size_t i = 0; i < c->n; ++i)
    if (i != k)
      nc[nn++] = nc[i];
  return write_state (c, nc, nn, false, err, errlen);
}

/* ---- Opening ------------------------------------------------------- */

static struct cbt *
alloc_cbt (int fd, const struct cbt_options *opts)
{
  struct cbt *c = calloc (1, sizeof *c);

  if (c == NULL)
    return NULL;
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->cond, NULL);
  c->fd = fd;
  c->read_only = opts->read_only;
  c->mode = opts->mode;
  c->active = 1;                /* the first write goes to slot 0 */
  if (opts->identity)
    strcpy (c->identity, opts->identity);
  return c;
}

static void
free_cbt (struct cbt *c)
{
  if (c == NULL)
    return;
  if (c->fd >= 0)
    close (c->fd);
  free (c->cur);
  free (c->page_gen);
  pthread_cond_destroy (&c->cond);
  pthread_mutex_destroy (&c->lock);
  free (c);
}

/* Sizes implied by the disk size and granularity. */
static int
set_geometry (struct cbt *c, uint64_t disk_size, unsigned bits,
              char *err, size_t errlen)
{
  c->disk_size = disk_size;
  c->gran_bits = bits;
  c->nr_gran = div_round_up (disk_size, UINT64_C (1) << bits);
  c->bm_bytes = div_round_up (c->nr_gran, 8);
  if (c->bm_bytes > CBT_MAX_BITMAP)
    FAILWITH (EINVAL, "cbt: disk size %" PRIu64 " with granularity %" PRIu64
              " needs a bitmap of %" PRIu64 " bytes, more than the limit %"
              PRIu64, disk_size, UINT64_C (1) << bits, c->bm_bytes,
              CBT_MAX_BITMAP);
  return 0;
}

static int
alloc_bitmaps (struct cbt *c, char *err, size_t errlen)
{
  c->cur = calloc (1, c->bm_bytes ? c->bm_bytes : 1);
  if (c->cur == NULL)
    FAILWITH (ENOMEM, "cbt: out of memory for a %" PRIu64 " byte bitmap",
              c->bm_bytes);
  if (c->mode == CBT_MODE_WRITE_AHEAD) {
    c->nr_pages = (size_t) div_round_up (c->bm_bytes, PAGE);
    c->page_gen = calloc (c->nr_pages ? c->nr_pages : 1, sizeof (uint64_t));
    if (c->page_gen == NULL)
      FAILWITH (ENOMEM, "cbt: out of memory");
  }
  return 0;
}

/* Check magic, crc and version of one slot.  WHY says what is wrong. */
static bool
slot_ok (const uint8_t *sb, char *why, size_t whylen)
{
  if (memcmp (sb + SB_MAGIC, magic, sizeof magic) != 0) {
    snprintf (why, whylen, all_zero (sb, SB_SIZE) ? "empty" : "bad magic");
    return false;
  }
  if (get32 (sb + SB_CRC) != crc (0, sb, SB_CRC)) {
    snprintf (why, whylen, "header crc 0x%08" PRIx32 " does not match "
              "the contents (0x%08" PRIx32 ")", get32 (sb + SB_CRC),
              crc (0, sb, SB_CRC));
    return false;
  }
  return true;
}

/* Does region [OFF, OFF+LEN) fit in the file, aligned, in the data area? */
static bool
region_ok (uint64_t off, uint64_t len, uint64_t file_size)
{
  return off >= DATA_START && is_aligned (off, ALIGN) &&
    off <= file_size && len <= file_size - off;
}

static bool
overlap (uint64_t a, uint64_t alen, uint64_t b, uint64_t blen)
{
  return a < b + blen && b < a + alen;
}

/* Read and check the checkpoint table, the bitmaps and the current
 * bitmap named by superblock SB.  Fills c->cps, c->n, c->cur.
 */
static int
load_state (struct cbt *c, const uint8_t *sb, uint64_t file_size,
            char *err, size_t errlen)
{
  uint32_t nr = get32 (sb + SB_NR_CPS);
  uint64_t bm = c->bm_bytes;
  uint8_t *table = NULL, *buf = NULL;
  uint8_t mask = tail_mask (c);
  bool in_use = get64 (sb + SB_INCOMPAT) & INCOMPAT_IN_USE;
  int r = -1;

  if (nr > CBT_MAX_CHECKPOINTS)
    FAILWITH (EINVAL, "cbt: number of checkpoints: %" PRIu32
              " exceeds the limit %d", nr, CBT_MAX_CHECKPOINTS);
  c->table_off = get64 (sb + SB_TABLE_OFF);
  c->table_size = get32 (sb + SB_TABLE_SIZE);
  c->table_crc = get32 (sb + SB_TABLE_CRC);
  c->cur_off = get64 (sb + SB_CUR_OFF);
  if (c->table_size != (uint64_t) nr * ENTRY_SIZE)
    FAILWITH (EINVAL, "cbt: table size: %" PRIu32 " bytes, expected %"
              PRIu32 " for %" PRIu32 " checkpoints", c->table_size,
              nr * ENTRY_SIZE, nr);
  if (nr == 0 && (c->table_off != 0 || c->table_crc != 0))
    FAILWITH (EINVAL, "cbt: table offset: %" PRIu64 " (crc 0x%08" PRIx32
              ") with no checkpoints, expected 0", c->table_off,
              c->table_crc);
  if (nr > 0 && !region_ok (c->table_off, c->table_size, file_size))
    FAILWITH (EINVAL, "cbt: table offset: %" PRIu64 " (+%" PRIu32
              " bytes) is unaligned or outside the data area of the %"
              PRIu64 " byte file", c->table_off, c->table_size, file_size);
  if (!region_ok (c->cur_off, bm, file_size))
    FAILWITH (EINVAL, "cbt: current bitmap offset: %" PRIu64 " (+%" PRIu64
              " bytes) is unaligned or outside the data area of the %"
              PRIu64 " byte file", c->cur_off, bm, file_size);
  if (nr > 0 && overlap (c->table_off, c->table_size, c->cur_off, bm))
    FAILWITH (EINVAL, "cbt: current bitmap offset: %" PRIu64
              " overlaps the table", c->cur_off);

  table = malloc (c->table_size ? c->table_size : 1);
  buf = malloc (CHUNK);
  if (table == NULL || buf == NULL) {
    seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  if (nr > 0 && pread_full (c->fd, table, c->table_size, c->table_off) == -1) {
    seterr (err, errlen, "cbt: reading the table: %m");
    goto out;
  }
  if (crc (0, table, c->table_size) != c->table_crc) {
    seterr (err, errlen, "cbt: table crc: 0x%08" PRIx32 " in the "
            "superblock, the table has 0x%08" PRIx32, c->table_crc,
            crc (0, table, c->table_size));
    errno = EINVAL;
    goto out;
  }

  for (uint32_t i = 0; i < nr; ++i) {
    const uint8_t *e = table + (size_t) i * ENTRY_SIZE;
    struct cp *cp = &c->cps[i];
    size_t len = strnlen ((const char *) e + CP_NAME, 64);
    bool last = i + 1 == nr;

#define BAD(...) do { seterr (err, errlen, __VA_ARGS__);        \
      errno = EINVAL; goto out; } while (0)
    if (len > CBT_NAME_MAX || !all_zero (e + CP_NAME + len, 64 - len))
      BAD ("cbt: checkpoint %" PRIu32 " name: not a NUL-padded string "
           "of at most %d bytes", i, CBT_NAME_MAX);
    memcpy (cp->name, e + CP_NAME, len);
    cp->name[len] = '\0';
    if (!cbt_name_valid (cp->name))
      BAD ("cbt: checkpoint %" PRIu32 " name: '%.*s' is not a valid name "
           "(1-%d printable characters, no space, not starting with '-')",
           i, (int) len, printable (cp->name, len, true) ? cp->name : "?",
           CBT_NAME_MAX);
    for (uint32_t j = 0; j < i; ++j)
      if (strcmp (c->cps[j].name, cp->name) == 0)
        BAD ("cbt: checkpoint %" PRIu32 " name: '%s' is a duplicate of "
             "checkpoint %" PRIu32, i, cp->name, j);
    cp->state = get32 (e + CP_STATE);
    if (cp->state != CBT_STATE_GOOD && cp->state != CBT_STATE_PENDING)
      BAD ("cbt: checkpoint %" PRIu32 " '%s' state: %" PRIu32
           " (expected 1 good or 2 pending)", i, cp->name, cp->state);
    if (cp->state == CBT_STATE_PENDING && !last)
      BAD ("cbt: checkpoint %" PRIu32 " '%s' state: pending but not the "
           "last checkpoint", i, cp->name);
    if (get32 (e + CP_FLAGS) != 0)
      BAD ("cbt: checkpoint %" PRIu32 " '%s' flags: 0x%" PRIx32
           " (no flags are defined)", i, cp->name, get32 (e + CP_FLAGS));
    if (get32 (e + CP_RESERVED1) != 0 ||
        !all_zero (e + CP_RESERVED2, ENTRY_SIZE - CP_RESERVED2))
      BAD ("cbt: checkpoint %" PRIu32 " '%s' reserved bytes: not zero",
           i, cp->name);
    cp->created = get64 (e + CP_CREATED);
    cp->off = get64 (e + CP_BM_OFF);
    cp->crc = get32 (e + CP_BM_CRC);
    if (last && (cp->off != 0 || cp->crc != 0))
      BAD ("cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
           " (crc 0x%08" PRIx32 "), expected 0 for the last checkpoint "
           "(its record is the current bitmap)", i, cp->name, cp->off,
           cp->crc);
    if (last)
      continue;
    if (!region_ok (cp->off, bm, file_size))
      BAD ("cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
           " (+%" PRIu64 " bytes) is unaligned or outside the data area "
           "of the %" PRIu64 " byte file", i, cp->name, cp->off, bm,
           file_size);
    if (overlap (cp->off, bm, c->table_off, c->table_size) ||
        overlap (cp->off, bm, c->cur_off, bm))
      BAD ("cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
           " overlaps the table or the current bitmap", i, cp->name,
           cp->off);
    for (uint32_t j = 0; j < i; ++j)
      if (overlap (cp->off, bm, c->cps[j].off, bm))
        BAD ("cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
             " overlaps the bitmap of checkpoint %" PRIu32, i, cp->name,
             cp->off, j);
  }
  c->n = nr;

  /* The frozen records: crc and no bits beyond the disk. */
  for (size_t i = 0; i + 1 < c->n; ++i) {
    uint32_t bcrc = 0;

    for (uint64_t pos = 0; pos < bm; pos += CHUNK) {
      size_t len = chunk_len (c, pos);

      if (pread_full (c->fd, buf, len, c->cps[i].off + pos) == -1) {
        seterr (err, errlen, "cbt: reading checkpoint %zu bitmap: %m", i);
        goto out;
      }
      bcrc = crc (bcrc, buf, len);
      if (pos + len == bm && (buf[len - 1] & mask))
        BAD ("cbt: checkpoint %zu '%s' bitmap: bits set beyond the end "
             "of the disk (last byte 0x%02x)", i, c->cps[i].name,
             buf[len - 1]);
    }
    if (bcrc != c->cps[i].crc)
      BAD ("cbt: checkpoint %zu '%s' bitmap crc: 0x%08" PRIx32 " in the "
           "table, the bitmap has 0x%08" PRIx32, i, c->cps[i].name,
           c->cps[i].crc, bcrc);
  }

  if (pread_full (c->fd, c->cur, bm, c->cur_off) == -1) {
    seterr (err, errlen, "cbt: reading the current bitmap: %m");
    goto out;
  }
  if (!in_use && crc (0, c->cur, bm) != get32 (sb + SB_CUR_CRC))
    BAD ("cbt: current bitmap crc: 0x%08" PRIx32 " in the superblock, the "
         "bitmap has 0x%08" PRIx32, get32 (sb + SB_CUR_CRC),
         crc (0, c->cur, bm));
  if (in_use && get32 (sb + SB_CUR_CRC) != 0)
    BAD ("cbt: current bitmap crc: 0x%08" PRIx32 " while in use, "
         "expected 0", get32 (sb + SB_CUR_CRC));
  if (bm > 0 && (c->cur[bm - 1] & mask))
    BAD ("cbt: current bitmap: bits set beyond the end of the disk "
         "(last byte 0x%02x)", c->cur[bm - 1]);
#undef BAD
  r = 0;
 out:
  free (table);
  free (buf);
  return r;
}

/* Check the superblock fields that come before the state. */
static int
check_super (struct cbt *c, const uint8_t *sb, const struct cbt_options *o,
             char *err, size_t errlen)
{
  uint64_t incompat = get64 (sb + SB_INCOMPAT);
  uint64_t disk_size = get64 (sb + SB_DISK_SIZE);
  uint32_t bits = get32 (sb + SB_GRAN_BITS);
  uint32_t idlen = get32 (sb + SB_ID_LEN);
  const char *id = (const char *) sb + SB_ID;
  const char *want = o->identity ? o->identity : "";

  if (get32 (sb + SB_VERSION) != FORMAT_VERSION)
    FAILWITH (EINVAL, "cbt: version: %" PRIu32 " is not supported "
              "(this program reads version %d)", get32 (sb + SB_VERSION),
              FORMAT_VERSION);
  if (get32 (sb + SB_HEADER_SIZE) != SB_SIZE)
    FAILWITH (EINVAL, "cbt: header size: %" PRIu32 ", expected %d",
              get32 (sb + SB_HEADER_SIZE), SB_SIZE);
  if (incompat & ~(uint64_t) INCOMPAT_KNOWN)
    FAILWITH (EINVAL, "cbt: incompatible features: unknown bits 0x%"
              PRIx64 " (a newer program wrote this file)",
              incompat & ~(uint64_t) INCOMPAT_KNOWN);
  if (bits < 9 || bits > 30)
    FAILWITH (EINVAL, "cbt: granularity: 2^%" PRIu32 " is outside "
              "[2^9, 2^30]", bits);
  if (disk_size == 0 || disk_size > INT64_MAX)
    FAILWITH (EINVAL, "cbt: disk size: %" PRIu64 " is not in "
              "[1, 2^63-1]", disk_size);
  if (o->disk_size != 0 && disk_size != o->disk_size)
    FAILWITH (EINVAL, "cbt: disk size: the file is for a disk of %" PRIu64
              " bytes, this disk has %" PRIu64 " (reset to start afresh)",
              disk_size, o->disk_size);
  if (o->granularity != 0 && (UINT64_C (1) << bits) != o->granularity)
    FAILWITH (EINVAL, "cbt: granularity: the file has %" PRIu64
              ", %" PRIu32 " was asked for (reset to start afresh)",
              UINT64_C (1) << bits, o->granularity);
  if (idlen > CBT_IDENTITY_MAX)
    FAILWITH (EINVAL, "cbt: identity length: %" PRIu32 " exceeds %d",
              idlen, CBT_IDENTITY_MAX);
  if (!printable (id, idlen, true) || !all_zero (sb + SB_ID + idlen,
                                                 256 - idlen))
    FAILWITH (EINVAL, "cbt: identity: not %" PRIu32 " printable "
              "characters followed by zeros", idlen);
  if ((o->disk_size != 0 || o->identity != NULL) &&
      (strlen (want) != idlen || memcmp (want, id, idlen) != 0))
    FAILWITH (EINVAL, "cbt: identity: the file is for disk '%.*s', this "
              "disk is '%s' (reset to start afresh)", (int) idlen, id, want);
  if (!all_zero (sb + SB_RESERVED, SB_CRC - SB_RESERVED))
    FAILWITH (EINVAL, "cbt: reserved bytes: not zero in the superblock");
  memcpy (c->identity, id, idlen);
  c->identity[idlen] = '\0';
  return set_geometry (c, disk_size, bits, err, errlen);
}

static int
create_new (struct cbt *c, const struct cbt_options *o,
            char *err, size_t errlen)
{
  uint32_t g = o->granularity ? o->granularity : CBT_DEFAULT_GRANULARITY;

  if (o->read_only)
    FAILWITH (EINVAL, "cbt: the file is empty (and opened read-only)");
  if (o->disk_size == 0)
    FAILWITH (EINVAL, "cbt: a new file needs the disk size");
  if (!is_power_of_2 (g) || g < CBT_MIN_GRANULARITY ||
      g > CBT_MAX_GRANULARITY)
    FAILWITH (EINVAL, "cbt: granularity: %" PRIu32 " is not a power of 2 "
              "in [%d, %u]", g, CBT_MIN_GRANULARITY, CBT_MAX_GRANULARITY);
  if (o->disk_size > INT64_MAX)
    FAILWITH (EINVAL, "cbt: disk size: %" PRIu64 " too large", o->disk_size);
  if (ftruncate (c->fd, 0) == -1)
    FAILWITH (errno, "cbt: truncating the file: %m");
  if (set_geometry (c, o->disk_size, log_2_bits (g), err, errlen) == -1 ||
      alloc_bitmaps (c, err, errlen) == -1)
    return -1;
  return write_state (c, NULL, 0, true, err, errlen);
}

static int
load (struct cbt *c, const struct cbt_options *o, struct cbt_load_info *info,
      char *err, size_t errlen)
{
  struct stat st;
  uint8_t sb[2][SB_SIZE];
  char why[2][128];
  bool ok[2];
  int s;

  if (fstat (c->fd, &st) == -1)
    FAILWITH (errno, "cbt: fstat: %m");
  if (st.st_size == 0 || o->reset) {
    if (!o->create && !o->reset)
      FAILWITH (ENOENT, "cbt: the file is empty (create it, or reset)");
    info->created = true;
    return create_new (c, o, err, errlen);
  }
  if ((uint64_t) st.st_size < DATA_START)
    FAILWITH (EINVAL, "cbt: file size: %" PRIu64 " bytes, too short for "
              "the two %d byte superblocks", (uint64_t) st.st_size, SB_SIZE);
  if (pread_full (c->fd, sb, sizeof sb, 0) == -1)
    FAILWITH (errno, "cbt: reading the superblocks: %m");
  for (s = 0; s < 2; ++s)
    ok[s] = slot_ok (sb[s], why[s], sizeof why[s]);
  if (!ok[0] && !ok[1]) {
    if (memcmp (sb[0], magic, 8) != 0 && memcmp (sb[1], magic, 8) != 0)
      FAILWITH (EINVAL, "cbt: magic: neither superblock starts with the "
                "cbt magic: not a cbt file (reset to start afresh)");
    FAILWITH (EINVAL, "cbt: superblock: no valid copy (slot 0: %.100s; "
              "slot 1: %.100s)", why[0], why[1]);
  }
  if (ok[0] && ok[1] && get64 (sb[0] + SB_SEQ) == get64 (sb[1] + SB_SEQ))
    FAILWITH (EINVAL, "cbt: sequence: both superblocks have %" PRIu64,
              get64 (sb[0] + SB_SEQ));
  s = !ok[1] || (ok[0] && get64 (sb[0] + SB_SEQ) > get64 (sb[1] + SB_SEQ))
    ? 0 : 1;
  if (!ok[1 - s] && strcmp (why[1 - s], "empty") != 0) {
    info->fallback = true;
    note (info, "cbt: superblock slot %d is damaged (%.100s): using slot %d "
              "(sequence %" PRIu64 ")", 1 - s, why[1 - s], s,
              get64 (sb[s] + SB_SEQ));
  }
  c->active = s;
  c->seq = get64 (sb[s] + SB_SEQ);
  c->compat_other = get64 (sb[s] + SB_COMPAT) & ~(uint64_t) COMPAT_KNOWN;
  c->autoclear = get64 (sb[s] + SB_AUTOCLEAR);
  c->in_use_on_disk = get64 (sb[s] + SB_INCOMPAT) & INCOMPAT_IN_USE;
  if (check_super (c, sb[s], o, err, errlen) == -1 ||
      alloc_bitmaps (c, err, errlen) == -1 ||
      load_state (c, sb[s], (uint64_t) st.st_size, err, errlen) == -1)
    return -1;

  /* Still in use: a crash (or kill) while open. */
  if (c->in_use_on_disk) {
    bool wal = get64 (sb[s] + SB_COMPAT) & COMPAT_WRITE_AHEAD;

    if (wal)
      note (info, "cbt: the file was not closed cleanly; it was in "
                "write-ahead mode: all %zu checkpoints stay valid", c->n);
    else if (c->n > 0) {
      info->invalidated = true;
      info->dropped = (unsigned) c->n;
      note (info, "cbt: the file was not closed cleanly (still marked in "
                "use): all %zu checkpoints are invalid, the next backup "
                "must be full", c->n);
      if (c->read_only)
        c->n = 0;
      else if (write_state (c, NULL, 0, true, err, errlen) == -1)
        return -1;
    }
  }
  /* A backup still pending: it did not finish. */
  if (c->n > 0 && c->cps[c->n - 1].state == CBT_STATE_PENDING) {
    note (info, "cbt: checkpoint '%s' was still pending (its backup did not "
              "finish): deleted, its changes merged back",
              c->cps[c->n - 1].name);
    info->dropped++;
    if (!c->read_only && delete_cp (c, c->n - 1, err, errlen) == -1)
      return -1;
  }
  /* Clear unknown autoclear bits.  And a file still in use opened in
   * the other mode records this mode at once: an in-use file marked
   * write-ahead would be trusted after a crash.
   */
  if (!c->read_only &&
      (c->autoclear != 0 ||
       (c->in_use_on_disk &&
        (bool) (get64 (sb[s] + SB_COMPAT) & COMPAT_WRITE_AHEAD) !=
        (c->mode == CBT_MODE_WRITE_AHEAD)))) {
    struct sbvals v = current_vals (c, c->in_use_on_disk,
                                    crc (0, c->cur, c->bm_bytes));
    if (write_super (c, &v) == -1)
      FAILWITH (EIO, "cbt: updating the superblock: %m");
  }
  return 0;
}

int
cbt_open_fd (int fd, const struct cbt_options *opts, struct cbt **cbtp,
             struct cbt_load_info *info, char *err, size_t errlen)
{
  struct cbt_load_info dummy;
  struct flock fl = { .l_whence = SEEK_SET };
  struct cbt *c;

  *cbtp = NULL;
  if (info == NULL)
    info = &dummy;
  memset (info, 0, sizeof *info);
  if (opts->identity && (strlen (opts->identity) > CBT_IDENTITY_MAX ||
                         !printable (opts->identity,
                                     strlen (opts->identity), true))) {
    close (fd);
    FAILWITH (EINVAL, "cbt: identity: must be at most %d printable "
              "characters", CBT_IDENTITY_MAX);
  }
  if (opts->disk_size == 0 && !opts->read_only) {
    close (fd);
    FAILWITH (EINVAL, "cbt: the disk size is required unless read-only");
  }
  c = alloc_cbt (fd, opts);
  if (c == NULL) {
    close (fd);
    FAILWITH (ENOMEM, "cbt: out of memory");
  }
  fl.l_type = opts->read_only ? F_RDLCK : F_WRLCK;
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1) {
    int e = errno;
    seterr (err, errlen, "cbt: lock: the file is in use by another "
            "process or open (%s)", strerror (e));
    free_cbt (c);
    errno = (e == EACCES) ? EAGAIN : e;
    return -1;
  }
  if (load (c, opts, info, err, errlen) == -1) {
    int e = errno;
    free_cbt (c);
    errno = e;
    return -1;
  }
  *cbtp = c;
  return 0;
}

int
cbt_open (const char *path, const struct cbt_options *opts,
          struct cbt **cbtp, struct cbt_load_info *info,
          char *err, size_t errlen)
{
  int fd = open (path, (opts->read_only ? O_RDONLY : O_RDWR) | O_CLOEXEC |
                 ((opts->create || opts->reset) && !opts->read_only
                  ? O_CREAT : 0), 0644);

  *cbtp = NULL;
  if (fd == -1)
    FAILWITH (errno, "cbt: %s: %m", path);
  return cbt_open_fd (fd, opts, cbtp, info, err, errlen);
}

/* Wait until no commit is writing.  Lock held. */
static void
wait_idle (struct cbt *c)
{
  while (c->io_busy)
    pthread_cond_wait (&c->cond, &c->lock);
}

int
cbt_close (struct cbt *c, char *err, size_t errlen)
{
  int r = 0;

  if (c == NULL)
    return 0;
  pthread_mutex_lock (&c->lock);
  wait_idle (c);
  /* In use, or write-ahead marks not committed yet. */
  if (!c->read_only && !c->io_error &&
      (c->in_use_on_disk || c->mark_gen != c->durable_gen)) {
    struct sbvals v = current_vals (c, false, crc (0, c->cur, c->bm_bytes));
    struct sbvals in_use = current_vals (c, true, 0);

    /* Write-ahead marks never committed: the in-place write below
     * would break the crc of a clean file, so mark it in use first.
     */
    if ((!c->in_use_on_disk && write_super (c, &in_use) == -1) ||
        pwrite_full (c->fd, c->cur, c->bm_bytes, c->cur_off) == -1 ||
        fdatasync (c->fd) == -1 || write_super (c, &v) == -1) {
      seterr (err, errlen, "cbt: storing the bitmap at close: %m");
      r = -1;
    }
  }
  else if (c->io_error) {
    seterr (err, errlen, "cbt: not stored at close: an earlier write "
            "failed (%s)", strerror (c->io_error));
    r = -1;
  }
  pthread_mutex_unlock (&c->lock);
  free_cbt (c);
  if (r == -1)
    errno = EIO;
  return r;
}

uint64_t cbt_disk_size (const struct cbt *c) { return c->disk_size; }
uint32_t cbt_granularity (const struct cbt *c) { return 1u << c->gran_bits; }
enum cbt_mode cbt_mode (const struct cbt *c) { return c->mode; }
const char *cbt_identity (const struct cbt *c) { return c->identity; }

void
cbt_get_stats (struct cbt *c, struct cbt_stats *stats)
{
  pthread_mutex_lock (&c->lock);
  *stats = c->stats;
  pthread_mutex_unlock (&c->lock);
}

/* ---- Recording ----------------------------------------------------- */

/* Granules [*G0, *G1] of a non-empty range inside the disk. */
static int
range_granules (const struct cbt *c, uint64_t offset, uint64_t count,
                uint64_t *g0, uint64_t *g1)
{
  if (offset > c->disk_size || count > c->disk_size - offset) {
    errno = EINVAL;
    return -1;
  }
  *g0 = offset >> c->gran_bits;
  *g1 = (offset + count - 1) >> c->gran_bits;
  return 0;
}

/* Set bits [G0, G1]; true if any was clear. */
static bool
set_bits (uint8_t *bm, uint64_t g0, uint64_t g1)
{
  bool changed = false;

  while (g0 <= g1) {
    uint64_t byte = g0 / 8;
    unsigned b0 = g0 % 8;
    unsigned b1 = g1 / 8 == byte ? g1 % 8 : 7;
    uint8_t m = (uint8_t) ((0xff << b0) & (0xff >> (7 - b1)));

    if ((bm[byte] & m) != m) {
      bm[byte] |= m;
      changed = true;
    }
    g0 = (byte + 1) * 8;
  }
  return changed;
}

static bool
bits_set (const uint8_t *bm, uint64_t g0, uint64_t g1)
{
  for (uint64_t g = g0; g <= g1; ++g)
    if (!(bm[g / 8] & (1u << (g % 8))))
      return false;
  return true;
}

/* The ticket to wait for to make granules [G0, G1] durable: 0 if they
 * are already.  Lock held.
 */
static uint64_t
ticket_of (const struct cbt *c, uint64_t g0, uint64_t g1)
{
  uint64_t t = 0;

  for (uint64_t p = g0 / 8 / PAGE; p <= g1 / 8 / PAGE; ++p)
    if (c->page_gen[p] > c->durable_gen && c->page_gen[p] > t)
      t = c->page_gen[p];
  return t;
}

int
cbt_mark (struct cbt *c, uint64_t offset, uint64_t count, uint64_t *ticket)
{
  uint64_t g0, g1;

  if (ticket)
    *ticket = 0;
  if (c->read_only) {
    errno = EROFS;
    return -1;
  }
  if (range_granules (c, offset, count, &g0, &g1) == -1)
    return -1;
  if (count == 0)
    return 0;
  pthread_mutex_lock (&c->lock);
  c->stats.marks++;
  if (c->io_error) {
    pthread_mutex_unlock (&c->lock);
    errno = EIO;
    return -1;
  }
  if (c->mode == CBT_MODE_IN_USE && !c->in_use_on_disk) {
    struct sbvals v = current_vals (c, true, 0);

    wait_idle (c);
    if (write_super (c, &v) == -1) {
      pthread_mutex_unlock (&c->lock);
      errno = EIO;
      return -1;
    }
  }
  if (set_bits (c->cur, g0, g1) && c->page_gen) {
    c->mark_gen++;
    for (uint64_t p = g0 / 8 / PAGE; p <= g1 / 8 / PAGE; ++p)
      c->page_gen[p] = c->mark_gen;
  }
  if (c->page_gen && ticket)
    *ticket = ticket_of (c, g0, g1);
  pthread_mutex_unlock (&c->lock);
  return 0;
}

bool
cbt_is_durable (struct cbt *c, uint64_t offset, uint64_t count)
{
  uint64_t g0, g1;
  bool r;

  if (range_granules (c, offset, count, &g0, &g1) == -1 || count == 0)
    return count == 0;
  pthread_mutex_lock (&c->lock);
  r = bits_set (c->cur, g0, g1) &&
    (c->mode == CBT_MODE_IN_USE ? c->in_use_on_disk
     : ticket_of (c, g0, g1) == 0);
  pthread_mutex_unlock (&c->lock);
  return r;
}

/* One group commit: write every page changed since the last durable
 * generation, sync.  Lock held on entry and exit, released meanwhile;
 * c->io_busy keeps structural changes and other commits out.
 */
static void
do_commit (struct cbt *c)
{
  uint64_t gen = c->mark_gen;
  struct sbvals v = current_vals (c, true, 0);
  bool need_super = !c->in_use_on_disk;
  size_t nd = 0, *idx;
  uint8_t *pages;
  int e = 0;

  for (size_t p = 0; p < c->nr_pages; ++p)
    nd += c->page_gen[p] > c->durable_gen;
  idx = malloc ((nd ? nd : 1) * sizeof *idx);
  pages = malloc (nd ? nd * PAGE : 1);
  if (idx == NULL || pages == NULL) {
    free (idx); free (pages);
    c->io_error = ENOMEM;
    return;
  }
  nd = 0;
  for (size_t p = 0; p < c->nr_pages; ++p)
    if (c->page_gen[p] > c->durable_gen) {
      uint64_t pos = (uint64_t) p * PAGE;
      size_t len = c->bm_bytes - pos < PAGE ? c->bm_bytes - pos : PAGE;
      memcpy (pages + nd * PAGE, c->cur + pos, len);
      idx[nd++] = p;
    }
  c->io_busy = true;
  pthread_mutex_unlock (&c->lock);

  if (need_super && write_super (c, &v) == -1)
    e = c->io_error;
  for (size_t i = 0; e == 0 && i < nd; ++i) {
    uint64_t pos = (uint64_t) idx[i] * PAGE;
    size_t len = c->bm_bytes - pos < PAGE ? c->bm_bytes - pos : PAGE;
    if (pwrite_full (c->fd, pages + i * PAGE, len, c->cur_off + pos) == -1)
      e = errno ? errno : EIO;
  }
  if (e == 0 && fdatasync (c->fd) == -1)
    e = errno ? errno : EIO;
  free (idx);
  free (pages);

  pthread_mutex_lock (&c->lock);
  c->io_busy = false;
  c->stats.syncs++;
  c->stats.pages_written += nd;
  if (e)
    c->io_error = e;
  else if (gen > c->durable_gen)
    c->durable_gen = gen;
  pthread_cond_broadcast (&c->cond);
}

int
cbt_commit (struct cbt *c, uint64_t ticket)
{
  int r = 0;

  if (ticket == 0 || c->mode != CBT_MODE_WRITE_AHEAD)
    return 0;
  pthread_mutex_lock (&c->lock);
  c->stats.commits++;
  while (c->durable_gen < ticket) {
    if (c->io_error) {
      r = -1;
      break;
    }
    if (c->io_busy)
      pthread_cond_wait (&c->cond, &c->lock);
    else
      do_commit (c);
  }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = EIO;
  return r;
}

/* ---- Checkpoints --------------------------------------------------- */

static ssize_t
find_cp (const struct cbt *c, const char *name)
{
  for (size_t i = 0; i < c->n; ++i)
    if (strcmp (c->cps[i].name, name) == 0)
      return (ssize_t) i;
  return -1;
}

/* Take the lock for a change of the checkpoints; -1 if not possible. */
static int
begin_change (struct cbt *c, const char *name, char *err, size_t errlen)
{
  if (c->read_only)
    FAILWITH (EROFS, "cbt: opened read-only");
  if (!cbt_name_valid (name))
    FAILWITH (EINVAL, "cbt: invalid checkpoint name '%s' (1-%d printable "
              "characters, no space, not starting with '-')",
              name && printable (name, strlen (name), true) ? name : "?",
              CBT_NAME_MAX);
  pthread_mutex_lock (&c->lock);
  wait_idle (c);
  if (c->io_error) {
    pthread_mutex_unlock (&c->lock);
    FAILWITH (EIO, "cbt: an earlier write to the file failed (%s)",
              strerror (c->io_error));
  }
  return 0;
}

static int
end_change (struct cbt *c, int r)
{
  int e = errno;
  pthread_mutex_unlock (&c->lock);
  errno = e;
  return r;
}

int
cbt_checkpoint_create (struct cbt *c, const char *name, bool pending,
                       char *err, size_t errlen)
{
  struct newcp nc[CBT_MAX_CHECKPOINTS];
  size_t n;

  if (begin_change (c, name, err, errlen) == -1)
    return -1;
  n = c->n;
  if (find_cp (c, name) >= 0) {
    seterr (err, errlen, "cbt: checkpoint '%s' exists", name);
    errno = EEXIST;
    return end_change (c, -1);
  }
  if (n > 0 && c->cps[n - 1].state == CBT_STATE_PENDING) {
    seterr (err, errlen, "cbt: checkpoint '%s' is pending: end its backup "
            "first", c->cps[n - 1].name);
    errno = EBUSY;
    return end_change (c, -1);
  }
  if (n >= CBT_MAX_CHECKPOINTS) {
    seterr (err, errlen, "cbt: %d checkpoints already: delete one",
            CBT_MAX_CHECKPOINTS);
    errno = ENOSPC;
    return end_change (c, -1);
  }
  same_state (c, nc);
  if (n > 0) {                  /* the current record freezes */
    nc[n - 1].lo = nc[n - 1].hi = 0;
    nc[n - 1].mem = true;
  }
  memset (&nc[n], 0, sizeof nc[n]);
  strcpy (nc[n].cp.name, name);
  nc[n].cp.state = pending ? CBT_STATE_PENDING : CBT_STATE_GOOD;
  nc[n].cp.created = (uint64_t) time (NULL);
  return end_change (c, write_state (c, nc, n + 1, true, err, errlen));
}

/* Find NAME with the lock held; -1 and unlock if missing. */
static ssize_t
lookup (struct cbt *c, const char *name, char *err, size_t errlen)
{
  ssize_t k = find_cp (c, name);

  if (k < 0) {
    seterr (err, errlen, "cbt: no checkpoint '%s'", name);
    errno = ENOENT;
    end_change (c, -1);
  }
  return k;
}

static int
end_pending (struct cbt *c, const char *name, bool ok,
             char *err, size_t errlen)
{
  struct newcp nc[CBT_MAX_CHECKPOINTS];
  ssize_t k;

  if (begin_change (c, name, err, errlen) == -1 ||
      (k = lookup (c, name, err, errlen)) < 0)
    return -1;
  if (c->cps[k].state != CBT_STATE_PENDING) {
    seterr (err, errlen, "cbt: checkpoint '%s' is not pending", name);
    errno = EINVAL;
    return end_change (c, -1);
  }
  if (!ok)
    return end_change (c, delete_cp (c, (size_t) k, err, errlen));
  same_state (c, nc);
  nc[k].cp.state = CBT_STATE_GOOD;
  return end_change (c, write_state (c, nc, c->n, false, err, errlen));
}

int
cbt_checkpoint_confirm (struct cbt *c, const char *name,
                        char *err, size_t errlen)
{
  return end_pending (c, name, true, err, errlen);
}

int
cbt_checkpoint_fail (struct cbt *c, const char *name,
                     char *err, size_t errlen)
{
  return end_pending (c, name, false, err, errlen);
}

int
cbt_checkpoint_delete (struct cbt *c, const char *name,
                       char *err, size_t errlen)
{
  ssize_t k;

  if (begin_change (c, name, err, errlen) == -1 ||
      (k = lookup (c, name, err, errlen)) < 0)
    return -1;
  return end_change (c, delete_cp (c, (size_t) k, err, errlen));
}

size_t
cbt_checkpoint_count (struct cbt *c)
{
  size_t n;

  pthread_mutex_lock (&c->lock);
  n = c->n;
  pthread_mutex_unlock (&c->lock);
  return n;
}

static void
fill_info (const struct cp *cp, struct cbt_checkpoint_info *info)
{
  strcpy (info->name, cp->name);
  info->state = cp->state;
  info->created = cp->created;
}

int
cbt_checkpoint_get (struct cbt *c, size_t i, struct cbt_checkpoint_info *info)
{
  int r = -1;

  pthread_mutex_lock (&c->lock);
  if (i < c->n) {
    fill_info (&c->cps[i], info);
    r = 0;
  }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = ENOENT;
  return r;
}

int
cbt_checkpoint_latest_good (struct cbt *c, struct cbt_checkpoint_info *info)
{
  int r = -1;

  pthread_mutex_lock (&c->lock);
  for (size_t i = c->n; i-- > 0; )
    if (c->cps[i].state == CBT_STATE_GOOD) {
      fill_info (&c->cps[i], info);
      r = 0;
      break;
    }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = ENOENT;
  return r;
}

/* ---- Queries ------------------------------------------------------- */

int
cbt_map (struct cbt *c, const char *since, cbt_extent_fn extent,
         void *opaque, char *err, size_t errlen)
{
  uint64_t gran = UINT64_C (1) << c->gran_bits;
  uint64_t run = 0, run_len = 0;        /* granules */
  uint8_t *buf = NULL, *tmp = NULL;
  ssize_t k;
  int r = -1;

  pthread_mutex_lock (&c->lock);
  k = since ? find_cp (c, since) : -1;
  if (k < 0) {
    seterr (err, errlen, "cbt: no checkpoint '%s'", since ? since : "");
    errno = ENOENT;
    goto out;
  }
  if (c->cps[k].state != CBT_STATE_GOOD) {
    seterr (err, errlen, "cbt: checkpoint '%s' is pending: its backup "
            "has not ended", since);
    errno = EINVAL;
    goto out;
  }
  buf = malloc (CHUNK);
  tmp = malloc (CHUNK);
  if (buf == NULL || tmp == NULL) {
    seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  for (uint64_t pos = 0; pos < c->bm_bytes; pos += CHUNK) {
    size_t len = chunk_len (c, pos);

    memcpy (buf, c->cur + pos, len);
    if (or_frozen (c, (size_t) k, c->n - 1, pos, buf, len, tmp) == -1) {
      seterr (err, errlen, "cbt: reading a checkpoint bitmap: %m");
      goto out;
    }
    for (size_t j = 0; j < len; ++j) {
      if (buf[j] == 0 && run_len == 0)
        continue;
      for (unsigned b = 0; b < 8; ++b) {
        uint64_t g = (pos + j) * 8 + b;

        if (g >= c->nr_gran)
          break;
        if (buf[j] & (1u << b)) {
          if (run_len == 0)
            run = g;
          run_len++;
        }
        else if (run_len > 0) {
          if (extent (run * gran, run_len * gran, opaque) == -1)
            goto out;
          run_len = 0;
        }
      }
    }
  }
  if (run_len > 0) {
    uint64_t off = run * gran, len = run_len * gran;

    if (off + len > c->disk_size)
      len = c->disk_size - off;
    if (extent (off, len, opaque) == -1)
      goto out;
  }
  r = 0;
 out:
  free (buf);
  free (tmp);
  pthread_mutex_unlock (&c->lock);
  return r;
}
