#!/usr/bin/env bash
# Benchmark (incremental backup): the cost of changed-block tracking on
# writes, and what an incremental backup saves over a full one.
#
# 1. Writes through nbdkit --filter=sparsebackup file target, with
#    recording off, sparsebackup-cbt=F (in-use mode, the default),
#    sparsebackup-cbt-mode=write-ahead and sparsebackup-cbt-mode=
#    process-safe (when the filter takes it: skipped otherwise, with a
#    note); a fresh cbt file each run; the modes interleaved (rotating
#    order), BENCH_RUNS (default 7) timed runs each, after an untimed
#    one into a new target whose result is compared with what was
#    written:
#      dense   nbdcopy of BENCH_WRITE_SIZE (default 512M) of random data
#      random  BENCH_RAND_WRITES (default 10000) 4K writes at distinct
#              random offsets of a BENCH_RAND_SIZE (default 1G) target,
#              BENCH_QD (default 16) in flight (libnbd python)
#    Median times, ratios to "off" (goal for in-use: <= 1.03; for
#    process-safe, issue 22: dense <= 1.03, random <= 1.05), the
#    server's CPU time per run (mean; /proc/PID/stat), and the syncs of
#    the record (statistics file: cbt-syncs) per GiB written.
# 2. A BENCH_SIZE (default 4G) disk, BENCH_DATA_PCT (default 25) percent
#    of it data in 1M pieces, backed up in full (qemu-img convert after
#    backup-begin c1); then BENCH_CHANGED_PCT (default 5) percent of it
#    changed through the filter in scattered writes of 1 to 16 granules.
#    Then, BENCH_BACKUP_RUNS (default 3) times, interleaved, each against
#    a fresh server (its statistics file gives the bytes read):
#      full qcow2   qemu-img convert of the disk to qcow2
#      inc qcow2    qemu-img convert -B full.qcow2 of @since:c1, after
#                   backup-begin c2 --since c1 (ended --failed: the next
#                   run finds the same state)
#      full raw     sparsebackup-copy of the disk to a new raw file
#      delta raw    sparsebackup-copy --delta of @since:c1 onto a copy
#                   of the first full backup
#    Median times, bytes read by the client and from the file (the
#    statistics file's read-bytes, plugin-read-bytes), bytes allocated
#    by the result (for delta raw: the whole updated copy), ratios
#    incremental / full.  Every result
#    is compared with the disk (qemu-img compare, the qcow2 ones through
#    their backing chain): a wrong backup fails.
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-cbt.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
need nbdkit nbdcopy nbdinfo qemu-img
requires_nbdsh
requires_plugin file
requires_filter sparsebackup
copy="$abs_top_builddir/tools/sparsebackup-copy"
ctl_bin="$abs_top_builddir/tools/ctl/sparsebackup-ctl"
[ -x "$copy" ] || fail "$copy was not built"
[ -x "$ctl_bin" ] || fail "$ctl_bin was not built"

runs=${BENCH_RUNS:-7}
wsize=$(numfmt --from=iec "${BENCH_WRITE_SIZE:-512M}")
rwrites=${BENCH_RAND_WRITES:-10000}
rsize=$(numfmt --from=iec "${BENCH_RAND_SIZE:-1G}")
qd=${BENCH_QD:-16}
size=$(numfmt --from=iec "${BENCH_SIZE:-4G}")
dpct=${BENCH_DATA_PCT:-25}
cpct=${BENCH_CHANGED_PCT:-5}
bruns=${BENCH_BACKUP_RUNS:-3}
gran=65536
GiB=1073741824
hz=$(getconf CLK_TCK)
t_start=$(now)

cat > "$tmp/cbtbench.py" <<'PY'
import nbd, os, random, sys, time

