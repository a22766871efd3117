"""The root directory: where it is, who may use it, and every path inside it.

Theory of operation: one root holds one broker's state. It defaults to
``/dev/shm/shmq-<user>`` (tmpfs), or ``$SHMQ_ROOT``, or the ``root=`` argument.
It is created mode 0700 under umask 077; on every open its owner must be the
effective uid and its mode must let nobody else in, otherwise
``ClusterAuthorizationFailed`` is raised naming the path, owner and mode.
The root is verified (``lstat``: no symlink, a directory, ours, 0700) before
anything is created in it, and every directory beneath it is made one
component at a time through directory fds with ``O_NOFOLLOW``
(``make_private_dirs``), so a planted link never receives a file or directory.

Every path under the root is built here and nowhere else::

    <root>/coordinator.lock     flock: the holder is the active coordinator
    <root>/coordinator.sock     the coordinator's Unix socket
    <root>/coordinator.pid      "<pid> <create_time>" of the active coordinator
    <root>/coordinator.log      stdout/stderr of an embedded coordinator
    <root>/meta/journal         metadata journal (coordinator only)
    <root>/meta/snapshot        metadata snapshot (coordinator only)
    <root>/metadata.map         hot-path metadata published to clients
    <root>/offsets.table        hot-path committed offsets (see shmq.offsets_table)
    <root>/data/<replica>/<topic>-<partition>/   a partition log
    <root>/txn/<topic>-<partition>  transaction index: LSO and aborted ranges (shmq.ringlog.txn)
    <root>/replica-<id>.lock    flock: the holder is replica process <id>
    <root>/replica-<id>.log     stdout/stderr of replica process <id>
    <root>/replica-<id>.alive   the lifeline robust mutex replica <id> holds (shmq.lifeline)
    <root>/kafka-users          SASL/PLAIN credentials of the Kafka listener (mode 0600; shmq.kafka.sasl)
    <root>/kafka-listener.log   stdout/stderr of the Kafka listener the coordinator runs
    <root>/kafka-listener.json  the root's Kafka listener setting (``shmq kafka enable``; shmq.kafka.supervisor)
    <root>/kafka-listener.lock  flock: the holder is the coordinator-run Kafka listener

Names (topics, groups) follow Kafka: ``[A-Za-z0-9._-]{1,249}``, not ``.`` or
``..``, so no name can escape the root.
"""
from __future__ import annotations

import errno
import os
import pwd
import re
import stat
from typing import Optional, Type, Union

from .errors import ClusterAuthorizationFailed, InvalidGroupId, InvalidTopic, ShmqError

__all__ = ["Root", "default_root_path", "check_private_dir", "make_private_dirs", "validate_topic", "validate_group",
           "MAX_NAME_LENGTH"]

MAX_NAME_LENGTH = 249
_NAME_RE = re.compile(r"[A-Za-z0-9._-]{1,%d}\Z" % MAX_NAME_LENGTH)
DEFAULT_REPLICA = "0"


def _validate_name(name: object, kind: str, exc: Type[ShmqError]) -> str:
    if not isinstance(name, str):
        raise exc(f"{kind} name must be a str, got {type(name).__name__}")
    if name in (".", "..") or not _NAME_RE.match(name):
        raise exc(f"invalid {kind} name {name!r}: must be 1 to {MAX_NAME_LENGTH} characters of "
                  f"[A-Za-z0-9._-] and not '.' or '..'", topic=name if kind == "topic" else None)
    return name


def validate_topic(name: object) -> str:
    """Return ``name`` if it is a valid topic name, else raise ``InvalidTopic``."""
    return _validate_name(name, "topic", InvalidTopic)


def validate_group(name: object) -> str:
    """Return ``name`` if it is a valid group id, else raise ``InvalidGroupId``."""
    return _validate_name(name, "group", InvalidGroupId)


