"""Follower fetching (Kafka 2.4's KIP-392): a consumer with ``client_rack``
reads a replicated partition from an in-sync replica in its rack (topic
config ``replica_racks``), never above the high watermark, and keeps reading
while the leader is replaced. Real replica processes, a per-test root."""
from __future__ import annotations

import os
import signal

import pytest

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.cluster import Cluster
from shmq.errors import InvalidConfig
from tests.test_replication import replica_dirs, replica_pid, wait_isr

CONFIG = {"replication_factor": 3, "min_insync_replicas": 2, "segment_bytes": 1 << 20, "segment_count": 4}


@pytest.mark.timeout(120)
def test_a_consumer_in_a_followers_rack_reads_that_follower_and_keeps_reading_through_a_failover(root):
    admin = Admin(root.path)
    admin.create_topic("near", 1, CONFIG)
    d = wait_isr(admin, "near", 3)
    follower = next(r for r in d.replicas if r != d.leader)
    admin.alter_config("near", {"replica_racks": {str(follower): "rack-b"}})
    paths = replica_dirs(root, admin, "near")
    with Producer(root.path, acks="all") as p:
        for i in range(500):
            p.send("near", b"%06d" % i, partition=0)
    with Consumer(root=root.path, auto_offset_reset="earliest", client_rack="rack-b") as c:
        c.assign([TopicPartition("near", 0)])
        got = [m.value for m in c.consume(500, timeout=10)]
        while len(got) < 500:
            more = c.consume(500, timeout=5)
            assert more, f"stuck after {len(got)} records"
            got += [m.value for m in more]
        assert got == [b"%06d" % i for i in range(500)]
        cluster = Cluster(root.path)
        try:
            follower_log = cluster.read_log("near", 0, "rack-b")
            assert follower_log.path == paths[follower]
            [me] = [r for r in follower_log.readers() if r.pid == os.getpid()]
            assert me.position == 500, "the consumer reads the follower's log"
            assert not [r for r in cluster.read_log("near", 0, None).readers() if r.pid == os.getpid()]
            # what it can read is what the follower holds below the high watermark
            assert follower_log.high_watermark <= follower_log.end_offset
        finally:
            cluster.close()
        # the leader's process dies: the consumer reads on from the follower, with no gap
        os.kill(replica_pid(root, d.leader), signal.SIGKILL)
        with Producer(root.path, acks="all") as p:
            for i in range(500, 1000):
                p.send("near", b"%06d" % i, partition=0)
        while len(got) < 1000:
            more = c.consume(500, timeout=10)
            assert more, f"stuck after {len(got)} records"
            got += [m.value for m in more]
        assert got == [b"%06d" % i for i in range(1000)]
    admin.close()


def test_a_rack_without_an_in_sync_replica_reads_from_the_leader_and_bad_racks_are_refused(root):
    admin = Admin(root.path)
    admin.create_topic("far", 1, {**CONFIG, "replica_racks": {"0": "a", "1": "b", "2": "c"}})
    d = wait_isr(admin, "far", 3)
    cluster = Cluster(root.path)
    try:
        info = cluster.topic("far")
        assert info.preferred_read_replica(0, "nowhere") == d.leader
        assert info.preferred_read_replica(0, None) == d.leader
        assert info.preferred_read_replica(0, "abc"[d.leader]) == d.leader
        other = next(r for r in d.replicas if r != d.leader)
        assert info.preferred_read_replica(0, "abc"[other]) == other
        assert cluster.read_log("far", 0, "nowhere").path == cluster.log("far", 0).path
    finally:
        cluster.close()
    with pytest.raises(InvalidConfig, match="replica_racks"):
        admin.alter_config("far", {"replica_racks": {"x": "a"}})
    with pytest.raises(InvalidConfig, match="client_rack"):
        Consumer(root=root.path, client_rack="")
    admin.close()
