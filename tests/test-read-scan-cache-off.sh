#!/usr/bin/env bash
# sparsebackup-scan-cache=0: scanning only teaches the map.  Over a
# plugin without extents (scan=auto scans), block status of a thick
# image reads it once to scan; with the cache the client's reads of the
# data come from the cache (the plugin is read once), without it they
# reach the plugin a second time (twice the bytes, no cache hits), and
# cache requests are passed down to the plugin (it caches natively).
# Either way the data read and the map are the same.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires_nbdsh
requires_plugin file
requires_filter log
requires_filter noextents

size=$((8 * M))
layout="$M:$((64 * K)) $((3 * M)):$((128 * K)) $((7 * M)):$((64 * K))"
mk_thick $tmp/thick.img $size $layout

# One run: block status of the whole disk, then read all of it.
run () {
    local cache=$1 out=$2
    start_nbdkit --filter=sparsebackup --filter=log --filter=noextents \
        file $tmp/thick.img logfile=$tmp/log.$cache \
        sparsebackup-scan-cache=$cache sparsebackup-statsfile=$tmp/st.$cache
    "$nbd_python" - "$sock" "$out" > "$out.zero" <<'PY'
import nbd, sys
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix(sys.argv[1])
size = h.get_size()
pos, zero = 0, 0
while pos < size:
    def cb(meta, o, e, err):
        global pos, zero
        for i in range(0, len(e), 2):
            if e[i + 1] & nbd.STATE_ZERO: zero += e[i]
            pos += e[i]
    h.block_status(size - pos, pos, cb)
open(sys.argv[2], "wb").write(h.pread(size, 0))
print(zero)
PY
    # A cache request: scanned by the filter, or passed down.
    nbdsh -u "$uri" -c 'h.cache(1 << 20, 6 << 20)'
    stop_nbdkit
}
run 64M $tmp/with
run 0 $tmp/without

cmp $tmp/with $tmp/thick.img || fail "the data read with the scan cache differs"
cmp $tmp/without $tmp/thick.img || fail "the data read without the scan cache differs"
assert_eq "$(cat $tmp/with.zero)" "$(cat $tmp/without.zero)" "zero bytes in the map"
assert_eq $((size - 256 * K)) "$(cat $tmp/without.zero)" "zero bytes in the map"

st () { sed -n "s/^$2: //p" $tmp/st.$1; }
# With the cache: the scan read everything, the client's reads of the
# data came from the cache.
[ "$(st 64M read-cache-bytes)" -ge $((256 * K)) ] ||
    fail "with the scan cache: read-cache-bytes $(st 64M read-cache-bytes)"
# Without: no cache hits, the plugin read the data a second time.
assert_eq 0 "$(st 0 read-cache-bytes)" "read-cache-bytes without the cache"
[ "$(st 0 plugin-read-bytes)" -ge $(( $(st 64M plugin-read-bytes) + 256 * K )) ] ||
    fail "without the scan cache the data was not read again: plugin-read-bytes $(st 0 plugin-read-bytes) vs $(st 64M plugin-read-bytes)"
grep -q '^scan-cache-' $tmp/st.0 && fail "scan cache counters without a scan cache"
assert_eq 1 "$(st 64M scan-cache-inserted | grep -c '^[1-9]')" "scan-cache-inserted"
# The cache request reached the plugin as a Cache with and without the
# scan cache: the file plugin caches natively (over a layer that cannot,
# test-read-cache.sh sees the filter scan ahead instead; over one whose
# caching nbdkit emulates, test-transparency-cache.sh sees nbdkit's
# emulation read the whole range).
grep -q ' Cache ' $tmp/log.0 || { cat $tmp/log.0; fail "the cache request was not passed down without the scan cache"; }
grep -q ' Cache ' $tmp/log.64M || { cat $tmp/log.64M; fail "the cache request was not passed down to a plugin that caches natively"; }
echo PASS
