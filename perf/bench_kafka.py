"""confluent-kafka (librdkafka) against the shmq Kafka listener and against
librdkafka's mock cluster, side by side in one run.

    python -m perf.bench_kafka [--quick] [--records N] [--json out.json]

For each record size (64 B and 1 KiB) and each broker:

* ``produce``  one ``Producer`` (acks=all, idempotence on, librdkafka's
  default batching) sends N records to a 4-partition topic and flushes:
  records/s over the whole run, and p50/p99 of librdkafka's per-message
  latency (``msg.latency()``: produce() call to delivery report).
* ``consume``  one ``Consumer`` assigned to the 4 partitions reads back the
  last records of each (up to 4 MB a partition: the mock cluster keeps only
  about 5 MB of a partition) with ``consume(batch)``: records/s, median
  of three reads. ``consume 10ms`` is the same read with one client setting
  changed, ``fetch.queue.backoff.ms=10`` (librdkafka 2.x: 1000): a fetch
  whose answer leaves more than ``queued.min.messages`` (100,000) records
  in the client's queue makes librdkafka wait that long before it fetches
  again, and a 4 MB read of 64-byte records meets it on a broker that
  answers with up to 1 MB a partition, as Kafka's do; the row shows the
  broker without that client pause.

The shmq listener runs as its own process (``python -m shmq.kafka``) on a
private root under /dev/shm; the mock cluster (``test.mock.num.brokers``,
shipped in the confluent-kafka wheel) runs inside a helper producer of this
process, as librdkafka provides it. Both are removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

PARTITIONS = 4
TOPIC = "bench"
MOCK_KEEPS = 4 << 20       # bytes per partition read back: librdkafka's mock keeps ~5 MB a partition


class ShmqListener:
    """A listener process on a private root (coordinator included), removed on exit."""

    def __enter__(self) -> str:
        from shmq import Admin
        self.root = tempfile.mkdtemp(prefix="shmq-bench-kafka-", dir="/dev/shm")
        with Admin(self.root) as admin:
            admin.create_topic(TOPIC, partitions=PARTITIONS)
        self.proc = subprocess.Popen([sys.executable, "-m", "shmq.kafka", "--root", self.root, "--listen",
                                      "127.0.0.1:0", "--log-level", "WARNING"], stdout=subprocess.PIPE,
                                     stdin=subprocess.DEVNULL, text=True)
        line = self.proc.stdout.readline() if self.proc.stdout else ""
        if not line.startswith("listening on"):
            self.__exit__()
            raise RuntimeError(f"the shmq Kafka listener did not start: {line!r}")
        return line.split()[2]

    def __exit__(self, *exc: Any) -> None:
        from shmq.root import Root
        from shmq.kafka.supervisor import stop_child
        stop_child(self.proc)
        pid = Root(self.root, create=False).coordinator_pid()
        if pid is not None:
            os.kill(pid, 9)
        shutil.rmtree(self.root, ignore_errors=True)


class MockCluster:
    """librdkafka's mock cluster (one broker), alive while its host producer is."""

    def __enter__(self) -> str:
        import confluent_kafka as ck
        self.host = ck.Producer({"bootstrap.servers": "", "test.mock.num.brokers": 1})
        md = self.host.list_topics(timeout=10)
        return ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())

    def __exit__(self, *exc: Any) -> None:
        del self.host


