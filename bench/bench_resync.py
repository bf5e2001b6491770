"""Benchmark of reintegration (issue 4): what a returning replica costs on the network and in time.

A primary (``--on-peer-loss alone``) and a replica are mounted on loopback. A tree of
``--size-mib`` (default 2 GiB; 256 MiB with ``--quick``) is written through the primary:
twelve large files (3/4 of the bytes; 128 MiB each at 2 GiB) and files of 4–128 KiB in
nested directories, random data so compression does not flatter the figures. Then:

1. fast reintegration: the replica is unmounted, about 1% of the tree's bytes are rewritten
   through the primary (writes of 64 KiB–1 MiB at random offsets of files drawn in
   proportion to their size; a write never extends a file), the replica is mounted again
   and ``fusemirror role PRIMARY primary --peer ...`` reconnects it; the primary
   resynchronises it in the background. Target: file data sent <= 1.1x the modified
   bytes (plus metadata, reported apart);
2. full reintegration of identical trees: ``fusemirror resync PRIMARY [--full]`` on the
   connected pair, after ``verify`` found both copies equal. Targets: all frames sent
   < 1% of the tree; tree bytes / time >= 400 MiB/s;
3. full reintegration after 1% of changes: as 1; when the automatic resync is fast (3a),
   the step is repeated with one more change while the replica is away: a directory renamed
   away and back (a moved directory makes the journal ask for a full resynchronisation;
   the tree ends as it was). Deleting the journal file does not do it: the running agent
   keeps its journal in memory. Target: all frames sent <= 3% of the tree.

Before each timed step the page cache, dentries and inodes are dropped, and the agents'
peak RSS (VmHWM) is reset (``clear_refs``) so the peak reported is the step's. Time is
measured from the command to the first status poll (every 50 ms, on the control socket)
showing the link ``connected`` and the new resync ``done``: with bare mounts that is the
moment the replica would be SECOND (Ready). Bytes come from the primary's status (every
frame it sent on the link, ``mirror.bytes``; file data in PUT frames, ``resync.bytes_sent``)
and, independently, from the kernel's TCP counters of the replica's sockets (``ss -ti``:
payload bytes each way). At the end ``fusemirror verify`` must report both copies identical.

Run as root from the repository root::

    .venv/bin/python -m bench.bench_resync [--quick | --size-mib N] [--seed N] [--json FILE]

Workloads run in child processes with time limits, so a hung mount cannot hang the bench;
every agent is stopped by PID, every mount undone and the scratch directory removed in
``finally`` blocks, on failure and ^C too.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import json
import logging
import math
import os
import platform
import random
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import bench_mount as bm
from bench.bench_mount import BenchError, MiB, run
from fusemirror import control

log = logging.getLogger(__name__)

KiB = 1 << 10
LOOPBACK = "127.0.0.1"
AGENT_TIMEOUT_S = 5                # --timeout of both agents
POLL_S = 0.05
WAIT_RESYNC_S = 600                # default limit of a wait for "connected"
NO_RESYNC_S = 15                   # link connected but no new resync: give up after this
PEER_LOSS_S = 30                   # the primary notices the replica is gone
STATUS_TIMEOUT_S = 15
CLI_TIMEOUT_S = 120
VERIFY_TIMEOUT_S = 1800
MODIFY_TIMEOUT_S = 900
MAX_WRITES = 1_000_000
LARGE_FILES = 12
LARGE_SHARE = 0.75
SMALL_MIN, SMALL_MAX = 4 * KiB, 128 * KiB
FILES_PER_DIR = 64
MOVED_DIR = "small/a00"            # renamed away and back to make the next resync full
EXPECTED_LOG = re.compile(r"OUT OF DATE")    # the primary's lines when the replica is stopped
WRITE_MIN, WRITE_MAX = 64 * KiB, 1 * MiB
POOL_BYTES = 32 * MiB
CHUNK = 1 * MiB
FULL_SIZE_MIB, QUICK_SIZE_MIB, MIN_SIZE_MIB = 2048, 256, 64
try:                               # the unit a resync compares and sends
    from fusemirror.resync import BLOCK as RESYNC_BLOCK
except ImportError:                # pragma: no cover - an older tree
    RESYNC_BLOCK = 32 * KiB

FAST_DATA_MAX = 1.1                # file data sent / modified bytes
IDENTICAL_FRAMES_MAX = 0.01        # all frames / tree, full resync of equal trees
HASH_RATE_MIN = 400 * MiB          # tree bytes / s, full resync of equal trees
FULL_FRAMES_MAX = 0.03             # all frames / tree, full resync after 1% of changes


# --- workload, in child processes -----------------------------------------------------------

def tree_plan(size: int, seed: int) -> list[tuple[str, int]]:
    """(relative path, size) of every file of the tree; sizes add up to `size` exactly."""
    rng = random.Random(f"tree-{seed}")
    large = (int(size * LARGE_SHARE) // LARGE_FILES) // MiB * MiB
    files = [(f"large/L{i:02d}.bin", large) for i in range(LARGE_FILES)]
    left = size - large * LARGE_FILES
    small = []
    while left > 0:
        n = left if left <= SMALL_MAX else rng.randint(SMALL_MIN, min(SMALL_MAX, left))
        small.append(n)
        left -= n
    leaves = max(1, math.ceil(len(small) / FILES_PER_DIR))
    fan = math.ceil(math.sqrt(leaves))
    for i, n in enumerate(small):
        leaf = i % leaves
        files.append((f"small/a{leaf // fan:02d}/b{leaf % fan:02d}/f{i:06d}.bin", n))
    return files


def write_tree(root: str, size_mib: str, seed: str) -> int:
    """Child process: write the tree under root; print what was written as JSON."""
    plan = tree_plan(int(size_mib) * MiB, int(seed))
    rng = random.Random(f"data-{seed}")
    pool = memoryview(os.urandom(POOL_BYTES))
    t0 = time.perf_counter()
    dirs = set()
    for i, (rel, n) in enumerate(plan):
        path = os.path.join(root, rel)
        parent = os.path.dirname(path)
        if parent not in dirs:
            os.makedirs(parent, exist_ok=True)
            dirs.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            for off in range(0, n, CHUNK):
                length = min(CHUNK, n - off)
                prefix = f"{i:08d}:{off:012d}:"[:length].encode()     # files and chunks differ
                start = rng.randrange(POOL_BYTES - length)
                os.writev(fd, [prefix, pool[start:start + length - len(prefix)]])
        finally:
            os.close(fd)
    os.sync()
    elapsed = time.perf_counter() - t0
    large = [n for rel, n in plan if rel.startswith("large/")]
    print(json.dumps({"bytes": sum(n for _, n in plan), "files": len(plan),
                      "large_files": len(large), "large_bytes": large[0] if large else 0,
                      "small_files": len(plan) - len(large),
                      "dirs": len(dirs), "seconds": elapsed}))
    return 0


def union_length(spans: list[list[int]]) -> int:
    """Bytes covered by the [start, end) spans, overlaps counted once."""
    total, end = 0, -1
    for a, b in sorted(spans):
        if a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def modify_tree(root: str, fraction: str, seed: str, move: str = "") -> int:
    """Child process: rewrite random ranges of random files under root until the bytes
    modified (overlaps once) reach `fraction` of the tree, then rename the directory `move`
    (relative to root) away and back if given; print the accounting as JSON."""
    rng = random.Random(f"modify-{seed}")
    files = []
    for top, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(top, name)
            files.append((path, os.stat(path).st_size))
    sizes = [n for _, n in files]
    tree = sum(sizes)
    goal = math.ceil(tree * float(fraction))
    cumulative, acc = [], 0
    for n in sizes:
        acc += n
        cumulative.append(acc)
    spans: dict[int, list[list[int]]] = {}
    modified = written = writes = 0
    t0 = time.perf_counter()
    while modified < goal and writes < MAX_WRITES:
        k = bisect.bisect_right(cumulative, rng.randrange(tree))   # drawn by size
        path, n = files[k]
        length = min(rng.randint(WRITE_MIN, WRITE_MAX), n, goal - modified + WRITE_MIN)
        off = rng.randint(0, n - length)
        fd = os.open(path, os.O_WRONLY)
        try:
            if os.pwrite(fd, os.urandom(length), off) != length:
                raise OSError(f"short write to {path}")
        finally:
            os.close(fd)
        mine = spans.setdefault(k, [])
        before = union_length(mine)
        mine.append([off, off + length])
        modified += union_length(mine) - before
        written += length
        writes += 1
    if move:
        os.rename(os.path.join(root, move), os.path.join(root, move + ".moved"))
        os.rename(os.path.join(root, move + ".moved"), os.path.join(root, move))
    os.sync()
    blocks = 0
    for k, mine in spans.items():
        n = sizes[k]
        bs = RESYNC_BLOCK
        touched = {b for a, e in mine for b in range(a // bs, (e - 1) // bs + 1)}
        blocks += sum(min(bs, n - b * bs) for b in touched)
    large = [k for k in spans if files[k][0].startswith(os.path.join(root, "large") + "/")]
    print(json.dumps({"tree_bytes": tree, "writes": writes, "files": len(spans),
                      "large_files": len(large), "written_bytes": written,
                      "modified_bytes": modified, "block_bytes": blocks,
                      "large_modified_bytes": sum(union_length(spans[k]) for k in large),
                      "moved_dir": move or None,
                      "seconds": time.perf_counter() - t0}))
    return 0


# --- measurements ---------------------------------------------------------------------------

def tcp_counters(port: int) -> dict[str, tuple[int, int]]:
    """{peer: (bytes received, bytes sent)} of the established TCP sockets whose local port
    is `port`: the replica's end of its links, so (primary -> replica, replica -> primary),
    TCP payload as the kernel counts it (tcp_info, through `ss -ti`)."""
    out = run(["ss", "-tinH", "state", "established", "(", "sport", "=", f":{port}", ")"],
              timeout=bm.SYSTEM_TIMEOUT_S)
    conns: dict[str, list[int]] = {}
    peer = None
    for line in out.splitlines():
        if line and not line[0].isspace():
            peer = line.split()[-1]
            conns[peer] = [0, 0]
        elif peer is not None:
            for i, key in enumerate(("bytes_received", "bytes_sent")):
                m = re.search(rf"\b{key}:(\d+)", line)
                if m:
                    conns[peer][i] = int(m.group(1))
    return {p: (c[0], c[1]) for p, c in conns.items()}


def tcp_delta(before: dict, after: dict) -> tuple[int, int]:
    """Bytes each way since `before`; a connection new since then counts from its start."""
    inbound = outbound = 0
    for peer, (r, s) in after.items():
        r0, s0 = before.get(peer, (0, 0))
        inbound += r - r0
        outbound += s - s0
    return inbound, outbound


def read_hwm_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def reset_hwm(pid: int) -> bool:
    """Reset the peak RSS of `pid` to its current RSS (clear_refs 5); False if refused."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError as e:
        log.warning("cannot reset the peak RSS of pid %d: %s", pid, e)
        return False


