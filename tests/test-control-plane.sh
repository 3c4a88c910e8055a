#!/usr/bin/env bash
# The control plane: the views, the control socket and the checkpoint
# bookkeeping never give a wrong answer with exit 0.
#
#  1. Everything that names a checkpoint (map --since, backup-begin
#     --since, @since:X, @frozen:since:X) goes through one lookup: a
#     missing one is "no-such-checkpoint", a pending one "state", the
#     same words everywhere.
#  2. An open @since:X connection is bound to the checkpoint it opened
#     on: once X is deleted (and another X created), it fails its
#     requests instead of answering the new X's map.
#  3. Mistyped view names in the filter's namespaces are refused, never
#     served as the live disk; other '@' names are passed through.
#  4. The cbt file is opened at start-up: backup-begin works before any
#     NBD client, and a bad cbt path stops nbdkit with the message.
#  5. A second nbdkit on the same control path is refused and leaves
#     the running server's socket alone.
#  7. A full file system under the cbt file is "io", not "limit".
#  8. A control client trickling a byte at a time loses its slot.
# 10. --json: one valid document on stdout, maps in nbdinfo's form.
# 11. Copy before write reads the old data through the default export,
#     whichever export the writer uses (a plugin serving other disks
#     under other names).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_plugin memory
requires_plugin ondemand
requires_plugin eval
requires_filter blocksize-policy
requires qemu-img --version

ctlsock=$tmp/ctl.sock
expect_err () {                 # expect_err CODE-AND-MESSAGE-ERE CTL-ARGS...
    local re=$1 st=0
    shift
    ctl "$@" >"$tmp/out" 2>"$tmp/err" || st=$?
    [ $st = 1 ] || { cat "$tmp/out" "$tmp/err" >&2;
                     fail "sparsebackup-ctl $*: exit $st, expected 1"; }
    assert_contains "$tmp/err" "$re"
    [ ! -s "$tmp/out" ] || fail "sparsebackup-ctl $*: output on stdout"
}
refused_view () {               # refused_view EXPORT ERE
    local st=0
    nbdinfo "nbd+unix:///$1?socket=$sock" >"$tmp/out" 2>&1 || st=$?
    [ $st != 0 ] || fail "export '$1' was served"
    assert_contains "$server_log" "$2"
}

# ---- 4: the control socket works before any NBD client --------------
start_nbdkit --filter=sparsebackup memory 16M \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
    sparsebackup-scratch="$tmp/scratch"
ctl status > "$tmp/out"
assert_contains "$tmp/out" "^OK version=2 mode=process-safe disk-size=16777216 .*checkpoints=0 pending=- latest=- state=ok frozen=-"
ctl backup-begin c1 > "$tmp/out"
assert_eq "OK checkpoint=c1 state=pending since=-" "$(cat "$tmp/out")"
ctl backup-end c1 --ok >/dev/null

# ---- 1: one lookup, one set of messages ------------------------------
expect_err "^ERR no-such-checkpoint no checkpoint 'nope' \(checkpoint-list shows them\)$" map --since nope
expect_err "^ERR no-such-checkpoint no checkpoint 'nope' \(checkpoint-list shows them\)$" backup-begin c2 --since nope
refused_view @since:nope "export '@since:nope': no checkpoint 'nope' \(checkpoint-list shows them\)"
ctl backup-begin c2 --since c1 >/dev/null
expect_err "^ERR state checkpoint 'c2' is pending: its backup has not ended \(backup-end c2 --ok\|--failed\)$" map --since c2
refused_view @since:c2 "export '@since:c2': checkpoint 'c2' is pending: its backup has not ended"
refused_view @frozen:since:nope "export '@frozen:since:nope': no checkpoint 'nope' \(checkpoint-list shows them\)"
ctl backup-end c2 --ok >/dev/null
# A map without --since and without any good checkpoint... there is one:
ctl map > "$tmp/out"
assert_contains "$tmp/out" "^OK since=c2 extents=0 bytes=0 granularity=65536 disk-size=16777216$"

# ---- 10: --json on a real server -------------------------------------
nbdsh -u "$uri" -c 'h.pwrite(b"x" * 70000, 1 << 20)'
ctl map --since c2 --json > "$tmp/map.json"
"$nbd_python" - "$tmp/map.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d == [
    {"offset": 0, "length": 1 << 20, "type": 0, "description": "clean"},
    {"offset": 1 << 20, "length": 2 << 16, "type": 1, "description": "dirty"},
    {"offset": (1 << 20) + (2 << 16), "length": (16 << 20) - (1 << 20) - (2 << 16),
     "type": 0, "description": "clean"}], d
