"""Applying and healing each fault class (schedule.CLASSES) on a running Cluster.

Everything a fault changes is recorded here as it is done, so that `heal_all()` can undo
what is still in place whatever happened (a failed run, ^C): frozen processes get SIGCONT,
nftables tables are deleted, cables put back, filler files removed. Processes are only
ever signalled by the PID the cluster or this module knows, never looked up by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys

from fusemirror import control
from fusemirror.lab.cluster import Cluster

from .schedule import Fault

log = logging.getLogger("chaos")

HERE = os.path.dirname(os.path.abspath(__file__))
REPLICATION_PORT = 7788        # the Cluster's [[folder]] port
WITNESS_PORT = 7792
PROXY_PORT = 17788
PROXY_MARK = 0x4d46            # the proxy's own connections bypass the redirection
TMPFS_SIZE = "128m"
FILLER = "chaos-filler"


class NotApplicable(Exception):
    """The fault cannot be applied now (the process it targets is not there)."""


class Injector:
    def __init__(self, c: Cluster, work: str, disk: bool, proxy: bool):
        self.c, self.work = c, work
        self.disk, self.proxy = disk, proxy
        self.frozen: set[int] = set()
        self.tables: set[tuple[str, str]] = set()      # (node, nft table)
        self.dropped: set[str] = set()
        self.cut: set[str] = set()
        self.fillers: set[str] = set()
        self.proxies: dict[str, subprocess.Popen] = {}
        self.tmpfs: list[str] = []
        self.down: set[str] = set()        # nodes whose controller a fault stopped

    # --- set-up that must happen before the daemons start ---------------------------------

    def srv(self, node: str) -> str:
        return os.path.dirname(self.c.folder(node))

    def mount_tmpfs(self) -> None:
        """Each node's srv directory (its folder's parent) on a small tmpfs of its own."""
        for node in ("alpha", "beta"):
            srv = self.srv(node)
            os.makedirs(srv, exist_ok=True)
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0755",
                            f"chaos-{node}", srv], check=True, capture_output=True, timeout=30)
            self.tmpfs.append(srv)
            os.makedirs(self.c.folder(node), exist_ok=True)

    def unmount_tmpfs(self) -> None:
        for srv in reversed(self.tmpfs):
            subprocess.run(["umount", "-l", srv], capture_output=True, timeout=30)
        self.tmpfs.clear()

    def start_proxies(self) -> None:
        """In each node's namespace, the replication connections to the peer go through
        proxy.py (redirected by nftables), so that corrupt-frame can flip a bit."""
        c = self.c
        for node, peer in (("alpha", "beta"), ("beta", "alpha")):
            plog = os.path.join(self.work, f"proxy-{node}.log")
            out = open(os.path.join(self.work, f"proxy-{node}.out"), "ab")
            p = c.lab.popen(node, [sys.executable, os.path.join(HERE, "proxy.py"), "--listen",
                                   str(PROXY_PORT), "--target",
                                   f"{c.lab.address(peer)}:{REPLICATION_PORT}",
                                   "--mark", str(PROXY_MARK), "--log", plog],
                            stdin=subprocess.DEVNULL, stdout=out, stderr=out)
            out.close()
            c.pids.add(p.pid)
            self.proxies[node] = p
            rules = (f"add table ip chaosnat\n"
                     f"add chain ip chaosnat out {{ type nat hook output priority -100 ; }}\n"
                     f"add rule ip chaosnat out meta mark != {PROXY_MARK} ip daddr "
                     f"{c.lab.address(peer)} tcp dport {REPLICATION_PORT} "
                     f"redirect to :{PROXY_PORT}\n")
            c.lab.run(node, ["nft", "-f", "-"], input=rules)
        for node, p in self.proxies.items():
            ready = os.path.join(self.work, f"proxy-{node}.log.ready")
            for _ in range(200):
                if os.path.exists(ready) or p.poll() is not None:
                    break
                subprocess.run(["sleep", "0.05"])
            if not os.path.exists(ready):
                raise RuntimeError(f"the proxy in {node}'s namespace did not start")

    def corruptions(self, node: str) -> int:
        try:
            with open(os.path.join(self.work, f"proxy-{node}.log")) as f:
                return sum(1 for line in f if line.strip())
        except FileNotFoundError:
            return 0

    # --- faults -------------------------------------------------------------------------

    def apply(self, f: Fault, node: str, other: str) -> tuple[callable, dict]:
        """Apply f on node (other: the other node); returns (heal, notes)."""
        handler = getattr(self, "_" + f.cls.replace("-", "_"))
        return handler(node, other)

    def _pid_of_agent(self, node: str) -> int:
        try:
            return self.c.agent(node, timeout=5)["pid"]
        except (control.ControlError, KeyError) as e:
            raise NotApplicable(f"the agent of {node} does not answer: {e}") from None

    def _pid_of_daemon(self, node: str) -> int:
        d = self.c.daemons.get(node)
        if d is None or d.poll() is not None:
            raise NotApplicable(f"the controller of {node} does not run")
        return d.pid

    def _restart(self, node: str) -> callable:
        self.down.add(node)

        def heal():
            d = self.c.daemons.get(node)
            if d is None or d.poll() is not None:
                self.c.start(node, timeout=60)
            self.down.discard(node)
        return heal

    def _kill9_daemon(self, node, other):
        pid = self._pid_of_daemon(node)
        heal = self._restart(node)
        os.kill(pid, signal.SIGKILL)
        self.c.daemons[node].wait(timeout=30)
        return heal, {"pid": pid}

    def _kill9_agent(self, node, other):
        pid = self._pid_of_agent(node)
        os.kill(pid, signal.SIGKILL)
        return (lambda: None), {"pid": pid}

    def _kill9_node(self, node, other):
        heal = self._restart(node)
        pids = self.c.kill(node)
        return heal, {"pids": pids}

    def _freeze(self, pid: int) -> callable:
        os.kill(pid, signal.SIGSTOP)
        self.frozen.add(pid)

        def heal():
            self._thaw(pid)
        return heal

    def _thaw(self, pid: int) -> None:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
        self.frozen.discard(pid)

    def _sigstop_daemon(self, node, other):
        pid = self._pid_of_daemon(node)
        return self._freeze(pid), {"pid": pid}

    def _sigstop_agent(self, node, other):
        pid = self._pid_of_agent(node)
        return self._freeze(pid), {"pid": pid}

    def _link_down(self, node, other):
        self.c.lab.link_down(node, side="bridge")
        self.cut.add(node)

        def heal():
            self.c.lab.link_up(node, side="bridge")
            self.cut.discard(node)
        return heal, {}

    def _oneway(self, node: str, direction: str):
        self.c.lab.drop(node, direction)
        self.dropped.add(node)

        def heal():
            self.c.lab.undrop(node)
            self.dropped.discard(node)
        return heal, {"direction": direction}

    def _oneway_in(self, node, other):
        return self._oneway(node, "in")

    def _oneway_out(self, node, other):
        return self._oneway(node, "out")

    def _nft(self, node: str, table: str, rules: list[str]) -> None:
        script = [f"add table inet {table}",
                  f"add chain inet {table} input "
                  "{ type filter hook input priority -300 ; policy accept ; }",
                  f"add chain inet {table} output "
                  "{ type filter hook output priority -300 ; policy accept ; }"]
        script += [f"add rule inet {table} {r}" for r in rules]
        self.c.lab.run(node, ["nft", "-f", "-"], input="\n".join(script) + "\n")
        self.tables.add((node, table))

    def _unnft(self, node: str, table: str) -> None:
        self.c.lab.run(node, ["nft", "delete", "table", "inet", table], check=False)
        self.tables.discard((node, table))

    def _partition(self, primary: str, secondary: str, witness_from: tuple[str, ...]):
        lab = self.c.lab
        made = [(primary, "chaospart", [f"input ip saddr {lab.address(secondary)} drop",
                                        f"output ip daddr {lab.address(secondary)} drop"])]
        w = lab.address("client")
        for node in (primary, secondary):
            if node not in witness_from:
                made.append((node, "chaoswit", [
                    f"input ip saddr {w} udp sport {WITNESS_PORT} drop",
                    f"output ip daddr {w} udp dport {WITNESS_PORT} drop"]))
        for node, table, rules in made:
            self._nft(node, table, rules)

        def heal():
            for node, table, _ in made:
                self._unnft(node, table)
        return heal, {"witness_from": list(witness_from)}

    def _partition_wboth(self, node, other):
        return self._partition(node, other, (node, other))

    def _partition_wprimary(self, node, other):
        return self._partition(node, other, (node,))

    def _partition_wsecondary(self, node, other):
        return self._partition(node, other, (other,))

    def _witness_down(self, node, other):
        w = getattr(self.c, "witness_proc", None)
        if w is None or w.poll() is not None:
            raise NotApplicable("the witness does not run")
        w.kill()
        w.wait(timeout=10)

        def heal():
            self.c.start_witness()
        return heal, {"pid": w.pid}

    def _node_restart(self, node, other):
        heal = self._restart(node)
        code = self.c.stop(node, timeout=60)
        return heal, {"exit": code}

    def _swap(self, node, other):
        p = self.c.command(node, "swap", check=False)
        out = " ".join((p.stdout + " " + p.stderr).split())
        return (lambda: None), {"exit": p.returncode, "output": out[:300]}

    def _disk_full(self, node, other):
        if not self.disk:
            raise NotApplicable("disk-full needs the tmpfs folders (--no-disk-full given)")
        path = os.path.join(self.srv(node), FILLER)
        self.fillers.add(path)
        filled = fill(path)

        def heal():
            self._unfill(path)
        return heal, {"filler_bytes": filled}

    def _unfill(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.fillers.discard(path)

    def _corrupt_frame(self, node, other):
        p = self.proxies.get(node)
        if p is None or p.poll() is not None:
            raise NotApplicable("no corrupting proxy runs (--no-proxy given, or it died)")
        before = self.corruptions(node)
        os.kill(p.pid, signal.SIGUSR1)

        def heal():
            pass
        notes = {"corruptions_before": before}
        return heal, notes

    # --- undoing everything ---------------------------------------------------------------

    def heal_all(self) -> None:
        """Undo whatever is still in place; errors are logged, never raised."""
        for pid in list(self.frozen):
            self._thaw(pid)
        steps = [(f"nft {t} on {n}", lambda n=n, t=t: self._unnft(n, t)) for n, t in self.tables]
        steps += [(f"undrop {n}", lambda n=n: self.c.lab.undrop(n)) for n in self.dropped]
        steps += [(f"link up {n}", lambda n=n: self.c.lab.link_up(n, side="bridge"))
                  for n in self.cut]
        steps += [(f"remove {p}", lambda p=p: self._unfill(p)) for p in self.fillers]
        for what, step in steps:
            try:
                step()
            except Exception as e:           # clean-up goes on whatever fails
                log.warning("heal_all: %s: %s", what, e)
        self.dropped.clear()
        self.cut.clear()

    def stop_proxies(self) -> None:
        for p in self.proxies.values():
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=5)


def fill(path: str) -> int:
    """Fill the filesystem of path with one file; returns its size."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    size = 0
    try:
        st = os.statvfs(os.path.dirname(path))
        want = st.f_bavail * st.f_frsize
        try:
            os.posix_fallocate(fd, 0, want)
            size = want
        except OSError:
            pass
        chunk = b"\0" * 65536
        while chunk:
            try:
                size += os.pwrite(fd, chunk, size)
            except OSError:
                chunk = chunk[:len(chunk) // 16] if len(chunk) > 1 else b""
    finally:
        os.close(fd)
    return size

