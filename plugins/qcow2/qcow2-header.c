/* sparsebackup: qcow2 reader: one qcow2 layer's header.
 *
 * The header, the header extensions, the feature bits, the geometry
 * and the L1 table, read for qcow2-open.c (q2_read_header), which then
 * opens the layer's external data file and backing file.  This file
 * calls nothing in qcow2-open.c.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"
#include "minmax.h"
#include "rounding.h"

void
q2_header_free (struct header *h)
{
  free (h->hc);
  free (h->backing_name);
  free (h->backing_fmt);
  free (h->data_name);
}

/* Copy a string of LEN bytes from the header (not NUL-terminated). */
static char *
header_string (const char *image, const char *what, const uint8_t *p,
               uint32_t len, struct err *e)
{
  char *s;

  if (memchr (p, 0, len) != NULL) {
    q2_seterr (e, image, "%s contains a NUL byte", what);
    return NULL;
  }
  s = malloc (len + 1);
  if (s == NULL) {
    q2_seterr_oom (e, image);
    return NULL;
  }
  memcpy (s, p, len);
  s[len] = '\0';
  return s;
}

/* The fixed part of the header, then the whole header cluster. */
static int
parse_header (struct layer *l, struct header *hd, struct err *e)
{
  uint8_t h[V3_HEADER_LEN];
  uint32_t magic, crypt, refcount_order;

  if (l->io.size < V2_HEADER_LEN) {
    q2_seterr (e, l->name, "file is too small (%" PRIu64 " bytes) to be a "
               "qcow2 image", l->io.size);
    return -1;
  }
  memset (h, 0, sizeof h);
  if (q2_io_read (&l->io, l->name, h, MIN (sizeof h, l->io.size), 0,
                  e) == -1)
    return -1;
  magic = be32 (h);
  if (magic != QCOW2_MAGIC) {
    q2_seterr (e, l->name, "not a qcow2 image (bad magic 0x%08" PRIx32 ")",
               magic);
    return -1;
  }
  l->version = be32 (h + 4);
  if (l->version != 2 && l->version != 3) {
    q2_seterr (e, l->name, "unsupported qcow2 version %" PRIu32
               " (only 2 and 3 are supported)", l->version);
    return -1;
  }
  hd->backing_off = be64 (h + 8);
  hd->backing_len = be32 (h + 16);
  l->cluster_bits = be32 (h + 20);
  l->size = be64 (h + 24);
  crypt = be32 (h + 32);
  hd->l1_size = be32 (h + 36);
  hd->l1_offset = be64 (h + 40);

  if (l->cluster_bits < 9 || l->cluster_bits > 21) {
    q2_seterr (e, l->name, "cluster_bits %" PRIu32 " is out of range "
               "(supported cluster sizes are 512 bytes to 2 MiB, "
               "cluster_bits 9 to 21)", l->cluster_bits);
    return -1;
  }
  l->cluster_size = UINT64_C(1) << l->cluster_bits;

  if (l->version == 2)
    hd->header_len = V2_HEADER_LEN;
  else {
    if (l->io.size < V3_HEADER_LEN) {
      q2_seterr (e, l->name, "file is too small (%" PRIu64 " bytes) for a "
                 "version 3 header", l->io.size);
      return -1;
    }
    hd->incompat = be64 (h + 72);
    hd->autoclear = be64 (h + 88);
    l->autoclear = hd->autoclear;
    refcount_order = be32 (h + 96);
    hd->header_len = be32 (h + 100);
    if (hd->header_len < V3_HEADER_LEN || hd->header_len % 8 != 0 ||
        hd->header_len > l->cluster_size) {
      q2_seterr (e, l->name, "header_length %" PRIu32 " is invalid (must "
                 "be a multiple of 8 between %d and the cluster size %"
                 PRIu64 ")", hd->header_len, V3_HEADER_LEN, l->cluster_size);
      return -1;
    }
    if (refcount_order > 6) {
      q2_seterr (e, l->name, "refcount_order %" PRIu32 " is invalid "
                 "(at most 6)", refcount_order);
      return -1;
    }
  }
  if (hd->header_len > l->io.size) {
    q2_seterr (e, l->name, "header_length %" PRIu32 " is beyond the end of "
               "the file (size 0x%" PRIx64 ")", hd->header_len, l->io.size);
    return -1;
  }

  if (crypt != 0) {
    q2_seterr (e, l->name, "image is encrypted (crypt_method %" PRIu32
               ", %s); encrypted images are not supported", crypt,
               crypt == 1 ? "AES" : crypt == 2 ? "LUKS" : "unknown method");
    return -1;
  }

  /* Read the header cluster (bounded by 2 MiB). */
  hd->hclen = MIN (l->cluster_size, l->io.size);
  hd->hc = malloc (hd->hclen);
  if (hd->hc == NULL) {
    q2_seterr_oom (e, l->name);
    return -1;
  }
  return q2_io_read (&l->io, l->name, hd->hc, hd->hclen, 0, e);
}

