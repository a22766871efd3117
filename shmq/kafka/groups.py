"""Kafka consumer groups on shmq's coordinator: the listener as a member proxy.

Decision: shmq's coordinator stays the only place that assigns partitions.
Every Kafka group member is represented in the coordinator by a
``GroupMember`` the listener holds for it (its own coordinator connection,
subscribed to the topics of the client's subscription), so a Kafka client
and a ``shmq.Consumer`` in one group are members of the same coordinator
group and the coordinator never gives a partition to two of them.

Mapping Kafka's eager protocol onto the coordinator's incremental one:

* JoinGroup with an empty member id answers MEMBER_ID_REQUIRED (v4+,
  KIP-394) with a new id; the rejoin creates the coordinator member. Every
  Kafka member is told it is a follower (the leader id is ``LEADER_ID``,
  never a member's), so clients send SyncGroup without assignments and the
  coordinator's assignment is handed out in the SyncGroup answer, encoded as
  Kafka's ConsumerProtocol Assignment.
* When the coordinator revokes partitions from a Kafka member, or assigns it
  new ones, the member's next Heartbeat answers REBALANCE_IN_PROGRESS. An
  eager client then commits, gives up every partition and rejoins: at that
  JoinGroup the listener acknowledges the revocation to the coordinator
  (``ack_revoked``), which only then hands the partitions on. A cooperative
  client keeps its partitions across the rejoin, so for it only partitions
  it was no longer given in its last SyncGroup answer are acknowledged.
* Safety invariant: a partition is acknowledged as revoked only once the
  client can no longer be consuming it (it rejoined after an assignment
  without it, left, or its session expired), so no two owners overlap.
  Offset commits carry the coordinator generation of each partition, so a
  stale owner's commit is refused (ILLEGAL_GENERATION).
* A JoinGroup waits (bounded) until the group has no revocation pending, as
  Kafka's coordinator holds JoinGroup until every member rejoined: the
  answer then carries the settled assignment.
* Session timeout: a member that sends no Heartbeat (or other group request)
  for ``session_timeout_ms`` is removed (its coordinator member leaves).
"""
from __future__ import annotations

import logging
import struct
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set, Tuple

from ..errors import InvalidGroupId, NotCoordinator, ShmqError
from ..group_member import GroupMember
from ..root import validate_group

if TYPE_CHECKING:
    from .server import KafkaListener

log = logging.getLogger("shmq.kafka.groups")

TP = Tuple[str, int]
LEADER_ID = "shmq-coordinator"
ASSIGNORS = {"range": "range", "roundrobin": "roundrobin", "cooperative-sticky": "cooperative-sticky"}

# Kafka error codes used here.
NONE = 0
NOT_COORDINATOR = 16
ILLEGAL_GENERATION = 22
INCONSISTENT_GROUP_PROTOCOL = 23
INVALID_GROUP_ID = 24
UNKNOWN_MEMBER_ID = 25
REBALANCE_IN_PROGRESS = 27
MEMBER_ID_REQUIRED = 79
COORDINATOR_NOT_AVAILABLE = 15


class GroupError(Exception):
    def __init__(self, code: int, message: str = "") -> None:
        super().__init__(message or str(code))
        self.code = code


def parse_subscription(metadata: bytes) -> List[str]:
    """Topics of a ConsumerProtocol Subscription (any version: the topics come first)."""
    try:
        (_version, n) = struct.unpack_from(">hi", metadata, 0)
        if not 0 <= n <= 100_000:
            raise ValueError(f"{n} topics")
        pos, topics = 6, []
        for _ in range(n):
            (ln,) = struct.unpack_from(">h", metadata, pos)
            if ln < 0 or pos + 2 + ln > len(metadata):
                raise ValueError("topic name runs past the subscription")
            topics.append(bytes(metadata[pos + 2:pos + 2 + ln]).decode())
            pos += 2 + ln
        return topics
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise GroupError(INCONSISTENT_GROUP_PROTOCOL, f"subscription does not parse: {e}") from None


def encode_assignment(tps: Set[TP]) -> bytes:
    """A ConsumerProtocol Assignment v0 of ``tps`` (no user data)."""
    by_topic: Dict[str, List[int]] = {}
    for t, p in sorted(tps):
        by_topic.setdefault(t, []).append(p)
    out = [struct.pack(">hi", 0, len(by_topic))]
    for t, ps in by_topic.items():
        tb = t.encode()
        out.append(struct.pack(">h", len(tb)) + tb + struct.pack(">i", len(ps)) + struct.pack(f">{len(ps)}i", *ps))
    out.append(struct.pack(">i", -1))
    return b"".join(out)


