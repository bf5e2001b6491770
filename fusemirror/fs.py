"""The pyfuse3 Operations: what the kernel asks, answered from the backing tree.

This is the one place where errors become errno: handlers raise OSError,
NoSuchInode, PeerError or ReadOnly below; the `_answer` wrapper turns them into
FUSEError, and anything unexpected into EIO after logging it (pyfuse3 would end
the mount on any other exception).

Roles: "primary" applies each change locally and on the peer before answering;
"replica" refuses every change with EROFS; "alone" applies changes locally and
journals what changed. Writes, fsync and namespace changes (create, mkdir, link,
unlink, rename...) go to the peer and to the local disk at the same time, with the
mode, owner and times fixed by the primary, so both copies get the same metadata;
a namespace change that fails here but not on the peer is undone there. Attribute
and xattr changes are applied here first, then replicated with their results.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno as E
import functools
import logging
import os
import stat
import time

import pyfuse3
import trio
from pyfuse3 import FUSEError

from . import protocol as P
from . import sysops
from .apply import apply_setattr
from .mirror import TOUCHED, Mirror, PeerBehind, PeerError, Policy
from .statefile import StateFile
from .tree import O_PATH_FLAGS, NoName, NoSuchInode, Tree, make_node, owner_for

log = logging.getLogger(__name__)
K = P.Kind

PRIMARY, REPLICA, ALONE = "primary", "replica", "alone"
ROLES = (PRIMARY, REPLICA, ALONE)


class ReadOnly(Exception):
    pass


# The handlers whose success acknowledges a change (or its durability) to the application.
_CHANGES = {"create", "write", "fsync", "fsyncdir", "setattr", "setxattr", "removexattr",
            "mkdir", "mknod", "symlink", "link", "unlink", "rmdir", "rename"}
# The handlers that change nothing in the backing tree (but atimes): every other one
# invalidates the kept directory listings (see MirrorFS.readdir).
_READS = {"lookup", "getattr", "readlink", "opendir", "readdir", "releasedir", "statfs",
          "getxattr", "listxattr", "read", "flush"}
DEADLINE_WAIT = 5.0     # a change waits this long for a new write deadline, then fails
# Entries of directory listings kept at most (about 300 bytes each).
KEPT_ENTRIES = 100_000


class PastDeadline(Exception):
    """The controller's permission to acknowledge changes alone has run out (`applied`:
    after the change was done here)."""

    def __init__(self, why: str, applied: bool = False):
        super().__init__(why)
        self.applied = applied


def _answer(fn):
    change = fn.__name__ in _CHANGES
    reads = fn.__name__ in _READS

    @functools.wraps(fn)
    async def handler(self, *args):
        if not reads:
            self.changing += 1      # nothing is kept or given again meanwhile (readdir)
        # Descriptors taken from self.tree stay open until this request ends.
        req = self.tree.op_begin()
        try:
            result = await fn(self, *args)
            if change and self.past_deadline():
                # Applied, maybe, but not acknowledged: the lease may be another node's now.
                await self._take_back(fn.__name__, result)
                raise PastDeadline("after the change", applied=True)
            return result
        except FUSEError:
            raise
        except OSError as e:
            raise FUSEError(e.errno or E.EIO) from None
        except ReadOnly:
            raise FUSEError(E.EROFS) from None
        except PastDeadline as e:
            ago = time.monotonic() - (self.write_deadline or time.monotonic())
            self._refused(fn.__name__, f"the write deadline (the controller's lease) was "
                                       f"{ago:.2f} s ago, {e}")
            if e.applied:
                self._forget_cached(fn.__name__, args)
            raise FUSEError(E.EIO) from None
        except PeerError as e:
            self._refused(fn.__name__, f"the peer: {e}")
            self._forget_cached(fn.__name__, args)
            raise FUSEError(E.EIO) from None
        except NoSuchInode:
            raise FUSEError(E.ESTALE) from None
        except Exception:
            log.exception("unexpected error in %s%r", fn.__name__, args[:2])
            raise FUSEError(E.EIO) from None
        finally:
            self.tree.op_end(req)
            if not reads:
                self.changing -= 1
                self.changes += 1
                if self._kept:
                    self._drop_kept()
    return handler


class _File:
    __slots__ = ("fd", "ino", "writable", "replicated")

    def __init__(self, fd, ino, writable, replicated):
        self.fd, self.ino, self.writable, self.replicated = fd, ino, writable, replicated


class _Dir:
    """An open directory: its names as listed when it was read from the start, and
    the attributes of those read so far, valid while MirrorFS.changes is `changes` and
    no change is in progress."""

    __slots__ = ("ino", "names", "attrs", "changes", "until")

    def __init__(self, ino):
        self.ino, self.names, self.attrs, self.changes, self.until = ino, None, None, -1, 0.0


THREADED_WRITE = 256 * 1024


class _LocalWrite:
    """One write to the local backing file; its outcome is kept, not raised, so that
    the peer's side of the same write is always waited for."""

    __slots__ = ("fd", "buf", "off", "mtime", "written", "error")

    def __init__(self, fd, buf, off, mtime):
        self.fd, self.buf, self.off, self.mtime = fd, buf, off, mtime
        self.written, self.error = 0, None

    def run(self) -> None:
        try:
            self.written = os.pwrite(self.fd, self.buf, self.off)
            sysops.set_times(self.fd, None, self.mtime)
        except OSError as e:
            self.error = e

    async def run_in_thread(self) -> None:
        await trio.to_thread.run_sync(self.run)


