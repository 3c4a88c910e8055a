/* sparsebackup: the qcow2 parser compiled into the libFuzzer binary.
 *
 * libFuzzer needs the code under test built with its coverage
 * instrumentation (-fsanitize=fuzzer), which libqcow2.la is not, so the
 * fuzz-qcow2 program compiles the parser itself through this file.
 */
#include "qcow2.c"
