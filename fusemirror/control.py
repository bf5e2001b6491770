"""The control socket of a mount agent: one JSON request per connection, one JSON answer.

The socket lives in RUN_DIR (mode 0700, root only) and is itself mode 0600, so
only root can change roles, unmount or read status. Used by the CLI (`role`,
`umount`, `status`, `verify`) and later by the controller.
"""

from __future__ import annotations

import json
import logging
import os
import socket

import trio

from .statefile import escape

log = logging.getLogger(__name__)

RUN_DIR = "/run/fusemirror"
_MAX = 64 << 20


class ControlError(Exception):
    """No agent answers for that folder, or it answered with an error. .code is the
    exit code to use (fusemirror.errors)."""

    def __init__(self, message: str, code: int = 10):
        super().__init__(message)
        self.code = code


def socket_path(mountpoint: str, run_dir: str = RUN_DIR) -> str:
    """mountpoint must already be absolute and resolved: the agent must never touch
    its own mount point (the request would wait for the loop that makes it)."""
    return os.path.join(run_dir, escape(mountpoint) + ".sock")


async def serve(path: str, handler, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
    """Serve requests: handler(dict) -> dict (async)."""
    os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
    os.chmod(os.path.dirname(path), 0o700)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        await sock.bind(path)
    finally:
        os.umask(old)
    sock.listen(16)
    listener = trio.SocketListener(sock)

    async def one(stream):
        async with stream:
            buf = b""
            while not buf.endswith(b"\n") and len(buf) < _MAX:
                data = await stream.receive_some(65536)
                if not data:
                    return
                buf += data
            try:
                request = json.loads(buf)
                answer = await handler(request)
            except Exception as e:          # the answer carries the error; the agent lives on
                log.exception("control request failed")
                answer = {"ok": False, "error": str(e) or type(e).__name__}
            try:
                await stream.send_all(json.dumps(answer).encode() + b"\n")
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass

    try:
        task_status.started()
        await trio.serve_listeners(one, [listener])
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def request(mountpoint: str, payload: dict, timeout: float | None = 30.0,
            run_dir: str = RUN_DIR) -> dict:
    """Send one request to the agent of mountpoint (blocking; for the CLI)."""
    return request_path(socket_path(mountpoint, run_dir), payload, timeout,
                        what=f"the agent of {mountpoint}",
                        missing=f"no fusemirror agent serves {mountpoint}")


def request_path(path: str, payload: dict, timeout: float | None = 30.0, *,
                 what: str = "the controller", missing: str | None = None) -> dict:
    """Send one request to whatever serves the socket at path (blocking)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise ControlError(missing or f"nothing answers on {path}", code=8) from None
    try:
        s.sendall(json.dumps(payload).encode() + b"\n")
        buf = b""
        while not buf.endswith(b"\n"):
            data = s.recv(1 << 20)
            if not data:
                break
            buf += data
    except socket.timeout:
        raise ControlError(f"{what} did not answer in {timeout:g}s") from None
    except OSError as e:                   # it died while answering (ECONNRESET, EPIPE)
        raise ControlError(f"{what} broke the connection: {e.strerror or e}") from None
    finally:
        s.close()
    if not buf:
        raise ControlError(f"{what} closed the connection")
    try:
        answer = json.loads(buf)
    except ValueError:
        raise ControlError(f"{what} sent a truncated answer") from None
    if not answer.get("ok", False):
        raise ControlError(answer.get("error", "request failed"), code=answer.get("code", 10))
    return answer
