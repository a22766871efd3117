"""The broker's own processes: started the same from anywhere, failures
reported with their cause, quiet when idle, stopped by `shmq stop` or after
idle_exit_ms without clients, with their data left in place."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import psutil
import pytest

from shmq import errors
from shmq.admin import Admin
from shmq.coordinator import CoordinatorClient, coordinator_alive
from shmq.coordinator.lifecycle import root_processes
from shmq.producer import Producer
from shmq.root import Root


def test_client_in_a_directory_holding_a_shmq_tree_starts_its_coordinator(root: Root, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A directory holding a `shmq` package that cannot be imported (a stale
    # checkout, say): a coordinator started with it on its path would die.
    decoy = tmp_path / "project"
    (decoy / "shmq").mkdir(parents=True)
    (decoy / "shmq" / "__init__.py").write_text("raise ImportError('the decoy shmq tree was imported')\n")
    script = tmp_path / "client.py"
    script.write_text(textwrap.dedent(f"""
        from shmq.admin import Admin
        with Admin({root.path!r}) as admin:
            admin.create_topic("from-anywhere", partitions=2)
            print(admin.list_topics())
    """))
    out = subprocess.run([sys.executable, str(script)], cwd=str(decoy), capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "['from-anywhere']" in out.stdout
    pid = root.coordinator_pid()
    assert pid is not None
    assert os.readlink(f"/proc/{pid}/cwd") == "/"
    with open(root.log_path) as f:
        assert "decoy" not in f.read()


def test_a_coordinator_that_cannot_start_is_reported_with_its_cause(root: Root) -> None:
    with open(root.snapshot_path, "wb") as f:           # damaged metadata: recovery refuses it
        f.write(b"not a snapshot" * 8)
    with pytest.raises(errors.NotCoordinator) as e:
        with Admin(root.path) as admin:
            admin.list_topics()
    msg = str(e.value)
    assert "failed to start" in msg and root.log_path in msg
    assert f"metadata snapshot {root.snapshot_path} is corrupt" in msg      # the cause, from its log
    assert root.coordinator_pid() is None


def _settled(root: Root, topic: str) -> bool:
    """Every replica process registered and every partition of ``topic`` fully in sync."""
    with Admin(root.path) as admin:
        parts = admin.describe_topic(topic).partitions
    with CoordinatorClient(root) as c:
        replicas = c.status()["replicas"]
    return (len(replicas) == 2 and all(r["registered"] for r in replicas.values())
            and all(len(p.isr) == 2 and p.leader == p.replicas[0] for p in parts))


def test_idle_coordinator_and_replica_processes_use_almost_no_cpu(root: Root) -> None:
    with Admin(root.path) as admin:
        admin.create_topic("plain", partitions=4)
        admin.create_topic("replicated", partitions=4, config={"replication_factor": 2})
    with Producer(root.path, acks="all") as producer:
        for topic in ("plain", "replicated"):
            for p in range(4):
                producer.send(topic, b"idle", partition=p)
    deadline = time.monotonic() + 30
    while not _settled(root, "replicated"):
        assert time.monotonic() < deadline, "replicas did not settle within 30 s"
        time.sleep(0.2)
    time.sleep(3.0)                        # past every "busy" window (2 s) after the last record
    kinds = root_processes(root)
    assert sorted(kinds.values()) == ["coordinator", "replica", "replica"], kinds
    procs = [psutil.Process(pid) for pid in kinds]

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    # Other processes on a busy host only add to what is measured (cold caches,
    # shared cores): the least of three windows is the figure (a CI run of
    # 2026-12-08 measured 1.6% and 1.5% in two windows once, 0.1-0.7% in
    # every other run). The bound is the
    # issue's 1% (0.2% is the benchmark's target: perf/bench_idle.py). Idle, a
    # replica process wakes once per 2 s for all its partitions' duties, its
    # waiters once per 2 s each; the coordinator's replication supervision
    # every replica_lag_time_max_ms / 2 (5 s), housekeeping every 2 s, offsets
    # every 1 s. Measured here: 0.10-0.20% (load average 2-5).
    shares = []
    for _ in range(3):
        t0, c0 = time.monotonic(), cpu()
        time.sleep(10.0)
        shares.append((cpu() - c0) / (time.monotonic() - t0))
        print(f"idle CPU of the coordinator and 2 replica processes over 10 s: {shares[-1] * 100:.3f}% of a core")
        if shares[-1] < 0.005:
            break
    assert min(shares) < 0.01, shares


def _wait_gone(root: Root, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while root_processes(root):
        assert time.monotonic() < deadline, f"still running after {timeout} s: {root_processes(root)}"
        time.sleep(0.1)


def _records(root: Root, topic: str) -> list:
    from shmq.consumer import Consumer
    from shmq.message import TopicPartition
    c = Consumer(root=root.path, auto_offset_reset="earliest", enable_auto_commit=False)
    try:
        c.assign([TopicPartition(topic, 0)])
        return [m.value for m in c.consume(10, timeout=5.0)]
    finally:
        c.close()


def test_shmq_stop_leaves_no_process_of_the_root_and_keeps_its_data(root: Root, reaper) -> None:  # type: ignore[no-untyped-def]
    with Admin(root.path) as admin:
        admin.create_topic("kept", partitions=1, config={"replication_factor": 2})
    with Producer(root.path, acks="all") as producer:
        producer.send("kept", b"survives", partition=0)
    deadline = time.monotonic() + 30
    while not _settled(root, "kept"):
        assert time.monotonic() < deadline, "replicas did not settle within 30 s"
        time.sleep(0.2)
    standby = subprocess.Popen([sys.executable, "-m", "shmq.coordinator", "--root", root.path, "--standby"],
                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    reaper.track(standby.pid)
    while sorted(root_processes(root).values()) != ["coordinator", "coordinator", "replica", "replica"]:
        assert time.monotonic() < deadline, root_processes(root)
        time.sleep(0.05)
    active = root.coordinator_pid()
    out = subprocess.run([sys.executable, "-m", "shmq", "--root", root.path, "stop"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Stopped coordinator pid {active}." in out.stdout and "Killed" not in out.stderr
    assert out.stdout.count("Stopped replica pid") == 2
    assert root_processes(root) == {}                  # no standby took over, no replica left
    assert standby.wait(timeout=5) == 0
    assert not coordinator_alive(root)
    with open(root.log_path) as f:
        assert "stopped replica process(es) [0, 1]" in f.read()
    # Nothing to stop now; the data is in place for the next coordinator.
    again = subprocess.run([sys.executable, "-m", "shmq", "--root", root.path, "stop"], capture_output=True,
                           text=True, timeout=60)
    assert again.returncode == 0 and "No shmq process runs" in again.stdout
    assert _records(root, "kept") == [b"survives"]


def test_embedded_coordinator_exits_when_idle_and_the_next_client_restarts_it(
        root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMQ_IDLE_EXIT_MS", "1000")
    with Admin(root.path) as admin:
        admin.create_topic("idle", partitions=1)
        with Producer(root.path) as producer:
            producer.send("idle", b"still here", partition=0)
            first = root.coordinator_pid()
            time.sleep(2.5)                              # clients connected: it stays
            assert root.coordinator_pid() == first
    _wait_gone(root, 15)                                 # no client for 1 s: it exits
    with open(root.log_path) as f:
        assert "no client connected for 1.0 s (idle_exit_ms=1000)" in f.read()
    monkeypatch.delenv("SHMQ_IDLE_EXIT_MS")
    assert _records(root, "idle") == [b"still here"]    # a new coordinator, the same data
    assert root.coordinator_pid() not in (None, first)


def test_bad_idle_exit_setting_is_refused_by_name(root: Root, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHMQ_IDLE_EXIT_MS", "ten minutes")
    with pytest.raises(errors.InvalidConfig, match="SHMQ_IDLE_EXIT_MS"):
        Admin(root.path).list_topics()
