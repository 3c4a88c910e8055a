/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): checkpoints.  Names, creating (pending or not),
 * confirming, failing and deleting checkpoints, and reading the table.
 *
 * A change builds a new state in memory, writes what is new (records,
 * their indexes, the table, a directory) into free blocks and publishes
 * it (cbt_publish: sync, superblock, sync).  Marks go on meanwhile:
 *
 *  - create: the current record is swapped for a new, empty one (whose
 *    directory is the next directory the published superblock already
 *    names, so that a mark made from then on is found by the loader
 *    whichever superblock wins), then the old one is made complete on
 *    disk and its index written: it becomes the frozen record of the
 *    previous checkpoint;
 *  - confirm: a new table;
 *  - delete: a new table, and a merge: two frozen records into one new
 *    record (pages only one of them holds are shared, not copied), or
 *    the last frozen record into the current one (setting bits, as marks
 *    do: durable, in write-ahead and process-safe modes, before the new
 *    state is published).
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "cbt-private.h"

#define MERGE_BATCH 16          /* pages set in the current record at a time */

/* ---- Names and boot ids -------------------------------------------- */

bool
cbt_name_valid (const char *name)
{
  size_t len;

  if (name == NULL)
    return false;
  len = strnlen (name, CBT_NAME_MAX + 1);
  return len >= 1 && len <= CBT_NAME_MAX && name[0] != '-' &&
    printable (name, len, false);
}

/* The first checks of a checkpoint entry E (number I of NR) of a file
 * being loaded, the same in both versions of the format: its name
 * (NUL-padded, valid, not a duplicate), its state (good or pending,
 * pending only last) and its flags (none).  Fills in st->cps[i]'s name
 * and state.  -1 with the message in ERR if any is wrong.
 */
int
cbt_load_entry_head (struct state *st, uint32_t i, uint32_t nr,
                     const uint8_t *e, char *err, size_t errlen)
{
  struct cpe *cp = &st->cps[i];
  size_t len = strnlen ((const char *) e + CP_NAME, 64);
  bool last = i + 1 == nr;

  if (len > CBT_NAME_MAX || !all_zero (e + CP_NAME + len, 64 - len))
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: checkpoint %" PRIu32 " name: not a NUL-padded string "
                   "of at most %d bytes", i, CBT_NAME_MAX);
      return -1;
    }
  memcpy (cp->name, e + CP_NAME, len);
  cp->name[len] = '\0';
  if (!cbt_name_valid (cp->name))
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: checkpoint %" PRIu32 " name: '%.*s' is not a valid name "
                   "(1-%d printable characters, no space, not starting with '-')",
                   i, (int) len, printable (cp->name, len, true) ? cp->name : "?",
                   CBT_NAME_MAX);
      return -1;
    }
  for (uint32_t j = 0; j < i; ++j)
    if (strcmp (st->cps[j].name, cp->name) == 0)
      {
        cbt_failure (err, errlen, EINVAL,
                     "cbt: checkpoint %" PRIu32 " name: '%s' is a duplicate of "
                     "checkpoint %" PRIu32, i, cp->name, j);
        return -1;
      }
  cp->state = get32 (e + CP_STATE);
  if (cp->state != CBT_STATE_GOOD && cp->state != CBT_STATE_PENDING)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: checkpoint %" PRIu32 " '%s' state: %" PRIu32
                   " (expected 1 good or 2 pending)", i, cp->name, cp->state);
      return -1;
    }
  if (cp->state == CBT_STATE_PENDING && !last)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: checkpoint %" PRIu32 " '%s' state: pending but not the "
                   "last checkpoint", i, cp->name);
      return -1;
    }
  if (get32 (e + CP_FLAGS) != 0)
    {
      cbt_failure (err, errlen, EINVAL,
                   "cbt: checkpoint %" PRIu32 " '%s' flags: 0x%" PRIx32
                   " (no flags are defined)", i, cp->name, get32 (e + CP_FLAGS));
      return -1;
    }
  return 0;
}

