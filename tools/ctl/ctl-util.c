/* sparsebackup-ctl: helpers shared by the single command and group
 * backups (ctl-util.h).
 */

#ifdef HAVE_CONFIG_H
#include <config.h>
#endif

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "ctl-util.h"

int
ctl_connect (const char *path, char *err, size_t errlen)
{
  struct sockaddr_un addr = { .sun_family = AF_UNIX };
  int fd, flags;

  if (strlen (path) >= sizeof addr.sun_path) {
    snprintf (err, errlen, "socket path too long (at most %zu bytes)",
              sizeof addr.sun_path - 1);
    return -1;
  }
  strcpy (addr.sun_path, path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd == -1) {
    snprintf (err, errlen, "socket: %s", strerror (errno));
    return -1;
  }
  if (connect (fd, (struct sockaddr *) &addr, sizeof addr) == -1) {
    if (errno == EAGAIN)
      snprintf (err, errlen, "the server accepts no more connections now "
                "(its queue is full): try again");
    else
      snprintf (err, errlen, "%s", strerror (errno));
    close (fd);
    return -1;
  }
  flags = fcntl (fd, F_GETFL);
  if (flags == -1 || fcntl (fd, F_SETFL, flags & ~O_NONBLOCK) == -1) {
    snprintf (err, errlen, "fcntl: %s", strerror (errno));
    close (fd);
    return -1;
  }
  return fd;
}

int
ctl_write_all (int fd, const char *buf, size_t len)
{
  while (len > 0) {
    ssize_t n = write (fd, buf, len);

    if (n == -1 && errno == EINTR)
      continue;
    if (n == -1)
      return -1;
    buf += n;
    len -= (size_t) n;
  }
  return 0;
}

void
ctl_json_string (FILE *fp, const char *s)
{
  fputc ('"', fp);
  for (; *s; ++s) {
    unsigned char c = (unsigned char) *s;

    if (c == '"' || c == '\\')
      fprintf (fp, "\\%c", c);
    else if (c < 0x20 || c == 0x7f)
      fprintf (fp, "\\u%04x", c);
    else
      fputc (c, fp);
  }
  fputc ('"', fp);
}
