"""The mount's life cycle: mount in place, replicate, unmount, and the CLI's errors."""

import os
import subprocess
import time

from conftest import cli, is_mounted


def test_mount_in_place_keeps_existing_files(scratch):
    from conftest import Node
    node = Node(scratch, "n")
    with open(node.path("before"), "w") as f:
        f.write("old data")
    try:
        node.mount("--role", "alone")
        assert is_mounted(node.dir)
        with open(node.path("before")) as f:
            assert f.read() == "old data"
        with open(node.path("during"), "w") as f:
            f.write("new data")
        cli("umount", node.dir)
        assert not is_mounted(node.dir)
        with open(node.path("during")) as f:
            assert f.read() == "new data"
    finally:
        node.close()


def test_pair_replicates_a_small_tree(pair):
    p = pair.primary
    os.makedirs(p.path("a/b/c"))
    with open(p.path("a/b/c/file"), "wb") as f:
        f.write(b"x" * 100_000)
    os.symlink("b/c/file", p.path("a/link"))
    os.link(p.path("a/b/c/file"), p.path("a/hard"))
    os.rename(p.path("a/b/c/file"), p.path("a/b/moved"))
    os.chmod(p.path("a/b/moved"), 0o640)
    os.truncate(p.path("a/hard"), 10)
    with open(pair.replica.path("a/b/moved"), "rb") as f:
        assert f.read() == b"x" * 10
    pair.assert_identical()


def test_replica_refuses_changes_with_erofs(pair):
    with open(pair.primary.path("f"), "w") as f:
        f.write("data")
    r = pair.replica
    for action in (lambda: open(r.path("new"), "w"), lambda: open(r.path("f"), "a"),
                   lambda: os.mkdir(r.path("d")), lambda: os.unlink(r.path("f")),
                   lambda: os.chmod(r.path("f"), 0o600), lambda: os.rename(r.path("f"), r.path("g")),
                   lambda: os.truncate(r.path("f"), 0), lambda: os.symlink("f", r.path("s")),
                   lambda: os.setxattr(r.path("f"), "user.a", b"1")):
        try:
            action()
        except OSError as e:
            assert e.errno == 30, e  # EROFS
        else:
            raise AssertionError("a change on the replica was accepted")
    pair.assert_identical()


def test_mount_errors_are_one_line_with_exit_codes(scratch):
    missing = os.path.join(scratch, "missing")
    p = cli("mount", missing, "--role", "alone", check=False)
    assert p.returncode == 4 and p.stderr.count("\n") == 1 and "does not exist" in p.stderr
    plain = os.path.join(scratch, "file")
    open(plain, "w").close()
    p = cli("mount", plain, "--role", "alone", check=False)
    assert p.returncode in (2, 4)
    d = os.path.join(scratch, "d")
    os.mkdir(d)
    p = cli("mount", d, "--role", "primary", "--peer", "127.0.0.1:1", "--secret-file", plain,
            check=False)
    assert p.returncode == 9 and "secret" in p.stderr
    p = cli("status", d, check=False)
    assert p.returncode == 8 and "no fusemirror agent" in p.stderr


def test_already_mounted_is_refused(alone):
    p = cli("mount", alone.dir, "--role", "alone", "--state-dir", alone.state_dir, check=False)
    assert p.returncode == 5 and "already mounted" in p.stderr


def test_peer_unreachable_is_refused(scratch):
    from conftest import Pair
    pair = Pair(scratch)
    try:
        p = pair.mount_primary(check=False)
        assert p.returncode == 6, p.stderr
        assert "cannot reach peer" in p.stderr and p.stderr.count("\n") == 1
        assert not is_mounted(pair.primary.dir)
    finally:
        pair.close()


def test_control_socket_is_root_only(alone):
    from fusemirror import control
    path = control.socket_path(alone.dir)
    st = os.stat(path)
    assert st.st_mode & 0o077 == 0 and st.st_uid == 0
    assert os.stat(os.path.dirname(path)).st_mode & 0o077 == 0
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "cat",
                        path], capture_output=True)
    assert r.returncode != 0


def test_open_existing_file_with_o_nofollow(pair):
    """SQLite opens with O_NOFOLLOW; the agent reopens through /proc and must not pass it on."""
    import sqlite3
    db = pair.primary.path("x.db")
    with sqlite3.connect(db) as c:
        c.execute("create table t (v)")
    fd = os.open(db, os.O_RDWR | os.O_NOFOLLOW)
    os.close(fd)
    with sqlite3.connect(db) as c:
        c.execute("insert into t values (1)")
    fd = os.open(pair.replica.path("x.db"), os.O_RDONLY | os.O_NOFOLLOW)
    os.close(fd)
    pair.assert_identical()


def test_dead_mount_after_kill_is_reported_as_mounted(scratch):
    from conftest import Node
    node = Node(scratch, "n")
    try:
        node.mount("--role", "alone")
        node.kill()                        # kill -9: the kernel mount stays, dead
        p = cli("mount", node.dir, "--role", "alone", "--state-dir", node.state_dir,
                check=False)
        assert p.returncode == 5 and "already mounted" in p.stderr, p.stderr
    finally:
        node.close()                       # fusermount3 -u -z, by the fixture's rules
    assert not is_mounted(node.dir)


def test_foreground_agent_unmounts_on_sigterm(scratch):
    """-f stays in the foreground; SIGTERM finishes replication and unmounts."""
    import signal
    import sys
    from conftest import TOP, Node, wait_for
    node = Node(scratch, "fg")
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "mount", node.dir, "--role",
                             "alone", "-f", "--state-dir", node.state_dir, "--log-file",
                             node.log_file], cwd=TOP, stdin=subprocess.DEVNULL)
    try:
        wait_for(lambda: is_mounted(node.dir), what="the foreground mount")
        with open(node.path("f"), "w") as f:
            f.write("kept")
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        assert not is_mounted(node.dir)
        with open(node.path("f")) as f:
            assert f.read() == "kept"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        node.close()


def test_no_change_is_acknowledged_past_the_write_deadline(alone):
    """The controller's lease, as the agent enforces it: past the deadline changes wait for
    a new one, and fail (EIO) if none comes; reads go on."""
    import errno
    import threading

    from fusemirror import control as ctl

    def deadline(until):
        ctl.request(alone.dir, {"cmd": "deadline", "until": until})

    with open(alone.path("f"), "wb") as f:
        f.write(b"before")
    deadline(time.monotonic() + 60)
    os.mkdir(alone.path("within"))
    deadline(time.monotonic() - 1)
    done = {}

    def change():
        try:
            os.mkdir(alone.path("waited"))
            done["at"] = time.monotonic()
        except OSError as e:
            done["error"] = e.errno

    t = threading.Thread(target=change)
    t.start()
    time.sleep(0.5)
    assert not done                          # waiting for a new deadline
    renewed = time.monotonic()
    deadline(renewed + 60)
    t.join(10)
    assert done.get("at", 0) >= renewed
    deadline(time.monotonic() - 1)
    started = time.monotonic()
    try:
        os.mkdir(alone.path("refused"))
    except OSError as e:
        assert e.errno == errno.EIO
    else:
        raise AssertionError("a change was acknowledged past the deadline")
    assert time.monotonic() - started >= 4
    with open(alone.path("f"), "rb") as f:
        assert f.read() == b"before"          # reading is no acknowledgement
    assert not os.path.exists(alone.path("refused"))
    deadline(None)
    os.mkdir(alone.path("after"))
