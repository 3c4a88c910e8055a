/* sparsebackup-copy: safe persistent text files (the journal and the
 * manifest).  Strings are escaped (%XX) so that every value is one line
 * of printable ASCII; the last line of a file is "sha256 HEX", the hash
 * of every byte before it.  A file is written to PATH.tmp (never over a
 * file that is not ours), synced, renamed over PATH, and the directory
 * synced: a reader finds the old file or the new one, whole, whatever
 * happens, kill -9 and power loss included.  Reading never trusts the
 * file: lines are bounded, and the checksum must match.
 */

#define _GNU_SOURCE             /* asprintf */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <libgen.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>

#include "copy.h"

static const char hexdigits[] = "0123456789abcdef";

char *
escape_string (const char *s)
{
  size_t n = strlen (s), i;
  char *out = malloc (3 * n + 1), *p = out;

  if (out == NULL)
    out_of_memory ();
  for (i = 0; i < n; i++) {
    unsigned char c = s[i];

    if (c < 0x21 || c > 0x7e || c == '%') {
      *p++ = '%';
      *p++ = hexdigits[c >> 4];
      *p++ = hexdigits[c & 15];
    }
    else
      *p++ = c;
  }
  *p = '\0';
  return out;
}

static int
hexval (char c)
{
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

char *
unescape_string (const char *s)
{
  size_t n = strlen (s);
  char *out, *p;

  if (n > 3 * MAX_STRING)
    return NULL;
  out = p = malloc (n + 1);
  if (out == NULL)
    out_of_memory ();
  while (*s) {
    unsigned char c = *s;

    if (c < 0x21 || c > 0x7e)
      goto bad;
    if (c == '%') {
      int h = hexval (s[1]), l = h >= 0 ? hexval (s[2]) : -1;

      if (h < 0 || l < 0 || (h == 0 && l == 0))
        goto bad;
      *p++ = h << 4 | l;
      s += 3;
    }
    else {
      *p++ = c;
      s++;
    }
  }
  *p = '\0';
  if ((size_t) (p - out) > MAX_STRING)
    goto bad;
  return out;
 bad:
  free (out);
  return NULL;
}

bool
parse_u64 (const char *s, uint64_t *out)
{
  uint64_t v = 0;

  if (*s < '0' || *s > '9' || (s[0] == '0' && s[1] != '\0'))
    return false;
  for (; *s; s++) {
    if (*s < '0' || *s > '9' || v > (UINT64_MAX - (*s - '0')) / 10)
      return false;
    v = v * 10 + (*s - '0');
  }
  *out = v;
  return true;
}

/* N bytes from 2N lower-case hex digits, exactly. */
bool
parse_hex (const char *s, unsigned char *out, size_t n)
{
  size_t i;

  if (strlen (s) != 2 * n)
    return false;
  for (i = 0; i < n; i++) {
    int h = hexval (s[2 * i]), l = hexval (s[2 * i + 1]);

    if (h < 0 || l < 0 || (s[2 * i] >= 'A' && s[2 * i] <= 'F') ||
        (s[2 * i + 1] >= 'A' && s[2 * i + 1] <= 'F'))
      return false;
    out[i] = h << 4 | l;
  }
  return true;
}

int
sync_dir_of (const char *path)
{
  char *copy = strdup (path);
  int fd, r, e;

  if (copy == NULL)
    out_of_memory ();
  fd = open (dirname (copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  free (copy);
  if (fd == -1)
    return -1;
  r = fsync (fd);
  e = errno;
  close (fd);
  errno = e;
  return r;
}

int
unlink_durable (const char *path)
{
  if (unlink (path) == -1)
    return -1;
  return sync_dir_of (path);
}

/* Is PATH missing (1), a regular file that starts with MAGIC (2), or
 * something else (0, with *WHY)?  An empty regular file counts as ours:
 * a kill between creating and writing it leaves one.
 */
static int
ours (const char *path, const char *magic, const char **why)
{
  struct stat st;
  char buf[128];
  size_t m = strlen (magic);
  ssize_t r;
  int fd;

  if (lstat (path, &st) == -1) {
    if (errno == ENOENT)
      return 1;
    *why = strerror (errno);
    return 0;
  }
  if (!S_ISREG (st.st_mode)) {
    *why = "not a regular file";
    return 0;
  }
  if (st.st_size == 0)
    return 2;
  fd = open (path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
  if (fd == -1) {
    *why = strerror (errno);
    return 0;
  }
  r = pread (fd, buf, m < sizeof buf ? m : sizeof buf, 0);
  close (fd);
  if (r != (ssize_t) m || memcmp (buf, magic, m) != 0) {
    *why = "it was not written by " PROG;
    return 0;
  }
  return 2;
}

bool
text_out_check (const char *path, const char *magic, const char *what)
{
  const char *why = NULL;

  if (ours (path, magic, &why) == 0) {
    error_msg ("%s '%s' exists and %s: not replacing it (remove it or "
               "name another file)", what, path, why);
    return false;
  }
  return true;
}

bool
text_out_begin (struct text_out *t, const char *path, const char *magic,
                const char *what)
{
  const char *why = NULL;
  int fd, tries;

  memset (t, 0, sizeof *t);
  t->path = path;
  if (ours (path, magic, &why) == 0) {
    error_msg ("%s '%s' exists and %s: not replacing it (remove it or "
               "name another file)", what, path, why);
    return false;
  }
  if (asprintf (&t->tmp, "%s.tmp", path) == -1)
    out_of_memory ();
  for (tries = 0; ; tries++) {
    fd = open (t->tmp, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW,
               0666);
    if (fd >= 0)
      break;
    /* A temporary file left by an interrupted run of ours is removed;
     * anything else there is left alone.
     */
    if (errno != EEXIST || tries > 0 || ours (t->tmp, magic, &why) != 2) {
      error_msg ("cannot create %s '%s': %s", what, t->tmp,
                 errno == EEXIST ? "the file exists and is not ours: "
                 "remove it" : strerror (errno));
      free (t->tmp);
      return false;
    }
    if (unlink (t->tmp) == -1 && errno != ENOENT) {
      error_msg ("cannot remove the stale '%s': %s", t->tmp, strerror (errno));
      free (t->tmp);
      return false;
    }
  }
  t->fp = fdopen (fd, "w");
  if (t->fp == NULL)
    out_of_memory ();
  sha256_init (&t->sha);
  return true;
}

void
text_printf (struct text_out *t, const char *fs, ...)
{
  va_list args;
  char small[256], *buf = small;
  int n;

  va_start (args, fs);
  n = vsnprintf (small, sizeof small, fs, args);
  va_end (args);
  if (n < 0) {
    t->error = true;
    return;
  }
  if ((size_t) n >= sizeof small) {
    buf = malloc (n + 1);
    if (buf == NULL)
      out_of_memory ();
    va_start (args, fs);
    vsnprintf (buf, n + 1, fs, args);
    va_end (args);
  }
  sha256_update (&t->sha, n, (const uint8_t *) buf);
  if (fwrite (buf, 1, n, t->fp) != (size_t) n)
    t->error = true;
  if (buf != small)
    free (buf);
}

void
text_out_abort (struct text_out *t)
{
  if (t->fp)
    fclose (t->fp);
  t->fp = NULL;
  if (t->tmp)
    unlink (t->tmp);
  free (t->tmp);
  t->tmp = NULL;
}

bool
text_out_commit (struct text_out *t, const char *what)
{
  unsigned char d[SHA256_DIGEST_SIZE];
  char hex[2 * SHA256_DIGEST_SIZE + 1];
  size_t i;
  int e = 0;

  sha256_digest (&t->sha, sizeof d, d);
  for (i = 0; i < sizeof d; i++) {
    hex[2 * i] = hexdigits[d[i] >> 4];
    hex[2 * i + 1] = hexdigits[d[i] & 15];
  }
  hex[2 * sizeof d] = '\0';
  if (fprintf (t->fp, "sha256 %s\n", hex) < 0)
    t->error = true;
  if (fflush (t->fp) != 0 || t->error)
    e = errno ? errno : EIO;
  else if (fsync (fileno (t->fp)) == -1)
    e = errno;
  if (fclose (t->fp) != 0 && e == 0)
    e = errno;
  t->fp = NULL;
  if (e) {
    error_msg ("cannot write %s '%s': %s", what, t->tmp, strerror (e));
    text_out_abort (t);
    return false;
  }
  debug_kill_point (strcmp (what, "journal") == 0 ? "journal-tmp"
                    : "manifest-tmp");
  if (rename (t->tmp, t->path) == -1) {
    error_msg ("cannot rename '%s' to '%s': %s", t->tmp, t->path,
               strerror (errno));
    text_out_abort (t);
    return false;
  }
  free (t->tmp);
  t->tmp = NULL;
  if (sync_dir_of (t->path) == -1) {
    error_msg ("cannot sync the directory of %s '%s': %s", what, t->path,
               strerror (errno));
    return false;
  }
  return true;
}

int
text_in_open (struct text_in *t, const char *path)
{
  int fd;
  struct stat st;

  memset (t, 0, sizeof *t);
  t->path = path;
  fd = open (path, O_RDONLY | O_CLOEXEC);
  if (fd == -1)
    return -1;
  if (fstat (fd, &st) == -1) {
    int e = errno;

    close (fd);
    errno = e;
    return -1;
  }
  if (!S_ISREG (st.st_mode)) {
    close (fd);
    errno = S_ISDIR (st.st_mode) ? EISDIR : EINVAL;
    return -1;
  }
  t->fp = fdopen (fd, "r");
  if (t->fp == NULL)
    out_of_memory ();
  sha256_init (&t->sha);
  return 0;
}

bool
text_in_line (struct text_in *t, size_t max, const char **why)
{
  size_t n = 0;
  int c;

  if (t->cap < max + 1) {
    free (t->line);
    t->cap = max + 1;
    t->line = malloc (t->cap);
    if (t->line == NULL)
      out_of_memory ();
  }
  t->lineno++;
  for (;;) {
    c = getc_unlocked (t->fp);
    if (c == EOF) {
      *why = ferror (t->fp) ? strerror (errno)
        : n ? "the last line has no newline" : "the file ends early";
      return false;
    }
    if (c == '\n')
      break;
    if (c == '\0' || n == max) {
      *why = c == '\0' ? "a NUL byte" : "a line too long";
      return false;
    }
    t->line[n++] = c;
  }
  t->line[n] = '\0';
  sha256_update (&t->sha, n, (const uint8_t *) t->line);
  sha256_update (&t->sha, 1, (const uint8_t *) "\n");
  return true;
}

const char *
text_in_key (struct text_in *t, const char *key, size_t max,
             const char **why)
{
  size_t k = strlen (key);

  if (!text_in_line (t, k + 1 + max, why))
    return NULL;
  if (strncmp (t->line, key, k) != 0 || t->line[k] != ' ') {
    static char msg[80];

    snprintf (msg, sizeof msg, "expected the key '%s'", key);
    *why = msg;
    return NULL;
  }
  return t->line + k + 1;
}

bool
text_in_end (struct text_in *t, const char **why)
{
  unsigned char want[SHA256_DIGEST_SIZE], got[SHA256_DIGEST_SIZE];
  struct sha256_ctx sha = t->sha;  /* the hash before the checksum line */
  const char *v;

  sha256_digest (&sha, sizeof got, got);
  v = text_in_key (t, "sha256", 2 * SHA256_DIGEST_SIZE, why);
  if (v == NULL)
    return false;
  if (!parse_hex (v, want, sizeof want)) {
    *why = "the checksum line is not 64 lower-case hex digits";
    return false;
  }
  if (memcmp (want, got, sizeof want) != 0) {
    *why = "the checksum does not match the contents (the file is damaged "
      "or was edited)";
    return false;
  }
  if (getc (t->fp) != EOF) {
    *why = "data after the checksum line";
    return false;
  }
  return true;
}

void
text_in_close (struct text_in *t)
{
  if (t->fp)
    fclose (t->fp);
  t->fp = NULL;
  free (t->line);
  t->line = NULL;
}
