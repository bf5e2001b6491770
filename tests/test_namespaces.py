"""The mount agent between two network namespaces, as the controller will run it: each
node's agent started with `nsenter --net` (so the mounts stay visible to everyone),
replication over the lab's veth addresses, and a cable pulled at the switch."""

import errno
import os
import sys

from conftest import TOP, Node
from fusemirror.lab.netns import Lab

PORT = 7788


def _mount(lab: Lab, member: str, node: Node, *args) -> None:
    node.backing_fd = os.open(node.dir, os.O_RDONLY | os.O_DIRECTORY)
    lab.run(member, [sys.executable, "-m", "cli.main", "mount", node.dir, "--state-dir",
                     node.state_dir, "--log-file", node.log_file, *args],
            cwd=TOP, env=dict(os.environ, PYTHONPATH=TOP), timeout=60)
    node.pid = node.status()["pid"]


def test_pair_across_namespaces_and_a_pulled_cable(scratch):
    secret = os.path.join(scratch, "secret")
    with open(secret, "w") as f:
        f.write(os.urandom(16).hex())
    primary, replica = Node(scratch, "alpha"), Node(scratch, "beta")
    with Lab() as lab:
        try:
            _mount(lab, "beta", replica, "--role", "replica", "--listen",
                   f"{lab.address('beta')}:{PORT}", "--secret-file", secret)
            _mount(lab, "alpha", primary, "--role", "primary", "--peer",
                   f"{lab.address('beta')}:{PORT}", "--secret-file", secret,
                   "--on-peer-loss", "block", "--timeout", "2")
            with open(primary.path("f"), "wb") as f:
                f.write(b"over the bridge")
                os.fsync(f.fileno())
            with open(replica.path("f"), "rb") as f:
                assert f.read() == b"over the bridge"
            assert primary.status()["mirror"]["peer"] == f"{lab.address('beta')}:{PORT}"

            lab.link_down("alpha", side="bridge")          # the cable, at the switch
            try:
                fd = os.open(primary.path("g"), os.O_WRONLY | os.O_CREAT, 0o644)
                os.close(fd)
            except OSError as e:
                assert e.errno == errno.EIO
            else:
                raise AssertionError("a change was acknowledged without the peer")
            assert primary.state()["peer_outdated"] is True
        finally:
            primary.close()
            replica.close()
