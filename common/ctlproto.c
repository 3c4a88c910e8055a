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
#include <unistd.h>

#include "ctlproto.h"

static const char *const cmd_names[] = {
  [CTL_BACKUP_BEGIN] = "backup-begin",
  [CTL_BACKUP_END] = "backup-end",
  [CTL_CHECKPOINT_LIST] = "checkpoint-list",
  [CTL_CHECKPOINT_DELETE] = "checkpoint-delete",
  [CTL_MAP] = "map",
  [CTL_STATUS] = "status",
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
#define A_JSON 8                /* --json */
static const unsigned cmd_args[] = {
  [CTL_BACKUP_BEGIN] = A_NAME | A_SINCE,
  [CTL_BACKUP_END] = A_NAME | A_OKFAIL,
  [CTL_CHECKPOINT_LIST] = 0,
  [CTL_CHECKPOINT_DELETE] = A_NAME,
  [CTL_MAP] = A_SINCE | A_JSON,
  [CTL_STATUS] = 0,
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
  case EIO: case EROFS: case ENOSPC: return CTL_E_IO;
  default: return CTL_E_INTERNAL;
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

int
ctl_format_checkpoint (char *buf, size_t len,
                       const struct cbt_checkpoint_info *cp)
{
  return ctl_format_data (buf, len, "%s %s %" PRIu64, cp->name,
                          cp->state == CBT_STATE_PENDING ? "pending" : "good",
                          cp->created);
}

int
ctl_format_extent (char *buf, size_t len, uint64_t offset, uint64_t length,
                   bool json, bool last)
{
  if (json)
    return ctl_format_data (buf, len, "[%" PRIu64 ",%" PRIu64 "]%s",
                            offset, length, last ? "" : ",");
  return ctl_format_data (buf, len, "%" PRIu64 " %" PRIu64, offset, length);
}

int
ctl_format_json_open (char *buf, size_t len, const char *since,
                      uint32_t granularity, uint64_t disk_size)
{
  /* SINCE is a valid checkpoint name: no quote or backslash to escape
   * except those two, which names may contain.
   */
  char esc[2 * CBT_NAME_MAX + 1];
  size_t j = 0;

  for (size_t i = 0; since[i] && i < CBT_NAME_MAX; ++i) {
    if (since[i] == '"' || since[i] == '\\')
      esc[j++] = '\\';
    esc[j++] = since[i];
  }
  esc[j] = '\0';
  return ctl_format_data (buf, len, "{\"since\":\"%s\",\"granularity\":%"
                          PRIu32 ",\"disk-size\":%" PRIu64
                          ",\"extents\":[", esc, granularity, disk_size);
}

int
ctl_format_request (const struct ctl_request *req, char *buf, size_t len)
{
  const char *cmd = ctl_cmd_name (req->cmd);
  unsigned a = (size_t) req->cmd < NR_CMDS ? cmd_args[req->cmd] : 0;

  if (cmd[0] == '?') {
    errno = EINVAL;
    return -1;
  }
  return finish (buf, len, snprintf (buf, len, "%s%s%s%s%s%s%s", cmd,
                                     (a & A_NAME) ? " " : "",
                                     (a & A_NAME) ? req->name : "",
                                     req->since[0] ? " --since " : "",
                                     req->since,
                                     (a & A_OKFAIL) ?
                                     (req->ok ? " --ok" : " --failed") : "",
                                     (a & A_JSON) && req->json ?
                                     " --json" : ""));
}

/* ---- Parsing ------------------------------------------------------- */

#define MAX_WORDS 8

#define SYNTAX(c, ...)                                  \
  do {                                                  \
    *code = (c);                                        \
    snprintf (msg, msglen, __VA_ARGS__);                \
    return -1;                                          \
  } while (0)

/* Copy a name argument, checking it. */
static int
take_name (char *dst, const char *word, const char *what,
           enum ctl_code *code, char *msg, size_t msglen)
{
  if (!cbt_name_valid (word))
    SYNTAX (CTL_E_INVALID_NAME, "%s '%.*s' is not a valid checkpoint name "
            "(1-%d printable characters, no space, not starting with '-')",
            what, CBT_NAME_MAX + 1, word, CBT_NAME_MAX);
  strcpy (dst, word);
  return 0;
}

int
ctl_parse_request (const char *line, struct ctl_request *req,
                   enum ctl_code *code, char *msg, size_t msglen)
{
  char copy[CTL_LINE_MAX];
  char *words[MAX_WORDS], *save = NULL, *w;
  size_t nw = 0, len = strlen (line), i;
  unsigned a;
  bool have_okfail = false;
  size_t c;

  memset (req, 0, sizeof *req);
  if (len >= CTL_LINE_MAX)
    SYNTAX (CTL_E_TOO_LONG, "request of %zu bytes, the limit is %d",
            len, CTL_LINE_MAX - 1);
  for (i = 0; i < len; ++i)
    if ((line[i] < 0x20 && line[i] != '\t') || (unsigned char) line[i] > 0x7e)
      SYNTAX (CTL_E_SYNTAX, "byte 0x%02x at column %zu is not printable "
              "ASCII", (unsigned char) line[i], i + 1);
  memcpy (copy, line, len + 1);
  for (w = strtok_r (copy, " \t", &save); w;
       w = strtok_r (NULL, " \t", &save)) {
    if (nw == MAX_WORDS)
      SYNTAX (CTL_E_SYNTAX, "too many words (at most %d)", MAX_WORDS);
    words[nw++] = w;
  }
  if (nw == 0)
    SYNTAX (CTL_E_SYNTAX, "empty request");
  for (c = 1; c < NR_CMDS; ++c)
    if (cmd_names[c] && strcmp (words[0], cmd_names[c]) == 0)
      break;
  if (c == NR_CMDS)
    SYNTAX (CTL_E_UNKNOWN_COMMAND, "unknown command '%.64s' (commands: "
            "backup-begin, backup-end, checkpoint-list, checkpoint-delete, "
            "map, status)", words[0]);
  req->cmd = (enum ctl_cmd) c;
  a = cmd_args[c];

  for (i = 1; i < nw; ++i) {
    w = words[i];
    if (strcmp (w, "--since") == 0 && (a & A_SINCE)) {
      if (req->since[0])
        SYNTAX (CTL_E_SYNTAX, "%s: --since given twice", words[0]);
      if (i + 1 == nw)
        SYNTAX (CTL_E_SYNTAX, "%s: --since needs a checkpoint name",
                words[0]);
      if (take_name (req->since, words[++i], "--since", code, msg,
                     msglen) == -1)
        return -1;
    }
    else if ((strcmp (w, "--ok") == 0 || strcmp (w, "--failed") == 0) &&
             (a & A_OKFAIL)) {
      if (have_okfail)
        SYNTAX (CTL_E_SYNTAX, "%s: give one of --ok and --failed, once",
                words[0]);
      have_okfail = true;
      req->ok = w[2] == 'o';
    }
    else if (strcmp (w, "--json") == 0 && (a & A_JSON)) {
      if (req->json)
        SYNTAX (CTL_E_SYNTAX, "%s: --json given twice", words[0]);
      req->json = true;
    }
    else if (w[0] == '-' && w[1] == '-')
      SYNTAX (CTL_E_SYNTAX, "%s: unknown option '%.64s'", words[0], w);
    else if ((a & A_NAME) && req->name[0] == '\0') {
      if (take_name (req->name, w, "checkpoint", code, msg, msglen) == -1)
        return -1;
    }
    else
      SYNTAX (CTL_E_SYNTAX, "%s: unexpected argument '%.64s'", words[0], w);
  }
  if ((a & A_NAME) && req->name[0] == '\0')
    SYNTAX (CTL_E_SYNTAX, "%s: missing checkpoint name", words[0]);
  if ((a & A_OKFAIL) && !have_okfail)
    SYNTAX (CTL_E_SYNTAX, "%s: missing --ok or --failed", words[0]);
  if (req->cmd == CTL_BACKUP_BEGIN && strcmp (req->name, req->since) == 0)
    SYNTAX (CTL_E_SYNTAX, "backup-begin: the new checkpoint cannot be "
            "its own --since");
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

int
ctl_read_line (struct ctl_reader *r, char *line)
{
  for (;;) {
    char *nl = memchr (r->buf + r->start, '\n', r->end - r->start);
    ssize_t n;

    if (nl != NULL) {
      size_t len = (size_t) (nl - (r->buf + r->start));
      bool was_discarding = r->discarding;
      bool bad = false;

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
