/* nbdkit-sparsebackup-filter: the control socket (sparsebackup-control).
 *
 * A Unix stream socket (mode 0600) created at get_ready, so that a bad
 * path fails at start-up, served by one thread started at after_fork
 * (threads do not survive nbdkit's fork), removed at unload.  It speaks
 * doc/cbt-protocol.md through common/ctlproto: up to MAX_CLIENTS
 * clients at once, each served by its own thread (more are answered
 * "ERR busy" and closed), bounded lines, a client idle for
 * CLIENT_TIMEOUT seconds is dropped.  Every command is thread-safe:
 * the cbt has its own lock, backups are serialised by frozen.c.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* accept4, pipe2 */
#endif
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <nbdkit-filter.h>

#include "cbt.h"
#include "ctlproto.h"
#include "sparsebackup.h"
#include "cbt-glue.h"
#include "frozen.h"

#define CLIENT_TIMEOUT 60
#define MAX_CLIENTS 8

static int listen_fd = -1;
static int stop_pipe[2] = { -1, -1 };
static pthread_t thread;
static bool thread_running;
/* The clients being served (-1: a free slot): control_stop shuts them
 * down so that a read blocked inside a line returns at once, and waits
 * until every client thread is gone.
 */
static pthread_mutex_t client_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t client_gone = PTHREAD_COND_INITIALIZER;
static int client_fds[MAX_CLIENTS] = { -1, -1, -1, -1, -1, -1, -1, -1 };
static unsigned nr_clients;
static bool stopping;

int
control_open (void)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  struct stat st;
  mode_t old;
  int fd, r;

  if (cfg_control_path == NULL)
    return 0;
  /* A socket left by a previous run is removed; anything else is not. */
  if (lstat (cfg_control_path, &st) == 0) {
    if (!S_ISSOCK (st.st_mode)) {
      nbdkit_error ("sparsebackup-control: '%s' exists and is not a socket",
                    cfg_control_path);
      return -1;
    }
    unlink (cfg_control_path);
  }
  snprintf (addr.sun_path, sizeof addr.sun_path, "%s", cfg_control_path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1) {
    nbdkit_error ("sparsebackup-control: socket: %m");
    return -1;
  }
  old = umask (0177);
  r = bind (fd, (struct sockaddr *) &addr, sizeof addr);
  umask (old);
  if (r == -1) {
    nbdkit_error ("sparsebackup-control: '%s': bind: %m", cfg_control_path);
    close (fd);
    return -1;
  }
  if (chmod (cfg_control_path, 0600) == -1 || listen (fd, 4) == -1) {
    nbdkit_error ("sparsebackup-control: '%s': %m", cfg_control_path);
    close (fd);
    unlink (cfg_control_path);
    return -1;
  }
  listen_fd = fd;
  return 0;
}

/* ---- One request ---------------------------------------------------- */

struct conn {
  int fd;
  bool broken;
  char buf[CTL_LINE_MAX + 1];
};

static void
send_buf (struct conn *k, int n)
{
  const char *p = k->buf;

  if (n < 0)            /* cannot happen: every line is bounded */
    n = ctl_format_err (k->buf, sizeof k->buf, CTL_E_INTERNAL,
                        "reply line too long");
  while (n > 0 && !k->broken) {
    ssize_t w = send (k->fd, p, n, MSG_NOSIGNAL);

    if (w == -1 && errno == EINTR)
      continue;
    if (w <= 0) {
      k->broken = true;
      return;
    }
    p += w;
    n -= w;
  }
}

static void
send_err (struct conn *k, enum ctl_code code, const char *msg)
{
  send_buf (k, ctl_format_err (k->buf, sizeof k->buf, code, msg));
}

/* Reply to an error from cbt.h (errno set, MSG from it). */
static void
send_cbt_err (struct conn *k, const char *msg)
{
  if (errno == EIO)
    __atomic_store_n (&cbt_io_error, true, __ATOMIC_RELAXED);
  send_err (k, ctl_code_from_errno (errno), msg[0] ? msg : strerror (errno));
}

struct map_buf {
  uint64_t (*v)[2];
  size_t n, cap;
};

