/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): the file's I/O.  Reading and writing whole, the
 * geometry (the sizes a disk size and granularity imply), the blocks of
 * the file and their references, the io token, superblocks,
 * directories, indexes and tables.
 *
 * On disk: two superblock slots (0 and 4096), then blocks of 4096
 * bytes.  A new state (table, indexes, directories, pages) is written
 * into blocks the state in force does not hold, synced, and then
 * published by writing the other superblock slot with sequence + 1 and
 * syncing (cbt_publish, in cbt-rec.c).  Blocks the old state held and
 * the new one does not are free only then.  The only writes to blocks a
 * published superblock names are to the current record (its pages and
 * its directory entries, while the file is marked in use: they only
 * ever set bits, or an entry from 0 to a block), and to the next
 * directory's entries (marks made while a new checkpoint is being
 * written).
 *
 * The other parts: cbt-rec.c (records in memory), cbt.c (marking,
 * commit, queries), cbt-checkpoints.c, cbt-load.c (opening, validating,
 * closing), cbt-v1.c (version 1 files).
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cbt-private.h"
#include "rounding.h"

const char cbt_magic[8] = { 'S', 'B', 'K', 'C', 'B', 'T', '\r', '\n' };

static const uint8_t zeros[65536];

/* ---- Reading and writing ------------------------------------------- */

void __attribute__ ((__format__ (__printf__, 3, 4)))
cbt_seterr (char *err, size_t errlen, const char *fmt, ...)
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

int __attribute__ ((__format__ (__printf__, 4, 5)))
cbt_failure (char *err, size_t errlen, int e, const char *fmt, ...)
{
  va_list ap;

  if (err != NULL && errlen > 0) {
    va_start (ap, fmt);
    vsnprintf (err, errlen, fmt, ap);
    va_end (ap);
  }
  errno = e;
  return -1;
}

int
cbt_pread_full (int fd, void *buf, size_t len, uint64_t off)
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

int
cbt_pwrite_full (int fd, const void *buf, size_t len, uint64_t off)
{
  const uint8_t *p = buf;

  while (len > 0) {
    ssize_t r = pwrite (fd, p, len, (off_t) off);
    if (r == -1 && errno == EINTR)
      continue;
    if (r == -1)
      return -1;
    if (r == 0) {
      errno = EIO;
      return -1;
    }
    p += r; len -= (size_t) r; off += (uint64_t) r;
  }
  return 0;
}

int
cbt_io_failed (struct cbt *c, int e)
{
  pthread_mutex_lock (&c->lock);
  if (c->io_error == 0)
    c->io_error = e ? e : EIO;
  pthread_mutex_unlock (&c->lock);
  errno = EIO;
  return -1;
}

int
cbt_check_io (struct cbt *c, char *err, size_t errlen)
{
  int e;

  pthread_mutex_lock (&c->lock);
  e = c->io_error;
  pthread_mutex_unlock (&c->lock);
  if (e)
    return cbt_failure (err, errlen, EIO,
                        "cbt: an earlier write to the file failed (%s): reopen "
                        "it", strerror (e));
  return 0;
}

/* ---- Geometry and blocks ------------------------------------------- */

/* Sizes implied by the disk size and granularity. */
int
cbt_set_geometry (struct cbt *c, uint64_t disk_size, unsigned bits,
                  char *err, size_t errlen)
{
  static const uint8_t z[4096];
  uint64_t nr_pages;

  c->disk_size = disk_size;
  c->gran_bits = bits;
  c->nr_gran = div_round_up (disk_size, UINT64_C (1) << bits);
  c->bm_bytes = div_round_up (c->nr_gran, 8);
  if (c->bm_bytes > CBT_MAX_BITMAP)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: disk size %" PRIu64 " with granularity %" PRIu64
                        " needs a bitmap of %" PRIu64 " bytes, more than the limit %"
                        PRIu64, disk_size, UINT64_C (1) << bits, c->bm_bytes,
                        CBT_MAX_BITMAP);
  nr_pages = div_round_up (c->bm_bytes, PAGE);
  c->nr_pages = (uint32_t) nr_pages;
  c->dir_bytes = (uint32_t) (nr_pages * DIR_SIZE);
  c->dir_blocks = blocks_for (c->dir_bytes);
  c->empty_crc = 0;
  for (uint32_t pos = 0; pos < c->dir_bytes; pos += sizeof z)
    c->empty_crc = crc (c->empty_crc, z, c->dir_bytes - pos < sizeof z
                        ? c->dir_bytes - pos : sizeof z);
  return 0;
}

