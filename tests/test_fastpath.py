"""The per-record path in C (shmq/native/fastpath.c) against the Python path.

* Both paths write byte-identical batches (hypothesis over keys, values,
  headers, None, sizes up to max_message_bytes), and kafka-python decodes them.
* Bad input to every C entry point raises the shmq exception the Python path
  raises, never crashes: wrong types, str values, bad partitions, a closed
  client, a deleted topic, a fork after use.
* Many calls leave RSS and the reference counts of shared objects flat.
* A producer killed (or stopped) inside the C send leaves a claim that is
  unblocked; no other record moves.
* The Producer and Consumer API suites pass with the fast path switched off
  (``SHMQ_FASTPATH=0``; ``pytest --fastpath=off`` runs the whole suite so).
"""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import pickle
import signal
import struct
import subprocess
import sys
import time
from typing import Any, Iterator, List, Tuple

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch

from shmq import (Admin, CommitFailed, Consumer, IllegalState, InvalidConfig, InvalidRecord, InvalidTopic, Message,
                  MessageSizeTooLarge, Producer, TopicPartition, UnknownTopicOrPartition)
from shmq.cluster import Cluster
from shmq.native import fastpath

pytestmark = [pytest.mark.timeout(120),
              pytest.mark.skipif(fastpath._ext is None, reason="the _fastpath extension was not built here")]

_names = itertools.count()
MAX_BYTES = 3000
SMALL = {"segment_bytes": 1 << 20, "segment_count": 4, "max_message_bytes": MAX_BYTES, "overflow": "overwrite"}
TS = 1_700_000_000_000


