"""The controller's decision: a pure function of a frozen snapshot.

The daemon loops observe -> decide -> act. `decide(view, policy)` is the whole
policy of the cluster: it does no I/O, reads no clock and draws no random
number, so the same View always gives the same Decision, and it never raises for
a well-formed View. Each Decision carries one sentence saying what was decided and
why; the controller logs it once per change and tests assert it.

The rules, in the order they are tried, are documented in docs/states.md:
  1. a primary that must stop acknowledging writes is fenced (split brain, guard);
  2. while a transition runs, nothing else is decided (commands stay pending);
  3. a pending admin command is carried out or refused;
  4. a failed start_prim aborts the promotion;
  5. the rules of the current state.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace

from .states import NodeStatus, Readiness, State

READY, TRANSIENT, NOT_READY = Readiness.READY, Readiness.TRANSIENT, Readiness.NOT_READY


class Command(enum.StrEnum):
    """Admin commands given through `fusemirror` to the local controller."""

    START = "start"
    STOP = "stop"
    PRIM = "prim"
    SECOND = "second"
    PRIMFORCE = "primforce"
    SWAP = "swap"
    RESTART = "restart"
    FAILOVER_ON = "failover on"
    FAILOVER_OFF = "failover off"


class CheckAction(enum.StrEnum):
    """What a failing checker asks for."""

    RESTART = "restart"        # restart the application here (within the loop guard)
    STOPSTART = "stopstart"    # fail over: let the peer take over
    WAIT = "wait"              # NotReady until the checker recovers


_SEVERITY = {CheckAction.WAIT: 0, CheckAction.RESTART: 1, CheckAction.STOPSTART: 2}


class Action(enum.StrEnum):
    """What the controller does next. The steps of each are in docs/states.md."""

    NOTHING = "nothing"              # publish state, readiness and reason; nothing to do
    REFUSE = "refuse"                # the admin command cannot be done now: tell why
    GO_WAIT = "go_wait"              # a SECOND leaves the mirror: agents stay read-only
    BECOME_SECOND = "become_second"  # agents become replicas of the primary; resync what differs
    PROMOTE = "promote"              # guard, new epoch, agents primary/alone, VIP, start_prim
    BECOME_PRIM = "become_prim"      # ALONE -> PRIM: the returning SECOND is reintegrated
    BECOME_ALONE = "become_alone"    # PRIM -> ALONE: the agents journal what the peer misses
    HAND_OVER = "hand_over"          # demote to SECOND so that the peer promotes (swap, checker)
    DEMOTE = "demote"                # stop_prim, VIP down, agents to replica: WAIT
    FENCE = "fence"                  # stop acknowledging writes now, then demote: WAIT
    RESTART_APP = "restart_app"      # stop_prim then start_prim, same state
    STOP = "stop"                    # demote if primary, then stop the module
    FAILOVER_ON = "failover_on"      # persist: automatic failover allowed
    FAILOVER_OFF = "failover_off"    # persist: no automatic promotion


@dataclass(frozen=True)
class Guard:
    """The split-brain guard's verdict on this node being primary without its peer.

    `reason` is a clause that reads after "because ... and": "the witness granted
    the lease", "witness 10.0.0.254 answered", "the split-brain guard is off
    (i_accept_split_brain)"; or, when not ok: "witness unreachable", "lease not
    granted". Mode `none` is a guard that is always ok."""

    ok: bool
    reason: str


@dataclass(frozen=True)
class CheckerResult:
    name: str
    ok: bool
    action: CheckAction = CheckAction.RESTART
    detail: str = ""


@dataclass(frozen=True)
class ScriptFailure:
    """The last failure of a gating script. The controller keeps it until an admin
    command, or until the node becomes SECOND."""

    script: str               # "start_prim", "stop_prim", ...
    timed_out: bool = False
    detail: str = ""          # "exit 1", "after 60 s"


SPLIT_BRAIN_POLICIES = ("manual", "last_primary", "most_changes")


def _survivor(a: NodeStatus, b: NodeStatus, policy) -> tuple[NodeStatus | None, str]:
    """In a split brain, the node kept without the admin: by `resolve`, else by the
    configured automatic policy (none when manual, or when the rule cannot tell)."""
    chosen = {n.resolve for n in (a, b) if n.resolve}
    if len(chosen) > 1:
        return None, f"the admin chose both {' and '.join(sorted(chosen))} (resolve on each " \
                     f"node): choose one"
    if chosen:
        name = chosen.pop()
        n = a if a.name == name else b if b.name == name else None
        return n, f"the admin chose {name} as the survivor (resolve)"
    rule = policy.split_brain if policy is not None and a.diverged and b.diverged \
        else "manual"
    if rule == "last_primary" and a.epoch != b.epoch:
        n = a if a.epoch > b.epoch else b
        return n, f"{n.name} was promoted last (split_brain = last_primary)"
    if rule == "most_changes" and a.changes != b.changes:
        n = a if a.changes > b.changes else b
        return n, (f"{n.name} made more changes while apart ({n.changes} items; "
                   f"split_brain = most_changes)")
    return None, ""


