/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): reading a version 1 file.  Its superblock, table
 * and bitmaps are checked as version 1 always did, then taken into a
 * state in memory: each frozen bitmap becomes a frozen record whose
 * pages are the bitmap's own non-zero 4 KiB pages where they lie (a
 * version 1 bitmap starts 4096-aligned), the current bitmap a current
 * record by page.  cbt-load.c then writes the version 2 structures
 * (indexes, table, directories) around them and publishes them: the
 * conversion copies no bitmap.
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt-private.h"
#include "ispowerof2.h"
#include "rounding.h"

int
cbt_legacy_add (struct cbt_legacy *l, uint32_t blk, uint32_t nb)
{
  if (l->n == l->cap) {
    size_t cap = l->cap ? 2 * l->cap : 64;
    uint32_t *a = realloc (l->blk, cap * sizeof *a), *b;

    if (a == NULL)
      return -1;
    l->blk = a;
    b = realloc (l->nb, cap * sizeof *b);
    if (b == NULL)
      return -1;
    l->nb = b;
    l->cap = cap;
  }
  l->blk[l->n] = blk;
  l->nb[l->n] = nb;
  l->n++;
  return 0;
}

void
cbt_legacy_release (struct cbt *c, struct cbt_legacy *l)
{
  for (size_t i = 0; i < l->n; ++i)
    cbt_release (c, l->blk[i], l->nb[i]);
  free (l->blk);
  free (l->nb);
  memset (l, 0, sizeof *l);
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

/* Hold the blocks of [OFF, OFF+LEN) for the conversion. */
static int
hold_region (struct cbt *c, struct cbt_legacy *l, uint64_t off, uint64_t len)
{
  uint32_t b = (uint32_t) (off >> BLOCK_SHIFT);
  uint32_t nb = blocks_for (len);

  if (nb == 0)
    return 0;
  if (cbt_hold_new (c, b, nb) == -1)
    return -1;
  return cbt_legacy_add (l, b, nb);
}

int
cbt_check_header_v1 (struct cbt *c, const uint8_t *sb,
                     const struct cbt_options *o, bool v1,
                     char *err, size_t errlen)
{
  uint64_t incompat = get64 (sb + SB_INCOMPAT);
  uint64_t disk_size = get64 (sb + SB_DISK_SIZE);
  uint32_t bits = get32 (sb + SB_GRAN_BITS);
  uint32_t idlen = get32 (sb + SB_ID_LEN);
  const char *id = (const char *) sb + SB_ID;
  const char *want = o->identity ? o->identity : "";

  if (get32 (sb + SB_HEADER_SIZE) != SB_SIZE)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: header size: %" PRIu32 ", expected %d",
                        get32 (sb + SB_HEADER_SIZE), SB_SIZE);
  if (incompat & ~(uint64_t) INCOMPAT_KNOWN)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: incompatible features: unknown bits 0x%"
                        PRIx64 " (a newer program wrote this file)",
                        incompat & ~(uint64_t) INCOMPAT_KNOWN);
  if (bits < 9 || bits > 30)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: granularity: 2^%" PRIu32 " is outside "
                        "[2^9, 2^30]", bits);
  if (disk_size == 0 || disk_size > INT64_MAX)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: disk size: %" PRIu64 " is not in "
                        "[1, 2^63-1]", disk_size);
  if (o->disk_size != 0 && disk_size != o->disk_size)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: disk size: the file is for a disk of %" PRIu64
                        " bytes, this disk has %" PRIu64 " (reset to start afresh)",
                        disk_size, o->disk_size);
  if (o->granularity != 0 && (UINT64_C (1) << bits) != o->granularity)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: granularity: the file has %" PRIu64
                        ", %" PRIu32 " was asked for (reset to start afresh)",
                        UINT64_C (1) << bits, o->granularity);
  if (idlen > CBT_IDENTITY_MAX)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: identity length: %" PRIu32 " exceeds %d",
                        idlen, CBT_IDENTITY_MAX);
  if (!printable (id, idlen, true) || !all_zero (sb + SB_ID + idlen,
                                                 256 - idlen))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: identity: not %" PRIu32 " printable "
                        "characters followed by zeros", idlen);
  if ((o->disk_size != 0 || o->identity != NULL) &&
      (strlen (want) != idlen || memcmp (want, id, idlen) != 0))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: identity: the file is for disk '%.*s', this "
                        "disk is '%s' (reset to start afresh)", (int) idlen, id, want);
  if (v1 && !all_zero (sb + SB_RESERVED1, SB_CRC - SB_RESERVED1))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: reserved bytes: not zero in the superblock");
  memcpy (c->identity, id, idlen);
  c->identity[idlen] = '\0';
  return cbt_set_geometry (c, disk_size, bits, err, errlen);
}


/* Take the non-zero pages of the bitmap chunk BUF (LEN bytes at bitmap
 * position POS, stored at file offset BASE + POS) into frozen record F
 * (if not NULL) or current record M.
 */
