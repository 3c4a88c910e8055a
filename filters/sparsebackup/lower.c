/* nbdkit-sparsebackup-filter: asking the layer below (lower.h). */

#include <config.h>

#include <stdint.h>
#include <errno.h>

#include <nbdkit-filter.h>

#include "minmax.h"
#include "lower.h"

struct nbdkit_extents *
lower_extents (nbdkit_next *next, uint64_t pos, uint64_t end,
               uint32_t flags, int *err)
{
  struct nbdkit_extents *ex;
  uint64_t len = MIN (end - pos, (uint64_t) UINT32_MAX);
  int r = next->can_extents (next);

  *err = 0;
  if (r == -1) {
    *err = EIO;
    return NULL;
  }
  if (r == 0)
    return NULL;
  ex = nbdkit_extents_new (pos, end);
  if (ex == NULL) {
    *err = errno;
    return NULL;
  }
  if (next->extents (next, len, pos, flags, ex, err) == -1) {
    if (*err == 0)
      *err = EIO;
    nbdkit_extents_free (ex);
    return NULL;
  }
  return ex;
}

int64_t
lower_add_as_data (const struct nbdkit_extents *ex, uint64_t pos,
                   uint64_t end, struct nbdkit_extents *out, int *err)
{
  uint64_t p = pos;

  for (size_t i = 0; ex && i < nbdkit_extents_count (ex) && p < end; ++i) {
    const struct nbdkit_extent e = nbdkit_get_extent (ex, i);
    uint64_t eend = MIN (e.offset + e.length, end);
    uint32_t type = e.type & (NBDKIT_EXTENT_HOLE | NBDKIT_EXTENT_ZERO);

    if (eend <= p)
      continue;
    if (e.offset > p)
      break;                    /* a gap: the caller asks again from p */
    if (type == NBDKIT_EXTENT_HOLE)
      type = 0;
    if (nbdkit_add_extent (out, p, eend - p, type) == -1) {
      *err = errno;
      return -1;
    }
    p = eend;
  }
  if (p == pos && p < end) {    /* nothing said of POS: data */
    if (nbdkit_add_extent (out, p, end - p, 0) == -1) {
      *err = errno;
      return -1;
    }
    p = end;
  }
  return p;
}

bool
lower_reads_zero (nbdkit_next *next, uint64_t off, uint64_t len)
{
  struct nbdkit_extents *ex;
  uint64_t p = off;
  int err;

  ex = lower_extents (next, off, off + len, 0, &err);
  for (size_t i = 0; ex && i < nbdkit_extents_count (ex); ++i) {
    const struct nbdkit_extent x = nbdkit_get_extent (ex, i);

    if (x.offset + x.length <= p)
      continue;
    if (x.offset > p || !(x.type & NBDKIT_EXTENT_ZERO))
      break;
    p = x.offset + x.length;
  }
  nbdkit_extents_free (ex);
  return p >= off + len;
}
