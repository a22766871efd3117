"""Exactly-once chaos: consume-transform-produce stages in a consumer group
(read_committed input, transformed records and input offsets committed in
one transaction) while a nemesis SIGKILLs stages and the coordinator at
random. A read_committed reader of the output then finds every input
exactly once, checked by the input's value carried through, and the
inputs of each input partition in their order within each output partition.

The issue's figures: 3 stage processes, 300,000 input records, 30 s of
chaos. The test writes the input during the chaos (at the rate that spreads
it over FEED_S), so that the kills land while the stages are busy however
fast they are; the stages run unthrottled and catch up after the chaos.
A successor coordinator is started by the first client that finds none,
which takes seconds on a loaded host: the nemesis kills a coordinator only
once it has served COORDINATOR_UP_S, so that the stages get work done
between coordinator kills.
"""
from __future__ import annotations

import collections
import os
import random
import signal
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import CommitFailed, IllegalState, InvalidTxnState, NotCoordinator, ProducerFenced, ShmqError
from shmq.root import Root
from tests.conftest import kill_coordinator

IN, OUT, GROUP = "eo-in", "eo-out", "eo-stages"
IN_PARTS, OUT_PARTS = 6, 4
RECORDS = 300_000
STAGES = 3
CHAOS_S = 30.0
FEED_S = 27.0                    # the input is written over this much of the chaos
CHUNK = 600                      # input records per write (100 per partition)
MAX_BATCH = 1000                 # input records per transaction, at most
COORDINATOR_UP_S = 1.0           # a coordinator is killed only after it served this long
FINISH_S = 45.0                  # after the chaos, the stages must commit the rest within this


def _stage(root: str, index: int, log_path: str) -> None:
    """One stage: read up to MAX_BATCH records, write one output per input
    and the input offsets in one transaction; on any failure abort (or,
    fenced, exit) and go back to the committed offsets."""
    prod = Producer(root, transactional_id=f"eo-stage-{index}", transaction_timeout_ms=3000)
    prod.init_transactions()
    cons = Consumer(IN, root=root, group_id=GROUP, isolation_level="read_committed", enable_auto_commit=False,
                    auto_offset_reset="earliest", max_poll_records=MAX_BATCH, session_timeout_ms=3000)
    while True:
        msgs = cons.consume(MAX_BATCH, timeout=0.1)
        if not msgs:
            continue
        try:
            prod.begin_transaction()
            nxt: Dict[TopicPartition, int] = {}
            for m in msgs:
                nxt[TopicPartition(m.topic, m.partition)] = m.offset + 1
            vals = [m.value for m in msgs]
            # Keyed by the input value: one batch per output partition, in input order.
            prod.send_batch(OUT, [b"out:" + v for v in vals], keys=vals)
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


