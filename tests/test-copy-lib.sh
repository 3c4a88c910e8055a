# Helpers shared by the test-copy-*.sh tests (sparsebackup-copy).  Not a
# test itself: source it after functions.sh:
#
#   source "${srcdir:-.}/functions.sh"
#   source "${srcdir:-.}/test-copy-lib.sh"
#   start_view                  # eval source over $tmp/src.img + $tmp/map
#   "$copy" "$uri" "$tmp/out.img"
#   expect_image delta "$tmp/prev.img" "$tmp/expected.img"
#   cmp "$tmp/expected.img" "$tmp/out.img"

copy="$abs_top_builddir/tools/sparsebackup-copy"
[ -x "$copy" ] || fail "$copy was not built"
requires_plugin eval

# The view: every kind of extent over known contents, odd size (the last
# block is partial), more than one request of 256K per extent.
#   offset     length  flags       contents
K=1024
view_map=(
    "0          256K    data        A"
    "256K       256K    hole        B"
    "512K       256K    hole,zero   0"
    "768K       256K    zero        0"
    "1M         300K    data        C"
    "1324K      724K    hole        D"
    "2M         1000    data        E"
)
view_size=$((2 * 1024 * K + 1000))
# What a copy of it must report.
full_copied=$((256 * K + 256 * K + 300 * K + 724 * K + 1000))
delta_copied=$((256 * K + 300 * K + 1000))
view_zeroed=$((512 * K))
delta_skipped=$((256 * K + 724 * K))

# _size N[K|M]: bytes.
_size ()
{
    case "$1" in
        *K) echo $(( ${1%K} * 1024 )) ;;
        *M) echo $(( ${1%M} * 1024 * 1024 )) ;;
        *) echo "$1" ;;
    esac
}

# make_view: write $tmp/src.img and $tmp/map (lines "offset length flags"
# as the eval extents method prints them).
make_view ()
{
    local line off len flags fill
    : > "$tmp/map"
    rm -f "$tmp/src.img"
    truncate -s "$view_size" "$tmp/src.img"
    for line in "${view_map[@]}"; do
        read -r off len flags fill <<< "$line"
        off=$(_size "$off"); len=$(_size "$len")
        case "$flags" in data) flags= ;; esac
        echo "$off $len $flags" >> "$tmp/map"
        if [ "$fill" != 0 ]; then
            head -c "$len" /dev/zero | tr '\0' "$fill" |
                dd of="$tmp/src.img" bs=64K seek="$off" oflag=seek_bytes \
                   conv=notrunc status=none
        fi
    done
}

# start_view [NBDKIT-OPTIONS...]: make the view and serve it (as $view, and
# $uri, $pid... as start_nbdkit sets them) with the eval
# plugin: pread from $tmp/src.img (fails with EIO at offsets >= the number
# in $tmp/fail-read if that file exists), extents from $tmp/map (the whole
# map whatever range is asked: nbdkit clips it; fails with EIO if
# $tmp/fail-extents exists).
start_view ()
{
    # Under --enable-sanitizers the wrapper preloads ASan into nbdkit: the
    # commands of the scripts must not inherit it.
    local env='unset LD_PRELOAD ASAN_OPTIONS UBSAN_OPTIONS;'
    make_view
    start_nbdkit "$@" eval \
        get_size="echo $view_size" \
        pread="$env if [ -e $tmp/fail-read ] && [ \$4 -ge \$(cat $tmp/fail-read) ]; then
                 echo 'EIO injected read error' >&2; exit 1; fi
               dd if=$tmp/src.img skip=\$4 count=\$3 \
                  iflag=skip_bytes,count_bytes status=none" \
        can_extents='exit 0' \
        extents="$env if [ -e $tmp/fail-extents ]; then
                   echo 'EIO injected extents error' >&2; exit 1; fi
                 cat $tmp/map"
    view=$uri
}

# expect_image full|delta PREV OUT: what a copy of the view over a target
# holding PREV must hold (full: the source; delta: PREV where the view has
# a hole without zero, zeroes where it has zero, the source elsewhere).
expect_image ()
{
    local mode="$1" prev="$2" out="$3" line off len flags fill
    cp "$prev" "$out"
    truncate -s "$view_size" "$out"
    for line in "${view_map[@]}"; do
        read -r off len flags fill <<< "$line"
        off=$(_size "$off"); len=$(_size "$len")
        if [ "$mode" = delta ] && [ "$flags" = hole ]; then continue; fi
        dd if="$tmp/src.img" of="$out" bs=64K skip="$off" seek="$off" \
           count="$len" iflag=skip_bytes,count_bytes oflag=seek_bytes \
           conv=notrunc status=none
    done
}

# filled FILE BYTE: a file of $view_size bytes of BYTE (a previous backup).
filled ()
{
    head -c "$view_size" /dev/zero | tr '\0' "$2" > "$1"
}

# assert_summary LOG COPIED ZEROED SKIPPED: the summary line says so.
assert_summary ()
{
    assert_contains "$1" \
        "copied $2 bytes, zeroed $3 bytes, skipped $4 bytes of $view_size "
}

# assert_hole FILE OFFSET LENGTH: no data in that range (SEEK_DATA).
assert_hole ()
{
    python3 - "$@" <<'PY' || fail "$1: data in [$2, $2+$3)"
import os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
off, length = int(sys.argv[2]), int(sys.argv[3])
try:
    d = os.lseek(fd, off, os.SEEK_DATA)
except OSError:
    sys.exit(0)                # no data after off
sys.exit(0 if d >= off + length else 1)
PY
}