def cli_status(cmd: list[str], timeout: float) -> tuple[int, str, str]:
    """Run cmd; return (exit status, stdout, stderr); raise BenchError on timeout."""
    try:
        p = subprocess.run(cmd, cwd=bm.REPO_ROOT, capture_output=True, text=True,
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise BenchError(f"no answer within {timeout:.0f} s from: {shlex.join(cmd)}") from None
    return p.returncode, p.stdout, p.stderr


# --- the pair -------------------------------------------------------------------------------

class ResyncFailed(BenchError):
    """The resynchronisation failed or did not finish; the message says how."""


class Pair:
    """A primary (policy alone) and a replica on loopback, through the fusemirror CLI."""

    def __init__(self, home: Path, cli: list[str]):
        self.cli = cli
        self.secret = home / "secret"
        self.secret.write_bytes(os.urandom(32).hex().encode())
        self.secret.chmod(0o600)
        self.port = bm.free_port()
        self.address = f"{LOOPBACK}:{self.port}"
        self.replica = bm.Mount(cli, home / "replica", "replica")
        self.primary = bm.Mount(cli, home / "primary", "primary")

    def command(self, *args: str, timeout: float = CLI_TIMEOUT_S) -> str:
        return run([*self.cli, *args], timeout=timeout, cwd=bm.REPO_ROOT)

    def mount_replica(self) -> None:
        self.replica.mount("replica", "--listen", self.address, "--secret-file",
                           str(self.secret), "--timeout", str(AGENT_TIMEOUT_S))

    def mount_primary(self) -> None:
        self.primary.mount("primary", "--peer", self.address, "--secret-file", str(self.secret),
                           "--on-peer-loss", "alone", "--timeout", str(AGENT_TIMEOUT_S))

    def status(self, mount: bm.Mount | None = None) -> dict:
        mount = mount or self.primary
        try:
            return control.request(str(mount.dir), {"cmd": "status"}, STATUS_TIMEOUT_S)
        except control.ControlError as e:
            raise BenchError(f"{mount.label}: status: {e}") from None

    def stop_replica(self) -> None:
        """Unmount the replica and wait until the primary goes on alone."""
        self.command("umount", str(self.replica.dir))
        if self.replica.agent is not None and not self.replica.agent.wait_exit(
                bm.AGENT_EXIT_TIMEOUT_S):
            raise BenchError(f"replica agent pid {self.replica.agent.pid} still runs "
                             f"{bm.AGENT_EXIT_TIMEOUT_S} s after umount")
        if bm.is_mounted(self.replica.dir):
            raise BenchError(f"{self.replica.dir} still mounted after umount")
        deadline = time.monotonic() + PEER_LOSS_S
        while (link := (self.status().get("mirror") or {}).get("link")) == "connected":
            if time.monotonic() > deadline:
                log.warning("the primary still shows the link connected %d s after the "
                            "replica's umount; going on", PEER_LOSS_S)
                return
            time.sleep(POLL_S)
        log.info("replica stopped; the primary's link is %s", link)

    def agents(self) -> dict[str, int]:
        return {m.label: m.agent.pid for m in (self.primary, self.replica) if m.agent}

    def close(self) -> None:
        self.primary.unmount()
        self.replica.unmount()

    def log_excerpt(self, lines: int = 15) -> str:
        """The agents' last WARNING/ERROR lines and last lines, for a failure report."""
        out = []
        for m in (self.primary, self.replica):
            try:
                text = m.log_file.read_text(errors="replace").splitlines()
            except OSError:
                text = []
            bad = [line for line in text if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback",
                                                        line)]
            out.append(f"--- {m.label} agent log ({m.log_file}): last warnings/errors")
            out += bad[-lines:] or ["(none)"]
            out.append(f"--- {m.label} agent log: last {lines} lines")
            out += text[-lines:] or ["(empty)"]
        return "\n".join(out)


