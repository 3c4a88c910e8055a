/* sparsebackup-copy: copy a backup view from NBD to a raw file, a block
 * device or another NBD export; keep a manifest of what was copied;
 * verify a stored backup against its manifest.
 *
 * nbdkit 1.32 can only send base:allocation, so a sparsebackup view says
 * "not part of this backup" with NBD_STATE_HOLE without NBD_STATE_ZERO.
 * Without --delta such extents are copied as data (their contents are
 * defined); with --delta they are skipped, leaving the target's bytes (the
 * previous backup) as they are.  Extents with NBD_STATE_ZERO are zeroed on
 * the target, everything else is copied.
 *
 * One thread: up to --requests commands in flight on the source (reads,
 * plus one block status query ahead) and on an NBD target (writes and
 * zeroes), driven by one poll loop over both sockets.  A file target is
 * written synchronously from the loop.  Memory: --requests buffers of
 * --request-size bytes, the extents of one block status reply, and 32
 * bytes per manifest chunk.
 *
 * A journal beside the target (or --journal=FILE) marks it incomplete
 * while the copy runs and records, write-ahead, how far it is durably
 * done: running the same command again completes it.
 *
 * Nothing from outside is trusted: extents are clipped to the range
 * asked for, zero-length extents are ignored, a reply that makes no
 * progress is an error; journals and manifests are validated field by
 * field and carry a checksum; a target that looks like an image format
 * is not overwritten without --force.
 *
 * This file: argument parsing and main.  The parts: see copy.h.
 */

#define _GNU_SOURCE             /* asprintf */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <signal.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/fs.h>

#include <libnbd.h>

#include "minmax.h"
#include "ispowerof2.h"
#include "copy.h"

/* ---- Options that only main uses -------------------------------------- */

static const char *manifest_path;
static const char *base_manifest_path;
static const char *verify_path;
static bool manifest_only;
static bool no_journal;
static const char *journal_opt;
static uint64_t chunk_opt;

/* ---- Argument parsing ------------------------------------------------- */

static void __attribute__ ((noreturn))
usage (FILE *fp, int status)
{
  fprintf (fp,
"Usage: " PROG " [OPTIONS] SRC DST\n"
"       " PROG " --manifest-only --manifest=FILE [OPTIONS] SRC\n"
"       " PROG " --verify=MANIFEST [OPTIONS] TARGET\n"
"Copy an NBD export (a sparsebackup view) to a raw file, a block device\n"
"or another NBD export; keep a manifest of it; verify a stored backup.\n"
"\n"
"  SRC  an NBD URI (nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH)\n"
"       or [ CMD ARGS ... ] to run a server with systemd socket activation\n"
"  DST, TARGET  a raw file or block device, an NBD URI, or [ CMD ARGS ... ]\n"
"\n"
"Options (before SRC):\n"
"  --delta              skip extents that are HOLE without ZERO (not part\n"
"                       of this backup): DST keeps its bytes there; DST\n"
"                       must have SRC's size\n"
"  --force              write over a DST that holds an image format\n"
"                       (qcow2, LUKS, VMDK, VHD(X), VDI, QED, ...)\n"
"  --allow-larger       a block device or NBD export DST may be larger\n"
"                       than SRC (its tail is left as it is)\n"
"  --journal=FILE       record the progress of the copy in FILE (default\n"
"                       DST" JOURNAL_SUFFIX " for a file DST; needed\n"
"                       for a block device or NBD DST)\n"
"  --no-journal         no journal: an interrupted copy is not detected\n"
"  --journal-every=SIZE sync DST and update the journal every SIZE of the\n"
"                       disk (default 1G) and every 10 s\n"
"  --restart            ignore an interrupted copy's progress in the\n"
"                       journal and copy from the start\n"
"  --manifest=FILE      write a manifest of SRC (SHA-256 per chunk); with\n"
"                       --delta, update FILE (or the --base-manifest)\n"
"  --base-manifest=FILE with --delta: the previous backup's manifest\n"
"  --chunk-size=SIZE    manifest chunk, a power of 2 from 4K to 64M\n"
"                       (default 1M, more for disks over 16T)\n"
"  --manifest-only      no DST: only write the --manifest of SRC\n"
"  --verify=MANIFEST    check TARGET against MANIFEST (exit 1 if it differs)\n"
"  -p, --progress[=FD]  progress bar on stderr (or N/100 lines on FD)\n"
"  -q, --quiet          no summary line and no notes\n"
"  --requests=N         commands in flight (1..%d, default %d)\n"
"  --request-size=SIZE  bytes per read (512..32M, default 256K)\n"
"  --help, --version\n"
"See " PROG "(1).\n", MAX_REQUESTS, DEFAULT_REQUESTS);
  exit (status);
}

