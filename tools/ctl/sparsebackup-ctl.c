/* sparsebackup-ctl: send one command to the sparsebackup filter's
 * control socket and print the reply (doc/cbt-protocol.md).
 *
 * Usage: sparsebackup-ctl [--json] [--timeout=SECONDS] SOCKET COMMAND
 *        [ARGS...]
 *        sparsebackup-ctl [--json] [--timeout=SECONDS] group-begin NEW
 *        [--since OLD] [--hold-timeout=MS] SOCKET...  (ctl-group.c)
 *
 * The command is checked and normalised locally (common/ctlproto.c)
 * before connecting.  Data lines are printed without their "* " to
 * stdout, then the status line: "OK ..." to stdout, "ERR ..." to
 * stderr.  With --json (anywhere among the arguments) stdout holds one
 * JSON document only: for map the form of nbdinfo --map --json over a
 * dirty bitmap, for status an object, for checkpoint-list an array.
 * Every wait is bounded (--timeout, default 60 seconds).
 * Exit status: 0 OK, 1 ERR, 2 usage error or no proper conversation
 * with the server (connect failed, no or wrong hello, unexpected line,
 * timeout, connection closed before the status line).
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <inttypes.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "ctlproto.h"
#include "ctl-group.h"
#include "ctl-util.h"
#include "vector.h"

static const char *prog = "sparsebackup-ctl";
static int timeout_ms = 60 * 1000;

static void
usage (FILE *fp, int status)
{
  fprintf (fp,
           "usage: %s [--json] [--timeout=SECONDS] SOCKET COMMAND [ARGS...]\n"
           "       %s [--json] [--timeout=SECONDS] group-begin NEW\n"
           "           [--since OLD] [--hold-timeout=MS] SOCKET...\n"
           "commands:\n"
           "  backup-begin NEW [--since OLD]\n"
           "  backup-end NEW --ok|--failed\n"
           "  checkpoint-list\n"
           "  checkpoint-delete NAME\n"
           "  map [--since NAME]\n"
           "  status\n"
           "group-begin: begin backup NEW on every SOCKET's server at one\n"
           "  point in time (writes held for at most MS milliseconds,\n"
           "  default %d); end it on each with backup-end\n"
           "options:\n"
           "  --json           print one JSON document (map, status,\n"
           "                   checkpoint-list, group-begin)\n"
           "  --timeout=SECONDS  wait at most this long for the server\n"
           "                   (default 60)\n"
           "  --help, --version\n"
           "exit status: 0 OK, 1 ERR from the server, 2 other errors\n"
           "  (group-begin: 3 when a server may be left with NEW pending)\n",
           prog, prog, GROUP_DEFAULT_HOLD_MS);
  exit (status);
}

static void __attribute__ ((__noreturn__, __format__ (__printf__, 1, 2)))
die (const char *fmt, ...)
{
  va_list ap;

  fflush (stdout);
  fprintf (stderr, "%s: ", prog);
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fputc ('\n', stderr);
  exit (2);
}

/* What a peer sent that is not our protocol, for the message. */
static const char *
describe_peer (const struct ctl_reader *r)
{
  const char *bytes;
  size_t n = ctl_reader_pending (r, &bytes);

  if (n >= 8 && memcmp (bytes, "NBDMAGIC", 8) == 0)
    return " (it sent NBDMAGIC: this is an NBD server's socket, not the "
      "filter's control socket: give sparsebackup-control=PATH)";
  if (n > 0)
    return " (it sent bytes that are not a line of the control protocol)";
  return " (it sent nothing)";
}

/* Read one line; exit 2 on anything but a proper line. */
static void
read_line (struct ctl_reader *r, char *line, const char *what)
{
  int n = ctl_read_line (r, line, timeout_ms, -1);

  if (n == 1)
    return;
  if (n == 0)
    die ("the server closed the connection before %s%s", what,
         describe_peer (r));
  if (n == -4)
    die ("timed out after %d s waiting for %s%s", timeout_ms / 1000, what,
         describe_peer (r));
  if (n == -1)
    die ("reading %s: %s", what, strerror (errno));
  die ("%s: the server sent a line %s", what,
       n == -2 ? "longer than the protocol allows" : "with unprintable bytes");
}

/* ---- JSON output ------------------------------------------------------ */

/* The reply, kept for --json. */
DEFINE_VECTOR (string_vector, char *);

