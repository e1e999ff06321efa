"""The SDK's retry policy (``client/retry.py``): a table of outcomes, give-up rules,
backoff bounds, and purity. No sockets, no clock."""

from __future__ import annotations

import ast
import random
from pathlib import Path

import pytest

from zkv.client import retry
from zkv.client.retry import (
    Action,
    CallState,
    Silence,
    attempt_until,
    backoff_s,
    decide,
)
from zkv.protocol.errors import (
    BadRequest,
    ErrorCode,
    NoLeader,
    SessionExpired,
    Timeout,
    TooLarge,
    Unavailable,
)
from zkv.protocol.messages import ErrorReply, Message, PongReply, PutReply

pytestmark = pytest.mark.unit

RID = 7


def start(endpoints: int = 2, endpoint: int = 0, total_s: float = 5.0,
          retries: int | None = None) -> CallState:
    return CallState.start(RID, 100.0, total_s, endpoints, endpoint, retries)


def err(code: ErrorCode, hint: str = "") -> ErrorReply:
    return ErrorReply(RID, code, "msg", hint)


@pytest.mark.parametrize(
    ("endpoints", "outcome", "action", "endpoint", "reset", "paused"),
    [
        # Silence on a connection that heard nothing: presumed dead, next broker at once.
        (2, Silence.CONNECTION, Action.SWITCH, 1, True, False),
        (1, Silence.CONNECTION, Action.SWITCH, 0, True, False),  # reconnect the only one
        # Silence while other replies arrive: this request is slow; resend, same broker.
        (2, Silence.REQUEST, Action.RETRY, 0, False, False),
        # The broker cannot reach a leader: another broker may (issue 10, item 2).
        (2, err(ErrorCode.NO_LEADER), Action.SWITCH, 1, False, False),
        (3, err(ErrorCode.UNAVAILABLE), Action.SWITCH, 1, False, False),
        (1, err(ErrorCode.NO_LEADER), Action.RETRY, 0, False, True),
        (1, err(ErrorCode.UNAVAILABLE), Action.RETRY, 0, False, True),
        # The broker reached a node and will know better shortly: same broker, backoff.
        (2, err(ErrorCode.NOT_LEADER, "s0r1"), Action.RETRY, 0, False, True),
        (2, err(ErrorCode.WRONG_SHARD), Action.RETRY, 0, False, True),
        (2, err(ErrorCode.TIMEOUT), Action.RETRY, 0, False, True),
    ],
)
def test_retry_table(endpoints: int, outcome: Message | Silence, action: Action,
                     endpoint: int, reset: bool, paused: bool) -> None:
    d = decide(start(endpoints), outcome, 100.5, random.Random(1))
    assert (d.action, d.endpoint, d.reset) == (action, endpoint, reset)
    assert (d.pause_s > 0) is paused
    assert d.state.attempt == 1 and d.state.request_id == RID
    assert d.error is None and d.reply is None


def test_answers_end_the_call() -> None:
    state = start()
    for reply in (PutReply(RID, 3), PongReply(RID, "b0")):
        d = decide(state, reply, 100.1, random.Random(1))
        assert d.action is Action.DONE and d.reply is reply and d.error is None


@pytest.mark.parametrize(
    ("code", "kind"),
    [(ErrorCode.BAD_REQUEST, BadRequest), (ErrorCode.TOO_LARGE, TooLarge),
     (ErrorCode.SESSION_EXPIRED, SessionExpired)],
)
def test_non_retryable_errors_fail_with_their_typed_exception(
    code: ErrorCode, kind: type[Exception],
) -> None:
    d = decide(start(), err(code), 100.1, random.Random(1))
    assert d.action is Action.FAIL and isinstance(d.error, kind)
    assert str(d.error) == "msg"


def test_refusals_switch_at_once_until_every_broker_refused_then_back_off() -> None:
    rng = random.Random(3)
    state = start(endpoints=3)
    seen = []
    for _ in range(7):
        d = decide(state, err(ErrorCode.NO_LEADER), 100.0, rng)
        assert d.action is Action.SWITCH
        seen.append((d.endpoint, d.pause_s > 0))
        state = d.state
    # b1, b2 at once; back to b0 only after a backoff, and so on round after round.
    assert seen == [(1, False), (2, False), (0, True), (1, False), (2, False), (0, True),
                    (1, False)]
    # A reply that shows a broker reaching the nodes starts a new round.
    d = decide(state, err(ErrorCode.NOT_LEADER), 100.0, rng)
    assert d.state.refusals == 0 and d.endpoint == state.endpoint