@dataclass(frozen=True)
class Policy:
    """The part of the module configuration that decisions depend on."""

    nodes: tuple[str, str]          # in configuration order
    defaultprim: str = "lastprim"   # "alone" | "lastprim" | one of the node names
    max_restarts: int = 3           # restart loop guard: restarts allowed in the window
    start_wait: float = 5.0         # seconds a starting node waits to hear its peer
    split_brain: str = "manual"     # "manual" | "last_primary" | "most_changes"

    def __post_init__(self):
        if len(self.nodes) != 2 or self.nodes[0] == self.nodes[1]:
            raise ValueError("a module has exactly two nodes with different names")
        if self.defaultprim not in ("alone", "lastprim", *self.nodes):
            raise ValueError(f"defaultprim must be alone, lastprim or a node name, "
                             f"not {self.defaultprim!r}")
        if self.split_brain not in SPLIT_BRAIN_POLICIES:
            raise ValueError(f"split_brain must be one of {', '.join(SPLIT_BRAIN_POLICIES)}, "
                             f"not {self.split_brain!r}")


@dataclass(frozen=True)
class View:
    """Everything the controller observed, frozen.

    `me` is this node's status as last published (epoch, last_primary, uptodate and
    diverged as persisted). `peer` is the peer's status as last heard, None if it
    was never heard since this controller started; `peer_alive` is true while some
    heartbeat path (or a replication acknowledgement) was heard within the timeout;
    `peer_silent_for` is the time since it was last heard, or since start."""

    me: NodeStatus
    guard: Guard
    peer: NodeStatus | None = None
    peer_alive: bool = False
    peer_silent_for: float = 0.0
    command: Command | None = None
    running: str | None = None              # the transition step running, e.g. "start_prim"
    script_failure: ScriptFailure | None = None
    app_running: bool = True
    checkers: tuple[CheckerResult, ...] = ()
    restarts_in_window: int = 0
    mounts_ok: bool = True                  # every mount agent answers in its expected role
    resync_running: bool = False
    mirror_exact: bool = False              # SECOND: the copy equals the primary's right now
    link_lost: bool = False                 # SECOND: no replication link from a primary that
                                            # is alive, for longer than it may take to notice
                                            # that the primary died
    peer_stale: bool = False                # primary: the peer's status may have been sent
                                            # before this node became primary (it was held
                                            # up in the network): old news, not a split brain


@dataclass(frozen=True)
class Decision:
    """What to do, the state and readiness reached when it is done, and why.

    `epoch` is the epoch to persist (new only for PROMOTE). `command_done` tells the
    controller the pending command was handled (carried out or refused).
    `may_write_alone` tells the agents whether they may acknowledge a write the peer
    has not applied; the other flags, and the vote of an election between two
    present nodes, are published in the next heartbeats."""

    action: Action
    state: State
    readiness: Readiness
    reason: str
    epoch: int
    command_done: bool = False
    may_write_alone: bool = False
    forced: bool = False
    handing_over: bool = False
    swap_requested: bool = False
    vote: str = ""


def decide(view: View, policy: Policy) -> Decision:
    for rule in (_fence, _transition_running, _command, _failed_start):
        d = rule(view, policy)
        if d is not None:
            return d
    return _BY_STATE[view.me.state](view, policy)


def can_promote(view: View, policy: Policy) -> bool:
    """Published as NodeStatus.can_promote: nothing local stands in the way."""
    return _blocker(view, policy) is None and view.guard.ok


def published(view: View, policy: Policy, d: Decision) -> NodeStatus:
    """This node's status once `d` is carried out (what its heartbeats then carry)."""
    me = view.me
    failover = {Action.FAILOVER_ON: True, Action.FAILOVER_OFF: False}.get(d.action, me.failover)
    return replace(me, state=d.state, readiness=d.readiness, reason=d.reason, epoch=d.epoch,
                   last_primary=me.name if d.action is Action.PROMOTE else me.last_primary,
                   can_promote=can_promote(view, policy), busy=view.running is not None,
                   failover=failover, forced=d.forced, handing_over=d.handing_over,
                   swap_requested=d.swap_requested, vote=d.vote)


