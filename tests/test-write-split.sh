#!/usr/bin/env bash
# Issue 3: how client writes are split into writes and zero requests.
#
# The log filter BELOW sparsebackup shows what reaches the plugin:
#   --filter=sparsebackup --filter=noextents --filter=log file target.img
# (noextents: the filter cannot learn from the target's extents that its
# holes are zero already, so every zero run reaches the plugin; learning
# the target is test-write-target.sh's.)
# Each write mixes zero and data runs at odd offsets and lengths; the test
# checks the exact requests that reach the plugin (offsets, counts,
# trim=1 on zero requests, FUA on every piece), then the exact contents of
# the target and that it is sparse.

source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-write-lib.sh"
requires_nbdpy
requires_plugin file
requires_filter log

size=$((1 << 20))
tgt="$tmp/target.img"
new_target "$tgt" "$size"
start_nbdkit --filter=sparsebackup --filter=noextents --filter=log file "$tgt" \
    logfile="$tmp/log"

"$nbdpy" - "$uri" "$tmp/log" "$tgt" <<'EOF' || { cat "$server_log" >&2; exit 1; }
import sys
from wlib import *

uri, logfile, target = sys.argv[1:4]
h = connect(uri)
size = h.get_size()
log = Log(logfile)
model = bytearray(size)
Z = {"trim": 1}

def write(what, off, buf, expected, flags=0, ops=("Write", "Zero", "Trim")):
    log.mark()
    h.pwrite(buf, off, flags)
    model[off:off + len(buf)] = buf
    reqs = log.new()
    expect_requests(what, reqs, expected, ops)
    return reqs

# 1. An all-data write at an odd offset and length: the same single write.
off = 3 * B + 100
write("all-data write", off, data(10000), [("Write", off, 10000)])

# 2. data, 2 zero blocks, data (aligned): Write, Zero(may_trim), Write.
off = 16 * B
write("data|zero zero|data", off, data(B) + zeros(2 * B) + data(B),
      [("Write", off, B), ("Zero", off + B, 2 * B, Z),
       ("Write", off + 3 * B, B)])

# 3. Zero partial head block, data block, zero partial tail: partial blocks
#    are judged on the bytes the write covers.
off = 32 * B + 100
write("partial zero head|data|partial zero tail", off,
      zeros(B - 100) + data(B) + zeros(50),
      [("Zero", off, B - 100, Z), ("Write", 33 * B, B),
       ("Zero", 34 * B, 50, Z)])

# 4. Partial data head coalesces with the following data block; zero
#    blocks; partial data tail.
off = 48 * B + 4000
write("partial data head+data|zero|partial data tail", off,
      data(96) + data(B) + zeros(2 * B) + data(10),
      [("Write", off, 96 + B, {}), ("Zero", 50 * B, 2 * B, Z),
       ("Write", 52 * B, 10)])

# 5. One non-zero byte inside a 256 KiB zero write.
off = 64 * B
buf = bytearray(64 * B)
buf[20 * B + 777] = 0x5a
write("one byte in 256K of zeros", off, bytes(buf),
      [("Zero", off, 20 * B, Z), ("Write", off + 20 * B, B),
       ("Zero", off + 21 * B, 43 * B, Z)])

# 6. D D Z Z Z D Z D D: runs coalesce, exactly 5 requests.
off = 160 * B
write("DDZZZDZDD", off,
      data(2 * B) + zeros(3 * B) + data(B) + zeros(B) + data(2 * B),
      [("Write", off, 2 * B), ("Zero", off + 2 * B, 3 * B, Z),
       ("Write", off + 5 * B, B), ("Zero", off + 6 * B, B, Z),
       ("Write", off + 7 * B, 2 * B)])

# 7. An all-zero write: one zero request with may_trim.
off = 200 * B
write("all-zero write", off, zeros(8 * B), [("Zero", off, 8 * B, Z)])

