"""Where the time of one append / read goes, Python side and C side.

    python -m perf.profile_log [--size 64] [--n 200000] [--no-c]

Python side: the per-call cost of the layers between a Python loop and the C
core (empty loop, a one-argument cffi call, the raw C append through cffi,
the ``PartitionLog.append`` method, building a value), and of the read path
(``read`` vs the raw ``shmq_log_read`` call, ``read_arrays`` and its parts).
C side: ``perf/native_timing.c`` compiled against ``shmq/native/*.c`` and run
(no Python at all). Every figure is the best of 5 runs (C: median), in ns per record.
"""
from __future__ import annotations

import argparse
import itertools
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from typing import Callable, List, Tuple

import numpy as np

from shmq.native import ffi, lib
from shmq.ringlog import LogConfig, PartitionLog
from shmq.ringlog import reader as reader_mod

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
repeat = itertools.repeat
perf_ns = time.perf_counter_ns


def med_ns(fn: Callable[[], int], runs: int = 5) -> float:
    """fn() runs a loop and returns the number of operations; best ns/op of
    the runs (the least disturbed by other processes on a shared host)."""
    out = []
    for _ in range(runs):
        t0 = perf_ns()
        ops = fn()
        out.append((perf_ns() - t0) / ops)
    return min(out)


