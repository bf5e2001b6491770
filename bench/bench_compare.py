"""fusemirror side by side with GlusterFS replica 2, on this machine, in one run.

Targets, all set up once per run and measured in turn:

- ``local``   a plain directory on the scratch file system;
- ``alone``   one mount agent with ``--role alone`` (FUSE and Python, no replication);
- ``pair``    a primary replicating over 127.0.0.1 to a replica (bench_mount's pair);
- ``gluster`` GlusterFS replica 2 from Debian: a private ``glusterd -N`` started by the bench
  (its own working directory, bound to 127.0.0.1), two bricks under the scratch directory,
  mounted with the glusterfs FUSE client;
- ``pair+0ms``, ``pair+1ms``, ``pair+5ms`` a second pair whose primary reaches its replica
  through a delay proxy in this process, adding that round trip (half each way).

Workloads (``--quick`` sizes in brackets), each figure the median over the rounds with min
and max, the order of the targets rotated between rounds:

1. sequential write 512 MiB, 1 MiB blocks, fsync at the end (fio) -> MiB/s, and the CPU
   seconds per GiB of the processes doing the replication (agents; gluster client + bricks);
2. 4 KiB random writes each followed by fsync (fio, 10 s [5 s]) -> IOPS, fsync p50/p99;
3. sequential read of the file from 1, cold cache (fio) -> MiB/s;
4. create then delete 5,000 [2,000] files of 4 KiB -> files/s each;
5. ``find -printf`` (a stat of every entry) over a tree of 50,000 [10,000] empty files made
   once per target before the rounds, cold (caches dropped) then warm -> s;
6. unpacking a tarball of source packages from the venv's site-packages, then deleting it -> s;
7. dbench, 10 clients, 60 s [15 s] -> MB/s;
8. workloads 1 and 2 through the delay proxy (0, 1 and 5 ms round trip). GlusterFS is not
   measured with latency: both bricks are on one host, and netem on lo cannot be confined to
   their traffic.

Run as root from the repository root::

    .venv/bin/python -m bench.bench_compare [--rounds N] [--quick] [--json FILE]

The bench installs glusterfs-server, glusterfs-client and dbench with apt-get if they are
missing. Every command runs in its own process group with a time limit; everything started
is stopped by PID (glusterd is our child), the volume is stopped and deleted, every mount is
undone and the scratch directory removed in ``finally`` blocks, on failure and ^C too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import queue
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

from bench import bench_mount as bm
from bench.bench_mount import Agent, BenchError, run

log = logging.getLogger(__name__)

LOOPBACK = bm.LOOPBACK
DELAYS_MS = (0, 1, 5)
MAIN_TARGETS = ("local", "alone", "pair", "gluster")
DELAY_TARGETS = tuple(f"pair+{d}ms" for d in DELAYS_MS)
SOURCE_PACKAGES = ("pip", "setuptools", "pygments", "trio")
DBENCH_LOADFILE = Path("/usr/share/dbench/client.txt")
PACKAGES = {"glusterd": "glusterfs-server", "gluster": "glusterfs-server",
            "mount.glusterfs": "glusterfs-client", "dbench": "dbench", "fio": "fio"}
GLUSTERD_PORT = 24007
GLUSTERD_SOCKET = "/var/run/glusterd.socket"
GLUSTER_OWNED_PREFIXES = ("/var/run/gluster/", "/run/gluster/", "/var/log/glusterfs/")
TREE_THREADS = 8

APT_TIMEOUT_S = 900
GLUSTER_CLI_TIMEOUT_S = 120
GLUSTERD_START_TIMEOUT_S = 30
GLUSTER_CONNECT_TIMEOUT_S = 30
GLUSTERD_STOP_TIMEOUT_S = 15
MOUNT_TIMEOUT_S = 60
TREE_TIMEOUT_S = 1800
FIND_TIMEOUT_S = 600
TREE_OP_TIMEOUT_S = 900
SYSTEM_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class Sizes:
    seq_mib: int
    rand_mib: int
    rand_seconds: int
    files: int
    tree_files: int
    dbench_seconds: int
    dbench_clients: int = 10

    def fio(self) -> bm.Sizes:
        return bm.Sizes(seq_mib=self.seq_mib, rand_mib=self.rand_mib,
                        rand_seconds=self.rand_seconds, files=self.files)


FULL_SIZES = Sizes(seq_mib=512, rand_mib=64, rand_seconds=10, files=5000, tree_files=50000,
                   dbench_seconds=60)
QUICK_SIZES = Sizes(seq_mib=512, rand_mib=64, rand_seconds=5, files=2000, tree_files=10000,
                    dbench_seconds=15)


@dataclasses.dataclass(frozen=True)
class Goal:
    label: str
    metric: str
    kind: str        # "more": pair/gluster >= limit; "less": pair/gluster <= limit;
    limit: float     # "faster": gluster/pair (times) >= limit


GOALS = (
    Goal("sequential write", "seq_write_mibs", "more", 1.5),
    Goal("sequential read, cold cache", "seq_read_mibs", "more", 1.3),
    Goal("fsync'd 4 KiB writes (IOPS)", "rand_iops", "more", 2.0),
    Goal("fsync latency p99", "fsync_p99_us", "less", 0.5),
    Goal("file creates", "create_per_s", "more", 3.0),
    Goal("file deletes", "delete_per_s", "more", 3.0),
    Goal("find + stat, cold", "find_cold_s", "faster", 5.0),
    Goal("find + stat, warm", "find_warm_s", "faster", 5.0),
    Goal("unpack a source tree", "unpack_s", "faster", 3.0),
    Goal("dbench", "dbench_mbs", "more", 2.0),
)
KEEP_LIMIT = 0.5
RSS_LIMIT_MIB = bm.RSS_LIMIT_MIB


# --- the delay proxy ----------------------------------------------------------------------

class DelayProxy:
    """A TCP proxy on loopback that delays every chunk by half the round trip each way.

    One thread per direction reads and time-stamps chunks, another sends each one when it is
    due, so the delay is latency only: it does not cap throughput the way a sleep between
    reads and writes would. The round trip can be changed between workloads.
    """

    QUEUE_CHUNKS = 256

    def __init__(self) -> None:
        self.one_way_s = 0.0
        self._closed = threading.Event()
        self._target: tuple[str, int] | None = None
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind((LOOPBACK, 0))
        self._listener.listen(4)
        self._listener.settimeout(0.2)

    def set_rtt_ms(self, ms: float) -> None:
        self.one_way_s = ms / 2000

    def route(self, address: str) -> str:
        """Forward to `address` (the replica's); return the address to give the primary."""
        host, port = address.rsplit(":", 1)
        self._target = (host, int(port))
        self._spawn(self._accept)
        return f"{LOOPBACK}:{self._listener.getsockname()[1]}"

    def _spawn(self, fn: Callable, *args) -> None:
        t = threading.Thread(target=fn, args=args, name="delay-proxy", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            try:
                server = socket.create_connection(self._target, timeout=5)
            except OSError as e:
                log.warning("delay proxy: cannot reach %s: %s", self._target, e)
                client.close()
                continue
            for s in (client, server):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._socks += [client, server]
            for src, dst in ((client, server), (server, client)):
                chunks: queue.Queue = queue.Queue(self.QUEUE_CHUNKS)
                self._spawn(self._read, src, chunks)
                self._spawn(self._send, src, dst, chunks)

    def _read(self, src: socket.socket, chunks: queue.Queue) -> None:
        try:
            while data := src.recv(1 << 20):
                self._put(chunks, (time.monotonic() + self.one_way_s, data))
        except OSError:
            pass
        finally:
            self._put(chunks, None)

    def _put(self, chunks: queue.Queue, item) -> None:
        while not self._closed.is_set():
            with contextlib.suppress(queue.Full):
                chunks.put(item, timeout=0.2)
                return

    def _send(self, src: socket.socket, dst: socket.socket, chunks: queue.Queue) -> None:
        try:
            while not self._closed.is_set():
                try:
                    item = chunks.get(timeout=0.2)
                except queue.Empty:
                    continue
                if item is None:
                    dst.shutdown(socket.SHUT_WR)
                    return
                due, data = item
                if (wait := due - time.monotonic()) > 0:
                    time.sleep(wait)
                dst.sendall(data)
        except OSError:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._closed.set()
        with contextlib.suppress(OSError):
            self._listener.close()
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
        for t in self._threads:
            t.join(timeout=2)
        for s in socks:
            s.close()


# --- GlusterFS ------------------------------------------------------------------------------

def gluster(*args: str, timeout: float = GLUSTER_CLI_TIMEOUT_S) -> str:
    return run(["gluster", "--mode=script", *args], timeout=timeout)


def loopback_host_name() -> str:
    """A host name resolving to 127.0.0.1 only (the gluster CLI refuses the address itself)."""
    for name in (socket.gethostname(), "localhost"):
        try:
            addrs = {ai[4][0] for ai in socket.getaddrinfo(name, None, socket.AF_INET)}
        except OSError:
            continue
        if addrs == {LOOPBACK}:
            return name
    raise BenchError("no host name resolves to 127.0.0.1 only (add one to /etc/hosts)")


def refuse_running_glusterd() -> None:
    """This bench starts and stops its own glusterd; it never touches one it did not start."""
    with contextlib.suppress(OSError), socket.create_connection((LOOPBACK, GLUSTERD_PORT), 1):
        raise BenchError(f"a glusterd already listens on port {GLUSTERD_PORT}; "
                         "stop it first (this bench starts its own)")
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
        s.settimeout(1)
        s.connect(GLUSTERD_SOCKET)
        raise BenchError(f"a glusterd already answers on {GLUSTERD_SOCKET}; stop it first")


def glusterd_volfile(state_dir: Path) -> str:
    """glusterd's own configuration: a private working directory, listening on loopback."""
    return "\n".join([
        "volume management",
        "    type mgmt/glusterd",
        f"    option working-directory {state_dir}",
        "    option transport-type socket",
        f"    option transport.socket.bind-address {LOOPBACK}",
        f"    option transport.socket.listen-port {GLUSTERD_PORT}",
        "    option ping-timeout 0",
        "    option event-threads 1",
        "    option max-port 60999",
        "end-volume", ""])


def start_glusterd(home: Path) -> subprocess.Popen:
    state = home / "glusterd-state"
    state.mkdir()
    volfile = home / "glusterd.vol"
    volfile.write_text(glusterd_volfile(state))
    with open(home / "glusterd.out", "wb") as out:
        proc = subprocess.Popen(
            ["glusterd", "-N", "-f", str(volfile), "-l", str(home / "glusterd.log"),
             "-p", str(home / "glusterd.pid")],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)
    log.info("glusterd started, pid %d", proc.pid)
    return proc


def wait_glusterd(proc: subprocess.Popen, home: Path) -> None:
    deadline = time.monotonic() + GLUSTERD_START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise BenchError(f"glusterd exited with code {proc.returncode}: "
                             f"{tail(home / 'glusterd.log')}")
        try:
            gluster("pool", "list", timeout=10)
            return
        except BenchError as e:
            if time.monotonic() > deadline:
                raise BenchError(f"glusterd not answering after "
                                 f"{GLUSTERD_START_TIMEOUT_S} s: {e}") from None
        time.sleep(0.3)


def stop_glusterd(proc: subprocess.Popen) -> None:
    """SIGTERM our glusterd (our child: its PID cannot have been reused), then SIGKILL."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(GLUSTERD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.warning("glusterd pid %d ignored SIGTERM, sending SIGKILL", proc.pid)
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(bm.AGENT_KILL_TIMEOUT_S)
    log.info("glusterd pid %d stopped", proc.pid)


def tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def option_values(args: list[str], *options: str) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args[:-1]) if a in options]


def volume_daemons(vol: str, home: Path) -> dict[str, Agent]:
    """{label: Agent} of the volume's bricks (brick1, brick2) and self-heal daemon."""
    out = gluster("volume", "status", vol, "--xml")
    try:
        nodes = list(ET.fromstring(out[out.index("<"):]).iter("node"))
    except (ValueError, ET.ParseError):
        raise BenchError(f"gluster volume status: unreadable XML: {out[:200]!r}") from None
    daemons: dict[str, Agent] = {}
    for node in nodes:
        path, pid = node.findtext("path") or "", int(node.findtext("pid") or -1)
        if path.startswith(str(home)):
            label = Path(path).name
        elif node.findtext("hostname") == "Self-heal Daemon":
            label = "self-heal"
        else:
            continue
        if pid <= 0 or node.findtext("status") != "1":
            raise BenchError(f"gluster {label} of {vol} is not online")
        daemons[label] = Agent.from_pid(label, pid)
    if not {"brick1", "brick2"} <= set(daemons):
        raise BenchError(f"gluster volume status lists no two bricks: {sorted(daemons)}")
    return daemons


def fuse_client(mnt: Path) -> Agent | None:
    """The glusterfs FUSE client serving `mnt` (its command line ends with our mount point)."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            args = [a for a in cmdline(int(entry.name)) if a]
            if args and Path(args[0]).name == "glusterfs" and args[-1] == str(mnt):
                return Agent.from_pid("client", int(entry.name))
    return None


def wait_client_connected(vol: str, home: Path) -> None:
    """Wait until each brick lists a client besides the self-heal daemon (the FUSE client)."""
    deadline = time.monotonic() + GLUSTER_CONNECT_TIMEOUT_S
    while True:
        out = gluster("volume", "status", vol, "clients", "--xml")
        counts = {}
        with contextlib.suppress(ValueError, ET.ParseError):
            for node in ET.fromstring(out[out.index("<"):]).iter("node"):
                if (node.findtext("path") or "").startswith(str(home)):
                    counts[node.findtext("path")] = int(node.findtext("clientsStatus/"
                                                                      "clientCount") or 0)
        if len(counts) == 2 and min(counts.values()) >= 2:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"the FUSE client did not connect to both bricks: {counts}")
        time.sleep(0.3)


def remove_gluster_files(paths: list[str]) -> None:
    """Remove the run and log files glusterd made for our volume alone (never shared ones)."""
    for p in paths:
        if not p.startswith(GLUSTER_OWNED_PREFIXES):
            continue
        path = Path(p)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                path.unlink()


def stop_leftovers(daemons: dict[str, Agent]) -> None:
    for a in daemons.values():
        if not a.wait_exit(5):
            a.stop()


def quietly(what: str, fn: Callable, *args) -> None:
    try:
        fn(*args)
    except BenchError as e:
        log.warning("%s failed: %s", what, e)


def unmount_gluster(mnt: Path) -> None:
    if bm.is_mounted(mnt):
        quietly("umount of the gluster mount", run, ["umount", str(mnt)], MOUNT_TIMEOUT_S)
    bm.force_unmount(mnt)


@dataclasses.dataclass
class Bed:
    """A target as the workloads see it."""

    name: str
    workdir: Path
    procs: list[Agent]             # processes whose CPU time and RSS are counted
    copies: list[Path]             # where the other copies show (replica mount, bricks)
    rss_group: str | None
    proxy: DelayProxy | None = None
    delay_ms: float | None = None
    tree_error: str | None = None

    def prepare(self) -> None:
        if self.proxy is not None:
            self.proxy.set_rtt_ms(self.delay_ms or 0)


@contextlib.contextmanager
def open_gluster(home: Path) -> Iterator[Bed]:
    """A replica-2 volume of two bricks under `home`, mounted; all undone on exit."""
    home.mkdir(parents=True)
    host = loopback_host_name()
    refuse_running_glusterd()
    vol = f"fmbench{os.getpid()}"
    bricks = [home / "brick1", home / "brick2"]
    mnt = home / "mnt"
    for d in (*bricks, mnt):
        d.mkdir()
    for d in bricks:
        bm.spread_subdirectories(d)
    owned = [f"/var/run/gluster/vols/{vol}", f"/var/run/gluster/shd/{vol}"]
    daemons: dict[str, Agent] = {}
    with contextlib.ExitStack() as stack:
        stack.callback(remove_gluster_files, owned)
        stack.callback(stop_leftovers, daemons)
        proc = start_glusterd(home)
        stack.callback(stop_glusterd, proc)
        wait_glusterd(proc, home)
        gluster("volume", "create", vol, "replica", "2", *(f"{host}:{b}" for b in bricks),
                "force")
        stack.callback(quietly, "gluster volume delete", gluster, "volume", "delete", vol)
        gluster("volume", "start", vol)
        stack.callback(quietly, "gluster volume stop", gluster, "volume", "stop", vol)
        daemons.update(volume_daemons(vol, home))
        for label, a in daemons.items():
            args = cmdline(a.pid)
            owned += option_values(args, "-S", "-p")
            if label.startswith("brick"):
                owned += option_values(args, "-l")
        stack.callback(unmount_gluster, mnt)
        run(["mount", "-t", "glusterfs", "-o", f"log-file={home / 'client.log'}",
             f"{host}:/{vol}", str(mnt)], timeout=MOUNT_TIMEOUT_S)
        client = fuse_client(mnt)
        if client is None:
            log.warning("gluster FUSE client process not found: its CPU and RSS are not counted")
        else:
            daemons["client"] = client
        wait_client_connected(vol, home)
        log.info("gluster volume %s mounted on %s (bricks %s)", vol, mnt,
                 ", ".join(f"pid {daemons[b].pid}" for b in ("brick1", "brick2")))
        procs = [daemons[k] for k in ("client", "brick1", "brick2") if k in daemons]
        yield Bed("gluster", mnt, procs, bricks, "gluster")


# --- workloads ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Plan:
    sizes: Sizes
    tarball: Path
    tarball_entries: int
    tarball_mib: float

    @property
    def tree_entries(self) -> int:
        return self.sizes.tree_files + 111      # root, 10 directories, 100 subdirectories


def cpu_seconds(procs: list[Agent]) -> float | None:
    """utime + stime of the processes, in seconds; None if one of them is gone."""
    total = 0
    for a in procs:
        fields = bm.proc_stat(a.pid)
        if fields is None or fields[19] != a.start_time:
            return None
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def file_size(path: Path) -> int | None:
    try:
        return int(run(["stat", "-c", "%s", str(path)], timeout=SYSTEM_TIMEOUT_S))
    except (BenchError, ValueError):
        return None


def w_seq_write(bed: Bed, work: Path, plan: Plan) -> dict:
    path = work / "seq.dat"
    before = cpu_seconds(bed.procs) if bed.procs else None
    metrics = bm.seq_write(path, plan.sizes.fio())
    after = cpu_seconds(bed.procs) if bed.procs else None
    if before is not None and after is not None:
        metrics["cpu_s_per_gib"] = (after - before) / (plan.sizes.seq_mib / 1024)
    expected = plan.sizes.seq_mib * bm.MiB
    for copy in bed.copies:
        size = file_size(copy / path.relative_to(bed.workdir))
        if size != expected:
            log.warning("%s: the copy in %s has %s bytes, %d were written", bed.name, copy,
                        size, expected)
    if bed.proxy is not None:
        run(["rm", "-f", str(path)], timeout=SYSTEM_TIMEOUT_S)
    return metrics


def w_seq_read(bed: Bed, work: Path, plan: Plan) -> dict:
    path = work / "seq.dat"
    if file_size(path) != plan.sizes.seq_mib * bm.MiB:
        raise BenchError("no complete file from the sequential write to read back")
    return bm.seq_read_cold(path, plan.sizes.fio())


def w_seq(bed: Bed, work: Path, plan: Plan) -> dict:
    """Write, then read back cold and delete, before the next target writes: a file left in
    place slowed the next target's write about 2x here (the virtual disk was still busy
    with it; deleting it discards the blocks)."""
    metrics = w_seq_write(bed, work, plan)
    if bed.proxy is None:
        metrics.update(w_seq_read(bed, work, plan))
    return metrics


def w_rand(bed: Bed, work: Path, plan: Plan) -> dict:
    return bm.rand_write_fsync(work / "rand.dat", plan.sizes.fio())


def w_files(bed: Bed, work: Path, plan: Plan) -> dict:
    return bm.create_delete(work, plan.sizes.fio())


def timed(cmd: list[str], timeout: float) -> tuple[float, str]:
    t0 = time.perf_counter()
    out = run(cmd, timeout=timeout)
    return time.perf_counter() - t0, out


def w_find(bed: Bed, work: Path, plan: Plan) -> dict:
    if bed.tree_error:
        raise BenchError(f"no tree to walk: {bed.tree_error}")
    cmd = ["find", str(bed.workdir / "tree"), "-printf", "%s %m %n %T@\n"]
    metrics = {}
    try:
        for key in ("find_cold_s", "find_warm_s"):
            if key == "find_cold_s":
                bm.drop_caches()
            seconds, out = timed(cmd, FIND_TIMEOUT_S)
            if (n := out.count("\n")) != plan.tree_entries:
                raise BenchError(f"find listed {n} entries, expected {plan.tree_entries}")
            metrics[key] = seconds
    except BenchError:
        bm.drop_caches()        # the kernel forgets the inodes: a mount agent closes their fds
        raise
    return metrics


def w_unpack(bed: Bed, work: Path, plan: Plan) -> dict:
    dest = work / "unpacked"
    run(["mkdir", str(dest)], timeout=SYSTEM_TIMEOUT_S)
    unpack_s, _ = timed(["tar", "-xf", str(plan.tarball), "-C", str(dest)], TREE_OP_TIMEOUT_S)
    delete_s, _ = timed(["rm", "-rf", str(dest)], TREE_OP_TIMEOUT_S)
    return {"unpack_s": unpack_s, "unpack_delete_s": delete_s}


def w_dbench(bed: Bed, work: Path, plan: Plan) -> dict:
    s = plan.sizes
    dest = work / "dbench"
    run(["mkdir", str(dest)], timeout=SYSTEM_TIMEOUT_S)
    out = run(["dbench", "-D", str(dest), "-t", str(s.dbench_seconds), "-c", str(DBENCH_LOADFILE),
               str(s.dbench_clients)], timeout=s.dbench_seconds * 5 + 300)
    found = re.findall(r"^Throughput ([\d.]+) MB/sec", out, re.MULTILINE)
    if not found:
        raise BenchError(f"dbench printed no throughput: {out.strip()[-300:]!r}")
    errors = [line for line in out.splitlines() if "ERROR" in line or "failed" in line]
    if errors:
        log.warning("%s: dbench reported %d error line(s), first: %s", bed.name, len(errors),
                    errors[0])
    return {"dbench_mbs": float(found[-1])}


# (label, function, also run through the delay proxy)
WORKLOADS: tuple[tuple[str, Callable[[Bed, Path, Plan], dict], bool], ...] = (
    ("sequential write, cold read", w_seq, True),
    ("4 KiB writes + fsync", w_rand, True),
    ("create / delete files", w_files, False),
    ("find + stat", w_find, False),
    ("unpack / delete a source tree", w_unpack, False),
    ("dbench", w_dbench, False),
)


def warm_up(beds: dict[str, Bed], plan: Plan) -> dict[str, float]:
    """One untimed sequential write per mount before the rounds (the first large write
    after a mount is slower); its figure is reported apart, not in the medians."""
    figures = {}
    done: set[Path] = set()
    for name, bed in beds.items():
        if bed.workdir in done:
            continue
        done.add(bed.workdir)
        bed.prepare()
        work = bed.workdir / "warmup"
        log.info("%s: warm-up sequential write (not in the medians)", name)
        try:
            run(["mkdir", str(work)], timeout=SYSTEM_TIMEOUT_S)
            figures[name] = bm.seq_write(work / "seq.dat", plan.sizes.fio())["seq_write_mibs"]
        except (BenchError, OSError) as e:
            log.warning("%s: warm-up write failed: %s", name, e)
        quietly(f"cleaning up {work}", run, ["rm", "-rf", str(work)], TREE_OP_TIMEOUT_S)
    return figures


def descriptors(beds: dict[str, Bed]) -> dict[str, dict[str, list[int | None]]]:
    """{target: {process: [open descriptors, RLIMIT_NOFILE]}} of the mount agents.

    An agent keeps one descriptor per inode the kernel holds, so right after a tree is made
    this shows how close the agent came to its limit.
    """
    out: dict[str, dict[str, list[int | None]]] = {}
    for name in ("alone", "pair"):
        for a in beds[name].procs if name in beds else []:
            try:
                count = len(os.listdir(f"/proc/{a.pid}/fd"))
                limit = next(int(line.split()[3]) for line in
                             Path(f"/proc/{a.pid}/limits").read_text().splitlines()
                             if line.startswith("Max open files"))
            except (OSError, StopIteration, ValueError, IndexError):
                count, limit = None, None
            out.setdefault(name, {})[a.label] = [count, limit]
    return out


def make_tree(bed: Bed, count: int) -> None:
    """The tree for find, made once per target through the target, in a child process."""
    t0 = time.perf_counter()
    try:
        run([sys.executable, "-m", "bench.bench_compare", "_tree", str(bed.workdir / "tree"),
             str(count)], timeout=TREE_TIMEOUT_S, cwd=bm.REPO_ROOT)
    except BenchError as e:
        bed.tree_error = str(e)
        log.error("%s: making the tree failed: %s", bed.name, e)
        return
    log.info("%s: tree of %d files made in %.1f s (%d threads, not timed)", bed.name, count,
             time.perf_counter() - t0, TREE_THREADS)


def tree_worker(root: str, count: str) -> int:
    """Child process of make_tree: 10 directories of 10 subdirectories of count/100 files."""
    leaves = [Path(root) / f"d{i:02d}" / f"s{j:02d}" for i in range(10) for j in range(10)]
    per_leaf = int(count) // len(leaves)
    made = [0] * len(leaves)

    def fill(n: int) -> None:
        leaves[n].mkdir(parents=True, exist_ok=True)
        for k in range(per_leaf):
            os.close(os.open(leaves[n] / f"f{k:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             0o644))
            made[n] += 1

    try:
        with ThreadPoolExecutor(TREE_THREADS) as pool:
            list(pool.map(fill, range(len(leaves))))
    except OSError as e:
        print(f"{e.strerror} (errno {e.errno}) after {sum(made):,} of {int(count):,} files",
              file=sys.stderr)
        return 1
    return 0


def make_tarball(dest: Path) -> tuple[int, float]:
    """Tar the venv's source packages once; return its entries and MiB of file data."""
    site = Path(sysconfig.get_paths()["purelib"])
    names = [n for n in SOURCE_PACKAGES if (site / n).is_dir()]
    if not names:
        raise BenchError(f"none of {', '.join(SOURCE_PACKAGES)} in {site}")
    run(["tar", "-cf", str(dest), "-C", str(site), *names], timeout=SYSTEM_TIMEOUT_S)
    paths = [p for n in names for p in (site / n).rglob("*")]
    data = sum(p.stat().st_size for p in paths if p.is_file() and not p.is_symlink())
    log.info("tarball of %s from %s: %d entries", ", ".join(names), site, len(paths) + len(names))
    return len(paths) + len(names), data / bm.MiB


# --- the run --------------------------------------------------------------------------------

def open_beds(stack: contextlib.ExitStack, scratch: Path, cli: list[str]
              ) -> tuple[dict[str, Bed], dict[str, str]]:
    """Set up every target, teardown registered on `stack`; ({name: Bed}, {name: error})."""
    beds: dict[str, Bed] = {}
    failed: dict[str, str] = {}
    for name in MAIN_TARGETS:
        log.info("setting up %s", name)
        try:
            if name == "gluster":
                beds[name] = stack.enter_context(open_gluster(scratch / name))
                continue
            t = stack.enter_context(bm.open_target(name, scratch / name, cli))
        except (BenchError, OSError) as e:
            log.error("%s: setup failed: %s", name, e)
            failed[name] = f"setup: {e}"
            continue
        beds[name] = Bed(name, t.workdir, t.agents, [t.replica_dir] if t.replica_dir else [],
                         None if name == "local" else name)
    log.info("setting up a pair behind the delay proxy")
    proxy = DelayProxy()
    stack.callback(proxy.close)
    try:
        t = stack.enter_context(bm.open_target("pair", scratch / "pair-proxy", cli,
                                               peer_route=proxy.route))
    except (BenchError, OSError) as e:
        log.error("pair behind the proxy: setup failed: %s", e)
        failed.update({name: f"setup: {e}" for name in DELAY_TARGETS})
    else:
        for name, ms in zip(DELAY_TARGETS, DELAYS_MS):
            beds[name] = Bed(name, t.workdir, t.agents, [t.replica_dir], "pair+proxy", proxy, ms)
    return beds, failed


def run_rounds(beds: dict[str, Bed], plan: Plan, rounds: int) -> list[dict]:
    names = list(beds)
    out = []
    for n in range(rounds):
        k = n % len(names)
        order = names[k:] + names[:k]
        log.info("round %d/%d, order %s", n + 1, rounds, ", ".join(order))
        metrics: dict[str, dict] = {t: {} for t in order}
        errors: dict[str, list[str]] = {t: [] for t in order}
        works = {t: beds[t].workdir / f"round{n + 1}-{t.replace('+', '-')}" for t in order}
        unusable = set()
        for t in order:
            try:
                run(["mkdir", str(works[t])], timeout=SYSTEM_TIMEOUT_S)
            except BenchError as e:
                errors[t].append(f"mkdir: {e}")
                unusable.add(t)
        for label, fn, through_proxy in WORKLOADS:
            for t in order:
                bed = beds[t]
                if (bed.proxy is not None and not through_proxy) or t in unusable:
                    continue
                bed.prepare()
                log.info("round %d: %s on %s", n + 1, label, t)
                try:
                    metrics[t].update(fn(bed, works[t], plan))
                except (BenchError, OSError) as e:
                    log.error("round %d: %s on %s failed: %s", n + 1, label, t, e)
                    errors[t].append(f"{label}: {e}")
        for t in order:
            quietly(f"cleaning up {works[t]}", run, ["rm", "-rf", str(works[t])],
                    TREE_OP_TIMEOUT_S)
        out.append({"round": n + 1, "order": order, "metrics": metrics, "errors": errors})
    return out


def summarize(rounds: list[dict], names: list[str]) -> dict:
    """{target: {metric: {median, min, max, values}}} over the rounds with a value."""
    summary: dict = {t: {} for t in names}
    for t in names:
        keys = {k for r in rounds for k in r["metrics"].get(t, {})}
        for k in sorted(keys):
            values = [v for r in rounds if (v := r["metrics"].get(t, {}).get(k)) is not None]
            summary[t][k] = {"median": statistics.median(values), "min": min(values),
                             "max": max(values), "values": values}
    return summary


def median(summary: dict, target: str, metric: str) -> float | None:
    s = summary.get(target, {}).get(metric)
    return s["median"] if s else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def worst_rss(rss: dict, group: str) -> float | None:
    """The largest of the peak-sample and VmHWM figures of a group's processes, MiB."""
    values = [v for v in (rss.get(group) or {}).values() if v is not None]
    return max(values) if values else None


def verdict(value: float | None, ok: bool) -> str:
    return "n/a" if value is None else ("PASS" if ok else "MISS")


def judge(summary: dict, rss: dict) -> tuple[list[dict], dict]:
    goals = []
    for g in GOALS:
        pair, glus = median(summary, "pair", g.metric), median(summary, "gluster", g.metric)
        if g.kind == "faster":
            value = ratio(glus, pair)
            ok = value is not None and value >= g.limit
            limit = f">= {g.limit:g}x faster"
        else:
            value = ratio(pair, glus)
            ok = value is not None and (value >= g.limit if g.kind == "more" else
                                        value <= g.limit)
            limit = f"{'>=' if g.kind == 'more' else '<='} {g.limit:g}x GlusterFS"
        failed = pair is None and glus is not None
        goals.append({"goal": g.label, "metric": g.metric, "kind": g.kind, "value": value,
                      "limit": limit, "verdict": "MISS" if failed else verdict(value, ok),
                      "pair_failed": failed})
    keeps = {}
    for ms in DELAYS_MS[1:]:
        for metric in ("seq_write_mibs", "rand_iops"):
            slow = median(summary, f"pair+{ms}ms", metric)
            keeps[f"{metric}@{ms}ms"] = {
                "of_proxy_0ms": ratio(slow, median(summary, "pair+0ms", metric)),
                "of_direct_pair": ratio(slow, median(summary, "pair", metric))}
    keep = keeps[f"seq_write_mibs@{DELAYS_MS[-1]}ms"]["of_proxy_0ms"]
    goals.append({"goal": f"seq write with {DELAYS_MS[-1]} ms RTT, share of 0 ms",
                  "metric": "keep", "kind": "keep", "value": keep,
                  "limit": f">= {KEEP_LIMIT:.0%}",
                  "verdict": verdict(keep, keep is not None and keep >= KEEP_LIMIT)})
    worst = [v for g in ("pair", "pair+proxy") if (v := worst_rss(rss, g)) is not None]
    value = max(worst) if worst else None
    goals.append({"goal": "agents' RSS (worst agent, whole run)", "metric": "rss",
                  "kind": "rss", "value": value, "limit": f"< {RSS_LIMIT_MIB:.0f} MiB",
                  "verdict": verdict(value, value is not None and value < RSS_LIMIT_MIB)})
    return goals, keeps


# --- report ---------------------------------------------------------------------------------

def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if abs(v) >= 10 else f"{v:.2f}" if abs(v) >= 1 else f"{v:.3f}"


def cell(s: dict | None) -> str:
    return f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]" if s else "—"


