"""Kafka's data APIs over partition logs: Produce, Fetch, ListOffsets.

Produce stores each RecordBatch of the request as it is: ``append_raw``
claims room, copies the batch and rewrites its baseOffset (Kafka's CRC starts
after it). A batch with a producer id (an idempotent producer) goes through
the partition's producer-state table, the same one native idempotent
producers use, so a retried batch is stored once and a gap or an old epoch is
refused with Kafka's error. acks=0 gets no response, acks=1 one after the
append, acks=all one after the high watermark passes the batch (replicated
topics; for the others the append is the commit).

A compressed batch is stored uncompressed (``compression.py``: the records
section decompressed, the header kept, the CRC set again), since shmq's
readers decode records in place.

Fetch copies committed frames from the log (``LogReader.read_frames``) and
hands their batches to the client as they are stored, never above the high
watermark; it waits for ``min_bytes`` up to ``max_wait_ms`` on the log's
futex. Padding frames (a dead producer's claim, padded over) are left out:
Kafka clients take the gap in offsets as they do after compaction.

Isolation (Kafka's): every Fetch answers the partition's last stable offset
(LSO, from its transaction index, ``shmq.ringlog.txn``). READ_COMMITTED
serves nothing at or above the LSO and lists the aborted transactions of
the data served, as (producer id, first offset), which the client uses to
drop their batches (it skips a producer's transactional batches from that
offset until the producer's ABORT marker). The index keeps offset runs,
several per transaction when other batches lie between, so the list is made
by walking the served batches: a producer's first batch inside an aborted
run opens one entry (the run's first offset) and its next control batch
closes it; an ABORT marker with no open entry (the transaction's data came
before this fetch, or it had none here) gets an entry at the marker's
offset, as Kafka lists every aborted transaction whose marker is at or
past the fetch offset. One entry per transaction matters: librdkafka pops
one per ABORT marker. Loads come in the order the index's writer needs:
high watermark, LSO, then the aborted runs (a transaction's runs are
published before the LSO moves past it). ListOffsets with READ_COMMITTED
answers the LSO for latest and never a time lookup at or past it.

Follower reads (KIP-392, ``server.py``): a Fetch to node 0 that carries a
rack_id, for a partition with an in-sync follower in that rack (the
selector of ``TopicInfo.preferred_read_replica``), is answered at once with
that follower's node as ``preferred_read_replica`` and no records, as Kafka's
leader does; a Fetch on a follower node's connection reads that replica's
log (NOT_LEADER_OR_FOLLOWER once it is no longer in sync, and the client
goes back to node 0). Produce there is refused the same way.
"""
from __future__ import annotations

import struct
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import numpy as np

from ..errors import (InvalidRecord, MessageSizeTooLarge, NotEnoughReplicas, NotLeaderForPartition, OffsetOutOfRange,
                      ShmqError)
from ..native import ffi, lib
from ..ringlog import PartitionLog
from ..ringlog.producer_state import ProducerStateTable
from ..ringlog.txn import (ABORT, ATTR_CONTROL, ATTR_TRANSACTIONAL, TxnIndex, lso_limit, parse_control_record,
                           stable_offset)
from .codec import error_code_for, ms
from .compression import UnsupportedCompression, decompress_batch

if TYPE_CHECKING:
    from .server import Connection, KafkaListener

CORRUPT_MESSAGE = 2
NOT_LEADER_OR_FOLLOWER = 6
REQUEST_TIMED_OUT = 7
INVALID_PRODUCER_EPOCH = 47
UNSUPPORTED_FOR_MESSAGE_FORMAT = 43
UNSUPPORTED_COMPRESSION_TYPE = 76
INVALID_RECORD = 87
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53

_BATCH_HEADER = 61
_I32 = struct.Struct(">i")
_I64 = struct.Struct(">q")
_I16 = struct.Struct(">h")
_FRAME = struct.Struct("<Q")
_FRAME_DATA = 0
READ_COMMITTED = 1


