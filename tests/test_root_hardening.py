"""The root is verified before anything is created inside it: a planted
symlink (as the root, or in place of data/, meta/, data/<replica>/ or a
partition directory) and a directory of another user are refused with
``ClusterAuthorizationFailed`` naming the path, and nothing new appears in the
link's target or the other user's directory."""
from __future__ import annotations

import os
import pytest

from shmq import errors
from shmq.ringlog.log import PartitionLog
from shmq.root import Root, make_private_dirs

@pytest.fixture
def target(shm_dir: str) -> str:
    """A directory a planted link points at; it must stay empty."""
    d = os.path.join(shm_dir, "target")
    os.mkdir(d, 0o700)
    return d


def test_symlink_root_is_refused_and_its_target_stays_empty(shm_dir: str, target: str) -> None:
    link = os.path.join(shm_dir, "root")
    os.symlink(target, link)
    with pytest.raises(errors.ClusterAuthorizationFailed, match=f"{link} is a symbolic link"):
        Root(link)
    assert os.listdir(target) == []


def test_root_owned_by_another_uid_is_refused_and_stays_empty(shm_dir: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    other = os.path.join(shm_dir, "other")
    os.mkdir(other, 0o700)
    os.chown(other, 65534, 65534)
    with pytest.raises(errors.ClusterAuthorizationFailed, match=f"{other} is owned by uid 65534"):
        Root(other)
    assert os.listdir(other) == []


def test_root_with_open_mode_is_refused_before_anything_is_created(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "open")
    os.mkdir(path)
    os.chmod(path, 0o755)
    with pytest.raises(errors.ClusterAuthorizationFailed, match="mode 0755"):
        Root(path)
    assert os.listdir(path) == []


@pytest.mark.parametrize("sub", ["data", "meta", "data/0"])
def test_symlink_in_place_of_a_root_directory_is_refused(shm_dir: str, target: str, sub: str) -> None:
    path = os.path.join(shm_dir, "r")
    os.mkdir(path, 0o700)
    if sub == "data/0":
        os.mkdir(os.path.join(path, "data"), 0o700)
    link = os.path.join(path, sub)
    os.symlink(target, link)
    with pytest.raises(errors.ClusterAuthorizationFailed, match=f"{link} is a symbolic link"):
        Root(path)
    with pytest.raises(errors.ClusterAuthorizationFailed, match=f"{link} is a symbolic link"):
        Root(path, create=False)
    assert os.listdir(target) == []


def test_a_file_in_place_of_data_is_refused(shm_dir: str) -> None:
    path = os.path.join(shm_dir, "r")
    os.mkdir(path, 0o700)
    open(os.path.join(path, "data"), "w").close()
    with pytest.raises(errors.ClusterAuthorizationFailed, match="data is not a directory"):
        Root(path)


def test_symlinked_partition_directory_receives_no_files(shm_dir: str, target: str) -> None:
    root = Root(os.path.join(shm_dir, "r"))
    part = root.partition_dir("t", 0)
    os.symlink(target, part)
    with pytest.raises(errors.ClusterAuthorizationFailed, match=f"{part} is a symbolic link"):
        root.makedirs(part)
    with pytest.raises(errors.ClusterAuthorizationFailed, match=f"{part} is a symbolic link"):
        PartitionLog.create(part, segment_bytes=1 << 16, segment_count=2)
    assert os.listdir(target) == []


def test_symlink_above_a_new_partition_directory_is_refused(shm_dir: str, target: str) -> None:
    root = Root(os.path.join(shm_dir, "r"))
    os.symlink(target, root.replica_dir("1"))
    with pytest.raises(errors.ClusterAuthorizationFailed, match="data/1 is a symbolic link"):
        root.makedirs(root.partition_dir("t", 0, "1"))
    assert os.listdir(target) == []


def test_private_dirs_are_made_0700_one_component_at_a_time(shm_dir: str) -> None:
    old = os.umask(0)
    try:
        make_private_dirs(os.path.join(shm_dir, "a", "b", "c"), shm_dir)
    finally:
        os.umask(old)
    for p in ("a", "a/b", "a/b/c"):
        assert os.stat(os.path.join(shm_dir, p)).st_mode & 0o777 == 0o700
    os.chmod(os.path.join(shm_dir, "a", "b"), 0o750)
    with pytest.raises(errors.ClusterAuthorizationFailed, match="b has mode 0750"):
        make_private_dirs(os.path.join(shm_dir, "a", "b", "c", "d"), shm_dir)
    assert not os.path.exists(os.path.join(shm_dir, "a", "b", "c", "d"))
