#!/usr/bin/env bash
# The filter over every nbdkit filter that caches or transforms, checked
# against a byte model: one connection, sequential random writes (data,
# zero blocks, mixed), zero requests, trims, reads and block status.
# Every read must match the model (trimmed bytes are undefined until they
# are written again), and every ZERO extent must be zero in the model.
#
# nbdkit's cache filter (writeback, unsafe) reports the plugin's extents
# while dirty blocks are only in its cache: its extents say zero over
# data.  The map must believe the data it saw written, not those extents.
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_filter sparsebackup
for f in cache cow cacheextents readahead blocksize; do
    requires_filter $f
done

cat > "$tmp/model.py" <<'PY'
import nbd, random, sys
sock, seed = sys.argv[1], int(sys.argv[2])
rnd = random.Random(seed)
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_unix(sock)
size = h.get_size()
model = bytearray(size)
defined = bytearray(b"\x01") * size      # 0: trimmed, undefined
B = 4096

def span():
    if rnd.random() < 0.5:                 # block aligned
        off = rnd.randrange(size // B) * B
        n = rnd.randint(1, 16) * B
    else:
        off = rnd.randrange(size)
        n = rnd.randint(1, 40000)
    return off, min(n, size - off)

def payload(n):
    kind = rnd.randrange(3)
    if kind == 0:
        return bytes(n)
    out = bytearray()
    while len(out) < n:
        k = min(n - len(out), rnd.choice((512, 4096, 8192, 3000)))
        out += bytes(k) if rnd.random() < 0.5 else rnd.randbytes(k) \
            if kind == 1 else bytes([rnd.randrange(1, 256)]) * k
    return bytes(out)

def check_read(off, n, what):
    got = h.pread(n, off)
    for i in range(n):
        if defined[off + i] and got[i] != model[off + i]:
            sys.exit("seed %d: %s: byte %d differs: got %d, model %d" %
                     (seed, what, off + i, got[i], model[off + i]))

def check_extents(off, n):
    zeros = []
    def cb(ctx, o, entries, err):
        pos = o
        for i in range(0, len(entries), 2):
            if entries[i + 1] & nbd.STATE_ZERO:
                zeros.append((pos, entries[i]))
            pos += entries[i]
    h.block_status(n, off, cb)
    for (o, l) in zeros:
        e = min(o + l, size)
        for i in range(o, e):
            if defined[i] and model[i]:
                sys.exit("seed %d: ZERO extent %d+%d over data at %d" %
                         (seed, o, l, i))

for step in range(400):
    op = rnd.randrange(10)
    off, n = span()
    if op < 4:
        buf = payload(n)
        h.pwrite(buf, off)
        model[off:off + n] = buf
        defined[off:off + n] = b"\x01" * n
    elif op < 6 and h.can_zero():
        flags = rnd.choice((0, nbd.CMD_FLAG_NO_HOLE))
        h.zero(n, off, flags)
        model[off:off + n] = bytes(n)
        defined[off:off + n] = b"\x01" * n
    elif op == 6 and h.can_trim():
        h.trim(n, off)
        defined[off:off + n] = bytes(n)
    elif op < 9:
        check_read(off, n, "step %d read" % step)
    else:
        check_extents(off, n)
    if step % 50 == 49:
        h.flush()
check_read(0, size, "final read")
check_extents(0, size)
print("seed %d: ok" % seed)
PY

# FILTER:PARAMETERS
stacks=(
    "cache:cache=writeback"
    "cache:cache=writethrough"
    "cache:cache=unsafe"
    "cow:"
    "cacheextents:"
    "readahead:"
    "blocksize:minblock=4K maxdata=64K"
)
for stack in "${stacks[@]}"; do
    below=${stack%%:*} params=${stack#*:}
    for scan in auto always; do
        for seed in 1 2 3; do
            # shellcheck disable=SC2086
            start_nbdkit --filter=sparsebackup --filter=$below memory 2M \
                $params sparsebackup-scan=$scan
            "$nbd_python" "$tmp/model.py" "$sock" $seed ||
                { cat "$server_log" >&2; fail "stack '$stack' scan=$scan"; }
            stop_nbdkit
        done
    done
done
echo "$0: OK"
