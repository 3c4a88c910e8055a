#!/usr/bin/env bash
# Group backups, one server, through the control protocol itself
# (group-prepare, group-commit, group-abort: doc/cbt-protocol.md), with
# sparsebackup-cbt and no scratch file (so the hold works without one).
#  1. prepare answers "prepared" and holds writes: a write issued during
#     the hold does not complete before group-commit and is recorded
#     after the new checkpoint (map --since shows it); held-us counts the
#     wait; meanwhile status shows group=NAME, backup-begin and a second
#     group-prepare from other clients answer "busy" at once.
#  2. group-abort: writes resume, no checkpoint is left.
#  3. The hold times out while the controller's connection stays open
#     and silent: the write completes anyway, the log says why, a late
#     group-commit is refused ("state"), a late group-abort is OK.
#  4. The connection closes while held: aborted, writes resume.
#  5. Any other request on the holding connection, or a commit of
#     another name, aborts the hold with "state".
#  6. Refusals before holding anything: an existing name, an unknown or
#     pending --since, a pending backup.
#  7. A write stuck below the filter (nbdkit's pause filter) keeps the
#     drain from completing: prepare answers "busy" by its hold timeout,
#     holding nothing afterwards.
# Every wait is bounded by the hold timeouts; no assertion depends on
# the machine's speed (a wait that the hold must cause is checked as a
# lower bound only).
source "${srcdir:-.}/functions.sh"
source "${srcdir:-.}/cbt-lib.sh"
requires_nbdsh
requires_filter sparsebackup
requires_filter pause
requires_plugin file

truncate -s 16M "$tmp/disk.raw"
ctlsock=$tmp/ctl.sock
start_nbdkit --filter=sparsebackup --filter=pause file "$tmp/disk.raw" \
    sparsebackup-cbt="$tmp/disk.cbt" sparsebackup-control="$ctlsock" \
    pause-control="$tmp/pause.sock"
ctl backup-begin c0 > /dev/null
ctl backup-end c0 --ok > /dev/null

"$nbd_python" - "$sock" "$ctlsock" "$ctl_bin" "$server_log" \
    "$tmp/pause.sock" <<'PY'
import nbd, re, socket, subprocess, sys, time
sock, ctlsock, ctl_bin, log, pause = sys.argv[1:6]

def fail(msg):
    sys.exit("FAIL: " + msg)

class Ctl:
    """A raw control connection."""
    def __init__(self):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.settimeout(120)
        self.s.connect(ctlsock)
        self.f = self.s.makefile("rb")
        hello = self.f.readline().decode()
        if hello != "HELLO sparsebackup-ctl 2\n":
            fail("hello: %r" % hello)
    def req(self, line):
        self.s.sendall((line + "\n").encode())
        while True:
            l = self.f.readline().decode().rstrip("\n")
            if not l.startswith("* "):
                print("%-45s -> %s" % (line, l))
                return l
    def close(self):
        self.f.close()
        self.s.close()

def expect(reply, regex):
    if not re.fullmatch(regex, reply):
        fail("reply %r does not match /%s/" % (reply, regex))

def ctl(*args, rc=0):
    p = subprocess.run([ctl_bin, ctlsock] + list(args), capture_output=True,
                       text=True, timeout=120)
    if p.returncode != rc:
        fail("sparsebackup-ctl %s: exit %d, expected %d: %s%s" %
             (" ".join(args), p.returncode, rc, p.stdout, p.stderr))
    return (p.stdout + p.stderr).strip()

h = nbd.NBD()
h.connect_unix(sock)

def write_async(offset):
    buf = nbd.Buffer.from_bytearray(bytearray(b"\x5a" * 4096))
    return h.aio_pwrite(buf, offset)

def wait_for(cookie):
    while not h.aio_command_completed(cookie):
        h.poll(-1)

