/* sparsebackup: qcow2 reader: the L2 table cache.
 *
 * See qcow2-internal.h for a map of the files.
 */

#include <config.h>

#include <inttypes.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2-internal.h"

/* L2 cache: slices of L2 tables, hashed by host offset, LRU eviction.
 * Entries are copied out under the lock so no slice is ever used after
 * it could have been evicted.
 */

int
q2_cache_init (struct l2cache *c, uint64_t bytes, uint32_t slice_bytes)
{
  uint64_t n = bytes / slice_bytes;
  uint32_t i;

  if (n < 1)
    n = 1;
  if (n > (UINT32_C(1) << 20))
    n = UINT32_C(1) << 20;
  c->nslots = n;
  c->nused = 0;
  c->nbuckets = 1;
  while (c->nbuckets < c->nslots)
    c->nbuckets <<= 1;
  c->slots = calloc (c->nslots, sizeof *c->slots);
  c->buckets = malloc (c->nbuckets * sizeof *c->buckets);
  if (c->slots == NULL || c->buckets == NULL) {
    free (c->slots);
    free (c->buckets);
    return -1;
  }
  for (i = 0; i < c->nbuckets; ++i)
    c->buckets[i] = -1;
  c->newest = c->oldest = -1;
  c->hits = c->misses = 0;
  if (pthread_mutex_init (&c->lock, NULL) != 0) {
    free (c->slots);
    free (c->buckets);
    return -1;
  }
  return 0;
}

void
q2_cache_free (struct l2cache *c)
{
  uint32_t i;

  for (i = 0; i < c->nused; ++i)
    free (c->slots[i].data);
  free (c->slots);
  free (c->buckets);
  pthread_mutex_destroy (&c->lock);
}

static inline uint32_t
cache_bucket (const struct l2cache *c, uint64_t key)
{
  return (uint32_t) (((key >> 9) * UINT64_C(0x9e3779b97f4a7c15)) >> 32)
    & (c->nbuckets - 1);
}

/* The LRU list (called with the lock held). */
static void
lru_unlink (struct l2cache *c, int32_t i)
{
  struct l2slot *s = &c->slots[i];

  if (s->newer != -1)
    c->slots[s->newer].older = s->older;
  else
    c->newest = s->older;
  if (s->older != -1)
    c->slots[s->older].newer = s->newer;
  else
    c->oldest = s->newer;
}

static void
lru_push (struct l2cache *c, int32_t i)
{
  struct l2slot *s = &c->slots[i];

  s->newer = -1;
  s->older = c->newest;
  if (c->newest != -1)
    c->slots[c->newest].newer = i;
  else
    c->oldest = i;
  c->newest = i;
}

/* Find KEY and make it the most recently used (lock held). */
static struct l2slot *
cache_find (struct l2cache *c, uint64_t key)
{
  int32_t i;

  for (i = c->buckets[cache_bucket (c, key)]; i != -1; i = c->slots[i].next) {
    if (c->slots[i].key == key) {
      if (c->newest != i) {
        lru_unlink (c, i);
        lru_push (c, i);
      }
      return &c->slots[i];
    }
  }
  return NULL;
}

/* Store the slice KEY (SLICE_BYTES bytes at DATA) in a free or recycled
 * slot (lock held).  Return NULL if out of memory.
 */
static struct l2slot *
cache_insert (struct l2cache *c, uint64_t key, const uint64_t *data,
              uint32_t slice_bytes)
{
  struct l2slot *s;
  int32_t victim;
  int32_t *pp;

  if (c->nused < c->nslots) {
    victim = c->nused;
    s = &c->slots[victim];
    s->data = malloc (slice_bytes);
    if (s->data == NULL)
      return NULL;
    c->nused++;
  }
  else {
    victim = c->oldest;
    s = &c->slots[victim];
    /* Unlink the evicted slice from its hash chain and the LRU list. */
    for (pp = &c->buckets[cache_bucket (c, s->key)]; *pp != -1;
         pp = &c->slots[*pp].next) {
      if (*pp == victim) {
        *pp = s->next;
        break;
      }
    }
    lru_unlink (c, victim);
  }
  s->key = key;
  memcpy (s->data, data, slice_bytes);
  s->next = c->buckets[cache_bucket (c, key)];
  c->buckets[cache_bucket (c, key)] = victim;
  lru_push (c, victim);
  return s;
}

/* Copy N entries of the L2 table at host offset L2OFF, starting at
 * entry IDX, into OUT (entry_words words each).  The entries must lie in
 * one slice.
 */
int
q2_l2_get (struct layer *l, uint64_t l2off, uint32_t idx, uint32_t n,
           uint64_t *out, struct err *e)
{
  struct l2cache *c = &l->cache;
  uint32_t slice = idx / l->slice_entries;
  uint32_t first = idx % l->slice_entries;
  uint64_t key = l2off + (uint64_t) slice * l->slice_bytes;
  size_t words = (size_t) n * l->entry_words;
  size_t skip = (size_t) first * l->entry_words;
  struct l2slot *s;
  uint64_t data[MAX_SLICE_BYTES / 8];
  uint32_t i;

  pthread_mutex_lock (&c->lock);
  s = cache_find (c, key);
  if (s) {
    c->hits++;
    memcpy (out, s->data + skip, words * sizeof (uint64_t));
    pthread_mutex_unlock (&c->lock);
    return 0;
  }
  c->misses++;
  pthread_mutex_unlock (&c->lock);

  /* Load the slice without holding the lock. */
  if (key > l->io.size || l->io.size - key < l->slice_bytes) {
    q2_seterr (e, l->name, "L2 table at offset 0x%" PRIx64 " extends "
               "beyond the end of the file (size 0x%" PRIx64 ")",
               l2off, l->io.size);
    return -1;
  }
  if (q2_io_read (&l->io, l->name, data, l->slice_bytes, key, e) == -1)
    return -1;
  for (i = 0; i < l->slice_bytes / 8; ++i)
    data[i] = be64 ((const uint8_t *) &data[i]);
  memcpy (out, data + skip, words * sizeof (uint64_t));

  /* Cache it unless another thread did meanwhile.  If there is no
   * memory for a new slot the slice is simply not cached.
   */
  pthread_mutex_lock (&c->lock);
  if (cache_find (c, key) == NULL)
    cache_insert (c, key, data, l->slice_bytes);
  pthread_mutex_unlock (&c->lock);
  return 0;
}
