"""The controller's mount agents: one per replicated folder, started, adopted, watched.

At start the controller adopts an agent that already serves a folder (mounted from
fstab, or left by an earlier controller) and starts one for each other folder, in
the replica role (read-only): roles are the controller's to give. Each observation
asks every agent for its status over its control socket; an agent that does not
answer is unhealthy, and one that is gone is started again (a dead FUSE mount it
left behind is detached first). Agents run in their own session, so they outlive a
controller that is killed: a new controller adopts them.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import trio

from . import config as C
from . import control, scripts
from . import errors as X
from .agent import fuse_mounted
from .checkers import process_state
from .fs import ALONE, PRIMARY, REPLICA
from .statefile import escape

log = logging.getLogger(__name__)

STATUS_TIMEOUT = 2.0        # an agent that takes longer to answer is unhealthy
START_TIMEOUT = 30.0        # to mount and report ready
_TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class FolderAgent:
    """The agent of one folder on this node."""

    folder: C.Folder
    mountpoint: str
    listen: str                  # HOST:PORT where it accepts the peer's primary
    peer: str                    # HOST:PORT of the peer's agent of the same folder
    status: dict | None = None   # its last answer; None when it did not answer
    proc: trio.Process | None = None   # when this controller started it
    adopted: bool = False
    starts: int = 0
    error: str = ""              # why it is unhealthy, for the reason and `state`
    last_pid: int | None = None  # of the last agent that answered

    @property
    def role(self) -> str | None:
        return self.status["role"] if self.status else None

    @property
    def link(self) -> str | None:
        """The primary's replication link: connected, reconnecting, outdated, closed."""
        m = self.status and self.status.get("mirror")
        return m["link"] if m else None

    @property
    def policy(self) -> str | None:
        """What happens to changes the peer cannot take: "block" or "alone"."""
        return self.status.get("policy") if self.status else None

    @property
    def stalled_for(self) -> float:
        """How long the oldest change sent to the peer has waited for its acknowledgement."""
        m = self.status and self.status.get("mirror")
        return m.get("oldest_pending_s", 0.0) if m else 0.0

    @property
    def replica_connected(self) -> bool:
        r = self.status and self.status.get("replica")
        return bool(r and r.get("connected"))

    @property
    def peer_outdated(self) -> bool:
        return bool(self.status and self.status["state"].get("peer_outdated"))

    @property
    def changed_alone(self) -> bool:
        """It acknowledged changes the peer did not apply."""
        return bool(self.status and self.status["state"].get("changed_alone"))

    @property
    def uptodate(self) -> bool:
        return bool(self.status is None or self.status["state"].get("uptodate", True))

    @property
    def journal_items(self) -> int:
        """Items this copy changed while its peer was behind (a huge number: everything)."""
        j = self.status and self.status.get("journal")
        if not j:
            return 0
        return 1 << 30 if j.get("everything") else int(j.get("items", 0))

    @property
    def resync(self) -> dict | None:
        """The primary's side: progress of the running or last resynchronisation."""
        return self.status and self.status.get("resync")

    @property
    def replica_resyncing(self) -> bool:
        r = self.status and self.status.get("replica")
        return bool(r and r.get("resyncing"))

    @property
    def resynced_at(self) -> float:
        """The replica's side: when a resynchronisation last made this copy up to date."""
        return float(self.status["state"].get("resynced_at", 0)) if self.status else 0.0


