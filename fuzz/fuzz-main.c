/* sparsebackup: run a libFuzzer harness without libFuzzer.
 *
 * Usage: fuzz-qcow2-standalone [-v] FILE|DIR...
 *
 * Feeds each file (directories: each regular file inside, in name order,
 * not recursing) to LLVMFuzzerTestOneInput, in a buffer of exactly the
 * file's size so that AddressSanitizer sees any overrun.  Exits 0 when
 * every input has been run (a crash in the harness ends the process),
 * 1 on a usage or I/O error.  -v sets QCOW2_FUZZ_VERBOSE=1 and prints
 * the name of each input.
 */

#ifndef _GNU_SOURCE
#define _GNU_SOURCE             /* asprintf */
#endif

#include <dirent.h>
#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

static bool verbose;
static unsigned nr_inputs;

static int
run_file (const char *path)
{
  FILE *fp;
  struct stat st;
  uint8_t *buf;
  size_t size;

  fp = fopen (path, "rb");
  if (fp == NULL || fstat (fileno (fp), &st) == -1) {
    fprintf (stderr, "fuzz: %s: %s\n", path, strerror (errno));
    if (fp)
      fclose (fp);
    return -1;
  }
  size = (size_t) st.st_size;
  /* malloc (0) may return NULL: always allocate at least one byte but
   * pass the real size.
   */
  buf = malloc (size > 0 ? size : 1);
  if (buf == NULL) {
    fprintf (stderr, "fuzz: %s: out of memory\n", path);
    fclose (fp);
    return -1;
  }
  if (size > 0 && fread (buf, 1, size, fp) != size) {
    fprintf (stderr, "fuzz: %s: short read\n", path);
    free (buf);
    fclose (fp);
    return -1;
  }
  fclose (fp);

  if (verbose)
    fprintf (stderr, "fuzz: running %s (%zu bytes)\n", path, size);
  LLVMFuzzerTestOneInput (buf, size);
  free (buf);
  nr_inputs++;
  return 0;
}

static int
compare_names (const void *a, const void *b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

static int
run_dir (const char *dir)
{
  DIR *d;
  struct dirent *de;
  char **names = NULL;
  size_t n = 0, alloc = 0, i;
  int r = 0;

  d = opendir (dir);
  if (d == NULL) {
    fprintf (stderr, "fuzz: %s: %s\n", dir, strerror (errno));
    return -1;
  }
  while ((de = readdir (d)) != NULL) {
    if (de->d_name[0] == '.')
      continue;
    if (n == alloc) {
      char **p;

      alloc = alloc ? alloc * 2 : 64;
      p = realloc (names, alloc * sizeof *names);
      if (p == NULL) {
        fprintf (stderr, "fuzz: out of memory\n");
        r = -1;
        goto out;
      }
      names = p;
    }
    if (asprintf (&names[n], "%s/%s", dir, de->d_name) == -1) {
      fprintf (stderr, "fuzz: out of memory\n");
      r = -1;
      goto out;
    }
    n++;
  }
  qsort (names, n, sizeof *names, compare_names);
  for (i = 0; i < n; ++i) {
    struct stat st;

    if (stat (names[i], &st) == 0 && S_ISREG (st.st_mode) &&
        run_file (names[i]) == -1)
      r = -1;
  }
 out:
  for (i = 0; i < n; ++i)
    free (names[i]);
  free (names);
  closedir (d);
  return r;
}

int
main (int argc, char *argv[])
{
  int i, status = 0;

  for (i = 1; i < argc && argv[i][0] == '-'; ++i) {
    if (strcmp (argv[i], "-v") == 0) {
      verbose = true;
      setenv ("QCOW2_FUZZ_VERBOSE", "1", 1);
    }
    else if (strcmp (argv[i], "--") == 0) {
      i++;
      break;
    }
    else {
      fprintf (stderr, "usage: %s [-v] FILE|DIR...\n", argv[0]);
      exit (EXIT_FAILURE);
    }
  }
  if (i >= argc) {
    fprintf (stderr, "usage: %s [-v] FILE|DIR...\n", argv[0]);
    exit (EXIT_FAILURE);
  }

  for (; i < argc; ++i) {
    struct stat st;

    if (stat (argv[i], &st) == -1) {
      fprintf (stderr, "fuzz: %s: %s\n", argv[i], strerror (errno));
      status = 1;
    }
    else if (S_ISDIR (st.st_mode)) {
      if (run_dir (argv[i]) == -1)
        status = 1;
    }
    else if (run_file (argv[i]) == -1)
      status = 1;
  }

  printf ("fuzz: %u inputs run\n", nr_inputs);
  return status;
}
