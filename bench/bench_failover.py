"""Failover benchmark: how long the sample application is out of service when its primary
dies, loses its network, or hands over on request.

Run as root from the repository root (it builds network namespaces and FUSE mounts)::

    .venv/bin/python -m bench.bench_failover [--runs 5] [--json FILE] [-v]

Each run of each scenario builds a fresh two-node cluster (fusemirror.lab.cluster.Cluster,
default settings: heartbeat every 0.2 s, peer lost after 1.0 s of silence), waits for alpha
PRIM and beta SECOND, starts demo.client writing one record every 0.02 s through the
virtual IP (one connection per request, 0.5 s time limit: a request whose connection
attempt went to the dead node is retried soon, as a load balancer's health check or a
client with a short timeout would), lets it write, then:

1. kill   — kill -9 of alpha's daemon and agent (Cluster.kill; the application on alpha
            stays up but its folder fails, so it answers 503 until the VIP moves);
2. cable  — every link of alpha cut at the bridge (a cable pulled at the switch);
3. swap   — `fusemirror swap` run on alpha (a planned hand-over to beta).

Figures, in seconds from the event (time.monotonic() taken just before the kill, the cut or
the command; demo.client logs `sent` and `mono` in the same system-wide clock):

- time without service: until the first request acknowledged after the first request that
  failed after the event (its outcome time, `mono`); 0 when no request failed.
- start_prim, stop_prim: the scripts' durations from the controllers' logs ("running X" to
  "X: ok", millisecond timestamps); start_prim on beta, stop_prim on alpha. The application's
  own start, as it logs it ("listening ... after X s": its process age), is shown apart.
- outage - app start (kill, cable): the time without service minus start_prim: what
  fusemirror itself costs. Target: median <= 2 s.
- swap done: until beta is PRIM Ready and alpha SECOND Ready (both polled every 10 ms);
  swap - app stop/start is that minus stop_prim and start_prim. Target: median <= 1 s.
- decided, VIP up, app ready (from beta's log): when beta promoted itself, had the virtual IP,
  and its start_prim had ended. "app ready" is when service was back on the cluster's side;
  the client can only see it at its next request that reaches beta.
- acknowledged records lost: ids the client saw acknowledged that the application behind the
  VIP no longer holds after the run. Target: 0 in every run.

A run that fails (a node never reaches the expected state, the client never gets an answer
again, a script fails) is reported with its reason and the next run goes on; the exit status
is 1 if any run failed. Every step has a time limit, so a run cannot hang; the Cluster
context manager stops everything it started (by PID) and removes its namespaces, mounts and
run directory even on failure, ^C or SIGTERM, and the scratch directory under /var/tmp is
removed afterwards.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import re
import signal
import statistics
import sys
import tempfile
import time
from typing import Callable

from bench import bench_mount as bm
from demo import client as C
from fusemirror import control
from fusemirror.config import Heartbeat
from fusemirror.lab.cluster import Cluster, remove_scratch

log = logging.getLogger(__name__)

CLIENT_INTERVAL_S = 0.02
CLIENT_TIMEOUT_S = 0.5       # per request; the SYN retransmission after 1 s is not measured
CLIENT_LIMIT_S = 90           # the client stops by itself after this, whatever happens
WARMUP_ACKS = 50              # records acknowledged before the event (about 1.2 s)
WARMUP_LIMIT_S = 20
STATE_TIMEOUT_S = 30          # a node not in the expected state by then: the run failed
RECOVERY_LIMIT_S = 20         # no request acknowledged by then after it: the run failed
CLIENT_STOP_S = 10
POLL_S = 0.01
FAILOVER_TARGET_S = 2.0
SWAP_TARGET_S = 1.0

_LOG_LINE = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) \d+ [A-Z]+ \S+: (.*)")
_LISTENING = re.compile(r"listening on \S+ after ([\d.]+) s")


class RunFailed(Exception):
    """A run did not get where it should; the message says where."""


# --- reading the logs ---------------------------------------------------------------------

def controller_events(path: str) -> list[tuple[float, str]]:
    """(wall time, message) of every line of a controller's log."""
    events = []
    with open(path, errors="replace") as f:
        for line in f:
            m = _LOG_LINE.match(line)
            if m:
                t = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                events.append((t, m[2].rstrip()))
    return events