PY
ctl status --json > "$tmp/status.json"
"$nbd_python" -c '
import json, sys
d = json.load(open(sys.argv[1]))
assert d["version"] == 2 and d["disk-size"] == 16777216, d
assert d["checkpoints"] == 2 and d["latest"] == "c2" and d["pending"] is None, d
assert d["frozen"] is None and d["backup"] == "ok", d' "$tmp/status.json"
ctl checkpoint-list --json > "$tmp/list.json"
"$nbd_python" -c '
import json, re, sys
d = json.load(open(sys.argv[1]))
assert [c["name"] for c in d] == ["c1", "c2"], d
for c in d:
    assert c["state"] == "good", c
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", c["created"]), c' "$tmp/list.json"

# ---- 3: names in the filter's namespaces -----------------------------
for name in @frozen:sinc:c1 @Frozen @frozen: @frozen:since: \
            @frozen:since:-x @FROZEN:since:c1 @frozenx \
            @since @since: @Since:c1 @sincec1 @since:-x; do
    refused_view "$name" "export '$name' is not a valid backup view: the views are @frozen, @frozen:since:CHECKPOINT and @since:CHECKPOINT"
done
# No backup in progress: @frozen is refused, not the live disk.
refused_view @frozen "export '@frozen': no backup in progress"
stop_nbdkit

# Without changed-block tracking "@since:" belongs to the plugin (the
# qcow2 plugin's bitmaps), @frozen is still the filter's.
qemu-img create -q -f qcow2 "$tmp/bm.qcow2" 1M
qemu-img bitmap --add "$tmp/bm.qcow2" b0
start_nbdkit --filter=sparsebackup qcow2 file="$tmp/bm.qcow2"
nbdinfo --size "nbd+unix:///@since:b0?socket=$sock" > "$tmp/out"
assert_eq 1048576 "$(cat "$tmp/out")" "@since:b0 of the qcow2 plugin"
nbdinfo --size "nbd+unix:///@top?socket=$sock" > "$tmp/out"
assert_eq 1048576 "$(cat "$tmp/out")" "@top of the qcow2 plugin"
refused_view @frozen "export '@frozen' needs a scratch file"
refused_view @Frozen "export '@Frozen' is not a valid backup view: the views are @frozen, @frozen:since:CHECKPOINT \("
stop_nbdkit

# ---- 4: a bad cbt path stops nbdkit at start-up ----------------------
nbdkit_refuses "sparsebackup-cbt: $tmp/no/such/disk.cbt: cannot create the file in '$tmp/no/such': No such file or directory" \
    --filter=sparsebackup memory 1M sparsebackup-cbt="$tmp/no/such/disk.cbt"
: > "$tmp/locked.cbt"
start_nbdkit --filter=sparsebackup memory 1M sparsebackup-cbt="$tmp/locked.cbt" \
    sparsebackup-control="$ctlsock"
ctl status >/dev/null           # the cbt file is open (and locked) now
nbdkit_refuses "sparsebackup-cbt: $tmp/locked.cbt: the file is in use by another process \(locked\): refused" \
    --filter=sparsebackup memory 1M sparsebackup-cbt="$tmp/locked.cbt"
stop_nbdkit

# ---- 5: a second server on the same control path ---------------------
start_nbdkit --filter=sparsebackup memory 1M \
    sparsebackup-cbt="$tmp/a.cbt" sparsebackup-control="$ctlsock"
first=$pid
ino=$(stat -c %i "$ctlsock")
nbdkit_refuses "sparsebackup-control: '$ctlsock': a server is answering on this socket" \
    --filter=sparsebackup memory 2M sparsebackup-cbt="$tmp/b.cbt" \
    sparsebackup-control="$ctlsock"
assert_eq "$ino" "$(stat -c %i "$ctlsock")" "the running server's socket"
ctl status > "$tmp/out"
assert_contains "$tmp/out" " disk-size=1048576 "
# A socket left by a server that died is replaced.
kill -9 "$first"; _wait_pid "$first"
start_nbdkit --filter=sparsebackup memory 2M \
    sparsebackup-cbt="$tmp/b.cbt" sparsebackup-control="$ctlsock"
ctl status > "$tmp/out"
assert_contains "$tmp/out" " disk-size=2097152 "
# At exit a server removes only its own socket: replace it under it.
mv "$ctlsock" "$tmp/moved.sock"
"$nbd_python" -c '
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1])' "$ctlsock"
ino=$(stat -c %i "$ctlsock")
stop_nbdkit
[ -S "$ctlsock" ] && [ "$(stat -c %i "$ctlsock")" = "$ino" ] ||
    fail "the server removed a socket it did not create"
rm -f "$ctlsock"

