#!/usr/bin/env bash
# sparsebackup-ctl (tools/ctl) against a fake control server written in
# Python: data lines and OK go to stdout (exit 0), ERR to stderr (exit
# 1), bad local commands, a wrong hello, a connection closed early, a
# server that never ends its reply, a socket that is not ours (an NBD
# server) and a missing socket exit 2.  The command sent is the
# normalised form.  With --json stdout holds one JSON document and
# nothing else.  --help and --version print to stdout and exit 0.
set -euo pipefail
: "${abs_top_builddir:=$(cd "$(dirname "$0")/.." && pwd)}"
ctl=$abs_top_builddir/tools/ctl/sparsebackup-ctl
[ -x "$ctl" ] || { echo "$0: $ctl not built" >&2; exit 1; }
command -v python3 >/dev/null || { echo "$0: SKIP: no python3"; exit 77; }

tmp=$(mktemp -d "${TMPDIR:-/tmp}/test-ctl-client.XXXXXX")
pid=
cleanup () { [ -n "$pid" ] && kill "$pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
sock=$tmp/ctl.sock

# The fake server: hello, one request, a canned reply; logs requests.
cat > "$tmp/server.py" <<'PY'
import os, socket, sys
path, log = sys.argv[1], sys.argv[2]
replies = {
    "status": "OK version=2 mode=in-use disk-size=1048576 checkpoints=0 pending=- state=ok\n",
    "checkpoint-list": "* a good 1 1970-01-01T00:00:01Z\n* b pending 2 1970-01-01T00:00:02Z\nOK checkpoints=2\n",
    "map --since b": "* 0 65536\n* 131072 65536\nOK since=b extents=2 bytes=131072 granularity=65536 disk-size=1048576\n",
    "checkpoint-delete nope": "ERR no-such-checkpoint no checkpoint 'nope'\n",
    "map --since a": "* 0 65536\n",             # closed before the status
    "backup-begin b2 --since b1": "garbage\n",
    "backup-end slow --ok": "* ...",            # never ends its reply
}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
# bound and listening under a temporary name, then renamed: a client
# waiting for PATH never finds it refusing connections
s.bind(path + ".tmp")
s.listen(8)
os.rename(path + ".tmp", path)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb", buffering=0)
    mode = open(path + ".mode").read().strip() if os.path.exists(path + ".mode") else ""
    if mode == "nbd":           # what an NBD server sends first
        f.write(b"NBDMAGICIHAVEOPT\x00\x03")
        c.recv(100)
        c.close()
        continue
    f.write(b"HELLO sparsebackup-ctl 1\n" if mode == "v1" else b"HELLO sparsebackup-ctl 2\n")
    req = f.readline().decode().rstrip("\n")
    with open(log, "a") as l:
        l.write(req + "\n")
    try:
        f.write(replies.get(req, "ERR unknown-command ?\n").encode())
        if req == "backup-end slow --ok":
            c.recv(100)         # until the client gives up
        f.close()
        c.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                    # the client went away (wrong hello)
    c.close()
PY
python3 "$tmp/server.py" "$sock" "$tmp/log" &
pid=$!
for _ in $(seq 600); do [ -S "$sock" ] && break; sleep 0.1; done
[ -S "$sock" ] || { echo "$0: FAIL: the fake server did not start within 60 s" >&2; exit 1; }

fail=0
# expect STATUS STDOUT STDERR-PATTERN -- ARGS
expect () {
    local want=$1 out=$2 errpat=$3; shift 4
    local st=0
    "$ctl" "$@" >"$tmp/out" 2>"$tmp/err" || st=$?
    if [ "$st" != "$want" ] || [ "$(cat "$tmp/out")" != "$out" ] ||
       { [ -n "$errpat" ] && ! grep -q -e "$errpat" "$tmp/err"; }; then
        echo "$0: FAIL: sparsebackup-ctl $*: status $st (want $want)" >&2
        echo "  stdout: $(cat "$tmp/out")" >&2
        echo "  stderr: $(cat "$tmp/err")" >&2
        fail=1
    fi
}
expect 0 "OK version=2 mode=in-use disk-size=1048576 checkpoints=0 pending=- state=ok" '' -- "$sock" status
expect 0 "a good 1 1970-01-01T00:00:01Z
b pending 2 1970-01-01T00:00:02Z
OK checkpoints=2" '' -- "$sock" checkpoint-list
# JSON: one document on stdout, the map in nbdinfo --map --json's form
# over the whole disk (a dirty bitmap: dirty / clean).
expect 0 '[
{ "offset": 0, "length": 65536, "type": 1, "description": "dirty"},
{ "offset": 65536, "length": 65536, "type": 0, "description": "clean"},
{ "offset": 131072, "length": 65536, "type": 1, "description": "dirty"},
{ "offset": 196608, "length": 851968, "type": 0, "description": "clean"}
]' '' -- "$sock" map --json --since b
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$tmp/out" ||
    { echo "$0: FAIL: map --json is not one JSON document" >&2; fail=1; }
