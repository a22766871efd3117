"""Producer API: send (key, partition, headers, timestamp), send_batch (lists and
2-D uint8 numpy), serializers, flush/close/context manager, Kafka's murmur2
placement, and bad input that raises the documented error and stores nothing.

One private root per module (never the default one), a fresh topic per test;
the module's coordinator is killed at teardown.
"""
from __future__ import annotations

import itertools
import json
import os
from typing import Dict, Iterator, List

import numpy as np
import pytest
from kafka.partitioner.default import murmur2

from shmq import (Admin, Consumer, InvalidConfig, InvalidRecord, InvalidTopic, MessageSizeTooLarge, Producer,
                  RecordMetadata, TopicPartition, UnknownTopicOrPartition, errors)

pytestmark = pytest.mark.timeout(60)

_names = itertools.count()
SMALL = {"segment_bytes": 256 << 10, "segment_count": 2}   # cheap to create


@pytest.fixture(scope="module")
def root(module_root: str) -> str:
    """This module's tests share one root (conftest's module_root)."""
    return module_root


@pytest.fixture(scope="module")
def admin(root: str) -> Iterator[Admin]:
    a = Admin(root)
    yield a
    a.close()


@pytest.fixture
def topic(admin: Admin) -> str:
    """A fresh 3-partition topic for this test."""
    name = f"t{next(_names)}"
    admin.create_topic(name, 3, SMALL)
    return name


@pytest.fixture
def producer(root: str) -> Iterator[Producer]:
    p = Producer(root)
    yield p
    p.close()


def end_offsets(admin: Admin, topic: str) -> List[int]:
    return [p.end_offset for p in admin.describe_topic(topic).partitions]


def read_all(root: str, topic: str, partitions: int = 3) -> List:  # type: ignore[type-arg]
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, p) for p in range(partitions)])
        out = []
        while True:
            got = c.consume(10_000, timeout=0.05)
            if not got:
                return sorted(out, key=lambda m: (m.partition, m.offset))
            out.extend(got)


def kafka_partition(key: bytes, n: int) -> int:
    """Where kafka-python's DefaultPartitioner (= Java's) puts ``key``."""
    return (murmur2(key) & 0x7FFFFFFF) % n


# --------------------------------------------------------------------- send
def test_send_returns_record_metadata_and_the_record_reads_back(root: str, topic: str, producer: Producer,
                                                               admin: Admin) -> None:
    md = producer.send(topic, b"hello", key=b"k1", partition=1)
    assert isinstance(md, RecordMetadata)
    assert (md.topic, md.partition, md.offset) == (topic, 1, 0)
    md2 = producer.send(topic, b"world", partition=1)
    assert md2.offset == 1 and md2.timestamp_ms >= md.timestamp_ms
    assert end_offsets(admin, topic) == [0, 2, 0]
    msgs = read_all(root, topic)
    assert [(m.partition, m.offset, m.key, m.value) for m in msgs] == [(1, 0, b"k1", b"hello"), (1, 1, None, b"world")]
    assert msgs[0].timestamp_ms == md.timestamp_ms


def test_send_with_headers_and_explicit_timestamp(root: str, topic: str, producer: Producer) -> None:
    headers = [("trace", b"abc"), ("empty", None), ("trace", b"dup")]
    md = producer.send(topic, b"v", key=b"k", partition=2, headers=headers, timestamp_ms=1_234_567)
    assert md.timestamp_ms == 1_234_567
    (m,) = read_all(root, topic)
    assert (m.partition, m.offset, m.timestamp_ms) == (2, 0, 1_234_567)
    assert list(m.headers) == headers


def test_send_accepts_bytearray_memoryview_and_null_value(root: str, topic: str, producer: Producer) -> None:
    producer.send(topic, bytearray(b"ba"), key=memoryview(b"mk"), partition=0)
    producer.send(topic, None, key=b"tombstone", partition=0)
    producer.send(topic, b"", partition=0)
    msgs = read_all(root, topic)
    assert [(m.key, m.value) for m in msgs] == [(b"mk", b"ba"), (b"tombstone", None), (None, b"")]


def test_keyed_send_lands_where_kafka_murmur2_puts_it(root: str, admin: Admin) -> None:
    for n in (1, 3, 7, 12):
        name = f"mm{n}-{next(_names)}"
        admin.create_topic(name, n, SMALL)
        keys = [f"key-{i}".encode() for i in range(200)] + [b"", b"\x00\xff" * 9, "ünï".encode()]
        with Producer(root) as p:
            for k in keys:
                md = p.send(name, b"x", key=k)
                assert md.partition == kafka_partition(k, n), (k, n)
            for part in ("murmur2", "murmur2_random"):
                with Producer(root, partitioner=part) as p2:
                    assert p2.send(name, b"x", key=b"abc").partition == kafka_partition(b"abc", n)


