"""The replica process: hosts replicas of many partitions, like a Kafka broker.

Theory of operation:

1. It takes ``<root>/replica-<id>.lock`` (flock, non-blocking): at most one
   process per replica id; the coordinator probes the same lock to tell a
   live replica from a dead one. Then it locks its lifeline mutex
   (``shmq.lifeline``) for good: the coordinator's watcher wakes the moment
   this process dies.
2. It registers with the coordinator on a connection that stays open: the
   coordinator treats that connection's EOF as this process's death, and a
   thread sleeps in ``poll`` on it: when the coordinator closes it (died,
   stopped) the thread pings, which reconnects to the new coordinator, and
   registers again; with no coordinator for ``ORPHAN_S`` it exits (so does it
   when the root directory disappears, and on SIGTERM/SIGINT, which a
   coordinator that stops cleanly sends it).
3. The main loop re-reads the published metadata when its version changes
   and gives each hosted partition its role (``PartitionReplica.update``),
   then runs every partition's duties (``step``). When none had work and a
   partition was busy within ``ACTIVE_NS``, it sleeps ``FAST_NS`` on one
   log's commit futex (rotating). Otherwise it is idle: it sleeps on its bell
   (``waiters``: rung by a commit on any log it waits for, by a metadata
   publish, or by stop) until the next periodic duty (at most ``IDLE_NS``),
   so an idle process wakes about once every 2 s (all partitions' duties and
   the root check in one wake-up) and still reacts at once.

Started by the coordinator as ``python -m shmq.replica --root R --id N``.
"""
from __future__ import annotations

import fcntl
import logging
import os
import threading
import time
from typing import Any, Dict, Optional, Tuple

from ..coordinator.client import CoordinatorClient
from ..errors import NotCoordinator, ShmqError
from ..lifeline import Lifeline
from ..root import Root
from .partition import PartitionReplica
from .waiters import LogWaiter, MetadataWaiter

__all__ = ["ReplicaProcess"]

log = logging.getLogger("shmq.replica")

PING_S = 10.0                 # the lifeline thread's poll timeout (its EOF wakes it at once; this only re-checks stop)
ORPHAN_S = 10.0
FAST_NS = 1_000_000           # the wait of a busy process between rounds
IDLE_NS = 2_000_000_000       # the longest sleep of an idle process
ROOT_CHECK_NS = 500_000_000   # the root's removal is checked at a wake-up at least this far from the last check


