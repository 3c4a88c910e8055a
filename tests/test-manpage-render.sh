#!/usr/bin/env bash
# Both man pages render cleanly the way an installed page is read
# (man -l, in the C locale and in a UTF-8 one):
#  - no stray "X" where the POD has a non-ASCII glyph such as E<ge>
#    (what pod2man prints for it without --utf8);
#  - the examples run the installed nbdkit: "./nbdkit" (the build tree's
#    wrapper) never appears as a command, and the page says how to run
#    them uninstalled (the README's PATH line).
source "${srcdir:-.}/functions.sh"
requires man

pages=(
    "$abs_top_builddir/filters/sparsebackup/nbdkit-sparsebackup-filter.1"
    "$abs_top_builddir/plugins/qcow2/nbdkit-qcow2-plugin.1"
)
locales=(C)
if locale -a 2>/dev/null | grep -qix 'C\.utf-\?8'; then
    locales+=(C.UTF-8)
fi

for page in "${pages[@]}"; do
    [ -s "$page" ] || fail "$page was not built"
    name=$(basename "$page")
    for loc in "${locales[@]}"; do
        out="$tmp/$name.$loc"
        LC_ALL=$loc MANWIDTH=80 man -l "$page" > "$out" 2> "$tmp/err" ||
            { cat "$tmp/err"; fail "man -l $page failed ($loc)"; }
        [ ! -s "$tmp/err" ] ||
            { cat "$tmp/err"; fail "man -l $page warned ($loc)"; }
        assert_contains "$out" '^NAME'
        # A lone X between words is pod2man's stand-in for a glyph.
        if grep -nE '(^|[[:space:]])X([[:space:]]|[.,;:]|$)' "$out"; then
            fail "$name ($loc): stray X in place of a glyph"
        fi
    done
    assert_contains "$tmp/$name.C" 'uninstalled'
    if grep -nE '^[[:space:]]+\./nbdkit ' "$tmp/$name.C"; then
        fail "$name: an example runs ./nbdkit instead of nbdkit"
    fi
done

# The glyph of the qcow2 page (E<ge>) is rendered, in each locale.
# (man justifies lines: the words may be more than one space apart, as
# with groff 1.23 of Debian 13.)
qcow2=nbdkit-qcow2-plugin.1
assert_contains "$tmp/$qcow2.C" 'nbdkit +>= +1\.32'
if [ -f "$tmp/$qcow2.C.UTF-8" ]; then
    assert_contains "$tmp/$qcow2.C.UTF-8" $'nbdkit +\xe2\x89\xa5 +1\\.32'
fi
