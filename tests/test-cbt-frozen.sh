#!/usr/bin/env bash
# Point-in-time backups (@frozen, @frozen:since:X, sparsebackup-scratch).
#  1. A storm of writes, zeros and trims through two connections runs
#     while @frozen is copied with qemu-img, nbdcopy and sparsebackup-copy:
#     every copy equals the disk as it was at backup-begin; every ZERO
#     extent of @frozen reads as zero; nbdinfo --list describes the view.
#  2. A writer keeps writing across backup-begin c2 --since c1: the
#     frozen disk is the disk after exactly the writes that ended before
#     the freeze (a prefix of them, checked by replay); the incremental
#     of @frozen:since:c1 (qemu-img -B, and sparsebackup-copy --delta)
#     restores it exactly, through qemu-img and through the qcow2 plugin;
#     every HOLE-only extent of the delta view equals the previous backup.
#  3. After backup-end the views are gone (connections refused, reads of
#     an open connection fail) and the scratch file is empty.
#  4. The scratch file full: with break-backup (default) the writes go
#     on, frozen reads fail, backup-end --ok reports "broken" and deletes
#     the checkpoint; with fail-write the write fails with ENOSPC and the
#     frozen disk stays exact.
#  5. A write that overtakes a frozen read of the plugin (debug delay):
#     the read returns the old data.
#  6. kill -9 during a frozen backup (write-ahead, process-safe): the pending checkpoint
#     is dropped, the scratch file emptied, and an incremental since the
#     last good checkpoint restores the disk exactly.
#  7. A trim and a zero request over a hole during a frozen backup read
#     nothing (the plugin's extents say zero) and store nothing.
# Fails on any copy that differs, any missed change, or a wrong message.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires qemu-img --version
requires nbdcopy --version
requires nbdinfo --version
requires_filter sparsebackup
requires_plugin file
copy=$abs_top_builddir/tools/sparsebackup-copy
[ -x "$copy" ] || fail "$copy not built"
qcow2_plugin=$abs_top_builddir/plugins/qcow2/.libs/nbdkit-qcow2-plugin.so

size=$((32 << 20))
ranges=()
for (( i = 0; i < 32; i += 2 )); do ranges+=("$(( (i << 20) + i * 4096 )):$(( 200000 + i * 9000 ))"); done
python3 "$_functions_dir/make-disk.py" "$tmp/disk.raw" "$size" "${ranges[@]}"
ctlsock=$tmp/ctl.sock
scratch=$tmp/scratch
server ()
{
    start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
        sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
        sparsebackup-scratch="$scratch" "$@"
    nbdinfo --size "$uri" > /dev/null   # opens the cbt file
}
frozen_uri () { echo "nbd+unix:///$1?socket=$sock"; }

# A storm: random writes, zeros and trims through "" and "other", 8 in
# flight each, until $tmp/stop exists, over the first half of the disk
# (the second half stays unchanged: HOLE in the delta views).
cat > "$tmp/storm.py" <<'PY'
import nbd, os, random, sys
sock, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
hs = []
for name in ("", "other"):
    h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock); hs.append(h)
size = hs[0].get_size() // 2; i = 0     # the first half only
while not os.path.exists(stop) or i < 50:
    h = hs[i % 2]; i += 1
    n = rng.choice([512, 4096, 65536, 200000, 1 << 20]); off = rng.randrange(0, size - n)
    k = rng.random()
    if k < 0.7:
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i % 255 + 1]) * n), off)
    elif k < 0.85:
        h.aio_zero(n, off)
    else:
        h.aio_trim(n, off)
    while h.aio_in_flight() > 8:
        h.poll(-1)
for h in hs:
    while h.aio_in_flight() > 0:
        h.poll(-1)
    h.shutdown()
print(i)
PY

# Every ZERO extent of export $1 reads as zero in file $2.
zero_extents_zero ()
{
    nbdinfo --map --json "$(frozen_uri "$1")" > "$tmp/map.json"
    "$nbd_python" - "$tmp/map.json" "$2" <<'PY' || fail "$1: a ZERO extent holds data"
import json, sys
f = open(sys.argv[2], "rb")
for e in json.load(open(sys.argv[1])):
    if e["type"] & 2:
        f.seek(e["offset"]); b = f.read(e["length"])
        if b.count(0) != len(b):
            print("ZERO extent at %d (%d bytes) holds data" % (e["offset"], e["length"]))
            sys.exit(1)
PY
}

