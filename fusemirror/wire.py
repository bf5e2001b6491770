"""Frames over a trio stream: the I/O half of protocol.py, and the handshake."""

from __future__ import annotations

import logging
import os

import trio

from . import protocol as P

log = logging.getLogger(__name__)

_RECV = 1 << 20
_COALESCE = 64 * 1024


class LinkClosed(Exception):
    """The other end closed the connection or it broke."""


class HandshakeRefused(Exception):
    """The other end refused the handshake; .code is a protocol.Refusal."""

    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code


class FrameStream:
    """Sends and receives whole frames on one trio stream. One sender at a time
    (callers hold their own lock); one receiver."""

    def __init__(self, stream: trio.abc.Stream, version: int = P.PROTOCOL_MAX):
        self.stream = stream
        self.version = version
        self._buf = bytearray()

    async def send_parts(self, parts) -> None:
        if len(parts) > 1 and sum(len(p) for p in parts) <= _COALESCE:
            parts = [b"".join(parts)]        # one segment for a small frame
        try:
            for part in parts:
                await self.stream.send_all(part)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise LinkClosed(str(e) or type(e).__name__) from None

    async def send(self, kind: P.Kind, seq: int = 0, fields: dict | None = None, *,
                   compress: bool = False) -> None:
        await self.send_parts(P.encode(kind, seq, fields, compress=compress))

    async def _recv_some(self, n: int) -> bytes:
        try:
            data = await self.stream.receive_some(n)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as e:
            raise LinkClosed(str(e) or type(e).__name__) from None
        if not data:
            raise LinkClosed("connection closed by peer")
        return data

    async def _recv_into(self, view: memoryview) -> None:
        """Fill view completely, straight from the socket when there is one (no copies)."""
        sock = getattr(self.stream, "socket", None)
        while view:
            if sock is None:
                data = await self._recv_some(len(view))
                view[:len(data)] = data
                n = len(data)
            else:
                try:
                    n = await sock.recv_into(view)
                except (trio.ClosedResourceError, OSError) as e:
                    raise LinkClosed(str(e) or type(e).__name__) from None
                if n == 0:
                    raise LinkClosed("connection closed by peer")
            view = view[n:]

    async def receive(self) -> P.Message:
        """The next message; raises LinkClosed, ChecksumError or ProtocolError."""
        while len(self._buf) < P.HEADER_SIZE:
            self._buf += await self._recv_some(_RECV)
        header = P.parse_header(bytes(self._buf[:P.HEADER_SIZE]))
        del self._buf[:P.HEADER_SIZE]
        payload = bytearray(header.length)
        have = min(len(self._buf), header.length)
        payload[:have] = self._buf[:have]
        del self._buf[:have]
        if have < header.length:
            await self._recv_into(memoryview(payload)[have:])
        return P.decode_payload(header, payload, self.version)

    async def aclose(self) -> None:
        with trio.move_on_after(1, shield=True):
            try:
                await self.stream.aclose()
            except (trio.BrokenResourceError, OSError):
                pass


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
