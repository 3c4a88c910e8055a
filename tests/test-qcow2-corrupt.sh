#!/usr/bin/env bash
# qcow2 plugin: crafted corrupt / hostile images (patched by
# qcow2-craft.py) are refused with a clear message naming the problem,
# at start-up or on the read / extents request that meets the bad
# metadata, and nbdkit never dies by a signal.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy nbdinfo python3
cd "$tmp"

fresh ()
{
    qemu-img create -q -f qcow2 -o cluster_size=64k "$1" 8M
    qemu-io -f qcow2 -c 'write -P 0xab 0 64k' -c 'write -P 0xcd 4M 64k' \
        "$1" >/dev/null
}

# ---- Header.
fresh good.qcow2
nbdkit -U - qcow2 file=good.qcow2 --run 'nbdcopy "$uri" out.raw'

cp good.qcow2 t.qcow2; craft t.qcow2 truncate 50
open_error t.qcow2 'file is too small \(50 bytes\) to be a qcow2 image'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 0 0x12345678
open_error t.qcow2 'not a qcow2 image \(bad magic 0x12345678\)'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 4 4
open_error t.qcow2 'unsupported qcow2 version 4'
for cb in 8 22 0 4294967295; do
    cp good.qcow2 t.qcow2; craft t.qcow2 be32 20 $cb
    open_error t.qcow2 "cluster_bits $cb is out of range"
done
cp good.qcow2 t.qcow2; craft t.qcow2 be32 100 7
open_error t.qcow2 'header_length 7 is invalid'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 100 0x100000
open_error t.qcow2 'header_length 1048576 is invalid'
cp good.qcow2 t.qcow2; craft t.qcow2 ext-len 0x6803f857 0xfff0
open_error t.qcow2 'header extension 0x6803f857 at offset 0x[0-9a-f]+ has length 65520, which runs past the end'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 32 1
open_error t.qcow2 'image is encrypted \(crypt_method 1, AES\); encrypted images are not supported'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 32 2
open_error t.qcow2 'image is encrypted \(crypt_method 2, LUKS\)'
cp good.qcow2 t.qcow2; craft t.qcow2 or64 72 0x20
open_error t.qcow2 'unknown incompatible feature\(s\): bit 5 \(incompatible_features 0x20\)'
cp good.qcow2 t.qcow2; craft t.qcow2 or64 72 0x8000000000000000
open_error t.qcow2 'unknown incompatible feature\(s\): bit 63'
cp good.qcow2 t.qcow2; craft t.qcow2 or64 72 2
open_error t.qcow2 'image is marked corrupt \(incompatible feature bit 1\)'
cp good.qcow2 t.qcow2; craft t.qcow2 or64 72 4
open_error t.qcow2 'uses an external data file but does not name it \(use data-file=FILE\)'
cp good.qcow2 t.qcow2; craft t.qcow2 or64 72 8
open_error t.qcow2 'compression_type 0|compression type feature bit'
# The dirty bit is ignored.
cp good.qcow2 t.qcow2; craft t.qcow2 or64 72 1
nbdkit -U - qcow2 file=t.qcow2 --run 'nbdcopy "$uri" out2.raw'
cmp out.raw out2.raw

# ---- L1 table.
cp good.qcow2 t.qcow2; craft t.qcow2 be32 36 0
open_error t.qcow2 'L1 table is too small for the virtual size: l1_size 0 entries cover 0x0 bytes, virtual size 0x800000 needs 1 entries'
cp good.qcow2 t.qcow2; craft t.qcow2 be64 24 0x100000000000
open_error t.qcow2 'L1 table is too small for the virtual size'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 36 0x1000000
open_error t.qcow2 'l1_size 16777216 entries \(134217728 bytes\) is larger than the limit of 33554432 bytes'
cp good.qcow2 t.qcow2; craft t.qcow2 be32 36 0xffffffff
open_error t.qcow2 'l1_size 4294967295 entries .* is larger than the limit'
cp good.qcow2 t.qcow2; craft t.qcow2 be64 40 0x10000000
open_error t.qcow2 'L1 table at offset 0x10000000 \(1 entries\) is beyond the end of the file \(size 0x[0-9a-f]+\)'
cp good.qcow2 t.qcow2; craft t.qcow2 be64 40 0x30200
open_error t.qcow2 'L1 table offset 0x30200 is not aligned to the cluster size \(0x10000\)'

