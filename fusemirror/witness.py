"""The split-brain guard in `ping` mode: witnesses that a node must reach to act alone.

Losing the peer's heartbeats does not tell a node whether the peer died or the network
between them broke. In `ping` mode the module names one or more witness addresses
(typically the router both nodes sit behind); a node may take over, or stay primary
without its SECOND, only while it reaches a witness. A node cut off from everything
then fences itself instead of going on alone.

`PingWitness.run()` sends an ICMP (or ICMPv6) echo request to every witness each
`interval` on a raw socket (root; unprivileged ICMP sockets are off by default in a
new network namespace) and notes when each answered. `verdict(peer_heard)` is the
decide.Guard:

- ok when some witness answered within `timeout`, and, if the peer is not heard now,
  *after* the peer was last heard. A reply older than the loss proves nothing about
  the network as it is now: the node must hear a witness again before it acts alone.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import struct
from dataclasses import dataclass, field

import trio

from .decide import Guard
from .vip import _checksum as internet_checksum

log = logging.getLogger(__name__)

ECHO_REQUEST, ECHO_REPLY = 8, 0
ECHO6_REQUEST, ECHO6_REPLY = 128, 129
NO_GUARD = Guard(True, "the split-brain guard is off (i_accept_split_brain)")


def echo_request(ident: int, seq: int, payload: bytes, v6: bool = False) -> bytes:
    """An ICMP echo request (the kernel fills in the ICMPv6 checksum itself)."""
    kind = ECHO6_REQUEST if v6 else ECHO_REQUEST
    head = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    if v6:
        return head + payload
    return struct.pack("!BBHHH", kind, 0, internet_checksum(head + payload), ident, seq) + payload


def parse_reply(data: bytes, v6: bool = False) -> tuple[int, int] | None:
    """(ident, seq) of an echo reply; None for anything else. An IPv4 raw socket
    delivers the IP header too; an ICMPv6 one does not."""
    if not v6:
        if len(data) < 20 or data[0] >> 4 != 4:
            return None
        data = data[(data[0] & 0x0F) * 4:]
    if len(data) < 8:
        return None
    kind, code, _, ident, seq = struct.unpack("!BBHHH", data[:8])
    if kind != (ECHO6_REPLY if v6 else ECHO_REPLY) or code != 0:
        return None
    return ident, seq


@dataclass
class _Target:
    address: str
    v6: bool
    answered: float | None = None       # trio time of the last reply
    sent: dict[int, float] = field(default_factory=dict)
    rtt: float | None = None
    error: str | None = None


class PingWitness:
    def __init__(self, addresses, interval: float = 0.2, timeout: float = 1.0):
        if not addresses:
            raise ValueError("a ping witness needs at least one address")
        self.targets = [_Target(a, ipaddress.ip_address(a).version == 6) for a in addresses]
        self.interval, self.timeout = interval, timeout
        self.ident = int.from_bytes(os.urandom(2), "big") or 1
        self._seq = 0
        self._was_ok: bool | None = None

    # -- what the controller reads ---------------------------------------------------------

    def verdict(self, peer_alive: bool, peer_heard: float | None) -> Guard:
        """The guard's answer now; `peer_heard` is when the peer was last heard (trio
        time), None if never."""
        now = trio.current_time()
        fresh = [t for t in self.targets if t.answered is not None
                 and now - t.answered <= self.timeout
                 and (peer_alive or peer_heard is None or t.answered > peer_heard)]
        if fresh:
            return Guard(True, f"witness {fresh[0].address} answered")
        names = ", ".join(t.address for t in self.targets)
        return Guard(False, f"witness {names} unreachable" if len(self.targets) == 1
                     else f"witnesses {names} unreachable")

    def status(self) -> list[dict]:
        now = trio.current_time()
        return [{"address": t.address,
                 "age": None if t.answered is None else round(now - t.answered, 3),
                 "rtt": t.rtt, "error": t.error} for t in self.targets]

    # -- running -------------------------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        socks = {}
        try:
            for v6 in sorted({t.v6 for t in self.targets}):
                family = socket.AF_INET6 if v6 else socket.AF_INET
                proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
                socks[v6] = trio.socket.socket(family, socket.SOCK_RAW, proto)
            async with trio.open_nursery() as nursery:
                for v6, sock in socks.items():
                    nursery.start_soon(self._receive, sock, v6)
                nursery.start_soon(self._send_forever, socks)
                task_status.started()
        finally:
            for sock in socks.values():
                sock.close()

    async def _send_forever(self, socks) -> None:
        while True:
            self._seq = (self._seq + 1) & 0xFFFF
            now = trio.current_time()
            for t in self.targets:
                t.sent = {s: at for s, at in t.sent.items() if now - at <= self.timeout}
                t.sent[self._seq] = now
                packet = echo_request(self.ident, self._seq, b"fusemirror", t.v6)
                try:
                    await socks[t.v6].sendto(packet, (t.address, 0))
                    t.error = None
                except OSError as e:
                    if t.error != e.strerror:
                        log.warning("witness %s: cannot send: %s", t.address, e.strerror)
                    t.error = e.strerror
            self._watch()
            await trio.sleep(self.interval)

    async def _receive(self, sock, v6: bool) -> None:
        while True:
            data, addr = await sock.recvfrom(2048)
            reply = parse_reply(data, v6)
            if reply is None or reply[0] != self.ident:
                continue
            now = trio.current_time()
            for t in self.targets:
                if t.v6 == v6 and _same(t.address, addr[0]) and reply[1] in t.sent:
                    sample = now - t.sent.pop(reply[1])
                    t.rtt = sample if t.rtt is None else 0.875 * t.rtt + 0.125 * sample
                    t.answered = now

    def _watch(self) -> None:
        now = trio.current_time()
        ok = any(t.answered is not None and now - t.answered <= self.timeout
                 for t in self.targets)
        if ok != self._was_ok:
            (log.info if ok else log.warning)("witness %s", "reachable" if ok else
                                              "UNREACHABLE")
            self._was_ok = ok


def _same(a: str, b: str) -> bool:
    try:
        return ipaddress.ip_address(a) == ipaddress.ip_address(b.split("%")[0])
    except ValueError:
        return False
