/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): opening a cbt file, creating a new one or loading
 * and validating an existing one (superblock slots, the checkpoint
 * table, the record indexes and pages, the directories), what a file
 * left in use keeps, converting version 1 files (read in cbt-v1.c),
 * closing, and the accessors.
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
#include <unistd.h>

#include "cbt-private.h"
#include "ispowerof2.h"
#include "rounding.h"

/* ---- Messages ------------------------------------------------------- */

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

/* ---- Opening ------------------------------------------------------- */

static struct cbt *
alloc_cbt (int fd, const struct cbt_options *opts)
{
  struct cbt *c = calloc (1, sizeof *c);

  if (c == NULL)
    return NULL;
  pthread_mutex_init (&c->lock, NULL);
  pthread_cond_init (&c->cond, NULL);
  pthread_cond_init (&c->pcond, NULL);
  pthread_mutex_init (&c->struct_lock, NULL);
  pthread_mutex_init (&c->alloc_lock, NULL);
  c->fd = fd;
  c->read_only = opts->read_only;
  c->mode = opts->mode;
  c->active = c->synced_slot = 1;       /* the first write: slot 0 */
  if (opts->identity)
    strcpy (c->identity, opts->identity);
  if (opts->boot_id)
    strcpy (c->boot_id, opts->boot_id);
  return c;
}

static void
free_cbt (struct cbt *c)
{
  if (c == NULL)
    return;
  if (c->refs)
    cbt_state_unref (c, c->st);
  if (c->fd >= 0)
    close (c->fd);
  free (c->refs);
  pthread_cond_destroy (&c->cond);
  pthread_cond_destroy (&c->pcond);
  pthread_mutex_destroy (&c->lock);
  pthread_mutex_destroy (&c->struct_lock);
  pthread_mutex_destroy (&c->alloc_lock);
  free (c);
}

/* Check cbt_magic, crc of one slot.  WHY says what is wrong. */
static bool
slot_ok (const uint8_t *sb, char *why, size_t whylen)
{
  if (memcmp (sb + SB_MAGIC, cbt_magic, sizeof cbt_magic) != 0) {
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

/* Is [OFF, OFF+LEN) aligned, in the data area and inside the file? */
static bool
region_ok (uint64_t off, uint64_t len, uint64_t file_size)
{
  return off >= DATA_START && is_aligned (off, ALIGN) &&
    off <= file_size && len <= file_size - off &&
    (off >> BLOCK_SHIFT) < UINT32_MAX / 2;
}

/* Check the version 2 superblock fields that come before the state. */
static int
check_header (struct cbt *c, const uint8_t *sb, const struct cbt_options *o,
              char *err, size_t errlen)
{
  uint32_t nr = get32 (sb + SB_NR_CPS);
  uint32_t mode = get32 (sb + SB_MODE);
  uint32_t bootlen = get32 (sb + SB_BOOT_LEN);
  uint64_t next_serial = get64 (sb + SB_NEXT_SERIAL);
  bool in_use = get64 (sb + SB_INCOMPAT) & INCOMPAT_IN_USE;

  /* Up to the identity the fields are version 1's. */
  if (cbt_check_header_v1 (c, sb, o, false, err, errlen) == -1)
    return -1;
  if (get32 (sb + SB_DIR_SIZE) != c->dir_bytes)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: directory size: %" PRIu32 " bytes, expected %"
                        PRIu32 " for %" PRIu32 " pages", get32 (sb + SB_DIR_SIZE),
                        c->dir_bytes, c->nr_pages);
  if (mode > CBT_MODE_PROCESS_SAFE)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: mode: %" PRIu32 " (expected 0 in-use, 1 "
                        "write-ahead or 2 process-safe)", mode);
  if (bootlen > CBT_BOOT_ID_MAX ||
      !printable ((const char *) sb + SB_BOOT_ID, bootlen, false) ||
      !all_zero (sb + SB_BOOT_ID + bootlen, 64 - bootlen))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: boot id: length %" PRIu32 " is not that of "
                        "at most %d printable characters followed by zeros", bootlen,
                        CBT_BOOT_ID_MAX);
  if (next_serial == 0 || next_serial > (UINT64_C (1) << 62))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: next serial: %" PRIu64 " is not in [1, 2^62]",
                        next_serial);
  if (!all_zero (sb + SB_RESERVED, SB_CRC - SB_RESERVED))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: reserved bytes: not zero in the superblock");
  if (nr > CBT_MAX_CHECKPOINTS)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: number of checkpoints: %" PRIu32
                        " exceeds the limit %d", nr, CBT_MAX_CHECKPOINTS);
  if (in_use && get32 (sb + SB_CUR_CRC) != 0)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: current record crc: 0x%08" PRIx32 " while in "
                        "use, expected 0", get32 (sb + SB_CUR_CRC));
  c->compat_other = get64 (sb + SB_COMPAT) & ~(uint64_t) COMPAT_KNOWN;
  return 0;
}

/* Check the offsets and sizes of the version 2 superblock against the
 * file (only when its state is read).
 */
