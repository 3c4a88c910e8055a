#!/usr/bin/env bash
# Group backups are a consistent cut across disks.
#
# One client writes ordered pairs, many times: write k to disk A, wait
# for it, then write k to disk B, wait for it (k = 1, 2, ...; write k
# fills slot k mod SLOTS of each disk, 4 KiB, with k).  A backup begun
# on both disks at one point in time sees A at write a and B at write b
# with b <= a <= b + 1: whenever B holds write k, A holds it too (the
# client wrote A first), and no more than the one write in flight
# separates them.
#
#  1. With a scratch file: sparsebackup-ctl group-begin over both
#     control sockets while the client writes, TRIES times (the later
#     ones with the commits spaced by 200 ms, SPARSEBACKUP_CTL_DEBUG_
#     COMMIT_DELAY, so that a server that did not hold its writes would
#     show it); a and b read from @frozen of each server.  Every try is
#     consistent, and the cut moves on between tries (the client kept
#     writing).  The longest time writes were held is printed.
#  2. The same without a group: backup-begin on A, then on B, TRIES
#     times: the detector must see the inconsistency (b > a) at least
#     once, or it could not fail.
#  3. Without a scratch file (sparsebackup-cbt only): group-begin while
#     the client writes; the slots recorded as changed after the new
#     checkpoint (map --since) start right after a on A and after b on
#     B: the records of both disks split at one point too.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_plugin file

tries=${GROUP_TRIES:-6}
slots=2048
size=$((slots * 4096))

# server NAME [ARGS...]: a disk served with cbt and a control socket;
# ${NAME}_sock, ${NAME}_ctl.
server ()
{
    local n=$1
    shift
    rm -f "$tmp/$n.raw" "$tmp/$n.cbt" "$tmp/$n.scratch"
    truncate -s $size "$tmp/$n.raw"
    start_nbdkit --filter=sparsebackup file "$tmp/$n.raw" \
        sparsebackup-cbt="$tmp/$n.cbt" sparsebackup-cbt-granularity=4096 \
        sparsebackup-control="$tmp/$n.ctl" "$@"
    eval "${n}_sock=\$sock ${n}_ctl=\$tmp/$n.ctl ${n}_pid=\$pid"
}

cat > "$tmp/writer.py" <<'PY'
# Ordered pairs: A then B, each waited for, until STOP exists.
import nbd, os, struct, sys
a_sock, b_sock, slots, stop = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
a = nbd.NBD(); a.connect_unix(a_sock)
b = nbd.NBD(); b.connect_unix(b_sock)
k = 0
while not os.path.exists(stop):
    for _ in range(50):
        k += 1
        buf = struct.pack("<Q", k) * 512
        off = (k % slots) * 4096
        a.pwrite(buf, off)
        b.pwrite(buf, off)
a.shutdown(); b.shutdown()
print(k)
PY

cat > "$tmp/cut.py" <<'PY'
# The last write of the client in export EXPORT of SOCK (the largest k
# of any slot); every slot must hold one write whole.
import nbd, struct, sys
sock, export, slots = sys.argv[1], sys.argv[2], int(sys.argv[3])
h = nbd.NBD(); h.set_export_name(export); h.connect_unix(sock)
data = h.pread(slots * 4096, 0)
h.shutdown()
top = 0
for s in range(slots):
    blk = data[s * 4096:(s + 1) * 4096]
    k = struct.unpack_from("<Q", blk)[0]
    if blk != struct.pack("<Q", k) * 512:
        sys.exit("%s: slot %d holds a torn write" % (export, s))
    if k and k % slots != s:
        sys.exit("%s: slot %d holds write %d" % (export, s, k))
    top = max(top, k)
print(top)
PY

