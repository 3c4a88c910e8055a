#!/usr/bin/env bash
# Manifests (sparsebackup-copy --manifest, --manifest-only, --verify):
#  1. a full copy's manifest holds the SHA-256 of every chunk of the
#     source (checked against Python's hashlib), its size and the view;
#     --verify accepts the copy, and after one byte of it is changed
#     fails (exit 1) naming the chunk at that offset;
#  2. a --delta copy updates the previous manifest: chunks the view
#     skips whole keep their old hash (not read again: a wrong old hash
#     stays wrong), chunks partly changed are rehashed whole, their
#     skipped parts read from the source (exactly those bytes are read
#     more), so a damaged previous backup there is caught by --verify
#     instead of being recorded;
#  3. for qemu-img convert -B users: --manifest-only makes the manifest of
#     a full view, and of an incremental view from the previous manifest,
#     without a target; the qcow2 chain served by nbdkit qcow2 (no QEMU)
#     is verified against it, and fails at the offset of one byte changed
#     in the top layer's data, or in the base's;
#  4. a copy with a manifest interrupted (kill -9) completes with the
#     right manifest; a kill while the manifest is written leaves the old
#     one whole;
#  5. manifests are never written over a file that is not a manifest (or
#     a symlink), are replaced atomically, and a damaged or hostile
#     manifest is refused naming the line (huge chunk counts before any
#     allocation).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires qemu-img --version
requires nbdcopy --version
requires_plugin file
requires_plugin qcow2

chunk=65536
start_view --threads=1
view1=$view

# pymanifest FILE SIZE: the chunk hash lines of FILE's first SIZE bytes.
pymanifest ()
{
    python3 - "$1" "$2" "$chunk" <<'PY'
import hashlib, sys
path, size, chunk = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
with open(path, "rb") as f:
    for off in range(0, size, chunk):
        print(hashlib.sha256(f.read(min(chunk, size - off))).hexdigest())
PY
}
# hashes MANIFEST: its chunk hash lines.
hashes () { sed -n '9,$p' "$1" | sed '$d'; }
field () { sed -n "s/^$1 //p" "$2"; }

# 1. A full copy with a manifest.
"$copy" --manifest="$tmp/full.m" --chunk-size=64K "$view1" "$tmp/full.img" \
    > "$tmp/out"
cmp "$tmp/src.img" "$tmp/full.img" || fail "the full copy differs"
assert_eq "sparsebackup-copy manifest 1" "$(head -1 "$tmp/full.m")" "magic"
assert_eq sha256 "$(field algorithm "$tmp/full.m")" "algorithm"
assert_eq "$view_size" "$(field size "$tmp/full.m")" "size"
assert_eq $chunk "$(field chunk-size "$tmp/full.m")" "chunk-size"
assert_eq $(( (view_size + chunk - 1) / chunk )) "$(field chunks "$tmp/full.m")" "chunks"
assert_contains "$tmp/full.m" "^source-uri nbd\+unix:///\?socket="
pymanifest "$tmp/src.img" "$view_size" > "$tmp/py"
hashes "$tmp/full.m" | cmp - "$tmp/py" ||
    fail "the manifest's hashes differ from hashlib's"
python3 - "$tmp/full.m" <<'PY' || fail "the manifest's checksum line is wrong"
import hashlib, sys
lines = open(sys.argv[1], "rb").read().splitlines(True)
assert lines[-1] == b"sha256 " + hashlib.sha256(b"".join(lines[:-1])).hexdigest().encode() + b"\n"
PY
"$copy" --verify="$tmp/full.m" "$tmp/full.img" > "$tmp/out"
assert_contains "$tmp/out" "TARGET '$tmp/full.img' matches the manifest '$tmp/full.m' \($view_size bytes, 33 chunks of 65536\)"

# corrupt_verify TARGET MANIFEST OFFSET [FILE-OFFSET]: change one byte of
# TARGET's FILE (FILE-OFFSET, default OFFSET) and see --verify fail at
# the chunk holding OFFSET.
corrupt_verify ()
{
    local target=$1 m=$2 off=$3 foff=${4:-$3} file=${5:-$1} r=0 c
    python3 - "$file" "$foff" <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); b = f.read(1); f.seek(int(sys.argv[2]))
    f.write(bytes([b[0] ^ 0x55]))
