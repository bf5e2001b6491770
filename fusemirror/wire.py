"""Frames over a TCP connection: the I/O half of protocol.py, and the handshake."""

from __future__ import annotations

import logging
import os
import socket

import trio

from . import protocol as P

log = logging.getLogger(__name__)

_RECV = 256 * 1024
_COALESCE = 64 * 1024


class LinkClosed(Exception):
    """The other end closed the connection or it broke."""


class HandshakeRefused(Exception):
    """The other end refused the handshake; .code is a protocol.Refusal."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


class FrameStream:
    """Sends and receives whole frames on one TCP connection. One sender at a time
    (callers hold their own lock); one receiver.

    It takes the socket out of the trio stream it is given and drives it directly:
    a send or receive that can complete at once does so without yielding to the
    scheduler, and only waits (wait_writable / wait_readable) when the kernel says
    EAGAIN. This saves several scheduler passes per operation on the data path."""

    def __init__(self, stream: trio.SocketStream, version: int = P.PROTOCOL_MAX):
        self.version = version
        self._buf = bytearray()
        self._chunk = memoryview(bytearray(_RECV))
        tsock = stream.socket
        self.peer = _peer_name(tsock)
        self.sock = socket.socket(tsock.family, tsock.type, tsock.proto, fileno=tsock.detach())
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._closed = False

    async def send_parts(self, parts) -> None:
        if len(parts) > 1 and sum(len(p) for p in parts) <= _COALESCE:
            parts = [b"".join(parts)]        # one segment for a small frame
        try:
            for part in parts:
                view = memoryview(part)
                while view:
                    try:
                        n = self.sock.send(view)
                    except BlockingIOError:
                        await trio.lowlevel.wait_writable(self.sock)
                        continue
                    view = view[n:]
        except (OSError, trio.ClosedResourceError) as e:
            raise LinkClosed(getattr(e, "strerror", None) or str(e) or type(e).__name__) \
                from None

    async def send(self, kind: P.Kind, seq: int = 0, fields: dict | None = None, *,
                   compress: bool = False) -> None:
        await self.send_parts(P.encode(kind, seq, fields, compress=compress))

    async def _recv_into(self, view: memoryview) -> int:
        while True:
            try:
                n = self.sock.recv_into(view)
            except BlockingIOError:
                try:
                    await trio.lowlevel.wait_readable(self.sock)
                except trio.ClosedResourceError:
                    raise LinkClosed("connection closed") from None
                continue
            except OSError as e:
                raise LinkClosed(e.strerror or str(e)) from None
            if n == 0:
                raise LinkClosed("connection closed by peer")
            return n

    async def receive(self) -> P.Message:
        """The next message; raises LinkClosed, ChecksumError or ProtocolError."""
        while len(self._buf) < P.HEADER_SIZE:
            n = await self._recv_into(self._chunk)
            self._buf += self._chunk[:n]
        header = P.parse_header(bytes(self._buf[:P.HEADER_SIZE]))
        del self._buf[:P.HEADER_SIZE]
        payload = bytearray(header.length)
        have = min(len(self._buf), header.length)
        payload[:have] = self._buf[:have]
        del self._buf[:have]
        view = memoryview(payload)[have:]
        while view:
            view = view[await self._recv_into(view):]
        return P.decode_payload(header, payload, self.version)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        trio.lowlevel.notify_closing(self.sock)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        await trio.lowlevel.checkpoint()


def _peer_name(tsock) -> str:
    try:
        return "%s:%s" % tsock.getpeername()[:2]
    except OSError:
        return "?"


async def client_handshake(fs: FrameStream, secret: bytes, session: int, label: bytes,
                           versions: tuple[int, int]) -> P.Message:
    """Run the primary's side of the handshake; returns the WELCOME message."""
    nonce = os.urandom(P.NONCE_SIZE)
    await fs.send(P.Kind.HELLO, 0, dict(version_min=versions[0], version_max=versions[1],
                                        session=session, nonce=nonce, label=label))
    msg = await fs.receive()
    if msg.kind == P.Kind.REFUSE:
        raise HandshakeRefused(msg.code, msg.reason.decode(errors="replace"))
    if msg.kind != P.Kind.CHALLENGE:
        raise P.ProtocolError(f"expected CHALLENGE, got {msg.kind.name}")
    if len(msg.nonce) != P.NONCE_SIZE:
        raise P.ProtocolError("CHALLENGE carries a nonce of the wrong size")
    if not (versions[0] <= msg.version <= versions[1]):
        raise HandshakeRefused(P.Refusal.VERSION, f"peer chose protocol version {msg.version}")
    if not P.check_proof(secret, b"replica", nonce, msg.nonce, msg.proof):
        await refuse(fs, P.Refusal.AUTH, "authentication failed: the replica does not know "
                                         "the primary's secret")
        raise HandshakeRefused(P.Refusal.AUTH, "authentication failed: the peer does not know "
                                               "the shared secret")
    fs.version = msg.version
    await fs.send(P.Kind.AUTH, 0, dict(proof=P.proof(secret, b"primary", msg.nonce, nonce)))
    msg = await fs.receive()
    if msg.kind == P.Kind.REFUSE:
        raise HandshakeRefused(msg.code, msg.reason.decode(errors="replace"))
    if msg.kind != P.Kind.WELCOME:
        raise P.ProtocolError(f"expected WELCOME, got {msg.kind.name}")
    return msg


async def refuse(fs: FrameStream, code: P.Refusal, reason: str) -> None:
    try:
        await fs.send(P.Kind.REFUSE, 0, dict(code=code, reason=reason.encode()))
    except LinkClosed:
        pass
