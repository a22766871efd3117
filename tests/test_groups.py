"""Consumer groups: assignors, fencing, eviction of a SIGSTOPped member, static
membership, max_poll_interval_ms, regex subscriptions and new partitions,
admin and CLI."""
from __future__ import annotations

import io
import multiprocessing as mp
import os
import re
import signal
import time
from contextlib import redirect_stdout
from typing import Any, List

import pytest

from shmq import errors
from shmq.consumer import Consumer
from shmq.coordinator.groups import assign_range, assign_roundrobin, assign_sticky
from shmq.message import TopicPartition
from shmq.producer import Producer

from test_groups_procs import (CFG, TOPIC, assignment_of, balanced, consumer_proc, group_env, parse,
                               producer_proc, wait_all_committed, wait_for)


@pytest.fixture
def env(shm_dir: str, reaper):  # type: ignore[no-untyped-def]
    yield from group_env(shm_dir, reaper)


# ----------------------------------------------------------------- assignors
def test_assignors() -> None:
    members = ["a", "b", "c"]
    subs = {m: {"t", "u"} for m in members}
    parts = {"t": 4, "u": 3}
    r = assign_range(members, subs, parts, {})
    assert r["a"] == {("t", 0), ("t", 1), ("u", 0)} and r["c"] == {("t", 3), ("u", 2)}
    rr = assign_roundrobin(members, subs, parts, {})
    assert sorted(len(v) for v in rr.values()) == [2, 2, 3]
    assert rr["a"] == {("t", 0), ("t", 3), ("u", 2)}
    s1 = assign_sticky(members, subs, parts, {})
    assert sorted(len(v) for v in s1.values()) == [2, 2, 3]
    assert set().union(*s1.values()) == {(t, p) for t in parts for p in range(parts[t])}
    # A fourth member: everybody keeps what it can, only what the newcomer needs moves.
    s2 = assign_sticky(members + ["d"], {**subs, "d": {"t", "u"}}, parts, s1)
    moved = sum(len(s1[m] - s2[m]) for m in members)
    assert sorted(len(v) for v in s2.values()) == [1, 2, 2, 2] and moved == len(s2["d"])
    # A member leaves: only its partitions move.
    s3 = assign_sticky(["a", "b", "d"], {**subs, "d": {"t", "u"}}, parts, s2)
    assert all(s2[m] <= s3[m] for m in ("a", "b", "d"))
    # Heterogeneous subscriptions are respected.
    s4 = assign_sticky(["a", "b"], {"a": {"t"}, "b": {"t", "u"}}, parts, {})
    assert all(t == "t" for t, _ in s4["a"]) and len(s4["a"]) + len(s4["b"]) == 7


