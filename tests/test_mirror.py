"""`shmq mirror` against librdkafka's mock cluster (it ships in the
confluent-kafka wheel and lives as long as the confluent Producer that
started it, here in the test process): real mirror processes, SIGKILLed
mid-run and restarted; the destination must equal the source, partition by
partition, in order, with nothing missing and nothing twice."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Dict, Iterator, List, Optional, Tuple

import pytest

from kafka_support import stop_process
from shmq import Admin, Producer
from shmq.cluster import Cluster
from shmq.mirror import quiet_kafka_logger
from shmq.root import Root

ck = pytest.importorskip("confluent_kafka")

RECORDS = 200_000          # issue 12's count, across PARTITIONS partitions
PARTITIONS = 3
KILLS = 5
TIMEOUT = 60.0

Rec = Tuple[Optional[bytes], Optional[bytes], Tuple[Tuple[str, Optional[bytes]], ...], int]


_quiet = quiet_kafka_logger()


@pytest.fixture
def mock_kafka() -> Iterator[str]:
    """Bootstrap servers of a fresh mock cluster (one broker)."""
    owner = ck.Producer({"bootstrap.servers": "", "test.mock.num.brokers": 1, "logger": _quiet})
    md = owner.list_topics(timeout=10)
    yield ",".join(f"{b.host}:{b.port}" for b in md.brokers.values())
    del owner


class Mirror:
    """A `shmq mirror` process; its output goes to a file in the root."""

    def __init__(self, root: Root, *args: str) -> None:
        self.log_path = os.path.join(root.path, "mirror.out")
        self._out = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "shmq", "--root", root.path, "mirror",
                                      "--progress-interval", "0.5", *args],
                                     stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._out)

    def output(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)
        self._out.close()

    def stop(self) -> int:
        stop_process(self.proc, signal.SIGTERM, wait=20)  # type: ignore[arg-type]
        self._out.close()
        return int(self.proc.returncode)


def _produce_kafka(bs: str, topic: str, n: int, headers_every: int = 10) -> Dict[int, List[Rec]]:
    p = ck.Producer({"bootstrap.servers": bs, "linger.ms": 5, "logger": _quiet})
    sent: Dict[int, List[Rec]] = {q: [] for q in range(PARTITIONS)}
    for i in range(n):
        q = i % PARTITIONS
        hs = (("i", str(i).encode()), ("nil", None)) if i % headers_every == 0 else ()
        key = None if i % 7 == 0 else b"k%d" % i
        ts = 1_700_000_000_000 + i
        p.produce(topic, value=b"v%d" % i, key=key, partition=q, timestamp=ts, headers=list(hs) or None)
        sent[q].append((key, b"v%d" % i, hs, ts))
        if i % 5000 == 0:
            p.poll(0)
    assert p.flush(TIMEOUT) == 0
    return sent


def _read_shmq(root: Root, topic: str, partition: int) -> List[Rec]:
    c = Cluster(root)
    try:
        r = c.log(topic, partition).reader(0, tether=False)
        out: List[Rec] = []
        while True:
            recs = r.read(100_000)
            if not recs:
                return out
            out.extend((x.key, x.value, tuple(x.headers), x.timestamp_ms) for x in recs)
    finally:
        c.close()


def _shmq_total(root: Root, topic: str) -> int:
    try:
        d = Admin(root).describe_topic(topic)
    except Exception:
        return 0
    return sum(p.end_offset - p.start_offset for p in d.partitions)


def _wait(cond, timeout: float, what: str, mirror: Optional[Mirror] = None) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        if mirror is not None and mirror.proc.poll() is not None:
            raise AssertionError(f"the mirror exited ({mirror.proc.returncode}) waiting for {what}:\n"
                                 f"{mirror.output()[-3000:]}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}" +
                                 (f"; mirror output:\n{mirror.output()[-3000:]}" if mirror else ""))
        time.sleep(0.01)


# ------------------------------------------------------------ Kafka -> shmq
def test_from_kafka_keeps_keys_headers_timestamps(root: Root, mock_kafka: str) -> None:
    sent = _produce_kafka(mock_kafka, "orders.eu", 300, headers_every=2)
    m = Mirror(root, "--from", f"kafka://{mock_kafka}", "--topics", "orders.*", "--name", "t1")
    try:
        _wait(lambda: _shmq_total(root, "orders.eu") >= 300, TIMEOUT, "300 records", m)
        assert m.stop() == 0
    finally:
        m.kill()
    # The mock auto-creates topics with 4 partitions: the copy has as many.
    assert Admin(root).describe_topic("orders.eu").partition_count == 4
    for q in range(PARTITIONS):
        assert _read_shmq(root, "orders.eu", q) == sent[q]
    assert "records copied" in m.output()


def test_from_kafka_survives_kill9(root: Root, mock_kafka: str) -> None:
    sent = _produce_kafka(mock_kafka, "orders.all", RECORDS)
    args = ("--from", f"kafka://{mock_kafka}", "--topics", "orders.*", "--name", "chaos")
    for k in range(KILLS):
        m = Mirror(root, *args)
        try:
            target = (k + 1) * RECORDS // (KILLS + 2)
            _wait(lambda: _shmq_total(root, "orders.all") >= target, TIMEOUT, f"{target} records", m)
        finally:
            m.kill()                     # SIGKILL mid-run
        assert _shmq_total(root, "orders.all") < RECORDS, "the mirror finished before it was killed"
    m = Mirror(root, *args)
    try:
        _wait(lambda: _shmq_total(root, "orders.all") >= RECORDS, TIMEOUT, "every record", m)
        time.sleep(0.5)                  # anything extra would show now
        assert m.stop() == 0
    finally:
        m.kill()
    for q in range(PARTITIONS):
        got = _read_shmq(root, "orders.all", q)
        assert len(got) == len(sent[q]), f"partition {q}: {len(got)} records, the source has {len(sent[q])}"
        assert got == sent[q]


# ------------------------------------------------------------ shmq -> Kafka
def _produce_shmq(root: Root, topic: str, n: int, headers_every: int = 10) -> Dict[int, List[Rec]]:
    Admin(root).create_topic(topic, PARTITIONS)
    sent: Dict[int, List[Rec]] = {q: [] for q in range(PARTITIONS)}
    with Producer(root) as p:
        for i in range(n):
            q = i % PARTITIONS
            hs = (("i", str(i).encode()), ("nil", None)) if i % headers_every == 0 else ()
            key = None if i % 7 == 0 else b"k%d" % i
            ts = 1_700_000_000_000 + i
            p.send(topic, b"v%d" % i, key=key, partition=q, headers=list(hs) or None, timestamp_ms=ts)
            sent[q].append((key, b"v%d" % i, hs, ts))
    return sent


def _read_kafka(bs: str, topic: str, expect: int, timeout: float = TIMEOUT) -> Dict[int, List[Rec]]:
    """Every record a read_committed consumer sees in partitions 0..PARTITIONS-1
    (waits until ``expect`` are there and every partition reached its end)."""
    c = ck.Consumer({"bootstrap.servers": bs, "group.id": "verify", "isolation.level": "read_committed",
                     "enable.partition.eof": True, "logger": _quiet})
    got: Dict[int, List[Rec]] = {q: [] for q in range(PARTITIONS)}
    try:
        c.assign([ck.TopicPartition(topic, q, 0) for q in range(PARTITIONS)])
        eof: set = set()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (sum(map(len, got.values())) < expect or len(eof) < PARTITIONS):
            for m in c.consume(10_000, 0.2):
                if m.error() is not None:
                    eof.add(m.partition())
                    continue
                eof.discard(m.partition())
                hs = tuple((k, v) for k, v in (m.headers() or ()))
                got[m.partition()].append((m.key(), m.value(), hs, m.timestamp()[1]))
    finally:
        c.close()
    return got


class KafkaCount:
    """Offsets used in a topic's partitions (records plus transaction markers), from one client."""

    def __init__(self, bs: str, topic: str) -> None:
        self.topic = topic
        self.c = ck.Consumer({"bootstrap.servers": bs, "group.id": "probe", "logger": _quiet})

    def __call__(self) -> int:
        try:
            return sum(self.c.get_watermark_offsets(ck.TopicPartition(self.topic, q), timeout=5)[1]
                       for q in range(PARTITIONS))
        except ck.KafkaException:
            return 0

    def close(self) -> None:
        self.c.close()