/* The value of KEY in the OK line's TEXT ("k=v k=v"), or NULL. */
static char *
ok_value (const char *text, const char *key, char *buf, size_t len)
{
  size_t kl = strlen (key);

  for (const char *p = text; p && *p; p = strchr (p, ' ')) {
    while (*p == ' ')
      p++;
    if (strncmp (p, key, kl) == 0 && p[kl] == '=') {
      size_t n = strcspn (p + kl + 1, " ");
      snprintf (buf, len, "%.*s", (int) n, p + kl + 1);
      return buf;
    }
  }
  return NULL;
}

/* map: "OFFSET LENGTH" lines as nbdinfo --map --json prints a dirty
 * bitmap (qemu:dirty-bitmap:NAME): the whole disk, dirty and clean.
 */
static void
json_map (const string_vector *data, const char *ok)
{
  char v[64];
  uint64_t size, pos = 0;
  bool comma = false;

  if (ok_value (ok, "disk-size", v, sizeof v) == NULL ||
      sscanf (v, "%" SCNu64, &size) != 1)
    die ("map: the reply has no disk-size: '%.80s'", ok);
  printf ("[\n");
  for (size_t i = 0; i <= data->len; ++i) {
    uint64_t off = size, len = 0;

    if (i < data->len &&
        sscanf (data->ptr[i], "%" SCNu64 " %" SCNu64, &off, &len) != 2)
      die ("map: unexpected data line '%.80s'", data->ptr[i]);
    if (off > pos) {
      printf ("%s{ \"offset\": %" PRIu64 ", \"length\": %" PRIu64
              ", \"type\": 0, \"description\": \"clean\"}",
              comma ? ",\n" : "", pos, off - pos);
      comma = true;
    }
    if (len > 0) {
      printf ("%s{ \"offset\": %" PRIu64 ", \"length\": %" PRIu64
              ", \"type\": 1, \"description\": \"dirty\"}",
              comma ? ",\n" : "", off, len);
      comma = true;
    }
    pos = off + len;
  }
  printf ("\n]\n");
}

/* checkpoint-list: "NAME STATE EPOCH ISO8601" lines. */
static void
json_checkpoints (const string_vector *data)
{
  printf ("[\n");
  for (size_t i = 0; i < data->len; ++i) {
    char name[CBT_NAME_MAX + 1], state[16], iso[32];
    uint64_t epoch;

    if (sscanf (data->ptr[i], "%63s %15s %" SCNu64 " %31s", name, state,
                &epoch, iso) != 4)
      die ("checkpoint-list: unexpected data line '%.80s'", data->ptr[i]);
    printf ("%s{ \"name\": ", i ? ",\n" : "");
    ctl_json_string (stdout, name);
    printf (", \"state\": ");
    ctl_json_string (stdout, state);
    printf (", \"created\": ");
    ctl_json_string (stdout, iso);
    printf (", \"created-epoch\": %" PRIu64 "}", epoch);
  }
  printf ("\n]\n");
}

/* status: the OK line's fields as an object (numbers as numbers, "-"
 * as null), and the reason of a broken backup.
 */
static void
json_status (const string_vector *data, const char *ok)
{
  static const char *const numbers[] = {
    "version", "disk-size", "granularity", "checkpoints", "scratch-used",
    "scratch-limit", NULL,
  };
  const char *p = ok;
  bool first = true;

  printf ("{");
  while (*p) {
    size_t n = strcspn (p, " "), kl = strcspn (p, "=");
    bool number = false;

    if (n == 0) {
      p++;
      continue;
    }
    if (kl < n) {
      const char *val = p + kl + 1;
      size_t vl = n - kl - 1;

      for (size_t i = 0; numbers[i]; ++i)
        number |= strlen (numbers[i]) == kl &&
          strncmp (p, numbers[i], kl) == 0 &&
          vl > 0 && strspn (val, "0123456789") >= vl;
      printf ("%s \"%.*s\": ", first ? "" : ",", (int) kl, p);
      if (number)
        printf ("%.*s", (int) vl, val);
      else if (vl == 1 && val[0] == '-')
        printf ("null");
      else
        printf ("\"%.*s\"", (int) vl, val);
      first = false;
    }
    p += n;
  }
  for (size_t i = 0; i < data->len; ++i)
    if (strncmp (data->ptr[i], "broken ", 7) == 0) {
      printf (", \"broken-reason\": ");
      ctl_json_string (stdout, data->ptr[i] + 7);
    }
  printf (" }\n");
}

/* ---- Main ------------------------------------------------------------- */

