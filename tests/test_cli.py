"""The `shmq` command: every subcommand run as a subprocess, its output checked.

Each test uses its own root (``--root`` or ``SHMQ_ROOT``), never the default,
and kills the coordinator it started.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Optional

import pytest
from kafka.partitioner.default import murmur2

from shmq.coordinator import coordinator_alive
from shmq.coordinator.lifecycle import root_processes
from shmq.root import Root

SHMQ = [sys.executable, "-m", "shmq"]
SMALL = ["--config", "segment_bytes=262144", "--config", "segment_count=2"]


def env_without_root() -> dict:  # type: ignore[type-arg]
    env = dict(os.environ)
    env.pop("SHMQ_ROOT", None)
    return env


def shmq(root: Root, *args: str, input: Optional[str] = None, ok: bool = True,
         timeout: float = 60) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    p = subprocess.run([*SHMQ, "--root", root.path, *args], input=input, capture_output=True, text=True,
                       timeout=timeout, env=env_without_root())
    if ok:
        assert p.returncode == 0, f"shmq {' '.join(args)} exited {p.returncode}: {p.stderr}"
    return p


def kafka_partition(key: bytes, n: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % n


# ------------------------------------------------------------------- topics
@pytest.mark.timeout(90)
def test_topics_create_list_describe_alter_delete(root: Root) -> None:
    out = shmq(root, "topics", "create", "orders", "--partitions", "3", *SMALL).stdout
    assert out.strip() == "Created topic orders."
    shmq(root, "topics", "create", "audit.log", *SMALL)
    assert shmq(root, "topics", "list").stdout.split() == ["audit.log", "orders"]
    desc = shmq(root, "topics", "describe", "orders").stdout.splitlines()
    assert re.match(r"Topic: orders\tTopicId: [0-9a-f]+\tPartitionCount: 3\tConfigs: .*segment_bytes=262144", desc[0])
    assert "max_message_bytes=" in desc[0]
    assert len(desc) == 4
    for p, line in enumerate(desc[1:]):
        assert f"Partition: {p}\t" in line and "LogStartOffset: 0\tLogEndOffset: 0" in line
    # describe without a name: every topic
    all_desc = shmq(root, "topics", "describe").stdout
    assert "Topic: audit.log\t" in all_desc and "Topic: orders\t" in all_desc
    out = shmq(root, "topics", "alter", "orders", "--config", "max_message_bytes=5000").stdout
    assert out.strip() == "Altered config of topic orders."
    assert "max_message_bytes=5000" in shmq(root, "topics", "describe", "orders").stdout
    assert shmq(root, "topics", "delete", "audit.log").stdout.strip() == "Deleted topic audit.log."
    assert shmq(root, "topics", "list").stdout.split() == ["orders"]


@pytest.mark.timeout(90)
def test_topics_bad_input_exits_1_with_the_error_named(root: Root) -> None:
    shmq(root, "topics", "create", "t", *SMALL)
    cases = [
        (["topics", "create", "t", *SMALL], "TopicAlreadyExists"),
        (["topics", "create", "../x"], "InvalidTopic"),
        (["topics", "create", "u", "--partitions", "0"], "InvalidPartitions"),
        (["topics", "create", "u", "--config", "segment_bytes=5"], "InvalidConfig"),
        (["topics", "create", "u", "--config", "no_such_key=1"], "InvalidConfig"),
        (["topics", "delete", "nope"], "UnknownTopicOrPartition"),
        (["topics", "describe", "nope"], "UnknownTopicOrPartition"),
        (["topics", "alter", "t", "--config", "segment_bytes=8192"], "InvalidConfig"),
    ]
    for args, err in cases:
        p = shmq(root, *args, ok=False)
        assert p.returncode == 1, (args, p.returncode, p.stderr)
        assert err in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)
    assert shmq(root, "topics", "list").stdout.split() == ["t"]
    assert "u" not in os.listdir(root.replica_dir())


# ------------------------------------------------------------ produce/consume
@pytest.mark.timeout(90)
def test_produce_lines_and_consume_them_back(root: Root) -> None:
    shmq(root, "topics", "create", "lines", "--partitions", "2", *SMALL)
    p = shmq(root, "produce", "lines", "--partition", "1", input="first\nsecond\n\nfourth\n")
    assert "Sent 4 records to lines." in p.stderr
    out = shmq(root, "consume", "lines", "--from-beginning", "--max-messages", "4").stdout
    assert out.splitlines() == ["first", "second", "", "fourth"]
    # Keyed lines go where Kafka's partitioner puts them; --verbose prints where.
    lines = [f"user{i}:event {i}" for i in range(12)]
    p = shmq(root, "produce", "lines", "--key-separator", ":", "--verbose", input="\n".join(lines) + "\n")
    placed = [tuple(re.fullmatch(r"lines-(\d+)@(\d+)", s).groups()) for s in p.stdout.split()]  # type: ignore[union-attr]
    assert [int(part) for part, _ in placed] == [kafka_partition(b"user%d" % i, 2) for i in range(12)]
    out = shmq(root, "consume", "lines", "--partition", "0", "--from-beginning", "--max-messages", "100",
               "--timeout-ms", "500", "--print-key", "--print-offset", "--print-partition",
               "--print-timestamp").stdout
    rows = [line.split("\t") for line in out.splitlines()]
    expect = [(f"user{i}", f"event {i}") for i in range(12) if kafka_partition(b"user%d" % i, 2) == 0]
    assert len(rows) == len(expect)
    for n, (row, (k, v)) in enumerate(zip(rows, expect)):
        assert re.fullmatch(r"CreateTime:\d{13}", row[0])
        assert row[1:] == ["Partition:0", f"Offset:{n}", k, v]
    # --offset with --partition; --json
    out = shmq(root, "consume", "lines", "--partition", "1", "--offset", "2", "--max-messages", "2", "--json").stdout
    recs = [json.loads(line) for line in out.splitlines()]
    assert [(r["partition"], r["offset"], r["key"], r["value"]) for r in recs] == [(1, 2, None, ""), (1, 3, None, "fourth")]
    assert set(recs[0]) == {"topic", "partition", "offset", "timestamp_ms", "key", "value", "headers"}
    assert recs[0]["topic"] == "lines" and recs[0]["headers"] == []
    # Without --from-beginning, consume starts at the end: nothing old shows.
    p = shmq(root, "consume", "lines", "--timeout-ms", "300")
    assert p.stdout == "" and "Processed a total of 0 messages" in p.stderr


@pytest.mark.timeout(90)
def test_consume_with_a_group_resumes_where_it_committed(root: Root) -> None:
    shmq(root, "topics", "create", "g", *SMALL)
    shmq(root, "produce", "g", input="".join(f"m{i}\n" for i in range(6)))
    a = shmq(root, "consume", "g", "--group", "cli", "--from-beginning", "--max-messages", "4").stdout
    assert a.split() == ["m0", "m1", "m2", "m3"]
    b = shmq(root, "consume", "g", "--group", "cli", "--from-beginning", "--timeout-ms", "500").stdout
    assert b.split() == ["m4", "m5"]


@pytest.mark.timeout(90)
def test_produce_and_consume_errors(root: Root) -> None:
    shmq(root, "topics", "create", "t", *SMALL)
    p = shmq(root, "produce", "nope", input="x\n", ok=False)
    assert p.returncode == 1 and "UnknownTopicOrPartition" in p.stderr
    p = shmq(root, "produce", "t", "--key-separator", ":", input="k:v\nnokey\n", ok=False)
    assert p.returncode == 1 and "line 2 has no key separator" in p.stderr
    p = shmq(root, "produce", "t", "--partition", "5", input="x\n", ok=False)
    assert p.returncode == 1 and "UnknownTopicOrPartition" in p.stderr
    p = shmq(root, "consume", "nope", "--timeout-ms", "100", ok=False)
    assert p.returncode == 1 and "UnknownTopicOrPartition" in p.stderr
    p = shmq(root, "consume", "t", "--offset", "3", "--timeout-ms", "100", ok=False)
    assert p.returncode == 1 and "--offset needs --partition" in p.stderr


# ---------------------------------------------------------- status/dump-log
@pytest.mark.timeout(90)
def test_status_shows_coordinator_topics_and_offsets(root: Root) -> None:
    shmq(root, "topics", "create", "s", "--partitions", "2", *SMALL)
    shmq(root, "produce", "s", "--partition", "1", input="a\nb\nc\n")
    out = shmq(root, "status").stdout
    pid = root.coordinator_pid()
    assert re.search(rf"Coordinator: pid {pid} on {re.escape(root.path)}, up \d+ s", out)
    assert "Topic s: 2 partitions" in out
    assert re.search(r"s-0: log start 0\s+log end 0\s+records 0", out)
    assert re.search(r"s-1: log start 0\s+log end 3\s+records 3", out)
    assert "Client processes:" in out and re.search(r"pid\s+\d+\s+.*cpu\s+[\d.]+ s\s+rss\s+[\d.]+ MB", out)


def test_status_and_group_describe_show_each_live_readers_position_and_lag(root: Root) -> None:
    from shmq import Consumer
    shmq(root, "topics", "create", "r", "--partitions", "1", *SMALL)
    shmq(root, "produce", "r", "--partition", "0", input="a\nb\nc\nd\n")
    with Consumer("r", root=root.path, group_id="audit", auto_offset_reset="earliest") as c:
        assert len(c.consume(3, timeout=10)) == 3
        out = shmq(root, "status").stdout
        assert re.search(rf"consumer 'audit' pid {os.getpid()}: position 3\s+lag 1", out), out
        out = shmq(root, "groups", "describe", "audit").stdout
        assert "POSITION" in out and re.search(rf"audit\s+r\s+0\s+-\s+4\s+-\s+.*{os.getpid()}\s+3\s+1", out), out


@pytest.mark.timeout(90)
def test_status_shows_how_many_records_an_overrun_reader_of_an_overwriting_topic_missed(root: Root) -> None:
    from shmq import Consumer, Producer, TopicPartition
    from shmq.errors import OffsetOutOfRange
    shmq(root, "topics", "create", "o", "--partitions", "1", *SMALL, "--config", "overflow=overwrite")
    tp = TopicPartition("o", 0)
    with Producer(root.path) as p, Consumer(root=root.path, auto_offset_reset="none") as c:
        for i in range(10):
            p.send("o", b"%08d" % i, partition=0)
        c.assign([tp])
        c.seek(tp, 0)
        assert [m.offset for m in c.consume(3, timeout=10)] == [0, 1, 2]
        for i in range(10, 40_000):             # ~3 MB through a 512 KiB ring that does not wait for readers
            p.send("o", b"%08d" % i, partition=0)
        with pytest.raises(OffsetOutOfRange) as ei:
            c.consume(10, timeout=10)
        missed = ei.value.missed
        assert missed > 30_000 and f"missed {missed} records" in str(ei.value)
        out = shmq(root, "status").stdout
        assert re.search(rf"consumer '[^']*' pid {os.getpid()}: position 3\s+lag 39997\s+missed {missed}\n", out), out


@pytest.mark.timeout(90)
def test_dump_log_prints_frames_batches_and_records(root: Root) -> None:
    shmq(root, "topics", "create", "d", *SMALL)
    shmq(root, "produce", "d", "--key-separator", "=", input="k1=hello\nk2=world\n")
    part = root.partition_dir("d", 0)
    out = shmq(root, "dump-log", part, "--records").stdout
    assert f"Dumping {part}/0.log" in out
    assert re.search(r"slot 0: segment \d+ active base offset 0 claim 2 records", out)
    batches = [line for line in out.splitlines() if line.startswith("position: ")]
    assert len(batches) == 2
    for n, line in enumerate(batches):
        assert f"baseOffset: {n} lastOffset: {n} count: 1" in line and "magic: 2" in line
        assert "isvalid: True" in line
    recs = [line for line in out.splitlines() if line.startswith("| ")]
    assert "offset: 0" in recs[0] and "key: k1 payload: hello" in recs[0]
    assert "offset: 1" in recs[1] and "key: k2 payload: world" in recs[1]
    js = [json.loads(line) for line in shmq(root, "dump-log", part, "--slot", "0", "--json").stdout.splitlines()]
    assert js[0]["segment"]["slot"] == 0 and js[0]["segment"]["claim_count"] == 2
    frames = [j for j in js if "baseOffset" in j]
    assert [f["baseOffset"] for f in frames] == [0, 1] and all(f["isvalid"] for f in frames)
    # The coordinator is not needed: dump-log reads the files.
    os.kill(root.coordinator_pid(), signal.SIGKILL)  # type: ignore[arg-type]
    deadline = time.monotonic() + 5
    while coordinator_alive(root) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "baseOffset: 1" in shmq(root, "dump-log", part).stdout
    assert not coordinator_alive(root)
    p = shmq(root, "dump-log", os.path.join(root.path, "nothing-here"), ok=False)
    assert p.returncode != 0 and "Traceback" not in p.stderr


# ------------------------------------------------------------------- serve
@pytest.mark.timeout(90)
def test_serve_runs_in_the_foreground_and_stops_on_sigterm(root: Root, reaper) -> None:  # type: ignore[no-untyped-def]
    log = open(os.path.join(root.path, "serve.out"), "wb")
    srv = subprocess.Popen([*SHMQ, "--root", root.path, "serve"], stdout=log, stderr=subprocess.STDOUT,
                           stdin=subprocess.DEVNULL, env=env_without_root())
    log.close()
    reaper.track(srv.pid)
    deadline = time.monotonic() + 30
    while root.coordinator_pid() != srv.pid:
        assert srv.poll() is None, open(os.path.join(root.path, "serve.out")).read()
        assert time.monotonic() < deadline, "serve did not become the active coordinator"
        time.sleep(0.02)
    # It answers: clients use it rather than starting their own.
    shmq(root, "topics", "create", "served", *SMALL)
    assert shmq(root, "topics", "list").stdout.split() == ["served"]
    assert f"pid {srv.pid}" in shmq(root, "status").stdout
    # A second `serve` gives up (another coordinator is active): exit status 3.
    second = subprocess.run([*SHMQ, "--root", root.path, "serve"], capture_output=True, timeout=30,
                            env=env_without_root())
    assert second.returncode == 3
    srv.send_signal(signal.SIGTERM)
    assert srv.wait(timeout=20) == 0
    assert not coordinator_alive(root)
    # What it stored survives: the next client starts a new coordinator.
    assert shmq(root, "topics", "list").stdout.split() == ["served"]


# -------------------------------------------------------------------- demo
@pytest.mark.timeout(120)
def test_demo_runs_to_its_verified_summary(root: Root) -> None:
    env = env_without_root()
    env["SHMQ_ROOT"] = root.path
    t0 = time.monotonic()
    p = subprocess.run(["shmq" if shutil.which("shmq") else SHMQ[0], *([] if shutil.which("shmq") else SHMQ[1:]),
                        "demo", "--producers", "2", "--consumers", "2", "--count", "20000"],
                       capture_output=True, text=True, timeout=90, env=env)
    took = time.monotonic() - t0
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert root.path in out
    m = re.search(r"Summary: sent ([\d,]+)\s+received ([\d,]+)\s+lost ([\d,]+)", out)
    assert m, out
    sent, received, lost = (int(g.replace(",", "")) for g in m.groups())
    assert sent == received == 40_000 and lost == 0
    assert re.search(r"throughput [\d.]+ M records/s", out)
    assert re.search(r"p50 [\d.]+ us\s+p99 [\d.]+ us", out)
    assert "Verified:" in out and "FAILED" not in out
    assert took < 60, f"demo took {took:.1f}s"
    # It cleaned up after itself: the coordinator (and replicas) it started are stopped ...
    assert root_processes(root) == {}
    # ... and its topic is gone from the root it used.
    assert shmq(root, "topics", "list").stdout.split() == []
