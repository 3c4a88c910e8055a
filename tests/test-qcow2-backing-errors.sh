#!/usr/bin/env bash
# qcow2 plugin: backing files that must not be followed.  A missing
# backing format (with the qemu-img rebase hint), protocol and json:
# names, unsupported formats, loops (self and two-image), a missing
# backing file; backing=false serves such images (unallocated = zero).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/qcow2-lib.sh"
requires_qcow2 nbdcopy python3
cd "$tmp"

qemu-img create -q -f qcow2 base.qcow2 4M
qemu-io -f qcow2 -c 'write -P 0x11 0 1M' base.qcow2 >/dev/null
qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 top.qcow2
qemu-io -f qcow2 -c 'write -P 0x22 2M 64k' top.qcow2 >/dev/null

# Missing backing format (extension renamed to an unknown type).
cp top.qcow2 nofmt.qcow2
craft nofmt.qcow2 ext-type 0xe2792aca 0x12345678
open_error nofmt.qcow2 "backing file 'base.qcow2' has no recorded backing format and will not be probed; record it with 'qemu-img rebase -u -b base.qcow2 -F FMT .*nofmt.qcow2'"
# ... but backing=false serves it.
nbdkit -U - qcow2 file=nofmt.qcow2 backing=false --run 'nbdcopy "$uri" o.raw'
assert_eq "00 22" "$(for o in 0 $((2*1024*1024)); do
    bytes_at o.raw $o; done | xargs)" "backing=false content"

# Protocol and json: names.
cp top.qcow2 p.qcow2
qemu-img rebase -u -b 'nbd://example.com/disk' -F raw p.qcow2
open_error p.qcow2 "backing file name 'nbd://example.com/disk' looks like a protocol name"
cp top.qcow2 p.qcow2
qemu-img rebase -u -b 'file:base.qcow2' -F qcow2 p.qcow2
open_error p.qcow2 "backing file name 'file:base.qcow2' looks like a protocol name"
cp top.qcow2 j.qcow2
qemu-img rebase -u -b 'json:{"file.filename":"base.qcow2"}' -F qcow2 j.qcow2
open_error j.qcow2 "backing file name 'json:.*' is a json: pseudo-protocol name"
# A ':' after a '/' is a file name.
mkdir -p d
cp base.qcow2 'd/a:b.qcow2'
cp top.qcow2 c.qcow2
qemu-img rebase -u -b 'd/a:b.qcow2' -F qcow2 c.qcow2
nbdkit -U - qcow2 file=c.qcow2 --run 'nbdcopy "$uri" c.raw'
assert_eq "11" "$(bytes_at c.raw 0)" "a:b backing"

# Unsupported backing format.
cp top.qcow2 f.qcow2
qemu-img rebase -u -b base.qcow2 -F vmdk f.qcow2
open_error f.qcow2 "backing file 'base.qcow2' has format 'vmdk', which is not supported"

# Missing backing file.
cp top.qcow2 m.qcow2
qemu-img rebase -u -b nonexistent.qcow2 -F qcow2 m.qcow2
open_error m.qcow2 "m.qcow2: cannot open backing file: .*nonexistent.qcow2: open: No such file or directory"

# Loops: an image naming itself, and a -> b -> a (also via a symlink).
cp top.qcow2 self.qcow2
qemu-img rebase -u -b self.qcow2 -F qcow2 self.qcow2
open_error self.qcow2 "backing file loop: '.*self.qcow2' is already in the backing chain"
qemu-img create -q -f qcow2 b.qcow2 4M
qemu-img create -q -f qcow2 -b b.qcow2 -F qcow2 a.qcow2
ln -s a.qcow2 link.qcow2
qemu-img rebase -u -b link.qcow2 -F qcow2 b.qcow2
open_error a.qcow2 "b.qcow2: backing file loop: '.*link.qcow2' is already in the backing chain"

# A raw backing file whose contents look like qcow2 is still raw.
qemu-img create -q -f qcow2 -b top.qcow2 -F raw r.qcow2
nbdkit -U - qcow2 file=r.qcow2 --run 'nbdcopy "$uri" r.raw'
cmp -n 4 r.raw top.qcow2
