#!/usr/bin/env bash
# Every shell example of the README and of the man pages runs as
# printed, and does what its text says.
#
# doc-examples.py extracts the code blocks (README: the ``` blocks; POD:
# the verbatim paragraphs, anywhere).  Each document's blocks run in
# order in one shell (doc-examples-shell.sh, as a reader types them:
# a server one example starts in the background serves the next ones),
# in one scratch directory holding the input files its text assumes
# (made here, named as the examples name them: inputs_* below), with the
# build's nbdkit wrapper, sparsebackup-copy and sparsebackup-ctl first
# on $PATH, as after make install.  A block fails the test when a
# command of it fails (as under set -e -o pipefail) or it hangs; its
# text's claims are checked by the check_* functions below, which
# doc-examples.list names for it, and an output block shown after it
# must be exactly what it prints.  doc-examples.list also names the
# blocks that do not run (a synopsis, a file format, commands that need
# root or systemd...), each with its reason, printed as the test runs;
# any other block runs, so a new example cannot escape.  The servers an
# example starts must be stopped by the examples (anything still
# running in the document's shell session when its blocks are done
# fails the test); an example that would start nbdkit on TCP port 10809
# or that uses the build tree's paths fails without being run.
#
# A self-test first shows that the runner fails on a typo in a
# parameter's name or value, a wrong output, an unlisted block that
# fails, a stale list entry, a failure before a block's last command, a
# hang, a server left running and a TCP listener.
#
# To see the blocks and their names:
#   python3 tests/doc-examples.py list README.md */*/*.pod tools/*.pod
# To run one document's examples from the source tree:
#   DOC_EXAMPLES_ONLY=README.md DOC_EXAMPLES_SELFTEST=no \
#       make -C _build/tests check TESTS=test-doc-examples.sh
# DOC_EXAMPLES_TOP=DIR runs the documents of another source tree.
source "${srcdir:-.}/functions.sh"
requires qemu-img --version
requires qemu-io --version
requires nbdcopy --version
requires nbdinfo --version
requires jq --version
requires_plugin qcow2

PATH="$abs_top_builddir:$abs_top_builddir/tools:$abs_top_builddir/tools/ctl:$PATH"
export PATH
[ -x "$abs_top_builddir/tools/sparsebackup-copy" ] ||
    fail "no $abs_top_builddir/tools/sparsebackup-copy"
[ -x "$abs_top_builddir/tools/ctl/sparsebackup-ctl" ] ||
    fail "no $abs_top_builddir/tools/ctl/sparsebackup-ctl"

top=${DOC_EXAMPLES_TOP:-$abs_top_srcdir}
docs=(
    "$top/README.md"
    "$top/filters/sparsebackup/nbdkit-sparsebackup-filter.pod"
    "$top/plugins/qcow2/nbdkit-qcow2-plugin.pod"
    "$top/tools/sparsebackup-copy.pod"
    "$top/tools/ctl/sparsebackup-ctl.pod"
    "$top/tools/ctl/sparsebackup-retain.pod"
)
if [ -n "${DOC_EXAMPLES_ONLY:-}" ]; then
    for d in "${docs[@]}"; do
        [ "${d##*/}" != "$DOC_EXAMPLES_ONLY" ] || only=$d
    done
    docs=("${only:?DOC_EXAMPLES_ONLY=$DOC_EXAMPLES_ONLY: not one of the documents}")
fi
list=$_functions_dir/doc-examples.list
examples=$_functions_dir/doc-examples.py
M=1048576

# ---- Input files, per document -------------------------------------------
# make_raw FILE SIZE [OFF:LEN...]: a sparse raw disk, data at the ranges.
make_raw ()
{
    python3 "$_functions_dir/make-disk.py" "$@"
}

# make_qcow2 FILE SIZE [BACKING] then qemu-io writes: 'OFF LEN PATTERN'...
make_qcow2 ()
{
    local file=$1 size=$2 backing=${3:-} w
    if [ -n "$backing" ]; then
        qemu-img create -q -f qcow2 -b "$backing" -F qcow2 "$file" "$size"
    else
        qemu-img create -q -f qcow2 "$file" "$size"
    fi
    shift 3 || shift $#
    for w in "$@"; do
        # shellcheck disable=SC2086
        set -- $w
        qemu-io -f qcow2 -c "write -P $3 $1 $2" "$file" >/dev/null
    done
}

