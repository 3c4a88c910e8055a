/* sparsebackup: fast detection of all-zero buffers.
 *
 * Pure C: no nbdkit headers.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

#include "zerodetect.h"

/* Bytes checked one by one.  Data blocks usually have a non-zero byte
 * near the start, so this returns early for them without a function call.
 */
#define HEAD_BYTES 16

/* Once the first HEAD_BYTES bytes are known to be zero, the buffer is all
 * zero if and only if every byte equals the byte HEAD_BYTES before it:
 * memcmp (p, p + 16, len - 16) == 0 proves p[i] == p[i mod 16] == 0 for
 * every i.  This lets the C library's memcmp (which selects SSE2, AVX2 or
 * AVX-512 code at run time, and stops at the first difference) do the
 * bulk of the work: it runs at memory bandwidth, unlike a portable word
 * loop compiled for baseline x86-64.  Both pointers read the same cache
 * lines, so memory traffic is that of a single pass.
 */
bool
is_zero (const void *buf, size_t len)
{
  const unsigned char *p = buf;
  size_t i, head;

  head = len < HEAD_BYTES ? len : HEAD_BYTES;
  for (i = 0; i < head; i++)
    if (p[i] != 0)
      return false;
  if (len <= HEAD_BYTES)
    return true;
  return memcmp (p, p + HEAD_BYTES, len - HEAD_BYTES) == 0;
}

size_t
zero_run (const void *buf, size_t len, size_t start,
          unsigned long long offset, unsigned blksize, bool *zero)
{
  const unsigned char *p = buf;
  size_t pos, end;
  bool first_zero = false;
  bool first = true;

  if (start >= len) {
    *zero = false;
    return 0;
  }

  /* A block size that is not a power of 2 (or 0) makes no sense; treat
   * the whole rest of the buffer as a single block.
   */
  if (blksize == 0 || (blksize & (blksize - 1)) != 0)
    blksize = 0;

  pos = start;
  while (pos < len) {
    bool z;

    /* The end of the block containing BUF[POS]: the next block
     * boundary on the disk, or LEN.  Arithmetic on the disk offset is
     * modulo 2^64, which is fine for a power-of-2 block size.
     */
    if (blksize == 0)
      end = len;
    else {
      unsigned long long in_block = (offset + pos) & (blksize - 1);
      size_t step = blksize - in_block;

      end = (len - pos > step) ? pos + step : len;
    }

    z = is_zero (p + pos, end - pos);
    if (first) {
      first_zero = z;
      first = false;
    }
    else if (z != first_zero)
      break;
    pos = end;
  }

  *zero = first_zero;
  return pos - start;
}
