"""The metadata state machine: topics, committed offsets, producer ids.

Contract: every change is a record (a JSON-safe dict with an ``"op"``).
``prepare_*`` methods validate a request against the current state and
return the record to journal (they never change state and raise the Kafka
error on bad input); ``apply(record)`` changes state and is deterministic:
everything non-deterministic (topic ids, timestamps, allocated ids) is
decided by ``prepare_*`` and carried in the record, so replaying the journal
rebuilds exactly the same state. ``state()`` / ``Store(state)`` convert to
and from the snapshot form. Not thread-safe: the server serialises calls.

State shape (JSON-safe, partitions and offsets keyed by str(partition))::

    topics:  {name: {topic_id, created_ms, config, partitions: [
                {replicas: [0], leader: 0, leader_epoch: 0, isr: [0], partition_epoch: 0}, ...]}}

Replication factor 1 keeps one replica (id 0) hosted by the coordinator.
With more, ``replicas`` lists replica-process ids (the first is the
preferred leader), ``leader`` is -1 while the partition has none, and every
leader or ISR change is a ``partition_state`` record with a new
``partition_epoch`` (and a new ``leader_epoch`` when the leader changed).
    offsets: {group: {topic: {"<p>": [offset, metadata, commit_ms]}}}
    next_producer_id: int
    transactional_ids: {transactional_id: [producer_id, epoch]}
    offset_slots: {"<group>/<topic>/<p>": index in the shared offsets table}
    transactions: {transactional_id: {pid, epoch, state, timeout_ms, start_ms, updated_ms,
                   partitions: {"<topic>/<p>": start offset}, offsets: {group: {"<topic>/<p>":
                   [offset, metadata, generation]}}}}   (``transactions.py``; a ``txn`` record
                   carries the whole new entry)
"""
from __future__ import annotations

import copy
import time
import uuid
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple

from ..errors import (InvalidPartitions, InvalidRequest, TopicAlreadyExists, UnknownTopicOrPartition)
from ..root import validate_group, validate_topic
from .topic_config import merge_alter, normalize_config

__all__ = ["Store", "MAX_PARTITIONS", "OffsetCommit", "slot_key", "split_slot_key"]

MAX_PARTITIONS = 10_000
MAX_METADATA_CHARS = 4096
Record = Dict[str, Any]
OffsetCommit = Tuple[str, int, int, str]      # topic, partition, offset, metadata


def slot_key(group: str, topic: str, partition: int) -> str:
    """Key of an offsets-table slot in the state ('/' is in no valid name)."""
    return f"{group}/{topic}/{partition}"


def split_slot_key(key: str) -> Tuple[str, str, int]:
    group, topic, p = key.split("/")
    return group, topic, int(p)


def slot_key_topic(key: str) -> str:
    return key.split("/")[1]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _partition_meta(replicas: Optional[List[int]] = None) -> Dict[str, Any]:
    replicas = list(replicas) if replicas else [0]
    return {"replicas": replicas, "leader": replicas[0], "leader_epoch": 0, "isr": list(replicas),
            "partition_epoch": 0}


def assign_replicas(first: int, last: int, replication_factor: int, processes: int) -> List[List[int]]:
    """Replica ids of partitions ``first..last-1``, Kafka's round robin: the
    preferred leaders rotate over the processes, every partition's replicas
    are distinct processes."""
    if replication_factor <= 1:
        return [[0] for _ in range(first, last)]
    n = max(processes, replication_factor)
    return [[(p + k) % n for k in range(replication_factor)] for p in range(first, last)]


def _check_int(v: object, what: str, lo: int, hi: int, exc: type = InvalidRequest,
               topic: Optional[str] = None) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise exc(f"{what} must be an int, got {type(v).__name__}", topic=topic)
    if not lo <= v <= hi:
        raise exc(f"{what}={v} is out of range [{lo}, {hi}]", topic=topic)
    return v


