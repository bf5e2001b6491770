"""The sample application (demo.app) and its load client (demo.client), as real processes.

Everything listens on and connects to 127.0.0.1 only, on ports picked by binding port 0.
Every process a test starts is registered in the `procs` fixture and killed by its pid at
the end, whatever happened; every wait is bounded.
"""

import http.client
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import pytest

from demo.client import acknowledged, longest_outage, outages, read_log

HOST = "127.0.0.1"
TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.02)


class Procs:
    """The processes a test started, each with its stderr in a file."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.started: list[subprocess.Popen] = []

    def spawn(self, module: str, *args, name: str) -> subprocess.Popen:
        err = open(self.tmp_path / f"{name}.{len(self.started)}.stderr", "w+")
        out = open(self.tmp_path / f"{name}.{len(self.started)}.stdout", "w+")
        p = subprocess.Popen([sys.executable, "-m", module, *map(str, args)], cwd=TOP,
                             stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        p.err, p.out = err, out
        self.started.append(p)
        return p

    def kill_all(self) -> None:
        for p in self.started:
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(10)
            p.err.close()
            p.out.close()


def text(f) -> str:
    f.seek(0)
    return f.read()


@pytest.fixture
def procs(tmp_path):
    p = Procs(tmp_path)
    try:
        yield p
    finally:
        p.kill_all()


class App:
    """One run of demo.app on 127.0.0.1."""

    def __init__(self, procs: Procs, folder, port: int | None = None):
        self.procs = procs
        self.folder = folder
        self.port = port or free_port()
        self.pidfile = procs.tmp_path / "app.pid"
        self.proc: subprocess.Popen | None = None

    def start(self, wait: bool = True) -> "App":
        self.proc = self.procs.spawn("demo.app", "--dir", self.folder, "--port", self.port,
                                     "--host", HOST, "--pidfile", self.pidfile, name="app")
        if wait:
            wait_for(lambda: self.pidfile.exists() or self.proc.poll() is not None, 10,
                     "the app's pid file")
            assert self.proc.poll() is None, f"the app exited: {text(self.proc.err)}"
        return self

    def finish(self, timeout: float = 10) -> tuple[int, str]:
        """The exit status and stderr of a run that ends by itself."""
        return self.proc.wait(timeout), text(self.proc.err)

    def stop(self) -> tuple[int, str]:
        os.kill(self.proc.pid, signal.SIGTERM)
        return self.finish()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def request(self, method: str, path: str, body: bytes | None = None):
        conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
        try:
            conn.request(method, path, body)
            answer = conn.getresponse()
            return answer.status, answer.read()
        finally:
            conn.close()

    def get_json(self, path: str):
        status, data = self.request("GET", path)
        assert status == 200, data
        return json.loads(data)

    def post(self, body: bytes) -> int:
        status, data = self.request("POST", "/records", body)
        assert status == 201, data
        return json.loads(data)["id"]


def start_time(stderr: str) -> float:
    m = re.search(rf"^listening on {re.escape(HOST)}:\d+ after (\d+\.\d{{3}}) s$", stderr, re.M)
    assert m, stderr
    return float(m.group(1))


# --- the app -----------------------------------------------------------------------------

def test_app_records_persist_across_restart(procs, tmp_path):
    app = App(procs, tmp_path).start()
    bodies = [json.dumps({"client": "t", "seq": k}).encode() for k in range(1, 6)]
    bodies.append(b"\xff\xfe not utf-8")
    assert [app.post(b) for b in bodies] == [1, 2, 3, 4, 5, 6]
    assert app.get_json("/records/count") == {"count": 6, "max_id": 6}
    assert app.get_json("/records?after=2&limit=2") == [
        {"id": 3, "body": bodies[2].decode()}, {"id": 4, "body": bodies[3].decode()}]
    assert app.get_json("/records?after=5")[0]["body"] == "\ufffd\ufffd not utf-8"
    assert app.request("GET", "/ready") == (200, b"ok\n")
    assert app.request("POST", "/records", b"x" * (64 * 1024 + 1))[0] == 413
    assert app.request("GET", "/nothing")[0] == 404
    assert app.stop()[0] == 0

    app.start()
    assert app.get_json("/records/count") == {"count": 6, "max_id": 6}
    assert [r["body"] for r in app.get_json("/records")][:5] == [b.decode() for b in bodies[:5]]
    assert app.post(b"{}") == 7
    assert app.stop()[0] == 0


def test_app_sigterm_removes_pidfile_and_closes_database(procs, tmp_path):
    app = App(procs, tmp_path).start()
    assert app.pidfile.read_text() == f"{app.proc.pid}\n"
    app.post(b"one")
    status, stderr = app.stop()
    assert status == 0, stderr
    assert not app.pidfile.exists()
    assert not (tmp_path / "records.db-journal").exists()
    assert 0 < start_time(stderr) < 1.0
    assert stderr.count("\n") == 1, stderr


def test_app_refuses_a_database_failing_integrity_check(procs, tmp_path):
    """An index missing rows (made by hiding the index from SQLite while inserting)."""
    con = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
    con.execute("CREATE TABLE records (id INTEGER PRIMARY KEY, body BLOB, created REAL)")
    con.execute("CREATE INDEX records_created ON records(created)")
    con.execute("INSERT INTO records (body, created) VALUES ('a', 1)")
    index = con.execute("SELECT * FROM sqlite_master WHERE name = 'records_created'").fetchone()
    con.execute("PRAGMA writable_schema=ON")
    con.execute("DELETE FROM sqlite_master WHERE name = 'records_created'")
    con.close()
    con = sqlite3.connect(tmp_path / "records.db", isolation_level=None)
    con.execute("INSERT INTO records (body, created) VALUES ('b', 2)")
    con.execute("PRAGMA writable_schema=ON")
    con.execute("INSERT INTO sqlite_master VALUES (?, ?, ?, ?, ?)", index)
    con.close()

    app = App(procs, tmp_path).start(wait=False)
    status, stderr = app.finish()
    assert status == 1
    assert stderr.endswith("\n") and stderr.count("\n") == 1, stderr
    assert "fails integrity_check: row 2 missing from index records_created" in stderr
    assert not app.pidfile.exists()


def test_app_refuses_a_file_that_is_not_a_database(procs, tmp_path):
    (tmp_path / "records.db").write_bytes(b"this is not an SQLite database\n" * 200)
    app = App(procs, tmp_path).start(wait=False)
    status, stderr = app.finish()
    assert status == 1
    assert stderr.count("\n") == 1 and "not a database" in stderr, stderr
    assert not app.pidfile.exists()


def mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True, timeout=10).returncode == 0


def test_app_exits_3_on_a_read_only_folder(procs, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if not mount("-t", "tmpfs", "-o", "ro,size=4m", "tmpfs", str(folder)):
        pytest.skip("cannot mount a tmpfs here")
    try:
        app = App(procs, folder).start(wait=False)               # no database yet
        status, stderr = app.finish()
        assert status == 3 and stderr.count("\n") == 1 and "read-only" in stderr, stderr

        assert mount("-o", "remount,rw", str(folder))           # a database, then read-only
        app = App(procs, folder).start()
        app.post(b"kept")
        assert app.stop()[0] == 0
        assert mount("-o", "remount,ro", str(folder))
        app = App(procs, folder).start(wait=False)
        status, stderr = app.finish()
        assert status == 3 and stderr.count("\n") == 1 and "(EROFS)" in stderr, stderr
        assert not app.pidfile.exists()
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


# --- the client --------------------------------------------------------------------------

def run_client(procs: Procs, url: str, log, *args) -> subprocess.Popen:
    return procs.spawn("demo.client", "--url", url, "--log", log, "--name", "tester", *args,
                       name="client")


def test_client_logs_acknowledged_records_in_order(procs, tmp_path):
    app = App(procs, tmp_path).start()
    log = tmp_path / "client.log"
    client = run_client(procs, app.url, log, "--count", 30, "--interval", 0.005)
    assert client.wait(30) == 0, text(client.err)
    assert re.fullmatch(r"client tester: sent 30, acknowledged 30, failed 0 in \d+\.\d s\n",
                        text(client.out))
    entries = read_log(log)
    acks = acknowledged(entries)
    assert len(entries) == len(acks) == 30
    assert [e["seq"] for e in acks] == list(range(1, 31))
    ids = [e["id"] for e in acks]
    assert ids == sorted(ids) and len(set(ids)) == 30
    assert all(e["sent"] <= e["mono"] for e in acks) and outages(entries) == []
    stored = {r["id"]: json.loads(r["body"]) for r in app.get_json("/records")}
    assert all(stored[e["id"]] == {"client": "tester", "seq": e["seq"]} for e in acks)


def test_client_stops_on_sigterm(procs, tmp_path):
    app = App(procs, tmp_path).start()
    log = tmp_path / "client.log"
    client = run_client(procs, app.url, log, "--interval", 0.01)
    wait_for(lambda: log.exists() and len(read_log(log)) >= 5, 10, "five records")
    os.kill(client.pid, signal.SIGTERM)
    assert client.wait(5) == 0
    sent = len(read_log(log))
    assert f"sent {sent}, acknowledged {sent}, failed 0" in text(client.out)


def test_client_against_nothing_logs_failures_and_stops(procs, tmp_path):
    log = tmp_path / "client.log"
    started = time.monotonic()
    client = run_client(procs, f"http://{HOST}:{free_port()}", log,
                        "--duration", 1, "--interval", 0.05)
    assert client.wait(10) == 0, text(client.err)
    assert time.monotonic() - started < 5
    entries = read_log(log)
    assert entries and acknowledged(entries) == []
    assert all(e["error"] == "Connection refused" for e in entries)
    assert outages(entries) == [] and longest_outage(entries) == 0.0
    assert f"sent {len(entries)}, acknowledged 0, failed {len(entries)}" in text(client.out)


def test_outage_measured_when_the_app_is_killed_and_restarted(procs, tmp_path):
    app = App(procs, tmp_path).start()
    log = tmp_path / "client.log"
    client = run_client(procs, app.url, log, "--interval", 0.01, "--duration", 30)
    wait_for(lambda: log.exists() and len(acknowledged(read_log(log))) >= 20, 10,
             "twenty acknowledged records")
    os.kill(app.proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    app.proc.wait(5)
    time.sleep(0.5)
    restarted = time.monotonic()
    app.pidfile.unlink()              # left behind by the killed app
    app.start()
    up = time.monotonic()
    before = len(acknowledged(read_log(log)))
    wait_for(lambda: len(acknowledged(read_log(log))) >= before + 20, 10,
             "twenty more acknowledged records")
    os.kill(client.pid, signal.SIGTERM)
    assert client.wait(5) == 0

    entries = read_log(log)
    [(start, end)] = outages(entries)
    assert killed - 1.5 < start < killed + 0.5
    assert restarted < end < up + 1.5
    assert longest_outage(entries) == end - start >= 0.5
    acks = acknowledged(entries)
    ids = [e["id"] for e in acks]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    stored = {r["id"]: json.loads(r["body"]) for r in app.get_json("/records?limit=10000")}
    lost = [e for e in acks if stored.get(e["id"]) != {"client": "tester", "seq": e["seq"]}]
    assert not lost, f"acknowledged but not in the database after kill -9: {lost[:5]}"
    assert app.stop()[0] == 0


def test_outages_from_a_log():
    def ok(seq, mono):
        return {"seq": seq, "id": seq, "sent": mono - 0.01, "mono": mono}

    def failed(seq, mono):
        return {"seq": seq, "error": "Connection refused", "sent": mono - 0.01, "mono": mono}

    entries = [failed(1, 1.0), ok(2, 2.0), failed(3, 3.0), failed(4, 4.0), ok(5, 5.5),
               ok(6, 6.0), failed(7, 7.0), ok(8, 8.0), failed(9, 9.0), failed(10, 10.0)]
    assert outages(entries) == [(2.99, 5.5), (6.99, 8.0)]
    assert outages(entries, include_open=True)[-1] == (8.99, 10.0)
    assert longest_outage(entries) == pytest.approx(2.51)
    assert longest_outage(entries, include_open=True) == pytest.approx(2.51)
    assert [e["seq"] for e in acknowledged(entries)] == [2, 5, 6, 8]
    assert longest_outage([]) == 0.0


def test_read_log_skips_a_line_cut_short(tmp_path):
    log = tmp_path / "client.log"
    log.write_text('{"seq":1,"id":1,"sent":0.5,"mono":1.0,"wall":2.0}\n{"seq":2,"id"')
    assert read_log(log) == [{"seq": 1, "id": 1, "sent": 0.5, "mono": 1.0, "wall": 2.0}]
