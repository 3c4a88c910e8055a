/* sparsebackup: unit tests of common/ctlproto.c (the control protocol,
 * doc/cbt-protocol.md): every command parsed and formatted back, bad
 * requests refused with the right code and a message naming the word,
 * reply lines classified, the hello checked, and the bounded line
 * reader over a pipe (long lines skipped, CR LF, binary bytes, EOF).
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <unistd.h>
#include <sys/wait.h>

#include "ctlproto.h"

#define TEST_NAME "test-ctlproto"
#include "unit-test.h"

/* LINE parses, and formats back to CANON. */
static void
good (const char *line, enum ctl_cmd cmd, const char *canon)
{
  struct ctl_request req, req2;
  enum ctl_code code;
  char msg[256], buf[CTL_LINE_MAX];

  if (ctl_parse_request (line, &req, &code, msg, sizeof msg) == -1) {
    FAIL ("'%s' refused: %s", line, msg);
    return;
  }
  if (req.cmd != cmd)
    FAIL ("'%s': command %d, expected %d", line, req.cmd, cmd);
  if (ctl_format_request (&req, buf, sizeof buf) == -1)
    FAIL ("'%s': cannot format it back", line);
  else if (strcmp (buf, canon) != 0)
    FAIL ("'%s' formats as '%s', expected '%s'", line, buf, canon);
  buf[strlen (buf) - 1] = '\0';
  if (ctl_parse_request (buf, &req2, &code, msg, sizeof msg) == -1 ||
      memcmp (&req, &req2, sizeof req) != 0)
    FAIL ("'%s': the formatted request does not parse the same", line);
}

/* LINE is refused with CODE and a message containing WORD. */
static void
bad (const char *line, enum ctl_code want, const char *word)
{
  struct ctl_request req;
  enum ctl_code code;
  char msg[256] = "";

  if (ctl_parse_request (line, &req, &code, msg, sizeof msg) == 0) {
    FAIL ("'%s' accepted", line);
    return;
  }
  if (code != want)
    FAIL ("'%s': code %s, expected %s (%s)", line, ctl_code_name (code),
          ctl_code_name (want), msg);
  if (strstr (msg, word) == NULL)
    FAIL ("'%s': message '%s' does not name '%s'", line, msg, word);
}

