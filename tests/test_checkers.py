"""Checkers (fusemirror.checkers): each kind passing and failing, a zombie behind a
pid file, the CheckerSet's intervals and failure counts, and the restart loop guard.

TCP and HTTP checks run against tiny servers started inside the test on 127.0.0.1
with ports chosen by the kernel; nothing leaves loopback. Processes are small
`sleep`s started and reaped by the test. The CheckerSet tests use checks scripted
in memory under trio's autojump clock, so hours of intervals cost no real time
(real checks cannot run under it: waiting for a thread would let the clock jump
past their timeout). RestartGuard is pure: plain numbers in, booleans out.
"""

import functools
import os
import pathlib
import shutil
import signal
import socket
import ssl
import subprocess
import time
import uuid

import pytest
import trio

from fusemirror import config as C
from fusemirror.checkers import (
    Check,
    CheckerSet,
    CheckResult,
    CommandCheck,
    HttpCheck,
    ProcessCheck,
    RestartGuard,
    TcpCheck,
    make_check,
    process_state,
)
from fusemirror.decide import CheckAction, CheckerResult
from fusemirror.scripts import set_subreaper


@pytest.fixture
def sleeper():
    """Start `sleep` processes (argv tail given); all are killed and reaped at the end."""
    procs: list[subprocess.Popen] = []

    def start(*args: str) -> subprocess.Popen:
        p = subprocess.Popen(["sleep", *args])
        procs.append(p)
        # Popen returns once exec has begun; the new command line shows a moment later
        deadline = time.monotonic() + 5
        while not pathlib.Path(f"/proc/{p.pid}/cmdline").read_bytes().startswith(b"sleep"):
            assert time.monotonic() < deadline, "sleep did not start"
            time.sleep(0.001)
        return p

    yield start
    for p in procs:
        p.kill()
        p.wait(5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_state(pid: int, states: str) -> None:
    with trio.fail_after(5):
        while process_state(pid) not in tuple(states):
            await trio.sleep(0.01)


# --- process ---------------------------------------------------------------------------

async def test_pidfile_alive(tmp_path, sleeper):
    p = sleeper("30")
    (tmp_path / "app.pid").write_text(f"{p.pid}\n")
    r = await ProcessCheck(C.ProcessChecker(name="app", pidfile=str(tmp_path / "app.pid"))).check()
    assert r == CheckResult(True, f"process {p.pid} is running")


async def test_pidfile_zombie_is_dead(tmp_path, sleeper):
    """A killed process that nobody reaped is a zombie: kill(pid, 0) still succeeds,
    but it has exited, and the checker says so."""
    p = sleeper("30")
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{p.pid}\n")
    p.send_signal(signal.SIGKILL)
    await wait_state(p.pid, "Z")
    os.kill(p.pid, 0)                                     # "alive" to kill()
    r = await ProcessCheck(C.ProcessChecker(name="app", pidfile=str(pidfile))).check()
    assert r == CheckResult(False, f"process {p.pid} (from {pidfile}) has exited (zombie)")
    p.wait(5)
    r = await ProcessCheck(C.ProcessChecker(name="app", pidfile=str(pidfile))).check()
    assert r == CheckResult(False, f"process {p.pid} (from {pidfile}) is not running")


@pytest.mark.parametrize("content, problem", [
    (None, "does not exist"), ("", "does not hold a pid"), ("abc\n", "does not hold a pid"),
    ("0\n", "does not hold a pid"), ("-5\n", "does not hold a pid")])
async def test_pidfile_unusable(tmp_path, content, problem):
    pidfile = tmp_path / "app.pid"
    if content is not None:
        pidfile.write_text(content)
    r = await ProcessCheck(C.ProcessChecker(name="app", pidfile=str(pidfile))).check()
    assert r == CheckResult(False, f"pid file {pidfile} {problem}")


async def test_pattern(sleeper):
    token = f"{uuid.uuid4().int % 10**9}.5"
    check = ProcessCheck(C.ProcessChecker(name="app", pattern=rf"^sleep {token}$"))
    r = await check.check()
    assert r == CheckResult(False, f"no process matches '^sleep {token}$'")
    p = sleeper(token)
    r = await check.check()
    assert r == CheckResult(True, f"process {p.pid} matches '^sleep {token}$'")
    p.send_signal(signal.SIGKILL)
    await wait_state(p.pid, "Z")                          # not reaped yet
    assert not (await check.check()).ok


def fake_proc(root, processes) -> str:
    """A /proc with {pid: (state, argv)}: only the files the checker reads."""
    for pid, (state, argv) in processes.items():
        d = root / str(pid)
        d.mkdir(parents=True)
        (d / "stat").write_text(f"{pid} (odd) name) {state} 1 {pid} {pid} 0 -1\n")
        (d / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
    (root / "self").mkdir(exist_ok=True)                   # not a pid: ignored
    return str(root)


async def test_pattern_skips_this_process_zombies_and_kernel_threads(tmp_path):
    proc = fake_proc(tmp_path, {os.getpid(): ("S", ["myapp", "--serve"]),
                                101: ("Z", []), 102: ("S", []),
                                103: ("X", ["myapp", "--serve"])})
    check = ProcessCheck(C.ProcessChecker(name="app", pattern="myapp --serve"), proc=proc)
    assert await check.check() == CheckResult(False, "no process matches 'myapp --serve'")
    fake_proc(tmp_path, {104: ("T", ["/usr/bin/myapp", "--serve", "-v"])})
    assert await check.check() == CheckResult(True, "process 104 matches 'myapp --serve'")


async def test_pidfile_states_from_proc(tmp_path):
    proc = fake_proc(tmp_path / "proc", {201: ("D", ["x"]), 202: ("X", ["x"])})
    for pid, ok in ((201, True), (202, False)):
        (tmp_path / "pid").write_text(f"{pid} trailing words\n")
        r = await ProcessCheck(C.ProcessChecker(name="a", pidfile=str(tmp_path / "pid")),
                               proc=proc).check()
        assert r.ok is ok, r


# --- tcp ----------------------------------------------------------------------------------

async def test_tcp_accepted_and_refused():
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    try:
        r = await TcpCheck(C.TcpChecker(name="db", port=port)).check()
        assert r == CheckResult(True, f"127.0.0.1:{port} accepts connections")
    finally:
        for listener in listeners:
            await listener.aclose()
    r = await TcpCheck(C.TcpChecker(name="db", port=port)).check()
    assert r == CheckResult(False, f"cannot connect to 127.0.0.1:{port}: Connection refused")


async def test_tcp_unknown_host():
    r = await TcpCheck(C.TcpChecker(name="db", host="no-such-host.invalid", port=1,
                                    timeout=3)).check()
    assert not r.ok and r.detail.startswith("cannot connect to no-such-host.invalid:1: ")


# --- http ---------------------------------------------------------------------------------

class HttpServer:
    """Answers by path: /ok 200, /down 503, /silent never, /garbage not HTTP,
    /close closes at once. Records each request's head."""

    def __init__(self):
        self.requests: list[bytes] = []

    async def handle(self, stream) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            data = await stream.receive_some(4096)
            if not data:
                return
            head += data
        self.requests.append(head)
        path = head.split(b" ")[1].split(b"?")[0]
        if path == b"/silent":
            await trio.sleep_forever()
        answer = {b"/ok": b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
                  b"/down": b"HTTP/1.1 503 Service Unavailable\r\n\r\n",
                  b"/garbage": b"hello there\r\n",
                  b"/close": b""}.get(path, b"HTTP/1.0 404 Not Found\r\n\r\n")
        await stream.send_all(answer)
        await stream.aclose()

    async def start(self, nursery, ssl_context=None) -> int:
        async def handler(stream):
            if ssl_context is not None:
                stream = trio.SSLStream(stream, ssl_context, server_side=True)
            try:
                await self.handle(stream)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                          host="127.0.0.1"))
        return listeners[0].socket.getsockname()[1]


