"""shmq partition log vs multiprocessing.Queue, same workloads, one run.

    python -m perf.bench_log [--quick] [--json out.json] [--sizes 64,1024]

Workloads (each for 64-byte and 1 KiB values):

* ``append1``  single-record append from one Python process:
  ``PartitionLog.append`` in a tight loop vs ``mp.Queue`` put+get in one
  process (chunks of 256 puts, then 256 gets: ``put()`` alone only appends to
  a local deque and leaves pickling and the pipe write to a feeder thread, so
  the round trip is the honest per-record cost of the queue).
* ``batch``    ``append_batch`` with a 2-D uint8 array (1000 and 8192 rows) vs
  ``mp.Queue`` put+get of a list of as many distinct bytes messages.
* ``read``     ``LogReader.read`` (records, chunks of 1024) and
  ``LogReader.read_arrays`` (bulk, 8192) over a log pre-filled by single
  appends vs ``mp.Queue.get`` of single messages / of 8192-message lists
  queued by a child process that has already put everything.
* ``p2p``      a producer process to a consumer process, fresh processes per
  run (fork). Single-record API on both sides: ``append`` / ``read`` in chunks
  of 1024 vs ``put`` / ``get``; also bulk (``append_batch`` / ``read_arrays``
  vs ``mp.Queue`` of the same numpy batches). Every value carries its sequence
  number; the consumer checks the count and the sum of the sequence numbers.
  The log is ``overflow="block"``; the consumer reports its position with
  ``set_slowest_position`` after every chunk; nobody runs ``housekeep()``, so
  the producer prepares ring slots inline.
* ``latency``  one-way latency: the producer process paces records at
  ``--rate``/s (sleeping through most of each gap, spinning the rest), each
  value carrying ``time.perf_counter_ns()`` taken right before the append;
  the consumer computes now - sent. Spinning reader
  (``read(timeout=0)`` in a busy loop) and blocking reader
  (``read(timeout=1.0)``: default 50 us spin, then futex) vs ``mp.Queue``
  ``get_nowait`` in a busy loop and blocking ``get()``. The first 5 % of
  samples are dropped as warm-up.

Method: a warm-up run (short) before each workload, then ``--repeats`` runs (3,
or 1 with ``--quick``), median reported. Every log is created fresh for its
run in a private temp dir under /dev/shm (removed at the end), 4 slots of 64
MiB. Every multi-process run is bounded by a timeout; a run that times out is
killed and reported from what the consumer had seen (marked PARTIAL).
"""
from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing as mp
import os
import platform
import queue as queue_mod
import shutil
import statistics
import struct
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from shmq.ringlog import LogConfig, PartitionLog

CTX = mp.get_context("fork")
SEGMENT_BYTES = 64 << 20
SEGMENT_COUNT = 4
U64 = struct.Struct("<Q")
U64x2 = struct.Struct("<QQ")
repeat = itertools.repeat
perf_ns = time.perf_counter_ns


# ---------------------------------------------------------------- plumbing

