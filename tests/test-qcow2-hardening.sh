#!/usr/bin/env bash
# qcow2 plugin, hardening round 2 (issue 10): crafted images that QEMU
# refuses or shows differently, and files that must not block.
#  - a FIFO named as the image, a backing file or a data file is refused
#    at once (open used to block before fstat);
#  - a virtual size that is not a multiple of 512 is rounded down, as
#    QEMU does;
#  - with an external data file, host offsets must equal guest offsets;
#  - the zero flag in a version 2 image, a misaligned preallocation
#    offset of a zero cluster and a misaligned offset in an extended L2
#    entry without allocated subclusters are refused (as by QEMU);
#  - a data cluster cut short by the end of the file fails the reads
#    and extents that need the missing bytes (it used to read as zeros);
#  - messages about long file names keep their reason.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy nbdinfo python3 timeout
cd "$tmp"

# qemu_refuses IMAGE [OFFSET]: qemu-io cannot read the 64 KiB at OFFSET
# (default 0) of IMAGE (the plugin must not serve what QEMU refuses).
qemu_refuses ()
{
    if qemu-io -r -f qcow2 -c "read ${2:-0} 64k" "$1" >/dev/null 2>&1; then
        fail "qemu-io reads $1: the test image is not what it should be"
    fi
}

# ---- FIFOs never block the start-up.
# no_block REGEXP PARAMS...: nbdkit qcow2 PARAMS refuses to start within
# the time limit, with a message matching REGEXP.
no_block ()
{
    local re=$1 rc=0
    shift
    timeout 30 nbdkit -U - qcow2 "$@" --run true 2>err || rc=$?
    [ "$rc" -ne 124 ] || fail "nbdkit qcow2 $* blocked (killed by timeout)"
    failed_cleanly $rc "qcow2 $*"
    echo "$*: $(cat err)"
    assert_contains err "$re"
}
mkfifo fifo
no_block 'fifo: not a regular file or block device' file=fifo
qemu-img create -q -f qcow2 -u -b fifo -F raw fifo-backing.qcow2 1M
no_block 'cannot open backing file: .*fifo: not a regular file or block device' \
    file=fifo-backing.qcow2
qemu-img create -q -f qcow2 -o data_file=fifo-data.raw fifo-data.qcow2 1M
rm fifo-data.raw
mkfifo fifo-data.raw
no_block 'cannot open external data file: .*fifo-data.raw: not a regular file or block device' \
    file=fifo-data.qcow2
no_block 'fifo: not a regular file or block device' \
    file=fifo-data.qcow2 data-file=fifo

# ---- Virtual size not a multiple of 512: QEMU rounds it down.
qemu-img create -q -f qcow2 -o cluster_size=64k odd.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 1M' odd.qcow2 >/dev/null
craft odd.qcow2 be64 24 $((1048576 - 100))
qsize=$(qemu-img info --output=json odd.qcow2 |
            python3 -c 'import json,sys; print(json.load(sys.stdin)["virtual-size"])')
assert_eq 1048064 "$qsize" "qemu's size of the odd-sized image"
size=$(nbdkit -U - qcow2 file=odd.qcow2 --run 'nbdinfo --size "$uri"')
assert_eq "$qsize" "$size" "plugin's size of the odd-sized image"
check --expect-size 1048064 odd.qcow2

# ---- External data file: host offsets are the guest offsets.
qemu-img create -q -f qcow2 -o cluster_size=64k,data_file=df.raw df.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 128k 64k' \
    df.qcow2 >/dev/null
check df.qcow2
craft df.qcow2 l2 0 $((0x8000000000000000 | 0x20000))
qemu_refuses df.qcow2
read_error df.qcow2 'df.qcow2: data cluster offset 0x20000 in the external data file does not match its guest offset 0x0'
# ... also with data_file_raw.
qemu-img create -q -f qcow2 -o cluster_size=64k,data_file=dfr.raw,data_file_raw=on \
    dfr.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 128k 64k' \
    dfr.qcow2 >/dev/null
craft dfr.qcow2 l2 131072 $((0x8000000000000000 | 0x40000))
qemu_refuses dfr.qcow2 128k
read_error dfr.qcow2 'data cluster offset 0x40000 in the external data file does not match its guest offset 0x20000'

