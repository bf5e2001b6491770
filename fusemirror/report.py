"""What a controller shows about itself: the JSON of `fusemirror state` and /state, and
the Prometheus page of /metrics. Read-only views of a running Controller."""

from __future__ import annotations

import trio

from . import metrics
from .mirror import RTT_BOUNDS_US
from .states import Readiness, State


def state_report(c) -> dict:
    """Both nodes as this controller knows them, its agents and its networks."""
    now = trio.current_time()
    alive = c.heartbeats.peer_alive()
    me = c._published()
    me.update(running=c.running, app_started=c.app_started,
              script_failure=(c.script_failure.script + ": " + c.script_failure.detail
                              if c.script_failure else None),
              restarts_in_window=c.restarts.count(now))
    peer = c.peer.to_dict() if c.peer else {"name": c.peer_node.name, "state": None}
    peer["alive"] = alive
    stats = c.agents.stats()
    return {
        "module": c.config.module, "node": c.node.name, "me": me, "peer": peer,
        "replication": {"ops": stats["ops"], "bytes": stats["bytes"],
                        "in_flight": stats["in_flight"], "applied": stats["applied"],
                        "resync": c.agents.resync_progress()},
        "folders": [{"mountpoint": fa.mountpoint, "pid": (fa.status or {}).get("pid"),
                     "role": fa.role, "link": fa.link,
                     "replica_connected": fa.replica_connected,
                     "peer_outdated": fa.peer_outdated, "uptodate": fa.uptodate,
                     "error": fa.error or None}
                    for fa in c.agents.folders],
        "networks": [{"index": s.index, "local": s.local, "peer": s.peer, "up": s.up,
                      "age": s.age, "rtt": s.rtt, "error": s.error}
                     for s in c.heartbeats.paths()],
        "rejected_heartbeats": c.heartbeats.rejected(),
        "guard": {"mode": c.config.witness.mode, "ok": c.guard.ok, "reason": c.guard.reason,
                  "witnesses": c.witness.status() if c.witness else []},
        "decisions": c.decisions,
    }


def metrics_page(c) -> str:
    page = metrics.Page()
    labels = {"module": c.config.module, "node": c.node.name}
    s = c.status
    for state in State:
        page.gauge("fusemirror_state", "1 for the state this node is in (STOP WAIT ALONE "
                   "PRIM SECOND)", int(s.state is state), {**labels, "state": str(state)})
    page.gauge("fusemirror_state_code", "The state as a number: STOP 0, WAIT 1, ALONE 2, "
               "PRIM 3, SECOND 4", s.state.code, labels)
    page.gauge("fusemirror_readiness_code", "Readiness: Ready 0, Transient 1, NotReady 2",
               s.readiness.code, labels)
    page.gauge("fusemirror_ready", "1 when the application is Ready as primary here",
               int(s.state.is_primary and s.readiness is Readiness.READY), labels)
    page.gauge("fusemirror_epoch", "The epoch of this node's data", s.epoch, labels)
    page.gauge("fusemirror_uptodate", "1 when this node's copy equals the last primary's",
               int(s.uptodate), labels)
    page.gauge("fusemirror_diverged", "1 when this node has changes its peer lacks",
               int(s.diverged), labels)
    page.gauge("fusemirror_failover_automatic", "1 when automatic failover is on",
               int(s.failover), labels)
    page.gauge("fusemirror_peer_alive", "1 while the peer is heard", 
               int(c.heartbeats.peer_alive()), labels)
    page.counter("fusemirror_decisions_total", "Decisions made by the control loop",
                 c.decisions, labels)
    for action, n in sorted(c.transitions.items()):
        page.counter("fusemirror_transitions_total", "Transitions carried out, by action", n,
                     {**labels, "action": action})
    stats = c.agents.stats()
    page.counter("fusemirror_replicated_operations_total",
                 "Operations sent to the peer by this node's agents", stats["ops"], labels)
    page.counter("fusemirror_replicated_bytes_total",
                 "Bytes of frames sent to the peer by this node's agents", stats["bytes"], labels)
    page.counter("fusemirror_applied_operations_total",
                 "Operations applied here for the peer (as replica)", stats["applied"], labels)
    page.gauge("fusemirror_replication_lag_operations",
               "Operations sent and not yet acknowledged by the peer", stats["in_flight"], labels)
    if stats["rtt_buckets"]:
        hist = metrics.Histogram.from_counts([b / 1e6 for b in RTT_BOUNDS_US],
                                             stats["rtt_buckets"], stats["rtt_sum_us"] / 1e6)
        page.histogram("fusemirror_replication_latency_seconds",
                       "Time from sending an operation to its acknowledgement by the peer",
                       hist, labels)
    resync = c.agents.resync_progress() or {}
    page.gauge("fusemirror_resync_running", "1 while this primary resynchronises its SECOND",
               int(bool(resync.get("running"))), labels)
    page.gauge("fusemirror_resync_remaining_bytes", "Bytes left to compare in the running "
               "resynchronisation (0: none running)", resync.get("remaining_bytes", 0), labels)
    page.gauge("fusemirror_resync_sent_bytes", "Bytes of file data sent by the running or last "
               "resynchronisation", resync.get("bytes_sent", 0), labels)
    page.gauge("fusemirror_resync_rate_bytes_per_second", "Comparison rate of the running or "
               "last resynchronisation", resync.get("rate_bps", 0), labels)
    for p in c.heartbeats.paths():
        net = {**labels, "network": str(p.index), "peer": p.peer}
        page.gauge("fusemirror_heartbeat_up", "1 while heartbeats arrive on this network",
                   int(p.up), net)
        if p.rtt is not None:
            page.gauge("fusemirror_heartbeat_rtt_seconds", "Smoothed heartbeat round trip",
                       p.rtt, net)
    page.gauge("fusemirror_guard_ok", "1 when the split-brain guard lets this node act "
               "without its peer", int(c.guard.ok), labels)
    for w in (c.witness.status() if c.witness else []):
        page.gauge("fusemirror_witness_up", "1 when this witness answered within the timeout",
                   int(w["age"] is not None and w["age"] <= c.witness.timeout),
                   {**labels, "address": w["address"]})
    for reason, n in sorted(c.heartbeats.rejected().items()):
        page.counter("fusemirror_heartbeats_rejected_total", "Heartbeats refused, by reason",
                     n, {**labels, "reason": reason})
    return page.render()
