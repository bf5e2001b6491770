"""The replica's end of replication: accepts the primary, applies its stream in order.

One primary at a time. Each operation is checked (checksum) before it is
applied and acknowledged after it is applied (after fsync for FSYNC). A frame
that fails its checksum, or a stream that breaks the protocol, is never applied:
the connection is dropped and this copy is marked out of date.

A session (chosen by the primary) survives a broken connection: when the same
primary reconnects it resends what was not acknowledged, and operations already
applied are acknowledged again without being applied twice.
"""

from __future__ import annotations

import collections
import errno as E
import json
import logging
import os

import trio

from . import probe, sysops
from . import protocol as P
from .apply import Applier
from .quarantine import Quarantine
from .statefile import StateFile
from .wire import FrameStream, LinkClosed, refuse

log = logging.getLogger(__name__)

_RECENT = 4096          # acknowledgements remembered for a resumed session


class Session:
    def __init__(self, sid: int, root_fd: int):
        self.sid = sid
        self.last_seq = 0
        self.applier = Applier(root_fd)
        self.recent: collections.OrderedDict[int, int] = collections.OrderedDict()

    def remember(self, seq: int, err: int) -> None:
        self.last_seq = seq
        self.recent[seq] = err
        while len(self.recent) > _RECENT:
            self.recent.popitem(last=False)