def rand(uri, n, qd, seed, expect=None):
    """N 4K writes at distinct random offsets, QD in flight; prints the
    seconds from the first write to the end of the flush."""
    B = 4096
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    offs = random.Random(seed).sample(range(size // B), n)
    pool = random.Random(seed + 1).randbytes(256 * B)
    bufs = [nbd.Buffer.from_bytearray(bytearray(pool[i * B:(i + 1) * B]))
            for i in range(256)]
    errors = []
    def done(err):
        if err.value:
            errors.append(err.value)
        return 1
    t0 = time.monotonic()
    i = 0
    while i < n or h.aio_in_flight() > 0:
        while i < n and h.aio_in_flight() < qd:
            h.aio_pwrite(bufs[i % 256], offs[i] * B, completion=done)
            i += 1
        h.poll(-1)
    h.flush()
    t1 = time.monotonic()
    h.shutdown()
    if errors:
        sys.exit("%d writes failed (errno %d)" % (len(errors), errors[0]))
    if expect:
        with open(expect, "wb") as f:
            f.truncate(size)
            for i in range(n):
                f.seek(offs[i] * B)
                f.write(pool[(i % 256) * B:(i % 256 + 1) * B])
    print("%.4f" % (t1 - t0))

def fill(path, size, pct, seed):
    """PCT percent of the 1M pieces of a sparse file of SIZE: data."""
    M = 1 << 20
    r = random.Random(seed)
    pool = os.urandom(64 * M)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, M):
            if r.randrange(100) < pct:
                f.seek(off)
                p = r.randrange(63) * M
                f.write(pool[p:p + min(M, size - off)])

def change(uri, pct, gran, seed):
    """Through NBD: writes of 1, 2, 4 or 16 granules at random granule
    offsets until PCT percent of the granules changed; prints the bytes
    changed (the union) and written."""
    h = nbd.NBD()
    h.connect_uri(uri)
    size = h.get_size()
    r = random.Random(seed)
    ng = size // gran
    want = ng * pct // 100
    pool = os.urandom(16 * gran + 4096)
    done = set()
    written = 0
    while len(done) < want:
        k = r.choice([1, 2, 4, 16])
        g = r.randrange(ng - k + 1)
        p = r.randrange(4096)
        h.pwrite(pool[p:p + k * gran], g * gran)
        done.update(range(g, g + k))
        written += k * gran
    h.flush()
    h.shutdown()
    print(len(done) * gran, written)

cmd, args = sys.argv[1], sys.argv[2:]
if cmd == "rand":
    rand(args[0], int(args[1]), int(args[2]), int(args[3]), *args[4:])
elif cmd == "fill":
    fill(args[0], int(args[1]), int(args[2]), int(args[3]))
elif cmd == "change":
    change(args[0], int(args[1]), int(args[2]), int(args[3]))
PY
py () { "$nbd_python" "$tmp/cbtbench.py" "$@"; }
ctlsock="$tmp/ctl.sock"
ctl () { "$ctl_bin" "$ctlsock" "$@" >/dev/null; }

# sb KEY [FILE]: the value of KEY in the filter's statistics file.
sb ()
{
    local v
    v=$(sed -n -E "s/^$1: ([0-9]+)$/\1/p" "${2:-$tmp/stats}")
    [ -n "$v" ] || fail "no $1 in ${2:-$tmp/stats}"
    echo "$v"
}

# same FMT IMAGE MESSAGE: fail with MESSAGE unless IMAGE (format FMT)
# has the contents of the raw file $ref.  (qemu-img compare skips the
# holes of both: cmp of a sparse 4G disk takes a while.)
same ()
{
    qemu-img compare -q -f raw -F "$1" "$ref" "$2" || fail "$3"
}

iec () { numfmt --to=iec --format=%.1f "$1"; }
per_gib () { awk -v n="$1" -v b="$2" -v g=$GiB 'BEGIN {printf "%.0f", n * g / b}'; }

# ---- 1. The cost of recording on writes --------------------------------

# cputicks: the CPU time of the server $pid so far (user + system, all
# threads, clock ticks): less disturbed than the wall-clock time by
# other load on the machine.
cputicks () { awk '{print $14 + $15}' "/proc/$pid/stat"; }

modes=(off in-use write-ahead)
# process-safe once the filter takes it (it reads the boot id itself).
if nbdkit --filter=sparsebackup null 1M sparsebackup-cbt="$tmp/probe.cbt" \
       sparsebackup-cbt-mode=process-safe --run true >/dev/null 2>&1; then
    modes+=(process-safe)
else
    echo "(process-safe: the filter does not take" \
         "sparsebackup-cbt-mode=process-safe yet: not measured)"
fi
rm -f "$tmp/probe.cbt"
nmodes=${#modes[@]}
# mode_args MODE: the filter parameters of MODE.
mode_args ()
{
    case "$1" in
        off) ;;
        in-use) echo "sparsebackup-cbt=$tmp/t.cbt" ;;
        *) echo "sparsebackup-cbt=$tmp/t.cbt sparsebackup-cbt-mode=$1" ;;
    esac
}

