"""A whole two-node cluster on this machine, for tests, the demo and the benchmarks.

    with Cluster(scratch) as c:              # namespaces, config, scripts; nothing runs yet
        c.start("alpha"); c.start("beta")    # `fusemirror daemon` in each node's namespace
        c.wait_state("alpha", "PRIM")
        writer = c.client(duration=10)       # demo.client in the client namespace, via the VIP
        c.kill("alpha")                      # kill -9 of every fusemirror process of alpha
        c.wait_state("beta", "ALONE")

Each node is a network namespace of a netns.Lab (alpha 10.213.0.1, beta .2, the client
.100, the VIP .50 by default) and has its own root under `scratch` for its folder
(ROOT/srv/app), its state directory and its logs. The module runs the sample application
(demo.app) on port 8080 with start_prim/stop_prim scripts written here. Everything runs as
the real daemons would, started with `nsenter --net` so that the FUSE mounts stay visible
to everyone.

Clean-up (on leaving the `with`, whatever happened): daemons get SIGTERM (they demote,
stop the application and unmount the agents they started), then every process this
cluster saw (daemons, agents, applications, clients) is killed by its PID if still
there, leftover mounts are detached with `fusermount3 -u -z`, and the Lab deletes its
namespaces. Nothing is ever looked up or killed by name.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time

from .. import control
from ..agent import fuse_mounted
from ..controller import socket_path
from .netns import Lab

log = logging.getLogger(__name__)

TOP = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NODES = ("alpha", "beta")
FOLDER = "/srv/app"
APP_PORT = 8080
VIP_HOST = 50

# Stops the instance named by $PIDFILE, if any (TERM, then KILL after 5 s).
_STOP_APP = """if [ -e "$PIDFILE" ]; then
    pid=$(cat "$PIDFILE")
    if kill -TERM "$pid" 2>/dev/null; then
        i=0
        while [ -e "$PIDFILE" ] && kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do
            sleep 0.05; i=$((i + 1))
        done
        [ -e "$PIDFILE" ] && kill -KILL "$pid" 2>/dev/null
    fi
    rm -f "$PIDFILE"
fi
"""

# An instance still running (started by an earlier start_prim that its stop_prim never
# followed) is stopped first: it would hold the port, and nothing would know it any more.
START_PRIM = """#!/bin/sh
# start_prim of the sample application (written by fusemirror.lab.cluster)
PIDFILE="{scratch}/$FUSEMIRROR_NODE.app.pid"
LOG="{scratch}/$FUSEMIRROR_NODE.app.log"
""" + _STOP_APP + """cd "{top}"
PYTHONPATH="{top}" setsid "{python}" -m demo.app --dir "$FUSEMIRROR_ROOT{folder}" \\
    --port {port} --pidfile "$PIDFILE" </dev/null >>"$LOG" 2>&1 &
pid=$! i=0
while [ ! -e "$PIDFILE" ]; do
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid"; status=$?; tail -n 1 "$LOG"; exit "$status"
    fi
    i=$((i + 1))
    if [ "$i" -gt 200 ]; then echo "app not listening after 20 s"; kill -KILL "$pid"; exit 1; fi
    sleep 0.05
