/* sparsebackup: fuzz harness for the control protocol (common/ctlproto.c),
 * which parses what any local client sends to the control socket.
 *
 * The input is a byte stream as a client would send it.  It is read
 * back through the bounded line reader (ctl_reader over a memfd), and
 * every line it returns is given to each parser:
 *   ctl_parse_request: accepted requests must format back
 *     (ctl_format_request) to a line that parses to the same request;
 *     refused ones must have a known error code and a message;
 *   ctl_parse_reply_line, ctl_parse_hello: must not misbehave, and a
 *     reply's text must point into the line;
 *   ctl_format_err / ctl_format_data with the line as the message: a
 *     bounded, printable line ending with LF.
 * The reader must return lines without LF, never longer than
 * CTL_LINE_MAX - 1 bytes, and account for every byte of the input.
 *
 * Builds with gcc (fuzz-main.c provides main) and with clang
 * -fsanitize=fuzzer.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* memfd_create */
#endif

#include <errno.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "ctlproto.h"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define die(...)                                                \
  do {                                                          \
    fprintf (stderr, "fuzz-ctl: " __VA_ARGS__);                 \
    fprintf (stderr, "\n");                                     \
    abort ();                                                   \
  } while (0)

static void
check_line (const char *buf, int n, const char *what)
{
  if (n < 0)
    return;                     /* refused: too long for a line */
  if (n == 0 || n >= CTL_LINE_MAX + 1 || (size_t) n != strlen (buf) ||
      buf[n - 1] != '\n')
    die ("%s: a malformed line of %d bytes", what, n);
  for (int i = 0; i < n - 1; ++i)
    if ((unsigned char) buf[i] < 0x20 || (unsigned char) buf[i] > 0x7e)
      die ("%s: byte 0x%02x at %d is not printable", what,
           (unsigned char) buf[i], i);
}

static void
one_line (const char *line)
{
  struct ctl_request req, again;
  struct ctl_reply_line rl;
  enum ctl_code code;
  char msg[512], buf[CTL_LINE_MAX + 1];
  unsigned version;
  int n;

  msg[0] = '\0';
  if (ctl_parse_request (line, &req, &code, msg, sizeof msg) == 0) {
    n = ctl_format_request (&req, buf, sizeof buf);
    if (n < 0)
      die ("an accepted request does not format: '%s'", line);
    check_line (buf, n, "ctl_format_request");
    buf[n - 1] = '\0';
    if (ctl_parse_request (buf, &again, &code, msg, sizeof msg) == -1)
      die ("'%s' formats as '%s', which is refused: %s", line, buf, msg);
    if (again.cmd != req.cmd || again.ok != req.ok ||
        again.hold_ms != req.hold_ms ||
        strcmp (again.name, req.name) != 0 ||
        strcmp (again.since, req.since) != 0)
      die ("'%s' does not survive formatting as '%s'", line, buf);
    if (strcmp (ctl_cmd_name (req.cmd), "?") == 0)
      die ("'%s': a request with an unknown command", line);
  }
  else {
    if (msg[0] == '\0')
      die ("'%s' refused without a message", line);
    if (strcmp (ctl_code_name (code), "internal") == 0 &&
        code != CTL_E_INTERNAL)
      die ("'%s' refused with an unknown code %d", line, (int) code);
  }

  if (ctl_parse_reply_line (line, &rl, msg, sizeof msg) == 0) {
    if (rl.text < line || rl.text > line + strlen (line))
      die ("a reply's text points outside its line: '%s'", line);
    if (rl.kind == CTL_LINE_ERR && memchr (rl.code, '\0',
                                           sizeof rl.code) == NULL)
      die ("an ERR code is not terminated: '%s'", line);
  }
  (void) ctl_parse_hello (line, &version, msg, sizeof msg);

  n = ctl_format_err (buf, sizeof buf, CTL_E_SYNTAX, line);
  if (n < 0)
    die ("ctl_format_err refused a message of %zu bytes", strlen (line));
  check_line (buf, n, "ctl_format_err");
  n = ctl_format_data (buf, sizeof buf, "%s", line);
  check_line (buf, n, "ctl_format_data");
  n = ctl_format_ok (buf, sizeof buf, "%s", line);
  check_line (buf, n, "ctl_format_ok");
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct ctl_reader *rd = malloc (sizeof *rd);
  char *line = malloc (CTL_LINE_MAX);
  size_t lines = 0, lfs = 0;
  int fd, r;

  if (rd == NULL || line == NULL)
    die ("malloc: %m");
  fd = memfd_create ("fuzz-ctl", MFD_CLOEXEC);
  if (fd == -1)
    die ("memfd_create: %m");
  if (size > 0 && write (fd, data, size) != (ssize_t) size)
    die ("write: %m");
  if (lseek (fd, 0, SEEK_SET) == -1)
    die ("lseek: %m");
  for (size_t i = 0; i < size; ++i)
    lfs += data[i] == '\n';
  ctl_reader_init (rd, fd);
  while ((r = ctl_read_line (rd, line, -1, -1)) != 0) {
    if (r == -1)
      die ("ctl_read_line: %m");
    if (r < -3 || r > 1)
      die ("ctl_read_line returned %d", r);
    if (++lines > lfs)
      die ("%zu lines from an input with %zu LF", lines, lfs);
    if (r != 1)
      continue;                 /* too long or unprintable: skipped */
    if (strlen (line) >= CTL_LINE_MAX || strchr (line, '\n'))
      die ("a line of %zu bytes, or with an LF", strlen (line));
    one_line (line);
  }
  close (fd);
  free (line);
  free (rd);
  return 0;
}
