#!/usr/bin/env bash
# sparsebackup-retain (tools/ctl): keeping the last N incrementals.
#  1. A qcow2 chain: five backup rounds of a disk being changed (a full
#     backup c0 and incrementals c1..c4 from @frozen:since:, each with
#     its manifest; the SHA-256 of @frozen saved at each backup).
#     Retention to N=2 merges c0 and c1 into the base: c2 (standalone)
#     <- c3 <- c4 remain, c0.qcow2 and c1.qcow2 are gone, the server's
#     checkpoints are c2 c3 c4, and every point kept restores exactly
#     (qemu-img convert) to the disk at its backup.  Then killed (kill -9)
#     after each of its steps in turn, from the same starting state:
#     after the kill every point of whatever chain is left restores
#     exactly (none lost), and a rerun finishes with the result above.
#  2. Raw copies (cp --reflink, then sparsebackup-copy --delta, one per
#     backup): retention to N=2 removes the two oldest, their manifests
#     and their checkpoints; the rest match their manifests and the disk
#     at each backup; killed after each step, then rerun, likewise.
#  3. What is refused: a damaged merged point (the manifest no longer
#     matches) changes nothing; a chain with a missing file; names that
#     are not CHECKPOINT.qcow2; a journal that is not ours.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires qemu-img --version
requires nbdcopy --version
requires flock --version
requires_filter sparsebackup
requires_plugin file
requires_plugin qcow2
copy=$abs_top_builddir/tools/sparsebackup-copy
retain=$abs_top_builddir/tools/ctl/sparsebackup-retain
[ -x "$copy" ] || fail "$copy not built"
[ -x "$retain" ] || fail "$retain not built"
export SPARSEBACKUP_CTL=$ctl_bin SPARSEBACKUP_COPY=$copy

size=$((8 << 20))
python3 "$_functions_dir/make-disk.py" "$tmp/disk.raw" $size \
    0:300000 2097152:500000 6291456:65536
ctlsock=$tmp/ctl.sock
bk=$tmp/backups
mkdir "$bk"

server ()
{
    start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
        sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
        sparsebackup-scratch="$tmp/disk.scratch"
}
view () { echo "nbd+unix:///$1?socket=$sock"; }

# change SEED: some writes, a zero request and a trim through the disk.
change ()
{
    "$nbd_python" - "$sock" "$1" <<'PY'
import nbd, random, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
rng = random.Random(int(sys.argv[2])); size = h.get_size()
for _ in range(12):
    n = rng.choice([4096, 65536, 200000]); off = rng.randrange(0, size - n)
    h.pwrite(bytes([rng.randrange(1, 256)]) * n, off)
n = 131072; h.zero(n, rng.randrange(0, size - n))
n = 65536; h.trim(n, rng.randrange(0, size - n))
h.shutdown()
PY
}

# ---- backups: five rounds, qcow2 and raw --------------------------------
server
prev=
for r in 0 1 2 3 4; do
    cp=c$r
    change $r
    ctl backup-begin $cp ${prev:+--since $prev} > /dev/null
    nbdcopy "$(view @frozen)" - | sha256sum | cut -d' ' -f1 > "$tmp/$cp.sum"
    if [ -z "$prev" ]; then
        (cd "$bk" && qemu-img convert -f raw -O qcow2 "$(view @frozen)" $cp.qcow2)
        "$copy" -q --manifest-only --manifest="$bk/$cp.manifest" "$(view @frozen)"
        "$copy" -q --manifest="$bk/$cp.raw-manifest" "$(view @frozen)" "$bk/$cp.raw"
    else
        (cd "$bk" && qemu-img convert -f raw -O qcow2 -B $prev.qcow2 -F qcow2 \
            "$(view @frozen:since:$prev)" $cp.qcow2)
        "$copy" -q --manifest-only --delta --base-manifest="$bk/$prev.manifest" \
            --manifest="$bk/$cp.manifest" "$(view @frozen:since:$prev)"
        cp --reflink=auto --sparse=always "$bk/$prev.raw" "$bk/$cp.raw"
        "$copy" -q --delta --base-manifest="$bk/$prev.raw-manifest" \
            --manifest="$bk/$cp.raw-manifest" "$(view @frozen:since:$prev)" "$bk/$cp.raw"
    fi
    ctl backup-end $cp --ok > /dev/null
    prev=$cp