def _masked(dfd: int, mode: int, ctx) -> int:
    """The mode a new node gets: the caller's umask applies, unless the directory has
    a default ACL, which the backing filesystem then applies instead (on both nodes,
    since the ACL is replicated)."""
    try:
        if "system.posix_acl_default" in os.listxattr(sysops.proc_path(dfd)):
            return mode
    except OSError:
        pass
    return mode & ~ctx.umask


class _Items:
    """`async with fs._items(ino, ...)` around a change of those items (a file's data or
    attributes, a directory's entries). While a resynchronisation runs, it holds their
    resync locks, so that the resync's reading of an item here and sending it are never
    interleaved with a change of the item: in the replication stream, each item's
    changes are in the order they were applied here. Otherwise it only counts the
    change, so that a resync starts once the changes begun without locks are done."""

    __slots__ = ("fs", "inos", "touch", "extent", "wide", "mark", "locks", "token", "current",
                 "held")

    def __init__(self, fs, inos: tuple, touch: tuple = (), extent=None, wide: bool = False,
                 mark: bool = True):
        self.fs, self.inos, self.touch = fs, inos, touch
        self.mark = mark            # False: nothing to journal (an open without O_TRUNC)
        self.extent = extent        # (offset, length) written in the first item
        self.wide = wide            # it may move a whole subtree or add a link: the journal
        #                             then asks for a full resynchronisation
        self.locks = self.token = None
        self.held = False

    async def __aenter__(self):
        fs = self.fs
        self.current = _CHANGE.set(self)
        self.token = TOUCHED.set(self.inos + self.touch)
        r = fs.resync
        if r is None:
            fs._unlocked += 1
            self.held = True
            return
        locks = [r.lock(i) for i in sorted(set(self.inos))]
        taken = []
        try:
            for lock in locks:
                await lock.acquire()
                taken.append(lock)
        except BaseException:
            for lock in taken:
                lock.release()
            raise
        self.locks, self.held = taken, True
        r.touched(self.inos + self.touch)

    async def __aexit__(self, *exc):
        TOUCHED.reset(self.token)
        _CHANGE.reset(self.current)
        self.done_here()

    def done_here(self) -> None:
        """What it does here is done: a resynchronisation no longer waits for it."""
        if not self.held:
            return
        self.held = False
        fs = self.fs
        if self.locks is None:
            fs._unlocked -= 1
            if not fs._unlocked:
                fs._quiet.set()
            return
        for lock in self.locks:
            lock.release()

    async def journal(self, journal, created: set) -> None:
        """Record durably what this change touches (before it is applied here): the
        peer is out of date, or this change goes on without it."""
        if not self.mark:
            return
        if self.wide:
            await journal.mark_everything()
            return
        for i, ino in enumerate(self.inos + self.touch):
            if ino in created:
                continue            # new since the peer fell behind: sent whole, by name
            if i == 0 and self.extent is not None:
                await journal.mark_data(ino, *self.extent)
            else:
                await journal.mark_node(ino)


_NOTHING = contextlib.nullcontext()
_CHANGE: contextvars.ContextVar[_Items | None] = contextvars.ContextVar("change", default=None)


def _done_here() -> None:
    """The change in progress (if any) is done here: a resynchronisation no longer
    waits for it while it waits for its outcome on the peer."""
    change = _CHANGE.get()
    if change is not None:
        change.done_here()


