"""Records as a Kafka user sees them: Message, TopicPartition, RecordMetadata.

All three are tuples (cheap to build in bulk) with named fields, shaped like
kafka-python's ConsumerRecord / TopicPartition / RecordMetadata.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Tuple

Header = Tuple[str, Optional[bytes]]


class TopicPartition(NamedTuple):
    topic: str
    partition: int


class Message(NamedTuple):
    """One consumed record."""

    topic: str
    partition: int
    offset: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: Sequence[Header]
    timestamp_ms: int


class RecordMetadata(NamedTuple):
    """Where a sent record was stored."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int


class OffsetAndTimestamp(NamedTuple):
    offset: int
    timestamp_ms: int