static int
map_fn (uint64_t offset, uint64_t length, void *opaque)
{
  struct map_buf *m = opaque;

  if (m->n == m->cap) {
    size_t n = m->cap ? 2 * m->cap : 64;
    void *p = realloc (m->v, n * sizeof *m->v);

    if (p == NULL)
      return -1;
    m->v = p;
    m->cap = n;
  }
  m->v[m->n][0] = offset;
  m->v[m->n][1] = length;
  m->n++;
  return 0;
}

static void
do_map (struct conn *k, struct cbt *c, const struct ctl_request *req)
{
  struct cbt_checkpoint_info cp;
  struct map_buf m = { 0 };
  char msg[CBT_ERRLEN];
  uint64_t bytes = 0;

  if (req->since[0]) {
    snprintf (cp.name, sizeof cp.name, "%s", req->since);
    if (cbt_find (c, req->since, &cp) == -1 && cbt_invalidated) {
      snprintf (msg, sizeof msg, "no checkpoint '%s': the cbt file was not "
                "closed cleanly, every checkpoint was lost: a full backup "
                "is needed", req->since);
      send_err (k, CTL_E_NO_SUCH_CHECKPOINT, msg);
      return;
    }
  }
  else if (cbt_checkpoint_latest_good (c, &cp) == -1) {
    send_err (k, CTL_E_NO_SUCH_CHECKPOINT, "no good checkpoint");
    return;
  }
  msg[0] = '\0';
  if (cbt_map (c, cp.name, map_fn, &m, msg, sizeof msg) == -1) {
    send_cbt_err (k, msg);
    free (m.v);
    return;
  }
  if (req->json)
    send_buf (k, ctl_format_json_open (k->buf, sizeof k->buf, cp.name,
                                       cbt_granularity (c),
                                       cbt_disk_size (c)));
  for (size_t i = 0; i < m.n; ++i) {
    bytes += m.v[i][1];
    send_buf (k, ctl_format_extent (k->buf, sizeof k->buf, m.v[i][0],
                                    m.v[i][1], req->json, i + 1 == m.n));
  }
  if (req->json)
    send_buf (k, ctl_format_data (k->buf, sizeof k->buf, "]}"));
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "since=%s extents=%zu "
                              "bytes=%" PRIu64 " granularity=%" PRIu32,
                              cp.name, m.n, bytes, cbt_granularity (c)));
  free (m.v);
}

static void
do_begin (struct conn *k, struct cbt *c, const struct ctl_request *req)
{
  struct cbt_checkpoint_info cp;
  char msg[2 * CBT_ERRLEN];

  if (req->since[0]) {
    if (cbt_find (c, req->since, &cp) == -1) {
      if (cbt_invalidated)
        snprintf (msg, sizeof msg, "checkpoint '%s' was lost: the cbt file "
                  "was not closed cleanly (nbdkit did not exit cleanly): a "
                  "full backup is needed (backup-begin %s without --since)",
                  req->since, req->name);
      else
        snprintf (msg, sizeof msg, "no checkpoint '%s'", req->since);
      send_err (k, CTL_E_NO_SUCH_CHECKPOINT, msg);
      return;
    }
    if (cp.state != CBT_STATE_GOOD) {
      snprintf (msg, sizeof msg, "checkpoint '%s' is pending: its backup "
                "has not ended", req->since);
      send_err (k, CTL_E_STATE, msg);
      return;
    }
  }
  msg[0] = '\0';
  if (frozen_backup_begin (c, req->name, msg, sizeof msg) == -1) {
    send_cbt_err (k, msg);
    return;
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                              "checkpoint=%s state=pending since=%s",
                              req->name, req->since[0] ? req->since : "-"));
}