static int
connect_socket (const char *path)
{
  char err[256];
  int fd = ctl_connect (path, err, sizeof err);

  if (fd == -1)
    die ("%s: %s", path, err);
  return fd;
}

/* The request from the arguments ARGV[FIRST..], --json and --timeout
 * taken out.
 */
static void
build_request (int argc, char *argv[], int first, char *request, size_t size,
               bool *json)
{
  size_t len = 0;

  for (int i = first; i < argc; ++i) {
    size_t l = strlen (argv[i]);

    if (strcmp (argv[i], "--json") == 0) {
      *json = true;
      continue;
    }
    if (len + l + 2 > size)
      die ("the command is longer than %d bytes", CTL_LINE_MAX - 1);
    if (len > 0)
      request[len++] = ' ';
    memcpy (request + len, argv[i], l);
    len += l;
  }
  request[len] = '\0';
}

int
main (int argc, char *argv[])
{
  char request[CTL_LINE_MAX], line[CTL_LINE_MAX], msg[256];
  struct ctl_request req;
  struct ctl_reply_line rl;
  struct ctl_reader reader;
  string_vector data = VECTOR_INIT;
  enum ctl_code code;
  unsigned version;
  bool json = false;
  int fd, i;

  for (i = 1; i < argc && argv[i][0] == '-'; ++i) {
    if (strcmp (argv[i], "--help") == 0 || strcmp (argv[i], "-h") == 0)
      usage (stdout, 0);
    else if (strcmp (argv[i], "--version") == 0) {
      printf ("%s %s (control protocol %d)\n", prog, PACKAGE_VERSION,
              CTL_VERSION);
      exit (0);
    }
    else if (strcmp (argv[i], "--json") == 0)
      json = true;
    else if (strncmp (argv[i], "--timeout=", 10) == 0) {
      char *end;
      long t = strtol (argv[i] + 10, &end, 10);

      if (*end || t < 1 || t > 86400)
        die ("--timeout: '%s' is not a number of seconds from 1 to 86400",
             argv[i] + 10);
      timeout_ms = (int) t * 1000;
    }
    else
      die ("unknown option '%s' (see --help)", argv[i]);
  }
  signal (SIGPIPE, SIG_IGN);
  if (i < argc && strcmp (argv[i], "group-begin") == 0)
    exit (group_begin (argc - i, argv + i, json, timeout_ms));
  if (argc - i < 2)
    usage (stderr, 2);

  /* The command, from the remaining arguments, checked here first. */
  build_request (argc, argv, i + 1, request, sizeof request, &json);
  if (ctl_parse_request (request, &req, &code, msg, sizeof msg) == -1)
    die ("%s: %s", ctl_code_name (code), msg);
  if (json && req.cmd != CTL_MAP && req.cmd != CTL_STATUS &&
      req.cmd != CTL_CHECKPOINT_LIST)
    die ("--json: %s prints no document (map, status and checkpoint-list "
         "do)", ctl_cmd_name (req.cmd));
  if (ctl_format_request (&req, request, sizeof request) == -1)
    die ("the command is too long");

  fd = connect_socket (argv[i]);
  ctl_reader_init (&reader, fd);
  read_line (&reader, line, "the hello line");
  if (ctl_parse_hello (line, &version, msg, sizeof msg) == -1)
    die ("%s: %s", argv[i], msg);
  if (ctl_write_all (fd, request, strlen (request)) == -1)
    die ("sending the command: %s", strerror (errno));

  for (;;) {
    read_line (&reader, line, "the end of the reply");
    if (ctl_parse_reply_line (line, &rl, msg, sizeof msg) == -1)
      die ("%s", msg);
    switch (rl.kind) {
    case CTL_LINE_DATA:
      if (!json)
        printf ("%s\n", rl.text);
      else {
        char *s = strdup (rl.text);
        if (s == NULL || string_vector_append (&data, s) == -1)
          die ("out of memory");
      }
      break;
    case CTL_LINE_OK:
      close (fd);
      if (!json)
        printf ("%s\n", line);
      else if (req.cmd == CTL_MAP)
        json_map (&data, rl.text);
      else if (req.cmd == CTL_STATUS)
        json_status (&data, rl.text);
      else
        json_checkpoints (&data);
      if (fflush (stdout) == EOF || ferror (stdout))
        die ("writing the output: %s", strerror (errno));
      exit (0);
    case CTL_LINE_ERR:
      fflush (stdout);
      fprintf (stderr, "%s\n", line);
      close (fd);
      exit (1);
    }
  }
}
