"""Consumer: reads assigned partitions straight from shared memory.

Each assigned partition has a ``LogReader`` over the partition's log; ``poll``
and ``consume`` take records from whichever assigned, unpaused partition has
some, round-robin, so one busy partition cannot starve the others.

Positions and commits follow Kafka: ``position(tp)`` is the offset of the next
record this consumer will return; ``commit()`` stores the positions of what has
been returned so far; with ``enable_auto_commit`` that happens from ``poll``
every ``auto_commit_interval_ms``, so auto-commit never commits a record that
``poll`` has not returned. A partition without a committed offset starts per
``auto_offset_reset`` (``earliest``, ``latest`` or ``none``), and a position
that retention removed (``OffsetOutOfRange``) is reset the same way.

Groups: with a ``group_id``, ``Consumer(*topics)`` / ``subscribe(topics or
pattern, on_assign, on_revoke, on_lost)`` joins the group through a
``GroupMember`` (its own coordinator connection and thread); ``poll`` applies
assignment changes in the caller's thread: for partitions being revoked it
commits positions (auto-commit), calls ``on_revoke`` and acknowledges, and
only then does the coordinator give them to another member; newly assigned
partitions start from the committed offset and are reported to ``on_assign``.
Commits carry the generation in which this member owns each partition; a
partition it does not own (any more) raises ``CommitFailed``. Without a
``group_id`` ``subscribe`` assigns every partition of the topics here.

Isolation (Kafka's ``isolation_level``): ``read_uncommitted`` (default)
returns every record but transaction markers; ``read_committed`` returns
records of committed transactions and non-transactional ones, never past a
partition's last stable offset (LSO) nor of an aborted transaction, and its
high watermark (``get_watermark_offsets``, ``lag``, ``seek_to_end``) is the LSO.
``consumer_group_metadata()`` is what ``Producer.send_offsets_to_transaction``
takes.

Storage faults (Kafka's KAFKA_STORAGE_ERROR handling): a partition whose
read fails with ``KafkaStorageError`` (a file truncated, shrunk or unlinked)
is raised to the caller once, then set aside: ``poll``, ``consume`` and
``consume_arrays`` go on delivering the other partitions and retry the
failed one after ``retry_backoff_ms`` (default 100), or at once when
metadata names a new log for it (a new leader). A retry that fails raises
again, so a permanently broken partition is raised at most once per backoff
and never starves the others. ``seek``, ``seek_to_*`` and ``assign`` of the
partition clear that state.

A Consumer is used by one thread at a time.
"""
from __future__ import annotations

import logging
import re
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

from .cluster import Cluster
from .errors import (CommitFailed, IllegalState, InvalidConfig, KafkaStorageError, LeaderNotAvailable,
                     NoOffsetForPartition, OffsetOutOfRange, ShmqError, UnknownTopicOrPartition)
from .message import Message, OffsetAndTimestamp, TopicPartition
from .native import fastpath, lib
from .ringlog import LogReader, RecordArrays
from .ringlog.txn import stable_offset

log = logging.getLogger("shmq.consumer")

RESETS = ("earliest", "latest", "none")
ISOLATION_LEVELS = ("read_uncommitted", "read_committed")


class ConsumerGroupMetadata(NamedTuple):
    """Kafka's ConsumerGroupMetadata; ``generations`` (shmq) is the
    generation in which the member owns each of its partitions, which the
    coordinator checks before committing a transaction's offsets."""

    group_id: str
    generation_id: int
    member_id: str
    group_instance_id: Optional[str]
    generations: Dict[TopicPartition, int]


class _Assigned:
    """State of one assigned partition."""

    __slots__ = ("tp", "log", "reader", "paused", "position", "out_of_range", "retry_at")

    def __init__(self, tp: TopicPartition, plog: Any, reader: Optional[LogReader]) -> None:
        self.tp = tp
        self.log = plog
        self.reader = reader
        self.paused = False
        self.position: Optional[int] = None  # next offset to return; None until initialized
        # The position names an offset the log does not hold (a seek past the
        # end, or a commit below the log start): the next fetch applies
        # auto_offset_reset, as Kafka does.
        self.out_of_range = False
        # A read of this partition failed with KafkaStorageError: it is set
        # aside (not read) until this time.monotonic(); 0.0: not set aside.
        self.retry_at = 0.0


