"""Replication cost and failover time, side by side in one run.

    python -m perf.bench_replication [--quick] [--json out.json]

Workloads, 64-byte values, one partition, one producer (this process):

* ``send``   ``Producer.send`` one record at a time; throughput and per-send
  latency (p50/p99), for: replication factor 1 (no replica processes),
  factor 2 and 3 with ``acks=1``, factor 2 and 3 with ``acks="all"``
  (idempotent, the default with acks="all": each send returns only once the
  high watermark passed it).
* ``async``  ``Producer.send_async`` one record at a time, then ``flush``
  (acknowledgements overlap: followers copy many records per round trip).
* ``batch``  ``send_batch`` of a list of 1000 records, same matrix.
* ``array``  ``send_batch`` of a 2-D uint8 numpy array of 8192 rows, same matrix.
* ``failover``  factor 3, ``acks="all"``: the leader's replica process is
  SIGKILLed while the producer sends; the time from the kill to the first
  send that completes on the new leader (its acknowledgement included).
  Repeated ``--kills`` times, waiting for the ISR to be whole again between.

Each configuration runs in a fresh private root under /dev/shm, removed
afterwards with its coordinator and replica processes.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

import psutil

VALUE = b"x" * 64


class _Root:
    """A private root; its coordinator and replica processes are killed on exit."""

    def __enter__(self) -> str:
        self.path = tempfile.mkdtemp(prefix="shmq-bench-", dir="/dev/shm")
        return self.path

    def __exit__(self, *exc: Any) -> None:
        for proc in psutil.process_iter(["cmdline"]):
            cmd = proc.info.get("cmdline") or []
            if self.path in cmd and ("shmq.replica" in cmd or "shmq.coordinator" in cmd):
                try:
                    proc.kill()
                except psutil.Error:
                    pass
        shutil.rmtree(self.path, ignore_errors=True)


def _topic(root: str, rf: int) -> None:
    from shmq import Admin
    with Admin(root) as admin:
        admin.create_topic("bench", 1, config={"replication_factor": rf, "min_insync_replicas": min(rf, 2),
                                               "segment_bytes": 64 << 20, "segment_count": 8})
        _wait_isr(admin, rf)


def _wait_isr(admin: Any, rf: int, leader: Optional[int] = None, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        d = admin.describe_topic("bench").partitions[0]
        if len(d.isr) == rf and d.leader >= 0 and (leader is None or d.leader == leader):
            return d
        if time.monotonic() > deadline:
            raise RuntimeError(f"ISR not whole after {timeout}s: {d}")
        time.sleep(0.01)


def _producing(rf: int, acks: Any, body: Callable[[Any], Dict[str, float]]) -> Dict[str, float]:
    """Run ``body(producer)`` against a fresh root with topic ``bench`` at ``rf``."""
    from shmq import Producer
    with _Root() as root:
        _topic(root, rf)
        with Producer(root, acks=acks) as p:
            return body(p)


def bench_send(rf: int, acks: Any, n: int) -> Dict[str, float]:
    def body(p: Any) -> Dict[str, float]:
        send = p.send
        for _ in range(min(1000, n)):
            send("bench", VALUE, partition=0)
        lat = [0] * n
        clock = time.perf_counter_ns
        t = time.perf_counter()
        for i in range(n):
            t0 = clock()
            send("bench", VALUE, partition=0)
            lat[i] = clock() - t0
        el = time.perf_counter() - t
        lat.sort()
        return {"rate": n / el, "p50_us": lat[n // 2] / 1e3, "p99_us": lat[int(n * 0.99)] / 1e3}
    return _producing(rf, acks, body)


def bench_async(rf: int, acks: Any, n: int) -> Dict[str, float]:
    """``send_async`` one record at a time, then ``flush``: acknowledgements overlap."""
    def body(p: Any) -> Dict[str, float]:
        for _ in range(min(1000, n)):
            p.send_async("bench", VALUE, partition=0)
        p.flush()
        send = p.send_async
        t = time.perf_counter()
        for _ in range(n):
            send("bench", VALUE, partition=0)
        p.flush()
        return {"rate": n / (time.perf_counter() - t)}
    return _producing(rf, acks, body)


def bench_batch(rf: int, acks: Any, n: int, rows: int = 1000) -> Dict[str, float]:
    values = [VALUE] * rows

    def body(p: Any) -> Dict[str, float]:
        p.send_batch("bench", values, partition=0)
        t = time.perf_counter()
        for _ in range(n // rows):
            p.send_batch("bench", values, partition=0)
        return {"rate": n // rows * rows / (time.perf_counter() - t)}
    return _producing(rf, acks, body)


def bench_array(rf: int, acks: Any, seconds: float, rows: int = 8192) -> Dict[str, float]:
    import numpy as np
    arr = np.zeros((rows, len(VALUE)), dtype=np.uint8)

    def body(p: Any) -> Dict[str, float]:
        p.send_batch("bench", arr, partition=0)
        n = 0
        t = time.perf_counter()
        while time.perf_counter() - t < seconds:
            p.send_batch("bench", arr, partition=0)
            n += rows
        return {"rate": n / (time.perf_counter() - t)}
    return _producing(rf, acks, body)


def bench_failover(kills: int) -> Dict[str, Any]:
    from shmq import Admin, Producer
    from shmq.coordinator.client import CoordinatorClient
    times: List[float] = []
    with _Root() as root:
        _topic(root, 3)
        with Admin(root) as admin, Producer(root, acks="all") as p, CoordinatorClient(root) as c:
            killed: List[int] = []
            for _ in range(kills):
                d = _wait_isr(admin, 3, leader=admin.describe_topic("bench").partitions[0].replicas[0])
                for _ in range(200):
                    p.send("bench", VALUE, partition=0)
                while True:                      # the leader's current process (registered, not one we killed)
                    r = c.status()["replicas"][str(d.leader)]
                    if r["registered"] and r["pid"] not in killed:
                        break
                    time.sleep(0.01)
                killed.append(r["pid"])
                os.kill(r["pid"], signal.SIGKILL)
                t0 = time.perf_counter()
                # Sends may still complete on the old leader's log (its followers copy it until
                # the coordinator fences it): keep sending until one is stored on the new leader.
                while True:
                    p.send("bench", VALUE, partition=0)
                    if p._cluster.topic("bench").leaders[0] not in (-1, d.leader):
                        p.send("bench", VALUE, partition=0)
                        break
                times.append((time.perf_counter() - t0) * 1e3)
                # next round: the restarted process rejoins and the preferred leader returns
    times.sort()
    return {"kills": kills, "p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))],
            "max_ms": times[-1], "all_ms": times}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kills", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    n = 20_000 if args.quick else 100_000
    kills = args.kills or (3 if args.quick else 10)
    print(f"shmq replication, 64-byte values, one partition; {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    configs = [(1, 1), (2, 1), (2, "all"), (3, 1), (3, "all")]
    res: Dict[str, Any] = {"send": {}, "async": {}, "batch": {}, "array": {}}
    for rf, acks in configs:
        key = f"rf{rf}-acks{acks}"
        res["send"][key] = bench_send(rf, acks, n)
        res["async"][key] = bench_async(rf, acks, n)
        res["batch"][key] = bench_batch(rf, acks, n * 10)
        res["array"][key] = bench_array(rf, acks, 1.0 if args.quick else 3.0)
    res["failover"] = bench_failover(kills)
    print(f"{'configuration':<20} {'send /s':>10} {'p50 us':>7} {'p99 us':>7} {'async /s':>10} {'batch /s':>11} "
          f"{'array /s':>12}")
    for rf, acks in configs:
        key = f"rf{rf}-acks{acks}"
        s, b, a = res["send"][key], res["batch"][key], res["array"][key]
        print(f"{f'rf={rf} acks={acks}':<20} {s['rate']:>10,.0f} {s['p50_us']:>7.1f} {s['p99_us']:>7.1f} "
              f"{res['async'][key]['rate']:>10,.0f} {b['rate']:>11,.0f} {a['rate']:>12,.0f}")
    for rf in (2, 3):
        r = {w: res[w][f"rf{rf}-acksall"]["rate"] / res[w][f"rf{rf}-acks1"]["rate"]
             for w in ("send", "async", "batch", "array")}
        print(f"acks=all / acks=1 at rf={rf}: send {r['send']:.0%}, send_async {r['async']:.0%}, batch of 1000 "
              f"{r['batch']:.0%}, array of 8192 {r['array']:.0%}  (target at rf=3: >= 25%)")
    f = res["failover"]
    print(f"failover (kill -9 of the leader's process -> first acks=all send stored on the new leader), "
          f"{f['kills']} kills: p50 {f['p50_ms']:.1f} ms, p99 {f['p99_ms']:.1f} ms, max {f['max_ms']:.1f} ms "
          f"(target p99 < 100 ms)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
