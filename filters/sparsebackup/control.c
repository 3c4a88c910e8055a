/* nbdkit-sparsebackup-filter: the control socket (control.h).
 *
 * A Unix stream socket (mode 0600) created at get_ready, so that a bad
 * path fails at start-up: a path where a server answers is refused (a
 * second nbdkit given the same path must not take it over), a stale
 * socket left by a process that died is replaced, anything else is an
 * error.  At unload the path is removed only if it is still the socket
 * this process created.  One thread started at after_fork (threads do
 * not survive nbdkit's fork) accepts clients; each is served by its own
 * thread, up to MAX_CLIENTS at once (more are answered "ERR busy" and
 * closed).  It speaks doc/cbt-protocol.md through common/ctlproto.
 *
 * Bounds: a request line is at most 1024 bytes and must arrive whole
 * within CLIENT_TIMEOUT seconds of the end of the previous reply (a
 * client trickling bytes cannot keep its slot), replies are sent with
 * the same timeout.  The commands are thread-safe: the cbt has its own
 * lock, backups and checkpoint changes are serialised by backup.c.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* accept4, pipe2 */
#endif
#include <config.h>

#include <assert.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>

#include <nbdkit-filter.h>

#include "cbt.h"
#include "cleanup.h"
#include "ctlproto.h"
#include "vector.h"
#include "internal.h"
#include "backup.h"
#include "control.h"
#include "disk.h"
#include "frozen.h"
#include "tracking.h"

#define CLIENT_TIMEOUT 60       /* seconds */
#define MAX_CLIENTS 8

/* -D sparsebackup.control_timeout=SECONDS: for tests, another bound on
 * the time of a request line than CLIENT_TIMEOUT.
 */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_control_timeout = 0;

static int
client_timeout (void)
{
  return sparsebackup_debug_control_timeout > 0 ?
    sparsebackup_debug_control_timeout : CLIENT_TIMEOUT;
}

static int listen_fd = -1;
static struct stat listen_st;           /* the socket file we created */
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

/* ---- The socket ------------------------------------------------------- */

/* A socket file exists at the path: refuse it if a server answers,
 * remove it if it is stale.
 */
static int
replace_stale (void)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  int fd, r;

  snprintf (addr.sun_path, sizeof addr.sun_path, "%s", cfg_control_path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1) {
    nbdkit_error ("sparsebackup-control: socket: %m");
    return -1;
  }
  r = connect (fd, (struct sockaddr *) &addr, sizeof addr);
  close (fd);
  if (r == 0) {
    nbdkit_error ("sparsebackup-control: '%s': a server is answering on "
                  "this socket (another nbdkit?): refused; stop it, or give "
                  "this server its own path", cfg_control_path);
    return -1;
  }
  if (errno != ECONNREFUSED) {
    nbdkit_error ("sparsebackup-control: '%s' exists and cannot be checked: "
                  "%m", cfg_control_path);
    return -1;
  }
  nbdkit_debug ("sparsebackup-control: '%s': a stale socket (nobody "
                "answers): replaced", cfg_control_path);
  unlink (cfg_control_path);
  return 0;
}

int
control_open (void)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  struct stat st;
  mode_t old;
  int fd, r;

  if (cfg_control_path == NULL)
    return 0;
  if (lstat (cfg_control_path, &st) == 0) {
    if (!S_ISSOCK (st.st_mode)) {
      nbdkit_error ("sparsebackup-control: '%s' exists and is not a socket",
                    cfg_control_path);
      return -1;
    }
    if (replace_stale () == -1)
      return -1;
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
  if (lstat (cfg_control_path, &listen_st) == -1 ||
      chmod (cfg_control_path, 0600) == -1 || listen (fd, 4) == -1) {
    nbdkit_error ("sparsebackup-control: '%s': %m", cfg_control_path);
    close (fd);
    unlink (cfg_control_path);
    return -1;
  }
  listen_fd = fd;
  return 0;
}

