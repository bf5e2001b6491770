"""More inodes than descriptors: the tree keeps a bounded number open.

The hard descriptor limit of an agent may be far below the number of inodes the
kernel caches (a `find` over a big tree), so the tree retires the least recently
used descriptors and reopens those inodes by file handle. First the tree alone over
a scratch directory, then a real mount whose agent gets a small cap through
FUSEMIRROR_MAX_FDS.
"""

from __future__ import annotations

import contextvars
import errno
import logging
import os
import stat
import subprocess
import types

import pytest

from conftest import Node, cli
from fusemirror import journal
from fusemirror import tree as tree_module
from fusemirror.statefile import escape
from fusemirror.tree import ROOT, NoName, Tree

CAP = 8


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def make_files(base: str, dirs: int, per_dir: int) -> list[str]:
    names = []
    for d in range(dirs):
        os.makedirs(os.path.join(base, f"d{d}", "sub"))
        for i in range(per_dir):
            rel = os.path.join(f"d{d}", "sub" if i % 2 else "", f"f{i}")
            with open(os.path.join(base, rel), "w") as f:
                f.write(rel)
            names.append(os.path.normpath(rel))
    return names


class Walk:
    """A tree over base with every file looked up, as the kernel would."""

    def __init__(self, base: str, max_fds: int = CAP):
        self.base = base
        self.root_fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
        self.before = open_fds()
        self.tree = Tree(self.root_fd, max_fds=max_fds)
        self.ino: dict[str, int] = {".": ROOT}

    def look(self, rel: str) -> int:
        if rel not in self.ino:
            parent = self.look(os.path.dirname(rel) or ".")
            self.ino[rel] = self.tree.lookup(parent, os.fsencode(os.path.basename(rel)))[0]
        return self.ino[rel]

    def held(self) -> int:
        """Descriptors the tree holds (its handle-mount descriptor included)."""
        return open_fds() - self.before

    def close(self) -> None:
        self.tree.close()
        assert open_fds() == self.before
        os.close(self.root_fd)


@pytest.fixture
def walk(scratch):
    w = Walk(scratch)
    yield w
    w.close()


def test_tree_holds_at_most_its_cap_and_reopens_retired_inodes(walk):
    names = make_files(walk.base, 10, 10)
    for rel in names:
        walk.look(rel)
    assert len(walk.tree) == 1 + 10 * 2 + 100
    assert walk.held() <= CAP + 1
    for rel in names:                                    # most were retired on the way
        ino = walk.ino[rel]
        assert walk.tree.path(ino) == os.fsencode(rel)
        assert walk.tree.stat(ino).st_ino == os.stat(os.path.join(walk.base, rel)).st_ino
        fd = walk.tree.open_file(ino, os.O_RDONLY)
        try:
            assert os.read(fd, 100) == os.fsencode(rel)
        finally:
            os.close(fd)
        assert walk.held() <= CAP + 1
    for d in range(10):
        assert walk.tree.path(walk.ino[f"d{d}/sub"]) == f"d{d}/sub".encode()


class Request:
    """A request in its own context, as each trio task has one."""

    def __init__(self, tree: Tree):
        self.tree, self.ctx = tree, contextvars.copy_context()
        self.req = self.ctx.run(tree.op_begin)

    def run(self, fn, *args):
        return self.ctx.run(fn, *args)

    def end(self) -> None:
        self.ctx.run(self.tree.op_end, self.req)


def test_a_descriptor_retired_during_a_request_stays_open_until_it_ends(walk):
    """Only the descriptors a request took wait for it (a create waiting for the peer
    holds its directory's); the others retired meanwhile are closed at once."""
    names = make_files(walk.base, 2, 20)
    first = walk.look(names[0])
    holder = Request(walk.tree)
    fd = holder.run(walk.tree.fd, first)
    other = Request(walk.tree)
    other.run(lambda: [walk.look(rel) for rel in names[1:]])     # retires first's descriptor
    other.end()
    assert walk.held() == 1 + CAP + 1
    assert os.path.samestat(os.fstat(fd), os.stat(os.path.join(walk.base, names[0])))
    holder.end()
    with pytest.raises(OSError) as e:
        os.fstat(fd)
    assert e.value.errno == errno.EBADF
    assert walk.held() == 1 + CAP