/* The backing file name, stored in the header cluster. */
static int
read_backing_name (struct layer *l, struct header *hd, struct err *e)
{
  if (hd->backing_off == 0 || hd->backing_len == 0)
    return 0;
  if (hd->backing_len > MAX_NAME_LEN) {
    q2_seterr (e, l->name, "backing file name length %" PRIu32 " is too "
               "long (at most %d)", hd->backing_len, MAX_NAME_LEN);
    return -1;
  }
  if (hd->backing_off > hd->hclen ||
      hd->backing_len > hd->hclen - hd->backing_off) {
    q2_seterr (e, l->name, "backing file name at offset 0x%" PRIx64
               " (length %" PRIu32 ") is outside the first cluster of the "
               "file (0x%" PRIx64 " bytes)", hd->backing_off,
               hd->backing_len, hd->hclen);
    return -1;
  }
  if (hd->backing_off < hd->header_len) {
    q2_seterr (e, l->name, "backing file name at offset 0x%" PRIx64
               " overlaps the header (length %" PRIu32 ")",
               hd->backing_off, hd->header_len);
    return -1;
  }
  hd->backing_name = header_string (l->name, "backing file name",
                                    hd->hc + hd->backing_off,
                                    hd->backing_len, e);
  return hd->backing_name ? 0 : -1;
}

/* Replace *DST by the string extension DATA (LEN bytes, at most MAX). */
static int
extension_string (struct layer *l, const char *what, uint32_t max,
                  const uint8_t *data, uint32_t len, char **dst,
                  struct err *e)
{
  if (len > max) {
    q2_seterr (e, l->name, "%s length %" PRIu32 " is too long", what, len);
    return -1;
  }
  free (*dst);
  *dst = header_string (l->name, what, data, len, e);
  return *dst ? 0 : -1;
}

/* The header extensions, between the header and the backing file name
 * (or the end of the first cluster).
 */
static int
parse_extensions (struct layer *l, struct header *hd, struct err *e)
{
  uint32_t ext_end = hd->hclen, off = hd->header_len;

  if (hd->backing_name && hd->backing_off < ext_end)
    ext_end = hd->backing_off;
  while (off + 8 <= ext_end) {
    uint32_t type = be32 (hd->hc + off);
    uint32_t len = be32 (hd->hc + off + 4);
    const uint8_t *data = hd->hc + off + 8;

    off += 8;
    if (type == EXT_END)
      break;
    if (len > ext_end - off) {
      q2_seterr (e, l->name, "header extension 0x%08" PRIx32 " at offset 0x%"
                 PRIx32 " has length %" PRIu32 ", which runs past the end "
                 "of the header extension area (0x%" PRIx32 ")",
                 type, off - 8, len, ext_end);
      return -1;
    }
    switch (type) {
    case EXT_BACKING_FMT:
      if (extension_string (l, "backing format name", MAX_NAME_LEN,
                            data, len, &hd->backing_fmt, e) == -1)
        return -1;
      break;
    case EXT_DATA_FILE:
      if (extension_string (l, "data file name", MAX_DATA_FILE_NAME_LEN,
                            data, len, &hd->data_name, e) == -1)
        return -1;
      break;
    case EXT_FEATURES:
      hd->ftable = data;
      hd->ftable_len = len;
      break;
    case EXT_BITMAPS:
      /* Only recorded: checked by qcow2-bitmap.c when used. */
      if (l->bm_ext_count++ == 0) {
        l->bm_ext_len = len;
        memcpy (l->bm_ext, data, MIN (len, (uint32_t) BITMAPS_EXT_LEN));
      }
      break;
    default:
      break;                    /* ignored */
    }
    off += round_up (len, 8);
    if (off < len)              /* overflow */
      break;
  }
  return 0;
}

