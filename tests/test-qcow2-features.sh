#!/usr/bin/env bash
# qcow2 plugin: subclusters (extended_l2=on, also over a backing file),
# compressed clusters (zlib and zstd, cluster sizes 512 to 2M, mixed with
# uncompressible data), external data files with and without
# data_file_raw, and the data-file= override.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy nbdinfo python3
requires_filter offset
cd "$tmp"

# ---- Subclusters.
qemu-img create -q -f qcow2 -o cluster_size=64k base.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 2M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k \
    -b base.qcow2 -F qcow2 sc.qcow2
qemu-io -f qcow2 -c 'write -P 0x22 2k 2k' -c 'write -z 64k 4k' \
    -c 'write -P 0x33 130k 1k' -c 'write -z 3M 6k' -c 'write -P 0x44 5M 2k' \
    -c 'discard 1M 64k' sc.qcow2 >/dev/null
check sc.qcow2
nbdkit -U - qcow2 file=sc.qcow2 --run "nbdcopy \"\$uri\" sc.raw"
assert_eq "11 22 22 11" "$(for o in 2047 2048 4095 4096; do
    bytes_at sc.raw $o; done | xargs)" "subcluster over backing"
# Zero subcluster over backing data: 64k..68k reads zero, 68k reads 0x11.
assert_eq "00 11" "$(for o in 65536 69632; do
    bytes_at sc.raw $o; done | xargs)" "zero subcluster"
# Map at subcluster granularity (2 KiB subclusters): 3M..3M+6k is zero.
nbdkit -U - qcow2 file=sc.qcow2 backing=false --run 'nbdinfo --map "$uri"' \
    > map
cat map
assert_contains map "^ *2048 +2048 +0 +data"
assert_contains map "^ *4096 +[0-9]+ +3 +hole,zero"

for cs in 16k 2M; do
    qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=$cs \
        sc-$cs.qcow2 8M
    qemu-io -f qcow2 -c 'write -P 0x22 2k 2k' -c 'write -z 64k 64k' \
        -c 'write -P 0x33 130k 1k' -c 'write -P 0x44 5M 100k' \
        sc-$cs.qcow2 >/dev/null
    check sc-$cs.qcow2
done

# ---- Compression.
head -c 1M /dev/urandom > src.raw
{ yes hello || true; } | head -c 3M >> src.raw
truncate -s 6M src.raw
printf 'tail' >> src.raw
truncate -s 8M src.raw
for ct in zlib zstd; do
    for cs in 512 4k 64k 2M; do
        qemu-img convert -c -O qcow2 -o compression_type=$ct,cluster_size=$cs \
            src.raw c-$ct-$cs.qcow2
        check c-$ct-$cs.qcow2
    done
done
qemu-img info c-zstd-64k.qcow2 | grep -q 'compression type: zstd' ||
    fail "zstd image was not made with zstd"
nbdkit -U - qcow2 file=c-zstd-64k.qcow2 --run "nbdcopy \"\$uri\" c.raw"
cmp src.raw c.raw
# A compressed v2 image under a v3 image with zero clusters.
qemu-img convert -c -O qcow2 -o compat=0.10 src.raw cbase.qcow2
qemu-img create -q -f qcow2 -b cbase.qcow2 -F qcow2 ctop.qcow2
qemu-io -f qcow2 -c 'write -z 1M 1M' -c 'write -P 0x66 2100k 10k' \
    ctop.qcow2 >/dev/null
check ctop.qcow2

# ---- External data files.
qemu-img create -q -f qcow2 -o data_file=df.raw df.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x22 0 64k' -c 'write -z 1M 128k' \
    -c 'write -P 0x33 3M 4k' -c 'discard 0 32k' df.qcow2 >/dev/null
check --expect-data 131072 df.qcow2
qemu-img create -q -f qcow2 -o data_file=dfr.raw,data_file_raw=on dfr.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x22 0 64k' -c 'write -z 1M 128k' \
    -c 'write -P 0x33 3M 4k' dfr.qcow2 >/dev/null
check dfr.qcow2
nbdkit -U - qcow2 file=dfr.qcow2 --run "nbdcopy \"\$uri\" dfr.out"
cmp dfr.out dfr.raw
# data-file= overrides the name recorded in the image.
mv df.raw df-moved.raw
open_error df.qcow2 'df.qcow2: cannot open external data file: .*df.raw: open: No such file'
check --qemu-image \
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"df.qcow2"},"data-file":{"driver":"file","filename":"df-moved.raw"}}' \
    --expect-data 131072 df.qcow2 data-file=df-moved.raw
