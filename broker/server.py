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

Redirect: a node hands back, whole, the requests it refused because its ring gives the
key to another shard (``WRONG_SHARD``). The table adopts the node's ring if newer, the
router decides each item again (``Router.reroute``: the new owner, or ``WRONG_SHARD`` to
the client if the ring still names the refusing shard), and the items are forwarded the
way the frontend forwards. Counts (``rerouted``, ``router.wrong_shard``) are logged at
most every ``REROUTE_LOG_INTERVAL_S``, never per request.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import zmq
from loguru import logger

from zkv.broker.failure_detector import FailureDetector, check_timing
from zkv.broker.node_table import HeartbeatRefused, LeaderChange, NodeTable, RingAdopted, TableEvent
from zkv.broker.router import Router
from zkv.broker.stats import BrokerStats
from zkv.protocol import codec
from zkv.protocol.errors import RemoteProtocolError
from zkv.protocol.limits import HEARTBEAT_BYTES_MAX, KEY_BYTES_MAX, VALUE_BYTES_MAX
from zkv.protocol.liveness import keep_alive
from zkv.protocol.messages import Heartbeat, Redirect, ReplyBatch, RequestBatch
from zkv.protocol.security import Curve, TrustStore, ZapHandler, peer_node_id, user_id

#: Messages taken from one socket per wake-up before looking at the others.
BATCH_MAX = 256
#: Requests per RequestBatch: big enough to amortize a message, small enough that the
#: node starts working while the broker is still draining (the two overlap on 2 cores).
FORWARD_BATCH_MAX = 32
#: Per-pipe queue bound towards and from each node, in messages (a RequestBatch of up to
#: FORWARD_BATCH_MAX requests is one). About a second of a node's work: queueing more
#: only turns into client timeouts, while a full pipe answers UNAVAILABLE at once.
#: (100,000 let a flood of clients grow the broker by 500 MB.)
HWM = 1_000
#: Per-client queue bound on the frontend, both directions. A client that stops reading
#: holds at most this many replies in the broker; later replies to it are dropped (it
#: sees timeouts), so no client can grow the broker (Redis's client-output-buffer-limit).
#: Well above any in-flight window the SDK or `zkv bench` uses (<= 256 per socket).
CLIENT_QUEUE_MAX = 1_000
WARNINGS_PER_WINDOW = 10
#: At most one INFO line of re-routing counts per this many seconds (a ring change can
#: redirect every request for a while; a line per request or per tick would flood).
REROUTE_LOG_INTERVAL_S = 10.0
WARNING_WINDOW_S = 10.0

_NOBLOCK = zmq.NOBLOCK
_SNDMORE_NOBLOCK = zmq.SNDMORE | zmq.NOBLOCK
_EHOSTUNREACH = zmq.EHOSTUNREACH


@dataclass(frozen=True, slots=True)
class BrokerConfig:
    broker_id: str
    frontend: str = "tcp://*:5555"
    backend: str = "tcp://*:5556"
    heartbeats: str = "tcp://*:5557"
    heartbeat_ms: int = 100
    election_timeout_ms: int = 1000
    key_bytes_max: int = KEY_BYTES_MAX
    value_bytes_max: int = VALUE_BYTES_MAX
    batch_max: int = BATCH_MAX
    hwm: int = HWM
    client_queue_max: int = CLIENT_QUEUE_MAX
    #: a ``zkv keys generate`` dir: Curve on every socket, keys checked by ZAP
    keys_dir: Path | None = None

    def __post_init__(self) -> None:
        check_timing(self.heartbeat_ms, self.election_timeout_ms)
        if self.batch_max < 1:
            raise ValueError("batch_max must be >= 1")
        if self.client_queue_max < 1:
            raise ValueError("client_queue_max must be >= 1")


class WarningLimiter:
    """At most ``limit`` warnings per ``window_s``; the rest are counted and summarized."""

    def __init__(
        self,
        log: Any,
        source: str,
        limit: int = WARNINGS_PER_WINDOW,
        window_s: float = WARNING_WINDOW_S,
    ) -> None:
        self._log = log
        self._source = source
        self._limit = limit
        self._window_s = window_s
        self._window_start = -math.inf
        self._count = 0
        self._suppressed = 0

    def warn(self, now: float, message: str, *args: Any) -> None:
        if now - self._window_start >= self._window_s:
            self.flush(now)
            self._window_start = now
            self._count = 0
        if self._count < self._limit:
            self._count += 1
            self._log.warning(message, *args)
        else:
            self._suppressed += 1

    def flush(self, now: float) -> None:
        if self._suppressed and now - self._window_start >= self._window_s:
            self._log.warning(
                "{}: {} more warnings suppressed in the last {:.0f} s",
                self._source, self._suppressed, self._window_s,
            )  # fmt: skip
            self._suppressed = 0


