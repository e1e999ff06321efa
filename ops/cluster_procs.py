"""The children of a ``LocalCluster``: which are alive, and the faults tests inject.

A mixin of ``LocalCluster`` (which holds ``brokers``, ``nodes`` and ``grace_s``). Node
faults keep the node's ports and data (a restart is the same node coming back); a
broker comes back on its own ports.
"""

from __future__ import annotations

import signal
from typing import TYPE_CHECKING

from zkv.ops.child import Child, kill, spawn
from zkv.ops.cluster_spec import ClusterError


class ClusterProcesses:
    """Process methods of ``LocalCluster`` (which provides the rest)."""

    if TYPE_CHECKING:
        brokers: list[Child]
        nodes: dict[str, Child]
        grace_s: float

    def _raise_if_dead(self) -> None:
        for c in [*self.brokers, *self.nodes.values()]:
            if c.proc is not None and c.proc.poll() is not None:
                raise ClusterError(f"{c.name} exited with code {c.proc.returncode} "
                                   f"(log {c.log_path}):\n{c.tail()}")

    def dead_children(self) -> list[Child]:
        """Children that exited and were not reported yet (marks them reported)."""
        out = []
        for c in [*self.brokers, *self.nodes.values()]:
            if c.proc is not None and c.proc.poll() is not None and not c.reported:
                c.reported = True
                out.append(c)
        return out

    # ------------------------------------------------------------------ faults

    def node_pid(self, node_id: str) -> int | None:
        c = self._node(node_id)
        return c.proc.pid if c.alive and c.proc is not None else None

    def broker_pid(self, i: int) -> int | None:
        c = self._broker(i)
        return c.proc.pid if c.alive and c.proc is not None else None

    def kill_node(self, node_id: str, sig: int = signal.SIGKILL) -> None:
        kill(self._node(node_id), sig, self.grace_s)

    def restart_node(self, node_id: str) -> None:
        """Kill (SIGKILL) the node if it runs, then start it again, same ports and data."""
        c = self._node(node_id)
        kill(c, signal.SIGKILL, self.grace_s)
        spawn(c)

    def kill_broker(self, i: int, sig: int = signal.SIGKILL) -> None:
        kill(self._broker(i), sig, self.grace_s)

    def restart_broker(self, i: int) -> None:
        c = self._broker(i)
        kill(c, signal.SIGKILL, self.grace_s)
        spawn(c)

    def _node(self, node_id: str) -> Child:
        try:
            return self.nodes[node_id]
        except KeyError:
            raise KeyError(f"no node {node_id!r} (have {', '.join(self.nodes)})") from None

    def _broker(self, i: int) -> Child:
        if not 0 <= i < len(self.brokers):
            raise IndexError(f"no broker {i} (have {len(self.brokers)})")
        return self.brokers[i]
