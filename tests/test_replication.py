"""Replication with real replica processes: acks, ISR, elections, storage failure, recovery, idempotence.

Every test uses its own root (the ``root`` fixture kills its coordinator and
replica processes at the end); every wait is bounded.
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from typing import Any, Callable, Dict, List, Tuple

import pytest

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.coordinator.client import CoordinatorClient
from shmq.errors import LeaderNotAvailable, NotEnoughReplicas, ProducerFenced
from shmq.ringlog import LogReader, PartitionLog
from shmq.root import Root
from tests.conftest import kill_coordinator, kill_replicas


def wait_until(cond: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def status(root: Root) -> Dict[str, Any]:
    with CoordinatorClient(root) as c:
        return c.status()


def replica_pid(root: Root, rid: int) -> int:
    def registered() -> Any:
        r = status(root)["replicas"].get(str(rid))
        return r["pid"] if r and r["registered"] else None
    return wait_until(registered, 10, f"replica {rid} to register")


def partition(admin: Admin, topic: str, p: int = 0) -> Any:
    return admin.describe_topic(topic).partitions[p]


def wait_isr(admin: Admin, topic: str, size: int, p: int = 0, timeout: float = 10.0) -> Any:
    return wait_until(lambda: (lambda d: d if len(d.isr) == size and d.leader >= 0 else None)(
        partition(admin, topic, p)), timeout, f"{topic}-{p} to have {size} in-sync replicas")


def records_of(path: str) -> List[Tuple[int, bytes]]:
    """(offset, value) of every record in the log at ``path`` (its whole
    length: a follower's high watermark follows the leader's within 50 ms)."""
    plog = PartitionLog(path)
    try:
        wait_until(lambda: plog.high_watermark >= plog.end_offset, 5, f"{path} high watermark to reach its end")
        r = LogReader(plog, plog.start_offset)
        out: List[Tuple[int, bytes]] = []
        end = plog.end_offset
        while r.position < end:
            recs = r.read(4096)
            if not recs:
                break
            out.extend((m.offset, m.value) for m in recs)
        return out
    finally:
        plog.close()


def replica_dirs(root: Root, admin: Admin, topic: str, p: int = 0) -> Dict[int, str]:
    with CoordinatorClient(root) as c:
        md = c.metadata().topic(topic)
    assert md is not None and md.replicas is not None and md.replica_paths is not None
    return dict(zip(md.replicas[p], md.replica_paths[p]))


def create(admin: Admin, topic: str, rf: int = 3, **config: Any) -> Any:
    """Create ``topic`` (one partition) and wait until every replica process runs and the ISR is whole."""
    admin.create_topic(topic, 1, config={"replication_factor": rf, "segment_bytes": 1 << 20, "segment_count": 8,
                                         **config})
    d = wait_isr(admin, topic, rf)
    for r in d.replicas:
        replica_pid(admin.root, r)
    return wait_isr(admin, topic, rf)


def stop_follower(root: Root, admin: Admin, topic: str, rid: int, isr_after: int) -> int:
    """SIGSTOP replica ``rid`` once it is in sync, and wait until the ISR dropped it."""
    d = wait_until(lambda: (lambda x: x if rid in x.isr else None)(partition(admin, topic)), 10, "the follower in sync")
    pid = replica_pid(root, rid)
    os.kill(pid, signal.SIGSTOP)
    wait_until(lambda: (lambda x: x if rid not in x.isr and x.partition_epoch > d.partition_epoch else None)(
        partition(admin, topic)), 10, f"replica {rid} to leave the ISR")
    assert len(partition(admin, topic).isr) == isr_after
    return pid


def test_acks_all_records_are_in_every_replica_at_the_same_offsets(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "rep", 3, min_insync_replicas=2)
        assert sorted(d.replicas) == [0, 1, 2] and d.leader == d.replicas[0]
        with Producer(root, acks="all") as prod:
            offs = [prod.send("rep", b"v%d" % i).offset for i in range(500)]
            prod.send_batch("rep", [b"b%d" % i for i in range(500)])
        assert offs == list(range(500))
        d = partition(admin, "rep")
        assert d.high_watermark == 1000
        dirs = replica_dirs(root, admin, "rep")
        wait_until(lambda: all(PartitionLog(p).end_offset == 1000 for p in dirs.values()), 5, "followers to copy")
        logs = {r: records_of(p) for r, p in dirs.items()}
        assert logs[0] == logs[1] == logs[2]
        assert [v for _, v in logs[0]] == [b"v%d" % i for i in range(500)] + [b"b%d" % i for i in range(500)]
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("rep", 0)])
            got = c.consume(1000, timeout=5)
            assert [m.offset for m in got] == list(range(1000))


def test_idempotent_sends_keep_keys_headers_and_timestamps(root: Root) -> None:
    with Admin(root) as admin:
        create(admin, "hdrs", 2)
        with Producer(root, acks="all") as prod:
            assert prod.enable_idempotence
            prod.send("hdrs", b"v", key=b"k", headers=[("trace", b"42"), ("empty", None)], timestamp_ms=1234)
            prod.send("hdrs", None, key=b"tombstone")
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("hdrs", 0)])
            a, b = c.consume(2, timeout=5)
        assert (a.key, a.value, a.timestamp_ms) == (b"k", b"v", 1234)
        assert list(a.headers) == [("trace", b"42"), ("empty", None)]
        assert (b.key, b.value) == (b"tombstone", None)


def test_send_async_records_survive_a_leader_kill_once_each_in_order(root: Root) -> None:
    with Admin(root) as admin:
        admin.create_topic("plain", 1)
        with Producer(root, acks=1) as prod:        # nothing to wait for: done when it returns
            f = prod.send_async("plain", b"x")
            assert f.done() and f.get().offset == 0
        d = create(admin, "async", 3, min_insync_replicas=2)
        futures = []
        with Producer(root, acks="all") as prod:
            for i in range(3000):
                futures.append(prod.send_async("async", b"a%d" % i))
                if i == 1500:
                    os.kill(replica_pid(root, d.leader), signal.SIGKILL)
            prod.flush(timeout=30)
            assert all(f.done() for f in futures)
            offsets = [f.get().offset for f in futures]
        assert partition(admin, "async").leader != d.leader
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("async", 0)])
            got = c.consume(5000, timeout=5)
            while len(got) < 3000:
                more = c.consume(5000, timeout=2)
                if not more:
                    break
                got += more
        assert [m.value for m in got] == [b"a%d" % i for i in range(3000)]
        assert offsets == [m.offset for m in got]


def test_block_mode_replicated_topic_waits_for_the_group_and_loses_nothing(root: Root) -> None:
    with Admin(root) as admin:
        admin.create_topic("bounded", 1, config={"replication_factor": 2, "segment_bytes": 64 << 10,
                                                 "segment_count": 4, "overflow": "block"})
        wait_isr(admin, "bounded", 2)
        n = 6000                          # about 3 rings' worth of 64-byte records
        with Consumer("bounded", group_id="g", root=root, auto_offset_reset="earliest") as c, \
                Producer(root, acks="all", max_block_ms=20_000) as prod:
            got: List[bytes] = []
            for i in range(n):
                prod.send_async("bounded", b"%063d" % i)
                if i % 500 == 499:
                    prod.flush()
                    while len(got) < i + 1:
                        got += [m.value for m in c.consume(1000, timeout=5)]
                    c.commit(asynchronous=False)
            prod.flush()
        assert got == [b"%063d" % i for i in range(n)]


def test_coordinator_death_keeps_replication_going_and_a_new_one_takes_over(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "coord", 3, min_insync_replicas=2)
        pids = {r: replica_pid(root, r) for r in d.replicas}
    with Producer(root, acks="all") as prod:
        for i in range(100):
            prod.send("coord", b"c%d" % i)
        kill_coordinator(root)
        for i in range(100, 200):                   # the data path needs no coordinator
            prod.send("coord", b"c%d" % i)
    with Admin(root) as admin:                      # starts a new coordinator
        d2 = wait_isr(admin, "coord", 3)
        assert (d2.leader, d2.leader_epoch) == (d.leader, d.leader_epoch)     # no election happened
        assert {r: replica_pid(root, r) for r in d.replicas} == pids          # the same processes re-registered
        assert d2.high_watermark == 200
        with Producer(root, acks="all") as prod:
            assert prod.send("coord", b"after").offset == 200


def test_isr_below_min_insync_fails_acks_all_but_not_acks_1(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "minisr", 2, min_insync_replicas=2, replica_lag_time_max_ms=300)
        follower = [r for r in d.replicas if r != d.leader][0]
        with Producer(root, acks="all", delivery_timeout_ms=5000) as strict, Producer(root, acks=1) as loose:
            strict.send("minisr", b"before")
            pid = stop_follower(root, admin, "minisr", follower, 1)
            try:
                t0 = time.monotonic()
                with pytest.raises(NotEnoughReplicas, match="min_insync_replicas=2"):
                    strict.send("minisr", b"refused")
                assert time.monotonic() - t0 < 1.0            # fails fast, no wait for the timeout
                assert loose.send("minisr", b"acks=1 goes on").offset == 1
            finally:
                os.kill(pid, signal.SIGCONT)
            wait_isr(admin, "minisr", 2, timeout=10)
            assert strict.send("minisr", b"after").offset == 2


def test_unclean_election_off_keeps_partition_unavailable_and_on_reports_dropped(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "unclean", 2, replica_lag_time_max_ms=300)
        leader, follower = d.leader, [r for r in d.replicas if r != d.leader][0]
        dirs = replica_dirs(root, admin, "unclean")
        with Producer(root, acks="all") as prod:
            for i in range(100):
                prod.send("unclean", b"r%d" % i)
        fpid = stop_follower(root, admin, "unclean", follower, 1)     # the follower falls out of the ISR
        try:
            with Producer(root, acks=1) as prod:
                for i in range(100, 150):
                    prod.send("unclean", b"r%d" % i)  # only on the leader
            # The last in-sync replica loses its storage: nobody in sync is left.
            shutil.rmtree(dirs[leader])
            wait_until(lambda: partition(admin, "unclean").leader == -1, 5, "the partition to lose its leader")
        finally:
            os.kill(fpid, signal.SIGCONT)
        time.sleep(0.5)
        d = partition(admin, "unclean")
        assert d.leader == -1 and d.isr == []          # unclean election off: stays unavailable
        with Producer(root, acks=1, delivery_timeout_ms=300) as prod:
            with pytest.raises(LeaderNotAvailable):
                prod.send("unclean", b"nowhere")
        admin.alter_config("unclean", {"unclean_leader_election": True})
        d = wait_until(lambda: (lambda x: x if x.leader == follower else None)(partition(admin, "unclean")),
                       5, "the stale replica to lead")
        assert d.unclean is not None and d.unclean["dropped"] == 50
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("unclean", 0)])
            got = c.consume(100, timeout=5)
            assert [m.value for m in got] == [b"r%d" % i for i in range(100)]


def test_leader_files_removed_fail_over_without_losing_acknowledged_records(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "gone", 3, min_insync_replicas=2)
        dirs = replica_dirs(root, admin, "gone")
        with Producer(root, acks="all") as prod:
            for i in range(300):
                prod.send("gone", b"a%d" % i)
            shutil.rmtree(dirs[d.leader])
            new = wait_until(lambda: (lambda x: x if x.leader not in (-1, d.leader) else None)(
                partition(admin, "gone")), 5, "a new leader")
            for i in range(300, 600):
                prod.send("gone", b"a%d" % i)
        assert new.leader_epoch > d.leader_epoch
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("gone", 0)])
            got = c.consume(600, timeout=5)
        assert [m.value for m in got] == [b"a%d" % i for i in range(600)]
        # The replica that lost its files rebuilds them and returns to the ISR.
        wait_isr(admin, "gone", 3, timeout=10)


def test_corrupt_frame_on_the_leader_fails_over_to_an_in_sync_follower(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "crc", 3, min_insync_replicas=2)
        dirs = replica_dirs(root, admin, "crc")
        followers = [r for r in d.replicas if r != d.leader]
        pids = [replica_pid(root, r) for r in followers]
        with Producer(root, acks="all") as prod:
            for i in range(200):
                prod.send("crc", b"c%d" % i)
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            try:
                with Producer(root, acks=1) as loose:
                    loose.send("crc", b"CORRUPT-ME-PLEASE")
                seg = os.path.join(dirs[d.leader], "0.log")
                with open(seg, "r+b") as f:
                    data = f.read()
                    at = data.index(b"CORRUPT-ME-PLEASE")
                    f.seek(at)
                    f.write(b"X")                      # a flipped byte: the batch CRC no longer matches
            finally:
                for pid in pids:
                    os.kill(pid, signal.SIGCONT)
            new = wait_until(lambda: (lambda x: x if x.leader not in (-1, d.leader) else None)(
                partition(admin, "crc")), 5, "failover away from the corrupt leader")
            for i in range(200, 300):
                prod.send("crc", b"c%d" % i)
        assert new.leader in followers
        with Consumer(root=root, auto_offset_reset="earliest", check_crcs=True) as c:
            c.assign([TopicPartition("crc", 0)])
            got = [m.value for m in c.consume(400, timeout=5)]
        assert [v for v in got if v.startswith(b"c")] == [b"c%d" % i for i in range(300)]
        assert b"XORRUPT-ME-PLEASE" not in got


def test_disk_replica_with_flush_recovers_the_topic_after_the_root_is_wiped(root: Root, tmp_path: Any) -> None:
    disk = str(tmp_path / "disk-replica")
    os.makedirs(disk, mode=0o700)
    with Admin(root) as admin:
        admin.create_topic("durable", 1, config={"replication_factor": 2, "min_insync_replicas": 2,
                                                 "flush_messages": 1, "flush_ms": 20, "replica_dirs": {"1": disk},
                                                 "segment_bytes": 1 << 20, "segment_count": 4})
        wait_isr(admin, "durable", 2)
        assert replica_dirs(root, admin, "durable")[1] == os.path.join(disk, "durable-0")
        with Producer(root, acks="all") as prod:
            acked = [prod.send("durable", b"d%d" % i, key=b"k%d" % (i % 7)).offset for i in range(400)]
    # A simulated reboot: every process gone, the tmpfs root wiped.
    kill_coordinator(root)
    kill_replicas(root.path)
    shutil.rmtree(root.path)
    fresh = Root(root.path)
    with Admin(fresh) as admin:
        out = admin.recover_topics(disk)
        assert out == [{"topic": "durable", "recovered": True, "partitions": 1, "leader": 1, "end_offsets": [400]}]
        wait_isr(admin, "durable", 2)
        with Consumer(root=fresh, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("durable", 0)])
            got = c.consume(400, timeout=5)
        assert [m.offset for m in got] == acked
        assert [m.value for m in got] == [b"d%d" % i for i in range(400)]
        with Producer(fresh, acks="all") as prod:
            assert prod.send("durable", b"after").offset == 400


def test_send_whose_acknowledgement_was_lost_is_retried_and_stored_once(root: Root, monkeypatch: Any) -> None:
    from shmq.errors import NotLeaderForPartition
    with Admin(root) as admin:
        create(admin, "idem", 2)
        real = PartitionLog.wait_hw
        lost = {"n": 0}

        def lose_first_ack(self: PartitionLog, offset: int, timeout: Any = None) -> bool:
            if lost["n"] == 0:
                lost["n"] += 1
                assert real(self, offset, 5.0)         # it was stored and replicated...
                raise NotLeaderForPartition("ack lost in transit (test)")   # ...but the producer never hears
            return real(self, offset, timeout)

        monkeypatch.setattr(PartitionLog, "wait_hw", lose_first_ack)
        with Producer(root, acks="all") as prod:
            first = prod.send("idem", b"once")
            second = prod.send("idem", b"twice")
        assert lost["n"] == 1
        assert (first.offset, second.offset) == (0, 1)
        dirs = replica_dirs(root, admin, "idem")
        for path in dirs.values():
            wait_until(lambda: PartitionLog(path).end_offset == 2, 5, "the follower")
            assert [v for _, v in records_of(path)] == [b"once", b"twice"]


def test_zombie_producer_with_an_older_epoch_is_fenced(root: Root) -> None:
    with Admin(root) as admin:
        create(admin, "zombie", 2)
        old = Producer(root, acks="all", transactional_id="billing")
        old.init_transactions()
        old.begin_transaction()
        old.send("zombie", b"from the old instance")
        old.commit_transaction()
        new = Producer(root, acks="all", transactional_id="billing")
        new.init_transactions()
        new.begin_transaction()
        new.send("zombie", b"from the new instance")
        old.begin_transaction()
        with pytest.raises(ProducerFenced):
            old.send("zombie", b"zombie write")
        new.send("zombie", b"still fine")
        new.commit_transaction()
        old.close()
        new.close()
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("zombie", 0)])
            got: List[bytes] = []
            deadline = time.monotonic() + 5
            while len(got) < 3 and time.monotonic() < deadline:     # transaction markers take offsets
                got.extend(m.value for m in c.consume(3 - len(got), timeout=0.5))
        assert got == [b"from the old instance", b"from the new instance", b"still fine"]


def test_dead_replica_process_is_restarted_and_leader_fails_over(root: Root) -> None:
    with Admin(root) as admin:
        d = create(admin, "restart", 3, min_insync_replicas=2)
        old_pid = replica_pid(root, d.leader)
        with Producer(root, acks="all") as prod:
            for i in range(100):
                prod.send("restart", b"x%d" % i)
            os.kill(old_pid, signal.SIGKILL)
            d2 = wait_until(lambda: (lambda x: x if x.leader not in (-1, d.leader) else None)(
                partition(admin, "restart")), 5, "a new leader")
            assert d2.leader_epoch > d.leader_epoch
            prod.send("restart", b"after the kill")
        # The process is restarted, catches up and rejoins; the preferred replica leads again.
        wait_until(lambda: replica_pid(root, d.leader) != old_pid, 10, "a restarted process")
        wait_until(lambda: partition(admin, "restart").leader == d.replicas[0], 10, "preferred leader back")
        wait_isr(admin, "restart", 3)
        lines = _describe_lines(root, "restart")
        assert "Leader: %d" % d.replicas[0] in lines[1] and "Isr: " in lines[1] and "Replicas: 0,1,2" in lines[1]
        with Consumer(root=root, auto_offset_reset="earliest") as c:
            c.assign([TopicPartition("restart", 0)])
            got = [m.value for m in c.consume(101, timeout=5)]
        assert got == [b"x%d" % i for i in range(100)] + [b"after the kill"]


def _describe_lines(root: Root, topic: str) -> List[str]:
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "shmq", "--root", root.path, "topics", "describe", topic],
                         capture_output=True, text=True, timeout=30, check=True).stdout
    return out.strip().split("\n")


# ------------------------------------------- a follower killed in mid-copy

def _replica_log(path: str, epoch: int, leader: bool) -> PartitionLog:
    from shmq.ringlog.producer_state import ProducerStateTable
    plog = PartitionLog.create(path, segment_bytes=1 << 16, segment_count=4)
    ProducerStateTable.create(path).close()
    plog.set_replication(True, epoch, 0, 0b11, 0)
    plog.set_append_state(0 if leader else 2)        # OPEN / NOT_LEADER
    return plog


def _follow_until_killed(follower_path: str, leader_path: str, claims: int) -> None:
    """A replica process copying the leader's log dies (SIGKILL) right after
    claiming its ``claims``-th frame, before committing it."""
    from shmq.replica.partition import PartitionReplica
    os.environ["SHMQ_FAULT_INJECT"] = f"kill_after_claim:{claims}"
    pr = PartitionReplica(1, "t", 0, follower_path, {}, lambda *a, **k: None)
    pr.update(0, 0, 1, leader_path, False)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        pr.step()
    os._exit(3)                                       # not killed: the fault did not fire


def test_follower_killed_between_claim_and_commit_copies_that_batch_again_after_restart(shm_dir: str,
                                                                                     reaper: Any) -> None:
    """The claim a killed follower left uncommitted counts in its log end: the
    restarted follower must not resume copying past it (that batch would be
    missing from its log and its producer state, while its published log end
    says it holds it; elected leader, it loses an acknowledged batch and the
    producer's next batch fails with OutOfOrderSequenceNumber)."""
    from shmq.replica.epoch_cache import LeaderEpochCache
    from shmq.replica.partition import PartitionReplica
    from shmq.ringlog.producer_state import ProducerStateTable
    lpath, fpath = os.path.join(shm_dir, "leader"), os.path.join(shm_dir, "follower")
    leader = _replica_log(lpath, 0, True)
    follower = _replica_log(fpath, 0, False)
    LeaderEpochCache(lpath).assign(0, 0)
    lstate = ProducerStateTable(lpath)
    pid = 4242
    for k in range(3):
        lstate.append(leader, [b"%d-%d" % (k, i) for i in range(4)], producer_id=pid, epoch=0, base_sequence=4 * k)
    victim = reaper.start(_follow_until_killed, fpath, lpath, 3)
    victim.join(20)
    assert victim.exitcode == -signal.SIGKILL
    assert follower.end_offset == 12                  # the dead claim's offsets count in the end

    pr = PartitionReplica(1, "t", 0, fpath, {}, lambda *a, **k: None)   # the restarted process
    try:
        pr.update(0, 0, 1, lpath, False)
        wait_until(lambda: pr.step() == 0 and pr.ready and pr.reader.position == 12, 10, "the follower to catch up")
        assert records_of(fpath) == records_of(lpath)
        assert pr.pstate.lookup(pid) == lstate.lookup(pid) == (0, 8, 11, 8)
        # Elected leader (the old one died), it takes the producer's next batch.
        leader.set_append_state(2)
        follower.set_replication(True, 1, 1, 0b10, follower.end_offset)
        pr.update(1, 1, 1, None, False)
        assert pr.pstate.append(follower, [b"next"], producer_id=pid, epoch=0, base_sequence=12)[0] == 12
    finally:
        pr.close()
        lstate.close()
        leader.close()
        follower.close()
