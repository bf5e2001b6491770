"""Seeded random operation sequences from several processes at once, on a real pair.

Three processes change the tree through the primary's mount for a bounded time and
number of operations: each mostly in its own directory, partly in one directory they
share (where they collide on names, rename each other's files and directories, and
get the errors POSIX prescribes for that). Afterwards both mounts must show the same
tree and both backing trees must be identical.

The seed is printed and repeated in every failure message; rerun with
FUSEMIRROR_SEED=<seed> to replay the same choices (the interleaving of the processes,
and so the outcome of colliding operations, is up to the scheduler).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import random
import select
import signal
import stat
import time

from conftest import abort_fuse

WORKERS = 3
SECONDS = float(os.environ.get("FUSEMIRROR_RANDOM_SECONDS", "14"))
MAX_OPS = 8000                           # per worker
MAX_OPEN = 4                             # descriptors a worker keeps open across operations
MAX_OFFSET = 1 << 20
HANG_GRACE = 20                          # seconds past the end before workers count as hung

# What POSIX answers when the tree is not what the process expected (another process
# got there first, or a random choice made no sense). Anything else (EIO, ESTALE,
# EROFS, EBADF...) is a failure of the mount.
EXPECTED = {errno.ENOENT, errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR,
            errno.EINVAL, errno.ENODATA, errno.EPERM, errno.ELOOP}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p,
                            ctypes.c_uint]


def renameat2(old: str, new: str, flags: int) -> None:
    if _libc.renameat2(-100, os.fsencode(old), -100, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), old)


def seed_from_env() -> int:
    text = os.environ.get("FUSEMIRROR_SEED")
    return int(text) if text else random.SystemRandom().randrange(1 << 32)


class Worker:
    """One process's random sequence. Paths are chosen among what exists now (listing
    through the mount) or made up from small name pools, so processes collide."""

    def __init__(self, index: int, seed: int, own: str, shared: str, deadline: float):
        self.rng = random.Random(seed * 1009 + index)
        self.index = index
        self.areas = (own, shared)
        self.deadline = deadline
        self.fds: list[tuple[int, str]] = []
        self.done: dict[str, int] = {}
        self.expected_errors = 0
        self.unexpected: list[str] = []

    # --- choosing paths -------------------------------------------------------------------
    def area(self) -> str:
        return self.areas[0] if self.rng.random() < 0.7 else self.areas[1]

    def existing(self, want: str) -> str | None:
        """A random node below an area: want is "file", "dir", "nondir" or "any"."""
        path = self.area()
        found = None
        for _ in range(4):
            try:
                names = os.listdir(path)
            except OSError:
                break
            if not names:
                break
            cand = os.path.join(path, self.rng.choice(names))
            try:
                st = os.lstat(cand)
            except OSError:
                break
            kind = "dir" if stat.S_ISDIR(st.st_mode) else \
                "file" if stat.S_ISREG(st.st_mode) else "other"
            if want == "any" or kind == want or (want == "nondir" and kind != "dir"):
                found = cand
            if kind != "dir" or (found and self.rng.random() < 0.4):
                break
            path = cand
        return found

    def new_path(self) -> str:
        parent = self.existing("dir") if self.rng.random() < 0.5 else None
        parent = parent or self.area()
        prefix = self.rng.choice("fffdsl")
        return os.path.join(parent, f"{prefix}{self.rng.randrange(6)}")

    def data(self) -> bytes:
        n = self.rng.choice((1, 17, 512, 4096, 5000, 65536, 200_000))
        return self.rng.randbytes(n)

    def offset(self) -> int:
        return self.rng.choice((0, 0, self.rng.randrange(8192), self.rng.randrange(MAX_OFFSET)))

    # --- operations -----------------------------------------------------------------------
    def op_create(self):
        flags = os.O_WRONLY | os.O_CREAT | self.rng.choice((0, os.O_TRUNC, os.O_EXCL, os.O_APPEND))
        path = self.new_path()
        fd = os.open(path, flags, self.rng.choice((0o644, 0o600, 0o755, 0o4711, 0o666)))
        os.pwrite(fd, self.data(), self.offset()) if not flags & os.O_APPEND else \
            os.write(fd, self.data())
        self.keep_or_close(fd, path)

    def op_write(self):
        if self.fds and self.rng.random() < 0.5:
            fd, _ = self.rng.choice(self.fds)
            os.pwrite(fd, self.data(), self.offset())
            return
        path = self.existing("file")
        if path is None:
            raise OSError(errno.ENOENT, "no file")
        flags = os.O_WRONLY | self.rng.choice((0, 0, os.O_APPEND, os.O_TRUNC))
        fd = os.open(path, flags)
        if flags & os.O_APPEND:
            os.write(fd, self.data())
        else:
            os.pwrite(fd, self.data(), self.offset())
        self.keep_or_close(fd, path)

    def keep_or_close(self, fd: int, path: str) -> None:
        if len(self.fds) < MAX_OPEN and self.rng.random() < 0.25:
            self.fds.append((fd, path))
        else:
            os.close(fd)

    def op_truncate(self):
        size = self.rng.choice((0, 1, 4095, 4096, self.rng.randrange(MAX_OFFSET)))
        if self.fds and self.rng.random() < 0.4:
            os.ftruncate(self.rng.choice(self.fds)[0], size)
        else:
            os.truncate(self._need(self.existing("file")), size)

    def op_fsync(self):
        if self.fds:
            fd, _ = self.rng.choice(self.fds)
            (os.fsync if self.rng.random() < 0.5 else os.fdatasync)(fd)

    def op_close(self):
        if self.fds:
            fd, _ = self.fds.pop(self.rng.randrange(len(self.fds)))
            os.close(fd)

    def op_rename(self):
        src = self._need(self.existing("any"))
        r = self.rng.random()
        if r < 0.15:
            renameat2(src, self._need(self.existing("any")), 2)        # RENAME_EXCHANGE
        elif r < 0.3:
            renameat2(src, self.new_path(), 1)                         # RENAME_NOREPLACE
        elif r < 0.5:
            os.rename(src, self._need(self.existing("any")))           # over something
        else:
            os.rename(src, self.new_path())

    def op_link(self):
        os.link(self._need(self.existing("nondir")), self.new_path(), follow_symlinks=False)

    def op_unlink(self):
        os.unlink(self._need(self.existing("nondir")))

    def op_mkdir(self):
        os.mkdir(self.new_path(), self.rng.choice((0o755, 0o700, 0o2775, 0o1777)))

    def op_rmdir(self):
        os.rmdir(self._need(self.existing("dir")))

    def op_symlink(self):
        # creates and chmods follow symlinks: no target may reach outside the mount. An
        # absolute one back into it is the interesting case (the agent must never follow
        # a symlink in its backing tree: that once made it wait on its own mount).
        target = self.rng.choice(("f0", "../f1", "d2/f3", "nowhere", "..", "s1",
                                  os.path.join(self.areas[1], "f2"), self.areas[0],
                                  "/nonexistent/abs", os.path.basename(self.new_path())))
        os.symlink(target, self.new_path())

    def op_chmod(self):
        mode = self.rng.choice((0o644, 0o600, 0o755, 0o700, 0o777, 0o4755, 0o2755, 0o1777, 0))
        path = self._need(self.existing("any"))
        if os.path.isdir(path):
            mode |= 0o700
        os.chmod(path, mode)                   # Linux has no lchmod: follows a symlink

    def op_chown(self):
        os.chown(self._need(self.existing("any")), self.rng.choice((0, 1000, 1001, -1)),
                 self.rng.choice((0, 1000, 4242, -1)), follow_symlinks=False)

    def op_utime(self):
        path = self._need(self.existing("any"))
        follow = not os.path.islink(path)
        if self.rng.random() < 0.5:
            os.utime(path, follow_symlinks=follow)                        # now
        else:
            ns = self.rng.randrange(1 << 62)
            os.utime(path, ns=(ns, self.rng.randrange(1 << 62)), follow_symlinks=follow)

    def op_setxattr(self):
        path = self._need(self.existing("any"))
        os.setxattr(path, f"user.k{self.rng.randrange(4)}", self.rng.randbytes(
            self.rng.choice((0, 3, 100, 1000))), follow_symlinks=False)

    def op_removexattr(self):
        os.removexattr(self._need(self.existing("any")), f"user.k{self.rng.randrange(4)}",
                       follow_symlinks=False)

    @staticmethod
    def _need(path):
        if path is None:
            raise OSError(errno.ENOENT, "nothing to pick")
        return path

    WEIGHTS = {"create": 12, "write": 16, "truncate": 6, "fsync": 2, "close": 3, "rename": 10,
               "link": 4, "unlink": 7, "mkdir": 6, "rmdir": 4, "symlink": 4, "chmod": 5,
               "chown": 2, "utime": 5, "setxattr": 4, "removexattr": 2}

    def run(self) -> dict:
        names = list(self.WEIGHTS)
        weights = [self.WEIGHTS[n] for n in names]
        ops = 0
        while ops < MAX_OPS and time.monotonic() < self.deadline:
            name = self.rng.choices(names, weights)[0]
            ops += 1
            try:
                getattr(self, "op_" + name)()
            except OSError as e:
                if e.errno in EXPECTED:
                    self.expected_errors += 1
                else:
                    self.unexpected.append(f"op {ops} {name}: {e}")
                    if len(self.unexpected) >= 5:
                        break
            else:
                self.done[name] = self.done.get(name, 0) + 1
        for fd, path in self.fds:
            try:
                os.close(fd)
            except OSError as e:
                self.unexpected.append(f"close {path}: {e}")
        return {"ops": ops, "done": self.done, "expected_errors": self.expected_errors,
                "unexpected": self.unexpected}


def run_workers(seed: int, node) -> tuple[list[dict], bool]:
    """Fork one process per worker in node's mount; each reports its counts as JSON on
    a pipe. Returns the reports and whether the workers hung: a process waiting on a
    FUSE request the agent has read cannot even be killed, so after a grace period the
    FUSE connection is aborted to free them."""
    root = node.dir
    shared = os.path.join(root, "shared")
    os.mkdir(shared)
    deadline = time.monotonic() + SECONDS
    procs = {}
    for i in range(WORKERS):
        own = os.path.join(root, f"w{i}")
        os.mkdir(own)
        rfd, wfd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(rfd)
            try:
                result = Worker(i, seed, own, shared, deadline).run()
            except BaseException as e:
                result = {"ops": 0, "done": {}, "expected_errors": 0,
                          "unexpected": [f"worker crashed: {e!r}"]}
            os.write(wfd, json.dumps(result).encode())
            os._exit(0)
        os.close(wfd)
        procs[rfd] = (i, pid, [])
    hung = False
    open_fds = set(procs)
    while open_fds:
        left = deadline + HANG_GRACE - time.monotonic()
        if left <= 0:
            hung = True
            abort_fuse(root)
            left = 30
        ready = select.select(list(open_fds), [], [], left)[0]
        for rfd in ready:
            chunk = os.read(rfd, 1 << 16)
            if chunk:
                procs[rfd][2].append(chunk)
            else:
                open_fds.discard(rfd)
        if hung and not ready:
            break
    results = [None] * WORKERS
    for rfd, (i, pid, chunks) in procs.items():
        os.close(rfd)
        if hung:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        data = b"".join(chunks)
        results[i] = json.loads(data) if data else {
            "ops": 0, "done": {}, "unexpected": ["no report: hung in the mount"]}
    return results, hung


def mount_view(top: str) -> dict:
    """The tree as an application sees it through one mount."""
    out = {}
    for path, dirs, files in os.walk(top):
        for name in dirs + files:
            full = os.path.join(path, name)
            st = os.lstat(full)
            e = (stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid,
                 st.st_mtime_ns)
            if stat.S_ISREG(st.st_mode):
                with open(full, "rb") as f:
                    e += (st.st_size, st.st_nlink, hash(f.read()))
            elif stat.S_ISLNK(st.st_mode):
                e += (os.readlink(full),)
            out[os.path.relpath(full, top)] = e
    return out


def test_random_operations_from_three_processes(pair):
    seed = seed_from_env()
    print(f"FUSEMIRROR_SEED={seed}")
    started = time.monotonic()
    results, hung = run_workers(seed, pair.primary)
    took = time.monotonic() - started
    where = f"(seed {seed}; rerun with FUSEMIRROR_SEED={seed})"
    assert not hung, f"the workers hung in the mount {where}: {results}"
    for i, r in enumerate(results):
        print(f"worker {i}: {r['ops']} operations in {took:.1f}s, done {r['done']}, "
              f"{r.get('expected_errors', 0)} expected errors")
        assert not r["unexpected"], f"worker {i} {where}: " + "; ".join(r["unexpected"])
        # the test is only worth something if the operations mostly happened
        assert sum(r["done"].values()) >= min(200, r["ops"] // 3), f"worker {i} {where}: {r}"
        assert len(r["done"]) >= 12, f"worker {i} {where}: too few kinds of operation {r}"
    try:
        primary, replica = mount_view(pair.primary.dir), mount_view(pair.replica.dir)
        diff = [k for k in sorted(primary.keys() | replica.keys())
                if primary.get(k) != replica.get(k)]
        assert not diff, f"the mounts show different trees: {diff[:20]}"
        assert len(primary) > 30, f"suspiciously small tree: {sorted(primary)}"
        pair.assert_identical()
    except AssertionError as e:
        raise AssertionError(f"{where}\n{e}") from None