class ProducerStates:
    """The producer-state table of each partition log the listener appends
    idempotent batches to (created beside a log that has none yet)."""

    def __init__(self) -> None:
        self._tables: Dict[str, ProducerStateTable] = {}
        self._lock = threading.Lock()

    def get(self, plog: PartitionLog) -> ProducerStateTable:
        t = self._tables.get(plog.path)
        if t is None:
            with self._lock:
                t = self._tables.get(plog.path)
                if t is None:
                    try:
                        ProducerStateTable.create(plog.path).close()
                    except ShmqError:
                        pass           # it exists (a replicated log's, or another listener made it)
                    t = self._tables[plog.path] = ProducerStateTable(plog.path)
        return t

    def close(self) -> None:
        with self._lock:
            for t in self._tables.values():
                t.close()
            self._tables.clear()


class _Txn:
    """A partition's transaction index as one connection sees it: opened once
    it exists, its aborted runs copied as they are published."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.index: Optional[TxnIndex] = None
        self.seen = 0
        self.runs = np.empty((0, 3), dtype=np.int64)      # producer_id, first, last

    def stable(self, hw: int) -> int:
        """The LSO given the high watermark ``hw`` loaded just before."""
        if self.index is None:
            self.index = TxnIndex.open(self.path)
        return lso_limit(hw, self.index)

    def aborted_runs(self, lo: int, hi: int) -> np.ndarray:
        """Published aborted runs overlapping offsets ``lo..hi`` (load after ``stable``)."""
        idx = self.index
        if idx is None:
            return self.runs[:0]
        if idx.count != self.seen:
            new = idx.entries(self.seen)
            self.seen += len(new)
            self.runs = np.concatenate([self.runs, new[:, :3]])
        r = self.runs
        if not len(r):
            return r
        return r[(r[:, 2] >= lo) & (r[:, 1] <= hi)]

    def close(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index = None


class ConnectionData:
    """A connection's readers (one per partition it fetched) and fetch buffer."""

    def __init__(self, listener: "KafkaListener") -> None:
        self.listener = listener
        self.readers: Dict[Tuple[str, int, str], Any] = {}
        self.txns: Dict[Tuple[str, int, str], "_Txn"] = {}
        self.buf = bytearray(1 << 20)
        self.unblock = ffi.new("shmq_unblock_state *")

    def txn(self, plog: PartitionLog, topic: str, partition: int) -> "_Txn":
        key = (topic, partition, plog.path)
        t = self.txns.get(key)
        if t is None:
            t = self.txns[key] = _Txn(self.listener.root.txn_index_path(topic, partition))
        return t

    def reader(self, plog: PartitionLog, topic: str, partition: int, offset: int) -> Any:
        key = (topic, partition, plog.path)
        r = self.readers.get(key)
        if r is None:
            r = self.readers[key] = plog.reader(offset)
        elif r.position != offset:
            r.seek(offset)
        return r

    def retain(self, keys: "set[Tuple[str, int, str]]") -> None:
        """Close the readers of partitions the client no longer fetches: a
        reader holds its place in the partition's reader table (it keeps
        producers of a block-mode log from recycling what it has not read)."""
        for key in [k for k in self.readers if k not in keys]:
            self.readers.pop(key).close()
        for key in [k for k in self.txns if k not in keys]:
            self.txns.pop(key).close()

    def close(self) -> None:
        self.retain(set())


