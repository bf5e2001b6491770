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

Reading stops at the first record that is short or whose CRC is wrong (a torn tail after a
crash: what follows was never acknowledged). A bad record followed by good ones (damage,
not a torn tail), a damaged header or another chunk size make the journal say
"everything": the next reintegration is then a full one.
"""

from __future__ import annotations

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
    """The journal file of one mount. `mark_*` return once the mark is durable."""

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
        self._flushing = False
        self._flushed = trio.Event()      # set when a flush ends; replaced when one starts
        self._next_batch, self._done_batch = 1, 0
        self.syncs = 0                    # fdatasyncs done (for tests and /metrics)

    # -- marking ------------------------------------------------------------------------------

    async def mark_data(self, ino: int, offset: int, length: int) -> None:
        """File ino changed in [offset, offset + length) (a truncate: from the new size on)."""
        if self.dirty.everything:
            return
        first = offset // self.chunk_size
        last = max(first, (offset + max(length, 1) - 1) // self.chunk_size)
        known = self.dirty.chunks.get(ino, ())
        if all(c in known for c in range(first, last + 1)):
            return
        self.dirty.chunks.setdefault(ino, set()).update(range(first, last + 1))
        await self._durable(_ENTRY.pack(b"FR", DATA, ino, first, last))

    async def mark_node(self, ino: int) -> None:
        """The entries of directory ino, or the attributes of node ino, changed."""
        if not (self.dirty.everything or ino in self.dirty.nodes):
            await self.mark_nodes((ino,))

    async def mark_nodes(self, inos) -> None:
        """mark_node for many inodes, with one flush."""
        if self.dirty.everything:
            return
        new = sorted(set(inos) - self.dirty.nodes)
        if not new:
            return
        self.dirty.nodes.update(new)
        for ino in new[:-1]:
            self._queue.append(_sealed(_ENTRY.pack(b"FR", NODE, ino, 0, 0)))
        await self._durable(_ENTRY.pack(b"FR", NODE, new[-1], 0, 0))

    async def mark_everything(self) -> None:
        if self.dirty.everything:
            return
        self.dirty.everything = True
        await self._durable(_ENTRY.pack(b"FR", EVERYTHING, 0, 0, 0))

    async def _durable(self, body: bytes) -> None:
        """Queue a record and return once a flush that includes it has ended. The records
        queued while a flush runs go together in the next one (one fdatasync)."""
        self._queue.append(_sealed(body))
        mine = self._next_batch              # the batch that will take the queue as it is
        while self._done_batch < mine:
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
                number, self._next_batch = self._next_batch, self._next_batch + 1
                await trio.to_thread.run_sync(self._write, batch)
                self.syncs += 1
                self._done_batch = number
        finally:
            self._flushing = False
            flushed.set()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fdatasync(self._fd)

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
