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
#include "cbt.h"
#include "changes.h"
#include "ispowerof2.h"
#include "minmax.h"
#include "rounding.h"
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
extern uint64_t cfg_map_memory;
extern int64_t cfg_min_zero_extent;     /* -1 = auto */

/* One value of an enumerated parameter; ALIAS: accepted, not listed. */
struct sb_choice {
  const char *name;
  int value;
  bool alias;
};

/* Set *R to the value of the choice named VALUE, or fail with
 * "KEY: 'VALUE' is not one of A, B, C" (the choices end with a NULL name).
 */
extern int parse_choice (const char *key, const char *value,
                         const struct sb_choice *choices, int *r);

/* Debug flags (-D sparsebackup.verbose=1, -D sparsebackup.stats=1). */
extern int sparsebackup_debug_verbose;
extern int sparsebackup_debug_stats;

#define VERBOSE(fs, ...)                                                \
  do {                                                                  \
    if (sparsebackup_debug_verbose)                                     \
      nbdkit_debug ("sparsebackup: " fs, ##__VA_ARGS__);                \
  } while (0)

/* ---- Statistics (atomic counters, stats.c) ------------------------- */

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
  uint64_t merged_zero_bytes;
  uint64_t passthrough_requests;
  /* Point-in-time backups (frozen.c), over every backup. */
  uint64_t frozen_saved_bytes;          /* old data stored in the scratch */
  uint64_t frozen_zero_bytes;           /* old data noted as zero */
  uint64_t frozen_cbw_read_bytes;       /* old data read from the plugin */
  uint64_t frozen_scratch_read_bytes;   /* frozen reads from the scratch */
};
extern struct sb_stats stats;

#define STAT_ADD(field, n) \
  ((void) __atomic_fetch_add (&stats.field, (uint64_t) (n), __ATOMIC_RELAXED))

/* sparsebackup-statsfile=: open (create) the file now, so that a bad
 * path fails at start-up.  stats_close prints the summary line (always
 * to the debug log) and, to the file, the summary and the counters;
 * returns -1 if the file could not be written.
 */
extern int stats_open (const char *value);
extern int stats_close (void);

/* ---- The disk (sparsebackup.c) ------------------------------------ */

/* One state for the disk the filter serves: the plugin's default export
 * (export name "").  The change tracker exists from .get_ready on; the
 * map and the scan cache are created by the first connection to the
 * default export and are never replaced (a change of size resets them).
 * Published with release/acquire atomics: read DISK_BM () and DISK_SC ().
 */
struct sb_disk {
  struct changes *changes;      /* every change of every connection */
  struct blockmap *bm;          /* NULL until created */
  struct scancache *sc;         /* NULL if sparsebackup-scan-cache=0 */
  uint32_t blksize;
  uint32_t scan_chunk;          /* bytes per scanning read */
  uint64_t scan_max;            /* cfg_scan_max, at least blksize */
};
extern struct sb_disk disk;

/* A change (write, zero request, trim) in flight; see doc/design.md. */
struct sb_change {
  uint64_t ticket;
  uint64_t offset, count;
};

/* Before a change of [OFFSET, OFFSET+COUNT) is issued: record it with
 * the change tracker, take it out of the map's zero knowledge (its
 * blocks become NEWSTATE if the change comes through a connection that
 * uses the map, OWN, else BM_UNKNOWN) and drop it from the scan cache;
 * while a backup is frozen, first save the old data it will overwrite
 * (frozen.c, read through NEXT).  Returns -1 with *ERR set if it must not be issued.  After it,
 * change_end with OK = false if it failed (its blocks become unknown).
 */
extern int change_begin (struct sb_change *c, nbdkit_next *next, bool own,
                         uint64_t offset, uint64_t count,
                         enum bm_state newstate, int *err);
extern void change_end (struct sb_change *c, bool ok);

/* Per-connection handle. */
struct sb_handle {
  struct blockmap *bm;          /* set in .prepare; NULL: pass through */
  struct scancache *sc;
  uint64_t size;                /* of this connection's export */
  char *exportname;
  bool view;                    /* a backup view (read-only): */
  bool frozen;                  /*   "@frozen", "@frozen:since:X" (frozen.c) */
  const char *since;            /*   X in "@since:X" or "@frozen:since:X" */
  uint64_t frozen_gen;          /*   the freeze it reads */
  char until[CBT_NAME_MAX + 1]; /*   the frozen backup's checkpoint */
};

/* ---- Write side (write.c) ------------------------------------------ */

extern int sparsebackup_pwrite (nbdkit_next *next, void *handle,
                      const void *buf, uint32_t count, uint64_t offset,
                      uint32_t flags, int *err);
extern int sparsebackup_zero (nbdkit_next *next, void *handle,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err);
extern int sparsebackup_trim (nbdkit_next *next, void *handle,
                    uint32_t count, uint64_t offset, uint32_t flags,
                    int *err);

/* ---- Read side (read.c) -------------------------------------------- */

extern int sparsebackup_pread (nbdkit_next *next, void *handle,
                     void *buf, uint32_t count, uint64_t offset,
                     uint32_t flags, int *err);
extern int sparsebackup_extents (nbdkit_next *next, void *handle,
                       uint32_t count, uint64_t offset, uint32_t flags,
                       struct nbdkit_extents *extents, int *err);
extern int sparsebackup_cache (nbdkit_next *next, void *handle,
                     uint32_t count, uint64_t offset, uint32_t flags,
                     int *err);

/* Ask the plugin's extents about the unknown range at POS (up to END, at
 * least EXTENTS_AHEAD bytes ahead) and teach the map.  Sets *QUERIED_END
 * to where asking again would not teach more.
 */
extern int query_plugin (nbdkit_next *next, struct sb_handle *h,
                         uint64_t pos, uint64_t end, uint64_t *queried_end,
                         int *err);

#endif /* SPARSEBACKUP_FILTER_H */
