"""Many real processes appending to one partition while others read it.

Every value encodes (producer id, sequence number), so a reader can check on
its own that it saw every record exactly once: offsets strictly increasing
with no gaps, each producer's records in the order it appended them, nothing
missing at the end, and every batch's CRC32C valid (readers use
check_crc=True). Readers report a summary through a multiprocessing queue.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import struct
import time
import traceback
from typing import Any, Dict, List

import numpy as np
import pytest

from shmq.native import lib
from shmq.ringlog import PartitionLog

VALUE = struct.Struct("<IQ")  # producer id, sequence
PRODUCERS = 4
PER_PRODUCER = 250_000
CTX = mp.get_context("fork")


def _produce(path: str, pid: int, count: int, batch: int, go: Any, timeout: float) -> None:
    log = PartitionLog(path)
    pack = VALUE.pack
    append = log.append
    go.wait(30)
    if batch <= 1:
        for seq in range(count):
            append(pack(pid, seq))
    else:
        # fixed-width values as a 2-D uint8 array, `batch` records per append
        for start in range(0, count, batch):
            n = min(batch, count - start)
            arr = np.zeros((n, VALUE.size), dtype=np.uint8)
            arr[:, :4] = np.frombuffer(np.uint32(pid).tobytes(), np.uint8)
            arr[:, 4:] = np.arange(start, start + n, dtype="<u8").view(np.uint8).reshape(n, 8)
            log.append_batch(arr, timeout=timeout)
    log.close()


class _Checker:
    """Checks one reader's stream of (offsets, values) chunks."""

    def __init__(self, producers: int) -> None:
        self.next_offset = 0
        self.next_seq = [0] * producers
        self.count = 0
        self.errors: List[str] = []

    def feed(self, offsets: np.ndarray, values: np.ndarray) -> None:
        n = len(offsets)
        if n == 0 or self.errors:
            return
        exp = np.arange(self.next_offset, self.next_offset + n, dtype=np.int64)
        if not np.array_equal(offsets, exp):
            bad = int(np.argmax(offsets != exp))
            self.errors.append(f"offset {int(offsets[bad])} where {int(exp[bad])} was expected "
                               f"(previous {int(offsets[bad - 1]) if bad else self.next_offset - 1})")
            return
        if values.ndim != 2 or values.shape[1] != VALUE.size:
            self.errors.append(f"values of shape {values.shape} at offset {self.next_offset}")
            return
        pids = values[:, :4].copy().view("<u4").ravel()
        seqs = values[:, 4:].copy().view("<u8").ravel()
        if (pids >= len(self.next_seq)).any():
            bad = int(np.argmax(pids >= len(self.next_seq)))
            self.errors.append(f"unknown producer {int(pids[bad])} at offset {int(offsets[bad])}")
            return
        for p in range(len(self.next_seq)):
            s = seqs[pids == p]
            want = np.arange(self.next_seq[p], self.next_seq[p] + len(s), dtype=np.uint64)
            if not np.array_equal(s, want):
                bad = int(np.argmax(s != want))
                self.errors.append(f"producer {p}: sequence {int(s[bad])} where {int(want[bad])} "
                                   "was expected (duplicate, loss or reordering)")
                return
            self.next_seq[p] += len(s)
        self.next_offset += n
        self.count += n


def _read(path: str, rid: int, total: int, use_arrays: bool, positions: Any, q: Any,
          deadline_s: float) -> None:
    try:
        log = PartitionLog(path)
        r = log.reader(0, check_crc=True, max_records=4096)
        chk = _Checker(PRODUCERS)
        deadline = time.monotonic() + deadline_s
        while chk.count < total and not chk.errors and time.monotonic() < deadline:
            if use_arrays:
                got = r.read_arrays(4096, timeout=0.5)
                if got is not None:
                    chk.feed(got.offsets, np.asarray(got.values, dtype=np.uint8))
            else:
                recs = r.read(4096, timeout=0.5)
                if recs:
                    offs = np.fromiter((x.offset for x in recs), dtype=np.int64, count=len(recs))
                    vals = np.frombuffer(b"".join(x.value for x in recs), dtype=np.uint8)
                    chk.feed(offs, vals.reshape(len(recs), -1) if len(vals) == len(recs) * VALUE.size
                             else vals.reshape(1, -1))
            if positions is not None:
                positions[rid] = r.position
        extra = r.read(10)  # nothing beyond the total
        if extra:
            chk.errors.append(f"{len(extra)} records beyond the expected total, first at {extra[0].offset}")
        q.put(dict(rid=rid, count=chk.count, next_seq=chk.next_seq, errors=chk.errors,
                   position=r.position))
        log.close()
    except BaseException:  # noqa: BLE001
        q.put(dict(rid=rid, count=-1, next_seq=[], errors=[traceback.format_exc()], position=-1))


