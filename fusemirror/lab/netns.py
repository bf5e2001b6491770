"""Two nodes and a client on one machine, in network namespaces, for tests.

    with Lab() as lab:                       # prefix "fm" + 4 random hex digits
        lab.run("alpha", ["ip", "-j", "addr"])
        server = lab.popen("beta", [sys.executable, "-c", "..."])
        lab.link_down("alpha"); lab.link_up("alpha")
        lab.drop("beta", "in"); lab.undrop("beta")

Layout (ARCHITECTURE.md, "Two nodes on one machine")::

    PREFIX-br       one bridge per network: br0, br1, ...; one port per member,
                    named after it ("alpha", "beta", "client")
    PREFIX-alpha    veth0 (network 0), veth1 (network 1), ...; lo up
    PREFIX-beta     the same
    PREFIX-client   the same

Addresses: in every network (subnets, default one network 10.213.0.0/24) alpha is
host 1, beta host 2 and the client host 100: 10.213.0.1, .2 and .100. Every
interface lives inside the lab's namespaces from the moment it is created (the
veth peer is created directly in its namespace), so nothing is ever added to the
namespace the tests run in, and the interface names need no prefix. Processes run
in a namespace with `nsenter --net=/run/netns/NAME`, never `ip netns exec`, which
would also give them a private mount namespace (FUSE mounts made there would be
invisible to everyone else); so /sys seen from inside shows the *test's*
namespace, and code run there must ask `ip` (or netlink), not /sys/class/net.

Safety: this module only ever touches namespaces it created itself in this
process (`_CREATED`); `run`, `popen`, `link_*`, `drop` and teardown refuse any
other name. A Lab refuses to start if a namespace with its prefix already exists.
Teardown (on leaving the `with`, whatever happened, and again at interpreter exit
for anything left) stops the processes started with `popen` by PID, then deletes
the lab's namespaces by name, which destroys their bridges and veths with them.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import re
import secrets
import signal
import subprocess

NETNS_DIR = "/run/netns"
DEFAULT_SUBNETS = ("10.213.0.0/24",)
HOSTS = {"alpha": 1, "beta": 2, "client": 100}
NODES = ("alpha", "beta")
MEMBERS = ("alpha", "beta", "client")
NFT_TABLE = "fmlab"
COMMAND_TIMEOUT = 20.0

_CREATED: set[str] = set()        # every namespace this process made and has not deleted
_LABS: list["Lab"] = []           # open labs, closed again at exit if a test left one


class LabError(Exception):
    pass


def _guard(name: str) -> str:
    if name not in _CREATED:
        raise LabError(f"refusing to touch network namespace {name!r}: not created by this lab")
    return name


def _existing() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def _host(cmd: list[str], timeout: float = COMMAND_TIMEOUT) -> subprocess.CompletedProcess:
    """Run a command in the test's own namespace (only `ip netns add/del` are)."""
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if p.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {p.stderr.strip() or p.returncode}")
    return p


