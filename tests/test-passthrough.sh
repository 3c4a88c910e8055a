#!/usr/bin/env bash
# Data, size, flags and extents come through the filter unchanged over the
# memory, file and pattern plugins.
source "${srcdir:-.}/functions.sh"
requires nbdinfo
requires nbdsh --version
requires nbdcopy --version

# A file with holes and data, and a memory disk with the same contents.
img="$tmp/disk.img"
truncate -s 8M "$img"
printf 'hello, sparse world' | dd of="$img" bs=1 seek=65536 conv=notrunc status=none
head -c 1M /dev/urandom | dd of="$img" bs=1M seek=3 conv=notrunc status=none
head -c 64K /dev/urandom | dd of="$img" bs=64K seek=100 conv=notrunc status=none
fill_memory='
import os
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

check () {
    local name=$1; shift
    local plain filtered
    plain=$(nbdkit -U - "$@" --run "
        nbdsh -u \"\$uri\" -c '$fill_memory' 2>/dev/null || true
        nbdinfo --json \"\$uri\" | python3 -c '$flags'
        nbdinfo --map \"\$uri\"
        nbdcopy \"\$uri\" - | md5sum")
    filtered=$(nbdkit -U - --filter=sparsebackup "$@" --run "
        nbdsh -u \"\$uri\" -c '$fill_memory' 2>/dev/null || true
        nbdinfo --json \"\$uri\" | python3 -c '$flags'
        nbdinfo --map \"\$uri\"
        nbdcopy \"\$uri\" - | md5sum")
    echo "--- $name:"; echo "$filtered"
    assert_eq "$plain" "$filtered" "$name: plugin vs plugin+sparsebackup"
}

check memory memory 8M
check file-readonly -r file "$img"
cp "$img" "$tmp/copy.img"
check file file "$tmp/copy.img"
cmp "$img" "$tmp/copy.img" || fail "the file changed"
check pattern pattern 8M

# The contents through the filter equal the file's.
nbdkit -U - --filter=sparsebackup -r file "$img" --run 'nbdcopy "$uri" "$tmp/out.img"'
cmp "$img" "$tmp/out.img" || fail "contents differ through the filter"
