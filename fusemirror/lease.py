"""The split-brain guard in `lease` mode: a witness daemon on a third machine grants one
exclusive, expiring lease per module; a node may act alone only while it holds it.

Three layers, the first two free of I/O:

- `LeaseTable`: the rules, a pure function of (module, node, epoch, op, now);
- the datagram format (`encode_request`, `decode_request`, `encode_reply`,
  `decode_reply`) and `LeaseServer.handle(data, now)`, which adds the nonces;
- `serve()` (the daemon: `fusemirror witness --listen HOST:PORT --secrets DIR`) and
  `LeaseClient` (what the controller uses), on trio UDP sockets.

The rules (LeaseTable.request)::

    - one holder per module. ACQUIRE is granted when nobody holds an unexpired
      lease, or the asker holds it already; the lease then runs until now + length.
      A lease has expired when now >= its expiry (strictly: at the expiry instant
      another node may have it);
    - RENEW is granted only to the recorded holder (even if its lease has just
      expired, as long as nobody else took it); it extends the lease to now + length;
    - RELEASE by the recorded holder frees the lease at once; by anyone else it is
      refused (NOT_HOLDER) and changes nothing;
    - epochs: the table keeps, per module, the highest epoch carried by a request it
      granted (ACQUIRE, RENEW) or a holder's RELEASE; 0 at start. An ACQUIRE or RENEW
      whose epoch is *lower* than that is refused (EPOCH): a node with old data is
      never granted the module. An equal epoch is granted (a SECOND that followed its
      primary has its epoch); a higher one is granted and recorded, so the holder's
      epoch rises: the controller acquires with its current epoch, persists epoch+1,
      then renews with epoch+1 *before* acknowledging any write at the new epoch;
    - for `length` seconds after the witness starts it grants nothing (STARTING):
      a lease granted before a restart has expired by then. Keep `length` when
      restarting the witness. The epochs are kept in a state file (`LeaseServer`'s
      `state_file`), written and fsynced before the answer that follows a change is
      sent, so a restart does not lower the floor; without one, it starts again at 0.
    - a refused request changes nothing. The lease length is the server's, the same
      for every module (DEFAULT_LENGTH, 2.0 s); every reply says how long is left.

Datagrams (UDP; integers little-endian; names are u8 length + UTF-8, 1 to 255
bytes, except holder which is empty when nobody holds the lease)::

    request (client -> witness)           reply (witness -> client)
    off size field                        off size field
    0   4    magic  b"FMLS"               0   4    magic  b"FMLS"
    4   1    version VERSION (1)          4   1    version VERSION (1)
    5   1    op: 1 acquire, 2 renew,      5   1    0x80 | the request's op
             3 release                    6   1    status (Status: 0 granted,
    6   2    reserved 0                            1 released, 2 held, 3 epoch,
    8   16   rid: random, new for every            4 not holder, 5 challenge,
             datagram sent                         6 starting)
    24  16   nonce: the last nonce the    7   1    reserved 0
             witness gave this node for   8   16   rid, echoed from the request
             this module; zeros if none   24  16   nonce: the node's next nonce
    40  8    epoch (u64, below 2**63)     40  8    epoch: the module's highest
    48  1+n  module (in clear: selects             granted epoch (the holder's)
             the secret)                  48  4    remaining: ms the lease runs
    ..  1+n  node                                  from now (rounded down)
    end-32 32 mac                         52  4    reserved 0
                                          56  1+n  module
                                          ..  1+n  node (the requester)
                                          ..  1+n  holder (0 bytes if none)
                                          end-32 32 mac

`mac` is HMAC-SHA256 with the module's secret over every byte before it; a datagram
is at most MAX_DATAGRAM bytes. Nothing but the fixed header and the module name is
read before the MAC is verified, and a datagram that fails a check gets no answer.

Replay protection without clocks: the witness keeps, per (module, node), the last
nonce it issued. A request is carried out only when it holds exactly that nonce,
which is then replaced by a fresh random one, sent in the reply: each nonce serves
once. Any other authentic request (a replay, an old one, a node or witness that has
restarted) gets a CHALLENGE reply carrying the current nonce, and nothing changes;
the client retries once with it. The challenge does not draw a new nonce, so a
replayed datagram, or the same request reaching the witness on two addresses, does
not invalidate the nonce the real client holds. The reply echoes the client's rid,
so the client takes only the answer to the datagram it just sent. A request held
back by an attacker and delivered later, before the node's next request, is still
carried out: it can only make the witness's lease longer than the node believes,
which costs availability (the peer waits up to `length` more), never safety.

Timing budget (check_budget; defaults in brackets)::

    the holder's window  W = length * (1 - drift) - safety      [2.0*0.99-0.25 = 1.73 s]
    valid_until          = t_sent + remaining * (1 - drift) - safety

`t_sent` is the client's clock when it sent the request that was granted: the
witness received it later, so its expiry is later still. `drift` [MAX_DRIFT, 1%]
bounds how much slower the holder's clock may run than the witness's (a slow clock
makes the holder's seconds last longer than the witness's); `safety`
[0.25 s] covers the time the agents need to stop acknowledging writes once
valid_until is past (`stop_time`, [0.1 s]), and must be at least that. So the
holder stops acknowledging by valid_until + stop_time <= the witness's expiry <= the
instant the other node can be granted the lease: the two never act in overlapping
windows. The controller renews every `renew_every` [0.4 s] with a client `timeout`
[0.3 s] per attempt; check_budget requires timeout < renew_every and
3 * renew_every + timeout <= W, so that the holder keeps the lease through two lost
renewals.

How the controller uses it: check_budget() at start; acquire(epoch) before
promoting or going on alone; then, while it acts alone, renew every renew_every,
with acquire(epoch) (the holder's acquire extends its lease, and it also takes the
lease back after a witness restart) or with renew(epoch) (the strict form: refused
with NOT_HOLDER when the witness does not know this node as the holder). After every
answer, give the agents `valid_until_monotonic` (time.monotonic(), comparable
between processes) as their write deadline. The agents check the deadline right
before each acknowledgement; nothing else may acknowledge a write. A holder that was
paused (SIGSTOP) wakes with the deadline in the past and acknowledges nothing until
a renewal is granted: the monotonic clock runs on while a process is stopped. An
answer that is not a grant ends the holding at once (valid_until = -inf), except
CHALLENGE and STARTING, which decide nothing; no answer changes nothing. release()
ends it before it sends anything.

Known limits: a pause *between* an agent's check and its acknowledgement is not
covered by any lease (keep that path short and await-free); CLOCK_MONOTONIC stops
while the whole machine is suspended, so a suspended holder must not be resumed
into service without a renewal; call release() only after the agents stopped
acknowledging, since the lease can be another node's at once.
"""

