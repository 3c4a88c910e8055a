#!/usr/bin/env python3
"""Data extents of a file according to SEEK_DATA/SEEK_HOLE.

As a module (wlib.py imports it): data_ranges(path).
As a program (functions.sh: data_bytes FILE): extents.py FILE prints the
number of bytes in data extents.
"""
import os
import sys


def data_ranges(path):
    """[(offset, length)] of data according to SEEK_DATA/SEEK_HOLE."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        off, out = 0, []
        while off < size:
            try:
                d = os.lseek(fd, off, os.SEEK_DATA)
            except OSError:
                break
            e = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, e - d))
            off = e
        return out
    finally:
        os.close(fd)


if __name__ == "__main__":
    print(sum(ln for _, ln in data_ranges(sys.argv[1])))
