#!/usr/bin/env bash
# Run the qcow2 fuzz harness (built without libFuzzer) over the seed
# corpus: it must exit 0 (no crash, no sanitizer report, no broken
# library contract; see fuzz-qcow2.c), run every seed, and open or refuse
# the seeds listed in corpus.expect as expected.
set -euo pipefail
srcdir=${srcdir:-$(dirname "$0")}
bin=./fuzz-qcow2-standalone
corpus=$srcdir/corpus
expect=$srcdir/corpus.expect

[ -x "$bin" ] || { echo "$0: $bin not built" >&2; exit 1; }
[ -d "$corpus" ] || { echo "$0: $corpus missing" >&2; exit 1; }

log=$(mktemp "${TMPDIR:-/tmp}/fuzz-corpus.XXXXXX")
trap 'rm -f "$log"' EXIT

status=0
"$bin" -v "$corpus" >"$log.out" 2>"$log" || status=$?
cat "$log.out"
rm -f "$log.out"
if [ $status -ne 0 ]; then
    tail -n 40 "$log" >&2
    echo "$0: FAIL: the harness exited with status $status" >&2
    exit 1
fi

nfiles=$(find "$corpus" -maxdepth 1 -type f ! -name '.*' | wc -l)
nrun=$(grep -c '^fuzz: running ' "$log" || true)
if [ "$nrun" -ne "$nfiles" ] || [ "$nrun" -eq 0 ]; then
    echo "$0: FAIL: $nrun inputs run, $nfiles files in $corpus" >&2
    exit 1
fi

# NAME BACKING RESULT for each input.
results=$(awk '
    /^fuzz: running / { n = $3; sub(/.*\//, "", n); b = "?"; r = "none" }
    /^fuzz-qcow2: options: backing=/ { b = $3; sub(/backing=/, "", b) }
    /^fuzz-qcow2: open: ok/ { r = "ok" }
    /^fuzz-qcow2: open: error/ { r = "error" }
    /^fuzz-qcow2: open: / { print n, b, r }
' "$log")

fail=0
while read -r name want; do
    case "$name" in ''|'#'*) continue ;; esac
    line=$(grep "^$name " <<<"$results" || true)
    if [ -z "$line" ]; then
        echo "$0: FAIL: $name (listed in corpus.expect) was not run" >&2
        fail=1
        continue
    fi
    read -r _ backing got <<<"$line"
    case "$want" in
        ok|error) ;;
        error-if-backing)
            if [ "$backing" = 1 ]; then want=error; else continue; fi ;;
        *) echo "$0: bad outcome '$want' in corpus.expect" >&2; exit 1 ;;
    esac
    if [ "$got" != "$want" ]; then
        echo "$0: FAIL: $name: expected open $want, got $got:" >&2
        awk -v f="$name" '/^fuzz: running / { p = index($0, "/" f " ") > 0 }
                          p' "$log" | grep 'open: ' >&2 || true
        fail=1
    fi
done < "$expect"
[ $fail -eq 0 ] || exit 1

# The bitmap parser on the bitmap seeds: SEED PATTERN (a line the
# harness prints for that seed, in verbose mode).
while read -r name pat; do
    if ! awk -v f="$name" '/^fuzz: running / { p = index($0, "/" f " ") > 0 }
                           p' "$log" | grep -E -q -- "$pat"; then
        echo "$0: FAIL: $name: no line matching /$pat/" >&2
        fail=1
    fi
done <<'EOF'
q-bitmaps.qcow2 bitmap 'fine': 1 layers, granularity 512
q-bitmaps.qcow2 bitmap 'merged': 1 layers, granularity 512
q-bitmaps.qcow2 bitmap 'off': .* is disabled
q-bitmap-chain.qcow2 bitmap 'ck': 2 layers, granularity 512
c-bitmap-inuse.qcow2 bitmap 'b0': .*take a full backup instead
c-bitmap-ones.qcow2 bitmap 'b0': 1 layers
c-bitmap-badentry.qcow2 bitmap 'b0': .*reserved bits are set
EOF
[ $fail -eq 0 ] || exit 1

echo "$0: $nrun inputs, $(grep -c ' ok$' <<<"$results") opened," \
     "$(grep -c ' error$' <<<"$results") refused"
