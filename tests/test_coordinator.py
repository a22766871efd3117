"""Coordinator: failover (automatic and standby), recovery, journal damage, peer credentials."""
from __future__ import annotations

import logging
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import List

import pytest

from shmq import errors
from shmq.coordinator import CoordinatorClient, MetadataView, coordinator_alive
from shmq.coordinator.durable import DurableStore
from shmq.coordinator.journal import Journal, write_snapshot
from shmq.coordinator.store import Store
from shmq.root import Root


def spawn(root: str, reaper, *args: str) -> subprocess.Popen:  # type: ignore[no-untyped-def]
    """A coordinator process in the foreground (as `shmq serve`), killed at teardown."""
    log = open(os.path.join(root, f"coord-{time.monotonic_ns()}.log"), "wb")
    p = subprocess.Popen([sys.executable, "-m", "shmq.coordinator", "--root", root, *args],
                         stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    log.close()
    reaper.track(p.pid)
    return p


def wait_for(cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.002)
    return time.monotonic() - t0


def active_pid(root: Root) -> int:
    pid = root.coordinator_pid()
    assert pid is not None
    return pid


def populate(c: CoordinatorClient) -> None:
    c.create_topic("a", 3, {"segment_bytes": 16384})
    c.create_topic("b.c_d-e", 1)
    c.create_topic("gone", 2)
    c.delete_topic("gone")
    c.create_partitions("a", 4)
    c.alter_config("b.c_d-e", {"max_message_bytes": 999})
    c.commit_offsets("g1", {("a", 0): 10, ("a", 3): (42, "meta")})
    c.commit_offsets("g2", [("b.c_d-e", 0, 7)])


def check_populated(c: CoordinatorClient) -> None:
    topics = c.list_topics()
    assert {"a", "b.c_d-e"} <= set(topics) and "gone" not in topics
    assert len(c.describe_topic("a")["partitions"]) == 4
    assert c.describe_topic("a")["config"]["segment_bytes"] == 16384
    assert c.describe_topic("b.c_d-e")["config"]["max_message_bytes"] == 999
    assert c.fetch_offsets("g1") == {("a", 0): 10, ("a", 3): 42}
    assert c.fetch_offsets_with_metadata("g1", [("a", 3)]) == {("a", 3): (42, "meta")}
    assert c.fetch_offsets("g2") == {("b.c_d-e", 0): 7}


# ------------------------------------------------------------------ failover
@pytest.mark.timeout(60)
def test_sigkilled_coordinator_is_replaced_on_next_call(root: Root) -> None:
    c = CoordinatorClient(root)
    populate(c)
    first = active_pid(root)
    assert c.coordinator_pid == first
    view = c.metadata()
    v1 = view.version()
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: not coordinator_alive(root), 5, "the lock to be released")
    check_populated(c)                      # reconnects transparently, starting a new one
    second = active_pid(root)
    assert second != first and c.coordinator_pid == second
    # The new coordinator republished the mapping; the old view follows it.
    assert view.version() > v1
    assert view.topic("a") is not None and view.topic("a").partitions == 4  # type: ignore[union-attr]
    assert view.topic("gone") is None
    pid, epoch = c.allocate_producer_id()
    assert epoch == 0 and c.allocate_producer_id()[0] > pid     # ids only grow
    c.close()


@pytest.mark.timeout(60)
def test_standby_takes_over_within_a_second(root: Root, reaper) -> None:  # type: ignore[no-untyped-def]
    active = spawn(root.path, reaper)
    c = CoordinatorClient(root, autostart=False)
    wait_for(lambda: root.coordinator_pid() == active.pid, 20, "the active coordinator")
    populate(c)
    standby = spawn(root.path, reaper, "--standby")
    # A second non-standby coordinator gives up at once (exit status 3).
    extra = spawn(root.path, reaper)
    assert extra.wait(timeout=20) == 3
    time.sleep(1.0)                         # the standby is up and blocked on the lock
    assert standby.poll() is None and root.coordinator_pid() == active.pid

    stop = threading.Event()
    acked: List[int] = []
    seen: List[int] = []

    def committer() -> None:
        cc = CoordinatorClient(root, autostart=False, connect_timeout=10)
        n = 100
        while not stop.is_set():
            n += 1
            try:
                stored = cc.commit_offsets("g3", {("a", 1): n}, monotonic=True)
                acked.append(n)
                seen.append(stored[("a", 1)])
            except errors.NotCoordinator:
                pass
        cc.close()

    t = threading.Thread(target=committer)
    t.start()
    wait_for(lambda: len(acked) > 20, 20, "commits")
    t0 = time.monotonic()
    active.kill()
    took = wait_for(lambda: root.coordinator_pid() == standby.pid, 5, "the standby to take over")
    assert took < 1.0 + 0.2, f"standby took {took:.3f}s"
    n_at_kill = len(acked)
    wait_for(lambda: len(acked) > n_at_kill + 20, 20, "commits to the new coordinator")
    stop.set()
    t.join(timeout=20)
    assert time.monotonic() - t0 < 20
    assert active.wait(timeout=5) == -signal.SIGKILL
    check_populated(c)
    assert c.list_topics() == ["a", "b.c_d-e"]
    assert c.coordinator_pid == standby.pid
    assert seen == sorted(seen), "a committed offset went backwards"
    assert c.fetch_offsets("g3", [("a", 1)])[("a", 1)] == acked[-1]
    c.close()


