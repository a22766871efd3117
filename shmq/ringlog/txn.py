"""Transaction markers and a partition's transaction index.

Control batches (Kafka's format, written by the transaction coordinator at
the end of every transaction, one per partition the transaction touched):
a RecordBatch v2 with attributes ``isControlBatch | isTransactional`` (bits
5 and 4), the transaction's producer id and epoch, baseSequence -1 and one
record whose key is ``int16 version (0), int16 type (0 ABORT, 1 COMMIT)``
and whose value is ``int16 version (0), int32 coordinatorEpoch``. No read
path returns a control batch as records (``shmq_batch_decode``).

Transaction index (``<root>/txn/<topic>-<partition>``, Kafka's ``.txnindex``
role plus the partition's last stable offset), one file per partition,
whatever replica leads it. Its layout and who writes which word are in
``shmq/native/txn_index.h`` (mirrored here): a header with the LSO, the
open-transaction rows (one per producer id: epoch, first offset, start
time; changed under the index lock by whoever runs the transaction, a
producer or the coordinator, each change recomputing the LSO) and the
aborted runs (entries, written by the coordinator).

Readers (``read_committed`` consumers) load the log's end first, then
``lso``: a transaction opened after that load starts at or above the end
loaded, so ``min(end, lso)`` never lets an open transaction's records pass.
The file only grows (the coordinator extends it before publishing entries
past the old capacity); a reader re-maps when ``count`` passes what it mapped.
"""
from __future__ import annotations

import functools
import mmap
import os
import struct
import time
from typing import Any, Iterator, List, Optional, Tuple

import numpy as np

from ..errors import CorruptRecord, KafkaStorageError
from ..native import ffi, lib, raise_for

__all__ = ["ABORT", "COMMIT", "control_batch", "parse_control_record", "TxnIndex", "aborted_runs", "commit_marker_in",
           "stable_offset"]

ABORT, COMMIT = 0, 1
MARKER_NAMES = {ABORT: "ABORT", COMMIT: "COMMIT"}
ATTR_TRANSACTIONAL = lib.SHMQ_BATCH_ATTR_TRANSACTIONAL
ATTR_CONTROL = lib.SHMQ_BATCH_ATTR_CONTROL

_HEAD = struct.Struct(">qiibIhiqqqhii")   # the 61-byte RecordBatch v2 header
_CONTROL_KEY = struct.Struct(">hh")       # version, type
_CONTROL_VALUE = struct.Struct(">hi")     # version, coordinatorEpoch


def _varint(n: int) -> bytes:
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def _read_varint(buf: bytes, p: int) -> Tuple[int, int]:
    """A zig-zag varint at ``p``: (value, position after it)."""
    shift = z = 0
    while True:
        b = buf[p]
        p += 1
        z |= (b & 0x7F) << shift
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), p
        shift += 7
        if shift > 63:
            raise IndexError("varint too long")


@functools.lru_cache(maxsize=64)
def _control_record(marker: int, coordinator_epoch: int) -> bytes:
    """The one record of a control batch (it has no timestamp of its own)."""
    key = _CONTROL_KEY.pack(0, marker)
    value = _CONTROL_VALUE.pack(0, coordinator_epoch)
    body = (b"\x00" + _varint(0) + _varint(0) + _varint(len(key)) + key + _varint(len(value)) + value + _varint(0))
    return _varint(len(body)) + body


def control_batch(marker: int, producer_id: int, producer_epoch: int, coordinator_epoch: int = 0,
                  timestamp_ms: Optional[int] = None) -> bytes:
    """A complete control batch (baseOffset 0: the append sets it) ending a transaction."""
    if marker not in MARKER_NAMES:
        raise ValueError(f"marker must be ABORT (0) or COMMIT (1), got {marker!r}")
    ts = time.time_ns() // 1_000_000 if timestamp_ms is None else timestamp_ms
    record = _control_record(marker, coordinator_epoch)
    attrs = ATTR_CONTROL | ATTR_TRANSACTIONAL
    # Fields after the CRC, then the CRC over them (Kafka: attributes..end).
    after = struct.pack(">hiqqqhii", attrs, 0, ts, ts, producer_id, producer_epoch, -1, 1) + record
    crc = int(lib.shmq_crc32c(0, ffi.from_buffer(after), len(after)))
    return struct.pack(">qiibI", 0, len(after) + 9, -1, 2, crc) + after


