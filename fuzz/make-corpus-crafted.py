#!/usr/bin/env python3
# sparsebackup: hand-crafted qcow2 seeds for the fuzz corpus.
#
# Usage: make-corpus-crafted.py OUTDIR
#
# Called by make-corpus.sh.  Writes small images (mostly 512 byte
# clusters) that qemu-img cannot produce: invalid or unusual headers,
# corrupt L1/L2 entries, odd backing names, a compact image with extended
# L2 entries.  Everything is deterministic.
#
# The builder lays an image out as: header cluster, L1 table, refcount
# table + one refcount block (correct refcounts, unless refcounts=False),
# L2 tables, a shared area for compressed clusters, then data clusters
# (with trim=True the last one trimmed of trailing zeros: the reader
# refuses to read data clusters past the end of the file).  Valid images
# pass `qemu-img check`.

import os
import random
import struct
import subprocess
import sys
import tempfile
import zlib

COPIED = 1 << 63
COMPRESSED = 1 << 62

EXT_END = 0
EXT_BACKING_FMT = 0xe2792aca
EXT_FEATURES = 0x6803f857
EXT_BITMAPS = 0x23852875
EXT_DATA_FILE = 0x44415441


def pattern(seed, n):
    """Deterministic incompressible bytes."""
    r = random.Random(seed)
    return bytes(r.getrandbits(8) for _ in range(n))