class ReplicaProcess:
    """Replica process ``rid`` of ``root``."""

    def __init__(self, root: Root, rid: int) -> None:
        self.root = root
        self.rid = rid
        self.partitions: Dict[Tuple[str, int], PartitionReplica] = {}
        self._stop = threading.Event()
        self._bell = threading.Event()          # rung by the waiters: see shmq.replica.waiters
        self._waiters: Dict[Tuple[str, int], LogWaiter] = {}
        self._version = -1
        self._root_ino = os.stat(root.path).st_ino
        self.client = CoordinatorClient(root, autostart=False, connect_timeout=ORPHAN_S)

    def _lock(self) -> Optional[int]:
        fd = os.open(self.root.replica_lock_path(self.rid), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        return fd

    def run(self) -> int:
        fd = self._lock()
        if fd is None:
            log.info("replica %d is already running on %s; exiting", self.rid, self.root.path)
            return 3
        try:
            # Held until this process dies: the coordinator learns of the death from it at once.
            self.lifeline = Lifeline(self.root.replica_alive_path(self.rid), create=True)
            self.lifeline.hold()
            self._register()
            threading.Thread(target=self._lifeline, name="shmq-replica-lifeline", daemon=True).start()
            self.view = self.client.metadata()
            MetadataWaiter(self._bell, self.root.metadata_map_path, self._stop).start()
            log.info("replica process %d (pid %d) serving %s", self.rid, os.getpid(), self.root.path)
            self._loop()
        finally:
            for w in self._waiters.values():
                w.stop()
            for pr in self.partitions.values():
                pr.close()
            self.client.close()
            os.close(fd)
        return 0

    def _register(self) -> None:
        self.client.call("replica_register", replica_id=self.rid)
        self._coordinator = self.client.coordinator_pid

    def _lifeline(self) -> None:
        while not self._stop.is_set():
            if not self.client.wait_closed(PING_S) or self._stop.is_set():
                continue
            try:
                self.client.call("ping")
                if self.client.coordinator_pid != self._coordinator:
                    log.info("replica %d: new coordinator (pid %s); registering again", self.rid,
                             self.client.coordinator_pid)
                    self._register()
            except NotCoordinator as e:
                log.warning("replica %d: no coordinator for %.0fs (%s); exiting", self.rid, ORPHAN_S, e)
                self._stop.set()
            except ShmqError as e:
                log.warning("replica %d: coordinator refused us (%s); exiting", self.rid, e)
                self._stop.set()

    def _root_alive(self) -> bool:
        try:
            return os.stat(self.root.path).st_ino == self._root_ino
        except OSError:
            return False

    def report(self, op: str, **args: Any) -> None:
        try:
            self.client.call(op, **args)
        except ShmqError as e:
            log.warning("replica %d: reporting %s %s failed: %s", self.rid, op, args, e)

    def _reconcile(self) -> None:
        self.view.refresh()
        seen = set()
        for name, md in self.view.topics().items():
            replicas_all = getattr(md, "replicas", None)
            if not replicas_all:
                continue
            for p, replicas in enumerate(replicas_all):
                if self.rid not in replicas:
                    continue
                key = (name, p)
                seen.add(key)
                idx = replicas.index(self.rid)
                pr = self.partitions.get(key)
                if pr is None or pr.path != md.replica_paths[p][idx]:
                    if pr is not None:
                        pr.close()
                    pr = PartitionReplica(self.rid, name, p, md.replica_paths[p][idx], md.config, self.report)
                    self.partitions[key] = pr
                pr.map_peers(md.replica_paths[p])
                leader = md.leaders[p]
                lpath = md.replica_paths[p][replicas.index(leader)] if leader in replicas else None
                pr.update(leader, md.leader_epochs[p], idx, lpath, self.rid in md.offline[p])
        for key in [k for k in self.partitions if k not in seen]:
            self.partitions.pop(key).close()
            w = self._waiters.pop(key, None)
            if w is not None:
                w.stop()

    def _arm(self) -> None:
        """Point every partition's waiter at what would give it work now."""
        for key, pr in self.partitions.items():
            target = pr.wait_target()
            w = self._waiters.get(key)
            if w is None:
                if target is None:
                    continue
                w = self._waiters[key] = LogWaiter(self._bell, pr.name)
                w.start()
            w.watch(target)

    def stop(self) -> None:
        self._stop.set()
        self._bell.set()

    def _loop(self) -> None:
        checked = 0
        turn = 0
        while not self._stop.is_set():
            now = time.monotonic_ns()
            if now - checked > ROOT_CHECK_NS:
                checked = now
                if not self._root_alive():
                    log.warning("replica %d: root %s was removed; exiting", self.rid, self.root.path)
                    return
            if self.view.version() != self._version:
                self._version = self.view.version()
                try:
                    self._reconcile()
                except ShmqError as e:
                    log.error("replica %d: applying metadata version %d failed: %s", self.rid, self._version, e)
            work = 0
            parts = list(self.partitions.values())
            for pr in parts:
                try:
                    work += pr.step(now)
                except ShmqError as e:
                    log.error("replica %d: %s: %s", self.rid, pr.name, e)
                    pr.ready = False
                except Exception:                 # a bug must not take the other partitions down
                    log.exception("replica %d: %s failed", self.rid, pr.name)
                    pr.ready = False
                    time.sleep(0.01)
            if work:
                continue
            if any(pr.busy(now) for pr in parts):
                waiters = [pr for pr in parts if pr.can_wait()]
                if waiters:
                    turn += 1
                    waiters[turn % len(waiters)].wait(FAST_NS)
                else:
                    self._stop.wait(FAST_NS / 1e9)
                continue
            due = min((pr.due(now) for pr in parts), default=now + IDLE_NS)
            self._bell.clear()
            self._arm()
            if self.view.version() == self._version and not self._stop.is_set():
                self._bell.wait(max(FAST_NS, min(due - now, IDLE_NS)) / 1e9)
