#!/usr/bin/env bash
# Changed-block tracking: bad parameters, a cbt file of another disk,
# bad control commands and unknown @since names, each with its exact
# message naming the bad value.  Fails if anything bad is accepted or a
# message stops naming what is wrong.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires nbdinfo --version
requires_filter sparsebackup
requires_plugin file
requires_plugin null

# ---- Parameters -----------------------------------------------------------
refused sparsebackup-cbt=
assert_contains "$tmp/err" "sparsebackup-cbt: '' is not a file name"
for g in 256 1000 2G 0; do
    refused sparsebackup-cbt-granularity=$g
    assert_contains "$tmp/err" "sparsebackup-cbt-granularity: '$g' is not a power of 2 between 512 and 1G"
done
refused sparsebackup-cbt-granularity=lots
assert_contains "$tmp/err" "sparsebackup-cbt-granularity: 'lots' is not a valid size"
refused sparsebackup-cbt-mode=sync
assert_contains "$tmp/err" "sparsebackup-cbt-mode: 'sync' is not one of in-use, write-ahead, process-safe"
refused sparsebackup-cbt-reset=maybe
assert_contains "$tmp/err" "sparsebackup-cbt-reset: 'maybe' is not a boolean"
refused "sparsebackup-cbt-id=a$(printf '\t')b"
assert_contains "$tmp/err" "holds a byte outside printable ASCII \(0x09 at 1\)"
refused sparsebackup-control=
assert_contains "$tmp/err" "sparsebackup-control: '' is not a socket path"
long=$tmp/$(printf 'x%.0s' $(seq 120))
refused sparsebackup-control="$long"
assert_contains "$tmp/err" "is longer than a Unix socket path can be \(107 bytes\)"
nbdkit_refuses "sparsebackup-control: '$tmp/c.sock' needs sparsebackup-cbt=FILE" \
    --filter=sparsebackup null 1M sparsebackup-control="$tmp/c.sock"
touch "$tmp/notsock"
nbdkit_refuses "sparsebackup-control: '$tmp/notsock' exists and is not a socket" \
    --filter=sparsebackup null 1M sparsebackup-cbt="$tmp/x.cbt" \
    sparsebackup-control="$tmp/notsock"
accepted sparsebackup-cbt="$tmp/ok.cbt" sparsebackup-cbt-granularity=4K \
    sparsebackup-cbt-mode=write-ahead sparsebackup-cbt-reset=true \
    sparsebackup-cbt-id="disk 1"

# ---- A cbt file of another disk: refused at start-up, the field named ---
nbdkit -U - --filter=sparsebackup null 1M sparsebackup-cbt="$tmp/a.cbt" \
    --run 'nbdinfo --size "$uri"' >/dev/null
start_err ()   # start_err EXPECTED PARAMS...: refused before serving
{
    local want=$1; shift
    nbdkit_refuses "$(ere_quote "$want")" --filter=sparsebackup null 1M "$@"
}
start_err "sparsebackup-cbt: $tmp/a.cbt: cbt: granularity: the file has 65536, 1048576 was asked for" \
    sparsebackup-cbt="$tmp/a.cbt" sparsebackup-cbt-granularity=1M
start_err "sparsebackup-cbt: $tmp/a.cbt: cbt: identity: the file is for disk '', this disk is 'other'" \
    sparsebackup-cbt="$tmp/a.cbt" sparsebackup-cbt-id=other
# The size is known only once the plugin runs: every connection is
# refused with the message (and nbdkit logs it at start-up).
nbdkit -U - --filter=sparsebackup null 2M sparsebackup-cbt="$tmp/a.cbt" \
    --run 'nbdinfo --size "$uri"' >"$tmp/out" 2>"$tmp/err" &&
    fail "a cbt file of another size was accepted"
grep -E "a\.cbt: cbt: disk size: the file is for a disk of 1048576 bytes, this disk has 2097152" "$tmp/err" >/dev/null ||
    { cat "$tmp/err"; fail "the size mismatch is not named"; }
# reset=true starts afresh.
nbdkit -U - --filter=sparsebackup null 2M sparsebackup-cbt="$tmp/a.cbt" \
    sparsebackup-cbt-reset=true --run 'nbdinfo --size "$uri"' >/dev/null
