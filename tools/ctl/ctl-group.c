/* sparsebackup-ctl: group backups (ctl-group.h, doc/cbt-protocol.md).
 *
 * The controller of a two-phase begin over several control sockets.
 * Each server is a member with a state; requests are sent to all the
 * members of a phase at once and their replies read as they come (one
 * poll loop over every connection), so that a refusal aborts the
 * members already prepared at once instead of after the slowest.
 *
 *   connect, hello       every member; any failure: nothing was asked
 *   group-prepare        all at once; replies by HOLD + 1 s
 *     all OK             group-commit on all
 *     any ERR/failure    group-abort on every prepared member (and on
 *                        the ones whose OK comes later)
 *   group-commit         all at once (SPARSEBACKUP_CTL_DEBUG_COMMIT_DELAY
 *                        spaces them, for tests)
 *     any ERR/failure    backup-end NEW --failed on the members that
 *                        committed (rolled back)
 *
 * Every wait is bounded: the replies to group-prepare by the hold
 * timeout (plus a second: a server answers "busy" by its own deadline),
 * the others by --timeout.  A member that cannot be talked to is
 * closed: a server whose controller goes away aborts by itself.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "ctlproto.h"
#include "ctl-group.h"
#include "ctl-util.h"

static const char *prog = "sparsebackup-ctl";

enum mstate {
  M_NEW,
  M_PREPARING,                  /* group-prepare sent */
  M_PREPARED,
  M_ABORTING,                   /* group-abort sent */
  M_ABORTED,
  M_COMMITTING,                 /* group-commit sent */
  M_COMMITTED,                  /* NEW is pending there */
  M_ROLLING_BACK,               /* backup-end NEW --failed sent */
  M_ROLLED_BACK,
  M_REFUSED,                    /* answered ERR: left as it was */
  M_FAILED,                     /* could not be talked to */
};

struct member {
  const char *path;
  int fd;                       /* -1 once closed */
  enum mstate st;
  bool unknown;                 /* NEW may be pending there */
  bool have_held, have_drain;
  uint64_t held_us, drain_us;
  int64_t deadline_ms;          /* for the reply awaited */
  char err[CTL_LINE_MAX + 128]; /* why it failed, for people */
  struct ctl_reader rd;
};

struct group {
  const char *name, *since;
  uint32_t hold_ms;
  int timeout_ms;
  size_t n;
  struct member *m;
  bool abort;                   /* not every member can commit */
};

