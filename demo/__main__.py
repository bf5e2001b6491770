"""Run the demo: see the package docstring. Exit status 0 only when every check passed."""

from __future__ import annotations

import argparse
import errno
import hashlib
import importlib.util
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from dataclasses import dataclass

SCRATCH_ROOT = "/var/tmp"
APP = "srv/app"               # the replicated folder, under each node's prefix
HOST = "127.0.0.1"            # the demo never uses another address
SOURCE_PACKAGE = "pip"        # the installed package whose source tree is unpacked
DB = "data/orders.db"
INSERTS = 300
MORE_INSERTS = 25


class DemoFailure(Exception):
    """A check failed, or a command did not do what it should."""


# --- small helpers -----------------------------------------------------------------

class Story:
    """The narrative on stdout, each line stamped with the time since the start."""

    def __init__(self):
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def detail(self, text: str) -> None:
        print(f"          {text}", flush=True)


def fusemirror_command() -> str:
    beside = os.path.join(os.path.dirname(sys.executable), "fusemirror")
    return beside if os.access(beside, os.X_OK) else (shutil.which("fusemirror") or "fusemirror")


FUSEMIRROR = fusemirror_command()


def run(argv: list[str], check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        output = (p.stderr.strip() or p.stdout.strip()).replace("\n", "\n    ")
        raise DemoFailure(f"`{' '.join(argv)}` exited with {p.returncode}:\n    {output}")
    return p


def fm(*args, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess:
    return run([FUSEMIRROR, *map(str, args)], check=check, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def is_mounted(path: str) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


def rate(count: float, seconds: float) -> str:
    return f"{count / seconds:,.0f}" if seconds > 0 else "inf"


def check(condition: bool, what: str) -> None:
    if not condition:
        raise DemoFailure(what)


# --- nodes ---------------------------------------------------------------------------

@dataclass
class Node:
    """One node of the pair: its prefix in the scratch directory, and its mount agent."""
    name: str
    root: str
    role: str = "unmounted"
    pid: int | None = None

    @property
    def app(self) -> str:
        return os.path.join(self.root, APP)

    @property
    def state_dir(self) -> str:
        return os.path.join(self.root, "var/lib/fusemirror")

    @property
    def log_file(self) -> str:
        return os.path.join(self.root, "var/log/fusemirror/srv-app.log")

    def path(self, *parts: str) -> str:
        return os.path.join(self.app, *parts)

    def mount(self, role: str, link_option: str, address: str, secret_file: str) -> None:
        fm("mount", self.app, "--role", role, link_option, address, "--secret-file",
           secret_file, "--state-dir", self.state_dir, "--log-file", self.log_file)
        self.role = role
        self.pid = self.status()["pid"]

    def set_role(self, role: str, link_option: str, address: str) -> None:
        fm("role", self.app, role, link_option, address)
        self.role = role

    def status(self) -> dict:
        return json.loads(fm("status", self.app, "--json").stdout)

    def status_line(self) -> str:
        return fm("status", self.app).stdout.strip().replace("\n", "\n          ")

    def unmount(self) -> None:
        """`fusemirror umount`, and if that fails, a lazy fusermount3 and the agent's PID."""
        if not is_mounted(self.app):
            return
        p = fm("umount", self.app, check=False, timeout=60)
        if p.returncode != 0 and is_mounted(self.app):
            print(f"warning: fusemirror umount {self.app}: {p.stderr.strip()}; "
                  f"falling back to fusermount3 -u -z", file=sys.stderr)
            subprocess.run(["fusermount3", "-u", "-z", self.app], capture_output=True)
            self._stop_agent()
        self.role = "unmounted"

    def _stop_agent(self) -> None:
        if self.pid is None:
            return
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and os.path.exists(f"/proc/{self.pid}"):
            time.sleep(0.1)
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def log_tail(self, lines: int = 15) -> list[str]:
        try:
            with open(self.log_file, errors="replace") as f:
                return f.read().splitlines()[-lines:]
        except FileNotFoundError:
            return ["(no log file)"]


# --- what a tree and a database hold -----------------------------------------------

@dataclass(frozen=True)
class TreeSummary:
    files: int
    dirs: int
    symlinks: int
    size: int
    digest: str       # sha256 over every relative path, type and content, in order

    def __str__(self) -> str:
        return (f"{self.files} files, {self.dirs} directories, {self.symlinks} symlinks, "
                f"{self.size / 2**20:.1f} MiB, sha256 {self.digest[:16]}")


def summarize(top: str) -> TreeSummary:
    counts = {"files": 0, "dirs": 0, "symlinks": 0, "size": 0}
    h = hashlib.sha256()

    def walk(path: str, rel: str) -> None:
        for entry in sorted(os.scandir(path), key=lambda e: e.name):
            name = f"{rel}/{entry.name}"
            if entry.is_symlink():
                counts["symlinks"] += 1
                h.update(f"L {name} {os.readlink(entry.path)}\n".encode())
            elif entry.is_dir():
                counts["dirs"] += 1
                h.update(f"D {name}\n".encode())
                walk(entry.path, name)
            else:
                with open(entry.path, "rb") as f:
                    data = f.read()
                counts["files"] += 1
                counts["size"] += len(data)
                h.update(f"F {name} {hashlib.sha256(data).hexdigest()}\n".encode())

    walk(top, ".")
    return TreeSummary(digest=h.hexdigest(), **counts)


@dataclass(frozen=True)
class DbSummary:
    rows: int
    total_cents: int
    shipped: int
    integrity: str

    def __str__(self) -> str:
        return (f"{self.rows} orders, total {self.total_cents / 100:,.2f}, "
                f"{self.shipped} shipped, integrity_check {self.integrity}")


def open_writable(path: str) -> sqlite3.Connection:
    con = sqlite3.connect(path, isolation_level=None)      # explicit transactions
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA synchronous=FULL")                  # fsync at every commit
    return con


def open_read_only(path: str) -> sqlite3.Connection:
    """A replica's copy: read-only and immutable (no lock, no journal: the mount is EROFS)."""
    return sqlite3.connect(f"file:{urllib.parse.quote(path)}?mode=ro&immutable=1", uri=True)


def summarize_db(con: sqlite3.Connection) -> DbSummary:
    rows, total, shipped = con.execute(
        "SELECT count(*), coalesce(sum(amount_cents), 0), coalesce(sum(status = 'shipped'), 0) "
        "FROM orders").fetchone()
    integrity = con.execute("PRAGMA integrity_check").fetchone()[0]
    return DbSummary(rows, total, shipped, integrity)


def transaction(con: sqlite3.Connection, sql: str, params: tuple) -> int:
    con.execute("BEGIN IMMEDIATE")
    cur = con.execute(sql, params)
    con.execute("COMMIT")
    return cur.rowcount


def insert_orders(con: sqlite3.Connection, count: int, seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(count):
        transaction(con, "INSERT INTO orders (customer, amount_cents, status, created) "
                         "VALUES (?, ?, 'new', ?)",
                    (f"customer-{rng.randrange(1000):03d}", rng.randrange(100, 100_000),
                     time.time()))


def expect_erofs(path: str) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:
        check(e.errno == errno.EROFS, f"creating {path} on the replica failed with "
                                      f"{errno.errorcode.get(e.errno)}, not EROFS")
        return
    os.close(fd)
    raise DemoFailure(f"the replica accepted a new file: {path}")


# --- the demo ------------------------------------------------------------------------

class Demo:
    def __init__(self, scratch: str, story: Story):
        self.scratch = scratch
        self.story = story
        self.alpha = Node("alpha", os.path.join(scratch, "alpha"))
        self.beta = Node("beta", os.path.join(scratch, "beta"))
        self.secret_file = os.path.join(scratch, "secret")
        self.expected_rows = 0
        self.primary_db: DbSummary | None = None

    @property
    def primary(self) -> Node:
        return self.alpha if self.alpha.role == "primary" else self.beta

    @property
    def replica(self) -> Node:
        return self.beta if self.primary is self.alpha else self.alpha

    def run(self) -> None:
        self.story.say(f"fusemirror demo in {self.scratch}")
        self.start_pair()
        source = self.unpack_tree()
        self.run_transactions()
        self.inspect_replica(source)
        self.verify()
        self.switch_roles()
        self.write_on_new_primary()
        self.verify()
        self.story.say("all checks passed")

    def start_pair(self) -> None:
        with open(os.open(self.secret_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600),
                  "w") as f:
            f.write(os.urandom(32).hex())
        for node in (self.alpha, self.beta):
            os.makedirs(node.app)
        address = f"{HOST}:{free_port()}"
        self.beta.mount("replica", "--listen", address, self.secret_file)
        self.story.say(f"beta:/{APP} mounted as the replica, listening on {address} "
                       f"(agent pid {self.beta.pid})")
        self.alpha.mount("primary", "--peer", address, self.secret_file)
        self.story.say(f"alpha:/{APP} mounted as the primary, replicating to {address} "
                       f"(agent pid {self.alpha.pid})")
        self.story.detail(self.alpha.status_line())

    def unpack_tree(self) -> TreeSummary:
        spec = importlib.util.find_spec(SOURCE_PACKAGE)
        check(bool(spec and spec.submodule_search_locations),
              f"the package {SOURCE_PACKAGE} is not installed")
        src = spec.submodule_search_locations[0]
        check(os.path.basename(src) == SOURCE_PACKAGE, f"unexpected location of {src}")
        tarball = os.path.join(self.scratch, f"{SOURCE_PACKAGE}.tar")
        run(["tar", "-C", os.path.dirname(src), "-cf", tarball, os.path.basename(src)])
        source = summarize(src)
        self.story.say(f"workload 1: unpack the source tree of {SOURCE_PACKAGE} with tar "
                       f"into the primary ({source.files} files, {source.size / 2**20:.1f} MiB)")
        os.makedirs(self.alpha.path("src"))
        start = time.monotonic()
        run(["tar", "-C", self.alpha.path("src"), "-xf", tarball], timeout=600)
        took = time.monotonic() - start
        entries = source.files + source.dirs + source.symlinks
        self.story.detail(f"unpacked in {took:.2f}s: {rate(entries, took)} files/s, "
                          f"{source.size / 2**20 / took:.1f} MiB/s (each change was on both "
                          f"nodes before tar got its answer)")
        return source

    def run_transactions(self) -> None:
        self.story.say(f"workload 2: SQLite on the primary, journal_mode=DELETE, "
                       f"synchronous=FULL, {INSERTS} INSERT transactions")
        os.makedirs(self.alpha.path(os.path.dirname(DB)))
        con = open_writable(self.alpha.path(DB))
        try:
            con.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, "
                        "amount_cents INTEGER NOT NULL, status TEXT NOT NULL, created REAL)")
            start = time.monotonic()
            insert_orders(con, INSERTS, seed=1)
            took = time.monotonic() - start
            self.story.detail(f"{INSERTS} commits in {took:.2f}s: "
                              f"{rate(INSERTS, took)} transactions/s")
            self.expected_rows = INSERTS - self.update_and_delete(con)
            mine = summarize_db(con)
        finally:
            con.close()
        self.story.detail(f"primary's database: {mine}")
        check(mine.rows == self.expected_rows,
              f"the primary holds {mine.rows} orders, expected {self.expected_rows}")
        self.primary_db = mine

    def update_and_delete(self, con: sqlite3.Connection) -> int:
        """Ten UPDATE and three DELETE transactions; returns how many rows were deleted."""
        for order in range(10, 110, 10):
            transaction(con, "UPDATE orders SET status = 'shipped' WHERE id = ?", (order,))
        deleted = sum(transaction(con, "DELETE FROM orders WHERE id BETWEEN ? AND ?",
                                  (first, first + 4)) for first in (51, 151, 251))
        self.story.detail(f"then 10 UPDATE and 3 DELETE transactions ({deleted} rows deleted)")
        return deleted

    def inspect_replica(self, source: TreeSummary) -> None:
        r = self.replica
        self.story.say(f"on {r.name}, the replica, through its read-only mount:")
        copy = summarize(r.path("src", SOURCE_PACKAGE))
        self.story.detail(f"source tree: {copy}")
        check(copy == source, f"the replica's tree differs from the original:\n"
                              f"    original: {source}\n    replica:  {copy}")
        self.story.detail("identical to the original tree installed on this machine")
        con = open_read_only(r.path(DB))
        try:
            theirs = summarize_db(con)
        finally:
            con.close()
        self.story.detail(f"database: {theirs}")
        check(theirs == self.primary_db, f"the replica's database differs: {theirs}")
        expect_erofs(r.path("written-on-the-replica"))
        self.story.detail("creating a file there fails with EROFS, as it should")

    def verify(self) -> None:
        p = self.primary
        start = time.monotonic()
        out = fm("verify", p.app, check=False, timeout=600)
        took = time.monotonic() - start
        lines = out.stdout.strip().splitlines()
        check(out.returncode == 0 and lines[-1:] == ["identical"],
              f"fusemirror verify {p.app} exited with {out.returncode}:\n    "
              + "\n    ".join(lines[:30] + out.stderr.strip().splitlines()))
        self.story.say(f"fusemirror verify on {p.name} (the primary): identical ({took:.2f}s)")

    def switch_roles(self) -> None:
        old_primary, old_replica = self.primary, self.replica
        address = f"{HOST}:{free_port()}"
        self.story.say(f"role switch: {old_primary.name} becomes the replica, "
                       f"{old_replica.name} the primary, without unmounting")
        start = time.monotonic()
        old_primary.set_role("replica", "--listen", address)
        self.story.detail(f"{old_primary.name}: replica, listening on {address}")
        old_replica.set_role("primary", "--peer", address)
        took = time.monotonic() - start
        self.story.detail(f"{old_replica.name}: primary, replicating to {address} "
                          f"(switch took {took:.2f}s)")
        self.story.detail(old_replica.status_line())

    def write_on_new_primary(self) -> None:
        p, r = self.primary, self.replica
        self.story.say(f"{MORE_INSERTS} more INSERT transactions on {p.name}, the new primary")
        con = open_writable(p.path(DB))
        try:
            start = time.monotonic()
            insert_orders(con, MORE_INSERTS, seed=2)
            took = time.monotonic() - start
            mine = summarize_db(con)
        finally:
            con.close()
        self.expected_rows += MORE_INSERTS
        self.story.detail(f"{rate(MORE_INSERTS, took)} transactions/s; {p.name}: {mine}")
        check(mine.rows == self.expected_rows,
              f"{p.name} holds {mine.rows} orders, expected {self.expected_rows}")
        con = open_read_only(r.path(DB))
        try:
            theirs = summarize_db(con)
        finally:
            con.close()
        self.story.detail(f"{r.name}, now the replica, reads: {theirs}")
        check(theirs == mine, f"{r.name}'s database differs from {p.name}'s")
        expect_erofs(r.path("written-on-the-replica"))
        self.story.detail(f"{r.name} refuses changes (EROFS) now that it is the replica")

    def teardown(self) -> list[str]:
        """Unmount the primary first (it drains its replication), then the replica.
        Returns the folders still mounted (nothing may be removed under them)."""
        for node in (self.primary, self.replica):
            try:
                node.unmount()
            except Exception as e:           # keep going: the other one must go too
                print(f"warning: cannot unmount {node.app}: {e}", file=sys.stderr)
        return [n.app for n in (self.alpha, self.beta) if is_mounted(n.app)]

    def show_logs(self) -> None:
        for node in (self.alpha, self.beta):
            print(f"--- last lines of {node.log_file}", file=sys.stderr)
            for line in node.log_tail():
                print(f"    {line}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="demo", description=__doc__)
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (agent logs, state) when a check fails")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (it mounts filesystems)", file=sys.stderr)
        return 2
    scratch = tempfile.mkdtemp(prefix="fusemirror-demo.", dir=SCRATCH_ROOT)
    os.chmod(scratch, 0o755)
    demo = Demo(scratch, Story())
    ok = False
    try:
        demo.run()
        ok = True
    except DemoFailure as e:
        print(f"\nDEMO FAILED: {e}", file=sys.stderr)
    except (Exception, KeyboardInterrupt):
        print("\nDEMO FAILED with an unexpected error:", file=sys.stderr)
        traceback.print_exc()
    finally:
        if not ok:
            demo.show_logs()
        still_mounted = demo.teardown()
        if still_mounted:
            print(f"still mounted, so {scratch} is kept: {', '.join(still_mounted)}",
                  file=sys.stderr)
        elif ok or not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"scratch directory kept: {scratch}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
