"""Linearizability checker for zkv histories (Wing & Gong search, Lowe's memoization).

Algorithm. Per key (P-compositionality: a history is linearizable iff each key's
sub-history is), build the doubly linked list of call/return entries in real-time
order. Walk it depth-first as Porcupine does: at a call entry, try to linearize that
operation now (the model accepts its result from the current state); if the pair
(bitset of linearized ops, model state) was never seen, lift the call and its return
out of the list and restart from the head; at a return entry whose call is still in
the list, that operation cannot be postponed any further: backtrack. The cache of
(bitset, state) pairs is what keeps the search polynomial in practice. The walk is
bounded by ``steps_max``: past it the answer is "unknown", never a hang.

Info operations (timeouts) have their return at +infinity: they may be linearized at
any point after their invocation or never. The search succeeds as soon as every
*completed* operation is linearized, whatever info operations remain. Failed
operations and info reads are dropped before the search (they constrain nothing).

Model: a register per key whose state is ``(value, version, floor)``.

- ``value`` is None when the key is absent; ``version`` is the key's version (the log
  index of its last write, 0 when absent); ``floor`` is a strict lower bound for any
  version the key may get next (versions are log indices, so they only grow).
- A write whose outcome is unknown (info) gives the key a version we never saw: the
  state keeps ``version = None`` ("some version > floor"). The unknown is bound just in
  time: the first get or cas that reports a version in that state fixes it (that
  binding lives only on the current search path, so no guess leaks to another branch).
- put(v) ok -> r: r must exceed the current version (or floor); the state becomes
  (v, r, r). Without a reported version, (v, None, old).
- get ok -> (v, r): v must equal the value; r must equal the version (binding an
  unknown one if r > floor). A bare value result skips the version check.
- delete ok -> deleted: deleted == key present; state becomes (None, 0, floor).
- delete(expected=E) ok -> (deleted, r) (a conditional delete, E >= 1): deleted requires
  version == E and gives (None, 0, max(E, r)) (r is the delete's own version); not
  deleted with r == 0 requires the key absent; not deleted with r > 0 requires the key
  present at version r != E (binding an unknown version like a get). An info one may
  have deleted only where the version may be E.
- cas(expected=E, v) ok -> (swapped, r): swapped requires version == E (0 = absent) and
  gives (v, r, r) with r > E; not swapped requires version != E, and r, if given, is
  the key's current version.
- Info writes branch: a cas whose current version is unknown may have swapped or not.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tests.support.history import History, Operation

STEPS_MAX_DEFAULT = 2_000_000
_INITIAL = (None, 0, 0)
_WINDOW_BEFORE = 6


@dataclass(frozen=True, slots=True)
class CheckResult:
    ok: bool
    key: Any = None
    explanation: str = ""
    ops_checked: int = 0
    unknown: bool = False  # the step bound was hit: neither proven nor refuted

    @property
    def status(self) -> str:
        return "ok" if self.ok else ("unknown" if self.unknown else "violation")


# --------------------------------------------------------------------------- model


def _split(result: Any) -> tuple[Any, Any]:
    """(first, version) from a tuple/list result, or (result, None)."""
    if isinstance(result, tuple | list) and len(result) == 2:
        return result[0], result[1]
    return result, None


def _known_floor(state: tuple[Any, Any, int]) -> int:
    return state[1] if state[1] is not None and state[0] is not None else state[2]


def step(state: tuple[Any, Any, int], op: Operation) -> list[tuple[Any, Any, int]]:
    """Every state the register can be in after ``op`` from ``state`` ([] = impossible)."""
    value, version, floor = state
    info = op.status == "info"
    kind = op.op
    if kind == "get":
        rv, rver = _split(op.result)
        if rv != value:
            return []
        if rver is None:
            return [state]
        if version is None:
            return [(value, rver, rver)] if rver > floor else []
        return [state] if rver == version else []
    if kind == "put":
        base = _known_floor(state)
        rver = None if info else op.result
        if rver is None:
            return [(op.value, None, base)]
        return [(op.value, rver, rver)] if rver > base else []
    if kind == "delete" and op.expected is not None:
        return _delete_if(state, op, info)
    if kind == "delete":
        after = (None, 0, _known_floor(state))
        if info:
            return [after]
        deleted, _ = _split(op.result)
        return [after] if bool(deleted) == (value is not None) else []
    if kind == "cas":
        return _cas(state, op, info)
    raise ValueError(f"unknown op {kind!r}")


def _cas(state: tuple[Any, Any, int], op: Operation, info: bool) -> list[tuple[Any, Any, int]]:
    value, version, floor = state
    expected = op.expected
    current = 0 if value is None else version  # None = unknown
    if info:
        if current is None:
            return [(op.value, None, expected), state] if expected > floor else [state]
        return [(op.value, None, expected)] if current == expected else [state]
    swapped, rver = _split(op.result)
    if swapped:
        if current is not None and current != expected:
            return []
        if current is None and expected <= floor:
            return []
        if rver is None:
            return [(op.value, None, expected)]
        return [(op.value, rver, rver)] if rver > expected else []
    if current is None:
        if rver is None:
            return [state]
        return [(value, rver, rver)] if rver != expected and rver > floor else []
    if current == expected:
        return []
    return [state] if rver is None or rver == current else []


def _delete_if(state: tuple[Any, Any, int], op: Operation, info: bool
               ) -> list[tuple[Any, Any, int]]:
    value, version, floor = state
    expected = op.expected
    if value is None:  # absent: nothing to delete, whatever E says
        return [state] if info or _split(op.result) == (False, 0) else []
    if info:
        if version is None:
            return [(None, 0, expected), state] if expected > floor else [state]
        return [(None, 0, expected)] if version == expected else [state]
    deleted, rver = _split(op.result)
    if deleted:
        if (version is None and expected <= floor) or version not in (None, expected):
            return []
        return [(None, 0, max(expected, rver or 0))]
    if rver is None or rver == expected or rver == 0:
        return []
    if version is None:
        return [(value, rver, rver)] if rver > floor else []
    return [state] if rver == version else []


# --------------------------------------------------------------------------- search


def check(
    history: History | Iterable[Operation], steps_max: int = STEPS_MAX_DEFAULT
) -> CheckResult:
    """Check every key; the first key that is not linearizable (or too hard) is reported."""
    ops = history.operations() if isinstance(history, History) else list(history)
    by_key: dict[Any, list[Operation]] = {}
    for op in ops:
        if op.status == "fail" or (op.op == "get" and op.status == "info"):
            continue
        by_key.setdefault(_hashable(op.key), []).append(op)
    checked = 0
    for key in sorted(by_key, key=repr):
        res = check_key(key, by_key[key], steps_max)
        checked += res.ops_checked
        if not res.ok:
            return CheckResult(False, key, res.explanation, checked, res.unknown)
    return CheckResult(True, None, "linearizable", checked)


def _hashable(key: Any) -> Any:
    return bytes(key) if isinstance(key, bytearray) else key


def check_key(key: Any, ops: list[Operation], steps_max: int = STEPS_MAX_DEFAULT) -> CheckResult:
    n = len(ops)
    if n == 0:
        return CheckResult(True, key, "empty", 0)
    # Entries: call of op i = 2i, return = 2i+1; head sentinel = 2n. Info returns last.
    inf = float("inf")
    order = sorted(
        [(op.invoke_seq, 2 * i) for i, op in enumerate(ops)]
        + [
            (op.complete_seq if op.complete_seq is not None else inf, 2 * i + 1)
            for i, op in enumerate(ops)
        ]
    )
    head = 2 * n
    nxt = [-1] * (2 * n + 1)
    prv = [-1] * (2 * n + 1)
    last = head
    for _, e in order:
        nxt[last] = e
        prv[e] = last
        last = e
    completed_total = sum(1 for op in ops if op.status == "ok")

    def lift(c: int) -> None:
        r = c + 1
        nxt[prv[c]] = nxt[c]
        if nxt[c] != -1:
            prv[nxt[c]] = prv[c]
        nxt[prv[r]] = nxt[r]
        if nxt[r] != -1:
            prv[nxt[r]] = prv[r]

    def unlift(c: int) -> None:
        r = c + 1
        nxt[prv[r]] = r
        if nxt[r] != -1:
            prv[nxt[r]] = r
        nxt[prv[c]] = c
        if nxt[c] != -1:
            prv[nxt[c]] = c

    cache: set[tuple[int, Any]] = set()
    stack: list[tuple[int, Any, list[Any], int]] = []
    state: Any = _INITIAL
    lin = 0
    done = 0  # completed (ok) ops linearized on the current path
    best: tuple[int, list[int], Any, int] = (-1, [], _INITIAL, 0)
    entry = nxt[head]
    steps = 0

    def try_branches(c: int, succs: list[Any], start: int) -> int:
        bit = lin | (1 << (c >> 1))
        for k in range(start, len(succs)):
            sig = (bit, succs[k])
            if sig not in cache:
                cache.add(sig)
                return k
        return -1

    while done < completed_total:
        steps += 1
        if steps > steps_max:
            return CheckResult(
                False, key,
                f"key {key!r}: search gave up after {steps_max} steps ({n} ops); "
                "result unknown (history too concurrent or too many timeouts)",
                n, unknown=True,
            )  # fmt: skip
        if entry & 1 == 0:
            i = entry >> 1
            succs = step(state, ops[i])
            k = try_branches(entry, succs, 0) if succs else -1
            if k >= 0:
                stack.append((entry, state, succs, k))
                state = succs[k]
                lin |= 1 << i
                done += ops[i].status == "ok"
                lift(entry)
                entry = nxt[head]
            else:
                entry = nxt[entry]
            continue
        # A return entry whose call is still pending: this path is dead.
        if done > best[0]:
            best = (done, [f[0] >> 1 for f in stack], state, entry >> 1)
        if not stack:
            return _violation(key, ops, best, n)
        c, prev_state, succs, k = stack.pop()
        i = c >> 1
        lin &= ~(1 << i)
        done -= ops[i].status == "ok"
        unlift(c)
        state = prev_state
        k2 = try_branches(c, succs, k + 1)
        if k2 >= 0:  # another outcome of the same op (info writes branch)
            stack.append((c, state, succs, k2))
            state = succs[k2]
            lin |= 1 << i
            done += ops[i].status == "ok"
            lift(c)
            entry = nxt[head]
        else:
            entry = nxt[c]  # never -1: c's own return follows it
    return CheckResult(True, key, "linearizable", n)


# --------------------------------------------------------------------------- reporting


def describe(op: Operation) -> str:
    args = {"put": f"{op.value!r}", "get": "",
            "delete": "" if op.expected is None else f"expected={op.expected!r}"}.get(
        op.op, f"expected={op.expected!r}, {op.value!r}"
    )
    outcome = f"-> {op.result!r}" if op.status == "ok" else f"[{op.status}]"
    end = op.complete_seq if op.complete_seq is not None else "inf"
    return (
        f"#{op.op_id} p{op.process} {op.op}({args}) {outcome}  "
        f"(events {op.invoke_seq}..{end})"
    )


def _violation(key: Any, ops: list[Operation], best: Any, n: int) -> CheckResult:
    _, order, state, stuck_i = best
    stuck = ops[stuck_i]
    lines = [
        f"key {key!r}: not linearizable.",
        f"Longest linearizable prefix: {len(order)} ops; state then (value, version, "
        f"floor) = {state!r}.",
        f"Op that cannot be placed next (it must return before anything still pending): "
        f"{describe(stuck)}",
        "Last ops of that prefix, in linearization order:",
    ]
    lines += ["  " + describe(ops[i]) for i in order[-_WINDOW_BEFORE:]]
    placed = set(order)
    pending = [
        op
        for i, op in enumerate(ops)
        if i not in placed
        and i != stuck_i
        and op.invoke_seq < (stuck.complete_seq or float("inf"))
        and (op.complete_seq is None or op.complete_seq > stuck.invoke_seq)
    ]
    lines.append("Ops concurrent with it and not yet placed:")
    lines += ["  " + describe(op) for op in pending[:12]] or ["  (none)"]
    return CheckResult(False, key, "\n".join(lines), n)
