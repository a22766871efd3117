"""Client side of the coordinator: connect (starting one if none lives), call, retry.

Contract:

* ``CoordinatorClient(root)`` connects lazily to ``<root>/coordinator.sock``.
  If nothing answers and the root's lock is free (no live coordinator), it
  starts the embedded one (``python -m shmq.coordinator --root R --daemon``,
  detached, from ``/`` with a safe ``sys.path``, logging to
  ``<root>/coordinator.log``) and retries until ``connect_timeout``; while
  the lock is held (a coordinator is starting or a standby is taking over) it
  just retries. Then ``NotCoordinator``. The embedded coordinator exits once
  no client has been connected for ``$SHMQ_IDLE_EXIT_MS`` (default 10
  minutes, 0: never); the next client starts another on the same data. A started coordinator that dies
  before it serves raises ``CoordinatorStartFailed`` (a ``NotCoordinator``)
  at once, with the last lines of its log.
* ``call(op, **args)`` sends one request and waits up to ``timeout`` for the
  answer. If the connection breaks (the coordinator died), it reconnects once
  to the new coordinator and resends: every operation is safe to resend
  except that a ``create_topic`` whose first attempt was applied answers
  ``TopicAlreadyExists`` (and ``delete_topic`` ``UnknownTopicOrPartition``).
  Errors raised by the coordinator are re-raised as the same ``shmq.errors``
  class. Thread-safe (one request at a time per client).
* ``metadata()`` returns the ``MetadataView`` of ``<root>/metadata.map``: the
  hot-path way to learn partition counts, log paths and config without an RPC.
* Hot-path offset commits: ``offsets_slot(group, topic, partition)`` once per
  assigned partition gives an entry index; ``offsets_table().store(index,
  offset)`` commits without an RPC (the coordinator journals it within ~10 ms);
  ``sync_offsets()`` returns once everything stored so far is durable (that is
  ``commit(asynchronous=False)``). ``commit_offsets``/``fetch_offsets`` are the
  RPC forms (with metadata strings) and see table commits too.
"""
from __future__ import annotations

import fcntl
import os
import select
import socket
import struct
import subprocess
import threading
import time
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

from ..errors import InvalidConfig, NotCoordinator
from ..offsets_table import OffsetsTable
from ..root import Root
from ..spawn import CHILD_CWD, child_env, log_tail, python_argv
from .metamap import MetadataView
from .protocol import error_from_wire, recv_frame, send_frame

__all__ = ["CoordinatorClient", "CoordinatorStartFailed", "TopicPartitionKey", "coordinator_alive"]

TopicPartitionKey = Tuple[str, int]
OffsetValue = Union[int, Tuple[int, str]]
_UCRED = struct.Struct("3i")


def lock_held(path: str) -> bool:
    """True if some process holds the flock on ``path`` (a process's liveness
    by its lock: the kernel drops a dead process's locks at once)."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)            # closing drops our lock if we took it
    return False


def coordinator_alive(root: Root) -> bool:
    """True if some process holds the root's coordinator lock."""
    return lock_held(root.lock_path)


class CoordinatorStartFailed(NotCoordinator):
    """The embedded coordinator a client started died before it served (the
    message carries the last lines of its log)."""


IDLE_EXIT_MS = 600_000       # the embedded coordinator's default idle_exit_ms (10 minutes)


def idle_exit_ms() -> int:
    """The embedded coordinator's ``idle_exit_ms``: ``$SHMQ_IDLE_EXIT_MS`` or
    10 minutes; 0 keeps it running until ``shmq stop``."""
    raw = os.environ.get("SHMQ_IDLE_EXIT_MS")
    if raw is None or raw == "":
        return IDLE_EXIT_MS
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise InvalidConfig(f"SHMQ_IDLE_EXIT_MS={raw!r}: must be a non-negative number of milliseconds")
    return value


