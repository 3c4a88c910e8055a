/* sparsebackup: the scan cache of the filter.
 *
 * Data read from the plugin while scanning (to answer an extents request
 * or an NBD_CMD_CACHE) is kept here, so that the client's following read
 * of the same bytes does not reach the plugin a second time.
 *
 * - Bounded: at most CAPACITY bytes of data; least recently used entries
 *   are evicted first.  An entry is dropped as soon as a client has read
 *   every block of it.
 * - Entries never overlap.  They start on a block boundary and end on a
 *   block boundary or at the end of the export.
 * - Coherent with changes: every write, zero or trim calls
 *   scancache_drop (after changes_begin, before it is issued), which
 *   drops overlapping entries.  An insert is refused unless the disk's
 *   change tracker reports the whole range unchanged since the
 *   inserter's changes_snapshot (taken before the data was read), so
 *   stale data never enters the cache.
 * - Thread safe (one mutex).
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_SCANCACHE_H
#define SPARSEBACKUP_SCANCACHE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct scancache;
struct changes;

/* CAPACITY > 0 bytes, BLKSIZE a power of 2, CHANGES the disk's change
 * tracker (not owned).  NULL + errno on failure.
 */
extern struct scancache *scancache_new (uint64_t capacity, uint32_t blksize,
                                        struct changes *changes);
extern void scancache_free (struct scancache *sc);

/* Drop every entry overlapping [OFFSET, OFFSET+COUNT). */
extern void scancache_drop (struct scancache *sc,
                            uint64_t offset, uint64_t count);

/* Copy LEN bytes of DATA (read from disk offset OFFSET, block aligned,
 * after changes_snapshot returned SNAP) into the cache.  Returns true if
 * inserted.
 */
extern bool scancache_insert (struct scancache *sc, uint64_t snap,
                              uint64_t offset, const void *data, size_t len);

/* Serve a read of [OFFSET, OFFSET+COUNT) from the cache, as far as it is
 * cached contiguously from OFFSET.  Returns the number of bytes copied to
 * BUF (0 if OFFSET is not cached).  When 0 is returned, *UNCACHED is set
 * to the number of bytes from OFFSET (at most COUNT) that are not cached.
 * If CONSUME, blocks fully read become eligible for dropping.  BUF may be
 * NULL to only ask (nothing is copied or consumed).
 */
extern size_t scancache_read (struct scancache *sc, void *buf,
                              uint64_t offset, size_t count, bool consume,
                              size_t *uncached);

struct scancache_stats {
  uint64_t entries;
  uint64_t bytes;
  uint64_t inserted;
  uint64_t refused;
  uint64_t evicted;
};
extern void scancache_get_stats (struct scancache *sc,
                                 struct scancache_stats *stats);

#endif /* SPARSEBACKUP_SCANCACHE_H */
