"""Run the demo (the story is in the package docstring).

A two-node fusemirror cluster in network namespaces on this machine: a replicated source
tree checked with `fusemirror verify`, a client writing records through the virtual IP
while the primary is killed -9, the survivor taking over with no acknowledged record
lost, and the killed node coming back. Run as root. Exit status 0 only when every check
passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import errno
import hashlib
import importlib.util
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.parse
from dataclasses import dataclass

from fusemirror import control
from fusemirror.lab.cluster import Cluster, ClusterError
from fusemirror.lab.netns import NETNS_DIR, LabError

from . import client as C

SCRATCH_ROOT = "/var/tmp"
SOURCE_PACKAGE = "pip"        # the installed package whose source tree is unpacked
CLIENT_SECONDS = 15           # how long the client writes records
KILL_AFTER = 4.0              # seconds of client traffic before alpha is killed
PROGRESS_EVERY = 2.0          # seconds between the client's progress lines
MAX_OUTAGE = 10.0             # seconds without service still counted as a good failover
VERIFY_TIMEOUT = 300.0

ERRORS = (ClusterError, LabError, control.ControlError, subprocess.SubprocessError, OSError,
          sqlite3.Error)      # what a step may fail with, reported with the step's name


class DemoFailure(Exception):
    """A check failed; the message names it."""


# --- small helpers -----------------------------------------------------------------

class Story:
    """The narrative on stdout, each line stamped with the time since the start."""

    def __init__(self):
        self.t0 = time.monotonic()

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:6.1f}s] {text}", flush=True)

    def detail(self, text: str) -> None:
        for line in text.splitlines():
            print(f"          {line}", flush=True)


def run(argv: list[str], timeout: float = 300) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise DemoFailure(f"`{' '.join(argv)}` exited with {p.returncode}: "
                          f"{p.stderr.strip() or p.stdout.strip()}")


def short(error: BaseException) -> str:
    """An error in one line: the first and the last line of its message."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if len(lines) <= 2:
        return " ".join(lines) or type(error).__name__
    return f"{lines[0]} ... {lines[-1]}"


def alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def mounts_under(top: str) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if p == top or p.startswith(top + "/")]


@dataclass(frozen=True)
class TreeSummary:
    files: int
    dirs: int
    symlinks: int
    size: int
    digest: str       # sha256 over every relative path, type and content, in order

    def __str__(self) -> str:
        return (f"{self.files} files, {self.dirs} directories, {self.size / 2**20:.1f} MiB, "
                f"sha256 {self.digest[:16]}")


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


def creating_fails_with_erofs(path: str) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    except OSError as e:
        return e.errno == errno.EROFS
    os.close(fd)
    return False


# --- the demo ------------------------------------------------------------------------

