#!/usr/bin/env bash
# Benchmark (issue 3, write side): the cost of zero detection on dense
# data.  nbdcopy writes BENCH_SIZE (default 512M) of random data into
#   nbdkit --filter=sparsebackup file target.img     (with)
#   nbdkit file target.img                           (without)
# BENCH_RUNS times each (default 5, alternating), fresh target each time.
# Prints the median times and their ratio.  Goal: ratio <= 1.03.
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-write-dense.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
need nbdkit nbdcopy
requires_plugin file
requires_filter sparsebackup

size=$(numfmt --from=iec "${BENCH_SIZE:-512M}")
runs=${BENCH_RUNS:-5}
src="$tmp/src.img"
tgt="$tmp/target.img"

head -c "$size" /dev/urandom > "$src"
echo "source: $(numfmt --to=iec "$size") of random data; $runs runs each;" \
     "nbdcopy $(nbdcopy --version | head -1 | awk '{print $2}')"

# run ARGS...: one timed copy into a fresh target through a fresh server.
run ()
{
    rm -f "$tgt"
    truncate -s "$size" "$tgt"
    start_nbdkit "$@" file "$tgt"
    secs=$(time1 nbdcopy "$src" "$uri")
    stop_nbdkit
}

with=(); without=()
for (( i = 0; i < runs; i++ )); do
    run
    without+=("$secs")
    [ "$i" -gt 0 ] || cmp "$src" "$tgt" || fail "copy without the filter differs"
    run --filter=sparsebackup
    with+=("$secs")
    [ "$i" -gt 0 ] || cmp "$src" "$tgt" || fail "copy with the filter differs"
done
mw=$(median "${with[@]}"); mo=$(median "${without[@]}")
echo "nbdcopy to nbdkit file:                      ${without[*]}  median $mo s"
echo "nbdcopy to nbdkit --filter=sparsebackup file: ${with[*]}  median $mw s"
echo "throughput: without $(awk -v s="$size" -v t="$mo" 'BEGIN {printf "%.0f", s / t / 1048576}') MiB/s," \
     "with $(awk -v s="$size" -v t="$mw" 'BEGIN {printf "%.0f", s / t / 1048576}') MiB/s"
echo "ratio with/without: $(ratio "$mw" "$mo") (goal <= 1.03)"
