"""The mount agent: the composition root that mounts one folder and serves it.

It opens the folder, mounts over it in place, and runs, in one nursery: the FUSE
main loop, the control socket, and the replication end of its role (Mirror when
primary, ReplicaServer when replica). Role changes happen here, under a lock,
without unmounting.
"""

from __future__ import annotations

import errno as E
import logging
import os
import re
import resource
import signal
import time
from dataclasses import dataclass

import pyfuse3
import trio

from . import control, manifest, quarantine, sysops
from . import errors as X
from . import protocol as P
from .fs import ALONE, DEADLINE_WAIT, PRIMARY, REPLICA, MirrorFS
from .mirror import Mirror, PeerError, PeerUnreachable, Policy
from .replica import ReplicaServer
from .journal import Journal
from .resync import BLOCK, Resync, ResyncFailed
from .statefile import DEFAULT_DIR, StateFile
from .tree import Tree
from .wire import HandshakeRefused

log = logging.getLogger(__name__)

RESYNC_ATTEMPTS = 3         # failed resynchronisations retried RESYNC_PAUSE apart on the
RESYNC_PAUSE = 2.0          # same link; then the pause doubles, up to RESYNC_PAUSE_MAX,
RESYNC_PAUSE_MAX = 60.0     # and the retries go on while the link is there


@dataclass
class Options:
    mountpoint: str
    role: str
    peer: tuple[str, int] | None = None
    listen: tuple[str, int] | None = None
    secret: bytes = b""
    state_dir: str = DEFAULT_DIR
    run_dir: str = control.RUN_DIR
    policy: Policy = Policy.BLOCK
    timeout: float = 10.0
    cache_timeout: float = 10.0
    compress: bool = True
    versions: tuple[int, int] = (P.PROTOCOL_MIN, P.PROTOCOL_MAX)
    resync_block: int = BLOCK             # bytes per compared block
    resync_rate: int = 0                  # bytes per second of resynchronised data; 0: no cap


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except OSError as e:      # already gone from the kernel's caches, or unmounting
        if e.errno not in (E.ENOENT, E.ENOTCONN, E.EBADF):
            log.warning("cannot invalidate %r: %s", args, e)


def _run_all(calls) -> None:
    for fn, *args in calls:
        _quietly(fn, *args)


def parse_address(text: str, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise X.Failure(X.BAD_CONFIG, f"{what} must be HOST:PORT, not {text!r}")
    return host, int(port)


def read_secret(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            secret = f.read().strip()
    except OSError as e:
        raise X.Failure(X.BAD_CONFIG, f"cannot read secret file {path}: {e.strerror}") from None
    if len(secret) < 8:
        raise X.Failure(X.BAD_CONFIG, f"secret file {path} holds fewer than 8 bytes")
    return secret


def fuse_mounted(mountpoint: str) -> str | None:
    """The FUSE type of the topmost mount at mountpoint, if it is a FUSE mount."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            sep = fields.index("-")
            if _unescape(fields[4]) == mountpoint:
                found = fields[sep + 1]
    return found if found and found.startswith("fuse") else None


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040)."""
    raw = os.fsencode(field)
    return os.fsdecode(re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), raw))


def preflight(o: Options) -> None:
    if not os.path.exists("/dev/fuse"):
        raise X.Failure(X.NO_FUSE, "/dev/fuse does not exist: load the fuse module "
                                   "(modprobe fuse) or install fuse3")
    try:
        kind = fuse_mounted(o.mountpoint)
    except OSError:
        kind = None
    if kind is not None:       # checked first: a dead FUSE mount does not even stat
        raise X.Failure(X.MOUNTED, f"{o.mountpoint} is already mounted ({kind}); "
                                   f"unmount it first (fusemirror umount or fusermount3 -u)")
    if not os.path.isdir(o.mountpoint):
        what = "does not exist" if not os.path.exists(o.mountpoint) else "is not a directory"
        raise X.Failure(X.BAD_DIR, f"{o.mountpoint} {what}")
    if o.role == PRIMARY and o.peer is None:
        raise X.Failure(X.BAD_CONFIG, "role primary needs --peer HOST:PORT")
    if o.role == REPLICA and o.listen is None:
        raise X.Failure(X.BAD_CONFIG, "role replica needs --listen HOST:PORT")
    if o.role in (PRIMARY, REPLICA) and not o.secret:
        raise X.Failure(X.BAD_CONFIG, f"role {o.role} needs --secret-file FILE")


