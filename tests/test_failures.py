"""Failures never let the two copies differ silently.

Wrong secret, protocol versions, a killed or frozen replica under both peer-loss
policies, a cut network (short: the session resumes; long: EIO), a corrupted
frame, a full disk on either side, and role switches under load.
"""

import contextlib
import errno
import multiprocessing
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import threading
import time

import pyfuse3
import pytest

from conftest import cli, free_port, is_mounted, wait_for
from demo.app import DB_NAME, open_records
from fusemirror import control
from fusemirror import journal
from fusemirror.statefile import escape
from netproxy import Proxy


def write_sync(path, data=b"x" * 4096, offset=0):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def while_frozen(node, threads, join=30):
    """Runs the threads while node's agent is stopped (SIGSTOP), resumed however they end."""
    node.kill(signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(join)
    finally:
        node.kill(signal.SIGCONT)


def attempts(calls, errors: dict) -> list[threading.Thread]:
    """A thread for each (what, fn, *args): it records in errors[what] the errno fn
    failed with (the descriptor of a "create" is closed)."""
    def attempt(what, fn, *args):
        try:
            result = fn(*args)
            if what == "create":
                os.close(result)
        except OSError as e:
            errors[what] = e.errno
    return [threading.Thread(target=attempt, args=c) for c in calls]


def expect_errno(code, fn, *args):
    try:
        fn(*args)
    except OSError as e:
        assert e.errno == code, f"expected {errno.errorcode[code]}, got {e}"
        return
    raise AssertionError(f"expected {errno.errorcode[code]}, the call succeeded")


# --- handshake -----------------------------------------------------------------

def test_wrong_secret_is_refused_and_nothing_applied(make_pair):
    pair = make_pair()
    pair.mount_replica()
    other = os.path.join(pair.base, "other-secret")
    with open(other, "w") as f:
        f.write("not-the-same-secret")
    p = pair.primary.mount("--role", "primary", "--peer", pair.address, "--secret-file", other,
                           check=False)
    assert p.returncode == 7, p.stderr
    assert p.stderr.count("\n") == 1 and "refused" in p.stderr
    assert not is_mounted(pair.primary.dir)
    assert "authentication failed" in pair.replica.log()
    assert os.listdir(pair.replica.dir) == []


def test_protocol_version_mismatch_is_refused(make_pair):
    pair = make_pair()
    pair.mount_replica("--protocol-versions", "3-3")    # a future release only
    p = pair.mount_primary(check=False)
    assert p.returncode == 7 and "protocol version" in p.stderr, p.stderr
    assert "refused" in pair.replica.log()


def test_versions_n_and_n_plus_1_side_by_side(make_pair):
    """A replica that already speaks N+1 serves a primary that speaks only N."""
    pair = make_pair()
    pair.mount_replica("--protocol-versions", "1-2")
    pair.mount_primary("--protocol-versions", "1-1")
    write_sync(pair.primary.path("f"))
    pair.assert_identical()


# --- the peer dies or freezes ----------------------------------------------------

def _streamer(path, mib, queue):
    """Write mib MiB in 1 MiB blocks, then fsync; report errno (0: all acknowledged)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
        block = os.urandom(1 << 20)
        for _ in range(mib):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        queue.put(0)
    except OSError as e:
        queue.put(e.errno)


def _kill_replica_mid_write(pair):
    q = multiprocessing.Queue()
    w = multiprocessing.Process(target=_streamer, args=(pair.primary.path("big"), 400, q))
    w.start()
    wait_for(lambda: os.path.exists(pair.replica.path("big"))
             and os.stat(pair.replica.path("big")).st_size > (8 << 20), what="the stream")
    pair.replica.kill()
    w.join(60)
    return q.get(timeout=5)


def test_replica_killed_mid_write_block_policy_fails_with_eio(make_pair):
    pair = make_pair(policy="block", timeout=2.0).start()
    write_sync(pair.primary.path("before"))
    assert _kill_replica_mid_write(pair) == errno.EIO
    assert pair.primary.state()["peer_outdated"] is True
    start = time.monotonic()
    # From now on nothing is acknowledged that the peer does not have, and quickly.
    expect_errno(errno.EIO, os.mkdir, pair.primary.path("later"))
    assert time.monotonic() - start < 1
    assert "PEER OUT OF DATE" in pair.primary.log()


def test_replica_killed_mid_write_alone_policy_goes_on_and_records(make_pair):
    pair = make_pair(policy="alone", timeout=2.0).start()
    write_sync(pair.primary.path("before"))
    assert _kill_replica_mid_write(pair) == 0
    os.mkdir(pair.primary.path("dir"))
    assert pair.primary.state()["peer_outdated"] is True
    # the journal (what a resync will send): the root's entries and the file being written
    dirty = journal.read(os.path.join(pair.primary.state_dir,
                                      escape(pair.primary.dir) + ".journal"))
    big = os.stat(f"/proc/self/fd/{pair.primary.backing_fd}/big").st_ino
    assert pyfuse3.ROOT_INODE in dirty.nodes, dirty
    assert big in dirty.nodes or big in dirty.chunks, dirty
    assert pair.primary.status()["mirror"]["link"] in ("closed", "outdated")
    assert os.path.getsize(pair.primary.path("big")) == 400 << 20


def test_frozen_replica_block_policy_times_out(make_pair):
    pair = make_pair(policy="block", timeout=2.0).start()
    write_sync(pair.primary.path("before"))
    pair.replica.kill(signal.SIGSTOP)
    try:
        start = time.monotonic()
        expect_errno(errno.EIO, write_sync, pair.primary.path("during"))
        assert 1.5 <= time.monotonic() - start < 20
        assert pair.primary.state()["peer_outdated"] is True
    finally:
        pair.replica.kill(signal.SIGCONT)


def test_changes_applied_here_but_answered_eio_leave_no_stale_kernel_cache(make_pair):
    """A change applied here that the peer never confirmed is answered EIO, yet it was
    done: the kernel, which keeps names and attributes for 10 s, must not go on showing
    what was there before. A deleted sqlite journal still found by its name was taken
    for a hot one: start_prim failed with "disk I/O error" (chaos seed 12)."""
    pair = make_pair(policy="block", timeout=2.0).start()
    for d, name in (("d1", "f"), ("d2", "g"), ("d3", None), ("d4", "h")):
        os.mkdir(pair.primary.path(d))
        if name:
            write_sync(pair.primary.path(d, name), b"x" * 100)
    names = [("d1", "f"), ("d2", "g"), ("d2", "g2"), ("d3", "new"), ("d4", "h")]
    for d, name in names:                          # the kernel caches what it saw
        os.path.lexists(pair.primary.path(d, name))
    errors = {}
    calls = [("unlink", os.unlink, pair.primary.path("d1", "f")),
             ("rename", os.rename, pair.primary.path("d2", "g"), pair.primary.path("d2", "g2")),
             ("create", os.open, pair.primary.path("d3", "new"), os.O_CREAT | os.O_WRONLY, 0o644),
             ("truncate", os.truncate, pair.primary.path("d4", "h"), 5)]
    while_frozen(pair.replica, attempts(calls, errors))
    assert errors == {"unlink": errno.EIO, "rename": errno.EIO, "create": errno.EIO,
                      "truncate": errno.EIO}, errors
    backing = f"/proc/self/fd/{pair.primary.backing_fd}"

    def seen(root, d, name):
        try:
            return os.stat(os.path.join(root, d, name)).st_size
        except FileNotFoundError:
            return None
    wait_for(lambda: all(seen(pair.primary.dir, d, n) == seen(backing, d, n) for d, n in names),
             timeout=2, what="the mount to show what its folder holds")
    assert seen(backing, "d1", "f") is None and seen(backing, "d2", "g2") == 100


def test_a_create_whose_deadline_passed_while_it_ran_keeps_no_handle_or_reference(make_pair):
    """The controller's write deadline passing while a create or mkdir waits for the
    peer: done here, answered EIO. The kernel never gets the handle or the entry, so
    the agent must not keep them (they were never released: a descriptor and an inode
    reference leaked for good; found in review)."""
    pair = make_pair(policy="alone", timeout=1.0).start()
    for d in ("a", "b"):                   # one each: changes in one directory queue
        os.mkdir(pair.primary.path(d))
    before = pair.primary.status()
    errors = {}
    calls = [("create", os.open, pair.primary.path("a", "new"), os.O_CREAT | os.O_WRONLY, 0o644),
             ("mkdir", os.mkdir, pair.primary.path("b", "dir"))]
    control.request(pair.primary.dir, {"cmd": "deadline", "until": time.monotonic() + 0.3}, 10)
    try:        # the peer frozen: each waits 1 s for it, goes on alone, then meets the deadline
        while_frozen(pair.replica, attempts(calls, errors))
        after = pair.primary.status()
    finally:
        control.request(pair.primary.dir, {"cmd": "deadline", "until": None}, 10)
    assert errors == {"create": errno.EIO, "mkdir": errno.EIO}, errors
    assert (after["open_files"], after["inodes"]) == (before["open_files"], before["inodes"])
    assert os.path.isfile(pair.primary.path("a", "new"))
    assert os.path.isdir(pair.primary.path("b", "dir"))


def test_changes_waiting_to_be_sent_when_the_node_is_fenced_fail(make_pair):
    """The peer silent (frozen), the window of changes in flight or the socket full,
    more changes wait to be sent; then the controller fences this node. Those that
    waited were acknowledged alone, and the node counted itself diverged: split brain,
    both nodes waited for the admin (chaos seed 12, fault 54 of the eighth run). They
    must fail like those in flight, and leave no change counted as acknowledged alone."""
    pair = make_pair(policy="block", timeout=60.0).start()
    count, size = 72, 1 << 20           # more than the 64 MiB the window holds
    fds = [os.open(pair.primary.path(f"f{i}"), os.O_WRONLY | os.O_CREAT, 0o644)
           for i in range(count)]
    results = {}

    def write(i):
        try:
            results[i] = os.pwrite(fds[i], b"w" * size, 0)
        except OSError as e:
            results[i] = errno.errorcode[e.errno]
    threads = [threading.Thread(target=write, args=(i,)) for i in range(count)]
    pair.replica.kill(signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        # Those sent fill the window or the socket's buffers: the others wait to be sent.
        wait_for(lambda: pair.primary.status()["mirror"]["in_flight"] >= 2, timeout=30,
                 what="changes in flight")
        time.sleep(1.0)
        control.request(pair.primary.dir, {"cmd": "role", "role": "replica", "fence": True,
                                           "listen": f"127.0.0.1:{free_port()}"}, 60)
        for t in threads:
            t.join(60)
    finally:
        pair.replica.kill(signal.SIGCONT)
        for fd in fds:
            os.close(fd)
    assert len(results) == count and set(results.values()) <= {"EIO", "EROFS"}, results
    assert not pair.primary.state().get("changed_alone")


def hot_journal(folder: str, rows: int = 200) -> tuple[str, str]:
    """A database after a committed UPDATE, and the journal of the same UPDATE by a
    process killed before its commit (what a commit leaves until its last step, the
    journal's deletion): rolling it back would undo the committed rows."""
    committed, crashed = os.path.join(folder, "committed.db"), os.path.join(folder, "crash.db")
    con = sqlite3.connect(crashed, isolation_level=None)
    con.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, body BLOB, created REAL)")
    con.executemany("INSERT INTO records (body, created) VALUES (?, 0)",
                    [(b"a" * 1000,)] * rows)
    con.close()
    shutil.copy(crashed, committed)
    update = "UPDATE records SET body = ?"
    con = sqlite3.connect(committed, isolation_level=None)
    con.execute(update, (b"b" * 1000,))
    con.close()
    pid = os.fork()
    if pid == 0:                    # the pages spill to the file: the journal is hot
        try:
            con = sqlite3.connect(crashed, isolation_level=None)
            con.execute("PRAGMA cache_size=1")
            con.execute("BEGIN")
            con.execute(update, (b"b" * 1000,))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    assert os.path.getsize(crashed + "-journal") > 0
    return committed, crashed + "-journal"


def test_a_commit_answered_eio_leaves_no_hot_journal_for_the_next_start(make_pair, tmp_path):
    """sqlite commits by deleting its journal. That unlink, done here but answered EIO
    (the peer frozen), left the name in the kernel's cache: the application's next start
    took the deleted journal for a hot one, rolled the commit back and failed to delete
    the journal again: "disk I/O error (SQLITE_IOERR_DELETE_NOENT)" (start_prim after a
    fence, chaos seed 12)."""
    committed, journal = hot_journal(str(tmp_path))
    pair = make_pair(policy="block", timeout=2.0).start()
    db = pair.primary.path(DB_NAME)
    shutil.copy(committed, db)
    shutil.copy(journal, db + "-journal")
    os.stat(db + "-journal")
    pair.replica.kill(signal.SIGSTOP)
    try:
        expect_errno(errno.EIO, os.unlink, db + "-journal")
    finally:
        pair.replica.kill(signal.SIGCONT)
    cli("role", pair.primary.dir, "alone")
    open_records(pair.primary.dir).close()          # raised StartupError
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        assert con.execute("SELECT count(*), min(body) FROM records").fetchone() == \
            (200, b"b" * 1000)
    finally:
        con.close()


def test_writes_waiting_for_room_when_the_peer_is_given_up_are_resynchronised(make_pair):
    """A frozen replica: more writes than the replication window holds (64 MiB) are under
    way when the primary gives the peer up. Those that were still waiting for room in the
    window are applied here alone, and the next (journal-based) resynchronisation must
    send them (chaos finding: they were in no journal, and the copies stayed different)."""
    pair = make_pair(policy="alone", timeout=2.0).start()
    count, size = 80, 1 << 20
    fds = []
    for i in range(count):
        write_sync(pair.primary.path(f"f{i:02d}"), b"-")
        fds.append(os.open(pair.primary.path(f"f{i:02d}"), os.O_WRONLY))
    results = {}

    def write(i):
        try:
            results[i] = os.pwrite(fds[i], bytes([65 + i % 26]) * size, 0)
        except OSError as e:
            results[i] = e.errno

    try:
        while_frozen(pair.replica, [threading.Thread(target=write, args=(i,))
                                    for i in range(count)], join=60)
    finally:
        for fd in fds:
            os.close(fd)
    assert all(v == size for v in results.values()) and len(results) == count, results
    assert pair.primary.state()["peer_outdated"] is True
    cli("role", pair.primary.dir, "primary")
    wait_for(lambda: pair.primary.status()["mirror"]["link"] == "connected", timeout=60,
             what="the resynchronisation")
    pair.assert_identical()


# --- network ---------------------------------------------------------------------

@pytest.fixture
def proxied(make_pair):
    pair = make_pair(policy="block", timeout=4.0)
    pair.mount_replica()
    proxy = Proxy(pair.port).start()
    try:
        pair.mount_primary(peer=proxy.address)
        yield pair, proxy
    finally:
        proxy.close()


def _writer(path, count, queue):
    try:
        for i in range(count):
            write_sync(path, b"%08d" % i, i * 8)
        queue.put(0)
    except OSError as e:
        queue.put(e.errno)


def test_a_change_waiting_for_a_replica_back_without_the_session_goes_on_the_new_link(
        make_pair):
    """Chaos seed 16, fault 50: the replica dropped the connection (a corrupted frame);
    the primary, reconnecting, heard that its session was gone, marked the peer out of
    date and made a new link that resynchronised it a few ms later. A change waiting for
    the peer meanwhile failed with EIO (policy block). It now waits for the new link."""
    pair = make_pair(policy="block", timeout=5.0).start()
    write_sync(pair.primary.path("before"))
    pair.replica.stop()                      # its session goes with its process
    q = multiprocessing.Queue()
    w = multiprocessing.Process(target=_writer, args=(pair.primary.path("g"), 3, q))
    w.start()
    time.sleep(1.0)
    assert w.is_alive(), "the change did not wait for the peer"
    pair.mount_replica()
    w.join(30)
    assert q.get(timeout=5) == 0
    assert "the peer came back without our session" in pair.primary.log()
    wait_for(lambda: pair.primary.status()["mirror"]["link"] == "connected", timeout=30,
             what="the resynchronisation")
    pair.assert_identical()


def test_short_network_cut_resumes_without_loss(proxied):
    pair, proxy = proxied
    write_sync(pair.primary.path("f"))
    proxy.cut()
    q = multiprocessing.Queue()
    w = multiprocessing.Process(target=_writer, args=(pair.primary.path("g"), 50, q))
    w.start()
    time.sleep(1.0)
    proxy.restore()
    w.join(30)
    assert q.get(timeout=5) == 0
    assert pair.primary.status()["mirror"]["reconnects"] >= 1
    assert pair.primary.state().get("peer_outdated") is not True
    pair.assert_identical()


def test_long_network_cut_fails_with_eio(proxied):
    pair, proxy = proxied
    write_sync(pair.primary.path("f"))
    proxy.cut()
    start = time.monotonic()
    expect_errno(errno.EIO, write_sync, pair.primary.path("g"))
    assert time.monotonic() - start >= 3.5
    assert pair.primary.state()["peer_outdated"] is True


def test_corrupted_frame_is_never_applied(proxied):
    pair, proxy = proxied
    write_sync(pair.primary.path("f"), b"a" * 10)
    proxy.corrupt_next(min_size=64 * 1024)
    data = os.urandom(1 << 20)
    expect_errno(errno.EIO, write_sync, pair.primary.path("f"), data)
    assert proxy.corrupted == 1
    log = pair.replica.log()
    assert "corrupted frame" in log and "nothing of it was applied" in log
    # the replica dropped the connection and marked its copy out of date; the primary
    # reconnected and resynchronised it on the new connection: both copies equal again
    # (the write failed for the application, under policy block, but is on the primary)
    wait_for(lambda: pair.primary.status()["mirror"]["link"] == "connected", timeout=30,
             what="the resynchronisation")
    assert "the peer came back without our session" in pair.primary.log()
    pair.assert_identical()


# --- full disks ------------------------------------------------------------------

@pytest.fixture
def small_tmpfs():
    mounted = []

    def make(path, size="1m"):
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", path],
                       check=True)
        mounted.append(path)
    yield make
    for path in mounted:
        subprocess.run(["umount", "-l", path], capture_output=True)


