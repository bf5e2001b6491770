"""Heartbeats (fusemirror.heartbeat): the datagram format, replay protection, and
the service on loopback.

The codec and PeerTracker tests are pure: bytes in, verdicts out. Datagrams that
must reach a particular check are built here from the documented layout (raw),
with a valid HMAC, so each test knows which check it exercises.

The service tests run two Heartbeats instances in one trio run on 127.0.0.1 and
127.0.0.2 (two "networks" on loopback, nothing else), under the autojump clock:
loopback delivers a datagram before sendto returns, so virtual time is safe and
the timeouts cost no real time. Every wait is bounded, and every service runs in
a nursery that the test cancels.
"""

import hashlib
import hmac
import json
import random
import socket
import struct

import pytest
import trio

from fusemirror import heartbeat as H
from fusemirror.errors import BAD_CONFIG, Failure
from fusemirror.heartbeat import (
    MAX_DATAGRAM,
    Echo,
    Heartbeat,
    Heartbeats,
    PeerTracker,
    Reason,
    Rejected,
    decode,
    encode,
)

SECRET = b"module secret"
A_BOOT = bytes(range(1, 17))          # "our" node in the tracker tests: alpha
B_BOOT = bytes(range(101, 117))       # the peer, beta
B_BOOT2 = bytes(range(201, 217))      # the peer after a restart
STATUS = {"state": "SECOND", "code": 4, "ready": "Ready", "reason": "", "epoch": 7,
          "uptodate": True, "lastprim": "alpha", "lag": 0.25, "note": None}


def beat(seq, *, boot=B_BOOT, path=0, node="beta", module="app", status=STATUS,
         echo=Echo(A_BOOT, 1, 1000, 10), sent=None):
    sent = 5_000 + seq if sent is None else sent
    return Heartbeat(module, node, boot, path, seq, sent, status, echo)


def raw(*, magic=b"FMHB", version=1, path=0, reserved=0, boot=B_BOOT, seq=1, sent=0,
        echo=(A_BOOT, 1, 1000, 10), module=b"app", node=b"beta", status=b"{}",
        extra=b"", secret=SECRET):
    """A datagram built from the documented layout, independently of encode()."""
    head = struct.pack("<4sBBH16sQq16sQqq", magic, version, path, reserved, boot, seq, sent,
                       *echo)
    body = (head + bytes([len(module)]) + module + bytes([len(node)]) + node
            + struct.pack("<H", len(status)) + status + extra)
    return body + hmac.new(secret, body, hashlib.sha256).digest()


def tracker(our_boot=A_BOOT):
    return PeerTracker("app", "beta", SECRET, our_boot)


def reason(data, secret=SECRET):
    with pytest.raises(Rejected) as e:
        decode(data, secret)
    return e.value.reason


# --- codec -------------------------------------------------------------------


def test_round_trip_keeps_every_field():
    for hb in (beat(1), beat(2**64 - 1, path=255, echo=None, status={}, sent=2**63 - 1),
               beat(3, node="bêta-节点", module="ap p", echo=Echo(A_BOOT, 2**64 - 1, -2**63, 0)),
               Heartbeat("app", "beta", B_BOOT, 1, 9, -1, {"s": "x" * 900}, None)):
        assert decode(encode(hb, SECRET), SECRET) == hb


def test_encoding_follows_the_documented_layout():
    hb = beat(42, path=3, echo=Echo(A_BOOT, 17, 123, 45))
    data = encode(hb, SECRET)
    status = json.dumps(STATUS, separators=(",", ":"), sort_keys=True).encode()
    assert data == raw(path=3, seq=42, sent=5_042, echo=(A_BOOT, 17, 123, 45), status=status)
    assert data[:4] == b"FMHB" and data[4] == H.VERSION == 1 and data[5] == 3
    assert data[-32:] == hmac.new(SECRET, data[:-32], hashlib.sha256).digest()


def test_encode_refuses_what_does_not_fit():
    for status in ({"nested": {"a": 1}}, {"list": [1]}, {"nan": float("nan")},
                   {"big": 2**63}, {"": 1}, {"k" * 33: 1}, {"s": "x" * 2000}, [1]):
        with pytest.raises(ValueError):
            encode(beat(1, status=status), SECRET)
    for hb in (beat(0), beat(1, boot=bytes(16)), beat(1, boot=b"short"), beat(1, node=""),
               beat(1, module="m" * 256), beat(1, path=256), beat(2**64)):
        with pytest.raises(ValueError):
            encode(hb, SECRET)


