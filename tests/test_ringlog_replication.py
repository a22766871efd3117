"""Replication support of the partition log: the raw frame copy from a leader
to a follower (read_frames / append_frames), truncation and reset of a
follower, the high watermark (publish_leo, wait_hw, readers stopping at it),
append_state fencing and the leader epoch stamped into every batch.

Every log is a real set of files under /dev/shm (the ``shm_dir`` fixture).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import random
import threading
import time
from typing import Any, List, Tuple

import pytest
from kafka.record.default_records import DefaultRecordBatch

from shmq.errors import (CorruptRecord, KafkaStorageError, NotLeaderForPartition, OffsetOutOfRange,
                         UnknownTopicOrPartition)
from shmq.native import lib
from shmq.ringlog import PartitionLog
from shmq.ringlog.reader import LogReader, frame_epochs

CTX = mp.get_context("fork")
SMALL = dict(segment_bytes=4096, segment_count=4, index_interval_bytes=256, unblock_timeout_ms=100)


def _log(shm_dir: str, name: str, **kw: Any) -> PartitionLog:
    cfg = dict(SMALL)
    cfg.update(kw)
    return PartitionLog.create(os.path.join(shm_dir, name), **cfg)


def _records(log: PartitionLog, start: int = -1) -> List[Tuple[int, Any, Any]]:
    r = log.reader(log.start_offset if start < 0 else start)
    out: List[Tuple[int, Any, Any]] = []
    while True:
        recs = r.read(4096)
        if not recs:
            return out
        out.extend((x.offset, x.key, x.value) for x in recs)


def _frames(buf: Any, n: int) -> List[Tuple[int, int, int, int]]:
    """(type, count, position, length) of each frame of a raw frame stream."""
    out, pos = [], 0
    data = bytes(buf[:n])
    while pos < n:
        h = int.from_bytes(data[pos:pos + 8], "little")
        length = h & 0xFFFFFFFF
        out.append((h >> 62, (h >> 32) & 0x3FFFFFFF, pos, length))
        pos += length
    return out


def _copy(reader: LogReader, follower: PartitionLog, buf: bytearray, seen: List[Tuple[int, int, int, int]]) -> int:
    """Copy everything committed from the reader's log into follower."""
    end = follower.end_offset
    while True:
        n = reader.read_frames(buf)
        if not n:
            return end
        seen.extend(_frames(buf, n))
        end = follower.append_frames(buf, n)
        assert end == reader.position


def _die_after_claim(path: str, n: int) -> None:
    os.environ["SHMQ_FAULT_INJECT"] = f"kill_after_claim:{n}"
    log = PartitionLog(path)
    for k in range(n + 5):
        log.append(b"victim-%d" % k)


# ------------------------------------------------------------ copying

@pytest.mark.timeout(60)
def test_copy_through_read_frames_gives_identical_records_across_seals_wrap_and_padding(shm_dir, reaper):
    leader = _log(shm_dir, "leader-0")
    follower = _log(shm_dir, "follower-0")
    reader = leader.reader(0, check_crc=True)
    buf = bytearray(64 << 10)
    seen: List[Tuple[int, int, int, int]] = []
    for k in range(10):
        leader.append(b"v%d" % k, key=b"k%d" % k)
    leader.append_batch([b"b%d" % k for k in range(7)])
    assert _copy(reader, follower, buf, seen) == 17
    # A producer dies between claim and commit: the claim is padded over.
    victim = reaper.start(_die_after_claim, leader.path, 3)
    victim.join(10)
    assert victim.exitcode is not None and victim.exitcode < 0
    for k in range(3):
        leader.append(b"after-%d" % k)
    padded = leader.housekeep()
    deadline = time.monotonic() + 5
    while padded == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
        padded += leader.housekeep()
    assert padded == 1
    end = _copy(reader, follower, buf, seen)
    assert end == leader.end_offset == 17 + 2 + 1 + 3
    assert [f[1] for f in seen if f[0] == lib.SHMQ_FRAME_PADDING] == [1]
    assert _records(follower) == _records(leader)
    assert follower.reader(19).read(1)[0].offset == 20  # offset 19 is the padded claim
    # Many seals and several turns of both rings (overwrite mode).
    for rnd in range(40):
        leader.append_batch([b"%d-%d-" % (rnd, k) + b"x" * (rnd * 7 % 300) for k in range(1 + rnd % 5)])
        for k in range(rnd % 4):
            leader.append(b"single-%d-%d" % (rnd, k) * 10)
        _copy(reader, follower, buf, seen)
    assert follower.end_offset == leader.end_offset
    assert follower.start_offset > 0 and leader.start_offset > 0
    common = max(follower.start_offset, leader.start_offset)
    assert _records(follower, common) == _records(leader, common)
    assert len(_records(leader, common)) > 20


