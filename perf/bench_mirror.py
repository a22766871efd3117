"""Mirror throughput, one way at a time: ``python -m perf.bench_mirror [--records 150000] [--value-size 64]``.

The Kafka side is librdkafka's mock cluster (in this process, from the
confluent-kafka wheel); the shmq side a fresh root under /dev/shm. Per
direction the source is filled first, then a ``KafkaToShmq`` /
``ShmqToKafka`` runs in a thread of this process and the time from its
first copied record to the last is measured (topic creation and the
resume logic at start are not counted). Next to each, the ceiling the peer
allows: a plain confluent-kafka consumer reading the same records from the
mock, and a plain producer writing them to it. Target (issue 12): 500 k
records/s one way. The mock bounds the Kafka -> shmq row (its Fetch is
slower than that) and keeps about 5 MB per partition (older records are
deleted), hence the default count.

Measured on the 2-core shared dev host under load (load average ~11),
150,000 x 64 B: kafka -> shmq 118 k/s (plain consumer from the mock: 97 k/s),
shmq -> kafka 156 k/s (plain producer to the mock: 432 k/s).
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List

from shmq.mirror import quiet_kafka_logger

PARTITIONS = 3


_quiet = quiet_kafka_logger()


def _mock() -> Any:
    import confluent_kafka as ck
    owner = ck.Producer({"bootstrap.servers": "", "test.mock.num.brokers": 1, "logger": _quiet})
    md = owner.list_topics(timeout=10)
    return owner, ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())


def _produce_kafka(bs: str, topic: str, n: int, value: bytes) -> float:
    import confluent_kafka as ck
    p = ck.Producer({"bootstrap.servers": bs, "linger.ms": 5, "logger": _quiet})
    t0 = time.perf_counter()
    for i in range(n):
        while True:
            try:
                p.produce(topic, value, b"k%d" % i, i % PARTITIONS, timestamp=1_700_000_000_000 + i)
                break
            except BufferError:
                p.poll(0.01)
    p.flush(60)
    return n / (time.perf_counter() - t0)


def _consume_kafka(bs: str, topic: str, n: int) -> float:
    import confluent_kafka as ck
    c = ck.Consumer({"bootstrap.servers": bs, "group.id": "bench", "logger": _quiet})
    c.assign([ck.TopicPartition(topic, q, 0) for q in range(PARTITIONS)])
    got, t0 = 0, time.perf_counter()
    while got < n and time.perf_counter() - t0 < 120:
        # consume(n) waits for all n records or the timeout: keep it short, or
        # the ceiling times the wait for a batch that never fills.
        got += sum(1 for m in c.consume(20_000, 0.01) if m.error() is None)
    rate = got / (time.perf_counter() - t0)
    c.close()
    return rate


def _timed(mirror: Any, count: Callable[[], int], n: int) -> float:
    """Run ``mirror`` in a thread; seconds from its first copied record to ``n``."""
    t = threading.Thread(target=mirror.run, daemon=True)
    t.start()
    first = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        c = count()
        if first is None and c > 0:
            first = (time.perf_counter(), c)
        if c >= n:
            break
        time.sleep(0.002)
    end = time.perf_counter()
    mirror.stop()
    t.join(60)
    assert first is not None
    return (n - first[1]) / max(end - first[0], 1e-9)


def from_kafka(n: int, value: bytes) -> Dict[str, float]:
    from shmq.cluster import Cluster
    from shmq.mirror import KafkaToShmq
    owner, bs = _mock()
    root = tempfile.mkdtemp(prefix="shmq-bench-mirror-", dir="/dev/shm")
    try:
        _produce_kafka(bs, "bench.in", n, value)
        ceiling = _consume_kafka(bs, "bench.in", n)
        m = KafkaToShmq(bs, "bench.in", root, progress_interval=0)
        cluster: List[Any] = []

        def count() -> int:
            if not cluster:
                try:
                    cl = Cluster(root)
                    cl.topic("bench.in")
                    cluster.append(cl)
                except Exception:
                    return 0
            return sum(cluster[0].log("bench.in", q).end_offset for q in range(PARTITIONS))
        rate = _timed(m, count, n)
        for cl in cluster:
            cl.close()
        return {"mirror": rate, "peer ceiling (plain consumer from the mock)": ceiling}
    finally:
        _stop_root(root)
        del owner


def to_kafka(n: int, value: bytes) -> Dict[str, float]:
    import confluent_kafka as ck

    from shmq import Admin, Producer
    from shmq.mirror import ShmqToKafka
    owner, bs = _mock()
    root = tempfile.mkdtemp(prefix="shmq-bench-mirror-", dir="/dev/shm")
    try:
        Admin(root).create_topic("bench.out", PARTITIONS)
        with Producer(root) as p:
            for q in range(PARTITIONS):
                for i in range(0, n // PARTITIONS, 1000):
                    p.send_batch("bench.out", [value] * 1000, keys=[b"k%d" % j for j in range(i, i + 1000)],
                                 partition=q)
        total = (n // PARTITIONS // 1000) * 1000 * PARTITIONS
        ceiling = _produce_kafka(bs, "bench.ceiling", total, value)
        c = ck.Consumer({"bootstrap.servers": bs, "group.id": "probe", "logger": _quiet})

        def count() -> int:
            try:
                return sum(c.get_watermark_offsets(ck.TopicPartition("bench.out", q), timeout=5)[1]
                           for q in range(PARTITIONS))
            except ck.KafkaException:
                return 0
        m = ShmqToKafka(bs, "bench.out", root, progress_interval=0)
        rate = _timed(m, count, total)
        c.close()
        return {"mirror": rate, "peer ceiling (plain producer to the mock)": ceiling}
    finally:
        _stop_root(root)
        del owner


def _stop_root(path: str) -> None:
    import os
    import signal

    from shmq.root import Root
    try:
        pid = Root(path, create=False).coordinator_pid()
        if pid:
            os.kill(pid, signal.SIGKILL)
    except Exception:
        pass
    shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=150_000,
                    help="the mock keeps about 5 MB per partition: more 64 B records than this get deleted")
    ap.add_argument("--value-size", type=int, default=64)
    ap.add_argument("--direction", choices=("from", "to", "both"), default="both")
    a = ap.parse_args()
    value = b"x" * a.value_size
    rows = []
    if a.direction in ("from", "both"):
        rows.append(("kafka -> shmq", from_kafka(a.records, value)))
    if a.direction in ("to", "both"):
        rows.append(("shmq -> kafka", to_kafka(a.records, value)))
    print(f"{a.records} records of {a.value_size} B across {PARTITIONS} partitions, librdkafka mock cluster")
    for name, res in rows:
        for what, rate in res.items():
            print(f"  {name:14s} {what:45s} {rate:12,.0f} records/s")


if __name__ == "__main__":
    main()