static int
take_pages (struct cbt *c, const uint8_t *buf, size_t len, uint64_t pos,
            uint64_t base, struct frec *f, struct mrec *m)
{
  for (size_t j = 0; j < len; j += PAGE) {
    uint32_t p = (uint32_t) ((pos + j) / PAGE);
    size_t plen = page_len (c, p);
    uint32_t blk = (uint32_t) ((base + pos + j) >> BLOCK_SHIFT);

    if (all_zero (buf + j, plen))
      continue;
    if (f) {
      f->e[f->n].page = p;
      f->e[f->n].crc = crc (0, buf + j, plen);
      f->e[f->n].blk = blk;
      f->n++;
    }
    else {
      uint8_t *mem = cbt_page_get (c, m, p);
      if (mem == NULL)
        return -1;
      memcpy (mem, buf + j, plen);
      m->pg[p].blk = blk;
    }
    cbt_hold (c, blk, 1);
  }
  return 0;
}

int
cbt_load_v1 (struct cbt *c, const uint8_t *sb, uint64_t file_size,
             const struct cbt_options *o, bool *wal,
             struct cbt_legacy *legacy, char *err, size_t errlen)
{
  uint32_t nr = get32 (sb + SB_NR_CPS);
  uint64_t bm = c->bm_bytes;
  uint64_t table_off = get64 (sb + SB_TABLE_OFF);
  uint32_t table_size = get32 (sb + SB_TABLE_SIZE);
  uint32_t table_crc = get32 (sb + SB_TABLE_CRC);
  uint64_t cur_off = get64 (sb + SB_CUR_OFF);
  uint64_t bm_off[CBT_MAX_CHECKPOINTS];
  uint32_t bm_crc[CBT_MAX_CHECKPOINTS];
  uint8_t *table = NULL, *buf = NULL;
  uint8_t mask = tail_mask (c);
  bool in_use = get64 (sb + SB_INCOMPAT) & INCOMPAT_IN_USE;
  struct state *st = NULL;
  struct mrec *m = NULL;
  int r = -1;

