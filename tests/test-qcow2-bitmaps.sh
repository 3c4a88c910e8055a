#!/usr/bin/env bash
# qcow2 plugin: the @since:NAME views (persistent bitmaps).
#
#  - the changed set of @since:NAME (what is not a hole) is what
#    qemu-nbd -B NAME exports as qemu:dirty-bitmap:NAME, and for a
#    chain the union of those of the layers holding NAME;
#  - an incremental copy of @since:NAME over the previous backup
#    restores the image exactly;
#  - the views are listed, one per usable bitmap;
#  - each rule checking the bitmaps extension, the directory and the
#    bitmap tables, on an image crafted to break it, with its message;
#    a broken bitmap never affects the default export.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 qemu-nbd nbdinfo python3
cd "$tmp"

# since_uri NAME: the URI of @since:NAME on the server of --run.
since='nbd+unix:///@since:$b?socket=$unixsocket'

# changed IMAGE NAME: the byte ranges of @since:NAME that are not holes,
# one "start end" per line, adjacent ranges merged.
changed ()
{
    b=$2 nbdkit -U - qcow2 file="$1" \
        --run "nbdinfo --map --json \"$since\"" |
        python3 -c '
import json, sys
out = []
for e in json.load(sys.stdin):
    if e["type"] & 1:
        continue
    s, t = e["offset"], e["offset"] + e["length"]
    if out and out[-1][1] == s:
        out[-1][1] = t
    else:
        out.append([s, t])
for s, t in out:
    print(s, t)'
}

# qemu_dirty NAME IMAGE...: the union of the ranges that qemu-nbd -B
# NAME says are dirty in each IMAGE, in the same form.
qemu_dirty ()
{
    local name=$1 img qpid
    shift
    for img in "$@"; do
        rm -f q.sock q.pid
        # qemu-nbd writes its pid file once the socket listens (the
        # socket file alone appears before that)
        qemu-nbd -r -t -k "$tmp/q.sock" --pid-file="$tmp/q.pid" \
            -f qcow2 -B "$name" "$img" &
        qpid=$!
        wait_until 60 "qemu-nbd -B $name $img listening" test -s q.pid
        nbdinfo --map="qemu:dirty-bitmap:$name" --json \
            "nbd+unix:///?socket=$tmp/q.sock" > "dirty.$(basename "$img")"
        kill $qpid; wait $qpid 2>/dev/null || true
    done
    python3 - "$@" <<'PY'
import json, os, sys
r = []
for img in sys.argv[1:]:
    for e in json.load(open("dirty." + os.path.basename(img))):
        if e["type"] & 1:
            r.append((e["offset"], e["offset"] + e["length"]))
r.sort()
out = []
for s, t in r:
    if out and out[-1][1] >= s:
        out[-1][1] = max(out[-1][1], t)
    else:
        out.append([s, t])
for s, t in out:
    print(s, t)
PY
}

# same_as_qemu IMAGE NAME [LAYERS...]: changed == qemu_dirty.
same_as_qemu ()
{
    local img=$1 name=$2
    shift 2
    changed "$img" "$name" > ours
    qemu_dirty "$name" "${@:-$img}" > theirs
    echo "$img @since:$name:"; cat ours
    diff -u theirs ours || fail "@since:$name of $img differs from qemu-nbd"
    [ -s ours ] || fail "@since:$name of $img: nothing changed?"
}

# exports IMAGE: the export names listed, one a line.
exports ()
{
    nbdkit -U - qcow2 file="$1" --run 'nbdinfo --list --json "$uri"' |
        python3 -c '
import json, sys
for e in json.load(sys.stdin)["exports"]:
    assert e.get("description"), e
    print(repr(e["export-name"]), e["description"])'
}

