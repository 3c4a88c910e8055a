/* sparsebackup-copy: the two ends.  Connecting to the source (and
 * learning what it is: export name, description, size) and an NBD
 * target, opening a file or block device target, the checks of the
 * target's size and format, writing and zeroing a file target (with
 * writeback of the page cache, as nbdcopy does), NBD writes, syncing,
 * and finishing (flush or sync, close).
 */

#define _GNU_SOURCE             /* fallocate, sync_file_range */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/file.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include <libnbd.h>

#include "minmax.h"
#include "copy.h"

/* ---- Connections ------------------------------------------------------ */

struct list_ctx {
  const char *want;
  char *description;
};

static int
list_cb (void *user_data, const char *name, const char *description)
{
  struct list_ctx *l = user_data;

  if (l->description == NULL && strcmp (name, l->want) == 0) {
    l->description = strndup (description, MAX_STRING);
    if (l->description == NULL)
      out_of_memory ();
  }
  return 0;
}

/* "[ CMD ARGS ... ]" as one string. */
char *
command_string (char **cmd)
{
  size_t n = 4, i;
  char *s;

  for (i = 0; cmd[i]; i++)
    n += strlen (cmd[i]) + 1;
  s = malloc (n);
  if (s == NULL)
    out_of_memory ();
  strcpy (s, "[");
  for (i = 0; cmd[i]; i++) {
    strcat (s, " ");
    strcat (s, cmd[i]);
  }
  strcat (s, " ]");
  return s;
}

/* Connect WHAT (SRC or DST) to NAME or by running CMD.  With ID, fill it
 * in (the export's description comes from the server's list of exports,
 * asked for during negotiation).  On failure print the error, then
 * AFTER if not NULL, and exit.
 */
