"""Resynchronisation of an out-of-date replica by its primary, online (real mounts).

The replica is stopped (or killed) while the primary goes on alone and changes the
tree in every way; the replica's own backing copy is also changed behind its back
(what a diverged or restored copy would hold). When the primary connects to it again,
it resynchronises it, and both backing trees end identical (checked independently and
by `fusemirror verify`) while the application may go on writing.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import threading
import time

import pytest

from conftest import cli, free_port, wait_for
from fusemirror import control


def write(path: str, data: bytes, mode: str = "wb") -> None:
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def build_tree(root: str) -> None:
    os.makedirs(os.path.join(root, "a/b/c"))
    os.makedirs(os.path.join(root, "gone/deep"))
    os.makedirs(os.path.join(root, "moved"))
    for i in range(20):
        write(os.path.join(root, "a", f"small{i}"), os.urandom(100 + i * 37))
    write(os.path.join(root, "a/b/big"), os.urandom(3 << 20) + b"tail")
    write(os.path.join(root, "a/b/c/trunc"), os.urandom(5 << 20))
    write(os.path.join(root, "gone/deep/f"), b"will be removed")
    write(os.path.join(root, "moved/f"), b"will move")
    write(os.path.join(root, "a/linked"), b"two names")
    os.link(os.path.join(root, "a/linked"), os.path.join(root, "a/b/linked2"))
    os.symlink("small1", os.path.join(root, "a/sym"))
    write(os.path.join(root, "typechange"), b"a file that becomes a directory")


def change_alone(root: str) -> None:
    """What the primary does while the replica is away: every kind of change."""
    with open(os.path.join(root, "a/b/big"), "r+b") as f:     # a few chunks of a big file
        f.seek(1 << 20)
        f.write(b"X" * 4096)
        f.seek(3 << 20)
        f.write(b"grown past the end")
    os.truncate(os.path.join(root, "a/b/c/trunc"), 1234567)
    write(os.path.join(root, "a/small3"), b"rewritten")
    write(os.path.join(root, "a/small4"), b"appended", "ab")
    os.unlink(os.path.join(root, "a/small5"))
    os.rename(os.path.join(root, "a/small6"), os.path.join(root, "a/b/small6-renamed"))
    os.rename(os.path.join(root, "moved"), os.path.join(root, "a/b/c/moved-here"))
    import shutil
    shutil.rmtree(os.path.join(root, "gone"))
    os.makedirs(os.path.join(root, "new/dir/tree"))
    for i in range(30):
        write(os.path.join(root, "new/dir/tree", f"n{i}"), os.urandom(i * 1000))
    write(os.path.join(root, "new/huge"), os.urandom(2 << 20))
    os.link(os.path.join(root, "new/huge"), os.path.join(root, "a/huge-link"))
    os.link(os.path.join(root, "a/linked"), os.path.join(root, "new/linked3"))
    os.chmod(os.path.join(root, "a/small7"), 0o600)
    os.chown(os.path.join(root, "a/small8"), 1234, 5678)
    os.setxattr(os.path.join(root, "a/small9"), "user.color", b"blue")
    os.utime(os.path.join(root, "a/small10"), ns=(1, 1_500_000_000_123_456_789))
    os.unlink(os.path.join(root, "a/sym"))
    os.symlink("elsewhere", os.path.join(root, "a/sym"))
    os.mkfifo(os.path.join(root, "new/fifo"))
    os.unlink(os.path.join(root, "typechange"))
    os.mkdir(os.path.join(root, "typechange"))
    write(os.path.join(root, "typechange/inside"), b"now a directory")


def spoil_backing(root: str) -> None:
    """Changes a copy may hold that the primary never made (its own divergent writes)."""
    write(os.path.join(root, "only-on-replica"), b"stale")
    os.makedirs(os.path.join(root, "a/b/extra/deeper"))
    write(os.path.join(root, "a/b/extra/deeper/x"), b"stale")
    with open(os.path.join(root, "a/small11"), "r+b") as f:
        f.write(b"corrupt")
    os.setxattr(os.path.join(root, "a/small12"), "user.stale", b"1")


def link_of(node) -> str:
    m = node.status().get("mirror") or {}
    return m.get("link", "")


def reconnect(pair) -> None:
    cli("role", pair.primary.dir, "primary", "--peer", pair.address)


def wait_resynced(pair, timeout=60.0) -> None:
    wait_for(lambda: link_of(pair.primary) == "connected", timeout=timeout,
             what="the resynchronisation to finish")
    assert pair.replica.state().get("uptodate") is True
    assert pair.replica.state().get("resynced_at")
    state = pair.primary.state()
    assert not state.get("peer_outdated") and not state.get("changed_alone"), state


@pytest.mark.parametrize("how", ["umount", "kill"])
def test_replica_away_then_resynchronised(make_pair, how):
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    build_tree(pair.primary.dir)
    pair.assert_identical()
    if how == "kill":
        pair.replica.kill(signal.SIGKILL)
        pair.replica.stop()
    else:
        pair.replica.stop()
    change_alone(pair.primary.dir)
    assert pair.primary.state().get("peer_outdated")
    spoil_backing(pair.replica.dir)
    assert pair.backing_difference()
    pair.mount_replica()
    reconnect(pair)
    wait_resynced(pair)
    pair.assert_identical()
    # and it replicates normally afterwards
    write(pair.primary.path("after"), b"replicated synchronously")
    with open(pair.replica.path("after"), "rb") as f:
        assert f.read() == b"replicated synchronously"
    status = pair.primary.status()["resync"]
    assert status["state"] == "done" and status["bytes_sent"] > 0


def test_a_sparse_file_stays_sparse_on_the_resynchronised_replica(make_pair):
    """Holes made while the replica was away reach it as holes: a new file with a hole
    of 64 MiB (a virtual disk image, say), and a file whose data the primary truncated
    away and extended again over the replica's old data. Before, the resync wrote the
    zeros it read: the copy took its full size on disk, and might not fit."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    write(pair.primary.path("old.img"), os.urandom(8 << 20))
    pair.replica.stop()
    with open(pair.primary.path("disk.img"), "wb") as f:
        f.write(b"boot" * 1024)
        f.seek(64 << 20)
        f.write(b"tail" * 1024)
    with open(pair.primary.path("old.img"), "r+b") as f:
        f.truncate(0)
        f.truncate(8 << 20)
    pair.mount_replica()
    reconnect(pair)
    wait_resynced(pair)
    pair.assert_identical()         # holes included (blocks_hole) as well as the bytes
    for name in ("disk.img", "old.img"):
        st = os.stat(pair.replica.path(name))
        assert st.st_blocks * 512 <= 256 << 10, (name, st.st_blocks)   # not 64 or 8 MiB


