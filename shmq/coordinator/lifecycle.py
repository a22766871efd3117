"""The broker processes of a root: which they are, and stopping them (``shmq stop``).

A broker process of a root is one that holds one of the root's lock files
open: the active coordinator and any standby (``coordinator.lock``; a
standby waits on it), each replica process (``replica-<id>.lock``) and the
coordinator-run Kafka listener (``kafka-listener.lock``).
Clients only open these files for an instant (``coordinator_alive``), so
this finds exactly the processes ``shmq stop`` must end, whatever their
command line or working directory.

``stop_root`` ends them in an order that leaves nothing to take over:
standbys first (else one would become active the moment the active one
exits), then the active coordinator (it stops its replica processes on its
way out), then any replica process left. Each gets SIGTERM and exits
cleanly (offsets journaled, logs closed, data left in place for the next
coordinator); one that does not within the timeout gets SIGKILL and is
named in the result.
"""
from __future__ import annotations

import fnmatch
import os
import signal
import time
from typing import Dict, List, Tuple

import psutil

from ..root import Root

__all__ = ["root_processes", "stop_root"]

_LOCKS = ("coordinator.lock", "replica-*.lock", "kafka-listener.lock")
_KINDS = {"coordinator.lock": "coordinator", "kafka-listener.lock": "kafka listener"}


def root_processes(root: Root) -> Dict[int, str]:
    """{pid: "coordinator" | "replica" | "kafka listener"} of every live process holding a lock file of ``root``."""
    base = os.path.realpath(root.path)
    me = os.geteuid()
    out: Dict[int, str] = {}
    for proc in psutil.process_iter(["uids"]):
        try:
            uids = proc.info.get("uids")
            if uids is None or uids.effective != me or proc.pid == os.getpid():
                continue
            for f in proc.open_files():
                d, name = os.path.split(f.path)
                if d == base and any(fnmatch.fnmatchcase(name, pat) for pat in _LOCKS):
                    out[proc.pid] = _KINDS.get(name, "replica")
                    break
        except (psutil.Error, OSError):
            continue
    return out


def _terminate(pids: List[int], timeout: float) -> Tuple[List[int], List[int]]:
    """SIGTERM ``pids`` and wait; SIGKILL those left after ``timeout`` s. Returns (stopped, killed) pids."""
    procs = []
    gone = []                       # exited meanwhile (a replica its coordinator stopped)
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.NoSuchProcess:
            gone.append(pid)
        except psutil.Error:
            continue
    alive = _wait_exit(procs, timeout)
    killed = []
    for p in alive:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.Error:
            pass
    _wait_exit(alive, 2.0)
    return gone + [p.pid for p in procs if p.pid not in killed], killed


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (an exited child of some other process, not yet reaped)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_exit(procs: List[psutil.Process], timeout: float) -> List[psutil.Process]:
    """Wait up to ``timeout`` s for ``procs`` to exit; returns those still running."""
    deadline = time.monotonic() + timeout
    alive = [p for p in procs if _running(p)]
    while alive and time.monotonic() < deadline:
        time.sleep(0.02)
        alive = [p for p in alive if _running(p)]
    return alive


def stop_root(root: Root, timeout: float = 15.0) -> Tuple[Dict[int, str], Dict[int, str]]:
    """Stop every broker process of ``root`` (see the module doc); returns
    ({pid: kind} that exited on SIGTERM, {pid: kind} that had to be killed)."""
    stopped: Dict[int, str] = {}
    killed: Dict[int, str] = {}
    active = root.coordinator_pid()
    for _ in range(3):            # a process may start meanwhile (a client's embedded coordinator)
        found = root_processes(root)
        if not found:
            break
        standbys = [pid for pid, kind in found.items() if kind == "coordinator" and pid != active]
        coordinators = [pid for pid, kind in found.items() if kind == "coordinator" and pid == active]
        replicas = [pid for pid, kind in found.items() if kind != "coordinator"]   # and a Kafka listener
        for group in (standbys, coordinators, replicas):
            if group:
                s, k = _terminate(group, timeout)
                stopped.update((pid, found[pid]) for pid in s)
                killed.update((pid, found[pid]) for pid in k)
        active = root.coordinator_pid()
    return stopped, killed