static void
do_status (struct conn *k, struct cbt *c)
{
  struct cbt_checkpoint_info cp, latest;
  const char *pending = "-";
  size_t n = cbt_checkpoint_count (c);
  char frozen[2 * CBT_NAME_MAX + 128];

  if (n > 0 && cbt_checkpoint_get (c, n - 1, &cp) == 0 &&
      cp.state == CBT_STATE_PENDING)
    pending = cp.name;
  if (cbt_checkpoint_latest_good (c, &latest) == -1)
    snprintf (latest.name, sizeof latest.name, "-");
  frozen_status (frozen, sizeof frozen);
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
              "version=%d mode=%s disk-size=%" PRIu64 " granularity=%"
              PRIu32 " checkpoints=%zu pending=%s latest=%s state=%s%s",
              CTL_VERSION,
              cbt_mode (c) == CBT_MODE_IN_USE ? "in-use" : "write-ahead",
              cbt_disk_size (c), cbt_granularity (c), n, pending,
              latest.name,
              __atomic_load_n (&cbt_io_error, __ATOMIC_RELAXED) ?
              "io-error" : "ok", frozen));
}

static void
request (struct conn *k, const char *line)
{
  struct ctl_request req;
  struct cbt_checkpoint_info cp;
  enum ctl_code code;
  char msg[CBT_ERRLEN];
  struct cbt *c;
  int r;

  if (ctl_parse_request (line, &req, &code, msg, sizeof msg) == -1) {
    send_err (k, code, msg);
    return;
  }
  c = cbt_get ();
  if (c == NULL) {
    send_err (k, CTL_E_STATE, "the cbt file is not open yet: it is opened "
              "by the first NBD connection (it needs the disk size)");
    return;
  }
  msg[0] = '\0';
  switch (req.cmd) {
  case CTL_BACKUP_BEGIN:
    do_begin (k, c, &req);
    return;
  case CTL_BACKUP_END: {
    bool broken;

    r = frozen_backup_end (c, req.name, req.ok, &broken, msg, sizeof msg);
    if (r == -1 && broken)
      send_err (k, CTL_E_BROKEN, msg);
    else if (r == -1)
      send_cbt_err (k, msg);
    else
      send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                                  "checkpoint=%s state=%s", req.name,
                                  req.ok ? "good" : "deleted"));
    return;
  }
  case CTL_CHECKPOINT_LIST: {
    size_t i;

    for (i = 0; cbt_checkpoint_get (c, i, &cp) == 0; ++i)
      send_buf (k, ctl_format_checkpoint (k->buf, sizeof k->buf, &cp));
    send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "checkpoints=%zu", i));
    return;
  }
  case CTL_CHECKPOINT_DELETE:
    if (frozen_checkpoint_delete (c, req.name, msg, sizeof msg) == -1)
      send_cbt_err (k, msg);
    else
      send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                                  "checkpoint=%s state=deleted", req.name));
    return;
  case CTL_MAP:
    do_map (k, c, &req);
    return;
  case CTL_STATUS:
    do_status (k, c);
    return;
  }
  send_err (k, CTL_E_INTERNAL, "unhandled command");
}

/* ---- The thread ------------------------------------------------------ */

/* Wait until FD is readable: 1, or 0 when stopping or timed out. */
static int
wait_fd (int fd, int timeout_ms)
{
  struct pollfd p[2] = {
    { .fd = fd, .events = POLLIN },
    { .fd = stop_pipe[0], .events = POLLIN },
  };
  int r;

  do
    r = poll (p, 2, timeout_ms);
  while (r == -1 && errno == EINTR);
  if (r <= 0 || p[1].revents)
    return 0;
  return 1;
}

