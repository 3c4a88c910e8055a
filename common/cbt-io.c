/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): the file's I/O.  Reading and writing whole, the
 * superblocks, and writing a whole new state.
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
 * The other parts: cbt-load.c (opening, validating, closing), cbt.c
 * (marking, durability, commit, queries), cbt-checkpoints.c.
 *
 * Pure C: no nbdkit headers.
 */


#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cbt-internal.h"
#include "rounding.h"

const char cbt_magic[8] = { 'S', 'B', 'K', 'C', 'B', 'T', '\r', '\n' };

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
    p += r; len -= (size_t) r; off += (uint64_t) r;
  }
  return 0;
}

/* OR bytes [POS, POS+LEN) of the frozen bitmaps of checkpoints
 * [LO, HI) into BUF, reading through TMP (CHUNK bytes).
 */
int
cbt_or_frozen (struct cbt *c, size_t lo, size_t hi, uint64_t pos,
               uint8_t *buf, size_t len, uint8_t *tmp)
{
  for (size_t i = lo; i < hi; ++i) {
    if (cbt_pread_full (c->fd, tmp, len, c->cps[i].off + pos) == -1)
      return -1;
    for (size_t j = 0; j < len; ++j)
      buf[j] |= tmp[j];
  }
  return 0;
}

/* ---- Superblock ---------------------------------------------------- */

/* Write the other slot with seq + 1 and sync.  Called with the lock
 * held or as the io_busy owner.  Failure is sticky.
 */
int
cbt_write_super (struct cbt *c, const struct sbvals *v)
{
  uint8_t sb[SB_SIZE];
  size_t idlen = strlen (c->identity);
  int slot = 1 - c->active;

  memset (sb, 0, sizeof sb);
  memcpy (sb + SB_MAGIC, cbt_magic, sizeof cbt_magic);
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

  if (cbt_pwrite_full (c->fd, sb, sizeof sb, (uint64_t) slot * SB_SIZE) == -1 ||
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
struct sbvals
cbt_current_vals (const struct cbt *c, bool in_use, uint32_t cur_crc)
{
  struct sbvals v = {
    .table_off = c->table_off, .table_size = c->table_size,
    .table_crc = c->table_crc, .cur_off = c->cur_off, .cur_crc = cur_crc,
    .nr = (uint32_t) c->n, .in_use = in_use,
  };
  return v;
}

/* ---- Writing a whole new state ------------------------------------- */

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
int
cbt_write_state (struct cbt *c, const struct newcp *nc, size_t nn,
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
    cbt_seterr (err, errlen, "cbt: out of memory");
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
        if (cbt_or_frozen (c, nc[i].lo, nc[i].hi, pos, buf, len, tmp) == -1) {
          cbt_seterr (err, errlen, "cbt: reading a checkpoint bitmap: %m");
          goto fail;
        }
        if (nc[i].mem)
          for (size_t j = 0; j < len; ++j)
            buf[j] |= c->cur[pos + j];
      }
      else if (!zero_current)
        memcpy (buf, c->cur + pos, len);
      bcrc = crc (bcrc, buf, len);
      if (cbt_pwrite_full (c->fd, buf, len, off + pos) == -1) {
        cbt_seterr (err, errlen, "cbt: writing a bitmap: %m");
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
      if (cbt_pwrite_full (c->fd, buf, len, cur_off + pos) == -1) {
        cbt_seterr (err, errlen, "cbt: writing the current bitmap: %m");
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
      cbt_pwrite_full (c->fd, table, nn * ENTRY_SIZE, start) == -1) {
    cbt_seterr (err, errlen, "cbt: writing the checkpoint table: %m");
    goto fail;
  }
  if (fdatasync (c->fd) == -1) {
    c->io_error = errno ? errno : EIO;
    cbt_seterr (err, errlen, "cbt: syncing the file: %m");
    goto fail;
  }

  v.table_off = nn ? start : 0;
  v.table_size = (uint32_t) (nn * ENTRY_SIZE);
  v.table_crc = nn ? table_crc : 0;
  v.cur_off = cur_off;
  v.cur_crc = cur_crc;
  v.nr = (uint32_t) nn;
  v.in_use = c->in_use_on_disk;
  if (cbt_write_super (c, &v) == -1) {
    cbt_seterr (err, errlen, "cbt: writing the superblock: %m");
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
void
cbt_same_state (const struct cbt *c, struct newcp *nc)
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
int
cbt_delete_cp (struct cbt *c, size_t k, char *err, size_t errlen)
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
      if (cbt_or_frozen (c, k - 1, k, pos, c->cur + pos, chunk_len (c, pos),
                         tmp) == -1) {
        cbt_seterr (err, errlen, "cbt: reading checkpoint '%s': %m",
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
  cbt_same_state (c, nc);
  if (k > 0 && k + 1 < c->n)
    nc[k - 1].hi = k + 1;
  for (size_t i = 0; i < c->n; ++i)
    if (i != k)
      nc[nn++] = nc[i];
  return cbt_write_state (c, nc, nn, false, err, errlen);
}
