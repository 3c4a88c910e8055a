/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): records and states in memory (cbt-private.h
 * says what they are), reference counting, putting a new state in force
 * once it is written (cbt_publish: sync, superblock, sync), the pages of
 * a current record (setting them, writing the dirty ones, write-ahead
 * commits), the crc of a current record, reading a page, and freezing a
 * current record into a frozen one.
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <assert.h>
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "cbt-private.h"

#define BATCH 256               /* pages copied under the lock at a time */

static int
unref (int *refs)
{
  return __atomic_sub_fetch (refs, 1, __ATOMIC_ACQ_REL);
}

static void
ref (int *refs)
{
  __atomic_add_fetch (refs, 1, __ATOMIC_RELAXED);
}

/* ---- Current records ----------------------------------------------- */

struct mrec *
cbt_mrec_new (struct cbt *c, uint32_t dir)
{
  struct mrec *m = calloc (1, sizeof *m);
  size_t np = c->nr_pages ? c->nr_pages : 1;

  if (m == NULL)
    return NULL;
  m->pg = calloc (np, sizeof *m->pg);
  m->dirty = malloc (np * sizeof *m->dirty);
  m->spare = malloc (np * sizeof *m->spare);
  if (m->pg == NULL || m->dirty == NULL || m->spare == NULL) {
    free (m->pg); free (m->dirty); free (m->spare); free (m);
    return NULL;
  }
  m->refs = 1;
  m->dir = dir;
  return m;
}

/* Release blocks BLKS[0..N-1] (0: none), a batch at a time. */
static void
release_list (struct cbt *c, const uint32_t *blks, size_t n)
{
  for (size_t i = 0; i < n; i += 4096) {
    size_t k = n - i < 4096 ? n - i : 4096;

    pthread_mutex_lock (&c->alloc_lock);
    for (size_t j = 0; j < k; ++j) {
      uint32_t b = blks[i + j];
      if (b && --c->refs[b] == 0 && b < c->hint)
        c->hint = b;
    }
    pthread_mutex_unlock (&c->alloc_lock);
  }
}

void
cbt_mrec_unref (struct cbt *c, struct mrec *m)
{
  if (m == NULL || unref (&m->refs) > 0)
    return;
  /* (The dirty list is free now: it holds the blocks to release.) */
  for (uint32_t p = 0, n = 0; p <= c->nr_pages; ++p) {
    if (n == c->nr_pages || p == c->nr_pages) {
      release_list (c, m->dirty, n);
      n = 0;
    }
    if (p == c->nr_pages)
      break;
    if (m->pg[p].blk)
      m->dirty[n++] = m->pg[p].blk;
    free (m->pg[p].mem);
  }
  if (m->dir)
    cbt_release (c, m->dir, c->dir_blocks);
  free (m->pg);
  free (m->dirty);
  free (m->spare);
  free (m);
}

/* ---- Frozen records ------------------------------------------------ */

struct frec *
cbt_frec_new (size_t n)
{
  struct frec *f = calloc (1, sizeof *f);

  if (f == NULL)
    return NULL;
  f->e = calloc (n ? n : 1, sizeof *f->e);
  if (f->e == NULL) {
    free (f);
    return NULL;
  }
  f->refs = 1;
  return f;
}

void
cbt_frec_unref (struct cbt *c, struct frec *f)
{
  if (f == NULL || unref (&f->refs) > 0)
    return;
  for (size_t i = 0; i < f->n; i += 4096) {
    size_t k = f->n - i < 4096 ? f->n - i : 4096;

    pthread_mutex_lock (&c->alloc_lock);
    for (size_t j = 0; j < k; ++j) {
      uint32_t b = f->e[i + j].blk;
      if (b && --c->refs[b] == 0 && b < c->hint)
        c->hint = b;
    }
    pthread_mutex_unlock (&c->alloc_lock);
  }
  if (f->idx_blk)
    cbt_release (c, f->idx_blk, blocks_for ((uint64_t) f->n * IDX_SIZE));
  free (f->e);
  free (f);
}

/* ---- States -------------------------------------------------------- */

struct state *
cbt_state_new (void)
{
  struct state *s = calloc (1, sizeof *s);

  if (s)
    s->refs = 1;
  return s;
}

struct state *
cbt_state_copy (const struct state *s)
{
  struct state *n = cbt_state_new ();

  if (n == NULL)
    return NULL;
  n->n = s->n;
  memcpy (n->cps, s->cps, s->n * sizeof s->cps[0]);
  for (size_t i = 0; i < n->n; ++i)
    if (n->cps[i].rec)
      ref (&n->cps[i].rec->refs);
  n->ncur = s->ncur;
  for (int i = 0; i < s->ncur; ++i) {
    n->cur[i] = s->cur[i];
    ref (&n->cur[i]->refs);
  }
  n->next_serial = s->next_serial;
  /* table_* and next_dir: not held, left to the caller. */
  return n;
}

