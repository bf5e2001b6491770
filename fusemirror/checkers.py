"""Checkers: is the application healthy where it runs? And the restart loop guard.

One class per kind of `[[checker]]` (config.py): ProcessCheck, TcpCheck, HttpCheck,
CommandCheck. `await check.check()` returns a CheckResult(ok, detail) and never
raises (but Cancelled); `detail` is a clause for the controller's reason sentence
("connection to 127.0.0.1:8080 refused"). A check that has not answered within the
checker's timeout has failed.

CheckerSet runs every checker, each on its own interval (start to start), and keeps
the latest result and the number of consecutive failures of each; `views()` gives
them to the pure decide() as decide.CheckerResult. The controller runs it only
where the application runs, in a cancel scope of its own, and `run` starts afresh
each time.

RestartGuard is pure: it counts the local restarts within a sliding window
("3 restarts within 24 h, then the next failure fails over").
"""

from __future__ import annotations

import base64
import collections
import logging
import os
import re
import ssl
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace

import trio

from . import config as C
from .decide import CheckAction, CheckerResult
from .scripts import run_command

log = logging.getLogger(__name__)

PROC = "/proc"
COMMAND_GRACE = 1.0          # a timed-out command checker: SIGTERM, this long, SIGKILL
_STATUS_LINE_MAX = 8192      # an HTTP status line longer than this is not one


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    detail: str = ""


def _why(e: BaseException) -> str:
    """The operating system's words for a failure, without trio's wrapping."""
    if isinstance(e, OSError) and isinstance(e.errno, int) and e.errno > 0:
        return os.strerror(e.errno)             # trio adds the address to strerror
    if isinstance(e, OSError) and e.strerror:
        return e.strerror                       # socket.gaierror
    cause = e.__cause__
    if isinstance(cause, BaseExceptionGroup):
        return ", ".join(dict.fromkeys(_why(x) for x in cause.exceptions))
    if cause is not None:
        return _why(cause)
    return str(e) or type(e).__name__


# --- the checks ------------------------------------------------------------------------

class Check:
    """One configured checker. Subclasses implement `_probe()`."""

    def __init__(self, config: C.Checker):
        self.config = config

    @property
    def name(self) -> str:
        return self.config.name

    def _bound(self) -> float:
        return self.config.timeout

    async def check(self) -> CheckResult:
        try:
            with trio.move_on_after(self._bound()):
                return await self._probe()
            return CheckResult(False, f"no answer within {self.config.timeout:g} s")
        except Exception as e:      # a checker never takes the controller down
            log.debug("checker %s raised", self.name, exc_info=True)
            return CheckResult(False, f"checker error: {type(e).__name__}: {e}")

    async def _probe(self) -> CheckResult:
        raise NotImplementedError


