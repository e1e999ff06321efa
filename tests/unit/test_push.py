"""The source leader's stream to a target leader (``storage_node/push.py``) against the
real target state machine, through a network that loses, repeats and delays: every
moving key arrives once, in order, and a lost ack or a leader change only resends."""

from __future__ import annotations

import random

import pytest

from zkv.protocol.messages import Applied, MigrateAck, MigrateBatch, Phase
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.commands import MigrateBegin, MigrateOut, PutCommand
from zkv.storage_node.ownership import PHASE_CATCHUP, PHASE_COPY
from zkv.storage_node.push import (
    ACK_TIMEOUT_S,
    DONE,
    FAILED,
    KeyLister,
    LeaderTasks,
    Push,
    PushSpec,
    command_for,
)
from zkv.storage_node.state_machine import KVStateMachine

OLD = RingConfig(1, (0,), 16)
NEW = RingConfig(2, (0, 1), 16)
TARGETS = (("t1", "tcp://a"), ("t2", "tcp://b"), ("t3", "tcp://c"))


def _shards(keys: int) -> tuple[KVStateMachine, KVStateMachine]:
    src = KVStateMachine(shard_id=0, ring=OLD)
    for i in range(keys):
        src.apply_command(i + 1, PutCommand(b"c", i + 1, i + 1, 1, f"k{i}".encode(), b"v%d" % i))
    dst = KVStateMachine(shard_id=1)
    assert dst.apply_command(1, MigrateBegin(OLD, NEW)).ok
    return src, dst


def _moving(src: KVStateMachine) -> dict[bytes, tuple[bytes, int]]:
    new = Ring(NEW)
    return {k: v for k, v in src.data.items() if new.shard_for(k) == 1}


def test_lister_chunks_and_sorts() -> None:
    src, _ = _shards(1000)
    new = Ring(NEW)
    lister = KeyLister(src, lambda p: new.owner_of_position(p) == 1, chunk=64)
    turns = 0
    while not lister.advance():
        turns += 1
        assert 0 < lister.progress < 1
    assert turns >= 1000 // 64 - 1
    assert lister.keys == sorted(_moving(src))
    assert lister.applied == 1000


@pytest.mark.parametrize("seed", range(8))
def test_stream_survives_loss_duplicates_and_leader_changes(seed: int) -> None:
    rng = random.Random(seed)
    src, dst = _shards(500)
    push = Push(PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS, batch_keys=17), src)
    index = 1
    leader = "t2"
    now = 0.0
    late: list[MigrateBatch] = []
    applied_batches = 0
    hinted = ""
    for _ in range(5000):
        if push.state == DONE:
            break
        now += ACK_TIMEOUT_S / 2
        for node, batch in push.pump(src, now):
            assert not hinted or node == hinted, "a resend ignored the leader hint"
            hinted = ""
            if rng.random() < 0.2:
                late.append(batch)  # delayed: delivered some time later
            if node != leader:
                hinted = leader if rng.random() < 0.5 else ""
                push.on_ack(MigrateAck(batch.seq, 1, Applied(False, not_leader=True),
                                       hinted), now)
                continue
            if rng.random() < 0.15:
                continue  # lost on the way: the ack timeout resends
            index += 1
            result = dst.apply_command(index, command_for(batch))
            applied_batches += not result.stale
            if rng.random() < 0.15:
                continue  # the ack is lost
            push.on_ack(MigrateAck(batch.seq, 1, result, ""), now)
        if late and rng.random() < 0.3:
            index += 1
            result = dst.apply_command(index, command_for(late.pop(0)))
            assert result.ok
            applied_batches += not result.stale  # the first copy to arrive
        if rng.random() < 0.05:
            leader = rng.choice(["t1", "t2", "t3"])  # an election at the target
    assert push.state == DONE, push.status()
    progress = dst.ownership.incoming.sources[0]  # type: ignore[union-attr]
    assert progress.phase == PHASE_CATCHUP
    assert dst.data == _moving(src)
    keys = push.lister.keys or []
    assert applied_batches == max(1, -(-len(keys) // 17))  # each batch applied once


def test_a_refusal_fails_the_stream_and_says_why() -> None:
    src, _ = _shards(50)
    push = Push(PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS), src)
    (node, batch), = push.pump(src, 0.0)
    push.on_ack(MigrateAck(batch.seq, 1, Applied(False, "no migration"), ""), 0.0)
    assert push.state == FAILED and push.status().error == "no migration"


def test_tasks_keep_one_stream_per_target_and_phase() -> None:
    src, _ = _shards(50)
    tasks = LeaderTasks()
    spec = PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS)
    assert tasks.start_push(spec, src)[1] is False
    assert tasks.start_push(spec, src)[1] is True  # a retried request: same stream
    assert [(p.epoch, p.dst, p.phase) for p in tasks.status()] == [(2, 1, Phase.COPY)]
    tasks.clear()
    assert tasks.status() == ()


