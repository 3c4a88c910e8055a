/* sparsebackup-copy: the two ends.  Connecting to the source and an NBD
 * target, opening a file or block device target, writing and zeroing a
 * file target (with writeback of the page cache, as nbdcopy does), NBD
 * writes, and finishing (flush or sync, close).
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

void
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

void
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

void
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
void
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

void
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
