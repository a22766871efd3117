"""A file of a partition truncated, shrunk to zero or unlinked under a live
reader and a live producer (separate processes) is a KafkaStorageError
naming the file in each of them, never a SIGBUS; both go on with their other
partition.

Truncation past a page a process touches raises SIGBUS inside the C core,
which turns it into the error (shmq/native/log_guard.c); a file that is
unlinked, or shrunk within its last page, is found by the periodic check of
the files against what was mapped (at most a second apart).

The same through the default clients (Producer with the C send and with
SHMQ_FASTPATH=0, Consumer poll and consume_arrays) on a topic of two
partitions: each gets the error, the coordinator and every client live on,
and partition 1 keeps working for all of them, whether a consumer pauses
the failed partition or just keeps polling (the Consumer sets it aside,
raises its error again at most once per retry_backoff_ms, and goes on with
partition 1)."""
from __future__ import annotations

import mmap
import multiprocessing as mp
import os
import queue
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from shmq.errors import OffsetOutOfRange, ShmqError
from shmq.ringlog import PartitionLog

CTX = mp.get_context("fork")
SLOTS = 4
BUDGET = 20.0        # seconds a process runs at most


def _producer(a: str, b: str, q: Any, stop: Any) -> None:
    la, lb = PartitionLog(a), PartitionLog(b)
    err: Optional[Tuple[str, str]] = None
    after = i = 0
    q.put(("ready", "producer", None))
    end = time.monotonic() + BUDGET
    while time.monotonic() < end and not stop.is_set():
        if err is None:
            try:
                la.append(b"a%d" % i, timeout=2)
            except ShmqError as e:
                err = (type(e).__name__, str(e))
                q.put(("error", "producer", err))
        lb.append(b"b%d" % i, timeout=2)
        i += 1
        if err is not None:
            after += 1
        if i % 20 == 0:
            time.sleep(0.001)
    q.put(("done", "producer", after))


def _reader(a: str, b: str, q: Any, stop: Any) -> None:
    la, lb = PartitionLog(a), PartitionLog(b)
    # From the log end: the producer may already have lapped the overwriting
    # ring, so offset 0 can be out of range by now.
    ra, rb = la.reader(la.end_offset, tether=False), lb.reader(lb.end_offset, tether=False)
    err: Optional[Tuple[str, str]] = None
    after = 0
    q.put(("ready", "reader", None))
    end = time.monotonic() + BUDGET
    while time.monotonic() < end and not stop.is_set():
        if err is None:
            try:
                try:
                    ra.read(256)
                except OffsetOutOfRange:
                    ra.seek(la.start_offset)
            except ShmqError as e:
                err = (type(e).__name__, str(e))
                q.put(("error", "reader", err))
        try:
            got = len(rb.read(256, timeout=0.002))
        except OffsetOutOfRange:
            rb.seek(lb.start_offset)
            continue
        if err is not None:
            after += got
    q.put(("done", "reader", after))