def resync_status(node) -> dict:
    return node.status()["resync"]


def test_fast_resync_sends_only_the_changed_blocks_and_full_finds_the_rest(make_pair):
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    for i in range(4):
        write(pair.primary.path(f"large{i}"), os.urandom(8 << 20))
    pair.assert_identical()
    pair.replica.stop()
    with open(pair.primary.path("large1"), "r+b") as f:      # two blocks change
        f.seek(3 << 20)
        f.write(os.urandom(100))
        f.seek(6 << 20)
        f.write(os.urandom(100))
    pair.mount_replica()
    reconnect(pair)
    wait_resynced(pair)
    pair.assert_identical()
    st = resync_status(pair.primary)
    assert not st["full"] and st["bytes_sent"] == 2 * 32 << 10, st
    assert st["bytes_done"] == 2 << 20, st       # only the journaled chunks were read
    # damage behind the replica's back is no journal's business: `resync --full` finds it
    with open(f"/proc/self/fd/{pair.replica.backing_fd}/large2", "r+b") as f:
        f.seek(5 << 20)
        f.write(b"bit rot")
    assert pair.backing_difference()
    cli("resync", "--full", pair.primary.dir)
    wait_for(lambda: resync_status(pair.primary)["state"] == "done"
             and resync_status(pair.primary)["full"], timeout=60, what="the full resync")
    wait_resynced(pair)
    pair.assert_identical()
    st = resync_status(pair.primary)
    assert st["bytes_sent"] == 32 << 10 and st["bytes_done"] == 32 << 20, st


def test_admin_resync_repairs_a_damaged_replica(pair):
    for i in range(5):
        write(pair.primary.path(f"f{i}"), os.urandom(50000))
    pair.assert_identical()
    with open(f"/proc/self/fd/{pair.replica.backing_fd}/f3", "r+b") as f:   # behind its back
        f.write(b"damage")
    assert pair.backing_difference()
    cli("resync", pair.primary.dir)
    wait_resynced(pair)
    pair.assert_identical()