done
{extra_start}
"""

STOP_PRIM = """#!/bin/sh
# stop_prim of the sample application (written by fusemirror.lab.cluster)
PIDFILE="{scratch}/$FUSEMIRROR_NODE.app.pid"
""" + _STOP_APP + """{extra_stop}
"""


class ClusterError(Exception):
    pass


class Cluster:
    def __init__(self, scratch: str, *, networks: int = 1, heartbeat: str = "",
                 checkers: str = "", failover: str = 'defaultprim = "alpha"',
                 extra_start: str = "", extra_stop: str = "", script_timeout: float = 30,
                 replication_timeout: float = 10, prefix: str | None = None,
                 witness: str | None = None):
        self.scratch = scratch
        subnets = tuple(f"10.{213 + i}.0.0/24" for i in range(networks))
        self.lab = Lab(prefix, subnets=subnets)
        self.module = "t" + secrets.token_hex(3)
        self.run_dir = f"/run/fm-{self.module}"          # short: unix socket paths are
        self.daemons: dict[str, subprocess.Popen] = {}   # limited to 108 bytes
        self.pids: set[int] = set()      # every process seen, killed by PID at the end
        self.clients: list[subprocess.Popen] = []
        self._config_args = dict(networks=networks, heartbeat=heartbeat, checkers=checkers,
                                 failover=failover, script_timeout=script_timeout,
                                 replication_timeout=replication_timeout, witness=witness)
        self._scripts = dict(extra_start=extra_start, extra_stop=extra_stop)

    # -- paths and addresses ---------------------------------------------------------------

    def root(self, node: str) -> str:
        return os.path.join(self.scratch, node)

    def folder(self, node: str) -> str:
        return self.root(node) + FOLDER

    def state_dir(self, node: str) -> str:
        return os.path.join(self.scratch, f"state-{node}")

    @property
    def log_dir(self) -> str:
        return os.path.join(self.scratch, "log")

    def daemon_log(self, node: str) -> str:
        return os.path.join(self.log_dir, f"module-{self.module}-{node}.log")

    @property
    def vip(self) -> str:
        return str(self.lab.subnets[0].network_address + VIP_HOST)

    def start_witness(self, length: float = 1.5) -> subprocess.Popen:
        """`fusemirror witness` in the client's namespace (the third machine)."""
        secrets_dir = os.path.join(self.scratch, "witness-secrets")
        os.makedirs(secrets_dir, exist_ok=True)
        shutil.copy(self.secret_file, os.path.join(secrets_dir, f"{self.module}.secret"))
        out = open(os.path.join(self.log_dir, "witness.out"), "ab")
        p = self.lab.popen("client", [sys.executable, "-m", "cli.main", "witness", "--listen",
                                      f"{self.lab.address('client')}:7792", "--secrets",
                                      secrets_dir, "--lease", str(length), "--state",
                                      os.path.join(self.scratch, "witness.state"), "--log-file",
                                      os.path.join(self.log_dir, "witness.log")],
                           cwd=TOP, env=dict(os.environ, PYTHONPATH=TOP),
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        out.close()
        self.witness_proc = p
        self.pids.add(p.pid)
        return p

    def _witness_section(self) -> str:
        w = self._config_args["witness"]
        return self.lease_witness if w == "lease" else (w or self.default_witness)

    @property
    def lease_witness(self) -> str:
        """The [witness] section for a lease witness run by start_witness()."""
        return f'mode = "lease"\naddresses = ["{self.lab.address("client")}"]\nlength = 1.5'

    @property
    def default_witness(self) -> str:
        """The client's address stands for the router both nodes sit behind."""
        return f'mode = "ping"\naddresses = ["{self.lab.address("client")}"]'

    @property
    def url(self) -> str:
        return f"http://{self.vip}:{APP_PORT}"

    # -- building ------------------------------------------------------------------------------

    def __enter__(self) -> Cluster:
        self.lab.__enter__()
        try:
            self._write_files()
        except BaseException:
            self.lab.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _write_files(self) -> None:
        os.makedirs(self.log_dir, exist_ok=True)
        for node in NODES:
            os.makedirs(self.folder(node), exist_ok=True)
        self.secret_file = os.path.join(self.scratch, "secret")
        with open(self.secret_file, "w") as f:
            f.write(secrets.token_hex(16))
        os.chmod(self.secret_file, 0o600)
        scripts = os.path.join(self.scratch, "scripts")
        os.makedirs(scripts, exist_ok=True)
        fill = dict(scratch=self.scratch, top=TOP, python=sys.executable, folder=FOLDER,
                    port=APP_PORT, **self._scripts)
        for name, text in (("start_prim", START_PRIM), ("stop_prim", STOP_PRIM)):
            path = os.path.join(scripts, name)
            with open(path, "w") as f:
                f.write(text.format(**fill))
            os.chmod(path, 0o755)
        self.config_path = os.path.join(self.scratch, "module.toml")
        self.write_config()

    def write_config(self, *, secret_file: str | None = None, extra: str = "") -> str:
        a = self._config_args
        nodes = "".join(
            f'\n[[node]]\nname = "{n}"\naddresses = '
            f'{json.dumps([self.lab.address(n, i) for i in range(a["networks"])])}\n'
            f'root = "{self.root(n)}"\n' for n in NODES)
        scripts = os.path.join(self.scratch, "scripts")
        text = (f'module = "{self.module}"\nsecret_file = "{secret_file or self.secret_file}"\n'
                f'{nodes}\n[[folder]]\npath = "{FOLDER}"\nport = 7788\n\n'
                f'[heartbeat]\n{a["heartbeat"]}\n\n'
                f'[replication]\ntimeout = {a["replication_timeout"]}\n\n'
                f'[vip]\naddress = "{self.vip}/{self.lab.subnets[0].prefixlen}"\n'
                f'interface = "veth0"\n\n'
                f'[scripts]\nstart_prim = "{scripts}/start_prim"\n'
                f'stop_prim = "{scripts}/stop_prim"\n'
                f'start_prim_timeout = {a["script_timeout"]}\n'
                f'stop_prim_timeout = {a["script_timeout"]}\n\n'
                f'[failover]\n{a["failover"]}\n\n{a["checkers"]}\n\n'
                f'[witness]\n{self._witness_section()}\n{extra}\n')
        with open(self.config_path, "w") as f:
            f.write(text)
        return self.config_path

    # -- running the daemons -------------------------------------------------------------------

    def daemon_argv(self, node: str, config: str | None = None) -> list[str]:
        return [sys.executable, "-m", "cli.main", "daemon", "-c", config or self.config_path,
                "-n", node, "--state-dir", self.state_dir(node), "--log-dir", self.log_dir,
                "--run-dir", self.run_dir]

    def start(self, node: str, wait: bool = True, config: str | None = None,
              timeout: float = 60) -> subprocess.Popen:
        """Start the node's daemon; with wait, until its admin socket answers."""
        if node in self.daemons and self.daemons[node].poll() is None:
            raise ClusterError(f"the daemon of {node} already runs")
        err = open(os.path.join(self.log_dir, f"{node}.daemon.stderr"), "ab")
        p = self.lab.popen(node, self.daemon_argv(node, config), cwd=TOP,
                           env=dict(os.environ, PYTHONPATH=TOP), stdin=subprocess.DEVNULL,
                           stdout=err, stderr=err)
        err.close()
        self.daemons[node] = p
        self.pids.add(p.pid)
        if wait:
            deadline = time.monotonic() + timeout
            while True:
                try:
                    self.request(node, {"cmd": "ping"}, timeout=2)
                    break
                except control.ControlError:
                    pass
                if p.poll() is not None:
                    raise ClusterError(f"the daemon of {node} exited with {p.returncode}: "
                                       f"{self.tail(node)}")
                if time.monotonic() > deadline:
                    raise ClusterError(f"the daemon of {node} did not answer in {timeout} s")
                time.sleep(0.05)
            self.remember_pids(node)
        return p

    def request(self, node: str, payload: dict, timeout: float = 30) -> dict:
        return control.request_path(socket_path(self.run_dir, self.module, node), payload,
                                    timeout, what=f"the controller of {node}")

    def state(self, node: str) -> dict:
        return self.request(node, {"cmd": "state"}, timeout=10)

    def agent(self, node: str, payload: dict | None = None, timeout: float = 30) -> dict:
        return control.request(os.path.realpath(self.folder(node)), payload or {"cmd": "status"},
                               timeout=timeout, run_dir=self.run_dir)

    def remember_pids(self, node: str) -> None:
        try:
            self.pids.add(self.agent(node, timeout=5)["pid"])
        except control.ControlError:
            pass
        app = self.app_pid(node)
        if app:
            self.pids.add(app)

    def app_pid(self, node: str) -> int | None:
        try:
            with open(os.path.join(self.scratch, f"{node}.app.pid")) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            return None

    def wait_state(self, node: str, state: str, readiness: str | None = "Ready",
                   timeout: float = 30) -> dict:
        """Until the node is in state (and readiness); its last `me` otherwise raises."""
        deadline = time.monotonic() + timeout
        me = None
        while True:
            try:
                me = self.state(node)["me"]
                if me["state"] == state and (readiness is None or me["readiness"] == readiness):
                    self.remember_pids(node)
                    return me
            except control.ControlError as e:
                me = {"error": str(e)}
            if time.monotonic() > deadline:
                raise ClusterError(f"{node} is not {state} {readiness or ''} after {timeout} s: "
                                   f"{me}\n{self.tail(node)}")
            time.sleep(0.05)

    def command(self, node: str, verb: str, *args, check: bool = True
                ) -> subprocess.CompletedProcess:
        """`fusemirror VERB` run for real in the node's namespace."""
        p = self.lab.run(node, [sys.executable, "-m", "cli.main", verb, *args, "-m", self.module,
                                "-n", node, "--run-dir", self.run_dir], check=False, cwd=TOP,
                         env=dict(os.environ, PYTHONPATH=TOP), timeout=120)
        if check and p.returncode != 0:
            raise ClusterError(f"fusemirror {verb} on {node}: {p.returncode}: "
                               f"{p.stdout.strip()} {p.stderr.strip()}")
        return p

    def tail(self, node: str, lines: int = 25) -> str:
        try:
            with open(self.daemon_log(node), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"

    def has_vip(self, node: str) -> bool:
        out = self.lab.run(node, ["ip", "-j", "addr", "show", "dev", "veth0"]).stdout
        return any(a.get("local") == self.vip for link in json.loads(out)
                   for a in link.get("addr_info", ()))

    # -- faults -----------------------------------------------------------------------------------

    def fusemirror_pids(self, node: str) -> list[int]:
        """The node's daemon and its agent, as far as they answer."""
        pids = []
        d = self.daemons.get(node)
        if d is not None and d.poll() is None:
            pids.append(d.pid)
        try:
            pids.append(self.agent(node, timeout=5)["pid"])
        except control.ControlError:
            pass
        self.pids.update(pids)
        return pids

    def kill(self, node: str, sig: int = signal.SIGKILL) -> list[int]:
        """kill -9 (or sig) of every fusemirror process of the node, by PID."""
        pids = self.fusemirror_pids(node)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        d = self.daemons.get(node)
        if d is not None and sig in (signal.SIGKILL, signal.SIGTERM):
            try:
                d.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        return pids

    def stop(self, node: str, timeout: float = 60) -> int:
        """Graceful stop of the daemon (SIGTERM), as systemd does; its exit status."""
        d = self.daemons[node]
        d.send_signal(signal.SIGTERM)
        return d.wait(timeout=timeout)

    # -- the client ---------------------------------------------------------------------------------

    def client(self, name: str = "client", duration: float = 30, count: int = 100000,
               interval: float = 0.02, timeout: float = 1.0) -> tuple[subprocess.Popen, str]:
        """demo.client in the client namespace, writing records through the VIP."""
        log = os.path.join(self.scratch, f"{name}.jsonl")
        out = open(os.path.join(self.log_dir, f"{name}.out"), "ab")
        p = self.lab.popen("client", [sys.executable, "-m", "demo.client", "--url", self.url,
                                      "--log", log, "--duration", str(duration), "--count",
                                      str(count), "--interval", str(interval), "--name", name,
                                      "--timeout", str(timeout)],
                           cwd=TOP, env=dict(os.environ, PYTHONPATH=TOP),
                           stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        out.close()
        self.clients.append(p)
        self.pids.add(p.pid)
        return p, log

    def records(self) -> set[int]:
        """The ids of every record the application through the VIP holds now."""
        ids, after = set(), 0
        while True:
            for attempt in range(5):           # the VIP may be moving: a few tries
                p = self.lab.run("client", [sys.executable, "-c", _FETCH, self.url,
                                            str(after)], timeout=30, check=attempt == 4)
                if p.returncode == 0:
                    break
                time.sleep(0.5)
            batch = json.loads(p.stdout)
            if not batch:
                return ids
            ids.update(r["id"] for r in batch)
            after = max(r["id"] for r in batch)

    # -- clean-up -------------------------------------------------------------------------------------

    def close(self) -> None:
        try:
            for node in NODES:
                self.remember_pids(node)
            for node, d in self.daemons.items():
                if d.poll() is None:
                    d.send_signal(signal.SIGTERM)
            for d in self.daemons.values():
                try:
                    d.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for node in NODES:
                folder = os.path.realpath(self.folder(node))
                if fuse_mounted(folder):
                    subprocess.run(["fusermount3", "-u", "-z", folder], capture_output=True,
                                   timeout=30)
        finally:
            self.lab.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)


_FETCH = """
import json, sys, urllib.request
url, after = sys.argv[1], sys.argv[2]
with urllib.request.urlopen(f"{url}/records?after={after}&limit=5000", timeout=10) as r:
    print(json.dumps([{"id": x["id"]} for x in json.load(r)]))
"""


def remove_scratch(path: str) -> None:
    """rmtree, unless something below `path` is still mounted (it would delete through it)."""
    with open("/proc/self/mountinfo") as f:
        mounted = [line.split()[4] for line in f if line.split()[4].startswith(path + "/")]
    if mounted:
        log.error("not removing %s: still mounted: %s", path, ", ".join(mounted))
        return
    shutil.rmtree(path, ignore_errors=True)
