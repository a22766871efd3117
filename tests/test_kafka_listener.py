"""The Kafka listener with real, unmodified Kafka clients in real processes:
confluent-kafka (librdkafka), kafka-python and aiokafka against
``python -m shmq.kafka`` on an ephemeral port, each test with its own root.

Each client produces 100,000 keyed records (acks=all, idempotence on), as
issue 12 asks: on the 2-core reference host the three runs take about 5 s
(confluent-kafka), 7.5 s (kafka-python) and 4 s (aiokafka)."""
from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Set, Tuple

import psutil
import pytest

from kafka_support import Listener, frame, listener_for, recv_frame, stop_process
from shmq import Admin, Consumer, Producer
from shmq.root import Root

pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")

RECORDS = 100_000
AIO_RECORDS = 100_000
TIMEOUT = 60.0


@pytest.fixture
def kafka(root: Root) -> Iterator[Listener]:
    yield from listener_for(root.path)


def _keys(n: int, tag: str = "k") -> List[bytes]:
    return [f"{tag}{i}".encode() for i in range(n)]


# ------------------------------------------------------------ confluent-kafka
def test_confluent_kafka_produce_consume_commit_resume(kafka: Listener) -> None:
    ck = pytest.importorskip("confluent_kafka")
    from confluent_kafka.admin import AdminClient, NewTopic
    bs = kafka.bootstrap
    admin = AdminClient({"bootstrap.servers": bs})
    for _t, f in admin.create_topics([NewTopic("orders", 3, 1)], operation_timeout=10).items():
        f.result(timeout=TIMEOUT)

    p = ck.Producer({"bootstrap.servers": bs, "acks": "all", "enable.idempotence": True, "linger.ms": 5})
    errors: List[str] = []
    keys = _keys(RECORDS)

    def report(err, msg) -> None:  # type: ignore[no-untyped-def]
        if err is not None:
            errors.append(str(err))
    for i, k in enumerate(keys):
        p.produce("orders", key=k, value=b"v%d" % i, headers=[("n", str(i).encode())], on_delivery=report)
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(TIMEOUT) == 0
    assert errors == []

    def consume(expect: int) -> List[Tuple[int, int, bytes, bytes, List[Tuple[str, bytes]]]]:
        c = ck.Consumer({"bootstrap.servers": bs, "group.id": "g", "auto.offset.reset": "earliest",
                         "enable.auto.commit": False})
        c.subscribe(["orders"])
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < expect and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=1.0):
                assert m.error() is None, m.error()
                got.append((m.partition(), m.offset(), m.key(), m.value(), m.headers()))
        c.commit(asynchronous=False)
        time.sleep(0.2)
        assert c.consume(1000, timeout=0.5) == []     # nothing more than expected
        c.close()
        return got

    got = consume(RECORDS)
    assert len(got) == RECORDS
    assert sorted(k for _p, _o, k, _v, _h in got) == sorted(keys)
    for _p, _o, k, v, h in got:
        n = int(k[1:])
        assert v == b"v%d" % n and h == [("n", str(n).encode())]
    by_part: Dict[int, List[int]] = {}
    for part, off, *_ in got:
        by_part.setdefault(part, []).append(off)
    assert set(by_part) == {0, 1, 2}
    for offs in by_part.values():
        assert offs == list(range(len(offs)))      # from the start, in order, no gap, no duplicate

    # Restart: a new consumer of the group resumes from the commit.
    more = _keys(300, "m")
    for k in more:
        p.produce("orders", key=k, value=b"more")
    assert p.flush(TIMEOUT) == 0
    got2 = consume(300)
    assert sorted(k for _p, _o, k, _v, _h in got2) == sorted(more)
    for part, off, *_ in got2:
        assert off >= len(by_part[part])


