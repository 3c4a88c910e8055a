/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): recording changes and reading them back.  Marking
 * granules in the current record (by page), the durability of marks
 * (write-ahead tickets and commits, process-safe writes), and the query
 * of what changed since a checkpoint (cbt_map*), which reads the
 * records of a state it holds a reference on, without the lock.
 *
 * The file is opened in cbt-load.c, written in cbt-io.c and cbt-rec.c;
 * checkpoints are in cbt-checkpoints.c, the shared types in
 * cbt-private.h.
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cbt-private.h"
#include "minmax.h"

#define GRAN_PER_PAGE (UINT64_C (1) << PAGE_GRAN_SHIFT)
#define MARK_BATCH 64           /* pages marked per hold of the lock */

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

/* Set bits [B0, B1] of BM; the bytes that changed are [*J0, *J1]
 * (returns false if none).
 */
static bool
set_bits (uint8_t *bm, uint64_t b0, uint64_t b1, size_t *j0, size_t *j1)
{
  bool changed = false;

  while (b0 <= b1) {
    size_t byte = (size_t) (b0 / 8);
    unsigned lo = b0 % 8;
    unsigned hi = b1 / 8 == byte ? b1 % 8 : 7;
    uint8_t m = (uint8_t) ((0xff << lo) & (0xff >> (7 - hi)));

    if ((bm[byte] & m) != m) {
      bm[byte] |= m;
      if (!changed)
        *j0 = byte;
      *j1 = byte;
      changed = true;
    }
    b0 = ((uint64_t) byte + 1) * 8;
  }
  return changed;
}

static bool
bits_set (const uint8_t *bm, uint64_t b0, uint64_t b1)
{
  for (uint64_t b = b0; b <= b1; ++b)
    if (!(bm[b / 8] & (1u << (b % 8))))
      return false;
  return true;
}

int
cbt_mark (struct cbt *c, uint64_t offset, uint64_t count, uint64_t *ticket)
{
  uint64_t g0, g1, t = 0;
  uint32_t p0, p1;
  int r = 0;

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
  p0 = (uint32_t) (g0 >> PAGE_GRAN_SHIFT);
  p1 = (uint32_t) (g1 >> PAGE_GRAN_SHIFT);
  pthread_mutex_lock (&c->lock);
  c->stats.marks++;
  if (c->io_error || (!c->pub.in_use && cbt_set_in_use_locked (c) == -1)) {
    pthread_mutex_unlock (&c->lock);
    errno = EIO;
    return -1;
  }
  for (uint32_t p = p0; p <= p1; ++p) {
    struct mrec *m = c->st->cur[c->st->ncur - 1];
    uint64_t base = (uint64_t) p << PAGE_GRAN_SHIFT;
    uint64_t b0 = (g0 > base ? g0 : base) - base;
    uint64_t b1 = (g1 < base + GRAN_PER_PAGE - 1 ? g1
                   : base + GRAN_PER_PAGE - 1) - base;
    uint8_t *mem = cbt_page_get (c, m, p);
    size_t j0 = 0, j1 = 0;

    if (mem == NULL) {
      errno = ENOMEM;
      r = -1;
      break;
    }
    if (set_bits (mem, b0, b1, &j0, &j1)) {
      if (cbt_page_changed (c, m, p, j0, j1) == -1) {
        errno = EIO;
        r = -1;
        break;
      }
    }
    else if (c->mode == CBT_MODE_PROCESS_SAFE &&
             m->pg[p].wgen < m->pg[p].gen && cbt_ps_write (c, m, p) == -1) {
      /* (set already, by a mark or merge whose write is in flight) */
      errno = EIO;
      r = -1;
      break;
    }
    /* (Process-safe: M may be gone now, the lock was released.) */
    if (c->mode == CBT_MODE_WRITE_AHEAD &&
        m->pg[p].gen > c->durable_gen && m->pg[p].gen > t)
      t = m->pg[p].gen;
    if ((p - p0) % MARK_BATCH == MARK_BATCH - 1 && p < p1) {
      /* A long range: let others in between pages. */
      pthread_mutex_unlock (&c->lock);
      pthread_mutex_lock (&c->lock);
      if (c->io_error) {
        errno = EIO;
        r = -1;
        break;
      }
    }
  }
  pthread_mutex_unlock (&c->lock);
  if (r == 0 && ticket && c->mode == CBT_MODE_WRITE_AHEAD)
    *ticket = t;
  return r;
}

