"""Nothing lost at the defaults: live readers hold producers back.

A topic created with the defaults recycles a ring segment only once every
live tethered reader (consumers, LogReaders) and every consumer group's
committed offset is past it. A producer facing a full ring waits, then raises
``KafkaTimeoutError`` naming the reader that holds it. ``overflow="overwrite"``
is opt-in; an overrun reader is told how many records it missed.

Every test uses its own root and kills every process it started.
"""
from __future__ import annotations

import os
import signal
import struct
import time
from typing import Any, List

import pytest

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import KafkaTimeoutError, OffsetOutOfRange
from shmq.ringlog import NO_FLOOR, PartitionLog

SMALL_RING = {"segment_bytes": 64 << 10, "segment_count": 4}   # 256 KiB: about 1,800 records of 64 B
VALUE = struct.Struct("<Q56x")                                  # 64 B, carries its sequence number


def wait_for(cond: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)


def leader_log(root: str, topic: str, partition: int = 0) -> PartitionLog:
    from shmq.cluster import Cluster
    return Cluster(root).log(topic, partition)


def ring_bytes(cfg: dict) -> int:
    return cfg["segment_bytes"] * cfg["segment_count"]


# ------------------------------------------------------------------ workers
def fast_producer(root: str, topic: str, count: int, max_block_ms: int = 60_000) -> None:
    with Producer(root, max_block_ms=max_block_ms) as p:
        for i in range(count):
            p.send(topic, VALUE.pack(i), partition=0)


def sleepy_consumer(root: str, topic: str, count: int, out: Any) -> None:
    """Read count records (a default consumer: CRC checked), sleeping 1 ms every 1,000; report
    ("done", how many, how many out of order or duplicated). A value starts with its sequence number."""
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, 0)])
        expect, bad = 0, 0
        while expect < count:
            for m in c.consume(500, timeout=5.0):
                if struct.unpack_from("<Q", m.value)[0] != expect or m.offset != expect:
                    bad += 1
                expect += 1
                if expect % 1000 == 0:
                    time.sleep(0.001)
        out.put(("done", expect, bad))


# -------------------------------------------------------------------- tests
@pytest.mark.timeout(120)
def test_producer_blocks_for_a_slow_consumer_and_every_record_arrives_once_in_order(root, reaper):
    import multiprocessing as mp
    Admin(root.path).create_topic("laps", 1, SMALL_RING)
    count = 60_000                       # about 30 laps of the 256 KiB ring
    out = mp.get_context("fork").Queue()
    cons = reaper.start(sleepy_consumer, root.path, "laps", count, out)
    plog = leader_log(root.path, "laps")
    wait_for(lambda: len(plog.readers()) == 1, 10, "the consumer's reader slot")
    prod = reaper.start(fast_producer, root.path, "laps", count)
    prod.join(90)
    assert prod.exitcode == 0, "the producer failed or hung"
    kind, got, bad = out.get(timeout=60)
    cons.join(10)
    assert (kind, got, bad) == ("done", count, 0)
    laps = plog.end_offset * (64 + 80) / ring_bytes(SMALL_RING)
    blocked_s = plog.blocked_seconds
    print(f"{count} records, ~{laps:.0f} laps of the ring; the producer waited {plog.blocked_count} times, "
          f"{blocked_s * 1000:.0f} ms in all")
    assert plog.end_offset == count and plog.start_offset > 0, "the ring turned"
    assert laps >= 20
    assert plog.blocked_count > 0, "the producer never had to wait: the test proves nothing"


DEFAULT_VALUE_BYTES = 8 << 10                                   # 8 KiB records: 20 laps of 64 MiB in ~170,000 sends


def default_size_producer(root: str, topic: str, count: int, size: int, out: Any) -> None:
    """Send ``count`` records of ``size`` bytes as fast as possible; report how long
    this producer waited for room (the partition's blocked-time counters, as
    ``shmq status`` shows them, before and after: it is the partition's only producer)."""
    from shmq.cluster import Cluster
    plog = Cluster(root).log(topic, 0)
    n0, ns0 = plog.blocked_count, plog.blocked_seconds
    body = bytearray(size)
    t0 = time.monotonic()
    with Producer(root) as p:
        for i in range(count):
            struct.pack_into("<Q", body, 0, i)
            p.send(topic, bytes(body), partition=0)
    out.put(("produced", plog.blocked_count - n0, plog.blocked_seconds - ns0, time.monotonic() - t0))


