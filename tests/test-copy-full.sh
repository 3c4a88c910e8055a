#!/usr/bin/env bash
# sparsebackup-copy without --delta: the copy equals the source (HOLE
# without ZERO is copied as data), ZERO extents are holes in the target,
# the last partial block is copied, the summary and -p / --progress=FD
# output are there; the same with tiny requests, into an existing larger
# file, and into an NBD target.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires_plugin memory
requires nbdcopy

start_view

# A new file, with the progress bar on stderr.
"$copy" -p "$view" "$tmp/full.img" > "$tmp/out" 2> "$tmp/err" ||
    { cat "$tmp/out" "$tmp/err"; fail "full copy failed"; }
cmp "$tmp/src.img" "$tmp/full.img" || fail "full copy differs from the source"
assert_eq "$view_size" "$(stat -c %s "$tmp/full.img")" "size of the copy"
assert_summary "$tmp/out" "$full_copied" "$view_zeroed" 0
assert_contains "$tmp/err" '\] 100% '
assert_hole "$tmp/full.img" $((512 * K)) $((512 * K))
a=$(allocated "$tmp/full.img")
[ "$a" -le $((view_size - 512 * K + 4096)) ] ||
    fail "full copy allocates $a bytes, more than its data"

# Tiny requests, one at a time; machine-readable progress on fd 3.
"$copy" --requests=1 --request-size=4K --progress=3 -q "$view" \
    "$tmp/small.img" 3> "$tmp/progress" > "$tmp/out"
cmp "$tmp/src.img" "$tmp/small.img" || fail "4K requests: copy differs"
assert_contains "$tmp/progress" '^100/100$'
[ ! -s "$tmp/out" ] || fail "--quiet printed: $(cat "$tmp/out")"

# Over an existing, longer, fully written file: the ZERO extents are
# punched, everything else overwritten, the size is kept.
head -c $((view_size + 5000)) /dev/zero | tr '\0' P > "$tmp/old.img"
"$copy" "$view" "$tmp/old.img" > /dev/null
cmp -n "$view_size" "$tmp/src.img" "$tmp/old.img" ||
    fail "copy over an old file differs"
assert_eq $((view_size + 5000)) "$(stat -c %s "$tmp/old.img")" \
    "size of a longer target"
assert_eq PPPPP "$(tail -c 5 "$tmp/old.img")" "bytes past the source"
assert_hole "$tmp/old.img" $((512 * K)) $((512 * K))

# Into an NBD target (written with pwrite and zero requests).
start_nbdkit memory $((view_size + 5000))
target=$uri
nbdcopy "$tmp/old.img" "$target"     # not zero: the zeroes must be sent
"$copy" --request-size=64K "$view" "$target" > "$tmp/out"
assert_summary "$tmp/out" "$full_copied" "$view_zeroed" 0
nbdcopy "$target" "$tmp/back.img"
cmp -n "$view_size" "$tmp/src.img" "$tmp/back.img" ||
    fail "copy into NBD differs"

# Into an NBD target that cannot zero: the zeroes are written.
start_nbdkit --filter=nozero memory "$view_size" zeromode=none
filled "$tmp/p.img" P
nbdcopy "$tmp/p.img" "$uri"
"$copy" --requests=3 "$view" "$uri" > "$tmp/out"
assert_summary "$tmp/out" "$full_copied" "$view_zeroed" 0
nbdcopy "$uri" "$tmp/back2.img"
cmp "$tmp/src.img" "$tmp/back2.img" || fail "copy into NBD without zero differs"

# --help, --version and the man page.
"$copy" --help > "$tmp/help"
assert_contains "$tmp/help" '^Usage: sparsebackup-copy \[OPTIONS\] SRC DST'
"$copy" --version | grep -q '^sparsebackup-copy [0-9]' || fail "--version"
page="$abs_top_builddir/tools/sparsebackup-copy.1"
[ -s "$page" ] || fail "$page was not built"
if command -v man > /dev/null; then
    MANWIDTH=80 man -l "$page" > "$tmp/man" 2> /dev/null || fail "man -l $page"
    assert_contains "$tmp/man" '^EXIT STATUS'
    assert_contains "$tmp/man" 'sparsebackup-copy --delta'
fi