done
stop_nbdkit
# The raw copies get their own directory (their manifests named
# CHECKPOINT.manifest too).
mkdir "$tmp/raw"
for r in 0 1 2 3 4; do
    mv "$bk/c$r.raw" "$tmp/raw/c$r.raw"
    mv "$bk/c$r.raw-manifest" "$tmp/raw/c$r.manifest"
done
# The starting state of every run: the backups and the cbt file (closed
# cleanly: the checkpoints are kept).
cp -a "$bk" "$tmp/bk.orig"
cp -a "$tmp/raw" "$tmp/raw.orig"
cp "$tmp/disk.cbt" "$tmp/disk.cbt.orig"

# restores_exactly POINT: POINT.qcow2 (through its chain) is the disk at
# backup POINT.
restores_exactly ()
{
    qemu-img convert -f qcow2 -O raw "$bk/$1.qcow2" "$tmp/restored.raw" ||
        fail "point $1 cannot be restored"
    [ "$(sha256sum < "$tmp/restored.raw" | cut -d' ' -f1)" = "$(cat "$tmp/$1.sum")" ] ||
        fail "point $1 restores to something else than the disk at backup $1"
}

# chain_points: the points of the chain from c4 (top first).
chain_points ()
{
    local f=c4.qcow2 b
    while [ -n "$f" ]; do
        echo "${f%.qcow2}"
        b=$(cd "$bk" && qemu-img info -U --output=json "$f" |
                sed -n 's/^    "backing-filename": "\(.*\)",\{0,1\}$/\1/p')
        f=$b
    done
}

# The result of retention to 2: c2 <- c3 <- c4, c2 standalone.
check_result ()
{
    assert_eq "c4 c3 c2" "$(chain_points | tr '\n' ' ' | sed 's/ $//')" "the chain kept"
    for p in c2 c3 c4; do restores_exactly $p; done
    for f in c0.qcow2 c1.qcow2 c0.manifest c1.manifest .sparsebackup-retain.journal \
             .c1.qcow2.retain-base .c1.qcow2.retain-top .c2.qcow2.retain-base \
             .c2.qcow2.retain-top; do
        [ ! -e "$bk/$f" ] || fail "$f is left"
    done
    ctl checkpoint-list > "$tmp/list"
    assert_eq "c2 c3 c4" "$(awk '$1 != "OK" {print $1}' "$tmp/list" | tr '\n' ' ' | sed 's/ $//')" "the checkpoints kept"
}

fresh ()
{
    rm -rf "$bk" "$tmp/raw"
    cp -a "$tmp/bk.orig" "$bk"
    cp -a "$tmp/raw.orig" "$tmp/raw"
    cp "$tmp/disk.cbt.orig" "$tmp/disk.cbt"
    server
}

# ---- 1. qcow2: retention, then killed after every step ------------------
fresh
for p in c0 c1 c2 c3 c4; do restores_exactly $p; done
(cd "$tmp" && "$retain" --keep=2 --control=ctl.sock --verify-all backups/c4.qcow2) > "$tmp/out" ||
    { cat "$tmp/out"; fail "sparsebackup-retain failed"; }
cat "$tmp/out"
assert_contains "$tmp/out" "kept 3 points: c2 c3 c4 \(base c2.qcow2\)"
assert_contains "$tmp/out" "checkpoint c0 deleted"
check_result
# Nothing more to do: a second run changes nothing.
"$retain" --keep=2 --control="$ctlsock" "$bk/c4.qcow2" > "$tmp/out"
assert_contains "$tmp/out" "kept 3 points: c2 c3 c4"
stop_nbdkit

