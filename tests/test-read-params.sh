#!/usr/bin/env bash
# The read-side parameters: bad values are refused at start-up with a
# message naming the key and the bad value; good values are accepted.
source "${srcdir:-.}/functions.sh"
requires nbdkit --version
requires_plugin null
requires_filter sparsebackup
requires nbdinfo --version

refused sparsebackup-scan=bogus
refused sparsebackup-scan=ALWAYS
refused sparsebackup-scan=
refused sparsebackup-scan-max=junk
refused sparsebackup-scan-max=-1
refused sparsebackup-scan-max=1K          # smaller than the block size (4096)
refused sparsebackup-scan-cache=-1
refused sparsebackup-scan-cache=lots
refused sparsebackup-no-hole=maybe
refused sparsebackup-no-hole=1

accepted sparsebackup-scan=auto
accepted sparsebackup-scan=always
accepted sparsebackup-scan=never
accepted sparsebackup-scan-max=4096
accepted sparsebackup-scan-max=32M
accepted sparsebackup-scan-max=1G
accepted sparsebackup-scan-cache=0
accepted sparsebackup-scan-cache=64M
accepted sparsebackup-no-hole=honour
accepted sparsebackup-no-hole=ignore
accepted sparsebackup-scan=always sparsebackup-scan-max=1M \
         sparsebackup-scan-cache=2M sparsebackup-statsfile=$tmp/stats.txt
# The statistics file is written at unload.
[ -s $tmp/stats.txt ] || fail "sparsebackup-statsfile: nothing written"
grep -E -q '^scan-bytes: [0-9]+$' $tmp/stats.txt ||
    { cat $tmp/stats.txt; fail "statsfile lacks scan-bytes"; }

echo "$0: OK"
