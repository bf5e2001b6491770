"""The replica's side of replication: applies operations to its backing tree.

Operations name directories and files by their path relative to the root, except
operations on open files, which name the handle that an earlier OPEN or CREATE
bound to a descriptor here (so writes to an unlinked or renamed open file land in
the right inode). Each apply returns what the kernel's caches of the replica's own
mount must forget, as ("entry", parent_ino, name), ("attr", ino) or ("data", ino),
with backing inode numbers.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat

from . import protocol as P
from . import sysops
from .tree import STRIP_FLAGS, make_node

log = logging.getLogger(__name__)
K = P.Kind


def _join(parent: bytes, name: bytes) -> bytes:
    return name if parent in (b"", b".") else parent + b"/" + name


_PIECE = 64 * 1024
_ZEROS = bytes(_PIECE)


def _write_all(fd: int, view: memoryview, off: int) -> None:
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def _zeros(view: memoryview) -> bool:
    """Whether the bytes are all zero: their ends first (most data fails there at once),
    then all of them, copied (a byte-wise memoryview comparison is ten times slower)."""
    n = len(view)
    ends = min(n, 64)
    if view[:ends] != _ZEROS[:ends] or view[n - ends:] != _ZEROS[:ends]:
        return False
    return bytes(view) == (_ZEROS if n == len(_ZEROS) else bytes(n))


def _leave_a_hole(fd: int, off: int, length: int) -> bool:
    """Zeros sent by a resync: free the range here instead of writing them, and extend
    the file over what lies beyond its end. False when the file system cannot punch
    holes: write them."""
    size = os.fstat(fd).st_size
    if off < size and not sysops.punch_hole(fd, off, min(off + length, size) - off):
        return False
    if off + length > size:
        os.ftruncate(fd, off + length)
    return True


def apply_setattr(fd: int, fields: int, *, mode: int = 0, uid: int = -1, gid: int = -1,
                  size: int = 0, atime: int = 0, mtime: int = 0, writable: int | None = None,
                  is_symlink: bool = False) -> None:
    """Change attributes of the inode behind fd (O_PATH is fine), in a fixed order
    so that both nodes end up equal: size, owner, mode, times. writable is an open
    descriptor to truncate through, if the caller has one."""
    if fields & P.ATTR_SIZE:
        if writable is not None:
            os.ftruncate(writable, size)
        else:
            os.truncate(sysops.proc_path(fd), size)
    if fields & (P.ATTR_UID | P.ATTR_GID):
        sysops.chown_fd(fd, uid if fields & P.ATTR_UID else -1, gid if fields & P.ATTR_GID else -1)
    if fields & P.ATTR_MODE and not is_symlink:
        os.chmod(sysops.proc_path(fd), stat.S_IMODE(mode))
    sysops.set_times(fd, atime if fields & P.ATTR_ATIME else None,
                     mtime if fields & P.ATTR_MTIME else None)


class Applier:
    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        self.handles: dict[int, int] = {}
        # quarantine.Quarantine while this copy, with changes of its own, is resynchronised:
        # what would be overwritten or removed is kept there first.
        self.quarantine = None

    def close(self) -> None:
        for fd in self.handles.values():
            os.close(fd)
        self.handles.clear()

    # --- helpers ---------------------------------------------------------------
    # Paths come from the primary; they are resolved beneath the root, following no
    # symlink, so a copy that differs can never lead outside the folder.
    def _dir(self, path: bytes) -> int:
        return sysops.open_beneath(self.root_fd, path, os.O_PATH | os.O_DIRECTORY)

    def _node(self, path: bytes) -> int:
        return sysops.open_beneath(self.root_fd, path, os.O_PATH | os.O_NOFOLLOW)

    def _handle(self, h: int) -> int:
        try:
            return self.handles[h]
        except KeyError:
            raise OSError(9, f"no open handle {h}") from None

    def _in_dir(self, parent: bytes, pmtime: int, fn) -> list:
        dfd = self._dir(parent)
        try:
            inval = fn(dfd)
            sysops.set_times(dfd, None, pmtime)
            pino = os.fstat(dfd).st_ino
        finally:
            os.close(dfd)
        return inval + [("attr", pino)]

    # --- apply -----------------------------------------------------------------
    def apply(self, m: P.Message) -> list:
        """Apply one operation (raises OSError when it cannot)."""
        return getattr(self, "_" + m.kind.name.lower())(m)

    def _ping(self, m):
        return []

    def _open(self, m):
        if self.quarantine is not None and (m.flags & os.O_ACCMODE != os.O_RDONLY
                                            or m.flags & os.O_TRUNC):
            self.quarantine.copy(m.path)
        fd = sysops.open_beneath(self.root_fd, m.path, (m.flags & ~STRIP_FLAGS) | os.O_NOFOLLOW)
        self._bind(m.handle, fd)
        if m.flags & os.O_TRUNC:
            sysops.set_times(fd, None, m.mtime)
            return [("data", os.fstat(fd).st_ino)]
        return []

    def _bind(self, handle: int, fd: int) -> None:
        old = self.handles.pop(handle, None)
        if old is not None:
            os.close(old)
        self.handles[handle] = fd

    def _create(self, m):
        def create(dfd):
            fd = make_node(dfd, m.name, "file", mode=m.mode, flags=m.flags, uid=m.uid,
                           gid=m.gid)
            sysops.set_times(fd, None, m.mtime)
            self._bind(m.handle, fd)
            return [("entry", os.fstat(dfd).st_ino, m.name)]
        return self._in_dir(m.parent, m.pmtime, create)

    def _write(self, m):
        fd = self._handle(m.handle)
        _write_all(fd, memoryview(m.data), m.offset)
        sysops.set_times(fd, None, m.mtime)
        return [("data", os.fstat(fd).st_ino)]

    def _release(self, m):
        fd = self.handles.pop(m.handle, None)
        if fd is not None:
            os.close(fd)
        return []

    def _fsync(self, m):
        fd = self._handle(m.handle)
        (os.fdatasync if m.datasync else os.fsync)(fd)
        return []

    def _fsyncdir(self, m):
        fd = sysops.open_beneath(self.root_fd, m.path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            (os.fdatasync if m.datasync else os.fsync)(fd)
        finally:
            os.close(fd)
        return []

    def _setattr(self, m):
        if self.quarantine is not None and not m.handle and m.mask & P.ATTR_SIZE:
            self.quarantine.copy(m.path)
        fd = self._handle(m.handle) if m.handle else self._node(m.path)
        try:
            st = os.fstat(fd)
            writable = fd if m.handle else None
            apply_setattr(fd, m.mask, mode=m.mode, uid=m.uid, gid=m.gid, size=m.size,
                          atime=m.atime, mtime=m.mtime, writable=writable,
                          is_symlink=stat.S_ISLNK(st.st_mode))
        finally:
            if not m.handle:
                os.close(fd)
        return [("data" if m.mask & P.ATTR_SIZE else "attr", st.st_ino)]

    def _mknod(self, m):
        return self._new(m, "node", mode=m.mode, rdev=m.rdev)

    def _mkdir(self, m):
        return self._new(m, "dir", mode=m.mode)

    def _symlink(self, m):
        return self._new(m, "symlink", target=m.target)

    def _new(self, m, kind, **kw):
        def new(dfd):
            make_node(dfd, m.name, kind, uid=m.uid, gid=m.gid, **kw)
            sysops.set_times(dfd, None, m.mtime, m.name)
            return [("entry", os.fstat(dfd).st_ino, m.name)]
        return self._in_dir(m.parent, m.pmtime, new)

    def _link(self, m):
        def link(dfd):
            src = self._node(m.source)
            try:
                os.link(sysops.proc_path(src), m.name, dst_dir_fd=dfd, follow_symlinks=True)
            finally:
                os.close(src)
            st = os.stat(m.name, dir_fd=dfd, follow_symlinks=False)
            return [("entry", os.fstat(dfd).st_ino, m.name), ("attr", st.st_ino)]
        return self._in_dir(m.parent, m.pmtime, link)

    def _unlink(self, m):
        def unlink(dfd):
            st = os.stat(m.name, dir_fd=dfd, follow_symlinks=False)
            if self.quarantine is None or stat.S_ISDIR(st.st_mode):
                os.unlink(m.name, dir_fd=dfd)
            else:
                self.quarantine.move(dfd, m.name, _join(m.parent, m.name))
            return [("entry", os.fstat(dfd).st_ino, m.name), ("attr", st.st_ino)]
        return self._in_dir(m.parent, m.pmtime, unlink)

    def _rmdir(self, m):
        def rmdir(dfd):
            os.rmdir(m.name, dir_fd=dfd)
            return [("entry", os.fstat(dfd).st_ino, m.name)]
        return self._in_dir(m.parent, m.pmtime, rmdir)

    def _rename(self, m):
        src = self._dir(m.parent_old)
        try:
            dst = self._dir(m.parent_new)
            try:
                replaced = None
                try:
                    replaced = os.stat(m.name_new, dir_fd=dst, follow_symlinks=False).st_ino
                except FileNotFoundError:
                    pass
                if (replaced is not None and self.quarantine is not None
                        and not m.flags & sysops.RENAME_EXCHANGE
                        and replaced != os.stat(m.name_old, dir_fd=src,
                                                follow_symlinks=False).st_ino):
                    self.quarantine.move(dst, m.name_new, _join(m.parent_new, m.name_new))
                sysops.rename(src, m.name_old, dst, m.name_new, m.flags)
                sysops.set_times(src, None, m.pmtime_old)
                sysops.set_times(dst, None, m.pmtime_new)
                sino, dino = os.fstat(src).st_ino, os.fstat(dst).st_ino
            finally:
                os.close(dst)
        finally:
            os.close(src)
        inval = [("entry", sino, m.name_old), ("entry", dino, m.name_new),
                 ("attr", sino), ("attr", dino)]
        if replaced is not None:
            inval.append(("attr", replaced))
        return inval

    def _put(self, m):
        if self.quarantine is not None:
            self.quarantine.copy(m.path)
        fd = sysops.open_beneath(self.root_fd, m.path, os.O_WRONLY | os.O_NOFOLLOW)
        try:
            # What reads as zeros (a hole of the primary's sparse file) becomes a hole here,
            # by pieces: the copy of a virtual disk image must not take its full size.
            view, off, start = memoryview(m.data), m.offset, 0
            for at in range(0, len(view), _PIECE):
                piece = view[at:at + _PIECE]
                if _zeros(piece):
                    _write_all(fd, view[start:at], off + start)
                    start = at + len(piece) if _leave_a_hole(fd, off + at, len(piece)) else at
            _write_all(fd, view[start:], off + start)
            return [("data", os.fstat(fd).st_ino)]
        finally:
            os.close(fd)

    def _remove(self, m):
        parent, _, name = m.path.rpartition(b"/")
        dfd = self._dir(parent or b".")
        try:
            st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
            if self.quarantine is not None:
                self.quarantine.move(dfd, name, m.path)
            elif stat.S_ISDIR(st.st_mode):
                shutil.rmtree(name, dir_fd=dfd)
            else:
                os.unlink(name, dir_fd=dfd)
            return [("entry", os.fstat(dfd).st_ino, name), ("attr", st.st_ino)]
        finally:
            os.close(dfd)

    def _setxattr(self, m):
        return self._on_node(m.path, lambda p: os.setxattr(p, m.name, m.value))

    def _removexattr(self, m):
        return self._on_node(m.path, lambda p: os.removexattr(p, m.name))

    def _on_node(self, path: bytes, fn) -> list:
        fd = self._node(path)
        try:
            fn(sysops.proc_path(fd))
            return [("attr", os.fstat(fd).st_ino)]
        finally:
            os.close(fd)
