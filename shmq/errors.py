"""One exception hierarchy, with Apache Kafka's names where they apply.

Every error that concerns a partition names it (``topic-partition``) and, where
one is involved, the offset; the message says what was wrong in words.
"""
from __future__ import annotations

from typing import Optional


class ShmqError(Exception):
    """Base of every shmq error."""

    retriable = False

    def __init__(self, message: str, *, topic: Optional[str] = None,
                 partition: Optional[int] = None, offset: Optional[int] = None) -> None:
        super().__init__(message)
        self.topic = topic
        self.partition = partition
        self.offset = offset


class KafkaTimeoutError(ShmqError):
    """An operation did not complete within its timeout."""

    retriable = True


class OffsetOutOfRange(ShmqError):
    """The offset is below the log start (retention removed it) or past the end.

    ``missed``: for a reader overrun by an overwriting ring, how many records
    it never read (0 otherwise)."""

    def __init__(self, message: str, *, missed: int = 0, **where: Optional[int]) -> None:
        super().__init__(message, **where)  # type: ignore[arg-type]
        self.missed = missed


class CorruptRecord(ShmqError):
    """Bytes in shared memory do not form a valid frame, batch or index entry."""


class MessageSizeTooLarge(ShmqError):
    """A record or batch does not fit in one segment or exceeds the limit."""


class InvalidRecord(ShmqError):
    """A record is malformed (wrong type for a key, value or header)."""


class KafkaStorageError(ShmqError):
    """The filesystem cannot hold the log, or a log file is missing or unusable."""


class InvalidConfig(ShmqError):
    """A configuration value is out of range or of the wrong type."""


class InvalidTopic(ShmqError):
    """A topic name is not valid (Kafka's rule: [A-Za-z0-9._-]{1,249}, not '.' or '..')."""


class UnknownTopicOrPartition(ShmqError):
    """The topic or partition does not exist."""


class TopicAlreadyExists(ShmqError):
    """A topic with that name exists already."""


class NotCoordinator(ShmqError):
    """No live coordinator answers for this root (or it is not the active one)."""

    retriable = True


class InvalidGroupId(ShmqError):
    """A consumer group id is not valid (same rule as topic names)."""


class InvalidPartitions(ShmqError):
    """A partition count is not valid (e.g. fewer than the topic has already)."""


class InvalidRequest(ShmqError):
    """A request to the coordinator is malformed (wrong fields or types)."""


class ClusterAuthorizationFailed(ShmqError):
    """The caller may not use this root: another user owns it, its mode lets
    others in, or the coordinator refused the peer's credentials."""


class FencedClaim(ShmqError):
    """Internal: a claim was padded over by an unblocker; the append is retried."""


class IllegalState(ShmqError):
    """The call does not fit the object's state (closed, not assigned, no group)."""


class NoOffsetForPartition(ShmqError):
    """No committed offset and ``auto_offset_reset='none'``."""


class CommitFailed(ShmqError):
    """The commit was rejected (the member no longer owns the partition)."""


class NotLeaderForPartition(ShmqError):
    """The log written to is not (or no longer) the partition's leader; the
    client refreshes metadata and retries on the new leader."""


class LeaderNotAvailable(ShmqError):
    """The partition has no leader right now (an election is under way, or
    every in-sync replica is gone and unclean election is off)."""


class NotEnoughReplicas(ShmqError):
    """``acks="all"``: the in-sync replicas are fewer than ``min_insync_replicas``."""


class InvalidReplicationFactor(ShmqError):
    """The replication factor is out of range for this root."""


class ProducerFenced(ShmqError):
    """A newer instance of this producer (same transactional id, higher
    epoch) has written to the partition: this one is a zombie."""


class DuplicateSequenceNumber(ShmqError):
    """An idempotent batch older than the last one stored was sent again."""


class OutOfOrderSequenceNumber(ShmqError):
    """An idempotent batch's sequence skips past the next expected one."""


class InvalidTxnState(ShmqError):
    """The transactional call does not fit the transaction's state (e.g.
    ``commit_transaction`` with no transaction begun)."""


class ConcurrentTransactions(ShmqError):
    """The producer's previous transaction is still being completed; retry."""

    retriable = True


class InvalidProducerIdMapping(ShmqError):
    """The transactional id is not mapped to that producer id (call
    ``init_transactions`` first)."""