bool
cbt_is_durable (struct cbt *c, uint64_t offset, uint64_t count)
{
  uint64_t g0, g1;
  bool r;

  if (range_granules (c, offset, count, &g0, &g1) == -1 || count == 0)
    return count == 0;
  pthread_mutex_lock (&c->lock);
  r = c->pub.in_use;
  for (uint64_t p = g0 >> PAGE_GRAN_SHIFT;
       r && p <= g1 >> PAGE_GRAN_SHIFT; ++p) {
    const struct mrec *m = c->st->cur[c->st->ncur - 1];
    const struct pgent *pg = &m->pg[p];
    uint64_t base = p << PAGE_GRAN_SHIFT;
    uint64_t b0 = (g0 > base ? g0 : base) - base;
    uint64_t b1 = (g1 < base + GRAN_PER_PAGE - 1 ? g1
                   : base + GRAN_PER_PAGE - 1) - base;

    r = pg->mem && bits_set (pg->mem, b0, b1) &&
      (c->mode != CBT_MODE_WRITE_AHEAD || pg->gen <= c->durable_gen) &&
      (c->mode != CBT_MODE_PROCESS_SAFE || pg->wgen >= pg->gen);
  }
  pthread_mutex_unlock (&c->lock);
  return r;
}

int
cbt_commit (struct cbt *c, uint64_t ticket)
{
  if (ticket == 0 || c->mode != CBT_MODE_WRITE_AHEAD)
    return 0;
  pthread_mutex_lock (&c->lock);
  c->stats.commits++;
  pthread_mutex_unlock (&c->lock);
  return cbt_commit_upto (c, ticket);
}

/* ---- Queries ------------------------------------------------------- */

/* A walk over pages, emitting runs of set granules. */
struct walk {
  struct cbt *c;
  cbt_extent_fn extent;
  void *opaque;
  uint64_t g_lo, g_hi;          /* granules [g_lo, g_hi) */
  uint64_t run, run_len;        /* the open run (granules) */
};

static int
emit (struct walk *w)
{
  uint64_t gran = UINT64_C (1) << w->c->gran_bits;
  uint64_t off = w->run * gran, len = w->run_len * gran;

  if (w->run_len == 0)
    return 0;
  w->run_len = 0;
  if (off + len > w->c->disk_size)
    len = w->c->disk_size - off;
  return w->extent (off, len, w->opaque);
}

/* Add granules [G, G+N) to the runs. */
static int
add (struct walk *w, uint64_t g, uint64_t n)
{
  if (w->run_len > 0 && w->run + w->run_len == g) {
    w->run_len += n;
    return 0;
  }
  if (emit (w) == -1)
    return -1;
  w->run = g;
  w->run_len = n;
  return 0;
}

/* The set granules of page P (BUF) inside [g_lo, g_hi). */
static int
walk_page (struct walk *w, uint32_t p, const uint8_t *buf)
{
  uint64_t base = (uint64_t) p << PAGE_GRAN_SHIFT;
  uint64_t lo = w->g_lo > base ? w->g_lo - base : 0;
  uint64_t hi = w->g_hi - base < GRAN_PER_PAGE ? w->g_hi - base
    : GRAN_PER_PAGE;                    /* bits [lo, hi) of the page */

  for (uint64_t b = lo; b < hi; ) {
    uint8_t byte = buf[b / 8];

    if (b % 8 == 0 && hi - b >= 8 && (byte == 0 || byte == 0xff)) {
      if (byte && add (w, base + b, 8) == -1)
        return -1;
      b += 8;
      continue;
    }
    if ((byte & (1u << (b % 8))) && add (w, base + b, 1) == -1)
      return -1;
    b++;
  }
  return 0;
}

/* Find checkpoint NAME (or SERIAL, when NAME is NULL) in S. */
static ssize_t
find_in (const struct state *s, const char *name, uint64_t serial)
{
  for (size_t i = 0; i < s->n; ++i)
    if (name ? strcmp (s->cps[i].name, name) == 0
        : s->cps[i].serial == serial)
      return (ssize_t) i;
  return -1;
}

static void
describe (char *buf, size_t len, const char *name, uint64_t serial)
{
  if (name)
    snprintf (buf, len, "'%s'", name);
  else
    snprintf (buf, len, "with serial %" PRIu64, serial);
}

/* The next page >= P that any current record of S holds, or UINT32_MAX.
 * Scans at most 4096 pages per hold of the lock.
 */
static uint32_t
next_current (struct cbt *c, const struct state *s, uint32_t p, uint32_t last)
{
  while (p <= last) {
    uint32_t end = last - p >= 4096 ? p + 4096 : last + 1;
    uint32_t found = UINT32_MAX;

    pthread_mutex_lock (&c->lock);
    for (uint32_t q = p; q < end && found == UINT32_MAX; ++q)
      for (int i = 0; i < s->ncur; ++i)
        if (s->cur[i]->pg[q].mem) {
          found = q;
          break;
        }
    pthread_mutex_unlock (&c->lock);
    if (found != UINT32_MAX)
      return found;
    if (end == last + 1)
      break;
    p = end;
  }
  return UINT32_MAX;
}

