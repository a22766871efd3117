"""Producer: sends records to topics, appending straight into the partition logs.

There is no broker between a producer and the log: ``send`` picks the
partition, then one C call claims a frame in that partition's active segment,
encodes the Kafka batch in place and commits it. So ``send`` returns the
record's final ``RecordMetadata`` (no future to wait for) and ``flush`` has
nothing to wait for while no replication is configured.

A Producer is safe to use from several threads (the append is lock-free);
create one per process.

Replicated topics (``replication_factor`` > 1): records go to the partition
leader's log. With ``acks="all"`` a send returns only once the high
watermark passed the record (every in-sync replica has it) and fails fast
with ``NotEnoughReplicas`` while the ISR is smaller than
``min_insync_replicas``. ``acks="all"`` turns idempotence on by default:
the producer gets an id and epoch from the coordinator and numbers its
batches per partition; the partition's producer-state table stores each
batch once, so a send retried after a failover (when it cannot know whether
the first attempt was stored) is never stored twice. Sends that meet a
leader change are retried on the new leader until ``delivery_timeout_ms``.

Transactions (``transactional_id``, Kafka's API): ``init_transactions()``
once, then ``begin_transaction()``, sends, optionally
``send_offsets_to_transaction(offsets, consumer.consumer_group_metadata())``,
and ``commit_transaction()`` or ``abort_transaction()``. Records are
appended at once, as transactional batches with the producer's id, epoch
and sequences (through the partition's producer-state table, which fences
an older instance). A transaction that writes only partitions the
transactional id added before and sends no offsets is run by the producer
itself, with no coordinator call: it opens its rows in the partitions'
transaction indexes, writes the COMMIT markers and closes the rows
(``_commit_here``); otherwise (a new partition, offsets, an abort) the
coordinator runs it and writes the markers. On unreplicated partitions
already added to the open transaction, ``send`` is the C send
(``shmq/native/fastpath.c``); the first send to a partition, and replicated
topics, take the Python path below.
"""
from __future__ import annotations

import os
import signal
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from .cluster import Cluster
from .errors import (CommitFailed, DuplicateSequenceNumber, IllegalState, InvalidConfig, InvalidRecord,
                     InvalidTxnState, KafkaTimeoutError, LeaderNotAvailable, NotEnoughReplicas, NotLeaderForPartition,
                     ProducerFenced, UnknownTopicOrPartition)
from .message import Header, RecordMetadata
from .native import fastpath, ffi, lib
from .partitioner import Partitioner
from .ringlog import PartitionLog
from .ringlog.records import encode_headers

ACKS = (0, 1, "all", -1)
_NULL = ffi.NULL
_time_ns = time.time_ns
METADATA_RECHECK_MS = 100  # a producer notices added partitions and deleted topics this soon
_new_tuple = tuple.__new__
_NOT_LEADER = lib.SHMQ_ERR_NOT_LEADER
# Fault injection for tests: a producer committing a transaction it runs
# itself SIGKILLs itself after writing this many of its COMMIT markers.
TXN_DIE_ENV = "SHMQ_TEST_TXN_DIE_AFTER_MARKERS"


MAX_IN_FLIGHT = 4096   # send_async batches per partition awaiting acknowledgement


class _Pending:
    """A batch appended by ``send_async`` and not yet acknowledged: enough to
    append it again, with the same sequence, on a new leader."""

    __slots__ = ("seq", "count", "records", "offset", "log", "done")

    def __init__(self, seq: int, count: int, records: Tuple[Any, Any, Any, int, bool], offset: int,
                 log: PartitionLog) -> None:
        self.seq, self.count, self.records, self.offset, self.log = seq, count, records, offset, log
        self.done = False


class DeliveryFuture:
    """What ``send_async`` returns: ``get()`` waits until every in-sync replica
    has the record and returns its ``RecordMetadata`` (its offset may differ
    from the first append's if a failover made the producer append it again)."""

    __slots__ = ("_producer", "_key", "_pending", "_ts", "_metadata")

    def __init__(self, producer: "Producer", key: Tuple[str, int], pending: Optional[_Pending], ts: int,
                 metadata: Optional[RecordMetadata] = None) -> None:
        self._producer, self._key, self._pending, self._ts, self._metadata = producer, key, pending, ts, metadata

    def done(self) -> bool:
        return self._metadata is not None or (self._pending is not None and self._pending.done)

    def get(self, timeout: Optional[float] = None) -> RecordMetadata:
        if self._metadata is None:
            p = self._pending
            assert p is not None
            if not p.done:
                self._producer._drain(self._key, time.monotonic() + (
                    self._producer._delivery_timeout if timeout is None else timeout), upto=p)
            self._metadata = _new_tuple(RecordMetadata, (self._key[0], self._key[1], p.offset, self._ts))
        return self._metadata


class _InDoubt(Exception):
    """Internal: retry an in-doubt idempotent batch after a short wait."""