static int
check_regions (struct cbt *c, const uint8_t *sb, uint64_t file_size,
               char *err, size_t errlen)
{
  uint32_t nr = get32 (sb + SB_NR_CPS);
  uint64_t table_off = get64 (sb + SB_TABLE_OFF);
  uint32_t table_size = get32 (sb + SB_TABLE_SIZE);
  uint64_t cur_off = get64 (sb + SB_CUR_OFF);
  uint64_t next_off = get64 (sb + SB_NEXT_OFF);

  if (table_size != (uint64_t) nr * ENTRY_SIZE)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: table size: %" PRIu32 " bytes, expected %"
                        PRIu32 " for %" PRIu32 " checkpoints", table_size,
                        nr * ENTRY_SIZE, nr);
  if (nr == 0 && (table_off != 0 || get32 (sb + SB_TABLE_CRC) != 0))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: table offset: %" PRIu64 " (crc 0x%08" PRIx32
                        ") with no checkpoints, expected 0", table_off,
                        get32 (sb + SB_TABLE_CRC));
  if (nr > 0 && !region_ok (table_off, table_size, file_size))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: table offset: %" PRIu64 " (+%" PRIu32
                        " bytes) is unaligned or outside the data area of the %"
                        PRIu64 " byte file", table_off, table_size, file_size);
  if (!region_ok (cur_off, c->dir_bytes, file_size))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: current directory offset: %" PRIu64 " (+%"
                        PRIu32 " bytes) is unaligned or outside the data area of "
                        "the %" PRIu64 " byte file", cur_off, c->dir_bytes, file_size);
  if (!region_ok (next_off, c->dir_bytes, file_size))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: next directory offset: %" PRIu64 " (+%"
                        PRIu32 " bytes) is unaligned or outside the data area of "
                        "the %" PRIu64 " byte file", next_off, c->dir_bytes, file_size);
  return 0;
}


/* Hold blocks found in the file for the load (LEGACY); -1 if one is
 * held already: an overlap.
 */
static int
hold_found (struct cbt *c, struct cbt_legacy *l, uint64_t off, uint64_t len)
{
  uint32_t b = (uint32_t) (off >> BLOCK_SHIFT), nb = blocks_for (len);

  if (nb == 0)
    return 0;
  if (cbt_hold_new (c, b, nb) == -1)
    return -1;
  if (cbt_legacy_add (l, b, nb) == -1) {
    cbt_release (c, b, nb);
    return -1;
  }
  return 0;
}

/* Read a frozen record's index and check it and its pages. */
static int
load_record (struct cbt *c, uint32_t i, const char *name, uint64_t off,
             uint32_t count, uint32_t icrc, uint64_t file_size,
             struct cbt_legacy *l, struct frec **fp, char *err, size_t errlen)
{
  uint64_t bytes = (uint64_t) count * IDX_SIZE;
  uint8_t *idx = NULL, *page = NULL;
  struct frec *f = NULL;
  int r = -1;

  *fp = NULL;
  f = cbt_frec_new (count);
  if (f == NULL)
    {
      cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
      goto out;
    }
  if (count == 0) {
    *fp = f;
    return 0;
  }
  idx = malloc (bytes);
  page = malloc (PAGE);
  if (idx == NULL || page == NULL)
    {
      cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
      goto out;
    }
  if (cbt_pread_full (c->fd, idx, bytes, off) == -1)
    {
      cbt_failure (err, errlen, EIO,
                   "cbt: reading %s: %s", "a record index", strerror (errno));
      goto out;
    }
  if (crc (0, idx, bytes) != icrc)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: checkpoint %" PRIu32 " '%s' index crc: 0x%08" PRIx32 " in "
                   "the table, the index has 0x%08" PRIx32, i, name, icrc,
                   crc (0, idx, bytes));
      goto out;
    }
  for (uint32_t j = 0; j < count; ++j) {
    const uint8_t *e = idx + (size_t) j * IDX_SIZE;
    uint32_t p = get32 (e + IDX_PAGE);
    uint64_t poff = get64 (e + IDX_OFF);

    if (p >= c->nr_pages || (j > 0 && p <= f->e[j - 1].page))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index entry %" PRIu32
                     " page: %" PRIu32 " (pages must increase, below %" PRIu32 ")",
                     i, name, j, p, c->nr_pages);
        goto out;
      }
    if (!region_ok (poff, page_len (c, p), file_size))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index entry %" PRIu32
                     " offset: %" PRIu64 " is unaligned or outside the data area of "
                     "the %" PRIu64 " byte file", i, name, j, poff, file_size);
        goto out;
      }
    if (hold_found (c, l, poff, page_len (c, p)) == -1)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index entry %" PRIu32
                     " offset: %" PRIu64 " overlaps another structure of the file",
                     i, name, j, poff);
        goto out;
      }
    f->e[j].page = p;
    f->e[j].crc = get32 (e + IDX_CRC);
    f->e[j].blk = (uint32_t) (poff >> BLOCK_SHIFT);
    cbt_hold (c, f->e[j].blk, 1);
    f->n++;
    if (cbt_pread_full (c->fd, page, page_len (c, p), poff) == -1)
      {
        cbt_failure (err, errlen, EIO,
                     "cbt: reading %s: %s", "a record page", strerror (errno));
        goto out;
      }
    if (crc (0, page, page_len (c, p)) != f->e[j].crc)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' page %" PRIu32 " crc: 0x%08"
                     PRIx32 " in the index, the page has 0x%08" PRIx32, i, name, p,
                     f->e[j].crc, crc (0, page, page_len (c, p)));
        goto out;
      }
    if (page_tail_bad (c, p, page))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' page %" PRIu32 ": bits set "
                     "beyond the end of the disk", i, name, p);
        goto out;
      }
  }
  /* Held by the index of F from now on (the load holds it once more). */
  cbt_hold (c, (uint32_t) (off >> BLOCK_SHIFT), blocks_for (bytes));
  f->idx_blk = (uint32_t) (off >> BLOCK_SHIFT);
  f->idx_crc = icrc;
  *fp = f;
  f = NULL;
  r = 0;
 out:
  cbt_frec_unref (c, f);
  free (idx);
  free (page);
  return r;
}

/* Read directory DIR (its entries into *ENT: nr_pages block numbers, 0
 * for none) and hold the pages it names.  In use, an entry whose check
 * fails or that points outside the file was being written when the
 * machine stopped (its write was never synced, so no change relied on
 * it): it counts as absent (*TORN).  Clean, it refuses the file.
 */
