#!/usr/bin/env bash
# sparsebackup-copy --delta over a previous backup: HOLE-without-ZERO
# ranges keep the target's bytes, ZERO ranges become zero (and holes in a
# file), data is copied; the same into an NBD target.  A second pass is
# idempotent (warm migration).  --delta never creates a missing target.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires_plugin memory
requires nbdcopy

start_view

filled "$tmp/prev.img" P
expect_image delta "$tmp/prev.img" "$tmp/expected.img"
cmp -s "$tmp/src.img" "$tmp/expected.img" &&
    fail "test bug: the expected delta image equals the source"

cp "$tmp/prev.img" "$tmp/delta.img"
"$copy" --delta "$view" "$tmp/delta.img" > "$tmp/out" ||
    { cat "$tmp/out"; fail "delta copy failed"; }
cmp "$tmp/expected.img" "$tmp/delta.img" || fail "delta copy differs"
assert_summary "$tmp/out" "$delta_copied" "$view_zeroed" "$delta_skipped"
assert_hole "$tmp/delta.img" $((512 * K)) $((512 * K))

# Again, with small requests: nothing changes.
"$copy" --delta --requests=2 --request-size=8K "$view" "$tmp/delta.img" \
    > /dev/null
cmp "$tmp/expected.img" "$tmp/delta.img" || fail "second delta pass differs"

# A shorter previous backup (the disk grew): extended, the new part of a
# skipped range reads as zero.
head -c $((1536 * K)) "$tmp/prev.img" > "$tmp/short.img"
truncate -s "$view_size" "$tmp/prev-grown.img"
dd if="$tmp/short.img" of="$tmp/prev-grown.img" conv=notrunc status=none
expect_image delta "$tmp/prev-grown.img" "$tmp/expected-grown.img"
"$copy" --delta "$view" "$tmp/short.img" > /dev/null
cmp "$tmp/expected-grown.img" "$tmp/short.img" || fail "grown delta differs"

# Into an NBD target holding the previous backup.
start_nbdkit memory "$view_size"
target=$uri
nbdcopy "$tmp/prev.img" "$target"
"$copy" --delta "$view" "$target" > "$tmp/out"
assert_summary "$tmp/out" "$delta_copied" "$view_zeroed" "$delta_skipped"
nbdcopy "$target" "$tmp/back.img"
cmp "$tmp/expected.img" "$tmp/back.img" || fail "delta into NBD differs"

# --delta needs the previous backup.
if "$copy" --delta "$view" "$tmp/missing.img" 2> "$tmp/err"; then
    fail "--delta created a missing target"
fi
assert_contains "$tmp/err" "cannot open DST '$tmp/missing.img'"
[ ! -e "$tmp/missing.img" ] || fail "--delta created $tmp/missing.img"
