#!/usr/bin/env bash
# qcow2 plugin: views chosen by export name.  "@top" serves the chain's
# content with the map of the top image only, so that
#   qemu-img convert -B base.qcow2 'nbd+unix:///@top?socket=...' copy
# makes an overlay equal to the chain that allocates no more than the
# top image.  Both exports are listed with descriptions; an unknown
# name starting with '@' is refused.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdinfo python3
cd "$tmp"

qemu-img create -q -f qcow2 base.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 2M' -c 'write -P 0x22 4M 2M' \
    base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c 'write -P 0x33 512k 256k' -c 'write -z 4M 512k' \
    -c 'write -P 0x44 7M 64k' -c 'discard 1M 64k' \
    -c 'write -c -P 0x55 6M 64k' top.qcow2 >/dev/null

# depth0 IMAGE: bytes allocated (data or zero) in IMAGE itself.
depth0 ()
{
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
print(sum(e["length"] for e in json.load(sys.stdin) if e["depth"] == 0))'
}

# The exports and their descriptions.
nbdkit -U - qcow2 file=top.qcow2 --run 'nbdinfo --list --json "$uri"' \
    > list.json
python3 - list.json <<'PY'
import json, sys
exports = {e["export-name"]: e.get("description", "")
           for e in json.load(open(sys.argv[1]))["exports"]}
assert sorted(exports) == ["", "@top"], exports
assert all(exports.values()), "an export without description: %r" % exports
print("exports:", exports)
PY

# The map of @top: the top image's allocation only.
nbdkit -U - qcow2 file=top.qcow2 \
    --run 'nbdinfo --map "nbd+unix:///@top?socket=$unixsocket"' > map
cat map
cat > map.expected <<'MAP'
         0      524288    1  hole
    524288      262144    0  data
    786432      262144    1  hole
   1048576       65536    2  zero
   1114112     3080192    1  hole
   4194304      524288    2  zero
   4718592     1572864    1  hole
   6291456       65536    0  data
   6356992      983040    1  hole
   7340032       65536    0  data
   7405568      983040    1  hole
MAP
diff -u map.expected map || fail "unexpected map of @top"
# ... while its content is the chain's, like the default export's.
nbdkit -U - qcow2 file=top.qcow2 \
    --run 'qemu-img convert -f raw -O raw "nbd+unix:///@top?socket=$unixsocket" top.raw'
qemu-img compare -f raw -F qcow2 top.raw top.qcow2
# The default export still maps the whole chain.
check top.qcow2

# An overlay copied from @top over the same base.
nbdkit -U - qcow2 file=top.qcow2 \
    --run 'qemu-img convert -f raw -O qcow2 -B base.qcow2 -F qcow2 "nbd+unix:///@top?socket=$unixsocket" top-copy.qcow2'
qemu-img compare top.qcow2 top-copy.qcow2
top_alloc=$(depth0 top.qcow2)
copy_alloc=$(depth0 top-copy.qcow2)
echo "allocated: top $top_alloc, copy $copy_alloc"
[ "$copy_alloc" -le "$top_alloc" ] ||
    fail "the copy allocates $copy_alloc bytes, more than the top ($top_alloc)"

# Chains of 3 and 4 layers, with subclusters (extended L2) in the top:
# data, zero clusters and discards over backing data; the overlay made
# from @top over the layers below reads as the chain and allocates no
# more than the top.
qemu-img create -q -f qcow2 l1.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x61 0 8M' l1.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b l1.qcow2 -F qcow2 l2.qcow2
qemu-io -f qcow2 -c 'write -P 0x62 1M 1M' -c 'write -z 3M 512k' l2.qcow2 \
    >/dev/null
qemu-img create -q -f qcow2 -b l2.qcow2 -F qcow2 l3.qcow2
qemu-io -f qcow2 -c 'write -P 0x63 2M 64k' -c 'discard 5M 64k' l3.qcow2 \
    >/dev/null
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=128k \
    -b l3.qcow2 -F qcow2 l4.qcow2
qemu-io -f qcow2 -c 'write -P 0x64 4k 8k' -c 'write -z 1M 4k' \
    -c 'discard 6M 128k' -c 'write -P 0x65 7M 32k' l4.qcow2 >/dev/null
for top in l3 l4; do
    case $top in
        l3) below=l2 opts=cluster_size=64k ;;
        l4) below=l3 opts=extended_l2=on,cluster_size=128k ;;
    esac
    rm -f "$top-copy.qcow2"
    nbdkit -U - qcow2 file=$top.qcow2 \
        --run "qemu-img convert -f raw -O qcow2 -o $opts -B $below.qcow2 -F qcow2 \"nbd+unix:///@top?socket=\$unixsocket\" $top-copy.qcow2"
    qemu-img compare $top.qcow2 $top-copy.qcow2 ||
        fail "$top: the copy of @top over $below differs from the chain"
    a=$(depth0 $top.qcow2) b=$(depth0 $top-copy.qcow2)
    echo "$top: allocated: top $a, copy $b"
    [ "$b" -le "$a" ] || fail "$top: the copy allocates $b bytes, more than $a"
done

# Unknown views are refused with a message naming them.
rc=0
nbdkit -U - qcow2 file=top.qcow2 \
    --run 'nbdinfo --size "nbd+unix:///@nope?socket=$unixsocket"' \
    >/dev/null 2>err || rc=$?
failed_cleanly $rc "export @nope"
cat err
assert_contains err "unknown view '@nope'"

# Through the sparsebackup filter the view is passed through: the same
# HOLE-only map, the same content, the same overlay; the export list is
# the plugin's.
requires_filter sparsebackup
nbdkit -U - --filter=sparsebackup qcow2 file=top.qcow2 \
    --run 'nbdinfo --map "nbd+unix:///@top?socket=$unixsocket"' > map.filter
diff -u map.expected map.filter || fail "the filter changed the map of @top"
nbdkit -U - --filter=sparsebackup qcow2 file=top.qcow2 \
    --run 'nbdinfo --list --json "$uri"' > list.filter.json
python3 - list.filter.json <<'PY'
import json, sys
names = sorted(e["export-name"] for e in json.load(open(sys.argv[1]))["exports"])
assert names == ["", "@top"], names
PY
rm -f top-copy2.qcow2
nbdkit -U - --filter=sparsebackup qcow2 file=top.qcow2 \
    --run 'qemu-img convert -f raw -O qcow2 -B base.qcow2 -F qcow2 "nbd+unix:///@top?socket=$unixsocket" top-copy2.qcow2'
qemu-img compare top.qcow2 top-copy2.qcow2
[ "$(depth0 top-copy2.qcow2)" -le "$top_alloc" ] ||
    fail "through the filter the copy allocates more than the top"
echo "$0: OK"