void
cbt_state_ref (struct state *s)
{
  ref (&s->refs);
}

void
cbt_state_unref (struct cbt *c, struct state *s)
{
  if (s == NULL || unref (&s->refs) > 0)
    return;
  for (size_t i = 0; i < s->n; ++i)
    cbt_frec_unref (c, s->cps[i].rec);
  for (int i = 0; i < s->ncur; ++i)
    cbt_mrec_unref (c, s->cur[i]);
  if (s->table_blk)
    cbt_release (c, s->table_blk, blocks_for (s->table_size));
  if (s->next_dir)
    cbt_release (c, s->next_dir, c->dir_blocks);
  free (s);
}

/* ---- Putting a state in force --------------------------------------- */

int
cbt_publish (struct cbt *c, struct state *ns, struct sbv *v,
             char *err, size_t errlen)
{
  struct state *old;
  bool sync = true;

  /* Process-safe mode, the file in use: a power loss drops every
   * checkpoint anyway (another boot), and the loader then reads only
   * the superblock: no sync, so that a checkpoint change never makes
   * the file system flush what the marks wrote.  (The token keeps the
   * file's in-use state as it is.)
   */
  if (c->mode == CBT_MODE_PROCESS_SAFE) {
    pthread_mutex_lock (&c->lock);
    cbt_token_take_locked (c);
    sync = !c->pub.in_use;
    pthread_mutex_unlock (&c->lock);
  }
  if (sync && fdatasync (c->fd) == -1) {
    int e = errno;
    if (c->mode == CBT_MODE_PROCESS_SAFE)
      cbt_token_give (c);
    cbt_state_unref (c, ns);
    cbt_io_failed (c, e);
    return cbt_failure (err, errlen, EIO,
                        "cbt: syncing the file: %s", strerror (e));
  }
  pthread_mutex_lock (&c->lock);
  if (c->mode != CBT_MODE_PROCESS_SAFE)
    cbt_token_take_locked (c);
  v->in_use = c->pub.in_use;
  pthread_mutex_unlock (&c->lock);
  if (cbt_write_super (c, v, sync) == -1) {
    int e;
    pthread_mutex_lock (&c->lock);
    e = c->io_error;
    cbt_token_give_locked (c);
    pthread_mutex_unlock (&c->lock);
    cbt_state_unref (c, ns);
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the superblock: %s", strerror (e));
  }
  pthread_mutex_lock (&c->lock);
  old = c->st;
  c->st = ns;
  cbt_token_give_locked (c);
  pthread_mutex_unlock (&c->lock);
  cbt_state_unref (c, old);
  cbt_trim_file (c);
  return 0;
}

/* ---- Pages of a current record --------------------------------------- */

uint8_t *
cbt_page_get (struct cbt *c, struct mrec *m, uint32_t p)
{
  (void) c;
  if (m->pg[p].mem == NULL)
    m->pg[p].mem = calloc (1, PAGE);
  return m->pg[p].mem;
}

static void
set_dirty (struct mrec *m, uint32_t p)
{
  if (!m->pg[p].dirty) {
    m->pg[p].dirty = true;
    m->dirty[m->ndirty++] = p;
  }
}

/* Process-safe: write page P of M (and its directory entry if it has no
 * block yet) until what is written is at least generation NEED.  One
 * writer per page at a time; the lock is released during the write, so
 * that a write the kernel throttles holds up only the marks of that
 * page.  Lock held.
 */
static int
write_page (struct cbt *c, struct mrec *m, uint32_t p, uint64_t need)
{
  struct pgent *pg = &m->pg[p];
  uint8_t buf[PAGE], ent[DIR_SIZE];
  int r = 0;

  __atomic_add_fetch (&m->refs, 1, __ATOMIC_RELAXED);
  while (pg->wgen < need) {
    uint64_t target = pg->gen;
    size_t len = page_len (c, p);
    bool fresh = pg->blk == 0;
    uint32_t blk;
    int e = 0;

    if (c->io_error) {
      r = -1;
      break;
    }
    if (pg->writing) {
      pthread_cond_wait (&c->pcond, &c->lock);
      continue;
    }
    if (fresh && cbt_alloc (c, 1, &pg->blk) == -1) {
      pg->blk = 0;
      c->io_error = errno ? errno : EIO;
      r = -1;
      break;
    }
    blk = pg->blk;
    memcpy (buf, pg->mem, len);
    pg->writing = true;
    pthread_mutex_unlock (&c->lock);
    put32 (ent + DIR_BLOCK, blk);
    put32 (ent + DIR_CHECK, dir_check (p, blk));
    if (cbt_pwrite_full (c->fd, buf, len, blk_off (blk)) == -1 ||
        (fresh &&
         cbt_pwrite_full (c->fd, ent, DIR_SIZE,
                          blk_off (m->dir) + (uint64_t) p * DIR_SIZE) == -1))
      e = errno ? errno : EIO;
    pthread_mutex_lock (&c->lock);
    pg->writing = false;
    pthread_cond_broadcast (&c->pcond);
    if (e) {
      if (c->io_error == 0)
        c->io_error = e;
      r = -1;
      break;
    }
    if (target > pg->wgen)
      pg->wgen = target;
    c->stats.pages_written++;
  }
  cbt_mrec_unref (c, m);
  if (r == -1)
    errno = EIO;
  return r;
}