def labels(plan: dict) -> dict[str, str]:
    s = Sizes(**plan["sizes"])
    return {
        "seq_write_mibs": f"seq write {s.seq_mib} MiB + fsync at end (MiB/s)",
        "seq_read_mibs": f"seq read {s.seq_mib} MiB, cold cache (MiB/s)",
        "rand_iops": f"4 KiB random write + fsync each, {s.rand_seconds} s (IOPS)",
        "fsync_p50_us": "  fsync latency p50 (µs)",
        "fsync_p99_us": "  fsync latency p99 (µs)",
        "create_per_s": f"create {s.files:,} files of 4 KiB (files/s)",
        "delete_per_s": f"delete {s.files:,} files of 4 KiB (files/s)",
        "find_cold_s": f"find + stat, {s.tree_files:,} files, cold (s)",
        "find_warm_s": f"find + stat, {s.tree_files:,} files, warm (s)",
        "unpack_s": f"unpack {plan['tarball_entries']:,} entries, "
                    f"{plan['tarball_mib']:.0f} MiB (s)",
        "unpack_delete_s": "  delete the unpacked tree (s)",
        "dbench_mbs": f"dbench {s.dbench_clients} clients, {s.dbench_seconds} s (MB/s)",
        "cpu_s_per_gib": "CPU s per GiB written (seq write)",
    }


