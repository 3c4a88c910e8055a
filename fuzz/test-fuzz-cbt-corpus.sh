#!/usr/bin/env bash
# Run the cbt loader fuzz harness (built without libFuzzer) over its seed
# corpus: it must exit 0 (no crash, sanitizer report or broken contract;
# see fuzz-cbt.c), run every seed, refuse bad-magic and load the others.
srcdir=${srcdir:-$(dirname "$0")}
source "$srcdir/corpus-lib.sh"
run_corpus ./fuzz-cbt-standalone "$srcdir/cbt-corpus"
nok=$(grep -c '^fuzz-cbt: open: ok' "$log" || true)
nerr=$(grep -c '^fuzz-cbt: open: error' "$log" || true)
if [ "$nerr" -ne 1 ] || [ $((nok + nerr)) -ne "$nfiles" ]; then
    cat "$log" >&2
    echo "$0: FAIL: $nok loaded, $nerr refused of $nfiles (expected" \
         "all but bad-magic to load)" >&2
    exit 1
fi
echo "$0: $nfiles inputs, $nok loaded, $nerr refused"
