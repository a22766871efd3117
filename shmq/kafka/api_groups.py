"""Kafka's group APIs: JoinGroup, SyncGroup, Heartbeat, LeaveGroup,
OffsetCommit, OffsetFetch, ListGroups, DescribeGroups.

Membership is proxied into the coordinator's groups (``groups.py``);
committed offsets go to the shared offsets table that native consumers use,
fenced by the coordinator generation of each partition, and OffsetCommit
answers only once the coordinator has made them durable (as Kafka answers
once the offsets topic has them).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional

from ..errors import CommitFailed, InvalidGroupId, ShmqError
from ..message import TopicPartition
from ..root import validate_group
from .codec import error_code_for, ms
from .groups import (ILLEGAL_GENERATION, INVALID_GROUP_ID, UNKNOWN_MEMBER_ID, GroupError, encode_assignment)

if TYPE_CHECKING:
    from .server import Connection

# shmq group states under Kafka's names.
KAFKA_STATES = {"Stable": "Stable", "Rebalancing": "PreparingRebalance", "Empty": "Empty", "Dead": "Dead"}


def join_group(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    session = ms(req.session_timeout)
    rebalance = ms(getattr(req, "rebalance_timeout", req.session_timeout))
    if rebalance <= 0:
        rebalance = session
    try:
        return conn.listener.groups.join(
            req.group_id, req.member_id, req.protocol_type, [(p.name, p.metadata) for p in req.protocols],
            session, rebalance, conn.client_id, conn.peer.rsplit(":", 1)[0], require_known_id=version >= 4)
    except GroupError as e:
        return {"error_code": e.code, "generation_id": -1, "protocol_name": "", "leader": "",
                "member_id": req.member_id, "members": []}


def sync_group(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    try:
        return conn.listener.groups.sync(req.group_id, req.member_id, req.generation_id)
    except GroupError as e:
        return {"error_code": e.code, "assignment": b""}


def heartbeat(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    try:
        return {"error_code": conn.listener.groups.heartbeat(req.group_id, req.member_id, req.generation_id)}
    except GroupError as e:
        return {"error_code": e.code}


def leave_group(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    proxy = conn.listener.groups
    if version < 3:
        return {"error_code": proxy.leave(req.group_id, req.member_id)}
    members = [{"member_id": m.member_id, "group_instance_id": m.group_instance_id,
                "error_code": proxy.leave(req.group_id, m.member_id)} for m in req.members]
    return {"error_code": 0, "members": members}


def offset_commit(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    cluster = conn.listener.cluster
    group = req.group_id
    generation = getattr(req, "generation_id_or_member_epoch", getattr(req, "generation_id", -1))
    code: Optional[int] = None
    gens: Optional[Dict[Any, int]] = None
    try:
        validate_group(group)
        if generation >= 0 or req.member_id:
            member = conn.listener.groups.member(group, req.member_id, generation)
            gens = conn.listener.groups.owned_generations(member)
    except GroupError as e:
        code = e.code
    except InvalidGroupId:
        code = INVALID_GROUP_ID
    topics: List[Dict[str, Any]] = []
    stored = False
    with_metadata: List[List[Any]] = []
    for t in req.topics:
        parts = []
        for p in t.partitions:
            c = code
            if c is None:
                tp = TopicPartition(t.name, p.partition_index)
                try:
                    cluster.commit_offsets(group, {tp: p.committed_offset}, sync=False,
                                           generations=None if gens is None else {tp: gens.get(tp, -1)})
                    c, stored = 0, True
                    if gens is None and p.committed_metadata:
                        with_metadata.append([t.name, p.partition_index, p.committed_offset, p.committed_metadata])
                except CommitFailed:
                    c = UNKNOWN_MEMBER_ID if gens is None else ILLEGAL_GENERATION
                except ShmqError as e:
                    c = error_code_for(e)
            parts.append({"partition_index": p.partition_index, "error_code": c})
        topics.append({"name": t.name, "partitions": parts})
    if with_metadata:                          # a non-member's metadata strings, journaled with the offsets
        cluster.client.commit_offsets(group, with_metadata)
    elif stored:
        cluster.client.sync_offsets()          # durable before the answer, as Kafka's
    return {"topics": topics}


def offset_fetch(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    cluster = conn.listener.cluster
    group = req.group_id
    try:
        validate_group(group)
    except InvalidGroupId:
        return {"error_code": INVALID_GROUP_ID, "topics": []}
    wanted = None if req.topics is None else [(t.name, p) for t in req.topics for p in t.partition_indexes]
    got = cluster.client.fetch_offsets_with_metadata(group, wanted)
    by_topic: Dict[str, List[Dict[str, Any]]] = {}
    for t, p in (sorted(got) if wanted is None else wanted):
        off, meta = got.get((t, p), (-1, ""))
        by_topic.setdefault(t, []).append({"partition_index": p, "committed_offset": off,
                                           "committed_leader_epoch": -1, "metadata": meta or "", "error_code": 0})
    return {"error_code": 0, "topics": [{"name": t, "partitions": ps} for t, ps in by_topic.items()]}


def list_groups(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    wanted = set(getattr(req, "states_filter", ()) or ())
    out = []
    for g in conn.listener.cluster.client.call("list_groups"):
        state = KAFKA_STATES.get(g.get("state"), "Stable")
        if wanted and state not in wanted:
            continue
        out.append({"group_id": g["group"], "protocol_type": "consumer", "group_state": state})
    return {"error_code": 0, "groups": out}


def describe_groups(conn: "Connection", req: Any, version: int) -> Dict[str, Any]:
    client = conn.listener.cluster.client
    out = []
    for name in req.groups:
        try:
            d = client.call("describe_group", group=name)
        except ShmqError as e:
            out.append({"error_code": error_code_for(e), "group_id": name, "group_state": "Dead",
                        "protocol_type": "", "protocol_data": "", "members": []})
            continue
        proxied = {m.gm.member_id: m for m in conn.listener.groups.describe(name)}
        members = []
        protocol = ""
        for m in d.get("members", []):
            km = proxied.get(m["member_id"])
            members.append({"member_id": km.member_id if km else m["member_id"],
                            "group_instance_id": m.get("group_instance_id"),
                            "client_id": km.client_id if km else (m.get("client_id") or ""),
                            "client_host": km.client_host if km else (m.get("host") or ""),
                            "member_metadata": km.subscription if km else b"",
                            "member_assignment": encode_assignment({(t, p) for t, p in m.get("assignment", [])})})
            if km and not protocol:
                protocol = km.protocol
        out.append({"error_code": 0, "group_id": name, "group_state": KAFKA_STATES.get(d.get("state"), "Stable"),
                    "protocol_type": "consumer" if members else "", "protocol_data": protocol or d.get("assignor") or "",
                    "members": members})
    return {"groups": out}


HANDLERS = {11: join_group, 14: sync_group, 12: heartbeat, 13: leave_group, 8: offset_commit, 9: offset_fetch,
            16: list_groups, 15: describe_groups}
