"""Partitioners: where a record goes when the caller does not say.

``murmur2_random`` (the default, as librdkafka): keyed records go to
``murmur2(key) % n`` exactly as Kafka's Java client puts them; null keys are
sticky (one random partition until it changes every ``sticky_records``).
``xxhash`` uses xxh64 of the key instead; ``roundrobin`` ignores keys.
"""
from __future__ import annotations

import random
from typing import Callable, Dict, Optional, Tuple

import xxhash

from .errors import InvalidConfig
from .native import fastpath, lib

PARTITIONERS = ("murmur2_random", "murmur2", "xxhash", "roundrobin")
CACHE_LIMIT = 1 << 16


class Partitioner:
    """Chooses a partition for (key, partition count). With the C fast path
    in use, ``Partitioner(...)`` returns its C twin (same rules, one state
    shared by the C and Python sends)."""

    def __new__(cls, name: str = "murmur2_random", sticky_records: int = 1000) -> "Partitioner":
        if name not in PARTITIONERS:
            raise InvalidConfig(f"partitioner={name!r} must be one of {PARTITIONERS}")
        fast = fastpath.partitioner(name, sticky_records) if cls is Partitioner else None
        return fast if fast is not None else super().__new__(cls)

    def __init__(self, name: str = "murmur2_random", sticky_records: int = 1000) -> None:
        self.name = name
        self._sticky_left = 0
        self._sticky = 0
        self._rr = 0
        self._sticky_records = sticky_records
        self._cache: Dict[Tuple[bytes, int], int] = {}
        self._hash: Optional[Callable[[bytes, int], int]]
        if name in ("murmur2_random", "murmur2"):
            self._hash = self._murmur2
        elif name == "xxhash":
            self._hash = self._xxhash
        else:
            self._hash = None

    @staticmethod
    def _murmur2(key: bytes, n: int) -> int:
        return lib.shmq_murmur2_partition(key, len(key), n)

    @staticmethod
    def _xxhash(key: bytes, n: int) -> int:
        return xxhash.xxh64_intdigest(key) % n

    def __call__(self, key: Optional[bytes], n: int) -> int:
        if key is not None and self._hash is not None:
            # Key spaces are usually small: remember placements (bounded).
            hit = self._cache.get((key, n))
            if hit is None:
                hit = self._hash(key, n)
                if len(self._cache) >= CACHE_LIMIT:
                    self._cache.clear()
                self._cache[(key, n)] = hit
            return hit
        if self.name == "roundrobin" or self.name == "murmur2":
            self._rr += 1
            return self._rr % n
        if self._sticky_left <= 0 or self._sticky >= n:
            self._sticky = random.randrange(n)
            self._sticky_left = self._sticky_records
        self._sticky_left -= 1
        return self._sticky
