"""The module configuration: one TOML file per module, identical on both nodes.

`load(path)` reads it into frozen dataclasses or raises `ConfigError` listing every
problem found, each with its line. tomllib reports syntax errors only, so the line of
a key is found by indexing the text (`_Lines`). `check(path)` also looks at the files
the configuration names (scripts, secret file, folders), for `fusemirror config check`.
Every key and default is documented in docs/configuration.md; the defaults live here,
in the dataclasses, and nowhere else.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tomllib
import urllib.parse
from dataclasses import dataclass, field, fields
from typing import ClassVar

from . import errors as X
from .decide import SPLIT_BRAIN_POLICIES

CONFIG_DIR = "/etc/fusemirror"
ALONE, LASTPRIM = "alone", "lastprim"        # defaultprim values besides a node name
ACTIONS = ("restart", "stopstart", "wait")   # what a failed checker does
ON_PEER_LOSS = ("alone", "block")            # the mount agent's policies (mirror.Policy)


def default_path(module: str) -> str:
    return os.path.join(CONFIG_DIR, f"{module}.toml")


# --- the configuration -------------------------------------------------------------

@dataclass(frozen=True)
class Node:
    name: str
    addresses: tuple[str, ...]   # one per network; heartbeats on all, replication on the first
    root: str = ""               # prefix of this node's folders ("" = /), no trailing slash

    @property
    def replication_address(self) -> str:
        return self.addresses[0]

    def path(self, folder: str) -> str:
        """Where a folder of the module lives on this node."""
        return self.root + folder


@dataclass(frozen=True)
class Folder:
    path: str
    port: int                    # replication port, on the replica's first address


@dataclass(frozen=True)
class Heartbeat:
    port: int = 7790
    interval: float = 0.2
    timeout: float = 1.0         # the peer is lost when every network is silent this long


@dataclass(frozen=True)
class Replication:
    timeout: float = 10.0
    on_peer_loss: str = "alone"
    compress: bool = True
    resync_rate: int = 0          # bytes per second of data sent by a resync; 0: no cap


@dataclass(frozen=True)
class Vip:
    address: str
    prefix: int
    interface: str | None = None  # None: the interface holding an address of that network
    arp_count: int = 3            # gratuitous ARPs (unsolicited NAs) sent at takeover

    @property
    def cidr(self) -> str:
        return f"{self.address}/{self.prefix}"


@dataclass(frozen=True)
class Script:
    path: str
    timeout: float = 60.0


@dataclass(frozen=True)
class Scripts:
    start_prim: Script
    stop_prim: Script
    start_both: Script | None = None
    stop_both: Script | None = None


@dataclass(frozen=True, kw_only=True)
class Checker:
    kind: ClassVar[str] = ""
    name: str
    interval: float = 5.0
    timeout: float = 5.0
    action: str = "restart"


@dataclass(frozen=True, kw_only=True)
class ProcessChecker(Checker):
    kind: ClassVar[str] = "process"
    pidfile: str | None = None    # exactly one of pidfile and pattern
    pattern: str | None = None    # a regular expression searched in each command line


@dataclass(frozen=True, kw_only=True)
class TcpChecker(Checker):
    kind: ClassVar[str] = "tcp"
    host: str = "127.0.0.1"
    port: int


@dataclass(frozen=True, kw_only=True)
class HttpChecker(Checker):
    kind: ClassVar[str] = "http"
    url: str
    expect: int = 200


@dataclass(frozen=True, kw_only=True)
class CommandChecker(Checker):
    kind: ClassVar[str] = "command"
    argv: tuple[str, ...]


CHECKERS = {c.kind: c for c in (ProcessChecker, TcpChecker, HttpChecker, CommandChecker)}
_KIND_KEYS = ({f.name for c in CHECKERS.values() for f in fields(c)}     # pidfile, url, ...
              - {f.name for f in fields(Checker)})


@dataclass(frozen=True)
class RestartGuard:
    limit: int = 3               # local restarts allowed within window;
    window: float = 86400.0      # the next failure fails over


@dataclass(frozen=True)
class Failover:
    automatic: bool = True
    defaultprim: str = ALONE
    split_brain: str = "manual"     # or "last_primary", "most_changes" (decide.py)


@dataclass(frozen=True)
class Witness:
    """The split-brain guard (docs/cluster.md): `ping` needs a witness address that
    a node must reach to act without its peer; `none` only with i_accept_split_brain."""
    mode: str                      # "lease" | "ping" | "none"
    addresses: tuple[str, ...] = ()
    interval: float = 0.2          # ping: between two echo requests
    timeout: float = 1.0           # ping: a witness silent this long is unreachable
    i_accept_split_brain: bool = False
    port: int = 7792               # lease: the witness daemon's UDP port
    length: float = 1.5            # lease: as given to `fusemirror witness --lease`
    renew: float = 0.3             # lease: seconds between two renewals
    request_timeout: float = 0.25  # lease: how long one request waits for an answer


WITNESS_MODES = ("lease", "ping", "none")


@dataclass(frozen=True)
class Http:
    port: int = 7791
    address: str = "0.0.0.0"     # where /ready, /liveness, /metrics and /state listen


@dataclass(frozen=True)
class ModuleConfig:
    source: str                  # the file it was read from
    module: str
    secret_file: str
    nodes: tuple[Node, Node]
    folders: tuple[Folder, ...]
    scripts: Scripts
    heartbeat: Heartbeat = field(default_factory=Heartbeat)
    replication: Replication = field(default_factory=Replication)
    vip: Vip | None = None
    checkers: tuple[Checker, ...] = ()
    restart: RestartGuard = field(default_factory=RestartGuard)
    failover: Failover = field(default_factory=Failover)
    http: Http = field(default_factory=Http)
    witness: Witness = field(default_factory=lambda: Witness("none",
                                                             i_accept_split_brain=True))

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        names = " and ".join(repr(n.name) for n in self.nodes)
        raise UnknownNode(self.source, f"node {name!r} is not in this configuration "
                                       f"(its nodes are {names})")

    def peer_of(self, name: str) -> Node:
        me = self.node(name)
        return self.nodes[1] if me is self.nodes[0] else self.nodes[0]


# --- errors --------------------------------------------------------------------------

def format_error(source: str, line: int, message: str) -> str:
    return f"{source}:{line}: {message}" if line else f"{source}: {message}"


class ConfigError(X.Failure):
    """.errors: [(line, message)] in file order; line 0 is the file as a whole."""

    def __init__(self, source: str, errors: list[tuple[int, str]]):
        self.source = source
        self.errors = sorted(errors, key=lambda e: e[0])
        self.lines = [format_error(source, line, msg) for line, msg in self.errors]
        super().__init__(X.BAD_CONFIG, "\n".join(self.lines))


class UnknownNode(ConfigError):
    def __init__(self, source: str, message: str):
        super().__init__(source, [(0, message)])


# --- entry points --------------------------------------------------------------------

def load(path: str) -> ModuleConfig:
    return loads(_read(path), path)


def loads(text: str, source: str = "<config>") -> ModuleConfig:
    config, errors, _ = _parse(text, source)
    if errors:
        raise ConfigError(source, errors)
    return config


def check(path: str) -> list[str]:
    """Every problem of the file, as `FILE:LINE: message` lines; [] when it is good.
    Beyond load(): the scripts and command checkers exist and are executable, the
    secret file is readable and long enough, the folders exist on every node."""
    try:
        _, errors, reader = _parse(_read(path), path)
    except ConfigError as e:
        return e.lines
    if reader is not None:
        for where, name, need in dict.fromkeys(reader.files):
            problem = _file_problem(name, need)
            if problem:
                errors.append((reader.lines.find(where), f"{_label(where)}: {problem}"))
    return ConfigError(path, errors).lines


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(path, [(0, f"cannot read the configuration: {e.strerror}")]) from None
    try:
        return raw.decode()
    except UnicodeDecodeError as e:
        raise ConfigError(path, [(raw.count(b"\n", 0, e.start) + 1, "not UTF-8 text")]) from None


def _parse(text: str, source: str):
    """(config or None, [(line, message)], reader or None when the TOML is invalid)."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return None, [_syntax_error(str(e), text)], None
    reader = _Reader(_Lines(text))
    config = _build(reader, data, source)
    return (None if reader.errors else config), reader.errors, reader


