/* Check block status answers through the filter, as qemu (REQ_ONE) and
 * nbdcopy (large ranges) ask for them.
 *
 * Usage: test-read-reqone URI BLOCKSIZE EXPECTED-ZERO-BYTES
 *
 * 1. A REQ_ONE loop from 0 to the end (what qemu-img does): every reply
 *    is exactly one extent that starts where asked, makes progress, does
 *    not exceed the request, and ends on a BLOCKSIZE boundary (or at the
 *    end of the request or of the export).  Every extent claiming ZERO
 *    reads back as zero.  The ZERO bytes add up to EXPECTED-ZERO-BYTES
 *    (-1: do not check).
 * 2. The same without REQ_ONE, 1 MiB at a time: contiguous extents, each
 *    ending on a block boundary except at the end of the export; the same
 *    ZERO total.
 * 3. Random REQ_ONE queries at unaligned offsets and lengths: progress,
 *    and no ZERO claim over data.
 *
 * Exit 0 on success, 1 on failure (with a message), 77 to skip.
 */
#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <stdbool.h>

#include <libnbd.h>

static struct nbd_handle *nbd;
static int64_t size;
static uint32_t blksize;

struct reply {
  uint64_t offset;              /* where the reply starts */
  size_t n;                     /* number of extents */
  uint64_t len[1024];
  uint32_t flags[1024];
  bool overflow;
};

