/* sparsebackup: qcow2 reader: the cluster walker.
 *
 * The one lookup of guest offsets in a qcow2 layer (L1 table -> L2
 * entry -> host offset, like QEMU's qcow2_get_host_offset): it checks
 * every L2 entry it meets and turns a guest range into coalesced runs
 * (data at a host offset, zero, unallocated, compressed) which the
 * readers and the mapper of qcow2-read.c consume.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>

#include "qcow2-internal.h"
#include "rounding.h"

struct walker {
  struct layer *l;
  uint64_t start, end;
  bool have;
  struct run pending;
  run_fn fn;
  void *opaque;
  struct err *e;
};

/* The host bytes of the data run [OFF, OFF+LEN) at HOST must all be in
 * the file: a cluster cut short by the end of the file would otherwise
 * read as zeros where the guest wrote data.  (Compressed clusters are
 * different: their stored size is rounded up to sectors, and they are
 * checked by the decompressor.)
 */
static int
check_data_in_file (struct layer *l, uint64_t off, uint64_t len,
                    uint64_t host, struct err *e)
{
  const struct qcow2_io *io = l->has_data_file ? &l->data : &l->io;
  uint64_t cguest = round_down (off, l->cluster_size);
  uint64_t missing;

  if (host <= io->size && len <= io->size - host)
    return 0;
  missing = off + (host < io->size ? io->size - host : 0);
  q2_seterr (e, l->name, "data cluster at guest offset 0x%" PRIx64
             " (host offset 0x%" PRIx64 ") runs past the end of %s "
             "(size 0x%" PRIx64 "): guest bytes 0x%" PRIx64 "-0x%" PRIx64
             " are not stored", cguest, host - (off - cguest),
             l->has_data_file ? "the external data file" : "the file",
             io->size, missing, off + len - 1);
  return -1;
}

static int
walk_emit (struct walker *w, enum run_type type, uint64_t off, uint64_t len,
           uint64_t host, uint64_t csize)
{
  uint64_t cstart = off;
  int r;

  if (off + len <= w->start || off >= w->end)
    return 0;
  if (off < w->start) {
    uint64_t d = w->start - off;
    off += d;
    len -= d;
    if (type == RUN_DATA)
      host += d;
  }
  if (off + len > w->end)
    len = w->end - off;
  if (type == RUN_DATA && check_data_in_file (w->l, off, len, host,
                                              w->e) == -1)
    return -1;

  if (w->have && w->pending.type == type && type != RUN_COMPRESSED &&
      w->pending.offset + w->pending.len == off &&
      (type != RUN_DATA || w->pending.host + w->pending.len == host)) {
    w->pending.len += len;
    return 0;
  }
  if (w->have) {
    r = w->fn (w->l, &w->pending, w->opaque, w->e);
    if (r != 0)
      return r;
  }
  w->have = true;
  w->pending.type = type;
  w->pending.offset = off;
  w->pending.len = len;
  w->pending.host = host;
  w->pending.csize = csize;
  w->pending.cstart = cstart;
  return 0;
}

/* The host offset of a standard L2 entry that has one, used or not
 * (preallocated zero clusters, extended entries without allocated
 * subclusters): as QEMU does, refuse one that is not aligned to a
 * cluster, and, with an external data file, one that differs from the
 * guest offset (data file clusters are always at their guest offset).
 */
static int
check_alloc_offset (struct layer *l, const char *what, uint64_t host,
                    uint64_t guest, struct err *e)
{
  if (!is_aligned (host, l->cluster_size)) {
    q2_seterr (e, l->name, "%s offset 0x%" PRIx64 " (guest offset 0x%"
               PRIx64 ") is not aligned to the cluster size (0x%" PRIx64
               ")", what, host, guest, l->cluster_size);
    return -1;
  }
  if (l->has_data_file && host != guest) {
    q2_seterr (e, l->name, "%s offset 0x%" PRIx64 " in the external data "
               "file does not match its guest offset 0x%" PRIx64
               " (they must be equal)", what, host, guest);
    return -1;
  }
  return 0;
}