def _syntax_error(message: str, text: str) -> tuple[int, str]:
    m = re.search(r"\s*\(at line (\d+), column (\d+)\)$", message)
    if m:
        return int(m[1]), f"TOML syntax: {message[:m.start()]} (column {m[2]})"
    line = len(text.splitlines()) if message.endswith("(at end of document)") else 0
    return line, f"TOML syntax: {message}"


def _file_problem(name: str, need: str) -> str | None:
    if need == "secret":
        from .agent import read_secret        # the one definition of a good secret file
        try:
            read_secret(name)
        except X.Failure as e:
            return str(e)
        return None
    if not os.path.exists(name):
        return f"{name} does not exist"
    if need == "dir":
        return None if os.path.isdir(name) else f"{name} is not a directory"
    if not os.path.isfile(name):
        return f"{name} is not a file"
    return None if os.access(name, os.X_OK) else f"{name} is not executable"


# --- where each key is: line numbers from the text ----------------------------------

_PART = r"""(?:"(?:[^"\\]|\\.)*"|'[^']*'|[A-Za-z0-9_-]+)"""
_KEY = rf"{_PART}(?:\s*\.\s*{_PART})*"
_ARRAY_HEADER = re.compile(rf"\s*\[\[\s*({_KEY})\s*\]\]")
_TABLE_HEADER = re.compile(rf"\s*\[\s*({_KEY})\s*\]")
_KEY_LINE = re.compile(rf"\s*({_KEY})\s*=")