@pytest.mark.timeout(60)
def test_committed_offsets_never_go_backwards_across_restarts(root: Root) -> None:
    c = CoordinatorClient(root)
    c.create_topic("t", 2)
    last = 0
    for _round in range(3):
        for _ in range(50):
            last += 1
            c.commit_offsets("g", {("t", 0): last})
        # A stale (lower) commit with the monotonic option is ignored.
        assert c.commit_offsets("g", {("t", 0): last - 10}, monotonic=True) == {("t", 0): last}
        os.kill(active_pid(root), signal.SIGKILL)
        wait_for(lambda: not coordinator_alive(root), 5, "the lock to be released")
        assert c.fetch_offsets("g", [("t", 0), ("t", 1)]) == {("t", 0): last, ("t", 1): -1}
    # Without the option, Kafka semantics: a commit may rewind (after a seek).
    assert c.commit_offsets("g", {("t", 0): 3}) == {("t", 0): 3}
    c.close()


# ------------------------------------------------------------- journal damage
def _stop_coordinator(root: Root) -> None:
    os.kill(active_pid(root), signal.SIGKILL)
    wait_for(lambda: not coordinator_alive(root), 5, "the lock to be released")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("damage", ["torn", "corrupt", "garbage"])
def test_damaged_journal_tail_is_truncated_and_the_rest_recovered(root: Root, damage: str) -> None:
    c = CoordinatorClient(root)
    populate(c)
    size_good = os.path.getsize(root.journal_path)
    c.create_topic("last", 1)                        # this record gets damaged
    _stop_coordinator(root)
    size = os.path.getsize(root.journal_path)
    with open(root.journal_path, "r+b") as f:
        if damage == "torn":
            f.truncate(size - 5)
        elif damage == "corrupt":
            f.seek(size - 3)
            b = f.read(1)
            f.seek(size - 3)
            f.write(bytes([b[0] ^ 0xFF]))
        else:
            f.seek(0, 2)
            f.write(b"\x10\x00\x00\x00garbage-garbage-garbage")
    check_populated(c)
    if damage == "garbage":
        assert "last" in c.list_topics()
    else:
        assert "last" not in c.list_topics()
        assert os.path.getsize(root.journal_path) == size_good
    with open(root.log_path) as f:
        text = f.read()
    assert "torn or corrupt tail" in text and "truncated" in text
    # The orphaned log of the lost topic was swept; the journal goes on from there.
    if damage != "garbage":
        assert not os.path.exists(root.partition_dir("last", 0))
        c.create_topic("last", 1)
    _stop_coordinator(root)
    assert "last" in c.list_topics()
    c.close()


def test_journal_recovery_unit(tmp_path, caplog: pytest.LogCaptureFixture) -> None:  # type: ignore[no-untyped-def]
    jp, sp = str(tmp_path / "journal"), str(tmp_path / "snapshot")
    j, state, recs = Journal.recover(jp, sp)
    assert state is None and recs == []
    for i in range(5):
        j.append({"op": "x", "i": i})
    j.commit()
    j.close()
    with open(jp, "ab") as f:
        f.write(struct.pack("<II", 100, 0) + b"half")
    with caplog.at_level(logging.WARNING):
        j, state, recs = Journal.recover(jp, sp)
    assert [r["i"] for r in recs] == [0, 1, 2, 3, 4]
    assert "torn or corrupt tail" in caplog.text
    # Snapshot written but the journal not yet restarted (a crash in between):
    # records up to the snapshot's sequence are skipped, not applied twice.
    write_snapshot(sp, 3, {"upto": 3})
    j.append({"op": "x", "i": 5})
    j.commit()
    j.close()
    j, state, recs = Journal.recover(jp, sp)
    assert state == {"upto": 3} and [r["i"] for r in recs] == [3, 4, 5]
    j.compact(sp, {"upto": 6})
    j.append({"op": "x", "i": 6})
    j.commit()
    j.close()
    j, state, recs = Journal.recover(jp, sp)
    assert state == {"upto": 6} and [r["i"] for r in recs] == [6]
    j.close()
    # A corrupt snapshot is an error, never a silent empty start.
    with open(sp, "r+b") as f:
        f.seek(30)
        f.write(b"\xff")
    with pytest.raises(errors.KafkaStorageError, match="snapshot"):
        Journal.recover(jp, sp)


