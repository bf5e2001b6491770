#!/bin/sh
# Installs everything fusemirror needs on a Debian machine, as root: system packages,
# a virtual environment in .venv with fusemirror installed (editable), the
# `fusemirror` command in /usr/local/bin and the mount(8) helper in /sbin.
# Safe to run again; it only adds what is missing.
set -eu
cd "$(dirname "$0")/.."
TOP=$(pwd)

if [ "$(id -u)" != 0 ]; then
    echo "setup.sh: run as root (it installs packages and mounts filesystems)" >&2
    exit 2
fi

PACKAGES="fuse3 libfuse3-dev pkg-config gcc python3-dev python3-venv iproute2 nftables fio attr acl sqlite3 util-linux procps"
missing=""
for p in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "setup.sh: installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq $missing >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "setup.sh: Python 3.11 or newer is needed ($PY is $("$PY" --version 2>&1))" >&2
    exit 2
fi
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
if ! .venv/bin/python -c 'import pyfuse3, trio, xxhash, lz4, click, pytest_trio, fusemirror' 2>/dev/null; then
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e ".[test]"
fi

ln -sf "$TOP/.venv/bin/fusemirror" /usr/local/bin/fusemirror
ln -sf "$TOP/.venv/bin/mount.fusemirror" /sbin/mount.fusemirror
[ -e /dev/fuse ] || modprobe fuse 2>/dev/null || true
if [ -d /sys/fs/fuse/connections ] && ! grep -q fusectl /proc/mounts; then
    mount -t fusectl none /sys/fs/fuse/connections 2>/dev/null || true
fi
mkdir -p /var/lib/fusemirror /var/log/fusemirror /run/fusemirror
chmod 700 /var/lib/fusemirror /run/fusemirror