# ---- 1. A storm during the full backup ---------------------------------
server
cbt_ops "$sock" 3 30 "$tmp/p0" ""
cp "$tmp/disk.raw" "$tmp/t1.raw"          # idle: the disk at backup-begin
ctl backup-begin c1 > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c1 state=pending since=-"
nbdinfo --list "$uri" > "$tmp/list"
assert_contains "$tmp/list" 'export="@frozen":'
assert_contains "$tmp/list" "description: the disk as it was at backup-begin c1 \(point-in-time, read-only\)"
rm -f "$tmp/stop"
"$nbd_python" "$tmp/storm.py" "$sock" 1 "$tmp/stop" > "$tmp/storm.out" &
storm=$!
qemu-img convert -f raw -O qcow2 "$(frozen_uri @frozen)" "$tmp/full.qcow2"
nbdcopy "$(frozen_uri @frozen)" "$tmp/f1.raw"
"$copy" -q "$(frozen_uri @frozen)" "$tmp/f2.raw"
zero_extents_zero @frozen "$tmp/t1.raw"
touch "$tmp/stop"
wait $storm || fail "the storm failed"
echo "storm: $(cat "$tmp/storm.out") requests during the backup"
nbdcopy "$(frozen_uri @frozen)" "$tmp/f3.raw"       # after the storm
qemu-img convert -f qcow2 -O raw "$tmp/full.qcow2" "$tmp/full.raw"
for f in full f1 f2 f3; do
    cmp "$tmp/$f.raw" "$tmp/t1.raw" || fail "@frozen copy $f differs from the disk at backup-begin"
done
cmp -s "$tmp/disk.raw" "$tmp/t1.raw" && fail "the storm changed nothing"
ctl status > "$tmp/out"
assert_contains "$tmp/out" "pending=c1 latest=- state=ok frozen=c1 scratch-used=[1-9][0-9]* scratch-limit=none backup=ok"
used=$(sed 's/.*scratch-used=\([0-9]*\).*/\1/' "$tmp/out")
[ "$(allocated "$scratch")" -le $((used + 65536)) ] ||
    fail "the scratch file holds $(allocated "$scratch") bytes, $used counted"
[ "$used" -le "$size" ] || fail "scratch-used $used is more than the disk"

# Dense data of the plugin's old zeros is never stored: a granule that
# read as zero costs nothing (the counter counts what was written).
ctl backup-end c1 --ok > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c1 state=good"
assert_eq 4096 "$(stat -c %s "$scratch")" "scratch size after backup-end (its header)"

# ---- 3. The views are gone after backup-end -------------------------------
rc=0; nbdinfo "$(frozen_uri @frozen)" > /dev/null 2> "$tmp/err" || rc=$?
failed_cleanly $rc "@frozen after backup-end"
assert_contains "$server_log" "export '@frozen': no backup in progress"

# ---- 2. A writer across backup-begin: the freeze point is exact ---------
cat > "$tmp/writer.py" <<'PY'
# Synchronous writes (one at a time) over the first quarter of the disk;
# each completed one appended to LOG.
import nbd, os, random, sys
sock, seed, log, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = random.Random(seed)
h = nbd.NBD(); h.connect_unix(sock); size = h.get_size() // 4
with open(log, "w", buffering=1) as f:
    i = 0
    while not os.path.exists(stop):
        n = rng.choice([512, 4096, 70000, 300000]); off = rng.randrange(0, size - n)
        k = rng.random()
        if k < 0.7:
            h.pwrite(bytes([i % 255 + 1]) * n, off); f.write("w %d %d %d\n" % (off, n, i % 255 + 1))
        elif k < 0.85:
            h.zero(n, off); f.write("z %d %d 0\n" % (off, n))
        else:
            h.trim(n, off); f.write("t %d %d 0\n" % (off, n))
        i += 1
h.shutdown()
PY
cat > "$tmp/replay.py" <<'PY'
# replay BASE LOG LO HI FROZEN FINAL: FROZEN equals BASE + the first K
# operations of LOG for some K in [LO, HI]; FINAL equals BASE + all of
# them (trimmed ranges are compared as "anything": the file plugin
# punches holes, which read as zero, but a trim promises nothing).
import sys
base, log, lo, hi, frozen, final = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5], sys.argv[6]
ops = [l.split() for l in open(log) if l.endswith("\n")]
d = bytearray(open(base, "rb").read())
fz = open(frozen, "rb").read()
def apply(op):
    k, off, n, v = op[0], int(op[1]), int(op[2]), int(op[3])
    d[off:off + n] = bytes([v]) * n     # trims read back as zero here
