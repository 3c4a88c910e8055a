#!/usr/bin/env bash
# The filter's own files cannot destroy anything by mistake, and the
# scratch file is compact.
#
#  - sparsebackup-scratch= naming the served disk, the cbt file, a
#    symbolic link (to anything), or a non-empty file that is not a
#    scratch file of ours: refused at start-up with a message naming the
#    path and what it found, the file untouched.  A scratch file of ours
#    from an earlier run is taken (and emptied to its header).
#  - sparsebackup-statsfile= and sparsebackup-cbt= through a symbolic
#    link, or naming the served disk: refused, the target untouched.
#  - The scratch file holds the saved granules one after the other, so
#    it is as large as what it holds: a write past 16 TiB of a 32 TiB
#    disk (the largest file on ext4 is 16 TiB: a scratch file storing
#    each granule at its own offset failed there) is saved, and the
#    frozen disk reads right.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_plugin file
requires_plugin memory

ctlsock=$tmp/ctl.sock
truncate -s 8M "$tmp/disk.img"
printf 'disk data' | dd of="$tmp/disk.img" conv=notrunc status=none
sum=$(md5sum < "$tmp/disk.img")
base=(--filter=sparsebackup file "$tmp/disk.img"
      sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock")

# The served disk as the scratch file (relative and absolute names).
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$tmp/disk.img")' is the file of the parameter file=$(ere_quote "$tmp/disk.img"): refused" \
    "${base[@]}" sparsebackup-scratch="$tmp/disk.img"
assert_eq "$sum" "$(md5sum < "$tmp/disk.img")" "the disk after a refused scratch"
( cd "$tmp" && nbdkit_refuses "sparsebackup-scratch: '.*/disk.img' is the file of the parameter file=" \
    --filter=sparsebackup file disk.img sparsebackup-cbt=disk.cbt \
    sparsebackup-control=ctl.sock sparsebackup-scratch=./disk.img )
assert_eq "$sum" "$(md5sum < "$tmp/disk.img")" "the disk after a refused scratch"

# A symbolic link planted at the path: never followed.
ln -s "$tmp/disk.img" "$tmp/link"
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$tmp/link")' is a symbolic link: refused" \
    "${base[@]}" sparsebackup-scratch="$tmp/link"
echo precious > "$tmp/other"
ln -s "$tmp/other" "$tmp/link2"
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$tmp/link2")' is a symbolic link: refused" \
    "${base[@]}" sparsebackup-scratch="$tmp/link2"
assert_eq precious "$(cat "$tmp/other")" "the target of a planted link"
ln -s "$tmp/nowhere" "$tmp/dangling"
nbdkit_refuses "is a symbolic link: refused" \
    "${base[@]}" sparsebackup-scratch="$tmp/dangling"
[ ! -e "$tmp/nowhere" ] || fail "a dangling link was followed"

# A non-empty file that is not a scratch file of ours.
nbdkit_refuses "sparsebackup-scratch: '$(ere_quote "$tmp/other")' exists and holds 9 bytes that are not a sparsebackup scratch file: refused" \
    "${base[@]}" sparsebackup-scratch="$tmp/other"
assert_eq precious "$(cat "$tmp/other")" "a foreign file named as scratch"

# The cbt file as the scratch file (it exists after a first run).
nbdkit -U - "${base[@]}" --run true
[ -s "$tmp/disk.cbt" ] || fail "no cbt file after a first run"
cbtsum=$(md5sum < "$tmp/disk.cbt")
nbdkit_refuses "is the same file as sparsebackup-(cbt|scratch)=" \
    "${base[@]}" sparsebackup-scratch="$tmp/disk.cbt"
assert_eq "$cbtsum" "$(md5sum < "$tmp/disk.cbt")" "the cbt file after a refused scratch"

# The statistics file and the cbt file: no symbolic links, not the disk.
nbdkit_refuses "sparsebackup-statsfile: '$(ere_quote "$tmp/link2")' is a symbolic link: refused" \
    --filter=sparsebackup memory 1M sparsebackup-statsfile="$tmp/link2"
assert_eq precious "$(cat "$tmp/other")" "the target of a planted link"
nbdkit_refuses "sparsebackup-statsfile: '$(ere_quote "$tmp/disk.img")' is the file of the parameter file=" \
    --filter=sparsebackup file "$tmp/disk.img" sparsebackup-statsfile="$tmp/disk.img"
nbdkit_refuses "sparsebackup-cbt: $(ere_quote "$tmp/link2") is a symbolic link: refused" \
    --filter=sparsebackup memory 1M sparsebackup-cbt="$tmp/link2"
nbdkit_refuses "sparsebackup-cbt: '$(ere_quote "$tmp/disk.img")' is the file of the parameter file=" \
    --filter=sparsebackup file "$tmp/disk.img" sparsebackup-cbt="$tmp/disk.img"
assert_eq "$sum" "$(md5sum < "$tmp/disk.img")" "the disk after the refusals"
assert_eq precious "$(cat "$tmp/other")" "the target of a planted link"

# A scratch file of ours from an earlier run: taken, emptied.
start_nbdkit "${base[@]}" sparsebackup-scratch="$tmp/scratch"
assert_eq 4096 "$(stat -c %s "$tmp/scratch")" "a new scratch file: its header"
head -c 8 "$tmp/scratch" | grep -q SBKSCRT || fail "no scratch header"
stop_nbdkit
head -c 1M /dev/urandom >> "$tmp/scratch"
start_nbdkit "${base[@]}" sparsebackup-scratch="$tmp/scratch"
assert_eq 4096 "$(stat -c %s "$tmp/scratch")" "an old scratch file, emptied"
stop_nbdkit

# ---- Compact: a 32 TiB disk, a write past 16 TiB ---------------------
T=$((1 << 40))
start_nbdkit --filter=sparsebackup memory $((32 * T)) \
    sparsebackup-cbt="$tmp/big.cbt" sparsebackup-control="$ctlsock" \
    sparsebackup-scratch="$tmp/big.scratch" sparsebackup-scratch-error=fail-write
"$nbd_python" - "$sock" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
T = 1 << 40
h.pwrite(b"\x11" * 65536, 20 * T)
h.pwrite(b"\x22" * 65536, 5 * T)
PY
ctl backup-begin b1 >/dev/null
"$nbd_python" - "$sock" <<'PY'
import nbd, sys
h = nbd.NBD(); h.connect_unix(sys.argv[1])
T = 1 << 40
h.pwrite(b"\x33" * 65536, 20 * T)     # fails with fail-write if not saved
h.pwrite(b"\x44" * 65536, 5 * T)
h.pwrite(b"\x55" * 65536, 30 * T)     # old data zero: noted, not stored
PY
ctl status > "$tmp/out"
gran=$(( (32 * T) >> 27 ))             # the frozen disk's granule here
assert_contains "$tmp/out" " frozen=b1 scratch-used=$((2 * gran)) "
assert_eq $((4096 + 2 * gran)) "$(stat -c %s "$tmp/big.scratch")" \
    "the scratch file holds two granules"
"$nbd_python" - "$sock" <<'PY'
import nbd, sys
h = nbd.NBD(); h.set_export_name("@frozen"); h.connect_unix(sys.argv[1])
T = 1 << 40
assert h.pread(65536, 20 * T) == b"\x11" * 65536
assert h.pread(65536, 5 * T) == b"\x22" * 65536
assert h.pread(65536, 30 * T) == bytes(65536)
PY
ctl backup-end b1 --ok >/dev/null
assert_eq 4096 "$(stat -c %s "$tmp/big.scratch")" "the scratch file after backup-end"
stop_nbdkit
echo PASS
