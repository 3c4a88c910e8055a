/* sparsebackup: unit tests of common/cbt.c (persistent changed-block
 * tracking).
 *
 *  - a model test: random marks, checkpoints created (good and
 *    pending), confirmed, failed, deleted, and clean reopens, in both
 *    durability modes, compared after every step with a reference model
 *    in which every checkpoint simply keeps the set of granules marked
 *    since it was created;
 *  - the load checks: every superblock and table field corrupted in
 *    turn (with the crcs fixed up, so only the field check can catch
 *    it) must be refused with a message naming the field; a torn
 *    superblock falls back to the other copy; unknown compatible bits
 *    are kept, unknown autoclear bits cleared; reset starts afresh;
 *    the lock refuses a second open; identity / size mismatches;
 *  - in-use detection: a child that marks and exits without closing
 *    leaves a file whose checkpoints are invalidated at the next load;
 *  - write-ahead crash: a child marks + commits in a loop and is killed
 *    with SIGKILL at a random moment; every mark it had committed must
 *    be in the set, and its checkpoints valid (a backup it had begun is
 *    merged back);
 *  - a write error (RLIMIT_FSIZE below the current bitmap) in
 *    write-ahead mode: the commit fails with EIO, and so does everything
 *    after it; the file still loads with what was committed before;
 *  - group commit from several threads.
 *
 * The file layout used to corrupt fields is the one documented in
 * doc/cbt-format.md, written down here independently.  Exit status 1
 * if anything failed.
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

#define TEST_NAME "test-cbt"
#include "unit-test.h"

/* Layout (doc/cbt-format.md). */
#include "cbt-format.h"
#define CP_RESERVED 100

static uint64_t rnd_state = 0x2545F4914F6CDD1DULL;

static uint64_t
rnd (void)
{
  rnd_state ^= rnd_state >> 12;
  rnd_state ^= rnd_state << 25;
  rnd_state ^= rnd_state >> 27;
  return rnd_state * 0x2545F4914F6CDD1DULL;
}

static char tmpdir[] = "/tmp/test-cbt.XXXXXX";
static char path[256];
static char err[CBT_ERRLEN];

static uint32_t get32 (const uint8_t *p) { uint32_t v; memcpy (&v, p, 4); return v; }
static uint64_t get64 (const uint8_t *p) { uint64_t v; memcpy (&v, p, 8); return v; }
static void put32 (uint8_t *p, uint32_t v) { memcpy (p, &v, 4); }
static void put64 (uint8_t *p, uint64_t v) { memcpy (p, &v, 8); }

static struct cbt_options
options (uint64_t disk_size, uint32_t gran, enum cbt_mode mode)
{
  struct cbt_options o = {
    .disk_size = disk_size, .granularity = gran, .identity = "disk-1",
    .mode = mode, .create = true,
  };
  return o;
}

static struct cbt *
xopen (const struct cbt_options *o, struct cbt_load_info *info)
{
  struct cbt *c;

  if (cbt_open (path, o, &c, info, err, sizeof err) == -1) {
    FAIL ("cbt_open: %s", err);
    exit (EXIT_FAILURE);
  }
  return c;
}

static void
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

static int
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
static uint8_t *
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

/* ---- Reference model ----------------------------------------------- */

#define NR_GRAN 700
#define GRAN 4096
#define DISK ((uint64_t) (NR_GRAN - 1) * GRAN + 1234)  /* partial last */
#define MAX_CPS 8

struct mcp {
  char name[CBT_NAME_MAX + 1];
  bool pending;
  uint8_t since[NR_GRAN];
};

static struct mcp model[MAX_CPS + 1];
static size_t nmodel;

static void
model_delete (size_t k)
{
  memmove (&model[k], &model[k + 1], (nmodel - k - 1) * sizeof model[0]);
  nmodel--;
}

static void
compare (struct cbt *c, const char *when)
{
  CHECK (cbt_checkpoint_count (c) == nmodel);
  for (size_t i = 0; i < nmodel; ++i) {
    struct cbt_checkpoint_info ci;
    uint8_t *g;

    if (cbt_checkpoint_get (c, i, &ci) == -1) {
      FAIL ("%s: checkpoint %zu missing", when, i);
      continue;
    }
    if (strcmp (ci.name, model[i].name) != 0 ||
        (ci.state == CBT_STATE_PENDING) != model[i].pending)
      FAIL ("%s: checkpoint %zu is '%s' state %d, model '%s' pending %d",
            when, i, ci.name, ci.state, model[i].name, model[i].pending);
    if (model[i].pending)
      continue;
    g = changed_since (c, model[i].name);
    for (size_t j = 0; j < NR_GRAN; ++j)
      if (g[j] != model[i].since[j]) {
        FAIL ("%s: since '%s': granule %zu is %d, model %d", when,
              model[i].name, j, g[j], model[i].since[j]);
        break;
      }
    free (g);
  }
}