class KafkaMember:
    """One Kafka client's membership, and the coordinator member standing for it."""

    def __init__(self, group: str, member_id: str, client_id: str, client_host: str, protocol: str,
                 subscription: bytes, topics: List[str], session_timeout: float, rebalance_timeout: float,
                 gm: GroupMember) -> None:
        self.group, self.member_id, self.client_id, self.client_host = group, member_id, client_id, client_host
        self.protocol, self.subscription, self.topics = protocol, subscription, topics
        self.cooperative = protocol == "cooperative-sticky"
        self.session_timeout, self.rebalance_timeout = session_timeout, rebalance_timeout
        self.gm = gm
        self.generation = -1
        self.assigned: Set[TP] = set()          # what the last SyncGroup answer handed out
        self.last_seen = time.monotonic()
        self.lock = threading.Lock()            # one group request of this member at a time

    def touch(self) -> None:
        self.last_seen = time.monotonic()
        self.gm.last_poll = time.monotonic()   # the coordinator's max_poll_interval_ms sees activity

    def needs_rebalance(self) -> bool:
        _v, owned, revoke, _lost = self.gm.snapshot()
        if revoke & self.assigned:
            return True
        return set(owned) - revoke != self.assigned

    def ack_given_up(self) -> None:
        """The client rejoined: acknowledge what it can no longer be consuming."""
        _v, owned, revoke, _lost = self.gm.snapshot()
        done = revoke if not self.cooperative else revoke - self.assigned
        if done:
            self.gm.ack_revoked(sorted(done))