def wait_resynced(pair: Pair, previous: dict | None, t0: float, limit: float) -> dict:
    """Poll the primary until the link is connected and a resync other than `previous` is
    done; return that status, with `done_mono` and the (link, state) sequence seen."""
    deadline = t0 + limit
    seen: list[str] = []
    connected_since = None
    while True:
        st = pair.status()
        mirror, r = st.get("mirror") or {}, st.get("resync")
        new = r is not None and (previous is None or r.get("started") != previous.get("started"))
        now = time.monotonic()
        phase = f"{mirror.get('link')}/{r.get('state') if new else '-'}"
        if not seen or seen[-1] != phase:
            seen.append(phase)
        if new and (r.get("error") or r.get("state") == "failed"):
            raise ResyncFailed(f"the resynchronisation failed after {now - t0:.1f} s: "
                               f"{r.get('error')!r} (link {mirror.get('link')})")
        if mirror.get("link") == "connected":
            if new and r.get("state") == "done":
                return {**st, "done_mono": now, "done_wall": time.time(), "phases": seen}
            connected_since = connected_since or now
            if not new and now - connected_since > NO_RESYNC_S:
                raise ResyncFailed(f"the link is connected but no new resynchronisation "
                                   f"appeared in {NO_RESYNC_S} s")
        else:
            connected_since = None
        if now > deadline:
            raise ResyncFailed(f"not resynchronised {limit:g} s after the command: "
                               f"link {mirror.get('link')}, resync "
                               f"{json.dumps(r if new else None)}; phases {' > '.join(seen)}")
        time.sleep(POLL_S)