# --------------------------------------------------------------- kafka-python
def test_kafka_python_produce_consume_commit_resume(kafka: Listener) -> None:
    kp = pytest.importorskip("kafka")
    from kafka.admin import NewTopic
    bs = kafka.bootstrap
    admin = kp.KafkaAdminClient(bootstrap_servers=bs, request_timeout_ms=20000)
    admin.create_topics([NewTopic("events", 2, 1)])
    admin.close()
    # kafka-python 3's producer is idempotent by default (InitProducerId + sequences).
    p = kp.KafkaProducer(bootstrap_servers=bs, acks="all", enable_idempotence=True, linger_ms=5)
    keys = _keys(RECORDS)
    futs = [p.send("events", key=k, value=b"v" + k, headers=[("h", k)]) for k in keys]
    p.flush(TIMEOUT)
    metas = [f.get(timeout=TIMEOUT) for f in futs]
    assert len({(m.partition, m.offset) for m in metas}) == RECORDS

    def consume(expect: int) -> list:
        c = kp.KafkaConsumer("events", bootstrap_servers=bs, group_id="g", auto_offset_reset="earliest",
                             enable_auto_commit=False)
        got: list = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < expect and time.monotonic() < deadline:
            for _tp, msgs in c.poll(1000).items():
                got.extend(msgs)
        c.commit()
        c.close()
        return got

    got = consume(RECORDS)
    assert len(got) == RECORDS
    assert sorted(m.key for m in got) == sorted(keys)
    stored = {(m.partition, m.offset): m for m in metas}
    for m in got:
        assert m.value == b"v" + m.key and m.headers == [("h", m.key)]
        assert stored[(m.partition, m.offset)].timestamp == m.timestamp
    more = _keys(200, "m")
    for k in more:
        p.send("events", key=k, value=b"x")
    p.flush(TIMEOUT)
    p.close()
    got2 = consume(200)
    assert sorted(m.key for m in got2) == sorted(more)


# ------------------------------------------------------------------- aiokafka
def test_aiokafka_produce_consume_commit_resume(kafka: Listener) -> None:
    aiokafka = pytest.importorskip("aiokafka")
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    bs = kafka.bootstrap
    n = AIO_RECORDS

    async def run() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bs)
        await admin.start()
        try:
            resp = await admin.create_topics([NewTopic("aio", 2, 1)], timeout_ms=20000)
            assert all(t[1] == 0 for t in resp.topic_errors), resp.topic_errors
        finally:
            await admin.close()
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=bs, acks="all", enable_idempotence=True, linger_ms=5)
        await p.start()
        try:
            futs = [await p.send("aio", key=b"a%d" % i, value=b"x%d" % i, headers=[("h", b"%d" % i)])
                    for i in range(n)]
            metas = await asyncio.gather(*futs)
        finally:
            await p.stop()
        assert len({(m.partition, m.offset) for m in metas}) == n
        assert {m.partition for m in metas} == {0, 1}

        async def consume(expect: int) -> list:
            c = aiokafka.AIOKafkaConsumer("aio", bootstrap_servers=bs, group_id="g", auto_offset_reset="earliest",
                                          enable_auto_commit=False)
            await c.start()
            got: list = []
            try:
                deadline = time.monotonic() + TIMEOUT
                while len(got) < expect and time.monotonic() < deadline:
                    for msgs in (await c.getmany(timeout_ms=1000, max_records=10_000)).values():
                        got.extend(msgs)
                await c.commit()
            finally:
                await c.stop()
            return got
        got = await consume(n)
        assert sorted(m.key for m in got) == sorted(b"a%d" % i for i in range(n))
        assert all(m.value == b"x" + m.key[1:] and m.headers == (("h", m.key[1:]),) for m in got)
        for part in (0, 1):                             # from the start, in order, no gap, no duplicate
            offs = [m.offset for m in got if m.partition == part]
            assert offs == list(range(len(offs)))
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=bs, acks="all")
        await p.start()
        await p.send_and_wait("aio", key=b"late", value=b"y")
        await p.stop()
        got2 = await consume(1)
        assert [m.key for m in got2] == [b"late"]
    asyncio.run(asyncio.wait_for(run(), 3 * TIMEOUT))


