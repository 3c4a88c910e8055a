# Helpers shared by the qcow2 plugin tests (tests/test-qcow2-*.sh).
# Source it after functions.sh:
#
#   source "${srcdir:-.}/functions.sh"
#   source "${srcdir:-.}/qcow2-lib.sh"
#   requires_qcow2                  # qemu-img, qemu-io, the qcow2 plugin
#
# Not a test itself (it is only in EXTRA_DIST).  The helpers that write
# a file (err) write it in the current directory: the tests
# cd "$tmp" first.

# The directory of qcow2-check.py / qcow2-craft.py, absolute, so that
# the tests may cd elsewhere.
qcow2_srcdir=$(cd "${srcdir:-.}" && pwd)

# requires_qcow2 [CMD...]: skip unless qemu-img, qemu-io, each CMD (e.g.
# nbdcopy, nbdinfo, python3) and nbdkit's qcow2 plugin are available.
requires_qcow2 ()
{
    local c
    for c in qemu-img qemu-io "$@"; do
        requires "$c" --version
    done
    requires_plugin qcow2
}

# check IMAGE [ARGS...]: the plugin's content and map of IMAGE equal
# qemu's (see qcow2-check.py for the options).
check ()
{
    python3 "$qcow2_srcdir/qcow2-check.py" --tmp "$tmp" "$@"
}

# craft IMAGE OP ARGS...: patch IMAGE in place (see qcow2-craft.py).
craft ()
{
    python3 "$qcow2_srcdir/qcow2-craft.py" "$@"
}

# bytes_at FILE OFFSET [COUNT]: the COUNT (default 1) bytes of FILE at
# OFFSET in hex, separated by spaces ("ab cd").
bytes_at ()
{
    od -An -tx1 -j "$2" -N "${3:-1}" "$1" | xargs
}

# open_error IMAGE REGEXP [PARAMS...]: nbdkit qcow2 file=IMAGE PARAMS
# refuses to start (cleanly), with a message matching REGEXP.
open_error ()
{
    local img=$1 re=$2
    shift 2
    nbdkit_refuses "$re" qcow2 file="$img" "$@"
}

# read_error IMAGE REGEXP [nomap]: starts, but reading and mapping the
# disk fail with the message (with nomap, only reading: the data of
# compressed clusters is not looked at to map them).
# (nbdcopy --requests=1: a defect of nbdkit 1.32.5, see README "Known issues".)
read_error ()
{
    local img=$1 re=$2 nomap=${3:-} rc=0
    nbdkit -U - qcow2 file="$img" \
        --run 'nbdcopy --requests=1 "$uri" out.raw' 2>err || rc=$?
    failed_cleanly $rc "read $img"
    echo "$img: $(cat err)"
    assert_contains err "$re"
    if [ -n "$nomap" ]; then
        nbdkit -U - qcow2 file="$img" --run 'nbdinfo --map "$uri"' >/dev/null
        return
    fi
    rc=0
    nbdkit -U - qcow2 file="$img" --run 'nbdinfo --map "$uri"' \
        >/dev/null 2>err || rc=$?
    failed_cleanly $rc "map $img"
    assert_contains err "$re"
}
