/* sparsebackup: the scan cache (see scancache.h).
 *
 * Pure C: no nbdkit headers.
 */

#include <config.h>

#include <stdlib.h>
#include <string.h>
#include <errno.h>
#include <pthread.h>

#include "scancache.h"
#include "changes.h"
#include "cleanup.h"
#include "ispowerof2.h"
#include "vector.h"

struct entry {
  uint64_t offset;
  size_t len;
  size_t nblocks;
  size_t nconsumed;
  unsigned char *data;
  unsigned char *consumed;              /* bitmap, one bit per block */
  struct entry *prev, *next;            /* LRU list, head = most recent */
};

DEFINE_VECTOR (entry_vector, struct entry *);

struct scancache {
  pthread_mutex_t lock;
  uint64_t capacity;
  uint32_t blksize;

  entry_vector v;                       /* sorted by offset, disjoint */
  struct entry *head, *tail;
  uint64_t used;

  struct changes *changes;              /* the disk's, not owned */

  struct scancache_stats st;
};

struct scancache *
scancache_new (uint64_t capacity, uint32_t blksize, struct changes *changes)
{
  struct scancache *sc;

  if (capacity == 0 || !is_power_of_2 (blksize) || changes == NULL) {
    errno = EINVAL;
    return NULL;
  }
  sc = calloc (1, sizeof *sc);
  if (sc == NULL)
    return NULL;
  pthread_mutex_init (&sc->lock, NULL);
  sc->capacity = capacity;
  sc->blksize = blksize;
  sc->changes = changes;
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
  for (i = 0; i < sc->v.len; ++i)
    entry_free (sc->v.ptr[i]);
  entry_vector_reset (&sc->v);
  pthread_mutex_destroy (&sc->lock);
  free (sc);
}

/* Index of the first entry ending after OFFSET (or n).  Lock held. */
static size_t
search (struct scancache *sc, uint64_t offset)
{
  size_t lo = 0, hi = sc->v.len;

  while (lo < hi) {
    size_t mid = lo + (hi - lo) / 2;
    const struct entry *e = sc->v.ptr[mid];
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
  struct entry *e = sc->v.ptr[i];

  lru_unlink (sc, e);
  entry_vector_remove (&sc->v, i);
  sc->used -= e->len;
  entry_free (e);
}

/* Remove every entry overlapping [START, END).  Lock held. */
static void
remove_range (struct scancache *sc, uint64_t start, uint64_t end)
{
  size_t i = search (sc, start);

  while (i < sc->v.len && sc->v.ptr[i]->offset < end)
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

void
scancache_drop (struct scancache *sc, uint64_t offset, uint64_t count)
{
  SCOPED_MUTEX (&sc->lock);

  remove_range (sc, offset, count > UINT64_MAX - offset ?
                UINT64_MAX : offset + count);
}

struct insert {
  struct scancache *sc;
  struct entry *e;              /* set to NULL once linked */
};

/* changes_unchanged callback: link the entry if the whole of it is
 * unchanged (tracker lock held, so no change can drop it before).
 */
static void
insert_cb (void *opaque, uint64_t offset, uint64_t count)
{
  struct insert *ins = opaque;
  struct scancache *sc = ins->sc;
  struct entry *e = ins->e;
  size_t i;

  if (e == NULL || offset != e->offset || count != e->len)
    return;

  SCOPED_MUTEX (&sc->lock);
  remove_range (sc, e->offset, e->offset + e->len);
  while (sc->used + e->len > sc->capacity && sc->tail)
    remove_lru (sc);
  if (entry_vector_reserve (&sc->v, 1) == -1)
    return;                     /* not inserted: refused */
  i = search (sc, e->offset);
  memmove (&sc->v.ptr[i + 1], &sc->v.ptr[i],
           (sc->v.len - i) * sizeof sc->v.ptr[0]);
  sc->v.ptr[i] = e;
  sc->v.len++;
  sc->used += e->len;
  lru_push_front (sc, e);
  sc->st.inserted++;
  ins->e = NULL;
}

bool
scancache_insert (struct scancache *sc, uint64_t snap,
                  uint64_t offset, const void *data, size_t len)
{
  struct entry *e;
  struct insert ins;

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

  ins.sc = sc;
  ins.e = e;
  changes_unchanged (sc->changes, snap, 0, offset, len, insert_cb, &ins);
  if (ins.e == NULL)
    return true;
  __atomic_fetch_add (&sc->st.refused, 1, __ATOMIC_RELAXED);
  entry_free (e);
  return false;
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
  SCOPED_MUTEX (&sc->lock);

  i = search (sc, offset);
  while (copied < count && i < sc->v.len &&
         sc->v.ptr[i]->offset <= offset + copied) {
    struct entry *e = sc->v.ptr[i];
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
    if (i < sc->v.len && sc->v.ptr[i]->offset - offset < count)
      *uncached = sc->v.ptr[i]->offset - offset;
    else
      *uncached = count;
  }
  return copied;
}

void
scancache_get_stats (struct scancache *sc, struct scancache_stats *stats)
{
  SCOPED_MUTEX (&sc->lock);

  *stats = sc->st;
  stats->refused = __atomic_load_n (&sc->st.refused, __ATOMIC_RELAXED);
  stats->entries = sc->v.len;
  stats->bytes = sc->used;
}
