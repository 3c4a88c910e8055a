/* sparsebackup: the change tracker (see changes.h).
 *
 * Changes in flight are kept in an array; changes that ended are kept in
 * a ring of HISTORY events (generation + byte range), newest last.  When
 * the ring overwrites an event, its generation becomes LOST_GEN: a
 * snapshot older than that can no longer be answered and is refused
 * whole.  A change begun when the in-flight array could not grow is
 * "untracked": while one is in flight every question is refused, and
 * when it ends LOST_GEN moves past it.
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <errno.h>
#include <pthread.h>

#include "changes.h"
#include "minmax.h"
#include "vector.h"

#define TICKET_UNTRACKED (UINT64_C (1) << 63)

struct range {
  uint64_t start, end;
};

struct inflight {
  uint64_t ticket;
  struct range r;
};

struct event {
  uint64_t gen;
  struct range r;
};

DEFINE_VECTOR (inflight_vector, struct inflight);
DEFINE_VECTOR (range_vector, struct range);

struct changes {
  pthread_mutex_t lock;

  uint64_t gen;
  uint64_t next_ticket;
  inflight_vector inflight;
  uint64_t untracked;           /* untracked changes in flight */

  struct event *ring;
  size_t ring_size, ring_next, ring_len;
  uint64_t lost_gen;

  range_vector scratch;         /* for changes_unchanged (lock held) */

  struct changes_stats st;
};

struct changes *
changes_new (unsigned history)
{
  struct changes *ch;
  int err;

  if (history == 0) {
    errno = EINVAL;
    return NULL;
  }
  ch = calloc (1, sizeof *ch);
  if (ch == NULL)
    return NULL;
  ch->ring = calloc (history, sizeof ch->ring[0]);
  if (ch->ring == NULL) {
    free (ch);
    return NULL;
  }
  err = pthread_mutex_init (&ch->lock, NULL);
  if (err != 0) {
    free (ch->ring);
    free (ch);
    errno = err;
    return NULL;
  }
  ch->ring_size = history;
  ch->next_ticket = 1;
  return ch;
}

void
changes_free (struct changes *ch)
{
  if (ch == NULL)
    return;
  inflight_vector_reset (&ch->inflight);
  range_vector_reset (&ch->scratch);
  free (ch->ring);
  pthread_mutex_destroy (&ch->lock);
  free (ch);
}

void
changes_begin (struct changes *ch, uint64_t offset, uint64_t count,
               uint64_t *ticket)
{
  struct inflight f;

  if (count > UINT64_MAX - offset)
    count = UINT64_MAX - offset;

  pthread_mutex_lock (&ch->lock);
  f.ticket = ch->next_ticket++;
  if (ch->next_ticket == TICKET_UNTRACKED)
    ch->next_ticket = 1;
  f.r.start = offset;
  f.r.end = offset + count;
  ch->st.begun++;
  if (inflight_vector_append (&ch->inflight, f) == -1) {
    /* Out of memory: every question is refused until it ends. */
    ch->untracked++;
    ch->st.untracked++;
    f.ticket |= TICKET_UNTRACKED;
  }
  pthread_mutex_unlock (&ch->lock);
  *ticket = f.ticket;
}

static void
push_event (struct changes *ch, uint64_t gen, struct range r)
{
  struct event *ev = &ch->ring[ch->ring_next];

  /* Overwriting the oldest event (an untracked change may have moved
   * LOST_GEN further already).
   */
  if (ch->ring_len == ch->ring_size)
    ch->lost_gen = MAX (ch->lost_gen, ev->gen);
  else
    ch->ring_len++;
  ev->gen = gen;
  ev->r = r;
  ch->ring_next = (ch->ring_next + 1) % ch->ring_size;
}

