"""The sample application: an HTTP service keeping records in SQLite in a replicated folder.

    python -m demo.app --dir DIR --port PORT [--host 0.0.0.0] [--pidfile FILE]

(from the repository's top directory, or with it on PYTHONPATH). The database is
DIR/records.db, in the default rollback-journal mode (journal_mode=DELETE) with
synchronous=FULL; each record is inserted in its own transaction, committed before it is
acknowledged.

    POST /records              body of at most 64 KiB, any bytes -> 201 {"id": ID}
    GET  /records/count        -> {"count": N, "max_id": M}   (max_id 0 when empty)
    GET  /records?after=ID&limit=N
                               -> [{"id": ID, "body": TEXT}, ...] in id order, after ID
                                  (default 0), at most N (default 1000, at most 10000);
                                  TEXT is the body decoded as UTF-8, errors replaced
    GET  /ready                -> 200 "ok" when the database answers a query, else 503

Nothing that was not committed is ever answered with 2xx: a failed transaction is answered
503 with a one-line reason. At start the table is created if missing and the database must
pass `PRAGMA integrity_check`; once listening, the app writes the pid file (atomically) and
logs "listening on HOST:PORT after X.XXX s" on stderr, X being the age of the process (the
interpreter's start included). SIGTERM or SIGINT stop it: it stops listening, closes the
database, removes the pid file and exits 0.

Exit status: 0 stopped by SIGTERM/SIGINT; 1 cannot start (database unusable or failing
integrity_check, address in use, pid file not writable); 2 bad command line; 3 the folder is
read-only (EROFS), as a replica's is. Failures are one line on stderr.

A start script (start_prim), as /bin/sh. In a non-interactive shell a background command
stays in the shell's process group, so `setsid` does not fork and `$!` is the app's pid.
The app's output must go to a file: a background process holding the script's stdout would
keep the controller waiting for the end of that output.

    PIDFILE=/run/demo-app.pid LOG=/var/log/demo-app.log
    rm -f "$PIDFILE"
    cd /opt/fusemirror
    setsid .venv/bin/python -m demo.app --dir /srv/app --port 8080 --pidfile "$PIDFILE" \\
        </dev/null >>"$LOG" 2>&1 &
    pid=$! i=0
    while [ ! -e "$PIDFILE" ]; do
        if ! kill -0 "$pid" 2>/dev/null; then     # exited: say why, with its status
            wait "$pid"; status=$?; tail -n 1 "$LOG"; exit "$status"
        fi
        i=$((i + 1))
        if [ "$i" -gt 100 ]; then
            echo "demo app not listening after 10 s"; kill -KILL "$pid"; exit 1
        fi
        sleep 0.1
    done

A stop script (stop_prim): SIGTERM, wait until the pid file is gone (the app removes it
after closing the database) or the process has exited, then SIGKILL.

    PIDFILE=/run/demo-app.pid
    [ -e "$PIDFILE" ] || exit 0
    pid=$(cat "$PIDFILE")
    kill -TERM "$pid" 2>/dev/null || { rm -f "$PIDFILE"; exit 0; }
    i=0
    while [ -e "$PIDFILE" ] && kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
        sleep 0.1; i=$((i + 1))
    done
    if [ -e "$PIDFILE" ]; then kill -KILL "$pid" 2>/dev/null; rm -f "$PIDFILE"; fi
"""

from __future__ import annotations

import argparse
import errno
import http.server
import json
import os
import signal
import socket
import socketserver
import sqlite3
import sys
import threading
import time
import urllib.parse

DB_NAME = "records.db"
SYNCHRONOUS = "FULL"       # fsync the journal and the database at every commit
MAX_BODY = 64 * 1024
DEFAULT_LIMIT, MAX_LIMIT = 1000, 10_000
EXIT_FAILED, EXIT_USAGE, EXIT_READ_ONLY = 1, 2, 3
SQLITE_READONLY = 8
STARTED = time.monotonic()


