"""Kafka message formats, through kio (generated from Kafka's JSON schemas).

Theory of operation: a request frame is ``[int32 size][header][body]``. The
first four header fields (api key, version, correlation id) sit at fixed
offsets in every header version, so ``peek_header`` reads them without
knowing the schema; ``decode_request`` then reads the header and body with
kio's readers for that (key, version). Handlers answer with plain dicts and
lists; ``build`` turns them into kio's frozen dataclasses for the exact
response version, dropping keys the version does not have and converting
milliseconds, error codes, UUIDs and timestamps to kio's types, so one
handler serves every version of its API. Record batches stay raw bytes.

Readers and writers are cached per (key, version): kio builds them as
closures and building one costs far more than using it.
"""
from __future__ import annotations

import dataclasses
import datetime
import io
import struct
import types
import typing
import uuid
from functools import lru_cache
from typing import Any, Callable, Dict, List, Optional, Tuple

from kio.index import load_request_schema, load_response_schema
from kio.schema.errors import ErrorCode
from kio.schema.index import api_key_map
from kio.serial import entity_reader, entity_writer

from .. import errors

__all__ = ["SUPPORTED", "API_NAMES", "ProtocolError", "peek_header", "decode_request", "encode_response",
           "build", "error_code_for", "error_response", "has_error_code", "ms", "UNSUPPORTED_VERSION"]

# (min, max) version of every API the listener serves. Flexible versions are
# included: kio reads and writes compact encodings and tagged fields.
SUPPORTED: Dict[int, Tuple[int, int]] = {
    0: (3, 9),    # Produce (RecordBatch v2 from v3)
    1: (4, 12),   # Fetch (v13 names topics by id)
    2: (1, 7),    # ListOffsets
    3: (0, 12),   # Metadata
    8: (2, 8),    # OffsetCommit
    9: (1, 7),    # OffsetFetch (v8 batches groups)
    10: (0, 4),   # FindCoordinator
    11: (0, 7),   # JoinGroup
    12: (0, 4),   # Heartbeat
    13: (0, 4),   # LeaveGroup
    14: (0, 5),   # SyncGroup
    15: (0, 5),   # DescribeGroups
    16: (0, 4),   # ListGroups
    17: (0, 1),   # SaslHandshake
    18: (0, 3),   # ApiVersions
    19: (2, 7),   # CreateTopics
    20: (1, 6),   # DeleteTopics
    22: (0, 4),   # InitProducerId
    32: (1, 4),   # DescribeConfigs
    36: (0, 2),   # SaslAuthenticate
    37: (0, 3),   # CreatePartitions
}
API_NAMES: Dict[int, str] = dict(api_key_map)
UNSUPPORTED_VERSION = 35
_HEAD = struct.Struct(">hhi")


class ProtocolError(Exception):
    """A frame that does not parse: the connection that sent it is closed."""


def peek_header(frame: bytes) -> Tuple[int, int, int]:
    """(api key, api version, correlation id) of a request frame (without its size)."""
    if len(frame) < _HEAD.size:
        raise ProtocolError(f"request of {len(frame)} bytes is shorter than a request header")
    return _HEAD.unpack_from(frame, 0)


@lru_cache(maxsize=None)
def _request_codec(key: int, version: int) -> Tuple[Any, Callable[..., Any], Callable[..., Any]]:
    schema = load_request_schema(key, version)
    return schema, entity_reader(schema.__header_schema__), entity_reader(schema)


@lru_cache(maxsize=None)
def _response_codec(key: int, version: int) -> Tuple[Any, Callable[..., Any], bytes]:
    schema = load_response_schema(key, version)
    # Response header v1 (flexible) adds an empty tagged-field section;
    # ApiVersions always answers with header v0 (KIP-511).
    tail = b"\x00" if schema.__flexible__ and key != 18 else b""
    return schema, entity_writer(schema), tail


