/* sparsebackup: power-of-two tests.
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_ISPOWEROF2_H
#define SPARSEBACKUP_ISPOWEROF2_H

#include <stdbool.h>
#include <stdint.h>

/* True if V is a power of 2 (0 is not). */
static inline bool
is_power_of_2 (uint64_t v)
{
  return v != 0 && (v & (v - 1)) == 0;
}

/* log2 of V, which must be a power of 2. */
static inline unsigned
log_2_bits (uint64_t v)
{
  return (unsigned) __builtin_ctzll (v);
}

#endif /* SPARSEBACKUP_ISPOWEROF2_H */
