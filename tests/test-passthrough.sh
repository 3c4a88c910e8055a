#!/usr/bin/env bash
# Data, size, flags and extents come through the filter unchanged over the
# memory, file and pattern plugins.
source "${srcdir:-.}/functions.sh"
requires nbdinfo
requires_nbdsh
requires nbdcopy --version

# A file with holes and data, and a memory disk with the same contents.
img="$tmp/disk.img"
truncate -s 8M "$img"
printf 'hello, sparse world' | dd of="$img" bs=1 seek=65536 conv=notrunc status=none
head -c 1M /dev/urandom | dd of="$img" bs=1M seek=3 conv=notrunc status=none
head -c 64K /dev/urandom | dd of="$img" bs=64K seek=100 conv=notrunc status=none
# Writable exports (memory, the file copy) get the file's contents;
# read-only ones (file -r, pattern) are left alone.
fill_memory='
import os
if h.is_read_only():
    sys.exit(0)
data = open(os.environ["img"], "rb").read()
for off in range(0, len(data), 65536):
    chunk = data[off:off+65536]
    # Write exactly the non-zero stretch of each chunk: the filter would
    # (rightly) turn written zero blocks into holes, which is not what
    # this test is about.
    stripped = chunk.strip(b"\0")
    if stripped:
        start = chunk.index(stripped)
        h.pwrite(stripped, off + start)
'
export img

flags='import json, sys
e = json.load(sys.stdin)["exports"][0]
for k in ("export-size", "is_read_only", "is_rotational", "can_flush",
          "can_fua", "can_multi_conn", "can_trim", "can_zero"):
    print(k, e.get(k))'

# The same commands over the plugin alone and under the filter; every
# step must succeed (set -e: a failing nbdsh or nbdinfo fails the test
# instead of comparing two empty outputs).
probe="set -e
    nbdsh -u \"\$uri\" -c '$fill_memory'
    nbdinfo --json \"\$uri\" > \"\$tmp/info.json\"
    python3 -c '$flags' < \"\$tmp/info.json\"
    nbdinfo --map \"\$uri\"
    nbdcopy \"\$uri\" \"\$tmp/content\"
    md5sum < \"\$tmp/content\""

# check NAME EXPECTED-MD5|- PLUGIN-ARGS...: the plugin with and without the
# filter looks the same; and (unless EXPECTED-MD5 is -) the content read
# through the filter has that checksum.
check () {
    local name=$1 md5=$2; shift 2
    local plain filtered
    plain=$(nbdkit -U - "$@" --run "$probe") ||
        fail "$name: the probe failed on the plugin alone"
    filtered=$(nbdkit -U - --filter=sparsebackup "$@" --run "$probe") ||
        fail "$name: the probe failed through the filter"
    echo "--- $name:"; echo "$filtered"
    assert_eq "$plain" "$filtered" "$name: plugin vs plugin+sparsebackup"
    if [ "$md5" != - ]; then
        assert_eq "$md5  -" "$(tail -n 1 <<<"$filtered")" "$name: content"
    fi
}

img_md5=$(md5sum < "$img" | cut -d' ' -f1)
check memory "$img_md5" memory 8M
check file-readonly "$img_md5" -r file "$img"
cp "$img" "$tmp/copy.img"
check file "$img_md5" file "$tmp/copy.img"
cmp "$img" "$tmp/copy.img" || fail "the file changed"
check pattern - pattern 8M

# The contents through the filter equal the file's.
nbdkit -U - --filter=sparsebackup -r file "$img" --run 'nbdcopy "$uri" "$tmp/out.img"'
cmp "$img" "$tmp/out.img" || fail "contents differ through the filter"