# ------------------------------------------------------------------ Produce
def _produce_partition(conn: "Connection", topic: str, partition: int, records: Optional[bytes], acks: int,
                       timeout: float) -> Tuple[int, int, int, Optional[str]]:
    """(error code, base offset, log start offset, message) of one partition's records."""
    from .api_admin import ensure_topic
    L = conn.listener
    try:
        info = ensure_topic(conn, topic, True)
        plog = L.cluster.log(topic, partition)
    except ShmqError as e:
        return error_code_for(e), -1, -1, str(e)
    data = memoryview(records or b"")
    if len(data) < _BATCH_HEADER:
        return CORRUPT_MESSAGE, -1, -1, "no record batch in the request"
    base = -1
    last = -1
    pos = 0
    try:
        if acks == -1 and info.replicated and bin(plog.isr_mask).count("1") < info.min_insync_replicas:
            raise NotEnoughReplicas(f"{topic}-{partition} has fewer in-sync replicas than min.insync.replicas="
                                    f"{info.min_insync_replicas}")
        while pos < len(data):
            if len(data) - pos < _BATCH_HEADER:
                return CORRUPT_MESSAGE, base, -1, f"truncated record batch at byte {pos}"
            total = _I32.unpack_from(data, pos + 8)[0] + 12
            if data[pos + 16] != 2:
                return UNSUPPORTED_FOR_MESSAGE_FORMAT, base, -1, "only RecordBatch v2 (magic 2) is stored"
            if total < _BATCH_HEADER or pos + total > len(data):
                return CORRUPT_MESSAGE, base, -1, f"record batch length {total} runs past the request"
            attrs = _I16.unpack_from(data, pos + 21)[0]
            if attrs & 0x30:
                return INVALID_RECORD, base, -1, "transactional and control batches are not supported"
            batch = data[pos:pos + total]
            if attrs & 0x07:
                try:
                    batch = memoryview(decompress_batch(batch))
                except UnsupportedCompression as e:
                    return UNSUPPORTED_COMPRESSION_TYPE, base, -1, str(e)
                except InvalidRecord as e:
                    return CORRUPT_MESSAGE, base, -1, str(e)
            if len(batch) > info.max_message_bytes:
                raise MessageSizeTooLarge(f"a {len(batch)}-byte batch exceeds max.message.bytes="
                                          f"{info.max_message_bytes} of {topic}")
            if _I64.unpack_from(data, pos + 43)[0] >= 0:
                off, _dup = L.pstates.get(plog).append_raw(plog, batch, timeout)
            else:
                off = plog.append_raw(batch, timeout)
            if base < 0:
                base = off
            last = off + _I32.unpack_from(data, pos + 23)[0]
            pos += total
        if acks == -1 and info.replicated and not plog.wait_hw(last, timeout):
            return REQUEST_TIMED_OUT, base, -1, f"offset {last} was not replicated within the request timeout"
    except ShmqError as e:
        code = error_code_for(e)
        if code == 90:
            code = INVALID_PRODUCER_EPOCH
        return code, base, -1, str(e)
    return 0, base, plog.start_offset, None


def produce(conn: "Connection", req: Any, version: int) -> Optional[Dict[str, Any]]:
    acks = req.acks
    timeout = max(0.0, ms(req.timeout) / 1000)
    responses = []
    for td in req.topic_data:
        parts = []
        for pd in td.partition_data:
            if conn.replica is not None:
                code, base, start, msg = (NOT_LEADER_OR_FOLLOWER, -1, -1,
                                          "this node serves follower reads only; node 0 leads every partition")
            elif req.transactional_id is not None:
                code, base, start, msg = (TRANSACTIONAL_ID_AUTHORIZATION_FAILED, -1, -1,
                                          "transactions are not supported by the shmq Kafka listener")
            else:
                code, base, start, msg = _produce_partition(conn, td.name, pd.index, pd.records, acks, timeout)
            parts.append({"index": pd.index, "error_code": code, "base_offset": base, "log_append_time": None,
                          "log_start_offset": start, "record_errors": [], "error_message": msg})
        responses.append({"name": td.name, "partition_responses": parts})
    if acks == 0:
        return None
    return {"responses": responses}