kills=0
for (( n = 1; ; n++ )); do
    fresh
    rc=0
    SPARSEBACKUP_RETAIN_DEBUG_KILL=$n "$retain" --keep=2 --control="$ctlsock" \
        "$bk/c4.qcow2" > "$tmp/out" 2> "$tmp/err" || rc=$?
    if [ $rc = 0 ]; then stop_nbdkit; break; fi
    [ $rc = 137 ] || { cat "$tmp/out" "$tmp/err"; fail "killed after step $n: exit $rc"; }
    kills=$((kills + 1))
    step=$(sed -n 's/.*killed after step [0-9]* (\(.*\)).*/\1/p' "$tmp/err")
    # Every point of what is left restores exactly.
    left=$(chain_points | tr '\n' ' ')
    for p in $left; do restores_exactly $p; done
    echo "killed after step $n ($step): the chain $left restores exactly"
    "$retain" --keep=2 --control="$ctlsock" --verify-all "$bk/c4.qcow2" > "$tmp/out" 2>&1 ||
        { cat "$tmp/out"; fail "the run after a kill after step $n failed"; }
    check_result
    stop_nbdkit
done
echo "qcow2: killed after each of $kills steps, every kept point restorable, rerun completed"
(( kills >= 15 )) || fail "only $kills steps: expected two merges of at least 7 steps each"

# ---- 2. raw copies -------------------------------------------------------
raws () { echo "$tmp/raw/c0.raw $tmp/raw/c1.raw $tmp/raw/c2.raw $tmp/raw/c3.raw $tmp/raw/c4.raw"; }
check_raw ()
{
    for p in c0 c1; do
        [ ! -e "$tmp/raw/$p.raw" ] && [ ! -e "$tmp/raw/$p.manifest" ] ||
            fail "raw $p is left"
    done
    for p in c2 c3 c4; do
        [ "$(sha256sum < "$tmp/raw/$p.raw" | cut -d' ' -f1)" = "$(cat "$tmp/$p.sum")" ] ||
            fail "raw $p is not the disk at backup $p"
    done
    [ ! -e "$tmp/raw/.sparsebackup-retain.journal" ] || fail "the journal is left"
    ctl checkpoint-list > "$tmp/list"
    assert_eq "c2 c3 c4" "$(awk '$1 != "OK" {print $1}' "$tmp/list" | tr '\n' ' ' | sed 's/ $//')" "the checkpoints kept (raw)"
}
fresh
# shellcheck disable=SC2046
"$retain" --keep=2 --control="$ctlsock" --verify-all --raw $(raws) > "$tmp/out" ||
    { cat "$tmp/out"; fail "sparsebackup-retain --raw failed"; }
cat "$tmp/out"
assert_contains "$tmp/out" "kept 3 points: c2 c3 c4"
check_raw
stop_nbdkit
kills=0
for (( n = 1; ; n++ )); do
    fresh
    rc=0
    # shellcheck disable=SC2046
    SPARSEBACKUP_RETAIN_DEBUG_KILL=$n "$retain" --keep=2 --control="$ctlsock" \
        --raw $(raws) > "$tmp/out" 2> "$tmp/err" || rc=$?
    if [ $rc = 0 ]; then stop_nbdkit; break; fi
    [ $rc = 137 ] || { cat "$tmp/out" "$tmp/err"; fail "raw, killed after step $n: exit $rc"; }
    kills=$((kills + 1))
    for p in c2 c3 c4; do
        "$copy" -q --verify="$tmp/raw/$p.manifest" "$tmp/raw/$p.raw" ||
            fail "raw $p damaged by a kill after step $n"
    done
    # shellcheck disable=SC2046
    "$retain" --keep=2 --control="$ctlsock" --raw $(raws) > "$tmp/out" 2>&1 ||
        { cat "$tmp/out"; fail "raw: the run after a kill after step $n failed"; }
    check_raw
    stop_nbdkit
