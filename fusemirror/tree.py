"""The backing tree: the real files under the mount, reached through descriptors.

The mount agent opens the application folder before mounting over it and keeps
that descriptor as the root. Every inode the kernel knows about is reached through
an O_PATH descriptor (so renames and hard links need no path bookkeeping) until the
kernel forgets it. The FUSE inode number is the backing st_ino, except the root,
which is pyfuse3.ROOT_INODE.

The kernel may know far more inodes than a process may hold descriptors (a `find`
over 50,000 files), so at most max_fds of them stay open, least recently used
retired first. A retired inode keeps its file handle (name_to_handle_at(2)) and is
reopened with open_by_handle_at(2) (root only: CAP_DAC_READ_SEARCH) when next used;
if the file is gone meanwhile that fails with ESTALE. The handles of inodes the
kernel forgot are remembered too (at most REMEMBERED of them): when the kernel drops
its caches, the next listing of the tree need not take them again. A retired
descriptor is not closed at once if a request took it (fd() notes which request in
progress took what; op_begin and op_end bracket each one): the request may use it
after an await, and its number must not name another file by then. It waits in a
graveyard until those requests have ended. So the graveyard holds only descriptors
that requests in progress hold, a few each; a request waiting for the peer or the
disk holds none, or just its parent directory's, and a `find` meanwhile retires and
closes thousands. Inodes without a usable handle (a filesystem without export
support, another mount under the folder) keep their descriptor as long as the kernel
knows them.

An open descriptor keeps its backing inode alive; a retired one does not, so the
number of a deleted file may come back for a new one. So a retired inode looked up
again keeps the new descriptor and forgets its handle, taken anew when it is next
retired.

Everything here raises OSError (or NoSuchInode); fs.py maps them to errno.
"""

from __future__ import annotations

import collections
import contextvars
import ctypes
import ctypes.util
import errno
import logging
import os
import resource
import stat
import struct

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
# O_PATH descriptors kept open at most; the environment variable FUSEMIRROR_MAX_FDS
# overrides it (the tests use a small cap to retire descriptors early).
MAX_FDS = 8192
# Handles of forgotten inodes remembered at most (about 100 bytes each).
REMEMBERED = 100_000


def default_max_fds() -> int:
    """MAX_FDS or FUSEMIRROR_MAX_FDS, but at most half of what this process may open:
    the rest is for open files, sockets and retired descriptors not closed yet."""
    want = int(os.environ.get("FUSEMIRROR_MAX_FDS", MAX_FDS))
    return max(1, min(want, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 2))


# --- file handles (struct file_handle: u32 handle_bytes, i32 handle_type, bytes) ----
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.name_to_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p,
                                    ctypes.POINTER(ctypes.c_int), ctypes.c_int]
_libc.open_by_handle_at.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
MAX_HANDLE_SZ = 128


def _error(what: str) -> OSError:
    err = ctypes.get_errno()
    return OSError(err, f"{what}: {os.strerror(err)}")


def file_handle(fd: int, name: bytes = b"") -> tuple[bytes, int]:
    """The file handle of what fd refers to (any descriptor, O_PATH included), or of
    name in the directory fd (not following a symlink), as the bytes of a struct
    file_handle, and the id of the mount it was reached through."""
    buf = ctypes.create_string_buffer(8 + MAX_HANDLE_SZ)
    struct.pack_into("I", buf, 0, MAX_HANDLE_SZ)
    mount_id = ctypes.c_int()
    if _libc.name_to_handle_at(fd, name, buf, ctypes.byref(mount_id),
                               0 if name else sysops.AT_EMPTY_PATH):
        raise _error("name_to_handle_at")
    return buf.raw[:8 + struct.unpack_from("I", buf)[0]], mount_id.value


def open_by_handle(mount_fd: int, handle: bytes, flags: int) -> int:
    """Open a file handle of the filesystem mount_fd (not O_PATH) is on; ESTALE when
    that file no longer exists."""
    fd = _libc.open_by_handle_at(mount_fd, handle, flags)
    if fd < 0:
        raise _error("open_by_handle_at")
    return fd


class NoSuchInode(Exception):
    """The kernel asked about an inode we do not hold (already forgotten)."""


class NoName(FileNotFoundError):
    """The inode has no name left in the tree (an unlinked file still open)."""

    def __init__(self, ino: int):
        super().__init__(2, f"inode {ino} has no name left")


class _Node:
    __slots__ = ("fd", "handle", "pinned", "nlookup", "aliases", "is_dir")

    def __init__(self, fd: int | None, is_dir: bool):
        self.fd: int | None = fd               # None: retired, reopened by handle when used
        self.handle: bytes | None = None       # taken when the descriptor is retired
        self.pinned = False                    # no usable handle: never retired
        self.nlookup = 0
        self.is_dir = is_dir
        self.aliases: set[tuple[int, bytes]] = set()


class _Request:
    """One request in progress, and the descriptors it took from the tree."""

    __slots__ = ("tree", "fds", "reset")

    def __init__(self, tree: Tree):
        self.tree, self.fds, self.reset = tree, set(), None


