"""Idle CPU of a root's broker processes: ``python -m perf.bench_idle [--seconds 60]``.

Setup, per scenario, on a fresh root under /dev/shm: the embedded
coordinator started by a client, then (``topics``) a topic of 4 partitions
and a replicated one (4 partitions, replication factor 2: two replica
processes, each leading two partitions and following two), one record in
each partition; every client is closed and the processes settle for 2 s.
Then the CPU time (the scheduler's nanosecond counters of every thread)
and the voluntary context switches (wake-ups) of the coordinator and of each replica process are read
before and after ``--seconds`` of idleness. Prints one row per process:
share of one core and wake-ups per second. Target: under 0.2 % of a core
for the coordinator and its replica processes together. Then (``topics``)
how long the first ``acks="all"`` send after the idle period takes: the
followers must wake for it (event-driven: milliseconds, not a polling
period).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import psutil

SCENARIOS = ("empty", "topics")


def _cpu_s(pid: int) -> float:
    """CPU time of every thread of ``pid`` in seconds: from the scheduler's
    nanosecond counters (``/proc/<pid>/task/*/schedstat``), else psutil's ticks."""
    try:
        total = 0
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        t = psutil.Process(pid).cpu_times()
        return t.user + t.system


def _wakeups(pid: int) -> int:
    """Voluntary context switches of every thread of ``pid`` (each is a sleep that ended)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as f:
                for line in f:
                    if line.startswith("voluntary_ctxt_switches:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


def _sample(pids: List[int]) -> Dict[int, Any]:
    out = {}
    for pid in pids:
        try:
            out[pid] = (_cpu_s(pid), _wakeups(pid))
        except (psutil.Error, OSError):
            pass
    return out


def measure(root: Any, seconds: float) -> Dict[str, Any]:
    """CPU share (of one core) and wake-ups/s of every broker process of
    ``root`` over ``seconds`` s: {"total": %, "processes": [{pid, kind, cpu_pct, wakeups_per_s}]}."""
    from shmq.coordinator.lifecycle import root_processes
    kinds = root_processes(root)
    before = _sample(list(kinds))
    t0 = time.monotonic()
    time.sleep(seconds)
    after = _sample(list(kinds))
    elapsed = time.monotonic() - t0
    rows = []
    for pid, (cpu1, sw1) in after.items():
        if pid not in before:
            continue
        cpu0, sw0 = before[pid]
        rows.append({"pid": pid, "kind": kinds[pid], "cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
                     "wakeups_per_s": (sw1 - sw0) / elapsed})
    rows.sort(key=lambda r: (r["kind"], r["pid"]))
    return {"seconds": elapsed, "total": sum(r["cpu_pct"] for r in rows), "processes": rows}


def setup(root_path: str, scenario: str) -> None:
    """Start the root's coordinator as a client would; with ``topics``, create topics holding a record each."""
    from shmq.admin import Admin
    from shmq.producer import Producer
    with Admin(root_path) as admin:
        if scenario == "topics":
            admin.create_topic("plain", partitions=4)
            admin.create_topic("replicated", partitions=4, config={"replication_factor": 2})
        else:
            admin.list_topics()
    if scenario == "topics":
        with Producer(root_path, acks="all") as producer:
            for topic in ("plain", "replicated"):
                for p in range(4):
                    producer.send(topic, b"idle", partition=p)


def first_send_ms(root_path: str) -> float:
    """Milliseconds of one acks="all" send to the replicated topic (its producer already connected)."""
    from shmq.producer import Producer
    with Producer(root_path, acks="all") as producer:
        producer.send("replicated", b"warm-up", partition=0)   # maps the log; replicas wake, then idle again
        time.sleep(3.0)
        t0 = time.perf_counter()
        producer.send("replicated", b"after idle", partition=1)
        return (time.perf_counter() - t0) * 1000


def run(seconds: float, scenarios: List[str], workdir: Optional[str] = None) -> List[Dict[str, Any]]:
    from shmq.coordinator.lifecycle import stop_root
    from shmq.root import Root
    results = []
    for scenario in scenarios:
        path = tempfile.mkdtemp(prefix="shmq-bench-idle-", dir=workdir or ("/dev/shm" if os.path.isdir("/dev/shm")
                                                                            else None))
        root = Root(path)
        try:
            setup(path, scenario)
            time.sleep(2.0)                                   # start-up work settles
            res = measure(root, seconds)
            res["scenario"] = scenario
            if scenario == "topics":
                res["first_send_ms"] = first_send_ms(path)
            results.append(res)
        finally:
            stop_root(root)
            shutil.rmtree(path, ignore_errors=True)
    return results


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf.bench_idle", description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="idle time measured per scenario")
    ap.add_argument("--scenario", choices=SCENARIOS, action="append", help="default: all")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)
    results = run(args.seconds, args.scenario or list(SCENARIOS))
    print(f"Idle CPU of a root's broker processes over {args.seconds:.0f} s (share of one core; target < 0.2 %)")
    print(f"{'scenario':<8} {'process':<12} {'pid':>8} {'cpu':>9} {'wake-ups/s':>11}")
    for res in results:
        for r in res["processes"]:
            print(f"{res['scenario']:<8} {r['kind']:<12} {r['pid']:>8} {r['cpu_pct']:>8.3f}% {r['wakeups_per_s']:>11.1f}")
        print(f"{res['scenario']:<8} {'total':<12} {'':>8} {res['total']:>8.3f}%")
        if "first_send_ms" in res:
            print(f"{res['scenario']:<8} first acks=all send after 3 s idle: {res['first_send_ms']:.2f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
