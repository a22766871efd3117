"""The broker processes of a root: which they are, and stopping them (``shmq stop``).

A broker process of a root is one that holds one of the root's lock files
open: the active coordinator and any standby (``coordinator.lock``; a
standby waits on it) and each replica process (``replica-<id>.lock``).
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
from typing import Dict, List, Tuple

import psutil

from ..root import Root

__all__ = ["root_processes", "stop_root"]

_LOCKS = ("coordinator.lock", "replica-*.lock")


def root_processes(root: Root) -> Dict[int, str]:
    """{pid: "coordinator" | "replica"} of every live process holding a lock file of ``root``."""
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
                    out[proc.pid] = "coordinator" if name == _LOCKS[0] else "replica"
                    break
        except (psutil.Error, OSError):
            continue
    return out


def _terminate(pids: List[int], timeout: float) -> Tuple[List[int], List[int]]:
    """SIGTERM ``pids`` and wait; SIGKILL those left after ``timeout`` s. Returns (stopped, killed)."""
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            p.send_signal(signal.SIGTERM)
            procs.append(p)
        except psutil.Error:
            continue
    _gone, alive = psutil.wait_procs(procs, timeout=timeout)
    killed = []
    for p in alive:
        try:
            p.kill()
            killed.append(p.pid)
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=2.0)
    return [p.pid for p in procs if p.pid not in killed], killed


def stop_root(root: Root, timeout: float = 15.0) -> Tuple[List[int], List[int]]:
    """Stop every broker process of ``root`` (see the module doc); returns
    (pids that exited on SIGTERM, pids that had to be killed)."""
    stopped: List[int] = []
    killed: List[int] = []
    active = root.coordinator_pid()
    for _ in range(3):            # a process may start meanwhile (a client's embedded coordinator)
        found = root_processes(root)
        if not found:
            break
        standbys = [pid for pid, kind in found.items() if kind == "coordinator" and pid != active]
        coordinators = [pid for pid, kind in found.items() if kind == "coordinator" and pid == active]
        replicas = [pid for pid, kind in found.items() if kind == "replica"]
        for group in (standbys, coordinators, replicas):
            if group:
                s, k = _terminate(group, timeout)
                stopped += s
                killed += k
        active = root.coordinator_pid()
    return stopped, killed
