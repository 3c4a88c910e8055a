/* sparsebackup-copy: copy a backup view from NBD to a raw file, a block
 * device or another NBD export.
 *
 * nbdkit 1.32 can only send base:allocation, so a sparsebackup view says
 * "not part of this backup" with NBD_STATE_HOLE without NBD_STATE_ZERO.
 * Without --delta such extents are copied as data (their contents are
 * defined); with --delta they are skipped, leaving the target's bytes (the
 * previous backup) as they are.  Extents with NBD_STATE_ZERO are zeroed on
 * the target, everything else is copied.
 *
 * One thread: up to --requests commands in flight on the source (reads,
 * plus one block status query ahead) and on an NBD target (writes and
 * zeroes), driven by one poll loop over both sockets.  A file target is
 * written synchronously from the loop.  Memory: --requests buffers of
 * --request-size bytes, and the extents of one block status reply.
 *
 * Nothing the server sends is trusted: extents are clipped to the range
 * asked for, zero-length extents are ignored, a reply that makes no
 * progress is an error.
 *
 * This file: the options, the state, messages, argument parsing and
 * main.  The parts: copy-engine.c, copy-target.c, copy-progress.c
 * (sparsebackup-copy.h).
 */

#define _GNU_SOURCE             /* fallocate */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include <libnbd.h>

#include "minmax.h"
#include "sparsebackup-copy.h"

/* ---- Options ---------------------------------------------------------- */

bool delta;
bool quiet;
int progress_fd = -1;       /* -1: no progress output */
bool progress_bar;          /* bar with \r, else "N/100" lines */
unsigned requests = DEFAULT_REQUESTS;
size_t request_size = DEFAULT_REQUEST_SIZE;

/* ---- State ------------------------------------------------------------ */

const char *src_name, *dst_name;
struct nbd_handle *src, *dst_nbd;
int dst_fd = -1;
bool dst_is_regular;
bool dst_can_zero;          /* NBD target: nbd_can_zero */
bool have_extents;
uint64_t size;

struct slot *slots;

/* Extents to do, in order: ptr[head..len) are left; the first may be
 * partly done (its offset and length are advanced in place).  They cover
 * [done_up_to, extents_next) without gaps.
 */
extents queue = VECTOR_INIT;
size_t head;
uint64_t queued;            /* bytes in the queue */
uint64_t extents_next;      /* where the next block status starts */
bool bs_in_flight;
uint64_t bs_offset, bs_end; /* the range asked for */
uint64_t bs_reached;        /* how far the reply got */
bool bs_replied;

uint64_t copied, zeroed, skipped;
bool failed;

/* ---- Messages --------------------------------------------------------- */

void __attribute__ ((format (printf, 1, 2)))
error_msg (const char *fs, ...)
{
  va_list args;

  progress_end ();
  fprintf (stderr, PROG ": ");
  va_start (args, fs);
  vfprintf (stderr, fs, args);
  va_end (args);
  fputc ('\n', stderr);
}

void __attribute__ ((noreturn))
die_nbd (const char *what)
{
  error_msg ("%s: %s", what, nbd_get_error () ? nbd_get_error () : "error");
  exit (EXIT_FAILURE);
}

/* ---- Argument parsing ------------------------------------------------- */

static void __attribute__ ((noreturn))
usage (FILE *fp, int status)
{
  fprintf (fp,
"Usage: " PROG " [OPTIONS] SRC DST\n"
"Copy an NBD export (a sparsebackup view) to a raw file, a block device\n"
"or another NBD export.\n"
"\n"
"  SRC  an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)\n"
"       or [ CMD ARGS ... ] to run a server with systemd socket activation\n"
"  DST  a raw file or block device, an NBD URI, or [ CMD ARGS ... ]\n"
"\n"
"Options (before SRC):\n"
"  --delta              skip extents that are HOLE without ZERO (not part\n"
"                       of this backup): DST keeps its bytes there\n"
"  -p, --progress[=FD]  progress bar on stderr (or N/100 lines on FD)\n"
"  -q, --quiet          no summary line\n"
"  --requests=N         commands in flight (1..%d, default %d)\n"
"  --request-size=SIZE  bytes per read (512..32M, default 256K)\n"
"  --help, --version\n"
"See " PROG "(1).\n", MAX_REQUESTS, DEFAULT_REQUESTS);
  exit (status);
}

/* Parse a size with an optional binary suffix (K, M, G, T; KiB etc.). */
static bool
parse_size (const char *s, uint64_t *out)
{
  char *end;
  unsigned long long v;
  unsigned shift = 0;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno != 0)
    return false;
  switch (*end) {
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  }
  if (shift && strcmp (end, "iB") == 0)
    end += 2;
  else if (shift && strcmp (end, "B") == 0)
    end++;
  if (*end != '\0' || v > (UINT64_MAX >> shift))
    return false;
  *out = (uint64_t) v << shift;
  return true;
}

static bool
parse_uint (const char *s, uint64_t *out)
{
  char *end;
  unsigned long long v;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno != 0 || *end != '\0')
    return false;
  *out = v;
  return true;
}

/* ARGV[*I] starts SRC or DST: either one word, or "[" CMD ... "]".  On
 * return *CMD is NULL or the NULL-terminated command (in ARGV), *NAME
 * what to call it in messages, and *I is past it.
 */
