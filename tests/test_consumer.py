"""Consumer API: assign, poll, consume, consume_arrays, iteration, commits
(sync, async, message, offsets), committed, position, seek*, offsets_for_times,
watermarks, pause/resume, close, auto_offset_reset and auto-commit, plus bad
input raising the documented error.

One private root per module (never the default one), a fresh topic per test;
the module's coordinator is killed at teardown.
"""
from __future__ import annotations

import itertools
import os
import time
from typing import Any, Iterator, List

import numpy as np
import pytest

from shmq import (Admin, Consumer, IllegalState, InvalidConfig, InvalidGroupId, InvalidTopic, KafkaStorageError,
                  Message, NoOffsetForPartition, OffsetAndTimestamp, Producer, TopicPartition,
                  UnknownTopicOrPartition)
from shmq.coordinator import CoordinatorClient
from shmq.native import fastpath
from shmq.root import Root

pytestmark = pytest.mark.timeout(60)

_names = itertools.count()
SMALL = {"segment_bytes": 256 << 10, "segment_count": 2}


@pytest.fixture(scope="module")
def root(module_root: str) -> str:
    """This module's tests share one root (conftest's module_root)."""
    return module_root


@pytest.fixture(scope="module")
def admin(root: str) -> Iterator[Admin]:
    a = Admin(root)
    yield a
    a.close()


@pytest.fixture(scope="module")
def producer(root: str) -> Iterator[Producer]:
    p = Producer(root)
    yield p
    p.close()


@pytest.fixture
def topic(admin: Admin) -> str:
    name = f"c{next(_names)}"
    admin.create_topic(name, 2, SMALL)
    return name


@pytest.fixture
def group() -> str:
    return f"g{next(_names)}"


def fill(producer: Producer, topic: str, n: int, partition: int = 0, start: int = 0, **kw) -> None:  # type: ignore[no-untyped-def]
    for i in range(start, start + n):
        producer.send(topic, b"v%d" % i, key=b"k%d" % i, partition=partition, **kw)


def tp(topic: str, p: int = 0) -> TopicPartition:
    return TopicPartition(topic, p)


def drain(c: Consumer, timeout: float = 0.1) -> List[Message]:
    out: List[Message] = []
    while True:
        got = c.consume(1000, timeout=timeout)
        if not got:
            return out
        out.extend(got)


# --------------------------------------------------------------- assignment
def test_assign_and_assignment(root: str, topic: str) -> None:
    with Consumer(root=root) as c:
        assert c.assignment() == []
        c.assign([tp(topic, 0), (topic, 1)])
        assert c.assignment() == [tp(topic, 0), tp(topic, 1)]
        c.assign([tp(topic, 1)])
        assert c.assignment() == [tp(topic, 1)]
        c.assign([])
        assert c.assignment() == []
    with Consumer(topic, root=root) as c:              # subscribe: every partition
        assert sorted(c.assignment()) == [tp(topic, 0), tp(topic, 1)]


def test_assign_bad_input_raises(root: str, topic: str) -> None:
    with Consumer(root=root) as c:
        with pytest.raises(UnknownTopicOrPartition):
            c.assign([tp("nope", 0)])
        with pytest.raises(UnknownTopicOrPartition):
            c.assign([tp(topic, 2)])
        with pytest.raises(UnknownTopicOrPartition):
            c.assign([tp(topic, -1)])
        with pytest.raises(InvalidTopic):
            c.assign([tp("../x", 0)])
        with pytest.raises(InvalidConfig):
            c.assign(["notatuple"])  # type: ignore[list-item]
        assert c.assignment() == []
    with pytest.raises(UnknownTopicOrPartition):
        Consumer("nope", root=root)
    with pytest.raises(InvalidTopic):
        Consumer("a/b", root=root)


