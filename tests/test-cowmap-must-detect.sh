#!/usr/bin/env bash
# The negative control of test-cowmap: with COWMAP_TEST_NO_CHECK=1 its
# readers skip cowmap_check (the re-check after reading the disk), and
# the model must then see wrong reads.  If it does not, the model could
# not catch a frozen read that misses a change, and test-cowmap's pass
# would mean nothing.  The race is timing dependent: up to three runs.
source "${srcdir:-.}/functions.sh"

prog=./test-cowmap
[ -x "$prog" ] || prog="$abs_top_builddir/tests/test-cowmap"
for run in 1 2 3; do
    if COWMAP_TEST_NO_CHECK=1 "$prog" > "$tmp/out" 2>&1; then
        cat "$tmp/out"
        echo "test-cowmap without the re-check found wrong reads (run $run)"
        exit 0
    fi
    cat "$tmp/out"
done
echo "FAIL: test-cowmap without cowmap_check saw no wrong read in 3 runs:" \
     "its model cannot detect a missed re-check"
exit 1
