"""Client side of consumer-group membership (driven by ``Consumer``).

A ``GroupMember`` owns one connection to the coordinator (the member's
lifeline: when this process dies the kernel closes it and the coordinator
reassigns at once) and one daemon thread that reads it. Everything the
coordinator says about the member (answers to join / heartbeat / revoked and
unsolicited pushes) is a *state*: the partitions it owns with the generation
of each assignment, and the partitions it must give up. The thread keeps the
newest state (by ``seq``) and bumps ``version``; the consumer compares
``version`` from ``poll`` (one attribute read) and applies changes there, in
its own thread: it commits and calls ``on_revoke`` for ``revoke``, then calls
``ack_revoked`` — only then does the coordinator hand those partitions on.

The thread also heartbeats (``session_timeout_ms`` / 3, at most every second),
and enforces ``max_poll_interval_ms``: if ``poll`` is not called for that
long it leaves the group and marks the member lost; the next ``poll``
reports it (``on_lost``) and the member rejoins. When the coordinator says
the member is unknown (it was evicted, e.g. after a SIGSTOP), the member is
lost too and rejoins at once. When the connection breaks (coordinator
failover) it keeps consuming, reconnects (starting a coordinator if need be)
and rejoins naming the partitions it owns (as Kafka's cooperative protocol);
the new coordinator lets it keep those nobody else claimed, with a new
generation (commits made in between with the old one are refused).
"""
from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import psutil

from .coordinator.client import CoordinatorClient
from .coordinator.protocol import recv_frame, send_frame
from .errors import NotCoordinator
from .root import Root

__all__ = ["GroupMember"]

log = logging.getLogger("shmq.group")

TP = Tuple[str, int]


