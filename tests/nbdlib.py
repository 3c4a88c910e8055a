"""Small libnbd helpers for the Python parts of the shell tests.

The tests put this directory ($_functions_dir of functions.sh) on
PYTHONPATH and import what they need:

    from nbdlib import connect, zero_flags, zero_claimed
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
