"""shmq: a Kafka-style message broker for one host over lock-free shared memory.

    from shmq import Admin, Producer, Consumer, TopicPartition
"""
from . import errors
from .admin import Admin
from .consumer import Consumer
from .errors import (ClusterAuthorizationFailed, CommitFailed, CorruptRecord, IllegalState, InvalidConfig,
                     InvalidGroupId, InvalidPartitions, InvalidRecord, InvalidRequest, InvalidTopic,
                     KafkaStorageError, KafkaTimeoutError, MessageSizeTooLarge, NoOffsetForPartition,
                     NotCoordinator, OffsetOutOfRange, ShmqError, TopicAlreadyExists, UnknownTopicOrPartition)
from .message import Message, OffsetAndTimestamp, RecordMetadata, TopicPartition
from .producer import Producer

__version__ = "0.1.0"

__all__ = ["Admin", "Producer", "Consumer", "Message", "TopicPartition", "RecordMetadata", "OffsetAndTimestamp",
           "errors", "ShmqError", "ClusterAuthorizationFailed", "CommitFailed", "CorruptRecord", "IllegalState",
           "InvalidConfig", "InvalidGroupId", "InvalidPartitions", "InvalidRecord", "InvalidRequest",
           "InvalidTopic", "KafkaStorageError", "KafkaTimeoutError", "MessageSizeTooLarge", "NoOffsetForPartition",
           "NotCoordinator", "OffsetOutOfRange", "TopicAlreadyExists", "UnknownTopicOrPartition"]