@pytest.mark.timeout(180)
def test_a_default_topic_holds_a_fast_producer_for_a_sleepy_consumer_for_20_laps(root, reaper):
    """The issue's test at the defaults: 8 x 8 MiB ring, overflow=block, CRC on."""
    import multiprocessing as mp
    from shmq.coordinator.topic_config import DEFAULTS
    Admin(root.path).create_topic("dlaps", 1)
    plog = leader_log(root.path, "dlaps")
    cfg = plog.config
    assert (cfg.segment_bytes, cfg.segment_count, cfg.overflow) == (DEFAULTS["segment_bytes"],
                                                                    DEFAULTS["segment_count"], "block")
    ring = cfg.segment_bytes * cfg.segment_count
    count = 21 * ring // DEFAULT_VALUE_BYTES
    out = mp.get_context("fork").Queue()
    cons = reaper.start(sleepy_consumer, root.path, "dlaps", count, out)
    wait_for(lambda: len(plog.readers()) == 1, 10, "the consumer's reader slot")
    prod = reaper.start(default_size_producer, root.path, "dlaps", count, DEFAULT_VALUE_BYTES, out)
    results = dict((r[0], r[1:]) for r in (out.get(timeout=150), out.get(timeout=150)))
    prod.join(10)
    cons.join(10)
    assert prod.exitcode == 0 and cons.exitcode == 0
    waits, blocked_s, took = results["produced"]
    got, bad = results["done"]
    laps = plog.end_offset / (ring // (DEFAULT_VALUE_BYTES + 80))
    print(f"{count} records of {DEFAULT_VALUE_BYTES} B ({count * DEFAULT_VALUE_BYTES / 1e9:.2f} GB, ~{laps:.0f} laps "
          f"of the {ring >> 20} MiB ring) in {took:.1f} s; the producer waited {waits} times, "
          f"{blocked_s * 1000:.0f} ms in all")
    assert (got, bad) == (count, 0), "every record delivered once, in order"
    assert plog.end_offset == count and plog.start_offset > 0, "the ring turned"
    assert laps >= 20
    assert waits > 0 and blocked_s > 0, "the producer never had to wait: the test proves nothing"


@pytest.mark.timeout(60)
def test_a_killed_consumer_frees_the_ring_for_a_blocked_producer_at_once(root, reaper):
    import multiprocessing as mp
    Admin(root.path).create_topic("k", 1, SMALL_RING)
    out = mp.get_context("fork").Queue()
    cons = reaper.start(_hold_at_start, root.path, "k", out)
    assert out.get(timeout=20)[0] == "ready"
    plog = leader_log(root.path, "k")
    prod = reaper.start(fast_producer, root.path, "k", 50_000)
    wait_for(lambda: int(plog._hdr.space_waiters) > 0, 20, "the producer to block on the full ring")
    stalled = plog.end_offset
    time.sleep(0.1)
    assert plog.end_offset == stalled and prod.is_alive(), "the ring is full: the producer must wait"
    t0 = time.monotonic()
    os.kill(cons.pid, signal.SIGKILL)
    wait_for(lambda: plog.end_offset > stalled, 5, "the producer to go on")
    went_on_ms = (time.monotonic() - t0) * 1000
    print(f"producer went on {went_on_ms:.1f} ms after the kill")
    assert went_on_ms < 100
    prod.join(30)
    assert prod.exitcode == 0 and plog.end_offset == 50_000
    assert plog.readers() == []


def _hold_at_start(root: str, topic: str, out: Any) -> None:
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, 0)])
        c.poll(0)
        out.put(("ready", os.getpid()))
        time.sleep(600)


