#!/usr/bin/env bash
# nbdkit killed (SIGKILL) while the checkpoints change or a backup runs,
# with a storm of writes going on, in both durability modes:
#  1. during backup-begin (killed 0, 1, 5 and 20 ms after the command is
#     sent, and on a 64G disk with 512 byte granules, whose records take
#     long enough to rewrite that the kill lands inside the rewrite);
#  2. during checkpoint-delete of a middle checkpoint (a merge), on the
#     small and on the large disk;
#  3. during a backup: sparsebackup-copy --delta copying @since:c2 after
#     backup-begin c4 --since c2; and during its backup-end c4 --ok;
#  0. and while the first connection creates the cbt file (of a large
#     disk): it must load afterwards, with no checkpoint.
# Then nbdkit is started again on the same cbt file, which must load.
#  in-use:      every checkpoint is lost, backup-begin --since is refused
#               with the "full backup is needed" message, and a full
#               backup works.
#  write-ahead: the checkpoint pending at the kill is gone (nothing can
#               build on it), the good ones are all there and good, and
#               for each, map --since X and the view @since:X hold every
#               granule touched by a change that the log filter (below
#               the filter) saw after X was created; every HOLE-only
#               extent of @since:X holds the bytes the disk had when X
#               was created.  A checkpoint being deleted (or confirmed)
#               at the kill may survive or not, but nothing since any
#               checkpoint is lost.
# Where each kill landed (before the rewrite of the records, inside it,
# after the new state was published) is read from the file and printed.
# Fails if the file is refused after a kill, if a crash is not detected
# (in-use), if a pending checkpoint survives or a good one is lost, or if
# a change that reached the plugin is missing (write-ahead).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires qemu-img --version
requires_filter sparsebackup
requires_filter log
requires_plugin file
copy=$abs_top_builddir/tools/sparsebackup-copy
[ -x "$copy" ] || fail "$copy not built"

cat > "$tmp/crash.py" <<'PY'
import bisect, hashlib, nbd, os, random, re, shutil, signal, socket
import struct, sys, time, zlib
from nbdlib import connect, extents