def when(events: list[tuple[float, str]], since: float, pattern: str) -> float:
    """Wall time of the first message at or after `since` that matches `pattern`."""
    rx = re.compile(pattern)
    for t, message in events:
        if t >= since and rx.search(message):
            return t
    raise RunFailed(f"no line matching {pattern!r} in the controller's log after the event")


def script_span(events: list[tuple[float, str]], since: float, name: str
                ) -> tuple[float, float]:
    """(start, end) wall times of the script's first run at or after `since`; it must be ok."""
    start = when(events, since, rf"^running {name}$")
    end = next(((t, m) for t, m in events if t >= start and m.startswith(f"{name}: ")), None)
    if end is None:
        raise RunFailed(f"{name} did not end")
    if end[1] != f"{name}: ok":
        raise RunFailed(end[1])
    return start, end[0]


def app_listen_age(path: str) -> float | None:
    """The age of the application's process when it listened, from its last start's line."""
    try:
        with open(path, errors="replace") as f:
            ages = [float(m[1]) for line in f if (m := _LISTENING.search(line))]
    except OSError:
        return None
    return ages[-1] if ages else None


def client_entries(path: str) -> list[dict]:
    try:
        return C.read_log(path)
    except FileNotFoundError:
        return []


def service_back(entries: list[dict], event: float) -> float | None:
    """When service came back after the event: the outcome time of the first request
    acknowledged after the first one that failed at or after `event`; `event` itself when none
    failed; None when requests failed and none succeeded since."""
    failed = False
    for e in entries:
        if e["mono"] < event:
            continue
        if "id" not in e:
            failed = True
        elif failed:
            return e["mono"]
    return None if failed else event


# --- one run ------------------------------------------------------------------------------

def wait_for(what: str, check: Callable[[], bool], limit: float) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            raise RunFailed(f"{what} after {limit:.0f} s")
        time.sleep(POLL_S)


def wait_roles(c: Cluster, want: dict[str, str], limit: float) -> float:
    """Poll until every node is in its state and Ready, in one round; returns that time."""
    seen: dict = {}

    def ready() -> bool:
        for node, state in want.items():
            try:
                seen[node] = me = c.state(node)["me"]
            except control.ControlError as e:
                seen[node] = str(e)
                return False
            if (me["state"], me["readiness"]) != (state, "Ready"):
                return False
        return True

    try:
        wait_for("the nodes are not " + ", ".join(f"{n} {s} Ready" for n, s in want.items()),
                 ready, limit)
    except RunFailed as e:
        raise RunFailed(f"{e}: {seen}") from None
    return time.monotonic()


def kill_alpha(c: Cluster) -> None:
    c.kill("alpha")


def cut_alpha(c: Cluster) -> None:
    c.lab.link_down("alpha", side="bridge")


def fail_over(c: Cluster, fault: Callable[[Cluster], None]) -> tuple[float, float, dict]:
    """Scenarios 1 and 2: the fault on alpha, until beta is ALONE Ready."""
    event, wall = time.monotonic(), time.time()
    fault(c)
    c.wait_state("beta", "ALONE", timeout=STATE_TIMEOUT_S)
    ready = time.monotonic()
    beta = controller_events(c.daemon_log("beta"))
    since = wall - 0.001                     # log times are truncated to the millisecond
    start, end = script_span(beta, since, "start_prim")
    return event, ready, {
        "start_prim_s": end - start,
        "decided_s": when(beta, since, r"promoted self") - wall,
        "vip_up_s": when(beta, since, r"^virtual IP \S+ up on") - wall,
        "app_ready_s": end - wall,
    }


