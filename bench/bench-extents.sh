#!/usr/bin/env bash
# Benchmark (extents worth their round trip; no overhead where the plugin
# knows): every client over every kind of source, through nbdkit with
# --filter=sparsebackup (default parameters) against the same nbdkit
# without it, measured interleaved in one run.
#
# Sources (BENCH_FRAG_SIZE, default 1G; 2% of its 4K blocks hold data,
# scattered):
#   thick-noext  a thick raw file, file plugin under --filter=noextents
#                (a plugin without extents: the filter scans)
#   thick        the same file, file plugin (extents say: all data)
#   sparse       a sparse raw file with the same data (exact extents)
#   qcow2-1T     a 1T qcow2 overlay with 2M of its own data over a 2G
#                base with 164M of data (qcow2 plugin; exact extents)
# Clients: qemu-img convert -O raw (REQ_ONE), nbdcopy, qemu-img map
# (REQ_ONE), nbdinfo --map.
# For each: median seconds of BENCH_RUNS (default 3) without and with the
# filter and their ratio; then (one run each, nbdkit-stats-filter above)
# the bytes read by the client and its block status requests with the
# default sparsebackup-min-zero-extent=auto against the exact map
# (sparsebackup-min-zero-extent=0), and the bytes ratio.
# Peers for the copies: qemu-img convert in one process from the file,
# and qemu-nbd + nbdcopy.  Last, a breakdown of thick-noext + qemu-img
# convert: the copy once the map is learnt (the scan's share).
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD bash bench/bench-extents.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
source "$srcdir/test-read-lib.sh"
requires nbdcopy --version
requires nbdinfo --version
requires qemu-img --version
requires qemu-io --version
requires qemu-nbd --version
requires_plugin file
requires_plugin qcow2
requires_filter noextents
requires_filter stats

size=$(numfmt --from=iec "${BENCH_FRAG_SIZE:-1G}")
runs=${BENCH_RUNS:-3}
t0=$(now)

layout=$(python3 - "$size" <<'PY'
import random, sys
size = int(sys.argv[1]); n = size // 4096
print(" ".join("%d:4096" % (b * 4096)
               for b in sorted(random.Random(5).sample(range(n), n // 50))))
PY
)
# shellcheck disable=SC2086
mk_thick "$tmp/thick.img" "$size" $layout
# shellcheck disable=SC2086
mk_sparse "$tmp/sparse.img" "$size" $layout
python3 - "$tmp/base.raw" <<'PY'
import os, random, sys
r = random.Random(3); size = 2 << 30; unit = 64 << 10
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
os.ftruncate(fd, size)
left, used = 164 << 20, set()
while left > 0:
    n = min(r.randint(1, 32), left // unit); u = r.randrange(0, size // unit - n)
    if used.intersection(range(u, u + n)): continue
    used.update(range(u, u + n)); os.pwrite(fd, os.urandom(n * unit), u * unit)
    left -= n * unit
os.close(fd)
PY
qemu-img convert -f raw -O qcow2 "$tmp/base.raw" "$tmp/base.qcow2"
rm -f "$tmp/base.raw"
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 "$tmp/ov.qcow2" 1T
qemu-io -f qcow2 -c "write -P 0x55 100M 1M" -c "write -P 0x66 500G 1M" \
    "$tmp/ov.qcow2" >/dev/null
echo "sources built in $(elapsed "$t0") s: $(numfmt --to=iec "$size")," \
     "$(wc -w <<<"$layout") data blocks of 4K; qcow2 1T overlay"

sources=(thick-noext thick sparse qcow2-1T)
clients=(convert nbdcopy qemu-img-map nbdinfo-map)
# plugin SOURCE: the nbdkit plugin arguments (and filters below ours).
plugin ()
{
    case $1 in
        thick-noext) echo "--filter=noextents file $tmp/thick.img" ;;
        thick)       echo "file $tmp/thick.img" ;;
        sparse)      echo "file $tmp/sparse.img" ;;
        qcow2-1T)    echo "qcow2 file=$tmp/ov.qcow2" ;;
    esac
}
fmt () { case $1 in qcow2-1T) echo qcow2 ;; *) echo raw ;; esac; }
srcfile () { case $1 in qcow2-1T) echo "$tmp/ov.qcow2" ;; sparse) echo "$tmp/sparse.img" ;; *) echo "$tmp/thick.img" ;; esac; }
# client CLIENT: the --run command.
client ()
{
    case $1 in
        convert)      echo "qemu-img convert -f raw -O raw \"\$uri\" $tmp/out.img" ;;
        nbdcopy)      echo "nbdcopy \"\$uri\" $tmp/out.img" ;;
        qemu-img-map) echo "qemu-img map -f raw \"\$uri\" >/dev/null" ;;
        nbdinfo-map)  echo "nbdinfo --map \"\$uri\" >/dev/null" ;;
    esac
}
# serve SOURCE CLIENT [--filter=F...] [KEY=VALUE...]: one server, one
# client run.
serve ()
{
    local s=$1 c=$2 a f=() p=()
    shift 2
    for a in "$@"; do
        case $a in --filter=*) f+=("$a") ;; *) p+=("$a") ;; esac
    done
    rm -f "$tmp/out.img"
    # shellcheck disable=SC2046
    nbdkit -U - "${f[@]}" $(plugin "$s") "${p[@]}" --run "$(client "$c")"
}
# stats_ops STATSFILE OP: the number of OP requests in a stats file.
stats_ops ()
{
    sed -n -E "s/^$2: ([0-9]+) ops.*/\1/p" "$1" | head -n 1 | grep . || echo 0
}

