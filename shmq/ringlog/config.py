"""Configuration of one partition log, validated with errors that name the field."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidConfig

OVERFLOW_MODES = ("overwrite", "block")


@dataclass(frozen=True)
class LogConfig:
    """Sizes and policies fixed when a partition log is created.

    * ``segment_bytes``: size of one ring slot's ``.log`` file.
    * ``segment_count``: slots in the ring (all allocated up front).
    * ``index_interval_bytes``: one offset-index and time-index entry per this
      many bytes of log.
    * ``overflow``: ``"block"`` (default) recycles the oldest segment only once
      every live tethered reader and every consumer group's committed offset
      is past it; a producer facing a full ring waits (``max_block_ms``), so
      nothing a reader has not read is lost. ``"overwrite"`` (opt-in, for
      latest-value use) recycles it regardless; an overrun reader gets
      ``OffsetOutOfRange`` with the count of records it missed.
    * ``unblock_timeout_ms``: how long a claimed frame may stay incomplete
      before it is padded over.
    """

    segment_bytes: int = 8 << 20
    segment_count: int = 8
    index_interval_bytes: int = 4096
    overflow: str = "block"
    unblock_timeout_ms: int = 1000

    def __post_init__(self) -> None:
        def need_int(name: str, lo: int, hi: int) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise InvalidConfig(f"{name} must be an int, got {type(v).__name__}")
            if not lo <= v <= hi:
                raise InvalidConfig(f"{name}={v} is out of range [{lo}, {hi}]")

        need_int("segment_bytes", 4096, 1 << 30)
        if self.segment_bytes % 8:
            raise InvalidConfig(f"segment_bytes={self.segment_bytes} must be a multiple of 8")
        need_int("segment_count", 2, 1024)
        need_int("index_interval_bytes", 64, self.segment_bytes)
        need_int("unblock_timeout_ms", 1, 3_600_000)
        if self.overflow not in OVERFLOW_MODES:
            raise InvalidConfig(f"overflow={self.overflow!r} must be one of {OVERFLOW_MODES}")
