/* sparsebackup-copy: the private header of the program's parts:
 *
 *   sparsebackup-copy.c  argument parsing and main: the copy,
 *                        --manifest-only and --verify
 *   copy-engine.c        the extents queue, the copy loop, the pieces in
 *                        order: progress and hashing
 *   copy-target.c        the source, and the file, device or NBD target:
 *                        connecting, size and format checks, I/O
 *   copy-probe.c         image format signatures
 *   copy-journal.c       the journal of an unfinished copy
 *   copy-manifest.c      manifests: the format and the chunk hasher
 *   copy-verify.c        hashing a file or device
 *   copy-files.c         safe persistent text files: atomic replace,
 *                        escaping, checksummed lines
 *   copy-messages.c      messages, and the exits on errors
 *   copy-progress.c      progress output and the clock
 *   copy-state.c         the options and the state (no code)
 *
 * They call each other in one direction only (an arrow: "calls"):
 *
 *   sparsebackup-copy.c -> all the others
 *   copy-engine.c       -> copy-target.c, copy-journal.c, copy-manifest.c,
 *                          copy-progress.c, copy-messages.c
 *   copy-verify.c       -> copy-manifest.c, copy-progress.c, copy-messages.c
 *   copy-journal.c, copy-manifest.c -> copy-files.c, copy-messages.c
 *   copy-target.c       -> copy-probe.c, copy-messages.c
 *   copy-files.c        -> copy-messages.c
 *   copy-messages.c     -> copy-progress.c (a message ends the bar first)
 *   copy-progress.c, copy-probe.c: leaves
 *
 * A completion that one part must act on is handed to the part that
 * starts the command (start_nbd_write takes the engine's callback).
 *
 * Holds the limits, the options, the state of the copy (one thread, so
 * plain globals, defined in copy-state.c) and the functions one part
 * calls in another.
 */

#ifndef SPARSEBACKUP_COPY_H
#define SPARSEBACKUP_COPY_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include <libnbd.h>
#include <nettle/sha2.h>

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

/* Manifest chunks: a power of 2 from MIN to MAX (at most half the
 * extents window, so that the extents of a whole chunk are known before
 * its first byte is hashed), at most MAX_CHUNKS of them (32 bytes each
 * in memory, 65 in the file).
 */
#define MIN_CHUNK_SIZE       4096
#define MAX_CHUNK_SIZE       (64 * 1024 * 1024)
#define DEFAULT_CHUNK_SIZE   (1024 * 1024)
#define MAX_CHUNKS           (UINT64_C (1) << 24)
#define HASH_SIZE            SHA256_DIGEST_SIZE

/* The journal: the target is made durable and the progress recorded
 * every --journal-every bytes of the disk (default), or after this many
 * seconds with progress.
 */
#define DEFAULT_JOURNAL_EVERY (UINT64_C (1) << 30)
#define JOURNAL_SECONDS      10.0
#define JOURNAL_SUFFIX       ".sparsebackup-journal"

/* Longest string (URI, export name, description, path) kept in a
 * journal or manifest, before escaping.
 */
#define MAX_STRING           4096

/* ---- Options ---------------------------------------------------------- */

extern bool delta;
extern bool quiet;
extern int progress_fd;            /* -1: no progress output */
extern bool progress_bar;          /* bar with \r, else "N/100" lines */
extern unsigned requests;
extern size_t request_size;
extern bool force;                 /* --force: over an image format */
extern bool allow_larger;          /* --allow-larger */
extern bool restart;               /* --restart */
extern uint64_t journal_every;     /* --journal-every */
extern const char *journal_path;   /* NULL: no journal */

/* ---- State ------------------------------------------------------------ */

enum kind { K_DATA, K_ZERO, K_SKIP };

struct extent {
  uint64_t offset;
  uint64_t length;
  enum kind kind;
};
DEFINE_VECTOR (extents, struct extent);

enum slot_state {
  S_FREE,
  S_READING,
  S_READ_DONE,                     /* read finished, not acted on yet */
  S_WRITING,                       /* an NBD write or zero in flight */
  S_HELD,                          /* data kept for the hasher */
};