class ReplicaServer:
    def __init__(self, root_fd: int, secret: bytes, state: StateFile, *, invalidate=None,
                 manifest=None, versions=(P.PROTOCOL_MIN, P.PROTOCOL_MAX), timeout: float = 10.0):
        self.root_fd = root_fd
        self.secret = secret
        self.state = state
        self.invalidate = invalidate      # async callable(list of invalidations)
        self.manifest = manifest          # sync callable() -> bytes, run in a thread
        self.versions = versions
        self.timeout = timeout
        self.session: Session | None = None
        self.connected = False
        self.primary = ""
        self._current: FrameStream | None = None
        self._lock = trio.Lock()
        self.stats = {"ops": 0, "bytes": 0, "refused": 0, "corrupt": 0}
        self.resyncing = False      # between RESYNC_BEGIN and an accepted RESYNC_DONE
        self._failed = False        # a change failed since the last RESYNC_BEGIN or _DONE
        self.on_resynced = None     # called once this copy was made up to date
        self.quarantine_folder = None   # callable() -> a new quarantine folder's path
        self.quarantine: Quarantine | None = None
        self._listeners = []
        self._scope = trio.CancelScope()

    async def listen(self, host: str, port: int) -> None:
        self._listeners = await trio.open_tcp_listeners(port, host=host)

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        with self._scope:
            task_status.started()
            await trio.serve_listeners(self._handle, self._listeners)

    async def close(self) -> None:
        self._scope.cancel()
        for lst in self._listeners:
            await lst.aclose()
        if self._current is not None:
            await self._current.aclose()
        if self.session is not None:
            self.session.applier.close()
            self.session = None

    async def drop(self) -> None:
        """Close the primary's connection (it reconnects and finds this copy out of date)."""
        if self._current is not None:
            await self._current.aclose()

    async def _handle(self, stream) -> None:
        fs = FrameStream(stream)
        peer = fs.peer
        try:
            with trio.fail_after(self.timeout):
                sid = await self._handshake(fs, peer)
        except (LinkClosed, P.ProtocolError, trio.TooSlowError) as e:
            log.warning("handshake with %s failed: %s", peer, e or "timed out")
            await fs.aclose()
            return
        if sid is None:
            await fs.aclose()
            return
        # A newer connection replaces an older one (the old one may be half-open).
        old, self._current = self._current, fs
        if old is not None:
            await old.aclose()
        async with self._lock:
            if self._current is not fs:
                return
            self.connected, self.primary = True, peer
            try:
                await self._serve(fs)
            finally:
                if self._current is fs:
                    self.connected = False
                await fs.aclose()

    async def _handshake(self, fs: FrameStream, peer: str) -> int | None:
        hello = await fs.receive()
        if hello.kind != P.Kind.HELLO:
            raise P.ProtocolError(f"expected HELLO, got {hello.kind.name}")
        if len(hello.nonce) != P.NONCE_SIZE:
            raise P.ProtocolError("HELLO carries a nonce of the wrong size")
        version = P.choose_version(hello.version_min, hello.version_max, *self.versions)
        if version is None:
            self.stats["refused"] += 1
            log.error("refused %s: it speaks protocol versions %d-%d, this node %d-%d",
                      peer, hello.version_min, hello.version_max, *self.versions)
            await refuse(fs, P.Refusal.VERSION, "no common protocol version (replica speaks "
                         "%d-%d)" % tuple(self.versions))
            return None
        nonce = os.urandom(P.NONCE_SIZE)
        await fs.send(P.Kind.CHALLENGE, 0, dict(
            version=version, nonce=nonce,
            proof=P.proof(self.secret, b"replica", hello.nonce, nonce)))
        fs.version = version
        auth = await fs.receive()
        if auth.kind == P.Kind.REFUSE:
            self.stats["refused"] += 1
            log.error("primary %s refused us: %s", peer, auth.reason.decode(errors="replace"))
            return None
        if auth.kind != P.Kind.AUTH or not P.check_proof(self.secret, b"primary", nonce,
                                                          hello.nonce, auth.proof):
            self.stats["refused"] += 1
            log.error("refused %s: authentication failed (wrong secret?)", peer)
            await refuse(fs, P.Refusal.AUTH, "authentication failed")
            return None
        resumed = self.session is not None and self.session.sid == hello.session
        if not resumed:
            if self.session is not None:
                self.session.applier.close()
            self.session = Session(hello.session, self.root_fd)
        own = self.state.get("changed_alone") or self.state.get("needs_full")
        # As a primary, this copy may have applied changes its peer never got (given up
        # when the peer stopped answering, or in flight when its agent died): it is no
        # copy of any primary until resynchronised (chaos finding: the new primary
        # replicated to it as it was).
        behind = own or self.state.get("peer_outdated") or self.state.get("acting_primary")
        uptodate = self.state.get("uptodate", True) and not behind
        never = not (self.state.get("resynced_at") or self.state.get("peer_synced"))
        if (self.state.get("changed_alone") or never) \
                and self.quarantine_folder is not None and fs.version >= 2:
            # Every change of this session may overwrite one of this copy's own (or of
            # what the folder held before it was first paired).
            await self._start_quarantine()
        await fs.send(P.Kind.WELCOME, 0, dict(last_seq=self.session.last_seq,
                                              resumed=int(resumed), uptodate=int(uptodate)))
        log.info("primary %s %s session %016x (protocol %d, label %r)", peer,
                 "resumed" if resumed else "started", hello.session, version,
                 hello.label.decode(errors="replace"))
        return hello.session

    async def _serve(self, fs: FrameStream) -> None:
        try:
            await self._serve_frames(fs)
        except LinkClosed as e:
            log.warning("primary connection lost: %s", e)

    async def _serve_frames(self, fs: FrameStream) -> None:
        s = self.session
        while True:
            try:
                msg = await fs.receive()
            except LinkClosed as e:
                log.warning("primary connection lost: %s", e)
                return
            except P.ChecksumError as e:
                self.stats["corrupt"] += 1
                await self._broken(f"corrupted frame: {e}")
                return
            except P.ProtocolError as e:
                await self._broken(f"protocol error: {e}")
                return
            if msg.kind == P.Kind.BYE:
                log.info("primary closed the session")
                s.applier.close()
                self.session = None
                return
            if msg.seq <= s.last_seq:
                await fs.send(P.Kind.ACK, msg.seq, dict(errno=s.recent.get(msg.seq, 0)))
                continue
            if msg.seq != s.last_seq + 1:
                await self._broken(f"sequence gap: got {msg.seq} after {s.last_seq}")
                return
            if msg.kind == P.Kind.MANIFEST_REQ:
                await self._send_reply(fs, msg.seq, self.manifest)
                s.remember(msg.seq, 0)
                continue
            if msg.kind == P.Kind.PROBE:
                await self._send_reply(fs, msg.seq, lambda: self._probe(msg))
                s.remember(msg.seq, 0)
                continue
            if msg.kind in (P.Kind.RESYNC_BEGIN, P.Kind.RESYNC_DONE):
                err = await self._resync_step(msg.kind, bool(msg.fields.get("full", 1)))
            else:
                err = await self._apply(s, msg)
            s.remember(msg.seq, err)
            await fs.send(P.Kind.ACK, msg.seq, dict(errno=err))

    async def _apply(self, s: Session, msg: P.Message) -> int:
        try:
            # Operations are applied one after the other, in order, on the loop: a thread
            # per fsync would only add latency (nothing else may be applied meanwhile).
            inval = s.applier.apply(msg)
        except OSError as e:
            # Reported to the primary, which decides: the same change may have failed
            # the same way there (rmdir of a non-empty directory), or not (disk full).
            err = e.errno or E.EIO
            log.info("could not apply %s (seq %d): %s", msg.kind.name, msg.seq,
                     os.strerror(err))
            self._failed = True
            return err
        self.stats["ops"] += 1
        if msg.kind in (P.Kind.WRITE, P.Kind.PUT):
            self.stats["bytes"] += len(msg.data)
        if inval and self.invalidate is not None:
            await self.invalidate(inval)
        return 0

    def _probe(self, msg: P.Message) -> bytes:
        try:
            only = json.loads(msg.blocks) if msg.blocks else None
            d = probe.describe(self.root_fd, msg.path, msg.what, max(msg.chunk, 4096), only)
        except OSError as e:
            d = {"exists": False, "error": f"{msg.path!r}: {e.strerror or e}"}
        return probe.dumps(d)

    async def _start_quarantine(self) -> None:
        """This copy acknowledged changes of its own (split brain): what the resync would
        overwrite or remove goes to a quarantine folder (the same one if a resync into it
        was interrupted)."""
        if self.quarantine is None:
            folder = self.state.get("quarantine_dir") or self.quarantine_folder()
            if folder != self.state.get("quarantine_dir"):
                await trio.to_thread.run_sync(lambda: self.state.update(quarantine_dir=folder))
            self.quarantine = Quarantine(self.root_fd, folder)
        self.session.applier.quarantine = self.quarantine
        log.info("until this copy is resynchronised, what the primary overwrites or removes "
                 "of it is kept in %s", self.quarantine.folder)

    async def _resync_step(self, kind: P.Kind, full: bool = True) -> int:
        """RESYNC_BEGIN: this copy is out of date until the resynchronisation ends.
        RESYNC_DONE: it ends, unless a change failed here since the last attempt (the
        primary then resends what it touched and asks again)."""
        if kind == P.Kind.RESYNC_BEGIN:
            if not full and any(self.state.get(k) for k in (
                    "acting_primary", "changed_alone", "needs_full", "peer_outdated")):
                # As a primary, this copy may have taken changes the other node never saw:
                # what the other's journal says is not enough.
                return E.ESTALE
            await trio.to_thread.run_sync(self.state.mark_self, False, "resynchronising")
            self.resyncing, self._failed = True, False
            log.info("resynchronisation from the primary begins")
            return 0
        if self._failed:
            self._failed = False
            return E.EAGAIN
        try:
            await trio.to_thread.run_sync(sysops.syncfs, self.root_fd)
            await trio.to_thread.run_sync(self.state.mark_resynced)
            if self.on_resynced is not None:
                self.on_resynced()
            if self.quarantine is not None:
                log.log(logging.WARNING if self.quarantine.kept else logging.INFO,
                        "resynchronised: %d versions of this copy's own data were kept in %s",
                        self.quarantine.kept, self.quarantine.folder)
                self.quarantine = None
                if self.session is not None:
                    self.session.applier.quarantine = None
        except OSError as e:
            log.error("cannot make the resynchronised copy durable: %s", e)
            return e.errno or E.EIO
        self.resyncing = False
        log.info("resynchronisation done: this copy is up to date")
        return 0

    async def _send_reply(self, fs: FrameStream, seq: int, build) -> None:
        """Answer a request with what build() returns (run in a thread), in MANIFEST
        frames of at most 8 MiB."""
        data = await trio.to_thread.run_sync(build)
        step = 8 << 20
        chunks = [data[i:i + step] for i in range(0, len(data), step)] or [b""]
        for i, chunk in enumerate(chunks):
            await fs.send(P.Kind.MANIFEST, seq, dict(last=int(i == len(chunks) - 1), chunk=chunk),
                          compress=True)

    async def _broken(self, reason: str) -> None:
        log.error("dropping the primary's connection: %s; nothing of it was applied; "
                  "this copy is now out of date", reason)
        await trio.to_thread.run_sync(self.state.mark_self, False, reason)
        if self.session is not None:
            self.session.applier.close()
            self.session = None

    def status(self) -> dict:
        return {"listening": [str(lst.socket.getsockname()) for lst in self._listeners],
                "connected": self.connected, "primary": self.primary,
                "session": "%016x" % self.session.sid if self.session else None,
                "last_seq": self.session.last_seq if self.session else 0,
                "uptodate": bool(self.state.get("uptodate", True)),
                "resyncing": self.resyncing and self.connected, **self.stats}
