#!/usr/bin/env bash
# Benchmark (issue 4, read side): qemu-img convert (a REQ_ONE client) from
# a sparse raw file served by nbdkit file, with and without
# --filter=sparsebackup.  Goal: with the filter at most half the time.
#
# Tunables (environment): BENCH_SIZE (virtual size, default 4G),
# BENCH_DATA (data, default 200M, in BENCH_CHUNK pieces, default 256K),
# BENCH_RUNS (default 5).  Prints the median times and the ratio.
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-read-qemu-img.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
source "$srcdir/test-read-lib.sh"
requires qemu-img --version
requires_plugin file

size=$(numfmt --from=iec "${BENCH_SIZE:-4G}")
data=$(numfmt --from=iec "${BENCH_DATA:-200M}")
chunk=$(numfmt --from=iec "${BENCH_CHUNK:-256K}")
runs=${BENCH_RUNS:-5}

# Scattered data: data/chunk pieces at pseudo-random chunk-aligned places.
layout=$(python3 - $size $data $chunk <<'PY'
import random, sys
size, data, chunk = (int(x) for x in sys.argv[1:])
n = data // chunk
slots = sorted(random.Random(42).sample(range(size // chunk), n))
print(" ".join("%d:%d" % (s * chunk, chunk) for s in slots))
PY
)
echo "source: $(numfmt --to=iec $size) virtual, $(numfmt --to=iec $data) of data in $((data / chunk)) pieces"
mk_sparse $tmp/src.img $size $layout

# time_convert NBDKIT-ARGS...: one timed qemu-img convert through a fresh
# server; sets $secs.
time_convert ()
{
    start_nbdkit "$@"
    rm -f $tmp/out.img
    secs=$(time1 qemu-img convert -f raw "$uri" -O raw $tmp/out.img)
    stop_nbdkit
    # cmp of two 4G files takes seconds: check the first copy of each kind.
    if [ "$i" -eq 0 ]; then cmp $tmp/src.img $tmp/out.img || fail "copy differs"; fi
}

plain=(); filt=()
for (( i = 0; i < runs; i++ )); do
    # Alternate so that drift (page cache, CPU frequency) hits both.
    time_convert file $tmp/src.img
    plain+=("$secs")
    time_convert --filter=sparsebackup file $tmp/src.img
    filt+=("$secs")
done
mp=$(median "${plain[@]}"); mf=$(median "${filt[@]}")
echo "qemu-img convert without the filter: ${plain[*]}  median ${mp} s"
echo "qemu-img convert with the filter:    ${filt[*]}  median ${mf} s"
echo "ratio with/without: $(ratio "$mf" "$mp") (goal <= 0.5)"
echo "copy allocates $(allocated $tmp/out.img) bytes"
