"""Transactions end to end: the transactional producer, the transaction
coordinator (a real coordinator process), read_committed and
read_uncommitted consumers, zombie fencing (in one process and across two
processes), a SIGKILLed producer's open transaction aborted by
transaction_timeout_ms, a coordinator SIGKILLed between the commit (or the
abort) decision and the markers, transactional offsets committed only with
their transaction, and send_async inside a transaction."""
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


def start_crashing_coordinator(root: Root, reaper, tid: str) -> subprocess.Popen:  # type: ignore[type-arg]
    """A coordinator process that SIGKILLs itself right after it journaled an
    EndTxn decision of ``tid`` (before any marker); its successors, started
    on demand by the clients, do not."""
    env = dict(os.environ, **{CRASH_ENV: tid})
    coord = subprocess.Popen([sys.executable, "-m", "shmq.coordinator", "--root", root.path], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaper.track(coord.pid)
    deadline = time.monotonic() + 20
    while not os.path.exists(root.socket_path) or root.coordinator_pid() != coord.pid:
        assert time.monotonic() < deadline, "the coordinator did not start"
        time.sleep(0.02)
    return coord


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
    coord = start_crashing_coordinator(root, reaper, "tx-crash")
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


def _zombie(root_path: str, tmp: str, mode: str) -> None:
    """The older instance, in its own process: opens a transaction, then
    (mode "sending") sends until it is fenced by a newer process's
    init_transactions of the same transactional id, or (mode "idle") waits
    for the newer process to finish; then tries to commit. Its outcome goes
    to ``tmp/zombie.out``."""
    out: List[str] = []
    p = Producer(root_path, transactional_id="tx-zombie-proc")
    p.init_transactions()
    p.begin_transaction()
    p.send("tx-a", b"zombie-first", partition=0)
    p.send("tx-b", b"zombie-first", partition=1)
    open(os.path.join(tmp, "ready"), "w").close()
    sent = 2
    deadline = time.monotonic() + 20
    if mode == "sending":
        try:
            while time.monotonic() < deadline:             # the newer instance fences it meanwhile
                p.send("tx-a" if sent % 2 else "tx-b", b"zombie-%d" % sent, partition=sent % 2)
                sent += 1
                time.sleep(0.001)
            out.append("never fenced")
        except ProducerFenced:
            out.append("send fenced")
    else:
        while not os.path.exists(os.path.join(tmp, "newer.done")) and time.monotonic() < deadline:
            time.sleep(0.01)
    calls = [("commit", p.commit_transaction), ("abort", p.abort_transaction),
             ("send-new-partition", lambda: p.send("tx-a", b"zombie-late", partition=1))]
    for what, call in calls:
        try:
            call()
            out.append(f"{what} ok")
        except ProducerFenced:
            out.append(f"{what} fenced")
        except Exception as e:                               # reported, the test fails on it
            out.append(f"{what} {type(e).__name__}: {e}")
    with open(os.path.join(tmp, "zombie.out"), "w") as f:
        f.write(f"{sent}\n" + "\n".join(out))
    p.close()


def _newer(root_path: str, tmp: str) -> None:
    p = Producer(root_path, transactional_id="tx-zombie-proc")
    p.init_transactions()                                    # aborts and fences the older process
    p.begin_transaction()
    p.send("tx-a", b"fresh-1", partition=0)
    p.send("tx-b", b"fresh-2", partition=1)
    p.commit_transaction()
    p.close()
    open(os.path.join(tmp, "newer.done"), "w").close()


def _wait_file(path: "os.PathLike[str]", proc: "object", what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert time.monotonic() < deadline, f"{what}: timed out"
        assert proc.is_alive() or os.path.exists(path), f"{what}: the process died (exit {proc.exitcode})"  # type: ignore[attr-defined]
        time.sleep(0.01)


@pytest.mark.parametrize("mode", ["sending", "idle"])
def test_zombie_process_is_fenced_and_its_records_never_visible(root: Root, reaper, tmp_path, mode: str) -> None:
    """Two processes with the same transactional id: the older one is fenced
    by the newer one's init_transactions. Sending in a loop meanwhile, its
    next append fails with ProducerFenced; idle, its commit is refused by the
    coordinator with ProducerFenced. read_committed never returns its records."""
    make_topics(root, ["tx-a", "tx-b"], 2)
    tmp = str(tmp_path)
    old = reaper.start(_zombie, root.path, tmp, mode)
    _wait_file(tmp_path / "ready", old, "the older producer process starting its transaction")
    time.sleep(0.1)                                          # let it append some more
    new = reaper.start(_newer, root.path, tmp)
    new.join(30)
    assert new.exitcode == 0 and (tmp_path / "newer.done").exists()
    old.join(30)
    assert old.exitcode == 0
    lines = (tmp_path / "zombie.out").read_text().splitlines()
    sent = int(lines[0])
    assert lines[1:] == ["send fenced"] * (mode == "sending") + ["commit fenced", "abort fenced",
                                                                 "send-new-partition fenced"], lines
    tps = all_tps(["tx-a", "tx-b"], 2)
    recs = drain(root, "read_committed", 2, tps=tps)
    assert sorted(r[3] for r in recs) == [b"fresh-1", b"fresh-2"]
    # Every append the zombie made before it was fenced is in the log (aborted), none after.
    raw = sorted(r[3] for r in drain(root, "read_uncommitted", sent + 2, tps=tps))
    zombie = [v for v in raw if v.startswith(b"zombie")]
    assert len(zombie) == sent and b"zombie-late" not in raw and (sent > 2) == (mode == "sending")
    assert sorted(v for v in raw if not v.startswith(b"zombie")) == [b"fresh-1", b"fresh-2"]


def test_coordinator_killed_between_abort_decision_and_markers(root: Root, reaper) -> None:
    """The coordinator journals PrepareAbort and dies before any marker: the
    successor writes the ABORT markers; nothing of the transaction (records or
    offsets) is ever visible to read_committed, and what follows is."""
    from shmq.cli.dump_log import dump
    coord = start_crashing_coordinator(root, reaper, "tx-crash-abort")
    make_topics(root, ["tx-a", "tx-b"], 2)
    tps = all_tps(["tx-a", "tx-b"], 2)
    other = Producer(root.path, transactional_id="tx-crash-other")   # commits on the first coordinator
    other.init_transactions()
    other.begin_transaction()
    other.send("tx-a", b"kept-1", partition=0)
    other.commit_transaction()
    prod = Producer(root.path, transactional_id="tx-crash-abort")
    prod.init_transactions()
    prod.begin_transaction()
    prod.send("tx-a", b"dropped-1", partition=0)
    prod.send("tx-b", b"dropped-2", partition=1)
    prod.send_offsets_to_transaction({TopicPartition("tx-a", 1): 5}, "tx-crash-group")
    prod.abort_transaction()                                 # the coordinator dies after PrepareAbort
    assert coord.wait(timeout=10) == -signal.SIGKILL
    assert root.coordinator_pid() not in (None, coord.pid)   # the retried EndTxn went to a successor
    plain = Producer(root.path)
    plain.send("tx-a", b"kept-2", partition=0)               # above the aborted records: visible once the LSO moved
    plain.send("tx-b", b"kept-3", partition=1)
    recs = drain(root, "read_committed", 3, tps=tps)
    assert sorted(r[3] for r in recs) == [b"kept-1", b"kept-2", b"kept-3"]
    raw = drain(root, "read_uncommitted", 5, tps=tps)
    assert sorted(r[3] for r in raw) == [b"dropped-1", b"dropped-2", b"kept-1", b"kept-2", b"kept-3"]
    with Consumer(root=root.path, group_id="tx-crash-group") as c:
        assert c.committed(TopicPartition("tx-a", 1)) is None
    from shmq.coordinator.client import CoordinatorClient
    with CoordinatorClient(root.path) as client:
        assert not client.status().get("transactions")       # none left open
    # One ABORT marker in each partition the transaction wrote, written by the successor.
    import io
    for t, p, kind in (("tx-a", 0, ["COMMIT", "ABORT"]), ("tx-b", 1, ["ABORT"])):
        out = io.StringIO()
        dump(root.partition_dir(t, p), out=out, records=True)
        assert [ln.split("endTxnMarker: ")[1].split()[0] for ln in out.getvalue().splitlines()
                if "endTxnMarker" in ln] == kind, (t, p)
    # The producer goes on under the successor.
    prod.begin_transaction()
    prod.send("tx-b", b"kept-4", partition=1)
    prod.commit_transaction()
    recs = drain(root, "read_committed", 4, tps=tps)
    assert sorted(r[3] for r in recs) == [b"kept-1", b"kept-2", b"kept-3", b"kept-4"]
    for x in (prod, other, plain):
        x.close()


def test_transaction_offsets_are_committed_only_when_it_commits(root: Root) -> None:
    """send_offsets_to_transaction: the offsets become the group's committed
    offsets when the transaction commits, never while open or when aborted."""
    make_topics(root, ["tx-in", "tx-out"], 2)
    group = "tx-offsets-group"
    cons = Consumer("tx-in", root=root.path, group_id=group, enable_auto_commit=False, auto_offset_reset="earliest")
    deadline = time.monotonic() + 20
    while len(cons.assignment()) < 2:
        assert time.monotonic() < deadline, "the consumer was not assigned the input"
        cons.consume(1, timeout=0.05)
    tp0, tp1 = TopicPartition("tx-in", 0), TopicPartition("tx-in", 1)
    prod = Producer(root.path, transactional_id="tx-offsets")
    prod.init_transactions()

    def committed() -> Tuple[object, object]:
        return cons.committed(tp0), cons.committed(tp1)

    def txn(offsets: Dict[TopicPartition, int], commit: bool, tag: bytes) -> None:
        prod.begin_transaction()
        prod.send("tx-out", tag, partition=0)
        prod.send_offsets_to_transaction(offsets, cons.consumer_group_metadata())
        before = committed()
        (prod.commit_transaction if commit else prod.abort_transaction)()
        assert committed() != offsets or commit
        assert before == committed() or commit               # pending offsets are not the group's yet

    txn({tp0: 5, tp1: 3}, False, b"a1")
    assert committed() == (None, None)                       # aborted: not committed
    txn({tp0: 7}, True, b"c1")
    assert committed() == (7, None)                          # committed
    txn({tp0: 9, tp1: 4}, False, b"a2")
    assert committed() == (7, None)                          # aborted again: the committed ones stay
    # Offsets sent in an open transaction are not the group's until it ends.
    prod.begin_transaction()
    prod.send_offsets_to_transaction({tp0: 11, tp1: 6}, cons.consumer_group_metadata())
    assert committed() == (7, None)
    prod.commit_transaction()
    assert committed() == (11, 6)
    assert [r[3] for r in drain(root, "read_committed", 1, tps=[TopicPartition("tx-out", 0)])] == [b"c1"]
    # A fresh member of the group starts from the committed offsets.
    with Consumer(root=root.path, group_id=group) as other:
        assert other.committed(tp0) == 11 and other.committed(tp1) == 6
    cons.close()
    prod.close()


def test_send_async_inside_a_transaction(root: Root) -> None:
    """send_async in a transaction, to an unreplicated and a replicated topic:
    the futures resolve, the records are committed or aborted with the rest
    of the transaction, and outside a transaction it raises IllegalState."""
    from tests.test_replication import create
    make_topics(root, ["tx-a"], 2)
    with Admin(root.path) as admin:
        create(admin, "tx-r", rf=2)
    prod = Producer(root.path, transactional_id="tx-async")
    prod.init_transactions()
    with pytest.raises(IllegalState):
        prod.send_async("tx-a", b"outside", partition=0)
    expected: Dict[Tuple[str, int], List[bytes]] = {}
    for tag, commit in (("A", True), ("B", False), ("C", True)):
        prod.begin_transaction()
        futs = []
        for i in range(60):
            tp = [("tx-a", 0), ("tx-a", 1), ("tx-r", 0)][i % 3]
            v = f"{tag}-{i}".encode()
            futs.append((tp, prod.send_async(tp[0], v, partition=tp[1])))
            if commit:
                expected.setdefault(tp, []).append(v)
            if i == 30:
                prod.send("tx-r", f"{tag}-sync".encode(), partition=0)     # a sync send between async ones
                if commit:
                    expected.setdefault(("tx-r", 0), []).append(f"{tag}-sync".encode())
        md = futs[0][1].get(timeout=10)
        assert (md.topic, md.partition) == futs[0][0]
        (prod.commit_transaction if commit else prod.abort_transaction)()
        assert all(f.done() for _tp, f in futs)                # ended only after every record was acknowledged
        offs = [f.get().offset for tp, f in futs if tp == ("tx-a", 0)]
        assert offs == sorted(offs) and len(set(offs)) == len(offs)
    tps = [TopicPartition("tx-a", 0), TopicPartition("tx-a", 1), TopicPartition("tx-r", 0)]
    recs = drain(root, "read_committed", sum(map(len, expected.values())), tps=tps)
    assert by_partition(recs) == expected
    assert len(drain(root, "read_uncommitted", 183, tps=tps)) == 3 * 61
    prod.close()


def test_read_committed_c_poll_stops_at_the_lso_and_leaves_aborted_ranges_to_python(root: Root) -> None:
    """The C poll serves read_committed: it stops at an open transaction's
    first offset (the plain records behind it wait too), goes on once it
    commits, hands reads with an aborted range ahead to the Python filter,
    and serves again once the range is behind the position."""
    from shmq.native import fastpath
    with Admin(root.path) as admin:
        admin.create_topic("rc", 1)
    plain = Producer(root.path)
    prod = Producer(root.path, transactional_id="tx-c-poll")
    prod.init_transactions()
    c = Consumer(root=root.path, isolation_level="read_committed", auto_offset_reset="earliest")
    c.assign([TopicPartition("rc", 0)])

    def read_all(timeout: float = 0.3) -> List[bytes]:
        out: List[bytes] = []
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out.extend(m.value for m in c.consume(100, timeout=0.02))
        return out

    try:
        for i in range(10):
            plain.send("rc", f"p{i}".encode(), partition=0)
        prod.begin_transaction()
        for i in range(5):
            prod.send("rc", f"t{i}".encode(), partition=0)
        for i in range(10, 15):
            plain.send("rc", f"p{i}".encode(), partition=0)
        assert read_all() == [f"p{i}".encode() for i in range(10)]       # held at the LSO
        served = c._fast.fallbacks if c._fast is not None else None
        prod.commit_transaction()
        assert read_all() == [f"t{i}".encode() for i in range(5)] + [f"p{i}".encode() for i in range(10, 15)]
        if fastpath.enabled():
            assert c._fast.fallbacks == served, "the C poll served read_committed with no aborted range"
        prod.begin_transaction()
        for i in range(3):
            prod.send("rc", f"a{i}".encode(), partition=0)
        plain.send("rc", b"after-abort", partition=0)
        prod.abort_transaction()
        assert read_all() == [b"after-abort"]
        handed = c._fast.fallbacks if c._fast is not None else None
        for i in range(20):
            plain.send("rc", f"q{i}".encode(), partition=0)
        assert read_all() == [f"q{i}".encode() for i in range(20)]
        if fastpath.enabled():
            assert handed > served, "the aborted range went to the Python filter"
            assert c._fast.fallbacks <= handed + 2, "past the aborted range the C poll serves again"
    finally:
        c.close()
        prod.close()
        plain.close()


def test_transactional_sends_take_the_c_send_and_stay_fenced_and_in_sequence(root: Root) -> None:
    """After the first send to a partition (which adds it to the transaction),
    sends are the C send's; batches and single sends interleave in one
    sequence; a send after the commit is refused; a fenced instance's next
    send raises ProducerFenced and its records are never read committed."""
    from shmq.native import fastpath
    with Admin(root.path) as admin:
        admin.create_topic("tc", 2)
    prod = Producer(root.path, transactional_id="tx-c-send")
    prod.init_transactions()
    try:
        prod.begin_transaction()
        for i in range(50):
            prod.send("tc", f"a{i}".encode(), partition=i % 2)
        if fastpath.enabled():
            assert prod._fast.fallbacks == 2, "one Python send per partition added, the rest in C"
        prod.send_batch("tc", [b"batch-0", b"batch-1"], partition=0)
        prod.send("tc", b"after-batch", partition=0)
        prod.commit_transaction()
        with pytest.raises(IllegalState):
            prod.send("tc", b"outside", partition=0)
        prod.begin_transaction()
        prod.send("tc", b"zombie-0", partition=1)
        newer = Producer(root.path, transactional_id="tx-c-send")
        newer.init_transactions()                       # fences prod, aborts its open transaction
        with pytest.raises(ProducerFenced):
            prod.send("tc", b"zombie-1", partition=1)
        newer.begin_transaction()
        newer.send("tc", b"newer", partition=1)
        newer.commit_transaction()
        newer.close()
        got = by_partition(drain(root, "read_committed", 54, tps=[TopicPartition("tc", 0), TopicPartition("tc", 1)]))
        assert got[("tc", 0)] == [f"a{i}".encode() for i in range(0, 50, 2)] + [b"batch-0", b"batch-1",
                                                                                   b"after-batch"]
        assert got[("tc", 1)] == [f"a{i}".encode() for i in range(1, 50, 2)] + [b"newer"]
    finally:
        prod.close()


def test_a_transaction_on_added_partitions_runs_without_the_coordinator(root: Root) -> None:
    """Once a transactional id added its partitions, a transaction on them
    alone makes no coordinator call: the producer opens its rows, writes
    the COMMIT markers and closes the rows itself; an abort still goes to
    the coordinator, and `shmq status` shows the open transaction."""
    make_topics(root, ["tx-a"], 2)
    prod = Producer(root.path, transactional_id="tx-here")
    prod.init_transactions()
    prod.begin_transaction()
    for p in (0, 1):
        prod.send("tx-a", b"first-%d" % p, partition=p)            # adds both partitions (coordinator)
    prod.commit_transaction()
    calls: List[str] = []
    real = prod._cluster.client.call

    def counting(op: str, **args: object) -> object:
        calls.append(op)
        return real(op, **args)

    prod._cluster.client.call = counting                             # type: ignore[method-assign]
    try:
        prod.begin_transaction()
        before = prod._fast.fallbacks if prod._fast is not None else 0
        for i in range(50):
            prod.send("tx-a", b"here-%d" % i, partition=i % 2)
        if prod._fast is not None:
            assert prod._fast.fallbacks == before, "the C send opened the rows and sent every record"
        assert prod._txn_parts == {("tx-a", 0), ("tx-a", 1)}
        status = real("describe_transactions")                       # what `shmq status` prints
        assert [(t["transactional_id"], t["state"], t["partitions"]) for t in status] == \
            [("tx-here", "Ongoing", ["tx-a-0", "tx-a-1"])]
        assert len(drain(root, "read_committed", 2, timeout=0.5, tps=all_tps(["tx-a"], 2))) == 2   # held at the LSO
        prod.commit_transaction()
        assert calls == [], "the transaction went through the coordinator"
        prod.begin_transaction()
        prod.send("tx-a", b"aborted", partition=0)
        prod.abort_transaction()
        assert calls == ["end_txn"]
    finally:
        prod._cluster.client.call = real                             # type: ignore[method-assign]
    got = by_partition(drain(root, "read_committed", 52, tps=all_tps(["tx-a"], 2)))
    assert got[("tx-a", 0)] == [b"first-0"] + [b"here-%d" % i for i in range(0, 50, 2)]
    assert got[("tx-a", 1)] == [b"first-1"] + [b"here-%d" % i for i in range(1, 50, 2)]
    prod.close()


def _commit_and_die(root_path: str, after_markers: int) -> None:
    """Run a transaction over 3 partitions the id added before, and SIGKILL
    the process during its own commit after ``after_markers`` markers."""
    from shmq.producer import TXN_DIE_ENV
    p = Producer(root_path, transactional_id="tx-dies-committing", transaction_timeout_ms=2000)
    p.init_transactions()
    p.begin_transaction()
    for part in range(3):
        p.send("tx-c", b"registered-%d" % part, partition=part)
    p.commit_transaction()
    p.begin_transaction()
    for i in range(30):
        p.send("tx-c", b"txn-%d" % i, partition=i % 3)
    os.environ[TXN_DIE_ENV] = str(after_markers)
    p.commit_transaction()                               # dies inside
    time.sleep(60)


@pytest.mark.parametrize("after_markers", [0, 1, 3])
def test_producer_killed_inside_its_own_commit_is_ended_as_it_decided(root: Root, reaper, after_markers: int
                                                                      ) -> None:
    """A producer SIGKILLed while committing a transaction it ran itself:
    with no COMMIT marker written the coordinator aborts it after the
    timeout; with one written (or all, rows still open) it commits the rest:
    read_committed then sees every record of it in every partition or none."""
    make_topics(root, ["tx-c"], 3)
    proc = reaper.start(_commit_and_die, root.path, after_markers)
    proc.join(30)
    assert proc.exitcode == -signal.SIGKILL, "the producer did not die inside its commit"
    want_committed = 3 + (30 if after_markers > 0 else 0)
    got = drain(root, "read_committed", want_committed, timeout=20.0, tps=all_tps(["tx-c"], 3))
    values = sorted(v for *_x, v in got)
    expected = sorted([b"registered-%d" % p for p in range(3)] +
                      ([b"txn-%d" % i for i in range(30)] if after_markers > 0 else []))
    assert values == expected
    # And the partitions move on: a plain record after it is read.
    plain = Producer(root.path)
    plain.send("tx-c", b"later", partition=0)
    plain.close()
    later = drain(root, "read_committed", want_committed + 1, timeout=10.0, tps=all_tps(["tx-c"], 3))
    assert b"later" in [v for *_x, v in later]
