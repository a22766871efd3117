"""The coordinator process: one active per root, serving metadata over a Unix socket.

Theory of operation:

1. ``Coordinator.run()`` takes an exclusive ``flock`` on ``<root>/coordinator.lock``
   (non-blocking, or blocking with ``standby=True``: a standby sleeps in the
   kernel and wakes the instant the active process dies, since the kernel
   drops a dead process's locks).
2. It writes ``<root>/coordinator.pid``, recovers the metadata (snapshot +
   journal), opens every partition log (recreating missing ones with a
   warning and removing orphan directories), publishes ``metadata.map`` and
   starts the housekeeping thread.
3. It binds ``<root>/coordinator.sock`` (a stale socket file is removed: the
   lock proves its owner is dead) and serves each connection in a thread.
   Every connection's ``SO_PEERCRED`` uid must equal ours, else the peer gets
   one ``ClusterAuthorizationFailed`` frame and is disconnected.
4. Requests are served one at a time under one lock: validate
   (``Store.prepare_*``), do file work, journal + fsync, apply, publish
   ``metadata.map``, answer. A crash at any point leaves either the old or
   the new state after recovery (orphan files are swept at startup).
5. A thread journals hot-path offset commits from ``<root>/offsets.table``
   every 10 ms while they come in (``offsets_sync``); ``sync_offsets`` does
   it at once. Every supervision loop (housekeeping, offsets, groups,
   replication) backs off while it finds nothing to do (``IDLE_S``;
   housekeeping ``HOUSEKEEP_IDLE_S``; replication half the shortest
   ``replica_lag_time_max_ms``, at most ``EMPTY_S``; transactions ``EMPTY_S``
   while none is open), so an idle coordinator wakes about three times a second.
6. It exits on SIGTERM/SIGINT (``shmq stop``), when its root directory
   disappears, or (``idle_exit_ms``, set for the embedded coordinator) once
   no client has been connected for that long. On the way out it stops its
   replica processes (SIGTERM) and journals what is pending; the data stays
   for the next coordinator.

Operations (``op_<name>``, arguments by keyword): ping, create_topic,
delete_topic, list_topics, describe_topic, create_partitions, alter_config,
commit_offsets, fetch_offsets, offsets_slot, sync_offsets,
allocate_producer_id, status; consumer groups (``groups.py``): join_group,
heartbeat, group_revoked, leave_group (on the member's own connection, which
also carries pushed group state), list_groups, describe_group, delete_group,
reset_offsets; replication (``replication.py``): replica_register (on the
replica process's own connection), replica_storage_failed,
replica_storage_recovered, recover_topics, elect_leaders; transactions
(``transactions.py``, Kafka's InitProducerId / AddPartitionsToTxn /
AddOffsetsToTxn / TxnOffsetCommit / EndTxn): init_producer_id,
add_partitions_to_txn, add_offsets_to_txn, txn_offset_commit, end_txn,
describe_transactions.
"""
from __future__ import annotations

import fcntl
import inspect
import logging
import os
import signal
import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional

import psutil

from ..errors import ClusterAuthorizationFailed, InvalidRequest, ShmqError, UnknownTopicOrPartition
from ..ringlog import NO_FLOOR
from ..root import Root, validate_group
from .durable import DurableStore
from .groups import GroupManager
from .housekeeping import Backoff, Housekeeper, LogRegistry
from .metamap import MetadataPublisher
from .offsets_sync import OffsetsTableSync
from .partition_files import create_logs, open_all_logs, remove_logs
from .protocol import error_to_wire, recv_frame, send_frame
from .replication import ReplicationManager, is_replicated
from .transactions import TransactionCoordinator

__all__ = ["Coordinator", "acquire_lock"]

log = logging.getLogger("shmq.coordinator")

_UCRED = struct.Struct("3i")      # pid, uid, gid
IDLE_S = 1.0                      # the slowest pace of an idle supervision loop
EMPTY_S = 5.0                     # ... of one with nothing to supervise (it is woken when that changes)
HOUSEKEEP_IDLE_S = 2.0            # ... of idle housekeeping (a burst prepares its own slot, a reader pads a dead claim)