def test_application_writes_during_resync(make_pair):
    """A writer hammers files (some being resynchronised) all through the resync; at
    the end both copies are equal, and every write was acknowledged."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    os.makedirs(pair.primary.path("d"))
    for i in range(40):
        write(pair.primary.path("d", f"f{i}"), os.urandom(300_000))
    write(pair.primary.path("hot"), os.urandom(6 << 20))
    pair.replica.stop()
    for i in range(0, 40, 3):
        write(pair.primary.path("d", f"f{i}"), os.urandom(1000), "ab")
    pair.mount_replica()
    stop = threading.Event()
    errors = []
    counts = {"writes": 0}

    def hammer():
        n = 0
        try:
            fd = os.open(pair.primary.path("hot"), os.O_RDWR)
            try:
                while not stop.is_set() and n < 20000:
                    off = (n * 65536 * 7) % (6 << 20)
                    os.pwrite(fd, os.urandom(4096), off)
                    if n % 10 == 0:
                        os.fsync(fd)
                    i = n % 40
                    with open(pair.primary.path("d", f"f{i}"), "r+b") as f:
                        f.seek((n * 4096) % 300_000)
                        f.write(os.urandom(512))
                    if n % 25 == 0:
                        name = pair.primary.path("d", f"new{n}")
                        write(name, os.urandom(2000))
                        os.rename(name, pair.primary.path(f"top{n}"))
                    n += 1
            finally:
                os.close(fd)
        except OSError as e:
            errors.append(e)
        counts["writes"] = n

    t = threading.Thread(target=hammer)
    t.start()
    try:
        time.sleep(0.3)
        reconnect(pair)
        wait_resynced(pair)
        time.sleep(0.5)
    finally:
        stop.set()
        t.join(60)
    assert not errors, errors
    assert counts["writes"] > 10
    pair.assert_identical()


def slow_resync_pair(make_pair):
    """A pair with a/, m/ and y/, whose next resync, once m/big (empty now) is rewritten
    while the replica is away, takes about 4 s in m/: it sends 4 MiB at 1 MB/s, after
    a/ and before y/ (name order)."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.mount_replica()
    pair.mount_primary("--resync-rate", "1000000")
    pair.wait_connected()
    for d in ("a", "m", "y"):
        os.makedirs(pair.primary.path(d))
    write(pair.primary.path("m", "big"), b"")
    return pair


def test_a_file_handled_under_a_name_removed_since_is_compared_under_its_other(make_pair):
    """A file with two links, a/f and y/f5, where the peer has another, stale file at
    y/f5. The resync copies it at a/f; the application then renames another file over
    a/f before the resync reaches y/. There the file is one it handled already, but
    the peer's y/f5 is not that copy: it must be compared all the same. Before the fix
    the peer kept its stale y/f5 and counted as up to date (found by
    test_resync_under_a_busy_namespace, seed 2)."""
    pair = slow_resync_pair(make_pair)
    write(pair.primary.path("y", "f5"), b"stale " * 1000)
    write(pair.primary.path("a", "g"), b"another file")
    pair.replica.stop()
    os.unlink(pair.primary.path("y", "f5"))
    write(pair.primary.path("a", "f"), b"acknowledged " * 1000)
    os.link(pair.primary.path("a", "f"), pair.primary.path("y", "f5"))
    write(pair.primary.path("m", "big"), os.urandom(4 << 20))
    pair.mount_replica()
    reconnect(pair)

    def copied() -> bool:
        try:
            with open(pair.replica.path("a", "f"), "rb") as f:
                return f.read() == b"acknowledged " * 1000
        except FileNotFoundError:
            return False
    # The resync walks a/, then m/ (big sent at 1 MB/s), then y/.
    wait_for(copied, timeout=30, what="the resync to copy a/f to the peer")
    assert link_of(pair.primary) == "resync", "the resync ended too early for this test"
    # Replaced by a rename: the change names a/ and a/g, not the file it replaces.
    os.rename(pair.primary.path("a", "g"), pair.primary.path("a", "f"))
    with open(pair.replica.path("y", "f5"), "rb") as f:
        assert f.read() == b"stale " * 1000, "y/ was resynchronised too early for this test"
    wait_resynced(pair)
    with open(pair.replica.path("y", "f5"), "rb") as f:
        assert f.read() == b"acknowledged " * 1000
    pair.assert_identical()


def test_a_file_requeued_by_a_removed_link_is_compared_under_the_link_it_keeps(make_pair):
    """A file x with links a/x and y/x (y/x made while the peer was away, where the peer
    has another, stale file). While the resync sends m/big, a third link a/x2 has a/
    walked again later; so in y/ the peer gets a separate copy of x (the group is made
    again when a/ comes back). While it sends z/big, the application rewrites x through
    a/x (on the peer: only the copy at a/x), then removes a/x and a/x2: x is queued
    again, by the descriptor of a name it no longer has. Before the fix the resync
    probed that name, found nothing, and the peer kept its old copy at y/x while
    counting as up to date (the busy-namespace test's intermittent failure)."""
    pair = slow_resync_pair(make_pair)
    os.makedirs(pair.primary.path("z"))
    write(pair.primary.path("z", "big"), b"")
    write(pair.primary.path("y", "x"), b"stale " * 1000)
    pair.replica.stop()
    write(pair.primary.path("a", "x"), b"first " * 1000)
    os.unlink(pair.primary.path("y", "x"))
    os.link(pair.primary.path("a", "x"), pair.primary.path("y", "x"))
    for d in ("m", "z"):
        write(pair.primary.path(d, "big"), os.urandom(4 << 20))
    pair.mount_replica()
    reconnect(pair)

    def on_replica(*path, content) -> bool:
        try:
            with open(pair.replica.path(*path), "rb") as f:
                return f.read() == content
        except FileNotFoundError:
            return False
    # The resync walks a/, m/ (big sent at 1 MB/s), y/, z/ (the same), then what it queued.
    wait_for(lambda: on_replica("a", "x", content=b"first " * 1000), timeout=30,
             what="the resync to copy a/x")
    os.link(pair.primary.path("a", "x"), pair.primary.path("a", "x2"))
    wait_for(lambda: on_replica("y", "x", content=b"first " * 1000), timeout=30,
             what="the resync to copy y/x")
    assert link_of(pair.primary) == "resync", "the resync ended too early for this test"
    with open(pair.primary.path("a", "x"), "r+b") as f:
        f.truncate(0)
        f.write(b"second " * 500)
    os.unlink(pair.primary.path("a", "x"))
    os.unlink(pair.primary.path("a", "x2"))
    assert link_of(pair.primary) == "resync", "the resync ended too early for this test"
    wait_resynced(pair)
    assert on_replica("y", "x", content=b"second " * 500)
    pair.assert_identical()