# A qcow2 image with a persistent bitmap ck1 and the full backup taken
# when ck1 was added: IMAGE and FULL.
make_bitmap_image ()
{
    make_qcow2 "$1" 8M '' '0 2M 0x11' '6M 64K 0x12'
    qemu-img convert -f qcow2 -O qcow2 "$1" "$2"
    qemu-img bitmap --add "$1" ck1
    qemu-io -f qcow2 -c 'write -P 0x13 4M 128K' "$1" >/dev/null
}

inputs_README ()
{
    # A qcow2 chain (disk.qcow2 over disk-base.qcow2); source.img, a
    # sparse raw image; the chain overlay.qcow2 over base.qcow2; vm.qcow2
    # with a bitmap ck1, full.qcow2 its full backup.  thick.img and
    # disk.raw are made by the examples.
    make_qcow2 disk-base.qcow2 8M '' '0 1M 0x21'
    make_qcow2 disk.qcow2 8M disk-base.qcow2 '2M 64K 0x22' '5M 128K 0x23'
    make_raw source.img $((8 * M)) 0:65536 $((M)):524288 $((6 * M)):4096
    make_qcow2 base.qcow2 8M '' '0 2M 0x31'
    make_qcow2 overlay.qcow2 8M base.qcow2 '3M 256K 0x32'
    make_bitmap_image vm.qcow2 full.qcow2
    inputs_group
}
# The two disks of the group backup examples.
inputs_group ()
{
    make_raw sys.img $((8 * M)) 0:$((M)) $((5 * M)):65536
    make_raw data.img $((8 * M)) $((2 * M)):$((M))
}
inputs_nbdkit_sparsebackup_filter ()
{
    make_raw source.img $((8 * M)) 0:65536 $((M)):524288 $((6 * M)):4096
    make_raw vm.img $((8 * M)) 0:$((M)) $((3 * M)):65536
    inputs_group
}
inputs_nbdkit_qcow2_plugin ()
{
    make_bitmap_image disk.qcow2 full.qcow2
    make_qcow2 base.qcow2 8M '' '0 2M 0x31'
    make_qcow2 overlay.qcow2 8M base.qcow2 '3M 256K 0x32'
}
inputs_sparsebackup_copy ()
{
    make_raw disk.raw $((8 * M)) 0:$((M)) $((2 * M)):65536 $((7 * M)):4096
}
inputs_sparsebackup_ctl ()
{
    make_raw vm.img $((8 * M)) 0:$((M)) $((3 * M)):65536
    inputs_group
}
inputs_sparsebackup_retain ()
{
    make_raw disk.raw $((8 * M)) 0:$((M)) $((2 * M)):65536 $((7 * M)):4096
}

# ---- Checks: what the text says a block prints or does -----------------
# Each runs in a subshell in the document's directory after its block
# (or, for sample:, instead of it), with $out and $err the block's
# standard output and error and $block its text; it fails with bad.
bad ()
{
    echo "    check failed: $*" >&2
    exit 1
}
# same FILE1 FILE2: equal contents.
same ()
{
    cmp "$1" "$2" >&2 || bad "$1 and $2 differ"
}
# sparse_as FILE SOURCE: FILE allocates no more than SOURCE's data.
sparse_as ()
{
    local a d
    a=$(allocated "$1") d=$(data_bytes "$2")
    [ "$a" -le "$d" ] || bad "$1 allocates $a bytes, more than the $d of data of $2"
}
# qcow2_own_data FILE: bytes of data in FILE's own layer.
qcow2_own_data ()
{
    qemu-img map --output=json -f qcow2 "$1" |
        jq '[.[] | select(.depth == 0 and .data) | .length] | add // 0'
}
last_line ()
{
    tail -n 1 "$1"
}