# Without a cbt file the filter owns no @since: name: it is passed
# through to the plugin like any other name (the qcow2 plugin has
# @since:BITMAP views; see test-qcow2-bitmaps.sh).
nbdkit -U - -v --filter=sparsebackup null 1M \
    --run 'nbdinfo --size "nbd+unix:///@since:x?socket=$unixsocket"' \
    >"$tmp/out" 2>"$tmp/err" || fail "@since:x was not passed through"
assert_contains "$tmp/err" "export '@since:x' is not the default export: passed through"

# ---- The control socket ---------------------------------------------------
truncate -s 4M "$tmp/disk.raw"
ctlsock=$tmp/ctl.sock
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock"

# expect STATUS LINE -- COMMAND: the exact reply line (stdout or stderr).
expect ()
{
    local want=$1 line=$2 st=0; shift 3
    ctl "$@" >"$tmp/out" 2>"$tmp/err" || st=$?
    assert_eq "$want" "$st" "exit status of '$*'"
    assert_eq "$line" "$(cat "$tmp/out" "$tmp/err" | tail -n 1)" "reply to '$*'"
}
# The cbt file is open from start-up: status before any NBD client.
expect 0 "OK version=2 mode=process-safe disk-size=4194304 granularity=65536 checkpoints=0 pending=- latest=- state=ok" -- status
expect 1 "ERR no-such-checkpoint no good checkpoint: the first backup is a full one (backup-begin NEW)" -- map
# One lookup, one message, for every command that names a checkpoint.
nope="ERR no-such-checkpoint no checkpoint 'nope' (checkpoint-list shows them)"
expect 1 "$nope" -- map --since nope
expect 1 "$nope" -- backup-begin c1 --since nope
expect 1 "$nope" -- backup-end nope --ok
expect 1 "$nope" -- checkpoint-delete nope
expect 0 "OK checkpoint=c1 state=pending since=-" -- backup-begin c1
expect 1 "ERR busy cbt: checkpoint 'c1' is pending: end its backup first" -- backup-begin c2
pending="ERR state checkpoint 'c1' is pending: its backup has not ended (backup-end c1 --ok|--failed)"
expect 1 "$pending" -- backup-begin c2 --since c1
expect 1 "$pending" -- map --since c1
expect 0 "OK checkpoint=c1 state=good" -- backup-end c1 --ok
expect 1 "ERR state checkpoint 'c1' is not pending: its backup has ended" -- backup-end c1 --ok
expect 1 "ERR exists cbt: checkpoint 'c1' exists" -- backup-begin c1
expect 0 "OK since=c1 extents=0 bytes=0 granularity=65536 disk-size=4194304" -- map
expect 0 "OK checkpoint=c2 state=pending since=c1" -- backup-begin c2 --since c1
expect 0 "OK checkpoint=c2 state=deleted" -- backup-end c2 --failed
expect 0 "OK checkpoints=1" -- checkpoint-list

# What sparsebackup-ctl would refuse locally, sent raw: the server's own
# checks, and the connection stays usable after each.
"$nbd_python" - "$ctlsock" > "$tmp/raw" <<'PY'
import socket, sys
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
f = s.makefile("rwb", buffering=0)
print(f.readline().decode().rstrip())
for req in [b"bogus", b"backup-begin", b"backup-begin -x", b"backup-end c1",
            b"x" * 2000, b"status \x01", b"map --since", b"checkpoint-list extra"]:
    f.write(req + b"\n")
    while True:
        l = f.readline().decode().rstrip()
        print(l)
        if not l.startswith("* "):
            break
PY
cat > "$tmp/want" <<'EOF2'
HELLO sparsebackup-ctl 2
ERR unknown-command unknown command 'bogus' (commands: backup-begin, backup-end, checkpoint-list, checkpoint-delete, map, status, group-prepare, group-commit, group-abort)
ERR syntax backup-begin: missing checkpoint name
ERR invalid-name checkpoint '-x' is not a valid checkpoint name (1-63 printable characters, no space, not starting with '-')
ERR syntax backup-end: missing --ok or --failed
ERR too-long the request line is longer than 1024 bytes
ERR syntax the request holds a byte outside printable ASCII
EOF2
head -n 7 "$tmp/raw" | diff -u "$tmp/want" - || fail "raw control replies differ"
[ "$(wc -l < "$tmp/raw")" = 9 ] || { cat "$tmp/raw"; fail "not one reply per request"; }
grep -q '^ERR syntax' <(sed -n 8p "$tmp/raw") || fail "map --since without a name accepted"
grep -q '^ERR syntax' <(sed -n 9p "$tmp/raw") || fail "checkpoint-list extra accepted"

