/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): opening a cbt file, creating a new one or loading
 * and validating an existing one (superblock slots, the checkpoint
 * table, the bitmaps), closing it, and the accessors.
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

#include "cbt-internal.h"
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

/* Check cbt_magic, crc and version of one slot.  WHY says what is wrong. */
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
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  if (nr > 0 &&
      cbt_pread_full (c->fd, table, c->table_size, c->table_off) == -1) {
    cbt_seterr (err, errlen, "cbt: reading the table: %m");
    goto out;
  }
  if (crc (0, table, c->table_size) != c->table_crc) {
    cbt_seterr (err, errlen, "cbt: table crc: 0x%08" PRIx32 " in the "
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

#define BAD(...) do { cbt_seterr (err, errlen, __VA_ARGS__);        \
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

      if (cbt_pread_full (c->fd, buf, len, c->cps[i].off + pos) == -1) {
        cbt_seterr (err, errlen, "cbt: reading checkpoint %zu bitmap: %m", i);
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

  if (cbt_pread_full (c->fd, c->cur, bm, c->cur_off) == -1) {
    cbt_seterr (err, errlen, "cbt: reading the current bitmap: %m");
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
  return cbt_write_state (c, NULL, 0, true, err, errlen);
}

/* Is the file what an interrupted creation leaves?  create_new writes
 * the first state and syncs before it writes the first superblock, so
 * a kill in between leaves both slots and everything else zero, no
 * longer than the slots and one bitmap for this disk (at the
 * granularity asked for; when none is, the file's is accepted, so at
 * the smallest).  Such a file holds nothing (no superblock was ever
 * written): it is created afresh.  Only a file that short is read, so
 * that a large file given by mistake is never scanned (nor truncated).
 * -1 on a read error.
 */
static int
interrupted_creation (struct cbt *c, const struct cbt_options *o,
                      const uint8_t sb[2][SB_SIZE], uint64_t file_size)
{
  uint32_t g = o->granularity ? o->granularity : CBT_MIN_GRANULARITY;
  uint64_t bm, limit;
  uint8_t *buf;
  int r = 1;

  if (!all_zero (sb[0], SB_SIZE) || !all_zero (sb[1], SB_SIZE) ||
      o->disk_size == 0 || !is_power_of_2 (g) || g < CBT_MIN_GRANULARITY ||
      g > CBT_MAX_GRANULARITY)
    return 0;
  bm = div_round_up (div_round_up (o->disk_size, g), 8);
  if (bm > CBT_MAX_BITMAP)
    return 0;
  limit = DATA_START + round_up (bm, ALIGN);
  if (file_size > limit)
    return 0;
  buf = malloc (CHUNK);
  if (buf == NULL)
    return -1;
  for (uint64_t pos = DATA_START; r == 1 && pos < file_size; pos += CHUNK) {
    size_t len = file_size - pos < CHUNK ? file_size - pos : CHUNK;

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
  if (cbt_pread_full (c->fd, sb, sizeof sb, 0) == -1)
    FAILWITH (errno, "cbt: reading the superblocks: %m");
  for (s = 0; s < 2; ++s)
    ok[s] = slot_ok (sb[s], why[s], sizeof why[s]);
  if (!ok[0] && !ok[1]) {
    switch (interrupted_creation (c, o, (const uint8_t (*)[SB_SIZE]) sb,
                                  (uint64_t) st.st_size)) {
    case -1:
      FAILWITH (errno, "cbt: reading the file: %m");
    case 1:
      if (!o->create)
        FAILWITH (ENOENT, "cbt: the file holds only zeros, no superblock "
                  "(create it, or reset)");
      info->created = true;
      note (info, "cbt: the file held only zeros, no superblock (its "
            "creation was interrupted): created afresh");
      return create_new (c, o, err, errlen);
    }
    if (memcmp (sb[0], cbt_magic, 8) != 0 && memcmp (sb[1], cbt_magic, 8) != 0)
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

  /* Still in use: a crash (or kill) while open.  And a damaged newest
   * superblock: a torn write of it is harmless (nothing was recorded on
   * top of a state that was never published), but damage after it was
   * published may hide changes recorded since, which the older state
   * does not hold: never claim less changed than did.
   */
  {
    bool wal = get64 (sb[s] + SB_COMPAT) & COMPAT_WRITE_AHEAD;
    bool drop = c->n > 0 && (info->fallback || (c->in_use_on_disk && !wal));

    if (c->in_use_on_disk && wal && !drop)
      note (info, "cbt: the file was not closed cleanly; it was in "
                "write-ahead mode: all %zu checkpoints stay valid", c->n);
    if (drop) {
      info->invalidated = true;
      info->dropped = (unsigned) c->n;
      if (info->fallback)
        note (info, "the previous state may miss changes recorded after "
              "the damaged one: all %zu checkpoints are invalid, the next "
              "backup must be full", c->n);
      else
        note (info, "cbt: the file was not closed cleanly (still marked in "
              "use): all %zu checkpoints are invalid, the next backup "
              "must be full", c->n);
      if (c->read_only)
        c->n = 0;
      else if (cbt_write_state (c, NULL, 0, true, err, errlen) == -1)
        return -1;
    }
  }
  /* A backup still pending: it did not finish. */
  if (c->n > 0 && c->cps[c->n - 1].state == CBT_STATE_PENDING) {
    note (info, "cbt: checkpoint '%s' was still pending (its backup did not "
              "finish): deleted, its changes merged back",
              c->cps[c->n - 1].name);
    info->dropped++;
    if (!c->read_only && cbt_delete_cp (c, c->n - 1, err, errlen) == -1)
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
    struct sbvals v = cbt_current_vals (c, c->in_use_on_disk,
                                        crc (0, c->cur, c->bm_bytes));
    if (cbt_write_super (c, &v) == -1)
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
    struct sbvals v = cbt_current_vals (c, false, crc (0, c->cur, c->bm_bytes));
    struct sbvals in_use = cbt_current_vals (c, true, 0);

    /* Write-ahead marks never committed: the in-place write below
     * would break the crc of a clean file, so mark it in use first.
     */
    if ((!c->in_use_on_disk && cbt_write_super (c, &in_use) == -1) ||
        cbt_pwrite_full (c->fd, c->cur, c->bm_bytes, c->cur_off) == -1 ||
        fdatasync (c->fd) == -1 || cbt_write_super (c, &v) == -1) {
      cbt_seterr (err, errlen, "cbt: storing the bitmap at close: %m");
      r = -1;
    }
  }
  else if (c->io_error) {
    cbt_seterr (err, errlen, "cbt: not stored at close: an earlier write "
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
