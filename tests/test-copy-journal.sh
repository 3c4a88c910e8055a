#!/usr/bin/env bash
# Interrupted copies (sparsebackup-copy's journal, DST.sparsebackup-journal):
#  1. kill -9 at several points of a full and of a --delta copy (a debug
#     hook, SPARSEBACKUP_COPY_DEBUG_KILL=POINT:N, kills the tool right
#     after its Nth target write, target sync, journal temporary file or
#     journal update): the journal is there, never claims more than the
#     target holds (the part it says is done equals the expected result),
#     and the same command run again completes the copy exactly;
#  2. the same with kill -9 from outside, at random times, against a
#     slow source (nbdkit --filter=delay);
#  3. SIGINT and SIGTERM: the tool drains, syncs, records, says what is
#     left and dies of the signal (exit status 130, 143); the rerun
#     completes it;
#  4. a --delta from another source over the interrupted target is
#     refused, naming the interrupted source, and leaves it untouched; a
#     full copy from another source replaces it; --restart;
#  5. an NBD target with --journal=FILE;
#  6. a damaged, edited or foreign journal is refused, naming the line;
#     a journal's stale temporary file is cleaned up, a foreign one kept;
#  7. write ahead, as strace sees it: every journal rename comes after a
#     sync of the target (skipped without strace).
# nbdkit runs with --threads=1: nbdkit 1.32.5 aborts when a client dies
# with several reads in flight (see the README's known issues).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires_plugin memory
requires_filter delay
requires nbdcopy --version

start_view --threads=1
view1=$view
journal_of () { echo "$1.sparsebackup-journal"; }
field () { sed -n "s/^$1 //p" "$2"; }

filled "$tmp/prev.img" P
expect_image delta "$tmp/prev.img" "$tmp/expected-delta.img"
cp "$tmp/src.img" "$tmp/expected-full.img"

