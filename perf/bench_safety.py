"""What safety costs: the default (block, CRC checked) against overwrite with CRC off.

    python -m perf.bench_safety [--quick] [--repeats 3] [--scale 1.0] [--split] [--json out.json]

One producer process, one consumer process, one partition with the default
ring (8 x 8 MiB), enough records to lap the ring several times:

* ``single 64 B`` / ``single 1 KiB``: ``Producer.send`` -> ``Consumer.consume``;
* ``batch 64 B`` / ``batch 1 KiB``: ``send_batch`` of 2-D uint8 arrays
  (8192 rows of 64 B, 1024 rows of 1 KiB: a batch is one frame and must fit in
  a segment) -> ``consume_arrays``.

Modes, both in one run: ``safe`` is the default topic (``overflow="block"``:
the consumer's reader holds the producer back) read with the default
``check_crcs=True``; ``unsafe`` is ``overflow="overwrite"`` read with
``check_crcs=False``, where a consumer that falls behind loses records (the
count delivered is reported). Throughput is records delivered per second,
measured at the consumer from its first record to its last. Medians of
``--repeats`` runs; the figure to read is safe / unsafe. ``--split`` also
runs block with CRC off and overwrite with CRC on, so the cost of the
back-pressure and that of the CRC check are seen apart.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import struct
import time
from typing import Any, Dict, List, Tuple

import numpy as np

from .bench_api import _Root

_SEQ = struct.Struct("<Q")
MODES = {"safe": ("block", True), "unsafe": ("overwrite", False)}
# --split: each half of safety on its own, to tell what costs what.
SPLIT_MODES = {"block, CRC off": ("block", False), "overwrite, CRC on": ("overwrite", True)}
RING = {"segment_bytes": 8 << 20, "segment_count": 8}


def batch_rows(size: int) -> int:
    """Rows per send_batch: 8192 of 64 B, fewer of larger records (~1 MiB a batch)."""
    return max(1, min(8192, (1 << 20) // size))


def _produce(root: str, n: int, size: int, batch: bool) -> None:
    from shmq import Producer
    with Producer(root) as p:
        if batch:
            rows = batch_rows(size)
            arr = np.zeros((rows, size), dtype=np.uint8)
            for first in range(0, n, rows):
                k = min(rows, n - first)
                arr[:k, :8] = np.arange(first, first + k, dtype="<u8").view(np.uint8).reshape(k, 8)
                p.send_batch("bench", arr[:k], partition=0)
        else:
            pad = b"\0" * (size - 8)
            pack, send = _SEQ.pack, p.send
            for i in range(n):
                send("bench", pack(i) + pad, partition=0)


def _consume(root: str, n: int, batch: bool, check_crcs: bool, out: Any) -> None:
    from shmq import Consumer, TopicPartition
    c = Consumer(root=root, auto_offset_reset="earliest", check_crcs=check_crcs)
    c.assign([TopicPartition("bench", 0)])
    got = last = 0
    t0 = None
    deadline = time.monotonic() + 120
    unpack = _SEQ.unpack_from
    while last < n - 1 and time.monotonic() < deadline:
        if batch:
            res = c.consume_arrays(65536, timeout=0.5)
            if res is None:
                continue
            arrs = res[1]
            if t0 is None:
                t0 = time.perf_counter()
            got += len(arrs.offsets)
            last = int(arrs.values[-1, :8].view("<u8")[0])
        else:
            msgs = c.consume(2048, timeout=0.5)
            if not msgs:
                continue
            if t0 is None:
                t0 = time.perf_counter()
            got += len(msgs)
            last = unpack(msgs[-1].value)[0]
    out.put((got, time.perf_counter() - (t0 or time.perf_counter())))
    c.close()


def run_once(mode: str, n: int, size: int, batch: bool) -> Tuple[float, int]:
    """(records delivered per second, records delivered) for one run."""
    from shmq import Admin
    overflow, crcs = {**MODES, **SPLIT_MODES}[mode]
    ctx = mp.get_context("fork")
    with _Root() as root:
        with Admin(root) as admin:
            admin.create_topic("bench", partitions=1, config={**RING, "overflow": overflow})
        q = ctx.Queue()
        cons = ctx.Process(target=_consume, args=(root, n, batch, crcs, q))
        cons.start()
        time.sleep(0.3)                      # the consumer holds its reader slot before the producer starts
        prod = ctx.Process(target=_produce, args=(root, n, size, batch))
        prod.start()
        prod.join(180)
        got, secs = q.get(timeout=180)
        cons.join(10)
        for p in (prod, cons):
            if p.is_alive():
                p.kill()
        return got / secs if secs > 0 else 0.0, got


def main(argv: Any = None) -> Dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one run per row, fewer records")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0,
                    help="multiply the record counts (e.g. 0.01 to check that the benchmark runs)")
    ap.add_argument("--split", action="store_true",
                    help="also block with CRC off and overwrite with CRC on (what each half costs)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args(argv)
    repeats = 1 if args.quick else args.repeats
    rows: List[Tuple[str, int, int, bool]] = [
        (name, size, max(1, int(n * args.scale)), batch) for name, size, n, batch in (
            ("single 64 B", 64, 600_000 if args.quick else 2_000_000, False),
            ("single 1 KiB", 1024, 200_000 if args.quick else 600_000, False),
            ("batch 64 B", 64, 4_000_000 if args.quick else 20_000_000, True),
            ("batch 1 KiB", 1024, 800_000 if args.quick else 2_000_000, True),
        )]
    results: Dict[str, Any] = {}
    print(f"{'workload':<14} {'records':>10} {'safe rec/s':>12} {'unsafe rec/s':>13} {'safe/unsafe':>11} "
          f"{'unsafe delivered':>17}")
    for name, size, n, batch in rows:
        res = {}
        for mode in [*MODES, *(SPLIT_MODES if args.split else ())]:
            runs = [run_once(mode, n, size, batch) for _ in range(repeats)]
            res[mode] = (statistics.median(r[0] for r in runs), min(r[1] for r in runs))
        ratio = res["safe"][0] / res["unsafe"][0] if res["unsafe"][0] else float("nan")
        results[name] = {"records": n, "safe_per_s": res["safe"][0], "unsafe_per_s": res["unsafe"][0],
                         "ratio": ratio, "safe_delivered": res["safe"][1], "unsafe_delivered": res["unsafe"][1]}
        print(f"{name:<14} {n:>10} {res['safe'][0] / 1e3:>10.1f} k {res['unsafe'][0] / 1e3:>11.1f} k "
              f"{ratio:>11.2f} {res['unsafe'][1]:>17}")
        for mode in SPLIT_MODES if args.split else ():
            results[name][mode] = {"per_s": res[mode][0], "delivered": res[mode][1]}
            print(f"{'':<14} {mode:>22}: {res[mode][0] / 1e3:.1f} k rec/s "
                  f"({res[mode][0] / res['unsafe'][0] if res['unsafe'][0] else float('nan'):.2f} of unsafe), "
                  f"{res[mode][1]} delivered")
        assert res["safe"][1] == n, f"{name}: the safe mode delivered {res['safe'][1]} of {n}"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
