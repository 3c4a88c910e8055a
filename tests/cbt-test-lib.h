/* sparsebackup: helpers shared by the cbt unit tests (test-cbt.c,
 * test-cbt-load.c, test-cbt-replay.c): the temporary file, opening and
 * closing it, the set as granules (changed_since), the geometry of the
 * test disk, the file as bytes (read, write, find the active superblock,
 * table entries, record indexes, fix crcs, a known good file), and a
 * writer of version 1 files (which the library only reads).
 *
 *   #define TEST_NAME "test-cbt-foo"
 *   #include "cbt-test-lib.h"
 *
 * The file layout used to corrupt fields is the one documented in
 * doc/cbt-format.md (cbt-format.h).
 */

#ifndef SPARSEBACKUP_CBT_TEST_LIB_H
#define SPARSEBACKUP_CBT_TEST_LIB_H

#include <fcntl.h>
#include <inttypes.h>
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

static char tmpdir[] = "/tmp/test-cbt.XXXXXX";
static char path[256];
static char err[CBT_ERRLEN];

static inline uint32_t get32 (const uint8_t *p) { uint32_t v; memcpy (&v, p, 4); return v; }
static inline uint64_t get64 (const uint8_t *p) { uint64_t v; memcpy (&v, p, 8); return v; }
static inline void put32 (uint8_t *p, uint32_t v) { memcpy (p, &v, 4); }
static inline void put64 (uint8_t *p, uint64_t v) { memcpy (p, &v, 8); }

#define BOOT_A "test-boot-a"
#define BOOT_B "test-boot-b"