def swap(c: Cluster) -> tuple[float, float, dict]:
    """Scenario 3: `fusemirror swap` on alpha, until beta is PRIM and alpha SECOND, Ready."""
    event, wall = time.monotonic(), time.time()
    c.command("alpha", "swap")
    done = wait_roles(c, {"beta": "PRIM", "alpha": "SECOND"}, STATE_TIMEOUT_S)
    since = wall - 0.001
    alpha, beta = controller_events(c.daemon_log("alpha")), controller_events(c.daemon_log("beta"))
    stop = script_span(alpha, since, "stop_prim")
    start = script_span(beta, since, "start_prim")
    stop_s, start_s = stop[1] - stop[0], start[1] - start[0]
    return event, done, {
        "swap_s": done - event, "stop_prim_s": stop_s, "start_prim_s": start_s,
        "swap_minus_app_s": done - event - stop_s - start_s,
        "handing_over_s": when(alpha, since, r"handing over to beta") - wall,
        "vip_down_s": when(alpha, since, r"^virtual IP \S+ down$") - wall,
        "decided_s": when(beta, since, r"promoted self") - wall,
        "vip_up_s": when(beta, since, r"^virtual IP \S+ up on") - wall,
        "app_ready_s": start[1] - wall,
    }


SCENARIOS: dict[str, tuple[str, Callable[[Cluster], tuple[float, float, dict]]]] = {
    "kill": ("kill -9 of alpha's daemon and agent", lambda c: fail_over(c, kill_alpha)),
    "cable": ("all links of alpha cut at the bridge", lambda c: fail_over(c, cut_alpha)),
    "swap": ("`fusemirror swap` on alpha", swap),
}


def run_once(scenario: str, scratch: str, guard: str = "ping") -> dict:
    """One run in a fresh cluster: its figures, or the reason it failed."""
    os.makedirs(scratch)
    try:
        with Cluster(scratch, witness="lease" if guard == "lease" else None) as c:
            if guard == "lease":
                c.start_witness()
            log.info("%s: lab %s, module %s", scenario, c.lab.prefix, c.module)
            return {"figures": measure(c, SCENARIOS[scenario][1]), "error": None}
    except Exception as e:           # any failure ends this run only; the next one goes on
        log.error("%s run failed: %s", scenario, e)
        return {"figures": {}, "error": f"{type(e).__name__}: {e}"}
    finally:
        remove_scratch(scratch)


def measure(c: Cluster, act: Callable[[Cluster], tuple[float, float, dict]]) -> dict:
    c.start("alpha")
    c.start("beta")
    c.wait_state("alpha", "PRIM", timeout=STATE_TIMEOUT_S)
    c.wait_state("beta", "SECOND", timeout=STATE_TIMEOUT_S)
    writer, client_log = c.client(duration=CLIENT_LIMIT_S, interval=CLIENT_INTERVAL_S,
                                  timeout=CLIENT_TIMEOUT_S)
    wait_for("the client has not had enough records acknowledged",
             lambda: len(C.acknowledged(client_entries(client_log))) >= WARMUP_ACKS,
             WARMUP_LIMIT_S)
    event, ready, figures = act(c)
    # Once the cluster says it is done, wait for a request sent after that to succeed.
    wait_for("no request was acknowledged again",
             lambda: any("id" in e and e["sent"] >= ready for e in client_entries(client_log)),
             RECOVERY_LIMIT_S)
    writer.send_signal(signal.SIGTERM)
    writer.wait(timeout=CLIENT_STOP_S)
    entries = client_entries(client_log)
    back = service_back(entries, event)
    if back is None:
        raise RunFailed("the client log shows no success after its failures")
    outage = back - event
    acked = {e["id"] for e in C.acknowledged(entries)}
    lost = len(acked - c.records())
    app_s = figures["start_prim_s"] + figures.get("stop_prim_s", 0.0)
    figures.update(outage_s=outage, outage_minus_app_s=outage - app_s,
                   app_listen_s=app_listen_age(os.path.join(c.scratch, "beta.app.log")),
                   failed_requests=sum(1 for e in entries if "id" not in e and e["mono"] >= event),
                   acked=len(acked), lost=lost)
    return figures



