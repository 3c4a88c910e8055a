/* sparsebackup-copy: hashing a file or block device for --verify (an NBD
 * target is hashed by the copy engine instead, reading it as a source).
 * Holes (SEEK_DATA / SEEK_HOLE) are hashed as zeroes without reading.
 */

#define _GNU_SOURCE             /* SEEK_DATA */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "minmax.h"
#include "copy.h"

bool
hash_file (int fd, const char *name, struct manifest *out, uint64_t sz,
           uint64_t chunk)
{
  const size_t bufsize = 1024 * 1024;
  char *buf = malloc (bufsize);
  uint64_t pos = 0;
  bool ok = false;

  if (buf == NULL)
    out_of_memory ();
  hasher_start (out, sz, chunk, NULL);
  posix_fadvise (fd, 0, 0, POSIX_FADV_SEQUENTIAL);
  while (pos < sz) {
    off_t d = lseek (fd, pos, SEEK_DATA), h;
    uint64_t data, hole;

    if (d == -1 && errno == ENXIO)
      data = sz;                /* only a hole from here on */
    else if (d == -1)
      data = pos;               /* no SEEK_DATA here: all data */
    else
      data = MIN ((uint64_t) d, sz);
    if (data > pos) {
      hasher_zero (pos, data - pos);
      zeroed += data - pos;
      pos = data;
      progress_update (false);
      continue;
    }
    h = lseek (fd, pos, SEEK_HOLE);
    hole = h == -1 || (uint64_t) h <= pos ? sz : MIN ((uint64_t) h, sz);
    while (pos < hole) {
      uint64_t n = MIN ((uint64_t) bufsize, hole - pos);
      ssize_t r = pread (fd, buf, n, pos);

      if (r == -1 && errno == EINTR)
        continue;
      if (r <= 0) {
        error_msg ("read error on '%s' at offset %" PRIu64 ": %s", name,
                   pos, r == 0 ? "the file ends early" : strerror (errno));
        goto out;
      }
      hasher_data (pos, buf, r);
      copied += r;
      pos += r;
      progress_update (false);
    }
  }
  ok = true;
 out:
  free (buf);
  return ok;
}
