"""shmq's public API (Producer / Consumer) vs multiprocessing.Queue, one run.

    python -m perf.bench_api [--quick] [--json out.json]

Workloads, 64-byte values:

* ``send``         ``Producer.send(topic, value, partition=0)`` in a loop, one
  process, vs ``mp.Queue`` put+get in chunks of 256 (``put`` alone only hands
  the object to a feeder thread).
* ``p2p``          a producer process (``send``) to a consumer process
  (``consume(2048)``), fresh processes per run, every value checked (count and
  sum of embedded sequence numbers) vs ``mp.Queue`` put/get.
* ``batch``        ``send_batch`` of 2-D uint8 arrays (8192 rows) and
  ``consume_arrays`` in bulk, producer and consumer in separate processes.
* ``commit``       hot-path offset commits: ``Consumer.commit(offsets=...)``
  (asynchronous: a store into the shared offsets table) and
  ``commit(message=...)``.

Each run uses a fresh private root under /dev/shm (removed afterwards, its
coordinator killed). Medians of ``--repeats`` runs (1 with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import statistics
import struct
import tempfile
import time
from typing import Any, Callable, Dict, List

import numpy as np

VALUE = 64
_SEQ = struct.Struct("<Q")


class _Root:
    """A private root with its coordinator, removed on exit."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="shmq-bench-", dir="/dev/shm")
        return self.path

    def __exit__(self, *exc: Any) -> None:
        try:
            with open(os.path.join(self.path, "coordinator.pid")) as f:
                os.kill(int(f.read().split()[0]), signal.SIGKILL)
        except (OSError, ValueError):
            pass
        shutil.rmtree(self.path, ignore_errors=True)


def _topic(root: str, partitions: int = 1, segments: int = 4) -> None:
    from shmq import Admin
    with Admin(root) as admin:
        admin.create_topic("bench", partitions=partitions,
                           config={"segment_bytes": 64 << 20, "segment_count": segments})


def bench_send(n: int) -> float:
    from shmq import Producer
    with _Root() as root:
        _topic(root)
        value = b"x" * VALUE
        with Producer(root) as p:
            send = p.send
            for _ in range(1000):
                send("bench", value, partition=0)
            t = time.perf_counter()
            for _ in range(n):
                send("bench", value, partition=0)
            return n / (time.perf_counter() - t)


