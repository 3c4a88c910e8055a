#!/usr/bin/env bash
# Benchmark (qcow2 plugin): against nbdkit's own qcow2 reader, the
# qcow2dec filter (nbdkit >= 1.36: Debian 13, not Debian 12), in one run:
#
# 1. Features: small images made by qemu-img / qemu-io, each served by
#
#      P  nbdkit -r qcow2 file=IMG                        (this project)
#      Q  nbdkit -r --filter=qcow2dec file IMG            (nbdkit's)
#
#    and copied with nbdcopy: "yes" when the copy is identical to
#    `qemu-img convert -O raw` (and, for the views and the map, when the
#    map is the expected one), else what happened (refused with the
#    message's gist, WRONG data, crashed, hung).
# 2. Hostile images: every seed of fuzz/corpus/ and the crafted images of
#    tests/test-qcow2-corrupt.sh (tests/qcow2-craft.py), each read whole
#    by P and Q and by qemu-img convert (QEMU's verdict); counted by
#    outcome: same verdict as QEMU (identical data, or both refuse),
#    refused what QEMU reads, served what QEMU refuses, different data,
#    server crashed (died by a signal), hung (no answer in 20 s).
# 3. Copy times: nbdcopy from the server to a raw file, for
#      sparse      BENCH_SIZE (4G) virtual, BENCH_DATA (300M) of random
#                  data in scattered pieces of 64K..2M
#      zlib        BENCH_COMP_DATA (160M) of base64 text, qemu-img -c
#      zstd        the same, compression_type=zstd
#      words       zlib of text made of words (one deflate block per
#                  cluster: the plugin inflates it with libdeflate)
#      1T          1 TiB virtual, BENCH_LARGE_DATA (64M) in pieces
#                  scattered over the whole TiB
#      1T-overlay  a 1 TiB overlay with 2M of its own over a 2G base with
#                  the sparse pattern (qcow2dec reads no backing files)
#    by Q, P, and F (P behind --filter=sparsebackup), the servers already
#    started (the time is the copy's), BENCH_RUNS (5) runs with the
#    methods interleaved; the median wall time, its ratio to Q (goal:
#    P and F <= 1.0), and the server's CPU seconds (user + system, from
#    /proc: less sensitive to the load of the machine).  Every first
#    copy is compared with qemu-img convert's (qemu-img compare).
#    With BENCH_CALLGRIND=1 (and valgrind installed) each server also
#    copies each image once under valgrind --tool=callgrind: the
#    server's instructions, which do not depend on the load (memset's
#    `rep stosb` counts one per byte: zeroing the holes of a read buffer
#    weighs as much as it zeroes, the same for every method).
#
# Prints the load average before and after.  On Debian 13 from a Debian
# 12 machine:
#   scripts/check-debian13 --bench bench/bench-qcow2dec.sh
# or in a build tree:
#   abs_top_builddir=$PWD/_build bash bench/bench-qcow2dec.sh
# Scale down with e.g. BENCH_SIZE=1G BENCH_DATA=64M BENCH_COMP_DATA=32M.
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
requires nbdkit --version
requires nbdcopy --version
requires nbdinfo --version
requires qemu-img --version
requires qemu-io --version
requires python3 --version
requires_plugin qcow2
requires_plugin file
requires_filter sparsebackup
nbdkit --filter=qcow2dec null --dump-plugin > /dev/null 2>&1 ||
    skip "$(nbdkit --version) has no qcow2dec filter (nbdkit 1.36 and later: run it on Debian 13, scripts/check-debian13 --bench bench/bench-qcow2dec.sh)"

size=$(numfmt --from=iec "${BENCH_SIZE:-4G}")
data=$(numfmt --from=iec "${BENCH_DATA:-300M}")
comp_data=$(numfmt --from=iec "${BENCH_COMP_DATA:-160M}")
large_data=$(numfmt --from=iec "${BENCH_LARGE_DATA:-64M}")
runs=${BENCH_RUNS:-5}
callgrind=${BENCH_CALLGRIND:-0}
if [ "$callgrind" = 1 ] && ! command -v valgrind > /dev/null; then
    echo "BENCH_CALLGRIND=1 but valgrind is not installed: no instruction counts" >&2
    callgrind=0
fi
iec () { numfmt --to=iec "$1"; }
corpus=$abs_top_srcdir/fuzz/corpus
craft=$abs_top_srcdir/tests/qcow2-craft.py
cd "$tmp"

