"""The driver of a chaos run (tests/chaos/run, docs/testing.md).

    result = Run(Options(minutes=1, seed=1)).execute()    # as root

Builds a lease-mode Cluster (two nodes, the client namespace, the lease witness there),
starts the module, then the workloads: the writer and the tree mutator (workloads.py, on
the host, writing through the mounts of the nodes that claim to be primary) and demo.client
through the VIP (in segments: one per interval between two checks). A poller reads both
controllers' state ten times a second, keeps a timeline of every change, and tells the
workloads which nodes claim PRIM or ALONE (the control file). The faults of the schedule run
one after the other while time remains: apply (and maybe a second, overlapping fault), hold,
heal, wait until one node is PRIM/ALONE Ready and the other SECOND Ready for SETTLE seconds,
then check (checker.py): the workloads pause, the client segment ends, the acknowledged
writes and requests are looked up on the primary, `verify` runs through the primary's agent
and SQLite's integrity_check on the primary's mount; then everything resumes.

Every wait has a time limit; every access to a mount from this process runs in a helper
thread with a time limit (a hung mount must not hang the run). Clean-up, whatever happened
(failure, ^C, SIGTERM): faults healed, workloads stopped by PID, the Cluster closed (daemons,
agents, applications, namespaces), the tmpfs folders unmounted, the scratch directory
removed once nothing is mounted below it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import platform
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from demo import client as C
from fusemirror import control
from fusemirror.lab.cluster import Cluster, remove_scratch

from . import checker, report
from .faults import Injector, NotApplicable
from .schedule import DEFAULT_CLASSES, PRIMARY, Fault, describe, draw
from .workloads import WRITER_FILE, NotMounted, open_on_mount

log = logging.getLogger("chaos")

HERE = os.path.dirname(os.path.abspath(__file__))
NODES = ("alpha", "beta")
POLL_S = 0.1
SETTLE_S = 1.5            # the stable roles must hold this long
STABLE_LIMIT_S = 90       # after the last heal, at most this long to be stable again
REMEDY_LIMIT_S = 60       # and after an admin remedy
START_LIMIT_S = 30
PAUSE_LIMIT_S = 30        # the workloads must pause within this
MOUNT_LIMIT_S = 60        # any read of a mount by the driver
CLIENT_STOP_S = 10
MIN_CYCLE_S = 6.0         # to size the schedule: a fault never takes less
END_MARGIN_S = 15.0       # no fault starts unless its hold ends this long before the end
LOGS = "/tmp/chaos-logs"
EVIDENCE_MAX = 2          # failing checks whose data are copied
# What a deployment of the sample application would configure: the application is
# restarted when /ready fails (its database unusable), up to 3 times a minute, then the
# module fails over.
CHECKER = """
[[checker]]
name = "app"
kind = "http"
url = "http://127.0.0.1:8080/ready"
interval = 0.5
timeout = 1.0
action = "restart"

[restart]
limit = 3
window = 60
"""


class Hung(Exception):
    pass


def bounded(fn, limit: float, what: str):
    """fn() in a helper thread; Hung if it takes longer than limit (the thread is left)."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:      # handed to the caller
            box["error"] = e

    t = threading.Thread(target=target, daemon=True, name=what)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise Hung(f"{what}: no answer within {limit:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


@dataclass
class Options:
    minutes: float = 1.0
    seed: int = 1
    classes: tuple[str, ...] = DEFAULT_CLASSES
    disk: bool = True
    proxy: bool = True
    checker: bool = True
    max_faults: int | None = None
    logs: str = LOGS
    keep_logs: bool = False


class ControlFile:
    """The workloads' control file (workloads.py), replaced atomically."""

    def __init__(self, path: str):
        self.path = path
        self.doc = {"targets": [], "pause": 0, "stop": False}
        self.lock = threading.Lock()
        self._write()

    def set(self, **changes) -> None:
        with self.lock:
            new = dict(self.doc, **changes)
            if new != self.doc:
                self.doc = new
                self._write()

    def _write(self) -> None:
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.doc, f)
        os.replace(tmp, self.path)