def _pair_with_stream(shm_dir: str, count: int) -> Tuple[PartitionLog, PartitionLog, bytearray, int]:
    """A leader holding count records, an empty follower, and the leader's frames."""
    leader = _log(shm_dir, "leader-0")
    follower = _log(shm_dir, "follower-0")
    for k in range(count):
        leader.append(b"v%d" % k)
    buf = bytearray(1 << 16)
    return leader, follower, buf, leader.reader(0).read_frames(buf)


def test_append_frames_refuses_a_frame_at_another_offset(shm_dir):
    leader, follower, buf, n = _pair_with_stream(shm_dir, 6)
    frames = _frames(buf, n)
    assert len(frames) == 6 and all(f[:2] == (lib.SHMQ_FRAME_DATA, 1) for f in frames)
    follower.append(b"own record")
    with pytest.raises(KafkaStorageError):
        follower.append_frames(buf, n)  # the stream starts at 0, the follower ends at 1
    assert follower.end_offset == 1
    # Frames before the diverging one stay appended.
    f2 = _frames(buf, n)[2][2]
    buf[f2 + 8:f2 + 16] = (99).to_bytes(8, "big")  # baseOffset of the third batch
    other = _log(shm_dir, "other-0")
    with pytest.raises(KafkaStorageError):
        other.append_frames(buf, n)
    assert other.end_offset == 2
    assert [r[2] for r in _records(other)] == [b"v0", b"v1"]


@pytest.mark.parametrize("seed", range(20))
def test_append_frames_refuses_garbage_without_crashing(shm_dir, seed):
    rng = random.Random(seed)
    leader, follower, good, n = _pair_with_stream(shm_dir, 5)
    cases = [bytearray(rng.randbytes(rng.randrange(1, 400))),
             good[:rng.randrange(1, n)],                      # cut inside a frame
             bytearray(good[:n])]
    # A header with a bad length or count.
    bad = cases[2]
    pos = rng.choice(_frames(good, n))[2]
    bad[pos + rng.choice([0, 4])] ^= 1 << rng.randrange(8)
    for case in cases:
        before = follower.end_offset
        try:
            end = follower.append_frames(case, len(case))
        except CorruptRecord:
            end = follower.end_offset
            assert end >= before
        # Whatever was accepted is whole, readable and at its offsets.
        assert [r[0] for r in _records(follower)] == list(range(end))
        follower.reset(0)


# ------------------------------------------------------------ truncate / reset

def test_truncate_in_the_active_segment_then_append_continues_there(shm_dir):
    log = _log(shm_dir, "f-0")
    for k in range(10):
        log.append(b"old-%d" % k)
    log.append_batch([b"batch-%d" % k for k in range(5)])  # offsets 10..14, one frame
    assert log.truncate(20) == 15                           # past the end: nothing
    assert log.truncate(12) == 10                           # a frame boundary at or below 12
    assert log.end_offset == 10
    assert log.append(b"new-10") == 10
    assert log.append(b"new-11") == 11
    got = _records(log)
    assert [r[0] for r in got] == list(range(12))
    assert got[9][2] == b"old-9" and got[10][2] == b"new-10"


def test_truncate_back_across_sealed_segments_releases_them(shm_dir):
    log = _log(shm_dir, "f-0")
    k = 0
    while log._hdr.active_seq < 2:
        log.append(b"x" * 300 + b"%d" % k)
        k += 1
    end = log.end_offset
    cut = 5
    assert log.truncate(cut) == cut
    assert log._hdr.active_seq == 0
    assert log.end_offset == cut and log.start_offset == 0
    for j in range(3 * end):  # grow back over the released slots and around the ring
        assert log.append(b"again-%d" % j + b"x" * 300) == cut + j
    assert log.start_offset > 0
    got = _records(log)
    assert [r[0] for r in got] == list(range(log.start_offset, cut + 3 * end))
    assert got[-1][2] == b"again-%d" % (3 * end - 1) + b"x" * 300


def test_truncate_keeps_records_below_and_a_fresh_reader_sees_new_ones(shm_dir):
    log = _log(shm_dir, "f-0")
    for k in range(60):
        log.append(b"r" * 150 + b"%d" % k)
    assert log._hdr.active_seq >= 1
    base1 = int(lib.shmq_log_slot(log._h, 1).base_offset)
    cut = base1 - 3  # inside segment 0, which is sealed
    assert log.truncate(cut) == cut
    assert log.append(b"replaced") == cut
    got = _records(log, cut - 2)
    assert [r[0] for r in got] == [cut - 2, cut - 1, cut]
    assert got[-1][2] == b"replaced"
    with pytest.raises(OffsetOutOfRange):
        log.reader(cut + 5)


