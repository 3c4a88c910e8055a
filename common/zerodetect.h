/* sparsebackup: fast detection of all-zero buffers.
 * Pure C: no nbdkit headers, so it can be unit-tested and fuzzed.
 */
#ifndef SPARSEBACKUP_ZERODETECT_H
#define SPARSEBACKUP_ZERODETECT_H

#include <stdbool.h>
#include <stddef.h>

/* True if the LEN bytes at BUF are all zero.  LEN may be 0 (true).
 * BUF may have any alignment.  Stops at the first non-zero byte and checks
 * long zero stretches at close to memory bandwidth.
 */
extern bool is_zero (const void *buf, size_t len);

/* Split BUF[0..LEN) into runs at block boundaries.  OFFSET is the position
 * of BUF[0] on the disk, BLKSIZE (a power of 2) the block size: the first
 * and last run may be partial blocks when OFFSET or OFFSET+LEN is not
 * aligned.  Starting at BUF[START], returns the length of the longest run
 * of whole-or-partial blocks that are all zero (if *ZERO is set to true on
 * return) or all non-zero-containing (if *ZERO is false).  A run always
 * ends on a block boundary (or at LEN).  Returns 0 only when START == LEN.
 */
extern size_t zero_run (const void *buf, size_t len, size_t start,
                        unsigned long long offset, unsigned blksize,
                        bool *zero);

#endif /* SPARSEBACKUP_ZERODETECT_H */
