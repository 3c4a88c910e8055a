/* sparsebackup: control protocol parser and formatter (see ctlproto.h
 * and doc/cbt-protocol.md).
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <unistd.h>

#include "ctlproto.h"

static const char *const cmd_names[] = {
  [CTL_BACKUP_BEGIN] = "backup-begin",
  [CTL_BACKUP_END] = "backup-end",
  [CTL_CHECKPOINT_LIST] = "checkpoint-list",
  [CTL_CHECKPOINT_DELETE] = "checkpoint-delete",
  [CTL_MAP] = "map",
  [CTL_STATUS] = "status",
  [CTL_GROUP_PREPARE] = "group-prepare",
  [CTL_GROUP_COMMIT] = "group-commit",
  [CTL_GROUP_ABORT] = "group-abort",
};
#define NR_CMDS (sizeof cmd_names / sizeof cmd_names[0])

static const char *const code_names[] = {
  [CTL_E_SYNTAX] = "syntax",
  [CTL_E_UNKNOWN_COMMAND] = "unknown-command",
  [CTL_E_TOO_LONG] = "too-long",
  [CTL_E_INVALID_NAME] = "invalid-name",
  [CTL_E_NO_SUCH_CHECKPOINT] = "no-such-checkpoint",
  [CTL_E_EXISTS] = "exists",
  [CTL_E_BUSY] = "busy",
  [CTL_E_STATE] = "state",
  [CTL_E_LIMIT] = "limit",
  [CTL_E_IO] = "io",
  [CTL_E_INTERNAL] = "internal",
  [CTL_E_BROKEN] = "broken",
};

/* What each command takes. */
#define A_NAME 1                /* one positional name */
#define A_SINCE 2               /* --since NAME */
#define A_OKFAIL 4              /* --ok | --failed, required */
#define A_HOLD 8                /* --hold-timeout MS, required */
static const unsigned cmd_args[] = {
  [CTL_BACKUP_BEGIN] = A_NAME | A_SINCE,
  [CTL_BACKUP_END] = A_NAME | A_OKFAIL,
  [CTL_CHECKPOINT_LIST] = 0,
  [CTL_CHECKPOINT_DELETE] = A_NAME,
  [CTL_MAP] = A_SINCE,
  [CTL_STATUS] = 0,
  [CTL_GROUP_PREPARE] = A_NAME | A_SINCE | A_HOLD,
  [CTL_GROUP_COMMIT] = A_NAME,
  [CTL_GROUP_ABORT] = A_NAME,
};

const char *
ctl_cmd_name (enum ctl_cmd cmd)
{
  return (size_t) cmd < NR_CMDS && cmd_names[cmd] ? cmd_names[cmd] : "?";
}

const char *
ctl_code_name (enum ctl_code code)
{
  return (size_t) code < sizeof code_names / sizeof code_names[0]
    ? code_names[code] : "internal";
}

enum ctl_code
ctl_code_from_errno (int err)
{
  switch (err) {
  case ENOENT: return CTL_E_NO_SUCH_CHECKPOINT;
  case EEXIST: return CTL_E_EXISTS;
  case EBUSY: case EAGAIN: return CTL_E_BUSY;
  case EINVAL: return CTL_E_STATE;
  case EMLINK: return CTL_E_LIMIT;       /* cbt: the checkpoint limit */
  case ENOMEM: return CTL_E_INTERNAL;
  default: return CTL_E_IO;              /* the file: EIO, ENOSPC... */
  }
}

/* ---- Formatting ---------------------------------------------------- */

/* Finish a line of N bytes in BUF: check it fits, add "\n". */
static int
finish (char *buf, size_t len, int n)
{
  if (n < 0 || (size_t) n + 2 > len || (size_t) n + 1 > CTL_LINE_MAX) {
    if (len > 0)
      buf[0] = '\0';
    errno = ENOBUFS;
    return -1;
  }
  buf[n] = '\n';
  buf[n + 1] = '\0';
  return n + 1;
}

/* Replace bytes outside printable ASCII in BUF[FROM..]. */
static void
sanitize (char *buf, size_t from)
{
  for (char *p = buf + from; *p; ++p)
    if ((unsigned char) *p < 0x20 || (unsigned char) *p > 0x7e)
      *p = '?';
}

