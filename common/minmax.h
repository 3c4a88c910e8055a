/* sparsebackup: MIN and MAX that evaluate their arguments once.
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_MINMAX_H
#define SPARSEBACKUP_MINMAX_H

#define SB_CAT_(a, b) a##b
#define SB_CAT(a, b) SB_CAT_ (a, b)

/* Unique names for the temporaries, so that MIN (MIN (a, b), c) does not
 * shadow.
 */
#define SB_MINMAX_(a, b, op, n)                                         \
  __extension__ ({                                                      \
    __auto_type SB_CAT (sb_mm_a_, n) = (a);                             \
    __auto_type SB_CAT (sb_mm_b_, n) = (b);                             \
    SB_CAT (sb_mm_a_, n) op SB_CAT (sb_mm_b_, n) ?                      \
      SB_CAT (sb_mm_a_, n) : SB_CAT (sb_mm_b_, n);                      \
  })

#define SB_MIN(a, b) SB_MINMAX_ (a, b, <, __COUNTER__)
#define SB_MAX(a, b) SB_MINMAX_ (a, b, >, __COUNTER__)

#ifndef MIN
#define MIN(a, b) SB_MIN (a, b)
#endif
#ifndef MAX
#define MAX(a, b) SB_MAX (a, b)
#endif

#endif /* SPARSEBACKUP_MINMAX_H */
