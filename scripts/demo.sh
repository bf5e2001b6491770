#!/bin/sh
# The README's first command. Installs what fusemirror needs (as root), then runs the
# demo: a two-node cluster in network namespaces on this machine, the sample application
# behind the virtual IP, a real source tree replicated and checked with `fusemirror
# verify`, a client writing records while the primary is killed -9, the survivor taking
# over with no acknowledged record lost, and the killed node coming back as SECOND.
# Options: --keep (keep the scratch directory when something fails), --help.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m demo "$@"
