/* sparsebackup-ctl: send one command to the sparsebackup filter's
 * control socket and print the reply (doc/cbt-protocol.md).
 *
 * Usage: sparsebackup-ctl SOCKET COMMAND [ARGS...]
 *
 * The command is checked and normalised locally (common/ctlproto.c)
 * before connecting.  Data lines are printed without their "* " to
 * stdout, then the status line: "OK ..." to stdout, "ERR ..." to stderr.
 * Exit status: 0 OK, 1 ERR, 2 usage error or no proper conversation
 * with the server (connect failed, wrong hello, unexpected line,
 * connection closed before the status line).
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctlproto.h"

static const char *prog = "sparsebackup-ctl";

static void
usage (void)
{
  fprintf (stderr,
           "usage: %s SOCKET COMMAND [ARGS...]\n"
           "commands:\n"
           "  backup-begin NEW [--since OLD]\n"
           "  backup-end NEW --ok|--failed\n"
           "  checkpoint-list\n"
           "  checkpoint-delete NAME\n"
           "  map [--since NAME] [--json]\n"
           "  status\n"
           "exit status: 0 OK, 1 ERR from the server, 2 other errors\n",
           prog);
  exit (2);
}

static int
write_all (int fd, const char *buf, size_t len)
{
  while (len > 0) {
    ssize_t n = write (fd, buf, len);
    if (n == -1 && errno == EINTR)
      continue;
    if (n == -1)
      return -1;
    buf += n;
    len -= (size_t) n;
  }
  return 0;
}

/* Read one line; exit 2 on anything but a proper line. */
static void
read_line (struct ctl_reader *r, char *line, const char *what)
{
  int n = ctl_read_line (r, line);

  if (n == 1)
    return;
  if (n == 0)
    fprintf (stderr, "%s: the server closed the connection before %s\n",
             prog, what);
  else if (n == -1)
    fprintf (stderr, "%s: reading %s: %s\n", prog, what, strerror (errno));
  else
    fprintf (stderr, "%s: %s: the server sent a line %s\n", prog, what,
             n == -2 ? "longer than the protocol allows"
             : "with unprintable bytes");
  exit (2);
}

int
main (int argc, char *argv[])
{
  char request[CTL_LINE_MAX], line[CTL_LINE_MAX], msg[256];
  struct ctl_request req;
  struct ctl_reply_line rl;
  struct ctl_reader reader;
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  enum ctl_code code;
  unsigned version;
  size_t len = 0;
  int fd;

  if (argc < 3 || strcmp (argv[1], "--help") == 0 ||
      strcmp (argv[1], "-h") == 0)
    usage ();
  signal (SIGPIPE, SIG_IGN);

  /* The command, from the remaining arguments, checked here first. */
  for (int i = 2; i < argc; ++i) {
    size_t l = strlen (argv[i]);
    if (len + l + 2 > sizeof request) {
      fprintf (stderr, "%s: the command is longer than %d bytes\n", prog,
               CTL_LINE_MAX - 1);
      exit (2);
    }
    if (i > 2)
      request[len++] = ' ';
    memcpy (request + len, argv[i], l);
    len += l;
  }
  request[len] = '\0';
  if (ctl_parse_request (request, &req, &code, msg, sizeof msg) == -1) {
    fprintf (stderr, "%s: %s: %s\n", prog, ctl_code_name (code), msg);
    exit (2);
  }
  if (ctl_format_request (&req, request, sizeof request) == -1) {
    fprintf (stderr, "%s: the command is too long\n", prog);
    exit (2);
  }

  if (strlen (argv[1]) >= sizeof addr.sun_path) {
    fprintf (stderr, "%s: socket path too long: %s\n", prog, argv[1]);
    exit (2);
  }
  strcpy (addr.sun_path, argv[1]);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd == -1 || connect (fd, (struct sockaddr *) &addr, sizeof addr) == -1) {
    fprintf (stderr, "%s: %s: %s\n", prog, argv[1], strerror (errno));
    exit (2);
  }
  ctl_reader_init (&reader, fd);
  read_line (&reader, line, "the hello line");
  if (ctl_parse_hello (line, &version, msg, sizeof msg) == -1) {
    fprintf (stderr, "%s: %s\n", prog, msg);
    exit (2);
  }
  if (write_all (fd, request, strlen (request)) == -1) {
    fprintf (stderr, "%s: sending the command: %s\n", prog, strerror (errno));
    exit (2);
  }

  for (;;) {
    read_line (&reader, line, "the end of the reply");
    if (ctl_parse_reply_line (line, &rl, msg, sizeof msg) == -1) {
      fprintf (stderr, "%s: %s\n", prog, msg);
      exit (2);
    }
    switch (rl.kind) {
    case CTL_LINE_DATA:
      printf ("%s\n", rl.text);
      break;
    case CTL_LINE_OK:
      printf ("%s\n", line);
      close (fd);
      if (fflush (stdout) == EOF || ferror (stdout)) {
        fprintf (stderr, "%s: writing the output: %s\n", prog,
                 strerror (errno));
        exit (2);
      }
      exit (0);
    case CTL_LINE_ERR:
      fflush (stdout);
      fprintf (stderr, "%s\n", line);
      close (fd);
      exit (1);
    }
  }
}