@pytest.mark.timeout(60)
def test_a_stopped_consumer_makes_the_producer_time_out_naming_it_and_reads_on_without_a_gap(root, reaper):
    import multiprocessing as mp
    Admin(root.path).create_topic("s", 1, SMALL_RING)
    ctx = mp.get_context("fork")
    out, go = ctx.Queue(), ctx.Queue()
    first = 100                                 # read before the stop: the consumer's position is 100
    with Producer(root.path) as p:
        for i in range(first):
            p.send("s", VALUE.pack(i), partition=0)
    cons = reaper.start(_stop_then_read, root.path, "s", out, go, first)
    kind, pid = out.get(timeout=20)
    assert kind == "ready"
    os.kill(pid, signal.SIGSTOP)
    sent = first
    max_block_ms = 500
    with Producer(root.path, max_block_ms=max_block_ms) as p:
        with pytest.raises(KafkaTimeoutError) as ei:
            while True:
                t_send = time.monotonic()       # the wait is the last send's alone, not the sends before it
                p.send("s", VALUE.pack(sent), partition=0)
                sent += 1
        waited = time.monotonic() - t_send
        msg = str(ei.value)
        print(f"the blocked send waited {waited * 1000:.0f} ms: {msg}")
        assert "consumer" in msg and f"process {pid}" in msg, "names the stopped consumer's pid"
        assert "s-0" in msg, "names the partition"
        assert f"at offset {first} " in msg, "names the stopped consumer's position"
        assert sent > 1000
    plog = leader_log(root.path, "s")
    assert plog.start_offset == 0 and plog.end_offset == sent, "nothing stored was dropped"
    assert waited >= max_block_ms / 1000, "the producer waited max_block_ms before it gave up"
    os.kill(pid, signal.SIGCONT)
    go.put(sent)
    kind, seen = out.get(timeout=30)
    assert seen == list(range(sent)), "the consumer read on with no gap"
    cons.join(10)


def _stop_then_read(root: str, topic: str, out: Any, go: Any, first: int) -> None:
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, 0)])
        seen: List[int] = []
        while len(seen) < first:
            seen += [m.offset for m in c.consume(first - len(seen), timeout=5.0)]
        out.put(("ready", os.getpid()))
        end = go.get(timeout=60)
        while len(seen) < end:
            for m in c.consume(1000, timeout=5.0):
                assert VALUE.unpack(m.value)[0] == m.offset
                seen.append(m.offset)
        out.put(("seen", seen))


def group_reader(root: str, topic: str, group: str, count: int, pause_every: int, out: Any) -> None:
    """A group member (or, with group None, an assigned reader) that commits as it goes."""
    kw = {"group_id": group} if group else {}
    with Consumer(*([topic] if group else []), root=root, auto_offset_reset="earliest", **kw) as c:
        if not group:
            c.assign([TopicPartition(topic, 0)])
        got = []
        while len(got) < count:
            for m in c.consume(200, timeout=5.0):
                got.append(VALUE.unpack(m.value)[0])
                if len(got) % pause_every == 0:
                    time.sleep(0.002)
            if group:
                c.commit(asynchronous=False)
        out.put((group or "assigned", got == list(range(count)), len(got)))


@pytest.mark.timeout(120)
def test_two_groups_and_an_assigned_reader_at_different_speeds_lose_nothing(root, reaper):
    import multiprocessing as mp
    Admin(root.path).create_topic("multi", 1, SMALL_RING)
    count = 20_000
    out = mp.get_context("fork").Queue()
    readers = [reaper.start(group_reader, root.path, "multi", g, count, every, out)
               for g, every in (("fast", 5000), ("slow", 300), (None, 1000))]
    plog = leader_log(root.path, "multi")
    wait_for(lambda: len(plog.readers()) == 3, 20, "three readers in the reader table")
    prod = reaper.start(fast_producer, root.path, "multi", count)
    prod.join(90)
    assert prod.exitcode == 0
    results = sorted(out.get(timeout=60) for _ in readers)
    for r in readers:
        r.join(10)
    assert results == [("assigned", True, count), ("fast", True, count), ("slow", True, count)]
    assert plog.start_offset > 0, "the ring turned under them"