hi = min(hi, len(ops)); found = None
for k in range(0, hi + 1):
    if k >= lo and bytes(d) == fz:
        found = k; break
    if k < len(ops):
        apply(ops[k])
if found is None:
    print("the frozen disk is not the disk after K writes, K in [%d, %d]" % (lo, hi)); sys.exit(1)
for op in ops[hi:]:
    apply(op)
if bytes(d) != open(final, "rb").read():
    print("the replay of every write does not give the final disk"); sys.exit(1)
print("frozen after %d of %d writes (window %d..%d)" % (found, len(ops), lo, hi))
PY
cp "$tmp/disk.raw" "$tmp/base2.raw"
rm -f "$tmp/stop"
"$nbd_python" "$tmp/writer.py" "$sock" 5 "$tmp/wlog" "$tmp/stop" &
writer=$!
sleep 1
lo=$(wc -l < "$tmp/wlog")
ctl backup-begin c2 --since c1 > "$tmp/out"
hi=$(( $(wc -l < "$tmp/wlog") + 1 ))
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c2 state=pending since=c1"
nbdinfo --list "$uri" > "$tmp/list"
assert_contains "$tmp/list" 'export="@frozen:since:c1":'
assert_contains "$tmp/list" "description: the disk as it was at backup-begin c2, changes since checkpoint c1 \(delta view, read-only\)"
sleep 0.5
nbdcopy "$(frozen_uri @frozen)" "$tmp/f4.raw"
qemu-img convert -f raw -O qcow2 -B "$tmp/full.qcow2" -F qcow2 \
    "$(frozen_uri @frozen:since:c1)" "$tmp/inc2.qcow2"
cp "$tmp/full.raw" "$tmp/inc2-copy.raw"
"$copy" -q --delta "$(frozen_uri @frozen:since:c1)" "$tmp/inc2-copy.raw"
view_data "$sock" @frozen:since:c1 "$tmp/view2"
zero_extents_zero @frozen:since:c1 "$tmp/f4.raw"
# (the writer writes during the backup however slow the machine is)
wait_until 120 "the writer writing during the backup" \
    eval '[ "$(wc -l < "$tmp/wlog")" -gt $((hi + 5)) ]'
touch "$tmp/stop"
wait $writer || fail "the writer failed"
echo "writer: $(wc -l < "$tmp/wlog") writes, $lo done before backup-begin, $hi after"
[ "$(wc -l < "$tmp/wlog")" -gt $((hi + 5)) ] || fail "the writer did not write during the backup"
"$nbd_python" "$tmp/replay.py" "$tmp/base2.raw" "$tmp/wlog" "$lo" "$hi" \
    "$tmp/f4.raw" "$tmp/disk.raw" || fail "@frozen is not the disk at backup-begin"

qemu-img convert -O raw "$tmp/inc2.qcow2" "$tmp/restored2.raw"
cmp "$tmp/restored2.raw" "$tmp/f4.raw" || fail "the restored incremental (qemu-img) differs"
cmp "$tmp/inc2-copy.raw" "$tmp/f4.raw" || fail "the restored incremental (sparsebackup-copy --delta) differs"
if [ -f "$qcow2_plugin" ]; then
    rm -f "$tmp/restored3.raw"
    nbdkit -U - "$qcow2_plugin" file="$tmp/inc2.qcow2" \
        --run "nbdcopy \"\$uri\" $tmp/restored3.raw"
    cmp "$tmp/restored3.raw" "$tmp/f4.raw" || fail "the restore through the qcow2 plugin differs"
fi
# Every HOLE-only extent of the delta view equals the previous backup,
# and the view is smaller than the disk.
"$nbd_python" - "$tmp/view2" "$tmp/full.raw" "$tmp/f4.raw" <<'PY' || fail "a HOLE extent of @frozen:since:c1 differs from the previous backup"
import sys
data = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
prev, cur = open(sys.argv[2], "rb").read(), open(sys.argv[3], "rb").read()
pos = 0; hole = 0
for o, n in data + [(len(cur), 0)]:
    if prev[pos:o] != cur[pos:o]:
        print("HOLE extent %d..%d differs" % (pos, o)); sys.exit(1)
    hole += o - pos; pos = o + n
if hole == 0:
    print("the delta view has no HOLE extent"); sys.exit(1)