# ---------------------------------------------------------------- building decisions

def _to(view, action, state, readiness, reason, *, epoch=None, forced=None,
        handing_over=False, swap_requested=False, vote="") -> Decision:
    if forced is None:
        forced = view.me.forced and state.is_primary and not view.guard.ok
    return Decision(action, state, readiness, reason,
                    epoch=view.me.epoch if epoch is None else epoch,
                    may_write_alone=state.is_primary and (view.guard.ok or forced),
                    forced=forced, handing_over=handing_over, swap_requested=swap_requested,
                    vote=vote)


def _stay(view, readiness, reason, **flags) -> Decision:
    return _to(view, Action.NOTHING, view.me.state, readiness, reason, **flags)


def _wait(view, reason, vote="") -> Decision:
    """Blocked: WAIT (NotReady). A SECOND leaves the mirror to get there."""
    action = Action.NOTHING if view.me.state is State.WAIT else Action.GO_WAIT
    return _to(view, action, State.WAIT, NOT_READY, reason, vote=vote)


def _refuse(view, reason) -> Decision:
    me = view.me
    return _to(view, Action.REFUSE, me.state, me.readiness, reason,
               handing_over=me.handing_over, swap_requested=me.swap_requested)


def _promote(view, target, reason, forced=False) -> Decision:
    top = max(view.me.epoch, view.peer.epoch if view.peer else 0)
    return _to(view, Action.PROMOTE, target, READY, reason, epoch=top + 1, forced=forced)


def _hand_over(view, peer, because) -> Decision:
    return _to(view, Action.HAND_OVER, State.SECOND, TRANSIENT,
               f"handing over to {peer.name} because {because}", handing_over=True)


# ---------------------------------------------------------------- facts

def _heard(view) -> NodeStatus | None:
    """The peer's status if it is alive, else None."""
    return view.peer if view.peer_alive else None


def _peer_name(view) -> str:
    return view.peer.name if view.peer else "the peer"


def _peer_phrase(view) -> str:
    """Why the peer is not attached, as a clause."""
    p = _heard(view)
    if p is None:
        return f"{_peer_name(view)} was lost"
    if p.state is State.STOP:
        return f"{p.name} stopped"
    return f"{p.name} left the mirror ({p.state})"


def _uptodate(view) -> bool:
    return view.me.uptodate and not view.resync_running


def _failure_phrase(f: ScriptFailure) -> str:
    what = "timed out" if f.timed_out else "failed"
    return f"{f.script} {what}" + (f" ({f.detail})" if f.detail else "")


def _blocker(view, policy) -> str | None:
    """What, on this node alone, forbids an automatic promotion."""
    if not view.mounts_ok:
        return "a mount agent is not healthy"
    f = view.script_failure
    if f is not None and f.script == "start_prim":
        return f"{_failure_phrase(f)} at the last attempt (prim retries)"
    if view.restarts_in_window >= policy.max_restarts:
        return (f"restart loop guard: the application was restarted "
                f"{view.restarts_in_window} times within the guard window")
    return None


def _takeover_blocker(view, policy) -> str | None:
    """What forbids taking over when the peer is absent, lost or stopped."""
    me, last = view.me, view.peer
    if not _uptodate(view):
        return f"data not up to date; waiting for {_peer_name(view)} (primforce overrides)"
    if last is not None and last.epoch > me.epoch:
        return (f"data not up to date: {last.name} holds epoch {last.epoch}, this node "
                f"{me.epoch} (primforce overrides)")
    if last is not None and last.diverged and me.resolve != me.name:
        if me.diverged:
            return _split_brain("both nodes acknowledged writes while apart")
        return (f"data not up to date: {last.name} acknowledged writes that this node does "
                f"not have (primforce overrides)")
    if (last is not None and last.state is State.ALONE and me.state is not State.ALONE
            and me.resolve != me.name):
        # It was last heard acting without this node, perhaps still promoting: it may
        # have acknowledged writes since, and its epoch says nothing (this node may hold
        # the same number from a promotion of its own that was cancelled).
        return (f"data not up to date: {last.name} was last heard ALONE, acknowledging "
                f"writes without this node (primforce overrides)")
    if last is None and me.last_primary != me.name:
        # At start nothing tells whether the last primary wrote after this node left.
        return ("data not up to date: this node was not the last primary and has not "
                "heard its peer since start (prim overrides)")
    blocker = _blocker(view, policy)
    if blocker:
        return blocker
    if not me.failover:
        return "failover off: no automatic promotion (prim promotes)"
    if not view.guard.ok:
        return f"split-brain guard: {view.guard.reason}"
    return None