from __future__ import annotations

import collections
import enum
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import socket
import struct
import time
from dataclasses import dataclass
from typing import Mapping

import trio

from .decide import Guard
from .errors import BAD_CONFIG, Failure
from .heartbeat import Reason, Rejected

log = logging.getLogger(__name__)

MAGIC = b"FMLS"
VERSION = 1
REQUEST = struct.Struct("<4sBBH16s16sQ")      # 48 bytes
REPLY = struct.Struct("<4sBBBB16s16sQII")     # 56 bytes
REPLY_BIT = 0x80
MAC_SIZE = 32
ID_SIZE = 16
NO_NONCE = bytes(ID_SIZE)
MAX_DATAGRAM = REPLY.size + 3 * 256 + MAC_SIZE    # 856: the largest reply
MAX_EPOCH = 2**63 - 1
MAX_NODES = 16            # nonces kept per module; the least recently used goes first

DEFAULT_LENGTH = 2.0      # seconds a grant lasts (the server's)
MAX_DRIFT = 0.01          # clock-rate margin
DEFAULT_SAFETY = 0.25     # seconds the holder stops before the witness's expiry
DEFAULT_STOP_TIME = 0.1   # seconds the agents may take to stop acknowledging writes
DEFAULT_RENEW_EVERY = 0.4
DEFAULT_TIMEOUT = 0.3     # seconds the client waits for an answer, per attempt