# 8. The same again, and an unaligned piece of it: blocks already known
#    zero, so nothing at all reaches the plugin.
write("all-zero write over known-zero blocks", off, zeros(8 * B), [],
      ops=("Write", "Zero", "Trim", "Read", "Flush"))
write("unaligned zero write inside known-zero blocks", off + B + 5,
      zeros(100), [], ops=("Write", "Zero", "Trim", "Read", "Flush"))

# 9. Zero blocks inside a write whose zero part is partly known zero:
#    data into block 203, zeros over 200..208 again.  Block 203 is no
#    longer known zero, so a zero request must reach the plugin for it.
write("data into a known-zero area", off + 3 * B + 7, data(20),
      [("Write", off + 3 * B + 7, 20)])
log.mark()
h.pwrite(zeros(8 * B), off)
model[off:off + 8 * B] = zeros(8 * B)
reqs = [r for r in log.new() if r["op"] in ("Write", "Zero")]
check(all(r["op"] == "Zero" and r.get("trim") == 1 for r in reqs),
      "zeros over a partly known-zero area: expected only zero requests "
      "with trim=1, got:\n" + fmt(reqs))
check(any(r["offset"] <= off + 3 * B and
          r["offset"] + r["count"] >= off + 4 * B for r in reqs),
      "zeros over a partly known-zero area: no zero request covers the "
      "block that was written in between:\n" + fmt(reqs))

# 10. FUA: the file plugin supports FUA natively (fua=2), so every piece
#     keeps FUA.
off = 220 * B
write("FUA data|zero|data", off, data(B) + zeros(B) + data(B),
      [("Write", off, B, {"fua": 1}), ("Zero", off + B, B, {"trim": 1, "fua": 1}),
       ("Write", off + 2 * B, B, {"fua": 1})], flags=nbd.CMD_FLAG_FUA)

# 11. A write skipped because its blocks are known zero still owes the
#     client durability when FUA was asked (earlier writes are unflushed).
buf = data(B)
h.pwrite(buf, 240 * B)              # something not yet flushed
model[240 * B:241 * B] = buf
log.mark()
h.pwrite(zeros(4 * B), 200 * B, nbd.CMD_FLAG_FUA)
reqs = log.new()
check(not [r for r in reqs if r["op"] in ("Write", "Zero")],
      "FUA zero write over known-zero blocks reached the plugin:\n" +
      fmt(reqs))
check([r for r in reqs if r["op"] == "Flush" or r.get("fua") == 1],
      "FUA zero write over known-zero blocks: no flush reached the "
      "plugin:\n" + fmt(reqs))

# 12. Zeros written over data blocks (not known zero): passed down.
off = 16 * B
write("zeros over data", off, zeros(4 * B), [("Zero", off, 4 * B, Z)])

# 13. A write that ends at the end of the disk with a partial zero tail.
off = size - B - 10
write("data|zero up to the end of the disk", off, data(10) + zeros(B),
      [("Write", off, 10), ("Zero", size - B, B, Z)])

# Contents, through the filter and in the file itself.
got = read_all(h, 0, size)
if got != bytes(model):
    bad = next(i for i in range(size) if got[i] != model[i])
    fail("contents differ from the model at %#x: %#x != %#x" %
         (bad, got[bad], model[bad]))
h.flush()
with open(target, "rb") as f:
    on_disk = f.read()
check(on_disk == bytes(model), "the target file differs from the model")
check_zero_claims(h, 0, size, got)

# Sparse: every all-zero 4K block is a hole.
for i in range(0, size, B):
    blk = model[i:i + B]
    if blk.count(0) == len(blk) and data_in(target, i, B):
        fail("block %#x is all zero but allocated in the target" % i)
print("contents OK; %d non-zero blocks, %d bytes in data extents" %
      (nonzero_blocks(model), sum(l for _, l in data_ranges(target))))
h.shutdown()
EOF

echo "$0: OK"
