"""Admin: create, delete, list, describe and alter topics, as Kafka's admin clients do.

Every call is one request to the root's coordinator (started on first use if
none runs). Bad input raises the ``shmq.errors`` class Kafka would use
(``InvalidTopic``, ``TopicAlreadyExists``, ``UnknownTopicOrPartition``,
``InvalidConfig``, ``InvalidPartitions``) with a message naming the topic,
and changes nothing. Names are validated here first so obviously bad input
never costs a round trip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Union

from .coordinator.client import CoordinatorClient
from .root import Root, validate_group, validate_topic

__all__ = ["Admin", "TopicDescription", "PartitionDescription", "GroupDescription", "GroupMemberDescription",
           "GroupPartitionDescription"]


@dataclass(frozen=True)
class PartitionDescription:
    """One partition: its offsets (Kafka's log start / log end) and replicas."""

    partition: int
    start_offset: int
    end_offset: int
    leader: int
    leader_epoch: int
    replicas: List[int]
    isr: List[int]
    path: Optional[str]                    # the log clients read (the leader's); None without a leader
    high_watermark: Optional[int] = None   # replicated topics: the end consumers can read
    partition_epoch: Optional[int] = None
    offline: Optional[List[int]] = None    # replicas whose storage failed
    unclean: Optional[Dict[str, Any]] = None  # last unclean election: leader_epoch, dropped (records), ts


@dataclass(frozen=True)
class TopicDescription:
    name: str
    topic_id: str
    partitions: List[PartitionDescription]
    config: Dict[str, Any]

    @property
    def partition_count(self) -> int:
        return len(self.partitions)


@dataclass(frozen=True)
class GroupMemberDescription:
    member_id: str
    client_id: str
    pid: int
    host: str
    group_instance_id: Optional[str]
    assignment: List[Any]                  # [(topic, partition), ...]
    revoking: List[Any]


@dataclass(frozen=True)
class GroupPartitionDescription:
    """Kafka's consumer-groups --describe row."""

    topic: str
    partition: int
    committed: Optional[int]               # CURRENT-OFFSET
    log_end: int                           # LOG-END-OFFSET
    lag: Optional[int]
    member_id: Optional[str]               # CONSUMER-ID
    client_id: Optional[str]
    pid: Optional[int]
    host: Optional[str]
    position: Optional[int] = None         # the owner's live read position (reader table), beyond Kafka's columns


@dataclass(frozen=True)
class GroupDescription:
    group: str
    state: str                             # Empty, Stable, Rebalancing, Dead
    assignor: Optional[str]
    generation: Optional[int]
    members: List[GroupMemberDescription]
    partitions: List[GroupPartitionDescription]


def _description(d: Mapping[str, Any]) -> TopicDescription:
    return TopicDescription(name=d["name"], topic_id=d["topic_id"], config=dict(d["config"]),
                            partitions=[PartitionDescription(**p) for p in d["partitions"]])


class Admin:
    """Topic administration for one root (default: ``$SHMQ_ROOT`` or ``/dev/shm/shmq-<user>``)."""

    def __init__(self, root: Union[str, Root, None] = None, *, timeout: float = 30.0) -> None:
        self._client = CoordinatorClient(root, timeout=timeout)

    @property
    def root(self) -> Root:
        return self._client.root

    def recover_topics(self, directory: str) -> List[Dict[str, Any]]:
        """After the root was lost (a reboot wiped tmpfs), recreate the topics
        whose replica logs survive in ``directory`` (a disk ``replica_dirs``
        entry): that replica leads, the others are rebuilt from it."""
        return list(self._client.call("recover_topics", directory=str(directory)))

    def elect_leaders(self, name: str, partition: Optional[int] = None) -> List[Dict[str, Any]]:
        """Preferred-leader election now for ``name`` (or one partition), when the
        preferred replica is in sync; returns each partition's leader after it."""
        validate_topic(name)
        return list(self._client.call("elect_leaders", topic=name, partition=partition))

    def create_topic(self, name: str, partitions: int = 1, config: Optional[Mapping[str, Any]] = None
                     ) -> TopicDescription:
        """Create ``name`` with ``partitions`` partitions; ``config`` keys as
        ``segment_bytes`` or ``segment.bytes`` (see ``shmq.coordinator.topic_config``)."""
        validate_topic(name)
        return _description(self._client.create_topic(name, partitions, config))

    def delete_topic(self, name: str) -> None:
        """Delete ``name``, its partition logs and its committed offsets."""
        validate_topic(name)
        self._client.delete_topic(name)

    def list_topics(self) -> List[str]:
        """Names of every topic, sorted."""
        return self._client.list_topics()

    def describe_topic(self, name: str) -> TopicDescription:
        """Partitions (with log start and end offsets) and config of ``name``."""
        validate_topic(name)
        return _description(self._client.describe_topic(name))

    def create_partitions(self, name: str, total: int) -> TopicDescription:
        """Grow ``name`` to ``total`` partitions (Kafka's createPartitions)."""
        validate_topic(name)
        return _description(self._client.create_partitions(name, total))

    def alter_config(self, name: str, config: Mapping[str, Any]) -> Dict[str, Any]:
        """Change alterable config keys of ``name``; returns the full new config."""
        validate_topic(name)
        return self._client.alter_config(name, config)

    # ------------------------------------------------------------- groups
    def list_groups(self) -> List[Dict[str, Any]]:
        """Every group with members or committed offsets: {group, state, members, assignor, generation}."""
        return list(self._client.call("list_groups"))

    def describe_group(self, group: str) -> GroupDescription:
        """State, members (client id, pid, host, assignment) and per partition the
        committed offset, log-end offset, lag and owner."""
        validate_group(group)
        d = self._client.call("describe_group", group=group)
        return GroupDescription(
            group=d["group"], state=d["state"], assignor=d["assignor"], generation=d["generation"],
            members=[GroupMemberDescription(m["member_id"], m["client_id"], m["pid"], m["host"],
                                            m["group_instance_id"], [tuple(x) for x in m["assignment"]],
                                            [tuple(x) for x in m["revoking"]]) for m in d["members"]],
            partitions=[GroupPartitionDescription(**p) for p in d["partitions"]])

    def delete_group(self, group: str) -> None:
        """Delete an empty group's committed offsets (refused while it has members)."""
        validate_group(group)
        self._client.call("delete_group", group=group)

    def reset_offsets(self, group: str, to: str, *, topics: Optional[List[str]] = None,
                      partitions: Optional[List[Any]] = None, value: Optional[int] = None,
                      dry_run: bool = False) -> Dict[Any, int]:
        """Reset an empty group's committed offsets to ``earliest``, ``latest``,
        ``offset`` (``value``, clamped to the log) or ``timestamp`` (``value`` in
        ms: the first offset at or after it). Default scope: every partition
        the group committed; else ``topics`` or ``partitions`` [(topic, p)].
        Returns {(topic, partition): new offset}."""
        validate_group(group)
        res = self._client.call("reset_offsets", group=group, to=to, topics=topics,
                                partitions=None if partitions is None else [list(tp) for tp in partitions],
                                value=value, dry_run=dry_run)
        return {(t, p): off for t, p, off in res}

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Admin":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
