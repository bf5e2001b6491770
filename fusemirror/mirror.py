"""The primary's end of replication: sends operations in order, collects acknowledgements,
and applies the peer-loss policy.

Every mutating operation gets the next sequence number and is sent on one TCP
connection; many can be in flight at once (one per FUSE request being served),
bounded by MAX_IN_FLIGHT. The replica applies them in order and acknowledges each
after applying it. A caller learns the outcome with finish():

- acknowledged with errno 0: the peer has it;
- the peer could not apply it, or the link is gone: the peer is marked out of date
  in the state file *before* any caller is answered; then, with policy "alone",
  the caller goes on (the change is local only and journaled), with policy "block"
  the caller waits up to `timeout` for the link to come back (the unacknowledged
  operations are resent on the resumed session), and fails with PeerError after.
"""

from __future__ import annotations

import bisect
import contextvars
import enum
import logging
import os
import time

import trio

from . import protocol as P
from .statefile import StateFile
from .wire import FrameStream, HandshakeRefused, LinkClosed, client_handshake

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 256                 # operations sent and not yet acknowledged
MAX_IN_FLIGHT_BYTES = 64 << 20      # and their frames' bytes, kept for a resend
_SMALL_FRAME = 4096                 # window share of a frame encoded at sequencing time
PING_INTERVAL = 1.0
MANIFEST_TIMEOUT = 600.0            # building a manifest reads every file of the tree
RECONNECT_INTERVAL = 0.2
# Upper bounds (µs) of the acknowledgement latency histogram kept in stats["rtt_buckets"]
# (one more bucket counts what is above the last bound); read by the controller's /metrics.
RTT_BOUNDS_US = (100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000, 250000,
                 500000, 1000000, 2500000, 5000000, 10000000)


_NOT_CHANGES = (P.Kind.PING, P.Kind.RELEASE, P.Kind.MANIFEST_REQ, P.Kind.PROBE)

# The items (inode numbers) the change being sequenced touches, set by the caller around
# begin(): if the peer loses or cannot apply the change, they are journaled; during a
# resynchronisation, they are sent again (Mirror.on_failed).
TOUCHED: contextvars.ContextVar[tuple] = contextvars.ContextVar("touched", default=())


class Policy(str, enum.Enum):
    BLOCK = "block"
    ALONE = "alone"


class PeerError(Exception):
    """The operation could not be confirmed by the peer (maps to EIO)."""


class PeerBehind(PeerError):
    """Policy block: the peer, still connected, could not apply a change made here. The
    caller, once its own part is done, may wait for the outcome (settled_without)."""

    def __init__(self, why: str, journaled: int):
        super().__init__(why)
        self.journaled = journaled


class PeerUnreachable(Exception):
    pass


class Link(str, enum.Enum):
    CONNECTED = "connected"
    RECONNECTING = "reconnecting"
    OUTDATED = "outdated"      # peer's copy is not good; nothing is replicated
    RESYNC = "resync"          # changes are replicated while the peer is brought up to date
    CLOSED = "closed"


class Pending:
    __slots__ = ("seq", "parts", "done", "errno", "lost", "chunks", "sent", "patient", "size",
                 "mirror", "complete", "kind", "touched", "resync", "failed_here", "requeued",
                 "alone")

    def __init__(self, seq: int, parts: list, size: int, mirror=None):
        self.mirror = mirror     # the link it was sent on (roles may change meanwhile)
        self.seq = seq
        self.parts = parts
        self.size = size         # what it holds of the in-flight window
        self.done = trio.Event()
        self.errno = 0
        self.lost = False
        self.chunks: list[bytes] | None = None
        self.complete = False    # every chunk of a manifest arrived
        self.sent = time.monotonic()
        self.patient = False     # exempt from the acknowledgement timeout (manifests)
        self.kind = None         # the operation's protocol kind
        self.touched = ()        # the items it changes (inode numbers)
        self.resync = False      # sent during a resynchronisation
        self.failed_here = 0     # the errno it failed with here (set before its answer)
        self.requeued = False    # its failure there was handed to the running resync
        self.alone = False       # given up under policy alone: it goes on without the peer


