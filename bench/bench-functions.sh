# Shared set-up and timing helpers for the benchmark scripts
# (bench/bench-*.sh).  Source it first; it sources tests/functions.sh
# (which gives $tmp, start_nbdkit, requires, fail, allocated, ...; and
# set -e -u -o pipefail), with $srcdir the tests directory, so that a
# benchmark can also source e.g. "$srcdir/test-read-lib.sh":
#
#   source "$(dirname "$0")/bench-functions.sh"
#   need nbdcopy qemu-nbd
#   t=$(time1 nbdcopy src.img "$uri")          # seconds of one run
#   m=$(timeit 5 nbdcopy src.img "$uri")       # median of 5 runs
#   ratio "$m_with" "$m_without"               # 1.012
#
# Everything a timed command prints on stdout goes to stderr, so that
# $(time1 ...) and $(timeit ...) capture the number only.  Do not start
# servers inside $(...): a subshell does not run the exit cleanup.

: "${abs_top_srcdir:=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
srcdir="$abs_top_srcdir/tests"
source "$srcdir/functions.sh"

# need CMD...: skip the benchmark (exit 77) unless every CMD is on $PATH.
need ()
{
    local c
    for c in "$@"; do
        command -v "$c" >/dev/null 2>&1 || {
            echo "$0: SKIP: $c is not installed" >&2
            exit 77
        }
    done
}

# now: seconds since the epoch, nanosecond resolution.
now ()
{
    date +%s.%N
}

# time1 CMD [ARGS...]: run CMD once, print its wall-clock seconds.  Fails
# (returns CMD's status) if CMD fails.
time1 ()
{
    local t0 t1 r=0
    t0=$(now)
    "$@" >&2 || r=$?
    t1=$(now)
    [ "$r" -eq 0 ] || { echo "$0: '$*' failed (status $r)" >&2; return "$r"; }
    awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.4f\n", b - a}'
}

# median X...: the median of the numbers.
median ()
{
    printf '%s\n' "$@" | sort -g |
        awk '{a[NR] = $1}
             END {if (NR == 0) exit 1;
                  if (NR % 2) print a[(NR + 1) / 2];
                  else printf "%.4f\n", (a[NR / 2] + a[NR / 2 + 1]) / 2}'
}

# timeit N CMD [ARGS...]: run CMD N times, print the median seconds.  If
# $TIMEIT_SETUP is set, it is eval'd (untimed) before each run.
timeit ()
{
    local n="$1" i t times=()
    shift
    for (( i = 0; i < n; i++ )); do
        if [ -n "${TIMEIT_SETUP:-}" ]; then eval "$TIMEIT_SETUP" >&2; fi
        t=$(time1 "$@") || return 1
        times+=("$t")
    done
    median "${times[@]}"
}

# ratio A B: A / B with three decimals (B = 0 prints "inf").
ratio ()
{
    awk -v a="$1" -v b="$2" \
        'BEGIN {if (b == 0) print "inf"; else printf "%.3f\n", a / b}'
}

# elapsed T0 [T1]: seconds from T0 to T1 (default: now), as printed by now.
elapsed ()
{
    awk -v a="$1" -v b="${2:-$(now)}" 'BEGIN {printf "%.3f\n", b - a}'
}

# start_qemu_nbd QEMU-NBD-ARGS...: start qemu-nbd in the background on a
# private Unix socket and wait until it listens.  Sets $uri and
# $qemu_pid.  The server is killed at exit; call stop_qemu_nbd (in the
# same shell) to stop it earlier.  (Not --fork: a daemonised qemu-nbd
# takes about a second to exit on SIGTERM.)
start_qemu_nbd ()
{
    local sock="$tmp/qemu-nbd.sock" pidfile="$tmp/qemu-nbd.pid" i
    rm -f "$sock" "$pidfile"
    # The pid file appears once the socket listens; the socket file
    # alone appears at bind(), when a connection is still refused.
    qemu-nbd -k "$sock" --pid-file="$pidfile" "$@" &
    qemu_pid=$!
    cleanup_fn "kill $qemu_pid 2>/dev/null"
    for (( i = 0; i < 1000; i++ )); do
        [ ! -s "$pidfile" ] || break
        kill -0 "$qemu_pid" 2>/dev/null ||
            fail "qemu-nbd $* exited during start-up"
        sleep 0.01
    done
    [ -s "$pidfile" ] || fail "qemu-nbd $* did not start listening on $sock"
    uri="nbd+unix:///?socket=$sock"
}

# stop_qemu_nbd: stop the server started by start_qemu_nbd and wait for
# it to exit.
stop_qemu_nbd ()
{
    kill "$qemu_pid" 2>/dev/null || true
    wait "$qemu_pid" 2>/dev/null || true
}
