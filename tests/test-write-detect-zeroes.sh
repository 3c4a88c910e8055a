#!/usr/bin/env bash
# Issue 3: sparsebackup-detect-zeroes=unmap|on|off, and bad parameter
# values refused at start-up with a message naming the key and the value.
#
#   unmap (default): zero runs of writes -> zero requests with may_trim:
#                    the target stays sparse;
#   on:              zero runs -> zero requests without may_trim: the
#                    target is allocated (file plugin: fallocate);
#   off:             writes pass through unchanged (allocated), but client
#                    zero requests over known-zero blocks are still skipped
#                    and the map still follows writes.

source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-write-lib.sh"
requires_nbdpy
requires_plugin file
requires_plugin null
requires_filter log
requires nbdinfo --version

size=$((1 << 20))

# run_mode MODE: write a mix of data and zeros through a fresh server and
# check the requests that reach the plugin and the target's allocation.
run_mode ()
{
    local mode="$1" tgt="$tmp/target-$1.img"
    new_target "$tgt" "$size"
    rm -f "$tmp/log"
    # noextents: the target's holes stay unknown to the filter, so that
    # every zero run reaches the plugin (see test-write-target.sh).
    start_nbdkit --filter=sparsebackup --filter=noextents --filter=log \
        file "$tgt" \
        logfile="$tmp/log" sparsebackup-detect-zeroes="$mode"
    "$nbdpy" - "$uri" "$tmp/log" "$tgt" "$mode" <<'EOF' ||
import sys
from wlib import *

uri, logfile, target, mode = sys.argv[1:5]
h = connect(uri)
size = h.get_size()
log = Log(logfile)
model = bytearray(size)

def write(off, buf):
    log.mark()
    h.pwrite(buf, off)
    model[off:off + len(buf)] = buf
    return log.new()

# data | 4 zero blocks | data, then an all-zero write of 16 blocks.
off1, buf1 = 8 * B, data(B) + zeros(4 * B) + data(B)
off2, buf2 = 64 * B, zeros(16 * B)
r1 = write(off1, buf1)
r2 = write(off2, buf2)
if mode == "off":
    expect_requests(mode + ": mixed write", r1, [("Write", off1, len(buf1))])
    expect_requests(mode + ": zero write", r2, [("Write", off2, len(buf2))])
else:
    t = {"trim": 1 if mode == "unmap" else 0}
    expect_requests(mode + ": mixed write", r1,
                    [("Write", off1, B), ("Zero", off1 + B, 4 * B, t),
                     ("Write", off1 + 5 * B, B)])
    expect_requests(mode + ": zero write", r2, [("Zero", off2, 16 * B, t)])

if mode == "off":
    # Client zero requests are still passed down once, then skipped.
    off = 128 * B
    log.mark()
    h.zero(8 * B, off)
    expect_requests("off: first zero request", log.new(),
                    [("Zero", off, 8 * B, {"trim": 1})])
    log.mark()
    h.zero(8 * B, off)
    h.zero(100, off + B + 3)
    expect_requests("off: zero request over known-zero blocks", log.new(), [])
    # A plain write into the known-zero area makes it unknown again: the
    # next zero request must reach the plugin.
    buf = data(10)
    log.mark()
    h.pwrite(buf, off + 2 * B + 5)
    expect_requests("off: write into a known-zero area", log.new(),
                    [("Write", off + 2 * B + 5, 10)])
    log.mark()
    h.zero(8 * B, off)
    reqs = [r for r in log.new() if r["op"] == "Zero"]
    check(any(r["offset"] <= off + 2 * B and
              r["offset"] + r["count"] >= off + 3 * B for r in reqs),
          "off: the zero request after a write was skipped:\n" + fmt(reqs))
    check(h.pread(B, off + 2 * B) == zeros(B),
          "off: block not zero after the zero request")
    # Writes of zeros are not detected in this mode even over known zero.
    log.mark()
    h.pwrite(zeros(B), off + 4 * B)
    expect_requests("off: zero write over known zero", log.new(),
                    [("Write", off + 4 * B, B)], ops=("Write", "Zero"))

got = read_all(h, 0, size)
check(got == bytes(model), mode + ": contents differ from the model")
h.flush()
with open(target, "rb") as f:
    check(f.read() == bytes(model), mode + ": the target file differs")
check_zero_claims(h, 0, size, got, mode)
h.shutdown()
EOF
    { cat "$server_log" >&2; fail "detect-zeroes=$mode"; }
    stop_nbdkit
    alloc=$(allocated "$tgt")
    data=$(data_bytes "$tgt")
    echo "detect-zeroes=$mode: allocated $alloc, data extents $data"
}

run_mode unmap
[ "$data" -le $((2 * 4096)) ] ||
    fail "detect-zeroes=unmap: $data bytes in data extents, expected 8192"
[ "$alloc" -le $((2 * 4096 + 4096)) ] ||
    fail "detect-zeroes=unmap: $alloc bytes allocated, expected 8192"

run_mode on
# 2 data blocks + 4 + 16 zero blocks written with zero requests without
# may_trim: the file plugin allocates them (fallocate ZERO_RANGE, which
# du counts even though SEEK_DATA may report unwritten extents as holes).
[ "$alloc" -ge $((22 * 4096)) ] ||
    fail "detect-zeroes=on: $alloc bytes allocated, expected >= $((22 * 4096))"

run_mode off
[ "$alloc" -ge $((22 * 4096)) ] ||
    fail "detect-zeroes=off: $alloc bytes allocated, expected >= $((22 * 4096))"
[ "$data" -ge $((22 * 4096)) ] ||
    fail "detect-zeroes=off: $data bytes in data extents, expected >= $((22 * 4096))"

# ---- parameter values ----------------------------------------------------

refused sparsebackup-detect-zeroes=bogus
refused sparsebackup-detect-zeroes=
refused sparsebackup-detect-zeroes=UNMAPX
refused sparsebackup-block-size=3000
refused sparsebackup-block-size=0
refused sparsebackup-block-size=4M
refused sparsebackup-block-size=256
refused sparsebackup-block-size=abc
refused sparsebackup-no-hole=bogus
refused sparsebackup-no-hole=yes

# The exact form given in the contract.
nbdkit -U - --filter=sparsebackup null 1M sparsebackup-block-size=3000 \
    --run true >"$tmp/out" 2>&1 && fail "sparsebackup-block-size=3000 accepted"
assert_contains "$tmp/out" \
    "sparsebackup-block-size: '3000' is not a power of 2 between 512 and 2M"

for m in unmap on off; do accepted sparsebackup-detect-zeroes=$m; done
for m in honour ignore; do accepted sparsebackup-no-hole=$m; done
for s in 512 4096 4k 64K 1M 2M 2097152; do
    accepted sparsebackup-block-size=$s
done
accepted sparsebackup-detect-zeroes=off sparsebackup-no-hole=ignore \
    sparsebackup-block-size=64k

echo "$0: OK"