int
cbt_read_boot_id (char *buf, size_t len, char *err, size_t errlen)
{
  static const char path[] = "/proc/sys/kernel/random/boot_id";
  char tmp[128];
  ssize_t n;
  int fd = open (path, O_RDONLY | O_CLOEXEC);

  if (fd == -1)
    return cbt_failure (err, errlen, errno,
                        "cbt: %s: %s", path, strerror (errno));
  n = read (fd, tmp, sizeof tmp - 1);
  if (n == -1) {
    int e = errno;
    close (fd);
    return cbt_failure (err, errlen, e,
                        "cbt: reading %s: %s", path, strerror (e));
  }
  close (fd);
  while (n > 0 && (tmp[n - 1] == '\n' || tmp[n - 1] == ' '))
    n--;
  tmp[n] = '\0';
  if (n == 0 || n > CBT_BOOT_ID_MAX || !printable (tmp, (size_t) n, false))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: %s does not hold a boot id", path);
  if ((size_t) n >= len)
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: the boot id does not fit the buffer");
  memcpy (buf, tmp, (size_t) n + 1);
  return 0;
}

/* ---- Taking part in a change ----------------------------------------- */

/* Take struct_lock for a change of the checkpoints; -1 if not possible. */
static int
begin_change (struct cbt *c, const char *name, char *err, size_t errlen)
{
  if (c->read_only)
    return cbt_failure (err, errlen, EROFS, "cbt: opened read-only");
  if (!cbt_name_valid (name))
    return cbt_failure (err, errlen, EINVAL,
                        "cbt: invalid checkpoint name '%s' (1-%d printable "
                        "characters, no space, not starting with '-')",
                        name && printable (name, strlen (name), true) ? name : "?",
                        CBT_NAME_MAX);
  pthread_mutex_lock (&c->struct_lock);
  if (cbt_check_io (c, err, errlen) == -1) {
    pthread_mutex_unlock (&c->struct_lock);
    return -1;
  }
  return 0;
}

static int
end_change (struct cbt *c, int r)
{
  int e = errno;
  pthread_mutex_unlock (&c->struct_lock);
  errno = e;
  return r;
}

/* The state in force, with a reference (struct_lock held: it cannot
 * change under us).
 */
static struct state *
in_force (struct cbt *c)
{
  struct state *s;

  pthread_mutex_lock (&c->lock);
  s = c->st;
  cbt_state_ref (s);
  pthread_mutex_unlock (&c->lock);
  return s;
}

static uint32_t
published_crc (struct cbt *c)
{
  uint32_t r;

  pthread_mutex_lock (&c->lock);
  r = c->pub.cur_crc;
  pthread_mutex_unlock (&c->lock);
  return r;
}

/* A failure after the point of no return: sticky. */
static int
fatal (struct cbt *c, int e, char *err, size_t errlen, const char *what)
{
  if (e == 0)
    e = EIO;
  cbt_io_failed (c, e);
  return cbt_failure (err, errlen, EIO,
                      "cbt: %s: %s (the file is left as it was before; "
                      "reopen it)", what, strerror (e));
}

/* NS: its table written and published, with the current record's
 * crc CUR_CRC (used if the file is clean).  Releases NS on failure.
 */
static int
finish (struct cbt *c, struct state *ns, uint32_t cur_crc,
        char *err, size_t errlen)
{
  struct sbv v;

  if (cbt_write_table (c, ns) == -1) {
    int e = errno;
    cbt_state_unref (c, ns);
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the checkpoint table: %s", strerror (e));
  }
  v = cbt_state_sbv (c, ns, cur_crc);
  return cbt_publish (c, ns, &v, err, errlen);
}

/* A copy of S holding its next directory too (the table is new). */
static struct state *
copy_state (struct cbt *c, const struct state *s)
{
  struct state *ns = cbt_state_copy (s);

  if (ns) {
    ns->next_dir = s->next_dir;
    cbt_hold (c, s->next_dir, c->dir_blocks);
  }
  return ns;
}

/* Remove entry K of NS (dropping its reference on its record). */
static void
remove_entry (struct cbt *c, struct state *ns, size_t k)
{
  cbt_frec_unref (c, ns->cps[k].rec);
  memmove (&ns->cps[k], &ns->cps[k + 1],
           (ns->n - k - 1) * sizeof ns->cps[0]);
  ns->n--;
}

/* ---- Create ----------------------------------------------------------- */

int
cbt_checkpoint_create (struct cbt *c, const char *name, bool pending,
                       char *err, size_t errlen)
{
  return cbt_checkpoint_create_cb (c, name, pending, NULL, NULL, err, errlen);
}

