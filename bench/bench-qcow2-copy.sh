#!/usr/bin/env bash
# Benchmark (qcow2 plugin): copy qcow2 images to a raw file with
#
#   A  qemu-img convert -f qcow2 -O raw IMG out.raw            (reference)
#   B  nbdkit -U - --filter=sparsebackup qcow2 file=IMG --run 'nbdcopy "$uri" out.raw'
#   C  nbdkit -U - qcow2 file=IMG --run 'nbdcopy "$uri" out.raw'    (no filter)
#   D  qemu-nbd -r -f qcow2 -e 4 -t -k SOCK IMG  +  nbdcopy nbd+unix:///?socket=SOCK out.raw
#   E  nbdkit -U - file RAW --run 'nbdcopy "$uri" out.raw'
#      (the same content as a sparse raw file: the NBD peer of B and C)
#
# for five images:
#   sparse      BENCH_SIZE virtual (default 4G), BENCH_DATA of random data
#               (default 300M) in scattered pieces of 64K..2M
#   chain       three layers: the sparse image as base, then two overlays
#               each writing BENCH_CHAIN_DATA (default 48M) of data and
#               zeroing as much over data below (qemu-io write / write -z)
#   compressed  qemu-img convert -c of BENCH_COMP_DATA (default 160M) of
#               compressible data (base64 text) scattered in BENCH_SIZE
#   zstd        the same with compression_type=zstd
#   words       qemu-img convert -c (zlib) of as much text made of words
#               (a vocabulary of 2000): unlike base64 (2 or more deflate
#               blocks per 64K cluster), one block per cluster, which the
#               plugin inflates with libdeflate when built with it
# Cluster size BENCH_CLUSTER (default 64K).  Each copy is timed
# BENCH_RUNS times (default 3; the methods alternate) and the median is
# printed with its ratio to qemu-img convert measured in the same run,
# and B and C with their ratio to E (goal: <= 1.05).
# Every method's first output is compared with cmp to the source data.
# Also prints the bytes allocated by each output (sparseness).
#
#   make bench              (runs all benchmarks), or
#   abs_top_builddir=$PWD/_build bash bench/bench-qcow2-copy.sh
#
# Takes about 2-3 minutes with the defaults on 2 cores; scale down with
# e.g. BENCH_SIZE=1G BENCH_DATA=64M BENCH_COMP_DATA=32M BENCH_CHAIN_DATA=8M.
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
requires nbdkit --version
requires nbdcopy --version
requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires_plugin qcow2
requires_plugin file
requires_filter sparsebackup

size=$(numfmt --from=iec "${BENCH_SIZE:-4G}")
data=$(numfmt --from=iec "${BENCH_DATA:-300M}")
chain_data=$(numfmt --from=iec "${BENCH_CHAIN_DATA:-48M}")
comp_data=$(numfmt --from=iec "${BENCH_COMP_DATA:-160M}")
cluster=$(numfmt --from=iec "${BENCH_CLUSTER:-64K}")
runs=${BENCH_RUNS:-3}
iec () { numfmt --to=iec "$1"; }

