/* sparsebackup: unit tests of common/cbt*.c (persistent changed-block
 * tracking): the load checks.
 *
 *  - every superblock, table, index and directory field of a version 2
 *    file corrupted in turn (with the crcs fixed up, so only the field
 *    check can catch it) must be refused with a message naming the
 *    field; a torn superblock falls back to the other copy (and drops
 *    the checkpoints); unknown compatible bits are kept, unknown
 *    autoclear bits cleared; reset starts afresh; the lock refuses a
 *    second open; identity / size mismatches; a file left by a kill
 *    during its creation (zeros, no superblock) is created afresh;
 *  - version 1 files: converted to version 2 (read-only: read as they
 *    are), with the same checkpoints and sets; one left in use (dropped,
 *    or kept in write-ahead mode), one with a pending checkpoint; and
 *    their fields corrupted in turn, refused as before.
 *
 * The file layout used to corrupt fields is the one documented in
 * doc/cbt-format.md (cbt-format.h).  The other cbt tests are in
 * test-cbt.c and test-cbt-replay.c, the shared helpers in
 * cbt-test-lib.h.  Exit status 1 if anything failed.
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
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

#define TEST_NAME "test-cbt-load"
#include "cbt-test-lib.h"

/* ---- Corrupted files ----------------------------------------------- */

enum what {
  W_HDR,                        /* a superblock field: fix its crc */
  W_TABLE,                      /* a table field: fix the table crc */
  W_INDEX0,                     /* an index field of entry 0 ('a') */
  W_INDEX1,                     /* an index field of entry 1 ('b') */
  W_RAW,                        /* no fix-up */
};

struct corruption {
  const char *desc;
  enum what what;
  void (*apply) (uint8_t *f, uint8_t *sb);
  const char *expect;           /* in the message */
};

/* The block of page J of checkpoint I's record. */
static uint64_t
page_off (uint8_t *f, unsigned i, unsigned j)
{
  return get64 (idx (f, i, j) + IDX_OFF);
}

