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
#include "vector.h"

#define PROG "sparsebackup-copy"

#define DEFAULT_REQUESTS     16
#define MAX_REQUESTS         1024
#define DEFAULT_REQUEST_SIZE (256 * 1024)
#define MIN_REQUEST_SIZE     512
#define MAX_REQUEST_SIZE     (32 * 1024 * 1024)
/* Block status is asked for this much at a time (like nbdcopy). */
#define EXTENTS_WINDOW       (128 * 1024 * 1024)
/* Largest zero request sent to an NBD target. */
#define MAX_ZERO_REQUEST     (1024 * 1024 * 1024)

/* ---- Options ---------------------------------------------------------- */

static bool delta;
static bool quiet;
static int progress_fd = -1;       /* -1: no progress output */
static bool progress_bar;          /* bar with \r, else "N/100" lines */
static unsigned requests = DEFAULT_REQUESTS;
static size_t request_size = DEFAULT_REQUEST_SIZE;

/* ---- State ------------------------------------------------------------ */

enum kind { K_DATA, K_ZERO, K_SKIP };

struct extent {
  uint64_t offset;
  uint64_t length;
  enum kind kind;
};
DEFINE_VECTOR (extents, struct extent);

enum slot_state { S_FREE, S_READING, S_READ_DONE, S_WRITING };

struct slot {
  enum slot_state state;
  enum kind kind;                  /* K_DATA or K_ZERO (for the counters) */
  uint64_t offset;
  uint64_t len;
  int err;                         /* errno of the completed command */
  char *buf;
};

static const char *src_name, *dst_name;
static struct nbd_handle *src, *dst_nbd;
static int dst_fd = -1;
static bool dst_is_regular;
static bool dst_can_zero;          /* NBD target: nbd_can_zero */
static bool have_extents;
static uint64_t size;

static struct slot *slots;

/* Extents to do, in order: ptr[head..len) are left; the first may be
 * partly done (its offset and length are advanced in place).  They cover
 * [done_up_to, extents_next) without gaps.
 */
static extents queue = VECTOR_INIT;
static size_t head;
static uint64_t queued;            /* bytes in the queue */
static uint64_t extents_next;      /* where the next block status starts */
static bool bs_in_flight;
static uint64_t bs_offset, bs_end; /* the range asked for */
static uint64_t bs_reached;        /* how far the reply got */
static bool bs_replied;

static uint64_t copied, zeroed, skipped;
static bool failed;

/* ---- Messages --------------------------------------------------------- */

static void progress_end (void);

static void __attribute__ ((format (printf, 1, 2)))
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

/* Record the first failure; the copy stops issuing work and drains. */
#define fail(...) do { if (!failed) error_msg (__VA_ARGS__); failed = true; } \
  while (0)

static void __attribute__ ((noreturn))
die_nbd (const char *what)
{
  error_msg ("%s: %s", what, nbd_get_error () ? nbd_get_error () : "error");
  exit (EXIT_FAILURE);
}

/* ---- Progress --------------------------------------------------------- */

static int last_percent = -1;
static double last_bar;
static bool bar_shown;

static double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* V bytes in a short human form: "512", "1.5K", "300.0M". */
static void
human (uint64_t v, char *buf, size_t n)
{
  static const char units[] = "KMGTPE";
  double d = v;
  int u = -1;

  while (d >= 1024 && u < 5) {
    d /= 1024;
    u++;
  }
  if (u < 0)
    snprintf (buf, n, "%" PRIu64, v);
  else
    snprintf (buf, n, "%.1f%c", d, units[u]);
}

static void
progress_update (bool force)
{
  uint64_t done = copied + zeroed + skipped;
  int percent;
  char line[128];
  int n;

  if (progress_fd < 0 || failed)
    return;                     /* after an error message: no more bars */
  percent = size == 0 ? 100 : (int) ((double) done * 100 / size);
  if (progress_bar) {
    const int width = 40;
    int i, fill = percent * width / 100;
    double t = now ();
    char d[16], sz[16];

    if (!force && percent == last_percent && t - last_bar < 0.2)
      return;
    last_bar = t;
    n = snprintf (line, sizeof line, "\r[");
    for (i = 0; i < width; i++)
      line[n++] = i < fill ? '#' : '.';
    human (done, d, sizeof d);
    human (size, sz, sizeof sz);
    n += snprintf (line + n, sizeof line - n, "] %3d%% %s/%s ",
                   percent, d, sz);
    bar_shown = true;
  }
  else {
    if (percent == last_percent)
      return;
    n = snprintf (line, sizeof line, "%d/100\n", percent);
  }
  last_percent = percent;
  if (write (progress_fd, line, n) == -1) {
    /* Progress is advisory: stop printing it, keep copying. */
    progress_fd = -1;
  }
}

