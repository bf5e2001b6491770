"""The monitoring endpoint (fusemirror.httpd) and the metrics text (fusemirror.metrics).

The metrics tests are pure: a Page in, text out, read back by parse_exposition(),
a strict parser of the Prometheus text format (0.0.4) written here from the
format's description, independently of metrics.py.

The server tests run httpd.serve on 127.0.0.1, port 0, in a nursery the test
cancels, and talk to it over real sockets with raw bytes, so every status line and
header is checked as a client sees it. Every wait is bounded by trio.fail_after;
the slow-client tests shorten the request timeout through serve()'s parameter.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import socket
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import trio

from fusemirror import httpd
from fusemirror.errors import BAD_CONFIG, Failure
from fusemirror.metrics import CONTENT_TYPE, DEFAULT_BUCKETS, Histogram, Page, format_value

# --- a strict reader of the text format -----------------------------------------

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_NUMBER = re.compile(r"[+-]?(Inf|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?)|NaN")
_SAMPLE = re.compile(rf"({_NAME})(\{{.*\}})? (\S+)")
_SUFFIXES = {"counter": [""], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}


class Malformed(AssertionError):
    pass


def parse_labels(text: str) -> dict[str, str]:
    """'{a="x",b="y\\n"}' -> {"a": "x", "b": "y\n"}; only \\\\, \\" and \\n escapes."""
    labels: dict[str, str] = {}
    pos = 1
    while text[pos] != "}":
        m = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)=\"").match(text, pos)
        if not m or m.group(1) in labels:
            raise Malformed(f"bad or repeated label at {text[pos:]!r}")
        pos = m.end()
        value = []
        while text[pos] != '"':
            if text[pos] == "\n":
                raise Malformed("raw newline in a label value")
            if text[pos] == "\\":
                pos += 1
                escaped = {"\\": "\\", '"': '"', "n": "\n"}.get(text[pos])
                if escaped is None:
                    raise Malformed(f"bad escape \\{text[pos]} in {text!r}")
                value.append(escaped)
            else:
                value.append(text[pos])
            pos += 1
        labels[m.group(1)] = "".join(value)
        pos += 1
        if text[pos] == ",":
            pos += 1
        elif text[pos] != "}":
            raise Malformed(f"expected , or }} in {text!r}")
    if pos != len(text) - 1:
        raise Malformed(f"text after the label set: {text!r}")
    return labels


def parse_exposition(text: str) -> dict:
    """{family: {"type", "help", "samples": [(name, labels, value)]}}, refusing anything
    the format does not allow or this project should not write: a missing trailing
    newline, blank lines, a family's header twice or after its samples, HELP without
    TYPE, a sample outside its family, the same series twice."""
    if text and not text.endswith("\n"):
        raise Malformed("no newline at the end")
    families: dict[str, dict] = {}
    current = None
    seen = set()
    for line in text.split("\n")[:-1]:
        if line.startswith("# HELP "):
            name, _, help = line[7:].partition(" ")
            if name in families or not re.fullmatch(_NAME, name):
                raise Malformed(f"second or bad HELP for {name}")
            help = re.sub(r"\\(.)", lambda m: {"\\": "\\", "n": "\n"}[m.group(1)], help)
            current = families[name] = {"type": None, "help": help, "samples": []}
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            if current is None or families.get(name) is not current or current["type"]:
                raise Malformed(f"TYPE for {name} not right after its HELP")
            if kind not in _SUFFIXES:
                raise Malformed(f"unknown type {kind}")
            current["type"] = kind
        else:
            m = _SAMPLE.fullmatch(line)
            if not m or not _NUMBER.fullmatch(m.group(3)):
                raise Malformed(f"not a sample line: {line!r}")
            if current is None or current["type"] is None:
                raise Malformed(f"sample before its family's header: {line!r}")
            family = next(f for f, v in families.items() if v is current)
            if m.group(1) not in [family + s for s in _SUFFIXES[current["type"]]]:
                raise Malformed(f"{m.group(1)} is not a sample of {family}")
            labels = parse_labels(m.group(2)) if m.group(2) else {}
            key = (m.group(1), tuple(sorted(labels.items())))
            if key in seen:
                raise Malformed(f"series written twice: {line!r}")
            seen.add(key)
            current["samples"].append((m.group(1), labels, float(m.group(3))))
    return families