#define C(fn) static void fn (uint8_t *f, uint8_t *sb)
C (c_magic) { f[0] ^= 1; f[SB_SIZE] ^= 1; }
C (c_version) { put32 (sb + SB_VERSION, 3); }
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
C (c_table_off_dir) { put64 (sb + SB_TABLE_OFF, get64 (sb + SB_CUR_OFF)); }
C (c_table_size) { put32 (sb + SB_TABLE_SIZE, 2 * ENTRY_SIZE); }
C (c_table_crc) { put32 (sb + SB_TABLE_CRC, get32 (sb + SB_TABLE_CRC) ^ 1); }
C (c_cur_off_past) { put64 (sb + SB_CUR_OFF, UINT64_MAX - 4095); }
C (c_cur_off_unaligned) { put64 (sb + SB_CUR_OFF, get64 (sb + SB_CUR_OFF) + 1); }
C (c_next_off_past) { put64 (sb + SB_NEXT_OFF, UINT64_C (1) << 40); }
C (c_next_off_unaligned) { put64 (sb + SB_NEXT_OFF, get64 (sb + SB_NEXT_OFF) + 8); }
C (c_next_off_cur) { put64 (sb + SB_NEXT_OFF, get64 (sb + SB_CUR_OFF)); }
C (c_next_off_index) { put64 (sb + SB_NEXT_OFF, get64 (entry (f, 0) + CP_IDX_OFF)); }
C (c_cur_crc) { put32 (sb + SB_CUR_CRC, get32 (sb + SB_CUR_CRC) ^ 1); }
C (c_dir_size) { put32 (sb + SB_DIR_SIZE, DIR_BYTES + 8); }
C (c_mode) { put32 (sb + SB_MODE, 3); }
C (c_boot_len) { put32 (sb + SB_BOOT_LEN, 64); }
C (c_boot_unprintable) { sb[SB_BOOT_ID + 2] = ' '; }
C (c_boot_trailing) { sb[SB_BOOT_ID + 60] = 'x'; }
C (c_serial_zero) { put64 (sb + SB_NEXT_SERIAL, 0); }
C (c_serial_low) { put64 (sb + SB_NEXT_SERIAL, 3); }
C (c_id_len) { put32 (sb + SB_ID_LEN, 300); }
C (c_id_other) { sb[SB_ID] = 'X'; }
C (c_id_unprintable) { sb[SB_ID + 1] = 1; }
C (c_id_trailing) { sb[SB_ID + 200] = 'a'; }
C (c_reserved) { sb[SB_RESERVED + 100] = 1; }
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
C (c_reserved_entry) { entry (f, 2)[CP_RESERVED + 3] = 1; }
C (c_cp_serial_zero) { put64 (entry (f, 0) + CP_SERIAL, 0); }
C (c_cp_serial_dup) { put64 (entry (f, 1) + CP_SERIAL, get64 (entry (f, 0) + CP_SERIAL)); }
C (c_idx_last) { put64 (entry (f, 2) + CP_IDX_OFF, get64 (entry (f, 0) + CP_IDX_OFF)); }
C (c_idx_unaligned) { put64 (entry (f, 0) + CP_IDX_OFF, get64 (entry (f, 0) + CP_IDX_OFF) + 16); }
C (c_idx_past) { put64 (entry (f, 1) + CP_IDX_OFF, UINT64_C (1) << 40); }
C (c_idx_table) { put64 (entry (f, 1) + CP_IDX_OFF, get64 (sb + SB_TABLE_OFF)); }
C (c_idx_dir) { put64 (entry (f, 1) + CP_IDX_OFF, get64 (sb + SB_CUR_OFF)); }
C (c_idx_shared) { put64 (entry (f, 1) + CP_IDX_OFF, get64 (entry (f, 0) + CP_IDX_OFF)); }
C (c_idx_count) { put32 (entry (f, 0) + CP_IDX_COUNT, 100000); }
C (c_idx_count0) { put32 (entry (f, 0) + CP_IDX_COUNT, 0); }
C (c_idx_crc) { put32 (entry (f, 1) + CP_IDX_CRC, get32 (entry (f, 1) + CP_IDX_CRC) ^ 1); }
C (c_ie_page) { put32 (idx (f, 0, 0) + IDX_PAGE, NR_PAGES); }
C (c_ie_order) { put32 (idx (f, 0, 1) + IDX_PAGE, get32 (idx (f, 0, 0) + IDX_PAGE)); }
C (c_ie_unaligned) { put64 (idx (f, 0, 0) + IDX_OFF, page_off (f, 0, 0) + 512); }
C (c_ie_past) { put64 (idx (f, 0, 1) + IDX_OFF, UINT64_C (1) << 40); }
C (c_ie_header) { put64 (idx (f, 0, 1) + IDX_OFF, 4096); }
C (c_ie_shared) { put64 (idx (f, 1, 0) + IDX_OFF, page_off (f, 0, 0)); }
C (c_ie_table) { put64 (idx (f, 1, 1) + IDX_OFF, get64 (sb + SB_TABLE_OFF)); }
C (c_ie_crc) { put32 (idx (f, 1, 1) + IDX_CRC, get32 (idx (f, 1, 1) + IDX_CRC) ^ 1); }
C (c_page_data) { f[page_off (f, 1, 0) + 33] ^= 0x10; }
C (c_page_tail) { f[page_off (f, 1, 1) + PAGE_LEN (3) - 1] |= 0x80;
  fix_page (f, 1, 1); }
C (c_dir_check) { put32 (cur_dir (f, 0) + DIR_CHECK, get32 (cur_dir (f, 0) + DIR_CHECK) ^ 1); fix_cur (f); }
C (c_dir_past) { put32 (cur_dir (f, 0), 1u << 20);
  put32 (cur_dir (f, 0) + DIR_CHECK, dir_check (0, 1u << 20)); }
