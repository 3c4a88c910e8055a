#!/usr/bin/env bash
# Benchmark: sparsebackup-copy against nbdcopy, from a backup view made
# with nbdkit-extentlist-filter over a raw file: BENCH_DATA_PCT of the
# disk is data, BENCH_HOLE_PCT is HOLE without ZERO (not part of this
# backup, but with contents), the rest is HOLE|ZERO (a file hole), in 1M
# pieces.  For each copy: the median time, the bytes the client read
# (nbdkit-stats-filter) and the bytes allocated in the target.
#
#   full   sparsebackup-copy to a new file  vs  nbdcopy --flush
#          (both read data and HOLE-only extents; both flush at the end)
#   delta  sparsebackup-copy --delta over the previous backup  vs  the
#          full nbdcopy, which is what a raw target gets without it
#   nbd    sparsebackup-copy to nbdkit memory  vs  nbdcopy to it
#   manifest and journal overhead (runs interleaved, one server):
#          a full copy and a --delta copy with --manifest  vs  the same
#          copy without; the delta again over a view cut in 64K pieces
#          (chunks of 1M partly changed: their skipped parts are read
#          from the source for the hash), and with 64K chunks (none
#          partly changed); a full copy with the journal
#          (default)  vs  --no-journal; and the time of --verify
#
# Tunables: BENCH_SIZE (default 1G), BENCH_DATA_PCT (default 20),
# BENCH_HOLE_PCT (default 40), BENCH_RUNS (default 3).
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD bash bench/bench-copy-tool.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
source "$srcdir/test-read-lib.sh"          # stats_bytes
requires nbdcopy --version
requires_plugin file
requires_plugin memory
requires_filter stats
requires_filter extentlist
copy="$abs_top_builddir/tools/sparsebackup-copy"
[ -x "$copy" ] || fail "$copy was not built"

size=$(numfmt --from=iec "${BENCH_SIZE:-1G}")
runs=${BENCH_RUNS:-3}
python3 - "$size" "${BENCH_DATA_PCT:-20}" "${BENCH_HOLE_PCT:-40}" \
    "$tmp/src.img" "$tmp/map" "$tmp/map64k" <<'PY'
import os, random, sys
size, dpct, hpct = (int(x) for x in sys.argv[1:4])
img, mapf, map64 = sys.argv[4:7]
M = 1 << 20
r = random.Random(7)
with open(img, "wb") as f, open(mapf, "w") as m, open(map64, "w") as m64:
    f.truncate(size)
    for off in range(0, size, M):
        x = r.randrange(100)
        kind = "" if x < dpct else "hole" if x < dpct + hpct else "hole,zero"
        m.write("%d %d %s\n" % (off, min(M, size - off), kind))
        if kind != "hole,zero":
            f.seek(off)
            f.write(os.urandom(min(M, size - off)))
        # The same disk as a delta view of 64K granules (a cbt's): in a
        # 1M piece with contents, each 64K is changed with the same odds.
        for o in range(off, min(off + M, size), 65536):
            k = kind
            if kind != "hole,zero":
                k = "" if r.randrange(dpct + hpct) < dpct else "hole"
            m64.write("%d %d %s\n" % (o, min(65536, size - o), k))
PY
echo "source: $(numfmt --to=iec "$size"), $(grep -c ' $' "$tmp/map")M data," \
     "$(grep -c ' hole$' "$tmp/map")M HOLE-only, the rest HOLE|ZERO"

# run NAME CMD...: time CMD against a fresh server ($view in CMD is the
# view's URI); sets ${NAME}_t (median), ${NAME}_read, ${NAME}_alloc
# (of $tmp/out.img).  $SETUP is eval'd before each run (untimed).
run ()
{
    local name="$1" i t ts=() cmd
    shift
    for (( i = 0; i < runs; i++ )); do
        eval "${SETUP:-rm -f $tmp/out.img}"
        start_nbdkit -r --filter=stats --filter=extentlist file "$tmp/src.img" \
            extentlist="$tmp/map" statsfile="$tmp/stats.txt"
        view=$uri
        cmd=()
        for a in "$@"; do cmd+=("${a//@VIEW@/$view}"); done
        t=$(time1 "${cmd[@]}")
        ts+=("$t")
        stop_nbdkit
    done
    printf -v "${name}_t" %s "$(median "${ts[@]}")"
    printf -v "${name}_read" %s "$(stats_bytes "$tmp/stats.txt" read)"
    printf -v "${name}_alloc" %s "$(allocated "$tmp/out.img" 2>/dev/null || echo 0)"
}