def bench_queue_putget(n: int) -> float:
    q: Any = mp.get_context("fork").Queue()
    value = b"x" * VALUE
    t = time.perf_counter()
    for _ in range(n // 256):
        for _ in range(256):
            q.put(value)
        for _ in range(256):
            q.get()
    return (n // 256 * 256) / (time.perf_counter() - t)


def _p2p_producer(root: str, n: int) -> None:
    from shmq import Producer
    pad = b"\0" * (VALUE - 8)
    pack = _SEQ.pack
    with Producer(root) as p:
        send = p.send
        for i in range(n):
            send("bench", pack(i) + pad, partition=0)


def _p2p_consumer(root: str, n: int, out: Any) -> None:
    from shmq import Consumer, TopicPartition
    c = Consumer(root=root, auto_offset_reset="earliest")
    c.assign([TopicPartition("bench", 0)])
    got = total = 0
    unpack = _SEQ.unpack_from
    t0 = None
    deadline = time.monotonic() + 60
    while got < n and time.monotonic() < deadline:
        msgs = c.consume(2048, timeout=0.5)
        if msgs and t0 is None:
            t0 = time.perf_counter()
        for m in msgs:
            total += unpack(m.value)[0]
        got += len(msgs)
    out.put((got, total, time.perf_counter() - (t0 or time.perf_counter())))
    c.close()


def bench_p2p(n: int) -> Dict[str, Any]:
    ctx = mp.get_context("fork")
    import shmq.consumer  # noqa: F401  (warm imports before fork)
    import shmq.producer  # noqa: F401
    with _Root() as root:
        _topic(root)
        out: Any = ctx.Queue()
        cons = ctx.Process(target=_p2p_consumer, args=(root, n, out))
        prod = ctx.Process(target=_p2p_producer, args=(root, n))
        t = time.perf_counter()
        cons.start()
        prod.start()
        got, total, _ = out.get(timeout=120)
        el = time.perf_counter() - t
        prod.join(10)
        cons.join(10)
        ok = got == n and total == n * (n - 1) // 2
        return {"rate": got / el, "ok": ok}


def _queue_producer(q: Any, n: int) -> None:
    pad = b"\0" * (VALUE - 8)
    pack = _SEQ.pack
    for i in range(n):
        q.put(pack(i) + pad)


def bench_queue_p2p(n: int) -> Dict[str, Any]:
    ctx = mp.get_context("fork")
    q: Any = ctx.Queue(maxsize=100_000)
    prod = ctx.Process(target=_queue_producer, args=(q, n))
    t = time.perf_counter()
    prod.start()
    total = 0
    unpack = _SEQ.unpack_from
    for _ in range(n):
        total += unpack(q.get(timeout=60))[0]
    el = time.perf_counter() - t
    prod.join(10)
    return {"rate": n / el, "ok": total == n * (n - 1) // 2}


def _batch_producer(root: str, n: int, rows: int) -> None:
    from shmq import Producer
    arr = np.zeros((rows, VALUE), dtype=np.uint8)
    with Producer(root) as p:
        for b in range(n // rows):
            arr[:, :8] = np.arange(b * rows, (b + 1) * rows, dtype=np.uint64).view(np.uint8).reshape(rows, 8)
            p.send_batch("bench", arr, partition=0)


def bench_batch(n: int, rows: int = 8192) -> Dict[str, Any]:
    from shmq import Consumer, TopicPartition
    ctx = mp.get_context("fork")
    n = n // rows * rows
    with _Root() as root:
        # Overwrite retention: the ring (16 x 64 MiB) holds the whole run, so a
        # consumer that falls behind loses nothing.
        _topic(root, segments=16)
        c = Consumer(root=root, auto_offset_reset="earliest")
        c.assign([TopicPartition("bench", 0)])
        prod = ctx.Process(target=_batch_producer, args=(root, n, rows))
        t = time.perf_counter()
        prod.start()
        got = 0
        total = 0
        deadline = time.monotonic() + 60
        while got < n and time.monotonic() < deadline:
            r = c.consume_arrays(65536, timeout=0.5)
            if r is None:
                continue
            vals = r[1].values
            total += int(np.ascontiguousarray(vals[:, :8]).view(np.uint64).sum())
            got += len(r[1].offsets)
        el = time.perf_counter() - t
        prod.join(10)
        c.close()
        return {"rate": got / el, "ok": got == n and total == n * (n - 1) // 2}


def bench_commit(n: int) -> Dict[str, float]:
    from shmq import Consumer, Producer, TopicPartition
    with _Root() as root:
        _topic(root)
        with Producer(root) as p:
            p.send("bench", b"x", partition=0)
        c = Consumer(group_id="bench", root=root, auto_offset_reset="earliest", enable_auto_commit=False)
        tp = TopicPartition("bench", 0)
        c.assign([tp])
        msg = c.poll(1.0)
        c.commit(offsets={tp: 0})
        commit = c.commit
        t = time.perf_counter()
        for i in range(n):
            commit(offsets={tp: i})
        r_offsets = n / (time.perf_counter() - t)
        t = time.perf_counter()
        for _ in range(n):
            commit(message=msg)
        r_msg = n / (time.perf_counter() - t)
        t = time.perf_counter()
        k = max(1, n // 1000)
        for i in range(k):
            commit(offsets={tp: i}, asynchronous=False)
        r_sync = k / (time.perf_counter() - t)
        c.close()
        return {"offsets": r_offsets, "message": r_msg, "sync": r_sync}


def _median(fn: Callable[[], Any], repeats: int) -> Any:
    runs = [fn() for _ in range(repeats)]
    if isinstance(runs[0], dict):
        keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        out = {k: statistics.median(r[k] for r in runs) for k in keys}
        if "ok" in runs[0]:
            out["ok"] = all(r["ok"] for r in runs)
        return out
    return statistics.median(runs)


def main(argv: List[str] = None) -> int:  # type: ignore[assignment]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    reps = args.repeats or (1 if args.quick else 3)
    n = 200_000 if args.quick else 1_000_000
    print(f"shmq public API vs multiprocessing.Queue, 64-byte values; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}; median of {reps}")
    res: Dict[str, Any] = {}
    res["send"] = _median(lambda: bench_send(n), reps)
    res["queue_putget"] = _median(lambda: bench_queue_putget(n // 4), reps)
    res["p2p"] = _median(lambda: bench_p2p(n), reps)
    res["queue_p2p"] = _median(lambda: bench_queue_p2p(n // 4), reps)
    res["batch"] = _median(lambda: bench_batch(n * 5), reps)
    res["commit"] = _median(lambda: bench_commit(n // 2), reps)
    rows = [
        ("Producer.send, one process", res["send"], res["queue_putget"], "mp.Queue put+get"),
        ("producer -> consumer process (send / consume)", res["p2p"]["rate"], res["queue_p2p"]["rate"],
         "mp.Queue put / get"),
        ("send_batch -> consume_arrays (8192 rows)", res["batch"]["rate"], res["queue_p2p"]["rate"],
         "mp.Queue put / get"),
        ("commit(offsets=...) asynchronous", res["commit"]["offsets"], None, ""),
        ("commit(message=...) asynchronous", res["commit"]["message"], None, ""),
        ("commit(asynchronous=False)", res["commit"]["sync"], None, ""),
    ]
    print(f"{'workload':<48} {'shmq /s':>14} {'peer /s':>14} {'ratio':>8}  peer")
    for name, ours, peer, peer_name in rows:
        ratio = f"{ours / peer:7.1f}x" if peer else ""
        print(f"{name:<48} {ours:>14,.0f} {'' if peer is None else f'{peer:,.0f}':>14} {ratio:>8}  {peer_name}")
    checks = {"p2p": res["p2p"]["ok"], "queue_p2p": res["queue_p2p"]["ok"], "batch": res["batch"]["ok"]}
    print("verified (count and checksum): " + ", ".join(f"{k} {'ok' if v else 'LOST DATA'}" for k, v in checks.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
