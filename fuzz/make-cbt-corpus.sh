#!/usr/bin/env bash
# Regenerate fuzz/cbt-corpus/, the seed corpus of fuzz-cbt.c, with the
# library itself (common/cbt*.c, compiled here with the host cc): version
# 2 files
#   empty       a new set, no checkpoints, closed cleanly
#   three       three good checkpoints with changes, closed cleanly
#   pending     two good checkpoints and a pending one (merged at load)
#   in-use      copied while open in in-use mode (invalidated at load)
#   wal-in-use  copied while open in write-ahead mode (kept at load)
#   ps-in-use   copied while open in process-safe mode, boot "fuzz-boot"
#               (the harness's: kept at load)
#   torn        'three' with its newest superblock half overwritten
#   gran-512    granularity 512, a partial last granule
#   pages       a 256M disk at 512 byte granules (16 bitmap pages):
#               changes on several pages, records merged by deletes
#               (shared and ORed pages)
#   bad-magic   not a cbt file
# The v1-* seeds are version 1 files (converted at load), made by the
# version 1 library: this script leaves them.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
out=$top/fuzz/cbt-corpus
tmp=$(mktemp -d "${TMPDIR:-/tmp}/make-cbt-corpus.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
: > "$tmp/config.h"

cat > "$tmp/gen.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "cbt.h"

static char err[CBT_ERRLEN];
#define OK(x) do { if ((x) == -1) { fprintf (stderr, "%s: %s\n", #x, err); \
                                     exit (1); } } while (0)

static struct cbt *
make (const char *path, uint64_t size, uint32_t gran, enum cbt_mode mode)
{
  struct cbt_options o = { .disk_size = size, .granularity = gran,
    .identity = "seed-disk", .mode = mode, .boot_id = "fuzz-boot",
    .create = true, .reset = true };
  struct cbt *c;
  OK (cbt_open (path, &o, &c, NULL, err, sizeof err));
  return c;
}

static void
changes (struct cbt *c, uint64_t off)
{
  uint64_t t;
  OK (cbt_mark (c, off, 70000, &t));
  OK (cbt_commit (c, t));
}

static void
copy (const char *from, const char *to)
{
  char cmd[1024];
  snprintf (cmd, sizeof cmd, "cp '%s' '%s'", from, to);
  if (system (cmd) != 0) exit (1);
}

int
main (int argc, char **argv)
{
  const char *d = argv[1];
  char p[512], q[512];
  struct cbt *c;

  snprintf (p, sizeof p, "%s/empty", d);
  c = make (p, 1 << 20, 0, CBT_MODE_IN_USE);
  OK (cbt_close (c, err, sizeof err));

  snprintf (p, sizeof p, "%s/three", d);
  c = make (p, 1 << 20, 0, CBT_MODE_IN_USE);
  changes (c, 0);
  OK (cbt_checkpoint_create (c, "a", false, err, sizeof err));
  changes (c, 200000);
  OK (cbt_checkpoint_create (c, "b", false, err, sizeof err));
  changes (c, 500000);
  OK (cbt_checkpoint_create (c, "c", false, err, sizeof err));
  changes (c, (1 << 20) - 70000);
  OK (cbt_close (c, err, sizeof err));

  snprintf (p, sizeof p, "%s/pending", d);
  c = make (p, 1 << 20, 0, CBT_MODE_IN_USE);
  OK (cbt_checkpoint_create (c, "a", false, err, sizeof err));
  changes (c, 0);
  OK (cbt_checkpoint_create (c, "b", false, err, sizeof err));
  changes (c, 300000);
  OK (cbt_checkpoint_create (c, "backup-1", true, err, sizeof err));
  changes (c, 600000);
  OK (cbt_close (c, err, sizeof err));

  snprintf (p, sizeof p, "%s/open.tmp", d);
  snprintf (q, sizeof q, "%s/in-use", d);
  c = make (p, 1 << 20, 0, CBT_MODE_IN_USE);
  OK (cbt_checkpoint_create (c, "a", false, err, sizeof err));
  changes (c, 100000);
  copy (p, q);
  OK (cbt_close (c, err, sizeof err));

  snprintf (q, sizeof q, "%s/wal-in-use", d);
  c = make (p, 1 << 20, 0, CBT_MODE_WRITE_AHEAD);
  OK (cbt_checkpoint_create (c, "a", false, err, sizeof err));
  changes (c, 100000);
  OK (cbt_checkpoint_create (c, "b", false, err, sizeof err));
  changes (c, 400000);
  copy (p, q);
  OK (cbt_close (c, err, sizeof err));

  snprintf (q, sizeof q, "%s/ps-in-use", d);
  c = make (p, 1 << 20, 4096, CBT_MODE_PROCESS_SAFE);
  OK (cbt_checkpoint_create (c, "a", false, err, sizeof err));
  changes (c, 100000);
  OK (cbt_checkpoint_create (c, "b", false, err, sizeof err));
  changes (c, 700000);
  copy (p, q);
  OK (cbt_close (c, err, sizeof err));
  unlink (p);

  snprintf (p, sizeof p, "%s/pages", d);
  c = make (p, 256 << 20, 512, CBT_MODE_IN_USE);
  for (int k = 0; k < 4; ++k) {
    char name[8];
    for (uint64_t off = (uint64_t) k << 20; off < (256u << 20); off += 150u << 20)
      changes (c, off);
    snprintf (name, sizeof name, "p%d", k);
    OK (cbt_checkpoint_create (c, name, false, err, sizeof err));
  }
  changes (c, 5 << 20);
  OK (cbt_checkpoint_delete (c, "p1", err, sizeof err));
  OK (cbt_checkpoint_delete (c, "p3", err, sizeof err));
  OK (cbt_close (c, err, sizeof err));

  snprintf (p, sizeof p, "%s/gran-512", d);
  c = make (p, 100000, 512, CBT_MODE_IN_USE);
  OK (cbt_checkpoint_create (c, "x", false, err, sizeof err));
  changes (c, 1000);
  OK (cbt_close (c, err, sizeof err));
  return 0;
}
C
"${CC:-cc}" -std=gnu11 -O1 -I"$tmp" -I"$top/common" -DHAVE_CONFIG_H \
    "$tmp/gen.c" "$top/common/cbt.c" "$top/common/cbt-checkpoints.c" \
    "$top/common/cbt-io.c" "$top/common/cbt-load.c" "$top/common/cbt-rec.c" \
    "$top/common/cbt-v1.c" -lz -pthread -o "$tmp/gen"
mkdir -p "$out"
find "$out" -maxdepth 1 -type f ! -name 'v1-*' -delete
"$tmp/gen" "$out"

# torn: the newest superblock (higher sequence at byte 16) half written.
python3 - "$out" <<'PY'
import struct, sys
d = sys.argv[1]
f = bytearray(open(d + "/three", "rb").read())
seq = [struct.unpack_from("<Q", f, s * 4096 + 16)[0] for s in (0, 1)]
s = 0 if seq[0] > seq[1] else 1
f[s * 4096 + 1000 : s * 4096 + 3000] = b"\xee" * 2000
open(d + "/torn", "wb").write(f)
open(d + "/bad-magic", "wb").write(b"QFI\xfb" + bytes(8188))
PY
ls -l "$out"