def test_null_keys_spread_with_roundrobin_and_stay_in_range(root: str, topic: str) -> None:
    with Producer(root, partitioner="roundrobin") as p:
        parts = [p.send(topic, b"x").partition for _ in range(30)]
    assert sorted(set(parts)) == [0, 1, 2]
    with Producer(root) as p:     # sticky: every null-key record in a valid partition
        assert all(0 <= p.send(topic, b"x").partition < 3 for _ in range(50))
    with Producer(root, partitioner="xxhash") as p:
        a = p.send(topic, b"x", key=b"same").partition
        assert all(p.send(topic, b"x", key=b"same").partition == a for _ in range(10))


def test_serializers_turn_objects_into_bytes(root: str, topic: str) -> None:
    with Producer(root, value_serializer=lambda v: json.dumps(v).encode(),
                  key_serializer=lambda k: k.encode()) as p:
        md = p.send(topic, {"a": 1}, key="user-7")
        assert md.partition == kafka_partition(b"user-7", 3)
        p.send(topic, [1, 2], partition=0)
        p.send_batch(topic, [{"i": 0}, {"i": 1}], keys=["x", "y"])
    msgs = read_all(root, topic)
    got = {(m.key, m.value) for m in msgs}
    assert got == {(b"user-7", b'{"a": 1}'), (None, b"[1, 2]"), (b"x", b'{"i": 0}'), (b"y", b'{"i": 1}')}


def test_partitions_for_lists_the_topic_partitions(topic: str, producer: Producer) -> None:
    assert producer.partitions_for(topic) == [0, 1, 2]


# --------------------------------------------------------------- send_batch
def test_send_batch_list_to_one_partition_is_one_batch(root: str, topic: str, producer: Producer,
                                                       admin: Admin) -> None:
    values = [b"v%d" % i for i in range(100)]
    out = producer.send_batch(topic, values, partition=2, timestamp_ms=42)
    assert out == [RecordMetadata(topic, 2, 0, 42)]
    assert end_offsets(admin, topic) == [0, 0, 100]
    msgs = read_all(root, topic)
    assert [m.value for m in msgs] == values and all(m.timestamp_ms == 42 for m in msgs)
    assert [m.offset for m in msgs] == list(range(100))


def test_send_batch_with_keys_groups_by_kafka_partition_in_order(root: str, topic: str, producer: Producer) -> None:
    keys = [b"k%d" % (i % 10) for i in range(200)]
    values = [b"%d" % i for i in range(200)]
    out = producer.send_batch(topic, values, keys=keys)
    assert sum(1 for _ in out) == len({kafka_partition(k, 3) for k in keys})
    msgs = read_all(root, topic)
    assert len(msgs) == 200
    for m in msgs:
        assert m.partition == kafka_partition(m.key, 3)
    # Per partition, records keep the order they were given in.
    for p in range(3):
        vals = [int(m.value) for m in msgs if m.partition == p]
        assert vals == sorted(vals)
    # The returned base offsets point at each partition's first record.
    for md in out:
        first = next(m for m in msgs if m.partition == md.partition)
        assert md.offset == first.offset == 0


def test_send_batch_numpy_2d_uint8_values_and_keys(root: str, topic: str, producer: Producer) -> None:
    values = np.arange(64 * 50, dtype=np.uint32).astype(np.uint8).reshape(50, 64)
    out = producer.send_batch(topic, values, partition=0)
    assert [(md.partition, md.offset) for md in out] == [(0, 0)]
    keys = np.array([[i % 4, 0, 7] for i in range(50)], dtype=np.uint8)
    out2 = producer.send_batch(topic, values, keys=keys)
    assert sum(1 for _ in out2) >= 1
    msgs = read_all(root, topic)
    assert len(msgs) == 100
    p0 = [m for m in msgs if m.partition == 0][:50]
    assert [m.value for m in p0] == [bytes(r) for r in values]
    keyed = [m for m in msgs if m.key is not None]
    assert len(keyed) == 50
    for m in keyed:
        assert m.partition == kafka_partition(m.key, 3)
    with Consumer(root=root, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, 0)])
        tp, arrs = c.consume_arrays(50, timeout=1.0)
        assert tp == TopicPartition(topic, 0)
        assert isinstance(arrs.values, np.ndarray) and arrs.values.shape == (50, 64)
        assert np.array_equal(arrs.values, values)