int
cbt_checkpoint_create_cb (struct cbt *c, const char *name, bool pending,
                          void (*taken) (void *opaque), void *opaque,
                          char *err, size_t errlen)
{
  struct state *s, *mid = NULL, *ns = NULL;
  struct mrec *old, *fresh = NULL;
  struct frec *rec = NULL;
  uint32_t next2;
  uint64_t gen;
  size_t n;
  int e;

  if (begin_change (c, name, err, errlen) == -1)
    return -1;
  s = in_force (c);
  n = s->n;
  for (size_t i = 0; i < n; ++i)
    if (strcmp (s->cps[i].name, name) == 0) {
      cbt_seterr (err, errlen, "cbt: checkpoint '%s' exists", name);
      errno = EEXIST;
      goto refuse;
    }
  if (n > 0 && s->cps[n - 1].state == CBT_STATE_PENDING) {
    cbt_seterr (err, errlen, "cbt: checkpoint '%s' is pending: end its "
                "backup first", s->cps[n - 1].name);
    errno = EBUSY;
    goto refuse;
  }
  if (n >= CBT_MAX_CHECKPOINTS) {
    cbt_seterr (err, errlen, "cbt: %d checkpoints already (the limit): "
                "delete one first", CBT_MAX_CHECKPOINTS);
    errno = EMLINK;
    goto refuse;
  }

  /* Before the swap, what may fail harmlessly: the next directory of
   * the new state, the new current record (on the next directory of
   * this one), the state in force meanwhile.
   */
  if (cbt_alloc (c, c->dir_blocks, &next2) == -1) {
    cbt_seterr (err, errlen, "cbt: allocating a directory: %s",
                strerror (errno));
    errno = errno == ENOMEM ? ENOMEM : EIO;
    goto refuse;
  }
  if (cbt_write_zeros (c, next2, c->dir_blocks) == -1) {
    e = errno;
    cbt_release (c, next2, c->dir_blocks);
    cbt_seterr (err, errlen, "cbt: writing a directory: %s", strerror (e));
    errno = EIO;
    goto refuse;
  }
  fresh = cbt_mrec_new (c, s->next_dir);
  mid = cbt_state_copy (s);
  ns = cbt_state_copy (s);
  if (fresh == NULL || mid == NULL || ns == NULL) {
    if (fresh)
      fresh->dir = 0;
    cbt_mrec_unref (c, fresh);
    cbt_state_unref (c, mid);
    cbt_state_unref (c, ns);
    cbt_release (c, next2, c->dir_blocks);
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto refuse;
  }
  cbt_hold (c, s->next_dir, c->dir_blocks);     /* fresh's directory */
  old = s->cur[s->ncur - 1];
  mid->cur[mid->ncur++] = fresh;                /* [old, fresh] */
  if (s->table_blk) {
    mid->table_blk = s->table_blk;
    mid->table_size = s->table_size;
    mid->table_crc = s->table_crc;
    cbt_hold (c, s->table_blk, blocks_for (s->table_size));
  }
  mid->next_dir = s->next_dir;
  cbt_hold (c, s->next_dir, c->dir_blocks);

  /* The swap: from here on marks go to FRESH, after the checkpoint. */
  pthread_mutex_lock (&c->lock);
  c->st = mid;
  gen = c->mark_gen;
  pthread_mutex_unlock (&c->lock);
  cbt_state_unref (c, s);               /* the reference c->st had */
  if (taken)
    taken (opaque);

  /* OLD complete on disk (no more marks reach it). */
  if (n > 0) {
    switch (c->mode) {
    case CBT_MODE_WRITE_AHEAD:
      if (cbt_commit_upto (c, gen) == -1) {
        e = c->io_error;
        goto fatal;
      }
      break;
    case CBT_MODE_IN_USE:
      cbt_token_take (c);
      e = cbt_write_dirty (c, &old, 1) == -1 ? errno : 0;
      cbt_token_give (c);
      if (e)
        goto fatal;
      break;
    case CBT_MODE_PROCESS_SAFE:
      /* Written by each mark: wait for the writes in flight. */
      if (cbt_ps_flush (c, old) == -1) {
        e = c->io_error;
        goto fatal;
      }
      break;
    }
    rec = cbt_freeze (c, old, err, errlen);
    if (rec == NULL) {
      e = errno;
      cbt_io_failed (c, e);
      cbt_state_unref (c, ns);
      cbt_state_unref (c, s);
      errno = EIO;
      return end_change (c, -1);
    }
  }

  /* The new state: OLD frozen as the record of the previous checkpoint,
   * the new checkpoint last with FRESH as its record.
   */
  cbt_mrec_unref (c, ns->cur[0]);
  ns->cur[0] = fresh;
  ns->ncur = 1;
  __atomic_add_fetch (&fresh->refs, 1, __ATOMIC_RELAXED);
  if (n > 0)
    ns->cps[n - 1].rec = rec;
  memset (&ns->cps[n], 0, sizeof ns->cps[n]);
  strcpy (ns->cps[n].name, name);
  ns->cps[n].state = pending ? CBT_STATE_PENDING : CBT_STATE_GOOD;
  ns->cps[n].created = (uint64_t) time (NULL);
  ns->cps[n].serial = ns->next_serial++;
  ns->n = n + 1;
  ns->next_dir = next2;
  if (finish (c, ns, c->empty_crc, err, errlen) == -1) {
    e = errno;
    cbt_state_unref (c, s);
    cbt_io_failed (c, c->io_error ? c->io_error : EIO);
    errno = e;
    return end_change (c, -1);
  }
  cbt_state_unref (c, s);
  return end_change (c, 0);

 fatal:
  cbt_state_unref (c, ns);
  cbt_state_unref (c, s);
  fatal (c, e, err, errlen, "writing the record of the previous checkpoint");
  return end_change (c, -1);

 refuse:
  cbt_state_unref (c, s);
  return end_change (c, -1);
}

