/* sparsebackup: helpers shared by the cbt unit tests (test-cbt.c,
 * test-cbt-load.c): the temporary file, opening and closing it, the set
 * as granules (changed_since), the geometry of the test disk, and the
 * file as bytes (read, write, find the active superblock, fix crcs, a
 * known good file).
 *
 *   #define TEST_NAME "test-cbt-foo"
 *   #include "cbt-test-lib.h"
 *
 * The file layout used to corrupt fields is the one documented in
 * doc/cbt-format.md (cbt-format.h).
 */

#ifndef SPARSEBACKUP_CBT_TEST_LIB_H
#define SPARSEBACKUP_CBT_TEST_LIB_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <zlib.h>

#include "cbt.h"
#include "unit-test.h"

/* Layout (doc/cbt-format.md). */
#include "cbt-format.h"
#define CP_RESERVED 100

static char tmpdir[] = "/tmp/test-cbt.XXXXXX";
static char path[256];
static char err[CBT_ERRLEN];

static inline uint32_t get32 (const uint8_t *p) { uint32_t v; memcpy (&v, p, 4); return v; }
static inline uint64_t get64 (const uint8_t *p) { uint64_t v; memcpy (&v, p, 8); return v; }
static inline void put32 (uint8_t *p, uint32_t v) { memcpy (p, &v, 4); }
static inline void put64 (uint8_t *p, uint64_t v) { memcpy (p, &v, 8); }

static inline struct cbt_options
options (uint64_t disk_size, uint32_t gran, enum cbt_mode mode)
{
  struct cbt_options o = {
    .disk_size = disk_size, .granularity = gran, .identity = "disk-1",
    .mode = mode, .create = true,
  };
  return o;
}

static inline struct cbt *
xopen (const struct cbt_options *o, struct cbt_load_info *info)
{
  struct cbt *c;

  if (cbt_open (path, o, &c, info, err, sizeof err) == -1) {
    FAIL ("cbt_open: %s", err);
    exit (EXIT_FAILURE);
  }
  return c;
}

static inline void
xclose (struct cbt *c)
{
  if (cbt_close (c, err, sizeof err) == -1)
    FAIL ("cbt_close: %s", err);
}

/* ---- The set, as granules ------------------------------------------ */

struct set_ctx {
  uint8_t *g;                   /* one byte per granule */
  uint64_t nr, gran, disk_size, next;
  bool bad;
};

static inline int
collect (uint64_t off, uint64_t len, void *opaque)
{
  struct set_ctx *s = opaque;

  if (len == 0 || off < s->next || (s->next > 0 && off == s->next) ||
      off % s->gran != 0 || off + len > s->disk_size ||
      (len % s->gran != 0 && off + len != s->disk_size)) {
    fprintf (stderr, "test-cbt: bad extent [%" PRIu64 ", +%" PRIu64 ")\n",
             off, len);
    s->bad = true;
  }
  for (uint64_t g = off / s->gran; g < s->nr && g * s->gran < off + len; ++g)
    s->g[g] = 1;
  s->next = off + len;
  return 0;
}

/* The granules changed since NAME, one byte each (caller frees). */
static inline uint8_t *
changed_since (struct cbt *c, const char *name)
{
  struct set_ctx s = {
    .gran = cbt_granularity (c), .disk_size = cbt_disk_size (c),
  };

  s.nr = (s.disk_size + s.gran - 1) / s.gran;
  s.g = calloc (s.nr, 1);
  if (cbt_map (c, name, collect, &s, err, sizeof err) == -1)
    FAIL ("cbt_map since %s: %s", name, err);
  CHECK (!s.bad);
  return s.g;
}

/* ---- The test disk ------------------------------------------------ */

#define NR_GRAN 700
#define GRAN 4096
#define DISK ((uint64_t) (NR_GRAN - 1) * GRAN + 1234)  /* partial last */
#define MAX_CPS 8

/* ---- The file as bytes --------------------------------------------- */

static uint8_t *good;           /* a valid file: 3 checkpoints */
static size_t good_len;

static inline void
read_file (uint8_t **buf, size_t *len)
{
  struct stat st;
  int fd = open (path, O_RDONLY);

  if (fd == -1 || fstat (fd, &st) == -1)
    exit (EXIT_FAILURE);
  *len = (size_t) st.st_size;
  *buf = malloc (*len);
  if (pread (fd, *buf, *len, 0) != (ssize_t) *len)
    exit (EXIT_FAILURE);
  close (fd);
}

static inline void
write_file (const uint8_t *buf, size_t len)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

  if (fd == -1 || write (fd, buf, len) != (ssize_t) len)
    exit (EXIT_FAILURE);
  close (fd);
}

static inline uint32_t
crc (const uint8_t *p, size_t len)
{
  return (uint32_t) crc32 (0, p, (uInt) len);
}

/* The newest valid superblock. */
static inline uint8_t *
active_sb (uint8_t *f)
{
  uint8_t *a = f, *b = f + SB_SIZE;
  bool va = get32 (a + SB_CRC) == crc (a, SB_CRC);
  bool vb = get32 (b + SB_CRC) == crc (b, SB_CRC);

  if (va && vb)
    return get64 (a + SB_SEQ) > get64 (b + SB_SEQ) ? a : b;
  return va ? a : b;
}

static inline void
fix_sb (uint8_t *sb)
{
  put32 (sb + SB_CRC, crc (sb, SB_CRC));
}

/* Fix the table crc in the superblock, then the superblock crc. */
static inline void
fix_table (uint8_t *f)
{
  uint8_t *sb = active_sb (f);
  put32 (sb + SB_TABLE_CRC, crc (f + get64 (sb + SB_TABLE_OFF),
                                 get32 (sb + SB_TABLE_SIZE)));
  fix_sb (sb);
}

static inline uint8_t *
entry (uint8_t *f, unsigned i)
{
  return f + get64 (active_sb (f) + SB_TABLE_OFF) + i * ENTRY_SIZE;
}

/* Fix the crc of the frozen bitmap of entry I. */
static inline void
fix_bitmap (uint8_t *f, unsigned i)
{
  uint8_t *e = entry (f, i);
  put32 (e + CP_BM_CRC, crc (f + get64 (e + CP_BM_OFF), (NR_GRAN + 7) / 8));
  fix_table (f);
}

static inline void
make_good (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt *c;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_mark (c, 0, 10 * GRAN, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 100 * GRAN, 1, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "b", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 200 * GRAN, 3 * GRAN, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "c", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, DISK - 1, 1, NULL) == 0);
  xclose (c);
  free (good);
  read_file (&good, &good_len);
}

/* ---- Start and end of a test program -------------------------------- */

/* Make the temporary directory; the cbt file is PATH inside it. */
static inline void
cbt_test_start (void)
{
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    exit (EXIT_FAILURE);
  }
  snprintf (path, sizeof path, "%s/cbt", tmpdir);
}

/* Remove the file and the directory, say how it went; main's status. */
static inline int
cbt_test_end (void)
{
  unlink (path);
  rmdir (tmpdir);
  if (failures) {
    fprintf (stderr, TEST_NAME ": %u failures\n", failures);
    return EXIT_FAILURE;
  }
  printf (TEST_NAME ": PASS\n");
  return EXIT_SUCCESS;
}

#endif /* SPARSEBACKUP_CBT_TEST_LIB_H */
