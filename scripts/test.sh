#!/bin/sh
# Sets everything up, then runs the whole test suite (real FUSE mounts, as root).
set -eu
cd "$(dirname "$0")/.."
sh scripts/setup.sh
exec .venv/bin/python -m pytest -p no:cacheprovider -ra "$@" tests
