"""Resynchronisation: the primary brings an out-of-date peer up to date, online.

docs/reintegration.md gives the argument; in short:

- Every change the application makes during the resync is replicated as usual (the
  link is RESYNC). One the peer cannot apply (its copy of that item is stale) does not
  make the peer out of date again (it is already): the items it touched are queued and
  sent again (Mirror.on_failed).
- The resync walks the tree, directories before what they hold. Each item (a
  directory's entries and attributes, a file's data and attributes) is handled under
  its resync lock, which the changes of that item also take (fs._Items): the peer
  describes its copy at that point of the replication stream (PROBE), the primary
  describes its own, and sends only what differs. Nothing changes the item here
  between the two and the fixes, and everything that changed it before is ahead of
  them in the stream, so afterwards both copies of the item are equal, and every later
  change applies to equal copies.
- A change that moves a not-yet-visited item where the walk has already been (rename,
  link) queues that item too.
- At the end, once every operation sent was acknowledged and nothing is queued,
  RESYNC_DONE: the peer makes its copy durable and marks it up to date, unless one of
  the changes failed there since the last attempt (then the touched items go again).
  The primary clears its out-of-date mark when the peer accepted (Mirror._resynced).

A resync that stops halfway (link lost, either node killed) leaves the peer marked out
of date on both sides; the next one starts over. This is the full resync: every file is
hashed on both sides, but only chunks that differ are sent (lz4-packed when it pays).
"""

from __future__ import annotations

import collections
import contextlib
import errno as E
import json
import logging
import os
import stat
import time

import trio

from . import journal, probe
from . import protocol as P
from . import sysops
from .mirror import TOUCHED, Link
from .tree import NoSuchInode

log = logging.getLogger(__name__)
K = P.Kind

BLOCK = 32 << 10            # the unit compared by hash, and sent when it differs
PUT_MAX = 1 << 20           # differing neighbour blocks go in one PUT up to this size
_HANDLES = 1 << 62          # handles the resync itself opens on the peer
_ENGINE = -1                # TOUCHED marker of the resync's own operations
MAX_ATTEMPTS = 20           # an item that keeps failing ends the attempt (a busy
#                             directory may go again a few times)
_O_PATH = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_DELETED = b" (deleted)"
# entry fields (probe._entries)
_NAME, _TYPE, _INO, _NLINK, _EXTRA, _MODE, _UID, _GID, _MTIME, _SIZE, _HASHES, _XATTRS = range(12)


class ResyncFailed(Exception):
    """This attempt stopped; the peer stays out of date."""


class _Gone(Exception):
    """The item being handled lost its name meanwhile (the change that removed or
    moved it queued what it touched)."""


def _entry_differs(e: list, r: list | None) -> bool:
    """Does the peer's entry r differ from ours, e, in anything the resync compares
    (type, links, content of a small file, attributes)? Inode numbers always differ."""
    return r is None or any(e[i] != r[i] for i in range(len(e)) if i not in (_NAME, _INO))


def _entry_desc(e: list) -> dict:
    """A directory entry as probe.describe_fd would describe the node."""
    d = {"exists": True, "type": e[_TYPE], "ino": e[_INO], "nlink": e[_NLINK],
         "mode": e[_MODE], "uid": e[_UID], "gid": e[_GID], "mtime": e[_MTIME],
         "size": e[_SIZE]}
    if e[_TYPE] == stat.S_IFLNK:
        d["target"] = e[_EXTRA]
    else:
        d["rdev"] = e[_EXTRA]
        d["xattrs"] = e[_XATTRS] or {}
    if e[_HASHES] is not None:
        d["hashes"] = e[_HASHES]
    return d


def _runs(mine: list[int], theirs: list[int], block: int) -> list[tuple[int, int]]:
    """(offset, length) of the byte ranges whose blocks differ, neighbours merged up to
    PUT_MAX bytes (the last block may be short: the read stops at the end)."""
    runs: list[list[int]] = []
    for i, h in enumerate(mine):
        if i < len(theirs) and theirs[i] == h:
            continue
        off = i * block
        if runs and runs[-1][0] + runs[-1][1] == off and runs[-1][1] + block <= PUT_MAX:
            runs[-1][1] += block
        else:
            runs.append([off, block])
    return [(off, length) for off, length in runs]


def _count(root_fd: int) -> tuple[int, int]:
    """Items and bytes of regular files under root_fd (for progress)."""
    items = size = 0
    with sysops.reopened(root_fd, directory=True) as top:
        for _, dirs, files, dfd in os.fwalk(".", dir_fd=top, follow_symlinks=False):
            items += len(dirs) + len(files)
            for name in files:
                try:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISREG(st.st_mode):
                    size += st.st_size
    return items + 1, size


