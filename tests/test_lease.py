"""The split-brain guard's lease mode (fusemirror.lease): the lease table and the
datagrams (pure: times are passed in), the timing budget, and a real witness with two
clients on 127.0.0.1.

The socket tests run on the real clock with a short lease (0.6 s); every wait is
bounded and every service runs in a nursery the test cancels.
"""

import hashlib
import hmac
import logging
import os
import random
import socket
import time
from functools import partial

import pytest
import trio

from fusemirror import lease as L
from fusemirror.errors import BAD_CONFIG, Failure
from fusemirror.heartbeat import Reason, Rejected
from fusemirror.lease import (
    MAX_DATAGRAM,
    NO_NONCE,
    Grant,
    LeaseClient,
    LeaseServer,
    LeaseTable,
    Op,
    Reply,
    Request,
    Status,
    check_budget,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

SECRET = b"module secret"
SECRETS = {"app": SECRET, "db": b"another secret"}
ACQUIRE, RENEW, RELEASE = Op.ACQUIRE, Op.RENEW, Op.RELEASE


# --- the table ---------------------------------------------------------------------------


def test_grant_renew_and_refusal_while_held():
    t = LeaseTable(2.0)
    g = t.request("app", "alpha", 3, ACQUIRE, 10.0)
    assert g == Grant(Status.GRANTED, "alpha", 3, 2.0) and g.granted
    assert t.take_events(10.0) == ["lease of app granted to alpha at epoch 3"]
    g = t.request("app", "beta", 3, ACQUIRE, 11.0)
    assert g == Grant(Status.HELD, "alpha", 3, 1.0) and not g.granted
    assert g.describe() == "held by alpha for 1.0 s more"
    assert t.request("app", "alpha", 3, RENEW, 11.5) == Grant(Status.GRANTED, "alpha", 3, 2.0)
    # renewed to 13.5: beta is still refused after the first expiry (12.0)
    assert t.request("app", "beta", 3, ACQUIRE, 12.5) == Grant(Status.HELD, "alpha", 3, 1.0)
    assert t.request("app", "beta", 3, RENEW, 12.5).status is Status.NOT_HOLDER
    assert t.request("app", "alpha", 3, ACQUIRE, 12.5).granted      # acquire again = renew
    assert t.take_events(12.5) == []                                  # no change of holder
    # modules are independent
    assert t.request("db", "beta", 0, ACQUIRE, 12.5).granted


def test_acquire_after_expiry_strictly_at_the_expiry_instant():
    t = LeaseTable(2.0)
    t.request("app", "alpha", 1, ACQUIRE, 0.0)
    assert t.request("app", "beta", 1, ACQUIRE, 1.999).status is Status.HELD
    assert t.next_expiry() == 2.0
    assert t.take_events(1.999) == ["lease of app granted to alpha at epoch 1"]
    assert t.take_events(2.0) == ["lease of app held by alpha at epoch 1 expired"]
    assert t.take_events(3.0) == []                                   # reported once
    g = t.request("app", "beta", 1, ACQUIRE, 2.0)
    assert g == Grant(Status.GRANTED, "beta", 1, 2.0)
    # alpha lost it: its renewal is refused, its acquire too while beta holds it
    assert t.request("app", "alpha", 1, RENEW, 2.5).status is Status.NOT_HOLDER
    assert t.request("app", "alpha", 1, ACQUIRE, 2.5).status is Status.HELD


def test_the_holder_may_renew_an_expired_lease_nobody_took():
    t = LeaseTable(2.0)
    t.request("app", "alpha", 1, ACQUIRE, 0.0)
    g = t.request("app", "alpha", 1, RENEW, 5.0)
    assert g == Grant(Status.GRANTED, "alpha", 1, 2.0)
    assert t.take_events(5.0) == ["lease of app granted to alpha at epoch 1",
                                  "lease of app held by alpha at epoch 1 expired",
                                  "lease of app granted to alpha at epoch 1"]
    assert t.peek("app", 6.0) == Grant(Status.CHALLENGE, "alpha", 1, 1.0)
    assert t.peek("app", 7.0) == Grant(Status.CHALLENGE, None, 1, 0.0)


def test_release_frees_at_once_and_only_by_the_holder():
    t = LeaseTable(2.0)
    t.request("app", "alpha", 1, ACQUIRE, 0.0)
    assert t.request("app", "beta", 1, RELEASE, 0.5).status is Status.NOT_HOLDER
    assert t.request("app", "beta", 1, ACQUIRE, 0.5).status is Status.HELD
    assert t.request("app", "alpha", 1, RELEASE, 0.5) == Grant(Status.RELEASED, None, 1, 0.0)
    assert t.request("app", "alpha", 1, RELEASE, 0.6).status is Status.NOT_HOLDER
    assert t.request("app", "beta", 1, ACQUIRE, 0.6) == Grant(Status.GRANTED, "beta", 1, 2.0)
    assert t.take_events(0.6) == ["lease of app granted to alpha at epoch 1",
                                  "lease of app released by alpha at epoch 1",
                                  "lease of app granted to beta at epoch 1"]
    assert t.next_expiry() == 2.6


def test_an_epoch_below_the_highest_granted_is_refused():
    t = LeaseTable(2.0)
    t.request("app", "alpha", 5, ACQUIRE, 0.0)
    g = t.request("app", "beta", 4, ACQUIRE, 3.0)                     # expired, but old data
    assert g == Grant(Status.EPOCH, None, 5, 0.0)
    assert g.describe() == "refused: the witness granted epoch 5 already"
    assert t.request("app", "beta", 5, ACQUIRE, 3.0).granted          # equal is enough
    assert t.request("app", "beta", 4, RENEW, 3.5).status is Status.EPOCH   # even the holder's


def test_the_holders_epoch_rises_and_becomes_the_floor():
    t = LeaseTable(2.0)
    t.request("app", "alpha", 5, ACQUIRE, 0.0)                        # acquire, then bump
    assert t.request("app", "alpha", 6, RENEW, 0.4) == Grant(Status.GRANTED, "alpha", 6, 2.0)
    assert t.take_events(0.4)[-1] == "lease of app: alpha raised its epoch from 5 to 6"
    assert t.request("app", "beta", 5, ACQUIRE, 9.0).status is Status.EPOCH
    # a release carries the epoch too: a bump followed by a release is not forgotten
    t.request("app", "beta", 6, ACQUIRE, 9.0)
    t.request("app", "beta", 7, RELEASE, 9.1)
    assert t.request("app", "alpha", 6, ACQUIRE, 9.2) == Grant(Status.EPOCH, None, 7, 0.0)


def test_nothing_is_granted_while_the_witness_starts_and_bad_input():
    t = LeaseTable(2.0, grace_until=2.0)
    assert t.request("app", "alpha", 1, ACQUIRE, 1.9).status is Status.STARTING
    assert t.request("app", "alpha", 1, ACQUIRE, 2.0).granted
    with pytest.raises(ValueError):
        t.request("app", "alpha", -1, ACQUIRE, 2.0)
    with pytest.raises(ValueError):
        t.request("app", "alpha", 1, 9, 2.0)
    with pytest.raises(ValueError):
        LeaseTable(0)


# --- the datagrams -----------------------------------------------------------------------


def request(op=ACQUIRE, nonce=NO_NONCE, epoch=1, module="app", node="alpha", secret=SECRET):
    rid = os.urandom(16)
    return rid, encode_request(Request(op, rid, nonce, epoch, module, node), secret)


def test_request_and_reply_round_trip():
    rid, data = request(RENEW, b"n" * 16, 7, node="béta")
    assert decode_request(data, SECRETS) == Request(RENEW, rid, b"n" * 16, 7, "app", "béta")
    g = Grant(Status.HELD, "alpha", 7, 1.2345)
    r = Reply(RENEW, rid, b"m" * 16, "app", "béta", g)
    back = decode_reply(encode_reply(r, SECRET), SECRET)
    assert back.grant == Grant(Status.HELD, "alpha", 7, 1.234)       # ms, rounded down
    assert back.rid == rid and back.nonce == b"m" * 16 and back.op is RENEW
    none = Reply(ACQUIRE, rid, b"m" * 16, "app", "alpha", Grant(Status.RELEASED, None, 0, 0))
    assert decode_reply(encode_reply(none, SECRET), SECRET).grant.holder is None
    # a request is never taken for a reply, nor the reverse
    with pytest.raises(Rejected):
        decode_reply(data, SECRET)
    with pytest.raises(Rejected):
        decode_request(encode_reply(r, SECRET), SECRETS)
    with pytest.raises(ValueError):
        encode_request(Request(ACQUIRE, rid, NO_NONCE, 1, "x" * 256, "alpha"), SECRET)


def test_bad_mac_unknown_module_and_damaged_datagrams_get_no_answer():
    server = LeaseServer(SECRETS)
    _, forged = request(secret=b"not the secret")
    assert server.handle(forged, 0.0) is None
    _, unknown = request(module="web")
    assert server.handle(unknown, 0.0) is None
    _, other = request(module="db")                  # signed with app's secret, names db
    assert server.handle(other, 0.0) is None
    assert server.rejected == {Reason.MAC: 2, Reason.MODULE: 1}
    with pytest.raises(Rejected) as e:
        decode_request(forged, SECRETS)
    assert e.value.reason is Reason.MAC
    _, data = request()
    for n in range(len(data)):                       # every truncation
        assert server.handle(data[:n], 0.0) is None
    assert server.handle(data + b"\0", 0.0) is None  # trailing byte breaks the MAC
    assert server.handle(bytes(MAX_DATAGRAM + 1), 0.0) is None
    with pytest.raises(Rejected) as e:
        decode_request(data[:40], SECRETS)
    assert e.value.reason is Reason.SHORT
    with pytest.raises(Rejected) as e:
        decode_request(data + bytes(MAX_DATAGRAM), SECRETS)
    assert e.value.reason is Reason.OVERSIZED
    rng = random.Random(7)
    for _ in range(2000):                            # noise and flipped bits: Rejected only
        noise = bytearray(data if rng.random() < 0.5 else rng.randbytes(rng.randrange(120)))
        if noise:
            noise[rng.randrange(len(noise))] ^= 1 << rng.randrange(8)
        assert server.handle(bytes(noise), 0.0) is None
        with pytest.raises(Rejected):
            decode_reply(bytes(noise), SECRET)


def test_authentic_but_malformed_requests_are_refused():
    server = LeaseServer(SECRETS)
    _, data = request()
    body = bytearray(data[:-32])
    body[5] = 9                                      # unknown op, correctly signed
    signed = bytes(body) + hmac.new(SECRET, bytes(body), hashlib.sha256).digest()
    assert server.handle(signed, 0.0) is None
    assert server.rejected == {Reason.MALFORMED: 1}
    body[5], body[4] = 1, 2                          # version 2
    signed = bytes(body) + hmac.new(SECRET, bytes(body), hashlib.sha256).digest()
    assert server.handle(signed, 0.0) is None
    assert server.rejected[Reason.VERSION] == 1


def exchange(server, op, nonce, now, node="alpha", epoch=1):
    rid, data = request(op, nonce, epoch, node=node)
    reply = decode_reply(server.handle(data, now), SECRET)
    assert reply.rid == rid and reply.op is op and reply.node == node
    return reply, data


def test_a_request_without_the_current_nonce_is_challenged_then_granted_on_retry():
    server = LeaseServer(SECRETS)
    r, _ = exchange(server, ACQUIRE, NO_NONCE, 0.0)
    assert r.grant == Grant(Status.CHALLENGE, None, 0, 0.0) and r.nonce != NO_NONCE
    again, _ = exchange(server, ACQUIRE, b"w" * 16, 0.0)                # a wrong nonce
    assert again.grant.status is Status.CHALLENGE
    assert again.nonce == r.nonce            # the challenge does not spend the nonce
    ok, _ = exchange(server, ACQUIRE, r.nonce, 0.1)
    assert ok.grant == Grant(Status.GRANTED, "alpha", 1, 2.0) and ok.nonce != r.nonce
    # nonces are per node: beta is challenged and sees alpha holding the lease
    b, _ = exchange(server, ACQUIRE, ok.nonce, 0.2, node="beta")
    assert b.grant == Grant(Status.CHALLENGE, "alpha", 1, 1.9)
    b, _ = exchange(server, ACQUIRE, b.nonce, 0.2, node="beta")
    assert b.grant.status is Status.HELD


def test_a_replayed_request_is_never_carried_out():
    server = LeaseServer(SECRETS)
    first, _ = exchange(server, ACQUIRE, NO_NONCE, 0.0)
    granted, acquire = exchange(server, ACQUIRE, first.nonce, 0.0)
    assert granted.grant.granted
    released, release = exchange(server, RELEASE, granted.nonce, 0.5)
    assert released.grant.status is Status.RELEASED
    # replayed later, the acquire would take the lease back from beta: it is only challenged
    b, _ = exchange(server, ACQUIRE, NO_NONCE, 0.6, node="beta")
    b, _ = exchange(server, ACQUIRE, b.nonce, 0.6, node="beta")
    assert b.grant.holder == "beta"
    for replay in (acquire, release, acquire):
        r = decode_reply(server.handle(replay, 0.7), SECRET)
        assert r.grant == Grant(Status.CHALLENGE, "beta", 1, 1.9)
        assert r.nonce == released.nonce     # alpha's nonce stays good for alpha
    nxt, _ = exchange(server, ACQUIRE, released.nonce, 0.8)
    assert nxt.grant.status is Status.HELD


def test_nonces_are_kept_for_a_bounded_number_of_nodes():
    server = LeaseServer(SECRETS)
    first, _ = exchange(server, ACQUIRE, NO_NONCE, 0.0)
    for i in range(L.MAX_NODES):
        exchange(server, ACQUIRE, NO_NONCE, 0.0, node=f"n{i}")
    r, _ = exchange(server, ACQUIRE, first.nonce, 0.0)   # alpha's nonce was dropped
    assert r.grant.status is Status.CHALLENGE


def test_the_client_takes_only_the_reply_to_its_request():
    c = LeaseClient([("127.0.0.1", 9)], "app", "alpha", SECRET)
    rid, other = os.urandom(16), os.urandom(16)
    g = Grant(Status.GRANTED, "alpha", 1, 2.0)

    def reply(rid=rid, op=ACQUIRE, node="alpha", secret=SECRET):
        return encode_reply(Reply(op, rid, b"n" * 16, "app", node, g), secret)

    assert c._match(reply(), rid, ACQUIRE).grant == g
    assert c._match(reply(rid=other), rid, ACQUIRE) is None           # a stale reply
    assert c._match(reply(op=RENEW), rid, ACQUIRE) is None
    assert c._match(reply(node="beta"), rid, ACQUIRE) is None
    assert c._match(reply(secret=b"other secret"), rid, ACQUIRE) is None
    assert c._match(reply()[:-1], rid, ACQUIRE) is None
    with pytest.raises(ValueError):
        LeaseClient([("witness.example", 9)], "app", "alpha", SECRET)


# --- the timing budget -------------------------------------------------------------------


def test_the_default_budget_is_safe_and_unsafe_ones_are_refused():
    assert check_budget() == pytest.approx(2.0 * 0.99 - 0.25)
    with pytest.raises(ValueError, match="renew at most every 0.477 s"):
        check_budget(renew_every=0.5)
    with pytest.raises(ValueError, match="must cover the time the agents need"):
        check_budget(safety=0.05, stop_time=0.1)
    with pytest.raises(ValueError, match="shorter than the renewal interval"):
        check_budget(timeout=0.4, renew_every=0.4)
    with pytest.raises(ValueError, match="positive"):
        check_budget(length=0)
    with pytest.raises(ValueError, match="drift"):
        check_budget(drift=0.6)
    with pytest.raises(ValueError, match="too slow"):
        check_budget(length=0.3, renew_every=0.05, safety=0.3, timeout=0.01)
    check_budget(0.6, 0.1, 0.05, timeout=0.08, stop_time=0.02)        # the socket tests' own


async def test_release_and_no_answer_on_the_client_side(autojump_clock):
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as mute:
        await mute.bind(("127.0.0.1", 0))              # receives, never answers
        c = LeaseClient([("127.0.0.1", mute.getsockname()[1])], "app", "alpha", SECRET)
        c.valid_until = trio.current_time() + 5.0
        assert await c.renew(1) is None                  # a timeout changes nothing
        assert c.held() and c.verdict().ok
        assert await c.release(1) is None
        assert not c.held() and not c.verdict().ok       # released at once, answer or not
        assert c.verdict().reason == "lease witness unreachable"


# --- a witness and two clients on loopback -----------------------------------------------

LENGTH, SAFETY, DRIFT = 0.6, 0.05, 0.01


async def start_witness(nursery, secrets=SECRETS, length=LENGTH):
    return await nursery.start(lambda task_status: L.serve(
        "127.0.0.1", 0, secrets, length=length, task_status=task_status))


def client(port, node):
    return LeaseClient([("127.0.0.1", port)], "app", node, SECRET,
                       timeout=0.2, drift=DRIFT, safety=SAFETY)


async def test_two_nodes_contend_for_the_lease(caplog):
    caplog.set_level(logging.INFO, logger="fusemirror.lease")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await start_witness(nursery)
            alpha, beta = client(port, "alpha"), client(port, "beta")
            g = await alpha.acquire(1)
            assert g.status is Status.STARTING                 # the first LENGTH seconds
            assert alpha.verdict().reason == "lease not granted (the witness has just started)"
            await trio.sleep(LENGTH)
            t0 = trio.current_time()
            g = await alpha.acquire(1)
            assert g.granted and g.holder == "alpha" and alpha.held()
            # conservative: from before the send, shortened by the drift and safety margins
            assert t0 < alpha.valid_until <= trio.current_time() + LENGTH * (1 - DRIFT) - SAFETY
            assert alpha.verdict().reason == "the witness granted the lease"
            for _ in range(8):                                 # 0.8 s > LENGTH: renewals hold it
                await trio.sleep(0.1)
                assert (await alpha.renew(1)).granted
                g = await beta.acquire(1)
                assert g.status is Status.HELD and g.holder == "alpha"
                assert not beta.held()
            # alpha stops renewing; beta gets the lease once it has expired at the witness
            alpha_until = alpha.valid_until
            while True:
                g = await beta.acquire(1)
                if g.granted:
                    break
                assert g.status is Status.HELD
                await trio.sleep(0.02)
            granted_at = trio.current_time()
            assert alpha_until + SAFETY <= granted_at and not alpha.held()
            assert beta.held() and beta.valid_until > granted_at
            g = await alpha.renew(1)
            assert g.status is Status.NOT_HOLDER and not alpha.held()
            # beta bumps its epoch; the handover by release is immediate
            assert (await beta.renew(2)).epoch == 2
            assert (await beta.release(2)).status is Status.RELEASED and not beta.held()
            assert (await alpha.acquire(1)).status is Status.EPOCH    # alpha's data is old
            t1 = trio.current_time()
            g = await alpha.acquire(2)
            assert g.granted and trio.current_time() - t1 < 0.5 and alpha.held()
            nursery.cancel_scope.cancel()
    messages = [r.getMessage() for r in caplog.records if r.name == "fusemirror.lease"]
    assert messages[1:] == ["lease of app granted to alpha at epoch 1",
                            "lease of app held by alpha at epoch 1 expired",
                            "lease of app granted to beta at epoch 1",
                            "lease of app: beta raised its epoch from 1 to 2",
                            "lease of app released by beta at epoch 2",
                            "lease of app granted to alpha at epoch 2"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_the_client_ignores_stale_replies_and_counts_from_the_send():
    """A fake witness answers first with a granting reply to another request id, then
    with the true answer: the client takes only the latter. Then it grants after a
    delay: the client's deadline counts from the send, not from the answer. The first
    address is dead."""
    with trio.fail_after(5), trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as fake:
        await fake.bind(("127.0.0.1", 0))
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
            await dead.bind(("127.0.0.1", 0))
            c = LeaseClient([("127.0.0.1", dead.getsockname()[1]),
                             ("127.0.0.1", fake.getsockname()[1])], "app", "alpha", SECRET)

            async def answer(*answers, delay=0.0):
                data, source = await fake.recvfrom(MAX_DATAGRAM)
                req = decode_request(data, SECRETS)
                await trio.sleep(delay)
                for stale, grant in answers:
                    rid = os.urandom(16) if stale else req.rid
                    await fake.sendto(encode_reply(Reply(req.op, rid, b"n" * 16, "app",
                                                         "alpha", grant), SECRET), source)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer, (True, Grant(Status.GRANTED, "alpha", 1, 2.0)),
                                   (False, Grant(Status.HELD, "beta", 1, 1.0)))
                g = await c.acquire(1)
            assert g == Grant(Status.HELD, "beta", 1, 1.0) and not c.held()
            assert c._nonce == b"n" * 16
            async with trio.open_nursery() as nursery:
                nursery.start_soon(partial(answer, (False, Grant(Status.GRANTED, "alpha", 1, 2.0)),
                                           delay=0.2))
                t0, m0 = trio.current_time(), time.monotonic()
                assert (await c.acquire(1)).granted
            keep = 2.0 * (1 - L.MAX_DRIFT) - L.DEFAULT_SAFETY
            assert t0 < c.valid_until <= t0 + keep + 0.05
            assert m0 < c.valid_until_monotonic <= m0 + keep + 0.05
            assert trio.current_time() >= t0 + 0.2


async def test_a_witness_on_ipv6_loopback_reached_among_several_addresses():
    with trio.fail_after(5), trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as dead:
        await dead.bind(("127.0.0.1", 0))
        async with trio.open_nursery() as nursery:
            port = await nursery.start(lambda task_status: L.serve(
                "::1", 0, SECRETS, length=0.1, task_status=task_status))
            c = LeaseClient([("127.0.0.1", dead.getsockname()[1]), ("::1", port)],
                            "app", "alpha", SECRET, timeout=0.2, safety=0.01)
            await trio.sleep(0.1)
            assert (await c.acquire(0)).granted and c.held()
            nursery.cancel_scope.cancel()


async def test_a_busy_address_is_a_configuration_failure():
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        await busy.bind(("127.0.0.1", 0))
        with pytest.raises(Failure) as e:
            await L.serve("127.0.0.1", busy.getsockname()[1], SECRETS)
    assert e.value.code == BAD_CONFIG
    assert str(e.value).startswith("cannot listen on 127.0.0.1 port ")
    assert "\n" not in str(e.value)


def test_load_secrets(tmp_path):
    (tmp_path / "app.secret").write_bytes(b"  module secret\n")
    (tmp_path / "db.secret").write_bytes(b"another secret")
    (tmp_path / "README").write_text("not a secret")
    assert L.load_secrets(str(tmp_path)) == {"app": SECRET, "db": b"another secret"}
    (tmp_path / "short.secret").write_bytes(b"1234567\n")
    with pytest.raises(Failure, match="fewer than 8 bytes") as e:
        L.load_secrets(str(tmp_path))
    assert e.value.code == BAD_CONFIG
    (tmp_path / "empty").mkdir()
    with pytest.raises(Failure, match="no MODULE.secret file"):
        L.load_secrets(str(tmp_path / "empty"))
    with pytest.raises(Failure, match="cannot read secrets folder"):
        L.load_secrets(str(tmp_path / "missing"))


# --- the witness's state: epochs kept across restarts, one table for all addresses -------

def test_epochs_survive_a_restart_through_the_state_file(tmp_path):
    state = str(tmp_path / "witness.state")
    server = LeaseServer(SECRETS, 1.0, state_file=state)
    server.table.request("app", "alpha", 4, Op.ACQUIRE, now=0.0)
    server.table.request("app", "alpha", 5, Op.RENEW, now=0.1)
    assert server._durable() and L.load_epochs(state) == {"app": 5}
    again = LeaseServer(SECRETS, 1.0, state_file=state)
    # beta, at the epoch before alpha went on alone, is refused even after a restart
    assert again.table.request("app", "beta", 4, Op.ACQUIRE, now=0.0).status is Status.EPOCH
    assert again.table.request("app", "beta", 5, Op.ACQUIRE, now=0.0).granted
    assert L.load_epochs(str(tmp_path / "missing")) == {}


@pytest.mark.parametrize("text", ['{"epochs": {"app": -1}}', "{", '{"epochs": ["app"]}',
                                  '{"epochs": {"app": true}}', ""])
def test_a_damaged_state_file_is_a_configuration_failure(tmp_path, text):
    state = tmp_path / "witness.state"
    state.write_text(text)
    with pytest.raises(Failure) as e:
        LeaseServer(SECRETS, 1.0, state_file=str(state))
    assert e.value.code == BAD_CONFIG and "is damaged" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_raise_that_cannot_be_saved_is_not_answered(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir()
    server = LeaseServer(SECRETS, 1.0, state_file=str(folder / "witness.state"))
    folder.rmdir()                                        # the save fails from now on

    def ask(epoch: int, nonce: bytes) -> bytes | None:
        return server.handle(encode_request(Request(Op.ACQUIRE, os.urandom(16), nonce, epoch,
                                                    "app", "alpha"), SECRET), now=0.0)

    challenge = decode_reply(ask(0, NO_NONCE), SECRET)    # nothing changed: answered
    assert challenge.grant.status is Status.CHALLENGE
    assert ask(3, challenge.nonce) is None                # the floor rose: not durable
    folder.mkdir()
    assert ask(3, NO_NONCE) is not None and L.load_epochs(str(folder / "witness.state")) == {
        "app": 3}


async def test_two_addresses_of_one_witness_share_its_leases(tmp_path):
    """alpha reaches the witness only on 127.0.0.1, beta only on ::1: still one holder."""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            server = LeaseServer(SECRETS, LENGTH, state_file=str(tmp_path / "w.state"))
            ports = [await nursery.start(lambda task_status, h=h: L.serve(
                h, 0, SECRETS, server=server, task_status=task_status))
                for h in ("127.0.0.1", "::1")]
            alpha = client(ports[0], "alpha")
            beta = LeaseClient([("::1", ports[1])], "app", "beta", SECRET, timeout=0.2,
                               drift=DRIFT, safety=SAFETY)
            assert (await alpha.acquire(2)).granted
            g = await beta.acquire(2)
            assert g.status is Status.HELD and g.holder == "alpha" and not beta.held()
            nursery.cancel_scope.cancel()
    assert L.load_epochs(str(tmp_path / "w.state")) == {"app": 2}


def test_the_witness_command_refuses_a_damaged_state_file(tmp_path):
    import subprocess
    import sys
    (tmp_path / "app.secret").write_bytes(SECRET)
    (tmp_path / "witness.state").write_text("{")
    p = subprocess.run([sys.executable, "-m", "cli.main", "witness", "--listen", "127.0.0.1:7792",
                        "--secrets", str(tmp_path), "--state", str(tmp_path / "witness.state"),
                        "--log-file", str(tmp_path / "w.log")],
                       capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == BAD_CONFIG, p.stderr
    assert p.stderr.count("\n") == 1 and "witness.state is damaged" in p.stderr, p.stderr