echo "=== qcow2 plugin vs nbdkit's qcow2dec filter ($(nbdkit --version)," \
     "$(qemu-img --version | head -n 1))"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

# mk_raw FILE SIZE DATA SEED KIND: a sparse raw file with DATA bytes in
# pieces of 64K..2M at pseudo-random 64K-aligned places; KIND random,
# text (base64) or words.
M=$((1 << 20))
mk_raw ()
{
    python3 - "$@" <<'PY'
import base64, os, random, sys
path, size, data, seed, kind = sys.argv[1], int(sys.argv[2]), \
    int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
r = random.Random(seed)
unit = 64 * 1024
nunits = size // unit
used = set()
words = [b"w%xq%d" % (w * 7919 % 4093, w % 13) for w in range(2000)]
wordtext = b" ".join(r.choice(words) for _ in range(800000)) \
    if kind == "words" else b""
with open(path, "wb") as f:
    f.truncate(size)
    left = data
    while left > 0:
        n = min(r.randint(1, 32), (left + unit - 1) // unit)
        u = r.randrange(0, nunits - n)
        if any(x in used for x in range(u, u + n)):
            continue
        used.update(range(u, u + n))
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

# ---------------------------------------------------------------------
# Servers.  serve METHOD IMG [EXPORT]: start the server of METHOD (P, Q
# or F) on IMG in the background; sets $sock, $pid, $uri ($uri with
# EXPORT).  Returns 1 (with the log in $server_log) if it does not start.
nserv=0
serve ()
{
    local m=$1 img=$2 exp=${3:-} args i
    case $m in
        P) args=(qcow2 file="$img") ;;
        Q) args=(--filter=qcow2dec file "$img") ;;
        F) args=(--filter=sparsebackup qcow2 file="$img") ;;
    esac
    nserv=$((nserv + 1))
    sock=$tmp/s.$nserv
    server_log=$tmp/server.$nserv.log
    nbdkit -r -f -U "$sock" -P "$tmp/p.$nserv" "${args[@]}" \
        2> "$server_log" &
    pid=$!
    for (( i = 0; i < 300; i++ )); do
        [ -S "$sock" ] && [ -s "$tmp/p.$nserv" ] && break
        kill -0 "$pid" 2> /dev/null || { wait "$pid" || true; return 1; }
        sleep 0.05
    done
    [ -S "$sock" ] || { kill "$pid"; wait "$pid" || true; return 1; }
    cleanup_fn "kill $pid 2>/dev/null"
    uri="nbd+unix:///$exp?socket=$sock"
}
# unserve: stop it; its exit status in $server_status (>= 128: signal).
unserve ()
{
    server_status=0
    if kill -0 "$pid" 2> /dev/null; then
        kill "$pid" 2> /dev/null || true
        wait "$pid" || server_status=$?
        # Killed by our SIGTERM: a clean stop.
        [ "$server_status" -ne 143 ] || server_status=0
    else
        wait "$pid" || server_status=$?
    fi
}
# gist FILE: the first error line of a server log, shortened.
gist ()
{
    grep -m1 -E 'error' "$1" 2> /dev/null |
        sed -E 's/^nbdkit: ([^ ]+: )?(error: )?//' | cut -c1-60
}

