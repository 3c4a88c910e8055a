#!/usr/bin/env bash
# Every map sees every change.  The plugin may serve one disk under
# several export names (memory and file ignore the name), and a disk that
# changed size keeps its old map in use by old connections: a write
# through one must never leave another map claiming zero over the data.
# The number of maps is bounded.
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_filter sparsebackup

cat > "$tmp/names.py" <<'PY'
import nbd, sys
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD(); h.set_export_name(name)
    h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    h.connect_unix(sock); return h
def zero_claimed(h, off, length):
    seen = []
    def cb(ctx, o, entries, err):
        pos = o
        for i in range(0, len(entries), 2):
            if entries[i + 1] & nbd.STATE_ZERO and pos < off + length and pos + entries[i] > off:
                seen.append((pos, entries[i]))
            pos += entries[i]
    h.block_status(length, off, cb)
    return seen
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

# The number of maps is bounded: idle maps are dropped, and when every map
# is in use a new export name is refused with a clear error.
cat > "$tmp/many.py" <<'PY'
import nbd, sys
sock = sys.argv[1]
def conn(name):
    h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock); return h
for i in range(100):                  # sequential: maps go idle and are reused
    h = conn("idle%d" % i)
    h.pread(512, 0)
    h.shutdown()
held = [conn("busy%d" % i) for i in range(16)]
try:
    conn("one-too-many")
except nbd.Error as e:
    print("refused:", e)
else:
    raise SystemExit("a 17th export map was accepted")
held[0].shutdown()
del held[0]
import time
for _ in range(50):                   # the server closes the connection asynchronously
    try:
        conn("now-fits").pread(512, 0)
        break
    except nbd.Error:
        time.sleep(0.1)
else:
    raise SystemExit("a freed map slot was not reused")
print("bounded: ok")
PY
start_nbdkit --filter=sparsebackup memory 1M
"$nbd_python" "$tmp/many.py" "$sock"
assert_contains "$server_log" "cannot serve export 'one-too-many': 16 export maps are in use at once"
