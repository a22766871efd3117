"""Bugs the fuzz harnesses (tests/fuzz) found in the C core, each checked the
way a user meets it: through the Python API, on real files another process
scribbled on."""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import struct
from typing import Any

import psutil

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
