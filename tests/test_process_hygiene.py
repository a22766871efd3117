"""The broker's own processes: started the same from anywhere, failures
reported with their cause, quiet when idle."""
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
from shmq.coordinator import CoordinatorClient
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
    time.sleep(2.0)                        # past every "busy" window (1 s) after the last record
    kinds = root_processes(root)
    assert sorted(kinds.values()) == ["coordinator", "replica", "replica"], kinds
    procs = [psutil.Process(pid) for pid in kinds]

    def cpu() -> float:
        return sum(sum(p.cpu_times()[:2]) for p in procs)

    t0, c0 = time.monotonic(), cpu()
    time.sleep(10.0)
    share = (cpu() - c0) / (time.monotonic() - t0)
    print(f"idle CPU of the coordinator and 2 replica processes over 10 s: {share * 100:.3f}% of a core")
    assert share < 0.01
