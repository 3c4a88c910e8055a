#!/usr/bin/env bash
# Issue 4: once the map knows a region is zero, reads of it never reach
# the plugin.
#
#   nbdkit --filter=sparsebackup --filter=log file sparse.img
#
# (the log filter is BELOW the filter: it records what the filter asks of
# the plugin).  After one `nbdinfo --map` (a separate connection: the map
# is shared by all connections), nbdsh reads zero regions, a read
# straddling data and zeros, and data.  The contents are right, and the
# log shows no Read touching a zero region.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires nbdinfo --version
requires_nbdsh
requires_plugin file
requires_filter log

size=$((4 * M))
layout="$((128 * K)):$((64 * K)) $M:$((256 * K)) $((3 * M + 64 * K)):$((64 * K))"
mk_sparse $tmp/sparse.img $size $layout
expect_zmap $size $layout > $tmp/expected

start_nbdkit --filter=sparsebackup --filter=log file $tmp/sparse.img \
             logfile=$tmp/log sparsebackup-statsfile=$tmp/sb.txt

zmap "$uri" > $tmp/map
diff -u $tmp/expected $tmp/map || fail "wrong map through the filter"

export file=$tmp/sparse.img
nbdsh -u "$uri" -c '
import os
f = open(os.environ["file"], "rb")
def check(count, offset, zero):
    buf = h.pread(count, offset)
    f.seek(offset)
    want = f.read(count)
    assert buf == want, "wrong data at %d+%d" % (offset, count)
    if zero:
        assert buf == bytearray(count), "not zero at %d+%d" % (offset, count)
K = 1024; M = K * K
check(128 * K, 0, True)                 # the first hole, whole
check(4 * K, 64 * K, True)              # inside it
check(1 * M, 2 * M, True)               # inside the big hole
check(100, 2 * M + 12345, True)         # unaligned, inside the big hole
check(64 * K, 4 * M - 64 * K, True)     # the last hole, to the end
check(128 * K, 64 * K, False)           # hole + data + ...
check(256 * K, 128 * K, False)          # data + hole
check(64 * K + 512, M - 512, False)     # unaligned: hole tail + data
check(64 * K, 128 * K, False)           # data only
'
stop_nbdkit

# The log works: the data was read from the plugin.
[ -n "$(log_reads $tmp/log $((128 * K)) $((192 * K)))" ] ||
    { cat $tmp/log; fail "the log filter below recorded no Read of the data"; }

# No Read touched any zero run.
while read -r off len type; do
    [ "$type" = zero ] || continue
    r=$(log_reads $tmp/log $off $((off + len)))
    if [ -n "$r" ]; then
        echo "$r"
        fail "the plugin was asked to read the zero region [$off, $((off + len)))"
    fi
done < $tmp/expected

cat $tmp/sb.txt
# The client asked for exactly these bytes ...
assert_eq $((128 * K + 4 * K + M + 100 + 64 * K + 128 * K + 256 * K + 64 * K + 512 + 64 * K)) \
          "$(sb_stat $tmp/sb.txt read-bytes)" "read-bytes"
# ... of which at least the zero parts were answered from the map.
assert_le $((128 * K + 4 * K + M + 100 + 64 * K + 64 * K + 192 * K + 512)) \
          "$(sb_stat $tmp/sb.txt read-map-bytes)" "read-map-bytes"
assert_le 1 "$(sb_stat $tmp/sb.txt requests-avoided)" "requests-avoided"

echo "$0: OK"