static int
extent_cb (void *user_data, const char *metacontext, uint64_t offset,
           uint32_t *entries, size_t nr_entries, int *error)
{
  struct reply *r = user_data;
  size_t i;

  if (strcmp (metacontext, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
    return 0;
  r->offset = offset;
  for (i = 0; i + 1 < nr_entries; i += 2) {
    if (r->n >= sizeof r->len / sizeof r->len[0]) {
      r->overflow = true;
      break;
    }
    r->len[r->n] = entries[i];
    r->flags[r->n] = entries[i + 1];
    r->n++;
  }
  return 0;
}

static void
die (const char *what)
{
  fprintf (stderr, "test-read-reqone: FAIL: %s: %s\n", what,
           nbd_get_error () ? nbd_get_error () : "");
  exit (1);
}

static void
ask (uint64_t count, uint64_t offset, bool req_one, struct reply *r)
{
  memset (r, 0, sizeof *r);
  if (nbd_block_status (nbd, count, offset,
                        (nbd_extent_callback) { .callback = extent_cb,
                                                .user_data = r },
                        req_one ? LIBNBD_CMD_FLAG_REQ_ONE : 0) == -1)
    die ("nbd_block_status");
  if (r->n == 0) {
    fprintf (stderr, "test-read-reqone: FAIL: no extent for %" PRIu64
             "+%" PRIu64 "\n", offset, count);
    exit (1);
  }
}

static char *buf;

/* A ZERO claim over [off, off+len) must read back as zero. */
static void
check_zero (uint64_t off, uint64_t len)
{
  while (len > 0) {
    uint64_t n = len > 4 * 1024 * 1024 ? 4 * 1024 * 1024 : len;
    uint64_t i;

    if (nbd_pread (nbd, buf, n, off, 0) == -1)
      die ("nbd_pread");
    for (i = 0; i < n; i++)
      if (buf[i] != 0) {
        fprintf (stderr, "test-read-reqone: FAIL: extent claims ZERO but byte "
                 "%" PRIu64 " is 0x%02x\n", off + i, (unsigned char) buf[i]);
        exit (1);
      }
    off += n;
    len -= n;
  }
}

static void
fail_at (const char *what, uint64_t off, uint64_t count, const struct reply *r)
{
  size_t i;

  fprintf (stderr, "test-read-reqone: FAIL: %s (request %" PRIu64 "+%" PRIu64
           ", reply at %" PRIu64 ":", what, off, count, r->offset);
  for (i = 0; i < r->n; i++)
    fprintf (stderr, " %" PRIu64 "/%" PRIu32, r->len[i], r->flags[i]);
  fprintf (stderr, ")\n");
  exit (1);
}

int
main (int argc, char *argv[])
{
  struct reply r;
  uint64_t pos, zero1 = 0, zero2 = 0, calls = 0;
  int64_t expected;
  unsigned seed = 1;
  int i;

  if (argc != 4) {
    fprintf (stderr, "usage: %s URI BLOCKSIZE EXPECTED-ZERO-BYTES\n", argv[0]);
    exit (1);
  }
  blksize = atoi (argv[2]);
  expected = atoll (argv[3]);

  nbd = nbd_create ();
  if (nbd == NULL) die ("nbd_create");
  if (nbd_add_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) == -1)
    die ("nbd_add_meta_context");
  if (nbd_connect_uri (nbd, argv[1]) == -1) die ("nbd_connect_uri");
  if (nbd_can_meta_context (nbd, LIBNBD_CONTEXT_BASE_ALLOCATION) != 1) {
    fprintf (stderr, "test-read-reqone: FAIL: no base:allocation\n");
    exit (1);
  }
  size = nbd_get_size (nbd);
  if (size == -1) die ("nbd_get_size");
  buf = malloc (4 * 1024 * 1024);
  if (buf == NULL) { perror ("malloc"); exit (1); }

  /* 1. REQ_ONE loop, asking for everything that is left (capped at 2G-ish
   * as qemu does). */
  for (pos = 0; pos < (uint64_t) size; ) {
    uint64_t count = size - pos, end;
    if (count > 0x7fff0000) count = 0x7fff0000;
    ask (count, pos, true, &r);
    calls++;
    if (r.n != 1) fail_at ("REQ_ONE reply with more than one extent", pos, count, &r);
    if (r.offset != pos) fail_at ("reply does not start where asked", pos, count, &r);
    if (r.len[0] == 0) fail_at ("no progress", pos, count, &r);
    if (r.len[0] > count) fail_at ("REQ_ONE extent longer than the request", pos, count, &r);
    end = pos + r.len[0];
    if (end % blksize != 0 && end != pos + count && end != (uint64_t) size)
      fail_at ("extent does not end on a block boundary", pos, count, &r);
    if (r.flags[0] & LIBNBD_STATE_ZERO) {
      check_zero (pos, r.len[0]);
      zero1 += r.len[0];
    }
    pos = end;
  }
  printf ("REQ_ONE: %" PRIu64 " replies, %" PRIu64 " zero bytes\n",
          calls, zero1);
  if (expected >= 0 && zero1 != (uint64_t) expected) {
    fprintf (stderr, "test-read-reqone: FAIL: REQ_ONE loop found %" PRIu64
             " zero bytes, expected %" PRId64 "\n", zero1, expected);
    exit (1);
  }

  /* 2. Without REQ_ONE, 1 MiB at a time (the server may answer less or
   * more than asked; extents beyond the request are ignored). */
  for (pos = 0; pos < (uint64_t) size; ) {
    uint64_t count = size - pos, p;
    size_t j;
    if (count > 1024 * 1024) count = 1024 * 1024;
    ask (count, pos, false, &r);
    if (r.offset != pos) fail_at ("reply does not start where asked", pos, count, &r);
    p = pos;
    for (j = 0; j < r.n && p < pos + count; j++) {
      uint64_t end = p + r.len[j], cut;
      if (r.len[j] == 0) fail_at ("empty extent", pos, count, &r);
      if (end % blksize != 0 && end != (uint64_t) size && end < pos + count)
        fail_at ("extent does not end on a block boundary", pos, count, &r);
      cut = end > pos + count ? pos + count : end;
      if (r.flags[j] & LIBNBD_STATE_ZERO) {
        check_zero (p, cut - p);
        zero2 += cut - p;
      }
      p = cut;
    }
    pos = p;
  }
  printf ("1M requests: %" PRIu64 " zero bytes\n", zero2);
  if (expected >= 0 && zero2 != (uint64_t) expected) {
    fprintf (stderr, "test-read-reqone: FAIL: 1M requests found %" PRIu64
             " zero bytes, expected %" PRId64 "\n", zero2, expected);
    exit (1);
  }

  /* 3. Random unaligned REQ_ONE queries. */
  for (i = 0; i < 300; i++) {
    uint64_t off = ((uint64_t) rand_r (&seed) * 7919) % size;
    uint64_t count = 1 + (uint64_t) rand_r (&seed) % (3 * blksize);
    if (count > size - off) count = size - off;
    ask (count, off, true, &r);
    if (r.n != 1) fail_at ("REQ_ONE reply with more than one extent", off, count, &r);
    if (r.offset != off) fail_at ("reply does not start where asked", off, count, &r);
    if (r.len[0] == 0) fail_at ("no progress", off, count, &r);
    if (r.len[0] > count) fail_at ("REQ_ONE extent longer than the request", off, count, &r);
    if (r.flags[0] & LIBNBD_STATE_ZERO)
      check_zero (off, r.len[0]);
  }
  printf ("random REQ_ONE queries: ok\n");

  nbd_shutdown (nbd, 0);
  nbd_close (nbd);
  free (buf);
  return 0;
}
