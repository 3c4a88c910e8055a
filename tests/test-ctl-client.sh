#!/usr/bin/env bash
# sparsebackup-ctl (tools/ctl) against a fake control server written in
# Python: data lines and OK go to stdout (exit 0), ERR to stderr (exit
# 1), bad local commands, a wrong hello, a connection closed early and a
# missing socket exit 2.  The command sent is the normalised form.
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
    "status": "OK version=1 mode=in-use checkpoints=0\n",
    "checkpoint-list": "* a good 1\n* b pending 2\nOK checkpoints=2\n",
    "map --since a --json": '* {"since":"a","extents":[\n* [0,65536]\n* ]}\nOK extents=1\n',
    "checkpoint-delete nope": "ERR no-such-checkpoint no checkpoint 'nope'\n",
    "map --since a": "* 0 65536\n",             # closed before the status
    "backup-begin b2 --since b1": "garbage\n",
}
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.bind(path)
s.listen(8)
while True:
    c, _ = s.accept()
    f = c.makefile("rwb", buffering=0)
    mode = open(path + ".mode").read().strip() if os.path.exists(path + ".mode") else ""
    f.write(b"HELLO sparsebackup-ctl 2\n" if mode == "v2" else b"HELLO sparsebackup-ctl 1\n")
    req = f.readline().decode().rstrip("\n")
    with open(log, "a") as l:
        l.write(req + "\n")
    try:
        f.write(replies.get(req, "ERR unknown-command ?\n").encode())
        f.close()
        c.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass                    # the client went away (wrong hello)
    c.close()
PY
python3 "$tmp/server.py" "$sock" "$tmp/log" &
pid=$!
for _ in $(seq 50); do [ -S "$sock" ] && break; sleep 0.1; done

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
expect 0 "OK version=1 mode=in-use checkpoints=0" '' -- "$sock" status
expect 0 "a good 1
b pending 2
OK checkpoints=2" '' -- "$sock" checkpoint-list
# Options in another order: sent normalised.
expect 0 '{"since":"a","extents":[
[0,65536]
]}
OK extents=1' '' -- "$sock" map --json --since a
expect 1 "" "ERR no-such-checkpoint" -- "$sock" checkpoint-delete nope
expect 2 "0 65536" "closed the connection" -- "$sock" map --since a
expect 2 "" "unexpected reply line" -- "$sock" backup-begin b2 --since b1
# Refused locally, never sent.
expect 2 "" "unknown-command" -- "$sock" frobnicate
expect 2 "" "missing --ok or --failed" -- "$sock" backup-end b2
expect 2 "" "invalid-name" -- "$sock" checkpoint-delete -x
expect 2 "" "usage" -- "$sock"
expect 2 "" "No such file" -- "$tmp/none.sock" status
echo v2 > "$sock.mode"
expect 2 "" "version 2" -- "$sock" status
rm -f "$sock.mode"

if grep -q -e frobnicate -e "backup-end" "$tmp/log"; then
    echo "$0: FAIL: a locally refused command reached the server" >&2
    fail=1
fi
grep -qx "map --since a --json" "$tmp/log" ||
    { echo "$0: FAIL: the request was not normalised" >&2; fail=1; }
[ $fail -eq 0 ] && echo "$0: PASS"
exit $fail