_CONFIG_REASONS = frozenset({Reason.VERSION, Reason.MAC, Reason.MODULE})


class Op(enum.IntEnum):
    ACQUIRE = 1
    RENEW = 2
    RELEASE = 3


class Status(enum.IntEnum):
    """The witness's answer; the numbers are the wire codes, stable."""

    GRANTED = 0      # the lease is the asker's for `remaining` seconds
    RELEASED = 1     # the asker's lease is freed
    HELD = 2         # another node holds an unexpired lease
    EPOCH = 3        # the asker's epoch is below the module's highest granted one
    NOT_HOLDER = 4   # renew or release by a node that does not hold the lease
    CHALLENGE = 5    # no valid current nonce: retry with the one in this reply
    STARTING = 6     # the witness has just started and grants nothing yet


_OPS, _STATUSES = frozenset(Op), frozenset(Status)


@dataclass(frozen=True, slots=True)
class Grant:
    status: Status
    holder: str | None    # who holds an unexpired lease now, None if nobody
    epoch: int            # the module's highest granted epoch (the holder's, when held)
    remaining: float      # seconds the holder's lease runs from the answer, 0 if none

    @property
    def granted(self) -> bool:
        return self.status is Status.GRANTED

    def describe(self) -> str:
        return {Status.GRANTED: f"granted at epoch {self.epoch} for {self.remaining:.1f} s",
                Status.RELEASED: "released",
                Status.HELD: f"held by {self.holder} for {self.remaining:.1f} s more",
                Status.EPOCH: f"refused: the witness granted epoch {self.epoch} already",
                Status.NOT_HOLDER: "refused: not the holder",
                Status.CHALLENGE: "challenged twice",
                Status.STARTING: "the witness has just started"}[self.status]


@dataclass(slots=True)
class _Lease:
    holder: str | None = None
    expires: float = -math.inf
    epoch: int = 0
    noted: bool = True       # its expiry has been reported


class LeaseTable:
    """The leases of every module (see "The rules" above). No I/O, no clock."""

    def __init__(self, length: float = DEFAULT_LENGTH, *, grace_until: float = -math.inf,
                 epochs: Mapping[str, int] | None = None):
        if not 0 < length <= 3600:
            raise ValueError("the lease length must be between 0 and 3600 seconds")
        self.length, self.grace_until = length, grace_until
        self._leases: dict[str, _Lease] = {m: _Lease(epoch=e) for m, e in (epochs or {}).items()}
        self._events: list[str] = []

    def epochs(self) -> dict[str, int]:
        """Each module's highest granted epoch (what a restarted witness must keep)."""
        return {m: x.epoch for m, x in self._leases.items() if x.epoch}

    def request(self, module: str, node: str, epoch: int, op: Op, now: float) -> Grant:
        op = Op(op)
        if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0:
            raise ValueError("the epoch must be a non-negative integer")
        lease = self._leases.setdefault(module, _Lease())
        self._note_expiry(module, lease, now)
        if now < self.grace_until:
            return self._answer(Status.STARTING, lease, now)
        if op is Op.RELEASE:
            if lease.holder != node:
                return self._answer(Status.NOT_HOLDER, lease, now)
            lease.holder, lease.expires, lease.noted = None, -math.inf, True
            lease.epoch = max(lease.epoch, epoch)
            self._events.append(f"lease of {module} released by {node} at epoch {lease.epoch}")
            return self._answer(Status.RELEASED, lease, now)
        if epoch < lease.epoch:
            return self._answer(Status.EPOCH, lease, now)
        if op is Op.RENEW and lease.holder != node:
            return self._answer(Status.NOT_HOLDER, lease, now)
        live = lease.holder is not None and now < lease.expires
        if live and lease.holder != node:
            return self._answer(Status.HELD, lease, now)
        if not live:
            self._events.append(f"lease of {module} granted to {node} at epoch {epoch}")
        elif epoch > lease.epoch:
            self._events.append(f"lease of {module}: {node} raised its epoch from "
                                f"{lease.epoch} to {epoch}")
        lease.holder, lease.expires, lease.epoch = node, now + self.length, epoch
        lease.noted = False
        return self._answer(Status.GRANTED, lease, now)

    def peek(self, module: str, now: float, status: Status = Status.CHALLENGE) -> Grant:
        """The module's lease as it stands, under `status`; changes nothing."""
        return self._answer(status, self._leases.get(module, _Lease()), now)

    def next_expiry(self) -> float:
        """When the next unreported expiry falls (inf if none)."""
        return min((x.expires for x in self._leases.values() if not x.noted), default=math.inf)

    def take_events(self, now: float) -> list[str]:
        """The grant changes since the last call, one sentence each, expiries up to now
        included; each is reported once."""
        for module, lease in self._leases.items():
            self._note_expiry(module, lease, now)
        events, self._events = self._events, []
        return events

    def _note_expiry(self, module: str, lease: _Lease, now: float) -> None:
        if not lease.noted and now >= lease.expires:
            lease.noted = True
            self._events.append(f"lease of {module} held by {lease.holder} at epoch "
                                f"{lease.epoch} expired")

    @staticmethod
    def _answer(status: Status, lease: _Lease, now: float) -> Grant:
        live = lease.holder is not None and now < lease.expires
        return Grant(status, lease.holder if live else None, lease.epoch,
                     lease.expires - now if live else 0.0)