/* ---- Confirm, fail, delete -------------------------------------------- */

/* Find NAME in S; -1 with a message if missing. */
static ssize_t
lookup (const struct state *s, const char *name, char *err, size_t errlen)
{
  for (size_t i = 0; i < s->n; ++i)
    if (strcmp (s->cps[i].name, name) == 0)
      return (ssize_t) i;
  cbt_seterr (err, errlen, "cbt: no checkpoint '%s'", name);
  errno = ENOENT;
  return -1;
}

/* The union of frozen records A and B: pages only one holds are
 * shared, pages both hold are read, ORed and written to a new block.
 */
static struct frec *
merge (struct cbt *c, const struct frec *a, const struct frec *b,
       char *err, size_t errlen)
{
  struct frec *f = cbt_frec_new (a->n + b->n);
  uint8_t *pa = malloc (PAGE), *pb = malloc (PAGE);
  size_t i = 0, j = 0;

  if (f == NULL || pa == NULL || pb == NULL) {
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    goto fail;
  }
  while (i < a->n || j < b->n) {
    struct fent *e = &f->e[f->n];

    if (j == b->n || (i < a->n && a->e[i].page < b->e[j].page)) {
      *e = a->e[i++];
      cbt_hold (c, e->blk, 1);
    }
    else if (i == a->n || b->e[j].page < a->e[i].page) {
      *e = b->e[j++];
      cbt_hold (c, e->blk, 1);
    }
    else {
      uint32_t p = a->e[i].page;
      size_t len = page_len (c, p);

      if (cbt_read_page (c, a->e[i].blk, p, pa, true, a->e[i].crc,
                         err, errlen) == -1 ||
          cbt_read_page (c, b->e[j].blk, p, pb, true, b->e[j].crc,
                         err, errlen) == -1)
        goto fail;
      for (size_t k = 0; k < len; ++k)
        pa[k] |= pb[k];
      if (cbt_alloc (c, 1, &e->blk) == -1) {
        cbt_seterr (err, errlen, "cbt: allocating a block: %s",
                    strerror (errno));
        errno = EIO;
        goto fail;
      }
      e->page = p;
      e->crc = crc (0, pa, len);
      f->n++;                   /* holds the block from here on */
      if (cbt_pwrite_full (c->fd, pa, len, blk_off (e->blk)) == -1) {
        cbt_seterr (err, errlen, "cbt: writing a merged page: %s",
                    strerror (errno));
        errno = EIO;
        goto fail;
      }
      i++, j++;
      continue;
    }
    f->n++;
  }
  if (cbt_write_index (c, f) == -1) {
    cbt_seterr (err, errlen, "cbt: writing a record index: %s",
                strerror (errno));
    errno = EIO;
    goto fail;
  }
  free (pa);
  free (pb);
  return f;

 fail:
  {
    int e = errno;
    cbt_frec_unref (c, f);
    free (pa);
    free (pb);
    errno = e;
  }
  return NULL;
}

