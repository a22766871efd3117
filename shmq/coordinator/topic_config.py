"""Topic configuration: the partition-log layout (``LogConfig``) plus topic-level limits.

Contract: ``normalize_config(user_dict)`` returns a complete, validated plain
dict (JSON-safe, every key present) or raises ``InvalidConfig`` naming the key.
Keys may be written Kafka-style (``"segment.bytes"``) or Python-style
(``"segment_bytes"``). Layout keys are fixed once partitions exist (their
files were sized from them); ``alter_config`` may change only ``ALTERABLE``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

from ..errors import InvalidConfig
from ..ringlog import LogConfig

__all__ = ["DEFAULTS", "LAYOUT_KEYS", "ALTERABLE", "normalize_config", "log_config", "merge_alter"]

LAYOUT_KEYS = tuple(f.name for f in dataclasses.fields(LogConfig))
KAFKA_MAX_MESSAGE_BYTES = 1048588
FRAME_SLACK = 128            # frame header + batch header + record overhead, rounded up
MAX_REPLICATION_FACTOR = 8   # SHMQ_MAX_REPLICAS in log.h: one LEO slot per replica in the control block
# Replication keys (Kafka's names); ``replica_dirs`` maps a replica process id
# (str) to the base directory holding that replica's logs of this topic (e.g. a
# disk path while the leader lives in tmpfs); ``flush_messages`` / ``flush_ms``
# make such a replica msync before it reports records as replicated.
# ``replica_racks`` maps a replica process id (str) to its rack (Kafka's
# broker.rack): a consumer with ``client_rack`` reads from an in-sync replica
# in its rack (KIP-392 follower fetching), else from the leader.
REPLICATION_DEFAULTS: Dict[str, Any] = {
    "replication_factor": 1, "min_insync_replicas": 1, "unclean_leader_election": False,
    "replica_lag_time_max_ms": 10_000, "flush_messages": None, "flush_ms": None, "replica_dirs": None,
    "replica_racks": None,
}
ALTERABLE = ("max_message_bytes", "min_insync_replicas", "unclean_leader_election", "replica_lag_time_max_ms",
             "flush_messages", "flush_ms", "replica_racks")
DEFAULTS: Dict[str, Any] = {**dataclasses.asdict(LogConfig()), "max_message_bytes": None, **REPLICATION_DEFAULTS}


_ALIASES = {"unclean_leader_election_enable": "unclean_leader_election", "replica_lag_time_max": "replica_lag_time_max_ms"}


def _key(k: object) -> str:
    if not isinstance(k, str):
        raise InvalidConfig(f"config keys must be str, got {k!r}")
    key = k.replace(".", "_")
    return _ALIASES.get(key, key)


def normalize_config(config: Optional[Mapping[str, Any]], base: Optional[Mapping[str, Any]] = None,
                     *, topic: Optional[str] = None) -> Dict[str, Any]:
    """Validate ``config`` over ``base`` (default: DEFAULTS) and return the full config."""
    if config is not None and not isinstance(config, Mapping):
        raise InvalidConfig(f"config must be a dict, got {type(config).__name__}", topic=topic)
    out: Dict[str, Any] = dict(base if base is not None else DEFAULTS)
    explicit_max = base is not None and base.get("max_message_bytes") is not None
    for k, v in (config or {}).items():
        key = _key(k)
        if key not in DEFAULTS:
            raise InvalidConfig(f"unknown topic config {k!r} (known: {', '.join(sorted(DEFAULTS))})",
                                topic=topic)
        out[key] = v
        if key == "max_message_bytes":
            explicit_max = True
    layout = {k: out[k] for k in LAYOUT_KEYS}
    try:
        lc = LogConfig(**layout)
    except InvalidConfig as e:
        raise InvalidConfig(f"topic {topic!r}: {e}" if topic else str(e), topic=topic) from None
    room = lc.segment_bytes - FRAME_SLACK
    mmb = out["max_message_bytes"]
    if mmb is None or not explicit_max:
        mmb = min(KAFKA_MAX_MESSAGE_BYTES, room)
    if not isinstance(mmb, int) or isinstance(mmb, bool):
        raise InvalidConfig(f"max_message_bytes must be an int, got {type(mmb).__name__}", topic=topic)
    if not 1 <= mmb <= room:
        raise InvalidConfig(f"max_message_bytes={mmb} is out of range [1, {room}] "
                            f"(a record must fit in one segment of {lc.segment_bytes} bytes)", topic=topic)
    out["max_message_bytes"] = mmb
    _check_replication(out, topic)
    return out


def _int_in(out: Dict[str, Any], key: str, lo: int, hi: int, topic: Optional[str], optional: bool = False) -> None:
    v = out[key]
    if optional and v is None:
        return
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise InvalidConfig(f"{key}={v!r} must be an int in [{lo}, {hi}]", topic=topic)


def _check_replication(out: Dict[str, Any], topic: Optional[str]) -> None:
    from ..errors import InvalidReplicationFactor
    rf = out["replication_factor"]
    if not isinstance(rf, int) or isinstance(rf, bool) or not 1 <= rf <= MAX_REPLICATION_FACTOR:
        raise InvalidReplicationFactor(f"replication_factor={rf!r} must be an int in [1, {MAX_REPLICATION_FACTOR}]",
                                       topic=topic)
    _int_in(out, "min_insync_replicas", 1, rf, topic)
    _int_in(out, "replica_lag_time_max_ms", 1, 3_600_000, topic)
    _int_in(out, "flush_messages", 1, 1 << 40, topic, optional=True)
    _int_in(out, "flush_ms", 0, 3_600_000, topic, optional=True)
    if out["unclean_leader_election"] in ("true", "false"):     # from the command line
        out["unclean_leader_election"] = out["unclean_leader_election"] == "true"
    if not isinstance(out["unclean_leader_election"], bool):
        raise InvalidConfig(f"unclean_leader_election must be a bool, got {out['unclean_leader_election']!r}",
                            topic=topic)
    dirs = out["replica_dirs"]
    if dirs is not None:
        if not isinstance(dirs, Mapping) or not all(
                isinstance(k, str) and k.isdigit() and int(k) < MAX_REPLICATION_FACTOR
                and isinstance(v, str) and v.startswith("/") for k, v in dirs.items()):
            raise InvalidConfig("replica_dirs must map replica ids ('0'..'7') to absolute directory paths, "
                                f"got {dirs!r}", topic=topic)
        out["replica_dirs"] = {str(k): str(v) for k, v in dirs.items()}
    racks = out["replica_racks"]
    if racks is not None:
        if not isinstance(racks, Mapping) or not all(
                isinstance(k, str) and k.isdigit() and int(k) < MAX_REPLICATION_FACTOR
                and isinstance(v, str) and v for k, v in racks.items()):
            raise InvalidConfig("replica_racks must map replica ids ('0'..'7') to non-empty rack names, "
                                f"got {racks!r}", topic=topic)
        out["replica_racks"] = {str(k): str(v) for k, v in racks.items()}


def merge_alter(current: Mapping[str, Any], changes: Mapping[str, Any], *, topic: str) -> Dict[str, Any]:
    """The config after ``alter_config(changes)``; layout keys may not change."""
    if not isinstance(changes, Mapping):
        raise InvalidConfig(f"config must be a dict, got {type(changes).__name__}", topic=topic)
    for k, v in changes.items():
        key = _key(k)
        if key in LAYOUT_KEYS and key in current and current[key] != v:
            raise InvalidConfig(f"topic {topic!r}: {key} is fixed when the partition logs are created "
                                f"(is {current[key]!r}); alterable: {', '.join(ALTERABLE)}", topic=topic)
    return normalize_config(changes, current, topic=topic)


def log_config(config: Mapping[str, Any]) -> LogConfig:
    """The ``LogConfig`` of a normalized topic config."""
    return LogConfig(**{k: config[k] for k in LAYOUT_KEYS})
