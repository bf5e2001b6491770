"""A TCP proxy run in a node's network namespace, in front of the peer's replication port,
that flips one bit of the stream on request. Started by the harness before the daemons:

    python proxy.py --listen PORT --target HOST:PORT --mark N --log FILE

An nftables rule in the same namespace redirects the node's outgoing connections to the
peer's replication port to 127.0.0.1:PORT (`meta mark != N ... redirect`); the proxy's own
connections carry the mark N (SO_MARK), so they go straight to the peer. Everything else is
forwarded unchanged, both ways.

SIGUSR1: flip one bit in the next chunk of at least 64 bytes going from the node to its peer
(the primary's replication frames, when this node is the primary). Each corruption is one
JSON line in the log: {"at": MONOTONIC, "size": BYTES, "offset": I}. SIGTERM ends it.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import sys
import threading
import time

MIN_CHUNK = 64
SO_MARK = getattr(socket, "SO_MARK", 36)


class Proxy:
    def __init__(self, port: int, target: tuple[str, int], mark: int, log_path: str):
        self.target, self.mark = target, mark
        self.log = open(log_path, "a", buffering=1)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", port))
        self.listener.listen(16)
        self.corrupt = threading.Event()
        self.stop = threading.Event()

    def serve(self) -> None:
        while not self.stop.is_set():
            r, _, _ = select.select([self.listener], [], [], 0.2)
            if not r:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                continue
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, SO_MARK, self.mark)
            server.settimeout(5)
            try:
                server.connect(self.target)
            except OSError:
                client.close()
                server.close()
                continue
            server.settimeout(None)
            threading.Thread(target=self.pump, args=(client, server), daemon=True).start()

    def pump(self, client: socket.socket, server: socket.socket) -> None:
        peer = {client: server, server: client}
        try:
            while not self.stop.is_set():
                r, _, _ = select.select([client, server], [], [], 0.2)
                for s in r:
                    data = s.recv(1 << 16)
                    if not data:
                        return
                    if s is client and len(data) >= MIN_CHUNK and self.corrupt.is_set():
                        self.corrupt.clear()
                        data = bytearray(data)
                        i = len(data) // 2
                        data[i] ^= 0x10
                        self.log.write(json.dumps({"at": time.monotonic(), "size": len(data),
                                                   "offset": i}) + "\n")
                    peer[s].sendall(data)
        except OSError:
            pass
        finally:
            client.close()
            server.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="proxy.py")
    p.add_argument("--listen", type=int, required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--mark", type=int, required=True)
    p.add_argument("--log", required=True)
    args = p.parse_args(argv)
    host, port = args.target.rsplit(":", 1)
    proxy = Proxy(args.listen, (host, int(port)), args.mark, args.log)
    signal.signal(signal.SIGUSR1, lambda *_: proxy.corrupt.set())
    signal.signal(signal.SIGTERM, lambda *_: proxy.stop.set())
    with open(f"{args.log}.ready", "w") as f:
        f.write(str(os.getpid()))
    proxy.serve()
    return 0


if __name__ == "__main__":
    sys.exit(main())
