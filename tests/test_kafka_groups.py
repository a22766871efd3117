"""Kafka consumer groups through the listener: a two-member group of one
client rebalances when a member leaves, and kcat (the Debian package)
round-trips records with keys and headers."""
from __future__ import annotations

import shutil
import subprocess
import time
from typing import Iterator, Set

import pytest

from kafka_support import Listener, listener_for
from shmq import Admin, Consumer, TopicPartition
from shmq.root import Root

pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")

TIMEOUT = 60.0


@pytest.fixture
def kafka(root: Root) -> Iterator[Listener]:
    yield from listener_for(root.path)


def test_two_member_group_rebalances_when_one_leaves(kafka: Listener, root: Root) -> None:
    ck = pytest.importorskip("confluent_kafka")
    with Admin(root.path) as admin:
        admin.create_topic("work", partitions=4)
    conf = {"bootstrap.servers": kafka.bootstrap, "group.id": "pair", "auto.offset.reset": "earliest",
            "heartbeat.interval.ms": 200, "session.timeout.ms": 6000}
    a, b = ck.Consumer(conf), ck.Consumer(conf)
    a.subscribe(["work"])
    b.subscribe(["work"])

    def parts(c) -> Set[int]:  # type: ignore[no-untyped-def]
        return {tp.partition for tp in c.assignment()}
    try:
        deadline = time.monotonic() + TIMEOUT
        overlap = False
        while time.monotonic() < deadline:
            a.poll(0.05)
            b.poll(0.05)
            overlap |= bool(parts(a) & parts(b))
            if parts(a) | parts(b) == {0, 1, 2, 3} and parts(a) and parts(b):
                break
        assert not overlap
        assert parts(a) | parts(b) == {0, 1, 2, 3} and parts(a) and parts(b), (parts(a), parts(b))
        b.close()                                   # LeaveGroup: the other member takes everything
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and parts(a) != {0, 1, 2, 3}:
            a.poll(0.1)
        assert parts(a) == {0, 1, 2, 3}
    finally:
        a.close()


def test_kafka_python_two_member_group_rebalances_when_one_leaves(kafka: Listener, root: Root) -> None:
    kp = pytest.importorskip("kafka")
    with Admin(root.path) as admin:
        admin.create_topic("jobs", partitions=4)
    opts = dict(bootstrap_servers=kafka.bootstrap, group_id="duo", auto_offset_reset="earliest",
                heartbeat_interval_ms=200, session_timeout_ms=6000)
    a, b = kp.KafkaConsumer("jobs", **opts), kp.KafkaConsumer("jobs", **opts)

    def parts(c) -> Set[int]:  # type: ignore[no-untyped-def]
        return {tp.partition for tp in c.assignment()}
    try:
        # kafka-python's assignment() keeps the old partitions until its rejoin completes
        # (it fetches nothing meanwhile), so only the settled assignments are compared here;
        # the confluent-kafka test above checks every moment.
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline:
            a.poll(50)
            b.poll(50)
            if parts(a) | parts(b) == {0, 1, 2, 3} and not parts(a) & parts(b) and parts(a) and parts(b):
                break
        assert parts(a) | parts(b) == {0, 1, 2, 3} and parts(a) and parts(b), (parts(a), parts(b))
        b.close()
        deadline = time.monotonic() + TIMEOUT
        while time.monotonic() < deadline and parts(a) != {0, 1, 2, 3}:
            a.poll(100)
        assert parts(a) == {0, 1, 2, 3}
    finally:
        a.close()