# wrun KIND MODE [CHECK]: one run of KIND (dense, random) in MODE into
# the target $tmp/KIND-MODE.img, with a fresh cbt file.  CHECK=1: the
# untimed first run, into a new (sparse) target, compared afterwards
# with what was written.  Otherwise a timed run over the target of the
# first (the same blocks allocated in every mode: freeing a big file
# can take seconds on a loaded machine); appends the seconds to
# ${KIND}_MODE_t, the syncs to ${KIND}_MODE_s and the server's CPU
# ticks meanwhile to ${KIND}_MODE_c (arrays; "-" in MODE becomes "_").
wrun ()
{
    local kind="$1" mode="$2" check="${3:-}" t s c var="${1}_${2//-/_}" tsize
    local tgt="$tmp/$kind-$mode.img"
    [ "$kind" = dense ] && tsize=$wsize || tsize=$rsize
    rm -f "$tmp/t.cbt"
    [ -z "$check" ] || truncate -s "$tsize" "$tgt"
    # shellcheck disable=SC2046
    start_nbdkit --filter=sparsebackup file "$tgt" \
        sparsebackup-statsfile="$tmp/stats" $(mode_args "$mode")
    # A first connection opens (creates) the cbt file: not timed.
    nbdinfo --size "$uri" >/dev/null
    c=$(cputicks)
    if [ "$kind" = dense ]; then
        t=$(time1 nbdcopy "$tmp/src.img" "$uri")
    else
        t=$(py rand "$uri" "$rwrites" "$qd" 1 \
               ${check:+"$tmp/expect.img"}) || fail "random writes failed"
    fi
    c=$(( $(cputicks) - c ))
    stop_nbdkit
    s=0
    [ "$mode" = off ] || s=$(sb cbt-syncs)
    [ "$mode" != in-use ] || [ "$s" -eq 0 ] ||
        fail "in-use mode synced the record $s times for writes"
    [ "$mode" != process-safe ] || [ "$s" -eq 0 ] ||
        fail "process-safe mode synced the record $s times for writes"
    [ "$mode" != write-ahead ] || [ "$s" -gt 0 ] ||
        fail "write-ahead mode never synced the record"
    [ "$mode" = off ] || [ "$(sb cbt-marks)" -eq "$(sb changes)" ] ||
        fail "$mode: cbt-marks differs from changes"
    if [ -n "$check" ]; then
        [ "$kind" = dense ] && ref=$tmp/src.img || ref=$tmp/expect.img
        same raw "$tgt" "$kind writes with recording $mode: the target differs"
    else
        eval "${var}_t+=($t); ${var}_s+=($s); ${var}_c+=($c)"
    fi
}

# sum N...: the sum of the numbers.
sum () { printf '%s\n' "$@" | awk '{s += $1} END {print s + 0}'; }

# wreport KIND BYTES-PER-RUN LABEL: median times; the server's CPU time
# (clock ticks, so the mean of all runs: 10 ms resolution per run)
wreport ()
{
    local kind="$1" bytes="$2" mode var m mo ms mc mco
    echo "$3"
    mo=$(eval median "\${${kind}_off_t[@]}")
    mco=$(eval sum "\${${kind}_off_c[@]}")
    for mode in "${modes[@]}"; do
        var="${kind}_${mode//-/_}"
        m=$(eval median "\${${var}_t[@]}")
        ms=$(eval median "\${${var}_s[@]}")
        mc=$(eval sum "\${${var}_c[@]}")
        printf "  %-12s %s\n  %-12s median %.3f s (%.0f MiB/s), ratio %s; server CPU %.0f ms/run, ratio %s" \
            "$mode" "$(eval echo "\${${var}_t[*]}")" "" "$m" \
            "$(awk -v b="$bytes" -v t="$m" 'BEGIN {print b / t / 1048576}')" \
            "$(ratio "$m" "$mo")" \
            "$(awk -v c="$mc" -v h="$hz" -v n="$runs" 'BEGIN {print c * 1000 / h / n}')" \
            "$(ratio "$mc" "$mco")"
        [ "$mode" = off ] || printf "; syncs %s/GiB" "$(per_gib "$ms" "$bytes")"
        echo
    done
}