# --- scenarios ------------------------------------------------------------------------------

@dataclasses.dataclass
class Bench:
    pair: Pair
    fraction: float
    seed: int
    limit: float
    full_flag: bool             # `resync --full` exists
    modifications: int = 0

    def modify(self, move: str = "") -> dict:
        """Rewrite `fraction` of the tree through the primary (a child process), and
        rename the directory `move` away and back."""
        self.modifications += 1
        out = run([sys.executable, "-m", "bench.bench_resync", "_modify",
                   str(self.pair.primary.dir / "tree"), repr(self.fraction),
                   f"{self.seed}-{self.modifications}", move], timeout=MODIFY_TIMEOUT_S,
                  cwd=bm.REPO_ROOT)
        mod = json.loads(out)
        log.info("modified %d bytes in %d writes over %d files", mod["modified_bytes"],
                 mod["writes"], mod["files"])
        return mod

    def prepare(self) -> dict[str, bool]:
        """Drop the caches and reset the agents' peak RSS, just before a timed step."""
        bm.drop_caches()
        return {label: reset_hwm(pid) for label, pid in self.pair.agents().items()}

    def measure(self, args: list[str], before: dict | None, tcp_before: dict) -> dict:
        """Run the CLI command that starts a resync and wait for it: the step's figures."""
        pair = self.pair
        mirror_before = (before or {}).get("mirror") or {}
        t0 = time.monotonic()
        pair.command(*args)
        command_s = time.monotonic() - t0
        try:
            st = wait_resynced(pair, (before or {}).get("resync"), t0, self.limit)
        except ResyncFailed as e:
            raise ResyncFailed(f"{e}\n{pair.log_excerpt()}") from None
        tcp = tcp_delta(tcp_before, tcp_counters(pair.port))
        mirror, r = st["mirror"], st["resync"]
        same_link = mirror.get("session") == mirror_before.get("session")
        frames = mirror["bytes"] - (mirror_before.get("bytes", 0) if same_link else 0)
        hwm = {label: read_hwm_kib(pid) for label, pid in pair.agents().items()}
        shown = ["PRIMARY_DIR" if a == str(pair.primary.dir) else a for a in args]
        return {"command": shlex.join(["fusemirror", *shown]), "command_s": command_s,
                "time_s": st["done_mono"] - t0,
                "resync_s": st["done_wall"] - r["started"] if r.get("started") else None,
                "full": r.get("full"), "frames_bytes": frames, "same_link": same_link,
                "data_bytes": r.get("bytes_sent"), "tcp_to_replica": tcp[0],
                "tcp_from_replica": tcp[1], "phases": st["phases"],
                "resync": {k: v for k, v in r.items() if k != "started"},
                "hwm_mib": {k: (v / 1024 if v is not None else None) for k, v in hwm.items()}}

    def reintegrate(self, move: str = "") -> dict:
        """Stop the replica, modify (and move `move` away and back), remount it,
        reconnect; figures of the resync."""
        pair = self.pair
        pair.stop_replica()
        mod = self.modify(move)
        before = pair.status()
        pair.mount_replica()
        reset = self.prepare()
        fig = self.measure(["role", str(pair.primary.dir), "primary", "--peer", pair.address],
                           before, {})
        fig.update(modified=mod, hwm_reset=reset)
        return fig

    def identical(self) -> dict:
        """A full resync of the connected pair, whose copies are equal."""
        pair = self.pair
        args = ["resync", str(pair.primary.dir)] + (["--full"] if self.full_flag else [])
        reset = self.prepare()
        before = pair.status()
        fig = self.measure(args, before, tcp_counters(pair.port))
        fig.update(hwm_reset=reset)
        return fig


