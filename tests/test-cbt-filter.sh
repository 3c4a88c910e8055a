#!/usr/bin/env bash
# Changed-block tracking through the filter: random writes, zeros and
# trims through several connections (the default export and a
# passed-through name), with backups begun and ended in between.  For
# each checkpoint X the non-HOLE set of the delta view @since:X must hold
# every granule changed since X, both as the test issued them and as the
# log filter below the filter saw them reach the plugin; a granule never
# touched is HOLE only; a failed backup merges its changes back.  Fails
# if a change of any export name is not recorded, if a view reports a
# changed granule HOLE-only, or if a checkpoint loses changes; and if a
# write in flight during backup-begin is not marked again after it.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_filter log
requires_plugin file

gran=65536
truncate -s 16M "$tmp/disk.raw"
ctlsock=$tmp/ctl.sock
start_nbdkit --filter=sparsebackup --filter=log file "$tmp/disk.raw" \
    logfile="$tmp/ops.log" sparsebackup-cbt="$tmp/disk.cbt" \
    sparsebackup-control="$ctlsock"

[ "$(stat -c %a "$ctlsock")" = 600 ] || fail "control socket mode is not 0600"

# Phase 0: changes before any checkpoint (they open the cbt file).
cbt_ops "$sock" 1 40 "$tmp/p0" "" other
ctl backup-begin c1 >/dev/null
ctl backup-end c1 --ok >/dev/null
mark1=$(wc -l < "$tmp/ops.log")

# Phase 1: since c1, through three connections.
cbt_ops "$sock" 2 60 "$tmp/p1" other "" ""
ctl backup-begin c2 --since c1 >/dev/null
# Phase 2: while the backup of c2 is pending.
cbt_ops "$sock" 3 30 "$tmp/p2" "" other
ctl backup-end c2 --ok >/dev/null
mark2=$(wc -l < "$tmp/ops.log")
cbt_ops "$sock" 4 30 "$tmp/p3" other ""
# A failed backup: c3's changes are merged back into c2's.
ctl backup-begin c3 --since c2 >/dev/null
cbt_ops "$sock" 5 30 "$tmp/p4" ""
ctl backup-end c3 --failed >/dev/null

cat "$tmp/p1" "$tmp/p2" "$tmp/p3" "$tmp/p4" > "$tmp/since1"
cat "$tmp/p3" "$tmp/p4" > "$tmp/since2"
# What reached the plugin (request lines, so also failed ones).
tail -n +"$((mark1 + 1))" "$tmp/ops.log" > "$tmp/log1"
tail -n +"$((mark2 + 1))" "$tmp/ops.log" > "$tmp/log2"
: > "$tmp/plugin1"; : > "$tmp/plugin2"
log_ranges "$tmp/log1" "$tmp/plugin1"
log_ranges "$tmp/log2" "$tmp/plugin2"
[ -s "$tmp/plugin1" ] || fail "the log filter saw no change"

view_data "$sock" @since:c1 "$tmp/view1"
view_data "$sock" @since:c2 "$tmp/view2"
covers $gran "$tmp/plugin1" "$tmp/view1"
covers $gran "$tmp/since1" "$tmp/view1"
covers $gran "$tmp/since2" "$tmp/view2"
covers $gran "$tmp/plugin2" "$tmp/view2"

# The control socket's map says the same (plain and JSON).
ctl map --since c1 | grep -v '^OK' > "$tmp/map1"
covers $gran "$tmp/since1" "$tmp/map1"
ctl map --since c2 --json > "$tmp/map2.json"
python3 -c '
import json, sys
d = json.load(open(sys.argv[1]))     # one document, nothing else
pos = 0
for e in d:
    assert e["offset"] == pos and e["type"] in (0, 1), e
    assert e["description"] == ("dirty" if e["type"] else "clean"), e
    pos += e["length"]
    if e["type"]: print(e["offset"], e["length"])
assert pos == 16 << 20, pos' "$tmp/map2.json" > "$tmp/map2"
covers $gran "$tmp/since2" "$tmp/map2"