print("HOLE-only (unchanged) bytes: %d of %d" % (hole, len(cur)))
PY
ctl backup-end c2 --ok > /dev/null

# ---- 3. An open connection when the backup ends -------------------------
ctl backup-begin c3 --since c2 > /dev/null
cat > "$tmp/open.py" <<'PY'
import nbd, subprocess, sys
h = nbd.NBD(); h.set_export_name("@frozen"); h.connect_unix(sys.argv[1])
h.pread(4096, 0)
subprocess.run(sys.argv[2:], check=True, stdout=subprocess.DEVNULL)
try:
    h.pread(4096, 0)
except nbd.Error as e:
    print("read after backup-end: %s" % e.string)
    sys.exit(0)
print("a read of @frozen after backup-end succeeded"); sys.exit(1)
PY
"$nbd_python" "$tmp/open.py" "$sock" "$ctl_bin" "$ctlsock" backup-end c3 --failed ||
    fail "an open @frozen connection still reads after backup-end"
assert_contains "$server_log" "export '@frozen': backup 'c3' has ended"
ctl checkpoint-list > "$tmp/out"
assert_contains "$tmp/out" "OK checkpoints=2"
# checkpoint-delete of the frozen backup's checkpoint ends the backup.
ctl backup-begin c4 --since c2 > /dev/null
nbdinfo --size "$(frozen_uri @frozen)" > /dev/null
ctl checkpoint-delete c4 > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c4 state=deleted"
ctl status > "$tmp/out"
assert_contains "$tmp/out" "pending=- .* frozen=- scratch-used=0 "
nbdinfo --size "$(frozen_uri @frozen)" > /dev/null 2>&1 &&
    fail "@frozen served after its checkpoint was deleted"
stop_nbdkit

# ---- 4. The scratch file full --------------------------------------------
# A write of fresh data over 1M of old data needs 1M of scratch.
fill=$((4 << 20))
"$nbd_python" - "$tmp/disk.raw" $fill <<'PY'
import os, sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2])); f.write(os.urandom(1 << 20))
PY
server sparsebackup-scratch-size=256K
ctl backup-begin b1 --since c2 > /dev/null
cp "$tmp/disk.raw" "$tmp/t5.raw"
nbdsh -u "$uri" -c "h.pwrite(b'\x55' * (1 << 20), $fill)" ||
    fail "break-backup: the write failed"
ctl status > "$tmp/out"
assert_contains "$tmp/out" "frozen=b1 scratch-used=[0-9]* scratch-limit=262144 backup=broken"
assert_contains "$server_log" "backup 'b1' is broken: the scratch file $(ere_quote "$scratch") is full \([0-9]* of 262144 bytes used, [0-9]* more needed\): frozen reads fail from now on"
rc=0; nbdcopy "$(frozen_uri @frozen)" "$tmp/f5.raw" 2> "$tmp/err" || rc=$?
failed_cleanly $rc "a copy of a broken backup"
rc=0; ctl backup-end b1 --ok > "$tmp/out" 2> "$tmp/err" || rc=$?
failed_cleanly $rc "backup-end --ok of a broken backup"
assert_contains "$tmp/err" "ERR broken backup 'b1' is broken \(the scratch file .* is full .*\): its checkpoint was deleted, take the backup again"
ctl checkpoint-list > "$tmp/out"
grep -q '^b1 ' "$tmp/out" && fail "the broken backup left its checkpoint"
nbdsh -u "$uri" -c "assert h.pread(1 << 20, $fill) == b'\x55' * (1 << 20)" ||
    fail "break-backup: the write did not land"
stop_nbdkit

"$nbd_python" - "$tmp/disk.raw" $fill <<'PY'
import os, sys
f = open(sys.argv[1], "r+b"); f.seek(int(sys.argv[2])); f.write(os.urandom(1 << 20))
PY
server sparsebackup-scratch-size=256K sparsebackup-scratch-error=fail-write
ctl backup-begin b2 --since c2 > /dev/null
cp "$tmp/disk.raw" "$tmp/t6.raw"
rc=0
nbdsh -u "$uri" -c "h.pwrite(b'\x66' * 131072, $fill)" -c "h.pwrite(b'\x66' * (1 << 20), $fill)" 2> "$tmp/err" || rc=$?
failed_cleanly $rc "fail-write: a write past the scratch limit"
assert_contains "$tmp/err" "No space left on device"
assert_contains "$server_log" "backup 'b2': the scratch file .* is full .*: the write is refused \(sparsebackup-scratch-error=fail-write\)"
nbdcopy "$(frozen_uri @frozen)" "$tmp/f6.raw"
cmp "$tmp/f6.raw" "$tmp/t6.raw" || fail "fail-write: the frozen disk changed"
ctl backup-end b2 --ok > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=b2 state=good"
stop_nbdkit

