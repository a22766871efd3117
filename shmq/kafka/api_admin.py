"""Kafka APIs about the cluster and its topics: ApiVersions, Metadata,
FindCoordinator, InitProducerId, CreateTopics, DeleteTopics,
CreatePartitions, DescribeConfigs, SaslHandshake, SaslAuthenticate.

The listener presents the root as a cluster whose node 0 (the listener's
address) leads every partition: a replicated shmq topic's replicas live on
this host and the listener always writes to and reads from the current
leader's log. The only other brokers are follower-read ones (KIP-392, see
``server.py``): a follower replica with a rack in ``replica_racks`` is listed
among the partition's replicas (and in-sync replicas while it is in sync) as
its own node. Topic administration goes to the coordinator.
"""
from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..errors import (InvalidConfig, InvalidPartitions, ShmqError, TopicAlreadyExists, UnknownTopicOrPartition)
from .codec import SUPPORTED, error_code_for
from .sasl import MECHANISMS

if TYPE_CHECKING:
    from .server import Connection

log = logging.getLogger("shmq.kafka")

NO_AUTH_OPS = -2147483648          # authorized operations not computed
TRANSACTIONAL_ID_AUTHORIZATION_FAILED = 53
COORDINATOR_NOT_AVAILABLE = 15
UNKNOWN_TOPIC_ID = 100

# shmq topic configs shown under Kafka's names (DescribeConfigs).
KAFKA_CONFIG_NAMES = {
    "max_message_bytes": "max.message.bytes", "segment_bytes": "segment.bytes",
    "min_insync_replicas": "min.insync.replicas", "unclean_leader_election": "unclean.leader.election.enable",
    "replica_lag_time_max_ms": "replica.lag.time.max.ms", "flush_messages": "flush.messages",
    "flush_ms": "flush.ms", "index_interval_bytes": "index.interval.bytes",
}


