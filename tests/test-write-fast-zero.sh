#!/usr/bin/env bash
# Issue 3: FAST_ZERO and NO_HOLE zero requests.
#
# FAST_ZERO (doc/design.md): succeeds at once over known-zero ranges
# (no plugin call); otherwise passed down with FAST_ZERO when the plugin
# can fast zero; otherwise fails with ENOTSUP at once, changing nothing.
# NO_HOLE: passed down without may_trim by default, with may_trim under
# sparsebackup-no-hole=ignore.
# The log filter below sparsebackup shows what reaches the plugin.

source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-write-lib.sh"
requires_nbdpy
requires_plugin memory
requires_plugin file
requires_filter log
requires_filter nozero

# check_server KIND: run the python checks for a server of kind KIND:
#   fast:    the plugin can fast zero (memory)
#   nofast:  the plugin cannot (file in nbdkit 1.32, or nozero fastzeromode=none):
#            fast zero is not advertised
#   failing: the layer below advertises fast zero but always fails it
#            with ENOTSUP (nozero zeromode=emulate)
#   ignore:  sparsebackup-no-hole=ignore
check_server ()
{
    "$nbdpy" - "$uri" "$tmp/log" "$1" <<'EOF' || { cat "$server_log" >&2; fail "$1"; }
import errno, sys
from wlib import *

uri, logfile, kind = sys.argv[1:4]
h = connect(uri)
log = Log(logfile)
FAST, NO_HOLE = nbd.CMD_FLAG_FAST_ZERO, nbd.CMD_FLAG_NO_HOLE
ZOPS = ("Write", "Zero", "Trim")

check(h.can_zero(), kind + ": zero not advertised")
# Fast zero is advertised exactly when the layer below advertises it.
if kind == "nofast":
    check(not h.can_fast_zero(), kind + ": fast zero advertised over a layer "
          "that does not advertise it")
else:
    check(h.can_fast_zero(), kind + ": fast zero not advertised")

# Make [0, 64K) known zero with an ordinary zero request.
h.zero(16 * B, 0)
if kind not in ("ignore", "nofast"):
    # Known zero: fast zero succeeds without calling the plugin, for the
    # whole range, an aligned piece and an unaligned piece.
    log.mark()
    h.zero(16 * B, 0, FAST)
    h.zero(2 * B, 4 * B, FAST)
    h.zero(1000, 3 * B + 17, FAST)
    reqs = log.new()
    expect_requests(kind + ": fast zero over known-zero blocks", reqs, [],
                    ops=("Write", "Zero", "Trim", "Read"))
    check(h.pread(16 * B, 0) == zeros(16 * B), kind + ": not zero")

# Data that is not known zero.
off = 32 * B
buf = data(8 * B)
h.pwrite(buf, off)

if kind == "fast":
    log.mark()
    h.zero(8 * B, off, FAST)
    reqs = log.new()
    expect_requests("fast: fast zero over data", reqs,
                    [("Zero", off, 8 * B, {"fast": 1})])
    check(h.pread(8 * B, off) == zeros(8 * B), "fast: not zeroed")
    # Partly known zero, partly data: passed down with FAST_ZERO (all of
    # it, or only the part not known zero).
    h.pwrite(buf, 64 * B)
    log.mark()
    h.zero(24 * B, 48 * B, FAST)
    reqs = [r for r in log.new() if r["op"] in ZOPS]
    check(reqs and all(r["op"] == "Zero" and r.get("fast") == 1 for r in reqs),
          "fast: partly known zero: expected fast zero requests:\n" + fmt(reqs))
    check(h.pread(24 * B, 48 * B) == zeros(24 * B), "fast: not zeroed (2)")
elif kind == "failing":
    for o, n, what in ((off, 8 * B, "over data"),
                       (off + 100, 3 * B, "unaligned, over data"),
                       (0, 40 * B, "partly known zero, partly data")):
        log.mark()
        e = expect_error(kind + ": fast zero " + what, errno.ENOTSUP,
                         h.zero, n, o, FAST)
        reqs = log.new()
        check(h.pread(8 * B, off) == buf,
              kind + ": fast zero " + what + " changed the data")
        check(not zero_claims(h, off, 8 * B),
              kind + ": after a failed fast zero, block status claims zero")
    print(kind + ": ENOTSUP as expected:", e)
    # Still known zero where it was.
    log.mark()
    h.zero(16 * B, 0, FAST)
    expect_requests(kind + ": fast zero over known zero after failures",
                    log.new(), [], ops=ZOPS)

# NO_HOLE over data (not known zero): without may_trim by default, with
# may_trim under sparsebackup-no-hole=ignore.  (Not with "failing": a layer
# below that emulates zero may be sent writes of zeros instead.)
if kind == "failing":
    h.pwrite(buf, 96 * B)
    h.zero(8 * B, 96 * B, NO_HOLE)
    check(h.pread(8 * B, 96 * B) == zeros(8 * B), "failing: NO_HOLE: not zero")
    h.shutdown()
    sys.exit(0)
off = 96 * B
h.pwrite(buf, off)
t = 1 if kind == "ignore" else 0
log.mark()
h.zero(8 * B, off, NO_HOLE)
expect_requests(kind + ": NO_HOLE zero", log.new(),
                [("Zero", off, 8 * B, {"trim": t})])
check(h.pread(8 * B, off) == zeros(8 * B), kind + ": NO_HOLE zero: not zero")
if kind != "ignore":
    # NO_HOLE over blocks known to read as zero: they may be holes, and
    # NO_HOLE asks for provisioning, so the request is still passed down
    # (without may_trim) when NO_HOLE is honoured.
    h.zero(8 * B, off)                 # known zero (and punched)
    log.mark()
    h.zero(8 * B, off, NO_HOLE)
    expect_requests(kind + ": NO_HOLE zero over known zero", log.new(),
                    [("Zero", off, 8 * B, {"trim": 0})])
# An ordinary zero request keeps may_trim.
h.pwrite(buf, off)
log.mark()
h.zero(8 * B, off)
expect_requests(kind + ": zero", log.new(),
                [("Zero", off, 8 * B, {"trim": 1})])
if kind == "ignore":
    # ignore: NO_HOLE over known zero is skipped like any zero request.
    log.mark()
    h.zero(8 * B, off, NO_HOLE)
    expect_requests("ignore: NO_HOLE over known zero", log.new(), [], ops=ZOPS)
h.shutdown()
EOF
}