class _TopicRoute:
    """A topic's partitions as the producer sends to them (refreshed when the
    published metadata version changes)."""

    __slots__ = ("name", "logs", "handles", "count", "max_bytes", "fast", "replicated", "min_isr", "pstates")

    def __init__(self, name: str, logs: List[Optional[PartitionLog]], max_bytes: int, replicated: bool = False,
                 min_isr: int = 1, acks_all: bool = False) -> None:
        self.name = name
        self.replicated = replicated
        self.min_isr = min_isr
        # acks="all" on a replicated topic waits for the high watermark: not the fast path.
        self.fast = not (replicated and acks_all) and all(log is not None for log in logs)
        self.logs = logs
        self.handles = [_NULL if log is None else log._h for log in logs]
        self.count = len(logs)
        self.max_bytes = max_bytes
        self.pstates: Dict[int, Any] = {}

    def leader(self, partition: int) -> PartitionLog:
        plog = self.logs[partition]
        if plog is None:
            raise LeaderNotAvailable(f"partition {self.name}-{partition} has no leader right now",
                                     topic=self.name, partition=partition)
        return plog

    def pstate(self, partition: int) -> Any:
        """The producer-state table next to the leader's log (opened once per route)."""
        table = self.pstates.get(partition)
        if table is None:
            from .ringlog.producer_state import ProducerStateTable
            table = self.pstates[partition] = ProducerStateTable(self.leader(partition).path)
        return table

    def close(self) -> None:
        # Dropped, not closed: a C send route (a transactional producer's) may
        # still hold a table; the last reference closes it.
        self.pstates.clear()


