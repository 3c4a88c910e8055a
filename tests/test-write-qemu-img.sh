#!/usr/bin/env bash
# Issue 3: the target stays sparse whatever the client writes (qemu-img).
#
# `qemu-img convert -S 0` does no zero detection of its own and writes
# every byte of the source as data.  Through the filter the target must be
# identical to the source and as sparse as the source's non-zero 4K
# blocks allow.  Also with the target opened through --image-opts, and
# with a raw source that is fully allocated (zeros written out).

source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-write-lib.sh"
requires qemu-img --version
requires python3
requires_plugin file

size=$((32 << 20))
src="$tmp/src.img"
tgt="$tmp/target.img"

# A fully allocated source with data at odd places.
nz_blocks=$(python3 - "$src" "$size" <<'PY'
import random, sys
path, size = sys.argv[1], int(sys.argv[2])
rnd = random.Random(4242)
def nz(n):
    return bytes(rnd.randrange(1, 256) for _ in range(n))
K, M = 1 << 10, 1 << 20
with open(path, "wb") as f:
    for _ in range(size // M):
        f.write(bytes(M))            # allocated zeros everywhere
    for off, n in [(0, 1), (M + 123, 10000), (3*M - 5, 10),
                   (6*M + 128*K + 777, 1),      # 1 byte in a zero 256K
                   (9*M, 512*K), (17*M + 4095, 2),
                   (20*M + 64*K + 4096*3, 4096), (size - 4096, 4096)]:
        f.seek(off); f.write(nz(n))
blocks = 0
with open(path, "rb") as f:
    while True:
        b = f.read(4096)
        if not b:
            break
        blocks += b.count(0) != len(b)
print(blocks)
PY
)
max_data=$((nz_blocks * 4096))
[ "$(allocated "$src")" -ge "$size" ] || fail "the source is not allocated"
cp --sparse=always "$src" "$tmp/ideal.img"
ideal=$(allocated "$tmp/ideal.img")
echo "source: $nz_blocks non-zero 4K blocks; an ideal sparse copy allocates $ideal"

check_target ()
{
    local what="$1"
    cmp "$src" "$tgt" || fail "$what: target differs from the source"
    local alloc data
    alloc=$(allocated "$tgt")
    data=$(data_bytes "$tgt")
    echo "$what: allocated $alloc, data extents $data (limit $max_data)"
    [ "$data" -le "$max_data" ] ||
        fail "$what: $data bytes in data extents, expected at most" \
             "$max_data ($nz_blocks non-zero 4K blocks)"
    [ "$alloc" -le $((ideal + 4096)) ] ||
        fail "$what: $alloc bytes allocated, an ideal sparse copy has $ideal"
}

# 1. The target as an NBD URI.
new_target "$tgt" "$size"
start_nbdkit --filter=sparsebackup file "$tgt"
qemu-img convert -S 0 -n -f raw -O raw "$src" "$uri" ||
    { cat "$server_log" >&2; fail "qemu-img convert -S 0 failed"; }
stop_nbdkit
check_target "qemu-img convert -S 0 (URI)"

# 2. The target through --target-image-opts, with several coroutines and
# out-of-order writes (-W), so that requests arrive in parallel.
new_target "$tgt" "$size"
start_nbdkit --filter=sparsebackup file "$tgt"
qemu-img convert -S 0 -n -W -m 8 -f raw "$src" \
    --target-image-opts "driver=raw,file.driver=nbd,file.path=$sock" ||
    { cat "$server_log" >&2; fail "qemu-img convert -S 0 -W failed"; }
stop_nbdkit
check_target "qemu-img convert -S 0 -W -m 8 (image-opts)"

# 3. Plain qemu-img convert (its own zero detection, -S 4k) must of course
# give the same result.
new_target "$tgt" "$size"
start_nbdkit --filter=sparsebackup file "$tgt"
qemu-img convert -n -f raw -O raw "$src" "$uri" ||
    { cat "$server_log" >&2; fail "qemu-img convert failed"; }
stop_nbdkit
check_target "qemu-img convert (default -S)"

# 4. Copying over an existing, fully allocated target holding other data:
# the zero blocks must be punched, not just left alone.
python3 -c "
import sys
with open(sys.argv[1], 'wb') as f:
    f.write(b'\xaa' * int(sys.argv[2]))" "$tgt" "$size"
start_nbdkit --filter=sparsebackup file "$tgt"
qemu-img convert -S 0 -n -f raw -O raw "$src" "$uri" ||
    { cat "$server_log" >&2; fail "qemu-img convert -S 0 (over data) failed"; }
stop_nbdkit
check_target "qemu-img convert -S 0 over an allocated target"

echo "$0: OK"
