"""Consumer-group rebalance latencies: ``python -m perf.bench_groups [--runs 20]``.

Setup: a topic of 8 partitions, a producer process sending a steady stream
(keyed records, ~20k/s), 3 long-lived member processes. Each run starts one
more member (the "victim"), waits until the group is balanced, then SIGKILLs
it. Every member reports over a queue, with CLOCK_MONOTONIC timestamps:
its subscribe() call, each on_assign, and for members that keep their
partitions the largest gap between consecutive records of kept partitions.

Figures per run:
* join: the victim's subscribe() -> its first partition assigned (sticky, incremental);
* death: SIGKILL -> the last of the victim's partitions assigned to a survivor;
* gap: largest gap between records of partitions a survivor kept, in the
  second around the join and the kill (the producer's own pacing bounds it
  from below: ~1 ms between batches).
Prints p50 / p99 / max over the runs.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

TOPIC = "bench"


def member(root: str, name: str, q: Any, stop: Any) -> None:
    from shmq.consumer import Consumer
    c = Consumer(group_id="bench", root=root, auto_offset_reset="latest", client_id=name)
    owned: Dict[Any, float] = {}
    last: Dict[Any, float] = {}
    gaps: Dict[Any, float] = {}

    def on_assign(tps: List[Any]) -> None:
        now = time.monotonic()
        for tp in tps:
            owned[tp] = now
        q.put(("A", name, [tuple(tp) for tp in tps], now))

    def on_revoke(tps: List[Any]) -> None:
        for tp in tps:
            owned.pop(tp, None)
            last.pop(tp, None)

    q.put(("J", name, None, time.monotonic()))
    c.subscribe([TOPIC], on_assign=on_assign, on_revoke=on_revoke)
    next_report = time.monotonic() + 0.25
    while not stop.is_set():
        msgs = c.consume(1000, timeout=0.002)
        now = time.monotonic()
        seen = {(m.topic, m.partition) for m in msgs}
        for tp in seen:
            if tp in last:
                gaps[tp] = max(gaps.get(tp, 0.0), now - last[tp])
            last[tp] = now
        if now >= next_report:
            # Gap per partition kept for the whole window (a partition that
            # arrived in the window is not "kept").
            kept = [g for tp, g in gaps.items() if owned.get(tuple(tp), now) < next_report - 0.25]
            q.put(("G", name, max(kept) if kept else None, now))
            gaps.clear()
            next_report = now + 0.25
    c.close()


def producer(root: str, stop: Any) -> None:
    from shmq.producer import Producer
    p = Producer(root)
    i = 0
    while not stop.is_set():
        for _ in range(20):
            p.send(TOPIC, b"x" * 32, key=str(i % 1000).encode())
            i += 1
        time.sleep(0.001)
    p.close()


def pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args(argv)
    from shmq.admin import Admin
    from shmq.root import Root
    root = tempfile.mkdtemp(prefix="shmq-groupbench-", dir="/dev/shm")
    admin = Admin(root)
    admin.create_topic(TOPIC, 8, {"segment_bytes": 4 << 20, "segment_count": 4})
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    stop = ctx.Event()
    procs = [ctx.Process(target=member, args=(root, f"m{i}", q, stop), daemon=True) for i in range(3)]
    procs.append(ctx.Process(target=producer, args=(root, stop), daemon=True))
    for p in procs:
        p.start()

    def balanced(n: int) -> bool:
        d = admin.describe_group("bench")
        sizes = sorted(len(m.assignment) for m in d.members)
        return len(d.members) == n and sum(sizes) == 8 and sizes[-1] - sizes[0] <= 1 and \
            not any(m.revoking for m in d.members)

    def wait(cond: Any, timeout: float = 20) -> None:
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise SystemExit("timed out")
            time.sleep(0.01)

    events: List[Any] = []

    def drain(until: float) -> None:
        while True:
            try:
                events.append(q.get(timeout=max(0.0, until - time.monotonic())))
            except queue.Empty:
                return

    wait(lambda: balanced(3))
    drain(time.monotonic() + 1.0)
    joins, deaths, gaps = [], [], []
    try:
        for run in range(args.runs):
            events.clear()
            name = f"v{run}"
            v = ctx.Process(target=member, args=(root, name, q, stop), daemon=True)
            v.start()
            wait(lambda: balanced(4))
            drain(time.monotonic() + 0.6)
            jt = next(e[3] for e in events if e[0] == "J" and e[1] == name)
            at = min(e[3] for e in events if e[0] == "A" and e[1] == name)
            joins.append((at - jt) * 1000)
            moved = {tp for e in events if e[0] == "A" and e[1] == name for tp in e[2]}
            events.clear()
            t_kill = time.monotonic()
            os.kill(v.pid, signal.SIGKILL)
            v.join()
            wait(lambda: balanced(3))
            drain(time.monotonic() + 0.6)
            got = [e[3] for e in events if e[0] == "A" and e[3] > t_kill for tp in e[2] if tp in moved]
            deaths.append((max(got) - t_kill) * 1000 if got else float("nan"))
            gaps.extend(e[2] * 1000 for e in events if e[0] == "G" and e[2] is not None)
            print(f"run {run:2d}: join {joins[-1]:6.1f} ms  death->reassigned {deaths[-1]:6.1f} ms", flush=True)
    finally:
        stop.set()
        for p in procs:
            p.join(5)
        admin.close()
        pid = Root(root).coordinator_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
        import shutil
        shutil.rmtree(root, ignore_errors=True)
    for label, xs in (("member join (subscribe -> first assignment)", joins),
                      ("member death (SIGKILL -> partitions reassigned)", deaths),
                      ("largest gap of members keeping partitions (per 250 ms window)", gaps)):
        xs = [x for x in xs if x == x]
        print(f"{label}: p50 {statistics.median(xs):.1f} ms  p99 {pct(xs, 0.99):.1f} ms  "
              f"max {max(xs):.1f} ms  (n={len(xs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