@contextlib.contextmanager
def fastpath_off() -> Iterator[None]:
    old = os.environ.get("SHMQ_FASTPATH")
    os.environ["SHMQ_FASTPATH"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["SHMQ_FASTPATH"]
        else:
            os.environ["SHMQ_FASTPATH"] = old


@pytest.fixture(scope="module")
def root(module_root: str) -> str:
    return module_root


@pytest.fixture(scope="module")
def admin(module_admin: Admin) -> Admin:
    return module_admin


def new_topic(admin: Admin, partitions: int = 1, **config: Any) -> str:
    name = f"fp{next(_names)}"
    admin.create_topic(name, partitions, {**SMALL, **config})
    return name


@pytest.fixture(scope="module")
def producers(root: str) -> Iterator[Tuple[Producer, Producer]]:
    """(C path, Python path) producers on the module's root."""
    if not fastpath.enabled():
        pytest.skip("SHMQ_FASTPATH=0: the C path is switched off for this run")
    fast = Producer(root)
    with fastpath_off():
        slow = Producer(root)
    assert fast._fast is not None and slow._fast is None
    yield fast, slow
    fast.close()
    slow.close()


def raw_batches(cluster: Cluster, topic: str, partition: int, start: int) -> List[bytes]:
    """The RecordBatch bytes stored in topic-partition from offset start on."""
    reader = cluster.log(topic, partition).reader(start)
    buf = bytearray(4 << 20)
    n = reader.read_frames(buf)
    out, pos = [], 0
    while pos < n:
        (word,) = struct.unpack_from("<Q", buf, pos)
        flen = word & 0xFFFFFFFF
        assert word >> 62 == 0, "a data frame"
        (blen,) = struct.unpack_from(">i", buf, pos + 8 + 8)
        out.append(bytes(buf[pos + 8:pos + 8 + blen + 12]))
        pos += flen
    return out


# ------------------------------------------------------- identical batches

headers_st = st.one_of(st.none(), st.lists(st.tuples(st.text(max_size=8), st.one_of(st.none(), st.binary(max_size=16))),
                                           max_size=4))
blob_st = st.one_of(st.none(), st.binary(max_size=40),
                    st.builds(lambda n, b: bytes([b]) * n, st.integers(0, MAX_BYTES), st.integers(0, 255)))
record_st = st.tuples(blob_st, blob_st, headers_st, st.integers(0, 2 ** 62))


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(records=st.lists(record_st, min_size=1, max_size=6))
def test_c_and_python_sends_store_byte_identical_batches_that_kafka_decodes(
        root: str, admin: Admin, producers: Tuple[Producer, Producer], records: List[Any]) -> None:
    fast, slow = producers
    records = [r for r in records if (len(r[0] or b"") + len(r[1] or b"")) <= MAX_BYTES]
    if not records:
        return
    topics = [new_topic(admin), new_topic(admin)]
    calls = fast._fast.fallbacks
    for producer, topic in zip((fast, slow), topics):
        for value, key, headers, ts in records:
            md = producer.send(topic, value, key=key, partition=0, headers=headers, timestamp_ms=ts)
            assert md.timestamp_ms == ts
    assert fast._fast.fallbacks == calls, "the C path sent every record itself"
    cluster = fast._cluster
    got_fast, got_slow = (raw_batches(cluster, t, 0, 0) for t in topics)
    assert got_fast == got_slow
    assert len(got_fast) == len(records)
    for offset, (raw, (value, key, headers, ts)) in enumerate(zip(got_fast, records)):
        batch = DefaultRecordBatch(raw)
        assert batch.validate_crc() and batch.base_offset == offset
        (rec,) = list(batch)
        assert (rec.offset, rec.key, rec.value, rec.timestamp) == (offset, key, value, ts)
        assert [(k, v) for k, v in rec.headers] == [(k, v) for k, v in (headers or [])]


def test_sends_with_the_wall_clock_and_keys_match_the_python_path(admin: Admin,
                                                                 producers: Tuple[Producer, Producer]) -> None:
    fast, slow = producers
    topic = new_topic(admin, 5)
    keys = [b"k%d" % i for i in range(50)]
    placed_fast = [fast.send(topic, b"v", key=k).partition for k in keys]
    placed_slow = [slow.send(topic, b"v", key=k).partition for k in keys]
    assert placed_fast == placed_slow
    before = time.time_ns() // 1_000_000
    md = fast.send(topic, b"now")
    assert before <= md.timestamp_ms <= time.time_ns() // 1_000_000
    # null keys stick to one partition for a while, as the Python path's partitioner
    assert len({fast.send(topic, b"x").partition for _ in range(50)}) == 1


# --------------------------------------------------------------- bad input

def test_bad_input_to_the_c_send_raises_the_shmq_error(admin: Admin, producers: Tuple[Producer, Producer]) -> None:
    fast, slow = producers
    topic = new_topic(admin, 2)
    for p in (fast, slow):
        with pytest.raises(InvalidRecord):
            p.send(topic, "a str value")
        with pytest.raises(InvalidRecord):
            p.send(topic, 12)
        with pytest.raises(InvalidRecord):
            p.send(topic, b"v", key="a str key")
        for part in (-1, 2, 10 ** 30, -10 ** 30, "0", 1.0, True):
            with pytest.raises(UnknownTopicOrPartition):
                p.send(topic, b"v", partition=part)
        for ts in (-1, "now", 2 ** 70, 1.5):
            with pytest.raises(InvalidRecord):
                p.send(topic, b"v", timestamp_ms=ts)
        for headers in ([("k", "str")], [b"x"], [("k",)], [(1, b"v")], "abc", 5, [("\udc80", b"v")]):
            with pytest.raises(InvalidRecord):
                p.send(topic, b"v", headers=headers)
        with pytest.raises(MessageSizeTooLarge):
            p.send(topic, b"x" * (MAX_BYTES + 1))
        with pytest.raises(MessageSizeTooLarge):
            p.send(topic, b"x" * MAX_BYTES, key=b"k")
        with pytest.raises(InvalidTopic):
            p.send(5, b"v")
        with pytest.raises(UnknownTopicOrPartition):
            p.send("no-such-topic", b"v")
    assert [t.end_offset for t in admin.describe_topic(topic).partitions] == [0, 0]


def test_closed_producer_and_deleted_topic(root: str, admin: Admin) -> None:
    topic = new_topic(admin)
    p = Producer(root)
    assert p.send(topic, b"a").offset == 0
    admin.delete_topic(topic)
    with pytest.raises(UnknownTopicOrPartition):
        for _ in range(1000):             # the route is dropped within 100 ms, the log refuses at once
            p.send(topic, b"b")
            time.sleep(0.001)
    p.close()
    with pytest.raises(IllegalState):
        p.send(topic, b"c")


def test_fork_after_use_sends_from_the_child(root: str, admin: Admin) -> None:
    topic = new_topic(admin)
    p = Producer(root)
    p.send(topic, b"parent", partition=0)
    pid = os.fork()
    if pid == 0:                                     # child: same producer object, same mappings
        code = 1
        try:
            code = 0 if p.send(topic, b"child", partition=0).offset == 1 else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    assert p.send(topic, b"parent again", partition=0).offset == 2
    p.close()


# ------------------------------------------------------------------ leaks

def test_a_million_sends_leave_rss_and_refcounts_flat(root: str, admin: Admin,
                                                      producers: Tuple[Producer, Producer]) -> None:
    fast, _ = producers
    topic = new_topic(admin, 2, segment_bytes=4 << 20)
    value, key, headers = b"v" * 64, b"key", [("h", b"x")]
    send = fast.send
    for _ in range(50_000):
        send(topic, value, key=key, headers=headers)
    gc.collect()
    shared = (topic, value, key, headers, fast._fast, fast)
    refs = [sys.getrefcount(o) for o in shared]
    rss = psutil.Process().memory_info().rss
    for i in range(1_000_000):
        send(topic, value, key=key, headers=headers if i & 1 else None, partition=i & 1)
    gc.collect()
    assert [sys.getrefcount(o) for o in shared] == refs
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 8 << 20, f"RSS grew by {grown} bytes over a million sends"


def test_ten_million_sends_and_polls_leave_rss_and_refcounts_flat(root: str, admin: Admin,
                                                                  producers: Tuple[Producer, Producer]) -> None:
    """10 M C sends and C polls interleaved in one process (1000 of each in
    turn: the ring never fills): reference counts of the shared objects, the
    interpreter's total reference count (a debug build) or its allocated
    blocks, and RSS stay flat."""
    fast_p, _ = producers
    topic = new_topic(admin, segment_bytes=8 << 20)
    c = consumer(root, topic, 1, True, max_poll_records=1000)
    send, poll, value = fast_p.send, c.poll, b"v" * 64
    count = getattr(sys, "gettotalrefcount", None) or sys.getallocatedblocks

    def rounds(n: int) -> Any:
        last = None
        for _ in range(n):
            for _ in range(1000):
                send(topic, value, partition=0)
            for _ in range(1000):
                last = poll(0)
        return last

    rounds(100)                                   # warm-up: caches, free lists, the first pages
    gc.collect()
    shared = (topic, value, c._fast, fast_p._fast, c, fast_p, Message)
    refs = [sys.getrefcount(o) for o in shared]
    blocks = count()
    rss = psutil.Process().memory_info().rss
    last = rounds(10_000)
    assert last is not None and last.offset == 10_100_000 - 1 and poll(0) is None
    del last                                      # it holds the topic
    gc.collect()
    assert c.position(TopicPartition(topic, 0)) == 10_100_000, "every poll returned a record"
    assert [sys.getrefcount(o) for o in shared] == refs
    grown_blocks = count() - blocks
    assert grown_blocks < 1000, f"{count.__name__}() grew by {grown_blocks} over 10 M sends and polls"
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 8 << 20, f"RSS grew by {grown} bytes over 10 M sends and polls"
    c.close()


# ---------------------------------------------------------------- consumer

def consumer(root: str, topic: str, partitions: int, fast: bool, **kw: Any) -> Consumer:
    ctx = contextlib.nullcontext() if fast else fastpath_off()
    with ctx:
        c = Consumer(root=root, auto_offset_reset="earliest", **kw)
    assert (c._fast is not None) == (fast and fastpath.enabled())
    c.assign([TopicPartition(topic, p) for p in range(partitions)])
    return c


def test_c_poll_and_consume_return_what_the_python_path_returns(root: str, admin: Admin,
                                                               producers: Tuple[Producer, Producer]) -> None:
    fast_p, _ = producers
    topic = new_topic(admin, 3)
    sent = []
    for i in range(300):
        key = None if i % 4 == 0 else b"k%d" % i
        value = None if i % 7 == 0 else b"v" * (i % 50)
        headers = [("h", b"%d" % i), ("none", None), ("\u00e9", b"")] if i % 5 == 0 else None
        sent.append(fast_p.send(topic, value, key=key, partition=i % 3, headers=headers, timestamp_ms=TS + i))
    got = {}
    for fast in (True, False):
        c = consumer(root, topic, 3, fast, max_poll_records=17)
        msgs = [c.poll(1.0) for _ in range(150)] + c.consume(10) + c.consume(1000, timeout=0.5)
        while len(msgs) < 300 + 150:
            more = c.consume(1000, timeout=0.2)
            if not more:
                break
            msgs.extend(more)
        assert None not in msgs and len(msgs) == 300
        assert {c.position(TopicPartition(topic, p)) for p in range(3)} == {100}
        assert c.poll(0.05) is None and c.consume(5, timeout=0) == []
        got[fast] = msgs
        c.close()
    by_offset = {fast: sorted(m, key=lambda m: (m.partition, m.offset)) for fast, m in got.items()}
    assert by_offset[True] == by_offset[False]
    assert all(type(m) is Message for m in got[True])
    assert [(m.partition, m.offset, m.timestamp_ms) for m in by_offset[True]] == \
        sorted((md.partition, md.offset, md.timestamp_ms) for md in sent)
    m = next(m for m in got[True] if m.headers)
    assert pickle.loads(pickle.dumps(m)) == m and m.headers == [("h", m.headers[0][1]), ("none", None), ("\u00e9", b"")]
    assert m == Message(*m)


def test_seek_pause_and_bulk_after_a_c_poll_see_the_position(root: str, admin: Admin,
                                                             producers: Tuple[Producer, Producer]) -> None:
    fast_p, _ = producers
    topic = new_topic(admin, 2)
    for i in range(20):
        fast_p.send(topic, b"%d" % i, partition=0)
    fast_p.send(topic, b"other", partition=1)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    c = consumer(root, topic, 1, True)
    m = c.poll(1.0)
    assert (m.partition, m.offset) == (0, 0) and c._fast.pending > c._fast.pending_at   # the rest is read ahead
    assert c.position(tp0) == 1
    c.seek(tp0, 5)
    assert c.poll(1.0).offset == 5 and c.position(tp0) == 6
    c.pause(tp0)
    assert c.poll(0.05) is None
    c.resume(tp0)
    assert c.poll(1.0).offset == 6
    arrays = c.consume_arrays(100, timeout=1.0)
    assert arrays is not None and arrays[0] == tp0 and int(arrays[1].offsets[0]) == 7
    c.seek(tp0, 3)
    assert [m.offset for m in c.consume(4)] == [3, 4, 5, 6]
    c.assign([tp0, tp1])
    assert c.position(tp0) == 7
    c.pause(tp0)
    c.seek(tp1, 0)
    assert c.poll(1.0).value == b"other"
    c.close()


def test_one_doorbell_wakes_a_consumer_of_many_partitions(root: str, admin: Admin,
                                                          producers: Tuple[Producer, Producer]) -> None:
    import threading
    fast_p, _ = producers
    topic = new_topic(admin, 6)
    c = consumer(root, topic, 6, True, spin_us=0)
    for p in range(6):
        c.seek(TopicPartition(topic, p), 0)
    got: List[Any] = []
    t = threading.Thread(target=lambda: got.append(c.poll(10.0)))
    t.start()
    logs = [fast_p._cluster.log(topic, p) for p in range(6)]
    deadline = time.monotonic() + 5
    while not all(log._hdr.waiters for log in logs):          # asleep on every partition at once
        assert time.monotonic() < deadline, [int(log._hdr.waiters) for log in logs]
        time.sleep(0.001)
    fast_p.send(topic, b"wake", partition=4)
    t.join(5)
    assert not t.is_alive() and got[0] is not None and (got[0].partition, got[0].value) == (4, b"wake")
    assert not any(log._hdr.waiters for log in logs)
    c.close()


def test_bad_input_to_the_c_poll_and_consume(root: str, admin: Admin) -> None:
    topic = new_topic(admin)
    for fast in (True, False):
        c = consumer(root, topic, 1, fast)
        for bad in ("1", None, float("nan"), True, [1]):
            with pytest.raises(InvalidConfig):
                c.poll(bad)
        for bad in (0, -1, "3", 1.5, None):
            with pytest.raises(InvalidConfig):
                c.consume(bad)
        with pytest.raises(InvalidConfig):
            c.consume(3, timeout="soon")
        assert c.poll(0) is None and c.consume(10 ** 30, timeout=0) == []
        c.close()
        with pytest.raises(IllegalState):
            c.poll(0)
        with pytest.raises(IllegalState):
            c.consume(1, timeout=0)


def test_c_poll_after_topic_deletion_and_fork(root: str, admin: Admin) -> None:
    topic = new_topic(admin)
    with Producer(root) as p:
        for i in range(3):
            p.send(topic, b"%d" % i, partition=0)
    c = consumer(root, topic, 1, fastpath.enabled())
    assert c.poll(1.0).offset == 0                  # two more read ahead
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            code = 0 if [c.poll(1.0).offset, c.poll(1.0).offset, c.poll(0.01)] == [1, 2, None] else 2
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    admin.delete_topic(topic)
    # As Kafka's consumer of an assign()ed partition whose topic is gone: what
    # was read stays readable (here: the two records read ahead and the
    # rest of the mapped log), then nothing; no exception, no crash.
    got = [c.poll(0.01) for _ in range(30)]
    assert [m.offset for m in got[:2]] == [1, 2] and got[2:] == [None] * 28
    assert c.consume(10, timeout=0.01) == [] and c.consume_arrays(10, timeout=0.01) is None
    c.close()
    with pytest.raises(IllegalState):
        c.poll(0)


def test_commit_after_fork_and_after_topic_deletion(root: str, admin: Admin) -> None:
    """The C commit (and the Python one) from a forked child stores into the
    shared offsets table; once the topic is deleted every commit raises
    UnknownTopicOrPartition (the cached entry is dropped with the metadata)."""
    for fast in (True, False):
        topic = new_topic(admin)
        with Producer(root) as p:
            for i in range(5):
                p.send(topic, b"%d" % i, partition=0)
        tp = TopicPartition(topic, 0)
        c = consumer(root, topic, 1, fast, group_id=f"g{next(_names)}", enable_auto_commit=False)
        m = c.poll(1.0)
        assert c.commit(message=m) == {tp: 1}            # the C commit's entry for tp is cached now
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if c.commit(offsets={tp: 3}) == {tp: 3} and c.commit(message=c.poll(1.0)) == {tp: 2} else 2
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        assert c.committed(tp) == 2, "the child's commits are in the shared table"
        admin.delete_topic(topic)
        for commit in (lambda: c.commit(offsets={tp: 4}), lambda: c.commit(message=m),
                       lambda: c.commit(offsets={tp: 4}, asynchronous=False)):
            with pytest.raises(UnknownTopicOrPartition):
                for _ in range(1000):                    # the metadata version moves at once; bounded anyway
                    commit()
                    time.sleep(0.001)
        c.close()


def test_the_extension_types_and_functions_refuse_wrong_arguments() -> None:
    """Wrong arguments to the constructors of the extension's types and to
    its functions raise TypeError / ValueError; an object made with __new__
    (or whose __init__ failed) raises on use instead of crashing."""
    import random

    import numpy as np

    from shmq.message import RecordMetadata
    from shmq.ringlog.reader import RecordArrays
    X = fastpath._ext
    f = print
    part = X.Partitioner(0, 10, random.randrange, f)
    good_c = dict(consumer=object(), poll=f, consume=f, arm=f, part=f, message_type=Message, lease_ns=1, commit=f,
                  commit_entry=f, topic_partition_type=TopicPartition, gen_shift=48)
    bad = [(X.Partitioner, (), {}, TypeError), (X.Partitioner, ("0", 1, f, f), {}, TypeError),
           (X.Partitioner, (9, 1, f, f), {}, ValueError), (X.Partitioner, (0, 0, f, f), {}, ValueError),
           (X.Partitioner, (0, 1, f, f, f), {}, TypeError),
           (X.FastProducer, (), {}, TypeError), (X.FastProducer, (f, f, "part", RecordMetadata, 0, 100), {}, TypeError),
           (X.FastProducer, (f, f, part, int, 0, 100), {}, TypeError),
           (X.FastProducer, (f, f, part, RecordMetadata, "0", 100), {}, TypeError),
           (X.FastConsumer, (), {}, TypeError), (X.FastConsumer, (), {**good_c, "message_type": int}, TypeError),
           (X.FastConsumer, (), {**good_c, "lease_ns": 0}, TypeError),
           (X.FastConsumer, (), {**good_c, "gen_shift": 0}, TypeError),
           (X.FastConsumer, (), {**good_c, "topic_partition_type": "tp"}, TypeError),
           (X.FastConsumer, (), {**good_c, "bogus": 1}, TypeError)]
    for tp, args, kw, exc in bad:
        with pytest.raises(exc):
            tp(*args, **kw)
    X.FastConsumer(**good_c).close()
    half = X.FastConsumer.__new__(X.FastConsumer)
    with pytest.raises(TypeError):
        half.__init__(**{**good_c, "message_type": int})      # fails after setting some fields
    for obj in (X.Partitioner.__new__(X.Partitioner), X.FastProducer.__new__(X.FastProducer),
                X.FastConsumer.__new__(X.FastConsumer), half):
        calls = {X.Partitioner: [lambda o: o(None, 3), lambda o: o(b"k", 3)],
                 X.FastProducer: [lambda o: o.send("t", b"v"), lambda o: o.send("t", b"v", partition=0)],
                 X.FastConsumer: [lambda o: o.poll(0), lambda o: o.consume(1), lambda o: o.commit(offsets={}),
                                  lambda o: o.commit(message=None)]}[type(obj)]
        for call in calls:
            with pytest.raises(TypeError, match="not initialized"):
                call(obj)
    for obj in (X.FastProducer.__new__(X.FastProducer), X.FastConsumer.__new__(X.FastConsumer)):
        obj.close()                                      # harmless
    assert X.FastConsumer.__new__(X.FastConsumer).take() == []
    ints = [1] * 13
    for args, exc in [((), TypeError), ((RecordArrays, *ints[:12]), TypeError), ((int, *ints), TypeError),
                      ((RecordArrays, "1", *ints[1:]), TypeError), ((RecordArrays, 0, *ints[1:]), ValueError),
                      ((RecordArrays, *ints[:3], 0, *ints[4:]), ValueError),       # buf_len 0
                      ((RecordArrays, *ints[:11], 0, 1), ValueError)]:            # max_records 0
        with pytest.raises(exc):
            X.read_arrays(*args)
    rows = np.zeros((4, 8), dtype=np.uint8)
    for args, exc in [((), TypeError), ((0, rows, None, 0, 0), ValueError), (("1", rows, None, 0, 0), TypeError),
                      ((1, rows, None, -1, 0), ValueError), ((1, rows, None, "0", 0), TypeError),
                      ((1, rows.astype(np.int32), None, 0, 0), ValueError), ((1, rows[0], None, 0, 0), ValueError),
                      ((1, rows[:0], None, 0, 0), ValueError), ((1, b"12345678", None, 0, 0), ValueError),
                      ((1, "rows", None, 0, 0), TypeError), ((1, rows, "keys", 0, 0), TypeError),
                      ((1, rows, rows[:3], 0, 0), ValueError), ((1, rows[:, ::2], None, 0, 0), (ValueError, BufferError))]:
        with pytest.raises(exc):
            X.append_fixed(*args)


def test_a_million_polls_leave_rss_and_refcounts_flat(root: str, admin: Admin,
                                                      producers: Tuple[Producer, Producer]) -> None:
    fast_p, _ = producers
    topic = new_topic(admin, 2, segment_bytes=64 << 20, segment_count=2)
    chunk = [b"v" * 64] * 1000
    for i in range(1000):
        fast_p.send_batch(topic, chunk, partition=i & 1)
    fast_p.send(topic, b"v", key=b"k", headers=[("h", b"x")], partition=0)
    c = consumer(root, topic, 2, True, max_poll_records=500)
    poll = c.poll
    for _ in range(50_000):
        poll(0)
    gc.collect()
    shared = (topic, c._fast, c, Message)
    refs = [sys.getrefcount(o) for o in shared]
    rss = psutil.Process().memory_info().rss
    n = 0
    while poll(0) is not None:
        n += 1
    for _ in range(50):
        n += len(c.consume(1000, timeout=0))
    gc.collect()
    assert n == 1_000_001 - 50_000
    assert [sys.getrefcount(o) for o in shared] == refs
    grown = psutil.Process().memory_info().rss - rss
    assert grown < 8 << 20, f"RSS grew by {grown} bytes over a million polls"
    c.close()


# -------------------------------------------------------------------- bulk

def test_consume_arrays_takes_a_large_batch_in_one_read(root: str, admin: Admin) -> None:
    import numpy as np
    topic = new_topic(admin, segment_bytes=4 << 20)
    rows = np.arange(3 * 8192 * 16, dtype=np.uint32).view(np.uint8).reshape(3 * 8192, 64)
    with Producer(root) as p:
        for k in range(3):
            p.send_batch(topic, rows[k * 8192:(k + 1) * 8192], partition=0)
    c = consumer(root, topic, 1, fastpath.enabled())
    for k in range(3):                    # each read: a whole batch (more than the reader's 1024 views)
        got = c.consume_arrays(65536, timeout=1.0)
        assert got is not None and got[1].offsets.tolist() == list(range(k * 8192, (k + 1) * 8192))
        assert (got[1].values == rows[k * 8192:(k + 1) * 8192]).all()
    assert c.position(TopicPartition(topic, 0)) == 3 * 8192 and c.consume_arrays(10, timeout=0) is None
    c.close()


# ----------------------------------------------------------------- commits

def test_hot_path_commits_store_and_fence_as_the_python_commit(root: str, admin: Admin,
                                                               producers: Tuple[Producer, Producer]) -> None:
    fast_p, _ = producers
    topic = new_topic(admin, 2)
    for i in range(5):
        fast_p.send(topic, b"%d" % i, partition=0)
    tp0, tp1 = TopicPartition(topic, 0), TopicPartition(topic, 1)
    for fast in (True, False):
        group = f"g{next(_names)}"
        c = consumer(root, topic, 2, fast, group_id=group, enable_auto_commit=False)
        m = c.poll(1.0)
        assert c.commit(message=m) == {tp0: 1} and c.committed(tp0) == 1
        assert c.commit(offsets={tp0: 4, tp1: 9}) == {tp0: 4, tp1: 9}
        assert (c.committed(tp0), c.committed(tp1)) == (4, 9)
        assert c.commit(offsets={(topic, 1): 3}) == {tp1: 3} and c.committed(tp1) == 3   # a plain tuple key
        for bad in ({tp0: -1}, {tp0: "5"}, {tp0: 1 << 60}, {tp0: 2, tp1: -5}):
            with pytest.raises(InvalidConfig):
                c.commit(offsets=bad)
        assert (c.committed(tp0), c.committed(tp1)) == (4, 3), "a refused commit stores nothing"
        for bad_msg in ("x", (topic, 0, 1), m._replace(offset="1")):
            with pytest.raises(InvalidConfig):
                c.commit(message=bad_msg)
        with pytest.raises(UnknownTopicOrPartition):
            c.commit(offsets={TopicPartition("no-such-topic", 0): 1})
        assert c.commit(offsets={tp0: 5}, asynchronous=False) == {tp0: 5} and c.committed(tp0) == 5
        # A member of the group owns the partitions now: this non-member's commits are fenced.
        member = Consumer(topic, group_id=group, root=root, enable_auto_commit=False)
        deadline = time.monotonic() + 20
        while len(member.assignment()) < 2:
            assert time.monotonic() < deadline, "the member was never assigned the partitions"
            member.poll(0.05)
        with pytest.raises(CommitFailed):
            c.commit(offsets={tp0: 6})
        with pytest.raises(CommitFailed):
            c.commit(message=m)
        assert c.committed(tp0) == 5
        member.commit(offsets={tp0: 2})          # the owner commits (its generation)
        assert c.committed(tp0) == 2
        member.close()
        c.close()
        with pytest.raises(IllegalState):
            c.commit(offsets={tp0: 1})


def test_a_million_commits_leave_refcounts_flat(root: str, admin: Admin) -> None:
    topic = new_topic(admin)
    tp = TopicPartition(topic, 0)
    c = consumer(root, topic, 1, fastpath.enabled(), group_id=f"g{next(_names)}", enable_auto_commit=False)
    commit = c.commit
    commit(offsets={tp: 0})
    m = Message(topic, 0, 5, None, b"v", (), TS)
    gc.collect()
    shared = (topic, tp, m, c)
    refs = [sys.getrefcount(o) for o in shared]
    rss = psutil.Process().memory_info().rss
    for i in range(500_000):
        commit(offsets={tp: i})
        commit(message=m)
    gc.collect()
    assert [sys.getrefcount(o) for o in shared] == refs
    assert psutil.Process().memory_info().rss - rss < 8 << 20
    assert c.committed(tp) == 6
    c.close()


# -------------------------------------------------- kill -9 and SIGSTOP

def _victim(root: str, topic: str, fault: str, count: int) -> None:
    os.environ["SHMQ_FAULT_INJECT"] = fault
    try:
        with Producer(root) as p:
            assert (p._fast is not None) == fastpath.enabled()
            for i in range(count):
                p.send(topic, struct.pack("<Q", i), partition=0)
    finally:
        os._exit(0)


def _read_all(root: str, topic: str, end: int, budget: float) -> List[Any]:
    out: List[Any] = []
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, 0)])
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline and (not out or out[-1].offset < end - 1):
            out.extend(c.consume(1000, timeout=0.05))
    return out


