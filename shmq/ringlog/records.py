"""Records as Python sees them, and the record-header encoding.

A record read from a log is a ``LogRecord`` (a tuple: cheap to build in bulk).
Headers are ``[(str, bytes | None), ...]`` as in kafka-python; on the wire they
are Kafka's: varint count, then per header varint key length, key, varint
value length (-1 for null), value, all varints zig-zag encoded.
"""
from __future__ import annotations

from typing import Iterable, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import InvalidRecord

Header = Tuple[str, Optional[bytes]]


class LogRecord(NamedTuple):
    offset: int
    timestamp_ms: int
    key: Optional[bytes]
    value: Optional[bytes]
    headers: Sequence[Header]


def _zigzag_varint(n: int, out: bytearray) -> None:
    z = (n << 1) ^ (n >> 63)
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)


def encode_headers(headers: Iterable[Header]) -> bytes:
    """Encode headers as one record's header block (count + entries)."""
    try:
        items = list(headers)
    except TypeError:
        raise InvalidRecord(f"headers must be an iterable of (str, bytes) pairs, got {type(headers).__name__}") from None
    out = bytearray()
    _zigzag_varint(len(items), out)
    for item in items:
        if not isinstance(item, tuple) or len(item) != 2:
            raise InvalidRecord(f"a header must be a (str, bytes) pair, got {item!r}")
        key, value = item
        if not isinstance(key, str):
            raise InvalidRecord(f"a header key must be str, got {type(key).__name__}")
        try:
            kb = key.encode()
        except UnicodeEncodeError:
            raise InvalidRecord(f"a header key must encode to UTF-8, got {key!r}") from None
        _zigzag_varint(len(kb), out)
        out += kb
        if value is None:
            _zigzag_varint(-1, out)
        else:
            # bytes(int) would silently store zero bytes: accept bytes-like only
            if not isinstance(value, (bytes, bytearray, memoryview)):
                raise InvalidRecord(f"a header value must be bytes-like or None, got {type(value).__name__}")
            vb = bytes(value)
            _zigzag_varint(len(vb), out)
            out += vb
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> Tuple[int, int]:
    shift = 0
    z = 0
    while True:
        if pos >= end or shift > 63:
            raise ValueError("header varint runs past the record")
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        if not b & 0x80:
            break
        shift += 7
    return (z >> 1) ^ -(z & 1), pos


def decode_headers(buf: bytes, pos: int, count: int, end: int) -> List[Header]:
    """Decode ``count`` header entries starting at ``pos`` (bounded by ``end``)."""
    headers: List[Header] = []
    for _ in range(count):
        klen, pos = _read_varint(buf, pos, end)
        if klen < 0 or pos + klen > end:
            raise ValueError("header key runs past the record")
        key = buf[pos:pos + klen].decode("utf-8", "replace")
        pos += klen
        vlen, pos = _read_varint(buf, pos, end)
        if vlen < 0:
            value = None
        else:
            if pos + vlen > end:
                raise ValueError("header value runs past the record")
            value = buf[pos:pos + vlen]
            pos += vlen
        headers.append((key, value))
    return headers