def test_truncate_below_the_start_and_reset_empty_the_log(shm_dir):
    log = _log(shm_dir, "f-0")
    for k in range(200):
        log.append(b"y" * 100 + b"%d" % k)
    start = log.start_offset
    assert start > 0
    assert log.truncate(start - 1) == start - 1
    assert log.start_offset == log.end_offset == start - 1
    assert log.reset(1000) == 1000
    assert log.start_offset == log.end_offset == 1000
    assert log.append(b"first") == 1000
    assert _records(log) == [(1000, None, b"first")]
    with pytest.raises(OffsetOutOfRange):
        log.reader(5)
    for k in range(200):  # the ring turns normally after a reset
        log.append(b"z" * 100)
    assert log.end_offset == 1201 and log.start_offset > 1000
    log.flush()


# ------------------------------------------------------------ high watermark

def _replicated(shm_dir: str, isr: int = 0b011, epoch: int = 3) -> PartitionLog:
    log = _log(shm_dir, "r-0", segment_bytes=1 << 16)
    log.set_replication(True, epoch, 0, isr, 0)
    return log


def test_replicated_reader_stops_at_the_high_watermark_and_wakes_when_it_moves(shm_dir):
    log = _replicated(shm_dir)
    for k in range(10):
        log.append(b"v%d" % k)
    assert log.high_watermark == 0 and log.end_offset == 10
    reader = log.reader(0)
    assert reader.read(100) == []
    assert log.publish_leo(1, 3, 6, True) == 6
    assert [r.offset for r in reader.read(100)] == [0, 1, 2, 3, 4, 5]
    assert reader.read(100) == []
    # A reader may be placed between the HW and the end: it waits there.
    assert log.reader(8).read(10) == []
    # read_frames ignores the HW (followers copy everything committed).
    assert LogReader(log, 6).read_frames(bytearray(1 << 16)) > 0
    timer = threading.Timer(0.2, log.publish_leo, (1, 3, 10, True))
    t0 = time.monotonic()
    timer.start()
    got = reader.read(100, timeout=5.0)
    timer.join()
    assert [r.offset for r in got] == [6, 7, 8, 9]
    assert time.monotonic() - t0 < 2.0
    assert log.high_watermark == 10


def test_publish_leo_ignores_stale_epochs_and_replicas_outside_the_isr(shm_dir):
    log = _replicated(shm_dir, isr=0b0111)
    for k in range(20):
        log.append(b"v%d" % k)
    assert log.publish_leo(1, 2, 15, True) == 0     # epoch 2: stale tag counts as 0
    assert log.publish_leo(2, 3, 12, False) == 0    # replica 1's LEO still unknown in epoch 3
    assert log.publish_leo(1, 3, 15, True) == 12    # min over the ISR followers
    assert log.publish_leo(3, 3, 20, True) == 12    # replica 3 is not in the ISR
    leos = log.replica_leos()
    assert leos[1][:2] == (3, 15) and leos[2][:2] == (3, 12) and leos[3][:2] == (3, 20)
    assert leos[1][2] > 0 and leos[2][2] == 0
    assert log.publish_leo(1, 3, 50, True) == 12    # never above the end, never lowered
    log.set_replication(True, 3, 0, 0b0011, 0)      # the ISR shrinks: replica 2 leaves
    assert log.recompute_hw() == 20                 # capped at the end offset
    assert log.advance_hw(5) == 20
    with pytest.raises(Exception):
        log.publish_leo(8, 3, 1, True)


def test_alone_in_the_isr_the_leader_advances_the_hw_itself(shm_dir):
    log = _replicated(shm_dir, isr=0b1)
    for k in range(5):
        log.append(b"v%d" % k)
    assert log.publish_leo(1, 3, 5, True) == 0     # not an ISR member; no follower in the ISR
    assert log.advance_hw(4) == 4
    assert log.recompute_hw() == 4
    plain = _log(shm_dir, "plain-0")
    plain.append(b"x")
    assert plain.high_watermark == plain.end_offset == 1 and not plain.replicated
    assert plain.wait_hw(0, 0.01)


def _fence_later(path: str, delay: float, state: int) -> None:
    time.sleep(delay)
    PartitionLog(path).set_append_state(state)


