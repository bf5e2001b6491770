"""The cluster's vocabulary: states, readiness, and what a node publishes about itself.

These names and numbers are stable API. Monitoring, the exit codes of
`fusemirror state`, /metrics and the heartbeats of the other node all depend on
them: never rename or renumber a member, only add new ones (docs/states.md).
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, fields


class State(enum.StrEnum):
    """The state of one node for one module (SafeKit's mirror module states)."""

    STOP = "STOP"
    WAIT = "WAIT"
    ALONE = "ALONE"
    PRIM = "PRIM"
    SECOND = "SECOND"

    @property
    def code(self) -> int:
        """Stable number: the exit code of `fusemirror state`, the value in /metrics."""
        return _STATE_CODES[self]

    @property
    def is_primary(self) -> bool:
        """ALONE and PRIM run the application and acknowledge writes."""
        return self in (State.ALONE, State.PRIM)

    @classmethod
    def from_code(cls, code: int) -> State:
        for state, c in _STATE_CODES.items():
            if c == code:
                return state
        raise ValueError(f"no state has code {code!r}")


_STATE_CODES = {State.STOP: 0, State.WAIT: 1, State.ALONE: 2, State.PRIM: 3, State.SECOND: 4}


class Readiness(enum.StrEnum):
    """How a node is doing in its state: green, orange or red.

    The codes follow the monitoring convention (0 OK, 1 WARNING, 2 CRITICAL)."""

    READY = "Ready"            # green: the state is fully established
    TRANSIENT = "Transient"    # orange: a script, a role change or a resync is running
    NOT_READY = "NotReady"     # red: blocked; the reason says why and what unblocks it

    @property
    def code(self) -> int:
        return _READINESS_CODES[self]

    @classmethod
    def from_code(cls, code: int) -> Readiness:
        for readiness, c in _READINESS_CODES.items():
            if c == code:
                return readiness
        raise ValueError(f"no readiness has code {code!r}")


_READINESS_CODES = {Readiness.READY: 0, Readiness.TRANSIENT: 1, Readiness.NOT_READY: 2}


@dataclass(frozen=True)
class NodeStatus:
    """What a node publishes about itself: carried by every heartbeat, shown by
    `fusemirror state`, and the facts the other node's decision is made from.

    `epoch` and `last_primary` are persisted with the data: together they name the
    history the node's copy belongs to (the epoch a primary was promoted to, and
    that primary). `uptodate` means the copy is known to equal the last primary's;
    `diverged` means this node acknowledged writes that its peer does not have
    (it ran ALONE and marked the peer out of date) and must not lose them.
    """

    name: str
    state: State = State.STOP
    readiness: Readiness = Readiness.NOT_READY
    reason: str = ""
    epoch: int = 0
    last_primary: str = ""
    uptodate: bool = False
    diverged: bool = False
    can_promote: bool = False      # no local obstacle to becoming primary (guard included)
    busy: bool = False             # a transition (script, role change) is running
    failover: bool = True          # automatic failover on (`fusemirror failover on|off`)
    forced: bool = False           # primary only through primforce overriding the guard
    handing_over: bool = False     # demoted for a swap: the peer may promote now
    swap_requested: bool = False   # a SECOND asking its PRIM to hand over
    vote: str = ""                 # the node this one elects, when neither is primary
    replicating: bool = False      # a primary whose agents apply every change on the peer
    link_stalled: bool = False     # ... but the peer has stopped acknowledging them
    hears_peer: bool = True        # this node hears its peer now (False: a one-way loss
                                   # when the peer hears it)
    resolve: str = ""              # split brain: the node the admin chose as the survivor
    changes: int = 0               # items this node changed while its peer was behind

    def to_dict(self) -> dict:
        """Plain JSON-able values (enums as their string values)."""
        d = asdict(self)
        d["state"] = str(self.state)
        d["readiness"] = str(self.readiness)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> NodeStatus:
        """The inverse of to_dict. Unknown keys are ignored, so a newer version can
        add fields; a missing name, or a wrong type or state, raises ValueError."""
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) or not d["name"]:
            raise ValueError("node status without a name")
        values = {}
        for f in fields(cls):
            if f.name not in d:
                continue
            v = d[f.name]
            if f.name == "state":
                v = State(v)
            elif f.name == "readiness":
                v = Readiness(v)
            elif f.type == "int":
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise ValueError(f"node status: {f.name} must be a non-negative integer")
            elif f.type == "bool":
                if not isinstance(v, bool):
                    raise ValueError(f"node status: {f.name} must be true or false")
            elif not isinstance(v, str):
                raise ValueError(f"node status: {f.name} must be a string")
            values[f.name] = v
        return cls(**values)