def report(result: dict) -> str:
    cfg, summary = result["config"], result["summary"]
    names = labels(cfg["plan"])
    rows = [["median [min–max]", *MAIN_TARGETS, "pair/gluster"]]
    for key, label in names.items():
        row = [label] + [cell(summary.get(t, {}).get(key)) for t in MAIN_TARGETS]
        r = ratio(median(summary, "pair", key), median(summary, "gluster", key))
        rows.append(row + ["—" if r is None else f"{r:.2f}x"])
    rss = result["rss"]
    row = ["peak RSS, largest process (MiB)"] + [fmt(worst_rss(rss, t)) for t in MAIN_TARGETS]
    r = ratio(worst_rss(rss, "pair"), worst_rss(rss, "gluster"))
    rows.append(row + ["—" if r is None else f"{r:.2f}x"])

    lat = [["median [min–max]", *(f"{t} (proxy)" for t in DELAY_TARGETS), "GlusterFS"]]
    for key in ("seq_write_mibs", "rand_iops", "fsync_p50_us", "fsync_p99_us", "cpu_s_per_gib"):
        lat.append([names[key]] + [cell(summary.get(t, {}).get(key)) for t in DELAY_TARGETS]
                   + ["not measured (bricks on one host)"])
    lines = [
        f"fusemirror vs GlusterFS replica 2 — {cfg['rounds']} round(s)"
        f"{' --quick' if cfg['quick'] else ''}, {cfg['started']}, {cfg['gluster']}, "
        f"{cfg['fio']}, {cfg['dbench']}, kernel {cfg['kernel']}, {cfg['cpus']} CPUs, "
        f"load {cfg['load_before']} before / {cfg['load_after']} after",
        "",
        bm.render_table(rows),
        "",
        "Added round trip between primary and replica (delay proxy on loopback):",
        bm.render_table(lat),
        "",
    ]
    for key, k in result["keeps"].items():
        metric, ms = key.split("@")
        what = "sequential write" if metric == "seq_write_mibs" else "fsync'd 4 KiB writes"
        lines.append(f"with {ms[:-2]} ms added round trip, {what} keeps "
                     f"{pct(k['of_proxy_0ms'])} of its 0 ms figure through the proxy "
                     f"({pct(k['of_direct_pair'])} of the direct pair's)")
    lines += ["", "Targets (fusemirror pair vs GlusterFS, same run, ratios of medians):"]
    for g in result["goals"]:
        v = g["value"]
        value = ("failed" if g.get("pair_failed") else "—" if v is None else
                 f"{v:.0f} MiB" if g["kind"] == "rss" else
                 pct(v) if g["kind"] == "keep" else
                 f"{v:.2f}x faster" if g["kind"] == "faster" else f"{v:.2f}x")
        lines.append(f"  {g['verdict']:<4}  {g['goal']:<40} {value:>13}  (target {g['limit']})")
    for t, e in result["setup_errors"].items():
        lines.append(f"  FAILED {t}: {e[:300]}")
    for r in result["rounds"]:
        for t, errs in r["errors"].items():
            lines += [f"  FAILED round {r['round']} {t}: {e[:300]}" for e in errs]
    if result["trees"]:
        lines.append(f"Trees for find made before the rounds (not timed), {TREE_THREADS} "
                     "threads: " + ", ".join(f"{t} {fmt(s)} s"
                                             for t, s in result["trees"].items()))
    if result["descriptors"]:
        lines.append("Mount agents' open descriptors / limit after the trees were made: "
                     + ", ".join(f"{t} {label} {n}/{limit}"
                                 for t, procs in result["descriptors"].items()
                                 for label, (n, limit) in procs.items()))
    if result["warmup"]:
        lines.append("Warm-up sequential write after setup (not in the medians), MiB/s: "
                     + ", ".join(f"{t} {fmt(v)}" for t, v in result["warmup"].items()))
    lines.append(f"CPU steal during the run: {cfg['steal_pct']:.1f}% "
                 "(time the hypervisor gave to other guests)")
    return "\n".join(lines)


