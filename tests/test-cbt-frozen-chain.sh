#!/usr/bin/env bash
# A full point-in-time backup and three incrementals, end to end, on a
# disk whose last granule is partial, with a writer running during every
# backup.  Between backups: data writes, zero writes, trims, writes of
# partial granules and of the last (partial) block.  Each backup is
# taken twice: with qemu-img (qcow2 chain: inc1 over full, inc2 over
# inc1, ...: convert -B) and with sparsebackup-copy --delta (one raw
# copy brought up to date); each is restored through qemu-img and
# through the qcow2 plugin with nbdcopy, and compared with the disk as
# it was at its backup-begin.  Fails on any difference.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires qemu-img --version
requires nbdcopy --version
requires_filter sparsebackup
requires_plugin file
copy=$abs_top_builddir/tools/sparsebackup-copy
[ -x "$copy" ] || fail "$copy not built"
qcow2_plugin=$abs_top_builddir/plugins/qcow2/.libs/nbdkit-qcow2-plugin.so
[ -f "$qcow2_plugin" ] || fail "$qcow2_plugin not built"

size=$(( (20 << 20) + 3 * 512 ))      # the last 64K granule is partial
python3 "$_functions_dir/make-disk.py" "$tmp/disk.raw" "$size" \
    0:300000 $((5 << 20)):1000000 $((size - 2000)):2000
ctlsock=$tmp/ctl.sock
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
    sparsebackup-scratch="$tmp/scratch"
nbdinfo --size "$uri" > /dev/null     # opens the cbt file
frozen () { echo "nbd+unix:///$1?socket=$sock"; }

# Changes between backups: random ones, plus the edge cases.
changes ()   # changes SEED
{
    cbt_ops "$sock" "$1" 40 "$tmp/ops.$1" "" other
    nbdsh -u "$uri" \
        -c "h.pwrite(b'\x11' * 1000, $((3 << 20)) + 100)" \
        -c "h.zero(70000, $((7 << 20)) + 3000)" \
        -c "h.pwrite(bytes(65536), $((9 << 20)))" \
        -c "h.trim(200000, $((11 << 20)) + 512)" \
        -c "h.pwrite(b'\x22' * 700, $((size - 700)))" \
        -c "h.zero(512, $((size - 1536)))"
}

# A writer during the backup, over the first quarter of the disk (it
# stops when $tmp/stop exists).
writer ()
{
    rm -f "$tmp/stop"
    "$nbd_python" - "$sock" "$tmp/stop" "$1" <<'PY' &
import nbd, os, random, sys, time
h = nbd.NBD(); h.connect_unix(sys.argv[1]); size = h.get_size() // 4
r = random.Random(int(sys.argv[3])); n = 0
while not os.path.exists(sys.argv[2]) or n < 20:
    c = r.choice([512, 4096, 65536, 150000]); o = r.randrange(0, size - c)
    h.pwrite(bytes([r.randrange(1, 256)]) * c, o); n += 1
    time.sleep(0.002)
h.shutdown()
PY
    writer_pid=$!
}
end_writer () { touch "$tmp/stop"; wait "$writer_pid" || fail "the writer failed"; }

restore_check ()   # restore_check QCOW2 RAW-COPY TRUTH WHAT
{
    qemu-img convert -O raw "$1" "$tmp/r1.raw"
    truncate -s "$size" "$tmp/r1.raw"      # qcow2 sizes are 512-aligned
    cmp "$tmp/r1.raw" "$3" || fail "$4: the qemu-img restore differs"
    rm -f "$tmp/r2.raw"
    nbdkit -U - "$qcow2_plugin" file="$1" --run "nbdcopy \"\$uri\" $tmp/r2.raw"
    cmp "$tmp/r2.raw" "$3" || fail "$4: the restore through the qcow2 plugin differs"
    cmp "$2" "$3" || fail "$4: the raw copy (sparsebackup-copy --delta) differs"
}

# Full.
cp "$tmp/disk.raw" "$tmp/t0.raw"
ctl backup-begin b0 > /dev/null
writer 100
qemu-img convert -f raw -O qcow2 "$(frozen @frozen)" "$tmp/b0.qcow2"
"$copy" -q "$(frozen @frozen)" "$tmp/copy.raw"
end_writer
ctl backup-end b0 --ok > /dev/null
restore_check "$tmp/b0.qcow2" "$tmp/copy.raw" "$tmp/t0.raw" "full backup"
prev=b0
for n in 1 2 3; do
    changes "$n"
    cp "$tmp/disk.raw" "$tmp/t$n.raw"    # nothing writes: the truth
    ctl backup-begin "b$n" --since "$prev" > /dev/null
    writer $((100 + n))
    qemu-img convert -f raw -O qcow2 -B "$tmp/$prev.qcow2" -F qcow2 \
        "$(frozen "@frozen:since:$prev")" "$tmp/b$n.qcow2"
    "$copy" -q --delta "$(frozen "@frozen:since:$prev")" "$tmp/copy.raw"
    view_data "$sock" "@frozen:since:$prev" "$tmp/view.$n"
    end_writer
    ctl backup-end "b$n" --ok > /dev/null
    covers 65536 "$tmp/ops.$n" "$tmp/view.$n"
    delta=$(awk '{n += $2} END {print n + 0}' "$tmp/view.$n")
    [ "$delta" -lt "$size" ] || fail "incremental $n: the delta is the whole disk"
    restore_check "$tmp/b$n.qcow2" "$tmp/copy.raw" "$tmp/t$n.raw" "incremental $n"
    inc=$(qemu-img info --output=json "$tmp/b$n.qcow2" |
          "$nbd_python" -c 'import json, sys; print(json.load(sys.stdin)["actual-size"])')
    echo "incremental $n: $inc bytes allocated in b$n.qcow2," \
         "$delta bytes in the delta of $size"
    prev=b$n
done
ctl checkpoint-list
echo "test-cbt-frozen-chain: ok"