def test_send_batch_null_values_and_serializer(root: str, topic: str) -> None:
    with Producer(root, value_serializer=str.encode) as p:
        p.send_batch(topic, ["a", "b"], partition=1)
    with Producer(root) as p:
        p.send_batch(topic, [b"x", None, b""], partition=1)
    assert [m.value for m in read_all(root, topic)] == [b"a", b"b", b"x", None, b""]


# ---------------------------------------------------------------- lifecycle
def test_flush_close_and_context_manager(root: str, topic: str) -> None:
    with Producer(root) as p:
        p.send(topic, b"a", partition=0)
        assert p.flush() == 0
        assert p.flush(timeout=1.0) == 0
    p.close()                           # closing twice is harmless
    with pytest.raises(errors.ShmqError):
        p.send(topic, b"after close", partition=0)
    assert [m.value for m in read_all(root, topic)] == [b"a"]


def test_acks_values(root: str, topic: str) -> None:
    for acks in (0, 1, "all", -1):
        with Producer(root, acks=acks) as p:
            assert p.send(topic, b"x", partition=0).offset >= 0
    assert Producer(root, acks=-1).acks == "all"


# ---------------------------------------------------------------- bad input
BAD_CONFIG = [dict(acks=2), dict(acks="none"), dict(partitioner="random"), dict(max_block_ms=-1),
              dict(max_block_ms="5"), dict(bootstrap_servers="x:9092")]


@pytest.mark.parametrize("kwargs", BAD_CONFIG, ids=[next(iter(k)) + "=" + repr(next(iter(k.values())))
                                                   for k in BAD_CONFIG])
