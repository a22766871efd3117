"""Replication control on the coordinator: replica processes, leaders, ISR, elections.

This is Kafka's controller for one host. Theory of operation:

* A topic with ``replication_factor`` > 1 has one partition log per replica,
  each in its replica process's directory (``<root>/data/<id>/`` or the
  topic's ``replica_dirs``). The coordinator creates every replica's files
  when the topic is created (so a full filesystem fails the creation) and
  keeps them all mapped, to write the control-block words it owns (see
  ``shmq/native/log.h``): ``replicated``, ``leader_index``, ``isr_mask``,
  ``leader_epoch`` of a new leader (before its process opens it), and
  ``append_state = NOT_LEADER`` of a deposed leader (the fence).
* Replica processes (``shmq.replica``) register on a connection that is their
  lifeline, and hold a robust mutex (``shmq.lifeline``) that a watcher thread
  waits on: the kernel releases it the moment the process dies (before its
  memory is torn down, which delays the socket's EOF by up to hundreds of
  ms for big logs); the EOF is the fallback. A dead replica
  leaves every ISR immediately (the high watermark then moves on without it);
  each partition it led elects a new leader from the ISR; the process is
  restarted. A replica that is not registered is alive if it holds its flock
  (``<root>/replica-<id>.lock``), which covers a coordinator restart.
* Every ``TICK`` seconds (``tick``): ISR shrink (a follower not caught up
  for ``replica_lag_time_max_ms``), ISR expansion (a live follower whose
  published log end reached the high watermark in the current leader
  epoch), elections for leaderless partitions, and preferred-leader election
  once the preferred replica has been in sync for ``PREFERRED_AFTER`` s.
* A replica whose storage failed (its files vanished, or a follower read a
  corrupt frame from it as leader) is ``offline`` for that partition: it is
  taken out as if dead, and its process recreates the log and reports it
  recovered, then catches up like any follower.
* Every change is one ``partition_state`` journal record (fsynced), then the
  control words, then a metadata publish; clients switch on the new version.

Election: clean, a live ISR member (preferred order); if none and
``unclean_leader_election``, the live replica with the longest log, and the
number of records the others will drop is recorded (``unclean.dropped``);
else the partition stays leaderless (leader -1) with its ISR kept, so the
last in-sync replica leads again when it returns.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import ShmqError
from ..lifeline import DEAD, FREE, Lifeline
from ..ringlog.log import ctl_inode
from ..ringlog import PartitionLog
from ..root import Root
from ..spawn import CHILD_CWD, child_env, log_tail, python_argv
from .durable import DurableStore
from .topic_config import log_config

__all__ = ["ReplicationManager", "replica_path", "NOT_LEADER", "read_partition_meta", "write_partition_meta"]

log = logging.getLogger("shmq.coordinator.replication")

NOT_LEADER = 2          # SHMQ_APPEND_NOT_LEADER
OPEN = 0                # SHMQ_APPEND_OPEN
TICK = 0.01
PREFERRED_AFTER = 1.0   # seconds the preferred replica must stay in sync before it leads again
RESPAWN_BACKOFF = 0.5
STARTUP_S = 10.0        # a replica process that has not registered by then is started again

Key = Tuple[str, int]


def replica_path(root: Root, topic: str, partition: int, replica: int, config: Dict[str, Any]) -> str:
    """Directory of replica ``replica``'s log of ``topic``-``partition``."""
    dirs = config.get("replica_dirs") or {}
    base = dirs.get(str(replica))
    if base:
        root.partition_dir(topic, partition)          # validates the names
        return os.path.join(base, f"{topic}-{partition}")
    return root.partition_dir(topic, partition, str(replica))


def is_replicated(t: Dict[str, Any]) -> bool:
    return int(t["config"].get("replication_factor", 1)) > 1


def _mask(replicas: List[int], members: List[int]) -> int:
    return sum(1 << i for i, r in enumerate(replicas) if r in members)


class ReplicaHandle:
    """What the coordinator knows of one replica process."""

    __slots__ = ("rid", "cid", "pid", "proc", "spawned", "registered", "start_error")

    def __init__(self, rid: int) -> None:
        self.rid = rid
        self.cid: Optional[int] = None
        self.pid: Optional[int] = None
        self.proc: Optional[subprocess.Popen] = None     # type: ignore[type-arg]
        self.spawned = -1e9
        self.registered = False
        self.start_error: Optional[str] = None     # why its last start failed (the end of its log)