/* Set the bits of frozen record R in the current record in force, as
 * marks do (in write-ahead mode: and commit them).
 */
static int
merge_into_current (struct cbt *c, const struct frec *r,
                    char *err, size_t errlen)
{
  uint8_t *buf = malloc ((size_t) MERGE_BATCH * PAGE);
  uint64_t gen;

  if (buf == NULL)
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  /* In-place writes to the current record only while in use on disk;
   * and in in-use mode the set in memory is what the file must not
   * claim to hold after a crash.
   */
  pthread_mutex_lock (&c->lock);
  if (!c->pub.in_use && cbt_set_in_use_locked (c) == -1) {
    pthread_mutex_unlock (&c->lock);
    free (buf);
    return cbt_failure (err, errlen, EIO,
                        "cbt: marking the file in use: %s",
                        strerror (c->io_error));
  }
  pthread_mutex_unlock (&c->lock);

  for (size_t i = 0; i < r->n; i += MERGE_BATCH) {
    size_t k = r->n - i < MERGE_BATCH ? r->n - i : MERGE_BATCH;
    int res = 0;

    for (size_t j = 0; j < k; ++j)
      if (cbt_read_page (c, r->e[i + j].blk, r->e[i + j].page,
                         buf + j * PAGE, true, r->e[i + j].crc,
                         err, errlen) == -1) {
        free (buf);
        return -1;
      }
    pthread_mutex_lock (&c->lock);
    for (size_t j = 0; res == 0 && j < k; ++j) {
      struct mrec *m = c->st->cur[c->st->ncur - 1];
      uint32_t p = r->e[i + j].page;
      uint8_t *mem = cbt_page_get (c, m, p), *src = buf + j * PAGE;
      size_t len = page_len (c, p), j0 = 0, j1 = 0;
      bool changed = false;

      if (mem == NULL) {
        errno = ENOMEM;
        res = -1;
        break;
      }
      for (size_t b = 0; b < len; ++b)
        if (src[b] & ~mem[b]) {
          mem[b] |= src[b];
          if (!changed)
            j0 = b;
          j1 = b;
          changed = true;
        }
      if (changed && cbt_page_changed (c, m, p, j0, j1) == -1)
        res = -1;
    }
    pthread_mutex_unlock (&c->lock);
    if (res == -1) {
      int e = errno;
      free (buf);
      return cbt_failure (err, errlen, e == ENOMEM ? ENOMEM : EIO, "cbt: merging into the current "
                "record: %s", e == ENOMEM ? strerror (e)
                : strerror (c->io_error));
    }
  }
  free (buf);
  pthread_mutex_lock (&c->lock);
  gen = c->mark_gen;
  pthread_mutex_unlock (&c->lock);
  if (c->mode == CBT_MODE_WRITE_AHEAD && cbt_commit_upto (c, gen) == -1)
    return cbt_failure (err, errlen, EIO,
                        "cbt: writing the current record: %s",
                        strerror (c->io_error));
  return 0;
}

int
cbt_delete_cp (struct cbt *c, size_t k, char *err, size_t errlen)
{
  struct state *s = in_force (c), *ns;
  size_t n = s->n;
  uint32_t cur_crc = published_crc (c);
  int r;

  if (k + 1 == n && k > 0) {
    /* The record of K is the current one: K-1's record joins it. */
    if (merge_into_current (c, s->cps[k - 1].rec, err, errlen) == -1) {
      cbt_state_unref (c, s);
      return -1;
    }
  }
  ns = copy_state (c, s);
  if (ns == NULL) {
    cbt_state_unref (c, s);
    return cbt_failure (err, errlen, ENOMEM, "cbt: out of memory");
  }
  if (k + 1 == n && k > 0) {
    cbt_frec_unref (c, ns->cps[k - 1].rec);
    ns->cps[k - 1].rec = NULL;
  }
  else if (k > 0) {
    struct frec *f = merge (c, s->cps[k - 1].rec, s->cps[k].rec,
                            err, errlen);
    if (f == NULL) {
      int e = errno;
      cbt_state_unref (c, ns);
      cbt_state_unref (c, s);
      errno = e;
      return -1;
    }
    cbt_frec_unref (c, ns->cps[k - 1].rec);
    ns->cps[k - 1].rec = f;
  }
  remove_entry (c, ns, k);
  r = finish (c, ns, cur_crc, err, errlen);
  cbt_state_unref (c, s);
  return r;
}