done
echo "raw: killed after each of $kills steps, rerun completed"
(( kills >= 7 )) || fail "raw: only $kills steps"

# ---- 3. refusals -----------------------------------------------------------
fresh
# A damaged incremental: the merged point differs from its manifest.
"$nbd_python" - "$bk/c1.qcow2" <<'PY'
import subprocess, sys
# Overwrite the data of c1's first allocated cluster on the host side.
m = subprocess.run(["qemu-img", "map", "--output=json", "-f", "qcow2", sys.argv[1]],
                   capture_output=True, text=True, check=True).stdout
import json
for e in json.loads(m):
    if e["data"] and e.get("offset") is not None and e["depth"] == 0:
        with open(sys.argv[1], "r+b") as f:
            f.seek(e["offset"]); f.write(b"\xde\xad" * 2048)
        break
else:
    sys.exit("no cluster of its own in c1.qcow2")
PY
cp -a "$bk" "$tmp/bk.damaged"
rc=0
"$retain" --keep=2 --control="$ctlsock" "$bk/c4.qcow2" > "$tmp/out" 2> "$tmp/err" || rc=$?
cat "$tmp/out" "$tmp/err"
assert_eq 1 $rc "exit status when the merged point differs from its manifest"
assert_contains "$tmp/err" "the merged image differs from point c1: nothing changed"
for f in c0.qcow2 c1.qcow2 c2.qcow2 c3.qcow2 c4.qcow2; do
    cmp "$bk/$f" "$tmp/bk.damaged/$f" || fail "$f changed although the merge failed"
done
ctl checkpoint-list > "$tmp/list"
assert_contains "$tmp/list" "^c0 good"
# A missing file of the chain.
rm -f "$bk/.sparsebackup-retain.journal"
mv "$bk/c2.qcow2" "$tmp/c2.away"
rc=0
"$retain" --keep=2 "$bk/c4.qcow2" > "$tmp/out" 2> "$tmp/err" || rc=$?
assert_eq 1 $rc "exit status with a file of the chain missing"
assert_contains "$tmp/err" "c2.qcow2': not a regular file \(a backup of the chain is missing\)"
mv "$tmp/c2.away" "$bk/c2.qcow2"
# Another chain branching at the base.
qemu-img create -q -f qcow2 -b c0.qcow2 -F qcow2 "$bk/branch.qcow2"
rc=0
"$retain" --keep=2 "$bk/c4.qcow2" > "$tmp/out" 2> "$tmp/err" || rc=$?
assert_eq 1 $rc "a merge of a base another chain uses"
assert_contains "$tmp/err" "'branch.qcow2' also has 'c0.qcow2' as its backing file: another chain branches there, merge refused"
rm -f "$bk/branch.qcow2" "$bk/.sparsebackup-retain.journal"
# Names, options, a journal not ours.
cp "$bk/c4.qcow2" "$tmp/top copy.qcow2"
rc=0; "$retain" --keep=2 "$tmp/top copy.qcow2" 2> "$tmp/err" || rc=$?
assert_eq 1 $rc "a file name with a space"
assert_contains "$tmp/err" "only letters, digits"
rc=0; "$retain" "$bk/c4.qcow2" 2> "$tmp/err" || rc=$?
assert_eq 2 $rc "no --keep"
assert_contains "$tmp/err" "--keep=N is required"
rc=0; "$retain" --keep=2 "$bk/c4.qcow2" "$bk/c3.qcow2" 2> "$tmp/err" || rc=$?
assert_eq 2 $rc "two tops"
echo "something else" > "$bk/.sparsebackup-retain.journal"
rc=0; "$retain" --keep=2 "$bk/c4.qcow2" 2> "$tmp/err" || rc=$?
assert_eq 1 $rc "a journal that is not ours"
assert_contains "$tmp/err" "is not a journal of this program: check it, then remove it"
"$retain" --version | grep -q "^sparsebackup-retain [0-9]" || fail "--version"
"$retain" --help | grep -q "^usage: sparsebackup-retain --keep=N" || fail "--help"