def test_a_link_group_split_on_the_peer_after_the_walk_is_mended_before_the_end(make_pair):
    """A file x with links a/x and y/x. After the walk has made y/x a link of a/x on the
    peer, and while it sends z/big, y/x there becomes a separate file with the same
    content (behind the replica's back: the shape a LINK racing the resync left in the
    busy-namespace test, about one run in twenty). Before RESYNC_DONE the resync checks
    that each group it met is one file on the peer: a/ and y/ go again, and the group is
    whole. Before the check the peer counted as up to date with the group split."""
    pair = slow_resync_pair(make_pair)
    os.makedirs(pair.primary.path("z"))
    write(pair.primary.path("z", "big"), b"")
    pair.replica.stop()
    content = b"grouped " * 1000
    write(pair.primary.path("a", "x"), content)
    os.link(pair.primary.path("a", "x"), pair.primary.path("y", "x"))
    for d in ("m", "z"):
        write(pair.primary.path(d, "big"), os.urandom(4 << 20))
    pair.mount_replica()
    reconnect(pair)
    backing = f"/proc/self/fd/{pair.replica.backing_fd}"

    def linked() -> bool:
        try:
            return os.stat(f"{backing}/y/x").st_ino == os.stat(f"{backing}/a/x").st_ino
        except FileNotFoundError:
            return False
    wait_for(linked, timeout=30, what="the resync to link y/x to a/x")
    write(f"{backing}/y/.split", content)
    os.rename(f"{backing}/y/.split", f"{backing}/y/x")
    assert not linked()
    assert link_of(pair.primary) == "resync", "the resync ended too early for this test"
    wait_resynced(pair)
    assert linked()
    pair.assert_identical()


def test_a_file_renamed_onto_a_stale_link_of_the_peer_does_not_overwrite_its_group(
        make_pair):
    """The peer has a stale third link y/b of the group a/g1, a/g2 (removed here while
    it was away, and y/b made a new file). While the resync runs, the application
    renames y/b into a/, which the resync has passed: on the peer that moves the stale
    link. When the resync then copies the renamed file, the peer's entry is a link of
    the group: it must be replaced, not written into, or the group's content changes
    on the peer (found by test_resync_under_a_busy_namespace, seed 2)."""
    pair = slow_resync_pair(make_pair)
    write(pair.primary.path("a", "g1"), b"group " * 1000)
    os.link(pair.primary.path("a", "g1"), pair.primary.path("a", "g2"))
    os.link(pair.primary.path("a", "g1"), pair.primary.path("y", "b"))
    pair.replica.stop()
    os.unlink(pair.primary.path("y", "b"))
    write(pair.primary.path("y", "b"), b"single " * 1000)
    write(pair.primary.path("m", "big"), os.urandom(4 << 20))
    pair.mount_replica()
    reconnect(pair)
    # A fast resync: a/ is looked through, m/big sent at 1 MB/s, then y/.
    wait_for(lambda: link_of(pair.primary) == "resync", timeout=30,
             what="the resync to start")
    time.sleep(1)
    assert link_of(pair.primary) == "resync", "the resync ended too early for this test"
    assert os.stat(pair.replica.path("y", "b")).st_nlink == 3, "y/ was handled too early"
    os.rename(pair.primary.path("y", "b"), pair.primary.path("a", "x"))
    wait_resynced(pair)
    with open(pair.replica.path("a", "g1"), "rb") as f:
        assert f.read() == b"group " * 1000
    pair.assert_identical()


