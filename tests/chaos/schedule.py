"""The fault classes and the schedule drawn from the seed, before anything runs.

A fault is a class, a role ("primary" or "secondary", resolved to a node when the fault is
applied: the node in that role then), how long it is held before it is healed, and the pause
after the cluster is stable again before the next one. About one fault in five has a second,
overlapping fault: it starts while the first is held and is healed on its own time; its role
is resolved at the same moment as the first's (the roles before either fault acted), and
it never touches what the first touches (see RESOURCES).

The schedule depends only on the seed and the list of classes: `draw(seed, n, classes)`
always returns the same faults, so a run is replayed with the same seed (the timing of the
cluster's reactions, not the choices, may differ).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field

PRIMARY, SECONDARY = "primary", "secondary"

# class -> (roles it applies to, what it does, healing)
CLASSES: dict[str, tuple[tuple[str, ...], str]] = {
    "kill9-daemon": ((PRIMARY, SECONDARY), "kill -9 of the controller; started again at heal"),
    "kill9-agent": ((PRIMARY, SECONDARY), "kill -9 of the mount agent; the controller "
                                          "restarts it"),
    "kill9-node": ((PRIMARY, SECONDARY), "kill -9 of the controller and the agent; the "
                                         "controller started again at heal"),
    "sigstop-daemon": ((PRIMARY, SECONDARY), "SIGSTOP of the controller, SIGCONT at heal"),
    "sigstop-agent": ((PRIMARY, SECONDARY), "SIGSTOP of the mount agent, SIGCONT at heal"),
    "link-down": ((PRIMARY, SECONDARY), "the node's cable pulled at the bridge, put back "
                                        "at heal"),
    "oneway-in": ((PRIMARY, SECONDARY), "every packet to the node dropped (nftables), "
                                        "until heal"),
    "oneway-out": ((PRIMARY, SECONDARY), "every packet from the node dropped (nftables), "
                                         "until heal"),
    "partition-wboth": ((PRIMARY,), "the nodes cannot reach each other; both reach the "
                                    "witness"),
    "partition-wprimary": ((PRIMARY,), "the nodes cannot reach each other; only the "
                                       "primary reaches the witness"),
    "partition-wsecondary": ((PRIMARY,), "the nodes cannot reach each other; only the "
                                         "secondary reaches the witness"),
    "witness-down": ((PRIMARY,), "the lease witness killed, started again at heal"),
    "node-restart": ((PRIMARY, SECONDARY), "graceful stop of the node's controller "
                                           "(SIGTERM), started again at heal"),
    "swap": ((PRIMARY,), "`fusemirror swap` on the primary, under load"),
    "disk-full": ((SECONDARY,), "the secondary's filesystem (a tmpfs) filled up, the "
                                "filler removed at heal"),
    "corrupt-frame": ((PRIMARY,), "one bit flipped in the replication stream (a proxy in "
                                  "the primary's namespace)"),
}

# what a fault touches; an overlapping second fault must touch none of it. P and S stand
# for the primary's and the secondary's node.
RESOURCES: dict[str, tuple[str, ...]] = {
    "kill9-daemon": ("daemon@",),
    "kill9-agent": ("agent@",),
    "kill9-node": ("daemon@", "agent@", "down"),
    "sigstop-daemon": ("daemon@",),
    "sigstop-agent": ("agent@",),
    "link-down": ("net@", "down"),
    "oneway-in": ("net@",),
    "oneway-out": ("net@",),
    "partition-wboth": ("net@P", "net@S"),
    "partition-wprimary": ("net@P", "net@S"),
    "partition-wsecondary": ("net@P", "net@S"),
    "witness-down": ("witness",),
    "node-restart": ("daemon@", "agent@", "down"),
    "swap": ("daemon@P", "daemon@S", "agent@P", "agent@S"),
    "disk-full": ("disk@",),
    "corrupt-frame": ("proxy", "net@P", "net@S"),
}
NO_OVERLAP = {"swap", "corrupt-frame"}    # need a stable pair, never started as a second

DEFAULT_CLASSES = tuple(CLASSES)
OVERLAP_P = 0.2
HOLD = (1.0, 8.0)          # seconds a fault is held before it is healed
GAP = (1.0, 4.0)           # seconds between a stable cluster and the next fault


@dataclass
class Fault:
    index: int
    cls: str
    role: str
    hold: float
    gap: float
    second: "Fault | None" = None
    offset: float = 0.0    # for a second fault: seconds after the first was applied
    extra: dict = field(default_factory=dict)

    @property
    def key(self) -> str:
        """The row of the report: class and role."""
        return f"{self.cls}@{self.role}"

    def resources(self) -> set[str]:
        mine = "P" if self.role == PRIMARY else "S"
        out = set()
        for r in RESOURCES[self.cls]:
            out.add(r + mine if r.endswith("@") else r)
        if "down" in out:
            out.discard("down")
            out.add("down@" + mine)
        return out

    def describe(self) -> str:
        text = f"#{self.index:<3} {self.key:<32} hold {self.hold:4.1f} s, then {self.gap:3.1f} s"
        if self.second:
            s = self.second
            text += (f"\n       + overlapping {s.key} at +{s.offset:.1f} s, "
                     f"hold {s.hold:.1f} s")
        return text

    def to_json(self) -> dict:
        d = asdict(self)
        d["key"] = self.key
        if self.second:
            d["second"] = self.second.to_json()
        return d


def _compatible(first: Fault, cls: str, role: str) -> bool:
    if cls in NO_OVERLAP:
        return False
    probe = Fault(0, cls, role, 0, 0)
    a, b = first.resources(), probe.resources()
    if a & b:
        return False
    downs = {r for r in a | b if r.startswith("down@")}
    return len(downs) < 2            # never both nodes down at once


def draw(seed: int, n: int, classes=DEFAULT_CLASSES) -> list[Fault]:
    """n faults from the seed, each class and role equally likely."""
    unknown = set(classes) - set(CLASSES)
    if unknown:
        raise ValueError(f"unknown fault classes: {', '.join(sorted(unknown))}")
    rng = random.Random(seed)
    choices = [(c, r) for c in classes for r in CLASSES[c][0]]
    out = []
    for i in range(1, n + 1):
        cls, role = rng.choice(choices)
        f = Fault(i, cls, role, round(rng.uniform(*HOLD), 1), round(rng.uniform(*GAP), 1))
        if cls not in NO_OVERLAP and rng.random() < OVERLAP_P:
            options = [(c, r) for c, r in choices if _compatible(f, c, r)]
            if options:
                c2, r2 = rng.choice(options)
                offset = round(rng.uniform(0.2, 0.8) * f.hold, 1)
                f.second = Fault(i, c2, r2, round(rng.uniform(1.0, f.hold + 3.0), 1), 0.0,
                                 offset=offset)
        out.append(f)
    return out


def describe(faults: list[Fault]) -> str:
    return "\n".join(f.describe() for f in faults)