@pytest.mark.parametrize("kwargs,exc", [
    (dict(auto_offset_reset="smallest"), InvalidConfig),
    (dict(max_poll_records=0), InvalidConfig),
    (dict(auto_commit_interval_ms=-5), InvalidConfig),
    (dict(max_poll_records="10"), InvalidConfig),
    (dict(retry_backoff_ms=0), InvalidConfig),
    (dict(retry_backoff_ms=0.1), InvalidConfig),
    (dict(bootstrap_servers="x:9092"), InvalidConfig),
    (dict(group_id="../g"), InvalidGroupId),
    (dict(group_id=""), InvalidGroupId),
    (dict(group_id="a b"), InvalidGroupId),
])
def test_bad_consumer_config_raises(root: str, kwargs, exc) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(exc):
        Consumer(root=root, **kwargs)


# -------------------------------------------------------------------- fetch
def test_poll_returns_records_in_order_then_none(root: str, topic: str, producer: Producer) -> None:
    fill(producer, topic, 5, headers=[("h", b"1")], timestamp_ms=777)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([tp(topic, 0)])
        got = [c.poll(1.0) for _ in range(5)]
        assert all(isinstance(m, Message) for m in got)
        assert [(m.topic, m.partition, m.offset, m.key, m.value) for m in got] == \
            [(topic, 0, i, b"k%d" % i, b"v%d" % i) for i in range(5)]
        assert got[0].headers == [("h", b"1")] and got[0].timestamp_ms == 777
        t0 = time.monotonic()
        assert c.poll(0.2) is None
        assert 0.15 <= time.monotonic() - t0 < 2.0


def test_poll_wakes_up_when_a_record_arrives(root: str, topic: str, producer: Producer) -> None:
    import threading
    with Consumer(root=root, auto_offset_reset="latest") as c:
        c.assign([tp(topic, 1)])
        assert c.position(tp(topic, 1)) == 0
        timer = threading.Timer(0.2, lambda: producer.send(topic, b"late", partition=1))
        timer.start()
        t0 = time.monotonic()
        m = c.poll(5.0)
        timer.join()
        assert m is not None and m.value == b"late" and time.monotonic() - t0 < 3.0


def test_consume_returns_up_to_n_records_from_every_partition(root: str, topic: str, producer: Producer) -> None:
    fill(producer, topic, 30, partition=0)
    fill(producer, topic, 20, partition=1)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([tp(topic, 0), tp(topic, 1)])
        first = c.consume(10, timeout=1.0)
        assert len(first) == 10
        rest = drain(c)
        allm = first + rest
        assert len(allm) == 50
        for p in (0, 1):
            assert [m.offset for m in allm if m.partition == p] == list(range(30 if p == 0 else 20))
        assert c.consume(5, timeout=0.05) == []
        with pytest.raises(InvalidConfig):
            c.consume(0)


def test_consume_arrays_returns_numpy_arrays(root: str, topic: str, producer: Producer) -> None:
    vals = np.arange(40 * 16, dtype=np.uint16).astype(np.uint8).reshape(40, 16)
    producer.send_batch(topic, vals, partition=1, timestamp_ms=5000)
    producer.send_batch(topic, [b"a", b"bb", None], partition=1)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([tp(topic, 1)])
        got_tp, arrs = c.consume_arrays(40, timeout=1.0)
        assert got_tp == tp(topic, 1)
        assert isinstance(arrs.offsets, np.ndarray) and arrs.offsets.tolist() == list(range(40))
        assert arrs.timestamps.tolist() == [5000] * 40
        assert np.array_equal(arrs.values, vals)
        assert c.position(tp(topic, 1)) == 40
        got_tp, arrs = c.consume_arrays(100, timeout=1.0)
        assert arrs.offsets.tolist() == [40, 41, 42]
        assert list(arrs.values) == [b"a", b"bb", None]
        assert c.consume_arrays(100, timeout=0.05) is None


