/* sparsebackup-copy: the private header of the program's parts:
 * sparsebackup-copy.c (options, messages, main), copy-engine.c (the
 * extents queue and the copy loop), copy-target.c (the source, and the
 * file, device or NBD target), copy-progress.c (progress output).
 *
 * Holds the limits, the options, the state of the copy (one thread, so
 * plain globals, defined in sparsebackup-copy.c) and the functions one
 * part calls in another.
 */

#ifndef SPARSEBACKUP_COPY_H
#define SPARSEBACKUP_COPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libnbd.h>

#include "vector.h"

#define PROG "sparsebackup-copy"

#define DEFAULT_REQUESTS     16
#define MAX_REQUESTS         1024
#define DEFAULT_REQUEST_SIZE (256 * 1024)
#define MIN_REQUEST_SIZE     512
#define MAX_REQUEST_SIZE     (32 * 1024 * 1024)
/* Block status is asked for this much at a time (like nbdcopy). */
#define EXTENTS_WINDOW       (128 * 1024 * 1024)
/* Largest zero request sent to an NBD target. */
#define MAX_ZERO_REQUEST     (1024 * 1024 * 1024)

extern bool delta;
extern bool quiet;
extern int progress_fd;       /* -1: no progress output */
extern bool progress_bar;          /* bar with \r, else "N/100" lines */
extern unsigned requests;
extern size_t request_size;

/* ---- State ------------------------------------------------------------ */

enum kind { K_DATA, K_ZERO, K_SKIP };

struct extent {
  uint64_t offset;
  uint64_t length;
  enum kind kind;
};
DEFINE_VECTOR (extents, struct extent);

enum slot_state { S_FREE, S_READING, S_READ_DONE, S_WRITING };

struct slot {
  enum slot_state state;
  enum kind kind;                  /* K_DATA or K_ZERO (for the counters) */
  uint64_t offset;
  uint64_t len;
  int err;                         /* errno of the completed command */
  char *buf;
};

extern const char *src_name, *dst_name;
extern struct nbd_handle *src, *dst_nbd;
extern int dst_fd;
extern bool dst_is_regular;
extern bool dst_can_zero;          /* NBD target: nbd_can_zero */
extern bool have_extents;
extern uint64_t size;

extern struct slot *slots;

/* Extents to do, in order: ptr[head..len) are left; the first may be
 * partly done (its offset and length are advanced in place).  They cover
 * [done_up_to, extents_next) without gaps.
 */
extern extents queue;
extern size_t head;
extern uint64_t queued;            /* bytes in the queue */
extern uint64_t extents_next;      /* where the next block status starts */
extern bool bs_in_flight;
extern uint64_t bs_offset, bs_end; /* the range asked for */
extern uint64_t bs_reached;        /* how far the reply got */
extern bool bs_replied;

extern uint64_t copied, zeroed, skipped;
extern bool failed;

/* Record the first failure; the copy stops issuing work and drains. */
#define fail(...) do { if (!failed) error_msg (__VA_ARGS__); failed = true; } \
  while (0)

/* ---- In sparsebackup-copy.c ------------------------------------------ */

extern void error_msg (const char *fs, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void die_nbd (const char *what) __attribute__ ((noreturn));

/* ---- In copy-progress.c ---------------------------------------------- */

extern double now (void);
extern void progress_update (bool force);
extern void progress_end (void);

/* ---- In copy-target.c -------------------------------------------------- */

extern void open_source (char **cmd);
extern void open_nbd_target (char **cmd);
extern void open_file_target (void);
extern bool write_file (const char *buf, uint64_t len, uint64_t offset);
extern bool zero_file (char *buf, uint64_t len, uint64_t offset);
extern void start_nbd_write (struct slot *s);
/* Flush or sync the target and close both ends. */
extern void finish (void);

/* ---- In copy-engine.c -------------------------------------------------- */

extern void want_extents (void);
extern bool queue_take (uint64_t max, struct extent *out);
/* Copy everything: the poll loop, until done or failed. */
extern void copy (void);

#endif /* SPARSEBACKUP_COPY_H */
