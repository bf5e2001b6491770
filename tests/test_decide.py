"""Unit tests of the controller's decision (fusemirror.decide) and its vocabulary
(fusemirror.states).

Pure: frozen snapshots in, decisions out; no mocks, no sockets, no clock. Each
scenario names the rule of docs/states.md it checks and asserts the action, the
state and readiness reached, and the exact reason sentence. Then: invariants over
seeded random snapshots, and two controllers run against each other (their
actions taking effect at once) to check that their decisions agree.
"""

import dataclasses
import random

import pytest

from fusemirror.decide import (
    Action,
    CheckAction,
    CheckerResult,
    Command,
    Decision,
    Guard,
    Policy,
    ScriptFailure,
    View,
    decide,
    elect,
    published,
)
from fusemirror.states import NodeStatus, Readiness, State

STOP, WAIT, ALONE, PRIM, SECOND = State.STOP, State.WAIT, State.ALONE, State.PRIM, State.SECOND
READY, TRANSIENT, NOT_READY = Readiness.READY, Readiness.TRANSIENT, Readiness.NOT_READY
A, B = "alpha", "beta"
POLICY = Policy(nodes=(A, B))
LEASE = Guard(True, "the witness granted the lease")
NO_WITNESS = Guard(False, "witness unreachable")
NO_LEASE = Guard(False, "lease not granted")
NOT_RENEWED = Guard(False, "lease not renewed")
SB = "; nothing is overwritten and the admin must pick the survivor"


def me(state, **kw) -> NodeStatus:
    """This node (alpha). By default it holds epoch 5, which alpha was promoted to."""
    kw = {"readiness": READY, "epoch": 5, "last_primary": A, "uptodate": True,
          "can_promote": True, **kw}
    return NodeStatus(A, state, **kw)


def peer(state, **kw) -> NodeStatus:
    """The other node (beta), same history as alpha by default."""
    kw = {"readiness": READY, "epoch": 5, "last_primary": A, "uptodate": True,
          "can_promote": True, **kw}
    return NodeStatus(B, state, **kw)


def view(me_, peer_=None, *, alive=True, guard=LEASE, **kw) -> View:
    """peer_ is the peer's status as last heard; alive says it is heard now."""
    alive = alive and peer_ is not None
    base = {"peer_alive": alive, "peer_silent_for": 0.2 if alive else 60.0}
    return View(me=me_, guard=guard, peer=peer_, **{**base, **kw})


# A primary and its Ready SECOND, each as the other sees it.
PRIMARY_B = peer(PRIM, epoch=6, last_primary=B)
SECOND_B = peer(SECOND)
RESYNCING_B = peer(SECOND, readiness=TRANSIENT, uptodate=False)


def case(name, v, action, state, readiness, reason, policy=POLICY):
    return pytest.param(v, policy, action, state, readiness, reason, id=name)