# ---- Delta view names ------------------------------------------------------
view_err ()   # view_err NAME MESSAGE
{
    nbdinfo "nbd+unix:///$1?socket=$sock" >/dev/null 2>&1 &&
        fail "export '$1' accepted"
    assert_contains "$server_log" "$(ere_quote "$2")"
}
view_err @since:nope "sparsebackup: export '@since:nope': no checkpoint 'nope' (checkpoint-list shows them)"
view_err @since: "sparsebackup: export '@since:' is not a valid backup view"
ctl backup-begin c3 >/dev/null
view_err @since:c3 "sparsebackup: export '@since:c3': checkpoint 'c3' is pending: its backup has not ended"
ctl backup-end c3 --ok >/dev/null
nbdinfo --size "nbd+unix:///@since:c3?socket=$sock" >/dev/null

# Several control clients at once: 8 idle clients do not hold up a
# ninth... which is one too many (ERR busy); once one leaves, a new
# client is served at once.  The idle clients stay until told to go
# ($4 exists), then check that the server has not closed their
# connections: a server serving one client at a time would answer the
# status only once the idle ones timed out (60 s), and they would see it.
# (No elapsed time is measured: a loaded machine may take seconds.)
cat > "$tmp/idle.py" <<'PY'
import os, socket, sys, time
ss = []
for i in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
    assert s.recv(100).startswith(b"HELLO"); ss.append(s)
open(sys.argv[3], "w").close()
end = time.monotonic() + 600
while not os.path.exists(sys.argv[4]):
    if time.monotonic() > end:
        sys.exit("idle.py: not told to go within 600 s")
    time.sleep(0.05)
for i, s in enumerate(ss):
    s.setblocking(False)
    try:
        got = s.recv(100)
    except BlockingIOError:
        continue
    sys.exit("idle control client %d: the server %s" %
             (i, "closed the connection" if not got else "sent %r" % got))
PY
rm -f "$tmp/ready7" "$tmp/go7" "$tmp/ready1" "$tmp/go1"
"$nbd_python" "$tmp/idle.py" "$ctlsock" 7 "$tmp/ready7" "$tmp/go7" &
idle7=$!
cleanup_fn "touch $tmp/go7 $tmp/go1"
wait_until 120 "7 idle control clients connected" test -e "$tmp/ready7"
ctl status > "$tmp/out" || fail "status with 7 other control clients connected"
"$nbd_python" "$tmp/idle.py" "$ctlsock" 1 "$tmp/ready1" "$tmp/go1" &
idle1=$!
wait_until 120 "an eighth idle control client connected" test -e "$tmp/ready1"
rc=0; ctl status > "$tmp/out" 2> "$tmp/err" || rc=$?
[ $rc -eq 1 ] || fail "a ninth control client: exit status $rc, expected 1"
assert_contains "$tmp/err" "ERR busy too many control clients \(at most 8 at once\)"
touch "$tmp/go1"
wait $idle1 || fail "the eighth control client was disconnected"
# (Polled: a loaded machine may take a while to notice the closed
# connection; the 7 others stay connected.)
wait_until 120 "a control client served after one left" \
    eval 'ctl status > /dev/null 2>&1'
touch "$tmp/go7"
wait $idle7 ||
    fail "an idle control client was disconnected while others were served"

# A client idle inside a line does not hold up nbdkit's exit.
rm -f "$tmp/ready"
"$nbd_python" -c '
import socket, sys, time
s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])
s.recv(100); s.send(b"stat"); open(sys.argv[2], "w").close()
time.sleep(600)' "$ctlsock" "$tmp/ready" &
idle=$!
cleanup_fn "kill $idle 2>/dev/null"
wait_until 120 "a control client idle inside a line" test -e "$tmp/ready"
start=$(date +%s)
kill "$pid"
# (45 s: well below the 60 s after which the server drops the idle
# client by itself, well above what an exit takes on a loaded machine)
for _ in $(seq 450); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "nbdkit did not exit with a control client connected"
kill "$idle" 2>/dev/null || true
[ ! -e "$ctlsock" ] || fail "the control socket was not removed at exit"
echo "nbdkit exited in $(( $(date +%s) - start )) s with an idle control client"
