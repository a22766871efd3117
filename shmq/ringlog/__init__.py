"""Partition logs: a control block and a ring of memory-mapped segment slots,
appended lock-free by many processes and read directly from shared memory."""
from .config import LogConfig
from .log import NO_FLOOR, PartitionLog, ReaderInfo
from .reader import LogReader, RecordArrays
from .records import LogRecord, decode_headers, encode_headers

__all__ = ["LogConfig", "PartitionLog", "ReaderInfo", "NO_FLOOR", "LogReader", "RecordArrays", "LogRecord",
           "encode_headers", "decode_headers"]
