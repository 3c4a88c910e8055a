#!/usr/bin/env bash
# Warm migration with the delta views: a first full copy and repeated
# passes of @since:PREVIOUS with sparsebackup-copy --delta into a raw
# target while a writer keeps changing the disk, then, once the writer
# has stopped, a last pass that leaves the target equal to the disk.
# Each pass deletes the checkpoint before the previous one (a chain of
# two is enough).  Every pass but the first must copy less than the
# disk.  Fails if the last pass does not give an exact copy.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_plugin file
copy=$abs_top_builddir/tools/sparsebackup-copy
[ -x "$copy" ] || fail "$copy not built"

size=$((48 << 20))
python3 "$_functions_dir/make-disk.py" "$tmp/disk.raw" "$size" \
    0:2000000 $((10 << 20)):5000000 $((40 << 20)):3000000
ctlsock=$tmp/ctl.sock
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock"
nbdinfo --size "$uri" > /dev/null

rm -f "$tmp/stop"
"$nbd_python" - "$sock" "$tmp/stop" <<'PY' &
import nbd, os, random, sys, time
h = nbd.NBD(); h.connect_unix(sys.argv[1]); size = h.get_size()
r = random.Random(3)
while not os.path.exists(sys.argv[2]):
    c = r.choice([512, 4096, 65536, 200000]); o = r.randrange(0, size - c)
    k = r.random()
    if k < 0.8:
        h.pwrite(bytes([r.randrange(1, 256)]) * c, o)
    elif k < 0.9:
        h.zero(c, o)
    else:
        h.trim(c, o)
    time.sleep(0.003)
h.shutdown()
PY
writer=$!

ctl backup-begin m0 > /dev/null
"$copy" -q "$uri" "$tmp/target.raw"
ctl backup-end m0 --ok > /dev/null
prev=m0
for n in 1 2 3 4; do
    if [ $n -eq 4 ]; then           # the last pass: the writer stopped
        # (once it has changed the disk since the last pass: a loaded
        # machine may have run the passes before it wrote anything)
        wait_until 120 "the writer changing the disk after pass 3" \
            eval '! cmp -s "$tmp/target.raw" "$tmp/disk.raw"'
        touch "$tmp/stop"
        wait $writer || fail "the writer failed"
        cmp -s "$tmp/target.raw" "$tmp/disk.raw" &&
            fail "the target is already equal: the test tests nothing"
    fi
    sleep 0.3
    ctl backup-begin "m$n" --since "$prev" > /dev/null
    view_data "$sock" "@since:$prev" "$tmp/view"
    bytes=$(awk '{n += $2} END {print n + 0}' "$tmp/view")
    "$copy" -q --delta "nbd+unix:///@since:$prev?socket=$sock" "$tmp/target.raw"
    ctl backup-end "m$n" --ok > /dev/null
    echo "pass $n: $bytes of $size bytes in the delta"
    [ "$bytes" -lt "$size" ] || fail "pass $n copied the whole disk"
    [ $n -lt 2 ] || ctl checkpoint-delete "m$((n - 2))" > /dev/null
    prev=m$n
done
cmp "$tmp/target.raw" "$tmp/disk.raw" ||
    fail "the target differs from the disk after the last pass"
ctl checkpoint-list
echo "test-cbt-warm-migration: ok"