# ---- 8: a trickling control client loses its slot --------------------
start_nbdkit -D sparsebackup.control_timeout=2 --filter=sparsebackup \
    memory 1M sparsebackup-cbt="$tmp/c.cbt" sparsebackup-control="$ctlsock"
# The client trickles for up to 120 s and must be answered while it is
# still trickling (a server that counted the timeout from the last byte
# would only answer once it stopped); no elapsed time is asserted.
"$nbd_python" - "$ctlsock" <<'PY'
import select, socket, sys, time
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rb")
assert f.readline() == b"HELLO sparsebackup-ctl 2\n"
t0 = time.monotonic()
answered = False
try:
    for i in range(240):            # "status" one byte every 0.5 s, no LF
        s.send(b"status"[i % 6:i % 6 + 1])
        if select.select([s], [], [], 0.5)[0]:
            answered = True
            break
except OSError:
    answered = True                 # closed by the server
assert answered, "the server did not answer a client trickling for 120 s"
reply = f.readline()
took = time.monotonic() - t0
assert reply.startswith(b"ERR syntax no complete request line within 2 "
                        b"seconds"), reply
print("trickling client dropped after %.1f s" % took)
PY
stop_nbdkit

# ---- 7: a full file system under the cbt file is "io" ----------------
if [ "$(id -u)" = 0 ] && unshare --mount true 2>/dev/null; then
    mkdir "$tmp/small"
    cat > "$tmp/inner.sh" <<EOF
set -e
mount -t tmpfs -o size=256k tmpfs "$tmp/small"
nbdkit -f -U "$tmp/full.sock" --filter=sparsebackup memory 16M \
    sparsebackup-cbt="$tmp/small/disk.cbt" \
    sparsebackup-control="$ctlsock" 2> "$tmp/full.log" &
# (filled once the control socket answers: the cbt file is open then)
for i in \$(seq 1200); do
    "$ctl_bin" "$ctlsock" status >/dev/null 2>&1 && break; sleep 0.1
done
"$ctl_bin" "$ctlsock" status >/dev/null ||
    { echo "the server on the small file system did not answer within 120 s"; exit 1; }
dd if=/dev/zero of="$tmp/small/filler" bs=4k 2>/dev/null || true
touch "$tmp/filled"
wait
EOF
    unshare --mount --propagation private bash "$tmp/inner.sh" &
    inner=$!
    for _ in $(seq 1500); do
        [ -e "$tmp/filled" ] && break
        kill -0 $inner 2>/dev/null || break
        sleep 0.1
    done
    [ -e "$tmp/filled" ] ||
        { cat "$tmp/full.log" >&2; fail "the full file system was not set up"; }
    expect_err "^ERR io .*No space left on device" backup-begin c1
    grep -q "^ERR limit" "$tmp/err" && fail "a full file system answered 'limit'"
    # (This test's server only: other tests have a full.sock too.  The
    # wait is bounded: under the sanitizer build's ASan preload nbdkit
    # 1.32.5 may hang in its exit handlers after an error with a strerror
    # text, see README "Known issues".)
    pkill -f "$tmp/full.sock" || true
    for _ in $(seq 100); do kill -0 $inner 2>/dev/null || break; sleep 0.1; done
    pkill -9 -f "$tmp/full.sock" || true
    wait $inner || true
else
    echo "not root (or no unshare): the full file system case is not run"
fi

# ---- 11: copy before write through the default export ----------------
# A plugin serving one disk per export name (eval: files $dir/d-NAME).
# (The scripts unset LD_PRELOAD: the sanitizer build's wrapper preloads
# libasan into nbdkit, and dd aborts under it.)
mkdir "$tmp/exports"
d=$tmp/exports
for n in default other; do truncate -s 1M "$d/d-$n"; done
start_nbdkit --filter=sparsebackup eval \
    open='n=${3:-default}; echo "d-$n"' \
    get_size='echo 1048576' \
    can_write='exit 0' can_flush='exit 0' flush='exit 0' \
    pread="unset LD_PRELOAD; dd if=$d/\$2 skip=\$4 count=\$3 iflag=skip_bytes,count_bytes status=none" \
    pwrite="unset LD_PRELOAD; dd of=$d/\$2 seek=\$4 conv=notrunc oflag=seek_bytes status=none" \
    sparsebackup-cbt="$tmp/od.cbt" sparsebackup-control="$ctlsock" \
    sparsebackup-scratch="$tmp/od.scratch"