static void
progress_end (void)
{
  if (progress_fd >= 0 && progress_bar && bar_shown) {
    if (write (progress_fd, "\n", 1) == -1)
      progress_fd = -1;
    bar_shown = false;
  }
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

/* ---- Connections ------------------------------------------------------ */

static struct nbd_handle *
connect_nbd (const char *what, const char *name, char **cmd,
             bool want_extents)
{
  struct nbd_handle *h = nbd_create ();
  char msg[256];
  int r;

  if (h == NULL)
    die_nbd ("nbd_create");
  nbd_set_handle_name (h, what);
  if (want_extents &&
      nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    die_nbd ("nbd_add_meta_context");
  if (cmd)
    r = nbd_connect_systemd_socket_activation (h, cmd);
  else
    r = nbd_connect_uri (h, name);
  if (r == -1) {
    snprintf (msg, sizeof msg, "cannot connect to %s '%s'", what, name);
    die_nbd (msg);
  }
  return h;
}

static uint64_t
max_request (struct nbd_handle *h)
{
  int64_t m = nbd_get_block_size (h, LIBNBD_SIZE_MAXIMUM);

  return m > 0 ? (uint64_t) m : UINT64_MAX;
}

/* The size of WHAT's export NAME. */
static uint64_t
export_size (struct nbd_handle *h, const char *what, const char *name)
{
  int64_t s = nbd_get_size (h);
  char msg[256];

  if (s < 0) {
    snprintf (msg, sizeof msg, "%s '%s': cannot get the export size",
              what, name);
    die_nbd (msg);
  }
  return s;
}

static void
open_source (char **cmd)
{
  int r;

  src = connect_nbd ("SRC", src_name, cmd, true);
  size = export_size (src, "SRC", src_name);
  r = nbd_can_meta_context (src, LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (r == -1)
    die_nbd ("SRC: nbd_can_meta_context");
  have_extents = r == 1;
  if (!have_extents && delta && !quiet)
    fprintf (stderr, PROG ": warning: SRC '%s' does not report "
             "base:allocation: --delta copies everything\n", src_name);
  request_size = MIN (request_size, max_request (src));
}

static void
open_nbd_target (char **cmd)
{
  uint64_t s;

  dst_nbd = connect_nbd ("DST", dst_name, cmd, false);
  if (nbd_is_read_only (dst_nbd) != 0) {
    error_msg ("DST '%s' is read-only", dst_name);
    exit (EXIT_FAILURE);
  }
  s = export_size (dst_nbd, "DST", dst_name);
  if (s < size) {
    error_msg ("DST '%s' is shorter (%" PRIu64 " bytes) than SRC "
               "(%" PRIu64 " bytes)", dst_name, s, size);
    exit (EXIT_FAILURE);
  }
  dst_can_zero = nbd_can_zero (dst_nbd) == 1;
  request_size = MIN (request_size, max_request (dst_nbd));
}

static void
open_file_target (void)
{
  struct stat st;
  int flags = O_WRONLY | O_CLOEXEC;

  /* A delta pass writes over the previous backup: never create it. */
  if (!delta)
    flags |= O_CREAT;
  dst_fd = open (dst_name, flags, 0666);
  if (dst_fd == -1) {
    error_msg ("cannot open DST '%s': %s%s", dst_name, strerror (errno),
               delta && errno == ENOENT ?
               " (--delta writes over an existing previous backup)" : "");
    exit (EXIT_FAILURE);
  }
  if (fstat (dst_fd, &st) == -1) {
    error_msg ("DST '%s': fstat: %s", dst_name, strerror (errno));
    exit (EXIT_FAILURE);
  }
  if (S_ISREG (st.st_mode)) {
    dst_is_regular = true;
    if ((uint64_t) st.st_size < size && ftruncate (dst_fd, size) == -1) {
      error_msg ("cannot extend DST '%s' to %" PRIu64 " bytes: %s",
                 dst_name, size, strerror (errno));
      exit (EXIT_FAILURE);
    }
  }
  else if (S_ISBLK (st.st_mode)) {
    uint64_t devsize;

    if (ioctl (dst_fd, BLKGETSIZE64, &devsize) == -1) {
      error_msg ("DST '%s': BLKGETSIZE64: %s", dst_name, strerror (errno));
      exit (EXIT_FAILURE);
    }
    if (devsize < size) {
      error_msg ("DST '%s' is shorter (%" PRIu64 " bytes) than SRC "
                 "(%" PRIu64 " bytes)", dst_name, devsize, size);
      exit (EXIT_FAILURE);
    }
  }
}

/* ---- Extents ---------------------------------------------------------- */

static void
queue_add (uint64_t offset, uint64_t length, enum kind kind)
{
  struct extent *last = queue.len > head ? &queue.ptr[queue.len - 1] : NULL;

  if (last && last->kind == kind && last->offset + last->length == offset)
    last->length += length;
  else if (extents_append (&queue, (struct extent) {
        .offset = offset, .length = length, .kind = kind }) == -1) {
    error_msg ("out of memory for extents");
    exit (EXIT_FAILURE);
  }
  queued += length;
}

static enum kind
classify (uint32_t flags)
{
  if (flags & LIBNBD_STATE_ZERO)
    return K_ZERO;
  if ((flags & LIBNBD_STATE_HOLE) && delta)
    return K_SKIP;
  return K_DATA;
}

static int
extents_cb (void *user_data, const char *metacontext, uint64_t offset,
            uint32_t *entries, size_t nr_entries, int *error)
{
  uint64_t pos = offset;
  size_t i;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0 ||
      *error || bs_replied)
    return 0;
  bs_replied = true;
  if (offset != bs_offset)
    return 0;                   /* no progress: reported at completion */
  for (i = 0; i + 1 < nr_entries && pos < bs_end; i += 2) {
    uint64_t len = MIN ((uint64_t) entries[i], bs_end - pos);

    if (len == 0)
      continue;
    queue_add (pos, len, classify (entries[i + 1]));
    pos += len;
  }
  bs_reached = pos;
  return 0;
}

static int
extents_done (void *user_data, int *error)
{
  bs_in_flight = false;
  if (*error)
    fail ("SRC: block status at offset %" PRIu64 " failed: %s",
          bs_offset, strerror (*error));
  else if (bs_reached <= bs_offset)
    fail ("SRC: block status at offset %" PRIu64 " returned no extents "
          "for that offset", bs_offset);
  else
    extents_next = bs_reached;
  return 1;
}

/* Ask for the next extents when the queue runs low. */
static void
want_extents (void)
{
  uint64_t count;

  if (failed || bs_in_flight || extents_next >= size ||
      queued >= EXTENTS_WINDOW / 2)
    return;
  if (head > 0 && head >= queue.len / 2) {
    /* Drop the extents already done. */
    memmove (queue.ptr, &queue.ptr[head],
             (queue.len - head) * sizeof queue.ptr[0]);
    queue.len -= head;
    head = 0;
  }
  count = MIN ((uint64_t) EXTENTS_WINDOW, size - extents_next);
  if (!have_extents) {
    queue_add (extents_next, count, K_DATA);
    extents_next += count;
    return;
  }
  bs_offset = extents_next;
  bs_end = extents_next + count;
  bs_reached = bs_offset;
  bs_replied = false;
  if (nbd_aio_block_status (src, count, bs_offset,
                            (nbd_extent_callback) { .callback = extents_cb },
                            (nbd_completion_callback) {
                              .callback = extents_done },
                            0) == -1)
    die_nbd ("SRC: block status");
  bs_in_flight = true;
}

/* Take up to MAX bytes of the first extent in the queue. */
static bool
queue_take (uint64_t max, struct extent *out)
{
  struct extent *e;

  if (head == queue.len)
    return false;
  e = &queue.ptr[head];
  *out = *e;
  out->length = MIN (e->length, max);
  e->offset += out->length;
  e->length -= out->length;
  queued -= out->length;
  if (e->length == 0)
    head++;
  return true;
}

/* ---- Target I/O ------------------------------------------------------- */

/* The page cache, as nbdcopy does it: start the writeback of every range
 * written at once and, WB_RING writes later, wait for it and drop its
 * pages.  Dirty pages never pile up (writers that make many are
 * throttled, and the final fdatasync has little left to do), and a
 * backup does not push everything else out of the cache.
 */
#define WB_RING 64
static struct { uint64_t offset, len; } wb_ring[WB_RING];
static unsigned wb_head, wb_count;
static bool wb_works = true;

static void
writeback (uint64_t offset, uint64_t len)
{
  if (!wb_works)
    return;
  if (sync_file_range (dst_fd, offset, len, SYNC_FILE_RANGE_WRITE) == -1) {
    wb_works = false;           /* e.g. a character device */
    return;
  }
  if (wb_count == WB_RING) {
    uint64_t o = wb_ring[wb_head].offset, l = wb_ring[wb_head].len;

    sync_file_range (dst_fd, o, l, SYNC_FILE_RANGE_WAIT_BEFORE |
                     SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER);
    posix_fadvise (dst_fd, o, l, POSIX_FADV_DONTNEED);
    wb_head = (wb_head + 1) % WB_RING;
    wb_count--;
  }
  wb_ring[(wb_head + wb_count) % WB_RING].offset = offset;
  wb_ring[(wb_head + wb_count) % WB_RING].len = len;
  wb_count++;
}

static bool
write_file (const char *buf, uint64_t len, uint64_t offset)
{
  uint64_t offset0 = offset, len0 = len;

  while (len > 0) {
    ssize_t r = pwrite (dst_fd, buf, MIN (len, (uint64_t) SSIZE_MAX), offset);

    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0) {
      fail ("write error on DST '%s' at offset %" PRIu64 ": %s", dst_name,
            offset, r == 0 ? "short write" : strerror (errno));
      return false;
    }
    buf += r;
    len -= r;
    offset += r;
  }
  writeback (offset0, len0);
  return true;
}

/* Zero a range of a file or block device: punch a hole (reads as zero,
 * sparse), else ZERO_RANGE, else write the zeros of BUF (request_size
 * bytes, cleared here).
 */
static bool zero_range_works = true, punch_hole_works = true;

static bool
zero_file (char *buf, uint64_t len, uint64_t offset)
{
  if (punch_hole_works) {
    if (fallocate (dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   offset, len) == 0)
      return true;
    if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL &&
        errno != ENODEV) {
      fail ("cannot zero DST '%s' at offset %" PRIu64 ": %s", dst_name,
            offset, strerror (errno));
      return false;
    }
    punch_hole_works = false;
  }
  if (zero_range_works) {
    if (fallocate (dst_fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE,
                   offset, len) == 0)
      return true;
    zero_range_works = false;
  }
  memset (buf, 0, request_size);
  while (len > 0) {
    uint64_t n = MIN (len, (uint64_t) request_size);

    if (!write_file (buf, n, offset))
      return false;
    len -= n;
    offset += n;
  }
  return true;
}