# ---- 5. A change during a frozen read of the plugin ---------------------
# The read looks at the granules, then (delayed 300 ms by the debug flag)
# reads the plugin; a write overwrites them meanwhile.  The read must
# notice and return the saved old data.
start_nbdkit -D sparsebackup.frozen_read_delay=300 --filter=sparsebackup \
    file "$tmp/disk.raw" sparsebackup-cbt="$tmp/disk.cbt" \
    sparsebackup-control="$ctlsock" sparsebackup-scratch="$scratch"
nbdinfo --size "$uri" > /dev/null
ctl backup-begin r1 > /dev/null
"$nbd_python" - "$sock" "$tmp/disk.raw" <<'PY' || fail "a frozen read returned data written after the freeze"
import nbd, sys, time
sock, disk = sys.argv[1], sys.argv[2]
off, n = 3 << 20, 256 << 10
f = open(disk, "rb"); f.seek(off); old = f.read(n)
a = nbd.NBD(); a.set_export_name("@frozen"); a.connect_unix(sock)
b = nbd.NBD(); b.connect_unix(sock)
buf = nbd.Buffer(n)
c = a.aio_pread(buf, off)
time.sleep(0.1)
b.pwrite(b"\x77" * n, off)
while not a.aio_command_completed(c):
    a.poll(-1)
assert b.pread(n, off) == b"\x77" * n
if buf.to_bytearray() != old:
    print("the frozen read returned the new data"); sys.exit(1)
PY
ctl backup-end r1 --failed > /dev/null
stop_nbdkit

# ---- 6. kill -9 during a frozen backup (write-ahead, process-safe) ------
# The pending checkpoint is dropped at the restart, the scratch file is
# emptied, the last good checkpoint survives, and an incremental since it
# (taken after the restart) restores the disk exactly: nothing written
# during the interrupted backup was lost from the record.
for mode in write-ahead process-safe; do
rm -f "$tmp/wa.cbt"
server sparsebackup-cbt="$tmp/wa.cbt" sparsebackup-cbt-mode=$mode
ctl backup-begin g1 > /dev/null
"$copy" -q "$(frozen_uri @frozen)" "$tmp/g1.raw"
ctl backup-end g1 --ok > /dev/null
ctl backup-begin g2 --since g1 > /dev/null
rm -f "$tmp/stop"
"$nbd_python" "$tmp/storm.py" "$sock" 9 "$tmp/stop" > /dev/null 2>&1 &
storm=$!
nbdcopy "$(frozen_uri @frozen)" "$tmp/g2.raw" 2> /dev/null &
copier=$!
# Killed once copy before write has saved something (not after a fixed
# time: a loaded machine may not have started the storm by then).
wait_until 120 "old data saved in the scratch file before the kill" \
    eval '[ "$(stat -c %s "$scratch")" -gt 4096 ]'
kill -9 "$pid"
wait $storm $copier 2> /dev/null || true
server sparsebackup-cbt="$tmp/wa.cbt" sparsebackup-cbt-mode=$mode
assert_eq 4096 "$(stat -c %s "$scratch")" "scratch size after the restart (its header)"
ctl checkpoint-list > "$tmp/out"
assert_contains "$tmp/out" "^g1 good "
grep -q '^g2 ' "$tmp/out" && fail "the interrupted backup left its checkpoint"
cp "$tmp/disk.raw" "$tmp/t7.raw"
ctl backup-begin g3 --since g1 > /dev/null
"$copy" -q --delta "$(frozen_uri @frozen:since:g1)" "$tmp/g1.raw"
ctl backup-end g3 --ok > /dev/null
cmp "$tmp/g1.raw" "$tmp/t7.raw" ||
    fail "the incremental since g1 after the crash misses changes"
stop_nbdkit
done