class ProcessCheck(Check):
    """pidfile: the process whose pid the file holds is alive (a zombie is not: it has
    exited, and on some machines nothing ever reaps it). pattern: some
    process's command line, arguments joined by spaces, matches (like `pgrep -f`;
    this process excluded)."""

    config: C.ProcessChecker

    def __init__(self, config: C.ProcessChecker, *, proc: str = PROC):
        super().__init__(config)
        self.proc = proc                        # where /proc is (tests give another)
        self._regex = re.compile(config.pattern) if config.pattern is not None else None

    async def _probe(self) -> CheckResult:
        probe = self._by_pidfile if self._regex is None else self._by_pattern
        return await trio.to_thread.run_sync(probe, abandon_on_cancel=True)

    def _by_pidfile(self) -> CheckResult:
        path = self.config.pidfile
        try:
            with open(path, "rb") as f:
                words = f.read(64).split()
        except FileNotFoundError:
            return CheckResult(False, f"pid file {path} does not exist")
        except OSError as e:
            return CheckResult(False, f"cannot read pid file {path}: {e.strerror}")
        if not words or not words[0].isdigit() or int(words[0]) <= 0:
            return CheckResult(False, f"pid file {path} does not hold a pid")
        pid = int(words[0])
        state = process_state(pid, self.proc)
        if state is None:
            return CheckResult(False, f"process {pid} (from {path}) is not running")
        if state in "ZX":
            return CheckResult(False, f"process {pid} (from {path}) has exited (zombie)")
        return CheckResult(True, f"process {pid} is running")

    def _by_pattern(self) -> CheckResult:
        me = os.getpid()
        for entry in os.scandir(self.proc):
            if not entry.name.isdigit() or int(entry.name) == me:
                continue
            try:
                with open(os.path.join(self.proc, entry.name, "cmdline"), "rb") as f:
                    raw = f.read()
            except OSError:
                continue                        # gone meanwhile
            if not raw:
                continue        # a kernel thread, a zombie, or a process in exec
            line = raw.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace")
            if self._regex.search(line) and process_state(int(entry.name),
                                                          self.proc) not in (None, "Z", "X"):
                return CheckResult(True, f"process {entry.name} matches "
                                         f"{self.config.pattern!r}")
        return CheckResult(False, f"no process matches {self.config.pattern!r}")


def process_state(pid: int, proc: str = PROC) -> str | None:
    """The state letter of /proc/PID/stat (R, S, D, Z, T, ...), None if no such pid."""
    try:
        with open(os.path.join(proc, str(pid), "stat"), "rb") as f:
            data = f.read()
    except OSError:
        return None
    rest = data[data.rfind(b")") + 2:]            # the command name may hold ") "
    return rest[:1].decode() or None


class TcpCheck(Check):
    """A TCP connection to host:port is accepted (then closed at once)."""

    config: C.TcpChecker

    async def _probe(self) -> CheckResult:
        where = f"{self.config.host}:{self.config.port}"
        try:
            stream = await trio.open_tcp_stream(self.config.host, self.config.port)
        except OSError as e:
            return CheckResult(False, f"cannot connect to {where}: {_why(e)}")
        await trio.aclose_forcefully(stream)
        return CheckResult(True, f"{where} accepts connections")


class HttpCheck(Check):
    """A GET of the URL answers with the expected status. A minimal HTTP/1.0 client:
    one request, `Connection: close`, only the status line is read. For https the
    certificate is not verified: the check asks whether the application answers,
    not who it is (a local service rarely has a certificate for 127.0.0.1)."""

    config: C.HttpChecker

    def __init__(self, config: C.HttpChecker):
        super().__init__(config)
        u = urllib.parse.urlsplit(config.url)
        self._tls = u.scheme == "https"
        self._host = u.hostname or ""
        self._problem = None
        try:
            port = u.port
        except ValueError:                      # config.py does not check the port
            port, self._problem = None, "the port of the URL is not valid"
        self._port = port or (443 if self._tls else 80)
        target = (u.path or "/") + (f"?{u.query}" if u.query else "")
        host = f"[{self._host}]" if ":" in self._host else self._host
        if port:
            host += f":{port}"
        head = [f"GET {target} HTTP/1.0", f"Host: {host}", "User-Agent: fusemirror-checker",
                "Accept: */*", "Connection: close"]
        if u.username is not None:
            creds = (f"{urllib.parse.unquote(u.username)}:"
                     f"{urllib.parse.unquote(u.password or '')}")
            head.append(f"Authorization: Basic {base64.b64encode(creds.encode()).decode()}")
        self._request = ("\r\n".join(head) + "\r\n\r\n").encode()
        self._shown = urllib.parse.urlunsplit(u._replace(netloc=host))   # no password
        self._ssl = None
        if self._tls:
            self._ssl = ssl.create_default_context()
            self._ssl.check_hostname = False
            self._ssl.verify_mode = ssl.CERT_NONE

    async def _probe(self) -> CheckResult:
        if self._problem:
            return CheckResult(False, f"GET {self._shown}: {self._problem}")
        try:
            stream = await trio.open_tcp_stream(self._host, self._port)
        except OSError as e:
            return CheckResult(False, f"GET {self._shown}: cannot connect: {_why(e)}")
        try:
            if self._ssl is not None:
                stream = trio.SSLStream(stream, self._ssl, server_hostname=self._host)
                await stream.do_handshake()
            await stream.send_all(self._request)
            answer = b""
            while b"\r\n" not in answer and len(answer) < _STATUS_LINE_MAX:
                data = await stream.receive_some(4096)
                if not data:
                    break
                answer += data
        except (OSError, trio.BrokenResourceError) as e:
            return CheckResult(False, f"GET {self._shown}: {_why(e)}")
        finally:
            await trio.aclose_forcefully(stream)
        line = answer.split(b"\r\n", 1)[0]
        m = re.fullmatch(rb"HTTP/\d(?:\.\d)? (\d{3})(?: (.*))?", line)
        if not m:
            what = "no answer" if not answer else "not an HTTP answer"
            return CheckResult(False, f"GET {self._shown}: {what}")
        status, words = int(m[1]), (m[2] or b"").decode(errors="replace").strip()
        said = f"{status} {words}".strip()
        if status != self.config.expect:
            return CheckResult(False, f"GET {self._shown} answered {said}, "
                                      f"expected {self.config.expect}")
        return CheckResult(True, f"GET {self._shown} answered {said}")