class Demo:
    """The story, step by step, on a running Cluster; every check raises DemoFailure."""

    def __init__(self, cluster: Cluster, story: Story):
        self.c = cluster
        self.story = story
        self.step = "starting"
        self.checks = 0
        self.client_log = ""
        self.killed_at = self.took_over_at = 0.0

    def run(self) -> None:
        self.start_cluster()
        self.replicate_a_tree()
        self.fail_over()
        self.count_what_was_kept()
        self.bring_alpha_back()

    # -- helpers ---------------------------------------------------------------------------

    def check(self, ok: bool, name: str, detail: str = "") -> None:
        if not ok:
            raise DemoFailure(name + (f": {detail}" if detail else ""))
        self.checks += 1

    def wait_state(self, node: str, state: str, readiness: str | None = "Ready",
                   timeout: float = 30) -> dict:
        try:
            return self.c.wait_state(node, state, readiness=readiness, timeout=timeout)
        except ClusterError as e:
            raise DemoFailure(f"{node} becomes {state} {readiness or ''}".rstrip()
                              + f": {short(e)}") from None

    def wait_view(self, node: str, peer_state: str, timeout: float = 10) -> None:
        """Until the node has heard that its peer is in peer_state (for `fusemirror state`)."""
        deadline = time.monotonic() + timeout
        while (self.c.state(node)["peer"]["state"] != peer_state
               and time.monotonic() < deadline):
            time.sleep(0.1)

    def show_state(self, node: str) -> None:
        out = self.c.command(node, "state", check=False).stdout.rstrip()
        self.story.detail(f"$ fusemirror state      (on {node})\n{out}")

    def vip_holders(self) -> str:
        holders = [n for n in ("alpha", "beta") if self.c.has_vip(n)]
        return " and ".join(holders) or "no node"

    # -- 1. the cluster --------------------------------------------------------------------

    def start_cluster(self) -> None:
        self.step = "starting the cluster"
        c, say = self.c, self.story.say
        say(f"two nodes in network namespaces: alpha {c.lab.address('alpha')}, beta "
            f"{c.lab.address('beta')}; a client {c.lab.address('client')}; the VIP {c.vip}")
        self.story.detail(f"replicated folder /srv/app: {c.folder('alpha')} and "
                          f"{c.folder('beta')}\nsample application: demo/app.py, an HTTP "
                          f"service storing records in /srv/app/records.db (SQLite), run on "
                          f"the primary only, reached at {c.url}")
        started = time.monotonic()
        daemons = [c.start(node).pid for node in ("alpha", "beta")]
        say(f"`fusemirror daemon` started on alpha (pid {daemons[0]}) and beta "
            f"(pid {daemons[1]})")
        self.wait_state("alpha", "PRIM", timeout=40)
        self.wait_state("beta", "SECOND", timeout=30)
        say(f"after {time.monotonic() - started:.1f}s: alpha is PRIM, beta SECOND, the "
            f"application runs on alpha (pid {c.app_pid('alpha')})")
        self.show_state("alpha")
        holders = self.vip_holders()
        self.check(holders == "alpha", "the VIP is on alpha only", f"it is on {holders}")
        self.story.detail(f"the VIP {c.vip} is on alpha")

    # -- 2. a real workload on the replicated folder ----------------------------------------

    def replicate_a_tree(self) -> None:
        self.step = "replicating a source tree"
        c, say = self.c, self.story.say
        spec = importlib.util.find_spec(SOURCE_PACKAGE)
        self.check(bool(spec and spec.submodule_search_locations),
                   f"the package {SOURCE_PACKAGE} is installed")
        src = spec.submodule_search_locations[0]
        tarball = os.path.join(c.scratch, f"{SOURCE_PACKAGE}.tar")
        run(["tar", "-C", os.path.dirname(src), "-cf", tarball, os.path.basename(src)])
        source = summarize(src)
        into = os.path.join(c.folder("alpha"), "src")
        os.makedirs(into)
        started = time.monotonic()
        run(["tar", "-C", into, "-xf", tarball])
        took = time.monotonic() - started
        say(f"workload: the source tree of {SOURCE_PACKAGE} ({source.files} files, "
            f"{source.size / 2**20:.1f} MiB) unpacked with tar into alpha's /srv/app/src "
            f"in {took:.1f}s")
        self.story.detail("each change was on both nodes before tar got its answer")

        started = time.monotonic()
        answer = control.request(os.path.realpath(c.folder("alpha")), {"cmd": "verify"},
                                 timeout=VERIFY_TIMEOUT, run_dir=c.run_dir)
        diffs = answer["differences"]
        self.check(not diffs, "fusemirror verify: both copies identical",
                   f"{len(diffs)} difference(s):\n    " + "\n    ".join(diffs[:20]))
        say(f"`fusemirror verify` on alpha: identical ({time.monotonic() - started:.2f}s: "
            f"paths, types, modes, owners, sizes, times and content hashes of both copies)")
        copy = summarize(os.path.join(c.folder("beta"), "src", os.path.basename(src)))
        self.check(copy == source, "beta's copy of the tree is the original",
                   f"original: {source}; beta: {copy}")
        self.story.detail(f"beta's copy: {copy}, the same as the original")
        self.check(creating_fails_with_erofs(os.path.join(c.folder("beta"), "written-on-beta")),
                   "beta's copy is read-only (EROFS)")
        self.story.detail("creating a file in beta's copy fails with EROFS: only the primary "
                          "writes")

    # -- 3. kill -9 of the primary under load ------------------------------------------------

    def fail_over(self) -> None:
        self.step = "failing over"
        c, say = self.c, self.story.say
        writer, self.client_log = c.client(duration=CLIENT_SECONDS)
        say(f"the client writes records to {c.url} for {CLIENT_SECONDS}s from its own "
            f"namespace: one POST after the other, each committed before its 201")
        self.follow_client(writer, time.monotonic() + KILL_AFTER)
        self.check(writer.poll() is None, "the client runs until alpha is killed",
                   f"it exited with {writer.returncode}")

        pids = c.kill("alpha")
        self.killed_at = time.monotonic()
        self.check(len(pids) == 2, "alpha's daemon and mount agent are killed",
                   f"only found pids {pids}")
        say(f"kill -9 of every fusemirror process of alpha: its daemon (pid {pids[0]}) and "
            f"its mount agent (pid {pids[1]})")
        me = self.wait_state("beta", "ALONE", timeout=20)
        self.took_over_at = time.monotonic()
        say(f"beta took over {self.took_over_at - self.killed_at:.1f}s after the kill: "
            f"ALONE, {me['reason']}")
        self.check(c.has_vip("beta"), "the VIP moved to beta")
        self.story.detail(f"the VIP {c.vip} is on beta, which runs the application "
                          f"(pid {c.app_pid('beta')}) on its copy")
        app = c.app_pid("alpha")
        left = ((["the address"] if c.has_vip("alpha") else [])
                + ([f"its old application (pid {app})"] if app and alive(app) else []))
        if left:
            self.story.detail(f"alpha's namespace still holds {' and '.join(left)}: only the "
                              f"daemons were killed, not the machine;\nalpha's folder is a "
                              f"dead mount now, so nothing there can commit a record")
        self.show_state("beta")

        self.follow_client(writer, time.monotonic() + CLIENT_SECONDS + 30, must_end=True)
        self.check(writer.returncode == 0, "the client ran to its end",
                   f"it exited with {writer.returncode}")

    def follow_client(self, writer: subprocess.Popen, until: float,
                      must_end: bool = False) -> None:
        """A progress line every PROGRESS_EVERY s until `until` or the client's end."""
        while True:
            try:
                writer.wait(timeout=max(0.0, min(PROGRESS_EVERY, until - time.monotonic())))
            except subprocess.TimeoutExpired:
                pass
            done = writer.poll() is not None
            if os.path.exists(self.client_log):
                entries = C.read_log(self.client_log)
                acked = len(C.acknowledged(entries))
                self.story.say(f"client{' finished' if done else ''}: {acked} records "
                               f"acknowledged, {len(entries) - acked} requests failed")
            if done:
                return
            if time.monotonic() >= until:
                self.check(not must_end, "the client ends in time",
                           f"still running after {CLIENT_SECONDS}s and more")
                return

    # -- 4. what the client saw, and what the survivor holds ------------------------------------

    def count_what_was_kept(self) -> None:
        self.step = "counting the records"
        c, say = self.c, self.story.say
        entries = C.read_log(self.client_log)
        acked = {e["id"] for e in C.acknowledged(entries)}
        failed = [e for e in entries if "id" not in e]
        after = [e for e in C.acknowledged(entries) if e["sent"] >= self.took_over_at]
        held = c.records()
        lost = acked - held
        say(f"the client sent {len(entries)} requests: {len(acked)} acknowledged "
            f"({len(after)} after beta took over), {len(failed)} failed"
            + (", by reason:" if failed else ""))
        reasons = collections.Counter(e["error"] for e in failed)
        for reason, n in reasons.most_common(4):
            self.story.detail(f"{n:4} x {reason}")
        self.check(bool(after), "the client carried on against beta")
        say(f"acknowledged records lost: {len(lost)} (the application now holds "
            f"{len(held)} records)")
        self.check(not lost, "no acknowledged record lost",
                   f"{len(lost)} missing, e.g. {sorted(lost)[:10]}")
        extra = len(held - acked)
        if extra:
            self.story.detail(f"{extra} more than acknowledged: committed, but the answer "
                              f"never reached the client")

        periods = C.outages(entries, include_open=True)
        longest = C.longest_outage(entries, include_open=True)
        say(f"time without service, measured by the client: {longest:.2f}s "
            f"(from its first failed request to the next acknowledged one)")
        self.check(longest < MAX_OUTAGE, f"the time without service stays under "
                   f"{MAX_OUTAGE:g}s", f"{longest:.2f}s, periods {periods}")

        db = os.path.join(c.folder("beta"), "records.db")
        con = sqlite3.connect(f"file:{urllib.parse.quote(db)}?mode=ro", uri=True, timeout=5)
        try:
            integrity = [row[0] for row in con.execute("PRAGMA integrity_check")]
            count = con.execute("SELECT count(*) FROM records").fetchone()[0]
        finally:
            con.close()
        say(f"beta's records.db, opened read-only: {count} records, PRAGMA integrity_check: "
            f"{'; '.join(integrity[:3])}")
        self.check(integrity == ["ok"], "records.db passes integrity_check")
        self.check(count == len(held), "records.db holds what the application answers",
                   f"{count} rows, {len(held)} records through the VIP")

    # -- 5. alpha comes back -----------------------------------------------------------------

    def bring_alpha_back(self) -> None:
        self.step = "restarting alpha"
        c, say = self.c, self.story.say
        started = time.monotonic()
        c.start("alpha")
        me = self.wait_state("alpha", "SECOND", readiness="Ready", timeout=60)
        self.wait_state("beta", "PRIM", timeout=20)
        self.wait_view("alpha", "PRIM")
        say(f"alpha's daemon started again: {time.monotonic() - started:.1f}s later it is "
            f"SECOND Ready, beta PRIM: beta resynchronised alpha's copy online, sending only "
            f"the blocks that differ")
        self.show_state("beta")
        self.check(me["uptodate"] and me["epoch"] == self.c.state("beta")["me"]["epoch"],
                   "alpha's copy is up to date again, at beta's epoch", me["reason"])
        rs = c.state("beta")["replication"]["resync"] or {}
        self.check(rs.get("state") == "done", "beta's resynchronisation of alpha is done",
                   str(rs))
        say(f"the resynchronisation compared {rs.get('bytes_done', 0) / 2**20:.1f} MiB and sent "
            f"{rs.get('bytes_sent', 0) / 1024:.0f} KiB "
            + ("(in full: alpha died as a primary, so what it may have applied without "
               "beta's acknowledgement is compared too)" if rs.get("full")
               else "(only what beta's journal recorded)"))
        answer = control.request(os.path.realpath(c.folder("beta")), {"cmd": "verify"},
                                 timeout=VERIFY_TIMEOUT, run_dir=c.run_dir)
        diffs = answer["differences"]
        self.check(not diffs, "fusemirror verify on beta: both copies identical again",
                   f"{len(diffs)} difference(s):\n    " + "\n    ".join(diffs[:20]))
        holders = self.vip_holders()
        self.check(holders == "beta", "the VIP is on beta only", f"it is on {holders}")
        self.check(c.app_pid("alpha") is None, "alpha's old application is stopped")
        self.story.detail("alpha cleaned up on its way back: the VIP and its old application "
                          "are gone; it can take over again if beta fails")


