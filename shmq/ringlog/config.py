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
    * ``overflow``: ``"overwrite"`` recycles the oldest segment when the ring is
      full; ``"block"`` makes producers wait until the slowest reported
      position has moved past it.
    * ``unblock_timeout_ms``: how long a claimed frame may stay incomplete
      before it is padded over.
    """

    segment_bytes: int = 8 << 20
    segment_count: int = 8
    index_interval_bytes: int = 4096
    overflow: str = "overwrite"
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