static int
write_done (void *user_data, int *error)
{
  struct slot *s = user_data;

  s->state = S_FREE;
  if (*error)
    fail ("write error on DST '%s' at offset %" PRIu64 ": %s", dst_name,
          s->offset, strerror (*error));
  else if (s->kind == K_ZERO)
    zeroed += s->len;
  else
    copied += s->len;
  return 1;
}

/* Send what slot S holds (or zeroes, for K_ZERO) to the NBD target. */
static void
start_nbd_write (struct slot *s)
{
  nbd_completion_callback cb = { .callback = write_done, .user_data = s };
  int64_t r;

  if (s->kind == K_ZERO && dst_can_zero)
    /* No NO_HOLE flag: the target may trim, but must read back zeroes. */
    r = nbd_aio_zero (dst_nbd, s->len, s->offset, cb, 0);
  else {
    if (s->kind == K_ZERO)
      memset (s->buf, 0, s->len);
    r = nbd_aio_pwrite (dst_nbd, s->buf, s->len, s->offset, cb, 0);
  }
  if (r == -1)
    die_nbd ("DST: write");
  s->state = S_WRITING;
}

/* ---- The copy loop ---------------------------------------------------- */

static int
read_done (void *user_data, int *error)
{
  struct slot *s = user_data;

  s->state = S_READ_DONE;
  s->err = *error;
  return 1;
}

