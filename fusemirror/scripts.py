"""Running the application's scripts, and the programs of `command` checkers.

`run_script` runs one script (start_prim, stop_prim, start_both, stop_both) and
returns a ScriptResult; it never raises for a script that is missing, cannot be
executed, fails or times out. These scripts gate transitions (docs/states.md): the
controller awaits them, and a failure or timeout aborts the transition.
`spawn_notification` runs a notification script fire-and-forget in a nursery.

Process hygiene, the same for everything run here:
- Each run is the leader of its own session and process group (start_new_session),
  with stdin from /dev/null and the working directory "/" (so it never holds a
  replicated folder busy). Its environment is the controller's own plus `env`.
- stdout and stderr go to a file, never to a pipe: the log file when one is given,
  else an unlinked temporary file. A start script usually leaves the application
  running in the background, and the application inherits these descriptors; with
  a pipe, waiting for end-of-file would wait for the application to exit, and
  closing our end would later kill it with SIGPIPE. The last lines written after
  the script started are read back from the file (`output_tail`).
- A script that ends by itself is done: whatever it left running in the background
  is the application and is left alone. A script that outlives its timeout, or
  whose caller is cancelled, is stopped as a whole: SIGTERM to its process group,
  `grace` seconds for the group to go, then SIGKILL to the group. Only the group
  this module created is signalled, by its id; never anything found by name.
  A process that started its own session (a daemon) is not in the group.
- "Gone" means no member of the group is alive: members are found in /proc by
  their process group, and a zombie counts as gone. An orphan is re-parented to
  the nearest subreaper, else to PID 1, which on some machines (containers, some
  micro-VMs) never reaps it. The controller should call `set_subreaper()` once at
  start: orphans of its scripts then become its children, and this module reaps
  those of its groups (`reap_group`), so no zombie stays behind either.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import trio

from .config import Script
from .decide import ScriptFailure

log = logging.getLogger(__name__)

DEFAULT_GRACE = 5.0           # seconds between SIGTERM and SIGKILL
TAIL_LINES = 10               # lines of output kept for the reason sentence
_TAIL_BYTES = 64 * 1024       # at most this much of the end of the output is read back
_KILL_WAIT = 5.0              # after SIGKILL: how long to wait for the group to vanish
_POLL = 0.05                  # seconds between two looks at a group that is going
_PR_SET_CHILD_SUBREAPER = 36

# Children this process waits for itself (trio processes: scripts, mount agents). The
# orphan reaper leaves them alone, so their exit status reaches whoever waits for them.
MANAGED: set[int] = set()


@dataclass(frozen=True)
class ScriptResult:
    """What became of one run.

    `returncode` is the exit status (negative: killed by that signal), None when
    the program could not be started. `pgid` is the process group it led (None
    when not started). `error` says why it could not be started."""

    ok: bool
    returncode: int | None
    timed_out: bool
    duration: float
    output_tail: str = ""
    pgid: int | None = None
    timeout: float = 0.0
    error: str = ""

    @property
    def last_line(self) -> str:
        lines = self.output_tail.splitlines()
        return lines[-1].strip() if lines else ""

    @property
    def detail(self) -> str:
        """A clause for the reason sentence: "exit 1: cannot bind port 80",
        "after 60 s, killed", "/etc/app/start does not exist"."""
        if self.error:
            return self.error
        if self.timed_out:
            how = "killed" if self.returncode == -signal.SIGKILL else "stopped"
            text = f"after {self.timeout:g} s, {how}"
        elif self.returncode is not None and self.returncode < 0:
            text = f"killed by {_signal_name(-self.returncode)}"
        else:
            text = f"exit {self.returncode}"
        if not self.ok and self.last_line:
            text += f": {_shorten(self.last_line)}"
        return text

    def failure(self, script: str) -> ScriptFailure:
        """The ScriptFailure the controller puts in its View (decide.py)."""
        return ScriptFailure(script, self.timed_out, self.detail)


def _signal_name(n: int) -> str:
    try:
        return signal.Signals(n).name
    except ValueError:
        return f"signal {n}"


def _shorten(text: str, width: int = 160) -> str:
    return text if len(text) <= width else text[:width - 3] + "..."


# --- public entry points -------------------------------------------------------------

async def run_script(script: Script | str, *, env: Mapping[str, str],
                     timeout: float | None = None, log_path: str | None = None,
                     grace: float = DEFAULT_GRACE, name: str | None = None,
                     tail_lines: int = TAIL_LINES) -> ScriptResult:
    """Run one application script and wait for it, at most `timeout` seconds (by
    default the Script's own) plus `grace`; see the module docstring. `env` is added
    to the controller's environment (FUSEMIRROR_MODULE, FUSEMIRROR_NODE,
    FUSEMIRROR_ROLE, ...). Output is appended to `log_path` between two marker
    lines naming the script (`name`, by default the file name)."""
    path = script.path if isinstance(script, Script) else script
    if timeout is None:
        if not isinstance(script, Script):
            raise ValueError("run_script needs a timeout when given a path")
        timeout = script.timeout
    problem = _exec_problem(path)
    if problem:
        log.warning("%s cannot run: %s", name or os.path.basename(path), problem)
        return ScriptResult(False, None, False, 0.0, timeout=timeout, error=problem)
    return await run_command([path], timeout=timeout, env=env, log_path=log_path,
                             grace=grace, name=name or os.path.basename(path),
                             tail_lines=tail_lines)


async def run_command(argv: Sequence[str], *, timeout: float,
                      env: Mapping[str, str] | None = None, log_path: str | None = None,
                      grace: float = DEFAULT_GRACE, name: str | None = None,
                      tail_lines: int = TAIL_LINES) -> ScriptResult:
    """Run argv (no shell) with the hygiene of the module docstring: the engine of
    run_script and of the `command` checker. Never raises but Cancelled; when
    cancelled, the group is stopped (SIGTERM, grace, SIGKILL) before it propagates."""
    argv = [os.fspath(a) for a in argv]
    name = name or os.path.basename(argv[0])
    full_env = {**os.environ, **{k: str(v) for k, v in (env or {}).items()}}
    out, start_offset = await trio.to_thread.run_sync(_open_output, log_path, name, argv)
    started = trio.current_time()
    try:
        try:
            proc = await trio.lowlevel.open_process(
                argv, stdin=subprocess.DEVNULL, stdout=out.fileno(), stderr=out.fileno(),
                env=full_env, cwd="/", start_new_session=True)
        except (OSError, ValueError) as e:
            problem = f"cannot execute {argv[0]}: {getattr(e, 'strerror', None) or e}"
            if getattr(e, "errno", None) == errno.ENOEXEC:
                problem += " (does it start with a #! line?)"
            log.warning("%s cannot run: %s", name, problem)
            await trio.to_thread.run_sync(_write_marker, out, f"{name}: {problem}")
            return ScriptResult(False, None, False, 0.0, timeout=timeout, error=problem)
        pgid = proc.pid              # the leader of a new session: its pid is the group id
        MANAGED.add(pgid)
        log.debug("%s started, pid %d", name, pgid)
        timed_out = False
        try:
            with trio.move_on_after(timeout):
                await proc.wait()
            if proc.returncode is None:
                timed_out = True
                log.warning("%s still running after %g s: stopping its process group %d",
                            name, timeout, pgid)
                await stop_group(proc, pgid, grace)
        except BaseException:
            # cancelled (the controller is stopping): nothing may outlive a script that
            # is still running; one that has ended is done, as below
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    await stop_group(proc, pgid, grace)
            raise
        MANAGED.discard(pgid)
        await trio.to_thread.run_sync(reap_group, pgid)
        duration = trio.current_time() - started
        tail = await trio.to_thread.run_sync(_read_tail, out, start_offset, tail_lines)
        result = ScriptResult(proc.returncode == 0 and not timed_out, proc.returncode,
                              timed_out, duration, tail, pgid, timeout)
        await trio.to_thread.run_sync(
            _write_marker, out, f"{name}: {'ok' if result.ok else result.detail}, "
                                f"{duration:.1f} s")
        (log.debug if result.ok else log.warning)("%s: %s after %.1f s", name,
                                                  "ok" if result.ok else result.detail,
                                                  duration)
        return result
    finally:
        out.close()


class Notification:
    """A notification script running in the background; `done` is set when it has
    ended, and `result` is then its ScriptResult."""

    def __init__(self, name: str):
        self.name = name
        self.done = trio.Event()
        self.result: ScriptResult | None = None


def spawn_notification(nursery: trio.Nursery, script: Script | str, *,
                       env: Mapping[str, str], timeout: float | None = None,
                       log_path: str | None = None, grace: float = DEFAULT_GRACE,
                       name: str | None = None,
                       limiter: trio.CapacityLimiter | None = None) -> Notification | None:
    """Start a notification script in `nursery` and return at once. It is bounded by
    its own timeout like any script, and its failure is only logged. With a
    `limiter`, at most that many run at a time: when none is free the notification
    is dropped (logged) and None is returned, so a flood of state changes cannot
    pile up processes."""
    path = script.path if isinstance(script, Script) else script
    if timeout is None and not isinstance(script, Script):
        raise ValueError("spawn_notification needs a timeout when given a path")
    n = Notification(name or os.path.basename(path))
    token = object()
    if limiter is not None:
        try:
            limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            log.warning("notification %s dropped: %d already running", n.name,
                        limiter.borrowed_tokens)
            return None

    async def notify() -> None:
        try:
            n.result = await run_script(script, env=env, timeout=timeout, log_path=log_path,
                                        grace=grace, name=n.name)
        except Exception:       # a bug here must not take the controller down
            log.exception("notification %s", n.name)
        finally:
            if limiter is not None:
                limiter.release_on_behalf_of(token)
            n.done.set()

    try:
        nursery.start_soon(notify, name=f"notification {n.name}")
    except BaseException:
        if limiter is not None:
            limiter.release_on_behalf_of(token)
        raise
    return n


# --- process groups -------------------------------------------------------------------

def set_subreaper(on: bool = True) -> bool:
    """Make this process the reaper of its descendants' orphans (Linux
    PR_SET_CHILD_SUBREAPER); False if the kernel refused. For the controller, once,
    at start; tests turn it off again."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def reap_orphans(proc_root: str = "/proc") -> int:
    """Reap this process's exited children that nobody waits for: orphans re-parented
    to us as subreaper (the application a start script left running, once it has
    exited). Children in MANAGED are skipped. Never blocks; how many were reaped."""
    me, n = os.getpid(), 0
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit() or int(entry.name) in MANAGED:
            continue
        stat = _read_stat(os.path.join(proc_root, entry.name, "stat"))
        if stat is None or stat[1] != me or stat[0] not in "ZX":
            continue
        try:
            if os.waitpid(int(entry.name), os.WNOHANG)[0]:
                n += 1
        except ChildProcessError:
            pass
    return n


