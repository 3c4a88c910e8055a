#!/usr/bin/env bash
# qcow2 plugin: versions 2 (compat=0.10) and 3, cluster sizes 512, 4K,
# 64K and 2M, data / zero clusters / discards / unaligned writes.
# Content must equal `qemu-img convert -O raw` and the map must equal
# `qemu-img map` (see qcow2-check.py); a few bytes are also checked
# against the written patterns directly.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy nbdinfo python3
requires_filter offset

for compat in 0.10 1.1; do
    for cs in 512 4k 64k 2M; do
        img="$tmp/v$compat-$cs.qcow2"
        qemu-img create -q -f qcow2 -o compat=$compat,cluster_size=$cs \
            "$img" 8M
        qemu-io -f qcow2 \
            -c 'write -P 0xab 0 64k' \
            -c 'write -P 0xcd 1000000 3000' \
            -c 'write -z 2M 256k' \
            -c 'write -P 0x55 3M 1M' \
            -c 'discard 3200k 256k' \
            -c 'write -z 4000k 8k' \
            -c 'write -P 0x77 8388096 512' \
            "$img" >/dev/null
        check "$img"
    done
done

# Direct content assertions on one image of each version.
for compat in 0.10 1.1; do
    img="$tmp/v$compat-64k.qcow2"
    nbdkit -U - qcow2 file="$img" --run "nbdcopy \"\$uri\" $tmp/out.raw"
    assert_eq "ab ab" "$(bytes_at "$tmp/out.raw" 65534 2)" \
        "pattern at 64K-2 ($compat)"
    assert_eq "00" "$(bytes_at "$tmp/out.raw" 65536)" \
        "zero after 64K ($compat)"
    assert_eq "cd cd" "$(bytes_at "$tmp/out.raw" 1000000 2)" \
        "unaligned write ($compat)"
    assert_eq "77" "$(bytes_at "$tmp/out.raw" 8388607)" \
        "last byte ($compat)"
done

# Zero clusters (v3): the zeroed range is HOLE|ZERO in the map.
nbdkit -U - qcow2 file="$tmp/v1.1-64k.qcow2" \
    --run 'nbdinfo --map "$uri"' > "$tmp/map"
cat "$tmp/map"
# covered (start <= OFF, start + len >= END) by a run of type TYPE
covered () {
    awk -v o="$1" -v e="$2" -v t="$3" \
        '$1 <= o && $1 + $2 >= e && $3 == t { f = 1 } END { exit !f }' \
        "$tmp/map" || fail "[$1, $2) is not covered by a run of type $3"
}
covered 2097152 2359296 3
covered 0 65536 0
covered 3145728 3276800 0

# A virtual size that is not a multiple of the cluster size.
img="$tmp/odd.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=64k "$img" $((5*1024*1024 + 1536))
qemu-io -f qcow2 -c 'write -P 0x12 5M 1536' "$img" >/dev/null
check --expect-size $((5*1024*1024 + 1536)) --expect-data 1536 "$img"

# Large virtual sizes: 4T with 64K clusters, and 100G with 512-byte
# clusters (an L1 table of 25 MiB, close to the 32 MiB limit).
img="$tmp/big.qcow2"
qemu-img create -q -f qcow2 "$img" 4T
qemu-io -f qcow2 -c 'write -P 0x42 4095G 64k' "$img" >/dev/null
nbdkit -U - qcow2 file="$img" --run 'nbdinfo --map "$uri"' > "$tmp/map"
cat "$tmp/map"
assert_contains "$tmp/map" '^ *0 +4396972769280 +3 +hole,zero'
assert_contains "$tmp/map" '^ *4396972769280 +65536 +0 +data'
nbdkit -U - --filter=offset qcow2 file="$img" offset=$((4095 << 30)) \
    range=65536 --run "nbdcopy \"\$uri\" $tmp/big.raw"
head -c 64k /dev/zero | tr '\0' '\102' | cmp - "$tmp/big.raw"

img="$tmp/big512.qcow2"
qemu-img create -q -f qcow2 -o cluster_size=512 "$img" 100G
qemu-io -f qcow2 -c 'write -P 0x42 99G 64k' "$img" >/dev/null
nbdkit -U - qcow2 file="$img" --run 'nbdinfo --map "$uri"' > "$tmp/map"
cat "$tmp/map"
assert_contains "$tmp/map" '^ *106300440576 +65536 +0 +data'