static int
load_dir (struct cbt *c, const char *what, uint64_t off, bool in_use,
          bool must_be_empty, uint64_t file_size, struct cbt_legacy *l,
          uint32_t **ent, uint8_t **raw, unsigned *torn,
          char *err, size_t errlen)
{
  uint8_t *d = malloc (c->dir_bytes ? c->dir_bytes : 1);
  uint32_t *e = calloc (c->nr_pages ? c->nr_pages : 1, sizeof *e);
  int r = -1;

  if (d == NULL || e == NULL)
    {
      cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
      goto out;
    }
  if (cbt_pread_full (c->fd, d, c->dir_bytes, off) == -1)
    {
      cbt_failure (err, errlen, EIO,
                   "cbt: reading %s: %s", what, strerror (errno));
      goto out;
    }
  for (uint32_t p = 0; p < c->nr_pages; ++p) {
    const uint8_t *x = d + (size_t) p * DIR_SIZE;
    uint32_t blk = get32 (x + DIR_BLOCK), chk = get32 (x + DIR_CHECK);
    bool ok;

    if (blk == 0 && chk == 0)
      continue;
    if (must_be_empty && !in_use)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: %s entry %" PRIu32 ": not empty in a file that was "
                     "closed cleanly", what, p);
        goto out;
      }
    ok = chk == dir_check (p, blk) && blk >= 2 &&
      region_ok (blk_off (blk), page_len (c, p), file_size);
    if (!ok && in_use) {
      (*torn)++;
      continue;
    }
    if (!ok)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: %s entry %" PRIu32 ": block %" PRIu32 " (check 0x%08"
                     PRIx32 ") is not a valid block of the %" PRIu64 " byte file",
                     what, p, blk, chk, file_size);
        goto out;
      }
    if (hold_found (c, l, blk_off (blk), page_len (c, p)) == -1)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: %s entry %" PRIu32 ": block %" PRIu32 " overlaps "
                     "another structure of the file", what, p, blk);
        goto out;
      }
    e[p] = blk;
  }
  *ent = e;
  e = NULL;
  if (raw) {
    *raw = d;
    d = NULL;
  }
  r = 0;
 out:
  free (d);
  free (e);
  return r;
}

/* Load the state the version 2 superblock SB names.  KEEP: the current
 * record is wanted (else only checked for structure).  Fills c->st and
 * c->pub; the blocks of the file's state are held in L.
 */