/* Parse a size with an optional binary suffix (K, M, G, T; KiB etc.). */
static bool
parse_size (const char *s, uint64_t *out)
{
  char *end;
  unsigned long long v;
  unsigned shift = 0;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno != 0)
    return false;
  switch (*end) {
  case 'k': case 'K': shift = 10; end++; break;
  case 'm': case 'M': shift = 20; end++; break;
  case 'g': case 'G': shift = 30; end++; break;
  case 't': case 'T': shift = 40; end++; break;
  }
  if (shift && strcmp (end, "iB") == 0)
    end += 2;
  else if (shift && strcmp (end, "B") == 0)
    end++;
  if (*end != '\0' || v > (UINT64_MAX >> shift))
    return false;
  *out = (uint64_t) v << shift;
  return true;
}

static bool
parse_uint (const char *s, uint64_t *out)
{
  char *end;
  unsigned long long v;

  if (*s < '0' || *s > '9')
    return false;
  errno = 0;
  v = strtoull (s, &end, 10);
  if (errno != 0 || *end != '\0')
    return false;
  *out = v;
  return true;
}

/* ARGV[*I] starts a location: either one word, or "[" CMD ... "]".  On
 * return *CMD is NULL or the NULL-terminated command (in ARGV), *NAME
 * what to call it in messages, and *I is past it.
 */
static void
take_location (int argc, char **argv, int *i, const char *what,
               char ***cmd, const char **name)
{
  int j;

  if (*i >= argc) {
    fprintf (stderr, PROG ": missing %s\n", what);
    usage (stderr, EXIT_FAILURE);
  }
  *cmd = NULL;
  *name = argv[*i];
  if (strcmp (argv[*i], "[") != 0) {
    (*i)++;
    return;
  }
  for (j = *i + 1; j < argc && strcmp (argv[j], "]") != 0; j++)
    ;
  if (j >= argc || j == *i + 1) {
    fprintf (stderr, PROG ": %s: '[' needs a command and a closing ']'\n",
             what);
    exit (EXIT_FAILURE);
  }
  argv[j] = NULL;
  *cmd = &argv[*i + 1];
  *name = argv[*i + 1];
  *i = j + 1;
}

static void __attribute__ ((noreturn))
usage_error (const char *msg)
{
  error_msg ("%s", msg);
  exit (EXIT_FAILURE);
}

/* ---- Pieces of main ----------------------------------------------------- */

static void
alloc_slots (void)
{
  unsigned i;

  slots = calloc (requests, sizeof *slots);
  zero_buf = malloc (request_size);
  if (slots == NULL || zero_buf == NULL)
    out_of_memory ();
  for (i = 0; i < requests; i++) {
    slots[i].buf = malloc (request_size);
    if (slots[i].buf == NULL) {
      error_msg ("out of memory for %u requests of %zu bytes",
                 requests, request_size);
      exit (EXIT_FAILURE);
    }
  }
}

static void
free_slots (void)
{
  unsigned i;

  if (slots)
    for (i = 0; i < requests; i++)
      free (slots[i].buf);
  free (slots);
  free (zero_buf);
  slots = NULL;
  zero_buf = NULL;
  extents_reset (&queue);
}

static void
on_signal (int sig)
{
  if (stop_signal) {
    /* A second one: stop now (the journal is right as it is). */
    signal (sig, SIG_DFL);
    raise (sig);
    return;
  }
  stop_signal = sig;
}