_request: contextvars.ContextVar[_Request | None] = contextvars.ContextVar(
    "fusemirror_tree_request", default=None)


class Tree:
    """The inode table over one backing directory."""

    def __init__(self, root_fd: int, max_fds: int | None = None):
        self.root_fd = root_fd
        st = os.fstat(root_fd)
        self.root_st_ino = st.st_ino
        self.root_dev = st.st_dev
        self.root_path = os.fsencode(os.readlink(sysops.proc_path(root_fd)))
        root = _Node(root_fd, True)
        root.nlookup = 1
        root.pinned = True
        self._nodes: dict[int, _Node] = {ROOT: root}
        self.max_fds = default_max_fds() if max_fds is None else max_fds
        # Inodes with a descriptor that may be retired, least recently used first.
        self._lru: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Descriptors taken by requests in progress: fd -> how many requests took it.
        self._held: dict[int, int] = {}
        # Retired descriptors that requests in progress still hold.
        self._graveyard: set[int] = set()
        self._pin_logged = False
        # Handles of inodes the kernel forgot, oldest first (see listed).
        self._remembered: dict[int, bytes] = {}
        # open_by_handle_at wants a real descriptor on the filesystem, not an O_PATH one.
        self._mount_fd: int | None = os.open(sysops.proc_path(root_fd),
                                             os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self._mount_id = self._usable_mount_id()

    def _usable_mount_id(self) -> int | None:
        """The mount that handles must come from, or None when they cannot be used at
        all (no export support, or no CAP_DAC_READ_SEARCH): then nothing is retired."""
        try:
            handle, mount_id = file_handle(self.root_fd)
            os.close(open_by_handle(self._mount_fd, handle, O_PATH_FLAGS))
        except OSError as e:
            self._log_pinned(e.strerror)
            return None
        return mount_id

    # --- inode numbers -----------------------------------------------------
    def ino_of(self, st: os.stat_result) -> int:
        return ROOT if st.st_ino == self.root_st_ino else st.st_ino

    def known(self, ino: int) -> bool:
        return ino in self._nodes

    def fd(self, ino: int) -> int:
        """An O_PATH descriptor on ino. It stays open until the request in progress
        ends (op_end); outside a request, until the next call into the tree."""
        node = self._nodes.get(ino)
        if node is None:
            raise NoSuchInode(ino)
        if node.fd is None:
            self._open(ino, node, open_by_handle(self._mount_fd, node.handle, O_PATH_FLAGS))
        elif not node.pinned:
            self._lru.move_to_end(ino)
        fd = node.fd
        req = _request.get()
        if req is not None and req.tree is self and fd not in req.fds:
            req.fds.add(fd)
            self._held[fd] = self._held.get(fd, 0) + 1
        return fd

    def __len__(self) -> int:
        return len(self._nodes)

    # --- the bounded descriptor table --------------------------------------
    def op_begin(self) -> _Request:
        """A request starts in this task; pass what it returns to op_end."""
        req = _Request(self)
        req.reset = _request.set(req)
        return req

    def op_end(self, req: _Request) -> None:
        _request.reset(req.reset)
        for fd in req.fds:
            n = self._held.pop(fd) - 1
            if n:
                self._held[fd] = n
            elif fd in self._graveyard:
                self._graveyard.remove(fd)
                os.close(fd)

    def _open(self, ino: int, node: _Node, fd: int) -> None:
        node.fd = fd
        if not node.pinned:
            self._lru[ino] = None
            self._trim()

    def _trim(self) -> None:
        """Retire the least recently used descriptors beyond max_fds."""
        while len(self._lru) > self.max_fds:
            ino, _ = self._lru.popitem(last=False)
            node = self._nodes[ino]
            if node.handle is None:
                node.handle = self._handle(node.fd)
                if node.handle is None:
                    node.pinned = True
                    continue
            self._bury(node.fd)
            node.fd = None

    def _handle(self, fd: int, name: bytes = b"") -> bytes | None:
        """The handle that reopens what fd (or name in the directory fd) refers to, or
        None if there is none. A name gone meanwhile raises FileNotFoundError: that is no
        reason to keep descriptors (it took the one warning there is about them)."""
        if self._mount_id is None:
            return None
        try:
            handle, mount_id = file_handle(fd, name)
        except OSError as e:
            if name and e.errno == errno.ENOENT:
                raise
            self._log_pinned(e.strerror)
            return None
        if mount_id != self._mount_id:
            self._log_pinned("another filesystem is mounted inside the folder")
            return None
        return handle

    def _log_pinned(self, why: str) -> None:
        if not self._pin_logged:
            self._pin_logged = True
            log.warning("%s: some inodes cannot be reopened by file handle (%s); they keep a "
                        "descriptor open as long as the kernel knows them",
                        os.fsdecode(self.root_path), why)

    def _bury(self, fd: int) -> None:
        """Close fd now, or when the last request that took it ends."""
        if fd in self._held:
            self._graveyard.add(fd)
        else:
            os.close(fd)

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

    def listed(self, parent: int, name: bytes, st) -> tuple[int, os.stat_result]:
        """lookup() for an entry that a directory listing reports, with st taken by name
        (not following a symlink; only its st_ino, st_mode and st_dev if it has one are
        read, so the attributes given to the kernel for it do too): no descriptor is
        opened. An inode without one is held by its file handle until a request uses it.
        Listing a large tree opened a descriptor per entry, and retired another beyond
        max_fds. A retired inode keeps its handle (taking it again cost a third of a
        warm listing): if its number now names a new file, the old handle is stale, and
        the kernel, answered ESTALE, looks the name up again, which takes a descriptor
        on the new file (_revive). So does an inode the kernel forgot, whose handle is
        remembered: taking them all again was a third of listing a tree after the kernel
        dropped its caches. Only for an st that has the folder's st_dev: another
        filesystem inside the folder (a btrfs snapshot) may have a file of the same
        number."""
        ino = self.ino_of(st)
        node = self._nodes.get(ino)
        if node is not None:
            if node.fd is not None and not node.pinned:
                self._lru.move_to_end(ino)
        else:
            dfd = self.fd(parent)
            handle = None
            if getattr(st, "st_dev", None) == self.root_dev:     # not another filesystem's
                handle = self._remembered.pop(ino, None)
            handle = handle or self._handle(dfd, name)
            if handle is None:          # a mount inside the folder, or no handles at all
                return self.lookup(parent, name)
            node = self._nodes[ino] = _Node(None, stat.S_ISDIR(st.st_mode))
            node.handle = handle
        self._referenced(node, parent, name)
        return ino, st

    def adopt(self, fd: int, st: os.stat_result, parent: int, name: bytes) -> int:
        """Take one lookup reference on the inode behind fd (an O_PATH descriptor
        that this call now owns)."""
        ino = self.ino_of(st)
        node = self._nodes.get(ino)
        if node is None:
            self._remembered.pop(ino, None)
            node = self._nodes[ino] = _Node(fd, stat.S_ISDIR(st.st_mode))
            self._open(ino, node, fd)
        elif node.fd is None:
            self._revive(ino, node, fd, st)
        else:
            os.close(fd)
            if not node.pinned:
                self._lru.move_to_end(ino)
        self._referenced(node, parent, name)
        return ino

    @staticmethod
    def _referenced(node: _Node, parent: int, name: bytes) -> None:
        """The kernel took one more lookup reference, under (parent, name)."""
        node.nlookup += 1
        if not node.is_dir:
            node.aliases.add((parent, name))

    def _revive(self, ino: int, node: _Node, fd: int, st: os.stat_result) -> None:
        """A retired inode is looked up again: keep this descriptor. Its number may
        name a new file by now (the old one deleted): so the handle is taken again
        at the next retirement, and the old file's aliases no longer pass _is."""
        node.handle, node.is_dir = None, stat.S_ISDIR(st.st_mode)
        self._open(ino, node, fd)

    def forget(self, ino: int, n: int) -> None:
        node = self._nodes.get(ino)
        if node is None or ino == ROOT:
            return
        node.nlookup -= n
        if node.nlookup <= 0:
            del self._nodes[ino]
            self._lru.pop(ino, None)
            if node.fd is not None:
                self._bury(node.fd)
            if node.handle is not None:
                self._remember(ino, node.handle)

    def _remember(self, ino: int, handle: bytes) -> None:
        self._remembered.pop(ino, None)         # to the end, and no other one dropped for it
        if len(self._remembered) >= REMEMBERED:
            del self._remembered[next(iter(self._remembered))]
        self._remembered[ino] = handle

    def close(self) -> None:
        """Close every descriptor but the root's (the caller's); no request runs."""
        for ino, node in self._nodes.items():
            if ino != ROOT and node.fd is not None:
                os.close(node.fd)
        for fd in self._graveyard:
            os.close(fd)
        self._graveyard.clear()
        self._lru.clear()
        self._remembered.clear()
        self._nodes = {ROOT: self._nodes[ROOT]}
        if self._mount_fd is not None:
            os.close(self._mount_fd)
            self._mount_fd = self._mount_id = None

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
        file, or one gone since its descriptor was retired) and OSError(ENAMETOOLONG)
        beyond PATH_MAX."""
        if ino == ROOT:
            return b"."
        node = self._nodes.get(ino)
        if node is None:
            raise NoSuchInode(ino)
        try:
            fd = self.fd(ino)
        except OSError as e:
            if e.errno == errno.ESTALE:
                raise NoName(ino) from None
            raise
        # A file reopened by handle after its dentry left the cache reads as "/" (not
        # under the root): then one of its aliases names it.
        full = os.readlink(sysops.proc_path(fd).encode())
        if node.is_dir:
            # The kernel appends " (deleted)" to removed directories: a directory may
            # also really be called that, and then it still has links.
            if full.endswith(_DELETED) and os.fstat(fd).st_nlink == 0:
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
