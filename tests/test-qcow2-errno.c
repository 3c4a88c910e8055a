/* sparsebackup: the qcow2 library fails with a meaningful errno.
 *
 * An image built in memory is read through an I/O callback that fails
 * with EROFS on its data cluster; the errno of each failure must be the
 * one documented in qcow2.h (the callback's, the extent callback's,
 * EINVAL for a request beyond the end, the opener's), never a stale
 * value left in errno.
 */

#include <config.h>

#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

#define CLUSTER 65536
#define IMG_SIZE (4 * CLUSTER)

static uint8_t img[IMG_SIZE];
static unsigned failures;

/* Store V big-endian in the N bytes at P. */
static void
put_be (uint8_t *p, unsigned n, uint64_t v)
{
  while (n-- > 0) {
    p[n] = v & 0xff;
    v >>= 8;
  }
}

/* v3, 64 KiB clusters, 64 KiB virtual size: L1 at cluster 1, L2 at
 * cluster 2, one data cluster at cluster 3.  With BACKING the image
 * names a backing file "base" (format qcow2).
 */
static void
make_image (int backing)
{
  memset (img, 0, sizeof img);
  put_be (img, 4, 0x514649fb);
  put_be (img + 4, 4, 3);
  put_be (img + 20, 4, 16);             /* cluster_bits */
  put_be (img + 24, 8, CLUSTER);        /* size */
  put_be (img + 36, 4, 1);              /* l1_size */
  put_be (img + 40, 8, CLUSTER);        /* l1_table_offset */
  put_be (img + 96, 4, 4);              /* refcount_order */
  put_be (img + 100, 4, 104);           /* header_length */
  if (backing) {
    put_be (img + 104, 4, 0xe2792aca);  /* backing format extension */
    put_be (img + 108, 4, 5);
    memcpy (img + 112, "qcow2", 5);
    put_be (img + 8, 8, 512);           /* backing name offset */
    put_be (img + 16, 4, 4);
    memcpy (img + 512, "base", 4);
  }
  put_be (img + CLUSTER, 8, 2 * CLUSTER);
  put_be (img + 2 * CLUSTER, 8, 3 * CLUSTER | (UINT64_C(1) << 63));
  memset (img + 3 * CLUSTER, 0xaa, CLUSTER);
}

static int
failing_pread (void *opaque, void *buf, size_t count, uint64_t offset)
{
  if (offset + count > 3 * CLUSTER) {
    errno = EROFS;
    return -1;
  }
  memcpy (buf, img + offset, count);
  return 0;
}

static int
failing_open (void *opaque, const char *path, struct qcow2_io *io,
              char *err, size_t errlen)
{
  snprintf (err, errlen, "%s: refused by the test", path);
  errno = EACCES;
  return -1;
}

static int
failing_extent (void *opaque, uint64_t offset, uint64_t length,
                uint32_t flags)
{
  errno = ENOSPC;
  return -1;
}

static void
expect (const char *what, int r, int err, int want, const char *msg)
{
  if (r != -1 || err != want) {
    fprintf (stderr, "test-qcow2-errno: FAIL: %s: returned %d, errno %d "
             "(%s), expected -1 and errno %d (%s); message: %s\n",
             what, r, err, strerror (err), want, strerror (want), msg);
    failures++;
  }
  else
    printf ("%s: errno %s (%s)\n", what, strerror (err), msg);
}

int
main (void)
{
  struct qcow2_options opts;
  struct qcow2_image *image;
  struct qcow2_io io;
  char err[QCOW2_ERRLEN], buf[512];
  int r;

  qcow2_options_init (&opts);
  make_image (0);
  memset (&io, 0, sizeof io);
  io.size = sizeof img;
  io.pread = failing_pread;
  if (qcow2_open (&io, "mem", &opts, &image, err, sizeof err) == -1) {
    fprintf (stderr, "test-qcow2-errno: open: %s\n", err);
    return 1;
  }

  errno = 0;
  r = qcow2_pread (image, buf, sizeof buf, 0, err, sizeof err);
  expect ("read of a failing data cluster", r, errno, EROFS, err);

  errno = 0;
  r = qcow2_pread (image, buf, sizeof buf, CLUSTER, err, sizeof err);
  expect ("read beyond the end", r, errno, EINVAL, err);

  errno = 0;
  r = qcow2_map (image, 0, CLUSTER + 1, NULL, NULL, err, sizeof err);
  expect ("map beyond the end", r, errno, EINVAL, err);

  errno = 0;
  err[0] = '\0';
  r = qcow2_map (image, 0, CLUSTER, failing_extent, NULL, err, sizeof err);
  expect ("map with a failing extent callback", r, errno, ENOSPC, err);

  {
    struct qcow2_bitmap *bm = NULL;
    errno = 0;
    r = qcow2_bitmap_open (image, "b1", &bm, err, sizeof err);
    expect ("open of a bitmap that is not there", r, errno, ENOENT, err);
    if (r == 0)
      qcow2_bitmap_close (bm);
  }
  qcow2_close (image);

  make_image (1);
  opts.open_file = failing_open;
  errno = 0;
  r = qcow2_open_mem (img, sizeof img, "mem", &opts, &image,
                      err, sizeof err);
  expect ("open with a failing backing file opener", r, errno, EACCES,
          err);
  if (r == 0)
    qcow2_close (image);

  errno = 0;
  r = qcow2_open_file ("/nonexistent/qcow2-errno", &opts, &image,
                       err, sizeof err);
  expect ("open of a missing file", r, errno, ENOENT, err);

  if (failures) {
    fprintf (stderr, "test-qcow2-errno: %u failure(s)\n", failures);
    return 1;
  }
  return 0;
}
