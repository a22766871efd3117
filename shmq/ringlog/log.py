"""PartitionLog: one partition's ring of segment slots, appended in place.

Theory of operation: the C core maps the control block and every slot of the
ring (``shmq/native/log.h`` has the byte layout). An append is one C call:
claim a frame with a fetch-add on the active segment's claim word, encode the
Kafka batch straight into the mapping, commit the frame header with a CAS.
Any number of processes may hold a ``PartitionLog`` on the same directory and
append concurrently; readers (``LogReader``) copy complete frames out and
re-check the slot generation before decoding.

A ``PartitionLog`` object itself is not thread-safe for ``close``; appends from
several threads of one process are safe (the C core is lock-free and
cffi releases the GIL during the call).
"""
from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import InvalidRecord, MessageSizeTooLarge
from ..native import ffi, lib, raise_for
from ..root import make_private_dirs
from .config import LogConfig
from .records import Header, encode_headers

if TYPE_CHECKING:
    from .reader import LogReader

BytesLike = Union[bytes, bytearray, memoryview]

_NULL = ffi.NULL
_LEO_MASK = (1 << 48) - 1

NO_FLOOR = (1 << 63) - 1
"""``slowest_position`` / ``retention_floor`` when nothing holds the ring back."""

READER_KINDS = {0: "reader", 1: "consumer", 2: "follower"}


class ReaderInfo(NamedTuple):
    """One live reader of a partition, from its reader table."""

    slot: int
    pid: int
    position: int
    kind: str           # "reader" (LogReader), "consumer" or "follower"
    label: str          # group id, client id or replica name
    tethered: bool      # holds producers back in block mode
    missed: int         # records lost to an overwriting ring


def ctl_inode(path: str) -> int:
    """Inode of the log's control block at directory ``path`` (-1 if it is
    gone): a mapping whose inode differs maps files that were replaced."""
    try:
        return os.stat(os.path.join(path, "partition.ctl")).st_ino
    except OSError:
        return -1


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _timeout_ns(timeout: Optional[float]) -> int:
    return -1 if timeout is None else max(0, int(timeout * 1e9))


