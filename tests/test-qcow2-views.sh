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