def check_private_dir(st: os.stat_result, path: str, what: str) -> None:
    """Raise ``ClusterAuthorizationFailed`` naming ``path`` unless ``st`` (an
    ``lstat``/``fstat`` result) is a real directory owned by the effective uid
    with no permission bits for group or others."""
    if stat.S_ISLNK(st.st_mode):
        raise ClusterAuthorizationFailed(
            f"{what} {path} is a symbolic link; refusing to follow it (a symlink or file is refused)")
    if not stat.S_ISDIR(st.st_mode):
        raise ClusterAuthorizationFailed(f"{what} {path} is not a directory (a symlink or file is refused)")
    me = os.geteuid()
    if st.st_uid != me:
        raise ClusterAuthorizationFailed(
            f"{what} {path} is owned by uid {st.st_uid}, not by this user (uid {me}); "
            f"refusing to use it (set SHMQ_ROOT or root= to a directory of your own)")
    if st.st_mode & 0o077:
        raise ClusterAuthorizationFailed(
            f"{what} {path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 so no "
            f"other user can reach its files (chmod 700 {path})")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_dir(name: str, path: str, what: str, dir_fd: Optional[int] = None) -> int:
    """Open directory ``name`` (relative to ``dir_fd``) without following a
    symlink and verify it with ``check_private_dir``; return its fd."""
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            check_private_dir(os.lstat(name, dir_fd=dir_fd), path, what)
        raise
    try:
        check_private_dir(os.fstat(fd), path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def make_private_dirs(path: str, base: Optional[str] = None) -> None:
    """Create directory ``path`` and its missing parents, mode 0700, beneath
    ``base``, one component at a time: ``mkdir`` and ``open(O_NOFOLLOW)``
    relative to the parent's fd, each component (new or existing) verified
    with ``check_private_dir``. So a symlink planted anywhere beneath ``base``
    never receives a directory: it is refused with ``ClusterAuthorizationFailed``.

    ``base`` (itself verified the same way, not followed if a link) defaults
    to the parent of the highest missing component, or to ``path``'s parent
    when ``path`` exists: then only ``path`` and what is created are checked.
    """
    path = os.path.abspath(path)
    if base is None:
        base = os.path.dirname(path)
        while not os.path.lexists(base) and base != os.path.dirname(base):
            base = os.path.dirname(base)
        fd = os.open(base, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    else:
        base = os.path.abspath(base)
        fd = _open_dir(base, base, "shmq directory")
    rel = os.path.relpath(path, base)
    if rel.startswith(".."):
        os.close(fd)
        raise ValueError(f"{path} is not beneath {base}")
    cur = base
    try:
        for name in ([] if rel == "." else rel.split(os.sep)):
            cur = os.path.join(cur, name)
            try:
                os.mkdir(name, 0o700, dir_fd=fd)
            except FileExistsError:
                pass
            nfd = _open_dir(name, cur, "shmq directory", dir_fd=fd)
            os.close(fd)
            fd = nfd
    finally:
        os.close(fd)


def default_root_path() -> str:
    """``$SHMQ_ROOT`` if set, else ``/dev/shm/shmq-<user>`` (``$TMPDIR`` without /dev/shm)."""
    env = os.environ.get("SHMQ_ROOT")
    if env:
        return os.path.abspath(env)
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    base = "/dev/shm" if os.path.isdir("/dev/shm") else (os.environ.get("TMPDIR") or "/tmp")
    return os.path.join(base, f"shmq-{user}")


class Root:
    """An opened (and, if needed, created) root directory.

    ``Root(None)`` uses the default; a ``Root`` may also be passed wherever a
    path is accepted. Construction verifies ownership and mode.
    """

    def __init__(self, path: Union[str, "os.PathLike[str]", "Root", None] = None, *,
                 create: bool = True) -> None:
        if isinstance(path, Root):
            path = path.path
        self.path: str = os.path.abspath(os.fspath(path)) if path is not None else default_root_path()
        if create:
            self._create()
        self.verify()

    def _create(self) -> None:
        """Create the root (mode 0700) if it is missing, verify it, and only then
        create ``meta/``, ``data/`` and ``data/<replica>/`` inside it through
        directory fds (``make_private_dirs``): nothing is ever created inside
        a link's target or a directory of another user."""
        old = os.umask(0o077)
        try:
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                pass
            self.verify()
            for d in (self.meta_dir, self.replica_dir()):
                make_private_dirs(d, self.path)
        finally:
            os.umask(old)

    def verify(self) -> None:
        """Raise ``ClusterAuthorizationFailed`` unless the root is a real directory
        owned by us that no other user can enter, and ``meta/``, ``data/`` and
        ``data/<replica>/`` (where they exist) are too."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise ClusterAuthorizationFailed(f"shmq root {self.path} does not exist") from None
        check_private_dir(st, self.path, "shmq root")
        for d in (self.meta_dir, self.data_dir, self.replica_dir()):
            try:
                st = os.lstat(d)
            except FileNotFoundError:
                continue
            check_private_dir(st, d, "shmq root directory")

    def makedirs(self, path: str) -> None:
        """Create directory ``path`` (a partition directory) and its missing
        parents with ``make_private_dirs``. Beneath the root the root is the
        anchor; a path elsewhere (a replica on another filesystem) is anchored
        at its parent, which is made 0700 if missing and must be as private as
        the root."""
        path = os.path.abspath(path)
        if os.path.commonpath([path, self.path]) == self.path:
            make_private_dirs(path, self.path)
            return
        base = os.path.dirname(path)
        os.makedirs(base, mode=0o700, exist_ok=True)
        check_private_dir(os.lstat(base), base, "replica directory")
        make_private_dirs(path, base)

    # ------------------------------------------------------------------ paths
    @property
    def lock_path(self) -> str:
        return os.path.join(self.path, "coordinator.lock")

    @property
    def socket_path(self) -> str:
        return os.path.join(self.path, "coordinator.sock")

    @property
    def pid_path(self) -> str:
        return os.path.join(self.path, "coordinator.pid")

    @property
    def log_path(self) -> str:
        return os.path.join(self.path, "coordinator.log")

    @property
    def meta_dir(self) -> str:
        return os.path.join(self.path, "meta")

    @property
    def journal_path(self) -> str:
        return os.path.join(self.meta_dir, "journal")

    @property
    def snapshot_path(self) -> str:
        return os.path.join(self.meta_dir, "snapshot")

    @property
    def metadata_map_path(self) -> str:
        return os.path.join(self.path, "metadata.map")

    @property
    def offsets_table_path(self) -> str:
        return os.path.join(self.path, "offsets.table")

    @property
    def data_dir(self) -> str:
        return os.path.join(self.path, "data")

    def replica_dir(self, replica: str = DEFAULT_REPLICA) -> str:
        """Directory holding the partition logs of one replica process."""
        return os.path.join(self.data_dir, replica)

    def partition_dir(self, topic: str, partition: int, replica: str = DEFAULT_REPLICA) -> str:
        """``<root>/data/<replica>/<topic>-<partition>`` (the topic name is validated)."""
        validate_topic(topic)
        if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
            raise InvalidTopic(f"partition must be a non-negative int, got {partition!r}", topic=topic)
        return os.path.join(self.replica_dir(replica), f"{topic}-{partition}")

    @property
    def txn_dir(self) -> str:
        return os.path.join(self.path, "txn")

    def txn_index_path(self, topic: str, partition: int) -> str:
        """``<root>/txn/<topic>-<partition>``: the partition's transaction index."""
        validate_topic(topic)
        if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
            raise InvalidTopic(f"partition must be a non-negative int, got {partition!r}", topic=topic)
        return os.path.join(self.txn_dir, f"{topic}-{partition}")

    def replica_lock_path(self, replica: int) -> str:
        return os.path.join(self.path, f"replica-{int(replica)}.lock")

    def replica_alive_path(self, replica: int) -> str:
        return os.path.join(self.path, f"replica-{int(replica)}.alive")

    def replica_log_path(self, replica: int) -> str:
        return os.path.join(self.path, f"replica-{int(replica)}.log")

    @property
    def kafka_users_path(self) -> str:
        return os.path.join(self.path, "kafka-users")

    @property
    def kafka_log_path(self) -> str:
        return os.path.join(self.path, "kafka-listener.log")

    @property
    def kafka_setting_path(self) -> str:
        return os.path.join(self.path, "kafka-listener.json")

    @property
    def kafka_lock_path(self) -> str:
        return os.path.join(self.path, "kafka-listener.lock")

    def coordinator_pid(self) -> Optional[int]:
        """Pid of the last coordinator that became active here, if it is alive
        (pid and create time both match, never pid alone)."""
        import psutil
        try:
            with open(self.pid_path) as f:
                pid_s, ctime_s = f.read().split()
            pid, ctime = int(pid_s), float(ctime_s)
            proc = psutil.Process(pid)
            if abs(proc.create_time() - ctime) < 0.01 and proc.status() != psutil.STATUS_ZOMBIE:
                return pid
        except (OSError, ValueError, psutil.Error):
            pass
        return None

    def __repr__(self) -> str:
        return f"Root({self.path!r})"

    def __fspath__(self) -> str:
        return self.path
