"""Partition log against a pure-Python model, plus the basic API contract.

The state machine appends single records (keys, null values, headers,
explicit non-decreasing timestamps) and batches (lists and 2-D uint8 numpy
arrays) into a small ring (4-8 KiB segments, 3-4 slots, overwrite mode), so
segments seal and the ring wraps many times per example. The model is a list
of every record ever appended plus an exact simulation of segment placement
(frame sizes come from the C core's own size functions), which tells which
segments the ring still holds: the log start offset must be exactly the base
of the oldest retained segment, every offset at or above it must read back
equal, and every offset below it must raise OffsetOutOfRange, never data.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import Any, List, Optional, Tuple

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition,
                                 rule, run_state_machine_as_test)

from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder

from shmq.errors import (InvalidConfig, InvalidRecord, KafkaStorageError, MessageSizeTooLarge,
                         OffsetOutOfRange)
from shmq.native import ffi, lib
from shmq.ringlog import LogConfig, LogReader, PartitionLog, encode_headers
from shmq.ringlog.log import _fill_field

FRAME_HEADER = 8


def align8(v: int) -> int:
    return (v + 7) & ~7


def frame_len_single(key: Optional[bytes], value: Optional[bytes], headers) -> int:
    hlen = len(encode_headers(headers)) if headers else 0
    blen = lib.shmq_batch_size1(-1 if key is None else len(key), -1 if value is None else len(value), hlen)
    assert blen > 0
    return align8(blen + FRAME_HEADER)


def frame_len_batch(values: Any, keys: Any) -> int:
    recs = ffi.new("shmq_records *")
    keep: List[Any] = []
    n = _fill_field(recs, "value", values, keep)
    if keys is not None:
        _fill_field(recs, "key", keys, keep)
    recs.count = n
    recs.base_timestamp = 0
    blen = lib.shmq_batch_size(recs)
    assert blen > 0
    return align8(blen + FRAME_HEADER)


def as_list(arr: Any, n: int = 0) -> List[Optional[bytes]]:
    if arr is None:  # read_arrays gives keys=None when no record has a key
        return [None] * n
    if isinstance(arr, np.ndarray):
        return [bytes(row) for row in arr]
    return [None if v is None else bytes(v) for v in arr]


def read_all(reader: LogReader, limit: int = 1 << 30, max_records: int = 1024) -> list:
    """Read from the reader's position until nothing more comes (or limit)."""
    out: list = []
    while len(out) < limit:
        got = reader.read(min(max_records, limit - len(out)))
        if not got:
            break
        out.extend(got)
    return out


# ---------------------------------------------------------------- the model

key_st = st.none() | st.binary(max_size=24)
value_st = st.one_of(st.none(), st.binary(max_size=64), st.binary(min_size=200, max_size=1500))
headers_st = st.lists(st.tuples(st.text(max_size=6), st.none() | st.binary(max_size=12)), max_size=3)
ts_step = st.integers(min_value=0, max_value=7)


