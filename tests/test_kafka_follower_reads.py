"""KIP-392 over the wire: a confluent-kafka consumer with ``client.rack`` is
told by the listener's node 0 (the leader of every partition) to fetch from
the follower-read node of an in-sync replica in its rack, and that node
serves the replica's own log, never above the high watermark; a consumer
without a rack reads the leader's log. Real replica processes."""
from __future__ import annotations

import time
from typing import Iterator, List

import pytest

from kafka_support import Listener, listener_for
from shmq import Admin, Producer
from shmq.cluster import Cluster
from shmq.root import Root
from tests.test_replication import replica_dirs, wait_isr

pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")

CONFIG = {"replication_factor": 3, "min_insync_replicas": 2, "segment_bytes": 1 << 20, "segment_count": 4}
TIMEOUT = 60.0
N = 500


@pytest.fixture
def kafka(root: Root) -> Iterator[Listener]:
    yield from listener_for(root.path)


def _consume(bs: str, n: int, **conf: str) -> "tuple[List[bytes], object]":
    ck = pytest.importorskip("confluent_kafka")
    c = ck.Consumer({"bootstrap.servers": bs, "group.id": "near-readers", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", "topic.metadata.refresh.interval.ms": 1000, **conf})
    c.assign([ck.TopicPartition("near", 0, ck.OFFSET_BEGINNING)])
    got: List[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    while len(got) < n and time.monotonic() < deadline:
        for m in c.consume(500, timeout=0.5):
            assert m.error() is None, m.error()
            got.append(m.value())
    return got, c


def more(root: Root, c, got: List[bytes], lo: int, hi: int) -> None:  # type: ignore[no-untyped-def]
    """Produce records lo..hi-1 (acks=all) and consume until ``got`` holds exactly 0..hi-1."""
    with Producer(root.path, acks="all") as p:
        for i in range(lo, hi):
            p.send("near", b"%06d" % i, partition=0)
    deadline = time.monotonic() + TIMEOUT
    while len(got) < hi and time.monotonic() < deadline:
        got += [m.value() for m in c.consume(500, timeout=0.5) if m.error() is None]
    assert got == [b"%06d" % i for i in range(hi)]


@pytest.mark.timeout(180)
def test_a_kafka_client_in_a_followers_rack_fetches_from_that_follower(kafka: Listener, root: Root) -> None:
    with Admin(root.path) as admin:
        admin.create_topic("near", 1, CONFIG)
        d = wait_isr(admin, "near", 3)
        follower = next(r for r in d.replicas if r != d.leader)
        admin.alter_config("near", {"replica_racks": {str(follower): "rack-b"}})
        paths = replica_dirs(root, admin, "near")
    with Producer(root.path, acks="all") as p:
        for i in range(N):
            p.send("near", b"%06d" % i, partition=0)
    want = [b"%06d" % i for i in range(N)]
    cluster = Cluster(root.path)
    try:
        def listener_positions(path: str) -> List[int]:
            plog = cluster.read_log("near", 0, None) if path == paths[d.leader] else cluster.read_log("near", 0,
                                                                                                       "rack-b")
            assert plog.path == path
            return [r.position for r in plog.readers() if r.pid == kafka.proc.pid]

        got, c = _consume(kafka.bootstrap, N, **{"client.rack": "rack-b"})
        try:
            assert got == want
            # The listener read the follower's log for this client, not the leader's.
            assert listener_positions(paths[follower]) == [N]
            assert listener_positions(paths[d.leader]) == []
            md = c.list_topics("near", timeout=10)
            nodes = set(md.brokers)
            assert 0 in nodes and 1000 + follower in nodes
            assert sorted(md.topics["near"].partitions[0].replicas) == [0, 1000 + follower]
            more(root, c, got, N, 2 * N)                # it keeps reading the follower
            assert listener_positions(paths[follower]) == [2 * N]
            # The follower has no rack any more: its node answers NOT_LEADER_OR_FOLLOWER and the
            # client goes back to the leader.
            with Admin(root.path) as admin:
                admin.alter_config("near", {"replica_racks": {}})
            more(root, c, got, 2 * N, 3 * N)
            assert 3 * N in listener_positions(paths[d.leader])
        finally:
            c.close()
        got, c = _consume(kafka.bootstrap, 3 * N)     # no rack: the leader's log
        try:
            assert got == [b"%06d" % i for i in range(3 * N)]
        finally:
            c.close()
    finally:
        cluster.close()