PY
    # TARGET "[ CMD ARGS ]" is split into words (no spaces in $tmp).
    case $target in
        "["*) "$copy" ${verify_opts:-} --verify="$m" $target > "$tmp/out" 2> "$tmp/err" || r=$? ;;
        *)    "$copy" ${verify_opts:-} --verify="$m" "$target" > "$tmp/out" 2> "$tmp/err" || r=$? ;;
    esac
    assert_eq 1 $r "exit status of --verify after a byte at $off changed"
    c=$((off / chunk))
    assert_contains "$tmp/out" "differs in chunk $c at offset $((c * chunk)) \($chunk bytes, up to offset $(( (c + 1) * chunk ))\)"
    assert_contains "$tmp/out" "1 of [0-9]+ chunks differ, the first at offset $((c * chunk))$"
    echo "byte at $off changed: $(tail -1 "$tmp/out")"
}
cp "$tmp/full.img" "$tmp/damaged.img"
corrupt_verify "$tmp/damaged.img" "$tmp/full.m" 1234567
# The same through NBD (nbdkit file), and a wrong size.
"$copy" --verify="$tmp/full.m" "[" nbdkit file "$tmp/full.img" "]" > "$tmp/out"
assert_contains "$tmp/out" "matches the manifest"
r=0; "$copy" --verify="$tmp/full.m" "[" nbdkit file "$tmp/damaged.img" "]" \
    > "$tmp/out" || r=$?
assert_eq 1 $r "exit status of --verify of NBD"
assert_contains "$tmp/out" "the first at offset $((1234567 / chunk * chunk))$"
truncate -s $((view_size + 1)) "$tmp/damaged.img"
r=0; "$copy" --verify="$tmp/full.m" "$tmp/damaged.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --verify of a longer file"
assert_contains "$tmp/err" "TARGET '$tmp/damaged.img' is $((view_size + 1)) bytes, the manifest '$tmp/full.m' is of $view_size bytes"

# 2. --delta with a manifest.  The previous backup: the source with the
# view's data ranges (the changes) different; the ranges the view skips
# (HOLE without ZERO) hold what the source holds, as they do for real.
cp "$tmp/src.img" "$tmp/prev.img"
for line in "${view_map[@]}"; do
    read -r off len flags fill <<< "$line"
    off=$(_size "$off"); len=$(_size "$len")
    if [ "$flags" = data ]; then
        head -c "$len" /dev/zero | tr '\0' Q |
            dd of="$tmp/prev.img" bs=64K seek="$off" oflag=seek_bytes \
               conv=notrunc status=none
    fi
done
start_nbdkit file "$tmp/prev.img"
"$copy" -q --manifest-only --manifest="$tmp/prev.m" --chunk-size=64K "$uri"
pymanifest "$tmp/prev.img" "$view_size" > "$tmp/py"
hashes "$tmp/prev.m" | cmp - "$tmp/py" || fail "--manifest-only of prev differs"
# A wrong hash for chunk 5 (inside [256K, 512K): skipped whole by the
# view): the delta keeps it, proving the chunk was not read again.
python3 - "$tmp/prev.m" 13 <<'PY'
import hashlib, sys
p, n = sys.argv[1], int(sys.argv[2])
lines = open(p).read().splitlines(True)[:-1]
lines[n] = "ab" * 32 + "\n"
body = "".join(lines)
open(p, "w").write(body + "sha256 " + hashlib.sha256(body.encode()).hexdigest() + "\n")
PY
cp "$tmp/prev.img" "$tmp/delta.img"
cp "$tmp/prev.m" "$tmp/delta.m"
ino=$(stat -c %i "$tmp/delta.m")
"$copy" --delta --manifest="$tmp/delta.m" "$view1" "$tmp/delta.img" > "$tmp/out"
cmp "$tmp/src.img" "$tmp/delta.img" || fail "the delta copy differs"
[ "$(stat -c %i "$tmp/delta.m")" != "$ino" ] ||
    fail "the manifest was rewritten in place, not replaced"