# --- running it ----------------------------------------------------------------------

def leftovers(c: Cluster, scratch: str) -> list[str]:
    """What the clean-up left: namespaces, mounts, processes."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        names = []
    left = [f"namespace {n}" for n in names if n.startswith(c.lab.prefix + "-")]
    left += [f"mount {m}" for m in mounts_under(scratch)]
    left += [f"process {pid}" for pid in sorted(c.pids) if alive(pid)]
    return left


def ignore_interrupts() -> None:
    """Clean-up must not be cut short by a second Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def show_logs(c: Cluster) -> None:
    """The end of each daemon's log, and what the daemons wrote on stderr, if anything."""
    for node in ("alpha", "beta"):
        print(f"--- last lines of {c.daemon_log(node)}", file=sys.stderr)
        for line in c.tail(node, 15).splitlines():
            print(f"    {line}", file=sys.stderr)
    for name in sorted(os.listdir(c.log_dir)):
        path = os.path.join(c.log_dir, name)
        if name.endswith(".stderr") and os.path.getsize(path):
            with open(path, errors="replace") as f:
                lines = f.read().splitlines()[-10:]
            print(f"--- last lines of {path}", file=sys.stderr)
            for line in lines:
                print(f"    {line}", file=sys.stderr)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    parser.add_argument("--keep", action="store_true",
                        help="keep the scratch directory (logs, state) when a check fails")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("demo: run as root (it creates network namespaces and mounts filesystems)",
              file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    story = Story()
    scratch = tempfile.mkdtemp(prefix="fusemirror-demo.", dir=SCRATCH_ROOT)
    os.chmod(scratch, 0o755)
    story.say(f"fusemirror demo: a two-node cluster on this machine, scratch in {scratch}")
    failure = None
    cluster = Cluster(scratch)
    try:
        with cluster as c:
            demo = Demo(c, story)
            try:
                demo.run()
            except DemoFailure as e:
                failure = f"check failed: {e}"
            except ERRORS as e:
                failure = f"{demo.step}: {short(e)}"
            except KeyboardInterrupt:
                failure = f"interrupted while {demo.step}"
            except Exception:
                failure = f"unexpected error while {demo.step}"
                traceback.print_exc()
            finally:
                ignore_interrupts()
                if failure and not failure.startswith("interrupted"):
                    show_logs(c)
                story.say("clean-up: daemons stopped, applications and client killed, "
                          "namespaces deleted")
    except KeyboardInterrupt:
        failure = failure or "interrupted while building the namespaces"
    except ERRORS as e:
        failure = failure or f"clean-up: {short(e)}"
    finally:
        ignore_interrupts()
    left = leftovers(cluster, scratch)
    if left:
        failure = failure or f"clean-up left {', '.join(left)}"
        print(f"clean-up left {', '.join(left)}", file=sys.stderr)
    if mounts_under(scratch):
        print(f"still mounted, so {scratch} is kept", file=sys.stderr)
    elif failure and args.keep:
        print(f"scratch directory kept: {scratch}", file=sys.stderr)
    else:
        shutil.rmtree(scratch, ignore_errors=True)
    if failure:
        print(f"\nDEMO FAILED: {failure}", file=sys.stderr)
        return 1
    story.say(f"all {demo.checks} checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
