/* sparsebackup: qcow2 reader: persistent bitmaps (the @since view).
 *
 * Written from the "Bitmaps extension" and "Bitmaps" sections of
 * QEMU's docs/interop/qcow2.txt, with the limits QEMU applies when it
 * loads a bitmap (block/qcow2-bitmap.c: a bitmap it refuses is refused
 * here too).  Nothing here runs while an image is opened: the header
 * parser only records the extension, and it is checked when a bitmap is
 * opened or listed, so a broken bitmap never affects reading or mapping
 * the disk.
 *
 * Work and memory are bounded.  A directory is read whole (at most
 * BM_MAX_DIR_BYTES, and never more than the file holds).  A listing
 * reads each directory of the chain once (those below the top at most
 * QCOW2_LIST_MAX_LOWER_DIR_BYTES together) and no bitmap table; opening
 * a bitmap reads the directories of its run of layers and checks its
 * tables (at most 8 MiB each under QEMU's limits) in chunks of
 * CHUNK_BYTES, once per image (the tables that passed are remembered).
 * The bitmap data is read through a window of BM_WINDOW bytes.  Every
 * read of a directory or table first asks the caller's cancel callback.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "minmax.h"
#include "rounding.h"

#define BM_MAX_BITMAPS 65535            /* QEMU's limit */
#define BM_MAX_DIR_BYTES (1024 * BM_MAX_BITMAPS)
#define BM_ENTRY_LEN 24                 /* fixed part of an entry */
#define BM_MAX_NAME 1023                /* QEMU's BME_MAX_NAME_SIZE */
#define BM_MIN_GBITS 9                  /* BME_MIN_GRANULARITY_BITS */
#define BM_MAX_GBITS 31                 /* BME_MAX_GRANULARITY_BITS */
#define BM_MAX_TABLE_ENTRIES UINT32_C(0x8000000) /* BME_MAX_TABLE_SIZE */
#define BM_MAX_PHYS QCOW2_BITMAP_MAX_PHYS        /* BME_MAX_PHYS_SIZE */

#define BM_FLAG_IN_USE        UINT32_C(1)
#define BM_FLAG_AUTO          UINT32_C(2)
#define BM_FLAG_EXTRA_COMPAT  UINT32_C(4)
#define BM_FLAGS_KNOWN        UINT32_C(7)
#define BM_TYPE_DIRTY         1

#define BT_OFFSET_MASK   UINT64_C(0x00fffffffffffe00)
#define BT_ALL_ONES      UINT64_C(1)
#define BT_RESERVED      (~(BT_OFFSET_MASK | BT_ALL_ONES))

#define CHUNK_BYTES UINT64_C(65536)     /* table bytes checked at once */

/* The bitmap directory of one layer. */
struct bm_dir {
  uint8_t *buf;
  uint64_t size;
  uint64_t offset;
  uint32_t nb;
};

/* One directory entry (NAME points into the directory, NAME_SIZE bytes,
 * not NUL-terminated).
 */
struct bm_dirent {
  uint64_t table_off;
  uint32_t table_size;
  uint32_t flags;
  uint8_t type, gbits;
  uint16_t name_size;
  uint32_t extra_size;
  const char *name;
};

/* One listing or opening of a bitmap: what it has read. */
struct bmx {
  struct qcow2_image *img;
  uint64_t bytes;               /* of directories and tables */
};

static void
bm_debug (struct qcow2_image *img, const char *fmt, ...)
  __attribute__ ((format (printf, 2, 3)));

static void
bm_debug (struct qcow2_image *img, const char *fmt, ...)
{
  char msg[1400];
  va_list ap;

  if (img->debug == NULL)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  img->debug (img->debug_opaque, msg);
}

/* Read bitmap metadata (a directory or a table) of layer L, unless the
 * caller asks to stop.
 */
static int
meta_read (struct bmx *x, struct layer *l, void *buf, uint64_t count,
           uint64_t offset, struct err *e)
{
  if (x->img->cancel && x->img->cancel (x->img->cancel_opaque)) {
    q2_seterr_errno (e, ECANCELED, l->name, "reading the bitmaps was "
                     "cancelled (shutting down, or the client went away)");
    return -1;
  }
  if (q2_io_read (&l->io, l->name, buf, count, offset, e) == -1)
    return -1;
  x->bytes += count;
  return 0;
}

/* Check the bitmaps extension of layer L and find its directory (size,
 * offset, number of entries) without reading it.  No bitmaps (D->nb =
 * 0) for raw layers, version 2 images, no extension, or an extension
 * that the autoclear bit 0 does not mark consistent (it was written by
 * software not knowing bitmaps).
 */