static void
model_test (enum cbt_mode mode, unsigned steps)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  struct cbt *c;
  unsigned names = 0;

  o.reset = true;
  c = xopen (&o, NULL);
  o.reset = false;
  nmodel = 0;
  for (unsigned step = 0; step < steps; ++step) {
    unsigned op = rnd () % 100;
    char when[64];

    snprintf (when, sizeof when, "mode %d step %u op %u", mode, step, op);
    if (op < 60) {                      /* mark */
      uint64_t off = rnd () % DISK, len = 1 + rnd () % (GRAN * 20), t;
      if (rnd () % 4 == 0)
        off -= off % GRAN;
      if (len > DISK - off)
        len = DISK - off;
      if (cbt_mark (c, off, len, &t) == -1)
        FAIL ("cbt_mark: %m%s", "");
      if (mode == CBT_MODE_IN_USE)
        CHECK (t == 0);
      if (cbt_commit (c, t) == -1)
        FAIL ("cbt_commit: %m%s", "");
      CHECK (cbt_is_durable (c, off, len));
      for (size_t i = 0; i < nmodel; ++i)
        for (uint64_t g = off / GRAN; g <= (off + len - 1) / GRAN; ++g)
          model[i].since[g] = 1;
    }
    else if (op < 72) {                 /* create */
      bool pending = rnd () % 2;
      bool busy = nmodel > 0 && model[nmodel - 1].pending;
      char name[32];
      int r;

      if (nmodel == MAX_CPS) {
        r = cbt_checkpoint_delete (c, model[0].name, err, sizeof err);
        CHECK (r == 0);
        model_delete (0);
        continue;
      }
      snprintf (name, sizeof name, "cp-%u", names++);
      r = cbt_checkpoint_create (c, name, pending, err, sizeof err);
      if (busy) {
        CHECK (r == -1 && errno == EBUSY);
        continue;
      }
      if (r == -1) {
        FAIL ("create %s: %s", name, err);
        continue;
      }
      strcpy (model[nmodel].name, name);
      model[nmodel].pending = pending;
      memset (model[nmodel].since, 0, NR_GRAN);
      nmodel++;
    }
    else if (op < 80) {                 /* end a pending backup */
      if (nmodel == 0 || !model[nmodel - 1].pending)
        continue;
      if (rnd () % 2) {
        CHECK (cbt_checkpoint_confirm (c, model[nmodel - 1].name,
                                       err, sizeof err) == 0);
        model[nmodel - 1].pending = false;
      }
      else {
        CHECK (cbt_checkpoint_fail (c, model[nmodel - 1].name,
                                    err, sizeof err) == 0);
        model_delete (nmodel - 1);
      }
    }
    else if (op < 90) {                 /* delete */
      size_t k;

      if (nmodel == 0) {
        CHECK (cbt_checkpoint_delete (c, "nope", err, sizeof err) == -1 &&
               errno == ENOENT);
        continue;
      }
      k = rnd () % nmodel;
      if (cbt_checkpoint_delete (c, model[k].name, err, sizeof err) == -1)
        FAIL ("delete %s: %s", model[k].name, err);
      model_delete (k);
    }
    else if (op < 95) {                 /* clean reopen */
      struct cbt_load_info info;

      xclose (c);
      c = xopen (&o, &info);
      CHECK (!info.invalidated && !info.created);
      if (nmodel > 0 && model[nmodel - 1].pending) {
        CHECK (info.dropped == 1);      /* pending at load: merged back */
        model_delete (nmodel - 1);
      }
    }
    else {                              /* bad calls */
      CHECK (cbt_mark (c, DISK, 1, NULL) == -1 && errno == EINVAL);
      CHECK (cbt_checkpoint_create (c, "bad name", false, err,
                                    sizeof err) == -1 && errno == EINVAL);
      CHECK (cbt_checkpoint_create (c, "-x", false, err,
                                    sizeof err) == -1 && errno == EINVAL);
      if (nmodel > 0) {
        CHECK (cbt_checkpoint_create (c, model[0].name, false, err,
                                      sizeof err) == -1 && errno == EEXIST);
        if (model[0].pending)
          CHECK (cbt_map (c, model[0].name, collect, NULL, err,
                          sizeof err) == -1);
        else
          CHECK (cbt_checkpoint_fail (c, model[0].name, err,
                                      sizeof err) == -1 && errno == EINVAL);
      }
    }
    compare (c, when);
    if (failures)
      break;
  }
  xclose (c);
  /* Round trip: what was stored loads back the same. */
  c = xopen (&o, NULL);
  if (nmodel > 0 && model[nmodel - 1].pending)
    model_delete (nmodel - 1);
  compare (c, "final reopen");
  xclose (c);
}