def python_side(size: int, n: int) -> List[Tuple[str, float]]:
    rows: List[Tuple[str, float]] = []
    d = tempfile.mkdtemp(prefix="shmq-prof-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        # Segments large enough that the timed loops never seal a segment.
        seg = 256 << 20
        log = PartitionLog.create(os.path.join(d, "p-0"), LogConfig(segment_bytes=seg, segment_count=2))
        h = log._h
        v = bytes(size)
        vlen = len(v)
        fit = int(seg * 0.9 / ((8 + 61 + 12 + size + 7) & ~7)) // 14
        n = min(n, fit)

        def loop() -> int:
            for _ in repeat(None, n):
                pass
            return n

        def cffi1() -> int:
            f = lib.shmq_log_end_offset
            for _ in repeat(None, n):
                f(h)
            return n

        def raw_value() -> int:
            f = lib.shmq_log_append_value
            for _ in repeat(None, n):
                f(h, v, vlen)
            return n

        def raw_append1() -> int:
            f, null = lib.shmq_log_append1, ffi.NULL
            for _ in repeat(None, n):
                f(h, null, -1, v, vlen, null, 0, -1, null, -1)
            return n

        def method() -> int:
            ap = log.append
            for _ in repeat(None, n):
                ap(v)
            return n

        def build_value() -> int:
            pack = struct.Struct("<Q").pack
            tail = bytes(size - 8)
            for i in range(n):
                pack(i) + tail
            return n

        def clock() -> int:
            for _ in repeat(None, n):
                perf_ns()
            return n

        rows.append(("python: empty for-loop iteration", med_ns(loop)))
        rows.append(("python: time.perf_counter_ns()", med_ns(clock)))
        rows.append(("python: struct.pack(seq) + tail (value)", med_ns(build_value)))
        rows.append(("cffi: shmq_log_end_offset(h) (1 arg)", med_ns(cffi1)))
        rows.append(("cffi: shmq_log_append_value (3 args)", med_ns(raw_value)))
        rows.append(("cffi: shmq_log_append1 (10 args)", med_ns(raw_append1)))
        rows.append(("method: PartitionLog.append(v)", med_ns(method)))

        arr = np.zeros((1000, size), dtype=np.uint8)

        def batch() -> int:
            ab = log.append_batch
            k = max(1, n // 1000)
            for _ in range(k):
                ab(arr)
            return k * 1000

        rows.append(("method: append_batch 1000 rows, per rec", med_ns(batch)))

        # Read side over what is in the log now (single-record frames first).
        end = log.end_offset
        nread = min(end, 200_000)

        def read_records() -> int:
            r = log.reader(0)
            got = 0
            while got < nread:
                got += len(r.read(1024))
            return got

        def read_raw() -> int:
            r = log.reader(0)
            f = lib.shmq_log_read
            got = 0
            while got < nread:
                got += f(r._h, r._cur, r._buf, r._buf_len, r._views, 1024, 0, r._used)
            return got

        def read_arrays() -> int:
            r = log.reader(0)
            got = 0
            while got < nread:
                got += len(r.read_arrays(8192).offsets)
            return got

        def raw_8192() -> int:
            r = log.reader(0)
            f = lib.shmq_log_read
            got = 0
            while got < nread:
                got += f(r._h, r._cur, r._buf, r._buf_len, r._views, 8192, 0, r._used)
            return got

        r = log.reader(0)
        r._fill(8192, 0.0)
        vv = r._view_arr[:8192]
        buf = np.frombuffer(ffi.buffer(r._buf, r._used[0]), dtype=np.uint8)

        def gather_values() -> int:
            for _ in range(20):
                reader_mod._gather(buf, vv[:, 4], vv[:, 5])
            return 20 * 8192

        def gather_null_keys() -> int:
            for _ in range(20):
                reader_mod._gather(buf, vv[:, 2], vv[:, 3])
            return 20 * 8192

        r2 = log.reader(0)
        r2._fill(1024, 0.0)
        nv = 1024

        def copy_buf() -> int:
            for _ in range(50):
                ffi.buffer(r2._buf, r2._used[0])[:]
            return 50 * nv

        def tolist() -> int:
            for _ in range(50):
                r2._view_arr[:nv].tolist()
            return 50 * nv

        data = ffi.buffer(r2._buf, r2._used[0])[:]
        rows_l = r2._view_arr[:nv].tolist()
        from shmq.ringlog.records import LogRecord, decode_headers

        def build() -> int:
            new = tuple.__new__
            cls = LogRecord
            for _ in range(50):
                [new(cls, (off, ts, None if kl < 0 else data[kp:kp + kl], None if vl < 0 else data[vp:vp + vl],
                           decode_headers(data, hp, hc, len(data)) if hc else ()))
                 for off, ts, kp, kl, vp, vl, hp, hc in rows_l]
            return 50 * nv

        rows.append(("read(): ffi.buffer(...)[:] copy, per rec", med_ns(copy_buf)))
        rows.append(("read(): view array .tolist(), per rec", med_ns(tolist)))
        rows.append(("read(): LogRecord list comprehension, per rec", med_ns(build)))
        rows.append(("read: LogReader.read(1024), per rec", med_ns(read_records)))
        rows.append(("read: raw shmq_log_read(1024), per rec", med_ns(read_raw)))
        rows.append(("read: LogReader.read_arrays(8192), per rec", med_ns(read_arrays)))
        rows.append(("read: raw shmq_log_read(8192), per rec", med_ns(raw_8192)))
        rows.append(("read_arrays: _gather(values), per rec", med_ns(gather_values)))
        rows.append(("read_arrays: _gather(null keys), per rec", med_ns(gather_null_keys)))

        rend = log.reader(log.end_offset)

        def poll() -> int:
            rd = rend.read
            for _ in repeat(None, n):
                rd(64, 0.0)
            return n

        rows.append(("spin poll: read(64, timeout=0) at the end", med_ns(poll)))
        log.close()
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return rows


def c_side(size: int, n: int) -> List[Tuple[str, float]]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        return []
    native = os.path.join(ROOT, "shmq", "native")
    srcs = [os.path.join(native, f) for f in ("log.c", "record_batch.c", "crc32c.c", "murmur2.c", "wait.c")]
    with tempfile.TemporaryDirectory() as t:
        exe = os.path.join(t, "native_timing")
        subprocess.run([cc, "-O2", "-std=gnu11", "-I", native, "-o", exe,
                        os.path.join(HERE, "native_timing.c"), *srcs], check=True)
        out = subprocess.run([exe, str(size), str(n)], check=True, capture_output=True, text=True).stdout
    rows = []
    for line in out.splitlines():
        name, _, rest = line.partition("  ")
        fields = rest.split()
        if fields:
            rows.append(("C: " + name.strip() + ("  " + " ".join(fields[1:]) if len(fields) > 1 else ""),
                         float(fields[0])))
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.profile_log")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--no-c", action="store_true")
    a = ap.parse_args()
    rows = python_side(a.size, a.n)
    if not a.no_c:
        rows += c_side(a.size, a.n)
    w = max(len(r[0]) for r in rows)
    print(f"value {a.size} B; ns per record (best of 5 runs)")
    for name, ns in rows:
        print(f"{name.ljust(w)}  {ns:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