def test_snapshots_and_replay_rebuild_the_same_state(shm_dir: str) -> None:
    root = Root(shm_dir)
    db = DurableStore.open(root, snapshot_every=4)
    s = db.store
    db.commit([s.prepare_create_topic("t", 2, None)])
    for i in range(10):
        rec, _ = s.prepare_commit_offsets("g", [("t", i % 2, i)])
        assert rec is not None
        db.commit([rec])
    db.commit([s.prepare_allocate_producer_id("tx")])
    db.commit([s.prepare_create_partitions("t", 3)])
    assert os.path.exists(root.snapshot_path)
    live = Store(s.state()).state()
    db.close()
    again = DurableStore.open(root)
    assert again.store.state() == live
    assert again.store.fetch_offsets("g") == [("t", 0, 8, ""), ("t", 1, 9, "")]
    again.close()


# -------------------------------------------------------------- other checks
@pytest.mark.timeout(60)
def test_metadata_map_versions_and_content(root: Root) -> None:
    c = CoordinatorClient(root)
    view = c.metadata()
    v0 = view.version()
    assert v0 % 2 == 0 and view.topics() == {}
    c.create_topic("m", 2, {"overflow": "block"})
    assert view.version() > v0
    t = view.topic("m")
    assert t is not None and t.partitions == 2 and t.config["overflow"] == "block"
    assert t.paths == [root.partition_dir("m", 0), root.partition_dir("m", 1)]
    v1 = view.version()
    assert not view.refresh() and view.version() == v1     # unchanged: nothing re-read
    # Grow the payload past the first file's capacity: readers follow the move.
    for i in range(300):
        c.create_topic(f"topic-with-a-long-name-{i:04d}", 1, {"segment_bytes": 4096, "segment_count": 2})
    assert len(view.topics()) == 301
    other = MetadataView(root.metadata_map_path)
    assert other.topics().keys() == view.topics().keys()
    c.close()


@pytest.mark.timeout(60)
def test_bad_requests_do_not_hurt_the_coordinator(root: Root) -> None:
    c = CoordinatorClient(root)
    c.create_topic("t", 1)
    with pytest.raises(errors.InvalidRequest, match="unknown coordinator operation"):
        c.call("no_such_op")
    with pytest.raises(errors.InvalidRequest, match="bad arguments"):
        c.call("create_topic", nme="x")
    with pytest.raises(errors.InvalidGroupId):
        c.commit_offsets("../g", {("t", 0): 1})
    with pytest.raises(errors.UnknownTopicOrPartition, match="t-5"):
        c.commit_offsets("g", {("t", 5): 1})
    with pytest.raises(errors.InvalidRequest, match="offset"):
        c.commit_offsets("g", {("t", 0): -4})
    assert c.fetch_offsets("g") == {}
    # Raw garbage on the socket: that connection is dropped, nothing else.
    s = socket.socket(socket.AF_UNIX)
    s.connect(root.socket_path)
    s.sendall(b"\xff\xff\xff\xff" + b"x" * 64)
    s.settimeout(5)
    try:
        assert s.recv(10) == b""
    except ConnectionResetError:
        pass                                  # closed with our garbage unread: also a drop
    s.close()
    st = c.status()
    assert st["pid"] == active_pid(root) and st["topics"] == 1
    assert st["housekeeping"]["ticks"] > 0 and st["housekeeping"]["failing"] == []
    assert any(cl["pid"] == os.getpid() for cl in st["clients"])
    c.close()