def _damage(path: str, kind: str, action: str) -> List[str]:
    """Damage every file of one kind; returns their paths."""
    ext = {"segment": "log", "index": "index", "timeindex": "timeindex"}.get(kind)
    names = [f"{i}.{ext}" for i in range(SLOTS)] if ext else ["partition.ctl"]
    paths = [os.path.join(path, n) for n in names]
    for p in paths:
        if action == "unlink":
            os.unlink(p)
        else:
            os.truncate(p, 0 if action == "zero" else os.path.getsize(p) // 2)
    return paths


def _errors_then_done(q: Any, stop: Any, n: int, settle: float) -> Tuple[Dict[str, Any], Dict[str, Any], float]:
    """After the damage: the ("error", who, what) of n processes (10 s at
    most), then settle seconds more of work, then stop and their ("done",
    who, what). Returns errors, done and how long the errors took."""
    t0 = time.monotonic()
    errors: Dict[str, Any] = {}
    done: Dict[str, Any] = {}
    while len(errors) < n and time.monotonic() < t0 + 10:
        try:
            what, who, arg = q.get(timeout=0.5)
        except queue.Empty:
            continue
        (errors if what == "error" else done)[who] = arg
    took = time.monotonic() - t0
    time.sleep(settle)
    stop.set()
    while len(done) < n:
        try:
            what, who, arg = q.get(timeout=15)
        except queue.Empty:
            break
        (errors if what == "error" else done)[who] = arg
    return errors, done, took


@pytest.mark.timeout(60)
@pytest.mark.parametrize("action", ["truncate", "zero", "unlink"])
@pytest.mark.parametrize("kind", ["segment", "index", "timeindex", "control"])
def test_damaged_file_is_a_storage_error_in_live_processes_never_a_signal(
        shm_dir: str, reaper: Any, kind: str, action: str) -> None:
    a, b = os.path.join(shm_dir, "a-0"), os.path.join(shm_dir, "b-0")
    for p in (a, b):
        PartitionLog.create(p, segment_bytes=1 << 16, segment_count=SLOTS, index_interval_bytes=1024,
                            overflow="overwrite").close()
    q, stop = CTX.Queue(), CTX.Event()
    procs = [reaper.start(_producer, a, b, q, stop), reaper.start(_reader, a, b, q, stop)]
    for _ in procs:
        assert q.get(timeout=15)[0] == "ready"
    time.sleep(0.3)                          # both are busy with both partitions
    damaged = _damage(a, kind, action)
    errors, done, took = _errors_then_done(q, stop, 2, 0.5)   # both go on with partition b for 0.5 s
    for p in procs:
        p.join(10)
        assert p.exitcode == 0, f"{kind}/{action}: a process ended with {p.exitcode} (negative: killed by a signal)"
    assert set(errors) == {"producer", "reader"}, f"{kind}/{action}: errors after {took:.1f} s: {errors}"
    for role, (cls, msg) in errors.items():
        assert cls == "KafkaStorageError", f"{role}: {cls}: {msg}"
        assert any(p in msg for p in damaged), f"{role}: {msg} names none of {damaged}"
        assert done.get(role, 0) > 0, f"{role}: no record of the healthy partition after the failure ({done})"
    print(f"{kind}/{action}: both failed within {took:.2f} s: {errors['reader'][1]}")


def _touch_truncated_mapping(log_dir: str, path: str) -> None:
    PartitionLog(log_dir)                    # the C core's SIGBUS handler is installed now
    with open(path, "w+b") as f:
        f.truncate(8192)
        m = mmap.mmap(f.fileno(), 8192)
    os.truncate(path, 0)
    m[4096]                                  # not a log's mapping: SIGBUS as always


def test_a_sigbus_outside_the_logs_still_kills_the_process(shm_dir: str, reaper: Any) -> None:
    log_dir = os.path.join(shm_dir, "l-0")
    PartitionLog.create(log_dir, segment_bytes=1 << 16, segment_count=2).close()
    p = reaper.start(_touch_truncated_mapping, log_dir, os.path.join(shm_dir, "other"))
    p.join(20)
    assert p.exitcode == -signal.SIGBUS


def _topic_of_two_partitions(root: str) -> None:
    from shmq import Admin, Producer
    with Admin(root) as admin:
        admin.create_topic("st", 2)
    with Producer(root) as prod:
        for i in range(20):
            prod.send("st", b"v%d" % i, partition=i % 2)


def _consume_two_partitions(root: str, q: Any) -> None:
    from shmq import Consumer, TopicPartition
    c = Consumer(root=root, enable_auto_commit=False, auto_offset_reset="earliest")
    c.assign([TopicPartition("st", 0), TopicPartition("st", 1)])
    got = 0
    end = time.monotonic() + BUDGET
    while time.monotonic() < end:
        try:
            got += len(c.consume(100, timeout=0.5))    # idle: sleeps on both partitions' doorbells
        except ShmqError as e:
            q.put(("error", type(e).__name__, str(e), got))
            return
        if got >= 20:
            q.put(("caught up", "", "", got))
    q.put(("no error", "", "", got))


@pytest.mark.timeout(60)
def test_a_consumer_waiting_on_two_partitions_gets_a_storage_error_when_a_control_block_vanishes(
        shm_dir: str, reaper: Any) -> None:
    from shmq.root import Root
    root = Root(os.path.join(shm_dir, "r"))
    setup = reaper.start(_topic_of_two_partitions, root.path)   # no coordinator client in this process
    setup.join(30)
    assert setup.exitcode == 0
    q = CTX.Queue()
    p = reaper.start(_consume_two_partitions, root.path, q)
    what = q.get(timeout=30)
    assert what[0] == "caught up", what
    time.sleep(0.3)                              # asleep in the wait over both partitions
    ctl = os.path.join(root.partition_dir("st", 0), "partition.ctl")
    os.truncate(ctl, 0)
    while what[0] == "caught up":
        what = q.get(timeout=30)
    p.join(10)
    assert p.exitcode == 0, f"the consumer ended with {p.exitcode} (negative: killed by a signal)"
    assert what[:2] == ("error", "KafkaStorageError"), what
    assert ctl in what[2], what


# ---------------------------------------------------------------------------
# The default clients: Producer (the C send, and SHMQ_FASTPATH=0) and
# Consumer (poll and consume_arrays) on a topic of two partitions, each in
# its own process, while one partition's files are damaged.

TOPIC = "sf"
CLIENTS = [("producer", True), ("producer", False), ("poll", True), ("poll", False), ("arrays", True)]


def _client(root: str, role: str, fast: bool, pause: bool, q: Any, stop: Any) -> None:
    if not fast:
        os.environ["SHMQ_FASTPATH"] = "0"        # read when a client attaches (shmq/native/fastpath.py)
    else:                                        # both ways, whatever the run's switch (pytest --fastpath=off)
        os.environ.pop("SHMQ_FASTPATH", None)
    from shmq import Consumer, Producer, TopicPartition
    from shmq.native import fastpath
    name = f"{role}{'' if fast else ' (SHMQ_FASTPATH=0)'}"
    assert fastpath.enabled() == fast
    err: Optional[Tuple[str, str]] = None
    after = errors = 0                           # records of partition 1 after the error, errors seen
    end = time.monotonic() + BUDGET
    if role == "producer":
        p = Producer(root)
        assert (p._fast is not None) == fast, name
        q.put(("ready", name, None))
        i = 0
        while time.monotonic() < end and not stop.is_set():
            if err is None:
                try:
                    p.send(TOPIC, b"a%d" % i, partition=0)
                except ShmqError as e:
                    err = (type(e).__name__, str(e))
                    q.put(("error", name, err))
            p.send(TOPIC, b"b%d" % i, partition=1)
            i += 1
            if err is not None:
                after += 1
            if i % 10 == 0:
                time.sleep(0.001)
        p.close()
    else:
        c = Consumer(root=root, enable_auto_commit=False, auto_offset_reset="earliest")
        c.assign([TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
        seen = [0, 0]
        ready = False
        while time.monotonic() < end and not stop.is_set():
            try:
                if role == "poll":
                    m = c.poll(0.05)
                    got = [(m.partition, 1)] if m is not None else []
                else:
                    r = c.consume_arrays(1000, 0.05)
                    got = [(r[0].partition, len(r[1].offsets))] if r is not None else []
            except ShmqError as e:
                errors += 1
                if err is None:
                    err = (type(e).__name__, str(e))
                    q.put(("error", name, err))
                    if pause:                    # what a user can do: set the failed partition aside
                        assert (e.topic, e.partition) == (TOPIC, 0), (e.topic, e.partition, str(e))
                        c.pause([TopicPartition(TOPIC, 0)])
                continue
            for part, n in got:
                seen[part] += n
                if err is not None and part == 1:
                    after += n
            if not ready and all(seen):
                ready = True
                q.put(("ready", name, None))
        c.close()
    q.put(("done", name, (after, errors)))


def _damage_partition(path: str, damage: str) -> List[str]:
    """Damage one partition's files; returns the paths damaged."""
    if damage == "unlink":
        paths = [os.path.join(path, n) for n in sorted(os.listdir(path))
                 if n == "partition.ctl" or n.endswith((".log", ".index", ".timeindex"))]
        for p in paths:
            os.unlink(p)
        return paths
    if damage == "segment":
        paths = [os.path.join(path, n) for n in sorted(os.listdir(path)) if n.endswith(".log")]
        for p in paths:
            os.truncate(p, 4096)                 # as `truncate -s 4096 <slot>.log`
        return paths
    paths = [os.path.join(path, "partition.ctl")]
    os.truncate(paths[0], 0)
    return paths


@pytest.mark.timeout(90)
@pytest.mark.parametrize("consumers", ["pause the failed partition", "keep polling"])
@pytest.mark.parametrize("damage", ["segment", "control", "unlink"])
def test_default_producers_and_consumers_get_a_storage_error_and_keep_the_other_partition(
        root: Any, reaper: Any, damage: str, consumers: str) -> None:
    from shmq import Admin
    with Admin(root.path) as admin:
        admin.create_topic(TOPIC, 2, {"segment_bytes": 1 << 20, "segment_count": 4})
    coordinator = root.coordinator_pid()
    assert coordinator is not None
    q, stop = CTX.Queue(), CTX.Event()
    pause = consumers.startswith("pause")
    procs = {f"{r}{'' if f else ' (SHMQ_FASTPATH=0)'}": reaper.start(_client, root.path, r, f, pause, q, stop)
             for r, f in CLIENTS}
    ready: set = set()
    while len(ready) < len(procs):
        what, name, _ = q.get(timeout=30)
        assert what == "ready", (what, name, _)
        ready.add(name)
    time.sleep(0.3)                              # every client is busy with both partitions
    damaged = _damage_partition(root.partition_dir(TOPIC, 0), damage)
    errors, done, took = _errors_then_done(q, stop, len(procs), 1.0)   # every client goes on with partition 1
    for name, p in procs.items():
        p.join(15)
        assert p.exitcode == 0, f"{damage}: {name} ended with {p.exitcode} (negative: killed by a signal)"
    assert root.coordinator_pid() == coordinator, f"{damage}: the coordinator died"
    assert set(errors) == set(procs), f"{damage}: errors after {took:.1f} s: {errors}"
    for name, (cls, msg) in errors.items():
        assert cls == "KafkaStorageError", f"{damage}: {name}: {cls}: {msg}"
        assert any(p in msg for p in damaged), f"{damage}: {name}: {msg} names none of {damaged}"
        assert done[name][0] > 0, f"{damage}: {name}: nothing of partition 1 after the error ({done})"
        if not pause:                            # raised again at most once per retry_backoff_ms (100)
            assert done[name][1] <= (took + 3.0) / 0.1 + 2, f"{damage}: {name}: errors {done[name][1]}"
    print(f"{damage}: every client failed within {took:.2f} s; after the error (records of partition 1, "
          f"errors): {done}")