class _Lines:
    """Maps key paths such as ("node", 1, "addresses") to the line that defines them.
    Only lines that start outside any string or bracket are looked at."""

    def __init__(self, text: str):
        self.where: dict[tuple, int] = {}
        counts: dict[tuple, int] = {}          # arrays of tables: entries seen so far
        table: tuple = ()
        in_string, depth = None, 0
        for n, line in enumerate(text.splitlines(), 1):
            rest = line
            if in_string is None and depth == 0:
                if m := _ARRAY_HEADER.match(line):
                    parts = _parts(m[1])
                    base = self._resolve(parts[:-1], counts) + (parts[-1],)
                    counts[base] = counts.get(base, 0) + 1
                    table = base + (counts[base] - 1,)
                    self._mark(table, n)
                    continue
                if m := _TABLE_HEADER.match(line):
                    table = self._resolve(_parts(m[1]), counts)
                    self._mark(table, n)
                    continue
                if m := _KEY_LINE.match(line):
                    self._mark(table + tuple(_parts(m[1])), n)
                    rest = line[m.end():]
            in_string, depth = _scan(rest, in_string, depth)

    def _mark(self, path: tuple, n: int) -> None:
        for k in range(1, len(path) + 1):
            self.where.setdefault(path[:k], n)

    @staticmethod
    def _resolve(parts, counts) -> tuple:
        path: tuple = ()
        for part in parts:
            path += (part,)
            if path in counts:
                path += (counts[path] - 1,)
        return path

    def find(self, path: tuple) -> int:
        """The line of path, else of its nearest enclosing table; 1 for the top level."""
        for k in range(len(path), 0, -1):
            if path[:k] in self.where:
                return self.where[path[:k]]
        return 1


def _parts(key: str) -> list[str]:
    return [p[1:-1] if p[0] in "\"'" else p for p in re.findall(_PART, key)]