def test_drop_lists_then_drops_a_batch_at_a_time() -> None:
    src, _ = _shards(12_000)
    from zkv.storage_node.commands import RingSet

    assert src.apply_command(20_000, RingSet(NEW)).ok
    moving = _moving(src)
    tasks = LeaderTasks()
    index = 20_000
    dropped = 0
    for _ in range(100):
        step = tasks.drop_step(src, 2)
        if isinstance(step, int):
            assert 0 <= step <= 1000
            tasks.pump(src, 0.0)
            continue
        index += 1
        result = src.apply_command(index, step)
        dropped += result.dropped
        if result.done:
            break
    assert dropped == len(moving) and src.ownership.undropped is False
    assert not set(moving) & set(src.data)


def test_the_fenced_delta_is_only_what_was_written_during_the_catch_up() -> None:
    """The catch-up carries the keys written after the copy read them (values, or
    deletes), the fenced final delta only those written after the catch-up read: the
    fence lasts as long as that delta, not the range nor the copy."""
    from zkv.storage_node.commands import DeleteCommand, Fence, MigrateOut

    src, dst = _shards(2000)
    index = 2000
    assert src.apply_command(index := index + 1, MigrateOut(OLD, NEW)).ok

    def run(phase: int, v0: int) -> Push:
        push = Push(PushSpec(OLD, NEW, 0, 1, phase, v0, b"", TARGETS, batch_keys=50), src)
        nonlocal dst_index
        for _ in range(1000):
            for _node, batch in push.pump(src, 0.0):
                dst_index += 1
                push.on_ack(MigrateAck(batch.seq, 1, dst.apply_command(dst_index,
                                                                       command_for(batch)), ""), 0.0)
            if push.state == DONE:
                return push
        raise AssertionError(push.status())

    dst_index = 1
    moving = sorted(_moving(src))
    copy = run(1, 0)
    assert copy.sent_keys == len(moving)
    # written during the copy (after its listing): 5 updated, 3 deleted, 2 created
    for i, key in enumerate(moving[:8]):
        index += 1
        if i < 5:
            src.apply_command(index, PutCommand(b"w", index, index, 1, key, b"new"))
        else:
            src.apply_command(index, DeleteCommand(b"w", index, index, 1, key))
    fresh = [k for i in range(10_000)
             if Ring(NEW).shard_for(k := f"new-{i}".encode()) == 1][:2]
    for key in fresh:
        index += 1
        src.apply_command(index, PutCommand(b"w", index, index, 1, key, b"created"))
    progress = dst.ownership.incoming.sources[0]  # type: ignore[union-attr]
    catchup = run(2, progress.v0)
    assert catchup.lister.keys == sorted([*moving[:8], *fresh])
    assert catchup.sent_keys == 10  # 7 values, 3 deletes: not the 600-odd moving keys
    assert dst.data == _moving(src)
    # written during the catch-up: only that is left for the fence
    index += 1
    src.apply_command(index, PutCommand(b"w", index, index, 1, moving[20], b"newer"))
    index += 1
    src.apply_command(index, DeleteCommand(b"w", index, index, 1, fresh[0]))
    assert src.apply_command(index := index + 1, Fence(OLD, NEW)).ok
    assert progress.phase == 3 and progress.v0 == catchup.lister.applied
    delta = run(3, progress.v0)
    assert delta.lister.keys == sorted([moving[20], fresh[0]])
    assert delta.sent_keys == 2
    assert dst.data == _moving(src)


