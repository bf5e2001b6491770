"""The virtual IP: put it on an interface, take it off, and tell the network where it is.

These are the controller's VIP actions. They act on the network namespace of the
calling process (a node of the two-nodes-on-one-machine lab runs its controller
under `nsenter --net`, so there they act inside the node). They block (an `ip`
command or a few sleeps), so the controller calls them in a worker thread. Every
failure raises VipError with a one-line message.

Addresses are changed with iproute2's `ip`, and read from its JSON output
(`ip -j addr show`); nothing is read from /sys, which shows the namespace that
mounted it rather than the caller's when only the network namespace was entered.

- add(cidr, interface): idempotent. Adding a VIP that is already on that interface
  with that prefix does nothing and returns False; True when it was added. The same
  address on another interface, or with another prefix, is an error: the caller must
  remove it first. IPv6 addresses are added with `nodad`, usable at once.
- remove(cidr, interface=None): takes the address off that interface (any interface
  if None) whatever its prefix there; a VIP that is not there is a no-op (False).
- present(cidr, interface=None): whether the address is configured there (prefix not
  compared); False for an interface that does not exist.
- choose_interface(cidr): the one interface holding another address inside the VIP's
  network; none or several is an error (then the configuration must name it).
- announce(address, interface, count, interval): gratuitous ARP for IPv4, unsolicited
  neighbour advertisements for IPv6, built here and sent on an AF_PACKET socket (no
  arping). It refuses to announce an address the interface does not hold.

Frames of one IPv4 announcement round (both forms, because neighbours differ in
which one they honour; Linux honours both for an entry it already has, and creates
none unless arp_accept is set)::

    Ethernet  dst ff:ff:ff:ff:ff:ff  src MAC  type 0x0806
    ARP       htype 1, ptype 0x0800, hlen 6, plen 4
      1. request (RFC 5227 "ARP announcement"): op 1, sha MAC, spa VIP,
         tha 00:00:00:00:00:00, tpa VIP
      2. reply: op 2, sha MAC, spa VIP, tha MAC, tpa VIP (Linux treats a reply as
         gratuitous only when tha equals sha)
    padded with zeros to the 60-byte Ethernet minimum

IPv6 round: one frame::

    Ethernet  dst 33:33:00:00:00:01  src MAC  type 0x86dd
    IPv6      payload 32, next header 58, hop limit 255, src VIP, dst ff02::1
    ICMPv6    type 136 (NA), code 0, checksum, flags Override (R=0, S=0), target VIP,
              option 2 (target link-layer address), length 1 (8 bytes), MAC

`count` rounds are sent, the first at once and the next ones `interval` apart.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import struct
import subprocess
import time

from .errors import BAD_CONFIG, FAILED, Failure

log = logging.getLogger(__name__)

IP_TIMEOUT = 10.0          # seconds an `ip` command may take
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
ARPHRD_ETHER = 1
ARP_REQUEST = 1
ARP_REPLY = 2
ETH_MIN_FRAME = 60         # without the FCS
BROADCAST = b"\xff" * 6
ALL_NODES = ipaddress.IPv6Address("ff02::1")
ALL_NODES_MAC = b"\x33\x33\x00\x00\x00\x01"
NA_OVERRIDE = 0x20000000
MAX_COUNT = 1000
MAX_INTERVAL = 60.0

Address = ipaddress.IPv4Interface | ipaddress.IPv6Interface


class VipError(Failure):
    """A VIP action failed; the message is one line."""

    def __init__(self, message: str, code: int = FAILED):
        super().__init__(code, " ".join(message.split()))


# -- parsing --------------------------------------------------------------------------------

def parse(address_cidr: str) -> Address:
    """"ADDRESS/PREFIX" as an ip_interface; VipError(BAD_CONFIG) for anything else."""
    try:
        if not isinstance(address_cidr, str) or "/" not in address_cidr:
            raise ValueError
        vip = ipaddress.ip_interface(address_cidr)
    except ValueError:
        raise VipError(f"bad virtual IP {address_cidr!r}: must be ADDRESS/PREFIX such as "
                       "10.0.0.100/24", BAD_CONFIG) from None
    if vip.version == 4 and vip.network.prefixlen < 31 and vip.ip in (
            vip.network.network_address, vip.network.broadcast_address):
        raise VipError(f"bad virtual IP {address_cidr}: it is the network's "
                       f"{'network' if vip.ip == vip.network.network_address else 'broadcast'}"
                       " address", BAD_CONFIG)
    if vip.ip.is_loopback or vip.ip.is_multicast or vip.ip.is_unspecified:
        raise VipError(f"bad virtual IP {address_cidr}: not a unicast address", BAD_CONFIG)
    return vip


def _ip_only(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        if not isinstance(address, str):
            raise ValueError
        return ipaddress.ip_interface(address).ip     # "ADDRESS" or "ADDRESS/PREFIX"
    except ValueError:
        raise VipError(f"bad virtual IP {address!r}: must be an IP address", BAD_CONFIG) from None


def _check_interface(interface: str) -> str:
    if not isinstance(interface, str) or not re.fullmatch(r"[^\s/:]{1,15}", interface):
        raise VipError(f"bad interface name {interface!r}", BAD_CONFIG)
    return interface


# -- iproute2 -------------------------------------------------------------------------------

def _ip(*args: str) -> str:
    cmd = ["ip", *args]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=IP_TIMEOUT)
    except FileNotFoundError:
        raise VipError("cannot run ip: iproute2 is not installed") from None
    except subprocess.TimeoutExpired:
        raise VipError(f"{' '.join(cmd)} did not finish within {IP_TIMEOUT:g} s") from None
    if p.returncode != 0:
        why = p.stderr.strip().splitlines()
        raise VipError(f"{' '.join(cmd)}: {why[0] if why else f'exit status {p.returncode}'}")
    return p.stdout


def addresses() -> list[tuple[str, Address]]:
    """Every address of the current network namespace, as (interface, ip_interface)."""
    out = _ip("-j", "addr", "show")
    try:
        links = json.loads(out or "[]")
        found = []
        for link in links:
            for a in link.get("addr_info", ()):
                if a.get("family") in ("inet", "inet6") and "local" in a:
                    found.append((link["ifname"],
                                  ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")))
        return found
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise VipError(f"cannot read the output of ip -j addr show: {e}") from None


def _holders(vip: Address) -> list[tuple[str, Address]]:
    return [(ifname, a) for ifname, a in addresses() if a.ip == vip.ip]


# -- actions --------------------------------------------------------------------------------

def present(address_cidr: str, interface: str | None = None) -> bool:
    """Whether the VIP's address is on interface (on any interface if None)."""
    vip = parse(address_cidr)
    return any(interface is None or ifname == interface for ifname, _ in _holders(vip))