# -------------------------------------------------------------------- Fetch
class _Part:
    __slots__ = ("topic", "partition", "offset", "max_bytes", "committed", "plog", "reader", "txn", "error", "hw",
                 "lso", "start", "chunks", "size", "preferred")

    def __init__(self, topic: str, partition: int, offset: int, max_bytes: int, committed: bool) -> None:
        self.topic, self.partition, self.offset, self.max_bytes = topic, partition, offset, max_bytes
        self.committed = committed
        self.plog: Optional[PartitionLog] = None
        self.reader: Any = None
        self.txn: Optional[_Txn] = None
        self.error = 0
        self.hw = self.lso = self.start = -1
        self.chunks: List[bytes] = []
        self.size = 0
        self.preferred = -1                      # KIP-392: the node the client should fetch this from

    def load_limits(self) -> int:
        """Load the high watermark, then the LSO; returns what may be served."""
        assert self.plog is not None and self.txn is not None
        self.hw = self.plog.high_watermark
        self.lso = self.txn.stable(self.hw)
        return self.lso if self.committed else self.hw


def _read_part(conn: "Connection", p: _Part, limit: int) -> None:
    """Batches of ``p`` from its offset, at most ``limit`` bytes (at least one batch)."""
    data = conn.data
    try:
        if p.plog is None:
            p.plog = _part_log(conn, p.topic, p.partition)
            p.txn = data.txn(p.plog, p.topic, p.partition)
        plog = p.plog
        top = p.load_limits()
        p.start = plog.start_offset
        end = plog.end_offset
        if p.offset < p.start or p.offset > end:
            raise OffsetOutOfRange(f"offset {p.offset} of {p.topic}-{p.partition} is outside [{p.start}, {end}]")
        if p.preferred >= 0:                     # redirected: offsets and watermarks only
            return
        p.reader = data.reader(plog, p.topic, p.partition, p.offset)
        if p.offset >= top:
            return
        buf = data.buf
        want = max(limit, 1)
        if len(buf) < want:
            buf = data.buf = bytearray(min(want, 64 << 20))
        try:
            n = p.reader.read_frames(memoryview(buf)[:min(want, len(buf))])
        except MessageSizeTooLarge:              # one frame larger than the limit: it is sent anyway
            buf = data.buf = bytearray(plog.max_frame_bytes + 64)
            n = p.reader.read_frames(buf)
        mv = memoryview(buf)
        pos = 0
        while pos < n:
            (word,) = _FRAME.unpack_from(buf, pos)
            flen = word & 0xFFFFFFFF
            if word >> 62 == _FRAME_DATA:
                base = _I64.unpack_from(buf, pos + 8)[0]
                if base >= top:
                    break
                blen = _I32.unpack_from(buf, pos + 16)[0] + 12
                if p.size and p.size + blen > limit:
                    break
                p.chunks.append(bytes(mv[pos + 8:pos + 8 + blen]))
                p.size += blen
            pos += flen
        # The reader moved past what was copied; the next fetch seeks to where the client is.
    except ShmqError as e:
        p.error = error_code_for(e)


def _part_log(conn: "Connection", topic: str, partition: int) -> PartitionLog:
    """The log a Fetch on this connection reads: the leader's, or on a
    follower-read node's connection that replica's while it is in sync."""
    cluster = conn.listener.cluster
    r = conn.replica
    if r is None:
        return cluster.log(topic, partition)
    info = cluster.topic(topic)
    rack = (info.config.get("replica_racks") or {}).get(str(r)) if info.replicated else None
    if rack and info.replicas and info.replica_paths and 0 <= partition < info.partitions \
            and r in info.replicas[partition]:
        plog = cluster.read_log(topic, partition, rack)
        if plog.path == info.replica_paths[partition][info.replicas[partition].index(r)]:
            return plog
    raise NotLeaderForPartition(f"replica {r} is not an in-sync follower of {topic}-{partition} in a rack now")


def _preferred_node(conn: "Connection", topic: str, partition: int, rack: str) -> int:
    """KIP-392 on node 0: the follower-read node a client in ``rack`` should
    fetch ``topic``-``partition`` from (-1: from here, the leader)."""
    try:
        info = conn.listener.cluster.topic(topic)
    except ShmqError:
        return -1
    if not info.replicated or not info.config.get("replica_racks") or not 0 <= partition < info.partitions:
        return -1
    rid = info.preferred_read_replica(partition, rack)
    leader = info.leaders[partition] if info.leaders else None
    if rid is None or rid == leader:
        return -1
    return conn.listener.replica_node(rid)