CASES = [
    # ------------------------------------------------------------------ STOP
    case("stop: start goes to WAIT",
         view(me(STOP), command=Command.START),
         Action.GO_WAIT, WAIT, TRANSIENT, "started by the admin"),
    case("stop: stays stopped, with the reason it stopped",
         view(me(STOP, reason="stopped by the admin")),
         Action.NOTHING, STOP, NOT_READY, "stopped by the admin"),
    case("stop: prim is refused until started",
         view(me(STOP, readiness=NOT_READY), command=Command.PRIM),
         Action.REFUSE, STOP, NOT_READY, "prim refused: the module is stopped; start it first"),

    # ------------------------------------------------------------------ WAIT, the peer is primary
    case("wait: peer is PRIM with the same history -> SECOND",
         view(me(WAIT, epoch=6, last_primary=B), PRIMARY_B),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta"),
    case("wait: peer is ALONE with a newer epoch, this node can resync -> SECOND",
         view(me(WAIT, uptodate=False), peer(ALONE, epoch=6, last_primary=B, diverged=True)),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta"),
    case("wait: peer is primary at an older epoch, this node wrote alone -> split brain",
         view(me(WAIT, epoch=6, diverged=True), peer(ALONE, epoch=5, last_primary=B)),
         Action.NOTHING, WAIT, NOT_READY,
         "split brain: beta is primary at epoch 5 but this node holds the newer epoch 6 "
         "and acknowledged writes alone" + SB),
    case("wait: peer is primary at an older epoch, nothing written alone here -> SECOND",
         view(me(WAIT, epoch=6), peer(ALONE, epoch=5, last_primary=B)),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta"),
    case("wait: this node acknowledged writes alone and the peer is primary -> split brain",
         view(me(WAIT, diverged=True), PRIMARY_B),
         Action.NOTHING, WAIT, NOT_READY,
         "split brain: this node acknowledged writes that beta (primary at epoch 6) "
         "does not have" + SB),
    case("wait: split brain resolved by the admin in favour of the primary peer -> SECOND",
         view(me(WAIT, diverged=True, resolve=B), PRIMARY_B),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta"),
    case("wait: split brain, the primary peer says the admin kept it -> SECOND",
         view(me(WAIT, diverged=True), peer(PRIM, epoch=6, last_primary=B, resolve=B)),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta"),
    case("wait: both diverged, the admin keeps this node, the peer agrees -> promote",
         view(me(WAIT, diverged=True, resolve=A, epoch=6, last_primary=A),
              peer(WAIT, diverged=True, epoch=7, last_primary=B, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because the admin chose alpha as the survivor (resolve)"),
    case("wait: both diverged, the admin keeps the peer -> wait for it",
         view(me(WAIT, diverged=True, resolve=B), peer(WAIT, diverged=True, epoch=6,
                                                         last_primary=B)),
         Action.NOTHING, WAIT, TRANSIENT,
         "waiting for beta to become primary: the admin chose beta as the survivor (resolve)"),
    case("wait: both diverged, resolve given for each node -> still split brain",
         view(me(WAIT, diverged=True, resolve=A), peer(WAIT, diverged=True, resolve=B)),
         Action.NOTHING, WAIT, NOT_READY,
         "split brain: the admin chose both alpha and beta (resolve on each node): "
         "choose one" + SB),
    case("wait: both diverged, split_brain = last_primary keeps the newer epoch -> follow it",
         view(me(WAIT, diverged=True, epoch=6), peer(ALONE, diverged=True, epoch=7,
                                                      last_primary=B)),
         Action.BECOME_SECOND, SECOND, TRANSIENT,
         "became SECOND of beta",
         policy=Policy(nodes=(A, B), split_brain="last_primary")),
    case("wait: both diverged, split_brain = most_changes, this node changed more -> promote",
         view(me(WAIT, diverged=True, changes=40), peer(WAIT, diverged=True, changes=3,
                                                         epoch=6, last_primary=B, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because alpha made more changes while apart (40 items; "
         "split_brain = most_changes)",
         policy=Policy(nodes=(A, B), split_brain="most_changes")),
    case("wait: both diverged, split_brain = manual (default) -> wait for the admin",
         view(me(WAIT, diverged=True, epoch=6), peer(ALONE, diverged=True, epoch=7,
                                                      last_primary=B)),
         Action.NOTHING, WAIT, NOT_READY,
         "split brain: this node acknowledged writes that beta (primary at epoch 7) "
         "does not have" + SB),
    case("alone: split brain resolved for the waiting peer -> step down (fence) for it",
         view(me(ALONE, diverged=True, epoch=7, last_primary=A),
              peer(WAIT, diverged=True, epoch=6, last_primary=B, resolve=B)),
         Action.FENCE, WAIT, NOT_READY,
         "stepped down: split brain resolved, the admin chose beta as the survivor (resolve)"),
    case("second: resolved in favour of a primary at an older epoch -> keep following",
         view(me(SECOND, epoch=8, last_primary=A, resolve=B),
              peer(PRIM, epoch=7, last_primary=B, replicating=True), mirror_exact=True),
         Action.NOTHING, SECOND, READY, "mirror of beta is exact"),
    case("wait: both were promoted to the same epoch, this node wrote alone -> split brain",
         view(me(WAIT, epoch=6, diverged=True), peer(ALONE, epoch=6, last_primary=B)),
         Action.NOTHING, WAIT, NOT_READY, "split brain: both nodes were promoted to epoch 6 "
                                          "and this node acknowledged writes alone" + SB),
    case("wait: both promoted to the same epoch, nothing written alone here -> SECOND "
         "(found by the chaos harness: a one-way loss)",
         view(me(WAIT, epoch=6), peer(ALONE, epoch=6, last_primary=B)),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta"),
    case("wait: a primary still replicating to this node, which left the mirror",
         view(me(WAIT, epoch=6, last_primary=B, uptodate=False),
              peer(PRIM, epoch=6, last_primary=B, replicating=True)),
         Action.NOTHING, WAIT, NOT_READY, "left the mirror; waiting for beta to go on alone"),
    case("wait: a primary whose link to this node stalled",
         view(me(WAIT, epoch=6, last_primary=B),
              peer(PRIM, epoch=6, last_primary=B, replicating=True, link_stalled=True)),
         Action.NOTHING, WAIT, NOT_READY, "left the mirror; waiting for beta to go on alone"),
    case("wait: peer is primary but a mount agent is down",
         view(me(WAIT, epoch=6, last_primary=B), PRIMARY_B, mounts_ok=False),
         Action.NOTHING, WAIT, NOT_READY, "a mount agent is not healthy"),

    # ------------------------------------------------------------------ WAIT, the peer is absent
    case("wait: at start, the peer gets a moment to appear",
         view(me(WAIT), peer_silent_for=1.0),
         Action.NOTHING, WAIT, TRANSIENT, "waiting up to 5 s for the peer"),
    case("wait: peer absent, up to date, last primary, guard allows -> ALONE",
         view(me(WAIT)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because the peer is absent, this node is up to date and "
         "the witness granted the lease"),
    case("wait: peer absent, data not up to date",
         view(me(WAIT, uptodate=False)),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date; waiting for the peer (primforce overrides)"),
    case("wait: at start, a node that was not the last primary waits for its peer",
         view(me(WAIT, last_primary=B)),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date: this node was not the last primary and has not heard its "
         "peer since start (prim overrides)"),
    case("wait: peer lost, it holds a newer epoch",
         view(me(WAIT), peer(SECOND, epoch=6, last_primary=B), alive=False),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date: beta holds epoch 6, this node 5 (primforce overrides)"),
    case("wait: peer lost, it had acknowledged writes this node lacks",
         view(me(WAIT), peer(ALONE, diverged=True), alive=False),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date: beta acknowledged writes that this node does not have "
         "(primforce overrides)"),
    # chaos seed 12, fault 9: alpha's own promotion (epoch 5, without the witness: both
    # nodes were there) was cancelled when beta promoted itself ALONE at the same epoch
    # number with the lease; alpha then lost beta before beta's first write was known.
    case("wait: peer lost while promoting itself ALONE at this node's epoch",
         view(me(WAIT), peer(ALONE, busy=True), alive=False),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date: beta was last heard ALONE, acknowledging writes without "
         "this node (primforce overrides)"),
    case("wait: peer lost, failover off",
         view(me(WAIT, failover=False), peer(SECOND), alive=False),
         Action.NOTHING, WAIT, NOT_READY, "failover off: no automatic promotion (prim promotes)"),
    case("wait: peer lost, witness unreachable",
         view(me(WAIT), peer(SECOND), alive=False, guard=NO_WITNESS),
         Action.NOTHING, WAIT, NOT_READY, "split-brain guard: witness unreachable"),
    case("wait: peer lost, lease not granted",
         view(me(WAIT), peer(SECOND), alive=False, guard=NO_LEASE),
         Action.NOTHING, WAIT, NOT_READY, "split-brain guard: lease not granted"),
    case("wait: peer is stopped -> ALONE",
         view(me(WAIT), peer(STOP)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because beta is stopped, this node is up to date and "
         "the witness granted the lease"),
    case("wait: peer is still stopping",
         view(me(WAIT), peer(STOP, busy=True)),
         Action.NOTHING, WAIT, TRANSIENT, "waiting for beta to finish its transition"),
    case("wait: start_prim failed at the last attempt -> no automatic promotion",
         view(me(WAIT), script_failure=ScriptFailure("start_prim", detail="exit 1")),
         Action.NOTHING, WAIT, NOT_READY,
         "start_prim failed (exit 1) at the last attempt (prim retries)"),
    case("wait: restart loop guard reached -> no automatic promotion",
         view(me(WAIT), restarts_in_window=3),
         Action.NOTHING, WAIT, NOT_READY,
         "restart loop guard: the application was restarted 3 times within the guard window"),

    # ------------------------------------------------------------------ WAIT, both present
    case("both start, lastprim: this node was primary last, the peer agrees -> ALONE",
         view(me(WAIT), peer(WAIT, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because both nodes have the same data and alpha was primary "
         "last (defaultprim lastprim)"),
    case("alone: a promotion that could not get the lease is aborted",
         view(me(ALONE, epoch=6, last_primary=A),
              script_failure=ScriptFailure("promotion", detail="no lease at epoch 6")),
         Action.DEMOTE, WAIT, NOT_READY,
         "promotion failed (no lease at epoch 6); the transition was aborted"),
    case("wait: a failed promotion does not block the next attempt",
         view(me(WAIT), script_failure=ScriptFailure("promotion", detail="no lease")),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because the peer is absent, this node is up to date and "
         "the witness granted the lease"),
    case("prim: the SECOND left because it does not hear this node -> no going alone",
         view(me(PRIM, epoch=6, last_primary=A), peer(WAIT, epoch=6, hears_peer=False)),
         Action.NOTHING, PRIM, NOT_READY,
         "beta does not hear this node (one-way loss): not going on alone; writes wait"),
    case("both present, elected, the peer does not hear this node (one-way loss)",
         view(me(WAIT), peer(WAIT, hears_peer=False, can_promote=False)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because both nodes have the same data and alpha was primary "
         "last (defaultprim lastprim)"),
    case("both start, elected but the peer has not agreed yet",
         view(me(WAIT), peer(WAIT)),
         Action.NOTHING, WAIT, TRANSIENT,
         "elected because both nodes have the same data and alpha was primary last "
         "(defaultprim lastprim); waiting for beta to agree"),
    case("both start, lastprim: the peer was primary last",
         view(me(WAIT, last_primary=B), peer(WAIT, last_primary=B)),
         Action.NOTHING, WAIT, TRANSIENT,
         "waiting for beta to become primary: both nodes have the same data and beta was "
         "primary last (defaultprim lastprim)"),
    case("both start, defaultprim names the peer",
         view(me(WAIT), peer(WAIT)),
         Action.NOTHING, WAIT, TRANSIENT,
         "waiting for beta to become primary: both nodes have the same data and "
         "defaultprim is beta", Policy(nodes=(A, B), defaultprim=B)),
    case("both start, defaultprim alone: the first node listed",
         view(me(WAIT, last_primary=B), peer(WAIT, last_primary=B, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because both nodes have the same data and alpha is listed "
         "first (defaultprim alone)", Policy(nodes=(A, B), defaultprim="alone")),
    case("both start, the newer epoch wins over defaultprim",
         view(me(WAIT, epoch=6), peer(WAIT, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because alpha holds the newer epoch 6",
         Policy(nodes=(A, B), defaultprim=B)),
    case("both start, the node that ran alone wins",
         view(me(WAIT), peer(WAIT, diverged=True)),
         Action.NOTHING, WAIT, TRANSIENT,
         "waiting for beta to become primary: beta has writes that alpha does not have"),
    case("both start, both ran alone -> split brain",
         view(me(WAIT, diverged=True), peer(WAIT, epoch=6, last_primary=B, diverged=True)),
         Action.NOTHING, WAIT, NOT_READY,
         "split brain: both nodes acknowledged writes while apart (epochs 5 and 6)" + SB),
    case("both start, neither is up to date",
         view(me(WAIT, uptodate=False), peer(WAIT, uptodate=False)),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date on either node (primforce overrides)"),
    case("both start, the preferred node cannot become primary -> the other",
         view(me(WAIT), peer(WAIT, can_promote=False, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because both nodes have the same data and beta, preferred "
         "by defaultprim, cannot become primary now", Policy(nodes=(A, B), defaultprim=B)),
    case("both start, elected but the guard says no now",
         view(me(WAIT), peer(WAIT, vote=A), guard=NO_WITNESS),
         Action.NOTHING, WAIT, NOT_READY,
         "elected because both nodes have the same data and alpha was primary last "
         "(defaultprim lastprim), but split-brain guard: witness unreachable"),

    # ------------------------------------------------------------------ SECOND
    case("second: resynchronising",
         view(me(SECOND, readiness=TRANSIENT, uptodate=False), PRIMARY_B, resync_running=True),
         Action.NOTHING, SECOND, TRANSIENT, "resynchronising from beta"),
    case("second: the copy is exact -> Ready",
         view(me(SECOND, readiness=TRANSIENT), PRIMARY_B, mirror_exact=True),
         Action.NOTHING, SECOND, READY, "mirror of beta is exact"),
    case("second: a mount agent died -> leaves the mirror so that the primary goes on",
         view(me(SECOND, epoch=6, last_primary=B), PRIMARY_B, mounts_ok=False),
         Action.GO_WAIT, WAIT, NOT_READY,
         "a mount agent is not healthy; left the mirror so that beta goes on alone"),
    case("second: no link from a live primary for too long -> leaves the mirror",
         view(me(SECOND, epoch=6, last_primary=B), PRIMARY_B, link_lost=True),
         Action.GO_WAIT, WAIT, NOT_READY,
         "no replication link from beta although it is alive; left the mirror so that it "
         "goes on alone"),
    case("second: replication link not up yet",
         view(me(SECOND), PRIMARY_B),
         Action.NOTHING, SECOND, TRANSIENT, "waiting for the replication link from beta"),
    case("second: primary lost, guard allows -> ALONE",
         view(me(SECOND, epoch=6, last_primary=B), PRIMARY_B, alive=False),
         Action.PROMOTE, ALONE, READY,
         "promoted self because the primary was lost and the witness granted the lease"),
    case("second: primary lost, witness unreachable -> WAIT",
         view(me(SECOND, epoch=6, last_primary=B), PRIMARY_B, alive=False, guard=NO_WITNESS),
         Action.GO_WAIT, WAIT, NOT_READY, "split-brain guard: witness unreachable"),
    case("second: primary lost, failover off -> WAIT",
         view(me(SECOND, epoch=6, last_primary=B, failover=False), PRIMARY_B, alive=False),
         Action.GO_WAIT, WAIT, NOT_READY, "failover off: no automatic promotion (prim promotes)"),
    case("second: primary lost during resync -> WAIT",
         view(me(SECOND, epoch=6, last_primary=B, uptodate=False), PRIMARY_B, alive=False),
         Action.GO_WAIT, WAIT, NOT_READY,
         "data not up to date; waiting for beta (primforce overrides)"),
    case("second: primary was ALONE (this node marked out of date) and is lost -> WAIT",
         view(me(SECOND, epoch=6, last_primary=B),
              peer(ALONE, epoch=6, last_primary=B, diverged=True), alive=False),
         Action.GO_WAIT, WAIT, NOT_READY,
         "data not up to date: beta acknowledged writes that this node does not have "
         "(primforce overrides)"),
    case("second: primary stopped -> ALONE",
         view(me(SECOND, epoch=6, last_primary=B), peer(STOP, epoch=6, last_primary=B)),
         Action.PROMOTE, ALONE, READY,
         "promoted self because the primary stopped and the witness granted the lease"),
    case("second: primary still running stop_prim",
         view(me(SECOND, epoch=6, last_primary=B), peer(STOP, epoch=6, last_primary=B, busy=True)),
         Action.NOTHING, SECOND, TRANSIENT, "waiting for beta to finish its transition"),
    case("second: primary fenced itself (WAIT) and cannot promote -> election",
         view(me(SECOND, epoch=6, last_primary=B),
              peer(WAIT, epoch=6, last_primary=B, can_promote=False, vote=A)),
         Action.PROMOTE, ALONE, READY,
         "promoted self to ALONE because both nodes have the same data and beta, preferred "
         "by defaultprim, cannot become primary now"),
    case("second: primary heard with a newer epoch than this node's -> follow it",
         view(me(SECOND, epoch=5), PRIMARY_B, guard=LEASE),
         Action.NOTHING, SECOND, TRANSIENT, "waiting for the replication link from beta"),

    # ------------------------------------------------------------------ ALONE
    case("alone: peer returns as SECOND -> PRIM",
         view(me(ALONE, diverged=True), peer(SECOND, readiness=TRANSIENT)),
         Action.BECOME_PRIM, PRIM, READY, "became PRIM because beta returned as SECOND"),
    case("alone: peer absent",
         view(me(ALONE)),
         Action.NOTHING, ALONE, READY, "running alone: the peer is absent"),
    case("alone: peer is back in WAIT",
         view(me(ALONE), peer(WAIT, readiness=TRANSIENT)),
         Action.NOTHING, ALONE, READY, "running alone while beta is WAIT"),
    case("alone: lease lost -> fence",
         view(me(ALONE), peer(PRIM), alive=False, guard=NOT_RENEWED),
         Action.FENCE, WAIT, NOT_READY,
         "split-brain guard: lease not renewed; stopped acknowledging writes because beta "
         "was lost"),
    case("alone: the peer is ALONE too -> split brain",
         view(me(ALONE, diverged=True), peer(ALONE, epoch=6, last_primary=B, diverged=True)),
         Action.FENCE, WAIT, NOT_READY,
         "split brain: beta is also primary (ALONE at epoch 6, this node 5)" + SB),
    case("alone: a status saying the peer is PRIM, sent before this node took over "
         "(held up in the network; chaos seed 14) -> no fence, wait for a newer one",
         view(me(ALONE, epoch=6), peer(PRIM), peer_stale=True),
         Action.NOTHING, ALONE, READY,
         "beta's status says PRIM at epoch 5 but was sent before this node became primary: "
         "waiting for a newer one"),
    case("prim: an old status with a newer epoch -> no fence either",
         view(me(PRIM), peer(WAIT, epoch=7, last_primary=B), peer_stale=True),
         Action.NOTHING, PRIM, READY,
         "beta's status says WAIT at epoch 7 but was sent before this node became primary: "
         "waiting for a newer one"),
    case("alone: an old status, and the lease lost -> the guard fences all the same",
         view(me(ALONE, epoch=6), peer(PRIM), peer_stale=True, guard=NOT_RENEWED),
         Action.FENCE, WAIT, NOT_READY,
         "split-brain guard: lease not renewed; stopped acknowledging writes because beta "
         "left the mirror (PRIM)"),
    case("alone: an old status of a peer that is not primary -> the usual rules",
         view(me(ALONE), peer(WAIT, readiness=TRANSIENT), peer_stale=True),
         Action.NOTHING, ALONE, READY, "running alone while beta is WAIT"),
    case("alone: forced by primforce, keeps running without the guard, loudly",
         view(me(ALONE, forced=True), guard=NO_WITNESS),
         Action.NOTHING, ALONE, READY,
         "running alone: the peer is absent (FORCED: split-brain guard overridden: "
         "witness unreachable)"),

    # ------------------------------------------------------------------ PRIM
    case("prim: steady",
         view(me(PRIM), SECOND_B),
         Action.NOTHING, PRIM, READY, "primary; beta is SECOND (Ready)"),
    case("prim: peer lost, guard allows -> ALONE",
         view(me(PRIM), SECOND_B, alive=False),
         Action.BECOME_ALONE, ALONE, READY,
         "continued ALONE because beta was lost and the witness granted the lease"),
    case("prim: peer lost, lease not renewed -> fence",
         view(me(PRIM), SECOND_B, alive=False, guard=NOT_RENEWED),
         Action.FENCE, WAIT, NOT_READY,
         "split-brain guard: lease not renewed; stopped acknowledging writes because beta "
         "was lost"),
    case("prim: peer stopped -> ALONE",
         view(me(PRIM), peer(STOP)),
         Action.BECOME_ALONE, ALONE, READY,
         "continued ALONE because beta stopped and the witness granted the lease"),
    case("prim: witness down while the SECOND is attached -> warning only",
         view(me(PRIM), SECOND_B, guard=NO_WITNESS),
         Action.NOTHING, PRIM, READY,
         "primary; beta is SECOND (Ready); warning: split-brain guard: witness unreachable, "
         "so this node will not continue alone if beta is lost"),
    case("prim: the peer holds a newer epoch -> split brain",
         view(me(PRIM), peer(WAIT, epoch=7, last_primary=B)),
         Action.FENCE, WAIT, NOT_READY,
         "split brain: beta holds epoch 7, newer than this primary's 5" + SB),
    case("prim: the peer is PRIM too -> split brain",
         view(me(PRIM, epoch=7), peer(PRIM, epoch=7, last_primary=B)),
         Action.FENCE, WAIT, NOT_READY,
         "split brain: beta is also primary (PRIM at epoch 7, this node 7)" + SB),

    # ------------------------------------------------------------------ checkers
    case("checker restart -> restart the application",
         view(me(PRIM), SECOND_B, checkers=(CheckerResult("http", False, detail="status 500"),)),
         Action.RESTART_APP, PRIM, TRANSIENT,
         "restarting the application because the http checker failed (status 500), "
         "restart 1 of 3 in the guard window"),
    case("checker fails while a mount agent is unhealthy -> no restart (found by the chaos "
         "harness: the application reopened its files under the missing mount)",
         view(me(PRIM), SECOND_B, mounts_ok=False,
              checkers=(CheckerResult("http", False, detail="status 500"),)),
         Action.NOTHING, PRIM, NOT_READY,
         "a mount agent is not healthy; the application is restarted once it is back"),
    case("checker restart beyond the loop guard -> hand over to the SECOND",
         view(me(PRIM), SECOND_B, restarts_in_window=3,
              checkers=(CheckerResult("http", False, detail="status 500"),)),
         Action.HAND_OVER, SECOND, TRANSIENT,
         "handing over to beta because the http checker failed (status 500) and the restart "
         "loop guard was reached (3 restarts in the window)"),
    case("checker restart beyond the loop guard, no peer -> stop the application",
         view(me(ALONE), restarts_in_window=3, checkers=(CheckerResult("http", False),)),
         Action.DEMOTE, WAIT, NOT_READY,
         "stopped the application because the http checker failed and the restart loop guard "
         "was reached (3 restarts in the window), and no peer is ready to take over"),
    case("checker stopstart -> hand over to the SECOND",
         view(me(PRIM), SECOND_B,
              checkers=(CheckerResult("tcp", False, CheckAction.STOPSTART, "refused"),)),
         Action.HAND_OVER, SECOND, TRANSIENT,
         "handing over to beta because the tcp checker failed (refused)"),
    case("checker stopstart, the SECOND is resynchronising -> restart here",
         view(me(PRIM), RESYNCING_B,
              checkers=(CheckerResult("tcp", False, CheckAction.STOPSTART),)),
         Action.RESTART_APP, PRIM, TRANSIENT,
         "restarting the application because the tcp checker failed, restart 1 of 3 in the "
         "guard window"),
    case("checker wait -> NotReady until it recovers",
         view(me(PRIM), SECOND_B,
              checkers=(CheckerResult("disk", False, CheckAction.WAIT, "97% full"),)),
         Action.NOTHING, PRIM, NOT_READY,
         "the disk checker failed (97% full); waiting for it to recover"),
    case("application process gone -> restart",
         view(me(ALONE), app_running=False),
         Action.RESTART_APP, ALONE, TRANSIENT,
         "restarting the application because the application is not running, restart 1 of 3 "
         "in the guard window"),
    case("the most severe checker wins",
         view(me(PRIM), SECOND_B,
              checkers=(CheckerResult("disk", False, CheckAction.WAIT),
                        CheckerResult("tcp", False, CheckAction.STOPSTART))),
         Action.HAND_OVER, SECOND, TRANSIENT,
         "handing over to beta because the tcp checker failed"),

    # ------------------------------------------------------------------ scripts
    case("start_prim failed -> the transition aborts",
         view(me(ALONE, readiness=TRANSIENT),
              script_failure=ScriptFailure("start_prim", detail="exit 1")),
         Action.DEMOTE, WAIT, NOT_READY, "start_prim failed (exit 1); the transition was aborted"),
    case("start_prim timed out -> the transition aborts",
         view(me(PRIM, readiness=TRANSIENT), SECOND_B,
              script_failure=ScriptFailure("start_prim", timed_out=True, detail="after 60 s")),
         Action.DEMOTE, WAIT, NOT_READY,
         "start_prim timed out (after 60 s); the transition was aborted"),
    case("a script runs -> nothing else, the command waits",
         view(me(ALONE, readiness=TRANSIENT), running="start_prim", command=Command.STOP),
         Action.NOTHING, ALONE, TRANSIENT, "running start_prim"),
    case("the lease is lost while start_prim runs -> fence anyway",
         view(me(ALONE, readiness=TRANSIENT), running="start_prim", guard=NOT_RENEWED),
         Action.FENCE, WAIT, NOT_READY,
         "split-brain guard: lease not renewed; stopped acknowledging writes because the peer "
         "was lost"),

    # ------------------------------------------------------------------ admin commands
    case("command stop on the primary",
         view(me(PRIM), SECOND_B, command=Command.STOP),
         Action.STOP, STOP, NOT_READY, "stopped by the admin"),
    case("command start when started is refused",
         view(me(WAIT), command=Command.START),
         Action.REFUSE, WAIT, READY, "start refused: the module is already started (WAIT)"),
    case("command restart on the primary",
         view(me(ALONE), command=Command.RESTART),
         Action.RESTART_APP, ALONE, TRANSIENT,
         "restarting the application at the admin's request"),
    case("command restart on the SECOND is refused",
         view(me(SECOND), PRIMARY_B, command=Command.RESTART),
         Action.REFUSE, SECOND, READY,
         "restart refused: the application runs only on the primary, and this node is SECOND"),
    case("command failover off",
         view(me(SECOND), PRIMARY_B, command=Command.FAILOVER_OFF),
         Action.FAILOVER_OFF, SECOND, READY, "automatic failover turned off by the admin"),
    case("command prim at start when the cluster cannot decide",
         view(me(WAIT, last_primary=B)),
         Action.NOTHING, WAIT, NOT_READY,
         "data not up to date: this node was not the last primary and has not heard its peer "
         "since start (prim overrides)"),
    case("command prim: the admin decides for the cluster",
         view(me(WAIT, last_primary=B), command=Command.PRIM),
         Action.PROMOTE, ALONE, READY, "promoted self to ALONE at the admin's request (prim)"),
    case("command prim refused: data not up to date",
         view(me(WAIT, uptodate=False), command=Command.PRIM),
         Action.REFUSE, WAIT, READY, "prim refused: data not up to date (primforce overrides)"),
    case("command prim refused: the lost peer was last heard ALONE",
         view(me(WAIT), peer(ALONE), alive=False, command=Command.PRIM),
         Action.REFUSE, WAIT, READY,
         "prim refused: beta was last heard ALONE, acknowledging writes without this node "
         "(primforce overrides)"),
    case("command prim refused: guard",
         view(me(WAIT), command=Command.PRIM, guard=NO_WITNESS),
         Action.REFUSE, WAIT, READY,
         "prim refused: split-brain guard: witness unreachable (primforce overrides)"),
    case("command prim refused: the peer is primary",
         view(me(WAIT, epoch=6, last_primary=B), PRIMARY_B, command=Command.PRIM),
         Action.REFUSE, WAIT, READY, "prim refused: beta is PRIM; use swap, or stop it first"),
    case("command prim refused: the peer is about to become primary",
         view(me(WAIT, last_primary=B), peer(WAIT, last_primary=B), command=Command.PRIM),
         Action.REFUSE, WAIT, READY,
         "prim refused: beta is about to become primary because both nodes have the same data "
         "and beta was primary last (defaultprim lastprim)"),
    case("command primforce overrides the up-to-date rule and the guard, loudly",
         view(me(WAIT, uptodate=False), peer(WAIT, epoch=6, last_primary=B), alive=False,
              command=Command.PRIMFORCE, guard=NO_WITNESS),
         Action.PROMOTE, ALONE, READY,
         "FORCED by the admin (primforce): promoted self to ALONE despite data not up to date; "
         "beta holds the newer epoch 6; split-brain guard: witness unreachable"),
    case("command primforce refused: the peer is primary",
         view(me(WAIT, uptodate=False), PRIMARY_B, command=Command.PRIMFORCE),
         Action.REFUSE, WAIT, READY,
         "primforce refused: beta is PRIM; use swap, or stop it first"),
    case("command second: follow the primary",
         view(me(WAIT, epoch=6, last_primary=B), PRIMARY_B, command=Command.SECOND),
         Action.BECOME_SECOND, SECOND, TRANSIENT, "became SECOND of beta at the admin's request"),
    case("command second resolves a split brain: this node's changes go to quarantine",
         view(me(WAIT, diverged=True), PRIMARY_B, command=Command.SECOND),
         Action.BECOME_SECOND, SECOND, TRANSIENT,
         "became SECOND of beta at the admin's request; this node's divergent changes go to "
         "quarantine"),
    case("command second on the primary hands over",
         view(me(PRIM), SECOND_B, command=Command.SECOND),
         Action.HAND_OVER, SECOND, TRANSIENT,
         "handing over to beta because the admin asked (second)"),

    case("command second with no primary to follow is refused",
         view(me(WAIT), peer(WAIT), command=Command.SECOND),
         Action.REFUSE, WAIT, READY, "second refused: there is no primary to follow"),
    case("command prim is refused while this node hands over",
         view(me(SECOND, handing_over=True), SECOND_B, command=Command.PRIM),
         Action.REFUSE, SECOND, READY, "prim refused: this node is handing over to beta"),

    # ------------------------------------------------------------------ swap
    case("swap on the PRIM with a Ready SECOND -> hand over",
         view(me(PRIM), SECOND_B, command=Command.SWAP),
         Action.HAND_OVER, SECOND, TRANSIENT,
         "handing over to beta because the admin asked for a swap"),
    case("swap refused while the SECOND resynchronises",
         view(me(PRIM), RESYNCING_B, command=Command.SWAP),
         Action.REFUSE, PRIM, READY, "swap refused: beta is not a Ready SECOND"),
    case("swap given on the SECOND asks the PRIM",
         view(me(SECOND, epoch=6, last_primary=B), PRIMARY_B, mirror_exact=True,
              command=Command.SWAP),
         Action.NOTHING, SECOND, READY, "asked beta to hand over (swap)"),
    case("swap refused on ALONE",
         view(me(ALONE), command=Command.SWAP),
         Action.REFUSE, ALONE, READY,
         "swap refused: a swap needs a PRIM and a Ready SECOND; this node is ALONE"),
    case("swap: the PRIM honours the SECOND's request",
         view(me(PRIM), peer(SECOND, swap_requested=True)),
         Action.HAND_OVER, SECOND, TRANSIENT,
         "handing over to beta because beta asked for a swap"),
    case("swap: the old PRIM waits for the peer to promote",
         view(me(SECOND, readiness=TRANSIENT, handing_over=True), SECOND_B),
         Action.NOTHING, SECOND, TRANSIENT, "handing over to beta: waiting for it to promote"),
    case("swap: the SECOND promotes once the peer has handed over",
         view(me(SECOND), peer(SECOND, readiness=TRANSIENT, handing_over=True)),
         Action.PROMOTE, PRIM, READY,
         "promoted self to PRIM because beta handed over and the witness granted the lease"),
    case("swap: the SECOND waits while the peer still runs stop_prim",
         view(me(SECOND), peer(SECOND, readiness=TRANSIENT, handing_over=True, busy=True)),
         Action.NOTHING, SECOND, TRANSIENT, "waiting for beta to finish handing over"),
    case("swap: the SECOND cannot take over",
         view(me(SECOND), peer(SECOND, readiness=TRANSIENT, handing_over=True), guard=NO_LEASE),
         Action.NOTHING, SECOND, NOT_READY,
         "cannot take over from beta: split-brain guard: lease not granted"),
    case("swap: the old PRIM takes its role back when the peer cannot take over",
         view(me(SECOND, readiness=TRANSIENT, handing_over=True),
              peer(SECOND, readiness=NOT_READY, can_promote=False, vote=A)),
         Action.PROMOTE, PRIM, READY,
         "promoted self to PRIM because both nodes have the same data and alpha was primary "
         "last (defaultprim lastprim)"),
]


@pytest.mark.parametrize("v, policy, action, state, readiness, reason", CASES)
def test_rule(v, policy, action, state, readiness, reason):
    d = decide(v, policy)
    assert (d.action, d.state, d.readiness) == (action, state, readiness)
    assert d.reason == reason
    assert d.command_done == (v.command is not None and v.running is None)
    assert d.state.is_primary or not d.may_write_alone


def test_promotion_bumps_the_epoch_above_both_nodes():
    d = decide(view(me(SECOND, epoch=6, last_primary=B), PRIMARY_B, alive=False), POLICY)
    assert (d.action, d.epoch) == (Action.PROMOTE, 7)
    d = decide(view(me(WAIT, uptodate=False, epoch=3), peer(WAIT, epoch=9), alive=False,
                    command=Command.PRIMFORCE), POLICY)
    assert (d.action, d.epoch) == (Action.PROMOTE, 10)


def test_write_permission_follows_the_guard():
    alone = decide(view(me(WAIT)), POLICY)
    assert alone.may_write_alone and not alone.forced
    attached = decide(view(me(PRIM), SECOND_B, guard=NO_WITNESS), POLICY)
    assert attached.state is PRIM and not attached.may_write_alone
    forced = decide(view(me(WAIT), command=Command.PRIMFORCE, guard=NO_WITNESS), POLICY)
    assert forced.forced and forced.may_write_alone
    back = decide(view(me(ALONE, forced=True)), POLICY)
    assert not back.forced and back.may_write_alone


def test_handover_and_swap_flags_are_published():
    d = decide(view(me(PRIM), SECOND_B, command=Command.SWAP), POLICY)
    assert d.handing_over and d.command_done
    asking = view(me(SECOND, epoch=6, last_primary=B, swap_requested=True), PRIMARY_B,
                  mirror_exact=True)
    assert decide(asking, POLICY).swap_requested
    not_ready = dataclasses.replace(asking, mirror_exact=False)
    assert not decide(not_ready, POLICY).swap_requested


def test_votes_are_published():
    d = decide(view(me(WAIT), peer(WAIT)), POLICY)
    assert d.vote == A
    d = decide(view(me(WAIT, last_primary=B), peer(WAIT, last_primary=B)), POLICY)
    assert d.vote == B


# ---------------------------------------------------------------------- the vocabulary

def test_state_codes_are_stable():
    assert {s.value: s.code for s in State} == {
        "STOP": 0, "WAIT": 1, "ALONE": 2, "PRIM": 3, "SECOND": 4}
    assert {r.value: r.code for r in Readiness} == {"Ready": 0, "Transient": 1, "NotReady": 2}
    assert State.from_code(3) is PRIM and Readiness.from_code(2) is NOT_READY
    with pytest.raises(ValueError):
        State.from_code(5)
    assert State("SECOND") is SECOND and str(Readiness.NOT_READY) == "NotReady"


def test_node_status_round_trips_and_checks_what_it_is_given():
    s = peer(ALONE, reason="running alone", diverged=True, vote=A)
    d = s.to_dict()
    assert d["state"] == "ALONE" and d["readiness"] == "Ready"
    assert NodeStatus.from_dict(d) == s
    assert NodeStatus.from_dict({**d, "added_in_a_later_version": 1}) == s
    for bad in ({**d, "state": "MASTER"}, {**d, "epoch": -1}, {**d, "epoch": True},
                {**d, "uptodate": "yes"}, {**d, "reason": 3}, {"state": "WAIT"}, []):
        with pytest.raises(ValueError):
            NodeStatus.from_dict(bad)


def test_policy_is_checked():
    with pytest.raises(ValueError):
        Policy(nodes=(A, A))
    with pytest.raises(ValueError):
        Policy(nodes=(A, B), defaultprim="gamma")


# ---------------------------------------------------------------------- invariants

def random_status(rng, name) -> NodeStatus:
    return NodeStatus(
        name, rng.choice(list(State)), rng.choice(list(Readiness)), "",
        epoch=rng.randint(0, 4), last_primary=rng.choice(["", A, B]),
        uptodate=rng.random() < 0.7, diverged=rng.random() < 0.2,
        can_promote=rng.random() < 0.8, busy=rng.random() < 0.1, failover=rng.random() < 0.8,
        forced=rng.random() < 0.1, handing_over=rng.random() < 0.15,
        swap_requested=rng.random() < 0.1, vote=rng.choice(["", A, B]))


def random_view(rng) -> View:
    has_peer = rng.random() < 0.85
    return View(
        me=random_status(rng, A),
        guard=rng.choice([LEASE, NO_WITNESS, NO_LEASE]),
        peer=random_status(rng, B) if has_peer else None,
        peer_alive=has_peer and rng.random() < 0.7,
        peer_silent_for=rng.choice([0.0, 1.0, 30.0]),
        command=rng.choice([None] * 6 + list(Command)),
        running=rng.choice([None] * 8 + ["start_prim", "stop_prim"]),
        script_failure=rng.choice([None] * 6 + [ScriptFailure("start_prim"),
                                                ScriptFailure("stop_prim", True)]),
        app_running=rng.random() < 0.9,
        checkers=tuple(CheckerResult(f"c{i}", rng.random() < 0.7, rng.choice(list(CheckAction)))
                       for i in range(rng.randint(0, 2))),
        restarts_in_window=rng.randint(0, 4),
        mounts_ok=rng.random() < 0.9,
        resync_running=rng.random() < 0.2,
        mirror_exact=rng.random() < 0.6)


def random_policy(rng) -> Policy:
    return Policy(nodes=rng.choice([(A, B), (B, A)]),
                  defaultprim=rng.choice(["alone", "lastprim", A, B]))


def test_invariants_over_random_views():
    rng = random.Random(20240605)
    promotions = 0
    for _ in range(20000):
        v, policy = random_view(rng), random_policy(rng)
        d = decide(v, policy)
        assert isinstance(d, Decision)
        assert decide(v, policy) == d, "decide must be deterministic"
        assert d.reason and "\n" not in d.reason
        assert d.state.is_primary or not d.may_write_alone
        if d.command_done:
            assert v.command is not None and v.running is None
        elif v.command is not None:
            assert v.running is not None or d.action is Action.FENCE
        if v.command is None:
            assert d.action is not Action.REFUSE
        if d.action is not Action.PROMOTE:
            assert d.epoch == v.me.epoch
            continue
        promotions += 1
        forced = v.command is Command.PRIMFORCE
        heard = v.peer if v.peer_alive else None
        assert not (heard and heard.state.is_primary and heard.epoch >= v.me.epoch), \
            "promoted while the peer is heard as primary with an epoch >= mine"
        assert forced or (v.me.uptodate and not v.resync_running), \
            "promoted while not up to date"
        assert forced or v.guard.ok, "promoted while the guard says no"
        assert d.state.is_primary and d.readiness is READY
        assert d.epoch > v.me.epoch and (v.peer is None or d.epoch > v.peer.epoch)
    assert promotions > 200, "the random views must exercise promotions"


def test_election_is_symmetric():
    rng = random.Random(7)
    for _ in range(5000):
        a, b, policy = random_status(rng, A), random_status(rng, B), random_policy(rng)
        assert elect(a, b, policy) == elect(b, a, policy)
        winner, why = elect(a, b, policy)
        assert why
        if winner is not None:
            w = a if winner == A else b
            assert w.uptodate and w.can_promote


# ---------------------------------------------------------------------- two controllers

class Pair:
    """Two controllers whose actions take effect at once and whose heartbeats
    carry each node's published status. The mount agents are ideal: a SECOND is
    an exact copy of its primary, and a node running ALONE acknowledges writes its
    peer lacks."""

    def __init__(self, policy=POLICY, epoch=5, last_primary=A):
        self.policy = policy
        self.status = {n: NodeStatus(n, STOP, NOT_READY, "", epoch, last_primary, uptodate=True)
                       for n in policy.nodes}
        self.guard = {n: LEASE for n in policy.nodes}
        self.hears = {n: True for n in policy.nodes}
        self.last_heard = {n: None for n in policy.nodes}

    def other(self, n):
        return self.policy.nodes[1] if n == self.policy.nodes[0] else self.policy.nodes[0]

    def view(self, n, command=None) -> View:
        mine, alive = self.status[n], self.hears[n]
        if alive:
            self.last_heard[n] = self.status[self.other(n)]
        theirs = self.last_heard[n]
        following = mine.state is SECOND and alive and theirs.state.is_primary
        return View(me=mine, guard=self.guard[n], peer=theirs, peer_alive=alive,
                    peer_silent_for=0.2 if alive else 60.0, command=command,
                    mirror_exact=following)

    def step(self, commands=None) -> dict:
        commands = commands or {}
        views = {n: self.view(n, commands.get(n)) for n in self.policy.nodes}
        decisions = {n: decide(views[n], self.policy) for n in self.policy.nodes}
        for n, d in decisions.items():
            self.status[n] = self.apply(views[n], d)
        return decisions

    def apply(self, v: View, d: Decision) -> NodeStatus:
        s = published(v, self.policy, d)
        theirs = v.peer
        if d.state is ALONE:
            s = dataclasses.replace(s, diverged=True)
        if d.action is Action.BECOME_PRIM:
            s = dataclasses.replace(s, diverged=False)
        if s.state is SECOND and v.peer_alive and theirs.state.is_primary:
            s = dataclasses.replace(s, epoch=theirs.epoch, last_primary=theirs.last_primary,
                                    uptodate=True, diverged=False)
        return s

    def states(self):
        return {n: self.status[n].state for n in self.policy.nodes}

    def run(self, steps=6, two_primaries=False, **commands):
        """Give the commands, then let the pair settle for `steps` steps."""
        seen = []
        for i in range(steps):
            self.step(commands if i == 0 else None)
            seen.append(self.states())
            assert two_primaries or not all(s.is_primary for s in seen[-1].values()), seen
        return seen


def test_pair_both_start_one_primary():
    pair = Pair()
    pair.run(alpha=Command.START, beta=Command.START)
    assert pair.states() == {A: PRIM, B: SECOND}
    assert pair.status[A].epoch == 6 and pair.status[B].epoch == 6


def test_pair_swap_exchanges_roles():
    pair = Pair()
    pair.run(alpha=Command.START, beta=Command.START)
    pair.run(alpha=Command.SWAP)
    assert pair.states() == {A: SECOND, B: PRIM}
    assert pair.status[B].epoch == 7 and pair.status[B].last_primary == B
    pair.run(alpha=Command.SWAP)   # asked on the SECOND this time
    assert pair.states() == {A: PRIM, B: SECOND}


def test_pair_stopping_the_primary_moves_it():
    pair = Pair()
    pair.run(alpha=Command.START, beta=Command.START)
    pair.run(alpha=Command.STOP)
    assert pair.states() == {A: STOP, B: ALONE}
    pair.run(alpha=Command.START)
    assert pair.states() == {A: SECOND, B: PRIM}


def test_pair_partition_with_the_lease_keeps_one_primary():
    pair = Pair()
    pair.run(alpha=Command.START, beta=Command.START)
    pair.hears = {A: False, B: False}
    pair.guard = {A: LEASE, B: NO_LEASE}         # alpha keeps renewing its lease
    pair.run()
    assert pair.states() == {A: ALONE, B: WAIT}
    assert pair.status[B].reason == "split-brain guard: lease not granted"
    pair.hears = {A: True, B: True}
    pair.run()
    assert pair.states() == {A: PRIM, B: SECOND}


def test_pair_split_brain_waits_for_the_admin():
    pair = Pair()
    pair.run(alpha=Command.START, beta=Command.START)
    pair.hears = {A: False, B: False}            # guard mode none: both allowed
    pair.run(two_primaries=True)
    assert pair.states() == {A: ALONE, B: ALONE}
    pair.hears = {A: True, B: True}
    pair.step()
    assert pair.states() == {A: WAIT, B: WAIT}
    pair.run()
    assert pair.states() == {A: WAIT, B: WAIT}
    assert pair.status[A].reason.startswith("split brain: both nodes acknowledged writes")
    assert decide(pair.view(A, Command.PRIM), POLICY).action is Action.REFUSE
    pair.run(alpha=Command.PRIMFORCE, steps=2)
    assert pair.states() == {A: ALONE, B: WAIT}
    pair.run(beta=Command.SECOND)
    assert pair.states() == {A: PRIM, B: SECOND}


def test_pair_connected_never_has_two_primaries():
    """Both nodes always hear each other; guards flap, checkers fail, the admin
    types commands on one node at a time: never two primaries."""
    rng = random.Random(99)
    for _ in range(60):
        pair = Pair(policy=random_policy(rng))
        pair.step({n: Command.START for n in pair.policy.nodes})
        for _ in range(40):
            pair.guard = {n: rng.choice([LEASE, LEASE, NO_WITNESS]) for n in pair.policy.nodes}
            node = rng.choice(pair.policy.nodes)
            cmd = rng.choice([None] * 8 + [c for c in Command if c is not Command.PRIMFORCE])
            pair.step({node: cmd})
            assert not all(s.is_primary for s in pair.states().values()), pair.status
