"""The storage node's durable writes: what the core says to persist, and a full disk.

A mixin of ``StorageNode``. ``_persist`` writes a ``ready`` round in the order the core
needs (hard state, snapshot, truncation, new entries, then one sync: group commit; with
``--fsync always`` the sync runs off the loop, through Linux AIO or on a helper thread,
and what promises durable state waits for it, ``wal_sync.py``);
``_maybe_snapshot`` writes the snapshots the core asks for and compacts the log. A
snapshot installed from the leader is written on a helper thread (``BackgroundSave``):
the log is reset and what followed it written once it is on disk, and the acks and
votes of those rounds wait for that (``_install_held``). Rules:
only ``OSError``s that mean "disk full" are survived (anything else propagates); while
the disk is full, what did not fit waits in ``_unpersisted`` (``disk_full.py``) and is
retried every ``DISK_RETRY_S``, a refused snapshot every ``SNAPSHOT_RETRY_S``; an append
ack claims only what the disk holds (``_durable_index``).
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from typing import TYPE_CHECKING

from zkv.protocol.messages import AppendReply
from zkv.storage_node import durable_state
from zkv.storage_node.disk_full import Unpersisted
from zkv.storage_node.node_core import SnapshotTask
from zkv.storage_node.replica import Ready
from zkv.storage_node.snapshot import (
    BackgroundSave,
    compactable_index,
    load_saved,
    mapped_or_bytes,
    save_snapshot,
)
from zkv.storage_node.snapshot_child import EXIT_DISK_FULL, SnapshotChild
from zkv.storage_node.wal import is_disk_full
from zkv.storage_node.wal_sync import Syncer
from zkv.storage_node.wal_syncer import SyncDone

if TYPE_CHECKING:
    from loguru import Logger

    from zkv.protocol.messages import PeerMessage
    from zkv.storage_node.node import NodeConfig
    from zkv.storage_node.node_core import NodeCore
    from zkv.storage_node.replica import Replica
    from zkv.storage_node.wal import WriteAheadLog

#: how often a node whose disk is full retries what it could not write, and a snapshot
DISK_RETRY_S = 0.25
SNAPSHOT_RETRY_S = 5.0


class NodeDisk:
    """Durable-write methods of ``StorageNode`` (which provides the rest)."""

    if TYPE_CHECKING:
        config: NodeConfig
        log: Logger
        core: Replica
        node: NodeCore
        wal: WriteAheadLog
        _unpersisted: Unpersisted
        _disk_full_since: float | None
        _disk_retry_at: float
        _snapshot_retry_at: float
        _disk_snapshot_index: int
        _snapshot_child: SnapshotChild | None
        _syncer: Syncer | None
        _synced_index: int
        _unsynced_entries: int
        _held: deque[tuple[int, list[tuple[str, PeerMessage]]]]
        _held_since: float
        _install_save: BackgroundSave | None
        _install_held: list[tuple[str, PeerMessage]]

        def _send_peer(self, to: str, msg: PeerMessage) -> None: ...

    def _persist(self, rd: Ready, now: float) -> bool:
        """Make ``rd``'s state durable per the fsync policy, in the order the core needs:
        hard state, snapshot, truncation, new entries, then one sync. False while the
        disk is full or an installed snapshot is being written: what did not fit or
        follows it waits in ``_unpersisted`` (see disk_full.py)."""
        todo = self._unpersisted
        waiting = bool(todo)
        todo.add(rd.hard_state, rd.snapshot, rd.truncate_from, rd.entries)
        try:
            if not todo:
                return True
            if waiting and now < self._disk_retry_at:
                return False
            try:
                if not self._write_durable(todo, now):
                    return False  # the leader's snapshot is still being written
                if self._install_held:  # it is on disk, and what followed it written
                    held, self._install_held = self._install_held, []
                    self._send_durable(held, now)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                if self._disk_full_since is None:
                    self._disk_full_since = now
                    self.log.warning("disk full ({}): writes answer DISK_FULL until space "
                                     "returns", exc)
                self._disk_retry_at = now + DISK_RETRY_S
                return False
            if self._disk_full_since is not None:
                self.log.info("disk has room again after {:.1f} s: writes resume",
                              now - self._disk_full_since)
                self._disk_full_since = None
            return True
        finally:
            self.node.unpersisted = bool(todo)
            self.node.disk_full = self._disk_full_since is not None

    def _write_durable(self, todo: Unpersisted, now: float) -> bool:
        """Write ``todo`` in order, clearing each part once it is durable. False while
        an installed snapshot is being written (what follows it waits)."""
        if todo.hard_state is not None:
            durable_state.save_hard_state(self.config.data_dir, todo.hard_state)
            todo.hard_state = None
        if todo.snapshot is not None and not self._installed_snapshot_saved(todo, now):
            return False
        wrote = False
        if todo.truncate_from is not None:
            self._settle_syncs(now)
            self.wal.truncate_from(todo.truncate_from)  # durable when it returns
            self._synced_index = min(self._synced_index, self.wal.last_index)
            todo.truncate_from, wrote = None, True
        entries = len(todo.entries)
        if todo.entries:
            self.wal.append(todo.entries)
            todo.entries, wrote = [], True
        if wrote and self._syncer is not None:
            self._unsynced_entries += entries
            self._start_sync(now)
        elif wrote:
            started = time.perf_counter()
            # fsync=interval or never: one write for everything this turn brought, and
            # the fsync inline when the interval is due (always: _start_sync above)
            synced = self.wal.sync(now)
            self.node.stats.wal_synced(time.perf_counter() - started if synced else None,
                                       entries)
            self.core.persisted(self.wal.last_index)
        return True

    def _installed_snapshot_saved(self, todo: Unpersisted, now: float) -> bool:
        """Write the leader's snapshot on a helper thread, started on the first call;
        True once it is on disk and the log restarts after it."""
        assert todo.snapshot is not None
        index, term, data = todo.snapshot
        saving = self._install_save
        if saving is not None and saving.index != index:  # superseded by a newer one
            saving.result()
            saving = self._install_save = None
            self._install_held = []  # they claim entries the newer snapshot discards
        if saving is None:
            self._settle_syncs(now)  # a late answer must not cover the log that follows
            self._install_save = BackgroundSave(self.config.data_dir, index, term, data)
            return False
        if not saving.done():
            return False
        self._install_save = None
        saving.result()  # a full disk raises here: the install is retried
        self.wal.reset(index + 1)
        self._synced_index = index
        todo.snapshot = None
        self._disk_snapshot_index = index
        self.node.stats.snapshot("installed", saving.size)
        # from now on streamed from the file: the received bytes are freed once decoded
        self.core.snapshot_saved(index, load_saved(self.config.data_dir, index))
        return True

    def _install_written(self, now: float) -> None:
        """Once per turn while an installed snapshot is being written: when it is on
        disk, write what followed it and send the acks and votes that waited."""
        saving = self._install_save
        if saving is not None and saving.done():
            self._persist(Ready(), now)

    # ------------------------------------------------------------------ fsync off the loop

    def _start_sync(self, now: float) -> None:
        """Hand what was written to the syncer (wal_sync.py), unless a sync is
        already running: the next one starts when it returns and covers all of it."""
        assert self._syncer is not None
        if self._syncer.in_flight is not None:
            return
        begun = self.wal.begin_sync()
        if begun is None:  # nothing written since the last sync (a truncation alone)
            self._synced(self.wal.last_index)
            return
        fd, index = begun
        self._syncer.start(fd, index, self._unsynced_entries)
        self._unsynced_entries = 0
        # a healthy disk answers within a quarter heartbeat: finish this turn as an
        # inline fsync would; a stalled one is collected when its signal wakes the loop
        done = self._syncer.wait(self.config.heartbeat_ms / 4000)
        if done is not None:
            self._sync_finished(done, now)

    def _sync_collected(self, now: float) -> None:
        """The loop saw the syncer's signal (a finished sync)."""
        assert self._syncer is not None
        done = self._syncer.collect()
        if done is not None:
            self._sync_finished(done, now)
            if self.wal.last_index > self._synced_index:  # written while it ran
                self._start_sync(now)

    def _sync_finished(self, done: SyncDone, now: float, tell_core: bool = True) -> None:
        self.wal.end_sync(done.error, now)  # a failed fsync raises: the node exits
        self.node.stats.wal_synced(done.seconds, done.entries)
        self._synced(done.index, tell_core)

    def _synced(self, index: int, tell_core: bool = True) -> None:
        """The WAL is durable up to ``index``: the core may count it, and what waited
        for it may go."""
        self._synced_index = max(self._synced_index, index)
        if tell_core:
            self.core.persisted(self._synced_index)
        held = self._held
        while held and held[0][0] <= self._synced_index:
            for to, msg in held.popleft()[1]:
                self._send_peer(to, msg)

    def _settle_syncs(self, now: float) -> None:
        """Before the log is cut (truncation, snapshot install): wait for the sync in
        flight, send what it covered, and drop what still waits. Those acks claim
        entries about to be cut, never durable: dropping a message is always safe in
        Raft, sending one would claim entries this node will not have. What it covered
        goes as a late message would (it was true when written); the core is not told:
        its log already holds the entries replacing the cut ones, not on disk yet."""
        if self._syncer is None:
            return
        done = self._syncer.wait()
        if done is not None:
            self._sync_finished(done, now, tell_core=False)
        self._held.clear()

    def _send_durable(self, out: list[tuple[str, PeerMessage]], now: float) -> None:
        """Acks and votes leave once the disk holds what they claim, in order."""
        if not out:
            return
        if self._install_save is not None:  # after the installed snapshot is on disk
            self._install_held.extend(out)
            return
        if self._syncer is None or (not self._held and self._synced_index >= self.wal.last_index):
            for to, msg in out:
                self._send_peer(to, msg)
        else:
            if not self._held:
                self._held_since = now
            self._held.append((self.wal.last_index, out))

    def _ack_while_syncing(self, now: float) -> None:
        """Once per heartbeat while acks have waited a heartbeat interval for a slow
        disk: send the newest ack per leader now, claiming only what the disk holds.
        The leader keeps hearing us (its check-quorum would otherwise depose it after
        an election timeout of a stalled disk on a majority of followers, which no
        new leader could fix) and its reads are confirmed; its commit waits for the
        real ack, which follows when the sync returns."""
        if not self._held or now - self._held_since < self.config.heartbeat_ms / 1000:
            return
        newest: dict[str, AppendReply] = {}
        for _index, out in self._held:
            for to, msg in out:
                if type(msg) is AppendReply:
                    newest[to] = msg
        for to, msg in newest.items():
            if msg.success and msg.match_index > self._synced_index:
                msg = dataclasses.replace(msg, match_index=self._synced_index)
            self._send_peer(to, msg)
        self._held_since = now

    def _durable_index(self) -> int:
        """Where this node's log ends on disk (what an append ack may claim)."""
        return max(self.wal.last_index, self._disk_snapshot_index)

    def _maybe_snapshot(self, now: float) -> None:
        """Take the snapshot the core asks for: in a forked child (``snapshot_child``),
        polled here once per turn, or inline without ``background_snapshots``."""
        child = self._snapshot_child
        if child is not None:
            status = child.poll()
            if status is not None:
                self._snapshot_child = None
                self._snapshot_written(child, status, now)
            return
        if now < self._snapshot_retry_at:
            return
        if not self.config.background_snapshots:
            self._snapshot_inline(now)
            return
        due = self.node.begin_snapshot()
        if due is None:
            return
        index, term = due
        data_dir = self.config.data_dir

        def write() -> None:  # in the child: the state as it was at fork time
            save_snapshot(data_dir, index, term, self.node.snapshot_data(index),
                          prune_temp=False)  # the parent may be writing one of its own

        self._snapshot_child = SnapshotChild.fork(index, term, write)

    def _snapshot_written(self, child: SnapshotChild, status: int, now: float) -> None:
        if status != 0:
            self.node.snapshot_failed()
            self._snapshot_retry_at = now + SNAPSHOT_RETRY_S
            why = "no space" if status == EXIT_DISK_FULL else f"the child exited with {status}"
            self.log.warning("snapshot at index {} not written ({}); retrying in {} s",
                             child.index, why, SNAPSHOT_RETRY_S)
            return
        kept = load_saved(self.config.data_dir, child.index)
        self._disk_snapshot_index = max(self._disk_snapshot_index, child.index)
        self.node.compacted(SnapshotTask(child.index, child.term, b""), kept)
        self._after_snapshot(child.index, len(kept), child.started,
                             f", forked in {child.fork_ms:.1f} ms")

    def _snapshot_inline(self, now: float) -> None:
        started = time.monotonic()
        task = self.node.take_snapshot()
        if task is None:
            return
        try:
            save_snapshot(self.config.data_dir, task.index, task.term, task.data)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            self.node.snapshot_failed()
            self._snapshot_retry_at = now + SNAPSHOT_RETRY_S
            self.log.warning("no space for a snapshot at index {} ({}); retrying in {} s",
                             task.index, exc, SNAPSHOT_RETRY_S)
            return
        self._disk_snapshot_index = task.index
        self.node.compacted(task, mapped_or_bytes(self.config.data_dir, task.index, task.data))
        self._after_snapshot(task.index, len(task.data), started)

    def _after_snapshot(self, index: int, size: int, started: float, how: str = "") -> None:
        self.node.stats.snapshot("taken", size)
        # keep the log back to the older kept snapshot, so falling back to it (if the
        # newest is ever damaged) still meets a contiguous log
        self.wal.compact(compactable_index(self.config.data_dir))
        self.log.info("snapshot at index {} ({} bytes, {:.0f} ms{})", index, size,
                      (time.monotonic() - started) * 1000, how)
