#!/usr/bin/env bash
# Relative file names of sparsebackup-cbt, -control and -scratch are taken
# from the directory nbdkit was started in, also when nbdkit forks into
# the background (and changes to "/") before the cbt file is opened by
# the first connection and before the control socket is removed at exit.
# Fails if a file lands anywhere else or the socket is left behind.
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_filter sparsebackup
requires_plugin file
requires nbdinfo --version

mkdir "$tmp/here"
truncate -s 8M "$tmp/here/disk.raw"
pidfile=$tmp/nbdkit.pid
( cd "$tmp/here" &&
  nbdkit -U "$tmp/sock" -P "$pidfile" --filter=sparsebackup file disk.raw \
      sparsebackup-cbt=disk.cbt sparsebackup-control=ctl.sock \
      sparsebackup-scratch=disk.scratch ) ||
    fail "nbdkit (in the background) did not start"
wait_until 60 "nbdkit writing $pidfile" test -s "$pidfile"
pid=$(cat "$pidfile")
cleanup_fn "kill $pid 2>/dev/null"
nbdinfo --size "nbd+unix:///?socket=$tmp/sock" > /dev/null ||
    fail "the first connection was refused (cbt file opened in the wrong directory?)"
[ -s "$tmp/here/disk.cbt" ] || fail "disk.cbt was not created next to disk.raw"
[ -S "$tmp/here/ctl.sock" ] || fail "ctl.sock was not created in the start directory"
[ -f "$tmp/here/disk.scratch" ] || fail "disk.scratch was not created in the start directory"
ctlsock=$tmp/here/ctl.sock
ctl backup-begin c1 > /dev/null
nbdinfo --size "nbd+unix:///@frozen?socket=$tmp/sock" > /dev/null
ctl backup-end c1 --ok > /dev/null
kill "$pid"
for _ in $(seq 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null && fail "nbdkit did not exit within 120 s of SIGTERM"
[ ! -e "$tmp/here/ctl.sock" ] || fail "the control socket was left behind at exit"
echo "test-cbt-relative-paths: ok"
