#!/usr/bin/env bash
# sparsebackup-copy fails with exit status 1 and a message naming the bad
# value: bad options and URIs, targets it cannot open or write, short or
# read-only targets, read and block status errors from the source.  After
# a read error the server is still there (the tool drains its requests
# before hanging up, see the nbdkit 1.32.5 note in shared notes).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires_plugin memory
requires_filter error

# expect_fail PATTERN ARGS...: the tool exits 1 and stderr matches PATTERN.
expect_fail ()
{
    local pattern="$1" r=0
    shift
    "$copy" "$@" > "$tmp/out" 2> "$tmp/err" || r=$?
    [ "$r" -eq 1 ] ||
        { cat "$tmp/err"; fail "exit status $r (expected 1): $copy $*"; }
    assert_contains "$tmp/err" "$pattern"
}

# re STRING: STRING as an extended regular expression that matches it.
re ()
{
    sed 's/[][\\.*^$?+(){}|]/\\&/g' <<< "$1"
}

start_view

# Options and arguments.
expect_fail "--requests: '0' is not a number" --requests=0 "$view" x
expect_fail "--requests: 'many' is not a number" --requests=many "$view" x
expect_fail "--requests: '1025' " --requests=1025 "$view" x
expect_fail "--request-size: '100' is not a size" --request-size=100 "$view" x
expect_fail "--request-size: '64M' " --request-size=64M "$view" x
expect_fail "--request-size: '1Q' " --request-size=1Q "$view" x
expect_fail "--progress: '99' is not an open file descriptor" \
    --progress=99 "$view" x
expect_fail "missing DST" "$view"
expect_fail "unexpected argument '--delta' \(options go before SRC\)" \
    "$view" "$tmp/x.img" --delta
expect_fail "unrecognized option" --no-such-option "$view" x
expect_fail "'\[' needs a command and a closing '\]'" "[" nbdkit memory 1M

# Sources that are not there.
expect_fail "SRC 'foo:bar' is not an NBD URI" foo:bar "$tmp/x.img"
expect_fail "cannot connect to SRC '$(re "nbd+unix:///?socket=$tmp/nosock")'" \
    "nbd+unix:///?socket=$tmp/nosock" "$tmp/x.img"
expect_fail "cannot connect to SRC 'nbd://'" "nbd://" "$tmp/x.img"

# Targets it cannot open or write.
expect_fail "cannot open DST '$tmp': Is a directory" "$view" "$tmp"
expect_fail "cannot create DST '$tmp/no/such/dir': No such file" \
    "$view" "$tmp/no/such/dir"
if [ -w /dev/full ]; then
    expect_fail "DST '/dev/full' is not a regular file: name a journal for it with --journal=FILE" \
        "$view" /dev/full
    expect_fail "write error on DST '/dev/full' at offset [0-9]+: No space" \
        --no-journal "$view" /dev/full
    expect_fail "--delta: DST '/dev/full' is not a regular file, block device or NBD export" \
        --delta --no-journal "$view" /dev/full
fi
start_nbdkit memory $((view_size - 1))
expect_fail "DST '$(re "$uri")' is not a regular file: name a journal" \
    "$view" "$uri"
expect_fail "DST '$(re "$uri")' is shorter \($((view_size - 1)) bytes\) than SRC \($view_size bytes\)" \
    --no-journal "$view" "$uri"
start_nbdkit -r memory "$view_size"
expect_fail "DST '$(re "$uri")' is read-only" --no-journal "$view" "$uri"
start_nbdkit --filter=error memory "$view_size" error-pwrite=EIO \
    error-pwrite-rate=1
expect_fail "write error on DST '$(re "$uri")' at offset [0-9]+: Input/output error" \
    --journal="$tmp/nbd.journal" "$view" "$uri"
assert_contains "$tmp/err" "DST '$(re "$uri")' is incomplete: 0 of $view_size bytes done; the journal '$tmp/nbd.journal' records it"
expect_fail "--journal and --no-journal exclude each other" \
    --journal=j --no-journal "$view" "$uri"
expect_fail "--journal-every: '0' is not a size" --journal-every=0 "$view" x
expect_fail "--chunk-size: '3000' is not a power of 2 from 4K to 64M" \
    --manifest=m --chunk-size=3000 "$view" x
expect_fail "--chunk-size: '128M' " --manifest=m --chunk-size=128M "$view" x
expect_fail "--chunk-size needs --manifest" --chunk-size=64K "$view" x
expect_fail "--base-manifest needs --delta and --manifest" \
    --base-manifest=m "$view" x
expect_fail "--manifest-only needs --manifest" --manifest-only "$view"
expect_fail "--verify takes no copy options" --verify=m --delta x

# Errors from the source.
echo $((1024 * K)) > "$tmp/fail-read"
expect_fail "read error on SRC '$(re "$view")' at offset [0-9]+ \([0-9]+ bytes\): Input/output error" \
    "$view" "$tmp/r.img"
assert_contains "$tmp/out" "\(FAILED\)$"
# What was done before the error is in the journal; the rest is not.
assert_contains "$tmp/err" "DST '$tmp/r.img' is incomplete: [0-9]+ of $view_size bytes done; the journal '$tmp/r.img.sparsebackup-journal' records it: run the same command again"
done=$(sed -n 's/^done //p' "$tmp/r.img.sparsebackup-journal")
[ "$done" -le $((1024 * K)) ] || fail "the journal says $done bytes are done"
filled "$tmp/d.img" P
expect_fail "read error on SRC" --delta --requests=64 --request-size=4K \
    "$view" "$tmp/d.img"
# A --delta over the interrupted full copy is refused.
expect_fail "--delta over an interrupted full copy from the same SRC: DST is not a previous backup" \
    --delta "$view" "$tmp/r.img"
rm "$tmp/fail-read"
touch "$tmp/fail-extents"
expect_fail "SRC: block status at offset 0 failed: Input/output error" \
    "$view" "$tmp/e.img"
rm "$tmp/fail-extents"
# The interrupted copy completes once the source reads again.
"$copy" -q "$view" "$tmp/r.img"
cmp "$tmp/src.img" "$tmp/r.img" || fail "the completed copy differs"
[ ! -e "$tmp/r.img.sparsebackup-journal" ] || fail "the journal was left"
kill -0 "$(cat "$tmp/pid.1")" || fail "the source server died"

# And after all that, the source still copies.
"$copy" -q "$view" "$tmp/ok.img"
cmp "$tmp/src.img" "$tmp/ok.img" || fail "copy after the errors differs"