class Poller:
    """Both controllers' state, ten times a second, one thread per node. A controller that
    does not answer keeps its last known state (its agent may still be primary)."""

    def __init__(self, c: Cluster, ctl: ControlFile, timeline_path: str):
        self.c, self.ctl = c, ctl
        self.view: dict[str, dict | None] = {n: None for n in NODES}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.timeline: list[dict] = []
        self._out = open(timeline_path, "a", buffering=1)
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True,
                                         name=f"poll-{n}") for n in NODES]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)
        self._out.close()

    def snapshot(self) -> dict:
        with self.lock:
            return {n: dict(v) if v else None for n, v in self.view.items()}

    def _run(self, node: str) -> None:
        last = None
        while not self.stop.is_set():
            t = time.monotonic()
            try:
                me = self.c.request(node, {"cmd": "state"}, timeout=0.5)["me"]
                v = {k: me.get(k) for k in ("state", "readiness", "reason", "epoch",
                                            "uptodate", "diverged")}
                v.update(t=t, ok=True)
            except Exception as e:        # the poller must survive anything
                with self.lock:
                    v = dict(self.view[node] or {}, ok=False, error=str(e)[:200], t=t)
            with self.lock:
                self.view[node] = v
            key = (v.get("state"), v.get("readiness"), v.get("reason"), v.get("ok"))
            if key != last:
                last = key
                entry = {"t": t, "node": node, "state": v.get("state"),
                         "readiness": v.get("readiness"), "reason": v.get("reason"),
                         "epoch": v.get("epoch"), "answers": v["ok"]}
                self.timeline.append(entry)
                self._out.write(json.dumps(entry) + "\n")
            self._targets()
            self.stop.wait(POLL_S)

    def _targets(self) -> None:
        v = self.snapshot()
        claim = [n for n in NODES if v[n] and v[n].get("state") in ("PRIM", "ALONE")]
        claim.sort(key=lambda n: (not v[n].get("ok"), v[n].get("readiness") != "Ready"))
        self.ctl.set(targets=claim)


def roles_of(v: dict) -> tuple[str, str] | None:
    """(primary, secondary) when one node is PRIM/ALONE Ready and the other SECOND Ready."""
    prim = [n for n in NODES if v[n] and v[n].get("state") in ("PRIM", "ALONE")
            and v[n].get("readiness") == "Ready"]
    sec = [n for n in NODES if v[n] and v[n].get("state") == "SECOND"
           and v[n].get("readiness") == "Ready"]
    if len(prim) == 1 and len(sec) == 1 and prim != sec:
        return prim[0], sec[0]
    return None