declare -A med bytes ops
for s in "${sources[@]}"; do
    for c in "${clients[@]}"; do
        tp=(); tf=()
        for (( i = 0; i < runs; i++ )); do
            tp+=("$(time1 serve "$s" "$c")")
            tf+=("$(time1 serve "$s" "$c" --filter=sparsebackup)")
        done
        med[$s.$c.p]=$(median "${tp[@]}"); med[$s.$c.f]=$(median "${tf[@]}")
        for z in auto 0; do
            rm -f "$tmp/st.txt"
            serve "$s" "$c" --filter=stats --filter=sparsebackup \
                  statsfile="$tmp/st.txt" sparsebackup-min-zero-extent=$z
            bytes[$s.$c.$z]=$(stats_bytes "$tmp/st.txt" read)
            ops[$s.$c.$z]=$(stats_ops "$tmp/st.txt" extents)
        done
    done
    # Peers: qemu-img convert in one process, qemu-nbd + nbdcopy.
    tq=(); tn=()
    for (( i = 0; i < runs; i++ )); do
        rm -f "$tmp/out.img"
        tq+=("$(time1 qemu-img convert -f "$(fmt "$s")" -O raw "$(srcfile "$s")" "$tmp/out.img")")
        rm -f "$tmp/out.img"
        start_qemu_nbd -r -f "$(fmt "$s")" -e 4 -t "$(srcfile "$s")"
        tn+=("$(time1 nbdcopy "$uri" "$tmp/out.img")")
        stop_qemu_nbd
    done
    med[$s.local]=$(median "${tq[@]}"); med[$s.qemu-nbd]=$(median "${tn[@]}")
done
rm -f "$tmp/out.img"

h () { numfmt --to=iec --format=%.1f "$1"; }
echo
echo "median seconds of $runs runs; bytes read by the client and its block status requests (one run each)"
printf '%-12s %-13s %8s %8s %7s %10s %10s %7s %8s %8s\n' source client \
       plain filter ratio "bytes" "exact" ratio "bs" "bs-exact"
for s in "${sources[@]}"; do
    for c in "${clients[@]}"; do
        printf '%-12s %-13s %8.3f %8.3f %7s %10s %10s %7s %8s %8s\n' "$s" "$c" \
               "${med[$s.$c.p]}" "${med[$s.$c.f]}" \
               "$(ratio "${med[$s.$c.f]}" "${med[$s.$c.p]}")" \
               "$(h "${bytes[$s.$c.auto]}")" "$(h "${bytes[$s.$c.0]}")" \
               "$(ratio "${bytes[$s.$c.auto]}" "${bytes[$s.$c.0]}")" \
               "${ops[$s.$c.auto]}" "${ops[$s.$c.0]}"
    done
done
echo
echo "copies to raw, median seconds: peers (ratio of nbdkit+filter+client to the peer)"
printf '%-12s %18s %18s %14s %14s\n' source "qemu-img (local)" "qemu-nbd+nbdcopy" "filter+convert" "filter+nbdcopy"
for s in "${sources[@]}"; do
    printf '%-12s %18.3f %18.3f %14s %14s\n' "$s" "${med[$s.local]}" "${med[$s.qemu-nbd]}" \
           "$(ratio "${med[$s.convert.f]}" "${med[$s.local]}")" \
           "$(ratio "${med[$s.nbdcopy.f]}" "${med[$s.qemu-nbd]}")"
done

# Where the time of thick-noext + qemu-img convert goes: the same copy
# with the map already learnt (nbdinfo --map first, untimed, same
# server: the scan is then not part of the copy), against the cold copy
# above and the server without the filter.  Cold minus warm is the
# scan; warm against plain is what the map saves once it is known.
# warm_convert: one server; prints the seconds of the second command.
warm_convert ()
{
    rm -f "$tmp/out.img"
    nbdkit -U - --filter=sparsebackup $(plugin thick-noext) --run '
        nbdinfo --map "$uri" >/dev/null
        t0=$(date +%s.%N)
        qemu-img convert -f raw -O raw "$uri" '"$tmp/out.img"'
        t1=$(date +%s.%N)
        echo "$t1 - $t0" | bc -l | awk "{printf \"%.4f\\n\", \$1}"'
}
tw=()
for (( i = 0; i < runs; i++ )); do tw+=("$(warm_convert)"); done
cmp "$tmp/thick.img" "$tmp/out.img" || fail "warm convert: output differs"
rm -f "$tmp/out.img"
med[warm]=$(median "${tw[@]}")
echo
echo "thick-noext + qemu-img convert, median seconds: plain ${med[thick-noext.convert.p]}," \
     "filter cold ${med[thick-noext.convert.f]}, filter with the map learnt ${med[warm]}"
echo "  scan (cold - warm): $(awk -v a="${med[thick-noext.convert.f]}" -v b="${med[warm]}" 'BEGIN {printf "%.3f", a - b}') s;" \
     "warm / plain: $(ratio "${med[warm]}" "${med[thick-noext.convert.p]}")"
echo "total $(elapsed "$t0") s"
