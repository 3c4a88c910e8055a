/* sparsebackup: scoped cleanup of buffers and locks.
 *
 *   CLEANUP_FREE char *buf = malloc (n);     // freed when buf goes out of scope
 *   {
 *     SCOPED_MUTEX (&m);                     // unlocked at the end of the block
 *     ...
 *   }
 *   SCOPED_RDLOCK (&rw);  SCOPED_WRLOCK (&rw);
 *
 * Built on GCC's and clang's __attribute__ ((cleanup)).  The lock
 * macros declare a variable: one per scope; they hide no control flow
 * (the unlock runs on every way out of the scope, return included).
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_CLEANUP_H
#define SPARSEBACKUP_CLEANUP_H

#include <pthread.h>
#include <stdlib.h>

static inline void
cleanup_free (void *ptr)
{
  free (*(void **) ptr);
}
#define CLEANUP_FREE __attribute__ ((cleanup (cleanup_free)))

static inline void
cleanup_mutex_unlock (pthread_mutex_t **m)
{
  pthread_mutex_unlock (*m);
}

static inline void
cleanup_rwlock_unlock (pthread_rwlock_t **rw)
{
  pthread_rwlock_unlock (*rw);
}

static inline pthread_mutex_t *
scoped_mutex_lock (pthread_mutex_t *m)
{
  pthread_mutex_lock (m);
  return m;
}

static inline pthread_rwlock_t *
scoped_rdlock (pthread_rwlock_t *rw)
{
  pthread_rwlock_rdlock (rw);
  return rw;
}

static inline pthread_rwlock_t *
scoped_wrlock (pthread_rwlock_t *rw)
{
  pthread_rwlock_wrlock (rw);
  return rw;
}

#define SCOPED_NAME_(a, b) a##b
#define SCOPED_NAME(a, b) SCOPED_NAME_ (a, b)

#define SCOPED_MUTEX(m)                                                 \
  __attribute__ ((cleanup (cleanup_mutex_unlock), unused))              \
  pthread_mutex_t *SCOPED_NAME (scoped_lock_, __LINE__) =               \
    scoped_mutex_lock (m)
#define SCOPED_RDLOCK(rw)                                               \
  __attribute__ ((cleanup (cleanup_rwlock_unlock), unused))             \
  pthread_rwlock_t *SCOPED_NAME (scoped_lock_, __LINE__) =              \
    scoped_rdlock (rw)
#define SCOPED_WRLOCK(rw)                                               \
  __attribute__ ((cleanup (cleanup_rwlock_unlock), unused))             \
  pthread_rwlock_t *SCOPED_NAME (scoped_lock_, __LINE__) =              \
    scoped_wrlock (rw)

#endif /* SPARSEBACKUP_CLEANUP_H */