C (c_dir_shared) { uint32_t b = (uint32_t) (page_off (f, 0, 0) / BLOCK);
  put32 (cur_dir (f, 0), b); put32 (cur_dir (f, 0) + DIR_CHECK, dir_check (0, b));
  fix_cur (f); }
C (c_cur_data) { f[(uint64_t) get32 (cur_dir (f, 0)) * BLOCK + 5] ^= 0x01; }
C (c_cur_tail) { f[(uint64_t) get32 (cur_dir (f, 3)) * BLOCK + PAGE_LEN (3) - 1] |= 0x80;
  fix_cur (f); }
C (c_next_entry) { uint8_t *d = f + get64 (sb + SB_NEXT_OFF) + 2 * DIR_SIZE;
  uint32_t b = get32 (cur_dir (f, 0));
  put32 (d, b); put32 (d + DIR_CHECK, dir_check (2, b)); }
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
  { "table offset = directory", W_HDR, c_table_off_dir, "directory offset" },
  { "table size", W_HDR, c_table_size, "table size" },
  { "table crc", W_HDR, c_table_crc, "table crc" },
  { "current offset past eof", W_HDR, c_cur_off_past, "current directory offset" },
  { "current offset unaligned", W_HDR, c_cur_off_unaligned, "current directory offset" },
  { "next offset past eof", W_HDR, c_next_off_past, "next directory offset" },
  { "next offset unaligned", W_HDR, c_next_off_unaligned, "next directory offset" },
  { "next offset = current", W_HDR, c_next_off_cur, "next directory offset" },
  { "next offset = an index", W_HDR, c_next_off_index, "index offset" },
  { "current crc", W_HDR, c_cur_crc, "current record crc" },
  { "directory size", W_HDR, c_dir_size, "directory size" },
  { "mode", W_HDR, c_mode, "mode" },
  { "boot id length", W_HDR, c_boot_len, "boot id" },
  { "boot id unprintable", W_HDR, c_boot_unprintable, "boot id" },
  { "boot id trailing", W_HDR, c_boot_trailing, "boot id" },
  { "next serial 0", W_HDR, c_serial_zero, "next serial" },
  { "next serial low", W_HDR, c_serial_low, "checkpoint 2 'c' serial" },
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
  { "serial 0", W_TABLE, c_cp_serial_zero, "checkpoint 0 'a' serial" },
  { "serial repeated", W_TABLE, c_cp_serial_dup, "checkpoint 1 'b' serial" },
  { "last index offset", W_TABLE, c_idx_last, "checkpoint 2 'c' index offset" },
  { "index offset unaligned", W_TABLE, c_idx_unaligned, "checkpoint 0 'a' index offset" },
  { "index offset past eof", W_TABLE, c_idx_past, "checkpoint 1 'b' index offset" },
  { "index offset = table", W_TABLE, c_idx_table, "checkpoint 1 'b' index offset" },
  { "index offset = directory", W_TABLE, c_idx_dir, "checkpoint 1 'b' index offset" },
  { "index offset shared", W_TABLE, c_idx_shared, "checkpoint 1 'b' index offset" },
  { "index count huge", W_TABLE, c_idx_count, "checkpoint 0 'a' index count" },
  { "index count 0", W_TABLE, c_idx_count0, "checkpoint 0 'a' index offset" },
  { "index crc", W_TABLE, c_idx_crc, "checkpoint 1 'b' index crc" },
  { "index page too big", W_INDEX0, c_ie_page, "checkpoint 0 'a' index entry 0 page" },
  { "index pages out of order", W_INDEX0, c_ie_order, "checkpoint 0 'a' index entry 1 page" },
  { "index page unaligned", W_INDEX0, c_ie_unaligned, "checkpoint 0 'a' index entry 0 offset" },
  { "index page past eof", W_INDEX0, c_ie_past, "checkpoint 0 'a' index entry 1 offset" },
  { "index page in header", W_INDEX0, c_ie_header, "checkpoint 0 'a' index entry 1 offset" },
  { "index page shared", W_INDEX1, c_ie_shared, "checkpoint 1 'b' index entry 0 offset" },
  { "index page = table", W_INDEX1, c_ie_table, "checkpoint 1 'b' index entry 1 offset" },
  { "page crc", W_INDEX1, c_ie_crc, "checkpoint 1 'b' page 3 crc" },
  { "page data", W_RAW, c_page_data, "checkpoint 1 'b' page 1 crc" },
  { "page tail bits", W_RAW, c_page_tail, "beyond the end" },
  { "directory entry check", W_RAW, c_dir_check, "current directory entry 0" },
  { "directory entry past eof", W_RAW, c_dir_past, "current directory entry 0" },
  { "directory entry shared", W_RAW, c_dir_shared, "current directory entry 0" },
  { "current data", W_RAW, c_cur_data, "current record crc" },
  { "current tail bits", W_RAW, c_cur_tail, "current record page 3: bits set" },
  { "next directory not empty", W_HDR, c_next_entry, "next directory entry 2" },
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
  if (getenv ("CBT_TEST_VERBOSE"))
    fprintf (stderr, "%s: %s\n", desc, err);
  if (strstr (err, expect) == NULL)
    FAIL ("corrupted %s: message '%s' does not name '%s'", desc, err, expect);
}

