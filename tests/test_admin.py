"""Admin API against a real (embedded, auto-started) coordinator process."""
from __future__ import annotations

import os
import signal
from typing import Iterator

import pytest

from shmq import errors
from shmq.admin import Admin
from shmq.ringlog import PartitionLog
from shmq.root import Root


@pytest.fixture
def admin(shm_dir: str) -> Iterator[Admin]:
    """An Admin on a fresh root; the coordinator it starts is killed afterwards."""
    a = Admin(shm_dir)
    try:
        yield a
    finally:
        a.close()
        pid = Root(shm_dir).coordinator_pid()
        if pid is not None:
            os.kill(pid, signal.SIGKILL)


def _stored(a: Admin) -> "tuple[list, list]":
    return a.list_topics(), sorted(os.listdir(a.root.replica_dir()))


@pytest.mark.timeout(60)
def test_create_describe_list_delete(admin: Admin) -> None:
    d = admin.create_topic("orders", partitions=3, config={"segment.bytes": 65536, "segment_count": 4})
    assert d.name == "orders" and d.partition_count == 3
    assert d.config["segment_bytes"] == 65536 and d.config["segment_count"] == 4
    assert d.config["max_message_bytes"] < 65536
    assert [p.partition for p in d.partitions] == [0, 1, 2]
    assert all(p.start_offset == 0 and p.end_offset == 0 for p in d.partitions)
    admin.create_topic("audit")
    assert admin.list_topics() == ["audit", "orders"]

    with PartitionLog(d.partitions[1].path) as log:
        for i in range(7):
            log.append(b"v%d" % i)
    parts = admin.describe_topic("orders").partitions
    assert (parts[1].start_offset, parts[1].end_offset) == (0, 7)
    assert parts[0].end_offset == 0

    admin.delete_topic("orders")
    assert admin.list_topics() == ["audit"]
    assert sorted(os.listdir(admin.root.replica_dir())) == ["audit-0"]
    with pytest.raises(errors.UnknownTopicOrPartition, match="orders"):
        admin.describe_topic("orders")
    # A re-created topic is a new topic: empty logs, new id.
    d2 = admin.create_topic("orders", partitions=1)
    assert d2.topic_id != d.topic_id and d2.partitions[0].end_offset == 0


@pytest.mark.timeout(60)
def test_create_partitions_and_alter_config(admin: Admin) -> None:
    admin.create_topic("t", 2, {"segment_bytes": 16384})
    d = admin.create_partitions("t", 5)
    assert d.partition_count == 5 and d.config["segment_bytes"] == 16384
    assert sorted(os.listdir(admin.root.replica_dir())) == [f"t-{p}" for p in range(5)]
    cfg = admin.alter_config("t", {"max.message.bytes": 1000})
    assert cfg["max_message_bytes"] == 1000
    assert admin.describe_topic("t").config["max_message_bytes"] == 1000


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["../x", "", ".", "..", "a/b", "x" * 250, "sp ace", "é"])
def test_invalid_names_are_refused_and_store_nothing(admin: Admin, name: str) -> None:
    admin.create_topic("keep")
    before = _stored(admin)
    with pytest.raises(errors.InvalidTopic):
        admin.create_topic(name)
    # Bypass the client-side check: the coordinator refuses too.
    with pytest.raises(errors.InvalidTopic):
        admin._client.create_topic(name)
    with pytest.raises(errors.InvalidTopic):
        admin.describe_topic(name)
    assert _stored(admin) == before


@pytest.mark.timeout(60)
@pytest.mark.parametrize("config,word", [
    ({"bogus": 1}, "bogus"),
    ({"segment_bytes": 7}, "segment_bytes"),
    ({"segment_bytes": "big"}, "segment_bytes"),
    ({"segment_count": 1}, "segment_count"),
    ({"overflow": "drop"}, "overflow"),
    ({"max_message_bytes": 10 << 20}, "max_message_bytes"),
    ({"unblock_timeout_ms": 0}, "unblock_timeout_ms"),
    ("segment_bytes=4096", "dict"),
])
def test_bad_config_is_refused_and_stores_nothing(admin: Admin, config: object, word: str) -> None:
    before = _stored(admin)
    with pytest.raises(errors.InvalidConfig, match=word):
        admin.create_topic("t", 2, config)  # type: ignore[arg-type]
    assert _stored(admin) == before


@pytest.mark.timeout(60)
def test_errors_name_the_topic_and_change_nothing(admin: Admin) -> None:
    admin.create_topic("t", 2)
    before = _stored(admin)
    with pytest.raises(errors.TopicAlreadyExists, match="'t'") as ei:
        admin.create_topic("t", 4)
    assert ei.value.topic == "t"
    for call in (lambda: admin.describe_topic("nope"), lambda: admin.delete_topic("nope"),
                 lambda: admin.alter_config("nope", {}), lambda: admin.create_partitions("nope", 3)):
        with pytest.raises(errors.UnknownTopicOrPartition, match="nope"):
            call()
    with pytest.raises(errors.InvalidPartitions, match="'t'"):
        admin.create_partitions("t", 2)
    for bad in (0, -1, "3", 2.5, True):
        with pytest.raises(errors.InvalidPartitions):
            admin.create_topic("u", bad)  # type: ignore[arg-type]
    with pytest.raises(errors.InvalidConfig, match="segment_bytes is fixed"):
        admin.alter_config("t", {"segment_bytes": 8192})
    with pytest.raises(errors.InvalidConfig, match="bogus"):
        admin.alter_config("t", {"bogus": 1})
    assert _stored(admin) == before
    assert admin.describe_topic("t").partition_count == 2


@pytest.mark.timeout(60)
def test_storage_failure_leaves_nothing_behind(admin: Admin) -> None:
    # More than the filesystem holds is refused up front (never by filling the tmpfs):
    # a clean error naming the topic, no files, no topic.
    st = os.statvfs(admin.root.path)
    segments = st.f_bavail * st.f_frsize // (1 << 30) + 2
    with pytest.raises(errors.KafkaStorageError, match="huge"):
        admin.create_topic("huge", 1, {"segment_bytes": 1 << 30, "segment_count": min(segments, 1024)})
    assert _stored(admin) == ([], [])


@pytest.mark.timeout(30)
def test_root_of_another_user_or_open_mode_is_refused(shm_dir: str) -> None:
    os.chmod(shm_dir, 0o755)
    with pytest.raises(errors.ClusterAuthorizationFailed, match="mode 0755"):
        Admin(shm_dir)
    os.chmod(shm_dir, 0o700)
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    os.chown(shm_dir, 65534, 65534)
    try:
        with pytest.raises(errors.ClusterAuthorizationFailed, match="owned by uid 65534"):
            Admin(shm_dir)
    finally:
        os.chown(shm_dir, 0, 0)


@pytest.mark.timeout(30)
def test_root_is_created_private(shm_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(shm_dir, "sub")
    monkeypatch.setenv("SHMQ_ROOT", path)
    r = Root()
    assert r.path == path
    assert os.stat(path).st_mode & 0o777 == 0o700
    assert r.partition_dir("a-b", 3) == os.path.join(path, "data", "0", "a-b-3")
    with pytest.raises(errors.InvalidTopic):
        r.partition_dir("../etc", 0)
