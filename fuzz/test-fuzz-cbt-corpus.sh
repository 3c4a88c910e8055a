#!/usr/bin/env bash
# Run the cbt loader fuzz harness (built without libFuzzer) over its seed
# corpus: it must exit 0 (no crash, sanitizer report or broken contract;
# see fuzz-cbt.c), run every seed, refuse bad-magic and load the others.
set -euo pipefail
srcdir=${srcdir:-$(dirname "$0")}
bin=./fuzz-cbt-standalone
corpus=$srcdir/cbt-corpus

[ -x "$bin" ] || { echo "$0: $bin not built" >&2; exit 1; }
log=$(mktemp "${TMPDIR:-/tmp}/fuzz-cbt-corpus.XXXXXX")
trap 'rm -f "$log"' EXIT

if ! "$bin" -v "$corpus" 2>"$log"; then
    tail -n 40 "$log" >&2
    echo "$0: FAIL: the harness failed" >&2
    exit 1
fi
nfiles=$(find "$corpus" -maxdepth 1 -type f ! -name '.*' | wc -l)
nok=$(grep -c '^fuzz-cbt: open: ok' "$log" || true)
nerr=$(grep -c '^fuzz-cbt: open: error' "$log" || true)
if [ "$nerr" -ne 1 ] || [ $((nok + nerr)) -ne "$nfiles" ]; then
    cat "$log" >&2
    echo "$0: FAIL: $nok loaded, $nerr refused of $nfiles (expected" \
         "all but bad-magic to load)" >&2
    exit 1
fi
echo "$0: $nfiles inputs, $nok loaded, $nerr refused"
