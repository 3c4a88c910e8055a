#!/usr/bin/env bash
# Issue 4 with a REQ_ONE client: qemu-img asks block status one extent at
# a time (NBD_CMD_FLAG_REQ_ONE).
#
# - qemu-img convert through the filter from a sparse file and from a
#   thick file (scan=always): the copy is identical and sparse; from the
#   thick file only about the data crosses the connection (stats filter
#   above the filter).
# - qemu-img map through the filter shows the exact zero/data layout
#   (sparsebackup-min-zero-extent=0: the exact map; the default merges
#   short zero runs for REQ_ONE clients, see test-read-merge.sh).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires qemu-img --version
requires_plugin file
requires_filter stats

size=$((16 * M))
layout="$((64 * K)):$((64 * K)) $((3 * M)):$((512 * K)) $((7 * M + 4 * K)):$((8 * K)) $((12 * M)):$((1 * M)) $((size - 128 * K)):$((128 * K))"
data=$((64 * K + 512 * K + 8 * K + M + 128 * K))
expect_zmap $size $layout > $tmp/expected

mk_sparse $tmp/sparse.img $size $layout
mk_thick $tmp/thick.img $size $layout
cmp $tmp/sparse.img $tmp/thick.img

for src in sparse thick; do
    start_nbdkit --filter=stats --filter=sparsebackup file $tmp/$src.img \
                 statsfile=$tmp/$src.stats sparsebackup-scan=always \
                 sparsebackup-min-zero-extent=0

    qemu_zmap "$uri" > $tmp/$src.qmap
    if ! diff -u $tmp/expected $tmp/$src.qmap; then
        qemu-img map --output=json -f raw "$uri" >&2 || true
        fail "$src file: qemu-img map through the filter: wrong zero/data layout"
    fi

    qemu-img convert -f raw "$uri" -O raw $tmp/$src.out
    stop_nbdkit

    cmp $tmp/$src.img $tmp/$src.out || fail "$src file: the copy differs"
    a=$(allocated $tmp/$src.out)
    echo "$src: copy allocates $a bytes, data $data"
    assert_le "$a" $((data + 256 * K)) "$src file: bytes allocated by the copy"

    cat $tmp/$src.stats
    r=$(stats_bytes $tmp/$src.stats read)
    echo "$src: qemu-img read $r bytes through the filter"
    # qemu-img reads only what block status calls data (it may round a
    # read to its cluster size, 64K).
    assert_le "$r" $((data + 64 * K * 5)) "$src file: bytes read by qemu-img"
done

# scan=never on the thick file: no zero claims at all (and the copy is
# still right: qemu-img detects the zeros it reads).
start_nbdkit --filter=sparsebackup file $tmp/thick.img sparsebackup-scan=never
qemu_zmap "$uri" > $tmp/never.qmap
assert_eq "0 $size data" "$(cat $tmp/never.qmap)" "thick file, scan=never: qemu-img map"
qemu-img convert -f raw "$uri" -O raw $tmp/never.out
cmp $tmp/thick.img $tmp/never.out
stop_nbdkit

echo "$0: OK"
