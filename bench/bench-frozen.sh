#!/usr/bin/env bash
# Benchmark (incremental backup issue): writes during a point-in-time
# backup versus none.  A BENCH_SIZE (default 512M) raw disk of random
# data served by
#   nbdkit --filter=sparsebackup file disk sparsebackup-cbt=... \
#          sparsebackup-control=... sparsebackup-scratch=...
# and nbdcopy writing BENCH_SIZE of other random data over it:
#   none     no backup in progress
#   frozen   during a frozen backup (backup-begin before the copy): every
#            granule is written for the first time since the freeze, so
#            each costs a read of its old data and a write to the
#            scratch file (copy before write)
#   again    the same backup, a second pass: every granule already saved
# and, while a frozen backup runs, nbdcopy of @frozen alone and with
# the writer running at the same time.  BENCH_RUNS (default 3) runs each,
# interleaved; medians; each copy of @frozen is checked with cmp.
#
#   make -C bench bench        or
#   abs_top_builddir=$PWD/_build bash bench/bench-frozen.sh
set -euo pipefail
source "$(dirname "$0")/bench-functions.sh"
source "$srcdir/cbt-lib.sh"
need nbdcopy
requires_plugin file
requires_filter sparsebackup

size=$(numfmt --from=iec "${BENCH_SIZE:-512M}")
runs=${BENCH_RUNS:-3}
head -c "$size" /dev/urandom > "$tmp/orig.raw"
head -c "$size" /dev/urandom > "$tmp/new.raw"
ctlsock=$tmp/ctl.sock
echo "disk: $(numfmt --to=iec "$size") of random data, written over with" \
     "other random data by nbdcopy; $runs runs each"

server ()
{
    cp "$tmp/orig.raw" "$tmp/disk.raw"
    rm -f "$tmp/disk.cbt"
    start_nbdkit --filter=sparsebackup file "$tmp/disk.raw" \
        sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
        sparsebackup-scratch="$tmp/scratch"
    nbdinfo --size "$uri" > /dev/null
}

none=(); frozen=(); again=(); alone=(); busy=()
for (( i = 0; i < runs; i++ )); do
    server
    none+=("$(time1 nbdcopy "$tmp/new.raw" "$uri")")
    stop_nbdkit

    server
    ctl backup-begin b1 > /dev/null
    frozen+=("$(time1 nbdcopy "$tmp/new.raw" "$uri")")
    used=$(ctl status | sed 's/.*scratch-used=\([0-9]*\).*/\1/')
    again+=("$(time1 nbdcopy "$tmp/new.raw" "$uri")")
    alone+=("$(time1 nbdcopy "nbd+unix:///@frozen?socket=$sock" "$tmp/f.raw")")
    cmp "$tmp/f.raw" "$tmp/orig.raw" || fail "@frozen differs"
    ctl backup-end b1 --ok > /dev/null
    stop_nbdkit

    # The copy of @frozen while the writer overwrites the disk.
    server
    ctl backup-begin b1 > /dev/null
    nbdcopy "$tmp/new.raw" "$uri" &
    w=$!
    busy+=("$(time1 nbdcopy "nbd+unix:///@frozen?socket=$sock" "$tmp/f.raw")")
    wait $w
    cmp "$tmp/f.raw" "$tmp/orig.raw" || fail "@frozen differs (writer running)"
    ctl backup-end b1 --ok > /dev/null
    stop_nbdkit
done
mn=$(median "${none[@]}"); mf=$(median "${frozen[@]}"); ma=$(median "${again[@]}")
ml=$(median "${alone[@]}"); mb=$(median "${busy[@]}")
echo "writes, no backup:                 ${none[*]}  median $mn s"
echo "writes, frozen backup, first pass: ${frozen[*]}  median $mf s  (scratch: $used bytes)"
echo "writes, frozen backup, again:      ${again[*]}  median $ma s"
echo "copy of @frozen, nothing writing:  ${alone[*]}  median $ml s"
echo "copy of @frozen, writer running:   ${busy[*]}  median $mb s"
echo "ratio writes during a frozen backup / none: first pass $(ratio "$mf" "$mn")," \
     "again $(ratio "$ma" "$mn")"
echo "ratio copy of @frozen with a writer / without: $(ratio "$mb" "$ml")"
