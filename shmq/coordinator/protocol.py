"""Wire format between clients and the coordinator on the Unix socket.

Contract: a frame is ``[uint32 big-endian length][UTF-8 JSON object]``, at
most ``MAX_FRAME`` bytes. A request is ``{"id": int, "op": str, "args": {...}}``;
the response carries the same id and either ``{"ok": true, "result": ...}``
or ``{"ok": false, "error": "<class name in shmq.errors>", "message": str,
"topic": ..., "partition": ..., "offset": ...}``. ``error_to_wire`` and
``error_from_wire`` turn exceptions into those fields and back (an unknown
name becomes ``ShmqError``), so a client raises the very class the server did.
"""
from __future__ import annotations

import json
import socket
import struct
from typing import Any, Dict, Optional

from .. import errors
from ..errors import ShmqError

__all__ = ["MAX_FRAME", "send_frame", "recv_frame", "error_to_wire", "error_from_wire"]

MAX_FRAME = 16 << 20
_LEN = struct.Struct(">I")


def send_frame(sock: socket.socket, obj: Dict[str, Any]) -> None:
    data = json.dumps(obj, separators=(",", ":")).encode()
    if len(data) > MAX_FRAME:
        raise errors.InvalidRequest(f"request of {len(data)} bytes exceeds the {MAX_FRAME}-byte frame limit")
    sock.sendall(_LEN.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise ConnectionError("connection closed mid-frame")
            return None
        buf += chunk
    return bytes(buf)


def recv_frame(sock: socket.socket) -> Optional[Dict[str, Any]]:
    """The next frame's object, or None at a clean EOF."""
    head = _recv_exact(sock, 4)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_FRAME:
        raise ConnectionError(f"frame of {n} bytes exceeds the {MAX_FRAME}-byte limit")
    body = _recv_exact(sock, n)
    if body is None:
        raise ConnectionError("connection closed mid-frame")
    obj = json.loads(body)
    if not isinstance(obj, dict):
        raise ConnectionError("frame is not a JSON object")
    return obj


def error_to_wire(exc: ShmqError) -> Dict[str, Any]:
    return {"ok": False, "error": type(exc).__name__, "message": str(exc),
            "topic": exc.topic, "partition": exc.partition, "offset": exc.offset}


def error_from_wire(resp: Dict[str, Any]) -> ShmqError:
    cls = getattr(errors, str(resp.get("error")), None)
    if not (isinstance(cls, type) and issubclass(cls, ShmqError)):
        cls = ShmqError
    return cls(str(resp.get("message", "coordinator error")), topic=resp.get("topic"),
               partition=resp.get("partition"), offset=resp.get("offset"))