def parse_control_record(batch: bytes) -> Optional[Tuple[int, int]]:
    """(marker type, coordinatorEpoch) of a control batch, None if ``batch``
    is not one; ``CorruptRecord`` if it claims to be one but does not parse."""
    if len(batch) < _HEAD.size:
        return None
    attrs = _HEAD.unpack_from(batch)[5]
    if not attrs & ATTR_CONTROL:
        return None
    p = _HEAD.size
    try:
        _rlen, p = _read_varint(batch, p)
        p += 1                                   # record attributes
        _ts_delta, p = _read_varint(batch, p)
        _off_delta, p = _read_varint(batch, p)
        klen, p = _read_varint(batch, p)
        version, mtype = _CONTROL_KEY.unpack_from(batch, p)
        p += max(klen, 0)
        _vlen, p = _read_varint(batch, p)
        _vv, coordinator_epoch = _CONTROL_VALUE.unpack_from(batch, p)
    except (IndexError, struct.error):
        raise CorruptRecord("a control batch whose record does not parse") from None
    if version != 0 or klen != 4 or mtype not in MARKER_NAMES:
        raise CorruptRecord(f"control record key version {version} type {mtype} is not a transaction marker")
    return mtype, coordinator_epoch


def _batches(frames: Any, n: int) -> Iterator[Tuple[int, Tuple[Any, ...]]]:
    """(byte position, unpacked header) of each data frame's batch in the first
    ``n`` bytes of a raw frame stream (``LogReader.read_frames``)."""
    data = memoryview(frames)[:n]
    pos = 0
    while pos + 8 <= n:
        word = int.from_bytes(data[pos:pos + 8], "little")
        length = word & 0xFFFFFFFF
        ftype = word >> 62
        if length < 8 or length % 8 or pos + length > n:
            raise CorruptRecord(f"frame at byte {pos} of a copied frame stream has length {length}")
        if ftype == 0 and length >= 8 + _HEAD.size:
            yield pos + 8, _HEAD.unpack_from(data, pos + 8)
        pos += length


def aborted_runs(frames: Any, n: int, producer_id: int) -> List[Tuple[int, int]]:
    """Offset runs ``[(first, last)]`` of ``producer_id``'s transactional data
    batches in the first ``n`` bytes of a raw frame stream (``LogReader.read_frames``):
    consecutive batches of the producer with no other data batch between
    make one run. Control batches end a run."""
    runs: List[Tuple[int, int]] = []
    cur: Optional[List[int]] = None
    for _pos, h in _batches(frames, n):
        base, attrs, lod, pid = h[0], h[5], h[6], h[9]
        if pid == producer_id and attrs & ATTR_TRANSACTIONAL and not attrs & ATTR_CONTROL:
            if cur is None:
                cur = [base, base + lod]
                runs.append((base, base + lod))
            else:
                cur[1] = base + lod
                runs[-1] = (cur[0], cur[1])
        else:
            cur = None
    return runs


def commit_marker_in(frames: Any, n: int, producer_id: int, epoch: int) -> bool:
    """Whether the first ``n`` bytes of a raw frame stream hold a COMMIT
    marker of ``producer_id`` at ``epoch``: the decision of a transaction
    its producer was completing itself (see ``shmq/native/txn_index.h``)."""
    data = memoryview(frames)[:n]
    for pos, h in _batches(frames, n):
        if h[9] == producer_id and h[10] == epoch and h[5] & ATTR_CONTROL:
            got = parse_control_record(bytes(data[pos:pos + 12 + h[1]]))
            if got is not None and got[0] == COMMIT:
                return True
    return False


MAGIC = b"SHMQTXI2"
HEADER = 64
ROWS = lib.SHMQ_TXN_ROWS
ROW = lib.SHMQ_TXN_ROW_WORDS * 8
ENTRIES_AT = lib.SHMQ_TXN_ENTRIES_AT
ENTRY = 32
F_LSO, F_COUNT, F_CAPACITY = lib.SHMQ_TXN_W_LSO, lib.SHMQ_TXN_W_COUNT, lib.SHMQ_TXN_W_CAPACITY
ROW_LOCK_TIMEOUT_NS = 5_000_000_000
assert ENTRIES_AT == HEADER + ROWS * ROW


