"""The shared committed-offsets table: commits without an RPC.

``<root>/offsets.table`` is created and owned by the coordinator; clients map
it read-write. Each (group, topic, partition) that ever committed has one
64-byte entry (a cache line of its own, so members committing different
partitions never contend)::

    header (64 bytes)
      0   magic       b"SHMQOFT1"
      8   capacity    number of entries
      16  version     layout version (1)
    entry i at 64 + 64*i
      0   key         xxh64("group\\0topic\\0partition") + 1 (0 = free); written
                      once by the coordinator when it allocates the entry
      8   offset      committed offset (next offset to read), -1 none;
                      written by the member that owns the partition, packed
                      with the committer's generation: ``gen << 48 | offset``
                      (gen 0..32767, offset < 2**48)
      16  generation  owner generation of the partition in its group, written
                      by the coordinator on assignment (0 = no owner: anyone
                      not in a group may commit with gen 0)
      24  commit_ms   wall-clock time of the last commit (informational)

Invariants: ``key`` has one writer (the coordinator, before it hands out
the index), so a client that received the index reads it stably. ``offset``
is written with one aligned 8-byte store (numpy element store, a single mov
on x86-64 and aarch64), so the coordinator never reads a torn value; it
polls entries and journals every change, and a ``sync`` commit asks it to do
so at once. The table outlives a coordinator crash (it lives in the root),
so a new coordinator takes the newer of table and journal and a committed
offset never goes backwards on takeover.
"""
from __future__ import annotations

import mmap
import os
import struct
from typing import Dict, Iterator, Optional, Tuple

import numpy as np
import xxhash

MAGIC = b"SHMQOFT1"
HEADER = 64
ENTRY = 64
WORDS = ENTRY // 8
F_KEY, F_OFFSET, F_GENERATION, F_COMMIT_MS = 0, 1, 2, 3
GEN_SHIFT = 48
OFFSET_MASK = (1 << GEN_SHIFT) - 1
MAX_GENERATION = (1 << 15) - 1


def pack(offset: int, generation: int = 0) -> int:
    """The offset word of a commit by ``generation`` (-1 stays -1)."""
    if offset < 0:
        return -1
    return (generation << GEN_SHIFT) | (offset & OFFSET_MASK)


def unpack(word: int) -> Tuple[int, int]:
    """(offset, generation) of an offset word; (-1, 0) for none."""
    if word < 0:
        return -1, 0
    return word & OFFSET_MASK, word >> GEN_SHIFT
DEFAULT_CAPACITY = 65536


def entry_key(group: str, topic: str, partition: int) -> int:
    """The non-zero key of an entry (xxh64 + 1, wrapping past 0)."""
    h = xxhash.xxh64_intdigest(f"{group}\0{topic}\0{partition}".encode())
    return (h + 1) & 0xFFFFFFFFFFFFFFFF or 1


class OffsetsTable:
    """A mapping of the offsets table. ``create`` is for the coordinator."""

    def __init__(self, path: str) -> None:
        self.path = path
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_uid != os.geteuid():
                raise PermissionError(f"{path} is owned by uid {st.st_uid}, not by this user")
            if st.st_size < HEADER:
                raise ValueError(f"{path} is shorter than its header")
            self._mm = mmap.mmap(fd, st.st_size)
        finally:
            os.close(fd)
        magic, capacity, _version = struct.unpack_from("<8sQQ", self._mm, 0)
        if magic != MAGIC or HEADER + capacity * ENTRY > len(self._mm):
            raise ValueError(f"{path} is not an offsets table (magic {magic!r}, capacity {capacity})")
        self.capacity = int(capacity)
        self._words = np.frombuffer(self._mm, dtype=np.int64, offset=HEADER,
                                    count=self.capacity * WORDS).reshape(self.capacity, WORDS)
        self._keys = self._words[:, F_KEY].view(np.uint64)
        # The same words as a flat memoryview of int64: indexing it reads and
        # writes Python ints with one aligned 8-byte access and no numpy
        # scalar objects (the hot path of commits). Word of entry i, field f:
        # word_index(i, f).
        self.words = memoryview(self._mm).cast("q")

    @staticmethod
    def word_index(index: int, field: int) -> int:
        return HEADER // 8 + index * WORDS + field

    @classmethod
    def create(cls, path: str, capacity: int = DEFAULT_CAPACITY) -> "OffsetsTable":
        """Create the file (temp + rename, so readers never see it half made)."""
        tmp = f"{path}.tmp.{os.getpid()}"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            size = HEADER + capacity * ENTRY
            os.posix_fallocate(fd, 0, size)
            os.pwrite(fd, struct.pack("<8sQQ", MAGIC, capacity, 1), 0)
        finally:
            os.close(fd)
        os.rename(tmp, path)
        return cls(path)

    # ------------------------------------------------------------ coordinator
    def allocate(self, key: int, offset: int = -1) -> int:
        """Index of the entry for ``key``, allocating a free one (coordinator only)."""
        found = self.find(key)
        if found is not None:
            return found
        free = np.flatnonzero(self._keys == 0)
        if len(free) == 0:
            raise MemoryError(f"offsets table {self.path} is full ({self.capacity} entries)")
        i = int(free[0])
        self._words[i, F_OFFSET] = offset
        self._words[i, F_GENERATION] = 0
        self._keys[i] = np.uint64(key)  # last: the entry exists once its key does
        return i

    def find(self, key: int) -> Optional[int]:
        hits = np.flatnonzero(self._keys == np.uint64(key))
        return int(hits[0]) if len(hits) else None

    def release(self, index: int) -> None:
        self._keys[index] = np.uint64(0)
        self._words[index, F_OFFSET] = -1

    def entries(self) -> Iterator[Tuple[int, int, int]]:
        """(index, key, offset) of every allocated entry."""
        used = np.flatnonzero(self._keys != 0)
        raw = self._words[used, F_OFFSET]
        offs = np.where(raw < 0, raw, raw & OFFSET_MASK)
        keys = self._keys[used]
        return zip(used.tolist(), keys.tolist(), offs.tolist())

    def set_generation(self, index: int, generation: int) -> None:
        self._words[index, F_GENERATION] = generation

    def generation(self, index: int) -> int:
        return int(self._words[index, F_GENERATION])

    def generations_view(self) -> np.ndarray:
        return self._words[:, F_GENERATION]

    # ----------------------------------------------------------------- client
    def store(self, index: int, offset: int, commit_ms: int = 0, generation: int = 0) -> None:
        """Commit ``offset`` by ``generation`` into entry ``index`` (one aligned 8-byte store)."""
        w = self._words[index]
        if commit_ms:
            w[F_COMMIT_MS] = commit_ms
        w[F_OFFSET] = pack(offset, generation)

    def load(self, index: int) -> int:
        """The committed offset of entry ``index`` (-1: none)."""
        return unpack(int(self._words[index, F_OFFSET]))[0]

    def load_raw(self, index: int) -> int:
        return int(self._words[index, F_OFFSET])

    def offsets_view(self) -> np.ndarray:
        """The offset column as a strided int64 view (for hot-path stores)."""
        return self._words[:, F_OFFSET]

    def snapshot(self) -> Dict[int, int]:
        return {i: o for i, _, o in self.entries()}

    def close(self) -> None:
        self.words.release()
        self._words = None  # type: ignore[assignment]
        self._keys = None  # type: ignore[assignment]
        try:
            self._mm.close()
        except BufferError:
            pass  # a view still exists somewhere; the mapping goes with the process
