/* nbdkit-sparsebackup-filter: every sparsebackup-* parameter.
 *
 * .config parses each key into the cfg_* variables (declared in
 * internal.h), .config_complete checks the combinations and opens
 * the statistics file (so that a bad path fails at once); the cbt file,
 * the control socket and the scratch file are opened at start-up by
 * their modules.  Every value named in an error is quoted as the user
 * gave it.
 *
 * The files of the filter must not be files the plugin serves: every
 * other parameter whose value names an existing regular file is
 * remembered (file=disk.img, the qcow2 plugin's file=...), and
 * config_check_clash refuses a file of ours that is one of them, or
 * another file of ours.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE 1     /* asprintf */
#endif
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

#include "vector.h"
#include "internal.h"

uint32_t cfg_block_size = 0;
enum detect_zeroes_mode cfg_detect_zeroes = DZ_UNMAP;
enum no_hole_mode cfg_no_hole = NH_HONOUR;
enum scan_mode cfg_scan = SCAN_AUTO;
uint64_t cfg_scan_max = 32 * 1024 * 1024;
uint64_t cfg_scan_cache = 64 * 1024 * 1024;
uint64_t cfg_map_memory = 64 * 1024 * 1024;
int64_t cfg_min_zero_extent = -1;

char *cfg_cbt_path = NULL;
uint32_t cfg_cbt_gran = 0;
enum cbt_mode cfg_cbt_mode = CBT_MODE_PROCESS_SAFE;
bool cfg_cbt_reset = false;
char *cfg_cbt_id = NULL;
char *cfg_control_path = NULL;
char *cfg_scratch_path = NULL;
uint64_t cfg_scratch_size = UINT64_MAX;
enum scratch_error cfg_scratch_error = SE_BREAK;

/* The value of sparsebackup-scan-max as given, for the late check. */
static char *scan_max_str = NULL;
static char *stats_path = NULL;

/* The regular files other parameters name. */
struct named_file {
  dev_t dev;
  ino_t ino;
  char *param;                  /* "KEY=VALUE" */
};
DEFINE_VECTOR (named_file_vector, struct named_file);
static named_file_vector named_files = VECTOR_INIT;

#define MIN_MAP_MEMORY (64 * 1024)

int
parse_choice (const char *key, const char *value,
              const struct sb_choice *choices, int *r)
{
  char list[256] = "";
  size_t i, len = 0;

  for (i = 0; choices[i].name != NULL; ++i) {
    if (strcmp (value, choices[i].name) == 0) {
      *r = choices[i].value;
      return 0;
    }
    if (!choices[i].alias && len < sizeof list)
      len += snprintf (list + len, sizeof list - len, "%s%s",
                       len ? ", " : "", choices[i].name);
  }
  nbdkit_error ("%s: '%s' is not one of %s", key, value, list);
  return -1;
}

static int
parse_size_key (const char *key, const char *value, int64_t *r)
{
  int64_t v = nbdkit_parse_size (value);

  if (v == -1) {
    nbdkit_error ("%s: '%s' is not a valid size", key, value);
    return -1;
  }
  *r = v;
  return 0;
}

/* *P = a copy of VALUE. */
static int
set_string (char **p, const char *value)
{
  char *s = strdup (value);

  if (s == NULL) {
    nbdkit_error ("strdup: %m");
    return -1;
  }
  free (*p);
  *p = s;
  return 0;
}

/* *P = VALUE as an absolute path: the files are opened after nbdkit
 * may have changed to "/" (it does when it forks into the background),
 * so a relative name is taken from the start directory now.
 */
static int
set_path (char **p, const char *key, const char *value)
{
  char *abs;

  if (value[0] == '\0') {
    nbdkit_error ("%s: '%s' is not a file name", key, value);
    return -1;
  }
  abs = nbdkit_absolute_path (value);
  if (abs == NULL) {
    nbdkit_error ("%s: '%s': cannot make an absolute path", key, value);
    return -1;
  }
  free (*p);
  *p = abs;
  return 0;
}

static int
config_block_size (const char *key, const char *value)
{
  int64_t v;

  if (parse_size_key (key, value, &v) == -1)
    return -1;
  if (v < MIN_BLOCK_SIZE || v > MAX_BLOCK_SIZE || !is_power_of_2 (v)) {
    nbdkit_error ("%s: '%s' is not a power of 2 between 512 and 2M",
                  key, value);
    return -1;
  }
  cfg_block_size = v;
  return 0;
}

static int
config_cbt_granularity (const char *key, const char *value)
{
  int64_t v;

  if (parse_size_key (key, value, &v) == -1)
    return -1;
  if (v < CBT_MIN_GRANULARITY || v > CBT_MAX_GRANULARITY ||
      !is_power_of_2 (v)) {
    nbdkit_error ("%s: '%s' is not a power of 2 between 512 and 1G",
                  key, value);
    return -1;
  }
  cfg_cbt_gran = v;
  return 0;
}

