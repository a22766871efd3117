"""Consumer groups in the coordinator: membership, assignors, incremental rebalancing.

Theory of operation (everything runs under the server's lock):

* A member joins over its own socket connection (``join``); the connection
  is the member's lifeline: EOF on it (the process died) removes the member
  at once. A supervisor ``tick`` also checks each member's process (psutil,
  pid + create time), its heartbeats (``session_timeout_ms``: a hung,
  e.g. SIGSTOPped, member) and how long a revocation has been pending
  (``max_poll_interval_ms``: stuck processing).
* ``_reconcile(group)`` computes the target assignment with the group's
  assignor (``sticky`` default, ``range``, ``roundrobin``) from the members'
  subscriptions (topic list or regex) and the current owners, then moves
  toward it incrementally (cooperative): a partition that must move is first
  *revoked* from its owner, who keeps consuming everything else, commits,
  runs ``on_revoke`` and acknowledges (``revoked``); only then is it
  *assigned* to its new owner. A partition without an owner is assigned at
  once. Members whose partitions do not move see nothing but a new state.
* Generations: the group generation is bumped at every change of ownership;
  a partition assigned to a member carries the generation of that
  assignment, written into the offsets-table entry's generation word (the
  fence: see ``offsets_sync``). Before an owner change the server journals
  the table (``sync``), so nothing the old owner committed is lost.
* Static members (``group_instance_id``): when the connection of a static
  member closes, its partitions stay reserved for ``session_timeout_ms``;
  the same instance rejoining gets them back (new generation) and nobody
  else is disturbed. After the timeout they are reassigned.
* Every member state change is pushed to the member's connection (a frame
  ``{"push": "group", ...}`` with a per-member ``seq``); ``take_pushes``
  hands them to the server, which sends them after releasing its lock.

Membership is in memory only: after a coordinator failover members reconnect
and rejoin naming the partitions they still own (kept when nobody else
claims them); for ``rejoin_grace`` seconds after such a takeover nothing
else is assigned, so that every member can claim first. Committed offsets
are journaled as before.
"""
from __future__ import annotations

import logging
import random
import re
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import psutil

from ..errors import InvalidRequest, ShmqError
from ..offsets_table import MAX_GENERATION
from ..root import validate_group

__all__ = ["GroupManager", "ASSIGNORS", "assign_range", "assign_roundrobin", "assign_sticky"]

log = logging.getLogger("shmq.coordinator.groups")

TP = Tuple[str, int]


class UnknownMemberId(ShmqError):
    """The member is not (any more) in the group; it must rejoin."""


# ------------------------------------------------------------------ assignors
def assign_range(members: List[str], subs: Dict[str, Set[str]], parts: Dict[str, int],
                 current: Dict[str, Set[TP]]) -> Dict[str, Set[TP]]:
    out: Dict[str, Set[TP]] = {m: set() for m in members}
    for topic in sorted(parts):
        ms = [m for m in members if topic in subs[m]]
        if not ms:
            continue
        n = parts[topic]
        per, extra = divmod(n, len(ms))
        p = 0
        for i, m in enumerate(ms):
            k = per + (1 if i < extra else 0)
            out[m].update((topic, q) for q in range(p, p + k))
            p += k
    return out


def assign_roundrobin(members: List[str], subs: Dict[str, Set[str]], parts: Dict[str, int],
                      current: Dict[str, Set[TP]]) -> Dict[str, Set[TP]]:
    out: Dict[str, Set[TP]] = {m: set() for m in members}
    i = 0
    for topic in sorted(parts):
        for p in range(parts[topic]):
            for _ in range(len(members)):
                m = members[i % len(members)]
                i += 1
                if topic in subs[m]:
                    out[m].add((topic, p))
                    break
    return out


