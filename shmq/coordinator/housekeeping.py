"""Housekeeping of partition logs: the leader's periodic duties, in one place.

Contract: ``LogRegistry`` holds one open ``PartitionLog`` per hosted
partition; ``housekeep_once(registry)`` calls ``PartitionLog.housekeep()`` on
every one (prepare the next ring slot, finish abandoned seals, pad dead
claims) and never raises: an error is logged (once per partition until it
recovers) and the other partitions go on; it also notes in
``registry.busy`` whether any log is in use (its end offset or slowest
position moved since the previous round, or a claim is still incomplete).
``Housekeeper`` runs it in a daemon thread every ``interval`` seconds while
the registry is busy, backing off (doubling) to ``idle_interval`` once it is
not: an idle coordinator wakes a few times a second, a busy one keeps the
next ring slot prepared ahead of its producers. A burst that starts while it
sleeps is never stalled by it: a producer that finds no prepared slot
prepares one itself (see DESIGN.md, "Progress on the data path never
depends on one process being alive"). Nothing here knows about the
coordinator, so a replica process can host the same code unchanged.
"""
from __future__ import annotations

import logging
import threading
from typing import Any, Dict, Iterator, Optional, Set, Tuple

from ..ringlog import LogConfig, PartitionLog

__all__ = ["LogRegistry", "housekeep_once", "Housekeeper", "Backoff", "activity_mark"]

log = logging.getLogger("shmq.coordinator.housekeeping")

Key = Tuple[str, int]


class LogRegistry:
    """Open partition logs by (topic, partition); thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self._logs: Dict[Key, PartitionLog] = {}
        self.failing: Set[Key] = set()     # partitions whose last housekeeping failed
        self.busy = True                    # any log in use at the last housekeeping round
        self._marks: Dict[Key, Tuple[int, int, bool]] = {}

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
                self._marks.pop(key, None)

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


def activity_mark(plog: PartitionLog) -> Tuple[int, int, bool]:
    """What moves while a log is in use: its end offset, its slowest position
    (block mode) and whether its unblock walker is timing an incomplete claim."""
    unblock: Any = plog._unblock          # the walker state housekeep() keeps for this log
    return plog.end_offset, plog.slowest_position, unblock.since_ns != 0


def housekeep_once(registry: LogRegistry) -> int:
    """Housekeep every log once; returns how many dead claims were padded over
    (and sets ``registry.busy``)."""
    padded = 0
    busy = False
    with registry.lock:
        for key, plog in registry.items():
            try:
                padded += plog.housekeep()
                mark = activity_mark(plog)
                if mark[2] or registry._marks.get(key) != mark:
                    busy = True
                registry._marks[key] = mark
            except Exception as e:   # never fatal: the data path can help itself
                if key not in registry.failing:
                    registry.failing.add(key)
                    log.error("housekeeping of %s-%d failed: %s", key[0], key[1], e)
                continue
            if key in registry.failing:
                registry.failing.discard(key)
                log.info("housekeeping of %s-%d works again", key[0], key[1])
    registry.busy = busy or bool(padded)
    if padded:
        log.info("housekeeping padded over %d dead claim(s)", padded)
    return padded


class Backoff:
    """The pause of a supervision loop: ``fast`` after a round that had work,
    doubling up to ``idle`` while rounds have none."""

    def __init__(self, fast: float, idle: float) -> None:
        self.fast = fast
        self.idle = max(idle, fast)
        self.pause = fast

    def next(self, busy: bool) -> float:
        self.pause = self.fast if busy else min(self.pause * 2, self.idle)
        return self.pause


class Housekeeper(threading.Thread):
    """Calls ``housekeep_once`` every ``interval`` seconds while the registry is
    busy, backing off to ``idle_interval`` while it is not (``empty_interval``
    while it holds no log: ``wake()`` when one is added), until ``stop()``."""

    def __init__(self, registry: LogRegistry, interval: float = 0.002, idle_interval: float = 0.25,
                 empty_interval: float = 5.0) -> None:
        super().__init__(name="shmq-housekeeper", daemon=True)
        self.registry = registry
        self.interval = interval
        self.empty_interval = empty_interval
        self.backoff = Backoff(interval, idle_interval)
        self._stop_event = threading.Event()
        self._wake = threading.Event()
        self.ticks = 0

    def run(self) -> None:
        pause = self.interval
        while True:
            self._wake.wait(pause)
            self._wake.clear()
            if self._stop_event.is_set():
                break
            housekeep_once(self.registry)
            self.ticks += 1
            pause = self.backoff.next(self.registry.busy) if len(self.registry) else self.empty_interval

    def wake(self) -> None:
        """Housekeep now (a log was added) and keep the fast pace."""
        self.backoff.pause = self.interval
        self._wake.set()

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()