static int
config_cbt_id (const char *key, const char *value)
{
  size_t n = strlen (value);

  if (n > CBT_IDENTITY_MAX) {
    nbdkit_error ("%s: '%.40s...' is longer than %d bytes",
                  key, value, CBT_IDENTITY_MAX);
    return -1;
  }
  for (size_t i = 0; i < n; ++i)
    if (value[i] < 0x20 || value[i] > 0x7e) {
      nbdkit_error ("%s: '%s' holds a byte outside printable ASCII "
                    "(0x%02x at %zu)", key, value,
                    (unsigned char) value[i], i);
      return -1;
    }
  return set_string (&cfg_cbt_id, value);
}

static int
config_control (const char *key, const char *value)
{
  if (value[0] == '\0') {
    nbdkit_error ("%s: '%s' is not a socket path", key, value);
    return -1;
  }
  if (set_path (&cfg_control_path, key, value) == -1)
    return -1;
  if (strlen (cfg_control_path) >= CONTROL_PATH_MAX) {
    nbdkit_error ("%s: '%s' is longer than a Unix socket path can be "
                  "(%d bytes%s)", key, value, CONTROL_PATH_MAX - 1,
                  value[0] == '/' ? "" : " as an absolute path");
    free (cfg_control_path);
    cfg_control_path = NULL;
    return -1;
  }
  return 0;
}

/* Remember VALUE if it names an existing regular file. */
static int
remember_file (const char *key, const char *value)
{
  struct named_file f;
  struct stat st;

  if (stat (value, &st) == -1 || !S_ISREG (st.st_mode))
    return 0;
  f.dev = st.st_dev;
  f.ino = st.st_ino;
  if (asprintf (&f.param, "%s=%s", key, value) == -1) {
    nbdkit_error ("asprintf: %m");
    return -1;
  }
  if (named_file_vector_append (&named_files, f) == -1) {
    nbdkit_error ("realloc: %m");
    free (f.param);
    return -1;
  }
  return 0;
}

/* The same file as ST. */
static bool
same_file (const struct stat *st, const char *path)
{
  struct stat other;

  return path && stat (path, &other) == 0 &&
    other.st_dev == st->st_dev && other.st_ino == st->st_ino;
}

int
config_check_clash (const char *key, const char *path,
                    const struct stat *st)
{
  const struct { const char *key; const char *path; } ours[] = {
    { "sparsebackup-cbt", cfg_cbt_path },
    { "sparsebackup-scratch", cfg_scratch_path },
    { "sparsebackup-statsfile", stats_path },
  };

  for (size_t i = 0; i < named_files.len; ++i)
    if (named_files.ptr[i].dev == st->st_dev &&
        named_files.ptr[i].ino == st->st_ino) {
      nbdkit_error ("%s: '%s' is the file of the parameter %s: refused "
                    "(it would be overwritten)", key, path,
                    named_files.ptr[i].param);
      return -1;
    }
  for (size_t i = 0; i < sizeof ours / sizeof ours[0]; ++i)
    if (strcmp (key, ours[i].key) != 0 && same_file (st, ours[i].path)) {
      nbdkit_error ("%s: '%s' is the same file as %s=%s: refused (give "
                    "each its own file)", key, path, ours[i].key,
                    ours[i].path);
      return -1;
    }
  return 0;
}