# ---------------------------------------------------------------------
# 1. Features.
echo
echo "--- 1. features"
t0=$(now)
f_img=()
f_desc=()
f_export=()
f_map=()
feature ()          # NAME DESCRIPTION EXPORT MAPCHECK
{
    f_img+=("$1"); f_desc+=("$2"); f_export+=("${3:-}"); f_map+=("${4:-}")
}
qi () { qemu-io -f qcow2 "$@" > /dev/null; }
mkfeat ()
{
    local opts=$1 name=$2
    qemu-img create -q -f qcow2 -o "$opts" "$name" 64M
    qi -c 'write -P 0x11 0 1M' -c 'write -P 0x22 20M 64k' \
        -c 'write -z 30M 1M' -c 'write -P 0x33 63M 1M' "$name"
}
mkfeat compat=1.1 f-v3.qcow2
feature f-v3.qcow2 "version 3, 64K clusters"
mkfeat compat=0.10 f-v2.qcow2
feature f-v2.qcow2 "version 2"
mkfeat compat=1.1,cluster_size=512 f-512.qcow2
feature f-512.qcow2 "512-byte clusters"
qemu-img create -q -f qcow2 -o cluster_size=512 f-tiny.qcow2 1M
qi -c 'write -P 0x12 4k 4k' f-tiny.qcow2
feature f-tiny.qcow2 "a small image (1M virtual, a 6.5 KiB file)"
mkfeat compat=1.1,cluster_size=2M f-2m.qcow2
feature f-2m.qcow2 "2 MiB clusters"
mkfeat compat=1.1,extended_l2=on f-sub.qcow2
qi -c 'write -P 0x44 40M 4k' -c 'write -P 0x45 41M 12k' f-sub.qcow2
feature f-sub.qcow2 "subclusters (extended_l2=on)"
head -c 6M /dev/urandom | base64 -w0 > text.raw        # 8M of text
truncate -s 64M text.raw
qemu-img convert -q -c -f raw -O qcow2 text.raw f-zlib.qcow2
feature f-zlib.qcow2 "zlib compressed clusters"
qemu-img convert -q -c -f raw -O qcow2 -o compression_type=zstd \
    text.raw f-zstd.qcow2
feature f-zstd.qcow2 "zstd compressed clusters"
mkfeat compat=1.1 f-base.qcow2
qemu-img create -q -f qcow2 -b f-base.qcow2 -F qcow2 f-chain.qcow2
qi -c 'write -P 0x55 512k 1M' -c 'write -z 63M 512k' f-chain.qcow2
feature f-chain.qcow2 "backing chain (qcow2 over qcow2)"
qemu-img convert -q -f qcow2 -O raw f-base.qcow2 f-base.raw
qemu-img create -q -f qcow2 -b f-base.raw -F raw f-rawback.qcow2
qi -c 'write -P 0x56 512k 1M' f-rawback.qcow2
feature f-rawback.qcow2 "raw backing file"
qemu-img create -q -f qcow2 -o data_file=f-data.raw f-ext.qcow2 64M
qi -c 'write -P 0x66 0 1M' -c 'write -P 0x67 32M 1M' f-ext.qcow2
feature f-ext.qcow2 "external data file"
mkfeat compat=1.1,lazy_refcounts=on f-dirty.qcow2
python3 "$craft" f-dirty.qcow2 or64 72 1       # the dirty bit
feature f-dirty.qcow2 "dirty bit (lazy_refcounts, not closed cleanly)"
mkfeat compat=1.1 f-snap.qcow2
qemu-img snapshot -c s1 f-snap.qcow2
qi -c 'write -P 0x77 0 1M' f-snap.qcow2
feature f-snap.qcow2 "internal snapshot (the active layer served)"
mkfeat compat=1.1 f-bitmap.qcow2
qemu-img bitmap --add f-bitmap.qcow2 b1
qi -c 'write -P 0x88 8M 1M' f-bitmap.qcow2
feature f-bitmap.qcow2 "persistent bitmap: the image read"
feature f-bitmap.qcow2 "@since:b1 view (the map of bitmap b1)" "@since:b1" \
    "0:$((8 * M)):1 $((8 * M)):$M:0 $((9 * M)):$((55 * M)):1"
k=1024
feature f-chain.qcow2 "@top view (the map of the top layer)" "@top" \
    "0:$((512 * k)):1 $((512 * k)):$((1024 * k)):0 $((1536 * k)):$((63 * M - 1536 * k)):1 $((63 * M)):$((512 * k)):2 $((63 * M + 512 * k)):$((512 * k)):1"
feature f-v3.qcow2 "extents (map equal to qemu-img map)" "" qemu

# map_is IMG URI SPEC: the server's map (nbdinfo --map) is SPEC (a list
# of OFFSET:LENGTH:FLAGS, any order, flags & 3) or, for SPEC "qemu",
# qemu-img map's (data / not data).
map_is ()
{
    local img=$1 u=$2 spec=$3
    nbdinfo --map --json "$u" > map.json 2> /dev/null || return 1
    if [ "$spec" = qemu ]; then
        qemu-img map --output=json "$img" > qmap.json
    fi
    python3 - "$spec" <<'PY'
import json, sys
spec = sys.argv[1]
got = []
for e in json.load(open("map.json")):
    t = e["type"] & 3
    if spec == "qemu":
        t = 0 if t & 2 == 0 else 3
    if got and got[-1][2] == t and got[-1][0] + got[-1][1] == e["offset"]:
        got[-1][1] += e["length"]
    else:
        got.append([e["offset"], e["length"], t])
if spec == "qemu":
    want = []
    for e in json.load(open("qmap.json")):
        t = 0 if e["data"] else 3
        if want and want[-1][2] == t:
            want[-1][1] += e["length"]
        else:
            want.append([e["start"], e["length"], t])
else:
    want = sorted([int(x) for x in s.split(":")] for s in spec.split())
sys.exit(0 if got == want else 1)
PY
}