class Store:
    """In-memory metadata, changed only through ``apply``."""

    def __init__(self, state: Optional[Mapping[str, Any]] = None) -> None:
        s = copy.deepcopy(dict(state)) if state else {}
        self.topics: Dict[str, Dict[str, Any]] = s.get("topics", {})
        self.offsets: Dict[str, Dict[str, Dict[str, List[Any]]]] = s.get("offsets", {})
        self.next_producer_id: int = s.get("next_producer_id", 1000)
        self.transactional_ids: Dict[str, List[int]] = s.get("transactional_ids", {})
        self.offset_slots: Dict[str, int] = s.get("offset_slots", {})
        self.transactions: Dict[str, Dict[str, Any]] = s.get("transactions", {})

    def state(self) -> Dict[str, Any]:
        """The snapshot form (shares structure with the store: encode it at once)."""
        return {"topics": self.topics, "offsets": self.offsets,
                "next_producer_id": self.next_producer_id, "transactional_ids": self.transactional_ids,
                "offset_slots": self.offset_slots, "transactions": self.transactions}

    # ---------------------------------------------------------------- queries
    def topic(self, name: str) -> Dict[str, Any]:
        """The topic's metadata, or ``UnknownTopicOrPartition``."""
        validate_topic(name)
        t = self.topics.get(name)
        if t is None:
            raise UnknownTopicOrPartition(f"unknown topic {name!r}", topic=name)
        return t

    def check_partition(self, topic: str, partition: object) -> int:
        t = self.topic(topic)
        n = len(t["partitions"])
        if not isinstance(partition, int) or isinstance(partition, bool) or not 0 <= partition < n:
            raise UnknownTopicOrPartition(f"unknown partition {topic}-{partition} (topic {topic!r} has "
                                          f"{n} partitions)", topic=topic,
                                          partition=partition if isinstance(partition, int) else None)
        return partition

    def fetch_offsets(self, group: str, partitions: Optional[Iterable[Tuple[str, int]]] = None
                      ) -> List[Tuple[str, int, int, str]]:
        """Committed (topic, partition, offset, metadata) of ``group``; offset -1
        for a requested partition without a commit. ``None``: all of them."""
        validate_group(group)
        g = self.offsets.get(group, {})
        if partitions is None:
            return [(t, int(p), e[0], e[1]) for t, ps in sorted(g.items())
                    for p, e in sorted(ps.items(), key=lambda kv: int(kv[0]))]
        out = []
        for topic, p in partitions:
            self.check_partition(topic, p)
            e = g.get(topic, {}).get(str(p))
            out.append((topic, p, e[0], e[1]) if e else (topic, p, -1, ""))
        return out

    def committed(self, group: str, topic: str, partition: int) -> Optional[Tuple[int, str]]:
        """(offset, metadata) committed by ``group``, or None."""
        e = self.offsets.get(group, {}).get(topic, {}).get(str(partition))
        return (e[0], e[1]) if e else None

    def committed_min(self, topic: str, partition: int) -> Optional[int]:
        """Lowest committed offset of any group for the partition (None: no commits)."""
        key = str(partition)
        vals = [ps[topic][key][0] for ps in self.offsets.values() if topic in ps and key in ps[topic]]
        return min(vals) if vals else None

    # ---------------------------------------------------------------- prepare
    def replica_processes(self) -> int:
        """How many replica processes the replicated topics need (0: none)."""
        ids = [r for t in self.topics.values() if t["config"].get("replication_factor", 1) > 1
               for pm in t["partitions"] for r in pm["replicas"]]
        return max(ids) + 1 if ids else 0

    def prepare_create_topic(self, name: str, partitions: int, config: Optional[Mapping[str, Any]],
                             topic_id: Optional[str] = None, assignment: Optional[List[List[int]]] = None) -> Record:
        """``topic_id`` / ``assignment``: a topic recovered from a replica's files keeps both."""
        validate_topic(name)
        _check_int(partitions, f"partitions of topic {name!r}", 1, MAX_PARTITIONS, InvalidPartitions, name)
        if name in self.topics:
            raise TopicAlreadyExists(f"topic {name!r} already exists", topic=name)
        cfg = normalize_config(config, topic=name)
        return {"op": "create_topic", "name": name, "topic_id": topic_id or uuid.uuid4().hex, "partitions": partitions,
                "config": cfg, "ts": _now_ms(),
                "assignment": assignment or assign_replicas(0, partitions, cfg["replication_factor"],
                                                            self.replica_processes())}

    def prepare_delete_topic(self, name: str) -> Record:
        self.topic(name)
        return {"op": "delete_topic", "name": name}

    def prepare_create_partitions(self, name: str, total: int) -> Record:
        t = self.topic(name)
        have = len(t["partitions"])
        _check_int(total, f"partition count of topic {name!r}", 1, MAX_PARTITIONS, InvalidPartitions, name)
        if total <= have:
            raise InvalidPartitions(f"topic {name!r} has {have} partitions; the new total {total} must be "
                                    f"larger (partitions cannot be removed)", topic=name)
        return {"op": "create_partitions", "name": name, "total": total,
                "assignment": assign_replicas(have, total, t["config"].get("replication_factor", 1),
                                              self.replica_processes())}

    def prepare_partition_state(self, name: str, partition: int, *, leader: int, isr: List[int],
                                new_leader_epoch: bool, reason: str, dropped: int = 0,
                                min_epoch: int = 0) -> Record:
        """A leader and/or ISR change of a replicated partition (always a new partition epoch)."""
        pm = self.topic(name)["partitions"][self.check_partition(name, partition)]
        epoch = pm["leader_epoch"] + (1 if new_leader_epoch else 0)
        return {"op": "partition_state", "name": name, "partition": partition, "leader": leader,
                "isr": sorted(isr), "leader_epoch": max(epoch, min_epoch),
                "partition_epoch": pm.get("partition_epoch", 0) + 1, "reason": reason, "dropped": dropped,
                "ts": _now_ms()}

    def prepare_alter_config(self, name: str, changes: Mapping[str, Any]) -> Record:
        t = self.topic(name)
        return {"op": "alter_config", "name": name, "config": merge_alter(t["config"], changes, topic=name)}

    def prepare_commit_offsets(self, group: str, offsets: Iterable[Any], monotonic: bool = False
                               ) -> Tuple[Optional[Record], List[Tuple[str, int, int, str]]]:
        """Validate commits ``[(topic, partition, offset[, metadata])]``.

        With ``monotonic``, a commit below the stored offset is ignored (the
        stored one stays). Returns the record (None if nothing changes) and the
        offsets stored afterwards, one per requested partition.
        """
        validate_group(group)
        g = self.offsets.get(group, {})
        batch: Dict[Tuple[str, int], Tuple[int, str]] = {}
        if not isinstance(offsets, (list, tuple)):
            raise InvalidRequest(f"offsets must be a list, got {type(offsets).__name__}")
        for item in offsets:
            if not isinstance(item, (list, tuple)) or len(item) not in (3, 4):
                raise InvalidRequest(f"each offset commit is (topic, partition, offset[, metadata]), got {item!r}")
            topic, p, off = item[0], item[1], item[2]
            meta = item[3] if len(item) == 4 and item[3] is not None else ""
            self.check_partition(topic, p)
            _check_int(off, f"committed offset for {topic}-{p}", 0, (1 << 63) - 1, InvalidRequest, topic)
            if not isinstance(meta, str) or len(meta) > MAX_METADATA_CHARS:
                raise InvalidRequest(f"offset metadata for {topic}-{p} must be a str of at most "
                                     f"{MAX_METADATA_CHARS} characters", topic=topic)
            batch[(topic, p)] = (off, meta)
        out, changes = [], []
        for (topic, p), (off, meta) in batch.items():
            cur = g.get(topic, {}).get(str(p))
            if monotonic and cur is not None and off < cur[0]:
                out.append((topic, p, cur[0], cur[1]))
                continue
            out.append((topic, p, off, meta))
            if cur is None or cur[0] != off or cur[1] != meta:
                changes.append([topic, p, off, meta])
        rec = {"op": "commit_offsets", "group": group, "offsets": changes, "ts": _now_ms()} if changes else None
        return rec, out

    def prepare_allocate_producer_id(self, transactional_id: Optional[str] = None) -> Record:
        if transactional_id is not None:
            if not isinstance(transactional_id, str) or not transactional_id:
                raise InvalidRequest("transactional_id must be a non-empty str or None")
            cur = self.transactional_ids.get(transactional_id)
            if cur is not None:
                return {"op": "allocate_producer_id", "transactional_id": transactional_id,
                        "producer_id": cur[0], "epoch": cur[1] + 1}
        # Never below the wall clock in microseconds: a root rebuilt from a
        # disk replica (recover_topics) must not hand out an id that the
        # recovered producer-state tables already know.
        return {"op": "allocate_producer_id", "transactional_id": transactional_id,
                "producer_id": max(self.next_producer_id, time.time_ns() // 1000), "epoch": 0}

    def prepare_offset_slot(self, group: str, topic: str, partition: int, index: int) -> Record:
        """Record that ``(group, topic, partition)`` commits through table entry ``index``."""
        validate_group(group)
        self.check_partition(topic, partition)
        return {"op": "offset_slot", "group": group, "topic": topic, "partition": partition, "index": index}

    def prepare_delete_group(self, group: str) -> Record:
        """Forget ``group``'s committed offsets and offsets-table slots."""
        validate_group(group)
        return {"op": "delete_group", "group": group}

    # ------------------------------------------------------------------ apply
    def apply(self, rec: Record) -> None:
        """Apply one journal record (deterministic; records were validated by prepare_*)."""
        op = rec["op"]
        if op == "create_topic":
            self.topics[rec["name"]] = {"topic_id": rec["topic_id"], "created_ms": rec["ts"],
                                        "config": rec["config"],
                                        "partitions": [_partition_meta(a) for a in
                                                       rec.get("assignment") or [None] * rec["partitions"]]}
        elif op == "delete_topic":
            name = rec["name"]
            self.topics.pop(name, None)
            for group in list(self.offsets):
                self.offsets[group].pop(name, None)
                if not self.offsets[group]:
                    del self.offsets[group]
            for key in [k for k in self.offset_slots if slot_key_topic(k) == name]:
                del self.offset_slots[key]
        elif op == "create_partitions":
            parts = self.topics[rec["name"]]["partitions"]
            parts.extend(_partition_meta(a) for a in rec.get("assignment") or [None] * (rec["total"] - len(parts)))
        elif op == "partition_state":
            pm = self.topics[rec["name"]]["partitions"][rec["partition"]]
            pm.update(leader=rec["leader"], isr=list(rec["isr"]), leader_epoch=rec["leader_epoch"],
                      partition_epoch=rec["partition_epoch"])
            if rec.get("dropped"):
                pm["unclean"] = {"leader_epoch": rec["leader_epoch"], "dropped": rec["dropped"], "ts": rec["ts"]}
        elif op == "alter_config":
            self.topics[rec["name"]]["config"] = rec["config"]
        elif op == "commit_offsets":
            committed = self.offsets.setdefault(rec["group"], {})
            for topic, p, off, meta in rec["offsets"]:
                committed.setdefault(topic, {})[str(p)] = [off, meta, rec["ts"]]
        elif op == "delete_group":
            self.offsets.pop(rec["group"], None)
            for key in [k for k in self.offset_slots if split_slot_key(k)[0] == rec["group"]]:
                del self.offset_slots[key]
        elif op == "offset_slot":
            self.offset_slots[slot_key(rec["group"], rec["topic"], rec["partition"])] = rec["index"]
        elif op == "allocate_producer_id":
            pid, tid = rec["producer_id"], rec["transactional_id"]
            self.next_producer_id = max(self.next_producer_id, pid + 1)
            if tid is not None:
                self.transactional_ids[tid] = [pid, rec["epoch"]]
        elif op == "txn":
            if rec["txn"] is None:
                self.transactions.pop(rec["tid"], None)
            else:
                self.transactions[rec["tid"]] = copy.deepcopy(rec["txn"])
        else:
            raise ValueError(f"unknown metadata record op {op!r}")