def ctl(path, line):
    """One request on the control socket: (data lines, status line)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    f = s.makefile("rwb", buffering=0)
    hello = f.readline()
    assert hello.startswith(b"HELLO "), hello
    f.write(line.encode() + b"\n")
    data = []
    while True:
        l = f.readline().decode().rstrip("\n")
        if not l.startswith("* "):
            s.close()
            return data, l
        data.append(l[2:])

def lines(log):
    with open(log, "rb") as f:
        return f.read().count(b"\n")

# The disk in eighths: the changes before c1 go to the first, those
# between c1 and c2 to the second, and so on; the storm writes the last
# three.  So a record lost or merged into the wrong checkpoint cannot
# hide behind the storm.
def region(size, k):
    return size * k // 8, size * (k + 1) // 8

def changes(hs, rng, n, k):
    lo, hi = region(hs[0].get_size(), k)
    for i in range(n):
        h = hs[i % len(hs)]
        count = rng.choice([512, 4096, 65536, 100000])
        off = rng.randrange(lo, hi - count)
        kind = rng.random()
        if kind < 0.7:
            h.pwrite(bytes([rng.randrange(1, 256)]) * count, off)
        elif kind < 0.85:
            h.zero(count, off)
        else:
            h.trim(count, off)

def setup(sock, ctlsock, log, ncp, seed, disk, snap):
    """Checkpoints c1..cNCP (good) with changes before, between and
    after them.  Prints "cK LINE SECONDS": the log's line count right
    after backup-begin cK returned, and how long it took.  With SNAP,
    the disk as it was when cK was created is copied to SNAP.cK.
    """
    rng = random.Random(seed)
    hs = []
    for name in ("", "other"):
        h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock)
        hs.append(h)
    changes(hs, rng, 20, 0)
    for k in range(1, ncp + 1):
        cmd = "backup-begin c%d" % k + (" --since c%d" % (k - 1) if k > 1 else "")
        t = time.monotonic()
        _, st = ctl(ctlsock, cmd)
        dt = time.monotonic() - t
        assert st.startswith("OK checkpoint=c%d state=pending" % k), st
        print("c%d %d %.4f" % (k, lines(log), dt))
        if snap:
            shutil.copyfile(disk, "%s.c%d" % (snap, k))
        _, st = ctl(ctlsock, "backup-end c%d --ok" % k)
        assert st == "OK checkpoint=c%d state=good" % k, st
        changes(hs, rng, 20, k)
    for h in hs:
        h.shutdown()

def storm(sock, seed):
    """Writes, zeros and trims (8 in flight on each of two connections)
    until the server dies, sweeping the last three eighths of the disk
    4 KiB further at each request: what it changes after a checkpoint
    change is mostly not what it changed before (which would hide a
    record lost by the change)."""
    rng = random.Random(seed)
    hs = []
    for name in ("", "other"):
        h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock)
        hs.append(h)
    size = hs[0].get_size(); i = 0
    lo = region(size, 5)[0]
    try:
        while True:
            h = hs[i % 2]; i += 1
            n = rng.choice([512, 4096, 65536, 200000])
            off = lo + (i * 4096 + rng.randrange(0, 4096)) % (size - lo - n)
            r = rng.random()
            if r < 0.8:
                buf = nbd.Buffer.from_bytearray(bytearray([i % 255 + 1]) * n)
                h.aio_pwrite(buf, off)
            elif r < 0.9:
                h.aio_zero(n, off)
            else:
                h.aio_trim(n, off)
            while h.aio_in_flight() > 8:
                h.poll(-1)
    except nbd.Error:
        pass

def wait_log(log, n, timeout):
    """Wait until the log has N more lines (the storm is running); fail
    if it has not within TIMEOUT seconds."""
    start = lines(log); end = time.monotonic() + timeout
    while lines(log) < start + n:
        if time.monotonic() > end:
            sys.exit("the log %s did not get %d more lines within %g s "
                     "(the storm is not running?)" % (log, n, timeout))
        time.sleep(0.01)

def kill(ctlsock, pid, delay_ms, line):
    """Send LINE, SIGKILL PID DELAY_MS later; print the reply, if any."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(ctlsock)
    f = s.makefile("rwb", buffering=0)
    f.readline()
    s.sendall(line.encode() + b"\n")
    if delay_ms > 0:
        time.sleep(delay_ms / 1000)
    os.kill(pid, signal.SIGKILL)
    s.settimeout(5)
    try:
        reply = f.readline().decode().strip()
    except OSError:
        reply = ""
    print(reply or "no reply")