/* Remove the socket file if it is still the one this process created. */
static void
remove_socket (void)
{
  struct stat st;

  if (lstat (cfg_control_path, &st) == 0 && S_ISSOCK (st.st_mode) &&
      st.st_dev == listen_st.st_dev && st.st_ino == listen_st.st_ino)
    unlink (cfg_control_path);
  else
    nbdkit_debug ("sparsebackup-control: '%s' is no longer our socket: "
                  "left as it is", cfg_control_path);
}

/* ---- Replies ---------------------------------------------------------- */

struct conn {
  int fd;
  bool broken;
  /* A group backup prepared on this connection (backup.h), and the
   * name of the last one whose hold timed out ("" if none).
   */
  struct group_hold g;
  char expired[CBT_NAME_MAX + 1];
  char buf[CTL_LINE_MAX + 1];
};

static void
send_buf (struct conn *k, int n)
{
  const char *p = k->buf;

  assert (n >= 0);              /* every line is bounded */
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

/* ---- Commands --------------------------------------------------------- */

struct range {
  uint64_t offset, length;
};
DEFINE_VECTOR (range_vector, struct range);

static int
map_fn (uint64_t offset, uint64_t length, void *opaque)
{
  range_vector *v = opaque;

  return range_vector_append (v, (struct range) { offset, length });
}

static void
do_map (struct conn *k, struct cbt *c, const struct ctl_request *req)
{
  struct checkpoint_ref since;
  struct backup_error e;
  range_vector v = VECTOR_INIT;
  char msg[CBT_ERRLEN] = "";
  uint64_t bytes = 0;

  if (req->since[0]) {
    if (backup_find_checkpoint (req->since, WANT_GOOD, &since, NULL, &e) == -1) {
      send_err (k, e.code, e.msg);
      return;
    }
  }
  else {
    struct cbt_checkpoint_info latest;

    if (cbt_checkpoint_latest_good (c, &latest) == -1) {
      send_err (k, CTL_E_NO_SUCH_CHECKPOINT, "no good checkpoint: the "
                "first backup is a full one (backup-begin NEW)");
      return;
    }
    if (backup_find_checkpoint (latest.name, WANT_GOOD, &since, NULL,
                                &e) == -1) {
      send_err (k, e.code, e.msg);
      return;
    }
  }
  if (tracking_map_range (&since, NULL, 0, UINT64_MAX, map_fn, &v, msg,
                          sizeof msg) == -1) {
    if (errno == EIO)
      tracking_set_io_error ();
    send_err (k, ctl_code_from_errno (errno), msg[0] ? msg : strerror (errno));
    range_vector_reset (&v);
    return;
  }
  for (size_t i = 0; i < v.len; ++i) {
    bytes += v.ptr[i].length;
    send_buf (k, ctl_format_extent (k->buf, sizeof k->buf, v.ptr[i].offset,
                                    v.ptr[i].length));
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "since=%s extents=%zu "
                              "bytes=%" PRIu64 " granularity=%" PRIu32
                              " disk-size=%" PRIu64, since.name, v.len,
                              bytes, cbt_granularity (c), cbt_disk_size (c)));
  range_vector_reset (&v);
}

static void
do_begin (struct conn *k, const struct ctl_request *req)
{
  struct backup_error e;

  if (backup_begin (req->name, req->since[0] ? req->since : NULL,
                    &e) == -1) {
    send_err (k, e.code, e.msg);
    return;
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                              "checkpoint=%s state=pending since=%s",
                              req->name, req->since[0] ? req->since : "-"));
}

static void
do_end (struct conn *k, const struct ctl_request *req)
{
  struct backup_error e;

  if (backup_end (req->name, req->ok, &e) == -1) {
    send_err (k, e.code, e.msg);
    return;
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                              "checkpoint=%s state=%s", req->name,
                              req->ok ? "good" : "deleted"));
}

static void
do_delete (struct conn *k, const struct ctl_request *req)
{
  struct backup_error e;

  if (backup_checkpoint_delete (req->name, &e) == -1) {
    send_err (k, e.code, e.msg);
    return;
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                              "checkpoint=%s state=deleted", req->name));
}

