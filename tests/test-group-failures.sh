#!/usr/bin/env bash
# sparsebackup-ctl group-begin when things go wrong: no server is left
# holding writes or with the group's checkpoint, and every failing
# server is named.
#  0. Four servers: taken on all (--json: one document, every server
#     pending); the arguments checked before anything is asked (the same
#     socket twice, no socket, a bad hold timeout, a missing socket, an
#     NBD socket): exit 2, nothing prepared.
#  1. One server refuses (the checkpoint name exists there): exit 1, its
#     socket and the reason on stderr; the others aborted (--json says
#     which); no new checkpoint anywhere; writes go on.
#  2. One server killed while its prepare waits for a write stuck below
#     the filter (nbdkit's pause filter): exit 2 naming it; the others
#     abort at once and their writes, held meanwhile, complete.
#  3. The controller killed (SIGKILL) once every server has prepared: each
#     server aborts when the connection closes (not by its hold timeout,
#     60 s here), writes go on, nothing is pending.
#  4. The controller stopped (SIGSTOP) once every server has prepared, its
#     connections left open: each server aborts by its hold timeout,
#     writes go on while the controller is still stopped; resumed, it is
#     told that the holds timed out (exit 1, each server named).
#  5. A commit that fails on one server after another committed (commits
#     spaced beyond the hold timeout): the committed one is rolled back
#     (backup-end --failed), exit 1.  A server killed between the
#     commits: the one that committed is rolled back, the killed one is
#     named as possibly holding the pending checkpoint, exit 3.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_filter pause
requires_plugin file

# server NAME [pause]: ${NAME}_sock, ${NAME}_ctl, ${NAME}_pid, ${NAME}_log;
# with pause, nbdkit's pause filter below, controlled by $tmp/pause.sock.
server ()
{
    local n=$1 pause=()
    truncate -s 16M "$tmp/$n.raw"
    rm -f "$tmp/$n.cbt" "$tmp/$n.scratch"
    if [ "${2:-}" = pause ]; then
        pause=(--filter=pause pause-control="$tmp/pause.sock")
    fi
    start_nbdkit --filter=sparsebackup "${pause[@]:0:1}" file "$tmp/$n.raw" \
        sparsebackup-cbt="$tmp/$n.cbt" sparsebackup-control="$tmp/$n.ctl" \
        sparsebackup-scratch="$tmp/$n.scratch" "${pause[@]:1}"
    eval "${n}_sock=\$sock ${n}_ctl=\$tmp/$n.ctl ${n}_pid=\$pid ${n}_log=\$server_log"
}
sctl () { local s=$1; shift; "$ctl_bin" "$s" "$@"; }

# write SOCK OFFSET: one 4K write, waited for (at most 120 s: a hold that
# never ends fails the test instead of hanging it).
write ()
{
    timeout 120 "$nbd_python" -c '
import nbd, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
h.pwrite(b"\x11" * 4096, int(sys.argv[2])); h.shutdown()' "$1" "$2" ||
        fail "a write to $1 did not complete"
}

# clean NAME CHECKPOINT: server NAME holds nothing (once it has seen
# its controller go: at most 120 s, the longest hold here is 60 s), has
# no CHECKPOINT and no pending backup, and takes writes.
clean ()
{
    local ctl_var=${1}_ctl sock_var=${1}_sock i
    for (( i = 0; i < 1200; i++ )); do
        sctl "${!ctl_var}" status > "$tmp/status"
        grep -q " group=" "$tmp/status" || break
        sleep 0.1
    done
    assert_contains "$tmp/status" " pending=- "
    if grep -q " group=" "$tmp/status"; then
        cat "$tmp/status"; fail "$1 still holds writes for a group backup"
    fi
    sctl "${!ctl_var}" checkpoint-list > "$tmp/list"
    if grep -q "^$2 " "$tmp/list"; then
        cat "$tmp/list"; fail "$1 has checkpoint $2"
    fi
    write "${!sock_var}" 0
}

# logged LOG ERE: LOG gets a line matching ERE (the servers log an abort
# just after letting the writes go on: wait for it, at most 120 s).
logged ()
{
    local i
    for (( i = 0; i < 1200; i++ )); do
        grep -E -q -- "$2" "$1" && return 0
        sleep 0.1
    done
    assert_contains "$1" "$2"
}

# group_rc RC ARGS...: group-begin ARGS exits with RC; $tmp/out, $tmp/err.
group_rc ()
{
    local want=$1 rc=0
    shift
    "$ctl_bin" group-begin "$@" > "$tmp/out" 2> "$tmp/err" || rc=$?
    if [ $rc != "$want" ]; then
        cat "$tmp/out" "$tmp/err"
        fail "group-begin $*: exit $rc, expected $want"
    fi
    cat "$tmp/err"
}