# ---- L2 tables.
cp good.qcow2 t.qcow2; craft t.qcow2 l1 0 0x8000000010000000
open_error t.qcow2 'L2 table offset 0x10000000 \(L1 entry 0\) is beyond the end of the file \(size 0x[0-9a-f]+\)'
cp good.qcow2 t.qcow2; craft t.qcow2 l1add 0 512
open_error t.qcow2 'L2 table offset 0x[0-9a-f]+ \(L1 entry 0\) is not aligned to the cluster size'

# ---- Data clusters (found on read / map).
cp good.qcow2 t.qcow2; craft t.qcow2 l2 0 0x8000000040000000
read_error t.qcow2 'data cluster offset 0x40000000 \(guest offset 0x0\) is beyond the end of the file \(size 0x[0-9a-f]+\)'
cp good.qcow2 t.qcow2; craft t.qcow2 l2add 4194304 512
read_error t.qcow2 'data cluster offset 0x[0-9a-f]+ \(guest offset 0x400000\) is not aligned to the cluster size'

# ---- Compressed clusters.
head -c 1M /dev/zero | tr '\0' 'x' > src.raw
qemu-img convert -c -O qcow2 -o cluster_size=64k src.raw c.qcow2
cp c.qcow2 t.qcow2; craft t.qcow2 l2 65536 0x4000000040000000
read_error t.qcow2 'compressed cluster at offset 0x40000000 \(0x200 bytes, guest offset 0x10000\) is beyond the end of the file'
# Sector count running far past the end of the file.
cp c.qcow2 t.qcow2
coff=$(( ($(stat -c %s t.qcow2) - 1) & ~511 ))
craft t.qcow2 l2 0 $((0x4000000000000000 | (0xff << 54) | coff))
read_error t.qcow2 "compressed cluster at offset $(printf '0x%x' $coff) \\(0x20000 bytes, guest offset 0x0\\) is beyond the end of the file"
# Descriptor pointing at the header: not valid deflate data.
cp c.qcow2 t.qcow2; craft t.qcow2 l2 0 0x4000000000000000
read_error t.qcow2 'compressed cluster at offset 0x0 \(guest offset 0x0\) is corrupt: zlib' nomap
qemu-img convert -c -O qcow2 -o cluster_size=64k,compression_type=zstd \
    src.raw z.qcow2
cp z.qcow2 t.qcow2; craft t.qcow2 l2 0 0x4000000000000000
read_error t.qcow2 'compressed cluster at offset 0x0 \(guest offset 0x0\) is corrupt: zstd' nomap

# ---- Subclusters.
qemu-img create -q -f qcow2 -o extended_l2=on,cluster_size=64k sc.qcow2 8M
qemu-io -f qcow2 -c 'write -P 0xab 0 64k' sc.qcow2 >/dev/null
cp sc.qcow2 t.qcow2; craft t.qcow2 l2bitmap 0 0x0000000100000001
read_error t.qcow2 'invalid subcluster bitmap 0x0000000100000001 at guest offset 0x0'
cp sc.qcow2 t.qcow2; craft t.qcow2 be32 20 13
open_error t.qcow2 'extended L2 entries need a cluster size of at least 16 KiB'
cp sc.qcow2 t.qcow2; craft t.qcow2 l2 0 0
read_error t.qcow2 'L2 entry at guest offset 0x0 has allocated subclusters .* but no host offset'