@pytest.mark.timeout(60)
def test_a_group_with_no_live_member_holds_the_ring_at_its_committed_offset(root):
    Admin(root.path).create_topic("g", 1, SMALL_RING)
    with Producer(root.path) as p:
        for i in range(100):
            p.send("g", VALUE.pack(i), partition=0)
    with Consumer("g", root=root.path, group_id="gone", auto_offset_reset="earliest") as c:
        got = c.consume(50, timeout=10)
        assert len(got) == 50
        c.commit(asynchronous=False)
    plog = leader_log(root.path, "g")
    wait_for(lambda: plog.slowest_position == 50, 10, "the group's committed floor")
    with Producer(root.path, max_block_ms=300) as p:
        with pytest.raises(KafkaTimeoutError, match="committed offset 50"):
            for i in range(100, 100_000):
                p.send("g", VALUE.pack(i), partition=0)
    assert plog.start_offset == 0
    Admin(root.path).delete_group("gone")
    wait_for(lambda: plog.slowest_position == NO_FLOOR, 10, "the floor released with the group")
    with Producer(root.path, max_block_ms=300) as p:
        for i in range(5000):
            p.send("g", VALUE.pack(i), partition=0)
    assert plog.start_offset > 0


def test_an_untethered_reader_never_holds_producers_back(shm_dir):
    log = PartitionLog.create(os.path.join(shm_dir, "u-0"), segment_bytes=4096, segment_count=3)
    assert log.config.overflow == "block"
    r = log.reader(0, tether=False)
    for i in range(2000):
        log.append(b"%08d" % i, timeout=0.5)
    assert log.start_offset > 0
    with pytest.raises(OffsetOutOfRange):
        r.read(10)
    tethered = log.reader(log.end_offset)
    assert [x.tethered for x in log.readers()] == [False, True]
    with pytest.raises(KafkaTimeoutError, match="reader"):
        for i in range(2000):
            log.append(b"%08d" % i, timeout=0.1)
    tethered.close()
    r.close()
    assert log.readers() == []
    log.append(b"free again", timeout=0.1)
    log.close()


def test_an_overrun_reader_of_an_overwriting_ring_is_told_how_many_records_it_missed(shm_dir):
    log = PartitionLog.create(os.path.join(shm_dir, "o-0"), segment_bytes=4096, segment_count=3,
                              overflow="overwrite")
    for i in range(10):
        log.append(b"%08d" % i)
    r = log.reader(0)
    first = r.read(3)
    assert [x.offset for x in first] == [0, 1, 2]
    for i in range(10, 3000):
        log.append(b"%08d" % i)
    start = log.start_offset
    assert start > 3
    with pytest.raises(OffsetOutOfRange) as ei:
        r.read(10)
    assert ei.value.missed == start - 3
    assert f"missed {start - 3} records" in str(ei.value)
    assert [x.missed for x in log.readers()] == [start - 3]
    r.close()
    log.close()


def test_a_consumer_is_listed_with_its_position_in_the_reader_table(root):
    Admin(root.path).create_topic("t", 1, SMALL_RING)
    with Producer(root.path) as p:
        for i in range(10):
            p.send("t", VALUE.pack(i), partition=0)
    plog = leader_log(root.path, "t")
    with Consumer("t", root=root.path, group_id="billing", auto_offset_reset="earliest") as c:
        assert len(c.consume(10, timeout=10)) == 10
        [r] = plog.readers()
        assert (r.pid, r.position, r.kind, r.label, r.tethered) == (os.getpid(), 10, "consumer", "billing", True)
    assert plog.readers() == []


def test_a_forked_child_never_moves_or_frees_its_parents_reader_slot(shm_dir):
    log = PartitionLog.create(os.path.join(shm_dir, "f-0"), segment_bytes=4096, segment_count=3)
    for i in range(10):
        log.append(b"%08d" % i)
    r = log.reader(0)
    assert len(r.read(2)) == 2
    pid = os.fork()
    if pid == 0:                        # the child reads on with the inherited reader, then closes it
        ok = len(r.read(5)) == 5
        r.close()
        os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.WEXITSTATUS(status) == 0
    [slot] = log.readers()
    assert (slot.pid, slot.position) == (os.getpid(), 2)
    r.close()
    log.close()