class RingLogMachine(RuleBasedStateMachine):
    """One log per example; `recs` holds (offset, ts, key, value, headers)."""

    root: str = ""
    counter = 0

    def __init__(self) -> None:
        super().__init__()
        self.log: Optional[PartitionLog] = None
        self.recs: List[Tuple[int, int, Optional[bytes], Optional[bytes], list]] = []
        self.ts = 1_000_000
        self.tail: Optional[LogReader] = None  # a persistent reader that may fall behind

    @initialize(seg=st.sampled_from([4096, 8192]), slots=st.sampled_from([3, 4]),
                interval=st.sampled_from([64, 256, 1024, 4096]))
    def create(self, seg: int, slots: int, interval: int) -> None:
        RingLogMachine.counter += 1
        path = os.path.join(self.root, f"model-{RingLogMachine.counter}")
        self.log = PartitionLog.create(path, segment_bytes=seg, segment_count=slots,
                                       index_interval_bytes=interval, overflow="overwrite")
        self.cap, self.n = seg, slots
        # segment simulation: bases of every segment seq, byte pos and count in the active one
        self.bases = [0]
        self.seg_pos = 0
        self.seg_count = 0
        self.prepared = 1  # slot 1 is prepared (CLEAN) at creation
        self.tail = self.log.reader(0)

    def teardown(self) -> None:
        if self.log is not None:
            path = self.log.path
            self.tail = None
            self.log.close()
            for name in os.listdir(path):
                os.unlink(os.path.join(path, name))
            os.rmdir(path)

    # ---- simulation helpers
    @property
    def end(self) -> int:
        return len(self.recs)

    @property
    def start(self) -> int:
        s = len(self.bases) - 1
        oldest = max(0, self.prepared - self.n + 1)
        assert oldest <= s
        return self.bases[oldest]

    def _place(self, flen: int, count: int) -> None:
        assert flen <= self.cap
        if self.seg_pos + flen > self.cap:  # this claim seals the segment; the record goes on
            self.bases.append(self.bases[-1] + self.seg_count)
            self.seg_pos = 0
            self.seg_count = 0
            self.prepared = max(self.prepared, len(self.bases) - 1)
        self.seg_pos += flen
        self.seg_count += count

    def _expect(self, lo: int, hi: int) -> list:
        return [(o, t, k, v, h) for (o, t, k, v, h) in self.recs[lo:hi]]

    @staticmethod
    def _got(recs: list) -> list:
        return [(r.offset, r.timestamp_ms, r.key, r.value, list(r.headers)) for r in recs]

    # ---- appends
    @rule(key=key_st, value=value_st, headers=headers_st, step=ts_step)
    def append_one(self, key, value, headers, step) -> None:
        self.ts += step
        flen = frame_len_single(key, value, headers)
        off = self.log.append(value, key=key, headers=headers, timestamp_ms=self.ts)
        assert off == self.end
        self._place(flen, 1)
        self.recs.append((off, self.ts, key, value, [(k, v) for k, v in headers]))

    @rule(values=st.lists(st.none() | st.binary(max_size=80), min_size=1, max_size=24),
          with_keys=st.booleans(), step=ts_step, data=st.data())
    def append_list(self, values, with_keys, step, data) -> None:
        keys = data.draw(st.lists(key_st, min_size=len(values), max_size=len(values))) if with_keys else None
        self.ts += step
        flen = frame_len_batch(values, keys)
        base = self.log.append_batch(values, keys, timestamp_ms=self.ts)
        assert base == self.end
        self._place(flen, len(values))
        ks = keys if keys is not None else [None] * len(values)
        for i, (k, v) in enumerate(zip(ks, values)):
            self.recs.append((base + i, self.ts, k, v, []))

    @rule(rows=st.integers(min_value=1, max_value=40), width=st.integers(min_value=0, max_value=48),
          key_width=st.none() | st.integers(min_value=0, max_value=8), seed=st.integers(0, 2**32 - 1),
          step=ts_step)
    def append_numpy(self, rows, width, key_width, seed, step) -> None:
        rng = np.random.default_rng(seed)
        values = rng.integers(0, 256, size=(rows, width), dtype=np.uint8)
        keys = None if key_width is None else rng.integers(0, 256, size=(rows, key_width), dtype=np.uint8)
        self.ts += step
        flen = frame_len_batch(values, keys)
        base = self.log.append_batch(values, keys, timestamp_ms=self.ts)
        assert base == self.end
        self._place(flen, rows)
        ks = as_list(keys) if keys is not None else [None] * rows
        for i, (k, v) in enumerate(zip(ks, as_list(values))):
            self.recs.append((base + i, self.ts, k, v, []))

    @rule()
    def housekeep(self) -> None:
        assert self.log.housekeep() == 0  # nothing is ever blocked here
        self.prepared = max(self.prepared, len(self.bases))  # prepares (recycles for) seq s+1

    # ---- reads
    @rule(data=st.data(), max_records=st.integers(min_value=1, max_value=300),
          crc=st.booleans())
    def read_from(self, data, max_records, crc) -> None:
        off = data.draw(st.integers(min_value=0, max_value=self.end + 2))
        if off < self.start or off > self.end:
            with pytest.raises(OffsetOutOfRange) as ei:
                self.log.reader(off, check_crc=crc)
            assert self.log.name in str(ei.value) and str(off) in str(ei.value)
            return
        r = self.log.reader(off, check_crc=crc)
        assert r.position == off
        got = read_all(r, limit=max_records, max_records=max_records)
        assert self._got(got) == self._expect(off, min(self.end, off + max_records))

    @rule(data=st.data())
    def read_arrays_from(self, data) -> None:
        if self.end == self.start:
            return
        off = data.draw(st.integers(min_value=self.start, max_value=self.end - 1))
        r = self.log.reader(off)
        arr = r.read_arrays(64)
        assert arr is not None
        n = len(arr.offsets)
        exp = self._expect(off, off + n)
        assert 1 <= n <= 64
        assert arr.offsets.tolist() == [e[0] for e in exp]
        assert arr.timestamps.tolist() == [e[1] for e in exp]
        assert as_list(arr.values) == [e[3] for e in exp]
        assert as_list(arr.keys, n) == [e[2] for e in exp]

    @rule(data=st.data())
    def seek_by_offset(self, data) -> None:
        if self.end == self.start:
            return
        r = self.log.reader(self.start)
        off = data.draw(st.integers(min_value=self.start, max_value=self.end))
        r.seek(off)
        assert r.position == off
        got = read_all(r, limit=3)  # a read may return fewer than asked: read on
        assert self._got(got) == self._expect(off, min(off + 3, self.end))

    @rule(data=st.data())
    def seek_by_time(self, data) -> None:
        lo = self.recs[0][1] - 2 if self.recs else 0
        t = data.draw(st.integers(min_value=max(0, lo), max_value=self.ts + 3))
        r = self.log.reader(self.start)
        off = r.seek_to_time(t)
        live = self.recs[self.start:self.end]
        exp = next((o for (o, ts, *_rest) in live if ts >= t), self.end)
        assert off == exp, (t, off, exp)
        assert r.position == exp
        got = read_all(r, limit=2)
        assert self._got(got) == self._expect(exp, min(exp + 2, self.end))

    @rule(max_records=st.integers(min_value=1, max_value=200))
    def tail_read(self, max_records) -> None:
        pos = self.tail.position
        if pos < self.start:
            with pytest.raises(OffsetOutOfRange):
                self.tail.read(max_records)
            self.tail = self.log.reader(self.start)  # auto_offset_reset=earliest
            return
        got = read_all(self.tail, limit=max_records)
        assert self._got(got) == self._expect(pos, min(self.end, pos + max_records))

    # ---- invariants
    @invariant()
    def offsets_match_model(self) -> None:
        if self.log is None:
            return
        assert self.log.end_offset == self.end
        assert self.log.start_offset == self.start

    @precondition(lambda self: self.log is not None and self.start > 0)
    @invariant()
    def below_start_is_out_of_range(self) -> None:
        for off in {0, self.start - 1}:
            with pytest.raises(OffsetOutOfRange):
                self.log.reader(off)