# feature_result METHOD INDEX: one cell of the table, in $res.  (Not
# in a $(...): the servers must be started by this shell.)
feature_result ()
{
    local m=$1 i=$2 img=${f_img[$2]} exp=${f_export[$2]} spec=${f_map[$2]}
    local ref=ref-${f_img[$2]%.qcow2}.raw rc=0
    [ -f "$ref" ] || qemu-img convert -f qcow2 -O raw "$img" "$ref"
    serve "$m" "$img" "$exp" || { res="refused: $(gist "$server_log")"; return; }
    rm -f out.raw
    timeout 60 nbdcopy --requests=1 "$uri" out.raw 2> copy.err || rc=$?
    if [ $rc -eq 0 ] && [ -n "$spec" ]; then
        map_is "$img" "$uri" "$spec" || rc=-1
    fi
    unserve
    if [ $server_status -ge 128 ]; then res="CRASHED (signal $((server_status - 128)))"
    elif [ $rc -eq 124 ]; then res="HUNG"
    elif [ $rc -eq -1 ]; then
        if [ -n "$exp" ]; then res="no (export '$exp': the whole map)"
        else res="no (another map)"; fi
    elif [ $rc -ne 0 ]; then
        res="error: $(gist "$server_log")"
    elif cmp -s out.raw "$ref"; then res="yes"
    else res="WRONG DATA (not what qemu-img reads)"
    fi
}
printf '%-48s | %-40s | %s\n' feature "nbdkit qcow2 (this project)" \
    "nbdkit --filter=qcow2dec file"
for i in "${!f_img[@]}"; do
    feature_result P "$i"; p=$res
    feature_result Q "$i"
    printf '%-48s | %-40s | %s\n' "${f_desc[$i]}" "$p" "$res"
done
echo "(features in $(elapsed "$t0") s)"

# ---------------------------------------------------------------------
# 2. Hostile images.
echo
echo "--- 2. hostile images (fuzz/corpus and tests/test-qcow2-corrupt.sh)"
t0=$(now)
mkdir hostile
cp "$corpus"/*.qcow2 hostile/
fresh ()
{
    qemu-img create -q -f qcow2 -o cluster_size=64k "$1" 8M
    qi -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 4M 64k' "$1"
}
fresh good.qcow2
n=0
crafted ()          # CRAFT-ARGS...: a copy of good.qcow2 patched
{
    n=$((n + 1))
    cp good.qcow2 "hostile/t-$n.qcow2"
    python3 "$craft" "hostile/t-$n.qcow2" "$@"
}
crafted truncate 50
crafted be32 0 0x12345678
crafted be32 4 4
for cb in 8 22 0 4294967295; do crafted be32 20 $cb; done
crafted be32 100 7
crafted be32 100 0x100000
crafted ext-len 0x6803f857 0xfff0
crafted be32 32 1
crafted be32 32 2
crafted or64 72 0x20
crafted or64 72 2
crafted or64 72 4
crafted be32 36 0
crafted be64 24 0x100000000000
crafted be32 36 0x1000000
crafted be32 36 0xffffffff
crafted be64 40 0x10000000
crafted be64 40 0x30200
crafted l1 0 0x8000000010000000
crafted l1add 0 512
crafted l2 0 0x8000000040000000
crafted l2add 4194304 512
head -c 1M /dev/zero | tr '\0' 'x' > x.raw
qemu-img convert -q -c -O qcow2 -o cluster_size=64k x.raw c.qcow2
n=$((n + 1)); cp c.qcow2 "hostile/t-$n.qcow2"
python3 "$craft" "hostile/t-$n.qcow2" l2 65536 0x4000000040000000
n=$((n + 1)); cp c.qcow2 "hostile/t-$n.qcow2"
python3 "$craft" "hostile/t-$n.qcow2" l2 0 0x4000000000000000

# verdict METHOD IMG: in $res ok, refused, crashed or hung; the copy in
# out-METHOD.raw.
verdict ()
{
    local m=$1 img=$2 rc=0
    rm -f "out-$m.raw"
    if [ "$m" = qemu ]; then
        timeout 20 qemu-img convert -f qcow2 -O raw "$img" "out-$m.raw" \
            > /dev/null 2>&1 || rc=$?
        case $rc in 0) res=ok ;; 124) res=hung ;; *) res=refused ;; esac
        return
    fi
    serve "$m" "$img" || { res=refused; return; }
    timeout 20 nbdcopy --requests=1 "$uri" "out-$m.raw" > /dev/null 2>&1 ||
        rc=$?
    unserve
    if [ $server_status -ge 128 ]; then res=crashed
    elif [ $rc -eq 124 ]; then res=hung
    elif [ $rc -ne 0 ]; then res=refused
    else res=ok
    fi
}
declare -A count=()
nh=0
for img in hostile/*.qcow2; do
    nh=$((nh + 1))
    verdict qemu "$img"; q=$res
    for m in P Q; do
        verdict "$m" "$img"; v=$res
        case $q/$v in
            ok/ok) if qemu-img compare -q -f raw -F raw "out-qemu.raw" "out-$m.raw"
                   then o=same; else o=different; fi ;;
            ok/refused) o=refuses-what-qemu-reads ;;
            */ok) o=serves-what-qemu-refuses ;;
            */refused) o=same ;;
            *) o=$v ;;
        esac
        count[$m.$o]=$(( ${count[$m.$o]:-0} + 1 ))
        [ "$o" = same ] || echo "  $(basename "$img"): qemu $q, $m: $o"
    done
