"""LeaderEpochCache: Kafka's leader-epoch checkpoint of one replica log.

Contract: the file ``<log dir>/leader-epoch-checkpoint`` lists, in Kafka's
text format (version line, count line, then ``<epoch> <start offset>`` per
line), the first offset of every leader epoch present in the log, epochs
and offsets both increasing. It is written by the one process hosting the
replica (temp file, fsync, rename), so a reader sees the old or the new list.

A leader appends ``(epoch, log end)`` when it takes over; a follower appends
the epochs it finds in the batches it copies. ``end_offset_for(epoch)``
answers Kafka's OffsetsForLeaderEpoch: where ``epoch`` ended in this log, so
a follower truncates exactly the records the new leader does not have.
"""
from __future__ import annotations

import os
from typing import List, Optional, Tuple

from ..errors import CorruptRecord

__all__ = ["LeaderEpochCache", "FILE_NAME"]

FILE_NAME = "leader-epoch-checkpoint"
VERSION = 0


class LeaderEpochCache:
    """The (epoch, start offset) list of one log directory."""

    def __init__(self, directory: str, *, fsync: bool = True) -> None:
        self.path = os.path.join(directory, FILE_NAME)
        self.fsync = fsync
        self.entries: List[Tuple[int, int]] = self.read(directory)

    @staticmethod
    def read(directory: str) -> List[Tuple[int, int]]:
        """The entries stored in ``directory`` (empty when there is no file)."""
        path = os.path.join(directory, FILE_NAME)
        try:
            with open(path) as f:
                lines = f.read().split("\n")
        except FileNotFoundError:
            return []
        try:
            if int(lines[0]) != VERSION:
                raise ValueError(f"version {lines[0]}")
            n = int(lines[1])
            out = [(int(a), int(b)) for a, b in (line.split() for line in lines[2:2 + n])]
        except (ValueError, IndexError) as e:
            raise CorruptRecord(f"leader-epoch checkpoint {path} is malformed: {e}") from None
        return out

    def _write(self) -> None:
        tmp = f"{self.path}.tmp"
        text = f"{VERSION}\n{len(self.entries)}\n" + "".join(f"{e} {o}\n" for e, o in self.entries)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, text.encode())
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)

    @property
    def latest_epoch(self) -> int:
        return self.entries[-1][0] if self.entries else -1

    def assign(self, epoch: int, start_offset: int) -> None:
        """Record that ``epoch`` starts at ``start_offset`` (ignored unless newer)."""
        if self.entries and epoch <= self.entries[-1][0]:
            return
        # An epoch that starts where the previous one does replaces it (it holds no record).
        while self.entries and self.entries[-1][1] >= start_offset:
            self.entries.pop()
        self.entries.append((epoch, start_offset))
        self._write()

    def end_offset_for(self, epoch: int, log_end: int) -> Tuple[int, int]:
        """(largest epoch <= ``epoch`` held here, the offset where it ends);
        (-1, -1) when every epoch here is newer."""
        found: Optional[int] = None
        for i, (e, _start) in enumerate(self.entries):
            if e <= epoch:
                found = i
        if found is None:
            return -1, -1
        e = self.entries[found][0]
        end = self.entries[found + 1][1] if found + 1 < len(self.entries) else log_end
        return e, end

    def truncate_from_end(self, offset: int) -> None:
        """Forget epochs that start at or after ``offset`` (the log was truncated there)."""
        keep = [(e, o) for e, o in self.entries if o < offset]
        if keep != self.entries:
            self.entries = keep
            self._write()

    def clear(self) -> None:
        if self.entries:
            self.entries = []
            self._write()