static void
requests (void)
{
  char longline[CTL_LINE_MAX + 10];

  good ("backup-begin b1", CTL_BACKUP_BEGIN, "backup-begin b1\n");
  good ("backup-begin  b2 --since b1", CTL_BACKUP_BEGIN,
        "backup-begin b2 --since b1\n");
  good ("backup-begin --since b1\tb2", CTL_BACKUP_BEGIN,
        "backup-begin b2 --since b1\n");
  good ("backup-end b2 --ok", CTL_BACKUP_END, "backup-end b2 --ok\n");
  good ("backup-end --failed b2", CTL_BACKUP_END, "backup-end b2 --failed\n");
  good ("checkpoint-list", CTL_CHECKPOINT_LIST, "checkpoint-list\n");
  good ("checkpoint-delete x.y_z", CTL_CHECKPOINT_DELETE,
        "checkpoint-delete x.y_z\n");
  good ("map", CTL_MAP, "map\n");
  good ("map  --since b1", CTL_MAP, "map --since b1\n");
  good ("status ", CTL_STATUS, "status\n");
  good ("group-prepare g1 --hold-timeout 5000", CTL_GROUP_PREPARE,
        "group-prepare g1 --hold-timeout 5000\n");
  good ("group-prepare --hold-timeout 007 g2\t--since g1", CTL_GROUP_PREPARE,
        "group-prepare g2 --since g1 --hold-timeout 7\n");
  good ("group-prepare g2 --since g1 --hold-timeout 60000",
        CTL_GROUP_PREPARE, "group-prepare g2 --since g1 --hold-timeout 60000\n");
  good ("group-commit g2", CTL_GROUP_COMMIT, "group-commit g2\n");
  good ("group-abort  g2", CTL_GROUP_ABORT, "group-abort g2\n");

  bad ("", CTL_E_SYNTAX, "empty");
  bad ("   ", CTL_E_SYNTAX, "empty");
  bad ("frobnicate", CTL_E_UNKNOWN_COMMAND, "frobnicate");
  bad ("BACKUP-BEGIN x", CTL_E_UNKNOWN_COMMAND, "BACKUP-BEGIN");
  bad ("backup-begin", CTL_E_SYNTAX, "missing checkpoint name");
  bad ("backup-begin a b", CTL_E_SYNTAX, "unexpected argument 'b'");
  bad ("backup-begin a --since", CTL_E_SYNTAX, "--since needs");
  bad ("backup-begin a --since b --since c", CTL_E_SYNTAX, "twice");
  bad ("backup-begin a --since a", CTL_E_SYNTAX, "its own");
  bad ("backup-begin a --json", CTL_E_SYNTAX, "unknown option '--json'");
  bad ("backup-begin -a", CTL_E_INVALID_NAME, "'-a'");
  bad ("backup-begin a --since -b", CTL_E_INVALID_NAME, "--since '-b'");
  bad ("backup-begin a\x01", CTL_E_SYNTAX, "0x01");
  bad ("backup-begin a\xc3\xa9", CTL_E_SYNTAX, "0xc3");
  bad ("backup-end a", CTL_E_SYNTAX, "missing --ok or --failed");
  bad ("backup-end a --ok --failed", CTL_E_SYNTAX, "once");
  bad ("backup-end --ok", CTL_E_SYNTAX, "missing checkpoint name");
  bad ("checkpoint-list x", CTL_E_SYNTAX, "unexpected argument 'x'");
  bad ("checkpoint-delete", CTL_E_SYNTAX, "missing");
  bad ("checkpoint-delete "
       "a234567890123456789012345678901234567890123456789012345678901234",
       CTL_E_INVALID_NAME, "not a valid checkpoint name");
  bad ("map --since", CTL_E_SYNTAX, "--since needs");
  bad ("map --json", CTL_E_SYNTAX, "unknown option '--json'");
  bad ("map --since a --since b", CTL_E_SYNTAX, "twice");
  bad ("map x", CTL_E_SYNTAX, "unexpected argument 'x'");
  bad ("status --verbose", CTL_E_SYNTAX, "unknown option '--verbose'");
  bad ("map a b c d e f g h i", CTL_E_SYNTAX, "too many words");
  bad ("group-prepare g1", CTL_E_SYNTAX, "missing --hold-timeout");
  bad ("group-prepare --hold-timeout 10", CTL_E_SYNTAX,
       "missing checkpoint name");
  bad ("group-prepare g1 --hold-timeout", CTL_E_SYNTAX, "--hold-timeout needs");
  bad ("group-prepare g1 --hold-timeout 0", CTL_E_SYNTAX, "'0'");
  bad ("group-prepare g1 --hold-timeout 60001", CTL_E_SYNTAX, "'60001'");
  bad ("group-prepare g1 --hold-timeout 99999999999999999999", CTL_E_SYNTAX,
       "from 1 to 60000");
  bad ("group-prepare g1 --hold-timeout -5", CTL_E_SYNTAX, "'-5'");
  bad ("group-prepare g1 --hold-timeout 5s", CTL_E_SYNTAX, "'5s'");
  bad ("group-prepare g1 --hold-timeout 5 --hold-timeout 6", CTL_E_SYNTAX,
       "twice");
  bad ("group-prepare g1 --since g1 --hold-timeout 5", CTL_E_SYNTAX,
       "its own");
  bad ("group-prepare g1 --hold-timeout 5 --ok", CTL_E_SYNTAX,
       "unknown option '--ok'");
  bad ("group-commit", CTL_E_SYNTAX, "missing checkpoint name");
  bad ("group-commit g1 --hold-timeout 5", CTL_E_SYNTAX,
       "unknown option '--hold-timeout'");
  bad ("group-commit g1 --since g0", CTL_E_SYNTAX, "unknown option '--since'");
  bad ("group-abort g1 g2", CTL_E_SYNTAX, "unexpected argument 'g2'");
  bad ("backup-begin g1 --hold-timeout 5", CTL_E_SYNTAX,
       "unknown option '--hold-timeout'");
  memset (longline, 'a', sizeof longline - 1);
  longline[sizeof longline - 1] = '\0';
  bad (longline, CTL_E_TOO_LONG, "limit");
}