def check_histogram(name: str, family: dict) -> list[dict]:
    """Every series of a histogram family: buckets in increasing le, cumulative, ending
    with le="+Inf" equal to _count, and a _sum. Returns the series' label sets."""
    series: dict[tuple, dict] = {}
    for sample, labels, value in family["samples"]:
        rest = {k: v for k, v in labels.items() if k != "le"}
        s = series.setdefault(tuple(sorted(rest.items())), {"buckets": [], "labels": rest})
        if sample == name + "_bucket":
            s["buckets"].append((float(labels["le"]), value))
        else:
            s[sample.removeprefix(name)] = value
    for s in series.values():
        bounds = [b for b, _ in s["buckets"]]
        counts = [n for _, n in s["buckets"]]
        assert bounds == sorted(bounds) and len(set(bounds)) == len(bounds), bounds
        assert counts == sorted(counts), f"buckets are not cumulative: {counts}"
        assert bounds[-1] == math.inf and counts[-1] == s["_count"], s
        assert "_sum" in s
    return [s["labels"] for s in series.values()]


@pytest.mark.parametrize("text", [
    "# HELP a x\n# TYPE a gauge\na 1",                            # no final newline
    "# HELP a x\n# TYPE a gauge\na 1\n# HELP a x\n# TYPE a gauge\na 2\n",
    "# HELP a x\n# TYPE a gauge\nb 1\n",                         # outside its family
    "a 1\n",                                                        # no header
    '# HELP a x\n# TYPE a gauge\na{l="\\t"} 1\n',              # bad escape
    '# HELP a x\n# TYPE a gauge\na{l="1"} 1\na{l="1"} 2\n',     # same series twice
    "# HELP a x\n# TYPE a gauge\na one\n",
    "# HELP a x\n# TYPE a gauge\n\na 1\n",                       # blank line
])
def test_the_test_parser_is_strict(text):
    with pytest.raises(Malformed):
        parse_exposition(text)


# --- metrics.py ----------------------------------------------------------------


def test_histogram_counts_into_cumulative_buckets():
    h = Histogram([0.1, 1, 10])
    for v in (0.05, 0.1, 0.5, 1, 1, 7, 11, 1e9):
        h.observe(v)
    assert h.cumulative() == [(0.1, 2), (1, 5), (10, 6), (math.inf, 8)]
    assert h.count == 8 and h.sum == pytest.approx(0.05 + 0.1 + 0.5 + 2 + 7 + 11 + 1e9)


def test_histogram_defaults_and_bucket_checks():
    assert Histogram().buckets == tuple(float(b) for b in DEFAULT_BUCKETS)
    assert Histogram([1, 2, math.inf]).buckets == (1.0, 2.0)
    assert Histogram([]).cumulative() == [(math.inf, 0)]
    for bad in ([2, 1], [1, 1], [1, math.nan], [-math.inf, 1], [1, math.inf, 2]):
        with pytest.raises(ValueError):
            Histogram(bad)
    with pytest.raises(ValueError):
        Histogram().observe(math.nan)


def test_histogram_memory_does_not_grow():
    def sizes(h):
        return {k: len(v) if isinstance(v, (list, tuple)) else None for k, v in vars(h).items()}

    h = Histogram()
    before = sizes(h)
    for i in range(10_000):
        h.observe(i / 1000)
    assert sizes(h) == before and h.count == 10_000


def test_one_header_per_family_and_escaping():
    p = Page()
    p.gauge("fm_peer_up", "Whether the peer answers \\ heartbeats.\nPer network.", 1,
            {"net": "a"})
    p.counter("fm_failovers_total", "Failovers.", 3)
    p.gauge("fm_peer_up", "Whether the peer answers \\ heartbeats.\nPer network.", 0,
            {"net": 'b"\\\n'})
    text = p.render()
    assert text.count("# HELP fm_peer_up ") == 1 and text.count("# TYPE fm_peer_up gauge") == 1
    assert '{net="b\\"\\\\\\n"} 0\n' in text
    assert "# HELP fm_peer_up Whether the peer answers \\\\ heartbeats.\\nPer network.\n" in text
    families = parse_exposition(text)
    assert list(families) == ["fm_peer_up", "fm_failovers_total"]
    up = families["fm_peer_up"]
    assert up["help"] == "Whether the peer answers \\ heartbeats.\nPer network."
    assert up["samples"] == [("fm_peer_up", {"net": "a"}, 1), ("fm_peer_up", {"net": 'b"\\\n'}, 0)]
    assert families["fm_failovers_total"] == {
        "type": "counter", "help": "Failovers.", "samples": [("fm_failovers_total", {}, 3)]}


