"""A Jepsen-style history recorder: who invoked what, and what came back.

A test calls ``invoke`` just before it sends a request and ``ok`` / ``fail`` / ``info``
once it knows the outcome:

- ``ok(op_id, result)``: the operation took effect (or, for a read, observed ``result``);
- ``fail(op_id)``: the operation definitely did NOT take effect (a typed refusal such as
  NOT_LEADER before anything was proposed); the checker drops it;
- ``info(op_id)``: unknown outcome (timeout, connection lost): it may take effect at any
  time after its invocation, or never. Operations still open when the history is read
  are treated as ``info``.

Real-time order. Every event takes a global sequence number under a lock; the checker
orders events by that number, not by the timestamps. Since ``invoke`` is recorded before
the request leaves and ``ok`` after the reply arrived, "A's ok was recorded before B's
invoke" implies A really finished before B started, which is all linearizability needs.
Timestamps (``time.monotonic_ns`` unless a ``clock`` is given, e.g. a simulated clock)
are kept for humans reading a dump.

Thread-safe; each call holds a plain lock for a few dict operations, so it is also fine
to call from asyncio code (nothing blocks or awaits).

Result shapes understood by ``tests.support.lincheck``:
  put    -> version (int) or None
  get    -> (value or None, version) or just value
  cas    -> (swapped, version) or just swapped
  delete -> deleted (bool) or (deleted, version)
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

OPS = ("put", "get", "cas", "delete")
STATUSES = ("ok", "fail", "info")


@dataclass(frozen=True, slots=True)
class Operation:
    """One operation with its outcome; ``complete_seq`` is None for info (never returned)."""

    op_id: int
    process: int
    op: str
    key: Any
    value: Any
    expected: Any
    status: str  # "ok" | "fail" | "info"
    result: Any
    invoke_seq: int
    complete_seq: int | None
    invoke_ns: int
    complete_ns: int | None


@dataclass(frozen=True, slots=True)
class Event:
    """One line of the history: an invocation or a completion, in recorded order."""

    seq: int
    kind: str  # "invoke" | "ok" | "fail" | "info"
    op_id: int
    process: int
    op: str
    key: Any
    value: Any
    expected: Any
    result: Any
    time_ns: int


class History:
    def __init__(self, clock: Callable[[], int] | None = None) -> None:
        self._clock = clock or time.monotonic_ns
        self._lock = threading.Lock()
        self._seq = 0
        self._invokes: dict[int, Event] = {}
        self._completions: dict[int, Event] = {}

    # ------------------------------------------------------------------ recording

    def invoke(
        self,
        process: int,
        op: str,
        key: Any,
        value: Any = None,
        expected: Any = None,
    ) -> int:
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; expected one of {OPS}")
        with self._lock:
            self._seq += 1
            op_id = len(self._invokes)
            self._invokes[op_id] = Event(
                self._seq, "invoke", op_id, process, op, key, value, expected, None,
                self._clock(),
            )  # fmt: skip
            return op_id

    def ok(self, op_id: int, result: Any = None) -> None:
        self._complete(op_id, "ok", result)

    def fail(self, op_id: int) -> None:
        self._complete(op_id, "fail", None)

    def info(self, op_id: int) -> None:
        self._complete(op_id, "info", None)

    def _complete(self, op_id: int, kind: str, result: Any) -> None:
        with self._lock:
            inv = self._invokes.get(op_id)
            if inv is None:
                raise KeyError(f"op {op_id} was never invoked")
            if op_id in self._completions:
                raise ValueError(f"op {op_id} already completed as {self._completions[op_id].kind}")
            self._seq += 1
            self._completions[op_id] = Event(
                self._seq, kind, op_id, inv.process, inv.op, inv.key, inv.value,
                inv.expected, result, self._clock(),
            )  # fmt: skip

    # ------------------------------------------------------------------ reading

    def __len__(self) -> int:
        with self._lock:
            return len(self._invokes)

    def to_events(self) -> list[Event]:
        """Every event in recorded (real-time) order."""
        with self._lock:
            events = list(self._invokes.values()) + list(self._completions.values())
        events.sort(key=lambda e: e.seq)
        return events

    def operations(self) -> list[Operation]:
        """One record per operation; open operations are reported as ``info``."""
        with self._lock:
            invokes = list(self._invokes.values())
            completions = dict(self._completions)
        out = []
        for inv in invokes:
            done = completions.get(inv.op_id)
            status = done.kind if done is not None else "info"
            returned = done is not None and status != "info"
            out.append(
                Operation(
                    inv.op_id, inv.process, inv.op, inv.key, inv.value, inv.expected,
                    status,
                    done.result if done is not None else None,
                    inv.seq,
                    done.seq if returned and done is not None else None,
                    inv.time_ns,
                    done.time_ns if done is not None else None,
                )
            )  # fmt: skip
        return out

    def to_json(self) -> str:
        """All events as JSON lines-in-a-list, for a failed run's artefact."""
        return json.dumps([asdict(e) for e in self.to_events()], default=_jsonable, indent=0)

    def dump(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as fh:
            fh.write(self.to_json())


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, bytes | bytearray):
        try:
            return bytes(obj).decode("utf-8")
        except UnicodeDecodeError:
            return bytes(obj).hex()
    if isinstance(obj, set | frozenset):
        return sorted(obj, key=repr)
    return repr(obj)
