#!/usr/bin/env bash
# qcow2 plugin: the limits of the @since:NAME views (persistent bitmaps).
#
#  - a bitmap is refused exactly where QEMU refuses it: a table covering
#    more than 512 MiB of bitmap (2^32 bits) is refused with a message
#    naming the bitmap, the value and the limit (QEMU: "doesn't satisfy
#    the constraints"), one at the limit is used; a table of 0 entries
#    is refused;
#  - listing the views reads no bitmap table: 300 bitmaps sharing one
#    1 MiB table cost the listing the directory only, and the opens of
#    all the listed views (nbdinfo --list) read the table once (before,
#    every listing and every open read it: 539 MB);
#  - a SIGTERM stops a long listing at once.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdinfo python3
requires test -r /proc/self/io
cd "$tmp"

since='nbd+unix:///@since:b1?socket=$unixsocket'

# mkbig NAME SIZE TABLE_ENTRIES: a qcow2 image of SIZE bytes (64K
# clusters) with one bitmap b1 of granularity 512 whose all-zero table
# of TABLE_ENTRIES entries is appended to the file.
mkbig ()
{
    qemu-img create -q -f qcow2 -o cluster_size=65536 "$1.qcow2" "$2"
    qemu-img bitmap --add "$1.qcow2" b1
    craft "$1.qcow2" many-bitmaps 1 9 "$3"
}

# rchar PID: bytes read so far by process PID (read/pread calls).
rchar ()
{
    awk '$1 == "rchar:" { print $2 }' "/proc/$1/io"
}

#----------------------------------------------------------------------
# The size limit: 2 TiB at granularity 512 is 2^32 bits, 8192 entries
# of 64K clusters: used.  64K more needs 8193 entries: refused.

mkbig exact $((1 << 41)) 8192
qemu-img info exact.qcow2 > info
assert_contains info "granularity: 512"
nbdkit -U - qcow2 file=exact.qcow2 --run "nbdinfo --map \"$since\"" > map
cat map
echo "         0  2199023255552    1  hole" > map.expected
diff -u map.expected map || fail "exact: unexpected map"

mkbig over $(( (1 << 41) + 65536 )) 8193
rc=0
qemu-img info over.qcow2 > info 2>&1 || rc=$?
cat info
[ $rc -ne 0 ] || fail "qemu-img opens over.qcow2: the limit moved?"
assert_contains info "Bitmap 'b1' doesn't satisfy the constraints"
rc=0
nbdkit -U - qcow2 file=over.qcow2 --run "nbdinfo --size \"$since\"" \
    > /dev/null 2> err || rc=$?
failed_cleanly $rc "@since:b1 of over.qcow2"
cat err
assert_contains err "bitmap 'b1': bitmap_table_size 8193 times the cluster size 0x10000 is 536936448 bytes of bitmap, more than the limit of 536870912 bytes \(2\^32 bits, QEMU's limit: it refuses this bitmap\); the smallest granularity that fits is 1024"
# Not listed; the disk itself is still served.
nbdkit -U - qcow2 file=over.qcow2 --run 'nbdinfo --list "$uri"' > list
grep -q since list && fail "over: @since:b1 listed"
nbdkit -U - qcow2 file=over.qcow2 --run 'nbdinfo --map "$uri"' > map
echo "         0  2199023321088    3  hole,zero" > map.expected
diff -u map.expected map || fail "over: unexpected map of the disk"

# A table of 0 entries (QEMU refuses it too).
qemu-img create -q -f qcow2 one.qcow2 8M
qemu-img bitmap --add one.qcow2 b1
eval "$(craft one.qcow2 bitmaps)"
craft one.qcow2 be32 $((dir + 8)) 0
rc=0
qemu-img info one.qcow2 > info 2>&1 || rc=$?
[ $rc -ne 0 ] || fail "qemu-img opens one.qcow2 with an empty table"
rc=0
nbdkit -U - qcow2 file=one.qcow2 --run "nbdinfo --size \"$since\"" \
    > /dev/null 2> err || rc=$?
failed_cleanly $rc "@since:b1 of one.qcow2"
assert_contains err "bitmap 'b1': bitmap_table_size is 0 \(QEMU refuses a bitmap without a table\)"

#----------------------------------------------------------------------
# The work of a listing.  2 TiB with 4K clusters: at granularity 512 a
# table of 2^17 entries (1 MiB, 2^32 bits: QEMU accepts it), shared by
# 300 bitmaps.

qemu-img create -q -f qcow2 -o cluster_size=4096 many.qcow2 $((1 << 41))
qemu-img bitmap --add many.qcow2 b1
cp many.qcow2 one-big.qcow2
craft many.qcow2 many-bitmaps 300 9 $((1 << 17))
# QEMU accepts such a bitmap (and loads all 300 of them in 100 s).
craft one-big.qcow2 many-bitmaps 1 9 $((1 << 17))
qemu-img info one-big.qcow2 > info
assert_contains info "granularity: 512"

start_nbdkit -v -D qcow2.verbose=1 qcow2 file=many.qcow2
r0=$(rchar "$pid")
nbdinfo --list "$uri" > list
r1=$(rchar "$pid")
read=$((r1 - r0))
n=$(grep -c "export=\"@since:" list || true)
echo "nbdinfo --list: $n @since views, the server read $read bytes"
[ "$n" -eq 256 ] || fail "$n @since views listed (256 expected)"
# The directory (300 entries of 32 bytes) once, then for each of the
# 256 opens the directory again, and the table once: about 3.5 MB.
[ "$read" -lt $((8 << 20)) ] ||
    fail "the listing and the opens read $read bytes (the table again and again?)"
stop_nbdkit
grep 'debug: bitmaps: ' "$server_log"
grep -q 'bitmaps: 300 in the top image, 256 listed, 256 usable; read 9600 bytes of bitmap directories$' \
    "$server_log" || fail "the listing read more than the directory"
grep -c "read 1058176 bytes of bitmap directories and tables" \
    "$server_log" > n || true
[ "$(cat n)" -eq 1 ] || fail "the table was read $(cat n) times"
grep -c "read 9600 bytes of bitmap directories and tables" \
    "$server_log" > n || true
[ "$(cat n)" -eq 255 ] || fail "$(cat n) opens read the directory only"

#----------------------------------------------------------------------
# SIGTERM during a long listing: with 2 s before each read of a bitmap
# directory or table, the opens of nbdinfo --list would take minutes;
# the server exits at once instead.

# SIGTERM once the server has read the client's requests (its rchar
# grows: the listing follows at once), not after a fixed time; the bound
# is well below the minutes the listing would take but above what an
# exit takes on a loaded machine.  (Not nbdkit -v: under the ASan preload
# a debug message with a strerror text makes nbdkit hang at exit.)
start_nbdkit -D qcow2.bitmap_delay_ms=2000 qcow2 file=many.qcow2
r0=$(rchar "$pid")
nbdinfo --list "$uri" > /dev/null 2>&1 &
client=$!
wait_until 120 "the server reading the listing request" \
    eval '[ "$(rchar "$pid")" -gt "$r0" ]'
kill -TERM "$pid"
for (( i = 0; i < 450; i++ )); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
done
kill -0 "$pid" 2>/dev/null && fail "nbdkit still runs 45 s after SIGTERM"
wait "$client" || true
cat "$server_log"
: done
