#!/usr/bin/env bash
# sparsebackup-copy without --delta: the copy equals the source (HOLE
# without ZERO is copied as data), ZERO extents are holes in the target,
# the last partial block is copied, the summary and -p / --progress=FD
# output are there; the same with tiny requests, into an existing larger
# file (cut to the source's size) and a shorter one, into an NBD target
# (a larger one only with --allow-larger).
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
# punched, everything else overwritten, and the file is cut to the
# source's size (a full copy makes DST equal SRC, like cp or nbdcopy).
head -c $((view_size + 5000)) /dev/zero | tr '\0' P > "$tmp/old.img"
"$copy" "$view" "$tmp/old.img" > /dev/null 2> "$tmp/err"
cmp "$tmp/src.img" "$tmp/old.img" || fail "copy over a longer file differs"
assert_contains "$tmp/err" "DST '$tmp/old.img' was $((view_size + 5000)) bytes: cut to the $view_size bytes of SRC"
assert_hole "$tmp/old.img" $((512 * K)) $((512 * K))
[ ! -e "$tmp/old.img.sparsebackup-journal" ] || fail "the journal was left"
# A shorter one is extended.
head -c 5000 /dev/zero | tr '\0' P > "$tmp/short.img"
"$copy" -q "$view" "$tmp/short.img"
cmp "$tmp/src.img" "$tmp/short.img" || fail "copy over a shorter file differs"

# Into an NBD target (written with pwrite and zero requests); NBD
# targets need a journal beside them (--journal) or --no-journal.
start_nbdkit memory "$view_size"
target=$uri
filled "$tmp/p.img" P
nbdcopy "$tmp/p.img" "$target"      # not zero: the zeroes must be sent
"$copy" --request-size=64K --journal="$tmp/nbd.journal" "$view" "$target" \
    > "$tmp/out"
assert_summary "$tmp/out" "$full_copied" "$view_zeroed" 0
nbdcopy "$target" "$tmp/back.img"
cmp "$tmp/src.img" "$tmp/back.img" || fail "copy into NBD differs"
[ ! -e "$tmp/nbd.journal" ] || fail "the NBD target's journal was left"

# A larger NBD target only with --allow-larger: its tail is kept.
start_nbdkit memory $((view_size + 5000))
target=$uri
nbdcopy "$tmp/old.img" "$target"
r=0; "$copy" --no-journal "$view" "$target" 2> "$tmp/err" || r=$?
assert_eq 1 "$r" "exit status for a larger NBD target"
assert_contains "$tmp/err" "DST '.*' is $((view_size + 5000)) bytes, larger than SRC '.*' \($view_size bytes\): the bytes from offset $view_size on would be left as they are"
"$copy" --no-journal --allow-larger "$view" "$target" > "$tmp/out" \
    2> "$tmp/err"
assert_contains "$tmp/err" "its 5000 bytes from offset $view_size are left as they are"
assert_summary "$tmp/out" "$full_copied" "$view_zeroed" 0
nbdcopy "$target" "$tmp/back.img"
cmp -n "$view_size" "$tmp/src.img" "$tmp/back.img" ||
    fail "copy into a larger NBD target differs"

# Into an NBD target that cannot zero: the zeroes are written.
start_nbdkit --filter=nozero memory "$view_size" zeromode=none
nbdcopy "$tmp/p.img" "$uri"
"$copy" --requests=3 --no-journal "$view" "$uri" > "$tmp/out"
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
    # Every option of --help is in the man page, with an example.
    for o in $(grep -o -E -- '--[a-z][a-z-]+' "$tmp/help" | sort -u); do
        grep -q -E -- "^ +$o([=[]|\$)" "$tmp/man" ||
            fail "the man page has no entry for $o"
        grep -q -E -- "^ +sparsebackup-copy .*$o" "$tmp/man" ||
            fail "the man page has no example of $o"
    done
fi