class TxnIndex:
    """The transaction index of one partition, mapped (see the module doc).

    ``TxnIndex.open(path, create=True)`` is a writer's way in (the
    coordinator, or a producer running its own transaction); readers use
    ``TxnIndex.open(path)``, which returns None while no transaction ever
    touched the partition."""

    def __init__(self, path: str, fd: int, writable: bool) -> None:
        self.path = path
        self._fd = fd
        self._writable = writable
        self._mm: Optional[mmap.mmap] = None
        self.words: Any = None
        self._entries: Any = None
        self._mapped = 0
        self._c_words: Any = None
        self.rows_words: Any = None              # writers: header and rows, as the C send opens a row
        self._row_out = ffi.new("int64_t[3]")
        self._map()

    @classmethod
    def open(cls, path: str, create: bool = False) -> Optional["TxnIndex"]:
        """The index at ``path`` mapped read-write (``create``: the writer, which
        makes it first if it is missing) or read-only (None while it does not exist)."""
        if create:
            cls.ensure(path)
        flags = (os.O_RDWR if create else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise KafkaStorageError(f"cannot open transaction index {path}: {e}") from None
        return cls(path, fd, create)

    @staticmethod
    def ensure(path: str) -> None:
        """Make an empty index at ``path`` unless one exists. Anyone may: a
        read_committed reader makes it before it reads without the Python
        path (a transaction that starts later then finds the file it reads),
        the coordinator before its first write. The file is complete before
        it has its name, and ``link`` never replaces an existing index (two
        makers race harmlessly: one name, one inode)."""
        if os.path.exists(path):
            return
        tmp = f"{path}.{os.getpid()}.{time.monotonic_ns()}.tmp"
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                cap = 64
                os.ftruncate(fd, ENTRIES_AT + cap * ENTRY)
                head = np.zeros(ENTRIES_AT // 8, dtype=np.int64)
                head[F_LSO], head[F_CAPACITY] = -1, cap
                rows = head[HEADER // 8:].reshape(ROWS, ROW // 8)
                rows[:, 0] = rows[:, 2] = -1             # free rows, nothing open
                raw = bytearray(head.tobytes())
                raw[0:8] = MAGIC
                os.pwrite(fd, bytes(raw), 0)
            finally:
                os.close(fd)
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass
        except OSError as e:
            raise KafkaStorageError(f"cannot create transaction index {path}: {e}") from None
        finally:
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def _map(self) -> None:
        size = os.fstat(self._fd).st_size
        if size < ENTRIES_AT or (size - ENTRIES_AT) % ENTRY:
            raise CorruptRecord(f"transaction index {self.path} has {size} bytes, not a header, rows and entries")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if self._writable else 0)   # readers map it read-only
        mm = mmap.mmap(self._fd, size, mmap.MAP_SHARED, prot)
        if mm[0:8] != MAGIC:
            mm.close()
            raise CorruptRecord(f"transaction index {self.path} has a bad magic")
        old = self._mm
        self._mm = mm
        self.words = np.frombuffer(mm, dtype=np.int64, count=HEADER // 8)
        if self._writable:                       # the rows' C functions take the header and rows
            self.rows_words = np.frombuffer(mm, dtype=np.int64, count=ENTRIES_AT // 8)
            self._c_words = ffi.cast("int64_t *", self.rows_words.ctypes.data)
        self._mapped = (size - ENTRIES_AT) // ENTRY
        self._entries = np.frombuffer(mm, dtype=np.int64, offset=ENTRIES_AT,
                                      count=self._mapped * (ENTRY // 8)).reshape(self._mapped, ENTRY // 8)
        if old is not None:
            try:
                old.close()
            except BufferError:                  # a caller still holds a view: let GC drop it
                pass

    # ---------------------------------------------------------------- reads
    @property
    def lso(self) -> int:
        """First offset of the oldest open transaction, -1 when none is open."""
        return int(self.words[F_LSO])

    @property
    def count(self) -> int:
        return int(self.words[F_COUNT])

    def entries(self, start: int = 0) -> np.ndarray:
        """Published entries ``start..count-1`` as an (n, 4) int64 array copy:
        producer_id, first_offset, last_offset, marker_offset."""
        n = self.count
        if n > self._mapped:
            self._map()
        n = min(n, self._mapped)
        if start >= n:
            return np.empty((0, 4), dtype=np.int64)
        return np.array(self._entries[start:n])

    # --------------------------------------------------------------- writer
    def _check(self, rc: int, what: str) -> int:
        if rc < 0:
            raise_for(rc, f"{what} in transaction index {self.path}")
        return rc

    def open_row(self, producer_id: int, epoch: int, first_offset: int, start_ms: int) -> bool:
        """Open ``producer_id``'s transaction here at ``first_offset`` (the log
        end, loaded before its first record is appended); the LSO follows.
        ``ProducerFenced`` when the row has a higher epoch; False when an
        older instance's transaction holds it (the coordinator ends that first)."""
        rc = lib.shmq_txn_open_row(self._c_words, producer_id, epoch, first_offset, start_ms, ROW_LOCK_TIMEOUT_NS)
        if rc == lib.SHMQ_ERR_RETRY:
            return False
        self._check(rc, f"open the transaction of producer {producer_id}")
        return True

    def fence_row(self, producer_id: int, epoch: int) -> None:
        """Raise ``producer_id``'s row to ``epoch`` (unless an older transaction
        holds it open): an older instance can no longer open it."""
        self._check(lib.shmq_txn_fence_row(self._c_words, producer_id, epoch, ROW_LOCK_TIMEOUT_NS),
                    f"fence the row of producer {producer_id}")

    def close_row(self, producer_id: int, max_epoch: int) -> bool:
        """Close ``producer_id``'s open transaction (of an epoch up to
        ``max_epoch``) once its marker is written; the LSO moves on."""
        return self._check(lib.shmq_txn_close_row(self._c_words, producer_id, max_epoch, ROW_LOCK_TIMEOUT_NS),
                           f"close the transaction of producer {producer_id}") == 1

    def row(self, producer_id: int) -> Optional[Tuple[int, int, int]]:
        """(epoch, first_offset or -1, start_ms) of ``producer_id``'s row, None without one."""
        out = self._row_out
        if not self._check(lib.shmq_txn_row(self._c_words, producer_id, out, ROW_LOCK_TIMEOUT_NS),
                           f"read the row of producer {producer_id}"):
            return None
        return int(out[0]), int(out[1]), int(out[2])

    def refresh_lso(self) -> None:
        """Recompute the LSO from the rows (after a crash of a row writer)."""
        self._check(lib.shmq_txn_refresh_lso(self._c_words, ROW_LOCK_TIMEOUT_NS), "refresh the LSO")

    def add_aborted(self, producer_id: int, runs: List[Tuple[int, int]], marker_offset: int = -1) -> int:
        """Publish aborted runs not published yet (a coordinator finishing its
        predecessor's abort may add the same runs again); returns how many."""
        have = {(int(r[0]), int(r[1])) for r in self.entries()[:, :2]} if self.count else set()
        new = [(f, la) for f, la in runs if (producer_id, f) not in have]
        if not new:
            return 0
        n = self.count
        need = n + len(new)
        if need > self._mapped:
            cap = max(need, self._mapped * 2)
            os.ftruncate(self._fd, ENTRIES_AT + cap * ENTRY)
            self._map()
            self.words[F_CAPACITY] = cap
        for k, (first, last) in enumerate(new):
            self._entries[n + k] = (producer_id, first, last, marker_offset)
        self.words[F_COUNT] = need           # after the entries: readers never see a half entry
        return len(new)

    def close(self) -> None:
        self.words = self._entries = self._c_words = self.rows_words = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
            self._mm = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass


class AbortedFilter:
    """A reader's view of a partition's aborted ranges: which offsets of a
    read to drop, with a cost of one load per read while nothing changed."""

    def __init__(self, index: TxnIndex) -> None:
        self.index = index
        self._seen = 0
        self._starts = np.empty(0, dtype=np.int64)
        self._ends = np.empty(0, dtype=np.int64)
        self._max_end = -1

    @property
    def max_end(self) -> int:
        """The last offset of any aborted range refreshed in, -1 when none."""
        return self._max_end

    def refresh(self) -> None:
        n = self.index.count
        if n == self._seen:
            return
        new = self.index.entries(self._seen)
        self._seen += len(new)
        starts = np.concatenate([self._starts, new[:, 1]])
        ends = np.concatenate([self._ends, new[:, 2]])
        order = np.argsort(starts, kind="stable")
        self._starts, self._ends = starts[order], ends[order]
        self._max_end = int(ends.max()) if len(ends) else -1

    def keep_mask(self, offsets: np.ndarray) -> Optional[np.ndarray]:
        """None when every offset is kept (the common case), else a bool mask."""
        if self._max_end < 0 or len(offsets) == 0:
            return None
        lo, hi = int(offsets[0]), int(offsets[-1])
        if lo > self._max_end or hi < self._starts[0]:
            return None
        idx = np.searchsorted(self._starts, offsets, side="right") - 1
        inside = (idx >= 0) & (offsets <= self._ends[np.maximum(idx, 0)])
        if not inside.any():
            return None
        return ~inside


def lso_limit(end: int, index: Optional[TxnIndex]) -> int:
    """The last stable offset given the log's end (or high watermark) loaded
    first and the partition's index (None: no transaction ever touched it)."""
    if index is None:
        return end
    lso = index.lso
    return end if lso < 0 or lso > end else lso


def stable_offset(log: Any, index_path: str) -> int:
    """The last stable offset of ``log`` (a PartitionLog) right now: read_committed's high watermark."""
    end = log.high_watermark                     # before the LSO (see the module doc)
    index = TxnIndex.open(index_path)
    try:
        return lso_limit(end, index)
    finally:
        if index is not None:
            index.close()
