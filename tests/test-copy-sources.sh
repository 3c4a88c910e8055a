#!/usr/bin/env bash
# sparsebackup-copy from real servers: nbdkit memory and file (plain and
# through the sparsebackup filter), a 300M disk with data far apart
# (several block status windows of 128M), a server without block status
# (--delta warns and copies everything), and servers run with socket
# activation ([ CMD ARGS ... ]) as source and target.  Every copy equals
# what nbdcopy makes of the same source.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires nbdcopy
requires_plugin memory
requires_plugin file
requires_plugin data

# same_as_nbdcopy URI NAME [OPTIONS]: copy URI with both tools and compare.
same_as_nbdcopy ()
{
    local uri="$1" name="$2"
    shift 2
    rm -f "$tmp/$name.nbdcopy" "$tmp/$name.img"
    nbdcopy "$uri" "$tmp/$name.nbdcopy"
    # A previous backup of zeroes, for --delta (which needs SRC's size).
    truncate -s "$(stat -c %s "$tmp/$name.nbdcopy")" "$tmp/$name.img"
    "$copy" "$@" "$uri" "$tmp/$name.img" > "$tmp/$name.out" 2>&1 ||
        { cat "$tmp/$name.out"; fail "$name: copy failed"; }
    cmp "$tmp/$name.nbdcopy" "$tmp/$name.img" || fail "$name: copies differ"
}

# A file with data, a hole and zeroes written as data.
truncate -s 5M "$tmp/disk.img"
head -c 1M /dev/urandom | dd of="$tmp/disk.img" conv=notrunc status=none
head -c 1M /dev/zero | dd of="$tmp/disk.img" bs=1M seek=3 conv=notrunc \
    status=none
head -c 4097 /dev/urandom | dd of="$tmp/disk.img" bs=1 seek=$((5 * 1024 * K - 4097)) \
    conv=notrunc status=none

start_nbdkit file "$tmp/disk.img"
same_as_nbdcopy "$uri" file
cmp "$tmp/disk.img" "$tmp/file.img" || fail "file: copy differs from the file"
start_nbdkit --filter=sparsebackup file "$tmp/disk.img"
same_as_nbdcopy "$uri" filter
same_as_nbdcopy "$uri" filter-delta --delta

# memory: written with nbdcopy, then copied out.
start_nbdkit memory 5M
nbdcopy "$tmp/disk.img" "$uri"
same_as_nbdcopy "$uri" memory --requests=4 --request-size=1M

# 300M with a few bytes at 0, 200M and the last byte: three windows.
start_nbdkit data '@0 "a" @209715200 "b" @314572799 "c"' size=300M
same_as_nbdcopy "$uri" big
assert_contains "$tmp/big.out" "copied [0-9]+ bytes, zeroed [0-9]+ bytes, skipped 0 bytes of 314572800 "
a=$(allocated "$tmp/big.img")
[ "$a" -le $((4 * 1024 * K)) ] || fail "big: $a bytes allocated"

# No block status at all (no structured replies): everything is data.
start_nbdkit --no-sr eval get_size='echo 1M' \
    pread="unset LD_PRELOAD; head -c \$3 /dev/zero | tr '\\0' x"
same_as_nbdcopy "$uri" noextents --delta
assert_contains "$tmp/noextents.out" "does not report base:allocation: --delta copies everything"
assert_contains "$tmp/noextents.out" "copied 1048576 bytes, zeroed 0 bytes, skipped 0 bytes"

# Socket activation: source, and an NBD target whose contents are read
# back through nbdcopy's own socket activation.
"$copy" -q "[" nbdkit file "$tmp/disk.img" "]" "$tmp/sa.img"
cmp "$tmp/disk.img" "$tmp/sa.img" || fail "socket activation: copy differs"
cp "$tmp/disk.img" "$tmp/target.img"
truncate -s 0 "$tmp/target.img"; truncate -s 5M "$tmp/target.img"
"$copy" -q --journal="$tmp/target.journal" "[" nbdkit file "$tmp/disk.img" "]" \
    "[" nbdkit file "$tmp/target.img" "]"
cmp "$tmp/disk.img" "$tmp/target.img" || fail "socket activation to NBD differs"
