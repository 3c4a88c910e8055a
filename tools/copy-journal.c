/* sparsebackup-copy: the journal of an unfinished copy.
 *
 * While a copy runs, a small text file (by default DST.sparsebackup-journal
 * beside a file target; --journal=FILE) says that the target is
 * incomplete, which source it is being copied from, and how far the
 * target is done and durable.  It is written before the first byte of
 * the target changes, replaced atomically as the copy goes (only after
 * the target has been synced up to the offset it records: write ahead),
 * and removed once the target is complete and synced.  A kill at any
 * point leaves either no journal (the target is complete, or was not
 * touched yet) or one that claims no more than was durably done.
 *
 * Format (version 1), every value escaped (copy-files.c):
 *
 *   sparsebackup-copy journal 1
 *   target /abs/path/of/target.img      (or the NBD URI)
 *   target-inode 1234567                (0 for a device or NBD)
 *   mode full|delta
 *   source-uri nbd+unix:///@frozen:since:c1?socket=/run/disk.sock
 *   source-export @frozen:since:c1
 *   source-description the disk as it was at backup-begin c2, ...
 *   source-size 10737418240
 *   done 4294967296
 *   sha256 <hex of everything above>
 */

#include <config.h>

#include <errno.h>
#include <inttypes.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "copy.h"

#define JOURNAL_MAGIC "sparsebackup-copy journal"
#define JOURNAL_VERSION 1

static char *j_target;
static uint64_t j_inode;

void
journal_set_identity (const char *target, uint64_t inode)
{
  free (j_target);
  j_target = xstrdup (target);
  j_inode = inode;
}

bool
source_id_equal (const struct source_id *a, const struct source_id *b)
{
  return a->size == b->size && strcmp (a->uri, b->uri) == 0 &&
    strcmp (a->export, b->export) == 0 &&
    strcmp (a->description, b->description) == 0;
}

void
journal_describe (const struct journal *j, char *buf, size_t n)
{
  snprintf (buf, n, "%s copy from SRC '%s' (export '%s'%s%s%s, %" PRIu64
            " bytes), %" PRIu64 " of %" PRIu64 " bytes done",
            j->delta ? "--delta" : "full", j->src.uri, j->src.export,
            *j->src.description ? ", '" : "", j->src.description,
            *j->src.description ? "'" : "", j->src.size, j->done,
            j->src.size);
}

bool
journal_write (uint64_t done)
{
  struct text_out t;
  char *target, *uri, *export, *desc;

  if (journal_path == NULL)
    return true;
  if (!text_out_begin (&t, journal_path, JOURNAL_MAGIC, "journal"))
    return false;
  target = escape_string (j_target);
  uri = escape_string (src_id.uri);
  export = escape_string (src_id.export);
  desc = escape_string (src_id.description);
  text_printf (&t, JOURNAL_MAGIC " %d\n", JOURNAL_VERSION);
  text_printf (&t, "target %s\n", target);
  text_printf (&t, "target-inode %" PRIu64 "\n", j_inode);
  text_printf (&t, "mode %s\n", delta ? "delta" : "full");
  text_printf (&t, "source-uri %s\n", uri);
  text_printf (&t, "source-export %s\n", export);
  text_printf (&t, "source-description %s\n", desc);
  text_printf (&t, "source-size %" PRIu64 "\n", src_id.size);
  text_printf (&t, "done %" PRIu64 "\n", done);
  free (target);
  free (uri);
  free (export);
  free (desc);
  if (!text_out_commit (&t, "journal"))
    return false;
  debug_kill_point ("journal");
  return true;
}

bool
journal_remove (void)
{
  if (journal_path == NULL)
    return true;
  if (unlink_durable (journal_path) == -1 && errno != ENOENT) {
    error_msg ("cannot remove the journal '%s': %s", journal_path,
               strerror (errno));
    return false;
  }
  return true;
}

void
journal_free (struct journal *j)
{
  free (j->target);
  free (j->src.uri);
  free (j->src.export);
  free (j->src.description);
  memset (j, 0, sizeof *j);
}

static void __attribute__ ((noreturn))
bad_journal (const char *path, uint64_t lineno, const char *why)
{
  error_msg ("the journal '%s' is not valid (line %" PRIu64 ": %s); it "
             "says that the target is incomplete: check what it is, then "
             "remove it and make a full copy", path, lineno, why);
  exit (EXIT_FAILURE);
}

/* A string field: KEY escaped-value. */
static char *
string_field (struct text_in *t, const char *key)
{
  const char *why, *v = text_in_key (t, key, 3 * MAX_STRING, &why);
  char *s;

  if (v == NULL)
    bad_journal (t->path, t->lineno, why);
  s = unescape_string (v);
  if (s == NULL)
    bad_journal (t->path, t->lineno, "a badly escaped or too long string");
  return s;
}

static uint64_t
number_field (struct text_in *t, const char *key)
{
  const char *why, *v = text_in_key (t, key, 20, &why);
  uint64_t n;

  if (v == NULL)
    bad_journal (t->path, t->lineno, why);
  if (!parse_u64 (v, &n))
    bad_journal (t->path, t->lineno, "not a decimal number");
  return n;
}

int
journal_load (const char *path, struct journal *j)
{
  struct text_in t;
  const char *why, *v;
  char *mode;

  memset (j, 0, sizeof *j);
  if (text_in_open (&t, path) == -1) {
    if (errno == ENOENT)
      return 0;
    error_msg ("cannot open the journal '%s': %s", path, strerror (errno));
    exit (EXIT_FAILURE);
  }
  v = text_in_key (&t, JOURNAL_MAGIC, 10, &why);
  if (v == NULL)
    bad_journal (path, t.lineno, why);
  if (strcmp (v, "1") != 0)
    bad_journal (path, t.lineno, "an unknown version (this is version 1)");
  j->target = string_field (&t, "target");
  j->target_inode = number_field (&t, "target-inode");
  mode = string_field (&t, "mode");
  if (strcmp (mode, "full") != 0 && strcmp (mode, "delta") != 0)
    bad_journal (path, t.lineno, "the mode is not 'full' or 'delta'");
  j->delta = strcmp (mode, "delta") == 0;
  free (mode);
  j->src.uri = string_field (&t, "source-uri");
  j->src.export = string_field (&t, "source-export");
  j->src.description = string_field (&t, "source-description");
  j->src.size = number_field (&t, "source-size");
  j->done = number_field (&t, "done");
  if (j->done > j->src.size)
    bad_journal (path, t.lineno, "done is past the source's size");
  if (!text_in_end (&t, &why))
    bad_journal (path, t.lineno, why);
  text_in_close (&t);
  return 1;
}