def verify(pair: Pair) -> dict:
    t0 = time.monotonic()
    rc, out, err = cli_status([*pair.cli, "verify", str(pair.primary.dir)], VERIFY_TIMEOUT_S)
    lines = (out + err).strip().splitlines()
    return {"exit": rc, "identical": rc == 0 and "identical" in out, "seconds":
            time.monotonic() - t0, "lines": len(lines), "output": lines[:30]}


def run_scenarios(b: Bench, result: dict) -> None:
    """Scenarios 1 to 3 in order; each one's figures go into result["scenarios"] at once."""
    sc = result["scenarios"]
    log.info("scenario 1: fast reintegration after %.2g%% of changes", b.fraction * 100)
    sc["fast"] = b.reintegrate()
    result["verify_after_1"] = v = verify(b.pair)
    if not v["identical"]:
        raise BenchError("verify after scenario 1 found differences: "
                         + "; ".join(v["output"][:10]))
    log.info("scenario 2: full reintegration of identical trees")
    sc["identical"] = b.identical()
    log.info("scenario 3: full reintegration after %.2g%% of changes", b.fraction * 100)
    first = b.reintegrate()
    if first.get("full"):
        sc["full"] = first
        return
    sc["full_auto"] = first
    log.info("scenario 3: the automatic resync was fast; again with %s moved away and back",
             MOVED_DIR)
    sc["full"] = b.reintegrate(move=MOVED_DIR)


# --- report ---------------------------------------------------------------------------------

def num(v: float | None) -> str:
    return "—" if v is None else f"{v:,.0f}"


def mib(v: float | None) -> str:
    return "—" if v is None else f"{v / MiB:,.2f} MiB"


