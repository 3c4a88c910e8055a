#!/usr/bin/env bash
# qcow2 plugin: zstd compressed clusters whose frames record no content
# size and declare a large window (8 MiB, what `zstd -19` writes when it
# reads a pipe), clusters made of several frames, and frames decoding to
# more or less than a cluster.  The images are made by qcow2-zstd-image
# (a check program linked with libzstd).  qemu-img must read the good
# images exactly as the plugin does and refuse the bad ones too.
source "${srcdir:-.}/functions.sh"
requires qemu-img --version
requires nbdcopy --version
requires_plugin qcow2
mkimg=$PWD/qcow2-zstd-image
[ -x "$mkimg" ] || fail "$mkimg is not built"
cd "$tmp"

for cb in 9 12 16; do
    "$mkimg" $cb good good.qcow2 good.raw
    qemu-img check -q good.qcow2 || fail "cb $cb: qemu-img check failed"
    qemu-img convert -f qcow2 -O raw good.qcow2 qemu.raw
    cmp good.raw qemu.raw || fail "cb $cb: qemu-img reads something else"
    rm -f plugin.raw
    nbdkit -U - qcow2 file=good.qcow2 --run 'nbdcopy "$uri" plugin.raw'
    cmp good.raw plugin.raw || fail "cb $cb: the plugin reads something else"
    # Small requests: parts of clusters (the last cluster is cut by the
    # end of the disk anyway, except with 512 byte clusters).
    rm -f plugin.raw
    nbdkit -U - qcow2 file=good.qcow2 \
        --run 'nbdcopy --request-size=4096 "$uri" plugin.raw'
    cmp good.raw plugin.raw ||
        fail "cb $cb: the plugin reads something else in 4K requests"
done

# read_fails IMAGE REGEXP: reading IMAGE fails cleanly with a message
# matching REGEXP, and qemu-img refuses to read it too.
read_fails ()
{
    local img=$1 re=$2 rc=0
    rm -f out.raw
    nbdkit -U - qcow2 file="$img" --run 'nbdcopy "$uri" out.raw' \
        2>err || rc=$?
    cat err
    [ "$rc" -ne 0 ] || fail "$img: read succeeded"
    [ "$rc" -lt 128 ] || fail "$img: killed by a signal"
    if grep -E -q 'Sanitizer|runtime error|Assertion|core dumped' err; then
        fail "$img: crash report"
    fi
    assert_contains err "$re"
    if qemu-img convert -f qcow2 -O raw "$img" out.raw 2>/dev/null; then
        fail "$img: qemu-img reads it"
    fi
}

for cb in 9 16; do
    "$mkimg" $cb big big.qcow2 > big.txt
    off=$(awk '/^cluster 0:/ { sub(/,/, "", $4); print $4 }' big.txt)
    read_fails big.qcow2 "compressed cluster at offset $off \\(guest offset 0x0\\) is corrupt: zstd data larger than a cluster"
    "$mkimg" $cb short short.qcow2 > short.txt
    off=$(awk '/^cluster 0:/ { sub(/,/, "", $4); print $4 }' short.txt)
    read_fails short.qcow2 "compressed cluster at offset $off \\(guest offset 0x0\\) is corrupt: zstd data too short"
done
