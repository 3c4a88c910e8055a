#!/usr/bin/env bash
# qcow2 plugin: backing chains.  Three qcow2 layers with zero clusters
# and discards over backing data (relative backing names resolved
# against the directory of the image naming them), backing=false, a
# raw backing file with holes, a shorter backing file, max-depth.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy nbdinfo python3
requires_filter offset

cd "$tmp"
mkdir sub
qemu-img create -q -f qcow2 base.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 4M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o compat=0.10 -b base.qcow2 -F qcow2 mid.qcow2
qemu-io -f qcow2 -c 'write -z 512k 512k' -c 'write -P 0x22 1M 512k' \
    -c 'discard 2M 256k' mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b ../mid.qcow2 -F qcow2 sub/top.qcow2
qemu-io -f qcow2 -c 'write -P 0x33 1280k 1M' -c 'write -z 3M 64k' \
    -c 'discard 1M 64k' -c 'write -P 0x44 6M 64k' sub/top.qcow2 >/dev/null

# Run from another directory: names are resolved against the image's.
cd /
check "$tmp/sub/top.qcow2"
cd "$tmp"
check sub/top.qcow2

# Bytes from each layer.
nbdkit -U - qcow2 file=sub/top.qcow2 --run "nbdcopy \"\$uri\" out.raw"
assert_eq "11" "$(bytes_at out.raw 0)" "base data"
assert_eq "00" "$(bytes_at out.raw 600000)" \
    "mid zero cluster over base data"
assert_eq "22" "$(bytes_at out.raw 1200000)" "mid data"
assert_eq "33" "$(bytes_at out.raw 1400000)" "top data"
assert_eq "00" "$(bytes_at out.raw $((3*1024*1024+5)))" \
    "top zero cluster over base data"
assert_eq "44" "$(bytes_at out.raw $((6*1024*1024)))" \
    "top data"

# backing=false: unallocated clusters read as zero.
check --qemu-image \
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"sub/top.qcow2"},"backing":null}' \
    sub/top.qcow2 backing=false
nbdkit -U - qcow2 file=sub/top.qcow2 backing=false \
    --run "nbdcopy \"\$uri\" out2.raw"
assert_eq "00" "$(bytes_at out2.raw 0)" \
    "backing=false reads zero"

# max-depth: 3 layers allowed with max-depth=3, refused with 2.
nbdkit -U - qcow2 file=sub/top.qcow2 max-depth=3 --run true
open_error sub/top.qcow2 'backing chain is longer than the limit of 2 layers' \
    max-depth=2

# A raw backing file with holes, shorter than the image, under a v2 image.
head -c 3M /dev/urandom > r.raw
truncate -s 5M r.raw
dd if=/dev/urandom of=r.raw bs=64k seek=70 count=1 conv=notrunc status=none
qemu-img create -q -f qcow2 -b r.raw -F raw -o compat=0.10 rtop.qcow2 12M
qemu-io -f qcow2 -c 'write -P 0x33 1M 64k' -c 'write -P 0x1 10M 64k' \
    rtop.qcow2 >/dev/null
check rtop.qcow2

# A shorter qcow2 backing file: reads past its end are zero.
qemu-img create -q -f qcow2 short.qcow2 2M
qemu-io -f qcow2 -c 'write -P 0x99 1M 1M' short.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b short.qcow2 -F qcow2 long.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x98 1536k 1M' long.qcow2 >/dev/null
check --expect-data $((1536*1024)) long.qcow2
nbdkit -U - qcow2 file=long.qcow2 --run "nbdcopy \"\$uri\" out3.raw"
assert_eq "99" "$(bytes_at out3.raw $((1024*1024)))" "short backing data"
assert_eq "98" "$(bytes_at out3.raw $((2*1024*1024)))" "top data past the backing end"
assert_eq "$(head -c 5M /dev/zero | od -An -tx1 | md5sum)" \
    "$(tail -c 5M out3.raw | od -An -tx1 | md5sum)" "zeros past the backing end"

# A chain of 16 layers (the maximum) works; 17 is refused.
qemu-img create -q -f qcow2 -o cluster_size=4k l1.qcow2 1M
qemu-io -f qcow2 -c 'write -P 1 0 4k' l1.qcow2 >/dev/null
for i in $(seq 2 17); do
    qemu-img create -q -f qcow2 -o cluster_size=4k \
        -b l$((i-1)).qcow2 -F qcow2 l$i.qcow2
    qemu-io -f qcow2 -c "write -P $i $((i*4096)) 4k" l$i.qcow2 >/dev/null
done
check --expect-data $((16*4096)) l16.qcow2
open_error l17.qcow2 'backing chain is longer than the limit of 16 layers'
check --qemu-image \
    'json:{"driver":"qcow2","file":{"driver":"file","filename":"l17.qcow2"},"backing":null}' \
    --expect-data 4096 l17.qcow2 backing=false
