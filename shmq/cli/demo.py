"""`shmq demo`: producer and consumer processes over one shared-memory log,
with live progress and a verified summary.

Each producer process appends records whose value carries (producer id,
sequence number, send time); each consumer process reads the whole log,
checks every producer's sequence arrives complete and in order, and measures
one-way latency from the send time. The summary says what was sent, what was
received, what was lost (0), throughput and latency percentiles.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import struct
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np

from ..ringlog import LogConfig, PartitionLog

_REC = struct.Struct("<IQQ")  # producer id, sequence, send time (ns, monotonic)


def _producer(path: str, pid: int, count: int, value_size: int, done: Any) -> None:
    log = PartitionLog(path)
    pad = b"\0" * max(0, value_size - _REC.size)
    pack = _REC.pack
    now = time.monotonic_ns
    for seq in range(count):
        log.append(pack(pid, seq, now()) + pad)
    done.value += 1


def _consumer(path: str, cid: int, expected: int, producers: int, progress: Any, out: Any) -> None:
    log = PartitionLog(path)
    reader = log.reader(0, check_crc=True)
    next_seq = [0] * producers
    errors = 0
    received = 0
    lat = np.empty(expected, dtype=np.int64)
    deadline = time.monotonic() + 120
    unpack = _REC.unpack_from
    last_offset = -1
    while received < expected and time.monotonic() < deadline:
        for rec in reader.read(4096, timeout=0.2):
            t = time.monotonic_ns()
            p, seq, sent = unpack(rec.value)
            if seq != next_seq[p] or rec.offset != last_offset + 1:
                errors += 1
            next_seq[p] = seq + 1
            last_offset = rec.offset
            lat[received] = t - sent
            received += 1
        progress[cid] = received
    lat = lat[:received]
    out.put((cid, received, errors, np.percentile(lat, [50, 99, 99.9]).tolist() if received else []))


def run_demo(producers: int = 2, consumers: int = 2, count: int = 200_000, value_size: int = 64,
             root: str | None = None) -> int:
    """Run the demo; returns 0 when every consumer received everything in order."""
    base = root or os.environ.get("SHMQ_ROOT") or (f"/dev/shm/shmq-{os.getuid()}" if os.path.isdir("/dev/shm")
                                                   else tempfile.gettempdir())
    os.makedirs(base, mode=0o700, exist_ok=True)
    work = tempfile.mkdtemp(prefix="demo-", dir=base)
    ctx = mp.get_context("fork")
    procs: List[Any] = []
    try:
        path = os.path.join(work, "demo-0")
        log = PartitionLog.create(path, LogConfig(segment_bytes=64 << 20, segment_count=4))
        total = producers * count
        print(f"shmq demo: {producers} producer and {consumers} consumer processes, "
              f"{total:,} records of {value_size} B, log at {path}")
        progress = ctx.Array("q", consumers)
        done = ctx.Value("i", 0)
        out = ctx.Queue()
        for c in range(consumers):
            procs.append(ctx.Process(target=_consumer, args=(path, c, total, producers, progress, out)))
        for p in range(producers):
            procs.append(ctx.Process(target=_producer, args=(path, p, count, value_size, done)))
        t0 = time.monotonic()
        for pr in procs:
            pr.start()
        results: Dict[int, Any] = {}
        last = 0.0
        while len(results) < consumers and time.monotonic() - t0 < 150:
            log.housekeep()
            while not out.empty():
                r = out.get()
                results[r[0]] = r
            now = time.monotonic()
            if now - last >= 0.5 or len(results) == consumers:
                last = now
                end = log.end_offset
                got = min(progress[:]) if consumers else 0
                rate = got / max(now - t0, 1e-9)
                sys.stdout.write(f"\r  appended {end:>10,}  consumed {got:>10,}  lag {end - got:>8,}  "
                                 f"{rate / 1e6:6.2f} M records/s per consumer")
                sys.stdout.flush()
            time.sleep(0.005)
        elapsed = time.monotonic() - t0
        print()
        ok = len(results) == consumers
        for c in sorted(results):
            _, received, errors, pct = results[c]
            lost = total - received
            ok = ok and lost == 0 and errors == 0
            lat = (f"latency p50 {pct[0] / 1e3:.1f} us  p99 {pct[1] / 1e3:.1f} us  p99.9 {pct[2] / 1e3:.1f} us"
                   if pct else "")
            print(f"  consumer {c}: received {received:,}  lost {lost:,}  out of order {errors}  {lat}")
        print(f"  sent {total:,} in {elapsed:.2f} s: {total / elapsed / 1e6:.2f} M records/s end to end; "
              f"{'verified: nothing lost, every producer in order' if ok else 'FAILED verification'}")
        log.close()
        return 0 if ok else 1
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.kill()
            pr.join(timeout=2)
        shutil.rmtree(work, ignore_errors=True)
