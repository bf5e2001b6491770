"""Linux system calls that the os module does not expose the way we need them.

utimensat with UTIME_OMIT and AT_EMPTY_PATH, fchownat on O_PATH descriptors,
renameat2 with its flags, umount2. Each raises OSError like the os module does.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)

AT_FDCWD = -100
AT_SYMLINK_NOFOLLOW = 0x100
AT_EMPTY_PATH = 0x1000
UTIME_NOW = (1 << 30) - 1
UTIME_OMIT = (1 << 30) - 2
RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
RENAME_WHITEOUT = 4
MNT_DETACH = 2


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc.utimensat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.POINTER(_Timespec), ctypes.c_int]
_libc.fchownat.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint, ctypes.c_uint, ctypes.c_int]
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]


def _check(ret: int, what: str, path=None) -> None:
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}", path)


def _ts(ns: int | None) -> _Timespec:
    if ns is None:
        return _Timespec(0, UTIME_OMIT)
    sec, nsec = divmod(ns, 1_000_000_000)
    return _Timespec(sec, nsec)


def set_times(fd: int, atime_ns: int | None, mtime_ns: int | None, name: bytes = b"") -> None:
    """Set atime/mtime of fd (any descriptor, O_PATH included, symlinks not followed),
    or of name relative to directory fd. None leaves that time unchanged."""
    if atime_ns is None and mtime_ns is None:
        return
    times = (_Timespec * 2)(_ts(atime_ns), _ts(mtime_ns))
    flags = AT_SYMLINK_NOFOLLOW | (0 if name else AT_EMPTY_PATH)
    _check(_libc.utimensat(fd, name, times, flags), "utimensat", name or None)


def chown_fd(fd: int, uid: int, gid: int, name: bytes = b"") -> None:
    """fchownat(fd, name, uid, gid) without following symlinks; -1 keeps a value."""
    flags = AT_SYMLINK_NOFOLLOW | (0 if name else AT_EMPTY_PATH)
    _check(_libc.fchownat(fd, name, uid & 0xFFFFFFFF, gid & 0xFFFFFFFF, flags), "fchownat",
           name or None)


def rename(olddir: int, old: bytes, newdir: int, new: bytes, flags: int = 0) -> None:
    if flags == 0:
        os.rename(old, new, src_dir_fd=olddir, dst_dir_fd=newdir)
        return
    _check(_libc.renameat2(olddir, old, newdir, new, flags), "renameat2", old)


def umount(path: str, lazy: bool = False) -> None:
    _check(_libc.umount2(os.fsencode(path), MNT_DETACH if lazy else 0), "umount", path)


M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_large_buffers(size: int = 4 << 20, trim: int = 64 << 20) -> None:
    """Let malloc reuse freed blocks of up to `size` bytes (write payloads of 1 MiB)
    instead of mapping and unmapping them for every request, which costs a page fault
    per 4 KiB; keep up to `trim` bytes of free heap."""
    _libc.mallopt(M_MMAP_THRESHOLD, size)
    _libc.mallopt(M_TRIM_THRESHOLD, trim)


SYS_openat2 = 437                    # the same on x86_64 and the generic table (arm64)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_NO_SYMLINKS = 0x04
RESOLVE_BENEATH = 0x08


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_libc.syscall.restype = ctypes.c_long


def open_beneath(dirfd: int, path: bytes, flags: int) -> int:
    """openat2(dirfd, path) that never leaves the tree under dirfd and follows no
    symlink on the way (a symlink as the last component, with O_PATH|O_NOFOLLOW, is
    opened itself). An agent must never be led through a symlink into its own mount,
    or anywhere else outside its folder."""
    how = _OpenHow(flags | os.O_CLOEXEC, 0,
                   RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(SYS_openat2, ctypes.c_int(dirfd), ctypes.c_char_p(path),
                       ctypes.byref(how), ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)
    return fd


@contextlib.contextmanager
def reopened(fd: int, directory: bool = False):
    """A readable descriptor of whatever fd refers to (an O_PATH or a write-only one
    included), opened again through /proc and closed at the end of the block."""
    flags = os.O_RDONLY | os.O_CLOEXEC | (os.O_DIRECTORY if directory else 0)
    real = os.open(proc_path(fd), flags)
    try:
        yield real
    finally:
        os.close(real)


_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def punch_hole(fd: int, offset: int, length: int) -> bool:
    """Make [offset, offset + length) of an open file read as zeros and free its blocks;
    False when the file system cannot (the caller writes the zeros instead)."""
    if _libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EOPNOTSUPP, errno.ENOSYS):
        return False
    raise OSError(err, f"fallocate: {os.strerror(err)}")


def syncfs(fd: int) -> None:
    """Make everything written to the filesystem holding fd (O_PATH is fine) durable."""
    with reopened(fd) as real:
        _check(_libc.syncfs(ctypes.c_int(real)), "syncfs")


def proc_path(fd: int) -> str:
    """A path that reaches whatever fd refers to, even an O_PATH descriptor."""
    return f"/proc/self/fd/{fd}"