@pytest.mark.timeout(30)
def test_wait_hw_returns_on_hw_times_out_and_fails_at_once_when_fenced(shm_dir, reaper):
    log = _replicated(shm_dir)
    off = log.append(b"acks=all")
    assert log.wait_hw(off, 0.05) is False
    timer = threading.Timer(0.1, log.publish_leo, (1, 3, 1, True))
    timer.start()
    assert log.wait_hw(off, 5.0) is True
    timer.join()
    off = log.append(b"never replicated")
    reaper.start(_fence_later, log.path, 0.2, lib.SHMQ_APPEND_NOT_LEADER)
    t0 = time.monotonic()
    with pytest.raises(NotLeaderForPartition):
        log.wait_hw(off, 10.0)
    assert time.monotonic() - t0 < 2.0
    log.set_append_state(lib.SHMQ_APPEND_DELETED)
    with pytest.raises(UnknownTopicOrPartition):
        log.wait_hw(off, 1.0)


def test_not_leader_log_refuses_producers_but_takes_the_copy(shm_dir):
    leader = _log(shm_dir, "leader-0")
    for k in range(4):
        leader.append(b"v%d" % k)
    follower = _log(shm_dir, "follower-0")
    follower.set_append_state(lib.SHMQ_APPEND_NOT_LEADER)
    assert follower.append_state == lib.SHMQ_APPEND_NOT_LEADER
    with pytest.raises(NotLeaderForPartition):
        follower.append(b"x")
    with pytest.raises(NotLeaderForPartition):
        follower.append(b"x", headers=[("h", b"1")])
    with pytest.raises(NotLeaderForPartition):
        follower.append_batch([b"a", b"b"])
    buf = bytearray(1 << 16)
    n = leader.reader(0).read_frames(buf)
    with pytest.raises(NotLeaderForPartition):
        follower.append_raw(_batch_bytes(buf, 0))
    assert follower.append_frames(buf, n) == 4
    assert _records(follower) == _records(leader)
    follower.set_append_state(lib.SHMQ_APPEND_OPEN)
    assert follower.append(b"now a leader") == 4


def _batch_bytes(buf: bytearray, pos: int) -> bytes:
    """The RecordBatch of the frame at pos (without the frame's pad)."""
    length = int.from_bytes(buf[pos + 16:pos + 20], "big")
    return bytes(buf[pos + 8:pos + 8 + 12 + length])


def _batches(log: PartitionLog) -> List[DefaultRecordBatch]:
    buf = bytearray(1 << 16)
    n = LogReader(log, log.start_offset).read_frames(buf)
    return [DefaultRecordBatch(_batch_bytes(buf, p)) for t, _, p, _ in _frames(buf, n)
            if t == lib.SHMQ_FRAME_DATA]


def test_batches_of_a_replicated_log_carry_the_leader_epoch(shm_dir):
    log = _replicated(shm_dir, epoch=7)
    log.append(b"a")
    log.append(b"b", key=b"k")
    log.append(b"c", headers=[("h", b"1")], timestamp_ms=5)
    log.append_batch([b"d", b"e"])
    buf = bytearray(1 << 16)
    LogReader(log, 0).read_frames(buf)
    log.append_raw(_batch_bytes(buf, 0))
    log.set_replication(True, 9, 0, 0b011, log.end_offset)
    assert log.leader_epoch == 9 and log.epoch_start_offset == 6
    log.append(b"f")
    batches = _batches(log)
    assert [b.leader_epoch for b in batches] == [7] * 5 + [9]
    assert all(b.validate_crc() for b in batches)
    assert [r.value for b in batches for r in b] == [b"a", b"b", b"c", b"d", b"e", b"a", b"f"]
    plain = _log(shm_dir, "plain-0")
    plain.append(b"x")
    assert [b.leader_epoch for b in _batches(plain)] == [-1]
    # frame_epochs reports each rise of the epoch, and the copy keeps the stamps.
    buf = bytearray(1 << 16)
    n = LogReader(log, 0).read_frames(buf)
    assert frame_epochs(buf, n, -1) == [(7, 0), (9, 6)]
    assert frame_epochs(buf, n, 7) == [(9, 6)]
    assert frame_epochs(buf, n, 9) == []
    follower = _log(shm_dir, "follower-0")
    follower.set_replication(True, 11, 1, 0b011, 0)
    follower.append_frames(buf, n)
    assert [b.leader_epoch for b in _batches(follower)] == [7] * 5 + [9]
    with pytest.raises(CorruptRecord):
        frame_epochs(bytearray(b"\x01" * 100), 100, -1)