# --- the datagrams -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    op: Op
    rid: bytes
    nonce: bytes
    epoch: int
    module: str
    node: str


@dataclass(frozen=True, slots=True)
class Reply:
    op: Op
    rid: bytes
    nonce: bytes
    module: str
    node: str
    grant: Grant


def _name(value: str | None, what: str, empty: bool = False) -> bytes:
    raw = (value or "").encode()
    if not (empty or raw) or len(raw) > 255:
        raise ValueError(f"{what} must be 1 to 255 bytes of UTF-8")
    return bytes([len(raw)]) + raw


def _mac(secret: bytes, body: bytes) -> bytes:
    return hmac.new(secret, body, hashlib.sha256).digest()


def encode_request(r: Request, secret: bytes) -> bytes:
    if len(r.rid) != ID_SIZE or len(r.nonce) != ID_SIZE or not 0 <= r.epoch <= MAX_EPOCH:
        raise ValueError("rid and nonce must be 16 bytes, the epoch from 0 to 2**63-1")
    body = (REQUEST.pack(MAGIC, VERSION, Op(r.op), 0, r.rid, r.nonce, r.epoch)
            + _name(r.module, "module") + _name(r.node, "node"))
    return body + _mac(secret, body)


def encode_reply(r: Reply, secret: bytes) -> bytes:
    g = r.grant
    ms = min(max(0, math.floor(g.remaining * 1000)), 2**32 - 1)
    body = (REPLY.pack(MAGIC, VERSION, REPLY_BIT | Op(r.op), Status(g.status), 0, r.rid,
                       r.nonce, g.epoch, ms, 0)
            + _name(r.module, "module") + _name(r.node, "node")
            + _name(g.holder, "holder", empty=True))
    return body + _mac(secret, body)


def _names(data: bytes, pos: int, count: int) -> list[str]:
    out = []
    for _ in range(count):
        if pos >= len(data) or pos + 1 + data[pos] > len(data):
            raise Rejected(Reason.MALFORMED, "field runs past the end")
        raw, pos = data[pos + 1:pos + 1 + data[pos]], pos + 1 + data[pos]
        try:
            out.append(raw.decode())
        except UnicodeDecodeError:
            raise Rejected(Reason.MALFORMED, "name is not UTF-8") from None
    if pos != len(data):
        raise Rejected(Reason.MALFORMED, "trailing bytes")
    return out


