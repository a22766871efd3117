"""Idempotent-producer state table (shmq/native/producer_state.h): dedup of
retried batches, sequence and epoch checks, concurrent producers in several
processes, rebuild from raw frames, and garbage in the shared file or the
frame stream raising errors instead of crashing."""
from __future__ import annotations

import os
import random
import struct
import time
from typing import List, Tuple

import pytest
from kafka.record.default_records import DefaultRecordBatch

from shmq.errors import (CorruptRecord, DuplicateSequenceNumber, KafkaStorageError, KafkaTimeoutError,
                         OutOfOrderSequenceNumber, ProducerFenced)
from shmq.native import ffi, lib
from shmq.ringlog.config import LogConfig
from shmq.ringlog.log import PartitionLog
from shmq.ringlog.producer_state import ProducerStateTable

CFG = LogConfig(segment_bytes=1 << 20, segment_count=4, index_interval_bytes=4096)
ENTRY = 64
HEADER = 64


@pytest.fixture
def log_and_table(shm_dir: str):
    path = os.path.join(shm_dir, "t-0")
    log = PartitionLog.create(path, CFG)
    table = ProducerStateTable.create(path, entries=64)
    try:
        yield log, table
    finally:
        table.close()
        log.close()


def vals(tag: str, n: int = 3) -> List[bytes]:
    return [f"{tag}-{i}".encode() for i in range(n)]


def segment_bytes(log: PartitionLog) -> bytes:
    """The committed frames of segment 0 (the tests stay within it)."""
    pos = int(lib.shmq_log_slot(log._h, 0).claim) & 0xFFFFFFFF
    return bytes(ffi.buffer(lib.shmq_log_segment(log._h, 0), pos))


def frames(stream: bytes) -> List[Tuple[int, bytes]]:
    out, pos = [], 0
    while pos < len(stream):
        (word,) = struct.unpack_from("<Q", stream, pos)
        flen = word & 0xFFFFFFFF
        assert flen >= 72 and flen % 8 == 0
        out.append((word >> 62, stream[pos + 8:pos + flen]))
        pos += flen
    return out


def batches(log: PartitionLog) -> List[DefaultRecordBatch]:
    result = []
    for kind, body in frames(segment_bytes(log)):
        assert kind == 0
        (blen,) = struct.unpack_from(">i", body, 8)
        b = DefaultRecordBatch(body[:blen + 12])
        assert b.validate_crc()
        result.append(b)
    return result


# ---------------------------------------------------------------- sequences

def test_retry_is_stored_once_and_sequences_are_checked(log_and_table) -> None:
    log, t = log_and_table
    assert t.lookup(7) is None
    off, dup = t.append(log, vals("a"), producer_id=7, epoch=0, base_sequence=0)
    assert (off, dup) == (0, False)
    assert t.append(log, vals("a"), producer_id=7, epoch=0, base_sequence=0) == (0, True)
    assert log.end_offset == 3
    assert t.append(log, vals("b", 2), [b"k1", b"k2"], producer_id=7, epoch=0, base_sequence=3) == (3, False)
    assert t.append(log, vals("b", 2), producer_id=7, epoch=0, base_sequence=3) == (3, True)
    assert t.lookup(7) == (0, 3, 4, 3)
    with pytest.raises(OutOfOrderSequenceNumber):
        t.append(log, vals("gap"), producer_id=7, epoch=0, base_sequence=6)
    with pytest.raises(DuplicateSequenceNumber):
        t.append(log, vals("old"), producer_id=7, epoch=0, base_sequence=0)
    with pytest.raises(DuplicateSequenceNumber):  # same base, other count: not the stored batch
        t.append(log, vals("b", 1), producer_id=7, epoch=0, base_sequence=3)
    assert log.end_offset == 5
    assert t.lookup(7) == (0, 3, 4, 3)

    # a higher epoch must start at 0, then takes over; the old epoch is fenced
    with pytest.raises(OutOfOrderSequenceNumber):
        t.append(log, vals("e1"), producer_id=7, epoch=1, base_sequence=5)
    assert t.append(log, vals("e1"), producer_id=7, epoch=1, base_sequence=0) == (5, False)
    with pytest.raises(ProducerFenced):
        t.append(log, vals("zombie"), producer_id=7, epoch=0, base_sequence=5)
    assert t.lookup(7) == (1, 0, 2, 5)
    assert log.end_offset == 8

    # an unknown producer id is accepted at any sequence; id 0 is a valid id
    assert t.append(log, vals("u", 1), producer_id=0, epoch=3, base_sequence=41)[1] is False
    assert t.lookup(0) == (3, 41, 41, 8)

    got = [(b.producer_id, b.producer_epoch, b.base_sequence, b.base_offset, len(list(b))) for b in batches(log)]
    assert got == [(7, 0, 0, 0, 3), (7, 0, 3, 3, 2), (7, 1, 0, 5, 3), (0, 3, 41, 8, 1)]
    keys = [r.key for r in batches(log)[1]]
    assert keys == [b"k1", b"k2"]