static int
map_impl (struct cbt *c, const char *since, uint64_t since_serial,
          const char *until, uint64_t until_serial, bool has_until,
          uint64_t start, uint64_t end, cbt_extent_fn extent, void *opaque,
          char *err, size_t errlen)
{
  struct walk w = { .c = c, .extent = extent, .opaque = opaque };
  struct state *s;
  ssize_t k, u;
  size_t nrec = 0, *cursor = NULL;
  const struct frec **recs = NULL;
  uint8_t *buf = NULL, *tmp = NULL;
  char what[CBT_NAME_MAX + 32], what2[CBT_NAME_MAX + 32];
  uint32_t p_lo, p_hi;
  int r = -1;

  describe (what, sizeof what, since, since_serial);
  describe (what2, sizeof what2, until, until_serial);
  pthread_mutex_lock (&c->lock);
  s = c->st;
  cbt_state_ref (s);
  pthread_mutex_unlock (&c->lock);

  k = find_in (s, since, since_serial);
  if (k < 0) {
    cbt_seterr (err, errlen, "cbt: no checkpoint %s", what);
    errno = ENOENT;
    goto out;
  }
  if (s->cps[k].state != CBT_STATE_GOOD) {
    cbt_seterr (err, errlen, "cbt: checkpoint %s is pending: its backup "
                "has not ended", what);
    errno = EINVAL;
    goto out;
  }
  /* Frozen records k .. u-1; without UNTIL the current one(s) too. */
  u = (ssize_t) s->n - 1;
  if (has_until) {
    u = find_in (s, until, until_serial);
    if (u < 0) {
      cbt_seterr (err, errlen, "cbt: no checkpoint %s", what2);
      errno = ENOENT;
      goto out;
    }
    if (u <= k) {
      cbt_seterr (err, errlen, "cbt: checkpoint %s is not newer than %s",
                  what2, what);
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
  w.g_lo = start >> c->gran_bits;
  w.g_hi = ((end - 1) >> c->gran_bits) + 1;
  p_lo = (uint32_t) (w.g_lo >> PAGE_GRAN_SHIFT);
  p_hi = (uint32_t) ((w.g_hi - 1) >> PAGE_GRAN_SHIFT);

  nrec = (size_t) (u - k);
  recs = calloc (nrec ? nrec : 1, sizeof *recs);
  cursor = calloc (nrec ? nrec : 1, sizeof *cursor);
  buf = malloc (PAGE);
  tmp = malloc (PAGE);
  if (recs == NULL || cursor == NULL || buf == NULL || tmp == NULL) {
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto out;
  }
  for (size_t i = 0; i < nrec; ++i) {
    const struct frec *f = s->cps[k + (ssize_t) i].rec;
    size_t lo = 0, hi = f->n;

    recs[i] = f;
    while (lo < hi) {                   /* first entry >= p_lo */
      size_t mid = lo + (hi - lo) / 2;
      if (f->e[mid].page < p_lo)
        lo = mid + 1;
      else
        hi = mid;
    }
    cursor[i] = lo;
  }

  for (uint32_t p = p_lo; p <= p_hi; ) {
    uint32_t next = has_until ? UINT32_MAX : next_current (c, s, p, p_hi);
    bool any = false;

    for (size_t i = 0; i < nrec; ++i)
      if (cursor[i] < recs[i]->n && recs[i]->e[cursor[i]].page < next)
        next = recs[i]->e[cursor[i]].page;
    if (next > p_hi)
      break;
    p = next;
    memset (buf, 0, PAGE);
    for (size_t i = 0; i < nrec; ++i) {
      const struct fent *e;

      if (cursor[i] >= recs[i]->n || recs[i]->e[cursor[i]].page != p)
        continue;
      e = &recs[i]->e[cursor[i]++];
      if (cbt_read_page (c, e->blk, p, tmp, true, e->crc, err, errlen) == -1)
        goto out;
      for (size_t j = 0; j < PAGE; ++j)
        buf[j] |= tmp[j];
      any = true;
    }
    if (!has_until) {
      pthread_mutex_lock (&c->lock);
      for (int i = 0; i < s->ncur; ++i) {
        const uint8_t *mem = s->cur[i]->pg[p].mem;
        if (mem) {
          for (size_t j = 0; j < PAGE; ++j)
            buf[j] |= mem[j];
          any = true;
        }
      }
      pthread_mutex_unlock (&c->lock);
    }
    /* A page none holds ends the open run. */
    if (w.run_len > 0 && w.run + w.run_len < (uint64_t) p << PAGE_GRAN_SHIFT &&
        emit (&w) == -1)
      goto out;
    if (any && walk_page (&w, p, buf) == -1)
      goto out;
    p++;
  }
  if (emit (&w) == -1)
    goto out;
  r = 0;
 out:
  free (recs);
  free (cursor);
  free (buf);
  free (tmp);
  cbt_state_unref (c, s);
  return r;
}

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
  return map_impl (c, since ? since : "", 0, until, 0, until != NULL,
                   start, end, extent, opaque, err, errlen);
}

int
cbt_map_serial (struct cbt *c, uint64_t since, uint64_t until,
                uint64_t start, uint64_t end, cbt_extent_fn extent,
                void *opaque, char *err, size_t errlen)
{
  return map_impl (c, NULL, since, NULL, until, until != 0,
                   start, end, extent, opaque, err, errlen);
}
