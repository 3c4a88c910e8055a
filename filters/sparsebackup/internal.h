/* nbdkit-sparsebackup-filter: declarations shared by the filter's files.
 *
 * The files and the direction of their calls (no file calls one that
 * calls it back; doc/design.md, "Components"):
 *
 *   sparsebackup.c  the filter's callbacks  -> views, read, write, disk,
 *                                              control, frozen, tracking,
 *                                              stats, config
 *   control.c       the control socket      -> backup, tracking, frozen
 *   views.c         export names, views     -> backup, frozen, tracking,
 *                                              lower
 *   backup.c        backups, checkpoints    -> disk, frozen, tracking
 *   write.c         pwrite, zero, trim      -> read (query_plugin), disk
 *   read.c          pread, extents, cache   -> disk
 *   disk.c          the disk, its changes   -> frozen, tracking
 *   frozen.c        the frozen disk         -> lower
 *   tracking.c      the cbt file            (leaf)
 *   lower.c         the layer below         (leaf)
 *   config.c        the parameters          -> stats (the file)
 *   stats.c         counters, statistics    (leaf)
 *
 * Headers: this one (configuration, debug flags, statistics, the
 * handle, the data paths: shared by every file, defines nothing),
 * disk.h, tracking.h, frozen.h, backup.h, views.h, lower.h, control.h.
 */
#ifndef SPARSEBACKUP_FILTER_H
#define SPARSEBACKUP_FILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/stat.h>

#include <nbdkit-filter.h>

#include "blockmap.h"
#include "cbt.h"
#include "ispowerof2.h"
#include "minmax.h"
#include "rounding.h"
#include "frozen.h"
#include "scancache.h"
#include "tracking.h"

#define DEFAULT_BLOCK_SIZE 4096
#define MIN_BLOCK_SIZE 512
#define MAX_BLOCK_SIZE (2 * 1024 * 1024)
/* nbdkit refuses data requests larger than this (MAX_REQUEST_SIZE). */
#define MAX_REQUEST (64 * 1024 * 1024)
#define CONTROL_PATH_MAX 108    /* sizeof sun_path */

/* ---- Configuration (config.c) ---------------------------------------- */

enum detect_zeroes_mode { DZ_UNMAP, DZ_ON, DZ_OFF };
enum no_hole_mode { NH_HONOUR, NH_IGNORE };
enum scan_mode { SCAN_AUTO, SCAN_ALWAYS, SCAN_NEVER };
enum scratch_error { SE_BREAK, SE_FAIL_WRITE };

extern uint32_t cfg_block_size;         /* 0 = automatic */
extern enum detect_zeroes_mode cfg_detect_zeroes;
extern enum no_hole_mode cfg_no_hole;
extern enum scan_mode cfg_scan;
extern uint64_t cfg_scan_max;
extern uint64_t cfg_scan_cache;
extern uint64_t cfg_map_memory;
extern int64_t cfg_min_zero_extent;     /* -1 = auto */
/* Backups.  Paths are absolute (taken from the start directory). */
extern char *cfg_cbt_path;              /* NULL: no tracking */
extern uint32_t cfg_cbt_gran;           /* 0: the file's, or the default */
extern enum cbt_mode cfg_cbt_mode;
extern bool cfg_cbt_reset;
extern char *cfg_cbt_id;
extern char *cfg_control_path;
extern char *cfg_scratch_path;          /* NULL: no point-in-time backups */
extern uint64_t cfg_scratch_size;       /* UINT64_MAX: no limit */
extern enum scratch_error cfg_scratch_error;

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

extern int sparsebackup_config (nbdkit_next_config *next,
                                nbdkit_backend *nxdata,
                                const char *key, const char *value);
extern int sparsebackup_config_complete (nbdkit_next_config_complete *next,
                                         nbdkit_backend *nxdata);
extern const char sparsebackup_config_help[];
/* A file of ours (KEY=PATH, ST its stat) must not be one that another
 * parameter names (the disk the plugin serves...) nor another file of
 * ours: -1 with an error naming both.
 */
extern int config_check_clash (const char *key, const char *path,
                               const struct stat *st);
extern void config_free (void);

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
  uint64_t scan_unreadable_bytes;       /* blocks a scan could not read */
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

/* What the statistics print besides the counters (NULL: not there). */
struct stats_sources {
  struct blockmap *bm;
  const struct blockmap_stats *map;
  const struct changes_stats *changes;
  const struct scancache_stats *cache;
  const struct cbt_stats *cbt;
  bool frozen;
};

/* sparsebackup-statsfile=PATH: config.c opens (creates) the file at
 * start-up, so that a bad path fails at once, and gives it here.
 * stats_close prints the summary line (always to the debug log) and,
 * to the file, the summary and the counters; returns -1 if the file
 * could not be written.
 */
extern void stats_set_file (FILE *fp, const char *path);
extern int stats_close (const struct stats_sources *src);

/* ---- Connections ------------------------------------------------------- */

/* The kind of export a connection has (views.h). */
enum export_kind {
  EXPORT_DISK,                  /* "": the disk, with the map */
  EXPORT_PASSTHROUGH,           /* another name: the plugin's */
  EXPORT_SINCE,                 /* "@since:X" */
  EXPORT_FROZEN,                /* "@frozen" */
  EXPORT_FROZEN_SINCE,          /* "@frozen:since:X" */
};

/* Per-connection handle. */
struct sb_handle {
  enum export_kind kind;
  char *exportname;
  uint64_t size;                /* of this connection's export */
  /* EXPORT_DISK: the disk's map and scan cache (set in .prepare). */
  struct blockmap *bm;
  struct scancache *sc;
  /* The views: the checkpoints and the frozen disk they are bound to. */
  const char *since_name;       /* X, in EXPORTNAME */
  struct checkpoint_ref since;
  struct checkpoint_ref until;  /* the frozen backup's checkpoint */
  struct frozen_view frozen;    /* the frozen disk */
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

/* ---- Read side (read.c): the disk through the map (EXPORT_DISK) ----- */

extern int mapped_pread (nbdkit_next *next, struct sb_handle *h,
                       void *buf, uint32_t count, uint64_t offset,
                       uint32_t flags, int *err);
extern int mapped_extents (nbdkit_next *next, struct sb_handle *h,
                         uint32_t count, uint64_t offset, uint32_t flags,
                         struct nbdkit_extents *extents, int *err);
extern int mapped_cache (nbdkit_next *next, struct sb_handle *h,
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