class ReplicationManager:
    """Replica processes and partition leadership (the server holds its lock around every call)."""

    def __init__(self, root: Root, db: DurableStore, publish: Callable[[], None], *, spawn: bool = True,
                 lock: Optional[Any] = None, stop: Optional[threading.Event] = None) -> None:
        self.root = root
        self._server_lock = lock if lock is not None else threading.Lock()
        self._stop = stop if stop is not None else threading.Event()
        self._watchers: Set[int] = set()
        self.db = db
        self._publish = publish
        self.spawn = spawn
        self.logs: Dict[Tuple[str, int, int], PartitionLog] = {}
        self._inodes: Dict[Tuple[str, int, int], int] = {}
        self.replicas: Dict[int, ReplicaHandle] = {}
        self.offline: Set[Tuple[str, int, int]] = set()
        self._baseline: Dict[Tuple[str, int, int], int] = {}     # ns: lag is measured from here
        self._preferred_since: Dict[Key, float] = {}
        self.failovers: List[Dict[str, Any]] = []
        self.last_end: Dict[Key, int] = {}            # leader's log end last seen, for unclean reports
        self._marks: Dict[Key, Tuple[int, int]] = {}  # (end offset, high watermark) per leader at the last tick
        self.started = time.monotonic()

    # ------------------------------------------------------------ placement
    def path(self, topic: str, partition: int, replica: int) -> str:
        return replica_path(self.root, topic, partition, replica, self.db.store.topics[topic]["config"])

    def replicated_partitions(self) -> List[Tuple[str, int, Dict[str, Any]]]:
        return [(name, p, pm) for name, t in self.db.store.topics.items() if is_replicated(t)
                for p, pm in enumerate(t["partitions"])]

    # ---------------------------------------------------------------- files
    def create_logs(self, name: str, first: int, config: Dict[str, Any], assignment: List[List[int]],
                    topic_id: str, keep: Optional[int] = None) -> None:
        """Create every replica's log of partitions ``first..`` (all or none);
        ``keep``: the replica whose existing logs are kept (a recovery)."""
        from ..ringlog.producer_state import ProducerStateTable
        lc = log_config(config)
        made: List[str] = []
        try:
            for i, replicas in enumerate(assignment):
                p = first + i
                for idx, r in enumerate(replicas):
                    path = replica_path(self.root, name, p, r, config)
                    if r == keep:
                        plog = PartitionLog(path, name=f"{name}-{p}")
                        plog.set_append_state(NOT_LEADER)
                        self.logs[(name, p, r)] = plog
                        self._inodes[(name, p, r)] = ctl_inode(path)
                        continue
                    shutil.rmtree(path, ignore_errors=True)     # an orphan of a crashed create
                    made.append(path)
                    self.root.makedirs(path)
                    plog = PartitionLog.create(path, lc, name=f"{name}-{p}")
                    ProducerStateTable.create(path).close()
                    write_partition_meta(path, {"topic": name, "partition": p, "topic_id": topic_id,
                                                "config": config, "replicas": replicas, "replica": r})
                    leader = idx == 0
                    plog.set_replication(True, 0, 0, (1 << len(replicas)) - 1, 0)
                    plog.set_append_state(NOT_LEADER)    # the leader's process opens it
                    self.logs[(name, p, r)] = plog
                    self._inodes[(name, p, r)] = ctl_inode(path)
                    if leader:
                        self._baseline_all(name, p, replicas)
        except BaseException:
            for path in made:
                shutil.rmtree(path, ignore_errors=True)
            for key in [k for k in self.logs if k[0] == name and k[1] >= first]:
                self.logs.pop(key).close()
            raise

    def open_logs(self) -> None:
        """Map every replica log of every replicated partition (missing ones are
        recreated by their replica process, which then reports them)."""
        for name, p, pm in self.replicated_partitions():
            for r in pm["replicas"]:
                self.log(name, p, r)
            self._baseline_all(name, p, pm["replicas"])

    def remove_logs(self, name: str, partitions: int, replicas: List[List[int]], config: Dict[str, Any]) -> None:
        for p in range(partitions):
            for r in replicas[p]:
                plog = self.logs.pop((name, p, r), None)
                if plog is not None:
                    plog.mark_deleted()
                    plog.close()
                self.offline.discard((name, p, r))
                shutil.rmtree(replica_path(self.root, name, p, r, config), ignore_errors=True)

    def log(self, topic: str, partition: int, replica: int) -> Optional[PartitionLog]:
        """Replica ``replica``'s log, reopened if its files were recreated; None if unusable."""
        key = (topic, partition, replica)
        path = self.path(topic, partition, replica)
        ino = ctl_inode(path)
        plog = self.logs.get(key)
        if plog is not None and ino == self._inodes.get(key):
            return plog
        if ino < 0:
            return None             # the stale mapping stays in self.logs: set_state fences through it
        if plog is not None:
            plog.close()
            self.logs.pop(key, None)
        try:
            plog = PartitionLog(path, name=f"{topic}-{partition}")
        except ShmqError as e:
            log.warning("replica %d's log of %s-%d at %s is unusable: %s", replica, topic, partition, path, e)
            return None
        self.logs[key] = plog
        self._inodes[key] = ino
        return plog

    def close(self) -> None:
        for plog in self.logs.values():
            plog.close()
        self.logs.clear()

    # -------------------------------------------------------------- payload
    def payload_fields(self, name: str, t: Dict[str, Any]) -> Dict[str, Any]:
        """Per-partition leadership for the published metadata."""
        parts = t["partitions"]
        paths = [self.path(name, p, pm["leader"]) if pm["leader"] >= 0 else None for p, pm in enumerate(parts)]
        return {"paths": paths,
                "leaders": [pm["leader"] for pm in parts],
                "leader_epochs": [pm["leader_epoch"] for pm in parts],
                "replicas": [pm["replicas"] for pm in parts],
                "isr": [pm["isr"] for pm in parts],
                "offline": [[r for r in pm["replicas"] if (name, p, r) in self.offline] for p, pm in enumerate(parts)],
                "replica_paths": [[self.path(name, p, r) for r in pm["replicas"]] for p, pm in enumerate(parts)]}

    # ------------------------------------------------------------ processes
    def needed(self) -> int:
        return self.db.store.replica_processes()

    def ensure_processes(self) -> None:
        """Start every replica process the topics need that is not running."""
        now = time.monotonic()
        for rid in range(self.needed()):
            h = self.replicas.setdefault(rid, ReplicaHandle(rid))
            if rid not in self._watchers:
                self._watchers.add(rid)
                Lifeline(self.root.replica_alive_path(rid), create=True)      # before the process opens it
                threading.Thread(target=self._watch, args=(rid,), name=f"shmq-lifeline-{rid}", daemon=True).start()
            if h.proc is not None and h.proc.poll() is not None:
                rc, h.proc = h.proc.returncode, None          # reaped
                if rc > 0 and rc != 3:                         # 3: another process holds its lock
                    path = self.root.replica_log_path(rid)
                    h.start_error = f"exit status {rc}; the last lines of {path}:\n{log_tail(path)}"
                    log.error("replica process %d failed: %s", rid, h.start_error)
            if h.registered or not self.spawn or now - h.spawned < RESPAWN_BACKOFF:
                continue
            if h.proc is not None and now - h.spawned < STARTUP_S:
                continue                          # our child is still starting (imports take a while)
            if self._lock_held(rid):
                continue                          # alive, not (yet) registered with us
            h.spawned = now
            try:
                with open(self.root.replica_log_path(rid), "ab") as out:
                    h.proc = subprocess.Popen(
                        python_argv("shmq.replica", "--root", self.root.path, "--id", str(rid)),
                        stdin=subprocess.DEVNULL, stdout=out, stderr=out, close_fds=True, cwd=CHILD_CWD,
                        env=child_env())
                log.info("started replica process %d (pid %d)", rid, h.proc.pid)
            except OSError as e:
                log.error("cannot start replica process %d: %s", rid, e)

    def replica_cids(self) -> Set[int]:
        """Connections of registered replica processes (they are not clients)."""
        return {h.cid for h in self.replicas.values() if h.registered and h.cid is not None}

    def stop_processes(self, timeout: float = 5.0) -> None:
        """A clean stop of the coordinator: SIGTERM every replica process it
        knows of and wait up to ``timeout`` s until each released its lock
        (call with ``stop`` set, so that none is restarted)."""
        pids: Dict[int, int] = {}
        for rid, h in self.replicas.items():
            if h.registered and h.pid:
                pids[rid] = h.pid
            elif h.proc is not None and h.proc.poll() is None:
                pids[rid] = h.proc.pid
        for pid in pids.values():
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + timeout
        while any(self._lock_held(rid) for rid in pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        for h in self.replicas.values():
            if h.proc is not None and h.proc.poll() is None:
                try:
                    h.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
        left = sorted(rid for rid in pids if self._lock_held(rid))
        if left:
            log.warning("replica process(es) %s did not stop within %.0f s", left, timeout)
        elif pids:
            log.info("stopped replica process(es) %s", sorted(pids))

    def _lock_held(self, rid: int) -> bool:
        from .client import lock_held
        return lock_held(self.root.replica_lock_path(rid))

    def _watch(self, rid: int) -> None:
        """Wait on replica ``rid``'s lifeline; its death is handled the moment it happens."""
        life = Lifeline(self.root.replica_alive_path(rid), create=True)
        while not self._stop.is_set():
            try:
                state = life.watch(2.0)           # a death wakes it at once; the timeout only re-checks stop
            except OSError as e:
                log.error("lifeline of replica %d: %s", rid, e)
                time.sleep(0.5)
                continue
            if state == FREE:
                time.sleep(0.05)                  # not running (yet): look again soon
            elif state == DEAD:
                with self._server_lock:
                    if not self._stop.is_set():
                        self._died(rid, "its lifeline was released")

    def _died(self, rid: int, how: str) -> None:
        h = self.replicas.get(rid)
        if h is None or not h.registered:
            return
        h.registered, h.cid = False, None
        log.warning("replica process %d (pid %s) died (%s)", rid, h.pid, how)
        self.replica_died(rid)
        self.ensure_processes()

    def _spawned(self, rid: int) -> float:
        h = self.replicas.get(rid)
        return h.spawned if h is not None else -1e9

    def alive(self, rid: int) -> bool:
        h = self.replicas.get(rid)
        if h is not None and h.registered:
            return True
        return self._lock_held(rid)

    def register(self, cid: int, pid: int, rid: int) -> Dict[str, Any]:
        from ..errors import InvalidRequest
        if not isinstance(rid, int) or isinstance(rid, bool) or not 0 <= rid < 64:
            raise InvalidRequest(f"replica id {rid!r} must be an int in [0, 64)")
        h = self.replicas.setdefault(rid, ReplicaHandle(rid))
        if h.registered and h.cid != cid:
            raise InvalidRequest(f"replica {rid} is already registered by pid {h.pid}")
        h.cid, h.pid, h.registered, h.start_error = cid, pid, True, None
        now = time.monotonic_ns()
        for name, p, pm in self.replicated_partitions():   # its lag counts from now, not from its start-up
            if rid in pm["replicas"]:
                self._baseline[(name, p, rid)] = now
        log.info("replica process %d registered (pid %d)", rid, pid)
        return {"replica_id": rid}

    def connection_closed(self, cid: int) -> None:
        for h in list(self.replicas.values()):
            if h.registered and h.cid == cid:
                self._died(h.rid, "its connection closed")

    # -------------------------------------------------------------- control
    def replica_died(self, rid: int) -> None:
        """Take ``rid`` out of every ISR and replace it where it led."""
        for name, p, pm in self.replicated_partitions():
            if rid not in pm["replicas"]:
                continue
            if pm["leader"] == rid:
                self.elect(name, p, f"leader replica {rid} died", exclude={rid})
            elif rid in pm["isr"]:
                self.set_state(name, p, pm["leader"], [r for r in pm["isr"] if r != rid], False,
                               f"replica {rid} died")

    def storage_failed(self, topic: str, partition: int, rid: int, why: str) -> None:
        t = self.db.store.topic(topic)
        pm = t["partitions"][self.db.store.check_partition(topic, partition)]
        if rid not in pm["replicas"] or (topic, partition, rid) in self.offline:
            return
        log.error("replica %d of %s-%d failed its storage: %s", rid, topic, partition, why)
        self.offline.add((topic, partition, rid))
        if pm["leader"] == rid:
            if not self.elect(topic, partition, f"storage of leader {rid} failed: {why}", exclude={rid}):
                # Its records are gone: it must never come back as an in-sync replica.
                self.set_state(topic, partition, -1, [r for r in pm["isr"] if r != rid], False,
                               f"storage of replica {rid} failed")
        elif rid in pm["isr"]:
            self.set_state(topic, partition, pm["leader"], [r for r in pm["isr"] if r != rid], False,
                           f"storage of replica {rid} failed")
        else:
            self._publish()

    def storage_recovered(self, topic: str, partition: int, rid: int) -> None:
        if (topic, partition, rid) in self.offline:
            self.offline.discard((topic, partition, rid))
            log.info("replica %d of %s-%d has a new log; it catches up", rid, topic, partition)
            self._publish()

    def _usable(self, topic: str, partition: int, rid: int) -> bool:
        return (topic, partition, rid) not in self.offline and self.alive(rid) \
            and self.log(topic, partition, rid) is not None

    def elect(self, topic: str, partition: int, reason: str, exclude: Set[int] = frozenset(),  # type: ignore[assignment]
              preferred: Optional[int] = None) -> bool:
        """Elect a leader for the partition; False if none could be."""
        t = self.db.store.topics[topic]
        pm = t["partitions"][partition]
        isr = [r for r in pm["isr"] if r not in exclude]
        if preferred is not None:
            candidates = [preferred]
        else:
            candidates = [r for r in pm["replicas"] if r in isr and self._usable(topic, partition, r)]
        dropped = 0
        if not candidates and t["config"].get("unclean_leader_election"):
            ends = {r: self._end(topic, partition, r) for r in pm["replicas"]
                    if r not in exclude and self._usable(topic, partition, r)}
            if ends:
                best = max(ends, key=lambda r: (ends[r], -pm["replicas"].index(r)))
                known = [self._end(topic, partition, r) for r in pm["replicas"]]
                dropped = max(0, max(known + [self.last_end.get((topic, partition), -1)]) - ends[best])
                log.warning("unclean election of %s-%d: replica %d (out of sync) leads; %d record(s) beyond its "
                            "end offset %d are dropped", topic, partition, best, dropped, ends[best])
                self.set_state(topic, partition, best, [best], True, f"unclean election: {reason}",
                               dropped=dropped)
                return True
        if not candidates:
            if pm["leader"] != -1:
                log.error("%s-%d has no in-sync replica to lead (%s); it is unavailable until one returns",
                          topic, partition, reason)
                self.set_state(topic, partition, -1, pm["isr"], True, f"no leader: {reason}")
            return False
        new = candidates[0]
        new_isr = isr if new in isr else isr + [new]
        self.set_state(topic, partition, new, new_isr, True, reason)
        return True

    def _end(self, topic: str, partition: int, rid: int) -> int:
        plog = self.log(topic, partition, rid)
        if plog is None:
            return -1
        try:
            return plog.end_offset
        except ShmqError:
            return -1

    def set_state(self, topic: str, partition: int, leader: int, isr: List[int], new_epoch: bool, reason: str,
                  dropped: int = 0, min_epoch: int = 0) -> None:
        """Journal a leader/ISR change, then write the control words and publish."""
        pm = self.db.store.topics[topic]["partitions"][partition]
        replicas = pm["replicas"]
        old_leader = pm["leader"]
        old_hw = -1
        started = time.monotonic()
        if new_epoch and old_leader >= 0:
            # The mapping we hold, even if its files were unlinked: clients may still hold it too.
            old = self.logs.get((topic, partition, old_leader)) or self.log(topic, partition, old_leader)
            if old is not None:
                try:
                    self.last_end[(topic, partition)] = max(self.last_end.get((topic, partition), -1),
                                                            old.end_offset)
                    old_hw = old.high_watermark
                    old.set_append_state(NOT_LEADER)        # the fence: appends there fail from now on
                except ShmqError as e:
                    log.warning("fencing %s-%d's old leader %d failed: %s", topic, partition, old_leader, e)
        rec = self.db.store.prepare_partition_state(topic, partition, leader=leader, isr=isr,
                                                    new_leader_epoch=new_epoch, reason=reason, dropped=dropped,
                                                    min_epoch=min_epoch)
        self.db.commit([rec])
        pm = self.db.store.topics[topic]["partitions"][partition]
        if leader >= 0:
            plog = self.log(topic, partition, leader)
            if plog is not None:
                try:
                    mask = _mask(replicas, pm["isr"])
                    idx = replicas.index(leader)
                    if new_epoch:
                        plog.set_replication(True, pm["leader_epoch"], idx, mask, plog.end_offset)
                        if old_hw > 0:
                            plog.advance_hw(min(old_hw, plog.end_offset))
                        self._baseline_all(topic, partition, replicas)
                    else:
                        plog.set_replication(True, plog.leader_epoch, idx, mask, plog.epoch_start_offset)
                        plog.recompute_hw()
                except ShmqError as e:
                    log.warning("updating the control block of %s-%d's leader %d failed: %s",
                                topic, partition, leader, e)
        for r in pm["isr"]:
            self._baseline.setdefault((topic, partition, r), time.monotonic_ns())
        self._publish()
        if new_epoch:
            self.failovers.append({"topic": topic, "partition": partition, "leader": leader,
                                   "epoch": pm["leader_epoch"], "reason": reason, "at": time.time(),
                                   "ms": (time.monotonic() - started) * 1e3})
            del self.failovers[:-100]
        log.info("%s-%d: leader %d epoch %d isr %s (%s)", topic, partition, leader, pm["leader_epoch"],
                 pm["isr"], reason)

    def _baseline_all(self, topic: str, partition: int, replicas: List[int]) -> None:
        now = time.monotonic_ns()
        for r in replicas:
            self._baseline[(topic, partition, r)] = now

    def tick(self) -> bool:
        """ISR shrink/expand, leaderless and preferred elections, process supervision.
        Returns whether anything is unsettled (a replica process not registered,
        a partition without its preferred leader or its full ISR) or moved (a
        leader's end offset or high watermark): the caller ticks again soon."""
        self.ensure_processes()
        busy = any(not h.registered for rid, h in self.replicas.items() if rid < self.needed())
        marks: Dict[Key, Tuple[int, int]] = {}
        try:
            busy = self._tick(marks) or busy
        finally:
            busy = busy or marks != self._marks
            self._marks = marks
        return busy

    def _tick(self, marks: Dict[Key, Tuple[int, int]]) -> bool:
        busy = False
        now_ns = time.monotonic_ns()
        for name, p, pm in self.replicated_partitions():
            t = self.db.store.topics[name]
            leader = pm["leader"]
            if leader != pm["replicas"][0] or len(pm["isr"]) != len(pm["replicas"]):
                busy = True
            if leader < 0 or (name, p, leader) in self.offline:
                if time.monotonic() - self.started > 0.5:
                    self.elect(name, p, "partition has no leader")
                continue
            if not self.alive(leader) and time.monotonic() - max(self.started, self._spawned(leader)) > STARTUP_S / 2:
                # A leader that is neither registered nor holding its lock (e.g. it did not come
                # back after a coordinator restart); deaths seen as they happen are handled at once.
                self.elect(name, p, f"leader replica {leader} is not running", exclude={leader})
                continue
            plog = self.log(name, p, leader)
            if plog is None:
                self.storage_failed(name, p, leader, "its log files are gone")
                continue
            try:
                if plog.append_state != OPEN:
                    busy = True
                    continue                      # its process has not opened it yet
                leos = plog.replica_leos()
                hw = plog.high_watermark
                self.last_end[(name, p)] = plog.end_offset
                marks[(name, p)] = (self.last_end[(name, p)], hw)
            except ShmqError as e:
                self.storage_failed(name, p, leader, str(e))
                continue
            lag_ns = int(t["config"].get("replica_lag_time_max_ms", 10_000)) * 1_000_000
            epoch_tag = pm["leader_epoch"] & 0xFFFF
            isr = list(pm["isr"])
            changed = False
            for idx, r in enumerate(pm["replicas"]):
                if r == leader:
                    continue
                tag, leo, caught = leos[idx]
                seen = max(caught, self._baseline.get((name, p, r), 0))
                if r in isr:
                    if now_ns - seen > lag_ns:
                        log.warning("%s-%d: replica %d fell out of sync (not caught up for %.0f ms)",
                                    name, p, r, (now_ns - seen) / 1e6)
                        isr.remove(r)
                        changed = True
                elif (tag == epoch_tag and leo >= hw and now_ns - caught < lag_ns
                      and self._usable(name, p, r)):
                    isr.append(r)
                    self._baseline[(name, p, r)] = now_ns
                    changed = True
            if changed:
                self.set_state(name, p, leader, isr, False, "ISR change")
                continue
            preferred = pm["replicas"][0]
            if leader != preferred and preferred in pm["isr"] and self._usable(name, p, preferred):
                since = self._preferred_since.setdefault((name, p), time.monotonic())
                if time.monotonic() - since >= PREFERRED_AFTER:
                    self._preferred_since.pop((name, p), None)
                    self.elect(name, p, f"preferred replica {preferred} is in sync again", preferred=preferred)
            else:
                self._preferred_since.pop((name, p), None)
        return busy


META_FILE = "partition.meta"


def write_partition_meta(path: str, meta: Dict[str, Any]) -> None:
    """What a replica log belongs to, next to it: enough to recover the topic
    from this directory alone (``recover_topics``) after the root is lost."""
    tmp = os.path.join(path, META_FILE + ".tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(path, META_FILE))


def read_partition_meta(path: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(path, META_FILE)) as f:
            meta = json.load(f)
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and {"topic", "partition", "config", "replicas", "replica"} <= set(meta) \
        else None


