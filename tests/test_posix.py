"""A POSIX battery run on the primary of a real pair.

Every test changes the tree through the primary's mount the way an application
would, checks what POSIX promises, checks that the replica's mount shows the change
at once (its kernel caches must not serve stale data), and ends with
`pair.assert_identical()`: both backing trees compared byte for byte and attribute
for attribute, and `fusemirror verify`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
import subprocess
import sys
import time
import traceback

import pytest

from conftest import abort_fuse, as_user

USER, GROUP = 1000, 1000           # an ordinary user (no supplementary groups in as_user)
OTHER_GROUP = 4242                 # a group USER is not in

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]
AT_FDCWD = -100
RENAME_NOREPLACE, RENAME_EXCHANGE = 1, 2


def renameat2(old, new, flags: int) -> None:
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def put(path, data: bytes, flags=os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode=0o644) -> None:
    fd = os.open(path, flags, mode)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def get(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def fails(errnum: int, fn, *args, **kw) -> None:
    """fn(*args) must fail with exactly errnum."""
    try:
        fn(*args, **kw)
    except OSError as e:
        assert e.errno == errnum, f"{fn.__name__}{args}: {e} (wanted {errno.errorcode[errnum]})"
    else:
        raise AssertionError(f"{fn.__name__}{args} succeeded; wanted {errno.errorcode[errnum]}")


def _view(path: bytes):
    """What an application sees of one node (no inode numbers, no atime/ctime)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    v = {"type": stat.S_IFMT(st.st_mode), "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid,
         "gid": st.st_gid, "mtime": st.st_mtime_ns}
    if stat.S_ISREG(st.st_mode):
        v.update(size=st.st_size, nlink=st.st_nlink, data=get(path) if st.st_size < 1 << 22
                 else None)
    elif stat.S_ISLNK(st.st_mode):
        v.update(target=os.readlink(path), nlink=st.st_nlink)
    elif stat.S_ISDIR(st.st_mode):
        v.update(names=sorted(os.listdir(path)), nlink=st.st_nlink)
    else:
        v.update(rdev=st.st_rdev, nlink=st.st_nlink)
    if not stat.S_ISLNK(st.st_mode) and not stat.S_ISFIFO(st.st_mode):
        v["xattrs"] = {n: os.getxattr(path, n) for n in sorted(os.listxattr(path))}
    return v


def backing(node, rel="") -> bytes:
    """A path reaching rel in node's backing tree (under the mount)."""
    base = f"/proc/self/fd/{node.backing_fd}".encode()
    rel = os.fsencode(rel)
    return base + b"/" + (rel or b".")


def fresh(pair, *rels) -> None:
    """The replica's mount shows, right now, exactly what the primary's backing tree holds."""
    for rel in rels:
        want = _view(backing(pair.primary, rel))
        rel = os.fsencode(rel)
        seen = _view(os.fsencode(pair.replica.dir) + (b"/" + rel if rel else b""))
        assert seen == want, f"replica mount shows a stale {rel!r}:\n  {seen}\n  wanted {want}"


def children(*fns) -> list[int]:
    """Run each fn in its own forked process at once; their exit codes (0: returned)."""
    pids = []
    for fn in fns:
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                fn()
            except BaseException:
                traceback.print_exc()
                code = 1
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        pids.append(pid)
    return [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in pids]


