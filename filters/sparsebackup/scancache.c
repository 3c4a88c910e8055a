/* nbdkit-sparsebackup-filter: the scan cache (see scancache.h). */

#include <config.h>

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include "scancache.h"

/* Completed modifications remembered for refusing stale inserts.  An
 * inserter whose snapshot is older than the oldest remembered one is
 * refused (it could have missed a modification).
 */
#define LOG_SIZE 256

struct entry {
  uint64_t offset;
  size_t len;
  size_t nblocks;
  size_t nconsumed;
  unsigned char *data;
  unsigned char *consumed;              /* bitmap, one bit per block */
  struct entry *prev, *next;            /* LRU list, head = most recent */
};

struct mod {
  uint64_t ticket;
  uint64_t start, end;
};

struct done {
  uint64_t gen;
  uint64_t start, end;
};

struct scancache {
  pthread_mutex_t lock;
  uint64_t capacity;
  uint32_t blksize;

  struct entry **v;                     /* sorted by offset, disjoint */
  size_t n, alloc;
  struct entry *head, *tail;
  uint64_t used;

  uint64_t gen;                         /* modifications completed */
  uint64_t next_ticket;
  struct mod *inflight;
  size_t ninflight, inflight_alloc;
  unsigned untracked;                   /* in flight, range unknown */
  struct done log[LOG_SIZE];            /* ring: gens (gen-log_n, gen] */
  size_t log_n;

  struct scancache_stats st;
};

struct scancache *
scancache_new (uint64_t capacity, uint32_t blksize)
{
  struct scancache *sc;

  if (capacity == 0 || blksize == 0 || (blksize & (blksize - 1)) != 0) {
    errno = EINVAL;
    return NULL;
  }
  sc = calloc (1, sizeof *sc);
  if (sc == NULL)
    return NULL;
  pthread_mutex_init (&sc->lock, NULL);
  sc->capacity = capacity;
  sc->blksize = blksize;
  return sc;
}

static void
entry_free (struct entry *e)
{
  free (e->data);
  free (e->consumed);
  free (e);
}

void
scancache_free (struct scancache *sc)
{
  size_t i;

  if (sc == NULL)
    return;
  for (i = 0; i < sc->n; ++i)
    entry_free (sc->v[i]);
  free (sc->v);
  free (sc->inflight);
  pthread_mutex_destroy (&sc->lock);
  free (sc);
}