size=1M

# The memory plugin can fast zero.
start_nbdkit --filter=sparsebackup --filter=log memory $size \
    logfile="$tmp/log"
check_server fast
stop_nbdkit

# The file plugin of nbdkit 1.32 cannot (fast_zero=0): neither does the
# filter advertise it (nbdkit's own test-eflags.sh and a retry filter
# above rely on that).
new_target "$tmp/target.img" $size
rm -f "$tmp/log"
start_nbdkit --filter=sparsebackup --filter=log file "$tmp/target.img" \
    logfile="$tmp/log"
check_server nofast
stop_nbdkit

# A plugin that does not advertise fast zero at all.
rm -f "$tmp/log"
start_nbdkit --filter=sparsebackup --filter=log --filter=nozero memory $size \
    zeromode=plugin fastzeromode=none logfile="$tmp/log"
check_server nofast
stop_nbdkit

# A layer below that advertises fast zero but always fails it: the error
# reaches the client and nothing changes.
rm -f "$tmp/log"
start_nbdkit --filter=sparsebackup --filter=log --filter=nozero memory $size \
    zeromode=emulate logfile="$tmp/log"
check_server failing
stop_nbdkit

# sparsebackup-no-hole=ignore.
rm -f "$tmp/log"
start_nbdkit --filter=sparsebackup --filter=log memory $size \
    logfile="$tmp/log" sparsebackup-no-hole=ignore
check_server ignore
stop_nbdkit

echo "$0: OK"