# ------------------------------------------------------- in-process groups
def drive(*consumers: Consumer, until: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        for c in consumers:
            c.poll(0.005)
        assert time.monotonic() < deadline, "timed out driving consumers"


@pytest.mark.timeout(60)
def test_fencing_stale_commits_are_rejected_by_client_and_coordinator(env) -> None:  # type: ignore[no-untyped-def]
    root, admin, _out = env
    admin.create_topic("f", 2, CFG)
    p = Producer(root)
    for i in range(20):
        p.send("f", b"x", partition=i % 2)
    p.flush()
    c1 = Consumer("f", group_id="gf", root=root, auto_offset_reset="earliest", enable_auto_commit=False)
    assert sorted(c1.assignment()) == [("f", 0), ("f", 1)]
    drive(c1, until=lambda: c1.position(TopicPartition("f", 0)) == 10 and c1.position(TopicPartition("f", 1)) == 10)
    c1.commit(asynchronous=False)
    old_gens = dict(c1._gens)
    revoked: List[Any] = []
    c1.subscribe(["f"], on_revoke=revoked.extend)         # re-subscribe: rejoin, new generation
    c2 = Consumer(group_id="gf", root=root, auto_offset_reset="earliest", enable_auto_commit=False)
    c2.subscribe(["f"])
    drive(c1, c2, until=lambda: len(c1.assignment()) == 1 and len(c2.assignment()) == 1)
    lost_tp = c2.assignment()[0]
    assert revoked == [lost_tp]
    # Client-side check: c1 no longer owns lost_tp.
    with pytest.raises(errors.CommitFailed):
        c1.commit(offsets={lost_tp: 3}, asynchronous=False)
    # Coordinator-side: a store with an old generation (racing the check) is dropped, never journaled.
    cl = c1._cluster
    idx = cl.offset_slot("gf", *lost_tp)
    table = cl.offsets_table()
    table.store(idx, 4, 0, old_gens[lost_tp])
    cl.client.sync_offsets()
    assert cl.client.fetch_offsets("gf", [lost_tp]) == {tuple(lost_tp): 10}
    assert table.load(idx) == 10
    # The owner commits fine.
    c2.commit(offsets={lost_tp: 12}, asynchronous=False)
    assert admin.describe_group("gf").partitions[lost_tp.partition].committed == 12
    c1.close()
    c2.close()
    assert admin.describe_group("gf").state == "Empty"


@pytest.mark.timeout(60)
def test_max_poll_interval_regex_and_new_partitions(env) -> None:  # type: ignore[no-untyped-def]
    root, admin, _out = env
    admin.create_topic("ev-a", 2, CFG)
    admin.create_topic("other", 1, CFG)
    lost: List[Any] = []
    c = Consumer(group_id="gr", root=root, max_poll_interval_ms=600, auto_offset_reset="earliest")
    c.subscribe(pattern=r"ev-.*", on_lost=lost.extend)
    assert sorted(c.assignment()) == [("ev-a", 0), ("ev-a", 1)]
    admin.create_partitions("ev-a", 3)
    admin.create_topic("ev-b", 1, CFG)
    drive(c, until=lambda: len(c.assignment()) == 4)
    assert ("other", 0) not in c.assignment()
    time.sleep(1.2)                                   # "stuck processing"
    wait_for(lambda: admin.describe_group("gr").members == [], 5, "the member to leave")
    c.poll(0.01)                                       # reports it ...
    assert sorted(lost) == [("ev-a", 0), ("ev-a", 1), ("ev-a", 2), ("ev-b", 0)]
    drive(c, until=lambda: len(c.assignment()) == 4)   # ... and rejoins
    c.close()
    # Without on_lost the next poll raises CommitFailed.
    c = Consumer(group_id="gr2", root=root, max_poll_interval_ms=600)
    c.subscribe(["^ev-.*"])
    time.sleep(1.2)
    wait_for(lambda: admin.describe_group("gr2").members == [], 5, "the member to leave")
    with pytest.raises(errors.CommitFailed, match="max_poll_interval_ms"):
        c.poll(0.01)
    c.close()


@pytest.mark.timeout(60)
def test_members_rejoin_after_coordinator_failover_keeping_their_partitions(env) -> None:  # type: ignore[no-untyped-def]
    from shmq.root import Root
    root, admin, _out = env
    admin.create_topic("fo", 4, CFG)
    c1 = Consumer("fo", group_id="gfo", root=root, enable_auto_commit=False)
    c2 = Consumer("fo", group_id="gfo", root=root, enable_auto_commit=False)
    drive(c1, c2, until=lambda: len(c1.assignment()) == 2 and len(c2.assignment()) == 2)
    a1, a2 = sorted(c1.assignment()), sorted(c2.assignment())
    old = Root(root).coordinator_pid()
    os.kill(old, signal.SIGKILL)                      # the members start a new one
    drive(c1, c2, until=lambda: Root(root).coordinator_pid() not in (None, old)
          and len(admin.describe_group("gfo").members) == 2, timeout=20)
    drive(c1, c2, until=lambda: c1._group.member_id is not None and c2._group.member_id is not None
          and c1._group_version == c1._group.version and c2._group_version == c2._group.version)
    assert sorted(c1.assignment()) == a1 and sorted(c2.assignment()) == a2
    d = admin.describe_group("gfo")
    assert {tuple(tp) for m in d.members for tp in m.assignment} == set(a1) | set(a2)
    c1.commit(offsets={a1[0]: 0}, asynchronous=False)   # the new generation may commit
    c1.close()
    c2.close()


# ------------------------------------------------------------ real processes
@pytest.mark.timeout(90)
def test_sigstopped_member_is_evicted_and_its_commits_rejected(env, reaper) -> None:  # type: ignore[no-untyped-def]
    root, admin, out = env
    admin.create_topic(TOPIC, 8, CFG)
    stop = mp.get_context("fork").Event()
    opts = {"session_timeout_ms": 1000, "heartbeat_interval_ms": 200}
    m0 = reaper.start(consumer_proc, root, "gs", "m0", out, stop, opts)
    reaper.start(consumer_proc, root, "gs", "m1", out, stop, opts)
    wait_for(lambda: balanced(admin, "gs", 2), 30, "2 members")
    prod = reaper.start(producer_proc, root, "p0", 20_000, 3.0)
    time.sleep(0.5)
    os.kill(m0.pid, signal.SIGSTOP)
    t0 = time.monotonic()
    evicted = wait_for(lambda: balanced(admin, "gs", 1), 10, "the stopped member to be evicted")
    assert evicted >= 0.75          # session timeout minus one heartbeat interval
    time.sleep(0.3)
    os.kill(m0.pid, signal.SIGCONT)
    rejoin = wait_for(lambda: balanced(admin, "gs", 2), 10, "the member to rejoin")
    prod.join(30)
    ends = wait_all_committed(admin, "gs", 30)
    stop.set()
    m0.join(10)
    logs = parse(out)
    assert logs["m0"]["L"], "the stopped member did not report its lost partitions"
    assert logs["m0"]["CF"] >= 1 and logs["m0"]["CO"] == 0, logs["m0"]
    seen = {(p, o) for d in logs.values() for p, o, *_ in d["M"]}
    assert all((p, o) in seen for p, e in ends.items() for o in range(e))
    print(f"\nSIGSTOP -> evicted after {evicted * 1000:.0f} ms (session timeout 1000 ms); "
          f"SIGCONT -> rejoined and balanced {rejoin * 1000:.0f} ms; stale commits rejected: {logs['m0']['CF']}; "
          f"stopped at t={t0:.1f}")


@pytest.mark.timeout(90)
def test_static_member_restarted_gets_its_partitions_back(env, reaper) -> None:  # type: ignore[no-untyped-def]
    root, admin, out = env
    admin.create_topic(TOPIC, 8, CFG)
    stop = mp.get_context("fork").Event()
    procs = {}
    for i in range(3):
        procs[f"s{i}"] = reaper.start(consumer_proc, root, "gst", f"s{i}", out, stop,
                                      {"group_instance_id": f"inst-{i}", "session_timeout_ms": 6000})
    wait_for(lambda: balanced(admin, "gst", 3), 30, "3 static members")
    time.sleep(0.3)
    before = assignment_of(admin, "gst")
    t_kill = time.monotonic()
    os.kill(procs["s1"].pid, signal.SIGKILL)
    time.sleep(0.3)
    d = admin.describe_group("gst")
    assert any(m.client_id == "s1" for m in d.members)          # kept for the session timeout
    assert {m.client_id: set(m.assignment) for m in d.members} == before
    procs["s1b"] = reaper.start(consumer_proc, root, "gst", "s1", out, stop,
                                {"group_instance_id": "inst-1", "session_timeout_ms": 6000})
    back = wait_for(lambda: any(m.client_id == "s1" and m.pid == procs["s1b"].pid and m.assignment
                                for m in admin.describe_group("gst").members), 10, "s1 to come back")
    assert assignment_of(admin, "gst") == before
    time.sleep(0.3)
    stop.set()
    for p in procs.values():
        p.join(10)
    logs = parse(out)
    for n in ("s0", "s2"):
        late = [e for e in logs[n]["A"] + logs[n]["R"] + logs[n]["L"] if e[1] > t_kill]
        assert not late, f"{n} was disturbed by the restart: {late}"
    print(f"\nstatic member SIGKILLed, restarted 0.3 s later: partitions back {back * 1000:.0f} ms after the restart, "
          f"no other member rebalanced")


# ------------------------------------------------------------- admin and CLI
@pytest.mark.timeout(60)
def test_admin_and_cli_describe_reset_delete(env) -> None:  # type: ignore[no-untyped-def]
    from shmq.cli.main import main
    root, admin, _out = env
    admin.create_topic("orders", 2, CFG)
    p = Producer(root)
    for i in range(10):
        p.send("orders", b"v", partition=i % 2)
    p.flush()
    time.sleep(0.01)
    ts_mid = int(time.time() * 1000)
    time.sleep(0.01)
    for i in range(10):
        p.send("orders", b"w", partition=i % 2)
    p.flush()
    c = Consumer("orders", group_id="billing", root=root, auto_offset_reset="earliest", client_id="bill-1")
    drive(c, until=lambda: all(c.position(tp) == 10 for tp in c.assignment()))
    c.commit(asynchronous=False)
    d = admin.describe_group("billing")
    assert d.state == "Stable" and len(d.members) == 1 and d.members[0].pid == os.getpid()
    assert [(x.partition, x.committed, x.log_end, x.lag) for x in d.partitions] == [(0, 10, 10, 0), (1, 10, 10, 0)]
    assert [g["group"] for g in admin.list_groups()] == ["billing"]
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["--root", root, "groups", "describe", "billing"]) == 0
    text = buf.getvalue()
    assert re.search(r"GROUP\s+TOPIC\s+PARTITION\s+CURRENT-OFFSET\s+LOG-END-OFFSET\s+LAG\s+CONSUMER-ID", text)
    assert re.search(r"billing\s+orders\s+0\s+10\s+10\s+0\s+bill-1-", text), text
    with pytest.raises(errors.InvalidRequest, match="active members"):
        admin.reset_offsets("billing", "earliest")
    with pytest.raises(errors.InvalidRequest, match="not empty"):
        admin.delete_group("billing")
    c.close()
    assert admin.reset_offsets("billing", "earliest") == {("orders", 0): 0, ("orders", 1): 0}
    assert admin.reset_offsets("billing", "latest") == {("orders", 0): 10, ("orders", 1): 10}
    assert admin.reset_offsets("billing", "offset", value=3, topics=["orders"]) == {("orders", 0): 3, ("orders", 1): 3}
    assert admin.reset_offsets("billing", "timestamp", value=ts_mid) == {("orders", 0): 5, ("orders", 1): 5}
    with redirect_stdout(io.StringIO()):
        assert main(["--root", root, "groups", "reset-offsets", "billing", "--to-offset", "7", "--execute"]) == 0
    assert [x.committed for x in admin.describe_group("billing").partitions] == [7, 7]
    c = Consumer("orders", group_id="billing", root=root)
    assert c.position(TopicPartition("orders", 1)) == 7
    c.close(autocommit=False)
    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["--root", root, "groups", "list"]) == 0
        assert main(["--root", root, "groups", "delete", "billing"]) == 0
    assert "billing" in buf.getvalue()
    assert admin.list_groups() == [] and admin.describe_group("billing").state == "Dead"