def test_iteration_stops_after_consumer_timeout_ms(root: str, topic: str, producer: Producer) -> None:
    fill(producer, topic, 7, partition=1)
    with Consumer(root=root, auto_offset_reset="earliest", consumer_timeout_ms=300) as c:
        c.assign([tp(topic, 1)])
        t0 = time.monotonic()
        got = [m.offset for m in c]
        assert got == list(range(7))
        assert 0.25 <= time.monotonic() - t0 < 3.0


def test_deserializers(root: str, topic: str, producer: Producer) -> None:
    producer.send(topic, b"42", key=b"seven", partition=0)
    with Consumer(root=root, auto_offset_reset="earliest", value_deserializer=int,
                  key_deserializer=bytes.decode) as c:
        c.assign([tp(topic, 0)])
        m = c.poll(1.0)
        assert m is not None and (m.key, m.value) == ("seven", 42)


# ------------------------------------------------------------ offset resets
def test_auto_offset_reset_earliest_latest_none(root: str, topic: str, producer: Producer, group: str) -> None:
    fill(producer, topic, 4)
    with Consumer(root=root, group_id=group, auto_offset_reset="earliest") as c:
        c.assign([tp(topic)])
        assert c.position(tp(topic)) == 0
    with Consumer(root=root, group_id=group + "x", auto_offset_reset="latest") as c:
        c.assign([tp(topic)])
        assert c.position(tp(topic)) == 4
        assert c.poll(0.05) is None
        producer.send(topic, b"new", partition=0)
        m = c.poll(1.0)
        assert m is not None and m.offset == 4
    with Consumer(root=root, group_id=group + "y", auto_offset_reset="none") as c:
        c.assign([tp(topic)])
        with pytest.raises(NoOffsetForPartition):
            c.position(tp(topic))
        with pytest.raises(NoOffsetForPartition):
            c.poll(0.05)
    # With a committed offset, "none" starts there and the reset never applies.
    with Consumer(root=root, group_id=group, enable_auto_commit=False) as c:
        c.assign([tp(topic)])
        c.commit(offsets={tp(topic): 2}, asynchronous=False)
    with Consumer(root=root, group_id=group, auto_offset_reset="none") as c:
        c.assign([tp(topic)])
        assert c.position(tp(topic)) == 2
        m = c.poll(1.0)
        assert m is not None and m.offset == 2


# ------------------------------------------------------------------ commits
def test_commit_sync_async_message_offsets_and_committed(root: str, topic: str, producer: Producer,
                                                        group: str) -> None:
    fill(producer, topic, 10, partition=0)
    fill(producer, topic, 10, partition=1)
    t0, t1 = tp(topic, 0), tp(topic, 1)
    with Consumer(root=root, group_id=group, auto_offset_reset="earliest", enable_auto_commit=False) as c:
        c.assign([t0, t1])
        assert c.committed(t0) is None and c.committed(t1) is None
        msgs = []
        while len(msgs) < 3:
            m = c.poll(1.0)
            assert m is not None
            if m.partition == 0:
                msgs.append(m)
        done = c.commit(message=msgs[1], asynchronous=False)          # the one after the message
        assert done == {t0: 2} and c.committed(t0) == 2
        c.commit(offsets={t1: 7}, asynchronous=True)
        assert c.committed(t1) == 7
        done = c.commit(asynchronous=False)                            # current positions
        assert done[t0] == c.position(t0) == 3
        assert c.committed(t0) == 3
        c.commit(offsets={t0: 1}, asynchronous=False)                  # Kafka lets a commit rewind
        assert c.committed(t0) == 1
        with pytest.raises(InvalidConfig):
            c.commit(offsets={t0: -1})
        assert c.committed(t0) == 1
    # The coordinator has them (durable: a new client and the RPC view agree).
    with CoordinatorClient(root) as cc:
        assert cc.fetch_offsets(group, [(topic, 0), (topic, 1)]) == {(topic, 0): 1, (topic, 1): 7}
    with Consumer(root=root, group_id=group, auto_offset_reset="latest") as c2:
        c2.assign([t0, t1])
        assert c2.committed(t0) == 1 and c2.position(t0) == 1 and c2.position(t1) == 7
        m = c2.poll(1.0)
        assert m is not None and (m.partition, m.offset) in ((0, 1), (1, 7))


