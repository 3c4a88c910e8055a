/* test-write-parallel: the private header of its parts:
 * test-write-parallel.c (phase 1, the feature check, main),
 * write-parallel-races.c (phase 2) and write-parallel-lib.c (the
 * server, the connections, the model of the disk, random numbers,
 * block status checks, failing).
 */

#ifndef SPARSEBACKUP_WRITE_PARALLEL_H
#define SPARSEBACKUP_WRITE_PARALLEL_H

#include <stdbool.h>
#include <stdint.h>
#include <sys/types.h>

#include <libnbd.h>

#define NR_CONN     4
#define DISK_SIZE   (64 * 1024 * 1024ULL)
#define BLK         4096u
#define REGION      (15 * 1024 * 1024ULL)     /* phase 1, per connection */
#define FEATURE_OFF (60 * 1024 * 1024ULL)     /* 1 MiB */
#define RACE_OFF    (62 * 1024 * 1024ULL)
#define RACE_BLOCKS 16
#define MAX_INFLIGHT 16
#define OPS_PER_CONN 300
#define MAX_LEN     (256 * 1024u)
#define ROUNDS      150

extern char tmpdir[];
extern char sock[256], disk[256];
extern pid_t server_pid;
extern struct nbd_handle *h[NR_CONN];

extern uint8_t *model;          /* expected contents */
extern uint8_t *undef;          /* bitmap: byte is undefined (trimmed) */
extern volatile int failed;
extern bool no_fast_zero;

struct rng { uint64_t s; };

/* ---- In write-parallel-lib.c ------------------------------------------ */

extern void cleanup (void);
extern void die (const char *fs, ...)
  __attribute__ ((noreturn, format (printf, 1, 2)));
extern void nbd_die (const char *what);
extern uint64_t rnd_below (struct rng *r, uint64_t n);
extern void set_undef (uint64_t off, uint64_t len, bool u);
extern bool is_undef (uint64_t i);
extern void model_write (uint64_t off, const void *buf, uint64_t len);
extern void model_zero (uint64_t off, uint64_t len);
extern void start_server (const char *const *extra,
                          const char *const *params);
extern void stop_server (void);
extern void connect_all (void);
extern void close_all (void);
/* Block status over [off, off+len) (several requests if needed); every
 * range claimed ZERO must be zero in CONTENT (the bytes of that range).
 */
extern void check_zero_claims (struct nbd_handle *hh, uint64_t off,
                               uint64_t len, const uint8_t *content,
                               const char *what);
extern bool all_zero_claimed (struct nbd_handle *hh, uint64_t off,
                              uint64_t len);
extern void read_range (struct nbd_handle *hh, uint8_t *buf, uint64_t off,
                        uint64_t len);

/* ---- In test-write-parallel.c and write-parallel-races.c -------------- */

extern void phase1 (uint64_t seed);
extern void feature_check (void);
extern void phase2 (uint64_t seed);

#endif /* SPARSEBACKUP_WRITE_PARALLEL_H */