# since_error IMAGE NAME REGEXP: @since:NAME is refused with REGEXP, and
# the default export still reads like qemu-img (or like the raw image
# $ref if set: qemu refuses some crafted images).
since_error ()
{
    local rc=0
    b=$2 nbdkit -U - qcow2 file="$1" \
        --run "nbdinfo --size \"$since\"" >/dev/null 2>err || rc=$?
    failed_cleanly $rc "@since:$2 of $1"
    echo "$1: $(grep error err)"
    assert_contains err "$3"
    nbdkit -U - qcow2 file="$1" \
        --run 'qemu-img convert -f raw -O raw "$uri" default.raw'
    if [ -n "${ref:-}" ]; then
        cmp default.raw "$ref" || fail "$1: the default export changed"
    else
        qemu-img compare -q -f raw -F qcow2 default.raw "$1" ||
            fail "$1: the default export changed"
    fi
}

#----------------------------------------------------------------------
# One image, bitmaps of several kinds.

qemu-img create -q -f qcow2 disk.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0x11 0 3M' disk.qcow2 >/dev/null
qemu-img convert -O qcow2 disk.qcow2 full.qcow2     # the full backup
qemu-img bitmap --add disk.qcow2 ck1
qemu-img bitmap --add -g 512 disk.qcow2 fine
qemu-img bitmap --add disk.qcow2 off
qemu-img bitmap --disable disk.qcow2 off
qemu-io -f qcow2 -c 'write -P 0x22 512k 64k' -c 'write -z 1M 128k' \
    -c 'write -P 0x33 6M 1536' -c 'discard 2M 64k' \
    -c 'write -P 0 7M 64k' disk.qcow2 >/dev/null
qemu-img bitmap --add disk.qcow2 merged
qemu-img bitmap --merge fine disk.qcow2 merged
qemu-io -f qcow2 -c 'write -P 0x44 4M 4k' disk.qcow2 >/dev/null

same_as_qemu disk.qcow2 ck1
same_as_qemu disk.qcow2 fine
same_as_qemu disk.qcow2 merged

# Changed zeros are ZERO alone, unchanged ranges HOLE alone.
b=ck1 nbdkit -U - qcow2 file=disk.qcow2 \
    --run "nbdinfo --map \"$since\"" > map
cat map
grep -E -q '^ +1048576 +131072 +2 +zero$' map || fail "1M: not zero"
grep -E -q '^ +0 +524288 +1 +hole$' map || fail "0: not a hole"

# Through the sparsebackup filter the view is passed through: the same
# map, HOLE-only answers included.
b=ck1 nbdkit -U - --filter=sparsebackup qcow2 file=disk.qcow2 \
    --run "nbdinfo --map \"$since\"" > map.filter
diff -u map map.filter || fail "the filter changed the map of @since:ck1"

# The incremental restores the image (through the filter too).
b=ck1 nbdkit -U - qcow2 file=disk.qcow2 \
    --run "qemu-img convert -f raw -O qcow2 -B full.qcow2 -F qcow2 \"$since\" inc.qcow2"
qemu-img compare disk.qcow2 inc.qcow2
rm -f inc2.qcow2
b=ck1 nbdkit -U - --filter=sparsebackup qcow2 file=disk.qcow2 \
    --run "qemu-img convert -f raw -O qcow2 -B full.qcow2 -F qcow2 \"$since\" inc2.qcow2"
qemu-img compare disk.qcow2 inc2.qcow2
# ... and copies no more than what changed.
b=ck1 nbdkit -U - qcow2 file=disk.qcow2 \
    --run "qemu-img convert -f raw -O raw \"$since\" since.raw"
qemu-img compare -f raw -F qcow2 since.raw disk.qcow2

# The list: one view per usable bitmap ('off' is disabled).
exports disk.qcow2 > list
cat list
cut -d' ' -f1 list > names
printf "%s\n" "''" "'@top'" "'@since:ck1'" "'@since:fine'" \
    "'@since:merged'" > names.expected
diff -u names.expected names || fail "unexpected exports"
assert_contains list "@since:fine' .*granularity 512, 1 layer"
nbdkit qcow2 --dump-plugin | grep -q '^qcow2_views=@top,@since:NAME$' ||
    fail "--dump-plugin does not list the views"

# A disabled bitmap, and a name that is not there.
since_error disk.qcow2 off "bitmap 'off' is disabled \(flag auto is clear\)"
since_error disk.qcow2 nope "there is no bitmap named 'nope' in the top image"

