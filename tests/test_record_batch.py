"""Tests of the C record-batch core: CRC32C, murmur2, RecordBatch v2.

Interoperability is checked against kafka-python, whose DefaultRecordBatch
and DefaultRecordBatchBuilder follow Kafka's wire format and whose murmur2 is
a port of the Java client's. Robustness tests feed garbage to the decoder in
memory that ends right before an inaccessible page, so any read past the end
of the batch kills the test process instead of passing silently.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import struct

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kafka.partitioner.default import murmur2 as kafka_murmur2
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from kafka.record.util import calc_crc32c

from shmq.native._shmq import ffi, lib

HEADER = struct.Struct(">qiibIhiqqqhii")
HEADER_SIZE = 61
MANY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOTS = settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers -----------------------------------------------------------------

def varint(v: int) -> bytes:
    """Zig-zag varint of a signed 64-bit integer, as Kafka writes it."""
    z = ((v << 1) ^ (v >> 63)) & 0xFFFFFFFFFFFFFFFF
    out = bytearray()
    while z >= 0x80:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


def read_varint(buf, pos: int, end: int):
    """Decode a zig-zag varint from buf[pos:end]; IndexError past end."""
    z = shift = 0
    while True:
        if pos >= end:
            raise IndexError("varint past end")
        b = buf[pos]
        pos += 1
        z |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return (z >> 1) ^ -(z & 1), pos


def encode_headers(headers) -> bytes:
    """Pre-encode [(str key, bytes|None value)] as a record's header section:
    varint count, then per header varint keyLen, key, varint valueLen (-1 null), value."""
    out = bytearray(varint(len(headers)))
    for key, value in headers:
        k = key.encode("utf-8")
        out += varint(len(k)) + k
        out += varint(-1) if value is None else varint(len(value)) + value
    return bytes(out)


def parse_headers(buf, pos: int, count: int, end: int):
    """Header entries starting at pos (as shmq_record_view.headers_pos points)."""
    headers = []
    for _ in range(count):
        klen, pos = read_varint(buf, pos, end)
        assert 0 <= klen <= end - pos
        key = bytes(buf[pos:pos + klen]).decode("utf-8")
        pos += klen
        vlen, pos = read_varint(buf, pos, end)
        assert -1 <= vlen <= end - pos
        value = None if vlen < 0 else bytes(buf[pos:pos + vlen])
        pos += max(vlen, 0)
        headers.append((key, value))
    return headers


def field(data: bytes, pos: int, length: int):
    return None if length < 0 else data[pos:pos + length]


def make_meta(producer_id=-1, producer_epoch=-1, base_sequence=-1, attributes=0, leader_epoch=-1):
    meta = ffi.new("shmq_batch_meta *")
    meta.producer_id = producer_id
    meta.producer_epoch = producer_epoch
    meta.base_sequence = base_sequence
    meta.attributes = attributes
    meta.leader_epoch = leader_epoch
    return meta


class Records:
    """Builds a shmq_records from Python lists; keeps every buffer alive.

    records: list of (key, value, headers, timestamp) with key/value bytes or
    None and headers a list of (str, bytes|None).
    """

    def __init__(self, records, base_timestamp=0, per_record_ts=True, with_headers=True,
                 with_null_flags=True):
        self.keep = []
        r = ffi.new("shmq_records *")
        r.count = len(records)
        r.values, r.value_offs, r.value_null = self._column([rec[1] for rec in records], with_null_flags)
        r.keys, r.key_offs, r.key_null = self._column([rec[0] for rec in records], with_null_flags)
        if with_headers:
            encoded = [encode_headers(rec[2]) for rec in records]
            r.headers, r.header_offs, _ = self._column(encoded, False)
        r.base_timestamp = base_timestamp
        if per_record_ts:
            r.timestamps = self._new("int64_t[]", [rec[3] for rec in records])
        self.r = r

    def _new(self, ctype, init):
        obj = ffi.new(ctype, init)
        self.keep.append(obj)
        return obj

    def _column(self, items, with_null_flags):
        if not with_null_flags and any(x is None for x in items):
            raise ValueError("null fields need null flags")
        data = b"".join(x or b"" for x in items)
        offs = [0]
        for x in items:
            offs.append(offs[-1] + (len(x) if x is not None else 0))
        buf = self._new("uint8_t[]", data + b"\0")  # never NULL, even when empty
        nulls = ffi.NULL
        if with_null_flags:
            nulls = self._new("uint8_t[]", bytes(1 if x is None else 0 for x in items) + b"\0")
        return buf, self._new("int64_t[]", offs), nulls


def shmq_encode(records, base_offset=0, meta=None, **kw) -> bytes:
    recs = Records(records, **kw)
    size = lib.shmq_batch_size(recs.r)
    assert size > 0
    dst = ffi.new("uint8_t[]", size)
    assert lib.shmq_batch_encode(dst, size - 1, recs.r, base_offset, meta or ffi.NULL) == lib.SHMQ_ERR_TOO_LARGE
    n = lib.shmq_batch_encode(dst, size, recs.r, base_offset, meta or ffi.NULL)
    assert n == size
    return bytes(ffi.buffer(dst, n))


def shmq_decode(data: bytes, min_offset=-1, max_out=None):
    """Check (with CRC) and decode; [(offset, timestamp, key, value, headers)]."""
    if max_out is None:
        max_out = HEADER.unpack_from(data)[12]
    buf = ffi.from_buffer("uint8_t[]", data)
    assert lib.shmq_batch_check(buf, len(data), 1) == len(data)
    out = ffi.new("shmq_record_view[]", max_out)
    n = lib.shmq_batch_decode(buf, len(data), min_offset, out, max_out)
    assert n >= 0, n
    return [(v.offset, v.timestamp, field(data, v.key_pos, v.key_len),
             field(data, v.value_pos, v.value_len),
             parse_headers(data, v.headers_pos, v.headers_count, len(data)))
            for v in out[0:n]]


def kafka_decode(data: bytes):
    batch = DefaultRecordBatch(data)
    assert batch.validate_crc()
    return batch, [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in batch]


# ---- strategies ------------------------------------------------------------------

def _filled(n):
    return bytes((i * 7 + n) & 0xFF for i in range(n))


payload = st.one_of(st.none(), st.binary(max_size=200),
                    st.integers(min_value=128, max_value=20000).map(_filled))
header_list = st.lists(st.tuples(st.text(max_size=10), st.none() | st.binary(max_size=20)),
                       max_size=4)
timestamp = st.one_of(st.just(-1), st.integers(min_value=0, max_value=2**45))
record = st.tuples(st.none() | st.binary(max_size=40), payload, header_list, timestamp)
records_st = st.lists(record, min_size=1, max_size=40)
meta_st = st.builds(make_meta,
                    producer_id=st.integers(min_value=-1, max_value=2**62),
                    producer_epoch=st.integers(min_value=-1, max_value=32767),
                    base_sequence=st.integers(min_value=-1, max_value=2**31 - 1),
                    attributes=st.sampled_from([0, 0x10]),
                    leader_epoch=st.integers(min_value=-1, max_value=2**31 - 1))
base_offset_st = st.integers(min_value=0, max_value=2**62)


# ---- CRC32C ---------------------------------------------------------------------

@pytest.mark.parametrize("crc", [lib.shmq_crc32c, lib.shmq_crc32c_portable])
def test_crc32c_vectors(crc):
    assert crc(0, b"123456789", 9) == 0xE3069283
    assert crc(0, ffi.NULL, 0) == 0
    assert crc(0, bytes(32), 32) == 0x8A9136AA
    assert crc(0, b"\xff" * 32, 32) == 0x62A8AB43
    assert crc(0, bytes(range(32)), 32) == 0x46DD794E
    assert crc(crc(0, b"1234", 4), b"56789", 5) == 0xE3069283  # chaining


def test_crc32c_hardware_flag():
    assert lib.shmq_crc32c_hardware_available() in (0, 1)


@MANY
@given(data=st.binary(max_size=3000), align=st.integers(min_value=0, max_value=15),
       split=st.integers(min_value=0, max_value=3000))
def test_crc32c_hardware_equals_portable(data, align, split):
    buf = ffi.new("uint8_t[]", len(data) + 16)
    ffi.memmove(buf + align, data, len(data))
    p = buf + align
    expected = calc_crc32c(data)
    assert lib.shmq_crc32c(0, p, len(data)) == expected
    assert lib.shmq_crc32c_portable(0, p, len(data)) == expected
    split = min(split, len(data))
    rest = len(data) - split
    assert lib.shmq_crc32c(lib.shmq_crc32c(0, p, split), p + split, rest) == expected
    assert lib.shmq_crc32c_portable(lib.shmq_crc32c_portable(0, p, split), p + split, rest) == expected


@pytest.mark.parametrize("length", [767, 768, 769, 1100, 3 * 8192 - 1, 3 * 8192, 3 * 8192 + 771,
                                    2 * 3 * 8192 + 3 * 256 + 5, 600_000])
def test_crc32c_of_long_buffers_equals_portable_at_every_alignment_and_split(length):
    """Long buffers take the three-stream hardware path (768 bytes and up,
    and 24 KiB and up): same answers as the portable tables and as
    kafka-python, whatever the alignment and wherever a chained call splits."""
    import random
    rng = random.Random(length)
    data = bytes(rng.getrandbits(8) for _ in range(length))
    buf = ffi.new("uint8_t[]", length + 16)
    for align in (0, 1, 5, 8):
        ffi.memmove(buf + align, data, length)
        p = buf + align
        expected = lib.shmq_crc32c_portable(0, p, length)
        assert lib.shmq_crc32c(0, p, length) == expected
        split = rng.randrange(length)
        assert lib.shmq_crc32c(lib.shmq_crc32c(0, p, split), p + split, length - split) == expected
    if length <= 30_000:
        assert expected == calc_crc32c(data)


# ---- murmur2 ----------------------------------------------------------------------

KAFKA_MURMUR2 = {  # from Kafka's UtilsTest
    b"21": -973932308,
    b"foobar": -790332482,
    b"a-little-bit-long-string": -985981536,
    b"a-little-bit-longer-string": -1486304829,
    b"lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8": -58897971,
    b"abc": 479470107,
}


@pytest.mark.parametrize("key", sorted(KAFKA_MURMUR2))
def test_murmur2_known(key):
    assert lib.shmq_murmur2(key, len(key)) == KAFKA_MURMUR2[key]


def test_murmur2_partition_bad_count():
    assert lib.shmq_murmur2_partition(b"k", 1, 0) == lib.SHMQ_ERR_ARG


@MANY
@given(key=st.binary(max_size=100), n=st.integers(min_value=1, max_value=10000))
def test_murmur2_matches_kafka(key, n):
    expected = kafka_murmur2(key)
    assert lib.shmq_murmur2(key, len(key)) & 0xFFFFFFFF == expected
    assert lib.shmq_murmur2_partition(key, len(key), n) == (expected & 0x7FFFFFFF) % n


# ---- shmq encodes, Kafka decodes --------------------------------------------------

def check_against_kafka(data, records, base_offset, meta=None, timestamps=None):
    batch, got = kafka_decode(data)
    if timestamps is None:
        timestamps = [rec[3] for rec in records]
    assert batch.base_offset == base_offset
    assert batch.magic == 2
    assert batch.last_offset_delta == len(records) - 1
    assert batch.first_timestamp == timestamps[0]
    assert batch.max_timestamp == max(timestamps)
    if meta is not None:
        assert batch.producer_id == meta.producer_id
        assert batch.producer_epoch == meta.producer_epoch
        assert batch.base_sequence == meta.base_sequence
        assert batch.leader_epoch == meta.leader_epoch
        assert batch.is_transactional == bool(meta.attributes & 0x10)
    expected = [(base_offset + i, ts, key, value, headers)
                for i, ((key, value, headers, _), ts) in enumerate(zip(records, timestamps))]
    assert got == expected
    # and shmq's own decoder agrees
    assert shmq_decode(data) == expected


@MANY
@given(records=records_st, base_offset=base_offset_st, meta=st.none() | meta_st)
def test_encode_decoded_by_kafka(records, base_offset, meta):
    data = shmq_encode(records, base_offset, meta)
    check_against_kafka(data, records, base_offset, meta)


@MANY
@given(records=records_st, base_ts=timestamp)
def test_encode_shared_timestamp_no_headers(records, base_ts):
    records = [(k, v, [], base_ts) for k, v, _, _ in records]
    data = shmq_encode(records, 0, per_record_ts=False, with_headers=False, base_timestamp=base_ts)
    check_against_kafka(data, records, 0)


@MANY
@given(width=st.integers(min_value=0, max_value=300), n=st.integers(min_value=1, max_value=50),
       base_ts=timestamp, base_offset=base_offset_st)
def test_encode_fixed_width_values_null_keys(width, n, base_ts, base_offset):
    values = bytes((i * 13) & 0xFF for i in range(width * n))
    r = ffi.new("shmq_records *")
    vbuf = ffi.new("uint8_t[]", values + b"\0")
    r.count = n
    r.values = vbuf
    r.value_width = width
    r.base_timestamp = base_ts
    size = lib.shmq_batch_size(r)
    dst = ffi.new("uint8_t[]", size)
    assert lib.shmq_batch_encode(dst, size, r, base_offset, ffi.NULL) == size
    records = [(None, values[i * width:(i + 1) * width], [], base_ts) for i in range(n)]
    check_against_kafka(bytes(ffi.buffer(dst, size)), records, base_offset)


@MANY
@given(rec=record, base_offset=base_offset_st, meta=st.none() | meta_st)
def test_encode1_decoded_by_kafka(rec, base_offset, meta):
    key, value, headers, ts = rec
    hdr = encode_headers(headers) if headers else None
    klen = -1 if key is None else len(key)
    vlen = -1 if value is None else len(value)
    hlen = 0 if hdr is None else len(hdr)
    size = lib.shmq_batch_size1(klen, vlen, hlen)
    dst = ffi.new("uint8_t[]", size)
    args = (base_offset, ts, key or ffi.NULL, klen, value or ffi.NULL, vlen,
            hdr or ffi.NULL, hlen, meta or ffi.NULL)
    assert lib.shmq_batch_encode1(dst, size - 1, *args) == lib.SHMQ_ERR_TOO_LARGE
    assert lib.shmq_batch_encode1(dst, size, *args) == size
    data = bytes(ffi.buffer(dst, size))
    check_against_kafka(data, [rec], base_offset, meta)
    # the general encoder writes the same bytes
    assert shmq_encode([rec], base_offset, meta) == data


def test_encode_bad_arguments():
    dst = ffi.new("uint8_t[]", 4096)
    r = ffi.new("shmq_records *")
    assert lib.shmq_batch_size(r) == lib.SHMQ_ERR_ARG                      # count 0
    assert lib.shmq_batch_encode(dst, 4096, r, 0, ffi.NULL) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_encode(dst, 4096, ffi.NULL, 0, ffi.NULL) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_size1(-2, 0, 0) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_encode1(dst, 4096, 0, 0, ffi.NULL, -2, ffi.NULL, -1,
                                  ffi.NULL, 0, ffi.NULL) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_encode1(dst, 4096, -1, 0, ffi.NULL, -1, ffi.NULL, -1,
                                  ffi.NULL, 0, ffi.NULL) == lib.SHMQ_ERR_ARG
    compressed = make_meta(attributes=1)                                   # gzip: not written
    assert lib.shmq_batch_encode1(dst, 4096, 0, 0, ffi.NULL, -1, ffi.NULL, -1,
                                  ffi.NULL, 0, compressed) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_encode1(dst, 60, 0, 0, ffi.NULL, -1, ffi.NULL, -1,
                                  ffi.NULL, 0, ffi.NULL) == lib.SHMQ_ERR_TOO_LARGE


@MANY
@given(base_offset=base_offset_st, count=st.integers(min_value=1, max_value=2**31 - 1),
       ts=timestamp)
def test_encode_empty(base_offset, count, ts):
    assume(base_offset + count - 1 < 2**63)
    dst = ffi.new("uint8_t[]", HEADER_SIZE)
    assert lib.shmq_batch_encode_empty(dst, HEADER_SIZE, base_offset, count, ts) == HEADER_SIZE
    data = bytes(ffi.buffer(dst, HEADER_SIZE))
    batch, got = kafka_decode(data)
    assert got == []
    assert batch.base_offset == base_offset
    assert batch.last_offset_delta == count - 1
    assert batch.next_offset == base_offset + count
    assert batch.first_timestamp == batch.max_timestamp == ts
    assert shmq_decode(data) == []
    assert lib.shmq_batch_encode_empty(dst, HEADER_SIZE, base_offset, 0, ts) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_encode_empty(dst, HEADER_SIZE - 1, base_offset, 1, ts) == lib.SHMQ_ERR_TOO_LARGE


def test_set_base_offset_keeps_crc():
    data = bytearray(shmq_encode([(b"k", b"v", [("h", b"x")], 5)] * 3, 0))
    buf = ffi.from_buffer("uint8_t[]", data)
    lib.shmq_batch_set_base_offset(buf, 123456789)
    assert lib.shmq_batch_check(buf, len(data), 1) == len(data)
    assert [r[0] for r in shmq_decode(bytes(data))] == [123456789, 123456790, 123456791]


# ---- Kafka encodes, shmq decodes --------------------------------------------------

def kafka_build(records, offsets, base_offset=0, producer=None):
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=0, is_transactional=False,
                                        producer_id=-1, producer_epoch=-1, base_sequence=-1,
                                        batch_size=2**30)
    if producer is not None:
        builder.set_producer_state(*producer)
    for (key, value, headers, ts), off in zip(records, offsets):
        assert builder.append(off, timestamp=ts, key=key, value=value, headers=headers) is not None
    data = bytearray(builder.build())
    struct.pack_into(">q", data, 0, base_offset)  # the broker's job; not under the CRC
    return bytes(data)


@MANY
@given(records=records_st, base_offset=base_offset_st, data=st.data(),
       producer=st.none() | st.tuples(st.integers(min_value=0, max_value=2**40),
                                      st.integers(min_value=0, max_value=100),
                                      st.integers(min_value=0, max_value=2**30),
                                      st.booleans()))
def test_kafka_batches_decoded_by_shmq(records, base_offset, data, producer):
    # offset deltas with gaps, as after compaction
    gaps = data.draw(st.lists(st.integers(min_value=1, max_value=5),
                              min_size=len(records), max_size=len(records)))
    offsets = [sum(gaps[:i + 1]) - gaps[0] for i in range(len(records))]
    raw = kafka_build(records, offsets, base_offset, producer)
    expected = [(base_offset + off, ts, key, value, headers)
                for (key, value, headers, ts), off in zip(records, offsets)]
    assert shmq_decode(raw) == expected
    # min_offset skips the records before it
    cut = data.draw(st.integers(min_value=0, max_value=len(records)))
    if cut < len(records):
        assert shmq_decode(raw, min_offset=expected[cut][0]) == expected[cut:]
    # max_out stops early
    assert shmq_decode(raw, max_out=cut) == expected[:cut]
    # header fields
    hdr = HEADER.unpack_from(raw)
    assert hdr[6] == offsets[-1] and hdr[12] == len(records)


# ---- garbage robustness ---------------------------------------------------------------

class GuardedMemory:
    """Anonymous memory followed by a PROT_NONE page: data placed with put()
    ends exactly at the guard, so reading one byte too far is a SIGSEGV."""

    def __init__(self, size=1 << 17):
        page = mmap.PAGESIZE
        self.cap = (size + page - 1) // page * page
        self.mm = mmap.mmap(-1, self.cap + page)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.mm))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.guarded = libc.mprotect(ctypes.c_void_p(self.base + self.cap), page, 0) == 0

    def put(self, data: bytes):
        assert len(data) <= self.cap
        off = self.cap - len(data)
        self.mm[off:self.cap] = data
        return ffi.cast("uint8_t *", self.base + off)


_guard = None


def guarded(data: bytes):
    global _guard
    if _guard is None:
        _guard = GuardedMemory()
    return _guard.put(data)


def decode_garbage(data: bytes, max_out=64, min_offset=-1):
    """Run check and decode over data placed against a guard page and check
    that whatever comes back is consistent and inside the batch."""
    buf = guarded(data)
    n_len = len(data)
    size = lib.shmq_batch_check(buf, n_len, 0)
    crc_size = lib.shmq_batch_check(buf, n_len, 1)
    assert crc_size in (size, lib.SHMQ_ERR_CRC) if size >= 0 else crc_size == size
    out = ffi.new("shmq_record_view[]", max_out)
    n = lib.shmq_batch_decode(buf, n_len, min_offset, out, max_out)
    if size < 0:
        assert size in (lib.SHMQ_ERR_CORRUPT,)
        assert n == size
        return None
    assert HEADER_SIZE <= size <= n_len
    if n < 0:
        assert n == lib.SHMQ_ERR_CORRUPT
        return None
    hdr = HEADER.unpack_from(data)
    base, last_delta, count = hdr[0], hdr[6], hdr[12]
    assert hdr[3] == 2 and 0 <= count <= last_delta + 1 and 0 <= base
    assert n <= min(max_out, count)
    prev = None
    for v in out[0:n]:
        assert base <= v.offset <= base + last_delta and v.offset >= min_offset
        assert prev is None or v.offset > prev
        prev = v.offset
        for pos, length in ((v.key_pos, v.key_len), (v.value_pos, v.value_len)):
            assert length >= -1
            assert HEADER_SIZE <= pos and pos + max(length, 0) <= size
        assert v.headers_count >= 0 and HEADER_SIZE <= v.headers_pos <= size
        headers_bytes = data[:size]
        # header keys of garbage need not be UTF-8: walk the bounds only
        pos = v.headers_pos
        for _ in range(v.headers_count):
            klen, pos = read_varint(headers_bytes, pos, size)
            assert 0 <= klen <= size - pos
            pos += klen
            vlen, pos = read_varint(headers_bytes, pos, size)
            assert -1 <= vlen <= size - pos
            pos += max(vlen, 0)
    return n


@functools.lru_cache(maxsize=None)
def good_batch():
    records = [(None, b"v" * 10, [], 1000), (b"key", None, [("a", b"1"), ("b", None)], 999),
               (b"", b"", [("", b"")], 2000), (b"k" * 200, b"x" * 300, [], 1500)]
    return shmq_encode(records, 42)


def test_decode_rejects_bad_arguments():
    data = good_batch()
    buf = ffi.from_buffer("uint8_t[]", data)
    out = ffi.new("shmq_record_view[]", 4)
    assert lib.shmq_batch_decode(buf, len(data), 0, out, -1) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_decode(buf, len(data), 0, ffi.NULL, 4) == lib.SHMQ_ERR_ARG
    assert lib.shmq_batch_check(ffi.NULL, 100, 1) == lib.SHMQ_ERR_CORRUPT
    assert lib.shmq_batch_check(buf, -5, 1) == lib.SHMQ_ERR_CORRUPT
    assert decode_garbage(data) == 4


@LOTS
@given(data=st.binary(max_size=600))
def test_garbage_random_bytes(data):
    decode_garbage(data)


@st.composite
def plausible_garbage(draw):
    """A header that passes shmq_batch_check, followed by random record bytes."""
    body = draw(st.binary(min_size=0, max_size=400))
    count = draw(st.integers(min_value=0, max_value=max(0, len(body) // 7)))
    last_delta = draw(st.integers(min_value=max(count - 1, 0), max_value=count + 5))
    attrs = draw(st.sampled_from([0, 0x08, 0x10, 0x20, 0x01]))
    header = HEADER.pack(draw(base_offset_st), HEADER_SIZE - 12 + len(body), -1, 2, 0, attrs,
                         last_delta, draw(timestamp), draw(timestamp), -1, -1, -1, count)
    return header + body


@LOTS
@given(data=plausible_garbage(), max_out=st.integers(min_value=0, max_value=70),
       min_offset=st.integers(min_value=-1, max_value=2**62))
def test_garbage_plausible_header(data, max_out, min_offset):
    decode_garbage(data, max_out=max_out, min_offset=min_offset)


def test_truncated_batches():
    data = good_batch()
    for k in range(len(data)):
        assert lib.shmq_batch_check(guarded(data[:k]), k, 0) == lib.SHMQ_ERR_CORRUPT
        decode_garbage(data[:k])
    assert decode_garbage(data) == 4


@LOTS
@given(flips=st.lists(st.integers(min_value=0, max_value=8 * 700 - 1), min_size=1, max_size=4))
def test_bit_flipped_batches(flips):
    data = bytearray(good_batch())
    for bit in flips:
        if bit // 8 < len(data):
            data[bit // 8] ^= 1 << (bit % 8)
    data = bytes(data)
    decode_garbage(data)
    if data != good_batch() and any(21 <= b // 8 < len(data) for b in flips):
        # a change under the CRC is caught by the CRC (unless flips cancel out)
        buf = ffi.from_buffer("uint8_t[]", data)
        original = good_batch()
        if data[21:] != original[21:]:
            assert lib.shmq_batch_check(buf, len(data), 1) < 0


@LOTS
@given(data=st.data())
def test_overwritten_record_bytes(data):
    """Random bytes written over the record area of a valid batch, CRC not checked."""
    raw = bytearray(good_batch())
    for _ in range(data.draw(st.integers(min_value=1, max_value=6))):
        pos = data.draw(st.integers(min_value=HEADER_SIZE, max_value=len(raw) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=8))
        raw[pos:pos + len(chunk)] = chunk
    del raw[len(good_batch()):]
    decode_garbage(bytes(raw), max_out=data.draw(st.integers(min_value=0, max_value=8)))