def change_files_alone(root: str) -> None:
    """Changes that the journal records item by item (no directory moved, no link)."""
    with open(os.path.join(root, "a/b/big"), "r+b") as f:
        f.seek(2 << 20)
        f.write(b"Y" * 70000)
    os.truncate(os.path.join(root, "a/b/c/trunc"), 99999)
    write(os.path.join(root, "a/small2"), b"rewritten while alone")
    os.unlink(os.path.join(root, "a/small3"))
    os.rename(os.path.join(root, "a/small4"), os.path.join(root, "a/b/c/small4-moved"))
    os.makedirs(os.path.join(root, "fresh/dir"))
    for i in range(10):
        write(os.path.join(root, "fresh/dir", f"f{i}"), os.urandom(5000 * i))
    os.chmod(os.path.join(root, "a/small7"), 0o640)
    os.setxattr(os.path.join(root, "a/small9"), "user.k", b"v")


def test_primary_killed_while_alone_keeps_its_journal(make_pair):
    """kill -9 of the primary while it runs alone: after its restart, the returning
    replica gets what the journal recorded before each change was acknowledged."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    build_tree(pair.primary.dir)
    pair.assert_identical()
    pair.replica.stop()
    change_files_alone(pair.primary.dir)
    (journal,) = [n for n in os.listdir(pair.primary.state_dir) if n.endswith(".journal")]
    assert os.path.getsize(os.path.join(pair.primary.state_dir, journal)) > 32
    pair.primary.kill(signal.SIGKILL)
    pair.primary.stop()                                  # the dead mount is detached
    assert not pair.primary.state().get("acting_primary")
    pair.mount_replica()
    pair.mount_primary()
    wait_resynced(pair)
    st = resync_status(pair.primary)
    assert not st["full"], st
    assert st["bytes_done"] < 8 << 20, st               # the journaled files only
    pair.assert_identical()


def test_primary_killed_while_replicating_makes_the_next_resync_full(make_pair):
    """kill -9 of a primary with changes in flight: neither copy knows which of them the
    other applied, so the next resynchronisation compares everything."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    build_tree(pair.primary.dir)
    pair.assert_identical()
    assert pair.primary.state().get("acting_primary") is True
    pair.primary.kill(signal.SIGKILL)
    pair.primary.stop()
    with open(f"/proc/self/fd/{pair.primary.backing_fd}/a/small1", "r+b") as f:
        f.write(b"an in-flight write the replica never got")
    pair.mount_primary()
    wait_resynced(pair)
    assert resync_status(pair.primary)["full"]
    pair.assert_identical()


@pytest.mark.parametrize("victim", ["replica", "primary"])
def test_resync_interrupted_by_kill_9_resumes_safely(make_pair, victim):
    """kill -9 of either side halfway through a resynchronisation (paced so that it
    takes seconds): the replica never claims to be up to date before the end, and the
    next resynchronisation finishes the job."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.mount_replica()
    pair.mount_primary("--resync-rate", str(4 << 20))
    for i in range(6):
        write(pair.primary.path(f"f{i}"), os.urandom(4 << 20))
    pair.replica.stop()
    for i in range(6):
        with open(pair.primary.path(f"f{i}"), "r+b") as f:
            f.write(os.urandom(3 << 20))                  # 18 MiB to send at 4 MiB/s
    pair.mount_replica()
    reconnect(pair)
    wait_for(lambda: (resync_status(pair.primary) or {}).get("bytes_sent", 0) > 4 << 20,
             timeout=30, what="the resync to be under way")
    assert link_of(pair.primary) == "resync"
    assert pair.replica.state().get("uptodate") is False
    if victim == "replica":
        pair.replica.kill(signal.SIGKILL)
        pair.replica.stop()
        assert pair.replica.state().get("uptodate") is False
        wait_for(lambda: link_of(pair.primary) == "closed", timeout=10, what="the loss")
        assert pair.primary.state()["peer_outdated"] is True
        pair.mount_replica()
        reconnect(pair)
    else:
        pair.primary.kill(signal.SIGKILL)
        pair.primary.stop()
        assert pair.primary.state()["peer_outdated"] is True
        assert not pair.primary.state().get("acting_primary")     # the journal is whole
        pair.mount_primary()
    wait_resynced(pair, timeout=60)
    assert not resync_status(pair.primary)["full"]
    pair.assert_identical()


def test_a_lost_journal_makes_the_next_resync_full(make_pair):
    """Found by bench_resync: the journal file deleted while the primary was unmounted
    must not make the peer look up to date after an empty fast resync."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    for i in range(5):
        write(pair.primary.path(f"f{i}"), os.urandom(2 << 20))
    pair.assert_identical()
    pair.replica.stop()
    with open(pair.primary.path("f2"), "r+b") as f:
        f.seek(100000)
        f.write(os.urandom(300000))
    pair.primary.stop()
    (journal,) = [n for n in os.listdir(pair.primary.state_dir) if n.endswith(".journal")]
    os.unlink(os.path.join(pair.primary.state_dir, journal))
    pair.mount_replica()
    pair.mount_primary()
    wait_resynced(pair)
    assert resync_status(pair.primary)["full"]
    pair.assert_identical()