def kill_when(path, pid, minsize, uri):
    """Open the export (which creates the cbt file PATH) and SIGKILL PID
    as soon as PATH exists with more than MINSIZE bytes."""
    import subprocess
    p = subprocess.Popen(["nbdinfo", "--size", uri], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    end = time.monotonic() + 120
    while True:
        try:
            if os.stat(path).st_size > minsize:
                break
        except FileNotFoundError:
            pass
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            p.wait()
            sys.exit("%s did not get more than %d bytes within 120 s"
                     % (path, minsize))
        time.sleep(0.0002)
    os.kill(pid, signal.SIGKILL)
    p.wait()

def inspect(path):
    """The active superblock's sequence and checkpoints, and a hash of
    the bytes of the file outside the slots and the active state."""
    f = bytearray(open(path, "rb").read())
    best = None
    for i in (0, 1):
        sb = bytes(f[i * 4096:(i + 1) * 4096])
        if len(sb) == 4096 and sb[:8] == b"SBKCBT\r\n" and \
           struct.unpack_from("<I", sb, 4092)[0] == zlib.crc32(sb[:4092]):
            seq = struct.unpack_from("<Q", sb, 16)[0]
            if best is None or seq > best[0]:
                best = (seq, sb)
    if best is None:
        print("none - -"); return
    seq, sb = best
    disk, bits, nr = struct.unpack_from("<QII", sb, 48)
    toff, tsize = struct.unpack_from("<QI", sb, 64)
    cur = struct.unpack_from("<Q", sb, 80)[0]
    bm = (((disk + (1 << bits) - 1) >> bits) + 7) // 8
    bm = (bm + 4095) // 4096 * 4096
    regions = [(0, 8192), (cur, bm), (toff, tsize)]
    names = []
    for i in range(nr):
        e = f[toff + i * 128:toff + (i + 1) * 128]
        state = struct.unpack_from("<I", e, 64)[0]
        names.append("%s:%s" % (bytes(e[:64]).rstrip(b"\0").decode(),
                                {1: "good", 2: "pending"}.get(state, "?")))
        off = struct.unpack_from("<Q", e, 72)[0]
        if off:
            regions.append((off, bm))
    for off, n in regions:
        f[off:off + n] = bytes(min(n, max(0, len(f) - off)))
    print(seq, ",".join(names) or "-", hashlib.sha1(f).hexdigest())

LOGRE = re.compile(rb" (Write|Zero|Trim) id=[0-9]+ offset=(0x[0-9a-f]+) "
                   rb"count=(0x[0-9a-f]+) ")

def logged(log, skip):
    """The ranges of the Write, Zero and Trim requests (the lines before
    the call, so also those that had not completed) that the log filter
    saw after its first SKIP lines."""
    out = []
    with open(log, "rb") as f:
        for i, l in enumerate(f):
            m = LOGRE.search(l) if i >= skip else None
            if m:
                out.append((int(m[2], 16), int(m[3], 16)))
    return out

def missing(truth, have, gran, size):
    """The ranges of TRUTH whose granules are not all inside HAVE."""
    ends = []
    for o, n in sorted(have):
        if ends and o <= ends[-1][1]:
            ends[-1][1] = max(ends[-1][1], o + n)
        else:
            ends.append([o, o + n])
    starts = [a for a, b in ends]
    bad = []
    for o, n in truth:
        if n == 0:
            continue
        a = o // gran * gran
        b = min(size, (o + n + gran - 1) // gran * gran)
        i = bisect.bisect_right(starts, a) - 1
        if i < 0 or ends[i][1] < b:
            bad.append((o, n))
    return bad

def view(sock, export):
    """The ranges of EXPORT that are not HOLE-only."""
    h = connect(sock, export)
    out = [(o, n) for o, n, t in extents(h) if t != nbd.STATE_HOLE]
    h.shutdown()
    return out

def verify(sock, ctlsock, gran, log, marks, views, names):
    """For each checkpoint of NAMES: every change the log filter saw
    after it was created (its line in MARKS) is in map --since it and,
    with VIEWS, in the view @since:it."""
    skip = {}
    for l in open(marks):
        k, line, _ = l.split()
        skip[k] = int(line)
    h = nbd.NBD(); h.connect_unix(sock); size = h.get_size(); h.shutdown()
    for k in names:
        truth = logged(log, skip[k])
        data, st = ctl(ctlsock, "map --since " + k)
        if not st.startswith("OK since=%s " % k):
            sys.exit("map --since %s: %s" % (k, st))
        have = [tuple(map(int, d.split())) for d in data]
        sets = [("map --since " + k, have)]
        if views:
            sets.append(("@since:" + k, view(sock, "@since:" + k)))
        for what, have in sets:
            bad = missing(truth, have, gran, size)
            if bad:
                sys.exit("%s: %d of the %d changes seen after %s was created "
                         "are missing, e.g. %s" % (what, len(bad), len(truth),
                                                   k, bad[:5]))
        print("%s: %d changes after it, %d bytes changed" %
              (k, len(truth), sum(n for o, n in have)))

cmd = sys.argv[1]; a = sys.argv[2:]
if cmd == "setup":
    setup(a[0], a[1], a[2], int(a[3]), int(a[4]), a[5], a[6] if len(a) > 6 else "")
elif cmd == "storm":
    storm(a[0], int(a[1]))
elif cmd == "wait-log":
    wait_log(a[0], int(a[1]), float(a[2]))
elif cmd == "kill":
    kill(a[0], int(a[1]), float(a[2]), " ".join(a[3:]))
elif cmd == "kill-when":
    kill_when(a[0], int(a[1]), int(a[2]), a[3])
elif cmd == "verify":
    verify(a[0], a[1], int(a[2]), a[3], a[4], a[5] == "views", a[6:])
elif cmd == "inspect":
    inspect(a[0])
PY
crash () { "$nbd_python" "$tmp/crash.py" "$@"; }

ctlsock=$tmp/ctl.sock
disk=$tmp/disk.raw
cbt=$tmp/disk.cbt
log=$tmp/ops.log
inside=0 large_runs=0

# crash_case MODE KIND DELAY_MS SIZE GRAN SEED
#   KIND: begin (backup-begin c4, killed DELAY_MS after it was sent),
#   begin-since (backup-begin c4 --since c2), merge (checkpoint-delete c2
#   of c1..c4), backup (copying @since:c2 after backup-begin c4 --since
#   c2, killed DELAY_MS after the copy started).
crash_case ()
{
    local mode=$1 kind=$2 delay=$3 size=$4 gran=$5 seed=$6
    local what ncp=3 snap=$tmp/snap
    local k line secs cmd before after reply st w cp_pid=
    [ $kind = merge ] && ncp=4
    [ "$size" = 32M ] || snap=

    local t0; t0=$(date +%s.%N)
    truncate -s 0 "$disk"; truncate -s "$size" "$disk"
    rm -f "$cbt" "$log" "$tmp"/snap.*
    start_nbdkit --filter=sparsebackup --filter=log file "$disk" \
        logfile="$log" sparsebackup-cbt="$cbt" \
        sparsebackup-cbt-granularity="$gran" sparsebackup-cbt-mode="$mode" \
        sparsebackup-control="$ctlsock"
    crash setup "$sock" "$ctlsock" "$log" $ncp "$seed" "$disk" $snap \
        > "$tmp/marks"
    secs=$(awk 'END {print $3}' "$tmp/marks")
    if [ "$delay" = large ]; then
        delay=$(awk -v s="$secs" 'BEGIN {printf "%.1f", s * 1000 * 0.7}')
    fi
    what="$mode $kind ${delay}ms $size/$gran"

    case $kind in
        begin) cmd="backup-begin c4" ;;
        begin-since) cmd="backup-begin c4 --since c2" ;;
        merge) cmd="checkpoint-delete c2" ;;
        end|backup)
            ctl backup-begin c4 --since c2 > "$tmp/out"
            assert_eq "OK checkpoint=c4 state=pending since=c2" "$(cat "$tmp/out")"
            echo "c4 $(wc -l < "$log") 0" >> "$tmp/marks"
            [ -z "$snap" ] || cp "$disk" "$snap.c4"
            cmd="backup-end c4 --ok"
            ;;
    esac
    before=$(crash inspect "$cbt")
    crash storm "$sock" "$seed" &
    w=$!
    crash wait-log "$log" 50 120 || fail "$what: the storm did not start"
    if [ $kind = backup ]; then
        rm -f "$tmp/copy.raw"; cp "$tmp/snap.c2" "$tmp/copy.raw"
        ( while "$copy" -q --delta "nbd+unix:///@since:c2?socket=$sock" \
                    "$tmp/copy.raw" 2>/dev/null; do :; done ) &
        cp_pid=$!
        crash wait-log "$log" 50 120 || fail "$what: the storm stopped"
        sleep "$(printf '0.%03d' "$delay")"
        kill -9 "$pid"
        reply="(killed during the copy)"
    else
        reply=$(crash kill "$ctlsock" "$pid" "$delay" $cmd)
    fi
    wait $w || true
    [ -z "$cp_pid" ] || wait $cp_pid || true
    _wait_pid "$pid"
    after=$(crash inspect "$cbt")
    if [ "${before%% *}" != "${after%% *}" ]; then
        where="after the new state was published"
    elif [ "${before##* }" != "${after##* }" ]; then
        where="inside the rewrite (written, not published)"
    else
        where="before the rewrite"
    fi
    [ $kind = backup ] && where="during the copy"
    echo "$what: previous backup-begin took ${secs}s; killed $where; reply: $reply; file: ${after% *}"
    if [ -z "$snap" ]; then
        large_runs=$((large_runs + 1))
        case $where in inside*) inside=$((inside + 1)) ;; esac
    fi

    [ "$(tail -n +"$(awk 'END {print $2 + 1}' "$tmp/marks")" "$log" |
         grep -c -E ' (Write|Zero|Trim) id=')" -gt 0 ] ||
        fail "$what: no change reached the plugin after the last checkpoint"

    # The same file again, without the log filter.
    start_nbdkit --filter=sparsebackup file "$disk" sparsebackup-cbt="$cbt" \
        sparsebackup-cbt-mode="$mode" sparsebackup-control="$ctlsock"
    nbdinfo --size "$uri" >/dev/null 2>&1 ||
        { cat "$server_log" >&2; fail "$what: the cbt file is refused after the kill"; }
    ctl status > "$tmp/out"
    assert_contains "$tmp/out" " pending=- .* state=ok$"

    if [ $mode = in-use ]; then
        assert_contains "$server_log" "disk.cbt: .*not closed cleanly .*in use.* the next backup must be full"
        ctl checkpoint-list > "$tmp/out"
        assert_eq "OK checkpoints=0" "$(cat "$tmp/out")" "$what: checkpoints left"
        st=0
        ctl backup-begin n1 --since c1 >"$tmp/out" 2>"$tmp/err" || st=$?
        assert_eq 1 "$st" "$what: backup-begin --since after the crash"
        assert_contains "$tmp/err" "^ERR no-such-checkpoint no checkpoint 'c1': every checkpoint was lost when the cbt file .*disk.cbt was opened \\(cbt: the file was not closed cleanly \\(still marked in use\\): all [0-9]* checkpoints are invalid, the next backup must be full\\): a full backup is needed \\(backup-begin NEW without --since\\)$"
        ctl backup-begin n1 >/dev/null
        if [ -n "$snap" ]; then
            qemu-img convert -f raw -O qcow2 "$uri" "$tmp/full.qcow2"
            qemu-img compare -q -f qcow2 -F raw "$tmp/full.qcow2" "$disk" ||
                fail "$what: the full backup after the crash differs"
        fi
        ctl backup-end n1 --ok >/dev/null
    else
        ctl checkpoint-list | grep -v '^OK' | cut -d' ' -f1,2 | tr '\n' ' ' > "$tmp/out"
        case $kind in
            merge|end)
                case $kind:$(cat "$tmp/out") in
                    "merge:c1 good c2 good c3 good c4 good "|"merge:c1 good c3 good c4 good ") ;;
                    "end:c1 good c2 good c3 good c4 good "|"end:c1 good c2 good c3 good ") ;;
                    *) fail "$what: checkpoints after the kill: $(cat "$tmp/out")" ;;
                esac ;;
            *)
                assert_eq "c1 good c2 good c3 good " "$(cat "$tmp/out")" \
                    "$what: checkpoints after the kill"
                st=0
                ctl backup-begin n1 --since c4 >/dev/null 2>"$tmp/err" || st=$?
                assert_eq 1 "$st" "$what: backup-begin --since the pending checkpoint"
                assert_eq "ERR no-such-checkpoint no checkpoint 'c4' (checkpoint-list shows them)" "$(cat "$tmp/err")"
                st=0
                nbdinfo --size "nbd+unix:///@since:c4?socket=$sock" >/dev/null 2>&1 || st=$?
                [ $st != 0 ] || fail "$what: @since:c4 accepted after the kill"
                ;;
        esac
        # Nothing lost since any checkpoint left: what the log filter saw
        # (map --since X; and the view @since:X on the small disk, whose
        # HOLE-only extents must also hold the bytes of the disk when X
        # was created).
        names=$(ctl checkpoint-list | grep -v '^OK' | cut -d' ' -f1)
        crash verify "$sock" "$ctlsock" "$gran" "$log" "$tmp/marks" \
            "${snap:+views}${snap:-map}" $names > "$tmp/out" ||
            fail "$what: changes lost after the kill"
        sed 's/^/  /' "$tmp/out"
        if [ -n "$snap" ]; then
            view_holes "$sock" $(for k in $names; do echo "@since:$k $snap.$k"; done) > /dev/null
        fi
        # Backups go on from the surviving checkpoints.
        ctl backup-begin n1 --since c3 >/dev/null
        ctl backup-end n1 --ok >/dev/null
    fi
    if grep -E -q 'Sanitizer|runtime error|Assertion' "$server_log"; then
        cat "$server_log" >&2; fail "$what: crash report after the restart"
    fi
    stop_nbdkit
    echo "  checked in $(awk -v a="$t0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')s"
}