def assign_sticky(members: List[str], subs: Dict[str, Set[str]], parts: Dict[str, int],
                  current: Dict[str, Set[TP]]) -> Dict[str, Set[TP]]:
    """Balanced, keeping as many current owners as balance allows."""
    out: Dict[str, Set[TP]] = {m: set() for m in members}
    if not members:
        return out
    all_tps = [(t, p) for t in sorted(parts) for p in range(parts[t])
               if any(t in subs[m] for m in members)]
    n, k = len(all_tps), len(members)
    base, extra = divmod(n, k)
    valid = set(all_tps)
    # Keep current partitions: members that have more than base keep base+1
    # (at most `extra` of them, those with most first), the others base.
    keep = {m: sorted(tp for tp in current.get(m, ()) if tp in valid and tp[0] in subs[m]) for m in members}
    taken: Set[TP] = set()
    order = sorted(members, key=lambda m: (-len(keep[m]), m))
    bonus = extra
    for m in order:
        cap = base
        if bonus > 0 and len(keep[m]) > base:
            cap = base + 1
            bonus -= 1
        for tp in keep[m][:cap]:
            if tp not in taken:
                out[m].add(tp)
                taken.add(tp)
    # Hand out the rest to the least loaded eligible member.
    for tp in all_tps:
        if tp in taken:
            continue
        elig = [m for m in members if tp[0] in subs[m]]
        m = min(elig, key=lambda x: (len(out[x]), x))
        out[m].add(tp)
        taken.add(tp)
    # Balance pass (heterogeneous subscriptions): move from the most to the least loaded.
    for _ in range(n):
        moved = False
        for m in sorted(members, key=lambda x: (-len(out[x]), x)):
            for tp in sorted(out[m], reverse=True):
                elig = [x for x in members if tp[0] in subs[x] and len(out[x]) + 1 < len(out[m])]
                if elig:
                    to = min(elig, key=lambda x: (len(out[x]), x))
                    out[m].discard(tp)
                    out[to].add(tp)
                    moved = True
                    break
            if moved:
                break
        if not moved:
            break
    return out


ASSIGNORS: Dict[str, Callable[..., Dict[str, Set[TP]]]] = {
    "sticky": assign_sticky, "cooperative-sticky": assign_sticky,
    "range": assign_range, "roundrobin": assign_roundrobin}


# -------------------------------------------------------------------- state
class Member:
    __slots__ = ("member_id", "cid", "client_id", "pid", "create_time", "host", "topics", "pattern",
                 "instance_id", "session_timeout", "max_poll_interval", "last_heartbeat", "owned",
                 "revoking", "revoke_since", "seq", "joined", "departed")

    def __init__(self, member_id: str, cid: int, args: Dict[str, Any]) -> None:
        self.member_id = member_id
        self.cid: Optional[int] = cid
        self.client_id = str(args.get("client_id") or "")
        self.pid = int(args.get("pid") or 0)
        self.create_time = args.get("create_time")
        self.host = str(args.get("host") or "")
        self.topics: List[str] = list(args.get("topics") or [])
        self.pattern: Optional[re.Pattern] = re.compile(args["pattern"]) if args.get("pattern") else None
        self.instance_id: Optional[str] = args.get("group_instance_id")
        self.session_timeout = int(args.get("session_timeout_ms") or 10000) / 1000
        self.max_poll_interval = int(args.get("max_poll_interval_ms") or 300000) / 1000
        self.last_heartbeat = time.monotonic()
        self.owned: Dict[TP, int] = {}          # partition -> generation of its assignment
        self.revoking: Set[TP] = set()
        self.revoke_since = 0.0
        self.seq = 0
        self.joined = time.time()
        self.departed: Optional[float] = None   # static member whose connection closed

    def subscribed(self, topic: str) -> bool:
        if self.pattern is not None:
            return self.pattern.fullmatch(topic) is not None
        return topic in self.topics


class Group:
    def __init__(self, name: str, assignor: str) -> None:
        self.name = name
        self.assignor = assignor
        self.members: Dict[str, Member] = {}
        self.generation = random.randint(1, MAX_GENERATION)
        self.rebalances = 0

    def bump(self) -> int:
        self.generation = self.generation % MAX_GENERATION + 1
        return self.generation

    @property
    def state(self) -> str:
        if not self.members:
            return "Empty"
        if any(m.revoking for m in self.members.values()):
            return "Rebalancing"
        return "Stable"


