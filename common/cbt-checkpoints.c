/* sparsebackup: persistent changed-block tracking (see cbt.h and
 * doc/cbt-format.md): checkpoints.  Names, creating (pending or not),
 * confirming, failing and deleting checkpoints, and reading the table.
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
#include <string.h>
#include <time.h>

#include "cbt-internal.h"

/* ---- Checkpoints --------------------------------------------------- */

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

/* Take the lock for a change of the checkpoints; -1 if not possible. */
static int
begin_change (struct cbt *c, const char *name, char *err, size_t errlen)
{
  if (c->read_only)
    FAILWITH (EROFS, "cbt: opened read-only");
  if (!cbt_name_valid (name))
    FAILWITH (EINVAL, "cbt: invalid checkpoint name '%s' (1-%d printable "
              "characters, no space, not starting with '-')",
              name && printable (name, strlen (name), true) ? name : "?",
              CBT_NAME_MAX);
  pthread_mutex_lock (&c->lock);
  wait_idle (c);
  if (c->io_error) {
    pthread_mutex_unlock (&c->lock);
    FAILWITH (EIO, "cbt: an earlier write to the file failed (%s)",
              strerror (c->io_error));
  }
  return 0;
}

static int
end_change (struct cbt *c, int r)
{
  int e = errno;
  pthread_mutex_unlock (&c->lock);
  errno = e;
  return r;
}

int
cbt_checkpoint_create (struct cbt *c, const char *name, bool pending,
                       char *err, size_t errlen)
{
  struct newcp nc[CBT_MAX_CHECKPOINTS];
  size_t n;

  if (begin_change (c, name, err, errlen) == -1)
    return -1;
  n = c->n;
  if (cbt_find_cp (c, name) >= 0) {
    cbt_seterr (err, errlen, "cbt: checkpoint '%s' exists", name);
    errno = EEXIST;
    return end_change (c, -1);
  }
  if (n > 0 && c->cps[n - 1].state == CBT_STATE_PENDING) {
    cbt_seterr (err, errlen, "cbt: checkpoint '%s' is pending: end its backup "
                "first", c->cps[n - 1].name);
    errno = EBUSY;
    return end_change (c, -1);
  }
  if (n >= CBT_MAX_CHECKPOINTS) {
    cbt_seterr (err, errlen, "cbt: %d checkpoints already: delete one",
                CBT_MAX_CHECKPOINTS);
    errno = ENOSPC;
    return end_change (c, -1);
  }
  cbt_same_state (c, nc);
  if (n > 0) {                  /* the current record freezes */
    nc[n - 1].lo = nc[n - 1].hi = 0;
    nc[n - 1].mem = true;
  }
  memset (&nc[n], 0, sizeof nc[n]);
  strcpy (nc[n].cp.name, name);
  nc[n].cp.state = pending ? CBT_STATE_PENDING : CBT_STATE_GOOD;
  nc[n].cp.created = (uint64_t) time (NULL);
  return end_change (c, cbt_write_state (c, nc, n + 1, true, err, errlen));
}

/* Find NAME with the lock held; -1 and unlock if missing. */
static ssize_t
lookup (struct cbt *c, const char *name, char *err, size_t errlen)
{
  ssize_t k = cbt_find_cp (c, name);

  if (k < 0) {
    cbt_seterr (err, errlen, "cbt: no checkpoint '%s'", name);
    errno = ENOENT;
    end_change (c, -1);
  }
  return k;
}

static int
end_pending (struct cbt *c, const char *name, bool ok,
             char *err, size_t errlen)
{
  struct newcp nc[CBT_MAX_CHECKPOINTS];
  ssize_t k;

  if (begin_change (c, name, err, errlen) == -1 ||
      (k = lookup (c, name, err, errlen)) < 0)
    return -1;
  if (c->cps[k].state != CBT_STATE_PENDING) {
    cbt_seterr (err, errlen, "cbt: checkpoint '%s' is not pending", name);
    errno = EINVAL;
    return end_change (c, -1);
  }
  if (!ok)
    return end_change (c, cbt_delete_cp (c, (size_t) k, err, errlen));
  cbt_same_state (c, nc);
  nc[k].cp.state = CBT_STATE_GOOD;
  return end_change (c, cbt_write_state (c, nc, c->n, false, err, errlen));
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
  ssize_t k;

  if (begin_change (c, name, err, errlen) == -1 ||
      (k = lookup (c, name, err, errlen)) < 0)
    return -1;
  return end_change (c, cbt_delete_cp (c, (size_t) k, err, errlen));
}

size_t
cbt_checkpoint_count (struct cbt *c)
{
  size_t n;

  pthread_mutex_lock (&c->lock);
  n = c->n;
  pthread_mutex_unlock (&c->lock);
  return n;
}

static void
fill_info (const struct cp *cp, struct cbt_checkpoint_info *info)
{
  strcpy (info->name, cp->name);
  info->state = cp->state;
  info->created = cp->created;
}

int
cbt_checkpoint_get (struct cbt *c, size_t i, struct cbt_checkpoint_info *info)
{
  int r = -1;

  pthread_mutex_lock (&c->lock);
  if (i < c->n) {
    fill_info (&c->cps[i], info);
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
  for (size_t i = c->n; i-- > 0; )
    if (c->cps[i].state == CBT_STATE_GOOD) {
      fill_info (&c->cps[i], info);
      r = 0;
      break;
    }
  pthread_mutex_unlock (&c->lock);
  if (r == -1)
    errno = ENOENT;
  return r;
}