pymanifest "$tmp/src.img" "$view_size" > "$tmp/py"
sed -i '6s/.*/'"$(printf 'ab%.0s' $(seq 32))"'/' "$tmp/py"
hashes "$tmp/delta.m" | cmp - "$tmp/py" ||
    fail "the delta's manifest is not the source's with chunk 5 kept"
# Skipped bytes read for the manifest: the HOLE-only parts of chunks that
# also hold data: [1324K, 1344K) (with [1280K,1324K) data) and
# [2M-64K... none: [1984K, 2M) is HOLE-only in chunk 31, which is whole.
assert_contains "$tmp/out" "; read $((20 * K)) more bytes for the manifest$"
"$copy" -q --verify="$tmp/delta.m" "$tmp/delta.img" &&
    fail "--verify accepted a manifest with a wrong hash"
# A previous backup damaged where the view skips part of a chunk (in
# chunk 20, [1324K, 1344K)): the manifest records the source, so the
# damage shows.
cp "$tmp/prev.img" "$tmp/delta2.img"
python3 - "$tmp/delta2.img" $((1330 * K)) <<'PY'
import sys
with open(sys.argv[1], "r+b") as f:
    f.seek(int(sys.argv[2])); f.write(b"!")
PY
"$copy" -q --delta --manifest="$tmp/delta2.m" --base-manifest="$tmp/full.m" \
    "$view1" "$tmp/delta2.img"
r=0; "$copy" --verify="$tmp/delta2.m" "$tmp/delta2.img" > "$tmp/out" || r=$?
assert_eq 1 $r "exit status of --verify of a damaged previous backup"
assert_contains "$tmp/out" "differs in chunk 20 at offset $((20 * chunk)) "
# Base manifests that do not fit.
head -c 1M "$tmp/src.img" > "$tmp/small.img"
start_nbdkit file "$tmp/small.img"
"$copy" -q --manifest-only --manifest="$tmp/small.m" "$uri"
r=0; "$copy" --delta --manifest="$tmp/x.m" --base-manifest="$tmp/small.m" \
    "$view1" "$tmp/delta.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status with a base manifest of another size"
assert_contains "$tmp/err" "the base manifest '$tmp/small.m' is of a disk of 1048576 bytes, SRC '.*' has $view_size"
r=0; "$copy" --delta --manifest="$tmp/x.m" --base-manifest="$tmp/full.m" \
    --chunk-size=128K "$view1" "$tmp/delta.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status with another chunk size"
assert_contains "$tmp/err" "--chunk-size=131072 differs from the chunk size of the base manifest"
r=0; "$copy" --delta --manifest="$tmp/none.m" "$view1" "$tmp/delta.img" \
    2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status without a base manifest"
assert_contains "$tmp/err" "cannot open the manifest '$tmp/none.m': No such file"

# 3. A qcow2 chain made with qemu-img convert -B, and its manifests made
# with --manifest-only (no raw target).
qemu-img convert -q -f raw -O qcow2 "$tmp/prev.img" "$tmp/full.qcow2"
start_nbdkit file "$tmp/prev.img"
"$copy" -q --manifest-only --manifest="$tmp/chain0.m" --chunk-size=64K "$uri"
qemu-img convert -q -f raw -O qcow2 -B "$tmp/full.qcow2" -F qcow2 \
    "$view1" "$tmp/inc.qcow2"
"$copy" --manifest-only --delta --base-manifest="$tmp/chain0.m" \
    --manifest="$tmp/chain1.m" "$view1" > "$tmp/out"
assert_contains "$tmp/out" "manifest '$tmp/chain1.m': read "
pymanifest "$tmp/src.img" "$view_size" | cmp - <(hashes "$tmp/chain1.m") ||
    fail "the incremental manifest differs from the source's"