def _scan(text: str, in_string: str | None, depth: int) -> tuple[str | None, int]:
    """Follow strings, comments and brackets to the end of one line."""
    i = 0
    while i < len(text):
        if in_string:
            if text.startswith(in_string, i):
                i += len(in_string)
                in_string = None
            else:
                i += 2 if text[i] == "\\" and in_string[0] == '"' else 1
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith('"""', i) or text.startswith("'''", i):
            in_string = text[i:i + 3]
            i += 3
            continue
        if c in "\"'":
            in_string = c
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
        i += 1
    return (None if in_string in ('"', "'") else in_string), max(depth, 0)


# --- reading and validating ----------------------------------------------------------

_REQUIRED = object()
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


class _Bad(Exception):
    pass


class _Reader:
    def __init__(self, lines: _Lines):
        self.lines = lines
        self.errors: list[tuple[int, str]] = []
        self.files: list[tuple[tuple, str, str]] = []    # (where, file name, need) for check()
        self.broken: set[tuple] = set()                  # arrays of tables that could not be read

    def error(self, path: tuple, message: str) -> None:
        self.errors.append((self.lines.find(path), message))


def _label(path: tuple) -> str:
    out = ""
    for p in path:
        out += f"[{p + 1}]" if isinstance(p, int) else (f".{p}" if out else p)
    return out


def _show(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, str):
        return json.dumps(v)
    return "a table" if isinstance(v, dict) else "an array" if isinstance(v, list) else str(v)


class _Table:
    def __init__(self, reader: _Reader, path: tuple, data: dict, broken: bool = False):
        self.r, self.path, self.data, self.broken = reader, path, data, broken
        self.seen: set[str] = set()
        self.missing: list[tuple[str, str]] = []    # (key, message), reported by finish()

    def at(self, key) -> tuple:
        return self.path + (key,)

    def get(self, key: str, check, default=_REQUIRED):
        """The checked value; default when absent; None when missing or invalid."""
        self.seen.add(key)
        if key not in self.data:
            if default is _REQUIRED:
                self.missing.append((key, f"{_label(self.at(key))} is missing"))
                return None
            return default
        try:
            return check(self.data[key])
        except _Bad as e:
            self.r.error(self.at(key), f"{_label(self.at(key))} {e}")
            return None

    def table(self, key: str, required: bool = False) -> _Table:
        self.seen.add(key)
        if required and key not in self.data:
            self.missing.append((key, f"[{_label(self.at(key))}] is missing"))
            return _Table(self.r, self.at(key), {}, broken=True)
        value = self.data.get(key, {})
        if not isinstance(value, dict):
            self.r.error(self.at(key), f"{key} must be a table: write [{key}] then its keys")
            return _Table(self.r, self.at(key), {}, broken=True)
        return _Table(self.r, self.at(key), value)

    def array(self, key: str) -> list[_Table]:
        self.seen.add(key)
        value = self.data.get(key, [])
        if isinstance(value, dict):
            self.r.error(self.at(key), f"write [[{key}]], not [{key}]: there may be several")
            self.r.broken.add(self.at(key))
            return []
        if not isinstance(value, list) or not all(isinstance(e, dict) for e in value):
            self.r.error(self.at(key), f"{key} must be an array of tables, written [[{key}]]")
            self.r.broken.add(self.at(key))
            return []
        return [_Table(self.r, self.at(key) + (i,), e) for i, e in enumerate(value)]

    def finish(self) -> None:
        """Report unknown keys, then missing ones that no unknown key seems meant for."""
        meant = set()
        for key in sorted(self.data.keys() - self.seen):
            close = difflib.get_close_matches(key, sorted(self.seen), n=1)
            meant.update(close)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.r.error(self.at(key), f"unknown key {_label(self.at(key))}{hint}")
        for key, message in self.missing:
            if key not in meant and not self.broken:
                self.r.error(self.path, message)


# validators: value -> checked value, or raise _Bad("must be ...")

