"""The virtual IP actions (fusemirror.vip) on real interfaces, and the namespace lab
(tests/netns.py) they run in.

Each test that touches interfaces builds its own Lab: namespaces PREFIX-br (the
bridge), PREFIX-alpha (10.213.0.1), PREFIX-beta (.2) and PREFIX-client (.100),
and deletes them at the end whatever happened. fusemirror.vip acts on the
namespace of its process, so the tests run it in a node with
`nsenter --net ... python -c` (the way the controller will run inside a node).
Traffic goes only between these namespaces, inside 10.213.0.0/24; every wait is
bounded.
"""

from __future__ import annotations

import ipaddress
import json
import os
import select
import struct
import subprocess
import sys
import time

import pytest

from fusemirror import vip
from fusemirror.errors import BAD_CONFIG, FAILED

from fusemirror.lab.netns import _CREATED, Lab, LabError

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=TOP)
VIP = "10.213.0.50/24"
VIP_IP = "10.213.0.50"
PORT = 7000

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")

# Runs a list of fusemirror.vip calls in one process; prints one JSON result per call.
CALLS = r"""
import json, sys
from fusemirror import vip
out = []
for name, args in json.loads(sys.argv[1]):
    try:
        out.append({"ok": getattr(vip, name)(*args)})
    except vip.VipError as e:
        out.append({"error": str(e), "code": e.code})
print(json.dumps(out))
"""

# Answers every TCP connection on PORT with the node's name; ends after 30 s idle.
SERVER = r"""
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.listen(8)
s.settimeout(30)
print("ready", flush=True)
while True:
    try:
        c, _ = s.accept()
    except TimeoutError:
        break
    with c:
        c.sendall(sys.argv[2].encode())
"""

CONNECT = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2) as c:
        c.settimeout(2)
        print(c.recv(100).decode())
except OSError as e:
    print("error", e)
"""

# Prints, as JSON, the ARP frames seen on veth0 whose sender IP is argv[1], until it has
# argv[2] of them or 5 s have passed.
SNIFF_ARP = r"""
import json, socket, struct, sys, time
want, count = socket.inet_aton(sys.argv[1]), int(sys.argv[2])
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("veth0", 0x0806))
print("ready", flush=True)
seen, deadline = [], time.monotonic() + 5
while len(seen) < count and time.monotonic() < deadline:
    s.settimeout(max(0.01, deadline - time.monotonic()))
    try:
        f = s.recv(100)
    except TimeoutError:
        break
    htype, ptype, hlen, plen, op = struct.unpack("!HHBBH", f[14:22])
    sha, spa, tha, tpa = f[22:28], f[28:32], f[32:38], f[38:42]
    if spa == want:
        seen.append({"dst": f[:6].hex(":"), "src": f[6:12].hex(":"), "op": op,
                     "sha": sha.hex(":"), "spa": socket.inet_ntoa(spa),
                     "tha": tha.hex(":"), "tpa": socket.inet_ntoa(tpa), "len": len(f)})
print(json.dumps(seen))
"""

# Waits up to argv[2] s for one datagram on UDP port argv[1]; prints "got" or "none".
UDP_RECEIVE = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("0.0.0.0", int(sys.argv[1])))
s.settimeout(float(sys.argv[2]))
print("ready", flush=True)
try:
    s.recv(100)
    print("got")
except TimeoutError:
    print("none")
"""

UDP_SEND = r"""
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(3):
    try:
        s.sendto(b"x", (sys.argv[1], int(sys.argv[2])))
    except OSError:
        pass
"""


@pytest.fixture
def lab():
    with Lab() as lab:
        yield lab


def calls(lab: Lab, member: str, *calls) -> list[dict]:
    """Run fusemirror.vip calls [(name, *args)] in the member's namespace."""
    p = lab.run(member, [sys.executable, "-c", CALLS,
                         json.dumps([[c[0], list(c[1:])] for c in calls])], cwd=TOP, env=ENV)
    return json.loads(p.stdout)


def call(lab: Lab, member: str, name: str, *args):
    (result,) = calls(lab, member, (name, *args))
    assert "ok" in result, result
    return result["ok"]


