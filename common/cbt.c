/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): recording changes.  Marking granules in the
 * current bitmap, the write-ahead of its pages (durability), commit,
 * and the query of what changed since a checkpoint (cbt_map).
 *
 * The file is opened in cbt-load.c, written in cbt-io.c; checkpoints are
 * in cbt-checkpoints.c, the shared types in cbt-internal.h.
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cbt-internal.h"
#include "minmax.h"
#include "rounding.h"

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
    struct sbvals v = cbt_current_vals (c, true, 0);

    wait_idle (c);
    if (cbt_write_super (c, &v) == -1) {
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
  struct sbvals v = cbt_current_vals (c, true, 0);
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

  if (need_super && cbt_write_super (c, &v) == -1)
    e = c->io_error;
  for (size_t i = 0; e == 0 && i < nd; ++i) {
    uint64_t pos = (uint64_t) idx[i] * PAGE;
    size_t len = c->bm_bytes - pos < PAGE ? c->bm_bytes - pos : PAGE;
    if (cbt_pwrite_full (c->fd, pages + i * PAGE, len, c->cur_off + pos) == -1)
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

/* ---- Queries ------------------------------------------------------- */

int
cbt_map (struct cbt *c, const char *since, cbt_extent_fn extent,
         void *opaque, char *err, size_t errlen)
{
  return cbt_map_range (c, since, NULL, 0, UINT64_MAX, extent, opaque,
                        err, errlen);
}

int
cbt_map_range (struct cbt *c, const char *since, const char *until,
               uint64_t start, uint64_t end, cbt_extent_fn extent,
               void *opaque, char *err, size_t errlen)
{
  uint64_t gran = UINT64_C (1) << c->gran_bits;
  uint64_t run = 0, run_len = 0;        /* granules */
  uint64_t g_lo, g_hi, b_lo, b_hi;      /* granules, bitmap bytes */
  uint8_t *buf = NULL, *tmp = NULL;
  ssize_t k, u;
  int r = -1;

  pthread_mutex_lock (&c->lock);
  k = since ? cbt_find_cp (c, since) : -1;
  if (k < 0) {
    cbt_seterr (err, errlen, "cbt: no checkpoint '%s'", since ? since : "");
    errno = ENOENT;
    goto out;
  }
  if (c->cps[k].state != CBT_STATE_GOOD) {
    cbt_seterr (err, errlen, "cbt: checkpoint '%s' is pending: its backup "
                "has not ended", since);
    errno = EINVAL;
    goto out;
  }
  /* Records k .. u-1 are on disk; without UNTIL the current one too. */
  u = (ssize_t) c->n - 1;
  if (until) {
    u = cbt_find_cp (c, until);
    if (u < 0) {
      cbt_seterr (err, errlen, "cbt: no checkpoint '%s'", until);
      errno = ENOENT;
      goto out;
    }
    if (u <= k) {
      cbt_seterr (err, errlen, "cbt: checkpoint '%s' is not newer than "
                  "'%s'", until, since);
      errno = EINVAL;
      goto out;
    }
  }
  if (end > c->disk_size)
    end = c->disk_size;
  if (start >= end) {
    r = 0;
    goto out;
  }
  g_lo = start >> c->gran_bits;
  g_hi = ((end - 1) >> c->gran_bits) + 1;
  b_lo = g_lo / 8;
  b_hi = MIN ((g_hi + 7) / 8, c->bm_bytes);
  buf = malloc (CHUNK);
  tmp = malloc (CHUNK);
  if (buf == NULL || tmp == NULL) {
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  for (uint64_t pos = b_lo; pos < b_hi; pos += CHUNK) {
    size_t len = MIN (b_hi - pos, (uint64_t) CHUNK);

    if (until)
      memset (buf, 0, len);
    else
      memcpy (buf, c->cur + pos, len);
    if (cbt_or_frozen (c, (size_t) k, (size_t) u, pos, buf, len, tmp) == -1) {
      cbt_seterr (err, errlen, "cbt: reading a checkpoint bitmap: %m");
      goto out;
    }
    for (size_t j = 0; j < len; ++j) {
      if (buf[j] == 0 && run_len == 0)
        continue;
      for (unsigned b = 0; b < 8; ++b) {
        uint64_t g = (pos + j) * 8 + b;
        bool set = g >= g_lo && g < g_hi && (buf[j] & (1u << b));

        if (g >= c->nr_gran)
          break;
        if (set) {
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