def test_bad_producer_config_raises_invalid_config(root: str, kwargs: Dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(InvalidConfig):
        Producer(root, **kwargs)


def test_unknown_topic_and_invalid_names_raise_and_store_nothing(root: str, producer: Producer, admin: Admin) -> None:
    with pytest.raises(UnknownTopicOrPartition, match="nope"):
        producer.send("nope", b"x")
    with pytest.raises(UnknownTopicOrPartition):
        producer.send_batch("nope", [b"x"])
    for bad in ("../x", "a/b", "", ".", "..", "x" * 250, "sp ace"):
        with pytest.raises(InvalidTopic):
            producer.send(bad, b"x")
        with pytest.raises(InvalidTopic):
            producer.send_batch(bad, [b"x"])
    assert "nope" not in admin.list_topics()
    assert not os.path.exists(os.path.join(root, "x"))
    assert not any(n.startswith("..") for n in os.listdir(os.path.join(root, "data", "0")))


def test_unknown_partition_raises_and_stores_nothing(topic: str, producer: Producer, admin: Admin) -> None:
    for p in (3, -1, 99, "0", 1.0, True):
        with pytest.raises(UnknownTopicOrPartition):
            producer.send(topic, b"x", partition=p)  # type: ignore[arg-type]
        with pytest.raises(UnknownTopicOrPartition):
            producer.send_batch(topic, [b"x"], partition=p)  # type: ignore[arg-type]
    assert end_offsets(admin, topic) == [0, 0, 0]


@pytest.mark.parametrize("value,key", [("str", None), (b"v", "strkey"), (123, None), (b"v", 5),
                                       ({"a": 1}, None), (b"v", [1, 2])])
def test_wrong_value_or_key_type_raises_invalid_record(topic: str, producer: Producer, admin: Admin,
                                                      value: object, key: object) -> None:
    with pytest.raises(InvalidRecord):
        producer.send(topic, value, key=key)
    with pytest.raises(InvalidRecord):
        producer.send(topic, value, key=key, partition=0)
    assert end_offsets(admin, topic) == [0, 0, 0]


def test_bad_headers_and_timestamps_raise_invalid_record(topic: str, producer: Producer, admin: Admin) -> None:
    for headers in ([(1, b"x")], [("k", "str")], [("k",)], "notalist"):
        with pytest.raises((InvalidRecord, TypeError, ValueError)):
            producer.send(topic, b"x", partition=0, headers=headers)  # type: ignore[arg-type]
    for ts in (-1, "5", 1.5):
        with pytest.raises(InvalidRecord):
            producer.send(topic, b"x", partition=0, timestamp_ms=ts)  # type: ignore[arg-type]
        with pytest.raises(InvalidRecord):
            producer.send_batch(topic, [b"x"], partition=0, timestamp_ms=ts)  # type: ignore[arg-type]
    assert end_offsets(admin, topic) == [0, 0, 0]


def test_bad_batches_raise_invalid_record_and_store_nothing(topic: str, producer: Producer, admin: Admin) -> None:
    producer.send(topic, b"keep", partition=0)
    before = end_offsets(admin, topic)
    bad_calls = [
        dict(values=[b"a", "b"]),                                        # wrong value type
        dict(values=[b"a", 1], partition=1),
        dict(values=[b"a", b"b"], keys=[b"k"]),                          # key count mismatch
        dict(values=[b"a"], keys=["strkey"]),                            # wrong key type
        dict(values=np.zeros((3, 4), np.int32), partition=0),            # numpy of the wrong dtype
        dict(values=np.zeros(8, np.uint8), partition=0),                 # 1-D numpy
        dict(values=[], partition=0),                                    # empty batch
        dict(values="abc", partition=0),                                 # a str is not a list of records
    ]
    for kw in bad_calls:
        with pytest.raises(InvalidRecord):
            producer.send_batch(topic, **kw)
    # A batch whose later records are bad must not leave its earlier
    # partitions' records behind: records go to several partitions by key.
    keys = [b"k%d" % i for i in range(30)]
    assert len({kafka_partition(k, 3) for k in keys}) == 3
    with pytest.raises(InvalidRecord):
        producer.send_batch(topic, [b"ok"] * 29 + ["bad"], keys=keys)
    with pytest.raises(InvalidRecord):
        producer.send_batch(topic, [b"ok"] * 30, keys=keys[:29] + ["bad"])
    assert end_offsets(admin, topic) == before


def test_oversize_record_raises_message_size_too_large_and_stores_nothing(root: str, admin: Admin) -> None:
    name = f"small{next(_names)}"
    admin.create_topic(name, 2, {**SMALL, "max_message_bytes": 1000})
    with Producer(root) as p:
        p.send(name, b"x" * 1000, partition=0)                          # exactly the limit is fine
        p.send(name, b"x" * 500, key=b"k" * 500, partition=0)
        with pytest.raises(MessageSizeTooLarge) as ei:
            p.send(name, b"x" * 1001, partition=0)
        assert ei.value.topic == name and name in str(ei.value)
        with pytest.raises(MessageSizeTooLarge):
            p.send(name, b"x" * 600, key=b"k" * 401, partition=1)
        with pytest.raises(MessageSizeTooLarge):
            p.send(name, b"x" * 5000)
        with pytest.raises(MessageSizeTooLarge):
            p.send_batch(name, [b"ok", b"x" * 1001], partition=1)
        with pytest.raises(MessageSizeTooLarge):
            p.send_batch(name, np.zeros((2, 1001), np.uint8), partition=1)
        with pytest.raises(MessageSizeTooLarge):
            p.send_batch(name, [b"ok"] * 10 + [b"x" * 1001], keys=[b"k%d" % i for i in range(11)])
        assert end_offsets(admin, name) == [2, 0]
        # A record bigger than a whole segment, on a topic with the default limit.
        big = f"big{next(_names)}"
        admin.create_topic(big, 1, {"segment_bytes": 65536})
        with pytest.raises(MessageSizeTooLarge):
            p.send(big, b"x" * 70_000)
        with pytest.raises(MessageSizeTooLarge):
            p.send_batch(big, [b"x" * 70_000])
        assert end_offsets(admin, big) == [0]
        # The limit follows alter_config.
        admin.alter_config(name, {"max_message_bytes": 2000})
        assert p.send(name, b"x" * 1500, partition=1).offset == 0


def test_producer_follows_added_partitions(root: str, admin: Admin) -> None:
    name = f"grow{next(_names)}"
    admin.create_topic(name, 1, SMALL)
    with Producer(root) as p:
        assert p.send(name, b"x").partition == 0
        admin.create_partitions(name, 4)
        md = p.send(name, b"x", partition=3)
        assert (md.partition, md.offset) == (3, 0)
        assert p.partitions_for(name) == [0, 1, 2, 3]


def test_send_to_a_deleted_topic_fails_at_once_even_with_cached_metadata(admin: Admin, topic: str,
                                                                          producer: Producer) -> None:
    producer.send(topic, b"before", partition=0)          # the route (and the mapping) is now cached
    admin.delete_topic(topic)
    with pytest.raises(UnknownTopicOrPartition) as ei:     # no 100 ms window of sends into unlinked files
        producer.send(topic, b"after", partition=0)
    assert "deleted" in str(ei.value) or topic in str(ei.value)
