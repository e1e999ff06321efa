"""One fault run on 2 brokers + 2 shards x 3 (issue 10's container proof).

Clients write and read through both brokers the whole time (half of them try broker0
first, half broker1), and one sequencer per shard writes 1, 2, 3, ... Faults, one after
the other, each healed before the next and each on the current leader of a shard
(alternating shards, so both shards and both brokers' views are exercised):

1. SIGKILL of the leader, then start it again (its WAL survives);
2. SIGSTOP (docker pause) of the leader, then resume;
3. the leader taken off the network, then put back (a new address, same name);
4. the leader isolated together with broker1 (they reach each other, nothing else);
5. one-way: the leader's traffic to both brokers dropped (theirs to it delivered);
6. one-way, the reverse: both brokers' traffic to the leader dropped.

Each fault lasts ``HOLD_S`` (three election timeouts: long enough for a failover while
it is on). After each heal, every shard must have one leader that both brokers name
and every replica must have applied what that leader had committed, within
``SETTLE_S``. Per fault we report the unavailability: the longest window with no
acknowledged write on the affected shard (``longest_ack_gap``), from the fault to one
second after the cluster settled again. At the end the history must be linearizable and
no acknowledged write lost. The figures are recorded as test properties, printed, and
quoted in the README ("Availability under faults").

Before each fault the run checks that Docker's DNS still resolves every member (nodes
reconnect by name; see ``diagnose.dns_trouble``); a cluster that does not settle is
described in the failure (``diagnose.diagnose``). ``ZKV_FAULT_RUN_LOGS=dir`` keeps every
member's log; ``ZKV_FAULT_RUN_HOLD_S=n`` keeps a stuck cluster up n seconds to look at.
"""

from __future__ import annotations

import concurrent.futures
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.containers.cluster import ContainerCluster, close_client, is_leader, our_labels
from tests.containers.diagnose import diagnose, dns_trouble, save_logs
from tests.containers.workload import (
    Load,
    Sequencer,
    check_history,
    final_reads,
    keys_for_shard,
    longest_ack_gap,
    ring_from_status,
)

# func_only: a first run also builds the images (minutes), which is not the test's time
pytestmark = [pytest.mark.containers, pytest.mark.timeout(300, func_only=True)]

ELECTION_MS = 1000
HOLD_S = 3.0
SETTLE_S = 10.0
STEADY_S = 1.0
#: Bound on each fault's unavailability. The availability rule promises ~2 election
#: timeouts once a majority and a broker reach each other; the issue's process tests
#: ask for service again within 5 s, which we keep here on a shared 2-core machine.
GAP_MAX_S = 5.0


@dataclass
class Phase:
    name: str
    shard: int
    target: str
    fault_at: float = 0.0  # the fault's first Docker call
    applied_at: float = 0.0  # it returned: the hold counts from here
    healed_at: float = 0.0
    settled_at: float = 0.0
    end: float = 0.0
    note: str = ""
    trace: str = ""


# ----------------------------------------------------------------------------- settling


def _view(c: ContainerCluster, broker: str) -> dict[str, dict[str, Any]]:
    return {n["node_id"]: n for n in c.status(broker) if n.get("live", True)}


def _leaders(c: ContainerCluster, view: dict[str, dict[str, Any]]) -> dict[int, str]:
    """Shard -> its leader in one broker's view: the one live node claiming leadership
    at the highest term among the shard's live nodes (none if that is ambiguous)."""
    out = {}
    for shard, names in c.nodes_by_shard.items():
        rows = [view[n] for n in names if n in view]
        if not rows:
            continue
        top = max(r.get("term", 0) for r in rows)
        claims = [r for r in rows if is_leader(r.get("role")) and r.get("term", 0) == top]
        if len(claims) == 1:
            out[shard] = str(claims[0]["node_id"])
    return out


def wait_settled(c: ContainerCluster, timeout_s: float) -> tuple[float, dict[int, str], str]:
    """Wait until both brokers name the same leader for every shard, both hear every
    replica live, and every replica has applied at least the commit index its shard's
    leader reported in the first answer that named a leader (writes go on meanwhile, so
    a fixed target: everything committed by then, the fault's backlog included).
    Returns (time settled, leaders, the trace of what was still missing, with times)."""
    started = time.monotonic()
    deadline = started + timeout_s
    targets: dict[int, int] = {}
    trace: list[str] = []
    why = "no status yet"
    while True:
        try:
            views = {b: _view(c, b) for b in c.brokers}
            by_broker = {b: _leaders(c, v) for b, v in views.items()}
            leaders = by_broker[c.brokers[0]]
            view = views[c.brokers[0]]
            for shard, leader in leaders.items():
                targets.setdefault(shard, int(view[leader].get("commit_index", 0)))
            now_why = _unsettled(c, views, by_broker, targets)
        except Exception as exc:  # a status call may time out while a broker recovers
            now_why = repr(exc)
        if now_why != why:
            trace.append(f"+{time.monotonic() - started:.2f}s {now_why or 'settled'}")
            why = now_why
        if not why:
            return time.monotonic(), leaders, "; ".join(trace)
        if time.monotonic() > deadline:
            why = f"cluster not settled after {timeout_s}s: {'; '.join(trace)}\n{diagnose(c)}"
            hold_s = float(os.environ.get("ZKV_FAULT_RUN_HOLD_S", "0"))
            if hold_s:  # keep the stuck cluster up to look at it (docker exec)
                print(f"{why}\nholding the cluster {c.name} for {hold_s:.0f}s", flush=True)
                time.sleep(hold_s)
            raise AssertionError(why)
        time.sleep(0.1)