def start(lab: Lab, member: str, script: str, *args) -> subprocess.Popen:
    """Start a helper script in the member's namespace and wait for its "ready"."""
    p = lab.popen(member, [sys.executable, "-c", script, *map(str, args)],
                  stdout=subprocess.PIPE, text=True)
    ready, _, _ = select.select([p.stdout], [], [], 10)
    assert ready and p.stdout.readline().strip() == "ready", f"{script[:40]!r} did not start"
    return p


def finish(p: subprocess.Popen, timeout: float = 10) -> str:
    out, _ = p.communicate(timeout=timeout)
    return out.strip()


def connect(lab: Lab, address: str = VIP_IP, port: int = PORT) -> str:
    return lab.run("client", [sys.executable, "-c", CONNECT, address, port]).stdout.strip()


def wait_for(predicate, timeout=3.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


# -- the VIP moves ---------------------------------------------------------------------------

def test_vip_moves_from_alpha_to_beta(lab):
    for node in ("alpha", "beta"):
        start(lab, node, SERVER, PORT, node)
    alpha_mac, beta_mac = lab.mac("alpha"), lab.mac("beta")
    assert alpha_mac != beta_mac
    assert lab.neighbour("client", VIP_IP) is None     # the client never looked for it

    iface = call(lab, "alpha", "choose_interface", VIP)
    assert iface == "veth0"
    assert call(lab, "alpha", "add", VIP, iface) is True
    assert connect(lab) == "alpha"
    assert lab.neighbour("client", VIP_IP)["lladdr"] == alpha_mac

    assert call(lab, "alpha", "remove", VIP, iface) is True
    assert call(lab, "alpha", "present", VIP) is False
    # The client still believes the VIP is at alpha: only an announcement changes that
    # before its cache entry expires.
    assert lab.neighbour("client", VIP_IP)["lladdr"] == alpha_mac

    assert call(lab, "beta", "add", VIP, call(lab, "beta", "choose_interface", VIP)) is True
    time.sleep(0.2)
    assert lab.neighbour("client", VIP_IP)["lladdr"] == alpha_mac    # adding is not enough
    sniffer = start(lab, "client", SNIFF_ARP, VIP_IP, 6)
    assert call(lab, "beta", "announce", VIP_IP, "veth0", 3, 0.05) == 6
    wait_for(lambda: lab.neighbour("client", VIP_IP)["lladdr"] == beta_mac, 3,
             "the client's neighbour entry to move to beta")
    frames = json.loads(finish(sniffer))
    assert connect(lab) == "beta"

    # Three rounds, each an ARP announcement (request) and a gratuitous reply.
    assert [f["op"] for f in frames] == [1, 2] * 3
    for f in frames:
        assert f["dst"] == "ff:ff:ff:ff:ff:ff" and f["src"] == beta_mac == f["sha"]
        assert f["spa"] == f["tpa"] == VIP_IP and f["len"] == 60
        assert f["tha"] == ("00:00:00:00:00:00" if f["op"] == 1 else beta_mac)


def test_announce_resolves_a_client_that_is_still_looking(lab):
    """A client that tried the VIP while nobody held it (the gap of a failover) has an
    unresolved entry; the announcement resolves it without waiting for its next probe."""
    # The client's next ARP probe only in 10 s: within the test, only the announcement
    # can resolve the entry.
    lab.run("client", ["sysctl", "-qw", "net.ipv4.neigh.veth0.retrans_time_ms=10000"])
    lab.run("client", [sys.executable, "-c", UDP_SEND, VIP_IP, PORT])
    assert lab.neighbour("client", VIP_IP)["state"] == ["INCOMPLETE"]
    assert call(lab, "beta", "add", VIP, "veth0") is True
    assert call(lab, "beta", "announce", VIP, "veth0", 1, 0) == 2     # ADDRESS/PREFIX too
    wait_for(lambda: lab.neighbour("client", VIP_IP).get("lladdr") == lab.mac("beta"), 3,
             "the client's neighbour entry to resolve to beta")


def test_present_add_remove(lab):
    results = calls(lab, "alpha",
                    ("present", VIP), ("remove", VIP), ("remove", VIP, "veth0"),
                    ("add", VIP, "veth0"), ("add", VIP, "veth0"),
                    ("present", VIP), ("present", VIP, "veth0"), ("present", VIP, "lo"),
                    ("present", VIP, "nosuch0"), ("present", "10.213.0.51/24"),
                    ("remove", VIP, "lo"), ("present", VIP),
                    ("remove", "10.213.0.50/16"), ("present", VIP), ("remove", VIP))
    assert [r.get("ok", r) for r in results] == [
        False, False, False,        # absent; removing it is a no-op
        True, False,                # added; added again: already there, nothing done
        True, True, False,          # present anywhere and on veth0, not on lo
        False, False,               # an unknown interface, another address
        False, True,                # removing it from another interface leaves it
        True, False, False]         # removed whatever the prefix given; then gone
    assert "10.213.0.50" not in lab.run("alpha", ["ip", "-j", "addr"]).stdout


def test_errors_are_one_line_with_a_code(lab):
    results = calls(lab, "alpha",
                    ("add", VIP, "veth0"),
                    ("add", "10.213.0.50/16", "veth0"),       # same address, other prefix
                    ("add", VIP, "lo"),                       # already on another interface
                    ("add", "10.213.0.51/24", "nosuch0"),     # no such device
                    ("add", "10.213.0.51/24", "bad name"),
                    ("announce", "10.213.0.51", "veth0"),     # not held: never announced
                    ("add", "10.213.0.51/24", "lo"),
                    ("announce", "10.213.0.51", "lo"),        # not Ethernet
                    ("choose_interface", "10.213.0.52/24"),   # veth0 and lo both qualify
                    ("choose_interface", "10.214.0.50/24"),   # nobody in that network
                    ("announce", VIP_IP, "veth0", -1),
                    ("add", "10.213.0.300/24", "veth0"))
    assert results[0] == {"ok": True} and results[6] == {"ok": True}
    errors = results[1:6] + results[7:]
    for r in errors:
        assert "error" in r and "\n" not in r["error"] and r["error"], r
    messages = [r["error"] for r in errors]
    assert [r["code"] for r in errors] == ([FAILED] * 3 + [BAD_CONFIG] + [FAILED] * 4
                                           + [BAD_CONFIG] * 2)
    assert "already on veth0 as 10.213.0.50/24" in messages[0]
    assert "already on veth0, not lo" in messages[1]
    assert 'Cannot find device "nosuch0"' in messages[2]
    assert "bad interface name 'bad name'" in messages[3]
    assert "does not hold it" in messages[4]
    assert "not an Ethernet interface" in messages[5]
    assert "several interfaces" in messages[6] and "lo, veth0" in messages[6]
    assert "no interface holds an address in 10.214.0.0/24" in messages[7]
    assert "10.213.0.300/24" in messages[9]


@pytest.mark.parametrize("bad", ["10.213.0.300/24", "10.213.0.50", "10.213.0.50/33", "vip",
                                 "10.213.0.0/24", "10.213.0.255/24", "127.0.0.2/8",
                                 "224.0.0.1/24", "", None, 42])
def test_bad_address(bad):
    for action in (vip.present, vip.remove, vip.choose_interface):
        with pytest.raises(vip.VipError) as e:
            action(bad)
        assert e.value.code == BAD_CONFIG and "\n" not in str(e.value)
        assert str(e.value).startswith("bad virtual IP")


def test_arp_frames_layout():
    mac = bytes.fromhex("020000000001")
    request, reply = vip.arp_frames(ipaddress.IPv4Address(VIP_IP), mac)
    for frame, op, tha in ((request, 1, b"\0" * 6), (reply, 2, mac)):
        assert len(frame) == 60 and frame[42:] == b"\0" * 18
        assert frame[:14] == b"\xff" * 6 + mac + b"\x08\x06"
        assert struct.unpack("!HHBBH", frame[14:22]) == (1, 0x0800, 6, 4, op)
        assert frame[22:42] == mac + bytes([10, 213, 0, 50]) + tha + bytes([10, 213, 0, 50])


def test_neighbour_advertisement_layout():
    mac = bytes.fromhex("020000000001")
    target = ipaddress.IPv6Address("fd00::50")
    frame = vip.na_frame(target, mac)
    assert frame[:14] == bytes.fromhex("333300000001") + mac + b"\x86\xdd"
    ipv6, icmp = frame[14:54], frame[54:]
    assert ipv6[:4] == b"\x60\0\0\0" and struct.unpack("!HBB", ipv6[4:8]) == (32, 58, 255)
    assert ipv6[8:24] == target.packed
    assert ipv6[24:40] == bytes.fromhex("ff02" + "00" * 13 + "01")
    assert len(icmp) == 32 and icmp[:2] == bytes([136, 0])
    assert icmp[4:8] == bytes.fromhex("20000000")            # Override only
    assert icmp[8:24] == target.packed and icmp[24:] == bytes([2, 1]) + mac
    # The checksum, verified with the RFC 1071 rule: the one's-complement sum of the
    # pseudo-header and the message, checksum included, is all ones.
    data = ipv6[8:40] + len(icmp).to_bytes(4, "big") + b"\0\0\0\x3a" + icmp
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total > 0xFFFF:
        total = (total >> 16) + (total & 0xFFFF)
    assert total == 0xFFFF


# -- the lab itself --------------------------------------------------------------------------

def udp_reaches(lab: Lab, src: str, dst: str, net: int = 0, wait: float = 0.4) -> bool:
    receiver = start(lab, dst, UDP_RECEIVE, PORT + 1, wait)
    lab.run(src, [sys.executable, "-c", UDP_SEND, lab.address(dst, net), PORT + 1])
    return finish(receiver) == "got"


def test_lab_faults():
    # Two networks, both inside 10.213.0.0/24: 10.213.0.0/25 and 10.213.0.128/25.
    with Lab(subnets=("10.213.0.0/25", "10.213.0.128/25")) as lab:
        assert lab.address("client", 1) == "10.213.0.228"
        assert udp_reaches(lab, "alpha", "beta", 0) and udp_reaches(lab, "alpha", "beta", 1)

        lab.link_down("alpha", net=0)
        assert not udp_reaches(lab, "alpha", "beta", 0)
        assert udp_reaches(lab, "alpha", "beta", 1)
        lab.link_up("alpha", net=0)
        assert udp_reaches(lab, "alpha", "beta", 0)

        lab.link_down("beta", side="bridge")             # every network, cable pulled
        assert "NO-CARRIER" in lab.run("beta", ["ip", "link", "show", "veth0"]).stdout
        assert not udp_reaches(lab, "alpha", "beta", 0)
        assert not udp_reaches(lab, "alpha", "beta", 1)
        lab.link_up("beta", side="bridge")
        assert udp_reaches(lab, "alpha", "beta", 1)

        lab.drop("alpha", "in")                          # one-way loss
        assert not udp_reaches(lab, "beta", "alpha", 0)
        assert udp_reaches(lab, "alpha", "beta", 0)
        assert udp_reaches(lab, "alpha", "alpha", 0)     # its own address, over lo
        lab.undrop("alpha")
        lab.undrop("alpha")                              # nothing left: a no-op
        assert udp_reaches(lab, "beta", "alpha", 0)


def test_lab_cleans_up_after_a_failure():
    with pytest.raises(RuntimeError):
        with Lab() as lab:
            names = [lab.ns(m) for m in ("br", "alpha", "beta", "client")]
            proc = lab.popen("beta", ["sleep", "60"])
            raise RuntimeError("the test failed")
    assert proc.returncode is not None
    left = lab_namespaces()
    assert not set(names) & left and not set(names) & _CREATED


def test_lab_refuses_what_it_did_not_create():
    foreign = Lab(prefix="fmnot")                       # never entered: created nothing
    with pytest.raises(LabError, match="not created by this lab"):
        foreign.run("alpha", ["true"])
    with pytest.raises(LabError, match="not created by this lab"):
        foreign.link_down("alpha")
    with pytest.raises(LabError, match="bad lab prefix"):
        Lab(prefix="Too-long-prefix")
    with Lab() as lab:
        with pytest.raises(LabError, match="already exist"):
            with Lab(prefix=lab.prefix):
                pass
        assert lab.run("alpha", ["true"]).returncode == 0   # the clash left it alone
    assert not {lab.ns(m) for m in ("br", "alpha", "beta", "client")} & lab_namespaces()


def lab_namespaces() -> set[str]:
    out = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    return {n["name"] for n in json.loads(out or "[]")}
