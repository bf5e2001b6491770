"""`fusemirror`: the command line (click). Every failure is one line and an exit code
from fusemirror.errors (documented in docs/admin-mount.md)."""

from __future__ import annotations

import json
import logging
import logging.handlers
import os
import select
import subprocess
import sys
import time

import click

from cli import cluster
from fusemirror import control
from fusemirror import errors as X
from fusemirror.statefile import DEFAULT_DIR, escape

LOG_DIR = "/var/log/fusemirror"


def fail(code: int, message: str):
    click.echo(f"fusemirror: {message}", err=True)
    sys.exit(code)


def setup_logging(log_file: str, foreground: bool, verbose: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("pyfuse3").setLevel(logging.INFO)
    fmt = logging.Formatter("%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s")
    os.makedirs(os.path.dirname(log_file) or ".", exist_ok=True)
    fh = logging.FileHandler(log_file)
    fh.setFormatter(fmt)
    root.addHandler(fh)
    if os.path.exists("/dev/log"):
        sh = logging.handlers.SysLogHandler("/dev/log")
        sh.setFormatter(logging.Formatter("fusemirror[%(process)d]: %(levelname)s %(message)s"))
        root.addHandler(sh)
    if foreground and sys.stderr.isatty():
        eh = logging.StreamHandler()
        eh.setFormatter(fmt)
        root.addHandler(eh)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="fusemirror")
def cli():
    """fusemirror: synchronous two-node replication of application folders."""


def _mount_argv(params: dict) -> list[str]:
    argv = [sys.executable, "-m", "cli.main", "mount", params["directory"], "--foreground",
            "--role", params["role"], "--on-peer-loss", params["on_peer_loss"],
            "--timeout", str(params["timeout"]), "--state-dir", params["state_dir"],
            "--cache-timeout", str(params["cache_timeout"])]
    for opt in ("peer", "listen", "secret_file", "log_file", "protocol_versions", "run_dir",
                "resync_rate"):
        if params.get(opt):
            argv += ["--" + opt.replace("_", "-"), str(params[opt])]
    if not params["compress"]:
        argv.append("--no-compress")
    if params.get("verbose"):
        argv.append("--verbose")
    return argv


def _read_report(fd: int, wait: float) -> bytes:
    """The agent's one-line report on the pipe (up to its newline, or EOF, or `wait`)."""
    answer = b""
    deadline = time.monotonic() + wait
    try:
        while not answer.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            answer += chunk
    finally:
        os.close(fd)
    return answer