# --- summary and report -------------------------------------------------------------------

ROWS = {   # figure -> label, per scenario kind
    "failover": [("outage_s", "time without service (client)"),
                 ("outage_minus_app_s", "  minus start_prim              [target]"),
                 ("start_prim_s", "start_prim on beta (controller log)"),
                 ("app_listen_s", "  app process age at listen (app log)"),
                 ("decided_s", "beta promoted itself (beta log)"),
                 ("vip_up_s", "VIP up on beta (beta log)"),
                 ("app_ready_s", "start_prim done on beta (beta log)"),
                 ("failed_requests", "failed requests"),
                 ("lost", "acknowledged records lost")],
    "swap": [("outage_s", "time without service (client)"),
             ("outage_minus_app_s", "  minus stop_prim and start_prim"),
             ("swap_s", "swap done: beta PRIM, alpha SECOND, Ready"),
             ("swap_minus_app_s", "  minus stop_prim and start_prim  [target]"),
             ("stop_prim_s", "stop_prim on alpha (controller log)"),
             ("start_prim_s", "start_prim on beta (controller log)"),
             ("app_listen_s", "  app process age at listen (app log)"),
             ("handing_over_s", "alpha began handing over (alpha log)"),
             ("vip_down_s", "VIP down on alpha (alpha log)"),
             ("decided_s", "beta promoted itself (beta log)"),
             ("vip_up_s", "VIP up on beta (beta log)"),
             ("app_ready_s", "start_prim done on beta (beta log)"),
             ("failed_requests", "failed requests"),
             ("lost", "acknowledged records lost")],
}


def summarize(runs: list[dict]) -> dict:
    """{figure: {median, min, max, values}} over the runs that did not fail."""
    values: dict[str, list] = {}
    for r in runs:
        for k, v in r["figures"].items():
            if v is not None:
                values.setdefault(k, []).append(v)
    return {k: {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v}
            for k, v in values.items()}


GOALS = (("kill", "outage_minus_app_s", FAILOVER_TARGET_S, "median kill: outage - start_prim"),
         ("cable", "outage_minus_app_s", FAILOVER_TARGET_S, "median cable: outage - start_prim"),
         ("swap", "swap_minus_app_s", SWAP_TARGET_S, "median swap: done - stop/start_prim"),
         ("swap", "outage_minus_app_s", SWAP_TARGET_S,
          "median swap: outage - stop/start_prim"))


def verdicts(results: dict) -> list[dict]:
    """PASS/MISS of the medians against the targets, and of the losses in every run."""
    out = []
    for scenario, figure, limit, goal in GOALS:
        if scenario not in results:
            continue
        s = results[scenario]["summary"].get(figure)
        value = s["median"] if s else None
        out.append({"goal": goal, "figure": f"{scenario}.{figure}", "value": value,
                    "limit": f"<= {limit:g} s",
                    "verdict": "n/a" if value is None else "PASS" if value <= limit else "MISS"})
    counted = [r["figures"]["lost"] for res in results.values() for r in res["runs"]
               if not r["error"]]
    failed = sum(1 for res in results.values() for r in res["runs"] if r["error"])
    out.append({"goal": "acknowledged records lost, all runs", "value": sum(counted),
                "limit": "0" + (f" ({failed} failed run(s) not counted)" if failed else ""),
                "verdict": "n/a" if not counted else "PASS" if not any(counted) else "MISS"})
    return out


def fmt(figure: str, v: float) -> str:
    return f"{v:.0f}" if figure in ("lost", "failed_requests") else f"{v:.3f}"


