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
ALTERABLE = ("max_message_bytes",)
DEFAULTS: Dict[str, Any] = {**dataclasses.asdict(LogConfig()), "max_message_bytes": None}


def _key(k: object) -> str:
    if not isinstance(k, str):
        raise InvalidConfig(f"config keys must be str, got {k!r}")
    return k.replace(".", "_")


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
    return out


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
