"""``shmq mirror``: copy topics continuously between a shmq root and a
Kafka-protocol cluster (MirrorMaker's job for one host).

``KafkaToShmq`` copies matching Kafka topics into shmq, ``ShmqToKafka`` the
other way. Topic ``t`` partition ``p`` goes to topic ``t`` partition ``p``;
keys, values, headers and timestamps are kept. Missing destination topics
are created with the source's partition count. The Kafka side uses
confluent-kafka (librdkafka). A restart after ``kill -9`` loses nothing and
duplicates nothing; how, per direction:

Kafka -> shmq (the destination deduplicates)
--------------------------------------------
The source is a confluent-kafka consumer (explicit assignment,
``read_committed``, no auto-commit) whose offsets live in Kafka group
``shmq-mirror-<name>``. The mirror appends to each shmq partition as one
idempotent producer: batches stamped with a producer id ``P`` from the shmq
coordinator, its epoch and dense per-partition sequence numbers (the record
read from Kafka n-th after the anchor gets sequence ``n``). Invariants:

* I1 (single writer). One mirror process per name and root appends with
  ``P`` (``<root>/mirror-<name>-from.lock``, an ``flock``), appending
  partition by partition in sequence order. So in a destination partition
  P's batches carry strictly increasing, gapless sequences.
* I2 (anchor). A Kafka commit for partition p is ``(C, {"pid": P, "epoch":
  E, "seq": n, "off": D})``: every source record below ``C`` that the
  consumer returns has a sequence ``< n`` and is stored in the destination
  below offset ``D`` (for a replicated topic, below its high watermark:
  the mirror waits for it before committing), and the record the consumer
  returns first from ``C`` gets sequence ``n``. The first anchor of a
  partition is committed before anything is appended (so no batch of an
  unknown ``P`` can exist); later ones only after the appends they cover
  were acknowledged. Any commit that lands is a valid anchor, so commits
  may be asynchronous and even land out of order.
* Restart: read the anchor; scan the destination partition's raw frames
  from ``D`` to its end for P's batches (their headers carry producer id
  and base sequence; the producer-state table is not trusted: a holder that
  died mid-update leaves it inexact). The highest sequence found is ``S``
  (none: ``S = n - 1``). Re-consume from ``C`` numbering records ``n,
  n+1, ...`` and drop those numbered ``<= S``: they are stored already.
  The re-read returns the same records in the same order (offsets are
  immutable and ``read_committed`` decides the same way twice), so the
  numbering matches the first pass, and nothing is lost or stored twice.
  A frame the killed mirror had claimed but not committed is padded over
  (the log's unblocker) before the scan ends; its records are re-appended.

Sequences are 31-bit on the wire (Kafka's); anchors hold the full count,
and batches never straddle the wrap, so the scan maps wire values back.

shmq -> Kafka (the destination is counted)
------------------------------------------
The source is a shmq ``Consumer`` (assigned partitions, tethered: it holds
the ring while it runs; the positions are also committed to the shmq group
``shmq-mirror-<name>`` so the ring keeps unmirrored records while the
mirror is down). The destination is a transactional confluent-kafka
producer (``transactional.id`` ``shmq-mirror-<name>``): each transaction
carries a chunk of records, is flushed, then ``send_offsets_to_transaction``
commits for destination partition p the anchor ``(S, {"dest": D})`` in
group ``shmq-mirror-<name>``, and the transaction commits. The same anchor
is then committed again with a plain offset commit. Invariants:

* J1 (single writer). Only this mirror writes to the destination
  partitions it mirrors, in source order (idempotent producer: no
  reordering or duplicates within one producer session; any delivery error
  ends the session and the next one starts from an anchor).
* J2 (anchor). A committed anchor ``(S, D)`` says: the source records below
  ``S`` are in the destination below offset ``D``, and the records the
  destination shows from ``D`` on, in order, are the source's records from
  ``S`` on (J1). The first anchor (``S`` the source start, ``D`` the
  destination end) is committed before anything is produced.
* Restart: ``init_transactions`` fences the killed producer and aborts its
  open transaction. For each partition, count the records a
  ``read_committed`` consumer sees from ``D`` to the end (k); resume the
  source at ``S`` after skipping k records. Exact by J2, whether the
  cluster hides aborted records (Kafka) or shows them (librdkafka's mock
  cluster, which also drops ``TxnOffsetCommit`` offsets: the plain commit
  after each transaction is what keeps anchors there).

Without transactions on the cluster the producer is idempotent and anchors
are committed after the flush. Then a produce request of the killed mirror
that the cluster received but had not yet made visible when the new mirror
counted can be stored twice (``--help`` says so).

Progress: a line every ``progress_interval`` seconds (stderr): records
copied, rate, lag (records the source has that the mirror has not read).
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import (InvalidConfig, KafkaTimeoutError, LeaderNotAvailable, NotLeaderForPartition, ShmqError,
                     UnknownTopicOrPartition)
from .native import ffi, lib
from .ringlog.log import fill_header_blocks
from .root import Root, validate_group

SEQ_MOD = 1 << 31                 # Kafka's sequence numbers are int32, wrapping to 0
BATCH_BYTES = 1 << 20             # largest shmq batch the mirror builds
COMMIT_INTERVAL = 0.2             # seconds between anchor commits (Kafka -> shmq)
TXN_RECORDS = 50_000              # records per transaction (shmq -> Kafka)
TXN_SECONDS = 0.2
DISCOVER_INTERVAL = 5.0           # seconds between looks for new matching topics
KAFKA_TIMEOUT = 30.0
_INTERNAL = re.compile(r"^(__.*|_schemas|.*\.mirror-offsets)$")


class MirrorError(ShmqError):
    """The mirror cannot go on (bad arguments, a cluster that refuses, a topic too small)."""


class SessionFailed(MirrorError):
    """A delivery or commit failed mid-copy: the mirror starts again from its anchors."""


# ------------------------------------------------------------------ helpers
def parse_kafka_url(url: str) -> str:
    """``kafka://host:port[,host:port...]`` -> librdkafka's bootstrap.servers."""
    m = re.fullmatch(r"kafka://([^/?#]+)/?", url or "")
    if not m:
        raise InvalidConfig(f"{url!r} is not a kafka://HOST:PORT URL")
    hosts = m.group(1).split(",")
    for h in hosts:
        if not re.fullmatch(r"[A-Za-z0-9_.\-]+:\d{1,5}|\[[0-9A-Fa-f:.]+\]:\d{1,5}", h):
            raise InvalidConfig(f"{url!r}: {h!r} is not HOST:PORT")
    return ",".join(hosts)


