"""User-facing failures: one clear line and a documented exit code (docs/admin-mount.md)."""

from __future__ import annotations

OK = 0
DIFFERENT = 1          # verify: the copies differ
USAGE = 2              # bad command line (click's own code)
NO_FUSE = 3            # /dev/fuse missing or FUSE not usable
BAD_DIR = 4            # the folder is missing or not a directory
MOUNTED = 5            # the folder is already mounted by fusemirror (or a dead FUSE mount)
PEER_UNREACHABLE = 6   # cannot connect to the peer, or it did not answer the handshake
REFUSED = 7            # the peer refused the handshake (secret, protocol version) or is out of date
NO_AGENT = 8           # no agent serves that folder (role, umount, status, verify)
BAD_CONFIG = 9         # unreadable secret file, bad address, busy port, bad option
FAILED = 10            # anything else; the log says more
RUNNING = 11           # a controller already runs for that module and node


class Failure(Exception):
    """A failure to report as one line with an exit code."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
