"""Unit tests of the module configuration (fusemirror.config).

Pure and fast: configurations are strings, written to a temporary file only where
the file itself matters (load, check). An error case marks each line where an error
is expected with `#<`, so the expected line numbers are read from the text itself.
"""

import dataclasses
import os
import re

import pytest

from fusemirror import config
from fusemirror import errors as X
from fusemirror.config import ConfigError, UnknownNode

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

MINIMAL = """\
module = "app"
secret_file = "/etc/fusemirror/app.secret"

[[node]]
name = "alpha"
addresses = ["10.0.0.1"]

[[node]]
name = "beta"
addresses = ["10.0.0.2"]

[[folder]]
path = "/srv/app"
port = 7788

[scripts]
start_prim = "/etc/fusemirror/app/start_prim"
stop_prim = "/etc/fusemirror/app/stop_prim"

[witness]
mode = "ping"
addresses = ["10.0.0.254"]
"""

FULL = """\
module = "shop.db"
secret_file = "/etc/fusemirror/shop.secret"

[[node]]
name = "alpha"
addresses = ["10.0.0.1", "fd00::1"]
root = "/scratch/alpha/"

[[node]]
name = "beta"
addresses = ["10.0.0.2", "fd00:0::2"]
root = "/scratch/beta"

[[folder]]
path = "/srv/shop/"
port = 7001

[[folder]]
path = "/var/lib/shop"
port = 7002

[heartbeat]
port = 7003
interval = 1
timeout = 2.5

[replication]
timeout = 3
on_peer_loss = "block"
compress = false

[vip]
address = "10.0.0.100/24"
interface = "br0"
arp_count = 5

[scripts]
start_prim = "/opt/shop/start"
stop_prim = "/opt/shop/stop"
start_both = "/opt/shop/both-start"
stop_both = "/opt/shop/both-stop"
start_prim_timeout = 100
stop_prim_timeout = 20
stop_both_timeout = 7.5

[[checker]]
kind = "process"
pidfile = "/run/shop.pid"

[[checker]]
name = "pg"
kind = "tcp"
port = 5432
interval = 1
timeout = 0.5
action = "stopstart"

[[checker]]
name = "web"
kind = "http"
url = "https://127.0.0.1:8443/health"
expect = 204
action = "wait"

[[checker]]
name = "disk"
kind = "command"
argv = ["/usr/local/bin/check-disk", "-q"]

[[checker]]
name = "daemon"
kind = "process"
pattern = "^/usr/bin/shopd\\\\b"

[restart]
limit = 0
window = 3600

[failover]
automatic = false
defaultprim = "lastprim"

[http]
port = 7004
address = "127.0.0.1"

[witness]
mode = "ping"
addresses = ["10.0.0.254", "fd00::fe"]
interval = 0.5
timeout = 2
"""


def errors_of(text: str) -> list[tuple[int, str]]:
    with pytest.raises(ConfigError) as e:
        config.loads(text, "t.toml")
    return e.value.errors


def at_top(lines: str, base: str = MINIMAL) -> str:
    """base with lines added among its top-level keys, after line 2."""
    return edit("app.secret\"\n", f"app.secret\"\n{lines}\n", base)


def marked_lines(text: str) -> list[int]:
    return [n for n, line in enumerate(text.splitlines(), 1) if "#<" in line]


def edit(old: str, new: str, base: str = MINIMAL) -> str:
    assert old in base
    return base.replace(old, new, 1)


# --- valid files ---------------------------------------------------------------------

def test_minimal_file_has_every_default():
    c = config.loads(MINIMAL, "app.toml")
    assert c.source == "app.toml" and c.module == "app"
    assert c.secret_file == "/etc/fusemirror/app.secret"
    assert c.nodes == (config.Node("alpha", ("10.0.0.1",), ""),
                       config.Node("beta", ("10.0.0.2",), ""))
    assert c.folders == (config.Folder("/srv/app", 7788),)
    assert c.heartbeat == config.Heartbeat(port=7790, interval=0.2, timeout=1.0)
    assert c.replication == config.Replication(timeout=10.0, on_peer_loss="alone", compress=True)
    assert c.vip is None
    assert c.scripts == config.Scripts(
        config.Script("/etc/fusemirror/app/start_prim", 60.0),
        config.Script("/etc/fusemirror/app/stop_prim", 60.0), None, None)
    assert c.checkers == ()
    assert c.restart == config.RestartGuard(limit=3, window=86400.0)
    assert c.failover == config.Failover(automatic=True, defaultprim="alone")
    assert c.http == config.Http(port=7791)
    assert c.nodes[0].replication_address == "10.0.0.1"
    assert c.nodes[1].path("/srv/app") == "/srv/app"