def add(address_cidr: str, interface: str) -> bool:
    """Put the VIP on interface. False if it was already there with this prefix."""
    vip = parse(address_cidr)
    _check_interface(interface)
    for attempt in range(2):
        for ifname, a in _holders(vip):
            if ifname != interface:
                raise VipError(f"{vip.ip} is already on {ifname}, not {interface}")
            if a.network.prefixlen != vip.network.prefixlen:
                raise VipError(f"{vip.ip} is already on {interface} as {a}, not {vip}")
            return False
        if attempt:
            break
        try:
            _ip("addr", "add", str(vip), "dev", interface, *(("nodad",) if vip.version == 6
                                                               else ()))
        except VipError as e:
            if "File exists" in str(e):
                continue        # added meanwhile by someone else: look again
            raise
        log.info("virtual IP %s added on %s", vip, interface)
        return True
    raise VipError(f"{vip} could not be added on {interface}: the address exists elsewhere")


def remove(address_cidr: str, interface: str | None = None) -> bool:
    """Take the VIP off interface (off every interface if None), whatever its prefix
    there. False if it was not there."""
    vip = parse(address_cidr)
    if interface is not None:
        _check_interface(interface)
    removed = False
    for ifname, a in _holders(vip):
        if interface is not None and ifname != interface:
            continue
        try:
            _ip("addr", "del", str(a), "dev", ifname)
        except VipError:
            if any(i == ifname for i, _ in _holders(vip)):
                raise
            continue            # removed meanwhile by someone else
        log.info("virtual IP %s removed from %s", a, ifname)
        removed = True
    return removed


