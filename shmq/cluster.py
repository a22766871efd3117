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

from .errors import CommitFailed, InvalidConfig, LeaderNotAvailable, UnknownTopicOrPartition
from .message import TopicPartition
from .offsets_table import F_GENERATION, F_OFFSET, GEN_SHIFT, OFFSET_MASK
from .ringlog import PartitionLog
from .root import Root, validate_topic


class TopicInfo:
    """What producers and consumers need about a topic."""

    __slots__ = ("name", "topic_id", "partitions", "paths", "config", "max_message_bytes", "replicated",
                 "leaders", "leader_epochs", "min_insync_replicas", "replica_paths", "replicas", "isr")

    def __init__(self, name: str, topic_id: str, partitions: int, paths: List[Optional[str]], config: Dict[str, Any],
                 leaders: Optional[List[int]] = None, leader_epochs: Optional[List[int]] = None,
                 replica_paths: Optional[List[List[str]]] = None, replicas: Optional[List[List[int]]] = None,
                 isr: Optional[List[List[int]]] = None) -> None:
        self.name = name
        self.topic_id = topic_id
        self.partitions = partitions
        self.paths = paths
        self.config = config
        self.max_message_bytes = int(config.get("max_message_bytes") or (1 << 20))
        self.replicated = int(config.get("replication_factor") or 1) > 1
        self.leaders = leaders
        self.leader_epochs = leader_epochs
        self.min_insync_replicas = int(config.get("min_insync_replicas") or 1)
        self.replica_paths = replica_paths
        self.replicas = replicas
        self.isr = isr

    def preferred_read_replica(self, partition: int, rack: Optional[str]) -> Optional[int]:
        """Kafka's rack-aware replica selector (KIP-392): the replica id to read
        ``partition`` from for a client in ``rack``: the leader if it is in that
        rack, else the first in-sync replica there, else the leader (None: the
        partition has no leader and no in-sync replica in the rack)."""
        leader = self.leaders[partition] if self.leaders else None
        leader = None if leader is None or leader < 0 else leader
        racks = self.config.get("replica_racks") or {}
        if not rack or not self.replicated or not racks or not self.isr:
            return leader
        in_rack = [r for r in self.isr[partition] if racks.get(str(r)) == rack]
        if leader in in_rack or not in_rack:
            return leader
        return in_rack[0]