def _unsettled(
    c: ContainerCluster,
    views: dict[str, dict[str, dict[str, Any]]],
    by_broker: dict[str, dict[int, str]],
    targets: dict[int, int],
) -> str:
    for shard, names in c.nodes_by_shard.items():
        named = {b: ls.get(shard) for b, ls in by_broker.items()}
        if None in named.values() or len(set(named.values())) != 1:
            return f"shard {shard}: leaders per broker {named}"
        for b, view in views.items():
            missing = [n for n in names if n not in view]
            if missing:
                return f"{b} does not hear {missing} live"
        view = views[c.brokers[0]]
        behind = {
            n: view[n].get("applied_index")
            for n in names
            if view[n].get("applied_index", -1) < targets[shard]
        }
        if behind:
            return f"shard {shard}: behind commit {targets[shard]}: {behind}"
    return ""


# ----------------------------------------------------------------------------- faults


def _squatter_name(c: ContainerCluster) -> str:
    return f"{c.name}-squatter"


def squat(c: ContainerCluster) -> None:
    """Put a bystander on the network while a node is off it. Docker hands out the
    lowest free address, so the bystander takes the node's old one and the node comes
    back at a new address; its peers' and the brokers' connections to the old address
    now reach a host that answers with resets, as after a real move."""
    c.docker.containers.run(
        c.cfg.image, ["sleep", "600"], detach=True, init=True, network=c.name,
        name=_squatter_name(c), labels=our_labels(cluster=c.name, member="squatter"),
    )  # fmt: skip


def unsquat(c: ContainerCluster) -> None:
    c.docker.containers.get(_squatter_name(c)).remove(force=True)


def _others(c: ContainerCluster, *keep: str) -> list[str]:
    return [m for m in c.members if m not in keep]


def apply_fault(c: ContainerCluster, p: Phase) -> None:
    t = p.target
    ips = {m: c.ip(m) for m in c.members}  # before the fault: rules go in at once
    p.fault_at = time.monotonic()
    if p.name == "kill":
        c.kill(t)
    elif p.name == "pause":
        c.pause(t)
    elif p.name == "disconnect":
        p.note = f"ip {ips[t]}"
        c.disconnect(t)
        squat(c)
    elif p.name == "isolate+broker1":
        others = _others(c, t, "broker1")
        _together(
            lambda: c.iptables_drop(t, others, addresses=ips),
            lambda: c.iptables_drop("broker1", others, addresses=ips),
        )
    elif p.name == "drop leader->brokers":
        c.iptables_drop(t, c.brokers, direction="out", addresses=ips)
    elif p.name == "drop brokers->leader":
        c.iptables_drop(t, c.brokers, direction="in", addresses=ips)
    else:
        raise ValueError(p.name)
    p.applied_at = time.monotonic()


def heal_fault(c: ContainerCluster, p: Phase) -> None:
    t = p.target
    if p.name == "kill":
        c.start(t)
    elif p.name == "pause":
        c.unpause(t)
    elif p.name == "disconnect":
        c.reconnect(t)
        p.note += f" -> {c.ip(t)}"
    elif p.name == "isolate+broker1":
        _together(lambda: c.iptables_heal(t), lambda: c.iptables_heal("broker1"))
    else:
        c.iptables_heal(t)


def _together(*calls: Callable[[], None]) -> None:
    """Run Docker calls at the same time (each takes 0.1-2 s on a loaded machine: one
    after the other, the two halves of a partition would start seconds apart)."""
    with concurrent.futures.ThreadPoolExecutor(len(calls)) as pool:
        for f in [pool.submit(call) for call in calls]:
            f.result()


FAULTS = [
    ("kill", 0),
    ("pause", 1),
    ("disconnect", 0),
    ("isolate+broker1", 1),
    ("drop leader->brokers", 0),
    ("drop brokers->leader", 1),
]


# ----------------------------------------------------------------------------- the run