def choose_interface(address_cidr: str) -> str:
    """The interface holding another address inside the VIP's network."""
    vip = parse(address_cidr)
    names = sorted({ifname for ifname, a in addresses()
                    if a.version == vip.version and a.ip != vip.ip and a.ip in vip.network
                    and not (a.ip.is_link_local and not vip.ip.is_link_local)})
    if not names:
        raise VipError(f"no interface holds an address in {vip.network}: "
                       "name the interface for the virtual IP")
    if len(names) > 1:
        raise VipError(f"several interfaces hold an address in {vip.network} "
                       f"({', '.join(names)}): name the interface for the virtual IP")
    return names[0]


# -- announcing -----------------------------------------------------------------------------

def arp_frames(address: ipaddress.IPv4Address, mac: bytes) -> list[bytes]:
    """The two gratuitous ARP frames (request, reply) for address at mac."""
    frames = []
    for op, tha in ((ARP_REQUEST, b"\0" * 6), (ARP_REPLY, mac)):
        frame = (BROADCAST + mac + struct.pack("!H", ETH_P_ARP)
                 + struct.pack("!HHBBH", ARPHRD_ETHER, 0x0800, 6, 4, op)
                 + mac + address.packed + tha + address.packed)
        frames.append(frame.ljust(ETH_MIN_FRAME, b"\0"))
    return frames


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def na_frame(address: ipaddress.IPv6Address, mac: bytes) -> bytes:
    """The unsolicited neighbour advertisement for address at mac."""
    body = struct.pack("!I", NA_OVERRIDE) + address.packed + struct.pack("!BB", 2, 1) + mac
    pseudo = (address.packed + ALL_NODES.packed
              + struct.pack("!IxxxB", 4 + len(body), socket.IPPROTO_ICMPV6))
    icmp = struct.pack("!BBH", 136, 0, _checksum(pseudo + struct.pack("!BBH", 136, 0, 0) + body))
    icmp += body
    ipv6 = (struct.pack("!IHBB", 6 << 28, len(icmp), socket.IPPROTO_ICMPV6, 255)
            + address.packed + ALL_NODES.packed)
    return ALL_NODES_MAC + mac + struct.pack("!H", ETH_P_IPV6) + ipv6 + icmp


def announce(address: str, interface: str, count: int = 3, interval: float = 0.2) -> int:
    """Send `count` announcement rounds for address ("ADDRESS" or "ADDRESS/PREFIX")
    on interface, `interval` seconds apart, the first at once. Returns the number of
    frames sent. The interface must hold the address and be an Ethernet interface."""
    ip = _ip_only(address)
    _check_interface(interface)
    if not isinstance(count, int) or not 0 <= count <= MAX_COUNT:
        raise VipError(f"announce count must be 0 to {MAX_COUNT}, not {count!r}", BAD_CONFIG)
    if not 0 <= interval <= MAX_INTERVAL:
        raise VipError(f"announce interval must be 0 to {MAX_INTERVAL:g} s, not {interval!r}",
                       BAD_CONFIG)
    if not any(ifname == interface for ifname, a in addresses() if a.ip == ip):
        raise VipError(f"will not announce {ip} on {interface}: the interface does not hold it")
    if count == 0:
        return 0
    ethertype = ETH_P_ARP if ip.version == 4 else ETH_P_IPV6
    sent = 0
    try:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ethertype)) as s:
            s.bind((interface, ethertype))
            _, _, _, hatype, mac = s.getsockname()
            if hatype != ARPHRD_ETHER or len(mac) != 6:
                raise VipError(f"cannot announce {ip} on {interface}: not an Ethernet interface")
            frames = arp_frames(ip, mac) if ip.version == 4 else [na_frame(ip, mac)]
            for round_ in range(count):
                if round_:
                    time.sleep(interval)
                for frame in frames:
                    s.send(frame)
                    sent += 1
    except OSError as e:
        raise VipError(f"cannot announce {ip} on {interface}: {e.strerror or e}") from None
    log.info("announced %s on %s (%d frames)", ip, interface, sent)
    return sent