def _aborted_transactions(p: _Part) -> List[Dict[str, int]]:
    """Kafka's aborted_transactions for the batches served to a READ_COMMITTED
    fetch: one (producer id, first offset) per aborted transaction in them
    (see the module doc)."""
    if not p.chunks or p.txn is None:
        return []
    last = _I64.unpack_from(p.chunks[-1], 0)[0] + _I32.unpack_from(p.chunks[-1], 23)[0]
    runs = p.txn.aborted_runs(p.offset, last)
    if not p.txn.seen:
        return []                                # no transaction here ever aborted
    by_pid: Dict[int, List[Tuple[int, int]]] = {}
    for pid, first, lst in runs.tolist():
        by_pid.setdefault(pid, []).append((first, lst))
    out: List[Dict[str, int]] = []
    inside: set = set()                          # producers whose aborted transaction is listed and not ended
    for b in p.chunks:
        attrs = _I16.unpack_from(b, 21)[0]
        if not attrs & ATTR_TRANSACTIONAL:
            continue
        base, pid = _I64.unpack_from(b, 0)[0], _I64.unpack_from(b, 43)[0]
        if attrs & ATTR_CONTROL:
            if pid in inside:
                inside.discard(pid)
            else:
                try:
                    marker = parse_control_record(b)
                except ShmqError:
                    marker = None
                if marker is not None and marker[0] == ABORT:
                    out.append({"producer_id": pid, "first_offset": base})
            continue
        if pid in inside:
            continue
        for first, lst in by_pid.get(pid, ()):
            if first <= base <= lst:
                out.append({"producer_id": pid, "first_offset": first})
                inside.add(pid)
                break
    return out


def _wait_parts(conn: "Connection", parts: List[_Part], timeout: float) -> None:
    """Sleep until one of ``parts`` may have new data, or ``timeout`` passes."""
    waitable = [p for p in parts if p.reader is not None and not p.error]
    if not waitable:
        time.sleep(min(timeout, 0.01))
        return
    deadline = time.monotonic() + timeout
    slice_s = timeout if len(waitable) == 1 else 0.002
    i = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        p = waitable[i % len(waitable)]
        i += 1
        if p.committed and p.plog is not None and p.plog.high_watermark > p.offset:
            # Records are there but not stable (an open transaction): look at the LSO again shortly.
            if p.load_limits() > p.offset:
                return
            time.sleep(min(left, 0.001 if len(waitable) == 1 else 0.0005))
            continue
        r = p.reader
        if p.offset != r.position:
            r.seek(p.offset)
        # Wake at least every unblock interval to pad over a dead producer's claim.
        unblock = p.plog.config.unblock_timeout_ms / 2000 + 0.001
        if lib.shmq_log_wait(p.plog._h, r._cur, 20_000, int(min(left, slice_s, unblock) * 1e9)):
            if not p.committed or p.load_limits() > p.offset:
                return
            continue
        if p.plog.high_watermark > p.offset:
            if not p.committed or p.load_limits() > p.offset:
                return
            continue
        lib.shmq_log_unblock_cursor(p.plog._h, r._cur, conn.data.unblock)


