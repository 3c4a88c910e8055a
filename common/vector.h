/* sparsebackup: growable arrays.
 *
 *   DEFINE_VECTOR (ranges, struct range);
 *   ranges v = VECTOR_INIT;
 *   if (ranges_append (&v, r) == -1) ...   // errno ENOMEM
 *   for (size_t i = 0; i < v.len; i++) ... v.ptr[i] ...
 *   ranges_reset (&v);                     // frees
 *
 * Capacity doubles (at least 16 elements); a request whose size would
 * overflow fails with ENOMEM, as does one over MAX elements when the
 * caller sets v.max (0 = no limit).
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_VECTOR_H
#define SPARSEBACKUP_VECTOR_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define VECTOR_INIT { 0 }

#define DEFINE_VECTOR(name, type)                                       \
  typedef struct {                                                      \
    type *ptr;                                                          \
    size_t len;                                                         \
    size_t cap;                                                         \
    size_t max;                                                         \
  } name;                                                               \
                                                                        \
  static inline int __attribute__ ((__unused__))                        \
  name##_reserve (name *v, size_t n)                                    \
  {                                                                     \
    size_t cap;                                                         \
    type *p;                                                            \
                                                                        \
    if (n <= v->cap - v->len)                                           \
      return 0;                                                         \
    if (n > SIZE_MAX / sizeof (type) - v->len ||                        \
        (v->max > 0 && v->len + n > v->max)) {                          \
      errno = ENOMEM;                                                   \
      return -1;                                                        \
    }                                                                   \
    cap = v->cap < 16 ? 16 : v->cap;                                    \
    while (cap < v->len + n)                                            \
      cap = cap > SIZE_MAX / sizeof (type) / 2 ?                        \
        v->len + n : cap * 2;                                           \
    if (v->max > 0 && cap > v->max)                                     \
      cap = v->max;                                                     \
    p = realloc (v->ptr, cap * sizeof (type));                          \
    if (p == NULL)                                                      \
      return -1;                                                        \
    v->ptr = p;                                                         \
    v->cap = cap;                                                       \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  static inline int __attribute__ ((__unused__))                        \
  name##_append (name *v, type elem)                                    \
  {                                                                     \
    if (name##_reserve (v, 1) == -1)                                    \
      return -1;                                                        \
    v->ptr[v->len++] = elem;                                            \
    return 0;                                                           \
  }                                                                     \
                                                                        \
  /* Remove element I, keeping the order. */                            \
  static inline void __attribute__ ((__unused__))                       \
  name##_remove (name *v, size_t i)                                     \
  {                                                                     \
    memmove (&v->ptr[i], &v->ptr[i + 1],                                \
             (v->len - i - 1) * sizeof (type));                         \
    v->len--;                                                           \
  }                                                                     \
                                                                        \
  static inline void __attribute__ ((__unused__))                       \
  name##_reset (name *v)                                                \
  {                                                                     \
    free (v->ptr);                                                      \
    v->ptr = NULL;                                                      \
    v->len = v->cap = 0;                                                \
  }                                                                     \
  struct name##_dummy_ /* so that DEFINE_VECTOR (...); needs its ; */

#endif /* SPARSEBACKUP_VECTOR_H */
