/* nbdkit-sparsebackup-filter: keep NBD copies sparse.
 *
 * Foundation stage: a pass-through filter.  Later stages answer extents
 * and zero queries from a block map and detect zeroes on writes.
 */

#include <config.h>

#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>

#include <nbdkit-filter.h>

/* -D sparsebackup.verbose=1 */
NBDKIT_DLL_PUBLIC int sparsebackup_debug_verbose = 0;

static int
sparsebackup_get_ready (int thread_model)
{
  if (sparsebackup_debug_verbose)
    nbdkit_debug ("sparsebackup: ready, thread model %d", thread_model);
  return 0;
}

#define sparsebackup_config_help \
  "(no parameters yet)"

static struct nbdkit_filter filter = {
  .name              = "sparsebackup",
  .longname          = "nbdkit sparsebackup filter",
  .config_help       = sparsebackup_config_help,
  .get_ready         = sparsebackup_get_ready,
};

NBDKIT_REGISTER_FILTER (filter)