def test_full_file_reads_every_key():
    c = config.loads(FULL)
    alpha, beta = c.nodes
    assert c.module == "shop.db"
    assert alpha == config.Node("alpha", ("10.0.0.1", "fd00::1"), "/scratch/alpha")
    assert beta.addresses == ("10.0.0.2", "fd00::2")         # normalised
    assert alpha.path("/srv/shop") == "/scratch/alpha/srv/shop"
    assert beta.path(c.folders[0].path) == "/scratch/beta/srv/shop"
    assert c.folders == (config.Folder("/srv/shop", 7001), config.Folder("/var/lib/shop", 7002))
    assert c.heartbeat == config.Heartbeat(port=7003, interval=1.0, timeout=2.5)
    assert c.replication == config.Replication(timeout=3.0, on_peer_loss="block", compress=False)
    assert c.vip == config.Vip("10.0.0.100", 24, "br0", 5)
    assert c.vip.cidr == "10.0.0.100/24"
    s = c.scripts
    assert s.start_prim == config.Script("/opt/shop/start", 100.0)
    assert s.stop_prim == config.Script("/opt/shop/stop", 20.0)
    assert s.start_both == config.Script("/opt/shop/both-start", 60.0)
    assert s.stop_both == config.Script("/opt/shop/both-stop", 7.5)
    assert c.checkers == (
        config.ProcessChecker(name="process-1", pidfile="/run/shop.pid"),
        config.TcpChecker(name="pg", port=5432, interval=1.0, timeout=0.5, action="stopstart"),
        config.HttpChecker(name="web", url="https://127.0.0.1:8443/health", expect=204,
                           action="wait"),
        config.CommandChecker(name="disk", argv=("/usr/local/bin/check-disk", "-q")),
        config.ProcessChecker(name="daemon", pattern=r"^/usr/bin/shopd\b"),
    )
    first = c.checkers[0]
    assert (first.kind, first.interval, first.timeout, first.action) == ("process", 5.0, 5.0,
                                                                         "restart")
    assert c.checkers[1].host == "127.0.0.1"
    assert c.restart == config.RestartGuard(limit=0, window=3600.0)
    assert c.failover == config.Failover(automatic=False, defaultprim="lastprim")
    assert c.http.port == 7004 and c.http.address == "127.0.0.1"
    assert c.witness == config.Witness("ping", ("10.0.0.254", "fd00::fe"), 0.5, 2.0)


