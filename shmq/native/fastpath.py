"""The second front door: the per-record path in C (``_fastpath``, built from
``fastpath.c`` and the same core sources as the cffi module).

``Producer`` and ``Consumer`` call ``attach_producer`` / ``attach_consumer``
when they are made; with the extension in use their ``send`` / ``poll`` are
C functions that handle the common case themselves and hand every other case
(and every error) to the Python methods, which stay the reference.

The numpy bulk path calls the extension's functions directly:
``LogReader.read_arrays`` (so ``Consumer.consume_arrays``) is one
``_ext.read_arrays`` call (read, wait and the arrays), and
``Producer.send_batch`` of a C-contiguous 2-D uint8 array one
``_ext.append_fixed`` call per batch.

The switch: ``SHMQ_FASTPATH=0`` in the environment turns the extension off
(checked when each client object is made, and by a log reader on its first
bulk read); so does a platform where it could not be built. Everything works
either way.
"""
from __future__ import annotations

import os
import random
import time
from typing import Any, List, Optional, Tuple

import xxhash

from . import ffi

try:
    from . import _fastpath as _ext
except ImportError:            # not built on this platform: the Python path only
    _ext = None

PARTITIONER_KINDS = ("murmur2_random", "murmur2", "xxhash", "roundrobin")
METADATA_RECHECK_MS = 100      # a fast-path producer re-reads routes (metadata) this often
CONSUMER_LEASE_NS = 5_000_000  # a fast-path consumer re-runs the Python poll prelude this often


def enabled() -> bool:
    """True when the C per-record path is built and not switched off."""
    return _ext is not None and os.environ.get("SHMQ_FASTPATH", "1") != "0"


def handle(cdata: Any) -> int:
    """The address of a cffi pointer, as the extension takes it."""
    return int(ffi.cast("uintptr_t", cdata))


def partitioner(name: str, sticky_records: int) -> Optional[Any]:
    """The C partitioner for ``name``, or None when the fast path is off."""
    if not enabled():
        return None
    return _ext.Partitioner(PARTITIONER_KINDS.index(name), sticky_records, random.randrange,  # type: ignore[union-attr]
                            xxhash.xxh64_intdigest)


def attach_producer(producer: Any) -> None:
    """Make ``producer.send`` the C send when the producer can use it."""
    part = producer._partitioner
    if not enabled() or not producer._plain or not isinstance(part, _ext.Partitioner):  # type: ignore[union-attr]
        return
    python_send = producer.send
    transactional = producer.transactional_id is not None

    def route(topic: str) -> Optional[Tuple[Any, ...]]:
        """What the C send needs of a topic, or None: the Python path sends
        (a partition without a leader, or acks='all' on a replicated topic).
        A transactional producer's routes exist only while a transaction is
        open on unreplicated partitions with nothing in flight; they carry
        the producer-state table of each partition added to it or that the
        C send may add itself (one the id added before: its transaction
        index's rows, where the C send opens the row before the first
        record, then tells ``_txn_parts``), 0 for the others (the Python
        send adds them), and the producer's id, epoch, batch attributes and
        the transaction's start time. The producer drops the routes whenever one of
        those changes (``Producer._reroute``)."""
        if transactional:
            if producer._txn_state != "in_transaction" or producer._inflight:
                return None
            added = {p for t, p in producer._txn_parts if t == topic}
            here = set() if producer._txn_rpc else {p for t, p in producer._txn_registered if t == topic} - added
            if not added and not here:
                return None              # the Python send adds the first partition (then routes are dropped)
        r = producer._route(topic)
        if (r.replicated and producer.acks == "all") or any(log is None for log in r.logs):
            return None
        logs = tuple(handle(log._h) for log in r.logs), tuple(r.logs), r.max_bytes
        if not transactional:
            return logs
        if r.replicated:
            return None
        tables = tuple(r.pstate(p) if p in added or p in here else None for p in range(r.count))
        rows = tuple(producer._txn_index((topic, p)).rows_words if p in here else None for p in range(r.count))
        return (*logs, tuple(0 if t is None else handle(t._h) for t in tables), tables, producer._producer_id,
                producer._producer_epoch, producer._attributes, rows, producer._txn_start_ms,
                _adder(producer._txn_parts, topic))

    fast = _ext.FastProducer(python_send, route, part, _metadata_type(),  # type: ignore[union-attr]
                             producer._timeout_ns, METADATA_RECHECK_MS)
    producer._fast = fast
    producer.send = fast.send