# killed_at MODE POINT:N: start MODE (full or delta) over a fresh target,
# killed at the Nth POINT; check the journal, then complete the copy.
killed_at ()
{
    local mode=$1 point=${2%:*} n=${2#*:} out=$tmp/k.img j opts=() r=0 done
    j=$(journal_of "$out")
    rm -f "$out" "$j" "$j.tmp"
    if [ "$mode" = delta ]; then
        cp "$tmp/prev.img" "$out"
        opts=(--delta)
    fi
    SPARSEBACKUP_COPY_DEBUG_KILL=$point:$n \
        "$copy" "${opts[@]}" --journal-every=200K --request-size=64K \
        --requests=4 "$view1" "$out" > "$tmp/out" 2> "$tmp/err" || r=$?
    [ $r -eq 137 ] ||
        { cat "$tmp/err"; fail "$mode $point:$n: exit status $r, not killed"; }
    [ -s "$j" ] || fail "$mode $point:$n: no journal after the kill"
    done=$(field done "$j")
    assert_eq "$mode" "$(field mode "$j")" "$mode $point:$n: mode"
    assert_eq "$view_size" "$(field source-size "$j")" "$mode $point:$n: size"
    # Write ahead: what the journal says is done is done.
    cmp -n "$done" "$tmp/expected-$mode.img" "$out" ||
        fail "$mode $point:$n: the journal claims $done bytes done, the target differs before that"
    echo "$mode killed at $point:$n: journal says $done of $view_size done"
    "$copy" "${opts[@]}" --journal-every=200K --request-size=64K \
        --requests=4 "$view1" "$out" > "$tmp/out" 2> "$tmp/err" ||
        { cat "$tmp/err"; fail "$mode $point:$n: the rerun failed"; }
    cmp "$tmp/expected-$mode.img" "$out" ||
        fail "$mode $point:$n: the completed copy differs"
    [ ! -e "$j" ] || fail "$mode $point:$n: the journal was left"
    [ ! -e "$j.tmp" ] || fail "$mode $point:$n: the journal's temporary file was left"
    if [ "$done" -gt 0 ]; then
        assert_contains "$tmp/err" "resuming the interrupted copy of .* at offset $done of $view_size"
        assert_contains "$tmp/out" "; $done bytes were done by an earlier run"
    fi
}

# 1. Kill points.
for p in write:1 write:7 full/write:15 sync:1 sync:3 journal-tmp:2 journal:1 \
         journal:4 full/write:22 delta/write:10; do
    case $p in
        full/*)  killed_at full ${p#full/} ;;
        delta/*) killed_at delta ${p#delta/} ;;
        *)       killed_at full $p; killed_at delta $p ;;
    esac
done

# 2. kill -9 from outside, against a slow source.
start_nbdkit --threads=1 --filter=delay file "$tmp/src.img" rdelay=20ms
slow=$uri
kills=0
for t in 0.3 0.7 1.2; do
    rm -f "$tmp/s.img"
    for (( i = 0; i < 20; i++ )); do
        "$copy" -q --journal-every=64K --request-size=16K --requests=2 \
            "$slow" "$tmp/s.img" 2> /dev/null &
        c=$!
        # T seconds after the copy has a journal (the first run's appears
        # with its first progress; a loaded machine may take longer than
        # T to get there, and a kill before it would count as a finished
        # copy), or after it finished.
        j=$(journal_of "$tmp/s.img")
        for (( k = 0; k < 1200; k++ )); do
            [ -e "$j" ] && break
            kill -0 $c 2>/dev/null || break
            sleep 0.1
        done
        [ -e "$j" ] || ! kill -0 $c 2>/dev/null ||
            fail "kill -9 after ${t}s: the copy has no journal after 120 s"
        sleep "$t"
        kill -9 $c 2>/dev/null || true
        wait $c 2>/dev/null || true
        j=$(journal_of "$tmp/s.img")
        [ -e "$j" ] || break     # finished before the kill
        kills=$((kills + 1))
        done=$(field done "$j")
        cmp -n "$done" "$tmp/src.img" "$tmp/s.img" ||
            fail "kill -9 after ${t}s: the journal claims $done bytes done, the target differs"
    done
    "$copy" -q "$slow" "$tmp/s.img"
    cmp "$tmp/src.img" "$tmp/s.img" || fail "kill -9 after ${t}s: the completed copy differs"
done
[ $kills -gt 0 ] || fail "kill -9 from outside: no copy was killed"
echo "kill -9 from outside: $kills kills, every rerun completed the copy"

# 3. SIGINT and SIGTERM.
for sig in INT TERM; do
    rm -f "$tmp/g.img"
    cp "$tmp/prev.img" "$tmp/g.img"
    "$copy" --delta --request-size=8K --requests=2 --journal-every=16K \
        "$slow" "$tmp/g.img" > "$tmp/out" 2> "$tmp/err" &
    c=$!
    # Signal it once it has recorded some progress (not timed: waits).
    j=$(journal_of "$tmp/g.img")
    for (( i = 0; i < 1200; i++ )); do
        [ "$(field done "$j" 2>/dev/null || echo 0)" -gt 0 ] 2>/dev/null && break
        kill -0 $c 2>/dev/null || { cat "$tmp/err"; fail "SIG$sig: the copy ended before it was signalled"; }
        sleep 0.1
    done
    [ "$(field done "$j" 2>/dev/null || echo 0)" -gt 0 ] 2>/dev/null ||
        fail "SIG$sig: the copy recorded no progress within 120 s"
    kill -$sig $c
    r=0; wait $c || r=$?
    case $sig in INT) want=130 ;; TERM) want=143 ;; esac
    assert_eq $want $r "exit status after SIG$sig"
    assert_contains "$tmp/out" "\(INTERRUPTED\)$"
    assert_contains "$tmp/err" "DST '$tmp/g.img' is incomplete: [0-9]+ of $view_size bytes done, interrupted by SIG$sig; the journal '$tmp/g.img.sparsebackup-journal' records it: run the same command again to complete the copy"
    j=$(journal_of "$tmp/g.img")
    done=$(field done "$j")
    [ "$done" -gt 0 ] && [ "$done" -lt "$view_size" ] ||
        fail "SIG$sig: the journal says $done bytes done"
    # The delay filter's source is the plain file: no HOLE-only extents,
    # so the delta equals the source.
    cmp -n "$done" "$tmp/src.img" "$tmp/g.img" ||
        fail "SIG$sig: the target differs from the source before $done"
    echo "SIG$sig: $done of $view_size bytes done"
    "$copy" -q --delta "$slow" "$tmp/g.img"
    cmp "$tmp/src.img" "$tmp/g.img" || fail "SIG$sig: the completed copy differs"
done

# 4. Another source over an interrupted delta.
out=$tmp/o.img
cp "$tmp/prev.img" "$out"
SPARSEBACKUP_COPY_DEBUG_KILL=journal:2 "$copy" --delta --journal-every=200K \
    --request-size=64K "$view1" "$out" 2> /dev/null || true
j=$(journal_of "$out")
[ -e "$j" ] || fail "no journal for the other-source checks"
cp "$out" "$tmp/o.before"
r=0
"$copy" --delta "$slow" "$out" > "$tmp/out" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --delta from another source"
assert_contains "$tmp/err" "--delta from SRC '$(ere_quote "$slow")' \(export ''\) refused: a delta from another source over an incomplete target would leave it neither backup"
assert_contains "$tmp/err" "DST '$out' holds an interrupted --delta copy from SRC '$(ere_quote "$view1")' \(export '', $view_size bytes\), [0-9]+ of $view_size bytes done \(journal '$j'\)"
cmp "$tmp/o.before" "$out" || fail "the refused --delta changed the target"
# The interrupted source is gone: the message says what to do.
r=0
"$copy" --delta "nbd+unix:///?socket=$tmp/gone.sock" "$out" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --delta from a source that is gone"
assert_contains "$tmp/err" "cannot connect to SRC 'nbd\+unix:///\?socket=$tmp/gone.sock'"
assert_contains "$tmp/err" "If that source is gone, make a full copy \(without --delta\), or --delta --restart"
# --restart over it, from the original view (which reports every change).
"$copy" --delta --restart "$view1" "$out" > /dev/null 2> "$tmp/err"
assert_contains "$tmp/err" "--restart: ignoring the interrupted copy in '$j'"
cmp "$tmp/expected-delta.img" "$out" || fail "--delta --restart differs"
[ ! -e "$j" ] || fail "the journal was left after --restart"
# A full copy from another source over an interrupted one replaces it.
cp "$tmp/prev.img" "$out"
SPARSEBACKUP_COPY_DEBUG_KILL=journal:2 "$copy" --delta --journal-every=200K \
    --request-size=64K "$view1" "$out" 2> /dev/null || true
"$copy" "$slow" "$out" > /dev/null 2> "$tmp/err"
assert_contains "$tmp/err" "DST '$out' held an interrupted --delta copy from SRC '$(ere_quote "$view1")': the full copy starts from the beginning"
cmp "$tmp/src.img" "$out" || fail "the full copy over an interrupted one differs"
# A rerun of the interrupted full copy as --delta is refused.
rm -f "$out"
SPARSEBACKUP_COPY_DEBUG_KILL=journal:2 "$copy" --journal-every=200K \
    --request-size=64K "$view1" "$out" 2> /dev/null || true
r=0; "$copy" --delta "$view1" "$out" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --delta over an interrupted full copy"
assert_contains "$tmp/err" "--delta over an interrupted full copy from the same SRC: DST is not a previous backup"
# The target replaced by another file (another inode) under the journal:
# a full copy starts again, a --delta is refused.
cp "$out" "$out.new"; mv "$out.new" "$out"
"$copy" "$view1" "$out" > /dev/null 2> "$tmp/err"
assert_contains "$tmp/err" "the journal '$j' is of another target"
cmp "$tmp/src.img" "$out" || fail "the full copy over a replaced target differs"

# 5. An NBD target keeps its journal where --journal says.
start_nbdkit --threads=1 memory "$view_size"
target=$uri
nbdcopy "$tmp/prev.img" "$target"
SPARSEBACKUP_COPY_DEBUG_KILL=journal:3 "$copy" --delta --journal="$tmp/nbd.j" \
    --journal-every=200K --request-size=64K "$view1" "$target" 2> /dev/null || true
[ -e "$tmp/nbd.j" ] || fail "no journal for the NBD target"
assert_eq "$target" "$(field target "$tmp/nbd.j" | python3 -c 'import sys,urllib.parse; print(urllib.parse.unquote(sys.stdin.read().strip()))')" "the NBD target in the journal"
r=0; "$copy" --delta --journal="$tmp/nbd.j" "$slow" "$target" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of --delta from another source to NBD"
"$copy" -q --delta --journal="$tmp/nbd.j" "$view1" "$target"
nbdcopy "$target" "$tmp/back.img"
cmp "$tmp/expected-delta.img" "$tmp/back.img" || fail "the completed NBD delta differs"
[ ! -e "$tmp/nbd.j" ] || fail "the NBD target's journal was left"

# 6. Journals that are not valid.
out=$tmp/v.img
cp "$tmp/prev.img" "$out"
SPARSEBACKUP_COPY_DEBUG_KILL=journal:2 "$copy" --delta --journal-every=200K \
    --request-size=64K "$view1" "$out" 2> /dev/null || true
j=$(journal_of "$out")
cp "$j" "$tmp/good.j"
bad_journal ()
{
    local what=$1 re=$2 r=0
    "$copy" --delta "$view1" "$out" > /dev/null 2> "$tmp/err" || r=$?
    assert_eq 1 $r "exit status with a $what journal"
    assert_contains "$tmp/err" "the journal '$j' is not valid \(line [0-9]+: ($re)"
    cp "$tmp/good.j" "$j"
}
sed -i 's/^done .*/done 999/' "$j";            bad_journal edited "the checksum does not match"
sed -i 's/^done .*/done x/' "$j";              bad_journal "non-numeric" "not a decimal number"
sed -i '1s/ 1$/ 2/' "$j";                      bad_journal "version 2" "an unknown version"
head -c 100 "$tmp/good.j" > "$j";              bad_journal truncated "the last line has no newline|the file ends early"
printf 'garbage\n' > "$j";                     bad_journal foreign "expected the key"
python3 - "$j" <<'PY'
import sys
p = sys.argv[1]
s = open(p).read().splitlines(True)
s[1] = "target " + "x" * 20000 + "\n"
open(p, "w").write("".join(s))
PY
bad_journal "too long" "a line too long"
sed -i 's/^mode .*/mode sideways/' "$j";       bad_journal "bad mode" "the mode is not"
# A done past the size, with a valid checksum.
python3 - "$j" <<'PY'
import hashlib, sys
p = sys.argv[1]
lines = open(p).read().splitlines(True)[:-1]
lines = [("done 99999999999\n" if l.startswith("done ") else l) for l in lines]
body = "".join(lines)
open(p, "w").write(body + "sha256 " + hashlib.sha256(body.encode()).hexdigest() + "\n")
PY
bad_journal "past the size" "done is past the source's size"
# A stale temporary file of ours is removed, a foreign one is kept.
cp "$tmp/good.j" "$j.tmp"
"$copy" -q --delta "$view1" "$out"
[ ! -e "$j.tmp" ] || fail "the stale journal temporary file was left"
cmp "$tmp/expected-delta.img" "$out" || fail "the copy after a stale temporary file differs"
rm -f "$tmp/k2.img"
echo "not ours" > "$tmp/k2.img.sparsebackup-journal.tmp"
r=0; "$copy" "$view1" "$tmp/k2.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status with a foreign journal temporary file"
assert_contains "$tmp/err" "cannot create journal '$tmp/k2.img.sparsebackup-journal.tmp': the file exists and is not ours"
assert_eq "not ours" "$(cat "$tmp/k2.img.sparsebackup-journal.tmp")" "the foreign file"
# A journal name that is a directory or a symlink is not written over.
mkdir "$tmp/jdir"
r=0; "$copy" --journal="$tmp/jdir" "$view1" "$tmp/k3.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status with a directory as the journal"
assert_contains "$tmp/err" "journal '$tmp/jdir'"

# 7. Write ahead under strace: the target is synced before each journal
# rename that records progress.
if command -v strace > /dev/null && strace -f -qq -o /dev/null true 2>/dev/null
then
    rm -f "$tmp/t.img"
    # LeakSanitizer cannot run under ptrace (a --sanitizers build).
    ASAN_OPTIONS=${ASAN_OPTIONS:+$ASAN_OPTIONS:}detect_leaks=0 \
    strace -qq -y -e trace=fsync,fdatasync,rename,pwrite64,fallocate \
        -o "$tmp/trace" "$copy" -q --journal-every=200K --request-size=64K \
        "$view1" "$tmp/t.img"
    cmp "$tmp/src.img" "$tmp/t.img" || fail "the traced copy differs"
    python3 - "$tmp/trace" "$tmp/t.img" <<'PY'
import re, sys
trace, target = sys.argv[1], sys.argv[2]
dirty = False          # target written since its last sync
renames = 0
for line in open(trace):
    m = re.match(r'(\w+)\((\d+)<([^>]*)>', line)
    if m and m.group(3) == target:
        if m.group(1) in ("pwrite64", "fallocate"):
            dirty = True
        elif m.group(1) in ("fsync", "fdatasync"):
            dirty = False
    elif line.startswith("rename(") and "sparsebackup-journal.tmp" in line:
        renames += 1
        if dirty and renames > 1:
            sys.exit("journal rename %d over unsynced target writes: %s"
                     % (renames, line.strip()))
if renames < 3:
    sys.exit("only %d journal updates" % renames)
print("write ahead: %d journal updates, each after a sync of the target"
      % renames)
PY
else
    echo "strace cannot trace here: the sync order is not checked"
fi
