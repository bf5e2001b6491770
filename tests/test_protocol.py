"""Unit tests of the replication wire protocol (fusemirror.protocol).

Pure: bytes in, messages out; no sockets, no files, no mounts. Frames that must
reach a particular check are built here independently from the documented
layout (raw_frame), with a valid checksum, so each test knows which check it
exercises. Randomness is seeded so every run sees the same bytes.
"""

import hashlib
import hmac
import random
import struct

import lz4.block
import pytest
import xxhash

from fusemirror import protocol
from fusemirror.protocol import (
    ATTR_MTIME,
    ATTR_SIZE,
    CHECKSUM,
    COMPRESS_MIN,
    FLAG_LZ4,
    FRAME_FORMAT,
    HANDSHAKE_KINDS,
    HEADER_SIZE,
    KINDS_BY_VERSION,
    MAGIC,
    MAX_PAYLOAD,
    NONCE_SIZE,
    PROTOCOL_MAX,
    PROTOCOL_MIN,
    SCHEMAS,
    ChecksumError,
    Decoder,
    Kind,
    Message,
    ProtocolError,
    Refusal,
    check_proof,
    choose_version,
    decode_payload,
    encode,
    encode_bytes,
    maybe_compress,
    parse_header,
    proof,
)

U64_MAX = 2**64 - 1
NOT_UTF8 = b"\xff\xfe\x00caf\xc3(\x80\x00"  # invalid UTF-8, embedded NULs

# One realistic message of every kind.
SAMPLES: dict[Kind, dict] = {
    Kind.HELLO: dict(version_min=1, version_max=2, session=0x0123456789ABCDEF,
                     nonce=bytes(range(NONCE_SIZE)), label=b"alpha/srv/app"),
    Kind.CHALLENGE: dict(version=1, nonce=b"\x80" * NONCE_SIZE, proof=b"\x01" * 32),
    Kind.AUTH: dict(proof=b"\xfe" * 32),
    Kind.WELCOME: dict(last_seq=U64_MAX, resumed=1, uptodate=0),
    Kind.REFUSE: dict(code=Refusal.VERSION, reason="pas de version commune".encode()),
    Kind.BYE: {},
    Kind.OPEN: dict(handle=7, flags=0o2, mtime=-1_000_000_000, path=b"dir/" + NOT_UTF8),
    Kind.CREATE: dict(handle=U64_MAX, flags=0o101, mode=0o100644, uid=1000, gid=2**32 - 1,
                      mtime=1_700_000_000_123_456_789, pmtime=-(2**63), parent=b"",
                      name=NOT_UTF8),
    Kind.WRITE: dict(handle=3, offset=2**40, mtime=-5, data=b"hello\x00world"),
    Kind.RELEASE: dict(handle=U64_MAX),
    Kind.FSYNC: dict(handle=9, datasync=1),
    Kind.SETATTR: dict(handle=0, mask=ATTR_SIZE | ATTR_MTIME, mode=0, uid=0, gid=0,
                       size=U64_MAX, atime=0, mtime=-(2**63), path=b"a/b"),
    Kind.MKNOD: dict(mode=0o010600, rdev=U64_MAX, uid=0, gid=0, mtime=2**63 - 1, pmtime=-1,
                     parent=b"d", name=b"fifo"),
    Kind.MKDIR: dict(mode=0o40755, uid=1, gid=1, mtime=0, pmtime=-123, parent=b"",
                     name=b"new dir"),
    Kind.SYMLINK: dict(uid=0, gid=0, mtime=1, pmtime=2, parent=b"x", name=b"ln",
                       target=b"../" + NOT_UTF8),
    Kind.LINK: dict(pmtime=-7, source=b"a/f", parent=b"b", name=b""),
    Kind.UNLINK: dict(pmtime=99, parent=NOT_UTF8, name=b"gone"),
    Kind.RMDIR: dict(pmtime=-99, parent=b"", name=b"d"),
    Kind.RENAME: dict(flags=1, pmtime_old=-1, pmtime_new=1, parent_old=b"a", name_old=b"x",
                      parent_new=b"", name_new=NOT_UTF8),
    Kind.SETXATTR: dict(path=b"f", name=b"user.k", value=b""),
    Kind.REMOVEXATTR: dict(path=b"", name=b"security.selinux"),
    Kind.FSYNCDIR: dict(datasync=0, path=b"d/e"),
    Kind.MANIFEST_REQ: {},
    Kind.PING: {},
    Kind.RESYNC_BEGIN: dict(full=1),
    Kind.PROBE: dict(what=3, chunk=1 << 20, path=NOT_UTF8, blocks=b"[[0, 31]]"),
    Kind.PUT: dict(offset=U64_MAX, path=b"a/b", data=b"\x00" * 5000),
    Kind.REMOVE: dict(path=b"d/e"),
    Kind.RESYNC_DONE: {},
    Kind.ACK: dict(errno=28),
    Kind.MANIFEST: dict(last=1, chunk=b'{"path": "a"}\n' * 3),
}

