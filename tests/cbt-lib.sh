# Helpers of the changed-block tracking tests (test-cbt-filter*.sh).
# Source after functions.sh.
#
#   ctl ARGS...                 sparsebackup-ctl on $ctlsock
#   cbt_ops SOCK SEED N OUT EXPORT...
#                               N random writes, zeros and trims through
#                               connections to each EXPORT (one connection
#                               per export, used in turn); the byte ranges
#                               written or trimmed appended to OUT, those
#                               zeroed to OUT.zero (the filter skips a zero
#                               request over known zeros: no change)
#   log_ranges LOG OUT          the ranges of every Write, Zero and Trim
#                               the log filter saw (request lines, whether
#                               or not they completed), appended to OUT
#   view_data SOCK EXPORT OUT   the ranges of EXPORT's extents that are
#                               not HOLE-only (block_status), to OUT
#   covers GRAN TRUTH SET       fail unless every granule touched by a
#                               range of TRUTH is in a range of SET
#   view_holes SOCK EXPORT PREV [EXPORT PREV]...
#                               fail unless every HOLE-only extent of
#                               EXPORT (a delta view) reads as the same
#                               bytes of PREV (the previous backup, raw)
#                               and every ZERO extent reads as zeros;
#                               prints "HOLE-BYTES ZERO-BYTES" checked
#                               (one line per EXPORT)

# The Python parts import nbdlib.py (next to functions.sh).
export PYTHONPATH="$_functions_dir${PYTHONPATH:+:$PYTHONPATH}"

ctl_bin=$abs_top_builddir/tools/ctl/sparsebackup-ctl
ctl () { "$ctl_bin" "$ctlsock" "$@"; }

cat > "$tmp/cbt_ops.py" <<'PY'
import nbd, random, sys
sock, seed, n, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
names = sys.argv[5:]
rng = random.Random(seed)
hs = []
for name in names:
    h = nbd.NBD(); h.set_export_name(name); h.connect_unix(sock); hs.append(h)
size = hs[0].get_size()
with open(out, "a") as f, open(out + ".zero", "a") as z:
    for i in range(n):
        h = hs[i % len(hs)]
        count = rng.choice([1, 512, 4096, 65536, 100000, 300000])
        off = rng.randrange(0, size - count)
        kind = rng.random()
        if kind < 0.6:
            h.pwrite(bytes([rng.randrange(1, 256)]) * count, off)
        elif kind < 0.8:
            h.zero(count, off)
            z.write("%d %d\n" % (off, count))
            continue
        else:
            h.trim(count, off)
        f.write("%d %d\n" % (off, count))
for h in hs:
    h.shutdown()
PY

cat > "$tmp/view_data.py" <<'PY'
import nbd, sys
from nbdlib import connect, extents
sock, name, out = sys.argv[1], sys.argv[2], sys.argv[3]
h = connect(sock, name)
with open(out, "w") as f:
    for o, n, t in extents(h):
        if t != nbd.STATE_HOLE:
            f.write("%d %d\n" % (o, n))
PY

cat > "$tmp/covers.py" <<'PY'
import sys
gran = int(sys.argv[1])
truth = [tuple(map(int, l.split())) for l in open(sys.argv[2]) if l.strip()]
have = set()
for l in open(sys.argv[3]):
    if l.strip():
        o, n = map(int, l.split())
        have.update(range(o // gran, (o + n + gran - 1) // gran))
missing = sorted({g for o, n in truth if n > 0
                  for g in range(o // gran, (o + n - 1) // gran + 1)} - have)
if missing:
    print("granules changed but not reported: %s" % missing[:20])
    sys.exit(1)
PY

cat > "$tmp/view_holes.py" <<'PY'
import nbd, sys
from nbdlib import connect, extents

def check(sock, name, prev):
    h = connect(sock, name)
    ents = extents(h)
    hole = zero = 0
    with open(prev, "rb") as p:
        for o, n, t in ents:
            if t == 0:
                continue
            for c in range(o, o + n, 1 << 22):
                m = min(1 << 22, o + n - c)
                data = h.pread(m, c)
                if t & nbd.STATE_ZERO:
                    if data.count(0) != m:
                        sys.exit("%s: the ZERO extent at %d (+%d) does not "
                                 "read as zero (near %d)" % (name, o, n, c))
                    zero += m
                else:
                    p.seek(c)
                    if data != p.read(m):
                        sys.exit("%s: the HOLE-only extent at %d (+%d) "
                                 "differs from %s (near %d): a change "
                                 "reported as unchanged" % (name, o, n, prev, c))
                    hole += m
    h.shutdown()
    print("%d %d" % (hole, zero))

for i in range(2, len(sys.argv), 2):
    check(sys.argv[1], sys.argv[i], sys.argv[i + 1])
PY

cbt_ops () { "$nbd_python" "$tmp/cbt_ops.py" "$@"; }
view_data () { "$nbd_python" "$tmp/view_data.py" "$@"; }
covers () { python3 "$tmp/covers.py" "$@" || fail "$2 is not covered by $3"; }
view_holes () { "$nbd_python" "$tmp/view_holes.py" "$@" || fail "$2...: a HOLE-only extent differs from the previous backup or a ZERO extent is not zero"; }
log_ranges ()
{
    sed -n 's/.* \(Write\|Zero\|Trim\) id=[0-9]* offset=\(0x[0-9a-f]*\) count=\(0x[0-9a-f]*\) .*/\2 \3/p' "$1" |
        while read -r o c; do echo "$((o)) $((c))"; done >> "$2"
}