static void
corruption_tests (void)
{
  size_t i;

  make_good ();
  /* The layout the corruptions assume: two pages in the records of a
   * and b, pages 0 and 3 in the current one.
   */
  CHECK (get32 (entry (good, 0) + CP_IDX_COUNT) == 2);
  CHECK (get32 (entry (good, 1) + CP_IDX_COUNT) == 2);
  CHECK (get32 (idx (good, 1, 1) + IDX_PAGE) == 3);
  CHECK (get32 (cur_dir (good, 0)) != 0 && get32 (cur_dir (good, 3)) != 0);
  {
    /* The good file loads. */
    struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
    struct cbt *c = xopen (&o, NULL);
    CHECK (cbt_checkpoint_count (c) == 3);
    xclose (c);
    make_good ();
  }
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
    else if (k->what == W_INDEX0 || k->what == W_INDEX1)
      fix_index (f, k->what == W_INDEX0 ? 0 : 1);
    write_file (f, good_len);
    expect_refused (k->desc, k->expect);
    free (f);
  }
  printf ("test-cbt-load: %zu corrupted fields refused\n", i);

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
  uint8_t *f;
  size_t len;

  make_good ();
  c = xopen (&o, NULL);
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
  /* and it works */
  CHECK (cbt_checkpoint_create (c, "e", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 0, 1, NULL) == 0);
  xclose (c);
  c = xopen (&o, &info);                        /* and it stays so */
  CHECK (!info.fallback && !info.invalidated && cbt_checkpoint_count (c) == 1);
  xclose (c);
  free (f);
}

/* What a kill during the creation of a file leaves: zeros (the first
 * state is written and synced before the first superblock), at most
 * the two slots and two directories long (or, from version 1, one
 * bitmap).  It is created afresh; a file with anything else in it, or
 * longer, is still refused, and without create so is the all-zero one.
 */