def pct(v: float | None) -> str:
    return "—" if v is None else f"{v:.0%}"


# --- main -----------------------------------------------------------------------------------

def ensure_packages() -> None:
    path = os.environ.get("PATH", "") + ":/usr/sbin:/sbin"
    missing = sorted({pkg for exe, pkg in PACKAGES.items() if not shutil.which(exe, path=path)})
    if not missing:
        return
    log.info("installing %s with apt-get", ", ".join(missing))
    install = ["env", "DEBIAN_FRONTEND=noninteractive", "apt-get", "install", "-y", "-q",
               *missing]
    try:
        run(install, timeout=APT_TIMEOUT_S)
    except BenchError as e:
        log.info("apt-get install failed (%s); running apt-get update first", e)
        run(["apt-get", "update", "-q"], timeout=APT_TIMEOUT_S)
        run(install, timeout=APT_TIMEOUT_S)


def first_line(cmd: list[str]) -> str:
    try:
        return run(cmd, timeout=SYSTEM_TIMEOUT_S).strip().splitlines()[0]
    except (BenchError, IndexError):
        return "?"


def dbench_version() -> str:
    try:
        out = run(["dbench", "--help"], timeout=SYSTEM_TIMEOUT_S)
    except BenchError as e:       # dbench --help exits 1 on some versions
        out = str(e)
    m = re.search(r"dbench version (\S+)", out)
    return f"dbench {m.group(1)}" if m else "dbench"


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def cpu_times() -> list[int]:
    """The aggregate `cpu` line of /proc/stat, in ticks (user nice system idle ... steal)."""
    return [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]


