#!/usr/bin/env python3
# Check the qcow2 plugin against qemu-img on one image.
#
#   qcow2-check.py [options] IMAGE [NBDKIT-PARAM...]
#
# 1. content: `nbdkit qcow2 file=IMAGE PARAMS --run 'nbdcopy "$uri" out'`
#    must be identical to `qemu-img convert -O raw`;
# 2. the same through nbdkit's offset filter with an odd offset and odd
#    request sizes without extents (unaligned reads of every kind);
# 3. map: `nbdinfo --map --json` through the plugin must equal
#    `qemu-img map --output=json` after both are reduced to runs of
#    "data" / "zero" (qemu: data:true -> data, otherwise zero; nbdkit:
#    type & 2 (zero) -> zero, otherwise data) and adjacent equal runs
#    are merged.
#
# Options:
#   --qemu-image NAME       give qemu-img NAME instead of IMAGE (e.g. a
#                           json: name saying "backing": null)
#   --expect-data N         the plugin's map must have N bytes of data
#   --expect-size N         the virtual size must be N
#   --tmp DIR               scratch directory (default: $tmp or mkdtemp)
#
# Exits 0 if everything matches, 1 otherwise (with the differences).

import json
import os
import subprocess
import sys
import tempfile


def die(msg):
    print("qcow2-check: FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def run(cmd, **kw):
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       **kw)
    if p.returncode < 0 or p.returncode >= 128:
        die("%s was killed by a signal (status %d)\n%s" %
            (cmd[0], p.returncode, p.stderr.decode(errors="replace")))
    if p.returncode != 0:
        die("%s failed (status %d):\n%s" %
            (" ".join(cmd), p.returncode,
             p.stderr.decode(errors="replace")))
    return p.stdout


def runs_merge(runs):
    out = []
    for start, length, kind in runs:
        if length == 0:
            continue
        if out and out[-1][2] == kind and out[-1][0] + out[-1][1] == start:
            out[-1] = (out[-1][0], out[-1][1] + length, kind)
        else:
            out.append((start, length, kind))
    return out


def fmt_runs(runs):
    return "\n".join("  %12d %12d %s" % r for r in runs)


def files_equal(a, b, skip_a=0):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        fa.seek(skip_a)
        pos = 0
        while True:
            x = fa.read(1 << 20)
            y = fb.read(1 << 20)
            if x != y:
                for i in range(min(len(x), len(y))):
                    if x[i] != y[i]:
                        return "first difference at byte %d" % (pos + i)
                return "lengths differ (%d vs %d near %d)" % (
                    len(x), len(y), pos)
            if not x:
                return None
            pos += len(x)


def main():
    args = sys.argv[1:]
    qopts = None
    expect_data = None
    expect_size = None
    tmpdir = os.environ.get("tmp")
    while args and args[0].startswith("--"):
        opt = args.pop(0)
        if opt == "--qemu-image":
            qopts = args.pop(0)
        elif opt == "--expect-data":
            expect_data = int(args.pop(0))
        elif opt == "--expect-size":
            expect_size = int(args.pop(0))
        elif opt == "--tmp":
            tmpdir = args.pop(0)
        else:
            die("unknown option " + opt)
    if not args:
        die("usage: qcow2-check.py [options] IMAGE [NBDKIT-PARAM...]")
    image = args[0]
    params = args[1:]
    if not tmpdir:
        tmpdir = tempfile.mkdtemp()
    work = tempfile.mkdtemp(dir=tmpdir)
    ref = os.path.join(work, "ref.raw")
    out = os.path.join(work, "out.raw")
    out2 = os.path.join(work, "out2.raw")
    mapf = os.path.join(work, "map.json")
    name = os.path.basename(image)

    qimg = [qopts] if qopts else [image]
    run(["qemu-img", "convert", "-O", "raw"] + qimg + [ref])
    qmap = json.loads(run(["qemu-img", "map", "--output=json"] + qimg))

    size = os.path.getsize(ref)
    # An odd offset for the unaligned pass, smaller than the disk.
    skip = 777 if size > 777 else 0
    script = ('nbdcopy "$uri" %s && nbdinfo --map --json "$uri" > %s' %
              (out, mapf))
    run(["nbdkit", "-U", "-", "qcow2", "file=" + image] + params +
        ["--run", script])
    run(["nbdkit", "-U", "-", "--filter=offset", "qcow2",
         "file=" + image] + params + ["offset=%d" % skip, "--run",
         'nbdcopy --no-extents --request-size=4096 --requests=4 '
         '"$uri" %s' % out2])

    diff = files_equal(out, ref)
    if diff:
        die("%s: content differs from qemu-img convert: %s" % (name, diff))
    diff = files_equal(ref, out2, skip_a=skip)
    if diff:
        die("%s: unaligned reads differ from qemu-img convert: %s" %
            (name, diff))

    with open(mapf) as f:
        pmap = json.load(f)
    qruns = runs_merge([(e["start"], e["length"],
                         "data" if e.get("data") else "zero")
                        for e in qmap])
    pruns = runs_merge([(e["offset"], e["length"],
                         "zero" if e["type"] & 2 else "data")
                        for e in pmap])
    if qruns != pruns:
        die("%s: map differs from qemu-img map\nqemu-img:\n%s\nplugin:\n%s"
            % (name, fmt_runs(qruns), fmt_runs(pruns)))
    total = sum(r[1] for r in pruns)
    if total != size:
        die("%s: map covers %d bytes, disk size is %d" % (name, total, size))
    data = sum(r[1] for r in pruns if r[2] == "data")
    if expect_size is not None and size != expect_size:
        die("%s: size %d, expected %d" % (name, size, expect_size))
    if expect_data is not None and data != expect_data:
        die("%s: %d bytes of data in the map, expected %d\n%s" %
            (name, data, expect_data, fmt_runs(pruns)))
    print("qcow2-check: %s: OK: size %d, %d data bytes, %d runs" %
          (name, size, data, len(pruns)))


main()
