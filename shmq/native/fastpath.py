"""The second front door: the per-record path in C (``_fastpath``, built from
``fastpath.c`` and the same core sources as the cffi module).

``Producer`` and ``Consumer`` call ``attach_producer`` / ``attach_consumer``
when they are made; with the extension in use their ``send`` / ``poll`` are
C functions that handle the common case themselves and hand every other case
(and every error) to the Python methods, which stay the reference.

The switch: ``SHMQ_FASTPATH=0`` in the environment turns the extension off
(checked when each client object is made); so does a platform where it could
not be built. Everything works either way.
"""
from __future__ import annotations

import os
import random
from typing import Any, Optional, Tuple

import xxhash

from . import ffi

try:
    from . import _fastpath as _ext
except ImportError:            # not built on this platform: the Python path only
    _ext = None

PARTITIONER_KINDS = ("murmur2_random", "murmur2", "xxhash", "roundrobin")
METADATA_RECHECK_MS = 100      # a fast-path producer re-reads routes (metadata) this often


def enabled() -> bool:
    """True when the C per-record path is built and not switched off."""
    return _ext is not None and os.environ.get("SHMQ_FASTPATH", "1") != "0"


def handle(cdata: Any) -> int:
    """The address of a cffi pointer, as the extension takes it."""
    return int(ffi.cast("uintptr_t", cdata))


def partitioner(name: str, sticky_records: int) -> Optional[Any]:
    """The C partitioner for ``name``, or None when the fast path is off."""
    if not enabled():
        return None
    return _ext.Partitioner(PARTITIONER_KINDS.index(name), sticky_records, random.randrange,  # type: ignore[union-attr]
                            xxhash.xxh64_intdigest)


def attach_producer(producer: Any) -> None:
    """Make ``producer.send`` the C send when the producer can use it."""
    part = producer._partitioner
    if not enabled() or not producer._plain or producer.transactional_id is not None \
            or not isinstance(part, _ext.Partitioner):  # type: ignore[union-attr]
        return
    python_send = producer.send

    def route(topic: str) -> Optional[Tuple[Tuple[int, ...], Tuple[Any, ...], int]]:
        """What the C send needs of a topic, or None: the Python path sends
        (a partition without a leader, or acks='all' on a replicated topic)."""
        r = producer._route(topic)
        if (r.replicated and producer.acks == "all") or any(log is None for log in r.logs):
            return None
        return tuple(handle(log._h) for log in r.logs), tuple(r.logs), r.max_bytes

    fast = _ext.FastProducer(python_send, route, part, _metadata_type(),  # type: ignore[union-attr]
                             producer._timeout_ns, METADATA_RECHECK_MS)
    producer._fast = fast
    producer.send = fast.send


def detach(client: Any) -> None:
    """Drop the C object's routes (before the client closes its logs)."""
    fast = getattr(client, "_fast", None)
    if fast is not None:
        fast.close()


def _metadata_type() -> Any:
    from ..message import RecordMetadata
    return RecordMetadata