class Mirror:
    def __init__(self, peer: tuple[str, int], secret: bytes, state: StateFile, *,
                 policy: Policy = Policy.BLOCK, timeout: float = 10.0, label: bytes = b"",
                 versions: tuple[int, int] = (P.PROTOCOL_MIN, P.PROTOCOL_MAX),
                 on_outdated=None):
        self.peer = peer
        self.secret = secret
        self.state = state
        self._policy = policy
        self.timeout = timeout
        self.label = label
        self.versions = versions
        self.on_outdated = on_outdated
        self.session = int.from_bytes(os.urandom(8), "little") or 1
        self.link = Link.CLOSED
        self._fs: FrameStream | None = None
        self._seq = 0
        self._pending: dict[int, Pending] = {}
        self._send_lock = trio.Lock()
        self._window = _Window(MAX_IN_FLIGHT, MAX_IN_FLIGHT_BYTES)
        self._changed = trio.Event()      # set on every change of self.link or self.policy
        self._resyncs_begun = 0
        self._peer_outdated_from = 0      # the peer counts its copy out of date for every
        #                                   operation after this one (the running resync's
        #                                   RESYNC_BEGIN)
        self._resynced_upto = 0          # the resynchronisations begun when one ended
        self.spoiled: str | None = None  # why the running resync no longer counts: a change
        #                                  made the copies differ meanwhile (see diverged)
        self._lost_at = 0.0
        self._nursery: trio.Nursery | None = None
        self._retiring = False
        self._relinking = False          # a new link to the peer is being made (on_back_outdated)
        self.on_failed = None            # resynchronisation: callable(pending) when the
        #                                  peer could not apply a change
        self.journal = None              # journal.Journal: what the peer may lack
        self.on_back_outdated = None     # the peer answers again, but out of date
        self.stats = {"ops": 0, "bytes": 0, "acks": 0, "reconnects": 0, "last_rtt_us": 0,
                      "rtt_sum_us": 0, "rtt_buckets": [0] * (len(RTT_BOUNDS_US) + 1)}

    # --- connecting ----------------------------------------------------------
    async def _open(self) -> tuple[FrameStream, P.Message]:
        host, port = self.peer
        try:
            with trio.fail_after(max(1.0, min(self.timeout, 5.0))):
                stream = await trio.open_tcp_stream(host, port)
        except (OSError, trio.TooSlowError) as e:
            raise PeerUnreachable(f"cannot reach peer {host}:{port}: "
                                  f"{getattr(e, 'strerror', None) or e or 'timed out'}") from None
        fs = FrameStream(stream)
        try:
            with trio.fail_after(max(1.0, self.timeout)):
                welcome = await client_handshake(fs, self.secret, self.session, self.label,
                                                 self.versions)
        except (LinkClosed, P.ProtocolError, trio.TooSlowError) as e:
            await fs.aclose()
            raise PeerUnreachable(f"handshake with {host}:{port} failed: {e or 'timed out'}") \
                from None
        except HandshakeRefused:
            await fs.aclose()
            raise
        return fs, welcome

    async def connect(self) -> None:
        """First connection; raises PeerUnreachable or HandshakeRefused."""
        fs, welcome = await self._open()
        self._fs = fs
        first = fs.version >= 2 and not self.state.get("peer_synced")
        if not welcome.uptodate or self.state.get("peer_outdated") or first:
            reason = self.state.get("reason") or "the peer reports its copy is out of date"
            if first and not self.state.get("peer_outdated"):
                # Nothing says the two copies are equal (the folders may have held data
                # before they were paired): everything is compared once.
                reason = "first pairing: the peer's copy was never compared with this one"
                if self.journal is not None:
                    await self.journal.mark_everything()
            self.state.mark_peer_outdated(reason)
            self._set(Link.OUTDATED)
            log.log(logging.INFO if reason.startswith("first pairing") else logging.ERROR,
                    "peer %s:%s is OUT OF DATE (%s): it is resynchronised before it counts as "
                    "a copy", *self.peer, reason)
        else:
            await trio.to_thread.run_sync(self.state.mark_acting, True)
            self._set(Link.CONNECTED)
            log.info("replicating to %s:%s (session %016x, protocol %d)", *self.peer,
                     self.session, fs.version)

    @property
    def policy(self) -> Policy:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy) -> None:
        self._policy = policy          # (the controller's decision: what waits for it wakes)
        self._wake()

    @property
    def version(self) -> int:
        """The protocol version of the current connection (0: none)."""
        return self._fs.version if self._fs is not None else 0

    def _set(self, link: Link) -> None:
        if link != self.link:
            self.link = link
            self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # --- background tasks ----------------------------------------------------
    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._watchdog)
            task_status.started()
            while self.link != Link.CLOSED:
                if self.link in (Link.CONNECTED, Link.OUTDATED, Link.RESYNC) \
                        and self._fs is not None:
                    await self._read(self._fs)
                elif self.link == Link.RECONNECTING:
                    await self._reconnect()
                else:
                    await self._changed.wait()
            nursery.cancel_scope.cancel()

    async def _read(self, fs: FrameStream) -> None:
        try:
            while True:
                msg = await fs.receive()
                if msg.kind == P.Kind.ACK:
                    self._acked(msg.seq, msg.errno)
                elif msg.kind == P.Kind.MANIFEST:
                    p = self._pending.get(msg.seq)
                    if p is not None:
                        p.chunks = (p.chunks or []) + [msg.chunk]
                        if msg.last:
                            p.complete = True
                            self._acked(msg.seq, 0)
                elif msg.kind == P.Kind.BYE:
                    raise LinkClosed("peer said goodbye")
                else:
                    raise P.ProtocolError(f"unexpected {msg.kind.name} from replica")
        except (LinkClosed, P.ProtocolError) as e:
            if fs is self._fs and self.link != Link.CLOSED:
                await self._lost(str(e))
            if self._retiring and fs is self._fs:
                # Dropped by the peer for our successor: nothing to read until this
                # link is closed (or, if the successor failed, the watchdog decides).
                await self._changed.wait()

    def _acked(self, seq: int, errno: int) -> None:
        p = self._pending.pop(seq, None)
        if p is None:
            return
        self.stats["acks"] += 1
        if not p.patient:
            rtt = int((time.monotonic() - p.sent) * 1e6)
            self.stats["last_rtt_us"] = rtt
            self.stats["rtt_sum_us"] += rtt
            self.stats["rtt_buckets"][bisect.bisect_left(RTT_BOUNDS_US, rtt)] += 1
        p.errno = errno
        if self.link == Link.RESYNC:
            if errno and self.on_failed is not None and p.touched and not p.failed_here \
                    and p.kind not in (P.Kind.RESYNC_BEGIN, P.Kind.RESYNC_DONE):
                # (one that failed here as well changed nothing on either copy)
                p.requeued = True
                self.on_failed(p)
            elif p.kind == P.Kind.RESYNC_DONE and not errno:
                if not self.spoiled:       # (else the resync fails: see diverged)
                    self._resynced()
            elif p.kind == P.Kind.RESYNC_BEGIN and not errno and not self.spoiled:
                self._peer_outdated_from = seq
        p.done.set()
        self._window.release(p.size)

    def begin_resync(self, on_failed) -> None:
        """The peer is out of date (a connected one: marked so by the caller) and about to
        be resynchronised: from now on every change is sent to it too; one it cannot
        apply calls on_failed(pending) instead of making it out of date (it already is)."""
        if self.link not in (Link.OUTDATED, Link.CONNECTED) or self._fs is None:
            raise PeerError(f"cannot resynchronise: the link is {self.link.value}")
        if not self.state.get("peer_outdated"):
            raise PeerError("the peer must be marked out of date before it is resynchronised")
        self.on_failed = on_failed
        self.spoiled = None
        self._resyncs_begun += 1
        self._peer_outdated_from = float("inf")
        self._set(Link.RESYNC)

    def _resynced(self) -> None:
        """The peer accepted RESYNC_DONE: its copy equals ours. Recorded before the link
        counts as connected, so that a later failure marks the peer out of date again."""
        try:
            self.state.mark_acting(True)
            self.state.mark_peer_uptodate()
            if self.journal is not None:
                self.journal.clear()
        except OSError as e:
            log.error("cannot record that the peer is up to date (%s): it stays out of date", e)
            return
        self.on_failed = None
        self._resynced_upto = self._resyncs_begun
        self._set(Link.CONNECTED)
        log.info("peer %s:%s is up to date: replicating", *self.peer)

    def end_resync(self) -> None:
        """A resynchronisation stopped without finishing: back to nothing replicated."""
        self.on_failed = None
        if self.link == Link.RESYNC:
            self._set(Link.OUTDATED)

    async def _watchdog(self) -> None:
        """Declares the link lost when the oldest operation waits longer than the timeout
        (a frozen or unreachable peer), and keeps an idle link tested with PING."""
        while True:
            await trio.sleep(min(PING_INTERVAL, self.timeout / 4))
            if self.link not in (Link.CONNECTED, Link.RESYNC, Link.OUTDATED) or self._fs is None:
                continue
            now = time.monotonic()
            oldest = min((p.sent for p in self._pending.values() if not p.patient), default=None)
            # Operations queued behind a manifest being built wait for it: give them the
            # manifest's time limit instead of the usual one.
            behind = any(p.patient for p in self._pending.values())
            limit = max(self.timeout, MANIFEST_TIMEOUT) if behind else self.timeout
            if oldest is not None and now - oldest > limit:
                await self._lost(f"no acknowledgement for {limit:g}s")
            elif not self._pending:
                p = await self.begin(P.Kind.PING, {})
                if p is not None:
                    p.done.set()  # nobody waits for a ping; its ack still proves liveness

    def relink_failed(self) -> None:
        """No new link replaces this one after all: what waits for it fails now."""
        self._relinking = False
        self._wake()

    def retire(self, retiring: bool = True) -> None:
        """While another link to the same peer is being set up, the peer may drop this
        one: that is not a loss (and must not start a reconnection)."""
        self._retiring = retiring

    async def _lost(self, reason: str) -> None:
        if self.link not in (Link.CONNECTED, Link.OUTDATED, Link.RESYNC) or self._retiring:
            return
        fs, self._fs = self._fs, None
        if fs is not None:
            await fs.aclose()
        if self.link in (Link.OUTDATED, Link.RESYNC):
            log.warning("connection to out-of-date peer %s:%s lost: %s", *self.peer, reason)
            self._set(Link.CLOSED)
            if self.on_outdated is not None:
                self.on_outdated()
            self._release_all()
            return
        if self.policy == Policy.ALONE:
            await self._outdate(f"peer lost: {reason}")
        else:
            log.error("peer %s:%s lost (%s): writes wait up to %gs for it to come back",
                      *self.peer, reason, self.timeout)
            self._lost_at = time.monotonic()
            self._set(Link.RECONNECTING)

    async def go_alone(self, reason: str) -> None:
        """The controller decided the peer is gone (its heartbeats stopped, or it left
        the mirror): from now on changes go on without it. What still waits for the
        peer is released as if the peer had been lost under policy alone, after the
        peer was durably marked out of date."""
        self.policy = Policy.ALONE
        if self.link == Link.RECONNECTING or (self.link in (Link.CONNECTED, Link.OUTDATED)
                                              and self._pending):
            await self._outdate(reason)

    async def _journal(self, pending) -> None:
        """Journal the items of changes the peer may not have applied."""
        if self.journal is None:
            return
        for p in pending:
            if p.kind in (P.Kind.RENAME, P.Kind.LINK):
                await self.journal.mark_everything()    # a subtree moved, or a link added
            for ino in p.touched:
                if ino >= 0:        # (a resync's own step names itself with a marker)
                    await self.journal.mark_node(ino)

    async def _outdate(self, reason: str, release: bool = True) -> None:
        """The peer's copy is no longer good: record it durably (and what it may lack),
        then release waiters (unless `release` is False: on a live link, their
        acknowledgements still come)."""
        # The policy when the peer was given up decides for what waits then, even if the
        # controller changes it meanwhile (to block: they failed with EIO after they had
        # been recorded as going on alone; found by a full-disk test).
        alone = self.policy == Policy.ALONE
        try:
            await self._journal([p for p in self._pending.values()
                                 if not p.patient and p.kind not in _NOT_CHANGES])
            await trio.to_thread.run_sync(self.state.mark_peer_outdated, reason)
            # what was in flight is journaled: a crash from now on loses no record of it
            await trio.to_thread.run_sync(self.state.mark_acting, False)
            if alone and any(
                    not p.patient and p.kind not in _NOT_CHANGES for p in self._pending.values()):
                # what waits is acknowledged without the peer
                await trio.to_thread.run_sync(self.state.mark_changed_alone)
        except OSError as e:
            # Going on alone without a durable record could later make a stale copy look
            # good: refuse writes instead, whatever the policy.
            log.critical("cannot record that the peer is out of date (%s): refusing writes", e)
            self.policy = Policy.BLOCK
            alone = False
        log.error("PEER OUT OF DATE: %s; the mount goes on %s", reason,
                  "alone, recording what changes" if alone else "refusing writes (policy block)")
        if self._fs is None:
            self._set(Link.CLOSED if self.policy == Policy.ALONE else Link.OUTDATED)
        else:
            self._set(Link.OUTDATED)
        if self.on_outdated is not None:
            self.on_outdated()          # may start a resynchronisation at once
        if release or self._fs is None:
            self._release_all(alone)

    def _release_all(self, alone: bool = False) -> None:
        for seq in sorted(self._pending):
            p = self._pending.pop(seq)
            p.lost, p.alone = True, alone
            p.done.set()
            self._window.release(p.size)

    async def _reconnect(self) -> None:
        deadline = self._lost_at + self.timeout
        while time.monotonic() < deadline and self.link == Link.RECONNECTING:
            try:
                fs, welcome = await self._open()
            except (PeerUnreachable, HandshakeRefused) as e:
                log.debug("reconnect failed: %s", e)
                await trio.sleep(RECONNECT_INTERVAL)
                continue
            if self.link != Link.RECONNECTING:      # closed (a role switch) meanwhile
                await fs.aclose()
                return
            if not welcome.resumed or not welcome.uptodate:
                await fs.aclose()
                self._relinking = self.on_back_outdated is not None
                await self._outdate("the peer came back without our session"
                                    if not welcome.resumed else "the peer's copy is out of date")
                if self.on_back_outdated is not None:
                    self.on_back_outdated()     # a new link resynchronises it at once
                return
            async with self._send_lock:
                try:
                    resend = [self._pending[seq] for seq in sorted(self._pending)]
                    now = time.monotonic()
                    for p in resend:
                        p.sent = now             # the acknowledgement timeout starts anew
                        await fs.send_parts(p.parts)
                except LinkClosed:
                    await fs.aclose()
                    continue
                if self.link != Link.RECONNECTING:
                    await fs.aclose()
                    return
                self._fs = fs
            self.stats["reconnects"] += 1
            log.warning("peer %s:%s is back; %d operations resent", *self.peer,
                        len(self._pending))
            self._set(Link.CONNECTED)
            return
        if self.link == Link.RECONNECTING:
            await self._outdate(f"peer did not come back within {self.timeout:g}s")

    # --- the data path -------------------------------------------------------
    async def ready(self) -> bool:
        """Call before applying a change locally. True: replicate it. False: the peer
        is out of date and the policy lets the change go on alone (journal it).
        Raises PeerError when the policy is block and no good peer is there."""
        until = None
        while True:
            link = self.link
            if link in (Link.CONNECTED, Link.RESYNC):
                return True
            if link == Link.RECONNECTING:
                left = self._lost_at + self.timeout - time.monotonic() + 1.0
                with trio.move_on_after(max(left, 0.1)):
                    await self._changed.wait()
                continue
            if self.policy == Policy.ALONE:
                return False
            if link == Link.OUTDATED and (self._fs is not None or self._relinking):
                # Policy block, the peer there but out of date (it could not apply a
                # change, or came back without our session and a new link is being made):
                # it is being resynchronised, or the controller is about to let changes go
                # on without it. Wait for either, up to the timeout (the caller asks the
                # new link if this one is closed for it meanwhile).
                now = time.monotonic()
                until = now + self.timeout if until is None else until
                if now < until:
                    with trio.move_on_after(until - now):
                        await self._changed.wait()
                    continue
            raise PeerError(f"it is out of date and the link is {self.link.value} "
                            f"(policy {self.policy.value})")

    async def begin(self, kind: P.Kind, fields: dict, *, compress: bool = False,
                    patient: bool = False) -> Pending | None:
        """Send one operation; None when the peer is not being replicated to.

        Fields may be callables (paths, mostly): they are evaluated when the operation
        gets its sequence number, with no scheduler pass in between, so a path is the
        one the replica will see at that point of the stream even if a concurrent
        rename of a parent directory was sequenced while this operation waited.

        patient: a request (a manifest) exempt from the acknowledgement timeout, which
        may also go to a peer that is out of date."""
        if not self._accepts(patient):
            return None
        lazy = any(callable(v) for v in fields.values())
        prepared = None if lazy else P.Prepared(kind, fields, compress)
        size = prepared.length + P.HEADER_SIZE if prepared else _SMALL_FRAME
        await self._window.acquire(size)
        try:
            self._send_lock.acquire_nowait()     # the usual case: no scheduler pass
        except trio.WouldBlock:
            await self._send_lock.acquire()
        try:
            if not self._accepts(patient):
                # The peer was given up while this waited: nobody would answer it.
                self._window.release(size)
                return None
            if prepared is None:
                try:
                    prepared = P.Prepared(kind, {k: v() if callable(v) else v
                                                 for k, v in fields.items()}, compress)
                except Exception as e:       # a node that can no longer be named
                    self._window.release(size)
                    self._nursery.start_soon(self.diverged, f"cannot name a changed node "
                                                            f"for the peer: {e}")
                    return None
            self._seq += 1
            seq = self._seq
            p = Pending(seq, prepared.stamp(seq), size, self)
            p.patient, p.kind = patient, kind
            p.touched = TOUCHED.get()
            p.resync = self.link == Link.RESYNC
            self._pending[seq] = p
            self.stats["ops"] += 1
            self.stats["bytes"] += prepared.length + P.HEADER_SIZE
            if self._fs is not None:           # while reconnecting, resent when back
                try:
                    await self._fs.send_parts(p.parts)
                except LinkClosed as e:
                    self._nursery.start_soon(self._lost_later, self._fs, str(e))
        finally:
            self._send_lock.release()
        return p

    def _accepts(self, patient: bool) -> bool:
        """Can an operation be sequenced now and be answered? Changes go to a live or
        reconnecting link (resent once back); a patient request also to a connected
        peer that is out of date."""
        if self.link in (Link.CONNECTED, Link.RECONNECTING, Link.RESYNC):
            return True
        return patient and self.link == Link.OUTDATED and self._fs is not None

    async def _lost_later(self, fs, reason):
        if fs is self._fs:
            await self._lost(reason)

    async def finish(self, p: Pending | None) -> bool:
        """Wait for the outcome of an operation (see the module docstring). True when
        the peer applied it; False when it goes on without the peer (policy alone)."""
        if p is None:
            return False
        await p.done.wait()
        if p.errno and p.requeued:
            # Resynchronising: the items it touched are sent again (see begin_resync),
            # and the peer counts as up to date only once they were. (One sent during
            # the resync but answered after its end is an ordinary failure: chaos
            # finding, the peer was marked up to date and the write never reached it.)
            log.debug("peer could not apply operation %d yet: %s", p.seq, os.strerror(p.errno))
            if self.policy == Policy.BLOCK and p.seq < self._peer_outdated_from:
                # Failed before the peer counted itself out of date (before the resync
                # began there): not acknowledged before this resync or a later one ends,
                # or the controller lets changes go on without the peer.
                await self._journal([p])
                raise PeerBehind(os.strerror(p.errno), self._resyncs_begun - 1)
            return True
        if p.errno:
            log.error("peer could not apply operation %d: %s", p.seq, os.strerror(p.errno))
            await self._journal([p])
            journaled = self._resyncs_begun
            await self.diverged(f"peer could not apply a change ({os.strerror(p.errno)})")
            if self.policy == Policy.BLOCK:
                raise PeerBehind(os.strerror(p.errno), journaled)
            return False
        if p.lost and p.alone:
            return False            # the peer was given up under policy alone (see _outdate)
        if p.lost:
            # Under block, only a peer that counted its copy out of date before this change
            # (its resynchronisation's RESYNC_BEGIN acknowledged) may go without it.
            if self.policy == Policy.BLOCK and not (p.resync and p.seq > self._peer_outdated_from):
                raise PeerError("the link was lost before it answered (policy block)")
            return False            # a peer being resynchronised is out of date anyway
        return True

    async def settled_without(self, journaled: int, why: str) -> bool:
        """After PeerBehind: a change made here that the peer, still connected, could not
        apply (its disk is full, say) waits for a resynchronisation begun after it was
        journaled to end (the peer has it then: True), or for the controller to let
        changes go on without the peer (False: acknowledged alone); PeerError once the
        timeout has passed or the link is closed. (Failing it at once made the
        application fail while its controller was deciding; chaos seed 12, fault 65.)"""
        with trio.move_on_after(self.timeout):
            while self.link != Link.CLOSED:
                if self._resynced_upto > journaled:
                    return True
                if self.policy == Policy.ALONE:
                    return False
                await self._changed.wait()
        raise PeerError(f"{why}; the link closed before a resynchronisation ended"
                        if self.link == Link.CLOSED else
                        f"{why}; no resynchronisation ended within {self.timeout:g} s")

    async def unsent(self, why: str) -> bool:
        """A change made here for the peer that begin() no longer took (the peer was
        given up while it waited to be sent), journaled by the caller: False when the
        policy lets changes go on alone; under block as settled_without, for a
        resynchronisation begun from now on (PeerError at once on a closed link)."""
        if self.policy == Policy.ALONE:
            return False
        return await self.settled_without(self._resyncs_begun, why)

    async def diverged(self, reason: str) -> None:
        """The peer's copy no longer equals ours (the caller journaled what differs).
        Under policy block, what is in flight on a live link still gets its answers (see
        settled_without). During a resync the peer is out of date already, but that
        resync may have passed the items (or a moved subtree), and its RESYNC_DONE may be
        on its way: it no longer counts. It fails (Resync._check), and the next attempt
        works from the journal. Until that one's RESYNC_BEGIN is acknowledged, no change
        goes on without the peer because the peer counts itself out of date: it may have
        taken the spoiled RESYNC_DONE."""
        if self.link in (Link.CONNECTED, Link.RECONNECTING):
            await self._outdate(reason, release=self.policy == Policy.ALONE)
        elif self.link == Link.RESYNC and not self.spoiled:
            log.warning("%s: this resynchronisation no longer counts; the next one compares "
                        "it", reason)
            self.spoiled = reason
            self._peer_outdated_from = float("inf")

    async def call(self, kind: P.Kind, fields: dict, *, compress: bool = False) -> None:
        await self.finish(await self.begin(kind, fields, compress=compress))

    async def manifest(self) -> bytes:
        """The peer's manifest of its copy (JSON lines)."""
        # Hashing a big tree may take longer than the acknowledgement timeout.
        p = await self.begin(P.Kind.MANIFEST_REQ, {}, patient=True)
        if p is None:
            raise PeerError("not connected to the peer")
        await p.done.wait()
        if p.lost or not p.complete:
            raise PeerError("the peer's manifest did not arrive whole (link lost or resumed)")
        return b"".join(p.chunks)

    def _last_awaited(self) -> Pending | None:
        """The latest operation sent whose answer is still awaited. A PING, which nobody
        waits for, has its event set when it is sent but stays pending until answered:
        drain spun on it (until its answer, or the timeout on a dead link), and
        sync_point, finding it last, did not wait for what was sent before it."""
        seq = max((s for s, p in self._pending.items() if not p.done.is_set()), default=None)
        return None if seq is None else self._pending[seq]

    async def sync_point(self) -> None:
        """Wait until what was sent so far is acknowledged (what is sent meanwhile is
        not waited for, unlike drain)."""
        if (p := self._last_awaited()) is not None:
            await p.done.wait()

    async def drain(self) -> None:
        """Wait until every operation sent so far is acknowledged (or given up)."""
        while (p := self._last_awaited()) is not None:
            await p.done.wait()

    async def close(self, drain: bool = True) -> bool:
        """Say goodbye and close. With drain, first wait (up to the timeout) for what is
        in flight; without, what is in flight is given up: lost, it fails (policy block)
        or goes on alone (policy alone), and the peer is out of date. Returns True when
        nothing given up is left unrecorded (journaled, and the peer marked)."""
        if drain:
            with trio.move_on_after(self.timeout):
                await self.drain()
        given_up = [p for p in self._pending.values()
                    if not p.patient and p.kind not in _NOT_CHANGES]
        recorded = True
        try:
            if given_up:
                await self._journal(given_up)
                await trio.to_thread.run_sync(self.state.mark_peer_outdated,
                                              "closed with changes in flight")
            await trio.to_thread.run_sync(self.state.mark_acting, False)
        except OSError as e:
            log.error("cannot record the changes given up on closing: %s", e)
            recorded = False
        fs, self._fs = self._fs, None
        self._set(Link.CLOSED)
        self._release_all()
        if fs is not None:
            try:
                with trio.move_on_after(1):
                    await fs.send(P.Kind.BYE)
            except LinkClosed:
                pass
            await fs.aclose()
        return recorded

    def status(self) -> dict:
        now = time.monotonic()
        oldest = min((p.sent for p in self._pending.values() if not p.patient), default=now)
        return {"peer": "%s:%d" % self.peer, "link": self.link.value, "policy": self.policy.value,
                "session": "%016x" % self.session, "in_flight": len(self._pending),
                "oldest_pending_s": round(now - oldest, 3),
                "peer_outdated": bool(self.state.get("peer_outdated")), **self.stats}



class _Window:
    """Bounds what is in flight, in operations and in bytes: a slow peer makes writers
    wait here instead of making the agent's memory grow."""

    def __init__(self, ops: int, size: int):
        self.max_ops, self.max_bytes = ops, size
        self.ops = self.bytes = 0
        self._freed = trio.Event()

    async def acquire(self, size: int) -> None:
        # A frame larger than the whole window still goes, alone.
        while self.ops >= self.max_ops or (self.ops and self.bytes + size > self.max_bytes):
            await self._freed.wait()
        self.ops += 1
        self.bytes += size

    def release(self, size: int) -> None:
        self.ops -= 1
        self.bytes -= size
        self._freed.set()
        self._freed = trio.Event()
