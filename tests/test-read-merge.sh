#!/usr/bin/env bash
# sparsebackup-min-zero-extent: short zero runs that end inside the request
# (after data, or at its start) are answered
# as data, never the other way round.
#  1. Random disks (sparse files: the plugin's extents; thick files under
#     noextents: scanning), every threshold, REQ_ONE walks and large
#     requests: every extent answered ZERO reads as zero in the file.
#  2. A fragmented disk: a REQ_ONE walk needs far fewer block status
#     requests with the default (auto) than with the exact map.
#  3. At the minimum (0), and by default for clients that are not
#     REQ_ONE, the answers are exactly the map of the file.
#  4. Over a plugin without extents (the filter scans), a REQ_ONE answer
#     is not cut where the scan stopped: its one extent goes on into the
#     blocks scanned next (within sparsebackup-scan-max), and a short
#     zero run at the edge of the scanned part is judged on its whole
#     length.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires_plugin file
requires_filter noextents
requires_nbdsh

# walk FILE MODE: walk the whole disk at $uri with block status (MODE
# reqone: REQ_ONE from each answer's end, as qemu-img; big: 256M requests
# without REQ_ONE, as nbdcopy and nbdinfo --map); check every ZERO extent
# against FILE; print the number of requests and the zero runs (merged)
# as "off:len ..." on one line.
walk ()
{
    "$nbd_python" - "$uri" "$1" "$2" <<'PY'
import nbd, sys
uri, path, mode = sys.argv[1:]
data = open(path, "rb").read()
h = nbd.NBD()
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
pos, calls, zeros = 0, 0, []
while pos < size:
    got = []
    def cb(meta, off, ents, err):
        if meta == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(ents)
    cnt = min(size - pos, 256 << 20)
    h.block_status(cnt, pos, cb,
                   nbd.CMD_FLAG_REQ_ONE if mode == "reqone" else 0)
    calls += 1
    for i in range(0, len(got), 2):
        ln, fl = got[i], got[i + 1]
        ln = min(ln, size - pos)
        if fl & nbd.STATE_ZERO:
            if data[pos:pos + ln].count(0) != ln:
                sys.exit("FAIL: ZERO claimed over data at %d+%d (%s)" %
                         (pos, ln, mode))
            if zeros and zeros[-1][0] + zeros[-1][1] == pos:
                zeros[-1][1] += ln
            else:
                zeros.append([pos, ln])
        pos += ln
        if mode == "reqone":
            break
print(calls, " ".join("%d:%d" % (o, l) for o, l in zeros))
PY
}

# exact_zeros FILE: the zero runs of FILE in whole 4K blocks, as walk prints.
exact_zeros ()
{
    python3 - "$1" <<'PY'
import sys
data = open(sys.argv[1], "rb").read()
bs, runs = 4096, []
for b in range(0, len(data), bs):
    if data[b:b + bs].count(0) == len(data[b:b + bs]):
        if runs and runs[-1][0] + runs[-1][1] == b:
            runs[-1][1] += min(bs, len(data) - b)
        else:
            runs.append([b, min(bs, len(data) - b)])
print(" ".join("%d:%d" % (o, l) for o, l in runs))
PY
}

