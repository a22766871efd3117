"""Transactions end to end: the transactional producer, the transaction
coordinator (a real coordinator process), read_committed and
read_uncommitted consumers, zombie fencing, a SIGKILLed producer's open
transaction aborted by transaction_timeout_ms, and a coordinator SIGKILLed
between the commit decision and the markers."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, List, Tuple

import pytest

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.coordinator.transactions import CRASH_ENV
from shmq.errors import IllegalState, ProducerFenced
from shmq.root import Root

TOPICS = ["tx-a", "tx-b", "tx-c"]
PARTS = 4


def make_topics(root: Root, topics: List[str] = TOPICS, partitions: int = PARTS) -> None:
    with Admin(root.path) as admin:
        for t in topics:
            admin.create_topic(t, partitions, config={"segment_bytes": 1 << 20, "segment_count": 4})


def all_tps(topics: List[str] = TOPICS, partitions: int = PARTS) -> List[TopicPartition]:
    return [TopicPartition(t, p) for t in topics for p in range(partitions)]


def drain(root: Root, isolation: str, want: int, timeout: float = 10.0,
          tps: List[TopicPartition] = None) -> List[Tuple[str, int, int, bytes]]:  # type: ignore[assignment]
    """Every record a fresh consumer of ``isolation`` reads from the start, until
    ``want`` records or ``timeout``; then a short extra wait for any surplus."""
    c = Consumer(root=root.path, isolation_level=isolation, auto_offset_reset="earliest")
    c.assign(tps or all_tps())
    out: List[Tuple[str, int, int, bytes]] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < want and time.monotonic() < deadline:
            out.extend((m.topic, m.partition, m.offset, m.value) for m in c.consume(500, timeout=0.05))
        end = time.monotonic() + 0.3
        while time.monotonic() < end:
            out.extend((m.topic, m.partition, m.offset, m.value) for m in c.consume(500, timeout=0.05))
    finally:
        c.close()
    return out


def by_partition(recs: List[Tuple[str, int, int, bytes]]) -> Dict[Tuple[str, int], List[bytes]]:
    out: Dict[Tuple[str, int], List[bytes]] = {}
    for t, p, off, v in sorted(recs, key=lambda r: (r[0], r[1], r[2])):
        out.setdefault((t, p), []).append(v)
    return out


def send_txn(prod: Producer, tag: str, n: int) -> None:
    for i in range(n):
        tp = all_tps()[i % len(all_tps())]
        prod.send(tp.topic, f"{tag}-{i}".encode(), partition=tp.partition)


def test_commit_and_abort_across_topics_and_partitions(root: Root) -> None:
    make_topics(root)
    plain = Producer(root.path)
    prod = Producer(root.path, transactional_id="tx-commit-abort")
    prod.init_transactions()
    with pytest.raises(IllegalState):
        prod.send("tx-a", b"outside")                    # no transaction open
    expected: Dict[Tuple[str, int], List[bytes]] = {}
    everything: Dict[Tuple[str, int], List[bytes]] = {}
    for tag, commit in (("A", True), ("B", False), ("C", True)):
        prod.begin_transaction()
        for i in range(120):
            tp = all_tps()[i % 12]
            v = f"{tag}-{i}".encode()
            prod.send(tp.topic, v, partition=tp.partition)
            everything.setdefault(tp, []).append(v)
            if commit:
                expected.setdefault(tp, []).append(v)
            if i % 10 == 0:                              # non-transactional records in between
                pv = f"P{tag}-{i}".encode()
                plain.send(tp.topic, pv, partition=tp.partition)
                expected.setdefault(tp, []).append(pv)
                everything.setdefault(tp, []).append(pv)
        prod.send_batch("tx-b", [f"{tag}-batch-{k}".encode() for k in range(5)], partition=1)
        everything.setdefault(TopicPartition("tx-b", 1), []).extend(f"{tag}-batch-{k}".encode() for k in range(5))
        if commit:
            expected.setdefault(TopicPartition("tx-b", 1), []).extend(
                f"{tag}-batch-{k}".encode() for k in range(5))
            prod.commit_transaction()
        else:
            prod.abort_transaction()
    want = sum(map(len, expected.values()))
    committed = drain(root, "read_committed", want)
    assert by_partition(committed) == {(t.topic, t.partition): v for t, v in expected.items()}
    uncommitted = drain(root, "read_uncommitted", sum(map(len, everything.values())))
    assert by_partition(uncommitted) == {(t.topic, t.partition): v for t, v in everything.items()}
    # Markers took offsets (one per partition and transaction) but were never returned.
    c = Consumer(root=root.path, isolation_level="read_committed")
    lo, hi = c.get_watermark_offsets(TopicPartition("tx-a", 0))
    assert hi == lo + len(everything[TopicPartition("tx-a", 0)]) + 3
    c.close()
    prod.close()
    plain.close()


def _open_txn_then_die(root_path: str, ready: "os.PathLike[str]") -> None:
    p = Producer(root_path, transactional_id="tx-dies", transaction_timeout_ms=4000)
    p.init_transactions()
    p.begin_transaction()
    for i in range(20):
        p.send("tx-a", f"open-{i}".encode(), partition=0)
    with open(ready, "w") as f:
        f.write("x")
    time.sleep(60)


def test_sigkilled_producer_transaction_blocks_read_committed_until_timeout(root: Root, reaper, tmp_path) -> None:
    make_topics(root, ["tx-a"], 1)
    plain = Producer(root.path)
    plain.send("tx-a", b"before", partition=0)
    ready = tmp_path / "ready"
    proc = reaper.start(_open_txn_then_die, root.path, ready)
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert time.monotonic() < deadline, "the transactional producer did not start"
        time.sleep(0.01)
    out = subprocess.run([sys.executable, "-m", "shmq", "--root", root.path, "status"], capture_output=True,
                         text=True, timeout=60).stdout
    assert "Open transactions:" in out and "tx-dies: producer" in out and "Ongoing" in out
    assert "partitions tx-a-0" in out and "timeout 4.0 s" in out
    os.kill(proc.pid, signal.SIGKILL)
    killed = time.monotonic()
    plain.send("tx-a", b"after", partition=0)           # above the open transaction's first offset
    tp = TopicPartition("tx-a", 0)
    c = Consumer(root=root.path, isolation_level="read_committed", auto_offset_reset="earliest")
    c.assign([tp])
    got = [m.value for m in c.consume(100, timeout=0.3)]
    assert got == [b"before"]                           # stops at the LSO
    assert c.get_watermark_offsets(tp)[1] == 1
    assert c.lag(tp) == 0
    u = Consumer(root=root.path, auto_offset_reset="earliest")
    u.assign([tp])
    assert len(u.consume(100, timeout=0.5)) == 22       # read_uncommitted sees the open transaction
    while b"after" not in got:
        assert time.monotonic() - killed < 15, "the open transaction was not aborted by its timeout"
        got.extend(m.value for m in c.consume(100, timeout=0.2))
    assert got == [b"before", b"after"]                 # the aborted records never appear
    c.close()
    u.close()
    plain.close()


def test_zombie_is_fenced_and_its_records_never_visible(root: Root) -> None:
    make_topics(root, ["tx-a", "tx-b"], 2)
    old = Producer(root.path, transactional_id="tx-zombie")
    old.init_transactions()
    old.begin_transaction()
    old.send("tx-a", b"zombie-1", partition=0)
    old.send("tx-b", b"zombie-2", partition=1)
    new = Producer(root.path, transactional_id="tx-zombie")
    new.init_transactions()                              # aborts and fences the old instance
    with pytest.raises(ProducerFenced):
        old.send("tx-a", b"zombie-3", partition=0)       # an append to a partition it had added
    with pytest.raises(ProducerFenced):
        old.commit_transaction()
    new.begin_transaction()
    new.send("tx-a", b"fresh", partition=0)
    new.commit_transaction()
    recs = drain(root, "read_committed", 1, tps=all_tps(["tx-a", "tx-b"], 2))
    assert [r[3] for r in recs] == [b"fresh"]
    raw = drain(root, "read_uncommitted", 3, tps=all_tps(["tx-a", "tx-b"], 2))
    assert sorted(r[3] for r in raw) == [b"fresh", b"zombie-1", b"zombie-2"]
    old.close()
    new.close()


def test_coordinator_killed_between_decision_and_markers(root: Root, reaper) -> None:
    env = dict(os.environ, **{CRASH_ENV: "tx-crash"})
    coord = subprocess.Popen([sys.executable, "-m", "shmq.coordinator", "--root", root.path], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaper.track(coord.pid)
    deadline = time.monotonic() + 20
    while not os.path.exists(root.socket_path) or root.coordinator_pid() != coord.pid:
        assert time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)
    make_topics(root, ["tx-a", "tx-b"], 2)
    prod = Producer(root.path, transactional_id="tx-crash")
    prod.init_transactions()
    prod.begin_transaction()
    prod.send("tx-a", b"kept-1", partition=0)
    prod.send("tx-b", b"kept-2", partition=1)
    # The coordinator journals PrepareCommit, then dies: the client reconnects
    # to a successor (started on demand), which completes the markers first.
    prod.commit_transaction()
    assert coord.wait(timeout=10) == -signal.SIGKILL
    recs = drain(root, "read_committed", 2, tps=all_tps(["tx-a", "tx-b"], 2))
    assert sorted(r[3] for r in recs) == [b"kept-1", b"kept-2"]
    prod.begin_transaction()
    prod.send("tx-a", b"dropped", partition=0)
    prod.abort_transaction()
    prod.begin_transaction()
    prod.send("tx-a", b"kept-3", partition=0)
    prod.commit_transaction()
    recs = drain(root, "read_committed", 3, tps=all_tps(["tx-a", "tx-b"], 2))
    assert sorted(r[3] for r in recs) == [b"kept-1", b"kept-2", b"kept-3"]
    prod.close()


def test_replicated_topic_markers_replicate_and_numpy_batches(root: Root) -> None:
    import numpy as np

    from shmq.cli.dump_log import dump
    from tests.test_replication import create, replica_dirs
    with Admin(root.path) as admin:
        create(admin, "tx-r", rf=2)
        dirs = replica_dirs(root, admin, "tx-r")
    prod = Producer(root.path, transactional_id="tx-repl")
    prod.init_transactions()
    rows = np.arange(40, dtype=np.uint8).reshape(10, 4)
    for commit in (True, False, True):
        prod.begin_transaction()
        prod.send("tx-r", b"one-%d" % commit, partition=0)
        prod.send_batch("tx-r", rows, partition=0)                   # a numpy batch inside the transaction
        prod.commit_transaction() if commit else prod.abort_transaction()
    prod.close()
    tp = TopicPartition("tx-r", 0)
    recs = drain(root, "read_committed", 22, tps=[tp])
    assert [r[3] for r in recs] == ([b"one-1"] + [bytes(r) for r in rows]) * 2
    assert len(drain(root, "read_uncommitted", 33, tps=[tp])) == 33
    # Every replica holds the markers: COMMIT, ABORT, COMMIT.
    import io
    deadline = time.monotonic() + 10
    for path in dirs.values():
        while True:
            out = io.StringIO()
            dump(path, out=out, records=True)
            markers = [ln.split("endTxnMarker: ")[1].split()[0] for ln in out.getvalue().splitlines()
                       if "endTxnMarker" in ln]
            if markers == ["COMMIT", "ABORT", "COMMIT"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert markers == ["COMMIT", "ABORT", "COMMIT"], path


def test_end_txn_retries_are_idempotent_and_the_other_decision_is_refused(root: Root) -> None:
    from shmq.errors import InvalidProducerIdMapping, InvalidTxnState
    make_topics(root, ["tx-a"], 1)
    p = Producer(root.path, transactional_id="tx-idem")
    p.init_transactions()
    p.begin_transaction()
    p.send("tx-a", b"once", partition=0)
    p.commit_transaction()
    client, pid, epoch = p._cluster.client, p._producer_id, p._producer_epoch
    client.end_txn("tx-idem", pid, epoch, True)              # a resent commit: answered again, nothing written
    with pytest.raises(InvalidTxnState, match="ended with commit"):
        client.end_txn("tx-idem", pid, epoch, False)
    with pytest.raises(ProducerFenced):
        client.end_txn("tx-idem", pid, epoch - 1 if epoch else epoch + 1, True)
    with pytest.raises(InvalidProducerIdMapping):
        client.add_partitions_to_txn("tx-idem", pid + 1, epoch, [("tx-a", 0)])
    with pytest.raises(IllegalState):
        p.commit_transaction()                               # none open
    recs = drain(root, "read_committed", 1, tps=[TopicPartition("tx-a", 0)])
    assert [r[3] for r in recs] == [b"once"]
    with Consumer(root=root.path) as c:
        assert c.get_watermark_offsets(TopicPartition("tx-a", 0)) == (0, 2)   # one record, one marker
    p.close()
