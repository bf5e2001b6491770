"""A small TCP proxy on loopback for fault tests: cut, black-hole, delay, corrupt.

    proxy = Proxy(target_port); proxy.start()   # connect to 127.0.0.1:proxy.port
    proxy.cut()        # close every connection and refuse new ones
    proxy.freeze()     # keep connections but forward nothing (a black hole)
    proxy.restore()    # back to normal
    proxy.corrupt_next(min_size)   # flip one bit in the next chunk of >= min_size bytes
                                   # going from client to server
    proxy.close()

Only 127.0.0.1 is ever used. Every thread ends when the proxy is closed.
"""

from __future__ import annotations

import select
import socket
import threading
import time


class Proxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1", delay: float = 0.0):
        self.target = (target_host, target_port)
        self.delay = delay
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = self.listener.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.refusing = False
        self.frozen = False
        self._corrupt_min: int | None = None
        self.corrupted = 0
        self.bytes_up = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Proxy":
        self._spawn(self._accept)
        return self

    def _spawn(self, fn, *args):
        t = threading.Thread(target=fn, args=args, daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self):
        while not self._closed:
            r, _, _ = select.select([self.listener], [], [], 0.1)
            if not r:
                continue
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refusing:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.append((client, server))
            self._spawn(self._pump, client, server)

    def _pump(self, client: socket.socket, server: socket.socket):
        peers = {client: server, server: client}
        try:
            while not self._closed:
                if self.frozen:
                    time.sleep(0.02)
                    continue
                r, _, _ = select.select(list(peers), [], [], 0.1)
                for s in r:
                    data = s.recv(1 << 20)
                    if not data:
                        return
                    if s is client:
                        self.bytes_up += len(data)
                        if self._corrupt_min is not None and len(data) >= self._corrupt_min:
                            data = bytearray(data)
                            data[len(data) // 2] ^= 0x10
                            data = bytes(data)
                            self._corrupt_min = None
                            self.corrupted += 1
                    if self.delay:
                        time.sleep(self.delay)
                    peers[s].sendall(data)
        except OSError:
            return
        finally:
            for s in (client, server):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self):
        """Close every connection and refuse new ones (a cable pulled)."""
        self.refusing = True
        with self._lock:
            conns, self._conns = self._conns, []
        for pair in conns:
            for s in pair:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def freeze(self):
        self.frozen = True

    def restore(self):
        self.refusing = False
        self.frozen = False

    def corrupt_next(self, min_size: int = 4096):
        self._corrupt_min = min_size

    def close(self):
        self._closed = True
        self.cut()
        try:
            self.listener.close()
        except OSError:
            pass
        for t in self._threads:
            t.join(timeout=2)