def test_disk_full_on_replica_fails_with_eio(make_pair, small_tmpfs):
    pair = make_pair(policy="block", timeout=3.0)
    small_tmpfs(pair.replica.dir)
    pair.start()
    write_sync(pair.primary.path("small"))
    with pytest.raises(OSError) as e:
        write_sync(pair.primary.path("big"), os.urandom(3 << 20))
    assert e.value.errno == errno.EIO
    assert pair.primary.state()["peer_outdated"] is True
    assert "No space left" in pair.replica.log()


def test_a_failing_resync_is_retried_until_it_succeeds(make_pair, small_tmpfs):
    """The replica's disk is too small for what changed while it was away: every
    resynchronisation fails there (ENOSPC). The primary keeps trying, more and more
    slowly, beyond its first three retries (it used to stop there, leaving the peer out
    of date until an admin stepped in); once the space is there, one succeeds."""
    pair = make_pair(policy="alone", timeout=2.0)
    small_tmpfs(pair.replica.dir, "1m")
    pair.start()
    pair.replica.stop()
    write_sync(pair.primary.path("big"), os.urandom(3 << 20))
    pair.mount_replica()
    cli("role", pair.primary.dir, "primary", "--peer", pair.address)

    def failures() -> int:
        return pair.primary.log().count(f"resynchronisation of {pair.address} failed")
    wait_for(lambda: failures() >= 5, timeout=60, what="a fifth failed resynchronisation")
    assert "No space left" in pair.replica.log()
    os.unlink(pair.primary.path("big"))
    pair.wait_connected(timeout=60)                 # a resynchronisation succeeded
    pair.assert_identical()