def test_histogram_family_with_labels():
    fast, slow = Histogram([0.01, 0.1]), Histogram([0.01, 0.1])
    for v in (0.001, 0.01, 0.02):
        fast.observe(v)
    slow.observe(3)
    p = Page()
    p.histogram("fm_write_seconds", "Write latency.", fast, {"op": "write"})
    p.histogram("fm_write_seconds", "Write latency.", slow, {"op": "fsync"})
    families = parse_exposition(p.render())
    assert families["fm_write_seconds"]["type"] == "histogram"
    assert check_histogram("fm_write_seconds", families["fm_write_seconds"]) == [
        {"op": "write"}, {"op": "fsync"}]
    assert 'fm_write_seconds_bucket{op="write",le="0.01"} 2\n' in p.render()
    assert 'fm_write_seconds_bucket{op="fsync",le="+Inf"} 1\n' in p.render()


def test_values_render_as_prometheus_parses_them():
    assert [format_value(v) for v in (0, 7, True, 2.0, -0.5, 1e-05, 2.5e20, math.inf,
                                      -math.inf, math.nan)] == [
        "0", "7", "1", "2", "-0.5", "1e-05", "2.5e+20", "+Inf", "-Inf", "NaN"]
    p = Page()
    p.gauge("g", "g", math.nan)
    p.gauge("h", "h", math.inf)
    assert parse_exposition(p.render())["g"]["samples"][0][2] != 0      # NaN
    assert "\nh +Inf\n" in p.render()


@pytest.mark.parametrize("call", [
    lambda p: p.gauge("1abc", "h", 1),
    lambda p: p.gauge("a-b", "h", 1),
    lambda p: p.gauge("", "h", 1),
    lambda p: p.gauge("ok", "h", 1, {"bad-label": "x"}),
    lambda p: p.gauge("ok", "h", 1, {"0x": "x"}),
    lambda p: p.gauge("ok", "h", 1, {"__name__": "x"}),
    lambda p: p.counter("fm_failovers", "h", 1),
    lambda p: p.counter("fm_failovers_total", "h", -1),
    lambda p: p.histogram("ok", "h", Histogram(), {"le": "1"}),
])
def test_bad_names_and_values_are_refused(call):
    with pytest.raises(ValueError):
        call(Page())


def test_clashes_between_samples_are_refused():
    p = Page()
    p.gauge("fm_lag_seconds", "Lag.", 1, {"peer": "b"})
    with pytest.raises(ValueError):
        p.gauge("fm_lag_seconds", "Lag.", 2, {"peer": "b"})            # same series
    with pytest.raises(ValueError):
        p.gauge("fm_lag_seconds", "Other help.", 2, {"peer": "c"})
    with pytest.raises(ValueError):
        p.histogram("fm_lag_seconds", "Lag.", Histogram())             # another type
    p.histogram("fm_op", "Ops.", Histogram())
    with pytest.raises(ValueError):
        p.gauge("fm_op_count", "Clashes with the histogram's _count.", 1)
    with pytest.raises(ValueError):
        p.gauge("fm_op", "Ops.", 1)
    with pytest.raises(TypeError):
        p.gauge("fm_text", "Text.", "1")
    parse_exposition(p.render())


def test_empty_page():
    assert Page().render() == ""


# --- the server ----------------------------------------------------------------


@pytest.fixture(autouse=True)
def expected_log(caplog):
    """Every test fails on a WARNING or worse from fusemirror unless it expects it: it
    adds the start of the message to this list."""
    expected = []
    yield expected
    bad = [r.getMessage() for r in caplog.get_records("call")
           if r.levelno >= logging.WARNING and r.name.startswith("fusemirror")
           and not any(r.getMessage().startswith(e) for e in expected)]
    assert not bad, f"unexpected log lines: {bad}"