static int
vformat (char *buf, size_t len, const char *prefix, const char *fmt,
         va_list ap)
{
  size_t pl = strlen (prefix);
  int n;

  if (len < pl + 2) {
    errno = ENOBUFS;
    return -1;
  }
  memcpy (buf, prefix, pl + 1);
  n = vsnprintf (buf + pl, len - pl, fmt, ap);
  if (n < 0)
    return finish (buf, len, -1);
  if ((size_t) n < len - pl)
    sanitize (buf, pl);
  if (n == 0 && strcmp (prefix, "OK ") == 0)
    pl--;                       /* "OK", not "OK " */
  return finish (buf, len, (int) pl + n);
}

int
ctl_format_data (char *buf, size_t len, const char *fmt, ...)
{
  va_list ap;
  int r;

  va_start (ap, fmt);
  r = vformat (buf, len, "* ", fmt, ap);
  va_end (ap);
  return r;
}

int
ctl_format_ok (char *buf, size_t len, const char *fmt, ...)
{
  va_list ap;
  int r;

  va_start (ap, fmt);
  r = vformat (buf, len, "OK ", fmt, ap);
  va_end (ap);
  return r;
}

int
ctl_format_err (char *buf, size_t len, enum ctl_code code,
                const char *message)
{
  size_t max = len < CTL_LINE_MAX ? len : CTL_LINE_MAX;
  int n = snprintf (buf, len, "ERR %s %s", ctl_code_name (code),
                    message && *message ? message : "error");

  if (n < 0 || max < 2)
    return finish (buf, len, -1);
  if ((size_t) n + 2 > max)     /* cut the message to fit */
    n = (int) max - 2;
  buf[n] = '\0';
  sanitize (buf, 0);
  return finish (buf, len, n);
}

int
ctl_format_hello (char *buf, size_t len)
{
  return finish (buf, len, snprintf (buf, len, "HELLO %s %d",
                                     CTL_PROTOCOL, CTL_VERSION));
}

void
ctl_iso8601 (char *buf, size_t len, uint64_t secs)
{
  time_t t = secs > (uint64_t) INT64_MAX ? INT64_MAX : (time_t) secs;
  struct tm tm;

  if (gmtime_r (&t, &tm) == NULL ||
      strftime (buf, len, "%Y-%m-%dT%H:%M:%SZ", &tm) == 0)
    snprintf (buf, len, "-");
}

int
ctl_format_checkpoint (char *buf, size_t len,
                       const struct cbt_checkpoint_info *cp)
{
  char iso[32];

  ctl_iso8601 (iso, sizeof iso, cp->created);
  return ctl_format_data (buf, len, "%s %s %" PRIu64 " %s", cp->name,
                          cp->state == CBT_STATE_PENDING ? "pending" : "good",
                          cp->created, iso);
}

int
ctl_format_extent (char *buf, size_t len, uint64_t offset, uint64_t length)
{
  return ctl_format_data (buf, len, "%" PRIu64 " %" PRIu64, offset, length);
}

int
ctl_format_request (const struct ctl_request *req, char *buf, size_t len)
{
  const char *cmd = ctl_cmd_name (req->cmd);
  unsigned a = (size_t) req->cmd < NR_CMDS ? cmd_args[req->cmd] : 0;
  char hold[32] = "";

  if (cmd[0] == '?') {
    errno = EINVAL;
    return -1;
  }
  if (a & A_HOLD)
    snprintf (hold, sizeof hold, " --hold-timeout %" PRIu32, req->hold_ms);
  return finish (buf, len, snprintf (buf, len, "%s%s%s%s%s%s%s", cmd,
                                     (a & A_NAME) ? " " : "",
                                     (a & A_NAME) ? req->name : "",
                                     req->since[0] ? " --since " : "",
                                     req->since,
                                     (a & A_OKFAIL) ?
                                     (req->ok ? " --ok" : " --failed") : "",
                                     hold));
}

/* ---- Parsing ------------------------------------------------------- */

#define MAX_WORDS 8

/* Set *CODE and the message, return -1. */
static int __attribute__ ((__format__ (__printf__, 5, 6)))
refuse (enum ctl_code *code, enum ctl_code c, char *msg, size_t msglen,
        const char *fmt, ...)
{
  va_list ap;

  *code = c;
  va_start (ap, fmt);
  vsnprintf (msg, msglen, fmt, ap);
  va_end (ap);
  return -1;
}