/* Write the slots whose reads have finished. */
static void
finish_reads (void)
{
  unsigned i;

  for (i = 0; i < requests; i++) {
    struct slot *s = &slots[i];

    if (s->state != S_READ_DONE)
      continue;
    if (s->err) {
      fail ("read error on SRC '%s' at offset %" PRIu64 " (%" PRIu64
            " bytes): %s", src_name, s->offset, s->len, strerror (s->err));
      s->state = S_FREE;
    }
    else if (failed)
      s->state = S_FREE;
    else if (dst_nbd)
      start_nbd_write (s);
    else {
      if (write_file (s->buf, s->len, s->offset))
        copied += s->len;
      s->state = S_FREE;
    }
  }
}

static struct slot *
free_slot (void)
{
  unsigned i;

  for (i = 0; i < requests; i++)
    if (slots[i].state == S_FREE)
      return &slots[i];
  return NULL;
}

/* The largest piece of an extent of KIND that one step handles. */
static uint64_t
piece_max (enum kind kind)
{
  if (kind == K_SKIP || (kind == K_ZERO && !dst_nbd))
    return UINT64_MAX;          /* no request: done here at once */
  if (kind == K_ZERO && dst_can_zero)
    return MAX_ZERO_REQUEST;
  return request_size;          /* a read, or zeroes written as data */
}

