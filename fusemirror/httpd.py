"""The controller's monitoring endpoint: a tiny read-only HTTP/1.1 server on trio.

Four paths, for load balancers and monitoring (GET or HEAD; a query string is
ignored):

    /ready      200 "ready: <reason>" or 503 "not ready: <reason>" (provider.http_ready)
    /liveness   200 "alive: <reason>" or 503 "not alive: <reason>" (provider.http_alive)
    /state      200 application/json (provider.http_state)
    /metrics    200 Prometheus text, metrics.CONTENT_TYPE (provider.http_metrics)

Anything else: 404 for another path, 405 (with `Allow: GET, HEAD`) for another
method, 400 for a request that is not HTTP/1.x, 431 for a head over MAX_HEAD
bytes, 500 if the provider raises (logged; the server carries on).

One request per connection: every response says `Connection: close` and carries a
Content-Length. A slow or broken client costs little: its whole request head must
arrive within the request timeout, and so must the sending of the answer; at most
max_connections are handled at once and further ones are closed as soon as they
are accepted. The provider's methods run on the event loop, so they must be cheap.

respond() is the protocol without I/O (head bytes in, response bytes out); serve()
is the socket side.
"""

from __future__ import annotations

import email.utils
import errno
import json
import logging
import re
import socket
from dataclasses import dataclass
from typing import Protocol

import trio

from . import metrics
from .errors import BAD_CONFIG, Failure

log = logging.getLogger(__name__)

REQUEST_TIMEOUT = 5.0       # seconds for the request head to arrive, and again for the answer
MAX_HEAD = 8192             # bytes in the request line and headers, blank line included
MAX_CONNECTIONS = 64        # handled at once; more are closed on accept
_LINGER_MAX = 64 * 1024     # bytes of a request body read and dropped before closing

_HEAD_END = re.compile(rb"\n\r?\n")
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/(\d)\.(\d)")
_ABSOLUTE = re.compile(r"https?://[^/?#]*", re.IGNORECASE)
_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            503: "Service Unavailable", 505: "HTTP Version Not Supported"}


class Provider(Protocol):
    """What the server asks; every method is synchronous, cheap and may raise (500)."""

    def http_ready(self) -> tuple[bool, str]:
        """(ready to take the application's traffic here, a sentence saying why)"""

    def http_alive(self) -> tuple[bool, str]:
        """(the controller's loop is making progress, a sentence saying why)"""

    def http_state(self) -> dict:
        """The controller's state, JSON-able."""

    def http_metrics(self) -> str:
        """The metrics page, already rendered (metrics.Page.render())."""


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    allow: bool = False                  # add `Allow: GET, HEAD`

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {_REASONS[self.status]}",
                 f"Date: {email.utils.formatdate(usegmt=True)}",
                 f"Content-Type: {self.content_type}",
                 f"Content-Length: {len(self.body)}",
                 "Cache-Control: no-store",
                 "Connection: close"]
        if self.allow:
            lines.append("Allow: GET, HEAD")
        head = "".join(line + "\r\n" for line in lines) + "\r\n"
        return head.encode("ascii") + (b"" if head_only else self.body)


def _text(status: int, line: str, **kw) -> Response:
    """A one-line plain text response; newlines in `line` become spaces."""
    return Response(status, (" ".join(line.splitlines()) + "\n").encode(), **kw)


TOO_LARGE = _text(431, f"request head larger than {MAX_HEAD} bytes")
CUT_SHORT = _text(400, "request ended before its blank line")


def _verdict(ok_word: str, answer: tuple[bool, str]) -> Response:
    ok, reason = answer
    word = ok_word if ok else "not " + ok_word
    return _text(200 if ok else 503, f"{word}: {reason}" if reason else word)


def _state(provider: Provider) -> Response:
    body = json.dumps(provider.http_state(), allow_nan=False) + "\n"
    return Response(200, body.encode(), "application/json")


def _metrics(provider: Provider) -> Response:
    return Response(200, provider.http_metrics().encode(), metrics.CONTENT_TYPE)


_PATHS = {
    "/ready": lambda p: _verdict("ready", p.http_ready()),
    "/liveness": lambda p: _verdict("alive", p.http_alive()),
    "/state": _state,
    "/metrics": _metrics,
}


def parse_head(head: bytes) -> tuple[str, str] | Response:
    """(method, path without query) from a request head (its lines, without the blank
    line), or the error Response to send instead. Header fields are checked for
    form only; none changes the answer."""
    lines = [line.removesuffix("\r") for line in head.decode("latin-1").split("\n")]
    parts = lines[0].split(" ")
    if len(parts) != 3 or not _TOKEN.fullmatch(parts[0]):
        return _text(400, "malformed request line")
    method, target, version = parts
    v = _VERSION.fullmatch(version)
    if v is None:
        return _text(400, "malformed request line")
    if v.group(1) != "1":
        return _text(505, "only HTTP/1.0 and HTTP/1.1 are served")
    for line in lines[1:]:
        name, colon, _ = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            return _text(400, "malformed header field")
    absolute = _ABSOLUTE.match(target)
    if absolute:
        target = target[absolute.end():] or "/"
    if not target.startswith("/"):
        return _text(400, "malformed request target")
    return method, re.split(r"[?#]", target, maxsplit=1)[0]


