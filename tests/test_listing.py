"""Directory listings: the attributes a listing gives the kernel are never older than
the last change made through the mount.

The kernel asks for every entry's attributes with the names (READDIRPLUS) and keeps
them, so a listing that gave old ones would make `ls -l` show them. A primary or a
mount alone keeps each complete listing (every change goes through its agent) and
gives it again until any request that may change the tree runs; a replica keeps
none, its tree changing under it.
"""

from __future__ import annotations

import os
import stat

import pyfuse3
import pytest
import trio
import trio.testing

from conftest import wait_for
from fusemirror.fs import ALONE, PRIMARY, REPLICA, MirrorFS
from fusemirror.statefile import StateFile
from fusemirror.tree import ROOT, Tree


def listing(directory: str) -> dict[str, tuple[int, int, int, int]]:
    """name -> (mode, size, links, mtime) as a listing followed by a stat shows them."""
    out = {}
    with os.scandir(directory) as it:
        for e in it:
            st = e.stat(follow_symlinks=False)
            out[e.name] = (stat.S_IMODE(st.st_mode), st.st_size, st.st_nlink, st.st_mtime_ns)
    return out


def test_every_change_made_through_the_mount_shows_in_the_next_listing(alone):
    d = alone.path("d")
    os.mkdir(d)
    for i in range(8):
        with open(os.path.join(d, f"f{i}"), "w") as f:
            f.write("x" * i)
    p = lambda name: os.path.join(d, name)          # noqa: E731
    before = listing(d)
    assert len(before) == 8 and before["f3"][1] == 3

    os.chmod(p("f0"), 0o600)
    assert listing(d)["f0"][0] == 0o600
    with open(p("f1"), "a") as f:
        f.write("more")
    assert listing(d)["f1"][1] == 5
    os.truncate(p("f2"), 100)
    assert listing(d)["f2"][1] == 100
    os.utime(p("f3"), ns=(1_000_000_000, 2_000_000_000))
    assert listing(d)["f3"][3] == 2_000_000_000
    os.link(p("f4"), p("f4.link"))
    now = listing(d)
    assert now["f4"][2] == 2 and now["f4.link"][2] == 2
    os.rename(p("f5"), p("f5.new"))
    now = listing(d)
    assert "f5" not in now and now["f5.new"][1] == 5
    os.unlink(p("f4.link"))
    now = listing(d)
    assert "f4.link" not in now and now["f4"][2] == 1
    with open(p("new"), "w") as f:
        f.write("new file")
    assert listing(d)["new"][1] == 8
    with open(p("f6"), "r+") as f:             # written through an open descriptor
        f.seek(1000)
        f.write("end")
        f.flush()
        assert listing(d)["f6"][1] == 1003
    os.mkdir(p("sub"))
    before = listing(d)["sub"]
    with open(os.path.join(p("sub"), "inner"), "w"):
        pass
    assert listing(d)["sub"][3] >= before[3] and listing(p("sub")).keys() == {"inner"}


def test_a_replica_listing_follows_the_stream(pair):
    d_p, d_r = pair.primary.path("d"), pair.replica.path("d")
    os.mkdir(d_p)
    with open(os.path.join(d_p, "f"), "w") as f:
        f.write("one")
    wait_for(lambda: os.path.exists(os.path.join(d_r, "f")), what="f on the replica")
    assert listing(d_r)["f"][:2] == (0o644, 3)
    os.chmod(os.path.join(d_p, "f"), 0o600)
    with open(os.path.join(d_p, "f"), "a") as f:
        f.write("two")
    wait_for(lambda: listing(d_r)["f"][:2] == (0o600, 6), what="the change on the replica")


@pytest.fixture
def mirror_fs(scratch):
    """A MirrorFS over a scratch folder, not mounted: its handlers called directly."""
    base = os.path.join(scratch, "base")
    os.mkdir(base)
    for name in ("a", "b"):
        with open(os.path.join(base, name), "w") as f:
            f.write(name)
    root_fd = os.open(base, os.O_PATH | os.O_DIRECTORY)
    tree = Tree(root_fd)
    fs = MirrorFS(tree, StateFile(os.path.join(scratch, "state"), base), role=ALONE)
    fs.base = base
    yield fs
    tree.close()
    os.close(root_fd)


async def modes(fs: MirrorFS, monkeypatch) -> dict[bytes, int]:
    """One listing of the root, from its start, as the kernel would ask for it."""
    given = {}

    def reply(token, name, attr, next_id):
        given[name] = stat.S_IMODE(attr.st_mode)
        return True
    monkeypatch.setattr(pyfuse3, "readdir_reply", reply)
    fh = await fs.opendir(ROOT, None)
    await fs.readdir(fh, 0, None)
    await fs.releasedir(fh)
    return given


async def test_a_listing_is_kept_until_a_request_may_change_the_tree(mirror_fs, monkeypatch):
    fs, a = mirror_fs, os.path.join(mirror_fs.base, "a")
    assert await modes(fs, monkeypatch) == {b"a": 0o644, b"b": 0o644}
    os.chmod(a, 0o600)                       # behind the agent's back: not seen yet
    await fs.getattr(ROOT)
    await fs.flush(0)
    assert (await modes(fs, monkeypatch))[b"a"] == 0o644
    await fs.release(12345)                  # any request that may change something
    assert (await modes(fs, monkeypatch))[b"a"] == 0o600
    fs.set_role(PRIMARY, None)
    os.chmod(a, 0o640)
    assert (await modes(fs, monkeypatch))[b"a"] == 0o640
    fs.set_role(REPLICA, None)               # a replica keeps nothing
    for mode in (0o604, 0o644):
        os.chmod(a, mode)
        assert (await modes(fs, monkeypatch))[b"a"] == mode


async def test_nothing_is_kept_or_given_again_while_a_change_is_in_progress(mirror_fs,
                                                                          monkeypatch):
    """A change applied here may still wait for the peer: a listing made meanwhile
    would be given again after the kernel got the new attributes some other way."""
    fs, a = mirror_fs, os.path.join(mirror_fs.base, "a")
    assert (await modes(fs, monkeypatch))[b"a"] == 0o644
    fs.pause()                                   # changes wait at the gate, in progress
    async with trio.open_nursery() as nursery:
        nursery.start_soon(fs.unlink, ROOT, b"b", None)
        await trio.testing.wait_all_tasks_blocked()
        for mode in (0o600, 0o640):
            os.chmod(a, mode)
            assert (await modes(fs, monkeypatch))[b"a"] == mode
        fs.resume()
    assert await modes(fs, monkeypatch) == {b"a": 0o640}


async def test_a_kept_listing_is_not_given_after_the_cache_timeout(mirror_fs, monkeypatch):
    fs, a = mirror_fs, os.path.join(mirror_fs.base, "a")
    fs.cache_timeout = 0.0
    assert (await modes(fs, monkeypatch))[b"a"] == 0o644
    os.chmod(a, 0o600)
    assert (await modes(fs, monkeypatch))[b"a"] == 0o600