# ---------------------------------------------------------------------- mixed
def test_native_and_kafka_clients_see_the_same_records(kafka: Listener, root: Root) -> None:
    kp = pytest.importorskip("kafka")
    with Admin(root.path) as admin:
        admin.create_topic("mixed", partitions=2)
    # shmq.Producer -> kafka-python consumer: same offsets, keys, headers, timestamps.
    sent = {}
    with Producer(root.path) as prod:
        for i in range(500):
            md = prod.send("mixed", value=b"n%d" % i, key=b"key%d" % i, headers=[("src", b"native")],
                           timestamp_ms=1_700_000_000_000 + i)
            sent[(md.partition, md.offset)] = (b"key%d" % i, b"n%d" % i, 1_700_000_000_000 + i)
    c = kp.KafkaConsumer(bootstrap_servers=kafka.bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    c.assign([kp.TopicPartition("mixed", 0), kp.TopicPartition("mixed", 1)])
    c.seek_to_beginning()
    got = {}
    deadline = time.monotonic() + TIMEOUT
    while len(got) < len(sent) and time.monotonic() < deadline:
        for _tp, msgs in c.poll(1000).items():
            for m in msgs:
                got[(m.partition, m.offset)] = (m.key, m.value, m.timestamp)
                assert m.headers == [("src", b"native")]
    c.close()
    assert got == sent

    # kafka-python producer -> shmq.Consumer.
    p = kp.KafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all")
    kmeta = {}
    for i in range(300):
        md = p.send("mixed", key=b"kk%d" % i, value=b"k%d" % i, headers=[("src", b"kafka")],
                    timestamp_ms=1_800_000_000_000 + i).get(timeout=TIMEOUT)
        kmeta[(md.partition, md.offset)] = (b"kk%d" % i, b"k%d" % i, 1_800_000_000_000 + i)
    p.close()
    with Consumer(root=root.path) as nc:
        from shmq import TopicPartition
        nc.assign([TopicPartition("mixed", 0), TopicPartition("mixed", 1)])
        nc.seek(TopicPartition("mixed", 0), min(o for (pp, o) in kmeta if pp == 0))
        nc.seek(TopicPartition("mixed", 1), min(o for (pp, o) in kmeta if pp == 1))
        seen = {}
        deadline = time.monotonic() + TIMEOUT
        while len(seen) < len(kmeta) and time.monotonic() < deadline:
            for m in nc.consume(1000, timeout=0.5):
                seen[(m.partition, m.offset)] = (m.key, m.value, m.timestamp_ms)
                assert list(m.headers) == [("src", b"kafka")]
    assert seen == kmeta


def test_confluent_kafka_reads_native_records_and_acks_0_produce(kafka: Listener, root: Root) -> None:
    ck = pytest.importorskip("confluent_kafka")
    with Admin(root.path) as admin:
        admin.create_topic("native", partitions=1)
    with Producer(root.path) as prod:
        sent = [prod.send("native", value=b"v%d" % i, key=b"k%d" % i, headers=[("i", b"%d" % i)],
                          timestamp_ms=1_600_000_000_000 + i) for i in range(200)]
    c = ck.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "reader", "auto.offset.reset": "earliest"})
    c.assign([ck.TopicPartition("native", 0, ck.OFFSET_BEGINNING)])
    got = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < 200 and time.monotonic() < deadline:
        got += [m for m in c.consume(200, timeout=1.0) if m.error() is None]
    assert [(m.offset(), m.key(), m.value(), m.headers(), m.timestamp()[1]) for m in got] == \
        [(md.offset, b"k%d" % i, b"v%d" % i, [("i", b"%d" % i)], md.timestamp_ms) for i, md in enumerate(sent)]
    # acks=0: no answer is awaited, the records arrive all the same.
    p = ck.Producer({"bootstrap.servers": kafka.bootstrap, "acks": 0})
    for i in range(100):
        p.produce("native", key=b"z%d" % i, value=b"0")
    assert p.flush(TIMEOUT) == 0
    more = []
    deadline = time.monotonic() + TIMEOUT
    while len(more) < 100 and time.monotonic() < deadline:
        more += [m for m in c.consume(100, timeout=1.0) if m.error() is None]
    c.close()
    assert sorted(m.key() for m in more) == sorted(b"z%d" % i for i in range(100))


