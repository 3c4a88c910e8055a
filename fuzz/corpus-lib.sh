# Shared by the corpus tests (test-fuzz-*-corpus.sh): source it, then
#   run_corpus BIN CORPUS-DIR
# runs the standalone harness BIN with -v over every file of CORPUS-DIR
# (the harness's messages in $log) and fails the test unless it exits 0
# and ran every file; sets $nfiles.
set -euo pipefail
log=$(mktemp "${TMPDIR:-/tmp}/fuzz-corpus.XXXXXX")
trap 'rm -f "$log"' EXIT

run_corpus ()
{
    local bin=$1 corpus=$2 nrun
    [ -x "$bin" ] || { echo "$0: $bin not built" >&2; exit 1; }
    if ! "$bin" -v "$corpus" 2>"$log"; then
        tail -n 40 "$log" >&2
        echo "$0: FAIL: the harness failed" >&2
        exit 1
    fi
    nfiles=$(find "$corpus" -maxdepth 1 -type f ! -name '.*' | wc -l)
    nrun=$(grep -c "^fuzz: running " "$log" || true)
    if [ "$nrun" -ne "$nfiles" ]; then
        cat "$log" >&2
        echo "$0: FAIL: $nrun of $nfiles inputs run" >&2
        exit 1
    fi
}