def _adder(parts: set, topic: str) -> Any:
    """``on_add`` of a transactional route: records a partition the C send
    added in the transaction's set (that set, not the producer: a route
    must not keep its producer alive)."""
    return lambda p: parts.add((topic, p))


def attach_consumer(consumer: Any) -> None:
    """Make ``consumer.poll`` / ``consume`` the C ones when the consumer can use them."""
    if not enabled() or consumer._value_de is not None or consumer._key_de is not None:
        return
    committed = consumer.isolation_level == "read_committed"
    from ..coordinator.metamap import _W_MOVED, _W_VERSION
    from ..errors import KafkaStorageError
    from ..message import Message, TopicPartition
    from ..offsets_table import F_GENERATION, F_OFFSET, GEN_SHIFT

    def part(st: Any) -> Tuple[Any, ...]:
        """What the C poll reads of one partition: its reader's cursor,
        buffer and views (as ``_fetch_from`` does, the position is set up
        when the partition is first read; a KafkaStorageError sets it aside)."""
        try:
            r = consumer._ready(st)
        except KafkaStorageError as e:
            raise consumer._set_aside(st, e)
        if r._buf is None:
            r._buf = ffi.new("uint8_t[]", r._buf_len)
        words, aborted_seen = r.committed_words() if committed else (None, 0)
        return (st, r, st.tp.topic, st.tp.partition, handle(r._h), handle(r._cur), handle(r._buf), r._buf_len,
                r._read_len, handle(r._views), r._max, handle(r._unblock), r.check_crc, r.spin_ns,
                r.log.config.unblock_timeout_ms * 1_000_000 // 2 + 1, int(committed), words, aborted_seen)

    def arm() -> Optional[Tuple[List[Tuple[Any, ...]], int]]:
        """The Python poll prelude, then the active partitions for the C poll:
        ``part(st)`` of each, or ``(st,)`` for one whose position is not set
        up yet (the C poll calls ``part`` when it first reads it). Partitions
        set aside after a storage error are left out until their retry time
        (the lease re-arms often enough to take them back). read_committed
        partitions carry their transaction index (``committed_words``): the
        C poll reads below the LSO and hands the call back here when an
        aborted range lies ahead. None: the Python
        poll serves (its record buffer, or a partition whose read failed in
        the C poll, named in ``_read_failed``: the Python read raises its
        error and sets it aside)."""
        c = consumer
        if c._buffer or c._read_failed is not None:
            return None
        c._begin_poll(spill=False)
        if c._buffer:
            return None
        if c._leaders_version != c._cluster.version():
            c._follow_leaders()
        now = time.monotonic()
        return [part(st) if st.position is not None and not st.out_of_range else (st,)
                for st in c._order if not st.paused and st.retry_at <= now], c.max_poll_records

    def commit_entry(tp: Any) -> Optional[Tuple[Any, ...]]:
        """Where the C commit stores ``tp``'s offset and checks its fencing:
        the metadata version the entry is good for, the metadata header words
        (version, moved), the offsets table words, the entry's offset and
        generation word indexes, and the generation this consumer commits
        with. None: the Python commit (no group, not owned, closed)."""
        c = consumer
        if c._closed or c.group_id is None:
            return None
        view = c._cluster._view
        version = view.version()                 # reopens a replaced mapping first
        table = c._cluster.offsets_table()
        idx = c._cluster.offset_slot(c.group_id, tp[0], tp[1])
        gen = c._gens.get(tp, -1) if c._group is not None else 0
        if gen < 0:
            return None
        return (version, view._words, _W_VERSION, _W_MOVED, table.words, table.word_index(idx, F_OFFSET),
                table.word_index(idx, F_GENERATION), gen)

    fast = _ext.FastConsumer(consumer, consumer.poll, consumer.consume, arm, part, Message,  # type: ignore[union-attr]
                             CONSUMER_LEASE_NS, consumer.commit, commit_entry, TopicPartition, GEN_SHIFT)
    consumer._fast = fast
    consumer.poll = fast.poll
    consumer.consume = fast.consume
    consumer.commit = fast.commit


def detach(client: Any) -> None:
    """Drop the C object's routes (before the client closes its logs)."""
    fast = getattr(client, "_fast", None)
    if fast is not None:
        fast.close()


def _metadata_type() -> Any:
    from ..message import RecordMetadata
    return RecordMetadata