show ()
{
    local t="${1}_t" r="${1}_read" a="${1}_alloc" alloc=-
    [ "${!a}" -eq 0 ] || alloc=$(numfmt --to=iec "${!a}")
    printf "  %-26s %8.3f s  read %8s  allocated %8s\n" "$2" "${!t}" \
        "$(numfmt --to=iec "${!r}")" "$alloc"
}

run nbdcopy nbdcopy --flush @VIEW@ "$tmp/out.img"
run tool "$copy" -q @VIEW@ "$tmp/out.img"
cmp "$tmp/src.img" "$tmp/out.img" || fail "full copy differs from the source"
cp --sparse=always "$tmp/out.img" "$tmp/prev.img"

# Delta over the previous backup (the full copy): the same result.
SETUP="cp --sparse=always $tmp/prev.img $tmp/out.img" \
    run delta "$copy" -q --delta @VIEW@ "$tmp/out.img"
cmp "$tmp/src.img" "$tmp/out.img" || fail "delta over the full copy differs"

echo "full copy to a file:"
show nbdcopy "nbdcopy --flush"
show tool "sparsebackup-copy"
echo "delta copy to a file:"
show delta "sparsebackup-copy --delta"

# To an NBD target (the memory plugin, one server for all runs).
start_nbdkit memory "$size"
target=$uri
run nbdnbdcopy nbdcopy @VIEW@ "$target"
run nbdtool "$copy" -q --journal="$tmp/nbd.journal" @VIEW@ "$target"
echo "full copy to nbdkit memory:"
show nbdnbdcopy "nbdcopy"
show nbdtool "sparsebackup-copy"

echo "ratios (sparsebackup-copy / nbdcopy):"
echo "  full time $(ratio "$tool_t" "$nbdcopy_t")," \
     "read $(ratio "$tool_read" "$nbdcopy_read")," \
     "allocated $(ratio "$tool_alloc" "$nbdcopy_alloc")"
echo "  delta time $(ratio "$delta_t" "$nbdcopy_t")," \
     "read $(ratio "$delta_read" "$nbdcopy_read")"
echo "  to nbd time $(ratio "$nbdtool_t" "$nbdnbdcopy_t")," \
     "read $(ratio "$nbdtool_read" "$nbdnbdcopy_read")"

# Manifest and journal overhead: interleaved pairs against one server.
"$copy" -q --manifest-only --manifest="$tmp/prev.m" "[" nbdkit file "$tmp/prev.img" "]"
"$copy" -q --manifest-only --manifest="$tmp/prev64.m" --chunk-size=64K \
    "[" nbdkit file "$tmp/prev.img" "]"
start_nbdkit -r --filter=extentlist file "$tmp/src.img" extentlist="$tmp/map"
v1=$uri
start_nbdkit -r --filter=extentlist file "$tmp/src.img" extentlist="$tmp/map64k"
v64=$uri
fp=() fm=() dp=() dm=() d64p=() d64m=() d64c=() fj=() fnj=()
for (( i = 0; i < runs; i++ )); do
    rm -f "$tmp/out.img" "$tmp/m"
    fp+=("$(time1 "$copy" -q "$v1" "$tmp/out.img")")
    rm -f "$tmp/out.img"
    fm+=("$(time1 "$copy" -q --manifest="$tmp/m" "$v1" "$tmp/out.img")")
    for v in 1 64; do
        eval "uri_v=\$v$v"
        cp --sparse=always "$tmp/prev.img" "$tmp/out.img"
        t=$(time1 "$copy" -q --delta "$uri_v" "$tmp/out.img")
        if [ $v = 1 ]; then dp+=("$t"); else d64p+=("$t"); fi
        cp --sparse=always "$tmp/prev.img" "$tmp/out.img"
        cp "$tmp/prev.m" "$tmp/dm"
        t=$(time1 "$copy" -q --delta --manifest="$tmp/dm" "$uri_v" "$tmp/out.img")
        if [ $v = 1 ]; then dm+=("$t"); else d64m+=("$t"); fi
    done
    cp --sparse=always "$tmp/prev.img" "$tmp/out.img"
    cp "$tmp/prev64.m" "$tmp/dm64"
    d64c+=("$(time1 "$copy" -q --delta --manifest="$tmp/dm64" "$v64" "$tmp/out.img")")
    rm -f "$tmp/out.img"
    fnj+=("$(time1 "$copy" -q --no-journal "$v1" "$tmp/out.img")")
    rm -f "$tmp/out.img"
    fj+=("$(time1 "$copy" -q "$v1" "$tmp/out.img")")