def _native_read(root: Root, topic: str, want: Dict[Tuple[int, int], tuple]) -> Dict[Tuple[int, int], tuple]:
    """(partition, offset) -> (key, value, headers, timestamp) of every record a
    native consumer reads from the lowest offset of ``want`` in each partition."""
    from shmq import TopicPartition
    with Consumer(root=root.path) as nc:
        parts = sorted({pp for pp, _o in want})
        nc.assign([TopicPartition(topic, pp) for pp in parts])
        for pp in parts:
            nc.seek(TopicPartition(topic, pp), min(o for (q, o) in want if q == pp))
        seen = {}
        deadline = time.monotonic() + TIMEOUT
        while len(seen) < len(want) and time.monotonic() < deadline:
            for m in nc.consume(1000, timeout=0.5):
                seen[(m.partition, m.offset)] = (m.key, m.value, list(m.headers), m.timestamp_ms)
    return seen


def _native_send(root: Root, topic: str, n: int, ts0: int) -> Dict[Tuple[int, int], tuple]:
    sent = {}
    with Producer(root.path) as prod:
        for i in range(n):
            hdrs = [("src", b"native"), ("i", b"%d" % i)]
            md = prod.send(topic, value=b"n%d" % i, key=b"key%d" % i, headers=hdrs, timestamp_ms=ts0 + i)
            sent[(md.partition, md.offset)] = (b"key%d" % i, b"n%d" % i, hdrs, ts0 + i)
    return sent


def test_aiokafka_and_native_clients_see_the_same_records(kafka: Listener, root: Root) -> None:
    aiokafka = pytest.importorskip("aiokafka")
    with Admin(root.path) as admin:
        admin.create_topic("aiomix", partitions=2)
    sent = _native_send(root, "aiomix", 400, 1_700_000_000_000)

    async def run() -> Tuple[dict, dict]:
        # shmq.Producer -> aiokafka consumer: same offsets, keys, headers, timestamps.
        c = aiokafka.AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, enable_auto_commit=False,
                                      auto_offset_reset="earliest")
        await c.start()
        got = {}
        try:
            c.assign([aiokafka.TopicPartition("aiomix", 0), aiokafka.TopicPartition("aiomix", 1)])
            await c.seek_to_beginning()
            deadline = time.monotonic() + TIMEOUT
            while len(got) < len(sent) and time.monotonic() < deadline:
                for msgs in (await c.getmany(timeout_ms=500)).values():
                    for m in msgs:
                        got[(m.partition, m.offset)] = (m.key, m.value, list(m.headers), m.timestamp)
        finally:
            await c.stop()
        # aiokafka producer -> shmq.Consumer.
        p = aiokafka.AIOKafkaProducer(bootstrap_servers=kafka.bootstrap, acks="all", enable_idempotence=True)
        await p.start()
        kmeta = {}
        try:
            for i in range(300):
                hdrs = [("src", b"aiokafka"), ("j", b"%d" % i)]
                md = await p.send_and_wait("aiomix", key=b"ak%d" % i, value=b"a%d" % i, headers=hdrs,
                                           timestamp_ms=1_800_000_000_000 + i)
                kmeta[(md.partition, md.offset)] = (b"ak%d" % i, b"a%d" % i, hdrs, 1_800_000_000_000 + i)
        finally:
            await p.stop()
        return got, kmeta
    got, kmeta = asyncio.run(asyncio.wait_for(run(), 2 * TIMEOUT))
    assert got == sent
    assert {pp for pp, _o in kmeta} == {0, 1}
    assert _native_read(root, "aiomix", kmeta) == kmeta