def _name(v) -> str:
    if not isinstance(v, str) or not _NAME.fullmatch(v):
        raise _Bad(f"must be a name of at most 63 letters, digits, '.', '_' or '-' "
                   f"starting with a letter or digit, not {_show(v)}")
    return v


def _text(v) -> str:
    if not isinstance(v, str) or not v:
        raise _Bad(f"must be a non-empty string, not {_show(v)}")
    return v


def _abspath(v) -> str:
    if not isinstance(v, str) or not v.startswith("/"):
        raise _Bad(f"must be an absolute path, not {_show(v)}")
    return os.path.normpath(v)


def _number(low: float, high: float, unit: str = ""):
    def check(v) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise _Bad(f"must be a number{unit}, not {_show(v)}")
        if not low < v <= high:
            raise _Bad(f"must be greater than {low:g} and at most {high:g}, not {v}")
        return float(v)
    return check


def _seconds(high: float):
    return _number(0, high, " of seconds")


def _integer(low: int, high: int):
    def check(v) -> int:
        if isinstance(v, bool) or not isinstance(v, int):
            raise _Bad(f"must be a whole number, not {_show(v)}")
        if not low <= v <= high:
            raise _Bad(f"must be between {low} and {high}, not {v}")
        return v
    return check


_port = _integer(1, 65535)


def _boolean(v) -> bool:
    if not isinstance(v, bool):
        raise _Bad(f"must be true or false, not {_show(v)}")
    return v


def _one_of(*choices: str):
    def check(v) -> str:
        if v not in choices:
            raise _Bad(f"must be one of {', '.join(choices)}, not {_show(v)}")
        return v
    return check


def _ip(v) -> str:
    try:
        return str(ipaddress.ip_address(v))
    except ValueError:
        raise _Bad(f"must be an IP address, not {_show(v)}") from None


def _list(check, what: str):
    def check_list(v) -> tuple:
        if not isinstance(v, list) or not v:
            raise _Bad(f"must be a non-empty array of {what}, not {_show(v)}")
        out = []
        for i, item in enumerate(v, 1):
            try:
                out.append(check(item))
            except _Bad as e:
                raise _Bad(f"item {i} {e}") from None
        return tuple(out)
    return check_list


def _interface(v) -> str:
    if not isinstance(v, str) or not re.fullmatch(r"[^\s/:]{1,15}", v):
        raise _Bad(f"must be a network interface name, not {_show(v)}")
    return v


def _cidr(v) -> tuple[str, int]:
    try:
        if not isinstance(v, str) or "/" not in v:
            raise ValueError
        iface = ipaddress.ip_interface(v)
    except ValueError:
        raise _Bad(f"must be ADDRESS/PREFIX such as \"10.0.0.100/24\", not {_show(v)}") from None
    return str(iface.ip), iface.network.prefixlen


def _regex(v) -> str:
    try:
        re.compile(_text(v))
    except re.error as e:
        raise _Bad(f"is not a valid regular expression: {e}") from None
    return v


def _url(v) -> str:
    u = urllib.parse.urlsplit(_text(v))
    if u.scheme not in ("http", "https") or not u.hostname:
        raise _Bad(f"must be an http:// or https:// URL, not {_show(v)}")
    return v


# --- the file, table by table -------------------------------------------------------