struct nbd_handle *
connect_nbd (const char *what, const char *name, char **cmd,
             bool with_extents, struct source_id *id, const char *after)
{
  struct nbd_handle *h = nbd_create ();
  int r;

  if (h == NULL)
    die_nbd ("nbd_create");
  nbd_set_handle_name (h, what);
  if (with_extents &&
      nbd_add_meta_context (h, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    die_nbd ("nbd_add_meta_context");
  if (id && nbd_set_opt_mode (h, true) == -1)
    die_nbd ("nbd_set_opt_mode");
  if (cmd)
    r = nbd_connect_systemd_socket_activation (h, cmd);
  else
    r = nbd_connect_uri (h, name);
  if (r != -1 && id) {
    struct list_ctx l = { .want = NULL };

    id->uri = cmd ? command_string (cmd) : xstrdup (name);
    id->export = nbd_get_export_name (h);
    if (id->export == NULL)
      die_nbd ("nbd_get_export_name");
    if (nbd_aio_is_negotiating (h)) {
      l.want = id->export;
      /* Not every server lists exports: then there is no description. */
      if (nbd_opt_list (h, (nbd_list_callback) {
            .callback = list_cb, .user_data = &l }) == -1 &&
          !nbd_aio_is_negotiating (h))
        r = -1;
      else
        r = nbd_opt_go (h);
    }
    id->description = l.description ? l.description : xstrdup ("");
  }
  if (r == -1) {
    error_msg ("cannot connect to %s '%s': %s", what, name,
               nbd_get_error () ? nbd_get_error () : "error");
    if (after)
      fprintf (stderr, "%s\n", after);
    exit (EXIT_FAILURE);
  }
  return h;
}

bool
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

void
open_source (const char *after)
{
  int r;

  src = connect_nbd ("SRC", src_name, src_cmd, true, &src_id, after);
  size = export_size (src, "SRC", src_name);
  src_id.size = size;
  r = nbd_can_meta_context (src, LIBNBD_CONTEXT_BASE_ALLOCATION);
  if (r == -1)
    die_nbd ("SRC: nbd_can_meta_context");
  have_extents = r == 1;
  if (!have_extents && delta && !quiet)
    fprintf (stderr, PROG ": warning: SRC '%s' does not report "
             "base:allocation: --delta copies everything\n", src_name);
  request_size = MIN (request_size, max_request (src));
}

void
close_source (void)
{
  if (src) {
    nbd_shutdown (src, 0);
    nbd_close (src);
    src = NULL;
  }
}

void
open_nbd_target (void)
{
  dst_kind = DST_NBD;
  dst_nbd = connect_nbd ("DST", dst_name, dst_cmd, false, NULL, NULL);
  if (nbd_is_read_only (dst_nbd) != 0) {
    error_msg ("DST '%s' is read-only", dst_name);
    exit (EXIT_FAILURE);
  }
  dst_size = export_size (dst_nbd, "DST", dst_name);
  dst_can_zero = nbd_can_zero (dst_nbd) == 1;
  dst_can_flush = nbd_can_flush (dst_nbd) == 1;
  request_size = MIN (request_size, max_request (dst_nbd));
}

/* Take an exclusive lock on the target (file or device): two copies to
 * the same target at once would interleave their writes and journals.
 */
static void
lock_target (void)
{
  if (flock (dst_fd, LOCK_EX | LOCK_NB) == -1) {
    if (errno == EWOULDBLOCK)
      error_msg ("DST '%s' is locked: another " PROG " (or another "
                 "program) is using it", dst_name);
    else
      error_msg ("DST '%s': flock: %s", dst_name, strerror (errno));
    exit (EXIT_FAILURE);
  }
}

void
open_file_target (void)
{
  struct stat st;

  dst_kind = DST_FILE;
  /* Read and write: the format check reads the target's first bytes. */
  dst_fd = open (dst_name, O_RDWR | O_CLOEXEC);
  if (dst_fd == -1 && errno == EACCES)
    dst_fd = open (dst_name, O_WRONLY | O_CLOEXEC);
  if (dst_fd == -1) {
    /* A delta pass writes over the previous backup: never create it. */
    if (errno == ENOENT && !delta)
      return;                   /* created later: create_file_target */
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
    dst_size = st.st_size;
    lock_target ();
  }
  else if (S_ISBLK (st.st_mode)) {
    dst_kind = DST_BLOCK;
    if (ioctl (dst_fd, BLKGETSIZE64, &dst_size) == -1) {
      error_msg ("DST '%s': BLKGETSIZE64: %s", dst_name, strerror (errno));
      exit (EXIT_FAILURE);
    }
    lock_target ();
  }
  else
    dst_kind = DST_CHAR;        /* a character device, a pipe... */
}

void
create_file_target (void)
{
  if (dst_kind != DST_FILE || dst_fd != -1)
    return;
  dst_fd = open (dst_name, O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (dst_fd == -1) {
    error_msg ("cannot create DST '%s': %s", dst_name, strerror (errno));
    exit (EXIT_FAILURE);
  }
  dst_size = 0;
  lock_target ();
}

void
size_file_target (void)
{
  if (dst_kind != DST_FILE || dst_size == size)
    return;
  if (dst_size > size && !quiet)
    fprintf (stderr, PROG ": DST '%s' was %" PRIu64 " bytes: cut to the "
             "%" PRIu64 " bytes of SRC\n", dst_name, dst_size, size);
  if (ftruncate (dst_fd, size) == -1) {
    error_msg ("cannot set the size of DST '%s' to %" PRIu64 " bytes: %s",
               dst_name, size, strerror (errno));
    exit (EXIT_FAILURE);
  }
  dst_size = size;
}

char *
target_identity (uint64_t *inode)
{
  struct stat st;
  char *p;

  *inode = 0;
  if (dst_kind == DST_NBD)
    return dst_cmd ? command_string (dst_cmd) : xstrdup (dst_name);
  if (dst_fd >= 0 && dst_kind == DST_FILE && fstat (dst_fd, &st) == 0)
    *inode = st.st_ino;
  p = realpath (dst_name, NULL);
  return p ? p : xstrdup (dst_name);
}

/* Read LEN bytes at OFFSET of the target into BUF. */
static bool
read_target (unsigned char *buf, size_t len, uint64_t offset)
{
  if (dst_kind == DST_NBD)
    return nbd_pread (dst_nbd, buf, len, offset, 0) == 0;
  while (len > 0) {
    ssize_t r = pread (dst_fd, buf, len, offset);

    if (r == -1 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    buf += r;
    len -= r;
    offset += r;
  }
  return true;
}

/* The format of the target at one place (head or tail), unless the
 * source carries the same signature at the same place.
 */
static void
check_format (const char *fmt, const char *src_fmt, const char *where)
{
  if (fmt == NULL || force || (src_fmt && strcmp (fmt, src_fmt) == 0))
    return;
  error_msg ("DST '%s' holds %s (%s), not a raw copy of SRC: "
             "writing raw data over it would destroy it.  Give a raw "
             "target (for a qcow2 backup use qemu-img convert, or convert "
             "it to raw first), or add --force to overwrite it",
             dst_name, fmt, where);
  exit (EXIT_FAILURE);
}

static void
check_signatures (void)
{
  unsigned char t[PROBE_HEAD_SIZE], s[PROBE_HEAD_SIZE];
  size_t tn = MIN (dst_size, (uint64_t) PROBE_HEAD_SIZE);
  size_t sn = MIN (size, (uint64_t) PROBE_HEAD_SIZE);
  const char *tf, *sf = NULL;

  if (dst_size == 0 || force)
    return;
  if (!read_target (t, tn, 0)) {
    error_msg ("cannot read the first bytes of DST '%s' (to check its "
               "format): %s", dst_name,
               dst_kind == DST_NBD ? nbd_get_error () : strerror (errno));
    exit (EXIT_FAILURE);
  }
  tf = probe_head (t, tn);
  if (tf) {
    if (sn > 0 && nbd_pread (src, s, sn, 0, 0) == -1)
      die_nbd ("SRC: read");
    sf = probe_head (s, sn);
    check_format (tf, sf, "its first bytes");
  }
  if (dst_size >= 2 * PROBE_TAIL_SIZE) {
    uint64_t off = dst_size - PROBE_TAIL_SIZE;

    if (!read_target (t, PROBE_TAIL_SIZE, off)) {
      error_msg ("cannot read the last bytes of DST '%s': %s", dst_name,
                 dst_kind == DST_NBD ? nbd_get_error () : strerror (errno));
      exit (EXIT_FAILURE);
    }
    tf = probe_tail (t);
    sf = NULL;
    if (tf && dst_size <= size) {
      if (nbd_pread (src, s, PROBE_TAIL_SIZE, off, 0) == -1)
        die_nbd ("SRC: read");
      sf = probe_tail (s);
    }
    check_format (tf, sf, "its footer");
  }
}

void
check_target (void)
{
  if (dst_kind == DST_NONE || (dst_kind == DST_FILE && dst_fd == -1))
    return;
  if (dst_kind == DST_CHAR) {
    if (delta) {
      error_msg ("--delta: DST '%s' is not a regular file, block device or "
                 "NBD export (it has no size to check)", dst_name);
      exit (EXIT_FAILURE);
    }
    return;
  }
  check_signatures ();
  if (dst_kind == DST_FILE) {
    if (delta && dst_size != size) {
      error_msg ("--delta: DST '%s' is %" PRIu64 " bytes, SRC '%s' is %"
                 PRIu64 " bytes: a delta pass goes over the previous backup "
                 "of the same disk, which has its size (make a full copy "
                 "instead)", dst_name, dst_size, src_name, size);
      exit (EXIT_FAILURE);
    }
    return;                     /* a full copy sets its size */
  }
  if (dst_size < size) {
    error_msg ("DST '%s' is shorter (%" PRIu64 " bytes) than SRC "
               "(%" PRIu64 " bytes)", dst_name, dst_size, size);
    exit (EXIT_FAILURE);
  }
  if (dst_size > size) {
    if (!allow_larger) {
      error_msg ("DST '%s' is %" PRIu64 " bytes, larger than SRC '%s' (%"
                 PRIu64 " bytes): the bytes from offset %" PRIu64 " on would "
                 "be left as they are, so DST would not equal SRC (add "
                 "--allow-larger if that is what you want)",
                 dst_name, dst_size, src_name, size, size);
      exit (EXIT_FAILURE);
    }
    if (!quiet)
      fprintf (stderr, PROG ": DST '%s' is larger than SRC: its %" PRIu64
               " bytes from offset %" PRIu64 " are left as they are\n",
               dst_name, dst_size - size, size);
  }
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

bool
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
  debug_kill_point ("write");
  return true;
}

/* Zero a range of a file or block device: punch a hole (reads as zero,
 * sparse), else ZERO_RANGE, else write the zeros of BUF (request_size
 * bytes, cleared here).
 */
static bool zero_range_works = true, punch_hole_works = true;

bool
zero_file (char *buf, uint64_t len, uint64_t offset)
{
  if (punch_hole_works) {
    if (fallocate (dst_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                   offset, len) == 0) {
      debug_kill_point ("write");
      return true;
    }
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
                   offset, len) == 0) {
      debug_kill_point ("write");
      return true;
    }
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

bool
sync_file_target (void)
{
  /* fsync, not fdatasync: holes punched are metadata. */
  if (fsync (dst_fd) == -1 && errno != EINVAL && errno != EROFS) {
    fail ("DST '%s': fsync: %s", dst_name, strerror (errno));
    return false;
  }
  debug_kill_point ("sync");
  return true;
}

/* Send what slot S holds (or zeroes, for K_ZERO) to the NBD target;
 * CB is called when it completes.
 */
void
start_nbd_write (struct slot *s, nbd_completion_callback cb)
{
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

void
close_ends (void)
{
  if (dst_kind == DST_NBD) {
    if (!failed && dst_can_flush && nbd_flush (dst_nbd, 0) == -1)
      fail ("DST '%s': flush: %s", dst_name, nbd_get_error ());
    nbd_shutdown (dst_nbd, 0);
    nbd_close (dst_nbd);
    dst_nbd = NULL;
  }
  else if (dst_fd >= 0) {
    if (!failed && fsync (dst_fd) == -1 &&
        (errno != EINVAL && errno != EROFS))
      fail ("DST '%s': fsync: %s", dst_name, strerror (errno));
    if (close (dst_fd) == -1)
      fail ("DST '%s': close: %s", dst_name, strerror (errno));
    dst_fd = -1;
  }
  close_source ();
}