static void
catch_signals (void)
{
  struct sigaction sa;

  memset (&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigemptyset (&sa.sa_mask);
  sigaction (SIGINT, &sa, NULL);
  sigaction (SIGTERM, &sa, NULL);
}

/* After the cleanup of an interrupted copy: die of the signal, as the
 * shell expects of a program stopped by Ctrl-C.
 */
static void __attribute__ ((noreturn))
die_of_signal (void)
{
  int sig = stop_signal;

  fflush (stdout);
  signal (sig, SIG_DFL);
  raise (sig);
  _exit (128 + sig);
}

/* The checkpoint X of a view named @since:X or @frozen:since:X, or NULL. */
static const char *
since_checkpoint (const char *export)
{
  if (strncmp (export, "@frozen:since:", 14) == 0)
    return export + 14;
  if (strncmp (export, "@since:", 7) == 0)
    return export + 7;
  return NULL;
}

/* What to do about the interrupted copy J, for the messages. */
static char *
journal_advice (const struct journal *j, bool when_gone)
{
  char what[3 * MAX_STRING + 256], *s;
  const char *since = since_checkpoint (j->src.export);
  int r;

  journal_describe (j, what, sizeof what);
  if (!j->delta)
    r = asprintf (&s, "DST '%s' holds an interrupted %s (journal '%s'): run "
                  "that copy again to complete it, or make any full copy "
                  "over it.", dst_name, what, journal_path);
  else if (since && when_gone)
    r = asprintf (&s, "DST '%s' holds an interrupted %s (journal '%s'): run "
                  "that copy again to complete it.  If its backup has ended "
                  "(the view is gone), begin a new backup since %s "
                  "(sparsebackup-ctl CONTROL-SOCKET backup-begin NEW --since "
                  "%s) and copy its view @frozen:since:%s with --delta "
                  "--restart (it reports every block the interrupted view "
                  "did), or make a full copy (without --delta).",
                  dst_name, what, journal_path, since, since, since);
  else
    r = asprintf (&s, "DST '%s' holds an interrupted %s (journal '%s'): run "
                  "that copy again to complete it.  If that source is gone, "
                  "make a full copy (without --delta), or --delta --restart "
                  "from a view that reports as changed everything changed "
                  "since the backup DST held before (e.g. a new backup since "
                  "the same checkpoint).", dst_name, what, journal_path);
  if (r == -1)
    out_of_memory ();
  return s;
}

static void
print_summary (double t0, const char *state)
{
  if (quiet)
    return;
  printf (PROG ": copied %" PRIu64 " bytes, zeroed %" PRIu64
          " bytes, skipped %" PRIu64 " bytes of %" PRIu64 " in %.3f s",
          copied, zeroed, skipped, size, now () - t0);
  if (resumed)
    printf ("; %" PRIu64 " bytes were done by an earlier run", resumed);
  if (hash_read)
    printf ("; read %" PRIu64 " more bytes for the manifest", hash_read);
  printf ("%s\n", state);
  fflush (stdout);
}

/* The base manifest of a delta, and the chunk size. */
static void
manifest_setup (struct manifest *base, bool *have_base, uint64_t *chunk)
{
  *have_base = false;
  *chunk = chunk_opt ? chunk_opt : default_chunk_size (size);
  if (delta) {
    const char *bp = base_manifest_path ? base_manifest_path : manifest_path;

    manifest_load (bp, base);
    *have_base = true;
    if (base->size != size) {
      error_msg ("the base manifest '%s' is of a disk of %" PRIu64 " bytes, "
                 "SRC '%s' has %" PRIu64 ": it is not the previous backup's "
                 "manifest (make a full copy with a new manifest)",
                 bp, base->size, src_name, size);
      exit (EXIT_FAILURE);
    }
    if (chunk_opt && chunk_opt != base->chunk_size) {
      error_msg ("--chunk-size=%" PRIu64 " differs from the chunk size of "
                 "the base manifest '%s' (%" PRIu64 ")", chunk_opt, bp,
                 base->chunk_size);
      exit (EXIT_FAILURE);
    }
    *chunk = base->chunk_size;
  }
  if ((size + *chunk - 1) / *chunk > MAX_CHUNKS) {
    error_msg ("--chunk-size=%" PRIu64 " makes more than 2^24 chunks of the "
               "%" PRIu64 " bytes of SRC: choose a larger one", *chunk, size);
    exit (EXIT_FAILURE);
  }
}

static void
copy_source_id (struct source_id *to, const struct source_id *from)
{
  to->uri = xstrdup (from->uri);
  to->export = xstrdup (from->export);
  to->description = xstrdup (from->description);
  to->size = from->size;
}

/* ---- --verify ---------------------------------------------------------- */

static int
run_verify (const char *target_arg, char **target_cmd)
{
  char *target_name = target_cmd ? command_string (target_cmd)
    : xstrdup (target_arg);
  const char *target = target_name;
  struct manifest m, got = { 0 };
  uint64_t tsize, first = 0, bad;
  int64_t maxblock;
  double t0 = now ();
  bool ok;

  manifest_load (verify_path, &m);
  size = m.size;
  if (target_cmd || is_nbd_uri (target)) {
    struct source_id id = { 0 };

    src_name = target;
    src_cmd = target_cmd;
    src_label = "TARGET";
    src = connect_nbd ("TARGET", target_arg, target_cmd, true, &id, NULL);
    tsize = nbd_get_size (src);
    maxblock = nbd_get_block_size (src, LIBNBD_SIZE_MAXIMUM);
    if (maxblock > 0 && (uint64_t) maxblock < request_size)
      request_size = maxblock;
    free (id.uri);
    free (id.export);
    free (id.description);
    if ((int64_t) tsize < 0)
      die_nbd ("TARGET: cannot get the export size");
    have_extents = nbd_can_meta_context (src,
                                         LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    dst_kind = DST_NONE;
  }
  else {
    struct stat st;
    char *j;

    dst_fd = open (target, O_RDONLY | O_CLOEXEC);
    if (dst_fd == -1 || fstat (dst_fd, &st) == -1) {
      error_msg ("cannot open TARGET '%s': %s", target, strerror (errno));
      exit (EXIT_FAILURE);
    }
    if (S_ISBLK (st.st_mode)) {
      if (ioctl (dst_fd, BLKGETSIZE64, &tsize) == -1) {
        error_msg ("TARGET '%s': BLKGETSIZE64: %s", target, strerror (errno));
        exit (EXIT_FAILURE);
      }
    }
    else if (S_ISREG (st.st_mode))
      tsize = st.st_size;
    else {
      error_msg ("TARGET '%s' is not a regular file, block device or NBD "
                 "URI", target);
      exit (EXIT_FAILURE);
    }
    if (asprintf (&j, "%s" JOURNAL_SUFFIX, target) == -1)
      out_of_memory ();
    if (access (j, F_OK) == 0)
      note_msg ("warning: '%s' exists: TARGET is the target of an "
                "interrupted copy, and is incomplete", j);
    free (j);
  }
  if (tsize != m.size && !(tsize > m.size && allow_larger)) {
    error_msg ("TARGET '%s' is %" PRIu64 " bytes, the manifest '%s' is of %"
               PRIu64 " bytes%s", target, tsize, verify_path, m.size,
               tsize > m.size ? " (--allow-larger checks the first part of a "
               "larger device)" : "");
    exit (EXIT_FAILURE);
  }

  if (src) {
    hasher_start (&got, m.size, m.chunk_size, NULL);
    alloc_slots ();
    engine_init (0);
    copy ();
    close_source ();
    free_slots ();
    ok = !failed && !stop_signal;
  }
  else {
    ok = hash_file (dst_fd, target, &got, m.size, m.chunk_size);
    close (dst_fd);
  }
  progress_update (true);
  progress_end ();
  if (!ok) {
    if (stop_signal)
      die_of_signal ();
    error_msg ("TARGET '%s' could not be read to the end: not verified",
               target);
    return EXIT_FAILURE;
  }
  bad = manifest_compare (&m, &got, target, 10, &first);
  if (bad) {
    if (bad > 10)
      printf (PROG ": ... and %" PRIu64 " more chunks\n", bad - 10);
    printf (PROG ": TARGET '%s' differs from the manifest '%s': %" PRIu64
            " of %" PRIu64 " chunks differ, the first at offset %" PRIu64 "\n",
            target, verify_path, bad, m.nr_chunks, first);
  }
  else if (!quiet)
    printf (PROG ": TARGET '%s' matches the manifest '%s' (%" PRIu64
            " bytes, %" PRIu64 " chunks of %" PRIu64 ") in %.3f s\n",
            target, verify_path, m.size, m.nr_chunks, m.chunk_size,
            now () - t0);
  manifest_free (&m);
  manifest_free (&got);
  free (target_name);
  return bad ? EXIT_FAILURE : EXIT_SUCCESS;
}

/* ---- --manifest-only --------------------------------------------------- */

static int
run_manifest_only (void)
{
  struct manifest base = { 0 }, out = { 0 };
  bool have_base;
  uint64_t chunk;
  double t0 = now ();
  int status = EXIT_SUCCESS;

  open_source (NULL);
  manifest_setup (&base, &have_base, &chunk);
  if (!manifest_check_writable (manifest_path))
    exit (EXIT_FAILURE);
  hasher_start (&out, size, chunk, have_base ? &base : NULL);
  dst_kind = DST_NONE;
  alloc_slots ();
  catch_signals ();
  engine_init (0);
  copy ();
  close_source ();
  progress_update (true);
  progress_end ();
  if (!failed && !stop_signal) {
    copy_source_id (&out.src, &src_id);
    if (!manifest_save (manifest_path, &out))
      status = EXIT_FAILURE;
  }
  else
    status = EXIT_FAILURE;
  if (!quiet)
    printf (PROG ": manifest '%s': read %" PRIu64 " bytes, zero %" PRIu64
            " bytes, kept %" PRIu64 " bytes of %" PRIu64 " in %.3f s%s\n",
            manifest_path, copied + hash_read, zeroed, skipped, size,
            now () - t0, status ? " (FAILED)" : "");
  free_slots ();
  manifest_free (&base);
  manifest_free (&out);
  if (stop_signal)
    die_of_signal ();
  return status;
}

/* ---- The copy ---------------------------------------------------------- */

/* Where the journal goes, before anything is opened. */
static void
choose_journal (void)
{
  struct stat st;

  if (no_journal)
    return;
  if (journal_opt) {
    journal_path = journal_opt;
    return;
  }
  if (!dst_cmd && !is_nbd_uri (dst_name) && stat (dst_name, &st) == 0 &&
      S_ISDIR (st.st_mode)) {
    error_msg ("cannot open DST '%s': %s", dst_name, strerror (EISDIR));
    exit (EXIT_FAILURE);
  }
  if (!dst_cmd && !is_nbd_uri (dst_name) &&
      (stat (dst_name, &st) == -1 ? errno == ENOENT : S_ISREG (st.st_mode))) {
    char *j;

    if (asprintf (&j, "%s" JOURNAL_SUFFIX, dst_name) == -1)
      out_of_memory ();
    journal_path = j;
    return;
  }
  error_msg ("DST '%s' is not a regular file: name a journal for it with "
             "--journal=FILE (on another disk; it records how far a copy "
             "got, so that an interrupted copy is detected and can be "
             "completed), or --no-journal", dst_name);
  exit (EXIT_FAILURE);
}

/* Decide where the copy starts, given the journal J found (if LOADED). */
static uint64_t
resume_point (const struct journal *j, bool loaded, const char *target,
              uint64_t inode)
{
  bool same_src, same_dst;
  char *advice;

  if (!loaded)
    return 0;
  same_src = source_id_equal (&j->src, &src_id);
  same_dst = strcmp (j->target, target) == 0 &&
    (j->target_inode == 0 || j->target_inode == inode);
  if (restart) {
    note_msg ("--restart: ignoring the interrupted copy in '%s'; copying "
              "from the start", journal_path);
    return 0;
  }
  if (!same_dst) {
    if (delta) {
      error_msg ("the journal '%s' is of another target ('%s', inode %"
                 PRIu64 "), not DST '%s' (inode %" PRIu64 "): check what "
                 "DST holds; --restart ignores the journal",
                 journal_path, j->target, j->target_inode, target, inode);
      exit (EXIT_FAILURE);
    }
    note_msg ("the journal '%s' is of another target ('%s'): copying all of "
              "DST", journal_path, j->target);
    return 0;
  }
  if (same_src && j->delta == delta) {
    if (dst_kind == DST_FILE && dst_size != size) {
      /* The target was cut or replaced since: start again. */
      if (delta) {
        advice = journal_advice (j, false);
        error_msg ("DST '%s' no longer has the size of SRC. %s",
                   dst_name, advice);
        exit (EXIT_FAILURE);
      }
      note_msg ("DST '%s' changed size since the interrupted copy: copying "
                "from the start", dst_name);
      return 0;
    }
    note_msg ("resuming the interrupted copy of '%s' at offset %" PRIu64
              " of %" PRIu64, src_name, j->done, size);
    return j->done;
  }
  if (!delta) {
    note_msg ("DST '%s' held an interrupted %s copy from SRC '%s': the "
              "full copy starts from the beginning", dst_name,
              j->delta ? "--delta" : "full", j->src.uri);
    return 0;
  }
  advice = journal_advice (j, true);
  if (same_src)
    error_msg ("--delta over an interrupted full copy from the same SRC: "
               "DST is not a previous backup.  %s", advice);
  else
    error_msg ("--delta from SRC '%s' (export '%s'%s%s%s) refused: a delta "
               "from another source over an incomplete target would leave "
               "it neither backup.  %s", src_name, src_id.export,
               *src_id.description ? ", '" : "", src_id.description,
               *src_id.description ? "'" : "", advice);
  exit (EXIT_FAILURE);
}

static int
run_copy (void)
{
  struct journal j;
  struct manifest base = { 0 }, out = { 0 };
  bool loaded = false, have_base = false, complete;
  uint64_t chunk = 0, start, inode;
  char *after = NULL, *target;
  double t0 = now ();

  choose_journal ();
  if (journal_path)
    loaded = journal_load (journal_path, &j) == 1;
  if (loaded)
    after = journal_advice (&j, true);

  open_source (after);
  if (dst_cmd || is_nbd_uri (dst_name))
    open_nbd_target ();
  else
    open_file_target ();
  if (manifest_path) {
    manifest_setup (&base, &have_base, &chunk);
    if (!manifest_check_writable (manifest_path))
      exit (EXIT_FAILURE);
  }
  check_target ();

  if (!delta)
    create_file_target ();      /* a new file target */
  target = target_identity (&inode);
  start = resume_point (&j, loaded, target, inode);
  journal_set_identity (target, inode);
  /* The journal says "incomplete" before the target changes. */
  if (journal_path && !journal_write (start))
    exit (EXIT_FAILURE);
  if (!delta)
    size_file_target ();

  if (manifest_path)
    hasher_start (&out, size, chunk, have_base ? &base : NULL);
  alloc_slots ();
  catch_signals ();
  engine_init (start);
  copy ();
  complete = !failed && !stop_signal && watermark == size;
  if (!failed && !stop_signal && copied + zeroed + skipped + resumed != size)
    fail ("internal error: %" PRIu64 " of %" PRIu64 " bytes done",
          copied + zeroed + skipped + resumed, size);
  close_ends ();
  if (complete && !failed) {
    progress_update (true);
    progress_end ();
    if (manifest_path) {
      /* Until the manifest is written, the journal keeps saying that
       * something is left: a rerun writes it.
       */
      if (!journal_write (size))
        failed = true;
      else {
        copy_source_id (&out.src, &src_id);
        if (!manifest_save (manifest_path, &out))
          failed = true;
      }
    }
    if (!failed && !journal_remove ())
      failed = true;
  }
  progress_end ();
  print_summary (t0, stop_signal && !complete ? " (INTERRUPTED)"
                 : failed ? " (FAILED)" : "");
  if (!complete || failed) {
    if (journal_path)
      error_msg ("DST '%s' is incomplete: %" PRIu64 " of %" PRIu64 " bytes "
                 "done%s; the journal '%s' records it: run the same command "
                 "again to complete the copy",
                 dst_name, MIN (watermark, size), size,
                 stop_signal ? (stop_signal == SIGINT ? ", interrupted by "
                                "SIGINT" : ", interrupted by SIGTERM") : "",
                 journal_path);
    else
      error_msg ("DST '%s' is incomplete (%" PRIu64 " of %" PRIu64 " bytes "
                 "done) and no journal records it (--no-journal): copy it "
                 "again in full", dst_name, MIN (watermark, size), size);
  }

  free (after);
  free (target);
  if (loaded)
    journal_free (&j);
  free_slots ();
  manifest_free (&base);
  manifest_free (&out);
  if (stop_signal && !complete)
    die_of_signal ();
  return complete && !failed ? EXIT_SUCCESS : EXIT_FAILURE;
}

int
main (int argc, char **argv)
{
  enum { OPT_DELTA = 256, OPT_REQUESTS, OPT_REQUEST_SIZE, OPT_HELP,
         OPT_VERSION, OPT_FORCE, OPT_ALLOW_LARGER, OPT_JOURNAL,
         OPT_NO_JOURNAL, OPT_JOURNAL_EVERY, OPT_RESTART, OPT_MANIFEST,
         OPT_BASE_MANIFEST, OPT_CHUNK_SIZE, OPT_MANIFEST_ONLY, OPT_VERIFY };
  static const struct option long_options[] = {
    { "delta", no_argument, NULL, OPT_DELTA },
    { "force", no_argument, NULL, OPT_FORCE },
    { "allow-larger", no_argument, NULL, OPT_ALLOW_LARGER },
    { "journal", required_argument, NULL, OPT_JOURNAL },
    { "no-journal", no_argument, NULL, OPT_NO_JOURNAL },
    { "journal-every", required_argument, NULL, OPT_JOURNAL_EVERY },
    { "restart", no_argument, NULL, OPT_RESTART },
    { "manifest", required_argument, NULL, OPT_MANIFEST },
    { "base-manifest", required_argument, NULL, OPT_BASE_MANIFEST },
    { "chunk-size", required_argument, NULL, OPT_CHUNK_SIZE },
    { "manifest-only", no_argument, NULL, OPT_MANIFEST_ONLY },
    { "verify", required_argument, NULL, OPT_VERIFY },
    { "progress", optional_argument, NULL, 'p' },
    { "quiet", no_argument, NULL, 'q' },
    { "requests", required_argument, NULL, OPT_REQUESTS },
    { "request-size", required_argument, NULL, OPT_REQUEST_SIZE },
    { "help", no_argument, NULL, OPT_HELP },
    { "version", no_argument, NULL, OPT_VERSION },
    { NULL },
  };
  uint64_t v;
  int c, ai;

  /* A closed progress pipe must not kill the copy (write gets EPIPE). */
  signal (SIGPIPE, SIG_IGN);

  /* "+": options stop at SRC, so that [ CMD -ARGS ] stay the command's. */
  while ((c = getopt_long (argc, argv, "+pq", long_options, NULL)) != -1) {
    switch (c) {
    case OPT_DELTA:
      delta = true;
      break;
    case OPT_FORCE:
      force = true;
      break;
    case OPT_ALLOW_LARGER:
      allow_larger = true;
      break;
    case OPT_JOURNAL:
      if (*optarg == '\0')
        usage_error ("--journal: the file name is empty");
      journal_opt = optarg;
      break;
    case OPT_NO_JOURNAL:
      no_journal = true;
      break;
    case OPT_JOURNAL_EVERY:
      if (!parse_size (optarg, &v) || v == 0) {
        error_msg ("--journal-every: '%s' is not a size of at least 1 byte",
                   optarg);
        exit (EXIT_FAILURE);
      }
      journal_every = v;
      break;
    case OPT_RESTART:
      restart = true;
      break;
    case OPT_MANIFEST:
      if (*optarg == '\0')
        usage_error ("--manifest: the file name is empty");
      manifest_path = optarg;
      break;
    case OPT_BASE_MANIFEST:
      if (*optarg == '\0')
        usage_error ("--base-manifest: the file name is empty");
      base_manifest_path = optarg;
      break;
    case OPT_CHUNK_SIZE:
      if (!parse_size (optarg, &v) || v < MIN_CHUNK_SIZE ||
          v > MAX_CHUNK_SIZE || !is_power_of_2 (v)) {
        error_msg ("--chunk-size: '%s' is not a power of 2 from 4K to 64M",
                   optarg);
        exit (EXIT_FAILURE);
      }
      chunk_opt = v;
      break;
    case OPT_MANIFEST_ONLY:
      manifest_only = true;
      break;
    case OPT_VERIFY:
      if (*optarg == '\0')
        usage_error ("--verify: the manifest name is empty");
      verify_path = optarg;
      break;
    case 'p':
      if (optarg == NULL) {
        progress_fd = STDERR_FILENO;
        progress_bar = true;
      }
      else if (!parse_uint (optarg, &v) || v > INT_MAX ||
               fcntl ((int) v, F_GETFD) == -1) {
        error_msg ("--progress: '%s' is not an open file descriptor", optarg);
        exit (EXIT_FAILURE);
      }
      else
        progress_fd = v;
      break;
    case 'q':
      quiet = true;
      break;
    case OPT_REQUESTS:
      if (!parse_uint (optarg, &v) || v < 1 || v > MAX_REQUESTS) {
        error_msg ("--requests: '%s' is not a number from 1 to %d",
                   optarg, MAX_REQUESTS);
        exit (EXIT_FAILURE);
      }
      requests = v;
      break;
    case OPT_REQUEST_SIZE:
      if (!parse_size (optarg, &v) || v < MIN_REQUEST_SIZE ||
          v > MAX_REQUEST_SIZE) {
        error_msg ("--request-size: '%s' is not a size from 512 to 32M",
                   optarg);
        exit (EXIT_FAILURE);
      }
      request_size = v;
      break;
    case OPT_HELP:
      usage (stdout, EXIT_SUCCESS);
    case OPT_VERSION:
      printf (PROG " %s\n", PACKAGE_VERSION);
      exit (EXIT_SUCCESS);
    default:
      usage (stderr, EXIT_FAILURE);
    }
  }

  /* Options that go together. */
  if (journal_opt && no_journal)
    usage_error ("--journal and --no-journal exclude each other");
  if (verify_path &&
      (delta || manifest_path || manifest_only || journal_opt || no_journal ||
       restart || force || base_manifest_path || chunk_opt))
    usage_error ("--verify takes no copy options (--delta, --manifest, "
                 "--journal, --force, ...): only --allow-larger, -p, -q, "
                 "--requests, --request-size");
  if (manifest_only && !manifest_path)
    usage_error ("--manifest-only needs --manifest=FILE");
  if (manifest_only && (journal_opt || no_journal || restart || force ||
                        allow_larger))
    usage_error ("--manifest-only writes no DST: --journal, --no-journal, "
                 "--restart, --force and --allow-larger do not apply");
  if (base_manifest_path && !(delta && manifest_path))
    usage_error ("--base-manifest needs --delta and --manifest=FILE");
  if (chunk_opt && !manifest_path)
    usage_error ("--chunk-size needs --manifest=FILE");

  ai = optind;
  if (verify_path) {
    char **cmd;
    const char *target;

    take_location (argc, argv, &ai, "TARGET", &cmd, &target);
    if (ai < argc) {
      error_msg ("unexpected argument '%s' (options go before TARGET)",
                 argv[ai]);
      exit (EXIT_FAILURE);
    }
    return run_verify (target, cmd);
  }
  take_location (argc, argv, &ai, "SRC", &src_cmd, &src_name);
  if (!manifest_only)
    take_location (argc, argv, &ai, "DST", &dst_cmd, &dst_name);
  if (ai < argc) {
    error_msg ("unexpected argument '%s' (options go before SRC)", argv[ai]);
    exit (EXIT_FAILURE);
  }
  if (!src_cmd && !is_nbd_uri (src_name)) {
    error_msg ("SRC '%s' is not an NBD URI (nbd://, nbd+unix://, ...)",
               src_name);
    exit (EXIT_FAILURE);
  }
  if (!src_cmd && strlen (src_name) > MAX_STRING) {
    error_msg ("SRC is longer than %d bytes", MAX_STRING);
    exit (EXIT_FAILURE);
  }
  if (manifest_only)
    return run_manifest_only ();
  return run_copy ();
}