def test_a_request_without_descriptors_holds_nothing_back(walk):
    """A write or fsync waiting for the peer or the disk takes nothing from the tree."""
    names = make_files(walk.base, 2, 20)
    waiting = Request(walk.tree)
    for rel in names:
        walk.look(rel)
    assert walk.held() == 1 + CAP
    waiting.end()


def test_a_forgotten_inode_waits_for_the_request_holding_its_descriptor(walk):
    names = make_files(walk.base, 1, 4)
    inos = [walk.look(rel) for rel in names]
    holder = Request(walk.tree)
    fd = holder.run(walk.tree.fd, inos[0])
    held = walk.held()
    for ino in inos:
        walk.tree.forget(ino, 1)                         # pyfuse3 calls forget outside requests
    assert walk.held() == held - len(inos) + 1
    assert os.path.samestat(os.fstat(fd), os.stat(os.path.join(walk.base, names[0])))
    holder.end()
    assert walk.held() == held - len(inos)


def test_a_retired_file_that_is_gone_is_stale_and_its_number_may_return(walk):
    names = make_files(walk.base, 1, 20)
    victim = walk.look("d0/f0")
    for rel in names:
        walk.look(rel)
    os.unlink(os.path.join(walk.base, "d0/f0"))
    with pytest.raises(OSError) as e:
        walk.tree.stat(victim)
    assert e.value.errno == errno.ESTALE
    with pytest.raises(NoName):
        walk.tree.path(victim)
    # ext4 gives a freed inode number to the next new file in the same group.
    with open(os.path.join(walk.base, "d0/new"), "w") as f:
        f.write("new")
    assert os.stat(os.path.join(walk.base, "d0/new")).st_ino == victim
    assert walk.tree.lookup(walk.ino["d0"], b"new")[0] == victim
    assert walk.tree.path(victim) == b"d0/new"
    for rel in names[1:]:
        walk.look(rel)
        walk.tree.fd(walk.ino[rel])                      # retire it again
    assert walk.tree.stat(victim).st_size == 3
    assert walk.tree.path(victim) == b"d0/new"


def test_a_listing_holds_by_handle_and_a_lookup_renews_a_stale_one(walk):
    """A listing opens no descriptor: a new inode is held by its handle, a retired one
    keeps its own. When that number names a new file by then, the handle is stale
    (ESTALE): the kernel looks the name up again, and that takes the new file."""
    os.makedirs(os.path.join(walk.base, "d"))
    for name in ("a", "b"):
        with open(os.path.join(walk.base, "d", name), "w") as f:
            f.write(name)
    d = walk.look("d")
    held = walk.held()
    st = os.stat(os.path.join(walk.base, "d", "a"), follow_symlinks=False)
    a, _ = walk.tree.listed(d, b"a", st)
    assert walk.held() == held and walk.tree.path(a) == b"d/a"
    assert walk.held() == held + 1          # path() used it: a descriptor now
    names = make_files(walk.base, 1, 2 * CAP)
    for rel in names:
        walk.look(rel)                      # retires a's descriptor
    os.unlink(os.path.join(walk.base, "d", "a"))
    with open(os.path.join(walk.base, "d", "new"), "w") as f:
        f.write("new")
    st = os.stat(os.path.join(walk.base, "d", "new"), follow_symlinks=False)
    assert st.st_ino == a                   # ext4 gives the freed number out again
    assert walk.tree.listed(d, b"new", st)[0] == a
    with pytest.raises(OSError) as e:
        walk.tree.stat(a)
    assert e.value.errno == errno.ESTALE
    assert walk.tree.lookup(d, b"new")[0] == a
    assert walk.tree.stat(a).st_size == 3 and walk.tree.path(a) == b"d/new"


