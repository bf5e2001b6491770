"""Fixtures for real mounts: a primary+replica pair on loopback, or one mount alone.

Every mount is made through the real CLI (`python -m cli.main mount ...`), every
agent is stopped by PID and every mount removed in teardown, even when the test
fails. Each node keeps a descriptor on its folder opened before mounting, so a test
can read the backing tree directly and compare the two copies without trusting
fusemirror's own `verify`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time

import pytest

from fusemirror import control
from fusemirror.statefile import escape

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRATCH_ROOT = "/var/tmp"


def cli(*args, check=True, timeout=60, **kw) -> subprocess.CompletedProcess:
    """Run `fusemirror ARGS` from the source tree."""
    env = dict(os.environ, PYTHONPATH=TOP)
    p = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], cwd=TOP, env=env,
                       capture_output=True, text=True, timeout=timeout, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"fusemirror {' '.join(map(str, args))} -> {p.returncode}\n"
                             f"{p.stdout}{p.stderr}")
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def abort_fuse(path: str) -> None:
    """Last resort for a mount whose agent is gone or stuck: abort the connection."""
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                fields = line.split()
                if fields[4] == path:
                    minor = fields[2].split(":")[1]
                    conn = f"/sys/fs/fuse/connections/{minor}/abort"
                    if os.path.exists(conn):
                        with open(conn, "w") as a:
                            a.write("1")
    except OSError:
        pass


class Node:
    """One mounted folder and its agent."""

    def __init__(self, base: str, name: str):
        self.name = name
        self.dir = os.path.join(base, name, "data")
        self.state_dir = os.path.join(base, name, "state")
        self.log_file = os.path.join(base, name, "agent.log")
        os.makedirs(self.dir)
        self.backing_fd: int | None = None
        self.pid: int | None = None

    def mount(self, *args, check=True):
        if self.backing_fd is None:
            self.backing_fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        if os.environ.get("FUSEMIRROR_TEST_VERBOSE"):
            args += ("--verbose",)          # debug logs, for a flaky test's post-mortem
        p = cli("mount", self.dir, "--state-dir", self.state_dir, "--log-file", self.log_file,
                *args, check=check)
        if p.returncode == 0:
            self.pid = self.status()["pid"]
        return p

    def status(self) -> dict:
        return json.loads(cli("status", self.dir, "--json").stdout)

    def state(self) -> dict:
        path = os.path.join(self.state_dir, escape(self.dir) + ".state")
        try:
            with open(path) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def path(self, *parts) -> str:
        return os.path.join(self.dir, *parts)

    def log(self) -> str:
        try:
            with open(self.log_file) as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Unmount and stop the agent, by every means needed, by PID only."""
        if is_mounted(self.dir):
            p = cli("umount", self.dir, check=False, timeout=40) if self.pid else None
            if p is None or p.returncode != 0:
                if self.pid:
                    try:
                        os.kill(self.pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass
                subprocess.run(["fusermount3", "-u", "-z", self.dir], capture_output=True)
                if is_mounted(self.dir):
                    abort_fuse(self.dir)
                    subprocess.run(["umount", "-l", self.dir], capture_output=True)
        if self.pid:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and _alive(self.pid):
                time.sleep(0.05)
            if _alive(self.pid):
                try:
                    os.kill(self.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.pid = None

    def close(self) -> None:
        self.stop()
        # An agent killed by the test (SIGKILL) leaves its control socket in /run/fusemirror
        # (79 of them had piled up on this machine); its agent is gone now.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(control.socket_path(os.path.realpath(self.dir)))
        if self.backing_fd is not None:
            os.close(self.backing_fd)
            self.backing_fd = None

    def kill(self, sig=signal.SIGKILL) -> None:
        os.kill(self.pid, sig)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def snapshot(dir_fd: int) -> dict:
    """Everything a copy must agree on, read from a backing directory descriptor:
    type, mode, owner, size, mtime, content digest, symlink target, device number,
    xattrs, and which paths share an inode. Independent of fusemirror's code."""
    out = {}
    inodes: dict[int, list] = {}
    for top, dirs, files, fd in os.fwalk(b".", dir_fd=dir_fd, follow_symlinks=False):
        names = [b"."] if top == b"." else []
        for name in names + dirs + files:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            rel = os.path.normpath(os.path.join(top, name))
            e = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
                 "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns}
            proc = f"/proc/self/fd/{fd}/".encode() + name
            if stat.S_ISREG(st.st_mode):
                h = hashlib.sha256()
                with open(os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd), "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        h.update(block)
                e.update(size=st.st_size, sha=h.hexdigest(), blocks_hole=st.st_blocks * 512
                         < st.st_size)
            elif stat.S_ISLNK(st.st_mode):
                e["target"] = os.readlink(name, dir_fd=fd)
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                e["rdev"] = st.st_rdev
            if not stat.S_ISLNK(st.st_mode):
                e["xattrs"] = {n: os.getxattr(proc, n) for n in sorted(os.listxattr(proc))}
            out[rel] = e
            if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                inodes.setdefault(st.st_ino, []).append(rel)
    for group in inodes.values():
        for rel in group:
            out[rel]["links"] = sorted(group)
    return out


def describe_difference(a: dict, b: dict) -> list[str]:
    lines = []
    for path in sorted(a.keys() | b.keys()):
        if path not in b:
            lines.append(f"only on primary: {path!r}")
        elif path not in a:
            lines.append(f"only on replica: {path!r}")
        elif a[path] != b[path]:
            keys = {k for k in a[path].keys() | b[path].keys() if a[path].get(k) != b[path].get(k)}
            lines.append(f"{path!r}: " + ", ".join(
                f"{k}: {a[path].get(k)!r} != {b[path].get(k)!r}" for k in sorted(keys)))
    return lines


class Pair:
    def __init__(self, base: str, policy: str = "block", timeout: float = 5.0):
        self.base = base
        self.secret = os.path.join(base, "secret")
        with open(self.secret, "wb") as f:
            f.write(os.urandom(32).hex().encode())
        self.port = free_port()
        self.primary = Node(base, "primary")
        self.replica = Node(base, "replica")
        self.policy = policy
        self.timeout = timeout

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def mount_replica(self, *extra, check=True):
        return self.replica.mount("--role", "replica", "--listen", self.address,
                                  "--secret-file", self.secret, "--timeout", self.timeout,
                                  *extra, check=check)

    def mount_primary(self, *extra, check=True, peer=None):
        return self.primary.mount("--role", "primary", "--peer", peer or self.address,
                                  "--secret-file", self.secret, "--on-peer-loss", self.policy,
                                  "--timeout", self.timeout, *extra, check=check)

    def start(self):
        """Both mounted, and the first pairing's comparison of the two copies done."""
        self.mount_replica()
        self.mount_primary()
        self.wait_connected()
        return self

    def wait_connected(self, timeout: float = 30.0) -> None:
        wait_for(lambda: (self.primary.status().get("mirror") or {}).get("link") == "connected",
                 timeout=timeout, what="the primary's link to be connected")

    def backing_difference(self) -> list[str]:
        return describe_difference(snapshot(self.primary.backing_fd),
                                   snapshot(self.replica.backing_fd))

    def assert_identical(self):
        """Both backing trees equal, checked independently and by `fusemirror verify`."""
        diff = self.backing_difference()
        assert not diff, "backing trees differ:\n" + "\n".join(diff[:40])
        p = cli("verify", self.primary.dir, check=False, timeout=120)
        assert p.returncode == 0 and "identical" in p.stdout, p.stdout + p.stderr

    def close(self):
        self.primary.close()
        self.replica.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Remember each phase's report on the test, for fixtures that act on a failure."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


@pytest.fixture
def scratch(request):
    base = tempfile.mkdtemp(prefix="fusemirror-test.", dir=SCRATCH_ROOT)
    os.chmod(base, 0o755)
    yield base
    failed = getattr(request.node, "report_call", None)
    if os.environ.get("FUSEMIRROR_KEEP_LOGS"):
        _print_logs(base)
    elif failed is not None and failed.failed:
        # A failure on CI leaves nothing else to look at: the end of every log the
        # test's agents and daemons wrote goes into the test's report.
        _print_logs(base, last=LOG_LINES_ON_FAILURE)
    shutil.rmtree(base, ignore_errors=True)


LOG_LINES_ON_FAILURE = 120


def _print_logs(base: str, last: int | None = None) -> None:
    for dirpath, _, files in os.walk(base):
        for name in sorted(files):
            if name.endswith((".log", ".stderr", ".out")):
                with open(os.path.join(dirpath, name), errors="replace") as f:
                    lines = f.readlines()
                shown = lines if last is None else lines[-last:]
                print(f"--- {os.path.join(dirpath, name)} ({len(shown)} of {len(lines)} lines)")
                print("".join(shown), end="")


@pytest.fixture
def pair(scratch):
    """A started pair for tests where nothing should go wrong: any ERROR or traceback in
    either agent's log fails the test (fault tests use make_pair and assert their own)."""
    p = Pair(scratch)
    try:
        p.start()
        yield p
    finally:
        p.close()
    for node in (p.primary, p.replica):
        bad = [line for line in node.log().splitlines()
               if " ERROR " in line or " CRITICAL " in line or "Traceback" in line]
        assert not bad, f"unexpected errors in the {node.name} agent's log:\n" + "\n".join(bad)


@pytest.fixture
def make_pair(scratch):
    """A factory for pairs with other settings; started by the test."""
    made = []

    def make(policy="block", timeout=5.0):
        p = Pair(scratch, policy, timeout)
        made.append(p)
        return p
    yield make
    for p in made:
        p.close()


@pytest.fixture
def alone(scratch):
    node = Node(scratch, "alone")
    try:
        node.mount("--role", "alone")
        yield node
    finally:
        node.close()


def wait_for(predicate, timeout=10.0, interval=0.05, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")


def as_user(uid: int, gid: int, fn, *args):
    """Run fn(*args) in a child process with the given uid/gid; returns (errno or 0)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
            fn(*args)
        except OSError as e:
            code = e.errno or errno.EIO
        except BaseException:
            code = 255
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
