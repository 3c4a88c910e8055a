#!/usr/bin/env bash
# Issue 3: the target stays sparse whatever the client writes (nbdcopy).
#
# A 64 MiB source that is partly sparse (holes) and partly allocated with
# zeros, with data at odd places, including a single non-zero byte inside
# an otherwise zero (allocated) 256 KiB region, is copied into
# `nbdkit --filter=sparsebackup file target.img`:
#
#  - `nbdcopy -S 0 --no-extents` (every byte as plain writes): the filter
#    turns the zero blocks into zero requests with MAY_TRIM: sparse.
#  - `nbdcopy --allocated`: nbdcopy writes the allocated parts of the
#    source (zeros included) as data and the source's holes as zero
#    requests with NO_HOLE.  By default the filter honours NO_HOLE (the
#    protocol says the area must be provisioned), so the holes of the
#    source are allocated in the target; the zero blocks written as data
#    are not.  With sparsebackup-no-hole=ignore the target is sparse.
#
# In every case the target must be identical to the source.

source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-write-lib.sh"
requires nbdcopy
requires python3
requires_plugin file

size=$((64 << 20))
src="$tmp/src.img"
tgt="$tmp/target.img"

# The source, and the figures the assertions need:
#   nz_blocks: non-zero 4K blocks; hole_bytes: bytes in holes of the
#   source; hole_chunks: bytes of the 256K chunks (nbdcopy's request size)
#   that are entirely holes in the source: nbdcopy --allocated sends those
#   as NO_HOLE zero requests (a chunk holding some data is sent as data).
read -r nz_blocks hole_bytes hole_chunks < <(
    PYTHONPATH="$_functions_dir" PYTHONDONTWRITEBYTECODE=1 \
    python3 - "$src" "$size" <<'PY'
import os, random, sys
from extents import data_ranges
path, size = sys.argv[1], int(sys.argv[2])
rnd = random.Random(12345)
def nz(n):
    return bytes(rnd.randrange(1, 256) for _ in range(n))
K, M = 1 << 10, 1 << 20
# Regions written explicitly (allocated), zeros included.
dense = [(1*M, 64*K), (16*M, 256*K), (20*M, 4*M), (40*M, 12*K),
         (48*M + 512, 8*K)]
pieces = [
    (0, nz(1)),                          # first byte of the disk
    (1*M + 123, nz(10000)),              # odd offset and length
    (5*M - 7, nz(20)),                   # across a 1 MiB boundary
    (8*M, nz(256*K)),                    # an aligned data run
    (16*M + 128*K + 777, nz(1)),         # one byte in a zero 256K region
    (33*M + 4095, nz(2)),                # across a block boundary
    (40*M, nz(4*K)), (40*M + 8*K, nz(4*K)),  # data, zero, data
    (48*M + 4*K + 1, nz(3)),             # inside a dense zero region
    (size - 1, nz(1)),                   # last byte of the disk
]
with open(path, "wb") as f:
    f.truncate(size)
    for off, n in dense:
        f.seek(off); f.write(bytes(n))
    for off, b in pieces:
        f.seek(off); f.write(b)
blocks = 0
with open(path, "rb") as f:
    while True:
        b = f.read(4096)
        if not b:
            break
        if b.count(0) != len(b):
            blocks += 1
extents = [(d, d + ln) for d, ln in data_ranges(path)]
data = sum(h - d for d, h in extents)
C = 256 * K
chunks = sum(C for c in range(0, size, C)
             if not any(d < c + C and c < h for d, h in extents))
print(blocks, size - data, chunks)
PY
)
echo "source: $nz_blocks non-zero 4K blocks, $hole_bytes bytes in holes," \
     "$hole_chunks bytes in 256K chunks that are holes"
[ "$nz_blocks" -gt 0 ] && [ "$hole_bytes" -gt $((32 << 20)) ] ||
    fail "could not create a partly sparse source ($hole_bytes bytes in holes)"
max_data=$((nz_blocks * 4096))

# An ideal sparse copy made by cp: its allocation includes whatever
# metadata the file system needs for that many extents.
cp --sparse=always "$src" "$tmp/ideal.img"
ideal=$(allocated "$tmp/ideal.img")
echo "ideal sparse copy: $ideal bytes allocated"

# copy WHAT FILTER-ARGS -- NBDCOPY-ARGS: copy $src into a fresh target.
copy ()
{
    local what="$1"; shift
    local fargs=()
    while [ "$1" != -- ]; do fargs+=("$1"); shift; done
    shift
    new_target "$tgt" "$size"
    start_nbdkit --filter=sparsebackup file "$tgt" "${fargs[@]}"
    nbdcopy "$@" "$src" "$uri" ||
        { cat "$server_log" >&2; fail "$what: nbdcopy $* failed"; }
    stop_nbdkit
    cmp "$src" "$tgt" || fail "$what: target differs from the source"
    alloc=$(allocated "$tgt")
    data=$(data_bytes "$tgt")
    echo "$what: allocated $alloc, data extents $data (limit $max_data)"
}

# expect_sparse WHAT
expect_sparse ()
{
    [ "$data" -le "$max_data" ] ||
        fail "$1: $data bytes in data extents, expected at most $max_data" \
             "($nz_blocks non-zero 4K blocks)"
    [ "$alloc" -le $((ideal + 4096)) ] ||
        fail "$1: $alloc bytes allocated, an ideal sparse copy has $ideal"
}

# 1. Plain writes of every byte: sparse by default.
copy "nbdcopy -S 0 --no-extents" -- -S 0 --no-extents
expect_sparse "nbdcopy -S 0 --no-extents"

# Same with explicit defaults.
copy "nbdcopy -S 0 --no-extents, detect-zeroes=unmap" \
    sparsebackup-detect-zeroes=unmap -- -S 0 --no-extents --requests=4
expect_sparse "nbdcopy -S 0 --no-extents, detect-zeroes=unmap"

# 2. nbdcopy --allocated with sparsebackup-no-hole=ignore: sparse.
copy "nbdcopy --allocated, no-hole=ignore" sparsebackup-no-hole=ignore \
    -- --allocated
expect_sparse "nbdcopy --allocated, no-hole=ignore"

# 3. nbdcopy --allocated by default: the holes of the source arrive as
# zero requests with NO_HOLE and must be provisioned in the target (the
# file plugin allocates them with fallocate), while zero blocks that
# nbdcopy wrote as data are still detected and punched.
expect_honoured ()
{
    [ "$alloc" -ge "$hole_chunks" ] ||
        fail "$1: NO_HOLE zero requests not honoured: $alloc bytes" \
             "allocated, the source has $hole_chunks bytes in 256K chunks" \
             "that are holes (sent as NO_HOLE zero requests)"
    [ "$alloc" -le $((hole_bytes + max_data + 65536)) ] ||
        fail "$1: $alloc bytes allocated: zero blocks written as data were" \
             "not made sparse (expected at most $hole_bytes bytes of holes" \
             "+ $max_data of data + metadata)"
}
copy "nbdcopy --allocated, default (no-hole=honour)" \
    -- --allocated --request-size=262144
expect_honoured "nbdcopy --allocated, default (no-hole=honour)"

copy "nbdcopy --allocated, no-hole=honour" sparsebackup-no-hole=honour \
    -- --allocated --request-size=262144
expect_honoured "nbdcopy --allocated, no-hole=honour"

echo "$0: OK"
