#!/usr/bin/env bash
# The in-tree wrapper resolves --filter=sparsebackup (both spellings) and
# the plugin name qcow2 to the built .so files, and leaves everything else
# (option arguments, key=value, a plugin named qcow2 elsewhere) alone.
source "${srcdir:-.}/functions.sh"
requires nbdinfo

filter_so="$abs_top_builddir/filters/sparsebackup/.libs/nbdkit-sparsebackup-filter.so"
plugin_so="$abs_top_builddir/plugins/qcow2/.libs/nbdkit-qcow2-plugin.so"
[ -f "$filter_so" ] || fail "$filter_so was not built"
# The qcow2 plugin is always built.
[ -f "$plugin_so" ] || fail "$plugin_so was not built"

for spelling in "--filter=sparsebackup" "--filter sparsebackup"; do
    # shellcheck disable=SC2086
    out=$(nbdkit $spelling null 1M --dump-plugin)
    grep -q "^path=.*/nbdkit-null-plugin.so$" <<< "$out" ||
        fail "$spelling: null plugin not loaded"
    out=$(nbdkit $spelling null --help 2>&1)
    grep -q "^($filter_so)$" <<< "$out" ||
        { echo "$out"; fail "$spelling: did not load $filter_so"; }
done

# An option argument that happens to say "qcow2" is not the plugin name.
out=$(nbdkit -U - -e qcow2 memory 1M --run 'nbdinfo --json "$uri"')
grep -q '"export-name": "qcow2"' <<< "$out" ||
    fail "-e qcow2 was rewritten"

# The plugin name qcow2 is resolved to the built plugin (a bare name would
# make nbdkit look in its own plugin directory).
out=$(nbdkit qcow2 --dump-plugin)
grep -qx "path=$plugin_so" <<< "$out" ||
    { echo "$out"; fail "qcow2 not resolved to $plugin_so"; }
