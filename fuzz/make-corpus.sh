#!/usr/bin/env bash
# sparsebackup: regenerate the seed corpus of the qcow2 fuzz harness.
#
# Usage: fuzz/make-corpus.sh [OUTDIR]      (default: fuzz/corpus)
#
# Needs qemu-img and qemu-io (qemu-utils), python3 and zstd.  OUTDIR is
# emptied of *.qcow2 first.  Two kinds of seeds:
#
#   q-*.qcow2  made by qemu-img / qemu-io: versions 2 and 3, cluster sizes
#              512 B and 1 KiB (small clusters keep the images a few KiB),
#              refcount widths 1 and 64, data / zero / discarded clusters,
#              zlib and zstd compression, internal snapshot, persistent
#              bitmap, preallocated metadata, backing files (qcow2 and
#              raw, with a recorded backing format), a three-layer chain,
#              external data files (with and without data_file_raw).
#   c-*.qcow2  hand-crafted by make-corpus-crafted.py: what qemu-img will
#              not write (extended L2 entries in a compact layout, bad
#              headers, corrupt L1/L2 entries, refused backing names).
#
# The images are self-contained: the harness never opens host files.
# Backing and data files are served from memory according to their NAME
# (see the comment at the top of fuzz-qcow2.c), so the names below
# matter: "base.qcow2" (a built-in qcow2 base), "*.raw" (a built-in raw
# file with holes), "chain-*.qcow2" (the image itself, then the base).
# The real files created here only let qemu-io write the overlays.
#
# Images with an internal snapshot or a bitmap contain timestamps and
# random data comes from a fixed seed; everything else is reproducible
# byte for byte.  Keep the total small (the corpus is committed): check
# with `du -cb fuzz/corpus`.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/corpus}
mkdir -p "$out"
out=$(cd "$out" && pwd)

for t in qemu-img qemu-io python3 zstd; do
    command -v "$t" >/dev/null || { echo "$0: $t is required" >&2; exit 1; }
done

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
ulimit -c 0

create () { qemu-img create -q -f qcow2 "$@"; }

# io IMAGE CMD...: run qemu-io commands on a qcow2 image.
io ()
{
    local img=$1 c args=()
    shift
    for c in "$@"; do args+=(-c "$c"); done
    qemu-io -f qcow2 "${args[@]}" "$img" >/dev/null
}

# Deterministic data: text (compressible) or pseudo-random bytes.
gen_text () { python3 -c 'import sys; n=int(sys.argv[1]); w=b"sparsebackup corpus text "; sys.stdout.buffer.write((w*(n//len(w)+1))[:n])' "$1"; }
gen_rand () { python3 -c 'import random,sys; r=random.Random(int(sys.argv[2])); sys.stdout.buffer.write(bytes(r.getrandbits(8) for _ in range(int(sys.argv[1]))))' "$1" "$2"; }

# --- version 2, 512 byte clusters ---------------------------------------
create -o compat=0.10,cluster_size=512 q-v2-512.qcow2 64K
io q-v2-512.qcow2 \
   'write -P 0x11 0 1536' 'write -P 0x22 8K 512' \
   'write -P 0x33 32512 1024' 'write -z 16K 1K' 'write -P 0x44 65024 512'

# --- version 3: data, zero clusters, discard, unaligned writes ---------
create -o compat=1.1,cluster_size=512 q-v3-512.qcow2 96K
io q-v3-512.qcow2 \
   'write -P 0x44 0 3K' 'write -z 1K 1K' 'discard 2560 512' \
   'write -P 0x55 50000 1000' 'write -z 60K 8K' 'write -z -u 70K 2K' \
   'write -P 0x66 97792 512'

# 64-bit refcounts, virtual size not a multiple of the L2 coverage.
create -o cluster_size=512,refcount_bits=64 q-v3-rc64.qcow2 101888
io q-v3-rc64.qcow2 \
   'write -P 0x77 0 1K' 'write -P 0x78 101376 512' 'write -z 40K 4K'

# 1-bit refcounts, lazy refcounts left dirty (qemu-io aborts before it
# can clear the dirty bit).
create -o cluster_size=512,refcount_bits=1,lazy_refcounts=on \
    q-v3-dirty.qcow2 128K
io q-v3-dirty.qcow2 \
   'write -P 0x79 0 512' 'write -P 0x7a 64K 512' 'write -P 0x7b 130560 512' \
   abort 2>/dev/null || true

# Preallocated metadata (allocated clusters with the zero flag).
create -o cluster_size=512,preallocation=metadata q-v3-prealloc.qcow2 2K
io q-v3-prealloc.qcow2 'write -P 0x7c 1K 1K'

# --- compression ---------------------------------------------------------
{ gen_text 4096; gen_rand 2048 1; head -c 2048 /dev/zero; gen_text 3000
  gen_rand 700 2; } > src.raw
truncate -s 12K src.raw
qemu-img convert -q -c -f raw -O qcow2 -o cluster_size=512 \
    src.raw q-zlib-512.qcow2
qemu-img convert -q -c -f raw -O qcow2 \
    -o cluster_size=1024,compression_type=zstd src.raw q-zstd-1k.qcow2
# A compressed cluster overwritten: data next to compressed data.
io q-zstd-1k.qcow2 'write -P 0x7d 1K 1K' 'write -z 6K 1K'