done
printf '%-34s | %-28s | %s\n' "outcome ($nh images)" "nbdkit qcow2 (this project)" \
    "nbdkit --filter=qcow2dec file"
for o in same refuses-what-qemu-reads serves-what-qemu-refuses different \
         crashed hung; do
    printf '%-34s | %-28s | %s\n' "$o" "${count[P.$o]:-0}" "${count[Q.$o]:-0}"
done
echo "(hostile images in $(elapsed "$t0") s)"
rm -f out-*.raw

# ---------------------------------------------------------------------
# 3. Copy times.
echo
echo "--- 3. copy times (nbdcopy to a raw file, $runs runs interleaved)"
t0=$(now)
mk_raw sparse.raw "$size" "$data" 1 random
qemu-img convert -f raw -O qcow2 sparse.raw sparse.qcow2
mk_raw comp.raw "$size" "$comp_data" 4 text
qemu-img convert -c -f raw -O qcow2 comp.raw zlib.qcow2
qemu-img convert -c -f raw -O qcow2 -o compression_type=zstd comp.raw zstd.qcow2
mk_raw words.raw "$size" "$comp_data" 5 words
qemu-img convert -c -f raw -O qcow2 words.raw words.qcow2
mk_raw large.raw $((1 << 40)) "$large_data" 6 random
qemu-img convert -f raw -O qcow2 large.raw 1T.qcow2
rm -f large.raw
mk_raw base2g.raw $((2 << 30)) $((164 << 20)) 7 random
qemu-img convert -f raw -O qcow2 base2g.raw base2g.qcow2
rm -f base2g.raw
qemu-img create -q -f qcow2 -b base2g.qcow2 -F qcow2 1T-overlay.qcow2 1T
qi -c 'write -P 0x99 1G 1M' -c 'write -P 0x9a 700G 1M' 1T-overlay.qcow2
rm -f comp.raw words.raw sparse.raw
echo "images built in $(elapsed "$t0") s:"
images=(sparse zlib zstd words 1T 1T-overlay)
for img in "${images[@]}"; do
    echo "  $img: $(iec "$(qemu-img info --output=json "$img.qcow2" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["virtual-size"])')") virtual," \
         "file $(iec "$(stat -c %s "$img.qcow2")")"
    qemu-img convert -f qcow2 -O raw "$img.qcow2" "ref-$img.raw"
done
echo "  zlib clusters inflated by: $(nbdkit qcow2 --dump-plugin |
    sed -n 's/^qcow2_zlib_decoder=//p')"