class Cluster:
    """Topics, logs and the coordinator of one root, for one client object."""

    def __init__(self, root: Any = None) -> None:
        from .coordinator.client import CoordinatorClient
        self.root = Root(root)
        self._client = CoordinatorClient(self.root)
        self._view = self._client.metadata()
        # Keyed by topic id: a topic deleted and re-created under the same name
        # has new files at the same path, and must not reuse the old mapping.
        self._logs: Dict[Tuple[str, int, str], PartitionLog] = {}
        self._slots: Dict[Tuple[str, str, int], int] = {}
        self._slots_version = -1
        self._prewarmed: set = set()
        self._closed = False
        self._table: Any = None
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
        return TopicInfo(md.name, md.topic_id, md.partitions, list(md.paths), dict(md.config), md.leaders,
                         md.leader_epochs, md.replica_paths, md.replicas, md.isr)

    def topics(self) -> List[str]:
        self._view.refresh()
        return sorted(self._view.topics())

    def log(self, topic: str, partition: int) -> PartitionLog:
        """The (shared, cached) log of ``topic``-``partition``: for a replicated
        topic, its current leader's (``LeaderNotAvailable`` while it has none)."""
        info = self.topic(topic)
        if not isinstance(partition, int) or not 0 <= partition < info.partitions:
            raise UnknownTopicOrPartition(
                f"partition {partition!r} of topic {topic!r} does not exist (it has {info.partitions})",
                topic=topic, partition=partition if isinstance(partition, int) else None)
        return self._open(info, partition, info.paths[partition])

    def read_log(self, topic: str, partition: int, rack: Optional[str]) -> PartitionLog:
        """The log a consumer in ``rack`` reads ``topic``-``partition`` from: an
        in-sync follower's in that rack (KIP-392; it serves only what is below
        the high watermark), else the leader's (as ``log``)."""
        info = self.topic(topic)
        if not rack or not info.replicated:
            return self.log(topic, partition)
        if not isinstance(partition, int) or not 0 <= partition < info.partitions:
            return self.log(topic, partition)   # raises UnknownTopicOrPartition
        rid = info.preferred_read_replica(partition, rack)
        if rid is None or not info.replicas or not info.replica_paths:
            return self.log(topic, partition)
        return self._open(info, partition, info.replica_paths[partition][info.replicas[partition].index(rid)])

    def _open(self, info: TopicInfo, partition: int, path: Optional[str]) -> PartitionLog:
        topic = info.name
        if path is None:
            raise LeaderNotAvailable(f"partition {topic}-{partition} has no leader right now",
                                     topic=topic, partition=partition)
        # Keyed by path too: after a failover the partition is read from another log.
        key = (info.topic_id, partition, path)
        plog = self._logs.get(key)
        if plog is None:
            with self._lock:
                plog = self._logs.get(key)
                if plog is None:
                    plog = PartitionLog(path, name=f"{topic}-{partition}")
                    self._logs[key] = plog
        return plog

    def prewarm_replicas(self, topic: str) -> None:
        """Map every replica's log of a replicated topic in a background thread,
        so a failover finds the new leader's log mapped (mapping and populating
        a large log takes tens of ms)."""
        info = self.topic(topic)
        if not info.replicated or not info.replica_paths or topic in self._prewarmed:
            return
        self._prewarmed.add(topic)

        def run() -> None:
            for p, paths in enumerate(info.replica_paths or []):
                for path in paths:
                    key = (info.topic_id, p, path)
                    if key in self._logs:
                        continue
                    try:
                        plog = PartitionLog(path, name=f"{topic}-{p}")
                    except Exception:        # a replica being recreated: mapped on demand later
                        continue
                    with self._lock:
                        if key not in self._logs and not self._closed:
                            self._logs[key] = plog
                            continue
                    plog.close()
        threading.Thread(target=run, name="shmq-prewarm", daemon=True).start()

    # --------------------------------------------------------------- offsets
    def offset_slot(self, group: str, topic: str, partition: int) -> int:
        """Index of ``group``'s entry for ``topic``-``partition`` in the shared
        offsets table (one RPC the first time, then cached)."""
        # Cached until the metadata changes: a topic deleted and re-created
        # under the same name gets new entries.
        version = self._view.version()
        if version != self._slots_version:
            self._slots.clear()
            self._slots_version = version
        key = (group, topic, partition)
        idx = self._slots.get(key)
        if idx is None:
            self.topic(topic)  # UnknownTopicOrPartition / InvalidTopic before any RPC
            idx, _ = self._client.offsets_slot(group, topic, partition)
            self._slots[key] = idx
        return idx

    def offsets_table(self) -> Any:
        if self._table is None:
            self._table = self._client.offsets_table()
        return self._table

    def commit_offsets(self, group: str, offsets: Dict[TopicPartition, int], sync: bool,
                       generations: Optional[Dict[TopicPartition, int]] = None) -> None:
        """Store committed offsets for ``group`` in the shared table (no RPC);
        with ``sync``, return only once the coordinator made them durable.

        Fencing: ``generations`` gives the generation in which this member owns
        each partition (a group member); without it the commit is a non-member's
        (generation 0). A partition whose entry names another owner generation
        raises ``CommitFailed`` before anything is stored; the coordinator drops
        a stale store that races with a reassignment."""
        words = self.offsets_table().words
        at = self._table.word_index
        todo = []
        for tp, o in offsets.items():
            idx = self.offset_slot(group, tp[0], tp[1])
            gen = 0 if generations is None else generations.get(tp, -1)
            if gen != words[at(idx, F_GENERATION)]:
                raise CommitFailed(
                    f"group {group!r}: cannot commit {tp[0]}-{tp[1]}: "
                    + ("this consumer does not own it in the group's current generation" if gen != 0 else
                       "the partition is owned by an active member of the group"),
                    topic=tp[0], partition=tp[1])
            if not 0 <= o <= OFFSET_MASK:
                raise InvalidConfig(f"commit offset {o} for {tp[0]}-{tp[1]} is out of range", topic=tp[0])
            todo.append((at(idx, F_OFFSET), (gen << GEN_SHIFT) | o))
        for i, word in todo:
            words[i] = word  # one aligned 8-byte store: see shmq/offsets_table.py
        if sync:
            self._client.sync_offsets()

    def fetch_offsets(self, group: str, partitions: Iterable[TopicPartition]) -> Dict[TopicPartition, int]:
        """Committed offsets of ``group`` (partitions with none are left out)."""
        table = self.offsets_table()
        out = {}
        for tp in partitions:
            o = table.load(self.offset_slot(group, tp[0], tp[1]))
            if o >= 0:
                out[TopicPartition(tp[0], tp[1])] = o
        return out

    @property
    def client(self) -> Any:
        return self._client

    def close(self) -> None:
        with self._lock:
            self._closed = True
            logs = list(self._logs.values())
            self._logs.clear()
        for plog in logs:
            plog.close()
        self._client.close()
