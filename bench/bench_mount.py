"""Benchmark of the replicated mount, side by side with the local directory.

Targets: ``local`` (a plain directory on the scratch file system), ``alone`` (one mount agent
with ``--role alone``) and ``pair`` (a primary mounted over one directory, replicating over
127.0.0.1 to a replica mounted over another). Workloads, each run on every target in a round:

1. sequential write, 1 MiB blocks, fsync at the end (fio)      -> MiB/s
2. sequential read of that file with a cold cache (fio)         -> MiB/s
3. 4 KiB random writes, each followed by fsync (fio)            -> IOPS, fsync p50/p99 in µs
4. create then delete N files of 4 KiB (a Python child process) -> files/s for each
5. the agents' peak RSS, sampled every 0.2 s, and VmHWM at the end -> MiB

Run as root from the repository root::

    python -m bench.bench_mount [--rounds N] [--quick] [--targets local,alone,pair] [--json FILE]

Every figure is the median over the rounds, with min and max; the order of the targets
rotates between rounds. Everything touching a mount runs in a child process with a timeout,
so a hung mount cannot hang the benchmark; everything started is stopped by PID and every
mount is undone in ``finally`` blocks.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

log = logging.getLogger(__name__)

MiB = 1 << 20
REPO_ROOT = Path(__file__).resolve().parent.parent
TARGET_NAMES = ("local", "alone", "pair")
LOOPBACK = "127.0.0.1"


def cpu_model() -> str:
    """The CPU's model name, for the header of a bench report."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f
                         if line.startswith("model name")), "unknown CPU")
    except OSError:
        return "unknown CPU"


CLI_MOUNT_TIMEOUT_S = 60
CLI_STATUS_TIMEOUT_S = 15
CLI_UMOUNT_TIMEOUT_S = 120
AGENT_EXIT_TIMEOUT_S = 30
AGENT_KILL_TIMEOUT_S = 10
FIO_TIMEOUT_S = 900
FILES_TIMEOUT_S = 900
SYSTEM_TIMEOUT_S = 120
RSS_SAMPLE_INTERVAL_S = 0.2
RSS_LIMIT_MIB = 200.0


class BenchError(Exception):
    """A step of the benchmark failed; the message says which and why."""


@dataclasses.dataclass(frozen=True)
class Sizes:
    seq_mib: int
    rand_mib: int
    rand_seconds: int
    files: int
    file_bytes: int = 4096


FULL_SIZES = Sizes(seq_mib=512, rand_mib=64, rand_seconds=10, files=5000)
QUICK_SIZES = Sizes(seq_mib=64, rand_mib=16, rand_seconds=3, files=1000)


@dataclasses.dataclass(frozen=True)
class Goal:
    label: str
    metric: str
    min_ratio: float


GOALS = (
    Goal("sequential write", "seq_write_mibs", 0.35),
    Goal("fsync'd 4 KiB writes (IOPS)", "rand_iops", 0.25),
    Goal("sequential read, cold cache", "seq_read_mibs", 0.8),
    Goal("file creates", "create_per_s", 0.2),
)


def metric_labels(sizes: Sizes) -> dict[str, str]:
    """Table row label of every metric, in table order."""
    return {
        "seq_write_mibs": f"seq write {sizes.seq_mib} MiB + fsync at end (MiB/s)",
        "seq_read_mibs": f"seq read {sizes.seq_mib} MiB, cold cache (MiB/s)",
        "rand_iops": "4 KiB random write + fsync each (IOPS)",
        "fsync_p50_us": "  fsync latency p50 (µs)",
        "fsync_p99_us": "  fsync latency p99 (µs)",
        "create_per_s": f"create {sizes.files:,} files of 4 KiB (files/s)",
        "delete_per_s": f"delete {sizes.files:,} files of 4 KiB (files/s)",
        "rss_peak_mib": "agent RSS, peak of 0.2 s samples (MiB)",
        "rss_hwm_mib": "agent VmHWM at end (MiB)",
    }


