"""The replication wire protocol: framing, messages and the handshake.

This module does no I/O. It turns messages into bytes and bytes back into
messages, and it is the commented specification of the format; docs/protocol.md
describes the same thing for humans.

Frame layout (all integers little-endian)::

    offset size field
    0      2    magic      b"FM"
    2      1    format     frame format version, FRAME_FORMAT (1)
    3      1    kind       message kind (see Kind)
    4      1    flags      bit 0: payload is lz4-compressed (block format, size-prefixed)
    5      1    reserved   0
    6      4    length     payload length in bytes, as sent (<= MAX_PAYLOAD)
    10     8    seq        sequence number of the operation (0 for handshake messages)
    18     8    checksum   xxh3_64 of the payload as sent followed by bytes 0..17
    26     ...  payload    the message's fields (see SCHEMAS)

The checksum covers the header and the payload, so a flipped bit anywhere is a
ChecksumError and the frame is never applied.

Payload: the fixed-size fields of the message, packed in schema order, then each
variable-size field (bytes) as a u32 length followed by the bytes.

Protocol versions: the frame format above is shared by every version. The
handshake (HELLO carries the range of protocol versions a node speaks, CHALLENGE
carries the version the replica chose) selects the highest version both speak,
so version N and N+1 run side by side during a rolling upgrade. A message kind
that the negotiated version does not know is a ProtocolError.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import operator
import struct
from dataclasses import dataclass

import lz4.block
import xxhash

MAGIC = b"FM"
FRAME_FORMAT = 1
HEADER = struct.Struct("<2sBBBxIQ")  # magic, format, kind, flags, length, seq
CHECKSUM = struct.Struct("<Q")
HEADER_SIZE = HEADER.size + CHECKSUM.size  # 26
MAX_PAYLOAD = 64 * 1024 * 1024

FLAG_LZ4 = 0x01

# Protocol versions this build speaks. Version 1 is the first; a later build adds
# message kinds and raises PROTOCOL_MAX, keeping PROTOCOL_MIN while it can still
# talk to the previous release.
PROTOCOL_MIN = 1
PROTOCOL_MAX = 2

# Payloads smaller than this are never compressed; larger ones are compressed when
# a sample of them compresses well (see maybe_compress).
COMPRESS_MIN = 4096
_SAMPLE = 4096


class ProtocolError(Exception):
    """The peer sent something that does not follow this specification."""


class ChecksumError(ProtocolError):
    """A frame's checksum does not match: it was damaged on the way."""


class Kind(enum.IntEnum):
    # handshake
    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    WELCOME = 4
    REFUSE = 5
    BYE = 6
    # operations, primary -> replica; each is answered by one ACK with the same seq
    OPEN = 10
    CREATE = 11
    WRITE = 12
    RELEASE = 13
    FSYNC = 14
    SETATTR = 15
    MKNOD = 16
    MKDIR = 17
    SYMLINK = 18
    LINK = 19
    UNLINK = 20
    RMDIR = 21
    RENAME = 22
    SETXATTR = 23
    REMOVEXATTR = 24
    FSYNCDIR = 25
    MANIFEST_REQ = 26
    PING = 27
    # resynchronisation (protocol 2), primary -> replica
    RESYNC_BEGIN = 28
    PROBE = 29
    PUT = 30
    REMOVE = 31
    RESYNC_DONE = 32
    # replica -> primary
    ACK = 40
    MANIFEST = 41


class Refusal(enum.IntEnum):
    """Why a replica refused a handshake (REFUSE.code)."""

    VERSION = 1
    AUTH = 2
    BUSY = 3
    NOT_REPLICA = 4