int
cbt_ps_write (struct cbt *c, struct mrec *m, uint32_t p)
{
  return write_page (c, m, p, m->pg[p].gen);
}

int
cbt_ps_flush (struct cbt *c, struct mrec *m)
{
  int r = 0;

  pthread_mutex_lock (&c->lock);
  for (uint32_t p = 0; r == 0 && p < c->nr_pages; ++p)
    if (m->pg[p].mem && (m->pg[p].writing || m->pg[p].wgen < m->pg[p].gen))
      r = write_page (c, m, p, m->pg[p].gen);
  pthread_mutex_unlock (&c->lock);
  return r;
}

int
cbt_page_changed (struct cbt *c, struct mrec *m, uint32_t p,
                  size_t j0, size_t j1)
{
  switch (c->mode) {
  case CBT_MODE_IN_USE:
    set_dirty (m, p);
    return 0;
  case CBT_MODE_WRITE_AHEAD:
    m->pg[p].gen = ++c->mark_gen;
    set_dirty (m, p);
    return 0;
  case CBT_MODE_PROCESS_SAFE:
    m->pg[p].gen = ++c->mark_gen;
    (void) j0; (void) j1;
    return write_page (c, m, p, m->pg[p].gen);
  }
  abort ();
}

/* Write the dirty pages of M.  Token held, lock not held. */
static int
write_dirty1 (struct cbt *c, struct mrec *m, uint8_t *buf)
{
  uint32_t *list, blks[BATCH];
  bool fresh[BATCH];
  size_t n;
  uint64_t written = 0;
  int r = 0;

  pthread_mutex_lock (&c->lock);
  list = m->dirty;
  m->dirty = m->spare;
  m->spare = list;
  n = m->ndirty;
  m->ndirty = 0;
  pthread_mutex_unlock (&c->lock);

  for (size_t i = 0; r == 0 && i < n; i += BATCH) {
    size_t k = n - i < BATCH ? n - i : BATCH;

    pthread_mutex_lock (&c->lock);
    for (size_t j = 0; j < k; ++j) {
      struct pgent *pg = &m->pg[list[i + j]];

      memcpy (buf + j * PAGE, pg->mem, page_len (c, list[i + j]));
      pg->dirty = false;
      fresh[j] = pg->blk == 0;
      if (fresh[j] && r == 0 && cbt_alloc (c, 1, &pg->blk) == -1) {
        pg->blk = 0;
        r = -1;
      }
      blks[j] = pg->blk;
    }
    pthread_mutex_unlock (&c->lock);
    for (size_t j = 0; r == 0 && j < k; ++j) {
      uint32_t p = list[i + j];
      uint8_t ent[DIR_SIZE];

      if (cbt_pwrite_full (c->fd, buf + j * PAGE, page_len (c, p),
                           blk_off (blks[j])) == -1) {
        r = -1;
        break;
      }
      written++;
      if (!fresh[j])
        continue;
      put32 (ent + DIR_BLOCK, blks[j]);
      put32 (ent + DIR_CHECK, dir_check (p, blks[j]));
      if (cbt_pwrite_full (c->fd, ent, DIR_SIZE,
                           blk_off (m->dir) + (uint64_t) p * DIR_SIZE) == -1)
        r = -1;
    }
  }
  pthread_mutex_lock (&c->lock);
  c->stats.pages_written += written;
  pthread_mutex_unlock (&c->lock);
  return r;
}

int
cbt_write_dirty (struct cbt *c, struct mrec **m, int nm)
{
  uint8_t *buf = malloc ((size_t) BATCH * PAGE);
  int r = 0;

  if (buf == NULL)
    return -1;
  for (int i = 0; r == 0 && i < nm; ++i)
    r = write_dirty1 (c, m[i], buf);
  free (buf);
  return r;
}