static int
end_pending (struct cbt *c, const char *name, bool ok,
             char *err, size_t errlen)
{
  struct state *s, *ns;
  ssize_t k;

  if (begin_change (c, name, err, errlen) == -1)
    return -1;
  s = in_force (c);
  k = lookup (s, name, err, errlen);
  if (k >= 0 && s->cps[k].state != CBT_STATE_PENDING) {
    cbt_seterr (err, errlen, "cbt: checkpoint '%s' is not pending", name);
    errno = EINVAL;
    k = -1;
  }
  if (k < 0 || !ok) {
    cbt_state_unref (c, s);
    return end_change (c, k < 0 ? -1 : cbt_delete_cp (c, (size_t) k,
                                                      err, errlen));
  }
  ns = copy_state (c, s);
  if (ns == NULL) {
    cbt_state_unref (c, s);
    cbt_seterr (err, errlen, "cbt: out of memory");
    errno = ENOMEM;
    return end_change (c, -1);
  }
  ns->cps[k].state = CBT_STATE_GOOD;
  cbt_state_unref (c, s);
  return end_change (c, finish (c, ns, published_crc (c), err, errlen));
}

int
cbt_checkpoint_confirm (struct cbt *c, const char *name,
                        char *err, size_t errlen)
{
  return end_pending (c, name, true, err, errlen);
}

int
cbt_checkpoint_fail (struct cbt *c, const char *name,
                     char *err, size_t errlen)
{
  return end_pending (c, name, false, err, errlen);
}

int
cbt_checkpoint_delete (struct cbt *c, const char *name,
                       char *err, size_t errlen)
{
  struct state *s;
  ssize_t k;

  if (begin_change (c, name, err, errlen) == -1)
    return -1;
  s = in_force (c);
  k = lookup (s, name, err, errlen);
  cbt_state_unref (c, s);
  if (k < 0)
    return end_change (c, -1);
  return end_change (c, cbt_delete_cp (c, (size_t) k, err, errlen));
}

/* ---- Reading the table ------------------------------------------------ */

size_t
cbt_checkpoint_count (struct cbt *c)
{
  size_t n;

  pthread_mutex_lock (&c->lock);
  n = c->st->n;
  pthread_mutex_unlock (&c->lock);
  return n;
}

static void
fill_info (const struct cpe *cp, struct cbt_checkpoint_info *info)
{
  if (info == NULL)
    return;
  strcpy (info->name, cp->name);
  info->state = cp->state;
  info->created = cp->created;
  info->serial = cp->serial;
}

int
cbt_checkpoint_get (struct cbt *c, size_t i, struct cbt_checkpoint_info *info)
{
  int r = -1;

  pthread_mutex_lock (&c->lock);
  if (i < c->st->n) {
    fill_info (&c->st->cps[i], info);
    r = 0;
  }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = ENOENT;
  return r;
}

int
cbt_checkpoint_latest_good (struct cbt *c, struct cbt_checkpoint_info *info)
{
  int r = -1;

  pthread_mutex_lock (&c->lock);
  for (size_t i = c->st->n; i-- > 0; )
    if (c->st->cps[i].state == CBT_STATE_GOOD) {
      fill_info (&c->st->cps[i], info);
      r = 0;
      break;
    }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = ENOENT;
  return r;
}

static ssize_t
find (struct cbt *c, const char *name, uint64_t serial,
      struct cbt_checkpoint_info *info)
{
  ssize_t r = -1;

  pthread_mutex_lock (&c->lock);
  for (size_t i = 0; i < c->st->n; ++i)
    if (name ? strcmp (c->st->cps[i].name, name) == 0
        : c->st->cps[i].serial == serial) {
      fill_info (&c->st->cps[i], info);
      r = (ssize_t) i;
      break;
    }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = ENOENT;
  return r;
}

ssize_t
cbt_checkpoint_find (struct cbt *c, const char *name,
                     struct cbt_checkpoint_info *info)
{
  return find (c, name ? name : "", 0, info);
}

ssize_t
cbt_checkpoint_find_serial (struct cbt *c, uint64_t serial,
                            struct cbt_checkpoint_info *info)
{
  return serial ? find (c, NULL, serial, info) : (errno = ENOENT, -1);
}