int
sparsebackup_config (nbdkit_next_config *next, nbdkit_backend *nxdata,
                     const char *key, const char *value)
{
  static const struct sb_choice detect_zeroes[] = {
    { "unmap", DZ_UNMAP, false }, { "on", DZ_ON, false },
    { "off", DZ_OFF, false }, { NULL, 0, false },
  };
  static const struct sb_choice no_hole[] = {
    { "honour", NH_HONOUR, false }, { "honor", NH_HONOUR, true },
    { "ignore", NH_IGNORE, false }, { NULL, 0, false },
  };
  static const struct sb_choice scan[] = {
    { "auto", SCAN_AUTO, false }, { "always", SCAN_ALWAYS, false },
    { "never", SCAN_NEVER, false }, { NULL, 0, false },
  };
  static const struct sb_choice cbt_mode[] = {
    { "in-use", CBT_MODE_IN_USE, false },
    { "write-ahead", CBT_MODE_WRITE_AHEAD, false },
    { "process-safe", CBT_MODE_PROCESS_SAFE, false },
    { NULL, 0, false },
  };
  static const struct sb_choice scratch_error[] = {
    { "break-backup", SE_BREAK, false },
    { "fail-write", SE_FAIL_WRITE, false },
    { NULL, 0, false },
  };
  int64_t v;
  int r, c;

  if (strcmp (key, "sparsebackup-block-size") == 0)
    return config_block_size (key, value);
  if (strcmp (key, "sparsebackup-detect-zeroes") == 0) {
    if (parse_choice (key, value, detect_zeroes, &c) == -1)
      return -1;
    cfg_detect_zeroes = c;
    return 0;
  }
  if (strcmp (key, "sparsebackup-no-hole") == 0) {
    if (parse_choice (key, value, no_hole, &c) == -1)
      return -1;
    cfg_no_hole = c;
    return 0;
  }
  if (strcmp (key, "sparsebackup-scan") == 0) {
    if (parse_choice (key, value, scan, &c) == -1)
      return -1;
    cfg_scan = c;
    return 0;
  }
  if (strcmp (key, "sparsebackup-scan-max") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v < MIN_BLOCK_SIZE) {
      nbdkit_error ("%s: '%s' is smaller than the block size", key, value);
      return -1;
    }
    cfg_scan_max = v;
    return set_string (&scan_max_str, value);
  }
  if (strcmp (key, "sparsebackup-scan-cache") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    cfg_scan_cache = v;
    return 0;
  }
  if (strcmp (key, "sparsebackup-map-memory") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v < MIN_MAP_MEMORY) {
      nbdkit_error ("%s: '%s' is smaller than the minimum, 64K", key, value);
      return -1;
    }
    cfg_map_memory = v;
    return 0;
  }
  if (strcmp (key, "sparsebackup-min-zero-extent") == 0) {
    if (strcmp (value, "auto") == 0) {
      cfg_min_zero_extent = -1;
      return 0;
    }
    return parse_size_key (key, value, &cfg_min_zero_extent);
  }
  if (strcmp (key, "sparsebackup-statsfile") == 0)
    return set_path (&stats_path, key, value);
  if (strcmp (key, "sparsebackup-cbt") == 0)
    return set_path (&cfg_cbt_path, key, value);
  if (strcmp (key, "sparsebackup-cbt-granularity") == 0)
    return config_cbt_granularity (key, value);
  if (strcmp (key, "sparsebackup-cbt-mode") == 0) {
    if (parse_choice (key, value, cbt_mode, &c) == -1)
      return -1;
    cfg_cbt_mode = c;
    return 0;
  }
  if (strcmp (key, "sparsebackup-cbt-reset") == 0) {
    r = nbdkit_parse_bool (value);
    if (r == -1) {
      nbdkit_error ("%s: '%s' is not a boolean", key, value);
      return -1;
    }
    cfg_cbt_reset = r;
    return 0;
  }
  if (strcmp (key, "sparsebackup-cbt-id") == 0)
    return config_cbt_id (key, value);
  if (strcmp (key, "sparsebackup-control") == 0)
    return config_control (key, value);
  if (strcmp (key, "sparsebackup-scratch") == 0)
    return set_path (&cfg_scratch_path, key, value);
  if (strcmp (key, "sparsebackup-scratch-size") == 0) {
    if (parse_size_key (key, value, &v) == -1)
      return -1;
    if (v == 0) {
      nbdkit_error ("%s: '%s': the scratch file needs room (at least one "
                    "granule)", key, value);
      return -1;
    }
    cfg_scratch_size = v;
    return 0;
  }
  if (strcmp (key, "sparsebackup-scratch-error") == 0) {
    if (parse_choice (key, value, scratch_error, &c) == -1)
      return -1;
    cfg_scratch_error = c;
    return 0;
  }
  if (strncmp (key, "sparsebackup-", 13) == 0) {
    nbdkit_error ("%s: unknown sparsebackup parameter (value '%s')",
                  key, value);
    return -1;
  }
  if (remember_file (key, value) == -1)
    return -1;
  return next (nxdata, key, value);
}

/* Open (create, or empty) the statistics file PATH, never through a
 * symbolic link, and give it to stats.c.
 */
static int
open_stats (const char *path)
{
  struct stat st;
  FILE *fp;
  int fd;

  fd = open (path, O_WRONLY | O_CREAT | O_NOFOLLOW | O_CLOEXEC, 0644);
  if (fd == -1 && errno == ELOOP) {
    nbdkit_error ("sparsebackup-statsfile: '%s' is a symbolic link: "
                  "refused (name the file itself)", path);
    return -1;
  }
  if (fd == -1) {
    nbdkit_error ("sparsebackup-statsfile: cannot open '%s': %m", path);
    return -1;
  }
  if (fstat (fd, &st) == -1) {
    nbdkit_error ("sparsebackup-statsfile: '%s': %m", path);
    close (fd);
    return -1;
  }
  if (config_check_clash ("sparsebackup-statsfile", path, &st) == -1) {
    close (fd);
    return -1;
  }
  /* A regular file is written afresh; a device or a pipe as it is. */
  if ((S_ISREG (st.st_mode) && ftruncate (fd, 0) == -1) ||
      (fp = fdopen (fd, "w")) == NULL) {
    nbdkit_error ("sparsebackup-statsfile: cannot write '%s': %m", path);
    close (fd);
    return -1;
  }
  stats_set_file (fp, path);
  return 0;
}