def http(url: str, **kw) -> HttpCheck:
    return HttpCheck(C.HttpChecker(name="web", url=url, **kw))


async def test_http_status():
    server = HttpServer()
    async with trio.open_nursery() as nursery:
        port = await server.start(nursery)
        base = f"http://127.0.0.1:{port}"
        assert await http(f"{base}/ok?x=1").check() == CheckResult(
            True, f"GET {base}/ok?x=1 answered 200 OK")
        assert await http(f"{base}/down").check() == CheckResult(
            False, f"GET {base}/down answered 503 Service Unavailable, expected 200")
        assert await http(f"{base}/down", expect=503).check() == CheckResult(
            True, f"GET {base}/down answered 503 Service Unavailable")
        assert await http(f"{base}/garbage").check() == CheckResult(
            False, f"GET {base}/garbage: not an HTTP answer")
        assert await http(f"{base}/close").check() == CheckResult(
            False, f"GET {base}/close: no answer")
        assert await http(f"{base}/silent", timeout=0.3).check() == CheckResult(
            False, "no answer within 0.3 s")
        nursery.cancel_scope.cancel()
    assert server.requests[0].split(b"\r\n")[:2] == [b"GET /ok?x=1 HTTP/1.0",
                                                     f"Host: 127.0.0.1:{port}".encode()]


