"""Helpers for the test-write-*.sh tests (test-write-lib.sh puts this
directory on PYTHONPATH: `from wlib import *`)."""
import errno
import os
import random
import re
import sys

import nbd

from extents import data_ranges  # noqa: F401 (for the tests)

B = 4096


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def check(cond, msg):
    if not cond:
        fail(msg)


def connect(uri):
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    return h


_rnd = random.Random(0x5BAC)


def data(n, rnd=_rnd):
    """N bytes none of which is zero."""
    return bytes(rnd.randrange(1, 256) for _ in range(n))


def zeros(n):
    return bytes(n)


def expect_error(what, errnum, fn, *args):
    """Call fn(*args); it must fail with nbd.Error and errno ERRNUM."""
    try:
        fn(*args)
    except nbd.Error as e:
        check(e.errnum == errnum,
              "%s: expected %s, got errnum %s (%s)" %
              (what, errno.errorcode.get(errnum, errnum), e.errnum, e))
        return e
    fail("%s: succeeded, expected %s" %
         (what, errno.errorcode.get(errnum, errnum)))


# ---- block status -----------------------------------------------------

def extents(h, off, count):
    """[(offset, length, flags)] from base:allocation covering [off,
    off+count), asking again until the whole range is covered."""
    out = []
    end = off + count
    while off < end:
        got = []

        def cb(meta, o, ents, err):
            if meta == nbd.CONTEXT_BASE_ALLOCATION:
                got.append((o, list(ents)))
            return 0
        h.block_status(min(end - off, 1 << 30), off, cb)
        check(got, "block_status returned nothing at %#x" % off)
        o, ents = got[0]
        check(o == off, "block_status answered for %#x, asked %#x" % (o, off))
        check(len(ents) >= 2, "block_status: no entries at %#x" % off)
        pos = off
        for i in range(0, len(ents), 2):
            length, flags = ents[i], ents[i + 1]
            check(length > 0, "block_status: zero-length extent at %#x" % pos)
            out.append((pos, length, flags))
            pos += length
        off = pos
    return out


def zero_claims(h, off, count):
    """[(offset, length)] that block status reports as NBD_STATE_ZERO."""
    res = []
    for o, l, f in extents(h, off, count):
        if f & nbd.STATE_ZERO:
            s, e = max(o, off), min(o + l, off + count)
            if s < e:
                res.append((s, e - s))
    return res


def is_zero_claimed(h, off, count):
    """True if block status says every byte of the range reads as zero."""
    covered = sum(l for _, l in zero_claims(h, off, count))
    return covered == count


def check_zero_claims(h, off, count, content=None, what=""):
    """Every range block status reports as ZERO must really read as zero.
    CONTENT: the range's actual bytes if already read (else read them)."""
    if content is None:
        content = read_all(h, off, count)
    for o, l in zero_claims(h, off, count):
        piece = content[o - off:o - off + l]
        if piece.count(0) != len(piece):
            bad = next(i for i, c in enumerate(piece) if c)
            fail("%sblock status claims ZERO over [%#x, +%#x) but byte %#x "
                 "reads %#x" % (what and what + ": ", o, l, o + bad,
                                piece[bad]))


def read_all(h, off, count, chunk=4 << 20):
    out = bytearray()
    while count > 0:
        n = min(count, chunk)
        out += h.pread(n, off)
        off += n
        count -= n
    return bytes(out)


# ---- the log filter ----------------------------------------------------

_call_re = re.compile(r"connection=\d+ (\w+) id=(\d+) (.*?) ?\.\.\.$")


class Log:
    """Requests seen by nbdkit's log filter (placed below sparsebackup)."""

    def __init__(self, path):
        self.path = path
        self.pos = 0

    def _lines(self):
        with open(self.path) as f:
            return f.read().splitlines()

    def mark(self):
        self.pos = len(self._lines())

    def new(self, ops=("Read", "Write", "Zero", "Trim", "Flush",
                       "Extents", "Cache")):
        """Calls logged since the last mark()/new(), as dicts:
        {'op': 'Zero', 'offset': int, 'count': int, 'trim': 0/1, ...}."""
        lines = self._lines()
        new, self.pos = lines[self.pos:], len(lines)
        out = []
        for line in new:
            m = _call_re.search(line)
            if not m or m.group(1) not in ops:
                continue
            d = {"op": m.group(1), "line": line}
            for kv in m.group(3).split():
                if "=" in kv:
                    k, v = kv.split("=", 1)
                    try:
                        d[k] = int(v, 0)
                    except ValueError:
                        d[k] = v
            out.append(d)
        return out


def fmt(reqs):
    return "\n".join("    " + r["line"].split(" ", 2)[2] for r in reqs) or \
        "    (none)"


def expect_requests(what, reqs, expected, ops=("Write", "Zero", "Trim")):
    """EXPECTED: list of (op, offset, count, {field: value}) in any order.
    Only requests whose op is in OPS are compared."""
    got = sorted(((r["op"], r["offset"], r["count"], r) for r in reqs
                  if r["op"] in ops), key=lambda t: (t[1], t[0]))
    exp = sorted(expected, key=lambda t: (t[1], t[0]))
    ok = len(got) == len(exp)
    if ok:
        for (op, o, c, r), e in zip(got, exp):
            fields = e[3] if len(e) > 3 else {}
            if (op, o, c) != tuple(e[:3]) or \
               any(r.get(k) != v for k, v in fields.items()):
                ok = False
    if not ok:
        fail("%s: the plugin saw:\n%s\nexpected:\n%s" % (
            what, fmt([t[3] for t in got]),
            "\n".join("    %s offset=%#x count=%#x %s" %
                      (e[0], e[1], e[2],
                       " ".join("%s=%s" % kv for kv in
                                (e[3] if len(e) > 3 else {}).items()))
                      for e in exp) or "    (none)"))


# ---- files --------------------------------------------------------------

def data_in(path, off, count):
    """Bytes of [off, off+count) in data extents of PATH."""
    total = 0
    for o, l in data_ranges(path):
        s, e = max(o, off), min(o + l, off + count)
        if s < e:
            total += e - s
    return total


def nonzero_blocks(buf, bs=B):
    return sum(1 for i in range(0, len(buf), bs)
               if buf[i:i + bs].count(0) != len(buf[i:i + bs]))