# --- internal snapshot and persistent bitmap -----------------------------
create -o cluster_size=512 q-snapshot.qcow2 32K
io q-snapshot.qcow2 'write -P 0x81 0 1K'
qemu-img snapshot -c snap1 q-snapshot.qcow2
io q-snapshot.qcow2 'write -P 0x82 512 512'

create -o cluster_size=512 q-bitmap.qcow2 32K
qemu-img bitmap --add q-bitmap.qcow2 b0
io q-bitmap.qcow2 'write -P 0x84 1K 1K'

# --- persistent bitmaps (the @since views) --------------------------------
# Several kinds of bitmaps in one image; a bitmap in both layers of a
# chain (the harness serves "chain-*" as the input itself, then the
# base); crafted variants patched with tests/qcow2-craft.py: in use, an
# all-ones table entry, a table entry with reserved bits.
create -o cluster_size=512 q-bitmaps.qcow2 48K
qemu-img bitmap --add -g 512 q-bitmaps.qcow2 fine
qemu-img bitmap --add -g 4096 q-bitmaps.qcow2 coarse
qemu-img bitmap --add q-bitmaps.qcow2 off
qemu-img bitmap --disable q-bitmaps.qcow2 off
io q-bitmaps.qcow2 'write -P 0x85 1K 1K' 'write -z 20K 2K' \
   'write -P 0x86 47K 512'
qemu-img bitmap --add -g 512 q-bitmaps.qcow2 merged
qemu-img bitmap --merge coarse q-bitmaps.qcow2 merged

create -o cluster_size=512 chain-bm.qcow2 32K
qemu-img bitmap --add -g 512 chain-bm.qcow2 ck
io chain-bm.qcow2 'write -P 0x87 2K 1K'
create -o cluster_size=512 -b chain-bm.qcow2 -F qcow2 q-bitmap-chain.qcow2
qemu-img bitmap --add -g 512 q-bitmap-chain.qcow2 ck
io q-bitmap-chain.qcow2 'write -P 0x88 8K 512'

craft () { python3 "$here/../tests/qcow2-craft.py" "$@"; }
for v in inuse ones badentry; do
    create -o cluster_size=512 "c-bitmap-$v.qcow2" 32K
    qemu-img bitmap --add -g 512 "c-bitmap-$v.qcow2" b0
    io "c-bitmap-$v.qcow2" 'write -P 0x89 3K 1K'
    eval "$(craft "c-bitmap-$v.qcow2" bitmaps)"
    case $v in
        inuse) craft "c-bitmap-$v.qcow2" be32 $((dir + 12)) 3 ;;
        ones) craft "c-bitmap-$v.qcow2" be64 "$table" 1 ;;
        badentry) craft "c-bitmap-$v.qcow2" be64 "$table" $((entry0 | 4)) ;;
    esac
done

# --- backing files ---------------------------------------------------------
create -o cluster_size=512 base.qcow2 64K
io base.qcow2 'write -P 0x91 0 8K' 'write -P 0x92 32K 4K'
create -o cluster_size=512 -b base.qcow2 -F qcow2 q-backing-qcow2.qcow2
io q-backing-qcow2.qcow2 \
   'write -P 0x93 1K 1K' 'write -z 4K 1K' 'write -P 0x94 40K 512'

gen_rand 65536 3 > base.raw
create -o cluster_size=512 -b base.raw -F raw q-backing-raw.qcow2
io q-backing-raw.qcow2 'write -P 0x95 0 512' 'write -z 2K 2K'

# Three layers: chain-mid.qcow2 (over base.qcow2) under the top image.
create -o cluster_size=512 -b base.qcow2 -F qcow2 chain-mid.qcow2
io chain-mid.qcow2 'write -P 0x97 8K 2K' 'write -z 0 512'
create -o cluster_size=512 -b chain-mid.qcow2 -F qcow2 q-chain.qcow2
io q-chain.qcow2 'write -P 0x98 1K 512' 'write -z 9K 512'

# A backing file with a larger cluster size and a smaller virtual size.
create -o cluster_size=2048 base-small.qcow2 16K
io base-small.qcow2 'write -P 0x99 0 16K'
create -o cluster_size=512 -b base-small.qcow2 -F qcow2 \
    q-backing-short.qcow2 32K
io q-backing-short.qcow2 'write -P 0x9a 15K 2K'

# --- external data files ---------------------------------------------------
create -o cluster_size=512,data_file=data.raw q-datafile.qcow2 64K
io q-datafile.qcow2 'write -P 0xa1 0 2K' 'write -z 4K 1K' 'write -P 0xa2 60K 1K'
create -o cluster_size=512,data_file=data-rawbit.raw,data_file_raw=on \
    q-datafile-rawbit.qcow2 64K
io q-datafile-rawbit.qcow2 'write -P 0xa3 0 1K' 'write -P 0xa4 32K 1K'

# --- hand-crafted ------------------------------------------------------------
python3 "$here/make-corpus-crafted.py" crafted

# --- install ---------------------------------------------------------------
rm -f "$out"/*.qcow2
cp q-*.qcow2 c-bitmap-*.qcow2 crafted/*.qcow2 "$out"/
echo "$0: $(ls "$out" | wc -l) seeds, $(du -cb "$out"/* | tail -n1 | cut -f1) bytes in $out"