static int
load_state (struct cbt *c, const uint8_t *sb, uint64_t file_size,
            bool keep, struct cbt_legacy *l, unsigned *torn,
            char *err, size_t errlen)
{
  uint32_t nr = get32 (sb + SB_NR_CPS);
  uint64_t table_off = get64 (sb + SB_TABLE_OFF);
  uint32_t table_size = get32 (sb + SB_TABLE_SIZE);
  uint32_t table_crc = get32 (sb + SB_TABLE_CRC);
  uint64_t cur_off = get64 (sb + SB_CUR_OFF);
  uint64_t next_off = get64 (sb + SB_NEXT_OFF);
  uint64_t next_serial = get64 (sb + SB_NEXT_SERIAL);
  bool in_use = get64 (sb + SB_INCOMPAT) & INCOMPAT_IN_USE;
  uint8_t *table = NULL, *draw = NULL, *page = NULL;
  uint32_t *dent = NULL, *nent = NULL;
  struct state *st = cbt_state_new ();
  struct mrec *m = NULL;
  int r = -1;

  page = malloc (PAGE);
  table = malloc (table_size ? table_size : 1);
  if (st == NULL || table == NULL || page == NULL)
    {
      cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
      goto out;
    }
  if (nr > 0 && hold_found (c, l, table_off, table_size) == -1)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: table offset: %" PRIu64 " overlaps another structure",
                   table_off);
      goto out;
    }
  if (hold_found (c, l, cur_off, c->dir_bytes) == -1)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: current directory offset: %" PRIu64 " overlaps another "
                   "structure", cur_off);
      goto out;
    }
  if (hold_found (c, l, next_off, c->dir_bytes) == -1)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: next directory offset: %" PRIu64 " overlaps another "
                   "structure", next_off);
      goto out;
    }
  if (nr > 0 && cbt_pread_full (c->fd, table, table_size, table_off) == -1)
    {
      cbt_failure (err, errlen, EIO,
                   "cbt: reading %s: %s", "the table", strerror (errno));
      goto out;
    }
  if (crc (0, table, table_size) != table_crc)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: table crc: 0x%08" PRIx32 " in the superblock, the table "
                   "has 0x%08" PRIx32, table_crc, crc (0, table, table_size));
      goto out;
    }

  for (uint32_t i = 0; i < nr; ++i) {
    const uint8_t *e = table + (size_t) i * ENTRY_SIZE;
    struct cpe *cp = &st->cps[i];
    bool last = i + 1 == nr;
    uint64_t ioff = get64 (e + CP_IDX_OFF);
    uint32_t icrc = get32 (e + CP_IDX_CRC), count = get32 (e + CP_IDX_COUNT);

    if (cbt_load_entry_head (st, i, nr, e, err, errlen) == -1)
      goto out;
    if (!all_zero (e + CP_RESERVED, ENTRY_SIZE - CP_RESERVED))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' reserved bytes: not zero",
                     i, cp->name);
        goto out;
      }
    cp->serial = get64 (e + CP_SERIAL);
    if (cp->serial == 0 || cp->serial >= next_serial ||
        (i > 0 && cp->serial <= st->cps[i - 1].serial))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' serial: %" PRIu64 " (serials "
                     "increase in the table, from 1, below the next serial %" PRIu64
                     ")", i, cp->name, cp->serial, next_serial);
        goto out;
      }
    cp->created = get64 (e + CP_CREATED);
    if ((last || count == 0) && (ioff != 0 || icrc != 0 || count != 0))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index offset: %" PRIu64
                     " (crc 0x%08" PRIx32 ", %" PRIu32 " pages), expected 0 for %s",
                     i, cp->name, ioff, icrc, count, last ? "the last checkpoint "
                     "(its record is the current one)" : "an empty record");
        goto out;
      }
    if (last)
      continue;
    if (count > c->nr_pages)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index count: %" PRIu32
                     " pages, the bitmap has %" PRIu32, i, cp->name, count,
                     c->nr_pages);
        goto out;
      }
    if (count > 0 &&
        !region_ok (ioff, (uint64_t) count * IDX_SIZE, file_size))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index offset: %" PRIu64
                     " (+%" PRIu64 " bytes) is unaligned or outside the data area of "
                     "the %" PRIu64 " byte file", i, cp->name, ioff,
                     (uint64_t) count * IDX_SIZE, file_size);
        goto out;
      }
    if (count > 0 &&
        hold_found (c, l, ioff, (uint64_t) count * IDX_SIZE) == -1)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' index offset: %" PRIu64
                     " overlaps another structure", i, cp->name, ioff);
        goto out;
      }
    st->n = i + 1;              /* from here on its record is released */
    if (load_record (c, i, cp->name, ioff, count, icrc, file_size, l,
                     &cp->rec, err, errlen) == -1)
      goto out;
  }
  st->n = nr;

  /* The current record: its directory and the next one. */
  if (load_dir (c, "current directory", cur_off, in_use, false, file_size,
                l, &dent, &draw, torn, err, errlen) == -1 ||
      load_dir (c, "next directory", next_off, in_use, true, file_size,
                l, &nent, NULL, torn, err, errlen) == -1)
    goto out;
  m = cbt_mrec_new (c, (uint32_t) (cur_off >> BLOCK_SHIFT));
  if (m == NULL)
    {
      cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
      goto out;
    }
  cbt_hold (c, m->dir, c->dir_blocks);
  st->cur[0] = m;
  st->ncur = 1;
  st->next_dir = (uint32_t) (next_off >> BLOCK_SHIFT);
  cbt_hold (c, st->next_dir, c->dir_blocks);
  if (nr > 0) {
    st->table_blk = (uint32_t) (table_off >> BLOCK_SHIFT);
    st->table_size = table_size;
    st->table_crc = table_crc;
    cbt_hold (c, st->table_blk, blocks_for (table_size));
  }
  st->next_serial = next_serial;

  if (keep) {
    uint32_t ccrc = crc (0, draw, c->dir_bytes);

    for (uint32_t p = 0; p < c->nr_pages; ++p) {
      struct pgent *pg = &m->pg[p];
      size_t len = page_len (c, p);

      if (dent[p] == 0 && nent[p] == 0)
        continue;
      if (cbt_page_get (c, m, p) == NULL)
        {
          cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
          goto out;
        }
      if (dent[p]) {
        if (cbt_read_page (c, dent[p], p, pg->mem, false, 0,
                           err, errlen) == -1)
          goto out;
        ccrc = crc (ccrc, pg->mem, len);
        pg->blk = dent[p];
      }
      if (nent[p]) {
        /* Marks made while a checkpoint was being written (only in
         * use): set in the record.
         */
        if (cbt_read_page (c, nent[p], p, page, false, 0, err, errlen) == -1)
          goto out;
        if (pg->blk == 0) {
          memcpy (pg->mem, page, len);
          pg->blk = nent[p];
        }
        else {
          for (size_t j = 0; j < len; ++j)
            if (page[j] & ~pg->mem[j]) {
              pg->mem[j] |= page[j];
              pg->dirty = true;
            }
        }
      }
      cbt_hold (c, pg->blk, 1);
      if (page_tail_bad (c, p, pg->mem)) {
        if (!in_use)
          {
            cbt_failure (err, errlen, EINVAL,
                         "cbt: current record page %" PRIu32 ": bits set beyond the "
                         "end of the disk", p);
            goto out;
          }
        pg->mem[len - 1] &= (uint8_t) ~tail_mask (c);
        pg->dirty = true;       /* (garbage of a write never synced) */
      }
      if (pg->dirty)
        m->dirty[m->ndirty++] = p;
    }
    if (!in_use && ccrc != get32 (sb + SB_CUR_CRC))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: current record crc: 0x%08" PRIx32 " in the superblock, the "
                     "record has 0x%08" PRIx32, get32 (sb + SB_CUR_CRC), ccrc);
        goto out;
      }
  }

  c->pub.in_use = in_use;
  c->pub.n = nr;
  c->pub.table_blk = st->table_blk;
  c->pub.table_size = st->table_size;
  c->pub.table_crc = st->table_crc;
  c->pub.cur_dir = m->dir;
  c->pub.next_dir = st->next_dir;
  c->pub.cur_crc = in_use ? 0 : get32 (sb + SB_CUR_CRC);
  c->pub.next_serial = next_serial;
  c->st = st;
  st = NULL;
  r = 0;
 out:
  cbt_state_unref (c, st);
  free (table);
  free (draw);
  free (page);
  free (dent);
  free (nent);
  return r;
}
#undef BAD
#undef NOMEM
#undef RDERR

/* ---- New states ----------------------------------------------------- */

/* Load time: set the bits of frozen record F in current record M. */
static int
or_into (struct cbt *c, struct mrec *m, const struct frec *f,
         char *err, size_t errlen)
{
  uint8_t *buf = malloc (PAGE);

  if (buf == NULL)
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  for (size_t i = 0; i < f->n; ++i) {
    uint32_t p = f->e[i].page;
    uint8_t *mem;

    if (cbt_read_page (c, f->e[i].blk, p, buf, true, f->e[i].crc,
                       err, errlen) == -1) {
      free (buf);
      return -1;
    }
    mem = cbt_page_get (c, m, p);
    if (mem == NULL) {
      free (buf);
      return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
    }
    for (size_t j = 0; j < page_len (c, p); ++j)
      if (buf[j] & ~mem[j]) {
        mem[j] |= buf[j];
        if (!m->pg[p].dirty) {
          m->pg[p].dirty = true;
          m->dirty[m->ndirty++] = p;
        }
      }
  }
  free (buf);
  return 0;
}