def test_commit_without_group_is_illegal(root: str, topic: str) -> None:
    with Consumer(root=root) as c:
        c.assign([tp(topic)])
        with pytest.raises(IllegalState):
            c.commit()
        assert c.committed(tp(topic)) is None


def test_auto_commit_commits_only_what_poll_returned(root: str, topic: str, producer: Producer,
                                                    group: str) -> None:
    fill(producer, topic, 50, partition=0)
    c = Consumer(root=root, group_id=group, auto_offset_reset="earliest", auto_commit_interval_ms=50)
    c.assign([tp(topic)])
    for i in range(3):
        m = c.poll(1.0)
        assert m is not None and m.offset == i
    time.sleep(0.1)
    # The consumer has fetched far more than it returned; the next poll
    # auto-commits before returning anything new: exactly the 3 returned.
    assert c.committed(tp(topic)) is None
    m = c.poll(1.0)
    assert m is not None and m.offset == 3
    assert c.committed(tp(topic)) == 3
    time.sleep(0.1)
    assert c.consume(5, timeout=1.0)[-1].offset == 8
    assert c.committed(tp(topic)) == 4
    c.close()                          # close commits the final position
    with CoordinatorClient(root) as cc:
        assert cc.fetch_offsets(group, [(topic, 0)]) == {(topic, 0): 9}
    # With auto-commit off, close commits nothing.
    c = Consumer(root=root, group_id=group, enable_auto_commit=False)
    c.assign([tp(topic)])
    assert c.position(tp(topic)) == 9
    c.seek(tp(topic), 20)
    c.close()
    with Consumer(root=root, group_id=group) as c:
        c.assign([tp(topic)])
        assert c.committed(tp(topic)) == 9


# ----------------------------------------------------------------- positions
def test_position_seek_seek_to_beginning_and_end(root: str, topic: str, producer: Producer) -> None:
    fill(producer, topic, 10, partition=0)
    fill(producer, topic, 4, partition=1)
    t0, t1 = tp(topic, 0), tp(topic, 1)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([t0, t1])
        assert c.position(t0) == 0
        c.seek(t0, 6)
        assert c.position(t0) == 6
        c.pause(t1)
        assert [m.offset for m in c.consume(10, timeout=1.0)] == [6, 7, 8, 9]
        c.seek(t0, 2)
        m = c.poll(1.0)
        assert m is not None and m.offset == 2       # seek drops what was buffered
        c.seek_to_end(t0)
        assert c.position(t0) == 10
        assert c.poll(0.05) is None
        c.seek_to_beginning(t0)
        assert c.position(t0) == 0
        c.resume(t1)
        c.seek_to_end()                               # no argument: every assigned partition
        assert (c.position(t0), c.position(t1)) == (10, 4)
        c.seek_to_beginning([t0, t1])
        assert (c.position(t0), c.position(t1)) == (0, 0)
        c.seek(t1, 100)                               # past the end: accepted, as Kafka does,
        assert c.position(t1) == 100                  # and auto_offset_reset applies on the next fetch
        c.pause(t0)
        assert [m.offset for m in c.consume(10, timeout=1.0)] == [0, 1, 2, 3]
        c.resume(t0)
        with pytest.raises(InvalidConfig):
            c.seek(t0, -1)
        with pytest.raises(InvalidConfig):
            c.seek(t0, "3")  # type: ignore[arg-type]
        with pytest.raises(IllegalState):
            c.seek(tp(topic + "zz", 0), 1)
        with pytest.raises(IllegalState):
            c.position(tp("other", 0))