def topic_matcher(patterns: str) -> Callable[[str], bool]:
    """Kafka MirrorMaker's ``topics``: comma-separated regular expressions,
    each matching a whole topic name (``orders.*``, ``a,b``)."""
    parts = [p.strip() for p in (patterns or "").split(",") if p.strip()]
    if not parts:
        raise InvalidConfig("--topics needs at least one topic name or regular expression")
    try:
        rx = re.compile("|".join(f"(?:{p})" for p in parts))
    except re.error as e:
        raise InvalidConfig(f"--topics {patterns!r} is not a valid regular expression: {e}") from None
    return lambda name: rx.fullmatch(name) is not None and not _INTERNAL.match(name)


def _ck() -> Any:
    try:
        import confluent_kafka
        import confluent_kafka.admin  # noqa: F401
    except ImportError:  # pragma: no cover - a dependency of the test extra
        raise MirrorError("shmq mirror needs confluent-kafka (pip install confluent-kafka)") from None
    return confluent_kafka


# librdkafka's log lines (connection trouble, ...) go through Python logging:
# warnings and worse reach stderr unless the application configures logging.
KAFKA_LOG = logging.getLogger("shmq.mirror.librdkafka")


def quiet_kafka_logger() -> logging.Logger:
    """A logger for confluent-kafka's ``logger`` setting that drops librdkafka's
    lines (tests and benchmarks: the mock cluster's disconnects are noise)."""
    log = logging.getLogger("shmq.mirror.librdkafka.quiet")
    log.propagate = False
    if not log.handlers:
        log.addHandler(logging.NullHandler())
    return log


class _Lock:
    """I1/J1: one mirror process per (root, name, direction)."""

    def __init__(self, root: Root, name: str, direction: str) -> None:
        self.path = os.path.join(root.path, f"mirror-{name}-{direction}.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise MirrorError(f"another mirror named {name!r} ({direction}) runs on {root.path} "
                              f"(it holds {self.path})") from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Progress:
    """The periodic progress line."""

    def __init__(self, label: str, interval: float, out: Any = None) -> None:
        self.label, self.interval = label, interval
        self.out = out if out is not None else sys.stderr
        self.copied = 0
        self._last_t = time.monotonic()
        self._last_n = 0
        self._next = self._last_t + interval

    def due(self) -> bool:
        return self.interval > 0 and time.monotonic() >= self._next

    def report(self, lag: Optional[int], partitions: int) -> None:
        now = time.monotonic()
        rate = (self.copied - self._last_n) / max(now - self._last_t, 1e-9)
        self._last_t, self._last_n = now, self.copied
        self._next = now + self.interval
        lag_s = "?" if lag is None else f"{lag:,}"
        print(f"mirror {self.label}: {self.copied:,} records copied, {rate:,.0f} records/s, lag {lag_s} "
              f"records, {partitions} partitions", file=self.out, flush=True)



