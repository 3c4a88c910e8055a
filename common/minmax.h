/* sparsebackup: MIN and MAX that evaluate their arguments once.
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_MINMAX_H
#define SPARSEBACKUP_MINMAX_H

#define SB_MIN(a, b)                                    \
  __extension__ ({                                      \
    __auto_type sb_min_a_ = (a);                        \
    __auto_type sb_min_b_ = (b);                        \
    sb_min_a_ < sb_min_b_ ? sb_min_a_ : sb_min_b_;      \
  })

#define SB_MAX(a, b)                                    \
  __extension__ ({                                      \
    __auto_type sb_max_a_ = (a);                        \
    __auto_type sb_max_b_ = (b);                        \
    sb_max_a_ > sb_max_b_ ? sb_max_a_ : sb_max_b_;      \
  })

#ifndef MIN
#define MIN(a, b) SB_MIN (a, b)
#endif
#ifndef MAX
#define MAX(a, b) SB_MAX (a, b)
#endif

#endif /* SPARSEBACKUP_MINMAX_H */