def test_a_diverged_replica_keeps_its_own_versions_in_quarantine(make_pair):
    """Split brain: the replica's copy acknowledged changes of its own (it ran as a
    primary alone). When it is made a copy of the chosen survivor, what the resync
    overwrites or removes of it goes to a dated quarantine folder: nothing is lost."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    build_tree(pair.primary.dir)
    pair.assert_identical()
    pair.replica.stop()
    # the survivor changes some files while apart
    write(pair.primary.path("a/small1"), b"survivor's version")
    # the other node runs alone and changes its copy (its own acknowledged writes)
    pair.replica.mount("--role", "alone")
    write(pair.replica.path("a/small1"), b"loser's version of small1")
    write(pair.replica.path("a/small2"), b"loser's version of small2")
    write(pair.replica.path("loser-only"), b"a file only the loser has")
    os.unlink(pair.replica.path("a/small3"))
    assert pair.replica.state()["changed_alone"] is True
    pair.replica.stop()
    pair.mount_replica()
    reconnect(pair)
    wait_resynced(pair)
    assert resync_status(pair.primary)["full"]
    pair.assert_identical()
    state = pair.replica.state()
    folder = state["last_quarantine"]
    assert folder.startswith(os.path.join(os.path.dirname(pair.replica.dir),
                                          ".fusemirror-quarantine"))
    kept = {}
    for top, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(top, name), "rb") as f:
                kept[os.path.relpath(os.path.join(top, name), folder)] = f.read()
    assert kept["a/small1"] == b"loser's version of small1"
    assert kept["a/small2"] == b"loser's version of small2"
    assert kept["loser-only"] == b"a file only the loser has"
    assert not state["changed_alone"]


def test_a_fenced_primary_is_resynchronised_in_full(make_pair):
    """A primary fenced with a write in flight (applied here, never acknowledged) keeps
    that write in its copy; when the other node, now primary, resynchronises it, the
    comparison must be full, or the unacknowledged bytes would stay (found in review)."""
    pair = make_pair(policy="block", timeout=5.0)
    pair.start()
    os.mkdir(pair.primary.path("d"))
    write(pair.primary.path("d", "f"), b"A" * (2 << 20))
    pair.assert_identical()
    fobj = open(pair.primary.path("d", "f"), "r+b", buffering=0)
    pair.replica.kill(signal.SIGSTOP)
    errors = []

    def writer():
        try:
            fobj.write(b"B" * 100)
        except OSError as e:
            errors.append(e.errno)
    t = threading.Thread(target=writer)
    t.start()
    try:
        time.sleep(0.5)
        listen = f"127.0.0.1:{free_port()}"
        # the controller's FENCE: agents to replica at once, nothing acknowledged
        control.request(pair.primary.dir, {"cmd": "role", "role": "replica", "listen": listen,
                                           "fence": True}, 30)
        t.join(10)
    finally:
        pair.replica.kill(signal.SIGCONT)
        fobj.close()
    assert errors, "the in-flight write was acknowledged by a fenced primary"
    pair.replica.kill(signal.SIGKILL)
    pair.replica.stop()
    pair.replica.mount("--role", "alone", "--secret-file", pair.secret)
    write(pair.replica.path("g"), b"written by the new primary")
    control.request(pair.replica.dir, {"cmd": "role", "role": "primary", "peer": listen,
                                       "policy": "alone"}, 60)
    wait_for(lambda: link_of(pair.replica) == "connected", timeout=30, what="the resync")
    assert resync_status(pair.replica)["full"]
    assert not pair.backing_difference()


def test_an_interrupted_full_resync_is_full_again(make_pair):
    """`resync --full` interrupted by kill -9 of the replica: the next one is full too
    (the request is in the journal, not in memory; found in review)."""
    pair = make_pair(policy="alone", timeout=2.0)
    pair.mount_replica()
    pair.mount_primary("--resync-rate", str(2 << 20))
    pair.wait_connected()
    for i in range(4):
        write(pair.primary.path(f"f{i}"), os.urandom(4 << 20))
    pair.assert_identical()
    with open(f"/proc/self/fd/{pair.replica.backing_fd}/f3", "r+b") as f:
        f.seek(1 << 20)
        f.write(b"damage behind its back")
    for i in range(3):                             # blocks to send: seconds at 2 MiB/s
        with open(f"/proc/self/fd/{pair.replica.backing_fd}/f{i}", "r+b") as f:
            f.write(os.urandom(2 << 20))
    cli("resync", "--full", pair.primary.dir)
    wait_for(lambda: (resync_status(pair.primary) or {}).get("bytes_sent", 0) > 0,
             timeout=30, what="the resync to send")
    pair.replica.kill(signal.SIGKILL)
    pair.replica.stop()
    pair.mount_replica()
    reconnect(pair)
    wait_resynced(pair, timeout=60)
    assert resync_status(pair.primary)["full"]
    pair.assert_identical()



def _same_but_holes(pair) -> list[str]:
    """Differences of the backing trees, but where a file is sparse (the resync makes
    holes of whole 64 KiB pieces of zeros only: a smaller hole is written as zeros)."""
    return [d for d in pair.backing_difference()
            if d.split(": ", 1)[1] not in ("blocks_hole: True != False",
                                           "blocks_hole: False != True")]


@pytest.mark.parametrize("seed", [1, 2])
def test_resync_under_a_busy_namespace(make_pair, seed):
    """Chaos finding, replayed here without namespaces: three threads create, append,
    rename, hard-link, truncate and delete files in a small tree without a pause
    while the replica goes away (umount, kill -9, or the primary's role switched to
    alone) and comes back, again and again. After each resync both trees are equal.
    Before the fix the resync failed over and over (a link made from a path the
    application had moved), or ended with hard-link groups split on the replica and
    writes made through handles bound to files it had replaced."""
    from chaos import workloads

    pair = make_pair(policy="alone", timeout=2.0)
    pair.start()
    tree = pair.primary.path("chaos", "tree")
    os.makedirs(tree)
    stop, pause = threading.Event(), threading.Event()
    paused = [False] * 3
    errors = []

    def mutate(k: int) -> None:
        rng = random.Random(seed * 100 + k)
        deadline = time.monotonic() + 240
        while not stop.is_set() and time.monotonic() < deadline:
            if pause.is_set():
                paused[k] = True
                time.sleep(0.01)
                continue
            paused[k] = False
            op, args = rng.choice(workloads.OPS), [rng.random() for _ in range(4)]
            try:
                dfd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    op(dfd, args)
                finally:
                    os.close(dfd)
            except OSError as e:
                if e.errno not in (errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY):
                    errors.append(e)
            time.sleep(0.002)

    threads = [threading.Thread(target=mutate, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1)
        rng = random.Random(seed)
        for cycle in range(6):
            how = ("umount", "kill", "alone")[cycle % 3]
            if how == "kill":
                pair.replica.kill(signal.SIGKILL)
            if how == "alone":
                cli("role", pair.primary.dir, "alone")
            else:
                pair.replica.stop()
            time.sleep(rng.uniform(0.2, 1.2))
            if how != "alone":
                pair.mount_replica()
            reconnect(pair)
            wait_resynced(pair)
            time.sleep(rng.uniform(0, 0.5))
            pause.set()
            wait_for(lambda: all(paused), timeout=10, what="the mutators to pause")
            diff = _same_but_holes(pair)
            assert not diff, f"cycle {cycle} ({how}): " + "\n".join(diff[:20])
            pause.clear()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors, errors[:5]
    assert pair.primary.status()["resync"]["state"] == "done"


def test_a_link_moved_between_directories_while_alone_stays_in_its_group(make_pair):
    """A file with links in three directories; while the peer is away one link moves to
    a fourth. The journal names the two directories and the file, not the directory of
    the other links: the fast resynchronisation must still make the moved name a link of
    the peer's group, not a copy of its own (chaos finding, seed 12, fault 115)."""
    pair = make_pair(policy="alone", timeout=3.0).start()
    for d in ("d0", "d1", "d2"):
        os.mkdir(pair.primary.path(d))
    with open(pair.primary.path("d0", "f0"), "wb") as f:
        f.write(b"shared" * 1000)
    os.link(pair.primary.path("d0", "f0"), pair.primary.path("d0", "f2"))
    os.link(pair.primary.path("d0", "f0"), pair.primary.path("d1", "f3"))
    pair.assert_identical()
    cli("role", pair.primary.dir, "alone")
    os.rename(pair.primary.path("d1", "f3"), pair.primary.path("d2", "f4"))
    cli("role", pair.primary.dir, "primary")
    wait_for(lambda: pair.primary.status()["mirror"]["link"] == "connected", timeout=30,
             what="the resynchronisation")
    pair.assert_identical()
    assert os.stat(pair.replica.path("d2", "f4")).st_ino == os.stat(
        pair.replica.path("d0", "f0")).st_ino


