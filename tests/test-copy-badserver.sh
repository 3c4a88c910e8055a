#!/usr/bin/env bash
# sparsebackup-copy against a server that breaks the rules of block status
# (a small NBD server in Python, since nbdkit itself cleans up what its
# plugins report): extents past the range asked for and past the end of
# the export, zero-length extents, a reply that makes no progress.  The
# copy must not crash: it clips, ignores, or fails with exit status 1.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires python3 --version

size=$((1024 * 1024 + 123))

cat > "$tmp/server.py" <<'PY'
"""A minimal NBD server (fixed newstyle, structured replies,
base:allocation, read-only) on a Unix socket.  One connection, then exit.
The export holds byte (offset % 251); [0, 512K) is data, the rest reads
as zero and is reported HOLE|ZERO.  MODE breaks block status:
  beyond      the first extent is 1M longer than asked (past the end)
  zerolen     zero-length extents before and between the real ones
  noprogress  only a zero-length extent
"""
import os, socket, struct, sys

path, mode, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
DATA_END = 512 * 1024
OPT_MAGIC, REP_MAGIC = 0x49484156454F5054, 0x3e889045565a9
REQ_MAGIC, SREP_MAGIC = 0x25609513, 0x668e33ef

def content(off, n):
    return bytes((o % 251) if o < DATA_END else 0 for o in range(off, off + n))

def recvn(c, n):
    b = b""
    while len(b) < n:
        x = c.recv(n - len(b))
        if not x:
            sys.exit(0)
        b += x
    return b

def opt_reply(c, opt, typ, data=b""):
    c.sendall(struct.pack(">QIII", REP_MAGIC, opt, typ, len(data)) + data)

def chunk(c, flags, typ, handle, payload):
    c.sendall(struct.pack(">IHHQI", SREP_MAGIC, flags, typ, handle,
                          len(payload)) + payload)

def extents(off, count):
    end = min(off + count, size)
    out = []
    if off < DATA_END:
        out.append((min(end, DATA_END) - off, 0))
    if end > DATA_END:
        out.append((end - max(off, DATA_END), 3))
    if mode == "beyond":
        out[0] = (out[0][0] + (1 << 20), out[0][1])
    elif mode == "zerolen":
        out = [(0, 0)] + [x for e in out for x in (e, (0, 3))]
    elif mode == "noprogress":
        out = [(0, 0)]
    return out

s = socket.socket(socket.AF_UNIX)
# bound and listening under a temporary name, then renamed: a client
# waiting for PATH never finds it refusing connections
s.bind(path + ".tmp")
s.listen(1)
os.rename(path + ".tmp", path)
c, _ = s.accept()
c.sendall(b"NBDMAGIC" + struct.pack(">QH", OPT_MAGIC, 1 | 2))
recvn(c, 4)
meta_id = 0
while True:
    magic, opt, ln = struct.unpack(">QII", recvn(c, 16))
    data = recvn(c, ln)
    if opt == 8:                                    # STRUCTURED_REPLY
        opt_reply(c, opt, 1)
    elif opt == 10:                                 # SET_META_CONTEXT
        nl = struct.unpack(">I", data[:4])[0]
        p = 4 + nl
        nq = struct.unpack(">I", data[p:p + 4])[0]
        p += 4
        for _ in range(nq):
            ql = struct.unpack(">I", data[p:p + 4])[0]
            q = data[p + 4:p + 4 + ql]
            p += 4 + ql
            if q == b"base:allocation":
                meta_id = 1
                opt_reply(c, opt, 4, struct.pack(">I", 1) + q)
        opt_reply(c, opt, 1)
    elif opt == 7:                                  # GO
        opt_reply(c, opt, 3, struct.pack(">HQH", 0, size, 1 | 2 | 8))
        opt_reply(c, opt, 1)
        break
    else:
        opt_reply(c, opt, (1 << 31) + 1)
while True:
    magic, flags, typ, handle, off, count = \
        struct.unpack(">IHHQQI", recvn(c, 28))
    if typ == 0:                                    # READ
        chunk(c, 1, 1, handle, struct.pack(">Q", off) + content(off, count))
    elif typ == 7:                                  # BLOCK_STATUS
        payload = struct.pack(">I", meta_id) + b"".join(
            struct.pack(">II", l, f) for l, f in extents(off, count))
        chunk(c, 1, 5, handle, payload)
    elif typ == 2:                                  # DISC
        sys.exit(0)
    else:
        chunk(c, 1, (1 << 15) + 1, handle, struct.pack(">IH", 22, 0))
PY

python3 - "$size" > "$tmp/expected.img" <<'PY'
import sys
size = int(sys.argv[1])
sys.stdout.buffer.write(bytes((o % 251) if o < 512 * 1024 else 0
                              for o in range(size)))
PY

# serve MODE: start the server on $tmp/MODE.sock; sets $uri.
serve ()
{
    local s="$tmp/$1.sock" i
    python3 "$tmp/server.py" "$s" "$1" "$size" &
    cleanup_fn "kill $! 2>/dev/null"
    wait_until 60 "the $1 server starting" test -S "$s"
    uri="nbd+unix:///?socket=$s"
}

for mode in beyond zerolen; do
    serve $mode
    r=0
    "$copy" --request-size=64K "$uri" "$tmp/$mode.img" > "$tmp/out" \
        2> "$tmp/err" || r=$?
    if [ $r -eq 0 ]; then
        cmp "$tmp/expected.img" "$tmp/$mode.img" || fail "$mode: copy differs"
    else
        # libnbd may refuse the reply itself: a clean failure is fine.
        [ $r -eq 1 ] || { cat "$tmp/err"; fail "$mode: exit status $r"; }
        assert_contains "$tmp/err" '^sparsebackup-copy: '
    fi
    echo "$mode: exit status $r: $(cat "$tmp/out" "$tmp/err")"
done

serve noprogress
r=0
"$copy" "$uri" "$tmp/np.img" > "$tmp/out" 2> "$tmp/err" || r=$?
cat "$tmp/err"
[ $r -eq 1 ] || fail "noprogress: exit status $r (expected 1)"
assert_contains "$tmp/err" 'block status at offset 0 (returned no extents|failed)'