def test_what_a_failed_resync_changed_outside_the_journal_is_compared_by_the_next(
        make_pair, small_tmpfs):
    """A fast resync changes the peer beyond what the journal names: here it re-creates,
    empty, a file the peer lost, in a directory the journal does not name. Then it fails
    (the peer's disk is full). The next attempt must compare that directory and the whole
    file again; it used to look only at the file's journaled chunk and leave the rest of
    the re-created file empty on the peer (chaos run, seed 13, fault 151)."""
    pair = make_pair(policy="alone", timeout=2.0)
    small_tmpfs(pair.replica.dir, "6m")
    pair.start()
    os.makedirs(pair.primary.path("a"))
    write_sync(pair.primary.path("a", "f"), os.urandom(2 << 20))
    pair.replica.stop()
    write_sync(pair.primary.path("a", "f"), os.urandom(4096), offset=(1 << 20) + 5)
    os.unlink(os.path.join(pair.replica.dir, "a", "f"))        # the peer lost it
    root = os.stat(pair.replica.dir)        # its mtime is put back after the filler
    with open(os.path.join(pair.replica.dir, "filler"), "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * (256 << 10))
    pair.mount_replica()
    cli("role", pair.primary.dir, "primary", "--peer", pair.address)
    wait_for(lambda: f"resynchronisation of {pair.address} failed" in pair.primary.log(),
             timeout=30, what="the resynchronisation to fail on the full disk")
    os.unlink("filler", dir_fd=pair.replica.backing_fd)         # behind the replica's back
    os.utime(pair.replica.backing_fd, ns=(root.st_atime_ns, root.st_mtime_ns))
    pair.wait_connected(timeout=60)                 # a resynchronisation succeeded
    pair.assert_identical()


def test_disk_full_on_primary_replica_gets_primary_version(make_pair, small_tmpfs):
    pair = make_pair(policy="block", timeout=3.0)
    small_tmpfs(pair.primary.dir, "2m")
    pair.start()
    with pytest.raises(OSError) as e:
        with open(pair.primary.path("big"), "wb") as f:
            for _ in range(8):
                f.write(os.urandom(1 << 20))
                f.flush()
    assert e.value.errno == errno.ENOSPC
    pair.assert_identical()
    assert pair.primary.state().get("peer_outdated") is not True


def test_short_writes_on_a_full_primary_through_write_only_descriptors(make_pair, small_tmpfs):
    """Chaos finding: writes that fit only in part on the primary's full disk, made
    through write-only descriptors (O_WRONLY|O_TRUNC on existing files, as most programs
    write a file), left the peer with the whole writes and the application with EBADF:
    reading back the primary's version to repair the peer failed."""
    pair = make_pair(policy="block", timeout=3.0)
    small_tmpfs(pair.primary.dir, "1m")
    pair.start()
    rng = random.Random(1)
    refused = {}
    for i in range(120):
        try:
            fd = os.open(pair.primary.path(f"f{i % 40}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                         0o644)
            try:
                os.write(fd, os.urandom(int(rng.random() * 65536)))
                if rng.random() < 0.5:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as e:
            refused[e.errno] = refused.get(e.errno, 0) + 1
    assert set(refused) == {errno.ENOSPC}, refused
    pair.assert_identical()
    assert pair.primary.state().get("peer_outdated") is not True


# --- role switches ---------------------------------------------------------------

def _appender(path, queue, stop):
    """Append numbered records with fsync; report each acknowledged one."""
    n = 0
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        while not stop.is_set() and n < 100_000:
            os.write(fd, b"%08d\n" % n)
            os.fsync(fd)
            queue.put(n)
            n += 1
        os.close(fd)
        queue.put(("end", 0))
    except OSError as e:
        queue.put(("end", e.errno))


def test_role_swap_under_load_loses_no_acknowledged_write(make_pair):
    pair = make_pair(policy="block", timeout=5.0).start()
    q, stop = multiprocessing.Queue(), multiprocessing.Event()
    w = multiprocessing.Process(target=_appender, args=(pair.primary.path("log"), q, stop))
    w.start()
    time.sleep(1.0)
    new_port = free_port()
    # Swap: the old primary becomes a replica (listening), then the old replica a primary.
    cli("role", pair.primary.dir, "replica", "--listen", f"127.0.0.1:{new_port}")
    cli("role", pair.replica.dir, "primary", "--peer", f"127.0.0.1:{new_port}")
    w.join(30)
    acked, end = [], None
    while True:
        item = q.get(timeout=5)
        if isinstance(item, tuple):
            end = item[1]
            break
        acked.append(item)
    assert end == errno.EROFS          # the old primary turned read-only under the writer
    assert len(acked) > 10
    with open(pair.replica.path("log"), "rb") as f:      # the new primary
        lines = f.read().split(b"\n")
    assert [int(x) for x in lines if x][:len(acked)] == acked
    with open(pair.replica.path("log"), "ab") as f:
        f.write(b"after swap\n")
    r = cli("verify", pair.replica.dir, check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    assert pair.replica.status()["role"] == "primary"
    assert pair.primary.status()["role"] == "replica"


def test_primary_to_alone_and_back_resynchronises_the_peer(make_pair):
    pair = make_pair(policy="alone", timeout=3.0).start()
    write_sync(pair.primary.path("a"))
    cli("role", pair.primary.dir, "alone")
    write_sync(pair.primary.path("b"))
    assert pair.primary.state()["peer_outdated"] is True
    cli("role", pair.primary.dir, "primary")
    wait_for(lambda: pair.primary.status()["mirror"]["link"] == "connected", timeout=30,
             what="the resynchronisation")
    assert pair.primary.state()["peer_outdated"] is False
    pair.assert_identical()


def test_a_peer_without_resynchronisation_stays_out_of_date(make_pair):
    """A primary of protocol 1 (no resynchronisation) leaves the peer out of date."""
    pair = make_pair(policy="alone", timeout=3.0)
    pair.mount_replica()
    pair.mount_primary("--protocol-versions", "1-1")
    write_sync(pair.primary.path("a"))
    cli("role", pair.primary.dir, "alone")
    write_sync(pair.primary.path("b"))
    assert pair.primary.state()["peer_outdated"] is True
    cli("role", pair.primary.dir, "primary")
    st = pair.primary.status()
    assert st["role"] == "primary" and st["mirror"]["link"] == "outdated"
    r = cli("verify", pair.primary.dir, check=False)
    assert r.returncode == 1 and "only on primary: b" in r.stdout


def test_a_change_failing_the_same_way_on_both_nodes_is_no_divergence(pair):
    os.makedirs(pair.primary.path("d/sub"))
    expect_errno(errno.ENOTEMPTY, os.rmdir, pair.primary.path("d"))
    expect_errno(errno.EEXIST, os.mkdir, pair.primary.path("d"))
    os.mkdir(pair.primary.path("after"))        # still replicated, not refused
    assert pair.primary.state().get("peer_outdated") is not True
    assert pair.replica.state().get("uptodate") is not False
    pair.assert_identical()
