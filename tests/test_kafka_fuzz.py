"""The Kafka listener's request decoder and handlers under mutated requests:
valid frames of the data-path APIs (ApiVersions, Metadata, Produce with a
real RecordBatch, Fetch, ListOffsets, FindCoordinator, InitProducerId) with
bits flipped, bytes set, interesting integers written and tails cut, the
size prefix kept consistent so every frame reaches the decoder. The
listener must answer or close that one connection, keep serving, and never
fail inside a handler with anything but a Kafka error."""
from __future__ import annotations

import random
import socket
import struct
import time
from typing import Iterator, List, Optional

import pytest

from kafka_support import Listener, frame, listener_for, recv_frame
from shmq import Admin
from shmq.native import ffi, lib
from shmq.root import Root

pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")

MUTANTS = 1500
TOPIC = "fz"


@pytest.fixture
def kafka(root: Root) -> Iterator[Listener]:
    with Admin(root) as admin:
        admin.create_topic(TOPIC, 2)
    yield from listener_for(root.path)


def _s(v: str) -> bytes:
    return struct.pack(">h", len(v)) + v.encode()


def _batch() -> bytes:
    buf = ffi.new("uint8_t[]", 256)
    n = lib.shmq_batch_encode1(buf, 256, 0, 1700000000000, b"key", 3, b"value", 5, ffi.NULL, 0, ffi.NULL)
    assert n > 0
    return bytes(ffi.buffer(buf, n))


def _seeds() -> List[bytes]:
    batch = _batch()
    topic_part = _s(TOPIC) + struct.pack(">i", 1) + struct.pack(">i", 0)
    return [
        frame(18, 0, 1),                                                        # ApiVersions v0
        frame(3, 1, 2, struct.pack(">i", -1)),                                  # Metadata v1: all topics
        frame(3, 4, 3, struct.pack(">i", 1) + _s(TOPIC) + b"\x00"),             # Metadata v4, no auto-create
        frame(0, 3, 4, b"\xff\xff" + struct.pack(">hi", 1, 1000) + struct.pack(">i", 1) + topic_part
              + struct.pack(">i", len(batch)) + batch),                          # Produce v3, acks=1
        frame(1, 4, 5, struct.pack(">iiiib", -1, 10, 1, 1 << 20, 0) + struct.pack(">i", 1) + topic_part
              + struct.pack(">qi", 0, 1 << 16)),                                 # Fetch v4, 10 ms
        frame(2, 1, 6, struct.pack(">i", -1) + struct.pack(">i", 1) + topic_part + struct.pack(">q", -1)),
        frame(10, 1, 7, _s("grp") + b"\x00"),                                   # FindCoordinator v1
        frame(22, 0, 8, b"\xff\xff" + struct.pack(">i", 60000)),                # InitProducerId v0
    ]


INTERESTING = [0, 1, -1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, -0x80000000, 1 << 20]


def _mutate(f: bytes, rnd: random.Random) -> bytes:
    body = bytearray(f[4:])
    for _ in range(rnd.randint(1, 4)):
        if len(body) <= 8:
            break
        pos = rnd.randrange(8, len(body))       # keep api key, version and correlation id
        op = rnd.randrange(5)
        if op == 0:
            body[pos] ^= 1 << rnd.randrange(8)
        elif op == 1:
            body[pos] = rnd.randrange(256)
        elif op in (2, 3):
            w = rnd.choice([1, 2, 4, 8])
            v = rnd.choice(INTERESTING) & ((1 << (8 * w)) - 1)
            body[pos:pos + w] = v.to_bytes(w, "big")
        else:
            del body[pos:]
    return struct.pack(">i", len(body)) + bytes(body)


def _exchange(sock: Optional[socket.socket], ln: Listener, data: bytes) -> Optional[socket.socket]:
    """Send one frame and read its answer; the connection is dropped (and
    None returned) when the listener closes it or takes long."""
    if sock is None:
        sock = socket.create_connection((ln.host, ln.port), timeout=10)
    try:
        sock.sendall(data)
        recv_frame(sock, timeout=2.0)
        return sock
    except (OSError, ConnectionError, struct.error):
        sock.close()
        return None


@pytest.mark.timeout(180)
def test_mutated_requests_get_an_answer_or_a_closed_connection_and_the_listener_serves_on(kafka: Listener) -> None:
    rnd = random.Random(int(time.time()) // 86400)
    seeds = _seeds()
    sock: Optional[socket.socket] = None
    for f in seeds:                                  # the seeds themselves are answered
        sock = _exchange(sock, kafka, f)
        assert sock is not None, f"no answer to a valid request {f[:12].hex()}"
    t_end = time.monotonic() + 60
    for i in range(MUTANTS):
        if time.monotonic() > t_end:
            break
        sock = _exchange(sock, kafka, _mutate(rnd.choice(seeds), rnd))
        assert kafka.alive(), f"the listener died at mutant {i}: {kafka.log()[-3000:]}"
    if sock is not None:
        sock.close()
    assert kafka.alive()
    for f in seeds[:2]:
        assert _exchange(None, kafka, f) is not None, "the listener stopped answering valid requests"
    log = kafka.log()
    assert "Traceback" not in log, f"a handler failed on a mutated request:\n{log[-6000:]}"
