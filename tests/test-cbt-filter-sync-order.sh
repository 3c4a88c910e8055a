#!/usr/bin/env bash
# The order of the cbt file's writes and syncs, as strace sees them,
# in the three durability modes, over changes, checkpoints created, confirmed,
# failed and deleted (first and middle), and a clean exit.  A kill -9
# (test-cbt-filter-crash*.sh) keeps the page cache, so it cannot show a
# missing sync; a power failure would.  The rules (doc/cbt-format.md,
# Durability):
#  A. when a superblock slot (offset 0 or 4096) is written, every earlier
#     write to the rest of the file has been synced (a superblock never
#     names a state that is not durable);
#  B. a superblock write is synced before the same thread writes or
#     returns anything else to the cbt file;
#  C. write-ahead: a thread that wrote bitmap pages syncs them before it
#     writes or punches the disk (the commit's writer issues its own
#     change only after its commit);
#  D. write-ahead: every change that reached the disk came after at least
#     one sync of the cbt file.
#  E. process-safe: no thread that changes the disk ever syncs the cbt
#     file (no sync on the write path: the marks are plain writes, which
#     the page cache keeps after a kill -9), and the marks are written.
#     (A and B do not hold there on purpose: a power loss drops every
#     checkpoint of a process-safe file anyway, by its boot id.)
# Fails if a sync is missing or comes too late, or is on the write path
# in process-safe mode.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires strace -V
requires_filter sparsebackup
requires_plugin file
strace -f -qq -o /dev/null true 2>/dev/null || skip "strace cannot trace here"

# (LeakSanitizer cannot run under ptrace: sparsebackup-ctl of a
# --sanitizers build, traced too, must not try.)
cat > "$tmp/work.sh" <<EOF
set -e
uri=\$1 unixsocket=\$2
export ASAN_OPTIONS=detect_leaks=0
c () { "$ctl_bin" "$tmp/ctl.sock" "\$@" >/dev/null; }
ops () { "$nbd_python" "$tmp/cbt_ops.py" "\$unixsocket" "\$1" 30 "$tmp/ops" "" other; }
nbdinfo --size "\$uri" >/dev/null
ops 1
c backup-begin c1; c backup-end c1 --ok
ops 2
c backup-begin c2 --since c1; ops 3; c backup-end c2 --ok
c backup-begin c3 --since c2; ops 4; c backup-end c3 --failed
c backup-begin c4; c backup-end c4 --ok
ops 5
c checkpoint-delete c2
c checkpoint-delete c1
ops 6
EOF

cat > "$tmp/order.py" <<'PY'
import re, sys
trace, cbt, disk, mode = sys.argv[1:5]
line_re = re.compile(r'^(\d+) +(pwrite64|fdatasync|fsync|fallocate)\(\d+<([^>]*)>(.*)$')
# The offset, also of a call shown "<unfinished ...>" (its start).
off_re = re.compile(r', (\d+)(\) += -?\d+| <unfinished)')
unsynced = False            # a data write to the cbt file not synced yet
super_pending = {}          # tid -> a superblock write not synced yet
pages = {}                  # tid -> bitmap pages written, not synced
synced_once = False
n = {"super": 0, "commit": 0, "disk": 0, "marks": 0}
writers, syncers = set(), set()
safe = mode == "process-safe"
def fail(msg, l):
    sys.exit("rule %s\n  at: %s" % (msg, l.strip()))
for l in open(trace):
    m = line_re.match(l)
    if not m:
        continue
    tid, call, path, rest = m.groups()
    if path == cbt and safe:
        if call in ("fdatasync", "fsync"):
            syncers.add(tid)
        elif call == "pwrite64":
            n["marks"] += 1
    elif path == cbt:
        if tid in super_pending and call not in ("fdatasync", "fsync"):
            fail("B: a superblock write not synced before the next call", l)
        if call in ("fdatasync", "fsync"):
            unsynced = False
            super_pending.pop(tid, None)
            if pages.pop(tid, False):
                n["commit"] += 1
            synced_once = True
        elif call == "pwrite64":
            om = off_re.search(rest)
            off = int(om.group(1))
            if off in (0, 4096):
                if unsynced:
                    fail("A: a superblock written over unsynced data", l)
                super_pending[tid] = True
                n["super"] += 1
            else:
                unsynced = True
                pages[tid] = True
    elif path == disk and call in ("pwrite64", "fallocate"):
        n["disk"] += 1
        writers.add(tid)
        if mode == "write-ahead":
            if pages.get(tid):
                fail("C: the disk changed before the thread's bitmap pages were synced", l)
            if not synced_once:
                fail("D: the disk changed before any sync of the cbt file", l)
if safe:
    if writers & syncers:
        sys.exit("rule E: threads %s changed the disk and synced the cbt file"
                 % sorted(writers & syncers))
    if n["marks"] == 0 or n["disk"] == 0:
        sys.exit("rule E: no mark written (%(marks)d) or no disk change (%(disk)d)" % n)
    print("%(marks)d writes of the cbt file, %(disk)d disk changes, "
          "no sync by a writer" % n)
else:
    print("%(super)d superblock writes, %(commit)d syncs after data, %(disk)d disk changes" % n)
PY

for mode in in-use write-ahead process-safe; do
    truncate -s 0 "$tmp/disk.raw"; truncate -s 16M "$tmp/disk.raw"
    rm -f "$tmp/disk.cbt"
    strace -f -qq -y -e trace=pwrite64,fallocate,fdatasync,fsync \
           -o "$tmp/trace.$mode" \
        nbdkit -U - --filter=sparsebackup file "$tmp/disk.raw" \
            sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-cbt-mode=$mode \
            sparsebackup-control="$tmp/ctl.sock" \
            --run 'bash '"$tmp/work.sh"' "$uri" "$unixsocket"' ||
        fail "$mode: the workload under strace failed"
    echo -n "$mode: "
    python3 "$tmp/order.py" "$tmp/trace.$mode" "$tmp/disk.cbt" "$tmp/disk.raw" $mode ||
        fail "$mode: a write of the cbt file is not synced in time"
done
