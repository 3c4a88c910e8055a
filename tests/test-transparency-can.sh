#!/usr/bin/env bash
# Issue 19, defect 2: the filter asks the layers below what they can do,
# always.  Filters below set themselves up in their own can_* callbacks
# (nbdkit's readahead filter only prefetches once its can_cache has been
# called), and nbdkit's test-layers checks that every can_* reaches every
# layer.
#
# 1. The can_* callbacks that reach a plugin (the sh plugin logs them)
#    while a client connects: with the filter, at least those that reach
#    it without the filter.
# 2. nbdkit's readahead filter below the filter prefetches: a client
#    reading 512 bytes at a time sees readahead's cache requests of the
#    following 32K reach the plugin (nbdkit's test-readahead.sh, with the
#    filter above readahead).
# 3. Over a layer that cannot zero at all (nbdkit's nozero filter,
#    zeromode=none), the filter does not advertise zero either
#    (nbdkit's test-nozero.sh, libnbd's can-not-zero-flag): the zero
#    blocks of client writes are still skipped when known zero.
#
# (The sh scripts unset LD_PRELOAD: under --enable-sanitizers the wrapper
# preloads libasan into nbdkit, and dd aborts under it.)
source "${srcdir:-.}/functions.sh"
requires nbdinfo --version
requires_nbdsh
requires_plugin sh
requires_filter readahead
requires_filter nozero
requires dd iflag=count_bytes </dev/null

# ---- 1. can_* reach the plugin
cat > "$tmp/caps.sh" <<'EOF'
unset LD_PRELOAD
echo "$1" >> "$calls"
case "$1" in
    get_size) echo 1M ;;
    thread_model) echo parallel ;;
    can_write|can_extents|can_trim|can_flush|can_zero|can_fast_zero) exit 0 ;;
    can_cache) echo native ;;
    can_fua) echo native ;;
    pread) dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    pwrite) cat > /dev/null ;;
    trim|zero|flush|cache) exit 0 ;;
    extents) echo "0 1M hole,zero" ;;
    *) exit 2 ;;
esac
EOF
chmod +x "$tmp/caps.sh"
export calls
for with in without with; do
    calls=$tmp/calls.$with
    : > "$calls"
    sb=()
    [ $with = with ] && sb=(--filter=sparsebackup)
    nbdkit -U - "${sb[@]}" sh "$tmp/caps.sh" \
           --run 'nbdinfo "$uri" >/dev/null' ||
        fail "nbdinfo $with the filter"
    grep '^can_' "$calls" | sort -u > "$tmp/can.$with"
done
echo "can_* reaching the plugin without the filter: $(tr '\n' ' ' < "$tmp/can.without")"
echo "can_* reaching the plugin with the filter:    $(tr '\n' ' ' < "$tmp/can.with")"
missing=$(comm -23 "$tmp/can.without" "$tmp/can.with" | tr '\n' ' ')
[ -z "$missing" ] ||
    fail "the filter does not ask the plugin: $missing"

# ---- 2. readahead below the filter prefetches
cat > "$tmp/ra.sh" <<'EOF'
unset LD_PRELOAD
case "$1" in
    block_size) echo 512 512 512 ;;
    thread_model) echo parallel ;;
    can_cache) echo native ;;
    get_size) echo 1M ;;
    cache) echo "$@" >> "$ralog" ;;
    pread)
        echo "$@" >> "$ralog"
        dd if=/dev/zero count=$3 iflag=count_bytes status=none ;;
    *) exit 2 ;;
esac
EOF
chmod +x "$tmp/ra.sh"
export ralog=$tmp/readahead.log
: > "$ralog"
start_nbdkit --filter=sparsebackup --filter=readahead sh "$tmp/ra.sh"
nbdsh -u "$uri" -c '
for i in range(0, 512 * 10, 512):
    h.pread(512, i)
'
# readahead prefetches in a background thread: wait (bounded) for it.
for (( i = 0; i < 300; i++ )); do
    ok=1
    for (( off = 512; off <= 512 * 10; off += 512 )); do
        grep -q "^cache  32768 $off\$" "$ralog" || { ok=; break; }
    done
    [ -n "$ok" ] && break
    sleep 0.1
done
stop_nbdkit
if [ -z "$ok" ]; then
    cat "$ralog" >&2
    fail "readahead below the filter did not prefetch (no 'cache 32768 $off')"
fi

# ---- 3. no zero over a layer that cannot zero
for with in without with; do
    sb=()
    [ $with = with ] && sb=(--filter=sparsebackup)
    rc=0
    nbdkit -U - "${sb[@]}" --filter=nozero memory 1M zeromode=none \
           --run 'nbdinfo --can zero "$uri"' || rc=$?
    echo "nbdinfo --can zero $with the filter over nozero zeromode=none: $rc"
    case $with:$rc in
        without:2) ;;
        without:*) skip "nozero zeromode=none advertises zero (status $rc)" ;;
        with:2) ;;
        *) fail "the filter advertises zero over a layer that cannot zero" ;;
    esac
done
echo "$0: OK"