#----------------------------------------------------------------------
# A checkpoint across a chain: the union over the run of layers.

qemu-img create -q -f qcow2 base.qcow2 8M
qemu-img bitmap --add base.qcow2 b1
qemu-img bitmap --add base.qcow2 b0
qemu-io -f qcow2 -c 'write -P 1 0 64k' -c 'write -P 2 3M 100k' \
    base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
qemu-img bitmap --add mid.qcow2 b1
qemu-io -f qcow2 -c 'write -P 3 5M 64k' -c 'write -z 3M 64k' \
    mid.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
qemu-img bitmap --add top.qcow2 b1
qemu-img bitmap --add top.qcow2 b0
qemu-io -f qcow2 -c 'write -P 4 6M 4k' top.qcow2 >/dev/null

same_as_qemu top.qcow2 b1 top.qcow2 mid.qcow2 base.qcow2
# b0 stops at mid (not in it): base's b0 is not part of the run.
same_as_qemu top.qcow2 b0 top.qcow2
exports top.qcow2 > list
cat list
assert_contains list "@since:b1' .*3 layers"
assert_contains list "@since:b0' .*1 layer\)"

# An incremental of the chain over a full backup taken at b1.
qemu-img create -q -f qcow2 c0.qcow2 8M
qemu-io -f qcow2 -c 'write -P 9 0 8M' c0.qcow2 >/dev/null
qemu-img convert -O qcow2 c0.qcow2 c0-full.qcow2
qemu-img bitmap --add c0.qcow2 ck
qemu-io -f qcow2 -c 'write -P 5 1M 64k' -c 'write -z 2M 64k' \
    c0.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b c0.qcow2 -F qcow2 c1.qcow2
qemu-img bitmap --add c1.qcow2 ck
qemu-io -f qcow2 -c 'write -P 6 4M 64k' -c 'write -z 5M 64k' \
    c1.qcow2 >/dev/null
b=ck nbdkit -U - qcow2 file=c1.qcow2 \
    --run "qemu-img convert -f raw -O qcow2 -B c0-full.qcow2 -F qcow2 \"$since\" c-inc.qcow2"
qemu-img compare c1.qcow2 c-inc.qcow2
# A disabled bitmap in the run refuses the view.
cp c0.qcow2 c0-off.qcow2
qemu-img rebase -u -b c0-off.qcow2 -F qcow2 c1.qcow2
qemu-img bitmap --disable c0-off.qcow2 ck
since_error c1.qcow2 ck "c0-off.qcow2: bitmap 'ck' is disabled"
qemu-img rebase -u -b c0.qcow2 -F qcow2 c1.qcow2

#----------------------------------------------------------------------
# Crafted images: one per rule.  one.qcow2 has a single bitmap b1.

qemu-img create -q -f qcow2 one.qcow2 8M
qemu-img bitmap --add one.qcow2 b1
qemu-io -f qcow2 -c 'write -P 7 1M 64k' one.qcow2 >/dev/null
eval "$(craft one.qcow2 bitmaps)"
qemu-img convert -O raw one.qcow2 one.raw
ref=one.raw
echo "ext=$ext dir=$dir table=$table entry0=$entry0"
[ "$entry0" != 0 ] || fail "b1 has no data cluster"

# mk NAME OP ARGS...: NAME.qcow2 = one.qcow2 patched by craft OP ARGS.
mk ()
{
    local name=$1
    shift
    cp one.qcow2 "$name.qcow2"
    craft "$name.qcow2" "$@"
}

# rule NAME REGEXP OP ARGS...: one.qcow2 patched by craft OP ARGS
# (NAME.qcow2) is refused with REGEXP.
rule ()
{
    local name=$1 re=$2
    shift 2
    mk "$name" "$@"
    since_error "$name.qcow2" b1 "$re"
}

# Autoclear bit 0 clear: bitmaps are ignored (not an error).
rule autoclear "there is no bitmap named 'b1'" \
    be64 88 0
exports autoclear.qcow2 | grep -q since && fail "autoclear: listed"

