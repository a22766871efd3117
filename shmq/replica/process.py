"""The replica process: hosts replicas of many partitions, like a Kafka broker.

Theory of operation:

1. It takes ``<root>/replica-<id>.lock`` (flock, non-blocking): at most one
   process per replica id; the coordinator probes the same lock to tell a
   live replica from a dead one. Then it locks its lifeline mutex
   (``shmq.lifeline``) for good: the coordinator's watcher wakes the moment
   this process dies.
2. It registers with the coordinator on a connection that stays open: the
   coordinator treats that connection's EOF as this process's death. A
   thread pings every ``PING_S``; after a coordinator change it registers
   again with the new one; with no coordinator for ``ORPHAN_S`` it exits
   (so does it when the root directory disappears).
3. The main loop re-reads the published metadata when its version changes
   and gives each hosted partition its role (``PartitionReplica.update``),
   then runs every partition's duties (``step``); when none had work it
   sleeps on a leader's commit futex for at most ``IDLE_NS``.

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

__all__ = ["ReplicaProcess"]

log = logging.getLogger("shmq.replica")

PING_S = 0.1
ORPHAN_S = 10.0
IDLE_NS = 1_000_000


class ReplicaProcess:
    """Replica process ``rid`` of ``root``."""

    def __init__(self, root: Root, rid: int) -> None:
        self.root = root
        self.rid = rid
        self.partitions: Dict[Tuple[str, int], PartitionReplica] = {}
        self._stop = threading.Event()
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
            log.info("replica process %d (pid %d) serving %s", self.rid, os.getpid(), self.root.path)
            self._loop()
        finally:
            for pr in self.partitions.values():
                pr.close()
            self.client.close()
            os.close(fd)
        return 0

    def _register(self) -> None:
        self.client.call("replica_register", replica_id=self.rid)
        self._coordinator = self.client.coordinator_pid

    def _lifeline(self) -> None:
        while not self._stop.wait(PING_S):
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

    def _loop(self) -> None:
        checked = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - checked > 0.1:
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
            for pr in list(self.partitions.values()):
                try:
                    work += pr.step()
                except ShmqError as e:
                    log.error("replica %d: %s: %s", self.rid, pr.name, e)
                    pr.ready = False
                except Exception:                 # a bug must not take the other partitions down
                    log.exception("replica %d: %s failed", self.rid, pr.name)
                    pr.ready = False
                    time.sleep(0.01)
            if not work:
                waiter = next(iter(self.partitions.values()), None)
                if waiter is None or len(self.partitions) > 1:
                    time.sleep(IDLE_NS / 1e9 if waiter is not None else 0.01)
                else:
                    waiter.wait(IDLE_NS)