def _split_brain(detail: str) -> str:
    return f"split brain: {detail}; nothing is overwritten and the admin must pick the survivor"


def _conflict_with_primary(me: NodeStatus, p: NodeStatus, policy=None) -> str | None:
    """Why this node cannot follow primary p without losing writes, if it cannot. None
    too when p is the survivor (the admin's resolve, or the automatic split-brain
    policy): this node's own versions then go to quarantine as it is resynchronised."""
    kept, _ = _survivor(me, p, policy)
    if kept is not None and kept.name == p.name:
        return None
    if not me.diverged:
        # Every write this node acknowledged reached p before it was acknowledged (its
        # epoch may be newer or a twin of p's: a promotion that acknowledged nothing
        # alone); what it applied without acknowledging is compared away by a full resync.
        return None
    if p.epoch < me.epoch:
        return _split_brain(f"{p.name} is primary at epoch {p.epoch} but this node "
                            f"holds the newer epoch {me.epoch} and acknowledged writes alone")
    if p.epoch == me.epoch and p.last_primary != me.last_primary:
        return _split_brain(f"both nodes were promoted to epoch {me.epoch} and this node "
                            f"acknowledged writes alone")
    return _split_brain(f"this node acknowledged writes that {p.name} "
                        f"(primary at epoch {p.epoch}) does not have")


def _can_receive(p: NodeStatus) -> bool:
    """The peer, as published, can take over from this primary right now."""
    return (p.state is State.SECOND and p.readiness is READY and p.uptodate
            and p.can_promote and not p.busy)


def local_blocker(view: View, policy: Policy) -> str | None:
    """What, on this node alone (the guard aside), forbids an automatic promotion."""
    return _blocker(view, policy)


# ---------------------------------------------------------------- election

def elect(a: NodeStatus, b: NodeStatus, policy: Policy) -> tuple[str | None, str]:
    """Which of two present nodes, neither primary, should become primary, and why.

    Symmetric (elect(a, b) == elect(b, a)) and computed from published statuses
    only, so both nodes reach the same answer; each publishes it as its vote, and
    the winner promotes only once the other's vote agrees. Newer data always wins;
    defaultprim only breaks a tie between equal copies. In a split brain, the node the
    admin chose (resolve) wins."""
    n, why = _survivor(a, b, policy) if a.diverged or b.diverged or a.resolve or b.resolve \
        else (None, "")
    if n is not None:
        return (n.name, why) if n.can_promote else (None, f"{why}, but it cannot "
                                                           f"become primary now")
    if why:
        return None, _split_brain(why)
    if a.diverged and b.diverged:
        return None, _split_brain(f"both nodes acknowledged writes while apart "
                                  f"(epochs {min(a.epoch, b.epoch)} and {max(a.epoch, b.epoch)})")
    if a.epoch == b.epoch and a.last_primary != b.last_primary:
        return None, _split_brain(f"both nodes were promoted to epoch {a.epoch}")
    if a.diverged or b.diverged:
        d, o = (a, b) if a.diverged else (b, a)
        if o.epoch > d.epoch:
            return None, _split_brain(f"{d.name} acknowledged writes alone but {o.name} "
                                      f"was promoted after it (epoch {o.epoch})")
        return _if_able(d, f"{d.name} has writes that {o.name} does not have")
    if a.epoch != b.epoch:
        n = a if a.epoch > b.epoch else b
        return _if_able(n, f"{n.name} holds the newer epoch {n.epoch}")
    if a.uptodate != b.uptodate:
        n = a if a.uptodate else b
        return _if_able(n, f"only {n.name} is up to date")
    if not a.uptodate:
        return None, "data not up to date on either node (primforce overrides)"
    first, rule = _preferred(a, b, policy)
    other = b if first is a else a
    if first.can_promote:
        return first.name, f"both nodes have the same data and {rule}"
    if other.can_promote:
        return other.name, (f"both nodes have the same data and {first.name}, "
                            f"preferred by defaultprim, cannot become primary now")
    return None, "neither node can become primary now"


def _if_able(n: NodeStatus, why: str) -> tuple[str | None, str]:
    if not n.uptodate:
        return None, f"data not up to date: {why}, but it is not up to date"
    if not n.can_promote:
        return None, f"{why}, but it cannot become primary now"
    return n.name, why