def _check(data: bytes, head: struct.Struct) -> tuple:
    if len(data) < head.size + 2 + MAC_SIZE:
        raise Rejected(Reason.SHORT, f"{len(data)} bytes")
    if len(data) > MAX_DATAGRAM:
        raise Rejected(Reason.OVERSIZED, f"{len(data)} bytes")
    fields = head.unpack_from(data, 0)
    if fields[0] != MAGIC:
        raise Rejected(Reason.MAGIC)
    if fields[1] != VERSION:
        raise Rejected(Reason.VERSION, f"version {fields[1]}")
    return fields


def decode_request(data: bytes, secrets: Mapping[str, bytes]) -> Request:
    """Check and unpack a request; the secret is the one of the module it names.
    Raises Rejected, and nothing else, for any input."""
    data = bytes(data)
    _, _, op, reserved, rid, nonce, epoch = _check(data, REQUEST)
    n = data[REQUEST.size]
    try:
        secret = secrets[data[REQUEST.size + 1:REQUEST.size + 1 + n].decode()]
    except (KeyError, UnicodeDecodeError):
        raise Rejected(Reason.MODULE, "unknown module") from None
    body = data[:-MAC_SIZE]
    if not hmac.compare_digest(_mac(secret, body), data[-MAC_SIZE:]):
        raise Rejected(Reason.MAC)
    if reserved or op not in _OPS or epoch > MAX_EPOCH:
        raise Rejected(Reason.MALFORMED, "reserved bits, op or epoch")
    module, node = _names(body, REQUEST.size, 2)
    if not module or not node:
        raise Rejected(Reason.MALFORMED, "empty name")
    return Request(Op(op), rid, nonce, epoch, module, node)


def decode_reply(data: bytes, secret: bytes) -> Reply:
    """Check and unpack a reply. Raises Rejected, and nothing else, for any input."""
    data = bytes(data)
    _, _, op, status, reserved, rid, nonce, epoch, ms, reserved2 = _check(data, REPLY)
    body = data[:-MAC_SIZE]
    if not hmac.compare_digest(_mac(secret, body), data[-MAC_SIZE:]):
        raise Rejected(Reason.MAC)
    if (reserved or reserved2 or not op & REPLY_BIT
            or op & ~REPLY_BIT not in _OPS or status not in _STATUSES):
        raise Rejected(Reason.MALFORMED, "not a reply, or an unknown op or status")
    module, node, holder = _names(body, REPLY.size, 3)
    return Reply(Op(op & ~REPLY_BIT), rid, nonce, module, node,
                 Grant(Status(status), holder or None, epoch, ms / 1000))


# --- the witness ---------------------------------------------------------------------------


def _nonce() -> bytes:
    while (n := os.urandom(ID_SIZE)) == NO_NONCE:
        pass
    return n


