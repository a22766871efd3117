"""The workloads every system runs, and the message format every consumer checks.

A *workload* is a topology (``1:1`` one producer to one consumer, ``2:1`` two
producers to one consumer, ``1:2g`` one producer to a two-member consumer
group), a value size, and a kind:

* ``tput`` -- as fast as possible, ``mode`` ``single`` (one message per API
  call on both sides) or ``batch`` (the system's batch API, ``batch`` messages
  per call);
* ``lat`` -- one producer paced at ``rate`` messages/s, the consumer computes
  the one-way latency of every message (``consumer`` ``block``: a blocking
  receive, or ``spin``: a non-blocking receive in a busy loop).

Every value starts with an 8-byte little-endian tag ``(producer << 40) | seq``;
latency values add the send time (``time.perf_counter_ns``, CLOCK_MONOTONIC,
the same clock in every process) in bytes 8..16. The consumer counts the data
messages and sums the tags, so the parent can check the count and the checksum
against what was sent: a system that loses, duplicates or corrupts messages is
reported as such, never as fast. After its data a producer sends end markers
(tag ``SENTINEL``) so consumers know when to stop.
"""
from __future__ import annotations

import struct
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

SENTINEL = (1 << 64) - 1
PRODUCER_SHIFT = 40
U64 = struct.Struct("<Q")
U64x2 = struct.Struct("<QQ")
SIZES = (64, 1024, 65536)
TOPOLOGIES = ("1:1", "2:1", "1:2g")
TOPOLOGY_LABEL = {"1:1": "1 producer -> 1 consumer", "2:1": "2 producers -> 1 consumer",
                  "1:2g": "1 producer -> 2-member group"}
RATES = (10_000, 100_000)


def shape(topology: str) -> Tuple[int, int]:
    """(producers, consumers) of a topology."""
    return {"1:1": (1, 1), "2:1": (2, 1), "1:2g": (1, 2)}[topology]


def batch_rows(size: int) -> int:
    """Messages per batch call: about 512 KiB per batch, 8 to 8192 messages."""
    return max(8, min(8192, (512 << 10) // size))


def size_label(size: int) -> str:
    return f"{size >> 10} KiB" if size >= 1024 else f"{size} B"


@dataclass(frozen=True)
class Workload:
    kind: str                 # "tput" or "lat"
    topology: str             # "1:1", "2:1", "1:2g"
    size: int                 # value bytes
    mode: str = "single"      # "single" or "batch" (tput)
    count: int = 0            # data messages in all (all producers together)
    rate: int = 0             # lat: messages/s
    consumer: str = "block"   # lat: "block" or "spin"
    batch: int = 1            # messages per batch call (batch mode)

    @property
    def producers(self) -> int:
        return shape(self.topology)[0]

    @property
    def consumers(self) -> int:
        return shape(self.topology)[1]

    def per_producer(self) -> List[int]:
        """Data messages each producer sends (they add up to ``count``)."""
        p = self.producers
        return [self.count // p + (1 if i < self.count % p else 0) for i in range(p)]

    def expected_checksum(self) -> int:
        """Sum of the tags of every data message, modulo 2**64."""
        s = 0
        for i, n in enumerate(self.per_producer()):
            s += (i << PRODUCER_SHIFT) * n + n * (n - 1) // 2
        return s & SENTINEL

    def key(self) -> str:
        """A stable name: the row this workload makes in the report."""
        if self.kind == "tput":
            return f"tput {self.topology} {size_label(self.size)} {self.mode}"
        return f"lat {self.rate // 1000}k/s {size_label(self.size)} {self.consumer}"

    def scaled(self, factor: float) -> "Workload":
        """The same workload with ``factor`` times the messages (a warm-up, a slow peer)."""
        return self.with_count(int(self.count * factor))

    def with_count(self, n: int) -> "Workload":
        """The same workload with about ``n`` messages (rounded to whole batches per producer)."""
        unit = max(1, self.batch) * self.producers * self.consumers
        return Workload(**{**asdict(self), "count": max(unit, int(n) // unit * unit)})

    def as_dict(self) -> Dict[str, Any]:
        return {**asdict(self), "key": self.key()}


# message counts (all producers together) per value size
_COUNTS = {
    #          single              batch
    "full":  {64: (200_000, 4_000_000), 1024: (100_000, 1_000_000), 65536: (4_000, 16_000)},
    "quick": {64: (20_000, 200_000), 1024: (10_000, 50_000), 65536: (500, 1_000)},
    "smoke": {64: (2_000, 16_384), 1024: (1_000, 4_096), 65536: (100, 200)},
}
_LAT_SECONDS = {"full": 1.5, "quick": 0.3, "smoke": 0.1}


def throughput_workloads(scale: str = "full", sizes=SIZES, topologies=TOPOLOGIES,
                         modes=("single", "batch")) -> List[Workload]:
    out = []
    for topo in topologies:
        for size in sizes:
            single, batch = _COUNTS[scale][size]
            for mode in modes:
                rows = batch_rows(size) if mode == "batch" else 1
                n = single if mode == "single" else batch
                p = shape(topo)[0]
                unit = rows * p * shape(topo)[1]
                n = max(unit, n // unit * unit)
                out.append(Workload("tput", topo, size, mode, count=n, batch=rows))
    return out


def latency_workloads(scale: str = "full", rates=RATES, size: int = 64) -> List[Workload]:
    secs = _LAT_SECONDS[scale]
    return [Workload("lat", "1:1", size, "single", count=max(200, int(rate * secs)), rate=rate, consumer=c)
            for rate in rates for c in ("spin", "block")]


def all_workloads(scale: str = "full", sizes=SIZES, topologies=TOPOLOGIES, rates=RATES,
                  kinds=("tput", "lat")) -> List[Workload]:
    out: List[Workload] = []
    if "tput" in kinds:
        out += throughput_workloads(scale, sizes, topologies)
    if "lat" in kinds:
        out += latency_workloads(scale, rates)
    return out


@dataclass
class ChildResult:
    """What one child process reports (as a dict in its result file)."""

    role: str
    index: int
    count: int = 0            # data messages sent / received
    checksum: int = 0         # sum of received tags mod 2**64 (consumers)
    sentinels: int = 0
    t_start: int = 0          # perf_counter_ns when the measured phase began
    t_end: int = 0            # ... and ended (consumer: when the last message arrived)
    cpu_s: float = 0.0        # user + system CPU seconds of the measured phase
    maxrss_kb: int = 0        # peak resident set size of the process
    error: Optional[str] = None
    exit: str = "end-marker"   # consumer: how it stopped ("end-marker" or "idle")
    latency_us: List[float] = field(default_factory=list)