def _preferred(a, b, policy) -> tuple[NodeStatus, str]:
    by_name = {a.name: a, b.name: b}
    if policy.defaultprim in by_name:
        return by_name[policy.defaultprim], f"defaultprim is {policy.defaultprim}"
    if policy.defaultprim == "lastprim" and a.last_primary in by_name:
        return by_name[a.last_primary], f"{a.last_primary} was primary last (defaultprim lastprim)"
    order = [n for n in policy.nodes if n in by_name] or sorted(by_name)
    return by_name[order[0]], f"{order[0]} is listed first (defaultprim {policy.defaultprim})"


def _elect_and_act(view, policy, p) -> Decision:
    winner, why = elect(view.me, p, policy)
    vote = winner or ""
    if winner is None:
        return _wait(view, why)
    if winner == p.name:
        return _stay(view, TRANSIENT, f"waiting for {p.name} to become primary: {why}", vote=vote)
    if p.vote != winner and p.hears_peer:
        # (A peer that does not hear this node cannot agree: it waits, or fences itself,
        # as for a lost peer; its split-brain guard is what keeps it from promoting.)
        return _stay(view, TRANSIENT, f"elected because {why}; waiting for {p.name} to agree",
                     vote=vote)
    blocker = _blocker(view, policy) or (None if view.guard.ok else
                                         f"split-brain guard: {view.guard.reason}")
    if not _uptodate(view):
        blocker = "data not up to date"
    if blocker:
        return _wait(view, f"elected because {why}, but {blocker}", vote=vote)
    target = State.PRIM if p.state is State.SECOND else State.ALONE
    return _promote(view, target, f"promoted self to {target} because {why}")


# ---------------------------------------------------------------- rules before the state's

def _fence(view, policy) -> Decision | None:
    me, p = view.me, _heard(view)
    if not me.state.is_primary:
        return None
    if p is not None and p.state is State.WAIT and me.diverged and p.diverged:
        kept, why = _survivor(me, p, policy)
        if kept is not None and kept.name == p.name:
            # A split brain resolved in favour of the waiting node: step down for it.
            return _to(view, Action.FENCE, State.WAIT, NOT_READY,
                       f"stepped down: split brain resolved, {why}")
    # A status sent before this node became primary (held up in the network) is old news:
    # fencing on it made the node that had taken over a replica of a primary whose
    # controller had just been killed, its acknowledged writes sent to quarantine (chaos
    # seed 14). A status sent since, or silence, decides.
    stale = p is not None and view.peer_stale and (p.state.is_primary or p.epoch > me.epoch)
    if p is not None and p.state.is_primary and not stale:
        return _to(view, Action.FENCE, State.WAIT, NOT_READY, _split_brain(
            f"{p.name} is also primary ({p.state} at epoch {p.epoch}, this node {me.epoch})"))
    if p is not None and p.epoch > me.epoch and not stale:
        return _to(view, Action.FENCE, State.WAIT, NOT_READY, _split_brain(
            f"{p.name} holds epoch {p.epoch}, newer than this primary's {me.epoch}"))
    attached = p is not None and p.state is State.SECOND
    if not attached and not view.guard.ok and not me.forced:
        return _to(view, Action.FENCE, State.WAIT, NOT_READY,
                   f"split-brain guard: {view.guard.reason}; stopped acknowledging writes "
                   f"because {_peer_phrase(view)}")
    if stale:
        return _stay(view, me.readiness, f"{p.name}'s status says {p.state} at epoch "
                                         f"{p.epoch} but was sent before this node became "
                                         f"primary: waiting for a newer one")
    return None


def _transition_running(view, policy) -> Decision | None:
    if view.running is None:
        return None
    return _stay(view, TRANSIENT, f"running {view.running}",
                 handing_over=view.me.handing_over, swap_requested=view.me.swap_requested)


def _failed_start(view, policy) -> Decision | None:
    f = view.script_failure
    if not view.me.state.is_primary or f is None or f.script not in ("start_prim",
                                                                      "promotion"):
        return None
    return _to(view, Action.DEMOTE, State.WAIT, NOT_READY,
               f"{_failure_phrase(f)}; the transition was aborted")


# ---------------------------------------------------------------- admin commands

def _command(view, policy) -> Decision | None:
    cmd = view.command
    if cmd is None:
        return None
    if view.me.state is State.STOP and cmd not in _ANY_STATE:
        d = _refuse(view, f"{cmd} refused: the module is stopped; start it first")
    else:
        d = _COMMANDS[cmd](view, policy)
    return replace(d, command_done=True)


def _cmd_start(view, policy):
    if view.me.state is not State.STOP:
        return _refuse(view, f"start refused: the module is already started ({view.me.state})")
    return _to(view, Action.GO_WAIT, State.WAIT, TRANSIENT, "started by the admin")


