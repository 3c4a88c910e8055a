/* nbdkit-sparsebackup-filter: private declarations shared by the
 * filter's source files.
 */
#ifndef SPARSEBACKUP_FILTER_H
#define SPARSEBACKUP_FILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <pthread.h>

#include <nbdkit-filter.h>

#include "blockmap.h"
#include "scancache.h"

/* ---- Configuration (sparsebackup.c) -------------------------------- */

enum detect_zeroes_mode { DZ_UNMAP, DZ_ON, DZ_OFF };
enum no_hole_mode { NH_HONOUR, NH_IGNORE };
enum scan_mode { SCAN_AUTO, SCAN_ALWAYS, SCAN_NEVER };

extern uint32_t cfg_block_size;         /* 0 = automatic */
extern enum detect_zeroes_mode cfg_detect_zeroes;
extern enum no_hole_mode cfg_no_hole;
extern enum scan_mode cfg_scan;
extern uint64_t cfg_scan_max;
extern uint64_t cfg_scan_cache;
extern const char *cfg_statsfile;

/* Debug flags (-D sparsebackup.verbose=1, -D sparsebackup.stats=1). */
extern int sparsebackup_debug_verbose;
extern int sparsebackup_debug_stats;

#define VERBOSE(fs, ...)                                                \
  do {                                                                  \
    if (sparsebackup_debug_verbose)                                     \
      nbdkit_debug ("sparsebackup: " fs, ##__VA_ARGS__);                \
  } while (0)

/* ---- Statistics (atomic counters, sparsebackup.c) ------------------ */

struct sb_stats {
  uint64_t write_data_bytes;
  uint64_t write_zero_bytes;
  uint64_t zero_bytes;
  uint64_t zero_skipped_bytes;
  uint64_t requests_avoided;
  uint64_t read_bytes;
  uint64_t read_map_bytes;
  uint64_t read_cache_bytes;
  uint64_t plugin_read_bytes;
  uint64_t scan_bytes;
  uint64_t extents_calls;
};
extern struct sb_stats stats;

#define STAT_ADD(field, n) \
  ((void) __atomic_fetch_add (&stats.field, (uint64_t) (n), __ATOMIC_RELAXED))

/* ---- Per-export state (sparsebackup.c) ----------------------------- */

/* One per export name and size, shared by every connection to it. */
struct sb_export {
  struct sb_export *next;       /* list of live exports (global lock) */
  char *name;
  uint64_t size;
  uint32_t blksize;
  uint64_t scan_max;            /* cfg_scan_max, at least blksize */
  uint32_t scan_chunk;          /* bytes per scanning read */
  struct blockmap *bm;
  struct scancache *sc;         /* NULL if sparsebackup-scan-cache=0 */
  unsigned refs;                /* connections and changes using it */
  bool retired;                 /* replaced by a map of another size */
  uint64_t last_used;           /* export_clock at the last connection */
};

/* At most this many maps (export names, plus retired maps still in use)
 * exist at once.
 */
#define MAX_EXPORTS 16

/* A change (write, trim, zero) as seen by every map; see sparsebackup.c. */
struct sb_change {
  unsigned n;
  bool track;
  struct {
    struct sb_export *ex;
    uint64_t bm_ticket;
    uint64_t sc_ticket;
  } e[MAX_EXPORTS];
};

/* Before a change of [OFFSET, OFFSET+COUNT) through export OWN: every scan
 * cache drops the range; if TRACK, every map also clears its zero state
 * and records the change as in flight (OWN's blocks become NEWSTATE, the
 * others' BM_UNKNOWN).  After it, change_end with OK = false if it failed
 * (tracked blocks become unknown).  change_forget makes a range unknown
 * in every map (a failed untracked change, such as a zero request).
 */
extern void change_begin (struct sb_change *c, struct sb_export *own,
                          uint64_t offset, uint64_t count,
                          bool track, enum bm_state newstate);
extern void change_end (struct sb_change *c, bool ok);
extern void change_forget (struct sb_change *c,
                           uint64_t offset, uint64_t count);

/* Per-connection handle. */
struct sb_handle {
  char *exportname;
  struct sb_export *ex;         /* set in .prepare */
};

/* Helpers. */
static inline uint64_t
round_down (uint64_t x, uint32_t blksize)
{
  return x & ~((uint64_t) blksize - 1);
}

static inline uint64_t
round_up (uint64_t x, uint32_t blksize)
{
  return (x + blksize - 1) & ~((uint64_t) blksize - 1);
}

static inline uint64_t
min_u64 (uint64_t a, uint64_t b)
{
  return a < b ? a : b;
}

static inline uint64_t
max_u64 (uint64_t a, uint64_t b)
{
  return a > b ? a : b;
}

/* ---- Write side (write.c) ------------------------------------------ */

extern int sb_pwrite (nbdkit_next *next, void *handle,
                      const void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags, int *err);
extern int sb_zero (nbdkit_next *next, void *handle,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err);
extern int sb_trim (nbdkit_next *next, void *handle,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err);

/* ---- Read side (read.c) -------------------------------------------- */

extern int sb_pread (nbdkit_next *next, void *handle,
                     void *buf, uint32_t count, uint64_t offset,
                     uint32_t flags, int *err);
extern int sb_extents (nbdkit_next *next, void *handle,
                       uint32_t count, uint64_t offset, uint32_t flags,
                       struct nbdkit_extents *extents, int *err);
extern int sb_cache (nbdkit_next *next, void *handle,
                     uint32_t count, uint64_t offset, uint32_t flags,
                     int *err);

#endif /* SPARSEBACKUP_FILTER_H */
