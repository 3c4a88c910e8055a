# Helpers for the shell tests.  Source it from a test:
#
#   source "${srcdir:-.}/functions.sh"
#   requires nbdcopy qemu-img
#   start_nbdkit --filter=sparsebackup memory 1M     # sets $uri, $sock, $pid
#   ...
#
# Every test gets a private temporary directory $tmp that is removed on
# exit, together with any server started by start_nbdkit.  A test that
# cannot run prints why and exits 77, which automake reports as SKIP.

set -e
set -u
set -o pipefail

# The directory of this file and of the helpers next to it (extents.py).
_functions_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

# make check sets both; a test run by hand from the source tree uses the
# build of scripts/setup, _build/.
: "${abs_top_srcdir:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
if [ -z "${abs_top_builddir:-}" ]; then
    abs_top_builddir=$abs_top_srcdir
    if [ -x "$abs_top_srcdir/_build/nbdkit" ]; then
        abs_top_builddir=$abs_top_srcdir/_build
    fi
fi
export PATH="$abs_top_builddir:$PATH"

# Never let the system's locale change tools' messages.
export LC_ALL=C

tmp=$(mktemp -d "${TMPDIR:-/tmp}/sparsebackup-test.XXXXXX")
export tmp
_cleanup_cmds=()

# Register a command to run at exit (last registered runs first).
cleanup_fn ()
{
    _cleanup_cmds+=("$*")
}