static void
interrupted_creation_test (void)
{
  const size_t limit = DATA_START + (BM_BYTES + 4095) / 4096 * 4096;
  const size_t sizes[] = { DATA_START, DATA_START + 50,
                           DATA_START + 2 * BLOCK, DATA_START + BM_BYTES,
                           limit };
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

  write_file (f, DATA_START + BM_BYTES);
  expect_refused ("zeros without create", "only zeros");

  f[DATA_START + BM_BYTES - 1] = 1;     /* not only zeros */
  write_file (f, DATA_START + BM_BYTES);
  expect_refused ("zeros but one byte", "not a cbt file");
  f[DATA_START + BM_BYTES - 1] = 0;
  f[100] = 1;                           /* in slot 0 */
  write_file (f, DATA_START + BM_BYTES);
  expect_refused ("zeros but one byte in slot 0", "not a cbt file");
  f[100] = 0;

  /* The magic alone (the file's size never synced). */
  write_file ((const uint8_t *) "SBKCBT\r\n", 8);
  c = xopen (&o, &info);
  CHECK (info.created && strstr (info.message, "interrupted") != NULL);
  xclose (c);
  /* Its size without it (a power loss: the size reached the disk, the
   * magic did not).
   */
  write_file (f, 8);
  c = xopen (&o, &info);
  CHECK (info.created && strstr (info.message, "interrupted") != NULL);
  xclose (c);
  /* Short, not zero and not the magic: refused. */
  write_file ((const uint8_t *) "SBKCBT\r\x01", 8);
  o.create = true;
  CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
         strstr (err, "too short") != NULL);

  /* The first superblock torn: the magic, then not all of it. */
  memcpy (f, "SBKCBT\r\n\002", 9);
  write_file (f, DATA_START + BM_BYTES);
  c = xopen (&o, &info);
  CHECK (info.created && strstr (info.message, "interrupted") != NULL);
  xclose (c);
  memset (f, 0, 9);

  /* Longer than a new file for this disk: never taken for one. */
  write_file (f, limit + 1);
  o.create = true;
  CHECK (cbt_open (path, &o, &c, NULL, err, sizeof err) == -1 &&
         strstr (err, "not a cbt file") != NULL);
  /* Without a granularity, the file's is accepted: a file created at
   * 512 byte granules may be that long (a new file then gets the
   * default granularity).  A 64 MiB disk: 16 KiB of bitmap at 512
   * bytes (a version 1 file of 8 + 16 KiB), 128 bytes at 64K.
   */
  o = options (64 << 20, 65536, CBT_MODE_IN_USE);
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
  read_file (&f, &len);
  sb = active_sb (f);
  CHECK (get64 (sb + SB_AUTOCLEAR) == 0);       /* cleared at once */
  free (f);
  CHECK (cbt_checkpoint_create (c, "d", false, err, sizeof err) == 0);
  xclose (c);
  read_file (&f, &len);
  sb = active_sb (f);
  CHECK (get64 (sb + SB_AUTOCLEAR) == 0);
  CHECK (get64 (sb + SB_COMPAT) & (1u << 9));
  CHECK (get32 (sb + SB_VERSION) == 2);
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

/* ---- Version 1 files ------------------------------------------------ */

static uint8_t v1bm[2][BM_BYTES], v1cur[BM_BYTES];
static const char *const v1names[] = { "a", "b", "c" };

static void
v1_setup (void)
{
  memset (v1bm, 0, sizeof v1bm);
  memset (v1cur, 0, sizeof v1cur);
  bm_set (v1bm[0], 3, 5);
  bm_set (v1bm[0], IN_PAGE (2, 40), 100);
  bm_set (v1bm[1], 32760, 20);          /* across pages 0 and 1 */
  bm_set (v1cur, 10, 1);
  bm_set (v1cur, NR_GRAN - 1, 1);
}

/* The sets since a, b, c as version 1 holds them. */
static void
v1_check (struct cbt *c, const char *what, bool pending_merged)
{
  uint8_t want[3][NR_GRAN];

  memset (want, 0, sizeof want);
  for (unsigned k = 0; k < 3; ++k)
    for (unsigned r = k; r < 3; ++r) {
      const uint8_t *bm = r < 2 ? v1bm[r] : v1cur;
      for (uint64_t g = 0; g < NR_GRAN; ++g)
        if (bm[g / 8] & (1u << (g % 8)))
          want[k][g] = 1;
    }
  CHECK_EQ (cbt_checkpoint_count (c), pending_merged ? 2 : 3);
  for (unsigned k = 0; k < (pending_merged ? 2u : 3u); ++k) {
    struct cbt_checkpoint_info ci;
    uint8_t *g;

    if (cbt_checkpoint_get (c, k, &ci) == -1 ||
        strcmp (ci.name, v1names[k]) != 0 || ci.serial != k + 1) {
      FAIL ("%s: checkpoint %u is '%s' serial %" PRIu64, what, k, ci.name,
            ci.serial);
      continue;
    }
    if (ci.state != CBT_STATE_GOOD)
      continue;
    g = changed_since (c, v1names[k]);
    if (memcmp (g, want[k], NR_GRAN) != 0)
      FAIL ("%s: since %s differs from the version 1 bitmaps", what,
            v1names[k]);
    free (g);
  }
}