static void
serve (int fd)
{
  struct conn *k = malloc (sizeof *k);
  struct ctl_reader *rd = malloc (sizeof *rd);
  char *line = malloc (CTL_LINE_MAX);
  struct timeval tv = { .tv_sec = CLIENT_TIMEOUT };

  if (k == NULL || rd == NULL || line == NULL)
    goto out;
  k->fd = fd;
  k->broken = false;
  setsockopt (fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt (fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  ctl_reader_init (rd, fd);
  send_buf (k, ctl_format_hello (k->buf, sizeof k->buf));
  while (!k->broken) {
    int r;

    /* Poll only with nothing buffered: a client may send ahead. */
    if (rd->start == rd->end && !wait_fd (fd, CLIENT_TIMEOUT * 1000))
      break;
    r = ctl_read_line (rd, line);

    if (r == 1)
      request (k, line);
    else if (r == -2)
      send_err (k, CTL_E_TOO_LONG, "the request line is longer than "
                "1024 bytes");
    else if (r == -3)
      send_err (k, CTL_E_SYNTAX, "the request holds a byte outside "
                "printable ASCII");
    else
      break;
  }
 out:
  free (line);
  free (rd);
  free (k);
}

static void *
client_thread (void *arg)
{
  int slot = (int) (intptr_t) arg, fd;

  pthread_mutex_lock (&client_lock);
  fd = client_fds[slot];
  pthread_mutex_unlock (&client_lock);
  serve (fd);
  pthread_mutex_lock (&client_lock);
  client_fds[slot] = -1;
  close (fd);
  nr_clients--;
  pthread_cond_broadcast (&client_gone);
  pthread_mutex_unlock (&client_lock);
  return NULL;
}

/* One client too many: the hello, then (after its request, waiting at
 * most a second for it so that the client reads the reply rather than
 * a closed socket) ERR busy.
 */
static void
refuse (int fd)
{
  struct conn k = { .fd = fd };
  char junk[CTL_LINE_MAX];

  send_buf (&k, ctl_format_hello (k.buf, sizeof k.buf));
  if (wait_fd (fd, 1000) && recv (fd, junk, sizeof junk, MSG_DONTWAIT) < 0)
    k.broken = true;
  send_err (&k, CTL_E_BUSY, "too many control clients (at most 8 at once)");
  close (fd);
}

static void *
control_thread (void *arg)
{
  pthread_attr_t attr;

  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  for (;;) {
    pthread_t t;
    int fd, slot = -1, e;

    if (!wait_fd (listen_fd, -1))
      break;
    fd = accept4 (listen_fd, NULL, NULL, SOCK_CLOEXEC);
    if (fd == -1) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN)
        continue;
      nbdkit_error ("sparsebackup-control: accept: %m");
      break;
    }
    pthread_mutex_lock (&client_lock);
    if (stopping) {
      pthread_mutex_unlock (&client_lock);
      close (fd);
      break;
    }
    for (int i = 0; i < MAX_CLIENTS; ++i)
      if (client_fds[i] == -1) {
        slot = i;
        break;
      }
    if (slot == -1) {
      pthread_mutex_unlock (&client_lock);
      refuse (fd);
      continue;
    }
    client_fds[slot] = fd;
    nr_clients++;
    e = pthread_create (&t, &attr, client_thread, (void *) (intptr_t) slot);
    if (e != 0) {
      client_fds[slot] = -1;
      nr_clients--;
      pthread_mutex_unlock (&client_lock);
      nbdkit_error ("sparsebackup-control: pthread_create: %s",
                    strerror (e));
      close (fd);
      continue;
    }
    pthread_mutex_unlock (&client_lock);
  }
  pthread_attr_destroy (&attr);
  return NULL;
}

int
control_start (void)
{
  int e;

  if (listen_fd == -1 || thread_running)
    return 0;
  if (pipe2 (stop_pipe, O_CLOEXEC) == -1) {
    nbdkit_error ("sparsebackup-control: pipe: %m");
    return -1;
  }
  e = pthread_create (&thread, NULL, control_thread, NULL);
  if (e != 0) {
    nbdkit_error ("sparsebackup-control: pthread_create: %s", strerror (e));
    return -1;
  }
  thread_running = true;
  return 0;
}

void
control_stop (void)
{
  if (thread_running) {
    char b = 0;

    if (write (stop_pipe[1], &b, 1) != 1)
      nbdkit_error ("sparsebackup-control: write: %m");
    pthread_mutex_lock (&client_lock);
    stopping = true;
    for (int i = 0; i < MAX_CLIENTS; ++i)
      if (client_fds[i] >= 0)
        shutdown (client_fds[i], SHUT_RDWR);
    while (nr_clients > 0)
      pthread_cond_wait (&client_gone, &client_lock);
    pthread_mutex_unlock (&client_lock);
    pthread_join (thread, NULL);
    thread_running = false;
  }
  for (int i = 0; i < 2; ++i)
    if (stop_pipe[i] >= 0) {
      close (stop_pipe[i]);
      stop_pipe[i] = -1;
    }
  if (listen_fd >= 0) {
    close (listen_fd);
    listen_fd = -1;
    unlink (cfg_control_path);
  }
}