# ---- The zero flag in a version 2 image (with and without an offset).
qemu-img create -q -f qcow2 -o compat=0.10,cluster_size=64k v2.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' v2.qcow2 >/dev/null
check v2.qcow2
l2=$(craft v2.qcow2 get-l2 0)
cp v2.qcow2 v2z.qcow2
craft v2z.qcow2 l2 0 $((l2 | 1))
qemu_refuses v2z.qcow2
read_error v2z.qcow2 "L2 entry $(printf '0x%016x' $((l2 | 1))) at guest offset 0x0 has the zero flag \\(bit 0\\) set in a version 2 image"
cp v2.qcow2 v2z.qcow2
craft v2z.qcow2 l2 65536 1
read_error v2z.qcow2 'L2 entry 0x0000000000000001 at guest offset 0x10000 has the zero flag \(bit 0\) set in a version 2 image'

# ---- Misaligned preallocation offset of a zero cluster (v3).
qemu-img create -q -f qcow2 -o cluster_size=64k z.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' z.qcow2 >/dev/null
host=$(( $(craft z.qcow2 get-l2 0) & 0x00fffffffffffe00 ))
craft z.qcow2 l2 0 $((host + 0x200 | 1))
qemu_refuses z.qcow2
read_error z.qcow2 "preallocated zero cluster offset $(printf '0x%x' $((host + 0x200))) \\(guest offset 0x0\\) is not aligned to the cluster size"

# ---- Extended L2 entry without allocated subclusters, misaligned offset.
qemu-img create -q -f qcow2 -o cluster_size=64k,extended_l2=on x.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' x.qcow2 >/dev/null
host=$(( $(craft x.qcow2 get-l2 0) & 0x00fffffffffffe00 ))
craft x.qcow2 l2 0 $((0x8000000000000000 | (host + 0x200)))
craft x.qcow2 l2bitmap 0 0
qemu_refuses x.qcow2
read_error x.qcow2 "cluster offset $(printf '0x%x' $((host + 0x200))) \\(guest offset 0x0\\) is not aligned to the cluster size"
# ... and with only zero subclusters.
craft x.qcow2 l2bitmap 0 0xffffffff00000000
qemu_refuses x.qcow2
read_error x.qcow2 "cluster offset $(printf '0x%x' $((host + 0x200))) \\(guest offset 0x0\\) is not aligned"

# ---- A data cluster cut short by the end of the file.
qemu-img create -q -f qcow2 -o cluster_size=64k short.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 64k 64k' \
    short.qcow2 >/dev/null
host=$(( $(craft short.qcow2 get-l2 65536) & 0x00fffffffffffe00 ))
fsize=$(stat -c %s short.qcow2)
assert_eq $((host + 65536)) "$fsize" "the last cluster ends the file"
craft short.qcow2 truncate $((host + 0x8000))
read_error short.qcow2 "data cluster at guest offset 0x10000 \\(host offset $(printf '0x%x' "$host")\\) runs past the end of the file \\(size $(printf '0x%x' $((host + 0x8000)))\\): guest bytes 0x18000-0x1ffff are not stored"
# The bytes that are in the file still read.
nbdkit -U - qcow2 file=short.qcow2 \
    --run 'qemu-io -r -f raw -c "read -P 0xab 0 64k" -c "read -P 0xcd 64k 32k" "$uri"' \
    >out
assert_contains out 'read 32768/32768 bytes'
# ... and in an external data file.
qemu-img create -q -f qcow2 -o cluster_size=64k,data_file=dshort.raw dshort.qcow2 1M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' dshort.qcow2 >/dev/null
truncate -s 1000 dshort.raw
read_error dshort.qcow2 'data cluster at guest offset 0x0 \(host offset 0x0\) runs past the end of the external data file \(size 0x3e8\): guest bytes 0x3e8-0xffff are not stored'

# ---- Long names keep the reason of the error.
long=$(python3 -c 'print("d/" * 511 + "b")')        # 1023 bytes
qemu-img create -q -f qcow2 -u -b "$long" -F qcow2 long.qcow2 1M
open_error long.qcow2 'cannot open backing file: .*d/d/d/.*\.\.\..*d/d/b: open: No such file or directory$'
assert_eq 1 "$(grep -o 'long.qcow2' err | wc -l)" "the image named once"
proto=$(python3 -c 'print("x" * 1000 + ":y")')
qemu-img create -q -f qcow2 -u -b "$proto" -F qcow2 proto.qcow2 1M
open_error proto.qcow2 "backing file name 'x+\\.\\.\\.x+:y' looks like a protocol name .* for a local file\\)\$"
qemu-img create -q -f qcow2 -o data_file=dlong.raw dlong.qcow2 1M
open_error dlong.qcow2 'cannot open external data file: .*: open: No such file or directory$' \
    data-file="$tmp/$long"