# mk_raw FILE SIZE DATA SEED KIND: a sparse raw file of SIZE bytes with
# DATA bytes in pieces of 64K..2M (64K aligned) at pseudo-random places;
# KIND random (incompressible), text (compressible base64) or words.
mk_raw ()
{
    python3 - "$@" <<'PY'
import base64, os, random, sys
path, size, data, seed, kind = sys.argv[1], int(sys.argv[2]), \
    int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = random.Random(seed)
unit = 64 * 1024
nunits = size // unit
used = bytearray(nunits)
words = [b"w%xq%d" % (w * 7919 % 4093, w % 13) for w in range(2000)]
wordtext = b" ".join(r.choice(words) for _ in range(800000)) \
    if kind == "words" else b""
with open(path, "wb") as f:
    f.truncate(size)
    left = data
    while left > 0:
        n = min(r.randint(1, 32), (left + unit - 1) // unit)
        u = r.randrange(0, nunits - n)
        if any(used[u:u + n]):
            continue
        used[u:u + n] = b"\1" * n
        length = min(n * unit, left)
        if kind == "random":
            buf = os.urandom(length)
        elif kind == "words":
            o = r.randrange(0, len(wordtext) - length)
            buf = wordtext[o:o + length]
        else:
            buf = base64.b64encode(os.urandom(length * 3 // 4 + 3))[:length]
        f.seek(u * unit)
        f.write(buf)
        left -= length
PY
}

# chain_cmds SEED DATA: qemu-io commands writing DATA bytes of data and
# zeroing DATA bytes (64K..1M pieces) in the first BENCH_SIZE.
chain_cmds ()
{
    python3 - "$1" "$2" "$size" <<'PY'
import random, sys
seed, data, size = (int(x) for x in sys.argv[1:])
r = random.Random(seed)
unit = 64 * 1024
for kind in ("data", "zero"):
    left = data
    while left > 0:
        n = min(r.randint(1, 16) * unit, left)
        off = r.randrange(0, (size - n) // unit) * unit
        if kind == "data":
            print("write -P 0x%02x %d %d" % (r.randint(1, 255), off, n))
        else:
            print("write -z %d %d" % (off, n))
        left -= n
PY
}

qemu_io_script ()
{
    local img=$1 cmds=() c
    shift
    while IFS= read -r c; do cmds+=(-c "$c"); done
    qemu-io -f qcow2 "${cmds[@]}" "$img" >/dev/null
}

echo "=== qcow2 copy benchmark (cluster $(iec $cluster), $runs runs each)"
t0=$(now)
mk_raw "$tmp/sparse.raw" "$size" "$data" 1 random
qemu-img convert -f raw -O qcow2 -o cluster_size="$cluster" \
    "$tmp/sparse.raw" "$tmp/sparse.qcow2"

qemu-img create -q -f qcow2 -o cluster_size="$cluster" \
    -b sparse.qcow2 -F qcow2 "$tmp/mid.qcow2"
chain_cmds 2 "$chain_data" | qemu_io_script "$tmp/mid.qcow2"
qemu-img create -q -f qcow2 -o cluster_size="$cluster" \
    -b mid.qcow2 -F qcow2 "$tmp/top.qcow2"
chain_cmds 3 "$chain_data" | qemu_io_script "$tmp/top.qcow2"
qemu-img convert -f qcow2 -O raw "$tmp/top.qcow2" "$tmp/chain.raw"

mk_raw "$tmp/comp.raw" "$size" "$comp_data" 4 text
qemu-img convert -c -f raw -O qcow2 -o cluster_size="$cluster" \
    "$tmp/comp.raw" "$tmp/comp.qcow2"
qemu-img convert -c -f raw -O qcow2 \
    -o cluster_size="$cluster",compression_type=zstd \
    "$tmp/comp.raw" "$tmp/zstd.qcow2"
mk_raw "$tmp/words.raw" "$size" "$comp_data" 5 words
qemu-img convert -c -f raw -O qcow2 -o cluster_size="$cluster" \
    "$tmp/words.raw" "$tmp/words.qcow2"
echo "images built in $(elapsed "$t0") s:"
echo "  sparse:     $(iec $size) virtual, $(iec $data) random data," \
     "file $(iec "$(stat -c %s "$tmp/sparse.qcow2")")"
echo "  chain:      sparse + 2 overlays, each $(iec $chain_data) data" \
     "+ $(iec $chain_data) zeroed," \
     "files $(iec "$(stat -c %s "$tmp/mid.qcow2")")," \
     "$(iec "$(stat -c %s "$tmp/top.qcow2")")"
echo "  compressed: $(iec $size) virtual, $(iec $comp_data) text data," \
     "file $(iec "$(stat -c %s "$tmp/comp.qcow2")")"
echo "  zstd:       the same, zstd, file $(iec "$(stat -c %s "$tmp/zstd.qcow2")")"
echo "  words:      $(iec $size) virtual, $(iec $comp_data) of words," \
     "file $(iec "$(stat -c %s "$tmp/words.qcow2")")"
echo "  zlib clusters inflated by: $(nbdkit qcow2 --dump-plugin |
    sed -n 's/^qcow2_zlib_decoder=//p')"

# Methods: each copies $1 (qcow2) to $2 (raw, absent).
m_qemu_img ()  { qemu-img convert -f qcow2 -O raw "$1" "$2"; }
m_filter ()
{
    nbdkit -U - --filter=sparsebackup qcow2 file="$1" \
        --run "nbdcopy \"\$uri\" '$2'"
}
m_plugin ()    { nbdkit -U - qcow2 file="$1" --run "nbdcopy \"\$uri\" '$2'"; }
m_qemu_nbd ()
{
    start_qemu_nbd -r -f qcow2 -e 4 -t "$1"
    nbdcopy "$uri" "$2"
    stop_qemu_nbd
}
# m_file RAW OUT: the raw file with the same content (its peer).
m_file ()      { nbdkit -U - file "$1" --run "nbdcopy \"\$uri\" '$2'"; }
methods=(m_qemu_img m_filter m_plugin m_qemu_nbd m_file)
labels=("qemu-img convert" "nbdkit+sparsebackup" "nbdkit qcow2" "qemu-nbd+nbdcopy" "nbdkit file (raw)")

declare -A med alloc
images=(sparse chain comp zstd words)
for img in "${images[@]}"; do
    case $img in
        sparse) src=$tmp/sparse.qcow2; ref=$tmp/sparse.raw ;;
        chain)  src=$tmp/top.qcow2;    ref=$tmp/chain.raw ;;
        comp)   src=$tmp/comp.qcow2;   ref=$tmp/comp.raw ;;
        zstd)   src=$tmp/zstd.qcow2;   ref=$tmp/comp.raw ;;
        words)  src=$tmp/words.qcow2;  ref=$tmp/words.raw ;;
    esac
    declare -A times=()
    for (( run = 0; run < runs; run++ )); do
        for m in "${methods[@]}"; do
            out=$tmp/out.raw
            rm -f "$out"
            if [ "$m" = m_file ]; then in=$ref; else in=$src; fi
            t=$(time1 $m "$in" "$out")
            times[$m]+="$t "
            if [ "$run" -eq 0 ]; then
                cmp "$ref" "$out" || fail "$img: $m: output differs"
                alloc[$img.$m]=$(allocated "$out")
            fi
        done
    done
    for m in "${methods[@]}"; do
        # shellcheck disable=SC2086
        med[$img.$m]=$(median ${times[$m]})
        echo "  $img $m: ${times[$m]}"
    done
    unset times