def text(n, word=b"sparsebackup qcow2 fuzz "):
    return (word * (n // len(word) + 1))[:n]


def compress(method, data):
    if method == "none":            # already compressed (or garbage)
        return data
    if method == "zlib":
        c = zlib.compressobj(9, zlib.DEFLATED, -12)
        return c.compress(data) + c.flush()
    # zstd: the command line tool writes a standard frame, as QEMU does.
    # Compress a file, not a pipe: with the size known, the frame asks
    # for a small window (QEMU compresses in one call, with the same
    # effect).
    with tempfile.NamedTemporaryFile() as f:
        f.write(data)
        f.flush()
        return subprocess.run(["zstd", "-q", "-19", "-c", "--no-check",
                               f.name], stdout=subprocess.PIPE,
                              check=True).stdout


class Image:
    """A qcow2 image under construction.

    l2 maps guest cluster index -> entry:
      ("data", bytes)              allocated cluster
      ("zero",)                    zero cluster, no allocation (v3)
      ("zeroalloc", bytes)         zero flag + allocated cluster
      ("comp", bytes, method)      compressed cluster ("zlib" / "zstd")
      ("raw", e0[, e1])            literal entry words
      ("sub", alloc, zero, bytes)  extended L2: bitmaps + cluster data
                                   (a cluster is allocated if alloc != 0)
      ("share", g, alloc, zero)    extended L2: the host cluster of guest
                                   cluster g (g's entry comes first)
      ("compin", g, off, data, method)
                                   compressed cluster stored at byte OFF of
                                   the host cluster of guest cluster g
    """

    def __init__(self, cb=9, version=3, size=64 * 1024, extl2=False):
        self.cb = cb
        self.cs = 1 << cb
        self.version = version
        self.size = size
        self.extl2 = extl2
        self.l2 = {}
        self.incompat = 0
        self.compat = 0
        self.autoclear = 0
        self.refcount_order = 4
        self.header_len = None      # default: 104 (112 with compression)
        self.compression_type = None
        self.crypt = 0
        self.exts = []              # (type, bytes)
        self.backing = None         # bytes
        self.l1_size = None         # default: what size needs
        self.l1_patch = {}          # L1 index -> literal entry
        self.refcounts = True
        self.l1_in = None           # guest cluster whose host cluster
                                    # also holds the L1 table (compact)
        self.nb_snapshots = 0
        self.snapshots_offset = 0
        self.trim = False           # cut the last data cluster short

    def l2_entries(self):
        return self.cs // (16 if self.extl2 else 8)

    def build(self):
        cs, cb = self.cs, self.cb
        per_l2 = self.l2_entries()
        shift = cb + (cb - (4 if self.extl2 else 3))
        needed = (self.size + (1 << shift) - 1) >> shift
        l1_size = needed if self.l1_size is None else self.l1_size
        clusters = {}               # index -> bytearray
        data_clusters = set()       # may be trimmed at the end of file
        nxt = [1]

        def alloc(n=1):
            i = nxt[0]
            nxt[0] += n
            for k in range(n):
                clusters[i + k] = bytearray(cs)
            return i

        l1_bytes = max(l1_size * 8, 8)
        if self.l1_in is None:
            l1_idx = alloc((l1_bytes + cs - 1) // cs)
        if self.refcounts:
            rt_idx = alloc()
            rb_idx = alloc()
        l2_idx = {}
        for g in sorted(self.l2):
            t = g // per_l2
            if t not in l2_idx:
                l2_idx[t] = alloc()
        # compressed clusters, packed byte by byte
        comp_area = bytearray()
        comp_base = None
        comp_desc = {}
        for g in sorted(self.l2):
            e = self.l2[g]
            if e[0] == "comp":
                comp_desc[g] = (len(comp_area), compress(e[2], e[1]))
                comp_area += comp_desc[g][1]
                comp_area += b"\0" * (len(comp_area) % 7)   # misalign
        if comp_area:
            n = (len(comp_area) + cs - 1) // cs
            comp_base = alloc(n)
            for k in range(n):
                clusters[comp_base + k][:] = \
                    comp_area[k * cs:(k + 1) * cs].ljust(cs, b"\0")
        # data clusters last
        host = {}
        for g in sorted(self.l2, key=lambda g: (self.l2[g][0] in
                                                 ("share", "compin"), g)):
            e = self.l2[g]
            t, i = divmod(g, per_l2)
            words = []
            if e[0] in ("data", "zeroalloc") or \
               (e[0] == "sub" and e[1] != 0):
                d = host[g] = alloc()
                data_clusters.add(d)
                payload = e[1] if e[0] != "sub" else e[3]
                clusters[d][:len(payload)] = payload
                w0 = COPIED | (d * cs)
                if e[0] == "zeroalloc":
                    w0 |= 1
                words = [w0, 0]
                if e[0] == "sub":
                    words = [w0, (e[2] << 32) | e[1]]
            elif e[0] == "share":
                words = [COPIED | (host[e[1]] * cs), (e[3] << 32) | e[2]]
            elif e[0] == "compin":
                blob = compress(e[4], e[3])
                clusters[host[e[1]]][e[2]:e[2] + len(blob)] = blob
                coff = host[e[1]] * cs + e[2]
                x = 62 - (cb - 8)
                nsec = ((coff + len(blob) - 1) >> 9) - (coff >> 9)
                words = [COMPRESSED | (nsec << x) | coff, 0]
            elif e[0] == "sub":
                words = [0, (e[2] << 32) | e[1]]
            elif e[0] == "zero":
                words = [1, 0]
            elif e[0] == "comp":
                rel, blob = comp_desc[g]
                coff = comp_base * cs + rel
                x = 62 - (cb - 8)
                nsec = ((coff + len(blob) - 1) >> 9) - (coff >> 9)
                words = [COMPRESSED | (nsec << x) | coff, 0]
            elif e[0] == "raw":
                words = [e[1], e[2] if len(e) > 2 else 0]
            else:
                raise ValueError(e)
            if not self.extl2:
                words = words[:1]
            tbl = clusters[l2_idx[t]]
            struct.pack_into(">%dQ" % len(words), tbl,
                             i * 8 * len(words), *words)

        # L1
        l1n = (l1_bytes + cs - 1) // cs
        l1 = bytearray(l1n * cs)
        for t, idx in l2_idx.items():
            if t < l1_size:
                struct.pack_into(">Q", l1, t * 8, COPIED | (idx * cs))
        for t, v in self.l1_patch.items():
            struct.pack_into(">Q", l1, t * 8, v)
        if self.l1_in is not None:
            # The L1 table overwrites the start of a data cluster.
            assert l1n == 1
            l1_idx = host[self.l1_in]
            clusters[l1_idx][:l1_bytes] = l1[:l1_bytes]
        else:
            for k in range(l1n):
                clusters[l1_idx + k][:] = l1[k * cs:(k + 1) * cs]

        # header
        h = bytearray(cs)
        hl = self.header_len
        if hl is None:
            hl = 112 if self.compression_type is not None else 104
        if self.version == 2:
            hl = 72
        struct.pack_into(">4sIQIIQIIQQIIQ", h, 0, b"QFI\xfb", self.version,
                         0, 0, cb, self.size, self.crypt, l1_size,
                         l1_idx * cs,
                         (rt_idx if self.refcounts else l1_idx) * cs, 1,
                         self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            struct.pack_into(">QQQII", h, 72, self.incompat, self.compat,
                             self.autoclear, self.refcount_order, hl)
            if self.compression_type is not None and hl > 104:
                h[104] = self.compression_type
        off = hl
        for typ, data in self.exts:
            struct.pack_into(">II", h, off, typ, len(data))
            room = max(cs - (off + 8), 0)
            h[off + 8:off + 8 + min(len(data), room)] = data[:room]
            off += 8 + ((len(data) + 7) & ~7)
        off += 8                    # end marker (zeros)
        if self.backing is not None and off < cs:
            struct.pack_into(">QI", h, 8, off, len(self.backing))
            h[off:off + len(self.backing)] = self.backing
        assert len(h) == cs
        clusters[0] = h

        # refcounts (16-bit only)
        last = max(clusters)
        if self.refcounts:
            assert last < cs // 2, "too many clusters for one refblock"
            struct.pack_into(">Q", clusters[rt_idx], 0, rb_idx * cs)
            for i in range(last + 1):
                struct.pack_into(">H", clusters[rb_idx], 2 * i, 1)

        out = bytearray()
        for i in range(last + 1):
            out += clusters.get(i, bytearray(cs))
        # trim a data cluster at the end (reading it then fails; metadata
        # must be whole)
        end = len(out)
        while self.trim and last in data_clusters and end > last * cs + 1 and \
                out[end - 1] == 0:
            end -= 1
        return bytes(out[:end])


def ext_string(typ, s):
    return (typ, s if isinstance(s, bytes) else s.encode())


def feature_table(entries):
    out = b""
    for kind, bit, name in entries:
        out += struct.pack(">BB46s", kind, bit, name.encode())
    return out


def deflate_handmade(data, kind):
    """One final raw deflate block of the literals DATA that zlib refuses
    and libdeflate decodes (RFC 1951 forbids them): kind "hlit287" (287
    literal/length codes) or "fixed286" (the fixed code's symbol 286,
    a match of 258 at distance 1, after the literals)."""
    out, nbits = bytearray(), [0]

    def put(v, n):
        for i in range(n):
            if nbits[0] % 8 == 0:
                out.append(0)
            out[-1] |= ((v >> i) & 1) << (nbits[0] % 8)
            nbits[0] += 1

    def canon(lens):
        count = [0] * 16
        for ln in lens:
            count[ln] += 1
        count[0] = 0
        nxt, code = [0] * 16, 0
        for ln in range(1, 16):
            code = (code + count[ln - 1]) << 1
            nxt[ln] = code
        codes = [0] * len(lens)
        for i, ln in enumerate(lens):
            if ln:
                codes[i] = nxt[ln]
                nxt[ln] += 1
        return codes

    def sym(lens, codes, s):
        for i in reversed(range(lens[s])):
            put((codes[s] >> i) & 1, 1)

    if kind == "fixed286":
        lit = [8] * 144 + [9] * 112 + [7] * 24 + [8] * 8
        codes = canon(lit)
        put(1, 1)
        put(1, 2)
        for b in data:
            sym(lit, codes, b)
        sym(lit, codes, 286)
        put(0, 5)
        sym(lit, codes, 256)
        return bytes(out)
    order = [16, 17, 18, 0, 8, 7, 9, 6, 10, 5, 11, 4, 12, 3, 13, 2, 14, 1, 15]
    pre = [4] * 13 + [5] * 6
    pcodes = canon(pre)
    lit = [8] * 255 + [9, 9] + [0] * 30
    dist = [1, 1]
    codes = canon(lit)
    put(1, 1)
    put(2, 2)
    put(len(lit) - 257, 5)
    put(len(dist) - 1, 5)
    put(15, 4)
    for i in range(19):
        put(pre[order[i]], 3)
    for ln in lit + dist:
        sym(pre, pcodes, ln)
    for b in data:
        sym(lit, codes, b)
    sym(lit, codes, 256)
    return bytes(out)


def mini(img):
    """One data cluster, one zero cluster, no refcounts (the reader does
    not use them; qemu-img check reports leaks)."""
    img.l2[1] = ("data", text(img.cs // 2))
    img.l2[2] = ("zero",)
    img.refcounts = False
    return img


def basic(img, seed=1):
    """A mix of cluster kinds in the first L2 table."""
    cs = img.cs
    img.l2[0] = ("data", pattern(seed, cs))
    img.l2[1] = ("data", text(cs))
    img.l2[3] = ("zero",)
    img.l2[4] = ("zeroalloc", b"\xee" * cs)
    img.l2[6] = ("comp", text(cs, b"compressed zlib cluster "), "zlib")
    img.l2[7] = ("data", pattern(seed + 1, cs // 3))
    return img


def main():
    outdir = sys.argv[1]
    os.makedirs(outdir, exist_ok=True)
    seeds = {}

    # A valid v3 image with every kind of standard cluster, a feature name
    # table, an unknown extension and a partial last cluster.
    img = basic(Image(size=64 * 1024 - 512 + 100))
    img.l2[126] = ("data", text(img.cs, b"last cluster "))
    img.compat = 1                  # lazy refcounts
    img.exts = [(EXT_FEATURES, feature_table([
        (0, 0, "dirty bit"), (0, 1, "corrupt bit"),
        (0, 2, "external data file"), (0, 3, "compression type"),
        (0, 4, "extended L2 entries"), (1, 0, "lazy refcounts")])),
        (0x12345678, b"unknown extension, ignored")]
    seeds["c-v3-mix.qcow2"] = img

    # v2 with compressed clusters and a backing file in the header (raw).
    img = basic(Image(version=2, size=40 * 1024))
    del img.l2[3], img.l2[4]        # no zero clusters in v2
    img.backing = b"base.raw"
    img.exts = [ext_string(EXT_BACKING_FMT, "raw")]
    seeds["c-v2-backing-raw.qcow2"] = img

    # Dirty bit set (readable), header_length 112 with compression_type 0.
    img = basic(Image(size=8 * 1024))
    img.refcounts = False
    img.incompat = 1
    img.header_len = 112
    img.compression_type = 0
    seeds["c-v3-dirty.qcow2"] = img

    # zstd compressed clusters, 1 KiB clusters, header_length 120.
    img = Image(cb=10, size=16 * 1024)
    img.refcounts = False
    img.incompat = 1 << 3
    img.compression_type = 1
    img.header_len = 120
    img.l2[0] = ("comp", text(1024, b"zstd cluster "), "zstd")
    img.l2[1] = ("comp", pattern(7, 300) + bytes(724), "zstd")
    img.l2[2] = ("data", text(1024))
    seeds["c-zstd-1k.qcow2"] = img

    # zlib clusters: one block each (libdeflate decodes them in a
    # libdeflate build), many blocks (memLevel 1: zlib), and two that
    # zlib refuses but libdeflate alone would decode (the harness checks
    # that the two decoders agree on every cluster).
    img = Image(cb=12, size=32 * 1024)
    img.refcounts = False
    t = text(4096, b"one deflate block per cluster ")
    img.l2[0] = ("comp", t, "zlib")
    c = zlib.compressobj(6, zlib.DEFLATED, -12, 1)
    img.l2[1] = ("comp", c.compress(pattern(3, 2048) + t[:2048]) + c.flush(),
                 "none")
    img.l2[2] = ("comp", deflate_handmade(t, "hlit287"), "none")
    img.l2[3] = ("comp", deflate_handmade(t[:4096 - 258], "fixed286"),
                 "none")
    img.l2[4] = ("comp", t[:100] + bytes(3996), "zlib")
    seeds["c-zlib-decoders.qcow2"] = img

    # Extended L2 entries (16 KiB clusters, 512 byte subclusters), without
    # refcounts to stay small: every kind of subcluster state.
    img = Image(cb=14, size=1024 * 1024 + 3 * 512, extl2=True)
    img.refcounts = False
    img.incompat = 1 << 4
    sub = 512
    alloc = 0x00000013              # subclusters 0-1, 4
    zero = 0x00ff0000               # subclusters 16-23
    # One host cluster shared by all allocated guest clusters, and a
    # compressed cluster
    # stored inside it, in a subcluster that guest cluster 0 marks zero.
    # The L1 table (one entry) is the first 8 bytes of that cluster: the
    # file is header, L2 table, data cluster (about 37 KiB).
    img.l1_in = 0
    img.l2[0] = ("sub", alloc, zero, pattern(3, 5 * sub))
    img.l2[1] = ("share", 0, 0xffffffff, 0)
    img.l2[2] = ("sub", 0, 0xffffffff, b"")
    img.l2[3] = ("sub", 0, 0x80000001, b"")
    img.l2[4] = ("compin", 0, 2 * sub + 8,
                 text(16384, b"compressed in extended L2 "), "zlib")
    img.l2[64] = ("share", 0, 0x1, 0x2)     # last, partial
    seeds["c-extl2-16k.qcow2"] = img

    # A 16 MiB virtual disk (not a multiple of the cluster size) with
    # 1 KiB clusters: L2 tables at both ends.
    img = Image(cb=10, size=16 * 1024 ** 2 + 4096 - 1536)
    img.refcounts = False
    img.l2[0] = ("data", text(1024))
    img.l2[127] = ("zero",)
    last = (img.size - 1) // 1024
    img.l2[last] = ("data", pattern(5, 1024))
    img.l2[last - 1] = ("comp", text(1024, b"end "), "zlib")
    seeds["c-64m-1k.qcow2"] = img

    # An empty disk.
    seeds["c-empty.qcow2"] = Image(size=0)

    # Three-layer chain through the harness: the image itself, then the
    # built-in base image (see fuzz-qcow2.c).
    img = basic(Image(size=256 * 1024))
    img.l2[300] = ("zero",)
    img.backing = b"chain.qcow2"
    img.exts = [ext_string(EXT_BACKING_FMT, "qcow2")]
    seeds["c-backing-chain.qcow2"] = img

    # The backing file is the harness's base image with read errors past
    # its L1 table (see fuzz-qcow2.c).
    img = mini(Image(size=64 * 1024))
    img.backing = b"eio.qcow2"
    img.exts = [ext_string(EXT_BACKING_FMT, "qcow2")]
    seeds["c-backing-eio.qcow2"] = img

    # Backing file errors and refusals.
    for name, backing, fmt in [
            ("c-backing-nofmt.qcow2", b"base.qcow2", None),
            ("c-backing-vmdk.qcow2", b"base.vmdk", "vmdk"),
            ("c-backing-missing.qcow2", b"missing.qcow2", "qcow2"),
            ("c-backing-loop.qcow2", b"loop.qcow2", "qcow2"),
            ("c-backing-self.qcow2", b"self.qcow2", "qcow2"),
            ("c-backing-json.qcow2", b'json:{"file.filename":"/etc/passwd"}',
             "raw"),
            ("c-backing-protocol.qcow2", b"nbd:localhost:10809", "raw")]:
        img = Image(size=8 * 1024)
        img.refcounts = False
        img.l2[1] = ("data", text(512))
        img.backing = backing
        if fmt:
            img.exts = [ext_string(EXT_BACKING_FMT, fmt)]
        seeds[name] = img

    # External data file (named "data.raw": the harness serves its raw
    # file), with the raw bit, plus a backing file (not allowed).
    img = Image(size=64 * 1024)
    img.incompat = 1 << 2
    img.autoclear = 1 << 1
    img.l2[0] = ("raw", COPIED | 0)
    img.l2[2] = ("raw", COPIED | 2 * 512)
    img.l2[3] = ("zero",)
    img.exts = [ext_string(EXT_DATA_FILE, "data.raw")]
    seeds["c-datafile-raw.qcow2"] = img
    img = Image(size=64 * 1024)
    img.incompat = 1 << 2
    img.autoclear = 1 << 1
    img.l2[5] = ("raw", COPIED | 5 * 512)
    img.backing = b"base.qcow2"
    img.exts = [ext_string(EXT_DATA_FILE, "data.raw"),
                ext_string(EXT_BACKING_FMT, "qcow2")]
    seeds["c-datafile-backing.qcow2"] = img
    img = Image(size=64 * 1024)
    img.incompat = 1 << 2
    img.l2[5] = ("raw", COPIED | 5 * 512)
    seeds["c-datafile-noname.qcow2"] = img

    # Refused headers.
    img = mini(Image(size=8 * 1024))
    img.incompat = (1 << 9) | (1 << 40)
    img.exts = [(EXT_FEATURES, feature_table([(0, 9, "future feature"),
                                              (0, 40, "x" * 46)]))]
    seeds["c-unknown-incompat.qcow2"] = img
    img = mini(Image(size=8 * 1024))
    img.incompat = 2
    seeds["c-corrupt-bit.qcow2"] = img
    img = mini(Image(size=8 * 1024))
    img.crypt = 1
    seeds["c-aes.qcow2"] = img
    img = mini(Image(size=8 * 1024))
    img.incompat = 1 << 4             # extended L2 with 512 B clusters
    seeds["c-extl2-512.qcow2"] = img
    img = mini(Image(size=8 * 1024))
    img.incompat = 1 << 3             # zstd bit without the field
    seeds["c-compression-nofield.qcow2"] = img
    img = mini(Image(size=64 * 1024))
    img.l1_size = 1                   # L1 too small for the size
    seeds["c-l1-too-small.qcow2"] = img
    img = mini(Image(size=8 * 1024))
    img.exts = [(0x11111111, b"x" * 5000)]   # runs past the cluster
    img.header_len = 104
    seeds["c-ext-overflow.qcow2"] = img

    # Corrupt zstd clusters: garbage after the frame magic, a frame that
    # decompresses to more than a cluster, a truncated frame.
    img = Image(cb=10, size=8 * 1024)
    img.refcounts = False
    img.incompat = 1 << 3
    img.compression_type = 1
    img.l2[0] = ("comp", text(1024, b"good "), "zstd")
    img.l2[5] = ("data", text(100))
    img.l2[2] = ("compin", 5, 100,
                 b"\x28\xb5\x2f\xfd" + pattern(9, 150), "none")
    img.l2[3] = ("compin", 5, 300, text(2048, b"too big "), "zstd")
    img.l2[4] = ("compin", 5, 600,
                 compress("zstd", pattern(10, 1024))[:60], "none")
    seeds["c-zstd-bad.qcow2"] = img

    # Corrupt tables: reading fails, but not everywhere.
    img = basic(Image(size=64 * 1024))
    img.refcounts = False
    img.l2[10] = ("raw", COPIED | 0x1000000)          # beyond EOF
    img.l2[11] = ("raw", COPIED | 0x601)              # unaligned
    img.l2[12] = ("raw", COMPRESSED | 0xffffff)       # beyond EOF
    img.l2[13] = ("raw", COMPRESSED | (1 << 60) | 0x400)   # garbage data
    img.l2[70] = ("raw", COPIED | 0x400)              # metadata as data
    seeds["c-bad-l2.qcow2"] = img
    img = mini(Image(size=64 * 1024))
    img.l1_patch = {1: COPIED | 0x10000000}          # L2 beyond EOF
    seeds["c-bad-l1.qcow2"] = img
    img = mini(Image(size=64 * 1024, cb=10))
    img.l1_patch = {0: COPIED | 0x200}               # unaligned L2
    seeds["c-bad-l1-unaligned.qcow2"] = img

    # Entries QEMU refuses (reading them fails, opening does not): the
    # zero flag in v2 (with and without an offset), a misaligned
    # preallocated zero cluster, an extended entry without allocated
    # subclusters at a misaligned offset, a data file cluster away from
    # its guest offset; a data cluster cut short by the end of the file;
    # a virtual size that is not a multiple of 512.
    img = basic(Image(version=2, size=40 * 1024))
    del img.l2[3], img.l2[4]
    img.l2[5] = ("raw", 1)
    img.l2[8] = ("raw", COPIED | 0x400 | 1)
    seeds["c-v2-zero-flag.qcow2"] = img
    img = basic(Image(cb=10, size=16 * 1024))
    img.l2[9] = ("raw", 0x600 | 1)
    seeds["c-zero-prealloc-unaligned.qcow2"] = img
    img = Image(cb=14, size=128 * 1024, extl2=True)
    img.refcounts = False
    img.incompat = 1 << 4
    img.l2[0] = ("sub", 0x3, 0, pattern(4, 1024))
    img.l2[1] = ("raw", COPIED | 0x4200, 0)
    img.l2[2] = ("raw", COPIED | 0x4200, 0xffffffff << 32)
    seeds["c-extl2-unalloc-unaligned.qcow2"] = img
    img = Image(size=64 * 1024)
    img.incompat = 1 << 2
    img.l2[0] = ("raw", COPIED | 0)
    img.l2[2] = ("raw", COPIED | 3 * 512)
    img.l2[4] = ("raw", COPIED | 4 * 512 | 1)
    img.exts = [ext_string(EXT_DATA_FILE, "data.raw")]
    seeds["c-datafile-mismatch.qcow2"] = img
    img = Image(size=8 * 1024)
    img.l2[0] = ("data", text(300))
    img.l2[1] = ("zero",)
    img.trim = True
    seeds["c-data-truncated.qcow2"] = img
    img = mini(Image(size=8 * 1024 - 100))
    seeds["c-odd-size.qcow2"] = img

    for name, img in sorted(seeds.items()):
        data = img.build()
        with open(os.path.join(outdir, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