class CommandCheck(Check):
    """The program exits with 0 within the timeout. It runs like a script (own process
    group, output kept, scripts.run_command); past the timeout its whole group gets
    SIGTERM, then SIGKILL after `grace` seconds."""

    config: C.CommandChecker

    def __init__(self, config: C.CommandChecker, *, env: Mapping[str, str] | None = None,
                 grace: float = COMMAND_GRACE):
        super().__init__(config)
        self.env, self.grace = env, grace

    def _bound(self) -> float:
        return self.config.timeout + self.grace + 10.0   # run_command enforces the timeout

    async def _probe(self) -> CheckResult:
        r = await run_command(self.config.argv, timeout=self.config.timeout, env=self.env,
                              grace=self.grace, name=f"checker {self.name}", tail_lines=1)
        if r.timed_out:
            return CheckResult(False, f"no answer within {self.config.timeout:g} s")
        return CheckResult(r.ok, r.detail)


_KINDS: dict[type, type[Check]] = {C.ProcessChecker: ProcessCheck, C.TcpChecker: TcpCheck,
                                   C.HttpChecker: HttpCheck, C.CommandChecker: CommandCheck}


def make_check(config: C.Checker, *, env: Mapping[str, str] | None = None) -> Check:
    """The Check for one [[checker]] entry; `env` goes to command checkers."""
    cls = _KINDS[type(config)]
    return cls(config, env=env) if cls is CommandCheck else cls(config)


# --- running them all ------------------------------------------------------------------

@dataclass(frozen=True)
class CheckerStatus:
    name: str
    action: str
    result: CheckResult | None = None    # None until the first check has ended
    failures: int = 0                    # consecutive failures; 0 after a success
    checks: int = 0                      # checks ended since run() started
    checked_at: float | None = None      # trio.current_time() of the last result

    @property
    def ok(self) -> bool | None:
        return None if self.result is None else self.result.ok


