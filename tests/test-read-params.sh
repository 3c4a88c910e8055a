#!/usr/bin/env bash
# The read-side parameters: bad values are refused at start-up with a
# message naming the key and the bad value; good values are accepted.
source "${srcdir:-.}/functions.sh"
requires nbdkit --version
requires_plugin null
requires_filter sparsebackup

# refused KEY=VALUE: nbdkit must fail to start, naming KEY and VALUE.
refused ()
{
    local kv=$1 key=${1%%=*} value=${1#*=} status=0
    nbdkit -U - --filter=sparsebackup null 1M "$kv" --run true \
           >$tmp/out 2>$tmp/err || status=$?
    cat $tmp/out $tmp/err
    [ $status -ne 0 ] || fail "$kv was accepted"
    # The filter's messages say "KEY: 'VALUE' ..." (an empty VALUE as '').
    grep -F -q -- "$key: '$value'" $tmp/err ||
        fail "$kv: the error does not say \"$key: '$value'\""
    # Refused by the filter, not passed on to the plugin as unknown.
    if grep -q 'unknown parameter' $tmp/err; then
        fail "$kv: passed on to the plugin instead of being checked by the filter"
    fi
}

# accepted KEY=VALUE...: nbdkit starts and serves.
accepted ()
{
    nbdkit -U - --filter=sparsebackup null 1M "$@" --run 'nbdinfo --size "$uri"' \
           >$tmp/out 2>$tmp/err ||
        { cat $tmp/out $tmp/err; fail "$* was refused"; }
    assert_eq 1048576 "$(cat $tmp/out)" "size with $*"
}

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
