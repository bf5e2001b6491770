"""The chaos harness's own workloads, each run as a separate process on the host (the
FUSE mounts are in the host's mount namespace; no network is used):

    python workloads.py writer  --control FILE --folder alpha=DIR --folder beta=DIR
                                --log FILE --ack FILE [--duration S] [--count N]
    python workloads.py mutator --control FILE --folder alpha=DIR --folder beta=DIR
                                --log FILE --ack FILE --seed N [--duration S] [--count N]

The driver tells them where to write through the control file, a small JSON document
replaced atomically: {"targets": ["alpha"], "pause": 0, "stop": false}. `targets` are the
nodes whose controller last said PRIM or ALONE (both, while two claim it); `pause` is a
generation number: when it is not 0 the workload finishes the operation in progress, writes
{"paused": GEN} to its ack file and waits until pause is 0 again; `stop` ends it.

writer: one thread per node; while its node is a target it appends the line "SEQ NODE\\n"
(after a newline) to chaos/writer.log in that node's folder (O_APPEND), fsyncs, closes, and
every 0.02 s again. SEQ comes from one counter shared by the threads. Every attempt is one
JSON line in the log, flushed at once:

    {"seq": K, "node": N, "sent": S, "acked": A}           fsync returned: acknowledged
    {"seq": K, "node": N, "sent": S, "error": E, "at": T}  refused (errno name,
                                                            "not-mounted", or "short-write":
                                                            a full disk took part of it)
    {"node": N, "sent": S, "idle": true}                   N stopped being a target

S, A and T are time.monotonic(), comparable with every other process on the machine. The
node that acknowledged a record is the one whose folder it was written to. A file that
opens on the bare folder (the mount is gone: an agent was killed and its mount detached,
or the node was stopped) is never written: "not-mounted".

mutator: one thread; on the first target it creates, appends to, renames, hard-links,
truncates and deletes files and directories from a bounded set of names under
chaos/tree, every 0.02 s, each operation relative to a descriptor of that directory opened
on the mount (checked to be the mount, as above). Operations that fail are counted by
errno; its log is a JSON summary rewritten every 2 s and at the end.

Both stop by themselves after --duration seconds or --count operations.
"""

from __future__ import annotations

import argparse
import errno
import itertools
import json
import os
import random
import sys
import threading
import time

INTERVAL = 0.02
WRITER_FILE = os.path.join("chaos", "writer.log")
TREE = os.path.join("chaos", "tree")
NOT_MOUNTED = "not-mounted"
SHORT_WRITE = "short-write"      # a full disk took part of the line: not acknowledged
NAMES = [f"f{i}" for i in range(40)]
DIRS = [f"d{i}" for i in range(4)]


class NotMounted(Exception):
    pass


class Control:
    """The driver's control file, read again before every operation."""

    def __init__(self, path: str, ack: str):
        self.path, self.ack = path, ack
        self._acked = 0
        self._lock = threading.Lock()

    def read(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"targets": [], "pause": 0, "stop": False}

    def acknowledge_pause(self, gen: int) -> None:
        with self._lock:
            if gen == self._acked:
                return
            tmp = f"{self.ack}.tmp"
            with open(tmp, "w") as f:
                json.dump({"paused": gen}, f)
            os.replace(tmp, self.ack)
            self._acked = gen


def errname(e: OSError) -> str:
    return errno.errorcode.get(e.errno, str(e.errno)) if e.errno else type(e).__name__


def bare_device(folder: str) -> int:
    """The device of the folder's parent: a file opened there is not on the mount."""
    return os.stat(os.path.dirname(os.path.realpath(folder))).st_dev


def open_on_mount(folder: str, rel: str, flags: int, mode: int = 0o644) -> int:
    """Open folder/rel, refusing (NotMounted) when it opens on the bare folder."""
    bare = bare_device(folder)
    fd = os.open(os.path.join(folder, rel), flags | os.O_CLOEXEC, mode)
    if os.fstat(fd).st_dev == bare:
        os.close(fd)
        raise NotMounted
    return fd


