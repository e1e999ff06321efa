"""One PySyncObj node of ``bench/peers.py``: our own harness for PySyncObj's method.

Runs under the separate ``.venv-peers`` interpreter (``pysyncobj`` is never a zkv
dependency), so it imports nothing from zkv. The method is the one of PySyncObj's
``benchmarks/testobj.py``: a node with a replicated method that only counts, default
``SyncObjConf``; wait for a leader, settle 4 s, then for 25 s submit ``rate`` commands of
``size`` random hex characters at the start of every second (a second whose submission
overruns it fails the run, as their harness's ``assert`` does), wait 4 s for the last
callbacks, and report the share that succeeded. Prints one JSON line and exits 0.

    python bench/peers_pso.py RATE SIZE SELF_ADDR PEER_ADDR...
"""

from __future__ import annotations

import json
import random
import sys
import time

from pysyncobj import FAIL_REASON, SyncObj, replicated  # type: ignore[import-not-found]

SETTLE_S = 4.0
DURATION_S = 25.0
DRAIN_S = 4.0
LEADER_WAIT_S = 60.0


class Counter(SyncObj):  # type: ignore[misc]
    def __init__(self, self_addr: str, peers: list[str]) -> None:
        super().__init__(self_addr, peers)
        self.applied = 0

    @replicated  # type: ignore[misc]
    def put(self, value: str) -> None:
        self.applied += 1


def main(argv: list[str]) -> int:
    rate, size, self_addr, peers = int(argv[0]), int(argv[1]), argv[2], argv[3:]
    node = Counter(self_addr, peers)
    counts = {"ok": 0, "err": 0}

    def done(_res: object, err: object) -> None:
        counts["ok" if err == FAIL_REASON.SUCCESS else "err"] += 1

    deadline = time.time() + LEADER_WAIT_S
    while node._getLeader() is None and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(SETTLE_S)
    sent, overran = 0, False
    start = time.time()
    rng = random.Random()
    fmt = f"%0{size}x"
    while time.time() - start < DURATION_S:
        t0 = time.time()
        for _ in range(rate):
            node.put(fmt % rng.randrange(16**size), callback=done)
            sent += 1
        spent = time.time() - t0
        if spent > 1.0:
            overran = True
            break
        time.sleep(1.0 - spent)
    time.sleep(DRAIN_S)
    success = 0.0 if overran or not sent else counts["ok"] / sent
    print(json.dumps({"sent": sent, "ok": counts["ok"], "err": counts["err"],
                      "overran": overran, "success": success}), flush=True)
    node.destroy()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