static void
replies (void)
{
  char buf[CTL_LINE_MAX], msg[256], big[2 * CTL_LINE_MAX];
  struct ctl_reply_line r;
  struct cbt_checkpoint_info cp = { .name = "b1", .state = CBT_STATE_PENDING,
                                    .created = 1700000000 };
  unsigned v;

  CHECK (ctl_format_hello (buf, sizeof buf) > 0);
  CHECK (strcmp (buf, "HELLO sparsebackup-ctl 2\n") == 0);
  buf[strlen (buf) - 1] = '\0';
  CHECK (ctl_parse_hello (buf, &v, msg, sizeof msg) == 0 && v == 2);
  CHECK (ctl_parse_hello ("HELLO sparsebackup-ctl 1", &v, msg,
                          sizeof msg) == -1 && strstr (msg, "version 1"));
  CHECK (ctl_parse_hello ("HELLO other 2", &v, msg, sizeof msg) == -1);
  CHECK (ctl_parse_hello ("HELLO sparsebackup-ctl 2 x", &v, msg,
                          sizeof msg) == -1);

  CHECK (ctl_format_ok (buf, sizeof buf, "%s", "") > 0 &&
         strcmp (buf, "OK\n") == 0);
  CHECK (ctl_format_ok (buf, sizeof buf, "checkpoint=%s state=%s", "b1",
                        "good") > 0 &&
         strcmp (buf, "OK checkpoint=b1 state=good\n") == 0);
  CHECK (ctl_format_err (buf, sizeof buf, CTL_E_NO_SUCH_CHECKPOINT,
                         "no checkpoint 'x'\n") > 0 &&
         strcmp (buf, "ERR no-such-checkpoint no checkpoint 'x'?\n") == 0);
  memset (big, 'm', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  CHECK (ctl_format_err (buf, sizeof buf, CTL_E_IO, big) ==
         CTL_LINE_MAX - 1 && strlen (buf) == CTL_LINE_MAX - 1 &&
         buf[CTL_LINE_MAX - 2] == '\n');  /* cut to fit one line */
  CHECK (ctl_format_ok (buf, sizeof buf, "%s", big) == -1 &&
         errno == ENOBUFS);
  CHECK (ctl_format_ok (buf, 4, "x") == -1);
  CHECK (ctl_format_checkpoint (buf, sizeof buf, &cp) > 0 &&
         strcmp (buf, "* b1 pending 1700000000 2023-11-14T22:13:20Z\n") == 0);
  CHECK (ctl_format_extent (buf, sizeof buf, 65536, 131072) > 0
         && strcmp (buf, "* 65536 131072\n") == 0);

  CHECK (ctl_parse_reply_line ("* 0 65536", &r, msg, sizeof msg) == 0 &&
         r.kind == CTL_LINE_DATA && strcmp (r.text, "0 65536") == 0);
  CHECK (ctl_parse_reply_line ("OK", &r, msg, sizeof msg) == 0 &&
         r.kind == CTL_LINE_OK && strcmp (r.text, "") == 0);
  CHECK (ctl_parse_reply_line ("OK a=b", &r, msg, sizeof msg) == 0 &&
         r.kind == CTL_LINE_OK && strcmp (r.text, "a=b") == 0);
  CHECK (ctl_parse_reply_line ("ERR busy backup b1 is running", &r, msg,
                               sizeof msg) == 0 && r.kind == CTL_LINE_ERR &&
         strcmp (r.code, "busy") == 0 &&
         strcmp (r.text, "backup b1 is running") == 0);
  CHECK (ctl_parse_reply_line ("ERR busy", &r, msg, sizeof msg) == -1);
  CHECK (ctl_parse_reply_line ("OKAY", &r, msg, sizeof msg) == -1);
  CHECK (ctl_parse_reply_line ("", &r, msg, sizeof msg) == -1 &&
         strstr (msg, "unexpected reply"));

  CHECK (ctl_code_from_errno (ENOENT) == CTL_E_NO_SUCH_CHECKPOINT);
  CHECK (ctl_code_from_errno (EEXIST) == CTL_E_EXISTS);
  CHECK (ctl_code_from_errno (EBUSY) == CTL_E_BUSY);
  CHECK (ctl_code_from_errno (EIO) == CTL_E_IO);
  /* A full file system is an I/O error, not the checkpoint limit. */
  CHECK (ctl_code_from_errno (ENOSPC) == CTL_E_IO);
  CHECK (ctl_code_from_errno (EMLINK) == CTL_E_LIMIT);
  CHECK (strcmp (ctl_code_name (CTL_E_TOO_LONG), "too-long") == 0);
}

static void
reader (void)
{
  int fds[2];
  struct ctl_reader r;
  char line[CTL_LINE_MAX];
  char *input;
  size_t n = 0;

  /* Lines: short, CR LF, too long, binary, after the long one, then a
   * partial line without LF at EOF (dropped).
   */
  input = malloc (4 * CTL_LINE_MAX);
  if (input == NULL)
    exit (EXIT_FAILURE);
  n += (size_t) sprintf (input + n, "status\n");
  n += (size_t) sprintf (input + n, "map --json\r\n");
  memset (input + n, 'x', 3 * CTL_LINE_MAX);
  n += 3 * CTL_LINE_MAX;
  input[n++] = '\n';
  n += (size_t) sprintf (input + n, "bin\x02\n");
  n += (size_t) sprintf (input + n, "checkpoint-list\n");
  n += (size_t) sprintf (input + n, "partial");
  if (pipe (fds) == -1)
    exit (EXIT_FAILURE);
  if (fork () == 0) {
    close (fds[0]);
    /* In small pieces, to cross buffer boundaries. */
    for (size_t i = 0; i < n; i += 100)
      if (write (fds[1], input + i, n - i < 100 ? n - i : 100) < 0)
        _exit (1);
    _exit (0);
  }
  close (fds[1]);
  ctl_reader_init (&r, fds[0]);
  CHECK (ctl_read_line (&r, line, -1, -1) == 1 && strcmp (line, "status") == 0);
  CHECK (ctl_read_line (&r, line, -1, -1) == 1 && strcmp (line, "map --json") == 0);
  CHECK (ctl_read_line (&r, line, -1, -1) == -2);
  CHECK (ctl_read_line (&r, line, -1, -1) == -3);
  CHECK (ctl_read_line (&r, line, -1, -1) == 1 &&
         strcmp (line, "checkpoint-list") == 0);
  CHECK (ctl_read_line (&r, line, -1, -1) == 0);
  close (fds[0]);
  free (input);
}

/* The whole line must arrive within the timeout, however it trickles. */
static void
reader_timeout (void)
{
  int fds[2];
  struct ctl_reader r;
  char line[CTL_LINE_MAX];
  pid_t pid;

  if (pipe (fds) == -1)
    exit (EXIT_FAILURE);
  /* The first byte is there before the reader starts (a child that a
   * loaded machine has not run yet within the timeout must not make the
   * pending check below fail).
   */
  if (write (fds[1], "s", 1) != 1)
    exit (EXIT_FAILURE);
  pid = fork ();
  if (pid == 0) {
    close (fds[0]);
    /* A byte every 100 ms, never an LF, until killed (at most 60 s: the
     * end of the pipe before the timeout would be another result).
     */
    for (int i = 0; i < 600; ++i) {
      if (write (fds[1], "s", 1) != 1)
        _exit (1);
      usleep (100000);
    }
    _exit (0);
  }
  close (fds[1]);
  ctl_reader_init (&r, fds[0]);
  errno = 0;
  CHECK (ctl_read_line (&r, line, 700, -1) == -4 && errno == ETIMEDOUT);
  CHECK (ctl_reader_pending (&r, &(const char *) { NULL }) > 0);
  close (fds[0]);
  kill (pid, SIGKILL);
  waitpid (pid, NULL, 0);
}

int
main (void)
{
  requests ();
  replies ();
  reader ();
  reader_timeout ();
  if (failures) {
    fprintf (stderr, "test-ctlproto: %u failures\n", failures);
    return EXIT_FAILURE;
  }
  printf ("test-ctlproto: PASS\n");
  return EXIT_SUCCESS;
}