/* Start work while there is a free slot and something to do. */
static void
dispatch (void)
{
  struct slot *s;
  struct extent e;

  while (!failed && (s = free_slot ()) != NULL) {
    want_extents ();
    if (head == queue.len)
      return;
    queue_take (piece_max (queue.ptr[head].kind), &e);
    switch (e.kind) {
    case K_SKIP:
      skipped += e.length;
      break;
    case K_ZERO:
      if (!dst_nbd) {
        /* The slot's buffer serves only if zeroes must be written. */
        if (zero_file (s->buf, e.length, e.offset))
          zeroed += e.length;
        break;
      }
      /* fall through */
    case K_DATA:
      s->kind = e.kind;
      s->offset = e.offset;
      s->len = e.length;
      if (e.kind == K_ZERO)
        start_nbd_write (s);
      else {
        s->state = S_READING;
        if (nbd_aio_pread (src, s->buf, s->len, s->offset,
                           (nbd_completion_callback) {
                             .callback = read_done, .user_data = s },
                           0) == -1)
          die_nbd ("SRC: read");
      }
      break;
    }
  }
}

static bool
busy (void)
{
  unsigned i;

  if (bs_in_flight)
    return true;
  for (i = 0; i < requests; i++)
    if (slots[i].state != S_FREE)
      return true;
  return false;
}

/* Wait for either connection and let libnbd move on. */
static void
poll_once (void)
{
  struct nbd_handle *hs[2] = { src, dst_nbd };
  struct pollfd fds[2];
  int n = dst_nbd ? 2 : 1, k, r;

  for (k = 0; k < n; k++) {
    unsigned dir = nbd_aio_get_direction (hs[k]);

    fds[k].fd = nbd_aio_get_fd (hs[k]);
    if (fds[k].fd == -1)
      die_nbd (k == 0 ? "SRC" : "DST");
    fds[k].events = ((dir & LIBNBD_AIO_DIRECTION_READ) ? POLLIN : 0) |
                    ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0);
    fds[k].revents = 0;
  }
  r = poll (fds, n, -1);
  if (r == -1) {
    if (errno == EINTR)
      return;
    error_msg ("poll: %s", strerror (errno));
    exit (EXIT_FAILURE);
  }
  for (k = 0; k < n; k++) {
    if ((fds[k].revents & (POLLIN | POLLHUP | POLLERR)) &&
        nbd_aio_notify_read (hs[k]) == -1)
      die_nbd (k == 0 ? "SRC" : "DST");
    if ((fds[k].revents & POLLOUT) && nbd_aio_notify_write (hs[k]) == -1)
      die_nbd (k == 0 ? "SRC" : "DST");
  }
}

static void
copy (void)
{
  for (;;) {
    finish_reads ();
    dispatch ();
    progress_update (false);
    /* Not busy after dispatch: failed, or nothing is left to do. */
    if (!busy ())
      break;
    poll_once ();
  }
}

static void
finish (void)
{
  if (dst_nbd) {
    if (!failed && nbd_can_flush (dst_nbd) == 1 && nbd_flush (dst_nbd, 0) == -1)
      fail ("DST '%s': flush: %s", dst_name, nbd_get_error ());
    nbd_shutdown (dst_nbd, 0);
    nbd_close (dst_nbd);
  }
  else {
    if (!failed && fdatasync (dst_fd) == -1 &&
        (errno != EINVAL && errno != EROFS))
      fail ("DST '%s': fdatasync: %s", dst_name, strerror (errno));
    if (close (dst_fd) == -1)
      fail ("DST '%s': close: %s", dst_name, strerror (errno));
  }
  nbd_shutdown (src, 0);
  nbd_close (src);
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
