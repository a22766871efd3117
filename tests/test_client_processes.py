"""Producer and consumer processes over one root.

* 3 producer and 3 consumer processes (fixed assignment, committing after
  processing) over a 6-partition topic, 300,000 keyed records: every record
  consumed exactly once, per-key order kept; a consumer SIGKILLed mid-run and
  restarted resumes from its committed offset (nothing lost, duplicates only
  from the uncommitted span).
* The coordinator SIGKILLed during production and consumption: the data path
  goes on without it; a new coordinator takes over (on the next client call,
  or a standby at once); topics and committed offsets are intact and a
  committed offset never goes backwards.

Every test uses its own root and kills every process it started.
"""
from __future__ import annotations

import os
import signal
import struct
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import pytest
from kafka.partitioner.default import murmur2

from shmq import Admin, Consumer, NotCoordinator, Producer, TopicPartition
from shmq.coordinator import CoordinatorClient, coordinator_alive
from shmq.root import Root

REC = struct.Struct("<IIQ")                     # producer id, key index, per-key sequence
ROW = np.dtype([("partition", "<i4"), ("offset", "<i8"), ("pid", "<u4"), ("kidx", "<u4"), ("seq", "<u8")])
KEYS_PER_PRODUCER = 8
CONFIG = {"segment_bytes": 1 << 20, "segment_count": 8}


def key_of(pid: int, kidx: int) -> bytes:
    return b"p%d-k%d" % (pid, kidx)


def kafka_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