def report(result: dict) -> str:
    cfg = result["config"]
    lines = [f"fusemirror failover benchmark — {cfg['runs']} run(s) per scenario, "
             f"{cfg['started']}",
             f"heartbeat interval {cfg['heartbeat_interval_s']:g} s, timeout "
             f"{cfg['heartbeat_timeout_s']:g} s (defaults); client: one POST every "
             f"{CLIENT_INTERVAL_S:g} s through the VIP, {CLIENT_TIMEOUT_S:g} s time limit "
             f"per request; split-brain guard: {cfg.get('guard', 'ping')}"
             + (" (lease of 1.5 s from a witness in the client namespace)"
                if cfg.get("guard") == "lease" else " (the client's address)"),
             f"machine: {cfg['cpus']} CPUs ({cfg['cpu_model']}), kernel {cfg['kernel']}, "
             f"Python {cfg['python']}", ""]
    for n, (scenario, res) in enumerate(result["scenarios"].items(), 1):
        runs, summary = res["runs"], res["summary"]
        ok = sum(1 for r in runs if not r["error"])
        lines.append(f"{n}. {SCENARIOS[scenario][0]} — {ok}/{len(runs)} runs completed; "
                     f"seconds from the event, median [min–max]")
        for figure, label in ROWS["swap" if scenario == "swap" else "failover"]:
            s = summary.get(figure)
            cell = (f"{fmt(figure, s['median'])} [{fmt(figure, s['min'])}–"
                    f"{fmt(figure, s['max'])}]") if s else "—"
            lines.append(f"   {label:<44} {cell}")
        for i, r in enumerate(runs, 1):
            if r["error"]:
                lines.append(f"   FAILED run {i}: {r['error'].splitlines()[0][:300]}")
        lines.append("")
    lines.append("Targets:")
    for v in result["goals"]:
        value = "—" if v["value"] is None else (
            f"{v['value']}" if "lost" in v["goal"] else f"{v['value']:.3f} s")
        lines.append(f"  {v['verdict']:<4}  {v['goal']:<40} {value:>8}  "
                     f"(target {v['limit']})")
    return "\n".join(lines)


# --- main ---------------------------------------------------------------------------------

def environment(runs: int) -> dict:
    hb = Heartbeat()
    model = bm.cpu_model()
    return {"runs": runs, "heartbeat_interval_s": hb.interval, "heartbeat_timeout_s": hb.timeout,
            "client_interval_s": CLIENT_INTERVAL_S, "cpus": os.cpu_count(), "cpu_model": model,
            "kernel": platform.release(), "python": platform.python_version(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bench_failover",
                                description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per scenario (default 5)")
    p.add_argument("--json", metavar="FILE", help="write every figure of every run to FILE")
    p.add_argument("--guard", choices=("ping", "lease"), default="ping",
                   help="the split-brain guard: ping (the client's address stands for the "
                        "router) or lease (fusemirror witness in the client namespace)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.runs < 1:
        p.error("--runs must be at least 1")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        log.error("run as root: the bench builds network namespaces and FUSE mounts")
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    scratch = tempfile.mkdtemp(prefix="fusemirror-failover.", dir="/var/tmp")
    result = {"config": {**environment(args.runs), "guard": args.guard}, "scenarios": {}}
    try:
        for scenario in SCENARIOS:
            runs = []
            for n in range(1, args.runs + 1):
                log.info("%s: run %d/%d", scenario, n, args.runs)
                runs.append(run_once(scenario, os.path.join(scratch, f"{scenario}-{n}"),
                                     args.guard))
            result["scenarios"][scenario] = {"runs": runs, "summary": summarize(runs)}
    except KeyboardInterrupt:
        log.error("interrupted; everything started was stopped")
        return 130
    finally:
        remove_scratch(scratch)
    result["goals"] = verdicts(result["scenarios"])
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            f.write(json.dumps(result, indent=2) + "\n")
        log.info("wrote %s", args.json)
    print(report(result))
    return 1 if any(r["error"] for res in result["scenarios"].values() for r in res["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
