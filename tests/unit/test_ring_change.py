"""The coordinator's pure core (``ops/ring_change.py``): what it asks for, stage by
stage, from hand-written shard infos and a hand-moved clock. No sockets, no sleeps."""

from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

import pytest

from zkv.ops import ring_change
from zkv.ops.ring_change import (
    STALL_S,
    Plan,
    RebalanceError,
    RingChange,
    pending_plan,
    ring_adding,
)
from zkv.protocol.admin import (
    AdminAppliedReply,
    AdminBegin,
    AdminDrop,
    AdminFence,
    AdminInfoReply,
    AdminMergeSessions,
    AdminPush,
    AdminRingSet,
    AdminSessions,
    AdminSessionsReply,
    AdminTrack,
    Applied,
    IncomingInfo,
    OutgoingInfo,
    Phase,
    PushInfo,
    SourceInfo,
    StreamState,
    Target,
)
from zkv.protocol.ring import RingConfig

OLD = RingConfig(1, (0, 1), 16)
NEW = ring_adding(OLD, 2)
PLAN = Plan.of(OLD, NEW)
PEERS = {2: (Target("s2r0", "tcp://h:1"), Target("s2r1", "tcp://h:2"))}


def info(shard: int, ring: RingConfig | None = OLD, **kw: object) -> AdminInfoReply:
    base = AdminInfoReply(0, shard, ring, None, None, None, 0, False, 0, 0, ())
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def begun(phases: dict[int, Phase] | None = None, sessions: bool = False,
          cursor: bytes = b"", v0: int = 5, pushes: tuple[PushInfo, ...] = (),
          fenced: bool = False) -> dict[int, AdminInfoReply]:
    """Sources 0 and 1 tracking, target 2 expecting both, at the given phases."""
    phases = phases or {0: Phase.COPY, 1: Phase.COPY}
    incoming = IncomingInfo(OLD, NEW, tuple(SourceInfo(s, p, cursor, v0, sessions, 2**63 - 1)
                                            for s, p in sorted(phases.items())))
    out = OutgoingInfo(OLD, NEW, 0)
    fence = NEW if fenced else None
    return {0: info(0, outgoing=out, fence=fence, pushes=pushes),
            1: info(1, outgoing=out, fence=fence), 2: info(2, incoming=incoming)}


def push(src_dst: int, phase: Phase, state: StreamState = StreamState.SENDING, sent: int = 0,
         error: str = "") -> PushInfo:
    return PushInfo(NEW.epoch, src_dst, phase, state, 1000, 10, sent, sent * 10, 1, 0, "s2r0",
                    error)


def core(**kw: object) -> RingChange:
    return RingChange(PLAN, 0.0, batch_keys=7, batch_bytes=100, poll_s=0.5, **kw)  # type: ignore[arg-type]


def test_the_plan_of_adding_a_shard() -> None:
    assert PLAN.pairs == ((0, 2), (1, 2)) and PLAN.sources == [0, 1] and PLAN.targets == [2]
    assert core().look_order() == [0, 1, 2]  # sources first: see the module docstring


def test_begin_at_the_targets_then_track_at_the_sources() -> None:
    c = core()
    step = c.step({s: info(s) for s in (0, 1, 2)}, PEERS, 0.0)
    assert step.calls == (AdminBegin(b"", 0, 2, OLD, NEW), AdminTrack(b"", 0, 0, OLD, NEW),
                          AdminTrack(b"", 0, 1, OLD, NEW))
    assert step.entered == ("begin",) and not step.done
    assert "2->2" not in step.say[0] and "0->2" in step.say[0]


def test_streams_start_from_the_targets_cursor_with_the_rate_split() -> None:
    c = core(rate_bytes_s=1001)
    step = c.step(begun(cursor=b"\x01k"), PEERS, 0.0)
    assert step.entered == ("copy",)
    assert step.calls == tuple(
        AdminPush(b"", 0, s, OLD, NEW, 2, Phase.COPY, 0, b"\x01k", PEERS[2], 7, 100, 501)
        for s in (0, 1))
    assert step.wait_s == 0.5


def test_a_running_stream_is_left_alone_and_a_failed_one_restarted() -> None:
    c = core()
    infos = begun(pushes=(push(2, Phase.COPY),))
    infos[1] = dataclasses.replace(infos[1], pushes=(
        push(2, Phase.COPY, StreamState.FAILED, error="no node"),))
    step = c.step(infos, PEERS, 0.0)
    assert [call.shard_id for call in step.calls] == [1]
    assert any("failed (no node)" in line for line in step.say)


def test_moving_keys_are_counted_and_a_restarted_stream_counts_from_zero() -> None:
    c = core()
    c.step(begun(pushes=(push(2, Phase.COPY, sent=10),)), PEERS, 0.0)
    step = c.step(begun(pushes=(push(2, Phase.COPY, sent=25),)), PEERS, 1.0)
    assert step.entered == ("batch1",) and c.stats.keys == 25
    c.step(begun(pushes=(push(2, Phase.COPY, sent=4),)), PEERS, 2.0)
    assert c.stats.keys == 29 and c.stats.bytes == 290


def test_a_phase_moves_on_only_once_every_pair_finished_it() -> None:
    c = core()
    step = c.step(begun({0: Phase.CATCHUP, 1: Phase.COPY}), PEERS, 0.0)
    assert [(call.shard_id, call.phase) for call in step.calls] == [(1, Phase.COPY)]  # type: ignore[attr-defined]
    step = c.step(begun({0: Phase.CATCHUP, 1: Phase.CATCHUP}, v0=9), PEERS, 1.0)
    assert step.entered == ("catchup",)
    assert [(call.shard_id, call.phase, call.v0) for call in step.calls] == [  # type: ignore[attr-defined]
        (0, Phase.CATCHUP, 9), (1, Phase.CATCHUP, 9)]