# ---- 7. A trim over a hole costs no read ------------------------------
# Copy before write asks the plugin's extents for large runs: old data
# that reads as zero is noted, not read (the log filter below sees no
# Read) nor stored.
python3 "$_functions_dir/make-disk.py" "$tmp/hole.raw" $((64 << 20)) 0:100000
start_nbdkit --filter=sparsebackup --filter=log file "$tmp/hole.raw" \
    logfile="$tmp/hole.log" sparsebackup-cbt="$tmp/hole.cbt" \
    sparsebackup-control="$ctlsock" sparsebackup-scratch="$scratch" \
    sparsebackup-statsfile="$tmp/hole.stats"
nbdinfo --size "$uri" > /dev/null
cp "$tmp/hole.raw" "$tmp/t8.raw"
ctl backup-begin h1 > /dev/null
: > "$tmp/hole.log"
nbdsh -u "$uri" -c "h.trim(32 << 20, 16 << 20)" -c "h.zero(8 << 20, 50 << 20)"
grep -q ' Read ' "$tmp/hole.log" && { cat "$tmp/hole.log"; fail "copy before write read a hole"; }
grep -q ' Trim ' "$tmp/hole.log" || fail "the trim did not reach the plugin"
ctl status > "$tmp/out"
assert_contains "$tmp/out" "frozen=h1 scratch-used=0 "
nbdcopy "$(frozen_uri @frozen)" "$tmp/f8.raw"
cmp "$tmp/f8.raw" "$tmp/t8.raw" || fail "the frozen disk differs after the trim"
# And a write over data: its old data is read, stored, and read back.
nbdsh -u "$uri" -c "h.pwrite(b'\x33' * 65536, 0)"
nbdsh -u "$(frozen_uri @frozen)" -c "assert h.pread(65536, 0) == open('$tmp/t8.raw', 'rb').read(65536)" ||
    fail "@frozen did not return the saved old data"
ctl backup-end h1 --ok > /dev/null
stop_nbdkit
st () { sed -n "s/^$1: //p" "$tmp/hole.stats"; }
assert_eq 65536 "$(st frozen-saved-bytes)" "frozen-saved-bytes"
assert_eq 65536 "$(st frozen-cbw-read-bytes)" "frozen-cbw-read-bytes (the trim over the hole read nothing)"
assert_eq 65536 "$(st frozen-scratch-read-bytes)" "frozen-scratch-read-bytes"
[ "$(st frozen-zero-bytes)" -ge $((32 << 20)) ] ||
    fail "frozen-zero-bytes: $(st frozen-zero-bytes), expected >= 32M"

# ---- Parameters ------------------------------------------------------------
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$tmp/s")' needs sparsebackup-cbt=FILE and sparsebackup-control=SOCKET" \
    --filter=sparsebackup null 1M sparsebackup-scratch="$tmp/s"
refused sparsebackup-scratch=
assert_contains "$tmp/err" "sparsebackup-scratch: '' is not a file name"
refused sparsebackup-scratch-size=0
assert_contains "$tmp/err" "sparsebackup-scratch-size: '0': the scratch file needs room"
refused sparsebackup-scratch-size=lots
assert_contains "$tmp/err" "sparsebackup-scratch-size: 'lots' is not a valid size"
refused sparsebackup-scratch-error=ignore
assert_contains "$tmp/err" "sparsebackup-scratch-error: 'ignore' is not one of break-backup, fail-write"
mkdir "$tmp/dir"
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$tmp/dir")' is not a regular file" \
    --filter=sparsebackup null 1M sparsebackup-cbt="$tmp/n.cbt" \
    sparsebackup-control="$tmp/n.ctl" sparsebackup-scratch="$tmp/dir"
server
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$scratch")' is in use by another process" \
    --filter=sparsebackup null 1M sparsebackup-cbt="$tmp/n.cbt" \
    sparsebackup-control="$tmp/n.ctl" sparsebackup-scratch="$scratch"
# A view needs a backup; a frozen delta view needs a good older checkpoint.
for v in @frozen @frozen:since:c1 @frozen:since:nope; do
    rc=0; nbdinfo "$(frozen_uri "$v")" > /dev/null 2>&1 || rc=$?
    [ $rc -ne 0 ] || fail "$v served without a backup"
done
assert_contains "$server_log" "export '@frozen:since:nope': no backup in progress"
ctl backup-begin b3 > /dev/null
rc=0; nbdinfo "$(frozen_uri @frozen:since:nope)" > /dev/null 2>&1 || rc=$?
[ $rc -ne 0 ] || fail "@frozen:since:nope served"
assert_contains "$server_log" "export '@frozen:since:nope': no checkpoint 'nope'"
ctl backup-end b3 --failed > /dev/null
echo "test-cbt-frozen: ok"