def test_to_kafka_keeps_keys_headers_timestamps(root: Root, mock_kafka: str) -> None:
    sent = _produce_shmq(root, "orders.us", 300, headers_every=2)
    m = Mirror(root, "--to", f"kafka://{mock_kafka}", "--topics", "orders.*", "--name", "t2")
    try:
        got = _read_kafka(mock_kafka, "orders.us", 300)
        assert m.stop() == 0
    finally:
        m.kill()
    for q in range(PARTITIONS):
        assert got[q] == sent[q]
    assert "records copied" in m.output()


def test_to_kafka_survives_kill9(root: Root, mock_kafka: str) -> None:
    sent = _produce_shmq(root, "orders.all", RECORDS)
    args = ("--to", f"kafka://{mock_kafka}", "--topics", "orders.*", "--name", "chaos")
    total = KafkaCount(mock_kafka, "orders.all")
    try:
        for k in range(KILLS):
            m = Mirror(root, *args)
            try:
                target = (k + 1) * RECORDS // (KILLS + 2)
                _wait(lambda: total() >= target, TIMEOUT, f"{target} records", m)
            finally:
                m.kill()                 # SIGKILL mid-run
            assert total() < RECORDS, "the mirror finished before it was killed"
    finally:
        total.close()
    m = Mirror(root, *args)
    try:
        got = _read_kafka(mock_kafka, "orders.all", RECORDS)
        time.sleep(0.5)
        assert m.stop() == 0
        got2 = _read_kafka(mock_kafka, "orders.all", RECORDS)   # anything extra would show now
    finally:
        m.kill()
    for q in range(PARTITIONS):
        assert len(got[q]) == len(sent[q]), f"partition {q}: {len(got[q])} records, the source has {len(sent[q])}"
        assert got[q] == sent[q]
        assert got2[q] == sent[q]


