/* sparsebackup-ctl: group backups (ctl-group.c).
 *
 *   sparsebackup-ctl [--json] [--timeout=SECONDS] group-begin NEW
 *       [--since OLD] [--hold-timeout=MS] SOCKET...
 *
 * begins backup NEW on every server (one control socket each) at one
 * point in time: group-prepare on all of them at once (each drains its
 * changes in flight and holds new ones, for at most MS), group-commit on
 * all once all are prepared (each creates its pending checkpoint and
 * freezes its disk, then lets the changes go on), group-abort on all
 * otherwise.  doc/cbt-protocol.md, "Group backups".
 */
#ifndef SPARSEBACKUP_CTL_GROUP_H
#define SPARSEBACKUP_CTL_GROUP_H

#include <stdbool.h>

#define GROUP_DEFAULT_HOLD_MS 5000
#define GROUP_MAX_SERVERS 64

/* ARGV[0] is "group-begin".  Returns the exit status: 0 the backup was
 * begun on every server; 1 it was not (a server refused; every server
 * is left as it was); 2 bad arguments, or a server could not be talked
 * to (it was left as it was, or lets the changes go on by itself when
 * its hold ends); 3 a server may be left with the pending checkpoint NEW
 * (named on stderr, with what to do).
 */
extern int group_begin (int argc, char **argv, bool json, int timeout_ms);

#endif /* SPARSEBACKUP_CTL_GROUP_H */
