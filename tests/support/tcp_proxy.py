"""A TCP forwarding proxy on 127.0.0.1 that can turn its live connections into black holes.

``blackhole()`` makes every connection open at that moment stop forwarding in both
directions while staying ESTABLISHED: the shape of a half-open connection after a
network fault, a NAT that forgot the flow, or a peer whose end was closed while ours
was not. Connections made afterwards forward normally, so a side that notices the dead
connection and reconnects is served again. It also records every byte it forwards
(``recorded``), for tests that look for plaintext on the wire.

``drop(to_upstream=..., to_client=...)`` is the other fault: from then on, until
``restore()``, bytes in the chosen direction are swallowed on every connection, open or
made later (what a firewall rule dropping one direction between two hosts does: a side
that reconnects gets nowhere). The proxy still reads them, so neither side sees TCP
push back; ZMTP heartbeats are what notice.
"""

from __future__ import annotations

import selectors
import socket
import threading


class BlackholeProxy:
    def __init__(self, upstream_host: str, upstream_port: int, record: bool = False) -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.setblocking(False)
        self.port: int = self._listener.getsockname()[1]
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._listener, selectors.EVENT_READ, None)
        #: socket -> its partner; both stay open while black-holed
        self._pairs: dict[socket.socket, socket.socket] = {}
        self._holes: set[socket.socket] = set()
        #: the sockets accepted from clients (the other end of each pair is upstream)
        self._clients: set[socket.socket] = set()
        self._drop_to_upstream = False
        self._drop_to_client = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._record = record
        self.recorded = bytearray()
        self.accepted = 0
        self._thread = threading.Thread(target=self._run, name="blackhole-proxy", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> str:
        return f"tcp://127.0.0.1:{self.port}"

    def blackhole(self) -> int:
        """Stop forwarding on every connection open now; returns how many pairs."""
        with self._lock:
            self._holes.update(self._pairs)
            return len(self._pairs) // 2

    def drop(self, to_upstream: bool = True, to_client: bool = True) -> None:
        """Swallow, from now until ``restore``, what flows client -> upstream and/or
        upstream -> client, on every connection present or future."""
        with self._lock:
            self._drop_to_upstream, self._drop_to_client = to_upstream, to_client

    def restore(self) -> None:
        """Forward both directions again (black holes made by ``blackhole`` stay)."""
        with self._lock:
            self._drop_to_upstream = self._drop_to_client = False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        with self._lock:
            for s in list(self._pairs):
                s.close()
            self._pairs.clear()
        self._listener.close()
        self._sel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._sel.select(timeout=0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                else:
                    self._forward(sock)

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        try:
            upstream = socket.create_connection(self.upstream, timeout=2)
        except OSError:
            client.close()
            return
        self.accepted += 1
        for s in (client, upstream):
            s.setblocking(False)
        with self._lock:
            self._pairs[client] = upstream
            self._pairs[upstream] = client
            self._clients.add(client)
        self._sel.register(client, selectors.EVENT_READ, None)
        self._sel.register(upstream, selectors.EVENT_READ, None)

    def _forward(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        with self._lock:
            partner = self._pairs.get(sock)
            hole = sock in self._holes or (
                self._drop_to_upstream if sock in self._clients else self._drop_to_client
            )
        if partner is None:
            return
        if not data:
            self._drop(sock, partner)
            return
        if hole:
            return  # swallowed: neither side learns anything
        if self._record:
            self.recorded += data
        try:
            partner.setblocking(True)
            partner.sendall(data)
            partner.setblocking(False)
        except OSError:
            self._drop(sock, partner)

    def _drop(self, a: socket.socket, b: socket.socket) -> None:
        with self._lock:
            for s in (a, b):
                self._pairs.pop(s, None)
                self._holes.discard(s)
                self._clients.discard(s)
        for s in (a, b):
            try:
                self._sel.unregister(s)
            except (KeyError, ValueError):
                pass
            s.close()
