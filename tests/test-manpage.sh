#!/usr/bin/env bash
# The man pages are built from POD and render with man -l.
source "${srcdir:-.}/functions.sh"
requires man

# render PAGE: PAGE was built and renders; the text is in $tmp/out.
render ()
{
    [ -s "$1" ] || fail "$1 was not built"
    MANWIDTH=80 man -l "$1" > "$tmp/out" 2>"$tmp/err" ||
        { cat "$tmp/err"; fail "man -l $1 failed"; }
    assert_contains "$tmp/out" '^NAME'
}

render "$abs_top_builddir/filters/sparsebackup/nbdkit-sparsebackup-filter.1"
assert_contains "$tmp/out" 'nbdkit-sparsebackup-filter - '
assert_contains "$tmp/out" 'nbdkit --filter=sparsebackup'
assert_contains "$tmp/out" '^PARAMETERS'

# The qcow2 plugin is always built: its page must be there too.
render "$abs_top_builddir/plugins/qcow2/nbdkit-qcow2-plugin.1"
assert_contains "$tmp/out" 'nbdkit-qcow2-plugin - '
assert_contains "$tmp/out" 'nbdkit (-U - )?qcow2 file='