# README.md
check_path_line ()
{
    # The PATH line of "Running uninstalled", with $abs_top_builddir for
    # $PWD/_build, finds the build's three programs.
    local line
    line=$(grep -E '^export PATH=' "$block") || bad "no 'export PATH=' line"
    line=${line//\$PWD\/_build/$abs_top_builddir}
    (
        PATH=/usr/bin:/bin
        eval "$line"
        for p in nbdkit sparsebackup-copy sparsebackup-ctl; do
            case "$(command -v "$p")" in
                "$abs_top_builddir"/*) ;;
                *) bad "$p is not found in the build tree with: $line" ;;
            esac
        done
    )
}
check_nbdinfo_1m ()
{
    assert_contains "$out" 'export-size: 1048576'
}
check_qcow2_chain_copy ()
{
    qemu-img compare -q -f qcow2 -F raw disk.qcow2 disk.raw ||
        bad "disk.raw differs from disk.qcow2"
    local a d
    a=$(allocated disk.raw)
    d=$(qemu-img map --output=json -f qcow2 disk.qcow2 |
        jq '[.[] | select(.data) | .length] | add')
    [ "$a" -le "$d" ] || bad "disk.raw allocates $a bytes, the chain has $d of data"
}
check_target_sparse ()
{
    cmp -n "$(stat -c %s source.img)" source.img target.img >&2 ||
        bad "target.img does not start with source.img"
    sparse_as target.img source.img
}
check_thick_sparse ()
{
    # The map shows the 4 MiB of data of the 64 MiB thick image, and
    # the copy holds no more.
    local data
    data=$(awk '$NF == "data" { n += $2 } END { print n + 0 }' "$out")
    [ "$data" = $((4 * M)) ] || { cat "$out" >&2; bad "the map shows $data bytes of data, not 4 MiB"; }
    same thick.img copy.img
    [ "$(allocated copy.img)" -le $((4 * M)) ] ||
        bad "copy.img allocates $(allocated copy.img) bytes"
}
check_top_copy ()
{
    qemu-img compare -q overlay.qcow2 top-copy.qcow2 ||
        bad "top-copy.qcow2 differs from overlay.qcow2"
    [ "$(qcow2_own_data top-copy.qcow2)" -le "$(qcow2_own_data overlay.qcow2)" ] ||
        bad "top-copy.qcow2 holds more than the top layer"
}
check_views_listed ()
{
    assert_contains "$out" 'export="@top"'
    assert_contains "$out" 'export="@since:ck1"'
}
check_incremental_vm_qcow2 ()
{
    qemu-img compare -q vm.qcow2 inc.qcow2 || bad "inc.qcow2 differs from vm.qcow2"
    [ "$(qcow2_own_data inc.qcow2)" = 131072 ] ||
        bad "inc.qcow2 holds $(qcow2_own_data inc.qcow2) bytes, not the 128K changed since ck1"
}
check_restored_disk_raw ()
{
    same disk.raw restored.raw
}
check_raw_backup ()
{
    same disk.raw backup.raw
    assert_contains "$out" "matches the manifest"
}

# nbdkit-sparsebackup-filter.pod
check_frozen_typo_message ()
{
    local want
    want=$(sed 's/ *\.\.\.$//' "$block")
    truncate -s 1M t.img
    nbdkit -U - -e @frozen:sinc:c1 --filter=sparsebackup file t.img \
           sparsebackup-cbt=t.cbt --run 'nbdinfo "$uri"' \
           >t.out 2>t.err && bad "the view @frozen:sinc:c1 was served"
    grep -F -q -- "$want" t.err || { cat t.err >&2; bad "no message '$want'"; }
    rm -f t.img t.cbt t.out t.err
}
check_frozen_chain_vm ()
{
    qemu-img compare -q -f raw -F qcow2 vm.img inc2.qcow2 ||
        bad "full.qcow2 + inc2.qcow2 differ from vm.img"
}
check_block_size_message ()
{
    local want
    want=$(cat "$block")
    nbdkit -U - --filter=sparsebackup null 1M sparsebackup-block-size=3000 \
           --run true >t.out 2>t.err && bad "sparsebackup-block-size=3000 was accepted"
    grep -F -q -- "$want" t.err || { cat t.err >&2; bad "no message '$want'"; }
    rm -f t.out t.err
}
check_map_all_zero ()
{
    [ "$(awk '{ $1 = $1; print }' "$out")" = "0 67108864 3 hole,zero" ] ||
        { cat "$out" >&2; bad "the map is not one zero extent of 64M"; }
}
check_thick_zero_copy ()
{
    same thick.img copy.img
    [ "$(allocated copy.img)" = 0 ] || bad "copy.img allocates $(allocated copy.img) bytes"
}
check_plugin_log_and_stats ()
{
    assert_contains "$err" 'connection=[0-9]+ Write id='
    assert_contains "$out" '^summary: sparsebackup: '
    # nbdcopy --allocated writes the data of source.img as data: all of
    # it, and the zeros of the filter's blocks around it (4K here; the
    # memory plugin of Debian 13's nbdkit prefers 32K blocks), not more.
    local wd d
    wd=$(sed -n 's/^write-data-bytes: //p' "$out") d=$(data_bytes source.img)
    [ "$wd" -ge "$d" ] && [ "$wd" -lt "$(stat -c %s source.img)" ] ||
        bad "write-data-bytes: $wd, for $d bytes of data in source.img"
}

# nbdkit-qcow2-plugin.pod
check_incremental_disk_qcow2 ()
{
    assert_contains "$out" 'export="@since:ck1"'
    [ "$(qcow2_own_data inc.qcow2)" = 131072 ] ||
        bad "inc.qcow2 holds $(qcow2_own_data inc.qcow2) bytes, not the 128K changed since ck1"
}
check_map_disk_qcow2 ()
{
    # 2M + 64K + 128K of data.
    local data
    data=$(awk '$NF == "data" { n += $2 } END { print n + 0 }' "$out")
    [ "$data" = $((2 * M + 65536 + 131072)) ] || { cat "$out" >&2; bad "the map shows $data bytes of data"; }
}
check_raw_copy_of_disk_qcow2 ()
{
    qemu-img compare -q -f qcow2 -F raw disk.qcow2 disk.raw || bad "disk.raw differs"
    [ "$(allocated disk.raw)" -le $((2 * M + 65536 + 131072)) ] || bad "disk.raw is not sparse"
}
check_top_layer_only ()
{
    # Only the overlay's 256K at 3M; the rest reads as zero.
    cmp -n $((3 * M)) top.raw /dev/zero >&2 || bad "top.raw has data before 3M"
    qemu-img compare -q -f raw -F qcow2 top.raw overlay.qcow2 && bad "top.raw has the backing file's data"
    [ "$(allocated top.raw)" = 262144 ] || bad "top.raw allocates $(allocated top.raw) bytes"
}

# sparsebackup-copy.pod
check_delta_over_plain ()
{
    assert_contains "$out" 'skipped 0 bytes of 8388608'
    same disk.raw copy.raw
}
check_forced ()
{
    same disk.raw old.qcow2
}
check_journal_target ()
{
    same disk.raw target.raw
    [ ! -e target.journal ] || bad "target.journal is left after a complete copy"
}
check_verify_matches ()
{
    [ "$(grep -c 'matches the manifest' "$out")" = 2 ] ||
        { cat "$out" >&2; bad "--verify did not say twice that it matches"; }
}
check_progress_fd ()
{
    [ "$(last_line progress.txt)" = 100/100 ] || bad "progress.txt does not end with 100/100"
}
check_quiet ()
{
    [ ! -s "$out" ] || bad "--quiet printed on stdout"
}
check_help_version ()
{
    assert_contains "$out" 'sparsebackup-copy'
    assert_contains "$out" '[0-9]+\.[0-9]+'
}
check_copy_summary_format ()
{
    # The summary line's format, N, SIZE and T as numbers.
    local re
    re=$(sed -e 's/[.]/\\./g' -e 's/ N / [0-9]+ /g' -e 's/ SIZE / [0-9]+ /' \
             -e 's/ T s$/ [0-9.]+ s/' "$block")
    sparsebackup-copy [ nbdkit file disk.raw ] summary.raw > t.out
    [ "$(wc -l < t.out)" = 1 ] || { cat t.out >&2; bad "more than one line on stdout"; }
    assert_contains t.out "^$re\$"
    rm -f summary.raw t.out
}
check_differs_format ()
{
    local re rc=0
    re=$(sed -e "s/'T'/'[^']+'/" -e "s/'M'/'[^']+'/" -e 's/ N of C / [0-9]+ of [0-9]+ /' \
             -e 's/ O$/ [0-9]+/' "$block")
    cp disk.raw damaged.raw
    printf 'x' | dd of=damaged.raw bs=1 seek=$((2 * M)) conv=notrunc status=none
    sparsebackup-copy --verify=disk.manifest damaged.raw > t.out 2>&1 || rc=$?
    [ $rc = 1 ] || { cat t.out >&2; bad "--verify of a damaged copy exited $rc"; }
    assert_contains t.out "^$re\$"
    rm -f damaged.raw t.out
}
check_manifest_format ()
{
    # The header lines of a real manifest have the sample's keys, in order.
    local want have
    want=$(sed -n '1,8p' "$block" | cut -d' ' -f1)
    have=$(sed -n '1,8p' disk.manifest | cut -d' ' -f1)
    assert_eq "$want" "$have" "the keys of disk.manifest's header"
    assert_contains disk.manifest '^sparsebackup-copy manifest 1$'
}
check_first_chunk_hash ()
{
    assert_eq "$(grep -m 1 -E '^[0-9a-f]{64}$' disk.manifest)" "$(cat "$out")" \
        "the first chunk's hash"
}
check_backups_mon_tue ()
{
    same disk.raw backup.raw
}
check_backup_wed ()
{
    same disk.raw backup-wed.raw
    assert_contains backup.manifest '^source-export @frozen:since:mon$'
}
check_interrupted_by_timeout ()
{
    # The first copy completed, or was stopped by timeout (124): not
    # failed for another reason that the "||" would hide.
    local st
    st=$(sed -n 's/^interrupted: exit status //p' "$out")
    [ -z "$st" ] || [ "$st" = 124 ] ||
        bad "the first copy failed with exit status $st, not interrupted by timeout"
}
check_interrupted_completed ()
{
    same disk.raw backup-wed.raw
    [ ! -e backup-wed.raw.sparsebackup-journal ] || bad "the journal is left"
}

# sparsebackup-ctl.pod
check_changed_bytes ()
{
    assert_eq 65536 "$(cat "$out")" "bytes changed since c1"
}
check_restored_vm_img ()
{
    same vm.img restored.raw
}
# The group backups of two disks (README and sparsebackup-ctl.pod): each
# disk's chain g1 <- g2 is the disk, and g2 was begun since g1.  (The
# filter's page makes only the full backups g1: check_group_full.)
check_group_backups ()
{
    local d
    for d in sys data; do
        qemu-img compare -q -f qcow2 -F raw $d-g2.qcow2 $d.img ||
            bad "$d-g2.qcow2 differs from $d.img"
        [ "$(qemu-img info --output=json $d-g2.qcow2 |
             jq -r '."backing-filename"')" = $d-g1.qcow2 ] ||
            bad "$d-g2.qcow2 is not an incremental over $d-g1.qcow2"
    done
}

check_group_full ()
{
    local d
    for d in sys data; do
        qemu-img compare -q -f qcow2 -F raw $d-g1.qcow2 $d.img ||
            bad "$d-g1.qcow2 differs from $d.img"
    done
}

# sparsebackup-retain.pod (and the README's retention example): of the
# chain c1 <- c2 <- c3 <- c4 the last two incrementals are kept: c2 is
# the full backup now, c1 and its checkpoint are gone, every point left
# is the disk (nothing wrote between the backups).
check_retained_chain ()
{
    local dir=${1:-backups} ctl=${2:-disk.ctl}
    [ ! -e $dir/c1.qcow2 ] || bad "$dir/c1.qcow2 is still there"
    [ "$(qemu-img info --output=json $dir/c2.qcow2 |
         jq -r '."backing-filename" // "none"')" = none ] ||
        bad "$dir/c2.qcow2 still has a backing file"
    qemu-img compare -q -f qcow2 -F raw $dir/c4.qcow2 disk.raw ||
        bad "$dir/c4.qcow2 differs from disk.raw"
    same disk.raw restored-c2.raw
    assert_eq "c2 c3 c4" "$(awk '$2 == "good" { print $1 }' "$out" | xargs)" \
        "the checkpoints left"
}
check_retained_chain_readme ()
{
    check_retained_chain backups keep.ctl
}
check_retained_raw ()
{
    [ ! -e r1.raw ] || bad "r1.raw is still there"
    same disk.raw r2.raw
    same disk.raw r3.raw
}

# ---- The runner ----------------------------------------------------------
driver=$_functions_dir/doc-examples-shell.sh
finish_wait=300         # tenths of a second a stopped server has to exit
block_timeout=300       # seconds: an example that hangs fails

# session_left SID: the processes of the driver's session still running
# (servers the examples started), one "PID COMMAND" line each.
session_left ()
{
    python3 "$examples" session "$1"
}

# start_doc DOC DIR: the document's shell (doc-examples-shell.sh) in DIR,
# as a coprocess DRV; $sid is its session.
start_doc ()
{
    local line
    coproc DRV { cd "$2" && exec setsid bash "$driver"; }
    # (bash unsets DRV when the coprocess ends: keep its fds and pid.)
    drv_out=${DRV[0]} drv_in=${DRV[1]} drv_pid=$DRV_PID
    if ! read -r -t 60 -u "$drv_out" line || [ "${line%% *}" != ready ]; then
        fail "the examples' shell did not start"
    fi
    sid=${line#ready }
}

# stop_doc DOC: the servers the examples started have stopped (the
# examples show how to stop them), else stop them and fail; then the
# document's shell ends.
stop_doc ()
{
    local doc=$1 i left= p rc=0
    for (( i = 0; i < finish_wait; i++ )); do
        left=$(session_left "$sid")
        [ -n "$left" ] || break
        sleep 0.1           # a server stopped by the last example is exiting
    done
    if [ -n "$left" ]; then
        echo "FAIL   $doc: its examples leave these running (they must stop what they start):"
        sed 's/^/    /' <<< "$left"
        rc=1
    fi
    exec {drv_in}>&- {drv_out}<&-
    kill "$sid" 2>/dev/null
    for p in $sid $(awk '{ print $1 }' <<< "$left"); do
        kill "$p" 2>/dev/null
        _wait_pid "$p"
    done
    wait "$drv_pid" 2>/dev/null
    return $rc
}

# show_failure N DIR: what a failed block printed, and the logs.
show_failure ()
{
    local n=$1 dir=$2 f
    {
        echo "    --- the block:"; sed 's/^/    | /' "$pd/$n.sh"
        echo "    --- its commands as run:"; sed 's/^/    + /' "$logs/$n.trace" | tail -n 40
        echo "    --- stdout:"; tail -n 20 "$logs/$n.out" | sed 's/^/    > /'
        echo "    --- stderr:"; tail -n 30 "$logs/$n.err" | sed 's/^/    ! /'
        for f in "$dir"/*.log; do
            [ -s "$f" ] || continue
            echo "    --- ${f##*/}:"; tail -n 20 "$f" | sed 's/^/    ! /'
        done
    } >&2
}