/* group-prepare NEW [--since OLD] --hold-timeout MS */
static void
do_group_prepare (struct conn *k, const struct ctl_request *req)
{
  struct backup_error e;

  k->expired[0] = '\0';
  if (backup_group_prepare (req->name, req->since[0] ? req->since : NULL,
                            req->hold_ms, &k->g, &e) == -1) {
    send_err (k, e.code, e.msg);
    return;
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
                              "checkpoint=%s state=prepared since=%s "
                              "hold-timeout-ms=%" PRIu32 " drain-us=%" PRIu64,
                              req->name, req->since[0] ? req->since : "-",
                              req->hold_ms, k->g.drain_us));
}

/* group-commit NEW, group-abort NEW. */
static void
do_group_end (struct conn *k, const struct ctl_request *req)
{
  bool commit = req->cmd == CTL_GROUP_COMMIT;
  struct backup_error e;
  uint64_t held_us;
  char msg[512];

  if (!k->g.held) {
    if (k->expired[0] && strcmp (k->expired, req->name) == 0) {
      if (commit) {
        snprintf (msg, sizeof msg, "group backup '%s' was aborted: its hold "
                  "timed out before group-commit came (writes resumed, no "
                  "checkpoint was created): begin it again", req->name);
        send_err (k, CTL_E_STATE, msg);
      }
      else
        send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "checkpoint=%s "
                                    "state=aborted held-us=-", req->name));
      return;
    }
    snprintf (msg, sizeof msg, "no group backup '%s' is prepared on this "
              "connection (group-prepare %s first, on the same connection)",
              req->name, req->name);
    send_err (k, CTL_E_STATE, msg);
    return;
  }
  if (strcmp (k->g.name, req->name) != 0) {
    snprintf (msg, sizeof msg, "group backup '%s' is prepared on this "
              "connection, not '%s': '%s' aborted", k->g.name, req->name,
              k->g.name);
    backup_group_abort (&k->g, msg, NULL);
    send_err (k, CTL_E_STATE, msg);
    return;
  }
  if (!commit) {
    backup_group_abort (&k->g, NULL, &held_us);
    send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "checkpoint=%s "
                                "state=aborted held-us=%" PRIu64, req->name,
                                held_us));
    return;
  }
  if (backup_group_commit (&k->g, &held_us, &e) == -1) {
    send_err (k, e.code, e.msg);
    return;
  }
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "checkpoint=%s "
                              "state=pending since=%s held-us=%" PRIu64,
                              req->name, k->g.since[0] ? k->g.since : "-",
                              held_us));
}

static void
do_list (struct conn *k, struct cbt *c)
{
  struct cbt_checkpoint_info cp;
  size_t i;

  for (i = 0; cbt_checkpoint_get (c, i, &cp) == 0; ++i)
    send_buf (k, ctl_format_checkpoint (k->buf, sizeof k->buf, &cp));
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf, "checkpoints=%zu", i));
}

/* The frozen backup's fields of the status line ("" without a scratch
 * file); a broken backup's reason as a data line first.
 */
static void
frozen_status (struct conn *k, char *buf, size_t len)
{
  struct frozen_info fi;
  char limit[32] = "none";
  bool active;

  if (!frozen_enabled ()) {
    buf[0] = '\0';
    return;
  }
  active = frozen_current (&fi);
  if (cfg_scratch_size != UINT64_MAX)
    snprintf (limit, sizeof limit, "%" PRIu64, cfg_scratch_size);
  if (active && fi.broken)
    send_buf (k, ctl_format_data (k->buf, sizeof k->buf, "broken %s",
                                  fi.why));
  snprintf (buf, len, " frozen=%s scratch-used=%" PRIu64
            " scratch-limit=%s backup=%s", active ? fi.name : "-",
            fi.scratch_used, limit, fi.broken ? "broken" : "ok");
}

