"""Manifests of a backing tree, and their comparison (for `fusemirror verify`).

A manifest has one JSON line per node: its path (hex, names are bytes), type,
mode, owner, size, mtime, content hash (xxh3-128, files) or target (symlinks),
xattrs, and for files with several links the group of paths sharing the inode.
Built from the backing directory descriptor, never through the mount.
"""

from __future__ import annotations

import json
import os
import stat

import xxhash

from . import sysops

_CHUNK = 1 << 20


def _hash(dirfd: int, name: bytes) -> str:
    fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    try:
        h = xxhash.xxh3_128()
        while True:
            data = os.read(fd, _CHUNK)
            if not data:
                return h.hexdigest()
            h.update(data)
    finally:
        os.close(fd)


def _xattrs(path: bytes, follow: bool = False) -> dict:
    try:
        names = os.listxattr(path, follow_symlinks=follow)
    except OSError:
        return {}
    out = {}
    for n in sorted(names):
        try:
            out[n] = os.getxattr(path, n, follow_symlinks=follow).hex()
        except OSError:
            pass
    return out


def _entry(rel: bytes, st: os.stat_result, dirfd: int, name: bytes) -> dict:
    e = {"path": rel.hex(), "type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode),
         "uid": st.st_uid, "gid": st.st_gid, "mtime": st.st_mtime_ns}
    xpath = sysops.proc_path(dirfd).encode() + b"/" + name
    if stat.S_ISREG(st.st_mode):
        e["size"] = st.st_size
        e["hash"] = _hash(dirfd, name)
    elif stat.S_ISLNK(st.st_mode):
        e["target"] = os.readlink(name, dir_fd=dirfd).hex()
    elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        e["rdev"] = st.st_rdev
    if not stat.S_ISLNK(st.st_mode):
        e["xattrs"] = _xattrs(xpath)
    return e


def build(root_fd: int) -> list[dict]:
    """Walk the tree under root_fd; one dict per node, the root first."""
    out = []
    links: dict[int, list[bytes]] = {}
    st = os.fstat(root_fd)
    root = _entry(b".", st, root_fd, b".")
    out.append(root)
    with sysops.reopened(root_fd, directory=True) as dfd:
        for top, dirs, files, topfd in os.fwalk(b".", dir_fd=dfd, follow_symlinks=False):
            for name in sorted(dirs) + sorted(files):
                try:
                    st = os.stat(name, dir_fd=topfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                rel = name if top == b"." else top[2:] + b"/" + name
                out.append(_entry(rel, st, topfd, name))
                if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
                    links.setdefault(st.st_ino, []).append(rel)
    by_path = {e["path"]: e for e in out}
    for paths in links.values():
        group = sorted(p.hex() for p in paths)
        for p in paths:
            by_path[p.hex()]["links"] = group
    return out


def dumps(entries: list[dict]) -> bytes:
    return b"".join(json.dumps(e, sort_keys=True).encode() + b"\n" for e in entries)


def loads(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines() if line]


def show(hexpath: str) -> str:
    return os.fsdecode(bytes.fromhex(hexpath))


_FIELDS = ("type", "mode", "uid", "gid", "size", "hash", "target", "rdev", "mtime", "xattrs",
           "links")


def diff(local: list[dict], peer: list[dict], local_name="primary", peer_name="replica") -> list[str]:
    """One line per difference; empty when the trees are identical."""
    a = {e["path"]: e for e in local}
    b = {e["path"]: e for e in peer}
    out = []
    for path in sorted(a.keys() | b.keys(), key=lambda p: bytes.fromhex(p)):
        ea, eb = a.get(path), b.get(path)
        if eb is None:
            out.append(f"only on {local_name}: {show(path)}")
        elif ea is None:
            out.append(f"only on {peer_name}: {show(path)}")
        else:
            for f in _FIELDS:
                if ea.get(f) != eb.get(f):
                    out.append(f"{show(path)}: {f} differs ({local_name} {_fmt(f, ea.get(f))}, "
                               f"{peer_name} {_fmt(f, eb.get(f))})")
    return out


def _fmt(field, value):
    if field == "mode" and value is not None:
        return oct(value)
    if field == "links" and value:
        return "[" + ", ".join(show(p) for p in value) + "]"
    return value
