"""One get's loop turn through the node core, in process: what a turn's Python costs.

A lone-voter leader (1 x 1, the shape of ``make bench``'s one-get-at-a-time target)
is fed one linearizable get per turn the way ``storage_node/node.py`` does: the
request, the ready rounds, the replies taken, the timers, the migration pump, the
heartbeat check. No sockets, no disk: the zmq calls and syscalls around a turn are
measured by ``bench.round_trips`` against the relay; this isolates the Python.

Two shapes alternate in one run, the best of ``--repeat`` timings each:

- **timers every turn**: ``NodeCore.tick`` on every turn (the node's loop before
  ``timers_due``);
- **timers paced**: ``tick_when_due``, as the node's loop does now: ``tick`` when
  ``timers_due`` says (once per ``TIMER_STEP_S``), else ``turn``. Turns are ``--gap-us`` apart (a get's round
  trip), so about one turn in ``TIMER_STEP_S / gap`` runs the timers.

    python -m bench.node_turn [--turns 20000] [--repeat 5] [--gap-us 500] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zkv.protocol import codec
from zkv.protocol.messages import Campaign, Consistency, GetRequest, PutRequest
from zkv.protocol.ring import Ring, RingConfig
from zkv.storage_node.durable_state import HardState
from zkv.storage_node.node_core import NodeCore, NodeCoreConfig
from zkv.storage_node.push import LeaderTasks
from zkv.storage_node.replica import Replica, ReplicaConfig
from zkv.storage_node.state_machine import KVStateMachine

BROKER = "broker"  # the origin every request comes from
WALL_MS = 1_000


def lone_leader() -> NodeCore:
    """A 1-voter shard's node core, elected, holding one key."""
    ring = RingConfig(1, (0,), 16)
    members = ("a",)
    core = NodeCore(NodeCoreConfig("a", 0, members),
                    Replica(ReplicaConfig("a", members), HardState(0, ""), []),
                    KVStateMachine(shard_id=0, ring=ring), Ring(ring), LeaderTasks())
    core.on_broker_frames(BROKER, [b"", *codec.encode(Campaign(0, 0, "b1"))], 1.0, 0)
    for _ in range(3):
        _ready_rounds(core)
        core.tick(1.0, WALL_MS)
    put = PutRequest(b"bench", 1, b"key", 1, b"v" * 100)
    core.on_broker_frames(BROKER, [b"client", *codec.encode(put)], 1.0, WALL_MS)
    _ready_rounds(core)
    core.take_outgoing()
    return core


def _ready_rounds(core: NodeCore) -> None:
    """The shell's ready rounds, persisting at once (memory stands in for the WAL)."""
    while core.has_ready():
        nrd = core.ready()
        if nrd.raft.entries:
            core.replica.persisted(nrd.raft.entries[-1].index)
        core.advance(nrd)
    core.settle()


def turn_fn(core: NodeCore, paced: bool, gap_s: float) -> Callable[[], None]:
    """One turn of ``node.py``'s loop for one get, ``gap_s`` after the previous."""
    frames = [b"client", *codec.encode(GetRequest(b"bench", 2, b"key", Consistency.LINEARIZABLE))]
    clock = [2.0]

    def turn() -> None:
        now = clock[0] = clock[0] + gap_s
        core.on_broker_frames(BROKER, frames, now, WALL_MS)
        if core.has_ready():
            _ready_rounds(core)
        if not core.take_outgoing():
            raise RuntimeError("the get was not answered in its turn")
        if paced:
            core.tick_when_due(now, WALL_MS)
        else:
            core.tick(now, WALL_MS)
        _ready_rounds(core)
        core.pump_tasks(now)
        core.take_outgoing()
        core.heartbeat(now)
        core.busy()

    return turn


def measure(turns: int, repeat: int, gap_s: float) -> dict[str, float]:
    """Microseconds per turn, best of ``repeat`` alternating timings of each shape."""
    core = lone_leader()
    shapes = {"every_turn": turn_fn(core, False, gap_s), "paced": turn_fn(core, True, gap_s)}
    best = dict.fromkeys(shapes, float("inf"))
    for _ in range(repeat):
        for name, fn in shapes.items():
            best[name] = min(best[name], timeit.timeit(fn, number=turns) / turns * 1e6)
    return {"every_turn_us": best["every_turn"], "paced_us": best["paced"],
            "paced_ratio": best["paced"] / best["every_turn"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--turns", type=int, default=20_000)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--gap-us", type=float, default=500.0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.turns < 1 or args.repeat < 1 or args.gap_us <= 0:
        p.error("need --turns >= 1, --repeat >= 1, --gap-us > 0")
    result = measure(args.turns, args.repeat, args.gap_us / 1e6)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"one get's turn through the node core, best of {args.repeat} x {args.turns:,}:")
        print(f"  timers every turn   {result['every_turn_us']:.1f} us")
        print(f"  timers paced        {result['paced_us']:.1f} us "
              f"({result['paced_ratio']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