/* One group commit: write every dirty page of the current records in
 * force, sync.  Lock held on entry and exit, released meanwhile; the
 * token keeps other commits and superblock writes out.
 */
static void
do_commit (struct cbt *c)
{
  uint64_t gen = c->mark_gen;
  struct mrec *m[2];
  int nm = c->st->ncur, e = 0;

  for (int i = 0; i < nm; ++i) {
    m[i] = c->st->cur[i];
    __atomic_add_fetch (&m[i]->refs, 1, __ATOMIC_RELAXED);
  }
  c->io_busy = true;
  pthread_mutex_unlock (&c->lock);

  if (cbt_write_dirty (c, m, nm) == -1 || fdatasync (c->fd) == -1)
    e = errno ? errno : EIO;
  for (int i = 0; i < nm; ++i)
    cbt_mrec_unref (c, m[i]);

  pthread_mutex_lock (&c->lock);
  c->stats.syncs++;
  if (e) {
    if (c->io_error == 0)
      c->io_error = e;
  }
  else if (gen > c->durable_gen)
    c->durable_gen = gen;
  cbt_token_give_locked (c);
}

int
cbt_commit_upto (struct cbt *c, uint64_t gen)
{
  int r = 0;

  pthread_mutex_lock (&c->lock);
  while (c->durable_gen < gen) {
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

/* ---- Crc, reading, freezing ------------------------------------------ */

uint32_t
cbt_mrec_crc (const struct cbt *c, const struct mrec *m)
{
  uint8_t buf[4096];
  uint32_t r = 0;

  for (uint64_t pos = 0; pos < c->dir_bytes; pos += sizeof buf) {
    size_t n = c->dir_bytes - pos < sizeof buf ? c->dir_bytes - pos
      : sizeof buf;

    memset (buf, 0, n);
    for (size_t j = 0; j < n; j += DIR_SIZE) {
      uint32_t p = (uint32_t) ((pos + j) / DIR_SIZE);
      if (m->pg[p].blk) {
        put32 (buf + j + DIR_BLOCK, m->pg[p].blk);
        put32 (buf + j + DIR_CHECK, dir_check (p, m->pg[p].blk));
      }
    }
    r = crc (r, buf, n);
  }
  for (uint32_t p = 0; p < c->nr_pages; ++p)
    if (m->pg[p].blk)
      r = crc (r, m->pg[p].mem, page_len (c, p));
  return r;
}

int
cbt_read_page (struct cbt *c, uint32_t blk, uint32_t p, uint8_t *buf,
               bool check, uint32_t crc_want, char *err, size_t errlen)
{
  size_t len = page_len (c, p);

  if (cbt_pread_full (c->fd, buf, len, blk_off (blk)) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: reading page %" PRIu32 " at offset %" PRIu64
                        ": %s", p, blk_off (blk), strerror (errno));
  if (check && crc (0, buf, len) != crc_want)
    return cbt_failure (err, errlen, EIO,
                        "cbt: page %" PRIu32 " at offset %" PRIu64 ": crc "
                        "0x%08" PRIx32 " does not match its index (0x%08" PRIx32
                        "): the file changed underneath", p, blk_off (blk),
                        crc (0, buf, len), crc_want);
  if (len < PAGE)
    memset (buf + len, 0, PAGE - len);
  return 0;
}

struct frec *
cbt_freeze (struct cbt *c, struct mrec *m, char *err, size_t errlen)
{
  size_t n = 0;
  struct frec *f;

  for (uint32_t p = 0; p < c->nr_pages; ++p)
    n += m->pg[p].mem != NULL;
  f = cbt_frec_new (n);
  if (f == NULL) {
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    return NULL;
  }
  for (uint32_t p = 0; p < c->nr_pages; ++p) {
    const struct pgent *pg = &m->pg[p];

    if (pg->mem == NULL)
      continue;
    assert (pg->blk != 0 && !pg->dirty);
    f->e[f->n].page = p;
    f->e[f->n].crc = crc (0, pg->mem, page_len (c, p));
    f->e[f->n].blk = pg->blk;
    f->n++;
  }
  /* F's own reference on each page, a batch at a time. */
  for (size_t i = 0; i < f->n; i += 4096) {
    size_t k = f->n - i < 4096 ? f->n - i : 4096;

    pthread_mutex_lock (&c->alloc_lock);
    for (size_t j = 0; j < k; ++j)
      c->refs[f->e[i + j].blk]++;
    pthread_mutex_unlock (&c->alloc_lock);
  }
  if (cbt_write_index (c, f) == -1) {
    int e = errno;
    cbt_seterr (err, errlen, "cbt: writing a record index: %s", strerror (e));
    cbt_frec_unref (c, f);
    errno = EIO;
    return NULL;
  }
  return f;
}
