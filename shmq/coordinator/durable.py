"""The store made durable: every record is journaled and fsynced before it is applied.

Contract: ``DurableStore.open(root)`` recovers snapshot + journal (truncating
a torn tail, see ``journal``). ``commit(records)`` appends the records,
fsyncs once, then applies them; when it returns the change survives a crash
of the coordinator. Every ``snapshot_every`` records (or ``snapshot_bytes``
of journal) the state is snapshotted and the journal restarted. The caller
serialises calls (the server holds one lock).
"""
from __future__ import annotations

import logging
from typing import Iterable

from ..root import Root
from .journal import Journal
from .store import Record, Store

__all__ = ["DurableStore"]

log = logging.getLogger("shmq.coordinator.durable")


class DurableStore:
    """A ``Store`` whose changes are journaled first."""

    def __init__(self, root: Root, journal: Journal, store: Store, *, snapshot_every: int = 10_000,
                 snapshot_bytes: int = 16 << 20) -> None:
        self.root = root
        self.journal = journal
        self.store = store
        self.snapshot_every = snapshot_every
        self.snapshot_bytes = snapshot_bytes

    @classmethod
    def open(cls, root: Root, **kwargs: int) -> "DurableStore":
        journal, state, records = Journal.recover(root.journal_path, root.snapshot_path)
        store = Store(state)
        for rec in records:
            store.apply(rec)
        log.info("metadata recovered from %s: snapshot %s, %d journal records replayed, %d topics, %d groups",
                 root.meta_dir, "yes" if state is not None else "none", len(records),
                 len(store.topics), len(store.offsets))
        return cls(root, journal, store, **kwargs)

    def commit(self, records: Iterable[Record]) -> None:
        """Journal, fsync, then apply ``records`` (in order)."""
        recs = list(records)
        if not recs:
            return
        for rec in recs:
            self.journal.append(rec)
        self.journal.commit()
        for rec in recs:
            self.store.apply(rec)
        if (self.journal.next_seq - self.journal.base_seq >= self.snapshot_every
                or self.journal.size >= self.snapshot_bytes):
            self.snapshot()

    def snapshot(self) -> None:
        """Snapshot the state now and restart the journal after it."""
        self.journal.compact(self.root.snapshot_path, self.store.state())
        log.info("metadata snapshot written at record %d", self.journal.base_seq - 1)

    def close(self) -> None:
        self.journal.close()
