"""Idempotent raw append (the Kafka listener's Produce path): a client's
RecordBatch stored as it is through the producer-state table, with Kafka's
dedup and sequence checks, and readable by native consumers."""
from __future__ import annotations

import os

import pytest
from kafka.record.default_records import DefaultRecordBatchBuilder

from shmq.errors import CorruptRecord, InvalidRecord, OutOfOrderSequenceNumber, ProducerFenced
from shmq.ringlog.config import LogConfig
from shmq.ringlog.log import PartitionLog
from shmq.ringlog.producer_state import ProducerStateTable


def _batch(pid: int, epoch: int, seq: int, n: int, tag: bytes = b"v") -> bytes:
    b = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=0, producer_id=pid,
                                  producer_epoch=epoch, base_sequence=seq, batch_size=1 << 20)
    for i in range(n):
        b.append(i, timestamp=1_700_000_000_000 + i, key=b"k%d" % i, value=tag + b"%d" % i, headers=[("h", b"x")])
    return bytes(b.build())


@pytest.fixture
def log_and_table(shm_dir: str):
    path = os.path.join(shm_dir, "raw-0")
    plog = PartitionLog.create(path, LogConfig(segment_bytes=1 << 20, segment_count=4))
    table = ProducerStateTable.create(path)
    try:
        yield plog, table
    finally:
        table.close()
        plog.close()


def test_raw_batches_are_deduplicated_and_sequenced(log_and_table) -> None:
    plog, table = log_and_table
    first = _batch(7, 0, 0, 3)
    assert table.append_raw(plog, first) == (0, False)
    assert table.append_raw(plog, first) == (0, True)          # a retry: stored once
    assert table.append_raw(plog, _batch(7, 0, 3, 2)) == (3, False)
    with pytest.raises(OutOfOrderSequenceNumber):
        table.append_raw(plog, _batch(7, 0, 9, 1))              # a gap
    assert table.append_raw(plog, _batch(7, 1, 0, 1)) == (5, False)   # a new epoch starts at 0
    with pytest.raises(ProducerFenced):
        table.append_raw(plog, _batch(7, 0, 5, 1))
    assert table.lookup(7) == (1, 0, 0, 5)
    recs = plog.reader(0).read(100)
    assert [r.offset for r in recs] == list(range(6))
    assert [r.key for r in recs] == [b"k0", b"k1", b"k2", b"k0", b"k1", b"k0"]
    assert recs[0].headers == [("h", b"x")] and recs[0].timestamp_ms == 1_700_000_000_000


def test_raw_append_refuses_bad_batches(log_and_table) -> None:
    plog, table = log_and_table
    good = bytearray(_batch(8, 0, 0, 2))
    bad_crc = bytes(good[:-1]) + bytes([good[-1] ^ 0xFF])
    with pytest.raises((CorruptRecord, InvalidRecord)):
        table.append_raw(plog, bad_crc)
    with pytest.raises(InvalidRecord):
        table.append_raw(plog, bytes(good[:30]))
    with pytest.raises(InvalidRecord):
        table.append_raw(plog, _batch(-1, -1, -1, 1))            # no producer id: not idempotent
    assert plog.end_offset == 0
    assert table.append_raw(plog, bytes(good)) == (0, False)


@pytest.mark.parametrize("codec", [1, 2, 3, 4])
def test_compressed_batches_are_stored_uncompressed(log_and_table, codec: int) -> None:
    pytest.importorskip("cramjam")
    from shmq.kafka.compression import decompress_batch
    needs = {2: "snappy", 3: "lz4", 4: "zstandard"}
    if codec in needs:
        pytest.importorskip(needs[codec], reason="kafka-python builds this codec's batches with it")
    plog, table = log_and_table
    b = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=0, producer_id=9,
                                  producer_epoch=0, base_sequence=0, batch_size=1 << 20)
    for i in range(50):
        b.append(i, timestamp=1_700_000_000_000 + i, key=b"k%d" % i, value=b"value-%d" % i * 5, headers=[("h", b"x")])
    compressed = bytes(b.build())
    plain = decompress_batch(memoryview(compressed))
    assert table.append_raw(plog, plain) == (0, False)
    assert table.append_raw(plog, decompress_batch(memoryview(compressed))) == (0, True)   # a retry, recognised
    recs = plog.reader(0).read(100)
    assert [(r.key, r.value) for r in recs] == [(b"k%d" % i, b"value-%d" % i * 5) for i in range(50)]
    damaged = bytearray(compressed)
    damaged[-3] ^= 0x55
    with pytest.raises(InvalidRecord):
        decompress_batch(memoryview(bytes(damaged)))