class GroupProxy:
    """Kafka group members of one listener (see the module doc)."""

    def __init__(self, listener: "KafkaListener") -> None:
        self.listener = listener
        self.members: Dict[Tuple[str, str], KafkaMember] = {}
        self.pending: Dict[Tuple[str, str], float] = {}   # ids handed out with MEMBER_ID_REQUIRED
        self.generations: Dict[str, int] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._expire_loop, name="kafka-group-sessions", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
        with self._lock:
            ms = list(self.members.values())
            self.members.clear()
        for m in ms:
            m.gm.close(timeout=1.0)

    # ---------------------------------------------------------------- lookup
    def member(self, group: str, member_id: str, generation: Optional[int] = None) -> KafkaMember:
        m = self.members.get((group, member_id))
        if m is None:
            raise GroupError(UNKNOWN_MEMBER_ID, f"member {member_id!r} is not in group {group!r}")
        if generation is not None and generation != m.generation:
            raise GroupError(ILLEGAL_GENERATION, f"generation {generation} is not {m.generation}")
        m.touch()
        return m

    def _next_generation(self, group: str) -> int:
        with self._lock:
            g = self.generations.get(group, 0) % 0x7FFFFFFF + 1
            self.generations[group] = g
            return g

    # ------------------------------------------------------------------ join
    def join(self, group: str, member_id: str, protocol_type: str, protocols: List[Tuple[str, bytes]],
             session_timeout_ms: int, rebalance_timeout_ms: int, client_id: str, client_host: str,
             require_known_id: bool) -> Dict[str, Any]:
        try:
            validate_group(group)
        except InvalidGroupId as e:
            raise GroupError(INVALID_GROUP_ID, str(e)) from None
        if protocol_type != "consumer" or not protocols:
            raise GroupError(INCONSISTENT_GROUP_PROTOCOL,
                             f"protocol type {protocol_type!r} is not served (only 'consumer')")
        name, meta = protocols[0]
        topics = parse_subscription(meta)
        if not member_id:
            new_id = f"{client_id or 'consumer'}-{uuid.uuid4()}"
            if require_known_id:
                with self._lock:
                    self.pending[(group, new_id)] = time.monotonic()
                return {"error_code": MEMBER_ID_REQUIRED, "generation_id": -1, "protocol_name": "",
                        "leader": "", "member_id": new_id, "members": []}
            member_id = new_id
        key = (group, member_id)
        with self._lock:
            m = self.members.get(key)
            known = m is not None or self.pending.pop(key, None) is not None or not require_known_id
        if not known:
            raise GroupError(UNKNOWN_MEMBER_ID, f"member {member_id!r} is not in group {group!r}")
        if m is not None and sorted(m.topics) != sorted(topics):
            self._drop(m, "its subscription changed")    # a new coordinator member for the new topics
            m = None
        if m is None:
            gm = GroupMember(self.listener.root, group, topics=topics, client_id=client_id or "kafka-client",
                             session_timeout_ms=max(1, min(session_timeout_ms, 3_600_000)),
                             max_poll_interval_ms=max(1, min(rebalance_timeout_ms, 3_600_000)),
                             assignor=ASSIGNORS.get(name, "sticky"))
            try:
                gm.start(timeout=10.0)
            except (NotCoordinator, ShmqError) as e:
                gm.close(timeout=0.5)
                raise GroupError(COORDINATOR_NOT_AVAILABLE, str(e)) from None
            m = KafkaMember(group, member_id, client_id, client_host, name, meta, topics,
                            session_timeout_ms / 1000, rebalance_timeout_ms / 1000, gm)
            with self._lock:
                self.members[key] = m
            log.info("group %s: Kafka member %s (%s) joined for %s", group, member_id, client_id, topics)
        with m.lock:
            m.protocol, m.subscription = name, meta
            m.cooperative = name == "cooperative-sticky"
            m.touch()
            m.ack_given_up()
            self._settle(m)
            m.generation = self._next_generation(group)
            if not m.cooperative:
                m.assigned = set()           # an eager client gave up everything to rejoin
        return {"error_code": NONE, "generation_id": m.generation, "protocol_type": "consumer",
                "protocol_name": name, "leader": LEADER_ID, "member_id": member_id, "members": []}

    def _settle(self, m: KafkaMember) -> None:
        """Wait (bounded) until the group has no revocation pending and this
        member's state stopped changing, so the answer carries a settled assignment."""
        deadline = time.monotonic() + max(0.5, min(m.rebalance_timeout / 2, 10.0))
        client = self.listener.cluster.client
        last_v, since = -1, time.monotonic()
        while time.monotonic() < deadline:
            v, _owned, revoke, _lost = m.gm.snapshot()
            if v != last_v:
                last_v, since = v, time.monotonic()
            elif not revoke and time.monotonic() - since >= 0.05:
                try:
                    groups = {g["group"]: g for g in client.call("list_groups")}
                except ShmqError:
                    return
                if groups.get(m.group, {}).get("state") != "Rebalancing":
                    return
            time.sleep(0.02)

    # ------------------------------------------------------------------ sync
    def sync(self, group: str, member_id: str, generation: int) -> Dict[str, Any]:
        m = self.member(group, member_id, generation)
        with m.lock:
            _v, owned, revoke, _lost = m.gm.snapshot()
            # What is being revoked is left out: a cooperative client learns here that it
            # loses it, and acknowledges that by rejoining.
            m.assigned = set(owned) - revoke
        return {"error_code": NONE, "protocol_type": "consumer", "protocol_name": m.protocol,
                "assignment": encode_assignment(m.assigned)}

    def heartbeat(self, group: str, member_id: str, generation: int) -> int:
        m = self.member(group, member_id, generation)
        return REBALANCE_IN_PROGRESS if m.needs_rebalance() else NONE

    def leave(self, group: str, member_id: str) -> int:
        m = self.members.get((group, member_id))
        if m is None:
            return UNKNOWN_MEMBER_ID
        self._drop(m, "it left the group")
        return NONE

    def owned_generations(self, m: KafkaMember) -> Dict[TP, int]:
        """Coordinator generation of each partition the member may commit."""
        _v, owned, _revoke, _lost = m.gm.snapshot()
        return {tp: g for tp, g in owned.items() if tp in m.assigned or m.cooperative}

    def describe(self, group: str) -> List[KafkaMember]:
        with self._lock:
            return [m for (g, _), m in self.members.items() if g == group]

    # -------------------------------------------------------------- sessions
    def _drop(self, m: KafkaMember, why: str) -> None:
        with self._lock:
            if self.members.get((m.group, m.member_id)) is m:
                del self.members[(m.group, m.member_id)]
        log.info("group %s: Kafka member %s removed: %s", m.group, m.member_id, why)
        m.gm.close(timeout=2.0)

    def _expire_loop(self) -> None:
        while not self._closed.wait(0.2):
            now = time.monotonic()
            with self._lock:
                late = [m for m in self.members.values() if now - m.last_seen > m.session_timeout]
                for k, t in list(self.pending.items()):
                    if now - t > 300:
                        del self.pending[k]
            for m in late:
                self._drop(m, f"no heartbeat within session.timeout.ms={int(m.session_timeout * 1000)}")
