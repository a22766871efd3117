"""Transactions at the log level: control batches (Kafka's marker format,
decoded by kafka-python), transactional batches through the producer-state
table, no read path returning a control batch as records, and the
transaction index (LSO and aborted runs) with its reader-side filter."""
from __future__ import annotations

import os
import struct
from typing import List, Tuple

import numpy as np
import pytest
from kafka.record.default_records import DefaultRecordBatch

from shmq.errors import CorruptRecord, ProducerFenced
from shmq.native import ffi, lib
from shmq.ringlog.config import LogConfig
from shmq.ringlog.log import PartitionLog
from shmq.ringlog.producer_state import ProducerStateTable
from shmq.ringlog.txn import (ABORT, ATTR_TRANSACTIONAL, COMMIT, AbortedFilter, TxnIndex, aborted_runs,
                              control_batch, parse_control_record)

CFG = LogConfig(segment_bytes=1 << 20, segment_count=4, index_interval_bytes=4096)


@pytest.fixture
def plog(shm_dir: str):
    log = PartitionLog.create(os.path.join(shm_dir, "t-0"), CFG)
    try:
        yield log
    finally:
        log.close()


def raw_batches(log: PartitionLog) -> List[bytes]:
    """The batches of segment 0, in order (the tests stay within it)."""
    pos = int(lib.shmq_log_slot(log._h, 0).claim) & 0xFFFFFFFF
    data = bytes(ffi.buffer(lib.shmq_log_segment(log._h, 0), pos))
    out, at = [], 0
    while at < len(data):
        (word,) = struct.unpack_from("<Q", data, at)
        flen = word & 0xFFFFFFFF
        if word >> 62 == 0:
            (blen,) = struct.unpack_from(">i", data, at + 16)
            out.append(data[at + 8:at + 8 + blen + 12])
        at += flen
    return out


@pytest.mark.parametrize("marker", [ABORT, COMMIT])
def test_kafka_python_decodes_markers_as_control_records(plog: PartitionLog, marker: int) -> None:
    plog.append(b"before")
    off = plog.append_raw(control_batch(marker, producer_id=4242, producer_epoch=3, coordinator_epoch=9))
    assert off == 1
    batch_bytes = raw_batches(plog)[1]
    batch = DefaultRecordBatch(batch_bytes)
    assert batch.validate_crc()
    assert batch.is_control_batch and batch.is_transactional
    assert (batch.producer_id, batch.producer_epoch, batch.base_sequence) == (4242, 3, -1)
    recs = list(batch)
    assert len(recs) == 1 and type(recs[0]).__name__ == "ControlRecord"
    assert recs[0].offset == 1
    assert recs[0].version == 0 and recs[0].type == marker
    assert recs[0].abort == (marker == ABORT) and recs[0].commit == (marker == COMMIT)
    assert parse_control_record(batch_bytes) == (marker, 9)


def test_no_read_path_returns_control_batches(plog: PartitionLog) -> None:
    plog.append(b"a")
    plog.append_raw(control_batch(COMMIT, 1, 0))
    plog.append_raw(control_batch(ABORT, 2, 0))
    plog.append(b"b")
    plog.append_raw(control_batch(COMMIT, 1, 0))       # the log ends with a marker
    assert [(r.offset, r.value) for r in plog.reader(0).read(100)] == [(0, b"a"), (3, b"b")]
    one = plog.reader(0)
    assert [r.offset for r in one.read(1)] == [0]
    assert [r.offset for r in one.read(1)] == [3]       # markers passed without an empty read
    assert one.read(1) == [] and one.position == 5
    arr = plog.reader(1).read_arrays()
    assert arr is not None and arr.offsets.tolist() == [3]
    assert plog.reader(4).read(10, timeout=0.01) == []
    # A parser that is not told what a control batch is would see its record:
    # shmq's decode returns none.
    views = ffi.new("shmq_record_view[]", 4)
    ctl = raw_batches(plog)[1]
    assert lib.shmq_batch_decode(ctl, len(ctl), 0, views, 4) == 0


def test_transactional_batches_carry_producer_and_attribute(plog: PartitionLog) -> None:
    table = ProducerStateTable.create(plog.path, entries=64)
    try:
        off, dup = table.append(plog, [b"x", b"y"], producer_id=77, epoch=2, base_sequence=0,
                                attributes=ATTR_TRANSACTIONAL)
        off1, _ = table.append1(plog, b"z", None, None, 5, 77, 2, 2, attributes=ATTR_TRANSACTIONAL)
        assert (off, dup, off1) == (0, False, 2)
        for b in raw_batches(plog):
            batch = DefaultRecordBatch(b)
            assert batch.is_transactional and not batch.is_control_batch
            assert (batch.producer_id, batch.producer_epoch) == (77, 2)
        assert [DefaultRecordBatch(b).base_sequence for b in raw_batches(plog)] == [0, 2]
        table.fence(77, 3)
        with pytest.raises(ProducerFenced):
            table.append(plog, [b"zombie"], producer_id=77, epoch=2, base_sequence=3,
                         attributes=ATTR_TRANSACTIONAL)
        with pytest.raises(Exception, match="idempotent append"):
            table.append(plog, [b"bad"], producer_id=77, epoch=3, base_sequence=0, attributes=ATTR_TRANSACTIONAL | 32)
    finally:
        table.close()


