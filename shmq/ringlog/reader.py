"""LogReader: reads a partition log from an offset, as records or in bulk.

Each ``read`` is one C call that copies complete frames from the mapping into
this reader's private buffer, re-checks the slot generation (so a recycled
segment is never returned as data) and decodes the batches into an array of
record views; Python then slices keys and values out of the private copy.

Blocking: ``read(timeout=...)`` spins briefly, then sleeps on the log's futex
until a producer commits. A reader stuck behind a frame that stays incomplete
past the log's unblock timeout pads it over itself, so it never waits on a dead
producer for good even when no housekeeper runs.

Reader positions: a reader takes a slot in the partition's reader table
(log.h) and every read or seek publishes the next offset it needs there, from
C. In a block-mode log (the default) a tethered reader (the default) keeps
producers from recycling any segment it has not read; ``tether=False`` opts
out (Aeron's untethered subscriber). ``close()`` gives the slot back; a reader
whose process dies has its slot freed by whoever notices (pid + process start
time). In an overwriting ring, a reader that was overrun gets
``OffsetOutOfRange`` saying how many records it missed (also counted in its
slot, for ``shmq status``).

Isolation: ``set_read_committed(index_path)`` makes the reader Kafka's
``read_committed``: it never returns a record at or past the partition's
last stable offset (the first offset of the oldest open transaction, from
the transaction index, ``shmq.ringlog.txn``) nor one of an aborted
transaction. Without it (``read_uncommitted``) every record is returned;
control batches never are, in either mode.

A reader is used by one thread at a time.
"""
from __future__ import annotations

import os

import time
from functools import partial
from itertools import repeat
from typing import Any, Iterable, List, NamedTuple, Optional, Tuple

import numpy as np

from ..errors import OffsetOutOfRange
from ..native import ffi, lib, raise_for
from .log import PartitionLog
from .records import LogRecord, decode_headers
from .txn import AbortedFilter, TxnIndex, lso_limit

_new_tuple = tuple.__new__
_VIEW_FIELDS = 8  # offset, timestamp, key_pos, key_len, value_pos, value_len, headers_pos, headers_count
BULK_VIEWS = 65536  # most records one read_arrays decodes (64 bytes of views each)
_UNSET = object()


class RecordArrays(NamedTuple):
    """Records in bulk: parallel arrays, plus the value and key bytes.

    ``values`` is a 2-D uint8 array when every value has the same width,
    otherwise a list of bytes (``None`` for null); ``keys`` likewise, and
    ``None`` when every key is null.
    """

    offsets: np.ndarray
    timestamps: np.ndarray
    values: Any
    keys: Any