def _kill(proc: Any) -> None:
    try:
        os.kill(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass                                          # it exited already (fenced)
    proc.join(5)


def _note(path: str, line: str) -> None:
    with open(path, "a") as f:
        f.write(f"{time.time():.3f} {line}\n")


def _restart_exited(stages: Dict[int, Any], root: str, notes: str, reaper: Any, kills: Dict[str, int]) -> None:
    """A stage fenced (its transaction timed out while the coordinator was
    away, say) exits: start it again, as a supervisor would."""
    for i, proc in list(stages.items()):
        if not proc.is_alive():
            proc.join(5)
            kills["exited"] += 1
            stages[i] = reaper.start(_stage, root, i, notes)


def test_exactly_once_through_stage_and_coordinator_kills(root: Root, reaper: Any, tmp_path: Any) -> None:
    notes = str(tmp_path / "stages.log")
    with Admin(root.path) as admin:
        admin.create_topic(IN, IN_PARTS, config={"segment_bytes": 4 << 20, "segment_count": 4})
        admin.create_topic(OUT, OUT_PARTS, config={"segment_bytes": 8 << 20, "segment_count": 8})
    feeder = Producer(root.path)
    tps = [TopicPartition(IN, p) for p in range(IN_PARTS)]
    probe = Consumer(root=root.path, group_id=GROUP, enable_auto_commit=False)
    # Committed inputs each second, for the report; in a thread, so that its
    # calls to the coordinator never hold up the nemesis or the input.
    progress: List[int] = []
    chaos_over = threading.Event()

    def sample() -> None:
        while not chaos_over.wait(1.0):
            progress.append(sum(probe.committed(tp) or 0 for tp in tps))
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stages = {i: reaper.start(_stage, root.path, i, notes) for i in range(STAGES)}
    rng = random.Random(1313)
    kills = {"stage": 0, "coordinator": 0, "exited": 0}
    written = 0
    t0 = time.monotonic()
    next_kill = t0 + rng.uniform(0.4, 1.2)
    event = 0
    coordinator: Tuple[Optional[int], float] = (root.coordinator_pid(), t0)
    kill_coordinator_next = False
    while True:
        now = time.monotonic()
        if now - t0 >= CHAOS_S:
            break
        # The input, at the rate that spreads it over FEED_S.
        target = min(RECORDS, int(RECORDS * (now - t0) / FEED_S) // CHUNK * CHUNK + CHUNK)
        while written < target:
            vals = [b"%d" % i for i in range(written, written + CHUNK)]
            for part in range(IN_PARTS):
                feeder.send_batch(IN, vals[part::IN_PARTS], partition=part)
            written += CHUNK
        pid = root.coordinator_pid()
        if pid != coordinator[0]:
            coordinator = (pid, now)                  # a successor is serving since about now
        if kill_coordinator_next and pid is not None and now - coordinator[1] >= COORDINATOR_UP_S:
            _note(notes, f"nemesis: SIGKILL coordinator pid {pid}")
            kill_coordinator(root)                    # the next client call starts a successor
            kills["coordinator"] += 1
            kill_coordinator_next = False
        if now >= next_kill:
            event += 1
            if event % 3 == 2:
                kill_coordinator_next = True          # once the current one has served a while
            else:
                i = rng.randrange(STAGES)
                _note(notes, f"nemesis: SIGKILL stage {i} pid {stages[i].pid}")
                _kill(stages[i])
                kills["stage"] += 1
                time.sleep(rng.uniform(0.0, 0.3))
                stages[i] = reaper.start(_stage, root.path, i, notes)   # same transactional id: fences the old one
            next_kill = time.monotonic() + rng.uniform(0.4, 1.2)
        _restart_exited(stages, root.path, notes, reaper, kills)
        time.sleep(0.01)
    chaos_over.set()
    sampler.join(30)
    feeder.close()
    chaos_end = time.monotonic()
    # Let the stages finish the input.
    ends = {tp: probe.get_watermark_offsets(tp)[1] for tp in tps}
    assert written == RECORDS and sum(ends.values()) == RECORDS
    at_chaos_end = sum(probe.committed(tp) or 0 for tp in tps)
    deadline = time.monotonic() + FINISH_S
    while True:
        committed = {tp: probe.committed(tp) for tp in tps}
        if committed == ends:
            break
        if time.monotonic() > deadline:
            with Admin(root.path) as admin:
                group = admin.describe_group(GROUP)
            tail = open(notes).read().splitlines()[-15:] if os.path.exists(notes) else []
            raise AssertionError(f"the stages did not finish: committed {committed} of {ends}; group {group}; "
                                 f"stage errors and kills (last 15): {tail}")
        _restart_exited(stages, root.path, notes, reaper, kills)
        time.sleep(0.2)
    probe.close()
    finished = time.monotonic() - t0
    for proc in stages.values():
        _kill(proc)
    # Every input exactly once in the committed output.
    reader = Consumer(root=root.path, isolation_level="read_committed", auto_offset_reset="earliest")
    reader.assign([TopicPartition(OUT, p) for p in range(OUT_PARTS)])
    seen: Dict[int, List[int]] = {p: [] for p in range(OUT_PARTS)}
    total = 0
    deadline = time.monotonic() + 30
    end = None
    while end is None or time.monotonic() < end:
        for m in reader.consume(5000, timeout=0.1):
            seen[m.partition].append(int(m.value[4:]))
            total += 1
        if end is None and (total >= RECORDS or time.monotonic() > deadline):
            end = time.monotonic() + 0.5              # then a short wait for any surplus
    reader.close()
    raw = Consumer(root=root.path, auto_offset_reset="earliest")    # read_uncommitted: aborted work too
    raw.assign([TopicPartition(OUT, p) for p in range(OUT_PARTS)])
    ends_out = sum(raw.get_watermark_offsets(TopicPartition(OUT, p))[1] for p in range(OUT_PARTS))
    raw.close()
    counts = collections.Counter(v for vs in seen.values() for v in vs)
    dups = {v: n for v, n in counts.items() if n > 1}
    missing = RECORDS - len(counts)
    print(f"exactly-once chaos: {RECORDS} inputs, {total} committed outputs, kills {kills}, "
          f"{at_chaos_end} inputs committed when the chaos ended, all {finished:.1f} s after the start "
          f"({time.monotonic() - chaos_end:.1f} s of catching up and checking), "
          f"{len(dups)} duplicated, {missing} missing; output log end offsets {ends_out} "
          f"(aborted records and markers included); thousands of inputs committed "
          f"after each second of chaos (of {RECORDS * 1e-3 / FEED_S:.1f} more written each second): "
          f"{' '.join(str(n // 1000) for n in progress)}")
    assert kills["stage"] > 0 and kills["coordinator"] > 0
    assert not dups, f"inputs processed more than once: {list(dups.items())[:5]}"
    assert set(counts) == set(range(RECORDS))
    # Each input partition's records in their order in every output partition.
    for p, vs in seen.items():
        for q in range(IN_PARTS):
            of_q = [v for v in vs if v % IN_PARTS == q]
            assert of_q == sorted(of_q), f"output partition {p}: inputs of partition {q} out of order"
