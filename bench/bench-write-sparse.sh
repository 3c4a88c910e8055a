#!/usr/bin/env bash
# Benchmark (issue 3, write side): a mostly-zero disk written as plain
# writes (`nbdcopy --no-extents -S 0`: no zero detection by the client,
# every byte sent as NBD_CMD_WRITE) into:
#   nbdkit --filter=sparsebackup file target.img
#   nbdkit file target.img
#   qemu-nbd -f raw --discard=unmap --detect-zeroes=unmap target.img
# BENCH_SIZE (default 2G) with BENCH_DATA (default 60M) of data in
# BENCH_PIECE pieces (default 64K), one at a 4K-aligned place in each of
# as many scattered 256K regions, plus
# BENCH_BYTES (default 200) single non-zero bytes, each inside an otherwise
# zero 256K region.  BENCH_RUNS runs each (default 3, alternating), fresh
# target each time.  Prints a table: median time, allocated bytes (du) and
# the ratio to the source's non-zero 4K blocks; and time ratios.
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-write-sparse.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
need nbdkit nbdcopy qemu-nbd python3
requires_plugin file
requires_filter sparsebackup

size=$(numfmt --from=iec "${BENCH_SIZE:-2G}")
data=$(numfmt --from=iec "${BENCH_DATA:-60M}")
piece=$(numfmt --from=iec "${BENCH_PIECE:-64K}")
nbytes=${BENCH_BYTES:-200}
runs=${BENCH_RUNS:-3}
src="$tmp/src.img"
tgt="$tmp/target.img"

nz_blocks=$(python3 - "$src" "$size" "$data" "$piece" "$nbytes" <<'PY'
import os, random, sys
path = sys.argv[1]
size, data, piece, nbytes = (int(x) for x in sys.argv[2:])
rnd = random.Random(2024)
R = 256 * 1024
B = 4096
regions = list(range(size // R))
rnd.shuffle(regions)
byte_regions = regions[:nbytes]         # one non-zero byte in each
data_regions = regions[nbytes:]
blocks = set()
with open(path, "wb") as f:
    f.truncate(size)
    # Data pieces: one per 256K region, at a random 4K-aligned place
    # inside it (nbdcopy writes 256K requests: most hold data and zeros).
    assert piece <= R and data // piece <= len(data_regions)
    for i in range(data // piece):
        off = data_regions[i] * R + rnd.randrange((R - piece) // B + 1) * B
        f.seek(off)
        f.write(os.urandom(piece).replace(b"\0", b"\1"))
        blocks.update(range(off // B, (off + piece + B - 1) // B))
    for r in byte_regions:
        off = r * R + rnd.randrange(R)
        f.seek(off)
        f.write(b"\x5a")
        blocks.add(off // B)
print(len(blocks))
PY
)
ideal=$((nz_blocks * 4096))
echo "source: $(numfmt --to=iec "$size") virtual, $(numfmt --to=iec "$data") of data" \
     "in $(numfmt --to=iec "$piece") pieces + $nbytes single bytes in zero 256K regions;" \
     "$nz_blocks non-zero 4K blocks = $ideal bytes"
echo "copy: nbdcopy --no-extents -S 0 (plain writes of every byte); $runs runs each"

copy_cmd=(nbdcopy --no-extents -S 0)

methods=(filter plain qemu-nbd)
declare -A label times alloc
label[filter]="nbdkit --filter=sparsebackup file"
label[plain]="nbdkit file"
label[qemu-nbd]="qemu-nbd --discard=unmap --detect-zeroes=unmap"

for (( i = 0; i < runs; i++ )); do
    for m in "${methods[@]}"; do
        rm -f "$tgt"
        truncate -s "$size" "$tgt"
        case "$m" in
            filter)   start_nbdkit --filter=sparsebackup file "$tgt" ;;
            plain)    start_nbdkit file "$tgt" ;;
            qemu-nbd) start_qemu_nbd -f raw --discard=unmap \
                          --detect-zeroes=unmap -e 8 "$tgt" ;;
        esac
        secs=$(time1 "${copy_cmd[@]}" "$src" "$uri")
        case "$m" in
            qemu-nbd) stop_qemu_nbd ;;
            *)        stop_nbdkit ;;
        esac
        times[$m]="${times[$m]:-} $secs"
        alloc[$m]=$(allocated "$tgt")
        if [ "$i" -eq 0 ]; then
            cmp "$src" "$tgt" || fail "$m: the copy differs from the source"
        fi
    done
done

echo
printf '%-48s %10s %14s %12s\n' method "median s" "allocated" "alloc/ideal"
declare -A med
for m in "${methods[@]}"; do
    # shellcheck disable=SC2086
    med[$m]=$(median ${times[$m]})
    printf '%-48s %10s %14s %12s\n' "${label[$m]}" "${med[$m]}" \
        "${alloc[$m]}" "$(ratio "${alloc[$m]}" "$ideal")"
done
printf '%-48s %10s %14s %12s\n' "(ideal: non-zero 4K blocks)" "" "$ideal" "1.000"
echo
echo "times: ${times[filter]# } (filter); ${times[plain]# } (plain);" \
     "${times[qemu-nbd]# } (qemu-nbd)"
echo "time ratio filter/plain:    $(ratio "${med[filter]}" "${med[plain]}")"
echo "time ratio filter/qemu-nbd: $(ratio "${med[filter]}" "${med[qemu-nbd]}")"
echo "allocation ratio filter/qemu-nbd: $(ratio "${alloc[filter]}" "${alloc[qemu-nbd]}")"