# run_block N DIR: run block N in the document's shell; its exit status.
# When the shell cannot go on (the example hangs, or the shell has
# gone), $dead says so.
run_block ()
{
    local n=$1 reply
    : > "$logs/$n.trace"
    if ! echo "$n $pd/$n.sh $logs/$n.out $logs/$n.err $logs/$n.trace" \
            >&"$drv_in"; then
        dead="the examples' shell has gone"
        return 1
    fi
    if ! read -r -t "$block_timeout" -u "$drv_out" reply; then
        dead="no answer within $block_timeout s: the example hangs (or the shell died)"
        return 1
    fi
    if [ "${reply%% *}" != "$n" ]; then
        dead="the shell answered '$reply'"
        return 1
    fi
    return "${reply#* }"
}

# run_docs LIST DOC...: run the documents' blocks; $failures counts
# what failed (each failure is printed).
run_docs ()
{
    local list=$1 n where action value expect first doc dir= prev= rc fn
    local dead=
    local -                 # the options set here end with the function:
    set +e                  # each failure is counted, not fatal
    shift
    failures=0
    pd=$(mktemp -d "$tmp/plan.XXXXXX")
    logs=$pd/logs
    mkdir "$logs"
    if ! python3 "$examples" plan ${DOC_EXAMPLES_ONLY:+--subset} "$list" "$pd" "$@"; then
        echo "FAIL: the blocks and ${list##*/} do not agree (above)" >&2
        failures=$((failures + 1))
    fi
    while IFS=$'\t' read -r n where action value expect first; do
        doc=${where%%:*}
        if [ "$doc" != "$prev" ]; then
            if [ -n "$prev" ]; then
                stop_doc "$prev" || failures=$((failures + 1))
            fi
            dir=$(mktemp -d "$tmp/ex.${doc%.*}.XXXXXX")
            fn=inputs_${doc%.*}
            fn=${fn//-/_}
            if declare -F "$fn" >/dev/null; then
                (set -e; cd "$dir" && "$fn") || fail "making the inputs of $doc"
            fi
            echo "== $doc (in ${dir##*/}: $(cd "$dir" && echo *))"
            start_doc "$doc" "$dir"
            prev=$doc dead=
        fi
        case "$action" in
            skip)
                echo "skip   $where  $first"
                echo "         (not run: $value)"
                continue ;;
            output)
                # The output shown for block $value: compared there.
                echo "output $where  (what block $value prints)"
                continue ;;
            bad)
                echo "FAIL   $where  $first"
                echo "    not run: $value" >&2
                failures=$((failures + 1))
                continue ;;
        esac
        if [ "$action" = run ]; then
            if [ -n "$dead" ]; then
                echo "FAIL   $where  $first"
                echo "    not run: an example before it broke the shell" >&2
                failures=$((failures + 1))
                continue
            fi
            rc=0
            run_block "$n" "$dir" || rc=$?
            if [ $rc -ne 0 ]; then
                echo "FAIL   $where  $first"
                if [ -n "$dead" ]; then
                    echo "    $dead" >&2
                else
                    echo "    exit status $rc" >&2
                fi
                show_failure "$n" "$dir"
                failures=$((failures + 1))
                continue
            fi
            if [ "$expect" != - ] &&
                    ! cmp -s "$logs/$n.out" "$pd/$expect.sh"; then
                echo "FAIL   $where  $first"
                echo "    it does not print what the document shows after it:" >&2
                diff -u "$pd/$expect.sh" "$logs/$n.out" | sed 's/^/    /' >&2
                failures=$((failures + 1))
                continue
            fi
        else
            # sample: not run; the checks show that it is real.
            : > "$logs/$n.out"; : > "$logs/$n.err"
        fi
        if [ "$value" != - ]; then
            local c ok=yes
            for c in $value; do
                if ! declare -F "check_$c" >/dev/null; then
                    echo "    no function check_$c in ${0##*/}" >&2
                    ok=no
                    continue
                fi
                rc=0
                (
                    set -e
                    cd "$dir"
                    out=$logs/$n.out err=$logs/$n.err block=$pd/$n.sh
                    "check_$c"
                ) </dev/null >>"$logs/$n.check" 2>&1 || rc=$?
                if [ $rc -ne 0 ]; then
                    ok=no
                    echo "    check_$c:" >&2
                    sed 's/^/    /' "$logs/$n.check" >&2
                fi
            done
            if [ $ok = no ]; then
                echo "FAIL   $where  $first"
                [ "$action" = sample ] || show_failure "$n" "$dir"
                failures=$((failures + 1))
                continue
            fi
        fi
        printf '%-6s %s  %s%s%s\n' "$action" "$where" "$first" \
               "$([ "$value" = - ] || echo "  [checked: $value]")" \
               "$([ "$expect" = - ] || echo "  [prints: the next block]")"
    done < "$pd/plan"
    if [ -n "$prev" ]; then
        stop_doc "$prev" || failures=$((failures + 1))
    fi
}

