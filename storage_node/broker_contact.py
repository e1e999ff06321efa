"""Whether the brokers still hear this node: the leader's half of the availability rule.

Theory of operation (issue 10): only brokers start elections, and a follower refuses to
campaign or vote while it hears a live leader. So a leader that still reaches its
followers but that no broker can hear (its heartbeats are dropped) or reach (requests
and campaigns to it are dropped) would keep its shard down for as long as the cut lasts:
the brokers answer NO_LEADER or time out, and no follower may replace it. The rule:

- Every broker sends ``Heard`` every heartbeat interval to each node whose heartbeats it
  received within the last few intervals (``broker/failure_detector.py``). A ``Heard``
  proves both directions between that broker and this node.
- A leader that no broker has confirmed, at its current term, for an election timeout
  (counted from when it became leader, so a fresh leader is not judged on confirmations
  it could not have had yet) steps down. Its followers stop hearing it, their lease on it
  runs out an election timeout later, and a follower that a broker hears is elected:
  whenever a majority of the shard and one broker reach each other, the shard serves
  again within ~2 election timeouts of the cut. A broker that hears the stepped-down
  node but cannot reach it skips it after a few unanswered campaigns; one that cannot
  hear it never asks it.
- Why step down rather than hand over (TimeoutNow): the leader does not know which of
  its followers a broker hears; the broker does, and already picks among them. A
  hand-over to a follower a broker confirms would save the followers' lease (about one
  election timeout) and is the natural next step once leadership transfer exists.
- Rolling upgrades: brokers older than this rule never send ``Heard``, so the rule is
  enforced only once this process has received at least one. Upgrade the nodes first,
  then the brokers: nodes older than the rule log every ``Heard`` as an undecodable
  frame, and while old and new brokers are mixed, a leader that only old brokers hear
  steps down (the rule counts only the brokers that speak it).
- Every broker down: the leader steps down too (nobody can route to it anyway). The
  followers keep naming it; a broker that starts and hears it claim no leadership
  elects at once (the failure detector treats such a name as stale).

Pure: no clock, no sockets; ``now`` is monotonic seconds.
"""

from __future__ import annotations

from zkv.protocol.messages import Heard


class BrokerContact:
    """The latest confirmation from any broker, and the step-down decision."""

    def __init__(self, election_timeout_s: float) -> None:
        if election_timeout_s <= 0:
            raise ValueError("election_timeout_s must be > 0")
        self.timeout_s = election_timeout_s
        #: when a broker last confirmed us at ``confirmed_term``; None: never (rule off)
        self.confirmed_at: float | None = None
        self.confirmed_term = -1
        self.confirmed_by = ""
        self._leading_term = -1
        self._leading_since = 0.0

    def heard(self, msg: Heard, term: int, now: float) -> None:
        """A broker says it hears us; ``term`` is ours now. Only a confirmation of our
        current term counts for leadership (the broker heard us as we are); any one
        turns the rule on."""
        if self.confirmed_at is None or msg.term == term:
            self.confirmed_at = now
            self.confirmed_term = msg.term
            self.confirmed_by = msg.broker_id

    def step_down_reason(self, leading: bool, term: int, now: float) -> str:
        """Why a leader at ``term`` must step down now; "" when it may go on."""
        if not leading:
            self._leading_term = -1
            return ""
        if self._leading_term != term:
            self._leading_term, self._leading_since = term, now
        if self.confirmed_at is None:
            return ""
        since = self._leading_since
        if self.confirmed_term == term and self.confirmed_at > since:
            since = self.confirmed_at
        silent_s = now - since
        if silent_s < self.timeout_s:
            return ""
        last = (f"last confirmed by {self.confirmed_by} at term {self.confirmed_term}"
                if self.confirmed_by else "never confirmed")
        return (f"no broker has confirmed hearing us as leader for {silent_s:.1f} s "
                f"({last}): stepping down so that a node the brokers hear can lead")