/* Index of the first entry ending after OFFSET (or n).  Lock held. */
static size_t
search (struct scancache *sc, uint64_t offset)
{
  size_t lo = 0, hi = sc->n;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const struct entry *e = sc->v[mid];
    if (e->offset + e->len <= offset)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

static void
lru_unlink (struct scancache *sc, struct entry *e)
{
  if (e->prev) e->prev->next = e->next; else sc->head = e->next;
  if (e->next) e->next->prev = e->prev; else sc->tail = e->prev;
  e->prev = e->next = NULL;
}

static void
lru_push_front (struct scancache *sc, struct entry *e)
{
  e->prev = NULL;
  e->next = sc->head;
  if (sc->head) sc->head->prev = e; else sc->tail = e;
  sc->head = e;
}

/* Remove the entry at index I.  Lock held. */
static void
remove_at (struct scancache *sc, size_t i)
{
  struct entry *e = sc->v[i];

  lru_unlink (sc, e);
  memmove (&sc->v[i], &sc->v[i+1], (sc->n - i - 1) * sizeof sc->v[0]);
  sc->n--;
  sc->used -= e->len;
  entry_free (e);
}

/* Remove every entry overlapping [START, END).  Lock held. */
static void
remove_range (struct scancache *sc, uint64_t start, uint64_t end)
{
  size_t i = search (sc, start);

  while (i < sc->n && sc->v[i]->offset < end)
    remove_at (sc, i);
}

static void
remove_lru (struct scancache *sc)
{
  struct entry *e = sc->tail;
  size_t i = search (sc, e->offset);

  /* e is in v: the first entry ending after e->offset is e itself. */
  remove_at (sc, i);
  sc->st.evicted++;
}

uint64_t
scancache_snapshot (struct scancache *sc)
{
  uint64_t r;

  pthread_mutex_lock (&sc->lock);
  r = sc->gen;
  pthread_mutex_unlock (&sc->lock);
  return r;
}

uint64_t
scancache_invalidate_begin (struct scancache *sc,
                            uint64_t offset, uint64_t count)
{
  uint64_t ticket = 0;
  uint64_t end = offset + count;

  pthread_mutex_lock (&sc->lock);
  if (sc->ninflight == sc->inflight_alloc) {
    size_t nalloc = sc->inflight_alloc ? sc->inflight_alloc * 2 : 16;
    struct mod *p = realloc (sc->inflight, nalloc * sizeof *p);
    if (p) {
      sc->inflight = p;
      sc->inflight_alloc = nalloc;
    }
  }
  if (sc->ninflight < sc->inflight_alloc) {
    ticket = ++sc->next_ticket;
    sc->inflight[sc->ninflight].ticket = ticket;
    sc->inflight[sc->ninflight].start = offset;
    sc->inflight[sc->ninflight].end = end;
    sc->ninflight++;
    remove_range (sc, offset, end);
  }
  else {
    /* Out of memory: refuse every insert until this request is over. */
    sc->untracked++;
    remove_range (sc, 0, UINT64_MAX);
  }
  pthread_mutex_unlock (&sc->lock);
  return ticket;
}

void
scancache_invalidate_end (struct scancache *sc, uint64_t ticket)
{
  uint64_t start = 0, end = UINT64_MAX;
  size_t i;
  struct done *d;

  pthread_mutex_lock (&sc->lock);
  if (ticket == 0)
    sc->untracked--;
  else {
    for (i = 0; i < sc->ninflight; ++i) {
      if (sc->inflight[i].ticket == ticket) {
        start = sc->inflight[i].start;
        end = sc->inflight[i].end;
        sc->inflight[i] = sc->inflight[sc->ninflight - 1];
        sc->ninflight--;
        break;
      }
    }
  }
  sc->gen++;
  d = &sc->log[sc->gen % LOG_SIZE];
  d->gen = sc->gen;
  d->start = start;
  d->end = end;
  if (sc->log_n < LOG_SIZE)
    sc->log_n++;
  pthread_mutex_unlock (&sc->lock);
}

/* May data read after SNAP be inserted over [START, END)?  Lock held. */
static bool
insert_allowed (struct scancache *sc, uint64_t snap,
                uint64_t start, uint64_t end)
{
  uint64_t g;
  size_t i;

  if (sc->untracked > 0)
    return false;
  for (i = 0; i < sc->ninflight; ++i)
    if (sc->inflight[i].start < end && start < sc->inflight[i].end)
      return false;
  if (snap > sc->gen)
    return false;
  /* Every completion after SNAP must still be in the log. */
  if (sc->gen - snap > sc->log_n)
    return false;
  for (g = snap + 1; g <= sc->gen; ++g) {
    const struct done *d = &sc->log[g % LOG_SIZE];
    if (d->start < end && start < d->end)
      return false;
  }
  return true;
}

bool
scancache_insert (struct scancache *sc, uint64_t snap,
                  uint64_t offset, const void *data, size_t len)
{
  struct entry *e;
  size_t i;
  bool ok = false;

  if (len > sc->capacity)
    len = sc->capacity & ~((uint64_t) sc->blksize - 1);
  if (len == 0)
    return false;

  /* Allocate outside the lock. */
  e = calloc (1, sizeof *e);
  if (e == NULL)
    return false;
  e->offset = offset;
  e->len = len;
  e->nblocks = (len + sc->blksize - 1) / sc->blksize;
  e->data = malloc (len);
  e->consumed = calloc ((e->nblocks + 7) / 8, 1);
  if (e->data == NULL || e->consumed == NULL) {
    entry_free (e);
    return false;
  }
  memcpy (e->data, data, len);

  pthread_mutex_lock (&sc->lock);
  if (!insert_allowed (sc, snap, offset, offset + len)) {
    sc->st.refused++;
    goto out;
  }
  remove_range (sc, offset, offset + len);
  while (sc->used + len > sc->capacity && sc->tail)
    remove_lru (sc);

  if (sc->n == sc->alloc) {
    size_t nalloc = sc->alloc ? sc->alloc * 2 : 64;
    struct entry **p = realloc (sc->v, nalloc * sizeof *p);
    if (p == NULL)
      goto out;
    sc->v = p;
    sc->alloc = nalloc;
  }
  i = search (sc, offset);
  memmove (&sc->v[i+1], &sc->v[i], (sc->n - i) * sizeof sc->v[0]);
  sc->v[i] = e;
  sc->n++;
  sc->used += len;
  lru_push_front (sc, e);
  sc->st.inserted++;
  ok = true;
  e = NULL;
 out:
  pthread_mutex_unlock (&sc->lock);
  if (e)
    entry_free (e);
  return ok;
}

/* Mark blocks of E fully inside [REL_S, REL_E) (relative to E) as read.
 * Returns true if every block of E has now been read.
 */
static bool
consume (struct scancache *sc, struct entry *e, size_t rel_s, size_t rel_e)
{
  const size_t bs = sc->blksize;
  size_t b, first, last;

  first = (rel_s + bs - 1) / bs;
  last = rel_e == e->len ? e->nblocks : rel_e / bs;
  for (b = first; b < last; ++b) {
    if ((e->consumed[b / 8] & (1u << (b % 8))) == 0) {
      e->consumed[b / 8] |= 1u << (b % 8);
      e->nconsumed++;
    }
  }
  return e->nconsumed == e->nblocks;
}

size_t
scancache_read (struct scancache *sc, void *buf,
                uint64_t offset, size_t count, bool consume_blocks,
                size_t *uncached)
{
  size_t copied = 0;
  size_t i;

  pthread_mutex_lock (&sc->lock);
  i = search (sc, offset);
  while (copied < count && i < sc->n && sc->v[i]->offset <= offset + copied) {
    struct entry *e = sc->v[i];
    uint64_t pos = offset + copied;
    size_t rel = pos - e->offset;
    size_t take = e->len - rel;

    if (take > count - copied)
      take = count - copied;
    if (buf) {
      memcpy ((char *) buf + copied, e->data + rel, take);
      lru_unlink (sc, e);
      lru_push_front (sc, e);
    }
    copied += take;
    if (buf && consume_blocks && consume (sc, e, rel, rel + take))
      remove_at (sc, i);        /* index i now names the next entry */
    else
      i++;
  }
  if (copied == 0 && uncached) {
    if (i < sc->n && sc->v[i]->offset - offset < count)
      *uncached = sc->v[i]->offset - offset;
    else
      *uncached = count;
  }
  pthread_mutex_unlock (&sc->lock);
  return copied;
}

void
scancache_get_stats (struct scancache *sc, struct scancache_stats *stats)
{
  pthread_mutex_lock (&sc->lock);
  *stats = sc->st;
  stats->entries = sc->n;
  stats->bytes = sc->used;
  pthread_mutex_unlock (&sc->lock);
}