def reap_group(pgid: int) -> int:
    """Reap the members of process group pgid that are this process's children and
    have exited (orphans re-parented to a subreaper); never blocks. How many."""
    n = 0
    while True:
        try:
            info = os.waitid(os.P_PGID, pgid, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            return n
        if info is None:
            return n
        n += 1


def group_alive(pgid: int, proc_root: str = "/proc") -> bool:
    """True while some member of process group pgid is alive (zombies are not)."""
    for entry in os.scandir(proc_root):
        if not entry.name.isdigit():
            continue
        stat = _read_stat(os.path.join(proc_root, entry.name, "stat"))
        if stat is not None and stat[2] == pgid and stat[0] not in "ZX":
            return True
    return False


def _read_stat(path: str) -> tuple[str, int, int] | None:
    """(state, ppid, pgrp) from a /proc/PID/stat file, None if it is gone."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:].split()     # the command name may hold ") "
    try:
        return rest[0].decode(), int(rest[1]), int(rest[2])
    except (IndexError, ValueError):
        return None


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


async def stop_group(proc: trio.Process, pgid: int, grace: float = DEFAULT_GRACE) -> bool:
    """SIGTERM to the group, up to `grace` seconds for it to go, then SIGKILL and a
    bounded wait. True when nothing of the group is left alive."""
    _killpg(pgid, signal.SIGTERM)
    if await _wait_gone(proc, pgid, grace):
        return True
    log.warning("process group %d still alive %g s after SIGTERM: sending SIGKILL",
                pgid, grace)
    _killpg(pgid, signal.SIGKILL)
    if await _wait_gone(proc, pgid, _KILL_WAIT):
        return True
    log.error("process group %d survived SIGKILL for %g s (a process stuck in the "
              "kernel?)", pgid, _KILL_WAIT)
    return False


async def _wait_gone(proc: trio.Process, pgid: int, seconds: float) -> bool:
    deadline = trio.current_time() + seconds
    with trio.move_on_at(deadline):
        await proc.wait()
    while True:
        reap_group(pgid)
        if proc.returncode is not None and not await trio.to_thread.run_sync(group_alive,
                                                                             pgid):
            reap_group(pgid)     # members that turned zombie since the last look
            return True
        if trio.current_time() >= deadline:
            return False
        await trio.sleep(_POLL)


# --- files -------------------------------------------------------------------------

def _exec_problem(path: str) -> str | None:
    if not os.path.exists(path):
        return f"{path} does not exist"
    if not os.path.isfile(path):
        return f"{path} is not a file"
    if not os.access(path, os.X_OK):
        return f"{path} is not executable"
    return None


def _open_output(log_path: str | None, name: str, argv: list[str]):
    """(file the run writes to, offset where its output starts)."""
    if log_path is not None:
        try:
            f = open(log_path, "a+b")
        except OSError as e:
            log.warning("cannot append to %s (%s): the output of %s is not kept",
                        log_path, e.strerror, name)
        else:
            _write_marker(f, f"{name}: starting {' '.join(argv)}")
            return f, f.tell()
    return tempfile.TemporaryFile(prefix="fusemirror-"), 0


def _write_marker(f, text: str) -> None:
    try:
        f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {text} ---\n".encode())
        f.flush()
    except OSError:
        pass


def _read_tail(f, start: int, lines: int) -> str:
    """The last `lines` lines written since offset start, as text."""
    try:
        end = os.fstat(f.fileno()).st_size
        begin = max(start, end - _TAIL_BYTES)
        data = os.pread(f.fileno(), end - begin, begin)
    except OSError:
        return ""
    text = data.decode(errors="replace")
    if begin > start:                       # the first line read is cut: drop it
        text = text.partition("\n")[2]
    return "\n".join(text.rstrip("\n").splitlines()[-lines:]) if lines > 0 else ""