class Gate:
    """Pause and stop handling shared by the threads of one workload process."""

    def __init__(self, control: Control, deadline: float, threads: int):
        self.control, self.deadline, self.threads = control, deadline, threads
        self._paused: dict[str, int] = {}
        self._lock = threading.Lock()
        self.stopped = threading.Event()

    def wait_turn(self, name: str) -> dict | None:
        """The control document to act on, or None when the workload must end."""
        while True:
            if self.stopped.is_set() or time.monotonic() >= self.deadline:
                self.stopped.set()
                return None
            doc = self.control.read()
            if doc.get("stop"):
                self.stopped.set()
                return None
            gen = int(doc.get("pause") or 0)
            if not gen:
                with self._lock:
                    self._paused.pop(name, None)
                return doc
            with self._lock:
                self._paused[name] = gen
                if len(self._paused) == self.threads and set(self._paused.values()) == {gen}:
                    self.control.acknowledge_pause(gen)
            time.sleep(0.01)


class Writer:
    def __init__(self, gate: Gate, folders: dict[str, str], log_path: str, count: int):
        self.gate, self.folders = gate, folders
        self.log = open(log_path, "a", buffering=1)
        self.lock = threading.Lock()
        self.seq = itertools.count(1)
        self.count = count

    def emit(self, entry: dict) -> None:
        with self.lock:
            self.log.write(json.dumps(entry, separators=(",", ":")) + "\n")

    def run_node(self, node: str) -> None:
        folder = self.folders[node]
        target = False
        while True:
            doc = self.gate.wait_turn(node)
            if doc is None:
                return
            if node not in doc.get("targets", ()):
                if target:
                    # The node's acknowledgement window ends here: what it acknowledged
                    # before and after are not one stretch of accepting writes (the
                    # checker's dual-writer rule).
                    self.emit({"node": node, "sent": time.monotonic(), "idle": True})
                    target = False
                time.sleep(INTERVAL / 2)
                continue
            target = True
            with self.lock:
                k = next(self.seq)
            if k > self.count:
                self.gate.stopped.set()
                return
            self.emit(self.append(node, folder, k))
            time.sleep(INTERVAL)

    @staticmethod
    def append(node: str, folder: str, k: int) -> dict:
        sent = time.monotonic()
        fd = None
        try:
            fd = open_on_mount(folder, WRITER_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
            # On a full disk a write may take part of the line (a local disk does the
            # same): not acknowledged, and the next record starts on a line of its own.
            # (Chaos seed 11: the harness counted such a write as acknowledged, and the
            # next record, appended to the fragment, as lost.)
            line = b"\n%d %s\n" % (k, node.encode())
            if os.write(fd, line) < len(line):
                return {"seq": k, "node": node, "sent": sent, "error": SHORT_WRITE,
                        "at": time.monotonic()}
            os.fsync(fd)
            acked = time.monotonic()
            return {"seq": k, "node": node, "sent": sent, "acked": acked}
        except NotMounted:
            return {"seq": k, "node": node, "sent": sent, "error": NOT_MOUNTED,
                    "at": time.monotonic()}
        except OSError as e:
            return {"seq": k, "node": node, "sent": sent, "error": errname(e),
                    "at": time.monotonic()}
        finally:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class Mutator:
    """Random namespace and size changes in chaos/tree, on the first target."""

    def __init__(self, gate: Gate, folders: dict[str, str], log_path: str, seed: int,
                 count: int):
        self.gate, self.folders, self.log_path = gate, folders, log_path
        self.rng = random.Random(seed)
        self.count = count
        self.ops: dict[str, int] = {}
        self.errors: dict[str, int] = {}
        self.done = 0

    def summary(self) -> dict:
        return {"operations": self.done, "ok": self.ops, "errors": self.errors}

    def save(self) -> None:
        tmp = f"{self.log_path}.tmp"
        with open(tmp, "w") as f:
            json.dump(self.summary(), f)
        os.replace(tmp, self.log_path)

    def run(self) -> None:
        saved = time.monotonic()
        try:
            while self.done < self.count:
                doc = self.gate.wait_turn("mutator")
                if doc is None:
                    return
                targets = [t for t in doc.get("targets", ()) if t in self.folders]
                if not targets:
                    time.sleep(INTERVAL / 2)
                    continue
                op = self.rng.choice(OPS)
                args = [self.rng.random() for _ in range(4)]
                self.done += 1
                try:
                    self.one(self.folders[targets[0]], op, args)
                    self.ops[op.__name__] = self.ops.get(op.__name__, 0) + 1
                except NotMounted:
                    self.errors[NOT_MOUNTED] = self.errors.get(NOT_MOUNTED, 0) + 1
                except OSError as e:
                    key = f"{op.__name__}:{errname(e)}"
                    self.errors[key] = self.errors.get(key, 0) + 1
                if time.monotonic() - saved > 2:
                    self.save()
                    saved = time.monotonic()
                time.sleep(INTERVAL)
        finally:
            self.save()

    @staticmethod
    def one(folder: str, op, args: list[float]) -> None:
        dfd = open_on_mount(folder, TREE, os.O_RDONLY | os.O_DIRECTORY)
        try:
            op(dfd, args)
        finally:
            os.close(dfd)


def _name(x: float, in_dir: float = 1.0) -> str:
    name = NAMES[int(x * len(NAMES))]
    if in_dir < 0.3:
        return os.path.join(DIRS[int(in_dir / 0.3 * len(DIRS))], name)
    return name


def create(dfd: int, a: list[float]) -> None:
    fd = os.open(_name(a[0], a[1]), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dfd)
    try:
        os.write(fd, os.urandom(int(a[2] * 65536)))
        if a[3] < 0.5:
            os.fsync(fd)
    finally:
        os.close(fd)


def append(dfd: int, a: list[float]) -> None:
    fd = os.open(_name(a[0], a[1]), os.O_WRONLY | os.O_APPEND, dir_fd=dfd)
    try:
        os.write(fd, os.urandom(int(a[2] * 8192) + 1))
    finally:
        os.close(fd)


def rename(dfd: int, a: list[float]) -> None:
    os.rename(_name(a[0], a[1]), _name(a[2], a[3]), src_dir_fd=dfd, dst_dir_fd=dfd)


def link(dfd: int, a: list[float]) -> None:
    os.link(_name(a[0], a[1]), _name(a[2], a[3]), src_dir_fd=dfd, dst_dir_fd=dfd)


def truncate(dfd: int, a: list[float]) -> None:
    fd = os.open(_name(a[0], a[1]), os.O_WRONLY, dir_fd=dfd)
    try:
        os.ftruncate(fd, int(a[2] * 100_000))
    finally:
        os.close(fd)


def delete(dfd: int, a: list[float]) -> None:
    os.unlink(_name(a[0], a[1]), dir_fd=dfd)


def mkdir(dfd: int, a: list[float]) -> None:
    os.mkdir(DIRS[int(a[0] * len(DIRS))], dir_fd=dfd)


def rmdir(dfd: int, a: list[float]) -> None:
    os.rmdir(DIRS[int(a[0] * len(DIRS))], dir_fd=dfd)


OPS = (create, create, append, rename, link, truncate, delete, delete, mkdir, rmdir)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="workloads.py")
    p.add_argument("kind", choices=("writer", "mutator"))
    p.add_argument("--control", required=True)
    p.add_argument("--ack", required=True)
    p.add_argument("--folder", action="append", required=True, metavar="NODE=DIR")
    p.add_argument("--log", required=True)
    p.add_argument("--duration", type=float, default=600)
    p.add_argument("--count", type=int, default=200_000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    folders = dict(f.split("=", 1) for f in args.folder)
    control = Control(args.control, args.ack)
    deadline = time.monotonic() + args.duration
    if args.kind == "writer":
        gate = Gate(control, deadline, len(folders))
        w = Writer(gate, folders, args.log, args.count)
        threads = [threading.Thread(target=w.run_node, args=(n,), daemon=True, name=n)
                   for n in folders]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        w.log.close()
    else:
        gate = Gate(control, deadline, 1)
        Mutator(gate, folders, args.log, args.seed, args.count).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
