# Helpers shared by the test-write-*.sh tests.  Not a test itself:
# source it after functions.sh:
#
#   source "${srcdir:-.}/functions.sh"
#   source "${srcdir:-.}/test-write-lib.sh"
#   requires_nbdpy                  # sets $nbdpy; wlib.py importable
#   "$nbdpy" - "$uri" <<'EOF'
#   from wlib import *
#   h = connect(sys.argv[1])
#   ...
#   EOF

# requires_nbdpy: skip unless there is a python3 that has libnbd's nbd
# module (functions.sh finds it, $nbd_python, and puts it first on $PATH
# as python3); set $nbdpy to it.  Also puts the directory of the helper
# module wlib.py (this directory) on PYTHONPATH.
write_lib_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
requires_nbdpy ()
{
    [ -n "$nbd_python" ] ||
        skip "no python3 with libnbd's nbd module (python3-libnbd)"
    nbdpy="$nbd_python"
    # No __pycache__ in the source tree (read-only under make distcheck).
    export PYTHONDONTWRITEBYTECODE=1
    export PYTHONPATH="$write_lib_dir${PYTHONPATH:+:$PYTHONPATH}"
}

# new_target FILE SIZE: a fresh, fully sparse target.
new_target ()
{
    rm -f "$1"
    truncate -s "$2" "$1"
}