done
cmp "$tmp/src.img" "$tmp/out.img" || fail "the last full copy differs"
"$copy" -q --verify="$tmp/m" "$tmp/src.img" || fail "the manifest does not verify the source"
"$copy" -q --verify="$tmp/dm" "$tmp/src.img" || fail "the delta's manifest does not verify the source"
cp --sparse=always "$tmp/prev.img" "$tmp/out.img"
cp "$tmp/prev.m" "$tmp/dm"
"$copy" --delta --manifest="$tmp/dm" "$v64" "$tmp/out.img" > "$tmp/d64.out"
extra=$(sed -n 's/.*; read \([0-9]*\) more bytes for the manifest.*/\1/p' "$tmp/d64.out")
# CPU seconds (user + system) of the client: what the hashing costs,
# whatever else the machine is doing.
cpu1 ()
{
    /usr/bin/time -f "%U %S" -o "$tmp/cpu" "$@" >&2
    awk '{printf "%.3f\n", $1 + $2}' "$tmp/cpu"
}
cp_=() cm_=()
if [ -x /usr/bin/time ]; then
    for (( i = 0; i < runs; i++ )); do
        rm -f "$tmp/out.img"
        cp_+=("$(cpu1 "$copy" -q "$v1" "$tmp/out.img")")
        rm -f "$tmp/out.img"
        cm_+=("$(cpu1 "$copy" -q --manifest="$tmp/m" "$v1" "$tmp/out.img")")
    done
fi
vt=$(timeit "$runs" "$copy" -q --verify="$tmp/m" "$tmp/src.img")
ct=$(timeit "$runs" cmp "$tmp/src.img" "$tmp/out.img")
echo "manifest overhead (interleaved medians, with / without --manifest):"
printf "  %-34s %8.3f s / %8.3f s  ratio %s\n" "full copy" \
    "$(median "${fm[@]}")" "$(median "${fp[@]}")" \
    "$(ratio "$(median "${fm[@]}")" "$(median "${fp[@]}")")"
printf "  %-34s %8.3f s / %8.3f s  ratio %s\n" "--delta, 1M pieces" \
    "$(median "${dm[@]}")" "$(median "${dp[@]}")" \
    "$(ratio "$(median "${dm[@]}")" "$(median "${dp[@]}")")"
printf "  %-34s %8.3f s / %8.3f s  ratio %s  (read %s more for it)\n" \
    "--delta, 64K pieces" "$(median "${d64m[@]}")" "$(median "${d64p[@]}")" \
    "$(ratio "$(median "${d64m[@]}")" "$(median "${d64p[@]}")")" \
    "$(numfmt --to=iec "${extra:-0}")"
printf "  %-34s %8.3f s / %8.3f s  ratio %s\n" \
    "--delta, 64K pieces, 64K chunks" "$(median "${d64c[@]}")" \
    "$(median "${d64p[@]}")" \
    "$(ratio "$(median "${d64c[@]}")" "$(median "${d64p[@]}")")"
if [ ${#cp_[@]} -gt 0 ]; then
    printf "  %-34s %8.3f s / %8.3f s  ratio %s\n" "full copy, client CPU" \
        "$(median "${cm_[@]}")" "$(median "${cp_[@]}")" \
        "$(ratio "$(median "${cm_[@]}")" "$(median "${cp_[@]}")")"
fi
echo "journal overhead (full copy, default journal / --no-journal):"
printf "  %-34s %8.3f s / %8.3f s  ratio %s\n" "full copy" \
    "$(median "${fj[@]}")" "$(median "${fnj[@]}")" \
    "$(ratio "$(median "${fj[@]}")" "$(median "${fnj[@]}")")"
echo "verification of the $(numfmt --to=iec "$size") copy against its manifest:" \
     "$vt s (cmp of two copies: $ct s)"