/* ---- Corrupted files ----------------------------------------------- */

static uint8_t *good;           /* a valid file: 3 checkpoints */
static size_t good_len;

static void
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

static void
write_file (const uint8_t *buf, size_t len)
{
  int fd = open (path, O_WRONLY | O_CREAT | O_TRUNC, 0644);

  if (fd == -1 || write (fd, buf, len) != (ssize_t) len)
    exit (EXIT_FAILURE);
  close (fd);
}

static uint32_t
crc (const uint8_t *p, size_t len)
{
  return (uint32_t) crc32 (0, p, (uInt) len);
}

/* The newest valid superblock. */
static uint8_t *
active_sb (uint8_t *f)
{
  uint8_t *a = f, *b = f + SB_SIZE;
  bool va = get32 (a + SB_CRC) == crc (a, SB_CRC);
  bool vb = get32 (b + SB_CRC) == crc (b, SB_CRC);

  if (va && vb)
    return get64 (a + SB_SEQ) > get64 (b + SB_SEQ) ? a : b;
  return va ? a : b;
}

static void
fix_sb (uint8_t *sb)
{
  put32 (sb + SB_CRC, crc (sb, SB_CRC));
}

/* Fix the table crc in the superblock, then the superblock crc. */
static void
fix_table (uint8_t *f)
{
  uint8_t *sb = active_sb (f);
  put32 (sb + SB_TABLE_CRC, crc (f + get64 (sb + SB_TABLE_OFF),
                                 get32 (sb + SB_TABLE_SIZE)));
  fix_sb (sb);
}

static uint8_t *
entry (uint8_t *f, unsigned i)
{
  return f + get64 (active_sb (f) + SB_TABLE_OFF) + i * ENTRY_SIZE;
}

/* Fix the crc of the frozen bitmap of entry I. */
static void
fix_bitmap (uint8_t *f, unsigned i)
{
  uint8_t *e = entry (f, i);
  put32 (e + CP_BM_CRC, crc (f + get64 (e + CP_BM_OFF), (NR_GRAN + 7) / 8));
  fix_table (f);
}

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

static void
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
  c = xopen (&o, &info);
  CHECK (info.fallback && !info.invalidated);
  CHECK (strstr (info.message, "damaged") != NULL);
  CHECK (cbt_checkpoint_count (c) == 3);        /* a, b, c: no d */
  {
    uint8_t *after = changed_since (c, "b");
    CHECK (memcmp (before, after, NR_GRAN) == 0);
    free (after);
  }
  xclose (c);
  free (before);
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

/* ---- Crashes ------------------------------------------------------- */

/* Default mode: a child marks (or not) and exits without closing. */
static void
in_use_test (bool do_mark)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_IN_USE);
  struct cbt_load_info info;
  struct cbt *c;
  pid_t pid;
  int status;

  make_good ();
  pid = fork ();
  if (pid == 0) {
    c = xopen (&o, NULL);
    if (do_mark && cbt_mark (c, 5 * GRAN, GRAN, NULL) == -1)
      _exit (2);
    _exit (0);                  /* no cbt_close */
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status) &&
         WEXITSTATUS (status) == 0);
  c = xopen (&o, &info);
  if (do_mark) {
    CHECK (info.invalidated && info.dropped == 3);
    CHECK (strstr (info.message, "next backup must be full") != NULL);
    CHECK (cbt_checkpoint_count (c) == 0);
  }
  else {
    CHECK (!info.invalidated && cbt_checkpoint_count (c) == 3);
  }
  xclose (c);
  if (do_mark) {                /* and the invalidation was stored */
    c = xopen (&o, &info);
    CHECK (!info.invalidated && cbt_checkpoint_count (c) == 0);
    xclose (c);
  }
}

/* Write-ahead mode: a child marks and commits, reporting each committed
 * range on a pipe, until the parent kills it.
 */