def decode_request(frame: bytes, key: int, version: int) -> Tuple[Any, Any]:
    """(header, body) of a request whose key and version are supported."""
    _schema, read_header, read_body = _request_codec(key, version)
    try:
        header, used = read_header(frame, 0)
        body, used2 = read_body(frame, used)
    except Exception as e:   # kio raises its own errors (and ValueError) for bad bytes
        raise ProtocolError(f"{API_NAMES.get(key, key)} v{version} request does not parse: "
                            f"{type(e).__name__}: {e}") from None
    missing = _null_required(body)
    if missing:
        raise ProtocolError(f"{API_NAMES.get(key, key)} v{version} request has a null {missing}, "
                            f"which the schema does not allow")
    return header, body


@lru_cache(maxsize=None)
def _required_plan(cls: type) -> Tuple[Tuple[str, bool, Optional[type]], ...]:
    """Per field of ``cls``: name, whether the schema allows null, and the
    entity type of its elements (for the nested check)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        tp = hints.get(f.name, f.type)
        nullable = type(None) in typing.get_args(tp)
        inner = [a for a in typing.get_args(tp) if a is not type(None)]
        elem = inner[0] if nullable and len(inner) == 1 else tp
        out.append((f.name, nullable, _entity_arg(elem)))
    return tuple(out)


def _null_required(obj: Any) -> Optional[str]:
    """The name of the first field of a decoded request that is null where
    its schema does not allow null (kio reads a length of -1 as None even
    for non-nullable arrays, strings and bytes, as Kafka's parser does not),
    else None."""
    for name, nullable, entity in _required_plan(type(obj)):
        v = getattr(obj, name)
        if v is None:
            if not nullable:
                return name
            continue
        if entity is not None:
            for item in (v if isinstance(v, tuple) else (v,)):
                inner = _null_required(item)
                if inner:
                    return f"{name}.{inner}"
    return None


def encode_response(key: int, version: int, correlation_id: int, body: Dict[str, Any]) -> bytes:
    """The response frame (size prefix included) for ``body`` (a dict, see ``build``)."""
    schema, write, tail = _response_codec(key, version)
    buf = io.BytesIO()
    buf.write(b"\x00\x00\x00\x00")
    buf.write(struct.pack(">i", correlation_id))
    buf.write(tail)
    if "throttle_time" not in body:
        body["throttle_time"] = 0
    write(buf, build(schema, body))
    out = buf.getbuffer()
    struct.pack_into(">i", out, 0, len(out) - 4)
    return bytes(out)


# ---------------------------------------------------------------- building
_MISSING = dataclasses.MISSING


@lru_cache(maxsize=None)
def _plan(cls: type) -> Tuple[Tuple[str, Callable[[Any], Any]], ...]:
    """Per field of ``cls``: its name and the converter from handler values."""
    out: List[Tuple[str, Callable[[Any], Any]]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append((f.name, _converter(hints.get(f.name, f.type), f.metadata.get("kafka_type"))))
    return tuple(out)


def _entity_arg(tp: Any) -> Optional[type]:
    for a in typing.get_args(tp) or (tp,):
        if dataclasses.is_dataclass(a):
            return a   # type: ignore[return-value]
    return None


def _converter(tp: Any, kafka_type: Optional[str]) -> Callable[[Any], Any]:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union or origin is types.UnionType:    # X | None
        inner = [a for a in args if a is not type(None)]
        conv = _converter(inner[0], kafka_type) if len(inner) == 1 else (lambda v: v)
        return lambda v: None if v is None else conv(v)
    if origin is tuple:                              # array of X
        elem = args[0] if args else Any
        conv = _converter(elem, kafka_type)
        return lambda v: tuple(map(conv, v))
    if dataclasses.is_dataclass(tp):
        return lambda v: v if dataclasses.is_dataclass(v) else build(tp, v)
    if kafka_type == "error_code":
        return lambda v: v if isinstance(v, ErrorCode) else ErrorCode(int(v))
    if kafka_type in ("timedelta_i32", "timedelta_i64"):
        return lambda v: v if isinstance(v, datetime.timedelta) else datetime.timedelta(milliseconds=int(v))
    if kafka_type == "datetime_i64":
        return lambda v: (v if isinstance(v, datetime.datetime) else
                          datetime.datetime.fromtimestamp(int(v) / 1000, tz=datetime.timezone.utc))
    if kafka_type == "uuid":
        return lambda v: v if isinstance(v, uuid.UUID) else uuid.UUID(str(v))
    return lambda v: v


def build(cls: type, data: Dict[str, Any]) -> Any:
    """An instance of the kio dataclass ``cls`` from a dict: keys the version
    does not have are dropped, missing ones take the schema's default."""
    kw = {}
    for name, conv in _plan(cls):
        if name in data:
            kw[name] = conv(data[name])
    return cls(**kw)


def ms(value: Any) -> int:
    """Milliseconds of a kio timedelta field (or an int already)."""
    if isinstance(value, datetime.timedelta):
        return int(value.total_seconds() * 1000)
    return int(value)


# ------------------------------------------------------------------ errors
# shmq's exceptions to Kafka's error codes (by class, most specific first).
_ERRORS: List[Tuple[type, int]] = [
    (errors.OffsetOutOfRange, 1),
    (errors.CorruptRecord, 2),
    (errors.UnknownTopicOrPartition, 3),
    (errors.LeaderNotAvailable, 5),
    (errors.NotLeaderForPartition, 6),
    (errors.KafkaTimeoutError, 7),
    (errors.MessageSizeTooLarge, 10),
    (errors.NotCoordinator, 15),
    (errors.InvalidTopic, 17),
    (errors.NotEnoughReplicas, 19),
    (errors.CommitFailed, 22),
    (errors.InvalidGroupId, 24),
    (errors.ClusterAuthorizationFailed, 31),
    (errors.TopicAlreadyExists, 36),
    (errors.InvalidPartitions, 37),
    (errors.InvalidReplicationFactor, 38),
    (errors.InvalidConfig, 40),
    (errors.InvalidRequest, 42),
    (errors.OutOfOrderSequenceNumber, 45),
    (errors.DuplicateSequenceNumber, 46),
    (errors.ProducerFenced, 90),
    (errors.InvalidRecord, 87),
    (errors.KafkaStorageError, 56),
]


def error_code_for(exc: BaseException) -> int:
    """Kafka's error code for an exception (UNKNOWN_SERVER_ERROR, -1, if none fits)."""
    for cls, code in _ERRORS:
        if isinstance(exc, cls):
            return code
    if type(exc).__name__ == "UnknownMemberId":
        return 25
    return -1


def error_response(key: int, version: int, code: int, request: Any = None) -> Dict[str, Any]:
    """A response body for a request the listener refuses as a whole (an API it
    does not serve, or a client that has not authenticated): every error_code
    field at the top level is ``code``; arrays are empty, other fields default."""
    schema = load_response_schema(key, version)
    body: Dict[str, Any] = {}
    for f in dataclasses.fields(schema):
        kt = f.metadata.get("kafka_type")
        if kt == "error_code":
            body[f.name] = code
        elif f.default is _MISSING and f.default_factory is _MISSING:
            body[f.name] = _zero(f.type, kt)
    return body


def has_error_code(key: int, version: int) -> bool:
    """True if the response of (key, version) has a top-level error_code."""
    try:
        schema = load_response_schema(key, version)
    except Exception:
        return False
    return any(f.metadata.get("kafka_type") == "error_code" for f in dataclasses.fields(schema))


def _zero(tp: Any, kafka_type: Optional[str]) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        return None
    if origin is tuple:
        return ()
    if dataclasses.is_dataclass(tp):
        return {}
    if kafka_type in ("string",):
        return ""
    if kafka_type in ("bytes", "records"):
        return b""
    if kafka_type and kafka_type.startswith("timedelta"):
        return 0
    if kafka_type == "bool":
        return False
    if kafka_type == "uuid":
        return uuid.UUID(int=0)
    return 0


def api_versions_error_frame(correlation_id: int) -> bytes:
    """ApiVersions v0 answer with UNSUPPORTED_VERSION and our ApiVersions
    range: what a client that asked for a newer version expects (KIP-511)."""
    lo, hi = SUPPORTED[18]
    body = struct.pack(">ihi", correlation_id, UNSUPPORTED_VERSION, 1) + struct.pack(">hhh", 18, lo, hi)
    return struct.pack(">i", len(body)) + body


def bare_error_frame(correlation_id: int, code: int) -> bytes:
    """A response to an API that no schema describes: header v0 and an int16 error code."""
    body = struct.pack(">ih", correlation_id, code)
    return struct.pack(">i", len(body)) + body
