/* sparsebackup: unit tests of common/cbt*.c (persistent changed-block
 * tracking): the load checks.
 *
 *  - every superblock and table field corrupted in turn (with the crcs
 *    fixed up, so only the field check can catch it) must be refused
 *    with a message naming the field; a torn superblock falls back to
 *    the other copy; unknown compatible bits are kept, unknown
 *    autoclear bits cleared; reset starts afresh; the lock refuses a
 *    second open; identity / size mismatches; a file left by a kill
 *    during its creation (zeros, no superblock) is created afresh.
 *
 * The file layout used to corrupt fields is the one documented in
 * doc/cbt-format.md (cbt-format.h).  The other cbt tests are in
 * test-cbt.c, the shared helpers in cbt-test-lib.h.  Exit status 1 if
 * anything failed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <zlib.h>

#include "cbt.h"

#define TEST_NAME "test-cbt-load"
#include "cbt-test-lib.h"

/* ---- Corrupted files ----------------------------------------------- */

enum what {
  W_HDR,                        /* a superblock field: fix its crc */
  W_TABLE,                      /* a table field: fix the table crc */
  W_RAW,                        /* no fix-up */
};

struct corruption {
  const char *desc;
  enum what what;
  void (*apply) (uint8_t *f, uint8_t *sb);
  const char *expect;           /* in the message */
};

#define C(fn) static void fn (uint8_t *f, uint8_t *sb)
C (c_magic) { f[0] ^= 1; f[SB_SIZE] ^= 1; }
C (c_version) { put32 (sb + SB_VERSION, 2); }
C (c_header_size) { put32 (sb + SB_HEADER_SIZE, 512); }
C (c_incompat) { put64 (sb + SB_INCOMPAT, 1u << 5); }
C (c_gran_small) { put32 (sb + SB_GRAN_BITS, 8); }
C (c_gran_big) { put32 (sb + SB_GRAN_BITS, 40); }
C (c_gran_other) { put32 (sb + SB_GRAN_BITS, 13); }
C (c_disk_zero) { put64 (sb + SB_DISK_SIZE, 0); }
C (c_disk_other) { put64 (sb + SB_DISK_SIZE, DISK + 4096); }
C (c_disk_huge) { put64 (sb + SB_DISK_SIZE, UINT64_MAX); }
C (c_nr_big) { put32 (sb + SB_NR_CPS, 100000); }
C (c_nr_other) { put32 (sb + SB_NR_CPS, 2); }
C (c_table_off_unaligned) { put64 (sb + SB_TABLE_OFF, get64 (sb + SB_TABLE_OFF) + 8); }
C (c_table_off_past) { put64 (sb + SB_TABLE_OFF, 1u << 30); }
C (c_table_off_header) { put64 (sb + SB_TABLE_OFF, 4096); }
C (c_table_size) { put32 (sb + SB_TABLE_SIZE, 2 * ENTRY_SIZE); }
C (c_table_crc) { put32 (sb + SB_TABLE_CRC, get32 (sb + SB_TABLE_CRC) ^ 1); }
C (c_cur_off_past) { put64 (sb + SB_CUR_OFF, UINT64_MAX - 4095); }
C (c_cur_off_unaligned) { put64 (sb + SB_CUR_OFF, get64 (sb + SB_CUR_OFF) + 1); }
C (c_cur_off_table) { put64 (sb + SB_CUR_OFF, get64 (sb + SB_TABLE_OFF)); }
C (c_cur_crc) { put32 (sb + SB_CUR_CRC, get32 (sb + SB_CUR_CRC) ^ 1); }
C (c_id_len) { put32 (sb + SB_ID_LEN, 300); }
C (c_id_other) { sb[SB_ID] = 'X'; }
C (c_id_unprintable) { sb[SB_ID + 1] = 1; }
C (c_id_trailing) { sb[SB_ID + 200] = 'a'; }
C (c_reserved) { sb[SB_ID + 256 + 100] = 1; }
C (c_seq_same) { uint8_t *o = sb == f ? f + SB_SIZE : f;
  put64 (o + SB_SEQ, get64 (sb + SB_SEQ)); fix_sb (o); }