@pytest.mark.parametrize("fault", ["kill_after_claim", "stop_after_claim"])
def test_producer_dying_or_stopped_inside_the_c_send_is_unblocked(root: str, admin: Admin, reaper: Any,
                                                                   fault: str) -> None:
    topic = new_topic(admin, unblock_timeout_ms=200)
    n = 300
    victim = reaper.start(_victim, root, topic, f"{fault}:{n}", 10 * n)
    if fault.startswith("kill"):
        victim.join(20)
        assert victim.exitcode == -signal.SIGKILL
    else:
        proc = psutil.Process(victim.pid)
        deadline = time.monotonic() + 20
        while proc.status() != psutil.STATUS_STOPPED:
            assert time.monotonic() < deadline, "the producer never stopped itself"
            time.sleep(0.002)
    with Producer(root) as p:                 # another producer goes on; readers pad the dead claim over
        mds = [p.send(topic, b"after", partition=0) for _ in range(10)]
    assert mds[0].offset == n                 # offsets 0..n-2 committed, n-1 is the victim's claim
    got = _read_all(root, topic, mds[-1].offset + 1, 10)
    assert [m.offset for m in got] == list(range(n - 1)) + list(range(n, n + 10))
    assert [struct.unpack("<Q", m.value)[0] for m in got[:n - 1]] == list(range(n - 1))
    if fault.startswith("stop"):
        os.kill(victim.pid, signal.SIGCONT)   # its commit is fenced; send appends the record again
        victim.join(20)
        assert victim.exitcode == 0
        end = admin.describe_topic(topic).partitions[0].end_offset
        assert end == 10 * n + 10 + 1         # one offset went to the fenced first attempt
        got = _read_all(root, topic, end, 10)
        values = [struct.unpack("<Q", m.value)[0] for m in got if m.value != b"after"]
        assert values == list(range(10 * n)), "every record of the stopped producer exactly once, in order"