def test_wrong_secret_is_refused():
    data = encode(beat(1), SECRET)
    assert reason(data, b"another secret") == Reason.MAC
    assert reason(raw(secret=b"another secret")) == Reason.MAC


def test_a_flipped_bit_anywhere_is_refused():
    data = encode(beat(1), SECRET)
    for i in range(len(data) * 8):
        bad = bytearray(data)
        bad[i // 8] ^= 1 << (i % 8)
        assert reason(bytes(bad)) in (Reason.MAGIC, Reason.VERSION, Reason.MAC)


def test_truncated_and_garbage_datagrams_are_refused_without_exception():
    data = encode(beat(1), SECRET)
    for n in range(len(data)):
        assert reason(data[:n]) in (Reason.SHORT, Reason.MAC)
    assert reason(data + b"\0") == Reason.MAC
    assert reason(b"") == Reason.SHORT
    assert reason(b"x" * (MAX_DATAGRAM + 1)) == Reason.OVERSIZED
    rng = random.Random(3)
    t = tracker()
    for _ in range(2000):
        junk = rng.randbytes(rng.randrange(0, 1400))
        if rng.random() < 0.5:
            junk = b"FMHB\x01" + junk
        hb, why = t.receive(junk, 0, 0)
        assert hb is None and why in Reason


def test_unknown_magic_and_version_are_refused():
    assert reason(raw(magic=b"FMHC")) == Reason.MAGIC
    assert reason(raw(version=2)) == Reason.VERSION


def test_authentic_but_malformed_datagrams_are_refused():
    for kw in ({"reserved": 1}, {"boot": bytes(16)}, {"seq": 0}, {"extra": b"\0"},
               {"status": b"[1]"}, {"status": b'{"a":{"b":1}}'}, {"status": b'{"a":NaN}'},
               {"status": b'{"a":1e999}'}, {"status": b"{"}, {"status": b"\xff"},
               {"status": b"[" * 1000}, {"node": b""}, {"node": b"\xc3"}):
        assert reason(raw(**kw)) == Reason.MALFORMED, kw
    # a length prefix that runs past the end
    body = raw()[:-32]
    cut = body[:H.HEAD.size] + b"\xff" + body[H.HEAD.size + 1:]
    assert reason(cut + hmac.new(SECRET, cut, hashlib.sha256).digest()) == Reason.MALFORMED


def test_unknown_status_keys_are_kept_for_the_caller_to_ignore():
    hb = decode(raw(status=b'{"state":"PRIM","added_in_a_later_release":1}'), SECRET)
    assert hb.status == {"state": "PRIM", "added_in_a_later_release": 1}


# --- which datagrams are believed ---------------------------------------------


def test_a_heartbeat_from_the_peer_is_believed_and_its_status_kept():
    t = tracker()
    hb, why = t.receive(encode(beat(1), SECRET), 0, 0)
    assert why is None and hb == beat(1)
    assert t.boot == B_BOOT and t.status == STATUS


def test_wrong_module_node_or_network_is_refused():
    t = tracker()
    assert t.receive(encode(beat(1, module="other"), SECRET), 0, 0).reason == Reason.MODULE
    assert t.receive(encode(beat(1, node="gamma"), SECRET), 0, 0).reason == Reason.NODE
    # our own datagram reflected back to us
    assert t.receive(encode(beat(1, node="alpha", boot=A_BOOT), SECRET), 0, 0).reason == Reason.NODE
    assert t.receive(encode(beat(1, path=1), SECRET), 0, 0).reason == Reason.PATH
    assert t.boot is None and t.status is None


def test_a_captured_datagram_replayed_is_refused():
    t = tracker()
    data = encode(beat(1), SECRET)
    assert t.receive(data, 0, 0).reason is None
    assert t.receive(data, 0, 0).reason == Reason.REPLAY
    assert t.receive(encode(beat(2), SECRET), 0, 0).reason is None
    assert t.receive(data, 0, 0).reason == Reason.REPLAY


def test_an_older_seq_arriving_late_is_refused_but_networks_are_independent():
    t = tracker()
    assert t.receive(encode(beat(5, status={"n": 5}), SECRET), 0, 0).reason is None
    assert t.receive(encode(beat(4, status={"n": 4}), SECRET), 0, 0).reason == Reason.REPLAY
    assert t.receive(encode(beat(5), SECRET), 0, 0).reason == Reason.REPLAY
    # seq 6 on network 1 was overtaken by seq 7 on network 0: both are believed ...
    assert t.receive(encode(beat(7, status={"n": 7}), SECRET), 0, 0).reason is None
    assert t.receive(encode(beat(6, path=1, status={"n": 6}), SECRET), 1, 0).reason is None
    # ... but the status stays the newest one
    assert t.status == {"n": 7}
    # and nothing made before the boot was confirmed (seq 5) is believed on any network
    assert t.receive(encode(beat(3, path=2), SECRET), 2, 0).reason == Reason.REPLAY


def test_a_new_boot_is_believed_once_it_has_heard_us_and_the_old_one_is_retired():
    t = tracker()
    old = [encode(beat(n), SECRET) for n in (1, 2, 3)]
    assert t.receive(old[0], 0, 0).reason is None            # confirmed by our seq 1
    # the peer restarts: its first datagram has heard nothing from us yet
    assert t.receive(encode(beat(1, boot=B_BOOT2, echo=None), SECRET), 0, 0).reason == \
        Reason.UNCONFIRMED
    assert t.boot == B_BOOT
    # what we echo now lets the new boot confirm us
    assert t.echo(0, 50) == Echo(B_BOOT2, 1, 5_001, 50)
    new = beat(2, boot=B_BOOT2, status={"state": "WAIT"}, echo=Echo(A_BOOT, 9, 900, 1))
    assert t.receive(encode(new, SECRET), 0, 0).reason is None
    assert t.boot == B_BOOT2 and t.status == {"state": "WAIT"}
    # datagrams of the old boot, even ones never seen, are refused from now on
    for data in old[1:]:
        assert t.receive(data, 0, 0).reason == Reason.RETIRED
    assert t.receive(encode(beat(99, path=1), SECRET), 1, 0).reason == Reason.RETIRED


def test_a_new_boot_that_heard_us_earlier_than_the_current_one_is_refused():
    t = tracker()
    assert t.receive(encode(beat(1, echo=Echo(A_BOOT, 10, 0, 0)), SECRET), 0, 0).reason is None
    stale = beat(50, boot=B_BOOT2, echo=Echo(A_BOOT, 10, 0, 0))
    assert t.receive(encode(stale, SECRET), 0, 0).reason == Reason.UNCONFIRMED
    assert t.boot == B_BOOT


def test_after_we_restart_recordings_of_the_peer_are_not_believed():
    recorded = encode(beat(40, echo=Echo(A_BOOT, 30, 0, 0)), SECRET)
    t = tracker(our_boot=bytes(range(51, 67)))               # we restarted: a new boot
    assert t.receive(recorded, 0, 0).reason == Reason.UNCONFIRMED
    assert t.boot is None and t.status is None


def test_echo_reports_how_long_the_datagram_was_held():
    t = tracker()
    assert t.echo(0, 0) is None
    t.receive(encode(beat(3), SECRET), 0, 1_000)
    assert t.echo(0, 1_250) == Echo(B_BOOT, 3, 5_003, 250)
    assert t.echo(1, 1_250) is None


def test_the_status_is_known_to_be_sent_no_earlier_than_the_datagram_it_echoes_plus_its_hold():
    """Seed 14: a status queued in the network while a cable was out arrived a second late;
    its echo still bounds when it was made, whatever the two clocks say."""
    t = tracker()
    t.receive(encode(beat(1, echo=Echo(A_BOOT, 7, 40_000, 2_500)), SECRET), 0, 900_000)
    assert t.status_sent_after == 42_500
    # a datagram that echoes nothing of ours (or of another boot of ours) bounds nothing
    t.receive(encode(beat(2, status={"n": 2}, echo=None), SECRET), 0, 900_000)
    assert t.status == {"n": 2} and t.status_sent_after is None
    t.receive(encode(beat(3, status={"n": 3}, echo=Echo(bytes(16), 7, 1, 1)), SECRET), 0, 0)
    assert t.status_sent_after is None
    # the bound goes with the status: an older seq on another network changes neither
    t.receive(encode(beat(5, echo=Echo(A_BOOT, 8, 60_000, 0)), SECRET), 0, 0)
    t.receive(encode(beat(4, path=1, echo=Echo(A_BOOT, 9, 90_000, 0)), SECRET), 1, 0)
    assert t.status == STATUS and t.status_sent_after == 60_000


# --- the service on loopback ---------------------------------------------------

INTERVAL = 0.05
TIMEOUT = 0.25
NETS = [("127.0.0.1", "127.0.0.1"), ("127.0.0.2", "127.0.0.2")]


def free_udp_port() -> int:
    """A UDP port free on both 127.0.0.1 and 127.0.0.2."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s2:
                    s2.bind(("127.0.0.2", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free UDP port")


class Node:
    """One Heartbeats instance running in its own cancel scope."""

    def __init__(self, name, peer, port, peer_port, *, secret=SECRET, nets=NETS, status=None):
        self.status = status or {"state": "WAIT", "node": name}
        self.hb = Heartbeats(name, peer, nets, port, secret, INTERVAL, TIMEOUT,
                             lambda: self.status, module="app", peer_port=peer_port)
        self.scope = trio.CancelScope()

    async def start(self, nursery):
        async def run(task_status=trio.TASK_STATUS_IGNORED):
            with self.scope:
                await self.hb.run(task_status=task_status)
        await nursery.start(run)
        return self

    def stop(self):
        self.scope.cancel()


@pytest.fixture
def ports():
    a = free_udp_port()
    b = free_udp_port()
    while b == a:
        b = free_udp_port()
    return a, b


async def wait_until(cond, limit=5.0):
    with trio.fail_after(limit):
        while not cond():
            await trio.sleep(INTERVAL / 5)


async def test_two_nodes_see_each_other_on_every_network(ports, autojump_clock):
    async with trio.open_nursery() as nursery:
        a = await Node("alpha", "beta", ports[0], ports[1]).start(nursery)
        b = await Node("beta", "alpha", ports[1], ports[0]).start(nursery)
        assert not a.hb.peer_alive() and a.hb.peer_status() is None
        await wait_until(lambda: a.hb.peer_alive() and b.hb.peer_alive())
        await trio.sleep(4 * INTERVAL)                       # RTT samples on both nets
        for me, other in ((a, b), (b, a)):
            assert me.hb.peer_status() == other.status
            paths = me.hb.paths()
            assert [(p.index, p.local, p.up, p.error) for p in paths] == \
                [(0, "127.0.0.1", True, None), (1, "127.0.0.2", True, None)]
            for p in paths:
                assert p.age <= INTERVAL * 1.5
                assert p.rtt is not None and 0 <= p.rtt < INTERVAL
            # the last status was made within the last interval, on this node's clock
            made = me.hb.peer_status_sent_after()
            assert made is not None and trio.current_time() - 1.5 * INTERVAL <= made \
                <= trio.current_time()
            # only the first datagrams, sent before the peer had heard us
            assert set(me.hb.rejected()) <= {"unconfirmed"}
            assert sum(me.hb.rejected().values()) <= 4
        b.status = {"state": "PRIM", "epoch": 8}
        await wait_until(lambda: a.hb.peer_status() == {"state": "PRIM", "epoch": 8})
        nursery.cancel_scope.cancel()


async def test_one_network_lost_the_peer_stays_alive(ports, autojump_clock):
    async with trio.open_nursery() as nursery:
        a = await Node("alpha", "beta", ports[0], ports[1]).start(nursery)
        b = await Node("beta", "alpha", ports[1], ports[0]).start(nursery)
        await wait_until(lambda: all(p.up for p in a.hb.paths()))
        b.hb._paths[1].sock.close()                          # beta's network 1 goes silent
        await wait_until(lambda: not a.hb.paths()[1].up)
        for _ in range(int(3 * TIMEOUT / INTERVAL)):
            await trio.sleep(INTERVAL)
            assert a.hb.peer_alive() and b.hb.peer_alive()
            assert a.hb.paths()[0].up and not a.hb.paths()[1].up
        assert a.hb.paths()[1].age > TIMEOUT
        assert b.hb.paths()[1].error is not None
        nursery.cancel_scope.cancel()


async def test_the_peer_is_lost_only_after_every_network_is_silent_for_the_timeout(
        ports, autojump_clock):
    async with trio.open_nursery() as nursery:
        a = await Node("alpha", "beta", ports[0], ports[1]).start(nursery)
        b = await Node("beta", "alpha", ports[1], ports[0]).start(nursery)
        await wait_until(a.hb.peer_alive)
        b.stop()
        stopped = trio.current_time()
        await trio.sleep(TIMEOUT / 2)
        assert a.hb.peer_alive()
        await wait_until(lambda: not a.hb.peer_alive())
        lost_after = trio.current_time() - stopped
        assert TIMEOUT - INTERVAL <= lost_after <= TIMEOUT + INTERVAL
        assert not any(p.up for p in a.hb.paths())
        assert a.hb.peer_status() == b.status                # the last one it published
        nursery.cancel_scope.cancel()


async def test_note_alive_keeps_the_peer_alive(ports, autojump_clock):
    async with trio.open_nursery() as nursery:
        a = await Node("alpha", "beta", ports[0], ports[1]).start(nursery)
        b = await Node("beta", "alpha", ports[1], ports[0]).start(nursery)
        await wait_until(a.hb.peer_alive)
        b.stop()
        for _ in range(int(4 * TIMEOUT / INTERVAL)):         # replication acks keep coming
            a.hb.note_alive()
            await trio.sleep(INTERVAL)
            assert a.hb.peer_alive()
        assert not any(p.up for p in a.hb.paths())
        await trio.sleep(TIMEOUT * 1.1)                      # and then stop
        assert not a.hb.peer_alive()
        nursery.cancel_scope.cancel()


async def test_a_restarted_peer_is_believed_again(ports, autojump_clock):
    async with trio.open_nursery() as nursery:
        a = await Node("alpha", "beta", ports[0], ports[1]).start(nursery)
        b = await Node("beta", "alpha", ports[1], ports[0]).start(nursery)
        await wait_until(a.hb.peer_alive)
        b.stop()
        await wait_until(lambda: not a.hb.peer_alive())
        b2 = await Node("beta", "alpha", ports[1], ports[0],
                        status={"state": "WAIT", "life": 2}).start(nursery)
        await wait_until(lambda: a.hb.peer_alive() and a.hb.peer_status() == b2.status)
        assert a.hb._tracker.boot == b2.hb.boot != b.hb.boot
        nursery.cancel_scope.cancel()


async def test_a_peer_with_another_secret_is_never_alive(ports, autojump_clock):
    async with trio.open_nursery() as nursery:
        a = await Node("alpha", "beta", ports[0], ports[1]).start(nursery)
        await Node("beta", "alpha", ports[1], ports[0], secret=b"not ours").start(nursery)
        await trio.sleep(10 * INTERVAL)
        assert not a.hb.peer_alive() and a.hb.peer_status() is None
        assert set(a.hb.rejected()) == {"mac"} and a.hb.rejected()["mac"] >= 10
        nursery.cancel_scope.cancel()


async def test_a_busy_port_is_one_clear_failure(ports):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.2", ports[0]))
        hb = Heartbeats("alpha", "beta", NETS, ports[0], SECRET, INTERVAL, TIMEOUT, dict,
                        module="app", peer_port=ports[1])
        with trio.fail_after(5), pytest.raises(Failure) as e:
            await hb.run()
        assert e.value.code == BAD_CONFIG and "127.0.0.2" in str(e.value)
        assert all(p.sock.fileno() == -1 for p in hb._paths)  # none left open


def test_bad_settings_are_refused():
    for interval, timeout, nets in ((0, 1, NETS), (1, 1, NETS), (0.1, 1, [])):
        with pytest.raises(ValueError):
            Heartbeats("alpha", "beta", nets, 1, SECRET, interval, timeout, dict, module="app")


def test_boot_ids_are_random():
    a = Heartbeats("alpha", "beta", NETS, 1, SECRET, 0.1, 1, dict, module="app")
    b = Heartbeats("alpha", "beta", NETS, 1, SECRET, 0.1, 1, dict, module="app")
    assert len(a.boot) == 16 and a.boot != b.boot != bytes(16)