class GroupMember:
    def __init__(self, root: Root, group: str, *, topics: Optional[List[str]] = None,
                 pattern: Optional[str] = None, client_id: str = "shmq-consumer",
                 group_instance_id: Optional[str] = None, session_timeout_ms: int = 10000,
                 max_poll_interval_ms: int = 300000, heartbeat_interval_ms: Optional[int] = None,
                 assignor: str = "sticky") -> None:
        self.root = root
        self.group = group
        self.join_args: Dict[str, Any] = {
            "group": group, "topics": topics, "pattern": pattern, "client_id": client_id,
            "pid": os.getpid(), "create_time": psutil.Process().create_time(), "host": socket.gethostname(),
            "group_instance_id": group_instance_id, "session_timeout_ms": int(session_timeout_ms),
            "max_poll_interval_ms": int(max_poll_interval_ms), "assignor": assignor}
        self.session_timeout = session_timeout_ms / 1000
        self.max_poll_interval = max_poll_interval_ms / 1000
        self.heartbeat_interval = (heartbeat_interval_ms / 1000 if heartbeat_interval_ms
                                   else min(1.0, self.session_timeout / 3))
        self.member_id: Optional[str] = None
        self.generation: Optional[int] = None
        self.owned: Dict[TP, int] = {}
        self.revoke: Set[TP] = set()
        self.version = 0
        self.lost_reason: Optional[str] = None
        self.last_poll = time.monotonic()
        self.error: Optional[str] = None
        self._seq = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._sock: Optional[socket.socket] = None
        self._closed = False
        self._left_for_poll: Optional[float] = None
        self._claim = False
        self._joined = threading.Event()
        self._next_id = 0
        self._waiters: Dict[int, List[Any]] = {}
        self._thread = threading.Thread(target=self._run, name=f"shmq-group-{group}", daemon=True)

    # ------------------------------------------------------------ consumer API
    def start(self, timeout: float = 10.0) -> None:
        """Connect, join, and wait (up to ``timeout``) for the first state."""
        self._thread.start()
        if not self._joined.wait(timeout):
            raise NotCoordinator(f"group {self.group!r}: no answer to join within {timeout:.1f}s"
                                 + (f" ({self.error})" if self.error else ""))
        if self.error and self.member_id is None:
            raise NotCoordinator(f"group {self.group!r}: join failed: {self.error}")

    def snapshot(self) -> Tuple[int, Dict[TP, int], Set[TP], Optional[str]]:
        """(version, owned, revoke, lost reason) — the lost reason is taken (reported once)."""
        with self._lock:
            lost, self.lost_reason = self.lost_reason, None
            return self.version, dict(self.owned), set(self.revoke), lost

    def ack_revoked(self, partitions: List[TP]) -> None:
        """The consumer committed and stopped consuming ``partitions``."""
        with self._lock:
            mid = self.member_id
            self.revoke -= set(partitions)
            for tp in partitions:
                self.owned.pop(tp, None)
        if mid is not None:
            self._send("group_revoked", group=self.group, member_id=mid,
                       partitions=[list(tp) for tp in partitions])

    def close(self, timeout: float = 2.0) -> None:
        """Leave the group (a static member just disconnects: it may come back)."""
        if self._closed:
            return
        mid = self.member_id
        if mid is not None and not self.join_args["group_instance_id"] and self._sock is not None:
            ev = threading.Event()
            rid = self._send("leave_group", group=self.group, member_id=mid, waiter=ev)
            if rid is not None:
                ev.wait(timeout)
        self._closed = True
        self._thread.join(timeout=1.0)
        s, self._sock = self._sock, None
        if s is not None:
            try:
                s.close()
            except OSError:
                pass

    # ---------------------------------------------------------------- thread
    def _send(self, op: str, waiter: Optional[threading.Event] = None, **args: Any) -> Optional[int]:
        s = self._sock
        if s is None:
            return None
        with self._send_lock:
            self._next_id += 1
            rid = self._next_id
            if waiter is not None:
                self._waiters[rid] = [waiter]
            try:
                send_frame(s, {"id": rid, "op": op, "args": args})
            except OSError as e:
                log.debug("group %s: send %s failed: %s", self.group, op, e)
                return None
        return rid

    def _connect_and_join(self) -> bool:
        try:
            cc = CoordinatorClient(self.root, timeout=self.session_timeout, connect_timeout=2.0)
            s = cc._connect()
        except (NotCoordinator, OSError) as e:
            self.error = str(e)
            return False
        s.settimeout(None)
        self._sock = s
        return self._join()

    def _join(self) -> bool:
        args = dict(self.join_args)
        args["member_id"] = self.member_id if args["group_instance_id"] else None
        with self._lock:
            if self._claim:
                args["owned"] = [list(tp) for tp in self.owned if tp not in self.revoke]
        return self._send("join_group", **args) is not None

    def _lose(self, reason: str) -> None:
        with self._lock:
            if self.owned or self.revoke:
                self.lost_reason = reason
            self.owned, self.revoke = {}, set()
            self.member_id = None
            self._seq = 0
            self.version += 1
        log.warning("group %s: lost membership: %s", self.group, reason)

    def _on_frame(self, f: Dict[str, Any]) -> None:
        rid = f.get("id")
        if rid is not None:
            w = self._waiters.pop(rid, None)
            if w is not None:
                w[0].set()
        if f.get("push") and f.get("fenced"):
            if f.get("member_id") == self.member_id:
                self._lose(f"removed from the group by the coordinator: {f.get('reason')}")
                self._join()
            return
        if not f.get("ok", True):
            err = f.get("error")
            self.error = f"{err}: {f.get('message')}"
            if err == "UnknownMemberId":
                if self.member_id is not None:
                    self._lose(str(f.get("message")))
                    self._join()
            elif self.member_id is None:
                log.error("group %s: %s", self.group, self.error)
                self._joined.set()
            return
        st = f.get("result") if "result" in f else f
        if not isinstance(st, dict) or "assigned" not in st:
            return
        with self._lock:
            if st["member_id"] != self.member_id:
                if self.member_id is not None:
                    return                     # state of an old incarnation
                self.member_id = st["member_id"]
                self._seq = 0
                self._claim = False
            if st["seq"] <= self._seq:
                return
            self._seq = st["seq"]
            self.generation = st["generation"]
            self.owned = {(t, p): g for t, p, g in st["assigned"]}
            self.revoke = {(t, p) for t, p in st["revoke"]}
            self.version += 1
        self.error = None
        self._joined.set()

    def _run(self) -> None:
        next_hb = 0.0
        buf_sock: Optional[socket.socket] = None
        while not self._closed:
            if self._sock is None:
                if self._left_for_poll is None and not self._connect_and_join():
                    time.sleep(0.05)
                    continue
            s = self._sock
            now = time.monotonic()
            # max_poll_interval_ms: leave, and rejoin on the next poll.
            if self._left_for_poll is None and self.member_id is not None and \
                    now - self.last_poll > self.max_poll_interval:
                self._send("leave_group", group=self.group, member_id=self.member_id)
                self._left_for_poll = now
                self._lose(f"poll was not called for {now - self.last_poll:.1f}s "
                           f"(max_poll_interval_ms={int(self.max_poll_interval * 1000)})")
            elif self._left_for_poll is not None and self.last_poll > self._left_for_poll:
                self._left_for_poll = None
                self._join()
            if now >= next_hb and self.member_id is not None and self._left_for_poll is None:
                self._send("heartbeat", group=self.group, member_id=self.member_id)
                next_hb = now + self.heartbeat_interval
            if s is None:
                time.sleep(0.02)
                continue
            try:
                r, _, _ = select.select([s], [], [], 0.02)
            except (OSError, ValueError):
                r = []
            if not r:
                continue
            try:
                f = recv_frame(s)
            except (OSError, ConnectionError, ValueError):
                f = None
            if f is None:
                if self._closed:
                    break
                self._sock = None
                try:
                    s.close()
                except OSError:
                    pass
                # Coordinator failover: keep consuming what we own and claim it when rejoining.
                log.warning("group %s: connection to the coordinator broke; rejoining", self.group)
                with self._lock:
                    self.member_id = None
                    self._seq = 0
                    self._claim = True
                continue
            buf_sock = s
            self._on_frame(f)
        del buf_sock