# --- child processes -----------------------------------------------------------------------

def run(cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
    """Run cmd to completion and return its stdout; raise BenchError on failure or timeout.

    The child leads a new process group, so ^C reaches only us, and on timeout or interrupt
    the whole group (fio forks its jobs) is killed by its id. Output goes to files, not
    pipes: a daemon that inherits them must not keep us waiting.
    """
    log.debug("run: %s", shlex.join(cmd))
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                    cwd=cwd, start_new_session=True)
        except OSError as e:
            raise BenchError(f"{e} from: {shlex.join(cmd)}") from None
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_group(proc)
            raise BenchError(f"no answer within {timeout:.0f} s from: {shlex.join(cmd)}") from None
        except BaseException:
            kill_group(proc)
            raise
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode(errors="replace")
        stderr = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise BenchError(f"exit code {proc.returncode}: {stderr.strip()[-800:]} "
                         f"from: {shlex.join(cmd)}")
    return stdout


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the process group that `proc` leads, and reap `proc`."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(AGENT_KILL_TIMEOUT_S)


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (state first), or None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


@dataclasses.dataclass
class Agent:
    """A mount agent process, known by PID and start time so a reused PID is never signalled."""

    label: str
    pid: int
    start_time: str

    @classmethod
    def from_pid(cls, label: str, pid: int) -> Agent:
        fields = proc_stat(pid)
        if fields is None:
            raise BenchError(f"{label} agent pid {pid} is not running")
        return cls(label, pid, fields[19])

    def alive(self) -> bool:
        """True while the process runs; a zombie counts as gone (PID 1 may not reap it)."""
        fields = proc_stat(self.pid)
        return fields is not None and fields[19] == self.start_time and fields[0] not in ("Z", "X")

    def wait_exit(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.1)
        return True

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it does not go away."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if not self.alive():
                return
            log.warning("sending %s to %s agent pid %d", sig.name, self.label, self.pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            if self.wait_exit(AGENT_KILL_TIMEOUT_S):
                return
        log.error("%s agent pid %d survived SIGKILL", self.label, self.pid)

    def read_status_kib(self, field: str) -> int | None:
        """A field of /proc/PID/status in KiB (VmRSS, VmHWM), or None if unreadable."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None


# --- mounts -------------------------------------------------------------------------------

def mount_points() -> dict[str, str]:
    """{mount point: "major:minor"} from /proc/self/mountinfo."""
    points = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            points[fields[4].encode().decode("unicode_escape")] = fields[2]
    return points


def is_mounted(path: Path) -> bool:
    return str(path) in mount_points()


def abort_fuse_connection(path: Path) -> None:
    """Abort the FUSE connection of the mount on `path`, if fusectl is mounted.

    The fallback for a mount whose agent no longer answers: pending and future requests fail
    instead of hanging, so the unmount goes through and the agent's loop ends.
    """
    device = mount_points().get(str(path))
    abort = Path(f"/sys/fs/fuse/connections/{device.split(':')[1]}/abort") if device else None
    if abort is not None and abort.exists():
        log.warning("aborting the FUSE connection of %s", path)
        with contextlib.suppress(OSError):
            abort.write_text("1")


def spread_subdirectories(path: Path) -> None:
    """Have ext4 put each new subdirectory of `path` in a block group of its own (the Orlov
    "top directory" flag, chattr +T), so that one target's deletions cannot slow another
    target's creates. On this VM (ext4 without a journal) the allocator skips inodes freed
    recently in the group it searches, reading the inode table for each one (recently_deleted
    in ext4's ialloc.c): right after 5,000 files were deleted, each create in the same group
    took about 800 µs instead of 30. The targets share one disk here, real nodes do not.
    Other file systems lack the flag: a warning, and the figures may be noisier."""
    try:
        run(["chattr", "+T", str(path)], timeout=SYSTEM_TIMEOUT_S)
    except BenchError as e:
        log.warning("cannot spread the subdirectories of %s: %s", path, e)


class Mount:
    """One mount agent over `dir`, started and stopped through the fusemirror CLI."""

    def __init__(self, cli: list[str], home: Path, label: str):
        self.cli = cli
        self.label = label
        self.dir = home / "data"
        self.state_dir = home / "state"
        self.log_file = home / "agent.log"
        self.agent: Agent | None = None
        for d in (self.dir, self.state_dir):
            d.mkdir(parents=True)
        spread_subdirectories(self.dir)

    def _cli(self, *args: str, timeout: float) -> str:
        return run([*self.cli, *args], timeout=timeout, cwd=REPO_ROOT)

    def mount(self, role: str, *role_args: str) -> None:
        self._cli("mount", str(self.dir), "--role", role, *role_args,
                  "--state-dir", str(self.state_dir), "--log-file", str(self.log_file),
                  timeout=CLI_MOUNT_TIMEOUT_S)
        if not is_mounted(self.dir):
            raise BenchError(f"{self.label}: mount returned but {self.dir} is not a mount point")
        status = self.status()
        if status.get("role") != role:
            log.warning("%s: status reports role %r, expected %r", self.label,
                        status.get("role"), role)
        self.agent = Agent.from_pid(self.label, int(status["pid"]))
        log.info("%s mounted on %s, agent pid %d", self.label, self.dir, self.agent.pid)

    def status(self) -> dict:
        out = self._cli("status", str(self.dir), "--json", timeout=CLI_STATUS_TIMEOUT_S)
        try:
            return json.loads(out)
        except ValueError:
            msg = f"{self.label}: status --json printed no JSON: {out[:200]!r}"
            raise BenchError(msg) from None

    def unmount(self) -> None:
        """Undo the mount whatever state it is in; never raises for an ordinary failure."""
        was_mounted = is_mounted(self.dir)
        if was_mounted and self.agent is None:
            with contextlib.suppress(BenchError, KeyError, ValueError):
                self.agent = Agent.from_pid(self.label, int(self.status()["pid"]))
        if not was_mounted and self.agent is None:
            return
        if was_mounted:
            try:
                self._cli("umount", str(self.dir), timeout=CLI_UMOUNT_TIMEOUT_S)
            except BenchError as e:
                log.warning("%s: umount failed: %s", self.label, e)
        force_unmount(self.dir)
        if self.agent is None:
            log.error("%s: agent pid unknown (status failed), it may still be running",
                      self.label)
        elif not self.agent.wait_exit(AGENT_EXIT_TIMEOUT_S):
            log.warning("%s: agent pid %d still running %d s after unmount",
                        self.label, self.agent.pid, AGENT_EXIT_TIMEOUT_S)
            self.agent.stop()
        log.info("%s unmounted", self.label)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no agent log)"


def force_unmount(path: Path) -> None:
    """fusermount3 -u, then umount -l, for as long as `path` is still a mount point."""
    for cmd in (["fusermount3", "-u", str(path)], ["umount", "-l", str(path)]):
        if not is_mounted(path):
            return
        if cmd[0] == "umount":
            abort_fuse_connection(path)
        log.warning("still mounted, running %s", shlex.join(cmd))
        try:
            run(cmd, timeout=SYSTEM_TIMEOUT_S)
        except BenchError as e:
            log.warning("%s", e)
    if is_mounted(path):
        log.error("%s is still mounted", path)


# --- targets ------------------------------------------------------------------------------

@dataclasses.dataclass
class Target:
    name: str
    workdir: Path
    mounts: list[Mount]
    replica_dir: Path | None = None

    @property
    def agents(self) -> list[Agent]:
        return [m.agent for m in self.mounts if m.agent is not None]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def open_target(name: str, home: Path, cli: list[str],
                peer_route: Callable[[str], str] | None = None) -> Iterator[Target]:
    """Set up target `name` under `home`; tear it down (primary before replica) on exit.

    For the pair, `peer_route` maps the replica's listen address to the address the primary
    is given as its peer (a proxy in between); by default the primary connects directly.
    """
    home.mkdir(parents=True)
    with contextlib.ExitStack() as stack:
        if name == "local":
            workdir = home / "data"
            workdir.mkdir(parents=True)
            spread_subdirectories(workdir)
            yield Target(name, workdir, [])
            return
        mounts: list[Mount] = []

        def start(label: str, role: str, *role_args: str) -> Mount:
            m = Mount(cli, home / label, label)
            mounts.append(m)
            stack.callback(m.unmount)
            log.info("mounting %s", label)
            try:
                m.mount(role, *role_args)
            except BenchError:
                log.error("%s agent log, last lines:\n%s", label, m.log_tail())
                raise
            return m

        if name == "alone":
            yield Target(name, start("alone", "alone").dir, mounts)
            return
        secret = home / "secret"
        secret.write_bytes(os.urandom(32).hex().encode())
        secret.chmod(0o600)
        peer = f"{LOOPBACK}:{free_port()}"
        replica = start("replica", "replica", "--listen", peer, "--secret-file", str(secret))
        primary_peer = peer_route(peer) if peer_route else peer
        primary = start("primary", "primary", "--peer", primary_peer,
                        "--secret-file", str(secret))
        yield Target(name, primary.dir, mounts, replica_dir=replica.dir)


def remove_tree(path: Path) -> None:
    """rmtree, unless something below `path` is still mounted (it would delete through it)."""
    prefix = str(path) + "/"
    left = sorted(p for p in mount_points() if p.startswith(prefix) or p == str(path))
    if left:
        log.error("not removing %s: still mounted: %s", path, ", ".join(left))
        return
    shutil.rmtree(path, ignore_errors=True)


# --- RSS sampling -------------------------------------------------------------------------

class RssSampler:
    """Samples VmRSS of the agents every 0.2 s in a thread; reads VmHWM when stopped."""

    def __init__(self, agents: list[Agent]):
        self.agents = agents
        self.peak_kib = {a.label: 0 for a in agents}
        self.hwm_kib: dict[str, int | None] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(RSS_SAMPLE_INTERVAL_S):
            self._sample()

    def _sample(self) -> None:
        for a in self.agents:
            rss = a.read_status_kib("VmRSS")
            if rss is not None:
                self.peak_kib[a.label] = max(self.peak_kib[a.label], rss)

    def __enter__(self) -> RssSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sample()
        self.hwm_kib = {a.label: a.read_status_kib("VmHWM") for a in self.agents}

    def metrics(self) -> dict[str, float | None]:
        if not self.agents:
            return {"rss_peak_mib": None, "rss_hwm_mib": None}
        hwm = [v for v in self.hwm_kib.values() if v is not None]
        return {"rss_peak_mib": max(self.peak_kib.values()) / 1024,
                "rss_hwm_mib": max(hwm) / 1024 if hwm else None}

    def per_agent(self) -> dict[str, dict[str, float | None]]:
        def mib(kib: int | None) -> float | None:
            return None if kib is None else kib / 1024

        return {label: {"rss_peak_mib": mib(self.peak_kib[label]),
                        "rss_hwm_mib": mib(self.hwm_kib.get(label))}
                for label in self.peak_kib}


# --- workloads ----------------------------------------------------------------------------

def fio(name: str, path: Path, *args: str) -> dict:
    """Run one fio job on `path` and return its JSON job record."""
    out = run(["fio", f"--name={name}", f"--filename={path}", "--ioengine=psync",
               "--output-format=json", *args], timeout=FIO_TIMEOUT_S)
    try:
        job = json.loads(out[out.index("{"):])["jobs"][0]
    except (ValueError, KeyError, IndexError):
        raise BenchError(f"fio {name}: unreadable JSON output: {out[:200]!r}") from None
    if job.get("error"):
        raise BenchError(f"fio {name}: job error {job['error']}")
    return job


def seq_write(path: Path, sizes: Sizes) -> dict[str, float]:
    job = fio("seqwrite", path, "--rw=write", "--bs=1M", f"--size={sizes.seq_mib}M",
              "--end_fsync=1")
    return {"seq_write_mibs": job["write"]["bw_bytes"] / MiB}


def seq_read_cold(path: Path, sizes: Sizes) -> dict[str, float]:
    """Read back the file seq_write left, after dropping the caches; fio unlinks it after."""
    drop_caches()
    job = fio("seqread", path, "--rw=read", "--bs=1M", f"--size={sizes.seq_mib}M", "--unlink=1")
    return {"seq_read_mibs": job["read"]["bw_bytes"] / MiB}


def drop_caches() -> None:
    """sync, then drop page cache, dentries and inodes.

    This also drops the page cache of FUSE inodes, so a mount is read cold through its agent,
    and the agent reads its backing file cold from disk.
    """
    run(["sync"], timeout=SYSTEM_TIMEOUT_S)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def rand_write_fsync(path: Path, sizes: Sizes) -> dict[str, float | None]:
    job = fio("randwrite", path, "--rw=randwrite", "--bs=4k", "--fsync=1",
              f"--size={sizes.rand_mib}M", f"--runtime={sizes.rand_seconds}", "--time_based",
              "--unlink=1")
    pct = job.get("sync", {}).get("lat_ns", {}).get("percentile", {})
    if not pct:
        log.warning("fio reported no sync latency percentiles for %s", path)

    def us(key: str) -> float | None:
        return pct[key] / 1000 if key in pct else None

    return {"rand_iops": job["write"]["iops"],
            "fsync_p50_us": us("50.000000"), "fsync_p99_us": us("99.000000")}


def create_delete(workdir: Path, sizes: Sizes) -> dict[str, float]:
    """Time creating then unlinking the files, in a child process bounded by a timeout."""
    out = run([sys.executable, "-m", "bench.bench_mount", "_files", str(workdir / "files"),
               str(sizes.files), str(sizes.file_bytes)], timeout=FILES_TIMEOUT_S, cwd=REPO_ROOT)
    times = json.loads(out)
    return {"create_per_s": sizes.files / times["create_s"],
            "delete_per_s": sizes.files / times["delete_s"]}


def files_worker(directory: str, count: str, size: str) -> int:
    """Child process of create_delete: create `count` files (open/write/close), then unlink."""
    root = Path(directory)
    root.mkdir()
    payload = os.urandom(int(size))
    paths = [str(root / f"f{i:06d}") for i in range(int(count))]
    t0 = time.perf_counter()
    for p in paths:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, payload)
        finally:
            os.close(fd)
    t1 = time.perf_counter()
    for p in paths:
        os.unlink(p)
    t2 = time.perf_counter()
    root.rmdir()
    print(json.dumps({"create_s": t1 - t0, "delete_s": t2 - t1}))
    return 0


def check_replica(target: Target, name: str, expected_size: int) -> None:
    """Warn when the replica does not show the file the primary just wrote, at full size."""
    if target.replica_dir is None:
        return
    try:
        size = int(run(["stat", "-c", "%s", str(target.replica_dir / name)],
                       timeout=SYSTEM_TIMEOUT_S))
    except (BenchError, ValueError) as e:
        log.warning("replica check of %s failed: %s", name, e)
        return
    if size != expected_size:
        log.warning("replica shows %s with %d bytes, primary wrote %d", name, size, expected_size)


def run_workloads(target: Target, sizes: Sizes) -> dict[str, float | None]:
    results: dict[str, float | None] = {}
    seq_file = target.workdir / "seq.dat"
    log.info("%s: sequential write", target.name)
    results.update(seq_write(seq_file, sizes))
    check_replica(target, seq_file.name, sizes.seq_mib * MiB)
    log.info("%s: sequential read, cold cache", target.name)
    results.update(seq_read_cold(seq_file, sizes))
    log.info("%s: 4 KiB random write + fsync", target.name)
    results.update(rand_write_fsync(target.workdir / "rand.dat", sizes))
    log.info("%s: create / delete %d files", target.name, sizes.files)
    results.update(create_delete(target.workdir, sizes))
    return results


def bench_target(name: str, home: Path, cli: list[str], sizes: Sizes) -> dict:
    """One round on one target: set up, run every workload while sampling RSS, tear down."""
    try:
        with open_target(name, home, cli) as target, RssSampler(target.agents) as rss:
            metrics = run_workloads(target, sizes)
        metrics.update(rss.metrics())
        return {"metrics": metrics, "agents": rss.per_agent(), "error": None}
    except (BenchError, OSError) as e:
        log.error("%s failed: %s", name, e)
        return {"metrics": {}, "agents": {}, "error": str(e)}
    finally:
        remove_tree(home)


# --- summary and report -------------------------------------------------------------------

def summarize(rounds: list[dict], targets: list[str], keys: list[str]) -> dict:
    """{target: {metric: {median, min, max, values}}} over the rounds that produced a value."""
    summary: dict = {}
    for t in targets:
        summary[t] = {}
        for k in keys:
            values = [r["results"][t]["metrics"].get(k) for r in rounds]
            values = [v for v in values if v is not None]
            summary[t][k] = ({"median": statistics.median(values), "min": min(values),
                              "max": max(values), "values": values} if values else None)
    return summary


def ratios(summary: dict, keys: list[str]) -> dict:
    """Median of each target over median of local, per metric, where both exist."""
    base = summary.get("local", {})
    out: dict = {}
    for t, stats in summary.items():
        if t == "local":
            continue
        out[t] = {}
        for k in keys:
            ok = stats.get(k) and base.get(k) and base[k]["median"]
            out[t][k] = stats[k]["median"] / base[k]["median"] if ok else None
    return out


def verdicts(summary: dict, ratio: dict) -> list[dict]:
    """PASS/MISS of the replicated pair against the goals; n/a where a figure is missing."""
    pair = ratio.get("pair", {})
    out = []
    for g in GOALS:
        r = pair.get(g.metric)
        out.append({"goal": g.label, "value": r, "limit": f">= {g.min_ratio}x local",
                    "verdict": "n/a" if r is None else ("PASS" if r >= g.min_ratio else "MISS")})
    worst = [s["max"] for k in ("rss_peak_mib", "rss_hwm_mib")
             if (s := summary.get("pair", {}).get(k))]
    rss = max(worst) if worst else None
    out.append({"goal": "agent RSS (worst agent, worst round)", "value": rss,
                "limit": f"< {RSS_LIMIT_MIB:.0f} MiB",
                "verdict": "n/a" if rss is None else ("PASS" if rss < RSS_LIMIT_MIB else "MISS")})
    return out


def fmt(v: float | None) -> str:
    if v is None:
        return "—"
    return f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"


def render_table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for n, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:])]
        lines.append("  ".join(cells).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def report(result: dict) -> str:
    cfg = result["config"]
    sizes = Sizes(**cfg["sizes"])
    labels = metric_labels(sizes)
    targets = cfg["targets"]
    summary, ratio = result["summary"], result["ratios"]
    with_ratio = [t != "local" and "local" in targets for t in targets]
    header = ["median [min–max]"]
    for t, r in zip(targets, with_ratio):
        header += [t] + ([f"{t}/local"] if r else [])
    rows = [header]
    for key, label in labels.items():
        row = [label]
        for t, with_r in zip(targets, with_ratio):
            s = summary[t][key]
            row.append(f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]" if s else "—")
            if with_r:
                r = ratio[t][key]
                row.append("—" if r is None else f"{r:.2f}x")
        rows.append(row)
    lines = [
        f"fusemirror mount benchmark — {cfg['rounds']} round(s), targets {', '.join(targets)}, "
        f"{cfg['fio']}, kernel {cfg['kernel']}, {cfg['cpus']} CPUs",
        "",
        render_table(rows),
        "",
        "Goals for the replicated pair (ratios of medians to local):",
    ]
    for v in result["goals"]:
        value = "—" if v["value"] is None else (
            f"{v['value']:.0f} MiB" if "RSS" in v["goal"] else f"{v['value']:.2f}x")
        lines.append(f"  {v['verdict']:<4}  {v['goal']:<38} {value:>9}  (target {v['limit']})")
    failed = [(r["round"], t, e) for r in result["rounds"]
              for t, res in r["results"].items() if (e := res["error"])]
    for rnd, t, e in failed:
        lines.append(f"  FAILED round {rnd} {t}: {e[:300]}")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.bench_mount",
                                description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="rounds (default 3); medians are reported")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: {QUICK_SIZES.seq_mib} MiB, {QUICK_SIZES.files} files, "
                        f"{QUICK_SIZES.rand_seconds} s of random writes")
    p.add_argument("--targets", default=",".join(TARGET_NAMES),
                   help="comma list of local,alone,pair (default: all three)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every number to FILE")
    p.add_argument("--fusemirror", metavar="CMD", default=None,
                   help="command to run the CLI (default: python -m cli.main in the repo root)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(args.targets) - set(TARGET_NAMES))
    if unknown or not args.targets or len(set(args.targets)) != len(args.targets):
        p.error(f"--targets takes distinct names among {', '.join(TARGET_NAMES)}")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    return args


def environment(args: argparse.Namespace, sizes: Sizes, cli: list[str]) -> dict:
    return {"rounds": args.rounds, "targets": args.targets, "quick": args.quick,
            "sizes": dataclasses.asdict(sizes), "cli": cli,
            "fio": run(["fio", "--version"], timeout=SYSTEM_TIMEOUT_S).strip(),
            "kernel": platform.release(), "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def run_bench(args: argparse.Namespace, scratch: Path) -> dict:
    sizes = QUICK_SIZES if args.quick else FULL_SIZES
    cli = shlex.split(args.fusemirror) if args.fusemirror else [sys.executable, "-m", "cli.main"]
    config = environment(args, sizes, cli)
    rounds = []
    for n in range(args.rounds):
        k = n % len(args.targets)
        order = args.targets[k:] + args.targets[:k]
        log.info("round %d/%d, order %s", n + 1, args.rounds, ", ".join(order))
        results = {t: bench_target(t, scratch / f"round{n + 1}-{t}", cli, sizes) for t in order}
        rounds.append({"round": n + 1, "order": order, "results": results})
    keys = list(metric_labels(sizes))
    summary = summarize(rounds, args.targets, keys)
    ratio = ratios(summary, keys)
    return {"config": config, "rounds": rounds, "summary": summary, "ratios": ratio,
            "goals": verdicts(summary, ratio)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_files"]:
        return files_worker(*argv[1:])
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.error("run as root: the bench mounts, and drops the page cache")
        return 2
    if shutil.which("fio") is None:
        log.error("fio is not installed (apt-get install fio)")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    scratch = Path(tempfile.mkdtemp(prefix="fusemirror-bench.", dir="/var/tmp"))
    log.info("scratch directory %s", scratch)
    try:
        result = run_bench(args, scratch)
    except KeyboardInterrupt:
        log.error("interrupted; everything started was stopped")
        return 130
    finally:
        remove_tree(scratch)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    print(report(result))
    failed = any(res["error"] for r in result["rounds"] for res in r["results"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