class Agent:
    def __init__(self, o: Options):
        self.o = o
        self.root_fd = os.open(o.mountpoint, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.socket_path = control.socket_path(o.mountpoint, o.run_dir)
        self.tree = Tree(self.root_fd)
        self.state = StateFile(o.state_dir, o.mountpoint)
        had_journal = os.path.exists(self.state.journal_path)
        self.journal = Journal(self.state.journal_path)
        if self.state.get("peer_outdated") and not had_journal:
            log.warning("the journal of what the peer lacks is missing: the next "
                        "resynchronisation compares everything")
            trio.run(self.journal.mark_everything)
        if self.state.get("acting_primary"):
            # The last run died with changes in flight to its peer: neither copy can be
            # trusted about them, so the next resynchronisation compares everything.
            log.warning("the previous agent stopped while replicating as primary: the peer "
                        "is out of date until a full resynchronisation")
            self.state.mark_peer_outdated("the previous primary agent did not stop cleanly")
            trio.run(self.journal.mark_everything)
        self.fs = MirrorFS(self.tree, self.state, role=ALONE, cache_timeout=o.cache_timeout,
                           compress=o.compress)
        self.fs.journal = self.journal
        self.mirror: Mirror | None = None
        self.replica: ReplicaServer | None = None
        self._nursery: trio.Nursery | None = None
        self._lock = trio.Lock()
        self._role_scope: trio.CancelScope | None = None
        self._mounted = False
        self.resync: Resync | None = None          # the running or last resynchronisation
        self.resync_error: str | None = None
        self._resyncing = False
        self._resync_failures = 0
        self._resync_scope: trio.CancelScope | None = None

    # --- roles -----------------------------------------------------------------
    def _new_mirror(self, peer) -> Mirror:
        self._resync_failures = 0       # a new link: its retries start 2 s apart again
        def outdated():
            self.fs.journal_open_files()
            self._maybe_resync(m)
        m = Mirror(peer, self.o.secret, self.state, policy=self.o.policy,
                   timeout=self.o.timeout, label=os.fsencode(self.o.mountpoint),
                   versions=self.o.versions, on_outdated=outdated)
        m.journal = self.journal
        m.on_back_outdated = lambda: self._nursery.start_soon(self._relink, m)
        return m

    async def _relink(self, mirror: Mirror) -> None:
        """The peer came back out of date (it dropped our session): a new link to it,
        which resynchronises it at once."""
        async with self._lock:
            if mirror is not self.mirror or self.fs.role != PRIMARY:
                mirror.relink_failed()
                return
            try:
                new = await self._connect_new_primary(mirror.peer)
            except X.Failure:
                mirror.relink_failed()
                return                      # logged; the controller or the admin goes on
            self.fs.pause()
            try:
                await self._adopt_primary(new)
            finally:
                self.fs.resume()

    def _new_replica(self) -> ReplicaServer:
        r = ReplicaServer(self.root_fd, self.o.secret, self.state,
                          invalidate=self._invalidate, manifest=self._manifest_bytes,
                          versions=self.o.versions, timeout=self.o.timeout)
        r.on_resynced = self.journal.clear      # what it did as a primary no longer counts
        r.quarantine_folder = lambda: quarantine.new_folder(self.o.mountpoint)
        return r

    async def _connect_primary(self, peer) -> Mirror:
        mirror = self._new_mirror(peer)
        try:
            await mirror.connect()
        except PeerUnreachable as e:
            raise X.Failure(X.PEER_UNREACHABLE, str(e)) from None
        except HandshakeRefused as e:
            raise X.Failure(X.REFUSED, f"peer {peer[0]}:{peer[1]} refused us: {e}") from None
        if mirror.link.value == "outdated" and self.o.policy == Policy.BLOCK \
                and mirror.version < 2:
            await mirror.close()
            raise X.Failure(X.REFUSED, f"peer {peer[0]}:{peer[1]} is out of date; with "
                                       f"--on-peer-loss block nothing could be written")
        return mirror

    async def _connect_new_primary(self, peer) -> Mirror:
        """A new link to peer; the old link (if any) stays in use until it is adopted."""
        old = self.mirror
        if old is not None:
            old.retire()
        try:
            return await self._connect_primary(peer)
        except X.Failure as e:
            if old is not None:
                old.retire(False)
            log.error("role change to primary failed, staying %s: %s", self.fs.role, e)
            raise

    async def _adopt_primary(self, mirror: Mirror, drain: bool = True) -> None:
        await self._stop_replica()
        await self._stop_resync()
        old, self.mirror = self.mirror, mirror
        if old is not None:
            await old.close(drain)
        await self._nursery.start(mirror.run)      # its reader must run before any wait
        await self._reopen_files(mirror)
        self.fs.set_role(PRIMARY, mirror)
        self._maybe_resync(mirror)

    # --- resynchronisation -------------------------------------------------------------
    def _maybe_resync(self, mirror: Mirror) -> bool:
        """An out-of-date peer that speaks resynchronisation is brought up to date at once,
        in the background. The link turns RESYNC here, before anything else is sequenced.
        True when one runs (already, or from now)."""
        if self._resyncing:
            return True
        if mirror is not self.mirror or not self.state.get("peer_outdated") \
                or mirror.version < 2 or mirror.link.value not in ("outdated", "connected"):
            return False
        dirty = self.journal.dirty.copy()
        r = Resync(self.fs, mirror, block=self.o.resync_block, rate=self.o.resync_rate,
                   dirty=dirty)
        try:
            r.attach()
        except PeerError as e:
            log.warning("cannot resynchronise now: %s", e)
            return False
        self.resync, self.resync_error, self._resyncing = r, None, True
        self._resync_scope = scope = trio.CancelScope()
        self._nursery.start_soon(self._resync, mirror, r, scope)
        return True

    async def _resync(self, mirror: Mirror, r: Resync, scope: trio.CancelScope) -> None:
        spoiled = False
        try:
            with scope:
                await r.run()
                self._resync_failures = 0
                self.fs.created.clear()         # they are on the peer now
                return
        except Exception as e:      # a bug here must not take the primary's mount down
            if not isinstance(e, (ResyncFailed, PeerError, OSError)):
                log.exception("resynchronisation stopped by an unexpected error")
            r.progress["state"] = "failed"
            self.resync_error = str(e)
            # An attempt spoiled by a change refused here (Mirror.diverged) says nothing
            # about the peer: the next one starts at once, without adding to the pause.
            spoiled = mirror.spoiled is not None
            if not spoiled:
                self._resync_failures += 1
            log.error("resynchronisation of %s:%s failed: %s; the peer stays out of date%s",
                      *mirror.peer, e, "; trying again at once" if spoiled else "")
        finally:
            self._resyncing = False
        if spoiled and mirror.link.value == "outdated":
            self._maybe_resync(mirror)
        elif self._resync_failures and mirror.link.value == "outdated":
            # The link is still there: try again. Giving up after a few attempts left a
            # peer out of date for good under a busy application (a directory changed
            # faster than the resync could settle it) or a passing ENOSPC there.
            extra = max(self._resync_failures - RESYNC_ATTEMPTS, 0)
            await trio.sleep(min(RESYNC_PAUSE * 2 ** min(extra, 10), RESYNC_PAUSE_MAX))
            self._maybe_resync(mirror)

    def changes(self, limit: int) -> dict:
        """What this copy changed since its peer fell behind, by path (from the journal):
        the files that may differ from the peer's."""
        dirty = self.journal.dirty
        if dirty.everything:
            return {"everything": True, "count": None, "paths": []}
        wanted = set(dirty.nodes) | set(dirty.chunks)
        paths = ["."] if self.tree.ino_of(os.fstat(self.root_fd)) in wanted else []
        count = len(paths)
        with sysops.reopened(self.root_fd, directory=True) as top:
            for rel, dirs, files, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
                for name in dirs + files:
                    try:
                        ino = os.stat(name, dir_fd=dfd, follow_symlinks=False).st_ino
                    except OSError:
                        continue
                    if ino in wanted:
                        count += 1
                        if len(paths) < limit:
                            paths.append(os.path.normpath(os.path.join(rel, name)))
        return {"everything": False, "count": count, "paths": paths}

    async def ask_fullsync(self) -> None:
        """Replica: the next resynchronisation of this copy must compare everything (it
        was restored from a backup, or is suspect). It is out of date from now on; the
        primary's connection is dropped so that the primary resynchronises it."""
        if self.fs.role != REPLICA or self.replica is None:
            raise X.Failure(X.FAILED, f"fullsync is for a replica; this mount is {self.fs.role}")
        await trio.to_thread.run_sync(lambda: self.state.update(needs_full=True))
        await trio.to_thread.run_sync(self.state.mark_self, False, "full resync asked for")
        await self.replica.drop()

    async def _stop_resync(self) -> None:
        if self._resync_scope is not None:
            self._resync_scope.cancel()
            self._resync_scope = None
            await trio.sleep(0)             # let it release its locks and end the RESYNC link

    async def start_resync(self, full: bool = True) -> None:
        """The admin's `resync`: the peer's copy is compared and fixed all over again
        (full), or as far as the journal says (when it is already out of date)."""
        m = self.mirror
        if self.fs.role != PRIMARY or m is None:
            raise X.Failure(X.FAILED, f"resync runs on the primary; this mount is {self.fs.role}")
        if m.link.value == "resync":
            raise X.Failure(X.FAILED, "a resynchronisation is already running")
        if m.version < 2:
            raise X.Failure(X.REFUSED, "the peer's protocol version has no resynchronisation")
        if m.link.value == "connected":
            # Marked first: if this node dies during the resync, the peer's copy is not
            # trusted. The link stays connected (writes replicated) until the resync starts.
            await trio.to_thread.run_sync(self.state.mark_peer_outdated,
                                          "a resynchronisation was asked for")
        if m.link.value not in ("outdated", "connected"):
            raise X.Failure(X.PEER_UNREACHABLE, f"the link to the peer is {m.link.value}")
        if full or m.link.value == "connected":
            # Durable, unlike a flag: an interrupted attempt is followed by a full one too.
            await self.journal.mark_everything()
        if not self._maybe_resync(m):
            raise X.Failure(X.FAILED, f"the resynchronisation could not start (link "
                                      f"{m.link.value}); see the agent's log")

    async def _reopen_files(self, mirror: Mirror) -> None:
        """Files already open for writing (in another role) get their handle on the peer."""
        if mirror.link.value != "connected":
            return
        for fh, f in self.fs.writable_files():
            try:
                path = self.tree.path(f.ino)
                await mirror.call(P.Kind.OPEN, dict(handle=fh, flags=os.O_RDWR, mtime=0,
                                                    path=path))
                f.replicated = True
            except (OSError, PeerError) as e:
                f.replicated = False
                self.state.mark_peer_outdated(f"cannot open an already open file on the "
                                              f"peer: {e}")

    async def _bind_replica(self, listen) -> ReplicaServer:
        replica = self._new_replica()
        try:
            await replica.listen(*listen)
        except OSError as e:
            raise X.Failure(X.BAD_CONFIG, f"cannot listen on {listen[0]}:{listen[1]}: "
                                          f"{e.strerror or e}") from None
        return replica

    async def _adopt_replica(self, replica: ReplicaServer) -> None:
        await self._stop_mirror()
        self.fs.set_role(REPLICA, None)
        self.replica = replica
        await self._nursery.start(replica.run)

    async def _stop_mirror(self, drain: bool = True) -> None:
        await self._stop_resync()
        if self.mirror is not None:
            mirror, self.mirror = self.mirror, None
            await mirror.close(drain)

    async def _stop_replica(self) -> None:
        if self.replica is not None:
            replica, self.replica = self.replica, None
            await replica.close()

    async def set_role(self, role: str, peer=None, listen=None, policy: Policy | None = None,
                       peer_lost: bool = False, fence: bool = False) -> None:
        """Change role without unmounting. Changes by the application wait (they do
        not fail) while the switch is in progress; if the new role cannot be taken,
        the old one stays. `policy` replaces the peer-loss policy (the controller's
        choice). `peer_lost`: the controller decided the peer is gone, so what waits
        for it is not waited for: it goes on alone, the peer marked out of date. `fence`
        (to replica only): stop acknowledging at once; what waits for the peer fails.

        After peer_lost nothing is waited for: what waited was released, and what was
        sent since (the first request of a resynchronisation the peer's new status
        started) would never be answered; waiting for it held every change for the
        whole timeout (a 10 s outage found by the cluster tests on CI)."""
        if role not in (PRIMARY, REPLICA, ALONE):
            raise X.Failure(X.BAD_CONFIG, f"unknown role {role!r}")
        peer = peer or self.o.peer
        listen = listen or self.o.listen
        if role == REPLICA and listen is None:
            raise X.Failure(X.BAD_CONFIG, "role replica needs --listen HOST:PORT")
        if role == PRIMARY and peer is None:
            raise X.Failure(X.BAD_CONFIG, "role primary needs --peer HOST:PORT")
        async with self._lock:
            old = self.fs.role
            if policy is not None:
                self.o.policy = policy
                if self.mirror is not None:
                    self.mirror.policy = policy
            keep = (old == PRIMARY and peer == self.o.peer and self.mirror is not None
                    and self.mirror.link.value in ("connected", "resync"))
            new_link = None
            if role == PRIMARY and not keep and not fence:
                # Connecting may take the whole timeout (an unreachable peer): done before
                # the changes are held, so the application only waits for the switch itself.
                new_link = await self._connect_new_primary(peer)
            self.fs.pause()
            try:
                if self.mirror is not None and fence:
                    self.mirror.policy = Policy.BLOCK
                    await self._stop_mirror(drain=False)
                if self.mirror is not None and peer_lost:
                    await self.mirror.go_alone("the controller decided the peer is gone")
                if self.mirror is not None and not peer_lost:
                    with trio.move_on_after(self.o.timeout):
                        await self.mirror.drain()
                if role == PRIMARY:
                    if new_link is not None:
                        await self._adopt_primary(new_link, drain=not peer_lost)
                        new_link = None
                elif role == REPLICA:
                    if old == REPLICA and listen == self.o.listen:
                        pass                      # already listening there
                    else:
                        if old == REPLICA and self.replica is not None:
                            await self._stop_replica()
                        await self._adopt_replica(await self._bind_replica(listen))
                else:
                    await self._stop_mirror(drain=not peer_lost)
                    await self._stop_replica()
                    self.fs.set_role(ALONE, None)
            except X.Failure as e:
                log.error("role change %s -> %s failed, staying %s: %s", old, role, old, e)
                raise
            finally:
                self.fs.resume()
                if new_link is not None:          # not adopted (another step failed)
                    await new_link.close(drain=False)
            self.o.peer, self.o.listen = peer, listen
            log.info("role %s -> %s", old, role)

    # --- replica cache invalidation -------------------------------------------
    async def _invalidate(self, items, limiter: trio.CapacityLimiter | None = None) -> None:
        """Make the replica's kernel forget what an applied operation changed, before the
        operation is acknowledged: a reader on the replica never sees stale data (the
        primary's too, after a change applied but answered EIO: MirrorFS._forget_cached,
        with FUSE inode numbers, which pass through here unchanged). Only
        inodes the kernel knows need it. Entry and data invalidations may wait for a
        request in flight on the same directory or pages, so they run in a worker
        thread while the loop goes on answering requests."""
        slow = []
        for item in items:
            ino = pyfuse3.ROOT_INODE if item[1] == self.tree.root_st_ino else item[1]
            if not self.tree.known(ino):
                continue
            if item[0] == "attr":
                _quietly(pyfuse3.invalidate_inode, ino, True)
            elif item[0] == "entry":
                slow.append((pyfuse3.invalidate_entry, ino, item[2]))
            else:
                slow.append((pyfuse3.invalidate_inode, ino, False))
        if slow:      # abandoned at shutdown: it may wait for a request never answered
            await trio.to_thread.run_sync(_run_all, slow, limiter=limiter,
                                          abandon_on_cancel=True)

    # --- control requests ------------------------------------------------------
    def _manifest_bytes(self) -> bytes:
        return manifest.dumps(manifest.build(self.root_fd))

    async def handle(self, req: dict) -> dict:
        cmd = req.get("cmd")
        try:
            if cmd == "status":
                return {"ok": True, **self.status()}
            if cmd == "role":
                peer = parse_address(req["peer"], "--peer") if req.get("peer") else None
                listen = parse_address(req["listen"], "--listen") if req.get("listen") else None
                policy = Policy(req["policy"]) if req.get("policy") else None
                await self.set_role(req["role"], peer, listen, policy,
                                    bool(req.get("peer_lost")), bool(req.get("fence")))
                return {"ok": True, **self.status()}
            if cmd == "verify":
                return {"ok": True, "differences": await self.verify()}
            if cmd == "deadline":
                until = None if req.get("until") is None else float(req["until"])
                if until is not None and until <= time.monotonic() \
                        and not self.fs.past_deadline():
                    log.info("write deadline withdrawn by the controller: changes wait for "
                             "a new one (up to %.0f s), then fail", DEADLINE_WAIT)
                self.fs.set_deadline(until)
                return {"ok": True}
            if cmd == "drain":
                await self.drain()
                return {"ok": True}
            if cmd == "resync":
                await self.start_resync(bool(req.get("full", True)))
                return {"ok": True}
            if cmd == "fullsync":
                await self.ask_fullsync()
                return {"ok": True}
            if cmd == "changes":
                return {"ok": True, **await trio.to_thread.run_sync(
                    self.changes, int(req.get("limit", 100)))}
        except X.Failure as e:
            return {"ok": False, "error": str(e), "code": e.code}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    async def verify(self) -> list[str]:
        if self.fs.role != PRIMARY or self.mirror is None:
            raise X.Failure(X.FAILED, f"verify runs on the primary; this mount is {self.fs.role}")
        try:
            peer = manifest.loads(await self.mirror.manifest())
        except PeerError as e:
            raise X.Failure(X.PEER_UNREACHABLE, f"cannot get the peer's manifest: {e}") from None
        local = await trio.to_thread.run_sync(manifest.build, self.root_fd)
        return manifest.diff(local, peer)

    async def drain(self) -> None:
        """Wait until every replicated change has been acknowledged (before umount)."""
        if self.mirror is not None:
            with trio.move_on_after(self.o.timeout):
                await self.mirror.drain()

    def status(self) -> dict:
        return {"pid": os.getpid(), "mountpoint": self.o.mountpoint, "role": self.fs.role,
                "policy": self.o.policy.value, "inodes": len(self.tree),
                "open_files": len(self.fs._files),
                "write_deadline": self.fs.write_deadline,
                "journal": {"items": len(self.journal.dirty.nodes | set(self.journal.dirty.chunks)),
                            "everything": self.journal.dirty.everything},
                "mirror": self.mirror.status() if self.mirror else None,
                "resync": (dict(self.resync.status(), error=self.resync_error)
                           if self.resync else None),
                "replica": self.replica.status() if self.replica else None,
                "state": dict(self.state.data)}

    # --- running ---------------------------------------------------------------
    async def run(self, ready=None) -> None:
        o = self.o
        link = None           # connect or bind before mounting: errors stop us cleanly
        if o.role == PRIMARY:
            link = await self._connect_primary(o.peer)
        elif o.role == REPLICA:
            link = await self._bind_replica(o.listen)
        options = {"fsname=" + o.mountpoint, "subtype=fusemirror", "allow_other",
                   "default_permissions"}
        try:
            pyfuse3.init(self.fs, o.mountpoint, options)
        except RuntimeError as e:
            if link is not None:
                await link.close()
            raise X.Failure(X.NO_FUSE, f"cannot mount {o.mountpoint}: {e}") from None
        self._mounted = True
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # A few threads at most: those of fsync and large writes must stay available.
            stale = trio.CapacityLimiter(2)
            self.fs.on_stale = lambda items: nursery.start_soon(self._invalidate, items, stale)
            if o.role == PRIMARY:
                await self._adopt_primary(link)
            elif o.role == REPLICA:
                await self._adopt_replica(link)
            await nursery.start(control.serve, self.socket_path, self.handle)
            nursery.start_soon(self._signals)
            log.info("mounted %s as %s (pid %d)", o.mountpoint, self.fs.role, os.getpid())
            if ready is not None:
                ready()
            try:
                await pyfuse3.main()
            finally:
                log.info("%s unmounted; stopping", o.mountpoint)
                with trio.CancelScope(shield=True):
                    with trio.move_on_after(o.timeout):
                        await self._stop_mirror()
                        await self._stop_replica()
                self.fs.on_stale = None
                nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("signal %d: finishing replication and unmounting", signum)
                if self.mirror is not None:
                    with trio.move_on_after(self.o.timeout):
                        await self.mirror.drain()
                pyfuse3.terminate()
                return

    def close(self) -> None:
        if self._mounted:
            try:
                pyfuse3.close(unmount=True)
            except Exception as e:  # the mount may already be gone
                log.debug("pyfuse3.close: %s", e)
            self._mounted = False
        self.tree.close()
        self.journal.close()
        self.state.close()


def prepare_process() -> None:
    os.umask(0)
    sysops.keep_large_buffers()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        with open("/proc/sys/fs/nr_open") as f:
            top = int(f.read())
        resource.setrlimit(resource.RLIMIT_NOFILE, (top, top))
    except (OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def run_agent(o: Options, ready=None) -> None:
    """Mount and serve until unmounted. Raises X.Failure for a clear one-line error."""
    preflight(o)
    prepare_process()
    agent = Agent(o)
    try:
        trio.run(agent.run, ready)
    finally:
        agent.close()

