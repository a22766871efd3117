"""CRCs are checked by default: a corrupted record is reported, never delivered.

100 trials: random bytes written at random places in the committed part of
partition segment files (as a buggy process could), then read by default
consumers in subprocesses, one record at a time and in bulk
(``consume_arrays``). Every value returned is the one produced; each
corruption either raises ``CorruptRecord`` or leaves the records intact; no
process dies by a signal.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import struct
from typing import Any, Dict, List

import pytest

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import CorruptRecord

TRIALS = 100
RECORDS = 120
WIDTH = 32
RING = {"segment_bytes": 16 << 10, "segment_count": 2}


def value_of(offset: int) -> bytes:
    return struct.pack("<Q", offset) * (WIDTH // 8)


def committed_end(path: str) -> int:
    """Bytes of slot 0 covered by committed frames (the frame header's low word is the length)."""
    with open(path, "rb") as f:
        seg = f.read()
    pos = 0
    while pos + 8 <= len(seg):
        length = struct.unpack_from("<Q", seg, pos)[0] & 0xFFFFFFFF
        if length == 0 or length >= 1 << 31:
            break
        pos += length
    return pos


def read_partitions(root: str, topic: str, parts: List[int], bulk: bool, out: Any) -> None:
    """Read each partition with a default Consumer; report per partition what happened."""
    report: Dict[int, Any] = {}
    for p in parts:
        wrong, got, error = 0, 0, None
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition(topic, p)])
            try:
                while got < RECORDS:
                    if bulk:
                        res = c.consume_arrays(RECORDS, timeout=0.2)
                        if res is None:
                            break
                        _tp, arrs = res
                        for off, val in zip(arrs.offsets.tolist(), arrs.values):
                            wrong += bytes(val) != value_of(off)
                            got += 1
                    else:
                        msgs = c.consume(50, timeout=0.2)
                        if not msgs:
                            break
                        for m in msgs:
                            wrong += m.value != value_of(m.offset)
                            got += 1
            except CorruptRecord as e:
                error = str(e)
        report[p] = (got, wrong, error)
    out.put(report)


@pytest.mark.timeout(240)
def test_random_bytes_in_segments_are_never_delivered_as_records(root, reaper):
    topic = "scribbled"
    Admin(root.path).create_topic(topic, TRIALS, RING)
    with Producer(root.path) as prod:
        for off in range(RECORDS):
            for p in range(TRIALS):
                prod.send(topic, value_of(off), partition=p)
    rng = random.Random(20261202)
    for p in range(TRIALS):
        seg = os.path.join(root.partition_dir(topic, p), "0.log")
        end = committed_end(seg)
        assert end > RECORDS * WIDTH
        with open(seg, "r+b") as f:
            for _ in range(rng.randint(1, 3)):
                f.seek(rng.randrange(end))
                f.write(rng.randbytes(rng.randint(1, 16)))
    ctx = mp.get_context("fork")
    outcomes = {"intact": 0, "corrupt": 0}
    for bulk in (False, True):
        q = ctx.Queue()
        chunks = [list(range(k, TRIALS, 4)) for k in range(4)]
        procs = [reaper.start(read_partitions, root.path, topic, chunk, bulk, q) for chunk in chunks]
        reports: Dict[int, Any] = {}
        for _ in procs:
            try:
                reports.update(q.get(timeout=120))
            except queue.Empty:
                break
        for proc in procs:
            proc.join(10)
            assert proc.exitcode is not None, "a reader hangs"
            assert proc.exitcode >= 0, f"a reader died by signal {-proc.exitcode}"
        assert sorted(reports) == list(range(TRIALS))
        for p, (got, wrong, error) in sorted(reports.items()):
            assert wrong == 0, f"partition {p} ({'bulk' if bulk else 'records'}): {wrong} wrong values returned"
            if error is None:
                assert got == RECORDS, f"partition {p}: {got} of {RECORDS} records and no error"
                outcomes["intact"] += 1
            else:
                assert f"{topic}-{p}" in error and "offset" in error, error
                outcomes["corrupt"] += 1
    print(outcomes)
    assert outcomes["corrupt"] >= TRIALS, f"most corruptions should be caught: {outcomes}"
