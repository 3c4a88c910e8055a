/* sparsebackup: rounding to a power-of-two alignment.
 *
 * ALIGN must be a power of 2 (see ispowerof2.h).  round_up does not
 * overflow-check: callers keep X + ALIGN - 1 within 64 bits (every size
 * in this project is below 2^63).
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_ROUNDING_H
#define SPARSEBACKUP_ROUNDING_H

#include <stdbool.h>
#include <stdint.h>

static inline uint64_t
round_down (uint64_t x, uint64_t align)
{
  return x & ~(align - 1);
}

static inline uint64_t
round_up (uint64_t x, uint64_t align)
{
  return (x + align - 1) & ~(align - 1);
}

static inline bool
is_aligned (uint64_t x, uint64_t align)
{
  return (x & (align - 1)) == 0;
}

/* X / D rounded up, for any D > 0. */
static inline uint64_t
div_round_up (uint64_t x, uint64_t d)
{
  return x / d + (x % d != 0);
}

#endif /* SPARSEBACKUP_ROUNDING_H */