@pytest.mark.timeout(240)
def test_log_matches_model_across_seals_and_ring_wraps(shm_dir):
    RingLogMachine.root = shm_dir
    run_state_machine_as_test(
        RingLogMachine,
        settings=settings(max_examples=150, stateful_step_count=80, deadline=None,
                          suppress_health_check=list(HealthCheck)))


def test_model_wraps_the_ring_in_a_typical_example(shm_dir):
    """The model's sizes are realistic: a run of appends of that shape wraps a
    3-slot ring of 4 KiB several times and start_offset follows the model."""
    m = RingLogMachine()
    RingLogMachine.root = shm_dir
    m.create(seg=4096, slots=3, interval=256)
    try:
        for i in range(400):
            m.append_one(b"k%d" % i, bytes(i % 200), [("h", b"x")] if i % 3 else [], i % 2)
            if i % 50 == 0:
                m.housekeep()
            m.offsets_match_model()
        assert len(m.bases) > 3 * 3, "the ring wrapped at least three times"
        assert m.start > 0
        m.below_start_is_out_of_range()
        m.tail_read(1000)
    finally:
        m.teardown()


# ------------------------------------------------------------ basic API

@pytest.fixture
def log(shm_dir):
    lg = PartitionLog.create(os.path.join(shm_dir, "orders-3"), segment_bytes=8192, segment_count=4,
                             index_interval_bytes=256)
    yield lg
    lg.close()