class MirrorFS(pyfuse3.Operations):
    supports_dot_lookup = False
    # The kernel enforces POSIX ACLs (stored as system.posix_acl_* xattrs in the backing
    # files, replicated like any xattr). It still applies the umask itself: pyfuse3
    # cannot ask for FUSE_DONT_MASK, so a default ACL cannot replace it (a known limit).
    enable_acl = True

    def __init__(self, tree: Tree, state: StateFile, *, role: str = ALONE,
                 cache_timeout: float = 10.0, compress: bool = True):
        super().__init__()
        self.tree = tree
        self.state = state
        self.role = role
        self.mirror: Mirror | None = None
        self.cache_timeout = cache_timeout
        self.compress = compress
        self._gate = trio.Event()
        self._gate.set()
        self._files: dict[int, _File] = {}
        self._dirs: dict[int, _Dir] = {}
        self._next_fh = 1
        # time.monotonic() after which no change is acknowledged (the controller's lease,
        # when this node acts without its peer); None: no limit.
        self.write_deadline: float | None = None
        self._deadline_moved = trio.Event()
        self._refusals, self._refusal_logged = 0, -1.0
        self.on_stale = None        # (items) -> None: invalidates the kernel's caches (agent)
        self.resync = None          # the Resync running, if any (see _Items)
        self.journal = None         # what changed while the peer is out of date (journal.py)
        self.created: set[int] = set()    # inodes created since the peer fell behind
        self._unlocked = 0          # changes in progress that took no resync lock
        self._quiet = trio.Event()
        # Requests that may change the tree in progress, and how many have ended (_answer).
        self.changing, self.changes = 0, 0
        # Complete directory listings kept since the last change ended: directory inode
        # -> (names, attributes, time.monotonic() until which they may be given).
        self._kept: dict[int, tuple[list, list, float]] = {}
        self._kept_entries = 0

    def _items(self, *inos, touch=(), extent=None, wide=False, mark=True) -> _Items:
        return _Items(self, inos, touch, extent, wide, mark)

    async def start_resync(self, resync) -> None:
        """From now on changes take resync's item locks; returns once no change that
        started without them is still in progress."""
        self.resync = resync
        while self._unlocked:
            self._quiet = trio.Event()
            await self._quiet.wait()

    def stop_resync(self) -> None:
        self.resync = None

    # --- role ----------------------------------------------------------------
    def set_role(self, role: str, mirror: Mirror | None) -> None:
        self.role, self.mirror = role, mirror
        self.changes += 1           # a replica's tree changes under it: nothing kept holds
        self._drop_kept()

    def pause(self) -> None:
        """Hold every new change (they wait, they do not fail) during a role switch."""
        if self._gate.is_set():
            self._gate = trio.Event()

    def resume(self) -> None:
        self._gate.set()

    async def _through_gate(self) -> None:
        if not self._gate.is_set():
            await self._gate.wait()
        if self.past_deadline():
            with trio.move_on_after(DEADLINE_WAIT):
                while self.past_deadline():
                    await self._deadline_moved.wait()
            if self.past_deadline():
                raise PastDeadline(f"waited {DEADLINE_WAIT:.0f} s for a new one")

    def _refused(self, op: str, why: str) -> None:
        """Logs a change failed with EIO for the deadline or the peer: at most once a
        second, with a count, so that the admin sees why the application got EIO."""
        self._refusals += 1
        now = time.monotonic()
        if now - self._refusal_logged >= 1.0:
            log.warning("%s failed with EIO (%d since the last message) because of %s", op,
                        self._refusals, why)
            self._refusal_logged, self._refusals = now, 0

    def past_deadline(self) -> bool:
        return self.write_deadline is not None and time.monotonic() >= self.write_deadline

    def set_deadline(self, deadline: float | None) -> None:
        """Changes are acknowledged until `deadline` (time.monotonic()), or always (None);
        those waiting for a later deadline go on."""
        self.write_deadline = deadline
        self._deadline_moved.set()
        self._deadline_moved = trio.Event()

    async def _sync_on_peer(self, kind: K, fields: dict):
        """The peer's half of an fsync: sent only by a primary with a good link, after
        any role switch in progress (an fsync is no change: it is never refused)."""
        await self._through_gate()
        if self.role == PRIMARY and await self._peer_ready():
            return await self._begin(self.mirror, kind, fields)
        return None

    async def _peer_ready(self) -> bool:
        """mirror.ready() for a change not made yet (here or there). One that waited on a
        link that a new link to the same peer replaced (the peer came back without our
        session: chaos seed 16, fault 50) asks the new link, once the switch is over."""
        while True:
            m = self.mirror
            try:
                return await m.ready()
            except PeerError:
                await self._through_gate()
                if self.mirror is m or self.mirror is None or self.role != PRIMARY:
                    raise

    @staticmethod
    async def _begin(m: Mirror, kind: K, fields: dict, **kw):
        """m.begin for a change (or fsync) not done here yet. Under block, one that the
        peer was given up for while it waited to be sent fails now (it used to go on
        alone: after a fence, a node counted itself diverged and waited for the admin,
        split brain; chaos seed 12, fault 54 of the eighth run)."""
        p = await m.begin(kind, fields, **kw)
        if p is None and m.policy != Policy.ALONE:
            raise PeerError(f"the peer was given up before this {kind.name} was sent")
        return p

    def writable_files(self):
        return [(fh, f) for fh, f in self._files.items() if f.writable]

    def journal_open_files(self) -> None:
        """The peer fell behind: files open for writing change without it from now on."""
        self.created.clear()
        for fh, f in self.writable_files():
            f.replicated = False

    async def _may_change(self) -> bool:
        """Before a change: True to replicate it, False to apply it alone. While the peer
        is out of date (resynchronising included), what the change touches is journaled
        first: a crash right after it is applied here must not lose the record."""
        await self._through_gate()
        if self.role == REPLICA:
            raise ReadOnly()
        replicate = (self.role != ALONE and self.mirror is not None
                     and await self._peer_ready())
        change = _CHANGE.get()
        if (self.journal is not None and change is not None
                and (not replicate or self.state.get("peer_outdated"))):
            await change.journal(self.journal, self.created if not replicate else ())
        return replicate

    async def _replicate(self, replicate: bool, kind: K, fields: dict) -> None:
        """Replicate a change already applied here."""
        p = await self.mirror.begin(kind, fields) if replicate else None
        if not await self._settle(replicate, p):
            self._alone_change()

    async def _both(self, replicate: bool, kind: K, fields: dict, local, undo=(), discard=None):
        """Apply a change on the peer and here at the same time: send it, run local()
        (blocking, short), then wait for the peer. If it failed here but worked there,
        the peer is put back with the undo operations, or marked out of date. If it is
        not acknowledged after all, discard(local's result) (a descriptor to close)."""
        p = await self._begin(self.mirror, kind, fields) if replicate else None
        try:
            result = local()
        except OSError as e:
            if p is not None:
                p.failed_here = e.errno or E.EIO       # before its answer is read
                await p.done.wait()
                if not p.lost and not p.errno:
                    await self._undo(p.mirror, undo, f"{kind.name} failed here ({e.strerror}) "
                                                     f"but not on the peer")
            raise
        try:
            if not await self._settle(replicate, p):
                self._alone_change()
        except BaseException:
            if discard is not None:
                discard(result)
            raise
        return result

    async def _undo(self, mirror: Mirror, undo, reason: str) -> None:
        try:
            if not undo:
                raise PeerError("no way to undo it")
            for kind, fields in undo:
                await mirror.call(kind, fields)
        except PeerError:
            await self._diverged(mirror, reason)

    async def _diverged(self, mirror: Mirror, reason: str) -> None:
        """The peer applied a change that failed here, and it could not be undone there:
        what the change touched is journaled, then the peer is marked out of date (or the
        running resync fails: Mirror.diverged), even if the journal cannot be written.
        (Nothing was journaled before: the resync that followed, from the journal, never
        looked at the item, and the peer, counted as up to date, lacked a file whose
        unlink had been refused here.)"""
        try:
            await self._journal_given_up()
        finally:
            await mirror.diverged(reason)

    def _forget_cached(self, op: str, args: tuple) -> None:
        """A change answered EIO may have been applied here all the same (the peer or the
        deadline refused it after): the kernel, told it failed, would go on showing what
        was there before for up to cache_timeout: a deleted file still found by its name
        (sqlite then took a journal deleted by a commit for a hot one: start_prim failed
        with "disk I/O error" after a fence; chaos seed 12). What the change may have
        touched is invalidated once this answer is out (the kernel holds the directory
        until then): FUSE inodes, as the replica's items ("entry", parent, name),
        ("attr", ino), ("data", ino)."""
        if self.on_stale is None:
            return
        if op in ("unlink", "rmdir", "create", "mkdir", "mknod", "symlink"):
            items = [("entry", args[0], args[1]), ("attr", args[0])]
        elif op == "rename":
            items = [("entry", args[0], args[1]), ("entry", args[2], args[3]),
                     ("attr", args[0]), ("attr", args[2])]
        elif op == "link":
            items = [("entry", args[1], args[2]), ("attr", args[1]), ("attr", args[0])]
        elif op in ("setattr", "setxattr", "removexattr"):
            items = [("data" if op == "setattr" and args[2].update_size else "attr", args[0])]
        elif op == "write" and args[0] in self._files:
            items = [("data", self._files[args[0]].ino)]
        elif op == "open" and args[1] & os.O_TRUNC:
            items = [("data", args[0])]
        else:
            return
        self.on_stale(items)

    async def _take_back(self, op: str, result) -> None:
        """A change done here whose answer becomes EIO after all: the kernel never gets
        what it returned, so the lookup reference it would have taken and a created
        file's handle are given back here."""
        if op == "create":
            info, attr = result
            await self._close(info.fh)
        elif op in ("mkdir", "mknod", "symlink", "link"):
            attr = result
        else:
            return
        self.tree.forget(attr.st_ino, 1)

    def _alone_change(self) -> None:
        """A change the peer does not get (journaled in _may_change or by the mirror): its
        copy is out of date from now on."""
        if not self.state.get("peer_outdated"):
            self.state.mark_peer_outdated(f"changed while {self.role} without the peer")
        self.state.mark_changed_alone()

    def _attr(self, ino: int, st: os.stat_result) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = ino
        a.generation = 0
        a.entry_timeout = a.attr_timeout = self.cache_timeout
        a.st_mode, a.st_nlink = st.st_mode, st.st_nlink
        a.st_uid, a.st_gid, a.st_rdev = st.st_uid, st.st_gid, st.st_rdev
        a.st_size, a.st_blksize, a.st_blocks = st.st_size, st.st_blksize, st.st_blocks
        a.st_atime_ns, a.st_mtime_ns, a.st_ctime_ns = st.st_atime_ns, st.st_mtime_ns, st.st_ctime_ns
        return a

    def _at(self, ino: int):
        """The path of ino, computed when the operation is sequenced (see Mirror.begin).
        Callers also compute it once before changing anything here, so that a path that
        cannot be named (beyond PATH_MAX) fails the operation on both copies alike."""
        return lambda: self.tree.path(ino)

    # --- reading -------------------------------------------------------------
    @_answer
    async def lookup(self, parent, name, ctx=None):
        ino, st = self.tree.lookup(parent, name)
        return self._attr(ino, st)

    @_answer
    async def getattr(self, ino, ctx=None):
        return self._attr(ino, self.tree.stat(ino))

    @_answer
    async def readlink(self, ino, ctx):
        return os.readlink(b"", dir_fd=self.tree.fd(ino))

    @_answer
    async def opendir(self, ino, ctx):
        fh = self._new_fh()
        self._dirs[fh] = _Dir(ino)
        return fh

    @_answer
    async def readdir(self, fh, start_id, token):
        """The kernel always asks for the attributes with the names (pyfuse3 uses
        READDIRPLUS), so a listing takes a stat of every entry: most of a `find` over
        a large tree. On a primary or alone every change goes through this agent, so a
        complete listing is kept and given again while no request that may change the
        tree has run since or runs now, for at most cache_timeout (as long as the
        kernel keeps attributes anyway; atimes the reads moved meanwhile are not seen,
        as in the kernel's cache). A replica's tree changes under it: nothing is kept
        there."""
        d = self._dirs[fh]
        dfd = self.tree.fd(d.ino)
        if d.names is None or start_id == 0:
            self._list(d, dfd)
        valid = self._unchanged(d.changes)     # no await below: it holds for this call
        for i in range(start_id, len(d.names)):
            name, attr = d.names[i], None
            if valid:
                attr = d.attrs[i]
            try:
                if attr is None:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    attr = self._attr(self.tree.ino_of(st), st)
                    # What another filesystem mounted inside shows may change without us.
                    if valid and st.st_dev == self.tree.root_dev:
                        d.attrs[i] = attr
                ino, st = self.tree.listed(d.ino, name, attr)
            except FileNotFoundError:
                continue
            if st is not attr:                  # looked up instead (no handle): as it is now
                attr = self._attr(ino, st)
            if not pyfuse3.readdir_reply(token, name, attr, i + 1):
                self.tree.forget(ino, 1)        # not given to the kernel after all
                break
        else:
            self._keep(d)

    def _unchanged(self, changes: int) -> bool:
        """Nothing that may change the tree has run since `changes`, nor runs now."""
        return changes == self.changes and not self.changing and self.role != REPLICA

    def _drop_kept(self) -> None:
        self._kept.clear()
        self._kept_entries = 0

    def _list(self, d: _Dir, dfd: int) -> None:
        kept = self._kept.get(d.ino) if self._unchanged(self.changes) else None
        if kept is not None and time.monotonic() < kept[2]:
            d.names, d.attrs, d.until = kept
            d.changes = self.changes
            return
        d.until = time.monotonic() + self.cache_timeout
        with sysops.reopened(dfd, directory=True) as rfd:
            d.names = sorted(os.fsencode(n) for n in os.listdir(rfd))
        d.attrs, d.changes = [None] * len(d.names), self.changes

    def _keep(self, d: _Dir) -> None:
        """d was listed to its end: keep it if nothing changed since it began."""
        if (not self._unchanged(d.changes) or self.cache_timeout <= 0
                or len(d.names) > KEPT_ENTRIES):
            return
        old = self._kept.get(d.ino)
        if old is not None and old[0] is d.names:       # given from what was kept
            return
        if old is not None:
            self._kept_entries -= len(self._kept.pop(d.ino)[0])
        while self._kept and self._kept_entries + len(d.names) > KEPT_ENTRIES:
            self._kept_entries -= len(self._kept.pop(next(iter(self._kept)))[0])
        self._kept[d.ino] = (d.names, d.attrs, d.until)
        self._kept_entries += len(d.names)

    @_answer
    async def releasedir(self, fh):
        self._dirs.pop(fh, None)

    @_answer
    async def statfs(self, ctx):
        v = os.statvfs(sysops.proc_path(self.tree.root_fd))
        s = pyfuse3.StatvfsData()
        s.f_bsize, s.f_frsize, s.f_blocks = v.f_bsize, v.f_frsize, v.f_blocks
        s.f_bfree, s.f_bavail, s.f_files = v.f_bfree, v.f_bavail, v.f_files
        s.f_ffree, s.f_favail, s.f_namemax = v.f_ffree, v.f_favail, 255
        return s

    @_answer
    async def getxattr(self, ino, name, ctx):
        return os.getxattr(sysops.proc_path(self.tree.fd(ino)), name)

    @_answer
    async def listxattr(self, ino, ctx):
        return [os.fsencode(n) for n in os.listxattr(sysops.proc_path(self.tree.fd(ino)))]

    @_answer
    async def read(self, fh, off, size):
        return os.pread(self._files[fh].fd, size, off)

    async def forget(self, inode_list):
        for ino, n in inode_list:
            self.tree.forget(ino, n)

    # --- open files ----------------------------------------------------------
    def _new_fh(self) -> int:
        fh, self._next_fh = self._next_fh, self._next_fh + 1
        return fh

    @_answer
    async def open(self, ino, flags, ctx):
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY or bool(flags & os.O_TRUNC)
        async with self._items(ino, mark=bool(flags & os.O_TRUNC)) if writable else _NOTHING:
            replicate = await self._may_change() if writable else False
            path = self._name_of(ino) if writable else None     # before O_TRUNC acts here
            if path is None:
                replicate = False     # read only, or an unlinked file: not part of the tree
            fd = self.tree.open_file(ino, flags)
            fh = self._new_fh()
            try:
                if writable and path is not None:
                    st = os.fstat(fd)
                    await self._replicate(replicate, K.OPEN, dict(
                        handle=fh, flags=flags, mtime=st.st_mtime_ns, path=self._at(ino)))
            except BaseException:
                os.close(fd)
                raise
            self._files[fh] = _File(fd, ino, writable, replicate and self._linked())
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    def _linked(self) -> bool:
        return self.mirror is not None and self.mirror.link.value in ("connected", "resync")

    @_answer
    async def create(self, parent, name, mode, flags, ctx):
        async with self._items(parent):
            replicate = await self._may_change()
            dfd = self.tree.fd(parent)
            self.tree.path(parent)                                   # nameable, or fail now
            uid, gid, mode = owner_for(os.fstat(dfd), ctx.uid, ctx.gid, _masked(dfd, mode, ctx))
            fh, now = self._new_fh(), time.time_ns()

            def local():
                fd = make_node(dfd, name, "file", mode=mode, flags=flags, uid=uid, gid=gid)
                try:
                    sysops.set_times(fd, None, now)
                    sysops.set_times(dfd, None, now)
                except OSError:
                    # failed here: not created here either (the peer's copy is undone)
                    os.close(fd)
                    with contextlib.suppress(OSError):
                        os.unlink(name, dir_fd=dfd)
                    raise
                return fd
            fd = await self._both(replicate, K.CREATE, dict(
                handle=fh, flags=flags, mode=mode, uid=uid, gid=gid, mtime=now, pmtime=now,
                parent=self._at(parent), name=name), local,
                undo=self._undo_new(K.UNLINK, dfd, parent, name, fh), discard=os.close)
            try:
                st = os.fstat(fd)
                ino = self.tree.adopt(os.open(name, O_PATH_FLAGS, dir_fd=dfd), st, parent, name)
            except BaseException:
                os.close(fd)
                raise
            if not replicate:
                self.created.add(ino)       # the peer gets it whole, by name (see _Items)
            self._files[fh] = _File(fd, ino, True, replicate and self._linked())
            return pyfuse3.FileInfo(fh=fh, keep_cache=True), self._attr(ino, st)

    def _undo_new(self, kind: K, dfd: int, parent: int, name: bytes, fh: int = 0):
        """Operations that remove from the peer a node we failed to create here."""
        def pmtime():
            return os.fstat(dfd).st_mtime_ns
        ops = [(kind, dict(pmtime=pmtime, parent=self._at(parent), name=name))]
        if fh:
            ops.append((K.RELEASE, dict(handle=fh)))
        return ops

    @_answer
    async def write(self, fh, off, buf):
        f = self._files[fh]
        async with self._items(f.ino, extent=(off, len(buf))):
            replicate = await self._may_change()
            mtime = time.time_ns()
            p = None
            local = _LocalWrite(f.fd, buf, off, mtime)
            if replicate and f.replicated:
                fields = dict(handle=fh, offset=off, mtime=mtime, data=buf)
                if len(buf) >= THREADED_WRITE:
                    # Large writes: the local write runs in a thread while the frame is sent.
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(local.run_in_thread)
                        p = await self.mirror.begin(K.WRITE, fields, compress=self.compress)
                else:
                    p = await self.mirror.begin(K.WRITE, fields, compress=self.compress)
                    local.run()
            else:
                if f.replicated:
                    f.replicated = False        # from now on this file changes without the peer
                    self._alone_change()
                local.run()
            if replicate and f.replicated and not await self._settle(True, p):
                self._alone_change()
            if local.error is not None or local.written < len(buf):
                await self._repair(f, fh, off, len(buf))
            if local.error is not None:
                raise local.error
            return local.written

    async def _finish(self, p) -> bool:
        """Wait for the peer's outcome; True if it applied the change (or, when it could
        not, a resynchronisation brought it there since). After PeerBehind, this
        request's part here is done: a resynchronisation, which waits for the changes in
        progress, may begin while it waits for the outcome (Mirror.settled_without)."""
        try:
            return p is not None and await p.mirror.finish(p)
        except PeerBehind as e:
            _done_here()
            return await p.mirror.settled_without(e.journaled, str(e))

    async def _settle(self, replicate: bool, p) -> bool:
        """_finish for a change made here: one that was to be replicated but was not (the
        peer was given up after _may_change, before or while it was sent) is journaled
        now. The mirror journals what was waiting when it gave the peer up, but not a
        change sequenced while it was recording that, nor one it no longer took (chaos
        finding: a write given up that way was missing from the next resynchronisation,
        and the copies differed)."""
        if not replicate:
            return False
        if p is None:
            return await self._unsent()
        try:
            applied = await self._finish(p)
        except PeerError:
            await self._journal_given_up()
            raise
        if applied:
            return True
        await self._journal_given_up()
        return False

    async def _unsent(self) -> bool:
        """A change made here for the peer but not sent: the peer was given up while it
        waited (for room in the window, say). Journaled, then as Mirror.unsent says:
        under block it went on alone (see _begin)."""
        await self._journal_given_up()
        why = "the peer was given up before this change was sent"
        if self.mirror is None:
            if self.role == ALONE:
                return False
            raise PeerError(why)
        _done_here()
        return await self.mirror.unsent(why)

    async def _journal_given_up(self) -> None:
        change = _CHANGE.get()
        if self.journal is not None and change is not None:
            await change.journal(self.journal, ())

    async def _repair(self, f: _File, fh: int, off: int, length: int) -> None:
        """A write failed (or was short) here but may have succeeded on the peer: send
        the peer our version of that range and our size."""
        if not f.replicated or self.mirror is None:
            return
        try:
            st = os.fstat(f.fd)
            data = b""
            if off < st.st_size:
                # the application's descriptor may be write-only (chaos finding: the
                # repair failed with EBADF and the peer kept the whole write)
                with sysops.reopened(f.fd) as rfd:
                    data = os.pread(rfd, length, off)
        except OSError as e:
            await self._diverged(self.mirror, f"cannot read back a failed write to repair "
                                              f"the peer's copy: {e.strerror}")
            return
        if data:
            await self.mirror.call(K.WRITE, dict(handle=fh, offset=off, mtime=st.st_mtime_ns,
                                                 data=data))
        await self.mirror.call(K.SETATTR, dict(
            handle=fh, mask=P.ATTR_SIZE | P.ATTR_MTIME, mode=0, uid=0, gid=0, size=st.st_size,
            atime=0, mtime=st.st_mtime_ns, path=b""))

    @_answer
    async def flush(self, fh):
        return None

    @_answer
    async def fsync(self, fh, datasync):
        f = self._files[fh]
        p = None
        if f.replicated:
            p = await self._sync_on_peer(K.FSYNC, dict(handle=fh, datasync=int(bool(datasync))))
        try:
            await self._flush_to_disk(f.fd, datasync)
        finally:
            await self._finish(p)

    async def _flush_to_disk(self, fd: int, datasync: bool) -> None:
        """fsync here, in a worker thread: a large flush must not hold up the requests
        of other processes (measured: inline would save about 10% on 4 KiB fsync'd
        writes, and stall every reader during a big flush)."""
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    @_answer
    async def fsyncdir(self, fh, datasync):
        d = self._dirs[fh]
        self.tree.path(d.ino)                                    # nameable, or fail now
        p = await self._sync_on_peer(K.FSYNCDIR, dict(datasync=int(bool(datasync)),
                                                      path=self._at(d.ino)))
        try:
            with sysops.reopened(self.tree.fd(d.ino), directory=True) as fd:
                await self._flush_to_disk(fd, bool(datasync))
        finally:
            await self._finish(p)

    @_answer
    async def release(self, fh):
        await self._close(fh)

    async def _close(self, fh) -> None:
        f = self._files.pop(fh, None)
        if f is None:
            return
        os.close(f.fd)
        if f.replicated and self.mirror is not None:
            # Nothing waits for the peer to close its handle: the change is only that a
            # descriptor goes away, and later operations use new handle numbers.
            await self.mirror.begin(K.RELEASE, dict(handle=fh))

    # --- changing attributes -------------------------------------------------
    @_answer
    async def setattr(self, ino, attr, fields, fh, ctx):
        async with self._items(ino):
            replicate = await self._may_change()
            fd = self.tree.fd(ino)
            st = os.fstat(fd)
            mask = 0
            if fields.update_size:
                mask |= P.ATTR_SIZE
            if fields.update_mode:
                mask |= P.ATTR_MODE
            if fields.update_uid:
                mask |= P.ATTR_UID
            if fields.update_gid:
                mask |= P.ATTR_GID
            if fields.update_atime:
                mask |= P.ATTR_ATIME
            mtime = attr.st_mtime_ns
            if fields.update_mtime:
                mask |= P.ATTR_MTIME
            elif mask & P.ATTR_SIZE:
                mask |= P.ATTR_MTIME           # truncation moves mtime: same value on both nodes
                mtime = time.time_ns()
            f = self._files.get(fh) if fh is not None else None
            values = dict(mode=attr.st_mode, uid=attr.st_uid, gid=attr.st_gid, size=attr.st_size,
                          atime=attr.st_atime_ns, mtime=mtime)
            # Name the inode on the wire by a handle the peer has open (fchmod comes without
            # one: any of the inode's will do), else by path, found before changing anything.
            handle = fh if f is not None and f.replicated and f.writable else self._handle_of(ino)
            path = b"" if handle else self._name_of(ino)
            apply_setattr(fd, mask, writable=f.fd if f is not None and f.writable else None,
                          is_symlink=stat.S_ISLNK(st.st_mode), **values)
            if handle or path is not None:
                await self._replicate(replicate, K.SETATTR, dict(
                    handle=handle, mask=mask, path=b"" if handle else self._at(ino), **values))
            return self._attr(ino, os.fstat(fd))

    def _handle_of(self, ino: int) -> int:
        for fh, f in self._files.items():
            if f.ino == ino and f.replicated and f.writable:
                return fh
        return 0

    def _name_of(self, ino: int) -> bytes | None:
        """The inode's path, or None when it has no name left: an unlinked open file is
        no longer part of the tree, and a change to it has nothing to replicate."""
        try:
            return self.tree.path(ino)
        except NoName:
            return None

    @_answer
    async def setxattr(self, ino, name, value, ctx):
        async with self._items(ino):
            replicate = await self._may_change()
            path = self._name_of(ino)
            os.setxattr(sysops.proc_path(self.tree.fd(ino)), name, value)
            if path is not None:
                await self._replicate(replicate, K.SETXATTR, dict(
                    path=self._at(ino), name=name, value=value))

    @_answer
    async def removexattr(self, ino, name, ctx):
        async with self._items(ino):
            replicate = await self._may_change()
            path = self._name_of(ino)
            os.removexattr(sysops.proc_path(self.tree.fd(ino)), name)
            if path is not None:
                await self._replicate(replicate, K.REMOVEXATTR, dict(path=self._at(ino),
                                                                     name=name))

    # --- changing the namespace ----------------------------------------------
    async def _new_node(self, parent, name, kind, ctx, *, mode=0, rdev=0, target=b""):
        async with self._items(parent):
            replicate = await self._may_change()
            dfd = self.tree.fd(parent)
            self.tree.path(parent)                                   # nameable, or fail now
            if kind != "symlink":
                mode = _masked(dfd, mode, ctx)
            uid, gid, mode = owner_for(os.fstat(dfd), ctx.uid, ctx.gid, mode)
            now = time.time_ns()
            common = dict(uid=uid, gid=gid, mtime=now, pmtime=now, parent=self._at(parent), name=name)
            if kind == "dir":
                op, fields, undo = K.MKDIR, dict(mode=mode, **common), K.RMDIR
            elif kind == "node":
                op, fields, undo = K.MKNOD, dict(mode=mode, rdev=rdev, **common), K.UNLINK
            else:
                op, fields, undo = K.SYMLINK, dict(target=target, **common), K.UNLINK

            def local():
                make_node(dfd, name, kind, mode=mode, rdev=rdev, target=target, uid=uid, gid=gid)
                sysops.set_times(dfd, None, now, name)
                sysops.set_times(dfd, None, now)
            await self._both(replicate, op, fields, local,
                             undo=self._undo_new(undo, dfd, parent, name))
            ino, st = self.tree.lookup(parent, name)
            return self._attr(ino, st)

    @_answer
    async def mkdir(self, parent, name, mode, ctx):
        return await self._new_node(parent, name, "dir", ctx, mode=mode | stat.S_IFDIR)

    @_answer
    async def mknod(self, parent, name, mode, rdev, ctx):
        return await self._new_node(parent, name, "node", ctx, mode=mode, rdev=rdev)

    @_answer
    async def symlink(self, parent, name, target, ctx):
        return await self._new_node(parent, name, "symlink", ctx, mode=stat.S_IFLNK | 0o777,
                                    target=target)

    @_answer
    async def link(self, ino, new_parent, new_name, ctx):
        async with self._items(new_parent, touch=(ino,), wide=True):
            replicate = await self._may_change()
            self.tree.path(ino), self.tree.path(new_parent)          # nameable, or fail now
            dfd, src = self.tree.fd(new_parent), self.tree.fd(ino)
            now = time.time_ns()

            def local():
                os.link(sysops.proc_path(src), new_name, dst_dir_fd=dfd, follow_symlinks=True)
                sysops.set_times(dfd, None, now)
            await self._both(replicate, K.LINK, dict(
                pmtime=now, source=self._at(ino), parent=self._at(new_parent), name=new_name),
                local, undo=self._undo_new(K.UNLINK, dfd, new_parent, new_name))
            ino, st = self.tree.lookup(new_parent, new_name)
            return self._attr(ino, st)

    async def _remove(self, parent, name, kind: K):
        # A file with other links keeps living: a resync that placed it there must
        # look at it again (see Resync.touched).
        try:
            st = os.stat(name, dir_fd=self.tree.fd(parent), follow_symlinks=False)
            touch = (self.tree.ino_of(st),) if kind == K.UNLINK and st.st_nlink > 1 else ()
        except OSError:
            touch = ()
        async with self._items(parent, touch=touch):
            replicate = await self._may_change()
            dfd = self.tree.fd(parent)
            self.tree.path(parent)                                   # nameable, or fail now
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            now = time.time_ns()

            def local():
                (os.rmdir if kind == K.RMDIR else os.unlink)(name, dir_fd=dfd)
                self.tree.moved(self.tree.ino_of(st), (parent, name), None)
                sysops.set_times(dfd, None, now)
            await self._both(replicate, kind, dict(pmtime=now, parent=self._at(parent), name=name),
                             local)

    @_answer
    async def unlink(self, parent, name, ctx):
        await self._remove(parent, name, K.UNLINK)

    @_answer
    async def rmdir(self, parent, name, ctx):
        await self._remove(parent, name, K.RMDIR)

    @_answer
    async def rename(self, parent_old, name_old, parent_new, name_new, flags, ctx):
        src, dst = self.tree.fd(parent_old), self.tree.fd(parent_new)
        self.tree.path(parent_old), self.tree.path(parent_new)    # nameable, or fail now
        st = os.stat(name_old, dir_fd=src, follow_symlinks=False)
        moved = self.tree.ino_of(st)
        other = None
        if flags & sysops.RENAME_EXCHANGE:
            ost = os.stat(name_new, dir_fd=dst, follow_symlinks=False)
            other = self.tree.ino_of(ost)
        # A directory moved while the peer is behind: its whole subtree is at stake.
        wide = stat.S_ISDIR(st.st_mode) or (other is not None and stat.S_ISDIR(ost.st_mode))
        async with self._items(parent_old, parent_new, wide=wide,
                               touch=(moved,) if other is None else (moved, other)):
            replicate = await self._may_change()
            now = time.time_ns()

            def local():        # the names kept here follow as soon as it is done
                sysops.rename(src, name_old, dst, name_new, flags)
                self.tree.moved(moved, (parent_old, name_old), (parent_new, name_new))
                if other is not None:
                    self.tree.moved(other, (parent_new, name_new), (parent_old, name_old))
                sysops.set_times(src, None, now)
                sysops.set_times(dst, None, now)
            await self._both(replicate, K.RENAME, dict(
                flags=flags, pmtime_old=now, pmtime_new=now, parent_old=self._at(parent_old),
                name_old=name_old, parent_new=self._at(parent_new), name_new=name_new), local)
