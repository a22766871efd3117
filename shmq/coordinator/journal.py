"""Append-only metadata journal with checksummed records, plus snapshots.

Contract:

* The journal file starts with a 16-byte header: ``b"SHMQJNL1"`` and the
  little-endian uint64 sequence number of its first record. Records follow,
  each ``[uint32 length][uint32 crc32c][payload]`` where ``payload`` is compact
  UTF-8 JSON of one dict and the CRC32C covers the length field and payload.
  Record ``i`` of the file has sequence ``base + i``.
* ``append()`` writes a record; ``commit()`` makes every appended record
  durable (``os.fsync``) before the caller acknowledges anything.
* A snapshot file is ``b"SHMQSNP1"``, uint64 sequence of the last record it
  includes, uint32 length, uint32 crc32c (of seq, length and payload),
  payload. It is written to a temporary file, fsynced and renamed over the
  old one; then the journal is replaced (same way) by an empty one whose base
  is ``seq + 1``. A crash between the two leaves a journal whose first
  records are already in the snapshot: recovery skips them by sequence.
* ``recover()`` returns (snapshot state or None, records after it). A torn or
  corrupt tail (short record, bad length, CRC mismatch, undecodable payload)
  is truncated away with a logged warning; everything before it is kept.
  A corrupt snapshot or journal header is an error (``KafkaStorageError``):
  silently starting empty would lose every topic.

Single writer: only the active coordinator (holder of the root's flock)
opens these files.
"""
from __future__ import annotations

import json
import logging
import os
import struct
from typing import Any, Dict, List, Optional, Tuple

from ..errors import KafkaStorageError
from ..native import ffi, lib

__all__ = ["Journal", "write_snapshot", "read_snapshot", "crc32c", "MAX_RECORD_BYTES"]

log = logging.getLogger("shmq.coordinator.journal")

JOURNAL_MAGIC = b"SHMQJNL1"
SNAPSHOT_MAGIC = b"SHMQSNP1"
_HEAD = struct.Struct("<8sQ")          # magic, base sequence
_REC = struct.Struct("<II")            # length, crc32c
_SNAP = struct.Struct("<8sQII")        # magic, seq, length, crc32c
MAX_RECORD_BYTES = 64 << 20


def crc32c(data: bytes, crc: int = 0) -> int:
    """CRC32C (Castagnoli) from the C core."""
    return int(lib.shmq_crc32c(crc, ffi.from_buffer(data), len(data)))


def _encode(obj: Dict[str, Any]) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def _open_excl(path: str) -> int:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _fsync_dir(path: str) -> None:
    fd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: str, data: bytes) -> None:
    tmp = path + ".tmp"
    fd = _open_excl(tmp)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    _fsync_dir(path)


def write_snapshot(path: str, seq: int, state: Dict[str, Any]) -> None:
    """Atomically replace the snapshot at ``path`` with ``state`` as of ``seq``."""
    payload = _encode(state)
    head = struct.pack("<QI", seq, len(payload))
    crc = crc32c(head + payload)
    _write_atomic(path, _SNAP.pack(SNAPSHOT_MAGIC, seq, len(payload), crc) + payload)


def read_snapshot(path: str) -> Optional[Tuple[int, Dict[str, Any]]]:
    """(seq, state) from the snapshot at ``path``; None if there is none."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _SNAP.size:
        raise KafkaStorageError(f"metadata snapshot {path} is truncated ({len(data)} bytes)")
    magic, seq, n, crc = _SNAP.unpack_from(data)
    payload = data[_SNAP.size:_SNAP.size + n]
    if magic != SNAPSHOT_MAGIC or len(payload) != n or crc32c(struct.pack("<QI", seq, n) + payload) != crc:
        raise KafkaStorageError(f"metadata snapshot {path} is corrupt (bad magic, length or CRC32C)")
    return seq, json.loads(payload)


class Journal:
    """The open journal file (append side)."""

    def __init__(self, path: str, fd: int, base_seq: int, next_seq: int) -> None:
        self.path = path
        self._fd = fd
        self.base_seq = base_seq
        self.next_seq = next_seq
        self.size = os.fstat(fd).st_size
        self._dirty = False

    @classmethod
    def recover(cls, path: str, snapshot_path: str) -> Tuple["Journal", Optional[Dict[str, Any]],
                                                             List[Dict[str, Any]]]:
        """Open (or create) the journal; return it, the snapshot state and the
        records to replay after it, in order."""
        snap = read_snapshot(snapshot_path)
        snap_seq, state = (snap if snap is not None else (0, None))
        if not os.path.exists(path):
            _write_atomic(path, _HEAD.pack(JOURNAL_MAGIC, snap_seq + 1))
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
            if len(data) < _HEAD.size or data[:8] != JOURNAL_MAGIC:
                raise KafkaStorageError(f"metadata journal {path} has a bad header; refusing to "
                                        f"start from nothing (move it away to start empty)")
            _, base = _HEAD.unpack_from(data)
            if base > snap_seq + 1:
                raise KafkaStorageError(f"metadata journal {path} starts at record {base} but the "
                                        f"snapshot ends at {snap_seq}: records are missing")
            records, good_end = _scan(data, path)
            if good_end < len(data):
                log.warning("metadata journal %s: torn or corrupt tail at byte %d (%d bytes, after "
                            "record %d) truncated; %d records before it recovered",
                            path, good_end, len(data) - good_end, base + len(records) - 1, len(records))
                os.ftruncate(fd, good_end)
                os.fsync(fd)
            os.lseek(fd, 0, os.SEEK_END)
        except BaseException:
            os.close(fd)
            raise
        skip = snap_seq + 1 - base
        j = cls(path, fd, base, base + len(records))
        return j, state, records[skip:]

    def append(self, record: Dict[str, Any]) -> int:
        """Append one record (not yet durable); returns its sequence number."""
        payload = _encode(record)
        if len(payload) > MAX_RECORD_BYTES:
            raise KafkaStorageError(f"metadata record of {len(payload)} bytes is too large")
        lb = struct.pack("<I", len(payload))
        crc = crc32c(lb + payload)
        buf = lb + struct.pack("<I", crc) + payload
        n = os.write(self._fd, buf)
        if n != len(buf):
            raise KafkaStorageError(f"short write to metadata journal {self.path}")
        self.size += n
        self._dirty = True
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def commit(self) -> None:
        """Make every appended record durable."""
        if self._dirty:
            os.fsync(self._fd)
            self._dirty = False

    def compact(self, snapshot_path: str, state: Dict[str, Any]) -> None:
        """Write a snapshot of ``state`` (which includes every appended record)
        and start an empty journal after it."""
        self.commit()
        last = self.next_seq - 1
        write_snapshot(snapshot_path, last, state)
        _write_atomic(self.path, _HEAD.pack(JOURNAL_MAGIC, last + 1))
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)
        self.base_seq = last + 1
        self.size = _HEAD.size

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


def _scan(data: bytes, path: str) -> Tuple[List[Dict[str, Any]], int]:
    """Decode records from ``data``; return them and the end of the last good one."""
    pos = _HEAD.size
    out: List[Dict[str, Any]] = []
    while pos + _REC.size <= len(data):
        n, crc = _REC.unpack_from(data, pos)
        end = pos + _REC.size + n
        if n == 0 or n > MAX_RECORD_BYTES or end > len(data):
            break
        payload = data[pos + _REC.size:end]
        if crc32c(data[pos:pos + 4] + payload) != crc:
            break
        try:
            rec = json.loads(payload)
        except ValueError:
            break
        if not isinstance(rec, dict):
            break
        out.append(rec)
        pos = end
    return out, pos
