"""Chaos: replica processes (leaders included) SIGKILLed at random while two
producer processes send with acks="all" and idempotence, and a consumer reads.

Afterwards every acknowledged record must be present exactly once in every
in-sync replica, at the same offsets, and every record the consumer read must
still be there. The test prints what it measured.
"""
from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from typing import Any, Dict, List, Tuple

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import NotEnoughReplicas
from shmq.root import Root
from tests.test_replication import records_of, replica_dirs, status, wait_isr, wait_until

TOPIC = "chaos"
PRODUCERS = 2
RECORDS = 200_000
CHAOS_S = 20.0
BATCH = 16


def _produce(root: str, index: int, count: int, out: str) -> None:
    """Send ``count`` records to partition ``index``: single sends and small
    batches in turn; record (offset, value) of each acknowledged one."""
    acked: List[Tuple[int, str]] = []
    with Producer(root, acks="all", delivery_timeout_ms=120_000) as prod:
        i = op = 0
        while i < count:
            op += 1
            n = 1 if op % 4 == 0 else min(BATCH, count - i)
            values = [b"%d:%d" % (index, i + k) for k in range(n)]
            try:
                if n == 1:
                    offsets = [prod.send(TOPIC, values[0], partition=index).offset]
                else:
                    base = prod.send_batch(TOPIC, values, partition=index)[0].offset
                    offsets = list(range(base, base + n))
            except NotEnoughReplicas:
                time.sleep(0.002)             # retriable in Kafka: the ISR grows back
                continue
            acked.extend((o, v.decode()) for o, v in zip(offsets, values))
            i += n
    with open(out, "w") as f:
        json.dump(acked, f)


def _consume(root: str, out: str, stop_file: str) -> None:
    seen: List[Tuple[int, int, str]] = []
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(TOPIC, p) for p in range(PRODUCERS)])
        while not os.path.exists(stop_file):
            for m in c.consume(4096, timeout=0.05):
                seen.append((m.partition, m.offset, m.value.decode()))
    with open(out, "w") as f:
        json.dump(seen, f)


def _pct(xs: List[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def test_acknowledged_records_survive_random_replica_kills(root: Root, reaper: Any, tmp_path: Any) -> None:
    with Admin(root) as admin:
        admin.create_topic(TOPIC, PRODUCERS, config={"replication_factor": 3, "min_insync_replicas": 2,
                                                     "segment_bytes": 4 << 20, "segment_count": 8})
        for p in range(PRODUCERS):
            wait_isr(admin, TOPIC, 3, p)
    outs = [str(tmp_path / f"acked-{i}.json") for i in range(PRODUCERS)]
    seen_out, stop_file = str(tmp_path / "seen.json"), str(tmp_path / "stop")
    producers = [reaper.start(_produce, root.path, i, RECORDS // PRODUCERS, outs[i]) for i in range(PRODUCERS)]
    consumer = reaper.start(_consume, root.path, seen_out, stop_file)

    kills: List[Tuple[float, int]] = []
    rng = random.Random(20261125)

    def chaos() -> None:
        end = time.monotonic() + CHAOS_S
        while time.monotonic() < end:
            time.sleep(rng.uniform(0.3, 0.8))
            reps = status(root)["replicas"]
            live = [(int(r), v["pid"]) for r, v in reps.items() if v["registered"]]
            if not live:
                continue
            rid, pid = rng.choice(live)
            try:
                os.kill(pid, signal.SIGKILL)
                kills.append((time.time(), rid))
            except ProcessLookupError:
                pass

    t = threading.Thread(target=chaos, daemon=True)
    t.start()
    t.join(CHAOS_S + 30)
    for p in producers:
        p.join(timeout=180)
        assert p.exitcode == 0, f"producer exit code {p.exitcode}"
    with Admin(root) as admin:
        for p in range(PRODUCERS):
            wait_isr(admin, TOPIC, 3, p, timeout=30)
    open(stop_file, "w").close()
    consumer.join(timeout=60)
    assert consumer.exitcode == 0

    acked = [json.load(open(o)) for o in outs]
    seen = json.load(open(seen_out))
    failovers = [f for f in status(root)["failovers"] if "died" in f["reason"]]
    lost = dups = 0
    with Admin(root) as admin:
        for p in range(PRODUCERS):
            d = admin.describe_topic(TOPIC).partitions[p]
            dirs = replica_dirs(root, admin, TOPIC, p)
            wait_until(lambda: len({len(records_of(dirs[r])) for r in d.isr}) == 1, 30, "replicas to converge")
            logs = {r: records_of(dirs[r]) for r in d.isr}
            first = logs[d.isr[0]]
            for r in d.isr[1:]:
                assert logs[r] == first, f"replica {r} differs from replica {d.isr[0]} in partition {p}"
            at: Dict[int, str] = {o: v.decode() for o, v in first}
            values = [v for _, v in first]
            dups += len(values) - len(set(values))
            lost += sum(1 for o, v in acked[p] if at.get(o) != v)
            for part, o, v in seen:
                if part == p:
                    assert at.get(o) == v, f"the consumer read {v!r} at {p}/{o}, which the log no longer holds"
    # Failover time: from a kill of a leader's process to the election that replaced it (the
    # coordinator's record naming that death, before the same replica's next kill).
    times: List[float] = []
    for k, (ts, rid) in enumerate(kills):
        nxt = next((t2 for t2, r2 in kills[k + 1:] if r2 == rid), float("inf"))
        after = [f["at"] - ts for f in failovers
                 if ts <= f["at"] < nxt and f"leader replica {rid} died" in f["reason"]]
        if after:
            times.append(min(after) * 1e3)
    print(f"\nchaos: acknowledged={sum(map(len, acked))} lost={lost} duplicates={dups} kills={len(kills)} "
          f"failovers={len(times)} failover_ms p50={_pct(times, 0.5):.1f} p99={_pct(times, 0.99):.1f} "
          f"consumer_read={len(seen)}")
    assert sum(map(len, acked)) == RECORDS
    assert lost == 0 and dups == 0
    assert kills and times
