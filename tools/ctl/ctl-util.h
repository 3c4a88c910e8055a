/* sparsebackup-ctl: helpers shared by the single command
 * (sparsebackup-ctl.c) and group backups (ctl-group.c).
 */
#ifndef SPARSEBACKUP_CTL_UTIL_H
#define SPARSEBACKUP_CTL_UTIL_H

#include <stddef.h>
#include <stdio.h>

/* Connect to the Unix socket PATH: the file descriptor (blocking,
 * close-on-exec), or -1 with a message in ERR.  Never waits: a server
 * whose queue of connections is full is an error (EAGAIN).
 */
extern int ctl_connect (const char *path, char *err, size_t errlen);

/* Write all of BUF: 0, or -1 with errno. */
extern int ctl_write_all (int fd, const char *buf, size_t len);

/* S as a JSON string (quotes, backslashes and control bytes escaped). */
extern void ctl_json_string (FILE *fp, const char *s);

#endif /* SPARSEBACKUP_CTL_UTIL_H */