class StartupError(Exception):
    """The app cannot start; the message is the one line shown, `code` the exit status."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(message)
        self.code = code


class Unavailable(Exception):
    """The database is closed (the app is stopping)."""


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    name = getattr(error, "sqlite_errorname", None)     # which I/O error: SQLITE_IOERR_FSYNC...
    return f"{text} ({name})" if name and name not in ("SQLITE_ERROR", "SQLITE_OK") else text


class Records:
    """The database: one connection, used under a lock, each insert a durable transaction."""

    def __init__(self, con: sqlite3.Connection):
        self._con: sqlite3.Connection | None = con
        self._lock = threading.Lock()

    def insert(self, body: bytes) -> int:
        with self._lock:
            con = self._connection()
            try:
                con.execute("BEGIN IMMEDIATE")
                rowid = con.execute("INSERT INTO records (body, created) VALUES (?, ?)",
                                    (body, time.time())).lastrowid
                con.execute("COMMIT")
            except sqlite3.Error:
                if con.in_transaction:
                    try:
                        con.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                raise
            return rowid

    def count(self) -> tuple[int, int]:
        with self._lock:
            return self._connection().execute(
                "SELECT count(*), coalesce(max(id), 0) FROM records").fetchone()

    def after(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        with self._lock:
            return self._connection().execute(
                "SELECT id, body FROM records WHERE id > ? ORDER BY id LIMIT ?",
                (after, limit)).fetchall()

    def ready(self) -> bool:
        try:
            with self._lock:
                self._connection().execute("SELECT 1 FROM records LIMIT 1").fetchall()
            return True
        except (sqlite3.Error, Unavailable):
            return False

    def close(self) -> None:
        with self._lock:
            if self._con is not None:
                self._con.close()
                self._con = None

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            raise Unavailable("the database is closed")
        return self._con


def open_records(folder: str) -> Records:
    """Open (or create) DIR/records.db and check it; raises StartupError."""
    path = os.path.join(folder, DB_NAME)
    try:        # sqlite would quietly open a read-only folder's database read-only
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644))
    except OSError as e:
        if e.errno == errno.EROFS:
            raise StartupError(f"{folder} is read-only (EROFS): this node is not the "
                               f"primary", EXIT_READ_ONLY) from None
        raise StartupError(f"cannot open {path}: {e.strerror}") from None
    con = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5.0)
    try:
        con.execute("PRAGMA journal_mode=DELETE")
        con.execute(f"PRAGMA synchronous={SYNCHRONOUS}")
        problems = [row[0] for row in con.execute("PRAGMA integrity_check")]
        if problems != ["ok"]:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StartupError(f"{path} fails integrity_check: {problems[0]}{more}")
        con.execute("CREATE TABLE IF NOT EXISTS records "
                    "(id INTEGER PRIMARY KEY, body BLOB, created REAL)")
    except sqlite3.Error as e:
        con.close()
        if getattr(e, "sqlite_errorcode", 0) & 0xFF == SQLITE_READONLY:
            raise StartupError(f"{path} is read-only: {one_line(e)}", EXIT_READ_ONLY) from None
        raise StartupError(f"cannot use {path}: {one_line(e)}") from None
    except StartupError:
        con.close()
        raise
    return Records(con)


class Handler(http.server.BaseHTTPRequestHandler):
    """HTTP/1.0, one request per connection."""

    server_version = "demo-app"
    timeout = 10        # seconds a client may take to send its request

    def do_GET(self) -> None:
        url = urllib.parse.urlsplit(self.path)
        records: Records = self.server.records
        try:
            if url.path == "/ready":
                ok = records.ready()
                self.send_text(200 if ok else 503, "ok" if ok else "database unavailable")
            elif url.path == "/records/count":
                count, max_id = records.count()
                self.send_json(200, {"count": count, "max_id": max_id})
            elif url.path == "/records":
                query = urllib.parse.parse_qs(url.query)
                after = int(query.get("after", ["0"])[0])
                limit = min(max(int(query.get("limit", [str(DEFAULT_LIMIT)])[0]), 0), MAX_LIMIT)
                rows = records.after(after, limit)
                self.send_json(200, [{"id": i, "body": bytes(b or b"").decode("utf-8", "replace")}
                                     for i, b in rows])
            else:
                self.send_text(404, f"no such resource: {url.path}")
        except ValueError:
            self.send_text(400, "after and limit must be integers")
        except (sqlite3.Error, Unavailable) as e:
            self.send_text(503, one_line(e))

    def do_POST(self) -> None:
        if urllib.parse.urlsplit(self.path).path != "/records":
            self.send_text(404, f"no such resource: {self.path}")
            return
        try:
            length = int(self.headers["Content-Length"])
        except (TypeError, ValueError):
            self.send_text(411, "a Content-Length is required")
            return
        if not 0 <= length <= MAX_BODY:
            self.send_text(413, f"the body must be at most {MAX_BODY} bytes")
            return
        body = self.rfile.read(length)
        if len(body) != length:
            self.send_text(400, "the body is shorter than its Content-Length")
            return
        try:
            record_id = self.server.records.insert(body)
        except (sqlite3.Error, Unavailable) as e:
            self.send_text(503, f"not recorded: {one_line(e)}")
            return
        self.send_json(201, {"id": record_id})

    def send_json(self, status: int, value) -> None:
        self.send_body(status, json.dumps(value).encode(), "application/json")

    def send_text(self, status: int, text: str) -> None:
        self.send_body(status, f"{text}\n".encode(), "text/plain; charset=utf-8")

    def send_body(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args) -> None:
        pass            # no log line per request


class Server(http.server.ThreadingHTTPServer):
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], records: Records):
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        self.records = records
        super().__init__(address, Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host's name (getfqdn), which can take seconds.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


def process_age() -> float:
    """Seconds since this process started (10 ms resolution), else since this module ran."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        if 0 <= age < 3600:
            return age
    except (OSError, ValueError, IndexError):
        pass
    return time.monotonic() - STARTED


def write_pidfile(path: str) -> None:
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def remove_pidfile(path: str) -> None:
    """Remove the pid file if it is still ours."""
    try:
        with open(path) as f:
            if f.read().strip() == str(os.getpid()):
                os.unlink(path)
    except OSError:
        pass


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m demo.app",
                                     description="The sample application of the demo.")
    parser.add_argument("--dir", required=True, help="the folder holding records.db")
    parser.add_argument("--port", required=True, type=int)
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--pidfile", help="written once listening, removed at exit")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        records = open_records(args.dir)
    except StartupError as e:
        print(f"demo.app: {e}", file=sys.stderr)
        return e.code
    try:
        server = Server((args.host, args.port), records)
    except OSError as e:
        records.close()
        print(f"demo.app: cannot listen on {args.host}:{args.port}: {e.strerror}",
              file=sys.stderr)
        return EXIT_FAILED
    serving = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                               name="http", daemon=True)
    serving.start()
    status = 0
    try:
        if args.pidfile:
            write_pidfile(args.pidfile)
        print(f"listening on {args.host}:{args.port} after {process_age():.3f} s",
              file=sys.stderr, flush=True)
        while not stop.wait(1.0):
            pass
    except OSError as e:
        print(f"demo.app: cannot write the pid file {args.pidfile}: {e.strerror}",
              file=sys.stderr)
        status = EXIT_FAILED
    finally:
        server.shutdown()
        server.server_close()
        records.close()         # waits for the transaction in progress, if any
        if args.pidfile:
            remove_pidfile(args.pidfile)
    return status


if __name__ == "__main__":
    sys.exit(main())