# ---- Self-test: the runner fails on broken examples ----------------------
# selftest NAME pass|fail ERE DOC LIST: run_docs LIST DOC passes, or fails
# printing something that matches ERE.
selftest ()
{
    local name=$1 want=$2 re=$3 doc=$4 lst=$5
    run_docs "$lst" "$doc" > "$tmp/selftest.log" 2>&1
    if [ "$want" = pass ] && [ "$failures" -ne 0 ]; then
        cat "$tmp/selftest.log" >&2
        fail "self-test '$name': the runner failed on a good example"
    fi
    if [ "$want" = fail ] && [ "$failures" -eq 0 ]; then
        cat "$tmp/selftest.log" >&2
        fail "self-test '$name': the runner did not fail"
    fi
    assert_contains "$tmp/selftest.log" "$re"
    if [ "$want" = pass ]; then want=passes; else want=fails; fi
    echo "self-test: $name: the runner $want, as it must:"
    grep -m 1 -E "$re" "$tmp/selftest.log" | sed "s/^ */    /"
}

if [ "${DOC_EXAMPLES_SELFTEST:-yes}" != no ]; then
st=$tmp/selftest
mkdir -p "$st"
finish_wait=10              # a server left running is found within 1 s
block_timeout=60
printf '%s\n' '# A good example' '' '```' \
       'nbdkit -U - --filter=sparsebackup memory 1M \' \
       '       sparsebackup-scan=always --run '\''nbdinfo --size "$uri"'\''' \
       '```' '' 'prints' '' '```' '1048576' '```' > "$st/good.md"
printf '%s\n' '[good.md] nbdkit -U - --filter=sparsebackup memory 1M \' \
       'prints: next' > "$st/good.list"
selftest "a good example and its output" pass '^run ' "$st/good.md" "$st/good.list"
# variant NAME SED-SCRIPT: good.md edited, with its list.
variant ()
{
    sed "$2" "$st/good.md" > "$st/$1.md"
    sed "s/good\.md/$1.md/" "$st/good.list" > "$st/$1.list"
}
variant typo 's/sparsebackup-scan=always/sparsebackup-scna=always/'
selftest "a typo in a parameter name" fail "sparsebackup-scna: unknown" "$st/typo.md" "$st/typo.list"
variant value 's/sparsebackup-scan=always/sparsebackup-scan=alwyas/'
selftest "a typo in a parameter's value" fail "'alwyas' is not one of" "$st/value.md" "$st/value.list"
variant output 's/^1048576$/1048577/'
selftest "another output than the one shown" fail "does not print what" \
         "$st/output.md" "$st/output.list"
printf '```\nfalse\n```\n' > "$st/unlisted.md"
: > "$st/empty.list"
selftest "an unlisted block that fails" fail '^FAIL +unlisted\.md:2 +false' \
         "$st/unlisted.md" "$st/empty.list"
printf '```\ntrue\n```\n' > "$st/stale.md"
printf '[stale.md] no such block\nskip: it was removed\n' > "$st/stale.list"
selftest "a list entry without its block" fail "no block of stale\.md" \
         "$st/stale.md" "$st/stale.list"
printf '```\nfalse | cat\ntrue\n```\n' > "$st/midway.md"
selftest "a command that fails before the last one (set -e, pipefail)" fail \
         '^FAIL +midway\.md:2' "$st/midway.md" "$st/empty.list"
printf '```\nsleep 60\n```\n' > "$st/hang.md"
block_timeout=1
selftest "an example that hangs" fail "the example hangs" "$st/hang.md" "$st/empty.list"
block_timeout=60
printf '```\nnbdkit -U left.sock memory 1M\n```\n' > "$st/left.md"
selftest "a server left running" fail "leave these running" \
         "$st/left.md" "$st/empty.list"
printf '```\nnbdkit memory 1M --run true\n```\n' > "$st/tcp.md"
selftest "nbdkit on TCP port 10809" fail "listens on TCP port 10809" \
         "$st/tcp.md" "$st/empty.list"
finish_wait=300 block_timeout=300
fi

# ---- The documents --------------------------------------------------------
run_docs "$list" "${docs[@]}"
[ "$failures" -eq 0 ] || fail "$failures example(s) of the documentation failed (above)"
echo "every example of the documentation ran and did what its text says"