static void
take_location (int argc, char **argv, int *i, const char *what,
               char ***cmd, const char **name)
{
  int j;

  if (*i >= argc) {
    fprintf (stderr, PROG ": missing %s\n", what);
    usage (stderr, EXIT_FAILURE);
  }
  *cmd = NULL;
  *name = argv[*i];
  if (strcmp (argv[*i], "[") != 0) {
    (*i)++;
    return;
  }
  for (j = *i + 1; j < argc && strcmp (argv[j], "]") != 0; j++)
    ;
  if (j >= argc || j == *i + 1) {
    fprintf (stderr, PROG ": %s: '[' needs a command and a closing ']'\n",
             what);
    exit (EXIT_FAILURE);
  }
  argv[j] = NULL;
  *cmd = &argv[*i + 1];
  *name = argv[*i + 1];
  *i = j + 1;
}

static bool
is_nbd_uri (const char *s)
{
  static const char *const schemes[] = {
    "nbd://", "nbds://", "nbd+unix://", "nbds+unix://",
    "nbd+vsock://", "nbds+vsock://",
  };
  size_t k;

  for (k = 0; k < sizeof schemes / sizeof schemes[0]; k++)
    if (strncmp (s, schemes[k], strlen (schemes[k])) == 0)
      return true;
  return false;
}

int
main (int argc, char **argv)
{
  enum { OPT_DELTA = 256, OPT_REQUESTS, OPT_REQUEST_SIZE, OPT_HELP,
         OPT_VERSION };
  static const struct option long_options[] = {
    { "delta", no_argument, NULL, OPT_DELTA },
    { "progress", optional_argument, NULL, 'p' },
    { "quiet", no_argument, NULL, 'q' },
    { "requests", required_argument, NULL, OPT_REQUESTS },
    { "request-size", required_argument, NULL, OPT_REQUEST_SIZE },
    { "help", no_argument, NULL, OPT_HELP },
    { "version", no_argument, NULL, OPT_VERSION },
    { NULL },
  };
  char **src_cmd, **dst_cmd;
  uint64_t v;
  unsigned i;
  int c, ai;
  double t0;

  /* A closed progress pipe must not kill the copy (write gets EPIPE). */
  signal (SIGPIPE, SIG_IGN);

  /* "+": options stop at SRC, so that [ CMD -ARGS ] stay the command's. */
  while ((c = getopt_long (argc, argv, "+pq", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_DELTA:
      delta = true;
      break;
    case 'p':
      if (optarg == NULL) {
        progress_fd = STDERR_FILENO;
        progress_bar = true;
      }
      else if (!parse_uint (optarg, &v) || v > INT_MAX ||
               fcntl ((int) v, F_GETFD) == -1) {
        error_msg ("--progress: '%s' is not an open file descriptor", optarg);
        exit (EXIT_FAILURE);
      }
      else
        progress_fd = v;
      break;
    case 'q':
      quiet = true;
      break;
    case OPT_REQUESTS:
      if (!parse_uint (optarg, &v) || v < 1 || v > MAX_REQUESTS) {
        error_msg ("--requests: '%s' is not a number from 1 to %d",
                   optarg, MAX_REQUESTS);
        exit (EXIT_FAILURE);
      }
      requests = v;
      break;
    case OPT_REQUEST_SIZE:
      if (!parse_size (optarg, &v) || v < MIN_REQUEST_SIZE ||
          v > MAX_REQUEST_SIZE) {
        error_msg ("--request-size: '%s' is not a size from 512 to 32M",
                   optarg);
        exit (EXIT_FAILURE);
      }
      request_size = v;
      break;
    case OPT_HELP:
      usage (stdout, EXIT_SUCCESS);
    case OPT_VERSION:
      printf (PROG " %s\n", PACKAGE_VERSION);
      exit (EXIT_SUCCESS);
    default:
      usage (stderr, EXIT_FAILURE);
    }
  }

  ai = optind;
  take_location (argc, argv, &ai, "SRC", &src_cmd, &src_name);
  take_location (argc, argv, &ai, "DST", &dst_cmd, &dst_name);
  if (ai < argc) {
    error_msg ("unexpected argument '%s' (options go before SRC)", argv[ai]);
    exit (EXIT_FAILURE);
  }
  if (!src_cmd && !is_nbd_uri (src_name)) {
    error_msg ("SRC '%s' is not an NBD URI (nbd://, nbd+unix://, ...)",
               src_name);
    exit (EXIT_FAILURE);
  }

  t0 = now ();
  open_source (src_cmd);
  if (dst_cmd || is_nbd_uri (dst_name))
    open_nbd_target (dst_cmd);
  else
    open_file_target ();

  slots = calloc (requests, sizeof *slots);
  if (slots == NULL) {
    error_msg ("out of memory");
    exit (EXIT_FAILURE);
  }
  for (i = 0; i < requests; i++) {
    slots[i].buf = malloc (request_size);
    if (slots[i].buf == NULL) {
      error_msg ("out of memory for %u requests of %zu bytes",
                 requests, request_size);
      exit (EXIT_FAILURE);
    }
  }

  copy ();
  if (!failed && copied + zeroed + skipped != size)
    fail ("internal error: %" PRIu64 " of %" PRIu64 " bytes done",
          copied + zeroed + skipped, size);
  finish ();
  if (!failed)
    progress_update (true);
  progress_end ();

  if (!quiet)
    printf (PROG ": copied %" PRIu64 " bytes, zeroed %" PRIu64
            " bytes, skipped %" PRIu64 " bytes of %" PRIu64 " in %.3f s%s\n",
            copied, zeroed, skipped, size, now () - t0,
            failed ? " (FAILED)" : "");

  for (i = 0; i < requests; i++)
    free (slots[i].buf);
  free (slots);
  extents_reset (&queue);
  return failed ? EXIT_FAILURE : EXIT_SUCCESS;
}