def _foreign_client(sock_path: str, wfd: int) -> None:
    """Child: drop to uid 65534 and try the coordinator's socket."""
    try:
        os.setgid(65534)
        os.setuid(65534)
        s = socket.socket(socket.AF_UNIX)
        s.settimeout(5)
        s.connect(sock_path)
        body = b'{"id":1,"op":"create_topic","args":{"name":"evil"}}'
        s.sendall(struct.pack(">I", len(body)) + body)
        data = b""
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        os.write(wfd, data[4:] if data else b"EOF")
    except BaseException as e:  # report, never raise in the forked child
        os.write(wfd, f"child error: {e!r}".encode())
    finally:
        os._exit(0)


@pytest.mark.timeout(60)
def test_client_of_another_uid_is_refused(root: Root) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to run a client under another uid (os.setuid)")
    c = CoordinatorClient(root)
    c.create_topic("t", 1)
    # Open the way through the file modes so that only SO_PEERCRED stands between.
    os.chmod(root.path, 0o711)
    os.chmod(root.socket_path, 0o777)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _foreign_client(root.socket_path, w)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 4096)
        if not chunk:
            break
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    os.chmod(root.path, 0o700)
    assert b"ClusterAuthorizationFailed" in data and b"uid 65534" in data, data
    assert c.list_topics() == ["t"]
    with open(root.log_path) as f:
        assert "refused a connection" in f.read()
    c.close()


# ------------------------------------------------------- hot-path offsets table
@pytest.mark.timeout(60)
def test_offsets_table_commits_are_journaled_and_survive_takeover(root: Root) -> None:
    c = CoordinatorClient(root)
    c.create_topic("t", 2)
    c.commit_offsets("g", {("t", 1): 4})
    idx0, off0 = c.offsets_slot("g", "t", 0)
    idx1, off1 = c.offsets_slot("g", "t", 1)
    assert (off0, off1) == (-1, 4) and idx0 != idx1
    assert c.offsets_slot("g", "t", 0) == (idx0, -1)          # stable
    table = c.offsets_table()
    assert table.load(idx1) == 4                              # starts at the committed offset
    table.store(idx0, 5)                                      # hot path: no RPC
    c.sync_offsets()                                          # durable from here on
    assert c.fetch_offsets("g", [("t", 0)]) == {("t", 0): 5}
    table.store(idx0, 9)
    wait_for(lambda: c.status()["journal"]["next_seq"] > 0 and
             c.fetch_offsets("g", [("t", 0)])[("t", 0)] == 9, 5, "the poller to journal 9")
    # An RPC commit writes through to the table, so the poller never reverts it.
    c.commit_offsets("g", {("t", 1): 20})
    assert table.load(idx1) == 20
    time.sleep(0.05)
    assert c.fetch_offsets("g", [("t", 1)]) == {("t", 1): 20}
    # Stored but not yet journaled when the coordinator dies: the table is newer
    # and the next coordinator takes it, so the offset never goes backwards.
    table.store(idx0, 12)
    os.kill(active_pid(root), signal.SIGKILL)
    wait_for(lambda: not coordinator_alive(root), 5, "the lock to be released")
    assert c.fetch_offsets("g") == {("t", 0): 12, ("t", 1): 20}
    assert c.offsets_slot("g", "t", 0) == (idx0, 12)
    # Deleting the topic frees its entries; a re-created topic starts afresh.
    c.delete_topic("t")
    c.create_topic("t", 1)
    assert c.fetch_offsets("g", [("t", 0)]) == {("t", 0): -1}
    assert c.offsets_slot("g", "t", 0)[1] == -1
    with pytest.raises(errors.UnknownTopicOrPartition):
        c.offsets_slot("g", "t", 1)
    with pytest.raises(errors.InvalidGroupId):
        c.offsets_slot("a/b", "t", 0)
    c.close()


def _racing_client(path: str, i: int) -> None:
    c = CoordinatorClient(path)
    c.create_topic(f"t{i}", 1)
    c.commit_offsets("g", {(f"t{i}", 0): i + 1})
    c.close()


@pytest.mark.timeout(60)
def test_clients_racing_to_start_the_coordinator_get_exactly_one(root: Root, reaper) -> None:  # type: ignore[no-untyped-def]
    procs = [reaper.start(_racing_client, root.path, i) for i in range(4)]
    for p in procs:
        p.join(timeout=40)
        assert p.exitcode == 0
    c = CoordinatorClient(root, autostart=False)
    assert c.list_topics() == ["t0", "t1", "t2", "t3"]
    assert c.fetch_offsets("g") == {(f"t{i}", 0): i + 1 for i in range(4)}
    with open(root.log_path) as f:
        text = f.read()
    assert len(re.findall(r"coordinator pid \d+ active on", text)) == 1, text
    c.close()
