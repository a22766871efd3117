"""A file of a partition truncated, shrunk to zero or unlinked under a live
reader and a live producer (separate processes) is a KafkaStorageError
naming the file in each of them, never a SIGBUS; both go on with their other
partition.

Truncation past a page a process touches raises SIGBUS inside the C core,
which turns it into the error (shmq/native/log_guard.c); a file that is
unlinked, or shrunk within its last page, is found by the periodic check of
the files against what was mapped (at most a second apart)."""
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
    ra, rb = la.reader(0, tether=False), lb.reader(0, tether=False)
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
    t0 = time.monotonic()
    errors: Dict[str, Tuple[str, str]] = {}
    done: Dict[str, int] = {}
    while len(errors) < 2 and time.monotonic() < t0 + 10:
        try:
            what, role, arg = q.get(timeout=0.5)
        except queue.Empty:
            continue
        (errors if what == "error" else done)[role] = arg
    took = time.monotonic() - t0
    time.sleep(0.5)                          # and both go on with partition b
    stop.set()
    while len(done) < 2:
        try:
            what, role, arg = q.get(timeout=10)
        except queue.Empty:
            break
        (errors if what == "error" else done)[role] = arg
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