cat > "$tmp/after.py" <<'PY'
# From the ranges changed since a checkpoint (map lines on stdin): the
# first slot written after it (the start of the one cyclic run of
# changed slots).
import sys
slots = int(sys.argv[1])
changed = set()
for l in sys.stdin:
    if l.startswith("OK"):
        continue
    o, n = map(int, l.split())
    changed.update(range(o // 4096, (o + n) // 4096))
starts = [s for s in changed if (s - 1) % slots not in changed]
if len(changed) == slots or len(starts) != 1:
    sys.exit("no single run of slots changed after the checkpoint: %d "
             "slots, %d runs" % (len(changed), len(starts)))
print(starts[0])
PY

start_writer ()
{
    rm -f "$tmp/stop"
    "$nbd_python" "$tmp/writer.py" "$1" "$2" $slots "$tmp/stop" \
        > "$tmp/writer.out" &
    writer=$!
    cleanup_fn "touch $tmp/stop; wait $writer 2>/dev/null"
    # The client is writing before the first backup.
    wait_until 120 "the client's first 100 writes" progressed "$1" 99
}
# progressed SOCK K: the client's last write on SOCK's disk is after
# write K (fails the test if the writer died).
progressed ()
{
    kill -0 $writer 2>/dev/null || fail "the writer died"
    [ "$("$nbd_python" "$tmp/cut.py" "$1" "" $slots)" -gt "$2" ]
}
stop_writer ()
{
    touch "$tmp/stop"
    wait $writer || fail "the writer failed"
    echo "the client wrote $(cat "$tmp/writer.out") pairs"
}

# cut LABEL A-EXPORT B-EXPORT: a and b from both frozen disks; sets $a $b.
cut ()
{
    a=$("$nbd_python" "$tmp/cut.py" "$A_sock" "$2" $slots) ||
        fail "$1: cannot read A's $2"
    b=$("$nbd_python" "$tmp/cut.py" "$B_sock" "$3" $slots) ||
        fail "$1: cannot read B's $3"
}

# ---- 1. group-begin: every try consistent -----------------------------
server A sparsebackup-scratch="$tmp/A.scratch"
server B sparsebackup-scratch="$tmp/B.scratch"
start_writer "$A_sock" "$B_sock"
since=() last=0 max_held=0
for (( i = 1; i <= tries; i++ )); do
    delay=
    if (( i > tries / 2 )); then delay=200; fi
    # The client has written since the last cut.
    wait_until 120 "the client writing after the cut at $last" \
        progressed "$A_sock" $last
    SPARSEBACKUP_CTL_DEBUG_COMMIT_DELAY=$delay "$ctl_bin" --json \
        group-begin g$i "${since[@]}" --hold-timeout=20000 \
        "$A_ctl" "$B_ctl" > "$tmp/group.json" ||
        { cat "$tmp/group.json"; fail "group-begin g$i failed"; }
    held=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["max-held-us"])' "$tmp/group.json")
    (( held > max_held )) && max_held=$held
    cut "group g$i" @frozen @frozen
    echo "group g$i (commits ${delay:-0} ms apart): A at write $a, B at write $b, writes held $held us at most"
    (( b <= a )) || fail "group g$i: B's frozen disk holds write $b, A's only up to $a"
    (( a <= b + 1 )) || fail "group g$i: A's frozen disk holds write $a, B's only up to $b: not one point in time"
    (( a > last )) || fail "group g$i: the client made no progress (write $a)"
    if [ -n "$delay" ] && (( held < delay * 1000 )); then
        fail "group g$i: the commits were $delay ms apart but writes were held $held us"
    fi
    last=$a
    "$ctl_bin" "$A_ctl" backup-end g$i --ok > /dev/null
    "$ctl_bin" "$B_ctl" backup-end g$i --ok > /dev/null
    since=(--since g$i)
done
echo "group of 2 disks: writes held at most $max_held us (over $tries group backups, half of them with commits 200 ms apart)"

# ---- 2. without a group: the detector sees the inconsistency -----------
bad=0
for (( i = 1; i <= tries; i++ )); do
    "$ctl_bin" "$A_ctl" backup-begin s$i > /dev/null
    # B is frozen once the client has written two more pairs than A's
    # frozen disk holds (not after a fixed time: a loaded machine may
    # not have run the client at all meanwhile), so B holds a write that
    # A's frozen disk does not: the detector must see it.
    a=$("$nbd_python" "$tmp/cut.py" "$A_sock" @frozen $slots) ||
        fail "separate s$i: cannot read A's @frozen"
    wait_until 120 "the client writing after A's backup-begin s$i" \
        progressed "$A_sock" $((a + 1))
    "$ctl_bin" "$B_ctl" backup-begin s$i > /dev/null
    cut "separate s$i" @frozen @frozen
    echo "separate s$i: A at write $a, B at write $b"
    if (( b > a )); then bad=$((bad + 1)); fi
    "$ctl_bin" "$A_ctl" backup-end s$i --ok > /dev/null
    "$ctl_bin" "$B_ctl" backup-end s$i --ok > /dev/null
done
echo "backups begun one after the other: $bad of $tries inconsistent"
(( bad > 0 )) || fail "the detector never saw backups begun one after the other as inconsistent"
stop_writer
stop_nbdkit "$A_pid"
stop_nbdkit "$B_pid"

# ---- 3. without a scratch file: the records split at one point --------
# More slots, so that the client cannot wrap around while the maps are
# read.
slots=16384
size=$((slots * 4096))
server A
server B
start_writer "$A_sock" "$B_sock"
"$ctl_bin" "$A_ctl" backup-begin n0 > /dev/null
"$ctl_bin" "$B_ctl" backup-begin n0 > /dev/null
"$ctl_bin" "$A_ctl" backup-end n0 --ok > /dev/null
"$ctl_bin" "$B_ctl" backup-end n0 --ok > /dev/null
for (( i = 1; i <= 3; i++ )); do
    "$ctl_bin" group-begin n$i --since n$((i - 1)) --hold-timeout=20000 \
        "$A_ctl" "$B_ctl" > "$tmp/out" || fail "group-begin n$i failed"
    "$ctl_bin" "$A_ctl" backup-end n$i --ok > /dev/null
    "$ctl_bin" "$B_ctl" backup-end n$i --ok > /dev/null
    # Wait for writes after the cut on both (far fewer than the slots).
    for (( j = 0; j < 2400; j++ )); do
        "$ctl_bin" "$A_ctl" map --since n$i > "$tmp/mapA"
        "$ctl_bin" "$B_ctl" map --since n$i > "$tmp/mapB"
        grep -q extents=0 "$tmp/mapA" "$tmp/mapB" || break
        sleep 0.05
    done
    grep -q extents=0 "$tmp/mapA" "$tmp/mapB" &&
        fail "n$i: no write recorded after the cut on both disks (polled 2400 times)"
    ra=$(python3 "$tmp/after.py" $slots < "$tmp/mapA") ||
        fail "n$i: A's record since n$i"
    rb=$(python3 "$tmp/after.py" $slots < "$tmp/mapB") ||
        fail "n$i: B's record since n$i"
    d=$(( (ra - rb + slots) % slots ))
    echo "group n$i without scratch: first slot after the cut: A $ra, B $rb"
    (( d <= 1 )) || fail "group n$i: the records of A and B do not split at one point (A from slot $ra, B from slot $rb)"
done
stop_writer