class PartitionLog:
    """A partition log at ``path`` (a directory holding partition.ctl and the slots)."""

    def __init__(self, path: str, *, name: Optional[str] = None) -> None:
        self.path = os.fspath(path)
        self.name = name or os.path.basename(self.path.rstrip("/"))
        self.topic, self.partition = _split_name(self.name)
        handle = ffi.new("shmq_log **")
        deadline = time.monotonic() + 2.0
        while True:
            rc = lib.shmq_log_open(self.path.encode(), handle)
            # A log being created has no magic yet: wait for its creator.
            if rc != lib.SHMQ_ERR_BAD_LAYOUT or time.monotonic() > deadline:
                break
            time.sleep(0.001)
        if rc < 0:
            raise_for(rc, f"open partition log {self.name} at {self.path}",
                      topic=self.topic, partition=self.partition)
        self._h = handle[0]
        self._ts_out = ffi.new("int64_t *")
        self._word_out = ffi.new("int64_t *")
        self._append_value = lib.shmq_log_append_value
        self._append_kv = lib.shmq_log_append_kv
        hdr = self._hdr = lib.shmq_log_header(self._h)
        self.config = LogConfig(
            segment_bytes=int(hdr.segment_bytes),
            segment_count=int(hdr.slot_count),
            index_interval_bytes=int(hdr.index_interval),
            overflow="block" if hdr.flags & lib.SHMQ_FLAG_OVERFLOW_BLOCK else "overwrite",
            unblock_timeout_ms=max(1, int(hdr.unblock_timeout_ns) // 1_000_000),
        )
        self._unblock = ffi.new("shmq_unblock_state *")
        # Largest frame a record may need: segment size, capped by the C core.
        self.max_frame_bytes = min(self.config.segment_bytes, 64 << 20)

    # ------------------------------------------------------------ lifecycle
    @classmethod
    def create(cls, path: str, config: Optional[LogConfig] = None, *, name: Optional[str] = None,
               **overrides: Any) -> "PartitionLog":
        """Create the files of a new log (the directory is made if missing) and open it.

        The directory must be a real directory of ours, mode 0700, never a
        symlink (``root.make_private_dirs``; callers that know the root create
        it first with ``Root.makedirs``).

        Every slot is allocated now, so a filesystem that cannot hold the log
        fails here with ``KafkaStorageError``, never later with SIGBUS.
        """
        if config is None:
            config = LogConfig(**overrides)
        elif overrides:
            raise TypeError("pass either config or keyword overrides, not both")
        path = os.fspath(path)
        make_private_dirs(path)
        cfg = ffi.new("shmq_log_config *")
        cfg.slot_count = config.segment_count
        cfg.segment_bytes = config.segment_bytes
        cfg.index_interval = config.index_interval_bytes
        cfg.flags = lib.SHMQ_FLAG_OVERFLOW_BLOCK if config.overflow == "block" else 0
        cfg.unblock_timeout_ns = config.unblock_timeout_ms * 1_000_000
        rc = lib.shmq_log_create(path.encode(), cfg)
        label = name or os.path.basename(path.rstrip("/"))
        if rc < 0:
            need = config.segment_count * config.segment_bytes
            raise_for(rc, f"create partition log {label} at {path} ({config.segment_count} slots of "
                      f"{config.segment_bytes} bytes, {need} bytes in all)")
        return cls(path, name=name)

    def close(self) -> None:
        h, self._h = getattr(self, "_h", None), None
        if h is not None:
            lib.shmq_log_close(h)

    def __enter__(self) -> "PartitionLog":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    # ----------------------------------------------------------------- errors
    def _word(self, which: int) -> int:
        """One control-block word, read in C under the guard that turns a
        truncated or vanished partition.ctl into KafkaStorageError."""
        rc = lib.shmq_log_control_word(self._h, which, self._word_out)
        if rc < 0:
            self._fail(rc, "read the control block")
        return int(self._word_out[0])

    def _fail(self, rc: int, what: str, offset: Optional[int] = None) -> None:
        if rc == lib.SHMQ_ERR_STORAGE:
            f = lib.shmq_log_fault_file(self._h)
            name = ffi.string(f).decode() if f != ffi.NULL else "a file"
            raise_for(rc, f"{what} on {self.name}", topic=self.topic, partition=self.partition,
                      detail=f"file {os.path.join(self.path, name)}; reopen the log or recreate the partition")
        if rc == lib.SHMQ_ERR_TOO_LARGE:
            raise MessageSizeTooLarge(
                f"{what} on {self.name}: the record needs more than one segment "
                f"({self.max_frame_bytes} bytes) can hold", topic=self.topic, partition=self.partition)
        if offset is None and rc in (lib.SHMQ_ERR_CORRUPT, lib.SHMQ_ERR_CRC, lib.SHMQ_ERR_OUT_OF_RANGE):
            offset = int(lib.shmq_log_error_offset(self._h))
        detail = (f"segment {lib.shmq_log_error_seq(self._h)} byte {lib.shmq_log_error_position(self._h)}"
                  if rc in (lib.SHMQ_ERR_CORRUPT, lib.SHMQ_ERR_CRC) else "")
        at = f" at offset {offset}" if offset is not None else ""
        if rc == lib.SHMQ_ERR_TIMEOUT and self.config.overflow == "block":
            detail = self.describe_holder()
        raise_for(rc, f"{what} on {self.name}{at}", topic=self.topic, partition=self.partition,
                  offset=offset, detail=detail)

    # ----------------------------------------------------------------- append
    def append(self, value: Optional[BytesLike], key: Optional[BytesLike] = None,
               headers: Optional[Iterable[Header]] = None, timestamp_ms: Optional[int] = None,
               timeout: Optional[float] = None) -> int:
        """Append one record; returns its offset.

        ``timestamp_ms`` defaults to now. ``timeout`` bounds the wait for room
        in ``overflow="block"`` logs (``None`` waits forever).
        """
        if type(value) is bytes and headers is None and timestamp_ms is None and timeout is None:
            # Fast path: one three- or five-argument C call.
            if key is None:
                off = self._append_value(self._h, value, len(value))
            else:
                if type(key) is not bytes:
                    key = _as_bytes(key, "key")
                off = self._append_kv(self._h, key, len(key), value, len(value), -1, -1)
            if off < 0:
                self._fail(off, "append")
            return off
        if headers:
            hb = encode_headers(headers)
            hlen = len(hb)
        else:
            hb, hlen = _NULL, 0
        if value is None:
            vlen = -1
            value = _NULL
        else:
            if type(value) is not bytes:
                value = _as_bytes(value, "value")
            vlen = len(value)
        if key is None:
            klen = -1
            key = _NULL
        else:
            if type(key) is not bytes:
                key = _as_bytes(key, "key")
            klen = len(key)
        if timestamp_ms is None:
            ts = -1
        elif type(timestamp_ms) is int and timestamp_ms >= 0:
            ts = timestamp_ms
        else:
            raise InvalidRecord(f"timestamp_ms must be a non-negative int, got {timestamp_ms!r}",
                                topic=self.topic, partition=self.partition)
        off = lib.shmq_log_append1(self._h, key, klen, value, vlen, hb, hlen, ts, self._ts_out,
                                   -1 if timeout is None else _timeout_ns(timeout))
        if off < 0:
            self._fail(off, "append")
        return off

    def append_batch(self, values: Union[Sequence[Optional[BytesLike]], np.ndarray],
                     keys: Optional[Union[Sequence[Optional[BytesLike]], np.ndarray]] = None, *,
                     timestamp_ms: Optional[int] = None, timeout: Optional[float] = None) -> int:
        """Append a batch as one Kafka RecordBatch; returns its base offset.

        ``values`` is a list of bytes (``None`` for a null value) or a 2-D
        ``uint8`` numpy array of fixed-width values; ``keys`` likewise or None.
        """
        recs, keep, n = self.build_records(values, keys, None, timestamp_ms)
        off = lib.shmq_log_append(self._h, recs, _NULL, _timeout_ns(timeout))
        if off < 0:
            self._fail(off, f"append a batch of {n} records")
        return off

    def build_records(self, values: Any, keys: Any = None, headers: Optional[Sequence[Any]] = None,
                      timestamp_ms: Optional[int] = None) -> Tuple[Any, List[Any], int]:
        """The ``shmq_records`` of a batch for this log's appends: (records,
        the Python objects its pointers borrow from, record count). Raises
        ``InvalidRecord`` naming what is wrong."""
        recs = ffi.new("shmq_records *")
        keep: List[Any] = []
        n = _fill_field(recs, "value", values, keep)
        if keys is not None:
            nk = _fill_field(recs, "key", keys, keep)
            if nk != n:
                raise InvalidRecord(f"{nk} keys for {n} values", topic=self.topic, partition=self.partition)
        if n == 0:
            raise InvalidRecord("a batch needs at least one record", topic=self.topic, partition=self.partition)
        if headers is not None:
            _fill_headers(recs, headers, n, keep)
        recs.count = n
        if timestamp_ms is None:
            recs.base_timestamp = _now_ms()
        elif type(timestamp_ms) is int and timestamp_ms >= 0:
            recs.base_timestamp = timestamp_ms
        else:
            raise InvalidRecord(f"timestamp_ms must be a non-negative int, got {timestamp_ms!r}",
                                topic=self.topic, partition=self.partition)
        return recs, keep, n

    def append_raw(self, batch: BytesLike, timeout: Optional[float] = None) -> int:
        """Append a complete RecordBatch v2 built elsewhere (its baseOffset is
        replaced). The batch's CRC is checked first; returns the base offset."""
        buf = ffi.from_buffer(batch)
        off = lib.shmq_log_append_raw(self._h, buf, len(buf), _timeout_ns(timeout))
        if off < 0:
            if off in (lib.SHMQ_ERR_CORRUPT, lib.SHMQ_ERR_CRC, lib.SHMQ_ERR_ARG):
                raise InvalidRecord(f"append_raw on {self.name}: not a valid RecordBatch v2 "
                                    f"({'CRC mismatch' if off == lib.SHMQ_ERR_CRC else 'bad header'})",
                                    topic=self.topic, partition=self.partition)
            self._fail(off, "append a raw batch")
        return off

    # ------------------------------------------------------------ positions
    @property
    def start_offset(self) -> int:
        """Offset of the oldest record still held (Kafka's log start offset)."""
        off = int(lib.shmq_log_start_offset(self._h))
        if off < 0:  # the control block does not make sense
            self._fail(off, "start offset")
        return off

    @property
    def end_offset(self) -> int:
        """The next offset to be assigned (Kafka's log end offset)."""
        off = int(lib.shmq_log_end_offset(self._h))
        if off < 0:  # the control block does not make sense
            self._fail(off, "end offset")
        return off

    def reader(self, offset: Optional[int] = None, **kwargs: Any) -> "LogReader":
        """A reader positioned at ``offset`` (default: the log start)."""
        from .reader import LogReader
        return LogReader(self, self.start_offset if offset is None else offset, **kwargs)

    # ------------------------------------------------------------ housekeeping
    def housekeep(self) -> int:
        """Prepare the next slot, finish abandoned seals, pad dead claims.

        Call it periodically from one process (the coordinator, later the
        leader's replica host); any number of callers is safe. Returns the
        number of frames padded over.
        """
        rc = lib.shmq_log_housekeep(self._h, self._unblock)
        if rc < 0:
            self._fail(rc, "housekeeping")
        return rc

    def mark_deleted(self) -> None:
        """Refuse every later append, in every process (UnknownTopicOrPartition):
        called by the coordinator before it unlinks a deleted topic's files."""
        lib.shmq_log_mark_deleted(self._h)

    # ------------------------------------------------------------ replication
    @property
    def append_state(self) -> int:
        """``lib.SHMQ_APPEND_OPEN`` (0), ``DELETED`` (1) or ``NOT_LEADER`` (2)."""
        return self._word(lib.SHMQ_WORD_APPEND_STATE)

    @property
    def replicated(self) -> bool:
        """True for a partition with replication factor > 1 (readers stop at the high watermark)."""
        return bool(self._word(lib.SHMQ_WORD_REPLICATED))

    @property
    def leader_epoch(self) -> int:
        return self._word(lib.SHMQ_WORD_LEADER_EPOCH)

    @property
    def leader_index(self) -> int:
        return self._word(lib.SHMQ_WORD_LEADER_INDEX)

    @property
    def isr_mask(self) -> int:
        return self._word(lib.SHMQ_WORD_ISR_MASK)

    @property
    def epoch_start_offset(self) -> int:
        return self._word(lib.SHMQ_WORD_EPOCH_START_OFFSET)

    @property
    def high_watermark(self) -> int:
        """The end consumers may read to: the HW if replicated, else the end offset."""
        off = int(lib.shmq_log_high_watermark(self._h))
        if off < 0:
            self._fail(off, "high watermark")
        return off

    def set_append_state(self, state: int) -> None:
        """Open the log to producers (0), or refuse them: DELETED (1), NOT_LEADER (2).
        Waiting readers and ``wait_hw`` callers are woken."""
        lib.shmq_log_set_append_state(self._h, int(state))

    def set_replication(self, replicated: bool, leader_epoch: int, leader_index: int, isr_mask: int,
                        epoch_start_offset: int) -> None:
        """Store the replication words (isr/index before the epoch, release order)."""
        lib.shmq_log_set_replication(self._h, 1 if replicated else 0, int(leader_epoch), int(leader_index),
                                     int(isr_mask), int(epoch_start_offset))

    def replica_leos(self) -> List[Tuple[int, int, int]]:
        """Per replica index: (epoch tag, log end offset, caught-up monotonic ns)."""
        leos = [self._word(lib.SHMQ_WORD_REPLICA_LEO + r) for r in range(lib.SHMQ_MAX_REPLICAS)]
        return [(leo >> 48, leo & _LEO_MASK, self._word(lib.SHMQ_WORD_CAUGHT_UP_NS + r)) for r, leo in enumerate(leos)]

    def publish_leo(self, index: int, epoch: int, leo: int, caught_up: bool) -> int:
        """Follower ``index`` reports its log end offset; returns the high watermark."""
        hw = lib.shmq_log_publish_leo(self._h, index, epoch, leo, 1 if caught_up else 0)
        if hw < 0:
            self._fail(hw, f"publish LEO {leo} of replica {index}")
        return hw

    def advance_hw(self, hw: int) -> int:
        """Raise the high watermark to ``hw`` (never lowers it); returns it."""
        return int(lib.shmq_log_advance_hw(self._h, int(hw)))

    def recompute_hw(self) -> int:
        """Recompute the high watermark from the ISR members' LEOs; returns it."""
        hw = int(lib.shmq_log_recompute_hw(self._h))
        if hw < 0:
            self._fail(hw, "recompute the high watermark")
        return hw

    def wait_hw(self, offset: int, timeout: Optional[float] = None) -> bool:
        """acks=all: wait until the high watermark is above ``offset``; False on
        timeout. Raises NotLeaderForPartition once the log is fenced."""
        rc = lib.shmq_log_wait_hw(self._h, offset, 20_000, _timeout_ns(timeout))
        if rc < 0:
            self._fail(rc, f"wait for offset {offset} to be replicated")
        return rc == 1

    def append_frames(self, buf: Any, n: int) -> int:
        """Append the first ``n`` bytes of a raw frame stream (``LogReader.read_frames``)
        at the same offsets; returns the new end offset."""
        cbuf = ffi.from_buffer(buf)
        if not 0 <= n <= len(cbuf):
            raise ValueError(f"n={n} outside the buffer of {len(cbuf)} bytes")
        end = lib.shmq_log_append_frames(self._h, cbuf, n)
        if end < 0:
            self._fail(end, "append copied frames")
        return end

    def truncate(self, offset: int) -> int:
        """Drop every record at or above ``offset`` (single writer); returns the new end."""
        end = lib.shmq_log_truncate(self._h, int(offset))
        if end < 0:
            self._fail(end, f"truncate to {offset}")
        return end

    def reset(self, offset: int) -> int:
        """Drop everything: the log becomes empty, starting and ending at ``offset``."""
        rc = lib.shmq_log_reset(self._h, int(offset))
        if rc < 0:
            self._fail(rc, f"reset to {offset}")
        return rc

    def flush(self) -> None:
        """msync what changed since the last flush (disk-backed logs)."""
        rc = lib.shmq_log_flush(self._h)
        if rc < 0:
            self._fail(rc, "flush")

    @property
    def slowest_position(self) -> int:
        """Block mode: the consumer groups' committed floor (as last set; ``NO_FLOOR`` for none)."""
        return self._word(lib.SHMQ_WORD_SLOWEST_OFFSET)

    def set_slowest_position(self, offset: int) -> None:
        """Block mode: the lowest offset any consumer group still needs (its
        committed offset; ``NO_FLOOR`` when no group holds anything). Producers
        blocked on a full ring go on once it passes the oldest segment."""
        lib.shmq_log_set_slowest(self._h, int(offset))

    @property
    def blocked_count(self) -> int:
        """How many appends waited for room in this full block-mode ring (all processes)."""
        return self._word(lib.SHMQ_WORD_BLOCKED_COUNT)

    @property
    def blocked_seconds(self) -> float:
        """How long appends waited for room in all, in seconds (all processes)."""
        return self._word(lib.SHMQ_WORD_BLOCKED_NS) / 1e9

    # ------------------------------------------------------------ reader table
    def readers(self) -> List[ReaderInfo]:
        """The live readers registered in this partition's reader table, with
        their positions (dead readers' slots are freed first)."""
        lib.shmq_log_readers_sweep(self._h)
        out = []
        for i in range(lib.SHMQ_MAX_READERS):
            r = lib.shmq_log_reader_slot(self._h, i)
            owner = int(r.owner)
            if owner == 0 or owner >> 63:
                continue
            out.append(ReaderInfo(i, owner & 0xFFFFFFFF, int(r.position), READER_KINDS.get(int(r.kind), "?"),
                                  ffi.string(r.label).decode(errors="replace"),
                                  bool(r.flags & lib.SHMQ_READER_TETHERED), int(r.missed)))
        return out

    def retention_floor(self) -> int:
        """The lowest offset still needed: the consumer groups' committed floor
        and every live tethered reader's position (``NO_FLOOR``: nothing holds
        the ring back). One C call."""
        return int(lib.shmq_log_retention_floor(self._h, _NULL))

    def describe_holder(self) -> str:
        """Who keeps a full block-mode ring from turning, for error messages."""
        holder = ffi.new("int32_t *")
        floor = int(lib.shmq_log_retention_floor(self._h, holder))
        who = next((r for r in self.readers() if r.slot == holder[0]), None) if holder[0] >= 0 else None
        if floor == NO_FLOOR:
            return "the ring is full but no reader holds it (try again)"
        oldest = self.start_offset
        if who is None:
            return (f"the ring is full: a consumer group's committed offset {floor} is in the oldest segment "
                    f"(from offset {oldest}); commit further or delete the group")
        label = f" '{who.label}'" if who.label else ""
        return (f"the ring is full: {who.kind}{label} in process {who.pid} at offset {floor} has not read "
                f"the oldest segment (from offset {oldest}); it holds producers back until it reads on")

    def __repr__(self) -> str:
        return f"PartitionLog({self.name!r}, path={self.path!r})"


def _split_name(name: str) -> "tuple[Optional[str], Optional[int]]":
    topic, _, part = name.rpartition("-")
    if topic and part.isdigit():
        return topic, int(part)
    return name, None


def _as_bytes(v: Any, what: str) -> bytes:
    if isinstance(v, (bytearray, memoryview)):
        return bytes(v)
    raise InvalidRecord(f"{what} must be bytes-like or None, got {type(v).__name__}")


def _fill_headers(recs: Any, headers: Sequence[Optional[Iterable[Header]]], n: int, keep: List[Any]) -> None:
    """Point recs.headers at the encoded header blocks of ``n`` records (one
    iterable of (key, value) pairs, or None, per record)."""
    if len(headers) != n:
        raise InvalidRecord(f"{len(headers)} header lists for {n} records")
    fill_header_blocks(recs, [encode_headers(h or ()) for h in headers], n, keep)


def fill_header_blocks(recs: Any, blocks: List[bytes], n: int, keep: List[Any]) -> None:
    """Point recs.headers at ``n`` encoded header blocks (``encode_headers``'s
    format, one per record; ``keep`` holds what the pointers borrow from)."""
    joined = b"".join(blocks)
    offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, blocks), dtype=np.int64, count=n), out=offs[1:])
    buf = ffi.from_buffer("uint8_t[]", joined)
    keep.extend((joined, offs, buf))
    recs.headers = buf
    recs.header_offs = ffi.cast("int64_t *", offs.ctypes.data)


