/* sparsebackup: print the map of a qcow2 image as the library gives it
 * in ONE call over the whole disk (tests/test-qcow2-map64.sh).
 *
 *   qcow2-map IMAGE [@top | @since:NAME]
 *
 * Prints one line "OFFSET LENGTH FLAGS" (decimal; FLAGS 1 = hole,
 * 2 = zero) per extent the callback receives, from one qcow2_map,
 * qcow2_map_top or qcow2_map_since of [0, size): with a disk of tens
 * of GiB the request and the extents are longer than 32 bits, which
 * nbdkit's plugin API (a uint32_t count) never asks of the plugin, so
 * this is where a length cut to 32 bits in the library shows.  Exits 1
 * with the library's message on failure.
 */

#include <config.h>

#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "qcow2.h"

static int
print_extent (void *opaque, uint64_t offset, uint64_t length, uint32_t flags)
{
  uint64_t *calls = opaque;

  printf ("%" PRIu64 " %" PRIu64 " %" PRIu32 "\n", offset, length, flags);
  ++*calls;
  return 0;
}

int
main (int argc, char *argv[])
{
  struct qcow2_options opts;
  struct qcow2_image *img;
  struct qcow2_bitmap *bm = NULL;
  const char *view = argc > 2 ? argv[2] : "";
  char err[QCOW2_ERRLEN];
  uint64_t size, calls = 0;
  int r;

  if (argc < 2 || argc > 3) {
    fprintf (stderr, "usage: qcow2-map IMAGE [@top | @since:NAME]\n");
    return 2;
  }
  qcow2_options_init (&opts);
  if (qcow2_open_file (argv[1], &opts, &img, err, sizeof err) == -1) {
    fprintf (stderr, "qcow2-map: %s\n", err);
    return 1;
  }
  size = qcow2_get_size (img);
  err[0] = '\0';
  if (strcmp (view, "") == 0)
    r = qcow2_map (img, 0, size, print_extent, &calls, err, sizeof err);
  else if (strcmp (view, "@top") == 0)
    r = qcow2_map_top (img, 0, size, print_extent, &calls, err, sizeof err);
  else if (strncmp (view, "@since:", 7) == 0) {
    r = qcow2_bitmap_open (img, view + 7, &bm, err, sizeof err);
    if (r == 0)
      r = qcow2_map_since (img, bm, 0, size, print_extent, &calls,
                           err, sizeof err);
  }
  else {
    fprintf (stderr, "qcow2-map: unknown view '%s'\n", view);
    qcow2_close (img);
    return 2;
  }
  qcow2_bitmap_close (bm);
  qcow2_close (img);
  if (r == -1) {
    fprintf (stderr, "qcow2-map: %s: %s\n", argv[1], err);
    return 1;
  }
  if (calls == 0) {
    fprintf (stderr, "qcow2-map: %s: no extents\n", argv[1]);
    return 1;
  }
  return 0;
}