def test_aiokafka_two_member_group_rebalances_when_one_leaves(kafka: Listener, root: Root) -> None:
    aiokafka = pytest.importorskip("aiokafka")
    import asyncio
    with Admin(root.path) as admin:
        admin.create_topic("tasks", partitions=4)

    async def run() -> None:
        opts = dict(bootstrap_servers=kafka.bootstrap, group_id="aio", auto_offset_reset="earliest",
                    heartbeat_interval_ms=200, session_timeout_ms=6000)
        a, b = aiokafka.AIOKafkaConsumer("tasks", **opts), aiokafka.AIOKafkaConsumer("tasks", **opts)
        await a.start()
        await b.start()

        def parts(c) -> Set[int]:  # type: ignore[no-untyped-def]
            return {tp.partition for tp in c.assignment()}
        try:
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline:
                await a.getmany(timeout_ms=50)
                await b.getmany(timeout_ms=50)
                if parts(a) | parts(b) == {0, 1, 2, 3} and not parts(a) & parts(b) and parts(a) and parts(b):
                    break
            assert parts(a) | parts(b) == {0, 1, 2, 3} and not parts(a) & parts(b), (parts(a), parts(b))
            await b.stop()
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and parts(a) != {0, 1, 2, 3}:
                await a.getmany(timeout_ms=100)
            assert parts(a) == {0, 1, 2, 3}
        finally:
            await a.stop()
            await b.stop()
    asyncio.run(asyncio.wait_for(run(), 3 * TIMEOUT))


def test_a_dead_kafka_consumers_partitions_move_after_its_session(kafka: Listener, root: Root) -> None:
    """A Kafka member that stops heartbeating (its process is gone) loses its
    partitions after session.timeout.ms; a native member of the group gets them."""
    script = f"""
import time, confluent_kafka as ck
c = ck.Consumer({{"bootstrap.servers": "{kafka.bootstrap}", "group.id": "g", "session.timeout.ms": 3000,
                 "heartbeat.interval.ms": 200}})
c.subscribe(["lone"])
while not c.assignment():
    c.poll(0.1)
print("assigned", flush=True)
time.sleep(60)
"""
    pytest.importorskip("confluent_kafka")
    import sys
    with Admin(root.path) as admin:
        admin.create_topic("lone", partitions=2)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().startswith("assigned")
        native = Consumer("lone", group_id="g", root=root.path)
        try:
            native.poll(0.2)
            proc.kill()                              # no LeaveGroup, no more heartbeats
            proc.wait(5)
            deadline = time.monotonic() + TIMEOUT
            while time.monotonic() < deadline and set(native.assignment()) != {TopicPartition("lone", 0),
                                                                                TopicPartition("lone", 1)}:
                native.poll(0.1)
            assert set(native.assignment()) == {TopicPartition("lone", 0), TopicPartition("lone", 1)}
        finally:
            native.close()
    finally:
        proc.kill()
        proc.wait(5)


def test_kcat_lists_produces_and_consumes(kafka: Listener, root: Root) -> None:
    kcat = shutil.which("kcat") or shutil.which("kafkacat")
    if kcat is None:
        pytest.skip("kcat is not installed (Debian package kcat: apt-get install kcat)")
    with Admin(root.path) as admin:
        admin.create_topic("cat", partitions=1)
    lines = "".join(f"k{i}\tv{i}\n" for i in range(50))
    subprocess.run([kcat, "-b", kafka.bootstrap, "-P", "-t", "cat", "-K", "\t", "-H", "src=kcat"], input=lines,
                   text=True, check=True, timeout=TIMEOUT)
    meta = subprocess.run([kcat, "-b", kafka.bootstrap, "-L", "-t", "cat"], capture_output=True, text=True,
                          check=True, timeout=TIMEOUT).stdout
    assert 'topic "cat" with 1 partitions' in meta
    out = subprocess.run([kcat, "-b", kafka.bootstrap, "-C", "-t", "cat", "-o", "beginning", "-e", "-f",
                          "%o %k %s %h\n"], capture_output=True, text=True, check=True, timeout=TIMEOUT).stdout
    assert out.splitlines() == [f"{i} k{i} v{i} src=kcat" for i in range(50)]
    # What kcat wrote, a native consumer reads with the same offsets, keys and headers.
    with Consumer(root=root.path) as c:
        c.assign([TopicPartition("cat", 0)])
        c.seek(TopicPartition("cat", 0), 0)
        recs = []
        deadline = time.monotonic() + TIMEOUT
        while len(recs) < 50 and time.monotonic() < deadline:
            recs += c.consume(100, timeout=0.5)
    assert [(m.offset, m.key, m.value, list(m.headers)) for m in recs] == \
        [(i, b"k%d" % i, b"v%d" % i, [("src", b"kcat")]) for i in range(50)]
