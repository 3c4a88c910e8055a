#!/usr/bin/env bash
# Issue 4: block status answers through the filter, REQ_ONE (as qemu asks)
# and large ranges (as nbdcopy asks): progress, alignment to the block
# size, no ZERO claim over data, and the exact number of zero bytes.
# The checks are in test-read-reqone.c.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires_plugin file
requires_filter noextents

prog=./test-read-reqone
[ -x $prog ] || prog="$abs_top_builddir/tests/test-read-reqone"
[ -x $prog ] || skip "test-read-reqone is not built (run make check)"

# run_case NAME SIZE LAYOUT NBDKIT-ARGS...
run_case ()
{
    local name=$1 sz=$2 lay=$3 r data=0
    shift 3
    for r in $lay; do data=$((data + ${r#*:})); done
    echo "=== $name"
    start_nbdkit "$@" sparsebackup-min-zero-extent=0
    $prog "$uri" 4096 $((sz - data)) || fail "$name"
    stop_nbdkit
}

size=$((8 * M))
layout="$((64 * K)):$((64 * K)) $((2 * M)):$((512 * K)) $((5 * M + 128 * K)):$((64 * K)) $((size - 64 * K)):$((64 * K))"
mk_sparse $tmp/sparse.img $size $layout
mk_thick $tmp/thick.img $size $layout

run_case "sparse file" $size "$layout" \
         --filter=sparsebackup file $tmp/sparse.img
run_case "thick file, scan=always" $size "$layout" \
         --filter=sparsebackup file $tmp/thick.img sparsebackup-scan=always
run_case "thick file, scan=always, scan-max=64K" $size "$layout" \
         --filter=sparsebackup file $tmp/thick.img sparsebackup-scan=always \
         sparsebackup-scan-max=64K
run_case "thick file over noextents, scan=auto" $size "$layout" \
         --filter=sparsebackup --filter=noextents file $tmp/thick.img

# A size that is not a multiple of the block size: the last, partial
# block ends the map.
odd=$((3 * M + 1000))
mk_thick $tmp/odd.img $((3 * M)) $M:$((64 * K))
truncate -s $odd $tmp/odd.img
run_case "odd size, scan=always" $odd "$M:$((64 * K))" \
         --filter=sparsebackup file $tmp/odd.img sparsebackup-scan=always

echo "$0: OK"