static void
v1_tests (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t *bms[2] = { v1bm[0], v1bm[1] }, *f, *f2;
  size_t len, len2;

  v1_setup ();
  write_v1 (v1names, 3, false, bms, v1cur, false, false);

  /* Read-only: read as it is, not written. */
  read_file (&f, &len);
  o.read_only = true;
  c = xopen (&o, &info);
  CHECK (info.converted && strstr (info.message, "not converted") != NULL);
  v1_check (c, "version 1 read-only", false);
  xclose (c);
  read_file (&f2, &len2);
  CHECK (len == len2 && memcmp (f, f2, len) == 0);
  free (f2);
  o.read_only = false;

  /* Converted: the same, and version 2 from then on. */
  c = xopen (&o, &info);
  CHECK (info.converted && !info.invalidated &&
         strstr (info.message, "converted the version 1 file") != NULL);
  v1_check (c, "converted", false);
  CHECK (cbt_mark (c, 20 * GRAN, 1, NULL) == 0);
  bm_set (v1cur, 20, 1);
  CHECK (cbt_checkpoint_create (c, "d", false, err, sizeof err) == 0);
  CHECK (cbt_checkpoint_delete (c, "d", err, sizeof err) == 0);
  xclose (c);
  read_file (&f2, &len2);
  CHECK (get32 (active_sb (f2) + SB_VERSION) == 2);
  free (f2);
  c = xopen (&o, &info);
  CHECK (!info.converted && !info.invalidated && info.message[0] == '\0');
  v1_check (c, "converted, reopened", false);
  xclose (c);

  /* Left in use: in-use mode drops, write-ahead keeps. */
  bm_set (v1cur, 20, 1);
  write_v1 (v1names, 3, false, bms, v1cur, true, false);
  c = xopen (&o, &info);
  CHECK (info.converted && info.invalidated && info.dropped == 3 &&
         cbt_checkpoint_count (c) == 0);
  xclose (c);
  write_v1 (v1names, 3, false, bms, v1cur, true, true);
  c = xopen (&o, &info);
  CHECK (info.converted && !info.invalidated);
  v1_check (c, "in use, write-ahead", false);
  xclose (c);

  /* A pending last checkpoint: merged back. */
  write_v1 (v1names, 3, true, bms, v1cur, false, false);
  c = xopen (&o, &info);
  CHECK (info.converted && info.dropped == 1 &&
         strstr (info.message, "'c' was still pending") != NULL);
  v1_check (c, "pending", true);
  xclose (c);
  free (f);
}

/* Version 1 fields, as version 1 refused them. */
#define C(fn) static void fn (uint8_t *f, uint8_t *sb)
static uint8_t *v1e (uint8_t *f, unsigned i) { return f + DATA_START + i * ENTRY_SIZE; }
C (v_version) { put32 (sb + SB_VERSION, 9); }
C (v_reserved) { sb[SB_RESERVED1 + 5] = 1; }
C (v_nr) { put32 (sb + SB_NR_CPS, 300); }
C (v_table_crc) { put32 (sb + SB_TABLE_CRC, get32 (sb + SB_TABLE_CRC) ^ 1); }
C (v_cur_off) { put64 (sb + SB_CUR_OFF, get64 (sb + SB_CUR_OFF) + 1); }
C (v_cur_crc) { put32 (sb + SB_CUR_CRC, get32 (sb + SB_CUR_CRC) ^ 1); }
C (v_bm_off) { put64 (v1e (f, 0) + CP1_BM_OFF, get64 (v1e (f, 0) + CP1_BM_OFF) + 512);
  put32 (sb + SB_TABLE_CRC, crc (f + DATA_START, 3 * ENTRY_SIZE)); }
