"""The cluster controller of one module on one node: observe -> decide -> act.

`Controller.run()` binds everything that can fail on bad input first (heartbeat
sockets, the admin socket, the HTTP port), adopts or starts the mount agents, then
loops: `observe()` freezes what it sees into a decide.View, `decide()` (pure)
returns a Decision, and the act step carries it out. A transition (promotion,
demotion, a role change of the agents, a script) runs as a background task so
that the loop keeps publishing its state and can still fence; while it runs,
decide keeps the node Transient. The reason sentence of every decision is logged
once per change. What is persisted (epoch, last primary, up to date, failover,
stopped) lives in a state file under the state directory, fsynced before it is
published. The rules are in docs/states.md, the daemon in docs/cluster.md.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
from dataclasses import replace

import trio

from . import config as C
from . import control, httpd, scripts, vip
from . import errors as X
from .agent import read_secret
from .agents import ALONE, PRIMARY, REPLICA, Agents
from .checkers import CheckerSet, RestartGuard
from .decide import (Action, Command, Decision, Guard, Policy, ScriptFailure, View, decide,
                     elect, local_blocker, published)
from .heartbeat import Heartbeats
from .report import metrics_page, state_report
from .states import NodeStatus, Readiness, State
from .statefile import DEFAULT_DIR, StateFile
from .lease import LeaseClient
from .witness import NO_GUARD, PingWitness

log = logging.getLogger(__name__)

LOOP_PERIOD = 0.1            # seconds between two observations when nothing wakes the loop
START_WAIT = 5.0             # a starting node waits this long to hear its peer
COMMAND_TIMEOUT = 30.0       # an admin command not decided by then is answered "busy"
LIVENESS_LIMIT = 10.0        # /liveness fails when the loop made no progress for this long
ANNOUNCE_INTERVAL = 0.2       # seconds between gratuitous ARP rounds after a takeover
RESYNC_RETRY = 3.0           # seconds between two attempts to resynchronise the SECOND
AGENTS_WAIT = 10.0           # the application is started only under healthy mount agents


SOCKET_SUFFIX = ".ctl.sock"


def socket_path(run_dir: str, module: str, node: str) -> str:
    """The admin socket: MODULE@NODE.ctl.sock ('@' is in no module or node name)."""
    return os.path.join(run_dir, f"{module}@{node}{SOCKET_SUFFIX}")


def running_controllers(run_dir: str) -> list[tuple[str, str]]:
    """(module, node) of every admin socket in run_dir."""
    try:
        names = os.listdir(run_dir)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        if name.endswith(SOCKET_SUFFIX) and "@" in name:
            module, _, node = name[:-len(SOCKET_SUFFIX)].rpartition("@")
            found.append((module, node))
    return found


class _Pending:
    """An admin command waiting for the loop's decision."""

    def __init__(self, command: Command):
        self.command = command
        self.done = trio.Event()
        self.answer: dict = {}