def _run(shm_dir: str, reaper: Any, *, segment_bytes: int, segment_count: int, overflow: str,
         batch: int, per_producer: int, housekeeper: bool, budget: float) -> Dict[str, Any]:
    path = os.path.join(shm_dir, "events-0")
    log = PartitionLog.create(path, segment_bytes=segment_bytes, segment_count=segment_count,
                              overflow=overflow, unblock_timeout_ms=1000)
    total = PRODUCERS * per_producer
    q = CTX.Queue()
    go = CTX.Event()
    positions = CTX.Array("q", 2, lock=False) if housekeeper else None
    readers = [reaper.start(_read, path, rid, total, rid == 0, positions, q, budget) for rid in range(2)]
    producers = [reaper.start(_produce, path, p, per_producer, batch, go, budget) for p in range(PRODUCERS)]
    t0 = time.monotonic()
    go.set()
    results: List[Dict[str, Any]] = []
    deadline = t0 + budget + 10
    while len(results) < 2 and time.monotonic() < deadline:
        if housekeeper:
            log.set_slowest_position(min(positions[0], positions[1]))
            log.housekeep()
        try:
            results.append(q.get(timeout=0.002 if housekeeper else 0.5))
        except Exception:  # queue.Empty
            pass
    elapsed = time.monotonic() - t0
    for p in producers:
        p.join(max(0.1, deadline - time.monotonic()))
    assert [p.exitcode for p in producers] == [0] * PRODUCERS, "a producer failed or hung"
    for p in readers:
        p.join(10)
    assert len(results) == 2, f"readers did not report within {budget:.0f}s"
    for res in sorted(results, key=lambda r: r["rid"]):
        assert res["errors"] == [], f"reader {res['rid']}: {res['errors'][:3]}"
        assert res["count"] == total, f"reader {res['rid']} saw {res['count']} of {total}"
        assert res["next_seq"] == [per_producer] * PRODUCERS
        assert res["position"] == total
    assert log.end_offset == total
    seals = int(lib.shmq_log_header(log._h).active_seq)
    log.close()
    return dict(elapsed=elapsed, seals=seals, total=total)


@pytest.mark.timeout(150)
def test_four_producers_two_readers_every_record_exactly_once_in_order(shm_dir, reaper, request):
    """4 x 250,000 single-record appends; a ring big enough that the readers
    never fall behind its start (overwrite mode, 10 x 16 MiB)."""
    from shmq.native import fastpath
    if not fastpath.enabled():
        # An open bug, found 2026-12-08: with the Python read path (SHMQ_FASTPATH=0)
        # this fails in about 1 run of 6 on the 2-vCPU host, at 57ee6f0 as now: a
        # producer hangs, or the bulk reader meets a CRC32C mismatch. The test
        # still runs and reports (XFAIL / XPASS) until it is found and fixed.
        request.applymarker(pytest.mark.xfail(reason="open bug: hang or CRC mismatch with SHMQ_FASTPATH=0",
                                              strict=False))
    out = _run(shm_dir, reaper, segment_bytes=16 << 20, segment_count=10, overflow="overwrite",
               batch=1, per_producer=PER_PRODUCER, housekeeper=False, budget=110)
    assert out["total"] == 1_000_000
    print(f"1M single appends, 4 producers / 2 readers: {out['elapsed']:.1f}s, {out['seals']} seals")


@pytest.mark.timeout(150)
def test_small_block_mode_ring_rotates_hundreds_of_times_without_loss(shm_dir, reaper):
    """64 KiB segments, 8 slots, overflow="block": producers wait for the
    slowest reader (min of both, set by a housekeeper loop in this process),
    so the ring seals and rotates hundreds of times and nothing is lost."""
    out = _run(shm_dir, reaper, segment_bytes=64 << 10, segment_count=8, overflow="block",
               batch=1, per_producer=PER_PRODUCER, housekeeper=True, budget=110)
    assert 300 <= out["seals"], out
    print(f"1M appends through a 8 x 64 KiB block ring: {out['elapsed']:.1f}s, {out['seals']} seals")


@pytest.mark.timeout(120)
def test_small_block_mode_ring_with_batches_rotates_without_loss(shm_dir, reaper):
    """The same with 2-D numpy batches of 7 records (frames of several sizes
    share the segments; batches straddle nothing: each is one frame)."""
    out = _run(shm_dir, reaper, segment_bytes=64 << 10, segment_count=8, overflow="block",
               batch=7, per_producer=PER_PRODUCER, housekeeper=True, budget=90)
    assert 100 <= out["seals"], out
    print(f"1M batched appends through a 8 x 64 KiB block ring: {out['elapsed']:.1f}s, {out['seals']} seals")