@dataclass
class Agents:
    config: C.ModuleConfig
    node: C.Node
    secret_file: str
    state_dir: str
    run_dir: str
    log_dir: str
    timeout: float               # the replication timeout given to every agent
    folders: list[FolderAgent] = field(default_factory=list)

    def __post_init__(self):
        peer = self.config.peer_of(self.node.name)
        for folder in self.config.folders:
            mountpoint = os.path.realpath(self.node.path(folder.path))
            self.folders.append(FolderAgent(
                folder, mountpoint, _address(self.node.replication_address, folder.port),
                _address(peer.replication_address, folder.port)))

    # -- observing ---------------------------------------------------------------------

    async def poll(self) -> None:
        """Ask every agent for its status (at once, each within STATUS_TIMEOUT)."""
        async with trio.open_nursery() as nursery:
            for fa in self.folders:
                nursery.start_soon(self._poll_one, fa)

    async def _poll_one(self, fa: FolderAgent) -> None:
        try:
            fa.status = await self._request(fa, {"cmd": "status"}, STATUS_TIMEOUT)
            fa.error = ""
            fa.last_pid = fa.status.get("pid")
        except control.ControlError as e:
            fa.status = None
            fa.error = str(e)

    def healthy(self) -> bool:
        return all(fa.status is not None for fa in self.folders)

    def unhealthy_reason(self) -> str:
        bad = [f"{fa.mountpoint}: {fa.error or 'no answer'}" for fa in self.folders
               if fa.status is None]
        return "; ".join(bad)

    def stats(self) -> dict:
        """Replication counters summed over the folders (the primary's side)."""
        total = {"ops": 0, "bytes": 0, "acks": 0, "in_flight": 0, "rtt_sum_us": 0,
                 "rtt_buckets": None, "applied": 0}
        for fa in self.folders:
            m = fa.status and fa.status.get("mirror")
            if m:
                for k in ("ops", "bytes", "acks", "in_flight", "rtt_sum_us"):
                    total[k] += m.get(k, 0)
                b = m.get("rtt_buckets")
                if b:
                    total["rtt_buckets"] = ([x + y for x, y in zip(total["rtt_buckets"], b)]
                                            if total["rtt_buckets"] else list(b))
            r = fa.status and fa.status.get("replica")
            if r:
                total["applied"] += r.get("ops", 0)
        return total

    def resync_progress(self) -> dict | None:
        """The primary's resynchronisations summed over the folders; None when none ran."""
        runs = [fa.resync for fa in self.folders if fa.resync]
        if not runs:
            return None
        total = {k: sum(r.get(k) or 0 for r in runs)
                 for k in ("items_total", "items_done", "bytes_total", "bytes_done",
                           "bytes_sent", "rate_bps")}
        states = {r.get("state") for r in runs}
        total["state"] = next((s for s in ("failed", "copying", "finishing", "starting")
                               if s in states), "done")
        total["running"] = any(r.get("state") in ("starting", "copying", "finishing")
                               for r in runs)
        total["remaining_bytes"] = (max(total["bytes_total"] - total["bytes_done"], 0)
                                    if total["running"] else 0)
        total["eta_s"] = max((r.get("eta_s") or 0 for r in runs), default=0)
        total["errors"] = [r["error"] for r in runs if r.get("error")]
        total["full"] = any(r.get("full") for r in runs)
        return total

    # -- roles ---------------------------------------------------------------------------

    async def set_role(self, role: str, *, policy: str = "block", peer_lost: bool = False,
                       fence: bool = False) -> list[str]:
        """Give every agent `role` (skipping those already in it, except that a primary
        whose link is not connected is connected again). Returns the errors, one per
        folder that could not change; the others changed."""
        errors = []

        async def one(fa: FolderAgent) -> None:
            if (fa.status is not None and fa.role == role and not peer_lost and not fence
                    and (role != PRIMARY or (fa.link in ("connected", "resync")
                                             and fa.status.get("policy") == policy))):
                return
            req = {"cmd": "role", "role": role, "policy": policy, "peer_lost": peer_lost,
                   "fence": fence}
            if role == PRIMARY:
                req["peer"] = fa.peer
            elif role == REPLICA:
                req["listen"] = fa.listen
            try:
                fa.status = await self._request(fa, req, self.timeout + 10)
            except control.ControlError as e:
                errors.append(f"{fa.mountpoint}: {e}")
                log.warning("agent of %s: role %s failed: %s", fa.mountpoint, role, e)

        async with trio.open_nursery() as nursery:
            for fa in self.folders:
                nursery.start_soon(one, fa)
        return errors

    async def each(self, payload: dict, timeout: float = STATUS_TIMEOUT) -> list[str]:
        """Send payload to every agent; the errors, one per folder that refused."""
        errors = []

        async def one(fa: FolderAgent) -> None:
            try:
                await self._request(fa, payload, timeout)
            except control.ControlError as e:
                errors.append(f"{fa.mountpoint}: {e}")

        async with trio.open_nursery() as nursery:
            for fa in self.folders:
                nursery.start_soon(one, fa)
        return errors

    async def changes(self, limit: int = 50) -> list[dict]:
        """Per folder, what this node changed since its peer fell behind (journal)."""
        out = []
        for fa in self.folders:
            try:
                r = await self._request(fa, {"cmd": "changes", "limit": limit}, 30)
                r.pop("ok", None)
            except control.ControlError as e:
                r = {"error": str(e)}
            out.append({"mountpoint": fa.mountpoint, **r})
        return out

    async def set_deadline(self, until: float | None) -> list[str]:
        """Every agent acknowledges changes until `until` (time.monotonic()), or always."""
        return await self.each({"cmd": "deadline", "until": until})

    async def _request(self, fa: FolderAgent, payload: dict, timeout: float) -> dict:
        return await trio.to_thread.run_sync(
            lambda: control.request(fa.mountpoint, payload, timeout=timeout,
                                    run_dir=self.run_dir),
            abandon_on_cancel=True)

    # -- starting and stopping ------------------------------------------------------------

    async def start_all(self) -> None:
        """Adopt or start every folder's agent (replica role). Raises X.Failure for a
        folder that cannot be mounted, after unmounting the ones started here: nothing
        is left half-started (adopted agents stay as they were)."""
        await self.poll()
        try:
            for fa in self.folders:
                if fa.status is not None:
                    fa.adopted = True
                    log.info("adopted the agent of %s (pid %s, role %s)", fa.mountpoint,
                             fa.status.get("pid"), fa.role)
                    continue
                await self.start(fa)
        except X.Failure:
            with trio.CancelScope(shield=True):
                await self.stop_started()
            raise

    async def revive(self) -> None:
        """Start again the agents that are gone (not those that are merely slow)."""
        for fa in self.folders:
            if fa.status is None and not self._alive(fa):
                log.warning("the agent of %s is gone (%s): starting it again", fa.mountpoint,
                            fa.error)
                try:
                    await self.start(fa)
                except X.Failure as e:
                    fa.error = str(e)
                    log.error("cannot start the agent of %s: %s", fa.mountpoint, e)

    def _alive(self, fa: FolderAgent) -> bool:
        if fa.proc is not None:
            return fa.proc.returncode is None
        pid = fa.status.get("pid") if fa.status else fa.last_pid
        return bool(pid) and process_state(pid) not in (None, "Z", "X")

    async def start(self, fa: FolderAgent) -> None:
        """Mount the folder with a new agent in the replica role."""
        if fuse_mounted(fa.mountpoint):
            # The agent died and left its mount behind: every access to it fails
            # (ENOTCONN) until it is detached.
            log.warning("detaching the dead mount at %s", fa.mountpoint)
            await trio.run_process(["fusermount3", "-u", "-z", fa.mountpoint], check=False,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r, w = os.pipe()
        log_file = os.path.join(self.log_dir, f"mount-{escape(fa.mountpoint)}.log")
        argv = [sys.executable, "-m", "cli.main", "mount", fa.mountpoint, "--foreground",
                "--role", REPLICA, "--listen", fa.listen, "--secret-file", self.secret_file,
                "--on-peer-loss", "block", "--timeout", str(self.timeout),
                "--state-dir", self.state_dir, "--run-dir", self.run_dir,
                "--log-file", log_file, "--ready-fd", str(w)]
        if not self.config.replication.compress:
            argv.append("--no-compress")
        if self.config.replication.resync_rate:
            argv += ["--resync-rate", str(self.config.replication.resync_rate)]
        env = dict(os.environ)
        env["PYTHONPATH"] = _TOP + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = await trio.lowlevel.open_process(
                argv, pass_fds=(w,), start_new_session=True, cwd="/", env=env,
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.close(w)
        scripts.MANAGED.add(proc.pid)
        fa.proc, fa.adopted = proc, False
        fa.starts += 1
        line = await _read_line(r, START_TIMEOUT + self.timeout)
        if line == "OK":
            log.info("started the agent of %s (pid %d)", fa.mountpoint, proc.pid)
            await self._poll_one(fa)
            return
        if proc.returncode is None and not line:
            os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
        scripts.MANAGED.discard(proc.pid)
        fa.proc = None
        if line.startswith("ERR "):
            _, code, message = line.split(" ", 2)
            raise X.Failure(int(code), message)
        raise X.Failure(X.FAILED, f"the agent of {fa.mountpoint} did not start "
                                  f"(status {proc.returncode}); see {log_file}")

    async def stop_started(self) -> None:
        """Unmount the folders whose agent this controller started (SIGTERM: the agent
        finishes in-flight replication and unmounts). Adopted agents stay."""
        for fa in self.folders:
            if fa.proc is not None and fa.proc.returncode is None:
                fa.proc.send_signal(signal.SIGTERM)
        for fa in self.folders:
            if fa.proc is not None:
                with trio.move_on_after(self.timeout + 5):
                    await fa.proc.wait()
                if fa.proc.returncode is None:
                    log.error("the agent of %s did not stop: killing it", fa.mountpoint)
                    fa.proc.kill()
                    await fa.proc.wait()
                scripts.MANAGED.discard(fa.proc.pid)


async def _read_line(fd: int, timeout: float) -> str:
    """One line from a pipe, within timeout ("" on EOF or timeout); closes fd."""
    stream = trio.lowlevel.FdStream(fd)
    data = b""
    try:
        with trio.move_on_after(timeout):
            while not data.endswith(b"\n"):
                chunk = await stream.receive_some(4096)
                if not chunk:
                    break
                data += chunk
    except OSError as e:
        if e.errno != errno.EBADF:
            raise
    finally:
        await stream.aclose()
    return data.decode(errors="replace").strip()


__all__ = ["Agents", "FolderAgent", "ALONE", "PRIMARY", "REPLICA"]