server A
server B
server C
server K pause

# ---- 0. four servers; arguments --------------------------------------
"$ctl_bin" --json group-begin g0 --hold-timeout=10000 \
    "$A_ctl" "$B_ctl" "$C_ctl" "$K_ctl" > "$tmp/g0.json"
python3 - "$tmp/g0.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["group"] == "g0" and d["taken"] is True and d["since"] is None, d
assert len(d["servers"]) == 4, d
for s in d["servers"]:
    assert s["state"] == "pending" and s["error"] is None, s
    assert isinstance(s["held-us"], int) and isinstance(s["drain-us"], int), s
assert d["max-held-us"] == max(s["held-us"] for s in d["servers"]), d
print("group of 4: writes held at most %d us" % d["max-held-us"])
PY
for s in A B C K; do
    v=${s}_ctl
    sctl "${!v}" backup-end g0 --ok > /dev/null
done
group_rc 2 g1 "$A_ctl" "$B_ctl" "$A_ctl"
assert_contains "$tmp/err" "are the same socket"
group_rc 2 g1 "$A_ctl" "$B_ctl" "$tmp/../$(basename "$tmp")/A.ctl"
assert_contains "$tmp/err" "are the same socket"
group_rc 2 g1
assert_contains "$tmp/err" "usage: group-begin NEW"
group_rc 2 g1 --hold-timeout=0 "$A_ctl"
assert_contains "$tmp/err" "--hold-timeout: '0' is not a number of milliseconds from 1 to 60000"
group_rc 2 g1 --since g1 "$A_ctl"
assert_contains "$tmp/err" "cannot be its own --since"
group_rc 2 g1 "$A_ctl" "$tmp/nope.ctl"
assert_contains "$tmp/err" "nope.ctl: No such file or directory"
assert_contains "$tmp/err" "group backup 'g1' not taken: 1 of 2 servers failed"
group_rc 2 g1 "$A_ctl" "$B_sock"
assert_contains "$tmp/err" "NBDMAGIC: this is an NBD server's socket"
clean A g1

# ---- 1. one server refuses --------------------------------------------
sctl "$B_ctl" backup-begin g1 > /dev/null
sctl "$B_ctl" backup-end g1 --ok > /dev/null
rc=0
"$ctl_bin" --json group-begin g1 --since g0 "$A_ctl" "$B_ctl" "$C_ctl" \
    > "$tmp/out" 2> "$tmp/err" || rc=$?
cat "$tmp/err"
assert_eq 1 $rc "exit status when a server refuses"
assert_contains "$tmp/err" "^sparsebackup-ctl: $B_ctl: ERR exists checkpoint 'g1' exists on this server"
assert_contains "$tmp/err" "group backup 'g1' not taken: 1 of 3 servers failed \($B_ctl\); no server was left with the checkpoint"
python3 - "$tmp/out" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
assert d["taken"] is False and d["since"] == "g0", d
st = [s["state"] for s in d["servers"]]
assert st == ["aborted", "refused", "aborted"], st
assert d["servers"][1]["error"].startswith("ERR exists"), d
PY
clean A g1
clean C g1

# ---- 2. a server killed while it prepares ------------------------------
# A write stuck below K's filter: K's prepare cannot drain.
"$nbd_python" - "$tmp/pause.sock" <<'PY'
import socket, sys
p = socket.socket(socket.AF_UNIX); p.connect(sys.argv[1]); p.sendall(b"p")
assert p.recv(1) == b"P"
PY
"$nbd_python" -c '
import nbd, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
h.pwrite(b"\x22" * 4096, 1 << 20)' "$K_sock" > /dev/null 2>&1 &
stuck=$!
# It is in flight in the filter once it is recorded.
wait_until 120 "the stuck write recorded on K" \
    eval 'sctl "$K_ctl" map --since g0 | grep -q "^1048576 "'
"$ctl_bin" group-begin g2 --since g0 --hold-timeout=60000 \
    "$A_ctl" "$K_ctl" "$C_ctl" > "$tmp/out" 2> "$tmp/err" &
controller=$!
# A and C hold their writes while K waits for its drain.
for s in A C; do
    v=${s}_ctl
    wait_until 120 "$s holding its writes for g2" \
        eval 'sctl "${!v}" status | grep -q " group=g2$"'