def in_child(node, fn, timeout: float = 10.0) -> int:
    """fn() in a forked child: its errno (0: returned). A child still blocked in the
    mount after timeout means the agent is stuck: the FUSE connection is aborted (the
    only way to free a process waiting on a request the agent has read) and the test
    fails."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            fn()
        except OSError as e:
            code = e.errno or 255
        except BaseException:
            code = 255
        os._exit(code)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    abort_fuse(node.dir)
    os.waitpid(pid, 0)
    pytest.fail(f"the {node.name} agent hung for {timeout:g}s; its FUSE connection was aborted")


@pytest.fixture
def umask022():
    old = os.umask(0o022)
    yield
    os.umask(old)


# --- data -----------------------------------------------------------------------------------
def test_write_overwrite_and_pwrite(pair):
    p = pair.primary
    put(p.path("f"), b"0123456789" * 1000)
    with open(pair.replica.path("f"), "rb", buffering=0) as early:      # opened on the replica before
        assert early.read(5) == b"01234"
        fd = os.open(p.path("f"), os.O_RDWR)
        try:
            assert os.pwrite(fd, b"XYZ", 5) == 3
            assert os.pwrite(fd, b"tail", 10_000) == 4       # extends exactly at EOF
            os.lseek(fd, 2, os.SEEK_SET)
            os.write(fd, b"ab")
            big = os.urandom(300_000)                        # several FUSE requests
            assert os.pwrite(fd, big, 50_000) == len(big)
        finally:
            os.close(fd)
        early.seek(0)
        expect = b"01ab4XYZ89" + b"0123456789" * 999 + b"tail" + b"\0" * 39_996 + big
        assert early.read() == expect
    assert get(p.path("f")) == expect
    fresh(pair, "f")
    pair.assert_identical()


def test_truncate_shrink_grow_and_ftruncate(pair):
    p = pair.primary
    put(p.path("f"), b"a" * 10_000)
    with open(pair.replica.path("f"), "rb", buffering=0) as early:
        early.read()
        os.truncate(p.path("f"), 100)
        fresh(pair, "f")
        early.seek(0)
        assert early.read() == b"a" * 100
        os.truncate(p.path("f"), 70_000)
        fresh(pair, "f")
        with open(p.path("f"), "r+b") as f:
            f.truncate(5)
            f.seek(0, 2)
            f.write(b"end")
            f.flush()
            os.ftruncate(f.fileno(), 20)
        early.seek(0)
        assert early.read() == b"aaaaaend" + b"\0" * 12
    os.truncate(p.path("f"), 0)
    fresh(pair, "f")
    pair.assert_identical()


def test_sparse_files_and_offsets_beyond_4gib(pair):
    p, r = pair.primary, pair.replica
    far = [(0, b"start"), (1 << 20, b"one MiB"), ((4 << 30) - 2, b"across 4 GiB"),
           ((5 << 30) + 12345, b"beyond 5 GiB")]
    fd = os.open(p.path("sparse"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        for off, data in far:
            assert os.pwrite(fd, data, off) == len(data)
    finally:
        os.close(fd)
    size = (5 << 30) + 12345 + len(b"beyond 5 GiB")
    for node in (p, r):
        st = os.stat(backing(node, "sparse"))
        assert st.st_size == size, node.name
        assert st.st_blocks * 512 < 1 << 24, f"{node.name}: the holes were filled in"
    assert os.stat(r.path("sparse")).st_size == size
    with open(r.path("sparse"), "rb") as f:                     # through the replica's mount
        for off, data in far:
            f.seek(off)
            assert f.read(len(data)) == data
        f.seek(3 << 30)
        assert f.read(4096) == b"\0" * 4096
    _same_sparse(backing(p, "sparse"), backing(r, "sparse"))
    # hashing two 5 GiB files would take most of the time budget: compared sparse-aware
    # above, then shrunk (itself a replicated change) before the full comparison
    os.truncate(p.path("sparse"), (1 << 20) + 3)
    fresh(pair, "sparse")
    pair.assert_identical()


def _same_sparse(a: bytes, b: bytes) -> None:
    """Both files hold the same bytes: compare every data extent of either (holes are 0)."""
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        size = os.fstat(fa).st_size
        assert size == os.fstat(fb).st_size
        for fd in (fa, fb):
            off = 0
            while off < size:
                try:
                    start = os.lseek(fd, off, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break
                    raise
                end = os.lseek(fd, start, os.SEEK_HOLE)
                assert end - start < 1 << 24
                assert os.pread(fa, end - start, start) == os.pread(fb, end - start, start), \
                    f"contents differ in [{start}, {end})"
                off = end
    finally:
        os.close(fa)
        os.close(fb)


def test_o_append_from_two_descriptors(pair):
    p = pair.primary
    a = os.open(p.path("log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    b = os.open(p.path("log"), os.O_RDWR | os.O_APPEND)
    lines = []
    try:
        for i in range(40):
            line = b"line %d from %s\n" % (i, b"ab"[i % 2:i % 2 + 1])
            lines.append(line)
            os.lseek(a if i % 2 == 0 else b, 0, os.SEEK_SET)   # O_APPEND ignores the offset
            os.write(a if i % 2 == 0 else b, line)
    finally:
        os.close(a)
        os.close(b)
    assert get(p.path("log")) == b"".join(lines)
    fresh(pair, "log")
    pair.assert_identical()


def test_o_trunc_open(pair):
    p = pair.primary
    put(p.path("f"), b"x" * 5000)
    put(p.path("g"), b"y" * 5000)
    with open(pair.replica.path("f"), "rb", buffering=0) as early:
        early.read()
        os.close(os.open(p.path("f"), os.O_WRONLY | os.O_TRUNC))
        early.seek(0)
        assert early.read() == b""
        fresh(pair, "f")
    fd = os.open(p.path("g"), os.O_RDWR | os.O_TRUNC)
    try:
        assert os.read(fd, 10) == b""
        os.write(fd, b"new")
    finally:
        os.close(fd)
    put(p.path("f"), b"again")                                 # O_CREAT|O_TRUNC on an existing file
    assert get(p.path("f")) == b"again" and get(p.path("g")) == b"new"
    fresh(pair, "f", "g")
    pair.assert_identical()


def test_fsync_fdatasync_and_sync_flags(pair, umask022):
    p = pair.primary
    os.mkdir(p.path("d"))
    fd = os.open(p.path("d/f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"durable")
        os.fsync(fd)
        os.pwrite(fd, b"DATA", 2)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    for flag in (os.O_SYNC, os.O_DSYNC):
        fd = os.open(p.path("d/s"), os.O_WRONLY | os.O_CREAT | flag, 0o600)
        try:
            os.write(fd, b"sync %d\n" % flag)
        finally:
            os.close(fd)
    dfd = os.open(p.path("d"), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    fd = os.open(p.path("d/f"), os.O_RDONLY)                     # fsync of a read-only fd
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    assert get(p.path("d/f")) == b"duDATAe"
    fresh(pair, "d", "d/f", "d/s")
    pair.assert_identical()


def test_mmap_writes_reach_the_replica(pair):
    p = pair.primary
    page = mmap.PAGESIZE
    put(p.path("m"), b"\0" * (3 * page + 100))
    fd = os.open(p.path("m"), os.O_RDWR)
    try:
        with mmap.mmap(fd, 3 * page + 100) as m:
            m[10:15] = b"hello"
            m[2 * page + 7:2 * page + 12] = b"world"
            m[3 * page + 95:3 * page + 100] = b"last!"
            m.flush()                                           # msync(MS_SYNC)
            with open(pair.replica.path("m"), "rb") as f:
                data = f.read()
            assert data[10:15] == b"hello" and data[2 * page + 7:2 * page + 12] == b"world"
            assert data[-5:] == b"last!" and len(data) == 3 * page + 100
            m[0:4] = b"more"
            m.flush()
        os.ftruncate(fd, 5 * page)                              # grow, then map the new part
        with mmap.mmap(fd, 5 * page) as m:
            m[4 * page:4 * page + 6] = b"grown!"
            m.flush()
    finally:
        os.close(fd)
    data = get(pair.replica.path("m"))
    assert data[:4] == b"more" and data[4 * page:4 * page + 6] == b"grown!"
    fresh(pair, "m")
    pair.assert_identical()


def test_concurrent_writers_disjoint_regions_and_own_files(pair):
    p = pair.primary
    writers, chunk, chunks = 4, 16 * 1024, 24
    put(p.path("shared"), b"")

    def writer(i):
        def run():
            fd = os.open(p.path("shared"), os.O_WRONLY)
            own = os.open(p.path(f"own{i}"), os.O_WRONLY | os.O_CREAT, 0o644)
            try:
                for c in range(chunks):
                    block = bytes([65 + i]) * (chunk - 8) + b"%08d" % c
                    off = (c * writers + i) * chunk                # interleaved, disjoint
                    assert os.pwrite(fd, block, off) == chunk
                    assert os.pwrite(own, block, c * chunk) == chunk
            finally:
                os.close(fd)
                os.close(own)
        return run
    assert children(*(writer(i) for i in range(writers))) == [0] * writers
    data = get(p.path("shared"))
    assert len(data) == writers * chunks * chunk
    for c in range(chunks):
        for i in range(writers):
            off = (c * writers + i) * chunk
            assert data[off:off + chunk] == bytes([65 + i]) * (chunk - 8) + b"%08d" % c
    fresh(pair, "shared", *(f"own{i}" for i in range(writers)))
    pair.assert_identical()


def test_copy_file_range_sendfile_fallocate_and_tmpfile(pair):
    """Other ways in for data. What FUSE (or pyfuse3) does not offer must be a clean
    EOPNOTSUPP, never a change on one copy only."""
    p = pair.primary
    src = os.urandom(300_000)
    put(p.path("src"), src)
    a = os.open(p.path("src"), os.O_RDONLY)
    b = os.open(p.path("copy"), os.O_WRONLY | os.O_CREAT, 0o644)
    c = os.open(p.path("sent"), os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        done = 0
        while done < len(src):
            done += os.copy_file_range(a, b, len(src) - done)
        done = 0
        while done < len(src):
            done += os.sendfile(c, a, done, len(src) - done)
    finally:
        for fd in (a, b, c):
            os.close(fd)
    assert get(pair.replica.path("copy")) == src == get(pair.replica.path("sent"))
    fd = os.open(p.path("pre"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, 100_000)          # glibc writes zeros if FUSE cannot
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
        if _libc.fallocate(fd, 0, 0, 200_000) != 0:
            assert ctypes.get_errno() == errno.EOPNOTSUPP
        os.pwrite(fd, b"end", 99_997)
    finally:
        os.close(fd)
    assert get(pair.replica.path("pre"))[-3:] == b"end"
    try:
        fd = os.open(p.dir, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as e:
        assert e.errno == errno.EOPNOTSUPP, e
    else:
        try:
            os.write(fd, b"anonymous until linked")
            os.link(f"/proc/self/fd/{fd}", p.path("tmpfile"), follow_symlinks=True)
        finally:
            os.close(fd)
        assert get(pair.replica.path("tmpfile")) == b"anonymous until linked"
    fresh(pair, "src", "copy", "sent", "pre", "")
    pair.assert_identical()


def test_writes_by_a_user_clear_setuid_on_both(pair):
    p = pair.primary
    os.mkdir(p.path("pub"))
    os.chmod(p.path("pub"), 0o777)
    for name in ("w", "t"):
        put(p.path("pub", name), b"x")
        os.chown(p.path("pub", name), USER, GROUP)
        os.chmod(p.path("pub", name), 0o6755)
    assert as_user(USER, GROUP, put, p.path("pub/w"), b"y", os.O_WRONLY | os.O_APPEND) == 0
    assert as_user(USER, GROUP, os.truncate, p.path("pub/t"), 0) == 0
    for node in (pair.primary, pair.replica):
        for name in ("w", "t"):
            assert stat.S_IMODE(os.stat(backing(node, "pub/" + name)).st_mode) == 0o755, \
                (node.name, name)
    fresh(pair, "pub/w", "pub/t")
    pair.assert_identical()


# --- attributes -----------------------------------------------------------------------------
def test_chmod_chown_and_special_bits(pair):
    p = pair.primary
    put(p.path("f"), b"data")
    os.mkdir(p.path("d"))
    os.symlink("f", p.path("link"))
    with open(pair.replica.path("f"), "rb"):
        for mode in (0o600, 0o4755, 0o2750, 0o1777, 0o7000, 0):
            os.chmod(p.path("f"), mode)
            assert stat.S_IMODE(os.stat(p.path("f")).st_mode) == mode
            fresh(pair, "f")
    os.chown(p.path("f"), USER, GROUP)
    os.chmod(p.path("f"), 0o6755)
    os.chown(p.path("f"), -1, OTHER_GROUP)                     # chown clears setuid/setgid
    st = os.stat(p.path("f"))
    assert (st.st_uid, st.st_gid) == (USER, OTHER_GROUP)
    assert stat.S_IMODE(st.st_mode) == 0o755
    os.chmod(p.path("d"), 0o3770)
    os.chown(p.path("d"), USER, -1)
    os.chown(p.path("link"), 123, 456, follow_symlinks=False)  # lchown: the link, not f
    assert os.lstat(p.path("link"))[4:6] == (123, 456)
    assert os.stat(p.path("f")).st_uid == USER
    os.chmod(p.path("."), 0o751)                               # the mount root itself
    fresh(pair, "f", "d", "link", "")
    pair.assert_identical()


def test_utime_explicit_and_now(pair):
    p = pair.primary
    put(p.path("f"), b"x")
    os.mkdir(p.path("d"))
    os.symlink("f", p.path("link"))
    with open(pair.replica.path("f"), "rb"):
        os.utime(p.path("f"), ns=(1_000_000_123, 2_000_000_456))
        assert os.stat(p.path("f")).st_mtime_ns == 2_000_000_456
        fresh(pair, "f")
        os.utime(p.path("f"), ns=(-1_500_000_000, 3_000_000_000_000_000_001))  # before 1970,
        fresh(pair, "f")                                                       # after 2038
        os.utime(p.path("f"))                                  # now
        assert os.stat(p.path("f")).st_mtime_ns > 3_000_000_000
        fresh(pair, "f")
    fd = os.open(p.path("f"), os.O_RDWR)
    try:
        os.utime(fd, ns=(5, 6))                                # futimens
        assert os.fstat(fd).st_mtime_ns == 6
        _libc.futimens.argtypes = [ctypes.c_int, ctypes.c_void_p]
        omit_atime_now_mtime = (ctypes.c_long * 4)(0, (1 << 30) - 2, 0, (1 << 30) - 1)
        assert _libc.futimens(fd, omit_atime_now_mtime) == 0   # UTIME_OMIT / UTIME_NOW
        assert os.fstat(fd).st_mtime_ns > 6
    finally:
        os.close(fd)
    os.utime(p.path("d"), ns=(7, 8))
    os.utime(p.path("link"), ns=(9, 10), follow_symlinks=False)  # the link itself
    assert os.lstat(p.path("link")).st_mtime_ns == 10
    assert os.stat(p.path("link")).st_mtime_ns != 10
    os.utime(p.path("."), ns=(11, 12))
    fresh(pair, "f", "d", "link", "")
    pair.assert_identical()


def test_xattrs(pair):
    p = pair.primary
    put(p.path("f"), b"")
    os.mkdir(p.path("d"))
    with open(pair.replica.path("f"), "rb"):
        os.setxattr(p.path("f"), "user.a", b"1")
        fresh(pair, "f")
        os.setxattr(p.path("f"), "user.a", b"22")                       # replace
        os.setxattr(p.path("f"), "user.bin", bytes(range(256)) * 8)      # 2 KiB, binary
        os.setxattr(p.path("f"), "user.empty", b"")
        fails(errno.EEXIST, os.setxattr, p.path("f"), "user.a", b"3", os.XATTR_CREATE)
        fails(errno.ENODATA, os.setxattr, p.path("f"), "user.nope", b"3", os.XATTR_REPLACE)
        os.setxattr(p.path("f"), "user.new", b"4", os.XATTR_CREATE)
        os.setxattr(p.path("f"), "user.new", b"5", os.XATTR_REPLACE)
        fresh(pair, "f")
        os.removexattr(p.path("f"), "user.a")
        fails(errno.ENODATA, os.removexattr, p.path("f"), "user.a")
        assert os.getxattr(pair.replica.path("f"), "user.new") == b"5"
        fails(errno.ENODATA, os.getxattr, pair.replica.path("f"), "user.a")
    os.setxattr(p.path("d"), "user.dir", b"on a directory")
    os.setxattr(p.path("."), "user.root", b"on the root")
    os.setxattr(p.path("f"), "trusted.t", b"trusted namespace")
    fd = os.open(p.path("f"), os.O_RDWR)
    try:
        os.setxattr(fd, "user.fd", b"through a descriptor")
        os.removexattr(fd, "user.empty")
    finally:
        os.close(fd)
    fresh(pair, "f", "d", "")
    pair.assert_identical()


def _getfacl(path) -> str:
    r = subprocess.run(["getfacl", "-n", "-p", "--omit-header", path], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _setfacl(*args) -> None:
    r = subprocess.run(["setfacl", *args], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_posix_acls_are_replicated(pair, umask022):
    """ACLs travel as system.posix_acl_* xattrs: set, changed, inherited, removed."""
    p, r = pair.primary, pair.replica
    put(p.path("f"), b"x", mode=0o640)
    os.mkdir(p.path("d"))
    _setfacl("-m", f"u:{USER}:rw,g:{OTHER_GROUP}:r", p.path("f"))
    assert f"user:{USER}:rw-" in _getfacl(p.path("f"))
    assert _getfacl(r.path("f")) == _getfacl(p.path("f"))
    _setfacl("-d", "-m", f"u:{USER}:rwx", p.path("d"))               # default ACL
    _setfacl("-m", f"u:{USER}:rx", p.path("d"))
    put(p.path("d/inherits"), b"y")
    os.mkdir(p.path("d/sub"))
    acl = _getfacl(p.path("d/inherits"))
    assert f"user:{USER}:" in acl, acl
    for rel in ("f", "d", "d/inherits", "d/sub"):
        assert _getfacl(r.path(rel)) == _getfacl(p.path(rel)), rel
    fresh(pair, "f", "d", "d/inherits", "d/sub")
    _setfacl("-x", f"g:{OTHER_GROUP}", p.path("f"))
    _setfacl("-b", p.path("d/inherits"))                              # remove all
    _setfacl("-k", p.path("d"))                                       # remove the default
    assert "user:" not in _getfacl(p.path("d/inherits")).replace("user::", "")
    for rel in ("f", "d", "d/inherits"):
        assert _getfacl(r.path(rel)) == _getfacl(p.path(rel)), rel
    fresh(pair, "f", "d", "d/inherits")
    pair.assert_identical()


def test_posix_acls_are_enforced_as_on_a_local_disk(pair, umask022):
    p = pair.primary
    put(p.path("f"), b"root's", mode=0o600)
    _setfacl("-m", f"u:{USER}:rw", p.path("f"))
    put(p.path("g"), b"root's", mode=0o666)
    _setfacl("-m", f"u:{USER}:---", p.path("g"))
    try:
        assert as_user(USER, GROUP, lambda: put(p.path("f"), b"user's", os.O_WRONLY)) == 0, \
            "an ACL entry granting rw to the user is not honoured"
        assert as_user(USER, GROUP, lambda: get(p.path("g"))) == errno.EACCES, \
            "an ACL entry denying the user is not honoured"
        assert get(pair.replica.path("f")) == b"user's"
    finally:
        pair.assert_identical()


@pytest.mark.xfail(strict=True, reason="known limit: pyfuse3 cannot ask for FUSE_DONT_MASK, "
                   "so the kernel applies the umask before a default ACL could replace it")
def test_default_acl_replaces_the_umask(pair, umask022):
    p = pair.primary
    os.mkdir(p.path("d"), 0o755)
    _setfacl("-d", "-m", f"u::rwx,g::rwx,o::rwx,u:{USER}:rwx", p.path("d"))
    put(p.path("d/new"), b"", mode=0o666)
    try:
        assert stat.S_IMODE(os.stat(p.path("d/new")).st_mode) == 0o666
    finally:
        pair.assert_identical()


# --- creating nodes -------------------------------------------------------------------------
def test_create_modes_and_exclusive(pair, umask022):
    p = pair.primary
    fd = os.open(p.path("f"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    assert stat.S_IMODE(os.stat(p.path("f")).st_mode) == 0o644          # minus the umask
    fails(errno.EEXIST, os.open, p.path("f"), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    os.umask(0)
    os.close(os.open(p.path("g"), os.O_RDONLY | os.O_CREAT, 0o4751))    # read-only create
    assert stat.S_IMODE(os.stat(p.path("g")).st_mode) == 0o4751
    os.close(os.open(p.path("h"), os.O_RDWR | os.O_CREAT, 0))           # mode 0
    os.umask(0o022)
    fd = os.open(p.path("h"), os.O_RDWR)                                 # root may, still
    try:
        os.write(fd, b"written to a mode 0 file")
    finally:
        os.close(fd)
    fresh(pair, "f", "g", "h", "")
    pair.assert_identical()


def test_mknod_fifo_char_device_and_regular(pair, umask022):
    p = pair.primary
    os.mkfifo(p.path("fifo"), 0o640)
    os.mknod(p.path("null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(p.path("blk"), stat.S_IFBLK | 0o600, os.makedev(7, 200))
    os.mknod(p.path("reg"), stat.S_IFREG | 0o600)
    fails(errno.EEXIST, os.mkfifo, p.path("fifo"))
    st = os.lstat(pair.replica.path("null"))
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    assert stat.S_ISFIFO(os.lstat(pair.replica.path("fifo")).st_mode)
    assert stat.S_ISBLK(os.lstat(pair.replica.path("blk")).st_mode)
    os.chmod(p.path("fifo"), 0o600)
    os.rename(p.path("null"), p.path("null2"))
    os.unlink(p.path("blk"))
    fresh(pair, "fifo", "null2", "reg", "")
    pair.assert_identical()


def test_mkdir_rmdir(pair, umask022):
    p = pair.primary
    os.makedirs(p.path("a/b/c"))
    os.mkdir(p.path("m"), 0o700)
    os.mkdir(p.path("s"), 0o2755)
    os.umask(0)
    os.mkdir(p.path("t"), 0o1777)
    fails(errno.EEXIST, os.mkdir, p.path("a"))
    fails(errno.ENOENT, os.mkdir, p.path("nope/x"))
    put(p.path("a/b/file"), b"")
    fails(errno.ENOTEMPTY, os.rmdir, p.path("a/b"))
    fails(errno.ENOTDIR, os.rmdir, p.path("a/b/file"))
    os.rmdir(p.path("a/b/c"))
    assert stat.S_IMODE(os.stat(p.path("m")).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(p.path("t")).st_mode) == 0o1777
    assert os.listdir(pair.replica.path("a/b")) == ["file"]
    fresh(pair, "a", "a/b", "m", "s", "t", "")
    pair.assert_identical()


def test_symlinks_including_dangling(pair):
    p, r = pair.primary, pair.replica
    os.mkdir(p.path("d"))
    put(p.path("d/target"), b"pointed at")
    os.symlink("d/target", p.path("rel"))
    os.symlink(p.path("d/target"), p.path("abs"))
    os.symlink("nowhere/at/all", p.path("dangling"))
    os.symlink("d", p.path("dirlink"))
    os.symlink("loop", p.path("loop"))
    os.symlink("x" * 4000, p.path("long"))                             # long target
    assert get(r.path("rel")) == b"pointed at"
    assert os.readlink(r.path("dangling")) == "nowhere/at/all"
    assert not os.path.exists(r.path("dangling"))
    fails(errno.ELOOP, os.stat, p.path("loop"))
    fails(errno.EEXIST, os.symlink, "other", p.path("rel"))
    put(p.path("dirlink/through"), b"written through a symlinked directory")
    put(p.path("dangling2"), b"")
    os.unlink(p.path("dangling2"))
    os.symlink("d/created-through-link", p.path("dangling2"))
    put(p.path("dangling2"), b"open(O_CREAT) through a dangling link")
    assert get(p.path("d/created-through-link")).startswith(b"open")
    os.rename(p.path("rel"), p.path("d/rel"))                           # now dangling
    assert not os.path.exists(r.path("d/rel"))
    fresh(pair, "rel", "d/rel", "abs", "dangling", "dirlink", "long", "d", "d/through")
    pair.assert_identical()


def test_hard_links(pair):
    p, r = pair.primary, pair.replica
    os.mkdir(p.path("d"))
    put(p.path("orig"), b"one")
    os.link(p.path("orig"), p.path("d/other"))
    os.link(p.path("orig"), p.path("third"))
    assert os.stat(r.path("orig")).st_nlink == 3
    with open(p.path("d/other"), "r+b") as f:                          # modify via one name
        f.write(b"ONE, via other")
    assert get(p.path("orig")) == b"ONE, via other"
    assert get(r.path("orig")) == b"ONE, via other" == get(r.path("third"))
    os.unlink(p.path("orig"))                                          # unlink the original
    assert os.stat(r.path("d/other")).st_nlink == 2
    os.chmod(p.path("d/other"), 0o600)                                 # then change the rest
    os.utime(p.path("third"), ns=(1, 2))
    put(p.path("d/other"), b"rewritten", os.O_WRONLY | os.O_TRUNC)
    os.truncate(p.path("third"), 4)
    os.setxattr(p.path("third"), "user.x", b"on the inode")
    assert os.getxattr(r.path("d/other"), "user.x") == b"on the inode"
    fails(errno.EEXIST, os.link, p.path("third"), p.path("d/other"))
    fails(errno.EPERM, os.link, p.path("d"), p.path("dirlink"))
    os.symlink("third", p.path("sym"))
    os.link(p.path("sym"), p.path("symlink-link"), follow_symlinks=False)  # links the symlink
    assert os.readlink(p.path("symlink-link")) == "third"
    root = os.open(p.dir, os.O_RDONLY | os.O_DIRECTORY)
    try:                     # linkat(AT_SYMLINK_FOLLOW) (os.link without dir_fd calls link(2))
        os.link("sym", "followed", src_dir_fd=root, dst_dir_fd=root, follow_symlinks=True)
    finally:
        os.close(root)
    assert stat.S_ISREG(os.lstat(p.path("followed")).st_mode)
    assert os.stat(r.path("third")).st_nlink == 3
    fresh(pair, "d/other", "third", "sym", "symlink-link", "followed", "d", "")
    pair.assert_identical()


# --- removing and renaming ------------------------------------------------------------------
def test_unlink(pair):
    p = pair.primary
    put(p.path("f"), b"x")
    os.mkdir(p.path("d"))
    os.stat(pair.replica.path("f"))                          # in the replica kernel's cache
    os.unlink(p.path("f"))
    assert not os.path.exists(pair.replica.path("f"))
    fails(errno.ENOENT, os.unlink, p.path("f"))
    fails(errno.EISDIR, os.unlink, p.path("d"))
    put(p.path("f"), b"a new file under the old name")
    fresh(pair, "f", "d", "")
    pair.assert_identical()


def test_rename_files_dirs_and_over_existing(pair):
    p, r = pair.primary, pair.replica
    os.makedirs(p.path("a/sub"))
    os.makedirs(p.path("b"))
    put(p.path("a/sub/deep"), b"deep")
    put(p.path("a/f"), b"f")
    put(p.path("victim"), b"replaced")
    with open(r.path("victim"), "rb", buffering=0) as held:               # the replaced file, held open
        os.stat(r.path("a/f"))
        os.rename(p.path("a/f"), p.path("victim"))             # over an existing file
        assert get(r.path("victim")) == b"f" and not os.path.exists(r.path("a/f"))
        assert held.read() == b"replaced"
    os.rename(p.path("a"), p.path("b/a2"))                     # a directory with contents
    assert get(r.path("b/a2/sub/deep")) == b"deep"
    assert not os.path.exists(r.path("a"))
    os.mkdir(p.path("empty"))
    os.rename(p.path("b/a2/sub"), p.path("empty"))             # a directory over an empty one
    fails(errno.ENOTEMPTY, os.rename, p.path("b"), p.path("empty"))
    fails(errno.EISDIR, os.rename, p.path("victim"), p.path("empty"))
    fails(errno.ENOTDIR, os.rename, p.path("empty"), p.path("victim"))
    fails(errno.EINVAL, os.rename, p.path("b"), p.path("b/a2/inside"))
    os.rename(p.path("victim"), p.path("victim"))              # onto itself: nothing happens
    os.link(p.path("victim"), p.path("hard"))
    os.rename(p.path("victim"), p.path("hard"))                # same inode: nothing happens
    assert os.path.exists(p.path("victim"))
    fresh(pair, "victim", "hard", "empty", "empty/deep", "b", "b/a2", "")
    pair.assert_identical()


def test_renameat2_noreplace_and_exchange(pair):
    p, r = pair.primary, pair.replica
    os.mkdir(p.path("d"))
    os.mkdir(p.path("d/inner"))
    put(p.path("x"), b"x")
    put(p.path("y"), b"y")
    put(p.path("d/z"), b"z")
    fails(errno.EEXIST, renameat2, p.path("x"), p.path("y"), RENAME_NOREPLACE)
    renameat2(p.path("x"), p.path("x2"), RENAME_NOREPLACE)
    with open(r.path("y"), "rb", buffering=0) as held:
        os.stat(r.path("x2"))
        renameat2(p.path("x2"), p.path("y"), RENAME_EXCHANGE)
        assert get(r.path("y")) == b"x" and get(r.path("x2")) == b"y"
        assert held.read() == b"y"
    renameat2(p.path("y"), p.path("d"), RENAME_EXCHANGE)        # a file with a directory
    assert os.path.isdir(r.path("y/inner")) and get(r.path("d")) == b"x"
    renameat2(p.path("y/z"), p.path("x2"), RENAME_EXCHANGE)    # across directories
    assert get(r.path("x2")) == b"z" and get(r.path("y/z")) == b"y"
    fails(errno.ENOENT, renameat2, p.path("x2"), p.path("missing"), RENAME_EXCHANGE)
    fails(errno.EINVAL, renameat2, p.path("x2"), p.path("d"),
          RENAME_EXCHANGE | RENAME_NOREPLACE)
    fresh(pair, "x2", "y", "y/z", "y/inner", "d", "")
    pair.assert_identical()


def test_unlink_while_open(pair):
    p = pair.primary
    fd = os.open(p.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    other = os.open(p.path("f"), os.O_RDONLY)
    try:
        os.write(fd, b"before ")
        os.unlink(p.path("f"))
        assert not os.path.exists(pair.replica.path("f"))
        os.write(fd, b"after unlink")
        put(p.path("f"), b"a new file, same name")              # must not receive the writes
        os.pwrite(fd, b"BEFORE", 0)
        os.fsync(fd)
        assert os.pread(other, 100, 0) == b"BEFORE after unlink"
    finally:
        os.close(fd)
        os.close(other)
    assert get(p.path("f")) == b"a new file, same name"
    fresh(pair, "f", "")
    pair.assert_identical()


def test_attributes_of_an_unlinked_open_file(pair):
    p = pair.primary
    fd = os.open(p.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"0123456789")
        os.unlink(p.path("f"))
        os.ftruncate(fd, 4)
        os.fchmod(fd, 0o600)
        os.utime(fd, ns=(1, 2))
        assert os.pread(fd, 100, 0) == b"0123"
    finally:
        os.close(fd)
        pair.assert_identical()


def test_rename_of_an_open_file_then_write(pair):
    p, r = pair.primary, pair.replica
    os.mkdir(p.path("elsewhere"))
    fd = os.open(p.path("f"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"one ")
        os.rename(p.path("f"), p.path("g"))
        os.write(fd, b"two ")
        os.rename(p.path("g"), p.path("elsewhere/h"))
        os.write(fd, b"three ")
        os.ftruncate(fd, 13)
        os.fchmod(fd, 0o640)
        put(p.path("f"), b"new f")
        os.rename(p.path("f"), p.path("elsewhere/h"))           # replaced while open
        os.pwrite(fd, b" four", 13)
        assert os.pread(fd, 100, 0) == b"one two three four"
    finally:
        os.close(fd)
    assert get(r.path("elsewhere/h")) == b"new f"
    fresh(pair, "elsewhere", "elsewhere/h", "")
    pair.assert_identical()


# --- names and shapes -----------------------------------------------------------------------
def test_non_utf8_names(pair):
    p, r = pair.primary, pair.replica
    root = os.fsencode(p.dir)
    names = [b"latin1-\xe9t\xe9", b"\xff\xfe", b"bad-\x80-\xc3(", b"nl\nand\ttab", b" space "]
    for i, name in enumerate(names):
        put(root + b"/" + name, b"content %d" % i)
    os.mkdir(root + b"/dir-\xfa")
    os.rename(root + b"/" + names[0], root + b"/dir-\xfa/moved-\xe0")
    os.symlink(b"dir-\xfa/moved-\xe0", root + b"/link-\xef")
    os.link(root + b"/" + names[1], root + b"/dir-\xfa/hard-\xa0")
    os.setxattr(root + b"/dir-\xfa", b"user.name-\xb5", b"\xb5")
    os.unlink(root + b"/" + names[2])
    assert get(os.fsencode(r.dir) + b"/link-\xef") == b"content 0"
    assert set(os.listdir(os.fsencode(r.dir))) == set(os.listdir(root))
    fresh(pair, b"dir-\xfa", b"dir-\xfa/moved-\xe0", b"link-\xef", b"dir-\xfa/hard-\xa0",
          *names[1:2], *names[3:], b"")
    pair.assert_identical()


def test_name_length_limits(pair):
    p, r = pair.primary, pair.replica
    n255 = "n" * 251 + ".txt"
    os.mkdir(p.path("d" * 255))
    put(p.path("d" * 255, n255), b"255")
    os.symlink(n255, p.path("d" * 255, "s" * 255))
    os.link(p.path("d" * 255, n255), p.path("h" * 255))
    os.rename(p.path("d" * 255, n255), p.path("d" * 255, "r" * 255))
    os.setxattr(p.path("h" * 255), "user." + "k" * 250, b"long xattr name")
    assert get(r.path("d" * 255, "r" * 255)) == b"255"
    n256 = "x" * 256
    fails(errno.ENAMETOOLONG, put, p.path(n256), b"")
    fails(errno.ENAMETOOLONG, os.mkdir, p.path(n256))
    fails(errno.ENAMETOOLONG, os.symlink, "t", p.path(n256))
    fails(errno.ENAMETOOLONG, os.link, p.path("h" * 255), p.path(n256))
    fails(errno.ENAMETOOLONG, os.rename, p.path("h" * 255), p.path(n256))
    fails(errno.ENAMETOOLONG, os.mknod, p.path(n256), stat.S_IFIFO | 0o644)
    assert os.path.exists(p.path("h" * 255))
    fresh(pair, "d" * 255, "d" * 255 + "/" + "r" * 255, "d" * 255 + "/" + "s" * 255,
          "h" * 255, "")
    pair.assert_identical()


def test_deep_tree(pair):
    p, r = pair.primary, pair.replica
    parts = [f"level{i:02d}" for i in range(50)]
    os.makedirs(p.path(*parts))
    put(p.path(*parts, "bottom"), b"fifty levels down")
    os.symlink("../" * 50 + "top", p.path(*parts, "up"))
    put(p.path("top"), b"top")
    assert get(r.path(*parts, "up")) == b"top"
    os.rename(p.path(parts[0]), p.path("renamed"))            # move the whole tree
    assert get(r.path("renamed", *parts[1:], "bottom")) == b"fifty levels down"
    os.rename(p.path("renamed", *parts[1:25]), p.path("half"))  # cut it in two
    os.chmod(p.path("half", *parts[25:]), 0o700)
    put(p.path("half", *parts[25:], "bottom"), b"rewritten")
    fresh(pair, os.path.join("half", *parts[25:], "bottom"), os.path.join("renamed", *parts[1:24]))
    pair.assert_identical()


def _below_path_max_limit(pair, depth: int = 15):
    """A chain of directories whose path is just under PATH_MAX (4096)."""
    fd = os.open(pair.primary.dir, os.O_RDONLY | os.O_DIRECTORY)
    for i in range(depth):
        name = f"d{i:02d}" + "x" * 240
        os.mkdir(name, dir_fd=fd)
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def test_beyond_path_max_never_diverges(pair):
    """Paths longer than PATH_MAX are legal on a local disk. fusemirror names nodes by
    path on the wire and cannot reach them (ENAMETOOLONG); that is a known limit, but
    each operation must then fail on both copies, never on one only."""
    p = pair.primary
    deep = _below_path_max_limit(pair)
    top = os.open(p.dir, os.O_RDONLY | os.O_DIRECTORY)
    sfd = None
    try:
        os.mkdir("S" * 255, dir_fd=top)
        put(p.path("S" * 255, "F" * 200), b"content")
        os.rename("S" * 255, "S" * 255, src_dir_fd=top, dst_dir_fd=deep)  # now > PATH_MAX
        sfd = os.open("S" * 255, os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
        where = len(os.readlink(f"/proc/self/fd/{sfd}"))
        assert where < 4096 - 10 < where + 1 + 200, "the premise: S is reachable, S/F is not"
        attempts = [lambda: os.chmod("F" * 200, 0o600, dir_fd=sfd),
                    lambda: os.utime("F" * 200, ns=(1, 2), dir_fd=sfd),
                    lambda: os.setxattr(f"/proc/self/fd/{sfd}/{'F' * 200}", "user.a", b"1"),
                    lambda: os.close(os.open("F" * 200, os.O_WRONLY | os.O_TRUNC, dir_fd=sfd)),
                    lambda: os.mkdir("sub", dir_fd=sfd)]
        for attempt in attempts:
            try:
                attempt()
            except OSError as e:
                assert e.errno == errno.ENAMETOOLONG, e
    finally:
        for fd in (deep, top, sfd):
            if fd is not None:
                os.close(fd)
    pair.assert_identical()


def test_directory_named_like_a_deleted_one(pair):
    p = pair.primary
    os.mkdir(p.path("a (deleted)"))
    os.mkdir(p.path("a"))
    put(p.path("a (deleted)", "x"), b"where does it go?")
    os.chmod(p.path("a (deleted)"), 0o700)
    assert os.listdir(pair.replica.path("a")) == []
    pair.assert_identical()


@pytest.mark.parametrize("via", ["unlinked-open-file", "other-hard-link"])
def test_stale_path_across_an_absolute_symlink_does_not_hang(pair, via):
    """The agent must resolve paths in its backing tree without following symlinks.
    Here the agent knows an inode by the name 'd/g', which is gone, and 'd' is now a
    symlink to the mount itself; the inode is then changed through an open descriptor
    or through its other hard link."""
    p = pair.primary
    os.mkdir(p.path("d"))
    fd = os.open(p.path("d/g"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"data")
        if via == "other-hard-link":
            os.link(p.path("d/g"), p.path("h"))
            os.close(fd)
            fd = None
        os.unlink(p.path("d/g"))
        os.rmdir(p.path("d"))
        os.symlink(p.dir, p.path("d"))                 # absolute: back into the mount
        if fd is None:
            assert in_child(p, lambda: os.chmod(p.path("h"), 0o600)) == 0
            assert in_child(p, lambda: os.setxattr(p.path("h"), "user.a", b"1")) == 0
        else:
            assert in_child(p, lambda: os.setxattr(fd, "user.a", b"1")) == 0
            assert in_child(p, lambda: os.close(os.open(f"/proc/self/fd/{fd}",
                                                        os.O_WRONLY))) == 0
            os.write(fd, b" more")
    finally:
        try:
            if fd is not None:
                os.close(fd)
        except OSError as e:
            if e.errno != errno.ENOTCONN:        # the connection was aborted
                raise
    assert os.readlink(pair.replica.path("d")) == p.dir
    pair.assert_identical()


# --- permissions, as an ordinary user -------------------------------------------------------
def test_permission_checks_as_user(pair, umask022):
    p = pair.primary
    put(p.path("rootfile"), b"root's", mode=0o644)
    os.chmod(p.path("rootfile"), 0o644)
    os.mkdir(p.path("closed"), 0o755)
    os.mkdir(p.path("open"), 0o777)
    os.chmod(p.path("open"), 0o777)
    u = lambda fn, *a: as_user(USER, GROUP, fn, *a)            # noqa: E731
    assert u(put, p.path("rootfile"), b"no", os.O_WRONLY) == errno.EACCES
    assert u(os.truncate, p.path("rootfile"), 0) == errno.EACCES
    assert u(os.chmod, p.path("rootfile"), 0o666) == errno.EPERM
    assert u(os.chown, p.path("rootfile"), USER, GROUP) == errno.EPERM
    assert u(lambda: os.utime(p.path("rootfile"), ns=(1, 2))) == errno.EPERM
    assert u(os.utime, p.path("rootfile")) == errno.EACCES
    assert u(os.setxattr, p.path("rootfile"), "user.a", b"1") == errno.EACCES
    assert u(os.unlink, p.path("rootfile")) == errno.EACCES     # 0755 root directory
    assert u(put, p.path("closed/f"), b"") == errno.EACCES
    assert u(os.mkdir, p.path("closed/d")) == errno.EACCES
    assert u(os.rename, p.path("rootfile"), p.path("open/stolen")) == errno.EACCES
    assert u(get, p.path("rootfile")) == 0                      # reading is allowed

    def in_open_dir():
        put(p.path("open/mine"), b"user's file", mode=0o644)
        os.mkdir(p.path("open/mydir"))
        os.symlink("mine", p.path("open/mylink"))
        os.mkfifo(p.path("open/myfifo"))
        os.chmod(p.path("open/mine"), 0o600)
        os.utime(p.path("open/mine"), ns=(1, 2))
        os.setxattr(p.path("open/mine"), "user.by", b"user")
        os.link(p.path("open/mine"), p.path("open/mylink2"))
        os.rename(p.path("open/mylink2"), p.path("open/mydir/moved"))
    assert u(in_open_dir) == 0
    for node in (pair.primary, pair.replica):                 # owned by the user on BOTH
        for rel in ("open/mine", "open/mydir", "open/mylink", "open/myfifo"):
            st = os.lstat(backing(node, rel))
            assert (st.st_uid, st.st_gid) == (USER, GROUP), (node.name, rel)
    assert u(os.chown, p.path("open/mine"), 0, 0) == errno.EPERM
    assert u(os.chown, p.path("open/mine"), -1, OTHER_GROUP) == errno.EPERM
    fresh(pair, "rootfile", "open", "open/mine", "open/mydir", "open/mydir/moved",
          "open/mylink", "open/myfifo", "closed")
    pair.assert_identical()


def test_sticky_directory(pair, umask022):
    p = pair.primary
    os.mkdir(p.path("tmp"))
    os.chmod(p.path("tmp"), 0o1777)
    put(p.path("tmp/roots"), b"", mode=0o666)
    os.chmod(p.path("tmp/roots"), 0o666)
    u = lambda fn, *a: as_user(USER, GROUP, fn, *a)            # noqa: E731
    assert u(put, p.path("tmp/roots"), b"writable", os.O_WRONLY) == 0
    assert u(os.unlink, p.path("tmp/roots")) == errno.EPERM
    assert u(os.rename, p.path("tmp/roots"), p.path("tmp/mine-now")) == errno.EPERM
    assert u(put, p.path("tmp/users"), b"") == 0
    assert u(os.rename, p.path("tmp/users"), p.path("tmp/users2")) == 0
    assert as_user(1001, 1001, os.unlink, p.path("tmp/users2")) == errno.EPERM
    put(p.path("tmp/users3"), b"")
    os.chown(p.path("tmp/users3"), USER, GROUP)
    assert u(os.unlink, p.path("tmp/users3")) == 0
    assert os.path.exists(p.path("tmp/roots")) and not os.path.exists(p.path("tmp/users3"))
    fresh(pair, "tmp", "tmp/roots", "tmp/users2")
    pair.assert_identical()


def test_setgid_directory_group_inheritance(pair, umask022):
    p = pair.primary
    os.mkdir(p.path("g"))
    os.chown(p.path("g"), 0, OTHER_GROUP)
    os.chmod(p.path("g"), 0o2777)

    def create():
        os.umask(0o022)
        put(p.path("g/file"), b"")
        os.mkdir(p.path("g/dir"))
        os.mkdir(p.path("g/dir/nested"))
        os.symlink("file", p.path("g/link"))
    assert as_user(USER, GROUP, create) == 0
    put(p.path("g/rootfile"), b"")
    for node in (pair.primary, pair.replica):
        for rel in ("g/file", "g/dir", "g/dir/nested", "g/link", "g/rootfile"):
            st = os.lstat(backing(node, rel))
            assert st.st_gid == OTHER_GROUP, (node.name, rel)
        assert os.stat(backing(node, "g/file")).st_uid == USER
        assert stat.S_IMODE(os.stat(backing(node, "g/dir")).st_mode) == 0o2755
        assert stat.S_IMODE(os.stat(backing(node, "g/dir/nested")).st_mode) == 0o2755
        assert stat.S_IMODE(os.stat(backing(node, "g/file")).st_mode) == 0o644
    fresh(pair, "g", "g/file", "g/dir", "g/dir/nested", "g/link", "g/rootfile")
    pair.assert_identical()


def test_user_files_get_owner_and_mode_minus_umask(pair):
    p = pair.primary
    os.mkdir(p.path("pub"))
    os.chmod(p.path("pub"), 0o777)

    def create(umask, suffix):
        def run():
            os.umask(umask)
            os.close(os.open(p.path(f"pub/file{suffix}"), os.O_CREAT | os.O_WRONLY, 0o666))
            os.close(os.open(p.path(f"pub/exec{suffix}"), os.O_CREAT | os.O_RDONLY, 0o777))
            os.mkdir(p.path(f"pub/dir{suffix}"), 0o777)
            os.mkfifo(p.path(f"pub/fifo{suffix}"), 0o666)
            os.mknod(p.path(f"pub/node{suffix}"), stat.S_IFREG | 0o666)
        return run
    assert as_user(USER, GROUP, create(0o027, "A")) == 0
    assert as_user(1001, 1002, create(0o002, "B")) == 0
    want = {"fileA": 0o640, "execA": 0o750, "dirA": 0o750, "fifoA": 0o640, "nodeA": 0o640,
            "fileB": 0o664, "execB": 0o775, "dirB": 0o775, "fifoB": 0o664, "nodeB": 0o664}
    for node in (pair.primary, pair.replica):
        for name, mode in want.items():
            st = os.lstat(backing(node, "pub/" + name))
            owner = (USER, GROUP) if name.endswith("A") else (1001, 1002)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (mode, *owner), \
                (node.name, name, oct(st.st_mode))
    fresh(pair, "pub", *("pub/" + n for n in want))
    pair.assert_identical()


# --- the replica's view ----------------------------------------------------------------------
def test_replica_reads_are_fresh_after_each_change(pair):
    """Files and directories held open on the replica see each change at once."""
    p, r = pair.primary, pair.replica
    put(p.path("f"), b"v1" * 1000)
    os.mkdir(p.path("d"))
    with open(r.path("f"), "rb", buffering=0) as held:
        steps = [lambda: put(p.path("f"), b"v2 shorter", os.O_WRONLY | os.O_TRUNC),
                 lambda: put(p.path("f"), b"V", os.O_WRONLY),
                 lambda: put(p.path("f"), b"appended", os.O_WRONLY | os.O_APPEND),
                 lambda: os.truncate(p.path("f"), 3),
                 lambda: os.truncate(p.path("f"), 9000),
                 lambda: os.chmod(p.path("f"), 0o604),
                 lambda: os.utime(p.path("f"), ns=(3, 4)),
                 lambda: os.setxattr(p.path("f"), "user.v", b"1"),
                 lambda: os.link(p.path("f"), p.path("d/hard")),
                 lambda: os.unlink(p.path("d/hard"))]
        for i, step in enumerate(steps):
            step()
            held.seek(0)
            assert held.read() == get(backing(p, "f")), f"step {i}"
            fresh(pair, "f", "d")
    for i in range(5):                                   # names appear and vanish at once
        put(p.path(f"d/n{i}"), b"%d" % i)
        assert get(r.path(f"d/n{i}")) == b"%d" % i
        os.rename(p.path(f"d/n{i}"), p.path("d/same"))
        assert get(r.path("d/same")) == b"%d" % i and not os.path.exists(r.path(f"d/n{i}"))
        fresh(pair, "d")
    os.unlink(p.path("d/same"))
    os.rmdir(p.path("d"))
    assert not os.path.exists(r.path("d"))
    fresh(pair, "")
    pair.assert_identical()