_run_cleanup ()
{
    local status=$? i
    set +e
    for (( i=${#_cleanup_cmds[@]}-1; i>=0; i-- )); do
        eval "${_cleanup_cmds[$i]}"
    done
    rm -rf "$tmp"
    exit $status
}
trap _run_cleanup EXIT
trap 'exit 130' INT TERM

# $nbd_python: a python3 that has libnbd's nbd module (python3-libnbd),
# empty if there is none.  nbdsh runs "python3" from $PATH: where another
# python3 (pyenv, a venv) comes first and lacks the module, put this one
# first on $PATH (as $tmp/pybin/python3, so that nothing else changes).
nbd_python=
for _p in python3 /usr/bin/python3 /bin/python3 /usr/local/bin/python3; do
    if _p=$(command -v "$_p") && "$_p" -c 'import nbd' >/dev/null 2>&1; then
        nbd_python=$_p
        break
    fi
done
unset _p
if [ -n "$nbd_python" ] &&
        [ "$nbd_python" != "$(command -v python3 || true)" ]; then
    mkdir -p "$tmp/pybin"
    ln -sf "$nbd_python" "$tmp/pybin/python3"
    export PATH="$tmp/pybin:$PATH"
fi

# Skip the test (exit 77) with a printed reason.
skip ()
{
    echo "$0: SKIP: $*" >&2
    exit 77
}

# Fail the test with a message.
fail ()
{
    echo "$0: FAIL: $*" >&2
    exit 1
}

# requires CMD [ARGS...]: skip unless the command exists (and, when ARGS
# are given, runs successfully with them, e.g. `requires qemu-img --version`).
requires ()
{
    if ! command -v "$1" >/dev/null 2>&1; then
        skip "$1 is not installed"
    fi
    if [ $# -gt 1 ] && ! "$@" >/dev/null 2>&1; then
        skip "'$*' failed"
    fi
}

# requires_nbdsh: skip unless nbdsh works (python3 has the nbd module).
requires_nbdsh ()
{
    requires nbdsh --version
    [ -n "$nbd_python" ] || skip "python3 cannot import nbd"
}

# requires_plugin NAME / requires_filter NAME: skip unless the nbdkit
# plugin or filter can be loaded by the nbdkit that tests use.
requires_plugin ()
{
    nbdkit "$1" --dump-plugin >/dev/null 2>&1 ||
        skip "nbdkit plugin '$1' is not available"
}
requires_filter ()
{
    nbdkit --filter="$1" null --dump-plugin >/dev/null 2>&1 ||
        skip "nbdkit filter '$1' is not available"
}

# assert_eq EXPECTED ACTUAL [WHAT]
assert_eq ()
{
    if [ "$1" != "$2" ]; then
        echo "expected: $1" >&2
        echo "actual:   $2" >&2
        fail "${3:-values differ}"
    fi
}

# assert_contains FILE PATTERN: FILE (or stdin if FILE is -) contains the
# extended regular expression PATTERN.
assert_contains ()
{
    if ! grep -E -q -- "$2" "$1"; then
        echo "--- $1:" >&2
        cat "$1" >&2 || true
        fail "'$1' does not contain /$2/"
    fi
}

# failed_cleanly STATUS WHAT [ERRFILE]: a command that had to fail (its
# stderr in ERRFILE, default $tmp/err) failed with exit status STATUS, not
# by a signal and without a sanitizer report, assertion or core dump.
failed_cleanly ()
{
    local rc=$1 what=$2 err=${3:-$tmp/err}
    if [ "$rc" -eq 0 ]; then fail "$what: succeeded"; fi
    if [ "$rc" -ge 128 ]; then cat "$err" >&2; fail "$what: killed by a signal"; fi
    if grep -E -q 'Sanitizer|runtime error|Assertion|core dumped' "$err"; then
        cat "$err" >&2; fail "$what: crash report"
    fi
}

# nbdkit_refuses ERE NBDKIT-ARGS...: `nbdkit -U - NBDKIT-ARGS --run true`
# refuses to start, cleanly (see failed_cleanly), with a message matching
# the extended regular expression ERE.  Its stderr is left in $tmp/err.
# The wait is bounded: under the sanitizer build's ASan preload, nbdkit
# 1.32.5 hangs in its exit handlers after a start-up error whose message
# carries a strerror text (README, "Known issues"), so there a timeout
# after the message counts as the refusal; elsewhere a hang fails.
nbdkit_refuses ()
{
    local re=$1 rc=0
    shift
    timeout -k 5 30 nbdkit -U - "$@" --run true >"$tmp/out" 2>"$tmp/err" ||
        rc=$?
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        [ -n "${SANITIZERS:-}" ] ||
            fail "nbdkit $*: still running 30 s after it was to refuse"
        echo "nbdkit $*: hung after its start-up error (the ASan preload): stopped"
        rc=1
    fi
    failed_cleanly $rc "nbdkit $*"
    echo "refused: $*: $(cat "$tmp/err")"
    assert_contains "$tmp/err" "$re"
}

# refused KEY=VALUE: the filter (over null 1M) refuses the parameter at
# start-up, itself (not passing it on to the plugin as unknown), with its
# usual message "KEY: 'VALUE' ..." (an empty VALUE shows as '').
refused ()
{
    local key=${1%%=*} value=${1#*=}
    nbdkit_refuses "$(ere_quote "$key: '$value'")" \
        --filter=sparsebackup null 1M "$1"
    if grep -q 'unknown parameter' "$tmp/err"; then
        fail "$1: passed on to the plugin instead of being checked by the filter"
    fi
}

# accepted KEY=VALUE...: the filter (over null 1M) starts with these
# parameters and serves the 1M disk.
accepted ()
{
    nbdkit -U - --filter=sparsebackup null 1M "$@" \
           --run 'nbdinfo --size "$uri"' >"$tmp/out" 2>"$tmp/err" ||
        { cat "$tmp/out" "$tmp/err" >&2; fail "$* was refused"; }
    assert_eq 1048576 "$(cat "$tmp/out")" "size with $*"
}

# ere_quote STRING: STRING as an extended regular expression matching
# itself.
ere_quote ()
{
    printf '%s\n' "$1" | sed 's/[][\.*^$+?(){}|]/\\&/g'
}

# start_nbdkit [NBDKIT-ARGS...]: start nbdkit in the background on a
# private Unix socket.  Sets $sock, $pid, $uri and $server_log (the
# server's stderr).  The server is killed by its own pid at exit; call
# stop_nbdkit to stop it earlier (e.g. to read statistics written at exit).
_servers=0
start_nbdkit ()
{
    _servers=$((_servers + 1))
    sock="$tmp/sock.$_servers"
    local pidfile="$tmp/pid.$_servers"
    server_log="$tmp/server.$_servers.log"
    nbdkit -f -U "$sock" -P "$pidfile" "$@" 2>"$server_log" &
    local i
    # (60 s: under the sanitizer build on a loaded machine a start-up
    # takes seconds)
    for (( i = 0; i < 600; i++ )); do
        if [ -s "$pidfile" ] && [ -S "$sock" ]; then break; fi
        if ! kill -0 $! 2>/dev/null; then
            cat "$server_log" >&2
            fail "nbdkit $* exited during start-up"
        fi
        sleep 0.1
    done
    [ -s "$pidfile" ] || { cat "$server_log" >&2; fail "nbdkit did not start"; }
    pid=$(cat "$pidfile")
    uri="nbd+unix:///?socket=$sock"
    cleanup_fn "kill $pid 2>/dev/null; _wait_pid $pid"
}

_wait_pid ()
{
    local i
    for (( i = 0; i < 100; i++ )); do
        kill -0 "$1" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -9 "$1" 2>/dev/null || true
}

# stop_nbdkit [PID]: stop a server started by start_nbdkit and wait for it
# to exit (so that anything it writes at unload is complete: statistics,
# messages).  One that has not exited 120 s after SIGTERM fails the test
# (killed first): what it writes at exit would be missing.  Under the
# sanitizer build's ASan preload, nbdkit 1.32.5 may hang in its exit
# handlers after it has unloaded (after a message with a strerror text,
# README "Known issues"): there, a server still running 10 s after
# SIGTERM is killed, as before, with a note of its threads' states.
stop_nbdkit ()
{
    local p="${1:-$pid}" i
    kill "$p" 2>/dev/null || true
    for (( i = 0; i < 1200; i++ )); do
        kill -0 "$p" 2>/dev/null || return 0
        if [ -n "${SANITIZERS:-}" ] && [ $i -ge 100 ]; then
            echo "nbdkit (pid $p): still running 10 s after SIGTERM under the ASan preload (threads: $(_thread_states "$p")): killed"
            kill -9 "$p" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
    kill -9 "$p" 2>/dev/null || true
    fail "nbdkit (pid $p) did not exit within 120 s of SIGTERM"
}

# _thread_states PID: the state letter of each thread of PID (R running,
# S sleeping, D disk wait...).
_thread_states ()
{
    local t
    for t in /proc/"$1"/task/*/stat; do
        sed 's/.*) //' "$t" 2>/dev/null | cut -d' ' -f1
    done | sort | uniq -c | tr -s ' \n' ' '
}

# wait_until SECONDS WHAT COMMAND...: run COMMAND every 0.1 s until it
# succeeds; fail, saying WHAT was waited for, if it has not within
# SECONDS.
wait_until ()
{
    local secs=$1 what=$2 i
    shift 2
    for (( i = 0; i < secs * 10; i++ )); do
        "$@" && return 0
        sleep 0.1
    done
    "$@" || fail "$what: not within $secs s"
}

# allocated FILE: bytes allocated on disk.
allocated ()
{
    du -B1 "$1" | cut -f1
}

# data_bytes FILE: bytes in data extents according to SEEK_DATA/SEEK_HOLE.
data_bytes ()
{
    python3 "$_functions_dir/extents.py" "$1"
}
