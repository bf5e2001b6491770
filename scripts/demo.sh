#!/bin/sh
# The README's first command. Installs what fusemirror needs (as root), then runs the
# demo: one application folder kept identical on two "nodes" of this machine under a
# real workload (a source tree unpacked with tar, SQLite transactions), checked with
# `fusemirror verify`, then a role switch. Options: --keep (keep the scratch directory
# when something fails), --help.
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m demo "$@"
