#!/usr/bin/env bash
# Issue 4: the map never goes stale.  Writes, zeroes and trims made on one
# connection after the map was learnt are reflected in the next extents
# answer on another connection (the map is shared by all connections).
#
# Part 1: one nbdsh, two handles A and B on the same server.  The plugin
# (eval, backed by a thick file) cannot report extents, so scan=auto
# scans; its trim does nothing at all (allowed by the protocol: trim is
# advisory), so trimmed data stays there and must never be called zero.
#
# Part 2: the file plugin on a thick file with scan=always, and separate
# processes (nbdinfo, nbdsh, nbdinfo).
#
# (The eval scripts unset LD_PRELOAD: under --enable-sanitizers the
# wrapper preloads libasan into nbdkit, and dd aborts under it.)
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires nbdinfo --version
requires_nbdsh
requires dd --version
requires_plugin eval
requires_plugin file

# ---- Part 1
size=$M
mk_thick $tmp/disk.img $size $((256 * K)):$((64 * K))
start_nbdkit --filter=sparsebackup eval \
    get_size="echo $size" \
    pread="unset LD_PRELOAD; dd if=$tmp/disk.img skip=\$4 count=\$3 iflag=count_bytes,skip_bytes status=none" \
    pwrite="unset LD_PRELOAD; dd of=$tmp/disk.img seek=\$4 conv=notrunc oflag=seek_bytes status=none" \
    trim='exit 0' \
    sparsebackup-scan=auto

export uri
nbdsh --base-allocation -u "$uri" -c '
import os
A = h
B = nbd.NBD()
B.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
B.connect_uri(os.environ["uri"])
K = 1024; M = K * K

def extents(hd, off, cnt):
    """(offset, length, zero) runs covering [off, off+cnt) from hd."""
    out = []
    pos = off
    while pos < off + cnt:
        got = []
        def cb(meta, o, entries, err):
            if meta != nbd.CONTEXT_BASE_ALLOCATION:
                return 0
            p = o
            for i in range(0, len(entries), 2):
                got.append((p, entries[i], bool(entries[i + 1] & nbd.STATE_ZERO)))
                p += entries[i]
            return 0
        hd.block_status(off + cnt - pos, pos, cb)
        assert got and got[0][0] == pos and got[0][1] > 0, "no progress at %d" % pos
        for e in got:
            if e[0] >= off + cnt:
                break
            out.append(e)
            pos = e[0] + e[1]
    return out

def zero_over(hd, off, cnt):
    return all(z for (o, l, z) in extents(hd, off, cnt))

def any_zero_over(hd, off, cnt):
    return any(z for (o, l, z) in extents(hd, off, cnt))

def step(what, ok):
    print("%-60s %s" % (what, "ok" if ok else "FAILED"))
    assert ok, what

# 1. The map as A learns it (by scanning).
step("A: [0,256K) zero", zero_over(A, 0, 256 * K))
step("A: [256K,320K) data", not any_zero_over(A, 256 * K, 64 * K))
step("A: [320K,1M) zero", zero_over(A, 320 * K, M - 320 * K))

# 2. B writes data into a zero region; A sees data and reads it.
X = b"\x11" * (4 * K)
B.pwrite(X, 64 * K)
step("A after B write: [64K,68K) not zero", not any_zero_over(A, 64 * K, 4 * K))
step("A after B write: pread", A.pread(4 * K, 64 * K) == X)

# 3. An unaligned small write: its whole block loses the zero state.
B.pwrite(b"\x22" * 100, 128 * K + 1000)
step("A after B unaligned write: block not zero", not any_zero_over(A, 128 * K, 4 * K))
step("A after B unaligned write: pread",
     A.pread(4 * K, 128 * K) == bytes(1000) + b"\x22" * 100 + bytes(4 * K - 1100))

# 4. B zeroes the data again; A sees zero.
B.zero(4 * K, 64 * K)
step("A after B zero: [64K,68K) zero", zero_over(A, 64 * K, 4 * K))
step("A after B zero: pread", A.pread(4 * K, 64 * K) == bytes(4 * K))

# 5. B writes then trims; the plugin ignores the trim, the data stays.
Y = b"\x33" * (8 * K)
B.pwrite(Y, 512 * K)
step("A after B write: [512K,520K) not zero", not any_zero_over(A, 512 * K, 8 * K))
B.trim(8 * K, 512 * K)
step("A after B trim: [512K,520K) not claimed zero", not any_zero_over(A, 512 * K, 8 * K))
step("A after B trim: pread still the data", A.pread(8 * K, 512 * K) == Y)

# 6. Trim of the original data: never zero either.
B.trim(64 * K, 256 * K)
step("A after B trim of the original data: not claimed zero",
     not any_zero_over(A, 256 * K, 64 * K))
step("A after B trim: pread not zero", A.pread(64 * K, 256 * K) != bytes(64 * K))

# 7. Zero, then one byte of data in the middle: that block is data.
B.zero(64 * K, 256 * K)
step("A after B zero 64K: zero", zero_over(A, 256 * K, 64 * K))
B.pwrite(b"\x44", 260 * K + 7)
step("A after B 1-byte write: [260K,264K) not zero", not any_zero_over(A, 260 * K, 4 * K))
step("A after B 1-byte write: [256K,260K) still zero", zero_over(A, 256 * K, 4 * K))
step("A after B 1-byte write: pread", A.pread(4 * K, 260 * K) == bytes(7) + b"\x44" + bytes(4 * K - 8))

# 8. A (not B) writes; B sees it.
A.pwrite(b"\x55" * (4 * K), 900 * K)
step("B after A write: not zero", not any_zero_over(B, 900 * K, 4 * K))
B.shutdown()
'
stop_nbdkit

# ---- Part 2: separate processes, file plugin, scan=always.
size=$((4 * M))
mk_thick $tmp/thick.img $size $M:$((64 * K))
start_nbdkit --filter=sparsebackup file $tmp/thick.img sparsebackup-scan=always
zmap "$uri" > $tmp/map1
expect_zmap $size $M:$((64 * K)) > $tmp/expected1
diff -u $tmp/expected1 $tmp/map1 || fail "part 2: wrong map before the write"

nbdsh -u "$uri" -c 'h.pwrite(b"\x66" * 65536, 2 * 1024 * 1024)'
zmap "$uri" > $tmp/map2
expect_zmap $size $M:$((64 * K)) $((2 * M)):$((64 * K)) > $tmp/expected2
diff -u $tmp/expected2 $tmp/map2 || fail "part 2: the map is stale after a write by another process"

nbdsh -u "$uri" -c 'h.zero(65536, 1024 * 1024)'
zmap "$uri" > $tmp/map3
expect_zmap $size $((2 * M)):$((64 * K)) > $tmp/expected3
diff -u $tmp/expected3 $tmp/map3 || fail "part 2: the map is stale after a zero by another process"
stop_nbdkit

echo "$0: OK"