/* Describe unknown incompatible bits using the feature name table. */
static void
unknown_features (char *out, size_t outlen, uint64_t bits,
                  const uint8_t *table, uint32_t tlen)
{
  size_t used = 0;
  unsigned b;
  uint32_t i;

  out[0] = '\0';
  for (b = 0; b < 64; ++b) {
    const char *fname = NULL;
    char nbuf[47];
    int n;

    if (!(bits & (UINT64_C(1) << b)))
      continue;
    for (i = 0; table && i + 48 <= tlen; i += 48) {
      if (table[i] == 0 && table[i + 1] == b) {
        memcpy (nbuf, table + i + 2, 46);
        nbuf[46] = '\0';
        fname = nbuf;
        break;
      }
    }
    if (fname)
      n = snprintf (out + used, outlen - used, "%sbit %u (%s)",
                    used ? ", " : "", b, fname);
    else
      n = snprintf (out + used, outlen - used, "%sbit %u",
                    used ? ", " : "", b);
    if (n < 0 || (size_t) n >= outlen - used)
      return;
    used += n;
  }
}

/* Incompatible feature bits, extended L2 entries, compression type. */
static int
check_features (const struct qcow2_options *o, struct layer *l,
                const struct header *hd, struct err *e)
{
  uint64_t incompat = hd->incompat;

  if (incompat & ~INCOMPAT_KNOWN) {
    char desc[256];
    unknown_features (desc, sizeof desc, incompat & ~INCOMPAT_KNOWN,
                      hd->ftable, hd->ftable_len);
    q2_seterr (e, l->name, "image uses unknown incompatible feature(s): %s "
               "(incompatible_features 0x%" PRIx64 ")", desc, incompat);
    return -1;
  }
  if (incompat & INCOMPAT_CORRUPT) {
    q2_seterr (e, l->name, "image is marked corrupt (incompatible feature "
               "bit 1); check and repair it with 'qemu-img check -r all' "
               "first");
    return -1;
  }
  if (incompat & INCOMPAT_DIRTY)
    q2_debug (o, "%s: dirty bit set (ignored: refcounts are not used)",
              l->name);
  l->extended_l2 = (incompat & INCOMPAT_EXTL2) != 0;
  if (l->extended_l2 && l->cluster_bits < 14) {
    q2_seterr (e, l->name, "extended L2 entries need a cluster size of at "
               "least 16 KiB (cluster_bits %" PRIu32 ")", l->cluster_bits);
    return -1;
  }
  l->compression = COMPRESSION_ZLIB;
  if (hd->header_len > 104) {
    uint8_t ct = hd->hc[104];
    if (incompat & INCOMPAT_COMPRESSION) {
      if (ct != COMPRESSION_ZSTD) {
        q2_seterr (e, l->name, "unsupported compression_type %u "
                   "(supported: 0 zlib, 1 zstd)", ct);
        return -1;
      }
      l->compression = ct;
    }
    else if (ct != 0) {
      q2_seterr (e, l->name, "compression_type %u is set but the "
                 "compression type feature bit (incompatible bit 3) is not",
                 ct);
      return -1;
    }
  }
  else if (incompat & INCOMPAT_COMPRESSION) {
    q2_seterr (e, l->name, "compression type feature bit (incompatible bit "
               "3) is set but the header (length %" PRIu32 ") has no "
               "compression_type field", hd->header_len);
    return -1;
  }
  return 0;
}