struct slot {
  enum slot_state state;
  enum kind kind;                  /* K_DATA or K_ZERO (for the counters) */
  uint64_t offset;
  uint64_t len;
  uint64_t seq;                    /* the piece it serves */
  bool hash_hold;                  /* the hasher still needs buf */
  int err;                         /* errno of the completed command */
  char *buf;
};

/* What a piece does on the target, and what the hasher gets of it. */
enum tgt { T_NONE, T_DATA, T_ZERO };
enum hash { H_NONE, H_DATA, H_ZERO, H_KEEP };

/* The pieces of the disk in order, from the first not finished: the
 * copy is done (and durable once synced) up to the first piece whose
 * target part has not completed.
 */
struct piece {
  uint64_t offset, len;
  enum tgt tgt;
  enum hash hash;
  bool tgt_done, hashed;
  struct slot *slot;               /* its read, while it holds one */
};
DEFINE_VECTOR (pieces, struct piece);

enum dst_kind { DST_NONE, DST_FILE, DST_BLOCK, DST_CHAR, DST_NBD };

/* What a source is: compared to decide whether a journal's interrupted
 * copy came from the same source.
 */
struct source_id {
  char *uri;                       /* as given, or "[ CMD ARGS ]" */
  char *export;                    /* the export name asked for */
  char *description;               /* from the server's export list, "" */
  uint64_t size;
};

extern const char *src_name, *dst_name;
extern const char *src_label;        /* SRC, or TARGET for --verify */
extern char **src_cmd, **dst_cmd;
extern struct nbd_handle *src, *dst_nbd;
extern struct source_id src_id;
extern int dst_fd;
extern enum dst_kind dst_kind;
extern uint64_t dst_size;          /* of an existing target */
extern bool dst_can_zero;          /* NBD target: nbd_can_zero */
extern bool dst_can_flush;         /* NBD target: nbd_can_flush */
extern bool have_extents;
extern uint64_t size;

extern struct slot *slots;
extern char *zero_buf;             /* request_size bytes, for zero_file */

/* Extents to do, in order: ptr[head..len) are left; the first may be
 * partly done (its offset and length are advanced in place).  They cover
 * [the next piece, extents_next) without gaps.
 */
extern extents queue;
extern size_t head;
extern uint64_t queued;            /* bytes in the queue */
extern uint64_t extents_next;      /* where the next block status starts */
extern bool bs_in_flight;
extern uint64_t bs_offset, bs_end; /* the range asked for */
extern uint64_t bs_reached;        /* how far the reply got */
extern bool bs_replied;

/* Below write_from nothing is written: the journal of an interrupted
 * copy says it is done.  The pieces there are only read for the hasher
 * (a manifest is wanted), else not walked at all.
 */
extern uint64_t write_from;
extern uint64_t copied, zeroed, skipped, resumed, hash_read;
/* Everything below it is done on the target (not yet durable). */
extern uint64_t watermark;
extern bool failed;
extern volatile int stop_signal;   /* SIGINT or SIGTERM received */

/* Record the first failure; the copy stops issuing work and drains. */
#define fail(...) do { if (!failed) error_msg (__VA_ARGS__); failed = true; } \
  while (0)

/* ---- In copy-messages.c ---------------------------------------------- */

