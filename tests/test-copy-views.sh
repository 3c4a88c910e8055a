#!/usr/bin/env bash
# sparsebackup-copy with the filter's backup views (the README's flow:
# sparsebackup-ctl backup-begin / backup-end, @frozen, @frozen:since:X),
# a raw backup kept up to date with --delta and a manifest:
#  1. a --delta of @frozen:since:c1 killed midway resumes (same command)
#     and equals @frozen of c2; its manifest verifies it;
#  2. the journal identifies the view by name and by the backup its
#     description names: after the backup of an interrupted --delta has
#     ended, the same command says the view is gone and what to do; once
#     a new backup since the same checkpoint has begun, the same URI is
#     another source (refused, naming backup c3); --delta --restart from
#     it makes the backup right;
#  3. a --delta of a live @since: view killed midway resumes.
# The cbt file is opened by the first connection (the backup-begin of
# this nbdkit needs one first: nbdinfo --size).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires_nbdsh
requires nbdcopy --version
requires nbdinfo --version
requires_filter sparsebackup
requires_plugin file

size=$((16 << 20))
python3 "$_functions_dir/make-disk.py" "$tmp/disk.raw" "$size" \
    0:300000 $((3 << 20)):700000 $((9 << 20)):123456 $((15 << 20)):65536
ctlsock=$tmp/ctl.sock
# --threads=1: nbdkit 1.32.5 aborts when a client dies with several reads
# in flight (README, known issues).
start_nbdkit --threads=1 --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
    sparsebackup-scratch="$tmp/scratch"
nbdinfo --size "$uri" > /dev/null          # opens the cbt file
view () { echo "nbd+unix:///$1?socket=$sock"; }
j=$tmp/backup.raw.sparsebackup-journal
field () { sed -n "s/^$1 //p" "$2"; }

# write SEED: change the disk through the live export.
write ()
{
    nbdsh -u "$uri" -c "
import random
r = random.Random($1)
for i in range(20):
    n = r.choice([4096, 65536, 200000])
    h.pwrite(bytes([r.randrange(1, 256)]) * n, r.randrange(0, $size - n))
"
}

# Full backup c1.
ctl backup-begin c1 > /dev/null
"$copy" -q --manifest="$tmp/backup.m" "$(view @frozen)" "$tmp/backup.raw"
nbdcopy "$(view @frozen)" "$tmp/ref1.raw"
ctl backup-end c1 --ok > /dev/null
cmp "$tmp/ref1.raw" "$tmp/backup.raw" || fail "the full backup differs"

# 1. Incremental c2, killed midway, resumed.
write 1
ctl backup-begin c2 --since c1 > /dev/null
nbdcopy "$(view @frozen)" "$tmp/ref2.raw"
write 2                                     # the live disk moves on
cmd=("$copy" --delta --manifest="$tmp/backup.m" --journal-every=64K
     --request-size=64K "$(view @frozen:since:c1)" "$tmp/backup.raw")
SPARSEBACKUP_COPY_DEBUG_KILL=write:3 "${cmd[@]}" > /dev/null 2>&1 &&
    fail "the delta was not killed"
assert_eq "@frozen:since:c1" "$(field source-export "$j")" "the journal's view"
assert_contains "$j" "^source-description the%20disk%20as%20it%20was%20at%20backup-begin%20c2,"
"${cmd[@]}" > "$tmp/out" 2> "$tmp/err" || { cat "$tmp/err"; fail "the resumed delta failed"; }
assert_contains "$tmp/err" "resuming the interrupted copy"
cmp "$tmp/ref2.raw" "$tmp/backup.raw" || fail "the resumed delta differs from @frozen"
"$copy" -q --verify="$tmp/backup.m" "$tmp/backup.raw" ||
    fail "the manifest does not verify the resumed delta"
ctl backup-end c2 --ok > /dev/null

# 2. Incremental c3, killed; the backup ends (failed): the view is gone.
write 3
ctl backup-begin c3 --since c2 > /dev/null
cmd=("$copy" --delta --manifest="$tmp/backup.m" --journal-every=64K
     --request-size=64K "$(view @frozen:since:c2)" "$tmp/backup.raw")
SPARSEBACKUP_COPY_DEBUG_KILL=write:3 "${cmd[@]}" > /dev/null 2>&1 &&
    fail "the delta was not killed"
ctl backup-end c3 --failed > /dev/null
r=0; "${cmd[@]}" > "$tmp/out" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status when the view is gone"
assert_contains "$tmp/err" "cannot connect to SRC '$(ere_quote "$(view @frozen:since:c2)")'"
assert_contains "$tmp/err" "holds an interrupted --delta copy from SRC .* \(export '@frozen:since:c2', 'the disk as it was at backup-begin c3, "
assert_contains "$tmp/err" "If its backup has ended \(the view is gone\), begin a new backup since c2 \(sparsebackup-ctl CONTROL-SOCKET backup-begin NEW --since c2\) and copy its view @frozen:since:c2 with --delta --restart"
# A new backup since c2: the same URI, another source.
write 4
ctl backup-begin c4 --since c2 > /dev/null
r=0; "${cmd[@]}" > "$tmp/out" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status over the interrupted c3 with the view of c4"
assert_contains "$tmp/err" "--delta from SRC .* \(export '@frozen:since:c2', 'the disk as it was at backup-begin c4, .*'\) refused"
assert_contains "$tmp/err" "holds an interrupted --delta copy from SRC .*backup-begin c3"
# As the message says: --restart from the new view.
nbdcopy "$(view @frozen)" "$tmp/ref4.raw"
"${cmd[@]:0:1}" --restart "${cmd[@]:1}" > /dev/null 2>&1
cmp "$tmp/ref4.raw" "$tmp/backup.raw" || fail "--restart over the interrupted c3 differs"
"$copy" -q --verify="$tmp/backup.m" "$tmp/backup.raw" ||
    fail "the manifest does not verify the restarted delta"
ctl backup-end c4 --ok > /dev/null
[ ! -e "$j" ] || fail "the journal was left"

# 3. A live @since: view (no writes meanwhile), killed, resumed.
write 5
ctl backup-begin c5 --since c4 > /dev/null
cp "$tmp/disk.raw" "$tmp/ref5.raw"
SPARSEBACKUP_COPY_DEBUG_KILL=write:2 "$copy" --delta --journal-every=64K \
    --request-size=64K "$(view @since:c4)" "$tmp/backup.raw" > /dev/null 2>&1 &&
    fail "the @since: delta was not killed"
assert_eq "@since:c4" "$(field source-export "$j")" "the journal's live view"
"$copy" -q --delta "$(view @since:c4)" "$tmp/backup.raw"
cmp "$tmp/ref5.raw" "$tmp/backup.raw" || fail "the resumed @since: delta differs"
ctl backup-end c5 --ok > /dev/null
