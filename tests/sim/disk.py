"""A simulated disk for one node: hard state, log and snapshot, with an unsynced tail.

Two views: ``durable`` (what survives a crash) and the page cache (what a running node
reads back). With ``fsync="always"`` every ``write`` is synced before it returns, so the
views never differ. With ``fsync="never"`` writes land in the page cache and reach the
durable view only when the simulated OS flushes (``flush``, called on a timer by the
cluster); ``crash`` throws the unsynced tail away. Snapshots are always written the
safe way (temp file, fsync, rename, fsync dir), so they are durable at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zkv.protocol.messages import Entry
from zkv.storage_node.durable_state import HardState


@dataclass(slots=True)
class DiskImage:
    hard_state: HardState = field(default_factory=lambda: HardState(0, ""))
    log: list[Entry] = field(default_factory=list)  # contiguous, after the snapshot
    snapshot: tuple[int, int, bytes] | None = None

    def copy(self) -> DiskImage:
        return DiskImage(self.hard_state, list(self.log), self.snapshot)

    @property
    def first_index(self) -> int:
        return (self.snapshot[0] if self.snapshot else 0) + 1

    @property
    def last_index(self) -> int:
        return self.log[-1].index if self.log else self.first_index - 1


class SimDisk:
    def __init__(self, fsync: str = "always") -> None:
        if fsync not in ("always", "never"):
            raise ValueError(f"fsync mode {fsync!r}: expected always|never")
        self.fsync = fsync
        self.durable = DiskImage()
        self._cache: DiskImage | None = None  # None: identical to durable
        self.writes = 0
        self.syncs = 0

    @property
    def current(self) -> DiskImage:
        return self._cache if self._cache is not None else self.durable

    def _writable(self) -> DiskImage:
        if self.fsync == "always":
            return self.durable
        if self._cache is None:
            self._cache = self.durable.copy()
        return self._cache

    def write(
        self, hard_state: HardState | None, truncate_from: int | None, entries: list[Entry]
    ) -> int:
        """Persist one Ready's worth; returns the last index now on disk (page cache)."""
        img = self._writable()
        self.writes += 1
        if hard_state is not None:
            img.hard_state = hard_state
        if truncate_from is not None:
            keep = truncate_from - img.first_index
            if keep < 0:
                raise AssertionError(
                    f"truncate_from={truncate_from} reaches into the snapshot "
                    f"(first log index {img.first_index})"
                )
            del img.log[keep:]
        if entries:
            first = entries[0].index
            if first <= img.last_index:  # an overwrite without an explicit truncation
                del img.log[max(0, first - img.first_index) :]
            if first != img.last_index + 1:
                raise AssertionError(
                    f"log gap: appending index {first} after {img.last_index}"
                )
            img.log.extend(entries)
        if self.fsync == "always":
            self.syncs += 1
        return img.last_index

    def save_snapshot(self, index: int, term: int, data: bytes, keep_log: bool) -> None:
        """Durable at once; drops log entries up to ``index`` (all of them if not keep_log)."""
        for img in {id(self.durable): self.durable, id(self.current): self.current}.values():
            old_first = img.first_index
            img.snapshot = (index, term, data)
            if keep_log:
                del img.log[: max(0, index - old_first + 1)]
            else:
                img.log.clear()

    def flush(self) -> None:
        """The OS wrote the page cache back (fsync=never)."""
        if self._cache is not None:
            self.durable = self._cache
            self._cache = None
            self.syncs += 1

    def crash(self) -> None:
        self._cache = None

    def recover(self) -> DiskImage:
        return self.durable.copy()
