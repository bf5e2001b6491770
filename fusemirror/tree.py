"""The backing tree: the real files under the mount, reached through descriptors.

The mount agent opens the application folder before mounting over it and keeps
that descriptor as the root. Every inode the kernel knows about is held as an
O_PATH descriptor (so renames and hard links need no path bookkeeping) until the
kernel forgets it. The FUSE inode number is the backing st_ino, except the root,
which is pyfuse3.ROOT_INODE. Holding the descriptor keeps the backing inode
alive, so its number cannot be reused while the kernel still knows it.

Everything here raises OSError (or NoSuchInode); fs.py maps them to errno.
"""

from __future__ import annotations

import logging
import os
import stat

import pyfuse3

from . import sysops

log = logging.getLogger(__name__)

ROOT = pyfuse3.ROOT_INODE
_DELETED = b" (deleted)"
# Flags the backing descriptors never get: the kernel already resolved the offset
# (O_APPEND), and it turns O_SYNC/O_DSYNC into explicit fsync requests.
STRIP_FLAGS = (os.O_APPEND | os.O_DIRECT | os.O_SYNC | os.O_DSYNC | os.O_NOCTTY | os.O_CREAT | os.O_EXCL
               | os.O_NOFOLLOW)  # the kernel resolved the name; /proc/self/fd links need following
O_PATH_FLAGS = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC


class NoSuchInode(Exception):
    """The kernel asked about an inode we do not hold (already forgotten)."""


class NoName(FileNotFoundError):
    """The inode has no name left in the tree (an unlinked file still open)."""

    def __init__(self, ino: int):
        super().__init__(2, f"inode {ino} has no name left")


class _Node:
    __slots__ = ("fd", "nlookup", "aliases", "is_dir")

    def __init__(self, fd: int, is_dir: bool):
        self.fd = fd
        self.nlookup = 0
        self.is_dir = is_dir
        self.aliases: set[tuple[int, bytes]] = set()


