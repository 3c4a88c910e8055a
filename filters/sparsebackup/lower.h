/* nbdkit-sparsebackup-filter: asking the layer below (lower.c).
 *
 * A leaf used by the backup views: the extents of the layer below as a
 * backup view must report them.  In a view, HOLE without ZERO means
 * "not part of this backup", so the layer's own HOLE-only answers
 * (allocation, not contents) become data there.
 */
#ifndef SPARSEBACKUP_LOWER_H
#define SPARSEBACKUP_LOWER_H

#include <stdbool.h>
#include <stdint.h>

#include <nbdkit-filter.h>

/* The extents of the layer below over [POS, END) (one call, at most
 * 4G - 1 bytes asked), or NULL: with *ERR == 0 the layer has no
 * extents (everything is data), else the call failed.
 */
extern struct nbdkit_extents *lower_extents (nbdkit_next *next,
                                             uint64_t pos, uint64_t end,
                                             uint32_t flags, int *err);

/* Add to OUT the extents of EX (may be NULL: data) over [POS, END),
 * HOLE-only made data, from POS as far as they go without a gap; if
 * they say nothing of POS, [POS, END) as data.  Returns where the added
 * extents end (> POS), or -1 with *ERR.
 */
extern int64_t lower_add_as_data (const struct nbdkit_extents *ex,
                                  uint64_t pos, uint64_t end,
                                  struct nbdkit_extents *out, int *err);

/* True if the layer below says [OFF, OFF+LEN) reads as zero (false
 * when it cannot tell or fails).
 */
extern bool lower_reads_zero (nbdkit_next *next, uint64_t off,
                              uint64_t len);

#endif /* SPARSEBACKUP_LOWER_H */
