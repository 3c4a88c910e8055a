/* sparsebackup: fuzz harness for the cbt file loader (common/cbt-load.c,
 * common/cbt-v1.c).
 *
 * LLVMFuzzerTestOneInput copies the input into a memfd and opens it
 * read-only, taking the disk size and granularity from the file.  When
 * that succeeds it checks what the loader reports (a power-of-2
 * granularity, valid unique names, increasing serials, map extents in
 * order inside the disk, the same by serial), then opens a second copy
 * read-write with the same disk in one of the three modes (which may
 * convert a version 1 file, merge a pending checkpoint back or
 * invalidate an in-use file), marks a few ranges, creates a checkpoint,
 * creates and confirms another, deletes the oldest, closes, and
 * reopens: that must succeed and show the checkpoints it left.  Nothing
 * touches the host filesystem.
 *
 * Besides what the sanitizers find, the harness aborts when the loader
 * breaks its contract: a read-only load accepted but the read-write one
 * refused, an error without a message, a file it wrote itself refused.
 *
 * Builds with gcc (fuzz-main.c provides main) and with clang
 * -fsanitize=fuzzer.  CBT_FUZZ_VERBOSE=1 (or -v of the standalone
 * driver, which sets QCOW2_FUZZ_VERBOSE) prints what each input does.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* memfd_create */
#endif

#include <errno.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "cbt.h"

#define NEW_NAME "fuzz-new-checkpoint"
#define PENDING_NAME "fuzz-pending"

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

#define die(...)                                                \
  do {                                                          \
    fprintf (stderr, "fuzz-cbt: " __VA_ARGS__);                 \
    fprintf (stderr, "\n");                                     \
    abort ();                                                   \
  } while (0)

static int verbose = -1;

static void __attribute__ ((__format__ (__printf__, 1, 2)))
say (const char *fmt, ...)
{
  va_list ap;

  if (verbose == -1)
    verbose = getenv ("CBT_FUZZ_VERBOSE") != NULL ||
      getenv ("QCOW2_FUZZ_VERBOSE") != NULL;
  if (!verbose)
    return;
  fprintf (stderr, "fuzz-cbt: ");
  va_start (ap, fmt);
  vfprintf (stderr, fmt, ap);
  va_end (ap);
  fprintf (stderr, "\n");
}

static int
memfd_with (const uint8_t *data, size_t size)
{
  int fd = memfd_create ("fuzz-cbt", MFD_CLOEXEC);

  if (fd == -1)
    die ("memfd_create: %m");
  if (size > 0 && pwrite (fd, data, size, 0) != (ssize_t) size)
    die ("pwrite: %m");
  return fd;
}

struct walk {
  uint64_t next, disk_size, gran;
  unsigned n;
};

static int
check_extent (uint64_t off, uint64_t len, void *opaque)
{
  struct walk *w = opaque;

  if (len == 0 || off < w->next || (w->n > 0 && off == w->next) ||
      off % w->gran != 0 || off > w->disk_size || len > w->disk_size - off)
    die ("bad extent [%" PRIu64 ", +%" PRIu64 ") after %" PRIu64
         " (disk %" PRIu64 ")", off, len, w->next, w->disk_size);
  w->next = off + len;
  return ++w->n >= 1000 ? -1 : 0;       /* bounded work */
}

static void
check_err (const char *what, const char *err)
{
  if (err[0] == '\0' || strnlen (err, CBT_ERRLEN) == CBT_ERRLEN)
    die ("%s failed without a (terminated) message", what);
}