_FIXED_RANGE = {"B": (0, 255), "H": (0, 2**16 - 1), "I": (0, 2**32 - 1),
                "Q": (0, U64_MAX), "q": (-(2**63), 2**63 - 1)}


def extreme_fields(kind: Kind, which: int) -> dict:
    """Every fixed field at its minimum (which=0) or maximum (which=1); byte
    fields empty (max) or non-UTF-8 (min)."""
    return {name: (NOT_UTF8, b"")[which] if code == "b" else _FIXED_RANGE[code][which]
            for name, code in SCHEMAS[kind]}


def raw_frame(kind: int, seq: int, payload: bytes, *, flags: int = 0,
              fmt: int = FRAME_FORMAT, magic: bytes = MAGIC, length: int | None = None) -> bytes:
    """A frame built from the documented layout, with a correct checksum."""
    if length is None:
        length = len(payload)
    head = (magic + bytes([fmt, kind, flags, 0]) + length.to_bytes(4, "little")
            + seq.to_bytes(8, "little"))
    assert len(head) == 18
    checksum = xxhash.xxh3_64(payload + head).intdigest()
    return head + checksum.to_bytes(8, "little") + payload


def payload_of(frame: bytes) -> bytes:
    return frame[HEADER_SIZE:]


def decode_one(frame: bytes, version: int = PROTOCOL_MAX) -> Message:
    """Decode one whole frame with the two-step API, the payload being
    everything received after the header."""
    header = parse_header(frame[:HEADER_SIZE])
    return decode_payload(header, frame[HEADER_SIZE:], version)