class Resync:
    def __init__(self, fs, mirror, *, block: int = BLOCK, rate: int = 0, dirty=None):
        self.fs, self.mirror, self.tree = fs, mirror, fs.tree
        # journal.Dirty: compare only what it names (fast); None: everything (full)
        self.dirty = dirty if dirty is not None and not dirty.everything else None
        self.block = block
        self.rate = rate                  # bytes per second of chunk data; 0: no cap
        self.done: set[int] = set()
        self.queue: collections.deque[tuple[int, int]] = collections.deque()   # (fd, ino)
        self._queued: set[int] = set()
        self._locks: dict[int, trio.Lock] = {}
        self._attempts: collections.Counter = collections.Counter()
        # files with several links: primary inode -> (an O_PATH descriptor of the link
        # placed on the peer, whose path follows the application's renames; the peer's
        # inode; the directory pass that placed it)
        self._placed: dict[int, tuple[int, int | None, int]] = {}
        self._pass = 0                          # directories handled so far
        self._claimed: dict[int, int] = {}      # peer inode (several links) -> primary inode
        self._whole: set[int] = set()          # files to compare whole (new on the peer)
        self._copy: dict[int, int] = {}        # file handled -> the peer's inode of it
        # files with several links: primary inode -> {directory inode: its path} where
        # the walk met its links
        self._groups: dict[int, dict[int, bytes]] = {}
        self._looked: set[int] = set()         # directories only looked through (fast)
        self._handle = _HANDLES
        self._failure: str | None = None
        self._root = self.tree.root_path.rstrip(b"/") + b"/"
        self.progress = {"state": "starting", "full": self.dirty is None,
                         "items_total": 0, "items_done": 0,
                         "bytes_total": 0, "bytes_done": 0, "bytes_sent": 0,
                         "started": time.time(), "rate_bps": 0, "eta_s": None}
        self._t0 = time.monotonic()

    # --- what the file system and the mirror call -----------------------------------------
    def lock(self, ino: int) -> trio.Lock:
        lock = self._locks.get(ino)
        if lock is None:
            lock = self._locks[ino] = trio.Lock()
        return lock

    def touched(self, inos, failed: bool = False) -> None:
        """Items a change touches (failed: the peer could not apply it): those not
        handled yet, or to be handled again, are queued. A change of names (a rename,
        link or unlink: several items) of a file with several links already placed on
        the peer has them all handled again: that file's links met so far may be there
        as another file, now moved where the walk has been."""
        if len(inos) > 1 and not failed and any(i in self._placed for i in inos):
            failed = True
        for ino in inos:
            if ino == _ENGINE:
                continue
            if failed:
                self.done.discard(ino)
            if ino in self.done or ino in self._queued:
                continue
            try:
                fd = os.dup(self.tree.fd(ino))
            except (NoSuchInode, OSError):
                continue
            self._queued.add(ino)
            self.queue.append((fd, ino))

    def _failed(self, p) -> None:
        """A change failed on the peer: its items go again. A step of the resync itself
        names the item it was fixing (a change raced it, e.g. moved the link a new
        link was made from): that item goes again; with no item, the attempt ends."""
        if _ENGINE in p.touched:
            step = f"{p.kind.name}: {os.strerror(p.errno)}"
            items = [i for i in p.touched if i != _ENGINE]
            if not items and not self._failure:
                self._failure = f"the peer could not apply a resynchronisation step ({step})"
            for ino in items:
                log.debug("resynchronisation step failed on the peer (%s): inode %d goes "
                          "again", step, ino)
                self._attempts[ino] += 1
                if self._attempts[ino] > MAX_ATTEMPTS and not self._failure:
                    self._failure = (f"inode {ino} still differs after {MAX_ATTEMPTS} "
                                     f"attempts ({step})")
        self.touched(p.touched, failed=True)

    # --- running ------------------------------------------------------------------------
    def attach(self) -> None:
        """Turn the link to RESYNC (raises PeerError when it cannot be): from now on every
        change is sent to the peer; run() must follow."""
        self.mirror.begin_resync(self._failed)

    async def run(self) -> None:
        """Resynchronise (after attach); returns once the peer accepted RESYNC_DONE (the
        link is then connected). Raises ResyncFailed (the peer stays out of date)."""
        m, fs = self.mirror, self.fs
        token = TOUCHED.set((_ENGINE,))
        try:
            await fs.start_resync(self)
            if self.dirty is not None and fs.journal is not None:
                # A change that started before and failed on the peer journaled itself
                # after this resync's copy of the journal was taken.
                self.dirty.add(fs.journal.dirty)
                if self.dirty.everything or fs.journal.owes_everything:
                    # (a journal write failed: what it was to record is unknown)
                    self.dirty = None
                    self.progress["full"] = True
            await self._begin()
            items, size = await trio.to_thread.run_sync(_count, self.tree.root_fd)
            self.progress.update(items_total=items, bytes_total=size, state="copying")
            log.info("resynchronising %s:%s: %d items, %d bytes to compare", *m.peer, items,
                     size)
            await self._walk(self.tree.root_fd, own=False)
            await self._finish()
        except BaseException:
            m.end_resync()
            raise
        finally:
            TOUCHED.reset(token)
            fs.stop_resync()
            while self.queue:
                os.close(self.queue.popleft()[0])
            for fd, _, _ in self._placed.values():
                os.close(fd)
            self._placed.clear()
        self.progress.update(state="done", eta_s=0)
        log.info("resynchronisation of %s:%s done in %.1f s: %d bytes sent", *m.peer,
                 time.monotonic() - self._t0, self.progress["bytes_sent"])

    async def _begin(self) -> None:
        if self.dirty is not None:
            p = await self.mirror.begin(K.RESYNC_BEGIN, dict(full=0))
            if p is None:
                raise ResyncFailed("the link was lost")
            await p.done.wait()
            if p.errno == E.ESTALE:
                log.warning("the peer's copy may hold changes of its own (it was a primary): "
                            "comparing everything")
                self.dirty = None
                self.progress["full"] = True
            elif p.lost or p.errno:
                raise ResyncFailed("the peer refused to begin")
            else:
                return
        await self._op(K.RESYNC_BEGIN, dict(full=1))

    def _go_full(self, why: str) -> None:
        """From now on compare everything: the directories only looked through so far are
        walked again, from the top."""
        if self.dirty is None:
            return
        log.info("resynchronisation: %s: comparing everything", why)
        self.dirty = None
        self.progress["full"] = True
        self.done -= self._looked
        self._looked.clear()
        self.touched((self._ino(self.tree.root_fd),), failed=True)

    async def _record(self, inos) -> None:
        """The resync is about to change these items on the peer: those the journal does
        not name whole are journaled first, as nodes, with one flush. An attempt that
        fails after changing them, or a kill -9, is followed by one that compares them
        whole again. (A fast retry used to look only at what the journal named, and left a
        file that the failed attempt had re-created empty as it was; chaos seed 13, fault
        151.)"""
        j = self.fs.journal
        if j is not None and self.dirty is not None:   # a full pass: see _op
            await j.mark_nodes(inos)

    def _is_dirty(self, ino: int) -> bool:
        d = self.dirty
        return d is None or ino in d.nodes or ino in d.chunks

    async def _finish(self) -> None:
        m = self.mirror
        while True:
            while self.queue:
                fd, ino = self.queue.popleft()
                self._queued.discard(ino)
                try:
                    if stat.S_ISDIR(os.fstat(fd).st_mode):
                        await self._walk(fd, own=False, force=True)
                    else:
                        await self._leaf(fd, force=True)
                finally:
                    os.close(fd)
            self._check()
            await m.sync_point()
            self._check()
            if self.queue or await self._split_groups():
                continue
            self.progress["state"] = "finishing"
            await self._rebind_all()
            self._check()           # (spoiled meanwhile: no RESYNC_DONE for the peer to take)
            p = await m.begin(K.RESYNC_DONE, {}, patient=True)
            if p is None:
                self._check()
                raise ResyncFailed("the link was lost")
            await p.done.wait()
            if p.lost:
                raise ResyncFailed("the link was lost")
            if m.spoiled:
                self._check()
            if p.errno == E.EAGAIN:
                self._check()
                continue        # a change failed there meanwhile: its items are queued
            if p.errno:
                raise ResyncFailed(f"the peer refused to finish: {os.strerror(p.errno)}")
            if m.link != Link.CONNECTED:
                raise ResyncFailed("the peer's new state could not be recorded here")
            return

    async def _split_groups(self) -> bool:
        """Before RESYNC_DONE: is each file with several links that the walk met one file
        on the peer too, under its names in the directories where the walk met it? A
        LINK the application made from a name the resync then replaced could leave the
        peer's group split in two files, the peer counted as up to date, and later writes
        through one name missed the other (test_resync_under_a_busy_namespace, about one
        run in twenty). The directories of such a file go again (as one more attempt at
        each); True when some did. Each directory is compared under its lock, so its
        names are the same here and there."""
        where: dict[int, bytes] = {}
        for dirs in self._groups.values():
            where.update(dirs)
        peer_inos: dict[int, set] = collections.defaultdict(set)
        dirs_of: dict[int, dict[int, bytes]] = collections.defaultdict(dict)
        for dino, path in where.items():
            try:
                dfd = sysops.open_beneath(self.tree.root_fd, path, os.O_PATH | os.O_DIRECTORY)
            except OSError:
                continue            # moved or removed: that change queued what it touched
            try:
                if self._ino(dfd) != dino:
                    continue
                async with self.lock(dino), self._item(dino):
                    ours = await trio.to_thread.run_sync(probe.describe_fd, dfd,
                                                         probe.ENTRIES, self.block)
                    theirs = await self._probe(self._at(dfd), probe.ENTRIES)
                peer = {e[_NAME]: e for e in theirs.get("entries", ())}
                for e in ours["entries"]:
                    if e[_INO] in self._groups and e[_TYPE] == stat.S_IFREG:
                        r = peer.get(e[_NAME])
                        peer_inos[e[_INO]].add(r[_INO] if r is not None else None)
                        dirs_of[e[_INO]][dino] = path
            finally:
                os.close(dfd)
        split = False
        for pino, inos in peer_inos.items():
            if len(inos) > 1 or None in inos:
                log.info("resynchronisation: inode %d is %d files on the peer: its %d "
                         "directories go again", pino, len(inos), len(dirs_of[pino]))
                for path in dirs_of[pino].values():
                    self._requeue_path(path, count=True)
                split = True
        return split

    def _check(self) -> None:
        if self._failure:
            raise ResyncFailed(self._failure)
        if self.mirror.spoiled:
            raise ResyncFailed(f"the copies differ again ({self.mirror.spoiled})")
        if self.mirror.link != Link.RESYNC:
            raise ResyncFailed(f"the link is {self.mirror.link.value}")

    def _attempt(self, ino: int) -> None:
        self._attempts[ino] += 1
        if self._attempts[ino] > MAX_ATTEMPTS:
            raise ResyncFailed(f"inode {ino} still differs after {MAX_ATTEMPTS} attempts")

    # --- names ----------------------------------------------------------------------------
    def _ino(self, fd: int) -> int:
        return self.tree.ino_of(os.fstat(fd))

    def _rel(self, fd: int, other_link: bool = True) -> bytes:
        """fd's path relative to the root, as the peer resolves it; raises FileNotFoundError
        when it has none (removed meanwhile). A file whose name fd was opened by is gone
        but which keeps other links: one of those (other_link), else the removed name."""
        if fd == self.tree.root_fd:
            return b"."
        full = os.readlink(sysops.proc_path(fd).encode())
        if full.endswith(_DELETED):
            st = os.fstat(fd)
            if st.st_nlink == 0:
                raise FileNotFoundError(E.ENOENT, "removed")
            if other_link and not stat.S_ISDIR(st.st_mode):
                return self._other_link(st)
        if full + b"/" == self._root:
            return b"."                     # another descriptor of the root (requeued)
        if not full.startswith(self._root):
            raise FileNotFoundError(E.ENOENT, "outside the tree")
        return full[len(self._root):]

    def _other_link(self, st: os.stat_result) -> bytes:
        """A file whose name this descriptor was opened by is gone, but which keeps other
        links: one of those, from the names the mount knows, or the link this resync
        placed on the peer (test_resync_under_a_busy_namespace: the removed name was
        probed, the file counted as gone, and the peer kept a stale copy under its other
        link). FileNotFoundError when neither names it, as for a removed file."""
        ino = self.tree.ino_of(st)
        try:
            return self.tree.path(ino)
        except (NoSuchInode, FileNotFoundError):
            pass
        if ino in self._placed:
            placed = self._placed_path(ino)
            if placed is not None:
                return placed
        raise FileNotFoundError(E.ENOENT, f"none of the {st.st_nlink} other link(s) is known")

    def _at(self, fd: int):
        return lambda: self._rel(fd)

    def _under(self, dfd: int, name: bytes):
        def path():
            base = self._rel(dfd)
            return name if base == b"." else base + b"/" + name
        return path

    # --- talking to the peer ---------------------------------------------------------------
    async def _op(self, kind: P.Kind, fields: dict, compress: bool = False) -> None:
        j = self.fs.journal
        if self.dirty is None and j is not None and not j.dirty.everything:
            # A full pass (the peer's ESTALE, or _go_full) may change anything: an attempt
            # that fails from here on, or a crash, is followed by a full one.
            await j.mark_everything()
        p = await self.mirror.begin(kind, fields, compress=compress)
        if p is None:
            self._check()
            raise _Gone(kind.name)

    async def _probe(self, path, what: int, only: list | None = None) -> dict:
        blocks = json.dumps(only).encode() if only is not None else b""
        p = await self.mirror.begin(K.PROBE, dict(what=what, chunk=self.block, path=path,
                                                  blocks=blocks), patient=True)
        if p is None:
            self._check()
            raise _Gone("PROBE")
        await p.done.wait()
        if p.lost or not p.complete:
            raise ResyncFailed("the link was lost")
        d = probe.loads(b"".join(p.chunks))
        if "error" in d:
            raise ResyncFailed(f"the peer cannot read its copy: {d['error']}")
        return d

    async def _pace(self, sent: int) -> None:
        self.progress["bytes_sent"] += sent
        if self.rate:
            ahead = self.progress["bytes_sent"] / self.rate - (time.monotonic() - self._t0)
            if ahead > 0:
                await trio.sleep(ahead)

    # --- the walk -------------------------------------------------------------------------
    async def _walk(self, top: int, own: bool, force: bool = False) -> None:
        """Handle the directory top (force: even if the journal does not name it), then
        everything beneath it not handled yet, depth first, with one open descriptor per
        level."""
        levels = [(top, iter(await self._directory(top, force)), own)]
        try:
            while levels:
                dfd, names, _ = levels[-1]
                name = next(names, None)
                if name is None:
                    dfd, _, mine = levels.pop()
                    if mine:
                        os.close(dfd)
                    continue
                try:
                    cfd = os.open(name, _O_PATH, dir_fd=dfd)
                    st = os.fstat(cfd)
                except OSError:
                    continue                # gone meanwhile: its rename or removal followed
                if self.tree.ino_of(st) in self.done:
                    os.close(cfd)
                elif stat.S_ISDIR(st.st_mode):
                    try:
                        names = iter(await self._directory(cfd))
                    except BaseException:
                        os.close(cfd)
                        raise
                    levels.append((cfd, names, True))
                else:
                    try:
                        await self._leaf(cfd)
                    finally:
                        os.close(cfd)
        finally:
            for dfd, _, mine in levels:
                if mine:
                    os.close(dfd)

    async def _directory(self, dfd: int, force: bool = False) -> list[bytes]:
        """Make the peer's entries and attributes of this directory equal to ours, and
        its small files too; returns the names still to visit (directories, large files).
        A directory the journal does not name is only looked through, here."""
        ino = self._ino(dfd)
        if not force and not self._is_dirty(ino):
            return await self._look_through(dfd, ino)
        visit: list[bytes] = []
        self._pass += 1
        async with self.lock(ino), self._item(ino):
            self._check()
            try:
                here = self._rel(dfd)
            except FileNotFoundError:
                return []
            theirs = await self._probe(self._at(dfd), probe.ENTRIES | probe.HASHES)
            ours = await trio.to_thread.run_sync(probe.describe_fd, dfd, probe.ENTRIES,
                                                 self.block)
            if not theirs["exists"] or theirs["type"] != stat.S_IFDIR:
                self._requeue_parent(dfd)
                return []
            peer = {bytes.fromhex(e[_NAME]): e for e in theirs["entries"]}
            mine = {bytes.fromhex(e[_NAME]): e for e in ours["entries"]}
            # this directory, and each file of it that may be re-created or rewritten
            await self._record([ino] + [e[_INO] for name, e in mine.items()
                                        if e[_TYPE] == stat.S_IFREG
                                        and _entry_differs(e, peer.get(name))])
            changed = False
            for name in sorted(peer.keys() - mine.keys()):
                await self._op(K.REMOVE, dict(path=self._under(dfd, name)))
                changed = True
            for name, e in sorted(mine.items()):
                r = peer.get(name)
                keep = r is not None and self._same_node(dfd, name, e, r)
                if not keep:
                    if r is not None:
                        await self._op(K.REMOVE, dict(path=self._under(dfd, name)))
                    r = await self._create(dfd, name, e, ours["mtime"])
                    changed = True
                    if e[_TYPE] == stat.S_IFREG and (e[_INO] in self.done or any(
                            f.ino == e[_INO] for _, f in self.fs.writable_files())):
                        # The application's handles on the peer may have named the file
                        # that was there, and written to it after this one was handled:
                        # they are bound again, and this one is compared again.
                        self.touched((e[_INO],), failed=True)
                if e[_TYPE] == stat.S_IFREG and e[_NLINK] > 1:
                    self._groups.setdefault(e[_INO], {})[ino] = here
                if e[_TYPE] == stat.S_IFDIR:
                    visit.append(name)
                elif e[_INO] in self.done:
                    if r is None or self._copy.get(e[_INO]) == r[_INO]:
                        continue            # another link of the copy handled already
                    # handled where it was before a move or an unlink of its other link:
                    # the peer's entry here is another file: compared whole, as any file
                    # (it was not: the peer kept a stale file here and counted as up to
                    # date; test_resync_under_a_busy_namespace, seed 2)
                    self.done.discard(e[_INO])
                    self._whole.add(e[_INO])
                    visit.append(name)
                elif r is None or (e[_TYPE] == stat.S_IFREG and (
                        e[_SIZE] > probe.SMALL or r[_HASHES] is None)):
                    visit.append(name)
                else:
                    await self._small(dfd, name, e[_INO], _entry_desc(r))
            await self._fix_attrs(self._at(dfd), ours, theirs, force_mtime=changed)
            self._handled(ino, 0)
        self._forget_lock(ino)
        return visit

    async def _look_through(self, dfd: int, ino: int) -> list[bytes]:
        """Fast resynchronisation: the entries of an unchanged directory are the peer's
        too; visit its subdirectories and what the journal names."""
        ours = await trio.to_thread.run_sync(probe.describe_fd, dfd, probe.ENTRIES, self.block)
        self._handled(ino, 0)
        self._looked.add(ino)
        return [bytes.fromhex(e[_NAME]) for e in ours["entries"]
                if e[_TYPE] == stat.S_IFDIR or self._is_dirty(e[_INO])]

    @contextlib.asynccontextmanager
    async def _item(self, ino: int):
        """The resync's operations while it fixes item ino name it (see _failed). An
        item that lost its name meanwhile is left (what follows the block runs)."""
        token = TOUCHED.set((_ENGINE, ino))
        try:
            yield
        except _Gone as e:
            log.debug("inode %d lost its name during %s: left", ino, e)
        finally:
            TOUCHED.reset(token)

    def _place(self, pino: int, dfd: int, name: bytes, rino: int | None) -> None:
        """Remember the link dfd/name of file pino (several links) as the peer's copy of
        it, for the other links to be made from."""
        try:
            fd = os.open(name, _O_PATH, dir_fd=dfd)
        except OSError:
            return
        old = self._placed.pop(pino, None)
        if old is not None:
            os.close(old[0])
        self._placed[pino] = (fd, rino, self._pass)

    def _placed_path(self, pino: int) -> bytes | None:
        """Where the placed link of pino is now (renames followed), or None when it is
        gone (then it is placed anew)."""
        fd = self._placed[pino][0]
        try:
            rel = self._rel(fd, other_link=False)
            here, now = os.fstat(fd), os.stat(rel, dir_fd=self.tree.root_fd,
                                              follow_symlinks=False)
        except OSError:
            return None
        # an unlinked link of a file that has others reads as "... (deleted)"
        return rel if (here.st_dev, here.st_ino) == (now.st_dev, now.st_ino) else None

    def _on_peer(self, path: bytes, dfd: int, pino: int) -> bool:
        """Is the placed link of pino, at path, on the peer too? Its directory is the
        one being handled and it was placed in this pass, or its directory was handled
        and not queued again since."""
        try:
            st = os.stat(path.rpartition(b"/")[0] or b".", dir_fd=self.tree.root_fd)
        except OSError:
            return False
        ino = self.tree.ino_of(st)
        if ino == self._ino(dfd):
            return self._placed[pino][2] == self._pass
        return ino in self.done and ino not in self._queued

    def _unplace(self, pino: int) -> None:
        fd = self._placed.pop(pino)[0]
        os.close(fd)

    def _same_node(self, dfd: int, name: bytes, e: list, r: list) -> bool:
        """Can the peer's entry r stay for our entry e (same kind of node, and for a file
        with several links, the same group)?"""
        if r[_TYPE] != e[_TYPE]:
            return False
        if e[_TYPE] in (stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK):
            return r[_EXTRA] == e[_EXTRA]
        if e[_TYPE] != stat.S_IFREG:
            return True
        pino, rino = e[_INO], r[_INO]
        if e[_NLINK] == 1 and r[_NLINK] > 1:
            # The peer's file has other names, which name other files here: it stays
            # theirs (the application's handles there may be bound to it).
            return False
        if e[_NLINK] > 1 and pino in self._placed:
            if self._placed_path(pino) is not None:
                return self._placed[pino][1] == rino
            self._unplace(pino)
        if e[_NLINK] > 1 and r[_NLINK] != e[_NLINK]:
            # The peer's file has another number of links: its group differs, and in a
            # fast pass the other links may lie where the journal does not look.
            self._go_full(f"{name.decode(errors='replace')!r} has {e[_NLINK]} links here, "
                          f"{r[_NLINK]} on the peer")
        owner = self._claimed.get(rino)
        if owner is not None and owner != pino:
            return False
        if r[_NLINK] > 1:
            self._claimed[rino] = pino
        if e[_NLINK] > 1:
            self._place(pino, dfd, name, rino)
        return True

    async def _create(self, dfd: int, name: bytes, e: list, pmtime: int) -> list | None:
        """Create our entry e on the peer; returns the entry the peer now has (for a new
        file: empty, with our attributes), or None when it is to be probed."""
        parent, typ = self._at(dfd), e[_TYPE]
        common = dict(uid=e[_UID], gid=e[_GID], mtime=e[_MTIME], pmtime=pmtime, parent=parent,
                      name=name)
        if typ == stat.S_IFDIR:
            await self._op(K.MKDIR, dict(mode=e[_MODE] | stat.S_IFDIR, **common))
            return None
        if typ == stat.S_IFLNK:
            await self._op(K.SYMLINK, dict(target=bytes.fromhex(e[_EXTRA]), **common))
            return [e[_NAME], typ, 0, 1, e[_EXTRA], 0o777, e[_UID], e[_GID], e[_MTIME], 0,
                    None, None]
        if typ != stat.S_IFREG:
            await self._op(K.MKNOD, dict(mode=e[_MODE] | typ, rdev=e[_EXTRA], **common))
            return [e[_NAME], typ, 0, 1, e[_EXTRA], e[_MODE], e[_UID], e[_GID], e[_MTIME], 0,
                    None, {}]
        pino = e[_INO]
        if e[_NLINK] > 1 and pino in self._placed:
            source = self._placed_path(pino)
            if source is not None and self._on_peer(source, dfd, pino):
                # named when sequenced: the application may move that link meanwhile
                await self._op(K.LINK, dict(pmtime=pmtime, parent=parent, name=name,
                                            source=lambda: self._placed_path(pino) or b""))
                return None
            # The placed link moved where the peer may not have it yet: the peer gets a
            # new copy here; the links met later are made from it, and those already
            # met are made again.
            self._unplace(pino)
            for dpath in self._groups.pop(pino, {}).values():
                self._requeue_path(dpath)
        elif e[_NLINK] > 1:
            # A fast pass meets a link of a file whose other links it has not placed: on
            # the peer they may be the file's group, in directories the journal does not
            # name (a link moved there while apart; chaos seed 12, fault 115). A copy
            # here would split the group: compare everything.
            self._go_full(f"{name.decode(errors='replace')!r} is a link of a file with "
                          f"others not met yet")
        self._whole.add(pino)
        self.done.discard(pino)         # (handled before, as another entry): sent again
        self._handle += 1
        await self._op(K.CREATE, dict(handle=self._handle, flags=os.O_WRONLY,
                                      mode=e[_MODE], **common))
        await self._op(K.RELEASE, dict(handle=self._handle))
        if e[_NLINK] > 1:
            self._place(pino, dfd, name, None)
        return [e[_NAME], typ, 0, 1, 0, e[_MODE], e[_UID], e[_GID], e[_MTIME], 0, [], {}]

    def _requeue_parent(self, fd: int) -> None:
        """The peer lacks this item where its parent should have put it (a change raced
        the parent's turn): the parent goes again."""
        try:
            pfd = os.open(b"..", _O_PATH | os.O_DIRECTORY, dir_fd=fd) \
                if stat.S_ISDIR(os.fstat(fd).st_mode) else \
                sysops.open_beneath(self.tree.root_fd, self._rel(fd).rpartition(b"/")[0] or b".",
                                    os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return
        self._requeue(pfd)

    def _requeue_path(self, path: bytes, count: bool = False) -> None:
        try:
            fd = sysops.open_beneath(self.tree.root_fd, path, os.O_PATH | os.O_DIRECTORY)
        except OSError:
            return              # moved or removed: that change queued what it touched
        self._requeue(fd, count)

    def _requeue(self, fd: int, count: bool = True) -> None:
        """The item of fd (a descriptor this call owns) goes again (count: as one more
        attempt at it)."""
        ino = self._ino(fd)
        if ino in self._queued:
            os.close(fd)
            return
        try:
            if count:
                self._attempt(ino)
        except BaseException:
            os.close(fd)
            raise
        self.done.discard(ino)
        self._queued.add(ino)
        self.queue.append((fd, ino))

    # --- files and other leaves ---------------------------------------------------------
    async def _small(self, dfd: int, name: bytes, pino: int, theirs: dict) -> None:
        try:
            fd = os.open(name, _O_PATH, dir_fd=dfd)
        except OSError:
            return
        try:
            if self._ino(fd) == pino:
                await self._leaf(fd, theirs)
        finally:
            os.close(fd)

    async def _leaf(self, fd: int, theirs: dict | None = None, force: bool = False) -> None:
        """Make the peer's copy of this file (symlink, device...) equal to ours. theirs:
        the peer's description if known (from its directory), else it is probed. A file
        the journal names only for data: only the blocks of its journaled chunks are
        compared (force: all)."""
        ino = self._ino(fd)
        async with self.lock(ino), self._item(ino):
            self._check()
            try:
                self._rel(fd)
            except FileNotFoundError:
                return                      # removed: nothing to copy
            st = os.fstat(fd)
            what = probe.HASHES if stat.S_ISREG(st.st_mode) else 0
            only = None if force or theirs is not None else self._journaled_blocks(ino)
            if theirs is None or "hashes" not in theirs and what:
                # Both copies are hashed at the same time, here in a thread.
                got = {}

                async def peer():
                    try:
                        got["theirs"] = await self._probe(self._at(fd), what, only)
                    except (_Gone, ResyncFailed) as e:
                        got["error"] = e
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(peer)
                    ours = await trio.to_thread.run_sync(probe.describe_fd, fd, what,
                                                         self.block, only)
                if "error" in got:
                    raise got["error"]
                theirs = got["theirs"]
            else:
                ours = probe.describe_fd(fd, what, self.block)
            if not theirs["exists"] or theirs["type"] != ours["type"]:
                self._requeue_parent(fd)
                return
            if ours["type"] == stat.S_IFREG and ours["nlink"] == 1 and theirs["nlink"] > 1:
                # The peer's file here is a link of a group (a stale file the application
                # renamed here, say): writing ours into it would change its other links.
                # Its directory replaces it (as in _same_node).
                self._requeue_parent(fd)
                return
            if ours["type"] == stat.S_IFREG:
                await self._send_chunks(fd, ours, theirs)
            await self._fix_attrs(self._at(fd), ours, theirs)
            if ours["type"] == stat.S_IFREG:
                await self._rebind(ino, fd)
            self._copy[ino] = theirs.get("ino", 0)
            compared = ours.get("size", 0)
            if only is not None:
                compared = min(compared, sum(last - first + 1 for first, last in only)
                               * self.block)
            self._handled(ino, compared)
        self._forget_lock(ino)

    def _journaled_blocks(self, ino: int) -> list | None:
        """Fast resync of a file whose data only changed: its journaled chunks, as block
        ranges; None: compare all of it (full resync, or its attributes changed too)."""
        d = self.dirty
        if d is None or ino in d.nodes or ino not in d.chunks or ino in self._whole:
            return None
        per = max(journal.DEFAULT_CHUNK // self.block, 1)
        return [[c * per, c * per + per - 1] for c in sorted(d.chunks[ino])]

    async def _send_chunks(self, fd: int, ours: dict, theirs: dict) -> None:
        runs = _runs(ours["hashes"], theirs.get("hashes") or [], self.block)
        if not runs:
            return
        with sysops.reopened(fd) as rfd:
            for off, length in runs:
                if length > probe.SMALL // 4:
                    data = await trio.to_thread.run_sync(os.pread, rfd, length, off)
                else:
                    data = os.pread(rfd, length, off)
                await self._op(K.PUT, dict(offset=off, path=self._at(fd), data=data),
                               compress=True)
                await self._pace(len(data))
        theirs["mtime"] = None          # the writes moved it

    async def _fix_attrs(self, path, ours: dict, theirs: dict, force_mtime: bool = False) -> None:
        typ = ours["type"]
        mask = 0
        if typ == stat.S_IFREG and (ours["size"] != theirs.get("size")
                                    or theirs.get("mtime") is None):
            mask |= P.ATTR_SIZE
        if ours["uid"] != theirs.get("uid"):
            mask |= P.ATTR_UID
        if ours["gid"] != theirs.get("gid"):
            mask |= P.ATTR_GID
        if typ != stat.S_IFLNK and ours["mode"] != theirs.get("mode"):
            mask |= P.ATTR_MODE
        if mask or force_mtime or ours["mtime"] != theirs.get("mtime"):
            mask |= P.ATTR_MTIME
            await self._op(K.SETATTR, dict(handle=0, mask=mask, mode=ours["mode"] | typ,
                                           uid=ours["uid"], gid=ours["gid"], size=ours["size"],
                                           atime=0, mtime=ours["mtime"], path=path))
        if typ == stat.S_IFLNK:
            return
        mine, peer = ours.get("xattrs", {}), theirs.get("xattrs") or {}
        for name, value in sorted(mine.items()):
            if peer.get(name) != value:
                await self._op(K.SETXATTR, dict(path=path, name=name.encode(),
                                                value=bytes.fromhex(value)))
        for name in sorted(peer.keys() - mine.keys()):
            await self._op(K.REMOVEXATTR, dict(path=path, name=name.encode()))

    async def _rebind(self, ino: int, fd: int) -> None:
        """Files the application holds open for writing get their handle on the peer
        (again: the peer's file may have been replaced), so that their next writes are
        replicated."""
        for fh, f in list(self.fs.writable_files()):
            if f.ino == ino:
                await self._op(K.OPEN, dict(handle=fh, flags=os.O_RDWR, mtime=0,
                                            path=self._at(fd)))
                f.replicated = True

    async def _rebind_all(self) -> None:
        """Every file the application holds open for writing and that the walk did not
        bind again gets its handle on the peer, under its lock: after RESYNC_DONE its
        writes must be replicated (a handle opened while the peer was behind is not)."""
        for fh, f in list(self.fs.writable_files()):
            if f.replicated:
                continue
            try:
                fd = os.dup(self.tree.fd(f.ino))
            except (NoSuchInode, OSError):
                continue
            try:
                async with self.lock(f.ino), self._item(f.ino):
                    try:
                        self._rel(fd)
                    except FileNotFoundError:
                        continue            # unlinked while open: not part of the tree
                    await self._op(K.OPEN, dict(handle=fh, flags=os.O_RDWR, mtime=0,
                                                path=self._at(fd)))
                    f.replicated = True
            finally:
                os.close(fd)

    def _handled(self, ino: int, size: int) -> None:
        self.done.add(ino)
        pr = self.progress
        pr["items_done"] += 1
        pr["bytes_done"] += size
        elapsed = max(time.monotonic() - self._t0, 1e-3)
        pr["rate_bps"] = int(pr["bytes_done"] / elapsed)
        left = max(pr["bytes_total"] - pr["bytes_done"], 0)
        pr["eta_s"] = round(left / pr["rate_bps"], 1) if pr["rate_bps"] else None

    def _forget_lock(self, ino: int) -> None:
        lock = self._locks.get(ino)
        if lock is not None and not lock.locked() and not lock.statistics().tasks_waiting:
            del self._locks[ino]

    def status(self) -> dict:
        return dict(self.progress, queued=len(self.queue))