class LogReader:
    """Reads records of one log from ``offset`` onward."""

    def __init__(self, log: PartitionLog, offset: int = 0, *, buffer_bytes: int = 1 << 20,
                 max_records: int = 8192, check_crc: bool = True, spin_us: int = 50, tether: bool = True,
                 kind: int = 0, label: str = "") -> None:
        self.log = log
        self._h = log._h
        # The buffer holds the largest frame the log allows, but a read copies
        # at most buffer_bytes (cache-sized) unless one frame needs more.
        self._read_len = buffer_bytes
        self._buf_len = max(buffer_bytes, log.max_frame_bytes)
        self._buf: Any = None        # allocated by the first read (read_frames copies into the caller's buffer)
        self._max = max_records
        self._views = ffi.new("shmq_record_view[]", max_records)
        self._view_arr = np.frombuffer(ffi.buffer(self._views), dtype=np.int64).reshape(max_records, _VIEW_FIELDS)
        self._used = ffi.new("int64_t *")
        self._bulk: Any = None       # (views, capacity, numpy view) of read_arrays, made on first use
        self._cur = ffi.new("shmq_cursor *")
        self._unblock = ffi.new("shmq_unblock_state *")
        self.check_crc = 1 if check_crc else 0
        self._ready = lib.shmq_log_ready
        self.spin_ns = spin_us * 1000
        self._txn_path: Optional[str] = None     # read_committed: the partition's transaction index
        self._txn: Optional[TxnIndex] = None
        self._aborted: Optional[AbortedFilter] = None
        self.tethered = bool(tether)
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        rc = lib.shmq_log_reader_register(self._h, self._cur, offset, lib.SHMQ_READER_TETHERED if tether else 0,
                                          kind, label.encode()[:23])
        if rc < 0:
            log._fail(rc, "register a reader")
        try:
            self.seek(offset)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give this reader's slot in the reader table back: it no longer
        holds producers back. Idempotent."""
        cur = getattr(self, "_cur", None)
        if cur is not None and cur.reader_id and self.log._h is not None:
            lib.shmq_log_reader_release(self.log._h, cur)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "LogReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -------------------------------------------------------------- position
    @property
    def position(self) -> int:
        """The offset of the next record this reader returns."""
        return int(self._cur.next_offset)

    def seek(self, offset: int) -> None:
        """Move to ``offset``. Below the log start: ``OffsetOutOfRange``."""
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"offset must be a non-negative int, got {offset!r}")
        rc = lib.shmq_log_seek(self._h, self._cur, offset)
        if rc < 0:
            self.log._fail(rc, "seek", offset)

    def seek_to_time(self, timestamp_ms: int) -> int:
        """Move to the first record whose timestamp >= ``timestamp_ms`` (or the
        end if none) and return its offset. Exact when timestamps do not
        decrease within the log (the time index is a max-so-far index)."""
        off = lib.shmq_log_seek_time(self._h, self._cur, int(timestamp_ms))
        if off < 0:
            self.log._fail(off, f"seek to time {timestamp_ms}")
        return int(off)

    # ------------------------------------------------------------- isolation
    def set_read_committed(self, index_path: str) -> None:
        """Read only committed transactional records (and every other one)
        below the last stable offset; ``index_path`` is the partition's
        transaction index (``Root.txn_index_path``), which may not exist yet."""
        self._txn_path = index_path

    def stable_offsets(self) -> Tuple[int, int]:
        """(last stable offset, high watermark): read_committed reads below the first."""
        end = self.log.high_watermark            # before the LSO: see shmq.ringlog.txn
        idx = self._txn
        if idx is None:
            if self._txn_path is None:
                return end, end
            idx = self._txn = TxnIndex.open(self._txn_path)
            if idx is None:                      # no transaction ever touched the partition
                return end, end
            self._aborted = AbortedFilter(idx)
        return lso_limit(end, idx), end

    def committed_words(self) -> Tuple[Any, int]:
        """What the C poll (``shmq/native/fastpath.c``) needs to read
        read_committed without this Python path: the index's header words
        (an int64 numpy array over the mapping; it keeps the mapping alive)
        and the count of aborted ranges it may ignore, or -1 when an aborted
        range ends at or past the position (this path filters those). The
        index is made if it is missing, so a transaction that starts later
        publishes its LSO where the C poll looks. (None, -1) when the
        transaction directory does not exist yet."""
        if self._txn is None:
            assert self._txn_path is not None
            if not os.path.isdir(os.path.dirname(self._txn_path)):
                return None, -1
            TxnIndex.ensure(self._txn_path)
            self.stable_offsets()                # opens it and its filter
        idx, f = self._txn, self._aborted
        assert idx is not None and f is not None
        count = idx.count
        f.refresh()
        return idx.words, (count if f.max_end < self._cur.next_offset else -1)

    def _fill_committed(self, max_records: int, timeout: float, views: Any = None) -> int:
        """``_fill`` for read_committed: up to the LSO, aborted records dropped."""
        arr = self._view_arr if views is None else \
            np.frombuffer(ffi.buffer(views[0]), dtype=np.int64).reshape(views[1], _VIEW_FIELDS)
        deadline = -1.0
        spin = self.spin_ns
        while True:
            limit, end = self.stable_offsets()
            if self._cur.next_offset < limit:
                n = self._read_once(max_records, views)
                if n < 0:
                    self.log._fail(n, "read", int(self._cur.next_offset))
                if n > 0:
                    n = self._committed_only(n, limit, arr)
                    if n > 0:
                        return n
                    continue                     # only aborted records: read on
            if timeout <= 0:
                return 0
            now = time.monotonic()
            if deadline < 0:
                deadline = now + timeout
            left = deadline - now
            if left <= 0:
                return 0
            if limit == end:
                # Waiting for records: the futex, in slices (a transaction may start meanwhile).
                slice_ns = min(int(left * 1e9), self.log.config.unblock_timeout_ms * 1_000_000 // 2 + 1, 10_000_000)
                lib.shmq_log_wait(self._h, self._cur, spin, slice_ns)
                spin = 0
                if self._cur.next_offset < self.stable_offsets()[0] and self._read_ready_blocked():
                    rc = lib.shmq_log_unblock_cursor(self._h, self._cur, self._unblock)
                    if rc < 0:
                        self.log._fail(rc, "unblock", int(self._cur.next_offset))
            else:
                time.sleep(min(left, 0.0005))   # waiting for an open transaction to end

    def _read_ready_blocked(self) -> bool:
        """True when the next frame is not complete yet (a claim in flight or dead)."""
        return not self._ready(self._h, self._cur)

    def _committed_only(self, n: int, limit: int, arr: np.ndarray) -> int:
        """Drop decoded views (rows of ``arr``) at or past ``limit`` (the reader
        goes back there) and those of aborted transactions; returns how many are left."""
        if arr[n - 1, 0] >= limit:
            n = int(np.searchsorted(arr[:n, 0], limit))
            self.seek(limit)
        f = self._aborted
        if f is not None and n:
            f.refresh()
            keep = f.keep_mask(arr[:n, 0])
            if keep is not None:
                kept = arr[:n][keep]
                n = len(kept)
                arr[:n] = kept
        return n

    # ------------------------------------------------------------------ read
    def _fill(self, max_records: int, timeout: float, views: Any = None) -> int:
        """Read up to max_records views into self._views (or ``views``, a
        (cdata, capacity) pair); returns the count."""
        if self._txn_path is not None:
            return self._fill_committed(max_records, timeout, views)
        if timeout <= 0 and not self._ready(self._h, self._cur):
            return 0  # a spinning caller's empty poll: one two-argument C call
        n = self._read_once(max_records, views)
        if n == 0 and timeout > 0:
            n = self._wait_and_read(max_records, timeout, views)
        if n < 0:
            if n == lib.SHMQ_ERR_OUT_OF_RANGE:
                self._overrun()
            self.log._fail(n, "read", int(self._cur.next_offset))
        return n

    def _overrun(self) -> None:
        """The ring recycled records this reader had not read (overwrite mode):
        count them in its slot and say how many."""
        position = int(self._cur.next_offset)
        start = self.log.start_offset
        missed = max(0, start - position)
        if self._cur.reader_id:
            lib.shmq_log_reader_slot(self._h, self._cur.reader_id - 1).missed += missed
        raise OffsetOutOfRange(f"read from {self.log.name} at offset {position}: the ring recycled it; this reader "
                               f"missed {missed} records (offsets {position} to {start - 1}; the log starts at "
                               f"{start})", topic=self.log.topic, partition=self.log.partition, offset=position,
                               missed=missed)

    def _read_once(self, max_records: int, views: Any = None) -> int:
        if self._buf is None:
            self._buf = ffi.new("uint8_t[]", self._buf_len)
        out, cap = (self._views, self._max) if views is None else views
        while True:
            before = self._cur.next_offset
            n = lib.shmq_log_read(self._h, self._cur, self._buf, self._read_len, out,
                                  min(max_records, cap), self.check_crc, self._used)
            if n == lib.SHMQ_ERR_TOO_LARGE and self._read_len < self._buf_len:  # one frame bigger than _read_len
                n = lib.shmq_log_read(self._h, self._cur, self._buf, self._buf_len, out,
                                      min(max_records, cap), self.check_crc, self._used)
            # Nothing decoded but the cursor moved: it passed control batches
            # (transaction markers, no records): read on.
            if n != 0 or self._cur.next_offset == before:
                return n

    def _wait_and_read(self, max_records: int, timeout: float, views: Any = None) -> int:
        import time
        deadline = time.monotonic() + timeout
        spin = self.spin_ns
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return 0
            # Wake at least every unblock interval to check for a dead claim.
            slice_ns = min(int(left * 1e9), self.log.config.unblock_timeout_ms * 1_000_000 // 2 + 1)
            lib.shmq_log_wait(self._h, self._cur, spin, slice_ns)
            spin = 0
            n = self._read_once(max_records, views)
            if n != 0:
                return n
            rc = lib.shmq_log_unblock_cursor(self._h, self._cur, self._unblock)
            if rc < 0:
                return rc

    def read(self, max_records: int = 1024, timeout: float = 0.0) -> List[LogRecord]:
        """Up to ``max_records`` records from the position; waits up to
        ``timeout`` seconds when there is nothing yet. Raises
        ``OffsetOutOfRange`` when the position was recycled (overwrite mode)
        and ``CorruptRecord`` for bytes that do not parse."""
        n = self._fill(max_records, timeout)
        if n == 0:
            return []
        offs, ts, keys, values, headers = self._columns(n)
        return list(map(_new_tuple, repeat(LogRecord, n), zip(offs, ts, keys, values, headers)))

    def read_as(self, cls: Any, topic: str, partition: int, max_records: int = 1024,
                timeout: float = 0.0) -> List[Any]:
        """Like ``read`` but builds ``cls`` tuples laid out as
        (topic, partition, offset, key, value, headers, timestamp_ms), the
        field order of ``shmq.Message``, without an intermediate record."""
        n = self._fill(max_records, timeout)
        if n == 0:
            return []
        offs, ts, keys, values, headers = self._columns(n)
        return list(map(_new_tuple, repeat(cls, n),
                        zip(repeat(topic, n), repeat(partition, n), offs, keys, values, headers, ts)))

    def _columns(self, n: int) -> Tuple[List[int], List[int], Iterable[Any], Iterable[Any], Iterable[Any]]:
        """The n decoded records as columns. Records are built from these by
        ``map``/``zip`` (no Python bytecode per record): Python-level work per
        record is what bounds a consumer's rate."""
        # Keys and values are sliced straight out of the private buffer: one
        # copy each (the C read made the other, out of shared memory).
        data = ffi.buffer(self._buf, self._used[0])
        if n < 16:  # numpy's fixed cost per call outweighs its speed here
            rows = self._view_arr[:n].tolist()
            return ([r[0] for r in rows], [r[1] for r in rows],
                    [None if r[3] < 0 else data[r[2]:r[2] + r[3]] for r in rows],
                    [None if r[5] < 0 else data[r[4]:r[4] + r[5]] for r in rows],
                    _headers(data, [r[6] for r in rows], [r[7] for r in rows]))
        v = self._view_arr[:n]
        return (v[:, 0].tolist(), v[:, 1].tolist(), _slices(data, v[:, 2], v[:, 3]), _slices(data, v[:, 4], v[:, 5]),
                _headers(data, v[:, 6].tolist(), v[:, 7].tolist()) if v[:, 7].any() else repeat((), n))

    def read_arrays(self, max_records: int = 8192, timeout: float = 0.0) -> Optional[RecordArrays]:
        """Like ``read`` but in bulk: numpy arrays of offsets and timestamps,
        and values/keys as a 2-D uint8 array when they are fixed-width."""
        # Bulk reads decode into views of their own, as many as asked for (up
        # to BULK_VIEWS): a read stops when its views are full, and a batch
        # larger than that would be copied and decoded again by every read.
        want = min(max(max_records, 1), BULK_VIEWS)
        if want > self._max and (self._bulk is None or self._bulk[1] < want):
            views = ffi.new("shmq_record_view[]", want)
            self._bulk = (views, want, np.frombuffer(ffi.buffer(views), dtype=np.int64).reshape(want, _VIEW_FIELDS))
        bulk = self._bulk if want > self._max else None
        views, arr = (self._views, self._view_arr) if bulk is None else (bulk[0], bulk[2])
        if self._txn_path is None and max_records >= 1:
            # One C call (shmq/native/fastpath.c read_arrays): the read, the
            # wait and the numpy arrays. read_committed stays in Python (the
            # LSO and aborted ranges), as does SHMQ_FASTPATH=0 (decided on
            # this reader's first bulk read).
            c_read = self.__dict__.get("_c_read", _UNSET)
            if c_read is _UNSET or (c_read is not None and c_read[0] is not views):
                c_read = self.__dict__["_c_read"] = self._c_read_args(views, want if bulk is not None else self._max)
            if c_read is not None:
                got = c_read[1](want, int(min(timeout, 1e9) * 1e9) if timeout > 0 else 0)
                if type(got) is int:
                    if got == lib.SHMQ_ERR_OUT_OF_RANGE:
                        self._overrun()
                    self.log._fail(got, "read", int(self._cur.next_offset))
                return got
        n = self._fill(max_records, timeout, None if bulk is None else bulk[:2])
        if n == 0:
            return None
        v = arr[:n]
        return RecordArrays(v[:, 0].copy(), v[:, 1].copy(), self._gather(n, 0, v[:, 4], v[:, 5], views),
                            self._gather(n, 1, v[:, 2], v[:, 3], views))

    def _c_read_args(self, views: Any, capacity: int) -> Optional[Tuple[Any, Any]]:
        """(views, the C bulk read bound to this reader's cursor, buffer and
        views), or None: the Python path reads (the extension is off)."""
        from ..native import fastpath
        if not fastpath.enabled():
            return None
        if self._buf is None:
            self._buf = ffi.new("uint8_t[]", self._buf_len)
        h = fastpath.handle
        return views, partial(fastpath._ext.read_arrays, RecordArrays, h(self._h), h(self._cur),  # type: ignore
                              h(self._buf), self._buf_len, self._read_len, h(views), capacity, self.check_crc,
                              h(self._unblock), self.spin_ns, self.log.config.unblock_timeout_ms * 1_000_000 // 2 + 1)

    def _gather(self, n: int, field: int, pos: np.ndarray, lens: np.ndarray, views: Any) -> Any:
        """A field of n records: a 2-D uint8 array when all have one width
        (copied in C), else a list of bytes (None for null)."""
        used = self._used[0]
        width = int(lens[0])
        if field == 1 and width < 0 and not (lens >= 0).any():
            return None  # no record has a key
        if width >= 0:
            out = np.empty((n, width), dtype=np.uint8)
            if lib.shmq_gather_fixed(self._buf, used, views, n, field, width,
                                     ffi.from_buffer("uint8_t[]", out, require_writable=True)) == 0:
                return out
        data = ffi.buffer(self._buf, used)[:]
        return [None if ln < 0 else data[p:p + ln] for p, ln in zip(pos.tolist(), lens.tolist())]

    def read_frames(self, buf: Any) -> int:
        """Replication copy: committed frames from the position into ``buf`` (a
        writable bytearray or numpy array) as a raw frame stream (log.h), ignoring
        the high watermark. Returns the bytes written (0: nothing yet)."""
        n = lib.shmq_log_read_frames(self._h, self._cur, ffi.from_buffer(buf, require_writable=True), len(buf),
                                     self.check_crc)
        if n < 0:
            self.log._fail(n, "read frames", int(self._cur.next_offset))
        return n

    def __iter__(self) -> "LogReader":
        return self

    def __next__(self) -> LogRecord:
        recs = self.read(1, timeout=3600.0)
        while not recs:
            recs = self.read(1, timeout=3600.0)
        return recs[0]


def _slices(data: bytes, pos: np.ndarray, lens: np.ndarray) -> Iterable[Optional[bytes]]:
    """data[pos:pos+len] per record (None where len is -1), built in C."""
    if (lens >= 0).all():
        return list(map(data.__getitem__, map(slice, pos.tolist(), (pos + lens).tolist())))
    if (lens < 0).all():
        return repeat(None, len(lens))
    return [None if ln < 0 else data[p:p + ln] for p, ln in zip(pos.tolist(), lens.tolist())]


def _headers(buf: Any, positions: List[int], counts: List[int]) -> List[Any]:
    """Decoded headers per record (``()`` for none); copies the buffer once
    to bytes, and only when some record has headers."""
    if not any(counts):
        return [()] * len(counts)
    data = buf[:]
    end = len(data)
    return [decode_headers(data, p, c, end) if c else () for p, c in zip(positions, counts)]


def frame_epochs(buf: Any, n: int, last_epoch: int) -> List[Tuple[int, int]]:
    """(epoch, start offset) of every data batch in the first ``n`` bytes of a raw
    frame stream whose partitionLeaderEpoch rises above the one before
    (starting from ``last_epoch``)."""
    cbuf = ffi.from_buffer(buf)
    if not 0 <= n <= len(cbuf):
        raise ValueError(f"n={n} outside the buffer of {len(cbuf)} bytes")
    out: List[Tuple[int, int]] = []
    epochs = ffi.new("int32_t[64]")
    starts = ffi.new("int64_t[64]")
    while True:
        k = lib.shmq_frames_epochs(cbuf, n, last_epoch, epochs, starts, 64)
        if k < 0:
            raise_for(k, "find leader epochs in copied frames")
        out.extend((int(epochs[j]), int(starts[j])) for j in range(k))
        if k < 64:
            return out
        last_epoch = int(epochs[k - 1])