def test_get_watermark_offsets(root: str, topic: str, producer: Producer) -> None:
    with Consumer(root=root) as c:
        assert c.get_watermark_offsets(tp(topic, 0)) == (0, 0)
        fill(producer, topic, 12, partition=0)
        assert c.get_watermark_offsets(tp(topic, 0)) == (0, 12)
        assert c.get_watermark_offsets(tp(topic, 1)) == (0, 0)     # not assigned: still answers
        with pytest.raises(UnknownTopicOrPartition):
            c.get_watermark_offsets(tp(topic, 5))
        with pytest.raises(UnknownTopicOrPartition):
            c.get_watermark_offsets(tp("nope", 0))


def test_offsets_for_times(root: str, topic: str, producer: Producer) -> None:
    for i, ts in enumerate([1000, 2000, 2000, 3000, 5000]):
        producer.send(topic, b"%d" % i, partition=0, timestamp_ms=ts)
    with Consumer(root=root) as c:
        got = c.offsets_for_times({tp(topic, 0): 0, tp(topic, 1): 0})
        assert got[tp(topic, 0)] == OffsetAndTimestamp(0, 1000)
        assert got[tp(topic, 1)] is None                       # empty partition
        q = c.offsets_for_times({tp(topic, 0): 1500})
        assert q[tp(topic, 0)] == OffsetAndTimestamp(1, 2000)
        assert c.offsets_for_times({tp(topic, 0): 2000})[tp(topic, 0)] == OffsetAndTimestamp(1, 2000)
        assert c.offsets_for_times({tp(topic, 0): 4000})[tp(topic, 0)] == OffsetAndTimestamp(4, 5000)
        assert c.offsets_for_times({tp(topic, 0): 6000})[tp(topic, 0)] is None
        with pytest.raises(UnknownTopicOrPartition):
            c.offsets_for_times({tp("nope", 0): 0})


def test_pause_and_resume(root: str, topic: str, producer: Producer) -> None:
    fill(producer, topic, 5, partition=0)
    fill(producer, topic, 5, partition=1)
    t0, t1 = tp(topic, 0), tp(topic, 1)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([t0, t1])
        c.pause(t0)
        assert c.paused() == [t0]
        got = drain(c, 0.05)
        assert {m.partition for m in got} == {1} and len(got) == 5
        c.resume(t0)
        assert c.paused() == []
        got = drain(c, 0.05)
        assert [m.offset for m in got if m.partition == 0] == list(range(5))
        c.pause()                                      # every partition
        fill(producer, topic, 2, partition=1, start=5)
        assert c.poll(0.05) is None
        c.resume()
        assert len(drain(c, 0.05)) == 2


def test_close_and_context_manager(root: str, topic: str, producer: Producer) -> None:
    c = Consumer(root=root, auto_offset_reset="earliest")
    c.assign([tp(topic)])
    c.close()
    c.close()                                          # twice is harmless
    for call in (lambda: c.poll(0.01), lambda: c.consume(1, timeout=0.01), lambda: c.assign([tp(topic)]),
                 lambda: c.consume_arrays(1)):
        with pytest.raises(IllegalState):
            call()
    assert c.assignment() == []
    with Consumer(root=root, auto_offset_reset="earliest") as c2:
        c2.assign([tp(topic)])
    with pytest.raises(IllegalState):
        c2.poll(0.01)


def test_lag(root: str, topic: str, producer: Producer) -> None:
    fill(producer, topic, 8, partition=1)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([tp(topic, 1)])
        assert c.lag(tp(topic, 1)) == 8
        c.consume(3, timeout=1.0)
        assert c.lag(tp(topic, 1)) == 5


