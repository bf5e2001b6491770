"""A bounded load client for the sample application (demo.app), and the reading of its log.

    python -m demo.client --url http://HOST:PORT --log FILE [--interval 0.02]
                          [--count 100000] [--duration 60] [--name NAME] [--timeout 1]

sends `POST /records` one request after the other, each on a new connection with a time
limit of --timeout seconds, with the body {"client": NAME, "seq": k} for k = 1, 2, ...
and a pause of --interval seconds after each answer. Every outcome is one JSON line
appended to FILE (flushed at once, fsynced at least every second, so a killed client still
leaves its log):

    {"seq": k, "id": ID, "sent": S, "mono": M, "wall": W}       acknowledged (201)
    {"seq": k, "error": "...", "sent": S, "mono": M, "wall": W} refused, timed out, not 201

S is time.monotonic() when the request was sent, M when its outcome was known, W is
time.time() at M. CLOCK_MONOTONIC is system-wide on Linux, so M and S compare with the
monotonic clock of any other process on the machine. A failed request is not repeated: the
next one has the next seq. The client stops after --count requests or --duration seconds,
whichever comes first (a request in progress then may take up to --timeout more), or on
SIGTERM/SIGINT (after the request in progress), and prints
"client NAME: sent N, acknowledged A, failed F in T s" on stdout; it exits 0.

For tests and benchmarks: read_log(path), acknowledged(entries), outages(entries) and
longest_outage(entries).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time
import urllib.parse

FSYNC_EVERY = 1.0           # seconds


def read_log(path: str) -> list[dict]:
    """The entries of a client's log, in order; a line cut short by a kill is skipped."""
    entries = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "seq" in entry:
                entries.append(entry)
    return entries


def acknowledged(entries: list[dict]) -> list[dict]:
    """The entries of acknowledged records (those with an id)."""
    return [e for e in entries if "id" in e]


def outages(entries: list[dict], include_open: bool = False) -> list[tuple[float, float]]:
    """The periods without service, as (start, end) in the monotonic clock.

    A period starts when the first request that failed after a success was sent, and ends
    when the first success after it was acknowledged. Failures before the first success
    (the service was not up yet) are not an outage. Failures at the end with no success
    after them are an open period: left out, or with include_open, ended at the last
    failure's outcome.
    """
    periods = []
    seen_success = False
    start: float | None = None
    last_failure = 0.0
    for e in entries:
        if "id" in e:
            if start is not None:
                periods.append((start, e["mono"]))
                start = None
            seen_success = True
        else:
            last_failure = e["mono"]
            if seen_success and start is None:
                start = e.get("sent", e["mono"])
    if include_open and start is not None:
        periods.append((start, last_failure))
    return periods


def longest_outage(entries: list[dict], include_open: bool = False) -> float:
    """The length in seconds of the longest outage, 0.0 when there was none."""
    return max((end - start for start, end in outages(entries, include_open)), default=0.0)


class Log:
    """The client's log file: one JSON line per outcome, flushed, fsynced now and then."""

    def __init__(self, path: str):
        self._file = open(path, "a", buffering=1)
        self._synced = time.monotonic()

    def write(self, entry: dict) -> None:
        self._file.write(json.dumps(entry, separators=(",", ":")) + "\n")
        if entry["mono"] - self._synced >= FSYNC_EVERY:
            os.fsync(self._file.fileno())
            self._synced = entry["mono"]

    def close(self) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()


def post_record(host: str, port: int, path: str, body: bytes, timeout: float) -> int:
    """POST one record on a new connection; returns its id or raises with the reason."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json"})
        answer = conn.getresponse()
        data = answer.read()
    finally:
        conn.close()
    if answer.status != 201:
        reason = data.decode("utf-8", "replace").strip().splitlines()[:1]
        raise RuntimeError(f"HTTP {answer.status}" + (f": {reason[0]}" if reason else ""))
    try:
        return int(json.loads(data)["id"])
    except (ValueError, KeyError, TypeError):
        raise RuntimeError(f"HTTP 201 without an id: {data[:80]!r}") from None


def describe(error: BaseException) -> str:
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    return " ".join(str(error).split()) or type(error).__name__


def run(url: str, log_path: str, name: str, interval: float, count: int, duration: float,
        timeout: float, stop: threading.Event) -> tuple[int, int]:
    """Send up to `count` records for at most `duration` s; returns (acknowledged, failed)."""
    target = urllib.parse.urlsplit(url)
    if target.scheme != "http" or not target.hostname:
        raise ValueError(f"not an http:// URL: {url}")
    path = target.path.rstrip("/") + "/records"
    deadline = time.monotonic() + duration
    acked = failed = 0
    log = Log(log_path)
    try:
        for seq in range(1, count + 1):
            if stop.is_set() or time.monotonic() >= deadline:
                break
            body = json.dumps({"client": name, "seq": seq}).encode()
            sent = time.monotonic()
            try:
                record_id = post_record(target.hostname, target.port or 80, path, body,
                                        timeout)
                outcome = {"id": record_id}
                acked += 1
            except (OSError, http.client.HTTPException, RuntimeError) as e:
                outcome = {"error": describe(e)}
                failed += 1
            mono = time.monotonic()
            log.write({"seq": seq, **outcome, "sent": sent, "mono": mono, "wall": time.time()})
            stop.wait(min(interval, max(deadline - mono, 0)))
    finally:
        log.close()
    return acked, failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m demo.client",
                                     description="A bounded load client for demo.app.")
    parser.add_argument("--url", required=True, help="http://HOST:PORT of the app")
    parser.add_argument("--log", required=True, help="the JSON-lines log, appended to")
    parser.add_argument("--interval", type=float, default=0.02, help="pause after each answer")
    parser.add_argument("--count", type=int, default=100_000, help="at most this many requests")
    parser.add_argument("--duration", type=float, default=60.0, help="at most this long (s)")
    parser.add_argument("--timeout", type=float, default=1.0, help="time limit per request")
    parser.add_argument("--name", default=f"client-{os.getpid()}")
    args = parser.parse_args(argv)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    start = time.monotonic()
    try:
        acked, failed = run(args.url, args.log, args.name, args.interval, args.count,
                            args.duration, args.timeout, stop)
    except (ValueError, OSError) as e:
        print(f"demo.client: {e}", file=sys.stderr)
        return 1
    print(f"client {args.name}: sent {acked + failed}, acknowledged {acked}, failed {failed} "
          f"in {time.monotonic() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