def test_no_leader_at_the_target_backs_off_instead_of_bouncing() -> None:
    """During an election every target node says "not the leader" with no hint: the
    stream tries the next node after a short pause, not in a tight loop."""
    from zkv.storage_node.push import NO_LEADER_RETRY_S

    src, _ = _shards(50)
    push = Push(PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS), src)
    (node, batch), = push.pump(src, 0.0)
    push.on_ack(MigrateAck(batch.seq, 1, Applied(False, not_leader=True), ""), 0.01)
    assert push.pump(src, 0.01 + NO_LEADER_RETRY_S / 2) == []
    (again, same), = push.pump(src, 0.01 + NO_LEADER_RETRY_S)
    assert same == batch and again != node
    push.on_ack(MigrateAck(batch.seq, 1, Applied(False, not_leader=True), "t1"), 0.2)
    (hinted, _), = push.pump(src, 0.2)  # a named leader: at once
    assert hinted == "t1"


def test_a_rate_limit_spaces_the_batches() -> None:
    src, _ = _shards(400)
    rate = 10_000  # bytes per second
    push = Push(PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS, batch_keys=20,
                         rate_bytes_s=rate), src)
    now = 0.0
    sent = []
    while not sent:  # listing, then the first batch
        sent = push.pump(src, now)
    (_, first), = sent
    push.on_ack(MigrateAck(first.seq, 1, Applied(True, phase=Phase.COPY, cursor=first.cursor), ""),
                now)
    due = len(first.items) / rate
    assert push.pump(src, due * 0.9) == []  # acknowledged, but the rate says wait
    (_, second), = push.pump(src, due)
    assert second.after == first.cursor


CHAOS_KEYS = [f"k{i:03d}".encode() for i in range(150)]


def test_a_late_ack_from_before_a_restart_does_not_end_a_stream() -> None:
    """A restarted node's streams could number batches as its previous process did; a
    late ack to the old process must not settle the new stream's last batch (it did:
    the push said done, the target's phase never closed, the change stalled)."""
    old, new = RingConfig(1, (0,), 16), RingConfig(2, (0, 1), 16)
    targets = (("t1", "inproc://t1"),)
    src = KVStateMachine(shard_id=0, ring=old)
    for i, key in enumerate(CHAOS_KEYS[:40], start=1):
        src.apply_command(i, PutCommand(b"c", i, i, 1, key, b"v"))
    src.apply_command(41, MigrateOut(old, new))
    dst = KVStateMachine(shard_id=1)
    dst.apply_command(1, MigrateBegin(old, new))
    moving = sum(Ring(new).shard_for(k) == 1 for k in src.data)

    def spec(after: bytes) -> PushSpec:
        return PushSpec(old, new, 0, 1, PHASE_COPY, 0, after, targets, batch_keys=moving - 1)

    before = LeaderTasks()  # the source leader's process
    before.start_push(spec(b""), src)
    (_, _, first), = before.pump(src, 0.0)
    result = dst.apply_command(2, command_for(first))  # applied; the ack is delayed
    assert isinstance(result, Applied) and result.ok and not result.stale
    progress = dst.ownership.incoming.sources[0]  # type: ignore[union-attr]
    after = LeaderTasks()  # restarted, leader again; the coordinator restarts the stream
    after.start_push(spec(progress.cursor), src)
    (_, _, last), = after.pump(src, 1.0)  # the rest in one batch; lost on the way
    assert last.done and last.seq == first.seq
    after.on_ack(MigrateAck(first.seq, 1, result, ""), 2.0)  # the old ack arrives
    push = after.pushes[(2, 1, PHASE_COPY)]
    assert push.state != DONE or progress.phase > PHASE_COPY, (
        f"stream done, target still in phase {progress.phase}")


def test_a_stream_to_a_target_already_past_the_change_ends() -> None:
    """The target flipped its ring to the new epoch already (the change finished, and a
    stale or resumed stream still sends): its MigrateIn answers ``noop``, and the stream
    must end, not resend its last batch forever (found by the shard-move simulation:
    the same done batch was appended to the target's log every few milliseconds)."""
    src, _ = _shards(50)
    push = Push(PushSpec(OLD, NEW, 0, 1, 1, 0, b"", TARGETS, batch_keys=17), src)
    done_target = KVStateMachine(shard_id=1, ring=NEW)
    now, sent = 0.0, 0
    while push.state != DONE and sent < 20:
        now += 0.01
        for _node, batch in push.pump(src, now):
            sent += 1
            result = done_target.apply_command(sent, command_for(batch))
            assert isinstance(result, Applied) and result.noop
            push.on_ack(MigrateAck(batch.seq, 1, result, ""), now)
    assert push.state == DONE, f"still sending after {sent} batches"
