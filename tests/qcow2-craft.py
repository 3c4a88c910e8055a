#!/usr/bin/env python3
# Patch qcow2 images to make corrupt / hostile ones for the tests.
#
#   qcow2-craft.py IMAGE OP ARGS...
#
# OP:
#   be32 OFFSET VALUE      write a big-endian 32-bit header field
#   be64 OFFSET VALUE      write a big-endian 64-bit field
#   or64 OFFSET VALUE      OR VALUE into a big-endian 64-bit field
#   l1 INDEX VALUE         set L1 entry INDEX
#   l1add INDEX DELTA      add DELTA to L1 entry INDEX
#   l2 GUEST VALUE         set the (first 64 bits of the) L2 entry that
#                          maps guest offset GUEST
#   l2add GUEST DELTA      add DELTA to that L2 entry
#   l2bitmap GUEST VALUE   set the subcluster bitmap (extended L2 only)
#   get-l1 INDEX / get-l2 GUEST   print the entry (hex)
#   ext-type OLD NEW       change the type of header extension OLD
#   ext-len TYPE LEN       change the length of header extension TYPE
#   bitmaps                print the offsets of the bitmaps extension
#                          data, of the bitmap directory and of the
#                          table of its first bitmap, and that table's
#                          first entry, as shell assignments
#                          (ext=... dir=... table=... entry0=...)
#   many-bitmaps COUNT GBITS TABLE_SIZE
#                          replace the bitmap directory by COUNT entries
#                          (b1, c1, c2, ...) copied from the first one,
#                          with granularity_bits GBITS, all sharing one
#                          new all-zero table of TABLE_SIZE entries
#                          appended to the file (cluster aligned); the
#                          new directory is appended after it
#   truncate SIZE          truncate the file
#   write OFFSET HEXBYTES  write raw bytes
#
# Numbers may be decimal or 0x-hex.  Offsets are checked so the script
# itself never writes outside what it means to.

import struct
import sys


def num(s):
    return int(s, 0)


def header(f):
    f.seek(0)
    h = f.read(104)
    (magic, version, bfo, bfs, cbits, size, crypt, l1_size, l1_off) = \
        struct.unpack(">IIQIIQIIQ", h[:48])
    incompat = struct.unpack(">Q", h[72:80])[0] if version >= 3 else 0
    hlen = struct.unpack(">I", h[100:104])[0] if version >= 3 else 72
    return dict(version=version, cbits=cbits, size=size, l1_size=l1_size,
                l1_off=l1_off, incompat=incompat, hlen=hlen, bfo=bfo)


def rd64(f, off):
    f.seek(off)
    return struct.unpack(">Q", f.read(8))[0]


def wr64(f, off, v):
    f.seek(off)
    f.write(struct.pack(">Q", v & 0xffffffffffffffff))


def l2_entry_offset(f, guest):
    h = header(f)
    cs = 1 << h["cbits"]
    ext = bool(h["incompat"] & 16)
    esize = 16 if ext else 8
    entries = cs // esize
    cidx = guest // cs
    l1i, l2i = divmod(cidx, entries)
    l2 = rd64(f, h["l1_off"] + 8 * l1i) & 0x00fffffffffffe00
    if l2 == 0:
        sys.exit("qcow2-craft: no L2 table for guest offset %#x" % guest)
    return l2 + esize * l2i


def extensions(f):
    h = header(f)
    off = h["hlen"]
    f.seek(0)
    data = f.read(1 << h["cbits"])
    while off + 8 <= len(data):
        t, ln = struct.unpack(">II", data[off:off + 8])
        if t == 0:
            return
        yield off, t, ln
        off += 8 + ((ln + 7) & ~7)


def main():
    if len(sys.argv) < 3:
        sys.exit(__doc__ if __doc__ else "usage")
    path, op, args = sys.argv[1], sys.argv[2], sys.argv[3:]
    with open(path, "r+b") as f:
        if op == "be32":
            f.seek(num(args[0]))
            f.write(struct.pack(">I", num(args[1]) & 0xffffffff))
        elif op == "be64":
            wr64(f, num(args[0]), num(args[1]))
        elif op == "or64":
            wr64(f, num(args[0]), rd64(f, num(args[0])) | num(args[1]))
        elif op in ("l1", "l1add", "get-l1"):
            h = header(f)
            off = h["l1_off"] + 8 * num(args[0])
            if op == "l1":
                wr64(f, off, num(args[1]))
            elif op == "l1add":
                wr64(f, off, rd64(f, off) + num(args[1]))
            else:
                print("%#x" % rd64(f, off))
        elif op in ("l2", "l2add", "get-l2", "l2bitmap"):
            off = l2_entry_offset(f, num(args[0]))
            if op == "l2":
                wr64(f, off, num(args[1]))
            elif op == "l2add":
                wr64(f, off, rd64(f, off) + num(args[1]))
            elif op == "l2bitmap":
                wr64(f, off + 8, num(args[1]))
            else:
                print("%#x" % rd64(f, off))
        elif op == "ext-type":
            for off, t, ln in list(extensions(f)):
                if t == num(args[0]):
                    f.seek(off)
                    f.write(struct.pack(">I", num(args[1])))
                    break
            else:
                sys.exit("qcow2-craft: extension %s not found" % args[0])
        elif op == "ext-len":
            for off, t, ln in list(extensions(f)):
                if t == num(args[0]):
                    f.seek(off + 4)
                    f.write(struct.pack(">I", num(args[1])))
                    break
            else:
                sys.exit("qcow2-craft: extension %s not found" % args[0])
        elif op == "bitmaps":
            for off, t, ln in list(extensions(f)):
                if t == 0x23852875:
                    f.seek(off + 8 + 16)
                    d = struct.unpack(">Q", f.read(8))[0]
                    t0 = rd64(f, d)
                    print("ext=%#x dir=%#x table=%#x entry0=%#x"
                          % (off + 8, d, t0, rd64(f, t0)))
                    break
            else:
                sys.exit("qcow2-craft: no bitmaps extension")
        elif op == "many-bitmaps":
            count, gbits, tsize = (num(a) for a in args[:3])
            cs = 1 << header(f)["cbits"]
            for off, t, ln in list(extensions(f)):
                if t == 0x23852875:
                    ext = off + 8
                    break
            else:
                sys.exit("qcow2-craft: no bitmaps extension")
            f.seek(ext + 16)
            d = struct.unpack(">Q", f.read(8))[0]
            f.seek(d)
            fixed = f.read(24)
            end = f.seek(0, 2)
            table = (end + cs - 1) // cs * cs
            dirpos = (table + tsize * 8 + cs - 1) // cs * cs
            out = b""
            for i in range(count):
                name = b"b1" if i == 0 else b"c%d" % i
                e = struct.pack(">QI", table, tsize) + fixed[12:17] + \
                    bytes([gbits]) + struct.pack(">HI", len(name), 0) + name
                out += e + b"\0" * (-len(e) % 8)
            f.truncate(dirpos)
            f.seek(dirpos)
            f.write(out)
            f.seek(ext)
            f.write(struct.pack(">IIQQ", count, 0, len(out), dirpos))
        elif op == "truncate":
            f.truncate(num(args[0]))
        elif op == "write":
            f.seek(num(args[0]))
            f.write(bytes.fromhex(args[1]))
        else:
            sys.exit("qcow2-craft: unknown op " + op)


main()