C (c_both_crc) { f[100] ^= 1; f[SB_SIZE + 100] ^= 1; }
C (c_name_space) { entry (f, 0)[1] = ' '; }
C (c_name_dash) { entry (f, 1)[0] = '-'; }
C (c_name_empty) { memset (entry (f, 0), 0, 64); }
C (c_name_dup) { memcpy (entry (f, 1), entry (f, 0), 64); }
C (c_name_unterminated) { memset (entry (f, 2), 'a', 64); }
C (c_name_garbage) { entry (f, 0)[60] = 'z'; }
C (c_state) { put32 (entry (f, 1) + CP_STATE, 7); }
C (c_state_pending) { put32 (entry (f, 0) + CP_STATE, 2); }
C (c_flags) { put32 (entry (f, 1) + CP_FLAGS, 1); }
C (c_reserved_entry) { entry (f, 2)[CP_RESERVED] = 1; }
C (c_bm_zero) { put64 (entry (f, 0) + CP_BM_OFF, 0); }
C (c_bm_unaligned) { put64 (entry (f, 0) + CP_BM_OFF, get64 (entry (f, 0) + CP_BM_OFF) + 512); }
C (c_bm_past) { put64 (entry (f, 1) + CP_BM_OFF, UINT64_C (1) << 40); }
C (c_bm_cur) { put64 (entry (f, 1) + CP_BM_OFF, get64 (sb + SB_CUR_OFF)); }
C (c_bm_table) { put64 (entry (f, 1) + CP_BM_OFF, get64 (sb + SB_TABLE_OFF)); }
C (c_bm_same) { put64 (entry (f, 1) + CP_BM_OFF, get64 (entry (f, 0) + CP_BM_OFF)); }
C (c_bm_last) { put64 (entry (f, 2) + CP_BM_OFF, get64 (entry (f, 0) + CP_BM_OFF)); }
C (c_bm_crc) { put32 (entry (f, 1) + CP_BM_CRC, get32 (entry (f, 1) + CP_BM_CRC) ^ 1); }
C (c_bm_data) { f[get64 (entry (f, 0) + CP_BM_OFF) + 3] ^= 0x10; }
C (c_bm_tail) { f[get64 (entry (f, 0) + CP_BM_OFF) + (NR_GRAN + 7) / 8 - 1] |= 0x80;
  fix_bitmap (f, 0); }
C (c_cur_data) { f[get64 (sb + SB_CUR_OFF) + 5] ^= 0x01; }
C (c_cur_tail) { uint8_t *b = f + get64 (sb + SB_CUR_OFF);
  b[(NR_GRAN + 7) / 8 - 1] |= 0x80;
  put32 (sb + SB_CUR_CRC, crc (b, (NR_GRAN + 7) / 8)); }
#undef C

static const struct corruption corruptions[] = {
  { "magic", W_RAW, c_magic, "magic" },
  { "version", W_HDR, c_version, "version" },
  { "header size", W_HDR, c_header_size, "header size" },
  { "incompatible bit", W_HDR, c_incompat, "incompatible features" },
  { "granularity 2^8", W_HDR, c_gran_small, "granularity" },
  { "granularity 2^40", W_HDR, c_gran_big, "granularity" },
  { "granularity 2^13", W_HDR, c_gran_other, "granularity" },
  { "disk size 0", W_HDR, c_disk_zero, "disk size" },
  { "disk size other", W_HDR, c_disk_other, "disk size" },
  { "disk size huge", W_HDR, c_disk_huge, "disk size" },
  { "nr checkpoints huge", W_HDR, c_nr_big, "number of checkpoints" },
  { "nr checkpoints other", W_HDR, c_nr_other, "table size" },
  { "table offset unaligned", W_HDR, c_table_off_unaligned, "table offset" },
  { "table offset past eof", W_HDR, c_table_off_past, "table offset" },
  { "table offset in header", W_HDR, c_table_off_header, "table offset" },
  { "table size", W_HDR, c_table_size, "table size" },
  { "table crc", W_HDR, c_table_crc, "table crc" },
  { "current offset past eof", W_HDR, c_cur_off_past, "current bitmap offset" },
  { "current offset unaligned", W_HDR, c_cur_off_unaligned, "current bitmap offset" },
  { "current offset = table", W_HDR, c_cur_off_table, "current bitmap offset" },
  { "current crc", W_HDR, c_cur_crc, "current bitmap crc" },
  { "identity length", W_HDR, c_id_len, "identity length" },
  { "identity other", W_HDR, c_id_other, "identity" },
  { "identity unprintable", W_HDR, c_id_unprintable, "identity" },
  { "identity trailing", W_HDR, c_id_trailing, "identity" },
  { "reserved", W_HDR, c_reserved, "reserved bytes" },
  { "same sequence", W_HDR, c_seq_same, "sequence" },
  { "both crcs", W_RAW, c_both_crc, "no valid copy" },
  { "name with space", W_TABLE, c_name_space, "checkpoint 0 name" },
  { "name with dash", W_TABLE, c_name_dash, "checkpoint 1 name" },
  { "name empty", W_TABLE, c_name_empty, "checkpoint 0 name" },
  { "name duplicate", W_TABLE, c_name_dup, "checkpoint 1 name" },
  { "name unterminated", W_TABLE, c_name_unterminated, "checkpoint 2 name" },
  { "name garbage", W_TABLE, c_name_garbage, "checkpoint 0 name" },
  { "state", W_TABLE, c_state, "state" },
  { "pending not last", W_TABLE, c_state_pending, "state" },
  { "flags", W_TABLE, c_flags, "flags" },
  { "entry reserved", W_TABLE, c_reserved_entry, "reserved bytes" },
  { "bitmap offset 0", W_TABLE, c_bm_zero, "checkpoint 0 'a' bitmap offset" },
  { "bitmap offset unaligned", W_TABLE, c_bm_unaligned, "checkpoint 0 'a' bitmap offset" },
  { "bitmap offset past eof", W_TABLE, c_bm_past, "checkpoint 1 'b' bitmap offset" },
  { "bitmap offset = current", W_TABLE, c_bm_cur, "checkpoint 1 'b' bitmap offset" },
  { "bitmap offset = table", W_TABLE, c_bm_table, "checkpoint 1 'b' bitmap offset" },
  { "bitmap offset shared", W_TABLE, c_bm_same, "checkpoint 1 'b' bitmap offset" },
  { "last bitmap offset", W_TABLE, c_bm_last, "checkpoint 2 'c' bitmap offset" },
  { "bitmap crc", W_TABLE, c_bm_crc, "checkpoint 1 'b' bitmap crc" },
  { "bitmap data", W_RAW, c_bm_data, "checkpoint 0 'a' bitmap crc" },
  { "bitmap tail bits", W_RAW, c_bm_tail, "beyond the end" },
  { "current data", W_RAW, c_cur_data, "current bitmap crc" },
  { "current tail bits", W_HDR, c_cur_tail, "current bitmap: bits set" },
};

