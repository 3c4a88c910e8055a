#!/usr/bin/env bash
# qcow2 library: mutated images (test-qcow2-mutate.c) never crash, leak
# or break the API contract; error returns always carry a message.
source "${srcdir:-.}/functions.sh"
requires qemu-img --version
requires qemu-io --version
prog="$abs_top_builddir/tests/test-qcow2-mutate"
[ -x "$prog" ] || skip "$prog not built"
cd "$tmp"

head -c 256k /dev/urandom > src.raw
{ yes hello || true; } | head -c 256k >> src.raw
truncate -s 1M src.raw

qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=512 v2.qcow2 1M
qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 512k 4k' v2.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o cluster_size=4k v3.qcow2 4M
qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -z 64k 64k' \
    -c 'write -P 2 1M 4k' v3.qcow2 >/dev/null
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=16k sc.qcow2 2M
qemu-io -f qcow2 -c 'write -P 1 0 3k' -c 'write -z 16k 2k' \
    -c 'write -P 2 1M 1k' sc.qcow2 >/dev/null
qemu-img convert -c -O qcow2 -o cluster_size=4k src.raw z.qcow2
qemu-img convert -c -O qcow2 -o cluster_size=4k,compression_type=zstd \
    src.raw zs.qcow2

"$prog" -n 400 v2.qcow2 v3.qcow2 sc.qcow2 z.qcow2 zs.qcow2 > out
cat out
[ "$(grep -c '400 mutations' out)" -eq 5 ] || fail "not all images ran"
