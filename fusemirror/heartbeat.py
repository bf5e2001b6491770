"""Heartbeats between the two controllers: the datagram format, replay protection,
and the UDP service that runs them on every network.

The first half of this module does no I/O. It turns heartbeats into datagrams and
back, and decides which datagrams to believe; it is the commented specification
of the format, and docs/heartbeats.md describes the same thing for humans. The
second half (Heartbeats) is the trio service that sends and receives them.

Datagram layout (all integers little-endian)::

    offset size field
    0      4    magic      b"FMHB"
    4      1    version    datagram format version, VERSION (1)
    5      1    path       index of the network it is sent on: the position of the address
                           pair in the module config, the same on both nodes
    6      2    reserved   0
    8      16   boot       the sender's boot id: random, drawn at every process start;
                           never all zeros
    24     8    seq        sequence number: starts at 1 for each boot and grows by one for
                           every datagram sent, on whichever network (one counter per boot)
    32     8    sent       the sender's monotonic clock when it sent this, nanoseconds
    40     16   echo_boot  \\  the last authentic datagram the sender received from the
    56     8    echo_seq    |  receiver *on this network*: its boot and seq, its `sent`
    64     8    echo_sent   |  copied back unchanged, and how long the sender held it
    72     8    echo_hold  /   before sending this one (ns). All zero when it has none.
    80     1+n  module     u8 length + UTF-8 module name
    ..     1+n  node       u8 length + UTF-8 name of the sending node
    ..     2+n  status     u16 length + UTF-8 JSON object: the sender's published status
    end-32 32   mac        HMAC-SHA256 with the module secret over every byte before it

A datagram is at most MAX_DATAGRAM (1200) bytes, so it is never fragmented. The
status is a flat JSON object whose keys are short strings and whose values are
null, booleans, integers (64-bit), finite floats or strings; the controller
defines the keys it publishes (state, code, ready, reason, epoch, uptodate,
lastprim).
A receiver ignores keys it does not know, so keys are added without a version
change. A change of layout bumps VERSION; a receiver decodes every version in
VERSIONS, so a build that knows version 2 keeps decoding and sending version 1
while its peer is older, and the two run side by side during an upgrade.

The HMAC input starts with the magic, so a heartbeat can never pass for a
replication handshake proof made with the same secret (those start with b"primary"
or b"replica"), nor the reverse.

Which authentic datagrams are believed (PeerTracker)::

    - module and sender must be this module and the peer (a datagram of our own,
      reflected back, is refused), and `path` the network it arrived on;
    - per (peer boot, path) seq must be greater than the highest accepted so far:
      a captured datagram replayed, or an old one overtaken, is refused ("replay").
      Per path, because the networks do not keep order between each other;
    - a boot id other than the current one is believed only when the datagram
      echoes *our* current boot, with an echo_seq greater than the one that
      confirmed the current peer boot. It was then made after the peer heard a
      datagram we sent after the current peer boot had heard us, so it cannot be
      a recording of an older boot, whatever either clock says, and even when the
      receiver has restarted and forgotten everything. Until the peer has heard us
      it is refused as "unconfirmed" (normal for about one interval after either
      node starts). When believed it becomes current, the previous boot id is
      retired (the last RETIRED_BOOTS are remembered and refused as "retired"),
      and datagrams of the new boot with a seq below the confirming one are
      refused: they were made before it was confirmed;
    - the published status is taken from the newest seq of the current boot only.

Known limit: an attacker on the path who holds authentic datagrams back and
releases them later makes a dead peer look alive for as long as his stock lasts;
he could as well drop them all. Heartbeats decide nothing alone: the guard
(witness) decides about failover.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import itertools
import json
import logging
import math
import os
import socket
import struct
from dataclasses import dataclass
from typing import Callable, NamedTuple

import trio

from .errors import BAD_CONFIG, Failure

log = logging.getLogger(__name__)

MAGIC = b"FMHB"
VERSION = 1
VERSIONS = frozenset({1})
# magic, version, path, reserved, boot, seq, sent, echo_boot, echo_seq, echo_sent, echo_hold
HEAD = struct.Struct("<4sBBH16sQq16sQqq")    # 80 bytes
MAC_SIZE = 32
BOOT_SIZE = 16
MAX_DATAGRAM = 1200
MIN_DATAGRAM = HEAD.size + 1 + 1 + 2 + MAC_SIZE
NO_BOOT = bytes(BOOT_SIZE)
RETIRED_BOOTS = 16
MAX_KEY = 32
_INT64 = 2**63

DEFAULT_INTERVAL = 0.2   # seconds between heartbeats on each network
DEFAULT_TIMEOUT = 1.0    # a network is down when nothing was heard on it for this long


MIN_GAP = 0.02          # seconds between two rounds of heartbeats, at the least


class Reason(enum.StrEnum):
    """Why a datagram was refused. The values are stable: they are metric labels."""

    SHORT = "short"              # smaller than any datagram
    OVERSIZED = "oversized"      # larger than MAX_DATAGRAM
    MAGIC = "magic"              # not a fusemirror heartbeat
    VERSION = "version"          # a datagram version this build does not know
    MAC = "mac"                  # HMAC does not match: another secret, or damaged
    MALFORMED = "malformed"      # authentic but does not follow this specification
    MODULE = "module"            # authentic, for another module sharing the secret
    NODE = "node"                # not sent by the peer (e.g. our own datagram reflected)
    PATH = "path"                # sent for another network than the one it arrived on
    UNCONFIRMED = "unconfirmed"  # a boot id not (yet) proven fresh
    RETIRED = "retired"          # a boot id the peer has left behind
    REPLAY = "replay"            # seq not newer than what was accepted


# Refusals that mean a misconfigured peer rather than noise: logged (once each).
_CONFIG_REASONS = frozenset({Reason.VERSION, Reason.MAC, Reason.MODULE, Reason.NODE})


class Rejected(Exception):
    """A datagram that must not be believed; .reason is a Reason."""

    def __init__(self, reason: Reason, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Echo:
    boot: bytes   # the receiver's boot id, as the sender heard it
    seq: int
    sent: int     # the receiver's own clock, ns, copied back
    hold: int     # ns between the sender receiving it and sending the echo


@dataclass(frozen=True, slots=True)
class Heartbeat:
    module: str
    node: str
    boot: bytes
    path: int
    seq: int
    sent: int
    status: dict
    echo: Echo | None = None


def _status_problem(status) -> str | None:
    if not isinstance(status, dict):
        return "status is not an object"
    for k, v in status.items():
        if not isinstance(k, str) or not 0 < len(k) <= MAX_KEY:
            return f"bad status key {k!r}"
        if isinstance(v, bool) or v is None or isinstance(v, str):
            continue
        if isinstance(v, int):
            if not -_INT64 <= v < _INT64:
                return f"status {k} out of range"
        elif isinstance(v, float):
            if not math.isfinite(v):
                return f"status {k} is not finite"
        else:
            return f"status {k} is not a scalar"
    return None


def _text(value: str, what: str) -> bytes:
    raw = value.encode()
    if not 0 < len(raw) <= 255:
        raise ValueError(f"{what} must be 1 to 255 bytes of UTF-8")
    return bytes([len(raw)]) + raw


def encode(hb: Heartbeat, secret: bytes) -> bytes:
    """The datagram for hb, signed with secret. ValueError if hb does not fit the format."""
    problem = _status_problem(hb.status)
    if problem:
        raise ValueError(problem)
    if len(hb.boot) != BOOT_SIZE or hb.boot == NO_BOOT or hb.seq < 1:
        raise ValueError("boot must be 16 bytes, not all zeros, and seq at least 1")
    e = hb.echo or Echo(NO_BOOT, 0, 0, 0)
    try:
        head = HEAD.pack(MAGIC, VERSION, hb.path, 0, hb.boot, hb.seq, hb.sent,
                         e.boot, e.seq, e.sent, e.hold)
    except struct.error as err:
        raise ValueError(f"cannot encode field: {err}") from None
    status = json.dumps(hb.status, separators=(",", ":"), sort_keys=True,
                        ensure_ascii=False).encode()
    body = (head + _text(hb.module, "module") + _text(hb.node, "node")
            + len(status).to_bytes(2, "little") + status)
    if len(body) + MAC_SIZE > MAX_DATAGRAM:
        raise ValueError(f"heartbeat of {len(body) + MAC_SIZE} bytes exceeds {MAX_DATAGRAM}")
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def _take(data: bytes, pos: int, width: int) -> tuple[bytes, int]:
    n = int.from_bytes(data[pos:pos + width], "little")
    pos += width
    if pos + n > len(data):
        raise Rejected(Reason.MALFORMED, "field runs past the end")
    return data[pos:pos + n], pos + n


def _no_constant(name):
    raise ValueError(f"{name} is not allowed")


def decode(data: bytes, secret: bytes) -> Heartbeat:
    """Check and unpack one datagram. Raises Rejected, and nothing else, for any
    input. Nothing after the fixed header is parsed before the HMAC is verified."""
    data = bytes(data)
    if len(data) < MIN_DATAGRAM:
        raise Rejected(Reason.SHORT, f"{len(data)} bytes")
    if len(data) > MAX_DATAGRAM:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes")
    (magic, version, path, reserved, boot, seq, sent,
     eboot, eseq, esent, ehold) = HEAD.unpack_from(data, 0)
    if magic != MAGIC:
        raise Rejected(Reason.MAGIC)
    if version not in VERSIONS:
        raise Rejected(Reason.VERSION, f"version {version}")
    body = data[:-MAC_SIZE]
    if not hmac.compare_digest(hmac.new(secret, body, hashlib.sha256).digest(),
                               data[-MAC_SIZE:]):
        raise Rejected(Reason.MAC)
    if reserved or boot == NO_BOOT or seq < 1:
        raise Rejected(Reason.MALFORMED, "reserved bits, zero boot id or zero seq")
    module, pos = _take(body, HEAD.size, 1)
    node, pos = _take(body, pos, 1)
    raw, pos = _take(body, pos, 2)
    if pos != len(body):
        raise Rejected(Reason.MALFORMED, "trailing bytes")
    try:
        module, node = module.decode(), node.decode()
        status = json.loads(raw.decode(), parse_constant=_no_constant)
    except (ValueError, RecursionError) as err:   # UnicodeDecodeError is a ValueError
        raise Rejected(Reason.MALFORMED, str(err)) from None
    problem = _status_problem(status)
    if problem or not module or not node:
        raise Rejected(Reason.MALFORMED, problem or "empty name")
    echo = None if eboot == NO_BOOT and eseq == 0 else Echo(eboot, eseq, esent, ehold)
    return Heartbeat(module, node, boot, path, seq, sent, status, echo)


class Verdict(NamedTuple):
    heartbeat: Heartbeat | None   # set when believed
    reason: Reason | None         # set when refused


class PeerTracker:
    """What one node believes of its peer's heartbeats (see "Which authentic
    datagrams are believed" above). No I/O, no clock: times are passed in."""

    def __init__(self, module: str, peer: str, secret: bytes, our_boot: bytes):
        self.module, self.peer, self.secret, self.our_boot = module, peer, secret, our_boot
        self.boot: bytes | None = None     # the peer's current boot id
        self._confirmed_by = 0             # our seq echoed when it was confirmed
        self._floor = 0                    # its seq when it was confirmed
        self._highest: dict[int, int] = {}
        self._retired: collections.deque[bytes] = collections.deque(maxlen=RETIRED_BOOTS)
        self._echo: dict[int, tuple[bytes, int, int, int]] = {}
        self._status_seq = 0
        self.status: dict | None = None
        self.status_sent_after: int | None = None   # see Heartbeats.peer_status_sent_after

    def receive(self, data: bytes, path: int, now: int) -> Verdict:
        """Judge a datagram that arrived on network `path` at `now` (ns). Never raises."""
        try:
            hb = decode(data, self.secret)
            self._judge(hb, path, now)
        except Rejected as e:
            return Verdict(None, e.reason)
        return Verdict(hb, None)

    def _judge(self, hb: Heartbeat, path: int, now: int) -> None:
        if hb.module != self.module:
            raise Rejected(Reason.MODULE, hb.module)
        if hb.node != self.peer:
            raise Rejected(Reason.NODE, hb.node)
        if hb.path != path:
            raise Rejected(Reason.PATH, f"sent for network {hb.path}, received on {path}")
        if hb.boot in self._retired:
            raise Rejected(Reason.RETIRED)
        if hb.boot != self.boot:
            e = hb.echo
            self._echo[path] = (hb.boot, hb.seq, hb.sent, now)   # lets the peer confirm us
            if e is None or e.boot != self.our_boot or e.seq <= self._confirmed_by:
                raise Rejected(Reason.UNCONFIRMED)
            if self.boot is not None:
                self._retired.append(self.boot)
            self.boot, self._confirmed_by, self._floor = hb.boot, e.seq, hb.seq
            self._highest, self._status_seq, self.status = {}, 0, None
            self.status_sent_after = None
        elif hb.seq < self._floor or hb.seq <= self._highest.get(path, 0):
            raise Rejected(Reason.REPLAY, f"seq {hb.seq}")
        self._highest[path] = hb.seq
        self._echo[path] = (hb.boot, hb.seq, hb.sent, now)
        if hb.seq > self._status_seq:
            self._status_seq, self.status = hb.seq, hb.status
            e = hb.echo
            # The peer sent it no earlier than it received our datagram (sent at e.sent
            # on our clock) plus how long it held that one: a bound that needs no clock
            # agreement, only the peer's measure of a short interval.
            self.status_sent_after = (e.sent + e.hold if e is not None and e.boot == self.our_boot
                                      else None)

    def echo(self, path: int, now: int) -> Echo | None:
        """What to echo in the next datagram sent on `path` at `now` (ns)."""
        got = self._echo.get(path)
        if got is None:
            return None
        boot, seq, sent, received = got
        return Echo(boot, seq, sent, max(0, now - received))


