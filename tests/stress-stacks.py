"""Random stress of one nbdkit stack against a byte model (run by
test-stress-stacks.sh).

    stress-stacks.py --sock SOCK --seed N [--ops N] [--conns N]
                     [--align N] [--error-file PATH] [--expect-errors]
                     [--no-zero-check] [--errors-always] [--no-fast-zero]
                     [--label TEXT]

Opens several connections to the export on SOCK and issues, one at a
time but on connections picked at random, writes (data, zero blocks and
mixtures), zero requests (with NO_HOLE, FAST_ZERO, FUA), trims, reads,
block status requests (with and without REQ_ONE), cache requests and
flushes, at random offsets, mostly in a small hot region so that the
same blocks are written, trimmed and zeroed over and over.  Everything
is decided by the seed: the same seed gives the same requests.

The model holds every byte and whether it is defined.  A trim makes its
bytes undefined (a trim is advisory: the old bytes may stay), and so
does a write or zero request that failed.  A fast zero refused with
ENOTSUP changed nothing.  Then:

  - every read must return the model's defined bytes;
  - every extent that claims NBD_STATE_ZERO must cover only bytes that
    are zero or undefined in the model (not with --no-zero-check: for
    stacks whose top layer reports extents that are wrong without the
    filter too, such as nbdkit's cache filter in writeback mode);
  - no request may fail, except a fast zero with ENOTSUP, and, with
    --error-file, requests issued while that file exists (nbdkit's error
    filter with error-rate=100% fails every request it sees then: a
    deterministic low error rate); with --expect-errors at least one
    request must have failed, with --errors-always every request but a
    flush issued in an error window (the error filter is above
    everything else and sees them all).

On a mismatch it prints the seed, the step, the requests that led to it
(the last ones on the blocks concerned) and exits 1.
"""
import argparse
import errno
import os
import random
import sys

import nbd

p = argparse.ArgumentParser()
p.add_argument("--sock", required=True)
p.add_argument("--seed", type=int, required=True)
p.add_argument("--ops", type=int, default=300)
p.add_argument("--conns", type=int, default=3)
p.add_argument("--align", type=int, default=1)
p.add_argument("--error-file")
p.add_argument("--error-rate", type=float, default=0.04)
p.add_argument("--expect-errors", action="store_true")
p.add_argument("--no-zero-check", action="store_true")
p.add_argument("--errors-always", action="store_true")
p.add_argument("--no-fast-zero", action="store_true")
p.add_argument("--label", default="")
args = p.parse_args()

rnd = random.Random(args.seed)
label = "%s seed %d" % (args.label, args.seed)


def connect():
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(args.sock)
    return h


hs = [connect() for _ in range(args.conns)]
h0 = hs[0]
size = h0.get_size()
can_trim = h0.can_trim()
can_zero = h0.can_zero()
can_fast_zero = can_zero and h0.can_fast_zero() and not args.no_fast_zero
can_cache = h0.can_cache()
can_flush = h0.can_flush()
can_fua = h0.can_fua()
can_meta = h0.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
A = args.align
B = 4096
HOT = min(size, 64 * 1024)

model = bytearray(size)
defined = bytearray(b"\x01") * size
history = []                    # (step, conn, text, off, count)
errors_seen = 0


def fail(step, msg, off=None, count=None):
    print("FAIL: %s: step %d: %s" % (label, step, msg), file=sys.stderr)
    print("requests that led to it (most recent last):", file=sys.stderr)
    lines = history
    if off is not None:
        b0, b1 = off // B * B, (off + (count or 1) + B - 1) // B * B
        lines = [x for x in history if x[3] < b1 and x[3] + x[4] > b0]
    for (s, c, text, _, _) in lines[-40:]:
        print("  step %4d conn %d: %s" % (s, c, text), file=sys.stderr)
    sys.exit(1)


last = (0, B)


def span():
    """A random range: near the previous one often (what a workload
    does: write, trim, zero, write and read the same blocks again), in
    the hot region most of the time, block aligned half the time,
    anywhere otherwise (aligned to A)."""
    global last
    off, n = pick()
    off -= off % A
    n = max(A, n - n % A)
    n = min(n, size - off)
    last = (off, n)
    return off, n


