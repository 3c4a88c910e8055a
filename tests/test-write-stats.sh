#!/usr/bin/env bash
# Issue 3: the statistics written by sparsebackup-statsfile=FILE at unload
# (doc/design.md, "Statistics") after a known sequence of writes and
# zero requests: every key present once, decimal, and the write-side
# counters exact.

source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-write-lib.sh"
requires_nbdpy
requires_plugin file

size=$((4 << 20))
tgt="$tmp/target.img"
new_target "$tgt" "$size"
stats="$tmp/stats"
# noextents: the filter cannot learn the target's holes from its extents
# (test-write-target.sh does), so the counters below are exact.
start_nbdkit -v -D sparsebackup.stats=1 --filter=sparsebackup \
    --filter=noextents file "$tgt" sparsebackup-statsfile="$stats"

"$nbdpy" - "$uri" <<'EOF' || { cat "$server_log" >&2; exit 1; }
import sys
from wlib import *

h = connect(sys.argv[1])
# write-data-bytes: 3 blocks + 10 bytes + 1 block + 1 block = 20490
h.pwrite(data(3 * B), 0)                      # 12288 data
h.pwrite(data(10), 8 * B + 5)                 # 10 data
# data | 2 zero blocks | data: 8192 data, 8192 write-zero (zero requests)
h.pwrite(data(B) + zeros(2 * B) + data(B), 16 * B)
# A client zero request over unknown blocks: 64 KiB passed to the plugin.
h.zero(16 * B, 64 * B)
# The same twice more: skipped, 2 * 64 KiB zero-skipped, 2 requests avoided.
h.zero(16 * B, 64 * B)
h.zero(16 * B, 64 * B)
# A zero write over known-zero blocks: skipped too (counts as write-zero
# and zero-skipped).
h.pwrite(zeros(4 * B), 68 * B)
# Reads of known-zero blocks: answered from the map.
check(h.pread(8 * B, 64 * B) == zeros(8 * B), "not zero")
h.flush()
h.shutdown()
EOF

stop_nbdkit
[ -s "$stats" ] || { cat "$server_log" >&2; fail "no statistics file $stats"; }
echo "--- $stats:"
cat "$stats"

keys="write-data-bytes write-zero-bytes zero-bytes zero-skipped-bytes
requests-avoided read-bytes read-map-bytes read-cache-bytes
plugin-read-bytes scan-bytes extents-calls map-runs map-memory"

declare -A v
for k in $keys; do
    n=$(grep -c -E "^$k: " "$stats" || true)
    [ "$n" = 1 ] || fail "key $k appears $n times in the statistics"
    v[$k]=$(sed -n -E "s/^$k: (.*)$/\1/p" "$stats")
    [[ "${v[$k]}" =~ ^[0-9]+$ ]] || fail "$k: '${v[$k]}' is not decimal"
done
# Nothing else than "key: value" lines, and the one human summary line.
if grep -v -E '^[a-z-]+: [0-9]+$' "$stats" | grep -v '^summary: '; then
    fail "lines above are not 'key: decimal'"
fi

assert_eq 20490 "${v[write-data-bytes]}" "write-data-bytes"
assert_eq $((8192 + 16384)) "${v[write-zero-bytes]}" "write-zero-bytes"
assert_eq $((8192 + 65536)) "${v[zero-bytes]}" "zero-bytes"
assert_eq $((2 * 65536 + 16384)) "${v[zero-skipped-bytes]}" "zero-skipped-bytes"
[ "${v[requests-avoided]}" -ge 3 ] ||
    fail "requests-avoided: ${v[requests-avoided]}, expected >= 3 (three" \
         "skipped zero requests and a read answered from the map)"
assert_eq 32768 "${v[read-bytes]}" "read-bytes"
assert_eq 32768 "${v[read-map-bytes]}" "read-map-bytes"
assert_eq 0 "${v[plugin-read-bytes]}" "plugin-read-bytes (the only read was of known-zero blocks)"
assert_eq 0 "${v[scan-bytes]}" "scan-bytes"
assert_eq 0 "${v[read-cache-bytes]}" "read-cache-bytes"
[ "${v[map-runs]}" -ge 3 ] || fail "map-runs: ${v[map-runs]}, expected >= 3"
[ "${v[map-memory]}" -gt 0 ] || fail "map-memory: 0"

# -D sparsebackup.stats=1 prints the same at unload (nbdkit_debug, -v).
assert_contains "$server_log" "write-data-bytes.*20490"

# One human summary line, binary units, in the file and in the log.
summary="summary: sparsebackup: saved 32.0 KiB of 32.0 KiB read and 24.0 KiB of 44.0 KiB written: client reads answered 32.0 KiB from the map, 0 B from the scan cache, 0 B read from the plugin; 20.0 KiB of data written to the plugin, 24.0 KiB of zero blocks as zero requests; 72.0 KiB zeroed by the plugin, 144.0 KiB of zeroing skipped"
assert_eq "$summary" "$(grep '^summary: ' "$stats")" "summary line"
assert_contains "$server_log" "${summary#summary: }"

# A statistics file that cannot be created fails at start-up, naming it.
# (Under the sanitizer build's ASan preload, nbdkit 1.32.5 hangs in its
# exit handlers after any start-up error that printed a strerror text --
# `nbdkit file /no/such` does the same -- so there the timeout's 124
# counts as a refusal; see README "Known issues".)
rc=0
timeout 20 nbdkit -U - --filter=sparsebackup memory 1M \
    sparsebackup-statsfile="$tmp/no/such/dir/stats" --run true \
    > "$tmp/bad.log" 2>&1 || rc=$?
[ "$rc" -ne 0 ] ||
    fail "sparsebackup-statsfile in a missing directory was accepted"
[ "$rc" -ne 124 ] || [ -n "${SANITIZERS:-}" ] ||
    fail "nbdkit hung after refusing sparsebackup-statsfile"
assert_contains "$tmp/bad.log" \
    "sparsebackup-statsfile: cannot open '$tmp/no/such/dir/stats'"

# Failing to write it at exit never exits 0 (/dev/full: every write
# fails).  (With --run, nbdkit's exit status is the command's.)
nbdkit -f -U "$tmp/full.sock" -P "$tmp/full.pid" --filter=sparsebackup \
    memory 1M sparsebackup-statsfile=/dev/full > "$tmp/full.log" 2>&1 &
full_pid=$!
# (SIGTERM only once it serves: earlier, it would die of it before its
# handler is set, without writing anything)
for _ in $(seq 600); do [ -s "$tmp/full.pid" ] && break; sleep 0.1; done
[ -s "$tmp/full.pid" ] ||
    { cat "$tmp/full.log" >&2; fail "nbdkit did not start within 60 s"; }
kill -TERM "$full_pid"
full_rc=0
wait "$full_pid" || full_rc=$?
[ "$full_rc" -ne 0 ] ||
    fail "nbdkit exited 0 although the statistics could not be written"
assert_contains "$tmp/full.log" "sparsebackup-statsfile: cannot write '/dev/full'"

echo "$0: OK"