static int
dir_find (struct layer *l, struct bm_dir *d, struct err *e)
{
  uint32_t reserved;
  uint64_t doff;

  memset (d, 0, sizeof *d);
  if (l->raw || l->version < 3 || l->bm_ext_count == 0 ||
      !(l->autoclear & AUTOCLEAR_BITMAPS))
    return 0;
  if (l->bm_ext_count > 1) {
    q2_seterr (e, l->name, "the bitmaps extension appears %" PRIu32
               " times (at most once)", l->bm_ext_count);
    return -1;
  }
  if (l->bm_ext_len != BITMAPS_EXT_LEN) {
    q2_seterr (e, l->name, "the bitmaps extension has length %" PRIu32
               " (must be %d)", l->bm_ext_len, BITMAPS_EXT_LEN);
    return -1;
  }
  d->nb = be32 (l->bm_ext);
  reserved = be32 (l->bm_ext + 4);
  d->size = be64 (l->bm_ext + 8);
  doff = be64 (l->bm_ext + 16);
  if (reserved != 0) {
    q2_seterr (e, l->name, "the reserved field of the bitmaps extension is "
               "0x%" PRIx32 " (must be 0)", reserved);
    return -1;
  }
  if (d->nb == 0 || d->nb > BM_MAX_BITMAPS) {
    q2_seterr (e, l->name, "nb_bitmaps %" PRIu32 " is out of range "
               "(1 to %d)", d->nb, BM_MAX_BITMAPS);
    return -1;
  }
  /* Each entry takes at least 24 bytes and a name, rounded up to 8. */
  if (d->size < (uint64_t) d->nb * 32 || d->size > BM_MAX_DIR_BYTES) {
    q2_seterr (e, l->name, "bitmap_directory_size %" PRIu64 " is out of "
               "range for %" PRIu32 " bitmaps (%" PRIu64 " to %d)",
               d->size, d->nb, (uint64_t) d->nb * 32, BM_MAX_DIR_BYTES);
    return -1;
  }
  if (doff == 0 || !is_aligned (doff, l->cluster_size)) {
    q2_seterr (e, l->name, "bitmap_directory_offset 0x%" PRIx64 " is %s "
               "(cluster size 0x%" PRIx64 ")", doff,
               doff == 0 ? "0, in the header" :
               "not aligned to the cluster size", l->cluster_size);
    return -1;
  }
  if (doff >= l->io.size || d->size > l->io.size - doff) {
    q2_seterr (e, l->name, "bitmap directory at offset 0x%" PRIx64
               " (%" PRIu64 " bytes) is beyond the end of the file "
               "(size 0x%" PRIx64 ")", doff, d->size, l->io.size);
    return -1;
  }
  d->offset = doff;
  return 0;
}

/* Read the directory D found by dir_find (nothing if it has no
 * entries).
 */
static int
dir_read (struct bmx *x, struct layer *l, struct bm_dir *d, struct err *e)
{
  if (d->nb == 0)
    return 0;
  d->buf = malloc (d->size);
  if (d->buf == NULL) {
    q2_seterr_oom (e, l->name);
    return -1;
  }
  if (meta_read (x, l, d->buf, d->size, d->offset, e) == -1) {
    free (d->buf);
    d->buf = NULL;
    return -1;
  }
  return 0;
}

static int
dir_load (struct bmx *x, struct layer *l, struct bm_dir *d, struct err *e)
{
  if (dir_find (l, d, e) == -1)
    return -1;
  return dir_read (x, l, d, e);
}

static int
dir_entry (struct layer *l, const struct bm_dir *d, uint32_t i,
           uint64_t *pos, struct bm_dirent *ent, struct err *e)
{
  const uint8_t *p = d->buf + *pos;
  uint64_t len, k;

  if (d->size - *pos < BM_ENTRY_LEN) {
    q2_seterr (e, l->name, "bitmap directory entry %" PRIu32 " at offset %"
               PRIu64 " runs past the end of the directory (size %" PRIu64
               ")", i, *pos, d->size);
    return -1;
  }
  ent->table_off = be64 (p);
  ent->table_size = be32 (p + 8);
  ent->flags = be32 (p + 12);
  ent->type = p[16];
  ent->gbits = p[17];
  ent->name_size = (uint16_t) ((p[18] << 8) | p[19]);
  ent->extra_size = be32 (p + 20);
  if (ent->name_size == 0 || ent->name_size > BM_MAX_NAME) {
    q2_seterr (e, l->name, "bitmap directory entry %" PRIu32 ": name_size %"
               PRIu16 " is out of range (1 to %d)", i, ent->name_size,
               BM_MAX_NAME);
    return -1;
  }
  len = round_up ((uint64_t) BM_ENTRY_LEN + ent->extra_size +
                  ent->name_size, 8);
  if (len > d->size - *pos) {
    q2_seterr (e, l->name, "bitmap directory entry %" PRIu32 " (extra_data_"
               "size %" PRIu32 ", name_size %" PRIu16 ") runs past the end "
               "of the directory (size %" PRIu64 ")", i, ent->extra_size,
               ent->name_size, d->size);
    return -1;
  }
  ent->name = (const char *) p + BM_ENTRY_LEN + ent->extra_size;
  if (memchr (ent->name, 0, ent->name_size) != NULL) {
    q2_seterr (e, l->name, "the name of bitmap directory entry %" PRIu32
               " contains a NUL byte", i);
    return -1;
  }
  for (k = BM_ENTRY_LEN + ent->extra_size + ent->name_size; k < len; ++k)
    if (p[k] != 0) {
      q2_seterr (e, l->name, "the padding of bitmap directory entry %"
                 PRIu32 " is not zero", i);
      return -1;
    }
  *pos += len;
  return 0;
}