C (v_bm_same) { put64 (v1e (f, 1) + CP1_BM_OFF, get64 (v1e (f, 0) + CP1_BM_OFF));
  put32 (sb + SB_TABLE_CRC, crc (f + DATA_START, 3 * ENTRY_SIZE)); }
C (v_bm_crc) { put32 (v1e (f, 1) + CP1_BM_CRC, 5);
  put32 (sb + SB_TABLE_CRC, crc (f + DATA_START, 3 * ENTRY_SIZE)); }
C (v_bm_data) { f[get64 (v1e (f, 0) + CP1_BM_OFF) + 100] ^= 4; }
C (v_cur_data) { f[get64 (sb + SB_CUR_OFF) + 100] ^= 4; }
C (v_name) { v1e (f, 1)[0] = '-';
  put32 (sb + SB_TABLE_CRC, crc (f + DATA_START, 3 * ENTRY_SIZE)); }
C (v_entry_reserved) { v1e (f, 1)[CP1_RESERVED2 + 1] = 1;
  put32 (sb + SB_TABLE_CRC, crc (f + DATA_START, 3 * ENTRY_SIZE)); }
#undef C

static const struct corruption v1_corruptions[] = {
  { "v1 version", W_HDR, v_version, "version: 9" },
  { "v1 reserved", W_HDR, v_reserved, "reserved bytes" },
  { "v1 nr checkpoints", W_HDR, v_nr, "number of checkpoints" },
  { "v1 table crc", W_HDR, v_table_crc, "table crc" },
  { "v1 current offset", W_HDR, v_cur_off, "current bitmap offset" },
  { "v1 current crc", W_HDR, v_cur_crc, "current bitmap crc" },
  { "v1 bitmap offset", W_HDR, v_bm_off, "checkpoint 0 'a' bitmap offset" },
  { "v1 bitmap shared", W_HDR, v_bm_same, "checkpoint 1 'b' bitmap offset" },
  { "v1 bitmap crc", W_HDR, v_bm_crc, "checkpoint 1 'b' bitmap crc" },
  { "v1 bitmap data", W_RAW, v_bm_data, "checkpoint 0 'a' bitmap crc" },
  { "v1 current data", W_RAW, v_cur_data, "current bitmap crc" },
  { "v1 name", W_HDR, v_name, "checkpoint 1 name" },
  { "v1 entry reserved", W_HDR, v_entry_reserved, "reserved bytes" },
};

static void
v1_corruption_tests (void)
{
  uint8_t *bms[2] = { v1bm[0], v1bm[1] }, *f;
  size_t len, i;

  v1_setup ();
  write_v1 (v1names, 3, false, bms, v1cur, false, false);
  read_file (&f, &len);
  for (i = 0; i < sizeof v1_corruptions / sizeof v1_corruptions[0]; ++i) {
    const struct corruption *k = &v1_corruptions[i];
    uint8_t *g = malloc (len);

    memcpy (g, f, len);
    k->apply (g, g);
    if (k->what == W_HDR)
      fix_sb (g);
    write_file (g, len);
    expect_refused (k->desc, k->expect);
    free (g);
  }
  printf ("test-cbt-load: %zu corrupted version 1 fields refused\n", i);
  free (f);
}

int
main (void)
{
  cbt_test_start ();

  corruption_tests ();
  torn_test ();
  interrupted_creation_test ();
  feature_test ();
  v1_tests ();
  v1_corruption_tests ();

  return cbt_test_end ();
}