def test_configuration_is_frozen():
    c = config.loads(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.heartbeat.timeout = 5.0


@pytest.mark.parametrize("name", ["app.toml", "two-nodes-one-machine.toml"])
def test_examples_load(name):
    c = config.load(os.path.join(TOP, "packaging", "examples", name))
    assert len(c.nodes) == 2 and c.folders


def test_two_nodes_one_machine_example_uses_roots():
    c = config.load(os.path.join(TOP, "packaging", "examples", "two-nodes-one-machine.toml"))
    paths = {n.path(f.path) for n in c.nodes for f in c.folders}
    assert len(paths) == 2 * len(c.folders)


def test_dotted_keys_and_inline_tables_are_read():
    text = at_top('heartbeat.interval = 0.1\nvip = { address = "10.0.0.9/8" }')
    c = config.loads(text)
    assert c.heartbeat.interval == 0.1 and c.vip.cidr == "10.0.0.9/8"


def test_documented_minimal_file_loads():
    with open(os.path.join(TOP, "docs", "configuration.md")) as f:
        doc = f.read()
    text = re.search(r"## A minimal file\n\n```toml\n(.*?)```", doc, re.S)[1]
    assert config.loads(text) == config.loads(MINIMAL)


def test_default_path():
    assert config.default_path("app") == "/etc/fusemirror/app.toml"


# --- errors, each at its line --------------------------------------------------------

CASES = {
    "syntax": (edit("port = 7788", "port = #<"), "TOML syntax: Invalid value (column 8)"),
    "type": (edit("port = 7788", 'port = "7788" #<'),
             'folder[1].port must be a whole number, not "7788"'),
    "float for int": (edit("port = 7788", "port = 7788.0 #<"), "must be a whole number"),
    "bool for number": (edit("[scripts]", "[heartbeat]\ninterval = true #<\n[scripts]"),
                        "heartbeat.interval must be a number of seconds, not true"),
    "range": (edit("port = 7788", "port = 70000 #<"), "between 1 and 65535, not 70000"),
    "zero interval": (edit("[scripts]", "[heartbeat]\ninterval = 0 #<\n[scripts]"),
                      "heartbeat.interval must be greater than 0"),
    "heartbeat timeout": (edit("[scripts]", "[heartbeat]\ninterval = 0.5\ntimeout = 1 #<\n"
                                            "[scripts]"),
                          "heartbeat.timeout (1 s) must exceed twice heartbeat.interval (0.5 s)"),
    "heartbeat interval vs default timeout": (
        edit("[scripts]", "[heartbeat]\ninterval = 0.6 #<\n[scripts]"), "must exceed twice"),
    "addresses not a list": (edit('addresses = ["10.0.0.2"]', 'addresses = "10.0.0.2" #<'),
                             "node[2].addresses must be a non-empty array of IP addresses"),
    "bad address in multi-line array": (
        edit('addresses = ["10.0.0.2"]', 'addresses = [ #<\n  "10.0.0.2",\n  "10.0.0.300",\n]'),
        'node[2].addresses item 2 must be an IP address, not "10.0.0.300"'),
    "relative script": (edit('start_prim = "/etc/fusemirror/app/start_prim"',
                             'start_prim = "start_prim" #<'),
                        "scripts.start_prim must be an absolute path"),
    "relative root": (edit('name = "beta"', 'name = "beta"\nroot = "beta" #<'),
                      "node[2].root must be an absolute path"),
    "bad module name": (edit('module = "app"', 'module = "my app" #<'), "module must be a name"),
    "missing top-level key": (edit('module = "app"', '#< no module'), "module is missing"),
    "missing key in second node": (edit('[[node]]\nname = "beta"\n', '[[node]] #<\n'),
                                   "node[2].name is missing"),
    "missing table": (edit('[scripts]\nstart_prim = "/etc/fusemirror/app/start_prim"\n'
                           'stop_prim = "/etc/fusemirror/app/stop_prim"\n', "",
                           edit('"app"', '"app" #< the top level starts at line 1')),
                      "[scripts] is missing"),
    "unknown key meant for a missing one": (
        edit('addresses = ["10.0.0.2"]', 'adresses = ["10.0.0.2"] #<'),
        "unknown key node[2].adresses (did you mean 'addresses'?)"),
    "misspelt required table": (edit("[scripts]", "[script] #<"),
                                "unknown key script (did you mean 'scripts'?)"),
    "misspelt optional table": (MINIMAL + '[vpi] #<\naddress = "10.0.0.100/24"\n',
                                "unknown key vpi (did you mean 'vip'?)"),
    "unknown table": (edit("[scripts]", "[heartbeats] #<\ninterval = 1\n[scripts]"),
                      "unknown key heartbeats (did you mean 'heartbeat'?)"),
    "unknown dotted key": (at_top("heartbeat.intervall = 1 #<"),
                           "unknown key heartbeat.intervall (did you mean 'interval'?)"),
    "unknown key without suggestion": (at_top("colour = 1 #<"),
                                       "unknown key colour"),
    "table expected": (at_top("vip = 5 #<"), "vip must be a table"),
    "array of tables expected": (edit("[[folder]]", "[folder] #<"),
                                 "write [[folder]], not [folder]"),
    "one node": (edit('[[node]]\nname = "beta"\naddresses = ["10.0.0.2"]\n', "",
                      edit('[[node]]\nname = "alpha"', '[[node]] #<\nname = "alpha"')),
                 "there must be exactly two [[node]] entries, not 1"),
    "three nodes": (edit("[[folder]]", '[[node]] #<\nname = "gamma"\naddresses = ["10.0.0.3"]'
                                       '\n\n[[folder]]'), "exactly two [[node]] entries, not 3"),
    "no folder": (edit('[[folder]]\npath = "/srv/app"\nport = 7788\n', "",
                       edit('"app"', '"app" #<')),
                  "at least one [[folder]]"),
    "duplicate node name": (edit('name = "beta"', 'name = "alpha" #<'),
                            'node[2].name: name "alpha" is already used by node[1].name'),
    "reserved node name": (edit('name = "beta"', 'name = "lastprim" #<'), "cannot be 'lastprim'"),
    "ambiguous address": (edit('["10.0.0.2"]', '["10.0.0.02"] #<'), "must be an IP address"),
    "duplicate address across nodes": (
        edit('["10.0.0.2"]', '["10.0.0.1"] #<'),
        'node[2].addresses[1]: address "10.0.0.1" is already used by node[1].addresses[1]'),
    "networks differ in number": (edit('["10.0.0.2"]', '["10.0.0.2", "10.1.0.2"] #<'),
                                  "each network needs one address on each node"),
    "networks differ in version": (edit('["10.0.0.2"]', '["fd00::2"] #<'),
                                   "are not of the same IP version"),
    "duplicate port": (edit("[scripts]", "[heartbeat]\nport = 7788 #<\n[scripts]"),
                       "heartbeat.port: port 7788 is already used by folder[1].port"),
    "same folder twice": (MINIMAL + '[[folder]]\npath = "/srv/app/" #<\nport = 7789\n',
                          "folder[2].path /srv/app is the same as folder[1].path /srv/app"),
    "nested folders": (MINIMAL + '[[folder]]\npath = "/srv/app/data" #<\nport = 7789\n',
                       "overlaps folder[1].path /srv/app"),
    "root folder": (edit('path = "/srv/app"', 'path = "/" #<'), "folder[1].path cannot be /"),
    "vip without prefix": (MINIMAL + '[vip]\naddress = "10.0.0.100" #<\n',
                           'vip.address must be ADDRESS/PREFIX'),
    "vip is a node address": (MINIMAL + '[vip]\naddress = "10.0.0.2/24" #<\n',
                              "vip.address: address \"10.0.0.2\" is already used by "
                              "node[2].addresses[1]"),
    "vip without address": (MINIMAL + '[vip] #<\ninterface = "eth0"\n', "vip.address is missing"),
    "bad interface": (MINIMAL + '[vip]\naddress = "10.0.0.100/24"\ninterface = "eth 0" #<\n',
                      "vip.interface must be a network interface name"),
    "defaultprim": (MINIMAL + '[failover]\ndefaultprim = "bta" #<\n',
                    "failover.defaultprim must be \"alone\", \"lastprim\" or a node name, "
                    "not \"bta\" (did you mean 'beta'?)"),
    "split_brain": (MINIMAL + '[failover]\nsplit_brain = "newest" #<\n',
                    "failover.split_brain must be one of manual, last_primary, most_changes"),
    "resync_rate": (MINIMAL + '[replication]\nresync_rate = -1 #<\n',
                    "replication.resync_rate must be"),
    "automatic": (MINIMAL + '[failover]\nautomatic = "yes" #<\n',
                  'failover.automatic must be true or false, not "yes"'),
    "on_peer_loss": (MINIMAL + '[replication]\non_peer_loss = "panic" #<\n',
                     "replication.on_peer_loss must be one of alone, block"),
    "timeout without script": (edit("[scripts]", "[scripts]\nstop_both_timeout = 5 #<"),
                               "scripts.stop_both_timeout without scripts.stop_both"),
    "checker action in second checker": (
        MINIMAL + '[[checker]]\nkind = "tcp"\nport = 80\naction = "restart"\n\n'
                  '[[checker]]\nkind = "tcp"\nport = 81\naction = "reboot" #<\n',
        'checker[2].action must be one of restart, stopstart, wait, not "reboot"'),
    "checker kind": (MINIMAL + '[[checker]]\nkind = "ping" #<\nhost = "x"\n',
                     "checker[1].kind must be one of process, tcp, http, command"),
    "checker without kind": (MINIMAL + '[[checker]] #<\nport = 80\n',
                             "checker[1].kind is missing"),
    "checker key of another kind": (MINIMAL + '[[checker]]\nkind = "tcp"\nport = 80\n'
                                              'url = "http://x/" #<\n',
                                    "checker[1].url does not apply to a tcp checker"),
    "process checker needs one way": (MINIMAL + '[[checker]] #<\nkind = "process"\n',
                                      "a process checker needs either pidfile or pattern"),
    "process checker with both": (MINIMAL + '[[checker]] #<\nkind = "process"\n'
                                            'pidfile = "/run/a.pid"\npattern = "a"\n',
                                  "either pidfile or pattern"),
    "bad pattern": (MINIMAL + '[[checker]]\nkind = "process"\npattern = "(" #<\n',
                    "checker[1].pattern is not a valid regular expression"),
    "bad url": (MINIMAL + '[[checker]]\nkind = "http"\nurl = "ftp://x/" #<\n',
                "checker[1].url must be an http:// or https:// URL"),
    "bad status": (MINIMAL + '[[checker]]\nkind = "http"\nurl = "http://x/"\nexpect = 42 #<\n',
                   "checker[1].expect must be between 100 and 599"),
    "relative command": (MINIMAL + '[[checker]]\nkind = "command"\nargv = ["check"] #<\n',
                         "checker[1].argv: the program must be an absolute path"),
    "duplicate checker name": (MINIMAL + '[[checker]]\nkind = "tcp"\nport = 1\n[[checker]]\n'
                                         'name = "tcp-1" #<\nkind = "tcp"\nport = 2\n',
                               'checker[2].name: name "tcp-1" is already used'),
    "restart limit": (MINIMAL + '[restart]\nlimit = -1 #<\n', "restart.limit must be between"),
    "key in a multi-line string is not a key": (
        edit("port = 7788", 'port = 7788\nnote = """ #<\nport = "x"\n"""'),
        "unknown key folder[1].note"),
}


@pytest.mark.parametrize("text, message", CASES.values(), ids=CASES.keys())
def test_error_is_reported_at_its_line(text, message):
    errors = errors_of(text)
    assert any(message in m for _, m in errors), errors
    assert [line for line, _ in errors] == marked_lines(text), errors


def test_several_errors_are_all_reported_in_file_order():
    text = """\
module = "app"
secret_file = "relative" #<

[[node]]
name = "alpha"
addresses = ["10.0.0.1"]
colour = "red" #<

[[node]]
name = "alpha" #<
addresses = ["10.0.0.2"]

[[folder]]
path = "/srv/app"
port = 0 #<

[heartbeat]
interval = 1
timeout = 1 #<

[scripts]
start_prim = "/a"
stop_prim = "/b"

[[checker]]
kind = "tcp"
port = 80

[[checker]]
kind = "tcp"
port = 81
action = "explode" #<

[failover]
defaultprim = "gamma" #<

[witness]
mode = "none" #<
"""
    errors = errors_of(text)
    assert [line for line, _ in errors] == marked_lines(text)
    assert [m.split()[0] for _, m in errors] == [
        "secret_file", "unknown", "node[2].name:", "folder[1].port", "heartbeat.timeout",
        "checker[2].action", "failover.defaultprim", "witness.mode"]


def test_error_text_is_one_line_per_error():
    text = edit('name = "beta"', 'name = "alpha"', edit("port = 7788", "port = -1"))
    with pytest.raises(ConfigError) as e:
        config.loads(text, "/etc/fusemirror/app.toml")
    lines = str(e.value).splitlines()
    assert lines == [
        "/etc/fusemirror/app.toml:9: node[2].name: name \"alpha\" is already used by "
        "node[1].name",
        "/etc/fusemirror/app.toml:14: folder[1].port must be between 1 and 65535, not -1",
    ]
    assert e.value.lines == lines
    assert e.value.code == X.BAD_CONFIG and isinstance(e.value, X.Failure)


def test_unreadable_file(tmp_path):
    path = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.errors == [(0, "cannot read the configuration: No such file or directory")]
    assert str(e.value) == f"{path}: cannot read the configuration: No such file or directory"
    assert config.check(path) == [str(e.value)]


def test_not_utf8(tmp_path):
    path = tmp_path / "app.toml"
    path.write_bytes(MINIMAL.encode() + b'\n# caf\xe9\n')
    with pytest.raises(ConfigError) as e:
        config.load(str(path))
    assert e.value.errors == [(MINIMAL.count("\n") + 2, "not UTF-8 text")]


# --- check(): the files the configuration names ---------------------------------------

@pytest.fixture
def installed(tmp_path):
    """A valid two-nodes-one-machine setup: folders, scripts and secret all present."""
    for node in ("alpha", "beta"):
        os.makedirs(tmp_path / node / "srv" / "app")
    for name in ("start_prim", "stop_prim", "check"):
        script = tmp_path / name
        script.write_text("#!/bin/sh\nexit 0\n")
        script.chmod(0o755)
    (tmp_path / "app.secret").write_text("0123456789abcdef\n")
    text = f"""\
module = "app"
secret_file = "{tmp_path}/app.secret"

[[node]]
name = "alpha"
addresses = ["10.99.0.1"]
root = "{tmp_path}/alpha"

[[node]]
name = "beta"
addresses = ["10.99.0.2"]
root = "{tmp_path}/beta"

[[folder]]
path = "/srv/app"
port = 7788

[scripts]
start_prim = "{tmp_path}/start_prim"
stop_prim = "{tmp_path}/stop_prim"

[[checker]]
kind = "command"
argv = ["{tmp_path}/check"]

[witness]
mode = "ping"
addresses = ["10.99.0.254"]
"""
    path = tmp_path / "app.toml"
    path.write_text(text)
    return tmp_path, str(path), text


def line_of(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if fragment in line)


def test_check_accepts_a_complete_installation(installed):
    _, path, _ = installed
    assert config.check(path) == []


def test_check_reports_a_missing_script(installed):
    top, path, text = installed
    os.unlink(top / "stop_prim")
    assert config.check(path) == [f"{path}:{line_of(text, 'stop_prim =')}: scripts.stop_prim: "
                                  f"{top}/stop_prim does not exist"]
    config.load(path)                      # load() does not look at the files


def test_check_reports_every_file_problem(installed):
    top, path, text = installed
    (top / "start_prim").chmod(0o644)
    os.unlink(top / "check")
    (top / "app.secret").write_text("short\n")
    os.rmdir(top / "beta" / "srv" / "app")
    assert config.check(path) == [
        f"{path}:2: secret_file: secret file {top}/app.secret holds fewer than 8 bytes",
        f"{path}:{line_of(text, 'path =')}: folder[1].path: {top}/beta/srv/app does not exist",
        f"{path}:{line_of(text, 'start_prim =')}: scripts.start_prim: {top}/start_prim is not "
        f"executable",
        f"{path}:{line_of(text, 'argv =')}: checker[1].argv: {top}/check does not exist",
    ]


def test_check_reports_file_problems_with_other_errors(installed):
    top, path, text = installed
    os.unlink(top / "start_prim")
    with open(path, "a") as f:
        f.write("[heartbeat]\nport = 7788\n")
    problems = config.check(path)
    assert len(problems) == 2
    assert re.search(r":\d+: scripts.start_prim: .* does not exist$", problems[0])
    assert problems[1].endswith("heartbeat.port: port 7788 is already used by folder[1].port")


# --- nodes ----------------------------------------------------------------------------

def test_node_and_peer_lookup():
    c = config.loads(MINIMAL)
    alpha, beta = c.nodes
    assert c.node("alpha") is alpha and c.node("beta") is beta
    assert c.peer_of("alpha") is beta and c.peer_of("beta") is alpha


@pytest.mark.parametrize("lookup", ["node", "peer_of"])
def test_unknown_node_is_a_clear_config_error(lookup):
    c = config.loads(MINIMAL, "/etc/fusemirror/app.toml")
    with pytest.raises(UnknownNode) as e:
        getattr(c, lookup)("gamma")
    assert isinstance(e.value, ConfigError) and e.value.code == X.BAD_CONFIG
    assert str(e.value) == ("/etc/fusemirror/app.toml: node 'gamma' is not in this "
                            "configuration (its nodes are 'alpha' and 'beta')")


def test_config_check_command_reports_lines_and_exit_code(tmp_path):
    """`fusemirror config check -c FILE`: every error on its own line, exit code 9."""
    import subprocess
    import sys
    bad = tmp_path / "bad.toml"
    bad.write_text('module = "app"\nsecret_file = "relative"\nbogus = 1\n')
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-m", "cli.main", "config", "check", "-c", str(bad)],
                       cwd=top, capture_output=True, text=True, timeout=60)
    assert p.returncode == 9, p.stderr
    lines = p.stderr.strip().splitlines()
    assert any(line.startswith(f"{bad}:2:") for line in lines), lines
    assert any(line.startswith(f"{bad}:3:") and "bogus" in line for line in lines), lines
