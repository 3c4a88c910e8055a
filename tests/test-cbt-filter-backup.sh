#!/usr/bin/env bash
# Incremental backups end to end: a full backup with qemu-img after
# backup-begin c1, random changes, an incremental one of @since:c1 into
# a qcow2 over the full one (qemu-img convert -B), restored and compared
# with the disk; the same with sparsebackup-copy --delta over a raw copy
# of the full backup.  Every HOLE-only extent of a delta view must read
# as the previous backup and every ZERO extent as zeros (for @since:c1
# and, after more changes, @since:c2).  Fails if a changed granule is
# missing from the delta view (the restore differs) or the view reports
# it HOLE-only.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires qemu-img --version
requires_filter sparsebackup
requires_plugin file
copy=$abs_top_builddir/tools/sparsebackup-copy
[ -x "$copy" ] || fail "$copy not built"

truncate -s 24M "$tmp/disk.raw"
ctlsock=$tmp/ctl.sock
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-cbt-granularity=128K \
    sparsebackup-control="$ctlsock"
cbt_ops "$sock" 11 60 "$tmp/p0" "" other

ctl backup-begin c1 > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c1 state=pending since=-"
qemu-img convert -f raw -O qcow2 "$uri" "$tmp/full.qcow2"
qemu-img convert -f qcow2 -O raw "$tmp/full.qcow2" "$tmp/full.raw"
ctl backup-end c1 --ok > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c1 state=good"
cmp "$tmp/full.raw" "$tmp/disk.raw" || fail "the full backup differs"

cbt_ops "$sock" 12 80 "$tmp/p1" other "" ""

ctl backup-begin c2 --since c1 > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c2 state=pending since=c1"
qemu-img convert -f raw -O qcow2 -B "$tmp/full.qcow2" -F qcow2 \
    "nbd+unix:///@since:c1?socket=$sock" "$tmp/inc.qcow2"
cp "$tmp/full.raw" "$tmp/restored-copy.raw"
"$copy" -q --delta "nbd+unix:///@since:c1?socket=$sock" "$tmp/restored-copy.raw"
ctl backup-end c2 --ok >/dev/null

qemu-img convert -O raw "$tmp/inc.qcow2" "$tmp/restored.raw"
cmp "$tmp/restored.raw" "$tmp/disk.raw" || fail "the restored qcow2 chain differs"
cmp "$tmp/restored-copy.raw" "$tmp/disk.raw" ||
    fail "the raw copy restored with sparsebackup-copy --delta differs"

# The view skipped what did not change: less than the whole disk is
# reported as part of the backup, and all of the changes are.
view_data "$sock" @since:c1 "$tmp/view"
covers 131072 "$tmp/p1" "$tmp/view"
bytes=$(awk '{n += $2} END {print n + 0}' "$tmp/view")
echo "the incremental backup covers $bytes of $((24 << 20)) bytes"
[ "$bytes" -lt $((24 << 20)) ] || fail "the delta view reports the whole disk"

# What the view reports HOLE-only is what the previous backup holds:
# every HOLE-only extent of @since:c1 reads as the full backup, every
# ZERO extent as zeros.
view_holes "$sock" @since:c1 "$tmp/full.raw" > "$tmp/holes"
read -r hole zero < "$tmp/holes"
echo "@since:c1: $hole bytes HOLE-only (equal to the full backup), $zero bytes ZERO"
[ "$hole" -gt 0 ] || fail "@since:c1 has no HOLE-only extent to check"

# The next incremental, over the restored one: the same checks for
# @since:c2 against the backup of c2.
cbt_ops "$sock" 13 40 "$tmp/p2" "" other
ctl backup-begin c3 --since c2 > "$tmp/out"
assert_eq "$(cat "$tmp/out")" "OK checkpoint=c3 state=pending since=c2"
view_holes "$sock" @since:c2 "$tmp/restored.raw" > "$tmp/holes"
read -r hole zero < "$tmp/holes"
echo "@since:c2: $hole bytes HOLE-only (equal to the backup of c2), $zero bytes ZERO"
[ "$hole" -gt 0 ] || fail "@since:c2 has no HOLE-only extent to check"
"$copy" -q --delta "nbd+unix:///@since:c2?socket=$sock" "$tmp/restored-copy.raw"
ctl backup-end c3 --ok >/dev/null
cmp "$tmp/restored-copy.raw" "$tmp/disk.raw" ||
    fail "the raw copy brought up to date from @since:c2 differs"