def test_sequence_wraps_like_kafka(log_and_table) -> None:
    log, t = log_and_table
    top = 2**31 - 1
    t.append(log, vals("w", 2), producer_id=3, epoch=0, base_sequence=top - 1)
    assert t.lookup(3) == (0, top - 1, top, 0)
    t.append(log, vals("x", 2), producer_id=3, epoch=0, base_sequence=0)
    assert t.lookup(3) == (0, 0, 1, 2)
    t.append(log, vals("y", 3), producer_id=3, epoch=0, base_sequence=2)
    t.append(log, vals("z", 1), producer_id=4, epoch=0, base_sequence=top - 1)
    assert t.lookup(4) == (0, top - 1, top - 1, 7)
    with pytest.raises(DuplicateSequenceNumber):  # plain comparison, as the spec: 1 <= last
        t.append(log, vals("z", 2), producer_id=4, epoch=0, base_sequence=1)
    t.append(log, vals("z", 2), producer_id=4, epoch=0, base_sequence=top)
    assert t.lookup(4) == (0, top, 0, 8)


def test_fence_raises_the_epoch(log_and_table) -> None:
    log, t = log_and_table
    t.append(log, vals("a"), producer_id=9, epoch=2, base_sequence=0)
    t.fence(9, 3)
    assert t.lookup(9) == (3, -1, -1, -1)
    with pytest.raises(ProducerFenced):
        t.append(log, vals("b"), producer_id=9, epoch=2, base_sequence=3)
    with pytest.raises(OutOfOrderSequenceNumber):
        t.append(log, vals("b"), producer_id=9, epoch=3, base_sequence=3)
    assert t.append(log, vals("b"), producer_id=9, epoch=3, base_sequence=0) == (3, False)
    with pytest.raises(ProducerFenced):
        t.fence(9, 1)
    t.fence(10, 0)  # unknown id: its first batch must then have sequence 0
    with pytest.raises(OutOfOrderSequenceNumber):
        t.append(log, vals("c"), producer_id=10, epoch=0, base_sequence=5)


def test_errors_leave_the_entry_unchanged(log_and_table) -> None:
    log, t = log_and_table
    t.append(log, vals("a"), producer_id=1, epoch=0, base_sequence=0)
    log.mark_deleted()
    with pytest.raises(Exception) as e:
        t.append(log, vals("b"), producer_id=1, epoch=0, base_sequence=3)
    assert "idempotent append" in str(e.value) and "t-0" in str(e.value)
    assert t.lookup(1) == (0, 0, 2, 0)
    with pytest.raises(Exception):
        t.append(log, [], producer_id=1, epoch=0, base_sequence=3)
    for bad in ({"producer_id": -1}, {"epoch": -1}, {"base_sequence": -1}):
        kw = {"producer_id": 1, "epoch": 0, "base_sequence": 3, **bad}
        with pytest.raises(Exception):
            t.append(log, vals("c"), **kw)
    assert t.lookup(1) == (0, 0, 2, 0)


def test_table_full_and_reopen(shm_dir: str) -> None:
    log = PartitionLog.create(os.path.join(shm_dir, "f-0"), CFG)
    t = ProducerStateTable.create(log.path, entries=4)
    for pid in range(4):
        t.append(log, [b"x"], producer_id=pid * 1000, epoch=0, base_sequence=0)
    with pytest.raises(KafkaStorageError):
        t.append(log, [b"x"], producer_id=99, epoch=0, base_sequence=0)
    with pytest.raises(KafkaStorageError):  # exists already
        ProducerStateTable.create(log.path)
    other = ProducerStateTable(log.path)
    assert other.entries == 4
    assert [other.lookup(pid * 1000) for pid in range(4)] == [(0, 0, 0, pid) for pid in range(4)]
    assert other.lookup(99) is None
    other.close()
    t.close()
    log.close()