def test_append_read_round_trip(log):
    assert (log.start_offset, log.end_offset) == (0, 0)
    assert log.append(b"v0", key=b"k0", headers=[("a", b"1"), ("b", None)], timestamp_ms=5) == 0
    assert log.append(None, key=b"tombstone", timestamp_ms=6) == 1
    assert log.append(b"", timestamp_ms=7) == 2
    assert log.append_batch([b"x", None, b"zz"], [b"1", b"2", None], timestamp_ms=8) == 3
    assert log.append_batch(np.arange(6, dtype=np.uint8).reshape(2, 3), timestamp_ms=9) == 6
    assert (log.start_offset, log.end_offset) == (0, 8)
    got = [(r.offset, r.timestamp_ms, r.key, r.value, list(r.headers)) for r in log.reader(0).read(100)]
    assert got == [
        (0, 5, b"k0", b"v0", [("a", b"1"), ("b", None)]),
        (1, 6, b"tombstone", None, []),
        (2, 7, None, b"", []),
        (3, 8, b"1", b"x", []), (4, 8, b"2", None, []), (5, 8, None, b"zz", []),
        (6, 9, None, b"\x00\x01\x02", []), (7, 9, None, b"\x03\x04\x05", []),
    ]
    # a reader opened in the middle of a batch starts at its offset
    assert [r.offset for r in log.reader(4).read(10)] == [4, 5, 6, 7]
    assert log.reader(8).read(10) == []
    # read with CRC checks
    assert len(log.reader(0, check_crc=True).read(100)) == 8


def test_end_and_start_offsets_follow_appends_and_retention(shm_dir):
    lg = PartitionLog.create(os.path.join(shm_dir, "t-0"), segment_bytes=4096, segment_count=3)
    try:
        last_start = 0
        for i in range(2000):
            assert lg.append(b"%06d" % i, timestamp_ms=i) == i
            assert lg.end_offset == i + 1
            s = lg.start_offset
            assert last_start <= s <= i
            last_start = s
        assert last_start > 0, "a 3 x 4 KiB ring wraps within 2000 records"
        r = lg.reader()
        assert r.position == lg.start_offset
        recs = read_all(r)
        assert [x.offset for x in recs] == list(range(lg.start_offset, 2000))
        assert all(x.value == b"%06d" % x.offset for x in recs)
    finally:
        lg.close()


def test_value_larger_than_a_segment_raises_message_size_too_large(log):
    log.append(b"before")
    with pytest.raises(MessageSizeTooLarge) as ei:
        log.append(b"x" * 8192)
    assert "orders-3" in str(ei.value)
    with pytest.raises(MessageSizeTooLarge):
        log.append_batch([b"y" * 3000] * 3)
    with pytest.raises(MessageSizeTooLarge):
        log.append_batch(np.zeros((2, 5000), dtype=np.uint8))
    assert log.end_offset == 1
    assert [r.value for r in log.reader(0).read(10)] == [b"before"]


def test_record_that_exactly_fills_a_segment_is_accepted(log):
    # biggest value whose frame still fits in one 8 KiB segment
    v = max(n for n in range(7900, 8192) if frame_len_single(None, b"\0" * n, None) <= 8192)
    assert frame_len_single(None, b"\0" * v, None) == 8192
    log.append(b"a")
    big = os.urandom(v)
    assert log.append(big) == 1  # seals segment 0, fills segment 1 exactly
    assert log.append(b"b") == 2  # seals segment 1
    assert [r.value for r in log.reader(0, check_crc=True).read(10)] == [b"a", big, b"b"]
    with pytest.raises(MessageSizeTooLarge):
        log.append(b"\0" * (v + 8))