class Consumer:
    """Reads records of shmq topics, Kafka-style.

    ``Consumer("orders", group_id="billing")`` subscribes; ``Consumer()`` then
    ``assign([...])`` for manual assignment.

    Group options (as Kafka's): ``group_instance_id`` (static membership),
    ``session_timeout_ms``, ``max_poll_interval_ms``, ``heartbeat_interval_ms``
    and ``partition_assignment_strategy`` (``sticky`` default, ``range``,
    ``roundrobin``).

    Retention and integrity: every assigned partition's reader holds its
    place in the partition's reader table, so a default (``overflow="block"``)
    topic never recycles what it has not read (``tether=False`` opts out);
    ``check_crcs`` (default True) checks every batch's CRC32C.
    ``client_rack`` (Kafka's ``client.rack``, KIP-392): read a replicated
    partition from an in-sync replica in that rack (topic config
    ``replica_racks``) instead of the leader, never above the high watermark.
    ``retry_backoff_ms`` (Kafka's ``retry.backoff.ms``, default 100): how
    long a partition whose read failed with ``KafkaStorageError`` is set
    aside before it is read again (see the module doc).
    """

    def __init__(self, *topics: str, group_id: Optional[str] = None, root: Any = None,
                 auto_offset_reset: str = "latest", enable_auto_commit: bool = True,
                 auto_commit_interval_ms: int = 5000, max_poll_records: int = 500,
                 value_deserializer: Optional[Callable[[bytes], Any]] = None,
                 key_deserializer: Optional[Callable[[bytes], Any]] = None,
                 check_crcs: bool = True, tether: bool = True, client_rack: Optional[str] = None,
                 consumer_timeout_ms: Optional[int] = None,
                 client_id: str = "shmq-consumer", spin_us: int = 50,
                 group_instance_id: Optional[str] = None, session_timeout_ms: int = 10000,
                 max_poll_interval_ms: int = 300000, heartbeat_interval_ms: Optional[int] = None,
                 partition_assignment_strategy: str = "sticky", isolation_level: str = "read_uncommitted",
                 retry_backoff_ms: int = 100, **unknown: Any) -> None:
        if unknown:
            raise InvalidConfig(f"unknown Consumer option(s): {', '.join(sorted(unknown))}")
        if isolation_level not in ISOLATION_LEVELS:
            raise InvalidConfig(f"isolation_level={isolation_level!r} must be one of {ISOLATION_LEVELS}")
        self.isolation_level = isolation_level
        if auto_offset_reset not in RESETS:
            raise InvalidConfig(f"auto_offset_reset={auto_offset_reset!r} must be one of {RESETS}")
        for name, v in (("auto_commit_interval_ms", auto_commit_interval_ms), ("max_poll_records", max_poll_records),
                        ("retry_backoff_ms", retry_backoff_ms)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise InvalidConfig(f"{name}={v!r} must be a positive int")
        self._cluster = Cluster(root)
        self._leaders_version = self._cluster.version()
        if group_id is not None:
            from .root import validate_group
            validate_group(group_id)
        self.group_id = group_id
        self.client_id = client_id
        self.auto_offset_reset = auto_offset_reset
        self.enable_auto_commit = bool(enable_auto_commit) and group_id is not None
        self._auto_commit_s = auto_commit_interval_ms / 1000
        self._next_auto_commit = time.monotonic() + self._auto_commit_s
        self.max_poll_records = max_poll_records
        self._retry_backoff_s = retry_backoff_ms / 1000
        # The C poll names here a partition whose read failed (it hands the
        # call to the Python path, which reads that partition first to raise
        # its error); the Python consume's top-up does the same.
        self._read_failed: Optional[_Assigned] = None
        self._value_de = value_deserializer
        self._key_de = key_deserializer
        self._check_crcs = check_crcs
        self._tether = tether
        if client_rack is not None and (not isinstance(client_rack, str) or not client_rack):
            raise InvalidConfig(f"client_rack={client_rack!r} must be a non-empty str")
        self.client_rack = client_rack
        self._consumer_timeout = None if consumer_timeout_ms is None else consumer_timeout_ms / 1000
        self._spin_us = spin_us
        self._assigned: Dict[TopicPartition, _Assigned] = {}
        self._order: List[_Assigned] = []
        self._rr = 0
        self._buffer: Deque[Message] = deque()
        self._buffer_tp: Optional[_Assigned] = None
        self._subscription: Tuple[str, ...] = ()
        self._closed = False
        self._group: Any = None                 # GroupMember when subscribed to a group
        self._group_version = -1
        self._gens: Dict[TopicPartition, int] = {}
        self._listeners: Tuple[Any, Any, Any] = (None, None, None)
        self._fast: Any = None                  # the C poll (shmq/native/fastpath.c), attached below
        self._group_opts = {"group_instance_id": group_instance_id, "session_timeout_ms": session_timeout_ms,
                            "max_poll_interval_ms": max_poll_interval_ms,
                            "heartbeat_interval_ms": heartbeat_interval_ms,
                            "assignor": partition_assignment_strategy}
        if topics:
            self.subscribe(list(topics))
        fastpath.attach_consumer(self)

    def _changed(self) -> None:
        """The assignment, a pause state or a reader changed: the C poll re-arms."""
        if self._fast is not None:
            self._fast.disarm()

    # ------------------------------------------------------------ assignment
    def subscribe(self, topics: Any = (), on_assign: Optional[Callable[[List[TopicPartition]], None]] = None,
                  on_revoke: Optional[Callable[[List[TopicPartition]], None]] = None,
                  on_lost: Optional[Callable[[List[TopicPartition]], None]] = None,
                  pattern: Optional[str] = None) -> None:
        """Subscribe to ``topics`` (names; a name starting with ``^`` or a
        compiled ``re.Pattern`` is a regex, as is ``pattern``). With a
        ``group_id`` the group's coordinator assigns partitions (see the module
        doc); without one every partition of the topics is assigned here."""
        self._check_open()
        if isinstance(topics, (str, re.Pattern)):
            topics = [topics]
        names: List[str] = []
        for t in topics:
            if isinstance(t, re.Pattern):
                pattern = t.pattern
            elif isinstance(t, str) and t.startswith("^"):
                pattern = t
            else:
                names.append(t)
        if pattern is not None and names:
            raise InvalidConfig("subscribe takes topic names or one pattern, not both")
        if pattern is not None:
            try:
                rx = re.compile(pattern)
            except re.error as e:
                raise InvalidConfig(f"bad subscription pattern {pattern!r}: {e}") from None
        self._leave_group()
        self._listeners = (on_assign, on_revoke, on_lost)
        self._subscription = (pattern,) if pattern is not None else tuple(names)
        if self.group_id is None:
            if pattern is not None:
                names = [t for t in self._cluster.topics() if rx.fullmatch(t)]
            tps = []
            for t in names:
                info = self._cluster.topic(t)
                tps.extend(TopicPartition(t, p) for p in range(info.partitions))
            self.assign(tps)
            if on_assign is not None:
                on_assign(list(tps))
            return
        for t in names:
            self._cluster.topic(t)              # unknown topic: a clear error now
        from .group_member import GroupMember
        self.assign([])
        o = self._group_opts
        self._group = GroupMember(self._cluster.root, self.group_id, topics=names if pattern is None else None,
                                  pattern=pattern, client_id=self.client_id,
                                  group_instance_id=o["group_instance_id"],
                                  session_timeout_ms=o["session_timeout_ms"],
                                  max_poll_interval_ms=o["max_poll_interval_ms"],
                                  heartbeat_interval_ms=o["heartbeat_interval_ms"], assignor=o["assignor"])
        self._group.start()
        self._prewarm(names, pattern)
        self._apply_group()

    def _prewarm(self, names: List[str], pattern: Optional[str]) -> None:
        """Open (map) every partition log of the subscription in the background,
        so a partition moved here is consumed at once: mapping a log populates
        its page tables, tens of ms for a large ring."""
        import threading

        def run() -> None:
            try:
                topics = names if pattern is None else [t for t in self._cluster.topics()
                                                        if re.fullmatch(pattern, t)]
                for t in topics:
                    self._cluster.prewarm_replicas(t)
                    for p in range(self._cluster.topic(t).partitions):
                        if self._closed:
                            return
                        self._cluster.log(t, p)
            except Exception as e:          # only an optimisation
                log.debug("pre-opening partition logs failed: %s", e)

        threading.Thread(target=run, name="shmq-prewarm", daemon=True).start()

    def _leave_group(self) -> None:
        g, self._group = self._group, None
        if g is not None:
            try:
                g.close()
            except Exception as e:
                log.warning("leaving group %s failed: %s", self.group_id, e)
            self._gens = {}
            self._group_version = -1

    def _apply_group(self) -> None:
        """Apply the group member's newest state (in the consumer's thread)."""
        g = self._group
        version, owned, revoke, lost = g.snapshot()
        self._group_version = version
        on_assign, on_revoke, on_lost = self._listeners
        have = set(self._assigned)
        if lost is not None:
            gone = sorted(have)
            self._gens = {}
            self._remove_partitions(have)
            have = set()
            if on_lost is not None:
                on_lost(gone)
            elif gone:
                raise CommitFailed(f"group {self.group_id!r}: this consumer lost its partitions "
                                   f"{', '.join(f'{t}-{p}' for t, p in gone)}: {lost}; it rejoins the group")
        revoking = sorted(TopicPartition(*tp) for tp in revoke if tp in have)
        # Assigned and already asked back before this consumer ever took them: just give them back.
        never_had = [TopicPartition(*tp) for tp in revoke if tp not in have]
        if never_had:
            g.ack_revoked(never_had)
        if revoking:
            if self.enable_auto_commit:
                offsets = {tp: self._assigned[tp].position for tp in revoking
                           if self._assigned[tp].position is not None}
                if offsets:
                    try:
                        self._cluster.commit_offsets(self.group_id, offsets, sync=False,  # type: ignore[arg-type]
                                                     generations=self._gens)
                    except ShmqError as e:             # e.g. CommitFailed, or the topic was deleted
                        log.warning("commit before revocation failed: %s", e)
            if on_revoke is not None:
                on_revoke(list(revoking))
            self._remove_partitions(set(revoking))
            for tp in revoking:
                self._gens.pop(tp, None)
            g.ack_revoked(list(revoking))
        # Partitions that went away without a revocation (none in normal operation).
        stale = {tp for tp in self._assigned if tp not in owned}
        if stale:
            self._remove_partitions(stale)
        added = sorted(TopicPartition(*tp) for tp in owned if tp not in revoke and tp not in self._assigned)
        self._gens = {TopicPartition(*tp): gen for tp, gen in owned.items() if tp not in revoke}
        if added:
            for tp in added:
                st = _Assigned(tp, self._read_log(tp), None)
                self._assigned[tp] = st
                self._order.append(st)
            if on_assign is not None:
                on_assign(list(added))
        self._changed()

    def _remove_partitions(self, tps: Any) -> None:
        if not tps:
            return
        if self._buffer_tp is not None and self._buffer_tp.tp in tps:
            self._drop_buffer()
        for tp in tps:
            _close_reader(self._assigned.pop(tp, None))
        if self._read_failed is not None and self._read_failed.tp in tps:
            self._read_failed = None
        self._order = [st for st in self._order if st.tp not in tps]
        self._changed()

    def subscription(self) -> Tuple[str, ...]:
        return self._subscription

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Replace the assignment with exactly ``partitions``."""
        self._check_open()
        if self._group is not None:
            raise IllegalState(f"this consumer is subscribed to group {self.group_id!r}: its coordinator "
                               f"assigns partitions; unsubscribe() before assign()")
        wanted = []
        for tp in partitions:
            if not isinstance(tp, tuple) or len(tp) != 2:
                raise InvalidConfig(f"assign() takes TopicPartition(topic, partition) items, got {tp!r}")
            tp = TopicPartition(*tp)
            info = self._cluster.topic(tp.topic)
            if not isinstance(tp.partition, int) or not 0 <= tp.partition < info.partitions:
                raise UnknownTopicOrPartition(
                    f"partition {tp.partition!r} of topic {tp.topic!r} does not exist (it has {info.partitions})",
                    topic=tp.topic, partition=tp.partition if isinstance(tp.partition, int) else None)
            wanted.append(tp)
            self._cluster.prewarm_replicas(tp.topic)
        keep = {tp: self._assigned[tp] for tp in wanted if tp in self._assigned}
        for tp, st in self._assigned.items():
            if tp not in keep:
                _close_reader(st)
        for tp in wanted:
            if tp not in keep:
                keep[tp] = _Assigned(tp, self._read_log(tp), None)
            keep[tp].retry_at = 0.0          # assigning a set-aside partition again retries it
        self._read_failed = None
        self._assigned = keep
        self._order = list(keep.values())
        self._drop_buffer()
        self._changed()

    def unsubscribe(self) -> None:
        if self._group is not None and self.enable_auto_commit:
            self._commit_positions(sync=True)
        self._leave_group()
        self._subscription = ()
        self.assign([])

    def assignment(self) -> List[TopicPartition]:
        return [a.tp for a in self._order]

    def _state(self, tp: TopicPartition) -> _Assigned:
        st = self._assigned.get(TopicPartition(*tp))
        if st is None:
            raise IllegalState(f"{tp[0]}-{tp[1]} is not assigned to this consumer", topic=tp[0], partition=tp[1])
        return st

    # -------------------------------------------------------------- positions
    def _reset_position(self, st: _Assigned, why: str) -> None:
        if self.auto_offset_reset == "none":
            raise NoOffsetForPartition(f"{st.tp.topic}-{st.tp.partition}: {why} and auto_offset_reset='none'",
                                       topic=st.tp.topic, partition=st.tp.partition)
        off = st.log.start_offset if self.auto_offset_reset == "earliest" else self._high(st.tp, st.log)
        self._seek_state(st, off)

    def _seek_state(self, st: _Assigned, offset: int) -> None:
        if self._buffer_tp is st:
            self._drop_buffer()
        st.out_of_range = False
        st.retry_at = 0.0                # a seek (or a new log) reads the partition again at once
        self._changed()
        try:
            if st.reader is None:
                st.reader = self._reader(st.tp, st.log, offset)
            else:
                st.reader.seek(offset)
        except OffsetOutOfRange:
            st.out_of_range = True
        st.position = offset

    def _reader(self, tp: TopicPartition, plog: Any, offset: int) -> LogReader:
        reader = LogReader(plog, offset, check_crc=self._check_crcs, spin_us=self._spin_us,
                           max_records=max(1024, self.max_poll_records), tether=self._tether,
                           kind=lib.SHMQ_READER_KIND_CONSUMER, label=self.group_id or self.client_id)
        if self.isolation_level == "read_committed":
            reader.set_read_committed(self._cluster.client.root.txn_index_path(tp[0], tp[1]))
        return reader

    def _high(self, tp: TopicPartition, plog: Any) -> int:
        """The high watermark of this consumer's isolation level (read_committed: the LSO)."""
        if self.isolation_level != "read_committed":
            return plog.high_watermark
        st = self._assigned.get(tp)
        if st is not None and st.reader is not None and st.log is plog:
            return st.reader.stable_offsets()[0]
        return stable_offset(plog, self._cluster.client.root.txn_index_path(tp[0], tp[1]))

    def consumer_group_metadata(self) -> ConsumerGroupMetadata:
        """This member's group identity, for ``Producer.send_offsets_to_transaction``."""
        if self.group_id is None:
            raise IllegalState("consumer_group_metadata() needs a group_id")
        g = self._group
        return ConsumerGroupMetadata(self.group_id, -1 if g is None or g.generation is None else g.generation,
                                     "" if g is None or g.member_id is None else g.member_id,
                                     None if g is None else getattr(g, "group_instance_id", None),
                                     dict(self._gens) if g is not None else {})

    def _check_range(self, st: _Assigned) -> None:
        """Apply auto_offset_reset to a position the log does not hold."""
        if st.out_of_range:
            log.warning("%s-%d: offset %s is out of range; resetting to %s", st.tp.topic, st.tp.partition,
                        st.position, self.auto_offset_reset)
            self._reset_position(st, f"offset {st.position} is out of range")

    def _overrun(self, st: _Assigned, e: OffsetOutOfRange) -> None:
        """An overwriting ring recycled records at this consumer's position:
        say how many it missed, then apply auto_offset_reset ('none' raises)."""
        if self.auto_offset_reset == "none":
            raise e
        log.warning("%s-%d: position %s is out of range (%d records missed); resetting to %s", st.tp.topic,
                    st.tp.partition, st.position, e.missed, self.auto_offset_reset)
        self._reset_position(st, f"position {st.position} is out of range")

    def _init_position(self, st: _Assigned) -> None:
        committed = self.committed(st.tp) if self.group_id else None
        if committed is None:
            self._reset_position(st, "no committed offset")
            return
        self._seek_state(st, committed)
        self._check_range(st)  # a committed offset retention removed: reset now

    def position(self, tp: TopicPartition) -> int:
        """Offset of the next record ``poll`` will return for ``tp``."""
        st = self._state(tp)
        if st.position is None:
            self._init_position(st)
        assert st.position is not None
        return st.position

    def seek(self, tp: TopicPartition, offset: int) -> None:
        """Make ``offset`` the next record returned for ``tp``."""
        if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
            raise InvalidConfig(f"seek offset must be a non-negative int, got {offset!r}")
        self._seek_state(self._state(tp), offset)

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        for st in self._targets(partitions):
            self._seek_state(st, st.log.start_offset)

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        for st in self._targets(partitions):
            self._seek_state(st, self._high(st.tp, st.log))

    def _targets(self, partitions: Sequence[TopicPartition]) -> List[_Assigned]:
        if len(partitions) == 1 and isinstance(partitions[0], list):
            partitions = partitions[0]  # type: ignore[assignment]
        return [self._state(tp) for tp in partitions] if partitions else list(self._order)

    def get_watermark_offsets(self, tp: TopicPartition) -> Tuple[int, int]:
        """(low, high): the log start offset and the high watermark (the log
        end offset without replication; read_committed: the last stable
        offset): the offsets a consumer can read."""
        tp = TopicPartition(*tp)
        plog = self._cluster.log(tp.topic, tp.partition)
        return plog.start_offset, self._high(tp, plog)

    def offsets_for_times(self, timestamps: Dict[TopicPartition, int]) -> Dict[TopicPartition, Optional[OffsetAndTimestamp]]:
        """For each partition, the earliest offset whose timestamp is >= the
        given one (None when there is none), as Kafka's offsetsForTimes."""
        out: Dict[TopicPartition, Optional[OffsetAndTimestamp]] = {}
        for tp, ts in timestamps.items():
            tp = TopicPartition(*tp)
            plog = self._cluster.log(tp.topic, tp.partition)
            reader = LogReader(plog, plog.start_offset, buffer_bytes=plog.max_frame_bytes, max_records=1, tether=False)
            off = reader.seek_to_time(int(ts))
            recs = reader.read(1)
            out[tp] = OffsetAndTimestamp(off, recs[0].timestamp_ms) if recs and recs[0].offset == off else None
        return out

    def pause(self, *partitions: TopicPartition) -> None:
        self._changed()
        for st in self._targets(partitions):
            st.paused = True
            if self._buffer_tp is st:
                self._drop_buffer()

    def resume(self, *partitions: TopicPartition) -> None:
        self._changed()
        for st in self._targets(partitions):
            st.paused = False

    def paused(self) -> List[TopicPartition]:
        return [st.tp for st in self._order if st.paused]

    # ------------------------------------------------------------------ fetch
    def _drop_buffer(self) -> None:
        """Forget buffered records (the C poll's too); the reader goes back to the position."""
        if self._fast is not None:
            self._fast.drop()
        st = self._buffer_tp
        self._buffer.clear()
        self._buffer_tp = None
        if st is not None and st.reader is not None and st.position is not None:
            st.reader.seek(st.position)

    def _read_log(self, tp: TopicPartition) -> Any:
        """The log to read ``tp`` from: its leader's, or with ``client_rack`` an
        in-sync follower's in that rack (KIP-392 follower fetching)."""
        return self._cluster.read_log(tp.topic, tp.partition, self.client_rack)

    def _follow_leaders(self) -> None:
        """After a metadata change: read each replicated partition from its
        current leader's log (or preferred read replica's), at the same
        position (offsets are the same in every replica)."""
        self._leaders_version = self._cluster.version()
        self._changed()
        failed: Optional[KafkaStorageError] = None
        for st in self._order:
            try:
                plog = self._read_log(st.tp)
            except (LeaderNotAvailable, UnknownTopicOrPartition):
                continue                 # keep reading what the old leader had below its high watermark
            except KafkaStorageError as e:
                self._set_aside(st, e)
                failed = failed or e
                continue
            if plog is not st.log:
                log.info("%s-%d: reading from the log %s", st.tp.topic, st.tp.partition, plog.path)
                if self._buffer_tp is st:
                    self._drop_buffer()
                _close_reader(st)
                st.log = plog
                st.retry_at = 0.0        # a set-aside partition is retried on its new log
                if st.position is not None:
                    try:
                        self._seek_state(st, st.position)
                    except KafkaStorageError as e:
                        self._set_aside(st, e)
                        failed = failed or e
        if failed is not None:
            raise failed

    def _set_aside(self, st: _Assigned, e: KafkaStorageError) -> KafkaStorageError:
        """A read of ``st`` failed with ``e`` (raised by the caller): set the
        partition aside for retry_backoff_ms; the others go on (the C poll
        re-arms without it)."""
        (log.warning if st.retry_at == 0.0 else log.debug)(
            "%s-%d: %s; set aside, read again in %d ms", st.tp.topic, st.tp.partition, e,
            round(self._retry_backoff_s * 1000))
        st.retry_at = time.monotonic() + self._retry_backoff_s
        if self._read_failed is st:
            self._read_failed = None
        self._changed()
        return e

    def _ready(self, st: _Assigned) -> LogReader:
        """The reader of ``st`` at its position: set up when the partition is
        first read, auto_offset_reset applied to a position out of range."""
        if st.position is None:
            self._init_position(st)
        if st.out_of_range:
            self._check_range(st)
        assert st.reader is not None
        return st.reader

    def _fetch_from(self, st: _Assigned, max_records: int, timeout: float, defer: bool = False) -> List[Message]:
        """Records of ``st``, waiting up to timeout. A KafkaStorageError sets
        the partition aside and is raised; with ``defer`` it is not raised
        but left for the next call to raise (``_read_failed``)."""
        try:
            try:
                return self._ready(st).read_as(Message, st.tp.topic, st.tp.partition, max_records, timeout)
            except OffsetOutOfRange as e:
                self._overrun(st, e)
                return []
        except KafkaStorageError as e:
            if defer:
                self._read_failed = st
                return []
            raise self._set_aside(st, e)

    def _fetch(self, max_records: int, timeout: float, defer: bool = False
               ) -> Tuple[Optional[_Assigned], List[Message]]:
        """Records from the next partition that has some, waiting up to
        timeout. Set-aside partitions (see ``_set_aside``) are skipped until
        their retry time, which bounds a wait."""
        deadline = time.monotonic() + timeout
        st = self._read_failed
        if st is not None:               # named by the C poll: read it first, to raise its error
            self._read_failed = None
            if not st.paused and any(s is st for s in self._order):
                recs = self._fetch_from(st, max_records, 0.0, defer)
                if recs:
                    return st, recs
        while True:
            if self._leaders_version != self._cluster.version():
                self._follow_leaders()
            now = time.monotonic()
            retry = deadline             # the first retry time of a set-aside partition, if sooner
            active = []
            for st in self._order:
                if st.paused:
                    continue
                if st.retry_at > now:
                    retry = min(retry, st.retry_at)
                    continue
                active.append(st)
            n = len(active)
            if n == 0:
                if timeout > 0:
                    time.sleep(max(0.0, min(retry - now, 0.01)))
                if time.monotonic() >= deadline:
                    return None, []
                continue
            for k in range(n):
                st = active[(self._rr + k) % n]
                recs = self._fetch_from(st, max_records, 0.0, defer)
                if recs:
                    self._rr = (self._rr + k + 1) % n
                    return st, recs
            left = deadline - time.monotonic()
            if left <= 0:
                return None, []
            wait = min(left, retry - now)
            if n == 1:
                st = active[0]
                recs = self._fetch_from(st, max_records, max(wait, 0.0), defer)
                if recs:
                    return st, recs
                if wait >= left:
                    return None, []
                continue                 # a set-aside partition is due: read it again
            # Several partitions: wait on each in turn for a short slice.
            st = active[self._rr % n]
            self._rr = (self._rr + 1) % n
            recs = self._fetch_from(st, max_records, max(0.0, min(wait, 0.001)), defer)
            if recs:
                return st, recs

    def _group_fetch(self, max_records: int, timeout: float) -> Tuple[Optional[_Assigned], List[Message]]:
        """``_fetch`` in short slices, applying group changes in between."""
        deadline = time.monotonic() + timeout
        g = self._group
        while True:
            left = deadline - time.monotonic()
            st, recs = self._fetch(max_records, max(0.0, min(left, 0.005)))
            if recs or left <= 0:
                return st, recs
            g.last_poll = time.monotonic()
            if g.version != self._group_version:
                self._apply_group()

    def _deliver(self, st: _Assigned, recs: List[Message]) -> List[Message]:
        st.position = recs[-1].offset + 1
        if self._value_de is not None or self._key_de is not None:
            vd, kd = self._value_de, self._key_de
            recs = [m._replace(value=vd(m.value) if vd and m.value is not None else m.value,
                               key=kd(m.key) if kd and m.key is not None else m.key) for m in recs]
        return recs

    def _begin_poll(self, spill: bool = True) -> Any:
        """What every poll, consume and consume_arrays does first: mark the
        member alive for max_poll_interval_ms, apply a new group assignment,
        auto-commit what was already returned. Returns the group state.
        ``spill``: records the C poll read ahead join the record buffer."""
        self._check_open()
        if spill and self._fast is not None and self._buffer_tp is not None and not self._buffer:
            self._buffer.extend(self._fast.take())
        g = self._group
        if g is not None:
            g.last_poll = time.monotonic()
            if g.version != self._group_version:
                self._apply_group()
        self._maybe_auto_commit()
        return g

    def poll(self, timeout: float = 1.0) -> Optional[Message]:
        """The next record, or None if none arrives within ``timeout`` seconds."""
        _check_timeout(timeout)
        g = self._begin_poll()
        if not self._buffer:
            st, recs = self._fetch(self.max_poll_records, timeout) if g is None else \
                self._group_fetch(self.max_poll_records, timeout)
            if not recs:
                return None
            self._buffer.extend(recs)
            self._buffer_tp = st
        msg = self._buffer.popleft()
        st = self._buffer_tp
        assert st is not None
        st.position = msg.offset + 1
        if not self._buffer:
            self._buffer_tp = None
        if self._value_de is not None or self._key_de is not None:
            return self._deliver(st, [msg])[0]
        return msg

    def consume(self, num_messages: int = 1, timeout: float = -1) -> List[Message]:
        """Up to ``num_messages`` records, waiting up to ``timeout`` seconds for
        the first (``-1``: wait indefinitely)."""
        g = self._begin_poll()
        if not isinstance(num_messages, int) or num_messages <= 0:
            raise InvalidConfig(f"num_messages={num_messages!r} must be a positive int")
        if timeout is not None:
            _check_timeout(timeout)
        out: List[Message] = []
        if self._buffer:
            st = self._buffer_tp
            assert st is not None
            while self._buffer and len(out) < num_messages:
                out.append(self._buffer.popleft())
            if not self._buffer:
                self._buffer_tp = None
            return self._deliver(st, out)
        wait = 1e9 if timeout is None or timeout < 0 else timeout
        st2, recs = self._fetch(num_messages, wait) if g is None else self._group_fetch(num_messages, wait)
        if not recs:
            return []
        out = self._deliver(st2, recs)  # type: ignore[arg-type]
        # Top up from the other partitions without waiting, as Kafka's
        # consume(n) returns records of every partition that has some.
        for _ in range(len(self._order) - 1):
            if len(out) >= num_messages:
                break
            try:                         # a read error: the next call raises it (defer)
                st3, more = self._fetch(num_messages - len(out), 0.0, defer=True)
            except KafkaStorageError:    # from _follow_leaders: set aside, raised on its retry
                break
            if not more:
                break
            out.extend(self._deliver(st3, more))  # type: ignore[arg-type]
        return out

    def consume_arrays(self, num_messages: int = 65536, timeout: float = 0.0
                       ) -> Optional[Tuple[TopicPartition, RecordArrays]]:
        """Bulk variant: (partition, RecordArrays) from one partition — numpy
        arrays of offsets and timestamps, values as a 2-D uint8 array when they
        are fixed-width — or None when nothing arrives within ``timeout``."""
        self._begin_poll()
        if self._buffer:
            self._drop_buffer()
        deadline = time.monotonic() + timeout
        rr = 0
        while True:
            if self._leaders_version != self._cluster.version():
                self._follow_leaders()
            now = time.monotonic()
            left = deadline - now
            active = [s for s in self._order if not s.paused and s.retry_at <= now]
            # A set-aside partition due before the deadline bounds the wait (then it is read again).
            left = min([left] + [s.retry_at - now for s in self._order if s.retry_at > now and not s.paused])
            for k, st in enumerate(active):
                # After a full empty round, block on one partition (its futex):
                # the whole wait when it is the only one, else a short slice.
                wait = 0.0 if k or rr == 0 or left <= 0 else (left if len(active) == 1 else min(left, 0.001))
                try:
                    try:
                        arrs = self._ready(st).read_arrays(num_messages, timeout=wait)
                    except OffsetOutOfRange as e:
                        self._overrun(st, e)
                        continue
                except KafkaStorageError as e:
                    raise self._set_aside(st, e)
                if arrs is not None:
                    st.position = int(arrs.offsets[-1]) + 1
                    if len(active) > 1:  # the next call starts with the next partition
                        self._order.append(self._order.pop(self._order.index(st)))
                    return st.tp, arrs
            rr += 1
            if time.monotonic() >= deadline and rr > 1:
                return None
            if not active:
                time.sleep(min(max(left, 0.0), 0.01))

    def __iter__(self) -> "Consumer":
        return self

    def __next__(self) -> Message:
        deadline = None if self._consumer_timeout is None else time.monotonic() + self._consumer_timeout
        while True:
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            msg = self.poll(wait)
            if msg is not None:
                return msg
            if deadline is not None and time.monotonic() >= deadline:
                raise StopIteration

    # --------------------------------------------------------------- commits
    def _maybe_auto_commit(self) -> None:
        if self.enable_auto_commit and time.monotonic() >= self._next_auto_commit:
            self._next_auto_commit = time.monotonic() + self._auto_commit_s
            try:
                self._commit_positions(sync=False)
            except CommitFailed as e:               # the group state will catch up
                log.warning("auto-commit failed: %s", e)

    def _commit_positions(self, sync: bool) -> None:
        offsets = {st.tp: st.position for st in self._order if st.position is not None}
        if offsets:
            self._cluster.commit_offsets(self.group_id, offsets, sync=sync,  # type: ignore[arg-type]
                                         generations=self._gens if self._group is not None else None)

    def commit(self, message: Optional[Message] = None, offsets: Optional[Dict[TopicPartition, int]] = None,
               asynchronous: bool = True) -> Dict[TopicPartition, int]:
        """Commit offsets for the group: those of ``offsets`` (the next offset
        to read, as Kafka), else the one after ``message``, else the current
        positions. With ``asynchronous=False`` returns once they are durable."""
        self._check_open()
        if self.group_id is None:
            raise IllegalState("commit needs a group_id")
        if offsets is not None:
            todo = {tp if type(tp) is TopicPartition else TopicPartition(*tp): o for tp, o in offsets.items()}
        elif message is not None:
            if not isinstance(message, Message) or type(message.offset) is not int:
                raise InvalidConfig(f"commit(message=...) takes a Message, got {type(message).__name__}")
            todo = {TopicPartition(message.topic, message.partition): message.offset + 1}
        else:
            todo = {st.tp: st.position for st in self._order if st.position is not None}
        for tp, o in todo.items():
            if type(o) is not int or o < 0:
                raise InvalidConfig(f"commit offset for {tp.topic}-{tp.partition} must be a non-negative int, got {o!r}")
        if todo:
            self._cluster.commit_offsets(self.group_id, todo, sync=not asynchronous,
                                         generations=self._gens if self._group is not None else None)
        return todo

    def committed(self, tp: TopicPartition, timeout: Optional[float] = None) -> Optional[int]:
        """The group's committed offset for ``tp`` (None if there is none)."""
        if self.group_id is None:
            return None
        tp = TopicPartition(*tp)
        return self._cluster.fetch_offsets(self.group_id, [tp]).get(tp)

    def lag(self, tp: TopicPartition) -> int:
        """High watermark (read_committed: the LSO) minus this consumer's position."""
        tp = TopicPartition(*tp)
        return self._high(tp, self._cluster.log(tp.topic, tp.partition)) - self.position(tp)

    # -------------------------------------------------------------- lifecycle
    def _check_open(self) -> None:
        if self._closed:
            raise IllegalState("the consumer is closed")

    def close(self, autocommit: bool = True) -> None:
        if self._closed:
            return
        if autocommit and self.enable_auto_commit:
            try:
                self._commit_positions(sync=True)
            except Exception as e:  # closing must not fail on a coordinator hiccup
                log.warning("final commit failed: %s", e)
        self._leave_group()
        self._closed = True
        fastpath.detach(self)
        for st in self._assigned.values():
            _close_reader(st)
        self._assigned.clear()
        self._order = []
        self._buffer.clear()
        self._cluster.close()

    def __enter__(self) -> "Consumer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _close_reader(st: Optional[_Assigned]) -> None:
    """Give an unassigned partition's reader slot back (it stops holding producers)."""
    if st is not None and st.reader is not None:
        st.reader.close()
        st.reader = None


def _check_timeout(timeout: Any) -> None:
    if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or timeout != timeout:
        raise InvalidConfig(f"timeout={timeout!r} must be a number of seconds")


__all__ = ["Consumer", "ConsumerGroupMetadata"]