def test_fault_run(
    cluster_factory: Callable[..., ContainerCluster], record_property: Callable[..., None]
) -> None:
    from tests.support.history import History

    c = cluster_factory(shards=2, replicas=3, brokers=2, election_timeout_ms=ELECTION_MS)
    admin = c.client(timeout_s=10)
    ring = ring_from_status(admin.status(), shards=2)
    keys = {s: keys_for_shard(s, 4, ring, prefix=f"run{s}-") for s in (0, 1)}
    seq_keys = {s: keys_for_shard(s, 1, ring, prefix=f"runseq{s}-")[0] for s in (0, 1)}
    orders = [["broker0", "broker1"], ["broker1", "broker0"]]
    turn = iter(range(1_000_000))

    def client() -> Any:
        return c.client(orders[next(turn) % 2], timeout_s=8)

    history = History()
    # One load per shard: a worker blocked on one shard must not stall the other's
    # writes, or the unaffected shard's gap would only echo the affected one's.
    loads = {s: Load(history, client, keys[s], processes=2, name=f"run{s}").start() for s in (0, 1)}
    seqs = {s: Sequencer(client, k).start() for s, k in seq_keys.items()}
    _, leaders, _ = wait_settled(c, timeout_s=SETTLE_S)
    time.sleep(STEADY_S)

    phases: list[Phase] = []
    try:
        for name, shard in FAULTS:
            trouble = dns_trouble(c)
            assert not trouble, f"before {name}: {trouble}"
            p = Phase(name, shard, leaders[shard])
            phases.append(p)
            wall = time.strftime("%H:%M:%S", time.gmtime()) + f".{int(time.time() % 1 * 1000):03d}"
            apply_fault(c, p)
            time.sleep(max(0.0, p.applied_at + HOLD_S - time.monotonic()))
            heal_fault(c, p)
            p.healed_at = time.monotonic()
            p.settled_at, leaders, p.trace = wait_settled(c, timeout_s=SETTLE_S)
            if name == "disconnect":  # the old address stays taken until settled
                unsquat(c)
            time.sleep(STEADY_S)
            p.end = time.monotonic()
            print(
                f"{wall} {name} on {p.target} (shard {shard}) {p.note}: applied in "
                f"{p.applied_at - p.fault_at:.2f}s, settled "
                f"{p.settled_at - p.healed_at:.2f}s after heal, leaders now {leaders}\n"
                f"    after heal: {p.trace}"
            )
    finally:
        stats = {s: ld.stop() for s, ld in loads.items()}
        last = {s: q.stop() for s, q in seqs.items()}
        save_logs(c)

    print(
        f"load ops {[st.ops for st in stats.values()]}, errors "
        f"{[dict(st.errors) for st in stats.values()]}; sequencers {last} "
        f"errors {[dict(q.errors) for q in seqs.values()]}"
    )
    print(
        f"{'fault':<22} {'shard':>5} {'target':>6} {'unavail s':>9} {'other s':>8} {'settle s':>8}"
    )
    rows = []
    for p in phases:
        gap, began = longest_ack_gap(stats[p.shard], keys[p.shard], p.fault_at, p.end)
        other, _ = longest_ack_gap(stats[1 - p.shard], keys[1 - p.shard], p.fault_at, p.end)
        settle = p.settled_at - p.healed_at
        rows.append((p, gap, settle))
        tag = p.name.replace(" ", "_").replace("->", "_to_").replace("+", "_")
        record_property(f"{tag}_unavailability_s", round(gap, 3))
        record_property(f"{tag}_other_shard_gap_s", round(other, 3))
        record_property(f"{tag}_settle_s", round(settle, 3))
        print(
            f"{p.name:<22} {p.shard:>5} {p.target:>6} {gap:>9.3f} {other:>8.3f} "
            f"{settle:>8.3f}   (gap began {began - p.fault_at:+.3f}s after the fault)"
        )

    try:
        final_reads(history, admin, [*keys[0], *keys[1]])
        for q in seqs.values():
            q.verify(admin)
        result = check_history(history)
        assert result.ok, f"history not linearizable: {result}"
    finally:
        close_client(admin)
    assert all(v > 0 for v in last.values()), f"a sequencer acknowledged nothing: {last}"
    slow = [(p.name, round(gap, 3)) for p, gap, _ in rows if gap > GAP_MAX_S]
    assert not slow, f"faults that left their shard without acknowledged writes too long: {slow}"


def test_longest_ack_gap() -> None:
    """The measure itself: from the last ack before the fault, through every ack, to the
    end of the window (a shard silent until the end counts all of it)."""
    from tests.containers.workload import Acked, LoadStats

    stats = LoadStats(acked_writes=[Acked("a", b"", 0, t) for t in (0.5, 1.0, 3.5, 4.0)])
    stats.acked_writes.append(Acked("b", b"", 0, 2.0))  # another shard's key
    assert longest_ack_gap(stats, ["a"], 1.2, 5.0) == (2.5, 1.0)
    assert longest_ack_gap(stats, ["a"], 4.5, 9.0) == (5.0, 4.0)
    assert longest_ack_gap(stats, ["c"], 1.0, 2.0) == (1.0, 1.0)