/* Walk the whole directory: call FN on each entry (FN returns -1 to
 * fail), and check that the entries fill the directory exactly.
 */
typedef int (*dirent_fn) (struct layer *l, const struct bm_dirent *ent,
                          void *opaque, struct err *e);

static int
dir_walk (struct layer *l, const struct bm_dir *d, dirent_fn fn,
          void *opaque, struct err *e)
{
  uint64_t pos = 0;
  uint32_t i;

  for (i = 0; i < d->nb; ++i) {
    struct bm_dirent ent;
    if (dir_entry (l, d, i, &pos, &ent, e) == -1 ||
        fn (l, &ent, opaque, e) == -1)
      return -1;
  }
  if (pos != d->size) {
    q2_seterr (e, l->name, "the bitmap directory has %" PRIu64 " bytes "
               "after its %" PRIu32 " entries (bitmap_directory_size %"
               PRIu64 ")", d->size - pos, d->nb, d->size);
    return -1;
  }
  return 0;
}

struct find_ctx {
  const char *name;
  size_t name_len;
  bool found;
  struct bm_dirent ent;
};

static int
find_fn (struct layer *l, const struct bm_dirent *ent, void *opaque,
         struct err *e)
{
  struct find_ctx *c = opaque;

  if (ent->name_size != c->name_len ||
      memcmp (ent->name, c->name, c->name_len) != 0)
    return 0;
  if (c->found) {
    q2_seterr (e, l->name, "two bitmaps are named '%s'", c->name);
    return -1;
  }
  c->found = true;
  c->ent = *ent;
  return 0;
}

/* Check table entry I of bitmap NAME in L (NAME is only for the
 * message).
 */
static int
check_table_entry (struct layer *l, const char *name, uint64_t i,
                   uint64_t entry, struct err *e)
{
  uint64_t host = entry & BT_OFFSET_MASK;
  const char *why = NULL;

  if (entry & BT_RESERVED)
    why = "reserved bits are set";
  else if (host != 0 && (entry & BT_ALL_ONES))
    why = "bit 0 is set with an offset";
  else if (!is_aligned (host, l->cluster_size))
    why = "the offset is not aligned to the cluster size";
  else if (host != 0 && (host >= l->io.size ||
                         l->io.size - host < l->cluster_size))
    why = "the cluster is beyond the end of the file";
  if (why) {
    q2_seterr (e, l->name, "bitmap '%s': bitmap table entry %" PRIu64
               " is 0x%016" PRIx64 ": %s", name, i, entry, why);
    return -1;
  }
  return 0;
}

/* The smallest granularity (bits) from GBITS up whose bitmap of layer
 * L fits QEMU's limits, or 0 if none does.
 */
static unsigned
min_gbits (const struct layer *l, unsigned gbits)
{
  for (; gbits <= BM_MAX_GBITS; ++gbits) {
    uint64_t bytes = div_round_up (div_round_up (l->size,
                                                 UINT64_C(1) << gbits), 8);
    uint64_t entries = div_round_up (bytes, l->cluster_size);
    if (entries <= BM_MAX_TABLE_ENTRIES &&
        entries * l->cluster_size <= BM_MAX_PHYS)
      return gbits;
  }
  return 0;
}

/* Check the directory entry of bitmap NAME in layer L (no I/O: its
 * table is checked by check_table) and fill B.
 */
static int
check_dirent (struct layer *l, const char *name,
              const struct bm_dirent *ent, struct bm_layer *b,
              struct err *e)
{
  uint64_t gran, needed, phys;