class Producer:
    """Sends records to shmq topics.

    ``acks``: 0, 1 or ``"all"`` (Kafka's meaning; without replication all
    three are satisfied once the record is committed in the shared log).
    ``partitioner``: ``murmur2_random`` (default, Kafka's placement for keys,
    sticky for null keys), ``murmur2``, ``xxhash`` or ``roundrobin``.
    ``value_serializer`` / ``key_serializer`` turn other objects into bytes.
    """

    def __init__(self, root: Any = None, *, acks: Union[int, str, None] = None, partitioner: str = "murmur2_random",
                 value_serializer: Optional[Callable[[Any], bytes]] = None,
                 key_serializer: Optional[Callable[[Any], bytes]] = None,
                 max_block_ms: int = 60_000, client_id: str = "shmq-producer",
                 enable_idempotence: Optional[bool] = None, transactional_id: Optional[str] = None,
                 delivery_timeout_ms: int = 120_000, transaction_timeout_ms: int = 60_000, **unknown: Any) -> None:
        if unknown:
            raise InvalidConfig(f"unknown Producer option(s): {', '.join(sorted(unknown))}")
        if acks is None:                    # Kafka: a transactional producer defaults to acks="all"
            acks = "all" if transactional_id is not None else 1
        if not isinstance(transaction_timeout_ms, int) or isinstance(transaction_timeout_ms, bool) \
                or not 1 <= transaction_timeout_ms <= 900_000:
            raise InvalidConfig(f"transaction_timeout_ms={transaction_timeout_ms!r} must be an int in [1, 900000]")
        if acks not in ACKS:
            raise InvalidConfig(f"acks={acks!r} must be 0, 1 or 'all'")
        if not isinstance(max_block_ms, int) or max_block_ms < 0:
            raise InvalidConfig(f"max_block_ms={max_block_ms!r} must be a non-negative int")
        if not isinstance(delivery_timeout_ms, int) or delivery_timeout_ms <= 0:
            raise InvalidConfig(f"delivery_timeout_ms={delivery_timeout_ms!r} must be a positive int")
        self.acks = "all" if acks == -1 else acks
        if enable_idempotence is None:
            enable_idempotence = self.acks == "all" or transactional_id is not None
        if enable_idempotence and self.acks != "all":
            raise InvalidConfig(f"enable_idempotence=True needs acks='all' (got acks={acks!r}), as in Kafka")
        if transactional_id is not None and (not isinstance(transactional_id, str) or not transactional_id):
            raise InvalidConfig(f"transactional_id={transactional_id!r} must be a non-empty str")
        if transactional_id is not None and not enable_idempotence:
            raise InvalidConfig("transactional_id needs enable_idempotence=True, as in Kafka")
        self.enable_idempotence = bool(enable_idempotence)
        self.transactional_id = transactional_id
        self._delivery_timeout = delivery_timeout_ms / 1000
        self._producer_id = -1
        self._producer_epoch = -1
        self._sequences: Dict[Tuple[str, int], int] = {}
        self._seq_lock = __import__("threading").Lock()
        self._inflight: Dict[Tuple[str, int], Deque[_Pending]] = {}
        self.client_id = client_id
        self._partitioner = Partitioner(partitioner)
        self._value_ser = value_serializer
        self._key_ser = key_serializer
        self._timeout_ns = max_block_ms * 1_000_000
        self._cluster = Cluster(root)
        self._routes: Dict[str, _TopicRoute] = {}
        self._version = self._cluster.version()
        self._plain = value_serializer is None and key_serializer is None
        self._recheck_ms = 0  # the fast path re-checks metadata once this passes
        self._append_kv = lib.shmq_log_append_kv
        self._ts_out = ffi.new("int64_t *")
        self._closed = False
        self.transaction_timeout_ms = transaction_timeout_ms
        # Transactions (see the section below): None until init_transactions,
        # then "ready", "in_transaction" or "fatal"; the partitions added to
        # the open transaction; batch attributes of this producer's appends.
        self._txn_state: Optional[str] = None
        self._txn_parts: set = set()
        self._txn_offsets = False                # offsets were sent in the open transaction
        self._txn_error: Optional[BaseException] = None
        # Partitions the transactional id ever added (the coordinator keeps
        # them): a transaction on these alone is run here, with no
        # coordinator round trip (see "Transactions the producer runs itself").
        self._txn_registered: set = set()
        self._txn_rpc = False                    # the coordinator runs the open transaction (it added a partition)
        self._txn_start_ms = 0
        self._txn_committing = False             # a COMMIT marker of the open transaction is written
        self._txn_indexes: Dict[Tuple[str, int], Any] = {}
        self._attributes = 0
        self._fast: Any = None
        fastpath.attach_producer(self)     # send() in C for the common case (shmq/native/fastpath.c)

    # --------------------------------------------------------------- routing
    def _route(self, topic: str) -> _TopicRoute:
        """The cached route for topic, re-read when the metadata changed."""
        if self._closed:
            raise IllegalState("the producer is closed")
        version = self._cluster.version()
        if version != self._version:
            self._version = version
            for old in self._routes.values():
                old.close()
            self._routes.clear()
        route = self._routes.get(topic)
        if route is None:
            info = self._cluster.topic(topic)  # raises UnknownTopicOrPartition / InvalidTopic
            logs = [self._leader_log(topic, p) for p in range(info.partitions)]
            route = _TopicRoute(topic, logs, info.max_message_bytes, info.replicated, info.min_insync_replicas,
                                self.acks == "all")
            if self.transactional_id is not None:
                route.fast = False          # not this Python fast path: the C send takes transactions
            self._routes[topic] = route
            self._cluster.prewarm_replicas(topic)
        return route

    def _leader_log(self, topic: str, partition: int) -> Optional[PartitionLog]:
        """The partition's log, None while a replicated partition has no leader."""
        try:
            return self._cluster.log(topic, partition)
        except LeaderNotAvailable:
            return None

    def partitions_for(self, topic: str) -> List[int]:
        """The partition numbers of ``topic``."""
        return list(range(self._route(topic).count))

    # ------------------------------------------------------------------ send
    def send(self, topic: str, value: Any = None, key: Any = None, *, partition: Optional[int] = None,
             headers: Optional[Iterable[Header]] = None, timestamp_ms: Optional[int] = None) -> RecordMetadata:
        """Append one record; returns where it was stored.

        Raises ``UnknownTopicOrPartition``, ``InvalidRecord`` (a value or key
        that is not bytes-like and no serializer), ``MessageSizeTooLarge``,
        ``KafkaTimeoutError`` (a full ``overflow="block"`` topic past
        ``max_block_ms``).
        """
        # Fast path, the common case: bytes in, a cached route, no serializer,
        # headers or explicit timestamp. A few checks and one C call; every
        # other case, and a metadata re-check every 100 ms, go the full way.
        route = self._routes.get(topic)
        if route is not None and route.fast and headers is None and timestamp_ms is None \
                and type(value) is bytes and self._plain:
            vlen = len(value)
            if key is None:
                klen = -1
                size = vlen
            elif type(key) is bytes:
                klen = len(key)
                size = vlen + klen
            else:
                size = -1
            if 0 <= size <= route.max_bytes:
                if partition is None:
                    partition = self._partitioner(key, route.count)
                    ok = True
                else:
                    ok = type(partition) is int and 0 <= partition < route.count
                ts = _time_ns() // 1_000_000
                if ok and ts < self._recheck_ms:
                    off = self._append_kv(route.handles[partition], _NULL if key is None else key, klen,
                                          value, vlen, ts, self._timeout_ns)
                    if off < 0:
                        if off == _NOT_LEADER:       # a failover: the slow path retries on the new leader
                            return self._send(topic, value, key, partition, headers, timestamp_ms)
                        route.logs[partition]._fail(off, "send")
                    return _new_tuple(RecordMetadata, (topic, partition, off, ts))
        return self._send(topic, value, key, partition, headers, timestamp_ms)

    def _send(self, topic: str, value: Any, key: Any, partition: Optional[int],
              headers: Optional[Iterable[Header]], timestamp_ms: Optional[int],
              pending_out: Optional[List["_Pending"]] = None) -> RecordMetadata:
        """``send`` with every check (and the metadata re-check); with
        ``pending_out``, an acks="all" idempotent send does not wait (``send_async``)."""
        route = self._route(topic)
        self._recheck_ms = _time_ns() // 1_000_000 + METADATA_RECHECK_MS
        if self._value_ser is not None:
            value = self._value_ser(value)
        if key is not None:
            if self._key_ser is not None:
                key = self._key_ser(key)
            if type(key) is not bytes:
                key = _to_bytes(key, "key", topic)
            klen = len(key)
        else:
            klen = -1
        if type(value) is bytes:
            vlen = len(value)
            if vlen > route.max_bytes:
                self._too_large(route, partition, vlen)
        elif value is None:
            vlen = -1
        else:
            value = _to_bytes(value, "value", topic)
            vlen = len(value)
            if vlen > route.max_bytes:
                self._too_large(route, partition, vlen)
        if klen > 0 and klen + (vlen if vlen > 0 else 0) > route.max_bytes:
            self._too_large(route, partition, klen + (vlen if vlen > 0 else 0))
        if partition is None:
            partition = self._partitioner(key, route.count)
        elif type(partition) is not int or not 0 <= partition < route.count:
            route = self._check_partition(topic, partition)
        if timestamp_ms is None:
            ts = _time_ns() // 1_000_000
        elif type(timestamp_ms) is int and 0 <= timestamp_ms < 1 << 63:
            ts = timestamp_ms
        else:
            raise InvalidRecord(f"timestamp_ms must be a non-negative int64, got {timestamp_ms!r}", topic=topic)
        if self._attributes and not route.replicated and pending_out is None and not self._inflight \
                and self._txn_state == "in_transaction":
            self._txn_add(topic, partition)
            off = self._txn_append1(route, topic, partition, value, key, headers, ts)
        elif route.replicated or self.transactional_id is not None:
            off = self._send_replicated(topic, partition, 1, lambda plog, t: plog.append(
                value, key, headers, ts, t), ([value], [key] if key is not None else None, headers, ts, True),
                pending_out)
        elif headers is None:
            off = self._append_kv(route.handles[partition], _NULL if key is None else key, klen,
                                  _NULL if value is None else value, vlen, ts, self._timeout_ns)
            if off < 0:
                route.logs[partition]._fail(off, "send")
        else:
            off = route.logs[partition].append(value, key, headers, ts, self._timeout_ns / 1e9)
        return _new_tuple(RecordMetadata, (topic, partition, off, ts))

    def send_batch(self, topic: str, values: Union[Sequence[Any], np.ndarray],
                   keys: Optional[Union[Sequence[Any], np.ndarray]] = None, *,
                   partition: Optional[int] = None, timestamp_ms: Optional[int] = None) -> List[RecordMetadata]:
        """Send many records at once: a list of values (and keys), or a 2-D
        uint8 numpy array of fixed-width values.

        With ``partition`` (or without keys), the whole batch is one Kafka
        RecordBatch in one partition: one claim for all of it. With keys and no
        partition, records are grouped by their key's partition, one batch
        per partition, each partition's records kept in order. Returns one
        RecordMetadata per batch written (its offset is the batch's first
        offset); ``sum`` over them of the batch sizes equals ``len(values)``.
        """
        route = self._route(topic)
        if self._value_ser is not None and not isinstance(values, np.ndarray):
            values = [self._value_ser(v) for v in values]
        if keys is not None and self._key_ser is not None and not isinstance(keys, np.ndarray):
            keys = [None if k is None else self._key_ser(k) for k in keys]
        if timestamp_ms is None:
            ts = _time_ns() // 1_000_000
        elif type(timestamp_ms) is int and timestamp_ms >= 0:
            ts = timestamp_ms
        else:
            raise InvalidRecord(f"timestamp_ms must be a non-negative int, got {timestamp_ms!r}", topic=topic)
        # Check every record before anything is appended: a batch split over
        # several partitions must not leave some of them written on bad input.
        n, largest = _batch_field(values, "value", topic)
        if keys is not None:
            nk, klargest = _batch_field(keys, "key", topic)
            if nk != n:
                raise InvalidRecord(f"send_batch: {nk} keys for {n} values", topic=topic)
            if largest + klargest > route.max_bytes:      # rare: look at each record
                largest = max(map(_record_size, values, keys))
        if largest > route.max_bytes:
            self._too_large(route, partition if type(partition) is int else None, largest)
        if partition is not None:
            if type(partition) is not int or not 0 <= partition < route.count:
                route = self._check_partition(topic, partition)
            groups: List[Tuple[int, Any, Any]] = [(partition, values, keys)]
        elif keys is None:
            groups = [(self._partitioner(None, route.count), values, None)]
        else:
            by_part: Dict[int, List[int]] = {}
            key_list = keys.tolist() if isinstance(keys, np.ndarray) else keys
            for i, k in enumerate(key_list):
                kb = bytes(k) if isinstance(k, list) else k
                by_part.setdefault(self._partitioner(kb, route.count), []).append(i)
            groups = []
            for p, idx in sorted(by_part.items()):
                if isinstance(values, np.ndarray):
                    vs: Any = values[idx]
                else:
                    vs = [values[i] for i in idx]
                ks = keys[idx] if isinstance(keys, np.ndarray) else [keys[i] for i in idx]
                groups.append((p, vs, ks))
        out = []
        if self.transactional_id is not None:
            self._txn_add(topic, *(g[0] for g in groups))     # one AddPartitionsToTxn for the whole batch
        for p, vs, ks in groups:
            if route.replicated or self.transactional_id is not None:
                n_recs = len(vs)
                off = self._send_replicated(topic, p, n_recs, lambda plog, t, vs=vs, ks=ks: plog.append_batch(
                    vs, ks, timestamp_ms=ts, timeout=t), (vs, ks, None, ts, False))
            else:
                off = self._append_batch(route.logs[p], vs, ks, ts)
            out.append(RecordMetadata(topic, p, off, ts))
        return out

    def _append_batch(self, log: PartitionLog, values: Any, keys: Any, ts: int) -> int:
        """One checked batch into an unreplicated log: a C-contiguous 2-D
        uint8 array (keys likewise, or None) in one C call (fastpath.c
        append_fixed: the batch built over the array's memory, CRC, claim,
        commit), everything else through PartitionLog.append_batch."""
        if self._fast is not None and type(values) is np.ndarray and values.dtype == np.uint8 \
                and values.ndim == 2 and values.flags.c_contiguous and len(values) \
                and (keys is None or (type(keys) is np.ndarray and keys.dtype == np.uint8 and keys.ndim == 2
                                      and keys.flags.c_contiguous and len(keys) == len(values))):
            off = fastpath._ext.append_fixed(fastpath.handle(log._h), values, keys, ts,  # type: ignore[union-attr]
                                             self._timeout_ns)
            if off < 0:
                log._fail(off, f"append a batch of {len(values)} records")
            return off
        return log.append_batch(values, keys, timestamp_ms=ts, timeout=self._timeout_ns / 1e9)

    # ------------------------------------------------------------ replicated
    def _init_producer_id(self) -> None:
        if self._producer_id < 0:
            self._producer_id, self._producer_epoch = self._cluster.client.allocate_producer_id(self.transactional_id)

    def _send_replicated(self, topic: str, partition: int, count: int, append: Callable[[PartitionLog, float], int],
                         records: Tuple[Any, Any, Any, int, bool], pending_out: Optional[List["_Pending"]] = None
                         ) -> int:
        """Append ``count`` records to the partition leader with this producer's
        acks and idempotence; retried on the new leader across a failover until
        ``delivery_timeout_ms``. Returns the first record's offset."""
        deadline = time.monotonic() + self._delivery_timeout
        key = (topic, partition)
        if self.transactional_id is not None:
            self._txn_add(topic, partition)
        elif self.enable_idempotence:
            self._init_producer_id()
        asynchronous = pending_out is not None and self.acks == "all" and self.enable_idempotence
        if not asynchronous and self._inflight.get(key):
            self._drain(key, deadline)            # earlier send_async records first, in order
        plog: Optional[PartitionLog] = None
        in_doubt = False
        while True:
            version = self._cluster.version()
            try:
                route = self._route(topic)
                plog = route.leader(partition)
                if self.acks == "all" and route.replicated:
                    isr = bin(plog.isr_mask).count("1")
                    if isr < route.min_isr and in_doubt:
                        # A failover left this batch possibly stored: it is retried as it
                        # is (same sequence, same records) until the ISR grows back, as
                        # Kafka's producer does, never handed back to be re-batched.
                        raise _InDoubt()
                    if isr < route.min_isr:
                        raise NotEnoughReplicas(
                            f"{topic}-{partition} has {isr} in-sync replica(s), fewer than min_insync_replicas="
                            f"{route.min_isr}: acks='all' cannot be met", topic=topic, partition=partition)
                remaining = max(0.0, deadline - time.monotonic())
                queue = self._inflight.get(key)
                if queue and queue[-1].log is not plog:
                    self._drain(key, deadline)    # a new leader: replay what is in flight first
                if self.enable_idempotence:
                    with self._seq_lock:          # one batch in flight per partition keeps sequences in order
                        # Unreplicated (a transactional producer's): the table numbers the batches, as
                        # for the C send (no append there is retried). Replicated: ours, for retries.
                        seq = self._sequences.get(key, 0) if route.replicated else lib.SHMQ_SEQ_NEXT
                        if records[4]:                # one record from send: one C call
                            hb = encode_headers(records[2]) if records[2] else None
                            off, _dup = route.pstate(partition).append1(
                                plog, records[0][0], records[1][0] if records[1] else None, hb, records[3],
                                self._producer_id, self._producer_epoch, seq, remaining, self._attributes)
                        else:
                            off, _dup = route.pstate(partition).append(
                                plog, records[0], records[1], producer_id=self._producer_id,
                                epoch=self._producer_epoch, base_sequence=seq, timeout=remaining,
                                timestamp_ms=records[3], headers=None if records[2] is None else [records[2]],
                                attributes=self._attributes)
                        if route.replicated:
                            self._sequences[key] = (seq + count) & 0x7FFFFFFF
                else:
                    off = append(plog, remaining)
                if asynchronous:
                    assert pending_out is not None
                    p = _Pending(seq, count, records, off, plog)
                    self._inflight.setdefault(key, deque()).append(p)
                    if self.transactional_id is not None:
                        self._reroute()           # the C send leaves the partition until these are acknowledged
                    pending_out.append(p)
                    if len(self._inflight[key]) > MAX_IN_FLIGHT:
                        self._drain(key, deadline, upto=self._inflight[key][MAX_IN_FLIGHT // 2])
                    return off
                if self.acks == "all" and route.replicated and not plog.wait_hw(
                        off + count - 1, max(0.0, deadline - time.monotonic())):
                    if self.enable_idempotence and self.transactional_id is None:
                        # The batch is in doubt and its sequence spent: later batches start
                        # over under a new producer id (Kafka bumps the epoch, KIP-360).
                        with self._seq_lock:
                            self._producer_id = -1
                            self._sequences.clear()
                    raise KafkaTimeoutError(f"send to {topic}-{partition}: the in-sync replicas did not all store "
                                            f"offset {off + count - 1} within delivery_timeout_ms", topic=topic,
                                            partition=partition)
                return off
            except ProducerFenced as e:
                if self.transactional_id is not None:
                    self._txn_fatal(e)
                raise
            except (NotLeaderForPartition, LeaderNotAvailable, _InDoubt) as e:
                if self.enable_idempotence and isinstance(e, NotLeaderForPartition) and seq != lib.SHMQ_SEQ_NEXT:
                    # The batch may or may not be stored: resend it with the same sequence.
                    with self._seq_lock:
                        if self._sequences.get(key, 0) == (seq + count) & 0x7FFFFFFF:
                            self._sequences[key] = seq
                            in_doubt = True
                if time.monotonic() > deadline:
                    if isinstance(e, _InDoubt):
                        raise NotEnoughReplicas(f"{topic}-{partition}: the in-sync replicas stayed fewer than "
                                                f"min_insync_replicas={route.min_isr} for delivery_timeout_ms while "
                                                f"a batch was being retried", topic=topic, partition=partition) from None
                    raise
                if isinstance(e, _InDoubt):
                    time.sleep(0.001)
                else:
                    self._await_leader(version, deadline, plog)

    def send_async(self, topic: str, value: Any = None, key: Any = None, *, partition: Optional[int] = None,
                   headers: Optional[Iterable[Header]] = None, timestamp_ms: Optional[int] = None) -> DeliveryFuture:
        """Append one record now and return at once; ``get()`` on the result (or
        ``flush()``) waits for the acknowledgement. With ``acks="all"`` and
        idempotence many records are then replicated together instead of one
        round trip each; across a failover the producer appends unacknowledged
        records again, in order, and each is stored once. Otherwise the record
        is acknowledged when this returns."""
        out: List[_Pending] = []
        md = self._send(topic, value, key, partition, headers, timestamp_ms, out)
        if not out:
            return DeliveryFuture(self, (md.topic, md.partition), None, md.timestamp_ms, md)
        return DeliveryFuture(self, (md.topic, md.partition), out[0], md.timestamp_ms)

    def _drain(self, key: Tuple[str, int], deadline: float, upto: Optional[_Pending] = None) -> None:
        """Wait for the acknowledgement of the partition's in-flight batches, in
        order (up to ``upto``), appending them again on a new leader when the
        old one was replaced before they were acknowledged."""
        queue = self._inflight.get(key)
        while queue:
            p = queue[0]
            last = p.offset + p.count - 1
            try:
                if p.log.high_watermark <= last and not p.log.wait_hw(last, max(0.0, deadline - time.monotonic())):
                    raise KafkaTimeoutError(f"{key[0]}-{key[1]}: offset {last} was not replicated to every in-sync "
                                            f"replica within delivery_timeout_ms", topic=key[0], partition=key[1])
            except NotLeaderForPartition:
                self._replay(key, queue, deadline)
                continue
            queue.popleft()
            p.done = True
            if p is upto:
                return

    def _replay(self, key: Tuple[str, int], queue: Deque[_Pending], deadline: float) -> None:
        """Append every in-flight batch again on the current leader, same
        sequences: the ones it already holds are recognised (kept at their
        offset: followers copy verbatim), the others are appended."""
        topic, partition = key
        while True:
            version = self._cluster.version()
            plog: Optional[PartitionLog] = None
            try:
                route = self._route(topic)
                plog = route.leader(partition)
                if bin(plog.isr_mask).count("1") < route.min_isr:
                    raise _InDoubt()
                table = route.pstate(partition)
                for p in queue:
                    values, keys, headers, ts, _single = p.records
                    try:
                        p.offset, _dup = table.append(plog, values, keys, producer_id=self._producer_id,
                                                      epoch=self._producer_epoch, base_sequence=p.seq,
                                                      timestamp_ms=ts, headers=None if headers is None else [headers],
                                                      timeout=max(0.0, deadline - time.monotonic()),
                                                      attributes=self._attributes)
                    except DuplicateSequenceNumber:
                        pass                      # held already, at the offset it was first appended at
                    p.log = plog
                return
            except (NotLeaderForPartition, LeaderNotAvailable, _InDoubt) as e:
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"{topic}-{partition}: in-flight records could not be stored on a new "
                                            f"leader within delivery_timeout_ms ({e!r})", topic=topic,
                                            partition=partition) from None
                if isinstance(e, _InDoubt):
                    time.sleep(0.001)
                else:
                    self._await_leader(version, deadline, plog)

    def _await_leader(self, version: int, deadline: float, plog: Optional[PartitionLog]) -> None:
        """After NotLeader / LeaderNotAvailable: sleep until the published metadata
        changes (a new leader) or the leader's log opens for appends (its
        process took over), at most 50 ms."""
        until = min(deadline, time.monotonic() + 0.05)
        delay = 0.00005
        while self._cluster.version() == version and time.monotonic() < until:
            if plog is not None and plog.append_state == 0:
                break
            time.sleep(delay)
            delay = min(delay * 2, 0.001)
        self._recheck_ms = 0

    def _check_partition(self, topic: str, partition: Any) -> _TopicRoute:
        """The route again after a partition number out of range: partitions
        may have been added since the cached metadata (then it is valid)."""
        self._routes.pop(topic, None)
        route = self._route(topic)
        if type(partition) is not int or not 0 <= partition < route.count:
            raise UnknownTopicOrPartition(
                f"partition {partition!r} of topic {topic!r} does not exist (it has {route.count})",
                topic=topic, partition=partition if isinstance(partition, int) else None)
        return route

    def _too_large(self, route: _TopicRoute, partition: Optional[int], size: int) -> None:
        from .errors import MessageSizeTooLarge
        raise MessageSizeTooLarge(
            f"record of {size} bytes for topic {route.name!r}"
            f"{'' if partition is None else f' partition {partition}'} exceeds max_message_bytes={route.max_bytes}",
            topic=route.name, partition=partition)

    # ---------------------------------------------------------- transactions
    def init_transactions(self) -> None:
        """Register ``transactional_id`` with the coordinator: a previous
        instance's open transaction is aborted and that instance fenced
        (its next call raises ``ProducerFenced``). Call once, first."""
        if self.transactional_id is None:
            raise IllegalState("init_transactions() needs a Producer created with transactional_id=")
        if self._txn_state == "in_transaction":
            raise IllegalState("init_transactions(): a transaction is open; commit or abort it first")
        pid, epoch, registered = self._cluster.client.init_transactional(self.transactional_id,
                                                                         self.transaction_timeout_ms)
        self._txn_registered = set(registered)
        with self._seq_lock:
            self._producer_id, self._producer_epoch = pid, epoch
            self._sequences.clear()
        self._attributes = lib.SHMQ_BATCH_ATTR_TRANSACTIONAL
        self._txn_state, self._txn_error = "ready", None
        self._txn_parts = set()
        self._reroute()

    def _reroute(self) -> None:
        """Drop the C send's routes (a transactional producer's carry the open
        transaction's partitions, producer id and epoch): called whenever one
        of those changes, and before a transaction ends, so that no record is
        appended to a transaction that is over."""
        if self._fast is not None:
            self._fast.invalidate()

    def _txn_check(self, what: str, *states: str) -> None:
        if self._txn_state == "fatal":
            raise ProducerFenced(f"{what}: this producer ({self.transactional_id!r}) was fenced by a newer "
                                 f"instance or its transaction timed out: {self._txn_error}") from self._txn_error
        if self._txn_state is None:
            raise IllegalState(f"{what}: call init_transactions() first" if self.transactional_id is not None else
                               f"{what}: this producer has no transactional_id")
        if self._txn_state not in states:
            raise IllegalState(f"{what}: " + ("no transaction is open (begin_transaction() first)"
                                              if self._txn_state == "ready" else "a transaction is already open"))

    def _txn_fatal(self, e: BaseException) -> None:
        self._txn_state, self._txn_error = "fatal", e
        self._reroute()

    def _txn_call(self, what: str, op: str, **args: Any) -> None:
        try:
            getattr(self._cluster.client, op)(self.transactional_id, self._producer_id, self._producer_epoch, **args)
        except ProducerFenced as e:
            self._txn_fatal(e)
            raise

    def begin_transaction(self) -> None:
        """Start a transaction: every send until commit/abort belongs to it."""
        self._txn_check("begin_transaction()", "ready")
        self._txn_state = "in_transaction"
        self._txn_parts = set()
        self._txn_offsets = False
        self._txn_rpc = self._txn_committing = False
        self._txn_start_ms = _time_ns() // 1_000_000
        self._reroute()

    def _txn_add(self, topic: str, *partitions: int) -> None:
        """Kafka's AddPartitionsToTxn, once per partition and transaction, before its first append."""
        if self._txn_state != "in_transaction":
            self._txn_check(f"send to {topic}", "in_transaction")
        if len(partitions) == 1 and (topic, partitions[0]) in self._txn_parts:
            return                                          # the common case: added already
        new = [(topic, p) for p in dict.fromkeys(partitions) if (topic, p) not in self._txn_parts]
        if not new:
            return
        here = [tp for tp in new if tp in self._txn_registered and not self._txn_rpc]
        if here:
            route = self._route(topic)
            for tp in here:
                # The row opens at the log end before this producer's first
                # record there: read_committed readers stop at it (txn_index.h).
                plog = route.leader(tp[1])
                try:
                    opened = self._txn_index(tp).open_row(self._producer_id, self._producer_epoch,
                                                          plog.end_offset, self._txn_start_ms)
                except ProducerFenced as e:
                    self._txn_fatal(e)
                    raise
                if opened:                      # else an older instance's transaction holds it: the coordinator
                    self._txn_parts.add(tp)
        rest = [tp for tp in new if tp not in self._txn_parts]
        if rest:
            # The coordinator runs the transaction from here on (it opens the
            # new partitions' rows and, at the end, closes every row).
            self._txn_call(f"send to {topic}", "add_partitions_to_txn", partitions=rest)
            self._txn_rpc = True
            self._txn_parts.update(rest)
            self._txn_registered.update(rest)
        self._reroute()

    def _txn_index(self, tp: Tuple[str, int]) -> Any:
        """The transaction index of partition ``tp``, mapped for writing (once)."""
        idx = self._txn_indexes.get(tp)
        if idx is None:
            from .ringlog.txn import TxnIndex
            idx = self._txn_indexes[tp] = TxnIndex.open(self._cluster.client.root.txn_index_path(*tp), create=True)
        return idx

    def _txn_append1(self, route: _TopicRoute, topic: str, partition: int, value: Any, key: Any,
                     headers: Any, ts: int) -> int:
        """One record of an open transaction to an unreplicated partition
        (added to it first): one producer-state append (no failover to retry through)."""
        try:
            off, _dup = route.pstate(partition).append1(
                route.logs[partition], value, key, encode_headers(headers) if headers else None, ts,
                self._producer_id, self._producer_epoch, lib.SHMQ_SEQ_NEXT, self._delivery_timeout, self._attributes)
        except ProducerFenced as e:
            self._txn_fatal(e)
            raise
        return off

    def send_offsets_to_transaction(self, offsets: Dict[Any, Any], group_metadata: Any) -> None:
        """Commit ``offsets`` (``{TopicPartition: next offset to read}``) for
        the consumer group of ``group_metadata`` (``Consumer.consumer_group_metadata()``,
        or a group id) as part of the transaction: they become the group's
        committed offsets when it commits, never otherwise."""
        self._txn_check("send_offsets_to_transaction()", "in_transaction")
        group = group_metadata if isinstance(group_metadata, str) else getattr(group_metadata, "group_id", None)
        if not isinstance(group, str):
            raise InvalidConfig(f"group_metadata must be Consumer.consumer_group_metadata() or a group id, "
                                f"got {group_metadata!r}")
        gens = getattr(group_metadata, "generations", None) or {}
        items = []
        for tp, o in offsets.items():
            off, meta = (o.offset, getattr(o, "metadata", "") or "") if hasattr(o, "offset") else (o, "")
            if type(off) is not int or off < 0:
                raise InvalidConfig(f"offset for {tp[0]}-{tp[1]} must be a non-negative int, got {off!r}")
            items.append((tp[0], tp[1], off, meta))
        self._txn_offsets = True
        self._txn_call("send_offsets_to_transaction()", "txn_offset_commit", group_id=group, offsets=items,
                       generations={(tp[0], tp[1]): g for tp, g in gens.items()
                                    if any(tp[0] == i[0] and tp[1] == i[1] for i in items)})

    def commit_transaction(self) -> None:
        """Commit: every record sent in the transaction becomes visible to
        read_committed consumers, and its offsets the group's. Raises
        ``CommitFailed`` when the coordinator had to abort it instead (a
        partition of the offsets was given to another group member), and
        ``ProducerFenced`` when a newer instance took over. After a retriable
        error (``NotCoordinator``, ``KafkaTimeoutError``) the transaction is
        still open: call ``commit_transaction`` (or ``abort_transaction``)
        again; ``InvalidTxnState`` means the coordinator had already ended it
        the other way (then no transaction is open)."""
        self._txn_check("commit_transaction()", "in_transaction")
        self._reroute()
        if not self._txn_parts and not self._txn_offsets:
            self._txn_state = "ready"           # nothing written: completed here, as Kafka's client does
            return
        self.flush()
        if not self._txn_rpc and not self._txn_offsets:
            self._commit_here()
            self._txn_state, self._txn_parts = "ready", set()
            return
        try:
            self._txn_call("commit_transaction()", "end_txn", commit=True)
        except (CommitFailed, InvalidTxnState):
            self._txn_state, self._txn_parts = "ready", set()    # the coordinator ended it otherwise
            raise
        self._txn_state, self._txn_parts = "ready", set()

    def abort_transaction(self) -> None:
        """Abort: no record of the transaction is ever returned to a
        read_committed consumer and its offsets are dropped."""
        self._txn_check("abort_transaction()", "in_transaction")
        if self._txn_committing:
            raise IllegalState("abort_transaction(): the commit has begun (a COMMIT marker is written); call "
                               "commit_transaction() again to finish it")
        self._reroute()
        if not self._txn_parts and not self._txn_offsets:
            self._txn_state = "ready"
            return
        try:
            self.flush()
        except KafkaTimeoutError:
            pass                                # aborting anyway
        try:
            self._txn_call("abort_transaction()", "end_txn", commit=False)
        except InvalidTxnState:
            self._txn_state, self._txn_parts = "ready", set()    # it was committed already
            raise
        self._txn_state, self._txn_parts = "ready", set()

    def _commit_here(self) -> None:
        """Commit a transaction this producer ran itself (every partition was
        added before, no offsets): a COMMIT marker to every partition, through
        the producer-state table (fenced like its records), and only then the
        rows closed. A producer that dies in between leaves its rows open;
        the coordinator fences it after the timeout and finds a COMMIT marker
        (so commits the rest) or none (so aborts). An error leaves the
        transaction open: call commit again (a second marker is harmless)."""
        from .ringlog.txn import COMMIT, control_batch
        marker = control_batch(COMMIT, self._producer_id, self._producer_epoch)
        die_after = int(os.environ.get(TXN_DIE_ENV, "-1"))
        parts = sorted(self._txn_parts)
        for n, (topic, p) in enumerate(parts):
            if n == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
            route = self._route(topic)
            try:
                route.pstate(p).append_control(route.leader(p), marker, self._delivery_timeout)
            except ProducerFenced as e:
                self._txn_fatal(e)
                raise
            self._txn_committing = True
        if die_after == len(parts):
            os.kill(os.getpid(), signal.SIGKILL)
        for tp in parts:
            self._txn_index(tp).close_row(self._producer_id, self._producer_epoch)
        self._txn_committing = False

    # ------------------------------------------------------------- lifecycle
    def flush(self, timeout: Optional[float] = None) -> int:
        """Wait until every sent record is acknowledged (``send_async`` ones;
        every other send is acknowledged when it returns). Returns 0, or
        raises ``KafkaTimeoutError`` after ``timeout`` seconds (default
        ``delivery_timeout_ms``)."""
        deadline = time.monotonic() + (self._delivery_timeout if timeout is None else timeout)
        for key in list(self._inflight):
            self._drain(key, deadline)
        return 0

    def close(self, timeout: Optional[float] = None) -> None:
        if self._closed:
            return
        self._closed = True
        fastpath.detach(self)
        self.flush(timeout)
        for route in self._routes.values():
            route.close()
        self._routes.clear()
        for idx in self._txn_indexes.values():
            idx.close()
        self._txn_indexes.clear()
        self._cluster.close()

    def __enter__(self) -> "Producer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_BYTES_LIKE = frozenset((bytes, bytearray, memoryview, type(None)))


def _batch_field(items: Any, what: str, topic: str) -> Tuple[int, int]:
    """(record count, largest size) of a send_batch field; InvalidRecord for
    anything but a list/tuple of bytes-like or None, or a 2-D uint8 array."""
    if isinstance(items, np.ndarray):
        if items.ndim != 2 or items.dtype != np.uint8:
            raise InvalidRecord(f"a numpy batch of {what}s must be a 2-D uint8 array, "
                                f"got {items.ndim}-D {items.dtype}", topic=topic)
        return int(items.shape[0]), int(items.shape[1])
    if not isinstance(items, (list, tuple)):
        raise InvalidRecord(f"{what}s must be a list of bytes or a 2-D uint8 numpy array, "
                            f"got {type(items).__name__}", topic=topic)
    types = set(map(type, items))
    if not types <= _BYTES_LIKE:
        bad = next(t for t in types if t not in _BYTES_LIKE)
        raise InvalidRecord(f"each {what} for topic {topic!r} must be bytes-like or None, got "
                            f"{bad.__name__} (pass {what}_serializer= to send other types)", topic=topic)
    if not items:
        return 0, 0
    if type(None) in types:
        return len(items), max(0 if v is None else len(v) for v in items)
    return len(items), max(map(len, items))


def _record_size(v: Any, k: Any) -> int:
    return (0 if v is None else len(v)) + (0 if k is None else len(k))


def _to_bytes(v: Any, what: str, topic: str) -> bytes:
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    raise InvalidRecord(f"{what} for topic {topic!r} must be bytes-like or None, got {type(v).__name__} "
                        f"(pass {what}_serializer= to send other types)", topic=topic)