/* The geometry derived from the header, and the L1 table. */
static int
load_l1 (struct layer *l, const struct header *hd, struct err *e)
{
  uint64_t needed, shift;
  uint8_t *l1raw;
  uint32_t i;

  l->entry_words = l->extended_l2 ? 2 : 1;
  l->l2_bits = l->cluster_bits - (l->extended_l2 ? 4 : 3);
  l->slice_bytes = MIN (l->cluster_size, MAX_SLICE_BYTES);
  l->slice_entries = l->slice_bytes / (8 * l->entry_words);
  if (l->size > INT64_MAX) {
    q2_seterr (e, l->name, "virtual size 0x%" PRIx64 " is too large",
               l->size);
    return -1;
  }
  shift = l->cluster_bits + l->l2_bits;
  needed = div_round_up (l->size, UINT64_C(1) << shift);
  if (hd->l1_size < needed) {
    q2_seterr (e, l->name, "L1 table is too small for the virtual size: "
               "l1_size %" PRIu32 " entries cover 0x%" PRIx64 " bytes, "
               "virtual size 0x%" PRIx64 " needs %" PRIu64 " entries",
               hd->l1_size, (uint64_t) hd->l1_size << shift, l->size,
               needed);
    return -1;
  }
  /* QEMU counts the disk in 512-byte sectors (and checks the L1 size
   * against the size in the header, as above): a partial last sector
   * is not part of the disk.
   */
  l->size = round_down (l->size, 512);
  if ((uint64_t) hd->l1_size * 8 > QCOW2_MAX_L1_BYTES) {
    q2_seterr (e, l->name, "l1_size %" PRIu32 " entries (%" PRIu64
               " bytes) is larger than the limit of %d bytes", hd->l1_size,
               (uint64_t) hd->l1_size * 8, QCOW2_MAX_L1_BYTES);
    return -1;
  }
  if (hd->l1_size > 0) {
    if (!is_aligned (hd->l1_offset, l->cluster_size)) {
      q2_seterr (e, l->name, "L1 table offset 0x%" PRIx64 " is not aligned "
                 "to the cluster size (0x%" PRIx64 ")", hd->l1_offset,
                 l->cluster_size);
      return -1;
    }
    if (hd->l1_offset == 0 || hd->l1_offset >= l->io.size ||
        (uint64_t) hd->l1_size * 8 > l->io.size - hd->l1_offset) {
      q2_seterr (e, l->name, "L1 table at offset 0x%" PRIx64 " (%" PRIu32
                 " entries) is %s (size 0x%" PRIx64 ")", hd->l1_offset,
                 hd->l1_size,
                 hd->l1_offset == 0 ? "at offset 0, overlapping the header" :
                 "beyond the end of the file", l->io.size);
      return -1;
    }
  }
  l->l1_size = needed;
  if (needed == 0)
    return 0;
  l->l1 = malloc (needed * 8);
  l1raw = malloc (needed * 8);
  if (l->l1 == NULL || l1raw == NULL) {
    free (l1raw);
    q2_seterr_oom (e, l->name);
    return -1;
  }
  if (q2_io_read (&l->io, l->name, l1raw, needed * 8, hd->l1_offset,
                  e) == -1) {
    free (l1raw);
    return -1;
  }
  for (i = 0; i < needed; ++i) {
    uint64_t l2off = be64 (l1raw + 8 * i) & L1_OFFSET_MASK;
    if (!is_aligned (l2off, l->cluster_size)) {
      q2_seterr (e, l->name, "L2 table offset 0x%" PRIx64 " (L1 entry %"
                 PRIu32 ") is not aligned to the cluster size (0x%" PRIx64
                 ")", l2off, i, l->cluster_size);
      free (l1raw);
      return -1;
    }
    if (l2off != 0 &&
        (l2off >= l->io.size || l->io.size - l2off < l->cluster_size)) {
      q2_seterr (e, l->name, "L2 table offset 0x%" PRIx64 " (L1 entry %"
                 PRIu32 ") is beyond the end of the file (size 0x%" PRIx64
                 ")", l2off, i, l->io.size);
      free (l1raw);
      return -1;
    }
    l->l1[i] = l2off;
  }
  free (l1raw);
  return 0;
}

int
q2_read_header (const struct qcow2_options *o, struct layer *l,
                struct header *hd, struct err *e)
{
  if (parse_header (l, hd, e) == -1 ||
      read_backing_name (l, hd, e) == -1 ||
      parse_extensions (l, hd, e) == -1 ||
      check_features (o, l, hd, e) == -1 ||
      load_l1 (l, hd, e) == -1)
    return -1;
  return 0;
}
