"""Bugs the fuzz harnesses (tests/fuzz) found in the C core, each checked the
way a user meets it: through the Python API, on real files another process
scribbled on."""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import signal
import struct
import time
from typing import Any

import psutil
import pytest

from shmq.ringlog import PartitionLog

CTX = mp.get_context("fork")


def _seek_time_with_little_memory(path: str, ts: int, q: Any) -> None:
    # 1 GiB of address space beyond what the process maps now: enough for
    # any honest reader, far from what 2^30 record views would take.
    vms = psutil.Process().memory_info().vms
    resource.setrlimit(resource.RLIMIT_AS, (vms + (1 << 30), vms + (1 << 30)))
    try:
        q.put(("ok", PartitionLog(path).reader(0).seek_to_time(ts)))
    except Exception as e:  # noqa: BLE001
        q.put(("error", f"{type(e).__name__}: {e}"))


def test_seek_to_time_sizes_its_views_by_the_batch_not_by_a_scribbled_last_offset_delta(
        shm_dir: str, reaper: Any) -> None:
    # Found by fuzz_log: seek_time allocated lastOffsetDelta + 1 record views
    # (read from shared memory: up to 2^30, 64 GiB) before decoding a batch;
    # when that failed the batch was skipped and the answer was wrong.
    path = os.path.join(shm_dir, "t-0")
    log = PartitionLog.create(path, segment_bytes=1 << 16, segment_count=2)
    for i in range(4):
        assert log.append(b"v%d" % i, timestamp_ms=1000 * (i + 1)) == i
    log.close()
    with open(os.path.join(path, "0.log"), "r+b") as f:
        first_len = struct.unpack("<i", f.read(4))[0]
        f.seek(first_len + 8 + 23)                   # frame 1's lastOffsetDelta
        f.write(struct.pack(">i", 0x3FFFFFFE))
    q = CTX.Queue()
    p = reaper.start(_seek_time_with_little_memory, path, 1500, q)
    res = q.get(timeout=30)
    p.join(10)
    assert p.exitcode == 0
    assert res == ("ok", 1), res


def _die_after_claim(path: str) -> None:
    os.environ["SHMQ_FAULT_INJECT"] = "kill_after_claim:1"     # read when the log is opened
    PartitionLog(path).append(b"dead")


UNBLOCK_OWNER = 192 + 8          # log.h: header line 3, after slowest_offset (u32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("owner", [0xFFFFFFFF, 0x80000001, os.getpid() + (1 << 22)])
def test_a_scribbled_unblock_owner_does_not_stall_the_partition_for_good(shm_dir: str, reaper: Any,
                                                                          owner: int) -> None:
    # A dead claim is padded over by whoever holds the unblock lock; its word
    # names the pid holding it. A word another process scribbled must not
    # make the lock look held forever (kill(-1, 0) succeeds: "any process").
    path = os.path.join(shm_dir, "u-0")
    log = PartitionLog.create(path, segment_bytes=1 << 16, segment_count=2, unblock_timeout_ms=20)
    p = reaper.start(_die_after_claim, path)
    p.join(20)
    assert p.exitcode == -signal.SIGKILL
    with open(os.path.join(path, "partition.ctl"), "r+b") as f:
        f.seek(UNBLOCK_OWNER)
        f.write(struct.pack("<I", owner))
    assert log.append(b"after") == 1
    r = log.reader(0, tether=False)
    t0 = time.monotonic()
    got = []
    while not got and time.monotonic() < t0 + 5:
        got = r.read(10, timeout=0.2)
    assert [m.offset for m in got] == [1], f"still stuck at the dead claim after {time.monotonic() - t0:.1f} s"
    log.close()


def _reader_slot_offset(slot_count: int, index: int) -> int:
    return 512 + 128 * slot_count + 64 * index       # log.h: header, slot table, reader table


@pytest.mark.timeout(60)
def test_a_scribbled_reader_slot_owner_does_not_hold_a_blocking_ring_for_good(shm_dir: str) -> None:
    # A reader slot whose owner word names no possible process (0xFFFFFFFF:
    # kill(-1, 0) succeeds, "some process is alive") is a dead reader: its
    # slot is freed and producers are not held back by its position.
    path = os.path.join(shm_dir, "r-0")
    log = PartitionLog.create(path, segment_bytes=4096, segment_count=2)      # overflow="block"
    with open(os.path.join(path, "partition.ctl"), "r+b") as f:
        f.seek(_reader_slot_offset(2, 0))
        f.write(struct.pack("<QQqII", 0xFFFFFFFF, 1, 0, 1, 1))              # owner, start, position 0, tethered
    for i in range(300):                                                     # ~4 rings' worth
        log.append(b"x" * 40, timeout=2)
    assert log.end_offset == 300
    log.close()