def acquire_lock(root: Root, *, wait: bool) -> Optional[int]:
    """The fd holding the root's coordinator lock, or None if another holds it (wait=False)."""
    fd = os.open(root.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


class Coordinator:
    """The coordinator of one root (see the module doc)."""

    def __init__(self, root: Root, *, housekeeping_interval: float = 0.002,
                 idle_exit_ms: Optional[int] = None) -> None:
        self.root = root
        self.housekeeping_interval = housekeeping_interval
        self.idle_exit_ms = idle_exit_ms or None     # None/0: run until stopped
        self.active = False                          # holds the root's lock (a standby waits for it)
        self._last_client = time.monotonic()
        self.started = time.time()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._groups_wake = threading.Event()     # a group operation: supervise promptly
        self._txn_wake = threading.Event()        # a transaction began: watch its timeout
        self._replication_wake = threading.Event()  # a replicated topic appeared: supervise promptly
        # The Kafka listener this coordinator runs: the root's setting, or these (shmq serve --kafka).
        self.kafka_listen: Optional[str] = None
        self.kafka_advertise: Optional[str] = None
        self._kafka: Any = None
        self._clients: Dict[int, Dict[str, Any]] = {}
        self._tl = threading.local()
        self._next_conn = 0
        self._root_ino = os.stat(root.path).st_ino
        self.registry = LogRegistry()
        self._handlers: Dict[str, Callable[..., Any]] = {
            name[3:]: getattr(self, name) for name in dir(self) if name.startswith("op_")}
        # Each handler's signature, computed once (inspect.signature costs ~12 us a call).
        self._signatures = {op: inspect.signature(h) for op, h in self._handlers.items()}

    # ------------------------------------------------------------ lifecycle
    def run(self, *, standby: bool = False, on_ready: Optional[Callable[[], None]] = None) -> bool:
        """Become the active coordinator and serve until stopped; False if
        another one is active and ``standby`` is off."""
        lock_fd = acquire_lock(self.root, wait=standby)
        if lock_fd is None:
            log.info("another coordinator is active on %s (pid %s); exiting",
                     self.root.path, self.root.coordinator_pid())
            return False
        self.active = True
        try:
            self._write_pid()
            log.info("coordinator pid %d active on %s", os.getpid(), self.root.path)
            self.db = DurableStore.open(self.root)
            open_all_logs(self.root, self.db.store, self.registry)
            self.replication = ReplicationManager(self.root, self.db, self._publish_replication, lock=self._lock,
                                                  stop=self._stop)
            self.replication.open_logs()
            for name, t in self.db.store.topics.items():
                self._update_slowest(name, range(len(t["partitions"])))
            self.offsets = OffsetsTableSync(self.root, self.db)
            # After a takeover from a coordinator whose groups had members, give them a
            # moment to rejoin and claim their partitions before anything is handed out.
            self.groups = GroupManager(self._topic_partitions, self._set_owner, self._sync_offsets,
                                       rejoin_grace=1.0 if self.offsets.had_owners else 0.0)
            self.publisher = MetadataPublisher(self.root.metadata_map_path, self._payload())
            # Transactions a predecessor decided are completed before anyone is served.
            self.txns = TransactionCoordinator(self.root, self.db, self._leader_log,
                                               lambda group, items: self.op_commit_offsets(group, items),
                                               self._owner_generation)
            self.txns.recover()
            self.housekeeper = Housekeeper(self.registry, self.housekeeping_interval, idle_interval=HOUSEKEEP_IDLE_S)
            self.housekeeper.start()
            threading.Thread(target=self._offsets_loop, name="shmq-offsets", daemon=True).start()
            threading.Thread(target=self._groups_loop, name="shmq-groups", daemon=True).start()
            threading.Thread(target=self._replication_loop, name="shmq-replication", daemon=True).start()
            threading.Thread(target=self._txn_loop, name="shmq-txn", daemon=True).start()
            listener = self._listen()
            from ..kafka.supervisor import ListenerSupervisor
            self._kafka = ListenerSupervisor(self.root, self.kafka_listen, self.kafka_advertise).start()
            if on_ready is not None:
                on_ready()
            self._serve(listener)
        finally:
            if self._kafka is not None:
                self._kafka.stop()
            os.close(lock_fd)
        return True

    def stop(self) -> None:
        self._stop.set()
        self._groups_wake.set()
        self._txn_wake.set()
        self._replication_wake.set()

    def _write_pid(self) -> None:
        tmp = self.root.pid_path + ".tmp"
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {psutil.Process().create_time()!r}\n")
        os.rename(tmp, self.root.pid_path)

    def _listen(self) -> socket.socket:
        path = self.root.socket_path
        try:
            os.unlink(path)              # we hold the lock: its creator is dead
        except FileNotFoundError:
            pass
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        s.listen(128)
        s.settimeout(2 * IDLE_S)        # root removal and idle exit are checked this often
        return s

    def _serve(self, listener: socket.socket) -> None:
        try:
            while not self._stop.is_set():
                try:
                    conn, _ = listener.accept()
                except socket.timeout:
                    if not self._root_alive():
                        log.warning("root %s was removed; coordinator exits", self.root.path)
                        break
                    if self._idle_exit_due():
                        log.info("no client connected for %.1f s (idle_exit_ms=%d); coordinator exits, "
                                 "its data stays for the next one", self.idle_exit_ms / 1000, self.idle_exit_ms)
                        break
                    continue
                except OSError as e:          # e.g. EMFILE: keep serving the others
                    log.error("accept on %s failed: %s", self.root.socket_path, e)
                    time.sleep(0.05)
                    continue
                conn.settimeout(None)
                self._last_client = time.monotonic()
                threading.Thread(target=self._connection, args=(conn,), daemon=True,
                                 name="shmq-conn").start()
        finally:
            self._stop.set()
            log.info("coordinator pid %d stopping", os.getpid())
            self.housekeeper.stop()
            listener.close()
            try:
                if os.stat(self.root.socket_path).st_ino == os.fstat(listener.fileno()).st_ino:
                    os.unlink(self.root.socket_path)
            except OSError:
                pass
            self.housekeeper.join(timeout=1)
            self.replication.stop_processes()
            with self._lock:
                self._sync_offsets()
                self.offsets.close()
                self.db.close()
                self.publisher.close()
                self.registry.close_all()
                self.replication.close()
                self.txns.close()

    def _idle_exit_due(self) -> bool:
        """True once no client (replica processes do not count) has been
        connected for ``idle_exit_ms``."""
        if not self.idle_exit_ms:
            return False
        now = time.monotonic()
        with self._lock:
            replicas = self.replication.replica_cids()
            if any(cid not in replicas for cid in self._clients):
                self._last_client = now
        return now - self._last_client >= self.idle_exit_ms / 1000

    def _offsets_loop(self, interval: float = 0.01, idle: float = IDLE_S) -> None:
        """Journal hot-path commits from the offsets table every ``interval``
        seconds while they come in, backing off to ``idle`` while none do."""
        backoff = Backoff(interval, idle)
        pause = interval
        while not self._stop.wait(pause):
            with self._lock:
                if self._stop.is_set():
                    break
                changed = self._sync_offsets()
            pause = backoff.next(changed > 0)

    def _replication_loop(self, idle: Optional[float] = None) -> None:
        """Replica supervision, ISR and elections (``ReplicationManager.tick``),
        every ``TICK`` while anything is unsettled or moving, else backing off to
        the idle pace: half the shortest ``replica_lag_time_max_ms`` (Kafka's ISR
        check period), within [IDLE_S, EMPTY_S]. Events wake it at once: a
        replicated topic created, a leader or ISR change (``_publish_replication``),
        stop. A replica process's death is handled by its lifeline watcher."""
        from .replication import TICK
        backoff = Backoff(TICK, IDLE_S if idle is None else idle)
        pause, slowest_at = TICK, 0.0
        while True:
            self._replication_wake.wait(pause)
            self._replication_wake.clear()
            if self._stop.is_set():
                break
            busy = False
            with self._lock:
                if self._stop.is_set():
                    break
                try:
                    busy = self.replication.tick()
                    now = time.monotonic()
                    if now - slowest_at >= 0.1:   # a new leader of a block-mode topic learns what groups committed
                        slowest_at = now
                        for name, t in self.db.store.topics.items():
                            if is_replicated(t) and t["config"]["overflow"] == "block":
                                self._update_slowest(name, range(len(t["partitions"])))
                except Exception:
                    log.exception("replication supervision failed")
                    busy = True
                empty = not self.replication.replicas and not self.replication.replicated_partitions()
                if idle is None:
                    backoff.idle = self._isr_check_pace()
            pause = EMPTY_S if empty else backoff.next(busy)

    def _isr_check_pace(self) -> float:
        """Seconds between idle ISR checks: half the shortest replica_lag_time_max_ms
        of a replicated topic, within [IDLE_S, EMPTY_S]. (Followers of an idle
        leader report "caught up" every lag/4, see shmq.replica.partition.)"""
        lags = [int(t["config"].get("replica_lag_time_max_ms") or 10_000)
                for t in self.db.store.topics.values() if is_replicated(t)]
        return max(IDLE_S, min(EMPTY_S, min(lags, default=10_000) / 2000))

    def _groups_loop(self, interval: float = 0.02, pid_every: int = 5, idle: float = IDLE_S) -> None:
        """Group supervision: heartbeats, stuck revocations, process liveness
        (psutil); every ``interval`` s while a group has members (or a join
        woke it), backing off to ``idle`` while none has."""
        backoff = Backoff(interval, idle)
        pause, n = interval, 0
        while True:
            self._groups_wake.wait(pause)
            self._groups_wake.clear()
            if self._stop.is_set():
                break
            n += 1
            with self._lock:
                if self._stop.is_set():
                    break
                try:
                    self.groups.tick(check_pids=n % pid_every == 0)
                except Exception:
                    log.exception("group supervision failed")
                pushes = self.groups.take_pushes()
                busy = self.groups.supervising()
            self._send_pushes(pushes)
            pause = backoff.next(True) if busy else EMPTY_S     # a join wakes it

    def _txn_loop(self, interval: float = 0.1, idle: float = EMPTY_S) -> None:
        """Transaction timeouts (``transaction_timeout_ms``) and retried
        completions: every ``interval`` while a transaction is open, else
        asleep until one begins (``_txn_wake``: adding partitions or offsets
        wakes it) or ``idle`` passes (``EMPTY_S``)."""
        pause = interval
        while not self._stop.is_set():
            self._txn_wake.wait(pause)
            self._txn_wake.clear()
            with self._lock:
                if self._stop.is_set():
                    break
                try:
                    pause = interval if self.txns.tick() else idle
                except Exception:
                    log.exception("transaction supervision failed")

    def _owner_generation(self, group: str, topic: str, partition: int) -> int:
        """The generation in which a member of ``group`` owns the partition (0: none)."""
        return self.offsets.table.generation(self.offsets.index(group, topic, partition))

    def _send_pushes(self, pushes: List[Any]) -> None:
        for cid, frame in pushes:
            c = self._clients.get(cid)
            if c is None or "sock" not in c:
                continue
            try:
                with c["send_lock"]:
                    send_frame(c["sock"], {"id": None, "ok": True, **frame})
            except OSError as e:
                log.debug("push to connection %d failed: %s", cid, e)

    def _topic_partitions(self) -> Dict[str, int]:
        return {name: len(t["partitions"]) for name, t in self.db.store.topics.items()}

    def _set_owner(self, group: str, topic: str, partition: int, generation: int) -> None:
        try:
            self.offsets.set_owner_generation(group, topic, partition, generation)
        except UnknownTopicOrPartition:
            pass                            # the topic was deleted meanwhile

    def _sync_offsets(self) -> int:
        try:
            changed = self.offsets.sync()
        except Exception:
            log.exception("journaling committed offsets from the offsets table failed")
            return 0
        for topic in {t for t, _ in changed}:
            self._update_slowest(topic, sorted({p for t, p in changed if t == topic}))
        return len(changed)

    def _root_alive(self) -> bool:
        try:
            return os.stat(self.root.path).st_ino == self._root_ino
        except OSError:
            return False

    # ----------------------------------------------------------- connections
    def _connection(self, conn: socket.socket) -> None:
        pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
        if uid != os.geteuid():
            log.warning("refused a connection from pid %d uid %d (only uid %d may connect)", pid, uid,
                        os.geteuid())
            try:
                send_frame(conn, {"id": 0, **error_to_wire(ClusterAuthorizationFailed(
                    f"the shmq coordinator of {self.root.path} refuses uid {uid}: only its owner "
                    f"(uid {os.geteuid()}) may connect"))})
                # Half-close and drain what the peer sent, so that closing does not
                # reset the connection before the peer has read the refusal.
                conn.shutdown(socket.SHUT_WR)
                conn.settimeout(1.0)
                drained = 0
                while drained < (1 << 20):
                    chunk = conn.recv(65536)
                    if not chunk:
                        break
                    drained += len(chunk)
            except OSError:
                pass
            conn.close()
            return
        with self._lock:
            self._next_conn += 1
            cid = self._next_conn
            send_lock = threading.Lock()
            self._clients[cid] = {"pid": pid, "uid": uid, "connected": time.time(), "sock": conn,
                                  "send_lock": send_lock}
        self._tl.cid, self._tl.pid = cid, pid
        try:
            while True:
                req = recv_frame(conn)
                if req is None:
                    break
                resp = {"id": req.get("id"), **self._dispatch(req)}
                with send_lock:
                    send_frame(conn, resp)
                pushes = self._tl.__dict__.pop("pushes", None)
                if pushes:
                    self._send_pushes(pushes)
        except (OSError, ConnectionError, ValueError) as e:
            log.debug("connection of pid %d closed: %s", pid, e)
        finally:
            with self._lock:
                self._clients.pop(cid, None)
                pushes = []
                if not self._stop.is_set() and hasattr(self, "replication"):
                    try:
                        self.replication.connection_closed(cid)
                    except Exception:
                        log.exception("handling the death of a replica process on connection %d failed", cid)
                if not self._stop.is_set() and hasattr(self, "groups"):
                    try:
                        self.groups.connection_closed(cid)
                    except Exception:
                        log.exception("removing the group members of connection %d failed", cid)
                    pushes = self.groups.take_pushes()
            conn.close()
            self._send_pushes(pushes)

    def _dispatch(self, req: Dict[str, Any]) -> Dict[str, Any]:
        op, args = req.get("op"), req.get("args") or {}
        handler = self._handlers.get(op) if isinstance(op, str) else None
        try:
            if handler is None:
                raise InvalidRequest(f"unknown coordinator operation {op!r}")
            if not isinstance(args, dict):
                raise InvalidRequest(f"arguments of {op} must be an object")
            try:
                self._signatures[op].bind(**args)
            except TypeError as e:
                raise InvalidRequest(f"bad arguments for {op}: {e}") from None
            with self._lock:
                result = handler(**args)
                if hasattr(self, "groups"):
                    pushes = self.groups.take_pushes()
                    if pushes:
                        self._tl.pushes = pushes     # sent after the response
                return {"ok": True, "result": result}
        except ShmqError as e:
            return error_to_wire(e)
        except Exception as e:
            log.exception("internal error serving %s", op)
            return error_to_wire(ShmqError(f"coordinator internal error in {op}: {type(e).__name__}: {e}"))

    # ------------------------------------------------------------ partitions
    def _update_slowest(self, topic: str, partitions: Any) -> None:
        """Block-mode logs: producers may overwrite only what every group committed past."""
        t = self.db.store.topics.get(topic)
        if t is None or t["config"]["overflow"] != "block":
            return
        for p in partitions:
            low = self.db.store.committed_min(topic, p)
            plog = self._leader_log(topic, p)      # replicated: the current leader's log
            if plog is not None:                   # no group committed: no group holds the ring
                plog.set_slowest_position(NO_FLOOR if low is None else low)

    def _payload(self) -> Dict[str, Any]:
        topics = {}
        for name, t in self.db.store.topics.items():
            n = len(t["partitions"])
            topics[name] = {"topic_id": t["topic_id"], "partitions": n, "config": t["config"],
                            "paths": [self.root.partition_dir(name, p) for p in range(n)]}
            if is_replicated(t):
                topics[name].update(self.replication.payload_fields(name, t))
        return {"topics": topics, "coordinator_pid": os.getpid()}

    def _leader_log(self, topic: str, partition: int) -> Any:
        """The log clients read for ``topic``-``partition`` (None if it has no leader)."""
        t = self.db.store.topics.get(topic)
        if t is None or not is_replicated(t):
            return self.registry.get(topic, partition)
        leader = t["partitions"][partition]["leader"]
        return self.replication.log(topic, partition, leader) if leader >= 0 else None

    def _publish(self) -> None:
        self.publisher.publish(self._payload())

    def _publish_replication(self) -> None:
        """A leader or ISR change: publish it, and supervise again at once (a new
        leader of a block-mode topic learns what groups committed, whatever the idle pace)."""
        self._publish()
        self._replication_wake.set()

    # ----------------------------------------------------------- operations
    def op_ping(self) -> Dict[str, Any]:
        return {"pid": os.getpid(), "started": self.started}

    def op_create_topic(self, name: str, partitions: int = 1, config: Optional[Dict[str, Any]] = None
                        ) -> Dict[str, Any]:
        rec = self.db.store.prepare_create_topic(name, partitions, config)
        replicated = rec["config"]["replication_factor"] > 1
        if replicated:
            self.replication.create_logs(name, 0, rec["config"], rec["assignment"], rec["topic_id"])
        else:
            create_logs(self.root, self.registry, name, 0, partitions, rec["config"])
            self.housekeeper.wake()
        try:
            self.db.commit([rec])
        except BaseException:
            if replicated:
                self.replication.remove_logs(name, partitions, rec["assignment"], rec["config"])
            else:
                remove_logs(self.root, self.registry, name, range(partitions))
            raise
        self._publish()
        if replicated:
            self.replication.ensure_processes()
            self._replication_wake.set()
        self.groups.topics_changed()
        log.info("created topic %s with %d partitions", name, partitions)
        return self.op_describe_topic(name)

    def op_delete_topic(self, name: str) -> None:
        rec = self.db.store.prepare_delete_topic(name)
        t = self.db.store.topics[name]
        n = len(t["partitions"])
        replicated = is_replicated(t)
        replicas, config = [pm["replicas"] for pm in t["partitions"]], t["config"]
        slots = dict(self.db.store.offset_slots)
        self.db.commit([rec])
        self.offsets.release_topic(slots, name)
        self.txns.topic_deleted(name, n)
        self._publish()
        self.groups.topics_changed()
        if replicated:
            self.replication.remove_logs(name, n, replicas, config)
        else:
            remove_logs(self.root, self.registry, name, range(n))
        log.info("deleted topic %s", name)

    def op_list_topics(self) -> List[str]:
        return sorted(self.db.store.topics)

    def op_describe_topic(self, name: str) -> Dict[str, Any]:
        t = self.db.store.topic(name)
        parts = []
        for p, meta in enumerate(t["partitions"]):
            plog = self._leader_log(name, p)
            entry = {"partition": p, "leader": meta["leader"], "leader_epoch": meta["leader_epoch"],
                     "replicas": meta["replicas"], "isr": meta["isr"],
                     "start_offset": plog.start_offset if plog else -1,
                     "end_offset": plog.end_offset if plog else -1,
                     "path": plog.path if plog else None}
            if is_replicated(t):
                entry.update(high_watermark=plog.high_watermark if plog else -1,
                             partition_epoch=meta.get("partition_epoch", 0),
                             offline=[r for r in meta["replicas"] if (name, p, r) in self.replication.offline],
                             unclean=meta.get("unclean"))
            parts.append(entry)
        return {"name": name, "topic_id": t["topic_id"], "config": t["config"], "partitions": parts}

    def op_create_partitions(self, name: str, total: int) -> Dict[str, Any]:
        rec = self.db.store.prepare_create_partitions(name, total)
        t = self.db.store.topics[name]
        have = len(t["partitions"])
        if is_replicated(t):
            self.replication.create_logs(name, have, t["config"], rec["assignment"], t["topic_id"])
        else:
            create_logs(self.root, self.registry, name, have, total, t["config"])
            self.housekeeper.wake()
        try:
            self.db.commit([rec])
        except BaseException:
            if not is_replicated(t):
                remove_logs(self.root, self.registry, name, range(have, total))
            raise
        self._publish()
        if is_replicated(t):
            self.replication.ensure_processes()
            self._replication_wake.set()
        self.groups.topics_changed()
        log.info("topic %s now has %d partitions", name, total)
        return self.op_describe_topic(name)

    def op_alter_config(self, name: str, config: Dict[str, Any]) -> Dict[str, Any]:
        rec = self.db.store.prepare_alter_config(name, config)
        self.db.commit([rec])
        self._publish()
        return dict(self.db.store.topics[name]["config"])

    def op_commit_offsets(self, group: str, offsets: List[Any], monotonic: bool = False) -> List[Any]:
        self._sync_offsets()                  # hot-path commits first, so ordering holds
        rec, stored = self.db.store.prepare_commit_offsets(group, offsets, monotonic=bool(monotonic))
        if rec is not None:
            self.db.commit([rec])
            for topic, p, off, _meta in rec["offsets"]:
                self.offsets.write_through(group, topic, p, off)
            for topic in {o[0] for o in rec["offsets"]}:
                self._update_slowest(topic, sorted({o[1] for o in rec["offsets"] if o[0] == topic}))
        return [list(s) for s in stored]

    def op_fetch_offsets(self, group: str, partitions: Optional[List[Any]] = None) -> List[Any]:
        if partitions is not None:
            if not isinstance(partitions, list) or not all(
                    isinstance(tp, (list, tuple)) and len(tp) == 2 for tp in partitions):
                raise InvalidRequest("partitions must be a list of [topic, partition]")
            partitions = [(tp[0], tp[1]) for tp in partitions]
        self._sync_offsets()
        return [list(o) for o in self.db.store.fetch_offsets(group, partitions)]

    def op_offsets_slot(self, group: str, topic: str, partition: int) -> Dict[str, Any]:
        """The offsets-table entry through which ``group`` commits ``topic``-``partition``."""
        index, offset = self.offsets.slot(group, topic, partition)
        return {"index": index, "offset": offset, "path": self.root.offsets_table_path}

    def op_sync_offsets(self) -> Dict[str, int]:
        """Journal (fsync) every offset stored in the table so far; then it is durable."""
        return {"changed": self._sync_offsets()}

    def op_allocate_producer_id(self, transactional_id: Optional[str] = None) -> Dict[str, int]:
        rec = self.db.store.prepare_allocate_producer_id(transactional_id)
        self.db.commit([rec])
        return {"producer_id": rec["producer_id"], "epoch": rec["epoch"]}

    # ---------------------------------------------------------- transactions
    def op_init_producer_id(self, transactional_id: str, transaction_timeout_ms: int = 60_000) -> Dict[str, Any]:
        """A transactional producer's id and new epoch; the previous instance's
        open transaction is aborted and that instance fenced."""
        pid, epoch = self.txns.init_producer_id(transactional_id, transaction_timeout_ms)
        return {"producer_id": pid, "epoch": epoch, "registered": self.txns.registered(transactional_id)}

    def op_add_partitions_to_txn(self, transactional_id: str, producer_id: int, producer_epoch: int,
                                 partitions: List[Any]) -> None:
        self.txns.add_partitions(transactional_id, producer_id, producer_epoch, partitions)
        self._txn_wake.set()

    def op_add_offsets_to_txn(self, transactional_id: str, producer_id: int, producer_epoch: int,
                              group_id: str) -> None:
        self.txns.add_offsets(transactional_id, producer_id, producer_epoch, group_id)
        self._txn_wake.set()

    def op_txn_offset_commit(self, transactional_id: str, producer_id: int, producer_epoch: int, group_id: str,
                             offsets: List[Any], generations: Optional[Dict[str, int]] = None) -> None:
        self.txns.txn_offset_commit(transactional_id, producer_id, producer_epoch, group_id, offsets, generations)
        self._txn_wake.set()

    def op_end_txn(self, transactional_id: str, producer_id: int, producer_epoch: int, commit: bool) -> None:
        self.txns.end_txn(transactional_id, producer_id, producer_epoch, commit)

    def op_describe_transactions(self) -> List[Dict[str, Any]]:
        return self.txns.describe()

    # ------------------------------------------------------- consumer groups
    def op_join_group(self, group: str, topics: Optional[List[str]] = None, pattern: Optional[str] = None,
                      member_id: Optional[str] = None, client_id: Optional[str] = None,
                      pid: Optional[int] = None, create_time: Optional[float] = None,
                      host: Optional[str] = None, group_instance_id: Optional[str] = None,
                      session_timeout_ms: int = 10000, max_poll_interval_ms: int = 300000,
                      assignor: str = "sticky", owned: Optional[List[Any]] = None) -> Dict[str, Any]:
        """Join ``group`` on this connection (the member's lifeline); returns its state.
        ``owned``: partitions a rejoining member still consumes (kept if nobody owns them)."""
        for name, v in (("session_timeout_ms", session_timeout_ms), ("max_poll_interval_ms", max_poll_interval_ms)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 3_600_000:
                raise InvalidRequest(f"{name}={v!r} must be an int in [1, 3600000]")
        if pid is not None and pid != self._tl.pid:
            raise InvalidRequest(f"join_group: pid {pid} is not the connecting process ({self._tl.pid})")
        args = dict(group=group, topics=topics, pattern=pattern, member_id=member_id, client_id=client_id,
                    create_time=create_time, host=host or socket.gethostname(),
                    group_instance_id=group_instance_id, session_timeout_ms=session_timeout_ms,
                    max_poll_interval_ms=max_poll_interval_ms, assignor=assignor, owned=owned)
        self._groups_wake.set()
        return self.groups.join(self._tl.cid, self._tl.pid, args)

    def op_heartbeat(self, group: str, member_id: str) -> Dict[str, Any]:
        return self.groups.heartbeat(self._tl.cid, group, member_id)

    def op_group_revoked(self, group: str, member_id: str, partitions: List[Any]) -> Dict[str, Any]:
        """The member committed and stopped consuming ``partitions`` it was asked to give up."""
        if not isinstance(partitions, list) or not all(
                isinstance(tp, (list, tuple)) and len(tp) == 2 for tp in partitions):
            raise InvalidRequest("partitions must be a list of [topic, partition]")
        return self.groups.revoked(self._tl.cid, group, member_id, partitions)

    def op_leave_group(self, group: str, member_id: str) -> None:
        self.groups.leave(self._tl.cid, group, member_id)

    def op_list_groups(self) -> List[Dict[str, Any]]:
        active = {g["group"]: g for g in self.groups.list()}
        for name in self.db.store.offsets:
            active.setdefault(name, {"group": name, "state": "Empty", "members": 0, "assignor": None,
                                     "generation": None})
        return [active[n] for n in sorted(active)]

    def op_describe_group(self, group: str) -> Dict[str, Any]:
        validate_group(group)
        self._sync_offsets()
        d = self.groups.describe(group)
        committed = {(t, p): off for t, p, off, _m in self.db.store.fetch_offsets(group)}
        if not d["members"] and not committed and group not in self.groups.groups:
            d["state"] = "Dead"
        owners = {}
        for m in d["members"]:
            for t, p in m["assignment"]:
                owners[(t, p)] = m
        parts = []
        for t, p in sorted(set(committed) | set(owners)):
            plog = self._leader_log(t, p) if t in self.db.store.topics else None
            end = plog.end_offset if plog is not None else -1
            cur = committed.get((t, p))
            m = owners.get((t, p))
            # The owner's live position, from the partition's reader table.
            pos = next((r.position for r in plog.readers() if r.pid == m["pid"] and r.label == group),
                       None) if plog is not None and m else None
            parts.append({"topic": t, "partition": p, "committed": cur, "log_end": end,
                          "lag": (end - cur) if cur is not None and end >= 0 else None, "position": pos,
                          "member_id": m["member_id"] if m else None,
                          "client_id": m["client_id"] if m else None, "pid": m["pid"] if m else None,
                          "host": m["host"] if m else None})
        d["partitions"] = parts
        return d

    def op_delete_group(self, group: str) -> None:
        """Delete an empty group's committed offsets (Kafka: only when it has no members)."""
        validate_group(group)
        if self.groups.active(group):
            raise InvalidRequest(f"group {group!r} is not empty: it has active members")
        self._sync_offsets()
        if group not in self.db.store.offsets and not any(
                k.split("/")[0] == group for k in self.db.store.offset_slots) and group not in self.groups.groups:
            raise InvalidRequest(f"group {group!r} does not exist")
        slots = dict(self.db.store.offset_slots)
        held = list(self.db.store.offsets.get(group, {}))
        self.db.commit([self.db.store.prepare_delete_group(group)])
        self.offsets.release_group(group, slots)
        self.groups.forget(group)
        for topic in held:                     # its committed offsets no longer hold block-mode rings
            t = self.db.store.topics.get(topic)
            if t is not None:
                self._update_slowest(topic, range(len(t["partitions"])))
        log.info("deleted group %s", group)

    def op_reset_offsets(self, group: str, to: str, topics: Optional[List[str]] = None,
                         partitions: Optional[List[Any]] = None, value: Optional[int] = None,
                         dry_run: bool = False) -> List[Any]:
        """Set an empty group's committed offsets of ``topics`` (or of ``partitions``
        [[topic, p]], default: every partition it committed) to ``to``:
        earliest, latest, offset (``value``), timestamp (``value`` in ms)."""
        from ..ringlog import LogReader
        validate_group(group)
        if self.groups.active(group):
            raise InvalidRequest(f"group {group!r} has active members: reset offsets only of an empty group")
        if to not in ("earliest", "latest", "offset", "timestamp"):
            raise InvalidRequest(f"reset to {to!r}: one of earliest, latest, offset, timestamp")
        if to in ("offset", "timestamp") and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise InvalidRequest(f"reset to {to} needs a non-negative int value, got {value!r}")
        self._sync_offsets()
        if partitions is not None:
            tps = [(str(t), int(p)) for t, p in partitions]
        elif topics is not None:
            tps = [(t, p) for t in topics for p in range(len(self.db.store.topic(t)["partitions"]))]
        else:
            tps = [(t, p) for t, p, _o, _m in self.db.store.fetch_offsets(group)]
        out = []
        for t, p in tps:
            self.db.store.check_partition(t, p)
            plog = self._leader_log(t, p)
            if plog is None:
                raise UnknownTopicOrPartition(f"partition {t}-{p} has no log", topic=t, partition=p)
            lo, hi = plog.start_offset, plog.end_offset
            if to == "earliest":
                off = lo
            elif to == "latest":
                off = hi
            elif to == "offset":
                off = min(max(int(value), lo), hi)  # type: ignore[arg-type]
            else:
                reader = LogReader(plog, lo, buffer_bytes=plog.max_frame_bytes, max_records=256, tether=False)
                off = reader.seek_to_time(int(value))  # type: ignore[arg-type]
                while off < hi:                   # the time index is sparse: scan to the record
                    recs = reader.read(256)
                    if not recs:
                        break
                    hit = next((r for r in recs if r.timestamp_ms >= value), None)  # type: ignore[operator]
                    if hit is not None:
                        off = hit.offset
                        break
                    off = recs[-1].offset + 1
            out.append([t, p, off])
        if not dry_run and out:
            self.op_commit_offsets(group, out)
        return out

    # ---------------------------------------------------------- replication
    def op_replica_register(self, replica_id: int) -> Dict[str, Any]:
        """A replica process registers; this connection is its lifeline."""
        return self.replication.register(self._tl.cid, self._tl.pid, replica_id)

    def op_replica_storage_failed(self, topic: str, partition: int, replica_id: int, why: str = "") -> None:
        """A replica's log (its own, or a leader's it read) is gone or corrupt."""
        self.replication.storage_failed(topic, partition, replica_id, str(why)[:500])

    def op_replica_storage_recovered(self, topic: str, partition: int, replica_id: int) -> None:
        """A replica recreated its log after a storage failure."""
        self.replication.storage_recovered(topic, partition, replica_id)

    def op_recover_topics(self, directory: str) -> List[Dict[str, Any]]:
        """Recreate the topics whose replica logs live in ``directory`` (a
        replica's ``replica_dirs`` entry on disk) after the root was lost: that
        replica leads each partition in a new leader epoch, the other replicas
        start empty and catch up. Topics that exist already are left alone."""
        from .replication import read_partition_meta
        if not isinstance(directory, str) or not os.path.isdir(directory):
            raise InvalidRequest(f"recover_topics: {directory!r} is not a directory")
        found: Dict[str, Dict[int, Dict[str, Any]]] = {}
        for entry in sorted(os.listdir(directory)):
            meta = read_partition_meta(os.path.join(directory, entry))
            if meta is not None and f"{meta['topic']}-{meta['partition']}" == entry:
                found.setdefault(meta["topic"], {})[int(meta["partition"])] = meta
        out = []
        for name, parts in sorted(found.items()):
            if name in self.db.store.topics:
                out.append({"topic": name, "recovered": False, "why": "exists"})
                continue
            n = max(parts) + 1
            missing = [p for p in range(n) if p not in parts]
            if missing:
                raise InvalidRequest(f"recover_topics: {directory} lacks partition(s) {missing} of topic {name!r}")
            rid = parts[0]["replica"]
            config = dict(parts[0]["config"])
            config["replica_dirs"] = {**(config.get("replica_dirs") or {}), str(rid): directory}
            rec = self.db.store.prepare_create_topic(name, n, config, topic_id=parts[0].get("topic_id"),
                                                     assignment=[parts[p]["replicas"] for p in range(n)])
            self.replication.create_logs(name, 0, rec["config"], rec["assignment"], rec["topic_id"], keep=rid)
            self.db.commit([rec])
            ends = []
            for p in range(n):
                from ..replica.epoch_cache import LeaderEpochCache
                path = os.path.join(directory, f"{name}-{p}")
                epoch = LeaderEpochCache(path, fsync=False).latest_epoch
                self.replication.set_state(name, p, rid, [rid], True, f"recovered from {directory}",
                                           min_epoch=epoch + 1)
                plog = self.replication.log(name, p, rid)
                ends.append(plog.end_offset if plog is not None else -1)
            self.groups.topics_changed()
            self.replication.ensure_processes()
            self._replication_wake.set()
            log.info("recovered topic %s (%d partitions) from replica %d's logs in %s", name, n, rid, directory)
            out.append({"topic": name, "recovered": True, "partitions": n, "leader": rid, "end_offsets": ends})
        return out

    def op_elect_leaders(self, topic: str, partition: Optional[int] = None) -> List[Dict[str, Any]]:
        """Preferred-leader election now (Kafka's kafka-leader-election --election-type preferred)."""
        t = self.db.store.topic(topic)
        out = []
        for p, pm in enumerate(t["partitions"]):
            if partition is not None and p != partition:
                continue
            pref = pm["replicas"][0]
            if is_replicated(t) and pm["leader"] != pref and pref in pm["isr"] and self.replication._usable(topic, p, pref):
                self.replication.elect(topic, p, "preferred-leader election requested", preferred=pref)
            out.append({"partition": p, "leader": self.db.store.topics[topic]["partitions"][p]["leader"]})
        return out

    def op_status(self) -> Dict[str, Any]:
        now = time.time()
        j = self.db.journal
        return {"pid": os.getpid(), "root": self.root.path, "started": self.started,
                "uptime_s": now - self.started,
                "clients": [{"pid": c["pid"], "uid": c["uid"], "connected_s": now - c["connected"]}
                            for c in self._clients.values()],
                "topics": len(self.db.store.topics), "groups": len(self.db.store.offsets),
                "partitions": len(self.registry),
                "replicas": {str(h.rid): {"pid": h.pid, "registered": h.registered, "start_error": h.start_error}
                             for h in self.replication.replicas.values()},
                "failovers": self.replication.failovers[-100:],
                "housekeeping": {"ticks": self.housekeeper.ticks,
                                 "failing": [f"{t}-{p}" for t, p in sorted(self.registry.failing)]},
                "transactions": self.txns.describe(),
                "journal": {"base_seq": j.base_seq, "next_seq": j.next_seq, "bytes": j.size}}


def install_signal_handlers(coord: Coordinator) -> None:
    """SIGTERM/SIGINT stop the coordinator cleanly (main thread only); a
    standby still waiting for the lock just exits."""
    def handler(signum: int, frame: Any) -> None:
        if not coord.active:
            raise SystemExit(0)
        coord.stop()
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
