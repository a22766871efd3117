"""Shared fixtures: every test gets its own root under /dev/shm, removed after
the test even when it fails, and every process a test starts is killed at the
end of the test."""
from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import signal
import tempfile
from typing import Iterator, List

import pytest

from shmq import Admin
from shmq.root import Root

SHM = "/dev/shm" if os.path.isdir("/dev/shm") else None


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--fastpath", choices=("on", "off"), default=None,
                     help="off: run with the C per-record path switched off (as SHMQ_FASTPATH=0)")


def pytest_configure(config: pytest.Config) -> None:
    # Read when each Producer/Consumer is made, and inherited by the processes tests start.
    if config.getoption("--fastpath") == "off":
        os.environ["SHMQ_FASTPATH"] = "0"
    elif config.getoption("--fastpath") == "on":
        os.environ.pop("SHMQ_FASTPATH", None)


@pytest.fixture
def shm_dir() -> Iterator[str]:
    """A fresh private directory on tmpfs (mode 0700)."""
    d = tempfile.mkdtemp(prefix="shmq-test-", dir=SHM)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class ProcessReaper:
    """Tracks processes started by a test; kills whatever is left at teardown."""

    def __init__(self) -> None:
        self.procs: List[mp.Process] = []
        self.pids: List[int] = []

    def start(self, target, *args, **kwargs) -> mp.Process:  # type: ignore[no-untyped-def]
        ctx = mp.get_context("fork")
        p = ctx.Process(target=target, args=args, kwargs=kwargs, daemon=True)
        p.start()
        self.procs.append(p)
        return p

    def track(self, pid: int) -> None:
        self.pids.append(pid)

    def cleanup(self) -> None:
        for p in self.procs:
            if p.is_alive():
                try:
                    os.kill(p.pid, signal.SIGCONT)
                    p.kill()
                except ProcessLookupError:
                    pass
            p.join(timeout=5)
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def reaper() -> Iterator[ProcessReaper]:
    r = ProcessReaper()
    try:
        yield r
    finally:
        r.cleanup()


def kill_coordinator(root: Root) -> None:
    """SIGKILL the root's active coordinator, if one is alive."""
    pid = root.coordinator_pid()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def replica_pids(root_path: str) -> List[int]:
    """Pids of the replica processes serving ``root_path``."""
    import psutil
    out = []
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if "shmq.replica" in cmd and root_path in cmd:
            out.append(proc.pid)
    return out


def kill_replicas(root_path: str) -> None:
    for pid in replica_pids(root_path):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def root(shm_dir: str) -> Iterator[Root]:
    """A fresh root; whatever coordinator and replica processes serve it at the end are killed."""
    r = Root(shm_dir)
    try:
        yield r
    finally:
        kill_coordinator(r)
        kill_replicas(r.path)


@pytest.fixture(scope="module")
def module_root() -> Iterator[str]:
    """One private root shared by a module's tests (each uses its own topics),
    so ~50 API tests do not start ~50 coordinators; killed and removed at the end."""
    path = tempfile.mkdtemp(prefix="shmq-test-", dir=SHM)
    try:
        yield Root(path).path
    finally:
        if os.path.isdir(path):
            kill_coordinator(Root(path, create=False))
        kill_replicas(path)
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def module_admin(module_root: str) -> Iterator[Admin]:
    """An Admin client on module_root, closed at the end of the module."""
    a = Admin(module_root)
    yield a
    a.close()