def _cmd_stop(view, policy):
    if view.me.state is State.STOP:
        return _refuse(view, "stop refused: the module is already stopped")
    return _to(view, Action.STOP, State.STOP, NOT_READY, "stopped by the admin")


def _cmd_restart(view, policy):
    if not view.me.state.is_primary:
        return _refuse(view, f"restart refused: the application runs only on the primary, "
                             f"and this node is {view.me.state}")
    return _to(view, Action.RESTART_APP, view.me.state, TRANSIENT,
               "restarting the application at the admin's request")


def _cmd_failover(on: bool):
    def cmd(view, policy):
        me = view.me
        return _to(view, Action.FAILOVER_ON if on else Action.FAILOVER_OFF, me.state,
                   me.readiness, f"automatic failover turned {'on' if on else 'off'} by the admin",
                   handing_over=me.handing_over, swap_requested=me.swap_requested)
    return cmd


def _cmd_prim(force: bool):
    name = "primforce" if force else "prim"

    def cmd(view, policy):
        me, p, last = view.me, _heard(view), view.peer
        if me.state.is_primary:
            return _refuse(view, f"{name} refused: this node is already primary ({me.state})")
        if p is not None and p.state.is_primary:
            return _refuse(view, f"{name} refused: {p.name} is {p.state}; use swap, "
                                 f"or stop it first")
        if p is not None and p.busy:
            return _refuse(view, f"{name} refused: {p.name} is in a transition; try again")
        if me.handing_over and p is not None and p.state is State.SECOND:
            return _refuse(view, f"{name} refused: this node is handing over to {p.name}")
        if p is not None and p.state is not State.STOP:
            winner, why = elect(me, p, policy)
            if winner == p.name:
                return _refuse(view, f"{name} refused: {p.name} is about to become primary "
                                     f"because {why}")
        if not view.mounts_ok:
            return _refuse(view, f"{name} refused: a mount agent is not healthy")
        overridden = []
        if not _uptodate(view):
            overridden.append("data not up to date")
        if last is not None and last.epoch > me.epoch:
            overridden.append(f"{last.name} holds the newer epoch {last.epoch}")
        if last is not None and last.diverged:
            overridden.append(f"{last.name} acknowledged writes that this node does not have")
        elif last is not None and last.state is State.ALONE and p is None:
            overridden.append(f"{last.name} was last heard ALONE, acknowledging writes "
                              f"without this node")
        if not view.guard.ok:
            overridden.append(f"split-brain guard: {view.guard.reason}")
        target = State.PRIM if p is not None and p.state is State.SECOND else State.ALONE
        if not overridden:
            return _promote(view, target, f"promoted self to {target} at the admin's "
                                          f"request ({name})")
        if not force:
            return _refuse(view, f"prim refused: {'; '.join(overridden)} (primforce overrides)")
        return _promote(view, target, f"FORCED by the admin (primforce): promoted self to "
                                      f"{target} despite {'; '.join(overridden)}",
                        forced=not view.guard.ok)
    return cmd


def _cmd_second(view, policy):
    me, p = view.me, _heard(view)
    if me.state is State.SECOND:
        return _refuse(view, "second refused: this node is already SECOND")
    if me.state.is_primary:
        if p is not None and _can_receive(p):
            return _hand_over(view, p, "the admin asked (second)")
        return _refuse(view, "second refused: no Ready SECOND can take over; "
                             "stop stops the application")
    if p is None or not p.state.is_primary:
        return _refuse(view, "second refused: there is no primary to follow")
    if not view.mounts_ok:
        return _refuse(view, "second refused: a mount agent is not healthy")
    tail = ("; this node's divergent changes go to quarantine"
            if _conflict_with_primary(me, p, policy) else "")
    return _to(view, Action.BECOME_SECOND, State.SECOND, TRANSIENT,
               f"became SECOND of {p.name} at the admin's request{tail}")


def _cmd_swap(view, policy):
    me, p = view.me, _heard(view)
    if me.state is State.PRIM and p is not None and _can_receive(p):
        return _hand_over(view, p, "the admin asked for a swap")
    if me.state is State.PRIM:
        return _refuse(view, f"swap refused: {_peer_name(view)} is not a Ready SECOND")
    if me.state is State.SECOND and p is not None and p.state is State.PRIM:
        if _ready_to_receive(view, policy):
            return _stay(view, READY, f"asked {p.name} to hand over (swap)", swap_requested=True)
        return _refuse(view, "swap refused: this node is not a Ready, up-to-date SECOND "
                             "that may become primary")
    return _refuse(view, f"swap refused: a swap needs a PRIM and a Ready SECOND; "
                         f"this node is {me.state}")


