"""Cluster: a client's view of one root — topics from the published metadata
mapping, partition logs opened once and shared, and the coordinator for the
few things that need it (committed offsets).

Hot-path contract: ``version()`` is one 8-byte load from the metadata mapping;
``topic()`` and ``log()`` are dictionary lookups once warm. Nothing here makes
an RPC per record.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Iterable, List, Optional, Tuple

from .errors import UnknownTopicOrPartition
from .message import TopicPartition
from .ringlog import PartitionLog
from .root import Root, validate_topic


class TopicInfo:
    """What producers and consumers need about a topic."""

    __slots__ = ("name", "partitions", "paths", "config", "max_message_bytes")

    def __init__(self, name: str, partitions: int, paths: List[str], config: Dict[str, Any]) -> None:
        self.name = name
        self.partitions = partitions
        self.paths = paths
        self.config = config
        self.max_message_bytes = int(config.get("max_message_bytes") or (1 << 20))


class Cluster:
    """Topics, logs and the coordinator of one root, for one client object."""

    def __init__(self, root: Any = None) -> None:
        from .coordinator.client import CoordinatorClient
        self.root = Root(root)
        self._client = CoordinatorClient(self.root)
        self._view = self._client.metadata()
        self._logs: Dict[Tuple[str, int, str], PartitionLog] = {}
        self._lock = threading.Lock()

    # -------------------------------------------------------------- metadata
    def version(self) -> int:
        """Version of the published metadata; changes whenever topics do."""
        return self._view.version()

    def topic(self, name: str) -> TopicInfo:
        """The topic's metadata; ``UnknownTopicOrPartition`` if it does not exist."""
        validate_topic(name)
        md = self._view.topic(name)
        if md is None:
            self._view.refresh()
            md = self._view.topic(name)
        if md is None:
            raise UnknownTopicOrPartition(f"topic {name!r} does not exist in {self.root.path}", topic=name)
        return TopicInfo(md.name, md.partitions, list(md.paths), dict(md.config))

    def topics(self) -> List[str]:
        self._view.refresh()
        return sorted(self._view.topics())

    def log(self, topic: str, partition: int) -> PartitionLog:
        """The (shared, cached) log of ``topic``-``partition``."""
        info = self.topic(topic)
        if not isinstance(partition, int) or not 0 <= partition < info.partitions:
            raise UnknownTopicOrPartition(
                f"partition {partition!r} of topic {topic!r} does not exist (it has {info.partitions})",
                topic=topic, partition=partition if isinstance(partition, int) else None)
        path = info.paths[partition]
        key = (topic, partition, path)
        plog = self._logs.get(key)
        if plog is None:
            with self._lock:
                plog = self._logs.get(key)
                if plog is None:
                    plog = PartitionLog(path, name=f"{topic}-{partition}")
                    self._logs[key] = plog
        return plog

    # --------------------------------------------------------------- offsets
    def commit_offsets(self, group: str, offsets: Dict[TopicPartition, int], sync: bool) -> None:
        """Store committed offsets for ``group``; with ``sync`` only return once durable."""
        self._client.commit_offsets(group, {(tp[0], tp[1]): int(o) for tp, o in offsets.items()}, sync=sync)

    def fetch_offsets(self, group: str, partitions: Iterable[TopicPartition]) -> Dict[TopicPartition, int]:
        got = self._client.fetch_offsets(group, [(tp[0], tp[1]) for tp in partitions])
        return {TopicPartition(t, p): o for (t, p), o in got.items() if o is not None}

    @property
    def client(self) -> Any:
        return self._client

    def close(self) -> None:
        for plog in self._logs.values():
            plog.close()
        self._logs.clear()
        self._client.close()
