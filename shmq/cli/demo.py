"""`shmq demo`: producer and consumer processes on a root, with live progress
and a verified summary.

It creates a topic on the root (the embedded default unless ``--root``), starts
producer processes that ``send`` records carrying (producer id, sequence,
send time), and consumer processes that each own some partitions, check that
every producer's records arrive complete and in order per partition, commit
their offsets, and measure one-way latency. The summary says what was sent,
received and lost (0), with throughput and latency percentiles. The topic is
deleted at the end, and a coordinator the demo had to start is stopped (with
its replica processes): it leaves running only what ran before.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import struct
import sys
import time
from typing import Any, Dict, List, Optional

import numpy as np

_REC = struct.Struct("<IQQ")  # producer id, sequence, send time (ns, CLOCK_MONOTONIC)


def _producer(root: Optional[str], topic: str, pid: int, count: int, partitions: int, value_size: int,
              sent: Any) -> None:
    from ..producer import Producer
    pad = b"\0" * max(0, value_size - _REC.size)
    pack = _REC.pack
    now = time.monotonic_ns
    with Producer(root) as producer:
        send = producer.send
        for seq in range(count):
            send(topic, pack(pid, seq, now()) + pad, partition=seq % partitions)
            if seq & 4095 == 0:
                sent[pid] = seq
        sent[pid] = count


def _consumer(root: Optional[str], topic: str, cid: int, parts: List[int], expected: int, producers: int,
              received_arr: Any, out: Any) -> None:
    from ..consumer import Consumer
    from ..message import TopicPartition
    consumer = Consumer(group_id=f"{topic}-verify", root=root, auto_offset_reset="earliest",
                        enable_auto_commit=False)
    consumer.assign([TopicPartition(topic, p) for p in parts])
    last = {}  # (producer, partition) -> last sequence
    errors = 0
    received = 0
    lat = np.empty(max(expected, 1), dtype=np.int64)
    deadline = time.monotonic() + 120
    unpack = _REC.unpack_from
    while received < expected and time.monotonic() < deadline:
        msgs = consumer.consume(2048, timeout=0.2)
        t = time.monotonic_ns()
        for m in msgs:
            p, seq, sent_ns = unpack(m.value)
            k = (p, m.partition)
            if seq <= last.get(k, -1):
                errors += 1
            last[k] = seq
            if received < len(lat):
                lat[received] = t - sent_ns
            received += 1
        if msgs:
            consumer.commit(asynchronous=True)
            received_arr[cid] = received
    consumer.commit(asynchronous=False)
    consumer.close()
    n = min(received, len(lat))
    out.put((cid, received, errors, np.percentile(lat[:n], [50, 99, 99.9]).tolist() if n else []))


def run_demo(producers: int = 2, consumers: int = 2, count: int = 200_000, value_size: int = 64,
             root: Optional[str] = None, partitions: Optional[int] = None) -> int:
    """Run the demo; returns 0 when every record arrived once and in order."""
    from ..admin import Admin
    from ..consumer import Consumer  # noqa: F401  (imported before fork: children start warm)
    from ..producer import Producer  # noqa: F401
    from ..root import Root
    partitions = partitions or max(consumers, 1) * 2
    topic = f"shmq-demo-{os.getpid()}"
    ctx = mp.get_context("fork")
    procs: List[Any] = []
    from ..coordinator.client import coordinator_alive
    from ..coordinator.lifecycle import stop_root
    root_obj = Root(root)
    started_here = not coordinator_alive(root_obj)
    admin = Admin(root)
    root_path = root_obj.path
    try:
        admin.create_topic(topic, partitions=partitions, config={"segment_bytes": 32 << 20, "segment_count": 4})
        total = producers * count
        per_part = [0] * partitions
        for p in range(partitions):
            per_part[p] = producers * len(range(p, count, partitions))
        print(f"shmq demo on {root_path}: topic {topic} with {partitions} partitions; "
              f"{producers} producer and {consumers} consumer processes; {total:,} records of {value_size} B")
        sent = ctx.Array("q", producers)
        received = ctx.Array("q", consumers)
        out = ctx.Queue()
        for c in range(consumers):
            parts = list(range(c, partitions, consumers))
            expected = sum(per_part[p] for p in parts)
            procs.append(ctx.Process(target=_consumer, args=(root, topic, c, parts, expected, producers,
                                                             received, out), daemon=True))
        for p in range(producers):
            procs.append(ctx.Process(target=_producer, args=(root, topic, p, count, partitions, value_size, sent),
                                     daemon=True))
        t0 = time.monotonic()
        for pr in procs:
            pr.start()
        results: Dict[int, Any] = {}
        tty = sys.stdout.isatty()
        last = 0.0
        while len(results) < consumers and time.monotonic() - t0 < 150:
            try:
                r = out.get(timeout=0.1)
                results[r[0]] = r
            except Exception:
                pass
            now = time.monotonic()
            if now - last >= (0.25 if tty else 2.0) or len(results) == consumers:
                last = now
                s, g = sum(sent[:]), sum(received[:])
                line = (f"  sent {s:>11,}  received {g:>11,}  lag {max(s - g, 0):>9,}  "
                        f"{g / max(now - t0, 1e-9) / 1e6:6.2f} M records/s")
                sys.stdout.write(("\r" + line) if tty else (line + "\n"))
                sys.stdout.flush()
        elapsed = time.monotonic() - t0
        if tty:
            print()
        ok = len(results) == consumers
        got_total = 0
        pcts = []
        for c in sorted(results):
            _, got, errors, pct = results[c]
            got_total += got
            ok = ok and errors == 0
            if pct:
                pcts.append(pct)
            print(f"  consumer {c}: received {got:,}, out of order {errors}")
        lost = total - got_total
        ok = ok and lost == 0
        print(f"Summary: sent {total:,}  received {got_total:,}  lost {lost:,}  "
              f"throughput {got_total / elapsed / 1e6:.2f} M records/s end to end ({elapsed:.2f} s)")
        if pcts:
            p = np.max(np.array(pcts), axis=0)
            print("One-way latency at full load, queueing included (worst consumer): "
                  f"p50 {p[0] / 1e3:.1f} us  p99 {p[1] / 1e3:.1f} us  "
                  f"p99.9 {p[2] / 1e3:.1f} us")
        print("Verified: every record received once, in order per producer and partition."
              if ok else "FAILED verification.")
        return 0 if ok else 1
    finally:
        for pr in procs:
            if pr.is_alive():
                pr.kill()
            pr.join(timeout=2)
        try:
            admin.delete_topic(topic)
        except Exception:
            pass
        admin.close()
        if started_here:
            stop_root(root_obj)