head -c "$wsize" /dev/urandom > "$tmp/src.img"
echo "writes: $runs runs per mode, interleaved; dense: nbdcopy of" \
     "$(iec "$wsize") random data; random: $rwrites 4K writes" \
     "(distinct offsets) into $(iec "$rsize"), $qd in flight"
for mode in "${modes[@]}"; do
    wrun dense "$mode" check
    wrun random "$mode" check
done
for (( i = 0; i < runs; i++ )); do
    for (( j = 0; j < nmodes; j++ )); do
        mode=${modes[(i + j) % nmodes]}
        wrun dense "$mode"
        wrun random "$mode"
    done
done
wreport dense "$wsize" "dense writes (times, s):"
wreport random $((rwrites * 4096)) "random 4K writes (times, s):"
mo=$(median "${dense_off_t[@]}"); mi=$(median "${dense_in_use_t[@]}")
mw=$(median "${dense_write_ahead_t[@]}")
ro=$(median "${random_off_t[@]}"); ri=$(median "${random_in_use_t[@]}")
rw=$(median "${random_write_ahead_t[@]}")
rs=$(median "${random_write_ahead_s[@]}")
echo "in-use / off: dense $(ratio "$mi" "$mo"), random $(ratio "$ri" "$ro")" \
     "(goal <= 1.03); server CPU: dense" \
     "$(ratio "$(sum "${dense_in_use_c[@]}")" "$(sum "${dense_off_c[@]}")")," \
     "random $(ratio "$(sum "${random_in_use_c[@]}")" "$(sum "${random_off_c[@]}")")"
echo "write-ahead / off: dense $(ratio "$mw" "$mo"), random $(ratio "$rw" "$ro");" \
     "random: $(awk -v n="$rwrites" -v s="$rs" 'BEGIN {printf "%.1f", n / s}')" \
     "writes per sync"
if [ "$nmodes" -gt 3 ]; then
    mp=$(median "${dense_process_safe_t[@]}"); rp=$(median "${random_process_safe_t[@]}")
    echo "process-safe / off: dense $(ratio "$mp" "$mo") (goal <= 1.03)," \
         "random $(ratio "$rp" "$ro") (goal <= 1.05); server CPU: dense" \
         "$(ratio "$(sum "${dense_process_safe_c[@]}")" "$(sum "${dense_off_c[@]}")")," \
         "random $(ratio "$(sum "${random_process_safe_c[@]}")" "$(sum "${random_off_c[@]}")")"
fi
echo "($(elapsed "$t_start") s so far)"

# ---- 2. Incremental against full backups ----------------------------------

disk="$tmp/disk.raw"
py fill "$disk" "$size" "$dpct" 2
dbytes=$(data_bytes "$disk")
# serve: a fresh server over the disk with recording and the control
# socket; statistics to $tmp/stats.
serve ()
{
    start_nbdkit --filter=sparsebackup file "$disk" \
        sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
        sparsebackup-statsfile="$tmp/stats"
    since="nbd+unix:///@since:c1?socket=$sock"
    # The first connection opens the cbt file (it needs the disk size).
    nbdinfo --size "$uri" >/dev/null
}

serve
ctl backup-begin c1
t_base=$(time1 qemu-img convert -f raw -O qcow2 "$uri" "$tmp/base.qcow2")
ctl backup-end c1 --ok
ref=$disk
same qcow2 "$tmp/base.qcow2" "the first full backup differs from the disk"
read -r changed written < <(py change "$uri" "$cpct" "$gran" 3)
[ -n "${written:-}" ] || fail "the changes through the filter failed"
stop_nbdkit
qemu-img convert -f qcow2 -O raw "$tmp/base.qcow2" "$tmp/base.raw"
echo "backups: a $(iec "$size") disk, $(iec "$dbytes") data;" \
     "first full backup $t_base s; then $(iec "$changed")" \
     "($cpct%) changed in $(iec "$written") of writes; $bruns runs each," \
     "interleaved"

