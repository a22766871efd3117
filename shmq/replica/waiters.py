"""Event-driven sleep of an idle replica process: threads asleep in the kernel ring one bell.

A thread can sleep on one futex only, and a replica process hosts many
partitions. So while its main loop is idle (``ReplicaProcess._loop``), it
sleeps on a ``threading.Event`` (the bell) that these threads ring:

* ``LogWaiter``: one per hosted partition that waits for commits (a
  follower: the leader's log past what it copied; a leader alone in its
  ISR: its own log past its high watermark). It sleeps in
  ``shmq_log_sleep_frames`` (one futex sleep per ``SLICE_S``, GIL released)
  and rings when frames are there.
* ``MetadataWaiter``: one per process; sleeps on the metadata map's bell
  word (``MetadataBell``) and rings on every publish, so a new leader or a
  changed ISR is applied at once.

Lifetime invariant (no thread ever touches unmapped memory): a
``LogWaiter`` maps the log it watches itself and is the only one to close
that mapping, so the main thread may close or remap its own mappings at any
time. Targets are plain values ``(path, inode, offset)`` handed over under a
lock; a waiter re-maps when the path or inode changes. Each sleep lasts at
most ``SLICE_S``, after which the waiter looks at its target (or at stop)
again: an idle waiter costs one wake-up per ``SLICE_S``.
"""
from __future__ import annotations

import logging
import threading
from typing import Optional, Tuple

from ..coordinator.metamap import MetadataBell
from ..native import ffi, lib
from ..ringlog import PartitionLog

__all__ = ["LogWaiter", "MetadataWaiter", "SLICE_S"]

log = logging.getLogger("shmq.replica")

SLICE_S = 2.0

Target = Tuple[str, int, int]      # (log path, control-block inode, offset to wait beyond)


class LogWaiter(threading.Thread):
    """Rings ``bell`` when the log at the target's path has frames past the target offset."""

    def __init__(self, bell: threading.Event, name: str) -> None:
        super().__init__(name=f"shmq-wait-{name}", daemon=True)
        self.bell = bell
        self._cond = threading.Condition()
        self._target: Optional[Target] = None
        self._stopped = False
        self._plog: Optional[PartitionLog] = None
        self._mapped: Optional[Tuple[str, int]] = None
        self._cur = ffi.new("shmq_cursor *")
        self._at = -1                        # the offset the cursor was sought to (-1: none)

    def watch(self, target: Optional[Target]) -> None:
        """Wait beyond ``target`` from now on (None: wait for nothing)."""
        with self._cond:
            if target != self._target:
                self._target = target
                self._cond.notify()

    def stop(self) -> None:
        """Exit within ``SLICE_S`` (the thread unmaps what it mapped)."""
        with self._cond:
            self._stopped = True
            self._cond.notify()

    def run(self) -> None:
        try:
            while True:
                with self._cond:
                    while self._target is None and not self._stopped:
                        self._cond.wait()
                    if self._stopped:
                        return
                    target = self._target
                assert target is not None
                if self._wait(target):
                    self._at = -1                   # re-seek for the next target, even the same offset
                    with self._cond:
                        if self._target == target:
                            self._target = None     # rung once per target: the main loop sets the next
                    self.bell.set()
        finally:
            self._unmap()

    def _wait(self, target: Target) -> bool:
        """Sleep up to ``SLICE_S`` for frames past the target; True if there are
        (or the log cannot be waited on: the main loop then looks itself)."""
        path, ino, offset = target
        try:
            if self._mapped != (path, ino):
                self._unmap()
                self._plog = PartitionLog(path)
                self._mapped = (path, ino)
            assert self._plog is not None
            if self._at != offset:
                # A bare cursor (reader_id 0): not in the log's reader table, it holds nobody back.
                rc = lib.shmq_log_seek(self._plog._h, self._cur, offset)
                if rc < 0:
                    self._plog._fail(rc, "seek", offset)
                self._at = offset
            return bool(lib.shmq_log_sleep_frames(self._plog._h, self._cur, int(SLICE_S * 1e9)))
        except Exception as e:           # gone, recreated, out of range: the main loop sorts it out
            log.debug("waiting on %s past %d: %s", path, offset, e)
            self._unmap()
            with self._cond:                 # not at once: the main loop may re-arm the same target
                self._cond.wait(SLICE_S / 4)
            return True

    def _unmap(self) -> None:
        self._at = -1
        plog, self._plog, self._mapped = self._plog, None, None
        if plog is not None:
            plog.close()


class MetadataWaiter(threading.Thread):
    """Rings ``bell`` whenever the coordinator publishes metadata."""

    def __init__(self, bell: threading.Event, path: str, stop: threading.Event) -> None:
        super().__init__(name="shmq-wait-metadata", daemon=True)
        self.bell = bell
        self._meta = MetadataBell(path)
        self._stop_event = stop

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                if self._meta.wait(5 * SLICE_S):
                    self.bell.set()
        finally:
            self._meta.close()