def steal_pct(before: list[int], after: list[int]) -> float:
    """Share of CPU time the hypervisor gave to others during the run: a noise indicator."""
    delta = [b - a for a, b in zip(before, after)]
    return 100 * delta[7] / sum(delta[:8]) if sum(delta[:8]) else 0.0


def run_bench(args: argparse.Namespace, scratch: Path) -> dict:
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    cli = shlex.split(args.fusemirror) if args.fusemirror else [sys.executable, "-m", "cli.main"]
    entries, mib = make_tarball(scratch / "source.tar")
    plan = Plan(sizes, scratch / "source.tar", entries, mib)
    config = {"rounds": args.rounds, "quick": args.quick, "cli": cli,
              "plan": {"sizes": dataclasses.asdict(sizes), "tarball_entries": entries,
                       "tarball_mib": mib, "source_packages": list(SOURCE_PACKAGES)},
              "fio": first_line(["fio", "--version"]),
              "gluster": first_line(["glusterd", "--version"]).replace("glusterfs", "GlusterFS"),
              "dbench": dbench_version(), "kernel": platform.release(),
              "cpus": os.cpu_count(), "python": platform.python_version(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S %z"), "load_before": load()}
    steal_before = cpu_times()
    stack = contextlib.ExitStack()
    try:
        beds, setup_errors = open_beds(stack, scratch / "targets", cli)
        samplers = {}
        for bed in beds.values():
            if bed.rss_group and bed.rss_group not in samplers:
                samplers[bed.rss_group] = stack.enter_context(bm.RssSampler(bed.procs))
        trees = {}
        for name in MAIN_TARGETS:
            if name in beds:
                t0 = time.perf_counter()
                make_tree(beds[name], sizes.tree_files)
                trees[name] = time.perf_counter() - t0
        fds = descriptors(beds)
        bm.drop_caches()
        warmup = warm_up(beds, plan)
        rounds = run_rounds(beds, plan, args.rounds)
    finally:
        handlers = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            log.info("tearing down")
            stack.close()
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
    config["load_after"] = load()
    config["steal_pct"] = steal_pct(steal_before, cpu_times())
    config["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %z")
    rss = {g: {k: v for k, v in s.metrics().items()} for g, s in samplers.items()}
    summary = summarize(rounds, list(beds))
    goals, keeps = judge(summary, rss)
    return {"config": config, "setup_errors": setup_errors, "trees": trees, "warmup": warmup,
            "descriptors": fds,
            "rounds": rounds, "summary": summary, "rss": rss,
            "rss_per_process": {g: s.per_agent() for g, s in samplers.items()},
            "keeps": keeps, "goals": goals}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_compare",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3); medians reported")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_SIZES.files:,} files, a tree of {QUICK_SIZES.tree_files:,}, "
                        f"{QUICK_SIZES.rand_seconds} s of fsync'd writes, "
                        f"{QUICK_SIZES.dbench_seconds} s of dbench")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    p.add_argument("--fusemirror", metavar="CMD", default=None,
                   help="command to run the CLI (default: python -m cli.main in the repo root)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_tree"]:
        return tree_worker(*argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.error("run as root: the bench mounts, runs glusterd and drops the page cache")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    t0 = time.monotonic()
    scratch = Path(tempfile.mkdtemp(prefix="fusemirror-compare.", dir="/var/tmp"))
    log.info("scratch directory %s", scratch)
    try:
        ensure_packages()
        if not DBENCH_LOADFILE.exists():
            raise BenchError(f"{DBENCH_LOADFILE} is missing (package dbench)")
        result = run_bench(args, scratch)
    except KeyboardInterrupt:
        log.error("interrupted; everything started was stopped")
        return 130
    except BenchError as e:
        log.error("%s", e)
        return 2
    finally:
        bm.remove_tree(scratch)
    result["config"]["duration_s"] = time.monotonic() - t0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    print(report(result))
    print(f"(run took {result['config']['duration_s'] / 60:.1f} min)")
    failed = result["setup_errors"] or any(e for r in result["rounds"]
                                           for e in r["errors"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