def test_confluent_kafka_records_read_by_native_consumer(kafka: Listener, root: Root) -> None:
    ck = pytest.importorskip("confluent_kafka")
    with Admin(root.path) as admin:
        admin.create_topic("ckmix", partitions=2)
    p = ck.Producer({"bootstrap.servers": kafka.bootstrap, "acks": "all", "enable.idempotence": True,
                     "linger.ms": 5})
    kmeta: Dict[Tuple[int, int], tuple] = {}
    errors: List[str] = []

    def report(want: tuple):  # type: ignore[no-untyped-def]
        def cb(err, msg) -> None:  # type: ignore[no-untyped-def]
            if err is not None:
                errors.append(str(err))
            else:
                kmeta[(msg.partition(), msg.offset())] = want
        return cb
    for i in range(500):
        hdrs = [("src", b"librdkafka"), ("i", b"%d" % i)]
        want = (b"ck%d" % i, b"c%d" % i, hdrs, 1_750_000_000_000 + i)
        p.produce("ckmix", key=want[0], value=want[1], headers=hdrs, timestamp=want[3], on_delivery=report(want))
    assert p.flush(TIMEOUT) == 0 and errors == []
    assert len(kmeta) == 500 and {pp for pp, _o in kmeta} == {0, 1}
    assert _native_read(root, "ckmix", kmeta) == kmeta


def test_compressed_batches_from_librdkafka_are_stored_uncompressed(kafka: Listener, root: Root) -> None:
    """Every codec librdkafka has: the records arrive, for Kafka clients and native consumers alike."""
    ck = pytest.importorskip("confluent_kafka")
    pytest.importorskip("cramjam")
    codecs = ["gzip", "snappy", "lz4", "zstd"]
    with Admin(root.path) as admin:
        admin.create_topic("packed", partitions=1)
    for codec in codecs:
        p = ck.Producer({"bootstrap.servers": kafka.bootstrap, "compression.type": codec, "linger.ms": 20,
                         "enable.idempotence": True})
        for i in range(500):
            p.produce("packed", key=f"{codec}-{i}".encode(), value=b"payload %d " % i * 8)
        assert p.flush(TIMEOUT) == 0, codec
    want = [(f"{c}-{i}".encode(), b"payload %d " % i * 8) for c in codecs for i in range(500)]
    with Consumer(root=root.path) as nc:
        from shmq import TopicPartition
        nc.assign([TopicPartition("packed", 0)])
        nc.seek(TopicPartition("packed", 0), 0)
        got = []
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(want) and time.monotonic() < deadline:
            got += [(m.key, m.value) for m in nc.consume(1000, timeout=0.5)]
    assert got == want
    c = ck.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "unpack", "auto.offset.reset": "earliest"})
    c.assign([ck.TopicPartition("packed", 0, ck.OFFSET_BEGINNING)])
    got2 = []
    deadline = time.monotonic() + TIMEOUT
    while len(got2) < len(want) and time.monotonic() < deadline:
        got2 += [(m.key(), m.value()) for m in c.consume(1000, timeout=1.0) if m.error() is None]
    c.close()
    assert got2 == want


def test_offset_commit_metadata_is_kept(kafka: Listener, root: Root) -> None:
    ck = pytest.importorskip("confluent_kafka")
    with Admin(root.path) as admin:
        admin.create_topic("meta", partitions=2)
    c = ck.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "mirror-like", "enable.auto.commit": False})
    c.commit(offsets=[ck.TopicPartition("meta", 0, 7, metadata="source=x@41"), ck.TopicPartition("meta", 1, 3)],
             asynchronous=False)
    c.close()
    c = ck.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "mirror-like"})
    got = {tp.partition: (tp.offset, tp.metadata) for tp in
           c.committed([ck.TopicPartition("meta", 0), ck.TopicPartition("meta", 1)], timeout=TIMEOUT)}
    c.close()
    assert got[0] == (7, "source=x@41") and got[1][0] == 3 and not got[1][1]
    with Consumer(root=root.path, group_id="mirror-like") as nc:   # the native side sees the same offsets
        from shmq import TopicPartition
        assert nc.committed(TopicPartition("meta", 0)) == 7


