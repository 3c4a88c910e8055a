/* sparsebackup: qcow2 reader: error messages, reading files, and the
 * I/O backends (memory, POSIX files).
 *
 * Written from QEMU's docs/interop/qcow2.txt.  See qcow2.h for the API
 * and qcow2-internal.h for a map of the files.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* SEEK_DATA, SEEK_HOLE, strerrordesc_np */
#endif

#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <unistd.h>

#include "qcow2-internal.h"
#include "minmax.h"

const char *
q2_errstr (int errnum)
{
#if defined (__GLIBC__) && defined (__GLIBC_PREREQ)
#if __GLIBC_PREREQ (2, 32)
  const char *s = strerrordesc_np (errnum);
  return s ? s : "unknown error";
#else
  return strerror (errnum);
#endif
#else
  return strerror (errnum);
#endif
}

const char *
q2_short_name (char *buf, const char *name)
{
  size_t len = strlen (name), keep = (Q2_NAME_BUF - 4) / 2;

  if (len < Q2_NAME_BUF)
    return name;
  memcpy (buf, name, keep);
  memcpy (buf + keep, "...", 3);
  memcpy (buf + keep + 3, name + len - keep, keep);
  buf[2 * keep + 3] = '\0';
  return buf;
}

static void
vseterr (struct err *e, int errnum, const char *name, const char *fmt,
         va_list ap)
{
  char sname[Q2_NAME_BUF];
  int n = 0;

  e->errnum = errnum;
  if (e->buf == NULL || e->len == 0)
    return;
  if (name) {
    n = snprintf (e->buf, e->len, "%s: ", q2_short_name (sname, name));
    if (n < 0)
      n = 0;
    if ((size_t) n >= e->len)
      return;
  }
  vsnprintf (e->buf + n, e->len - n, fmt, ap);
}

void
q2_seterr (struct err *e, const char *name, const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vseterr (e, EIO, name, fmt, ap);
  va_end (ap);
}

void
q2_seterr_errno (struct err *e, int errnum, const char *name,
                 const char *fmt, ...)
{
  va_list ap;

  va_start (ap, fmt);
  vseterr (e, errnum ? errnum : EIO, name, fmt, ap);
  va_end (ap);
}

void
q2_seterr_oom (struct err *e, const char *name)
{
  q2_seterr_errno (e, ENOMEM, name, "out of memory");
}

void
q2_debug (const struct qcow2_options *o, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  if (o->debug == NULL)
    return;
  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  o->debug (o->debug_opaque, msg);
}

/* Read COUNT bytes at OFFSET of IO; bytes past the end of the file read
 * as zero.
 */
int
q2_io_read (const struct qcow2_io *io, const char *name,
            void *buf, uint64_t count, uint64_t offset, struct err *e)
{
  uint64_t n;

  if (count == 0)
    return 0;
  if (offset >= io->size) {
    memset (buf, 0, count);
    return 0;
  }
  n = MIN (count, io->size - offset);
  if (n > SIZE_MAX) {
    q2_seterr (e, name, "read of 0x%" PRIx64 " bytes is too large", n);
    return -1;
  }
  errno = 0;
  if (io->pread (io->opaque, buf, (size_t) n, offset) == -1) {
    int errnum = errno ? errno : EIO;
    q2_seterr_errno (e, errnum, name, "read error at offset 0x%" PRIx64
                     " (0x%" PRIx64 " bytes): %s", offset, n,
                     q2_errstr (errnum));
    return -1;
  }
  if (n < count)
    memset ((uint8_t *) buf + n, 0, count - n);
  return 0;
}

/*----------------------------------------------------------------------
 * I/O backends.
 */

static int
mem_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  memcpy (buf, (const uint8_t *) opaque + offset, count);
  return 0;
}

void
qcow2_mem_io (const void *buf, size_t len, struct qcow2_io *io)
{
  memset (io, 0, sizeof *io);
  io->opaque = (void *) buf;
  io->size = len;
  io->pread = mem_pread;
}

static int
posix_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  int fd = (int) (intptr_t) opaque;
  uint8_t *p = buf;

  while (count > 0) {
    ssize_t r = pread (fd, p, count, (off_t) offset);
    if (r == -1) {
      if (errno == EINTR)
        continue;
      return -1;
    }
    if (r == 0) {
      errno = EIO;              /* file shrank under us */
      return -1;
    }
    p += r;
    count -= r;
    offset += r;
  }
  return 0;
}

static void
posix_close (void *opaque)
{
  close ((int) (intptr_t) opaque);
}

static int
posix_extent (void *opaque, uint64_t offset, uint64_t count,
              uint64_t *len, int *is_data)
{
#if defined (SEEK_DATA) && defined (SEEK_HOLE)
  int fd = (int) (intptr_t) opaque;
  off_t d, h;

  if (offset > INT64_MAX || count == 0)
    return -1;
  d = lseek (fd, (off_t) offset, SEEK_DATA);
  if (d == -1) {
    if (errno == ENXIO) {       /* only a hole up to the end */
      *len = count;
      *is_data = 0;
      return 0;
    }
    return -1;
  }
  if ((uint64_t) d > offset) {
    *len = MIN ((uint64_t) d - offset, count);
    *is_data = 0;
    return 0;
  }
  h = lseek (fd, (off_t) offset, SEEK_HOLE);
  if (h == -1 || (uint64_t) h <= offset)
    return -1;
  *len = MIN ((uint64_t) h - offset, count);
  *is_data = 1;
  return 0;
#else
#error "SEEK_DATA / SEEK_HOLE are needed"
#endif
}

int
qcow2_posix_open (void *opaque, const char *path, struct qcow2_io *io,
                  char *errbuf, size_t errlen)
{
  struct err e = { errbuf, errlen, 0 };
  struct stat st;
  off_t end;
  int fd, flags;

  /* O_NONBLOCK: opening a FIFO (or a device that waits for a carrier)
   * must not hang; it is refused below, and the flag is cleared for the
   * regular files and block devices that are accepted.
   */
  fd = open (path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY);
  if (fd == -1) {
    q2_seterr_errno (&e, errno, path, "open: %s", q2_errstr (errno));
    goto fail;
  }
  if (fstat (fd, &st) == -1) {
    q2_seterr_errno (&e, errno, path, "fstat: %s", q2_errstr (errno));
    goto fail;
  }
  if (!S_ISREG (st.st_mode) && !S_ISBLK (st.st_mode)) {
    q2_seterr (&e, path, "not a regular file or block device");
    goto fail;
  }
  flags = fcntl (fd, F_GETFL);
  if (flags == -1 || fcntl (fd, F_SETFL, flags & ~O_NONBLOCK) == -1) {
    q2_seterr_errno (&e, errno, path, "fcntl: %s", q2_errstr (errno));
    goto fail;
  }
  if (S_ISBLK (st.st_mode)) {
    end = lseek (fd, 0, SEEK_END);
    if (end == -1) {
      q2_seterr_errno (&e, errno, path, "lseek: %s", q2_errstr (errno));
      goto fail;
    }
  }
  else
    end = st.st_size;
  memset (io, 0, sizeof *io);
  io->opaque = (void *) (intptr_t) fd;
  io->pread = posix_pread;
  io->close = posix_close;
  io->extent = posix_extent;
  io->has_id = true;
  io->dev = st.st_dev;
  io->ino = st.st_ino;
  io->size = end;
  return 0;

 fail:
  if (fd >= 0)
    close (fd);
  errno = e.errnum;
  return -1;
}