/* Copy a name argument, checking it. */
static int
take_name (char *dst, const char *word, const char *what,
           enum ctl_code *code, char *msg, size_t msglen)
{
  if (!cbt_name_valid (word))
    return refuse (code, CTL_E_INVALID_NAME, msg, msglen,
                   "%s '%.*s' is not a valid checkpoint name (1-%d "
                   "printable characters, no space, not starting with '-')",
                   what, CBT_NAME_MAX + 1, word, CBT_NAME_MAX);
  strcpy (dst, word);
  return 0;
}

/* Split LINE (checked: printable) into at most MAX_WORDS words of COPY. */
static int
split_words (const char *line, char *copy, char **words, size_t *nw,
             enum ctl_code *code, char *msg, size_t msglen)
{
  char *save = NULL, *w;
  size_t len = strlen (line);

  if (len >= CTL_LINE_MAX)
    return refuse (code, CTL_E_TOO_LONG, msg, msglen,
                   "request of %zu bytes, the limit is %d", len,
                   CTL_LINE_MAX - 1);
  for (size_t i = 0; i < len; ++i)
    if ((line[i] < 0x20 && line[i] != '\t') ||
        (unsigned char) line[i] > 0x7e)
      return refuse (code, CTL_E_SYNTAX, msg, msglen, "byte 0x%02x at "
                     "column %zu is not printable ASCII",
                     (unsigned char) line[i], i + 1);
  memcpy (copy, line, len + 1);
  *nw = 0;
  for (w = strtok_r (copy, " \t", &save); w;
       w = strtok_r (NULL, " \t", &save)) {
    if (*nw == MAX_WORDS)
      return refuse (code, CTL_E_SYNTAX, msg, msglen,
                     "too many words (at most %d)", MAX_WORDS);
    words[(*nw)++] = w;
  }
  if (*nw == 0)
    return refuse (code, CTL_E_SYNTAX, msg, msglen, "empty request");
  return 0;
}

/* The milliseconds of --hold-timeout: 1 to CTL_HOLD_MAX_MS, decimal
 * digits only.
 */
static int
take_hold (uint32_t *ms, const char *cmd, const char *word,
           enum ctl_code *code, char *msg, size_t msglen)
{
  uint64_t v = 0;
  size_t i;

  for (i = 0; word[i] >= '0' && word[i] <= '9' && v <= CTL_HOLD_MAX_MS; ++i)
    v = v * 10 + (uint64_t) (word[i] - '0');
  if (i == 0 || word[i] != '\0' || v < 1 || v > CTL_HOLD_MAX_MS)
    return refuse (code, CTL_E_SYNTAX, msg, msglen,
                   "%s: --hold-timeout '%.32s' is not a number of "
                   "milliseconds from 1 to %d", cmd, word, CTL_HOLD_MAX_MS);
  *ms = (uint32_t) v;
  return 0;
}

/* One argument W (words[*I]) of command CMD taking A. */
static int
parse_argument (struct ctl_request *req, unsigned a, char **words,
                size_t nw, size_t *i, bool *have_okfail,
                enum ctl_code *code, char *msg, size_t msglen)
{
  const char *cmd = words[0], *w = words[*i];

  if (strcmp (w, "--hold-timeout") == 0 && (a & A_HOLD)) {
    if (req->hold_ms)
      return refuse (code, CTL_E_SYNTAX, msg, msglen,
                     "%s: --hold-timeout given twice", cmd);
    if (*i + 1 == nw)
      return refuse (code, CTL_E_SYNTAX, msg, msglen,
                     "%s: --hold-timeout needs a number of milliseconds",
                     cmd);
    return take_hold (&req->hold_ms, cmd, words[++*i], code, msg, msglen);
  }