def test_native_and_kafka_consumers_share_a_group(kafka: Listener, root: Root) -> None:
    ck = pytest.importorskip("confluent_kafka")
    with Admin(root.path) as admin:
        admin.create_topic("shared", partitions=4)
    native = Consumer("shared", group_id="mix", root=root.path, auto_offset_reset="earliest")
    kc = ck.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "mix", "auto.offset.reset": "earliest",
                      "heartbeat.interval.ms": 200, "session.timeout.ms": 6000})
    kc.subscribe(["shared"])
    try:
        def owned() -> Tuple[Set[int], Set[int]]:
            native.poll(0.05)
            kc.poll(0.05)
            return {tp.partition for tp in native.assignment()}, {tp.partition for tp in kc.assignment()}
        deadline = time.monotonic() + TIMEOUT
        overlap_seen = False
        while time.monotonic() < deadline:
            a, b = owned()
            overlap_seen |= bool(a & b)
            if a | b == {0, 1, 2, 3} and a and b:
                break
        assert not overlap_seen
        assert a | b == {0, 1, 2, 3} and not a & b and a and b, (a, b)
        # The native member leaves: the Kafka client ends up with every partition, never overlapping.
        native.close()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            kc.poll(0.1)
            if {tp.partition for tp in kc.assignment()} == {0, 1, 2, 3}:
                break
        assert {tp.partition for tp in kc.assignment()} == {0, 1, 2, 3}
    finally:
        kc.close()
        native.close()


# ------------------------------------------------------------------ robustness
def _api_versions_ok(ln: Listener) -> bool:
    with socket.create_connection((ln.host, ln.port), timeout=10) as s:
        s.sendall(frame(18, 0, 77))
        corr, body = recv_frame(s)
        return corr == 77 and struct.unpack(">h", body[:2])[0] == 0


def test_malformed_frames_close_only_that_connection(kafka: Listener) -> None:
    import random
    rnd = random.Random(12)
    bad = [struct.pack(">i", -5), struct.pack(">i", 2_000_000_000), struct.pack(">i", 3) + b"abc",
           struct.pack(">i", 100) + b"\x00\x03\x00\x01",                       # truncated, then EOF
           frame(3, 1, 9)[:-1], struct.pack(">i", 12) + struct.pack(">hhi", 0, 7, 1) + b"\x7f\xff"]
    # 1,000 frames in all: random bytes, and well-sized frames of random content, some cut short.
    bad += [bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 64))) for _ in range(400)]
    for _ in range(1000 - len(bad)):
        n = rnd.randint(8, 200)
        body = struct.pack(">hhi", rnd.choice([0, 1, 2, 3, 8, 9, 11, 18, rnd.randint(-5, 100)]), rnd.randint(-1, 15),
                           rnd.getrandbits(31)) + bytes(rnd.getrandbits(8) for _ in range(n - 8))
        bad.append(struct.pack(">i", n) + body[:rnd.randint(0, n)] if rnd.random() < 0.3 else struct.pack(">i", n) + body)
    for data in bad:
        with socket.create_connection((kafka.host, kafka.port), timeout=10) as s:
            try:
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)      # a truncated frame ends with EOF
                s.settimeout(10)
                while s.recv(65536):
                    pass
            except OSError:                      # reset by the listener closing this connection
                pass
    assert kafka.alive()
    assert _api_versions_ok(kafka)
    assert "closing connection" in kafka.log()


def test_unsupported_requests_get_error_codes(kafka: Listener) -> None:
    with socket.create_connection((kafka.host, kafka.port), timeout=10) as s:
        # ApiVersions newer than served: error 35 in a v0 body listing ApiVersions' range.
        s.sendall(frame(18, 9, 1))
        corr, body = recv_frame(s)
        assert corr == 1 and struct.unpack(">h", body[:2])[0] == 35
        # An API the listener does not serve (DeleteRecords v0): UNSUPPORTED_VERSION, connection kept.
        s.sendall(frame(21, 0, 2, struct.pack(">i", 0) + struct.pack(">i", 1000)))
        corr, body = recv_frame(s)
        assert corr == 2
        # An API key nobody knows: a bare error answer.
        s.sendall(frame(999, 0, 3))
        corr, body = recv_frame(s)
        assert corr == 3 and struct.unpack(">h", body[:2])[0] == 35
        s.sendall(frame(18, 0, 4))
        corr, body = recv_frame(s)
        assert corr == 4 and struct.unpack(">h", body[:2])[0] == 0