async def test_http_basic_auth_is_sent_and_never_shown():
    server = HttpServer()
    async with trio.open_nursery() as nursery:
        port = await server.start(nursery)
        r = await http(f"http://me:s%40cret@127.0.0.1:{port}/ok").check()
        nursery.cancel_scope.cancel()
    assert r == CheckResult(True, f"GET http://127.0.0.1:{port}/ok answered 200 OK")
    assert b"Authorization: Basic bWU6c0BjcmV0\r\n" in server.requests[0]   # me:s@cret


async def test_http_bad_port_in_url():
    r = await http("http://u:pw@127.0.0.1:99999/x").check()
    assert r == CheckResult(False, "GET http://127.0.0.1/x: the port of the URL is not valid")


async def test_http_refused():
    port = free_port()
    r = await http(f"http://127.0.0.1:{port}/").check()
    assert r == CheckResult(False, f"GET http://127.0.0.1:{port}/: cannot connect: "
                                   f"Connection refused")


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_https_with_a_self_signed_certificate(tmp_path):
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                    "-days", "1", "-subj", "/CN=localhost"],
                   check=True, capture_output=True, timeout=20)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = HttpServer()
    async with trio.open_nursery() as nursery:
        port = await server.start(nursery, context)
        ok = await http(f"https://127.0.0.1:{port}/ok").check()
        down = await http(f"https://127.0.0.1:{port}/down").check()
        plain = await http(f"http://127.0.0.1:{port}/ok", timeout=2).check()
        nursery.cancel_scope.cancel()
    assert ok == CheckResult(True, f"GET https://127.0.0.1:{port}/ok answered 200 OK")
    assert not down.ok and "503" in down.detail
    assert not plain.ok


# --- command --------------------------------------------------------------------------------

def command(*argv: str, **kw) -> CommandCheck:
    grace = kw.pop("grace", 1.0)
    return CommandCheck(C.CommandChecker(name="cmd", argv=argv, **kw), grace=grace)


async def test_command_exit_status():
    assert await command("/bin/true").check() == CheckResult(True, "exit 0")
    assert await command("/bin/false").check() == CheckResult(False, "exit 1")
    r = await command("/bin/sh", "-c", "echo checking; echo 'db down' >&2; exit 2").check()
    assert r == CheckResult(False, "exit 2: db down")


async def test_command_gets_its_environment():
    check = CommandCheck(C.CommandChecker(name="cmd", argv=("/bin/sh", "-c",
                                                              'test "$FUSEMIRROR_ROLE" = prim')),
                         env={"FUSEMIRROR_ROLE": "prim"})
    assert (await check.check()).ok
    assert not (await command("/bin/sh", "-c", 'test "$FUSEMIRROR_ROLE" = prim').check()).ok


async def test_command_missing_program():
    r = await command("/nonexistent/check").check()
    assert r == CheckResult(False, "cannot execute /nonexistent/check: No such file or directory")