@pytest.mark.parametrize("call", [
    lambda lg: lg.append(123),
    lambda lg: lg.append("text"),
    lambda lg: lg.append(b"v", key=5),
    lambda lg: lg.append(b"v", timestamp_ms=-2),
    lambda lg: lg.append(b"v", timestamp_ms=1.5),
    lambda lg: lg.append(b"v", headers=[("k", 1)]),
    lambda lg: lg.append(b"v", headers=[(1, b"x")]),
    lambda lg: lg.append(b"v", headers=[("k", "str")]),
    lambda lg: lg.append(b"v", headers=["notapair"]),
    lambda lg: lg.append_batch([b"a", b"b"], keys=[b"k"]),
    lambda lg: lg.append_batch(np.zeros((3, 2), np.uint8), keys=np.zeros((2, 2), np.uint8)),
    lambda lg: lg.append_batch([]),
    lambda lg: lg.append_batch([b"a", 7]),
    lambda lg: lg.append_batch("abc"),
    lambda lg: lg.append_batch(np.zeros(4, np.uint8)),
    lambda lg: lg.append_batch(np.zeros((2, 2), np.int32)),
    lambda lg: lg.append_batch([b"a"], timestamp_ms=-1),
    lambda lg: lg.append_raw(b"\0" * 80),
    lambda lg: lg.append_raw(b"short"),
], ids=["int-value", "str-value", "int-key", "negative-ts", "float-ts", "int-header-value",
        "int-header-key", "str-header-value", "header-not-pair", "keys-count-mismatch",
        "numpy-keys-count-mismatch", "empty-batch", "int-in-batch", "str-batch", "1d-array",
        "int32-array", "batch-negative-ts", "raw-zeros", "raw-short"])
def test_wrong_types_raise_invalid_record_and_lose_nothing(log, call):
    log.append(b"kept", key=b"k")
    with pytest.raises(InvalidRecord):
        call(log)
    assert log.end_offset == 1
    log.append(b"after")
    assert [(r.offset, r.value) for r in log.reader(0, check_crc=True).read(10)] == [(0, b"kept"), (1, b"after")]


def _kafka_batch(records, base_offset=0):
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False, producer_id=-1,
                                  producer_epoch=-1, base_sequence=-1, batch_size=1 << 20)
    for i, (key, value, headers, ts) in enumerate(records):
        assert b.append(i, timestamp=ts, key=key, value=value, headers=headers) is not None
    data = bytearray(b.build())
    struct.pack_into(">q", data, 0, base_offset)
    return bytes(data)


def test_append_raw_kafka_built_batch_reads_back_equal(log):
    log.append(b"first")
    records = [(b"k1", b"v1", [("h", b"x")], 1000), (None, b"v2", [], 1001),
               (b"k3", None, [("a", None), ("b", b"")], 1005), (b"", b"x" * 500, [], 1010)]
    base = log.append_raw(_kafka_batch(records, base_offset=999))
    assert base == 1
    assert log.end_offset == 1 + len(records)
    got = log.reader(1, check_crc=True).read(10)
    assert [(r.offset, r.timestamp_ms, r.key, r.value, list(r.headers)) for r in got] == [
        (1 + i, ts, k, v, h) for i, (k, v, h, ts) in enumerate(records)]
    # corrupting the CRC is refused
    bad = bytearray(_kafka_batch(records))
    bad[-1] ^= 0xFF
    with pytest.raises(InvalidRecord):
        log.append_raw(bytes(bad))
    assert log.end_offset == 5


def _segment_batches(path: str, slot: int) -> List[bytes]:
    """The batch bytes of every complete data frame in a segment file."""
    with open(os.path.join(path, f"{slot}.log"), "rb") as f:
        seg = f.read()
    out, pos = [], 0
    while pos + 8 <= len(seg):
        (word,) = struct.unpack_from("<Q", seg, pos)
        length = ctypes.c_int32(word & 0xFFFFFFFF).value
        if length <= 0:
            break
        if word >> 62 == 0:  # data frame
            (blen,) = struct.unpack_from(">i", seg, pos + 8 + 8)
            out.append(seg[pos + 8:pos + 8 + 12 + blen])
        pos += length
    return out


