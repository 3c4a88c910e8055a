# Images with extents longer than 4 GiB, and their exact maps, for
# test-qcow2-map64.sh and test-extents-64bit.sh.  Source it after
# functions.sh (and qcow2-lib.sh), in "$tmp":
#
#   make_qcow2_chain    base.qcow2 + top.qcow2 (40 GiB, metadata only)
#   make_raw_disk       disk.raw (40 GiB sparse raw file, 3 MiB of data)
#
# The chain (G = GiB, 64K clusters):
#   base.qcow2  version 2 (no zero flag), preallocation=metadata: every
#               cluster is allocated data (reading as zeros from the
#               sparse file), then [8G, 14G) and [30G, 40G) discarded
#               (unallocated);
#   top.qcow2   version 3 over base.qcow2: zero clusters over [2G, 8G);
#               then persistent bitmap b1 added; then zero clusters over
#               [16G, 22G) and 1M of data at 25G (both recorded in b1).
# Nothing but metadata is written: about 10 MB on disk.
#
# The maps (merged runs "OFFSET LENGTH FLAGS", FLAGS 1 = hole, 2 = zero),
# in $map_chain, $map_top and $map_since (the plugin's "", @top and
# @since:b1; the filter passes @top and @since:b1 through and answers
# its default export from what the plugin says), each with runs of
# 6 to 16 GiB.

G=$((1 << 30))
M=$((1 << 20))

# io IMAGE OP FIRST_G END_G: qemu-io OP over [FIRST_G, END_G) GiB, one
# GiB per command (qemu-io takes at most 2 GiB - 512 at a time).
_io64 ()
{
    local img=$1 op=$2 g cmds=()
    for (( g = $3; g < $4; g++ )); do
        cmds+=(-c "$op $((g * G)) $G")
    done
    qemu-io -f qcow2 "${cmds[@]}" "$img" > /dev/null
}

make_qcow2_chain ()
{
    qemu-img create -q -f qcow2 -o compat=0.10,preallocation=metadata \
        base.qcow2 40G
    _io64 base.qcow2 discard 8 14
    _io64 base.qcow2 discard 30 40
    qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
    _io64 top.qcow2 "write -z" 2 8
    qemu-img bitmap --add top.qcow2 b1
    _io64 top.qcow2 "write -z" 16 22
    qemu-io -f qcow2 -c "write -P 0x55 $((25 * G)) $M" top.qcow2 > /dev/null

    map_chain="0 $((2 * G)) 0
$((2 * G)) $((12 * G)) 3
$((14 * G)) $((2 * G)) 0
$((16 * G)) $((6 * G)) 3
$((22 * G)) $((8 * G)) 0
$((30 * G)) $((10 * G)) 3"
    map_top="0 $((2 * G)) 1
$((2 * G)) $((6 * G)) 2
$((8 * G)) $((8 * G)) 1
$((16 * G)) $((6 * G)) 2
$((22 * G)) $((3 * G)) 1
$((25 * G)) $M 0
$((25 * G + M)) $((15 * G - M)) 1"
    map_since="0 $((16 * G)) 1
$((16 * G)) $((6 * G)) 2
$((22 * G)) $((3 * G)) 1
$((25 * G)) $M 0
$((25 * G + M)) $((15 * G - M)) 1"

    # The chain map is QEMU's too (data / not data, merged).
    local q
    q=$(qemu-img map --output=json top.qcow2 | python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    f = 0 if e["data"] else 3
    if out and out[-1][2] == f:
        out[-1][1] += e["length"]
    else:
        out.append([e["start"], e["length"], f])
print("\n".join("%d %d %d" % tuple(r) for r in out))')
    [ "$q" = "$map_chain" ] || {
        printf 'qemu-img map:\n%s\nexpected:\n%s\n' "$q" "$map_chain" >&2
        fail "the test chain was not built as intended"
    }
}

# A 40 GiB sparse raw file with 1M of data at 0, 20G and 30G.
make_raw_disk ()
{
    local g
    truncate -s 40G disk.raw
    for g in 0 20 30; do
        head -c $M /dev/urandom |
            dd of=disk.raw bs=1M seek=$((g * 1024)) conv=notrunc status=none
    done
}

# merge_runs: "OFFSET LENGTH FLAGS" lines on stdin with adjacent runs
# of equal flags merged.
merge_runs ()
{
    awk 'NF == 3 {
             if (n && f == $3 && o + l == $1) { l += $2; next }
             if (n) print o, l, f
             o = $1; l = $2; f = $3; n = 1
         }
         END { if (n) print o, l, f }'
}
# check_map NAME EXPECTED ACTUAL: the two lists are equal once merged.
check_map ()
{
    local name=$1 want got
    want=$(merge_runs <<< "$2")
    got=$(merge_runs <<< "$3")
    if [ "$want" != "$got" ]; then
        printf '%s: expected\n%s\ngot\n%s\n' "$name" "$want" "$got" >&2
        fail "$name: wrong map"
    fi
}