# ------------------------------------------------------------ storage faults
@pytest.mark.parametrize("fast", [True, False], ids=["fastpath", "SHMQ_FASTPATH=0"])
@pytest.mark.parametrize("api", ["poll", "consume", "consume_arrays"])
def test_a_truncated_partition_is_raised_then_set_aside_while_the_other_keeps_delivering(
        root: str, topic: str, producer: Producer, monkeypatch: pytest.MonkeyPatch, api: str, fast: bool) -> None:
    """Partition 0's segments truncated under a consumer of both partitions:
    its KafkaStorageError (naming the file) is raised, then the partition is
    set aside; partition 1's new records keep coming across many calls, and
    the error comes back at most once per retry_backoff_ms; a seek retries
    at once."""
    if not fast:
        monkeypatch.setenv("SHMQ_FASTPATH", "0")
    elif not fastpath.enabled():
        pytest.skip("the C fast path is off here")
    backoff = 0.2
    t0, t1 = tp(topic, 0), tp(topic, 1)
    fill(producer, topic, 50, partition=0)
    fill(producer, topic, 5, partition=1)
    with Consumer(root=root, auto_offset_reset="earliest", retry_backoff_ms=int(backoff * 1000)) as c:
        assert (c._fast is not None) == fast
        c.assign([t0, t1])
        c.seek(t0, 40)                                 # partition 0 still has records to read

        def call() -> List[Any]:
            if api == "poll":
                m = c.poll(0.01)
                return [] if m is None else [(m.partition, m.value)]
            if api == "consume":
                return [(m.partition, m.value) for m in c.consume(100, timeout=0.01)]
            r = c.consume_arrays(1000, 0.01)
            return [] if r is None else [(r[0].partition, v if isinstance(v, bytes) else v.tobytes())
                                         for v in r[1].values]

        pdir = Root(root).partition_dir(topic, 0)
        segments = [os.path.join(pdir, n) for n in sorted(os.listdir(pdir)) if n.endswith(".log")]
        for path in segments:
            os.truncate(path, 0)
        errors: List[float] = []
        got: List[bytes] = []
        sent: List[bytes] = []
        calls = 0
        end = time.monotonic() + 1.5
        while time.monotonic() < end:
            v = b"n%06d" % len(sent)                    # fixed width: consume_arrays gives a 2-D array
            producer.send(topic, v, partition=1)
            sent.append(v)
            calls += 1
            try:
                recs = call()
            except KafkaStorageError as e:
                errors.append(time.monotonic())
                assert (e.topic, e.partition) == (topic, 0), (e.topic, e.partition, str(e))
                assert any(path in str(e) for path in segments), str(e)
                continue
            assert all(part == 1 for part, _ in recs), recs
            got.extend(v for _, v in recs if v.startswith(b"n"))
        got.extend(v for part, v in drain_values(call) if part == 1)
        assert got == sent, f"partition 1: {len(got)} of {len(sent)} records, errors: {len(errors)}"
        assert errors and errors[0] - (end - 1.5) < 0.5, errors
        gaps = [b - a for a, b in zip(errors, errors[1:])]
        assert len(errors) >= 3, f"the set-aside partition is retried every {backoff} s: {len(errors)} errors"
        assert min(gaps) >= backoff * 0.9, f"raised more than once per backoff: {gaps}"
        assert calls > 5 * len(errors), (calls, len(errors))
        print(f"{api}: {len(got)} records of partition 1 in {calls} calls, {len(errors)} errors, "
              f"{min(gaps):.3f} s apart at least")
        # A seek of the partition clears its state: the next call reads it (and fails) at once.
        while True:
            try:
                call()
            except KafkaStorageError:
                break
        raised = time.monotonic()
        with pytest.raises(KafkaStorageError):
            c.seek(t0, 40)
            for _ in range(3):
                call()
        assert time.monotonic() - raised < backoff / 2, "seek did not retry the partition at once"


def drain_values(call: Any) -> List[Any]:
    out: List[Any] = []
    for _ in range(100):
        try:
            got = call()
        except KafkaStorageError:
            continue
        if not got:
            return out
        out.extend(got)
    return out