/* Check the checkpoints and map every good one (by name and serial). */
static void
inspect (struct cbt *c)
{
  uint32_t g = cbt_granularity (c);
  size_t n = cbt_checkpoint_count (c);
  char err[CBT_ERRLEN];
  uint64_t last = 0;

  if (g < CBT_MIN_GRANULARITY || g > CBT_MAX_GRANULARITY || (g & (g - 1)))
    die ("granularity %" PRIu32, g);
  if (cbt_disk_size (c) == 0)
    die ("disk size 0 accepted");
  for (size_t i = 0; i < n; ++i) {
    struct cbt_checkpoint_info ci;
    struct walk w = { .disk_size = cbt_disk_size (c), .gran = g };
    struct walk w2 = w;

    if (cbt_checkpoint_get (c, i, &ci) == -1)
      die ("checkpoint %zu of %zu missing", i, n);
    if (!cbt_name_valid (ci.name))
      die ("invalid name accepted");
    if (ci.serial <= last)
      die ("serial %" PRIu64 " after %" PRIu64, ci.serial, last);
    last = ci.serial;
    if (cbt_checkpoint_find_serial (c, ci.serial, NULL) != (ssize_t) i)
      die ("serial %" PRIu64 " not found", ci.serial);
    if (ci.state != CBT_STATE_GOOD)
      continue;
    err[0] = '\0';
    if (cbt_map (c, ci.name, check_extent, &w, err, sizeof err) == -1 &&
        w.n < 1000)
      check_err ("cbt_map", err);
    if (cbt_map_serial (c, ci.serial, 0, 0, UINT64_MAX, check_extent, &w2,
                        err, sizeof err) == -1 && w2.n < 1000)
      check_err ("cbt_map_serial", err);
    if (w.n != w2.n || w.next != w2.next)
      die ("map by name and by serial differ");
    say ("since %s: %u extents", ci.name, w.n);
  }
}

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  struct cbt_options o = { .read_only = true, .boot_id = "fuzz-boot" };
  struct cbt_load_info info;
  struct cbt *c;
  char err[CBT_ERRLEN] = "";
  char identity[CBT_IDENTITY_MAX + 1];
  size_t n;
  int fd, fd2;

  if (cbt_open_fd (memfd_with (data, size), &o, &c, &info,
                   err, sizeof err) == -1) {
    check_err ("cbt_open_fd", err);
    say ("open: error: %s", err);
    return 0;
  }
  say ("open: ok: disk %" PRIu64 " granularity %" PRIu32 " checkpoints %zu"
       "%s%s", cbt_disk_size (c), cbt_granularity (c),
       cbt_checkpoint_count (c), info.message[0] ? ": " : "", info.message);
  inspect (c);
  o.disk_size = cbt_disk_size (c);
  o.granularity = cbt_granularity (c);
  strcpy (identity, cbt_identity (c));
  o.identity = identity;
  if (cbt_mark (c, 0, 1, NULL) != -1 || errno != EROFS)
    die ("cbt_mark on a read-only set did not fail with EROFS");
  cbt_close (c, NULL, 0);

  /* The same file read-write: must load too. */
  o.read_only = false;
  o.mode = (enum cbt_mode) (size % 3);
  o.boot_id = "fuzz-boot";
  fd = memfd_with (data, size);
  fd2 = dup (fd);
  if (fd2 == -1)
    die ("dup: %m");
  if (cbt_open_fd (fd, &o, &c, &info, err, sizeof err) == -1)
    die ("read-only load accepted the file, read-write refused it: %s", err);
  for (unsigned i = 0; i < 4; ++i) {
    uint64_t off = (o.disk_size / 4) * i, t;
    uint64_t len = o.disk_size - off < 70000 ? o.disk_size - off : 70000;

    if (cbt_mark (c, off, len, &t) == -1 || cbt_commit (c, t) == -1)
      die ("cbt_mark/commit: %m");
  }
  n = cbt_checkpoint_count (c);
  if (cbt_checkpoint_create (c, NEW_NAME, false, err, sizeof err) == -1) {
    if (errno != EEXIST && errno != EMLINK && errno != EBUSY)
      die ("create: %s", err);
  }
  else
    n++;
  if (cbt_checkpoint_create (c, PENDING_NAME, true, err, sizeof err) == -1) {
    if (errno != EEXIST && errno != EMLINK && errno != EBUSY)
      die ("create pending: %s", err);
  }
  else {
    n++;
    if (cbt_mark (c, 0, 1, NULL) == -1)
      die ("cbt_mark: %m");
    if (cbt_checkpoint_confirm (c, PENDING_NAME, err, sizeof err) == -1)
      die ("confirm: %s", err);
  }
  if (n > 1) {
    struct cbt_checkpoint_info ci;

    if (cbt_checkpoint_get (c, 0, &ci) == -1 ||
        cbt_checkpoint_delete (c, ci.name, err, sizeof err) == -1)
      die ("delete: %s", err);
    n--;
  }
  inspect (c);
  if (cbt_close (c, err, sizeof err) == -1)
    die ("close: %s", err);

  /* What we stored must load back. */
  if (cbt_open_fd (fd2, &o, &c, &info, err, sizeof err) == -1)
    die ("the file written by cbt_close is refused: %s", err);
  if (cbt_checkpoint_count (c) != n || info.invalidated || info.fallback)
    die ("reloaded: %zu checkpoints (expected %zu)%s%s",
         cbt_checkpoint_count (c), n, info.invalidated ? ", invalidated" : "",
         info.fallback ? ", fallback" : "");
  cbt_close (c, NULL, 0);
  return 0;
}
