#!/usr/bin/env bash
# Issue 19, defect 1 (and its sibling): nbdkit's cache filter below the
# filter, in every cache mode.  nbdkit 1.32's cache filter has no .trim:
# a trim reaches the plugin, which then reports hole+zero, while the
# cache keeps the old block; and it refuses every fast zero (ENOTSUP,
# nothing changed), while in writeback and unsafe mode the plugin has
# not seen the data yet.  Either way the plugin's extents say zero over
# data the layer below still returns: the filter must not believe them.
#
# 1. Write 64K of 0xab, trim it, zero it, write 1 byte at 100, read: the
#    zero request must reach the cache (it was skipped, and the byte
#    merged into the stale cached block: 65,535 bytes of 0xab).
# 2. Write 64K of 0xab, a fast zero (refused below), block status, read:
#    the data is still there and not reported as zero.
# Without the filter, or with the cache filter above it, both are right
# (except the extents of the cache filter in writeback and unsafe mode
# above the filter, which are wrong without the filter too).
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_filter cache

for mode in writethrough writeback unsafe; do
    for where in above below; do
        if [ $where = above ]; then
            start_nbdkit --filter=sparsebackup --filter=cache memory 1M \
                cache=$mode
        else
            start_nbdkit --filter=cache --filter=sparsebackup memory 1M \
                cache=$mode
        fi
        export what="sparsebackup $where cache=$mode"
        nbdsh --base-allocation -u "$uri" -c '
import errno, os
what = os.environ["what"]
trusted = not what.startswith("sparsebackup below") or \
    what.endswith("writethrough")
K = 1024

# 1. trim, zero, partial write
h.pwrite(b"\xab" * (64 * K), 0)
h.trim(64 * K, 0)
h.zero(64 * K, 0)
h.pwrite(b"\x01", 100)
buf = h.pread(64 * K, 0)
want = bytes(100) + b"\x01" + bytes(64 * K - 101)
assert buf == want, "%s: trim, zero, write 1 byte: %d bytes of 0xab" % \
    (what, buf.count(b"\xab"))

# 2. a fast zero refused below
h.pwrite(b"\xab" * (64 * K), 128 * K)
if h.can_fast_zero():
    try:
        h.zero(64 * K, 128 * K, nbd.CMD_FLAG_FAST_ZERO)
        refused = False
    except nbd.Error as e:
        assert e.errnum == errno.ENOTSUP, e
        refused = True
    zeros = []
    def cb(ctx, off, ents, err):
        pos = off
        for i in range(0, len(ents), 2):
            if ents[i + 1] & nbd.STATE_ZERO:
                zeros.append((pos, ents[i]))
            pos += ents[i]
    h.block_status(1024 * K, 0, cb)
    buf = h.pread(64 * K, 128 * K)
    if refused:
        assert buf == b"\xab" * (64 * K), \
            "%s: data lost after a refused fast zero" % what
        # (The cache filter above the filter, in writeback and unsafe
        # mode, reports the extents below while the data is only in its
        # cache: wrong without the filter too.)
        for (o, l) in zeros if trusted else []:
            assert o + l <= 128 * K or o >= 192 * K, \
                "%s: ZERO claimed over data after a refused fast zero: %d+%d" \
                % (what, o, l)
    else:
        assert buf == bytes(64 * K), "%s: fast zero" % what
print("%s: ok" % what)
' || fail "sparsebackup $where cache=$mode"
        stop_nbdkit
    done
done
echo "$0: OK"