def wait_for(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


# ------------------------------------------------------------------ workers
def keyed_producer(root: str, topic: str, pid: int, first_seq: int, per_key: int, batch: bool) -> None:
    """Send per_key records for each of this producer's keys, key-interleaved:
    record i carries key i % K and that key's sequence first_seq + i // K."""
    with Producer(root) as p:
        keys = [key_of(pid, k) for k in range(KEYS_PER_PRODUCER)]
        if batch:
            for s0 in range(first_seq, first_seq + per_key, 125):
                vals, ks = [], []
                for s in range(s0, min(s0 + 125, first_seq + per_key)):
                    for k in range(KEYS_PER_PRODUCER):
                        vals.append(REC.pack(pid, k, s))
                        ks.append(keys[k])
                p.send_batch(topic, vals, keys=ks)
        else:
            send, pack = p.send, REC.pack
            for s in range(first_seq, first_seq + per_key):
                for k in range(KEYS_PER_PRODUCER):
                    send(topic, pack(pid, k, s), key=keys[k])


def checking_consumer(root: str, topic: str, group: str, parts: List[int], targets: List[int], out_path: str,
                      commits_path: str, commit_every: int, progress: Any, throttle_s: float) -> None:
    """Consume ``parts`` until each position reaches its target; 'process'
    each batch by appending it to out_path, then commit synchronously every
    commit_every records and note the committed offsets in commits_path."""
    c = Consumer(group_id=group, root=root, auto_offset_reset="earliest", enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in parts]
    c.assign(tps)
    start = {tp.partition: c.position(tp) for tp in tps}
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    cfd = os.open(commits_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.write(cfd, b"start %r\n" % sorted(start.items()))
    done = 0
    since = 0
    goal = dict(zip(parts, targets))
    unpack = REC.unpack
    while any(c.position(tp) < goal[tp.partition] for tp in tps):
        msgs = c.consume(500, timeout=1.0)
        if not msgs:
            continue
        rows = np.array([(m.partition, m.offset) + unpack(m.value) for m in msgs], dtype=ROW)
        os.write(fd, rows.tobytes())
        done += len(msgs)
        since += len(msgs)
        progress.value = done
        if throttle_s:
            time.sleep(throttle_s)
        if since >= commit_every:
            offs = c.commit(asynchronous=False)
            os.write(cfd, b"commit %d %r\n" % (done, sorted((tp.partition, o) for tp, o in offs.items())))
            since = 0
    extra = c.consume(100, timeout=0.2)               # nothing beyond the targets
    offs = c.commit(asynchronous=False)
    os.write(cfd, b"commit %d %r\n" % (done, sorted((tp.partition, o) for tp, o in offs.items())))
    os.write(cfd, b"end extra=%d\n" % len(extra))
    c.close()


def read_rows(path: str) -> np.ndarray:
    with open(path, "rb") as f:
        data = f.read()
    data = data[:len(data) - len(data) % ROW.itemsize]   # a SIGKILL may cut the last write
    return np.frombuffer(data, dtype=ROW)


def read_commits(path: str) -> Tuple[Dict[int, int], List[Tuple[int, Dict[int, int]]], Optional[int]]:
    """(start positions, [(records processed, committed offsets)], extra or None)."""
    start: Dict[int, int] = {}
    commits: List[Tuple[int, Dict[int, int]]] = []
    extra = None
    with open(path) as f:
        for line in f:
            if line.startswith("start "):
                start = dict(eval(line[6:]))
            elif line.startswith("commit "):
                n, rest = line[7:].split(" ", 1)
                commits.append((int(n), dict(eval(rest))))
            elif line.startswith("end extra="):
                extra = int(line.split("=")[1])
    return start, commits, extra


def check_per_key_runs(rows: np.ndarray) -> None:
    """Within one consumer run, every key's sequences go up by exactly one."""
    for (pid, kidx) in set(zip(rows["pid"].tolist(), rows["kidx"].tolist())):
        seqs = rows["seq"][(rows["pid"] == pid) & (rows["kidx"] == kidx)]
        assert np.all(np.diff(seqs.astype(np.int64)) == 1), f"key p{pid}-k{kidx} out of order"


# -------------------------------------------------------- exactly once + kill
@pytest.mark.timeout(150)
def test_three_producers_three_consumers_exactly_once_and_a_killed_consumer_resumes(root: Root, reaper,
                                                                                   tmp_path) -> None:
    """Phase 1: 240,000 keyed records, every one consumed exactly once, keys in
    order. Phase 2: 60,000 more; consumer 2 is SIGKILLed mid-run and restarted:
    it resumes at its committed offsets, nothing is lost and the only
    duplicates are records it processed after its last commit."""
    import multiprocessing as mp
    topic, group, P = "orders", "checkers", 6
    admin = Admin(root)
    admin.create_topic(topic, P, CONFIG)
    parts_of = {c: [2 * c, 2 * c + 1] for c in range(3)}
    key_part = {(p, k): kafka_partition(key_of(p, k), P) for p in range(3) for k in range(KEYS_PER_PRODUCER)}
    assert set(key_part.values()) == set(range(P)), "the key space should cover every partition"

    def per_partition(per_key: int) -> List[int]:
        counts = [0] * P
        for part in key_part.values():
            counts[part] += per_key
        return counts

    ctx = mp.get_context("fork")
    t_start = time.monotonic()
    # ---- phase 1: 3 x 80,000 records
    per_key1 = 80_000 // KEYS_PER_PRODUCER
    targets1 = per_partition(per_key1)
    progress = [ctx.Value("q", 0) for _ in range(3)]
    cons = [reaper.start(checking_consumer, root.path, topic, group, parts_of[c],
                         [targets1[p] for p in parts_of[c]], str(tmp_path / f"c{c}-run1.bin"),
                         str(tmp_path / f"c{c}-run1.commits"), 5000, progress[c], 0.0) for c in range(3)]
    prods = [reaper.start(keyed_producer, root.path, topic, p, 0, per_key1, p == 2) for p in range(3)]
    for pr in prods + cons:
        pr.join(timeout=90)
        assert pr.exitcode == 0, f"{pr.name} exit {pr.exitcode}"
    t_phase1 = time.monotonic() - t_start
    ends = [d.end_offset for d in admin.describe_topic(topic).partitions]
    assert ends == targets1
    for c in range(3):
        rows = read_rows(str(tmp_path / f"c{c}-run1.bin"))
        start, commits, extra = read_commits(str(tmp_path / f"c{c}-run1.commits"))
        assert start == {p: 0 for p in parts_of[c]} and extra == 0
        for p in parts_of[c]:
            offs = rows["offset"][rows["partition"] == p]
            assert offs.tolist() == list(range(targets1[p])), f"partition {p}: not exactly once in order"
        assert len(rows) == sum(targets1[p] for p in parts_of[c])
        check_per_key_runs(rows)
        for (pid, kidx), part in key_part.items():
            if part in parts_of[c]:
                seqs = rows["seq"][(rows["pid"] == pid) & (rows["kidx"] == kidx)]
                assert seqs.tolist() == list(range(per_key1))
        assert commits[-1][1] == {p: targets1[p] for p in parts_of[c]}

    # ---- phase 2: 3 x 20,000 more; consumer 2 is killed mid-run and restarted
    per_key2 = 20_000 // KEYS_PER_PRODUCER
    targets2 = [a + b for a, b in zip(targets1, per_partition(per_key2))]
    victim = 2
    progress = [ctx.Value("q", 0) for _ in range(3)]

    def start_consumer(c: int, run: str, throttle: float):  # type: ignore[no-untyped-def]
        return reaper.start(checking_consumer, root.path, topic, group, parts_of[c],
                            [targets2[p] for p in parts_of[c]], str(tmp_path / f"c{c}-{run}.bin"),
                            str(tmp_path / f"c{c}-{run}.commits"), 1000, progress[c], throttle)

    cons = [start_consumer(c, "run2", 0.005 if c == victim else 0.0) for c in range(3)]
    prods = [reaper.start(keyed_producer, root.path, topic, p, per_key1, per_key2, p == 0) for p in range(3)]
    victim_total = sum(targets2[p] - targets1[p] for p in parts_of[victim])
    wait_for(lambda: progress[victim].value >= victim_total // 3, 60, "the victim to get going")
    os.kill(cons[victim].pid, signal.SIGKILL)
    cons[victim].join(timeout=10)
    assert cons[victim].exitcode == -signal.SIGKILL
    for pr in prods:
        pr.join(timeout=60)
        assert pr.exitcode == 0
    restarted = start_consumer(victim, "run3", 0.0)
    for pr in [cons[c] for c in range(3) if c != victim] + [restarted]:
        pr.join(timeout=60)
        assert pr.exitcode == 0, f"{pr.name} exit {pr.exitcode}"
    assert [d.end_offset for d in admin.describe_topic(topic).partitions] == targets2

    for c in range(3):
        if c == victim:
            continue
        rows = read_rows(str(tmp_path / f"c{c}-run2.bin"))
        start, _commits, extra = read_commits(str(tmp_path / f"c{c}-run2.commits"))
        assert start == {p: targets1[p] for p in parts_of[c]} and extra == 0     # resumed where committed
        for p in parts_of[c]:
            assert rows["offset"][rows["partition"] == p].tolist() == list(range(targets1[p], targets2[p]))
        check_per_key_runs(rows)

    killed = read_rows(str(tmp_path / f"c{victim}-run2.bin"))
    _, kcommits, kextra = read_commits(str(tmp_path / f"c{victim}-run2.commits"))
    again = read_rows(str(tmp_path / f"c{victim}-run3.bin"))
    rstart, _rcommits, rextra = read_commits(str(tmp_path / f"c{victim}-run3.commits"))
    assert kextra is None and rextra == 0
    assert 0 < len(killed) < victim_total, "the victim was not killed mid-run"
    check_per_key_runs(killed)
    check_per_key_runs(again)
    last_done, last_commit = kcommits[-1] if kcommits else (0, {p: targets1[p] for p in parts_of[victim]})
    after_commit = len(killed) - last_done
    dups = 0
    for p in parts_of[victim]:
        k = killed["offset"][killed["partition"] == p]
        a = again["offset"][again["partition"] == p]
        assert k.tolist() == list(range(targets1[p], targets1[p] + len(k)))
        # The restart begins at the committed offset: no lower than the last
        # commit we saw returning, no higher than what had been processed.
        assert last_commit[p] <= rstart[p] <= targets1[p] + len(k)
        assert a.tolist() == list(range(rstart[p], targets2[p])), f"partition {p}: records lost"
        dups += len(np.intersect1d(k, a))
    assert dups <= after_commit, f"{dups} duplicates but only {after_commit} records after the last commit"
    admin.close()
    print(f"\nphase 1 (240k records, 3+3 processes): {t_phase1:.1f}s; whole test "
          f"{time.monotonic() - t_start:.1f}s; victim: {len(killed)} processed, {after_commit} uncommitted, "
          f"{dups} redelivered")


# ---------------------------------------------------------- coordinator kill
def steady_producer(root: str, topic: str, pid: int, parts: int, stop: Any, sent: Any) -> None:
    """Send (pid, partition, seq) round-robin over the partitions, ~20k/s, until stop."""
    with Producer(root) as p:
        seq = [0] * parts
        n = 0
        while not stop.is_set():
            for _ in range(100):
                part = n % parts
                p.send(topic, REC.pack(pid, part, seq[part]), partition=part)
                seq[part] += 1
                n += 1
            sent.value = n
            time.sleep(0.005)
        sent.value = n


def committing_consumer(root: str, topic: str, group: str, parts: List[int], targets: Any, ready: Any,
                        out_path: str, got: Any, sync_every: int) -> None:
    """Consume and commit after every batch (asynchronous: a store into the
    shared table, no RPC); synchronously every sync_every batches (0: never
    until the end). Runs until the parent publishes the targets and they
    are reached."""
    c = Consumer(group_id=group, root=root, auto_offset_reset="earliest", enable_auto_commit=False)
    tps = [TopicPartition(topic, p) for p in parts]
    c.assign(tps)
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    n = batches = 0
    while not (ready.is_set() and all(c.position(tp) >= targets[tp.partition] for tp in tps)):
        msgs = c.consume(500, timeout=0.05)
        if not msgs:
            continue
        rows = np.array([(m.partition, m.offset) + REC.unpack(m.value) for m in msgs], dtype=ROW)
        os.write(fd, rows.tobytes())
        n += len(msgs)
        got.value = n
        batches += 1
        commit_retrying(c, asynchronous=not (sync_every and batches % sync_every == 0))
    commit_retrying(c, asynchronous=False)
    c.close()


def commit_retrying(c: Consumer, asynchronous: bool) -> None:
    """commit(); a synchronous commit that meets the takeover may raise the
    retriable NotCoordinator: retry it, as a Kafka application would."""
    deadline = time.monotonic() + 30
    while True:
        try:
            c.commit(asynchronous=asynchronous)
            return
        except NotCoordinator:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def explain_gap(root: Root, topic: str, p: int, rows: np.ndarray, pid: int) -> str:
    """Diagnosis for a failed check: where the consumer's sequence breaks and
    what a fresh read of the partition from its start holds there."""
    seqs = rows["seq"][rows["pid"] == pid].astype(np.int64)
    bad = int(np.flatnonzero(np.diff(seqs) != 1)[0]) if len(seqs) > 1 and np.any(np.diff(seqs) != 1) else -1
    where = (f"seq {seqs[bad]} at offset {rows['offset'][rows['pid'] == pid][bad]} is followed by seq "
             f"{seqs[bad + 1]} at offset {rows['offset'][rows['pid'] == pid][bad + 1]}") if bad >= 0 else "no break"
    with Consumer(root=root.path, auto_offset_reset="earliest") as c:
        c.assign([TopicPartition(topic, p)])
        again = []
        while True:
            got = c.consume(10_000, timeout=0.2)
            if not got:
                break
            again.extend((m.offset,) + REC.unpack(m.value) for m in got)
    mine = [(o, sq) for o, q, _part, sq in again if q == pid]
    fresh = [sq for _o, sq in mine]
    ok = fresh == list(range(len(fresh)))
    return (f"{where}; a fresh read from offset {again[0][0] if again else None} finds {len(again)} records, "
            f"producer {pid}'s sequences {'complete' if ok else 'broken too'} ({len(fresh)})")


def run_coordinator_kill(root: Root, reaper, tmp_path, kill_and_replace) -> None:  # type: ignore[no-untyped-def]
    import multiprocessing as mp
    ctx = mp.get_context("fork")
    topic, group, P = "flow", "flowers", 4
    admin = Admin(root, timeout=20)
    # Small segments (the producers roll over to new slots while no coordinator
    # runs), and a ring of 8 MiB per partition: room for ~100,000 records, so a
    # consumer held up for a few seconds by a commit during the takeover
    # is not overtaken by retention (overflow="overwrite").
    admin.create_topic(topic, P, {"segment_bytes": 128 << 10, "segment_count": 64})
    admin.create_topic("idle", 2, {"segment_bytes": 64 << 10, "max_message_bytes": 999})
    before = {t: admin.describe_topic(t) for t in admin.list_topics()}
    with Consumer(group_id="static", root=root.path, enable_auto_commit=False) as c:
        c.assign([TopicPartition("idle", 1)])
        c.commit(offsets={TopicPartition("idle", 1): 0}, asynchronous=False)
    with CoordinatorClient(root) as cc:
        cc.commit_offsets("rpc-group", {("idle", 0): 0, ("flow", 3): (5, "meta")})

    stop, ready = ctx.Event(), ctx.Event()
    targets = ctx.Array("q", P)
    sent = [ctx.Value("q", 0) for _ in range(2)]
    got = [ctx.Value("q", 0) for _ in range(2)]
    sync_every = kill_and_replace.sync_every
    prods = [reaper.start(steady_producer, root.path, topic, i, P, stop, sent[i]) for i in range(2)]
    cons = [reaper.start(committing_consumer, root.path, topic, group, [2 * i, 2 * i + 1], targets, ready,
                         str(tmp_path / f"flow{i}.bin"), got[i], sync_every) for i in range(2)]

    # Sample the committed offsets all along: through the shared table (what
    # a Consumer's committed() reads) and through the coordinator's RPC.
    samples: Dict[str, List[Dict[int, int]]] = {"table": [], "rpc": []}
    sampling = threading.Event()
    sampling.set()

    def sampler() -> None:
        view = Consumer(group_id=group, root=root.path, enable_auto_commit=False)
        tps = [TopicPartition(topic, p) for p in range(P)]
        rpc = CoordinatorClient(root, autostart=False, connect_timeout=0.2, timeout=5)
        while sampling.is_set():
            samples["table"].append({tp.partition: view.committed(tp) or 0 for tp in tps})
            try:
                r = rpc.fetch_offsets(group, [(topic, p) for p in range(P)])
                samples["rpc"].append({p: max(r[(topic, p)], 0) for p in range(P)})
            except NotCoordinator:
                time.sleep(0.01)
            time.sleep(0.005)
        rpc.close()
        view.close()

    th = threading.Thread(target=sampler, daemon=True)
    th.start()
    try:
        wait_for(lambda: all(g.value > 2000 for g in got), 60, "consumers to make progress")
        old = root.coordinator_pid()
        assert old is not None
        new = kill_and_replace(root, admin, sent, got, old)
        assert new != old and root.coordinator_pid() == new
        mark = [g.value for g in got]
        try:
            wait_for(lambda: all(g.value > m + 2000 for g, m in zip(got, mark)), 60, "progress after takeover")
        except AssertionError as e:
            raise AssertionError(f"{e}: sent {[x.value for x in sent]}, consumed {[x.value for x in got]} "
                                 f"(at takeover {mark}); coordinator {root.coordinator_pid()}") from None
    finally:
        stop.set()
        for pr in prods:
            pr.join(timeout=30)
    assert all(pr.exitcode == 0 for pr in prods)
    for p, d in enumerate(admin.describe_topic(topic).partitions):
        targets[p] = d.end_offset
    ready.set()
    for pr in cons:
        pr.join(timeout=60)
        assert pr.exitcode == 0, f"{pr.name} exit {pr.exitcode}"
    sampling.clear()
    th.join(timeout=10)

    # Every record consumed exactly once, in order per producer and partition.
    ends = list(targets[:])
    gaps = {}
    for i in range(2):
        rows = read_rows(str(tmp_path / f"flow{i}.bin"))
        for p in (2 * i, 2 * i + 1):
            r = rows[rows["partition"] == p]
            for pid in range(2):
                n = sent[pid].value
                expect = n // P + (1 if p < n % P else 0)
                seqs = r["seq"][r["pid"] == pid]
                if seqs.tolist() != list(range(expect)):
                    raise AssertionError(f"flow-{p}: producer {pid}'s records lost or repeated: consumed "
                                         f"{len(seqs)} of {expect}; " + explain_gap(root, topic, p, r, pid))
            offs = r["offset"]
            assert np.all(np.diff(offs) > 0) and (len(offs) == 0 or offs[-1] < ends[p])
            if len(offs) != ends[p]:     # offsets padded over (claims taken as dead): note them
                gaps[p] = ends[p] - len(offs)
    print(f"\nrecords {sum(s.value for s in sent)}, end offsets {ends}, padded offsets {gaps}")
    assert not gaps, f"offsets without records (padded claims) in {gaps}: did a live producer's claim get unblocked?"
    # Topics and committed offsets intact; the final commits are durable.
    after = {t: admin.describe_topic(t) for t in admin.list_topics()}
    assert after.keys() == before.keys() == {"flow", "idle"}
    for t in after:
        assert after[t].topic_id == before[t].topic_id and after[t].config == before[t].config
        assert after[t].partition_count == before[t].partition_count
    with CoordinatorClient(root) as cc:
        assert cc.fetch_offsets(group) == {(topic, p): ends[p] for p in range(P)}
        assert cc.fetch_offsets("static") == {("idle", 1): 0}
        assert cc.fetch_offsets_with_metadata("rpc-group") == {("idle", 0): (0, ""), ("flow", 3): (5, "meta")}
    # A committed offset never went backwards, in either view.
    for view, seq in samples.items():
        assert len(seq) > 10, f"too few {view} samples"
        for p in range(P):
            col = [s[p] for s in seq]
            assert col == sorted(col), f"{view} committed offset of {topic}-{p} went backwards"
    assert len(samples["rpc"]) > 10
    admin.close()


@pytest.mark.timeout(120)
def test_sigkilled_coordinator_data_path_goes_on_and_next_call_starts_a_new_one(root: Root, reaper,
                                                                               tmp_path) -> None:
    def kill_and_replace(root: Root, admin: Admin, sent, got, old: int) -> int:  # type: ignore[no-untyped-def]
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: not coordinator_alive(root), 5, "the coordinator's lock to be released")
        # No coordinator: producers and consumers (async commits) keep going.
        s0, g0 = [s.value for s in sent], [g.value for g in got]
        # (8000 records per producer over 4 partitions of 128 KiB segments: the
        # producers roll over to new ring slots with no housekeeper running.)
        # A client that keeps missing the coordinator starts a new one after a
        # while (on a loaded host that can come before 8000 records): what
        # counts is the progress made while none ran, at least 2000 each.
        def progress(n: int) -> bool:
            return all(s.value > x + n for s, x in zip(sent, s0)) and all(g.value > x + n for g, x in zip(got, g0))
        wait_for(lambda: progress(8000) or coordinator_alive(root), 30, "progress without a coordinator")
        made = [s.value - x for s, x in zip(sent, s0)] + [g.value - x for g, x in zip(got, g0)]
        assert progress(8000) or min(made) > 2000, f"records sent and read while no coordinator ran: {made}"
        # The next client call starts a new one, which recovers everything.
        assert admin.list_topics() == ["flow", "idle"]
        wait_for(lambda: root.coordinator_pid() not in (None, old), 10, "the new coordinator's pid file")
        return root.coordinator_pid()

    kill_and_replace.sync_every = 0  # type: ignore[attr-defined]
    run_coordinator_kill(root, reaper, tmp_path, kill_and_replace)


@pytest.mark.timeout(120)
def test_sigkilled_coordinator_is_replaced_by_a_standby(root: Root, reaper, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with CoordinatorClient(root) as cc:           # the embedded coordinator is the active one
        cc.connect()
    active = root.coordinator_pid()
    assert active is not None
    log = open(os.path.join(root.path, "standby.log"), "wb")
    standby = subprocess.Popen([sys.executable, "-m", "shmq.coordinator", "--root", root.path, "--standby"],
                               stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    reaper.track(standby.pid)
    time.sleep(1.0)                                # let it come up and block on the lock
    assert standby.poll() is None and root.coordinator_pid() == active

    def kill_and_replace(root: Root, admin: Admin, sent, got, old: int) -> int:  # type: ignore[no-untyped-def]
        assert old != standby.pid and standby.poll() is None
        os.kill(old, signal.SIGKILL)
        wait_for(lambda: root.coordinator_pid() == standby.pid, 10, "the standby to take over")
        assert admin.list_topics() == ["flow", "idle"]
        return standby.pid

    kill_and_replace.sync_every = 5  # type: ignore[attr-defined]
    try:
        run_coordinator_kill(root, reaper, tmp_path, kill_and_replace)
    finally:
        if standby.poll() is None:
            standby.kill()
        standby.wait(timeout=10)