class Provider:
    """A controller as httpd sees it; `broken` names a method that raises."""

    def __init__(self):
        self.ready = (True, "this node is primary and the application is healthy")
        self.alive = (True, "the loop ran 0.2 s ago")
        self.state = {"state": "PRIMARY", "epoch": 7, "peer": {"up": True, "lag": 0.25}}
        self.broken = None
        h = Histogram()
        for v in (0.0003, 0.002, 0.002, 0.4, 30):
            h.observe(v)
        page = Page()
        page.gauge("fm_ready", "Whether this node is ready.", 1, {"node": 'al"pha\\\n'})
        page.counter("fm_failovers_total", "Failovers since start.", 2)
        page.histogram("fm_cycle_seconds", "Duration of a controller cycle.", h)
        self.page = page.render()

    def _check(self, name):
        if self.broken == name:
            raise RuntimeError(f"{name} is broken\nsecond line")

    def http_ready(self):
        self._check("http_ready")
        return self.ready

    def http_alive(self):
        self._check("http_alive")
        return self.alive

    def http_state(self):
        self._check("http_state")
        return self.state

    def http_metrics(self):
        self._check("http_metrics")
        return self.page


@asynccontextmanager
async def running(provider=None, **kw):
    """The server on 127.0.0.1 and an ephemeral port; yields the port."""
    provider = provider or Provider()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(functools.partial(httpd.serve, "127.0.0.1", 0, provider, **kw))
        assert port > 0
        yield port
        nursery.cancel_scope.cancel()


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes


async def read_to_eof(stream) -> bytes:
    data = bytearray()
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        pass
    return bytes(data)


def parse_reply(data: bytes, head_only=False) -> Reply:
    """A response as the server must always send it: HTTP/1.1 status line, CRLF, a
    Content-Length that matches, Connection: close, and nothing after the body."""
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, f"no complete response head in {data!r}"
    lines = head.decode("ascii").split("\r\n")
    m = re.fullmatch(r"HTTP/1\.1 (\d{3}) [A-Za-z ]+", lines[0])
    assert m, lines[0]
    headers = {}
    for line in lines[1:]:
        name, value = line.split(": ", 1)
        assert name.lower() not in headers
        headers[name.lower()] = value
    assert headers["connection"] == "close"
    if head_only:
        assert body == b""
    else:
        assert int(headers["content-length"]) == len(body)
    return Reply(int(m.group(1)), headers, body)


async def exchange(port, raw: bytes, *, head_only=False, eof=False) -> Reply:
    with trio.fail_after(5):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(raw)
            if eof:
                await stream.send_eof()
            return parse_reply(await read_to_eof(stream), head_only)


async def request(port, path, method="GET") -> Reply:
    raw = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: test\r\n\r\n"
    return await exchange(port, raw.encode(), head_only=method == "HEAD")


async def test_ready_and_liveness_say_why():
    p = Provider()
    async with running(p) as port:
        r = await request(port, "/ready")
        assert (r.status, r.body) == (200, b"ready: this node is primary and the application "
                                           b"is healthy\n")
        assert r.headers["content-type"] == "text/plain; charset=utf-8"
        assert (await request(port, "/liveness")).body == b"alive: the loop ran 0.2 s ago\n"
        p.ready = (False, "the peer holds the lease\nsince 10:00")
        p.alive = (False, "the loop has not run for 31 s")
        r = await request(port, "/ready")
        assert (r.status, r.body) == (503, b"not ready: the peer holds the lease since 10:00\n")
        r = await request(port, "/liveness")
        assert (r.status, r.body) == (503, b"not alive: the loop has not run for 31 s\n")


async def test_state_is_json():
    p = Provider()
    async with running(p) as port:
        r = await request(port, "/state")
        assert r.status == 200 and r.headers["content-type"] == "application/json"
        assert json.loads(r.body) == p.state


