"""Coordinator side of the shared offsets table (``shmq.offsets_table``).

Contract: clients commit on the hot path by storing an offset into their
entry of ``<root>/offsets.table`` (no RPC). ``OffsetsTableSync`` owns the
table for the coordinator:

* ``slot(group, topic, partition)`` gives the entry index of a
  (group, topic, partition), allocating it (and journaling the mapping) on
  first use; the entry starts at the committed offset (or -1).
* ``sync()`` reads every entry, journals (fsync) each offset that differs
  from the store and returns the partitions that changed. The server calls
  it every few ms, before answering ``fetch_offsets``, and on ``sync_offsets``
  (how ``commit(asynchronous=False)`` becomes durable).
* ``write_through()`` copies an offset committed by RPC into the table, so
  the table never holds an older value than the store.
* On takeover, ``reconcile()`` takes the table's value where it has one
  (it is the newest: clients store there first) and the journal's where the
  table has none, so a committed offset never goes backwards.

A value read from the table is bounds-checked (>= -1); a bad one is logged
and ignored.

Fencing (consumer groups): each entry's generation word holds the generation
of the partition's current owner (0: no owner). A commit carries the
committer's generation packed into the offset word; ``sync()`` journals it
only if that generation equals the entry's generation word, else it is a
stale member's commit: it is dropped (never journaled) and the entry is put
back to the last good value. The group code changes generation words only
under the server lock, after a ``sync()``, so everything an owner committed
before losing a partition is journaled. Callers serialise calls (the server's lock).
"""
from __future__ import annotations

import logging
import os
import time
from typing import Dict, List, Set, Tuple

import numpy as np

from ..offsets_table import OffsetsTable, entry_key, pack, unpack
from ..root import Root
from .durable import DurableStore
from .store import slot_key, split_slot_key

__all__ = ["OffsetsTableSync"]

log = logging.getLogger("shmq.coordinator.offsets")