def api_versions(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    return {"error_code": 0, "api_keys": [{"api_key": k, "min_version": lo, "max_version": hi}
                                          for k, (lo, hi) in sorted(SUPPORTED.items())]}


def _topic_uuid(topic_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(hex=topic_id)
    except ValueError:              # not a hex uuid: a stable one derived from it
        return uuid.uuid5(uuid.NAMESPACE_URL, f"shmq-topic:{topic_id}")


def ensure_topic(conn: "Connection", name: str, auto_create: bool) -> Any:
    """The topic's ``TopicInfo``; created (Kafka's auto.create.topics.enable) when allowed."""
    cluster = conn.listener.cluster
    try:
        return cluster.topic(name)
    except UnknownTopicOrPartition:
        if not (auto_create and conn.listener.auto_create_topics):
            raise
    try:
        cluster.client.create_topic(name, partitions=conn.listener.default_partitions)
        log.info("kafka listener: created topic %s for %s (auto.create.topics.enable)", name, conn.client_id)
    except TopicAlreadyExists:
        pass
    deadline = time.monotonic() + 5.0
    while True:
        try:
            return cluster.topic(name)
        except UnknownTopicOrPartition:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def _topic_metadata(conn: "Connection", name: str, auto_create: bool) -> Dict[str, Any]:
    try:
        info = ensure_topic(conn, name, auto_create)
    except ShmqError as e:
        return {"error_code": error_code_for(e), "name": name, "topic_id": uuid.UUID(int=0), "is_internal": False,
                "partitions": [], "topic_authorized_operations": NO_AUTH_OPS}
    parts = []
    racks = (info.config.get("replica_racks") or {}) if info.replicated and info.replicas and info.isr else {}
    for p in range(info.partitions):
        has_leader = info.paths[p] is not None
        epoch = info.leader_epochs[p] if info.leader_epochs else 0
        replicas, isr = [0], [0] if has_leader else []
        if racks:
            leader = info.leaders[p] if info.leaders else -1
            followers = [r for r in info.replicas[p] if r != leader and str(r) in racks]
            replicas += [conn.listener.replica_node(r) for r in followers]
            isr += [conn.listener.replica_node(r) for r in followers if r in info.isr[p]]
        parts.append({"error_code": 0 if has_leader else 5, "partition_index": p,
                      "leader_id": 0 if has_leader else -1, "leader_epoch": epoch,
                      "replica_nodes": replicas, "isr_nodes": isr, "offline_replicas": []})
    return {"error_code": 0, "name": name, "topic_id": _topic_uuid(info.topic_id), "is_internal": False,
            "partitions": parts, "topic_authorized_operations": NO_AUTH_OPS}


def metadata(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    L = conn.listener
    cluster = L.cluster
    wanted = req.topics
    if wanted is None or (version == 0 and not wanted):
        names = cluster.topics()
        auto = False
    else:
        names = []
        by_id = None
        for t in wanted:
            if t.name is not None:
                names.append(t.name)
                continue
            if by_id is None:
                by_id = _names_by_id(cluster)
            names.append(by_id.get(getattr(t, "topic_id", None), ""))
        auto = bool(getattr(req, "allow_auto_topic_creation", True))
    topics = []
    for n in names:
        if not n:
            topics.append({"error_code": UNKNOWN_TOPIC_ID, "name": "", "topic_id": uuid.UUID(int=0),
                           "partitions": []})
            continue
        topics.append(_topic_metadata(conn, n, auto))
    return {"brokers": L.brokers(),
            "cluster_id": L.cluster_id, "controller_id": L.node_id, "topics": topics,
            "cluster_authorized_operations": NO_AUTH_OPS}


def find_coordinator(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    L = conn.listener
    keys = list(getattr(req, "coordinator_keys", ()) or ()) if version >= 4 else [req.key]
    key_type = getattr(req, "key_type", 0)
    out = []
    for k in keys:
        if key_type == 0:
            out.append({"key": k, "node_id": L.node_id, "host": L.advertised_host, "port": L.port,
                        "error_code": 0, "error_message": None})
        else:   # transactions: shmq's listener has no transaction coordinator
            out.append({"key": k, "node_id": -1, "host": "", "port": -1, "error_code": COORDINATOR_NOT_AVAILABLE,
                        "error_message": "the shmq Kafka listener does not coordinate transactions"})
    if version >= 4:
        return {"coordinators": out}
    first = out[0] if out else {"node_id": -1, "host": "", "port": -1, "error_code": COORDINATOR_NOT_AVAILABLE,
                                "error_message": None}
    return dict(first)


def init_producer_id(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    if req.transactional_id is not None:
        return {"error_code": TRANSACTIONAL_ID_AUTHORIZATION_FAILED, "producer_id": -1, "producer_epoch": -1}
    pid, epoch = conn.listener.cluster.client.allocate_producer_id(None)
    return {"error_code": 0, "producer_id": pid, "producer_epoch": epoch}


def _config_value(v: str) -> Any:
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


def _per_item(res: Dict[str, Any], act: Callable[[Dict[str, Any]], None]) -> Dict[str, Any]:
    """``act(res)`` for one topic or resource of a request; a shmq error
    becomes that item's error code and message, the others go on."""
    try:
        act(res)
    except ShmqError as e:
        res.update(error_code=error_code_for(e), error_message=str(e))
    return res


def _names_by_id(cluster: Any) -> Dict[uuid.UUID, str]:
    return {_topic_uuid(cluster.topic(n).topic_id): n for n in cluster.topics()}


def _no_assignments(assignments: Any) -> None:
    if assignments:
        raise InvalidConfig("manual replica assignment is not supported: shmq places replicas itself")


def create_topics(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    L = conn.listener
    validate_only = bool(getattr(req, "validate_only", False))

    def create(t: Any, res: Dict[str, Any]) -> None:
        _no_assignments(t.assignments)
        n = t.num_partitions if t.num_partitions > 0 else L.default_partitions
        config = {c.name: _config_value(c.value) for c in t.configs if c.value is not None}
        if t.replication_factor > 0:
            config["replication_factor"] = int(t.replication_factor)
        if validate_only:
            from ..coordinator.topic_config import normalize_config
            from ..root import validate_topic
            validate_topic(t.name)
            if t.name in L.cluster.topics():
                raise TopicAlreadyExists(f"topic {t.name!r} already exists")
            normalize_config(config, topic=t.name)
        else:
            d = L.cluster.client.create_topic(t.name, partitions=n, config=config)
            if d.get("topic_id"):
                res["topic_id"] = _topic_uuid(str(d["topic_id"]))
        res.update(num_partitions=n, replication_factor=int(config.get("replication_factor", 1)))
    return {"topics": [_per_item({"name": t.name, "topic_id": uuid.UUID(int=0), "error_code": 0,
                                  "error_message": None, "num_partitions": -1, "replication_factor": -1,
                                  "configs": []}, lambda res, t=t: create(t, res)) for t in req.topics]}


def delete_topics(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    cluster = conn.listener.cluster
    if version >= 6:
        items = [(t.name, getattr(t, "topic_id", None)) for t in req.topics]
    else:
        items = [(n, None) for n in req.topic_names]

    def delete(name: Optional[str], tid: Any, res: Dict[str, Any]) -> None:
        if name is None:
            name = _names_by_id(cluster).get(tid)
            if name is None:
                res["error_code"] = UNKNOWN_TOPIC_ID
                return
            res["name"] = name
        cluster.client.delete_topic(name)
    return {"responses": [_per_item({"name": name, "topic_id": tid or uuid.UUID(int=0), "error_code": 0,
                                     "error_message": None}, lambda res, n=name, i=tid: delete(n, i, res))
                          for name, tid in items]}


def create_partitions(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    cluster = conn.listener.cluster

    def grow(t: Any, res: Dict[str, Any]) -> None:
        _no_assignments(t.assignments)
        if req.validate_only:
            have = cluster.topic(t.name).partitions
            if t.count <= have:
                raise InvalidPartitions(f"topic {t.name!r} has {have} partitions; {t.count} is not more")
        else:
            cluster.client.create_partitions(t.name, t.count)
    return {"results": [_per_item({"name": t.name, "error_code": 0, "error_message": None},
                                  lambda res, t=t: grow(t, res)) for t in req.topics]}


def describe_configs(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    cluster = conn.listener.cluster

    def describe(r: Any, res: Dict[str, Any]) -> None:
        if r.resource_type == 2:         # TOPIC
            res["configs"] = _topic_configs(cluster.topic(r.resource_name).config, r.configuration_keys)
        elif r.resource_type != 4:       # BROKER: nothing configurable over the wire
            res.update(error_code=42, error_message=f"resource type {r.resource_type} is not described")
    return {"results": [_per_item({"error_code": 0, "error_message": None, "resource_type": r.resource_type,
                                   "resource_name": r.resource_name, "configs": []},
                                  lambda res, r=r: describe(r, res)) for r in req.resources]}


def _topic_configs(config: Dict[str, Any], keys: Optional[List[str]]) -> List[Dict[str, Any]]:
    from ..coordinator.topic_config import DEFAULTS
    out = []
    for k in sorted(config):
        name = KAFKA_CONFIG_NAMES.get(k, k.replace("_", "."))
        if keys is not None and name not in keys and k not in keys:
            continue
        v = config[k]
        value = None if v is None else (str(v).lower() if isinstance(v, bool) else str(v))
        default = DEFAULTS.get(k) == v
        out.append({"name": name, "value": value, "read_only": False, "is_default": default,
                    "config_source": 5 if default else 1,   # DEFAULT_CONFIG / DYNAMIC_TOPIC_CONFIG
                    "is_sensitive": False, "synonyms": [], "config_type": 0, "documentation": None})
    return out


def sasl_handshake(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    return {"error_code": conn.sasl.handshake(req.mechanism, version), "mechanisms": list(MECHANISMS)}


def sasl_authenticate(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    if conn.sasl.authenticated or conn.sasl.mechanism is None:
        conn.sasl.failed = True
        return {"error_code": 34, "error_message": "SaslAuthenticate without a SaslHandshake first",
                "auth_bytes": b""}
    if conn.sasl.check_plain(req.auth_bytes):
        log.info("kafka listener: %s authenticated as %s", conn.peer, conn.sasl.user)
        return {"error_code": 0, "error_message": None, "auth_bytes": b"", "session_lifetime": 0}
    log.warning("kafka listener: SASL/PLAIN authentication from %s failed", conn.peer)
    return {"error_code": 58, "error_message": "Authentication failed: Invalid username or password",
            "auth_bytes": b""}


HANDLERS = {18: api_versions, 3: metadata, 10: find_coordinator, 22: init_producer_id, 19: create_topics,
            20: delete_topics, 37: create_partitions, 32: describe_configs, 17: sasl_handshake,
            36: sasl_authenticate}