# ------------------------------------------------ shmq's own listener as the source
def test_from_shmq_kafka_listener(root: Root, shm_dir: str) -> None:
    """Another shmq root served by `shmq serve --kafka`'s listener is a Kafka
    cluster like any other: native records there are copied here intact. The
    listener keeps offset commit metadata, so the mirror has no warning to give."""
    pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")
    from kafka_support import Listener
    from conftest import kill_coordinator
    src = Root(os.path.join(shm_dir, "src"))
    listener = Listener(src.path)
    try:
        sent = _produce_shmq(src, "orders.x", 3000, headers_every=3)
        m = Mirror(root, "--from", f"kafka://{listener.bootstrap}", "--topics", "orders.*", "--name", "l")
        try:
            _wait(lambda: _shmq_total(root, "orders.x") >= 3000, TIMEOUT, "3000 records", m)
            assert m.stop() == 0
        finally:
            m.kill()
        assert Admin(root).describe_topic("orders.x").partition_count == PARTITIONS
        for q in range(PARTITIONS):
            assert _read_shmq(root, "orders.x", q) == sent[q]
        assert "does not keep offset commit metadata" not in m.output()
    finally:
        listener.stop()
        kill_coordinator(src)


def test_from_kafka_into_replicated_topic_survives_kill9(root: Root, mock_kafka: str) -> None:
    """Into a replicated shmq topic the mirror commits only what the high
    watermark covers, and its restart scan reads the leader's log."""
    n = 30_000
    Admin(root).create_topic("orders.r", 4, {"replication_factor": 2, "min_insync_replicas": 1})
    sent = _produce_kafka(mock_kafka, "orders.r", n)
    args = ("--from", f"kafka://{mock_kafka}", "--topics", "orders.r", "--name", "repl")
    for k in range(2):
        m = Mirror(root, *args)
        try:
            target = (k + 1) * n // 4
            _wait(lambda: _shmq_total(root, "orders.r") >= target, TIMEOUT, f"{target} records", m)
        finally:
            m.kill()
        assert _shmq_total(root, "orders.r") < n, "the mirror finished before it was killed"
    m = Mirror(root, *args)
    try:
        _wait(lambda: _shmq_total(root, "orders.r") >= n, TIMEOUT, "every record", m)
        time.sleep(0.5)
        assert m.stop() == 0
    finally:
        m.kill()
    for q in range(PARTITIONS):
        assert _read_shmq(root, "orders.r", q) == sent[q]


def test_mirror_command_rejects_bad_arguments(root: Root, capsys: pytest.CaptureFixture) -> None:
    from shmq.cli.main import main
    for argv, says in ((["mirror", "--from", "kafka://nohost", "--topics", "a"], "is not HOST:PORT"),
                       (["mirror", "--from", "http://h:1", "--topics", "a"], "is not a kafka://HOST:PORT URL"),
                       (["mirror", "--from", "kafka://h:1", "--topics", "("], "not a valid regular expression"),
                       (["mirror", "--to", "kafka://h:1", "--to-root", root.path, "--topics", "a"], "--to-root goes")):
        assert main(["--root", root.path, *argv]) == 1
        assert says in capsys.readouterr().err
