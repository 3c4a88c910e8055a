#!/usr/bin/env bash
# The shell in which test-doc-examples.sh runs the examples of one
# document, one after the other, as a reader types them into one shell:
# what one example starts in the background (a server) stays up for the
# next ones.  (Debian 12's nbdkit 1.32.5 stops when the process that
# started it exits, so one shell per example would not do.)
#
# Started in the document's directory, as a session leader (setsid).
# Prints "ready PID", then reads lines "N BLOCK OUT ERR TRACE" on stdin:
# runs the file BLOCK in this shell (stdin /dev/null, stdout OUT,
# stderr ERR, its commands traced to TRACE), stopped at the first
# command that fails as under `set -e -o pipefail`, and prints
# "N STATUS".  Its own variables start with __ so that the examples' do
# not clash with them.
echo "ready $$"
set -o pipefail
while IFS=' ' read -r __n __block __out __err __trace; do
    exec 9>"$__trace"
    BASH_XTRACEFD=9
    __rc=0
    # As set -e, but returning from the example instead of exiting.
    trap '__rc=$?; trap - ERR; return $__rc' ERR
    set -x
    . "$__block" </dev/null >"$__out" 2>"$__err"
    { set +x; } 2>/dev/null
    trap - ERR
    exec 9>&-
    echo "$__n $__rc"
done