nbdsh -u "nbd+unix:///?socket=$sock" -c 'h.pwrite(b"A" * 65536, 0)'
nbdsh -u "nbd+unix:///other?socket=$sock" -c 'h.pwrite(b"B" * 65536, 0)'
ctl backup-begin f1 >/dev/null
# A write to another disk of the plugin: the frozen default disk must
# still read A (its own old data), not B (the other disk's).
nbdsh -u "nbd+unix:///other?socket=$sock" -c 'h.pwrite(b"C" * 65536, 0)'
nbdsh -u "nbd+unix:///?socket=$sock" -c 'h.pwrite(b"D" * 65536, 0)'
"$nbd_python" -c '
import nbd, sys
h = nbd.NBD(); h.set_export_name("@frozen"); h.connect_unix(sys.argv[1])
got = h.pread(65536, 0)
assert got == b"A" * 65536, got[:16]' "$sock"
ctl backup-end f1 --ok >/dev/null
stop_nbdkit
# Copy before write in requests the layer below accepts, before any
# client opened the default export (the old code read 4M at once, with
# the request size it learnt from the first default-export client).
start_nbdkit --filter=sparsebackup --filter=blocksize-policy memory 16M \
    blocksize-maximum=1M blocksize-error-policy=error \
    sparsebackup-cbt="$tmp/bp.cbt" sparsebackup-control="$ctlsock" \
    sparsebackup-scratch="$tmp/bp.scratch"
nbdsh -u "nbd+unix:///x?socket=$sock" -c 'h.pwrite(b"\x5a" * (1 << 20), 0)' \
    -c 'h.pwrite(b"\x5b" * (1 << 20), 3 << 20)'
ctl backup-begin p1 >/dev/null
"$nbd_python" - "$sock" <<'PY'
import nbd, sys
w = nbd.NBD(); w.set_export_name("x"); w.connect_unix(sys.argv[1])
w.zero(8 << 20, 0)              # one change of 8M: saved in 4M runs
f = nbd.NBD(); f.set_export_name("@frozen"); f.connect_unix(sys.argv[1])
assert f.pread(1 << 20, 0) == b"\x5a" * (1 << 20)
assert f.pread(1 << 20, 1 << 20) == bytes(1 << 20)
assert f.pread(1 << 20, 3 << 20) == b"\x5b" * (1 << 20)
PY
ctl status > "$tmp/out"
assert_contains "$tmp/out" " frozen=p1 .* backup=ok$"
ctl backup-end p1 --ok >/dev/null
stop_nbdkit

# A plugin that cannot open its default export without a client
# (ondemand names its disks after the client's export name): refused at
# start-up, saying why.
st=0
nbdkit -U - --filter=sparsebackup ondemand dir="$d" size=1M \
    sparsebackup-cbt="$tmp/od2.cbt" --run 'nbdinfo --size "$uri"' \
    > "$tmp/out" 2> "$tmp/err" || st=$?
failed_cleanly $st "the ondemand plugin with sparsebackup-cbt"
assert_contains "$tmp/err" "sparsebackup-cbt: cannot open the plugin's default export"

# ---- 2: a view is bound to its checkpoint's identity -----------------
start_nbdkit --filter=sparsebackup memory 16M \
    sparsebackup-cbt="$tmp/id.cbt" sparsebackup-control="$ctlsock"
ctl backup-begin c2 >/dev/null
ctl backup-end c2 --ok >/dev/null
ctl backup-begin c3 --since c2 >/dev/null
ctl backup-end c3 --ok >/dev/null
"$nbd_python" - "$sock" "$ctl_bin" "$ctlsock" <<'PY'
import nbd, subprocess, sys
sock, ctl, ctlsock = sys.argv[1:4]
def run(*args):
    subprocess.run([ctl, ctlsock] + list(args), check=True,
                   stdout=subprocess.DEVNULL)
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.set_export_name("@since:c3")
h.connect_unix(sock)
def extents():
    out = []
    h.block_status(16 << 20, 0,
                   lambda m, o, e, err: out.extend(zip(e[::2], e[1::2])))
    return out
before = extents()
assert before == [(16 << 20, 1)], before      # nothing changed since c3
# Delete c3, change a block, create c3 again: a new checkpoint.
run("checkpoint-delete", "c3")
w = nbd.NBD(); w.connect_unix(sock); w.pwrite(b"y" * 4096, 0); w.shutdown()
run("backup-begin", "c3", "--since", "c2")
run("backup-end", "c3", "--ok")
for what, call in (("extents", extents),
                   ("pread", lambda: h.pread(4096, 0))):
    try:
        r = call()
    except nbd.Error as e:
        continue
    raise SystemExit("%s on a view whose checkpoint was deleted "
                     "answered %r" % (what, r))
PY
assert_contains "$server_log" "export '@since:c3': checkpoint 'c3' was deleted while this connection was open"

stop_nbdkit
echo "PASS"