class OffsetsTableSync:
    """The table, the store, and the journaling of hot-path commits."""

    def __init__(self, root: Root, db: DurableStore) -> None:
        self.root = root
        self.db = db
        path = root.offsets_table_path
        self.table: OffsetsTable
        try:
            self.table = OffsetsTable(path) if os.path.exists(path) else OffsetsTable.create(path)
        except (ValueError, PermissionError) as e:
            log.error("offsets table %s is unusable (%s); creating a new one", path, e)
            os.unlink(path)
            self.table = OffsetsTable.create(path)
        self._keys: List[str] = []
        self._idx = np.zeros(0, dtype=np.int64)
        self._last = np.zeros(0, dtype=np.int64)
        self._dirty = True
        self._bad: Set[int] = set()
        self.rejected = 0
        self.reconcile()

    # -------------------------------------------------------------- slots
    def slot(self, group: str, topic: str, partition: int) -> Tuple[int, int]:
        """(index, committed offset or -1) of the entry, allocated if new."""
        store = self.db.store
        key = slot_key(group, topic, partition)
        index = store.offset_slots.get(key)
        cur = store.committed(group, topic, partition)
        if index is None:
            rec = store.prepare_offset_slot(group, topic, partition, -1)
            index = self.table.allocate(entry_key(group, topic, partition), cur[0] if cur else -1)
            rec["index"] = index
            self.db.commit([rec])
            self._dirty = True
        return index, cur[0] if cur else -1

    def release_topic(self, slots: Dict[str, int], topic: str) -> None:
        """Free the entries of a deleted topic (``slots``: the mapping before the delete)."""
        for key, index in slots.items():
            if split_slot_key(key)[1] == topic:
                self.table.release(index)
        self._dirty = True

    def write_through(self, group: str, topic: str, partition: int, offset: int) -> None:
        index = self.db.store.offset_slots.get(slot_key(group, topic, partition))
        if index is not None:
            self.table.store(index, offset, time.time_ns() // 1_000_000, self.table.generation(index))
            self._dirty = True

    def index(self, group: str, topic: str, partition: int) -> int:
        """The entry index, allocating it if new."""
        return self.slot(group, topic, partition)[0]

    def set_owner_generation(self, group: str, topic: str, partition: int, generation: int) -> None:
        """Who may commit ``group``'s offset of the partition (0: no group member)."""
        self.table.set_generation(self.index(group, topic, partition), generation)

    def release_group(self, group: str, slots: Dict[str, int]) -> None:
        """Free the entries of a deleted group (``slots``: the mapping before the delete)."""
        for key, index in slots.items():
            if split_slot_key(key)[0] == group:
                self.table.release(index)
        self._dirty = True

    # --------------------------------------------------------------- sync
    def _rebuild(self) -> None:
        slots = self.db.store.offset_slots
        self._keys = list(slots)
        self._idx = np.fromiter((slots[k] for k in self._keys), dtype=np.int64, count=len(self._keys))
        last = []
        for k, i in zip(self._keys, self._idx.tolist()):
            cur = self.db.store.committed(*split_slot_key(k))
            raw = self.table.load_raw(i)
            # The table word if it holds the stored offset (any generation), else the store's.
            last.append(raw if cur is not None and unpack(raw)[0] == cur[0] else (cur[0] if cur else -1))
        self._last = np.array(last, dtype=np.int64)
        self._dirty = False

    def sync(self) -> List[Tuple[str, int]]:
        """Journal every offset the table holds that the store does not; the changed partitions."""
        if self._dirty:
            self._rebuild()
        if not len(self._keys):
            return []
        now = self.table.offsets_view()[self._idx].copy()      # each entry read once
        gens = self.table.generations_view()[self._idx].copy()
        changed = np.flatnonzero(now != self._last)
        if not len(changed):
            return []
        by_group: Dict[str, List[List[object]]] = {}
        out: List[Tuple[str, int]] = []
        store = self.db.store
        for i in changed.tolist():
            raw = int(now[i])
            off, gen = unpack(raw)
            group, topic, p = split_slot_key(self._keys[i])
            if raw < -1:
                if i not in self._bad:
                    self._bad.add(i)
                    log.error("offsets table entry %d (%s %s-%d) holds %d; ignored", int(self._idx[i]),
                              group, topic, p, off)
                continue
            cur = store.committed(group, topic, p)
            owner = int(gens[i])
            if raw != -1 and gen != owner:
                # A stale member (it lost the partition) committed: drop it, restore the entry.
                good = pack(cur[0], owner) if cur else -1
                index = int(self._idx[i])
                if self.table.load_raw(index) == raw:
                    self.table.offsets_view()[index] = good
                self._last[i] = good
                self.rejected += 1
                log.warning("dropped a stale commit of %s %s-%d: offset %d by generation %d (owner "
                            "generation %d)", group, topic, p, off, gen, owner)
                continue
            self._last[i] = raw
            if off == -1 or (cur is not None and cur[0] == off):
                continue
            by_group.setdefault(group, []).append([topic, p, off, cur[1] if cur else ""])
            out.append((topic, p))
        ts = time.time_ns() // 1_000_000
        self.db.commit([{"op": "commit_offsets", "group": g, "offsets": offs, "ts": ts}
                        for g, offs in by_group.items()])
        return out

    def reconcile(self) -> None:
        """After a takeover: re-check every entry's key, then merge table and store."""
        store = self.db.store
        for key, index in list(store.offset_slots.items()):
            group, topic, p = split_slot_key(key)
            ek = entry_key(group, topic, p)
            cur = store.committed(group, topic, p)
            if not 0 <= index < self.table.capacity or self.table.find(ek) != index:
                new = self.table.allocate(ek, cur[0] if cur else -1)
                log.warning("offsets table entry of %s %s-%d was lost; now entry %d", group, topic, p, new)
                self.db.commit([store.prepare_offset_slot(group, topic, p, new)])
            elif cur is not None and self.table.load(index) == -1:
                self.table.store(index, cur[0], 0, self.table.generation(index))
        self._dirty = True
        changed = self.sync()
        if changed:
            log.info("took %d newer committed offset(s) from the offsets table", len(changed))
        # Group membership is not recovered (members rejoin): nobody owns anything yet.
        self.had_owners = False
        for index in store.offset_slots.values():
            if 0 <= index < self.table.capacity:
                if self.table.generation(index) != 0:
                    self.had_owners = True
                self.table.set_generation(index, 0)

    def close(self) -> None:
        self.table.close()
