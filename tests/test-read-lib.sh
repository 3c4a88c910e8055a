# Helpers shared by the read-side tests (tests/test-read-*.sh).
# Source it after functions.sh:
#
#   source "${srcdir:-.}/functions.sh"
#   source "${srcdir:-.}/test-read-lib.sh"
#
# Not a test itself (it is only in EXTRA_DIST).  (requires_nbdsh, the
# python3 that has the nbd module, data_bytes and allocated are in
# functions.sh.)

# Every read-side test (and bench-read-*.sh) needs nbdkit and the filter.
requires nbdkit --version
requires_filter sparsebackup

K=1024; M=$((1024 * 1024))

# The directory of make-disk.py, absolute (bench/ sources this file too).
read_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# mk_sparse FILE SIZE [OFF:LEN ...]: a sparse file of SIZE bytes whose
# only data (pseudo-random, the same for the same offset, no all-zero
# 256-byte stretch: see make-disk.py) is at the given ranges; everything
# else is a hole.  Skips the test if the file system does not
# keep holes.
mk_sparse ()
{
    python3 "$read_lib_dir/make-disk.py" "$@"
    local want=0 r
    for r in "${@:3}"; do want=$((want + ${r#*:})); done
    local got
    got=$(data_bytes "$1")
    [ "$got" -le $((want + 65536 * ($# - 1))) ] ||
        skip "file system of $tmp does not keep holes ($got data bytes, $want written)"
}

# mk_thick FILE SIZE [OFF:LEN ...]: the same contents as mk_sparse, but
# every byte is allocated (zeros written with dd, then the data).
mk_thick ()
{
    local f=$1 size=$2
    dd if=/dev/zero of="$f" bs=65536 count=$((size / 65536)) status=none
    python3 "$read_lib_dir/make-disk.py" --thick "$@"
    [ "$(data_bytes "$f")" -eq "$size" ] ||
        skip "file system of $tmp made holes in a file written with dd"
}

# expect_zmap SIZE [OFF:LEN ...]: the expected output of zmap (below) for a
# disk whose data is exactly at the given (sorted, disjoint) ranges.
expect_zmap ()
{
    python3 - "$@" <<'PY'
import sys
size = int(sys.argv[1])
runs = []
pos = 0
def add(off, ln, t):
    if ln <= 0: return
    if runs and runs[-1][2] == t:
        runs[-1][1] += ln
    else:
        runs.append([off, ln, t])
for r in sys.argv[2:]:
    off, ln = (int(x) for x in r.split(':'))
    add(pos, off - pos, 'zero')
    add(off, ln, 'data')
    pos = off + ln
add(pos, size - pos, 'zero')
for o, l, t in runs:
    print(o, l, t)
PY
}

# _zmap_json: read a JSON list of extents on stdin (nbdinfo --map --json
# or qemu-img map --output=json) and print merged runs "OFFSET LENGTH
# zero|data" by the ZERO bit alone (so "zero" and "hole,zero" are alike;
# "hole" without "zero" is data).
_zmap_json ()
{
    python3 -c '
import json, sys
runs = []
pos = 0
for e in json.load(sys.stdin):
    if "type" in e:                       # nbdinfo
        off, ln, z = e["offset"], e["length"], bool(e["type"] & 2)
    else:                                 # qemu-img map
        off, ln, z = e["start"], e["length"], bool(e["zero"])
    if off != pos:
        sys.exit("extents not contiguous at %d (expected %d)" % (off, pos))
    pos = off + ln
    t = "zero" if z else "data"
    if runs and runs[-1][2] == t:
        runs[-1][1] += ln
    else:
        runs.append([off, ln, t])
for o, l, t in runs:
    print(o, l, t)
'
}

# zmap URI: the map of URI (nbdinfo --map) by the ZERO bit alone.
zmap ()
{
    nbdinfo --map --json "$1" | _zmap_json
}

# qemu_zmap URI: the same map as seen by qemu (REQ_ONE block status).
qemu_zmap ()
{
    qemu-img map --output=json -f raw "$1" | _zmap_json
}

# log_reads LOG START END [CONNECTION]: print the Read requests logged by
# nbdkit-log-filter(1) in LOG that overlap the byte range [START, END),
# optionally only those of connection number CONNECTION.
log_reads ()
{
    python3 - "$@" <<'PY'
import re, sys
log, start, end = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
conn = sys.argv[4] if len(sys.argv) > 4 else None
pat = re.compile(r'connection=(\d+) Read id=\d+ offset=0x([0-9a-f]+) count=0x([0-9a-f]+) ')
for line in open(log, errors='replace'):
    m = pat.search(line)
    if not m:
        continue
    if conn is not None and m.group(1) != conn:
        continue
    off, cnt = int(m.group(2), 16), int(m.group(3), 16)
    if off < end and off + cnt > start:
        print(line.rstrip())
PY
}

# log_read_bytes LOG: the total bytes of the Read requests logged by
# nbdkit-log-filter(1) in LOG.
log_read_bytes ()
{
    log_reads "$1" 0 $((1 << 62)) | sed 's/.* count=0x\([0-9a-f]*\) .*/\1/' |
        { local t=0 c; while read -r c; do t=$((t + 16#$c)); done; echo $t; }
}

# stats_bytes STATSFILE OP: the bytes of operation OP ("read", "write",
# "zero", "extents", ...) in a nbdkit-stats-filter(1) statsfile, e.g.
# "read: 2 ops, 0.000283 s, 512.00 KiB, ..." -> 524288 (0 if absent).
# The filter prints 2 decimals of the unit, so this is approximate to
# 0.5% of the unit.
stats_bytes ()
{
    python3 - "$@" <<'PY'
import re, sys
f, op = sys.argv[1], sys.argv[2]
units = {"bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
         "TiB": 1 << 40, "PiB": 1 << 50, "EiB": 1 << 60}
for line in open(f):
    m = re.match(r'^%s: (\d+) ops, [0-9.]+ s, ([0-9.]+) (\w+)' % re.escape(op), line)
    if m:
        print(int(round(float(m.group(2)) * units[m.group(3)])))
        break
else:
    print(0)
PY
}

# sb_stat STATSFILE KEY: a value from the filter's
# sparsebackup-statsfile=FILE ("key: value" lines).  Fails the test if the
# key is missing.
sb_stat ()
{
    local v
    v=$(sed -n "s/^$2: *\([0-9][0-9]*\) *\$/\1/p" "$1" | head -1)
    if [ -z "$v" ]; then
        echo "--- $1:" >&2
        cat "$1" >&2 || true
        fail "statistics key '$2' missing from $1"
    fi
    echo "$v"
}

# assert_le A B WHAT: integers A <= B.
assert_le ()
{
    [ "$1" -le "$2" ] || fail "${3:-}: expected $1 <= $2"
}