class CheckerSet:
    """Runs every check on its own interval. `on_change(status)` is called after
    every result that fails or differs from the previous one (a way to wake the
    controller's loop); it must not block."""

    def __init__(self, checks: Iterable[Check],
                 on_change: Callable[[CheckerStatus], None] | None = None):
        self.checks = tuple(checks)
        names = [c.name for c in self.checks]
        if len(set(names)) != len(names):
            raise ValueError("checker names must differ")
        self._on_change = on_change
        self._status: dict[str, CheckerStatus] = {}
        self._all_checked = trio.Event()
        self.reset()

    @classmethod
    def from_config(cls, configs: Iterable[C.Checker], *, env: Mapping[str, str] | None = None,
                    on_change: Callable[[CheckerStatus], None] | None = None) -> CheckerSet:
        return cls([make_check(c, env=env) for c in configs], on_change)

    # -- what the controller reads -----------------------------------------------

    @property
    def statuses(self) -> dict[str, CheckerStatus]:
        """Every checker's latest status, in configuration order."""
        return dict(self._status)

    def failures(self, name: str) -> int:
        return self._status[name].failures

    def views(self, min_failures: int = 1) -> tuple[CheckerResult, ...]:
        """The checkers for decide.View: those checked at least once; a checker is
        failed once it has failed `min_failures` times in a row."""
        return tuple(CheckerResult(s.name, s.failures < min_failures, CheckAction(s.action),
                                   s.result.detail)
                     for s in self._status.values() if s.result is not None)

    async def wait_all_checked(self) -> None:
        """Until every checker has a result (since the last reset)."""
        await self._all_checked.wait()

    def reset(self) -> None:
        """Forget every result (after the application was restarted, say)."""
        self._status = {c.name: CheckerStatus(c.name, c.config.action) for c in self.checks}
        if self._all_checked.is_set():
            self._all_checked = trio.Event()
        if not self.checks:
            self._all_checked.set()

    # -- running ---------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Check until cancelled; every checker's first check starts at once."""
        self.reset()
        async with trio.open_nursery() as nursery:
            for c in self.checks:
                nursery.start_soon(self._run_one, c, name=f"checker {c.name}")
            task_status.started()

    async def _run_one(self, check: Check) -> None:
        deadline = trio.current_time()
        while True:
            result = await check.check()
            self._record(check, result)
            deadline = max(deadline + check.config.interval, trio.current_time())
            await trio.sleep_until(deadline)

    def _record(self, check: Check, result: CheckResult) -> None:
        old = self._status[check.name]
        new = replace(old, result=result, checks=old.checks + 1,
                      failures=0 if result.ok else old.failures + 1,
                      checked_at=trio.current_time())
        self._status[check.name] = new
        if result.ok != old.ok:
            if not result.ok:
                log.warning("checker %s failed: %s", check.name, result.detail)
            elif old.ok is False:
                log.info("checker %s ok again after %d failure(s): %s", check.name,
                         old.failures, result.detail)
            else:
                log.info("checker %s ok: %s", check.name, result.detail)
        if all(s.result is not None for s in self._status.values()):
            self._all_checked.set()
        if self._on_change is not None and (not result.ok or result.ok != old.ok):
            self._on_change(new)


# --- the restart loop guard ---------------------------------------------------------------

class RestartGuard:
    """Counts the application's local restarts within a sliding window: a restart
    noted at t counts while now - t < window. Once `limit` restarts count,
    `exceeded(now)`: the next failure fails over instead of restarting. Pure: the
    caller passes the time (trio.current_time() in the controller). Only the last
    `limit` restarts are kept; the count is not persisted across controller starts."""

    def __init__(self, limit: int = C.RestartGuard.limit,
                 window: float = C.RestartGuard.window):
        if limit < 0 or window <= 0:
            raise ValueError("the restart guard needs limit >= 0 and window > 0")
        self.limit, self.window = limit, window
        self._times: collections.deque[float] = collections.deque(maxlen=limit)

    @classmethod
    def from_config(cls, config: C.RestartGuard) -> RestartGuard:
        return cls(config.limit, config.window)

    def note_restart(self, now: float) -> None:
        self._times.append(now)

    def count(self, now: float) -> int:
        """Restarts within the window (at most `limit`): decide.View.restarts_in_window."""
        return sum(1 for t in self._times if now - t < self.window)

    def exceeded(self, now: float) -> bool:
        return self.count(now) >= self.limit

    def reset(self) -> None:
        self._times.clear()