static void
wal_crash_test (unsigned round)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t want[NR_GRAN] = { 0 }, *got;
  uint64_t r[2];
  int fds[2], status;
  unsigned n = 0, kill_after = 20 + (unsigned) (rnd () % 300);
  pid_t pid;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 0, GRAN, NULL) == 0);
  xclose (c);
  o.reset = false;
  if (pipe (fds) == -1)
    exit (EXIT_FAILURE);
  want[0] = 1;

  pid = fork ();
  if (pid == 0) {
    uint64_t seed = rnd_state + round;
    close (fds[0]);
    c = xopen (&o, NULL);
    /* Round 1 mod 3: a second checkpoint; 2 mod 3: a backup that is
     * still pending when the child dies (merged back at load).
     */
    if (round % 3 &&
        cbt_checkpoint_create (c, round % 3 == 1 ? "later" : "backup",
                               round % 3 == 2, err, sizeof err) == -1)
      _exit (2);
    for (;;) {
      uint64_t t;
      seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
      r[0] = (seed >> 20) % DISK;
      r[1] = 1 + (seed >> 8) % (3 * GRAN);
      if (r[1] > DISK - r[0])
        r[1] = DISK - r[0];
      if (cbt_mark (c, r[0], r[1], &t) == -1 || cbt_commit (c, t) == -1)
        _exit (3);
      if (write (fds[1], r, sizeof r) != sizeof r)
        _exit (4);
    }
  }
  close (fds[1]);
  while (read (fds[0], r, sizeof r) == sizeof r) {
    for (uint64_t g = r[0] / GRAN; g <= (r[0] + r[1] - 1) / GRAN; ++g)
      want[g] = 1;
    if (++n == kill_after)
      kill (pid, SIGKILL);      /* what it wrote before dying counts */
  }
  close (fds[0]);
  CHECK (waitpid (pid, &status, 0) == pid && WIFSIGNALED (status));

  c = xopen (&o, &info);
  CHECK (!info.invalidated);
  CHECK (info.dropped == (round % 3 == 2 ? 1u : 0u));
  CHECK (cbt_checkpoint_count (c) == (round % 3 == 1 ? 2u : 1u));
  got = changed_since (c, "base");
  for (size_t g = 0; g < NR_GRAN; ++g)
    if (want[g] && !got[g]) {
      FAIL ("round %u: granule %zu was committed but is not in the set "
            "after kill -9", round, g);
      break;
    }
  free (got);
  xclose (c);
}

/* A child leaves the file open in MODE after a mark (committed). */
static void
child_marks (enum cbt_mode mode, uint64_t off, struct cbt_load_info *info)
{
  struct cbt_options o = options (DISK, GRAN, mode);
  pid_t pid = fork ();
  int status;

  if (pid == 0) {
    struct cbt *c = xopen (&o, info);
    uint64_t t;
    if (cbt_mark (c, off, 1, &t) == -1 || cbt_commit (c, t) == -1)
      _exit (2);
    _exit (info->invalidated ? 3 : 0);
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status) &&
         WEXITSTATUS (status) == 0);
}

/* Crashed in write-ahead mode, then reopened and crashed in in-use
 * mode: the second crash must invalidate (its marks were in memory).
 */
static void
mode_switch_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  xclose (c);
  child_marks (CBT_MODE_WRITE_AHEAD, 10 * GRAN, &info);
  child_marks (CBT_MODE_IN_USE, 20 * GRAN, &info);
  o.reset = false;
  c = xopen (&o, &info);
  CHECK (info.invalidated && cbt_checkpoint_count (c) == 0);
  xclose (c);
}

/* ---- Write errors -------------------------------------------------- */