def _build(r: _Reader, data: dict, source: str) -> ModuleConfig:
    top = _Table(r, (), data)
    module = top.get("module", _name)
    secret_file = top.get("secret_file", _abspath)
    nodes = [_node(t) for t in top.array("node")]
    folders = [_folder(t) for t in top.array("folder")]
    heartbeat = _heartbeat(top.table("heartbeat"))
    replication = _replication(top.table("replication"))
    vip_table = top.table("vip")                          # optional: no [vip], no VIP
    vip = _vip(vip_table) if "vip" in data else None
    scripts = _scripts(top.table("scripts", required=True))
    checkers = [_checker(t) for t in top.array("checker")]
    restart = _restart(top.table("restart"))
    failover = _failover(top.table("failover"), nodes)
    http = _http(top.table("http"))
    if "witness" not in data:
        r.error(("witness",), "[witness] is missing: mode = \"ping\" with addresses = [...] "
                              "(recommended), or mode = \"none\" with "
                              "i_accept_split_brain = true (docs/configuration.md)")
        witness = Witness("none")
    else:
        witness = _witness(top.table("witness"))
    top.finish()

    if len(nodes) != 2 and ("node",) not in r.broken:
        r.error(("node", 2) if len(nodes) > 2 else ("node",),
                f"there must be exactly two [[node]] entries, not {len(nodes)}")
    if not folders and ("folder",) not in r.broken:
        r.error(("folder",), "there must be at least one [[folder]]")
    _networks(r, nodes)
    _folders_apart(r, folders)
    _unique(r, "name", [(n.name, ("node", i, "name")) for i, n in enumerate(nodes)])
    _unique(r, "name", [(c.name, ("checker", i, "name")) for i, c in enumerate(checkers)])
    _unique(r, "address", [(a, ("node", i, "addresses", j)) for i, n in enumerate(nodes)
                           for j, a in enumerate(n.addresses or ())]
            + [(vip and vip.address, ("vip", "address"))])
    _unique(r, "port", [(f.port, ("folder", i, "port")) for i, f in enumerate(folders)]
            + [(heartbeat.port, ("heartbeat", "port")), (http.port, ("http", "port"))])

    if secret_file:
        r.files.append((("secret_file",), secret_file, "secret"))
    for i, f in enumerate(folders):
        for n in nodes:
            if f.path and n.root is not None:
                r.files.append((("folder", i, "path"), n.path(f.path), "dir"))
    return ModuleConfig(source, module, secret_file, tuple(nodes), tuple(folders), scripts,
                        heartbeat, replication, vip, tuple(checkers), restart, failover, http,
                        witness)


def _witness(t: _Table) -> Witness:
    if t.broken:
        return Witness("none")
    mode = t.get("mode", _text)
    if mode is not None and mode not in WITNESS_MODES:
        t.r.error(t.at("mode"), f"witness.mode must be \"lease\", \"ping\" or \"none\", "
                                f"not {_show(mode)}")
    addresses = t.get("addresses", _list(_ip, "IP addresses"), ())
    accept = t.get("i_accept_split_brain", _boolean, False)
    w = Witness(mode or "none", tuple(addresses or ()),
                interval=t.get("interval", _seconds(10), Witness.interval),
                timeout=t.get("timeout", _seconds(300), Witness.timeout),
                i_accept_split_brain=accept,
                port=t.get("port", _port, Witness.port),
                length=t.get("length", _seconds(60), Witness.length),
                renew=t.get("renew", _seconds(10), Witness.renew),
                request_timeout=t.get("request_timeout", _seconds(10), Witness.request_timeout))
    if mode in ("ping", "lease") and not addresses and "addresses" not in t.data:
        t.r.error(t.at("mode"), f"witness.mode \"{mode}\" needs addresses = [...] (" +
                  ("the router both nodes reach, for instance)" if mode == "ping" else
                   "the third machine running fusemirror witness)"))
    if mode == "lease" and w.length and w.renew and w.request_timeout:
        from .lease import check_budget
        try:
            check_budget(w.length, w.renew, timeout=w.request_timeout)
        except ValueError as e:
            t.r.error(t.at("renew") if "renew" in t.data else t.at("mode"), f"witness: {e}")
    if mode == "none" and not accept:
        t.r.error(t.at("mode"), "witness.mode \"none\" lets both nodes become primary when "
                                "the network between them fails: it needs "
                                "i_accept_split_brain = true")
    _timeout_above_interval(t, "witness", w.interval, w.timeout)
    t.finish()
    return w


