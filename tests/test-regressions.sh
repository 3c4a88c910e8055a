#!/usr/bin/env bash
# Regressions found in review:
#  - detect-zeroes=on promises allocation: zero blocks of a write must be
#    zeroed (without MAY_TRIM) even where the map knows a zero hole;
#  - a REQ_ONE block status request scans no further than its one extent.
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_filter sparsebackup
requires_filter log

# detect-zeroes=on over a known-zero hole.
truncate -s 1M "$tmp/on.img"
nbdkit -U - --filter=sparsebackup --filter=log file "$tmp/on.img" \
       sparsebackup-detect-zeroes=on logfile="$tmp/on.log" \
       --run 'nbdinfo --map "$uri" >/dev/null &&
              nbdsh -u "$uri" -c "h.pwrite(bytes(1048576), 0)"'
grep -E 'Zero id=[0-9]+ offset=0x0 count=0x100000 trim=0 ' "$tmp/on.log" ||
    { cat "$tmp/on.log"; fail "detect-zeroes=on did not zero the known-zero range"; }
alloc=$(allocated "$tmp/on.img")
[ "$alloc" -ge 1048576 ] ||
    fail "detect-zeroes=on left $alloc bytes allocated, expected 1M"
cmp "$tmp/on.img" <(head -c 1M /dev/zero) || fail "contents"

# REQ_ONE over data: one scan chunk (2M) at most, not sparsebackup-scan-max.
head -c 48M /dev/urandom > "$tmp/data.img"
nbdkit -U - --filter=sparsebackup file "$tmp/data.img" \
       sparsebackup-scan=always sparsebackup-statsfile="$tmp/stats" \
       --run 'nbdsh --base-allocation -u "$uri" -c "
seen = []
h.block_status(32 * 1024 * 1024, 0,
               lambda ctx, off, e, err: seen.extend(e), nbd.CMD_FLAG_REQ_ONE)
assert len(seen) == 2 and seen[1] == 0, seen
"'
scanned=$(sed -n 's/^scan-bytes: //p' "$tmp/stats")
[ "$scanned" -le $((2 * 1024 * 1024)) ] ||
    fail "one REQ_ONE request scanned $scanned bytes"
echo "REQ_ONE scanned $scanned bytes"