  if (strcmp (w, "--since") == 0 && (a & A_SINCE)) {
    if (req->since[0])
      return refuse (code, CTL_E_SYNTAX, msg, msglen,
                     "%s: --since given twice", cmd);
    if (*i + 1 == nw)
      return refuse (code, CTL_E_SYNTAX, msg, msglen,
                     "%s: --since needs a checkpoint name", cmd);
    return take_name (req->since, words[++*i], "--since", code, msg,
                      msglen);
  }
  if ((strcmp (w, "--ok") == 0 || strcmp (w, "--failed") == 0) &&
      (a & A_OKFAIL)) {
    if (*have_okfail)
      return refuse (code, CTL_E_SYNTAX, msg, msglen,
                     "%s: give one of --ok and --failed, once", cmd);
    *have_okfail = true;
    req->ok = w[2] == 'o';
    return 0;
  }
  if (w[0] == '-' && w[1] == '-')
    return refuse (code, CTL_E_SYNTAX, msg, msglen,
                   "%s: unknown option '%.64s'", cmd, w);
  if ((a & A_NAME) && req->name[0] == '\0')
    return take_name (req->name, w, "checkpoint", code, msg, msglen);
  return refuse (code, CTL_E_SYNTAX, msg, msglen,
                 "%s: unexpected argument '%.64s'", cmd, w);
}

int
ctl_parse_request (const char *line, struct ctl_request *req,
                   enum ctl_code *code, char *msg, size_t msglen)
{
  char copy[CTL_LINE_MAX];
  char *words[MAX_WORDS];
  size_t nw = 0, c;
  bool have_okfail = false;
  unsigned a;

  memset (req, 0, sizeof *req);
  if (split_words (line, copy, words, &nw, code, msg, msglen) == -1)
    return -1;
  for (c = 1; c < NR_CMDS; ++c)
    if (cmd_names[c] && strcmp (words[0], cmd_names[c]) == 0)
      break;
  if (c == NR_CMDS)
    return refuse (code, CTL_E_UNKNOWN_COMMAND, msg, msglen,
                   "unknown command '%.64s' (commands: backup-begin, "
                   "backup-end, checkpoint-list, checkpoint-delete, map, "
                   "status, group-prepare, group-commit, group-abort)",
                   words[0]);
  req->cmd = (enum ctl_cmd) c;
  a = cmd_args[c];
  for (size_t i = 1; i < nw; ++i)
    if (parse_argument (req, a, words, nw, &i, &have_okfail, code, msg,
                        msglen) == -1)
      return -1;
  if ((a & A_NAME) && req->name[0] == '\0')
    return refuse (code, CTL_E_SYNTAX, msg, msglen,
                   "%s: missing checkpoint name", words[0]);
  if ((a & A_OKFAIL) && !have_okfail)
    return refuse (code, CTL_E_SYNTAX, msg, msglen,
                   "%s: missing --ok or --failed", words[0]);
  if ((a & A_HOLD) && req->hold_ms == 0)
    return refuse (code, CTL_E_SYNTAX, msg, msglen,
                   "%s: missing --hold-timeout MS (how long the server may "
                   "hold writes, 1 to %d)", words[0], CTL_HOLD_MAX_MS);
  if ((a & A_NAME) && (a & A_SINCE) && strcmp (req->name, req->since) == 0)
    return refuse (code, CTL_E_SYNTAX, msg, msglen,
                   "%s: the new checkpoint cannot be its own --since",
                   words[0]);
  return 0;
}

int
ctl_parse_hello (const char *line, unsigned *version, char *msg,
                 size_t msglen)
{
  char proto[32];
  unsigned v;
  int n = -1;

  if (sscanf (line, "HELLO %31s %u%n", proto, &v, &n) != 2 || n < 0 ||
      line[n] != '\0' || strcmp (proto, CTL_PROTOCOL) != 0) {
    snprintf (msg, msglen, "not a %s hello line: '%.80s'", CTL_PROTOCOL,
              line);
    return -1;
  }
  *version = v;
  if (v != CTL_VERSION) {
    snprintf (msg, msglen, "the server speaks version %u of the protocol, "
              "this program version %d", v, CTL_VERSION);
    return -1;
  }
  return 0;
}

int
ctl_parse_reply_line (const char *line, struct ctl_reply_line *r,
                      char *msg, size_t msglen)
{
  const char *sp;

  memset (r, 0, sizeof *r);
  if (strncmp (line, "* ", 2) == 0) {
    r->kind = CTL_LINE_DATA;
    r->text = line + 2;
    return 0;
  }
  if (strcmp (line, "OK") == 0 || strncmp (line, "OK ", 3) == 0) {
    r->kind = CTL_LINE_OK;
    r->text = line[2] ? line + 3 : line + 2;
    return 0;
  }
  if (strncmp (line, "ERR ", 4) == 0 && (sp = strchr (line + 4, ' ')) &&
      sp > line + 4 && (size_t) (sp - line - 4) < sizeof r->code) {
    r->kind = CTL_LINE_ERR;
    memcpy (r->code, line + 4, (size_t) (sp - line - 4));
    r->text = sp + 1;
    return 0;
  }
  snprintf (msg, msglen, "unexpected reply line '%.80s'", line);
  return -1;
}

