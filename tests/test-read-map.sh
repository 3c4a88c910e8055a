#!/usr/bin/env bash
# Issue 4: extents come from the allocation map.
#
# - Where the plugin reports extents (file plugin on a sparse file, memory
#   plugin), `nbdinfo --map` through the filter prints exactly what the
#   plugin prints on its own.
# - A thick (fully allocated) raw file is all data to the file plugin;
#   with sparsebackup-scan=always the filter reports its zero regions as
#   zero.  With the default scan=auto it does not scan (the plugin reports
#   extents), but over --filter=noextents (the layer below cannot report
#   extents) it does.  scan=never never scans.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-read-lib.sh"
requires nbdinfo --version
requires_nbdsh
requires_plugin file
requires_plugin memory
requires_filter noextents

size=$((4 * M))
layout="$((128 * K)):$((64 * K)) $M:$((256 * K)) $((3 * M + 64 * K)):$((64 * K)) $((4 * M - 64 * K)):$((64 * K))"

# map_through OUT NBDKIT-ARGS...: OUT gets the zero/data runs, OUT.text
# the literal `nbdinfo --map` output.
map_through ()
{
    local out=$1; shift
    start_nbdkit "$@"
    nbdinfo --map "$uri" > "$out.text"
    zmap "$uri" > "$out"
    stop_nbdkit
}

expect_zmap $size $layout > $tmp/expected
echo "0 $size data" > $tmp/alldata

# ---- 1. sparse file: the filter passes the plugin's map on exactly.
mk_sparse $tmp/sparse.img $size $layout
map_through $tmp/sparse.plain file $tmp/sparse.img
diff -u $tmp/expected $tmp/sparse.plain ||
    skip "the file plugin does not report the holes of $tmp/sparse.img"
cat $tmp/sparse.plain.text
# The plugin's own text: holes print as "hole,zero" (type 3), data as "data".
assert_contains $tmp/sparse.plain.text '^ +0 +131072 +3 +hole,zero$'
assert_contains $tmp/sparse.plain.text '^ +131072 +65536 +0 +data$'

for scan in auto always never; do
    map_through $tmp/sparse.$scan --filter=sparsebackup file $tmp/sparse.img \
                sparsebackup-scan=$scan
    if ! diff -u $tmp/sparse.plain.text $tmp/sparse.$scan.text; then
        fail "sparse file, scan=$scan: nbdinfo --map through the filter differs from the plugin's"
    fi
done

# ---- 2. memory plugin after writes through nbdsh: the same map with and
# without the filter.
write_script='
h.pwrite(b"\xa5" * 4096, 65536)
h.pwrite(b"\x5a" * 5000, 1048576 + 100)
h.pwrite(b"\x01" * 4096, 4194304 - 4096)
'
for f in plain filter; do
    if [ $f = plain ]; then start_nbdkit memory $size
    else start_nbdkit --filter=sparsebackup memory $size; fi
    nbdsh -u "$uri" -c "$write_script"
    nbdinfo --map "$uri" > $tmp/memory.$f.text
    stop_nbdkit
done
cat $tmp/memory.plain.text
# Sanity: the memory plugin reports its holes.
assert_contains $tmp/memory.plain.text '^ +0 +65536 +3 +hole,zero$'
if ! diff -u $tmp/memory.plain.text $tmp/memory.filter.text; then
    fail "memory plugin: nbdinfo --map through the filter differs from the plugin's"
fi

# ---- 3. thick file: all data to the file plugin.
mk_thick $tmp/thick.img $size $layout
cmp $tmp/sparse.img $tmp/thick.img
map_through $tmp/thick.plain file $tmp/thick.img
diff -u $tmp/alldata $tmp/thick.plain ||
    fail "the file plugin should report the thick file as all data"

# scan=auto with a plugin that reports extents: no scanning, all data.
map_through $tmp/thick.auto --filter=sparsebackup file $tmp/thick.img
diff -u $tmp/alldata $tmp/thick.auto ||
    fail "thick file, scan=auto over the file plugin: expected all data (no scan)"

# scan=always: the zero regions are found.
map_through $tmp/thick.always --filter=sparsebackup file $tmp/thick.img \
            sparsebackup-scan=always
cat $tmp/thick.always.text
diff -u $tmp/expected $tmp/thick.always ||
    fail "thick file, scan=always: zero regions not reported as zero"
# The literal text: zero regions print as "zero" or "hole,zero", data
# regions as "data" (never "hole" alone).
assert_contains $tmp/thick.always.text '^ +0 +131072 +(2 +zero|3 +hole,zero)$'
assert_contains $tmp/thick.always.text '^ +131072 +65536 +0 +data$'
if grep -E ' (1 +hole)$' $tmp/thick.always.text; then
    fail "thick file, scan=always: a region reported as hole without zero"
fi

# Smaller scan-max: several extents requests, the same answer.
map_through $tmp/thick.small --filter=sparsebackup file $tmp/thick.img \
            sparsebackup-scan=always sparsebackup-scan-max=256K
diff -u $tmp/expected $tmp/thick.small ||
    fail "thick file, scan=always, scan-max=256K: wrong map"

# scan=auto over a layer that cannot report extents: it scans.
map_through $tmp/thick.noext --filter=sparsebackup --filter=noextents \
            file $tmp/thick.img
diff -u $tmp/expected $tmp/thick.noext ||
    fail "thick file, scan=auto over noextents: zero regions not reported as zero"

# scan=never over the same: all data.
map_through $tmp/thick.never --filter=sparsebackup --filter=noextents \
            file $tmp/thick.img sparsebackup-scan=never
diff -u $tmp/alldata $tmp/thick.never ||
    fail "thick file, scan=never: expected all data"

# The contents are unchanged by all this.
start_nbdkit --filter=sparsebackup file $tmp/thick.img sparsebackup-scan=always
nbdcopy "$uri" $tmp/copy.img
cmp $tmp/thick.img $tmp/copy.img
stop_nbdkit

echo "$0: OK"