/* Opening must fail with a message containing EXPECT. */
static void
expect_refused (const char *desc, const char *expect)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt *c;

  o.create = false;
  err[0] = '\0';
  if (cbt_open (path, &o, &c, NULL, err, sizeof err) == 0) {
    FAIL ("corrupted %s: the file was accepted", desc);
    cbt_close (c, NULL, 0);
    return;
  }
  if (strstr (err, expect) == NULL)
    FAIL ("corrupted %s: message '%s' does not name '%s'", desc, err, expect);
}

static void
corruption_tests (void)
{
  size_t i;

  make_good ();
  for (i = 0; i < sizeof corruptions / sizeof corruptions[0]; ++i) {
    const struct corruption *k = &corruptions[i];
    uint8_t *f = malloc (good_len);
    uint8_t *sb;

    memcpy (f, good, good_len);
    sb = active_sb (f);
    k->apply (f, sb);
    if (k->what == W_HDR)
      fix_sb (sb);
    else if (k->what == W_TABLE)
      fix_table (f);
    write_file (f, good_len);
    expect_refused (k->desc, k->expect);
    free (f);
  }
  printf ("test-cbt: %zu corrupted fields refused\n", i);

  /* Too short. */
  write_file (good, 5000);
  expect_refused ("file size", "file size");

  /* Mismatches with the caller's disk. */
  {
    struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
    struct cbt *c;

    write_file (good, good_len);
    o.identity = "disk-2";
    CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
           strstr (err, "identity") != NULL);
    o = options (DISK + 1, GRAN, CBT_MODE_IN_USE);
    CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
           strstr (err, "disk size") != NULL);
    o = options (DISK, GRAN * 2, CBT_MODE_IN_USE);
    CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
           strstr (err, "granularity") != NULL);
  }
}

/* A torn update of the newest superblock: the other one is used. */
static void
torn_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t *f, *before;
  size_t len;

  make_good ();
  c = xopen (&o, NULL);
  before = changed_since (c, "b");
  /* A structural change with no marks: the file stays clean. */
  CHECK (cbt_checkpoint_create (c, "d", false, err, sizeof err) == 0);
  xclose (c);
  read_file (&f, &len);
  memset (active_sb (f) + 1000, 0xee, 2000);    /* torn: half written */
  write_file (f, len);
  /* The file loads from the previous state, but it cannot know what was
   * recorded after the damaged one was published: every checkpoint is
   * dropped (the next backup is full), never a claim that less changed.
   */
  c = xopen (&o, &info);
  CHECK (info.fallback && info.invalidated && info.dropped == 3);
  CHECK (strstr (info.message, "damaged") != NULL);
  CHECK (strstr (info.message, "all 3 checkpoints are invalid") != NULL);
  CHECK (cbt_checkpoint_count (c) == 0);
  xclose (c);
  c = xopen (&o, &info);                        /* and it stays so */
  CHECK (!info.fallback && !info.invalidated && cbt_checkpoint_count (c) == 0);
  xclose (c);
  free (before);
  free (f);
}