def still_waits(cookie, seconds):
    """The write has not completed SECONDS after it was issued."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        h.poll(max(1, int((end - time.monotonic()) * 1000)))
        if h.aio_command_completed(cookie):
            return False
    return True

def changed_since(cp):
    return [tuple(map(int, l.split())) for l in
            ctl("map", "--since", cp).splitlines() if not l.startswith("OK")]

def log_has(regex):
    # The server logs after it has let the writes go on: wait for it.
    for _ in range(1200):
        if re.search(regex, open(log).read()):
            return True
        time.sleep(0.1)
    return False

# ---- 1. prepare holds writes until commit --------------------------------
a = Ctl()
expect(a.req("group-prepare g1 --since c0 --hold-timeout 30000"),
       r"OK checkpoint=g1 state=prepared since=c0 hold-timeout-ms=30000 "
       r"drain-us=\d+")
expect(ctl("status"), r"OK version=2 .* pending=- latest=c0 .*group=g1")
out = ctl("backup-begin x", rc=1)
if "ERR busy group backup 'g1' is prepared" not in out:
    fail("backup-begin during the hold: %s" % out)
b = Ctl()
expect(b.req("group-prepare g9 --hold-timeout 100"),
       r"ERR busy group backup 'g1' is prepared .*")
cookie = write_async(1 << 20)
if not still_waits(cookie, 0.3):
    fail("a write completed while the group backup held writes")
reply = a.req("group-commit g1")
expect(reply, r"OK checkpoint=g1 state=pending since=c0 held-us=\d+")
held = int(reply.split("held-us=")[1])
if held < 300000:
    fail("held-us=%d, but the write waited 0.3 s" % held)
wait_for(cookie)
ctl("backup-end", "g1", "--ok")
if (1 << 20, 65536) not in changed_since("g1"):
    fail("the write held by the group backup is not recorded after g1: %s"
         % changed_since("g1"))
expect(ctl("status"), r"OK .* pending=- latest=g1 (?!.*group=).*")

# ---- 2. abort -----------------------------------------------------------
expect(a.req("group-prepare g2 --since g1 --hold-timeout 30000"),
       r"OK checkpoint=g2 state=prepared since=g1 .*")
cookie = write_async(2 << 20)
expect(a.req("group-abort g2"), r"OK checkpoint=g2 state=aborted held-us=\d+")
wait_for(cookie)
if "g2" in ctl("checkpoint-list"):
    fail("an aborted group backup left its checkpoint")
expect(ctl("status"), r"OK .* checkpoints=2 pending=- latest=g1 (?!.*group=).*")

# ---- 3. the hold times out, the connection stays open -------------------
expect(a.req("group-prepare g3 --hold-timeout 1000"),
       r"OK checkpoint=g3 state=prepared .* hold-timeout-ms=1000 .*")
cookie = write_async(3 << 20)
wait_for(cookie)          # the server lets it go on by itself
if not log_has(r"group backup 'g3' aborted, writes resumed after \d+ us: "
               r"its hold timed out after 1000 ms"):
    fail("no message for the timed out hold in the log")
expect(a.req("group-commit g3"),
       r"ERR state group backup 'g3' was aborted: its hold timed out .*")
expect(a.req("group-abort g3"), r"OK checkpoint=g3 state=aborted held-us=-")
expect(ctl("status"), r"OK .* checkpoints=2 pending=- latest=g1 (?!.*group=).*")
if (3 << 20, 65536) not in changed_since("g1"):
    fail("the write after a timed out hold is not recorded")

# ---- 4. the connection closes while held ----------------------------------
c = Ctl()
expect(c.req("group-prepare g4 --hold-timeout 60000"), r"OK .*prepared.*")
cookie = write_async(4 << 20)
c.close()
wait_for(cookie)
if not log_has(r"group backup 'g4' aborted, .*: the control connection "
               r"closed"):
    fail("no message for the closed connection in the log")

# ---- 5. anything but its commit or abort aborts the hold ----------------
expect(a.req("group-prepare g5 --hold-timeout 60000"), r"OK .*prepared.*")
expect(a.req("status"), r"ERR state group backup 'g5' is prepared on this "
       r"connection: only group-commit g5 or group-abort g5 may follow; "
       r"'g5' aborted")
expect(a.req("group-commit g5"),
       r"ERR state no group backup 'g5' is prepared on this connection .*")
expect(a.req("group-prepare g6 --hold-timeout 60000"), r"OK .*prepared.*")
expect(a.req("group-commit g7"), r"ERR state group backup 'g6' is prepared "
       r"on this connection, not 'g7': 'g6' aborted")
expect(a.req("group-abort g6"), r"ERR state no group backup 'g6' .*")
expect(a.req("group-commit g0"), r"ERR state no group backup 'g0' .*")
h.pwrite(b"\x01" * 512, 5 << 20)          # writes go on
expect(ctl("status"), r"OK .* checkpoints=2 pending=- latest=g1 (?!.*group=).*")

# ---- 6. refusals --------------------------------------------------------
expect(a.req("group-prepare g1 --hold-timeout 1000"),
       r"ERR exists checkpoint 'g1' exists on this server .*")
expect(a.req("group-prepare g8 --since nope --hold-timeout 1000"),
       r"ERR no-such-checkpoint no checkpoint 'nope' .*")
ctl("backup-begin", "pend", "--since", "g1")
expect(a.req("group-prepare g8 --hold-timeout 1000"),
       r"ERR busy backup 'pend' is pending on this server: end it first .*")
expect(a.req("group-prepare g8 --since pend --hold-timeout 1000"),
       r"ERR state checkpoint 'pend' is pending.*")
ctl("backup-end", "pend", "--failed")
expect(a.req("group-prepare g8 --hold-timeout 0"),
       r"ERR syntax group-prepare: --hold-timeout '0' is not a number .*")
expect(a.req("group-prepare g8"),
       r"ERR syntax group-prepare: missing --hold-timeout .*")
h.pwrite(b"\x01" * 512, 5 << 20)

# ---- 7. a write stuck below the filter: busy by the deadline -----------
p = socket.socket(socket.AF_UNIX)
p.settimeout(120)
p.connect(pause)
p.sendall(b"p")
if p.recv(1) != b"P":
    fail("the pause filter did not pause")
cookie = write_async(6 << 20)
# The write is in flight in the filter once it is recorded.
end = time.monotonic() + 120
while (6 << 20, 65536) not in changed_since("g1"):
    if time.monotonic() > end:
        fail("the write stuck in the pause filter was not recorded within 120 s")
    time.sleep(0.05)
expect(a.req("group-prepare g8 --since g1 --hold-timeout 500"),
       r"ERR busy backup 'g8': the writes, zero requests and trims in "
       r"flight did not end within 500 ms .*")
expect(ctl("status"), r"OK .* pending=- latest=g1 (?!.*group=).*")
p.sendall(b"r")
if p.recv(1) != b"R":
    fail("the pause filter did not resume")
wait_for(cookie)
expect(a.req("group-prepare g8 --since g1 --hold-timeout 30000"),
       r"OK .*prepared.*")
expect(a.req("group-commit g8"), r"OK checkpoint=g8 state=pending .*")
ctl("backup-end", "g8", "--ok")
expect(ctl("checkpoint-list"), r"c0 good .*\ng1 good .*\ng8 good .*\nOK "
       r"checkpoints=3")
h.shutdown()
print("ok")
PY
