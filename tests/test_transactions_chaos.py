"""Exactly-once chaos: consume-transform-produce stages in a consumer group
(read_committed input, transformed records and input offsets committed in
one transaction) while a nemesis SIGKILLs stages and the coordinator at
random. A read_committed reader of the output then finds every input
exactly once, checked by the input's value carried through.

Scaled down for CI from the issue's 300,000 records and 30 s of chaos to
30,000 records and ~12 s (stages are throttled so that the chaos overlaps
the whole run); the checks are the same.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import time
from typing import Any, Dict, List

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import CommitFailed, IllegalState, InvalidTxnState, NotCoordinator, ProducerFenced, ShmqError
from shmq.root import Root
from tests.conftest import kill_coordinator

IN, OUT, GROUP = "eo-in", "eo-out", "eo-stages"
IN_PARTS, OUT_PARTS = 6, 4
RECORDS = 30_000
STAGES = 3
CHAOS_S = 12.0


def _stage(root: str, index: int, log_path: str) -> None:
    """One stage: read a few records, write one output per input and the
    input offsets in one transaction; on any failure abort (or, fenced,
    exit) and go back to the committed offsets."""
    prod = Producer(root, transactional_id=f"eo-stage-{index}", transaction_timeout_ms=3000)
    prod.init_transactions()
    cons = Consumer(IN, root=root, group_id=GROUP, isolation_level="read_committed", enable_auto_commit=False,
                    auto_offset_reset="earliest", max_poll_records=100, session_timeout_ms=3000)
    while True:
        msgs = cons.consume(100, timeout=0.1)
        if not msgs:
            continue
        try:
            prod.begin_transaction()
            nxt: Dict[TopicPartition, int] = {}
            for m in msgs:
                prod.send(OUT, b"out:" + m.value, key=m.value)
                nxt[TopicPartition(m.topic, m.partition)] = m.offset + 1
            prod.send_offsets_to_transaction(nxt, cons.consumer_group_metadata())
            prod.commit_transaction()
        except ProducerFenced as e:
            _note(log_path, f"stage {index} pid {os.getpid()}: fenced: {e}")
            os._exit(3)                               # a newer instance took over: this one stops
        except (CommitFailed, NotCoordinator, ShmqError) as e:
            _note(log_path, f"stage {index} pid {os.getpid()}: {type(e).__name__}: {e}")
            while True:                               # abort, retrying while the coordinator is away
                try:
                    prod.abort_transaction()
                    break
                except ProducerFenced:
                    os._exit(3)
                except (IllegalState, InvalidTxnState):
                    break                             # no transaction open any more (ended at the coordinator)
                except ShmqError as e2:
                    _note(log_path, f"stage {index} pid {os.getpid()}: abort: {type(e2).__name__}: {e2}")
                    time.sleep(0.05)
            for tp in cons.assignment():              # uncommitted records are read again
                c = cons.committed(tp)
                cons.seek(tp, 0 if c is None else c)
        time.sleep(0.05)                              # throttled: the chaos covers the whole run


def _note(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(f"{time.time():.3f} {line}\n")


def test_exactly_once_through_stage_and_coordinator_kills(root: Root, reaper: Any, tmp_path: Any) -> None:
    notes = str(tmp_path / "stages.log")
    with Admin(root.path) as admin:
        admin.create_topic(IN, IN_PARTS, config={"segment_bytes": 4 << 20, "segment_count": 4})
        admin.create_topic(OUT, OUT_PARTS, config={"segment_bytes": 4 << 20, "segment_count": 8})
    t_in = time.monotonic()
    with Producer(root.path) as p:
        for start in range(0, RECORDS, 1000):
            vals = [b"%d" % i for i in range(start, start + 1000)]
            for part in range(IN_PARTS):
                p.send_batch(IN, vals[part::IN_PARTS], partition=part)
    stages = {i: reaper.start(_stage, root.path, i, notes) for i in range(STAGES)}
    rng = random.Random(1313)
    kills = {"stage": 0, "coordinator": 0}
    t0 = time.monotonic()
    print(f"input written, stages started in {t0 - t_in:.1f} s")
    event = 0
    while time.monotonic() - t0 < CHAOS_S:
        time.sleep(rng.uniform(0.4, 1.2))
        event += 1
        if event % 3 == 2:
            kill_coordinator(root)                    # the next client call starts a successor
            kills["coordinator"] += 1
        else:
            i = rng.randrange(STAGES)
            os.kill(stages[i].pid, signal.SIGKILL)
            stages[i].join(5)
            kills["stage"] += 1
            time.sleep(rng.uniform(0.0, 0.3))
            stages[i] = reaper.start(_stage, root.path, i, notes)   # same transactional id: fences the old one
    # Let the stages finish the input.
    tps = [TopicPartition(IN, p) for p in range(IN_PARTS)]
    probe = Consumer(root=root.path, group_id=GROUP, enable_auto_commit=False)
    ends = {tp: probe.get_watermark_offsets(tp)[1] for tp in tps}
    assert sum(ends.values()) == RECORDS
    deadline = time.monotonic() + 60
    while True:
        committed = {tp: probe.committed(tp) for tp in tps}
        if committed == ends:
            break
        if time.monotonic() > deadline:
            with Admin(root.path) as admin:
                group = admin.describe_group(GROUP)
            tail = open(notes).read().splitlines()[-15:] if os.path.exists(notes) else []
            raise AssertionError(f"the stages did not finish: committed {committed} of {ends}; group {group}; "
                                 f"stage errors (last 15): {tail}")
        for i, proc in list(stages.items()):
            if not proc.is_alive():                   # fenced by its own restart race: start it again
                stages[i] = reaper.start(_stage, root.path, i, notes)
        time.sleep(0.2)
    probe.close()
    finished = time.monotonic() - t0
    for proc in stages.values():
        os.kill(proc.pid, signal.SIGKILL)
    # Every input exactly once in the committed output.
    reader = Consumer(root=root.path, isolation_level="read_committed", auto_offset_reset="earliest")
    reader.assign([TopicPartition(OUT, p) for p in range(OUT_PARTS)])
    seen: List[bytes] = []
    deadline = time.monotonic() + 30
    while len(seen) < RECORDS and time.monotonic() < deadline:
        seen.extend(m.value for m in reader.consume(5000, timeout=0.1))
    end = time.monotonic() + 0.5
    while time.monotonic() < end:
        seen.extend(m.value for m in reader.consume(5000, timeout=0.1))
    reader.close()
    counts = collections.Counter(seen)
    dups = {v: n for v, n in counts.items() if n > 1}
    missing = RECORDS - len(counts)
    print(f"exactly-once chaos: {RECORDS} inputs, {len(seen)} committed outputs, kills {kills}, "
          f"all committed {finished:.1f} s after the start, {len(dups)} duplicated, {missing} missing")
    assert kills["stage"] > 0 and kills["coordinator"] > 0
    assert not dups, f"inputs processed more than once: {list(dups.items())[:5]}"
    assert set(counts) == {b"out:%d" % i for i in range(RECORDS)}
