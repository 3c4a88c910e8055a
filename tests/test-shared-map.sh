#!/usr/bin/env bash
# One disk state sees every change.  The plugin may serve one disk under
# several export names (memory and file ignore the name): connections to
# names other than the default export are passed through, and a write
# through any of them must never leave the map claiming zero over the
# data.  A disk that changed size resets the map; connections of the old
# size keep working.
source "${srcdir:-.}/functions.sh"
# The Python parts import nbdlib.py (next to functions.sh).
export PYTHONPATH="$_functions_dir${PYTHONPATH:+:$PYTHONPATH}"
requires_nbdsh
requires_filter sparsebackup

cat > "$tmp/names.py" <<'PY'
import nbd, sys
sock = sys.argv[1]
from nbdlib import connect, zero_claimed
def conn(name): return connect(sock, name)
a = conn("a")
assert a.pread(4096, 0) == bytes(4096)        # map "a" learns block 0 zero
assert zero_claimed(a, 0, 4096)
b = conn("b")
b.pwrite(b"\xab" * 4096, 0)
b.flush()
got = a.pread(4096, 0)
assert got == b"\xab" * 4096, "map 'a' served stale zeroes: %r" % got[:4]
assert not zero_claimed(a, 0, 4096), "map 'a' claims zero over data"
c = conn("a")
assert c.pread(4096, 0) == b"\xab" * 4096
assert not zero_claimed(c, 0, 4096)
# A trim through "b" never makes "a" claim zero (memory trims do zero,
# but the filter may only learn that by asking again).
b.trim(4096, 0)
for h in (a, c):
    got = h.pread(4096, 0)
    claimed = zero_claimed(h, 0, 4096)
    assert not claimed or got == bytes(4096), "zero claimed over data"
# A failed-or-not zero through "b" is not trusted by "a" unless "a" sees it.
b.pwrite(b"\xcd" * 8192, 8192)
b.zero(4096, 8192)
assert a.pread(8192, 8192) == bytes(4096) + b"\xcd" * 4096
print("export names: ok")
PY
start_nbdkit --filter=sparsebackup memory 1M
"$nbd_python" "$tmp/names.py" "$sock"

# A disk that changes size: the old connection's writes reach the new map.
truncate -s 1M "$tmp/r.img"
cat > "$tmp/resize.py" <<'PY'
import nbd, os, sys
sock, img = sys.argv[1], sys.argv[2]
def conn():
    h = nbd.NBD(); h.connect_unix(sock); return h
a = conn()
assert a.get_size() == 1 << 20
os.truncate(img, 2 << 20)
b = conn()
assert b.get_size() == 2 << 20
assert b.pread(4096, 0) == bytes(4096)        # the new map learns zero
a.pwrite(b"\xcd" * 4096, 0)
a.flush()
assert b.pread(4096, 0) == b"\xcd" * 4096, "new map served stale zeroes"
assert conn().pread(4096, 0) == b"\xcd" * 4096
# And the other way round: the new connection's write reaches the old map.
assert a.pread(4096, 65536) == bytes(4096)
b.pwrite(b"\xef" * 4096, 65536)
b.flush()
assert a.pread(4096, 65536) == b"\xef" * 4096, "old map served stale zeroes"
print("size change: ok")
PY
start_nbdkit --filter=sparsebackup file "$tmp/r.img"
"$nbd_python" "$tmp/resize.py" "$sock" "$tmp/r.img"
[ "$(od -An -tx1 -N4 "$tmp/r.img" | tr -d ' ')" = cdcdcdcd ] ||
    fail "the file does not hold what was written"

# One disk state: only the default export uses the map; any number of
# other names are passed through (no limit, no "no export named" error),
# and their writes still reach the map of the default export.
cat > "$tmp/many.py" <<'PY'
import nbd, sys
sock = sys.argv[1]
from nbdlib import connect
def conn(name): return connect(sock, name)
held = [conn("busy%d" % i) for i in range(40)]
d = conn("")                          # the default export: the map
assert d.pread(4096, 0) == bytes(4096)  # learns block 0 zero
held[7].pwrite(b"\x5a" * 4096, 0)     # a passed-through name writes
held[7].flush()
assert d.pread(4096, 0) == b"\x5a" * 4096, "the map served stale zeroes"
seen = []
def cb(ctx, o, entries, err):
    seen.extend(entries[1::2])
d.block_status(4096, 0, cb)
assert not any(f & nbd.STATE_ZERO for f in seen), "zero claimed over data"
for h in held:
    assert h.pread(4096, 0) == b"\x5a" * 4096
print("any number of export names: ok")
PY
start_nbdkit -v --filter=sparsebackup memory 1M
"$nbd_python" "$tmp/many.py" "$sock"
assert_contains "$server_log" "export 'busy39' is not the default export: passed through"
