/* sparsebackup: the granule states of a frozen disk (cowmap.h).
 *
 * Three bitmaps: saved (SAVED or ZERO), zero (ZERO, with saved), busy
 * (BUSY).  The slot of each stored granule in a two-level table: one
 * leaf of SLOT_LEAF entries (slot + 1, 0 = none) per region of the
 * disk in which anything was stored, allocated on the first store
 * there, so the table grows with what is stored.  One mutex for all of
 * it; one condition variable signalled whenever BUSY granules stop
 * being BUSY.
 */

#include <config.h>

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "cowmap.h"
#include "minmax.h"

struct cowmap {
  pthread_mutex_t lock;
  pthread_cond_t cond;
  uint64_t size, nr;
  unsigned gbits;
  uint64_t *saved, *zero, *busy;
  uint32_t **slots;             /* nr / SLOT_LEAF leaves, NULL: none */
  uint64_t used;                /* bytes stored */
  uint64_t next_slot;           /* slots handed out */
  char broken[COWMAP_REASON_MAX];
};

#define SLOT_LEAF 4096

static inline bool
test_bit (const uint64_t *v, uint64_t g)
{
  return v[g / 64] & (UINT64_C (1) << (g % 64));
}

static inline void
set_bit (uint64_t *v, uint64_t g)
{
  v[g / 64] |= UINT64_C (1) << (g % 64);
}

static inline void
clear_bit (uint64_t *v, uint64_t g)
{
  v[g / 64] &= ~(UINT64_C (1) << (g % 64));
}

struct cowmap *
cowmap_new (uint64_t size, unsigned gbits)
{
  struct cowmap *m;
  uint64_t words;

  if (size == 0 || gbits < 9 || gbits > 40 ||
      ((size - 1) >> gbits) >= UINT32_MAX) {
    errno = EINVAL;
    return NULL;
  }
  m = calloc (1, sizeof *m);
  if (m == NULL)
    return NULL;
  m->size = size;
  m->gbits = gbits;
  m->nr = ((size - 1) >> gbits) + 1;
  words = (m->nr + 63) / 64;
  if (words > SIZE_MAX / sizeof (uint64_t)) {
    free (m);
    errno = ENOMEM;
    return NULL;
  }
  m->saved = calloc (words, sizeof (uint64_t));
  m->zero = calloc (words, sizeof (uint64_t));
  m->busy = calloc (words, sizeof (uint64_t));
  m->slots = calloc ((m->nr + SLOT_LEAF - 1) / SLOT_LEAF, sizeof *m->slots);
  if (m->saved == NULL || m->zero == NULL || m->busy == NULL ||
      m->slots == NULL) {
    cowmap_free (m);
    errno = ENOMEM;
    return NULL;
  }
  pthread_mutex_init (&m->lock, NULL);
  pthread_cond_init (&m->cond, NULL);
  return m;
}

void
cowmap_free (struct cowmap *m)
{
  if (m == NULL)
    return;
  if (m->saved && m->zero && m->busy && m->slots) {
    pthread_mutex_destroy (&m->lock);
    pthread_cond_destroy (&m->cond);
  }
  if (m->slots)
    for (uint64_t i = 0; i < (m->nr + SLOT_LEAF - 1) / SLOT_LEAF; ++i)
      free (m->slots[i]);
  free (m->slots);
  free (m->saved);
  free (m->zero);
  free (m->busy);
  free (m);
}

uint64_t
cowmap_granules (const struct cowmap *m)
{
  return m->nr;
}

/* Lock held: the mask of the granules of word W that are in state ST
 * (and not BUSY); the bit of granule G is (mask >> (G % 64)) & 1.
 */
static inline uint64_t
state_mask (const struct cowmap *m, uint64_t w, enum cow_state st)
{
  const uint64_t idle = ~m->busy[w];

  switch (st) {
  case COW_UNSAVED: return ~m->saved[w] & idle;
  case COW_SAVED: return m->saved[w] & ~m->zero[w] & idle;
  case COW_ZERO: return m->saved[w] & m->zero[w] & idle;
  }
  return 0;
}