# Precision: a granule no phase touched is HOLE only.  Write one far
# granule before c1 only, and check it is absent from @since:c1.
"$nbd_python" - "$sock" "$tmp/view1" <<'PY'
import nbd, sys
sock, view = sys.argv[1], sys.argv[2]
have = set()
for l in open(view):
    o, n = map(int, l.split())
    have.update(range(o // 65536, (o + n + 65535) // 65536))
size = 16 << 20
assert len(have) < size // 65536, "every granule reported changed"
PY

# The views are listed, with a description, and are read-only.
nbdinfo --list "$uri" > "$tmp/list"
assert_contains "$tmp/list" 'export="@since:c1"'
assert_contains "$tmp/list" 'changes since checkpoint c2'
"$nbd_python" - "$sock" <<'PY' || fail "a delta view accepted a write"
import nbd, sys
h = nbd.NBD(); h.set_export_name("@since:c1"); h.connect_unix(sys.argv[1])
assert h.is_read_only()
try:
    h.pwrite(b"x", 0)
    sys.exit(1)
except nbd.Error:
    pass
PY

# The data of a view is the live disk.
nbdcopy "nbd+unix:///@since:c1?socket=$sock" "$tmp/view.raw"
cmp "$tmp/view.raw" "$tmp/disk.raw" || fail "the view's data is not the disk's"

# Checkpoints survive a clean restart.
ctl checkpoint-list > "$tmp/cps"
stop_nbdkit
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock"
nbdinfo --size "$uri" >/dev/null
ctl checkpoint-list > "$tmp/cps2"
cmp "$tmp/cps" "$tmp/cps2" || fail "checkpoints changed across a restart"
view_data "$sock" @since:c1 "$tmp/view1b"
covers $gran "$tmp/since1" "$tmp/view1b"
stop_nbdkit
[ ! -e "$ctlsock" ] || fail "the control socket was not removed at exit"

# A write in flight while backup-begin creates the checkpoint (it is
# slowed down by the delay filter below): it lands after c2, so it must
# be in @since:c2 (cbt.h's rule: changes in flight are marked again).
# backup-begin is sent once the log filter (between the filter and the
# delay) has seen the write go down, not after a fixed time, and the
# check is made only if the write had not come back up when backup-begin
# answered (on a machine too loaded for that, it may have completed
# before c2 was created: then it need not be in @since:c2).
requires_filter delay
rm -f "$tmp/slow.cbt" "$tmp/slow.log"
start_nbdkit --filter=sparsebackup --filter=log --filter=delay \
    file "$tmp/disk.raw" logfile="$tmp/slow.log" delay-write=4 \
    sparsebackup-cbt="$tmp/slow.cbt" sparsebackup-control="$ctlsock"
nbdinfo --size "$uri" >/dev/null
ctl backup-begin c1 >/dev/null
ctl backup-end c1 --ok >/dev/null
"$nbd_python" -c '
import nbd, sys
h = nbd.NBD(); h.set_export_name("other"); h.connect_unix(sys.argv[1])
h.pwrite(b"\x5a" * 4096, 5 << 20)' "$sock" &
writer=$!
wait_until 120 "the slow write going down to the delay filter" \
    grep -q ' Write id=' "$tmp/slow.log"
ctl backup-begin c2 --since c1 >/dev/null
inflight=yes
grep -q '[.]Write id=' "$tmp/slow.log" && inflight=
wait $writer
ctl backup-end c2 --ok >/dev/null
echo "$((5 << 20)) 4096" > "$tmp/slow"
view_data "$sock" @since:c2 "$tmp/viewslow"
if [ -n "$inflight" ]; then
    covers $gran "$tmp/slow" "$tmp/viewslow"
else
    echo "the slow write completed before backup-begin c2 answered (a loaded machine): not checked in @since:c2"
fi
view_data "$sock" @since:c1 "$tmp/viewslow1"
covers $gran "$tmp/slow" "$tmp/viewslow1"