def _discard_rest(sock: zmq.Socket[Any]) -> int:
    """Receive and drop the remaining parts of the current message; returns how many."""
    n = 0
    while sock.get(zmq.RCVMORE):
        sock.recv(_NOBLOCK, False)
        n += 1
    return n


class BrokerServer:
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
        #: secure: requests go to nodes under a role-stamped client ident (``_stamp``)
        self.secure = curve is not None
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

    def _start_security(self) -> Curve:
        """Load our pair and the allow-lists; start the ZAP handler before any bind."""
        keys = Path(self.config.keys_dir or "")
        trust = TrustStore(keys)
        curve = Curve.for_identity(keys / "brokers" / self.config.broker_id, trust.public_dir)
        self.zap = ZapHandler(self._ctx, trust, self.log)
        return curve

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
            _discard_rest(sock)
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
        for _ in range(self.config.batch_max):
            try:
                client = recv(_NOBLOCK, False)
            except zmq.Again:
                return
            if not client.more:
                continue  # a bare routing id: nothing to route, nobody to answer
            head = recv(_NOBLOCK, False)
            if self.secure:
                client = _stamp(head, client)
            msg: list[Any]
            if not head.more:
                msg = [client, head.bytes]
            else:
                blob = recv(_NOBLOCK, False)
                msg = [client, head.bytes, blob]
                if blob.more:  # too many frames: the router answers BAD_REQUEST
                    _discard_rest(sock)
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
            client = _unstamp(client)
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

    def _drain_backend(self, now: float) -> None:
        # Replies stream through part by part, never decoded: [node, client, reply...].
        answered: dict[bytes, int] = {}  # single replies per node, timed once per drain
        try:
            self._drain_backend_into(now, answered)
        finally:
            stats = self.stats
            for node, n in answered.items():
                stats.timer.answered(node, n, now)
                stats.relayed += n

    def _drain_backend_into(self, now: float, answered: dict[bytes, int]) -> None:
        sock = self.backend
        recv = sock.recv
        send = self.frontend.send
        for _ in range(self.config.batch_max):
            try:
                node = recv(_NOBLOCK, False)
            except zmq.Again:
                return
            if not node.more:
                self._warn_back.warn(now, "backend: dropped a bare routing id {!r}", node.bytes[:64])
                continue
            client = recv(_NOBLOCK, False)
            if self.secure and not self._from_node(node, client, now):
                continue
            if client.more and not len(client):
                self._on_node_control(node, recv(_NOBLOCK, False), now)
                continue
            if not client.more or not len(client):
                parts = 2 + _discard_rest(sock) if client.more else 2
                self._warn_back.warn(
                    now, "backend: dropped a {}-frame message from {!r} without a client",
                    parts, node.bytes[:64],
                )  # fmt: skip
                continue
            part = recv(_NOBLOCK, False)
            ident = node.bytes
            answered[ident] = answered.get(ident, 0) + 1
            try:
                send(_unstamp(client) if self.secure else client, _SNDMORE_NOBLOCK)
            except zmq.ZMQError:  # the client is gone: drop its reply
                self.replies_dropped += 1
                if part.more:
                    _discard_rest(sock)
                continue
            while part.more:
                send(part, _SNDMORE_NOBLOCK)
                part = recv(_NOBLOCK, False)
            send(part, _NOBLOCK)

    def _from_node(self, node: zmq.Frame, first: zmq.Frame, now: float) -> bool:
        """Secure: a backend message counts only if its connection authenticated as the
        node whose id it routes under (ZAP admits only node keys; this binds the id)."""
        if peer_node_id(first) == node.bytes.decode(errors="replace"):
            return True
        if first.more:
            _discard_rest(self.backend)
        self._warn_back.warn(now, "backend: dropped a message from {!r} authenticated as {!r}",
                             node.bytes[:64], user_id(first))
        return False

    def _on_node_control(self, node: zmq.Frame, part: zmq.Frame, now: float) -> None:
        """``[node, b"", ReplyBatch]``: fan the replies out to their clients;
        ``[node, b"", Redirect]``: route the refused requests again."""
        if part.more:
            _discard_rest(self.backend)
            self._warn_back.warn(now, "backend: dropped an over-long control message")
            return
        try:
            batch = codec.decode([part.bytes])
        except RemoteProtocolError as exc:
            self._warn_back.warn(now, "backend: undecodable control message: {}", exc)
            return
        if type(batch) is not ReplyBatch:
            if type(batch) is Redirect:
                self._on_redirect(node, batch, now)
            else:
                self._warn_back.warn(now, "backend: ignored a {} from a node", type(batch).__name__)
            return
        stats = self.stats
        stats.timer.answered(node.bytes, len(batch.items), now)
        stats.relayed += len(batch.items)
        send = self.frontend.send
        secure = self.secure
        for item in batch.items:
            if len(item) < 2 or not item[0]:
                self._warn_back.warn(now, "backend: dropped a malformed batched reply")
                continue
            try:
                send(item[0][1:] if secure else item[0], _SNDMORE_NOBLOCK)
            except zmq.ZMQError:  # the client is gone: drop its reply
                self.replies_dropped += 1
                continue
            last = len(item) - 1
            for i in range(1, last):
                send(item[i], _SNDMORE_NOBLOCK)
            send(item[last], _NOBLOCK)

    def _on_redirect(self, node: zmq.Frame, redirect: Redirect, now: float) -> None:
        """Adopt the refusing node's ring if newer, then forward each refused request
        where the router now sends it, or answer its client. Batched per node like the
        frontend, with large values sent alone and each node's order kept."""
        # Only a node we route to (so have heard) may move the ring: a stray peer on the
        # backend must not pin a bogus epoch that no heartbeat could ever replace.
        if node.bytes.decode(errors="replace") in self.table.nodes:
            try:
                self.table.adopt_ring(redirect.ring)
            except Exception as exc:  # a table bug must not take the broker down
                self._warn_back.warn(now, "backend: cannot adopt a Redirect's ring: {!r}", exc)
        else:
            self._warn_back.warn(
                now, "backend: Redirect from unknown node {!r}: ring ignored", node.bytes[:64]
            )
        # handed back, not answered: retired unobserved (the re-forward is timed anew)
        self.stats.timer.answered(node.bytes, len(redirect.items), now, observe=False)
        reroute = self.router.reroute
        refused_by = redirect.shard_id
        batches: dict[bytes, list[tuple[bytes, ...]]] = {}
        try:
            for item in redirect.items:
                try:
                    dest = reroute(item, refused_by, now)
                except Exception as exc:  # a router bug must not take the broker down
                    self._warn_back.warn(now, "backend: cannot re-route a request: {!r}", exc)
                    continue
                if isinstance(dest, bytes):
                    self.rerouted += 1
                    self._batch_or_send(dest, item, batches, now)
                elif dest is not None:
                    self._reply(item[0], dest)
                # else: nobody to answer; the router counted it in ``rejected``
        finally:
            for dest, items in batches.items():
                self._forward_batch(dest, items, now)

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

    def _drain_heartbeats(self, now: float) -> None:
        recv = self.heartbeats.recv_multipart
        observe = self.table.observe
        for _ in range(self.config.batch_max):
            sender = None
            try:
                if self.secure:
                    frames = recv(_NOBLOCK, copy=False)
                    sender = peer_node_id(frames[0])
                    msg = [f.bytes for f in frames]
                else:
                    msg = recv(_NOBLOCK)
            except zmq.Again:
                return
            try:
                hb = codec.decode(msg)
            except RemoteProtocolError as exc:
                self._warn_hb.warn(now, "heartbeats: undecodable message: {}", exc)
                continue
            if type(hb) is not Heartbeat:
                self._warn_hb.warn(now, "heartbeats: ignored a {}", type(hb).__name__)
                continue
            if self.secure and sender != hb.node_id:  # the key names the node, not the payload
                self._warn_hb.warn(now, "heartbeats: {!r} claims to be {!r}: ignored",
                                   sender, hb.node_id[:64])
                continue
            try:
                observe(hb, now)
            except Exception as exc:  # a table bug must not take the broker down
                self._warn_hb.warn(now, "heartbeats: cannot record {}: {!r}", hb.node_id[:64], exc)

    # ------------------------------------------------------------------ housekeeping

    def housekeeping(self, now: float) -> None:
        """Expire liveness, log what changed, send the campaign requests decided now."""
        self._log_events(self.table.tick(now), now)
        for order in self.detector.tick(self.table, now):
            self.stats.campaigns += 1
            c = order.campaign
            self.log.info(
                "shard {} has no leader ({}): asking {} to campaign above term {}",
                c.shard_id, order.reason, order.node_id, c.term,
            )  # fmt: skip
            try:
                self.backend.send_multipart([order.ident, b"", *codec.encode(c)], _NOBLOCK)
            except zmq.ZMQError as exc:
                self._warn_back.warn(now, "cannot send campaign to {}: {}", order.node_id, exc)
        self._confirm(now)
        router = self.router
        if router.rejected != self._rejected_reported:
            self._warn_front.warn(
                now, "frontend: refused {} requests (last: {})",
                router.rejected - self._rejected_reported, router.last_rejection,
            )  # fmt: skip
            self._rejected_reported = router.rejected
        self._log_reroutes(now)
        for limiter in (self._warn_back, self._warn_hb, self._warn_front):
            limiter.flush(now)
        self.stats.timer.expire(now)
        self.stats.publish(router, self.table, self.replies_dropped, self.rerouted)

    def _confirm(self, now: float) -> None:
        """``Heard`` to every node heard lately: a leader none confirms steps down
        (failure_detector.py). A node whose pipe is full or gone misses one round."""
        send = self.backend.send
        for order in self.detector.confirmations(self.table, now):
            try:
                send(order.ident, _SNDMORE_NOBLOCK)
            except zmq.ZMQError:
                continue  # unknown routing id (not connected) or pipe full
            send(b"", _SNDMORE_NOBLOCK)
            send(codec.encode(order.heard)[0], _NOBLOCK)

    def _log_reroutes(self, now: float) -> None:
        counts = (self.rerouted, self.router.wrong_shard)
        if counts == self._reroutes_reported:
            return
        if now - self._reroutes_logged_at < REROUTE_LOG_INTERVAL_S:
            return
        (rerouted, wrong), (rerouted_0, wrong_0) = counts, self._reroutes_reported
        self.log.info(
            "re-routed {} requests refused by a node as another shard's, answered {} "
            "WRONG_SHARD (totals {} and {})",
            rerouted - rerouted_0, wrong - wrong_0, rerouted, wrong,
        )  # fmt: skip
        self._reroutes_reported = counts
        self._reroutes_logged_at = now

    def _log_events(self, events: list[TableEvent], now: float) -> None:
        for ev in events:
            if isinstance(ev, LeaderChange):
                if ev.leader_id:
                    self.stats.leader_changes += 1
                    self.log.info(
                        "shard {} leader is {} at term {}", ev.shard_id, ev.leader_id, ev.term
                    )
                else:
                    self.log.info("shard {} has no live leader (last term {})", ev.shard_id, ev.term)
            elif isinstance(ev, RingAdopted):
                cfg = ev.config
                self.log.info(
                    "adopted ring epoch {}: shards {} x {} vnodes",
                    cfg.epoch, list(cfg.shards), cfg.vnodes,
                )  # fmt: skip
            elif isinstance(ev, HeartbeatRefused):
                self._warn_hb.warn(now, "heartbeat from {!r} refused: {}", ev.node_id, ev.reason)


def _stamp(head: zmq.Frame, client: zmq.Frame) -> bytes:
    """The client ident a secure broker forwards: one role byte (``A`` admin, ``C``
    client, from the key ZAP authenticated) + the routing id. Nodes read the role from
    it (``storage_node.node.ADMIN_STAMP``); replies come back under it and lose it in
    ``_unstamp``. Per message, never cached per ident: a client may choose its ident."""
    try:
        uid = head.get("User-Id")  # inline, not user_id(): this runs per request
    except zmq.ZMQError:
        uid = None
    return (b"A" if type(uid) is str and uid.startswith("admin:") else b"C") + client.bytes


def _unstamp(client: zmq.Frame | bytes) -> bytes:
    return (client if type(client) is bytes else client.bytes)[1:]  # type: ignore[union-attr]