def test_shmq_batches_decode_with_kafka_python(log):
    log.append(b"one", key=b"k", headers=[("h1", b"v1"), ("h2", None)], timestamp_ms=111)
    log.append_batch([b"a", None, b"ccc"], [None, b"kb", b"kc"], timestamp_ms=222)
    log.append_batch(np.full((3, 4), 7, np.uint8), timestamp_ms=333)
    batches = _segment_batches(log.path, 0)
    assert len(batches) == 3
    got = []
    for raw in batches:
        b = DefaultRecordBatch(raw)
        assert b.validate_crc()
        assert b.magic == 2
        got.extend((r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in b)
    assert got == [
        (0, 111, b"k", b"one", [("h1", b"v1"), ("h2", None)]),
        (1, 222, None, b"a", []), (2, 222, b"kb", None, []), (3, 222, b"kc", b"ccc", []),
        (4, 333, None, b"\x07" * 4, []), (5, 333, None, b"\x07" * 4, []), (6, 333, None, b"\x07" * 4, []),
    ]


@pytest.mark.parametrize("kwargs", [
    dict(segment_bytes=1024), dict(segment_bytes=(1 << 30) + 8), dict(segment_bytes=4100),
    dict(segment_bytes="4096"), dict(segment_bytes=True), dict(segment_count=1),
    dict(segment_count=1025), dict(segment_count=2.0), dict(index_interval_bytes=8),
    dict(segment_bytes=4096, index_interval_bytes=8192), dict(overflow="drop"), dict(overflow=None),
    dict(unblock_timeout_ms=0), dict(unblock_timeout_ms=-5),
])
def test_bad_log_config_raises_invalid_config(shm_dir, kwargs):
    with pytest.raises(InvalidConfig):
        LogConfig(**kwargs)
    path = os.path.join(shm_dir, "bad-0")
    with pytest.raises(InvalidConfig):
        PartitionLog.create(path, **kwargs)
    assert not os.path.exists(path) or os.listdir(path) == []


def _shm_free_bytes() -> int:
    st_ = os.statvfs("/dev/shm")
    return st_.f_bavail * st_.f_frsize


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def test_log_bigger_than_free_tmpfs_space_raises_storage_error_and_leaves_no_files(shm_dir):
    cfg = LogConfig(segment_count=1024, segment_bytes=1 << 30)
    free = _shm_free_bytes()
    if cfg.segment_count * cfg.segment_bytes <= free:
        pytest.skip("/dev/shm could hold a 1 TiB log")
    # Creating it fills the tmpfs up to ENOSPC before giving up. tmpfs pages
    # are RAM (and there may be no swap): only do that when the free space
    # is well below the memory available, or it would exhaust the host.
    if free > _mem_available_bytes() // 2:
        pytest.skip(f"filling /dev/shm ({free >> 20} MiB free) would exhaust RAM; "
                    "covered by the RLIMIT_FSIZE variant")
    path = os.path.join(shm_dir, "huge-0")
    with pytest.raises(KafkaStorageError) as ei:
        PartitionLog.create(path, cfg)
    assert "huge-0" in str(ei.value)
    assert os.listdir(path) == []
    assert _shm_free_bytes() >= free - (1 << 20)


@pytest.mark.timeout(60)
def test_log_that_cannot_be_allocated_raises_storage_error_and_leaves_no_files(shm_dir, reaper):
    """Allocation fails (the file size limit stands in for a full
    filesystem: posix_fallocate fails on the first segment file): a clear
    KafkaStorageError, and every file made so far is removed."""
    import multiprocessing as mp
    import resource
    import signal

    path = os.path.join(shm_dir, "big-0")
    q = mp.get_context("fork").SimpleQueue()

    def child() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        try:
            PartitionLog.create(path, segment_count=16, segment_bytes=16 << 20)
            q.put(("created", ""))
        except KafkaStorageError as e:
            q.put(("KafkaStorageError", str(e)))
        except BaseException as e:  # noqa: BLE001
            q.put((type(e).__name__, str(e)))

    p = reaper.start(child)
    p.join(30)
    assert p.exitcode == 0
    kind, msg = q.get()
    assert kind == "KafkaStorageError", msg
    assert "big-0" in msg
    assert os.listdir(path) == []


def test_create_over_an_existing_log_fails_and_keeps_its_files(shm_dir):
    path = os.path.join(shm_dir, "keep-0")
    lg = PartitionLog.create(path, segment_bytes=4096, segment_count=3)
    try:
        lg.append(b"precious", timestamp_ms=1)
        files = sorted(os.listdir(path))
        with pytest.raises(KafkaStorageError) as ei:
            PartitionLog.create(path, segment_bytes=4096, segment_count=3)
        assert "keep-0" in str(ei.value)
        assert sorted(os.listdir(path)) == files
        again = PartitionLog(path)
        try:
            assert [r.value for r in again.reader(0).read(5)] == [b"precious"]
        finally:
            again.close()
    finally:
        lg.close()
