"""The split-brain guard's ping witness: ICMP framing (pure), the verdict rule, and real
echo requests on loopback."""

import trio

from fusemirror import witness as W


def test_echo_request_checksum_and_reply_parsing():
    req = W.echo_request(0x1234, 7, b"fusemirror")
    assert W.internet_checksum(req) == 0               # a valid ICMP checksum sums to zero
    reply = bytearray(req)
    reply[0] = W.ECHO_REPLY
    ip_header = bytes([0x45]) + bytes(19)
    assert W.parse_reply(ip_header + bytes(reply)) == (0x1234, 7)
    assert W.parse_reply(ip_header + req) is None        # a request is not a reply
    assert W.parse_reply(b"\x45") is None
    v6 = bytearray(W.echo_request(9, 1, b"x", v6=True))
    v6[0] = W.ECHO6_REPLY
    assert W.parse_reply(bytes(v6), v6=True) == (9, 1)


async def test_verdict_needs_a_reply_newer_than_the_peer_when_the_peer_is_lost(autojump_clock):
    w = W.PingWitness(["192.0.2.1"], interval=0.2, timeout=1.0)
    assert not w.verdict(True, None).ok
    assert w.verdict(True, None).reason == "witness 192.0.2.1 unreachable"
    w.targets[0].answered = trio.current_time()
    assert w.verdict(True, None).ok
    peer_heard = trio.current_time() + 0.1
    await trio.sleep(0.3)
    # the peer went silent after the last reply: that reply proves nothing any more
    assert not w.verdict(False, peer_heard).ok
    w.targets[0].answered = trio.current_time()
    assert w.verdict(False, peer_heard).ok
    assert w.verdict(False, peer_heard).reason == "witness 192.0.2.1 answered"
    await trio.sleep(1.5)
    assert not w.verdict(True, None).ok                 # too old


async def test_a_witness_on_loopback_answers():
    w = W.PingWitness(["127.0.0.1"], interval=0.05, timeout=1.0)
    async with trio.open_nursery() as nursery:
        await nursery.start(w.run)
        with trio.fail_after(5):
            while not w.verdict(True, None).ok:
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    (status,) = w.status()
    assert status["address"] == "127.0.0.1" and status["rtt"] is not None