  if (ent->flags & ~BM_FLAGS_KNOWN) {
    q2_seterr (e, l->name, "bitmap '%s': reserved flags are set (flags 0x%"
               PRIx32 ")", name, ent->flags);
    return -1;
  }
  if (ent->flags & BM_FLAG_IN_USE) {
    q2_seterr (e, l->name, "bitmap '%s' is in use (flag in_use): the image "
               "was not closed cleanly, so the bitmap may miss changes; "
               "take a full backup instead", name);
    return -1;
  }
  if (ent->type != BM_TYPE_DIRTY) {
    q2_seterr (e, l->name, "bitmap '%s': type %u is not supported (only 1, "
               "dirty tracking)", name, ent->type);
    return -1;
  }
  if (!(ent->flags & BM_FLAG_AUTO)) {
    q2_seterr (e, l->name, "bitmap '%s' is disabled (flag auto is clear): "
               "it does not track changes", name);
    return -1;
  }
  if (ent->extra_size != 0 && !(ent->flags & BM_FLAG_EXTRA_COMPAT)) {
    q2_seterr (e, l->name, "bitmap '%s' has %" PRIu32 " bytes of unknown "
               "extra data and is not marked extra_data_compatible",
               name, ent->extra_size);
    return -1;
  }
  if (ent->gbits < BM_MIN_GBITS || ent->gbits > BM_MAX_GBITS) {
    q2_seterr (e, l->name, "bitmap '%s': granularity_bits %u is out of "
               "range (%d to %d)", name, ent->gbits, BM_MIN_GBITS,
               BM_MAX_GBITS);
    return -1;
  }
  if (ent->table_size == 0) {
    q2_seterr (e, l->name, "bitmap '%s': bitmap_table_size is 0 (QEMU "
               "refuses a bitmap without a table)", name);
    return -1;
  }
  gran = UINT64_C(1) << ent->gbits;
  needed = div_round_up (div_round_up (div_round_up (l->size, gran), 8),
                         l->cluster_size);
  if (ent->table_size != needed) {
    q2_seterr (e, l->name, "bitmap '%s': bitmap_table_size %" PRIu32
               " does not match the virtual size (0x%" PRIx64 " at "
               "granularity %" PRIu64 " needs %" PRIu64 " entries)", name,
               ent->table_size, l->size, gran, needed);
    return -1;
  }
  if (needed > BM_MAX_TABLE_ENTRIES) {
    q2_seterr (e, l->name, "bitmap '%s': bitmap_table_size %" PRIu32
               " is larger than the limit of %" PRIu32 " entries (QEMU's "
               "limit: it refuses this bitmap)", name,
               ent->table_size, BM_MAX_TABLE_ENTRIES);
    return -1;
  }
  /* QEMU refuses a bitmap whose table covers more than 512 MiB of data
   * clusters (2^32 bits), whatever the disk size ("doesn't satisfy the
   * constraints"): a bitmap this large must not be used either.
   */
  phys = needed * l->cluster_size;
  if (phys > BM_MAX_PHYS) {
    unsigned g = min_gbits (l, ent->gbits);
    q2_seterr (e, l->name, "bitmap '%s': bitmap_table_size %" PRIu32
               " times the cluster size 0x%" PRIx64 " is %" PRIu64 " bytes "
               "of bitmap, more than the limit of %" PRIu64 " bytes (2^32 "
               "bits, QEMU's limit: it refuses this bitmap); %s%" PRIu64,
               name, ent->table_size, l->cluster_size, phys,
               (uint64_t) BM_MAX_PHYS,
               g ? "the smallest granularity that fits is " :
               "no granularity fits a disk of ",
               g ? UINT64_C(1) << g : l->size);
    return -1;
  }
  if (ent->table_off == 0 || !is_aligned (ent->table_off, l->cluster_size) ||
      ent->table_off >= l->io.size ||
      needed * 8 > l->io.size - ent->table_off) {
    q2_seterr (e, l->name, "bitmap '%s': bitmap_table_offset 0x%" PRIx64
               " (%" PRIu64 " entries) is %s (cluster size 0x%" PRIx64
               ", file size 0x%" PRIx64 ")", name, ent->table_off, needed,
               ent->table_off == 0 ? "0, in the header" :
               !is_aligned (ent->table_off, l->cluster_size) ?
               "not aligned to the cluster size" :
               "beyond the end of the file", l->cluster_size, l->io.size);
    return -1;
  }
  b->l = l;
  b->name = name;
  b->gbits = ent->gbits;
  b->table_off = ent->table_off;
  b->table_size = ent->table_size;
  return 0;
}

/* Check every entry of the table of B (bitmap NAME), unless this table
 * of this layer passed before.
 */
