"""Hot-path metadata published by the coordinator in a shared read-only mapping.

Layout of ``<root>/metadata.map`` (every word a native-endian uint64, read and
written whole; 64-byte header, then the payload area)::

    0   magic     b"SHMQMAP1"
    8   version   seqlock counter: odd while the coordinator writes, +2 per publish
    16  length    bytes of payload in use
    24  capacity  bytes of the payload area (file size - 64)
    32  moved     1 once this file was replaced by a new one: reopen by path
    40  writer    pid of the coordinator that writes it
    48  bell      uint32 futex word: +1 and woken after every publish, and
                  when the file is replaced (``MetadataBell`` sleeps on it)
    64  payload   compact JSON: {"topics": {name: {topic_id, partitions, paths, config}}}
                  (replicated topics add leaders, leader_epochs, replicas, isr,
                  offline and replica_paths, one entry per partition; paths
                  then names each partition's leader log, null while it has none)

Protocol: the writer (one coordinator, holder of the root's lock) sets
version odd, writes payload and length, sets version even. A reader reads
version (retry while odd), copies length and payload, re-reads version and
retries if it changed; ``length`` is bounds-checked against ``capacity`` and
the mapping before use. Readers cache the decoded payload and re-decode only
when ``version`` changed, so the per-call check is one 8-byte load. A payload
that outgrows the file, or a new coordinator, writes a new file (temp +
rename) whose version continues the old one, and sets ``moved`` in the old
one. Stores rely on x86-64 TSO ordering (Python stores happen in program
order and every word is one aligned 8-byte copy).
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from ..errors import ClusterAuthorizationFailed, CorruptRecord, NotCoordinator
from ..native import ffi, lib

__all__ = ["MetadataPublisher", "MetadataView", "MetadataBell", "TopicMetadata"]

MAGIC = b"SHMQMAP1"
HEADER = 64
OFF_VERSION, OFF_LENGTH, OFF_CAPACITY, OFF_MOVED, OFF_WRITER, OFF_BELL = 8, 16, 24, 32, 40, 48
_W_VERSION, _W_MOVED = OFF_VERSION // 8, OFF_MOVED // 8
_U64 = struct.Struct("@Q")     # native: one memcpy of 8 bytes (aligned), never byte by byte
_U32 = struct.Struct("@I")


def _map_header(path: str, *, writable: bool) -> Optional[mmap.mmap]:
    """The header of the metadata map at ``path`` if it is ours and looks like one, else None."""
    try:
        fd = os.open(path, (os.O_RDWR if writable else os.O_RDONLY) | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if st.st_uid != os.geteuid() or st.st_size < HEADER:
            return None
        m = mmap.mmap(fd, HEADER, prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0))
    finally:
        os.close(fd)
    if m[0:8] != MAGIC:
        m.close()
        return None
    return m


def _ring(m: mmap.mmap) -> None:
    """Bump the bell word of mapping ``m`` and wake whoever sleeps on it."""
    _U32.pack_into(m, OFF_BELL, (_U32.unpack_from(m, OFF_BELL)[0] + 1) & 0xFFFFFFFF)
    buf = ffi.from_buffer(m)
    try:
        lib.shmq_futex_wake(ffi.cast("uint32_t *", buf + OFF_BELL), 0)
    finally:
        ffi.release(buf)


def _encode(payload: Dict[str, Any]) -> bytes:
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True)
class TopicMetadata:
    """What a producer or consumer needs about a topic, without an RPC."""

    name: str
    topic_id: str
    partitions: int
    paths: List[Optional[str]]  # the log clients use, per partition (the leader's; None: no leader)
    config: Dict[str, Any]
    leaders: Optional[List[int]] = None          # replicated topics only, per partition:
    leader_epochs: Optional[List[int]] = None
    replicas: Optional[List[List[int]]] = None
    isr: Optional[List[List[int]]] = None
    offline: Optional[List[List[int]]] = None
    replica_paths: Optional[List[List[str]]] = None


class MetadataPublisher:
    """Writer side (the active coordinator)."""

    def __init__(self, path: str, payload: Dict[str, Any], initial_capacity: int = 64 << 10) -> None:
        self.path = path
        self._map: Optional[mmap.mmap] = None
        self._capacity = 0
        self._version = 2
        previous = self._map_previous()
        if previous is not None:       # continue the version of a previous coordinator
            self._version = (_U64.unpack_from(previous, OFF_VERSION)[0] + 2) & ~1
        self._map = previous
        data = _encode(payload)
        self._new_file(max(initial_capacity, 2 * len(data)), data)

    def _map_previous(self) -> Optional[mmap.mmap]:
        """The file a previous coordinator published, mapped writable so it
        can be marked ``moved`` for readers that still map it."""
        return _map_header(self.path, writable=True)

    def _new_file(self, capacity: int, payload: bytes) -> None:
        tmp = f"{self.path}.{os.getpid()}.tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, HEADER + capacity)
            m = mmap.mmap(fd, HEADER + capacity)
        finally:
            os.close(fd)
        m[0:8] = MAGIC
        _U64.pack_into(m, OFF_CAPACITY, capacity)
        _U64.pack_into(m, OFF_WRITER, os.getpid())
        m[HEADER:HEADER + len(payload)] = payload
        _U64.pack_into(m, OFF_LENGTH, len(payload))
        _U64.pack_into(m, OFF_VERSION, self._version)
        os.rename(tmp, self.path)
        old, self._map, self._capacity = self._map, m, capacity
        if old is not None:
            _U64.pack_into(old, OFF_MOVED, 1)
            _ring(old)
            old.close()

    def publish(self, payload: Dict[str, Any]) -> int:
        """Publish ``payload``; returns the new (even) version."""
        data = _encode(payload)
        if len(data) > self._capacity:
            self._version += 2
            self._new_file(max(2 * self._capacity, len(data) * 2), data)
            return self._version
        m = self._map
        assert m is not None
        _U64.pack_into(m, OFF_VERSION, self._version + 1)
        m[HEADER:HEADER + len(data)] = data
        _U64.pack_into(m, OFF_LENGTH, len(data))
        self._version += 2
        _U64.pack_into(m, OFF_VERSION, self._version)
        _ring(m)
        return self._version

    def close(self) -> None:
        m, self._map = self._map, None
        if m is not None:
            m.close()


class MetadataView:
    """Reader side: cheap version check, cached decode, automatic reopen.

    Safe to share between threads (a reopen swaps references atomically;
    ``close`` must not race other calls)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: Optional[mmap.mmap] = None
        self._words: Optional[memoryview] = None
        self._ino = -1
        self._version = -1
        self._topics: Dict[str, TopicMetadata] = {}
        self._open()

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotCoordinator(f"no coordinator has published metadata at {self.path}") from None
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid() or st.st_mode & 0o022:
                raise ClusterAuthorizationFailed(f"metadata map {self.path} is owned by uid {st.st_uid} "
                                                 f"or writable by others; refusing it")
            if st.st_size < HEADER:
                raise CorruptRecord(f"metadata map {self.path} is too short ({st.st_size} bytes)")
            m = mmap.mmap(fd, st.st_size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        if m[0:8] != MAGIC:
            m.close()
            raise CorruptRecord(f"metadata map {self.path} has a bad magic")
        # The old mapping is dropped, not closed: another thread may be reading
        # it right now; it is unmapped when the last reference goes.
        # Header words as native uint64: an index is one aligned 8-byte load.
        self._words = memoryview(m)[:HEADER].cast("Q")
        self._map, self._ino, self._version = m, st.st_ino, -1

    def _release(self) -> None:
        words, self._words = self._words, None
        if words is not None:
            words.release()
        m, self._map = self._map, None
        if m is not None:
            m.close()

    def version(self) -> int:
        """The published version (one 8-byte load); changes on every publish."""
        w = self._words
        assert w is not None
        if w[_W_MOVED]:
            self._open()
            w = self._words
            assert w is not None
        return int(w[_W_VERSION])

    def check_replaced(self) -> bool:
        """Reopen if a new coordinator replaced the file (an inode check: a
        syscall, so call it when something looks stale, not per record)."""
        try:
            ino = os.stat(self.path).st_ino
        except FileNotFoundError:
            return False
        if ino != self._ino:
            self._open()
            return True
        return False

    def _read(self, timeout: float = 1.0) -> Dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            m = self._map
            assert m is not None
            if _U64.unpack_from(m, OFF_MOVED)[0]:
                self._open()
                continue
            v1 = _U64.unpack_from(m, OFF_VERSION)[0]
            if not v1 & 1:
                n = _U64.unpack_from(m, OFF_LENGTH)[0]
                cap = _U64.unpack_from(m, OFF_CAPACITY)[0]
                if cap > len(m) - HEADER or n > cap:
                    if _U64.unpack_from(m, OFF_VERSION)[0] == v1:
                        raise CorruptRecord(f"metadata map {self.path}: length {n} / capacity {cap} "
                                            f"exceed the mapping of {len(m)} bytes")
                    continue
                data = m[HEADER:HEADER + n]
                if _U64.unpack_from(m, OFF_VERSION)[0] == v1:
                    self._version = int(v1)
                    try:
                        return dict(json.loads(data))
                    except ValueError:
                        raise CorruptRecord(f"metadata map {self.path}: payload at version {v1} "
                                            f"is not valid JSON") from None
            if time.monotonic() > deadline:
                raise NotCoordinator(f"metadata map {self.path} stayed mid-write for {timeout}s "
                                     f"(the coordinator died while publishing?)")
            time.sleep(0)

    def refresh(self) -> bool:
        """Re-read the payload if the version changed; True if it did."""
        w = self._words
        if w is not None and not w[_W_MOVED] and w[_W_VERSION] == self._version:
            return False
        if self.version() == self._version:
            return False
        payload = self._read()
        topics = {}
        for name, t in payload.get("topics", {}).items():
            topics[name] = TopicMetadata(name=name, topic_id=t["topic_id"], partitions=t["partitions"],
                                         paths=list(t["paths"]), config=dict(t["config"]),
                                         leaders=t.get("leaders"), leader_epochs=t.get("leader_epochs"),
                                         replicas=t.get("replicas"), isr=t.get("isr"), offline=t.get("offline"),
                                         replica_paths=t.get("replica_paths"))
        self._topics = topics
        return True

    def topic(self, name: str) -> Optional[TopicMetadata]:
        """The topic's metadata (None if it does not exist), fresh as of now."""
        w = self._words
        if w is None or w[_W_MOVED] or w[_W_VERSION] != self._version:
            self.refresh()
        return self._topics.get(name)

    def topics(self) -> Dict[str, TopicMetadata]:
        """Every topic, fresh as of now."""
        self.refresh()
        return dict(self._topics)

    def close(self) -> None:
        self._release()


class MetadataBell:
    """Sleeps until the coordinator publishes new metadata (or replaces the
    file): a futex wait on the header's bell word, GIL released. It maps the
    header itself, so one thread can sleep here while others use a
    ``MetadataView``. Not thread-safe (one sleeper)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._map: Optional[mmap.mmap] = None
        self._buf: Any = None
        self._word: Any = None
        self._seen = -1

    def _open(self) -> bool:
        self.close()
        self._map = _map_header(self.path, writable=False)
        if self._map is None:
            return False
        self._buf = ffi.from_buffer(self._map)
        self._word = ffi.cast("uint32_t *", self._buf + OFF_BELL)
        self._seen = int(self._word[0])
        return True

    def wait(self, timeout: float) -> bool:
        """Sleep up to ``timeout`` s; True if metadata was published (or the
        file replaced) since the previous call returned True."""
        if self._map is None or _U64.unpack_from(self._map, OFF_MOVED)[0]:
            if not self._open():
                time.sleep(timeout)
                return False
            return True
        cur = int(self._word[0])
        if cur == self._seen:
            lib.shmq_futex_wait(self._word, cur, int(timeout * 1e9))
            cur = int(self._word[0])
        changed = cur != self._seen or bool(_U64.unpack_from(self._map, OFF_MOVED)[0])
        self._seen = cur
        return changed

    def close(self) -> None:
        if self._buf is not None:
            ffi.release(self._buf)
            self._buf = self._word = None
        if self._map is not None:
            self._map.close()
            self._map = None