/* In a child: writes at or past the current bitmap fail (EFBIG). */
static void
write_error_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  struct cbt_load_info info;
  struct cbt *c;
  uint8_t *f, *got;
  size_t len;
  uint64_t cur_off, t;
  pid_t pid;
  int status;

  o.reset = true;
  c = xopen (&o, NULL);
  CHECK (cbt_checkpoint_create (c, "base", false, err, sizeof err) == 0);
  CHECK (cbt_mark (c, 3 * GRAN, 1, &t) == 0 && cbt_commit (c, t) == 0);
  xclose (c);
  o.reset = false;
  read_file (&f, &len);
  cur_off = get64 (active_sb (f) + SB_CUR_OFF);
  free (f);

  pid = fork ();
  if (pid == 0) {
    struct rlimit rl = { .rlim_cur = cur_off, .rlim_max = RLIM_INFINITY };
    int code = 0;

    signal (SIGXFSZ, SIG_IGN);
    c = xopen (&o, NULL);
    if (setrlimit (RLIMIT_FSIZE, &rl) == -1)
      _exit (10);
    if (cbt_mark (c, 400 * GRAN, 1, &t) == -1 || t == 0)
      code |= 1;                /* the mark itself is in memory */
    if (cbt_commit (c, t) != -1 || errno != EIO)
      code |= 2;                /* the page write fails */
    if (cbt_mark (c, 500 * GRAN, 1, &t) != -1 || errno != EIO)
      code |= 4;                /* sticky */
    if (cbt_checkpoint_create (c, "x", false, err, sizeof err) != -1 ||
        errno != EIO || strstr (err, "earlier write") == NULL)
      code |= 8;
    if (cbt_close (c, err, sizeof err) != -1)
      code |= 16;
    _exit (code);
  }
  CHECK (waitpid (pid, &status, 0) == pid && WIFEXITED (status));
  if (WEXITSTATUS (status) != 0)
    FAIL ("write error child: status %d", WEXITSTATUS (status));
  c = xopen (&o, &info);
  CHECK (!info.invalidated && cbt_checkpoint_count (c) == 1);
  got = changed_since (c, "base");
  CHECK (got[3]);
  free (got);
  xclose (c);
}

/* ---- Group commit from threads ------------------------------------- */

static struct cbt *gc_cbt;

static void *
gc_thread (void *arg)
{
  uint64_t seed = (uintptr_t) arg;

  for (int i = 0; i < 300; ++i) {
    uint64_t t, off;
    seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
    off = (seed >> 16) % DISK;
    /* (cbt_is_durable may be false again at once: another thread may
     * have changed the same page since.)
     */
    if (cbt_mark (gc_cbt, off, 1, &t) == -1 || cbt_commit (gc_cbt, t) == -1)
      return (void *) 1;
  }
  return NULL;
}

static void
group_commit_test (void)
{
  struct cbt_options o = options (DISK, GRAN, CBT_MODE_WRITE_AHEAD);
  pthread_t th[4];
  struct cbt_stats st;
  void *ret;

  o.reset = true;
  gc_cbt = xopen (&o, NULL);
  for (uintptr_t i = 0; i < 4; ++i)
    pthread_create (&th[i], NULL, gc_thread, (void *) (i + 1));
  for (int i = 0; i < 4; ++i) {
    pthread_join (th[i], &ret);
    CHECK (ret == NULL);
  }
  cbt_get_stats (gc_cbt, &st);
  printf ("test-cbt: group commit: %" PRIu64 " marks, %" PRIu64
          " waiting commits, %" PRIu64 " syncs, %" PRIu64 " pages\n",
          st.marks, st.commits, st.syncs, st.pages_written);
  CHECK (st.syncs <= st.commits && st.syncs > 0);
  xclose (gc_cbt);
}

int
main (void)
{
  if (mkdtemp (tmpdir) == NULL) {
    perror ("mkdtemp");
    exit (EXIT_FAILURE);
  }
  snprintf (path, sizeof path, "%s/cbt", tmpdir);

  CHECK (cbt_name_valid ("a") && cbt_name_valid ("backup-2024.01_x"));
  CHECK (!cbt_name_valid ("") && !cbt_name_valid ("a b") &&
         !cbt_name_valid ("-a") && !cbt_name_valid ("\x7f"));
  {
    char longname[CBT_NAME_MAX + 2];
    memset (longname, 'n', sizeof longname - 1);
    longname[sizeof longname - 1] = '\0';
    CHECK (!cbt_name_valid (longname));
    longname[CBT_NAME_MAX] = '\0';
    CHECK (cbt_name_valid (longname));
  }

  model_test (CBT_MODE_IN_USE, 1500);
  model_test (CBT_MODE_WRITE_AHEAD, 1500);
  printf ("test-cbt: model tests done\n");
  corruption_tests ();
  torn_test ();
  feature_test ();
  in_use_test (true);
  in_use_test (false);
  for (unsigned round = 0; round < 6; ++round)
    wal_crash_test (round);
  printf ("test-cbt: crash tests done\n");
  mode_switch_test ();
  write_error_test ();
  group_commit_test ();

  unlink (path);
  rmdir (tmpdir);
  if (failures) {
    fprintf (stderr, "test-cbt: %u failures\n", failures);
    return EXIT_FAILURE;
  }
  printf ("test-cbt: PASS\n");
  return EXIT_SUCCESS;
}
