#!/usr/bin/env bash
# The changed-block tracking counters in the statistics file
# (sparsebackup-statsfile=FILE with sparsebackup-cbt=): cbt-marks,
# cbt-commits, cbt-syncs and cbt-pages-written, after a known sequence
# of writes, one at a time, in both durability modes.  Write-ahead mode
# syncs once per write of a granule not yet recorded and never for one
# already on disk; in-use mode never syncs for a write.  Without
# sparsebackup-cbt the lines are absent; with it and no connection they
# are 0.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_plugin file

gran=65536
truncate -s 8M "$tmp/disk.raw"

# writes URI FIRST N: N writes of one 4K block of non-zero data, one at a
# time, each in its own granule (FIRST, FIRST+1, ...; all in one 4K page
# of the record).
writes ()
{
    nbdsh -u "$1" -c "
for i in range($2, $2 + $3):
    h.pwrite(bytes([i % 255 + 1]) * 4096, i * $gran)
h.flush()
"
}

# value FILE KEY: the decimal value of KEY, which must appear once.
value ()
{
    local n v
    n=$(grep -c -E "^$2: " "$1" || true)
    [ "$n" = 1 ] || { cat "$1" >&2; fail "key $2 appears $n times in $1"; }
    v=$(sed -n -E "s/^$2: (.*)$/\1/p" "$1")
    [[ "$v" =~ ^[0-9]+$ ]] || fail "$2: '$v' is not decimal"
    echo "$v"
}

# run MODE NAME FIRST N FIRST2 N2: a server in MODE over disk.cbt; N
# writes from granule FIRST, then N2 from FIRST2; statistics to
# $tmp/NAME.stats.
run ()
{
    start_nbdkit -v -D sparsebackup.stats=1 --filter=sparsebackup \
        file "$tmp/disk.raw" sparsebackup-cbt="$tmp/disk.cbt" \
        sparsebackup-cbt-mode="$1" sparsebackup-statsfile="$tmp/$2.stats"
    writes "$uri" "$3" "$4"
    writes "$uri" "$5" "$6"
    stop_nbdkit
    [ -s "$tmp/$2.stats" ] || { cat "$server_log" >&2; fail "no $2.stats"; }
    echo "--- $2:"
    grep -E '^(changes|cbt-)' "$tmp/$2.stats"
}

# check NAME MARKS COMMITS SYNCS PAGES
check ()
{
    local f="$tmp/$1.stats"
    assert_eq "$2" "$(value "$f" changes)" "$1: changes"
    assert_eq "$2" "$(value "$f" cbt-marks)" "$1: cbt-marks"
    assert_eq "$3" "$(value "$f" cbt-commits)" "$1: cbt-commits"
    assert_eq "$4" "$(value "$f" cbt-syncs)" "$1: cbt-syncs"
    assert_eq "$5" "$(value "$f" cbt-pages-written)" "$1: cbt-pages-written"
    # The four lines come last, in this order.
    assert_eq "cbt-marks cbt-commits cbt-syncs cbt-pages-written" \
        "$(tail -n 4 "$f" | cut -d: -f1 | tr '\n' ' ' | sed 's/ $//')" \
        "$1: the last lines"
}

# Write-ahead: 20 new granules, one at a time: one commit, one sync and
# one page each.  Then 10 of them again and 5 new ones: only the new
# ones wait.
run write-ahead wa 0 20 10 15
check wa 35 25 25 25
# -D sparsebackup.stats=1 prints them too.
assert_contains "$server_log" "sparsebackup: stats: cbt-syncs: 25"

# The counters are per run, not stored: after a restart, the granules
# recorded before are durable already (no wait), new ones are not.
run write-ahead wa2 0 25 100 3
check wa2 28 3 3 3

# In-use mode: the record stays in memory while nbdkit runs, so marks
# never wait and nothing is synced for them.
rm -f "$tmp/disk.cbt"
run in-use iu 0 20 10 15
check iu 35 0 0 0

# With sparsebackup-cbt but no connection the file is never opened: 0.
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-statsfile="$tmp/idle.stats"
stop_nbdkit
for k in cbt-marks cbt-commits cbt-syncs cbt-pages-written; do
    assert_eq 0 "$(value "$tmp/idle.stats" "$k")" "idle: $k"
done

# Without sparsebackup-cbt: no cbt lines.
start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
    sparsebackup-statsfile="$tmp/none.stats"
writes "$uri" 0 2
stop_nbdkit
[ -s "$tmp/none.stats" ] || fail "no none.stats"
if grep '^cbt-' "$tmp/none.stats"; then
    fail "cbt lines in the statistics without sparsebackup-cbt"
fi

echo "$0: OK"