clk=$(getconf CLK_TCK)
# cpu PID: user + system seconds of process PID (all its threads).
cpu ()
{
    awk -v t="$clk" '{ printf "%.2f\n", ($14 + $15) / t }' "/proc/$1/stat"
}
methods=(Q P F)
declare -A label=([Q]="qcow2dec" [P]="qcow2 plugin" [F]="plugin+filter")
declare -A times=() cpus=() med=() cmed=() insn=()
for (( run = 0; run < runs; run++ )); do
    for img in "${images[@]}"; do
        for m in "${methods[@]}"; do
            [ "$m" = Q ] && [ "$img" = 1T-overlay ] && continue
            serve "$m" "$img.qcow2" || { cat "$server_log"; fail "$m $img: the server did not start"; }
            rm -f out.raw
            t=$(time1 nbdcopy "$uri" out.raw)
            c=$(cpu "$pid")
            unserve
            times[$img.$m]+="$t "
            cpus[$img.$m]+="$c "
            if [ "$run" -eq 0 ]; then
                qemu-img compare -q -f raw -F raw "ref-$img.raw" out.raw ||
                    fail "$img: $m: the copy differs from qemu-img convert's"
            fi
        done
    done
done
rm -f out.raw
if [ "$callgrind" = 1 ]; then
    for img in "${images[@]}"; do
        for m in "${methods[@]}"; do
            [ "$m" = Q ] && [ "$img" = 1T-overlay ] && continue
            case $m in
                P) args=(qcow2 file="$img.qcow2") ;;
                Q) args=(--filter=qcow2dec file "$img.qcow2") ;;
                F) args=(--filter=sparsebackup qcow2 file="$img.qcow2") ;;
            esac
            rm -f out.raw cg.out.*
            # nbdkit here may be the build tree's wrapper (bash, which
            # execs nbdkit): children are traced, but not the shell that
            # --run starts nor nbdcopy.  nbdkit --run: the forked child
            # is the server, the parent runs the command; the larger
            # count is the server's.
            valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out.%p" \
                --trace-children=yes \
                --trace-children-skip='*/sh,*/dash,*/nbdcopy' \
                nbdkit -r -U - "${args[@]}" --run 'nbdcopy "$uri" out.raw' \
                > /dev/null 2> cg.log || fail "callgrind $m $img failed"
            insn[$img.$m]=$(sed -n 's/.*Collected : //p' cg.log | sort -n | tail -n 1)
        done
    done
    rm -f out.raw cg.out.*
fi
for img in "${images[@]}"; do
    for m in "${methods[@]}"; do
        [ -n "${times[$img.$m]:-}" ] || continue
        # shellcheck disable=SC2086
        med[$img.$m]=$(median ${times[$img.$m]})
        # shellcheck disable=SC2086
        cmed[$img.$m]=$(median ${cpus[$img.$m]})
        echo "  $img $m: wall ${times[$img.$m]}; server cpu ${cpus[$img.$m]}"
    done
done
echo "(copies in $(elapsed "$t0") s)"
echo
echo "median seconds of the copy (ratio to qcow2dec); server CPU seconds (ratio)"
printf '%-11s' image
for m in "${methods[@]}"; do printf ' | %-27s' "${label[$m]} wall"; done
for m in "${methods[@]}"; do printf ' | %-20s' "${label[$m]} cpu"; done
echo
cell ()             # VALUE BASE
{
    if [ -z "$1" ]; then echo "n/a (no backing files)"
    elif [ -z "$2" ]; then echo "$1"
    else echo "$1 ($(ratio "$1" "$2"))"; fi
}
for img in "${images[@]}"; do
    printf '%-11s' "$img"
    for m in "${methods[@]}"; do
        printf ' | %-27s' "$(cell "${med[$img.$m]:-}" "${med[$img.Q]:-}")"
    done
    for m in "${methods[@]}"; do
        printf ' | %-20s' "$(cell "${cmed[$img.$m]:-}" "${cmed[$img.Q]:-}")"
    done
    echo
done
if [ "$callgrind" = 1 ]; then
    echo
    echo "server instructions, one copy under callgrind (ratio to qcow2dec)"
    for img in "${images[@]}"; do
        printf '%-11s' "$img"
        for m in "${methods[@]}"; do
            printf ' | %-27s' "$(cell "${insn[$img.$m]:-}" "${insn[$img.Q]:-}")"
        done
        echo
    done
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)"
