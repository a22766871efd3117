"""Transactions: the transactional producer vs the idempotent one, read_committed
vs read_uncommitted, one consume-transform-produce stage. One run.

    python -m perf.bench_txn [--quick] [--records N] [--json out.json]

Workloads, 64-byte values, one partition, one process each:

* ``txn-N``        ``begin_transaction``, N x ``send``, ``commit_transaction``
  (N = 1, 100, 10,000), records/s; ``idempotent`` is the same sends from an
  idempotent non-transactional producer (``enable_idempotence=True``,
  ``acks="all"``) in the same run, so ``ratio`` = txn-N / idempotent.
* ``read-*``       a consumer reading the committed transactional records
  (``consume(2048)``) with each isolation level; ``ratio`` = read_committed /
  read_uncommitted.
* ``stage``        one consume-transform-produce stage process (read_committed
  input, output + input offsets in one transaction per ``consume(500)``).

Each run uses a fresh private root under /dev/shm (removed afterwards, its
coordinator killed). Medians of ``--repeats`` runs (1 with ``--quick``).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Callable, Dict, List

from .bench_api import _Root  # one private-root helper for the benchmarks

VALUE = b"v" * 64


def _topics(root: str, records: int, *names: str) -> None:
    from shmq import Admin
    seg = max(8 << 20, records * 160 // 4)
    with Admin(root) as admin:
        for name in names:
            admin.create_topic(name, 1, config={"segment_bytes": seg, "segment_count": 8})


def produce_txn(root: str, records: int, per_txn: int) -> float:
    """records/s of transactions of ``per_txn`` sends."""
    from shmq import Producer
    with Producer(root, transactional_id=f"bench-{per_txn}") as p:
        p.init_transactions()
        t0 = time.perf_counter()
        for _ in range(records // per_txn):
            p.begin_transaction()
            for _ in range(per_txn):
                p.send("t", VALUE, partition=0)
            p.commit_transaction()
        return (records // per_txn) * per_txn / (time.perf_counter() - t0)


def produce_idempotent(root: str, records: int) -> float:
    from shmq import Producer
    with Producer(root, acks="all", enable_idempotence=True) as p:
        t0 = time.perf_counter()
        for _ in range(records):
            p.send("t", VALUE, partition=0)
        return records / (time.perf_counter() - t0)


def read(root: str, records: int, isolation: str) -> float:
    from shmq import Consumer, TopicPartition
    with Consumer(root=root, isolation_level=isolation, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition("t", 0)])
        got = 0
        t0 = time.perf_counter()
        while got < records:
            msgs = c.consume(2048, timeout=5.0)
            if not msgs:
                raise RuntimeError(f"{isolation}: read {got} of {records} records")
            got += len(msgs)
        return got / (time.perf_counter() - t0)


def stage(root: str, records: int) -> float:
    """One consume-transform-produce stage over ``records`` committed input records."""
    from shmq import Consumer, Producer, TopicPartition
    with Producer(root) as p:
        for start in range(0, records, 1000):
            p.send_batch("in", [VALUE] * min(1000, records - start), partition=0)
    prod = Producer(root, transactional_id="bench-stage")
    prod.init_transactions()
    cons = Consumer("in", root=root, group_id="bench-stage", isolation_level="read_committed",
                    enable_auto_commit=False, auto_offset_reset="earliest", max_poll_records=500)
    done = 0
    t0 = time.perf_counter()
    try:
        while done < records:
            msgs = cons.consume(500, timeout=5.0)
            if not msgs:
                raise RuntimeError(f"stage: processed {done} of {records} records")
            prod.begin_transaction()
            for m in msgs:
                prod.send("out", m.value[::-1], partition=0)
            prod.send_offsets_to_transaction({TopicPartition("in", 0): msgs[-1].offset + 1},
                                             cons.consumer_group_metadata())
            prod.commit_transaction()
            done += len(msgs)
        return done / (time.perf_counter() - t0)
    finally:
        cons.close()
        prod.close()


def _median(fn: Callable[[], float], repeats: int) -> float:
    return statistics.median(fn() for _ in range(repeats))


def run(records: int, repeats: int) -> List[Dict[str, Any]]:
    rows: List[Dict[str, Any]] = []

    def fresh(body: Callable[[str], float], *topics: str) -> float:
        with _Root() as root:
            _topics(root, records, *topics)
            return body(root)

    idem = _median(lambda: fresh(lambda r: produce_idempotent(r, records), "t"), repeats)
    rows.append({"workload": "idempotent", "records_per_s": idem, "ratio": 1.0})
    for n in (1, 100, 10_000):
        count = records if n > 1 else max(200, records // 50)    # one transaction per record is slow
        count -= count % n
        rate = _median(lambda: fresh(lambda r: produce_txn(r, count, n), "t"), repeats)
        rows.append({"workload": f"txn-{n}", "records_per_s": rate, "ratio": rate / idem})

    def reads(root: str) -> float:
        produce_txn(root, records, 100)
        unc = read(root, records, "read_uncommitted")
        com = read(root, records, "read_committed")
        rows.append({"workload": "read-uncommitted", "records_per_s": unc, "ratio": 1.0})
        rows.append({"workload": "read-committed", "records_per_s": com, "ratio": com / unc})
        return com

    for _ in range(repeats):
        fresh(reads, "t")
    st = _median(lambda: fresh(lambda r: stage(r, records), "in", "out"), repeats)
    rows.append({"workload": "stage", "records_per_s": st, "ratio": st / idem})
    return rows


def main(argv: Any = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer records, one repeat")
    ap.add_argument("--records", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    records = args.records or (20_000 if args.quick else 200_000)
    repeats = args.repeats or (1 if args.quick else 3)
    rows = run(records, repeats)
    print(f"{'workload':<18}{'records/s':>14}{'ratio':>9}")
    for r in rows:
        print(f"{r['workload']:<18}{r['records_per_s']:>14,.0f}{r['ratio']:>9.2f}")
    print("ratio: txn-N and stage vs idempotent; read-committed vs read-uncommitted")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"records": records, "repeats": repeats, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
