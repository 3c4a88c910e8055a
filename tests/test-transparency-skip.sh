#!/usr/bin/env bash
# Issue 19, item 6: what a request the filter answers itself does with
# the errors of the layers below (the decision, documented in the man
# page).  A request answered by the filter does not reach the plugin, so
# neither do the plugin's errors, and the client gets what it asked for:
#
# - a zero request (or a zero write) over blocks known to read as zero
#   succeeds at once, even on a disk that is full (nbdkit's full plugin:
#   every write fails with ENOSPC; nbdkit's test-full.sh) or whose zero
#   requests fail (nbdkit's error filter; libnbd's copy-nbd-error): the
#   range reads as zero;
# - a zero request with NO_HOLE (provisioning) is never skipped: its
#   error is reported; so is the error of a write of data;
# - a read of known-zero blocks succeeds even where a layer below would
#   refuse it (nbdkit's blocksize-policy filter, error policy, misaligned
#   reads; nbdkit's test-blocksize-error-policy.sh); a misaligned read of
#   data reaches that layer and gets its EINVAL.
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_plugin full
requires_filter error
requires_filter blocksize-policy

# The full plugin: reads as zero, every write fails with ENOSPC.
start_nbdkit --filter=sparsebackup full 1M
nbdsh --base-allocation -u "$uri" -c '
import errno
def fails(errnum, fn, *args):
    try:
        fn(*args)
    except nbd.Error as e:
        assert e.errnum == errnum, e
        return
    assert False, "%s%r succeeded" % (fn.__name__, args)

h.zero(65536, 0)                        # known zero: skipped, success
h.pwrite(bytes(65536), 65536)           # zero blocks, known zero: skipped
fails(errno.ENOSPC, h.zero, 65536, 0, nbd.CMD_FLAG_NO_HOLE)
fails(errno.ENOSPC, h.pwrite, b"x" * 4096, 0)
assert h.pread(1 << 20, 0) == bytes(1 << 20)
' || fail "the full plugin"
stop_nbdkit

# Zero requests fail below (error-zero-rate=100%): known zero succeeds.
start_nbdkit --filter=sparsebackup --filter=error memory 1M \
    error-zero-rate=100% error-zero=EIO
nbdsh -u "$uri" -c '
import errno
h.zero(1 << 20, 0)
try:
    h.zero(4096, 0, nbd.CMD_FLAG_NO_HOLE)
    assert False, "NO_HOLE zero succeeded"
except nbd.Error as e:
    assert e.errnum == errno.EIO, e
assert h.pread(1 << 20, 0) == bytes(1 << 20)
' || fail "zero requests failing below"
stop_nbdkit

# A layer below that refuses misaligned requests.
start_nbdkit --filter=sparsebackup --filter=blocksize-policy memory 1M \
    blocksize-minimum=512 blocksize-error-policy=error
export uri
nbdsh -c '
import errno, os
h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(os.environ["uri"])
h.pwrite(b"x" * 512, 8192)
h.block_status(1 << 20, 0, lambda *args: 0)   # the map learns the zeros
assert h.pread(100, 65537) == bytes(100)    # known zero: answered
try:
    h.pread(100, 8193)                  # data: reaches the policy
    assert False, "misaligned read of data succeeded"
except nbd.Error as e:
    assert e.errnum == errno.EINVAL, e
' || fail "misaligned requests"
stop_nbdkit
echo "$0: OK"
