#!/usr/bin/env bash
# Benchmark (issue 4, read side): nbdcopy of a thick (fully allocated),
# mostly zero raw file, with --filter=sparsebackup sparsebackup-scan=always
# and without it.  For each copy: the time, the bytes sent to the client
# (nbdkit-stats-filter above) and the bytes read from the plugin
# (nbdkit-log-filter below).  Then a second copy from the same server
# (the map warm) against the first.
#
# Tunables (environment): BENCH_SIZE (default 1G), BENCH_DATA_PCT (percent
# of data, default 5, in 256K pieces), BENCH_RUNS (cold runs of each kind,
# default 3; the median is printed).
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-read-thick.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
source "$srcdir/test-read-lib.sh"
requires nbdcopy --version
requires_plugin file
requires_filter stats
requires_filter log

size=$(numfmt --from=iec "${BENCH_SIZE:-1G}")
pct=${BENCH_DATA_PCT:-5}
runs=${BENCH_RUNS:-3}
chunk=$((256 * 1024))

layout=$(python3 - $size $pct $chunk <<'PY'
import random, sys
size, pct, chunk = (int(x) for x in sys.argv[1:])
n = size * pct // 100 // chunk
slots = sorted(random.Random(7).sample(range(size // chunk), n))
print(" ".join("%d:%d" % (s * chunk, chunk) for s in slots))
PY
)
ndata=$(wc -w <<<"$layout")
data=$((ndata * chunk))
echo "source: thick $(numfmt --to=iec $size), $(numfmt --to=iec $data) of data ($pct%) in $ndata pieces"
mk_thick $tmp/src.img $size $layout

# copy: one timed nbdcopy from $uri; sets $secs.
copy ()
{
    rm -f $tmp/out.img
    secs=$(time1 nbdcopy "$uri" $tmp/out.img)
}

# One server per cold copy: stats above, (filter), log below.
# run_cold WITH(0|1): sets secs, client, plugin.
# (sparsebackup-scan=always only goes with the filter: without it the
# file plugin would refuse the parameter.)
run_cold ()
{
    local f=() p=()
    if [ "$1" -eq 1 ]; then
        f=(--filter=sparsebackup); p=(sparsebackup-scan=always)
    fi
    rm -f $tmp/above.txt $tmp/below.log
    start_nbdkit --filter=stats "${f[@]}" --filter=log file $tmp/src.img \
                 statsfile=$tmp/above.txt logfile=$tmp/below.log "${p[@]}"
    copy
    stop_nbdkit
    client=$(stats_bytes $tmp/above.txt read)
    plugin=$(log_read_bytes $tmp/below.log)
}

checked=
t_plain=(); t_filt=()
for (( i = 0; i < runs; i++ )); do
    run_cold 0; t_plain+=("$secs"); c_plain=$client; p_plain=$plugin
    [ -n "$checked" ] || cmp $tmp/src.img $tmp/out.img
    run_cold 1; t_filt+=("$secs"); c_filt=$client; p_filt=$plugin
    [ -n "$checked" ] || cmp $tmp/src.img $tmp/out.img
    checked=1
done
mp=$(median "${t_plain[@]}"); mf=$(median "${t_filt[@]}")

# Warm: two copies from the same server.
rm -f $tmp/above.txt $tmp/below.log
start_nbdkit --filter=stats --filter=sparsebackup --filter=log file $tmp/src.img \
             statsfile=$tmp/above.txt logfile=$tmp/below.log \
             sparsebackup-scan=always sparsebackup-statsfile=$tmp/sb.txt
copy; w1=$secs
p1=$(log_read_bytes $tmp/below.log)
copy; w2=$secs
p2=$(( $(log_read_bytes $tmp/below.log) - p1 ))
stop_nbdkit
cmp $tmp/src.img $tmp/out.img
c12=$(stats_bytes $tmp/above.txt read)

h () { numfmt --to=iec --format=%.1f "$1"; }
echo
printf '%-34s %10s %14s %14s\n' "nbdcopy" "time (s)" "to client" "from plugin"
printf '%-34s %10.3f %14s %14s\n' "without the filter (median of $runs)" "$mp" "$(h $c_plain)" "$(h $p_plain)"
printf '%-34s %10.3f %14s %14s\n' "with scan=always (median of $runs)" "$mf" "$(h $c_filt)" "$(h $p_filt)"
printf '%-34s %10.3f %14s %14s\n' "same server, 1st copy" "$w1" "" "$(h $p1)"
printf '%-34s %10.3f %14s %14s\n' "same server, 2nd copy (map warm)" "$w2" "" "$(h $p2)"
echo "same server, both copies: $(h $c12) to the client"
echo "ratio time with/without: $(ratio "$mf" "$mp")"
printf 'ratio bytes to client with/without: %.4f (data is %.4f of the file)\n' \
       "$(echo "$c_filt / $c_plain" | bc -l)" "$(echo "$data / $size" | bc -l)"
echo "ratio warm/cold copy time: $(ratio "$w2" "$w1")"
echo "--- filter statistics (same server, two copies):"
cat $tmp/sb.txt 2>/dev/null || echo "(no statsfile written)"