def test_fence_then_the_final_delta_looked_at_more_often() -> None:
    c = core()
    step = c.step(begun({0: Phase.DELTA, 1: Phase.DELTA}), PEERS, 0.0)
    assert step.entered == ("fence",)
    assert step.calls == (AdminFence(b"", 0, 0, OLD, NEW), AdminFence(b"", 0, 1, OLD, NEW))
    step = c.step(begun({0: Phase.DELTA, 1: Phase.DELTA}, fenced=True), PEERS, 1.0)
    assert step.entered == ("delta",) and step.wait_s == 0.1
    assert "fenced the moving ranges on shards [0, 1]" in step.say  # said once it is so
    assert {call.phase for call in step.calls} == {Phase.DELTA}  # type: ignore[attr-defined]


def test_sessions_are_fetched_at_the_source_then_merged_at_the_target() -> None:
    c = core()
    infos = begun({0: Phase.DONE, 1: Phase.DONE}, fenced=True)
    step = c.step(infos, PEERS, 0.0)
    assert step.entered == ("sessions",)
    assert step.calls == (AdminSessions(b"", 0, 0, OLD, NEW), AdminSessions(b"", 0, 1, OLD, NEW))
    c.on_reply(step.calls[0], AdminSessionsReply(1, False, 1, 77, b"\x90"))
    step = c.step(infos, PEERS, 0.1)
    assert step.calls == (AdminMergeSessions(b"", 0, 2, NEW.epoch, 0, 77, b"\x90"),
                          AdminSessions(b"", 0, 1, OLD, NEW))


def test_ring_set_targets_first_then_drop_until_nothing_is_left() -> None:
    c = core()
    step = c.step(begun({0: Phase.DONE, 1: Phase.DONE}, sessions=True, fenced=True), PEERS, 0.0)
    assert step.entered == ("ring_set",)
    assert [call.shard_id for call in step.calls] == [2, 0, 1]
    assert all(isinstance(call, AdminRingSet) and call.ring == NEW for call in step.calls)
    flipped = {s: info(s, NEW, undropped=s != 2) for s in (0, 1, 2)}
    step = c.step(flipped, PEERS, 1.0)
    assert step.entered == ("drop",) and step.calls == (AdminDrop(b"", 0, 0, 2),
                                                       AdminDrop(b"", 0, 1, 2))
    c.on_reply(step.calls[0], AdminAppliedReply(1, Applied(True, dropped=40, done=False)))
    c.on_reply(step.calls[0], AdminAppliedReply(1, Applied(True, dropped=2, done=True)))
    step = c.step({s: info(s, NEW) for s in (0, 1, 2)}, PEERS, 2.0)
    assert step.done and step.calls == () and "shard 0: dropped 42 moved keys" in step.say
    assert c.stats.elapsed_s == 2.0


def test_once_one_shard_flipped_only_rolling_forward_remains() -> None:
    c = core()
    infos = begun({0: Phase.DONE, 1: Phase.DONE}, sessions=True, fenced=True)
    infos[2] = info(2, NEW, undropped=True)  # flipped: its incoming is gone
    step = c.step(infos, PEERS, 0.0)
    assert [type(call) for call in step.calls] == [AdminRingSet, AdminRingSet]
    assert [call.shard_id for call in step.calls] == [0, 1]


def test_a_stalled_phase_is_reported_not_waited_on_forever() -> None:
    c = core()
    infos = begun(pushes=(push(2, Phase.COPY, sent=3),))
    c.step(infos, PEERS, 0.0)
    c.step(infos, PEERS, STALL_S)
    with pytest.raises(RebalanceError, match="no progress"):
        c.step(infos, PEERS, STALL_S + 1)


def test_refusals_are_errors() -> None:
    with pytest.raises(RebalanceError, match="no node of shard 2"):
        core().step(begun(), {}, 0.0)
    infos = begun()
    infos[2] = info(2, incoming=IncomingInfo(OLD, NEW, ()))  # expects no source
    with pytest.raises(RebalanceError, match="does not expect"):
        core().step(infos, PEERS, 0.0)
    with pytest.raises(ValueError, match="no info"):
        core().step({0: info(0)}, PEERS, 0.0)


@pytest.mark.parametrize(("infos", "expected"), [
    ({0: info(0), 1: info(1)}, None),
    ({0: info(0), 1: info(1), 2: info(2, incoming=IncomingInfo(OLD, NEW, ()))}, PLAN),
    ({0: info(0, fence=NEW), 1: info(1), 2: info(2)}, PLAN),
    ({0: info(0), 1: info(1), 2: info(2, NEW)}, PLAN),  # the target flipped, others not
    ({0: info(0, NEW, undropped=True), 1: info(1, NEW), 2: info(2, NEW)},
     Plan.of(RingConfig(1, (0, 1, 2), 16), NEW)),  # every shard flipped, one to drop
    ({0: info(0, None)}, None),
])
def test_pending_plan(infos: dict[int, AdminInfoReply], expected: Plan | None) -> None:
    assert pending_plan(infos) == expected


def test_the_core_is_pure() -> None:
    tree = ast.parse(Path(ring_change.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
                for a in n.names}
    imported |= {(n.module or "").split(".")[0] for n in ast.walk(tree)
                 if isinstance(n, ast.ImportFrom)}
    assert not imported & {"zmq", "time", "threading", "random", "asyncio", "socket"}
    assert {m for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
            for m in [n.module or ""] if m.startswith("zkv.")} <= {
        "zkv.protocol.admin", "zkv.protocol.errors", "zkv.protocol.ring"}
