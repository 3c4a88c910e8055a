#!/usr/bin/env bash
# The target side learns what is already zero.  A copy of a mostly-zero
# source into a fresh, sparse target sends a zero request for every zero
# extent; the filter asks the target's extents once per large region
# (never per request) and skips zeroing what is already zero, over the
# file plugin and over the nbd plugin (a second nbdkit behind it).  The
# target must be identical to the source and stay sparse.
#
# Also nbdcopy --allocated (libnbd 1.14): the source's holes arrive as
# zero requests with NO_HOLE (honoured: allocated), but zeros that
# nbdcopy writes as data are punched under the default
# sparsebackup-detect-zeroes=unmap; sparsebackup-detect-zeroes=on gives a
# fully allocated copy.
source "${srcdir:-.}/functions.sh"
requires nbdcopy --version
requires_filter sparsebackup
requires_filter log
requires_plugin file
requires_plugin nbd

size=$((256 << 20))
src="$tmp/src.img"
truncate -s $size "$src"
# 2 MiB of data in 8 places.
for i in 0 1 2 3 4 5 6 7; do
    dd if=/dev/urandom of="$src" bs=256K count=1 seek=$((i * 123 + 7)) \
        conv=notrunc status=none
done

# zero_requests LOG: zero requests that reached the plugin.
zero_requests () { grep -c ' Zero id=' "$1" || true; }
extents_calls () { grep -c ' Extents id=' "$1" || true; }

# copy_into NAME FILTERS...: nbdcopy src -> fresh target through the stack.
copy_into ()
{
    local name="$1"; shift
    local tgt="$tmp/tgt-$name.img"
    rm -f "$tgt" "$tmp/log-$name"
    truncate -s $size "$tgt"
    start_nbdkit "$@" --filter=log file "$tgt" logfile="$tmp/log-$name" \
        sparsebackup-statsfile="$tmp/stats-$name"
    nbdcopy "$src" "$uri" || fail "$name: nbdcopy failed"
    stop_nbdkit
    cmp "$src" "$tgt" || fail "$name: the target differs from the source"
    [ "$(allocated "$tgt")" -le $((4 << 20)) ] ||
        fail "$name: the target is not sparse: $(allocated "$tgt") bytes"
}

# Without the filter.
truncate -s $size "$tmp/tgt-plain.img"
start_nbdkit --filter=log file "$tmp/tgt-plain.img" logfile="$tmp/log-plain"
nbdcopy "$src" "$uri" || fail "plain: nbdcopy failed"
stop_nbdkit
plain=$(zero_requests "$tmp/log-plain")
[ "$plain" -ge 5 ] || fail "without the filter only $plain zero requests?"

copy_into filter --filter=sparsebackup
filter=$(zero_requests "$tmp/log-filter")
ext=$(extents_calls "$tmp/log-filter")
cat "$tmp/stats-filter"
echo "zero requests reaching the file plugin: $plain without the filter," \
     "$filter with it ($ext extents calls)"
assert_eq 0 "$filter" "zero requests that reached the plugin"
[ "$ext" -le 8 ] || fail "$ext extents calls for a 256 MiB target"
skipped=$(sed -n 's/^zero-skipped-bytes: //p' "$tmp/stats-filter")
[ "$skipped" -ge $((size - (3 << 20))) ] ||
    fail "zero-skipped-bytes $skipped: the target's holes were zeroed"

# Over the nbd plugin: the target is a second nbdkit serving the file.
tgt="$tmp/tgt-nbd.img"
truncate -s $size "$tgt"
start_nbdkit --filter=log file "$tgt" logfile="$tmp/log-nbd"
inner_sock=$sock inner_pid=$pid
start_nbdkit --filter=sparsebackup nbd socket="$inner_sock" \
    sparsebackup-statsfile="$tmp/stats-nbd"
nbdcopy "$src" "$uri" || fail "nbd: nbdcopy failed"
stop_nbdkit
stop_nbdkit "$inner_pid"
cmp "$src" "$tgt" || fail "nbd: the target differs from the source"
assert_eq 0 "$(zero_requests "$tmp/log-nbd")" \
    "zero requests that reached the inner nbdkit"

# nbdcopy --allocated from a source without extents writes zero-filled
# buffers (no zero requests): punched under unmap, allocated under on.
for mode in unmap on; do
    tgt="$tmp/tgt-alloc-$mode.img"
    rm -f "$tgt"; truncate -s $size "$tgt"
    start_nbdkit file "$src" --filter=noextents
    src_uri=$uri
    start_nbdkit --filter=sparsebackup file "$tgt" \
        sparsebackup-detect-zeroes=$mode
    nbdcopy --allocated "$src_uri" "$uri" || fail "--allocated: nbdcopy failed"
    stop_nbdkit
    cmp "$src" "$tgt" || fail "--allocated $mode: the target differs"
    alloc=$(allocated "$tgt")
    echo "nbdcopy --allocated, detect-zeroes=$mode: $alloc bytes allocated"
    case $mode in
        unmap) [ "$alloc" -le $((4 << 20)) ] ||
                   fail "unmap: zero data blocks were not punched" ;;
        on)    [ "$alloc" -ge $size ] ||
                   fail "detect-zeroes=on: only $alloc bytes allocated" ;;
    esac
done
echo "$0: OK"