def test_a_listed_name_gone_meanwhile_is_skipped_without_a_warning(walk, caplog):
    """Between the listing's stat and its handle the name may go: the entry is skipped
    (FileNotFoundError), and that is no reason to warn that inodes keep descriptors."""
    path = os.path.join(walk.base, "gone")
    with open(path, "w"):
        pass
    st = os.stat(path, follow_symlinks=False)
    os.unlink(path)
    with caplog.at_level(logging.WARNING), pytest.raises(FileNotFoundError):
        walk.tree.listed(ROOT, b"gone", st)
    assert not walk.tree.known(walk.tree.ino_of(st))
    assert "cannot be reopened by file handle" not in caplog.text


def test_a_forgotten_inode_keeps_its_handle_for_the_next_listing(walk, monkeypatch):
    """When the kernel drops its caches it forgets every inode; listing the tree again
    takes no handle for those it had (a third of such a listing), and a remembered
    handle whose number names a new file by then is stale and renewed like any other."""
    os.makedirs(os.path.join(walk.base, "d"))
    with open(os.path.join(walk.base, "d", "a"), "w") as f:
        f.write("a")
    d = walk.look("d")
    st = os.stat(os.path.join(walk.base, "d", "a"), follow_symlinks=False)
    a, _ = walk.tree.listed(d, b"a", st)
    walk.tree.forget(a, 1)
    assert not walk.tree.known(a)
    taken = []
    real = tree_module.file_handle
    monkeypatch.setattr(tree_module, "file_handle", lambda *a: taken.append(a) or real(*a))
    assert walk.tree.listed(d, b"a", st)[0] == a and not taken
    assert walk.tree.path(a) == b"d/a" and walk.tree.stat(a).st_size == 1
    walk.tree.forget(a, 1)
    # The same number on another filesystem inside the folder is another file.
    other = types.SimpleNamespace(st_ino=a, st_mode=st.st_mode, st_dev=st.st_dev + 1)
    assert walk.tree.listed(d, b"a", other)[0] == a and len(taken) == 1
    walk.tree.forget(a, 1)
    taken.clear()

    os.unlink(os.path.join(walk.base, "d", "a"))
    with open(os.path.join(walk.base, "d", "new"), "w") as f:
        f.write("new")
    st = os.stat(os.path.join(walk.base, "d", "new"), follow_symlinks=False)
    assert st.st_ino == a                   # ext4 gives the freed number out again
    assert walk.tree.listed(d, b"new", st)[0] == a and not taken
    with pytest.raises(OSError) as e:
        walk.tree.stat(a)
    assert e.value.errno == errno.ESTALE
    assert walk.tree.lookup(d, b"new")[0] == a
    assert walk.tree.stat(a).st_size == 3 and walk.tree.path(a) == b"d/new"


def test_files_reopened_cold_are_named_by_their_aliases(walk):
    """Reopened by handle after the dentry cache was dropped, a file is disconnected:
    /proc/self/fd shows "/", and the names it was looked up or renamed under count."""
    names = make_files(walk.base, 4, 10)
    for rel in names:
        walk.look(rel)
    ino = walk.ino["d1/sub/f1"]
    os.rename(os.path.join(walk.base, "d1/sub/f1"), os.path.join(walk.base, "d2/moved"))
    walk.tree.moved(ino, (walk.ino["d1/sub"], b"f1"), (walk.ino["d2"], b"moved"))
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("2")
    assert walk.tree.path(ino) == b"d2/moved"
    assert os.readlink(f"/proc/self/fd/{walk.tree.fd(ino)}") in ("/", os.path.join(
        walk.base, "d2/moved"))


def test_inodes_on_another_mount_keep_their_descriptor(scratch, caplog):
    """A mount inside the folder (here a bind mount: its inode numbers cannot collide
    with the folder's) is not the one handles are opened on."""
    base, elsewhere = os.path.join(scratch, "base"), os.path.join(scratch, "elsewhere")
    inner = os.path.join(base, "inner")
    os.makedirs(inner)
    os.mkdir(elsewhere)
    for i in range(3 * CAP):
        open(os.path.join(elsewhere, f"f{i}"), "w").close()
    subprocess.run(["mount", "--bind", elsewhere, inner], check=True)
    w = None
    try:
        w = Walk(base)
        with caplog.at_level(logging.WARNING, logger="fusemirror.tree"):
            for i in range(3 * CAP):
                w.look(f"inner/f{i}")
        assert w.held() == 1 + 1 + 3 * CAP              # the mount fd, inner, its files
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "another filesystem" in warnings[0].getMessage()
        assert w.tree.path(w.ino["inner/f0"]) == b"inner/f0"
    finally:
        if w is not None:
            w.close()
        subprocess.run(["umount", inner], check=True)