def _fill_field(recs: Any, field: str, items: Any, keep: List[Any]) -> int:
    """Point recs.<field>s at a concatenated buffer (+ offsets) or a 2-D array."""
    if isinstance(items, np.ndarray):
        if items.ndim != 2 or items.dtype != np.uint8:
            raise InvalidRecord(f"a numpy batch of {field}s must be a 2-D uint8 array, "
                                f"got {items.ndim}-D {items.dtype}")
        arr = np.ascontiguousarray(items)
        keep.append(arr)
        setattr(recs, field + "s", ffi.cast("uint8_t *", arr.ctypes.data))
        setattr(recs, field + "_width", arr.shape[1])
        return int(arr.shape[0])
    if not isinstance(items, (list, tuple)):
        raise InvalidRecord(f"{field}s must be a list of bytes or a 2-D uint8 numpy array, "
                            f"got {type(items).__name__}")
    n = len(items)
    nulls = None
    if any(v is None for v in items):
        nulls = bytes(v is None for v in items)
        items = [b"" if v is None else v for v in items]
    try:
        joined = b"".join(items)
    except TypeError:
        bad = next(v for v in items if not isinstance(v, (bytes, bytearray, memoryview)))
        raise InvalidRecord(f"each {field} must be bytes-like or None, got {type(bad).__name__}") from None
    lens = np.fromiter(map(len, items), dtype=np.int64, count=n)
    offs = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lens, out=offs[1:])
    keep.extend((joined, offs, nulls))
    setattr(recs, field + "s", ffi.from_buffer("uint8_t[]", joined) if joined else ffi.new("uint8_t[1]"))
    keep.append(getattr(recs, field + "s"))
    setattr(recs, field + "_offs", ffi.cast("int64_t *", offs.ctypes.data))
    if nulls is not None:
        nb = ffi.from_buffer("uint8_t[]", nulls)
        keep.append(nb)
        setattr(recs, field + "_null", nb)
    return n
