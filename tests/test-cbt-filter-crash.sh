#!/usr/bin/env bash
# nbdkit killed (SIGKILL) during a storm of writes.
#  in-use:       the file is found in use at the next start: every
#                checkpoint is lost, backup-begin --since is refused with
#                the "full backup" message, and a full backup works.
#  write-ahead:  every write that the log filter (below the filter) saw
#                on its way to the plugin is in the set after the restart.
#  process-safe: the same after a restart by the same boot (the marks
#                were written, unsynced, before each change: the page
#                cache keeps them); restarted as if the machine had
#                booted again (-D sparsebackup.pretend_reboot=1) every
#                checkpoint is dropped with the "another boot" message.
# Fails if a crash is not detected (in-use, another boot) or if a write
# reached the plugin before it was recorded (write-ahead, process-safe).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires qemu-img --version
requires_filter sparsebackup
requires_filter log
requires_plugin file

cat > "$tmp/storm.py" <<'PY'
import nbd, random, sys
rng = random.Random(int(sys.argv[2]))
hs = []
for name in ("", "other"):
    h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sys.argv[1]); hs.append(h)
size = hs[0].get_size(); i = 0
try:
    while True:
        h = hs[i % 2]; i += 1
        n = rng.choice([512, 4096, 65536, 200000]); off = rng.randrange(0, size - n)
        h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray([i % 255 + 1]) * n), off)
        while h.aio_in_flight() > 8:
            h.poll(-1)
except nbd.Error:
    pass
PY

# writes_after LINE: more than 100 Write lines in the log after its first
# LINE lines (the storm is running), or the storm has stopped.
writes_after ()
{
    [ "$(tail -n +"$(($1 + 1))" "$tmp/ops.log" | grep -c ' Write id=')" -gt 100 ] ||
        ! kill -0 "$2" 2>/dev/null
}

# storm SEED: writes until nbdkit dies, killed once more than 100 writes
# have reached the log filter (not after a fixed time: a loaded machine
# may not have started the storm by then), and 1 s more of them
storm ()
{
    "$nbd_python" "$tmp/storm.py" "$sock" "$1" &
    local w=$!
    wait_until 120 "the storm's writes reaching the plugin" \
        writes_after "$mark" "$w"
    kill -0 "$w" 2>/dev/null || fail "the storm stopped before the kill"
    sleep 1
    kill -9 "$pid"
    wait "$w" || true
    _wait_pid "$pid"
}

for run in in-use write-ahead process-safe process-safe-reboot; do
    mode=${run%-reboot}
    reboot=()
    [ "$run" = "$mode" ] || reboot=(-D sparsebackup.pretend_reboot=1)
    truncate -s 0 "$tmp/disk.raw"; truncate -s 32M "$tmp/disk.raw"
    rm -f "$tmp/disk.cbt" "$tmp/ops.log"
    ctlsock=$tmp/ctl.sock
    start_nbdkit --filter=sparsebackup --filter=log file "$tmp/disk.raw" \
        logfile="$tmp/ops.log" sparsebackup-cbt="$tmp/disk.cbt" \
        sparsebackup-cbt-mode=$mode sparsebackup-control="$ctlsock"
    nbdinfo --size "$uri" >/dev/null
    ctl backup-begin c1 >/dev/null
    ctl backup-end c1 --ok >/dev/null
    mark=$(wc -l < "$tmp/ops.log")
    storm 7
    tail -n +"$((mark + 1))" "$tmp/ops.log" > "$tmp/after"
    : > "$tmp/reached"
    log_ranges "$tmp/after" "$tmp/reached"
    echo "$run: $(wc -l < "$tmp/reached") writes reached the plugin before the kill"
    [ -s "$tmp/reached" ] || fail "$run: no write reached the plugin"

    start_nbdkit "${reboot[@]}" --filter=sparsebackup file "$tmp/disk.raw" \
        sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-cbt-mode=$mode \
        sparsebackup-control="$ctlsock"
    nbdinfo --size "$uri" >/dev/null
    if [ $mode = in-use ]; then
        assert_contains "$server_log" "disk.cbt: .*in use"
        st=0
        ctl backup-begin c2 --since c1 >"$tmp/out" 2>"$tmp/err" || st=$?
        assert_eq "$st" 1
        assert_eq "$(cat "$tmp/err")" "ERR no-such-checkpoint no checkpoint 'c1': every checkpoint was lost when the cbt file $tmp/disk.cbt was opened (cbt: the file was not closed cleanly (still marked in use): all 1 checkpoints are invalid, the next backup must be full): a full backup is needed (backup-begin NEW without --since)"
        st=0
        nbdinfo "nbd+unix:///@since:c1?socket=$sock" >/dev/null 2>&1 || st=$?
        [ $st != 0 ] || fail "@since:c1 accepted after the crash"
        assert_contains "$server_log" "export '@since:c1': no checkpoint 'c1': every checkpoint was lost when the cbt file .*disk.cbt was opened \\(cbt: the file was not closed cleanly"
        ctl backup-begin c2 >/dev/null
        qemu-img convert -f raw -O qcow2 "$uri" "$tmp/full.qcow2"
        ctl backup-end c2 --ok >/dev/null
        qemu-img compare -q -f qcow2 -F raw "$tmp/full.qcow2" "$tmp/disk.raw" ||
            fail "the full backup after the crash differs"
    elif [ "$run" = process-safe-reboot ]; then
        assert_contains "$server_log" "disk.cbt: cbt: left in use in process-safe mode by another boot .*: the machine stopped while it was open, changes may be missing: all 1 checkpoints are invalid, the next backup must be full"
        st=0
        ctl backup-begin c2 --since c1 >"$tmp/out" 2>"$tmp/err" || st=$?
        assert_eq "$st" 1
        assert_contains "$tmp/err" "^ERR no-such-checkpoint no checkpoint 'c1': every checkpoint was lost when the cbt file .* was opened \\(cbt: left in use in process-safe mode by another boot"
    else
        ctl checkpoint-list > "$tmp/list"
        assert_contains "$tmp/list" "^c1 good "
        ctl map --since c1 | grep -v '^OK' > "$tmp/map"
        covers 65536 "$tmp/reached" "$tmp/map"
        view_data "$sock" @since:c1 "$tmp/view"
        covers 65536 "$tmp/reached" "$tmp/view"
    fi
    stop_nbdkit
done