def test_a_former_primary_with_changes_the_peer_lacks_is_resynchronised(make_pair):
    """Chaos finding (seed 11, fault 29): a primary whose write was given up (its peer
    stopped answering) became the replica of that peer, now primary; the new primary
    replicated to it without a resynchronisation, and the given-up write stayed in the
    old primary's copy only. A copy with changes its peer lacks must say it is not up to
    date when a primary connects."""
    pair = make_pair(policy="block", timeout=2.0)
    pair.start()
    write(pair.primary.path("f"), b"both nodes have this")
    pair.assert_identical()
    fd = os.open(pair.primary.path("f"), os.O_WRONLY | os.O_APPEND)
    outcome = []

    def append():
        try:
            os.write(fd, b"; only the old primary applied this")
            outcome.append("acknowledged")
        except OSError as e:
            outcome.append(e.errno)
    try:
        pair.replica.kill(signal.SIGSTOP)       # the write is sent, applied here, unanswered
        t = threading.Thread(target=append)
        t.start()
        time.sleep(0.5)
        pair.replica.kill(signal.SIGKILL)       # and it dies with the replica's socket
        pair.replica.stop()
        t.join(30)
    finally:
        os.close(fd)
    assert outcome and outcome[0] != "acknowledged", outcome
    assert pair.primary.state().get("peer_outdated")
    with open(f"/proc/self/fd/{pair.primary.backing_fd}/f", "rb") as f:
        assert f.read() != b"both nodes have this"        # applied here, never answered
    back = f"127.0.0.1:{free_port()}"
    cli("role", pair.primary.dir, "replica", "--listen", back)
    pair.replica.mount("--role", "primary", "--peer", back, "--secret-file", pair.secret,
                       "--on-peer-loss", "block", "--timeout", 2.0)
    wait_for(lambda: link_of(pair.replica) == "connected", timeout=30,
             what="the new primary's link")
    with open(f"/proc/self/fd/{pair.primary.backing_fd}/f", "rb") as f:
        assert f.read() == b"both nodes have this"
    assert not pair.backing_difference()