# 1. Random disks.
for seed in 1 2 3; do
    size=$(( (4 + seed) * M ))
    layout=$(python3 - $seed $size <<'PY'
import random, sys
seed, size = int(sys.argv[1]), int(sys.argv[2])
r = random.Random(seed)
out, pos = [], r.randrange(0, 64) * 512
while pos < size:
    ln = min(r.choice([512, 4096, 8192, 65536, 300000]), size - pos)
    out.append("%d:%d" % (pos, ln))
    pos += ln + r.choice([512, 4096, 12288, 65536, 200000, 700000, 2 << 20])
print(" ".join(out))
PY
)
    # shellcheck disable=SC2086
    mk_sparse $tmp/sparse.img $size $layout
    # shellcheck disable=SC2086
    mk_thick $tmp/thick.img $size $layout
    for z in auto 0 4K 64K 1M 64M; do
        for src in "file $tmp/sparse.img" "--filter=noextents file $tmp/thick.img"; do
            f=${src##* }
            for mode in reqone big; do
                # shellcheck disable=SC2086
                start_nbdkit --filter=sparsebackup $src sparsebackup-min-zero-extent=$z
                walk $f $mode >/dev/null || fail "seed $seed, $z, $src, $mode"
                stop_nbdkit
            done
        done
    done
done
echo "1. no ZERO over data: ok"

# 2. and 3. A fragmented disk: 2% of its 4K blocks hold data.
size=$((64 * M))
layout=$(python3 - $size <<'PY'
import random, sys
n = int(sys.argv[1]) // 4096
print(" ".join("%d:4096" % (b * 4096)
               for b in sorted(random.Random(9).sample(range(n), n // 50))))
PY
)
# shellcheck disable=SC2086
mk_sparse $tmp/frag.img $size $layout
# shellcheck disable=SC2086
mk_thick $tmp/fragthick.img $size $layout
want=$(exact_zeros $tmp/frag.img)
for src in "file $tmp/frag.img" "--filter=noextents file $tmp/fragthick.img"; do
    f=${src##* }
    declare -A calls=()
    for z in auto 0; do
        for mode in reqone big; do
            # shellcheck disable=SC2086
            start_nbdkit --filter=sparsebackup $src sparsebackup-min-zero-extent=$z
            out=$(walk $f $mode) || fail "$src, $z, $mode"
            stop_nbdkit
            calls[$z.$mode]=${out%% *}
            zeros=${out#* }
            if [ "$z" = 0 ] || [ "$mode" = big ]; then
                [ "$zeros" = "$want" ] ||
                    fail "$src, min-zero-extent=$z, $mode: not the exact map"
            fi
        done
    done
    echo "$src: REQ_ONE walk: ${calls[auto.reqone]} requests (auto)," \
         "${calls[0.reqone]} (exact)"
    [ $((calls[auto.reqone] * 2)) -lt "${calls[0.reqone]}" ] ||
        fail "$src: auto does not save REQ_ONE round trips"
    unset calls
done
echo "2., 3. fewer REQ_ONE round trips; exact map at 0 and for large requests: ok"

# 4a. The fragmented thick disk, everything merged (min-zero-extent 64M):
# one data extent per scan-max (32M) of REQ_ONE, not one per scan chunk
# (2M): at most 3 requests for 64M.
start_nbdkit --filter=sparsebackup --filter=noextents file $tmp/fragthick.img \
             sparsebackup-min-zero-extent=64M
out=$(walk $tmp/fragthick.img reqone) || fail "4a: walk"
stop_nbdkit
echo "4a. REQ_ONE walk of 64M, all merged: ${out%% *} requests"
[ "${out%% *}" -le 3 ] ||
    fail "4a: ${out%% *} REQ_ONE requests: the answers are cut at scan chunks"

# 4b. A zero run of 3M - 4K from 4K, across the first scan chunk's end
# (2M), with min-zero-extent 2560K: it is long enough, so it is answered
# as ZERO (not cut at 2M and merged as data); then zeros from 3M + 4K to
# the end.
mk_thick $tmp/edge.img $((8 * M)) 0:4096 $((3 * M)):4096
for z in 2560K 0; do
    for mode in reqone big; do
        start_nbdkit --filter=sparsebackup --filter=noextents file $tmp/edge.img \
                     sparsebackup-min-zero-extent=$z
        out=$(walk $tmp/edge.img $mode) || fail "4b: $z, $mode: walk"
        stop_nbdkit
        [ "${out#* }" = "4096:$((3 * M - 4096)) $((3 * M + 4096)):$((5 * M - 4096))" ] ||
            fail "4b: $z, $mode: zero runs '${out#* }'"
    done
done
echo "4. REQ_ONE answers not cut at the scan's edge: ok"
echo "$0: OK"