# ------------------------------------------------------- both ways, in CI

def test_producer_and_consumer_suites_pass_with_the_fast_path_off(tmp_path: Any) -> None:
    """The API suites again with SHMQ_FASTPATH=0 (CI's second run, ``pytest
    --fastpath=off`` over every file that makes clients, runs them directly)."""
    if os.environ.get("SHMQ_FASTPATH") == "0":
        pytest.skip("this run has the fast path off: the suites run in it directly")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "SHMQ_FASTPATH": "0"}
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(here, "test_producer.py"), os.path.join(here, "test_consumer.py")],
                       env=env, capture_output=True, text=True, timeout=110)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


# ---------------------------------------------------- bulk, one C call each

def _bulk_rows(n: int, width: int, salt: int) -> Any:
    import numpy as np
    return ((np.arange(n * width, dtype=np.uint64) * 2654435761 + salt) % 251).astype(np.uint8).reshape(n, width)


def test_bulk_c_path_and_python_path_store_and_read_the_same(root: str, admin: Admin, monkeypatch: Any,
                                                            producers: Tuple[Producer, Producer]) -> None:
    """send_batch of 2-D uint8 arrays (fastpath.c append_fixed) writes the
    batches the Python path writes; consume_arrays (fastpath.c read_arrays)
    returns the arrays the Python path returns: fixed-width values and keys,
    null keys, mixed widths and null values (lists), batches larger than the
    reader's views, reads that stop inside a batch."""
    import numpy as np
    fast_p, slow_p = producers
    from shmq.ringlog.log import PartitionLog
    python_appends: List[str] = []
    append_batch = PartitionLog.append_batch
    monkeypatch.setattr(PartitionLog, "append_batch",
                        lambda self, *a, **kw: python_appends.append(name) or append_batch(self, *a, **kw))
    topics = {}
    for name, prod in (("c", fast_p), ("py", slow_p)):
        topic = topics[name] = new_topic(admin, segment_bytes=4 << 20)
        mds = [prod.send_batch(topic, _bulk_rows(3000, 64, 1), partition=0, timestamp_ms=TS),
               prod.send_batch(topic, _bulk_rows(7, 16, 2), _bulk_rows(7, 5, 3), partition=0, timestamp_ms=TS + 1),
               prod.send_batch(topic, _bulk_rows(2, 0, 0), partition=0, timestamp_ms=TS + 2),
               prod.send_batch(topic, [b"a", None, b"ccc"], [None, b"k", None], partition=0, timestamp_ms=TS + 3),
               prod.send_batch(topic, _bulk_rows(5, 8, 4)[:, ::2], partition=0, timestamp_ms=TS + 4)]  # strided
        assert [[(m.partition, m.offset, m.timestamp_ms) for m in md] for md in mds] == \
            [[(0, 0, TS)], [(0, 3000, TS + 1)], [(0, 3007, TS + 2)], [(0, 3009, TS + 3)], [(0, 3012, TS + 4)]]
    assert python_appends == ["c", "c"] + ["py"] * 5, "C-contiguous uint8 arrays in one C call, the rest in Python"
    assert raw_batches(fast_p._cluster, topics["c"], 0, 0) == raw_batches(fast_p._cluster, topics["py"], 0, 0)
    tp = TopicPartition(topics["c"], 0)
    plans = ((1000, 2000, 4, 3, 2, 3, 5), (1000, 65536))    # batch by batch; then across batches
    got = {}
    for fast in (True, False):
        with contextlib.nullcontext() if fast else fastpath_off():
            for plan in plans:
                c = consumer(root, topics["c"], 1, fast)
                reads = [c.consume_arrays(n, timeout=1.0) for n in plan]
                assert c.consume_arrays(10, timeout=0) is None and c.position(tp) == 3017
                assert (c._state(tp).reader.__dict__["_c_read"] is not None) == fast
                c.close()
                got[fast, plan] = reads
    for plan in plans:
        for a, b in zip(got[True, plan], got[False, plan]):
            assert a is not None and b is not None and a[0] == b[0] == tp
            ra, rb = a[1], b[1]
            assert type(ra) is type(rb) and ra.offsets.dtype == rb.offsets.dtype == np.int64
            assert ra.offsets.tolist() == rb.offsets.tolist() and ra.timestamps.tolist() == rb.timestamps.tolist()
            for x, y in ((ra.values, rb.values), (ra.keys, rb.keys)):
                assert type(x) is type(y)
                if isinstance(x, np.ndarray):
                    assert x.dtype == y.dtype == np.uint8 and x.shape == y.shape and (x == y).all()
                else:
                    assert x == y
    reads = got[True, plans[0]]
    assert [r[1].offsets.tolist()[0] for r in reads] == [0, 1000, 3000, 3004, 3007, 3009, 3012]
    assert (reads[1][1].values == _bulk_rows(3000, 64, 1)[1000:]).all() and reads[1][1].keys is None
    assert reads[2][1].values.shape == (4, 16) and (reads[2][1].keys == _bulk_rows(7, 5, 3)[:4]).all()
    assert reads[4][1].values.shape == (2, 0) and reads[4][1].keys is None
    assert reads[5][1].values == [b"a", None, b"ccc"] and reads[5][1].keys == [None, b"k", None]
    assert (reads[6][1].values == _bulk_rows(5, 8, 4)[:, ::2]).all()
    across = got[True, plans[1]][1][1]
    assert len(across.offsets) == 2017 and isinstance(across.values, list) and isinstance(across.keys, list)


def test_corrupted_bytes_raise_corrupt_record_on_the_bulk_c_path(root: str, admin: Admin,
                                                                producers: Tuple[Producer, Producer]) -> None:
    import numpy as np
    from shmq.errors import CorruptRecord
    fast_p, _ = producers
    topic = new_topic(admin)
    fast_p.send_batch(topic, np.full((100, 32), 7, dtype=np.uint8), partition=0)
    log = fast_p._cluster.log(topic, 0)
    seg = os.path.join(log.path, "0.log")
    with open(seg, "r+b") as f:                      # one value byte of record 50, as a buggy process could
        f.seek(8 + 61 + 50 * 40 + 20)
        b = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([b[0] ^ 0x40]))
    c = consumer(root, topic, 1, True)
    with pytest.raises(CorruptRecord):
        c.consume_arrays(1000, timeout=1.0)
    assert c._state(TopicPartition(topic, 0)).reader.__dict__["_c_read"] is not None, "the C bulk read raised it"
    assert c.position(TopicPartition(topic, 0)) == 0, "nothing delivered"
    c.close()
    with fastpath_off():
        c = consumer(root, topic, 1, False)
        with pytest.raises(CorruptRecord):
            c.consume_arrays(1000, timeout=1.0)
        c.close()