static int
check_table (struct bmx *x, const struct bm_layer *b, struct err *e)
{
  struct qcow2_image *img = x->img;
  struct layer *l = b->l;
  uint64_t n = b->table_size, per = CHUNK_BYTES / 8, i;
  uint8_t *chunk;
  bool ok = false;
  unsigned k;

  pthread_mutex_lock (&img->bm_lock);
  for (k = 0; k < l->bm_ok_n; ++k)
    if (l->bm_ok_off[k] == b->table_off && l->bm_ok_size[k] == n)
      ok = true;
  pthread_mutex_unlock (&img->bm_lock);
  if (ok)
    return 0;

  chunk = malloc (MIN (n, per) * 8);
  if (chunk == NULL) {
    q2_seterr_oom (e, l->name);
    return -1;
  }
  for (i = 0; i < n; i += per) {
    uint64_t m = MIN (n - i, per), j;
    if (meta_read (x, l, chunk, m * 8, b->table_off + i * 8, e) == -1)
      goto fail;
    for (j = 0; j < m; ++j)
      if (check_table_entry (l, b->name, i + j, be64 (chunk + 8 * j),
                             e) == -1)
        goto fail;
  }
  free (chunk);

  pthread_mutex_lock (&img->bm_lock);
  l->bm_ok_off[l->bm_ok_next] = b->table_off;
  l->bm_ok_size[l->bm_ok_next] = n;
  l->bm_ok_next = (l->bm_ok_next + 1) % BM_OK_TABLES;
  if (l->bm_ok_n < BM_OK_TABLES)
    l->bm_ok_n++;
  pthread_mutex_unlock (&img->bm_lock);
  return 0;

 fail:
  free (chunk);
  return -1;
}

/* Bitmap NAME of the chain: found in the top layer and in the layers
 * below it down to the first one without it, every entry and table
 * checked.
 */
static int
bitmap_build (struct bmx *x, const char *name, struct qcow2_bitmap *bm,
              struct err *e)
{
  struct qcow2_image *img = x->img;
  struct layer *l;

  memset (bm, 0, sizeof *bm);
  if (strlen (name) > BM_MAX_NAME) {
    q2_seterr (e, img->top->name, "bitmap name of %zu bytes is too long "
               "(at most %d)", strlen (name), BM_MAX_NAME);
    e->errnum = ENOENT;
    return -1;
  }
  strcpy (bm->name, name);
  name = bm->name;
  for (l = img->top; l && bm->n < QCOW2_MAX_DEPTH; l = l->backing) {
    struct find_ctx c = { .name = name, .name_len = strlen (name) };
    struct bm_dir d;
    int r;

    r = dir_load (x, l, &d, e);
    if (r == 0)
      r = dir_walk (l, &d, find_fn, &c, e);
    if (r == 0 && c.found)
      r = check_dirent (l, name, &c.ent, &bm->layers[bm->n], e);
    free (d.buf);
    if (r == 0 && c.found)
      r = check_table (x, &bm->layers[bm->n], e);
    if (r == -1)
      return -1;
    if (!c.found) {
      if (l == img->top) {
        q2_seterr (e, l->name, "there is no bitmap named '%s' in the top "
                   "image", name);
        e->errnum = ENOENT;
        return -1;
      }
      break;
    }
    bm->n++;
  }
  return 0;
}

int
qcow2_bitmap_open (struct qcow2_image *img, const char *name,
                   struct qcow2_bitmap **ret, char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen, 0 };
  struct bmx x = { .img = img };
  struct qcow2_bitmap *bm;

  bm = malloc (sizeof *bm);
  if (bm == NULL) {
    q2_seterr_oom (&e, img->top->name);
    errno = ENOMEM;
    return -1;
  }
  if (bitmap_build (&x, name, bm, &e) == -1) {
    free (bm);
    bm_debug (img, "bitmap '%s': refused, read %" PRIu64 " bytes of "
              "bitmap directories and tables", name, x.bytes);
    errno = e.errnum ? e.errnum : EIO;
    return -1;
  }
  bm_debug (img, "bitmap '%s': %u layer%s, read %" PRIu64 " bytes of "
            "bitmap directories and tables", name, bm->n,
            bm->n == 1 ? "" : "s", x.bytes);
  *ret = bm;
  return 0;
}

void
qcow2_bitmap_close (struct qcow2_bitmap *bm)
{
  free (bm);
}

uint64_t
qcow2_bitmap_granularity (const struct qcow2_bitmap *bm)
{
  return UINT64_C(1) << bm->layers[0].gbits;
}

unsigned
qcow2_bitmap_layers (const struct qcow2_bitmap *bm)
{
  return bm->n;
}

/*----------------------------------------------------------------------
 * Listing: the first QCOW2_MAX_LISTED_BITMAPS bitmaps of the top
 * image, looked up in each lower directory in one walk of it (a binary
 * search of the listed names per entry), no table read.
 */