def spawn_agent(params: dict, wait: float) -> None:
    """Start the agent in the background and wait until it says it is mounted."""
    r, w = os.pipe()
    env = dict(os.environ)
    top = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = top + (":" + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = _mount_argv(params) + ["--ready-fd", str(w)]
    proc = subprocess.Popen(argv, pass_fds=(w,), start_new_session=True, cwd="/", env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.close(w)
    line = _read_report(r, wait).decode(errors="replace").strip()
    if line == "OK":
        return
    if line.startswith("ERR "):
        _, code, message = line.split(" ", 2)
        fail(int(code), message)
    if proc.poll() is None:
        fail(X.FAILED, f"the agent did not report ready within {wait:g}s (pid {proc.pid}); "
                       f"see {params['log_file']}")
    fail(X.FAILED, f"the agent exited with status {proc.returncode}; see {params['log_file']}")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--role", type=click.Choice(["primary", "replica", "alone"]), required=True)
@click.option("--peer", metavar="HOST:PORT", help="the replica to replicate to (primary)")
@click.option("--listen", metavar="HOST:PORT", help="where to accept the primary (replica)")
@click.option("--secret-file", type=click.Path(dir_okay=False), help="shared secret")
@click.option("--on-peer-loss", type=click.Choice(["block", "alone"]), default="block",
              show_default=True, help="block: writes wait then fail (EIO); alone: go on alone")
@click.option("--timeout", type=float, default=10.0, show_default=True,
              help="replication timeout in seconds")
@click.option("--state-dir", default=DEFAULT_DIR, show_default=True)
@click.option("--log-file", help="default /var/log/fusemirror/mount-<dir>.log")
@click.option("--cache-timeout", type=float, default=10.0, show_default=True,
              help="kernel attribute and entry cache lifetime (also the agent's listings)")
@click.option("--resync-rate", type=click.IntRange(0), default=0, metavar="BYTES",
              help="cap a resynchronisation's data at BYTES per second (0: no cap)")
@click.option("--compress/--no-compress", default=True, show_default=True,
              help="lz4 for write payloads when it pays")
@click.option("-f", "--foreground", is_flag=True, help="stay in the foreground")
@click.option("-v", "--verbose", is_flag=True)
@click.option("--protocol-versions", hidden=True, help="MIN-MAX, for upgrade tests")
@click.option("--run-dir", hidden=True, default=control.RUN_DIR)
@click.option("--ready-fd", type=int, hidden=True)
def mount(**params):
    """Mount DIRECTORY over itself, replicated."""
    from fusemirror import agent
    directory = os.path.realpath(params["directory"])
    params["directory"] = directory
    if not params["log_file"]:
        params["log_file"] = os.path.join(LOG_DIR, f"mount-{escape(directory)}.log")
    if not params["foreground"]:
        spawn_agent(params, wait=params["timeout"] + 30)
        return
    ready_fd = params["ready_fd"]

    def report(text: str) -> None:
        if ready_fd is not None:
            try:
                os.write(ready_fd, text.encode() + b"\n")
                os.close(ready_fd)
            except OSError:
                pass

    try:
        setup_logging(params["log_file"], True, params["verbose"])
        options = make_options(params)
        agent.run_agent(options, ready=lambda: report("OK"))
    except X.Failure as e:
        logging.getLogger("fusemirror").error("%s", e)
        report(f"ERR {e.code} {e}")
        fail(e.code, str(e))
    except KeyboardInterrupt:
        pass
    except BaseException:
        logging.getLogger("fusemirror").exception("the agent failed")
        report(f"ERR {X.FAILED} the agent failed; see {params['log_file']}")
        raise


def make_options(params: dict):
    from fusemirror import agent
    from fusemirror.mirror import Policy
    o = agent.Options(mountpoint=params["directory"], role=params["role"],
                      state_dir=params["state_dir"], run_dir=params["run_dir"],
                      policy=Policy(params["on_peer_loss"]), timeout=params["timeout"],
                      cache_timeout=params["cache_timeout"], compress=params["compress"],
                      resync_rate=params.get("resync_rate") or 0)
    if params.get("peer"):
        o.peer = agent.parse_address(params["peer"], "--peer")
    if params.get("listen"):
        o.listen = agent.parse_address(params["listen"], "--listen")
    if params.get("secret_file"):
        o.secret = agent.read_secret(params["secret_file"])
    if params.get("protocol_versions"):
        lo, _, hi = params["protocol_versions"].partition("-")
        o.versions = (int(lo), int(hi or lo))
    return o


def resolve(directory: str) -> str:
    """The canonical path of a mount point without touching the mount point itself
    (its agent may be busy or frozen): resolve the parent, keep the last name."""
    path = os.path.abspath(directory)
    parent, name = os.path.split(path)
    return os.path.join(os.path.realpath(parent), name) if name else path


def ask(directory: str, payload: dict, timeout: float | None = 60.0) -> dict:
    try:
        return control.request(resolve(directory), payload, timeout)
    except PermissionError:
        fail(X.NO_AGENT, "the control socket is for root only")
    except control.ControlError as e:
        fail(e.code, str(e))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.argument("role", type=click.Choice(["primary", "replica", "alone"]))
@click.option("--peer", metavar="HOST:PORT")
@click.option("--listen", metavar="HOST:PORT")
def role(directory, role, peer, listen):
    """Change the role of a mounted DIRECTORY without unmounting it."""
    path = resolve(directory)
    ask(path, {"cmd": "role", "role": role, "peer": peer, "listen": listen}, timeout=120)
    click.echo(f"{path}: {role}")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False), required=False)