int
cbt_blocks_init (struct cbt *c, uint64_t file_size)
{
  uint64_t nb = (file_size + BLOCK - 1) >> BLOCK_SHIFT;

  if (nb < 2)
    nb = 2;
  if (nb > UINT32_MAX / 2) {
    errno = EFBIG;
    return -1;
  }
  c->capblk = (uint32_t) nb + 64;
  c->refs = calloc (c->capblk, sizeof *c->refs);
  if (c->refs == NULL)
    return -1;
  c->nblk = (uint32_t) nb;
  c->refs[0] = c->refs[1] = 1;  /* the superblocks */
  c->hint = 2;
  return 0;
}

/* Room for NEED blocks.  alloc_lock held. */
static int
grow (struct cbt *c, uint64_t need)
{
  uint64_t cap = c->capblk;
  uint32_t *p;

  if (need <= c->capblk)
    return 0;
  if (need > UINT32_MAX / 2) {
    errno = EFBIG;
    return -1;
  }
  while (cap < need)
    cap *= 2;
  if (cap > UINT32_MAX / 2)
    cap = UINT32_MAX / 2;
  p = realloc (c->refs, cap * sizeof *p);
  if (p == NULL)
    return -1;
  memset (p + c->capblk, 0, (cap - c->capblk) * sizeof *p);
  c->refs = p;
  c->capblk = (uint32_t) cap;
  return 0;
}

int
cbt_alloc (struct cbt *c, uint32_t k, uint32_t *blk)
{
  uint32_t run = 0, start = 0, first_free = UINT32_MAX;
  bool found = false;

  assert (k > 0);
  pthread_mutex_lock (&c->alloc_lock);
  for (uint32_t b = c->hint; b < c->nblk; ++b) {
    if (c->refs[b]) {
      run = 0;
      continue;
    }
    if (first_free == UINT32_MAX)
      first_free = b;
    if (run++ == 0)
      start = b;
    if (run == k) {
      found = true;
      break;
    }
  }
  if (!found) {
    /* At the end: after a free run that reaches it, or after it. */
    if (run == 0)
      start = c->nblk;
    if (grow (c, (uint64_t) start + k) == -1) {
      pthread_mutex_unlock (&c->alloc_lock);
      return -1;
    }
    if (start + k > c->nblk)
      c->nblk = start + k;
  }
  for (uint32_t i = 0; i < k; ++i)
    c->refs[start + i] = 1;
  if (first_free == UINT32_MAX || first_free == start)
    c->hint = start + k;
  else
    c->hint = first_free;
  pthread_mutex_unlock (&c->alloc_lock);
  *blk = start;
  return 0;
}

void
cbt_hold (struct cbt *c, uint32_t blk, uint32_t k)
{
  pthread_mutex_lock (&c->alloc_lock);
  for (uint32_t i = 0; i < k; ++i) {
    assert (blk + i < c->nblk && c->refs[blk + i] > 0);
    c->refs[blk + i]++;
  }
  pthread_mutex_unlock (&c->alloc_lock);
}

void
cbt_release (struct cbt *c, uint32_t blk, uint32_t k)
{
  pthread_mutex_lock (&c->alloc_lock);
  for (uint32_t i = 0; i < k; ++i) {
    assert (blk + i < c->nblk && c->refs[blk + i] > 0);
    if (--c->refs[blk + i] == 0 && blk + i < c->hint)
      c->hint = blk + i;
  }
  pthread_mutex_unlock (&c->alloc_lock);
}

int
cbt_hold_new (struct cbt *c, uint32_t blk, uint32_t k)
{
  int r = 0;

  pthread_mutex_lock (&c->alloc_lock);
  if (blk < 2 || (uint64_t) blk + k > c->nblk)
    r = -1;
  for (uint32_t i = 0; r == 0 && i < k; ++i)
    if (c->refs[blk + i])
      r = -1;
  for (uint32_t i = 0; r == 0 && i < k; ++i)
    c->refs[blk + i] = 1;
  pthread_mutex_unlock (&c->alloc_lock);
  return r;
}

void
cbt_trim_file (struct cbt *c)
{
  uint32_t last;

  if (c->read_only)
    return;
  pthread_mutex_lock (&c->alloc_lock);
  last = c->nblk;
  while (last > 2 && c->refs[last - 1] == 0)
    last--;
  if (last < c->nblk && ftruncate (c->fd, (off_t) blk_off (last)) == 0) {
    c->nblk = last;
    if (c->hint > last)
      c->hint = last;
  }
  pthread_mutex_unlock (&c->alloc_lock);
}

/* ---- The io token -------------------------------------------------- */

void
cbt_token_take_locked (struct cbt *c)
{
  while (c->io_busy)
    pthread_cond_wait (&c->cond, &c->lock);
  c->io_busy = true;
}

