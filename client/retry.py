"""The SDK's retry policy: after each attempt of a request, what to do next. Pure.

Both ``KVClient`` (sync) and ``AsyncKVClient`` (asyncio) run the same loop: send the
request's frames to a broker, wait for an outcome, ask ``decide`` what to do, do it. This
module is that decision, with no socket, no clock read and no global random: the caller
passes the time and a seeded ``random.Random``, so the rules are tested without either.

Rules, in order (``CallState`` carries what the rules need from earlier attempts):

1. A reply that is not an error, or an error that is not retryable, ends the call:
   ``DONE`` returns it; a non-retryable ``ErrorReply`` is ``FAIL`` with the typed
   exception ``error_for_code`` maps it to (``BadRequest``, ``TooLarge``, ...).
2. Silence on a connection that heard nothing at all since the attempt was sent: the
   connection is presumed dead (the ZeroMQ Guide's Lazy Pirate). ``SWITCH`` with
   ``reset``: close it (linger 0) and resend at once on a new connection to the next
   broker, round robin (the same broker when there is only one).
3. Silence while the connection kept answering other requests (asyncio pipelining):
   this request is slow or its reply was lost; ``RETRY`` at once on the same broker.
4. ``NO_LEADER`` or ``UNAVAILABLE``: the *broker* cannot help (it hears no leader, or
   cannot reach the shard), and another broker may hear the nodes better: ``SWITCH`` to
   the next broker. The first refusals of a round switch at once; when every broker has
   refused in a row the switch waits a backoff, so a real election costs a few requests
   per broker, not a busy loop. With one broker this is a ``RETRY`` after a backoff.
5. ``NOT_LEADER``, ``WRONG_SHARD``, ``TIMEOUT`` from the server: the broker reached a
   node and will know better shortly (its table or ring is catching up): ``RETRY`` on
   the same broker after a backoff.
6. Backoff: exponential from 10 ms doubling to 200 ms, with jitter over the upper half.
7. Give up (``FAIL`` with ``Timeout``, its cause the last retryable error) when the next
   attempt would start at or after the deadline, or when ``retries`` resends are spent.
   A ``Timeout`` on a write means the outcome is unknown. A call that gives up where it
   would have switched still names the next broker (``Decision.endpoint``, with
   ``reset``): the caller's *next* call goes there, so a client whose deadline fits one
   attempt (any ``timeout_s`` <= the attempt timeout) still leaves a dead broker.

Exactly-once: the policy never changes a request; the caller resends *the same frames*
(client id, request id) on every attempt, to whichever broker, so a node that already
applied a write answers from its session table instead of applying it twice.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, replace

from zkv.protocol.errors import (
    RETRYABLE_CODES,
    ErrorCode,
    KVError,
    RequestError,
    Timeout,
    error_for_code,
)
from zkv.protocol.messages import ErrorReply, Message

ATTEMPT_TIMEOUT_S_MAX = 1.0
BACKOFF_S_MIN = 0.010
BACKOFF_S_MAX = 0.200
#: Codes that say the broker itself cannot serve the shard: try another broker.
BROKER_REFUSAL_CODES: frozenset[ErrorCode] = frozenset(
    {ErrorCode.NO_LEADER, ErrorCode.UNAVAILABLE}
)


class Silence(enum.Enum):
    """An attempt that got no reply before its attempt timeout."""

    CONNECTION = "connection"  # nothing at all arrived on the connection since the send
    REQUEST = "request"  # other replies arrived: only this request went unanswered


class Action(enum.Enum):
    DONE = "done"  # hand the reply to the caller
    RETRY = "retry"  # resend the same frames to the same broker after ``pause_s``
    SWITCH = "switch"  # resend the same frames to broker ``endpoint`` after ``pause_s``
    FAIL = "fail"  # raise ``error``


@dataclass(frozen=True, slots=True)
class CallState:
    """One call's retry state. ``attempt``: attempts made; ``refusals``: broker
    refusals (rule 4) in a row; ``endpoint``: index of the broker attempts go to."""

    request_id: int
    deadline: float
    total_s: float
    endpoints: int
    endpoint: int = 0
    retries: int | None = None
    attempt: int = 0
    refusals: int = 0
    last_error: KVError | None = None
    #: the last error the cluster answered (a silence that follows does not hide it)
    last_answer: KVError | None = None

    @classmethod
    def start(
        cls, request_id: int, now: float, total_s: float, endpoints: int, endpoint: int = 0,
        retries: int | None = None,
    ) -> CallState:
        if total_s <= 0:
            raise ValueError("timeout must be > 0")
        if endpoints < 1 or not 0 <= endpoint < endpoints:
            raise ValueError("need endpoints >= 1 and 0 <= endpoint < endpoints")
        return cls(request_id, now + total_s, total_s, endpoints, endpoint, retries)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do next. ``state`` is the call's state for the next attempt; ``reset``
    (on ``SWITCH``): the connection left behind is presumed dead, close it."""

    action: Action
    state: CallState
    pause_s: float = 0.0
    reset: bool = False
    error: KVError | None = None
    reply: Message | None = None

    @property
    def endpoint(self) -> int:
        return self.state.endpoint