def bench_produce(bootstrap: str, n: int, size: int) -> Dict[str, float]:
    import confluent_kafka as ck
    p = ck.Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": True})
    p.list_topics(TOPIC, timeout=10)
    value = b"x" * size
    lat: List[float] = []
    errors: List[Any] = []

    def report(err: Any, msg: Any) -> None:
        if err is not None:
            errors.append(err)
        else:
            lat.append(msg.latency())
    t0 = time.perf_counter()
    for i in range(n):
        while True:
            try:
                p.produce(TOPIC, value, key=b"%d" % (i & 1023), on_delivery=report)
                break
            except BufferError:
                p.poll(0.001)
        if i & 1023 == 0:
            p.poll(0)
    p.flush(120)
    dt = time.perf_counter() - t0
    if errors or len(lat) != n:
        raise RuntimeError(f"produce: {len(errors)} errors (first {errors[:1]}), {len(lat)} of {n} delivered")
    lat.sort()
    return {"rate": n / dt, "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


def bench_consume(bootstrap: str, n: int, size: int, conf: Optional[Dict[str, Any]] = None) -> Dict[str, float]:
    """Read back the last records of each partition, at most ``MOCK_KEEPS``
    bytes of them (the mock cluster keeps only a few MB per partition);
    ``conf``: client settings on top of the defaults."""
    import confluent_kafka as ck
    c = ck.Consumer({"bootstrap.servers": bootstrap, "group.id": "bench", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", **(conf or {})})
    per = min(n // PARTITIONS, MOCK_KEEPS // (size + 16))
    tps = []
    for p in range(PARTITIONS):
        lo, hi = c.get_watermark_offsets(ck.TopicPartition(TOPIC, p), timeout=10)
        tps.append(ck.TopicPartition(TOPIC, p, max(lo, hi - per)))
    want = sum(hi for hi in (c.get_watermark_offsets(tp, timeout=10)[1] for tp in tps)) - sum(tp.offset for tp in tps)
    c.assign(tps)
    got = 0
    t0 = 0.0                     # from the first record: connection and first-fetch set-up left out
    deadline = time.monotonic() + 120
    while got < want and time.monotonic() < deadline:
        # A short timeout: consume(n) waits for all n records or the timeout,
        # so a long one would time the wait for a batch that never fills.
        msgs = c.consume(10000, timeout=0.01)
        if msgs and not t0:
            t0 = time.perf_counter()
        got += sum(1 for m in msgs if m.error() is None)
    dt = time.perf_counter() - t0
    c.close()
    if got < want:
        raise RuntimeError(f"consume: {got} of {want} records within 120 s")
    return {"rate": want / dt, "records": want}


def _median_rate(reads: List[Dict[str, float]]) -> Dict[str, float]:
    return {**reads[0], "rate": statistics.median(r["rate"] for r in reads),
            "rates": [r["rate"] for r in reads]}


def run(n: int, sizes: Tuple[int, ...]) -> List[Dict[str, Any]]:
    rows = []
    for size in sizes:
        for name, broker in (("shmq listener", ShmqListener), ("librdkafka mock", MockCluster)):
            with broker() as bootstrap:
                prod = bench_produce(bootstrap, n, size)
                cons = _median_rate([bench_consume(bootstrap, n, size) for _ in range(3)])
                quick = _median_rate([bench_consume(bootstrap, n, size, {"fetch.queue.backoff.ms": 10})
                                      for _ in range(3)])
            rows.append({"broker": name, "size": size, "records": n, "produce": prod, "consume": cons,
                         "consume_10ms": quick})
    return rows


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="20,000 records per row")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--sizes", default="64,1024", help="record sizes in bytes, comma-separated")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    sizes = tuple(int(x) for x in args.sizes.split(","))
    n = args.records or (20_000 if args.quick else 500_000)
    import confluent_kafka as ck
    print(f"confluent-kafka {ck.version()[0]} (librdkafka {ck.libversion()[0]}), {PARTITIONS} partitions, "
          f"{n} records per row, acks=all, idempotence on; {os.cpu_count()} CPUs")
    rows = run(n, sizes)
    print(f"{'broker':<16} {'size':>5} {'produce /s':>11} {'p50 us':>8} {'p99 us':>8} {'consume /s':>11} "
          f"{'consume 10ms':>13}")
    for r in rows:
        print(f"{r['broker']:<16} {r['size']:>5} {r['produce']['rate']:>11,.0f} {r['produce']['p50_us']:>8,.0f} "
              f"{r['produce']['p99_us']:>8,.0f} {r['consume']['rate']:>11,.0f} {r['consume_10ms']['rate']:>13,.0f}")
    for size in sizes:
        s, m = [r for r in rows if r["size"] == size]
        print(f"{size:>5} B: shmq/mock produce x{s['produce']['rate'] / m['produce']['rate']:.2f}, "
              f"consume x{s['consume']['rate'] / m['consume']['rate']:.2f} "
              f"(10ms x{s['consume_10ms']['rate'] / m['consume_10ms']['rate']:.2f}), "
              f"p50 latency x{m['produce']['p50_us'] / max(s['produce']['p50_us'], 1e-9):.2f} (>1: shmq lower)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "median": statistics.median([r["produce"]["rate"] for r in rows])}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
