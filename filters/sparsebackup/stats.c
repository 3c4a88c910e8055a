/* nbdkit-sparsebackup-filter: statistics.
 *
 * Counters are updated with relaxed atomics on the data paths and printed
 * at unload: a human summary line, then one "key: value" line per counter
 * for scripts, to the statistics file (sparsebackup-statsfile=, opened at
 * start-up so that a bad path fails at once) and, with
 * -D sparsebackup.stats=1, to the debug log.  What the modules count
 * themselves (the map, the tracker, the scan cache, the cbt file) is
 * given by the caller (struct stats_sources), read before they are
 * freed: a leaf, it calls no other file of the filter.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <inttypes.h>
#include <string.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/stat.h>

#include <nbdkit-filter.h>

#include "changes.h"
#include "internal.h"

struct sb_stats stats;

static FILE *statsfp = NULL;
static char *statsfile = NULL;

void
stats_set_file (FILE *fp, const char *path)
{
  statsfp = fp;
  free (statsfile);
  statsfile = strdup (path);
}

/* 1536 -> "1.5 KiB": binary units, one decimal. */
static void
human_size (char *buf, size_t len, uint64_t n)
{
  static const char *const units[] = { "KiB", "MiB", "GiB", "TiB", "PiB",
                                       "EiB" };
  double v = n;
  int u = -1;

  if (n < 1024) {
    snprintf (buf, len, "%" PRIu64 " B", n);
    return;
  }
  while (v >= 1024 && u < 5) {
    v /= 1024;
    u++;
  }
  snprintf (buf, len, "%.1f %s", v, units[u]);
}

#define LOAD(field) __atomic_load_n (&stats.field, __ATOMIC_RELAXED)

/* "saved X of Y read and X of Y written: ...": what the filter kept
 * from crossing to the plugin.  Read: the client's reads answered from
 * the map (zeros) or the scan cache, of all it read.  Written: the zero
 * blocks of client writes, sent as zero requests or skipped rather
 * than written as data, of all it wrote.
 */
static void
print_summary (FILE *fp)
{
  char rd[32], rs[32], pl[32], mp[32], ca[32], wt[32], wz[32], wd[32];
  char zr[32], sk[32];
  const uint64_t written = LOAD (write_data_bytes) + LOAD (write_zero_bytes);

  human_size (rd, sizeof rd, LOAD (read_bytes));
  human_size (rs, sizeof rs, LOAD (read_map_bytes) + LOAD (read_cache_bytes));
  human_size (pl, sizeof pl, LOAD (plugin_read_bytes));
  human_size (mp, sizeof mp, LOAD (read_map_bytes));
  human_size (ca, sizeof ca, LOAD (read_cache_bytes));
  human_size (wt, sizeof wt, written);
  human_size (wz, sizeof wz, LOAD (write_zero_bytes));
  human_size (wd, sizeof wd, LOAD (write_data_bytes));
  human_size (zr, sizeof zr, LOAD (zero_bytes));
  human_size (sk, sizeof sk, LOAD (zero_skipped_bytes));
  fprintf (fp, "sparsebackup: saved %s of %s read and %s of %s written: "
           "client reads answered %s from the map, %s from the scan cache, "
           "%s read from the plugin; %s of data written to the plugin, "
           "%s of zero blocks as zero requests; %s zeroed by the plugin, "
           "%s of zeroing skipped\n",
           rs, rd, wz, wt, mp, ca, pl, wd, wz, zr, sk);
}

/* The cbt counters, printed only with sparsebackup-cbt (all 0 when no
 * connection opened the file).  Read at stats_close, which runs before
 * cbt_unload closes the file.
 */
static void
print_cbt_stats (FILE *fp, const struct cbt_stats *ts)
{
  fprintf (fp, "cbt-marks: %" PRIu64 "\n", ts->marks);
  fprintf (fp, "cbt-commits: %" PRIu64 "\n", ts->commits);
  fprintf (fp, "cbt-syncs: %" PRIu64 "\n", ts->syncs);
  fprintf (fp, "cbt-pages-written: %" PRIu64 "\n", ts->pages_written);
}