extern void error_msg (const char *fs, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void note_msg (const char *fs, ...)
  __attribute__ ((format (printf, 1, 2)));
extern void die_nbd (const char *what) __attribute__ ((noreturn));
extern void out_of_memory (void) __attribute__ ((noreturn));
extern char *xstrdup (const char *s);
/* SPARSEBACKUP_COPY_DEBUG_KILL=POINT:N: SIGKILL this process the Nth
 * time it reaches POINT (tests of interrupted copies).
 */
extern void debug_kill_point (const char *point);

/* ---- In copy-progress.c ---------------------------------------------- */

extern double now (void);
extern void progress_update (bool now_please);
extern void progress_end (void);

/* ---- In copy-target.c -------------------------------------------------- */

/* Connect to the source (sets src, size, src_id, have_extents).  On a
 * failure to connect, AFTER (if not NULL) is printed after the error.
 */
extern void open_source (const char *after);
extern void open_nbd_target (void);
/* Open an existing file or device target (no creation), or note that it
 * does not exist (dst_fd == -1, dst_kind == DST_FILE).
 */
extern void open_file_target (void);
/* Create a missing file target (a full copy). */
extern void create_file_target (void);
/* The size rules, and the format signature check. */
extern void check_target (void);
/* Give a regular file target the source's size (a full copy). */
extern void size_file_target (void);
/* The target as a stable string for the journal (an absolute path or
 * the URI) and, for a regular file, its inode number (else 0).
 */
extern char *target_identity (uint64_t *inode);
extern bool write_file (const char *buf, uint64_t len, uint64_t offset);
extern bool zero_file (char *buf, uint64_t len, uint64_t offset);
/* Send slot S (its data, or zeroes for K_ZERO) to the NBD target; CB
 * is called when it completes.
 */
extern void start_nbd_write (struct slot *s, nbd_completion_callback cb);
/* Make everything written so far durable (fsync), for the journal. */
extern bool sync_file_target (void);
/* Flush or sync the target (unless failed) and close both ends. */
extern void close_ends (void);
extern void close_source (void);
extern bool is_nbd_uri (const char *s);
/* "[ CMD ARGS ... ]" as one malloc'd string. */
extern char *command_string (char **cmd);
extern struct nbd_handle *connect_nbd (const char *what, const char *name,
                                       char **cmd, bool with_extents,
                                       struct source_id *id,
                                       const char *after);

/* ---- In copy-probe.c --------------------------------------------------- */

/* The image format whose signature starts BUF (LEN bytes read at offset
 * 0 of a file), or NULL.
 */
extern const char *probe_head (const unsigned char *buf, size_t len);
/* The image format whose footer is the last 512 bytes of a file (BUF),
 * or NULL.
 */
extern const char *probe_tail (const unsigned char *buf);
#define PROBE_HEAD_SIZE 4096
#define PROBE_TAIL_SIZE 512

/* ---- In copy-files.c --------------------------------------------------- */

/* Bytes outside 0x21..0x7e (and '%') as %XX; the result is malloc'd. */
extern char *escape_string (const char *s);
/* The reverse; NULL if S is not a valid escaped string (a %XX that is
 * not hex, a NUL byte, or longer than MAX_STRING).
 */
extern char *unescape_string (const char *s);

/* A text file whose last line is "sha256 HEX" over everything before
 * it.  Writing: to a temporary file beside PATH, then fsync, rename over
 * PATH and fsync the directory.
 */
struct text_out {
  const char *path;
  char *tmp;
  FILE *fp;
  struct sha256_ctx sha;
  bool error;
};
/* Refuse (false, message printed) unless PATH is missing or a regular
 * file starting with MAGIC (one we wrote): never replace anything else.
 * WHAT names the file in messages.
 */
extern bool text_out_begin (struct text_out *t, const char *path,
                            const char *magic, const char *what);
extern void text_printf (struct text_out *t, const char *fs, ...)
  __attribute__ ((format (printf, 2, 3)));
/* Write the checksum line and replace PATH atomically.  False (message
 * printed, PATH untouched) on any error.
 */
extern bool text_out_commit (struct text_out *t, const char *what);
extern void text_out_abort (struct text_out *t);
/* Could text_out_begin replace PATH?  Else false, message printed. */
extern bool text_out_check (const char *path, const char *magic,
                            const char *what);

struct text_in {
  const char *path;
  FILE *fp;
  struct sha256_ctx sha;
  uint64_t lineno;
  char *line;                      /* the current line, without LF */
  size_t cap;
};
/* 0: opened; -1: error (errno; ENOENT if missing). */
extern int text_in_open (struct text_in *t, const char *path);
/* Read the next line of at most MAX bytes (the LF excluded) into
 * t->line; false with *WHY set at EOF, on a longer line, a NUL byte or
 * a read error.
 */
extern bool text_in_line (struct text_in *t, size_t max, const char **why);
/* The next line must be "KEY VALUE": returns VALUE (in t->line) or NULL
 * with *WHY set.
 */
extern const char *text_in_key (struct text_in *t, const char *key,
                                size_t max, const char **why);
/* The checksum line and EOF: false with *WHY set. */
extern bool text_in_end (struct text_in *t, const char **why);
extern void text_in_close (struct text_in *t);
extern bool parse_u64 (const char *s, uint64_t *out);
extern bool parse_hex (const char *s, unsigned char *out, size_t n);
/* fsync the directory holding PATH. */
extern int sync_dir_of (const char *path);
/* Unlink PATH and sync its directory: 0, or -1 (errno). */
extern int unlink_durable (const char *path);

/* ---- In copy-journal.c ------------------------------------------------- */

struct journal {
  char *target;
  uint64_t target_inode;
  bool delta;
  struct source_id src;
  uint64_t done;
};
/* Load PATH: 1 loaded, 0 missing; exits with a message if it is there
 * but not a valid journal.
 */
extern int journal_load (const char *path, struct journal *j);
extern void journal_free (struct journal *j);
/* Record that the target is done up to DONE (write ahead: only call it
 * once everything below DONE is durable on the target).  False
 * (message printed) if the journal cannot be written.
 */
extern bool journal_write (uint64_t done);
/* The copy is complete: remove the journal. */
extern bool journal_remove (void);
/* The journal's identity fields, set before the first journal_write. */
extern void journal_set_identity (const char *target, uint64_t inode);
/* A human description of the journal's source for messages. */
extern void journal_describe (const struct journal *j, char *buf, size_t n);
extern bool source_id_equal (const struct source_id *a,
                             const struct source_id *b);

/* ---- In copy-manifest.c ------------------------------------------------ */

struct manifest {
  uint64_t size;
  uint64_t chunk_size;
  uint64_t nr_chunks;
  unsigned char (*hash)[HASH_SIZE];
  struct source_id src;
};
/* Load and validate PATH; exits with a message naming the field at
 * fault if it is not a valid manifest.
 */
extern void manifest_load (const char *path, struct manifest *m);
extern bool manifest_save (const char *path, const struct manifest *m);
/* PATH may be written (missing, or a manifest): else false, printed. */
extern bool manifest_check_writable (const char *path);
extern void manifest_free (struct manifest *m);
extern uint64_t default_chunk_size (uint64_t size);
/* The hasher: fed with the whole disk in order, it fills OUT (sized
 * here for SIZE and CHUNK); KEEP copies chunks from BASE.
 */
extern void hasher_start (struct manifest *out, uint64_t size,
                          uint64_t chunk, const struct manifest *base);
extern void hasher_data (uint64_t offset, const void *buf, uint64_t len);
extern void hasher_zero (uint64_t offset, uint64_t len);
extern void hasher_keep (uint64_t offset, uint64_t len);
extern uint64_t hasher_position (void);
extern bool hasher_on (void);
extern uint64_t chunk_size_of_hasher (void);
/* Compare two manifests' hashes: the number of differing chunks, the
 * first in *FIRST; at most MAX are printed as "differs" lines naming
 * WHAT.
 */
extern uint64_t manifest_compare (const struct manifest *expected,
                                  const struct manifest *got,
                                  const char *what, unsigned max,
                                  uint64_t *first);

/* ---- In copy-verify.c -------------------------------------------------- */

/* Hash a file or block device (dst_fd) into OUT over [0, M->size). */
extern bool hash_file (int fd, const char *name, struct manifest *out,
                       uint64_t size, uint64_t chunk);

/* ---- In copy-engine.c -------------------------------------------------- */

extern void want_extents (void);
extern bool queue_take (uint64_t max, struct extent *out);
/* Copy everything: the poll loop, until done, failed or interrupted.
 * With a journal, the target is synced and the journal updated as the
 * copy goes, and once more at the end of an unfinished copy.
 */
extern void copy (void);
extern void engine_init (uint64_t start);

#endif /* SPARSEBACKUP_COPY_H */
