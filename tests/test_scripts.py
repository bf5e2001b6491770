"""Application scripts (fusemirror.scripts): success, failure, timeout and the
escalation to SIGKILL of the whole process group, environment, output, missing
scripts, cancellation, fire-and-forget notifications.

Scripts are small /bin/sh files written in tmp_path. While a test runs, the test
process is a child subreaper (as the controller is), so the orphans of a killed
script become its children and are reaped: "nothing of the group survives" is then
checked the strict way, `os.killpg(pgid, 0)` raising ProcessLookupError, zombies
included. Every script that could outlive its test is bounded by a short timeout,
and any process left over is killed by its pid in teardown.
"""

import functools
import os
import signal

import pytest
import trio

from fusemirror.config import Script
from fusemirror.decide import ScriptFailure
from fusemirror.scripts import (
    ScriptResult,
    group_alive,
    reap_group,
    run_script,
    set_subreaper,
    spawn_notification,
)

ENV = {"FUSEMIRROR_MODULE": "app", "FUSEMIRROR_NODE": "alpha", "FUSEMIRROR_ROLE": "prim"}


@pytest.fixture(autouse=True)
def subreaper():
    assert set_subreaper(True)
    yield
    set_subreaper(False)


@pytest.fixture
def leftovers():
    """Pids a test may leave running on purpose; killed by pid at the end."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass


def script(tmp_path, body: str, name: str = "script", mode: int = 0o755,
           shebang: str = "#!/bin/sh\n") -> str:
    path = tmp_path / name
    path.write_text(shebang + body)
    path.chmod(mode)
    return str(path)


def assert_group_gone(pgid: int) -> None:
    with pytest.raises(ProcessLookupError):
        os.killpg(pgid, 0)


def read_pid(path) -> int:
    return int(open(path).read())


# --- success, failure, output ---------------------------------------------------------

async def test_success_output_and_log(tmp_path):
    log_path = tmp_path / "app.log"
    s = script(tmp_path, "echo hello\necho oops >&2\n", "start_prim")
    r = await run_script(Script(s, timeout=10), env=ENV, log_path=str(log_path))
    assert r.ok and r.returncode == 0 and not r.timed_out
    assert r.output_tail == "hello\noops"
    assert r.detail == "exit 0"
    assert 0 <= r.duration < 5
    text = log_path.read_text()
    assert "start_prim: starting " + s in text
    assert "hello\noops\n" in text
    assert "start_prim: ok" in text.splitlines()[-1]


async def test_failure_gives_exit_status_and_last_line(tmp_path):
    s = script(tmp_path, "echo starting\necho 'cannot bind port 80' >&2\nexit 3\n")
    r = await run_script(s, timeout=10, env=ENV)
    assert not r.ok and r.returncode == 3 and not r.timed_out
    assert r.last_line == "cannot bind port 80"
    assert r.detail == "exit 3: cannot bind port 80"
    assert r.failure("start_prim") == ScriptFailure("start_prim", False,
                                                    "exit 3: cannot bind port 80")


async def test_killed_by_a_signal(tmp_path):
    r = await run_script(script(tmp_path, "kill -KILL $$\n"), timeout=10, env=ENV)
    assert not r.ok and r.returncode == -signal.SIGKILL
    assert r.detail == "killed by SIGKILL"


async def test_environment_working_directory_and_stdin(tmp_path):
    s = script(tmp_path, 'echo "$FUSEMIRROR_MODULE $FUSEMIRROR_NODE $FUSEMIRROR_ROLE"\n'
                         'echo "path=${PATH:+set}"\npwd\ncat\n')
    r = await run_script(s, timeout=10, env=ENV)
    assert r.ok
    assert r.output_tail.splitlines() == ["app alpha prim", "path=set", "/"]


async def test_tail_keeps_only_the_last_lines_of_this_run(tmp_path):
    log_path = str(tmp_path / "app.log")
    first = await run_script(script(tmp_path, "echo first run\n", "a"), timeout=10, env=ENV,
                             log_path=log_path)
    assert first.output_tail == "first run"
    s = script(tmp_path, "for i in $(seq 1 30); do echo line $i; done\n", "b")
    r = await run_script(s, timeout=10, env=ENV, log_path=log_path, tail_lines=3)
    assert r.output_tail == "line 28\nline 29\nline 30"
    r = await run_script(s, timeout=10, env=ENV, log_path=log_path)
    assert r.output_tail.splitlines() == [f"line {i}" for i in range(21, 31)]


async def test_unwritable_log_does_not_stop_the_script(tmp_path):
    s = script(tmp_path, "echo still kept\n")
    r = await run_script(s, timeout=10, env=ENV, log_path=str(tmp_path / "no" / "app.log"))
    assert r.ok and r.output_tail == "still kept"


async def test_background_child_of_a_successful_script_is_left_running(tmp_path, leftovers):
    """start_prim leaves the application running, holding the log file open: the
    script still counts as ended when its own process exits."""
    s = script(tmp_path, f"sleep 30 &\necho $! > {tmp_path}/app.pid\necho started\n")
    with trio.fail_after(5):
        r = await run_script(s, timeout=10, env=ENV, log_path=str(tmp_path / "app.log"))
    app = read_pid(tmp_path / "app.pid")
    leftovers.append(app)
    assert r.ok and r.output_tail == "started"
    os.kill(app, 0)
    assert group_alive(r.pgid)


# --- timeouts ------------------------------------------------------------------------

async def test_timeout_stops_a_script_that_obeys_sigterm_without_waiting_the_grace(tmp_path):
    s = script(tmp_path, "echo working\nsleep 30\n")
    r = await run_script(Script(s, timeout=1), env=ENV, grace=5)
    assert r.timed_out and not r.ok
    assert r.returncode == -signal.SIGTERM
    assert r.detail == "after 1 s, stopped: working"
    assert r.failure("stop_prim") == ScriptFailure("stop_prim", True,
                                                   "after 1 s, stopped: working")
    assert r.duration < 4
    assert_group_gone(r.pgid)


async def test_timeout_escalates_to_sigkill_of_the_whole_group(tmp_path):
    """A script that ignores SIGTERM, and so do its children (an ignored signal is
    inherited): after the grace period everything in its group is killed."""
    s = script(tmp_path, f"trap '' TERM\nsleep 30 &\necho $! > {tmp_path}/child\n"
                         f"sh -c 'sleep 30' &\necho $! > {tmp_path}/child2\nsleep 30\n")
    r = await run_script(s, timeout=1, env=ENV, grace=0.5)
    assert r.timed_out and not r.ok
    assert r.returncode == -signal.SIGKILL
    assert r.detail == "after 1 s, killed"
    assert 1.5 <= r.duration < 6
    assert_group_gone(r.pgid)
    for child in ("child", "child2"):
        with pytest.raises(ProcessLookupError):
            os.kill(read_pid(tmp_path / child), 0)


async def test_cancelled_caller_leaves_nothing_behind(tmp_path):
    s = script(tmp_path, f"trap '' TERM\nsleep 30 &\necho $$ > {tmp_path}/p\n"
                         f"mv {tmp_path}/p {tmp_path}/pid\nsleep 30\n")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(functools.partial(run_script, s, timeout=60, env=ENV,
                                                 grace=0.3))
            while not (tmp_path / "pid").exists():
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    assert_group_gone(read_pid(tmp_path / "pid"))


# --- scripts that cannot run ---------------------------------------------------------

async def test_missing_script(tmp_path):
    r = await run_script(Script(str(tmp_path / "nope")), env=ENV)
    assert r == ScriptResult(False, None, False, 0.0, timeout=60.0,
                             error=f"{tmp_path}/nope does not exist")
    assert r.detail == f"{tmp_path}/nope does not exist"


async def test_not_executable_or_not_a_file(tmp_path):
    r = await run_script(script(tmp_path, "exit 0\n", mode=0o644), timeout=5, env=ENV)
    assert not r.ok and r.error.endswith("is not executable")
    r = await run_script(str(tmp_path), timeout=5, env=ENV)
    assert not r.ok and r.error == f"{tmp_path} is not a file"


async def test_no_shebang(tmp_path):
    r = await run_script(script(tmp_path, "echo hi\n", shebang=""), timeout=5, env=ENV)
    assert not r.ok and r.returncode is None
    assert "#!" in r.detail and r.detail.startswith("cannot execute")


async def test_a_path_needs_a_timeout(tmp_path):
    with pytest.raises(ValueError):
        await run_script(script(tmp_path, "exit 0\n"), env=ENV)


# --- notifications -------------------------------------------------------------------

async def test_notification_is_fire_and_forget(tmp_path):
    s = script(tmp_path, f"sleep 0.2\necho \"$FUSEMIRROR_ROLE\" > {tmp_path}/out\n")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            n = spawn_notification(nursery, s, timeout=5, env=ENV)
            assert not n.done.is_set()               # returned before the script ended
        assert n.done.is_set() and n.result.ok
    assert (tmp_path / "out").read_text() == "prim\n"


async def test_notification_is_bounded_by_its_timeout(tmp_path):
    s = script(tmp_path, "trap '' TERM\nsleep 30\n")
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            n = spawn_notification(nursery, Script(s, timeout=0.2), env=ENV, grace=0.2)
    assert n.result.timed_out and n.result.returncode == -signal.SIGKILL
    assert_group_gone(n.result.pgid)


async def test_notifications_beyond_the_limit_are_dropped(tmp_path):
    s = script(tmp_path, "sleep 0.3\n")
    limiter = trio.CapacityLimiter(1)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            first = spawn_notification(nursery, s, timeout=5, env=ENV, limiter=limiter)
            assert spawn_notification(nursery, s, timeout=5, env=ENV, limiter=limiter) is None
        assert first.result.ok and limiter.borrowed_tokens == 0
        async with trio.open_nursery() as nursery:
            assert spawn_notification(nursery, s, timeout=5, env=ENV, limiter=limiter)


async def test_missing_notification_script_is_only_reported(tmp_path):
    async with trio.open_nursery() as nursery:
        n = spawn_notification(nursery, str(tmp_path / "nope"), timeout=5, env=ENV)
    assert not n.result.ok and n.result.error.endswith("does not exist")


# --- process groups ----------------------------------------------------------------------

async def test_group_alive_and_reap_group(tmp_path, leftovers):
    r = await run_script(script(tmp_path, f"sleep 30 &\necho $! > {tmp_path}/pid\n"),
                         timeout=10, env=ENV)
    child = read_pid(tmp_path / "pid")
    leftovers.append(child)
    assert group_alive(r.pgid)
    os.kill(child, signal.SIGKILL)
    with trio.fail_after(5):
        while group_alive(r.pgid):
            await trio.sleep(0.02)
    os.killpg(r.pgid, 0)                   # a zombie, re-parented to us: still there
    assert reap_group(r.pgid) == 1
    assert_group_gone(r.pgid)
    assert reap_group(r.pgid) == 0