async def test_metrics_page_parses():
    async with running() as port:
        r = await request(port, "/metrics")
    assert r.status == 200 and r.headers["content-type"] == CONTENT_TYPE
    families = parse_exposition(r.body.decode("utf-8"))
    assert families["fm_ready"]["samples"] == [("fm_ready", {"node": 'al"pha\\\n'}, 1)]
    assert families["fm_failovers_total"]["type"] == "counter"
    check_histogram("fm_cycle_seconds", families["fm_cycle_seconds"])
    samples = {(n, lb.get("le")): v for n, lb, v in families["fm_cycle_seconds"]["samples"]}
    assert samples[("fm_cycle_seconds_bucket", "0.0025")] == 3
    assert samples[("fm_cycle_seconds_bucket", "10")] == 4
    assert samples[("fm_cycle_seconds_bucket", "+Inf")] == samples[("fm_cycle_seconds_count",
                                                                    None)] == 5


async def test_head_answers_like_get_without_a_body():
    p = Provider()
    p.ready = (False, "waiting for the peer")
    async with running(p) as port:
        for path in ("/ready", "/liveness", "/state", "/metrics", "/nowhere"):
            get = await request(port, path)
            head = await request(port, path, "HEAD")
            assert head.status == get.status
            assert head.headers["content-length"] == str(len(get.body))
            assert head.headers["content-type"] == get.headers["content-type"]


@pytest.mark.parametrize("target, status", [
    ("/ready?verbose=1", 200),
    ("/metrics?name[]=fm_ready#top", 200),
    ("http://127.0.0.1:9/state?x", 200),
    ("/", 404),
    ("/ready/", 404),
    ("/READY", 404),
    ("/state.json", 404),
])
async def test_paths(target, status):
    async with running() as port:
        assert (await request(port, target)).status == status


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
async def test_other_methods_are_not_allowed(method):
    async with running() as port:
        r = await request(port, "/ready", method)
        assert r.status == 405 and r.headers["allow"] == "GET, HEAD"
        assert (await request(port, "/nowhere", method)).status == 404


async def test_a_request_with_a_body_gets_405():
    body = b"x" * 60_000
    raw = (b"POST /ready HTTP/1.1\r\nHost: h\r\nContent-Length: %d\r\n\r\n" % len(body)) + body
    async with running() as port:
        r = await exchange(port, raw)
        assert r.status == 405


@pytest.mark.parametrize("raw", [
    b"GARBAGE\r\n\r\n",
    b"GET /ready\r\n\r\n",
    b"GET /ready HTTP/1.1 extra\r\n\r\n",
    b"GET  /ready HTTP/1.1\r\n\r\n",
    b"GET ready HTTP/1.1\r\n\r\n",
    b"G(T /ready HTTP/1.1\r\n\r\n",
    b"GET /ready HTTX/1.1\r\n\r\n",
    b"GET /ready HTTP/1\r\n\r\n",
    b"GET /ready HTTP/1.1\r\nHost : x\r\n\r\n",
    b"GET /ready HTTP/1.1\r\nno colon here\r\n\r\n",
    b"GET /ready HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",      # TLS to a plain port
])
async def test_malformed_requests_get_400(raw):
    async with running() as port:
        r = await exchange(port, raw)
        assert r.status == 400 and r.body.count(b"\n") == 1


async def test_request_cut_short_gets_400():
    async with running() as port:
        r = await exchange(port, b"GET /ready HTTP/1.1\r\nHost: x\r\n", eof=True)
        assert r.status == 400


async def test_other_http_versions():
    async with running() as port:
        assert (await exchange(port, b"GET /ready HTTP/2.0\r\n\r\n")).status == 505
        assert (await exchange(port, b"GET /ready HTTP/1.0\r\n\r\n")).status == 200
        assert (await exchange(port, b"GET /ready HTTP/1.0\n\n")).status == 200     # bare LF


async def test_head_larger_than_the_limit_gets_431():
    async with running() as port:
        fits = b"GET /ready HTTP/1.1\r\nX-Pad: "
        fits += b"a" * (httpd.MAX_HEAD - len(fits) - 4) + b"\r\n\r\n"
        assert len(fits) == httpd.MAX_HEAD
        assert (await exchange(port, fits)).status == 200
        assert (await exchange(port, fits[:-4] + b"a\r\n\r\n")).status == 431
        assert (await exchange(port, b"GET /" + b"a" * 20_000)).status == 431