def pick():
    if rnd.random() < 0.4:
        # Inside the last range, or around it.
        loff, ln = last
        if rnd.random() < 0.5:
            off = loff + rnd.randrange(ln)
            return off, rnd.randint(1, loff + ln - off)
        off = max(0, loff - rnd.randrange(2 * B))
        return off, min(size - off, ln + rnd.randrange(4 * B))
    region = HOT if rnd.random() < 0.8 else size
    if rnd.random() < 0.5:
        off = rnd.randrange(region // B) * B
        n = rnd.randint(1, 16) * B
        if rnd.random() < 0.3:
            # Whole pages of the memory plugin (32K) and of caches.
            off = off // (8 * B) * (8 * B)
            n = rnd.randint(1, 4) * 8 * B
    else:
        off = rnd.randrange(region)
        n = rnd.randint(1, 3 * B if rnd.random() < 0.7 else 64 * 1024)
    return off, n


def payload(n):
    kind = rnd.randrange(4)
    if kind == 0:
        return bytes(n)
    out = bytearray()
    while len(out) < n:
        k = min(n - len(out), rnd.choice((512, 4096, 8192, 3000, 100)))
        if rnd.random() < 0.5:
            out += bytes(k)
        elif kind == 1:
            out += rnd.randbytes(k)
        else:
            out += bytes([rnd.randrange(1, 256)]) * k
    return bytes(out)


def undefine(off, n):
    defined[off:off + n] = bytes(n)


def set_bytes(off, buf):
    model[off:off + len(buf)] = buf
    defined[off:off + len(buf)] = b"\x01" * len(buf)


def check_read(step, off, got):
    n = len(got)
    if defined.find(0, off, off + n) == -1:
        if got == model[off:off + n]:
            return
    i = 0
    while i < n:
        if defined[off + i] and got[i] != model[off + i]:
            j = i
            while j < n and defined[off + j] and got[j] != model[off + j]:
                j += 1
            fail(step, "read %d+%d: bytes %d..%d differ: got %02x, model %02x"
                 " (%d wrong)" % (off, n, off + i, off + j - 1, got[i],
                                  model[off + i], j - i), off + i, j - i)
        i += 1


def check_extents(step, off, entries):
    """Every ZERO claim covers only zero or undefined bytes.  Returns
    where the reply ends."""
    pos = off
    for i in range(0, len(entries), 2):
        length, flags = entries[i], entries[i + 1]
        if length == 0:
            fail(step, "block status at %d: an extent of length 0" % pos)
        if flags & nbd.STATE_ZERO and not args.no_zero_check:
            e = min(pos + length, size)
            seg = model[pos:e]
            if seg.count(0) != len(seg):
                for j in range(pos, e):
                    if model[j] and defined[j]:
                        fail(step, "block status at %d: ZERO claimed for "
                             "%d+%d, but byte %d is %02x" %
                             (off, pos, length, j, model[j]), j, 1)
        pos += length
    return pos


class Window:
    """The error window: requests issued inside it may fail."""

    def __init__(self, on):
        self.on = on

    def __enter__(self):
        if self.on:
            open(args.error_file, "w").close()

    def __exit__(self, *exc):
        if self.on:
            os.unlink(args.error_file)
        return False


def do_op(step, c, kind, off, n):
    """Issue one request of KIND on connection C and check it against
    the model.  Returns False if it failed inside an error window."""
    global errors_seen
    h = hs[c]
    err_window = bool(args.error_file) and rnd.random() < args.error_rate
    text = kind
    try:
        with Window(err_window):
            if kind == "write":
                buf = payload(n)
                fl = nbd.CMD_FLAG_FUA if can_fua and rnd.random() < 0.1 else 0
                text = "write %d+%d (%s)%s" % (
                    off, n, "zeros" if buf.count(0) == n else
                    "data" if buf.count(0) == 0 else "mixed",
                    " fua" if fl else "")
                history.append((step, c, text, off, n))
                try:
                    h.pwrite(buf, off, fl)
                except nbd.Error:
                    undefine(off, n)
                    raise
                set_bytes(off, buf)
            elif kind == "zero":
                fl = 0
                if rnd.random() < 0.3:
                    fl |= nbd.CMD_FLAG_NO_HOLE
                if can_fast_zero and rnd.random() < 0.3:
                    fl |= nbd.CMD_FLAG_FAST_ZERO
                if can_fua and rnd.random() < 0.1:
                    fl |= nbd.CMD_FLAG_FUA
                text = "zero %d+%d%s%s%s" % (
                    off, n, " no_hole" if fl & nbd.CMD_FLAG_NO_HOLE else "",
                    " fast" if fl & nbd.CMD_FLAG_FAST_ZERO else "",
                    " fua" if fl & nbd.CMD_FLAG_FUA else "")
                history.append((step, c, text, off, n))
                try:
                    h.zero(n, off, fl)
                except nbd.Error as e:
                    if (fl & nbd.CMD_FLAG_FAST_ZERO) and \
                            e.errnum == errno.ENOTSUP:
                        history[-1] = (step, c, text + ": refused", off, n)
                        return True     # changed nothing
                    undefine(off, n)
                    raise
                set_bytes(off, bytes(n))
            elif kind == "trim":
                text = "trim %d+%d" % (off, n)
                history.append((step, c, text, off, n))
                undefine(off, n)
                h.trim(n, off)
            elif kind == "read":
                text = "read %d+%d" % (off, n)
                history.append((step, c, text, off, n))
                got = h.pread(n, off)
                check_read(step, off, got)
            elif kind == "block status":
                fl = nbd.CMD_FLAG_REQ_ONE if rnd.random() < 0.3 else 0
                if rnd.random() < 0.3:
                    off, n = 0, size
                text = "block status %d+%d%s" % (
                    off, n, " req_one" if fl else "")
                history.append((step, c, text, off, n))
                entries = []

                def cb(ctx, o, e, err):
                    if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                        entries.extend(e)
                h.block_status(n, off, cb, fl)
                end = check_extents(step, off, entries)
                if end <= off:
                    fail(step, "block status %d+%d made no progress" %
                         (off, n))
            elif kind == "cache":
                text = "cache %d+%d" % (off, n)
                history.append((step, c, text, off, n))
                h.cache(n, off)
            elif kind == "flush":
                text = "flush"
                history.append((step, c, text, 0, 0))
                h.flush()
    except nbd.Error as e:
        history[-1] = (step, c, "%s: error %s" % (text, e.errnum),
                       history[-1][3], history[-1][4])
        if not err_window:
            fail(step, "%s failed: %s" % (text, e))
        errors_seen += 1
        return False
    if err_window and args.errors_always and kind != "flush":
        fail(step, "%s: the injected error was not reported" % text)
    return True


def random_kind():
    r = rnd.random()
    if r < 0.30:
        return "write"
    if r < 0.50 and can_zero:
        return "zero"
    if r < 0.65 and can_trim:
        return "trim"
    if r < 0.85:
        return "read"
    if r < 0.95 and can_meta:
        return "block status"
    if r < 0.97 and can_cache:
        return "cache"
    return "flush" if can_flush else "read"


def episode():
    """What a guest and a copy do to the same blocks: write, discard,
    zero again, write a little, read: [(kind, off, n)], with random
    sizes and offsets in units of a random page (a block of the map:
    4K, or a layer's preferred block size such as the cache filter's
    64K; a page of the memory plugin is 32K)."""
    if not can_trim or not can_zero:
        return []
    page = rnd.choice((B, 8 * B, 16 * B))
    off = rnd.randrange(HOT // page) * page
    n = min(size - off, rnd.randint(1, 3) * page)
    zoff = off + rnd.randrange(max(1, n // page)) * page
    zn = rnd.randint(1, max(1, (off + n - zoff) // page)) * page
    zn = min(zn, off + n - zoff)
    woff = zoff + rnd.randrange(zn)
    steps = [("write", off, n), ("trim", off, n), ("zero", zoff, zn),
             ("write", woff, rnd.randint(1, min(100, zoff + zn - woff))),
             ("read", off, n)]
    return [(k, o - o % A, max(A, l - l % A)) for (k, o, l) in steps]


queue = []
for step in range(args.ops):
    if not queue and rnd.random() < 0.05:
        queue = episode()
    if queue:
        kind, off, n = queue.pop(0)
        n = min(n, size - off)
        last = (off, n)
    else:
        kind = random_kind()
        off, n = span()
    do_op(step, rnd.randrange(len(hs)), kind, off, n)

# Everything once more, on one connection and on another.
with Window(False):
    for i, h in enumerate(hs[:2]):
        for off in range(0, size, 1 << 20):
            n = min(1 << 20, size - off)
            history.append((args.ops, i, "final read %d+%d" % (off, n),
                            off, n))
            check_read(args.ops, off, h.pread(n, off))
        if can_meta:
            pos = 0
            while pos < size:
                entries = []

                def cb(ctx, o, e, err):
                    if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                        entries.extend(e)
                history.append((args.ops, i, "final block status %d" % pos,
                                pos, size - pos))
                h.block_status(size - pos, pos, cb)
                end = check_extents(args.ops, pos, entries)
                if end <= pos:
                    fail(args.ops, "final block status made no progress")
                pos = end

if args.expect_errors and errors_seen == 0:
    fail(args.ops, "errors were injected but no request failed")
for h in hs:
    h.shutdown()
print("%s: %d requests on %d connections, %d failed as injected: ok" %
      (label, args.ops, len(hs), errors_seen))