@click.option("--full", is_flag=True, help="compare everything, not only what the journal "
              "recorded (always so when the replica is up to date)")
@cluster.which
def resync(directory, full, **params):
    """Compare the SECOND's copy with this primary's and fix every difference, online
    (the application keeps writing): of the module's folders through the controller, or
    of one mounted DIRECTORY through its agent. Progress: fusemirror state / status."""
    if directory is None:
        click.echo(cluster.ask(params, {"cmd": "resync", "full": full})["reason"])
        return
    path = resolve(directory)
    ask(path, {"cmd": "resync", "full": full})
    click.echo(f"{path}: resynchronisation started")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--timeout", type=float, default=30.0, show_default=True)
def umount(directory, timeout):
    """Finish in-flight replication, then unmount DIRECTORY."""
    from fusemirror import sysops
    path = resolve(directory)
    sock = control.socket_path(path)
    ask(path, {"cmd": "drain"}, timeout)
    try:
        sysops.umount(path)
    except OSError as e:
        fail(X.FAILED, f"cannot unmount {path}: {os.strerror(e.errno)}")
    deadline = time.monotonic() + timeout
    while os.path.exists(sock) and time.monotonic() < deadline:
        time.sleep(0.05)
    if os.path.exists(sock):
        fail(X.FAILED, f"{path} is unmounted but its agent has not exited yet")


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True)
def status(directory, as_json):
    """Show the state of the agent serving DIRECTORY."""
    answer = ask(directory, {"cmd": "status"})
    answer.pop("ok", None)
    if as_json:
        click.echo(json.dumps(answer, indent=1, sort_keys=True))
        return
    click.echo(f"{answer['mountpoint']}: {answer['role']} (pid {answer['pid']}, "
               f"policy {answer['policy']})")
    if answer.get("mirror"):
        m = answer["mirror"]
        click.echo(f"  peer {m['peer']}: {m['link']}, {m['ops']} operations, "
                   f"{m['in_flight']} in flight" + (", PEER OUT OF DATE" if m["peer_outdated"]
                                                    else ""))
    if answer.get("replica"):
        r = answer["replica"]
        click.echo(f"  replica: {'connected to ' + r['primary'] if r['connected'] else 'waiting'}"
                   f", {r['ops']} operations applied" + ("" if r["uptodate"] else
                                                         ", THIS COPY IS OUT OF DATE"))


@cli.command()
@click.argument("directory", type=click.Path(file_okay=False))
def verify(directory):
    """Compare the primary's and the replica's copies; exit 0 only when identical."""
    answer = ask(directory, {"cmd": "verify"}, timeout=None)
    diffs = answer["differences"]
    for line in diffs:
        click.echo(line)
    if diffs:
        click.echo(f"{len(diffs)} difference(s)", err=True)
        sys.exit(X.DIFFERENT)
    click.echo("identical")


@cli.group()
def config():
    """Module configuration files (see docs/configuration.md)."""


@config.command("check")
@click.option("-c", "--config", "path", required=True, type=click.Path(dir_okay=False),
              help="the module's TOML file")
def config_check(path):
    """Report every error of a module configuration, with its line; exit 0 when good."""
    from fusemirror import config as cfg
    problems = cfg.check(path)
    for line in problems:
        click.echo(line, err=True)
    if problems:
        sys.exit(X.BAD_CONFIG)
    click.echo(f"{path}: ok")


cluster.register(cli)


def entry():
    """Console entry point. Also accepts mount.fuse3's form `fusemirror SRC DIR -o OPTS`
    (fstab type fuse.fusemirror)."""
    if len(sys.argv) > 2 and sys.argv[1].startswith("/") and sys.argv[1] not in cli.commands:
        from cli.mount_helper import main as helper
        sys.exit(helper(sys.argv[1:]))
    cli(prog_name="fusemirror")


if __name__ == "__main__":
    entry()
