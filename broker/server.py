"""The broker's zmq shell: sockets, the poll loop, and the one place that sends.

Loop: poll until the next housekeeping deadline (one heartbeat interval), read the clock
once, drain each ready socket in bounded non-blocking batches, route and send; when the
deadline has passed, tick the node table and the failure detector and send the campaign
requests and ``Heard`` confirmations they decide. The pure cores (``node_table``, ``failure_detector``, ``router``)
make every decision; this module only moves frames.

Frames (docs/internals.md):
  frontend ROUTER  in  [client, header, (blob)]        out [client, reply, (blob)]
  backend ROUTER   out [node, client, header, (blob)]  in  [node, client, reply, (blob)]
                   out [node, b"", RequestBatch]       in  [node, b"", ReplyBatch]
                   out [node, b"", Campaign]           in  [node, b"", Redirect]
                   out [node, b"", Heard]
  heartbeat SUB    in  [Heartbeat]

Batching: the requests for one node taken in one drain of the frontend travel as one
``RequestBatch`` frame (a single request goes as itself), and nodes answer with
``ReplyBatch``. Each zmq message costs several microseconds of Python and syscalls on
both sides; a batch costs about half a microsecond per item.

Replies from nodes: ``backend_relay.py``; redirects and reply batches from nodes:
``node_control.py``; heartbeats and the
per-interval housekeeping: ``housekeeping.py``; keys and role stamps:
``server_security.py``; settings and bounds: ``config.py``; warnings: ``bad_input.py``.

Both ROUTERs are ``ROUTER_MANDATORY``: an unknown node is ``EHOSTUNREACH`` (the client gets
``NO_LEADER``), an unknown client drops the reply. Sends never block (a full peer queue
gives ``UNAVAILABLE`` to the client for a node, a dropped reply for a client), so one slow
peer cannot stall the broker. Any input, however malformed, is caught at the boundary and
logged as a rate-limited warning; nothing from the network stops the loop.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Any

import zmq
from loguru import logger

from zkv.broker.backend_relay import BackendRelay
from zkv.broker.bad_input import WarningLimiter, discard_rest
from zkv.broker.config import BATCH_MAX, CLIENT_QUEUE_MAX, FORWARD_BATCH_MAX, HWM, BrokerConfig
from zkv.broker.failure_detector import FailureDetector
from zkv.broker.fanout import PART_IDENT_BYTES, FanOutTable
from zkv.broker.fanout_shell import FanOutShell
from zkv.broker.housekeeping import BrokerLiveness
from zkv.broker.node_control import NodeControl
from zkv.broker.node_table import NodeTable
from zkv.broker.router import FAN_OUT, Router
from zkv.broker.server_security import BrokerSecurity, stamp, unstamp
from zkv.broker.stats import BrokerStats
from zkv.protocol import codec
from zkv.protocol.drain import more_waiting
from zkv.protocol.limits import HEARTBEAT_BYTES_MAX
from zkv.protocol.liveness import keep_alive
from zkv.protocol.messages import RequestBatch
from zkv.protocol.security import ZapHandler

#: what other modules import from here (the settings live in config.py)
__all__ = ["BATCH_MAX", "CLIENT_QUEUE_MAX", "FORWARD_BATCH_MAX", "HWM", "BrokerConfig",
           "BrokerServer"]

_NOBLOCK = zmq.NOBLOCK
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
_EHOSTUNREACH = zmq.EHOSTUNREACH


class BrokerServer(BrokerSecurity, NodeControl, BrokerLiveness, FanOutShell, BackendRelay):
    """Owns the three sockets; ``bind()``, then ``run()`` until ``stop()``; ``close()``."""

    def __init__(self, config: BrokerConfig, context: zmq.Context[Any] | None = None) -> None:
        self.config = config
        self.log = logger.bind(component="broker", broker=config.broker_id)
        self.table = NodeTable(config.election_timeout_ms / 1000)
        self.detector = FailureDetector(
            config.broker_id, config.heartbeat_ms, config.election_timeout_ms
        )
        self.router = Router(
            self.table, config.broker_id, config.key_bytes_max, config.value_bytes_max
        )
        # One budget per source, so garbage on one socket cannot hide warnings of another.
        self._warn_back = WarningLimiter(self.log, "backend")
        self._warn_hb = WarningLimiter(self.log, "heartbeats")
        self._warn_front = WarningLimiter(self.log, "frontend")
        self._rejected_reported = 0
        #: Redirected requests forwarded to another node; with ``router.wrong_shard``
        #: (answered WRONG_SHARD instead), what was last logged and when.
        self.rerouted = 0
        self._reroutes_reported = (0, 0)
        self._reroutes_logged_at = -math.inf
        self._own_context = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._stopping = False
        self.zap: ZapHandler | None = None
        curve = self._start_security() if config.keys_dir is not None else None
        #: secure: requests go to nodes under a role-stamped client ident (``stamp``)
        self.secure = curve is not None
        #: batches and scans in flight (fanout.py): the broker's only per-request state;
        #: a reply whose ident has this length may be a part's (a cheap first test)
        self.fanout = FanOutTable(config.key_bytes_max)
        self.part_ident_len = PART_IDENT_BYTES + (1 if self.secure else 0)
        self.frontend = self._router_socket(config.client_queue_max)
        self.backend = self._router_socket(config.hwm)
        self.heartbeats = self._ctx.socket(zmq.SUB)
        self.heartbeats.setsockopt(zmq.LINGER, 0)
        self.heartbeats.setsockopt(zmq.RCVHWM, config.hwm)
        self.heartbeats.setsockopt(zmq.MAXMSGSIZE, HEARTBEAT_BYTES_MAX)
        self.heartbeats.setsockopt(zmq.SUBSCRIBE, b"")
        keep_alive(self.heartbeats, config.election_timeout_ms)
        # A client may send a value over the limit and must get TOO_LARGE back, not a
        # disconnect; still bound what one frame may make us buffer.
        frame_bytes_max = max(64 << 20, 4 * (config.key_bytes_max + config.value_bytes_max))
        self.frontend.setsockopt(zmq.MAXMSGSIZE, frame_bytes_max)
        if curve is not None:
            curve.server(self.frontend, "frontend")
            curve.server(self.backend, "backend")
            curve.server(self.heartbeats, "heartbeats")
        self.endpoints: dict[str, str] = {}
        #: Replies for clients that were gone or not reading (never an error).
        self.replies_dropped = 0
        self.stats = BrokerStats()  # --metrics-port: counted per batch (stats.py)

    def _router_socket(self, queue_max: int) -> zmq.Socket[Any]:
        sock = self._ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A restarted peer reconnecting with the same identity takes over the old pipe
        # instead of being refused while the dead connection lingers.
        sock.setsockopt(zmq.ROUTER_HANDOVER, 1)
        sock.setsockopt(zmq.SNDHWM, queue_max)
        sock.setsockopt(zmq.RCVHWM, queue_max)
        keep_alive(sock, self.config.election_timeout_ms)
        return sock

    # ------------------------------------------------------------------ lifecycle

    def bind(self) -> dict[str, str]:
        """Bind the three sockets; returns the actual endpoints (ports resolved)."""
        cfg = self.config
        for name, sock, endpoint in (
            ("frontend", self.frontend, cfg.frontend),
            ("backend", self.backend, cfg.backend),
            ("heartbeats", self.heartbeats, cfg.heartbeats),
        ):
            sock.bind(endpoint)
            last = sock.getsockopt(zmq.LAST_ENDPOINT)
            self.endpoints[name] = last.decode() if isinstance(last, bytes) else str(last)
        return dict(self.endpoints)

    def stop(self) -> None:
        """Ask ``run`` to return within one poll timeout (safe from a signal handler)."""
        self._stopping = True

    def close(self) -> None:
        for sock in (self.frontend, self.backend, self.heartbeats):
            sock.close(linger=0)
        if self.zap is not None:
            self.zap.close()
        if self._own_context:
            self._ctx.term()

    def run(self) -> None:
        poller = zmq.Poller()
        poller.register(self.frontend, zmq.POLLIN)
        poller.register(self.backend, zmq.POLLIN)
        poller.register(self.heartbeats, zmq.POLLIN)
        frontend, backend, heartbeats = self.frontend, self.backend, self.heartbeats
        interval_s = self.config.heartbeat_ms / 1000
        clock = time.monotonic
        now = clock()
        next_tick = now + interval_s
        while not self._stopping:
            timeout_ms = max(0, math.ceil((next_tick - now) * 1000))
            try:
                ready = poller.poll(timeout_ms)
            except zmq.ZMQError as exc:
                if exc.errno == zmq.ETERM:
                    return
                raise
            now = clock()
            for sock, _ in ready:
                try:
                    if sock is frontend:
                        self._drain_frontend(now)
                    elif sock is backend:
                        self._drain_backend(now)
                    elif sock is heartbeats:
                        self._drain_heartbeats(now)
                except Exception as exc:  # the boundary: nothing from the network stops us
                    self._recover(sock, exc, now)
            if now >= next_tick:
                try:
                    self.housekeeping(now)
                except Exception as exc:
                    self.log.opt(exception=exc).error("housekeeping failed; continuing")
                next_tick = now + interval_s

    def _recover(self, sock: zmq.Socket[Any], exc: Exception, now: float) -> None:
        """An unexpected error mid-message: drop the rest of it so frames stay aligned."""
        with contextlib.suppress(zmq.ZMQError):
            discard_rest(sock)
        self._warn_back.warn(now, "unexpected error while draining a socket: {!r}", exc)

    # ------------------------------------------------------------------ sockets

    def _drain_frontend(self, now: float) -> None:
        # Hot path. Frames are received without copying (zmq.Frame) and forwarded as
        # they are; only the small header is copied to bytes for route_fields. Plain
        # send/recv per part is markedly cheaper than send_multipart/recv_multipart.
        sock = self.frontend
        recv = sock.recv
        forward = self.backend.send
        route = self.router.route
        batches: dict[bytes, list[tuple[bytes, ...]]] = {}
        try:
            self._drain_frontend_into(now, sock, recv, forward, route, batches)
        finally:
            for node, items in batches.items():
                self._forward_batch(node, items, now)

    def _drain_frontend_into(
        self, now: float, sock: Any, recv: Any, forward: Any, route: Any,
        batches: dict[bytes, list[tuple[bytes, ...]]],
    ) -> None:
        for i in range(self.config.batch_max):
            # a lone request goes on without an empty receive's exception (protocol/drain.py)
            if i == 1 and not more_waiting(sock):
                return
            try:
                client = recv(_NOBLOCK, False)
            except zmq.Again:
                return
            if not client.more:
                continue  # a bare routing id: nothing to route, nobody to answer
            head = recv(_NOBLOCK, False)
            if self.secure:
                client = stamp(head, client)
            msg: list[Any]
            if not head.more:
                msg = [client, head.bytes]
            else:
                blob = recv(_NOBLOCK, False)
                msg = [client, head.bytes, blob]
                if blob.more:  # too many frames: the router answers BAD_REQUEST
                    discard_rest(sock)
                    msg.append(b"")
            try:
                dest = route(msg, now)
            except Exception as exc:  # a router bug must not take the broker down
                self._warn_front.warn(now, "frontend: cannot route a message: {!r}", exc)
                continue
            if type(dest) is bytes and len(msg) == 2:
                cid = client if type(client) is bytes else client.bytes
                items = batches.get(dest)
                if items is None:
                    batches[dest] = [(cid, msg[1])]
                else:
                    items.append((cid, msg[1]))
                    if len(items) >= FORWARD_BATCH_MAX:  # keep the node busy meanwhile
                        self._forward_batch(dest, batches.pop(dest), now)
            elif type(dest) is bytes:
                pending = batches.pop(dest, None)
                if pending:  # keep this client's requests in order
                    self._forward_batch(dest, pending, now)
                try:
                    forward(dest, _SNDMORE_NOBLOCK)
                except zmq.ZMQError as exc:
                    self._forward_failed(dest, client, msg[1], exc, now)
                    continue
                # The routing id was accepted, so the rest of the message is too.
                forward(client, _SNDMORE_NOBLOCK)
                if len(msg) == 2:
                    forward(head, _NOBLOCK)
                else:
                    forward(head, _SNDMORE_NOBLOCK)
                    forward(msg[2], _NOBLOCK)
                self.stats.timer.sent(dest, 1, now)
            elif dest is FAN_OUT:  # a batch or a scan: fanout_shell.py
                self._fan_out(client, msg[1], now)
            elif dest is not None:
                self._reply(client, dest)

    def _forward_batch(self, node: bytes, items: list[tuple[bytes, ...]], now: float) -> None:
        """Send the requests collected for ``node``: alone as itself, else one batch."""
        send = self.backend.send
        try:
            send(node, _SNDMORE_NOBLOCK)
        except zmq.ZMQError as exc:
            for client, header, *_ in items:
                self._forward_failed(node, client, header, exc, now)
            return
        if len(items) == 1:
            client, header = items[0]
            send(client, _SNDMORE_NOBLOCK)
            send(header, _NOBLOCK)
        else:
            send(b"", _SNDMORE_NOBLOCK)
            send(codec.encode(RequestBatch(tuple(items)))[0], _NOBLOCK)
        stats = self.stats
        stats.timer.sent(node, len(items), now)
        stats.batch_items.observe(len(items))

    def _reply(self, client: zmq.Frame | bytes, frames: list[bytes]) -> None:
        send = self.frontend.send
        if self.secure:  # every client ident in a secure broker carries its role stamp
            client = unstamp(client)
        try:
            send(client, _SNDMORE_NOBLOCK)
        except zmq.ZMQError:  # the client is gone or not reading: drop its reply
            self.replies_dropped += 1
            return
        last = len(frames) - 1
        for i, frame in enumerate(frames):
            send(frame, _NOBLOCK if i == last else _SNDMORE_NOBLOCK)

    def _forward_failed(
        self, node: bytes, client: zmq.Frame | bytes, header: bytes, exc: zmq.ZMQError,
        now: float,
    ) -> None:
        if exc.errno == _EHOSTUNREACH:
            frames = self.router.no_leader(header, f"leader {node.decode(errors='replace')} unreachable")
        elif exc.errno == zmq.EAGAIN:
            frames = self.router.unavailable(header, f"node {node.decode(errors='replace')} is not keeping up")
        else:
            self._warn_back.warn(now, "backend: cannot forward to {!r}: {}", node, exc)
            frames = self.router.unavailable(header, "cannot forward")
        self._reply(client, frames)

    def _batch_or_send(
        self, node: bytes, item: tuple[bytes, ...], batches: dict[bytes, list[tuple[bytes, ...]]],
        now: float,
    ) -> None:
        """Queue ``(client, header)`` for ``node``'s next RequestBatch; send an item with
        a value frame alone (after what is queued for that node, to keep the order)."""
        if len(item) == 2:
            items = batches.setdefault(node, [])
            items.append(item)
            if len(items) >= FORWARD_BATCH_MAX:
                self._forward_batch(node, batches.pop(node), now)
            return
        pending = batches.pop(node, None)
        if pending:
            self._forward_batch(node, pending, now)
        send = self.backend.send
        try:
            send(node, _SNDMORE_NOBLOCK)
        except zmq.ZMQError as exc:
            self._forward_failed(node, item[0], item[1], exc, now)
            return
        last = len(item) - 1
        for i, frame in enumerate(item):
            send(frame, _NOBLOCK if i == last else _SNDMORE_NOBLOCK)
        self.stats.timer.sent(node, 1, now)

    # ------------------------------------------------------------------ housekeeping