  (void) o;
  *wal = get64 (sb + SB_COMPAT) & COMPAT1_WRITE_AHEAD;
  c->compat_other = get64 (sb + SB_COMPAT) & ~(uint64_t) COMPAT1_KNOWN;
  if (nr > CBT_MAX_CHECKPOINTS)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: number of checkpoints: %" PRIu32
                        " exceeds the limit %d", nr, CBT_MAX_CHECKPOINTS);
  if (table_size != (uint64_t) nr * ENTRY_SIZE)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: table size: %" PRIu32 " bytes, expected %"
                        PRIu32 " for %" PRIu32 " checkpoints", table_size,
                        nr * ENTRY_SIZE, nr);
  if (nr == 0 && (table_off != 0 || table_crc != 0))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: table offset: %" PRIu64 " (crc 0x%08" PRIx32
                        ") with no checkpoints, expected 0", table_off, table_crc);
  if (nr > 0 && !region_ok (table_off, table_size, file_size))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: table offset: %" PRIu64 " (+%" PRIu32
                        " bytes) is unaligned or outside the data area of the %"
                        PRIu64 " byte file", table_off, table_size, file_size);
  if (!region_ok (cur_off, bm, file_size))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: current bitmap offset: %" PRIu64 " (+%" PRIu64
                        " bytes) is unaligned or outside the data area of the %"
                        PRIu64 " byte file", cur_off, bm, file_size);
  if (nr > 0 && overlap (table_off, table_size, cur_off, bm))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: current bitmap offset: %" PRIu64
                        " overlaps the table", cur_off);

  st = cbt_state_new ();
  m = cbt_mrec_new (c, 0);
  table = malloc (table_size ? table_size : 1);
  buf = malloc (CHUNK1);
  if (st == NULL || m == NULL || table == NULL || buf == NULL) {
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  if (nr > 0 && cbt_pread_full (c->fd, table, table_size, table_off) == -1) {
    cbt_seterr (err, errlen, "cbt: reading the table: %s", strerror (errno));
    errno = EIO;
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

    if (cbt_load_entry_head (st, i, nr, e, err, errlen) == -1)
      goto out;
    if (get32 (e + CP1_RESERVED1) != 0 ||
        !all_zero (e + CP1_RESERVED2, ENTRY_SIZE - CP1_RESERVED2))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' reserved bytes: not zero",
                     i, cp->name);
        goto out;
      }
    cp->created = get64 (e + CP_CREATED);
    cp->serial = i + 1;
    bm_off[i] = get64 (e + CP1_BM_OFF);
    bm_crc[i] = get32 (e + CP1_BM_CRC);
    if (last && (bm_off[i] != 0 || bm_crc[i] != 0))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
                     " (crc 0x%08" PRIx32 "), expected 0 for the last checkpoint "
                     "(its record is the current bitmap)", i, cp->name, bm_off[i],
                     bm_crc[i]);
        goto out;
      }
    if (last)
      continue;
    if (!region_ok (bm_off[i], bm, file_size))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
                     " (+%" PRIu64 " bytes) is unaligned or outside the data area "
                     "of the %" PRIu64 " byte file", i, cp->name, bm_off[i], bm,
                     file_size);
        goto out;
      }
    if (overlap (bm_off[i], bm, table_off, table_size) ||
        overlap (bm_off[i], bm, cur_off, bm))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
                     " overlaps the table or the current bitmap", i, cp->name,
                     bm_off[i]);
        goto out;
      }
    for (uint32_t j = 0; j < i; ++j)
      if (overlap (bm_off[i], bm, bm_off[j], bm))
        {
          cbt_failure (err, errlen, EINVAL,
                       "cbt: checkpoint %" PRIu32 " '%s' bitmap offset: %" PRIu64
                       " overlaps the bitmap of checkpoint %" PRIu32, i, cp->name,
                       bm_off[i], j);
          goto out;
        }
  }
  st->n = nr;
  st->next_serial = nr + 1;
  st->cur[0] = m;
  st->ncur = 1;

  /* Hold every region of the version 1 state until the version 2 one
   * is published.
   */
  if ((nr > 0 && hold_region (c, legacy, table_off, table_size) == -1) ||
      hold_region (c, legacy, cur_off, bm) == -1) {
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  for (size_t i = 0; i + 1 < nr; ++i)
    if (hold_region (c, legacy, bm_off[i], bm) == -1) {
      cbt_seterr (err, errlen, "cbt: out of memory");
      errno = ENOMEM;
      goto out;
    }

  /* The frozen records: crc and no bits beyond the disk. */
  for (size_t i = 0; i + 1 < nr; ++i) {
    uint32_t bcrc = 0;
    struct frec *f = cbt_frec_new (c->nr_pages);

    if (f == NULL) {
      cbt_seterr (err, errlen, "cbt: out of memory");
      errno = ENOMEM;
      goto out;
    }
    st->cps[i].rec = f;
    for (uint64_t pos = 0; pos < bm; pos += CHUNK1) {
      size_t len = bm - pos < CHUNK1 ? (size_t) (bm - pos) : CHUNK1;

      if (cbt_pread_full (c->fd, buf, len, bm_off[i] + pos) == -1) {
        cbt_seterr (err, errlen, "cbt: reading checkpoint %zu bitmap: %s",
                    i, strerror (errno));
        errno = EIO;
        goto out;
      }
      bcrc = crc (bcrc, buf, len);
      if (pos + len == bm && (buf[len - 1] & mask))
        {
          cbt_failure (err, errlen, EINVAL,
                       "cbt: checkpoint %zu '%s' bitmap: bits set beyond the end "
                       "of the disk (last byte 0x%02x)", i, st->cps[i].name,
                       buf[len - 1]);
          goto out;
        }
      if (take_pages (c, buf, len, pos, bm_off[i], f, NULL) == -1) {
        cbt_seterr (err, errlen, "cbt: out of memory");
        errno = ENOMEM;
        goto out;
      }
    }
    if (f->n < c->nr_pages) {          /* give back what is not used */
      struct fent *e = realloc (f->e, (f->n ? f->n : 1) * sizeof *e);
      if (e)
        f->e = e;
    }
    if (bcrc != bm_crc[i])
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %zu '%s' bitmap crc: 0x%08" PRIx32 " in the "
                     "table, the bitmap has 0x%08" PRIx32, i, st->cps[i].name,
                     bm_crc[i], bcrc);
        goto out;
      }
  }

  /* The current bitmap: crc unless in use, no bits beyond the disk. */
  {
    uint32_t ccrc = 0;

    for (uint64_t pos = 0; pos < bm; pos += CHUNK1) {
      size_t len = bm - pos < CHUNK1 ? (size_t) (bm - pos) : CHUNK1;

      if (cbt_pread_full (c->fd, buf, len, cur_off + pos) == -1) {
        cbt_seterr (err, errlen, "cbt: reading the current bitmap: %s",
                    strerror (errno));
        errno = EIO;
        goto out;
      }
      ccrc = crc (ccrc, buf, len);
      if (pos + len == bm && (buf[len - 1] & mask))
        {
          cbt_failure (err, errlen, EINVAL,
                       "cbt: current bitmap: bits set beyond the end of the disk "
                       "(last byte 0x%02x)", buf[len - 1]);
          goto out;
        }
      if (take_pages (c, buf, len, pos, cur_off, NULL, m) == -1) {
        cbt_seterr (err, errlen, "cbt: out of memory");
        errno = ENOMEM;
        goto out;
      }
    }
    if (!in_use && ccrc != get32 (sb + SB_CUR_CRC))
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: current bitmap crc: 0x%08" PRIx32 " in the superblock, "
                     "the bitmap has 0x%08" PRIx32, get32 (sb + SB_CUR_CRC), ccrc);
        goto out;
      }
    if (in_use && get32 (sb + SB_CUR_CRC) != 0)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: current bitmap crc: 0x%08" PRIx32 " while in use, "
                     "expected 0", get32 (sb + SB_CUR_CRC));
        goto out;
      }
  }
  c->st = st;
  st = NULL;
  c->pub.in_use = in_use;
  r = 0;
 out:
  if (st) {
    if (st->ncur == 0)
      cbt_mrec_unref (c, m);
    cbt_state_unref (c, st);
  }
  free (table);
  free (buf);
  return r;
}
#undef BAD