# create_case MODE MINSIZE: killed while the first connection creates
# the cbt file of a 64G disk at 512 byte granules (a 16 MiB bitmap is
# written and synced before the first superblock), as soon as the file
# holds more than MINSIZE bytes.  The next start must load it: created
# afresh if no superblock was written, else as it was, with no
# checkpoint either way.
create_case ()
{
    local mode=$1 min=$2 what="$1 create >$2 bytes 64G/512" found g
    truncate -s 0 "$disk"; truncate -s 64G "$disk"
    rm -f "$cbt"
    start_nbdkit --filter=sparsebackup file "$disk" sparsebackup-cbt="$cbt" \
        sparsebackup-cbt-granularity=512 sparsebackup-cbt-mode="$mode" \
        sparsebackup-control="$ctlsock"
    crash kill-when "$cbt" "$pid" "$min" "$uri" ||
        fail "$what: the cbt file was not being created"
    _wait_pid "$pid"
    found=$(crash inspect "$cbt")
    # Started again without a granularity: the file's, or the default
    # for a file created afresh.
    case $found in
        none*) found="no superblock yet, $(stat -c %s "$cbt") bytes"; g=65536 ;;
        *) found="a superblock (the creation was complete)"; g=512 ;;
    esac
    echo "$what: killed; the file had $found"
    start_nbdkit --filter=sparsebackup file "$disk" sparsebackup-cbt="$cbt" \
        sparsebackup-cbt-mode="$mode" sparsebackup-control="$ctlsock"
    nbdinfo --size "$uri" >/dev/null 2>&1 ||
        { cat "$server_log" >&2; fail "$what: the cbt file is refused after the kill"; }
    ctl checkpoint-list > "$tmp/out"
    assert_eq "OK checkpoints=0" "$(cat "$tmp/out")" "$what: checkpoints"
    ctl backup-begin c1 >/dev/null
    ctl backup-end c1 --ok >/dev/null
    ctl status > "$tmp/out"
    assert_contains "$tmp/out" " granularity=$g checkpoints=1 pending=- latest=c1 state=ok$"
    stop_nbdkit
}

seed=1
for mode in in-use write-ahead process-safe; do
    create_case $mode 8192
    crash_case $mode begin 0 32M 65536 $seed
    crash_case $mode begin 1 32M 65536 $((seed + 1))
    crash_case $mode begin-since 5 32M 65536 $((seed + 2))
    crash_case $mode begin-since 20 32M 65536 $((seed + 3))
    crash_case $mode merge 0 32M 65536 $((seed + 4))
    crash_case $mode merge 50 32M 65536 $((seed + 5))
    crash_case $mode end 1 32M 65536 $((seed + 6))
    crash_case $mode backup 100 32M 65536 $((seed + 7))
    # A large disk with small granules: 16 MiB records, whose rewrite
    # (64 MiB for c4, 48 for the merge) takes tens of milliseconds;
    # killed at about its middle (0.7 times what creating c3, 48 MiB,
    # took in the set-up).  Where it lands is reported, never asserted.
    crash_case $mode begin-since large 64G 512 $((seed + 10))
    crash_case $mode merge large 64G 512 $((seed + 11))
    seed=$((seed + 20))
done
echo "the kill landed inside the rewrite of the records in $inside of $large_runs large cases"
