/* sparsebackup-copy: the options (set by main) and the state of the
 * copy, shared by the parts: one thread, so plain globals (copy.h says
 * what each one is).  Definitions only: this file calls nothing.
 */

#include <config.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include <libnbd.h>

#include "copy.h"

/* ---- Options ---------------------------------------------------------- */

bool delta;
bool quiet;
int progress_fd = -1;
bool progress_bar;
unsigned requests = DEFAULT_REQUESTS;
size_t request_size = DEFAULT_REQUEST_SIZE;
bool force;
bool allow_larger;
bool restart;
uint64_t journal_every = DEFAULT_JOURNAL_EVERY;
const char *journal_path;

/* ---- State ------------------------------------------------------------ */

const char *src_name, *dst_name;
const char *src_label = "SRC";
char **src_cmd, **dst_cmd;
struct nbd_handle *src, *dst_nbd;
struct source_id src_id;
int dst_fd = -1;
enum dst_kind dst_kind = DST_NONE;
uint64_t dst_size;
bool dst_can_zero;
bool dst_can_flush;
bool have_extents;
uint64_t size;

struct slot *slots;
char *zero_buf;

extents queue = VECTOR_INIT;
size_t head;
uint64_t queued;
uint64_t extents_next;
bool bs_in_flight;
uint64_t bs_offset, bs_end;
uint64_t bs_reached;
bool bs_replied;

uint64_t write_from;
uint64_t copied, zeroed, skipped, resumed, hash_read;
uint64_t watermark;
bool failed;
volatile int stop_signal;
