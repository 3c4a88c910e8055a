"""Small libnbd helpers for the Python parts of the shell tests.

The tests put this directory ($_functions_dir of functions.sh) on
PYTHONPATH and import what they need:

    from nbdlib import connect, zero_flags, zero_claimed, extents
"""
import nbd


def connect(sock, name):
    """A handle connected to export NAME on the Unix socket SOCK, asking
    for base:allocation."""
    h = nbd.NBD()
    h.set_export_name(name)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock)
    return h


def zero_flags(h, off, length):
    """The flags with NBD_STATE_ZERO among the extents that one block
    status request over [OFF, OFF+LENGTH) returns."""
    seen = []

    def cb(ctx, o, entries, err):
        seen.extend(entries[1::2])
    h.block_status(length, off, cb)
    return [f for f in seen if f & nbd.STATE_ZERO]


def zero_claimed(h, off, length):
    """[(offset, length)] of the extents claiming NBD_STATE_ZERO that
    overlap [OFF, OFF+LENGTH), from one block status request."""
    seen = []

    def cb(ctx, o, entries, err):
        pos = o
        for i in range(0, len(entries), 2):
            if entries[i + 1] & nbd.STATE_ZERO and pos < off + length and \
                    pos + entries[i] > off:
                seen.append((pos, entries[i]))
            pos += entries[i]
    h.block_status(length, off, cb)
    return seen


def extents(h):
    """Every base:allocation extent of the export of handle H (connected
    with the context), in order: a list of (offset, length, flags & 3),
    walked with block status requests of at most 1 GiB."""
    size = h.get_size()
    pos = 0
    out = []
    while pos < size:
        got = []

        def cb(ctx, o, e, err):
            if ctx == nbd.CONTEXT_BASE_ALLOCATION:
                got.extend(e)
        h.block_status(min(size - pos, 1 << 30), pos, cb)
        for i in range(0, len(got), 2):
            out.append((pos, got[i], got[i + 1] & 3))
            pos += got[i]
    return out