class GroupManager:
    """Consumer groups of one coordinator (see the module doc).

    ``topics()`` returns {topic: partition count}; ``set_owner(group, topic,
    partition, generation)`` writes the fence; ``sync()`` journals the
    offsets table (called before any owner change).
    """

    def __init__(self, topics: Callable[[], Dict[str, int]],
                 set_owner: Callable[[str, str, int, int], None], sync: Callable[[], Any],
                 rejoin_grace: float = 0.0) -> None:
        self.groups: Dict[str, Group] = {}
        self._grace_until = time.monotonic() + rejoin_grace if rejoin_grace > 0 else None
        self._topics = topics
        self._set_owner = set_owner
        self._sync = sync
        self._pushes: List[Tuple[int, Dict[str, Any]]] = []
        self._by_cid: Dict[int, Set[Tuple[str, str]]] = {}
        self.stats = {"rebalances": 0}

    # -------------------------------------------------------------- requests
    def join(self, cid: int, peer_pid: int, args: Dict[str, Any]) -> Dict[str, Any]:
        group = validate_group(args.get("group"))
        assignor = args.get("assignor") or "sticky"
        if assignor not in ASSIGNORS:
            raise InvalidRequest(f"unknown assignor {assignor!r} (one of {sorted(ASSIGNORS)})")
        topics, pattern = args.get("topics"), args.get("pattern")
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as e:
                raise InvalidRequest(f"bad subscription pattern {pattern!r}: {e}") from None
        elif not isinstance(topics, list) or not all(isinstance(t, str) for t in topics):
            raise InvalidRequest("join needs topics (a list of names) or pattern (a regex)")
        g = self.groups.get(group)
        if g is None:
            g = self.groups[group] = Group(group, assignor)
        mid = args.get("member_id")
        inst = args.get("group_instance_id")
        old: Optional[Member] = None
        if inst:
            old = next((m for m in g.members.values() if m.instance_id == inst), None)
        elif mid and mid in g.members:
            old = g.members[mid]
        a = dict(args)
        a["pid"] = peer_pid or a.get("pid")
        if old is not None:
            # Static member back (or a member rejoining): same partitions, new generation.
            m = Member(old.member_id if not inst else f"{inst}-{uuid.uuid4().hex[:12]}", cid, a)
            if old.cid is not None and old.cid != cid:
                self._push(old, {"fenced": True, "reason": f"instance {inst!r} joined again elsewhere"})
                self._by_cid.get(old.cid, set()).discard((group, old.member_id))
            del g.members[old.member_id]
            gen = g.bump()
            m.owned = {tp: gen for tp in old.owned}
            m.revoking = set(old.revoking)
            m.revoke_since = old.revoke_since
            for tp in m.owned:
                self._set_owner(group, tp[0], tp[1], gen)
        else:
            m = Member(f"{a.get('client_id') or 'consumer'}-{uuid.uuid4().hex[:12]}", cid, a)
            # Cooperative protocol: a member rejoining (e.g. after a coordinator failover)
            # names what it still consumes; it keeps what nobody else owns.
            claims = args.get("owned") or []
            taken = {tp for x in g.members.values() for tp in x.owned}
            parts = self._topics()
            keep = []
            for item in claims:
                if isinstance(item, (list, tuple)) and len(item) == 2:
                    tp = (str(item[0]), int(item[1]))
                    if tp not in taken and 0 <= tp[1] < parts.get(tp[0], 0):
                        keep.append(tp)
            if keep:
                gen = g.bump()
                for tp in keep:
                    m.owned[tp] = gen
                    self._set_owner(group, tp[0], tp[1], gen)
        g.members[m.member_id] = m
        self._by_cid.setdefault(cid, set()).add((group, m.member_id))
        log.info("group %s: member %s (pid %s) joined", group, m.member_id, m.pid)
        self._reconcile(g)
        return self._state(g, m)

    def heartbeat(self, cid: int, group: str, member_id: str) -> Dict[str, Any]:
        g, m = self._member(group, member_id, cid)
        m.last_heartbeat = time.monotonic()
        return self._state(g, m)

    def revoked(self, cid: int, group: str, member_id: str, partitions: List[Any]) -> Dict[str, Any]:
        g, m = self._member(group, member_id, cid)
        m.last_heartbeat = time.monotonic()
        done = {(str(t), int(p)) for t, p in partitions} & m.revoking
        if done:
            self._sync()                       # the owner's last commits first
            for tp in done:
                m.revoking.discard(tp)
                m.owned.pop(tp, None)
                self._set_owner(group, tp[0], tp[1], 0)
            self._reconcile(g)
        return self._state(g, m)

    def leave(self, cid: int, group: str, member_id: str) -> None:
        g = self.groups.get(group)
        if g is None or member_id not in g.members:
            return
        self._remove(g, g.members[member_id], "left the group", keep_static=False)

    def connection_closed(self, cid: int) -> None:
        for group, mid in list(self._by_cid.pop(cid, ())):
            g = self.groups.get(group)
            if g is not None and mid in g.members and g.members[mid].cid == cid:
                self._remove(g, g.members[mid], "connection closed (process exited)", keep_static=True)

    def topics_changed(self) -> None:
        for g in list(self.groups.values()):
            if g.members:
                self._reconcile(g)

    def tick(self, check_pids: bool = True) -> None:
        """Supervision: dead processes, missed heartbeats, stuck revocations, expired static members."""
        now = time.monotonic()
        if self._grace_until is not None and now >= self._grace_until:
            self._grace_until = None
            self.topics_changed()              # members had their chance to claim: assign the rest
        for g in list(self.groups.values()):
            for m in list(g.members.values()):
                why, static_keep = None, False
                if m.departed is not None:
                    if now - m.departed > m.session_timeout:
                        self._remove(g, m, "static member did not return within the session timeout",
                                     keep_static=False)
                    continue
                if now - m.last_heartbeat > m.session_timeout:
                    why = f"no heartbeat for {now - m.last_heartbeat:.1f}s (session timeout)"
                elif m.revoking and now - m.revoke_since > m.max_poll_interval:
                    why = "revocation not acknowledged within max_poll_interval_ms"
                elif check_pids and not _alive(m.pid, m.create_time):
                    why, static_keep = "process is gone", True   # as a closed connection
                if why:
                    if static_keep and m.cid is not None:
                        self._by_cid.get(m.cid, set()).discard((g.name, m.member_id))
                    self._remove(g, m, why, keep_static=static_keep, notify=not static_keep)

    def supervising(self) -> bool:
        """True while ``tick`` has something to watch: a member, or a rejoin grace period."""
        return self._grace_until is not None or any(g.members for g in self.groups.values())

    # --------------------------------------------------------------- queries
    def list(self) -> List[Dict[str, Any]]:
        return [{"group": n, "state": g.state, "members": len(g.members), "assignor": g.assignor,
                 "generation": g.generation} for n, g in sorted(self.groups.items())]

    def describe(self, group: str) -> Dict[str, Any]:
        g = self.groups.get(group)
        if g is None:
            return {"group": group, "state": "Empty", "assignor": None, "generation": None, "members": []}
        return {"group": group, "state": g.state, "assignor": g.assignor, "generation": g.generation,
                "members": [{"member_id": m.member_id, "client_id": m.client_id, "pid": m.pid, "host": m.host,
                             "group_instance_id": m.instance_id,
                             "assignment": sorted([t, p] for t, p in m.owned),
                             "revoking": sorted([t, p] for t, p in m.revoking),
                             "departed": m.departed is not None}
                            for m in g.members.values()]}

    def active(self, group: str) -> bool:
        g = self.groups.get(group)
        return g is not None and bool(g.members)

    def forget(self, group: str) -> None:
        g = self.groups.get(group)
        if g is not None and not g.members:
            del self.groups[group]

    def take_pushes(self) -> List[Tuple[int, Dict[str, Any]]]:
        out, self._pushes = self._pushes, []
        return out

    # -------------------------------------------------------------- internal
    def _member(self, group: str, member_id: str, cid: int) -> Tuple[Group, Member]:
        g = self.groups.get(group)
        m = g.members.get(member_id) if g is not None else None
        if m is None or m.cid != cid:
            raise UnknownMemberId(f"member {member_id!r} is not in group {group!r} (it was removed); rejoin")
        return g, m  # type: ignore[return-value]

    def _state(self, g: Group, m: Member) -> Dict[str, Any]:
        m.seq += 1
        return {"group": g.name, "member_id": m.member_id, "generation": g.generation, "seq": m.seq,
                "assigned": [[t, p, gen] for (t, p), gen in sorted(m.owned.items())],
                "revoke": sorted([t, p] for t, p in m.revoking)}

    def _push(self, m: Member, extra: Optional[Dict[str, Any]] = None, g: Optional[Group] = None) -> None:
        if m.cid is None:
            return
        if extra is not None:
            m.seq += 1
            frame = {"push": "group", "member_id": m.member_id, "seq": m.seq, **extra}
        else:
            assert g is not None
            frame = {"push": "group", **self._state(g, m)}
        self._pushes.append((m.cid, frame))

    def _remove(self, g: Group, m: Member, why: str, *, keep_static: bool, notify: bool = False) -> None:
        if keep_static and m.instance_id:
            log.info("group %s: static member %s: %s; partitions kept for %.1fs", g.name, m.member_id, why,
                     m.session_timeout)
            m.departed = time.monotonic()
            m.cid = None
            return
        log.info("group %s: member %s (pid %s) removed: %s", g.name, m.member_id, m.pid, why)
        if notify:
            self._push(m, {"fenced": True, "reason": why})
            if m.cid is not None:
                self._by_cid.get(m.cid, set()).discard((g.name, m.member_id))
        self._sync()                           # what it committed before going away counts
        del g.members[m.member_id]
        for tp in m.owned:
            self._set_owner(g.name, tp[0], tp[1], 0)
        self._reconcile(g)

    def _reconcile(self, g: Group) -> None:
        """Move the group one step toward its target assignment (see the module doc)."""
        if not g.members:
            return
        if self._grace_until is not None:      # rejoin grace after a takeover: members claim first
            for m in g.members.values():
                self._push(m, g=g)
            return
        parts = self._topics()
        live = [mid for mid, m in sorted(g.members.items()) if m.departed is None]
        reserved: Set[TP] = set()
        for m in g.members.values():
            if m.departed is not None:
                reserved.update(m.owned)
        subs = {mid: {t for t in parts if g.members[mid].subscribed(t)} for mid in live}
        avail = {t: n for t, n in parts.items() if any(t in s for s in subs.values())}
        current = {mid: set(g.members[mid].owned) for mid in live}
        target = ASSIGNORS[g.assignor](live, subs, avail, current) if live else {}
        for mid in live:
            target[mid] = {tp for tp in target.get(mid, set()) if tp not in reserved}
        owner: Dict[TP, str] = {}
        for mid, m in g.members.items():
            for tp in m.owned:
                owner[tp] = mid
        changed: Set[str] = set()
        now = time.monotonic()
        # 1. Revoke what moves away (or no longer exists / is no longer subscribed).
        for mid in live:
            m = g.members[mid]
            gone = {tp for tp in m.owned if tp not in target[mid]} - m.revoking
            if gone:
                if not m.revoking:
                    m.revoke_since = now
                m.revoking |= gone
                changed.add(mid)
        # 2. Assign what nobody owns.
        new_gen = None
        for mid in live:
            m = g.members[mid]
            for tp in sorted(target[mid]):
                if tp not in owner:
                    if new_gen is None:
                        new_gen = g.bump()
                    m.owned[tp] = new_gen
                    owner[tp] = mid
                    self._set_owner(g.name, tp[0], tp[1], new_gen)
                    changed.add(mid)
        if changed:
            g.rebalances += 1
            self.stats["rebalances"] += 1
        for mid in changed:
            self._push(g.members[mid], g=g)


def _alive(pid: int, create_time: Any) -> bool:
    if not pid:
        return True
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - float(create_time)) > 0.01:
            return False
        return p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.Error:
        return True
