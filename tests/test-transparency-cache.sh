#!/usr/bin/env bash
# Issue 19, defect 3: NBD_CMD_CACHE reaches a layer below that can cache
# (the nbd plugin forwards it to its server, nbdkit's cache filter warms
# itself with it, the file plugin advises the kernel).  The filter's own
# scan into its scan cache is for layers that cannot cache at all; it
# reads at most sparsebackup-scan-cache bytes, the rest of the range
# would be dropped.
#
# 1. A plugin that caches natively (eval, cache logged) and whose reads
#    fail: a cache request of the whole 128M disk succeeds and reaches
#    the plugin's cache over the whole range, with no read.
# 2. A plugin that emulates caching (nbdkit reads the range in 64M
#    requests): the reads it sees are nbdkit's emulation of the whole
#    range (nbdkit's test-eval-cache.sh).
#
# (The eval scripts unset LD_PRELOAD: under --enable-sanitizers the
# wrapper preloads libasan into nbdkit, and dd aborts under it.)
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_plugin eval
requires dd iflag=count_bytes </dev/null

export log=$tmp/plugin.log
: > "$log"

# ---- 1. Native: passed down, whole
start_nbdkit --filter=sparsebackup eval \
    get_size='echo 128M' \
    cache='echo "cache $3 $4" >> "$log"' \
    pread='echo "pread $3 $4" >> "$log"; echo EIO >&2; exit 1'
rc=0
nbdsh -u "$uri" -c '
assert h.can_cache()
h.cache(h.get_size(), 0)
' || rc=$?
stop_nbdkit
cat "$log"
[ $rc -eq 0 ] || fail "the cache request failed (the plugin can cache)"
grep -q '^pread' "$log" && fail "a cache request read the plugin instead of passing down"
# The cache requests the plugin saw cover [0, 128M).
awk -v size=$((128 * 1024 * 1024)) '
    $1 == "cache" { if ($3 != pos) bad = 1; pos += $2 }
    END { exit !(pos == size && !bad) }' "$log" ||
    fail "the plugin's cache requests do not cover the whole disk"

# ---- 2. Emulated: nbdkit's emulation sees the whole range
: > "$log"
start_nbdkit --filter=sparsebackup eval \
    get_size='echo 128M' can_cache='echo emulate' \
    pread='unset LD_PRELOAD; echo "pread $3 $4" >> "$log"
           dd if=/dev/zero count=$3 iflag=count_bytes status=none'
nbdsh -u "$uri" -c 'h.cache(h.get_size(), 0)'
stop_nbdkit
cat "$log"
awk -v size=$((128 * 1024 * 1024)) '
    $1 == "pread" { if ($3 != pos) bad = 1; pos += $2 }
    END { exit !(pos == size && !bad) }' "$log" ||
    fail "a cache request over a layer that emulates caching did not read the whole range"
echo "$0: OK"