/* The host offset of a cluster holding data (checked by
 * check_alloc_offset) must be in the file.
 */
static int
check_data_offset (struct layer *l, uint64_t host, uint64_t guest,
                   struct err *e)
{
  const struct qcow2_io *io = l->has_data_file ? &l->data : &l->io;
  char sname[Q2_NAME_BUF];

  if (host >= io->size) {
    q2_seterr (e, l->name, "data cluster offset 0x%" PRIx64
               " (guest offset 0x%" PRIx64 ") is beyond the end of %s "
               "(size 0x%" PRIx64 ")", host, guest,
               l->has_data_file ? q2_short_name (sname, l->data_name)
               : "the file", io->size);
    return -1;
  }
  return 0;
}

/* Emit the runs of one cluster at guest offset GUEST with L2 entry E0
 * (and bitmap E1 for extended entries).
 */
static int
walk_cluster (struct walker *w, uint64_t guest, uint64_t e0, uint64_t e1)
{
  struct layer *l = w->l;
  struct err *e = w->e;
  uint64_t host;
  bool present;

  if (e0 & L2_COMPRESSED) {
    uint32_t x = 62 - (l->cluster_bits - 8);
    uint64_t desc = e0 & ~(L2_COMPRESSED | L2_COPIED);
    uint64_t coff = desc & ((UINT64_C(1) << x) - 1);
    uint64_t nsec = (desc >> x) + 1;
    uint64_t csize = nsec * 512 - (coff & 511);
    uint64_t fsize = l->io.size;

    if (l->has_data_file) {
      q2_seterr (e, l->name, "compressed cluster at guest offset 0x%" PRIx64
                 " in an image with an external data file", guest);
      return -1;
    }
    if (coff >> 56) {
      q2_seterr (e, l->name, "compressed cluster descriptor 0x%" PRIx64
                 " (guest offset 0x%" PRIx64 ") has reserved offset bits set",
                 e0, guest);
      return -1;
    }
    if (coff >= fsize ||
        coff + csize > round_up (fsize, 512)) {
      q2_seterr (e, l->name, "compressed cluster at offset 0x%" PRIx64
                 " (0x%" PRIx64 " bytes, guest offset 0x%" PRIx64
                 ") is beyond the end of the file (size 0x%" PRIx64 ")",
                 coff, csize, guest, fsize);
      return -1;
    }
    return walk_emit (w, RUN_COMPRESSED, guest, l->cluster_size, coff,
                      csize);
  }

  host = e0 & L2_OFFSET_MASK;
  present = host != 0 || (l->has_data_file && (e0 & L2_COPIED));

  if (!l->extended_l2) {
    if (e0 & L2_ZERO) {
      if (l->version < 3) {
        /* Bit 0 is reserved in version 2: QEMU refuses the entry. */
        q2_seterr (e, l->name, "L2 entry 0x%016" PRIx64 " at guest offset "
                   "0x%" PRIx64 " has the zero flag (bit 0) set in a "
                   "version 2 image (zero clusters need version 3)",
                   e0, guest);
        return -1;
      }
      /* A preallocated zero cluster (QEMU ignores the copied flag). */
      if (host != 0 &&
          check_alloc_offset (l, "preallocated zero cluster", host, guest,
                              e) == -1)
        return -1;
      return walk_emit (w, RUN_ZERO, guest, l->cluster_size, 0, 0);
    }
    if (!present)
      return walk_emit (w, RUN_UNALLOC, guest, l->cluster_size, 0, 0);
    if (check_alloc_offset (l, "data cluster", host, guest, e) == -1 ||
        check_data_offset (l, host, guest, e) == -1)
      return -1;
    return walk_emit (w, RUN_DATA, guest, l->cluster_size, host, 0);
  }
  else {
    uint32_t alloc = e1 & 0xffffffff, zero = e1 >> 32;
    uint64_t sub = l->cluster_size / 32;
    unsigned i;
    int r;

    if (alloc & zero) {
      q2_seterr (e, l->name, "invalid subcluster bitmap 0x%016" PRIx64
                 " at guest offset 0x%" PRIx64
                 " (subclusters both allocated and zero)", e1, guest);
      return -1;
    }
    if (present &&
        check_alloc_offset (l, alloc ? "data cluster" : "cluster", host,
                            guest, e) == -1)
      return -1;
    if (alloc) {
      if (!present) {
        q2_seterr (e, l->name, "L2 entry at guest offset 0x%" PRIx64
                   " has allocated subclusters (bitmap 0x%016" PRIx64
                   ") but no host offset", guest, e1);
        return -1;
      }
      if (check_data_offset (l, host, guest, e) == -1)
        return -1;
    }
    /* Fast path: the whole cluster is uniform. */
    if (alloc == 0xffffffff)
      return walk_emit (w, RUN_DATA, guest, l->cluster_size, host, 0);
    if (zero == 0xffffffff)
      return walk_emit (w, RUN_ZERO, guest, l->cluster_size, 0, 0);
    if (alloc == 0 && zero == 0)
      return walk_emit (w, RUN_UNALLOC, guest, l->cluster_size, 0, 0);
    for (i = 0; i < 32; ++i) {
      uint64_t off = guest + i * sub;
      if (off + sub <= w->start)
        continue;
      if (off >= w->end)
        break;
      if (alloc & (UINT32_C(1) << i))
        r = walk_emit (w, RUN_DATA, off, sub, host + i * sub, 0);
      else if (zero & (UINT32_C(1) << i))
        r = walk_emit (w, RUN_ZERO, off, sub, 0, 0);
      else
        r = walk_emit (w, RUN_UNALLOC, off, sub, 0, 0);
      if (r != 0)
        return r;
    }
    return 0;
  }
}

