#!/usr/bin/env bash
# qcow2 library: maps longer than 4 GiB in one call.  nbdkit's plugin
# API asks for extents with a 32-bit count, so through NBD the plugin
# never sees a request or answers an extent of 4 GiB or more (see
# test-extents-64bit.sh); the library takes 64-bit counts.  One call of
# qcow2_map, qcow2_map_top and qcow2_map_since over the whole of a
# 40 GiB chain (extents64-lib.sh: runs of 1 MiB to 16 GiB) must give
# exactly the expected extents, one callback per run (the library merges
# adjacent runs of equal flags), so a length or an offset cut to 32 bits
# anywhere on the way (walker, mapper, bitmap runs) fails it.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
source "${srcdir:-.}/extents64-lib.sh"
requires_qcow2 python3
map=$abs_top_builddir/tests/qcow2-map
[ -x "$map" ] || fail "$map is not built"
cd "$tmp"

make_qcow2_chain
for v in "" @top @since:b1; do
    case $v in
        "") want=$map_chain ;;
        @top) want=$map_top ;;
        @since:b1) want=$map_since ;;
    esac
    got=$("$map" top.qcow2 $v) || fail "qcow2-map top.qcow2 $v failed"
    if [ "$got" != "$want" ]; then
        printf 'view "%s": expected\n%s\ngot\n%s\n' "$v" "$want" "$got" >&2
        fail "view '$v': the map of one 40 GiB call is wrong"
    fi
    echo "view '$v': $(wc -l <<< "$got") extents in one call, as expected"
done
# backing=false analogue: the base alone (data and holes of 6-10 GiB).
got=$("$map" base.qcow2) || fail "qcow2-map base.qcow2 failed"
want="0 $((8 * G)) 0
$((8 * G)) $((6 * G)) 3
$((14 * G)) $((16 * G)) 0
$((30 * G)) $((10 * G)) 3"
[ "$got" = "$want" ] || { printf 'expected\n%s\ngot\n%s\n' "$want" "$got" >&2; fail "base.qcow2: wrong map"; }
echo "base.qcow2: as expected"
