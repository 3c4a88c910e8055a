#!/usr/bin/env bash
# Issue 4: NBD_CMD_CACHE scans ahead.
#
#   nbdkit --filter=sparsebackup --filter=log --filter=nocache file thick.img
#          scan=always cachemode=none
#
# (nocache cachemode=none: a layer below that cannot cache, over which
# the filter scans; over one that can, cache requests are passed down.)
#
# Connection 1 sends only a cache request over [2M, 6M).  Connection 2 then
# asks block status and reads all of [2M, 6M): the zero runs are reported
# zero, the data is right, and the log filter below shows no Read at all
# from connection 2: everything came from the map or the scan cache, as
# the filter's statistics say.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires_nbdsh
requires_plugin file
requires_filter log
requires_filter nocache

size=$((8 * M))
layout="$M:$((64 * K)) $((3 * M)):$((128 * K)) $((5 * M + 64 * K)):$((64 * K)) $((7 * M)):$((64 * K))"
mk_thick $tmp/thick.img $size $layout

start_nbdkit --filter=sparsebackup --filter=log --filter=nocache \
             file $tmp/thick.img cachemode=none \
             logfile=$tmp/log sparsebackup-scan=always \
             sparsebackup-statsfile=$tmp/sb.txt

# Connection 1: cache only.
nbdsh -u "$uri" -c 'h.cache(4 * 1024 * 1024, 2 * 1024 * 1024)'
# The filter scanned the range (and did not just pass the cache down).
[ -n "$(log_reads $tmp/log $((2 * M)) $((6 * M)) 1)" ] || {
    cat $tmp/log
    fail "the cache request did not make the filter read (scan) the range"
}

# Connection 2: extents and reads of the cached range.
export file=$tmp/thick.img
nbdsh --base-allocation -u "$uri" -c '
import os
K = 1024; M = K * K
start, end = 2 * M, 6 * M
runs = []
pos = start
while pos < end:
    got = []
    def cb(meta, o, entries, err):
        p = o
        for i in range(0, len(entries), 2):
            got.append((p, entries[i], entries[i + 1]))
            p += entries[i]
        return 0
    h.block_status(end - pos, pos, cb)
    assert got and got[0][0] == pos and got[0][1] > 0
    for (o, l, f) in got:
        if o >= end:
            break
        l = min(l, end - o)
        t = "zero" if f & nbd.STATE_ZERO else "data"
        if runs and runs[-1][2] == t:
            runs[-1][1] += l
        else:
            runs.append([o, l, t])
        pos = o + l
want = [[2 * M, M, "zero"], [3 * M, 128 * K, "data"],
        [3 * M + 128 * K, 2 * M - 64 * K, "zero"],
        [5 * M + 64 * K, 64 * K, "data"], [5 * M + 128 * K, M - 128 * K, "zero"]]
assert runs == want, "extents of the cached range: %r, expected %r" % (runs, want)

f = open(os.environ["file"], "rb")
for off in range(start, end, 256 * K):
    f.seek(off)
    assert h.pread(256 * K, off) == f.read(256 * K), "wrong data at %d" % off
'
stop_nbdkit

r=$(log_reads $tmp/log 0 $size 2)
if [ -n "$r" ]; then
    echo "$r"
    fail "reads after the cache request reached the plugin"
fi

cat $tmp/sb.txt
read_bytes=$(sb_stat $tmp/sb.txt read-bytes)
cache_bytes=$(sb_stat $tmp/sb.txt read-cache-bytes)
map_bytes=$(sb_stat $tmp/sb.txt read-map-bytes)
plugin=$(sb_stat $tmp/sb.txt plugin-read-bytes)
scan=$(sb_stat $tmp/sb.txt scan-bytes)
assert_eq $((4 * M)) "$read_bytes" "read-bytes"
# The data (192K) came from the scan cache, the rest from the map or the
# cache; nothing from the plugin but the scan.
assert_le $((192 * K)) "$cache_bytes" "read-cache-bytes"
assert_eq "$read_bytes" $((cache_bytes + map_bytes)) "read-cache-bytes + read-map-bytes"
assert_eq "$scan" "$plugin" "plugin-read-bytes (only the scan)"
assert_le $((4 * M)) "$scan" "scan-bytes"
assert_le 1 "$(sb_stat $tmp/sb.txt requests-avoided)" "requests-avoided"

echo "$0: OK"