async def test_command_timeout_kills_its_process_group(tmp_path):
    assert set_subreaper(True)
    try:
        pidfile = tmp_path / "pid"
        check = command("/bin/sh", "-c", f"trap '' TERM; echo $$ > {pidfile}; sleep 30 & "
                                         f"sleep 30", timeout=0.3, grace=0.3)
        with trio.fail_after(5):
            r = await check.check()
        assert r == CheckResult(False, "no answer within 0.3 s")
        with pytest.raises(ProcessLookupError):
            os.killpg(int(pidfile.read_text()), 0)
    finally:
        set_subreaper(False)


# --- any check -------------------------------------------------------------------------------

class Broken(Check):
    async def _probe(self):
        raise RuntimeError("bug")


class Hangs(Check):
    async def _probe(self):
        await trio.sleep_forever()


def cfg(name="c", **kw) -> C.Checker:
    return C.CommandChecker(name=name, argv=("/bin/true",), **kw)


async def test_a_check_never_raises(autojump_clock):
    assert await Broken(cfg()).check() == CheckResult(False, "checker error: RuntimeError: bug")
    assert await Hangs(cfg(timeout=2.5)).check() == CheckResult(False, "no answer within 2.5 s")


def test_make_check_by_kind():
    assert type(make_check(C.ProcessChecker(name="a", pidfile="/run/a.pid"))) is ProcessCheck
    assert type(make_check(C.TcpChecker(name="b", port=80))) is TcpCheck
    assert type(make_check(C.HttpChecker(name="c", url="http://127.0.0.1/"))) is HttpCheck
    c = make_check(C.CommandChecker(name="d", argv=("/bin/true",)), env={"A": "1"})
    assert type(c) is CommandCheck and c.env == {"A": "1"}


# --- CheckerSet -------------------------------------------------------------------------------

class Scripted(Check):
    """Answers from a list (the last answer repeats), taking `takes` seconds; notes
    when each check started."""

    def __init__(self, config, answers, takes=0.0):
        super().__init__(config)
        self.answers, self.takes, self.started = list(answers), takes, []

    async def _probe(self):
        self.started.append(trio.current_time())
        await trio.sleep(self.takes)
        ok = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        return CheckResult(ok, "fine" if ok else "broken")


async def run_for(checkers: CheckerSet, seconds: float) -> None:
    async with trio.open_nursery() as nursery:
        await nursery.start(checkers.run)
        await trio.sleep(seconds)
        nursery.cancel_scope.cancel()


async def test_each_checker_on_its_own_interval(autojump_clock):
    fast = Scripted(cfg("fast", interval=1.0), [True])
    slow = Scripted(cfg("slow", interval=3.0), [True])
    late = Scripted(cfg("late", interval=1.0, timeout=10.0), [True], takes=2.5)
    t0 = trio.current_time()
    await run_for(CheckerSet([fast, slow, late]), 9.5)
    assert [t - t0 for t in fast.started] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
    assert [t - t0 for t in slow.started] == [0, 3, 6, 9]
    assert [t - t0 for t in late.started] == [0, 2.5, 5.0, 7.5]     # never two at once


async def test_results_and_consecutive_failures(autojump_clock):
    changes = []
    web = Scripted(cfg("web", interval=1.0, action="stopstart"),
                   [True, False, False, False, True, False])
    db = Scripted(cfg("db", interval=10.0), [True])
    checkers = CheckerSet([web, db], on_change=changes.append)
    assert checkers.views() == ()
    assert checkers.statuses["web"].ok is None

    async with trio.open_nursery() as nursery:
        await nursery.start(checkers.run)
        with trio.fail_after(1):
            await checkers.wait_all_checked()
        assert checkers.views() == (CheckerResult("web", True, CheckAction.STOPSTART, "fine"),
                                    CheckerResult("db", True, CheckAction.RESTART, "fine"))
        await trio.sleep(3.5)                        # web: ok, fail, fail, fail
        assert checkers.failures("web") == 3 and checkers.failures("db") == 0
        assert checkers.views()[0] == CheckerResult("web", False, CheckAction.STOPSTART,
                                                    "broken")
        assert checkers.views(min_failures=3)[0].ok is False
        assert checkers.views(min_failures=4)[0].ok is True
        status = checkers.statuses["web"]
        assert status.checks == 4 and status.checked_at == pytest.approx(trio.current_time() - 0.5)
        await trio.sleep(1)                          # web: ok again
        assert checkers.failures("web") == 0
        await trio.sleep(1)                          # web: fails again
        assert checkers.failures("web") == 1
        nursery.cancel_scope.cancel()
    assert [(s.ok, s.failures) for s in changes if s.name == "db"] == [(True, 0)]
    assert [(s.ok, s.failures) for s in changes if s.name == "web"] == [
        (True, 0), (False, 1), (False, 2), (False, 3), (True, 0), (False, 1)]