def _ready_to_receive(view, policy) -> bool:
    return view.mirror_exact and _uptodate(view) and can_promote(view, policy)


_ANY_STATE = (Command.START, Command.STOP, Command.FAILOVER_ON, Command.FAILOVER_OFF)
_COMMANDS = {
    Command.START: _cmd_start,
    Command.STOP: _cmd_stop,
    Command.RESTART: _cmd_restart,
    Command.PRIM: _cmd_prim(force=False),
    Command.PRIMFORCE: _cmd_prim(force=True),
    Command.SECOND: _cmd_second,
    Command.SWAP: _cmd_swap,
    Command.FAILOVER_ON: _cmd_failover(True),
    Command.FAILOVER_OFF: _cmd_failover(False),
}


# ---------------------------------------------------------------- the states

def _in_stop(view, policy):
    return _stay(view, NOT_READY, view.me.reason or "stopped")


def _in_wait(view, policy):
    me, p = view.me, _heard(view)
    if p is not None and p.state.is_primary:
        conflict = _conflict_with_primary(me, p, policy)
        if conflict:
            return _wait(view, conflict)
        if not view.mounts_ok:
            return _wait(view, "a mount agent is not healthy")
        if p.replicating and (p.link_stalled or not me.uptodate):
            # This node left the mirror (or never had the primary's data): following a
            # primary that still waits for it would only make that primary wait longer.
            return _stay(view, NOT_READY, f"left the mirror; waiting for {p.name} to go on "
                                          f"alone")
        return _to(view, Action.BECOME_SECOND, State.SECOND, TRANSIENT,
                   f"became SECOND of {p.name}")
    if p is not None and p.busy:
        return _stay(view, TRANSIENT, f"waiting for {p.name} to finish its transition")
    if p is not None and p.state is not State.STOP:
        return _elect_and_act(view, policy, p)
    if view.peer is None and view.peer_silent_for < policy.start_wait:
        return _stay(view, TRANSIENT, f"waiting up to {policy.start_wait:g} s for the peer")
    why = _takeover_blocker(view, policy)
    if why:
        return _wait(view, why)
    how = f"{p.name} is stopped" if p is not None else "the peer is absent"
    return _promote(view, State.ALONE, f"promoted self to ALONE because {how}, this node "
                                       f"is up to date and {view.guard.reason}")


def _in_second(view, policy):
    me, p = view.me, _heard(view)
    if p is not None and p.state.is_primary:
        return _follow(view, policy, p)
    if p is not None and p.state is State.SECOND:
        if p.handing_over and not me.handing_over:
            return _take_over_from(view, policy, p)
        if me.handing_over and p.readiness is not NOT_READY:
            return _stay(view, TRANSIENT, f"handing over to {p.name}: waiting for it to promote",
                         handing_over=True)
    if p is not None and p.busy:
        return _stay(view, TRANSIENT, f"waiting for {p.name} to finish its transition")
    if p is not None and p.state is not State.STOP:
        return _elect_and_act(view, policy, p)
    why = _takeover_blocker(view, policy)
    if why:
        return _wait(view, why)
    how = "stopped" if p is not None else "was lost"
    return _promote(view, State.ALONE, f"promoted self because the primary {how} "
                                       f"and {view.guard.reason}")


def _follow(view, policy, p):
    me = view.me
    if p.epoch < me.epoch:
        conflict = _conflict_with_primary(replace(me, diverged=False), p, policy)
        if conflict:
            return _wait(view, conflict)
    if not view.mounts_ok:
        # The primary waits for this node's acknowledgements: leaving the mirror lets
        # it go on alone instead of failing the application's writes.
        return _wait(view, f"a mount agent is not healthy; left the mirror so that "
                           f"{p.name} goes on alone")
    if view.link_lost:
        return _wait(view, f"no replication link from {p.name} although it is alive; "
                           f"left the mirror so that it goes on alone")
    if view.resync_running:
        return _stay(view, TRANSIENT, f"resynchronising from {p.name}")
    if not me.uptodate:
        return _stay(view, NOT_READY, f"copy out of date: {p.name} has changes this node "
                                      f"lacks; it needs a resynchronisation")
    if not view.mirror_exact:
        return _stay(view, TRANSIENT, f"waiting for the replication link from {p.name}")
    if me.swap_requested and p.state is State.PRIM and _ready_to_receive(view, policy):
        return _stay(view, READY, f"asked {p.name} to hand over (swap)", swap_requested=True)
    return _stay(view, READY, f"mirror of {p.name} is exact")