# qemu-img rounds the virtual size of the odd-sized view up to 512 bytes:
# the chain is 24 bytes larger (zeroes); --allow-larger checks the rest.
verify_opts=--allow-larger
r=0; "$copy" --verify="$tmp/chain1.m" "[" nbdkit qcow2 file="$tmp/inc.qcow2" "]" \
    2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --verify of a larger chain without --allow-larger"
assert_contains "$tmp/err" "TARGET '\\[ nbdkit qcow2 file=$tmp/inc.qcow2 \\]' is $(( (view_size + 511) / 512 * 512 )) bytes, the manifest '$tmp/chain1.m' is of $view_size bytes \(--allow-larger"
"$copy" $verify_opts --verify="$tmp/chain1.m" \
    "[" nbdkit qcow2 file="$tmp/inc.qcow2" "]" > "$tmp/out"
assert_contains "$tmp/out" "matches the manifest '$tmp/chain1.m'"
# One byte of the top layer's data: guest offset 1M+1000 ('C' data).
goff=$((1024 * K + 1000))
hoff=$(qemu-img map --output=json "$tmp/inc.qcow2" | python3 -c '
import json, sys
g = int(sys.argv[1])
for e in json.load(sys.stdin):
    if e["start"] <= g < e["start"] + e["length"] and e["depth"] == 0 and e["data"]:
        print(e["offset"] + g - e["start"]); break
' "$goff")
[ -n "$hoff" ] || fail "no host offset for guest offset $goff in the top layer"
cp "$tmp/inc.qcow2" "$tmp/inc.orig"
corrupt_verify "[ nbdkit qcow2 file=$tmp/inc.qcow2 ]" "$tmp/chain1.m" \
    "$goff" "$hoff" "$tmp/inc.qcow2"
cp "$tmp/inc.orig" "$tmp/inc.qcow2"
# One byte of the base, where the top layer does not cover it (the
# HOLE-only range [256K, 512K)).
goff=$((300 * K))
hoff=$(qemu-img map --output=json "$tmp/full.qcow2" | python3 -c '
import json, sys
g = int(sys.argv[1])
for e in json.load(sys.stdin):
    if e["start"] <= g < e["start"] + e["length"] and e["data"]:
        print(e["offset"] + g - e["start"]); break
' "$goff")
[ -n "$hoff" ] || fail "no host offset for guest offset $goff in the base"
corrupt_verify "[ nbdkit qcow2 file=$tmp/inc.qcow2 ]" "$tmp/chain1.m" \
    "$goff" "$hoff" "$tmp/full.qcow2"

verify_opts=

# 4. Interrupted copies with a manifest.
rm -f "$tmp/k.img" "$tmp/k.m"
SPARSEBACKUP_COPY_DEBUG_KILL=journal:3 "$copy" --manifest="$tmp/k.m" \
    --chunk-size=64K --journal-every=300K --request-size=64K "$view1" \
    "$tmp/k.img" 2> /dev/null && fail "the copy was not killed"
[ ! -e "$tmp/k.m" ] || fail "a manifest was written by the killed copy"
"$copy" --manifest="$tmp/k.m" --chunk-size=64K "$view1" "$tmp/k.img" \
    > "$tmp/out" 2> "$tmp/err"
assert_contains "$tmp/out" "bytes were done by an earlier run; read [0-9]+ more bytes for the manifest"
pymanifest "$tmp/src.img" "$view_size" | cmp - <(hashes "$tmp/k.m") ||
    fail "the manifest of a resumed copy differs"
# Killed while the new manifest is written: the old one stays whole, the
# journal too (the target is complete), and the rerun writes it.
cp "$tmp/prev.img" "$tmp/k.img"
cp "$tmp/chain0.m" "$tmp/k.m"
SPARSEBACKUP_COPY_DEBUG_KILL=manifest-tmp:1 "$copy" --delta \
    --manifest="$tmp/k.m" "$view1" "$tmp/k.img" 2> /dev/null &&
    fail "the copy was not killed"
cmp "$tmp/chain0.m" "$tmp/k.m" || fail "the old manifest was changed"
assert_eq "$view_size" "$(field done "$tmp/k.img.sparsebackup-journal")" \
    "the journal after the target was complete"
"$copy" -q --delta --manifest="$tmp/k.m" "$view1" "$tmp/k.img"
cmp "$tmp/src.img" "$tmp/k.img" || fail "the rerun's copy differs"
cmp "$tmp/chain1.m" "$tmp/k.m" || fail "the rerun's manifest differs"
[ ! -e "$tmp/k.m.tmp" ] && [ ! -e "$tmp/k.img.sparsebackup-journal" ] ||
    fail "files were left after the rerun"

# 5. Files that are not manifests are not written over.
echo "my notes" > "$tmp/notes.txt"
r=0; "$copy" --manifest="$tmp/notes.txt" "$view1" "$tmp/n.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status with a non-manifest --manifest"
assert_contains "$tmp/err" "manifest '$tmp/notes.txt' exists and it was not written by sparsebackup-copy: not replacing it"
assert_eq "my notes" "$(cat "$tmp/notes.txt")" "the notes file"
[ ! -e "$tmp/n.img" ] || fail "the target was created before the manifest was checked"
ln -s "$tmp/full.m" "$tmp/link.m"
r=0; "$copy" -q --manifest-only --manifest="$tmp/link.m" "$view1" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status with a symlink --manifest"
assert_contains "$tmp/err" "exists and not a regular file"

bad_manifest ()
{
    local what=$1 re=$2 r=0
    "$copy" --verify="$tmp/bad.m" "$tmp/full.img" > "$tmp/out" 2> "$tmp/err" || r=$?
    assert_eq 1 $r "exit status with a $what manifest"
    assert_contains "$tmp/err" "the manifest '$tmp/bad.m' is not valid \(line [0-9]+: ($re)"
    failed_cleanly $r "$what manifest"
}
# resum FILE: recompute the checksum line (a hostile but consistent file).
resum ()
{
    python3 - "$1" <<'PY'
import hashlib, sys
p = sys.argv[1]
body = b"".join(open(p, "rb").read().splitlines(True)[:-1])
open(p, "wb").write(body + b"sha256 " + hashlib.sha256(body).hexdigest().encode() + b"\n")
PY
}
m=$tmp/full.m
sed '10s/^./x/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "bad hex" "a chunk's hash is not 64 lower-case hex digits"
sed '10s/^\(.\)/\1\1/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "long hash" "a line too long"
sed 's/^size .*/size 99999999999/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "wrong size" "the number of chunks does not match the size"
sed 's/^size .*/size 4611686018427387904/; s/^chunks .*/chunks 70368744177664/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "huge" "more than 2\^24 chunks"
sed 's/^size .*/size 1099511627776/; s/^chunks .*/chunks 16777216/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "short for 2^24 chunks" "the file is too short for its chunks"
sed 's/^chunk-size .*/chunk-size 65535/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "odd chunk" "the chunk size is not a power of 2"
sed 's/^algorithm .*/algorithm md5/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "md5" "the algorithm is not sha256"
sed '1s/ 1$/ 7/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "version 7" "an unknown version"
sed '11d' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "short" "expected the key 'sha256'|a chunk's hash|a line too long"
sed '10s/^./0/' "$m" > "$tmp/bad.m"
sed -n 10p "$m" | grep -q '^0' && sed -i '10s/^./1/' "$tmp/bad.m"
bad_manifest "edited" "the checksum does not match"
{ cat "$m"; echo extra; } > "$tmp/bad.m"
bad_manifest "trailing data" "data after the checksum line"
head -c 500 "$m" > "$tmp/bad.m"
bad_manifest "truncated" "the file is too short for its chunks|the file ends early|the last line has no newline"
sed 's/^source-export .*/source-export %zz/' "$m" > "$tmp/bad.m"; resum "$tmp/bad.m"
bad_manifest "bad escape" "a badly escaped or too long string"
printf 'sparsebackup-copy manifest 1\0\n' > "$tmp/bad.m"
bad_manifest "NUL" "a NUL byte"