struct listed {
  struct qcow2_bitmap bm;       /* its name and the layers checked */
  uint16_t name_len;
  bool active;                  /* still looked for in lower layers */
  bool found, dup;              /* in the layer being walked */
  struct bm_dirent ent;         /* found there */
  bool bad;                     /* not usable, because of WHY */
  char why[QCOW2_ERRLEN];
};

/* The listed names, sorted. */
struct sorted_name {
  const char *name;
  uint16_t len;
  uint32_t i;                   /* in list_ctx.v */
};

struct list_ctx {
  struct listed *v;
  uint32_t n;                   /* listed */
  struct sorted_name *sorted;
};

static int
name_cmp (const char *a, size_t alen, const char *b, size_t blen)
{
  if (alen != blen)
    return alen < blen ? -1 : 1;
  return memcmp (a, b, alen);
}

static int
sort_cmp (const void *pa, const void *pb)
{
  const struct sorted_name *a = pa, *b = pb;

  return name_cmp (a->name, a->len, b->name, b->len);
}

/* The listed bitmap named like ENT, or -1. */
static int64_t
lookup (const struct list_ctx *c, const struct bm_dirent *ent)
{
  uint32_t lo = 0, hi = c->n;

  while (lo < hi) {
    uint32_t mid = lo + (hi - lo) / 2;
    const struct sorted_name *m = &c->sorted[mid];
    int r = name_cmp (ent->name, ent->name_size, m->name, m->len);
    if (r == 0)
      return m->i;
    if (r < 0)
      hi = mid;
    else
      lo = mid + 1;
  }
  return -1;
}

/* Mark listed bitmap B unusable, because of MSG. */
static void
set_why (struct listed *b, const char *msg)
{
  b->active = false;
  if (!b->bad)
    snprintf (b->why, sizeof b->why, "%s", msg[0] ? msg : "unusable");
  b->bad = true;
}

static void
list_free (struct list_ctx *c)
{
  free (c->v);
  free (c->sorted);
}

/* Collect the first listed entries of the top directory. */
static int
collect_fn (struct layer *l, const struct bm_dirent *ent, void *opaque,
            struct err *e)
{
  struct list_ctx *c = opaque;
  struct listed *b;

  if (c->n >= QCOW2_MAX_LISTED_BITMAPS)
    return 0;
  b = &c->v[c->n++];
  memcpy (b->bm.name, ent->name, ent->name_size);
  b->bm.name[ent->name_size] = '\0';
  b->name_len = ent->name_size;
  b->ent = *ent;
  b->active = true;
  return 0;
}

/* Walking a directory: mark the listed bitmaps it names. */
static int
mark_fn (struct layer *l, const struct bm_dirent *ent, void *opaque,
         struct err *e)
{
  struct list_ctx *c = opaque;
  int64_t i = lookup (c, ent);

  if (i >= 0 && c->v[i].active) {
    if (c->v[i].found)
      c->v[i].dup = true;
    c->v[i].found = true;
    c->v[i].ent = *ent;
  }
  return 0;
}

/* After walking the directory of L (the layer at depth bm.n of each
 * active bitmap): check the entries found, end the runs of the others.
 */
static void
settle (struct list_ctx *c, struct layer *l)
{
  char msg[QCOW2_ERRLEN];
  struct err be = { msg, sizeof msg, 0 };
  uint32_t i;

  for (i = 0; i < c->n; ++i) {
    struct listed *b = &c->v[i];
    if (!b->active)
      continue;
    if (!b->found)
      b->active = false;        /* the run ends above L */
    else if (b->dup) {
      q2_seterr (&be, l->name, "two bitmaps are named '%s'", b->bm.name);
      set_why (b, msg);
    }
    else if (check_dirent (l, b->bm.name, &b->ent,
                           &b->bm.layers[b->bm.n], &be) == -1)
      set_why (b, msg);
    else {
      b->bm.layers[b->bm.n].name = b->bm.name;
      if (++b->bm.n >= QCOW2_MAX_DEPTH)
        b->active = false;
    }
    b->found = b->dup = false;
  }
}