/* Lock held: the first granule from G (before END) that is not in state
 * ST, or END.  Whole words at a time: a 1 TiB disk of 64K granules is
 * 256K words.
 */
static uint64_t
skip_state (const struct cowmap *m, uint64_t g, uint64_t end,
            enum cow_state st)
{
  while (g < end) {
    uint64_t w = g / 64, mask = ~state_mask (m, w, st);

    mask &= ~UINT64_C (0) << (g % 64);  /* from G on */
    if (mask != 0) {
      uint64_t first = w * 64 + (uint64_t) __builtin_ctzll (mask);
      return MIN (first, end);
    }
    g = (w + 1) * 64;
  }
  return end;
}

/* Lock held: the first granule from G (before END) that is not saved
 * (SAVED or ZERO), or END.
 */
static uint64_t
skip_saved (const struct cowmap *m, uint64_t g, uint64_t end)
{
  while (g < end) {
    uint64_t w = g / 64, mask = ~m->saved[w] & (~UINT64_C (0) << (g % 64));

    if (mask != 0)
      return MIN (w * 64 + (uint64_t) __builtin_ctzll (mask), end);
    g = (w + 1) * 64;
  }
  return end;
}

/* ---- Writers -------------------------------------------------------- */

int
cowmap_claim (struct cowmap *m, uint64_t *cursor, uint64_t end,
              uint64_t max_run, uint64_t *a, uint64_t *b)
{
  uint64_t g;
  int r = 0;

  end = MIN (end, m->nr);
  max_run = MAX (max_run, UINT64_C (1));
  pthread_mutex_lock (&m->lock);
  g = *cursor;
  while (g < end && m->broken[0] == '\0') {
    if (test_bit (m->saved, g)) {
      g = skip_saved (m, g, end);
      continue;
    }
    if (test_bit (m->busy, g)) {          /* another change saves it */
      pthread_cond_wait (&m->cond, &m->lock);
      continue;
    }
    *a = g;
    while (g < end && g - *a < max_run &&
           !test_bit (m->saved, g) && !test_bit (m->busy, g))
      set_bit (m->busy, g++);
    *b = g;
    r = 1;
    break;
  }
  *cursor = g;
  pthread_mutex_unlock (&m->lock);
  return r;
}

void
cowmap_set_zero (struct cowmap *m, uint64_t g)
{
  pthread_mutex_lock (&m->lock);
  if (g < m->nr && test_bit (m->busy, g))
    set_bit (m->zero, g);
  pthread_mutex_unlock (&m->lock);
}

void
cowmap_done (struct cowmap *m, uint64_t a, uint64_t done, uint64_t b)
{
  pthread_mutex_lock (&m->lock);
  for (uint64_t g = a; g < b && g < m->nr; ++g) {
    if (g < done)
      set_bit (m->saved, g);
    else
      clear_bit (m->zero, g);
    clear_bit (m->busy, g);
  }
  pthread_cond_broadcast (&m->cond);
  pthread_mutex_unlock (&m->lock);
}

int
cowmap_store (struct cowmap *m, uint64_t a, uint64_t b, uint64_t n,
              uint64_t limit, uint64_t *slot)
{
  if (a >= b || b > m->nr) {
    errno = EINVAL;
    return -1;
  }
  pthread_mutex_lock (&m->lock);
  if (m->used > limit || limit - m->used < n) {
    pthread_mutex_unlock (&m->lock);
    errno = ENOSPC;
    return -1;
  }
  for (uint64_t l = a / SLOT_LEAF; l <= (b - 1) / SLOT_LEAF; ++l)
    if (m->slots[l] == NULL) {
      m->slots[l] = calloc (SLOT_LEAF, sizeof (uint32_t));
      if (m->slots[l] == NULL) {
        pthread_mutex_unlock (&m->lock);
        errno = ENOMEM;
        return -1;
      }
    }
  *slot = m->next_slot;
  for (uint64_t g = a; g < b; ++g)
    m->slots[g / SLOT_LEAF][g % SLOT_LEAF] =
      (uint32_t) (m->next_slot + (g - a) + 1);
  m->next_slot += b - a;
  m->used += n;
  pthread_mutex_unlock (&m->lock);
  return 0;
}