def _take_over_from(view, policy, p):
    if p.busy:
        return _stay(view, TRANSIENT, f"waiting for {p.name} to finish handing over")
    if not _uptodate(view):
        why = "data not up to date"
    elif p.epoch > view.me.epoch:
        why = f"{p.name} holds the newer epoch {p.epoch}"
    elif not view.guard.ok:
        why = f"split-brain guard: {view.guard.reason}"
    else:
        why = _blocker(view, policy)
    if why:
        return _stay(view, NOT_READY, f"cannot take over from {p.name}: {why}")
    return _promote(view, State.PRIM, f"promoted self to PRIM because {p.name} handed over "
                                      f"and {view.guard.reason}")


def _in_alone(view, policy):
    p = _heard(view)
    health = _app_health(view, policy, p)
    if health is not None:
        return health
    if p is not None and p.state is State.SECOND and not p.busy:
        return _to(view, Action.BECOME_PRIM, State.PRIM, READY,
                   f"became PRIM because {p.name} returned as SECOND")
    if p is None:
        reason = f"running alone: {_peer_name(view)} is absent"
    elif p.diverged and view.me.diverged:
        reason = f"running alone; {p.name} waits in split brain until the admin picks the survivor"
    else:
        reason = f"running alone while {p.name} is {p.state}"
    if view.me.forced and not view.guard.ok:
        reason += f" (FORCED: split-brain guard overridden: {view.guard.reason})"
    return _stay(view, READY, reason)


def _in_prim(view, policy):
    p = _heard(view)
    if p is not None and not p.hears_peer and p.state is not State.SECOND:
        # It left the mirror because it cannot hear this node: it may be about to take
        # over. Going on alone would acknowledge writes it will never have.
        return _stay(view, NOT_READY, f"{p.name} does not hear this node (one-way loss): "
                                      f"not going on alone; writes wait")
    if p is None or p.state is not State.SECOND:
        because = (view.guard.reason if view.guard.ok
                   else f"primforce overrides the split-brain guard ({view.guard.reason})")
        return _to(view, Action.BECOME_ALONE, State.ALONE, READY,
                   f"continued ALONE because {_peer_phrase(view)} and {because}")
    health = _app_health(view, policy, p)
    if health is not None:
        return health
    if p.swap_requested and _can_receive(p):
        return _hand_over(view, p, f"{p.name} asked for a swap")
    reason = f"primary; {p.name} is SECOND ({p.readiness})"
    if not view.guard.ok:
        reason += (f"; warning: split-brain guard: {view.guard.reason}, so this node will "
                   f"not continue alone if {p.name} is lost")
    return _stay(view, READY, reason)


def _app_health(view, policy, p) -> Decision | None:
    """PRIM and ALONE: what the checkers ask for, if anything. Nothing is restarted while
    a mount agent is unhealthy: an application started then would open its files in the
    bare folder under the missing mount, beside replication."""
    failed = [c for c in view.checkers if not c.ok]
    if failed and not view.mounts_ok:
        return _stay(view, NOT_READY, "a mount agent is not healthy; the application is "
                                      "restarted once it is back")
    if not view.app_running:
        failed.append(CheckerResult("application", False, CheckAction.RESTART, "not running"))
    if not failed:
        return None
    worst = max(failed, key=lambda c: _SEVERITY[c.action])
    what = (f"the {worst.name} checker failed" if worst.name != "application"
            else "the application is not running")
    if worst.detail and worst.name != "application":
        what += f" ({worst.detail})"
    if worst.action is CheckAction.WAIT:
        return _stay(view, NOT_READY, f"{what}; waiting for it to recover")
    n, limit = view.restarts_in_window, policy.max_restarts
    restart = _to(view, Action.RESTART_APP, view.me.state, TRANSIENT,
                  f"restarting the application because {what}, "
                  f"restart {n + 1} of {limit} in the guard window")
    if worst.action is CheckAction.RESTART and n < limit:
        return restart
    if n >= limit:
        what += f" and the restart loop guard was reached ({n} restarts in the window)"
    if p is not None and _can_receive(p):
        return _hand_over(view, p, what)
    if n < limit:
        return restart
    return _to(view, Action.DEMOTE, State.WAIT, NOT_READY,
               f"stopped the application because {what}, and no peer is ready to take over")


_BY_STATE = {
    State.STOP: _in_stop,
    State.WAIT: _in_wait,
    State.SECOND: _in_second,
    State.ALONE: _in_alone,
    State.PRIM: _in_prim,
}