def share(v: float | None) -> str:
    """A fraction as a percentage with three significant digits (0.000376%, 1.05%)."""
    return "—" if v is None else f"{v * 100:.3g}%"


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def scenario_rows(fig: dict, tree: int) -> list[tuple[str, str]]:
    """(label, value) rows of one step's table."""
    r, mod = fig["resync"], fig.get("modified")
    base = mod["modified_bytes"] if mod else tree
    data, frames = fig.get("data_bytes"), fig["frames_bytes"]
    to_peer, from_peer = fig["tcp_to_replica"], fig["tcp_from_replica"]
    rows = [("command", fig["command"]),
            ("resync that ran (status resync.full)",
             {True: "FULL", False: "fast", None: "unknown"}[fig.get("full")])]
    if mod:
        if mod.get("moved_dir"):
            rows.append(("also changed while the replica was away",
                         f"directory {mod['moved_dir']} renamed away and back"))
        rows += [("modified bytes (union of writes)",
                  f"{num(base)} ({mib(base)}, {base / tree:.2%} of the tree)"),
                 ("  writes / files touched (large files)",
                  f"{mod['writes']:,} / {mod['files']:,} ({mod['large_files']})"),
                 ("  share in large files", f"{mod['large_modified_bytes'] / base:.0%}"),
                 (f"  rounded out to {RESYNC_BLOCK // KiB} KiB blocks",
                  f"{num(mod['block_bytes'])} ({mod['block_bytes'] / base:.3f}x modified)")]
    against = (lambda v: f"{v / base:.3f}x modified, {share(v / tree)} of the tree") if mod \
        else (lambda v: f"{share(v / tree)} of the tree")
    rows += [("file data sent (resync.bytes_sent)",
              f"{num(data)} ({mib(data)}, {against(data or 0)})"),
             ("all frames primary→replica (mirror.bytes"
              + ("" if fig["same_link"] else ", new link") + ")",
              f"{num(frames)} ({mib(frames)}, {against(frames)})"),
             ("  metadata and protocol share of the frames",
              f"{(frames - (data or 0)) / frames:.2%}" if frames else "—"),
             ("TCP payload primary→replica (ss, replica's sockets)",
              f"{num(to_peer)} ({mib(to_peer)})"),
             ("TCP payload replica→primary (ss)", f"{num(from_peer)} ({mib(from_peer)})"),
             ("  both ways, share of the tree", share((to_peer + from_peer) / tree)),
             ("time: command → link connected, resync done (= SECOND Ready)",
              f"{fig['time_s']:.2f} s"),
             ("  the command itself", f"{fig['command_s']:.2f} s"),
             ("  resync start → done seen (status 'started')",
              "—" if fig["resync_s"] is None else f"{fig['resync_s']:.2f} s")]
    if fig.get("full"):
        rows.append(("tree bytes / time (hashing rate)",
                     f"{tree / fig['time_s'] / MiB:,.0f} MiB/s"))
    rows += [("items done / total", f"{num(r.get('items_done'))} / {num(r.get('items_total'))}"),
             ("bytes compared / total (resync.bytes_done)",
              f"{num(r.get('bytes_done'))} / {num(r.get('bytes_total'))}"),
             ("link phases seen (link/resync state)", " > ".join(fig["phases"])),
             ("agents' peak RSS in the step (VmHWM, "
              + ("reset before)" if all(fig["hwm_reset"].values()) else "since agent start)"),
              ", ".join(f"{k} {v:.1f} MiB" for k, v in fig["hwm_mib"].items() if v))]
    return rows


TITLES = {
    "fast": "1. Fast reintegration after {pct} of changes (replica unmounted, {pct} rewritten "
            "through the primary, replica mounted again, `role primary`)",
    "identical": "2. Full reintegration of identical trees (`resync` on the connected pair, "
                 "`verify` clean before)",
    "full_auto": "3a. Reintegration after another {pct} of changes, automatic (it ran fast; "
                 "repeated in 3 with a directory moved away and back as well)",
    "full": "3. Full reintegration after {pct} of changes",
}


def both_ways(fig: dict | None, tree: int) -> str:
    if not fig:
        return ""
    both = fig["tcp_to_replica"] + fig["tcp_from_replica"]
    return f"TCP payload both ways: {share(both / tree)}"


