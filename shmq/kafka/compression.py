"""Compressed RecordBatches from Kafka clients, stored uncompressed.

shmq's readers decode records in place, so a batch is stored with its
records uncompressed. In a compressed RecordBatch v2 only the records
section (after the 61-byte header) is compressed, and what it decompresses
to is exactly that section of the uncompressed batch. So ``decompress_batch``
keeps the header (producer id, epoch, base sequence, timestamps, counts: an
idempotent retry is still recognised), clears the compression bits of the
attributes, puts the decompressed records in, and sets batchLength and the
CRC (which covers attributes to the end) again. No record is parsed.

Codecs as Kafka frames them: gzip; snappy raw (librdkafka) or in xerial
blocks (the Java client); lz4 frames (KIP-57); zstd frames. Through cramjam
(the ``kafka`` extra); gzip needs only the standard library.
"""
from __future__ import annotations

import struct
import zlib
from typing import Callable, Dict

from ..errors import InvalidRecord
from ..native import ffi, lib

__all__ = ["decompress_batch", "UnsupportedCompression", "CODECS"]

HEADER = 61
OFF_LENGTH, OFF_CRC, OFF_ATTRIBUTES = 8, 17, 21
CODECS = {1: "gzip", 2: "snappy", 3: "lz4", 4: "zstd"}
MAX_DECOMPRESSED = 64 << 20                  # never more than a frame can hold
_XERIAL = b"\x82SNAPPY\x00"


class UnsupportedCompression(InvalidRecord):
    """A codec this process cannot decompress (Kafka's UNSUPPORTED_COMPRESSION_TYPE)."""


def _gzip(data: bytes) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    out = d.decompress(data, MAX_DECOMPRESSED + 1)
    if len(out) > MAX_DECOMPRESSED or d.unconsumed_tail:
        raise InvalidRecord(f"a gzip batch decompresses to more than {MAX_DECOMPRESSED} bytes")
    return out


def _cramjam(codec: str) -> object:
    try:
        import cramjam
    except ImportError:
        raise UnsupportedCompression(f"{codec} batches need cramjam (pip install 'shmq[kafka]')") from None
    return getattr(cramjam, codec)


def _snappy(data: bytes) -> bytes:
    snappy = _cramjam("snappy")
    if data[:8] != _XERIAL:
        return bytes(snappy.decompress_raw(data))   # type: ignore[attr-defined]
    out, pos = [], 16                                 # magic, version, compatible version
    while pos < len(data):
        (n,) = struct.unpack_from(">i", data, pos)
        if n < 0 or pos + 4 + n > len(data):
            raise InvalidRecord("a snappy (xerial) block runs past the batch")
        out.append(bytes(snappy.decompress_raw(data[pos + 4:pos + 4 + n])))   # type: ignore[attr-defined]
        pos += 4 + n
    return b"".join(out)


def _lz4(data: bytes) -> bytes:
    return bytes(_cramjam("lz4").decompress(data))   # type: ignore[attr-defined]


def _zstd(data: bytes) -> bytes:
    return bytes(_cramjam("zstd").decompress(data))  # type: ignore[attr-defined]


_DECOMPRESS: Dict[int, Callable[[bytes], bytes]] = {1: _gzip, 2: _snappy, 3: _lz4, 4: _zstd}


def decompress_batch(batch: memoryview) -> bytes:
    """The uncompressed equivalent of a compressed RecordBatch v2 (see the module doc)."""
    # The client's CRC is checked before anything is rewritten: a damaged batch
    # must not come out with a fresh, valid CRC.
    if lib.shmq_batch_check(ffi.from_buffer(batch), len(batch), 1) != len(batch):
        raise InvalidRecord("a compressed batch's CRC or header does not check out")
    attrs = struct.unpack_from(">h", batch, OFF_ATTRIBUTES)[0]
    codec = attrs & 0x07
    fn = _DECOMPRESS.get(codec)
    if fn is None:
        raise UnsupportedCompression(f"compression type {codec} is not one of Kafka's")
    try:
        records = fn(bytes(batch[HEADER:]))
    except InvalidRecord:
        raise
    except Exception as e:                            # the codec's own error for bad bytes
        raise InvalidRecord(f"{CODECS[codec]} records of a batch do not decompress: {e}") from None
    if len(records) > MAX_DECOMPRESSED:
        raise InvalidRecord(f"a {CODECS[codec]} batch decompresses to more than {MAX_DECOMPRESSED} bytes")
    out = bytearray(batch[:HEADER]) + records
    struct.pack_into(">i", out, OFF_LENGTH, len(out) - 12)
    struct.pack_into(">h", out, OFF_ATTRIBUTES, attrs & ~0x07)
    crc = lib.shmq_crc32c(0, ffi.from_buffer("uint8_t[]", out) + OFF_ATTRIBUTES, len(out) - OFF_ATTRIBUTES)
    struct.pack_into(">I", out, OFF_CRC, crc)
    return bytes(out)
