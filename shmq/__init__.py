"""shmq: a Kafka-style message broker for one host over lock-free shared memory."""
from . import errors
from .errors import (CorruptRecord, InvalidConfig, InvalidRecord, InvalidTopic, KafkaStorageError,
                     KafkaTimeoutError, MessageSizeTooLarge, NotCoordinator, OffsetOutOfRange, ShmqError,
                     TopicAlreadyExists, UnknownTopicOrPartition)

__version__ = "0.1.0"

__all__ = ["errors", "ShmqError", "CorruptRecord", "InvalidConfig", "InvalidRecord", "InvalidTopic",
           "KafkaStorageError", "KafkaTimeoutError", "MessageSizeTooLarge", "NotCoordinator",
           "OffsetOutOfRange", "TopicAlreadyExists", "UnknownTopicOrPartition"]