def _timeout_above_interval(t: _Table, section: str, interval, timeout) -> None:
    if interval and timeout and timeout <= 2 * interval:
        t.r.error(t.at("timeout") if "timeout" in t.data else t.at("interval"),
                  f"{section}.timeout ({timeout:g} s) must exceed twice "
                  f"{section}.interval ({interval:g} s)")


def _http(t: _Table) -> Http:
    http = Http(port=t.get("port", _port, Http.port),
                address=t.get("address", _ip, Http.address))
    t.finish()
    return http


def _node(t: _Table) -> Node:
    name = t.get("name", _name)
    if name in (ALONE, LASTPRIM):
        t.r.error(t.at("name"), f"{_label(t.at('name'))} cannot be {name!r}: "
                                f"failover.defaultprim gives that word its own meaning")
    node = Node(name, t.get("addresses", _list(_ip, "IP addresses")),
                t.get("root", lambda v: _abspath(v).rstrip("/"), ""))
    t.finish()
    return node


def _folder(t: _Table) -> Folder:
    path = t.get("path", _abspath)
    if path == "/":
        t.r.error(t.at("path"), f"{_label(t.at('path'))} cannot be /")
    folder = Folder(path, t.get("port", _port))
    t.finish()
    return folder


def _heartbeat(t: _Table) -> Heartbeat:
    hb = Heartbeat(port=t.get("port", _port, Heartbeat.port),
                   interval=t.get("interval", _seconds(10), Heartbeat.interval),
                   timeout=t.get("timeout", _seconds(300), Heartbeat.timeout))
    _timeout_above_interval(t, "heartbeat", hb.interval, hb.timeout)
    t.finish()
    return hb


def _replication(t: _Table) -> Replication:
    rep = Replication(timeout=t.get("timeout", _seconds(3600), Replication.timeout),
                      on_peer_loss=t.get("on_peer_loss", _one_of(*ON_PEER_LOSS),
                                         Replication.on_peer_loss),
                      compress=t.get("compress", _boolean, Replication.compress),
                      resync_rate=t.get("resync_rate", _integer(0, 1 << 40),
                                        Replication.resync_rate))
    t.finish()
    return rep


def _vip(t: _Table) -> Vip:
    address, prefix = t.get("address", _cidr) or (None, None)
    vip = Vip(address, prefix, t.get("interface", _interface, None),
              t.get("arp_count", _integer(0, 100), Vip.arp_count))
    t.finish()
    return vip


def _scripts(t: _Table) -> Scripts:
    def script(key: str, required: bool) -> Script | None:
        path = t.get(key, _abspath, _REQUIRED if required else None)
        timeout = t.get(f"{key}_timeout", _seconds(86400), Script.timeout)
        if path is None:
            if key not in t.data and f"{key}_timeout" in t.data:
                t.r.error(t.at(f"{key}_timeout"), f"scripts.{key}_timeout without scripts.{key}")
            return None
        t.r.files.append((t.at(key), path, "exec"))
        return Script(path, timeout)

    scripts = Scripts(script("start_prim", True), script("stop_prim", True),
                      script("start_both", False), script("stop_both", False))
    t.finish()
    return scripts