# Field kinds: fixed-size struct codes, or "b" for a length-prefixed byte string.
# Schemas list fixed fields first; the order is the wire order.
SCHEMAS: dict[Kind, tuple[tuple[str, str], ...]] = {
    Kind.HELLO: (("version_min", "H"), ("version_max", "H"), ("session", "Q"),
                 ("nonce", "b"), ("label", "b")),
    Kind.CHALLENGE: (("version", "H"), ("nonce", "b"), ("proof", "b")),
    Kind.AUTH: (("proof", "b"),),
    # last_seq: highest operation of this session the replica applied (0 when the
    # session is new to it); uptodate: the replica's copy is known to equal the
    # primary's as of last_seq.
    Kind.WELCOME: (("last_seq", "Q"), ("resumed", "B"), ("uptodate", "B")),
    Kind.REFUSE: (("code", "B"), ("reason", "b")),
    Kind.BYE: (),
    Kind.OPEN: (("handle", "Q"), ("flags", "I"), ("mtime", "q"), ("path", "b")),
    Kind.CREATE: (("handle", "Q"), ("flags", "I"), ("mode", "I"), ("uid", "I"), ("gid", "I"),
                  ("mtime", "q"), ("pmtime", "q"), ("parent", "b"), ("name", "b")),
    Kind.WRITE: (("handle", "Q"), ("offset", "Q"), ("mtime", "q"), ("data", "b")),
    Kind.RELEASE: (("handle", "Q"),),
    Kind.FSYNC: (("handle", "Q"), ("datasync", "B")),
    # handle 0: by path. mask: bit mask of ATTR_*; times are absolute nanoseconds.
    Kind.SETATTR: (("handle", "Q"), ("mask", "I"), ("mode", "I"), ("uid", "I"), ("gid", "I"),
                   ("size", "Q"), ("atime", "q"), ("mtime", "q"), ("path", "b")),
    Kind.MKNOD: (("mode", "I"), ("rdev", "Q"), ("uid", "I"), ("gid", "I"), ("mtime", "q"),
                 ("pmtime", "q"), ("parent", "b"), ("name", "b")),
    Kind.MKDIR: (("mode", "I"), ("uid", "I"), ("gid", "I"), ("mtime", "q"), ("pmtime", "q"),
                 ("parent", "b"), ("name", "b")),
    Kind.SYMLINK: (("uid", "I"), ("gid", "I"), ("mtime", "q"), ("pmtime", "q"),
                   ("parent", "b"), ("name", "b"), ("target", "b")),
    Kind.LINK: (("pmtime", "q"), ("source", "b"), ("parent", "b"), ("name", "b")),
    Kind.UNLINK: (("pmtime", "q"), ("parent", "b"), ("name", "b")),
    Kind.RMDIR: (("pmtime", "q"), ("parent", "b"), ("name", "b")),
    Kind.RENAME: (("flags", "I"), ("pmtime_old", "q"), ("pmtime_new", "q"),
                  ("parent_old", "b"), ("name_old", "b"), ("parent_new", "b"), ("name_new", "b")),
    Kind.SETXATTR: (("path", "b"), ("name", "b"), ("value", "b")),
    Kind.REMOVEXATTR: (("path", "b"), ("name", "b")),
    Kind.FSYNCDIR: (("datasync", "B"), ("path", "b")),
    Kind.MANIFEST_REQ: (),
    Kind.PING: (),
    # The replica's copy is out of date from now until a RESYNC_DONE it accepts. full=0:
    # only what the primary's journal recorded will be compared; the replica refuses
    # (ACK ESTALE) when its copy may hold changes of its own (it was a primary since,
    # with changes its peer lacks, acknowledged or not).
    Kind.RESYNC_BEGIN: (("full", "B"),),
    # Describe the node at path (answered by MANIFEST frames holding one JSON object):
    # what bit 0: a directory's entries, bit 1: a file's hashes of blocks of `chunk`
    # bytes; blocks: empty (all), or JSON [[first, last], ...] block ranges to hash.
    Kind.PROBE: (("what", "B"), ("chunk", "I"), ("path", "b"), ("blocks", "b")),
    # Write data at offset into the file at path (resynchronisation of a chunk).
    Kind.PUT: (("offset", "Q"), ("path", "b"), ("data", "b")),
    # Remove whatever is at path, a directory with everything under it.
    Kind.REMOVE: (("path", "b"),),
    # Every difference was sent: the replica makes its copy durable and marks it up to
    # date, unless a change failed there since the previous RESYNC_DONE (ACK EAGAIN).
    Kind.RESYNC_DONE: (),
    # errno 0: applied. Otherwise the replica could not apply the operation.
    Kind.ACK: (("errno", "I"),),
    # One chunk of the replica's manifest (JSON lines); last=1 on the final chunk.
    Kind.MANIFEST: (("last", "B"), ("chunk", "b")),
}

# Message kinds introduced by each protocol version (cumulative).
_RESYNC_KINDS = frozenset({Kind.RESYNC_BEGIN, Kind.PROBE, Kind.PUT, Kind.REMOVE,
                           Kind.RESYNC_DONE})
KINDS_BY_VERSION: dict[int, frozenset[Kind]] = {1: frozenset(Kind) - _RESYNC_KINDS,
                                                2: frozenset(Kind)}

ATTR_SIZE = 1
ATTR_MODE = 2
ATTR_UID = 4
ATTR_GID = 8
ATTR_ATIME = 16
ATTR_MTIME = 32

HANDSHAKE_KINDS = frozenset({Kind.HELLO, Kind.CHALLENGE, Kind.AUTH, Kind.WELCOME, Kind.REFUSE})
REPLY_KINDS = frozenset({Kind.ACK, Kind.MANIFEST})