static void
do_status (struct conn *k, struct cbt *c)
{
  struct cbt_checkpoint_info cp, latest;
  const char *pending = "-";
  size_t n = cbt_checkpoint_count (c);
  char frozen[2 * CBT_NAME_MAX + 128], group[CBT_NAME_MAX + 8];
  char name[CBT_NAME_MAX + 1];

  if (n > 0 && cbt_checkpoint_get (c, n - 1, &cp) == 0 &&
      cp.state == CBT_STATE_PENDING)
    pending = cp.name;
  if (cbt_checkpoint_latest_good (c, &latest) == -1)
    snprintf (latest.name, sizeof latest.name, "-");
  frozen_status (k, frozen, sizeof frozen);
  /* group=NAME only while a group backup is prepared. */
  group[0] = '\0';
  if (backup_group_current (name, sizeof name))
    snprintf (group, sizeof group, " group=%s", name);
  send_buf (k, ctl_format_ok (k->buf, sizeof k->buf,
              "version=%d mode=%s disk-size=%" PRIu64 " granularity=%"
              PRIu32 " checkpoints=%zu pending=%s latest=%s state=%s%s%s",
              CTL_VERSION, tracking_mode_name (cbt_mode (c)), cbt_disk_size (c),
              cbt_granularity (c), n, pending, latest.name,
              tracking_io_error () ? "io-error" : "ok", frozen, group));
}

static void
request (struct conn *k, const char *line)
{
  struct ctl_request req;
  enum ctl_code code;
  char msg[512];
  struct cbt *c = tracking_cbt ();

  if (ctl_parse_request (line, &req, &code, msg, sizeof msg) == -1) {
    send_err (k, code, msg);
    return;
  }
  /* The cbt file is open from start-up on (disk_after_fork), unless
   * that failed.
   */
  if (c == NULL) {
    send_err (k, CTL_E_STATE, disk_startup_error () ?
              disk_startup_error () : "the cbt file is not open");
    return;
  }
  /* While a group backup is prepared on this connection, only its
   * commit or abort may follow: anything else aborts it.
   */
  if (k->g.held && req.cmd != CTL_GROUP_COMMIT &&
      req.cmd != CTL_GROUP_ABORT) {
    snprintf (msg, sizeof msg, "group backup '%s' is prepared on this "
              "connection: only group-commit %s or group-abort %s may "
              "follow; '%s' aborted", k->g.name, k->g.name, k->g.name,
              k->g.name);
    backup_group_abort (&k->g, msg, NULL);
    send_err (k, CTL_E_STATE, msg);
    return;
  }
  switch (req.cmd) {
  case CTL_BACKUP_BEGIN:
    do_begin (k, &req);
    return;
  case CTL_BACKUP_END:
    do_end (k, &req);
    return;
  case CTL_CHECKPOINT_LIST:
    do_list (k, c);
    return;
  case CTL_CHECKPOINT_DELETE:
    do_delete (k, &req);
    return;
  case CTL_MAP:
    do_map (k, c, &req);
    return;
  case CTL_STATUS:
    do_status (k, c);
    return;
  case CTL_GROUP_PREPARE:
    do_group_prepare (k, &req);
    return;
  case CTL_GROUP_COMMIT:
  case CTL_GROUP_ABORT:
    do_group_end (k, &req);
    return;
  }
  abort ();
}

/* ---- The threads ------------------------------------------------------ */

/* Wait until FD is readable: true, or false when stopping. */
static bool
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
  return r > 0 && p[1].revents == 0;
}

/* Milliseconds left of G's hold (0 once it has passed). */
static int
hold_left_ms (const struct group_hold *g)
{
  struct timespec now;
  uint64_t us;

  clock_gettime (CLOCK_MONOTONIC, &now);
  us = backup_elapsed_us (&now, &g->deadline);
  return (int) ((us + 999) / 1000);
}

