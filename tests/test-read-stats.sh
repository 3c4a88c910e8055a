#!/usr/bin/env bash
# Issue 4: zeros never cross the connection, and scanned data is not read
# from the plugin twice.
#
# nbdcopy a thick (fully allocated) 32 MiB raw file holding 1 MiB of data
# through
#   --filter=stats (above) --filter=sparsebackup scan=always
#   --filter=log (below) file thick.img
# The stats filter above counts what crosses to the client: only about
# the data.  The log filter below records what the plugin reads: the file
# at most once (the scan), the client's reads being served from the scan
# cache.  (Two stats filters cannot be stacked: both would take the same
# statsfile= parameter.)
# The filter's own statistics agree.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires nbdcopy --version
requires_plugin file
requires_filter stats
requires_filter log

size=$((32 * M))
layout="$M:$((256 * K)) $((9 * M)):$((256 * K)) $((20 * M + 64 * K)):$((256 * K)) $((size - 256 * K)):$((256 * K))"
data=$M
# nbdcopy reads whole 256K requests: the data runs rounded out to 256K.
rounded=$((5 * 256 * K))
mk_thick $tmp/thick.img $size $layout

start_nbdkit --filter=stats --filter=sparsebackup --filter=log \
             file $tmp/thick.img \
             statsfile=$tmp/above.txt logfile=$tmp/below.log \
             sparsebackup-scan=always sparsebackup-statsfile=$tmp/sb.txt
nbdcopy "$uri" $tmp/out.img
stop_nbdkit

cmp $tmp/thick.img $tmp/out.img || fail "the copy differs from the source"
# nbdcopy wrote the zeros as holes.
assert_le "$(data_bytes $tmp/out.img)" $((data + 256 * K)) "data in the copy"

for f in above sb; do echo "--- $f"; cat $tmp/$f.txt; done

above=$(stats_bytes $tmp/above.txt read)
below=$(log_read_bytes $tmp/below.log)
echo "client read $above bytes, plugin read $below bytes (file $size, data $data)"

# To the client: the data, plus at most nbdcopy's rounding to its 256K
# requests (and the stats filter rounds to 0.01 of its unit).
assert_le "$above" $((rounded + 16 * K)) "bytes read by the client (stats above)"
assert_le $((data - 16 * K)) "$above" "bytes read by the client (stats above)"

# From the plugin: the whole file at most once (the scan), plus slack.
assert_le "$below" $((size + 512 * K)) "bytes read from the plugin (log below)"

# The filter's own numbers.
sb_read=$(sb_stat $tmp/sb.txt read-bytes)
sb_plugin=$(sb_stat $tmp/sb.txt plugin-read-bytes)
sb_scan=$(sb_stat $tmp/sb.txt scan-bytes)
sb_cache=$(sb_stat $tmp/sb.txt read-cache-bytes)
sb_map=$(sb_stat $tmp/sb.txt read-map-bytes)
assert_le "$sb_read" $rounded "read-bytes"
assert_le $data "$sb_read" "read-bytes"
assert_le "$sb_plugin" $((size + 512 * K)) "plugin-read-bytes"
# Everything not read by the client was scanned.
assert_le $((size - data)) "$sb_scan" "scan-bytes"
assert_le "$sb_scan" "$sb_plugin" "scan-bytes <= plugin-read-bytes"
# The client's data reads were served from the scan cache.
assert_le $data "$sb_cache" "read-cache-bytes"
assert_le $((sb_cache + sb_map)) "$sb_read" "read-cache-bytes + read-map-bytes <= read-bytes"
# The log below agrees with plugin-read-bytes.
assert_eq "$below" "$sb_plugin" "plugin-read-bytes vs the Reads logged below the filter"

echo "$0: OK"
