#!/usr/bin/env bash
# The nbdkit that tests run (through the ./nbdkit wrapper) is exactly the
# version whose headers built the filter.
source "${srcdir:-.}/functions.sh"

headers=$(pkg-config --modversion nbdkit)
binary=$(nbdkit --version | awk '{print $2; exit}')
assert_eq "$headers" "$binary" "nbdkit binary version vs headers"

# The wrapper records the binary configure found.
grep -q '^exec "/' "$abs_top_builddir/nbdkit" ||
    fail "the wrapper does not exec an absolute nbdkit path"