def fetch(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    max_wait = max(0, ms(req.max_wait)) / 1000
    min_bytes = max(0, req.min_bytes)
    max_bytes = getattr(req, "max_bytes", 0x7FFFFFFF)
    if max_bytes <= 0:
        max_bytes = 0x7FFFFFFF
    committed = int(getattr(req, "isolation_level", 0)) == READ_COMMITTED
    parts = [_Part(t.topic, fp.partition, fp.fetch_offset, fp.partition_max_bytes, committed)
             for t in req.topics for fp in t.partitions]
    rack = getattr(req, "rack_id", None)
    if rack and conn.replica is None:
        for p in parts:
            p.preferred = _preferred_node(conn, p.topic, p.partition, rack)
        if any(p.preferred >= 0 for p in parts):
            max_wait = 0.0                       # the client is told where to fetch at once
    deadline = time.monotonic() + max_wait
    while True:
        total = 0
        for p in parts:
            if p.error:
                continue
            limit = min(p.max_bytes, max_bytes - total)
            if limit <= 0 and total:
                continue
            _read_part(conn, p, max(limit, 0))
            total += p.size
        left = deadline - time.monotonic()
        if total >= min_bytes or total > 0 and min_bytes <= 1 or left <= 0 or any(p.error for p in parts):
            break
        _wait_parts(conn, parts, left)
    conn.data.retain({(p.topic, p.partition, p.plog.path) for p in parts if p.plog is not None})
    responses: Dict[str, List[Dict[str, Any]]] = {}
    for p in parts:
        responses.setdefault(p.topic, []).append({
            "partition_index": p.partition, "error_code": p.error, "high_watermark": p.hw,
            "last_stable_offset": p.lso, "log_start_offset": p.start,
            "aborted_transactions": _aborted_transactions(p) if committed and not p.error else None,
            "preferred_read_replica": p.preferred, "records": b"".join(p.chunks)})
    return {"error_code": 0, "session_id": 0,
            "responses": [{"topic": t, "partitions": ps} for t, ps in responses.items()]}


# -------------------------------------------------------------- ListOffsets
EARLIEST, LATEST, MAX_TIMESTAMP = -2, -1, -3


def _list_offset(conn: "Connection", topic: str, partition: int, ts: int, committed: bool) -> Dict[str, Any]:
    out: Dict[str, Any] = {"partition_index": partition, "error_code": 0, "timestamp": -1, "offset": -1,
                           "leader_epoch": -1}
    try:
        plog = conn.listener.cluster.log(topic, partition)
        out["leader_epoch"] = plog.leader_epoch
        top = (stable_offset(plog, conn.listener.root.txn_index_path(topic, partition)) if committed
               else plog.high_watermark)
        if ts == EARLIEST:
            out["offset"] = plog.start_offset
        elif ts == LATEST:
            out["offset"] = top
        elif ts >= 0 or ts == MAX_TIMESTAMP:
            out["offset"], out["timestamp"] = _offset_for_time(plog, ts, top)
        else:
            out["error_code"] = 42
    except ShmqError as e:
        out["error_code"] = error_code_for(e)
    return out


def _offset_for_time(plog: PartitionLog, ts: int, hw: int) -> Tuple[int, int]:
    """(offset, timestamp) of the first record below ``hw`` with timestamp >= ts
    (-1, -1 if none); for MAX_TIMESTAMP, the record with the largest timestamp."""
    r = plog.reader(plog.start_offset, tether=False)
    try:
        if ts == MAX_TIMESTAMP:
            best = (-1, -1)
            while r.position < hw:
                recs = r.read(4096)
                if not recs:
                    break
                for rec in recs:
                    if rec[0] < hw and rec[1] >= best[1]:
                        best = (rec[0], rec[1])
            return best
        off = r.seek_to_time(ts)
        if off >= hw:
            return -1, -1
        recs = r.read(1)
        if not recs:
            return -1, -1
        return recs[0][0], recs[0][1]
    finally:
        r.close()


def list_offsets(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    committed = int(getattr(req, "isolation_level", 0)) == READ_COMMITTED
    topics = []
    for t in req.topics:
        topics.append({"name": t.name, "partitions": [_list_offset(conn, t.name, p.partition_index, p.timestamp,
                                                                   committed) for p in t.partitions]})
    return {"topics": topics}


HANDLERS = {0: produce, 1: fetch, 2: list_offsets}

__all__ = ["HANDLERS", "ProducerStates", "ConnectionData"]