def goals(result: dict) -> list[dict]:
    sc, tree = result["scenarios"], result["setup"].get("bytes")
    out = []

    def goal(name: str, value: float | None, limit: str, ok: bool | None, shown: str,
             note: str = "") -> None:
        out.append({"goal": name, "value": value, "shown": shown, "limit": limit, "note": note,
                    "verdict": "n/a" if ok is None else "PASS" if ok else "MISS"})

    f = sc.get("fast")
    v = ratio(f.get("data_bytes"), f["modified"]["modified_bytes"]) if f else None
    ran_full = bool(f and f.get("full"))
    goal("fast: file data sent / modified bytes", v, f"<= {FAST_DATA_MAX}x, plus metadata",
         None if v is None or ran_full else v <= FAST_DATA_MAX,
         "—" if v is None else f"{v:.3f}x",
         "the automatic resync was FULL, not fast" if ran_full else "")
    i = sc.get("identical")
    v = ratio(i["frames_bytes"], tree) if i else None
    not_full = bool(i and i.get("full") is False)
    goal("full, identical trees: all frames / tree", v, f"< {IDENTICAL_FRAMES_MAX:.0%}",
         None if v is None or not_full else v < IDENTICAL_FRAMES_MAX,
         share(v),
         "the resync that ran was NOT full" if not_full else both_ways(i, tree))
    v = tree / i["time_s"] if i else None
    goal("full, identical trees: tree bytes / time", v, f">= {HASH_RATE_MIN // MiB} MiB/s",
         None if v is None or not_full else v >= HASH_RATE_MIN,
         "—" if v is None else f"{v / MiB:,.0f} MiB/s")
    g = sc.get("full")
    v = ratio(g["frames_bytes"], tree) if g else None
    not_full = bool(g and not g.get("full"))
    goal("full after changes: all frames / tree", v, f"<= {FULL_FRAMES_MAX:.0%}",
         None if v is None or not_full else v <= FULL_FRAMES_MAX,
         share(v),
         "the resync that ran was NOT full" if not_full else both_ways(g, tree))
    ver = result.get("verify")
    goal("both copies identical (`fusemirror verify`)", None, "exit 0, identical",
         None if ver is None else ver["identical"],
         "—" if ver is None else "identical" if ver["identical"] else f"exit {ver['exit']}")
    return out


def render(rows: list[tuple[str, str]], indent: str = "   ") -> list[str]:
    width = max(len(k) for k, _ in rows)
    return [f"{indent}{k:<{width}}  {v}" for k, v in rows]


def report(result: dict) -> str:
    cfg, setup = result["config"], result["setup"]
    pct = f"{cfg['fraction'] * 100:g}%"
    lines = [f"fusemirror reintegration benchmark — {cfg['started']}",
             f"machine: {cfg['cpus']} CPUs ({cfg['cpu_model']}), kernel {cfg['kernel']}, "
             f"Python {cfg['python']}; fusemirror {cfg['revision']}; scratch {cfg['scratch_fs']}",
             f"pair on loopback: replica --listen {LOOPBACK}, primary --on-peer-loss alone, "
             f"--timeout {AGENT_TIMEOUT_S}; `resync --full` "
             + ("available" if cfg["full_flag"] else "NOT available: plain `resync` used"),
             "caches dropped before each timed step (sync; echo 3 > /proc/sys/vm/drop_caches); "
             "status polled every 50 ms on the control socket"]
    if setup.get("bytes"):
        lines.append(
            f"tree: {mib(setup['bytes'])} in {setup['files']:,} files ({setup['large_files']} "
            f"of {setup['large_bytes'] // MiB} MiB, {setup['small_files']:,} of "
            f"{SMALL_MIN // KiB}–{SMALL_MAX // KiB} KiB in {setup['dirs']} directories), seed "
            f"{cfg['seed']}; written through the primary in {setup['seconds']:.1f} s "
            f"({setup['bytes'] / MiB / setup['seconds']:,.0f} MiB/s)")
    lines.append("")
    for key in ("fast", "identical", "full_auto", "full"):
        fig = result["scenarios"].get(key)
        if fig is None:
            continue
        lines.append(TITLES[key].format(pct=pct))
        lines += render(scenario_rows(fig, setup["bytes"]))
        lines.append("")
    for key, label in (("verify_after_1", "after scenario 1 (untimed)"),
                       ("verify", "at the end")):
        v = result.get(key)
        if v:
            lines.append(f"`fusemirror verify` {label}: exit {v['exit']}, "
                         f"{'identical' if v['identical'] else 'DIFFERENT'} ({v['seconds']:.1f} s)"
                         + "".join(f"\n   {line}" for line in v["output"]
                                   if not v["identical"]))
    lines += ["", "Targets:"]
    for g in result["goals"]:
        lines.append(f"  {g['verdict']:<4}  {g['goal']:<45} {g['shown']:>12}  "
                     f"(target {g['limit']})" + (f"  [{g['note']}]" if g["note"] else ""))
    if result.get("error"):
        lines += ["", "FAILED: " + result["error"]]
    lines.append("")
    for label, found in result.get("log_problems", {}).items():
        lines.append(f"{label} agent log: {found['expected']} line(s) saying the peer is OUT "
                     f"OF DATE (expected), {len(found['other'])} other WARNING/ERROR line(s)"
                     + (", the last ones:" if found["other"] else ""))
        lines += [f"   {line}" for line in found["other"][-8:]]
    return "\n".join(lines)


# --- main -----------------------------------------------------------------------------------