def flip(data: bytes, bit: int) -> bytes:
    b = bytearray(data)
    b[bit // 8] ^= 1 << (bit % 8)
    return bytes(b)


# --- schemas ----------------------------------------------------------------

def test_every_kind_has_a_schema_and_a_sample():
    assert set(SCHEMAS) == set(Kind)
    assert set(SAMPLES) == set(Kind)
    for kind, fields in SAMPLES.items():
        assert set(fields) == {name for name, _ in SCHEMAS[kind]}, kind


@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_schema_lists_fixed_fields_before_byte_fields(kind):
    codes = [code for _, code in SCHEMAS[kind]]
    n_fixed = sum(1 for c in codes if c != "b")
    assert all(c != "b" for c in codes[:n_fixed]), codes
    assert all(c == "b" for c in codes[n_fixed:]), codes
    names = [name for name, _ in SCHEMAS[kind]]
    assert len(set(names)) == len(names)


# --- round trips -------------------------------------------------------------

@pytest.mark.parametrize("kind", list(SAMPLES))
@pytest.mark.parametrize("seq", [0, 1, U64_MAX])
def test_round_trip_every_kind(kind, seq):
    fields = SAMPLES[kind]
    frame = encode_bytes(kind, seq, fields)
    assert frame[:2] == MAGIC
    msg = decode_one(frame)
    assert msg == Message(kind, seq, fields)
    assert type(msg.kind) is Kind
    for name, code in SCHEMAS[kind]:
        assert type(msg.fields[name]) is (bytes if code == "b" else int), name
    # The incremental decoder agrees and consumes the frame exactly.
    dec = Decoder()
    assert dec.feed(frame) == [msg]
    assert dec.feed(b"") == []


@pytest.mark.parametrize("which", [0, 1], ids=["min", "max"])
@pytest.mark.parametrize("kind", list(SCHEMAS))
def test_round_trip_extreme_values(kind, which):
    fields = extreme_fields(kind, which)
    msg = decode_one(encode_bytes(kind, U64_MAX, fields))
    assert msg == Message(kind, U64_MAX, fields)


def test_fields_default_to_empty_for_kinds_without_fields():
    assert decode_one(encode_bytes(Kind.PING, 4)) == Message(Kind.PING, 4, {})


def test_encode_matches_the_documented_layout():
    data = b"\x00\xffpayload"
    parts = encode(Kind.WRITE, 0x1122334455667788, dict(handle=5, offset=4096, mtime=-2, data=data))
    payload = (struct.pack("<QQq", 5, 4096, -2) + len(data).to_bytes(4, "little") + data)
    assert b"".join(parts) == raw_frame(Kind.WRITE, 0x1122334455667788, payload)
    frame = b"".join(parts)
    assert frame[2] == FRAME_FORMAT and frame[3] == Kind.WRITE and frame[4] == 0 and frame[5] == 0
    assert int.from_bytes(frame[6:10], "little") == len(payload)
    assert int.from_bytes(frame[10:18], "little") == 0x1122334455667788
    assert CHECKSUM.unpack(frame[18:26])[0] == xxhash.xxh3_64(payload + frame[:18]).intdigest()


@pytest.mark.parametrize("compress", [False, True])
def test_prepared_stamps_any_number_of_sequence_numbers(compress):
    fields = dict(handle=1, offset=0, mtime=0, data=compressible(10_000))
    prepared = protocol.Prepared(Kind.WRITE, fields, compress)
    for seq in [5, 0, U64_MAX, 5]:  # stamping does not consume the prepared state
        frame = b"".join(prepared.stamp(seq))
        assert frame == encode_bytes(Kind.WRITE, seq, fields, compress=compress)
        assert decode_one(frame) == Message(Kind.WRITE, seq, fields)


def test_encode_does_not_copy_write_data():
    data = bytes(range(256)) * 1024
    parts = encode(Kind.WRITE, 1, dict(handle=1, offset=0, mtime=0, data=data))
    assert len(parts[0]) == HEADER_SIZE
    assert any(p is data for p in parts)


def test_message_attribute_access():
    msg = decode_one(encode_bytes(Kind.WRITE, 8, SAMPLES[Kind.WRITE]))
    assert msg.handle == 3 and msg.offset == 2**40 and msg.mtime == -5
    assert msg.data == b"hello\x00world"
    assert msg.seq == 8 and msg.kind is Kind.WRITE
    with pytest.raises(AttributeError):
        msg.no_such_field


# No schema field may be shadowed by Message's own attributes (kind, seq, fields).
@pytest.mark.parametrize("kind,name", [(kind, name) for kind in SCHEMAS for name, _ in SCHEMAS[kind]])
def test_every_field_is_reachable_as_an_attribute(kind, name):
    msg = decode_one(encode_bytes(kind, 1, SAMPLES[kind]))
    assert getattr(msg, name) == SAMPLES[kind][name]


@pytest.mark.parametrize("kind,fields", [
    (Kind.ACK, {}),                                    # missing field
    (Kind.ACK, {"errno": -1}),                         # u32 out of range
    (Kind.FSYNC, {"handle": 1, "datasync": 256}),      # u8 out of range
    (Kind.RELEASE, {"handle": 2**64}),                 # u64 out of range
    (Kind.WRITE, dict(handle=1, offset=0, mtime=2**63, data=b"")),  # i64 out of range
    (Kind.AUTH, {}),                                   # missing byte field
])
def test_encode_refuses_bad_fields(kind, fields):
    with pytest.raises(ValueError):
        encode(kind, 1, fields)


def test_encode_refuses_oversize_payload():
    overhead = 8 + 8 + 8 + 4  # WRITE fixed fields + length prefix of data
    fits = encode(Kind.WRITE, 1, dict(handle=1, offset=0, mtime=0, data=bytes(MAX_PAYLOAD - overhead)))
    assert int.from_bytes(fits[0][6:10], "little") == MAX_PAYLOAD
    with pytest.raises(ValueError):
        encode(Kind.WRITE, 1, dict(handle=1, offset=0, mtime=0, data=bytes(MAX_PAYLOAD - overhead + 1)))


# --- compression -------------------------------------------------------------

def compressible(size: int) -> bytes:
    text = b"".join(b"%08d the quick brown fox jumps over the lazy dog\n" % i for i in range(size // 40 + 1))
    return text[:size]


def test_compressible_1mib_write_is_compressed_and_round_trips():
    data = compressible(1 << 20)
    fields = dict(handle=1, offset=0, mtime=-1, data=data)
    plain = encode_bytes(Kind.WRITE, 42, fields)
    packed = encode_bytes(Kind.WRITE, 42, fields, compress=True)
    assert plain[4] == 0
    assert packed[4] & FLAG_LZ4
    assert len(packed) < len(plain) // 2
    assert int.from_bytes(packed[6:10], "little") == len(packed) - HEADER_SIZE
    assert decode_one(packed) == decode_one(plain) == Message(Kind.WRITE, 42, fields)
    assert Decoder().feed(packed) == [Message(Kind.WRITE, 42, fields)]


def test_random_data_is_not_compressed():
    data = random.Random(1).randbytes(1 << 20)
    fields = dict(handle=1, offset=0, mtime=0, data=data)
    frame = encode_bytes(Kind.WRITE, 1, fields, compress=True)
    assert frame[4] == 0
    assert frame == encode_bytes(Kind.WRITE, 1, fields)
    assert decode_one(frame).data == data


@pytest.mark.parametrize("size", [0, 1, 100, COMPRESS_MIN - 100])
def test_small_payload_is_not_compressed(size):
    # The whole payload (fixed fields + prefix + data) stays below COMPRESS_MIN.
    fields = dict(handle=1, offset=0, mtime=0, data=bytes(size))
    frame = encode_bytes(Kind.WRITE, 1, fields, compress=True)
    assert frame[4] == 0
    assert decode_one(frame).data == bytes(size)


def test_maybe_compress():
    assert maybe_compress(bytes(COMPRESS_MIN - 1)) is None
    packed = maybe_compress(bytes(COMPRESS_MIN))
    assert packed is not None and lz4.block.decompress(packed) == bytes(COMPRESS_MIN)
    # The decision is taken on a sample: a random head is not worth compressing
    # even if the rest would be.
    head = random.Random(2).randbytes(COMPRESS_MIN)
    assert maybe_compress(head + bytes(1 << 16)) is None


# --- damaged frames ----------------------------------------------------------

def _damaged_frame_cases():
    rng = random.Random(3)
    small = encode_bytes(Kind.WRITE, 77, dict(handle=5, offset=10, mtime=-3,
                                              data=rng.randbytes(300)))
    packed = encode_bytes(Kind.WRITE, 78, dict(handle=5, offset=10, mtime=-3,
                                               data=compressible(64 * 1024)), compress=True)
    assert packed[4] & FLAG_LZ4
    empty = encode_bytes(Kind.PING, 79)
    cases = []
    for name, frame in [("write", small), ("lz4", packed), ("ping", empty)]:
        header_bits = list(range(HEADER_SIZE * 8))  # every header bit
        payload_bits = range(HEADER_SIZE * 8, len(frame) * 8)
        sample = rng.sample(payload_bits, min(150, len(payload_bits)))
        cases.append((name, frame, header_bits + sorted(sample)))
    return cases


@pytest.mark.parametrize("name,frame,bits", _damaged_frame_cases(), ids=lambda x: x if isinstance(x, str) else "")
def test_a_flipped_bit_is_never_decoded(name, frame, bits):
    assert decode_one(frame)  # the undamaged frame is fine
    for bit in bits:
        bad = flip(frame, bit)
        expected = ChecksumError if bit >= 18 * 8 else ProtocolError  # payload/checksum: checksum
        with pytest.raises(expected):
            decode_one(bad)
        # The incremental decoder either refuses it or, when the damaged length
        # field grew, waits for more bytes; it never hands out a message.
        try:
            got = Decoder().feed(bad)
        except ProtocolError:
            continue
        assert got == [], f"bit {bit}"
        assert int.from_bytes(bad[6:10], "little") > len(bad) - HEADER_SIZE, f"bit {bit}"


# --- malformed frames --------------------------------------------------------

def test_short_header():
    with pytest.raises(ProtocolError):
        parse_header(encode_bytes(Kind.PING, 1)[:HEADER_SIZE - 1])


def test_bad_magic():
    frame = raw_frame(Kind.PING, 1, b"", magic=b"GE")  # e.g. an HTTP client
    with pytest.raises(ProtocolError, match="magic"):
        decode_one(frame)
    with pytest.raises(ProtocolError, match="magic"):
        Decoder().feed(frame)


@pytest.mark.parametrize("fmt", [0, FRAME_FORMAT + 1, 255])
def test_unknown_frame_format(fmt):
    with pytest.raises(ProtocolError, match="format"):
        decode_one(raw_frame(Kind.PING, 1, b"", fmt=fmt))


def test_oversize_length_is_refused_from_the_header_alone():
    head = raw_frame(Kind.WRITE, 1, b"", length=MAX_PAYLOAD + 1)
    assert len(head) == HEADER_SIZE
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_header(head)
    with pytest.raises(ProtocolError, match="exceeds"):
        Decoder().feed(head)  # refused without waiting for 64 MiB
    # The limit itself is allowed.
    assert parse_header(raw_frame(Kind.WRITE, 1, b"", length=MAX_PAYLOAD)).length == MAX_PAYLOAD


@pytest.mark.parametrize("kind", [0, 7, 39, 42, 255])
def test_unknown_kind(kind):
    with pytest.raises(ProtocolError, match="unknown message kind"):
        decode_one(raw_frame(kind, 1, b""))


@pytest.mark.parametrize("flags", [0x02, 0x80, 0xFE])
def test_unknown_flags(flags):
    with pytest.raises(ProtocolError, match="flags"):
        decode_one(raw_frame(Kind.PING, 1, b"", flags=flags))


@pytest.mark.parametrize("kind", list(SAMPLES))
@pytest.mark.parametrize("extra", [b"\x00", b"\x00\x00\x00\x00", b"junk"])
def test_trailing_bytes(kind, extra):
    payload = payload_of(encode_bytes(kind, 1, SAMPLES[kind])) + extra
    with pytest.raises(ProtocolError, match="trailing"):
        decode_one(raw_frame(kind, 1, payload))


@pytest.mark.parametrize("kind", [k for k in SAMPLES if SCHEMAS[k]])
def test_truncated_payload_at_every_cut(kind):
    payload = payload_of(encode_bytes(kind, 1, SAMPLES[kind]))
    for cut in range(len(payload)):
        with pytest.raises(ProtocolError):
            decode_one(raw_frame(kind, 1, payload[:cut]))


def test_byte_field_running_past_the_end():
    payload = struct.pack("<B", 1) + (1000).to_bytes(4, "little") + b"short"
    with pytest.raises(ProtocolError, match="past the end"):
        decode_one(raw_frame(Kind.MANIFEST, 1, payload))


def test_lz4_flag_on_data_that_does_not_decompress():
    payload = (100).to_bytes(4, "little") + b"\xff" * 20
    with pytest.raises(ProtocolError):
        decode_one(raw_frame(Kind.ACK, 1, payload, flags=FLAG_LZ4))


def test_lz4_payload_that_decompresses_to_a_bad_message():
    packed = lz4.block.compress(b"\x01\x02")  # ACK needs 4 bytes
    with pytest.raises(ProtocolError, match="too short"):
        decode_one(raw_frame(Kind.ACK, 1, packed, flags=FLAG_LZ4))


# lz4.block.decompress raises ValueError (not LZ4BlockError) for a payload shorter
# than its 4-byte size prefix or a prefix >= 2**31; it must still surface as a
# ProtocolError.
@pytest.mark.parametrize("payload", [
    b"",
    b"\x01\x02\x03",
    b"\xff\xff\xff\xff" + b"\x00" * 8,
    (2**31).to_bytes(4, "little") + b"\x00" * 8,
    (MAX_PAYLOAD + 1).to_bytes(4, "little") + b"\x00" * 8,
], ids=["empty", "shorter-than-prefix", "prefix-4GiB", "prefix-2GiB", "prefix-over-limit"])
def test_lz4_bad_size_prefix_is_a_protocol_error(payload):
    with pytest.raises(ProtocolError):
        Decoder().feed(raw_frame(Kind.ACK, 1, payload, flags=FLAG_LZ4))


def _oversize_write():
    """A WRITE whose payload exceeds MAX_PAYLOAD by a little, and compresses to
    almost nothing."""
    return dict(handle=1, offset=0, mtime=0, data=bytes(MAX_PAYLOAD))


def test_decompressed_payload_is_bounded():
    # MAX_PAYLOAD also bounds what a payload decompresses to, so a small frame
    # cannot make the receiver allocate gigabytes (even before authentication).
    payload = b"".join(protocol._CODECS[Kind.WRITE].pack(_oversize_write()))
    assert len(payload) > MAX_PAYLOAD
    frame = raw_frame(Kind.WRITE, 1, lz4.block.compress(payload), flags=FLAG_LZ4)
    assert len(frame) < MAX_PAYLOAD // 100
    with pytest.raises(ProtocolError):
        decode_one(frame)


# encode(compress=True) must refuse what the decoder would refuse after decompressing.
def test_encode_compressed_refuses_what_the_decoder_refuses():
    with pytest.raises(ValueError):
        encode(Kind.WRITE, 1, _oversize_write())
    with pytest.raises(ValueError):
        encode(Kind.WRITE, 1, _oversize_write(), compress=True)


# --- incremental decoding ----------------------------------------------------

def _stream(big: bool):
    """(frames, messages) for every sample kind, plus a compressed and, when big,
    a large uncompressed write."""
    msgs = [Message(kind, seq, fields) for seq, (kind, fields) in enumerate(SAMPLES.items())]
    msgs.append(Message(Kind.WRITE, 100, dict(handle=1, offset=0, mtime=0,
                                              data=compressible(8192))))
    if big:
        msgs.append(Message(Kind.WRITE, 101, dict(handle=2, offset=4096, mtime=0,
                                                  data=random.Random(4).randbytes(300_000))))
        msgs.append(Message(Kind.WRITE, 102, dict(handle=2, offset=0, mtime=0,
                                                  data=compressible(1 << 20))))
    frames = [encode_bytes(m.kind, m.seq, m.fields, compress=True) for m in msgs]
    assert any(f[4] & FLAG_LZ4 for f in frames)
    return frames, msgs


def test_decoder_whole_stream_at_once():
    frames, msgs = _stream(big=True)
    assert Decoder().feed(b"".join(frames)) == msgs


def test_decoder_byte_by_byte():
    frames, msgs = _stream(big=False)
    stream = b"".join(frames)
    ends = set()
    pos = 0
    for f in frames:
        pos += len(f)
        ends.add(pos)
    dec = Decoder()
    got = []
    for i in range(len(stream)):
        out = dec.feed(stream[i:i + 1])
        # A message comes out exactly when the last byte of its frame arrives.
        assert len(out) == (1 if i + 1 in ends else 0), i
        got += out
    assert got == msgs


@pytest.mark.parametrize("seed", range(8))
def test_decoder_random_chunks(seed):
    frames, msgs = _stream(big=True)
    stream = b"".join(frames)
    rng = random.Random(seed)
    dec = Decoder()
    got = []
    pos = 0
    while pos < len(stream):
        n = rng.choice([1, 2, 3, 25, 26, 27, rng.randint(1, 5000), rng.randint(1, 200_000)])
        got += dec.feed(stream[pos:pos + n])
        pos += n
    assert got == msgs


def test_decoder_keeps_a_partial_frame():
    a = encode_bytes(Kind.ACK, 1, dict(errno=0))
    b = encode_bytes(Kind.ACK, 2, dict(errno=5))
    dec = Decoder()
    assert dec.feed(a + b[:HEADER_SIZE + 2]) == [Message(Kind.ACK, 1, dict(errno=0))]
    assert dec.feed(b[HEADER_SIZE + 2:]) == [Message(Kind.ACK, 2, dict(errno=5))]


def test_decoder_refuses_garbage_after_a_good_frame():
    dec = Decoder()
    assert dec.feed(encode_bytes(Kind.PING, 1)) == [Message(Kind.PING, 1, {})]
    with pytest.raises(ProtocolError):
        dec.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")


# --- versions ----------------------------------------------------------------

def test_version_table_is_cumulative_and_covers_what_we_speak():
    for v in range(PROTOCOL_MIN, PROTOCOL_MAX + 1):
        assert v in KINDS_BY_VERSION
        # Without the handshake no version could be negotiated.
        assert HANDSHAKE_KINDS | {Kind.BYE} <= KINDS_BY_VERSION[v]
    versions = sorted(KINDS_BY_VERSION)
    for older, newer in zip(versions, versions[1:]):
        assert KINDS_BY_VERSION[older] <= KINDS_BY_VERSION[newer]
    assert KINDS_BY_VERSION[PROTOCOL_MAX] == set(SCHEMAS)


@pytest.fixture
def ping_is_new_in_v2(monkeypatch):
    """Pretend version 2 introduced PING; version 1 does not know it."""
    monkeypatch.setattr(protocol, "KINDS_BY_VERSION",
                        {1: frozenset(Kind) - {Kind.PING}, 2: frozenset(Kind)})


def test_kind_unknown_to_the_negotiated_version_is_refused(ping_is_new_in_v2):
    ping = encode_bytes(Kind.PING, 5)
    ack = encode_bytes(Kind.ACK, 5, dict(errno=0))
    with pytest.raises(ProtocolError, match="not part of protocol version 1"):
        decode_one(ping, version=1)
    with pytest.raises(ProtocolError, match="not part of protocol version 1"):
        Decoder(version=1).feed(ack + ping)
    assert decode_one(ack, version=1) == Message(Kind.ACK, 5, dict(errno=0))
    assert decode_one(ping, version=2) == Message(Kind.PING, 5, {})
    assert Decoder(version=2).feed(ack + ping) == [Message(Kind.ACK, 5, dict(errno=0)),
                                                   Message(Kind.PING, 5, {})]


@pytest.mark.parametrize("version", [0, PROTOCOL_MAX + 1, 1000])
def test_a_version_we_do_not_speak_knows_no_kinds(version):
    assert version not in KINDS_BY_VERSION
    with pytest.raises(ProtocolError, match="not part of protocol version"):
        decode_one(encode_bytes(Kind.HELLO, 0, SAMPLES[Kind.HELLO]), version=version)


@pytest.mark.parametrize("peer,ours,expected", [
    ((1, 1), (1, 1), 1),
    ((1, 2), (1, 1), 1),   # N+1 primary meets N replica
    ((1, 1), (1, 2), 1),   # N primary meets N+1 replica
    ((2, 2), (1, 2), 2),   # N+1 that dropped N meets N+1
    ((1, 2), (1, 2), 2),
    ((1, 5), (3, 4), 4),
    ((1, 2), (2, 3), 2),   # touching ranges
    ((2, 2), (1, 1), None),
    ((1, 1), (2, 3), None),
    ((3, 1), (1, 3), None),  # inverted range speaks nothing
])
def test_choose_version(peer, ours, expected):
    assert choose_version(*peer, *ours) == expected
    assert choose_version(*ours, *peer) == expected


def test_choose_version_matches_brute_force():
    r = range(0, 6)
    for a in r:
        for b in r:
            for c in r:
                for d in r:
                    common = set(range(a, b + 1)) & set(range(c, d + 1))
                    assert choose_version(a, b, c, d) == (max(common) if common else None), (a, b, c, d)


def test_choose_version_defaults_to_this_build():
    assert choose_version(PROTOCOL_MIN, PROTOCOL_MAX) == PROTOCOL_MAX
    assert choose_version(PROTOCOL_MIN, PROTOCOL_MAX + 1) == PROTOCOL_MAX
    assert choose_version(PROTOCOL_MAX + 1, PROTOCOL_MAX + 2) is None


# --- handshake proofs ----------------------------------------------------------

SECRET = b"shared module secret"
_rng = random.Random(5)
NONCE_P = _rng.randbytes(NONCE_SIZE)
NONCE_R = _rng.randbytes(NONCE_SIZE)


def test_proof_is_the_documented_hmac():
    got = proof(SECRET, b"replica", NONCE_P, NONCE_R)
    assert got == hmac.new(SECRET, b"replica" + NONCE_P + NONCE_R, hashlib.sha256).digest()
    assert len(got) == 32


@pytest.mark.parametrize("role,first,second", [
    (b"replica", NONCE_P, NONCE_R),
    (b"primary", NONCE_R, NONCE_P),
])
def test_check_proof_accepts_the_right_secret(role, first, second):
    assert check_proof(SECRET, role, first, second, proof(SECRET, role, first, second))


def test_check_proof_refuses_wrong_secret():
    p = proof(SECRET, b"replica", NONCE_P, NONCE_R)
    assert not check_proof(b"another secret", b"replica", NONCE_P, NONCE_R, p)
    assert not check_proof(SECRET, b"replica", NONCE_P, NONCE_R,
                           proof(SECRET + b"x", b"replica", NONCE_P, NONCE_R))


def test_check_proof_refuses_swapped_nonces_and_roles():
    replica_proof = proof(SECRET, b"replica", NONCE_P, NONCE_R)
    primary_proof = proof(SECRET, b"primary", NONCE_R, NONCE_P)
    assert replica_proof != primary_proof
    # nonce order swapped
    assert not check_proof(SECRET, b"replica", NONCE_R, NONCE_P, replica_proof)
    assert not check_proof(SECRET, b"primary", NONCE_P, NONCE_R, primary_proof)
    # a replica's proof reflected back as the primary's, and vice versa
    assert not check_proof(SECRET, b"primary", NONCE_R, NONCE_P, replica_proof)
    assert not check_proof(SECRET, b"replica", NONCE_P, NONCE_R, primary_proof)
    # another session's nonce
    assert not check_proof(SECRET, b"replica", NONCE_P, bytes(NONCE_SIZE), replica_proof)


def test_check_proof_refuses_damaged_or_short_proofs():
    p = proof(SECRET, b"replica", NONCE_P, NONCE_R)
    for bad in [b"", p[:-1], p + b"\x00", flip(p, 0), flip(p, 255)]:
        assert not check_proof(SECRET, b"replica", NONCE_P, NONCE_R, bad)


def test_handshake_messages_carry_proofs_end_to_end():
    """The handshake exchanged as frames through two decoders, checking the
    proofs from the decoded fields."""
    to_replica, to_primary = Decoder(), Decoder()
    (hello,) = to_replica.feed(encode_bytes(Kind.HELLO, 0, dict(
        version_min=PROTOCOL_MIN, version_max=PROTOCOL_MAX + 1, session=12,
        nonce=NONCE_P, label=b"alpha")))
    version = choose_version(hello.version_min, hello.version_max)
    assert version == PROTOCOL_MAX
    (challenge,) = to_primary.feed(encode_bytes(Kind.CHALLENGE, 0, dict(
        version=version, nonce=NONCE_R, proof=proof(SECRET, b"replica", hello.nonce, NONCE_R))))
    assert check_proof(SECRET, b"replica", NONCE_P, challenge.nonce, challenge.proof)
    (auth,) = to_replica.feed(encode_bytes(Kind.AUTH, 0, dict(
        proof=proof(SECRET, b"primary", challenge.nonce, NONCE_P))))
    assert check_proof(SECRET, b"primary", NONCE_R, hello.nonce, auth.proof)
    assert not check_proof(b"wrong", b"primary", NONCE_R, hello.nonce, auth.proof)