void
cbt_token_give_locked (struct cbt *c)
{
  c->io_busy = false;
  pthread_cond_broadcast (&c->cond);
}

void
cbt_token_take (struct cbt *c)
{
  pthread_mutex_lock (&c->lock);
  cbt_token_take_locked (c);
  pthread_mutex_unlock (&c->lock);
}

void
cbt_token_give (struct cbt *c)
{
  pthread_mutex_lock (&c->lock);
  cbt_token_give_locked (c);
  pthread_mutex_unlock (&c->lock);
}

/* ---- Superblock ---------------------------------------------------- */

int
cbt_write_super (struct cbt *c, const struct sbv *v, bool sync)
{
  uint8_t sb[SB_SIZE];
  size_t idlen = strlen (c->identity), bootlen = strlen (c->boot_id);
  /* The slot other than the last synced one: a write never tears the
   * only superblock sure to be on disk (unsynced writes, in process-safe
   * mode, go to the same slot again and again).
   */
  int slot = 1 - c->synced_slot;

  memset (sb, 0, sizeof sb);
  memcpy (sb + SB_MAGIC, cbt_magic, sizeof cbt_magic);
  put32 (sb + SB_VERSION, FORMAT_VERSION);
  put32 (sb + SB_HEADER_SIZE, SB_SIZE);
  put64 (sb + SB_SEQ, c->seq + 1);
  put64 (sb + SB_INCOMPAT, v->in_use ? INCOMPAT_IN_USE : 0);
  put64 (sb + SB_COMPAT, c->compat_other);
  put64 (sb + SB_AUTOCLEAR, 0);
  put64 (sb + SB_DISK_SIZE, c->disk_size);
  put32 (sb + SB_GRAN_BITS, c->gran_bits);
  put32 (sb + SB_NR_CPS, v->n);
  put64 (sb + SB_TABLE_OFF, v->table_blk ? blk_off (v->table_blk) : 0);
  put32 (sb + SB_TABLE_SIZE, v->table_size);
  put32 (sb + SB_TABLE_CRC, v->table_crc);
  put64 (sb + SB_CUR_OFF, blk_off (v->cur_dir));
  put32 (sb + SB_CUR_CRC, v->in_use ? 0 : v->cur_crc);
  put32 (sb + SB_ID_LEN, (uint32_t) idlen);
  memcpy (sb + SB_ID, c->identity, idlen);
  put64 (sb + SB_NEXT_OFF, blk_off (v->next_dir));
  put32 (sb + SB_DIR_SIZE, c->dir_bytes);
  put32 (sb + SB_MODE, (uint32_t) c->mode);
  put64 (sb + SB_NEXT_SERIAL, v->next_serial);
  put32 (sb + SB_BOOT_LEN, (uint32_t) bootlen);
  memcpy (sb + SB_BOOT_ID, c->boot_id, bootlen);
  put32 (sb + SB_CRC, crc (0, sb, SB_CRC));

  if (cbt_pwrite_full (c->fd, sb, sizeof sb, (uint64_t) slot * SB_SIZE) == -1 ||
      (sync && fdatasync (c->fd) == -1))
    return cbt_io_failed (c, errno);
  pthread_mutex_lock (&c->lock);
  c->seq++;
  c->active = slot;
  if (sync)
    c->synced_slot = slot;
  c->pub = *v;
  if (v->in_use)
    c->pub.cur_crc = 0;
  pthread_mutex_unlock (&c->lock);
  return 0;
}

int
cbt_set_in_use_locked (struct cbt *c)
{
  struct sbv v;
  int r;

  cbt_token_take_locked (c);
  if (c->pub.in_use || c->io_error) {
    r = c->io_error ? -1 : 0;
    cbt_token_give_locked (c);
    if (r == -1)
      errno = EIO;
    return r;
  }
  v = c->pub;
  v.in_use = true;
  pthread_mutex_unlock (&c->lock);
  r = cbt_write_super (c, &v, true);
  pthread_mutex_lock (&c->lock);
  cbt_token_give_locked (c);
  if (r == -1)
    errno = EIO;
  return r;
}

/* ---- Directories, indexes, tables ---------------------------------- */

int
cbt_write_zeros (struct cbt *c, uint32_t blk, uint32_t nb)
{
  uint64_t off = blk_off (blk), len = (uint64_t) nb << BLOCK_SHIFT;

  while (len > 0) {
    size_t n = len < sizeof zeros ? (size_t) len : sizeof zeros;
    if (cbt_pwrite_full (c->fd, zeros, n, off) == -1)
      return -1;
    off += n;
    len -= n;
  }
  return 0;
}