class Controller:
    def __init__(self, config: C.ModuleConfig, node_name: str, *, state_dir: str = DEFAULT_DIR,
                 run_dir: str = control.RUN_DIR, log_dir: str = "/var/log/fusemirror"):
        self.config = config
        self.node = config.node(node_name)                 # UnknownNode: a ConfigError
        self.peer_node = config.peer_of(node_name)
        self.secret = read_secret(config.secret_file)
        for script in (config.scripts.start_prim, config.scripts.stop_prim,
                       config.scripts.start_both, config.scripts.stop_both):
            if script is not None and not os.access(script.path, os.X_OK):
                raise X.Failure(X.BAD_CONFIG, f"script {script.path} is missing or not "
                                              f"executable")
        self.state_dir, self.run_dir, self.log_dir = state_dir, run_dir, log_dir
        self.name = f"module-{config.module}-{node_name}"
        self.socket_path = socket_path(run_dir, config.module, node_name)
        self.script_log = os.path.join(log_dir, f"{self.name}.scripts.log")
        self.policy = Policy(nodes=(config.nodes[0].name, config.nodes[1].name),
                             defaultprim=config.failover.defaultprim,
                             max_restarts=config.restart.limit, start_wait=START_WAIT,
                             split_brain=config.failover.split_brain)
        self.store = StateFile(state_dir, self.name)
        if "epoch" not in self.store.data:
            self.store.update(epoch=0, last_primary="", uptodate=True,
                              failover=config.failover.automatic, stopped=False)
        self.agents = Agents(config, self.node, config.secret_file, state_dir, run_dir, log_dir,
                             config.replication.timeout)
        self.heartbeats = Heartbeats(
            self.node.name, self.peer_node.name,
            list(zip(self.node.addresses, self.peer_node.addresses)), config.heartbeat.port,
            self.secret, config.heartbeat.interval, config.heartbeat.timeout,
            self._published, module=config.module)
        self.env = {"FUSEMIRROR_MODULE": config.module, "FUSEMIRROR_NODE": self.node.name,
                    "FUSEMIRROR_PEER": self.peer_node.name, "FUSEMIRROR_ROOT": self.node.root,
                    "FUSEMIRROR_VIP": config.vip.address if config.vip else ""}
        self.checkers = CheckerSet.from_config(config.checkers, env=self.env,
                                               on_change=lambda _: self.wake())
        self.restarts = RestartGuard.from_config(config.restart)
        w = config.witness
        self.witness = (PingWitness(w.addresses, w.interval, w.timeout) if w.mode == "ping"
                        else None)
        self.lease = (LeaseClient([(a, w.port) for a in w.addresses], config.module,
                                  self.node.name, self.secret, timeout=w.request_timeout)
                      if w.mode == "lease" else None)
        self._deadline_sent: float | None = None
        self._deadline_lock = trio.Lock()
        self._claim_lock = trio.Lock()      # an epoch claimed at the witness, and its record
        # Lease mode: the epoch the witness granted this node for its current period of
        # acknowledging writes without its peer (see _fence_peer); None while replicating.
        self._alone_epoch: int | None = None
        # A SECOND that is heard but acknowledges nothing for this long is asked to leave
        # the mirror (the replication network alone is down, say): the primary goes on.
        self.stall_limit = max(2.0, 2 * config.heartbeat.timeout)
        stopped = bool(self.store.get("stopped"))
        self.status = NodeStatus(self.node.name, State.STOP if stopped else State.WAIT,
                                 Readiness.NOT_READY if stopped else Readiness.TRANSIENT,
                                 "stopped by the admin" if stopped else "starting",
                                 epoch=self.store.get("epoch"),
                                 last_primary=self.store.get("last_primary"),
                                 uptodate=self.store.get("uptodate"),
                                 failover=self.store.get("failover"))
        self.peer: NodeStatus | None = None
        self.guard = NO_GUARD
        self._view: View | None = None
        self._peer_was_alive = False
        self.peer_failover: bool | None = None
        self.command: _Pending | None = None
        self.running: str | None = None
        self.script_failure = None
        self.app_started = False
        self.replicating = False          # the agents were connected to the peer as primary
        # The agents were told they may acknowledge changes the peer does not get (role
        # alone, or policy alone): only then do they need the lease's write deadline.
        self._agents_alone = False
        self._primary_since = 0.0          # when this node last became primary (trio time)
        self._nursery: trio.Nursery | None = None
        self._transition: trio.CancelScope | None = None
        self._checker_scope: trio.CancelScope | None = None
        self._wake = trio.Event()
        self._started_at = 0.0
        self._progress = 0.0
        self._reason = ""
        self._acks = self._applied = 0
        self._link_down_since: float | None = None
        self._reviving = False
        self._stopping = False            # shutdown runs: no agent is started again
        self._resync_tried = -RESYNC_RETRY
        self._second_outdated_since: float | None = None
        self._app_on_dead_mount = False
        self.decisions = 0
        self.transitions: dict[str, int] = {}

    # -- running ---------------------------------------------------------------------------

    def _published(self) -> dict:
        """What the heartbeats carry: the status, with the agents' replication as it is."""
        stalled = self.replicating and any(fa.stalled_for > self.stall_limit
                                           for fa in self.agents.folders)
        return {**self.status.to_dict(), "replicating": self.replicating,
                "link_stalled": stalled, "hears_peer": self.heartbeats.peer_alive()}

    def wake(self) -> None:
        self._wake.set()

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        await self._refuse_second_instance()
        scripts.set_subreaper()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.heartbeats.run)
            if self.witness is not None:
                try:
                    await nursery.start(self.witness.run)
                except OSError as e:
                    raise X.Failure(X.BAD_CONFIG, f"cannot ping the witness: {e.strerror} "
                                                  f"(the controller must run as root)") from None
            await nursery.start(control.serve, self.socket_path, self.handle)
            port = await nursery.start(httpd.serve, self.config.http.address,
                                       self.config.http.port, self)
            log.info("%s: heartbeats on port %d, HTTP on %s:%d, admin socket %s",
                     self.name, self.config.heartbeat.port, self.config.http.address, port,
                     self.socket_path)
            await self._clean_up_after_a_crash()
            await self.agents.start_all()
            if self.status.state is not State.STOP:
                await self._script("start_both")
            self._started_at = self._progress = trio.current_time()
            nursery.start_soon(self._reaper)
            if self.lease is not None:
                nursery.start_soon(self._keep_lease)
            nursery.start_soon(self._signals)
            task_status.started(port)
            log.info("%s started as %s", self.name, self.status.state)
            while True:
                if not self._stopping:         # shutdown decides alone from then on
                    await self.step()
                with trio.move_on_after(LOOP_PERIOD):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _refuse_second_instance(self) -> None:
        try:
            await trio.to_thread.run_sync(
                lambda: control.request_path(self.socket_path, {"cmd": "ping"}, timeout=2))
        except control.ControlError:
            return
        raise X.Failure(X.RUNNING, f"a controller already runs for module "
                                   f"{self.config.module} on node {self.node.name}")

    async def _clean_up_after_a_crash(self) -> None:
        """A controller that was killed may have left the application running and the
        virtual IP up; the new one starts from WAIT, so both go."""
        if self.store.get("app_started"):
            log.warning("the application may still run from before: running stop_prim")
            await self._script("stop_prim")
            self.store.update(app_started=False)
        await self._vip_down()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: stopping the module on this node", signum)
                await self.shutdown()
                self._nursery.cancel_scope.cancel()
                return

    async def shutdown(self) -> None:
        """Leave cleanly: demote if primary, and unmount the agents this controller
        started (adopted ones stay, read-only). The persisted `stopped` is not
        changed: a daemon stopped by systemd starts the module again."""
        self._stopping = True
        if self._transition is not None:
            self._transition.cancel()
        with trio.CancelScope(shield=True):
            was = self.status.state
            self.status = replace(self.status, state=State.STOP, readiness=Readiness.TRANSIENT,
                                  reason="the controller is stopping", busy=True)
            if was is State.SECOND:
                await self._persist(uptodate=False)    # the primary goes on without us
            if was.is_primary or self.app_started:
                await self._demote(hand_over=False)
            self.status = replace(self.status, state=State.STOP, readiness=Readiness.NOT_READY,
                                  reason="the controller stopped", busy=False)
            await self._send_goodbye()
            await self.agents.stop_started()

    async def _send_goodbye(self) -> None:
        """One more round of heartbeats so that the peer learns at once that this node
        stopped (it need not wait for the timeout)."""
        self.heartbeats.send_now()
        await trio.sleep(min(0.1, 2 * self.config.heartbeat.interval))
        self.heartbeats.send_now()
        await trio.sleep(0.05)

    async def _reaper(self) -> None:
        while True:
            await trio.sleep(1.0)
            scripts.reap_orphans()

    # -- observe -----------------------------------------------------------------------------

    async def observe(self) -> View:
        await self.agents.poll()
        now = trio.current_time()
        stats = self.agents.stats()
        if stats["acks"] > self._acks or stats["applied"] > self._applied:
            self.heartbeats.note_alive()
        self._acks, self._applied = stats["acks"], stats["applied"]
        heard = self.heartbeats.peer_status()
        if heard is not None:
            try:
                self.peer = NodeStatus.from_dict(heard)
            except ValueError as e:
                log.warning("ignoring the peer's status: %s", e)
        alive = self.heartbeats.peer_alive()
        p = self.peer if alive else None
        self._follow_failover(p)
        if alive and not self._peer_was_alive and self.status.state.is_primary:
            self._reannounce()
        self._peer_was_alive = alive
        if not self.agents.healthy() and not self._reviving and not self._stopping:
            self._nursery.start_soon(self._revive)
        me = self._me()
        if self._resolved(me, p):
            log.info("the split brain is over: resolve forgotten")
            await self._persist(resolve="")
            me = replace(me, resolve="")
        exact = link_lost = False
        if me.state is State.SECOND and p is not None and p.state.is_primary:
            me, exact, link_lost = await self._second_facts(me, p, now)
        else:
            self._link_down_since = None
        ages = [s.age for s in self.heartbeats.paths() if s.age is not None]
        silent = min(ages, default=now - self._started_at)
        # When the peer fell silent, the witness must have answered *later* than the
        # next heartbeat was due: an answer from just before a cut proves nothing.
        heard = (now - min(ages) + self.config.heartbeat.interval) if ages else None
        if (self.lease is not None and not self.lease.held() and self.replicating and alive
                and not self.lease.unanswered):
            # Every change waits for the peer's acknowledgement: nothing is acknowledged
            # alone, so the lease is not needed yet (it is asked for meanwhile).
            guard = Guard(True, f"replicating to {self.peer_node.name}")
        elif (self.lease is not None and not self.lease.held()
                and not self.status.state.is_primary
                and ((alive and self.peer is not None and self.peer.hears_peer)
                     or (self.peer is None and now - self._started_at < START_WAIT))):
            # Both nodes are here: the lease goes with the role (the PRIM releases it when
            # it hands over; the new primary asks for it at its new epoch). What a node may
            # acknowledge alone is bounded by the agents' deadline, not by this. A peer that
            # does not hear this node takes it for lost and may take the lease meanwhile:
            # then only the lease lets this node promote (chaos seed 12, fault 47: both
            # promoted, one with the lease, the other for "the same data").
            guard = Guard(True, "the peer is present (the lease goes with the role)")
        elif self.lease is not None:
            guard = self.lease.verdict()
            if guard.ok and not alive and heard is not None and (
                    self.lease.answered is None or self.lease.answered <= heard):
                # As with ping: a grant from before the peer fell silent says nothing
                # about the network now; act alone only after a renewal since.
                guard = Guard(False, "lease not renewed since the peer was lost")
        elif self.witness is not None:
            guard = self.witness.verdict(alive, heard)
        else:
            guard = NO_GUARD
        checkers = self.checkers.views() if self.app_started else ()
        self.guard = guard
        sent_after = self.heartbeats.peer_status_sent_after()
        return View(me=me, guard=guard, peer=self.peer, peer_alive=alive,
                    peer_stale=(me.state.is_primary and sent_after is not None
                                and sent_after < self._primary_since),
                    peer_silent_for=silent,
                    command=self.command.command if self.command else None,
                    running=self.running, script_failure=self.script_failure,
                    app_running=True, checkers=checkers,
                    restarts_in_window=self.restarts.count(now),
                    mounts_ok=self.agents.healthy(),
                    resync_running=any(fa.replica_resyncing for fa in self.agents.folders),
                    mirror_exact=exact, link_lost=link_lost)

    def _me(self) -> NodeStatus:
        """The published status with what is persisted, and what the agents say."""
        s = self.store.data
        diverged = any(fa.changed_alone for fa in self.agents.folders)
        return replace(self.status, epoch=s["epoch"], last_primary=s["last_primary"],
                       uptodate=s["uptodate"], failover=s["failover"], diverged=diverged,
                       resolve=s.get("resolve", ""),
                       changes=sum(fa.journal_items for fa in self.agents.folders)
                       if diverged else 0)

    async def _second_facts(self, me: NodeStatus, p: NodeStatus, now: float):
        """For a SECOND of primary p: keep `uptodate` and the epoch true, and say whether
        the copy is exact and whether the replication link is lost."""
        folders = self.agents.folders
        if p.busy and not p.replicating and (p.state is not State.ALONE or p.hears_peer):
            return me, False, False      # a promotion that has not connected its agents yet
        # (a promotion to ALONE by a node that does not hear this one took the lease to act
        # without it: out of date now; chaos seed 12, fault 9. One that hears it may be
        # about to replicate to it: both nodes had the same data; seed 12, fault 48.)
        if me.uptodate and (p.diverged or not p.replicating
                            or not all(fa.uptodate for fa in folders)):
            why = (f"{p.name} acknowledged writes this node does not have" if p.diverged
                   else f"{p.name} is primary without replicating to this node"
                   if not p.replicating else "a replica reports its copy out of date")
            await self._persist(uptodate=False)
            log.warning("this copy is now out of date: %s", why)
            me = replace(me, uptodate=False)
        connected = all(fa.replica_connected for fa in folders)
        # A resync that ended shortly before this node learnt that its copy was out of
        # date (the news comes with the heartbeats, late) still counts.
        since = self.store.get("outdated_at", 0.0) - 2 * self.config.heartbeat.timeout - 1.0
        if (not me.uptodate and p.replicating and not p.diverged and connected
                and self.agents.healthy() and all(fa.uptodate and fa.resynced_at > since
                                                  for fa in folders)):
            # Every agent was resynchronised by this primary since the copy went out of date.
            await self._persist(uptodate=True, epoch=p.epoch, lease_epoch=p.epoch,
                                last_primary=p.last_primary)
            log.info("this copy is up to date again: resynchronised from %s", p.name)
            me = replace(me, uptodate=True, epoch=p.epoch, last_primary=p.last_primary)
        exact = me.uptodate and p.replicating and connected and self.agents.healthy()
        if exact and ((me.epoch, me.last_primary) != (p.epoch, p.last_primary)
                      or self._claim() != p.epoch):
            await self._persist(epoch=p.epoch, lease_epoch=p.epoch, last_primary=p.last_primary)
            me = replace(me, epoch=p.epoch, last_primary=p.last_primary)
        if connected or not p.replicating:
            self._link_down_since = None
        elif self._link_down_since is None:
            self._link_down_since = now
        grace = 2 * self.config.heartbeat.timeout + 1.0
        lost = p.link_stalled or (self._link_down_since is not None
                                  and now - self._link_down_since > grace)
        return me, exact, lost

    def _follow_failover(self, p: NodeStatus | None) -> None:
        """`failover on|off` given on either node applies to both: a change in what the
        peer publishes is taken over here (not its first value, which says nothing)."""
        if p is None:
            return
        if self.peer_failover is not None and p.failover != self.peer_failover \
                and p.failover != self.store.get("failover"):
            log.info("automatic failover turned %s on %s: the same here",
                     "on" if p.failover else "off", p.name)
            self.store.update(failover=p.failover)
            self.status = replace(self.status, failover=p.failover)
        self.peer_failover = p.failover

    # -- the lease (split-brain guard, lease mode) ----------------------------------------------

    def _wants_lease(self) -> bool:
        """Hold the lease while primary; ask for it when this node may have to act without
        its peer (the peer is silent, or hands over)."""
        s = self.status
        if s.state.is_primary:
            return True
        if s.state not in (State.WAIT, State.SECOND):
            return False
        if s.vote == self.node.name:          # elected, the peer agreeing or about to
            return True
        alive = self.heartbeats.peer_alive()
        p = self.peer
        if not alive or (p is not None and (p.handing_over or p.state is State.STOP)):
            return True
        if s.state is State.WAIT and p is not None and not p.state.is_primary \
                and self._view is not None and local_blocker(self._view, self.policy) is None:
            # Both present, nobody primary: the node the election picks once it holds the
            # lease asks for it (can_promote includes the guard, so nobody would be elected
            # before somebody holds the lease).
            # A peer that does not hear this node (one-way loss) is taken as it says.
            winner, _ = elect(replace(self._view.me, can_promote=True),
                              replace(p, can_promote=p.can_promote or p.hears_peer),
                              self.policy)
            return winner == self.node.name
        return False

    async def _keep_lease(self) -> None:
        every = self.config.witness.renew
        backoff_until = 0.0
        while True:
            if self._wants_lease() and trio.current_time() >= backoff_until:
                async with self._claim_lock:
                    grant = await self.lease.acquire(self._claim())
                if grant is None and not self.lease.held():
                    # Unanswered and not holding it: maybe only the answers are lost (a
                    # one-way loss), and every request extends this node's lease at the
                    # witness. Stay silent for a lease's length so it can expire there.
                    backoff_until = trio.current_time() + self.config.witness.length
                if grant is not None and not grant.granted and self.status.state.is_primary:
                    log.warning("lease: %s", grant.describe())
                self.wake()
            elif self.lease.held() and not self.status.busy:
                await self.lease.release(self._claim())
                log.info("lease released: %s %s does not need it", self.status.state,
                         self.status.readiness)
            await self._push_deadline()
            await trio.sleep(every)

    def _claim(self) -> int:
        """The epoch this node stands for at the witness: the last one the witness granted
        it, or that it took over from the primary it mirrored exactly. Its persisted epoch
        may be newer and yet mean nothing there: a promotion without the witness (both
        nodes present) that was cancelled before it replicated anything; the peer may have
        been granted that same number meanwhile, for writes this node does not have."""
        return self.store.get("lease_epoch", self.store.get("epoch"))

    async def _witness_epoch(self, epoch: int):
        """Has the witness grant `epoch` to this node: first the epoch this node stands for
        (refused if the witness granted a newer one: this copy is older than another's),
        then the new one. The last answer (None if none); lease_epoch persisted if granted.
        Renewals wait meanwhile: one that took the old epoch before and reached the
        witness after the new one was refused, and the agents refused the application's
        first changes after a promotion (start_prim failed on EIO, both nodes waited for
        the admin; chaos seed 12, fifth run, fault 9)."""
        async with self._claim_lock:
            grant = await self.lease.acquire(self._claim())
            if grant is not None and grant.granted and epoch != self._claim():
                grant = await self.lease.acquire(epoch)
            if grant is not None and grant.granted:
                await self._persist(lease_epoch=epoch)
                self._alone_epoch = epoch
        return grant

    async def _fence_peer(self) -> bool:
        """Lease mode: before this node acknowledges a change its peer will not have, the
        witness must refuse the lease to the peer's copy. This node takes a new epoch above
        any the peer may stand for and has the witness grant it (DRBD's fence-peer, done by
        the witness): if this node dies while apart, the peer is not promoted without its
        changes. False when the witness did not grant it: nothing may be acknowledged alone.
        Once per period alone (the promotion that took the lease counts)."""
        if self.lease is None or self._alone_epoch == self.store.get("epoch"):
            return True
        p = self.peer
        new = max(self.store.get("epoch"), self._claim(), p.epoch if p is not None else 0) + 1
        # Published only once granted: the peer, hearing a newer epoch, would fence itself
        # (chaos seed 12, fault 47). A crash between the grant and the record leaves this
        # node below the witness's epoch: refused too, nothing was acknowledged alone.
        grant = await self._witness_epoch(new)
        if grant is not None and grant.granted:
            await self._persist(epoch=new, last_primary=self.node.name)
            log.info("epoch %d granted by the witness before acknowledging changes without "
                     "%s: its copy cannot be given the lease any more", new, self.peer_node.name)
            await self._push_deadline_now(self.lease.valid_until_monotonic)
            return True
        log.error("not acknowledging changes without %s: the witness did not grant epoch %d "
                  "(%s)", self.peer_node.name, new, grant.describe() if grant else "no answer")
        return False

    async def _let_agents_go_alone(self) -> None:
        """Before the agents are told they may acknowledge changes alone: from now on
        they get the lease's deadline, and they have it already (an agent started again
        since the last push has none)."""
        self._agents_alone = True
        if self.lease is not None:
            await self._push_deadline_now(self.lease.valid_until_monotonic)

    async def _push_deadline(self) -> None:
        """The agents may acknowledge changes alone until the lease's end; without a
        lease mode, or while every change waits for the SECOND (policy block: it has the
        change, or counts its copy out of date first), without limit. Pushes
        are serialised, the value taken once the previous one is done (two concurrent
        pushes could arrive in the other order)."""
        if self.lease is None:
            return
        async with self._deadline_lock:
            # (whatever the state: a fence whose switch to replica failed leaves them so)
            alone = self._agents_alone
            deadline = self.lease.valid_until_monotonic if alone else None
            if deadline is not None and deadline == float("-inf"):
                deadline = 0.0
            if deadline != self._deadline_sent:
                errors = await self.agents.set_deadline(deadline)
                if not errors:
                    self._deadline_sent = deadline

    async def _persist(self, **values) -> None:
        if values.get("uptodate") is False and self.store.get("uptodate"):
            values["outdated_at"] = time.time()     # a resync must be later than this
        await trio.to_thread.run_sync(lambda: self.store.update(**values))

    async def _revive(self) -> None:
        self._reviving = True
        starts = sum(fa.starts for fa in self.agents.folders)
        try:
            await self.agents.revive()
        finally:
            self._reviving = False
        if sum(fa.starts for fa in self.agents.folders) > starts and self.app_started:
            # The application holds its files on the dead mount: it must start again on
            # the new one (found by the chaos harness: without a checker, nothing else
            # would ever notice).
            self._app_on_dead_mount = True

    # -- decide and act -----------------------------------------------------------------------

    async def step(self) -> Decision:
        view = self._view = await self.observe()
        d = decide(view, self.policy)
        self._progress = trio.current_time()
        self.decisions += 1
        if d.reason != self._reason:
            log.log(logging.WARNING if d.readiness is Readiness.NOT_READY else logging.INFO,
                    "%s %s: %s", d.state, d.readiness, d.reason)
            self._reason = d.reason
        if d.command_done and self.command is not None:
            ok = d.action is not Action.REFUSE
            self.command.answer = {"ok": ok, "reason": d.reason, "state": str(d.state),
                                   **({} if ok else {"error": d.reason, "code": X.REFUSED})}
            self.command.done.set()
            self.command = None
        leaving = (d.action is Action.GO_WAIT and view.me.state is State.SECOND
                   and view.peer_alive and view.peer is not None and view.peer.state.is_primary)
        if d.action is Action.PROMOTE:
            await self._persist(epoch=d.epoch, last_primary=self.node.name, uptodate=True)
        elif d.action in (Action.FAILOVER_ON, Action.FAILOVER_OFF):
            await self._persist(failover=d.action is Action.FAILOVER_ON)
        elif leaving:
            # The primary goes on without this node once it hears that it left: recorded
            # before anything says so.
            await self._persist(uptodate=False)
        new = published(view, self.policy, d)
        if new.state.is_primary and not self.status.state.is_primary:
            self._primary_since = trio.current_time()
        if leaving:
            new = replace(new, uptodate=False)
        if (new.state, new.readiness, new.busy, new.vote, new.handing_over,
                new.swap_requested) != (self.status.state, self.status.readiness,
                                        self.status.busy, self.status.vote,
                                        self.status.handing_over, self.status.swap_requested):
            self.heartbeats.send_now()
        if d.action in (Action.NOTHING, Action.REFUSE, Action.FAILOVER_ON, Action.FAILOVER_OFF):
            self.status = new
            if view.running is None:
                self._reconcile(view)
            return d
        if d.action is Action.FENCE and self._transition is not None:
            log.warning("fencing: the running %s is cancelled", self.running)
            self._transition.cancel()
        self.status = replace(new, readiness=Readiness.TRANSIENT)
        self.transitions[d.action.value] = self.transitions.get(d.action.value, 0) + 1
        self._start_transition(d.action.value, self._carry_out(view, d))
        return d

    def _reconcile(self, view: View) -> None:
        """Agents whose role does not match the state (an agent started again, a
        primary whose peer went away before joining) are put right."""
        state = view.me.state
        folders = self.agents.folders
        if not self.agents.healthy():
            return
        if self._app_on_dead_mount and state.is_primary:
            self._app_on_dead_mount = False
            log.warning("a mount agent was started again under the running application: "
                        "restarting the application on the new mount")
            self._start_transition("restarting the application", self._restart_app())
            return
        self._app_on_dead_mount = False
        p = view.peer if view.peer_alive else None
        if state is State.PRIM and self.replicating and any(fa.peer_outdated for fa in folders):
            # The SECOND could not apply a change (its disk is full, say): the agents'
            # changes wait (policy block) until it is resynchronised or this node goes on
            # without it; failing them made the application fail (chaos seed 12, fault 65).
            log.warning("%s could not apply a change: its copy is out of date; going on "
                        "without it until it is resynchronised", self.peer_node.name)
            self.replicating = False
            self._resync_tried = -RESYNC_RETRY       # the changes wait: at once
            self.heartbeats.send_now()
        if state in (State.STOP, State.WAIT, State.SECOND):
            if any(fa.role != REPLICA for fa in folders):
                self._start_transition(f"agents to {REPLICA}", self._agents_to(REPLICA))
        elif (state is State.PRIM and not self.replicating and p is not None
                and p.state is State.SECOND and not p.busy):
            self._resync_or_replicate(folders, p)
        elif self._second_stuck(state, p, folders):
            self._start_transition("resync", self._resync_stuck_second())
        elif self.replicating and p is not None and p.state in (State.WAIT, State.SECOND):
            if any(fa.role != PRIMARY for fa in folders):
                self._start_transition("agents to primary", self._connect_agents())
            elif state is State.ALONE and any(fa.link != "connected" for fa in folders):
                log.warning("the replication link to %s is %s before it joined: going on "
                            "alone", p.name, [fa.link for fa in folders])
                self._start_transition(f"agents to {ALONE}", self._agents_to(ALONE, lost=True))
        elif (state is State.PRIM and p is not None and p.state is State.SECOND and p.busy
                and any(fa.role == PRIMARY for fa in folders)):
            pass        # its transition ends first: it may still count its copy up to date
        elif any(fa.role != ALONE for fa in folders):
            if self.replicating:
                log.warning("%s is no longer heard as WAIT or SECOND: going on alone",
                            self.peer_node.name)
            self._start_transition(f"agents to {ALONE}", self._agents_to(ALONE, lost=True))

    def _second_stuck(self, state: State, p: NodeStatus | None, folders) -> bool:
        """A SECOND that counts its copy out of date although every change reaches it and
        no agent knows of one it lacks: it drew that from a status heard in passing (a
        promotion seen before it connected its agents; chaos seed 12, fault 48). Only a
        resynchronisation lets it count up to date again: due after a grace period that
        covers the usual delay of that news, and a retry interval."""
        stuck = (state is State.PRIM and self.replicating and p is not None
                 and p.state is State.SECOND and not p.busy and not p.uptodate
                 and all(fa.link == "connected" for fa in folders))
        now = trio.current_time()
        if not stuck:
            self._second_outdated_since = None
            return False
        if self._second_outdated_since is None:
            self._second_outdated_since = now
        grace = 2 * self.config.heartbeat.timeout + 1.0
        if now - self._second_outdated_since < grace or now - self._resync_tried < RESYNC_RETRY:
            return False
        self._resync_tried = now
        return True

    async def _resync_stuck_second(self) -> None:
        log.warning("%s counts its copy out of date while every change reaches it: "
                    "resynchronising it from the journal", self.peer_node.name)
        answer = await self._admin_resync(False)
        if not answer["ok"]:
            log.warning("cannot resynchronise %s: %s", self.peer_node.name, answer["error"])

    def _resync_or_replicate(self, folders, p: NodeStatus) -> None:
        """PRIM whose SECOND is out of date: the agents resynchronise it (going on alone
        meanwhile); once every link is connected, replication is synchronous again.
        Without a lease (no witness to refuse the SECOND's copy), nothing goes on alone
        before the SECOND is heard counting its copy out of date: if this node died
        meanwhile, the SECOND must not take over without those changes."""
        links = [fa.link for fa in folders]
        if (all(fa.role == PRIMARY for fa in folders) and all(k == "connected" for k in links)
                and not any(fa.peer_outdated for fa in folders)):
            log.info("%s is up to date: replicating to it", self.peer_node.name)
            self._start_transition("replicating", self._connect_agents())
        elif self.lease is None and p.uptodate and any(fa.role == PRIMARY for fa in folders):
            return      # it hears this node is not replicating to it: it will say so
        elif any(k not in ("resync", "connected") or fa.role != PRIMARY
                 or (k == "resync" and fa.policy != "alone") for k, fa in zip(links, folders)):
            # (a resync the agents began by themselves, changes waiting under policy
            # block: they go on alone, the peer fenced first)
            now = trio.current_time()
            if now - self._resync_tried < RESYNC_RETRY:
                return
            self._resync_tried = now
            log.info("resynchronising %s (links: %s)", self.peer_node.name, links)
            self._start_transition("resync", self._start_resync())

    async def _start_resync(self) -> None:
        if not await self._fence_peer():     # changes are acknowledged during the resync
            return
        await self._let_agents_go_alone()
        errors = await self.agents.set_role(PRIMARY, policy="alone")
        if errors:
            log.warning("cannot resynchronise %s (%s); trying again in %g s",
                        self.peer_node.name, "; ".join(errors), RESYNC_RETRY)

    def _start_transition(self, name: str, coro) -> None:
        self.running = name
        self.status = replace(self.status, busy=True)
        self._nursery.start_soon(self._run_transition, coro)

    async def _run_transition(self, coro) -> None:
        try:
            with trio.CancelScope() as self._transition:
                await coro
        finally:
            self._transition = None
            self.running = None
            self.status = replace(self.status, busy=False)
            self.heartbeats.send_now()
            self.wake()

    async def _carry_out(self, view: View, d: Decision) -> None:
        a = d.action
        p = view.peer if view.peer_alive else None
        if a is Action.GO_WAIT:
            if view.me.state is State.STOP:
                await self._persist(stopped=False)
                self.script_failure = None
                await self._script("start_both")
            await self._agents_to(REPLICA)
        elif a is Action.BECOME_SECOND:
            self.script_failure = None
            await self._agents_to(REPLICA)
        elif a is Action.PROMOTE:
            await self._promote(view, p)
        elif a is Action.BECOME_PRIM:
            pass        # replicating already, or the peer needs a resync first (agents alone)
        elif a is Action.BECOME_ALONE:
            if self.lease is not None:        # alone, changes stop at the lease's end
                await self._push_deadline_now(self.lease.valid_until_monotonic)
            await self._agents_to(ALONE, lost=True)
        elif a in (Action.HAND_OVER, Action.DEMOTE):
            await self._demote(hand_over=a is Action.HAND_OVER)
        elif a is Action.FENCE:
            await self._agents_to(REPLICA, fence=True)   # no write is acknowledged from now
            await self._demote(hand_over=False)
        elif a is Action.RESTART_APP:
            if view.command is None:
                self.restarts.note_restart(trio.current_time())
            await self._stop_app()
            await self._start_app()
        elif a is Action.STOP:
            if view.me.state.is_primary or self.app_started:
                await self._demote(hand_over=False)
            await self._agents_to(REPLICA)
            await self._script("stop_both")
            await self._persist(stopped=True)

    # -- the steps ------------------------------------------------------------------------------

    def _same_data(self, me: NodeStatus, p: NodeStatus | None) -> bool:
        """Whether the peer's copy is known to equal this node's, so that the agents
        can replicate to it at once (otherwise it needs a resync first)."""
        if p is None or p.state not in (State.WAIT, State.SECOND) or p.busy:
            return False
        if me.diverged or p.diverged or not p.uptodate or not me.uptodate:
            return False
        return (p.epoch, p.last_primary) == (me.epoch, me.last_primary)

    async def _push_deadline_now(self, deadline: float) -> None:
        async with self._deadline_lock:
            await self.agents.set_deadline(max(deadline, 0.0))
            self._deadline_sent = max(deadline, 0.0)

    async def _finish_first_resync(self) -> None:
        """A promotion that resynchronises its peer first (a first pairing): let that end
        and replicate, so that the peer can take over this epoch if this node gives up."""
        folders = self.agents.folders
        if self.replicating or not all(fa.role == PRIMARY and fa.link in ("resync", "connected")
                                       for fa in folders):
            return
        with self._step("waiting for the peer's resynchronisation"):
            with trio.move_on_after(2 * self.config.heartbeat.timeout + 5):
                while not all(fa.link == "connected" for fa in folders):
                    await trio.sleep(0.05)
                await self._connect_agents()

    async def _wait_peer_adopts(self) -> None:
        """Before a primary that replicated to its peer gives up (its start_prim failed,
        say), let the peer take this epoch as its own: its copy is the same, and it can
        then be elected instead of waiting for a node that cannot promote."""
        epoch = self.store.get("epoch")
        with self._step("waiting for the peer to follow"):
            with trio.move_on_after(2 * self.config.heartbeat.timeout + 1):
                while True:
                    p = self.peer if self.heartbeats.peer_alive() else None
                    if p is None:
                        return
                    if p.state is State.SECOND and p.epoch == epoch and p.uptodate:
                        log.info("%s follows at epoch %d", p.name, epoch)
                        return
                    await trio.sleep(0.05)

    async def _promote(self, view: View, p: NodeStatus | None) -> None:
        epoch = self.store.get("epoch")
        log.info("promotion 1/4: epoch %d persisted", epoch)
        self.replicating = False
        self.script_failure = None        # this attempt's own outcome decides from here
        if self.lease is not None and not self._same_data(view.me, p):
            grant = await self._witness_epoch(epoch)
            if grant is None or not grant.granted:
                why = (f"the witness did not grant the lease at epoch {epoch}: "
                       f"{grant.describe() if grant else 'no answer'}")
                log.error("promotion aborted: %s", why)
                self.script_failure = ScriptFailure("promotion", detail=why)
                # Nothing was written at the new epoch: keep the history as it was, so
                # that the peer's copy still counts as the same data.
                await self._persist(epoch=view.me.epoch, last_primary=view.me.last_primary)
                return
            await self._push_deadline_now(self.lease.valid_until_monotonic)
        if self._same_data(view.me, p):
            await self._connect_agents()
        elif p is not None:
            log.info("promotion: not replicating to %s (%s %s, busy %s, uptodate %s, epoch %d "
                     "by %r; here epoch %d by %r)", p.name, p.state, p.readiness, p.busy,
                     p.uptodate, p.epoch, p.last_primary, view.me.epoch, view.me.last_primary)
        resyncing = not self.replicating and self._same_data(view.me, p) and all(
            fa.role == PRIMARY and fa.link == "resync" for fa in self.agents.folders)
        if not self.replicating and not resyncing:
            await self._agents_to(ALONE, lost=True)
        log.info("promotion 2/4: agents %s", f"primary, replicating to {p.name}"
                 if self.replicating else f"primary, resynchronising {p.name} first"
                 if resyncing else "alone")
        await self._vip_up()
        log.info("promotion 3/4: virtual IP done")
        await self._start_app()
        log.info("promotion 4/4: application %s", "started" if self.script_failure is None
                 else "FAILED to start")

    async def _connect_agents(self) -> None:
        errors = await self.agents.set_role(PRIMARY, policy="block")
        if errors:
            log.warning("cannot replicate to %s (%s): going on alone", self.peer_node.name,
                        "; ".join(errors))
            await self._agents_to(ALONE, lost=True)
            return
        # Every change waits for the peer again, or for it to count its copy out of date
        # (a resynchronisation): no lease is needed for that (the promotion of a first
        # pairing, before the witness grants anything, made the application fail on EIO).
        self._agents_alone = False
        links = [fa.link for fa in self.agents.folders]
        if all(k == "connected" for k in links):
            self.replicating = True
            # Every change reaches the peer again, which takes this node's epoch: the next
            # period alone needs a new one, and this one is what this node stands for.
            self._alone_epoch = None
            if self._claim() != self.store.get("epoch"):
                await self._persist(lease_epoch=self.store.get("epoch"))
        else:
            # The peer's copy must be compared first (a first pairing): the agents
            # resynchronise it, and replication counts once they are all connected.
            log.info("%s is resynchronised first (links: %s)", self.peer_node.name, links)

    async def _agents_to(self, role: str, lost: bool = False, fence: bool = False) -> None:
        if role != PRIMARY:
            self.replicating = False
        if role == ALONE and not await self._fence_peer():
            return          # the agents stay as they are: nothing is acknowledged alone
        if role == ALONE:
            await self._let_agents_go_alone()
        with self._step(f"agents to {role}"):
            errors = await self.agents.set_role(role, policy="alone" if role == ALONE
                                                else "block", peer_lost=lost, fence=fence)
        if errors:
            log.error("agents to %s: %s", role, "; ".join(errors))
        elif role != ALONE:
            self._agents_alone = False

    async def _demote(self, hand_over: bool) -> None:
        what = "hand-over" if hand_over else "demotion"
        await self._stop_app()
        log.info("%s 1/3: application stopped", what)
        await self._vip_down()
        log.info("%s 2/3: virtual IP down", what)
        await self._agents_to(REPLICA)
        log.info("%s 3/3: agents replica (read-only)", what)
        if self.lease is not None and self.lease.held():
            await self.lease.release(self._claim())
            log.info("%s: lease released", what)

    async def _restart_app(self) -> None:
        await self._stop_app()
        await self._start_app()

    async def _start_app(self) -> None:
        self.checkers.reset()
        with self._step("waiting for the mount agents"):
            # Never under a missing mount: the application would write in the bare folder.
            with trio.move_on_after(AGENTS_WAIT):
                while not self.agents.healthy():
                    await trio.sleep(0.05)
        if not self.agents.healthy():
            self.script_failure = ScriptFailure(
                "start_prim", detail=f"not started: {self.agents.unhealthy_reason()}")
            log.error("start_prim not run: a mount agent is not healthy (%s)",
                      self.agents.unhealthy_reason())
            return
        if not self.status.state.is_primary:
            # This node stopped being primary while it waited (its lease ran out during
            # an application restart; chaos finding: the agents were made primary again
            # under a WAIT controller and the application acknowledged a request that the
            # new primary never had).
            log.warning("start_prim not run: this node is %s now", self.status.state)
            return
        if any(fa.role == REPLICA for fa in self.agents.folders):
            # An agent started again (after it died) comes back read-only: give it the
            # primary's role first, or the application would meet EROFS.
            if self.replicating:
                await self._connect_agents()
            else:
                await self._agents_to(ALONE, lost=True)
        await self._persist(app_started=True)
        self.app_started = True
        starts = sum(fa.starts for fa in self.agents.folders)
        result = await self._script("start_prim")
        if result is not None and not result.ok:
            await self.agents.poll()
            if (not self.agents.healthy() or self._reviving
                    or sum(fa.starts for fa in self.agents.folders) != starts):
                # A mount agent died under it (chaos finding: counted as a failure of
                # start_prim, it blocked automatic promotion until the admin came): the
                # application starts again once the mounts are back.
                log.warning("start_prim failed while a mount agent was gone or starting "
                            "again: the application starts again once the mounts are back")
                self._app_on_dead_mount = True
                return
            self.script_failure = result.failure("start_prim")
            await self._finish_first_resync()
            if self.replicating:
                await self._wait_peer_adopts()
            return
        self._start_checkers()

    async def _stop_app(self) -> None:
        self._stop_checkers()
        if not self.app_started and not self.store.get("app_started"):
            return
        await self._script("stop_prim")
        self.app_started = False
        await self._persist(app_started=False)

    def _start_checkers(self) -> None:
        if not self.checkers.checks:
            return
        self._checker_scope = trio.CancelScope()

        async def run():
            with self._checker_scope:
                await self.checkers.run()

        self._nursery.start_soon(run)

    def _stop_checkers(self) -> None:
        if self._checker_scope is not None:
            self._checker_scope.cancel()
            self._checker_scope = None

    async def _script(self, which: str):
        script = getattr(self.config.scripts, which)
        if script is None:
            return None
        log.info("running %s", which)
        with self._step(which):
            result = await scripts.run_script(
                script, env={**self.env, "FUSEMIRROR_STATE": str(self.status.state)},
                log_path=self.script_log, name=which)
        (log.info if result.ok else log.error)("%s: %s", which,
                                               "ok" if result.ok else result.detail)
        return result

    @contextlib.contextmanager
    def _step(self, name: str):
        """Show the step running (View.running, `state`) while it runs."""
        before, self.running = self.running, name
        try:
            yield
        finally:
            self.running = before

    async def _vip_up(self) -> None:
        v = self.config.vip
        if v is None:
            return
        try:
            iface = v.interface or await trio.to_thread.run_sync(vip.choose_interface, v.cidr)
            await trio.to_thread.run_sync(vip.add, v.cidr, iface)
            # One announcement now; the others go on while the application starts.
            await trio.to_thread.run_sync(vip.announce, v.address, iface, 1)
            log.info("virtual IP %s up on %s", v.cidr, iface)
        except vip.VipError as e:
            log.error("virtual IP %s: %s", v.cidr, e)
            return
        if v.arp_count > 1:
            self._nursery.start_soon(self._announce_more, v.address, iface, v.arp_count - 1)

    def _reannounce(self) -> None:
        """The peer is heard again while this node is primary: a partition has healed, and
        the client side may still point at the other node; say again where the VIP is."""
        v = self.config.vip
        if v is None or self._nursery is None:
            return
        log.info("the peer is heard again: announcing the virtual IP %s again", v.cidr)

        async def again():
            try:
                iface = v.interface or await trio.to_thread.run_sync(vip.choose_interface,
                                                                     v.cidr)
                if await trio.to_thread.run_sync(vip.present, v.cidr, iface):
                    await trio.to_thread.run_sync(vip.announce, v.address, iface,
                                                  max(1, v.arp_count))
            except vip.VipError as e:
                log.warning("virtual IP %s: announcing again: %s", v.cidr, e)

        self._nursery.start_soon(again)

    async def _announce_more(self, address: str, iface: str, count: int) -> None:
        await trio.sleep(ANNOUNCE_INTERVAL)
        try:
            await trio.to_thread.run_sync(vip.announce, address, iface, count)
        except vip.VipError as e:
            log.warning("virtual IP %s: announcing: %s", address, e)

    async def _vip_down(self) -> None:
        v = self.config.vip
        if v is None:
            return
        try:
            if await trio.to_thread.run_sync(vip.remove, v.cidr, v.interface):
                log.info("virtual IP %s down", v.cidr)
        except vip.VipError as e:
            log.error("virtual IP %s: %s", v.cidr, e)

    # -- admin requests ----------------------------------------------------------------------

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        if cmd == "ping":
            return {"ok": True, "pid": os.getpid(),
                    "log_file": os.path.join(self.log_dir, f"{self.name}.log")}
        if cmd == "state":
            report = self.http_state()
            if report["me"].get("diverged"):
                report["divergence"] = await self.agents.changes()
            return {"ok": True, **report}
        if cmd == "resync":
            return await self._admin_resync(bool(req.get("full")))
        if cmd == "resolve":
            return await self._admin_resolve(str(req.get("keep", "")))
        if cmd == "second" and req.get("fullsync"):
            answer = await self._admin_fullsync()
            if not answer["ok"] or self.status.state is State.SECOND:
                return answer
        try:
            command = Command(cmd)
        except ValueError:
            return {"ok": False, "error": f"unknown command {cmd!r}", "code": X.USAGE}
        if self.command is not None:
            return {"ok": False, "error": f"{cmd} refused: {self.command.command} is pending",
                    "code": X.REFUSED}
        pending = self.command = _Pending(command)
        self.wake()
        with trio.move_on_after(COMMAND_TIMEOUT):
            await pending.done.wait()
        if not pending.done.is_set():
            if self.command is pending:
                self.command = None
            return {"ok": False, "error": f"{cmd}: no decision within {COMMAND_TIMEOUT:g} s "
                                          f"(running {self.running})", "code": X.FAILED}
        return pending.answer

    async def _admin_resync(self, full: bool) -> dict:
        """`fusemirror resync [--full]` on the primary: its agents compare the SECOND's
        copy again (everything, when it is up to date or with --full) and fix it."""
        if self.status.state is not State.PRIM:
            return {"ok": False, "code": X.REFUSED,
                    "error": f"resync runs on the PRIM, and this node is {self.status.state}"}
        errors = await self.agents.each({"cmd": "resync", "full": full}, timeout=30)
        if errors:
            return {"ok": False, "code": X.FAILED, "error": "; ".join(errors)}
        return {"ok": True, "reason": f"resynchronising {self.peer_node.name} "
                                      f"({'full' if full else 'from the journal'})"}

    async def _admin_resolve(self, keep: str) -> dict:
        """`fusemirror resolve --keep NODE`: end a split brain. NODE becomes (or stays) the
        primary; the other node follows it, and its own versions of what differs are
        moved to quarantine by the resynchronisation, not discarded."""
        names = (self.node.name, self.peer_node.name)
        if keep not in names:
            return {"ok": False, "code": X.USAGE,
                    "error": f"resolve --keep takes {' or '.join(names)}, not {keep!r}"}
        me, p = self._me(), self.peer
        if not me.diverged and not (p is not None and p.diverged):
            return {"ok": False, "code": X.REFUSED,
                    "error": "resolve refused: no split brain (neither node acknowledged "
                             "writes the other lacks)"}
        await self._persist(resolve=keep)
        self.status = replace(self.status, resolve=keep)
        self.heartbeats.send_now()
        self.wake()
        other = names[1] if keep == names[0] else names[0]
        return {"ok": True, "reason": f"{keep} is kept as the source; {other}'s own versions "
                                      f"go to quarantine as it is resynchronised"}

    def _resolved(self, me: NodeStatus, p: NodeStatus | None) -> bool:
        """A split brain the admin resolved is over once the SECOND is up to date."""
        if not me.resolve or p is None:
            return False
        if me.state is State.SECOND and me.uptodate and not me.diverged:
            return True
        return me.state.is_primary and p.state is State.SECOND and p.uptodate \
            and not p.diverged

    async def _admin_fullsync(self) -> dict:
        """`fusemirror second --fullsync`: this node's copy is resynchronised by comparing
        everything (restored from a backup, or suspect). It is out of date until then."""
        if self.status.state.is_primary:
            return {"ok": False, "code": X.REFUSED,
                    "error": f"second --fullsync refused: this node is {self.status.state}"}
        await self._persist(uptodate=False)
        errors = await self.agents.each({"cmd": "fullsync"}, timeout=30)
        if errors:
            return {"ok": False, "code": X.FAILED, "error": "; ".join(errors)}
        return {"ok": True, "reason": "this copy is out of date until a full resynchronisation",
                "state": str(self.status.state)}

    # -- HTTP provider -----------------------------------------------------------------------

    def http_ready(self) -> tuple[bool, str]:
        s = self.status
        ok = s.state.is_primary and s.readiness is Readiness.READY and self.app_started
        return ok, f"{s.state} ({s.readiness}): {s.reason}"

    def http_alive(self) -> tuple[bool, str]:
        age = trio.current_time() - self._progress
        return age < LIVENESS_LIMIT, f"last decision {age:.1f} s ago"

    def http_state(self) -> dict:
        return state_report(self)

    def http_metrics(self) -> str:
        return metrics_page(self)


def run_daemon(config_path: str, node_name: str, **dirs) -> None:
    """`fusemirror daemon`: load, check and run until SIGTERM. Raises X.Failure."""
    cfg = C.load(config_path)
    controller = Controller(cfg, node_name, **dirs)
    try:
        trio.run(controller.run)
    except BaseExceptionGroup as group:
        failure = _first_failure(group)
        if failure is None:
            raise
        raise failure from None


def _first_failure(group: BaseExceptionGroup) -> X.Failure | None:
    """The user-facing failure that ended the nursery (a port already in use, say)."""
    for e in group.exceptions:
        if isinstance(e, X.Failure):
            return e
        if isinstance(e, BaseExceptionGroup):
            found = _first_failure(e)
            if found is not None:
                return found
    return None
