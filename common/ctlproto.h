/* sparsebackup: the control protocol (doc/cbt-protocol.md): pure parser
 * and formatter, shared by the filter's control socket server and the
 * sparsebackup-ctl client.
 *
 * Lines are printable ASCII ending with LF (a CR before it is dropped),
 * at most CTL_LINE_MAX bytes including the LF.  On connect the server
 * sends the hello line "HELLO sparsebackup-ctl 2".  A request is one
 * line; a reply is zero or more data lines starting with "* ", then one
 * status line: "OK [text]" or "ERR <code> <message>".
 *
 * Functions that format write a NUL-terminated line ending with "\n"
 * into BUF of LEN bytes and return its length, or -1 (ENOBUFS) when it
 * does not fit in LEN or in CTL_LINE_MAX.
 *
 * Pure C: no nbdkit headers.
 */
#ifndef SPARSEBACKUP_CTLPROTO_H
#define SPARSEBACKUP_CTLPROTO_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "cbt.h"

#define CTL_PROTOCOL "sparsebackup-ctl"
#define CTL_VERSION 2
#define CTL_LINE_MAX 1024       /* bytes per line, LF included */

enum ctl_cmd {
  CTL_BACKUP_BEGIN = 1,         /* backup-begin NEW [--since OLD] */
  CTL_BACKUP_END,               /* backup-end NEW --ok|--failed */
  CTL_CHECKPOINT_LIST,          /* checkpoint-list */
  CTL_CHECKPOINT_DELETE,        /* checkpoint-delete X */
  CTL_MAP,                      /* map [--since X] */
  CTL_STATUS,                   /* status */
  /* Group backups (several servers at one point in time): */
  CTL_GROUP_PREPARE,            /* group-prepare NEW [--since OLD]
                                   --hold-timeout MS */
  CTL_GROUP_COMMIT,             /* group-commit NEW */
  CTL_GROUP_ABORT,              /* group-abort NEW */
};

/* The longest hold of a group-prepare (milliseconds). */
#define CTL_HOLD_MAX_MS 60000

/* Error codes: the <code> word of an ERR line. */
enum ctl_code {
  CTL_E_SYNTAX,                 /* "syntax" */
  CTL_E_UNKNOWN_COMMAND,        /* "unknown-command" */
  CTL_E_TOO_LONG,               /* "too-long" */
  CTL_E_INVALID_NAME,           /* "invalid-name" */
  CTL_E_NO_SUCH_CHECKPOINT,     /* "no-such-checkpoint" */
  CTL_E_EXISTS,                 /* "exists" */
  CTL_E_BUSY,                   /* "busy" */
  CTL_E_STATE,                  /* "state" */
  CTL_E_LIMIT,                  /* "limit" */
  CTL_E_IO,                     /* "io" */
  CTL_E_INTERNAL,               /* "internal" */
  CTL_E_BROKEN,                 /* "broken": a point-in-time backup */
};

struct ctl_request {
  enum ctl_cmd cmd;
  char name[CBT_NAME_MAX + 1];  /* NEW or X, "" if none */
  char since[CBT_NAME_MAX + 1]; /* --since, "" if none */
  bool ok;                      /* backup-end: --ok (else --failed) */
  uint32_t hold_ms;             /* group-prepare: --hold-timeout, 1 to
                                   CTL_HOLD_MAX_MS; 0 for the others */
};

struct ctl_reply_line {
  enum { CTL_LINE_DATA, CTL_LINE_OK, CTL_LINE_ERR } kind;
  const char *text;             /* data, OK text or ERR message */
  char code[32];                /* ERR: the code word */
};

extern const char *ctl_cmd_name (enum ctl_cmd cmd);
extern const char *ctl_code_name (enum ctl_code code);
/* The code for an errno from cbt.h: EMLINK (the checkpoint limit) is
 * "limit", EIO and every other error of the file (ENOSPC...) "io".
 */
extern enum ctl_code ctl_code_from_errno (int err);

/* Parse request LINE (NUL-terminated, without the LF).  On error
 * returns -1 with *CODE and a message naming the offending word.
 */
extern int ctl_parse_request (const char *line, struct ctl_request *req,
                              enum ctl_code *code, char *msg, size_t msglen);
extern int ctl_format_request (const struct ctl_request *req,
                               char *buf, size_t len);

extern int ctl_format_hello (char *buf, size_t len);
/* -1 with a message unless LINE is a hello of version CTL_VERSION. */
extern int ctl_parse_hello (const char *line, unsigned *version,
                            char *msg, size_t msglen);

/* "* DATA", "OK TEXT" (TEXT may be empty), "ERR CODE MESSAGE".  Bytes
 * of TEXT / MESSAGE outside printable ASCII become '?'; an ERR message
 * too long for a line is cut.
 */
extern int ctl_format_data (char *buf, size_t len, const char *fmt, ...)
  __attribute__ ((__format__ (__printf__, 3, 4)));
extern int ctl_format_ok (char *buf, size_t len, const char *fmt, ...)
  __attribute__ ((__format__ (__printf__, 3, 4)));
extern int ctl_format_err (char *buf, size_t len, enum ctl_code code,
                           const char *message);

/* Data lines of the replies.  A checkpoint: "NAME good|pending EPOCH
 * ISO8601" (the creation time in seconds since the epoch and as UTC
 * "YYYY-MM-DDTHH:MM:SSZ").  An extent of map: "OFFSET LENGTH".
 */
extern int ctl_format_checkpoint (char *buf, size_t len,
                                  const struct cbt_checkpoint_info *cp);
extern int ctl_format_extent (char *buf, size_t len, uint64_t offset,
                              uint64_t length);
/* SECS since the epoch as "YYYY-MM-DDTHH:MM:SSZ" in BUF (>= 21 bytes). */
extern void ctl_iso8601 (char *buf, size_t len, uint64_t secs);

/* Classify a reply LINE (NUL-terminated, without LF).  R->text points
 * into LINE.  -1 with a message if it is none of the three kinds.
 */
extern int ctl_parse_reply_line (const char *line, struct ctl_reply_line *r,
                                 char *msg, size_t msglen);

/* Bounded line reader over a file descriptor. */
struct ctl_reader {
  int fd;
  size_t start, end;
  bool discarding;              /* inside a line that was too long */
  char buf[CTL_LINE_MAX];
};

extern void ctl_reader_init (struct ctl_reader *r, int fd);
/* Read the next line into LINE (CTL_LINE_MAX bytes), NUL-terminated,
 * without LF (and CR).  Returns 1, 0 at end of file (a partial last
 * line is dropped), -1 on error (errno), -2 when the line was longer
 * than CTL_LINE_MAX (the whole line is skipped; the next call reads the
 * line after it), -3 when the line holds a byte outside printable
 * ASCII and tab, -4 when the whole line has not arrived within
 * TIMEOUT_MS milliseconds (-1: no limit) or when STOP_FD (-1: none)
 * became readable (errno ETIMEDOUT or ECANCELED).
 */
extern int ctl_read_line (struct ctl_reader *r, char *line, int timeout_ms,
                          int stop_fd);
/* The bytes received so far and not returned as lines (for messages
 * about a peer that does not speak the protocol).
 */
extern size_t ctl_reader_pending (const struct ctl_reader *r,
                                  const char **bytes);

#endif /* SPARSEBACKUP_CTLPROTO_H */
