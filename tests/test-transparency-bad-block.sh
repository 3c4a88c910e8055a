#!/usr/bin/env bash
# Issue 19, defect 4: a bad block that no client reads must not make
# block status fail.  Over a plugin without extents, nbdkit answers "all
# data" and nbdinfo --map, qemu-img map and qemu-img convert work; the
# filter scans instead, and a scan that cannot read a block answers that
# range as data (only the client's own read of the block fails).
#
# The plugin (eval, no extents): 1M, data in [0, 4K), one unreadable
# block [20K, 24K) (EIO), zeros elsewhere.  With the filter (scan=auto,
# and scan=always):
#   - nbdinfo --map exits 0 with the exact map, the bad block as data;
#   - qemu-img map exits 0;
#   - reading the bad block fails with EIO, reading the rest works.
#
# (The eval scripts unset LD_PRELOAD: under --enable-sanitizers the
# wrapper preloads libasan into nbdkit, and dd aborts under it.)
source "${srcdir:-.}/functions.sh"
requires nbdinfo --version
requires_nbdsh
requires qemu-img --version
requires_plugin eval
requires dd iflag=count_bytes </dev/null

size=$((1024 * 1024))
bad=$((20 * 1024))
truncate -s $size "$tmp/disk"
printf 'data' | dd of="$tmp/disk" conv=notrunc status=none
export disk=$tmp/disk bad

cat > "$tmp/expected" <<EOF
         0        4096    0  data
      4096       16384    3  hole,zero
     20480        4096    0  data
     24576     1024000    3  hole,zero
EOF

for scan in auto always; do
    start_nbdkit --filter=sparsebackup eval \
        get_size="echo $size" \
        pread='unset LD_PRELOAD
               if [ $4 -lt $((bad + 4096)) ] && [ $(($4 + $3)) -gt $bad ]; then
                   echo "EIO bad block" >&2; exit 1
               fi
               dd if="$disk" skip=$4 count=$3 iflag=skip_bytes,count_bytes status=none' \
        sparsebackup-scan=$scan

    rc=0
    nbdinfo --map "$uri" > "$tmp/map" 2> "$tmp/err" || rc=$?
    cat "$tmp/map" "$tmp/err"
    [ $rc -eq 0 ] ||
        fail "scan=$scan: nbdinfo --map failed (status $rc) over a bad block"
    diff -u "$tmp/expected" "$tmp/map" ||
        fail "scan=$scan: the map over a bad block"

    rc=0
    qemu-img map -f raw --output=json "$uri" > "$tmp/qmap" 2> "$tmp/err" || rc=$?
    cat "$tmp/err"
    [ $rc -eq 0 ] || fail "scan=$scan: qemu-img map failed over a bad block"

    nbdsh -u "$uri" -c '
import errno, os
bad = int(os.environ["bad"])
try:
    h.pread(4096, bad)
    assert False, "the bad block was read"
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
assert h.pread(4, 0) == b"data"
assert h.pread(bad - 4096, 4096) == bytes(bad - 4096)
assert h.pread(4096, bad + 4096) == bytes(4096)
' || fail "scan=$scan: reads around a bad block"
    stop_nbdkit
done
echo "$0: OK"
