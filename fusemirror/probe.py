"""What one node of a backing tree looks like, for resynchronisation.

Both nodes describe an item the same way (this module): the primary its own copy,
the replica its copy at the same point of the replication stream (a PROBE). The
primary compares the two descriptions and sends only what differs.

A description is a JSON object: exists, type (S_IFMT), mode (permission bits),
uid, gid, size, mtime (ns), ino, nlink, rdev, target (symlinks, hex), xattrs
(name -> value, hex; not for symlinks), and on request the entries of a directory
(see _entries) or the xxh3-64 of every chunk of a file (of `block` bytes each).
"""

from __future__ import annotations

import errno
import json
import os
import stat

import xxhash

from . import sysops

ENTRIES = 1
HASHES = 2


def xattrs_of(fd: int) -> dict:
    path = sysops.proc_path(fd)
    out = {}
    try:
        names = os.listxattr(path)
    except OSError:
        return out
    for name in sorted(names):
        try:
            out[name] = os.getxattr(path, name).hex()
        except OSError:
            pass
    return out


_READ = 1 << 20


def chunk_hashes(fd: int, block: int, only: list | None = None) -> list:
    """xxh3-64 of each block of the file behind fd (O_PATH is fine), read 1 MiB at a time.
    only: [first, last] block ranges; the other blocks' entries are None (not read)."""
    with sysops.reopened(fd) as rfd:
        if only is not None:
            return _some_hashes(rfd, block, only)
        out = []
        step = max(block, _READ - _READ % block)
        off = 0
        while True:
            data = os.pread(rfd, step, off)
            if not data:
                return out
            view = memoryview(data)
            out += [xxhash.xxh3_64_intdigest(view[i:i + block])
                    for i in range(0, len(view), block)]
            off += len(data)


SMALL = 1 << 20     # files up to this size have their hashes in their directory's entries


def _some_hashes(rfd: int, block: int, only: list) -> list:
    size = os.fstat(rfd).st_size
    count = -(-size // block)
    out: list = [None] * count
    for first, last in only:
        last = min(last, count - 1)
        if first > last:
            continue
        data = os.pread(rfd, (last - first + 1) * block, first * block)
        view = memoryview(data)
        for i in range(0, len(view), block):
            out[first + i // block] = xxhash.xxh3_64_intdigest(view[i:i + block])
    return out


def _entries(fd: int, what: int, block: int) -> list:
    """[name hex, type, ino, nlink, target hex or rdev, mode, uid, gid, mtime, size,
    block hashes (files of at most SMALL bytes, with HASHES) or None, xattrs or None]"""
    with sysops.reopened(fd, directory=True) as rfd:
        out = []
        for name in sorted(os.fsencode(n) for n in os.listdir(rfd)):
            try:
                nfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=rfd)
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(nfd)
                link = stat.S_ISLNK(st.st_mode)
                extra = os.readlink(b"", dir_fd=nfd).hex() if link else st.st_rdev
                hashes = (chunk_hashes(nfd, block) if what & HASHES and stat.S_ISREG(st.st_mode)
                          and st.st_size <= SMALL else None)
                out.append([name.hex(), stat.S_IFMT(st.st_mode), st.st_ino, st.st_nlink, extra,
                            stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, st.st_mtime_ns,
                            st.st_size, hashes, None if link else xattrs_of(nfd)])
            finally:
                os.close(nfd)
        return out


def describe_fd(fd: int, what: int = 0, block: int = 1 << 15, only: list | None = None) -> dict:
    """Describe the node behind fd (an O_PATH, O_NOFOLLOW descriptor); only: the block
    ranges to hash (None: all)."""
    st = os.fstat(fd)
    d = {"exists": True, "type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
         "uid": st.st_uid, "gid": st.st_gid, "size": st.st_size, "mtime": st.st_mtime_ns,
         "ino": st.st_ino, "nlink": st.st_nlink, "rdev": st.st_rdev}
    if stat.S_ISLNK(st.st_mode):
        d["target"] = os.readlink(b"", dir_fd=fd).hex()
    else:
        d["xattrs"] = xattrs_of(fd)
    if what & ENTRIES and stat.S_ISDIR(st.st_mode):
        d["entries"] = _entries(fd, what, block)
    if what & HASHES and stat.S_ISREG(st.st_mode):
        d["hashes"] = chunk_hashes(fd, block, only)
    return d


def describe(root_fd: int, path: bytes, what: int = 0, block: int = 1 << 15,
             only: list | None = None) -> dict:
    """Describe the node at path beneath root_fd; {"exists": False} when there is none."""
    try:
        fd = sysops.open_beneath(root_fd, path, os.O_PATH | os.O_NOFOLLOW)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return {"exists": False}    # a symlink or a file where a directory should be
        raise
    try:
        return describe_fd(fd, what, block, only)
    finally:
        os.close(fd)


def dumps(d: dict) -> bytes:
    return json.dumps(d, separators=(",", ":")).encode()


def loads(data: bytes) -> dict:
    return json.loads(data)