# The extension: at most once, 24 bytes, reserved field zero.
rule twice "the bitmaps extension appears 2 times \(at most once\)" \
    ext-type 0x6803f857 0x23852875
rule extlen "the bitmaps extension has length 16 \(must be 24\)" \
    ext-len 0x23852875 16
rule extres "reserved field of the bitmaps extension is 0x5 \(must be 0\)" \
    be32 $((ext + 4)) 5

# nb_bitmaps, the size and offset of the directory.
rule nb0 "nb_bitmaps 0 is out of range \(1 to 65535\)" \
    be32 $ext 0
rule nbbig "nb_bitmaps 65536 is out of range \(1 to 65535\)" \
    be32 $ext 65536
rule nb2 "bitmap_directory_size 32 is out of range for 2 bitmaps \(64 to 67107840\)" \
    be32 $ext 2
rule dirbig "bitmap_directory_size 67107848 is out of range for 1 bitmaps" \
    be64 $((ext + 8)) 67107848
rule dirunal "bitmap_directory_offset $(printf 0x%x $((dir + 8))) is not aligned to the cluster size" \
    be64 $((ext + 16)) $((dir + 8))
rule dir0 "bitmap_directory_offset 0x0 is 0, in the header" \
    be64 $((ext + 16)) 0
rule dirend "bitmap directory at offset $(printf 0x%x $((dir + 0x100000))) \(32 bytes\) is beyond the end of the file" \
    be64 $((ext + 16)) $((dir + 0x100000))
mk dirlong be64 $((ext + 8)) 40
craft dirlong.qcow2 truncate $((dir + 0x10000))
since_error dirlong.qcow2 b1 "the bitmap directory has 8 bytes after its 1 entries \(bitmap_directory_size 40\)"

# Directory entries.
rule name0 "bitmap directory entry 0: name_size 0 is out of range \(1 to 1023\)" \
    write $((dir + 18)) 0000
rule namebig "bitmap directory entry 0: name_size 1024 is out of range" \
    write $((dir + 18)) 0400
rule namepast "bitmap directory entry 0 \(extra_data_size 0, name_size 9\) runs past the end of the directory \(size 32\)" \
    write $((dir + 18)) 0009
rule namenul "the name of bitmap directory entry 0 contains a NUL byte" \
    write $((dir + 25)) 00
rule pad "the padding of bitmap directory entry 0 is not zero" \
    write $((dir + 30)) 01
rule type2 "bitmap 'b1': type 2 is not supported \(only 1, dirty tracking\)" \
    write $((dir + 16)) 02
rule flags "bitmap 'b1': reserved flags are set \(flags 0xa\)" \
    be32 $((dir + 12)) 0x0a
rule g8 "bitmap 'b1': granularity_bits 8 is out of range \(9 to 31\)" \
    write $((dir + 17)) 08
rule g32 "bitmap 'b1': granularity_bits 32 is out of range \(9 to 31\)" \
    write $((dir + 17)) 20
rule tsize "bitmap 'b1': bitmap_table_size 2 does not match the virtual size \(0x800000 at granularity 65536 needs 1 entries\)" \
    be32 $((dir + 8)) 2
rule tunal "bitmap_table_offset $(printf 0x%x $((table + 512))) \(1 entries\) is not aligned to the cluster size" \
    be64 $dir $((table + 512))
rule tend "bitmap_table_offset $(printf 0x%x $((dir + 0x100000))) \(1 entries\) is beyond the end of the file" \
    be64 $dir $((dir + 0x100000))

# Names are unique: b2 renamed b1.
cp one.qcow2 dup.qcow2
qemu-img bitmap --add dup.qcow2 b2
eval "$(craft dup.qcow2 bitmaps)"
craft dup.qcow2 write $((dir + 32 + 24)) 6231
since_error dup.qcow2 b1 "two bitmaps are named 'b1'"
exports dup.qcow2 > list
grep -q "'@since:b1'" list && fail "dup: b1 listed"
eval "$(craft one.qcow2 bitmaps)"

