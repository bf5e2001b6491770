"""fstab: both entry types work with mount -a, mount DIR and umount DIR, for real.

Uses `mount --fstab FILE` so the machine's /etc/fstab is never touched. Needs the
helpers that scripts/setup.sh installs (/sbin/mount.fusemirror, fusemirror in PATH).
"""

import os
import shutil
import subprocess

import pytest

from conftest import Node, free_port, is_mounted, wait_for


def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")


@pytest.fixture
def fstab_nodes(scratch):
    assert os.path.exists("/sbin/mount.fusemirror"), "run scripts/setup.sh first"
    assert shutil.which("fusemirror"), "run scripts/setup.sh first"
    secret = os.path.join(scratch, "secret")
    with open(secret, "w") as f:
        f.write(os.urandom(16).hex())
    port = free_port()
    replica, primary = Node(scratch, "replica"), Node(scratch, "primary")
    fstab = os.path.join(scratch, "fstab")
    with open(fstab, "w") as f:
        f.write(f"# test fstab\n"
                f"{replica.dir} {replica.dir} fusemirror role=replica,listen=127.0.0.1:{port},"
                f"secret_file={secret},state_dir={replica.state_dir},log_file={replica.log_file},"
                f"_netdev 0 0\n"
                f"{primary.dir} {primary.dir} fuse.fusemirror role=primary,"
                f"peer=127.0.0.1:{port},secret_file={secret},state_dir={primary.state_dir},"
                f"log_file={primary.log_file},_netdev 0 0\n")
    try:
        yield fstab, replica, primary
    finally:
        for node in (primary, replica):
            if is_mounted(node.dir):
                run("umount", node.dir)
            node.close()


def test_fstab_mount_dir_and_umount(fstab_nodes):
    fstab, replica, primary = fstab_nodes
    for node in (replica, primary):
        r = run("mount", "--fstab", fstab, node.dir)
        assert r.returncode == 0, r.stderr
        assert is_mounted(node.dir)
    with open(primary.path("file"), "w") as f:
        f.write("through fstab")
    with open(replica.path("file")) as f:
        assert f.read() == "through fstab"
    for node in (primary, replica):
        r = run("umount", node.dir)
        assert r.returncode == 0, r.stderr
        assert not is_mounted(node.dir)
    with open(replica.path("file")) as f:      # the backing copy, after unmount
        assert f.read() == "through fstab"


def test_fstab_mount_all(fstab_nodes):
    fstab, replica, primary = fstab_nodes
    r = run("mount", "--fstab", fstab, "-a")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: is_mounted(primary.dir) and is_mounted(replica.dir), what="mounts")
    os.mkdir(primary.path("d"))
    assert os.path.isdir(replica.path("d"))


def test_fstab_bad_option_is_one_line(scratch):
    node = Node(scratch, "n")
    fstab = os.path.join(scratch, "fstab")
    with open(fstab, "w") as f:
        f.write(f"{node.dir} {node.dir} fusemirror role=alone,bogus=1 0 0\n")
    r = run("mount", "--fstab", fstab, node.dir)
    assert r.returncode != 0 and "unknown mount option 'bogus=1'" in r.stderr
    assert not is_mounted(node.dir)
