#!/usr/bin/env bash
# qcow2 plugin: parameters.  Bad values are refused with the key named;
# a tiny L2 cache (one slice) with many parallel readers still gives the
# right content; the plugin is read-only and advertises multi-conn,
# extents and the cluster size as preferred block size; -D qcow2.verbose.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy nbdinfo
cd "$tmp"

qemu-img create -q -f qcow2 -o cluster_size=4k d.qcow2 64M
qemu-io -f qcow2 -c 'write -P 0x5a 0 20M' -c 'write -P 0x5b 40M 3M' \
    d.qcow2 >/dev/null
qemu-img convert -O raw d.qcow2 ref.raw

nbdkit_refuses 'you must supply the file=' qcow2 backing=false
nbdkit_refuses 'backing' qcow2 d.qcow2 backing=maybe
nbdkit_refuses 'l2-cache-size' qcow2 d.qcow2 l2-cache-size=100
nbdkit_refuses 'l2-cache-size' qcow2 d.qcow2 l2-cache-size=banana
nbdkit_refuses 'max-depth' qcow2 d.qcow2 max-depth=0
nbdkit_refuses 'max-depth' qcow2 d.qcow2 max-depth=17
nbdkit_refuses "unknown parameter 'foo'" qcow2 d.qcow2 foo=bar
nbdkit_refuses 'nosuchfile.qcow2: open: No such file' qcow2 nosuchfile.qcow2

# Magic config key: the bare file name works.
nbdkit -U - qcow2 d.qcow2 l2-cache-size=4k \
    --run 'nbdcopy --connections=4 --requests=16 "$uri" out.raw'
cmp out.raw ref.raw

nbdkit -U - qcow2 file=d.qcow2 --run 'nbdinfo --json "$uri"' > info.json
cat info.json
assert_contains info.json '"is_read_only": true'
assert_contains info.json '"can_multi_conn": true'
assert_contains info.json '"export-size": 67108864'
assert_contains info.json '"block_size_preferred": 4096'
assert_contains info.json 'base:allocation'

# Writes are refused.
rc=0
nbdkit -U - qcow2 file=d.qcow2 --run 'nbdcopy ref.raw "$uri"' 2>err || rc=$?
[ "$rc" -ne 0 ] || fail "write accepted"

# Debug output.
nbdkit -U - -f -v -D qcow2.verbose=1 qcow2 file=d.qcow2 \
    --run 'nbdinfo --map "$uri" >/dev/null' 2>err
assert_contains err 'layer 0: .*d.qcow2: qcow2 v3, size 67108864, cluster 4096'
assert_contains err 'L2 cache 256 slices of 4096 bytes, [0-9]+ hits, [0-9]+ misses'

# --help names the parameters.
nbdkit qcow2 --help > help
for p in file= backing= max-depth= l2-cache-size= data-file=; do
    assert_contains help "$p"
done

# ... laid out like nbdkit's own plugins (nbdkit file --help): each line
# KEY=<PLACEHOLDER> (the magic key as [file=]), the description starting
# with a capital letter at the same column as theirs (23).
sed -n '/^\[file=\]/,$p' help > help-params
[ "$(wc -l < help-params)" -eq 5 ] || fail "expected 5 parameter lines"
while IFS= read -r line; do
    [[ $line =~ ^(\[[a-z0-9-]+=\]|[a-z0-9-]+=)\<[A-Z]+\>\ +[A-Z] ]] ||
        fail "help line not in nbdkit's KEY=<VALUE> style: '$line'"
    col=$(( $(expr "$line" : '[^ ]* *') + 1 ))
    [ "$col" -eq 23 ] ||
        fail "help description at column $col, not 23: '$line'"
done < help-params

# --dump-plugin shows the build's features and the project version.
nbdkit qcow2 --dump-plugin > dump
version=$(sed -n 's/^PACKAGE_VERSION = //p' "$abs_top_builddir/Makefile")
[ -n "$version" ] || fail "no PACKAGE_VERSION in the top Makefile"
assert_contains dump "^qcow2_version=$version\$"
for key in qcow2_zlib=yes qcow2_zstd=yes qcow2_extended_l2=yes \
           qcow2_external_data_file=yes qcow2_max_depth=16 \
           'qcow2_zlib_version=[0-9.]+$' 'qcow2_zstd_version=[0-9.]+$'; do
    assert_contains dump "^$key"
done