kinds=(full_qcow2 inc_qcow2 full_raw delta_raw)
# brun KIND: one timed backup of KIND against a fresh server; appends
# to ${KIND}_t, ${KIND}_r (bytes the client read), ${KIND}_p (read from
# the plugin).
brun ()
{
    local t r p
    case "$1" in
        full_qcow2)
            rm -f "$tmp/full.qcow2"
            serve
            t=$(time1 qemu-img convert -f raw -O qcow2 "$uri" "$tmp/full.qcow2")
            ;;
        inc_qcow2)
            rm -f "$tmp/inc.qcow2"
            serve
            ctl backup-begin c2 --since c1
            t=$(time1 qemu-img convert -f raw -O qcow2 -B "$tmp/base.qcow2" \
                    -F qcow2 "$since" "$tmp/inc.qcow2")
            ctl backup-end c2 --failed
            ;;
        full_raw)
            rm -f "$tmp/full.raw"
            serve
            t=$(time1 "$copy" -q "$uri" "$tmp/full.raw")
            ;;
        delta_raw)
            cp --sparse=always "$tmp/base.raw" "$tmp/delta.raw"
            serve
            ctl backup-begin c2 --since c1
            t=$(time1 "$copy" -q --delta "$since" "$tmp/delta.raw")
            ctl backup-end c2 --failed
            ;;
    esac
    stop_nbdkit
    r=$(sb read-bytes)
    p=$(sb plugin-read-bytes)
    eval "${1}_t+=($t); ${1}_r+=($r); ${1}_p+=($p)"
}

for (( i = 0; i < bruns; i++ )); do
    for (( j = 0; j < 4; j++ )); do
        brun "${kinds[(i + j) % 4]}"
    done
done

# Every result compared with the disk (the qcow2 ones read through their
# chain, as a restore would).
same qcow2 "$tmp/full.qcow2" "the full qcow2 backup differs from the disk"
same qcow2 "$tmp/inc.qcow2" \
    "the incremental qcow2 backup over the first full one differs from the disk"
same raw "$tmp/full.raw" "the full raw copy differs from the disk"
same raw "$tmp/delta.raw" \
    "the delta copy over the first full backup differs from the disk"
if qemu-img compare -q -f raw -F raw "$disk" "$tmp/base.raw"; then
    fail "the disk did not change"
fi
echo "all four compared with the disk: identical"

declare -A m_t m_r m_p
for k in "${kinds[@]}"; do
    eval "m_t[$k]=\$(median \"\${${k}_t[@]}\")"
    # (bytes: integers also when the median is of an even number)
    eval "m_r[$k]=\$(printf %.0f \"\$(median \"\${${k}_r[@]}\")\")"
    eval "m_p[$k]=\$(printf %.0f \"\$(median \"\${${k}_p[@]}\")\")"
done
for k in inc_qcow2 delta_raw; do
    [ "${m_r[$k]}" -lt "${m_r[full_qcow2]}" ] ||
        fail "$k read ${m_r[$k]} bytes, no fewer than the full backup"
done
printf "  %-10s %-26s %8s  %9s  %9s  %9s\n" "" times median read \
       "from file" output
for k in "${kinds[@]}"; do
    case $k in
        full_qcow2) out="$tmp/full.qcow2" ;;
        inc_qcow2) out="$tmp/inc.qcow2" ;;
        full_raw) out="$tmp/full.raw" ;;
        delta_raw) out="$tmp/delta.raw" ;;
    esac
    printf "  %-10s %-26s %7.3fs  %9s  %9s  %9s\n" "${k/_/ }" \
        "$(eval echo "\${${k}_t[*]}")" "${m_t[$k]}" "$(iec "${m_r[$k]}")" \
        "$(iec "${m_p[$k]}")" "$(iec "$(allocated "$out")")"
done
echo "incremental / full: qcow2 time $(ratio "${m_t[inc_qcow2]}" "${m_t[full_qcow2]}")," \
     "read $(ratio "${m_r[inc_qcow2]}" "${m_r[full_qcow2]}");" \
     "raw (--delta) time $(ratio "${m_t[delta_raw]}" "${m_t[full_raw]}")," \
     "read $(ratio "${m_r[delta_raw]}" "${m_r[full_raw]}")"
echo "incremental read / changed: qcow2 $(ratio "${m_r[inc_qcow2]}" "$changed")," \
     "raw $(ratio "${m_r[delta_raw]}" "$changed")"
echo "total $(elapsed "$t_start") s"
