"""ProducerStateTable: the idempotent-producer state of one partition log.

``<log dir>/producer.state`` is a fixed-size table in shared memory (layout
and ownership rules in ``shmq/native/producer_state.h``): for every producer
id, its epoch and the sequence numbers and offset of its last batch. Producers
append to the log themselves, so the appender does Kafka's broker-side checks
through this table: a retried batch is stored once, a sequence gap raises
``OutOfOrderSequenceNumber``, an older epoch ``ProducerFenced``. A follower's
replica process rebuilds the same table from the frames it copies
(``observe_frames``).
"""
from __future__ import annotations

import os
import time
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np

from ..native import ffi, lib, raise_for
from .log import BytesLike, PartitionLog, _timeout_ns

_NULL = ffi.NULL
Values = Union[Sequence[Optional[BytesLike]], np.ndarray]


class ProducerStateTable:
    """The producer state table of the log directory ``path`` (opened)."""

    def __init__(self, path: str) -> None:
        self.path = os.fspath(path)
        handle = ffi.new("shmq_pstate **")
        deadline = time.monotonic() + 2.0
        while True:
            rc = lib.shmq_pstate_open(self.path.encode(), handle)
            # A table being created has no header yet: wait for its creator.
            if rc != lib.SHMQ_ERR_RETRY or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if rc < 0:
            raise_for(rc, f"open producer state table at {self.path}")
        self._h = handle[0]
        self._dup = ffi.new("int *")       # append1's out-parameter: callers of append1 serialise

    @classmethod
    def create(cls, path: str, entries: int = 4096) -> "ProducerStateTable":
        """Create ``<path>/producer.state`` with room for ``entries`` producer ids and open it."""
        path = os.fspath(path)
        rc = lib.shmq_pstate_create(path.encode(), entries)
        if rc < 0:
            raise_for(rc, f"create producer state table at {path} ({entries} entries)")
        return cls(path)

    @property
    def entries(self) -> int:
        return int(lib.shmq_pstate_entries(self._h))

    def close(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h is not None:
            lib.shmq_pstate_close(h)

    def __enter__(self) -> "ProducerStateTable":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def append(self, log: PartitionLog, values: Values, keys: Optional[Values] = None, *, producer_id: int,
               epoch: int, base_sequence: int, timestamp_ms: Optional[int] = None,
               timeout: Optional[float] = None, headers: Optional[Sequence[Any]] = None,
               attributes: int = 0) -> Tuple[int, bool]:
        """Append ``values`` (and ``keys``) to ``log`` as one batch of producer
        ``producer_id`` / ``epoch`` starting at ``base_sequence``.

        Returns ``(base_offset, duplicate)``: a retry of the last batch stored
        for this producer appends nothing and returns that batch's offset with
        ``duplicate`` True. Raises ``ProducerFenced``, ``DuplicateSequenceNumber``,
        ``OutOfOrderSequenceNumber`` or the log's errors. ``attributes``:
        ``SHMQ_BATCH_ATTR_TRANSACTIONAL`` for a transactional producer's batch.
        """
        recs, _keep, n = log.build_records(values, keys, headers, timestamp_ms)
        dup = ffi.new("int *")  # per call: a table may be shared by threads
        off = lib.shmq_pstate_append_attr(self._h, log._h, recs, producer_id, epoch, base_sequence, attributes,
                                          _timeout_ns(timeout), dup)
        if off < 0:
            raise_for(off, f"idempotent append of {n} records to {log.name} (producer {producer_id} "
                      f"epoch {epoch} sequence {base_sequence})", topic=log.topic, partition=log.partition)
        return int(off), bool(dup[0])

    def append1(self, log: PartitionLog, value: Optional[bytes], key: Optional[bytes], headers: Optional[bytes],
                timestamp_ms: int, producer_id: int, epoch: int, base_sequence: int,
                timeout: Optional[float] = None, attributes: int = 0) -> Tuple[int, bool]:
        """``append`` of one record given as bytes (``headers``: its encoded
        header block, or None): one C call, for the producer's send path."""
        dup = self._dup
        off = lib.shmq_pstate_append1_attr(
            self._h, log._h, ffi.NULL if key is None else key, -1 if key is None else len(key),
            ffi.NULL if value is None else value, -1 if value is None else len(value),
            ffi.NULL if headers is None else headers, 0 if headers is None else len(headers),
            timestamp_ms, producer_id, epoch, base_sequence, attributes, _timeout_ns(timeout), dup)
        if off < 0:
            raise_for(off, f"idempotent append to {log.name} (producer {producer_id} epoch {epoch} sequence "
                      f"{base_sequence})", topic=log.topic, partition=log.partition)
        return int(off), bool(dup[0])

    def append_raw(self, log: PartitionLog, batch: BytesLike, timeout: Optional[float] = None) -> Tuple[int, bool]:
        """``append`` of a complete RecordBatch v2 built elsewhere (a Kafka
        client's, through the wire listener): producer id, epoch, sequence and
        count come from its header; it is stored as it is (baseOffset patched)."""
        buf = ffi.from_buffer(batch)
        dup = ffi.new("int *")
        off = lib.shmq_pstate_append_raw(self._h, log._h, buf, len(buf), _timeout_ns(timeout), dup)
        if off < 0:
            raise_for(off, f"idempotent append of a raw batch to {log.name}", topic=log.topic, partition=log.partition)
        return int(off), bool(dup[0])

    def append_control(self, log: PartitionLog, batch: bytes, timeout: Optional[float] = None) -> int:
        """Append a transaction marker (``shmq.ringlog.txn.control_batch``) for
        the producer id and epoch in its header, fenced like a data batch
        (``ProducerFenced`` when a newer epoch is known). Returns its offset."""
        off = lib.shmq_pstate_append_control(self._h, log._h, batch, len(batch), _timeout_ns(timeout))
        if off < 0:
            raise_for(off, f"append a transaction marker to {log.name}", topic=log.topic, partition=log.partition)
        return int(off)

    def fence(self, producer_id: int, epoch: int, timeout: Optional[float] = None) -> None:
        """Raise ``producer_id``'s epoch to ``epoch`` without appending: older
        epochs get ``ProducerFenced``, the new one must start at sequence 0."""
        rc = lib.shmq_pstate_fence(self._h, producer_id, epoch, _timeout_ns(timeout))
        if rc < 0:
            raise_for(rc, f"fence producer {producer_id} at epoch {epoch} in {self.path}")

    def observe_frames(self, buf: Any, n: Optional[int] = None) -> None:
        """Record the producer batches of a raw frame stream (the first ``n``
        bytes of ``buf``; all of it by default). Bad frames raise
        ``CorruptRecord`` and leave the table unchanged."""
        data = ffi.from_buffer("uint8_t[]", buf)
        n = len(data) if n is None else n
        if not 0 <= n <= len(data):
            raise ValueError(f"n={n} outside a buffer of {len(data)} bytes")
        rc = lib.shmq_pstate_observe_frames(self._h, data, n)
        if rc < 0:
            raise_for(rc, f"observe {n} bytes of frames into {self.path}")

    def clear(self) -> None:
        """Forget every producer (then re-observe the whole log). Nobody may append meanwhile."""
        lib.shmq_pstate_clear(self._h)

    def lookup(self, producer_id: int) -> Optional[Tuple[int, int, int, int]]:
        """``(epoch, first_sequence, last_sequence, last_base_offset)`` of the
        producer's last batch, or None when the table does not know it."""
        ep, first, last, off = ffi.new("int16_t *"), ffi.new("int32_t *"), ffi.new("int32_t *"), ffi.new("int64_t *")
        if not lib.shmq_pstate_lookup(self._h, producer_id, ep, first, last, off):
            return None
        return int(ep[0]), int(first[0]), int(last[0]), int(off[0])

    def __repr__(self) -> str:
        return f"ProducerStateTable({self.path!r})"