class Lab:
    """Namespaces PREFIX-br, PREFIX-alpha, PREFIX-beta, PREFIX-client and the links
    between them. `prefix`: 1 to 8 lower-case letters or digits, random if None.
    `subnets`: one IPv4 network per bridge, each at least a /25 (host 100 must fit)."""

    def __init__(self, prefix: str | None = None, subnets=DEFAULT_SUBNETS):
        self.prefix = prefix or "fm" + secrets.token_hex(2)
        if not re.fullmatch(r"[a-z0-9]{1,8}", self.prefix):
            raise LabError(f"bad lab prefix {self.prefix!r}")
        self.subnets = tuple(ipaddress.IPv4Network(s) for s in subnets)
        if not self.subnets:
            raise LabError("a lab needs at least one subnet")
        for net in self.subnets:
            if net.num_addresses < max(HOSTS.values()) + 2:
                raise LabError(f"subnet {net} is too small for host {max(HOSTS.values())}")
        self.procs: list[subprocess.Popen] = []
        self._mine: list[str] = []
        self._closed = False

    # -- names and addresses -------------------------------------------------------------

    def ns(self, member: str) -> str:
        """Namespace name of "br", "alpha", "beta" or "client"."""
        if member != "br" and member not in MEMBERS:
            raise LabError(f"no lab member {member!r}")
        return f"{self.prefix}-{member}"

    def address(self, member: str, net: int = 0) -> str:
        return str(self.subnets[net].network_address + HOSTS[member])

    def cidr(self, member: str, net: int = 0) -> str:
        return f"{self.address(member, net)}/{self.subnets[net].prefixlen}"

    @staticmethod
    def dev(net: int = 0) -> str:
        """The name of a member's interface on network `net` (in its own namespace)."""
        return f"veth{net}"

    def mac(self, member: str, net: int = 0) -> str:
        (link,) = json.loads(self.run(member, ["ip", "-j", "link", "show", "dev",
                                               self.dev(net)]).stdout)
        return link["address"]

    def neighbour(self, member: str, address: str, net: int = 0) -> dict | None:
        """The member's neighbour (ARP) entry for address: {"lladdr", "state", ...}."""
        out = self.run(member, ["ip", "-j", "neigh", "show", address, "dev", self.dev(net)])
        entries = json.loads(out.stdout or "[]")
        return entries[0] if entries else None

    # -- building and tearing down -------------------------------------------------------

    def __enter__(self) -> "Lab":
        _LABS.append(self)
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _build(self) -> None:
        names = [self.ns(m) for m in ("br", *MEMBERS)]
        clash = [n for n in _existing() if n.startswith(self.prefix + "-")]
        if clash:
            raise LabError(f"namespaces with prefix {self.prefix!r} already exist: {clash}")
        for name in names:
            _host(["ip", "netns", "add", name])     # fails if the name exists
            _CREATED.add(name)
            self._mine.append(name)
        for member in ("br", *MEMBERS):
            self.run(member, ["ip", "link", "set", "lo", "up"])
        for i, net in enumerate(self.subnets):
            bridge = f"br{i}"
            self.run("br", ["ip", "link", "add", bridge, "type", "bridge", "stp_state", "0",
                            "forward_delay", "0"])
            self.run("br", ["ip", "link", "set", bridge, "up"])
            for member in MEMBERS:
                port = member if i == 0 else f"{member}{i}"
                self.run("br", ["ip", "link", "add", port, "type", "veth", "peer", "name",
                                self.dev(i), "netns", self.ns(member)])
                self.run("br", ["ip", "link", "set", port, "master", bridge, "up"])
                self.run(member, ["ip", "addr", "add", self.cidr(member, i), "dev", self.dev(i)])
                self.run(member, ["ip", "link", "set", self.dev(i), "up"])

    def close(self) -> None:
        """Stop our processes by PID, then delete our namespaces. Idempotent."""
        if self._closed:
            return
        self._closed = True
        errors = []
        for p in self.procs:
            _stop(p)
        for name in reversed(self._mine):
            if name not in _CREATED:
                continue
            try:
                _host(["ip", "netns", "delete", name])
                _CREATED.discard(name)
            except (LabError, subprocess.TimeoutExpired) as e:
                errors.append(str(e))
        if self in _LABS:
            _LABS.remove(self)
        if errors:
            raise LabError("lab teardown: " + "; ".join(errors))

    # -- running things inside ----------------------------------------------------------

    def _nsenter(self, member: str, argv) -> list[str]:
        name = _guard(self.ns(member))
        return ["nsenter", f"--net={NETNS_DIR}/{name}", "--", *map(str, argv)]

    def run(self, member: str, argv, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            **kw) -> subprocess.CompletedProcess:
        """Run argv in the member's network namespace and wait (text, output captured)."""
        p = subprocess.run(self._nsenter(member, argv), capture_output=True, text=True,
                           timeout=timeout, **kw)
        if check and p.returncode != 0:
            raise LabError(f"[{member}] {' '.join(map(str, argv))} -> {p.returncode}: "
                           f"{p.stderr.strip()}")
        return p

    def popen(self, member: str, argv, **kw) -> subprocess.Popen:
        """Start argv in the member's network namespace. nsenter execs argv, so the
        Popen's pid is the program's; it is stopped by that pid at teardown."""
        p = subprocess.Popen(self._nsenter(member, argv), **kw)
        self.procs.append(p)
        return p

    # -- faults --------------------------------------------------------------------------

    def _nets(self, net: int | None) -> range:
        return range(len(self.subnets)) if net is None else range(net, net + 1)

    def link_down(self, member: str, net: int | None = None, side: str = "node") -> None:
        """Set the member's veth down on one network (all if None). side="node": the
        member's own end (it loses its connected routes, sends fail at once);
        side="bridge": the bridge's end, a cable pulled at the switch (the member keeps
        its addresses and routes, sees NO-CARRIER, and what it sends is lost)."""
        self._set_link(member, net, side, "down")

    def link_up(self, member: str, net: int | None = None, side: str = "node") -> None:
        self._set_link(member, net, side, "up")

    def _set_link(self, member: str, net: int | None, side: str, state: str) -> None:
        for i in self._nets(net):
            if side == "node":
                self.run(member, ["ip", "link", "set", self.dev(i), state])
            elif side == "bridge":
                self.run("br", ["ip", "link", "set", member if i == 0 else f"{member}{i}",
                                state])
            else:
                raise LabError(f"side must be 'node' or 'bridge', not {side!r}")

    def drop(self, member: str, direction: str, net: int | None = None,
             peer: str | None = None) -> None:
        """Drop IP traffic (IPv4 and IPv6, not ARP) on the member's veth(s) in one
        direction ("in" or "out") or "both", with nftables inside its namespace; only
        the traffic with another member when `peer` names it. Loopback inside the
        namespace is untouched. Repeated calls add rules."""
        if direction not in ("in", "out", "both"):
            raise LabError(f"direction must be 'in', 'out' or 'both', not {direction!r}")
        script = [f"add table inet {NFT_TABLE}",
                  f"add chain inet {NFT_TABLE} input "
                  "{ type filter hook input priority -300 ; policy accept ; }",
                  f"add chain inet {NFT_TABLE} output "
                  "{ type filter hook output priority -300 ; policy accept ; }"]
        for i in self._nets(net):
            src = dst = ""
            if peer is not None:
                src, dst = (f"ip saddr {self.address(peer, i)} ",
                            f"ip daddr {self.address(peer, i)} ")
            if direction in ("in", "both"):
                script.append(f"add rule inet {NFT_TABLE} input iifname \"{self.dev(i)}\" "
                              f"{src}drop")
            if direction in ("out", "both"):
                script.append(f"add rule inet {NFT_TABLE} output oifname \"{self.dev(i)}\" "
                              f"{dst}drop")
        self.run(member, ["nft", "-f", "-"], input="\n".join(script) + "\n")

    def undrop(self, member: str) -> None:
        """Remove every rule `drop` (and `hold`) added in the member's namespace."""
        p = self.run(member, ["nft", "list", "tables"])
        for family in ("inet", "arp"):
            if f"table {family} {NFT_TABLE}" in p.stdout:
                self.run(member, ["nft", "delete", "table", family, NFT_TABLE])

    def hold(self, member: str, net: int | None = None) -> None:
        """What the member sends waits in its kernel, and goes out late, all at once, on
        `undrop`: its neighbour (ARP) cache is flushed and the ARP answers it gets are
        dropped, so its packets queue while it keeps asking (every 100 ms, for up to
        30 s; the kernel then drops them). That is how a cable put back delivered
        heartbeats a second old (chaos seed 14). The queue holds about 200 small
        packets; the oldest go first when it is full."""
        script = [f"add table arp {NFT_TABLE}",
                  f"add chain arp {NFT_TABLE} input "
                  "{ type filter hook input priority 0 ; policy accept ; }"]
        for i in self._nets(net):
            self.run(member, ["ip", "ntable", "change", "name", "arp_cache", "dev", self.dev(i),
                              "mcast_probes", "300", "retrans", "100"])
            script.append(f"add rule arp {NFT_TABLE} input iifname \"{self.dev(i)}\" drop")
        self.run(member, ["nft", "-f", "-"], input="\n".join(script) + "\n")
        for i in self._nets(net):
            self.run(member, ["ip", "neigh", "flush", "dev", self.dev(i)])


def _stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    try:
        _end(p, grace)
    finally:
        for f in (p.stdin, p.stdout, p.stderr):
            if f is not None:
                f.close()


def _end(p: subprocess.Popen, grace: float) -> None:
    if p.poll() is not None:
        return
    try:
        os.kill(p.pid, signal.SIGTERM)
        p.wait(timeout=grace)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        try:
            os.kill(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            pass


@atexit.register
def _close_leftovers() -> None:
    for lab in list(_LABS):
        try:
            lab.close()
        except Exception:
            pass