def test_give_up_at_the_deadline_with_the_last_error_as_cause() -> None:
    state = start(total_s=1.0)
    d = decide(state, err(ErrorCode.NO_LEADER), 100.2, random.Random(1))
    d = decide(d.state, Silence.CONNECTION, 101.0, random.Random(1))
    assert d.action is Action.FAIL and isinstance(d.error, Timeout)
    assert "deadline exhausted after 2 attempts" in str(d.error)
    assert isinstance(d.error.__cause__, Timeout)  # the silence, the latest
    d = decide(state, err(ErrorCode.UNAVAILABLE), 101.5, random.Random(1))
    assert isinstance(d.error, Timeout) and isinstance(d.error.__cause__, Unavailable)
    assert "UNAVAILABLE" in str(d.error)


def test_give_up_rather_than_back_off_past_the_deadline() -> None:
    state = start(endpoints=1, total_s=1.0)
    d = decide(state, err(ErrorCode.NO_LEADER), 100.9999, random.Random(1))
    assert d.action is Action.FAIL and d.error is not None
    assert isinstance(d.error.__cause__, NoLeader)
    d = decide(state, err(ErrorCode.NO_LEADER), 100.5, random.Random(1))
    assert d.action is Action.RETRY and 0.005 <= d.pause_s <= 0.010


def test_retries_bound_the_resends() -> None:
    state = start(endpoints=1, retries=2)
    actions = []
    for _ in range(4):
        d = decide(state, Silence.CONNECTION, 100.1, random.Random(1))
        actions.append(d.action)
        state = d.state
        if d.action is Action.FAIL:
            assert "retries exhausted after 3 attempts" in str(d.error)
            break
    assert actions == [Action.SWITCH, Action.SWITCH, Action.FAIL]


def test_attempt_until() -> None:
    state = start(total_s=5.0)  # deadline 105
    assert attempt_until(state, 100.0, None) == 101.0  # default: 1 s
    assert attempt_until(state, 100.0, 0.2) == pytest.approx(100.2)
    assert attempt_until(state, 104.5, None) == 105.0  # never past the deadline
    short = start(total_s=0.3)
    assert attempt_until(short, 100.0, None) == pytest.approx(100.3)


def test_backoff_doubles_from_10ms_to_200ms_with_jitter_on_the_upper_half() -> None:
    for seed in range(50):
        rng = random.Random(seed)
        for attempt in range(30):
            ceiling = min(0.200, 0.010 * 2 ** attempt)
            assert ceiling / 2 <= backoff_s(attempt, rng) <= ceiling


def test_a_seed_replays_the_same_decisions() -> None:
    def run(seed: int) -> list[tuple[Action, int, float]]:
        rng, state, out = random.Random(seed), start(endpoints=2, total_s=60), []
        for i in range(40):
            outcomes: list[Message | Silence] = [
                err(ErrorCode.NO_LEADER), err(ErrorCode.NOT_LEADER), Silence.CONNECTION]
            outcome = outcomes[i % 3]
            d = decide(state, outcome, 100.0 + i * 0.1, rng)
            out.append((d.action, d.endpoint, d.pause_s))
            state = d.state
        return out

    assert run(5) == run(5) and run(5) != run(6)


def test_bad_call_states_are_refused() -> None:
    with pytest.raises(ValueError):
        CallState.start(1, 0.0, 0.0, 1)
    with pytest.raises(ValueError):
        CallState.start(1, 0.0, 1.0, 2, endpoint=2)


def test_policy_is_pure() -> None:
    """No sockets, clocks, threads or global random: ``random`` only names the type."""
    tree = ast.parse(Path(retry.__file__).read_text())
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
        elif (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
              and node.value.id == "random"):
            assert node.attr == "Random", f"global random.{node.attr} in the policy"
    assert not imported & {"zmq", "time", "threading", "asyncio", "socket", "os", "loguru"}


def test_a_silence_cut_by_the_deadline_does_not_hide_the_clusters_last_answer() -> None:
    """Found by the strict-reconfiguration process test: a leader refused with a reason
    (UNAVAILABLE, retried), then the deadline cut the last attempt short; the error said
    only "no reply from broker", and ``zkv admin`` could not tell the operator why."""
    from zkv.client import retry
    from zkv.protocol.errors import ErrorCode
    from zkv.protocol.messages import ErrorReply

    rng = random.Random(1)
    state = retry.CallState.start(7, now=0.0, total_s=1.0, endpoints=1)
    d = retry.decide(state, ErrorReply(7, ErrorCode.UNAVAILABLE, "removing b would leave 1 "
                                       "healthy of 2 voters; retry shortly"), 0.1, rng)
    assert d.action is retry.Action.RETRY
    d = retry.decide(d.state, retry.Silence.REQUEST, 1.5, rng)
    assert d.action is retry.Action.FAIL
    assert "last: no reply from broker" in str(d.error)
    assert "last answer: UNAVAILABLE: removing b would leave 1 healthy of 2 voters" in str(d.error)
