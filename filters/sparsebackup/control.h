/* nbdkit-sparsebackup-filter: the control socket (control.c).
 *
 * sparsebackup-control=SOCKET: created at .get_ready (so that a bad
 * path, or a path where another server answers, fails at start-up),
 * served by a thread started at .after_fork, removed at unload (only
 * the socket this process created).
 */
#ifndef SPARSEBACKUP_CONTROL_H
#define SPARSEBACKUP_CONTROL_H

extern int control_open (void);
extern int control_start (void);
extern void control_stop (void);

#endif /* SPARSEBACKUP_CONTROL_H */
