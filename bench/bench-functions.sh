# Shared timing helpers for the benchmark scripts (bench/bench-*.sh).
# Source it after tests/functions.sh (which gives $tmp, start_nbdkit, ...):
#
#   source "$abs_top_srcdir/tests/functions.sh"
#   source "$abs_top_srcdir/bench/bench-functions.sh"
#   need nbdcopy qemu-nbd
#   t=$(time1 nbdcopy src.img "$uri")          # seconds of one run
#   m=$(timeit 5 nbdcopy src.img "$uri")       # median of 5 runs
#   ratio "$m_with" "$m_without"               # 1.012
#
# Everything a timed command prints on stdout goes to stderr, so that
# $(time1 ...) and $(timeit ...) capture the number only.  Do not start
# servers inside $(...): a subshell does not run the exit cleanup.

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
    echo "$t1 - $t0" | bc -l | awk '{printf "%.4f\n", $1}'
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