def environment(args: argparse.Namespace, size_mib: int, scratch: Path, cli: list[str]) -> dict:
    model = bm.cpu_model()
    rev = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=bm.REPO_ROOT,
                         capture_output=True, text=True).stdout.strip() or "unknown"
    fs = subprocess.run(["df", "--output=fstype", str(scratch)], capture_output=True,
                        text=True).stdout.split()
    rc, out, _ = cli_status([*cli, "resync", "--help"], CLI_TIMEOUT_S)
    return {"size_mib": size_mib, "seed": args.seed, "fraction": args.percent / 100,
            "quick": args.quick, "cpus": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "revision": rev, "scratch": str(scratch),
            "scratch_fs": f"{scratch.parent} ({fs[-1] if fs else '?'})",
            "full_flag": rc == 0 and "--full" in out, "resync_block": RESYNC_BLOCK,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def log_problems(pair: Pair) -> dict[str, dict]:
    """WARNING and worse lines of each agent's log: how many say the peer is out of date
    (expected: the bench stops the replica), and the others."""
    out = {}
    for m in (pair.primary, pair.replica):
        try:
            text = m.log_file.read_text(errors="replace").splitlines()
        except OSError:
            text = []
        bad = [line for line in text if re.search(r" (WARNING|ERROR|CRITICAL) |Traceback", line)]
        expected = [line for line in bad if EXPECTED_LOG.search(line)]
        out[m.label] = {"expected": len(expected),
                        "other": [line for line in bad if not EXPECTED_LOG.search(line)]}
    return out


def run_bench(args: argparse.Namespace, size_mib: int, scratch: Path) -> dict:
    cli = [sys.executable, "-m", "cli.main"]
    result: dict = {"config": environment(args, size_mib, scratch, cli), "setup": {},
                    "scenarios": {}, "error": None}
    pair = Pair(scratch, cli)
    try:
        pair.mount_replica()
        pair.mount_primary()
        log.info("writing the %d MiB tree through the primary", size_mib)
        out = run([sys.executable, "-m", "bench.bench_resync", "_tree",
                   str(pair.primary.dir / "tree"), str(size_mib), str(args.seed)],
                  timeout=300 + size_mib / 5, cwd=bm.REPO_ROOT)
        result["setup"] = json.loads(out)
        b = Bench(pair, args.percent / 100, args.seed, args.timeout,
                  result["config"]["full_flag"])
        try:
            run_scenarios(b, result)
        except (BenchError, OSError, ValueError) as e:
            log.error("%s", e)
            result["error"] = str(e)
        log.info("verify")
        result["verify"] = verify(pair)
    except (BenchError, OSError, ValueError) as e:
        log.error("%s", e)
        result["error"] = result["error"] or f"{e}\n{pair.log_excerpt()}"
    finally:
        result["log_problems"] = log_problems(pair)
        pair.close()
    result["goals"] = goals(result)
    return result


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_tree"]:
        return write_tree(*argv[1:])
    if argv[:1] == ["_modify"]:
        return modify_tree(*argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.bench_resync",
                                description=__doc__.split("\n")[0])
    p.add_argument("--size-mib", type=int, default=None,
                   help=f"size of the tree in MiB (default {FULL_SIZE_MIB})")
    p.add_argument("--quick", action="store_true", help=f"a {QUICK_SIZE_MIB} MiB tree")
    p.add_argument("--percent", type=float, default=1.0,
                   help="share of the tree's bytes modified, in %% (default 1)")
    p.add_argument("--seed", type=int, default=1, help="seed of the tree and changes (default 1)")
    p.add_argument("--timeout", type=float, default=WAIT_RESYNC_S,
                   help=f"limit of each wait for the link to be connected (default "
                        f"{WAIT_RESYNC_S} s)")
    p.add_argument("--json", type=Path, metavar="FILE", help="write every figure to FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    size_mib = args.size_mib or (QUICK_SIZE_MIB if args.quick else FULL_SIZE_MIB)
    if size_mib < MIN_SIZE_MIB:
        p.error(f"--size-mib must be at least {MIN_SIZE_MIB}")
    if not 0 < args.percent <= 50:
        p.error("--percent must be in (0, 50]")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.error("run as root: the bench mounts, and drops the page cache")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    scratch = Path(os.path.realpath(tempfile.mkdtemp(prefix="fusemirror-resync.",
                                                     dir="/var/tmp")))
    log.info("scratch directory %s", scratch)
    try:
        result = run_bench(args, size_mib, scratch)
    except KeyboardInterrupt:
        log.error("interrupted; everything started was stopped")
        return 130
    finally:
        bm.remove_tree(scratch)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    print(report(result))
    failed = result["error"] or not (result.get("verify") or {}).get("identical")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