class LeaseServer:
    """The witness's protocol: datagram in, reply out (or None), with the nonces; one
    for all the addresses the witness listens on (one table of leases).

    With a `state_file`, the epochs survive a restart: loaded at start (Failure
    BAD_CONFIG if the file cannot be read or is damaged: the floor it held is not
    guessed), saved (write, fsync, rename) whenever one rose, before the answer goes out.
    A save that fails leaves the request unanswered; the next one tries again."""

    def __init__(self, secrets: Mapping[str, bytes], length: float = DEFAULT_LENGTH, *,
                 grace_until: float = -math.inf, state_file: str | None = None):
        self.secrets = dict(secrets)
        self.state_file = state_file
        self._saved = load_epochs(state_file) if state_file else {}
        self.table = LeaseTable(length, grace_until=grace_until, epochs=self._saved)
        self._nonces: dict[str, dict[str, bytes]] = {}
        self.rejected: collections.Counter[Reason] = collections.Counter()

    def _durable(self) -> bool:
        """Whether the epochs as they stand are on disk (saving them if they are not)."""
        epochs = self.table.epochs()
        if self.state_file is None or epochs == self._saved:
            return True
        try:
            save_epochs(self.state_file, epochs)
        except OSError as e:
            log.error("cannot save the epochs to %s: %s; not answering until it works",
                      self.state_file, e.strerror or e)
            return False
        self._saved = epochs
        return True

    def handle(self, data: bytes, now: float, source: object = "?") -> bytes | None:
        try:
            req = decode_request(data, self.secrets)
        except Rejected as e:
            self.rejected[e.reason] += 1
            log.debug("lease request from %s refused: %s", source, e)
            if self.rejected[e.reason] == 1 and e.reason in _CONFIG_REASONS:
                log.warning("lease request from %s refused (%s): check the module name, "
                            "its secret file and the version", source, e.reason)
            return None
        nonces = self._nonces.setdefault(req.module, {})
        current = nonces.pop(req.node, None) or _nonce()
        if hmac.compare_digest(req.nonce, current):
            grant = self.table.request(req.module, req.node, req.epoch, req.op, now)
            current = _nonce()
        else:
            grant = self.table.peek(req.module, now)
        if not self._durable():
            nonces[req.node] = current
            return None
        nonces[req.node] = current             # most recently used last
        if len(nonces) > MAX_NODES:
            del nonces[next(iter(nonces))]
        return encode_reply(Reply(req.op, req.rid, current, req.module, req.node, grant),
                            self.secrets[req.module])


