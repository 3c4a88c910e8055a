#!/usr/bin/env bash
# sparsebackup-copy to a block device (a loop device over a file): a
# device shorter than the source is refused, a longer one too unless
# --allow-larger; full and delta copies to it are exact (zeroes punched
# with fallocate on the device), and a manifest verifies the device.  A
# device needs --journal or --no-journal.
# Skipped unless losetup can attach a loop device (root, /dev/loop*).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires losetup

# attach FILE: attach a loop device to FILE, detached at exit; sets $dev.
attach ()
{
    dev=$(losetup --find --show "$1" 2>/dev/null) && [ -b "$dev" ] ||
        skip "cannot attach a loop device"
    cleanup_fn "losetup -d $dev"
}

start_view

truncate -s $((view_size - 1)) "$tmp/short.bin"
attach "$tmp/short.bin"
r=0
"$copy" --no-journal "$view" "$dev" 2> "$tmp/err" || r=$?
assert_eq 1 "$r" "exit status for a short device"
assert_contains "$tmp/err" "DST '$dev' is shorter \([0-9]+ bytes\) than SRC \($view_size bytes\)"

# A longer device holding a previous backup (and more).
filled "$tmp/prev.img" P
cp "$tmp/prev.img" "$tmp/dev.bin"
truncate -s $((3 * 1024 * K)) "$tmp/dev.bin"
attach "$tmp/dev.bin"
expect_image delta "$tmp/prev.img" "$tmp/expected.img"
r=0
"$copy" --delta --journal="$tmp/j" "$view" "$dev" 2> "$tmp/err" || r=$?
assert_eq 1 "$r" "exit status for a larger device"
assert_contains "$tmp/err" "DST '$dev' is $((3 * 1024 * K)) bytes, larger than SRC"
"$copy" --delta --journal="$tmp/j" --allow-larger "$view" "$dev" > "$tmp/out"
assert_summary "$tmp/out" "$delta_copied" "$view_zeroed" "$delta_skipped"
cmp -n "$view_size" "$tmp/expected.img" "$dev" || fail "delta to $dev differs"

"$copy" --journal="$tmp/j" --allow-larger "$view" "$dev" > "$tmp/out"
assert_summary "$tmp/out" "$full_copied" "$view_zeroed" 0
cmp -n "$view_size" "$tmp/src.img" "$dev" || fail "full copy to $dev differs"

# A manifest of the copy verifies the device (its first part: the device
# is larger), and a byte changed on it shows.
"$copy" -q --journal="$tmp/j" --allow-larger --manifest="$tmp/m" \
    --chunk-size=64K "$view" "$dev"
"$copy" --allow-larger --verify="$tmp/m" "$dev" > "$tmp/out"
assert_contains "$tmp/out" "TARGET '$dev' matches the manifest"
r=0; "$copy" --verify="$tmp/m" "$dev" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --verify of a larger device"
assert_contains "$tmp/err" "TARGET '$dev' is $((3 * 1024 * K)) bytes, the manifest '$tmp/m' is of $view_size bytes"
printf '!' | dd of="$dev" bs=1 seek=$((1500 * K)) conv=notrunc status=none
r=0; "$copy" --allow-larger --verify="$tmp/m" "$dev" > "$tmp/out" || r=$?
assert_eq 1 $r "exit status of --verify of a changed device"
assert_contains "$tmp/out" "the first at offset $((1500 * K / 65536 * 65536))$"