async def test_run_starts_afresh(autojump_clock):
    web = Scripted(cfg("web", interval=1.0), [False])
    checkers = CheckerSet([web])
    await run_for(checkers, 2.5)
    assert checkers.failures("web") == 3
    async with trio.open_nursery() as nursery:
        await nursery.start(checkers.run)
        assert checkers.statuses["web"].result is None and checkers.failures("web") == 0
        await checkers.wait_all_checked()
        assert checkers.failures("web") == 1
        nursery.cancel_scope.cancel()


async def test_empty_set_and_duplicate_names(autojump_clock):
    checkers = CheckerSet([])
    await checkers.wait_all_checked()
    await run_for(checkers, 1)
    with pytest.raises(ValueError):
        CheckerSet([Scripted(cfg("a"), [True]), Scripted(cfg("a"), [True])])


async def test_from_config_runs_real_checks(tmp_path):
    (tmp_path / "pid").write_text(f"{os.getpid()}\n")
    checkers = CheckerSet.from_config([
        C.ProcessChecker(name="me", pidfile=str(tmp_path / "pid"), interval=0.1),
        C.CommandChecker(name="true", argv=("/bin/true",), interval=0.1),
        C.TcpChecker(name="closed", port=free_port(), interval=0.1, action="wait")])
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(checkers.run)
            await checkers.wait_all_checked()
            nursery.cancel_scope.cancel()
    assert [(v.name, v.ok, v.action) for v in checkers.views()] == [
        ("me", True, CheckAction.RESTART), ("true", True, CheckAction.RESTART),
        ("closed", False, CheckAction.WAIT)]


# --- RestartGuard --------------------------------------------------------------------------------

def test_restart_guard_window():
    guard = RestartGuard(limit=3, window=100.0)
    assert not guard.exceeded(0) and guard.count(0) == 0
    for t in (0.0, 10.0, 20.0):
        assert not guard.exceeded(t)
        guard.note_restart(t)
    assert guard.count(20) == 3 and guard.exceeded(20)
    assert guard.exceeded(99.9)
    assert guard.count(100.0) == 2 and not guard.exceeded(100.0)   # the first left the window
    guard.note_restart(100.0)
    assert guard.exceeded(100.0)
    assert guard.count(200.0) == 0
    guard.note_restart(300.0)
    guard.reset()
    assert guard.count(300.0) == 0


def test_restart_guard_limits():
    never = RestartGuard(limit=0, window=10.0)
    assert never.exceeded(0)
    never.note_restart(0)
    assert never.count(0) == 0 and never.exceeded(1000)
    once = RestartGuard(limit=1, window=10.0)
    once.note_restart(5)
    assert once.exceeded(14.9) and not once.exceeded(15)
    with pytest.raises(ValueError):
        RestartGuard(limit=-1)
    with pytest.raises(ValueError):
        RestartGuard(window=0)


def test_restart_guard_from_config_defaults_to_three_a_day():
    guard = RestartGuard.from_config(C.RestartGuard())
    assert (guard.limit, guard.window) == (3, 86400.0)
    for t in (0, 3600, 7200):
        guard.note_restart(t)
    assert guard.exceeded(86399) and not guard.exceeded(86400)