static int64_t
now_ms (void)
{
  struct timespec t;

  clock_gettime (CLOCK_MONOTONIC, &t);
  return (int64_t) t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int64_t
now_us (void)
{
  struct timespec t;

  clock_gettime (CLOCK_MONOTONIC, &t);
  return (int64_t) t.tv_sec * 1000000 + t.tv_nsec / 1000;
}

static void
close_member (struct member *m)
{
  if (m->fd >= 0)
    close (m->fd);
  m->fd = -1;
}

/* M could not be talked to: WHAT happened. */
static void
lost (struct member *m, const char *what)
{
  snprintf (m->err, sizeof m->err, "%s", what);
  close_member (m);
  if (m->st == M_COMMITTING || m->st == M_ROLLING_BACK)
    m->unknown = true;          /* the request may have been applied */
  if (m->st == M_ABORTING)
    m->st = M_ABORTED;          /* it aborts by itself once closed */
  else
    m->st = M_FAILED;
}

/* The value of KEY in the OK line's TEXT. */
static bool
ok_u64 (const char *text, const char *key, uint64_t *v)
{
  size_t kl = strlen (key);

  for (const char *p = text; p && *p; p = strchr (p, ' ')) {
    while (*p == ' ')
      p++;
    if (strncmp (p, key, kl) == 0 && p[kl] == '=')
      return sscanf (p + kl + 1, "%" SCNu64, v) == 1;
  }
  return false;
}

/* Send LINE (with its LF) to M, waiting for the reply by DEADLINE_MS. */
static void
send_request (struct member *m, const char *line, int64_t deadline_ms,
              enum mstate next)
{
  m->st = next;
  m->deadline_ms = deadline_ms;
  if (ctl_write_all (m->fd, line, strlen (line)) == -1) {
    char what[256];

    snprintf (what, sizeof what, "sending %.*s: %s",
              (int) strcspn (line, " \n"), line, strerror (errno));
    lost (m, what);
  }
}

static void
send_abort (struct group *g, struct member *m)
{
  char line[CTL_LINE_MAX];

  snprintf (line, sizeof line, "group-abort %s\n", g->name);
  send_request (m, line, now_ms () + g->timeout_ms, M_ABORTING);
}

/* Every prepared member aborts. */
static void
abort_prepared (struct group *g)
{
  g->abort = true;
  for (size_t i = 0; i < g->n; ++i)
    if (g->m[i].st == M_PREPARED)
      send_abort (g, &g->m[i]);
}

/* The status line of M's reply: OK (TEXT) or ERR (the whole LINE). */
static void
on_reply (struct group *g, struct member *m, bool ok, const char *text,
          const char *line)
{
  switch (m->st) {
  case M_PREPARING:
    if (!ok) {
      snprintf (m->err, sizeof m->err, "%s", line);
      m->st = M_REFUSED;
      abort_prepared (g);
      return;
    }
    m->have_drain = ok_u64 (text, "drain-us", &m->drain_us);
    m->st = M_PREPARED;
    if (g->abort)               /* another member failed meanwhile */
      send_abort (g, m);
    return;
  case M_ABORTING:
    /* An ERR means that there was nothing left to abort. */
    if (ok)
      m->have_held = ok_u64 (text, "held-us", &m->held_us);
    m->st = M_ABORTED;
    return;
  case M_COMMITTING:
    if (!ok) {
      snprintf (m->err, sizeof m->err, "%s", line);
      m->st = M_REFUSED;
      g->abort = true;
      return;
    }
    m->have_held = ok_u64 (text, "held-us", &m->held_us);
    m->st = M_COMMITTED;
    return;
  case M_ROLLING_BACK:
    if (!ok) {
      snprintf (m->err, sizeof m->err, "backup-end %s --failed: %s",
                g->name, line);
      m->unknown = true;
      m->st = M_FAILED;
      return;
    }
    m->st = M_ROLLED_BACK;
    return;
  default:
    return;
  }
}

static bool
waiting (const struct member *m)
{
  return m->fd >= 0 && (m->st == M_PREPARING || m->st == M_ABORTING ||
                        m->st == M_COMMITTING || m->st == M_ROLLING_BACK);
}

static const char *
awaited (enum mstate st)
{
  switch (st) {
  case M_PREPARING: return "group-prepare";
  case M_ABORTING: return "group-abort";
  case M_COMMITTING: return "group-commit";
  default: return "backup-end";
  }
}

/* Read what M sent: the status line of its reply, if it is complete. */
static void
read_member (struct group *g, struct member *m)
{
  char line[CTL_LINE_MAX], msg[256], what[CTL_LINE_MAX + 64];
  struct ctl_reply_line rl;

  for (;;) {
    int r = ctl_read_line (&m->rd, line, 0, -1);

    if (r == -4)
      return;                   /* the rest of the line later */
    if (r != 1) {
      snprintf (what, sizeof what, "%s during %s",
                r == 0 ? "the server closed the connection" :
                r == -1 ? strerror (errno) : "the server sent a bad line",
                awaited (m->st));
      lost (m, what);
      return;
    }
    if (ctl_parse_reply_line (line, &rl, msg, sizeof msg) == -1) {
      snprintf (what, sizeof what, "%s: %s", awaited (m->st), msg);
      lost (m, what);
      return;
    }
    if (rl.kind != CTL_LINE_DATA) {
      on_reply (g, m, rl.kind == CTL_LINE_OK, rl.text, line);
      return;
    }
  }
}

/* Read the replies until no member waits for one. */
static void
wait_replies (struct group *g)
{
  struct pollfd *p = calloc (g->n, sizeof *p);
  size_t *idx = calloc (g->n, sizeof *idx);

  if (p == NULL || idx == NULL) {
    fprintf (stderr, "%s: out of memory\n", prog);
    exit (2);
  }
  for (;;) {
    int64_t now = now_ms (), first = INT64_MAX;
    size_t np = 0;
    int r;

    for (size_t i = 0; i < g->n; ++i) {
      struct member *m = &g->m[i];

      if (!waiting (m))
        continue;
      if (now >= m->deadline_ms) {
        char what[256];

        snprintf (what, sizeof what, "no reply to %s within %.1f s",
                  awaited (m->st), (m->st == M_PREPARING ?
                                    (double) g->hold_ms + 1000 :
                                    (double) g->timeout_ms) / 1000.0);
        if (m->st == M_PREPARING)
          g->abort = true;
        lost (m, what);
        abort_prepared (g);
        continue;
      }
      if (m->deadline_ms < first)
        first = m->deadline_ms;
      p[np] = (struct pollfd) { .fd = m->fd, .events = POLLIN };
      idx[np++] = i;
    }
    if (np == 0)
      break;
    do
      r = poll (p, np, (int) (first - now));
    while (r == -1 && errno == EINTR);
    if (r == -1) {
      fprintf (stderr, "%s: poll: %s\n", prog, strerror (errno));
      exit (2);
    }
    for (size_t j = 0; j < np; ++j) {
      struct member *m = &g->m[idx[j]];

      if (p[j].revents && waiting (m)) {
        enum mstate before = m->st;

        read_member (g, m);
        if (before == M_PREPARING && m->st == M_FAILED) {
          g->abort = true;
          abort_prepared (g);
        }
      }
    }
  }
  free (p);
  free (idx);
}

/* Connect to M and check its hello by DEADLINE_MS: false on failure. */
static bool
open_member (struct member *m, int64_t deadline_ms)
{
  char line[CTL_LINE_MAX], msg[256];
  unsigned version;
  int64_t left = deadline_ms - now_ms ();
  int r;

  m->fd = ctl_connect (m->path, msg, sizeof msg);
  if (m->fd == -1) {
    snprintf (m->err, sizeof m->err, "%s", msg);
    m->st = M_FAILED;
    return false;
  }
  ctl_reader_init (&m->rd, m->fd);
  /* A tenth of a second at a time: an NBD server greets with bytes
   * that are no line, and is named at once.
   */
  for (;;) {
    const char *bytes;
    size_t nb;

    left = deadline_ms - now_ms ();
    r = ctl_read_line (&m->rd, line, left < 0 ? 0 : left < 100 ? (int) left
                       : 100, -1);
    nb = ctl_reader_pending (&m->rd, &bytes);
    if (r != -4 || left <= 100 || (nb >= 8 &&
                                   memcmp (bytes, "NBDMAGIC", 8) == 0))
      break;
  }
  if (r != 1) {
    const char *bytes;
    size_t nb = ctl_reader_pending (&m->rd, &bytes);

    snprintf (msg, sizeof msg, "%s",
              nb >= 8 && memcmp (bytes, "NBDMAGIC", 8) == 0 ?
              "it sent NBDMAGIC: this is an NBD server's socket, not the "
              "filter's control socket" :
              r == -4 ? "no hello line within the timeout" :
              r == 0 ? "the server closed the connection before its hello" :
              "no proper hello line");
    lost (m, msg);
    return false;
  }
  if (ctl_parse_hello (line, &version, msg, sizeof msg) == -1) {
    lost (m, msg);
    return false;
  }
  return true;
}

/* ---- Output ------------------------------------------------------------- */

static const char *
state_word (const struct member *m)
{
  if (m->unknown)
    return "unknown";
  switch (m->st) {
  case M_COMMITTED: return "pending";
  case M_ABORTED: return "aborted";
  case M_ROLLED_BACK: return "rolled-back";
  case M_REFUSED: return "refused";
  case M_PREPARED: case M_NEW: return "not-asked";
  default: return "failed";
  }
}

static void
print_json (const struct group *g, bool taken, uint64_t max_held,
            uint64_t elapsed)
{
  printf ("{ \"group\": ");
  ctl_json_string (stdout, g->name);
  printf (", \"since\": ");
  if (g->since)
    ctl_json_string (stdout, g->since);
  else
    printf ("null");
  printf (", \"taken\": %s, \"hold-timeout-ms\": %" PRIu32,
          taken ? "true" : "false", g->hold_ms);
  if (taken)
    printf (", \"max-held-us\": %" PRIu64 ", \"elapsed-us\": %" PRIu64,
            max_held, elapsed);
  printf (",\n  \"servers\": [");
  for (size_t i = 0; i < g->n; ++i) {
    const struct member *m = &g->m[i];

    printf ("%s\n    { \"socket\": ", i ? "," : "");
    ctl_json_string (stdout, m->path);
    printf (", \"state\": \"%s\"", state_word (m));
    if (m->have_drain)
      printf (", \"drain-us\": %" PRIu64, m->drain_us);
    if (m->have_held)
      printf (", \"held-us\": %" PRIu64, m->held_us);
    printf (", \"error\": ");
    if (m->err[0])
      ctl_json_string (stdout, m->err);
    else
      printf ("null");
    printf (" }");
  }
  printf ("\n  ]\n}\n");
}

/* The result on stdout (and the failures on stderr); the exit status. */
static int
report (const struct group *g, bool json, int64_t start_us)
{
  uint64_t max_held = 0, elapsed = (uint64_t) (now_us () - start_us);
  size_t failed = 0, comm = 0, unknown = 0;
  bool taken = !g->abort;
  char names[1024] = "";

  for (size_t i = 0; i < g->n; ++i) {
    const struct member *m = &g->m[i];

    taken &= m->st == M_COMMITTED;
    if (m->have_held && m->held_us > max_held)
      max_held = m->held_us;
    if (m->err[0]) {
      size_t l = strlen (names);

      snprintf (names + l, sizeof names - l, "%s%s", failed ? ", " : "",
                m->path);
      failed++;
      comm += m->st == M_FAILED;
    }
    unknown += m->unknown;
  }
  if (json)
    print_json (g, taken, max_held, elapsed);
  for (size_t i = 0; i < g->n; ++i) {
    const struct member *m = &g->m[i];

    if (taken && !json) {
      printf ("%s: OK checkpoint=%s state=pending since=%s held-us=%"
              PRIu64 "\n", m->path, g->name, g->since ? g->since : "-",
              m->held_us);
      continue;
    }
    if (m->err[0])
      fprintf (stderr, "%s: %s: %s\n", prog, m->path, m->err);
    else if (!taken && m->st == M_ABORTED && m->have_held)
      fprintf (stderr, "%s: %s: aborted (writes were held %" PRIu64
               " us)\n", prog, m->path, m->held_us);
    else if (!taken && m->st == M_ROLLED_BACK)
      fprintf (stderr, "%s: %s: rolled back (backup-end %s --failed)\n",
               prog, m->path, g->name);
    if (m->unknown)
      fprintf (stderr, "%s: %s: checkpoint '%s' may be left pending there: "
               "run '%s %s backup-end %s --failed' once it answers\n",
               prog, m->path, g->name, prog, m->path, g->name);
  }
  if (taken) {
    if (!json)
      printf ("OK group=%s servers=%zu max-held-us=%" PRIu64
              " elapsed-us=%" PRIu64 "\n", g->name, g->n, max_held,
              elapsed);
    return 0;
  }
  fprintf (stderr, "%s: group backup '%s' not taken: %zu of %zu servers "
           "failed (%s); %s\n", prog, g->name, failed, g->n, names,
           unknown ? "see above for the servers that may need backup-end "
           "--failed" : "no server was left with the checkpoint");
  return unknown ? 3 : comm ? 2 : 1;
}

/* ---- Arguments ---------------------------------------------------------- */

static void __attribute__ ((__noreturn__, __format__ (__printf__, 1, 2)))
usage_error (const char *fmt, ...)
{
  va_list ap;

  fprintf (stderr, "%s: group-begin: ", prog);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
  exit (2);
}

static uint32_t
parse_hold (const char *s)
{
  char *end;
  long v;

  errno = 0;
  v = strtol (s, &end, 10);
  if (errno || end == s || *end || v < 1 || v > CTL_HOLD_MAX_MS)
    usage_error ("--hold-timeout: '%s' is not a number of milliseconds "
                 "from 1 to %d", s, CTL_HOLD_MAX_MS);
  return (uint32_t) v;
}

/* Test hooks (sparsebackup-ctl(1), ENVIRONMENT). */
static long
debug_env (const char *name)
{
  const char *v = getenv (name);
  char *end;
  long n;

  if (v == NULL || *v == '\0')
    return -1;
  n = strtol (v, &end, 10);
  if (*end || n < 0 || n > 60000)
    usage_error ("%s: '%s' is not a number of milliseconds", name, v);
  return n;
}

int
group_begin (int argc, char **argv, bool json, int timeout_ms)
{
  struct group g = { .hold_ms = GROUP_DEFAULT_HOLD_MS,
                     .timeout_ms = timeout_ms };
  struct ctl_request req;
  enum ctl_code code;
  char line[CTL_LINE_MAX], msg[256];
  const char *kill_at = getenv ("SPARSEBACKUP_CTL_DEBUG_KILL");
  const char *stop_at = getenv ("SPARSEBACKUP_CTL_DEBUG_STOP");
  long commit_delay = debug_env ("SPARSEBACKUP_CTL_DEBUG_COMMIT_DELAY");
  const char **paths = calloc ((size_t) argc, sizeof *paths);
  int64_t start_us, deadline;
  bool hold_given = false;
  int status;

  if (paths == NULL)
    usage_error ("out of memory");
  for (int i = 1; i < argc; ++i) {
    const char *a = argv[i];

    if (strcmp (a, "--json") == 0)
      json = true;
    else if (strcmp (a, "--since") == 0 && i + 1 < argc && !g.since)
      g.since = argv[++i];
    else if (strncmp (a, "--since=", 8) == 0 && !g.since)
      g.since = a + 8;
    else if (strcmp (a, "--hold-timeout") == 0 && i + 1 < argc &&
             !hold_given) {
      g.hold_ms = parse_hold (argv[++i]);
      hold_given = true;
    }
    else if (strncmp (a, "--hold-timeout=", 15) == 0 && !hold_given) {
      g.hold_ms = parse_hold (a + 15);
      hold_given = true;
    }
    else if (a[0] == '-' && a[1] == '-')
      usage_error ("'%s': unknown, repeated or incomplete option", a);
    else if (g.name == NULL)
      g.name = a;
    else
      paths[g.n++] = a;
  }
  if (g.name == NULL || g.n == 0)
    usage_error ("usage: group-begin NEW [--since OLD] [--hold-timeout=MS] "
                 "SOCKET...");
  if (g.n > GROUP_MAX_SERVERS)
    usage_error ("%zu sockets: at most %d", g.n, GROUP_MAX_SERVERS);
  /* The request, checked here first (names, --since itself). */
  snprintf (line, sizeof line, "group-prepare %s%s%s --hold-timeout %"
            PRIu32, g.name, g.since ? " --since " : "",
            g.since ? g.since : "", g.hold_ms);
  if (ctl_parse_request (line, &req, &code, msg, sizeof msg) == -1)
    usage_error ("%s: %s", ctl_code_name (code), msg);
  if (ctl_format_request (&req, line, sizeof line) == -1)
    usage_error ("the request is too long");

  g.m = calloc (g.n, sizeof *g.m);
  if (g.m == NULL)
    usage_error ("out of memory");
  for (size_t i = 0; i < g.n; ++i) {
    struct stat a, b;

    g.m[i].path = paths[i];
    g.m[i].fd = -1;
    for (size_t j = 0; j < i; ++j)
      if (strcmp (paths[i], paths[j]) == 0 ||
          (stat (paths[i], &a) == 0 && stat (paths[j], &b) == 0 &&
           a.st_dev == b.st_dev && a.st_ino == b.st_ino))
        usage_error ("'%s' and '%s' are the same socket", paths[j],
                     paths[i]);
  }
  free (paths);

  /* Connect to every server before asking anything. */
  deadline = now_ms () + timeout_ms;
  for (size_t i = 0; i < g.n; ++i)
    g.abort |= !open_member (&g.m[i], deadline);
  if (g.abort) {
    for (size_t i = 0; i < g.n; ++i)
      close_member (&g.m[i]);
    status = report (&g, json, now_us ());
    free (g.m);
    return status;
  }

  /* Phase 1: every server prepares; any failure aborts them all. */
  start_us = now_us ();
  deadline = now_ms () + g.hold_ms + 1000;
  for (size_t i = 0; i < g.n && !g.abort; ++i) {
    send_request (&g.m[i], line, deadline, M_PREPARING);
    if (g.m[i].st == M_FAILED)
      abort_prepared (&g);
  }
  wait_replies (&g);

  if (!g.abort) {
    if (kill_at && strcmp (kill_at, "prepared") == 0)
      raise (SIGKILL);
    if (stop_at && strcmp (stop_at, "prepared") == 0)
      raise (SIGSTOP);          /* a controller that hangs */
    /* Phase 2: every server commits. */
    snprintf (line, sizeof line, "group-commit %s\n", g.name);
    for (size_t i = 0; i < g.n; ++i) {
      if (i > 0 && commit_delay > 0)
        nanosleep (&(struct timespec) { .tv_sec = commit_delay / 1000,
                     .tv_nsec = (commit_delay % 1000) * 1000000 }, NULL);
      send_request (&g.m[i], line, now_ms () + g.timeout_ms, M_COMMITTING);
    }
    wait_replies (&g);
    for (size_t i = 0; i < g.n; ++i)
      g.abort |= g.m[i].st != M_COMMITTED;
    if (g.abort) {
      /* Not every server committed: those that did, roll back. */
      snprintf (line, sizeof line, "backup-end %s --failed\n", g.name);
      for (size_t i = 0; i < g.n; ++i)
        if (g.m[i].st == M_COMMITTED)
          send_request (&g.m[i], line, now_ms () + g.timeout_ms,
                        M_ROLLING_BACK);
      wait_replies (&g);
    }
  }
  for (size_t i = 0; i < g.n; ++i)
    close_member (&g.m[i]);
  status = report (&g, json, start_us);
  free (g.m);
  return status;
}