void
changes_end (struct changes *ch, uint64_t ticket)
{
  size_t i;

  if (ticket == 0)
    return;
  pthread_mutex_lock (&ch->lock);
  if (ticket & TICKET_UNTRACKED) {
    if (ch->untracked > 0)
      ch->untracked--;
    /* Its range is unknown: no older snapshot may learn any more. */
    ch->lost_gen = ++ch->gen;
    goto out;
  }
  for (i = 0; i < ch->inflight.len; i++) {
    if (ch->inflight.ptr[i].ticket == ticket) {
      struct range r = ch->inflight.ptr[i].r;

      ch->inflight.ptr[i] = ch->inflight.ptr[ch->inflight.len - 1];
      ch->inflight.len--;
      push_event (ch, ++ch->gen, r);
      break;
    }
  }
  /* else: a ticket ended twice; nothing to do. */
 out:
  pthread_mutex_unlock (&ch->lock);
}

uint64_t
changes_snapshot (struct changes *ch)
{
  uint64_t gen;

  pthread_mutex_lock (&ch->lock);
  gen = ch->gen;
  pthread_mutex_unlock (&ch->lock);
  return gen;
}

/* Add the part of X inside R to the scratch list.  Lock held. */
static int
add_clipped (struct changes *ch, struct range x, struct range r)
{
  if (x.start >= x.end || x.end <= r.start || x.start >= r.end)
    return 0;                   /* empty, or outside R */
  x.start = MAX (x.start, r.start);
  x.end = MIN (x.end, r.end);
  return range_vector_append (&ch->scratch, x);
}

static int
compare_range (const void *av, const void *bv)
{
  const struct range *a = av, *b = bv;

  return a->start < b->start ? -1 : a->start > b->start;
}

uint64_t
changes_unchanged (struct changes *ch, uint64_t snap, uint64_t except,
                   uint64_t offset, uint64_t count,
                   changes_fn fn, void *opaque)
{
  struct range r;
  uint64_t given = 0, cur;
  size_t i, slot;

  if (count == 0)
    return 0;
  if (count > UINT64_MAX - offset)
    count = UINT64_MAX - offset;
  r.start = offset;
  r.end = offset + count;

  pthread_mutex_lock (&ch->lock);
  if (ch->untracked > 0 || snap < ch->lost_gen || snap > ch->gen)
    goto out;

  /* Collect every change in flight or ended after SNAP, inside R. */
  ch->scratch.len = 0;
  for (i = 0; i < ch->inflight.len; i++) {
    if (ch->inflight.ptr[i].ticket == except)
      continue;
    if (add_clipped (ch, ch->inflight.ptr[i].r, r) == -1)
      goto out;
  }
  slot = ch->ring_next;
  for (i = 0; i < ch->ring_len; i++) {
    const struct event *ev;

    /* Newest first: generations decrease going backwards. */
    slot = (slot + ch->ring_size - 1) % ch->ring_size;
    ev = &ch->ring[slot];
    if (ev->gen <= snap)
      break;
    if (add_clipped (ch, ev->r, r) == -1)
      goto out;
  }

  /* The gaps between them are unchanged. */
  if (ch->scratch.len > 1)
    qsort (ch->scratch.ptr, ch->scratch.len, sizeof ch->scratch.ptr[0],
           compare_range);
  cur = r.start;
  for (i = 0; i < ch->scratch.len && cur < r.end; i++) {
    const struct range *c = &ch->scratch.ptr[i];

    if (c->start > cur) {
      fn (opaque, cur, c->start - cur);
      given += c->start - cur;
    }
    cur = MAX (cur, c->end);
  }
  if (cur < r.end) {
    fn (opaque, cur, r.end - cur);
    given += r.end - cur;
  }

 out:
  ch->st.refused += count - given;
  pthread_mutex_unlock (&ch->lock);
  return given;
}

void
changes_get_stats (struct changes *ch, struct changes_stats *st)
{
  pthread_mutex_lock (&ch->lock);
  *st = ch->st;
  st->inflight = ch->inflight.len;
  pthread_mutex_unlock (&ch->lock);
}
