#!/usr/bin/env bash
# Benchmark (retention): the cost of sparsebackup-retain keeping the last
# N incrementals of a qcow2 chain, against what it replaces.
#
# A BENCH_SIZE (default 1G) disk, BENCH_DATA_PCT (default 25) percent of
# it data in 1M pieces, served by nbdkit --filter=sparsebackup file (cbt,
# scratch file); a full backup c0 and three incrementals c1..c3, each
# after BENCH_CHANGED_PCT (default 5) percent of the disk changed in
# scattered writes (qemu-img convert of @frozen / -B of @frozen:since:,
# each with its manifest, sparsebackup-copy --manifest-only).  Then,
# BENCH_RUNS (default 3) times, interleaved, on fresh copies of the
# chain:
#   retain     sparsebackup-retain --keep=2 c3.qcow2: one merge (c0 and
#              c1 copied, c1 committed into the copy, synced, verified
#              against c1.manifest by reading it through the qcow2
#              plugin, renamed)
#   noverify   the same without c1.manifest: verified with qemu-img
#              compare against c1's chain instead
#   in-place   the unsafe way: qemu-img commit c1.qcow2 into c0.qcow2 in
#              place (a crash in the middle may leave the chain
#              unrestorable), without verification
# Median times, ratios to in-place and to the incremental backup c1
# itself; every result is checked (the kept points against their
# manifests, the in-place result with qemu-img compare).
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-retention.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
need nbdkit qemu-img nbdcopy flock
requires_nbdsh
requires_plugin file
requires_filter sparsebackup
copy="$abs_top_builddir/tools/sparsebackup-copy"
ctl_bin="$abs_top_builddir/tools/ctl/sparsebackup-ctl"
retain="$abs_top_builddir/tools/ctl/sparsebackup-retain"
for p in "$copy" "$ctl_bin" "$retain"; do [ -x "$p" ] || fail "$p was not built"; done
export SPARSEBACKUP_CTL=$ctl_bin SPARSEBACKUP_COPY=$copy

runs=${BENCH_RUNS:-3}
size=$(numfmt --from=iec "${BENCH_SIZE:-1G}")
dpct=${BENCH_DATA_PCT:-25}
cpct=${BENCH_CHANGED_PCT:-5}

cat > "$tmp/rb.py" <<'PY'
import nbd, os, random, sys
def fill(path, size, pct, seed):
    M = 1 << 20; r = random.Random(seed); pool = os.urandom(64 * M)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, M):
            if r.randrange(100) < pct:
                f.seek(off); p = r.randrange(63) * M
                f.write(pool[p:p + min(M, size - off)])
def change(sock, pct, seed):
    G = 65536; h = nbd.NBD(); h.connect_unix(sock); size = h.get_size()
    r = random.Random(seed); want = size // G * pct // 100; done = set()
    pool = os.urandom(17 * G)
    while len(done) < want:
        k = r.choice([1, 2, 4, 16]); g = r.randrange(size // G - k + 1)
        h.pwrite(pool[r.randrange(G):][:k * G], g * G); done.update(range(g, g + k))
    h.flush(); h.shutdown()
if sys.argv[1] == "fill":
    fill(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), 1)
else:
    change(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
PY

"$nbd_python" "$tmp/rb.py" fill "$tmp/disk.raw" "$size" "$dpct"
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$tmp/ctl.sock" \
    sparsebackup-scratch="$tmp/disk.scratch"
view () { echo "nbd+unix:///$1?socket=$sock"; }
mkdir "$tmp/chain"
prev=
for r in 0 1 2 3; do
    cp=c$r
    [ $r = 0 ] || "$nbd_python" "$tmp/rb.py" change "$sock" "$cpct" $r
    "$ctl_bin" "$tmp/ctl.sock" backup-begin $cp ${prev:+--since $prev} > /dev/null
    t0=$(now)
    if [ -z "$prev" ]; then
        (cd "$tmp/chain" && qemu-img convert -f raw -O qcow2 "$(view @frozen)" $cp.qcow2)
    else
        (cd "$tmp/chain" && qemu-img convert -f raw -O qcow2 -B $prev.qcow2 -F qcow2 \
            "$(view @frozen:since:$prev)" $cp.qcow2)
    fi
    tb=$(elapsed "$t0")
    [ $r = 1 ] && t_inc=$tb
    if [ -z "$prev" ]; then
        "$copy" -q --manifest-only --manifest="$tmp/chain/$cp.manifest" "$(view @frozen)"
    else
        "$copy" -q --manifest-only --delta --base-manifest="$tmp/chain/$prev.manifest" \
            --manifest="$tmp/chain/$cp.manifest" "$(view @frozen:since:$prev)"
    fi
    "$ctl_bin" "$tmp/ctl.sock" backup-end $cp --ok > /dev/null
    echo "backup $cp: $(numfmt --to=iec "$(stat -c %s "$tmp/chain/$cp.qcow2")") qcow2 in ${tb} s"
    prev=$cp
done
stop_nbdkit

fresh () { rm -rf "$tmp/w"; cp -a --reflink=auto "$tmp/chain" "$tmp/w"; sync "$tmp/w"; }
t_retain=() t_noverify=() t_inplace=()
for (( i = 0; i < runs; i++ )); do
    fresh
    t_retain+=("$(time1 "$retain" --keep=2 "$tmp/w/c3.qcow2")")
    "$retain" --keep=2 --verify-all "$tmp/w/c3.qcow2" > /dev/null ||
        fail "the points kept differ from their manifests"
    fresh
    rm "$tmp/w/c1.manifest"
    t_noverify+=("$(time1 "$retain" --keep=2 "$tmp/w/c3.qcow2")")
    fresh
    cp -a "$tmp/w/c1.qcow2" "$tmp/c1.before.qcow2"
    t_inplace+=("$(time1 sh -c "cd '$tmp/w' && qemu-img commit -q -f qcow2 c1.qcow2 && sync c0.qcow2")")
    qemu-img compare -q -f qcow2 -F qcow2 "$tmp/w/c0.qcow2" "$tmp/w/c1.qcow2" ||
        fail "the in-place commit changed the point"
done
m_retain=$(median "${t_retain[@]}")
m_noverify=$(median "${t_noverify[@]}")
m_inplace=$(median "${t_inplace[@]}")
echo "retention of a $(numfmt --to=iec "$size") disk ($dpct% data, $cpct% changed per incremental), one merge, median of $runs:"
echo "  sparsebackup-retain (copy, commit, sync, verify by manifest, rename): $m_retain s"
echo "  the same, verified with qemu-img compare (no manifest):               $m_noverify s"
echo "  qemu-img commit in place (unsafe, unverified):                         $m_inplace s"
echo "  ratios: retain / in-place $(ratio "$m_retain" "$m_inplace"), retain / the incremental backup c1 ($t_inc s) $(ratio "$m_retain" "$t_inc")"