def start_embedded(root: Root, timeout: float = 30.0) -> None:
    """Start a detached coordinator for ``root`` and wait until it serves, or
    finds another one active, or ``timeout`` passes (then it may still come
    up). It runs from ``/`` with this ``shmq`` first on its path (``shmq.spawn``);
    what it prints before it detaches goes to ``<root>/coordinator.log`` too.
    Raises ``CoordinatorStartFailed`` naming the cause if it died."""
    fd = os.open(root.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        rc = subprocess.run(python_argv("shmq.coordinator", "--root", root.path, "--daemon",
                                        "--idle-exit-ms", str(idle_exit_ms())),
                            stdin=subprocess.DEVNULL, stdout=fd, stderr=fd, close_fds=True, cwd=CHILD_CWD,
                            env=child_env(), timeout=timeout, check=False).returncode
    except subprocess.TimeoutExpired:
        return
    finally:
        os.close(fd)
    if rc not in (0, 3):
        raise CoordinatorStartFailed(
            f"the coordinator of {root.path} failed to start (exit status {rc}); "
            f"the last lines of {root.log_path}:\n{log_tail(root.log_path)}")


class CoordinatorClient:
    """A connection to the root's coordinator (see the module doc)."""

    def __init__(self, root: Union[str, Root, None] = None, *, timeout: float = 10.0,
                 connect_timeout: float = 10.0, autostart: bool = True) -> None:
        self.root = root if isinstance(root, Root) else Root(root)
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.autostart = autostart
        self.coordinator_pid: Optional[int] = None
        self._sock: Optional[socket.socket] = None
        self._lock = threading.Lock()
        self._next_id = 0
        self._view: Optional[MetadataView] = None
        self._table: Optional[OffsetsTable] = None

    # ------------------------------------------------------------ connection
    def _connect(self) -> socket.socket:
        deadline = time.monotonic() + self.connect_timeout
        delay, last_start = 0.002, -1e9
        path = self.root.socket_path
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.settimeout(self.timeout)
                s.connect(path)
                pid = _UCRED.unpack(s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
                self.coordinator_pid = pid
                return s
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
            except OSError:
                s.close()
                raise
            now = time.monotonic()
            if self.autostart and now - last_start > 2.0 and not coordinator_alive(self.root):
                start_embedded(self.root, timeout=max(deadline - now, 1.0))
                last_start = time.monotonic()
                continue
            if now > deadline:
                raise NotCoordinator(f"no coordinator answers on {path} after {self.connect_timeout:.1f}s"
                                     + (f"; the last lines of {self.root.log_path}:\n{log_tail(self.root.log_path)}"
                                        if last_start > 0 else "" if self.autostart else " (autostart is off)"))
            time.sleep(delay)
            delay = min(delay * 2, 0.05)

    def _close_sock(self) -> None:
        s, self._sock = self._sock, None
        if s is not None:
            s.close()

    def wait_closed(self, timeout: float) -> bool:
        """Sleep until the coordinator closes this connection (it died or
        stopped) or ``timeout`` s pass; True if it is closed (or was never
        open). Costs no request: a quiet connection is a live coordinator."""
        sock = self._sock
        if sock is None:
            return True
        poller = select.poll()
        try:
            poller.register(sock, select.POLLIN | select.POLLPRI)
        except (ValueError, OSError):        # closed meanwhile
            return True
        if not poller.poll(max(timeout, 0) * 1000):
            return False
        with self._lock:                     # a call in flight reads its own answer first
            if self._sock is not sock:
                return True
            try:
                sock.setblocking(False)
                try:
                    data = sock.recv(1, socket.MSG_PEEK)
                finally:
                    sock.settimeout(self.timeout)
            except BlockingIOError:
                return False                 # the readable data was an answer, read meanwhile
            except OSError:
                data = b""
            if data:
                # Nothing is sent to us unasked on this connection: drop it, the next call reconnects.
                self._close_sock()
            return True

    def connect(self) -> "CoordinatorClient":
        """Connect now (normally done by the first call)."""
        with self._lock:
            if self._sock is None:
                self._sock = self._connect()
        return self

    # ---------------------------------------------------------------- calls
    def call(self, op: str, **args: Any) -> Any:
        """One request; returns its result or raises the coordinator's error."""
        with self._lock:
            last: Optional[BaseException] = None
            # A lost connection is retried until connect_timeout: a standby or
            # a freshly started coordinator takes a moment to answer.
            deadline = time.monotonic() + self.connect_timeout
            attempt = 0
            while attempt == 0 or time.monotonic() < deadline:
                if attempt:
                    time.sleep(min(0.05, 0.005 * attempt))
                attempt += 1
                if self._sock is None:
                    try:
                        self._sock = self._connect()
                    except CoordinatorStartFailed:
                        raise                      # starting another would fail the same way
                    except NotCoordinator as e:
                        last = e
                        continue
                self._next_id += 1
                rid = self._next_id
                try:
                    send_frame(self._sock, {"id": rid, "op": op, "args": args})
                    resp = recv_frame(self._sock)
                    if resp is None:
                        raise ConnectionError("coordinator closed the connection")
                except socket.timeout:
                    self._close_sock()
                    raise NotCoordinator(f"coordinator on {self.root.socket_path} did not answer {op} "
                                         f"within {self.timeout:.1f}s") from None
                except (OSError, ConnectionError, ValueError) as e:
                    self._close_sock()
                    last = e
                    continue
                if resp.get("ok"):
                    return resp.get("result")
                err = error_from_wire(resp)
                if resp.get("id") != rid:          # an unsolicited frame: the server refused us
                    self._close_sock()
                raise err
            raise NotCoordinator(f"lost the coordinator on {self.root.socket_path} during {op} and none answered "
                                 f"within {self.connect_timeout:.1f}s: {last}")

    def close(self) -> None:
        with self._lock:
            self._close_sock()
            if self._view is not None:
                self._view.close()
                self._view = None
            if self._table is not None:
                self._table.close()
                self._table = None

    def __enter__(self) -> "CoordinatorClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------- metadata
    def metadata(self) -> MetadataView:
        """The shared metadata mapping (a coordinator is started first if needed)."""
        if self._view is None:
            self.connect()
            self._view = MetadataView(self.root.metadata_map_path)
        return self._view

    # ----------------------------------------------------------- operations
    def create_topic(self, name: str, partitions: int = 1, config: Optional[Mapping[str, Any]] = None
                     ) -> Dict[str, Any]:
        return dict(self.call("create_topic", name=name, partitions=partitions,
                              config=dict(config) if isinstance(config, Mapping) else config))

    def delete_topic(self, name: str) -> None:
        self.call("delete_topic", name=name)

    def list_topics(self) -> List[str]:
        return list(self.call("list_topics"))

    def describe_topic(self, name: str) -> Dict[str, Any]:
        return dict(self.call("describe_topic", name=name))

    def create_partitions(self, name: str, total: int) -> Dict[str, Any]:
        return dict(self.call("create_partitions", name=name, total=total))

    def alter_config(self, name: str, config: Mapping[str, Any]) -> Dict[str, Any]:
        return dict(self.call("alter_config", name=name,
                                   config=dict(config) if isinstance(config, Mapping) else config))

    def commit_offsets(self, group: str, offsets: Union[Mapping[TopicPartitionKey, OffsetValue],
                                                       Iterable[Tuple[Any, ...]]],
                       *, monotonic: bool = False) -> Dict[TopicPartitionKey, int]:
        """Commit offsets of ``group`` durably (fsynced before this returns).

        ``offsets``: ``{(topic, partition): offset or (offset, metadata)}`` or
        a list of ``(topic, partition, offset[, metadata])``. The offset is the
        next one to consume, as in Kafka. With ``monotonic``, a commit below
        the stored offset is ignored. Returns the stored offset per partition.
        """
        items: List[List[Any]] = []
        if isinstance(offsets, Mapping):
            for (topic, p), v in offsets.items():
                items.append([topic, p, *v] if isinstance(v, tuple) else [topic, p, v])
        else:
            items = [list(o) for o in offsets]
        res = self.call("commit_offsets", group=group, offsets=items, monotonic=monotonic)
        return {(t, p): off for t, p, off, _meta in res}

    def fetch_offsets(self, group: str, partitions: Optional[Iterable[TopicPartitionKey]] = None
                      ) -> Dict[TopicPartitionKey, int]:
        """Committed offsets of ``group`` (-1 for a requested partition with
        none); ``partitions=None`` returns every committed partition."""
        parts = None if partitions is None else [[t, p] for t, p in partitions]
        res = self.call("fetch_offsets", group=group, partitions=parts)
        return {(t, p): off for t, p, off, _meta in res}

    def fetch_offsets_with_metadata(self, group: str, partitions: Optional[Iterable[TopicPartitionKey]] = None
                                    ) -> Dict[TopicPartitionKey, Tuple[int, str]]:
        parts = None if partitions is None else [[t, p] for t, p in partitions]
        res = self.call("fetch_offsets", group=group, partitions=parts)
        return {(t, p): (off, meta) for t, p, off, meta in res}

    def offsets_slot(self, group: str, topic: str, partition: int) -> Tuple[int, int]:
        """(entry index in the offsets table, committed offset or -1) for
        ``group``'s commits of ``topic``-``partition``; allocated on first use.
        Ask again after the topic was deleted and re-created."""
        r = self.call("offsets_slot", group=group, topic=topic, partition=partition)
        return int(r["index"]), int(r["offset"])

    def offsets_table(self) -> OffsetsTable:
        """The shared offsets table, mapped read-write (hot-path commits)."""
        if self._table is None:
            self.connect()
            self._table = OffsetsTable(self.root.offsets_table_path)
        return self._table

    def sync_offsets(self) -> int:
        """Return once every offset stored in the table so far is durable;
        the number of partitions whose offset was journaled by this call."""
        return int(self.call("sync_offsets")["changed"])

    def allocate_producer_id(self, transactional_id: Optional[str] = None) -> Tuple[int, int]:
        """(producer_id, epoch); with a transactional id, the same id and a bumped epoch."""
        r = self.call("allocate_producer_id", transactional_id=transactional_id)
        return int(r["producer_id"]), int(r["epoch"])

    # ---------------------------------------------------------- transactions
    def init_producer_id(self, transactional_id: str, transaction_timeout_ms: int = 60_000) -> Tuple[int, int]:
        pid, epoch, _registered = self.init_transactional(transactional_id, transaction_timeout_ms)
        return pid, epoch

    def init_transactional(self, transactional_id: str, transaction_timeout_ms: int = 60_000
                           ) -> Tuple[int, int, List[Tuple[str, int]]]:
        """``init_producer_id``, and the partitions the producer may run its
        own transactions on (every one the transactional id ever added)."""
        r = self.call("init_producer_id", transactional_id=transactional_id,
                      transaction_timeout_ms=transaction_timeout_ms)
        registered = [(k.rpartition("/")[0], int(k.rpartition("/")[2])) for k in r.get("registered", [])]
        return int(r["producer_id"]), int(r["epoch"]), registered

    def add_partitions_to_txn(self, transactional_id: str, producer_id: int, producer_epoch: int,
                              partitions: Iterable[TopicPartitionKey]) -> None:
        self.call("add_partitions_to_txn", transactional_id=transactional_id, producer_id=producer_id,
                  producer_epoch=producer_epoch, partitions=[[t, p] for t, p in partitions])

    def txn_offset_commit(self, transactional_id: str, producer_id: int, producer_epoch: int, group_id: str,
                          offsets: Iterable[Tuple[str, int, int, str]],
                          generations: Optional[Mapping[TopicPartitionKey, int]] = None) -> None:
        self.call("txn_offset_commit", transactional_id=transactional_id, producer_id=producer_id,
                  producer_epoch=producer_epoch, group_id=group_id, offsets=[list(o) for o in offsets],
                  generations=None if generations is None else {f"{t}/{p}": g for (t, p), g in generations.items()})

    def end_txn(self, transactional_id: str, producer_id: int, producer_epoch: int, commit: bool) -> None:
        self.call("end_txn", transactional_id=transactional_id, producer_id=producer_id,
                  producer_epoch=producer_epoch, commit=commit)

    def status(self) -> Dict[str, Any]:
        return dict(self.call("status"))