int
qcow2_list_bitmaps (struct qcow2_image *img, qcow2_bitmap_fn fn,
                    void *opaque, char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen, 0 };
  struct bmx x = { .img = img };
  struct list_ctx c = { .v = NULL };
  struct bm_dir d;
  struct layer *l;
  uint64_t lower = 0, pos = 0;
  uint32_t i, usable = 0;
  unsigned depth;
  int r = -1;

  if (errbuf && errlen)
    errbuf[0] = '\0';
  if (dir_load (&x, img->top, &d, &e) == -1)
    goto out;
  if (d.nb == 0) {
    r = 0;
    goto out;
  }
  c.v = calloc (MIN (d.nb, (uint32_t) QCOW2_MAX_LISTED_BITMAPS), sizeof *c.v);
  c.sorted = calloc (MIN (d.nb, (uint32_t) QCOW2_MAX_LISTED_BITMAPS), sizeof *c.sorted);
  if (c.v == NULL || c.sorted == NULL) {
    q2_seterr_oom (&e, img->top->name);
    goto out;
  }
  if (dir_walk (img->top, &d, collect_fn, &c, &e) == -1)
    goto out;
  for (i = 0; i < c.n; ++i) {
    c.sorted[i].name = c.v[i].bm.name;
    c.sorted[i].len = c.v[i].name_len;
    c.sorted[i].i = i;
  }
  qsort (c.sorted, c.n, sizeof *c.sorted, sort_cmp);

  /* The top directory: names must be unique there too, among the
   * listed bitmaps (neighbours once sorted) and after them.
   */
  for (i = 0; i < c.n; ++i)
    c.v[i].found = true;
  for (i = 1; i < c.n; ++i)
    if (name_cmp (c.sorted[i - 1].name, c.sorted[i - 1].len,
                  c.sorted[i].name, c.sorted[i].len) == 0)
      c.v[c.sorted[i - 1].i].dup = c.v[c.sorted[i].i].dup = true;
  {
    uint32_t k;
    uint64_t p = 0;
    for (k = 0; k < d.nb; ++k) {
      struct bm_dirent ent;
      int64_t j;
      if (dir_entry (img->top, &d, k, &p, &ent, &e) == -1)
        goto out;               /* cannot happen: walked above */
      if (k < c.n)
        continue;
      j = lookup (&c, &ent);
      if (j >= 0)
        c.v[j].dup = true;
    }
  }
  settle (&c, img->top);

  /* The layers below, each directory walked once. */
  for (l = img->top->backing, depth = 1; l && depth < QCOW2_MAX_DEPTH;
       l = l->backing, ++depth) {
    char msg[QCOW2_ERRLEN];
    struct err le = { msg, sizeof msg, 0 };
    struct bm_dir ld;
    bool any = false;
    int lr;

    for (i = 0; i < c.n; ++i)
      any |= c.v[i].active;
    if (!any)
      break;
    lr = dir_find (l, &ld, &le);
    if (lr == 0 && ld.nb > 0 && lower + ld.size > QCOW2_LIST_MAX_LOWER_DIR_BYTES) {
      q2_seterr (&le, l->name, "not checked: its layers go down to this "
                 "one, whose bitmap directory (%" PRIu64 " bytes) is beyond "
                 "the %" PRIu64 " bytes of lower directories that a listing "
                 "reads; open the view to check it", ld.size,
                 QCOW2_LIST_MAX_LOWER_DIR_BYTES);
      lr = -1;
    }
    if (lr == 0) {
      lower += ld.size;
      lr = dir_read (&x, l, &ld, &le);
    }
    if (lr == 0 && ld.nb > 0)
      lr = dir_walk (l, &ld, mark_fn, &c, &le);
    free (ld.buf);
    if (lr == -1) {
      if (le.errnum == ECANCELED) {
        q2_seterr_errno (&e, ECANCELED, NULL, "%s", msg);
        goto out;
      }
      for (i = 0; i < c.n; ++i)
        if (c.v[i].active)
          set_why (&c.v[i], msg);
      break;
    }
    settle (&c, l);
  }

  /* Tell. */
  for (i = 0; i < c.n; ++i) {
    struct listed *b = &c.v[i];
    if (!b->bad)
      usable++;
    if (fn (opaque, b->bm.name, b->bad ? NULL : &b->bm,
            b->bad ? b->why : NULL) == -1)
      goto stopped;
  }
  for (i = 0; i < d.nb; ++i) {
    char name[BM_MAX_NAME + 1];
    char why[QCOW2_ERRLEN];
    struct err be = { why, sizeof why, 0 };
    struct bm_dirent ent;

    if (dir_entry (img->top, &d, i, &pos, &ent, &e) == -1)
      goto out;                 /* cannot happen: walked above */
    if (i < c.n)
      continue;
    memcpy (name, ent.name, ent.name_size);
    name[ent.name_size] = '\0';
    q2_seterr (&be, img->top->name, "only the first %d bitmaps are listed",
               QCOW2_MAX_LISTED_BITMAPS);
    if (fn (opaque, name, NULL, why) == -1)
      goto stopped;
  }
  bm_debug (img, "bitmaps: %" PRIu32 " in the top image, %" PRIu32
            " listed, %" PRIu32 " usable; read %" PRIu64 " bytes of bitmap "
            "directories", d.nb, c.n, usable, x.bytes);
  r = 0;
  goto out;

 stopped:
  if (errbuf && errlen)
    errbuf[0] = '\0';
  list_free (&c);
  free (d.buf);
  return -1;                    /* with the callback's errno */

 out:
  list_free (&c);
  free (d.buf);
  if (r == -1)
    errno = e.errnum ? e.errnum : EIO;
  return r;
}