def load_secrets(directory: str) -> dict[str, bytes]:
    """{module: secret} from DIR/MODULE.secret files (stripped, at least 8 bytes)."""
    try:
        names = sorted(n for n in os.listdir(directory) if n.endswith(".secret"))
    except OSError as e:
        raise Failure(BAD_CONFIG,
                      f"cannot read secrets folder {directory}: {e.strerror}") from None
    secrets = {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            with open(path, "rb") as f:
                secret = f.read().strip()
        except OSError as e:
            raise Failure(BAD_CONFIG, f"cannot read secret file {path}: {e.strerror}") from None
        if len(secret) < 8:
            raise Failure(BAD_CONFIG, f"secret file {path} holds fewer than 8 bytes")
        module = name[:-len(".secret")]
        if not 0 < len(module.encode()) <= 255:
            raise Failure(BAD_CONFIG, f"secret file {path}: the module name is empty or too long")
        secrets[module] = secret
    if not secrets:
        raise Failure(BAD_CONFIG, f"no MODULE.secret file in {directory}")
    return secrets


def load_epochs(path: str) -> dict[str, int]:
    """The epochs a witness saved in `path` ({} if there is no such file)."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise Failure(BAD_CONFIG, f"cannot read the witness state {path}: "
                                  f"{e.strerror or e}") from None
    try:
        epochs = json.loads(raw)["epochs"]
        if not (isinstance(epochs, dict) and all(
                isinstance(m, str) and isinstance(e, int) and not isinstance(e, bool)
                and 0 <= e <= MAX_EPOCH for m, e in epochs.items())):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise Failure(BAD_CONFIG, f"the witness state {path} is damaged: move it away only "
                                  f"if no node acted alone since it was written") from None
    return dict(epochs)


def save_epochs(path: str, epochs: Mapping[str, int]) -> None:
    """Write the epochs durably: a new file, fsynced, renamed over the old one."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump({"epochs": dict(epochs)}, f, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


async def serve(host: str, port: int, secrets: Mapping[str, bytes], *,
                length: float = DEFAULT_LENGTH, server: LeaseServer | None = None,
                task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Run the witness on host:port until cancelled; task_status.started(the bound port).
    Several addresses share one `server` (made here if None). Failure(BAD_CONFIG) if
    the address cannot be used."""
    if not secrets:
        raise Failure(BAD_CONFIG, "the witness has no module secret")
    if server is None:
        server = LeaseServer(secrets, length, grace_until=trio.current_time() + length)
    sock = trio.socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                              socket.SOCK_DGRAM)
    with sock:
        try:
            await sock.bind((host, port))
        except (OSError, OverflowError) as e:
            raise Failure(BAD_CONFIG, f"cannot listen on {host} port {port}: "
                          f"{getattr(e, 'strerror', None) or e}") from None
        bound = sock.getsockname()[1]
        length = server.table.length
        log.info("witness listening on %s port %d for %s; leases of %.1f s, none granted "
                 "in the first %.1f s", host, bound, ", ".join(sorted(secrets)), length, length)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_report_expiries, server.table)
            task_status.started(bound)
            while True:
                try:
                    data, source = await sock.recvfrom(MAX_DATAGRAM + 1)
                except OSError as e:
                    log.debug("witness: receive failed: %s", e)
                    continue
                now = trio.current_time()
                reply = server.handle(data, now, source[0])
                for event in server.table.take_events(now):
                    log.info("%s", event)
                if reply is not None:
                    try:
                        await sock.sendto(reply, source)
                    except OSError as e:
                        log.debug("witness: cannot answer %s: %s", source[0], e)


async def _report_expiries(table: LeaseTable) -> None:
    while True:     # all leases have one length: a new one never expires before the next
        await trio.sleep_until(min(table.next_expiry(), trio.current_time() + table.length))
        for event in table.take_events(trio.current_time()):
            log.info("%s", event)


# --- the client ----------------------------------------------------------------------------


def check_budget(length: float = DEFAULT_LENGTH, renew_every: float = DEFAULT_RENEW_EVERY,
                 safety: float = DEFAULT_SAFETY, *, drift: float = MAX_DRIFT,
                 timeout: float = DEFAULT_TIMEOUT, stop_time: float = DEFAULT_STOP_TIME) -> float:
    """The holder's window W (see "Timing budget"); ValueError if the values are unsafe."""
    for what, value in (("the lease length", length), ("the renewal interval", renew_every),
                        ("the safety margin", safety), ("the client timeout", timeout)):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"{what} must be a positive number of seconds")
    if not 0 <= drift < 0.5:
        raise ValueError("the clock drift margin must be a fraction from 0 to 0.5")
    if not stop_time >= 0:
        raise ValueError("the time to stop acknowledging writes cannot be negative")
    if safety < stop_time:
        raise ValueError(f"the safety margin ({safety} s) must cover the time the agents "
                         f"need to stop acknowledging writes ({stop_time} s)")
    window = length * (1 - drift) - safety
    if timeout >= renew_every:
        raise ValueError(f"the client timeout ({timeout} s) must be shorter than the "
                         f"renewal interval ({renew_every} s)")
    if 3 * renew_every + timeout > window:
        raise ValueError(f"renewing every {renew_every} s is too slow for a {length} s lease: "
                         f"the holder may act {window:.3f} s on a grant, which must cover two "
                         f"lost renewals and a third answered within {timeout} s; renew at "
                         f"most every {max(0.0, (window - timeout) / 3):.3f} s")
    return window


class LeaseClient:
    """Asks the witness for the module's lease on behalf of `node`.

    `addresses` are (ip, port) of the same witness; each request goes to all of them
    and the first authentic answer to it wins. One call runs at a time."""

    def __init__(self, addresses: list[tuple[str, int]], module: str, node: str,
                 secret: bytes, *, timeout: float = DEFAULT_TIMEOUT,
                 drift: float = MAX_DRIFT, safety: float = DEFAULT_SAFETY):
        if not addresses:
            raise ValueError("the lease witness needs at least one address")
        for host, port in addresses:
            ipaddress.ip_address(host)               # ValueError for a name
            if not 0 < port < 65536:
                raise ValueError(f"bad witness port {port}")
        _name(module, "module")
        _name(node, "node")
        self.addresses = [(h, p) for h, p in addresses]
        self.module, self.node, self.secret = module, node, secret
        self.timeout, self.drift, self.safety = timeout, drift, safety
        self.valid_until = -math.inf             # trio time
        self.valid_until_monotonic = -math.inf   # the same instant in time.monotonic()
        self.last: Grant | None = None           # the last answer
        self.answered: float | None = None       # when it came (trio time)
        self.unanswered = False                  # the last call got no answer
        self._nonce = NO_NONCE
        self._lock = trio.Lock()
        self._released = 0                       # counts releases: older calls grant nothing
        self._errors: dict[tuple[str, int], str | None] = {}

    def held(self) -> bool:
        return self.valid_until - trio.current_time() > 0

    def verdict(self) -> Guard:
        if self.held():
            return Guard(True, "the witness granted the lease")
        if self.unanswered or self.last is None:
            return Guard(False, "lease witness unreachable")
        return Guard(False, f"lease not granted ({self.last.describe()})")

    async def acquire(self, epoch: int) -> Grant | None:
        return await self._call(Op.ACQUIRE, epoch)

    async def renew(self, epoch: int) -> Grant | None:
        return await self._call(Op.RENEW, epoch)

    async def release(self, epoch: int) -> Grant | None:
        """Gives the lease up: held() is False from the call on, whatever the answer."""
        self._released += 1
        self.valid_until = self.valid_until_monotonic = -math.inf
        return await self._call(Op.RELEASE, epoch)

    async def _call(self, op: Op, epoch: int) -> Grant | None:
        released = self._released
        async with self._lock:
            for _ in range(2):
                rid = os.urandom(ID_SIZE)
                data = encode_request(Request(op, rid, self._nonce, epoch, self.module,
                                              self.node), self.secret)
                t_sent, m_sent = trio.current_time(), time.monotonic()
                reply = await self._exchange(data, rid, op)
                self.unanswered = reply is None
                if reply is None:
                    return None
                self._nonce = reply.nonce
                if reply.grant.status is not Status.CHALLENGE:
                    break
            g = self.last = reply.grant
            self.answered = trio.current_time()
            if g.granted and g.holder == self.node and released == self._released:
                keep = g.remaining * (1 - self.drift) - self.safety
                self.valid_until, self.valid_until_monotonic = t_sent + keep, m_sent + keep
            elif g.status not in (Status.CHALLENGE, Status.STARTING):
                self.valid_until = self.valid_until_monotonic = -math.inf
            return g

    def _match(self, data: bytes, rid: bytes, op: Op) -> Reply | None:
        """The reply to the request (rid, op) of this node, or None."""
        try:
            r = decode_reply(data, self.secret)
        except Rejected:
            return None
        if (r.rid != rid or r.op is not op or r.module != self.module or r.node != self.node):
            return None
        return r

    async def _exchange(self, data: bytes, rid: bytes, op: Op) -> Reply | None:
        socks: dict[int, trio.socket.SocketType] = {}
        found: list[Reply] = []
        try:
            sent = 0
            for address in self.addresses:
                family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
                error = None
                try:
                    if family not in socks:
                        socks[family] = trio.socket.socket(family, socket.SOCK_DGRAM)
                    await socks[family].sendto(data, address)
                    sent += 1
                except OSError as e:
                    error = e.strerror or str(e)
                    if error != self._errors.get(address):
                        log.warning("lease witness %s port %d: cannot send: %s",
                                    *address, error)
                self._errors[address] = error
            if sent:
                with trio.move_on_after(self.timeout):
                    async with trio.open_nursery() as nursery:
                        for sock in socks.values():
                            nursery.start_soon(self._listen, sock, rid, op, found,
                                               nursery.cancel_scope)
        finally:
            for sock in socks.values():
                sock.close()
        return found[0] if found else None

    async def _listen(self, sock, rid: bytes, op: Op, found: list, scope) -> None:
        while True:
            try:
                data, _ = await sock.recvfrom(MAX_DATAGRAM + 1)
            except OSError:
                return
            reply = self._match(data, rid, op)
            if reply is not None:
                found.append(reply)
                scope.cancel()
                return
