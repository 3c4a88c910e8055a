#!/usr/bin/env bash
# sparsebackup-copy does not write raw data over an image file: a target
# that starts with the signature of qcow2, qcow, QED, LUKS, VMDK, VHDX,
# VHD (vpc, dynamic, or fixed with its footer at the end), VDI or
# Parallels (made by qemu-img), or a crafted Bochs or DMG header, is
# refused by a full and by a --delta copy, with a message naming the
# format, and left untouched; --force overwrites it.  A raw copy of a
# disk that itself starts with such a signature (a LUKS-encrypted guest
# disk) is not refused.  The same through an NBD target.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/test-copy-lib.sh"
requires qemu-img --version
requires_plugin file

size=$((4 * 1024 * K))
truncate -s $size "$tmp/disk.img"
head -c $((1024 * K)) /dev/urandom |
    dd of="$tmp/disk.img" bs=1M seek=1 conv=notrunc status=none
start_nbdkit file "$tmp/disk.img"
src=$uri

# refused FILE FORMAT-ERE: full and --delta copies onto FILE are refused
# naming the format, FILE is unchanged; --force overwrites it.
refused ()
{
    local f=$1 fmt=$2 r
    cp "$f" "$tmp/orig"
    for opts in "" --delta; do
        r=0
        "$copy" $opts "$src" "$f" > "$tmp/out" 2> "$tmp/err" || r=$?
        assert_eq 1 $r "exit status of '$opts' onto $(basename "$f")"
        assert_contains "$tmp/err" "DST '$f' holds $fmt \((its first bytes|its footer)\), not a raw copy of SRC: writing raw data over it would destroy it"
        assert_contains "$tmp/err" "or add --force to overwrite it"
        cmp "$tmp/orig" "$f" || fail "$(basename "$f") was changed"
        [ ! -e "$f.sparsebackup-journal" ] || fail "a journal was left beside $f"
    done
    echo "refused: $(basename "$f"): $(head -1 "$tmp/err")"
}

for fmt in qcow2 qcow qed vmdk vhdx vpc vdi parallels; do
    qemu-img create -q -f $fmt "$tmp/t.$fmt" $size
done
qemu-img create -q -f vpc -o subformat=fixed "$tmp/fixed.vpc" $size
qemu-img create -q -f luks --object secret,id=s0,data=x -o key-secret=s0 \
    "$tmp/t.luks" $size 2>/dev/null ||
    printf 'LUKS\xba\xbe\x00\x01' > "$tmp/t.luks"

refused "$tmp/t.qcow2" "a qcow2 image"
refused "$tmp/t.qcow" "a qcow \(version 1\) image"
refused "$tmp/t.qed" "a QED image"
refused "$tmp/t.vmdk" "a VMDK \(sparse extent\) image"
refused "$tmp/t.vhdx" "a VHDX image"
refused "$tmp/t.vpc" "a VHD \(vpc, dynamic\) image"
refused "$tmp/fixed.vpc" "a VHD \(vpc, fixed: footer at the end\) image"
refused "$tmp/t.vdi" "a VDI image"
refused "$tmp/t.parallels" "a Parallels image"
refused "$tmp/t.luks" "a LUKS image"
# Crafted: Bochs, a VMDK descriptor, DMG (footer "koly").
printf 'Bochs Virtual HD Image\0' > "$tmp/t.bochs"
refused "$tmp/t.bochs" "a Bochs image"
printf '# Disk DescriptorFile\nversion=1\n' > "$tmp/t.vmdkdesc"
refused "$tmp/t.vmdkdesc" "a VMDK \(descriptor\) image"
truncate -s $size "$tmp/t.dmg"
printf 'koly' | dd of="$tmp/t.dmg" bs=1 seek=$((size - 512)) conv=notrunc \
    status=none
refused "$tmp/t.dmg" "a DMG image"
# The filter's own files are not backups either.
printf 'SBKCBT\r\n' > "$tmp/t.cbt"
refused "$tmp/t.cbt" "a sparsebackup cbt file"

# --force: the qcow2 file is overwritten by a full copy.
"$copy" --force "$src" "$tmp/t.qcow2" > /dev/null 2>&1
cmp "$tmp/disk.img" "$tmp/t.qcow2" || fail "--force: the copy differs"

# A raw disk that starts with a LUKS header (an encrypted guest disk): its
# raw backup starts with it too, and a --delta pass over it is fine.
cp "$tmp/disk.img" "$tmp/luksdisk.img"
printf 'LUKS\xba\xbe\x00\x02' | dd of="$tmp/luksdisk.img" conv=notrunc status=none
start_nbdkit file "$tmp/luksdisk.img"
luks=$uri
"$copy" -q "$luks" "$tmp/luks-backup.img"
"$copy" -q --delta "$luks" "$tmp/luks-backup.img"
cmp "$tmp/luksdisk.img" "$tmp/luks-backup.img" || fail "LUKS guest: copy differs"
# ... but the backup of another (plain) disk over it is refused.
r=0; "$copy" --delta "$src" "$tmp/luks-backup.img" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status of a plain disk over a LUKS one"
assert_contains "$tmp/err" "holds a LUKS image"

# A fixed VHD of the same size as the source (raw data + footer) through
# an NBD target: refused there too.
qemu-img create -q -f vpc -o subformat=fixed "$tmp/nbd.vpc" $((size - 512))
if [ "$(stat -c %s "$tmp/nbd.vpc")" -eq $size ]; then
    start_nbdkit file "$tmp/nbd.vpc"
    r=0; "$copy" --no-journal "$src" "$uri" 2> "$tmp/err" || r=$?
    assert_eq 1 $r "exit status onto an NBD export holding a fixed VHD"
    assert_contains "$tmp/err" "holds a VHD \(vpc, fixed: footer at the end\) image \(its footer\)"
fi
start_nbdkit file "$tmp/t.qed"
r=0; "$copy" --no-journal "$src" "$uri" 2> "$tmp/err" || r=$?
assert_eq 1 $r "exit status onto an NBD export holding QED"
assert_contains "$tmp/err" "holds a QED image \(its first bytes\)"