async def test_a_failing_provider_gives_500_and_the_server_carries_on(caplog, expected_log):
    expected_log.append("HTTP GET /")
    p = Provider()
    async with running(p) as port:
        for method in ("http_ready", "http_alive", "http_state", "http_metrics"):
            p.broken = method
            path = {"http_ready": "/ready", "http_alive": "/liveness", "http_state": "/state",
                    "http_metrics": "/metrics"}[method]
            r = await request(port, path)
            assert (r.status, r.body) == (500, b"internal error: RuntimeError\n")
        p.broken = None
        p.state = {"lag": math.nan}               # not JSON
        assert (await request(port, "/state")).status == 500
        p.ready = "yes"                           # not a (bool, str) pair
        assert (await request(port, "/ready")).status == 500
        assert (await request(port, "/liveness")).status == 200
    errors = [r for r in caplog.records if r.name == "fusemirror.httpd"
              and r.levelno == logging.ERROR]
    assert len(errors) == 6 and all(r.exc_info for r in errors)
    assert errors[0].getMessage() == "HTTP GET /ready: the provider failed"


async def test_a_silent_client_is_closed_after_the_timeout():
    async with running(request_timeout=0.3) as port:
        with trio.fail_after(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            start = trio.current_time()
            await stream.send_all(b"GET /ready HTTP/1.1\r\n")
            assert await read_to_eof(stream) == b""
            assert trio.current_time() - start >= 0.25
            await stream.aclose()
        assert (await request(port, "/ready")).status == 200


async def test_a_trickling_client_is_closed_after_the_timeout():
    async def trickle(stream):
        try:
            for _ in range(1000):
                await stream.send_all(b"X-A: b\r\n")
                await trio.sleep(0.02)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async with running(request_timeout=0.3) as port:
        with trio.fail_after(3):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            start = trio.current_time()
            await stream.send_all(b"GET /ready HTTP/1.1\r\n")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trickle, stream)
                assert await read_to_eof(stream) == b""
                nursery.cancel_scope.cancel()
            assert 0.25 <= trio.current_time() - start < 2
            await stream.aclose()


async def test_connections_beyond_the_cap_are_closed(caplog, expected_log):
    expected_log.append("HTTP: 2 connections already open")
    caplog.set_level(logging.INFO, logger="fusemirror.httpd")
    async with running(max_connections=2, request_timeout=10) as port:
        with trio.fail_after(5):
            held = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(2)]
            extra = await trio.open_tcp_stream("127.0.0.1", port)
            assert await read_to_eof(extra) == b""          # closed at once, no answer
            await extra.aclose()
            # the held ones are still served
            await held[0].send_all(b"GET /ready HTTP/1.1\r\n\r\n")
            assert parse_reply(await read_to_eof(held[0])).status == 200
            await held[0].aclose()
            # and once one has ended, a new connection is served again
            while True:
                try:
                    r = await request(port, "/liveness")
                    break
                except (AssertionError, trio.BrokenResourceError):  # closed: no free slot yet
                    await trio.sleep(0.02)
            assert r.status == 200
            await held[1].aclose()
    messages = [r.getMessage() for r in caplog.records if r.name == "fusemirror.httpd"]
    assert "HTTP: 2 connections already open; closing new ones until one ends" in messages
    assert "HTTP: accepting connections again" in messages


async def test_a_busy_port_is_a_bad_config_failure():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(Failure) as e:
            await httpd.serve("127.0.0.1", port, Provider())
    assert e.value.code == BAD_CONFIG
    assert str(e.value) == f"cannot listen for HTTP on 127.0.0.1:{port}: Address already in use"


# --- the protocol without sockets ------------------------------------------------


def test_parse_head():
    assert httpd.parse_head(b"GET /ready?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*") == (
        "GET", "/ready")
    assert httpd.parse_head(b"HEAD http://host HTTP/1.0") == ("HEAD", "/")
    assert httpd.parse_head(b"BREW /pot HTTP/1.1") == ("BREW", "/pot")
    assert httpd.parse_head(b"GET /ready HTTP/3.0").status == 505
    assert httpd.parse_head(b"GET * HTTP/1.1").status == 400
    assert httpd.parse_head(b"").status == 400


def test_responses_always_close_and_have_a_length():
    raw = httpd.respond(b"HEAD /state HTTP/1.1", Provider())
    r = parse_reply(raw, head_only=True)
    assert r.status == 200 and int(r.headers["content-length"]) > 0