/* Load time: publish the state in memory clean, writing nothing the
 * file's state holds (it stays whole until the new superblock is
 * synced): the changed pages to new blocks, a new current directory, a
 * new (empty) next directory, the indexes of records that have none (a
 * version 1 file), a new table (with NEW_TABLE) or the same.
 */
static int
publish_clean (struct cbt *c, bool new_table, char *err, size_t errlen)
{
  struct state *s = c->st, *ns;
  struct mrec *m = s->cur[0];
  uint32_t dir, next, old_dir = m->dir;
  struct sbv v;
  int e;

  if (cbt_alloc (c, c->dir_blocks, &dir) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: allocating a directory: %s", strerror (errno));
  m->dir = dir;
  if (old_dir)
    cbt_release (c, old_dir, c->dir_blocks);    /* the load holds it */
  for (size_t i = 0; i < m->ndirty; ++i) {
    struct pgent *pg = &m->pg[m->dirty[i]];
    if (pg->blk) {
      cbt_release (c, pg->blk, 1);
      pg->blk = 0;
    }
  }
  cbt_token_take (c);
  e = cbt_write_dirty (c, &m, 1) == -1 ? errno : 0;
  cbt_token_give (c);
  if (e)
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the current record: %s", strerror (e));
  if (cbt_write_dir (c, m, dir) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the current directory: %s",
                        strerror (errno));
  for (size_t i = 0; i + 1 < s->n; ++i)
    if (s->cps[i].rec->idx_blk == 0 && s->cps[i].rec->n > 0 &&
        cbt_write_index (c, s->cps[i].rec) == -1)
      return cbt_failure (err, errlen, EIO,
                          "cbt: writing a record index: %s", strerror (errno));
  if (cbt_alloc (c, c->dir_blocks, &next) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: allocating a directory: %s", strerror (errno));
  if (cbt_write_zeros (c, next, c->dir_blocks) == -1) {
    e = errno;
    cbt_release (c, next, c->dir_blocks);
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the next directory: %s", strerror (e));
  }
  ns = cbt_state_copy (s);
  if (ns == NULL) {
    cbt_release (c, next, c->dir_blocks);
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  }
  ns->next_dir = next;
  if (!new_table && s->table_blk) {
    ns->table_blk = s->table_blk;
    ns->table_size = s->table_size;
    ns->table_crc = s->table_crc;
    cbt_hold (c, s->table_blk, blocks_for (s->table_size));
  }
  else if (cbt_write_table (c, ns) == -1) {
    e = errno;
    cbt_state_unref (c, ns);
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the checkpoint table: %s", strerror (e));
  }
  v = cbt_state_sbv (c, ns, cbt_mrec_crc (c, m));
  c->pub.in_use = false;
  return cbt_publish (c, ns, &v, err, errlen);
}

/* A state with no checkpoint and an empty current record, published
 * (in memory only when read-only).
 */
static int
fresh_state (struct cbt *c, uint64_t next_serial, char *err, size_t errlen)
{
  struct state *s = cbt_state_new ();
  uint32_t dir = 0, next = 0;
  struct sbv v;

  if (s == NULL)
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  s->next_serial = next_serial;
  if (!c->read_only &&
      (cbt_alloc (c, c->dir_blocks, &dir) == -1 ||
       cbt_write_zeros (c, dir, c->dir_blocks) == -1 ||
       cbt_alloc (c, c->dir_blocks, &next) == -1 ||
       cbt_write_zeros (c, next, c->dir_blocks) == -1)) {
    int e = errno;
    if (dir)
      cbt_release (c, dir, c->dir_blocks);
    if (next)
      cbt_release (c, next, c->dir_blocks);
    cbt_state_unref (c, s);
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing a directory: %s", strerror (e));
  }
  s->cur[0] = cbt_mrec_new (c, dir);
  if (s->cur[0] == NULL) {
    if (dir)
      cbt_release (c, dir, c->dir_blocks);
    if (next)
      cbt_release (c, next, c->dir_blocks);
    cbt_state_unref (c, s);
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  }
  s->ncur = 1;
  s->next_dir = next;
  if (c->read_only) {
    cbt_state_unref (c, c->st);
    c->st = s;
    c->pub.in_use = false;
    return 0;
  }
  v = cbt_state_sbv (c, s, c->empty_crc);
  c->pub.in_use = false;
  return cbt_publish (c, s, &v, err, errlen);
}

static int
create_new (struct cbt *c, const struct cbt_options *o,
            char *err, size_t errlen)
{
  uint32_t g = o->granularity ? o->granularity : CBT_DEFAULT_GRANULARITY;

  if (o->read_only)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: the file is empty (and opened read-only)");
  if (o->disk_size == 0)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: a new file needs the disk size");
  if (!is_power_of_2 (g) || g < CBT_MIN_GRANULARITY ||
      g > CBT_MAX_GRANULARITY)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: granularity: %" PRIu32 " is not a power of 2 "
                        "in [%d, %u]", g, CBT_MIN_GRANULARITY, CBT_MAX_GRANULARITY);
  if (o->disk_size > INT64_MAX)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: disk size: %" PRIu64 " too large", o->disk_size);
  if (ftruncate (c->fd, 0) == -1 || ftruncate (c->fd, DATA_START) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: truncating the file: %s", strerror (errno));
  if (cbt_set_geometry (c, o->disk_size, log_2_bits (g), err, errlen) == -1)
    return -1;
  if (cbt_blocks_init (c, 0) == -1)
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  /* The magic first, synced: a power loss while the first superblock is
   * written may tear it, but leaves the magic in its first sector (the
   * same bytes): the file is recognised as one whose creation was
   * interrupted (interrupted_creation), never refused as another's.
   */
  if (cbt_pwrite_full (c->fd, cbt_magic, sizeof cbt_magic, 0) == -1 ||
      fdatasync (c->fd) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the file: %s", strerror (errno));
  return fresh_state (c, 1, err, errlen);
}

/* The longest file an interrupted creation can leave for a disk of
 * DISK_SIZE bytes at granularity G: version 2 writes two directories
 * before its first superblock, version 1 wrote one bitmap.
 */
static uint64_t
creation_limit (uint64_t disk_size, uint32_t g)
{
  uint64_t bm = div_round_up (div_round_up (disk_size, g), 8);
  uint64_t dirs = 2 * round_up (div_round_up (bm, PAGE) * DIR_SIZE, ALIGN);
  uint64_t v1 = round_up (bm, ALIGN);

  return DATA_START + (dirs > v1 ? dirs : v1);
}

/* Is the file what an interrupted creation leaves?  create_new writes
 * the magic into slot 0 and the first state and syncs before it writes
 * the first superblock, so a kill in between leaves both slots and
 * everything else zero but for the magic (a power loss during that
 * superblock's write may leave part of it in slot 0, which then starts
 * with the magic but fails its crc), no longer than creation_limit (at the granularity asked for; when none
 * is, the file's is accepted, so at the smallest).  Such a file holds
 * nothing (no superblock was ever written): it is created afresh.  Only
 * a file that short is read, so that a large file given by mistake is
 * never scanned (nor truncated).  -1 on a read error.
 */
static int
interrupted_creation (struct cbt *c, const struct cbt_options *o,
                      const uint8_t sb[2][SB_SIZE], uint64_t file_size)
{
  uint32_t g = o->granularity ? o->granularity : CBT_MIN_GRANULARITY;
  uint8_t *buf;
  int r = 1;

  /* (The first superblock goes to slot 0: torn by a power loss, it
   * may hold part of itself, from the magic on.)
   */
  if ((!all_zero (sb[0], SB_SIZE) &&
       memcmp (sb[0] + SB_MAGIC, cbt_magic, sizeof cbt_magic) != 0) ||
      !all_zero (sb[1], SB_SIZE) || o->disk_size == 0 || o->disk_size > INT64_MAX || !is_power_of_2 (g) ||
      g < CBT_MIN_GRANULARITY || g > CBT_MAX_GRANULARITY)
    return 0;
  if (div_round_up (div_round_up (o->disk_size, g), 8) > CBT_MAX_BITMAP ||
      file_size > creation_limit (o->disk_size, g))
    return 0;
  buf = malloc (65536);
  if (buf == NULL)
    return -1;
  for (uint64_t pos = DATA_START; r == 1 && pos < file_size; pos += 65536) {
    size_t len = file_size - pos < 65536 ? file_size - pos : 65536;

    if (cbt_pread_full (c->fd, buf, len, pos) == -1)
      r = -1;
    else if (!all_zero (buf, len))
      r = 0;
  }
  free (buf);
  return r;
}

static int
load (struct cbt *c, const struct cbt_options *o, struct cbt_load_info *info,
      char *err, size_t errlen)
{
  struct cbt_legacy legacy = { 0 };
  struct stat st;
  uint8_t sb[2][SB_SIZE];
  char why[2][128];
  bool ok[2], in_use, wal = false, keep, v1;
  uint32_t version, wmode, nr;
  unsigned torn = 0;
  uint64_t file_size;
  int s, r = -1;

  if (fstat (c->fd, &st) == -1)
    return cbt_failure (err, errlen, EIO, "cbt: fstat: %s", strerror (errno));
  file_size = (uint64_t) st.st_size;
  if (file_size == 0 || o->reset) {
    if (!o->create && !o->reset)
      return cbt_failure (err, errlen, ENOENT,
                          "cbt: the file is empty (create it, or reset)");
    info->created = true;
    return create_new (c, o, err, errlen);
  }
  if (file_size < DATA_START) {
    /* The magic (or nothing: zeros, when the size reached the disk
     * and the data did not) of a creation the machine stopped before
     * the file's size was synced: created afresh like the longer ones.
     */
    uint8_t head[DATA_START];

    if (cbt_pread_full (c->fd, head, file_size, 0) == -1)
      return cbt_failure (err, errlen, EIO,
                          "cbt: reading the file: %s", strerror (errno));
    if (o->create && o->disk_size != 0 &&
        (all_zero (head, file_size) ||
         (file_size >= sizeof cbt_magic &&
          memcmp (head, cbt_magic, sizeof cbt_magic) == 0 &&
          all_zero (head + sizeof cbt_magic,
                    file_size - sizeof cbt_magic)))) {
      info->created = true;
      note (info, "cbt: the file held only the magic or zeros (its "
            "creation was interrupted): created afresh");
      return create_new (c, o, err, errlen);
    }
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: file size: %" PRIu64 " bytes, too short for "
                        "the two %d byte superblocks", file_size, SB_SIZE);
  }
  if (cbt_pread_full (c->fd, sb, sizeof sb, 0) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: reading the superblocks: %s", strerror (errno));
  for (s = 0; s < 2; ++s)
    ok[s] = slot_ok (sb[s], why[s], sizeof why[s]);
  if (!ok[0] && !ok[1]) {
    switch (interrupted_creation (c, o, (const uint8_t (*)[SB_SIZE]) sb,
                                  file_size)) {
    case -1:
      return cbt_failure (err, errlen, EIO,
                          "cbt: reading the file: %s", strerror (errno));
    case 1:
      if (!o->create)
        return cbt_failure (err, errlen, ENOENT,
                            "cbt: the file holds only zeros, no valid "
                            "superblock (create it, or reset)");
      info->created = true;
      note (info, "cbt: the file held only zeros, no valid superblock (its "
            "creation was interrupted): created afresh");
      return create_new (c, o, err, errlen);
    }
    if (memcmp (sb[0], cbt_magic, 8) != 0 && memcmp (sb[1], cbt_magic, 8) != 0)
      return cbt_failure (err, errlen, EINVAL,
                          "cbt: magic: neither superblock starts with the "
                          "cbt magic: not a cbt file (reset to start afresh)");
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: superblock: no valid copy (slot 0: %.100s; "
                        "slot 1: %.100s)", why[0], why[1]);
  }
  if (ok[0] && ok[1] && get64 (sb[0] + SB_SEQ) == get64 (sb[1] + SB_SEQ))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: sequence: both superblocks have %" PRIu64,
                        get64 (sb[0] + SB_SEQ));
  s = !ok[1] || (ok[0] && get64 (sb[0] + SB_SEQ) > get64 (sb[1] + SB_SEQ))
    ? 0 : 1;
  if (!ok[1 - s] && strcmp (why[1 - s], "empty") != 0) {
    info->fallback = true;
    note (info, "cbt: superblock slot %d is damaged (%.100s): using slot %d "
              "(sequence %" PRIu64 ")", 1 - s, why[1 - s], s,
              get64 (sb[s] + SB_SEQ));
  }
  c->active = c->synced_slot = s;
  c->seq = get64 (sb[s] + SB_SEQ);
  version = get32 (sb[s] + SB_VERSION);
  v1 = version == FORMAT_VERSION_1;
  if (version != FORMAT_VERSION && !v1)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: version: %" PRIu32 " is not supported "
                        "(this program reads versions 1 and 2)", version);
  if (v1 ? cbt_check_header_v1 (c, sb[s], o, true, err, errlen) == -1
      : check_header (c, sb[s], o, err, errlen) == -1)
    return -1;
  if (cbt_blocks_init (c, file_size) == -1)
    return cbt_failure (err, errlen, errno == EFBIG ? EINVAL : ENOMEM, "cbt: file size: %" PRIu64
              " bytes: %s", file_size, strerror (errno));
  in_use = get64 (sb[s] + SB_INCOMPAT) & INCOMPAT_IN_USE;
  nr = get32 (sb[s] + SB_NR_CPS);
  if (nr > CBT_MAX_CHECKPOINTS)
    nr = CBT_MAX_CHECKPOINTS;

  /* A damaged newest superblock: a torn write of it is harmless
   * (nothing was recorded on top of a state that was never published),
   * but damage after it was published may hide changes recorded since,
   * which the older state does not hold: never claim less changed than
   * did.  Nothing of the older state is read (its blocks may have been
   * reused since).
   */
  if (info->fallback) {
    /* (The damaged one may have named checkpoints the older one has
     * not: invalidated even when this one has none.)
     */
    info->invalidated = true;
    info->dropped = nr;
    note (info, "the previous state may miss changes recorded after the "
          "damaged one: all %" PRIu32 " checkpoints are invalid, and any "
          "the damaged one named, the next backup must be full", nr);
    return fresh_state (c, v1 ? 1 : get64 (sb[s] + SB_NEXT_SERIAL),
                        err, errlen);
  }

  /* What a file left in use keeps. */
  if (v1) {
    wmode = get64 (sb[s] + SB_COMPAT) & COMPAT1_WRITE_AHEAD
      ? CBT_MODE_WRITE_AHEAD : CBT_MODE_IN_USE;
  }
  else
    wmode = get32 (sb[s] + SB_MODE);
  keep = !in_use || wmode == CBT_MODE_WRITE_AHEAD;
  if (in_use && wmode == CBT_MODE_PROCESS_SAFE) {
    size_t blen = get32 (sb[s] + SB_BOOT_LEN);
    char boot[CBT_BOOT_ID_MAX + 1];

    memcpy (boot, sb[s] + SB_BOOT_ID, blen);   /* checked: <= 63 */
    boot[blen] = '\0';

    keep = o->boot_id && strcmp (o->boot_id, boot) == 0;
    if (keep)
      note (info, "cbt: the file was not closed cleanly; it was in "
            "process-safe mode and this is the same boot (%s): all %"
            PRIu32 " checkpoints stay valid", boot, nr);
    else if (nr > 0)
      note (info, "cbt: left in use in process-safe mode by another boot "
            "(%.36s; this is %.36s): the machine stopped while it was open, "
            "changes may be missing: all %" PRIu32 " checkpoints are "
            "invalid, the next backup must be full", boot,
            o->boot_id ? o->boot_id : "unknown", nr);
  }
  else if (in_use && wmode == CBT_MODE_WRITE_AHEAD && nr > 0)
    note (info, "cbt: the file was not closed cleanly; it was in "
          "write-ahead mode: all %" PRIu32 " checkpoints stay valid", nr);
  else if (in_use && nr > 0)
    note (info, "cbt: the file was not closed cleanly (still marked in "
          "use): all %" PRIu32 " checkpoints are invalid, the next backup "
          "must be full", nr);

  /* Left in use in process-safe mode by another boot: what it wrote
   * while in use was never synced (nor was its last superblock), so its
   * records may be missing or partly written: not read, every
   * checkpoint dropped (the message above says why).
   */
  if (!keep && wmode == CBT_MODE_PROCESS_SAFE) {
    info->invalidated = nr > 0;
    info->dropped = nr;
    return fresh_state (c, get64 (sb[s] + SB_NEXT_SERIAL), err, errlen);
  }
  if (v1 ? cbt_load_v1 (c, sb[s], file_size, o, &wal, &legacy,
                        err, errlen) == -1
      : (check_regions (c, sb[s], file_size, err, errlen) == -1 ||
         load_state (c, sb[s], file_size, keep, &legacy, &torn,
                     err, errlen) == -1))
    goto out;
  if (torn)
    note (info, "cbt: %u directory entries were being written when the "
          "machine stopped (never synced): ignored", torn);

  if (!keep && c->st->n > 0) {
    info->invalidated = true;
    info->dropped = (unsigned) c->st->n;
  }
  if (v1) {
    info->converted = true;
    if (c->read_only)
      note (info, "cbt: a version 1 file (opened read-only: not converted)");
    else
      note (info, "cbt: converted the version 1 file to version 2 (its "
            "records stay where they are)");
  }
  if (!keep) {
    if (fresh_state (c, c->st->next_serial, err, errlen) == -1)
      goto out;
  }
  else {
    struct state *cs = c->st;
    bool pending = cs->n > 0 && cs->cps[cs->n - 1].state == CBT_STATE_PENDING;

    /* A backup still pending: it did not finish. */
    if (pending) {
      size_t k = cs->n - 1;

      note (info, "cbt: checkpoint '%s' was still pending (its backup did "
            "not finish): deleted, its changes merged back",
            cs->cps[k].name);
      info->dropped++;
      if (!c->read_only) {
        if (k > 0 && or_into (c, cs->cur[0], cs->cps[k - 1].rec,
                              err, errlen) == -1)
          goto out;
        if (k > 0) {
          cbt_frec_unref (c, cs->cps[k - 1].rec);
          cs->cps[k - 1].rec = NULL;
        }
        cs->n--;
      }
    }
    /* Convert, drop the pending checkpoint, or store what the file left
     * in use holds: published clean, so that a crash from now on is
     * judged by this mode.
     */
    if (!c->read_only && (v1 || in_use || pending) &&
        publish_clean (c, v1 || pending, err, errlen) == -1)
      goto out;
  }
  /* Unknown autoclear bits: cleared at once. */
  if (!c->read_only && get64 (sb[s] + SB_AUTOCLEAR) != 0 &&
      c->seq == get64 (sb[s] + SB_SEQ)) {
    struct sbv v = c->pub;

    cbt_token_take (c);
    if (cbt_write_super (c, &v, true) == -1) {
      cbt_token_give (c);
      cbt_seterr (err, errlen, "cbt: updating the superblock: %s",
                  strerror (c->io_error));
      errno = EIO;
      goto out;
    }
    cbt_token_give (c);
  }
  r = 0;
 out:
  cbt_legacy_release (c, &legacy);
  if (r == 0)
    cbt_trim_file (c);
  return r;
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
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: identity: must be at most %d printable "
                        "characters", CBT_IDENTITY_MAX);
  }
  if (opts->boot_id && (opts->boot_id[0] == '\0' ||
                        strlen (opts->boot_id) > CBT_BOOT_ID_MAX ||
                        !printable (opts->boot_id, strlen (opts->boot_id),
                                    false))) {
    close (fd);
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: boot id: must be 1 to %d printable characters "
                        "without space", CBT_BOOT_ID_MAX);
  }
  if ((unsigned) opts->mode > CBT_MODE_PROCESS_SAFE) {
    close (fd);
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: mode: %d is not a mode", (int) opts->mode);
  }
  if (opts->mode == CBT_MODE_PROCESS_SAFE && opts->boot_id == NULL &&
      !opts->read_only) {
    close (fd);
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: process-safe mode needs the boot id");
  }
  if (opts->disk_size == 0 && !opts->read_only) {
    close (fd);
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: the disk size is required unless read-only");
  }
  c = alloc_cbt (fd, opts);
  if (c == NULL) {
    close (fd);
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  }
  fl.l_type = opts->read_only ? F_RDLCK : F_WRLCK;
  if (fcntl (fd, F_OFD_SETLK, &fl) == -1) {
    int e = errno;
    cbt_seterr (err, errlen, "cbt: lock: the file is in use by another "
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
  /* Process-safe: the file is marked in use (synced) now, not by the
   * first mark, so that no change ever waits for a sync.
   */
  if (!c->read_only && c->mode == CBT_MODE_PROCESS_SAFE) {
    int r;

    pthread_mutex_lock (&c->lock);
    r = c->pub.in_use ? 0 : cbt_set_in_use_locked (c);
    pthread_mutex_unlock (&c->lock);
    if (r == -1) {
      cbt_seterr (err, errlen, "cbt: marking the file in use: %s",
                  strerror (c->io_error ? c->io_error : EIO));
      free_cbt (c);
      errno = EIO;
      return -1;
    }
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
    return cbt_failure (err, errlen, errno,
                        "cbt: %s: %s", path, strerror (errno));
  return cbt_open_fd (fd, opts, cbtp, info, err, errlen);
}

int
cbt_close (struct cbt *c, char *err, size_t errlen)
{
  int r = 0;

  if (c == NULL)
    return 0;
  pthread_mutex_lock (&c->struct_lock);
  if (!c->read_only && c->io_error == 0) {
    struct mrec *m = c->st->cur[c->st->ncur - 1];
    bool need;
    uint64_t gen;

    pthread_mutex_lock (&c->lock);
    need = c->pub.in_use || m->ndirty > 0;
    gen = c->mark_gen;
    pthread_mutex_unlock (&c->lock);
    if (need) {
      struct sbv v;
      int e = 0;

      if (c->mode == CBT_MODE_WRITE_AHEAD && cbt_commit_upto (c, gen) == -1)
        e = c->io_error;
      if (e == 0) {
        cbt_token_take (c);
        if (cbt_write_dirty (c, &m, 1) == -1 || fdatasync (c->fd) == -1)
          e = errno ? errno : EIO;
        else {
          v = cbt_state_sbv (c, c->st, cbt_mrec_crc (c, m));
          v.in_use = false;
          if (cbt_write_super (c, &v, true) == -1)
            e = c->io_error;
        }
        cbt_token_give (c);
      }
      if (e) {
        cbt_seterr (err, errlen, "cbt: storing the record at close: %s",
                    strerror (e));
        r = -1;
      }
      else
        cbt_trim_file (c);
    }
  }
  else if (c->io_error) {
    cbt_seterr (err, errlen, "cbt: not stored at close: an earlier write "
                "failed (%s)", strerror (c->io_error));
    r = -1;
  }
  pthread_mutex_unlock (&c->struct_lock);
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