def respond(head: bytes, provider: Provider) -> bytes:
    """The whole response to one request head. Calls the provider; never raises."""
    request = parse_head(head)
    if isinstance(request, Response):
        return request.encode()
    method, path = request
    make = _PATHS.get(path)
    if make is None:
        response = _text(404, f"no such path: {path}; try /ready, /liveness, /state, /metrics")
    elif method not in ("GET", "HEAD"):
        response = _text(405, f"method {method} not allowed", allow=True)
    else:
        try:
            response = make(provider)
        except Exception as e:
            log.exception("HTTP %s %s: the provider failed", method, path)
            response = _text(500, f"internal error: {type(e).__name__}")
    return response.encode(head_only=method == "HEAD")


# --- sockets -------------------------------------------------------------------


async def serve(host: str, port: int, provider: Provider, *,
                request_timeout: float = REQUEST_TIMEOUT,
                max_connections: int = MAX_CONNECTIONS,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Listen on host:port (IPv6 if host holds a colon; port 0 picks one), report the
    port with task_status.started(port), then serve until cancelled. Raises
    Failure(BAD_CONFIG) if the address cannot be bound."""
    sock = await _bind(host, port)
    async with trio.SocketListener(sock) as listener:
        task_status.started(sock.getsockname()[1])
        await _accept_forever(listener, provider, request_timeout, max_connections)


async def _bind(host: str, port: int) -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = None
    try:
        sock = trio.socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        await sock.bind((host, port))
        sock.listen(128)
    except (OSError, OverflowError) as e:
        if sock is not None:
            sock.close()
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        raise Failure(BAD_CONFIG, f"cannot listen for HTTP on {host}:{port}: {why}") from None
    return sock


async def _accept_forever(listener: trio.SocketListener, provider: Provider,
                          timeout: float, max_connections: int) -> None:
    busy = 0
    refusing = False

    async def handle(stream: trio.SocketStream) -> None:
        nonlocal busy, refusing
        try:
            await _connection(stream, provider, timeout)
        finally:
            busy -= 1
            if busy < max_connections and refusing:
                refusing = False
                log.info("HTTP: accepting connections again")

    async with trio.open_nursery() as nursery:
        while True:
            try:
                stream = await listener.accept()
            except OSError as e:                # out of descriptors or memory: wait, retry
                if e.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    raise
                log.warning("HTTP: cannot accept a connection: %s", e.strerror)
                await trio.sleep(0.1)
                continue
            if busy >= max_connections:
                if not refusing:
                    refusing = True
                    log.warning("HTTP: %d connections already open; closing new ones "
                                "until one ends", busy)
                await stream.aclose()
                continue
            busy += 1
            nursery.start_soon(handle, stream)


async def _connection(stream: trio.SocketStream, provider: Provider, timeout: float) -> None:
    """One request, one response, then close."""
    try:
        async with stream:
            with trio.move_on_after(timeout) as waited:
                head = await _receive_head(stream)
            if waited.cancelled_caught:
                log.debug("HTTP: no complete request within %g s; closed", timeout)
                return
            if head is None:
                return
            reply = head.encode() if isinstance(head, Response) else respond(head, provider)
            with trio.move_on_after(timeout):
                await stream.send_all(reply)
                await stream.send_eof()
                await _drain(stream)
    except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
        log.debug("HTTP: connection lost: %s", e)
    except Exception:                           # a bug here must not end the controller
        log.exception("HTTP: connection handler failed")


async def _receive_head(stream: trio.SocketStream) -> bytes | Response | None:
    """The request head up to its blank line (excluded); a Response to send instead
    if it is too large or cut short; None if the client sent nothing at all."""
    buf = bytearray()
    while True:
        end = _HEAD_END.search(buf)
        if end is not None:
            return TOO_LARGE if end.end() > MAX_HEAD else bytes(buf[:end.start()])
        if len(buf) >= MAX_HEAD:
            return TOO_LARGE
        data = await stream.receive_some(MAX_HEAD)
        if not data:
            return CUT_SHORT if buf else None
        buf += data


async def _drain(stream: trio.SocketStream) -> None:
    """Read what the client still sends (a body we ignored) until it closes, so that
    closing does not reset the connection before it has read the response."""
    left = _LINGER_MAX
    while left > 0:
        data = await stream.receive_some(left)
        if not data:
            return
        left -= len(data)