class Run:
    def __init__(self, opts: Options):
        self.o = opts
        self.faults: list[dict] = []
        self.checks: list[dict] = []
        self.problems: list[str] = []
        self.crashes: list[dict] = []
        self.evidence_kept = 0
        self.segments: list[tuple[str, str]] = []    # (client name, log path)
        self.client: subprocess.Popen | None = None
        self.procs: dict[str, subprocess.Popen] = {}
        self.roles: tuple[str, str] = ("alpha", "beta")
        self.pause_gen = 0
        self.started = time.monotonic()

    # --- the whole run --------------------------------------------------------------------

    def execute(self) -> dict:
        o = self.o
        n = o.max_faults or math.ceil(o.minutes * 60 / MIN_CYCLE_S) + 5
        self.schedule = draw(o.seed, n, o.classes)
        print(f"chaos schedule: seed {o.seed}, {len(self.schedule)} faults drawn from "
              f"{len(o.classes)} classes (a run uses those that fit in {o.minutes:g} min)",
              flush=True)
        print(describe(self.schedule), flush=True)
        self.scratch = tempfile.mkdtemp(prefix="fusemirror-chaos.", dir="/var/tmp")
        os.chmod(self.scratch, 0o755)
        self.work = os.path.join(self.scratch, "chaos")
        os.makedirs(self.work)
        handler = logging.FileHandler(os.path.join(self.work, "harness.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        log.addHandler(handler)
        log.setLevel(min(log.getEffectiveLevel(), logging.INFO))
        with open(os.path.join(self.work, "schedule.txt"), "w") as f:
            f.write(describe(self.schedule) + "\n")
        error = None
        try:
            with contextlib.ExitStack() as stack:
                self._run(stack)
        except KeyboardInterrupt:
            error = "interrupted"
            raise
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            log.exception("the run failed")
            self.problems.append(f"harness: {error}")
        finally:
            log.removeHandler(handler)
            handler.close()
            result = self.result(error)
            if not result["passed"] or o.keep_logs:
                result["logs"] = self.keep_logs()
                result["text"] = report.text(result)
                if result["logs"]:
                    with open(os.path.join(result["logs"], "report.json"), "w") as f:
                        json.dump(result, f, indent=1, default=str)
                    with open(os.path.join(result["logs"], "report.txt"), "w") as f:
                        f.write(result["text"] + "\n")
            remove_scratch(self.scratch)
        return result

    def _run(self, stack: contextlib.ExitStack) -> None:
        o = self.o
        c = Cluster(self.scratch, witness="lease", checkers=CHECKER if o.checker else "")
        self.c = c
        inj = Injector(c, self.work, o.disk, o.proxy)
        self.inj = inj
        stack.callback(inj.unmount_tmpfs)               # after the cluster is closed
        if o.disk:
            inj.mount_tmpfs()
        stack.enter_context(c)
        stack.callback(self._stop_everything)           # before the cluster is closed
        log.info("lab %s, module %s, scratch %s", c.lab.prefix, c.module, self.scratch)
        if o.proxy:
            inj.start_proxies()
        self.ctl = ControlFile(os.path.join(self.work, "control.json"))
        self.poller = Poller(c, self.ctl, os.path.join(self.work, "timeline.jsonl"))
        c.start_witness()
        began = time.monotonic()
        c.start("alpha")
        c.start("beta")
        self.poller.start()
        stable, _ = self.settle(began, "start", START_LIMIT_S)
        if stable is None:
            raise RuntimeError("the cluster never had a primary and a Ready SECOND")
        primary = self.roles[0]
        bounded(lambda: os.makedirs(os.path.join(c.folder(primary), "chaos", "tree")),
                MOUNT_LIMIT_S, "mkdir chaos/tree")
        self.deadline = time.monotonic() + o.minutes * 60
        self._start_workloads()
        self._start_client()
        time.sleep(2)
        self.check("start")
        for f in self.schedule:
            left = self.deadline - time.monotonic()
            longest = max(f.hold, (f.second.offset + f.second.hold) if f.second else 0)
            if left < longest + END_MARGIN_S:
                break
            if not self.one_fault(f):
                break                    # the cluster did not recover: stop injecting
            time.sleep(f.gap)
        self.finish()

    # --- workloads ------------------------------------------------------------------------

    def _start_workloads(self) -> None:
        c, work = self.c, self.work
        limit = self.o.minutes * 60 + 300
        common = ["--control", self.ctl.path, "--duration", str(limit)]
        for n in NODES:
            common += ["--folder", f"{n}={c.folder(n)}"]
        for kind, extra in (("writer", []), ("mutator", ["--seed", str(self.o.seed)])):
            out = open(os.path.join(work, f"{kind}.out"), "ab")
            p = subprocess.Popen([sys.executable, os.path.join(HERE, "workloads.py"), kind,
                                  *common, "--log", os.path.join(work, f"{kind}.log"),
                                  "--ack", os.path.join(work, f"{kind}.ack"), *extra],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            out.close()
            c.pids.add(p.pid)
            self.procs[kind] = p

    def _start_client(self) -> None:
        name = f"client{len(self.segments) + 1}"
        left = max(self.deadline - time.monotonic(), 0) + 300
        p, path = self.c.client(name=name, duration=left, interval=0.02, timeout=1.0)
        self.client = p
        self.segments.append((name, path))

    def _stop_client(self) -> None:
        p, self.client = self.client, None
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=CLIENT_STOP_S)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=CLIENT_STOP_S)

    def pause(self) -> bool:
        """Pause the writer and the mutator; False when one did not within the limit."""
        self.pause_gen += 1
        gen = self.pause_gen
        self.ctl.set(pause=gen)
        deadline = time.monotonic() + PAUSE_LIMIT_S
        waiting = [k for k, p in self.procs.items() if p.poll() is None]
        while waiting and time.monotonic() < deadline:
            waiting = [k for k in waiting if self.procs[k].poll() is None
                       and _read_json(os.path.join(self.work, f"{k}.ack")).get("paused") != gen]
            time.sleep(0.02)
        return not waiting

    def resume(self) -> None:
        self.ctl.set(pause=0)

    def _stop_workloads(self) -> None:
        self.ctl.set(stop=True, pause=0)
        for kind, p in self.procs.items():
            try:
                p.wait(timeout=PAUSE_LIMIT_S)
            except subprocess.TimeoutExpired:
                self.problems.append(f"the {kind} did not stop within {PAUSE_LIMIT_S} s "
                                     f"(blocked in a system call?): killed")
                p.kill()
                p.wait(timeout=10)

    def _stop_everything(self) -> None:
        """Heal what is still broken and stop our processes (by PID) before the Cluster
        closes; runs whatever happened."""
        self.inj.heal_all()
        poller = getattr(self, "poller", None)
        if poller:
            poller.close()
        self._stop_client()
        ctl = getattr(self, "ctl", None)
        if ctl:
            ctl.set(stop=True, pause=0)
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=10)
        self.inj.stop_proxies()

    # --- one fault ------------------------------------------------------------------------

    def one_fault(self, f: Fault) -> bool:
        primary, secondary = self.roles
        pair = [f] + ([f.second] if f.second else [])
        events = [(0.0, 0, "apply", f), (f.hold, 1, "heal", f)]
        if f.second:
            s = f.second
            events += [(s.offset, 0, "apply", s), (s.offset + s.hold, 1, "heal", s)]
        events.sort(key=lambda e: (e[0], e[1]))
        recs = {id(x): self._record(x, primary, secondary, overlapping=bool(f.second),
                                    second=x is not f) for x in pair}
        heals: dict[int, callable] = {}
        t0 = time.monotonic()
        log.info("fault %s", f.describe().replace("\n", " "))
        for dt, _, kind, x in events:
            while time.monotonic() < t0 + dt:
                self.watchdog()
                time.sleep(min(0.2, max(t0 + dt - time.monotonic(), 0)))
            rec = recs[id(x)]
            node, other = rec["node"], rec["other"]
            if kind == "apply":
                rec["applied"] = time.monotonic()
                try:
                    heals[id(x)], rec["notes"] = self.inj.apply(x, node, other)
                except NotApplicable as e:
                    rec["skipped"] = str(e)
                    log.info("  %s skipped: %s", x.key, e)
                except Exception as e:
                    rec["error"] = f"apply: {type(e).__name__}: {e}"
                    log.error("  %s on %s: %s", x.key, node, rec["error"])
                else:
                    log.info("  applied %s on %s %s", x.key, node, rec["notes"] or "")
            elif id(x) in heals:
                try:
                    heals[id(x)]()
                except Exception as e:
                    rec["error"] = f"heal: {type(e).__name__}: {e}"
                    log.error("  healing %s on %s: %s", x.key, node, rec["error"])
                rec["healed"] = time.monotonic()
        self.inj.down.clear()          # every fault of the pair is healed (or failed)
        healed = max((r.get("healed") or r.get("applied") or t0) for r in recs.values())
        label = f"fault #{f.index} ({' + '.join(x.key for x in pair)})"
        stable, remedy = self.settle(healed, label, STABLE_LIMIT_S)
        for x in pair:
            rec = recs[id(x)]
            if x.cls == "corrupt-frame" and rec["notes"]:
                rec["notes"]["corruptions"] = (self.inj.corruptions(rec["node"])
                                               - rec["notes"]["corruptions_before"])
            rec["stable"] = stable
            rec["remedy"] = remedy
            rec["reintegration_s"] = (None if stable is None or remedy
                                      else max(stable - healed, 0.0))
            if stable is None or remedy:
                rec["error"] = rec["error"] or ("not stable after heal" if stable is None else
                                                f"stable only after the admin's {remedy}")
            self.faults.append(rec)
        if stable is None:
            return False
        log.info("  stable after %.1f s: %s PRIM/ALONE, %s SECOND", stable - healed,
                 *self.roles)
        self.check(f"after fault #{f.index}")
        return True

    def settle(self, since: float, label: str, limit: float):
        """Wait for stable roles; when they do not come, record the problem, try the
        documented admin remedy once and wait again. (stable since or None, remedy)."""
        stable, roles, view = self.wait_stable(since, limit)
        if stable is not None:
            self.roles = roles
            return stable, None
        msg = (f"{label}: not stable {limit:g} s after the heal: "
               + "; ".join(f"{n} {_brief(view[n])}" for n in NODES))
        log.error(msg)
        self.problems.append(msg)
        remedy = self.remedy(view)
        if remedy is None:
            return None, None
        log.warning("  admin remedy: %s", remedy)
        stable, roles, view = self.wait_stable(time.monotonic(), REMEDY_LIMIT_S)
        if stable is None:
            self.problems.append(f"{label}: still not stable {REMEDY_LIMIT_S} s after "
                                 f"{remedy}: " + "; ".join(f"{n} {_brief(view[n])}"
                                                           for n in NODES))
            return None, remedy
        self.roles = roles
        self.problems.append(f"{label}: stable again after the admin's {remedy}")
        return stable, remedy

    def watchdog(self) -> None:
        """Like systemd's Restart=always: a controller that exited although no fault
        stopped it is a problem, and it is started again at once."""
        c = self.c
        for n in NODES:
            d = c.daemons.get(n)
            if d is None or d.poll() is None or n in self.inj.down:
                continue
            why = last_exception(os.path.join(c.log_dir, f"{n}.daemon.stderr"))
            msg = f"the controller of {n} exited with {d.returncode} by itself: {why}"
            log.error("  %s; starting it again", msg)
            self.problems.append(msg)
            self.crashes.append({"t": time.monotonic(), "node": n, "exit": d.returncode,
                                 "why": why})
            try:
                c.start(n, timeout=60)
            except Exception as e:
                self.problems.append(f"starting the controller of {n} again: {e}")

    def remedy(self, v: dict) -> str | None:
        """What an admin would do, following docs/cluster.md; None when nothing applies."""
        c = self.c
        for n in NODES:
            d = c.daemons.get(n)
            if d is not None and d.poll() is not None:
                c.start(n, timeout=60)
                return f"start of {n}'s controller (it had exited with {d.returncode})"
        prim = [n for n in NODES if v[n] and v[n].get("state") in ("PRIM", "ALONE")
                and v[n].get("readiness") == "Ready"]
        stuck = [n for n in NODES if v[n] and v[n].get("state") == "SECOND"
                 and v[n].get("readiness") == "NotReady"
                 and "out of date" in (v[n].get("reason") or "")]
        if len(prim) == 1 and stuck:
            p = c.command(prim[0], "resync", check=False)
            return (f"`fusemirror resync` on {prim[0]} ({stuck[0]} stuck SECOND NotReady: "
                    f"copy out of date; exit {p.returncode})")
        # a split brain: the admin keeps the node that serves (docs/cluster.md, resolve)
        split = [n for n in NODES if v[n] and "split brain" in (v[n].get("reason") or "")]
        if len(prim) == 1 and split and prim[0] not in split:
            p = c.command(split[0], "resolve", "--keep", prim[0], check=False)
            return (f"`fusemirror resolve --keep {prim[0]}` on {split[0]} ({v[split[0]]['reason']};"
                    f" exit {p.returncode}: {' '.join((p.stdout + p.stderr).split())[:200]})")
        # "make this node primary when the cluster cannot decide (... a failed start)":
        # the node that has the newest writes, if one says so
        waiting = [n for n in NODES if v[n] and v[n].get("state") == "WAIT"]
        if not prim and waiting:
            newest = [n for n in waiting if f"{n} has writes" in (v[n].get("reason") or "")]
            failed = [n for n in waiting if "start_prim failed" in (v[n].get("reason") or "")]
            for n in newest or failed:
                p = c.command(n, "prim", check=False)
                return (f"`fusemirror prim` on {n} (both WAIT: {v[n].get('reason')}; exit "
                        f"{p.returncode}: {' '.join((p.stdout + p.stderr).split())[:200]})")
        return None

    @staticmethod
    def _record(x: Fault, primary: str, secondary: str, overlapping: bool,
                second: bool) -> dict:
        node = primary if x.role == PRIMARY else secondary
        return {"index": x.index, "class": x.cls, "role": x.role, "key": x.key,
                "second": second, "overlapping": overlapping, "node": node,
                "other": secondary if node == primary else primary, "hold": x.hold,
                "applied": None, "healed": None, "notes": {}, "skipped": None,
                "error": None, "remedy": None}

    def wait_stable(self, since: float, limit: float):
        """(stable since, (primary, secondary), last view); stable is None on timeout."""
        deadline = time.monotonic() + limit
        start, roles = None, None
        v = self.poller.snapshot()
        while time.monotonic() < deadline:
            self.watchdog()
            v = self.poller.snapshot()
            fresh = all(v[n] and v[n].get("ok") and v[n]["t"] >= since for n in NODES)
            now_roles = roles_of(v) if fresh else None
            if now_roles and now_roles == roles:
                if time.monotonic() - start >= SETTLE_S:
                    for n in NODES:
                        with contextlib.suppress(Exception):
                            self.c.remember_pids(n)
                    return start, roles, v
            elif now_roles:
                start, roles = time.monotonic(), now_roles
            else:
                start, roles = None, None
            time.sleep(0.05)
        return None, None, v

    # --- checks ---------------------------------------------------------------------------

    def check(self, label: str, final: bool = False) -> dict:
        """The invariants, on the primary of the current roles (they are stable now)."""
        primary, secondary = self.roles
        res = {"label": label, "t": time.monotonic(), "primary": primary, "problems": []}
        problems = res["problems"]
        paused = True
        if not final:
            paused = self.pause()
            if not paused:
                problems.append(f"the workloads did not pause within {PAUSE_LIMIT_S} s")
            self._stop_client()
        try:
            self._checks(res, primary, secondary, paused)
        finally:
            if not final:
                self.resume()
                self._start_client()
        res["ok"] = not problems
        self.checks.append(res)
        for p in problems:
            self.problems.append(f"{label}: {p}")
            log.error("  check %s: %s", label, p)
        if not problems:
            log.info("  check %s: ok (writer %d acknowledged, client %d)", label,
                     res.get("writer", {}).get("acked", 0), res.get("client", {}).get("acked", 0))
        return res

    def _checks(self, res: dict, primary: str, secondary: str, paused: bool) -> None:
        problems = res["problems"]
        try:
            self._check_data(res, primary, secondary)
        except Exception as e:
            problems.append(f"checking the data failed: {type(e).__name__}: {e}")
        try:
            if paused:
                self._check_copies(res, primary)
        except Exception as e:
            problems.append(f"checking the copies failed: {type(e).__name__}: {e}")
        try:
            self._check_app_files(res, primary)
        except Exception as e:
            problems.append(f"checking the application's files failed: "
                            f"{type(e).__name__}: {e}")
        if problems and self.evidence_kept < EVIDENCE_MAX:
            self.evidence_kept += 1
            res["evidence"] = self.keep_evidence(res["label"], primary)

    def _check_data(self, res: dict, primary: str, secondary: str) -> None:
        c, problems = self.c, res["problems"]
        entries = checker.read_jsonl(os.path.join(self.work, "writer.log"))
        acked_requests = self.acknowledged_requests()
        folder = c.folder(primary)

        def read_history() -> str:
            fd = open_on_mount(folder, WRITER_FILE, os.O_RDONLY)
            with os.fdopen(fd, errors="replace") as f:
                return f.read()

        try:
            history = bounded(read_history, MOUNT_LIMIT_S, f"reading {primary}'s writer.log")
        except NotMounted:
            problems.append(f"{primary}'s folder is not mounted")
            history = ""
        except FileNotFoundError:
            history = ""
        q_seqs, q_rows = checker.quarantined_records([c.folder(n) for n in NODES])
        w = checker.check_writer(entries, history, q_seqs)
        res["writer"] = w.to_json()
        db = os.path.join(folder, "records.db")
        try:
            rows = bounded(lambda: checker.read_rows(db), MOUNT_LIMIT_S, "reading records.db")
        except sqlite3.Error as e:
            problems.append(f"cannot read {primary}'s records.db: {_sqlite_error(e, db)}")
            rows = None
        if rows is not None:
            cl = checker.check_client(acked_requests, rows, q_rows)
            res["client"] = cl.to_json()
        else:
            cl = None
            res["client"] = {"acked": len(acked_requests), "error": "database unreadable"}
        if w.lost:
            problems.append(f"{len(w.lost)} acknowledged writer records lost: {w.lost[:10]}")
        if w.quarantined:
            problems.append(f"{len(w.quarantined)} acknowledged writer records only in "
                            f"quarantine (lease mode: never expected): {w.quarantined[:10]}")
        if w.dual:
            problems.append(f"{len(w.dual)} dual-writer window(s): {w.dual[:3]}")
        if w.order:
            problems.append(f"{len(w.order)} order violations in the history: {w.order[:5]}")
        if w.malformed:
            problems.append(f"{w.malformed} malformed lines in {primary}'s writer.log")
        if cl and cl.lost:
            problems.append(f"{len(cl.lost)} acknowledged requests lost: {cl.lost[:5]}")
        if cl and cl.quarantined:
            problems.append(f"{len(cl.quarantined)} acknowledged requests only in quarantine")

    def _check_copies(self, res: dict, primary: str) -> None:
        """verify through the primary's agent (it must be PRIM) and integrity_check."""
        c, problems = self.c, res["problems"]
        deadline = time.monotonic() + 20
        while self.poller.snapshot()[primary].get("state") != "PRIM":
            if time.monotonic() > deadline:
                res["verify"] = "skipped: the primary is not PRIM (no SECOND attached)"
                break
            time.sleep(0.1)
        else:
            diffs = None
            for attempt in range(2):
                try:
                    answer = c.agent(primary, {"cmd": "verify"}, timeout=60)
                    diffs = answer.get("differences")
                    if diffs is None:
                        diffs = [f"verify refused: {answer.get('error')}"]
                except control.ControlError as e:
                    diffs = [f"verify failed: {e}"]
                if not diffs:
                    break
                time.sleep(2)
            res["verify"] = diffs
            if diffs:
                problems.append(f"verify through {primary}'s agent: {diffs[:5]}")
        db = os.path.join(c.folder(primary), "records.db")
        try:
            res["integrity"] = bounded(lambda: checker.integrity(db), MOUNT_LIMIT_S,
                                       "integrity_check")
        except sqlite3.Error as e:
            res["integrity"] = [f"sqlite: {_sqlite_error(e, db)}"]
        if res["integrity"] != ["ok"]:
            problems.append(f"integrity_check on {primary}: {res['integrity'][:5]}")

    def _check_app_files(self, res: dict, primary: str) -> None:
        """The application's open files in the folder must be open through the mount, not
        on the bare folder below it (where writes are not replicated)."""
        c = self.c
        pid = c.app_pid(primary)
        if pid is None:
            res["app_files"] = "no application pid"
            return
        folder = os.path.realpath(c.folder(primary))
        bare = os.stat(os.path.dirname(folder)).st_dev
        mounted = bounded(lambda: os.stat(folder).st_dev, MOUNT_LIMIT_S, "stat of the mount")
        seen, wrong = [], []
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            res["app_files"] = f"application {pid} is gone"
            return
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if not target.startswith(folder + "/"):
                continue
            try:
                dev = bounded(lambda: os.stat(f"/proc/{pid}/fd/{fd}").st_dev, 10, "stat fd")
            except OSError as e:
                wrong.append(f"{target}: {e.strerror} (a dead mount)")
                continue
            seen.append(target)
            if dev == bare or dev != mounted:
                wrong.append(f"{target} (fd {fd}) is open on the "
                             + ("bare folder below the mount" if dev == bare
                                else "another filesystem"))
        res["app_files"] = {"pid": pid, "open": seen, "wrong": wrong}
        if wrong:
            res["problems"].append(f"the application (pid {pid}) on {primary} writes beside "
                                   f"the mount: {wrong[:4]}")

    def keep_evidence(self, label: str, primary: str) -> str:
        """Copies, for the other engineer: the primary's files as its mount shows them and
        both nodes' backing folders (through their agents' descriptors)."""
        c = self.c
        dest = os.path.join(self.work, f"evidence-{self.evidence_kept}")
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "label"), "w") as f:
            f.write(f"{label}; primary {primary}\n")
        sources = [(f"mount-{primary}", c.folder(primary))]
        for n in NODES:
            b = backing_path(c, n)
            if b:
                sources.append((f"backing-{n}", b))
        for name, src in sources:
            def copy(src=src, name=name):
                shutil.copytree(src, os.path.join(dest, name), symlinks=True,
                                dirs_exist_ok=True, ignore=shutil.ignore_patterns("tree"))
            try:
                bounded(copy, MOUNT_LIMIT_S, f"copying {src}")
            except Exception as e:
                log.warning("evidence: %s: %s", src, e)
        return dest

    def acknowledged_requests(self) -> list[dict]:
        out = []
        for name, path in self.segments:
            if os.path.exists(path):
                out += [dict(e, client=name) for e in C.acknowledged(C.read_log(path))]
        return out

    # --- the end --------------------------------------------------------------------------

    def finish(self) -> None:
        """Everything healed: stop the workloads, wait for a stable pair, final check."""
        self.inj.heal_all()
        self._stop_workloads()
        self._stop_client()
        stable, _ = self.settle(time.monotonic(), "final", STABLE_LIMIT_S)
        label = "final"
        if stable is None:
            # still check what was acknowledged, against the node that serves (if one does)
            v = self.poller.snapshot()
            serving = [n for n in NODES if v[n] and v[n].get("state") in ("PRIM", "ALONE")
                       and v[n].get("readiness") == "Ready"]
            if not serving:
                self.problems.append("final: no node serves; the data could not be checked")
                return
            self.roles = (serving[0], next(n for n in NODES if n != serving[0]))
            label = "final (not stable)"
        self.check(label, final=True)
        self.problems += [f"fusemirror log: {t}" for t in tracebacks(self.c.log_dir)]

    def result(self, error: str | None) -> dict:
        entries = checker.read_jsonl(os.path.join(self.work, "writer.log"))
        segments = [(name, C.read_log(path)) for name, path in self.segments
                    if os.path.exists(path)]
        mutator = _read_json(os.path.join(self.work, "mutator.log"))
        last = next((ch for ch in reversed(self.checks) if "writer" in ch), None)
        return report.build(
            opts=self.o, schedule=self.schedule, faults=self.faults, checks=self.checks,
            problems=self.problems, error=error, writer_entries=entries, segments=segments,
            crashes=self.crashes,
            mutator=mutator, last=last, elapsed=time.monotonic() - self.started,
            environment=environment())

    def keep_logs(self) -> str | None:
        """Copy the logs of this run under self.o.logs; returns where."""
        dest = os.path.join(self.o.logs, f"seed{self.o.seed}-"
                            f"{time.strftime('%Y%m%d-%H%M%S')}")
        try:
            os.makedirs(dest, exist_ok=True)
            c = getattr(self, "c", None)
            if c is not None and os.path.isdir(c.log_dir):
                shutil.copytree(c.log_dir, os.path.join(dest, "log"), dirs_exist_ok=True)
            shutil.copytree(self.work, os.path.join(dest, "chaos"), dirs_exist_ok=True)
            for name in os.listdir(self.scratch):
                if name.endswith((".jsonl", ".app.log", ".toml")):
                    shutil.copy(os.path.join(self.scratch, name), dest)
            log.info("logs kept in %s", dest)
            return dest
        except OSError as e:
            log.error("could not keep the logs: %s", e)
            return None


