"""The cluster commands: `fusemirror daemon` and the admin verbs that talk to the local
controller through its root-only socket (docs/admin-cluster.md).

Every verb takes `-m MODULE` and `-n NODE`; both may be left out when only one
controller runs on this machine. Exit codes are those of fusemirror.errors, and
`state` exits with the state's code (STOP 0, WAIT 1, ALONE 2, PRIM 3, SECOND 4).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time

import click

from fusemirror import control
from fusemirror import errors as X
from fusemirror.states import State

LOG_DIR = "/var/log/fusemirror"
STATE_DIR = "/var/lib/fusemirror"
WAIT_POLL = 0.2


def _fail(code: int, message: str):
    click.echo(f"fusemirror: {message}", err=True)
    sys.exit(code)


def _target(module: str | None, node: str | None, run_dir: str) -> tuple[str, str]:
    from fusemirror.controller import running_controllers
    found = [(m, n) for m, n in running_controllers(run_dir)
             if (module is None or m == module) and (node is None or n == node)]
    if len(found) == 1:
        return found[0]
    if not found:
        what = " ".join(x for x in (module and f"module {module}", node and f"node {node}") if x)
        _fail(X.NO_AGENT, f"no fusemirror controller runs here{' for ' + what if what else ''}"
                          f" (start one with fusemirror daemon)")
    listed = ", ".join(f"{m} on {n}" for m, n in found)
    _fail(X.USAGE, f"several controllers run here ({listed}): name one with -m and -n")


def ask(params: dict, payload: dict, timeout: float = 60.0) -> dict:
    from fusemirror.controller import socket_path
    module, node = _target(params["module"], params["node"], params["run_dir"])
    try:
        return control.request_path(socket_path(params["run_dir"], module, node), payload,
                                    timeout, what=f"the controller of {module} on {node}")
    except PermissionError:
        _fail(X.NO_AGENT, "the controller's socket is for root only")
    except control.ControlError as e:
        _fail(e.code, str(e))


def which(f):
    f = click.option("-m", "--module", help="the module (if several run here)")(f)
    f = click.option("-n", "--node", help="this node's name (if several run here)")(f)
    f = click.option("--run-dir", default=control.RUN_DIR, hidden=True)(f)
    return f


def _status_line(s: dict) -> str:
    if not s.get("state"):
        return f"{s['name']:<12} unknown (never heard)"
    flags = []
    if not s.get("uptodate", True):
        flags.append("out of date")
    if s.get("diverged"):
        flags.append("has changes its peer lacks")
    if not s.get("failover", True):
        flags.append("failover off")
    tail = f" [{', '.join(flags)}]" if flags else ""
    return (f"{s['name']:<12} {s['state']:<7} {s['readiness']:<10} epoch {s['epoch']:<4} "
            f"{s.get('reason', '')}{tail}")


def _divergence_line(d: dict) -> str:
    """What this node changed while its peer was behind: the files that may differ."""
    if d.get("error"):
        return f"  {d['mountpoint']}: changed while apart: unknown ({d['error']})"
    if d.get("everything"):
        return (f"  {d['mountpoint']}: changed while apart: everything may differ (a directory "
                f"was moved or a link made)")
    shown = ", ".join(d["paths"])
    more = d["count"] - len(d["paths"])
    return (f"  {d['mountpoint']}: changed while apart: {d['count']} item(s): {shown}"
            + (f" and {more} more" if more > 0 else ""))


def _resync_line(rs: dict) -> str:
    mib = 1 << 20
    line = (f"resync ({'full' if rs.get('full') else 'from the journal'}): {rs['state']}, "
            f"{rs['items_done']}/{rs['items_total']} items, "
            f"{rs['bytes_done'] / mib:.1f}/{rs['bytes_total'] / mib:.1f} MiB compared, "
            f"{rs['bytes_sent'] / mib:.1f} MiB sent")
    if rs.get("running"):
        line += (f", {rs['remaining_bytes'] / mib:.1f} MiB to go at "
                 f"{rs['rate_bps'] / mib:.1f} MiB/s, ETA {rs['eta_s'] or 0:.0f} s")
    if rs.get("errors"):
        line += f" (last error: {rs['errors'][-1]})"
    return line


def register(cli: click.Group) -> None:
    """Add the cluster commands to the `fusemirror` group."""

    @cli.command()
    @click.option("-c", "--config", "config_path", type=click.Path(dir_okay=False),
                  help="the module's TOML file (default /etc/fusemirror/MODULE.toml)")
    @click.option("-m", "--module", help="the module, to find its default configuration")
    @click.option("-n", "--node", help="this node's name (default: the host name)")
    @click.option("--state-dir", default=STATE_DIR, show_default=True)
    @click.option("--log-dir", default=LOG_DIR, show_default=True)
    @click.option("--run-dir", default=control.RUN_DIR, hidden=True)
    @click.option("-v", "--verbose", is_flag=True)
    def daemon(config_path, module, node, state_dir, log_dir, run_dir, verbose):
        """Run the controller of one module on this node, in the foreground."""
        from cli.main import setup_logging
        from fusemirror import config as C
        from fusemirror.controller import run_daemon
        if config_path is None:
            if module is None:
                _fail(X.USAGE, "give the configuration (-c FILE) or the module (-m MODULE)")
            config_path = C.default_path(module)
        node = node or socket.gethostname()
        try:
            cfg = C.load(config_path)
            cfg.node(node)
        except X.Failure as e:
            _fail(e.code, str(e).splitlines()[0] if str(e) else "bad configuration")
        setup_logging(os.path.join(log_dir, f"module-{cfg.module}-{node}.log"), True, verbose)
        try:
            run_daemon(config_path, node, state_dir=state_dir, run_dir=run_dir,
                       log_dir=log_dir)
        except X.Failure as e:
            logging.getLogger("fusemirror").error("%s", e)
            _fail(e.code, str(e))
        except KeyboardInterrupt:
            pass

    @cli.command()
    @click.option("--listen", "listen", required=True, multiple=True, metavar="HOST:PORT",
                  help="where to answer (repeat for several addresses)")
    @click.option("--secrets", required=True, type=click.Path(file_okay=False),
                  help="a folder holding MODULE.secret for every module served")
    @click.option("--lease", "length", type=float, default=1.5, show_default=True,
                  help="seconds a lease lasts (witness.length in the modules' files)")
    @click.option("--state", "state_file", default=os.path.join(STATE_DIR, "witness.state"),
                  show_default=True, help="where the modules' epochs are kept across restarts")
    @click.option("--log-file", default=os.path.join(LOG_DIR, "witness.log"), show_default=True)
    @click.option("-v", "--verbose", is_flag=True)
    def witness(listen, secrets, length, state_file, log_file, verbose):
        """Run the lease witness for any number of modules, in the foreground."""
        import trio

        from cli.main import setup_logging
        from fusemirror import lease
        from fusemirror.agent import parse_address
        try:
            addresses = [parse_address(a, "--listen") for a in listen]
            table = lease.load_secrets(secrets)
            os.makedirs(os.path.dirname(os.path.abspath(state_file)), exist_ok=True)
            lease.load_epochs(state_file)          # a damaged file: one line, exit 2
        except X.Failure as e:
            _fail(e.code, str(e))
        except OSError as e:
            _fail(X.BAD_CONFIG, f"cannot use the witness state {state_file}: {e.strerror}")
        setup_logging(log_file, True, verbose)

        async def main():
            # One table of leases for every address: a node is never granted on one
            # address what the other holds on another.
            server = lease.LeaseServer(table, length, state_file=state_file,
                                       grace_until=trio.current_time() + length)
            async with trio.open_nursery() as nursery:
                for host, port in addresses:
                    await nursery.start(lambda task_status, h=host, p=port: lease.serve(
                        h, p, table, length=length, server=server, task_status=task_status))
                logging.getLogger("fusemirror").info(
                    "witness for %s on %s, leases of %g s", ", ".join(sorted(table)),
                    ", ".join(listen), length)

        try:
            trio.run(main)
        except BaseExceptionGroup as group:
            from fusemirror.controller import _first_failure
            failure = _first_failure(group)
            if failure is None:
                raise
            _fail(failure.code, str(failure))
        except X.Failure as e:
            _fail(e.code, str(e))
        except KeyboardInterrupt:
            pass

    @cli.command()
    @which
    @click.option("--json", "as_json", is_flag=True, help="everything, as JSON")
    def state(as_json, **params):
        """Both nodes' state; exits with this node's (STOP 0 WAIT 1 ALONE 2 PRIM 3 SECOND 4)."""
        answer = ask(params, {"cmd": "state"}, timeout=10)
        answer.pop("ok", None)
        me = answer["me"]
        if as_json:
            click.echo(json.dumps(answer, indent=1, sort_keys=True))
        else:
            click.echo(f"module {answer['module']}")
            click.echo(_status_line(me) + ("" if not me.get("running")
                                           else f" (running {me['running']})"))
            peer = answer["peer"]
            click.echo(_status_line(peer) + ("" if peer.get("alive") or not peer.get("state")
                                             else " (not heard now)"))
            r = answer["replication"]
            click.echo(f"replication: {r['ops']} operations, {r['bytes']} bytes sent, "
                       f"{r['in_flight']} in flight (lag), {r['applied']} applied here")
            rs = r.get("resync")
            if rs:
                click.echo(_resync_line(rs))
            for d in answer.get("divergence", []):
                click.echo(_divergence_line(d))
            for f in answer["folders"]:
                link = f["link"] or ("connected" if f["replica_connected"] else "-")
                click.echo(f"  {f['mountpoint']}: {f['role'] or 'NO AGENT'}, link {link}"
                           + (f", {f['error']}" if f["error"] else ""))
            g = answer.get("guard")
            if g:
                click.echo(f"split-brain guard ({g['mode']}): "
                           f"{'ok' if g['ok'] else 'NOT OK'}, {g['reason']}")
            for n in answer["networks"]:
                rtt = f", rtt {n['rtt'] * 1000:.2f} ms" if n["rtt"] is not None else ""
                click.echo(f"  network {n['index']} {n['local']} -> {n['peer']}: "
                           f"{'up' if n['up'] else 'DOWN'}{rtt}")
        sys.exit(State(me["state"]).code)

    def _command(name: str, help_text: str, cmd: str | None = None):
        @which
        def run(**params):
            answer = ask(params, {"cmd": cmd or name})
            click.echo(answer.get("reason", "done"))
        run.__doc__ = help_text
        cli.command(name)(run)

    _command("start", "Start the module on this node (from STOP).")
    _command("stop", "Stop the module on this node (demoting it first if primary).")
    _command("restart", "Restart the application on the primary (stop_prim, start_prim).")
    _command("swap", "Exchange the roles of the primary and the SECOND, losing nothing.")
    _command("prim", "Make this node primary when the cluster cannot decide by itself.")
    @cli.command()
    @which
    @click.option("--keep", required=True, metavar="NODE",
                  help="the node whose copy is kept (the survivor)")
    def resolve(keep, **params):
        """End a split brain: NODE's copy is kept and it is primary; the other node
        follows it, its own versions of what differs moved to quarantine, not lost."""
        click.echo(ask(params, {"cmd": "resolve", "keep": keep})["reason"])

    @cli.command()
    @which
    @click.option("--fullsync", is_flag=True, help="and resynchronise this node's copy by "
                  "comparing everything (restored from a backup, or suspect)")
    def second(fullsync, **params):
        """Make this node SECOND of the primary (or hand over, on the PRIM)."""
        click.echo(ask(params, {"cmd": "second", "fullsync": fullsync}).get("reason", "done"))

    _command("primforce", "Make this node primary even with out-of-date data (DANGEROUS).")

    @cli.command()
    @which
    @click.argument("onoff", type=click.Choice(["on", "off"]))
    def failover(onoff, **params):
        """Turn automatic failover on or off (on both nodes)."""
        answer = ask(params, {"cmd": f"failover {onoff}"})
        click.echo(answer.get("reason", "done"))

    @cli.command()
    @which
    @click.argument("wanted", type=click.Choice([s.value for s in State], case_sensitive=False))
    @click.option("--timeout", type=float, default=60.0, show_default=True)
    @click.option("--ready/--any", default=True, show_default=True,
                  help="wait for Ready too (not only the state)")
    def waitstate(wanted, timeout, ready, **params):
        """Wait until this node is in state WANTED (exit 0), or time out (exit 10)."""
        wanted = wanted.upper()
        deadline = time.monotonic() + timeout
        last = None
        while True:
            me = ask(params, {"cmd": "state"}, timeout=10)["me"]
            last = me
            if me["state"] == wanted and (not ready or me["readiness"] == "Ready"):
                click.echo(_status_line(me))
                return
            if time.monotonic() >= deadline:
                _fail(X.FAILED, f"still {last['state']} ({last['readiness']}: "
                                f"{last['reason']}) after {timeout:g} s")
            time.sleep(WAIT_POLL)

    @cli.command("log")
    @which
    @click.option("-f", "--follow", is_flag=True, help="keep printing new lines")
    @click.option("--lines", type=int, default=50, show_default=True)
    def log_(follow, lines, **params):
        """Show the controller's log (the decisions and the steps of each transition)."""
        path = ask(params, {"cmd": "ping"}, timeout=10)["log_file"]
        try:
            f = open(path, "rb")
        except OSError as e:
            _fail(X.FAILED, f"cannot read {path}: {e.strerror}")
        with f:
            tail = f.read().splitlines()[-lines:] if lines > 0 else []
            for line in tail:
                click.echo(line.decode(errors="replace"))
            while follow:
                line = f.readline()
                if line:
                    click.echo(line.decode(errors="replace").rstrip("\n"))
                else:
                    time.sleep(0.2)