def _immutable(node, name: str, on: bool) -> None:
    """chattr +i/-i on the backing file, behind the agent's back (the test is skipped on a
    file system without the flag)."""
    p = subprocess.run(["chattr", "+i" if on else "-i",
                        f"/proc/self/fd/{node.backing_fd}/{name}"],
                       capture_output=True, text=True, pass_fds=[node.backing_fd])
    if p.returncode != 0:
        if on:
            pytest.skip(f"no immutable flag here: {p.stderr.strip()}")
        raise AssertionError(p.stderr)


@pytest.mark.parametrize("op", ["unlink", "rename"])
def test_a_change_refused_here_but_applied_on_the_peer_is_repaired(make_pair, op):
    """An unlink or rename has no undo: when it fails here (an immutable file, an I/O
    error) after the peer applied it, the peer is marked out of date and resynchronised.
    The failed change was not journaled, so the resync that followed (from the journal)
    did not look at its directory: the peer's copy went on lacking the file, counted as
    up to date."""
    pair = make_pair(policy="block", timeout=5.0).start()
    write(pair.primary.path("keep"), b"the primary keeps this file")
    pair.assert_identical()
    _immutable(pair.primary, "keep", True)
    try:
        with pytest.raises(PermissionError):
            if op == "unlink":
                os.unlink(pair.primary.path("keep"))
            else:
                os.rename(pair.primary.path("keep"), pair.primary.path("moved"))
    finally:
        _immutable(pair.primary, "keep", False)
    wait_resynced(pair)
    pair.assert_identical()


@pytest.mark.parametrize("op", ["unlink", "rename-dir"])
def test_a_change_refused_here_during_a_resync_makes_the_next_attempt_compare_it(make_pair,
                                                                                  op):
    """The same while a resync runs, after its walk passed the directory: that resync no
    longer counts (it had counted a/ done, and a moved subtree's folders too; the journal
    entry made for the change would have been cleared when it ended). It fails, and the
    next attempt, from the journal, repairs the peer."""
    pair = slow_resync_pair(make_pair)
    pair.replica.stop()
    # new for the peer: the resync copies them, in a/ before m/
    os.makedirs(pair.primary.path("a", "sub", "inner"))
    write(pair.primary.path("a", "sub", "inner", "f"), b"deep in a moved folder")
    write(pair.primary.path("a", "keep"), b"the primary keeps this file")
    write(pair.primary.path("m", "big"), os.urandom(4 << 20))
    pair.mount_replica()
    reconnect(pair)
    # The resync walks a/, then m/ (big sent at 1 MB/s), then y/.
    wait_for(lambda: os.path.exists(pair.replica.path("a", "keep")) and os.path.exists(
        pair.replica.path("a", "sub", "inner", "f")), timeout=30, what="the resync to pass a/")
    name = "a/keep" if op == "unlink" else "a/sub"
    _immutable(pair.primary, name, True)
    try:
        with pytest.raises(PermissionError):
            if op == "unlink":
                os.unlink(pair.primary.path("a", "keep"))
            else:
                os.rename(pair.primary.path("a", "sub"), pair.primary.path("a", "moved"))
    finally:
        _immutable(pair.primary, name, False)
    assert "this resynchronisation no longer counts" in pair.primary.log()
    assert not os.path.exists(pair.replica.path(name))                 # applied there
    wait_resynced(pair)
    pair.assert_identical()
    assert "failed: the copies differ again" in pair.primary.log()      # the spoiled attempt
