#!/usr/bin/env bash
# Run the control protocol fuzz harness (built without libFuzzer) over
# its seed corpus: it must exit 0 (no crash, sanitizer report or broken
# contract; see fuzz-ctl.c) and run every seed.
srcdir=${srcdir:-$(dirname "$0")}
source "$srcdir/corpus-lib.sh"
run_corpus ./fuzz-ctl-standalone "$srcdir/ctl-corpus"
echo "$0: $nfiles inputs run"