# ------------------------------------------------------------- shmq serve --kafka
def _free_port() -> int:
    with socket.socket() as s:                 # a free port (the listener binds it right after)
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as c:
            c.sendall(frame(18, 0, 5))
            corr, body = recv_frame(c)
            return corr == 5 and struct.unpack(">h", body[:2])[0] == 0
    except OSError:
        return False


def _wait(cond, what: str, timeout: float = TIMEOUT) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_root_setting_runs_the_listener_in_the_embedded_coordinator(root: Root) -> None:
    from shmq.coordinator.client import lock_held
    port = _free_port()
    out = subprocess.run([sys.executable, "-m", "shmq.cli.main", "--root", root.path, "kafka", "enable",
                          f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stderr

    def listener_pid() -> int:
        try:
            return int(open(root.kafka_lock_path).read() or 0)
        except (OSError, ValueError):
            return 0
    try:
        _run_setting_scenario(root, port, listener_pid)
    finally:                                    # the listener outlives a killed coordinator: stop it here
        pid = listener_pid()
        if pid and lock_held(root.kafka_lock_path):
            os.kill(pid, signal.SIGKILL)


def _run_setting_scenario(root: Root, port: int, listener_pid) -> None:  # type: ignore[no-untyped-def]
    from shmq.coordinator.client import lock_held
    with Admin(root.path) as admin:            # starts the embedded coordinator, which starts the listener
        admin.list_topics()
        _wait(lambda: _answers(port), "the coordinator never started the listener")
        # The listener dies: the coordinator starts it again.
        pid = listener_pid()
        os.kill(pid, signal.SIGKILL)
        _wait(lambda: lock_held(root.kafka_lock_path) and listener_pid() not in (0, pid),
              "the listener was not restarted")
        _wait(lambda: _answers(port), "the restarted listener does not answer")
        # The coordinator dies: its listener keeps serving and the successor adopts it (no second one).
        pid = listener_pid()
        coordinator = root.coordinator_pid()
        assert coordinator is not None
        os.kill(coordinator, signal.SIGKILL)
        admin.list_topics()                     # a successor coordinator starts
        time.sleep(2.0)
        assert listener_pid() == pid and _answers(port)
        out = subprocess.run([sys.executable, "-m", "shmq.cli.main", "--root", root.path, "kafka", "status"],
                             capture_output=True, text=True, timeout=TIMEOUT)
        assert f"127.0.0.1:{port}" in out.stdout and "running" in out.stdout
        # A new setting: the adopted listener is replaced by one on the new port.
        port2 = _free_port()
        subprocess.run([sys.executable, "-m", "shmq.cli.main", "--root", root.path, "kafka", "enable",
                        f"127.0.0.1:{port2}"], check=True, timeout=TIMEOUT)
        _wait(lambda: _answers(port2) and not _answers(port), "the new setting was not applied")
    # shmq stop ends the listener with the coordinator.
    pid = listener_pid()
    out = subprocess.run([sys.executable, "-m", "shmq.cli.main", "--root", root.path, "stop"],
                         capture_output=True, text=True, timeout=TIMEOUT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert not _answers(port2) and not lock_held(root.kafka_lock_path)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    # disable: nothing runs it any more.
    subprocess.run([sys.executable, "-m", "shmq.cli.main", "--root", root.path, "kafka", "disable"],
                   check=True, timeout=TIMEOUT)
    with Admin(root.path) as admin:
        admin.list_topics()
        time.sleep(2.0)
        assert not lock_held(root.kafka_lock_path)


def test_shmq_serve_kafka_runs_the_listener_with_the_coordinator(root: Root) -> None:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shmq.cli.main", "--root", root.path, "serve", "--kafka",
                             f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: _answers(port) or proc.poll() is not None, "the listener never answered")
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    finally:
        stop_process(proc, wait=20)
    with pytest.raises(OSError):                # the listener went with the coordinator
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