int
sparsebackup_config_complete (nbdkit_next_config_complete *next,
                              nbdkit_backend *nxdata)
{
  /* With the automatic block size, the smallest it can be is 4K. */
  uint32_t b = cfg_block_size ? cfg_block_size : DEFAULT_BLOCK_SIZE;

  if (cfg_scan_max < b) {
    nbdkit_error ("sparsebackup-scan-max: '%s' is smaller than "
                  "the block size (%" PRIu32 ")",
                  scan_max_str ? scan_max_str : "?", b);
    return -1;
  }
  if (cfg_control_path && cfg_cbt_path == NULL) {
    nbdkit_error ("sparsebackup-control: '%s' needs sparsebackup-cbt=FILE",
                  cfg_control_path);
    return -1;
  }
  if (cfg_scratch_path &&
      (cfg_cbt_path == NULL || cfg_control_path == NULL)) {
    nbdkit_error ("sparsebackup-scratch: '%s' needs sparsebackup-cbt=FILE "
                  "and sparsebackup-control=SOCKET (backups begin with "
                  "backup-begin)", cfg_scratch_path);
    return -1;
  }
  if (stats_path && open_stats (stats_path) == -1)
    return -1;
  return next (nxdata);
}

const char sparsebackup_config_help[] =
  "sparsebackup-block-size=<SIZE> Block size of the map (default 4K or the\n"
  "                               plugin's preferred block size, max 2M).\n"
  "sparsebackup-detect-zeroes=unmap|on|off\n"
  "                               Turn zero blocks of writes into zero\n"
  "                               requests (default unmap).\n"
  "sparsebackup-no-hole=honour|ignore\n"
  "                               Honour NO_HOLE on zero requests (default).\n"
  "sparsebackup-scan=auto|always|never\n"
  "                               Read blocks to learn which are zero\n"
  "                               (default auto).\n"
  "sparsebackup-scan-max=<SIZE>   Bytes scanned per extents request (32M).\n"
  "sparsebackup-scan-cache=<SIZE> Cache of scanned data, 0 disables (64M).\n"
  "sparsebackup-map-memory=<SIZE> Memory budget of the map (64M).\n"
  "sparsebackup-min-zero-extent=<SIZE>|auto\n"
  "                               Shorter zero runs inside a block status\n"
  "                               reply are reported as data (auto: 256K\n"
  "                               for REQ_ONE clients, else exact).\n"
  "sparsebackup-statsfile=<FILE>  Write statistics to FILE at exit.\n"
  "sparsebackup-cbt=<FILE>        Record every change in FILE (changed-block\n"
  "                               tracking, delta views @since:CHECKPOINT).\n"
  "sparsebackup-cbt-granularity=<SIZE>\n"
  "                               Bytes per tracked granule (64K).\n"
  "sparsebackup-cbt-mode=in-use|process-safe|write-ahead\n"
  "                               Durability of the record (process-safe).\n"
  "sparsebackup-cbt-reset=true    Discard what FILE holds.\n"
  "sparsebackup-cbt-id=<STRING>   Identity of the disk stored in FILE.\n"
  "sparsebackup-control=<SOCKET>  Serve the control protocol on SOCKET.\n"
  "sparsebackup-scratch=<FILE>    Point-in-time backups (@frozen): save\n"
  "                               the old data of changes in FILE.\n"
  "sparsebackup-scratch-size=<SIZE>\n"
  "                               At most SIZE bytes in FILE (no limit).\n"
  "sparsebackup-scratch-error=break-backup|fail-write\n"
  "                               When FILE is full or fails (break-backup).";

void
config_free (void)
{
  free (scan_max_str);
  free (cfg_cbt_path);
  free (cfg_cbt_id);
  free (cfg_control_path);
  free (cfg_scratch_path);
  free (stats_path);
  scan_max_str = cfg_cbt_path = cfg_cbt_id = NULL;
  cfg_control_path = cfg_scratch_path = stats_path = NULL;
  for (size_t i = 0; i < named_files.len; ++i)
    free (named_files.ptr[i].param);
  named_file_vector_reset (&named_files);
}
