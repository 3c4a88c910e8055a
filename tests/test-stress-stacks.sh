#!/usr/bin/env bash
# A random stress of the filter in the stacks users build, against a byte
# model (stress-stacks.py): several connections, writes, zero requests
# (NO_HOLE, FAST_ZERO, FUA), trims, reads, block status and cache
# requests, over each of nbdkit's filters that cache, split, shift,
# hide or fail requests, and over the nbd plugin to a second nbdkit, with
# the sparsebackup filter above it and below it.
#
# Deterministic per seed: the seed is printed; run again with
#   STRESS_SEED=N [STRESS_STACKS=ERE] [STRESS_OPS=N] make check TESTS=test-stress-stacks.sh
# (STRESS_STACKS selects stacks by their label, e.g. 'cache=writeback').
# STRESS_NOFILTER=1 runs the same stacks without the sparsebackup filter:
# the reference, to tell the filter's defects from those of the stack.
# Each stack gets its own seed derived from N, and its scan mode (auto
# or always) from it too.  Without STRESS_SEED a new seed is drawn.
#
# The error stacks inject errors with nbdkit's error filter at
# error-rate=100% only while a trigger file exists: the helper creates
# it around a few requests chosen by the seed (a low, deterministic
# error rate).  A failed write or zero request makes its bytes
# undefined in the model, and at least one error must reach the client.
source "${srcdir:-.}/functions.sh"
requires_nbdsh
requires_filter sparsebackup
for f in cache cow readahead blocksize blocksize-policy offset noextents \
         nozero retry error; do
    requires_filter $f
done
requires_plugin nbd

seed=${STRESS_SEED:-$(( (RANDOM << 15 | RANDOM) % 1000000 ))}
ops=${STRESS_OPS:-400}
select=${STRESS_STACKS:-}
echo "$0: seed $seed (rerun: STRESS_SEED=$seed)"

helper=$_functions_dir/stress-stacks.py
size=1M

# LABEL|FILTER-ARGS|HELPER-ARGS: the filter (with its parameters) put
# below or above the sparsebackup filter.  "nbd" is the nbd plugin to a
# second nbdkit; "error" triggers errors through $tmp/error-trigger.
stacks=(
    "cache=writethrough|--filter=cache cache=writethrough|"
    "cache=writeback|--filter=cache cache=writeback|"
    "cache=unsafe|--filter=cache cache=unsafe|"
    "cow|--filter=cow|"
    "readahead|--filter=readahead|"
    "blocksize|--filter=blocksize minblock=4K maxdata=32K maxlen=64K|"
    "blocksize-policy|--filter=blocksize-policy blocksize-minimum=512 blocksize-preferred=4K blocksize-maximum=1M blocksize-error-policy=error|--align 512"
    "offset|--filter=offset offset=12K range=$size|"
    "noextents|--filter=noextents|"
    "nozero=none|--filter=nozero zeromode=none|"
    "nozero=emulate|--filter=nozero zeromode=emulate|"
    "retry|--filter=retry|"
    "error|--filter=error error-rate=100% error-file=$tmp/error-trigger|--error-file $tmp/error-trigger --expect-errors"
    "nbd||"
)

n=0 ran=0
for stack in "${stacks[@]}"; do
    IFS='|' read -r label fargs hargs <<< "$stack"
    for where in below above; do
        n=$((n + 1))
        name="sparsebackup $where $label"
        if [ -n "$select" ] && ! [[ $name =~ $select ]]; then continue; fi
        s=$(( (seed * 1103515245 + n * 12345) & 0x7fffffff ))
        scan=auto
        [ $(( (s >> 16) & 1 )) -eq 1 ] && scan=always
        # The memory plugin (sparse, 32K pages) or a file (holes of the
        # file system's blocks), by the seed.
        if [ "${STRESS_PLUGIN:-$(( (s >> 17) & 1 ))}" = 1 ]; then
            rm -f "$tmp/disk"
            truncate -s "$size" "$tmp/disk"
            [ "$label" = offset ] && truncate -s 2M "$tmp/disk"
            plugin=(file "$tmp/disk")
        else
            plugin=(memory "$size")
            [ "$label" = offset ] && plugin=(memory 2M)
        fi
        sb=(--filter=sparsebackup sparsebackup-scan=$scan)
        [ -n "${STRESS_NOFILTER:-}" ] && sb=()
        # shellcheck disable=SC2206
        f=($fargs)
        if [ "$label" = nbd ]; then
            # The nbd plugin to a second nbdkit; the filter in the outer
            # server (above) or in the inner one (below).
            if [ $where = below ]; then
                start_nbdkit "${sb[@]:0:1}" "${plugin[@]}" "${sb[@]:1}"
            else
                start_nbdkit "${plugin[@]}"
            fi
            inner=$sock inner_pid=$pid
            if [ $where = above ]; then
                start_nbdkit "${sb[@]:0:1}" nbd socket="$inner" "${sb[@]:1}"
            else
                start_nbdkit nbd socket="$inner"
            fi
        elif [ $where = above ]; then
            # Client -> sparsebackup -> FILTER -> plugin.
            start_nbdkit "${sb[@]:0:1}" "${f[0]}" "${plugin[@]}" \
                "${f[@]:1}" "${sb[@]:1}"
        else
            # Client -> FILTER -> sparsebackup -> plugin.
            start_nbdkit "${f[0]}" "${sb[@]:0:1}" "${plugin[@]}" \
                "${f[@]:1}" "${sb[@]:1}"
        fi
        rm -f "$tmp/error-trigger"
        # nbdkit's cache filter in writeback and unsafe mode reports the
        # extents of the layer below while the data is only in its cache
        # (wrong without the filter too): over the filter, no ZERO check.
        args=$hargs
        case "$where $label" in
            "below cache=writeback"|"below cache=unsafe")
                args+=" --no-zero-check" ;;
            # The error filter above the filter sees every request.
            "below error") args+=" --errors-always" ;;
            # nbdkit 1.32's retry filter retries a fast zero refused
            # with ENOTSUP (5 times, 62 seconds): no fast zeros there.
            *" retry") args+=" --no-fast-zero" ;;
        esac
        # shellcheck disable=SC2086
        if ! "$nbd_python" "$helper" --sock "$sock" --seed $s --ops "$ops" \
                --label "$name (${plugin[0]}, scan=$scan)" $args; then
            echo "--- server log:" >&2
            tail -n 30 "$server_log" >&2
            fail "$name: rerun with STRESS_SEED=$seed STRESS_STACKS='$name\$'"
        fi
        stop_nbdkit
        [ "$label" = nbd ] && stop_nbdkit "$inner_pid"
        ran=$((ran + 1))
    done
done
[ $ran -gt 0 ] || fail "STRESS_STACKS='$select' selects no stack"
echo "$0: $ran stacks, seed $seed: OK"