done
rm -f "$tmp/out.raw"

echo
# header TITLE: a table's title and column headings.
header ()
{
    echo "$1"
    printf '%-12s' image
    for l in "${labels[@]}"; do printf ' %22s' "$l"; done
    echo
}
header "median seconds (ratio to qemu-img convert); all outputs identical (cmp)"
for img in "${images[@]}"; do
    printf '%-12s' "$img"
    base=${med[$img.m_qemu_img]}
    for m in "${methods[@]}"; do
        printf ' %22s' "$(awk -v t="${med[$img.$m]}" -v b="$base" \
            'BEGIN { printf "%.3f (%.2f)", t, (b > 0) ? t / b : 0 }')"
    done
    echo
done
echo
echo "qcow2 over NBD against the same content served raw by nbdkit file (+ nbdcopy), goal <= 1.05"
printf '%-12s %22s %22s\n' image "nbdkit+sparsebackup" "nbdkit qcow2"
for img in "${images[@]}"; do
    base=${med[$img.m_file]}
    printf '%-12s %22s %22s\n' "$img" \
        "$(ratio "${med[$img.m_filter]}" "$base")" \
        "$(ratio "${med[$img.m_plugin]}" "$base")"
done
echo
header "bytes allocated by the output file"
for img in "${images[@]}"; do
    printf '%-12s' "$img"
    for m in "${methods[@]}"; do printf ' %22s' "$(iec "${alloc[$img.$m]}")"; done
    echo
done
