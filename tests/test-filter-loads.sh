#!/usr/bin/env bash
# The filter is a real nbdkit filter: it loads, has its name, longname,
# version, config help, and a debug flag that nbdkit accepts.
source "${srcdir:-.}/functions.sh"
requires nbdinfo

help=$(nbdkit --filter=sparsebackup null --help 2>&1)
grep -q '^filter: sparsebackup (nbdkit sparsebackup filter)$' <<< "$help" ||
    { echo "$help"; fail "name/longname missing from --help"; }
grep -q '^sparsebackup-[a-z-]*=' <<< "$help" ||
    { echo "$help"; fail "config_help does not document sparsebackup-* keys"; }

version=$(nbdkit --filter=sparsebackup null --version)
echo "$version" | grep -Eq '^sparsebackup [0-9]+\.[0-9]+' ||
    { echo "$version"; fail "filter version missing"; }

# The debug flag exists: nbdkit 1.32 warns "-D sparsebackup.verbose:
# sparsebackup does not contain a global variable called
# sparsebackup_debug_verbose" for a flag the filter does not export.
nbdkit -U - -v -D sparsebackup.verbose=1 --filter=sparsebackup memory 1M \
    --run 'nbdinfo "$uri" >/dev/null' 2>"$tmp/err"
if grep -q 'does not contain a global variable' "$tmp/err"; then
    cat "$tmp/err"; fail "-D sparsebackup.verbose is not a debug flag"
fi
# And it does something: the filter's "ready" summary is printed with the
# flag and only with it (every line nbdkit -v prints about loading the
# filter mentions "sparsebackup" whatever the flag).
ready='debug: sparsebackup: ready, thread model'
grep -q "$ready" "$tmp/err" ||
    { cat "$tmp/err"; fail "-D sparsebackup.verbose=1 did not print '$ready'"; }
nbdkit -U - -v --filter=sparsebackup memory 1M \
    --run 'nbdinfo "$uri" >/dev/null' 2>"$tmp/err"
if grep -q "$ready" "$tmp/err"; then
    cat "$tmp/err"; fail "'$ready' is printed without -D sparsebackup.verbose=1"
fi
