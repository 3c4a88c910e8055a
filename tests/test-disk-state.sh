#!/usr/bin/env bash
# The filter's one disk state, against the corners an adversarial review
# found in the per-export maps it replaced:
#  1. a map created while a write is in flight must hear of it (the write
#     is slowed down by the delay filter below; the reader is the first
#     connection to the default export, so it creates the map mid-write);
#  2. block sizes: never advertise more than nbdkit serves in one request
#     (nbdinfo --map of an export of 4 GiB or more aborted nbdkit 1.32.5);
#  3. an explicit sparsebackup-block-size above the plugin's maximum block
#     size is refused with both sizes named;
#  4. the map's memory is bounded (sparsebackup-map-memory=), whatever the
#     client writes, and what it forgets is counted.
source "${srcdir:-.}/functions.sh"
# The Python parts import nbdlib.py (next to functions.sh).
export PYTHONPATH="$_functions_dir${PYTHONPATH:+:$PYTHONPATH}"
requires_nbdsh
requires nbdinfo --version
requires_filter sparsebackup
requires_filter delay
requires_filter blocksize-policy
requires_plugin null

# 1. A write in flight through another export name; the default export's
#    map is created meanwhile and reads the block.  Once the write is
#    done the map must not answer zero over it, from reads, extents or
#    (scan=always) the scan cache.
cat > "$tmp/inflight.py" <<'PY'
import nbd, sys, time
sock = sys.argv[1]
from nbdlib import connect, zero_flags
def conn(name): return connect(sock, name)
data = b"\xa5" * 65536
a = conn("writer")
buf = nbd.Buffer.from_bytearray(bytearray(data))
cookie = a.aio_pwrite(buf, 0)
time.sleep(0.5)                        # the write sleeps in the delay filter
b = conn("")                           # creates the map, mid-write
early = b.pread(65536, 0)
zero_flags(b, 0, 65536)                # extents (and scans) mid-write
while not a.aio_command_completed(cookie):
    a.poll(1)
got = b.pread(65536, 0)
assert got == data, "the map served %r after the write completed" % got[:4]
assert not zero_flags(b, 0, 65536), "the map claims zero over data"
assert conn("").pread(65536, 0) == data
print("in flight: ok (mid-write read saw %s)" %
      ("old zeros" if early == bytes(65536) else "new data"))
PY
for scan in auto always; do
    start_nbdkit --filter=sparsebackup --filter=delay memory 1M wdelay=2 \
        sparsebackup-scan=$scan
    "$nbd_python" "$tmp/inflight.py" "$sock" ||
        { cat "$server_log" >&2; fail "scan=$scan: write in flight missed"; }
    stop_nbdkit
done

# 2. A 5 GiB export: nbdinfo --map works and the exact map is printed;
#    the advertised maximum is what nbdkit serves (64 MiB).
nbdkit -U - --filter=sparsebackup memory 5G \
    --run 'nbdinfo --map "$uri"; nbdinfo "$uri"' > "$tmp/map.out" 2>&1 ||
    { cat "$tmp/map.out" >&2; fail "nbdinfo over a 5 GiB export failed"; }
assert_eq "0  5368709120  3  hole,zero" \
    "$(grep -E '^ *0 ' "$tmp/map.out" | sed -E 's/^ +//; s/ +/  /g')" \
    "nbdinfo --map of a 5 GiB empty disk"
assert_contains "$tmp/map.out" "block_size_maximum: 67108864"
# A plugin's own larger maximum is clipped to it too.
nbdkit -U - --filter=sparsebackup --filter=blocksize-policy memory 5G \
    blocksize-minimum=512 blocksize-preferred=4K blocksize-maximum=1G \
    --run 'nbdinfo "$uri"' > "$tmp/info.out" 2>&1 ||
    { cat "$tmp/info.out" >&2; fail "nbdinfo with blocksize-policy failed"; }
if grep -E 'block_size_maximum: ([0-9]+)' "$tmp/info.out" |
        awk '{ exit !($2 > 67108864) }'; then
    fail "a maximum block size over 64 MiB was advertised"
fi

# 3. An explicit block size larger than the plugin's maximum.
start_nbdkit --filter=sparsebackup --filter=blocksize-policy memory 1M \
    blocksize-minimum=512 blocksize-preferred=4K blocksize-maximum=64K \
    sparsebackup-block-size=1M
if nbdsh -u "nbd+unix:///?socket=$sock" -c 'h.pread(512, 0)' \
        > "$tmp/bs.out" 2>&1; then
    fail "a map block size above the plugin's maximum was accepted"
fi
stop_nbdkit
assert_contains "$server_log" \
    "sparsebackup-block-size: 1048576 is larger than the plugin's maximum block size 65536"

# 4. Alternating 4K data and zero blocks, 1 GiB of them in 32 MiB writes
#    over a 1 TiB null disk, with a 1 MiB budget: one run per block would
#    need about 3 MiB.
stats="$tmp/stats"
start_nbdkit --filter=sparsebackup null 1T sparsebackup-map-memory=1M \
    sparsebackup-statsfile="$stats"
nbdsh -u "nbd+unix:///?socket=$sock" -c '
pattern = (b"\x01" * 4096 + bytes(4096)) * 4096
for i in range(32):
    h.pwrite(pattern, i * len(pattern))
' || fail "the writes failed"
stop_nbdkit
cat "$stats"
mem=$(sed -n 's/^map-memory: //p' "$stats")
forgot=$(sed -n 's/^map-forgotten-bytes: //p' "$stats")
[ "$mem" -le 1048576 ] || fail "map-memory $mem is over the 1M budget"
[ "$forgot" -gt 0 ] || fail "map-forgotten-bytes is $forgot"
assert_eq 1048576 "$(sed -n 's/^map-budget: //p' "$stats")" "map-budget"

# The budget is a size, at least 64K.
if nbdkit -U - --filter=sparsebackup null 1M sparsebackup-map-memory=1K \
        --run true > "$tmp/small.out" 2>&1; then
    fail "sparsebackup-map-memory=1K was accepted"
fi
assert_contains "$tmp/small.out" \
    "sparsebackup-map-memory: '1K' is smaller than the minimum, 64K"
echo "$0: OK"
