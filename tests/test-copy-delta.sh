#!/usr/bin/env bash
# sparsebackup-copy --delta over a previous backup: HOLE-without-ZERO
# ranges keep the target's bytes, ZERO ranges become zero (and holes in a
# file), data is copied; the same into an NBD target.  A second pass is
# idempotent (warm migration).  --delta never creates a missing target,
# and refuses a target of another size.
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

# A previous backup of another size is refused, shorter or longer, and
# left as it was (a delta over it could not make it equal SRC).
head -c $((1536 * K)) "$tmp/prev.img" > "$tmp/short.img"
cp "$tmp/prev.img" "$tmp/long.img"; echo tail >> "$tmp/long.img"
cp "$tmp/short.img" "$tmp/short.orig"; cp "$tmp/long.img" "$tmp/long.orig"
for f in short long; do
    r=0
    "$copy" --delta "$view" "$tmp/$f.img" > "$tmp/out" 2> "$tmp/err" || r=$?
    assert_eq 1 "$r" "exit status of --delta onto the $f file"
    assert_contains "$tmp/err" "--delta: DST '$tmp/$f.img' is $(stat -c %s "$tmp/$f.img") bytes, SRC '.*' is $view_size bytes"
    cmp "$tmp/$f.orig" "$tmp/$f.img" || fail "the $f file was changed"
    [ ! -e "$tmp/$f.img.sparsebackup-journal" ] ||
        fail "a journal was left for the $f file"
done

# Into an NBD target holding the previous backup.
start_nbdkit memory "$view_size"
target=$uri
nbdcopy "$tmp/prev.img" "$target"
"$copy" --delta --journal="$tmp/nbd.journal" "$view" "$target" > "$tmp/out"
assert_summary "$tmp/out" "$delta_copied" "$view_zeroed" "$delta_skipped"
nbdcopy "$target" "$tmp/back.img"
cmp "$tmp/expected.img" "$tmp/back.img" || fail "delta into NBD differs"
# A smaller or larger NBD target is refused (larger: unless --allow-larger).
start_nbdkit memory $((view_size + 4096))
r=0; "$copy" --delta --no-journal "$view" "$uri" 2> "$tmp/err" || r=$?
assert_eq 1 "$r" "exit status of --delta onto a larger NBD target"
assert_contains "$tmp/err" "is $((view_size + 4096)) bytes, larger than SRC"

# --delta needs the previous backup.
if "$copy" --delta "$view" "$tmp/missing.img" 2> "$tmp/err"; then
    fail "--delta created a missing target"
fi
assert_contains "$tmp/err" "cannot open DST '$tmp/missing.img'"
[ ! -e "$tmp/missing.img" ] || fail "--delta created $tmp/missing.img"