# ------------------------------------------------------------- processes

def _producer(path: str, pid: int, n: int, retry: bool, errors_ok: bool, filler: int, start: float) -> None:
    log = PartitionLog(path)
    t = ProducerStateTable(path)
    rng = random.Random(pid)
    pad = b"." * filler
    time.sleep(max(0.0, start - time.time()))
    for seq in range(n):
        for attempt in range(2 if retry and rng.random() < 0.5 else 1):
            try:
                t.append(log, [f"{pid}:{seq}".encode() + pad], producer_id=pid, epoch=0, base_sequence=seq)
            except DuplicateSequenceNumber:
                if not errors_ok:
                    raise
    os._exit(0)


def _run_producers(path: str, reaper, specs) -> None:
    start = time.time() + 0.3  # every process starts appending at once
    procs = [reaper.start(_producer, path, *spec, start) for spec in specs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def _values_by_producer(log: PartitionLog):
    seen = {}
    for b in batches(log):
        for r in b:
            key = r.value.split(b".")[0]
            assert key not in seen, key  # stored once
            seen[key] = (b.producer_id, b.base_sequence, r.offset)
    return seen


def test_processes_append_and_dedup_concurrently(shm_dir: str, reaper) -> None:
    path = os.path.join(shm_dir, "p-0")
    log = PartitionLog.create(path, CFG)
    t = ProducerStateTable.create(path)
    n = 2000
    # two producer ids, each retrying half its batches, appending at once
    _run_producers(path, reaper, [(11, n, True, False, 0), (12, n, True, False, 0)])
    seen = _values_by_producer(log)
    for pid in (11, 12):
        assert [seen[f"{pid}:{s}".encode()][1] for s in range(n)] == list(range(n))
        assert t.lookup(pid)[:3] == (0, n - 1, n - 1)
    assert len(seen) == 2 * n
    t.close()
    log.close()


def test_processes_racing_on_one_producer_id(shm_dir: str, reaper) -> None:
    # two processes sending the same batches under one id: only the entry
    # lock keeps check + append + update atomic (large batches widen the window)
    path = os.path.join(shm_dir, "r-0")
    log = PartitionLog.create(path, LogConfig(segment_bytes=32 << 20, segment_count=2))
    t = ProducerStateTable.create(path)
    n = 1000
    _run_producers(path, reaper, [(13, n, False, True, 16 << 10), (13, n, False, True, 16 << 10)])
    seen = _values_by_producer(log)
    assert [seen[f"13:{s}".encode()][1] for s in range(n)] == list(range(n))
    assert len(seen) == n
    assert t.lookup(13)[:3] == (0, n - 1, n - 1)
    t.close()
    log.close()


def test_dead_lock_holder_is_taken_over(log_and_table) -> None:
    log, t = log_and_table
    t.append(log, vals("a"), producer_id=5, epoch=0, base_sequence=0)
    child = os.fork()
    if child == 0:
        os._exit(0)
    os.waitpid(child, 0)
    entry = _entry_of(log.path, 5)
    with open(os.path.join(log.path, "producer.state"), "r+b") as f:
        f.seek(entry + 8)
        f.write(struct.pack("<QQ", child, 7))  # lock held by a dead pid, seqlock odd
    # the taker marks the last batch unknown: the retry is no longer recognised
    with pytest.raises(DuplicateSequenceNumber):
        t.append(log, vals("a"), producer_id=5, epoch=0, base_sequence=0)
    assert t.lookup(5) == (0, -1, 2, -1)
    assert t.append(log, vals("b"), producer_id=5, epoch=0, base_sequence=3) == (3, False)
    # a live holder (this process) is waited for, up to the timeout
    with open(os.path.join(log.path, "producer.state"), "r+b") as f:
        f.seek(entry + 8)
        f.write(struct.pack("<Q", os.getpid()))
    with pytest.raises(KafkaTimeoutError):
        t.append(log, vals("c"), producer_id=5, epoch=0, base_sequence=6, timeout=0.05)
    assert log.end_offset == 6


def _entry_of(path: str, producer_id: int) -> int:
    data = open(os.path.join(path, "producer.state"), "rb").read()
    for pos in range(HEADER, len(data), ENTRY):
        if struct.unpack_from("<Q", data, pos)[0] == producer_id + 1:
            return pos
    raise AssertionError("no entry")


# ------------------------------------------------------------- observe

def test_observe_rebuilds_the_table_from_the_log(log_and_table, shm_dir: str) -> None:
    log, t = log_and_table
    t.append(log, vals("a"), producer_id=1, epoch=0, base_sequence=0)
    t.append(log, vals("b", 2), producer_id=2, epoch=4, base_sequence=10)
    log.append(b"plain")  # producerId -1: not recorded
    t.append(log, vals("c"), producer_id=1, epoch=0, base_sequence=3)
    t.append(log, vals("d", 1), producer_id=2, epoch=5, base_sequence=0)
    stream = segment_bytes(log)
    other_dir = os.path.join(shm_dir, "follower")
    os.makedirs(other_dir)
    with ProducerStateTable.create(other_dir, entries=16) as f:
        f.observe_frames(stream + b"\0" * 64, len(stream))
        for pid in (1, 2):
            assert f.lookup(pid) == t.lookup(pid)
        assert f.lookup(1) == (0, 3, 5, 6)
        assert f.lookup(2) == (5, 0, 0, 9)
        f.clear()
        assert f.lookup(1) is None and f.lookup(2) is None
        f.observe_frames(stream)
        assert f.lookup(2) == (5, 0, 0, 9)


def _frame(batch: bytes, kind: int = 0, rel: int = 0) -> bytes:
    flen = (len(batch) + 8 + 7) & ~7
    return struct.pack("<Q", flen | (rel << 32) | (kind << 62)) + batch + b"\0" * (flen - 8 - len(batch))


def _encode(values: List[bytes], base_offset: int, pid: int, epoch: int, seq: int) -> bytes:
    recs = ffi.new("shmq_records *")
    joined = b"".join(values)
    offs = ffi.new("int64_t[]", [0] + [sum(map(len, values[:i + 1])) for i in range(len(values))])
    buf = ffi.from_buffer("uint8_t[]", joined)
    recs.count, recs.values, recs.value_offs, recs.base_timestamp = len(values), buf, offs, 1000
    meta = ffi.new("shmq_batch_meta *", (pid, epoch, seq, 0, -1))
    size = lib.shmq_batch_size(recs)
    dst = ffi.new("uint8_t[]", size)
    assert lib.shmq_batch_encode(dst, size, recs, base_offset, meta) == size
    return bytes(ffi.buffer(dst, size))


def test_observe_synthetic_stream_and_garbage(log_and_table) -> None:
    log, t = log_and_table
    pad = _frame(b"\xee" * 100, kind=1)
    stream = (_frame(_encode([b"a", b"b"], 100, 21, 1, 7)) + pad +
              _frame(_encode([b"c"], 102, 22, 0, 0), rel=2) + _frame(_encode([b"d"], 103, -1, -1, -1)) +
              _frame(_encode([b"e", b"f", b"g"], 104, 21, 1, 9)))
    t.observe_frames(stream)
    assert t.lookup(21) == (1, 9, 11, 104)
    assert t.lookup(22) == (0, 0, 0, 102)
    assert t.lookup(-1) is None
    # the table then drives appends: 21's next batch is 12
    with pytest.raises(OutOfOrderSequenceNumber):
        t.append(log, [b"x"], producer_id=21, epoch=1, base_sequence=13)
    assert t.append(log, [b"e", b"f", b"g"], producer_id=21, epoch=1, base_sequence=9) == (104, True)

    good = _frame(_encode([b"z"], 200, 30, 0, 0))
    bad_streams = [
        good[:-8],                                             # truncated frame
        good + b"\0" * 4,                                      # trailing partial header
        struct.pack("<Q", 64) + b"\0" * 56,                    # frame shorter than 72
        struct.pack("<Q", 76) + b"\0" * 72,                    # not a multiple of 8
        struct.pack("<Q", (3 << 62) | 72) + b"\0" * 64,        # unknown type
        struct.pack("<Q", 0xFFFFFFF8) + b"\0" * 64,            # negative length (claimed)
        _frame(b"\0" * 80),                                    # data frame without a batch
        good[:8] + good[8:24] + b"\x01" + good[25:],           # magic byte broken
        _frame(_encode([b"z"], 200, 30, 0, 0) + b"\0" * 16),   # batch shorter than its frame
    ]
    for bad in bad_streams:
        with pytest.raises(CorruptRecord):
            t.observe_frames(good + bad)
        assert t.lookup(30) is None  # validated before anything is recorded
    rng = random.Random(1)
    for _ in range(2000):
        junk = bytearray(stream)
        for _ in range(rng.randrange(1, 6)):
            junk[rng.randrange(len(junk))] = rng.randrange(256)
        cut = rng.randrange(len(junk) + 1)
        try:
            t.observe_frames(bytes(junk), cut)
        except CorruptRecord:
            pass
    t.observe_frames(b"")


# ------------------------------------------------------------- garbage file

def test_garbage_table_file_is_refused(shm_dir: str) -> None:
    d = os.path.join(shm_dir, "g")
    os.makedirs(d)
    f = os.path.join(d, "producer.state")
    with pytest.raises(KafkaStorageError):
        ProducerStateTable(d)  # missing
    for content in (os.urandom(64 + 64 * 8), b"x" * 10, b""):
        with open(f, "wb") as fh:
            fh.write(content)
        with pytest.raises(KafkaStorageError):
            ProducerStateTable(d)
    os.unlink(f)
    ProducerStateTable.create(d, entries=8).close()
    with open(f, "ab") as fh:  # size no longer matches the entry count
        fh.write(b"\0" * 64)
    with pytest.raises(KafkaStorageError):
        ProducerStateTable(d)
    os.unlink(f)
    with pytest.raises(Exception):
        ProducerStateTable.create(d, entries=2**24)


def test_scribbled_entries_raise_or_work_never_crash(log_and_table) -> None:
    log, t = log_and_table
    path = os.path.join(log.path, "producer.state")
    rng = random.Random(2)
    for pid in range(20):
        t.append(log, [b"v"], producer_id=pid, epoch=0, base_sequence=0)
    for round_ in range(30):
        with open(path, "r+b") as fh:
            for _ in range(40):
                at = rng.randrange(64 * 64 // 8)
                fh.seek(HEADER + at * 8)
                word = rng.choice([rng.getrandbits(64), rng.getrandbits(8), 2**63 | rng.getrandbits(40), 0])
                if at % 8 == 1 and word < 2**22:  # a lock word naming a live pid would only cost waiting
                    word = 0
                fh.write(struct.pack("<Q", word))
            if round_ % 3 == 0:  # the header too: the open table keeps its own entry count
                fh.seek(0)
                fh.write(os.urandom(64))
        for pid in range(40):
            t.lookup(pid)
            try:
                t.append(log, [b"w"], producer_id=pid, epoch=rng.randrange(3), base_sequence=rng.randrange(3),
                         timeout=0.01)
            except (CorruptRecord, ProducerFenced, DuplicateSequenceNumber, OutOfOrderSequenceNumber,
                    KafkaStorageError, KafkaTimeoutError):
                pass
        try:
            t.observe_frames(segment_bytes(log))
        except (CorruptRecord, KafkaStorageError):  # scribbled entries can fill the table
            pass
    with pytest.raises(KafkaStorageError):
        ProducerStateTable(log.path)


def test_a_lock_held_by_a_dead_forked_child_is_taken_over() -> None:
    """Lock words hold the holder's pid, cached per process: a child of fork
    must store its own pid (not its parent's cached one), so that when it
    dies holding the lock the parent takes it over instead of waiting on
    itself."""
    import mmap as _mmap
    mem = _mmap.mmap(-1, 4096)                       # MAP_SHARED | MAP_ANONYMOUS: the child's store is seen here
    word = ffi.cast("uint64_t *", ffi.from_buffer(mem))
    took = ffi.new("int *")
    assert lib.shmq_pid_lock(word, lib.shmq_deadline(1_000_000_000), took) == 0 and word[0] == os.getpid()
    lib.shmq_pid_unlock(word)
    pid = os.fork()
    if pid == 0:                                      # the child: lock and die holding it
        rc = lib.shmq_pid_lock(word, lib.shmq_deadline(1_000_000_000), took)
        os._exit(0 if rc == 0 and word[0] == os.getpid() else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, "the child locked with its own pid"
    assert word[0] == pid
    assert lib.shmq_pid_lock(word, lib.shmq_deadline(2_000_000_000), took) == 0 and took[0] == 1
    assert word[0] == os.getpid()
    lib.shmq_pid_unlock(word)
    del word
    mem.close()
