#!/usr/bin/env bash
# Run the control protocol fuzz harness (built without libFuzzer) over
# its seed corpus: it must exit 0 (no crash, sanitizer report or broken
# contract; see fuzz-ctl.c) and run every seed.
set -euo pipefail
srcdir=${srcdir:-$(dirname "$0")}
bin=./fuzz-ctl-standalone
corpus=$srcdir/ctl-corpus

[ -x "$bin" ] || { echo "$0: $bin not built" >&2; exit 1; }
log=$(mktemp "${TMPDIR:-/tmp}/fuzz-ctl-corpus.XXXXXX")
trap 'rm -f "$log"' EXIT

if ! "$bin" -v "$corpus" 2>"$log"; then
    tail -n 40 "$log" >&2
    echo "$0: FAIL: the harness failed" >&2
    exit 1
fi
nfiles=$(find "$corpus" -maxdepth 1 -type f ! -name '.*' | wc -l)
nrun=$(grep -c "^fuzz: running .*$(basename "$corpus")/" "$log" || true)
if [ "$nrun" -ne "$nfiles" ]; then
    cat "$log" >&2
    echo "$0: FAIL: $nrun of $nfiles inputs run" >&2
    exit 1
fi
echo "$0: $nfiles inputs run"
