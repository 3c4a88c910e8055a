#!/usr/bin/env python3
"""make-disk.py [--thick] FILE SIZE [OFF:LEN ...]

Write a test disk of SIZE bytes whose only data is at the given byte
ranges: pseudo-random bytes, the same for the same offset, with no
all-zero 256-byte stretch (every 256th byte is 0xa5).

Sparse (default): FILE is created (truncated) and everything outside the
ranges is a hole.  --thick: FILE already holds SIZE bytes of written
zeros (test-read-lib.sh writes them with dd); only the ranges are
overwritten, so every byte stays allocated.
"""
import os
import random
import sys


def main(argv):
    thick = argv[:1] == ["--thick"]
    if thick:
        argv = argv[1:]
    if len(argv) < 2:
        sys.exit(__doc__)
    path, size = argv[0], int(argv[1])
    flags = os.O_WRONLY if thick else os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(path, flags, 0o644)
    try:
        os.ftruncate(fd, size)
        for r in argv[2:]:
            off, ln = (int(x) for x in r.split(":"))
            buf = bytearray(random.Random(off).randbytes(ln))
            for i in range(0, ln, 256):     # never a zero 256-byte stretch
                buf[i] = 0xA5
            os.pwrite(fd, bytes(buf), off)
        os.fsync(fd)
    finally:
        os.close(fd)


if __name__ == "__main__":
    main(sys.argv[1:])
