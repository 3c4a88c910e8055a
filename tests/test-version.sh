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

# The filter logs the project's version at start-up with -v, and the
# qcow2 plugin's --dump-plugin shows it.
version=$(sed -n 's/^#define PACKAGE_VERSION "\(.*\)"$/\1/p' "$abs_top_builddir/config.h")
[ -n "$version" ] || fail "no PACKAGE_VERSION in config.h"
nbdkit -v -U - --filter=sparsebackup memory 1M --run true 2> "$tmp/v.log" ||
    fail "nbdkit -v --filter=sparsebackup failed"
assert_contains "$tmp/v.log" "sparsebackup: version $version\$"
nbdkit qcow2 --dump-plugin > "$tmp/dump.txt" || fail "--dump-plugin failed"
assert_contains "$tmp/dump.txt" "^qcow2_version=$version\$"
echo "$0: OK"
