#!/usr/bin/env bash
# Benchmark (issue 17): checkpoint changes must not stall writes.  A 1T
# disk (BENCH_STALL_SIZE) at 512 byte granules with 16 checkpoints
# (BENCH_STALL_CHECKPOINTS); the goal is that no write waits more than
# 100 ms for a checkpoint change, whatever the disk size, granularity or
# number of checkpoints.
#
# 1. The library alone (bench-cbt-stall, bench-cbt-stall.c), in the three
#    modes: a thread marks 4K at random offsets (20000 a second,
#    BENCH_MARK_RATE; and commits in write-ahead mode) while checkpoints
#    are created, confirmed, failed and deleted; the 99th percentile and
#    the longest mark during each change, against an idle second, and the
#    file's size.
# 2. Through the filter: nbdkit memory 1T with sparsebackup-cbt at 512
#    byte granules (in-use, write-ahead, and process-safe when the filter
#    takes sparsebackup-cbt-mode=process-safe), a client writing 4K at
#    random offsets in a loop (libnbd python, one request at a time);
#    16 checkpoints made with backup-begin / backup-end --ok while it
#    writes; then the longest write (and the 99th percentile) during
#    backup-begin, backup-end --ok and checkpoint-delete of a middle
#    checkpoint (sparsebackup-ctl), and during an idle second.  (The
#    filter may hold its own locks around a checkpoint change: this
#    measures what a client sees.)
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-cbt-stall.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
need nbdkit
requires_nbdsh
requires_plugin memory
requires_filter sparsebackup
stall_bin="$abs_top_builddir/bench/bench-cbt-stall"
ctl_bin="$abs_top_builddir/tools/ctl/sparsebackup-ctl"
[ -x "$stall_bin" ] || make -C "$abs_top_builddir/bench" bench-cbt-stall >&2 ||
    fail "$stall_bin was not built"
[ -x "$ctl_bin" ] || fail "$ctl_bin was not built"

size=$(numfmt --from=iec "${BENCH_STALL_SIZE:-1T}")
ncp=${BENCH_STALL_CHECKPOINTS:-16}
t_start=$(now)

# ---- 1. The library alone ------------------------------------------------

echo "1. the library (bench-cbt-stall): a $(numfmt --to=iec "$size") disk," \
     "512 byte granules, $ncp checkpoints"
for mode in in-use write-ahead process-safe; do
    "$stall_bin" "$tmp/lib.cbt" "$size" 512 "$ncp" "$mode" 2000 |
        sed 's/^/  /' || fail "bench-cbt-stall $mode failed"
    rm -f "$tmp/lib.cbt"
done
echo "($(elapsed "$t_start") s so far)"

# ---- 2. Through the filter ------------------------------------------------

cat > "$tmp/stall.py" <<'PY'
import nbd, random, subprocess, sys, threading, time

uri, ctl, sock, ncp = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
h = nbd.NBD()
h.connect_uri(uri)
size = h.get_size()
buf = bytes(range(256)) * 16
lat = []                    # (start, seconds)
stop = False

def writer():
    r = random.Random(1)
    while not stop:
        off = r.randrange(size // 4096) * 4096
        t = time.monotonic()
        h.pwrite(buf, off)
        lat.append((t, time.monotonic() - t))

def run(*args):
    t0 = time.monotonic()
    p = subprocess.run([ctl, sock] + list(args), capture_output=True, text=True)
    t1 = time.monotonic()
    if p.returncode != 0:
        sys.exit("sparsebackup-ctl %s: %s%s" % (" ".join(args), p.stdout, p.stderr))
    return t0, t1

def report(label, t0, t1):
    w = sorted(d for s, d in lat if t0 <= s < t1)
    if not w:
        print("  %-26s %7.3f s, no write began meanwhile" % (label, t1 - t0))
        return 0
    print("  %-26s %7.3f s, %6d writes, 99%% within %7.2f ms, the longest "
          "%7.2f ms" % (label, t1 - t0, len(w), w[len(w) * 99 // 100] * 1000,
                        w[-1] * 1000))
    return w[-1]

th = threading.Thread(target=writer)
th.start()
try:
    t = time.monotonic()
    for k in range(1, ncp + 1):
        run("backup-begin", "c%d" % k)
        time.sleep(0.05)
        run("backup-end", "c%d" % k, "--ok")
        time.sleep(0.05)
    setup = time.monotonic() - t
    time.sleep(0.5)
    t0 = time.monotonic(); time.sleep(1); t1 = time.monotonic()
    worst = [report("idle (1 s)", t0, t1)]
    time.sleep(0.2)
    worst.append(report("backup-begin", *run("backup-begin", "n1", "--since", "c%d" % ncp)))
    time.sleep(0.2)
    worst.append(report("backup-end --ok", *run("backup-end", "n1", "--ok")))
    time.sleep(0.2)
    worst.append(report("checkpoint-delete (middle)", *run("checkpoint-delete", "c%d" % (ncp // 2))))
    time.sleep(0.2)
finally:
    stop = True
    th.join()
h.shutdown()
print("  (set-up: %d checkpoints in %.1f s; longest during a change: %.2f ms)"
      % (ncp, setup, max(worst[1:]) * 1000))
PY

ctlsock="$tmp/ctl.sock"
modes=(in-use write-ahead process-safe)
echo "2. through the filter: nbdkit memory $(numfmt --to=iec "$size")," \
     "sparsebackup-cbt at 512 byte granules, a client writing 4K at random" \
     "offsets one at a time"
for mode in "${modes[@]}"; do
    rm -f "$tmp/f.cbt"
    if ! nbdkit --filter=sparsebackup null 1M sparsebackup-cbt="$tmp/probe.cbt" \
         sparsebackup-cbt-mode="$mode" --run true >/dev/null 2>&1; then
        echo "  $mode: the filter does not take sparsebackup-cbt-mode=$mode (yet): skipped"
        continue
    fi
    rm -f "$tmp/probe.cbt"
    start_nbdkit --filter=sparsebackup memory "$size" \
        sparsebackup-cbt="$tmp/f.cbt" sparsebackup-cbt-granularity=512 \
        sparsebackup-cbt-mode="$mode" sparsebackup-control="$ctlsock"
    echo " $mode:"
    "$nbd_python" "$tmp/stall.py" "$uri" "$ctl_bin" "$ctlsock" "$ncp" ||
        fail "$mode: the client failed"
    echo "  cbt file: $(numfmt --to=iec "$(stat -c %s "$tmp/f.cbt")")"
    stop_nbdkit
done
echo "total $(elapsed "$t_start") s"
