/* sparsebackup: the cbt loader compiled into the libFuzzer binary (for
 * coverage instrumentation, like fuzz-qcow2-lib.c).
 */
#include "cbt.c"