class _Mirror:
    """What both directions share: options, the single-instance lock, the
    loop (discover topics, copy a step, report progress) and stopping."""

    direction = ""

    def __init__(self, bootstrap: str, topics: str, root: Any = None, *, name: str = "default",
                 kafka_config: Optional[Dict[str, Any]] = None, progress_interval: float = 5.0,
                 out: Any = None) -> None:
        validate_group(f"shmq-mirror-{name}")
        self.bootstrap, self.topics = bootstrap, topics
        self.options: Dict[str, Any] = {"name": name, "kafka_config": kafka_config,
                                        "progress_interval": progress_interval, "out": out}
        self.match = topic_matcher(topics)
        self.root = Root(root)
        self.name = name
        self.group = f"shmq-mirror-{name}"
        self.extra = dict(kafka_config or {})
        ends = (f"kafka://{bootstrap}", self.root.path)
        self.progress = Progress(" -> ".join(ends if self.direction == "from" else ends[::-1]),
                                 progress_interval, out)
        self._stop = threading.Event()
        self.parts: Dict[Tuple[str, int], Any] = {}
        self._checked = False          # commit metadata read back once (warn_if_metadata_dropped)

    def stop(self) -> None:
        self._stop.set()

    def _open(self) -> None:
        raise NotImplementedError

    def _close(self) -> None:
        raise NotImplementedError

    def _close_all(self, *attrs: str) -> None:
        """Close the clients opened so far (a failed close does not stop the others)."""
        for attr in attrs:
            obj = getattr(self, attr, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception as e:
                    print(f"mirror: closing {attr}: {e}", file=sys.stderr, flush=True)

    def _discover(self) -> None:
        raise NotImplementedError

    def _step(self) -> None:
        """Copy what the source has now (waiting briefly when it has nothing)."""
        raise NotImplementedError

    def _finish(self) -> None:
        """On a clean stop: commit what was copied."""
        raise NotImplementedError

    def lag(self) -> Optional[int]:
        raise NotImplementedError

    def run(self, max_seconds: Optional[float] = None) -> int:
        """Mirror until ``stop()`` (SIGTERM/SIGINT under ``run_mirror``) or
        ``max_seconds``; returns 0."""
        self.lock = _Lock(self.root, self.name, self.direction)
        deadline = None if max_seconds is None else time.monotonic() + max_seconds
        try:
            self._open()
            next_discover = 0.0
            while not self._stop.is_set() and (deadline is None or time.monotonic() < deadline):
                if time.monotonic() >= next_discover:
                    self._discover()
                    next_discover = time.monotonic() + DISCOVER_INTERVAL
                if self.parts:
                    self._step()
                else:
                    time.sleep(0.1)
                if self.progress.due():
                    self.progress.report(self.lag(), len(self.parts))
            self._finish()
            if self.progress.interval > 0:
                # A last line on a clean stop, so a short run reports what it copied too.
                self.progress.report(self.lag(), len(self.parts))
        finally:
            try:
                self._close()
            finally:
                self.lock.close()
        return 0


# ========================================================== Kafka -> shmq
class _InPart:
    """One Kafka partition mirrored into the shmq partition of the same number."""

    __slots__ = ("topic", "partition", "log", "pid", "epoch", "seq", "skip_to", "src_next", "dest_next",
                 "dirty", "acked")

    def __init__(self, topic: str, partition: int, log: Any) -> None:
        self.topic, self.partition, self.log = topic, partition, log
        self.pid = self.epoch = -1
        self.seq = 0              # logical sequence of the next record read from Kafka
        self.skip_to = -1         # records numbered <= this are stored already
        self.src_next = -1        # Kafka offset after the last record read
        self.dest_next = -1       # shmq offset after the last record appended
        self.dirty = False        # appended since the last anchor commit
        self.acked: Tuple[int, int, int] = (-1, 0, -1)   # last anchor committed: (C, n, D)


def anchor_metadata(pid: int, epoch: int, seq: int, off: int) -> str:
    return json.dumps({"pid": pid, "epoch": epoch, "seq": seq, "off": off}, separators=(",", ":"))


def parse_anchor(metadata: Optional[str]) -> Optional[Tuple[int, int, int, int]]:
    """(pid, epoch, seq, off) from a commit's metadata, None if it is not ours."""
    if not metadata:
        return None
    try:
        d = json.loads(metadata)
        vals = (int(d["pid"]), int(d["epoch"]), int(d["seq"]), int(d["off"]))
    except (ValueError, TypeError, KeyError):
        return None
    return vals if all(v >= 0 for v in vals) else None


def warn_if_metadata_dropped(consumer: Any, committed: List[Any]) -> None:
    """Read commits back: a cluster that drops offset commit metadata loses
    the anchors, and then a restart resumes at the committed offsets without
    them (at least once): say so."""
    got = consumer.committed([_ck().TopicPartition(tp.topic, tp.partition) for tp in committed],
                             timeout=KAFKA_TIMEOUT)
    if [g.metadata for g in got] != [tp.metadata for tp in committed]:
        print("mirror: WARNING: the cluster does not keep offset commit metadata; after a crash the mirror "
              "resumes at the committed offsets and records copied since then may be copied twice",
              file=sys.stderr, flush=True)


def last_sequence(log: Any, pid: int, from_offset: int, base_seq: int, timeout: float = 30.0) -> Optional[int]:
    """The highest sequence producer ``pid`` stored in ``log`` at or after
    ``from_offset`` (logical: mapped into ``[base_seq, base_seq + 2**31)``),
    or None. Reads raw frames up to the log's end as it is now, waiting for
    (and padding, after the log's unblock timeout) a frame left incomplete by
    a dead writer."""
    from .ringlog import LogReader
    start = max(from_offset, log.start_offset)
    end = log.end_offset
    if start >= end:
        return None
    reader = LogReader(log, start, tether=False, check_crc=True, label="mirror-scan")
    buf = bytearray(max(1 << 20, log.max_frame_bytes + 64))
    mv = memoryview(buf)
    unblock = ffi.new("shmq_unblock_state *")
    best: Optional[int] = None
    deadline = time.monotonic() + timeout
    try:
        while reader.position < end:
            n = reader.read_frames(buf)
            if n == 0:
                if time.monotonic() > deadline:
                    raise KafkaTimeoutError(f"scan of {log.name} for producer {pid}: stuck at offset "
                                            f"{reader.position} below the end {end}")
                lib.shmq_log_wait_frames(log._h, reader._cur, 0, 20_000_000)
                lib.shmq_log_unblock_cursor(log._h, reader._cur, unblock)
                continue
            pos = 0
            while pos + 8 <= n:
                word = int.from_bytes(mv[pos:pos + 8], "little")
                length = word & 0xFFFFFFFF
                if word >> 62 == lib.SHMQ_FRAME_DATA:
                    b = pos + 8
                    if int.from_bytes(mv[b + 43:b + 51], "big", signed=True) == pid:
                        base = int.from_bytes(mv[b + 53:b + 57], "big", signed=True)
                        count = int.from_bytes(mv[b + 57:b + 61], "big", signed=True)
                        if base >= 0 and count > 0:
                            last = base_seq + ((base + count - 1 - base_seq) % SEQ_MOD)
                            best = last if best is None else max(best, last)
                pos += length
    finally:
        reader.close()
    return best


_SMALL = [bytes([i << 1]) for i in range(64)]        # zig-zag varints of 0..63: one byte
_HKEYS: Dict[str, bytes] = {}


def _varint(n: int) -> bytes:
    if 0 <= n < 64:
        return _SMALL[n]
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _header_block(headers: Optional[List[Tuple[str, Optional[bytes]]]]) -> bytes:
    """One record's header block as ``encode_headers`` writes it, from
    confluent-kafka's header list (keys are few: their encoding is cached)."""
    if not headers:
        return b"\x00"
    parts = [_varint(len(headers))]
    for k, v in headers:
        kb = _HKEYS.get(k)
        if kb is None:
            raw = k.encode()
            kb = _varint(len(raw)) + raw
            if len(_HKEYS) < 4096:
                _HKEYS[k] = kb
        parts.append(kb)
        if v is None:
            parts.append(b"\x01")                         # zig-zag -1: a null value
        else:
            parts.append(_varint(len(v)))
            parts.append(v)
    return b"".join(parts)


class KafkaToShmq(_Mirror):
    """Mirror Kafka topics matching ``topics`` into the shmq root ``root``."""

    direction = "from"

    def __init__(self, bootstrap: str, topics: str, root: Any = None, **kw: Any) -> None:
        super().__init__(bootstrap, topics, root, **kw)
        self._pid: Optional[Tuple[int, int]] = None
        self._meta = ffi.new("shmq_batch_meta *")

    # ------------------------------------------------------------- setup
    def _open(self) -> None:
        ck = _ck()
        from .admin import Admin
        from .cluster import Cluster
        conf = {"bootstrap.servers": self.bootstrap, "group.id": self.group, "enable.auto.commit": False,
                "enable.auto.offset.store": False, "isolation.level": "read_committed",
                "auto.offset.reset": "earliest", "enable.partition.eof": False, "logger": KAFKA_LOG}
        conf.update(self.extra)
        self.consumer = ck.Consumer(conf)
        self.admin = Admin(self.root)
        self.cluster = Cluster(self.root)
        self._next_commit = time.monotonic() + COMMIT_INTERVAL

    def _close(self) -> None:
        self._close_all("consumer", "admin", "cluster")

    def _producer_id(self) -> Tuple[int, int]:
        if self._pid is None:
            self._pid = self.cluster._client.allocate_producer_id(None)
        return self._pid

    def _discover(self) -> None:
        """Start mirroring every matching Kafka topic not mirrored yet."""
        ck = _ck()
        md = self.consumer.list_topics(timeout=KAFKA_TIMEOUT)
        new: List[Any] = []
        for name, t in sorted(md.topics.items()):
            if not self.match(name) or t.error is not None:
                continue
            count = len(t.partitions)
            if all((name, p) in self.parts for p in range(count)):
                continue
            self._ensure_topic(name, count)
            for p in range(count):
                if (name, p) not in self.parts:
                    new.append(self._start_partition(name, p))
        if new:
            self.consumer.incremental_assign([ck.TopicPartition(t, p, off) for t, p, off in new])

    def _ensure_topic(self, name: str, count: int) -> None:
        from .errors import TopicAlreadyExists
        try:
            have = self.cluster.topic(name).partitions
        except UnknownTopicOrPartition:
            try:
                self.admin.create_topic(name, count)
                return
            except TopicAlreadyExists:
                have = self.cluster.topic(name).partitions
        if have < count:
            self.admin.create_partitions(name, count)

    def _start_partition(self, topic: str, partition: int) -> Tuple[str, int, int]:
        """Read the partition's anchor (or commit a first one) and find what
        the destination holds already; returns where to consume from."""
        ck = _ck()
        log = self.cluster.log(topic, partition)
        st = _InPart(topic, partition, log)
        tp = ck.TopicPartition(topic, partition)
        got = self.consumer.committed([tp], timeout=KAFKA_TIMEOUT)[0]
        anchor = parse_anchor(got.metadata) if got.offset >= 0 else None
        if anchor is not None:
            st.pid, st.epoch, st.seq, hint = anchor
            start = got.offset
            last = last_sequence(log, st.pid, hint, st.seq)
            st.skip_to = st.seq - 1 if last is None else last
            if log.replicated:      # what the scan saw must be committed before it is trusted
                end = log.end_offset
                if end > 0 and not log.wait_hw(end - 1, KAFKA_TIMEOUT):
                    raise KafkaTimeoutError(f"{log.name}: high watermark did not reach {end}")
            st.acked = (start, st.seq, hint)
        else:
            st.pid, st.epoch = self._producer_id()
            start = got.offset if got.offset >= 0 else \
                self.consumer.get_watermark_offsets(tp, timeout=KAFKA_TIMEOUT)[0]
            hint = log.end_offset
            # I2: the first anchor is durable before the first append.
            first = [ck.TopicPartition(topic, partition, start, metadata=anchor_metadata(st.pid, st.epoch, 0, hint))]
            self.consumer.commit(offsets=first, asynchronous=False)
            if not self._checked:
                self._checked = True
                warn_if_metadata_dropped(self.consumer, first)
            st.acked = (start, 0, hint)
        st.src_next = start
        st.dest_next = hint
        self.parts[(topic, partition)] = st
        return topic, partition, start

    # -------------------------------------------------------------- copy
    def _copy(self, st: _InPart, run: List[Any]) -> None:
        """Append one partition's run of consumed records (in order)."""
        first = st.seq
        st.seq += len(run)
        st.src_next = run[-1].offset() + 1
        if st.skip_to >= first:
            drop = min(len(run), st.skip_to - first + 1)
            run = run[drop:]
            first += drop
        i = 0
        while i < len(run):
            # A batch stops at BATCH_BYTES and never straddles the sequence wrap.
            room = SEQ_MOD - (first % SEQ_MOD)
            size = 0
            j = i
            limit = min(len(run), i + room)
            while j < limit:
                m = run[j]
                size += len(m.value() or b"") + len(m.key() or b"") + 32
                if j > i and size > BATCH_BYTES:
                    break
                j += 1
            self._append(st, run[i:j], first)
            first += j - i
            self.progress.copied += j - i
            i = j

    def _append(self, st: _InPart, msgs: List[Any], first_seq: int) -> None:
        values = [m.value() for m in msgs]
        keys = [m.key() for m in msgs]
        hs = [m.headers() for m in msgs]
        ts = np.fromiter((m.timestamp()[1] for m in msgs), dtype=np.int64, count=len(msgs))
        if (ts < 0).any():                      # TIMESTAMP_NOT_AVAILABLE: stored as now
            ts[ts < 0] = time.time_ns() // 1_000_000
        recs, keep, n = st.log.build_records(values, keys if any(k is not None for k in keys) else None,
                                             None, int(ts[0]))
        if any(hs):
            fill_header_blocks(recs, list(map(_header_block, hs)), n, keep)
        recs.timestamps = ffi.cast("int64_t *", ts.ctypes.data)
        meta = self._meta
        meta.producer_id, meta.producer_epoch = st.pid, st.epoch
        meta.base_sequence, meta.attributes, meta.leader_epoch = first_seq % SEQ_MOD, 0, -1
        while True:
            off = lib.shmq_log_append(st.log._h, recs, meta, 1_000_000_000)
            if off != lib.SHMQ_ERR_TIMEOUT:
                break
            if self._stop.is_set():
                raise KeyboardInterrupt
        if off < 0:
            st.log._fail(off, f"mirror append of {n} records")
        del keep
        st.dest_next = off + n
        st.dirty = True

    def _commit(self, sync: bool = False) -> None:
        """Commit an anchor (I2) for every partition appended to since the last."""
        ck = _ck()
        out = []
        for st in self.parts.values():
            if not st.dirty:
                continue
            if st.log.replicated and not st.log.wait_hw(st.dest_next - 1, KAFKA_TIMEOUT):
                continue                      # not acknowledged yet: the next round commits it
            st.dirty = False
            st.acked = (st.src_next, st.seq, st.dest_next)
            out.append(ck.TopicPartition(st.topic, st.partition, st.src_next,
                                         metadata=anchor_metadata(st.pid, st.epoch, st.seq, st.dest_next)))
        if out:
            self.consumer.commit(offsets=out, asynchronous=not sync)

    def lag(self) -> Optional[int]:
        ck = _ck()
        total = 0
        for st in self.parts.values():
            try:
                _lo, hi = self.consumer.get_watermark_offsets(ck.TopicPartition(st.topic, st.partition),
                                                              cached=True)
            except Exception:
                return None
            if hi < 0:
                return None
            total += max(0, hi - st.src_next)
        return total

    def _resync(self, st: _InPart) -> None:
        """A leader change on the destination: start the partition again from
        its last committed anchor, as a restart would."""
        ck = _ck()
        self.cluster.topic(st.topic)
        log = self.cluster.log(st.topic, st.partition)
        c, n, d = st.acked
        st.log = log
        last = last_sequence(log, st.pid, d, n)
        st.seq, st.skip_to, st.src_next, st.dest_next, st.dirty = n, n - 1 if last is None else last, c, d, False
        self.consumer.seek(ck.TopicPartition(st.topic, st.partition, c))

    def _step(self) -> None:
        msgs = self.consumer.consume(num_messages=20_000, timeout=0.1)
        run: List[Any] = []
        key: Any = None
        skip: set = set()
        for m in msgs:
            if m.error() is not None:
                if m.error().code() != _ck().KafkaError._PARTITION_EOF:
                    print(f"mirror: consumer: {m.error()}", file=sys.stderr, flush=True)
                continue
            k = (m.topic(), m.partition())
            if k != key:
                if run:
                    self._copy_safe(self.parts[key], run, skip)
                key, run = k, []
            if k not in skip:
                run.append(m)
        if run:
            self._copy_safe(self.parts[key], run, skip)
        if time.monotonic() >= self._next_commit:
            self._commit()
            self._next_commit = time.monotonic() + COMMIT_INTERVAL

    def _finish(self) -> None:
        self._commit(sync=True)

    def _copy_safe(self, st: _InPart, run: List[Any], skip: set) -> None:
        try:
            self._copy(st, run)
        except (NotLeaderForPartition, LeaderNotAvailable) as e:
            print(f"mirror: {st.topic}-{st.partition}: {e}; resuming from the last anchor", file=sys.stderr,
                  flush=True)
            time.sleep(0.05)
            skip.add((st.topic, st.partition))     # the rest of this poll is re-read after the seek
            self._resync(st)


# ========================================================== shmq -> Kafka
class _OutPart:
    """One shmq partition mirrored into the Kafka partition of the same number."""

    __slots__ = ("topic", "partition", "skip", "src_next", "dest_next", "pending", "last_delivered", "error")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition
        self.skip = 0               # records at the resume point the destination holds already
        self.src_next = -1          # shmq offset after the last record read
        self.dest_next = -1         # Kafka offset after the last record delivered
        self.pending = False        # produced since the last anchor commit
        self.last_delivered = -1
        self.error: Optional[str] = None


def count_records(consumer: Any, starts: Dict[Tuple[str, int], int], timeout: float = KAFKA_TIMEOUT
                  ) -> Dict[Tuple[str, int], Tuple[int, int]]:
    """For each (topic, partition): (records ``consumer`` (read_committed,
    enable.partition.eof) sees from the start offset to the end, the end
    offset reached)."""
    ck = _ck()
    if not starts:
        return {}
    counts = {k: 0 for k in starts}
    ends = dict(starts)
    open_ = set(starts)
    consumer.assign([ck.TopicPartition(t, p, off) for (t, p), off in starts.items()])
    deadline = time.monotonic() + timeout
    while open_:
        if time.monotonic() > deadline:
            raise MirrorError(f"counting the destination's records did not reach the end of {sorted(open_)} "
                              f"within {timeout} s")
        for m in consumer.consume(num_messages=10_000, timeout=0.2):
            k = (m.topic(), m.partition())
            err = m.error()
            if err is not None:
                if err.code() == ck.KafkaError._PARTITION_EOF:
                    ends[k] = max(ends[k], m.offset())
                    open_.discard(k)
                    continue
                raise MirrorError(f"counting {k[0]}-{k[1]}: {err}")
            counts[k] += 1
            ends[k] = m.offset() + 1
    consumer.unassign()
    return {k: (counts[k], ends[k]) for k in starts}


class ShmqToKafka(_Mirror):
    """Mirror shmq topics matching ``topics`` from the root ``root`` into Kafka."""

    direction = "to"

    def __init__(self, bootstrap: str, topics: str, root: Any = None, *, transactional: Optional[bool] = None,
                 **kw: Any) -> None:
        super().__init__(bootstrap, topics, root, **kw)
        self.options["transactional"] = transactional
        self.want_txn = transactional
        self.transactional = False

    # ------------------------------------------------------------- setup
    def _open(self) -> None:
        ck = _ck()
        from .cluster import Cluster
        from .consumer import Consumer
        base = {"bootstrap.servers": self.bootstrap, "logger": KAFKA_LOG}
        self.kconsumer = ck.Consumer({**base, "group.id": self.group, "enable.auto.commit": False,
                                      "isolation.level": "read_committed", "enable.partition.eof": True,
                                      **self.extra})
        pconf = {**base, "linger.ms": 5, "batch.num.messages": 10_000, "queue.buffering.max.messages": 500_000,
                 "queue.buffering.max.kbytes": 1 << 20, "acks": "all", "enable.idempotence": True, **self.extra}
        self.producer = None
        if self.want_txn is not False:
            p = ck.Producer({**pconf, "transactional.id": self.group, "transaction.timeout.ms": 60_000})
            try:
                p.init_transactions(KAFKA_TIMEOUT)   # fences and aborts a killed predecessor's transaction
                self.producer, self.transactional = p, True
            except ck.KafkaException as e:
                if self.want_txn:
                    raise MirrorError(f"the cluster refused transactions: {e}") from None
                print(f"mirror: the cluster has no transactions ({e}); using an idempotent producer: after a "
                      f"crash, records the cluster received but had not acknowledged may be copied twice",
                      file=sys.stderr, flush=True)
        if self.producer is None:
            self.producer = ck.Producer(pconf)
        self.admin = ck.admin.AdminClient(base)
        self.cluster = Cluster(self.root)
        self.source = Consumer(root=self.root, group_id=self.group, enable_auto_commit=False,
                               client_id=f"mirror-{self.name}", max_poll_records=TXN_RECORDS,
                               auto_offset_reset="earliest")
        self._in_txn = False
        self._txn_started = 0.0
        self._txn_count = 0

    def _close(self) -> None:
        if getattr(self, "_in_txn", False):
            try:
                self.producer.abort_transaction(5)
            except Exception:
                pass
        self._close_all("source", "kconsumer", "cluster")
        if getattr(self, "producer", None) is not None:
            self.producer.flush(5)

    def _discover(self) -> None:
        ck = _ck()
        from .message import TopicPartition
        new: List[Tuple[str, int]] = []
        for name in self.cluster.topics():
            if not self.match(name):
                continue
            count = self.cluster.topic(name).partitions
            if all((name, p) in self.parts for p in range(count)):
                continue
            self._ensure_topic(name, count)
            new.extend((name, p) for p in range(count) if (name, p) not in self.parts)
        if not new:
            return
        got = self.kconsumer.committed([ck.TopicPartition(t, p) for t, p in new], timeout=KAFKA_TIMEOUT)
        count_from: Dict[Tuple[str, int], int] = {}
        first: List[Any] = []
        resume: Dict[Tuple[str, int], int] = {}
        for tp in got:
            k = (tp.topic, tp.partition)
            dest = _parse_dest(tp.metadata) if tp.offset >= 0 else None
            if dest is not None:
                resume[k] = tp.offset
                count_from[k] = dest
            else:
                # J2: the first anchor, committed before anything is produced.
                start = tp.offset if tp.offset >= 0 else self.cluster.log(*k).start_offset
                _lo, hi = self.kconsumer.get_watermark_offsets(ck.TopicPartition(*k), timeout=KAFKA_TIMEOUT)
                resume[k] = start
                first.append(ck.TopicPartition(k[0], k[1], start, metadata=_dest_metadata(hi)))
                count_from[k] = -1
                self.parts[k] = st = _OutPart(*k)
                st.dest_next = hi
        if first:
            self.kconsumer.commit(offsets=first, asynchronous=False)
            if not self._checked:
                self._checked = True
                warn_if_metadata_dropped(self.kconsumer, first)
        counted = count_records(self.kconsumer, {k: d for k, d in count_from.items() if d >= 0})
        for k, (n, end) in counted.items():
            self.parts[k] = st = _OutPart(*k)
            st.skip, st.dest_next = n, end
        for k in new:
            self.parts[k].src_next = resume[k]
        self.source.assign([TopicPartition(*k) for k in self.parts])
        for k in new:
            self.source.seek(TopicPartition(*k), resume[k])

    def _ensure_topic(self, name: str, count: int) -> None:
        """Create the Kafka topic with ``count`` partitions; a cluster without
        CreateTopics (librdkafka's mock) auto-creates it on first use, then it
        must have at least ``count``."""
        ck = _ck()
        md = self.producer.list_topics(timeout=KAFKA_TIMEOUT)
        t = md.topics.get(name)
        if t is None or t.error is not None:
            try:
                if md.controller_id not in md.brokers:    # no controller to send CreateTopics to (the mock)
                    raise MirrorError("the cluster names no controller")
                fut = self.admin.create_topics([ck.admin.NewTopic(name, count, -1)], request_timeout=5.0)[name]
                fut.result(timeout=10)
            except Exception as e:        # no CreateTopics, or it exists now: auto-creation decides
                if "TOPIC_ALREADY_EXISTS" not in str(e):
                    print(f"mirror: could not create Kafka topic {name!r} ({e or type(e).__name__}); relying "
                          f"on auto-creation", file=sys.stderr, flush=True)
            deadline = time.monotonic() + KAFKA_TIMEOUT
            while True:
                t = self.producer.list_topics(name, timeout=KAFKA_TIMEOUT).topics.get(name)
                if t is not None and t.error is None and t.partitions:
                    break
                if time.monotonic() > deadline:
                    raise MirrorError(f"Kafka topic {name!r} could not be created: {t.error if t else 'missing'}")
                time.sleep(0.2)
        if len(t.partitions) < count:
            raise MirrorError(f"Kafka topic {name!r} has {len(t.partitions)} partitions, fewer than the "
                              f"{count} of the shmq topic; add partitions to it first")

    # -------------------------------------------------------------- copy
    def _delivered(self, err: Any, msg: Any) -> None:
        st = self.parts.get((msg.topic(), msg.partition()))
        if st is None:
            return
        if err is not None:
            st.error = str(err)
        else:
            st.last_delivered = max(st.last_delivered, msg.offset())

    def _produce(self, msgs: Sequence[Any]) -> None:
        by_part: Dict[Tuple[str, int], List[Any]] = {}
        for m in msgs:
            by_part.setdefault((m.topic, m.partition), []).append(m)
        produce = self.producer.produce
        for k, run in by_part.items():
            st = self.parts[k]
            st.src_next = run[-1].offset + 1
            if st.skip:
                drop = min(st.skip, len(run))
                st.skip -= drop
                run = run[drop:]
                if not run:
                    continue
            if self.transactional and not self._in_txn:
                self.producer.begin_transaction()
                self._in_txn, self._txn_started = True, time.monotonic()
            topic, part = k
            last = len(run) - 1
            for i, m in enumerate(run):
                kw = {"on_delivery": self._delivered} if i == last else {}
                while True:
                    try:
                        produce(topic, m.value, m.key, part, timestamp=m.timestamp_ms,
                                headers=list(m.headers) if m.headers else None, **kw)
                        break
                    except BufferError:
                        self.producer.poll(0.05)
            st.pending = True
            self._txn_count += len(run)
            self.progress.copied += len(run)
        self.producer.poll(0)

    def _commit(self) -> None:
        """Flush, then commit an anchor (J2) per partition produced to (inside
        the transaction, and again plainly after it)."""
        ck = _ck()
        if self.producer.flush(KAFKA_TIMEOUT) > 0:
            raise SessionFailed("the Kafka producer did not deliver within the timeout")
        out = []
        for st in self.parts.values():
            if st.error is not None:
                raise SessionFailed(f"delivery to {st.topic}-{st.partition} failed: {st.error}")
            if st.pending:
                st.pending = False
                st.dest_next = st.last_delivered + 1
                out.append(ck.TopicPartition(st.topic, st.partition, st.src_next,
                                             metadata=_dest_metadata(st.dest_next)))
        if self.transactional and self._in_txn:
            if out:
                self.producer.send_offsets_to_transaction(out, self.kconsumer.consumer_group_metadata(),
                                                          KAFKA_TIMEOUT)
            self.producer.commit_transaction(KAFKA_TIMEOUT)
            self._in_txn = False
        if out:
            self.kconsumer.commit(offsets=out, asynchronous=not self.transactional)
            from .message import TopicPartition
            try:        # the shmq group: keeps the source ring from recycling what is not mirrored
                self.source.commit(offsets={TopicPartition(tp.topic, tp.partition): tp.offset for tp in out})
            except ShmqError as e:
                print(f"mirror: shmq commit: {e}", file=sys.stderr, flush=True)
        self._txn_count = 0

    def lag(self) -> Optional[int]:
        total = 0
        for st in self.parts.values():
            try:
                total += max(0, self.cluster.log(st.topic, st.partition).high_watermark - st.src_next)
            except ShmqError:
                return None
        return total

    def _step(self) -> None:
        msgs = self.source.consume(TXN_RECORDS, timeout=0.05)
        if msgs:
            self._produce(msgs)
        if any(st.pending for st in self.parts.values()) and (
                not msgs or not self.transactional or self._txn_count >= TXN_RECORDS or
                time.monotonic() - self._txn_started >= TXN_SECONDS):
            self._commit()

    def _finish(self) -> None:
        if any(st.pending for st in self.parts.values()):
            self._commit()


def _dest_metadata(dest: int) -> str:
    return json.dumps({"dest": dest}, separators=(",", ":"))


def _parse_dest(metadata: Optional[str]) -> Optional[int]:
    if not metadata:
        return None
    try:
        d = int(json.loads(metadata)["dest"])
    except (ValueError, TypeError, KeyError):
        return None
    return d if d >= 0 else None


# ------------------------------------------------------------------ command
def run_mirror(from_url: Optional[str], to_url: Optional[str], topics: str, root: Any = None, *,
               name: str = "default", progress_interval: float = 5.0, transactional: Optional[bool] = None,
               kafka_config: Optional[Dict[str, Any]] = None) -> int:
    """The ``shmq mirror`` command: runs until SIGTERM or SIGINT."""
    if (from_url is None) == (to_url is None):
        raise InvalidConfig("shmq mirror needs exactly one of --from kafka://HOST:PORT or --to kafka://HOST:PORT")
    m: Any
    if from_url is not None:
        m = KafkaToShmq(parse_kafka_url(from_url), topics, root, name=name, kafka_config=kafka_config,
                        progress_interval=progress_interval)
    else:
        m = ShmqToKafka(parse_kafka_url(to_url or ""), topics, root, name=name, kafka_config=kafka_config,
                        progress_interval=progress_interval, transactional=transactional)

    stopped = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stopped.set()
        m.stop()
    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while True:
            try:
                return m.run()
            except (_ck().KafkaException, SessionFailed, NotLeaderForPartition, LeaderNotAvailable,
                    KafkaTimeoutError) as e:
                # A Kafka or shmq error mid-copy: start over from the committed
                # anchors, exactly as a restarted process would.
                print(f"mirror: {type(e).__name__}: {e}; starting again from the committed positions",
                      file=sys.stderr, flush=True)
                if stopped.wait(1.0):
                    return 0
                m = type(m)(m.bootstrap, m.topics, m.root, **m.options)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