static void
print_stats (FILE *fp, const struct stats_sources *src)
{
  static const struct blockmap_stats no_map;
  static const struct changes_stats no_changes;
  const struct blockmap_stats *bs = src->map ? src->map : &no_map;
  const struct changes_stats *cs = src->changes ? src->changes : &no_changes;

  fprintf (fp, "write-data-bytes: %" PRIu64 "\n", LOAD (write_data_bytes));
  fprintf (fp, "write-zero-bytes: %" PRIu64 "\n", LOAD (write_zero_bytes));
  fprintf (fp, "zero-bytes: %" PRIu64 "\n", LOAD (zero_bytes));
  fprintf (fp, "zero-skipped-bytes: %" PRIu64 "\n",
           LOAD (zero_skipped_bytes));
  fprintf (fp, "requests-avoided: %" PRIu64 "\n", LOAD (requests_avoided));
  fprintf (fp, "read-bytes: %" PRIu64 "\n", LOAD (read_bytes));
  fprintf (fp, "read-map-bytes: %" PRIu64 "\n", LOAD (read_map_bytes));
  fprintf (fp, "read-cache-bytes: %" PRIu64 "\n", LOAD (read_cache_bytes));
  fprintf (fp, "plugin-read-bytes: %" PRIu64 "\n", LOAD (plugin_read_bytes));
  fprintf (fp, "scan-bytes: %" PRIu64 "\n", LOAD (scan_bytes));
  fprintf (fp, "extents-calls: %" PRIu64 "\n", LOAD (extents_calls));
  fprintf (fp, "merged-zero-bytes: %" PRIu64 "\n", LOAD (merged_zero_bytes));
  fprintf (fp, "passthrough-requests: %" PRIu64 "\n",
           LOAD (passthrough_requests));
  fprintf (fp, "map-runs: %" PRIu64 "\n", bs->runs);
  fprintf (fp, "map-memory: %" PRIu64 "\n", bs->memory);
  fprintf (fp, "map-budget: %" PRIu64 "\n", bs->budget);
  fprintf (fp, "map-forgotten-bytes: %" PRIu64 "\n", bs->forgotten);
  fprintf (fp, "changes: %" PRIu64 "\n", cs->begun);
  if (src->cache) {
    fprintf (fp, "scan-cache-inserted: %" PRIu64 "\n", src->cache->inserted);
    fprintf (fp, "scan-cache-refused: %" PRIu64 "\n", src->cache->refused);
    fprintf (fp, "scan-cache-evicted: %" PRIu64 "\n", src->cache->evicted);
  }
  if (src->cbt)
    print_cbt_stats (fp, src->cbt);
  if (src->frozen) {
    fprintf (fp, "frozen-saved-bytes: %" PRIu64 "\n",
             LOAD (frozen_saved_bytes));
    fprintf (fp, "frozen-zero-bytes: %" PRIu64 "\n",
             LOAD (frozen_zero_bytes));
    fprintf (fp, "frozen-cbw-read-bytes: %" PRIu64 "\n",
             LOAD (frozen_cbw_read_bytes));
    fprintf (fp, "frozen-scratch-read-bytes: %" PRIu64 "\n",
             LOAD (frozen_scratch_read_bytes));
  }
}

/* Print everything to the debug log, line by line. */
static void
debug_stats (const struct stats_sources *src)
{
  char *s = NULL;
  size_t len = 0;
  FILE *fp = open_memstream (&s, &len);

  if (fp) {
    char *line, *saveptr = NULL;

    print_stats (fp, src);
    fclose (fp);
    for (line = strtok_r (s, "\n", &saveptr); line != NULL;
         line = strtok_r (NULL, "\n", &saveptr))
      nbdkit_debug ("sparsebackup: stats: %s", line);
  }
  free (s);
}

int
stats_close (const struct stats_sources *src)
{
  char *summary = NULL;
  size_t len = 0;
  FILE *mfp;
  int r = 0;

  if (src->bm && sparsebackup_debug_stats)
    nbdkit_debug ("sparsebackup: map of %" PRIu64 " bytes: "
                  "unknown %" PRIu64 ", allocated %" PRIu64 ", "
                  "data %" PRIu64 ", zero %" PRIu64,
                  blockmap_size (src->bm),
                  src->map->bytes[BM_UNKNOWN], src->map->bytes[BM_ALLOCATED],
                  src->map->bytes[BM_DATA], src->map->bytes[BM_ZERO]);

  mfp = open_memstream (&summary, &len);
  if (mfp) {
    print_summary (mfp);
    fclose (mfp);
    if (summary && len > 0 && summary[len - 1] == '\n')
      summary[len - 1] = '\0';
    nbdkit_debug ("%s", summary ? summary : "");
  }
  if (sparsebackup_debug_stats)
    debug_stats (src);

  if (statsfp) {
    fprintf (statsfp, "summary: %s\n", summary ? summary : "");
    print_stats (statsfp, src);
    if (ferror (statsfp) | (fflush (statsfp) == EOF) |
        (fsync (fileno (statsfp)) == -1 && errno != EINVAL)) {
      nbdkit_error ("sparsebackup-statsfile: cannot write '%s': %m",
                    statsfile);
      r = -1;
    }
    if (fclose (statsfp) == EOF && r == 0) {
      nbdkit_error ("sparsebackup-statsfile: cannot write '%s': %m",
                    statsfile);
      r = -1;
    }
    statsfp = NULL;
  }
  free (summary);
  free (statsfile);
  statsfile = NULL;
  return r;
}
