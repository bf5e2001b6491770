"""The change journal of a mount whose peer is out of date (docs/reintegration.md).

While a mount changes without its peer it must remember *what* changed, so that the
returning peer receives only that: file data by (inode, chunk) and the nodes (a
directory's entries, a file's or directory's attributes) by inode. The record of a change
must be durable before the change is acknowledged: a kill -9 or a power cut of the primary
must not lose the record of a change the application saw succeed. Like DRBD's activity
log, most changes touch something already recorded and cost nothing; a change that marks
something new waits for one fdatasync of the journal, shared by every change marking
something new at the same time.

File format: a 32-byte header record, then 32-byte records, each ending in the CRC-32 of
its first 28 bytes::

    header  "FMJ1"  u32 chunk_size  u64 created (ns)  12 reserved  u32 crc
    record  "FR"  u8 kind  u8 0  u64 ino  u64 first  u64 last  u32 crc
            kind 1: data chunks first..last (inclusive) of file ino
            kind 2: node ino (entries or attributes)
            kind 3: everything (a full resynchronisation is needed); ino, first, last 0

A record that cannot be written (disk full) fails every change waiting for it, is taken back
and cut off the file, and the next record written is preceded by "everything" (a change
already applied when its peer was given up may be among those that failed).

Reading stops at the first record that is short or whose CRC is wrong (a torn tail after a
crash: what follows was never acknowledged). A bad record followed by good ones (damage,
not a torn tail), a damaged header or another chunk size make the journal say
"everything": the next reintegration is then a full one.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import struct
import time
import zlib
from dataclasses import dataclass, field

import trio

log = logging.getLogger(__name__)

DEFAULT_CHUNK = 1 << 20
RECORD = 32
_HEADER = struct.Struct("<4sIQ12x")          # 28 bytes, then the CRC
_ENTRY = struct.Struct("<2sBxQQQ")           # 28 bytes, then the CRC
_CRC = struct.Struct("<I")
DATA, NODE, EVERYTHING = 1, 2, 3
_ALL = (EVERYTHING,)


def _sealed(body: bytes) -> bytes:
    return body + _CRC.pack(zlib.crc32(body))


def _check(raw: bytes) -> bytes | None:
    """The 28-byte body of a 32-byte record, or None if it is damaged."""
    if len(raw) != RECORD:
        return None
    body, (crc,) = raw[:28], _CRC.unpack(raw[28:])
    return body if zlib.crc32(body) == crc else None


@dataclass
class Dirty:
    """What changed: chunks per file inode, nodes, or everything."""

    everything: bool = False
    chunks: dict[int, set[int]] = field(default_factory=dict)
    nodes: set[int] = field(default_factory=set)

    def has_chunk(self, ino: int, chunk: int) -> bool:
        return self.everything or chunk in self.chunks.get(ino, ())

    def __bool__(self) -> bool:
        return self.everything or bool(self.chunks) or bool(self.nodes)

    def copy(self) -> Dirty:
        return Dirty(self.everything, {ino: set(c) for ino, c in self.chunks.items()},
                     set(self.nodes))

    def add(self, other: Dirty) -> None:
        """What `other` says changed, too."""
        self.everything = self.everything or other.everything
        for ino, chunks in other.chunks.items():
            self.chunks.setdefault(ino, set()).update(chunks)
        self.nodes.update(other.nodes)


def read(path: str, chunk_size: int = DEFAULT_CHUNK) -> Dirty:
    """What a journal file records (a missing file records nothing)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return Dirty()
    dirty = Dirty()
    header = _check(data[:RECORD])
    if header is None:
        log.warning("journal %s: damaged header: everything must be resynchronised", path)
        return Dirty(everything=True)
    magic, size, _ = _HEADER.unpack(header)
    if magic != b"FMJ1" or size != chunk_size:
        log.warning("journal %s: %s: everything must be resynchronised", path,
                    "not a journal" if magic != b"FMJ1" else f"chunks of {size} bytes")
        return Dirty(everything=True)
    for at in range(RECORD, len(data), RECORD):
        body = _check(data[at:at + RECORD])
        if body is None:
            if any(_check(data[later:later + RECORD]) is not None
                   for later in range(at + RECORD, len(data), RECORD)):
                # Good records after a bad one: not a torn tail, the file is damaged.
                log.warning("journal %s: damaged record at %d before good ones: everything "
                            "must be resynchronised", path, at)
                return Dirty(everything=True)
            if at + RECORD <= len(data):
                log.warning("journal %s: damaged record at %d: the rest is ignored (a torn "
                            "write after a crash)", path, at)
            break
        magic, kind, ino, first, last = _ENTRY.unpack(body)
        if magic != b"FR" or kind not in (DATA, NODE, EVERYTHING) or first > last:
            log.warning("journal %s: bad record at %d: everything must be resynchronised",
                        path, at)
            return Dirty(everything=True)
        _apply(dirty, kind, ino, first, last)
    return dirty


