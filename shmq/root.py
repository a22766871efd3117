"""The root directory: where it is, who may use it, and every path inside it.

Theory of operation: one root holds one broker's state. It defaults to
``/dev/shm/shmq-<user>`` (tmpfs), or ``$SHMQ_ROOT``, or the ``root=`` argument.
It is created mode 0700 under umask 077; on every open its owner must be the
effective uid and its mode must let nobody else in, otherwise
``ClusterAuthorizationFailed`` is raised naming the path, owner and mode.

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
    <root>/replica-<id>.lock    flock: the holder is replica process <id>
    <root>/replica-<id>.log     stdout/stderr of replica process <id>
    <root>/replica-<id>.alive   the lifeline robust mutex replica <id> holds (shmq.lifeline)

Names (topics, groups) follow Kafka: ``[A-Za-z0-9._-]{1,249}``, not ``.`` or
``..``, so no name can escape the root.
"""
from __future__ import annotations

import os
import pwd
import re
import stat
from typing import Optional, Type, Union

from .errors import ClusterAuthorizationFailed, InvalidGroupId, InvalidTopic, ShmqError

__all__ = ["Root", "default_root_path", "validate_topic", "validate_group", "MAX_NAME_LENGTH"]

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
        old = os.umask(0o077)
        try:
            for d in (self.path, self.meta_dir, self.data_dir, self.replica_dir()):
                try:
                    os.mkdir(d, 0o700)
                except FileExistsError:
                    pass
        finally:
            os.umask(old)

    def verify(self) -> None:
        """Raise ``ClusterAuthorizationFailed`` unless the root is a real directory
        owned by us that no other user can enter."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            raise ClusterAuthorizationFailed(f"shmq root {self.path} does not exist") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ClusterAuthorizationFailed(
                f"shmq root {self.path} is not a directory (a symlink or file is refused)")
        me = os.geteuid()
        if st.st_uid != me:
            raise ClusterAuthorizationFailed(
                f"shmq root {self.path} is owned by uid {st.st_uid}, not by this user (uid {me}); "
                f"refusing to use it (set SHMQ_ROOT or root= to a directory of your own)")
        if st.st_mode & 0o077:
            raise ClusterAuthorizationFailed(
                f"shmq root {self.path} has mode {stat.S_IMODE(st.st_mode):04o}; it must be 0700 so no "
                f"other user can reach its files (chmod 700 {self.path})")

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

    def replica_lock_path(self, replica: int) -> str:
        return os.path.join(self.path, f"replica-{int(replica)}.lock")

    def replica_alive_path(self, replica: int) -> str:
        return os.path.join(self.path, f"replica-{int(replica)}.alive")

    def replica_log_path(self, replica: int) -> str:
        return os.path.join(self.path, f"replica-{int(replica)}.log")

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
