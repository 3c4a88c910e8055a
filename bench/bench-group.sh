#!/usr/bin/env bash
# Benchmark (group backups): how long writes are held when one backup is
# begun on several disks at one point in time.
#
# For a group of 1, 2 and 4 disks (BENCH_GROUP_SIZE, default 256M each,
# nbdkit --filter=sparsebackup file, with sparsebackup-cbt and a scratch
# file), each disk written by its own client all along (random 4K
# writes at distinct offsets, BENCH_QD (default 8) in flight), and again
# with the disks idle: BENCH_RUNS (default 9) times
#   sparsebackup-ctl --json group-begin gN [--since gN-1] SOCKET...
# then backup-end on each.  Printed, median and largest over the runs:
#   held     the longest time a server of the group held its writes
#            (held-us of its group-commit: from the drain to the release)
#   elapsed  from the first group-prepare sent to the last group-commit
#            answered (the controller's view)
#   The peer is a group of 1: the same drain, checkpoint and freeze on
#   one disk (what backup-begin does), without coordination.
#   write    the slowest write of the clients during the runs, against
#            the slowest in as many seconds without backups
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-group.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
need nbdkit
requires_nbdsh
requires_plugin file
requires_filter sparsebackup
ctl_bin="$abs_top_builddir/tools/ctl/sparsebackup-ctl"
[ -x "$ctl_bin" ] || fail "$ctl_bin was not built"

runs=${BENCH_RUNS:-9}
dsize=$(numfmt --from=iec "${BENCH_GROUP_SIZE:-256M}")
qd=${BENCH_QD:-8}

cat > "$tmp/writer.py" <<'PY'
# Random 4K writes, QD in flight, until STOP exists; prints the slowest
# write's latency (seconds) and the number of writes.
import nbd, os, random, sys, time
sock, qd, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
h = nbd.NBD(); h.connect_unix(sock)
size = h.get_size(); B = 4096
r = random.Random(sock)
buf = nbd.Buffer.from_bytearray(bytearray(os.urandom(B)))
worst = 0.0
n = 0
def done(t0):
    def cb(err):
        global worst, n
        if err.value:
            sys.exit("a write failed: errno %d" % err.value)
        worst = max(worst, time.monotonic() - t0); n += 1
        return 1
    return cb
while not os.path.exists(stop):
    while h.aio_in_flight() < qd:
        h.aio_pwrite(buf, r.randrange(size // B) * B,
                     completion=done(time.monotonic()))
    h.poll(-1)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.shutdown()
print("%.6f %d" % (worst, n))
PY

# servers N: N disks served; sockets in socks[], controls in ctls[].
servers ()
{
    socks=() ctls=()
    for (( d = 0; d < $1; d++ )); do
        rm -f "$tmp/d$d.raw" "$tmp/d$d.cbt" "$tmp/d$d.scratch"
        truncate -s "$dsize" "$tmp/d$d.raw"
        start_nbdkit --filter=sparsebackup file "$tmp/d$d.raw" \
            sparsebackup-cbt="$tmp/d$d.cbt" \
            sparsebackup-control="$tmp/d$d.ctl" \
            sparsebackup-scratch="$tmp/d$d.scratch"
        socks+=("$sock") ctls+=("$tmp/d$d.ctl") pids+=("$pid")
    done
}
stop_servers () { for p in "${pids[@]}"; do stop_nbdkit "$p"; done; pids=(); }

writers_start ()
{
    rm -f "$tmp/stop"
    wpids=()
    for (( d = 0; d < ${#socks[@]}; d++ )); do
        "$nbd_python" "$tmp/writer.py" "${socks[$d]}" $qd "$tmp/stop" \
            > "$tmp/w$d.out" &
        wpids+=($!)
    done
    sleep 0.5
}
# writers_stop: $worst_ms, the slowest write of all the writers (not in
# a $(...): the writers are children of this shell).
writers_stop ()
{
    touch "$tmp/stop"
    local w worst=0
    for (( d = 0; d < ${#wpids[@]}; d++ )); do
        wait "${wpids[$d]}" || fail "writer $d failed"
        w=$(cut -d' ' -f1 "$tmp/w$d.out")
        worst=$(awk -v a="$worst" -v b="$w" 'BEGIN {print (b > a) ? b : a}')
    done
    worst_ms=$(awk -v w="$worst" 'BEGIN {printf "%.1f", w * 1000}')
}

maxof () { printf '%s\n' "$@" | sort -g | tail -n 1; }

# group_runs PREFIX LABEL: RUNS group backups (checkpoints PREFIX1...);
# prints one result line.
group_runs ()
{
    local p=$1 held=() el=() since=() i j h e
    shift
    for (( i = 1; i <= runs; i++ )); do
        "$ctl_bin" --json group-begin $p$i "${since[@]}" --hold-timeout=30000 \
            "${ctls[@]}" > "$tmp/g.json"
        read -r h e < <(python3 -c '
import json, sys
d = json.load(open(sys.argv[1])); assert d["taken"], d
print(d["max-held-us"], d["elapsed-us"])' "$tmp/g.json")
        held+=("$(awk -v v="$h" 'BEGIN {printf "%.3f", v / 1000}')")
        el+=("$(awk -v v="$e" 'BEGIN {printf "%.3f", v / 1000}')")
        for j in "${ctls[@]}"; do "$ctl_bin" "$j" backup-end $p$i --ok > /dev/null; done
        since=(--since $p$i)
    done
    printf '%-18s writes held %7.3f ms median, %7.3f max | elapsed %7.3f ms median, %7.3f max\n' \
        "$1" "$(median "${held[@]}")" "$(maxof "${held[@]}")" \
        "$(median "${el[@]}")" "$(maxof "${el[@]}")"
}

pids=()
echo "group backups: $runs runs each, disks of $(numfmt --to=iec "$dsize"), writers: random 4K, $qd in flight per disk"
for n in 1 2 4; do
    servers $n
    group_runs i "$n disks, idle"
    writers_start
    sleep 2
    writers_stop
    base=$worst_ms
    writers_start
    group_runs w "$n disks, written"
    writers_stop
    during=$worst_ms
    echo "  slowest write of $n clients: $during ms during the runs, $base ms in 2 s without backups"
    stop_servers
done