static inline struct cbt_options
options (uint64_t disk_size, uint32_t gran, enum cbt_mode mode)
{
  struct cbt_options o = {
    .disk_size = disk_size, .granularity = gran, .identity = "disk-1",
    .mode = mode, .boot_id = BOOT_A, .create = true,
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

/* 512 byte granules, four bitmap pages (32768 granules each), the last
 * short, and a partial last granule.
 */
#define GRAN 512
#define NR_GRAN (3 * 32768 + 1234)
#define DISK ((uint64_t) (NR_GRAN - 1) * GRAN + 234)
#define BM_BYTES ((NR_GRAN + 7) / 8)
#define NR_PAGES ((BM_BYTES + PAGE - 1) / PAGE)
#define PAGE_LEN(p) ((p) + 1 < NR_PAGES ? PAGE : BM_BYTES - (p) * PAGE)
#define DIR_BYTES (NR_PAGES * DIR_SIZE)
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
  *buf = malloc (*len ? *len : 1);
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

static inline uint64_t
file_size (void)
{
  struct stat st;

  return stat (path, &st) == 0 ? (uint64_t) st.st_size : 0;
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

/* Index entry J of checkpoint I's record. */
static inline uint8_t *
idx (uint8_t *f, unsigned i, unsigned j)
{
  return f + get64 (entry (f, i) + CP_IDX_OFF) + j * IDX_SIZE;
}

/* Fix the index crc of entry I (then the table). */
static inline void
fix_index (uint8_t *f, unsigned i)
{
  uint8_t *e = entry (f, i);
  put32 (e + CP_IDX_CRC, crc (f + get64 (e + CP_IDX_OFF),
                              get32 (e + CP_IDX_COUNT) * IDX_SIZE));
  fix_table (f);
}

/* Fix the crc of page J of checkpoint I's record (then the index). */
static inline void
fix_page (uint8_t *f, unsigned i, unsigned j)
{
  uint8_t *x = idx (f, i, j);
  uint32_t p = get32 (x + IDX_PAGE);
  put32 (x + IDX_CRC, crc (f + get64 (x + IDX_OFF), PAGE_LEN (p)));
  fix_index (f, i);
}

/* The current directory's entry for page P. */
static inline uint8_t *
cur_dir (uint8_t *f, unsigned p)
{
  return f + get64 (active_sb (f) + SB_CUR_OFF) + p * DIR_SIZE;
}

static inline uint32_t
dir_check (uint32_t page, uint32_t blk)
{
  uint8_t b[8];
  put32 (b, page);
  put32 (b + 4, blk);
  return crc (b, 8);
}

/* The crc of the current record as stored clean. */
static inline void
fix_cur (uint8_t *f)
{
  uint8_t *sb = active_sb (f);
  uint8_t *d = f + get64 (sb + SB_CUR_OFF);
  uint32_t r = (uint32_t) crc32 (0, d, DIR_BYTES);

  for (unsigned p = 0; p < NR_PAGES; ++p) {
    uint32_t b = get32 (d + p * DIR_SIZE);
    if (b)
      r = (uint32_t) crc32 (r, f + (uint64_t) b * BLOCK, PAGE_LEN (p));
  }
  put32 (sb + SB_CUR_CRC, r);
  fix_sb (sb);
}

/* Granule G of page P's range: a mark there touches page P. */
#define IN_PAGE(p, k) ((uint64_t) (p) * 32768 + (k))

static inline void
make_good (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt *c;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_mark (c, 0, 10 * GRAN, NULL) == 0);
  CHECK (cbt_mark (c, IN_PAGE (2, 7) * GRAN, GRAN, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, IN_PAGE (1, 100) * GRAN, 1, NULL) == 0);
  CHECK (cbt_mark (c, IN_PAGE (2, 900) * GRAN, 1, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "b", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, IN_PAGE (1, 200) * GRAN, 3 * GRAN, NULL) == 0);
  CHECK (cbt_mark (c, IN_PAGE (3, 1) * GRAN, 3 * GRAN, NULL) == 0);
  CHECK (cbt_checkpoint_create (c, "c", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, DISK - 1, 1, NULL) == 0);
  CHECK (cbt_mark (c, IN_PAGE (0, 5000) * GRAN, 1, NULL) == 0);
  xclose (c);
  free (good);
  read_file (&good, &good_len);
}

/* ---- Version 1 files ------------------------------------------------ */

/* A version 1 file (doc/cbt-format.md, "Version 1") of the test disk:
 * checkpoints NAMES[0..N-1] (PENDING: the last is pending), frozen
 * bitmaps BMS[0..N-2] (BM_BYTES each), current bitmap CUR; marked in
 * use (IN_USE; with WAL the write-ahead compatible bit).  Written at
 * PATH.
 */
static inline void
write_v1 (const char *const *names, unsigned n, bool pending,
          uint8_t *const *bms, const uint8_t *cur, bool in_use, bool wal)
{
  const uint64_t bm = (BM_BYTES + 4095) / 4096 * 4096;
  const uint64_t table = DATA_START;
  const uint64_t first = DATA_START + 4096;
  uint64_t cur_off = first + (n > 1 ? n - 1 : 0) * bm;
  size_t len = cur_off + BM_BYTES;
  uint8_t *f = calloc (1, len), *sb = f;
  const char id[] = "disk-1";

  for (unsigned i = 0; i < n; ++i) {
    uint8_t *e = f + table + i * ENTRY_SIZE;
    memcpy (e + CP_NAME, names[i], strlen (names[i]));
    put32 (e + CP_STATE, pending && i + 1 == n ? 2 : 1);
    put64 (e + CP_CREATED, 1700000000 + i);
    if (i + 1 < n) {
      memcpy (f + first + i * bm, bms[i], BM_BYTES);
      put64 (e + CP1_BM_OFF, first + i * bm);
      put32 (e + CP1_BM_CRC, crc (bms[i], BM_BYTES));
    }
  }
  memcpy (f + cur_off, cur, BM_BYTES);
  memcpy (sb + SB_MAGIC, "SBKCBT\r\n", 8);
  put32 (sb + SB_VERSION, 1);
  put32 (sb + SB_HEADER_SIZE, SB_SIZE);
  put64 (sb + SB_SEQ, 7);
  put64 (sb + SB_INCOMPAT, in_use ? 1 : 0);
  put64 (sb + SB_COMPAT, wal ? 1 : 0);
  put64 (sb + SB_DISK_SIZE, DISK);
  put32 (sb + SB_GRAN_BITS, 9);
  put32 (sb + SB_NR_CPS, n);
  put64 (sb + SB_TABLE_OFF, n ? table : 0);
  put32 (sb + SB_TABLE_SIZE, n * ENTRY_SIZE);
  put32 (sb + SB_TABLE_CRC, n ? crc (f + table, n * ENTRY_SIZE) : 0);
  put64 (sb + SB_CUR_OFF, cur_off);
  put32 (sb + SB_CUR_CRC, in_use ? 0 : crc (cur, BM_BYTES));
  put32 (sb + SB_ID_LEN, sizeof id - 1);
  memcpy (sb + SB_ID, id, sizeof id - 1);
  fix_sb (sb);
  write_file (f, len);
  free (f);
}

/* Set granules [G, G+N) in bitmap BM. */
static inline void
bm_set (uint8_t *bm, uint64_t g, uint64_t n)
{
  for (uint64_t k = g; k < g + n; ++k)
    bm[k / 8] |= 1u << (k % 8);
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