def backoff_s(attempt: int, rng: random.Random) -> float:
    """Exponential backoff from 10 ms, capped at 200 ms, with full jitter on the upper half."""
    ceiling = min(BACKOFF_S_MAX, BACKOFF_S_MIN * float(2 ** min(attempt, 16)))
    return ceiling / 2 + rng.random() * ceiling / 2


def attempt_until(state: CallState, now: float, attempt_timeout_s: float | None) -> float:
    """When an attempt sent at ``now`` stops waiting: the attempt timeout (default
    ``min(1 s, timeout)``) or the call's deadline, whichever comes first."""
    attempt_s = attempt_timeout_s or min(ATTEMPT_TIMEOUT_S_MAX, state.total_s)
    return min(state.deadline, now + attempt_s)


def decide(
    state: CallState, outcome: Message | Silence, now: float, rng: random.Random
) -> Decision:
    """The next step after attempt ``state.attempt + 1`` ended with ``outcome`` at ``now``."""
    if isinstance(outcome, Silence):
        after = replace(state, attempt=state.attempt + 1, last_error=Timeout(
            f"no reply from broker {state.endpoint} (attempt {state.attempt + 1})"))
        if outcome is Silence.CONNECTION:
            return _go(after, Action.SWITCH, now, 0.0, reset=True)
        return _go(after, Action.RETRY, now, 0.0)
    if not isinstance(outcome, ErrorReply):
        return Decision(Action.DONE, state, reply=outcome)
    error = error_for_code(outcome.code, outcome.message, outcome.leader_hint, outcome.epoch)
    if outcome.code not in RETRYABLE_CODES:
        return Decision(Action.FAIL, state, error=error, reply=outcome)
    after = replace(state, attempt=state.attempt + 1, last_error=error, last_answer=error)
    if outcome.code in BROKER_REFUSAL_CODES and state.endpoints > 1:
        refusals = state.refusals + 1
        after = replace(after, refusals=refusals)
        pause = 0.0 if refusals % state.endpoints else backoff_s(state.attempt, rng)
        return _go(after, Action.SWITCH, now, pause)
    after = replace(after, refusals=0)
    return _go(after, Action.RETRY, now, backoff_s(state.attempt, rng))


def _go(state: CallState, action: Action, now: float, pause_s: float,
        reset: bool = False) -> Decision:
    """``action`` unless the call must give up first (rule 7)."""
    out_of_retries = state.retries is not None and state.attempt > state.retries
    give_up = now + pause_s >= state.deadline or out_of_retries
    if action is Action.SWITCH:
        state = replace(state, endpoint=(state.endpoint + 1) % state.endpoints)
    if give_up:
        what = "retries" if out_of_retries else "deadline"
        answer = state.last_answer
        told = "" if answer is None or answer is state.last_error else (
            f"; last answer: {describe(answer)}")
        error = Timeout(
            f"request {state.request_id} got no answer ({what} exhausted after "
            f"{state.attempt} attempts, {state.total_s:g}s; last: {describe(state.last_error)}"
            f"{told})"
        )
        error.__cause__ = state.last_error
        # the next call goes where this one would have gone on (rule 7)
        return Decision(Action.FAIL, state, error=error, reset=reset)
    return Decision(action, state, pause_s, reset)


def describe(error: KVError | None) -> str:
    if error is None:
        return "nothing"
    if isinstance(error, RequestError):
        hint = f" (leader hint {error.leader_hint})" if error.leader_hint else ""
        # the server's reason, when it gave one ("removing b would leave ...")
        why = f": {error.message}" if error.message and error.message != error.code.name else ""
        return f"{error.code.name}{hint}{why}"
    return str(error)