# --- the service -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PathStatus:
    index: int
    local: str
    peer: str
    up: bool               # a heartbeat was believed on it within the timeout
    age: float | None      # seconds since the last one, None if never
    rtt: float | None      # smoothed round trip in seconds, None before the first sample
    error: str | None      # the last socket error, None while sending works


class _Path:
    """One network: its socket and what was last heard on it."""

    def __init__(self, index: int, local: str, peer: str):
        self.index, self.local, self.peer = index, local, peer
        self.sock = None
        self.heard: float | None = None
        self.rtt: float | None = None
        self.error: str | None = None
        self.was_up = False

    def sample_rtt(self, rtt: float) -> None:
        self.rtt = rtt if self.rtt is None else 0.875 * self.rtt + 0.125 * rtt


def _ns(t: float) -> int:
    return round(t * 1e9)


class Heartbeats:
    """Sends heartbeats to the peer on every network and judges the ones it sends.

    `addresses` lists (local_ip, peer_ip) per network, in config order (that order
    numbers the networks on both nodes). The sockets bind local_ip:port and send to
    peer_ip:peer_port (peer_port defaults to port; tests on one machine set it).
    `status_fn()` returns the status to publish; it is called at every send."""

    def __init__(self, local_node: str, peer_node: str, addresses: list[tuple[str, str]],
                 port: int, secret: bytes, interval: float, timeout: float,
                 status_fn: Callable[[], dict], *, module: str, peer_port: int | None = None):
        if not addresses:
            raise ValueError("at least one network is needed")
        if not 0 < interval < timeout:
            raise ValueError("the heartbeat interval must be positive and below the timeout")
        self.local_node, self.peer_node, self.module = local_node, peer_node, module
        self.port, self.peer_port = port, port if peer_port is None else peer_port
        self.secret, self.interval, self.timeout = secret, interval, timeout
        self._status_fn = status_fn
        self.boot = os.urandom(BOOT_SIZE)
        self._seq = itertools.count(1)
        self._tracker = PeerTracker(module, peer_node, secret, self.boot)
        self._paths = [_Path(i, local, peer) for i, (local, peer) in enumerate(addresses)]
        self._noted: float | None = None
        self._poke = trio.Event()
        self._rejected: collections.Counter[Reason] = collections.Counter()

    # -- what the controller reads ------------------------------------------

    def note_alive(self) -> None:
        """Other evidence that the peer lives (a replication acknowledgement)."""
        self._noted = trio.current_time()

    def send_now(self) -> None:
        """The status changed: send it at once rather than at the next interval (at
        most one extra round per MIN_GAP, so a burst of changes is not a flood)."""
        self._poke.set()

    def peer_alive(self) -> bool:
        now = trio.current_time()
        heard = [p.heard for p in self._paths] + [self._noted]
        return any(t is not None and now - t <= self.timeout for t in heard)

    def paths(self) -> list[PathStatus]:
        now = trio.current_time()
        return [PathStatus(p.index, p.local, p.peer,
                           p.heard is not None and now - p.heard <= self.timeout,
                           None if p.heard is None else now - p.heard, p.rtt, p.error)
                for p in self._paths]

    def peer_status(self) -> dict | None:
        """The last status the peer published, from its current boot, or None."""
        s = self._tracker.status
        return None if s is None else dict(s)

    def peer_status_sent_after(self) -> float | None:
        """A time (trio.current_time()) before which the peer cannot have sent the status
        peer_status() returns, or None when that status echoes nothing of ours. A status
        held up in the network (queued for an ARP answer while a cable was out, say)
        arrives long after it was true: chaos seed 14 took one sent by a controller just
        killed for news, and fenced the node that had taken over."""
        t = self._tracker.status_sent_after
        return None if t is None else t / 1e9

    def rejected(self) -> dict[str, int]:
        """How many datagrams were refused, by Reason (its string value)."""
        return {str(r): n for r, n in self._rejected.items()}

    # -- running ------------------------------------------------------------

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Bind every network's socket (Failure(BAD_CONFIG) if one cannot be bound,
        none left open), then send and receive until cancelled."""
        try:
            for p in self._paths:
                family = socket.AF_INET6 if ":" in p.local else socket.AF_INET
                p.sock = trio.socket.socket(family, socket.SOCK_DGRAM)
                try:
                    await p.sock.bind((p.local, self.port))
                except OSError as e:
                    raise Failure(BAD_CONFIG, f"cannot use heartbeat address {p.local} port "
                                  f"{self.port}: {e.strerror}") from None
            async with trio.open_nursery() as nursery:
                for p in self._paths:
                    nursery.start_soon(self._receive_on, p)
                nursery.start_soon(self._send_forever)
                task_status.started()
        finally:
            for p in self._paths:
                if p.sock is not None:
                    p.sock.close()

    async def _send_forever(self) -> None:
        deadline = trio.current_time()
        while True:
            status = self._status_fn()
            for p in self._paths:
                await self._send_on(p, status)
            self._watch()
            deadline = max(deadline + self.interval, trio.current_time())
            await trio.sleep(MIN_GAP)
            with trio.move_on_at(deadline):
                await self._poke.wait()
            if self._poke.is_set():
                self._poke = trio.Event()
                deadline = trio.current_time()

    async def _send_on(self, p: _Path, status: dict) -> None:
        now = _ns(trio.current_time())
        hb = Heartbeat(self.module, self.local_node, self.boot, p.index, next(self._seq), now,
                       status, self._tracker.echo(p.index, now))
        try:
            await p.sock.sendto(encode(hb, self.secret), (p.peer, self.peer_port))
        except (OSError, trio.ClosedResourceError) as e:
            error = getattr(e, "strerror", None) or str(e) or type(e).__name__
            if error != p.error:
                log.warning("heartbeat network %d: cannot send from %s to %s: %s",
                            p.index, p.local, p.peer, error)
            p.error = error
        else:
            p.error = None

    async def _receive_on(self, p: _Path) -> None:
        while True:
            try:
                data, _ = await p.sock.recvfrom(MAX_DATAGRAM + 1)
            except trio.ClosedResourceError:
                p.error = "socket closed"
                return
            except OSError as e:
                log.debug("heartbeat network %d: receive failed: %s", p.index, e)
                await trio.sleep(self.interval)
                continue
            self._received(p, data)

    def _received(self, p: _Path, data: bytes) -> None:
        now = trio.current_time()
        hb, reason = self._tracker.receive(data, p.index, _ns(now))
        if reason is not None:
            self._rejected[reason] += 1
            log.debug("heartbeat on network %d refused: %s", p.index, reason)
            if self._rejected[reason] == 1 and reason in _CONFIG_REASONS:
                log.warning("heartbeat on network %d refused (%s): check the peer's "
                            "module name, node name, secret and version", p.index, reason)
            return
        p.heard = now
        e = hb.echo
        if e is not None and e.boot == self.boot:
            p.sample_rtt(max(0.0, (_ns(now) - e.sent - e.hold) / 1e9))

    def _watch(self) -> None:
        """Log each network going up or down, once per change."""
        for s in self.paths():
            p = self._paths[s.index]
            if s.up != p.was_up:
                if s.up:
                    log.info("heartbeat network %d (%s -> %s) up", s.index, s.local, s.peer)
                else:
                    log.warning("heartbeat network %d (%s -> %s) down: nothing heard for "
                                "%.1f s", s.index, s.local, s.peer, s.age)
                p.was_up = s.up
