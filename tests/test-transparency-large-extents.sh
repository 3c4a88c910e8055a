#!/usr/bin/env bash
# Issue 19, defects 5 and 8: the map has the plugin's shape whatever the
# lengths of the requests.
#
# 5. nbdinfo --map asks 2^32-1 bytes at a time, so the requests after
#    the first start at offsets that are not block aligned.  Over an
#    empty 20G sparse file (the file plugin answers extents up to the end
#    of each request) the map is one hole, not a data block at every
#    request boundary (8G, 16G).
# 8. A zero run that ends where the plugin's answer ended is not judged
#    short (sparsebackup-min-zero-extent, 256K for REQ_ONE clients such
#    as qemu-img) before the plugin was asked what follows: over a plugin
#    that answers at most 64K of extents per call, an empty disk is one
#    zero extent for qemu-img map too (nbdkit's test-truncate-extents.sh:
#    the data plugin under the truncate filter answers up to its own
#    size only).
source "${srcdir:-.}/functions.sh"
requires nbdinfo --version
requires qemu-img --version
requires jq --version
requires_plugin file
requires_plugin eval

# ---- 5. Requests of 2^32-1 bytes
truncate -s 20G "$tmp/big"
[ "$(du -k "$tmp/big" | cut -f1)" -lt 1024 ] ||
    skip "cannot create a sparse 20G file in $tmp"
start_nbdkit --filter=sparsebackup file "$tmp/big"
nbdinfo --map "$uri" > "$tmp/map"
cat "$tmp/map"
printf '%10d  %10d  %3d  %s\n' 0 $((20 << 30)) 3 hole,zero > "$tmp/expected"
diff -u "$tmp/expected" "$tmp/map" ||
    fail "the map of an empty 20G file, asked 2^32-1 bytes at a time"
stop_nbdkit

# ---- 8. A plugin that answers 64K of extents per call
start_nbdkit --filter=sparsebackup eval \
    get_size='echo 1M' \
    pread='exit 1' \
    extents='end=$(( $4 + 65536 )); [ $end -gt 1048576 ] && end=1048576
             echo $4 $(( end - $4 )) hole,zero'
qemu-img map -f raw --output=json "$uri" > "$tmp/qmap"
jq -c '.[] | {start:.start, length:.length, data:.data, zero:.zero}' \
    < "$tmp/qmap" > "$tmp/qmap.out"
cat "$tmp/qmap.out"
echo '{"start":0,"length":1048576,"data":false,"zero":true}' > "$tmp/expected"
diff -u "$tmp/expected" "$tmp/qmap.out" ||
    fail "qemu-img map over a plugin answering 64K of extents per call"
echo "$0: OK"
