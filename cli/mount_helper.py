"""`mount.fusemirror`: the helper mount(8) runs for fstab entries of type fusemirror.

    /srv/app  /srv/app  fusemirror  role=replica,listen=10.0.0.2:7788,secret_file=/etc/fusemirror/app.secret,_netdev  0 0

mount(8) calls `mount.fusemirror SPEC DIR [-sfnv] [-o OPTIONS]`; mount.fuse3 calls
`fusemirror SPEC DIR -o OPTIONS` for type fuse.fusemirror. Both end up here.
Options that belong to mount(8) itself (_netdev, noauto, nofail, ...) are ignored.
"""

from __future__ import annotations

import sys

# fstab option -> `fusemirror mount` option
_OPTIONS = {"role": "--role", "peer": "--peer", "listen": "--listen",
            "secret_file": "--secret-file", "on_peer_loss": "--on-peer-loss",
            "timeout": "--timeout", "state_dir": "--state-dir", "log_file": "--log-file",
            "cache_timeout": "--cache-timeout", "resync_rate": "--resync-rate"}
_FLAGS = {"no_compress": "--no-compress", "verbose": "--verbose"}
_IGNORED = {"_netdev", "defaults", "auto", "noauto", "nofail", "rw", "user", "users", "nouser",
            "owner", "group", "dev", "nodev", "suid", "nosuid", "exec", "noexec", "async",
            "atime", "noatime", "relatime", "strictatime", "lazytime", "nolazytime", "loop",
            "allow_other", "default_permissions"}


def translate(spec: str, directory: str, options: str) -> list[str]:
    """fstab options -> arguments of `fusemirror mount`; raises ValueError."""
    argv = ["mount", directory]
    for opt in filter(None, options.split(",")):
        key, eq, value = opt.partition("=")
        if key in _OPTIONS and eq:
            argv += [_OPTIONS[key], value]
        elif key in _FLAGS and not eq:
            argv.append(_FLAGS[key])
        elif key in _IGNORED or key.startswith(("x-", "comment=", "X-")):
            continue
        else:
            raise ValueError(f"unknown mount option {opt!r}")
    if "--role" not in argv:
        raise ValueError("the mount options must include role=primary|replica|alone")
    return argv


def parse_args(args: list[str]) -> tuple[str, str, str]:
    spec = directory = None
    options = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-o" and i + 1 < len(args):
            options.append(args[i + 1])
            i += 2
            continue
        if a.startswith("-o") and len(a) > 2:
            options.append(a[2:])
        elif a == "-t" and i + 1 < len(args):
            i += 1
        elif a.startswith("-"):
            pass                       # -s -f -n -v: sloppy, fake, no-mtab, verbose
        elif spec is None:
            spec = a
        elif directory is None:
            directory = a
        i += 1
    if spec is None or directory is None:
        raise ValueError("usage: mount.fusemirror SPEC DIR [-o OPTIONS]")
    return spec, directory, ",".join(options)


def main(args: list[str] | None = None) -> int:
    from cli.main import cli
    try:
        spec, directory, options = parse_args(sys.argv[1:] if args is None else args)
        argv = translate(spec, directory, options)
    except ValueError as e:
        print(f"mount.fusemirror: {e}", file=sys.stderr)
        return 9
    try:
        cli.main(argv, prog_name="fusemirror", standalone_mode=False)
    except SystemExit as e:
        return int(e.code or 0)
    except Exception as e:  # click usage errors and the like
        print(f"mount.fusemirror: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