/* What a kill during the creation of a file leaves: zeros (the first
 * state is written and synced before the first superblock), at most
 * the two slots and one bitmap long.  It is created afresh; a file with
 * anything else in it, or longer, is still refused, and without create
 * so is the all-zero one.
 */
static void
interrupted_creation_test (void)
{
  const size_t bm = (NR_GRAN + 7) / 8;
  const size_t sizes[] = { DATA_START, DATA_START + 50, DATA_START + bm,
                           DATA_START + ALIGN };
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  uint8_t *f = calloc (1, DATA_START + 8 * ALIGN);
  struct cbt *c;

  for (size_t i = 0; i < sizeof sizes / sizeof sizes[0]; ++i) {
    write_file (f, sizes[i]);
    c = xopen (&o, &info);
    if (!info.created || cbt_checkpoint_count (c) != 0 ||
        strstr (info.message, "interrupted") == NULL)
      FAIL ("%zu zero bytes: created %d, %zu checkpoints, message '%s'",
            sizes[i], info.created, cbt_checkpoint_count (c), info.message);
    /* A working file: a mark and a checkpoint survive a reopen. */
    CHECK (cbt_checkpoint_create (c, "a", false, err, sizeof err) == 0);
    CHECK (cbt_mark (c, 0, 1, NULL) == 0);
    xclose (c);
    c = xopen (&o, &info);
    CHECK (!info.created && cbt_checkpoint_count (c) == 1);
    xclose (c);
  }

  write_file (f, DATA_START + bm);
  expect_refused ("zeros without create", "only zeros");

  f[DATA_START + bm - 1] = 1;           /* not only zeros */
  write_file (f, DATA_START + bm);
  expect_refused ("zeros but one byte", "not a cbt file");
  f[DATA_START + bm - 1] = 0;
  f[100] = 1;                           /* in slot 0 */
  write_file (f, DATA_START + bm);
  expect_refused ("zeros but one byte in slot 0", "not a cbt file");
  f[100] = 0;

  /* Longer than a new file for this disk: never taken for one. */
  write_file (f, DATA_START + ALIGN + 1);
  o.create = true;
  CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
         strstr (err, "not a cbt file") != NULL);
  /* Without a granularity, the file's is accepted: a file created at
   * 512 byte granules may be that long (a new file then gets the
   * default granularity).  A 64 MiB disk: 16 KiB of bitmap at 512
   * bytes, 2 KiB at GRAN.
   */
  o = options (64 << 20, GRAN, CBT_MODE_IN_USE);
  write_file (f, DATA_START + 3 * ALIGN);
  CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
         strstr (err, "not a cbt file") != NULL);
  o.granularity = 0;
  c = xopen (&o, &info);
  CHECK (info.created && cbt_granularity (c) == CBT_DEFAULT_GRANULARITY);
  xclose (c);
  write_file (f, DATA_START + 4 * ALIGN + 1);
  CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
         strstr (err, "not a cbt file") != NULL);
  free (f);
}

/* Feature bits: unknown compatible kept, unknown autoclear cleared. */
static void
feature_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t *f, *sb;
  size_t len;

  make_good ();
  f = malloc (good_len);
  memcpy (f, good, good_len);
  sb = active_sb (f);
  put64 (sb + SB_COMPAT, get64 (sb + SB_COMPAT) | (1u << 9));
  put64 (sb + SB_AUTOCLEAR, 1u << 3);
  fix_sb (sb);
  write_file (f, good_len);
  free (f);
  c = xopen (&o, &info);
  CHECK (cbt_checkpoint_count (c) == 3);
  CHECK (cbt_checkpoint_create (c, "d", false, err, sizeof err) == 0);
  xclose (c);
  read_file (&f, &len);
  sb = active_sb (f);
  CHECK (get64 (sb + SB_AUTOCLEAR) == 0);
  CHECK (get64 (sb + SB_COMPAT) & (1u << 9));
  free (f);

  /* reset starts afresh, even over garbage. */
  write_file ((const uint8_t *) "garbage garbage", 15);
  expect_refused ("garbage", "file size");
  o.reset = true;
  c = xopen (&o, &info);
  CHECK (info.created && cbt_checkpoint_count (c) == 0);

  /* The lock: a second open fails. */
  {
    struct cbt *c2;
    o.reset = false;
    CHECK (cbt_open (path, &o, &c2, NULL, err, sizeof err) == -1 &&
           errno == EAGAIN && strstr (err, "lock") != NULL);
  }
  xclose (c);
}

int
main (void)
{
  cbt_test_start ();

  corruption_tests ();
  torn_test ();
  interrupted_creation_test ();
  feature_test ();

  return cbt_test_end ();
}