class Workspace:
    """A private temp dir on tmpfs; one fresh log directory per run."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.root = tempfile.mkdtemp(prefix="shmq-bench-", dir=base)
        self._n = 0

    def new_log(self, overflow: str = "overwrite") -> str:
        self._n += 1
        path = os.path.join(self.root, f"bench-{self._n}")
        PartitionLog.create(path, LogConfig(segment_bytes=SEGMENT_BYTES, segment_count=SEGMENT_COUNT,
                                            overflow=overflow)).close()
        return path

    @staticmethod
    def drop(path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def frame_bytes(size: int) -> int:
    """Bytes one single-record frame takes in a segment (about; for sizing)."""
    return (8 + 61 + 3 + 8 + size + 7) & ~7


def fit_records(size: int, frac: float = 0.7) -> int:
    """Single-record frames that fit in the ring without wrapping."""
    return int(frac * SEGMENT_BYTES * SEGMENT_COUNT / frame_bytes(size))


def value_of(size: int) -> bytes:
    return bytes(range(256)) * (size // 256) + bytes(size % 256)


class Partial(Exception):
    pass


def run_procs(procs: List[mp.Process], timeout: float) -> bool:
    """Start nothing; join the given (started) processes until the deadline.
    Kills whatever is left. Returns True when every process exited by itself
    with status 0."""
    deadline = time.monotonic() + timeout
    ok = True
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            ok = False
            p.kill()
            p.join(5)
        elif p.exitcode != 0:
            ok = False
    return ok


# ------------------------------------------------- single-process workloads

def shmq_append1(ws: Workspace, size: int, n: int) -> float:
    path = ws.new_log()
    log = PartitionLog(path)
    try:
        v = value_of(size)
        ap = log.append
        t0 = perf_ns()
        for _ in repeat(None, n):
            ap(v)
        dt = perf_ns() - t0
        assert log.end_offset == n, (log.end_offset, n)
    finally:
        log.close()
        ws.drop(path)
    return n / dt * 1e9


def mpq_putget1(ws: Workspace, size: int, n: int, chunk: int = 256) -> float:
    q = CTX.Queue()
    v = value_of(size)
    put, get = q.put, q.get
    rounds = max(1, n // chunk)
    t0 = perf_ns()
    for _ in repeat(None, rounds):
        for _ in repeat(None, chunk):
            put(v)
        for _ in repeat(None, chunk):
            get()
    dt = perf_ns() - t0
    q.close()
    q.join_thread()
    return rounds * chunk / dt * 1e9


def shmq_batch(ws: Workspace, size: int, n: int, rows: int) -> float:
    path = ws.new_log()
    log = PartitionLog(path)
    try:
        arr = np.frombuffer(value_of(size) * rows, dtype=np.uint8).reshape(rows, size).copy()
        nb = max(1, n // rows)
        ab = log.append_batch
        t0 = perf_ns()
        for _ in repeat(None, nb):
            ab(arr)
        dt = perf_ns() - t0
        assert log.end_offset == nb * rows
    finally:
        log.close()
        ws.drop(path)
    return nb * rows / dt * 1e9


def distinct_values(size: int, rows: int) -> List[bytes]:
    """rows different bytes objects (each carries its index): a list of one
    object repeated would pickle as one object plus memo references."""
    tail = value_of(size)[8:]
    return [U64.pack(i) + tail for i in range(rows)]


def mpq_batch(ws: Workspace, size: int, n: int, rows: int) -> float:
    q = CTX.Queue()
    msgs = distinct_values(size, rows)
    nb = max(1, n // rows)
    put, get = q.put, q.get
    t0 = perf_ns()
    for _ in repeat(None, nb):
        put(msgs)
        got = get()
    dt = perf_ns() - t0
    assert len(got) == rows
    q.close()
    q.join_thread()
    return nb * rows / dt * 1e9


class FilledLog:
    """A log pre-filled by single-record appends (rows=1) or by batches of
    ``rows`` records, shared by the read repeats."""

    def __init__(self, ws: Workspace, size: int, n: int, rows: int = 1) -> None:
        self.ws = ws
        self.path = ws.new_log()
        self.log = PartitionLog(self.path)
        v = value_of(size)
        if rows == 1:
            ap = self.log.append
            for _ in repeat(None, n):
                ap(v)
        else:
            arr = np.frombuffer(v * rows, dtype=np.uint8).reshape(rows, size)
            n = max(1, n // rows) * rows
            for _ in range(n // rows):
                self.log.append_batch(arr)
        self.n = n
        assert self.log.start_offset == 0 and self.log.end_offset == n

    def close(self) -> None:
        self.log.close()
        self.ws.drop(self.path)


def shmq_read(fl: FilledLog, bulk: bool, limit: int = 0) -> float:
    r = fl.log.reader(0)
    n = min(fl.n, limit) if limit else fl.n
    got = 0
    if bulk:
        ra = r.read_arrays
        t0 = perf_ns()
        while got < n:
            a = ra(8192)
            got += len(a.offsets)
        dt = perf_ns() - t0
    else:
        rd = r.read
        t0 = perf_ns()
        while got < n:
            got += len(rd(1024))
        dt = perf_ns() - t0
    assert got >= n
    return got / dt * 1e9


def _mpq_filler(q: Any, size: int, n: int, rows: int, done: Any) -> None:
    v = value_of(size)
    if rows == 1:
        put = q.put
        for _ in repeat(None, n):
            put(v)
    else:
        msgs = distinct_values(size, rows)
        for _ in range(n // rows):
            q.put(msgs)
    done.set()
    q.close()
    q.join_thread()


def mpq_read(ws: Workspace, size: int, n: int, rows: int, timeout: float) -> float:
    """get() rate from a queue whose producer (a child) has put everything."""
    q = CTX.Queue()
    done = CTX.Event()
    p = CTX.Process(target=_mpq_filler, args=(q, size, n, rows, done), daemon=True)
    p.start()
    try:
        if not done.wait(timeout):
            raise Partial("filler did not finish")
        get = q.get
        got = 0
        t0 = perf_ns()
        if rows == 1:
            for _ in repeat(None, n):
                get(timeout=timeout)
            got = n
        else:
            for _ in range(n // rows):
                got += len(get(timeout=timeout))
        dt = perf_ns() - t0
    finally:
        run_procs([p], 10)
        q.close()
    return got / dt * 1e9


# ---------------------------------------------------- process to process

# stat slots shared by parent and children (fork, lock-free int64 array)
S_GOT, S_SUM, S_T0, S_T1, S_PT1 = range(5)


def _shmq_p2p_producer(path: str, size: int, n: int, rows: int, stat: Any, go: Any) -> None:
    log = PartitionLog(path)
    tail = bytes(size - 8)
    go.wait()
    if rows == 1:
        ap = log.append
        pack = U64.pack
        stat[S_T0] = perf_ns()
        for i in range(n):
            ap(pack(i) + tail)
    else:
        arr = np.zeros((rows, size), dtype=np.uint8)
        seqcol = arr[:, :8].view("<u8").reshape(rows)
        base = np.arange(rows, dtype=np.uint64)
        ab = log.append_batch
        stat[S_T0] = perf_ns()
        for i in range(0, n, rows):
            np.add(base, i, out=seqcol)
            ab(arr)
    stat[S_PT1] = perf_ns()
    log.close()


def _shmq_p2p_consumer(path: str, n: int, rows: int, stat: Any, ready: Any) -> None:
    log = PartitionLog(path)
    r = log.reader(0)
    slow = log.set_slowest_position
    ready.set()
    got = 0
    s = 0
    if rows == 1:
        rd = r.read
        u = U64.unpack_from
        while got < n:
            recs = rd(1024, 1.0)
            if recs:
                s += sum([u(rec[3])[0] for rec in recs])
                got += len(recs)
                slow(got)
                stat[S_GOT] = got
    else:
        ra = r.read_arrays
        while got < n:
            a = ra(8192, 1.0)
            if a is not None:
                s += int(np.ascontiguousarray(a.values[:, :8]).view("<u8").sum(dtype=np.uint64))
                got += len(a.offsets)
                slow(got)
                stat[S_GOT] = got
    stat[S_T1] = perf_ns()
    stat[S_SUM] = s
    log.close()


def _mpq_p2p_producer(q: Any, size: int, n: int, rows: int, stat: Any, go: Any) -> None:
    tail = bytes(size - 8)
    go.wait()
    put = q.put
    if rows == 1:
        pack = U64.pack
        stat[S_T0] = perf_ns()
        for i in range(n):
            put(pack(i) + tail)
    else:
        arr = np.zeros((rows, size), dtype=np.uint8)
        seqcol = arr[:, :8].view("<u8").reshape(rows)
        base = np.arange(rows, dtype=np.uint64)
        stat[S_T0] = perf_ns()
        for i in range(0, n, rows):
            np.add(base, i, out=seqcol)
            put(arr.copy())  # the feeder thread pickles it later: arr is reused
    stat[S_PT1] = perf_ns()
    q.close()
    q.join_thread()


def _mpq_p2p_consumer(q: Any, n: int, rows: int, stat: Any, ready: Any) -> None:
    ready.set()
    get = q.get
    got = 0
    s = 0
    if rows == 1:
        u = U64.unpack_from
        while got < n:
            s += u(get(timeout=60))[0]
            got += 1
            if not got & 1023:
                stat[S_GOT] = got
    else:
        while got < n:
            a = get(timeout=60)
            s += int(np.ascontiguousarray(a[:, :8]).view("<u8").sum(dtype=np.uint64))
            got += len(a)
            stat[S_GOT] = got
    stat[S_GOT] = got
    stat[S_T1] = perf_ns()
    stat[S_SUM] = s


def p2p(ws: Workspace, system: str, size: int, n: int, rows: int, timeout: float) -> Dict[str, Any]:
    """One producer process -> one consumer process; returns rate and checks."""
    if rows > 1:
        n = max(rows, n // rows * rows)
    stat = CTX.RawArray("q", 8)
    ready, go = CTX.Event(), CTX.Event()
    path = q = None
    if system == "shmq":
        path = ws.new_log(overflow="block")
        cons = CTX.Process(target=_shmq_p2p_consumer, args=(path, n, rows, stat, ready), daemon=True)
        prod = CTX.Process(target=_shmq_p2p_producer, args=(path, size, n, rows, stat, go), daemon=True)
    else:
        q = CTX.Queue()
        cons = CTX.Process(target=_mpq_p2p_consumer, args=(q, n, rows, stat, ready), daemon=True)
        prod = CTX.Process(target=_mpq_p2p_producer, args=(q, size, n, rows, stat, go), daemon=True)
    t_start = time.monotonic()
    try:
        cons.start()
        prod.start()
        ready.wait(timeout)
        go.set()
        ok = run_procs([prod, cons], max(1.0, timeout - (time.monotonic() - t_start)))
    finally:
        for p in (prod, cons):
            if p.is_alive():
                p.kill()
        if path:
            ws.drop(path)
        if q is not None:
            q.close()
    got = int(stat[S_GOT])
    t0, t1 = int(stat[S_T0]), int(stat[S_T1])
    expect = n * (n - 1) // 2
    res: Dict[str, Any] = {"n": n, "got": got}
    if ok and t1 > t0 > 0:
        res["rate"] = n / (t1 - t0) * 1e9
        res["checksum_ok"] = (got == n and int(stat[S_SUM]) == expect)
        res["producer_rate"] = n / max(1, int(stat[S_PT1]) - t0) * 1e9
        if not res["checksum_ok"]:
            res["partial"] = True
    else:
        el = time.monotonic() - t_start
        res["partial"] = True
        res["rate"] = got / el if el > 0 else 0.0
        res["checksum_ok"] = False
    return res


# ----------------------------------------------------------------- latency

def _pace_and_send(send: Callable[[bytes], Any], size: int, n: int, rate: float, stat: Any) -> None:
    tail = bytes(size - 16)
    pack = U64x2.pack
    interval = int(1e9 / rate)
    nxt = perf_ns() + interval
    stat[S_T0] = perf_ns()
    sleep = time.sleep
    for i in range(n):
        now = perf_ns()
        # Sleep through most of the gap (timer slack is ~50 us), spin the
        # rest. Sleeping leaves a core to the reader on a small host and
        # drops the GIL, which mp.Queue's feeder thread needs to run (the
        # same loop for both systems).
        if nxt - now > 80_000:
            sleep((nxt - now - 70_000) / 1e9)
            now = perf_ns()
        while now < nxt:
            sleep(0)
            now = perf_ns()
        if now - nxt > 10 * interval:  # fell far behind (descheduled): do not burst
            nxt = now
        nxt += interval
        send(pack(i, perf_ns()) + tail)
    stat[S_PT1] = perf_ns()


def _shmq_lat_producer(path: str, size: int, n: int, rate: float, stat: Any, go: Any) -> None:
    log = PartitionLog(path)
    go.wait()
    _pace_and_send(log.append, size, n, rate, stat)
    log.close()


def _mpq_lat_producer(q: Any, size: int, n: int, rate: float, stat: Any, go: Any) -> None:
    go.wait()
    _pace_and_send(q.put, size, n, rate, stat)
    q.close()
    q.join_thread()


def _shmq_lat_consumer(path: str, n: int, spin: bool, lat_buf: Any, stat: Any, ready: Any) -> None:
    log = PartitionLog(path)
    r = log.reader(0)
    lat = np.frombuffer(lat_buf, dtype=np.int64)
    u = U64x2.unpack_from
    rd = r.read
    timeout = 0.0 if spin else 1.0
    got = 0
    s = 0
    ready.set()
    while got < n:
        recs = rd(64, timeout)
        if not recs:
            continue
        now = perf_ns()
        for rec in recs:
            seq, sent = u(rec[3])
            lat[got] = now - sent
            s += seq
            got += 1
        stat[S_GOT] = got
    stat[S_SUM] = s
    stat[S_T1] = perf_ns()
    log.close()


def _mpq_lat_consumer(q: Any, n: int, spin: bool, lat_buf: Any, stat: Any, ready: Any) -> None:
    lat = np.frombuffer(lat_buf, dtype=np.int64)
    u = U64x2.unpack_from
    got = 0
    s = 0
    Empty = queue_mod.Empty
    ready.set()
    if spin:
        get = q.get_nowait
        while got < n:
            try:
                v = get()
            except Empty:
                continue
            now = perf_ns()
            seq, sent = u(v)
            lat[got] = now - sent
            s += seq
            got += 1
            stat[S_GOT] = got
    else:
        get = q.get
        while got < n:
            v = get(timeout=60)
            now = perf_ns()
            seq, sent = u(v)
            lat[got] = now - sent
            s += seq
            got += 1
            stat[S_GOT] = got
    stat[S_SUM] = s
    stat[S_T1] = perf_ns()


def latency(ws: Workspace, system: str, size: int, spin: bool, rate: float, seconds: float,
            timeout: float) -> Dict[str, Any]:
    n = max(100, int(rate * seconds))
    stat = CTX.RawArray("q", 8)
    lat_buf = CTX.RawArray("q", n)
    ready, go = CTX.Event(), CTX.Event()
    path = q = None
    if system == "shmq":
        path = ws.new_log(overflow="block")
        cons = CTX.Process(target=_shmq_lat_consumer, args=(path, n, spin, lat_buf, stat, ready), daemon=True)
        prod = CTX.Process(target=_shmq_lat_producer, args=(path, size, n, rate, stat, go), daemon=True)
    else:
        q = CTX.Queue()
        cons = CTX.Process(target=_mpq_lat_consumer, args=(q, n, spin, lat_buf, stat, ready), daemon=True)
        prod = CTX.Process(target=_mpq_lat_producer, args=(q, size, n, rate, stat, go), daemon=True)
    try:
        cons.start()
        prod.start()
        ready.wait(timeout)
        go.set()
        ok = run_procs([prod, cons], timeout)
    finally:
        for p in (prod, cons):
            if p.is_alive():
                p.kill()
        if path:
            ws.drop(path)
        if q is not None:
            q.close()
    got = int(stat[S_GOT])
    lat = np.frombuffer(lat_buf, dtype=np.int64)[:got]
    skip = int(got * 0.05)
    sample = lat[skip:] / 1000.0  # us
    res: Dict[str, Any] = {"n": n, "got": got, "partial": not ok or got != n,
                           "checksum_ok": ok and got == n and int(stat[S_SUM]) == n * (n - 1) // 2}
    if len(sample):
        p50, p99, p999 = np.percentile(sample, [50, 99, 99.9])
        res.update(p50=float(p50), p99=float(p99), p999=float(p999), max=float(sample.max()))
        t0, pt1 = int(stat[S_T0]), int(stat[S_PT1])
        if pt1 > t0 > 0:
            res["sent_rate"] = n / (pt1 - t0) * 1e9
    return res


# ------------------------------------------------------------------ driver

class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.repeats = args.repeats or (1 if args.quick else 3)
        self.timeout = args.timeout
        self.rows: List[Dict[str, Any]] = []
        self.ws = Workspace()

    def log(self, msg: str) -> None:
        if not self.args.silent:
            print(f"  [{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def measure(self, fn: Callable[[int], Any], n: int) -> List[Any]:
        """A warm-up run on n/10 records, then the repeats."""
        fn(max(1, n // 10))
        return [fn(n) for _ in range(self.repeats)]

    def add(self, workload: str, size: int, unit: str, shmq: List[Any], mpq: List[Any],
            key: Optional[str] = None, better: str = "higher", target: Optional[Tuple[str, float]] = None,
            note: str = "", extra: Optional[Dict[str, Any]] = None) -> None:
        def med(vals: List[Any]) -> Optional[float]:
            xs = [v[key] if key else v for v in vals if (v.get(key) is not None if key else v is not None)]
            return statistics.median(xs) if xs else None

        def flags(vals: List[Any]) -> Dict[str, Any]:
            if not key:
                return {}
            return {"partial": any(v.get("partial") for v in vals),
                    "checksum_ok": all(v.get("checksum_ok", True) for v in vals)}

        row = {"workload": workload, "size": size, "unit": unit, "better": better,
               "shmq": med(shmq), "mpq": med(mpq), "shmq_runs": shmq, "mpq_runs": mpq,
               "shmq_flags": flags(shmq), "mpq_flags": flags(mpq), "note": note}
        if row["shmq"] is not None and row["mpq"]:
            row["ratio"] = row["shmq"] / row["mpq"]
        if target and size == 64:
            kind, val = target
            row["target"] = {"kind": kind, "value": val}
            s = row["shmq"]
            if s is None:
                row["target"]["met"] = False
            elif kind == ">=":
                row["target"]["met"] = s >= val
            elif kind == "<":
                row["target"]["met"] = s < val
            elif kind == "ratio>=":
                row["target"]["met"] = (row.get("ratio") or 0) >= val
        if extra:
            row.update(extra)
        self.rows.append(row)

    def run(self) -> None:
        q = self.quick
        try:
            for size in self.args.sizes:
                self.log(f"value size {size} B")
                only = self.args.only.split(",")
                if "single" in only:
                    self.single_process(size, q)
                if "p2p" in only:
                    self.process_to_process(size, q)
                if "latency" in only:
                    self.latencies(size, q)
        finally:
            self.ws.close()

    def single_process(self, size: int, q: bool) -> None:
        ws = self.ws
        n1 = fit_records(size, 0.45 if q else 0.9)
        n1 = min(n1, 300_000 if q else 1_000_000)
        nq = 20_000 if q else 150_000
        self.log(f"append1 x{n1}")
        s = self.measure(lambda n: shmq_append1(ws, size, n), n1)
        m = self.measure(lambda n: mpq_putget1(ws, size, n), nq)
        self.add("single-record append", size, "rec/s", s, m, target=(">=", 2.5e6),
                 note="shmq: log.append loop | mpq: put+get, same process")

        for rows in (1000, 8192):
            nb = (2_000_000 if size <= 64 else 400_000) // (4 if q else 1)
            nbq = (1_000_000 if size <= 64 else 200_000) // (8 if q else 1)
            nbq = max(nbq, rows * 10)
            self.log(f"batch {rows} rows x{nb}")
            s = self.measure(lambda n: shmq_batch(ws, size, n, rows), nb)
            m = self.measure(lambda n: mpq_batch(ws, size, n, rows), nbq)
            self.add(f"batch append, {rows}/batch", size, "rec/s", s, m, target=(">=", 20e6),
                     note="shmq: append_batch(2-D uint8) | mpq: put+get list of bytes")

        nr = min(fit_records(size, 0.8), 300_000 if q else 1_000_000)
        self.log(f"read x{nr} (filling the logs)")
        nbulk = nr if size <= 64 else (32_768 if q else 98_304)
        fl = FilledLog(ws, size, nr)
        try:
            s_rec = [shmq_read(fl, False) for _ in range(1 + self.repeats)][1:]
            s_bulk1 = [shmq_read(fl, True, nbulk) for _ in range(1 + self.repeats)][1:]
        finally:
            fl.close()
        fl = FilledLog(ws, size, nbulk, rows=8192)
        try:
            s_bulk = [shmq_read(fl, True) for _ in range(1 + self.repeats)][1:]
        finally:
            fl.close()
        nmr = 20_000 if q else 150_000
        m_rec = self.measure(lambda n: mpq_read(ws, size, n, 1, self.timeout), nmr)
        m_bulk = self.measure(lambda n: mpq_read(ws, size, n, 8192, self.timeout), max(8192 * 10, nmr))
        self.add("read, records (chunks of 1024)", size, "rec/s", s_rec, m_rec,
                 note="shmq: LogReader.read | mpq: get from a filled queue")
        self.add("read, bulk arrays, 1-record frames", size, "rec/s", s_bulk1, m_bulk,
                 note="shmq: read_arrays(8192) over single appends | mpq: get of 8192-message lists")
        self.add("read, bulk arrays, 8192-record frames", size, "rec/s", s_bulk, m_bulk,
                 note="shmq: read_arrays(8192) over append_batch(8192) | mpq: get of 8192-message lists")

    def process_to_process(self, size: int, q: bool) -> None:
        ws, to = self.ws, self.timeout
        ns = (1_000_000 if size <= 64 else 300_000) // (4 if q else 1)
        nm = (200_000 if size <= 64 else 100_000) // (8 if q else 1)
        self.log(f"p2p single x{ns} / mpq x{nm}")
        s = self.measure(lambda n: p2p(ws, "shmq", size, n, 1, to), ns)
        m = self.measure(lambda n: p2p(ws, "mpq", size, n, 1, to), nm)
        self.add("proc->proc, single-record API", size, "rec/s", s, m, key="rate", target=("ratio>=", 10.0),
                 note="append / read(1024) vs put / get; checksum verified")
        nb = (8_000_000 if size <= 64 else 400_000) // (4 if q else 1)
        nbm = (4_000_000 if size <= 64 else 500_000) // (4 if q else 1)
        self.log(f"p2p bulk x{nb} / mpq x{nbm}")
        s = self.measure(lambda n: p2p(ws, "shmq", size, n, 8192, to), nb)
        m = self.measure(lambda n: p2p(ws, "mpq", size, n, 8192, to), nbm)
        self.add("proc->proc, bulk 8192/batch", size, "rec/s", s, m, key="rate",
                 note="append_batch / read_arrays vs put/get of the same ndarray")

    def latencies(self, size: int, q: bool) -> None:
        ws, to, rate = self.ws, self.timeout, self.args.rate
        secs = 0.5 if q else 1.5
        for spin in (True, False):
            mode = "spinning" if spin else "blocking"
            self.log(f"latency {mode} reader, {rate:.0f}/s for {secs} s")
            runs: Dict[str, List[Any]] = {}
            for system in ("shmq", "mpq"):
                latency(ws, system, size, spin, rate, secs / 4, to)  # warm-up
                runs[system] = [latency(ws, system, size, spin, rate, secs, to) for _ in range(self.repeats)]
            s, m = runs["shmq"], runs["mpq"]
            api = ("read(timeout=0) busy loop vs get_nowait busy loop" if spin
                   else "read(timeout=1.0) vs get()")
            targets = {("spinning", "p50"): ("<", 3.0), ("spinning", "p99"): ("<", 20.0),
                       ("blocking", "p50"): ("<", 30.0)}
            for key, label in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9")):
                self.add(f"latency {label}, {mode} reader", size, "us", s, m, key=key, better="lower",
                         target=targets.get((mode, key)), note=api if key == "p50" else "")

    # ------------------------------------------------------------ output
    def table(self) -> str:
        def fmt(v: Optional[float], unit: str) -> str:
            if v is None:
                return "-"
            if unit == "us":
                return f"{v:,.1f} us"
            if v >= 1e6:
                return f"{v / 1e6:,.2f} M/s"
            return f"{v / 1e3:,.1f} k/s"

        def mark(flags: Dict[str, Any]) -> str:
            out = ""
            if flags.get("partial"):
                out += " PARTIAL"
            if flags and not flags.get("checksum_ok", True):
                out += " BADSUM"
            return out

        head = ["workload", "value", "shmq", "mp.Queue", "shmq/mpq", "target (64 B)"]
        lines = []
        for r in self.rows:
            t = ""
            if "target" in r:
                tg = r["target"]
                if tg["kind"] == "ratio>=":
                    want = f">= {tg['value']:.0f}x mpq"
                elif r["unit"] == "us":
                    want = f"{tg['kind']} {tg['value']:.0f} us"
                else:
                    want = f"{tg['kind']} {fmt(tg['value'], r['unit'])}"
                t = f"{want}: {'met' if tg['met'] else 'MISSED'}"
            ratio = r.get("ratio")
            lines.append([r["workload"], f"{r['size']} B",
                          fmt(r["shmq"], r["unit"]) + mark(r["shmq_flags"]),
                          fmt(r["mpq"], r["unit"]) + mark(r["mpq_flags"]),
                          "-" if ratio is None else f"{ratio:,.2f}x", t])
        widths = [max(len(str(x[i])) for x in lines + [head]) for i in range(len(head))]
        right = {2, 3, 4}
        def row(cells: List[str]) -> str:
            return "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
        out = [row(head), row(["-" * w for w in widths])]
        prev = None
        for cells in lines:
            if prev is not None and cells[1] != prev:
                out.append("")
            prev = cells[1]
            out.append(row(cells))
        return "\n".join(out)


def cpu_busy_seconds() -> float:
    """Non-idle CPU time of the whole machine so far (all CPUs), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def machine_info() -> Dict[str, Any]:
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        import cffi
        cffi_v = cffi.__version__
    except Exception:  # pragma: no cover
        cffi_v = "?"
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        affinity = os.cpu_count()
    rev = "?"
    try:
        import subprocess
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        rev = subprocess.run(["git", "-C", here, "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=5).stdout.strip() or "?"
    except Exception:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "usable_cpus": affinity, "shmq_rev": rev,
            "python": platform.python_version(), "implementation": platform.python_implementation(),
            "numpy": np.__version__, "cffi": cffi_v, "kernel": platform.release(),
            "machine": platform.machine()}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_log", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer records, 1 repeat (under a minute)")
    ap.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ap.add_argument("--sizes", default="64,1024", help="value sizes in bytes (>= 16), comma-separated")
    ap.add_argument("--repeats", type=int, default=0, help="measured runs per figure (default 3, 1 with --quick)")
    ap.add_argument("--rate", type=float, default=10_000.0, help="records/s for the latency runs")
    ap.add_argument("--timeout", type=float, default=60.0, help="bound on every multi-process run, seconds")
    ap.add_argument("--silent", action="store_true", help="no progress lines on stderr")
    ap.add_argument("--only", default="single,p2p,latency",
                    help="comma-separated subset of: single (append, batch, read), p2p, latency")
    args = ap.parse_args(argv)
    args.sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(s < 16 for s in args.sizes):
        ap.error("value sizes must be at least 16 bytes (sequence number + timestamp)")

    info = machine_info()
    started = time.time()
    busy0, own0, load0 = cpu_busy_seconds(), own_cpu_seconds(), loadavg()
    print(f"shmq log vs multiprocessing.Queue -- {time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print(f"machine: {info['cpu']}, {info['cpus']} CPUs ({info['usable_cpus']} usable), {info['machine']}, "
          f"Linux {info['kernel']}")
    print(f"python {info['python']} ({info['implementation']}), numpy {info['numpy']}, cffi {info['cffi']}, "
          f"shmq {info['shmq_rev']}")
    r = Runner(args)
    print(f"mode: {'quick' if args.quick else 'full'}, {r.repeats} repeat(s) after a warm-up, median; "
          f"log: {SEGMENT_COUNT} x {SEGMENT_BYTES >> 20} MiB slots on {os.path.dirname(r.ws.root)}",
          flush=True)
    r.run()
    elapsed = time.time() - started
    others = (cpu_busy_seconds() - busy0) - (own_cpu_seconds() - own0)
    info["load_before"], info["load_after"] = load0, loadavg()
    info["other_cpu_seconds"] = others
    print()
    print(r.table())
    print()
    print("rates in records/s (higher is better); latency in microseconds (lower is better); ratio = shmq / mp.Queue")
    print("append/batch rows: mp.Queue is put+get in one process (put() alone defers pickling and the pipe write")
    print("  to a feeder thread); proc->proc and latency rows use fresh producer and consumer processes (fork).")
    print(f"elapsed {elapsed:.1f} s; load average before {load0}, after {info['load_after']}; "
          f"other processes used {max(0.0, others):.1f} CPU-s meanwhile "
          f"({max(0.0, others) / elapsed:.2f} of {info['cpus']} CPUs)")
    if others / elapsed > 0.25:
        print("WARNING: other processes were busy during the run; figures are disturbed (rerun on a quiet host)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": {k: v for k, v in vars(args).items()},
                       "elapsed_s": elapsed, "rows": r.rows}, f, indent=1, default=float)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