expect 0 '{ "version": 2, "mode": "in-use", "disk-size": 1048576, "checkpoints": 0, "pending": null, "state": "ok" }' '' -- --json "$sock" status
expect 0 '[
{ "name": "a", "state": "good", "created": "1970-01-01T00:00:01Z", "created-epoch": 1},
{ "name": "b", "state": "pending", "created": "1970-01-01T00:00:02Z", "created-epoch": 2}
]' '' -- "$sock" checkpoint-list --json
expect 2 "" "prints no document" -- --json "$sock" backup-begin x
expect 1 "" "ERR no-such-checkpoint" -- "$sock" checkpoint-delete nope
expect 2 "0 65536" "closed the connection" -- "$sock" map --since a
expect 2 "" "unexpected reply line" -- "$sock" backup-begin b2 --since b1
# A reply that never ends: bounded by --timeout.
expect 2 "" "timed out after 1 s waiting for the end of the reply" -- --timeout=1 "$sock" backup-end slow --ok
# Refused locally, never sent.
expect 2 "" "unknown-command" -- "$sock" frobnicate
expect 2 "" "missing --ok or --failed" -- "$sock" backup-end b2
expect 2 "" "invalid-name" -- "$sock" checkpoint-delete -x
expect 2 "" "usage" -- "$sock"
expect 2 "" "not a number of seconds" -- --timeout=0 "$sock" status
expect 2 "" "No such file" -- "$tmp/none.sock" status
echo v1 > "$sock.mode"
expect 2 "" "version 1" -- "$sock" status
# The NBD socket given instead of the control socket: a clear message
# within the timeout, never a wait forever (a timeout long enough for a
# loaded machine: a client that waited for a line would still time out,
# with another message).
echo nbd > "$sock.mode"
expect 2 "" "NBDMAGIC: this is an NBD server's socket" -- --timeout=30 "$sock" status
rm -f "$sock.mode"
# --help and --version: stdout, exit 0.
expect 0 "$("$ctl" --help)" '' -- --help
grep -q "^usage: sparsebackup-ctl" "$tmp/out" ||
    { echo "$0: FAIL: --help" >&2; fail=1; }
"$ctl" --version | grep -q "^sparsebackup-ctl [0-9].* (control protocol 2)$" ||
    { echo "$0: FAIL: --version" >&2; fail=1; }

if grep -q -e frobnicate -e "backup-end b2" "$tmp/log"; then
    echo "$0: FAIL: a locally refused command reached the server" >&2
    fail=1
fi
grep -qx "map --since b" "$tmp/log" ||
    { echo "$0: FAIL: the request was not normalised" >&2; fail=1; }
[ $fail -eq 0 ] && echo "$0: PASS"
exit $fail
