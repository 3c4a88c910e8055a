#!/usr/bin/env python3
"""Block status of an export with extents longer than 4 GiB
(test-extents-64bit.sh).

    extents64.py URI EXPECTED-FILE

EXPECTED-FILE holds the exact map of the export, merged runs
"OFFSET LENGTH FLAGS" (FLAGS & 3: 1 hole, 2 zero).

1. 32-bit requests: the whole export is walked with requests of
   4 GiB - 64 KiB (so their offsets drift across the runs); each reply
   must start at its offset, be contiguous, cover the whole request and,
   cut to the request, equal the expected map cut there.
2. 64-bit: if extended headers were negotiated, ONE block_status_64
   request of the whole export: its reply must equal the expected map
   (cut where the reply ends) and answer more than 4 GiB, with at least
   one extent of 4 GiB or more (the expected maps have runs of 6-16 GiB).
   Without extended headers this part cannot run: the script says why and
   exits 77 after part 1 passed.

Exits 0, 1 (with the differences) or 77.
"""
import sys

import nbd

FOUR_G = 1 << 32
STEP = FOUR_G - (64 << 10)


def load(path):
    runs = []
    with open(path) as f:
        for line in f:
            if line.strip():
                o, n, t = (int(x) for x in line.split())
                runs.append((o, n, t))
    return runs


def merge(runs):
    out = []
    for o, n, t in runs:
        if n == 0:
            continue
        if out and out[-1][2] == t and out[-1][0] + out[-1][1] == o:
            out[-1] = (out[-1][0], out[-1][1] + n, t)
        else:
            out.append((o, n, t))
    return out


def cut(runs, a, b):
    out = []
    for o, n, t in runs:
        lo, hi = max(o, a), min(o + n, b)
        if lo < hi:
            out.append((lo, hi - lo, t))
    return merge(out)


def fmt(runs):
    return "\n".join("  %14d %14d %d" % r for r in runs) or "  (none)"


def block_status(h, count, offset):
    """The extents of one request: [(offset, length, flags & 3)]."""
    got = []

    def cb64(ctx, off, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            pos = off
            for length, flags in entries:
                got.append((pos, length, flags & 3))
                pos += length
        return 0

    def cb32(ctx, off, entries, err):
        if ctx == nbd.CONTEXT_BASE_ALLOCATION:
            pos = off
            for i in range(0, len(entries), 2):
                got.append((pos, entries[i], entries[i + 1] & 3))
                pos += entries[i]
        return 0
    if hasattr(h, "block_status_64"):       # libnbd >= 1.18
        h.block_status_64(count, offset, cb64)
    else:
        h.block_status(count, offset, cb32)
    return got


def check_reply(what, got, offset, want_all, end):
    if not got:
        return "%s: empty reply" % what
    pos = offset
    for o, n, t in got:
        if o != pos or n == 0:
            return "%s: reply not contiguous from %d:\n%s" % (
                what, offset, fmt(got))
        pos += n
    if pos < end:
        return "%s: the reply covers [%d, %d) of [%d, %d)" % (
            what, offset, pos, offset, end)
    if cut(got, offset, end) != cut(want_all, offset, end):
        return "%s: expected\n%s\ngot\n%s" % (
            what, fmt(cut(want_all, offset, end)), fmt(cut(got, offset, end)))
    return None


def main():
    uri, expected = sys.argv[1], sys.argv[2]
    want = merge(load(expected))
    h = nbd.NBD()
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_uri(uri)
    size = h.get_size()
    if sum(n for _, n, _ in want) != size or want[0][0] != 0:
        print("extents64: the expected map does not cover the export "
              "(size %d)" % size, file=sys.stderr)
        return 1
    if not h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION):
        print("extents64: %s: no base:allocation" % uri, file=sys.stderr)
        return 1

    # 1. 32-bit requests.
    walked = []
    pos = 0
    nreq = 0
    while pos < size:
        count = min(STEP, size - pos)
        got = block_status(h, count, pos)
        err = check_reply("request %d@%d" % (count, pos), got, pos, want,
                          pos + count)
        if err:
            print("extents64: %s: %s" % (uri, err), file=sys.stderr)
            return 1
        walked += cut(got, pos, pos + count)
        pos += count
        nreq += 1
    if merge(walked) != want:
        print("extents64: %s: the walk gives\n%s\nexpected\n%s" % (
            uri, fmt(merge(walked)), fmt(want)), file=sys.stderr)
        return 1
    print("%s: %d requests of at most %d bytes: as expected" % (
        uri, nreq, STEP))

    # 2. One 64-bit request.
    if not hasattr(h, "get_extended_headers_negotiated"):
        print("%s: libnbd %s has no extended headers (1.18 and later "
              "have): the 64-bit part is skipped" % (uri, h.get_version()))
        return 77
    if not h.get_extended_headers_negotiated():
        print("%s: the server did not negotiate extended headers (libnbd "
              "%s asked for them): no block status request of 4 GiB or "
              "more can be sent, the 64-bit part is skipped" % (
                  uri, h.get_version()))
        return 77
    got = block_status(h, size, 0)
    end = got[-1][0] + got[-1][1] if got else 0
    err = check_reply("one request of %d bytes" % size, got, 0, want,
                      min(end, size))
    if err:
        print("extents64: %s: %s" % (uri, err), file=sys.stderr)
        return 1
    if end <= FOUR_G or max(n for _, n, _ in got) < FOUR_G:
        print("extents64: %s: one request of %d bytes answered %d bytes, "
              "longest extent %d: no extent of 4 GiB or more\n%s" % (
                  uri, size, end, max(n for _, n, _ in got), fmt(got)),
              file=sys.stderr)
        return 1
    print("%s: one request of %d bytes answered %d bytes in %d extents "
          "(longest %d): as expected" % (
              uri, size, end, len(got), max(n for _, n, _ in got)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