/* ---- Reading lines ------------------------------------------------- */

void
ctl_reader_init (struct ctl_reader *r, int fd)
{
  memset (r, 0, sizeof *r);
  r->fd = fd;
}

size_t
ctl_reader_pending (const struct ctl_reader *r, const char **bytes)
{
  *bytes = r->buf + r->start;
  return r->end - r->start;
}

/* Milliseconds left until DEADLINE (CLOCK_MONOTONIC), at least 0. */
static int
ms_left (const struct timespec *deadline)
{
  struct timespec now;
  int64_t ms;

  clock_gettime (CLOCK_MONOTONIC, &now);
  ms = (deadline->tv_sec - now.tv_sec) * 1000 +
    (deadline->tv_nsec - now.tv_nsec) / 1000000;
  return ms < 0 ? 0 : ms > INT32_MAX ? INT32_MAX : (int) ms;
}

/* Wait until R->fd is readable: 0, or -4 with errno. */
static int
wait_readable (struct ctl_reader *r, const struct timespec *deadline,
               int stop_fd)
{
  struct pollfd p[2] = {
    { .fd = r->fd, .events = POLLIN },
    { .fd = stop_fd, .events = POLLIN },
  };
  int n;

  do
    n = poll (p, stop_fd >= 0 ? 2 : 1, deadline ? ms_left (deadline) : -1);
  while (n == -1 && errno == EINTR);
  if (n == -1)
    return -1;
  if (stop_fd >= 0 && p[1].revents) {
    errno = ECANCELED;
    return -4;
  }
  if (n == 0) {
    errno = ETIMEDOUT;
    return -4;
  }
  return 0;
}

/* A line from R's buffer into LINE: 1, -2 or -3; 0 if none yet. */
static int
take_line (struct ctl_reader *r, char *line)
{
  char *nl = memchr (r->buf + r->start, '\n', r->end - r->start);
  size_t len;
  bool was_discarding = r->discarding, bad = false;

  if (nl == NULL)
    return 0;
  len = (size_t) (nl - (r->buf + r->start));
  r->discarding = false;
  if (was_discarding) {
    r->start += len + 1;
    return -2;
  }
  memcpy (line, r->buf + r->start, len);
  r->start += len + 1;
  if (len > 0 && line[len - 1] == '\r')
    len--;
  line[len] = '\0';
  for (size_t i = 0; i < len; ++i)
    if (((unsigned char) line[i] < 0x20 && line[i] != '\t') ||
        (unsigned char) line[i] > 0x7e)
      bad = true;
  return bad ? -3 : 1;
}

int
ctl_read_line (struct ctl_reader *r, char *line, int timeout_ms, int stop_fd)
{
  struct timespec deadline;

  if (timeout_ms >= 0) {
    clock_gettime (CLOCK_MONOTONIC, &deadline);
    deadline.tv_sec += timeout_ms / 1000;
    deadline.tv_nsec += (long) (timeout_ms % 1000) * 1000000;
    if (deadline.tv_nsec >= 1000000000) {
      deadline.tv_sec++;
      deadline.tv_nsec -= 1000000000;
    }
  }
  for (;;) {
    int t = take_line (r, line);
    ssize_t n;

    if (t != 0)
      return t;
    /* No LF in the buffer: make room, or give up on this line. */
    if (r->start > 0) {
      memmove (r->buf, r->buf + r->start, r->end - r->start);
      r->end -= r->start;
      r->start = 0;
    }
    if (r->end == sizeof r->buf) {
      r->discarding = true;
      r->end = 0;
    }
    if (timeout_ms >= 0 || stop_fd >= 0) {
      t = wait_readable (r, timeout_ms >= 0 ? &deadline : NULL, stop_fd);
      if (t != 0)
        return t;
    }
    n = read (r->fd, r->buf + r->end, sizeof r->buf - r->end);
    if (n == -1 && errno == EINTR)
      continue;
    if (n == -1)
      return -1;
    if (n == 0)
      return 0;
    r->end += (size_t) n;
  }
}