class Tree:
    """The inode table over one backing directory."""

    def __init__(self, root_fd: int):
        self.root_fd = root_fd
        st = os.fstat(root_fd)
        self.root_st_ino = st.st_ino
        self.root_dev = st.st_dev
        self.root_path = os.fsencode(os.readlink(sysops.proc_path(root_fd)))
        root = _Node(root_fd, True)
        root.nlookup = 1
        self._nodes: dict[int, _Node] = {ROOT: root}

    # --- inode numbers -----------------------------------------------------
    def ino_of(self, st: os.stat_result) -> int:
        return ROOT if st.st_ino == self.root_st_ino else st.st_ino

    def known(self, ino: int) -> bool:
        return ino in self._nodes

    def fd(self, ino: int) -> int:
        try:
            return self._nodes[ino].fd
        except KeyError:
            raise NoSuchInode(ino) from None

    def __len__(self) -> int:
        return len(self._nodes)

    # --- lookup counts -----------------------------------------------------
    def lookup(self, parent: int, name: bytes) -> tuple[int, os.stat_result]:
        """Resolve name in parent, take one lookup reference, return (ino, stat)."""
        fd = os.open(name, O_PATH_FLAGS, dir_fd=self.fd(parent))
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.adopt(fd, st, parent, name), st

    def adopt(self, fd: int, st: os.stat_result, parent: int, name: bytes) -> int:
        """Take one lookup reference on the inode behind fd (an O_PATH descriptor
        that this call now owns)."""
        ino = self.ino_of(st)
        node = self._nodes.get(ino)
        if node is None:
            node = self._nodes[ino] = _Node(fd, stat.S_ISDIR(st.st_mode))
        else:
            os.close(fd)
        node.nlookup += 1
        if not node.is_dir:
            node.aliases.add((parent, name))
        return ino

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.nlookup -= n
        if node.nlookup <= 0:
            del self._nodes[ino]
            os.close(node.fd)

    def close(self) -> None:
        for ino, node in list(self._nodes.items()):
            if ino != ROOT:
                os.close(node.fd)
        self._nodes = {ROOT: self._nodes[ROOT]}

    # --- names -------------------------------------------------------------
    def moved(self, ino: int, old: tuple[int, bytes], new: tuple[int, bytes] | None) -> None:
        """Keep a file's known names right after unlink (new None) or rename."""
        node = self._nodes.get(ino)
        if node is None or node.is_dir:
            return
        node.aliases.discard(old)
        if new is not None:
            node.aliases.add(new)

    def path(self, ino: int) -> bytes:
        """The path of ino relative to the root (b"." for the root itself), as the
        replica resolves it. Directories have exactly one; for a file, one of its
        names that still exists. Raises NoName when it has none (an unlinked open
        file) and OSError(ENAMETOOLONG) beyond PATH_MAX."""
        if ino == ROOT:
            return b"."
        node = self._nodes.get(ino)
        if node is None:
            raise NoSuchInode(ino)
        full = os.readlink(sysops.proc_path(node.fd).encode())
        if node.is_dir:
            # The kernel appends " (deleted)" to removed directories: a directory may
            # also really be called that, and then it still has links.
            if full.endswith(_DELETED) and os.fstat(node.fd).st_nlink == 0:
                raise NoName(ino)
            rel = self._relative(full)
            if rel is None:
                raise NoName(ino)
            return rel
        candidates = [full, full[: -len(_DELETED)]] if full.endswith(_DELETED) else [full]
        for cand in candidates:
            rel = self._relative(cand)
            if rel is not None and self._is(rel, ino):
                return rel
        for parent, name in list(node.aliases):
            try:
                cand = self.path(parent) + b"/" + name if parent != ROOT else name
            except (OSError, NoSuchInode, NoName):
                continue
            if self._is(cand, ino):
                return cand
        raise NoName(ino)

    def _relative(self, full: bytes) -> bytes | None:
        prefix = self.root_path.rstrip(b"/") + b"/"
        if not full.startswith(prefix):
            return None
        return full[len(prefix):]

    def _is(self, rel: bytes, ino: int) -> bool:
        """Does rel (resolved beneath the root, following no symlink) name ino? A
        stale path may cross a symlink that now points into this very mount."""
        try:
            fd = sysops.open_beneath(self.root_fd, rel, os.O_PATH | os.O_NOFOLLOW)
        except OSError:
            return False
        try:
            return self.ino_of(os.fstat(fd)) == ino
        finally:
            os.close(fd)

    # --- attributes --------------------------------------------------------
    def stat(self, ino: int) -> os.stat_result:
        return os.fstat(self.fd(ino))

    def open_file(self, ino: int, flags: int) -> int:
        """A real (not O_PATH) descriptor on a file, opened with flags."""
        return os.open(sysops.proc_path(self.fd(ino)), (flags & ~STRIP_FLAGS) | os.O_CLOEXEC)


def make_node(dirfd: int, name: bytes, kind: str, *, mode: int = 0, rdev: int = 0,
              target: bytes = b"", flags: int = 0, uid: int = -1, gid: int = -1) -> int | None:
    """Create one node in dirfd, owned by uid/gid, with exactly mode (the process
    umask is 0). Returns an open descriptor for kind "file", else None.

    Shared by the primary (local apply) and the replica, so both build the same thing."""
    fd = None
    if kind == "file":
        fd = os.open(name, (flags & ~STRIP_FLAGS) | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     mode & 0o7777, dir_fd=dirfd)
    elif kind == "dir":
        os.mkdir(name, mode & 0o7777, dir_fd=dirfd)
    elif kind == "node":
        os.mknod(name, mode, rdev, dir_fd=dirfd)
    elif kind == "symlink":
        os.symlink(target, name, dir_fd=dirfd)
    else:
        raise ValueError(kind)
    try:
        if uid != -1 or gid != -1:
            sysops.chown_fd(dirfd, uid, gid, name)
        if kind != "symlink" and mode & 0o7000:
            # chown clears setuid/setgid; put back exactly what was asked for.
            os.chmod(name, mode & 0o7777, dir_fd=dirfd)
    except OSError:
        if fd is not None:
            os.close(fd)
        raise
    return fd


def owner_for(parent_st: os.stat_result, uid: int, gid: int, mode: int) -> tuple[int, int, int]:
    """BSD/SysV group semantics: in a setgid directory new nodes take the directory's
    group, and new directories inherit the setgid bit."""
    if parent_st.st_mode & stat.S_ISGID:
        gid = parent_st.st_gid
        if stat.S_ISDIR(mode):
            mode |= stat.S_ISGID
    return uid, gid, mode