# Many bitmaps: one.qcow2 with a new directory of 300 entries b1, c2,
# c3 ... sharing b1's table.  The first 256 are listed.
python3 - one.qcow2 many.qcow2 "$ext" "$dir" <<'PY'
import struct, sys
src, dst, ext, d = sys.argv[1], sys.argv[2], int(sys.argv[3], 0), int(sys.argv[4], 0)
data = bytearray(open(src, "rb").read())
fixed = data[d:d + 24]
out = b""
for i in range(300):
    name = b"b1" if i == 0 else b"c%d" % i
    e = fixed[:18] + struct.pack(">HI", len(name), 0) + name
    out += e + b"\0" * (-len(e) % 8)
cs = 65536
off = (len(data) + cs - 1) // cs * cs
data += b"\0" * (off - len(data)) + out
data[ext:ext + 24] = struct.pack(">IIQQ", 300, 0, len(out), off)
open(dst, "wb").write(data)
PY
exports many.qcow2 > list
[ "$(grep -c since list)" -eq 256 ] || fail "many: $(grep -c since list) listed"
assert_contains list "^'@since:c255' "
changed many.qcow2 c299 > ours
changed one.qcow2 b1 > theirs
diff -u theirs ours || fail "many: c299 differs from b1"

# Extra data: refused unless marked extra_data_compatible.
# The entry is rewritten with 8 bytes of extra data before the name.
# entry FLAGS: the hex of that entry.
entry ()
{
    python3 -c '
import struct, sys
t, f = int(sys.argv[1], 0), int(sys.argv[2], 0)
e = struct.pack(">QIIBBHI", t, 1, f, 1, 16, 2, 8) + b"\x01" * 8 + b"b1"
print((e + b"\0" * (-len(e) % 8)).hex())' "$table" "$1"
}
mk extra write $dir "$(entry 2)"
craft extra.qcow2 be64 $((ext + 8)) 40
craft extra.qcow2 truncate $((dir + 0x10000))
since_error extra.qcow2 b1 "bitmap 'b1' has 8 bytes of unknown extra data and is not marked extra_data_compatible"
mk extraok write $dir "$(entry 6)"
craft extraok.qcow2 be64 $((ext + 8)) 40
craft extraok.qcow2 truncate $((dir + 0x10000))
changed extraok.qcow2 b1 > ours
changed one.qcow2 b1 > theirs
diff -u theirs ours || fail "extra_data_compatible: a different map"

# Bitmap table entries.
rule tres "bitmap 'b1': bitmap table entry 0 is $(printf 0x%016x $((entry0 | 2))): reserved bits are set" \
    be64 $table $((entry0 | 2))
rule thigh "bitmap table entry 0 is $(printf 0x%016x $((entry0 | (1 << 56)))): reserved bits are set" \
    be64 $table $((entry0 | (1 << 56)))
rule tbit0 "bitmap table entry 0 is $(printf 0x%016x $((entry0 | 1))): bit 0 is set with an offset" \
    be64 $table $((entry0 | 1))
rule tdunal "bitmap table entry 0 is $(printf 0x%016x $((entry0 + 512))): the offset is not aligned to the cluster size" \
    be64 $table $((entry0 + 512))
rule tdend "bitmap table entry 0 is $(printf 0x%016x $((dir + 0x100000))): the cluster is beyond the end of the file" \
    be64 $table $((dir + 0x100000))
# Offset 0: bit 0 set is all ones, clear all zeros.
mk ones be64 $table 1
changed ones.qcow2 b1 > ours
echo "0 8388608" > expected
diff -u expected ours || fail "an all-ones table entry"
mk zeros be64 $table 0
changed zeros.qcow2 b1 > ours
[ ! -s ours ] || fail "an all-zeros table entry: $(cat ours)"

# in_use: the image was not closed cleanly.
rule inuse "bitmap 'b1' is in use \(flag in_use\): the image was not closed cleanly, so the bitmap may miss changes; take a full backup instead" \
    be32 $((dir + 12)) 3
exports inuse.qcow2 | grep -q since && fail "in_use: listed"
: done