def _brief(v: dict | None) -> str:
    if not v:
        return "never answered"
    s = f"{v.get('state')} {v.get('readiness')} ({v.get('reason')})"
    return s if v.get("ok") else s + f" [not answering: {v.get('error')}]"


def backing_path(c: Cluster, node: str) -> str | None:
    """A path to the node's backing folder, under its mount (its agent's descriptor)."""
    try:
        pid = c.agent(node, timeout=5)["pid"]
    except Exception:
        return None
    folder = os.path.realpath(c.folder(node))
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}") == folder:
                    return f"/proc/{pid}/fd/{fd}"
    except OSError:
        pass
    return None


def last_exception(path: str) -> str:
    """The last exception line of a daemon's stderr ("?" when there is none)."""
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip(" |\n") for line in f]
    except OSError:
        return "?"
    found = [line for line in lines if ("Error" in line or "Exception" in line)
             and not line.startswith(("File ", "Traceback", "+ Exception Group", "raise "))
             and ":" in line]
    return found[-1][:300] if found else "?"


def _sqlite_error(e: sqlite3.Error, db: str) -> str:
    text = str(e)
    if isinstance(e, sqlite3.OperationalError) and "readonly" in text:
        with contextlib.suppress(OSError):
            if os.path.getsize(db + "-journal") > 0:
                text += (" (a hot journal records.db-journal is there: a transaction was left "
                         "unfinished and nobody rolled it back; a read-only connection cannot)")
    return text


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def tracebacks(log_dir: str) -> list[str]:
    """'FILE: the exception line' for each traceback in the fusemirror logs."""
    out = []
    for name in sorted(os.listdir(log_dir)):
        path = os.path.join(log_dir, name)
        with open(path, errors="replace") as f:
            lines = f.read().splitlines()
        for i, line in enumerate(lines):
            if line.startswith("Traceback"):
                j = i + 1
                while j < len(lines) and (lines[j].startswith(" ") or not lines[j].strip()):
                    j += 1
                last = lines[j] if j < len(lines) else "?"
                out.append(f"{name}: {last[:200]}")
    return out



def environment() -> dict:
    return {"cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
            "wall_minus_monotonic_s": time.time() - time.monotonic()}