/*----------------------------------------------------------------------
 * Reading the bits.
 */

/* Table entry TIDX of B (checked again: the file is read again). */
static int
table_entry (const struct bm_layer *b, struct bm_cursor *c, uint64_t tidx,
             uint64_t *entry, struct err *e)
{
  uint8_t raw[8];

  if (c->have_entry && c->tidx == tidx) {
    *entry = c->tentry;
    return 0;
  }
  if (tidx >= b->table_size) {
    q2_seterr (e, b->l->name, "internal error: bitmap table index %" PRIu64
               " out of range", tidx);
    return -1;
  }
  if (q2_io_read (&b->l->io, b->l->name, raw, 8, b->table_off + tidx * 8,
                  e) == -1)
    return -1;
  *entry = be64 (raw);
  if (check_table_entry (b->l, b->name, tidx, *entry, e) == -1)
    return -1;
  c->have_entry = true;
  c->tidx = tidx;
  c->tentry = *entry;
  return 0;
}

/* The byte at host offset HOST of a bitmap data cluster. */
static int
data_byte (const struct bm_layer *b, struct bm_cursor *c, uint64_t host,
           uint8_t *byte, struct err *e)
{
  uint64_t base = round_down (host, BM_WINDOW);

  if (!c->have_win || c->win_host != base) {
    c->have_win = false;
    if (q2_io_read (&b->l->io, b->l->name, c->win, BM_WINDOW, base,
                    e) == -1)
      return -1;
    c->have_win = true;
    c->win_host = base;
  }
  *byte = c->win[host - base];
  return 0;
}

/* The bits from FIRST (< LIMIT) equal to bit FIRST: up to *END. */
static int
bit_run (const struct bm_layer *b, struct bm_cursor *c, uint64_t first,
         uint64_t limit, uint64_t *end, bool *set, struct err *e)
{
  uint64_t bpc = b->l->cluster_size * 8;  /* bits per bitmap cluster */
  uint64_t pos = first;
  int v = -1;

  /* LIMIT is the same for every call of one request. */
  if (c->have_run && first >= c->run_first && first < c->run_end) {
    *end = c->run_end;
    *set = c->run_set;
    return 0;
  }
  while (pos < limit) {
    uint64_t tidx = pos / bpc, cstart = tidx * bpc;
    uint64_t cend = MIN (cstart + bpc, limit);
    uint64_t entry, host;

    if (table_entry (b, c, tidx, &entry, e) == -1)
      return -1;
    host = entry & BT_OFFSET_MASK;
    if (host == 0) {
      int u = (entry & BT_ALL_ONES) != 0;
      if (v == -1)
        v = u;
      if (u != v)
        break;
      pos = cend;
      continue;
    }
    while (pos < cend) {
      uint8_t byte;
      int u;

      if (data_byte (b, c, host + (pos - cstart) / 8, &byte, e) == -1)
        return -1;
      if (pos % 8 == 0 && cend - pos >= 8 && (byte == 0 || byte == 0xff)) {
        u = byte != 0;
        if (v == -1)
          v = u;
        if (u != v)
          goto done;
        pos += 8;
        continue;
      }
      u = (byte >> (pos % 8)) & 1;
      if (v == -1)
        v = u;
      if (u != v)
        goto done;
      pos++;
    }
  }
 done:
  *end = pos;
  *set = v == 1;
  c->have_run = true;
  c->run_first = first;
  c->run_end = pos;
  c->run_set = *set;
  return 0;
}

int
q2_bitmap_run (const struct qcow2_bitmap *bm, struct bm_cursor *cur,
               uint64_t offset, uint64_t count, uint64_t *len, bool *dirty,
               struct err *e)
{
  unsigned i;

  *len = count;
  *dirty = false;
  for (i = 0; i < bm->n; ++i) {
    const struct bm_layer *b = &bm->layers[i];
    uint64_t size = b->l->size, lim, end, run;
    bool set;

    if (offset >= size)
      continue;                 /* beyond this layer: unchanged there */
    lim = MIN (count, size - offset);
    if (bit_run (b, &cur[i], offset >> b->gbits,
                 div_round_up (offset + lim, UINT64_C(1) << b->gbits),
                 &end, &set, e) == -1)
      return -1;
    run = MIN ((end << b->gbits) - offset, lim);
    *len = MIN (*len, run);
    *dirty |= set;
  }
  return 0;
}
