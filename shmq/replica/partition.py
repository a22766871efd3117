"""PartitionReplica: one replica process's copy of one partition, as leader or follower.

Follower duties (Kafka's ReplicaFetcher, without a network): wait until the
leader's process has opened its log in the current leader epoch, truncate
this log where it diverges (leader-epoch checkpoints, as KIP-101), then copy
committed frames from the leader's mapping verbatim (same offsets, same
bytes), keep the producer-state table and epoch checkpoint from what was
copied, flush when the topic asks (disk replicas), and publish this log end
into the leader's control block, which moves the high watermark.

Leader duties: housekeeping of the log (prepare the next ring slot, unblock
dead claims), the high watermark while the ISR is only the leader, and a
check that its own files are still there (a leader whose files vanish is
reported, so the coordinator fails over).

Invariant that makes ``acks="all"`` safe: a follower publishes a log end
only after the copied frames are in its own log (and flushed when asked),
tagged with the leader epoch it copied in, and the leader ignores ends
tagged with another epoch.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import CorruptRecord, OffsetOutOfRange, ShmqError
from ..native import lib
from ..ringlog.log import ctl_inode
from ..ringlog import LogReader, PartitionLog
from ..ringlog.producer_state import ProducerStateTable
from ..ringlog.reader import frame_epochs
from ..coordinator.housekeeping import activity_mark
from .epoch_cache import LeaderEpochCache

__all__ = ["PartitionReplica"]

log = logging.getLogger("shmq.replica")

OPEN, NOT_LEADER = 0, 2
COPY_BYTES = 1 << 20
HOUSEKEEP_NS = 2_000_000          # a busy leader's housekeeping pace
STORAGE_CHECK_NS = 20_000_000     # a busy replica checks its files are still there this often
ACTIVE_NS = 2_000_000_000         # a replica is busy this long after it last saw its log move (>= SLICE_S)
IDLE_NS = 2_000_000_000           # an idle replica's pace for housekeeping, storage checks, "caught up" reports
RETRY_NS = 500_000_000            # a follower that cannot follow yet tries again this often
SLACK_NS = IDLE_NS // 2            # an idle duty this close to due is done with the others: one wake-up does all



class PartitionReplica:
    """Replica ``rid`` of ``topic``-``partition`` hosted by this process."""

    def __init__(self, rid: int, topic: str, partition: int, path: str, config: Any,
                 report: Callable[..., None]) -> None:
        self.rid = rid
        self.topic = topic
        self.partition = partition
        self.name = f"{topic}-{partition}"
        self.path = path
        self.config = config
        self.report = report                   # report(op, **args) to the coordinator
        self.role: Optional[str] = None
        self.epoch = -1
        self.index = -1
        self.leader_path: Optional[str] = None
        self.leader_id = -1
        self.leader_log: Optional[PartitionLog] = None
        # Every other replica's log, mapped once: a new leader's log is then
        # ready the moment we follow it (mapping a large log takes tens of ms).
        self.peers: Dict[str, Tuple[int, PartitionLog]] = {}
        self.reader: Optional[LogReader] = None
        self.ready = False                     # follower: truncated and copying
        self.buf = bytearray(COPY_BYTES)
        self._last_publish = 0
        self._leader_end = (0, 0)              # (leader end seen, when) for "caught up"
        self._unflushed = 0
        self._flushed_end = 0
        self._last_flush = time.monotonic_ns()
        self._housekept = 0
        self._checked = 0
        self.busy_until = 0                    # monotonic ns: busy (fast pace) until then
        self._mark: Any = None                 # the leader log's activity mark last seen
        # An idle follower re-reports "caught up" well within replica_lag_time_max_ms.
        lag_ms = int(config.get("replica_lag_time_max_ms") or 10_000)
        # An idle follower says "caught up" every lag/4 (at most every IDLE_NS): the
        # coordinator's ISR check (every lag/2 when idle) always finds a fresh report.
        self.idle_publish_ns = min(max(lag_ms // 4, 50) * 1_000_000, IDLE_NS)
        self.log: Optional[PartitionLog] = None
        self.pstate: Optional[ProducerStateTable] = None
        self.cache: Optional[LeaderEpochCache] = None
        self._rescan = False                   # own log to re-scan before following (see _open_own)
        self._open_own()

    # ------------------------------------------------------------ own files
    def _open_own(self) -> None:
        try:
            self.log = PartitionLog(self.path, name=self.name)
            self.pstate = ProducerStateTable(self.path)
            self.cache = LeaderEpochCache(self.path)
            self._ino = ctl_inode(self.path)
            # A previous process may have died in the middle of recording a
            # batch: the table is rebuilt from the log, which is the truth.
            committed = self._rebuild_producer_state()
            # Or in the middle of copying one: its claim, never committed, still
            # counts in the log end. Following from that end would skip the batch
            # (missing from the log and the producer state, yet published as
            # held): the log is cut back to its committed end before it follows.
            self._rescan = committed < self.log.end_offset
        except ShmqError as e:
            log.error("replica %d: log of %s at %s is unusable (%s); recreating it", self.rid, self.name,
                      self.path, e)
            self.recreate()

    def recreate(self) -> None:
        """A fresh empty log (after a storage failure); the coordinator is told."""
        from ..coordinator.topic_config import log_config
        self.close()
        shutil.rmtree(self.path, ignore_errors=True)
        self.log = PartitionLog.create(self.path, log_config(self.config), name=self.name)
        self.log.set_replication(True, 0, 0, 0, 0)
        self.log.set_append_state(NOT_LEADER)
        self.pstate = ProducerStateTable.create(self.path)
        self.cache = LeaderEpochCache(self.path)
        self._ino = ctl_inode(self.path)
        self.role, self.epoch, self.ready = None, -1, False
        self._rescan = False
        self.report("replica_storage_recovered", topic=self.topic, partition=self.partition, replica_id=self.rid)

    def close(self) -> None:
        self._drop_leader()
        for _ino, plog in self.peers.values():
            plog.close()
        self.peers.clear()
        for obj in (self.pstate, self.log):
            if obj is not None:
                obj.close()
        self.log = self.pstate = None

    def _drop_leader(self) -> None:
        self.reader = None
        self.leader_log, self.leader_path, self.ready = None, None, False

    def map_peers(self, paths: List[str]) -> None:
        """Map the other replicas' logs now (at start-up, not during a failover)."""
        for path in paths:
            if path != self.path and path not in self.peers:
                self._peer(path)

    def _peer(self, path: str) -> Optional[PartitionLog]:
        """The mapping of the replica log at ``path``, remapped if its files were recreated."""
        ino = ctl_inode(path)
        cached = self.peers.get(path)
        if cached is not None and cached[0] == ino:
            return cached[1]
        if cached is not None:
            # Unmapping a large populated log takes tens of ms: not on this thread.
            threading.Thread(target=cached[1].close, name="shmq-unmap", daemon=True).start()
            del self.peers[path]
        if ino < 0:
            return None
        try:
            plog = PartitionLog(path, name=self.name)
        except ShmqError:
            return None
        self.peers[path] = (ino, plog)
        return plog

    # ----------------------------------------------------------------- roles
    def update(self, leader: int, epoch: int, index: int, leader_path: Optional[str], offline: bool) -> None:
        """Apply the published leadership of this partition."""
        if offline:
            self.recreate()
        self.index = index
        self.leader_id = leader
        if leader == self.rid:
            if self.role != "leader" or self.epoch != epoch:
                self._become_leader(epoch)
        elif leader >= 0 and leader_path is not None:
            if self.role != "follower" or self.epoch != epoch or self.leader_path != leader_path:
                self._become_follower(epoch, leader_path)
        else:
            self._drop_leader()
            self.role, self.epoch = None, epoch

    def _become_leader(self, epoch: int) -> None:
        assert self.log is not None and self.cache is not None
        self._drop_leader()
        end = self.log.end_offset
        self.cache.assign(epoch, end)
        plog = self.log
        # The coordinator wrote replicated/leader_index/isr_mask/leader_epoch; we own the epoch start.
        plog.set_replication(True, epoch, plog.leader_index, plog.isr_mask, end)
        self.hw_reader = LogReader(plog, plog.high_watermark if plog.high_watermark <= end else end,
                                   buffer_bytes=64 << 10, tether=False)
        plog.set_append_state(OPEN)
        self.role, self.epoch = "leader", epoch
        self._changed()
        log.info("replica %d leads %s in epoch %d from offset %d", self.rid, self.name, epoch, end)

    def _become_follower(self, epoch: int, leader_path: str) -> None:
        assert self.log is not None
        self.log.set_append_state(NOT_LEADER)
        self._drop_leader()
        self.role, self.epoch, self.leader_path = "follower", epoch, leader_path
        self._changed()

    def _changed(self) -> None:
        """A new role, leader or reader: keep the fast pace for ``ACTIVE_NS``
        (at least a waiter's ``SLICE_S``, so no waiter still sleeps on what
        this replica waited for before when the process goes idle again)."""
        self.busy_until = time.monotonic_ns() + ACTIVE_NS

    # ------------------------------------------------------------------ work
    def busy(self, now: int) -> bool:
        """True while this replica's log moved within ``ACTIVE_NS``: it keeps a fast pace."""
        return now < self.busy_until

    def due(self, now: int) -> int:
        """Monotonic ns when an idle replica next has a periodic duty (storage
        check, housekeeping, "caught up" report, flush)."""
        due = self._checked + IDLE_NS
        if self.role == "leader":
            due = min(due, self._housekept + IDLE_NS)
        elif self.role == "follower" and self.ready:
            due = min(due, self._last_publish + self.idle_publish_ns)
        elif self.role == "follower":
            # Not following yet (the leader has not opened its log in this epoch, or it
            # starts over): try again soon, not at the idle pace. Nothing to report yet.
            due = min(due, now + RETRY_NS)
        fms = self.config.get("flush_ms")
        if fms is not None and self._unflushed:
            due = min(due, self._last_flush + int(fms * 1_000_000))
        return due

    def step(self, now: Optional[int] = None) -> int:
        """One round of this replica's duties; returns how much work it did (0: idle)."""
        if now is None:
            now = time.monotonic_ns()
        if now - self._checked > (STORAGE_CHECK_NS if now < self.busy_until else IDLE_NS - SLACK_NS):
            self._checked = now
            if ctl_inode(self.path) != self._ino:
                self.report("replica_storage_failed", topic=self.topic, partition=self.partition,
                            replica_id=self.rid, why=f"log files at {self.path} are gone")
                self.recreate()
                return 1
        work = 0
        if self.role == "follower":
            work = self._follow(now)
        elif self.role == "leader":
            work = self._lead(now)
        if work:
            self.busy_until = now + ACTIVE_NS
        return work

    def _lead(self, now: int) -> int:
        plog = self.log
        assert plog is not None
        work = 0
        # Producers append to this log without us: its activity mark tells us it is in use.
        mark = activity_mark(plog)
        if mark != self._mark or mark[2]:
            self._mark = mark
            self.busy_until = now + ACTIVE_NS
        if now - self._housekept > (HOUSEKEEP_NS if now < self.busy_until else IDLE_NS - SLACK_NS):
            self._housekept = now
            if self.config.get("flush_ms") is not None:
                # A leader on disk: producers append themselves; its process msyncs every flush_ms.
                end = plog.end_offset
                self._flush_if_due(end - self._flushed_end, now)
                self._flushed_end = end
            try:
                work += plog.housekeep()
            except ShmqError as e:
                log.warning("housekeeping of %s failed: %s", self.name, e)
        if plog.isr_mask == 1 << plog.leader_index:
            # Alone in the ISR: the high watermark is the committed end.
            n = self.hw_reader.read_frames(self.buf)
            if n:
                plog.advance_hw(self.hw_reader.position)
                work += 1
        elif self.hw_reader.position < plog.high_watermark:
            self.hw_reader.seek(plog.high_watermark)
        return work

    def _start_following(self) -> bool:
        """Open the leader's log once its process opened it in our epoch; truncate; position."""
        assert self.log is not None and self.cache is not None and self.leader_path is not None
        if self.leader_log is None:
            self.leader_log = self._peer(self.leader_path)
            if self.leader_log is None:
                return False
        ll = self.leader_log
        if ll.append_state != OPEN or ll.leader_epoch != self.epoch:
            return False
        if self._rescan:
            self._rescan_own()
        my_end = self.log.end_offset
        if my_end > 0 and self.cache.entries:
            my_epoch = self.cache.latest_epoch
            leader_entries = LeaderEpochCache.read(self.leader_path)
            lc = LeaderEpochCache.__new__(LeaderEpochCache)
            lc.entries = leader_entries
            found, end = lc.end_offset_for(my_epoch, ll.end_offset)
            if found < 0:
                target = 0
            else:
                target = min(my_end, end)
                if found < my_epoch:
                    target = min(target, self.cache.end_offset_for(found, my_end)[1])
            if target < my_end:
                new_end = self._truncate(target)
                log.warning("replica %d truncated %s from %d to %d (epoch %d ended there on the leader)",
                            self.rid, self.name, my_end, new_end, found)
                my_end = new_end
        try:
            self.reader = self._follower_reader(ll, my_end)
        except OffsetOutOfRange:
            start = ll.start_offset
            log.warning("replica %d: %s ends at %d, below the leader's start %d: starting over there",
                        self.rid, self.name, my_end, start)
            self.log.reset(start)
            self.cache.clear()
            self._rebuild_producer_state()
            self.reader = self._follower_reader(ll, start)
        self.ready = True
        self._leader_end = (ll.end_offset, time.monotonic_ns())
        self._changed()
        return True

    def _follower_reader(self, leader_log: PartitionLog, offset: int) -> LogReader:
        """This follower's reader of the leader's log: listed in its reader
        table, untethered (the ISR, not the ring, decides what a lagging
        follower may miss; one that falls behind the ring starts over)."""
        return LogReader(leader_log, offset, buffer_bytes=64 << 10, check_crc=True, tether=False,
                         kind=lib.SHMQ_READER_KIND_FOLLOWER, label=f"replica-{self.rid}")

    def _rebuild_producer_state(self) -> int:
        """Rebuild the producer-state table from this log; returns the committed
        end (where the scan stopped: below the log end while a claim is open)."""
        assert self.pstate is not None and self.log is not None
        self.pstate.clear()
        r = LogReader(self.log, self.log.start_offset, buffer_bytes=1 << 20, tether=False)
        while True:
            n = r.read_frames(self.buf)
            if not n:
                break
            self.pstate.observe_frames(self.buf, n)
        return r.position

    def _truncate(self, offset: int) -> int:
        """Drop this log's records from ``offset`` on, with their epochs and producer state."""
        assert self.log is not None and self.cache is not None
        new_end = self.log.truncate(offset)
        self.cache.truncate_from_end(new_end)
        self._rebuild_producer_state()
        return new_end

    def _rescan_own(self) -> None:
        """Rebuild the producer state from this log and drop the claim left
        uncommitted at its end by a previous process of this replica (killed
        while copying, or a producer's while it led) or by a copy that failed
        midway: nothing was published for it; the batch is copied again."""
        assert self.log is not None and self.cache is not None
        self._rescan = False
        end = self.log.end_offset
        committed = self._rebuild_producer_state()
        if committed < end:
            new_end = self._truncate(committed)
            log.warning("replica %d: %s ended in a claim never committed (%d to %d): cut back to %d",
                        self.rid, self.name, committed, end, new_end)

    def _follow(self, now: int) -> int:
        if not self.ready and not self._start_following():
            return 0
        ll, own = self.leader_log, self.log
        assert ll is not None and own is not None and self.reader is not None
        target, seen_at = self._leader_end
        try:
            n = self.reader.read_frames(self.buf)
        except (CorruptRecord, OffsetOutOfRange) as e:
            if isinstance(e, OffsetOutOfRange):
                self.ready = False            # the leader recycled past us: start over
                return 0
            log.error("replica %d: leader of %s has a corrupt frame: %s", self.rid, self.name, e)
            self.report("replica_storage_failed", topic=self.topic, partition=self.partition,
                        replica_id=self.leader_id,
                        why=f"corrupt frame read by replica {self.rid}: {e}")
            self.ready = False
            return 0
        if n:
            if own.config.overflow == "block":
                # Keep what the leader keeps: what consumer groups and the
                # leader's live readers still need (they may fail over here).
                own.set_slowest_position(ll.retention_floor())
            before = own.end_offset
            try:
                end = own.append_frames(self.buf, n)
            except ShmqError as e:
                log.error("replica %d: copying %s failed (%s); re-checking divergence", self.rid, self.name, e)
                self.ready = False
                self._rescan = True           # frames copied before the failure are not in the producer state
                return 0
            assert self.cache is not None and self.pstate is not None
            for epoch, start in frame_epochs(self.buf, n, self.cache.latest_epoch):
                self.cache.assign(epoch, start)
            self.pstate.observe_frames(self.buf, n)
            self._flush_if_due(end - before, now)
        else:
            end = self.reader.position
            self._flush_if_due(0, now)       # flush_ms: what an idle follower still holds unflushed
            if now - self._last_publish < self.idle_publish_ns - SLACK_NS:
                return 0
        caught_up = n == 0 or end >= target
        hw = ll.publish_leo(self.index, self.epoch, end, caught_up)
        # Kafka's follower high watermark: what the leader says, capped by what we hold.
        if own.high_watermark < min(hw, end):
            own.advance_hw(min(hw, end))
        self._last_publish = now
        if caught_up or n == 0:
            self._leader_end = (ll.end_offset, now)
        return 1 if n else 0

    def _flush_if_due(self, records: int, now: int) -> None:
        """Disk replicas: msync every ``flush_messages`` records (before they are
        reported replicated) and at least every ``flush_ms`` while any are unflushed."""
        fm, fms = self.config.get("flush_messages"), self.config.get("flush_ms")
        if fm is None and fms is None:
            return
        self._unflushed += records
        if not self._unflushed:
            return
        if (fm is not None and self._unflushed >= fm) or (fms is not None and now - self._last_flush >= fms * 1e6):
            assert self.log is not None
            self.log.flush()
            self._unflushed = 0
            self._last_flush = now

    def wait_target(self) -> Optional[Tuple[str, int, int]]:
        """(log path, inode, offset) whose commits past offset give this replica
        work: the leader's log for a follower, its own for a leader alone in
        its ISR; None when no commit would (see ``waiters.LogWaiter``)."""
        if self.role == "follower" and self.ready and self.reader is not None and self.leader_path is not None:
            peer = self.peers.get(self.leader_path)
            return (self.leader_path, peer[0], self.reader.position) if peer is not None else None
        if self.role == "leader" and self.log is not None and self.log.isr_mask == 1 << self.log.leader_index:
            return self.path, self._ino, self.hw_reader.position
        return None

    def can_wait(self) -> bool:
        """True if ``wait`` sleeps on a log's commits (else it only sleeps)."""
        return ((self.role == "follower" and self.ready and self.reader is not None and self.leader_log is not None)
                or (self.role == "leader" and self.log is not None
                    and self.log.isr_mask == 1 << self.log.leader_index))

    def wait(self, timeout_ns: int) -> None:
        """Sleep until the leader commits (followers) or the timeout passes."""
        if self.role == "follower" and self.ready and self.reader is not None and self.leader_log is not None:
            lib.shmq_log_wait_frames(self.leader_log._h, self.reader._cur, 0, timeout_ns)
        elif self.role == "leader" and self.log is not None and self.log.isr_mask == 1 << self.log.leader_index:
            lib.shmq_log_wait_frames(self.log._h, self.hw_reader._cur, 0, timeout_ns)
        else:
            time.sleep(timeout_ns / 1e9)