void
cowmap_unstore (struct cowmap *m, uint64_t n)
{
  pthread_mutex_lock (&m->lock);
  m->used -= MIN (n, m->used);
  pthread_mutex_unlock (&m->lock);
}

uint64_t
cowmap_slot (struct cowmap *m, uint64_t g)
{
  uint64_t s = 0;

  pthread_mutex_lock (&m->lock);
  if (g < m->nr && m->slots[g / SLOT_LEAF])
    s = m->slots[g / SLOT_LEAF][g % SLOT_LEAF];
  pthread_mutex_unlock (&m->lock);
  return s ? s - 1 : UINT64_MAX;
}

uint64_t
cowmap_slots (struct cowmap *m)
{
  uint64_t n;

  pthread_mutex_lock (&m->lock);
  n = m->next_slot;
  pthread_mutex_unlock (&m->lock);
  return n;
}

uint64_t
cowmap_used (struct cowmap *m)
{
  uint64_t u;

  pthread_mutex_lock (&m->lock);
  u = m->used;
  pthread_mutex_unlock (&m->lock);
  return u;
}

/* ---- Readers -------------------------------------------------------- */

/* Lock held: the state of granule G (not BUSY). */
static enum cow_state
state_of (const struct cowmap *m, uint64_t g)
{
  if (!test_bit (m->saved, g))
    return COW_UNSAVED;
  return test_bit (m->zero, g) ? COW_ZERO : COW_SAVED;
}

enum cow_state
cowmap_run (struct cowmap *m, uint64_t pos, uint64_t end, uint64_t *rend)
{
  uint64_t g = pos >> m->gbits;
  enum cow_state st;

  end = MIN (end, m->size);
  if (pos >= end) {
    *rend = pos;
    return COW_UNSAVED;
  }
  pthread_mutex_lock (&m->lock);
  while (test_bit (m->busy, g))
    pthread_cond_wait (&m->cond, &m->lock);
  st = state_of (m, g);
  g = skip_state (m, g + 1, ((end - 1) >> m->gbits) + 1, st);
  pthread_mutex_unlock (&m->lock);
  *rend = MIN (g << m->gbits, end);
  return st;
}

uint64_t
cowmap_check (struct cowmap *m, uint64_t pos, uint64_t end)
{
  uint64_t r = end;

  end = MIN (end, m->size);
  pthread_mutex_lock (&m->lock);
  if (m->broken[0] != '\0')
    r = pos;
  else if (pos < end) {
    uint64_t g1 = ((end - 1) >> m->gbits) + 1;
    uint64_t g = skip_state (m, pos >> m->gbits, g1, COW_UNSAVED);

    if (g < g1)
      r = MAX (pos, g << m->gbits);
  }
  pthread_mutex_unlock (&m->lock);
  return r;
}

/* ---- Breaking ------------------------------------------------------- */

bool
cowmap_break (struct cowmap *m, const char *reason)
{
  bool first;

  pthread_mutex_lock (&m->lock);
  first = m->broken[0] == '\0';
  if (first)
    snprintf (m->broken, sizeof m->broken, "%s",
              reason && reason[0] ? reason : "broken");
  pthread_cond_broadcast (&m->cond);
  pthread_mutex_unlock (&m->lock);
  return first;
}

bool
cowmap_broken (struct cowmap *m, char *buf, size_t len)
{
  bool b;

  pthread_mutex_lock (&m->lock);
  b = m->broken[0] != '\0';
  if (buf && len > 0)
    snprintf (buf, len, "%s", m->broken);
  pthread_mutex_unlock (&m->lock);
  return b;
}