done
"$nbd_python" -c '
import nbd, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
h.pwrite(b"\x33" * 4096, 2 << 20); h.shutdown()' "$A_sock" &
held_write=$!
kill -9 "$K_pid"
rc=0; wait $controller || rc=$?
cat "$tmp/err"
assert_eq 2 $rc "exit status when a server dies during prepare"
assert_contains "$tmp/err" "^sparsebackup-ctl: $K_ctl: the server closed the connection during group-prepare"
assert_contains "$tmp/err" "group backup 'g2' not taken: 1 of 3 servers failed \($K_ctl\)"
wait $held_write || fail "the write held on A during the prepare failed"
wait $stuck 2>/dev/null || true
clean A g2
clean C g2
server K

# ---- 3. the controller killed after prepare ------------------------------
sctl "$K_ctl" backup-begin g0 > /dev/null     # K is new: its own base
sctl "$K_ctl" backup-end g0 --ok > /dev/null
rc=0
SPARSEBACKUP_CTL_DEBUG_KILL=prepared "$ctl_bin" group-begin g3 --since g0 \
    --hold-timeout=60000 "$A_ctl" "$B_ctl" "$K_ctl" || rc=$?
assert_eq 137 $rc "the controller's exit status (SIGKILL)"
for s in A B K; do
    clean $s g3
    v=${s}_log
    logged "${!v}" "group backup 'g3' aborted, writes resumed after [0-9]+ us: the control connection closed"
done

# ---- 4. the controller hung after prepare --------------------------------
SPARSEBACKUP_CTL_DEBUG_STOP=prepared "$ctl_bin" group-begin g4 --since g0 \
    --hold-timeout=1000 "$A_ctl" "$B_ctl" "$K_ctl" \
    > "$tmp/out" 2> "$tmp/err" &
controller=$!
until [ "$(awk '{print $3}' /proc/$controller/stat 2>/dev/null)" = T ]; do
    kill -0 $controller 2>/dev/null || { cat "$tmp/err"; fail "the controller did not stop"; }
    sleep 0.05
done
for s in A B K; do
    v=${s}_sock
    write "${!v}" 0            # completes while the controller is stopped
done
[ "$(awk '{print $3}' /proc/$controller/stat)" = T ] ||
    fail "the controller is not stopped any more"
for s in A B K; do
    clean $s g4
    v=${s}_log
    logged "${!v}" "group backup 'g4' aborted, writes resumed after [0-9]+ us: its hold timed out after 1000 ms"
done
kill -CONT $controller
rc=0; wait $controller || rc=$?
cat "$tmp/err"
assert_eq 1 $rc "exit status after the holds timed out"
for s in A B K; do
    v=${s}_ctl
    assert_contains "$tmp/err" "^sparsebackup-ctl: ${!v}: ERR state group backup 'g4' was aborted: its hold timed out"
done
for s in A B K; do clean $s g4; done

# ---- 5. a commit fails after another committed: rolled back ------------
rc=0
SPARSEBACKUP_CTL_DEBUG_COMMIT_DELAY=4000 "$ctl_bin" group-begin g5 \
    --since g0 --hold-timeout=3000 "$A_ctl" "$B_ctl" \
    > "$tmp/out" 2> "$tmp/err" || rc=$?
cat "$tmp/err"
assert_eq 1 $rc "exit status when a commit fails"
assert_contains "$tmp/err" "^sparsebackup-ctl: $A_ctl: rolled back \(backup-end g5 --failed\)"
assert_contains "$tmp/err" "^sparsebackup-ctl: $B_ctl: ERR state group backup 'g5' was aborted: its hold timed out"
assert_contains "$tmp/err" "no server was left with the checkpoint"
clean A g5
clean B g5
# A server killed between the commits.
SPARSEBACKUP_CTL_DEBUG_COMMIT_DELAY=3000 "$ctl_bin" group-begin g6 \
    --since g0 --hold-timeout=60000 "$A_ctl" "$K_ctl" \
    > "$tmp/out" 2> "$tmp/err" &
controller=$!
wait_until 120 "g6 committed on A" \
    eval 'sctl "$A_ctl" status | grep -q " pending=g6 "'
kill -9 "$K_pid"
rc=0; wait $controller || rc=$?
cat "$tmp/err"
assert_eq 3 $rc "exit status when a server may hold the pending checkpoint"
assert_contains "$tmp/err" "^sparsebackup-ctl: $A_ctl: rolled back"
assert_contains "$tmp/err" "^sparsebackup-ctl: $K_ctl: checkpoint 'g6' may be left pending there: run 'sparsebackup-ctl $K_ctl backup-end g6 --failed' once it answers"
clean A g6