def _apply(dirty: Dirty, kind: int, ino: int, first: int, last: int) -> None:
    if kind == DATA:
        dirty.chunks.setdefault(ino, set()).update(range(first, last + 1))
    elif kind == NODE:
        dirty.nodes.add(ino)
    else:
        dirty.everything = True


class Journal:
    """The journal file of one mount. `mark_*` return once the mark is durable, also when
    another change made the same mark a moment before, or raise the OSError that stopped
    it being written (a full or failing disk): the change must then not be made. After
    such a failure the mark is taken back, and the next record written is preceded by
    "everything": a change applied anyway (its peer given up meanwhile) has no record."""

    def __init__(self, path: str, chunk_size: int = DEFAULT_CHUNK):
        if chunk_size <= 0 or chunk_size & (chunk_size - 1):
            raise ValueError("the chunk size must be a power of two")
        self.path, self.chunk_size = path, chunk_size
        self.dirty = read(path, chunk_size)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        if os.fstat(self._fd).st_size < RECORD or not _valid_header(path, chunk_size):
            self._rewrite(self.dirty)
        else:
            _cut_torn_tail(self._fd, path)
        self._queue: list[bytes] = []
        self._queued_keys: list[tuple] = []
        self._flushing = False
        self._flushed = trio.Event()      # set when a flush ends; replaced when one starts
        self._next_batch, self._done_batch = 1, 0
        # What is marked in self.dirty but not durable yet: key -> the batch writing it.
        # A change finding its mark there waits for that batch, and fails with it.
        self._unsynced: dict[tuple, int] = {}
        self._failed: dict[int, OSError] = {}    # batch -> why, until its callers saw it
        self._waiters: dict[int, int] = {}        # batch -> callers waiting for it
        self._owe_everything = False              # a flush failed: the next one says all
        self.syncs = 0                    # fdatasyncs done (for tests and /metrics)

    @property
    def owes_everything(self) -> bool:
        """A flush failed: its marks were taken back, so a resync must compare everything
        (the next flush records it)."""
        return self._owe_everything

    # -- marking ------------------------------------------------------------------------------

    async def mark_data(self, ino: int, offset: int, length: int) -> None:
        """File ino changed in [offset, offset + length) (a truncate: from the new size on)."""
        first = offset // self.chunk_size
        last = max(first, (offset + max(length, 1) - 1) // self.chunk_size)
        while True:
            if self.dirty.everything:
                keys = [_ALL]
            else:
                known = self.dirty.chunks.setdefault(ino, set())
                new = [c for c in range(first, last + 1) if c not in known]
                if new:
                    known.update(new)
                    # Chunks of this range marked before are in this batch or an earlier one.
                    await self._durable([_ENTRY.pack(b"FR", DATA, ino, first, last)],
                                        [(DATA, ino, c) for c in new])
                    return
                keys = [(DATA, ino, c) for c in range(first, last + 1)]
            if not await self._wait_for(keys):
                return

    async def mark_node(self, ino: int) -> None:
        """The entries of directory ino, or the attributes of node ino, changed."""
        await self.mark_nodes((ino,))

    async def mark_nodes(self, inos) -> None:
        """mark_node for many inodes, with one flush."""
        inos = set(inos)
        while True:
            if self.dirty.everything:
                keys = [_ALL]
            else:
                new = sorted(inos - self.dirty.nodes)
                if new:
                    self.dirty.nodes.update(new)
                    await self._durable([_ENTRY.pack(b"FR", NODE, ino, 0, 0) for ino in new],
                                        [(NODE, ino) for ino in new])
                    return
                keys = [(NODE, ino) for ino in inos]
            if not await self._wait_for(keys):
                return

    async def mark_everything(self) -> None:
        while self.dirty.everything:
            if not await self._wait_for([_ALL]):
                return
        self.dirty.everything = True
        await self._durable([_ENTRY.pack(b"FR", EVERYTHING, 0, 0, 0)], [_ALL])

    async def _wait_for(self, keys: list[tuple]) -> bool:
        """Marks already made by other changes: False if they are durable; else wait until
        the flush writing them ends and return True, for the caller to look again (a flush
        that failed took its marks back)."""
        batch = max((self._unsynced.get(k, 0) for k in keys), default=0)
        if batch <= self._done_batch:
            return False
        while self._done_batch < batch:
            await self._flush_or_wait()
        return True

    async def _durable(self, bodies: list[bytes], keys: list[tuple]) -> None:
        """Queue records and return once a flush that includes them has ended. The records
        queued while a flush runs go together in the next one (one fdatasync). If that
        flush fails, its marks are taken back and its OSError raised."""
        if self._owe_everything and not self.dirty.everything:
            # An earlier flush failed, maybe under a change applied all the same (the
            # peer given up during it): the journal cannot say what that one touched.
            self._owe_everything = False
            self.dirty.everything = True
            bodies, keys = [_ENTRY.pack(b"FR", EVERYTHING, 0, 0, 0), *bodies], [_ALL, *keys]
        mine = self._next_batch              # the batch that will take the queue as it is
        self._queue += [_sealed(b) for b in bodies]
        self._queued_keys += keys
        for key in keys:
            self._unsynced[key] = mine
        self._waiters[mine] = self._waiters.get(mine, 0) + 1
        try:
            while self._done_batch < mine:
                await self._flush_or_wait()
            error = self._failed.get(mine)
        finally:
            self._waiters[mine] -= 1
            if not self._waiters[mine]:          # the last caller of its batch forgets it
                del self._waiters[mine]
                self._failed.pop(mine, None)
        if error is not None:
            raise OSError(error.errno, f"cannot write the change journal: {error.strerror}")

    async def _flush_or_wait(self) -> None:
        if self._flushing:
            await self._flushed.wait()
        else:
            await self._flush()

    async def _flush(self) -> None:
        self._flushing = True
        flushed = self._flushed = trio.Event()
        try:
            while self._queue:
                batch, self._queue = b"".join(self._queue), []
                keys, self._queued_keys = self._queued_keys, []
                number, self._next_batch = self._next_batch, self._next_batch + 1
                try:
                    await trio.to_thread.run_sync(self._write, batch)
                except Exception as e:          # each caller of the batch gets it
                    if not isinstance(e, OSError):
                        log.exception("journal %s: unexpected error", self.path)
                        e = OSError(errno.EIO, f"{type(e).__name__}: {e}")
                    log.error("journal %s: cannot record changes: %s", self.path, e.strerror)
                    if number in self._waiters:
                        self._failed[number] = e
                    self._unmark(keys, number)
                    self._owe_everything = True
                else:
                    self.syncs += 1
                self._done_batch = number
                for key in keys:
                    if self._unsynced.get(key) == number:
                        del self._unsynced[key]
        finally:
            self._flushing = False
            flushed.set()

    def _unmark(self, keys: list[tuple], batch: int) -> None:
        """Take back the marks of a batch that could not be written."""
        for key in keys:
            if self._unsynced.get(key) != batch:
                continue
            if key == _ALL:
                self.dirty.everything = False
            elif key[0] == DATA:
                self.dirty.chunks.get(key[1], set()).discard(key[2])
                if not self.dirty.chunks.get(key[1], True):
                    del self.dirty.chunks[key[1]]
            else:
                self.dirty.nodes.discard(key[1])

    def _write(self, data: bytes) -> None:
        """Append and fdatasync; on failure, cut what was appended (a partial record
        followed by later good ones would read as damage: a full resync)."""
        size = os.fstat(self._fd).st_size
        try:
            view = memoryview(data)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, size)
            raise

    # -- after a resynchronisation ---------------------------------------------------------------

    def clear(self) -> None:
        """Forget everything (the peer confirmed it has it all): durably empty."""
        self.dirty = Dirty()
        self._rewrite(self.dirty)

    def _rewrite(self, dirty: Dirty) -> None:
        records = [_sealed(_HEADER.pack(b"FMJ1", self.chunk_size, time.time_ns()))]
        if dirty.everything:
            records.append(_sealed(_ENTRY.pack(b"FR", EVERYTHING, 0, 0, 0)))
        else:
            for ino, chunks in sorted(dirty.chunks.items()):
                records += [_sealed(_ENTRY.pack(b"FR", DATA, ino, c, c)) for c in sorted(chunks)]
            records += [_sealed(_ENTRY.pack(b"FR", NODE, ino, 0, 0))
                        for ino in sorted(dirty.nodes)]
        tmp = self.path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(b"".join(records))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dfd = os.open(os.path.dirname(self.path) or ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _valid_header(path: str, chunk_size: int) -> bool:
    with open(path, "rb") as f:
        header = _check(f.read(RECORD))
    if header is None:
        return False
    magic, size, _ = _HEADER.unpack(header)
    return magic == b"FMJ1" and size == chunk_size


def _cut_torn_tail(fd: int, path: str) -> None:
    """Drop a partial or damaged last part so that new records follow good ones."""
    with open(path, "rb") as f:
        data = f.read()
    good = RECORD
    while good + RECORD <= len(data) and _check(data[good:good + RECORD]) is not None:
        good += RECORD
    if good != len(data):
        os.ftruncate(fd, good)
        os.fsync(fd)