/* Walk [OFFSET, OFFSET+COUNT) of a qcow2 layer (within its size). */
int
q2_walk (struct layer *l, uint64_t offset, uint64_t count,
         run_fn fn, void *opaque, struct err *e)
{
  struct walker w = {
    .l = l, .start = offset, .end = offset + count,
    .have = false, .fn = fn, .opaque = opaque, .e = e,
  };
  uint64_t entries[MAX_SLICE_BYTES / 8];
  uint64_t cidx, last;
  uint32_t l2_entries = UINT32_C(1) << l->l2_bits;
  int r;

  if (count == 0)
    return 0;
  cidx = offset >> l->cluster_bits;
  last = (offset + count - 1) >> l->cluster_bits;
  while (cidx <= last) {
    uint64_t l1i = cidx >> l->l2_bits;
    uint32_t l2i = cidx & (l2_entries - 1);
    uint32_t n = l->slice_entries - l2i % l->slice_entries;
    uint64_t l2off;
    uint32_t k;

    if (n > last - cidx + 1)
      n = last - cidx + 1;
    l2off = l1i < l->l1_size ? l->l1[l1i] : 0;
    if (l2off == 0) {
      r = walk_emit (&w, RUN_UNALLOC, cidx << l->cluster_bits,
                     (uint64_t) n << l->cluster_bits, 0, 0);
      if (r != 0)
        return r;
    }
    else {
      if (q2_l2_get (l, l2off, l2i, n, entries, e) == -1)
        return -1;
      for (k = 0; k < n; ++k) {
        uint64_t e0 = entries[k * l->entry_words];
        uint64_t e1 = l->extended_l2 ? entries[k * 2 + 1] : 0;

        /* Unallocated standard entries (all bits clear: nothing to
         * check) come in long runs in sparse images: one run for all
         * of them.
         */
        if (e0 == 0 && !l->extended_l2) {
          uint32_t j = k + 1;

          while (j < n && entries[j] == 0)
            ++j;
          r = walk_emit (&w, RUN_UNALLOC, (cidx + k) << l->cluster_bits,
                         (uint64_t) (j - k) << l->cluster_bits, 0, 0);
          if (r != 0)
            return r;
          k = j - 1;
          continue;
        }
        r = walk_cluster (&w, (cidx + k) << l->cluster_bits, e0, e1);
        if (r != 0)
          return r;
      }
    }
    cidx += n;
  }
  if (w.have)
    return fn (l, &w.pending, opaque, e);
  return 0;
}
