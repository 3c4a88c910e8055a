/* sparsebackup-copy: how the program speaks and stops.  Messages on
 * stderr (a progress bar is ended first), the exits on errors it cannot
 * go on from (die_nbd, out_of_memory, xstrdup), and the points where a
 * test makes it die as a crash would (debug_kill_point).
 */

#include <config.h>

#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <libnbd.h>

#include "copy.h"

void __attribute__ ((format (printf, 1, 2)))
error_msg (const char *fs, ...)
{
  va_list args;

  progress_end ();
  fprintf (stderr, PROG ": ");
  va_start (args, fs);
  vfprintf (stderr, fs, args);
  va_end (args);
  fputc ('\n', stderr);
}

/* Informational, on stderr, unless --quiet. */
void __attribute__ ((format (printf, 1, 2)))
note_msg (const char *fs, ...)
{
  va_list args;

  if (quiet)
    return;
  progress_end ();
  fprintf (stderr, PROG ": ");
  va_start (args, fs);
  vfprintf (stderr, fs, args);
  va_end (args);
  fputc ('\n', stderr);
}

void __attribute__ ((noreturn))
die_nbd (const char *what)
{
  error_msg ("%s: %s", what, nbd_get_error () ? nbd_get_error () : "error");
  exit (EXIT_FAILURE);
}

void __attribute__ ((noreturn))
out_of_memory (void)
{
  error_msg ("out of memory");
  exit (EXIT_FAILURE);
}

char *
xstrdup (const char *s)
{
  char *r = strdup (s);

  if (r == NULL)
    out_of_memory ();
  return r;
}

/* SPARSEBACKUP_COPY_DEBUG_KILL=POINT:N (tests only): the Nth time the
 * copy reaches POINT, it kills itself with SIGKILL, as a crash or
 * kill -9 would.  Points: write (a write or zero on the target
 * completed), sync (the target was synced, the journal not yet
 * updated), journal-tmp (the new journal is written and synced beside
 * the old one, not renamed yet), journal (the journal was replaced),
 * manifest-tmp (likewise for the manifest).
 */
void
debug_kill_point (const char *point)
{
  static const char *env;
  static bool parsed;
  static char name[32];
  static unsigned long n, count;

  if (!parsed) {
    const char *c;

    parsed = true;
    env = getenv ("SPARSEBACKUP_COPY_DEBUG_KILL");
    if (env && (c = strchr (env, ':')) != NULL &&
        (size_t) (c - env) < sizeof name) {
      memcpy (name, env, c - env);
      n = strtoul (c + 1, NULL, 10);
    }
  }
  if (n == 0 || strcmp (point, name) != 0)
    return;
  if (++count == n) {
    fflush (stdout);
    kill (getpid (), SIGKILL);
  }
}