@dataclass(slots=True)
class Message:
    kind: Kind
    seq: int
    fields: dict

    def __getattr__(self, name):
        try:
            return self.fields[name]
        except KeyError:
            raise AttributeError(name) from None


_BULK = frozenset({"data", "chunk"})


class _Codec:
    """Packs and unpacks the payload of one message kind."""

    __slots__ = ("names", "fixed", "var", "_values")

    def __init__(self, schema):
        self.names = [n for n, k in schema if k != "b"]
        self.fixed = struct.Struct("<" + "".join(k for _, k in schema if k != "b"))
        self.var = [n for n, k in schema if k == "b"]
        if len(self.names) > 1:
            self._values = operator.itemgetter(*self.names)     # a tuple of the values
        else:
            names = self.names
            self._values = lambda fields: tuple(fields[n] for n in names)

    def pack(self, fields: dict) -> list:
        try:
            parts = [self.fixed.pack(*self._values(fields))]
            for n in self.var:
                v = fields[n]
                parts.append(struct.pack("<I", len(v)))
                parts.append(v)
        except (KeyError, struct.error) as e:
            raise ValueError(f"cannot encode field: {e}") from None
        return parts

    def unpack(self, payload) -> dict:
        view = memoryview(payload)
        try:
            out = dict(zip(self.names, self.fixed.unpack_from(view, 0)))
            pos = self.fixed.size
            for n in self.var:
                (ln,) = struct.unpack_from("<I", view, pos)
                pos += 4
                if pos + ln > len(view):
                    raise ProtocolError("field runs past the end of the payload")
                # Bulk data stays a zero-copy view when the payload is a private buffer.
                if n in _BULK and ln > 65536 and isinstance(payload, bytearray):
                    out[n] = view[pos:pos + ln]
                else:
                    out[n] = bytes(view[pos:pos + ln])
                pos += ln
        except struct.error:
            raise ProtocolError("payload too short for its message kind") from None
        if pos != len(view):
            raise ProtocolError("trailing bytes after the last field")
        return out


_CODECS = {kind: _Codec(schema) for kind, schema in SCHEMAS.items()}
_KIND_OF = {int(kind): kind for kind in Kind}


def maybe_compress(data: bytes) -> bytes | None:
    """lz4-compress data when it pays: None when it does not (too small, or a
    sample of it does not shrink by at least a quarter)."""
    if len(data) < COMPRESS_MIN:
        return None
    sample = lz4.block.compress(data[:_SAMPLE], store_size=False)
    if len(sample) > _SAMPLE * 3 // 4:
        return None
    packed = lz4.block.compress(data)
    return packed if len(packed) < len(data) else None


# Payloads up to this size are joined and hashed in one call with the header (cheaper than
# a streaming hash for the small frames of namespace operations and acknowledgements).
_SMALL = 16384


class Prepared:
    """A message encoded up to its sequence number: the payload is packed, compressed
    and hashed once; stamp(seq) adds the header. Lets a sender encode outside its
    send lock and number the frame inside it."""

    __slots__ = ("kind", "flags", "parts", "length", "_hash")

    def __init__(self, kind: Kind, fields: dict | None, compress: bool):
        parts = _CODECS[kind].pack(fields or {})
        plain = sum(len(p) for p in parts)
        if plain > MAX_PAYLOAD:
            raise ValueError(f"payload of {plain} bytes exceeds the {MAX_PAYLOAD} byte limit")
        flags = 0
        if compress:
            packed = maybe_compress(b"".join(parts))
            if packed is not None:
                parts, flags = [packed], FLAG_LZ4
        self.length = sum(len(p) for p in parts)
        if self.length > MAX_PAYLOAD:
            raise ValueError(f"payload of {self.length} bytes exceeds the {MAX_PAYLOAD} byte limit")
        self.kind, self.flags = kind, flags
        if self.length <= _SMALL:
            self.parts, self._hash = [b"".join(parts)], None
        else:
            self.parts, self._hash = parts, xxhash.xxh3_64()
            for p in parts:
                self._hash.update(p)

    def stamp(self, seq: int) -> list:
        head = HEADER.pack(MAGIC, FRAME_FORMAT, self.kind, self.flags, self.length, seq)
        if self._hash is None:
            payload = self.parts[0]
            return [head + CHECKSUM.pack(xxhash.xxh3_64_intdigest(payload + head)), payload]
        h = self._hash.copy()
        h.update(head)
        return [head + CHECKSUM.pack(h.intdigest()), *self.parts]


def encode(kind: Kind, seq: int, fields: dict | None = None, *, compress: bool = False) -> list:
    """Encode one message as a list of byte strings to be sent back to back
    (header first). Returned as parts so that a large write payload is never copied."""
    return Prepared(kind, fields, compress).stamp(seq)


