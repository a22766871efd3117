"""Housekeeping of partition logs: the leader's periodic duties, in one place.

Contract: ``LogRegistry`` holds one open ``PartitionLog`` per hosted
partition; ``housekeep_once(registry)`` calls ``PartitionLog.housekeep()`` on
every one (prepare the next ring slot, finish abandoned seals, pad dead
claims) and never raises: an error is logged (once per partition until it
recovers) and the other partitions go on. ``Housekeeper`` runs it every
``interval`` seconds in a daemon thread. Nothing here knows about the
coordinator, so a replica process can host the same code unchanged.
"""
from __future__ import annotations

import logging
import threading
from typing import Dict, Iterator, Optional, Set, Tuple

from ..ringlog import LogConfig, PartitionLog

__all__ = ["LogRegistry", "housekeep_once", "Housekeeper"]

log = logging.getLogger("shmq.coordinator.housekeeping")

Key = Tuple[str, int]


class LogRegistry:
    """Open partition logs by (topic, partition); thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._logs: Dict[Key, PartitionLog] = {}
        self.failing: Set[Key] = set()     # partitions whose last housekeeping failed

    def open(self, topic: str, partition: int, path: str) -> PartitionLog:
        with self.lock:
            key = (topic, partition)
            plog = self._logs.get(key)
            if plog is None:
                plog = PartitionLog(path, name=f"{topic}-{partition}")
                self._logs[key] = plog
            return plog

    def create(self, topic: str, partition: int, path: str, config: LogConfig) -> PartitionLog:
        with self.lock:
            self.close(topic, partition)
            plog = PartitionLog.create(path, config, name=f"{topic}-{partition}")
            self._logs[(topic, partition)] = plog
            return plog

    def get(self, topic: str, partition: int) -> Optional[PartitionLog]:
        with self.lock:
            return self._logs.get((topic, partition))

    def close(self, topic: str, partition: Optional[int] = None) -> None:
        """Close one partition's log, or every partition of ``topic``."""
        with self.lock:
            for key in [k for k in self._logs if k[0] == topic and partition in (None, k[1])]:
                self._logs.pop(key).close()
                self.failing.discard(key)

    def close_all(self) -> None:
        with self.lock:
            for plog in self._logs.values():
                plog.close()
            self._logs.clear()

    def items(self) -> Iterator[Tuple[Key, PartitionLog]]:
        """Iterate under the lock (hold it only for short work per item)."""
        with self.lock:
            yield from list(self._logs.items())

    def __len__(self) -> int:
        return len(self._logs)


def housekeep_once(registry: LogRegistry) -> int:
    """Housekeep every log once; returns how many dead claims were padded over."""
    padded = 0
    with registry.lock:
        for key, plog in registry.items():
            try:
                padded += plog.housekeep()
            except Exception as e:   # never fatal: the data path can help itself
                if key not in registry.failing:
                    registry.failing.add(key)
                    log.error("housekeeping of %s-%d failed: %s", key[0], key[1], e)
                continue
            if key in registry.failing:
                registry.failing.discard(key)
                log.info("housekeeping of %s-%d works again", key[0], key[1])
    if padded:
        log.info("housekeeping padded over %d dead claim(s)", padded)
    return padded


class Housekeeper(threading.Thread):
    """Calls ``housekeep_once`` every ``interval`` seconds until ``stop()``."""

    def __init__(self, registry: LogRegistry, interval: float = 0.002) -> None:
        super().__init__(name="shmq-housekeeper", daemon=True)
        self.registry = registry
        self.interval = interval
        self._stop_event = threading.Event()
        self.ticks = 0

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            housekeep_once(self.registry)
            self.ticks += 1

    def stop(self) -> None:
        self._stop_event.set()

