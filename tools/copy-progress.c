/* sparsebackup-copy: progress output (--progress, a bar or "N/100"
 * lines) and the clock.
 */

#define _GNU_SOURCE             /* fallocate */
#include <config.h>

#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <limits.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <linux/falloc.h>
#include <linux/fs.h>

#include <libnbd.h>

#include "minmax.h"
#include "copy.h"

/* ---- Progress --------------------------------------------------------- */

static int last_percent = -1;
static double last_bar;
static bool bar_shown;

double
now (void)
{
  struct timespec ts;

  clock_gettime (CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* V bytes in a short human form: "512", "1.5K", "300.0M". */
static void
human (uint64_t v, char *buf, size_t n)
{
  static const char units[] = "KMGTPE";
  double d = v;
  int u = -1;

  while (d >= 1024 && u < 5) {
    d /= 1024;
    u++;
  }
  if (u < 0)
    snprintf (buf, n, "%" PRIu64, v);
  else
    snprintf (buf, n, "%.1f%c", d, units[u]);
}

void
progress_update (bool now_please)
{
  uint64_t done = MIN (copied + zeroed + skipped + resumed, size);
  int percent;
  char line[128];
  int n;

  if (progress_fd < 0 || failed)
    return;                     /* after an error message: no more bars */
  percent = size == 0 ? 100 : (int) ((double) done * 100 / size);
  if (progress_bar) {
    const int width = 40;
    int i, fill = percent * width / 100;
    double t = now ();
    char d[16], sz[16];

    if (!now_please && percent == last_percent && t - last_bar < 0.2)
      return;
    last_bar = t;
    n = snprintf (line, sizeof line, "\r[");
    for (i = 0; i < width; i++)
      line[n++] = i < fill ? '#' : '.';
    human (done, d, sizeof d);
    human (size, sz, sizeof sz);
    n += snprintf (line + n, sizeof line - n, "] %3d%% %s/%s ",
                   percent, d, sz);
    bar_shown = true;
  }
  else {
    if (percent == last_percent)
      return;
    n = snprintf (line, sizeof line, "%d/100\n", percent);
  }
  last_percent = percent;
  if (write (progress_fd, line, n) == -1) {
    /* Progress is advisory: stop printing it, keep copying. */
    progress_fd = -1;
  }
}

void
progress_end (void)
{
  if (progress_fd >= 0 && progress_bar && bar_shown) {
    if (write (progress_fd, "\n", 1) == -1)
      progress_fd = -1;
    bar_shown = false;
  }
}