def encode_bytes(kind: Kind, seq: int, fields: dict | None = None, *, compress: bool = False) -> bytes:
    return b"".join(encode(kind, seq, fields, compress=compress))


@dataclass(slots=True)
class Header:
    kind: int
    flags: int
    length: int
    seq: int
    checksum: int
    raw: bytes


def parse_header(raw: bytes) -> Header:
    """Check and split the fixed 26-byte header. The checksum is checked later,
    together with the payload, by decode_payload."""
    if len(raw) != HEADER_SIZE:
        raise ProtocolError("short header")
    magic, fmt, kind, flags, length, seq = HEADER.unpack_from(raw, 0)
    if magic != MAGIC:
        raise ProtocolError("bad magic: not a fusemirror replication stream")
    if fmt != FRAME_FORMAT:
        raise ProtocolError(f"unknown frame format {fmt}")
    if length > MAX_PAYLOAD:
        raise ProtocolError(f"frame length {length} exceeds the limit")
    (checksum,) = CHECKSUM.unpack_from(raw, HEADER.size)
    return Header(kind, flags, length, seq, checksum, bytes(raw[:HEADER.size]))


def decode_payload(header: Header, payload, version: int = PROTOCOL_MAX) -> Message:
    """Verify the checksum, decompress and unpack a frame's payload."""
    if len(payload) <= _SMALL:
        digest = xxhash.xxh3_64_intdigest(bytes(payload) + header.raw)
    else:
        h = xxhash.xxh3_64(payload)
        h.update(header.raw)
        digest = h.intdigest()
    if digest != header.checksum:
        raise ChecksumError(f"checksum mismatch in frame seq={header.seq}")
    kind = _KIND_OF.get(header.kind)
    if kind is None:
        raise ProtocolError(f"unknown message kind {header.kind}")
    if kind not in KINDS_BY_VERSION.get(version, frozenset()):
        raise ProtocolError(f"message kind {kind.name} is not part of protocol version {version}")
    if header.flags & FLAG_LZ4:
        if len(payload) < 4 or int.from_bytes(payload[:4], "little") > MAX_PAYLOAD:
            raise ProtocolError("compressed payload announces an impossible size")
        try:
            payload = lz4.block.decompress(payload)
        except lz4.block.LZ4BlockError:
            raise ProtocolError("payload does not decompress") from None
    elif header.flags:
        raise ProtocolError(f"unknown frame flags {header.flags:#x}")
    return Message(kind, header.seq, _CODECS[kind].unpack(payload))


class Decoder:
    """Incremental decoder: feed received bytes, take out complete messages.
    Used where frames arrive in arbitrary pieces (tests, proxies)."""

    def __init__(self, version: int = PROTOCOL_MAX):
        self._buf = bytearray()
        self.version = version

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out = []
        while len(self._buf) >= HEADER_SIZE:
            header = parse_header(bytes(self._buf[:HEADER_SIZE]))
            end = HEADER_SIZE + header.length
            if len(self._buf) < end:
                break
            payload = bytes(self._buf[HEADER_SIZE:end])
            del self._buf[:end]
            out.append(decode_payload(header, payload, self.version))
        return out


# --- handshake -------------------------------------------------------------
#
#   primary                                   replica
#   HELLO(version range, session, nonce_p) ─►
#                                          ◄─ CHALLENGE(version, nonce_r, proof_r)
#                                             or REFUSE(VERSION|BUSY|NOT_REPLICA)
#   AUTH(proof_p)                          ─►
#                                          ◄─ WELCOME(last_seq, resumed, uptodate)
#                                             or REFUSE(AUTH)
#
# proof_r = HMAC-SHA256(secret, b"replica" + nonce_p + nonce_r)
# proof_p = HMAC-SHA256(secret, b"primary" + nonce_r + nonce_p)
# The replica proves it knows the secret before the primary sends anything more,
# and the primary proves it before the replica applies anything. Fresh random
# nonces on both sides make a recorded handshake useless for replay.

NONCE_SIZE = 32


def proof(secret: bytes, role: bytes, first: bytes, second: bytes) -> bytes:
    return hmac.new(secret, role + first + second, hashlib.sha256).digest()


def check_proof(secret: bytes, role: bytes, first: bytes, second: bytes, got: bytes) -> bool:
    return hmac.compare_digest(proof(secret, role, first, second), got)


def choose_version(peer_min: int, peer_max: int,
                   our_min: int = PROTOCOL_MIN, our_max: int = PROTOCOL_MAX) -> int | None:
    """The highest protocol version both ends speak, or None."""
    top = min(peer_max, our_max)
    return top if top >= max(peer_min, our_min) else None