int
cbt_write_dir (struct cbt *c, const struct mrec *m, uint32_t dir)
{
  uint8_t *buf;
  uint64_t total = (uint64_t) c->dir_blocks << BLOCK_SHIFT;
  int r = 0;

  buf = malloc (65536);
  if (buf == NULL)
    return -1;
  for (uint64_t pos = 0; r == 0 && pos < total; pos += 65536) {
    size_t n = total - pos < 65536 ? (size_t) (total - pos) : 65536;

    memset (buf, 0, n);
    for (size_t j = 0; j < n; j += DIR_SIZE) {
      uint64_t p = (pos + j) / DIR_SIZE;
      if (p < c->nr_pages && m->pg[p].blk) {
        put32 (buf + j + DIR_BLOCK, m->pg[p].blk);
        put32 (buf + j + DIR_CHECK, dir_check ((uint32_t) p, m->pg[p].blk));
      }
    }
    r = cbt_pwrite_full (c->fd, buf, n, blk_off (dir) + pos);
  }
  free (buf);
  return r;
}

int
cbt_write_index (struct cbt *c, struct frec *f)
{
  uint64_t bytes = (uint64_t) f->n * IDX_SIZE;
  uint32_t nb = blocks_for (bytes), blk, icrc = 0;
  uint64_t total = (uint64_t) nb << BLOCK_SHIFT;
  uint8_t *buf;
  int r = 0;

  f->idx_blk = f->idx_crc = 0;
  if (f->n == 0)
    return 0;
  buf = malloc (65536);
  if (buf == NULL)
    return -1;
  if (cbt_alloc (c, nb, &blk) == -1) {
    free (buf);
    return -1;
  }
  for (uint64_t pos = 0; r == 0 && pos < total; pos += 65536) {
    size_t n = total - pos < 65536 ? (size_t) (total - pos) : 65536;

    memset (buf, 0, n);
    for (size_t j = 0; j < n && pos + j < bytes; j += IDX_SIZE) {
      const struct fent *e = &f->e[(pos + j) / IDX_SIZE];
      put32 (buf + j + IDX_PAGE, e->page);
      put32 (buf + j + IDX_CRC, e->crc);
      put64 (buf + j + IDX_OFF, blk_off (e->blk));
    }
    icrc = crc (icrc, buf, pos + n <= bytes ? n : (size_t) (bytes - pos));
    r = cbt_pwrite_full (c->fd, buf, n, blk_off (blk) + pos);
  }
  free (buf);
  if (r == -1) {
    int e = errno;
    cbt_release (c, blk, nb);
    errno = e;
    return -1;
  }
  f->idx_blk = blk;
  f->idx_crc = icrc;
  return 0;
}

int
cbt_write_table (struct cbt *c, struct state *s)
{
  uint32_t size = (uint32_t) (s->n * ENTRY_SIZE);
  uint32_t nb = blocks_for (size), blk;
  uint8_t *buf;
  int r;

  s->table_blk = s->table_size = s->table_crc = 0;
  if (s->n == 0)
    return 0;
  buf = calloc (nb, BLOCK);
  if (buf == NULL)
    return -1;
  for (size_t i = 0; i < s->n; ++i) {
    const struct cpe *cp = &s->cps[i];
    const struct frec *f = cp->rec;
    uint8_t *e = buf + i * ENTRY_SIZE;

    memcpy (e + CP_NAME, cp->name, strlen (cp->name));
    put32 (e + CP_STATE, cp->state);
    put64 (e + CP_CREATED, cp->created);
    put64 (e + CP_SERIAL, cp->serial);
    if (f && f->n) {
      put64 (e + CP_IDX_OFF, blk_off (f->idx_blk));
      put32 (e + CP_IDX_CRC, f->idx_crc);
      put32 (e + CP_IDX_COUNT, (uint32_t) f->n);
    }
  }
  if (cbt_alloc (c, nb, &blk) == -1) {
    free (buf);
    return -1;
  }
  r = cbt_pwrite_full (c->fd, buf, (size_t) nb << BLOCK_SHIFT, blk_off (blk));
  if (r == -1) {
    int e = errno;
    cbt_release (c, blk, nb);
    free (buf);
    errno = e;
    return -1;
  }
  s->table_blk = blk;
  s->table_size = size;
  s->table_crc = crc (0, buf, size);
  free (buf);
  return 0;
}

struct sbv
cbt_state_sbv (const struct cbt *c, const struct state *s, uint32_t cur_crc)
{
  struct sbv v = {
    .n = (uint32_t) s->n,
    .table_blk = s->table_blk, .table_size = s->table_size,
    .table_crc = s->table_crc,
    .cur_dir = s->cur[s->ncur - 1]->dir, .next_dir = s->next_dir,
    .cur_crc = cur_crc, .next_serial = s->next_serial,
  };
  (void) c;
  return v;
}
