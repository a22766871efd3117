"""Lifeline: learn of a replica process's death before its memory is torn down.

A replica process holds a robust process-shared mutex (in
``<root>/replica-<id>.alive``) for its whole life; the coordinator waits on
it in a thread. The kernel releases a dead thread's robust mutexes before it
unmaps the process's memory, so the waiter wakes within a millisecond even
when the process mapped gigabytes of log segments (its sockets close only
after the unmapping). See ``shmq/native/lifeline.h``.
"""
from __future__ import annotations

import mmap
import os

from .native import ffi, lib

__all__ = ["Lifeline", "DEAD", "FREE", "HELD"]

DEAD, FREE, HELD = lib.SHMQ_LIFELINE_DEAD, lib.SHMQ_LIFELINE_FREE, lib.SHMQ_LIFELINE_HELD


class Lifeline:
    """The lifeline file at ``path``; ``create`` (coordinator) or open (replica)."""

    def __init__(self, path: str, *, create: bool = False) -> None:
        self.path = path
        if create:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
                fresh = True
            except FileExistsError:
                fd, fresh = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), False
        else:
            fd, fresh = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC), False
        try:
            if fresh:
                os.ftruncate(fd, lib.SHMQ_LIFELINE_BYTES)
            if os.fstat(fd).st_size < lib.SHMQ_LIFELINE_BYTES:
                raise OSError(f"lifeline {path} is too short")
            self._map = mmap.mmap(fd, lib.SHMQ_LIFELINE_BYTES)
        finally:
            os.close(fd)
        self._mem = ffi.from_buffer(self._map)
        if fresh:
            rc = lib.shmq_lifeline_init(self._mem)
            if rc:
                raise OSError(-rc, f"initialising lifeline {path}")

    def hold(self) -> None:
        """Lock it for the rest of this process's life."""
        rc = lib.shmq_lifeline_hold(self._mem)
        if rc:
            raise OSError(-rc, f"locking lifeline {self.path}")

    def watch(self, timeout: float) -> int:
        """``DEAD`` when its holder died, ``FREE`` if nobody held it, ``HELD`` after ``timeout`` s."""
        rc = lib.shmq_lifeline_watch(self._mem, int(timeout * 1e9))
        if rc < 0:
            raise OSError(-rc, f"watching lifeline {self.path}")
        return int(rc)