def test_aborted_runs_from_frames(plog: PartitionLog) -> None:
    table = ProducerStateTable.create(plog.path, entries=64)
    try:
        t = ATTR_TRANSACTIONAL
        table.append(plog, [b"a", b"b"], producer_id=5, epoch=0, base_sequence=0, attributes=t)   # 0-1
        table.append(plog, [b"c"], producer_id=5, epoch=0, base_sequence=2, attributes=t)         # 2
        plog.append(b"other")                                                                     # 3
        table.append(plog, [b"d"], producer_id=6, epoch=0, base_sequence=0, attributes=t)         # 4
        table.append(plog, [b"e", b"f", b"g"], producer_id=5, epoch=0, base_sequence=3, attributes=t)  # 5-7
        plog.append_raw(control_batch(ABORT, 5, 0))                                               # 8
        reader = plog.reader(0)
        buf = bytearray(1 << 16)
        n = reader.read_frames(buf)
        assert aborted_runs(buf, n, 5) == [(0, 2), (5, 7)]
        assert aborted_runs(buf, n, 6) == [(4, 4)]
        assert aborted_runs(buf, n, 99) == []
        with pytest.raises(CorruptRecord):
            aborted_runs(b"\x03" + bytes(15), 16, 5)
    finally:
        table.close()


def test_txn_index_publishes_lso_and_aborted_runs(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "t-0.txn")
    assert TxnIndex.open(path) is None
    w = TxnIndex.open(path, create=True)
    assert w is not None and w.lso == -1 and w.count == 0
    r = TxnIndex.open(path)
    assert r is not None
    f = AbortedFilter(r)
    w.open_row(7, 1, 10, 1000)
    w.open_row(8, 0, 15, 1000)
    assert r.lso == 10 and w.row(7) == (1, 10, 1000)
    w.open_row(7, 1, 30, 2000)                                    # open already: its first offset stays
    assert r.lso == 10
    with pytest.raises(ProducerFenced):
        w.open_row(7, 0, 40, 3000)                                # an older epoch
    assert w.close_row(7, 1) and r.lso == 15
    assert not w.close_row(7, 1)
    assert not w.close_row(8, -1) and r.lso == 15                 # a newer epoch than the one closed
    assert w.close_row(8, 5) and r.lso == -1
    assert w.open_row(7, 1, 10, 1000) and r.lso == 10
    assert not w.open_row(7, 2, 50, 4000)                          # an older epoch's transaction is open
    w.fence_row(7, 3)                                             # open: it stays for the coordinator
    assert w.row(7) == (1, 10, 1000)
    assert w.close_row(7, 2) and r.lso == -1
    w.fence_row(7, 3)
    with pytest.raises(ProducerFenced):
        w.open_row(7, 2, 60, 5000)                                # fenced: a zombie cannot open it
    w.fence_row(9, 1)                                             # claims a row for an id never seen
    with pytest.raises(ProducerFenced):
        w.open_row(9, 0, 60, 5000)
    assert w.open_row(7, 3, 10, 1000)
    assert r.lso == 10
    assert w.add_aborted(5, [(10, 12), (20, 20)], marker_offset=21) == 2
    assert w.add_aborted(5, [(10, 12)]) == 0                      # a successor redoing the abort
    f.refresh()
    offs = np.arange(8, 23, dtype=np.int64)
    keep = f.keep_mask(offs)
    assert keep is not None and offs[keep].tolist() == [8, 9, 13, 14, 15, 16, 17, 18, 19, 21, 22]
    assert f.keep_mask(np.arange(30, 40, dtype=np.int64)) is None
    # Growth past the first capacity: readers re-map.
    runs: List[Tuple[int, int]] = [(100 + 2 * i, 100 + 2 * i) for i in range(200)]
    assert w.add_aborted(6, runs) == 200
    f.refresh()
    offs = np.arange(100, 500, dtype=np.int64)
    keep = f.keep_mask(offs)
    assert keep is not None and int(keep.sum()) == 200
    assert r.entries().shape == (202, 4)
    w.close()
    r.close()
    with open(path, "r+b") as fh:
        fh.write(b"garbage!")
    with pytest.raises(CorruptRecord):
        TxnIndex.open(path)


def test_dump_log_shows_markers_and_producer_ids(plog: PartitionLog) -> None:
    import io

    from shmq.cli.dump_log import dump
    table = ProducerStateTable.create(plog.path, entries=64)
    try:
        table.append(plog, [b"v"], producer_id=31, epoch=4, base_sequence=0, attributes=ATTR_TRANSACTIONAL)
        plog.append_raw(control_batch(COMMIT, 31, 4, coordinator_epoch=2))
    finally:
        table.close()
    out = io.StringIO()
    dump(plog.path, records=True, out=out)
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("position")]
    assert "producerId: 31" in lines[0] and "isTransactional: True" in lines[0] and "isControl: False" in lines[0]
    assert "isControl: True" in lines[1] and "endTxnMarker: COMMIT" in lines[1] and "coordinatorEpoch: 2" in lines[1]


def test_txn_index_rows_are_reused_by_new_producers_once_closed(shm_dir: str) -> None:
    """64 rows: a new producer id takes a free row, else the closed row used
    longest ago; with every row open it is refused with a clear error."""
    from shmq.errors import ShmqError
    from shmq.ringlog.txn import ROWS
    w = TxnIndex.open(os.path.join(shm_dir, "rows-0.txn"), create=True)
    assert w is not None
    for pid in range(ROWS):
        assert w.open_row(100 + pid, 0, pid, 1000 + pid)
    assert w.lso == 0
    with pytest.raises(ShmqError, match="open the transaction of producer 999"):
        w.open_row(999, 0, 500, 5000)                         # every row open
    for pid in range(ROWS):
        assert w.close_row(100 + pid, 0)
    assert w.lso == -1
    assert w.open_row(999, 0, 500, 5000) and w.row(100) is None   # took the row used longest ago
    assert w.row(101) == (0, -1, 1001) and w.lso == 500
    w.close()
