"""The files of hosted partition logs: create, reopen after a restart, remove.

Contract: ``create_logs`` creates partitions ``[first, last)`` of a topic, all
or none (a failure removes what it made; an orphan directory left by a
crashed create is replaced); a request larger than the free space of the
filesystem is refused up front with ``KafkaStorageError`` (filling a tmpfs
to the brim squeezes the whole host's memory). ``open_all_logs`` opens every
partition the store knows, recreating a missing or unusable one empty with a
logged error, and removes directories that belong to no partition.
``remove_logs`` closes and deletes a topic's partitions. Paths come from
``Root`` only.
"""
from __future__ import annotations

import logging
import os
import shutil
from typing import Any, Dict, List

from ..errors import KafkaStorageError, ShmqError
from ..ringlog import LogConfig
from ..root import Root
from .housekeeping import LogRegistry
from .store import Store
from .topic_config import log_config

__all__ = ["create_logs", "open_all_logs", "remove_logs", "check_space"]

log = logging.getLogger("shmq.coordinator.partitions")


def check_space(root: Root, name: str, count: int, lc: LogConfig) -> None:
    """Raise ``KafkaStorageError`` if ``count`` partitions of ``lc`` cannot fit."""
    need = count * lc.segment_count * lc.segment_bytes
    st = os.statvfs(root.replica_dir())
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise KafkaStorageError(
            f"topic {name!r}: {count} partition(s) of {lc.segment_count} x {lc.segment_bytes}-byte "
            f"segments need {need} bytes but {root.replica_dir()} has {free} free", topic=name)


def create_logs(root: Root, registry: LogRegistry, name: str, first: int, last: int,
                config: Dict[str, Any]) -> None:
    """Create partitions ``first..last-1`` of ``name`` (all or none)."""
    lc = log_config(config)
    check_space(root, name, last - first, lc)
    made: List[int] = []
    try:
        for p in range(first, last):
            path = root.partition_dir(name, p)
            shutil.rmtree(path, ignore_errors=True)      # an orphan of a crashed create
            registry.create(name, p, path, lc)
            made.append(p)
    except BaseException:
        remove_logs(root, registry, name, made)
        raise


def remove_logs(root: Root, registry: LogRegistry, name: str, partitions: Any) -> None:
    """Close and delete the given partitions of ``name``."""
    for p in partitions:
        plog = registry.get(name, p)
        if plog is not None:
            plog.mark_deleted()  # producers holding the mapping get UnknownTopicOrPartition
        registry.close(name, p)
        shutil.rmtree(root.partition_dir(name, p), ignore_errors=True)


def open_all_logs(root: Root, store: Store, registry: LogRegistry) -> None:
    """Open every partition of every topic; sweep orphan directories."""
    expected = set()
    for name, t in store.topics.items():
        lc = log_config(t["config"])
        for p in range(len(t["partitions"])):
            path = root.partition_dir(name, p)
            expected.add(os.path.basename(path))
            if t["config"].get("replication_factor", 1) > 1:
                continue                    # replica logs: see replication.py
            if os.path.exists(os.path.join(path, "partition.ctl")):
                try:
                    registry.open(name, p, path)
                    continue
                except ShmqError as e:
                    log.error("partition log %s-%d at %s cannot be opened (%s); recreating it empty",
                              name, p, path, e)
            else:
                log.error("partition log %s-%d is missing at %s; recreating it empty", name, p, path)
            shutil.rmtree(path, ignore_errors=True)
            registry.create(name, p, path, lc)
    for entry in os.listdir(root.replica_dir()):
        if entry not in expected:
            log.warning("removing orphan partition directory %s (no such topic partition)", entry)
            shutil.rmtree(os.path.join(root.replica_dir(), entry), ignore_errors=True)