static void
serve (int fd)
{
  CLEANUP_FREE struct conn *k = malloc (sizeof *k);
  CLEANUP_FREE struct ctl_reader *rd = malloc (sizeof *rd);
  CLEANUP_FREE char *line = malloc (CTL_LINE_MAX);
  struct timeval tv = { .tv_sec = client_timeout () };

  if (k == NULL || rd == NULL || line == NULL)
    return;
  memset (k, 0, sizeof *k);
  k->fd = fd;
  setsockopt (fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  ctl_reader_init (rd, fd);
  send_buf (k, ctl_format_hello (k->buf, sizeof k->buf));
  while (!k->broken) {
    /* The whole line within the timeout, however it trickles in; while
     * a group backup is prepared, by the end of its hold.
     */
    int timeout = client_timeout () * 1000;
    int r;

    if (k->g.held)
      timeout = hold_left_ms (&k->g);
    r = ctl_read_line (rd, line, timeout, stop_pipe[0]);
    if (k->g.held && r != 1) {
      char why[256];

      if (r == -4 && errno == ETIMEDOUT) {
        snprintf (why, sizeof why, "its hold timed out after %" PRIu32
                  " ms without group-commit or group-abort",
                  k->g.hold_ms);
        snprintf (k->expired, sizeof k->expired, "%s", k->g.name);
        backup_group_abort (&k->g, why, NULL);
        continue;             /* a late commit is answered "state" */
      }
      snprintf (why, sizeof why, "%s", r == 0 ? "the control connection "
                "closed" : r == -4 ? "nbdkit is stopping" : r == -1 ?
                "the control connection failed" : "a bad request line");
      backup_group_abort (&k->g, why, NULL);
    }
    if (r == 1)
      request (k, line);
    else if (r == -2)
      send_err (k, CTL_E_TOO_LONG, "the request line is longer than "
                "1024 bytes");
    else if (r == -3)
      send_err (k, CTL_E_SYNTAX, "the request holds a byte outside "
                "printable ASCII");
    else {
      if (r == -4 && errno == ETIMEDOUT) {
        char msg[128];

        snprintf (msg, sizeof msg, "no complete request line within %d "
                  "seconds: disconnected", client_timeout ());
        send_err (k, CTL_E_SYNTAX, msg);
      }
      break;
    }
  }
  if (k->g.held)                /* the reply could not be sent */
    backup_group_abort (&k->g, "the control connection failed", NULL);
}

static void *
client_thread (void *arg)
{
  int slot = (int) (intptr_t) arg, fd;

  {
    SCOPED_MUTEX (&client_lock);
    fd = client_fds[slot];
  }
  serve (fd);
  SCOPED_MUTEX (&client_lock);
  client_fds[slot] = -1;
  close (fd);
  nr_clients--;
  pthread_cond_broadcast (&client_gone);
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

/* A free slot for FD and its thread: false if none (or stopping). */
static bool
start_client (int fd, pthread_attr_t *attr)
{
  SCOPED_MUTEX (&client_lock);
  pthread_t t;
  int slot = -1, e;

  if (stopping)
    return false;
  for (int i = 0; i < MAX_CLIENTS; ++i)
    if (client_fds[i] == -1) {
      slot = i;
      break;
    }
  if (slot == -1)
    return false;
  client_fds[slot] = fd;
  nr_clients++;
  e = pthread_create (&t, attr, client_thread, (void *) (intptr_t) slot);
  if (e != 0) {
    client_fds[slot] = -1;
    nr_clients--;
    nbdkit_error ("sparsebackup-control: pthread_create: %s", strerror (e));
    close (fd);
  }
  return true;
}

static void *
control_thread (void *arg)
{
  pthread_attr_t attr;

  pthread_attr_init (&attr);
  pthread_attr_setdetachstate (&attr, PTHREAD_CREATE_DETACHED);
  while (wait_fd (listen_fd, -1)) {
    int fd = accept4 (listen_fd, NULL, NULL, SOCK_CLOEXEC);

    if (fd == -1) {
      if (errno == EINTR || errno == ECONNABORTED || errno == EAGAIN)
        continue;
      nbdkit_error ("sparsebackup-control: accept: %m");
      break;
    }
    if (!start_client (fd, &attr))
      refuse (fd);
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
    {
      SCOPED_MUTEX (&client_lock);
      stopping = true;
      for (int i = 0; i < MAX_CLIENTS; ++i)
        if (client_fds[i] >= 0)
          shutdown (client_fds[i], SHUT_RDWR);
      while (nr_clients > 0)
        pthread_cond_wait (&client_gone, &client_lock);
    }
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
    remove_socket ();
  }
}
