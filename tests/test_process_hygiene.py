"""The broker's own processes: started the same from anywhere, failures
reported with their cause."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from shmq import errors
from shmq.admin import Admin
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