def _checker(t: _Table) -> Checker:
    kind = t.get("kind", _one_of(*CHECKERS))
    common = dict(name=t.get("name", _name, f"{kind or 'checker'}-{t.path[-1] + 1}"),
                  interval=t.get("interval", _seconds(86400), Checker.interval),
                  timeout=t.get("timeout", _seconds(3600), Checker.timeout),
                  action=t.get("action", _one_of(*ACTIONS), Checker.action))
    own: dict = {}
    if kind == "process":
        if ("pidfile" in t.data) == ("pattern" in t.data):
            t.r.error(t.path, f"{_label(t.path)}: a process checker needs either pidfile "
                              f"or pattern (one of them)")
        own = dict(pidfile=t.get("pidfile", _abspath, None),
                   pattern=t.get("pattern", _regex, None))
    elif kind == "tcp":
        own = dict(host=t.get("host", _text, TcpChecker.host), port=t.get("port", _port))
    elif kind == "http":
        own = dict(url=t.get("url", _url), expect=t.get("expect", _integer(100, 599),
                                                          HttpChecker.expect))
    elif kind == "command":
        own = dict(argv=t.get("argv", _list(_text, "strings")))
        if own["argv"]:
            argv0 = own["argv"][0]
            if argv0.startswith("/"):
                t.r.files.append((t.at("argv"), argv0, "exec"))
            else:
                t.r.error(t.at("argv"), f"{_label(t.at('argv'))}: the program must be an "
                                        f"absolute path, not {_show(argv0)}")
    for key in sorted(_KIND_KEYS & t.data.keys() - own.keys()):
        t.seen.add(key)
        if kind is not None:
            t.r.error(t.at(key), f"{_label(t.at(key))} does not apply to a {kind} checker")
    t.finish()
    return CHECKERS.get(kind, Checker)(**common, **own)


def _restart(t: _Table) -> RestartGuard:
    guard = RestartGuard(limit=t.get("limit", _integer(0, 1000), RestartGuard.limit),
                         window=t.get("window", _seconds(366 * 86400), RestartGuard.window))
    t.finish()
    return guard


def _failover(t: _Table, nodes: list[Node]) -> Failover:
    names = [n.name for n in nodes if n.name]
    defaultprim = t.get("defaultprim", _text, Failover.defaultprim)
    if defaultprim and defaultprim not in (ALONE, LASTPRIM, *names):
        close = difflib.get_close_matches(defaultprim, [ALONE, LASTPRIM, *names], n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        t.r.error(t.at("defaultprim"), f"failover.defaultprim must be \"alone\", \"lastprim\" "
                                       f"or a node name, not {_show(defaultprim)}{hint}")
    failover = Failover(automatic=t.get("automatic", _boolean, Failover.automatic),
                        defaultprim=defaultprim,
                        split_brain=t.get("split_brain", _one_of(*SPLIT_BRAIN_POLICIES),
                                          Failover.split_brain))
    t.finish()
    return failover


def _unique(r: _Reader, what: str, items: list[tuple[object, tuple]]) -> None:
    first: dict = {}
    for value, path in items:
        if value is None:
            continue
        if value in first:
            r.error(path, f"{_label(path)}: {what} {_show(value)} is already used by "
                          f"{_label(first[value])}")
        else:
            first[value] = path


def _networks(r: _Reader, nodes: list[Node]) -> None:
    """Network i joins the i-th address of each node: same count, same IP version."""
    if len(nodes) != 2 or not nodes[0].addresses or not nodes[1].addresses:
        return
    a, b = nodes[0].addresses, nodes[1].addresses
    if len(a) != len(b):
        r.error(("node", 1, "addresses"), f"node[2].addresses has {len(b)} address(es) and "
                                          f"node[1].addresses {len(a)}: each network needs "
                                          f"one address on each node")
    for i, (x, y) in enumerate(zip(a, b)):
        if ipaddress.ip_address(x).version != ipaddress.ip_address(y).version:
            r.error(("node", 1, "addresses", i), f"node[2].addresses[{i + 1}] {y} and "
                                                 f"node[1].addresses[{i + 1}] {x} are not "
                                                 f"of the same IP version")


def _folders_apart(r: _Reader, folders: list[Folder]) -> None:
    seen: list[tuple[str, int]] = []
    for i, f in enumerate(folders):
        if not f.path:
            continue
        for path, j in seen:
            if f.path == path or f.path.startswith(path + "/") or path.startswith(f.path + "/"):
                how = "is the same as" if f.path == path else "overlaps"
                r.error(("folder", i, "path"), f"folder[{i + 1}].path {f.path} {how} "
                                               f"folder[{j + 1}].path {path}")
        seen.append((f.path, i))
