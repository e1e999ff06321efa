"""When the write-ahead log must fsync: the ``--fsync`` policy of a storage node.

``always``         fsync before acknowledging (batched: one fsync per group commit);
``interval:<ms>``  fsync at most every ``ms`` milliseconds; a crash of the machine (not
                   just the process) may lose the writes of the last interval;
``never``          leave it to the OS; only a process crash is survived.

The policy is pure: the caller passes ``now`` (monotonic seconds) and the time of the
last fsync, so the decision is testable without a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: An interval above a minute is a misconfiguration rather than a policy.
INTERVAL_MS_MAX = 60_000


class FsyncMode(enum.Enum):
    ALWAYS = "always"
    INTERVAL = "interval"
    NEVER = "never"


_USAGE = f"expected 'always', 'interval:<ms>' (1..{INTERVAL_MS_MAX}) or 'never'"


@dataclass(frozen=True, slots=True)
class FsyncPolicy:
    mode: FsyncMode
    interval_ms: int = 0

    def __post_init__(self) -> None:
        if self.mode is FsyncMode.INTERVAL:
            if not 1 <= self.interval_ms <= INTERVAL_MS_MAX:
                raise ValueError(f"fsync interval {self.interval_ms} ms out of range: {_USAGE}")
        elif self.interval_ms != 0:
            raise ValueError(f"fsync policy {self.mode.value!r} takes no interval")

    @classmethod
    def parse(cls, text: str) -> FsyncPolicy:
        """Parse the ``--fsync`` flag; a bad value raises ``ValueError`` saying what is
        accepted, so a typo fails at startup instead of silently weakening durability."""
        if not isinstance(text, str):
            raise ValueError(f"bad fsync policy {text!r}: {_USAGE}")
        word = text.strip().lower()
        if word == "always":
            return cls(FsyncMode.ALWAYS)
        if word == "never":
            return cls(FsyncMode.NEVER)
        name, sep, ms = word.partition(":")
        if name != "interval" or not sep or not ms.isdigit() or not ms.isascii():
            raise ValueError(f"bad fsync policy {text!r}: {_USAGE}")
        interval_ms = int(ms)
        if not 1 <= interval_ms <= INTERVAL_MS_MAX:
            raise ValueError(f"bad fsync policy {text!r}: {_USAGE}")
        return cls(FsyncMode.INTERVAL, interval_ms)

    def sync_due(self, now: float, last_sync: float | None) -> bool:
        """Whether data written since ``last_sync`` (``None``: never synced) must be
        fsynced at ``now``. Both are monotonic seconds."""
        if self.mode is FsyncMode.ALWAYS:
            return True
        if self.mode is FsyncMode.NEVER:
            return False
        # Same expression as next_sync_at, so a sync at exactly that deadline is due.
        return last_sync is None or now >= last_sync + self.interval_ms / 1000

    def next_sync_at(self, last_sync: float | None) -> float | None:
        """The earliest time an fsync of pending data is due (``None``: never), so the
        shell can bound its poll timeout and not leave an interval's writes unsynced."""
        if self.mode is FsyncMode.NEVER:
            return None
        if self.mode is FsyncMode.ALWAYS or last_sync is None:
            return float("-inf")
        return last_sync + self.interval_ms / 1000

    def __str__(self) -> str:
        if self.mode is FsyncMode.INTERVAL:
            return f"interval:{self.interval_ms}"
        return str(self.mode.value)


def parse_fsync_policy(text: str) -> FsyncPolicy:
    """``FsyncPolicy.parse`` as a function, for argparse's ``type=``."""
    return FsyncPolicy.parse(text)