# --- through a real mount ------------------------------------------------------
MOUNT_CAP = 256
DIRS, PER_DIR = 30, 100                                  # 3,000 files, 60 directories


def agent_fds(pid: int) -> list[str]:
    """What the agent's descriptors refer to."""
    out = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            out.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except FileNotFoundError:
            pass
    return out


def read_all(dirs) -> None:
    subprocess.run(["find", *dirs, "-type", "f", "-exec", "cat", "{}", "+"],
                   capture_output=True, check=True, timeout=120)


def test_a_mount_serves_more_inodes_than_its_descriptor_cap(scratch, monkeypatch):
    node = Node(scratch, "many")
    names = make_files(node.dir, DIRS, PER_DIR)
    first = names[:40]                                   # in d0
    others = [node.path(f"d{d}") for d in range(1, DIRS)]
    monkeypatch.setenv("FUSEMIRROR_MAX_FDS", str(MOUNT_CAP))   # read by the agent's tree
    try:
        node.mount("--role", "alone")
        idle = len(agent_fds(node.pid))
        p = subprocess.run(["find", node.dir, "-ls"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0, p.stderr
        assert len(p.stdout.splitlines()) == 1 + DIRS * 2 + len(names)
        # A listing holds the inodes it reports by file handle: descriptors only for
        # the directories it read.
        assert len(agent_fds(node.pid)) <= idle + DIRS * 2 + 16

        # Reading the other directories' files retires the descriptors of d0's files
        # (a listing opens none); the kernel still knows them, so it asks about them
        # by inode number.
        held = os.open(node.path(first[0]), os.O_PATH)
        read_all(others)
        assert not set(agent_fds(node.pid)) & {node.path(rel) for rel in first}
        for rel in first:
            path = node.path(rel)
            with open(path) as f:
                assert f.read() == rel
            with open(path, "a") as f:
                f.write("+")
            os.chmod(path, 0o600)
            st = os.stat(path)
            assert st.st_size == len(rel) + 1 and stat.S_IMODE(st.st_mode) == 0o600
            os.rename(path, path + ".moved")
        os.rename(node.path("d0"), node.path("d0.moved"))
        moved = [rel.replace("d0", "d0.moved", 1) + ".moved" for rel in first]

        # Cold: the backing file is reopened disconnected; its name comes from its aliases.
        read_all(others)
        assert node.path(moved[0]) not in agent_fds(node.pid)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("2")
        os.chmod(f"/proc/self/fd/{held}", 0o640)
        os.close(held)
        assert stat.S_IMODE(os.stat(node.path(moved[0])).st_mode) == 0o640
        dirty = journal.read(os.path.join(node.state_dir, escape(node.dir) + ".journal"))
        assert os.stat(node.path(moved[0])).st_ino in dirty.nodes
        for rel in moved:
            with open(node.path(rel)) as f:
                assert f.read().endswith("+")
        p = subprocess.run(["find", node.dir, "-ls"], capture_output=True, text=True,
                           timeout=120)
        assert p.returncode == 0 and len(p.stdout.splitlines()) == 1 + DIRS * 2 + len(names)
        assert len(agent_fds(node.pid)) <= idle + MOUNT_CAP + 16

        cli("umount", node.dir)
        assert stat.S_IMODE(os.stat(node.path(moved[0])).st_mode) == 0o640
        for rel in moved:
            with open(node.path(rel)) as f:
                assert f.read() == rel.removesuffix(".moved").replace("d0.moved", "d0") + "+"
    finally:
        node.close()
    bad = [line for line in node.log().splitlines()
           if " ERROR " in line or " WARNING " in line or "Traceback" in line]
    assert not bad, "\n".join(bad)
