"""The C core (compiled by cffi at install) and the one helper that turns its
status codes into exceptions."""
from __future__ import annotations

from typing import NoReturn, Optional

from .. import errors
from ._shmq import ffi, lib

__all__ = ["ffi", "lib", "raise_for", "ERROR_NAMES"]

ERROR_NAMES = {
    lib.SHMQ_ERR_CORRUPT: "corrupt data",
    lib.SHMQ_ERR_CRC: "CRC32C mismatch",
    lib.SHMQ_ERR_TOO_LARGE: "too large",
    lib.SHMQ_ERR_ARG: "bad argument",
    lib.SHMQ_ERR_OUT_OF_RANGE: "offset out of range",
    lib.SHMQ_ERR_TIMEOUT: "timed out",
    lib.SHMQ_ERR_RETRY: "transient conflict",
    lib.SHMQ_ERR_IO: "system call failed",
    lib.SHMQ_ERR_NOSPACE: "no space left on the filesystem",
    lib.SHMQ_ERR_BAD_LAYOUT: "files do not match the log layout",
    lib.SHMQ_ERR_FENCED: "claim was fenced",
    lib.SHMQ_ERR_DELETED: "the topic was deleted",
    lib.SHMQ_ERR_NOT_LEADER: "not the partition's leader",
    lib.SHMQ_ERR_DIVERGED: "replica diverged from the leader",
    lib.SHMQ_ERR_PRODUCER_FENCED: "producer fenced by a newer epoch",
    lib.SHMQ_ERR_DUPLICATE_SEQ: "duplicate sequence number",
    lib.SHMQ_ERR_OUT_OF_ORDER_SEQ: "out-of-order sequence number",
    lib.SHMQ_ERR_READERS_FULL: f"every one of the {lib.SHMQ_MAX_READERS} reader slots is held by a live reader",
    lib.SHMQ_ERR_STORAGE: "a file of the log was truncated, shrunk, removed or replaced under this process",
}

_CLASSES = {
    lib.SHMQ_ERR_CORRUPT: errors.CorruptRecord,
    lib.SHMQ_ERR_CRC: errors.CorruptRecord,
    lib.SHMQ_ERR_TOO_LARGE: errors.MessageSizeTooLarge,
    lib.SHMQ_ERR_ARG: errors.InvalidRecord,
    lib.SHMQ_ERR_OUT_OF_RANGE: errors.OffsetOutOfRange,
    lib.SHMQ_ERR_TIMEOUT: errors.KafkaTimeoutError,
    lib.SHMQ_ERR_IO: errors.KafkaStorageError,
    lib.SHMQ_ERR_STORAGE: errors.KafkaStorageError,
    lib.SHMQ_ERR_NOSPACE: errors.KafkaStorageError,
    lib.SHMQ_ERR_BAD_LAYOUT: errors.KafkaStorageError,
    lib.SHMQ_ERR_FENCED: errors.FencedClaim,
    lib.SHMQ_ERR_DELETED: errors.UnknownTopicOrPartition,
    lib.SHMQ_ERR_NOT_LEADER: errors.NotLeaderForPartition,
    lib.SHMQ_ERR_DIVERGED: errors.KafkaStorageError,
    lib.SHMQ_ERR_PRODUCER_FENCED: errors.ProducerFenced,
    lib.SHMQ_ERR_DUPLICATE_SEQ: errors.DuplicateSequenceNumber,
    lib.SHMQ_ERR_OUT_OF_ORDER_SEQ: errors.OutOfOrderSequenceNumber,
}


def raise_for(code: int, what: str, *, topic: Optional[str] = None, partition: Optional[int] = None,
              offset: Optional[int] = None, detail: str = "") -> NoReturn:
    """Raise the exception for a negative C status code.

    ``what`` says what was being done and where (e.g. "read from orders-3 at
    offset 17"); ``detail`` adds the C core's view (segment and position).
    """
    cls = _CLASSES.get(code, errors.ShmqError)
    text = f"{what}: {ERROR_NAMES.get(code, f'error {code}')}"
    if code in (lib.SHMQ_ERR_IO, lib.SHMQ_ERR_NOSPACE):
        text += f" ({ffi.errno and __import__('os').strerror(ffi.errno)})"
    if detail:
        text += f" [{detail}]"
    raise cls(text, topic=topic, partition=partition, offset=offset)
