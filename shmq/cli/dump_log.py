"""`shmq dump-log`: print the frames and batches of a partition log, like
Kafka's kafka-dump-log.

Reads the files directly (no coordinator needed): the control block's slot
table for each slot's generation and base offset, then every frame of each
segment from position 0 up to the first incomplete frame, with each frame's
batch header (producer id, epoch, sequence, transactional and control
bits), its CRC check and, with ``--records``, its records; a control batch
shows its transaction marker (``endTxnMarker: COMMIT``/``ABORT``) as Kafka's
tool does.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import Any, Dict, Iterator, List, Optional

from ..errors import CorruptRecord
from ..native import ffi, lib
from ..ringlog.txn import MARKER_NAMES, parse_control_record

_BATCH = struct.Struct(">qiibIhiqqqhii")
_TYPES = {0: "data", 1: "padding", 2: "fenced"}
_STATES = {0: "empty", 1: "cleaning", 2: "clean", 3: "activating", 4: "active"}


def _slots(part_dir: str) -> List[Dict[str, Any]]:
    with open(os.path.join(part_dir, "partition.ctl"), "rb") as f:
        ctl = f.read()
    hsize = ffi.sizeof("shmq_ctl_header")
    if len(ctl) < hsize:
        raise ValueError(f"{part_dir}/partition.ctl is shorter than its header")
    n = struct.unpack_from("<I", ctl, ffi.offsetof("shmq_ctl_header", "slot_count"))[0]
    out = []
    for i in range(min(n, lib.SHMQ_MAX_SLOTS)):
        base = lib.SHMQ_CTL_HEADER_SIZE + i * lib.SHMQ_CTL_SLOT_SIZE
        if base + lib.SHMQ_CTL_SLOT_SIZE > len(ctl):
            break

        def field(name: str, fmt: str) -> int:
            return int(struct.unpack_from(fmt, ctl, base + ffi.offsetof("shmq_ctl_slot", name))[0])

        ss = field("state_seq", "<Q")
        seal = field("seal", "<Q")
        claim = field("claim", "<Q")
        out.append({"slot": i, "seq": ss >> 8, "state": _STATES.get(ss & 0xFF, f"?{ss & 0xFF}"),
                    "base_offset": field("base_offset", "<q"),
                    "sealed": bool(seal >> 63), "sealed_size": seal & 0xFFFFFFFF,
                    "sealed_count": (seal & ~(1 << 63)) >> 32,
                    "claim_position": claim & 0xFFFFFFFF, "claim_count": claim >> 32})
    return out


def frames(data: bytes, limit: int) -> Iterator[Dict[str, Any]]:
    """Every complete frame from position 0 (bounds-checked; stops at the
    first incomplete or invalid header and reports it)."""
    pos = 0
    while pos + 8 <= limit:
        word = struct.unpack_from("<Q", data, pos)[0]
        length = struct.unpack_from("<i", data, pos)[0]
        rel = (word >> 32) & 0x3FFFFFFF
        ftype = word >> 62
        if length <= 0:
            if word:
                yield {"position": pos, "state": "claimed" if length < 0 else "poison", "length": -length,
                       "rel_offset": rel}
            return
        if length % 8 or length < lib.SHMQ_MIN_FRAME or pos + length > limit:
            yield {"position": pos, "state": "invalid", "length": length}
            return
        yield {"position": pos, "state": "complete", "type": _TYPES.get(ftype, f"?{ftype}"), "length": length,
               "rel_offset": rel, "body": data[pos + 8:pos + length]}
        pos += length


def describe_batch(body: bytes, records: bool) -> Dict[str, Any]:
    if len(body) < _BATCH.size:
        return {"isvalid": False, "error": "shorter than a batch header"}
    (base, blen, epoch, magic, crc, attrs, lod, first_ts, max_ts, pid, pepoch, bseq, count) = _BATCH.unpack_from(body)
    size = lib.shmq_batch_check(body, len(body), 1)
    out: Dict[str, Any] = {"baseOffset": base, "lastOffset": base + lod, "count": count,
                           "baseSequence": bseq, "producerId": pid, "producerEpoch": pepoch,
                           "partitionLeaderEpoch": epoch, "isTransactional": bool(attrs & 16),
                           "isControl": bool(attrs & 32), "CreateTime": max_ts, "size": blen + 12,
                           "magic": magic, "crc": crc, "isvalid": size >= 0}
    if attrs & 32 and size >= 0:
        try:
            marker = parse_control_record(body[:size])
        except CorruptRecord as e:
            out["isvalid"], out["error"] = False, str(e)
            marker = None
        if marker is not None:
            out["endTxnMarker"], out["coordinatorEpoch"] = MARKER_NAMES[marker[0]], marker[1]
    elif records and size >= 0 and count > 0:
        views = ffi.new("shmq_record_view[]", count)
        got = lib.shmq_batch_decode(body, size, 0, views, count)
        recs = []
        for k in range(max(got, 0)):
            v = views[k]
            recs.append({"offset": v.offset, "CreateTime": v.timestamp,
                         "key": None if v.key_len < 0 else body[v.key_pos:v.key_pos + v.key_len].decode("utf-8", "replace"),
                         "payload": None if v.value_len < 0 else
                         body[v.value_pos:v.value_pos + v.value_len].decode("utf-8", "replace"),
                         "headers": v.headers_count})
        out["records"] = recs
    return out


def dump(part_dir: str, slot: Optional[int] = None, records: bool = False, as_json: bool = False,
         out: Any = sys.stdout) -> int:
    """Print the log at ``part_dir`` (a partition directory); returns 0."""
    for s in _slots(part_dir):
        if slot is not None and s["slot"] != slot:
            continue
        head = (f"slot {s['slot']}: segment {s['seq']} {s['state']} base offset {s['base_offset']} "
                f"claim {s['claim_count']} records / {s['claim_position']} bytes"
                + (f", sealed at {s['sealed_count']} records / {s['sealed_size']} bytes" if s["sealed"] else ""))
        if as_json:
            print(json.dumps({"segment": s}), file=out)
        else:
            print(f"Dumping {os.path.join(part_dir, str(s['slot']) + '.log')}", file=out)
            print(head, file=out)
        if s["state"] != "active":
            continue
        path = os.path.join(part_dir, f"{s['slot']}.log")
        with open(path, "rb") as f:
            data = f.read()
        limit = s["sealed_size"] if s["sealed"] else min(len(data), s["claim_position"])
        for fr in frames(data, limit):
            if fr["state"] != "complete":
                line = {k: v for k, v in fr.items() if k != "body"}
                print(json.dumps(line) if as_json else
                      f"position: {fr['position']} {fr['state']} frame length: {fr['length']}", file=out)
                continue
            info: Dict[str, Any] = {"position": fr["position"], "frame": fr["type"], "frameLength": fr["length"]}
            info.update(describe_batch(fr["body"], records))
            if as_json:
                print(json.dumps(info), file=out)
                continue
            recs = info.pop("records", [])
            print(" ".join(f"{k}: {v}" for k, v in info.items()), file=out)
            for r in recs:
                print("| " + " ".join(f"{k}: {v}" for k, v in r.items()), file=out)
    return 0
