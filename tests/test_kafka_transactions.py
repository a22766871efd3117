"""Kafka clients reading transactional records through the listener (issue 13
with issue 12): a native transactional producer commits, aborts and leaves a
transaction open; a read_committed Kafka consumer (librdkafka's default)
sees exactly the committed records and stops at the last stable offset, a
read_uncommitted one sees every data record; ListOffsets answers the LSO
to read_committed clients."""
from __future__ import annotations

import time
from typing import Any, Dict, Iterator, List, Tuple

import pytest

from kafka_support import Listener, listener_for
from shmq import Admin, Producer
from shmq.root import Root

pytest.importorskip("kio", reason="the Kafka listener needs kio (pip install shmq[kafka])")

TIMEOUT = 60.0
TOPIC = "txw"
PARTS = 2
Rec = Tuple[int, int, bytes]          # partition, offset, value


@pytest.fixture
def kafka(root: Root) -> Iterator[Listener]:
    yield from listener_for(root.path)


class Scenario:
    """Plain records, transaction A committed, B aborted, C committed (the same
    producer id: its records after B's ABORT must be kept), more plain
    records, then D left open with plain records after it."""

    def __init__(self, root: Root) -> None:
        with Admin(root.path) as admin:
            admin.create_topic(TOPIC, PARTS)
        self.plain = Producer(root.path)
        self.txp = Producer(root.path, transactional_id="kafka-wire-txn")
        self.txp.init_transactions()
        self.committed: List[Rec] = []     # what read_committed must return, in offset order per partition
        self.everything: List[Rec] = []    # every data record
        self.after_open: List[Rec] = []    # plain records above D's first offset (in everything too)
        self.open_first: Dict[int, int] = {}
        self._plain("P0", 6, self.committed)
        for tag, commit in (("A", True), ("B", False), ("C", True)):
            self.txp.begin_transaction()
            got = self._txn(tag, 40)
            if commit:
                self.txp.commit_transaction()
                self.committed += got
            else:
                self.txp.abort_transaction()
                self.committed += [r for r in got if r[2].startswith(b"P")]
        self._plain("P1", 6, self.committed)
        self.txp.begin_transaction()
        for p in range(PARTS):
            md = self.txp.send(TOPIC, b"D-first-%d" % p, partition=p)
            self.open_first[p] = md.offset
            self.everything.append((p, md.offset, b"D-first-%d" % p))
        self._plain("P2", 6, self.after_open)

    def _plain(self, tag: str, n: int, into: List[Rec]) -> None:
        for i in range(n):
            v = f"{tag}-{i}".encode()
            md = self.plain.send(TOPIC, v, key=v, partition=i % PARTS, headers=[("src", b"plain")])
            into.append((md.partition, md.offset, v))
            self.everything.append((md.partition, md.offset, v))

    def _txn(self, tag: str, n: int) -> List[Rec]:
        """Transactional records with plain ones in between (several aborted runs per transaction)."""
        out: List[Rec] = []
        for i in range(n):
            v = f"{tag}-{i}".encode()
            md = self.txp.send(TOPIC, v, key=v, partition=i % PARTS, headers=[("txn", tag.encode())])
            out.append((md.partition, md.offset, v))
            if i % 7 == 3:
                pv = f"P{tag}-{i}".encode()
                pmd = self.plain.send(TOPIC, pv, partition=i % PARTS)
                out.append((pmd.partition, pmd.offset, pv))
        self.everything += out
        return out

    def close(self) -> None:
        self.txp.close()
        self.plain.close()


def ordered(recs: List[Rec]) -> List[Rec]:
    return sorted(recs)


@pytest.fixture
def scenario(root: Root) -> Iterator[Scenario]:
    s = Scenario(root)
    try:
        yield s
    finally:
        s.close()


def _ck_consume(bs: str, want: int, settle: float = 1.5, **conf: Any) -> List[Rec]:
    ck = pytest.importorskip("confluent_kafka")
    c = ck.Consumer({"bootstrap.servers": bs, "group.id": "txn-readers", "enable.auto.commit": False,
                     "auto.offset.reset": "earliest", **conf})
    c.assign([ck.TopicPartition(TOPIC, p, ck.OFFSET_BEGINNING) for p in range(PARTS)])
    got: List[Rec] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(got) < want and time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.5):
                assert m.error() is None, m.error()
                got.append((m.partition(), m.offset(), m.value()))
        end = time.monotonic() + settle            # nothing beyond what is expected arrives
        while time.monotonic() < end:
            got += [(m.partition(), m.offset(), m.value()) for m in c.consume(500, timeout=0.2)
                    if m.error() is None]
    finally:
        c.close()
    return got


def test_confluent_kafka_read_committed_by_default(kafka: Listener, scenario: Scenario) -> None:
    got = _ck_consume(kafka.bootstrap, len(scenario.committed))
    assert ordered(got) == ordered(scenario.committed)
    for p in range(PARTS):                          # stopped below the open transaction
        assert max(o for pp, o, _ in got if pp == p) < scenario.open_first[p]
    assert not any(v.startswith((b"B-", b"D-", b"P2")) for _p, _o, v in got)


def test_confluent_kafka_read_committed_one_batch_per_fetch(kafka: Listener, scenario: Scenario) -> None:
    """Fetches that start and end inside aborted transactions (tiny fetch
    sizes): the client still drops exactly the aborted records."""
    got = _ck_consume(kafka.bootstrap, len(scenario.committed), **{"message.max.bytes": 1000, "fetch.max.bytes": 1000,
                                                                   "max.partition.fetch.bytes": 1})
    assert ordered(got) == ordered(scenario.committed)


def test_confluent_kafka_read_uncommitted_sees_every_data_record(kafka: Listener, scenario: Scenario) -> None:
    got = _ck_consume(kafka.bootstrap, len(scenario.everything), settle=0.5, **{"isolation.level": "read_uncommitted"})
    assert ordered(got) == ordered(scenario.everything)


@pytest.mark.parametrize("end", ["commit", "abort"])
def test_read_committed_moves_on_when_the_open_transaction_ends(kafka: Listener, scenario: Scenario,
                                                                end: str) -> None:
    """A consumer waiting at the LSO: when D ends, it reads on from there (D's
    record only if D committed) to the plain records after it."""
    ck = pytest.importorskip("confluent_kafka")
    c = ck.Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": "waiter", "auto.offset.reset": "earliest",
                     "enable.auto.commit": False})
    c.assign([ck.TopicPartition(TOPIC, p, ck.OFFSET_BEGINNING) for p in range(PARTS)])
    got: List[Rec] = []
    try:
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(scenario.committed) and time.monotonic() < deadline:
            got += [(m.partition(), m.offset(), m.value()) for m in c.consume(500, timeout=0.5) if m.error() is None]
        assert ordered(got) == ordered(scenario.committed)
        lo, hi = c.get_watermark_offsets(ck.TopicPartition(TOPIC, 0), timeout=10, cached=False)
        time.sleep(0.5)                             # the client is fetching at the LSO meanwhile
        if end == "commit":
            scenario.txp.commit_transaction()
        else:
            scenario.txp.abort_transaction()
        want = scenario.committed + scenario.after_open
        if end == "commit":
            want += [r for r in scenario.everything if r[2].startswith(b"D-")]
        deadline = time.monotonic() + TIMEOUT
        while len(got) < len(want) and time.monotonic() < deadline:
            got += [(m.partition(), m.offset(), m.value()) for m in c.consume(500, timeout=0.5) if m.error() is None]
        end_at = time.monotonic() + 1.0
        while time.monotonic() < end_at:
            got += [(m.partition(), m.offset(), m.value()) for m in c.consume(500, timeout=0.2) if m.error() is None]
        assert ordered(got) == ordered(want)
    finally:
        c.close()
    assert (lo, hi) == (0, scenario.open_first[0])      # ListOffsets latest, read_committed: the LSO


def test_kafka_python_read_committed_and_list_offsets(kafka: Listener, scenario: Scenario) -> None:
    kp = pytest.importorskip("kafka")
    tps = [kp.TopicPartition(TOPIC, p) for p in range(PARTS)]
    out: Dict[str, List[Rec]] = {}
    ends: Dict[str, Dict[int, int]] = {}
    for level in ("read_committed", "read_uncommitted"):
        c = kp.KafkaConsumer(bootstrap_servers=kafka.bootstrap, isolation_level=level, enable_auto_commit=False,
                             auto_offset_reset="earliest")
        try:
            c.assign(tps)
            c.seek_to_beginning()
            want = len(scenario.committed if level == "read_committed" else scenario.everything)
            got: List[Rec] = []
            deadline = time.monotonic() + TIMEOUT
            while len(got) < want and time.monotonic() < deadline:
                for _tp, msgs in c.poll(500).items():
                    got += [(m.partition, m.offset, m.value) for m in msgs]
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for _tp, msgs in c.poll(200).items():
                    got += [(m.partition, m.offset, m.value) for m in msgs]
            out[level] = got
            ends[level] = {tp.partition: off for tp, off in c.end_offsets(tps).items()}
        finally:
            c.close()
    assert ordered(out["read_committed"]) == ordered(scenario.committed)
    assert ordered(out["read_uncommitted"]) == ordered(scenario.everything)
    # ListOffsets latest: the LSO for read_committed, the high watermark otherwise.
    assert ends["read_committed"] == scenario.open_first
    for p in range(PARTS):
        assert ends["read_uncommitted"][p] == max(o for pp, o, _ in scenario.everything if pp == p) + 1


def test_aiokafka_read_committed(kafka: Listener, scenario: Scenario) -> None:
    aiokafka = pytest.importorskip("aiokafka")
    import asyncio

    async def run() -> List[Rec]:
        c = aiokafka.AIOKafkaConsumer(bootstrap_servers=kafka.bootstrap, isolation_level="read_committed",
                                      enable_auto_commit=False, auto_offset_reset="earliest")
        await c.start()
        got: List[Rec] = []
        try:
            c.assign([aiokafka.TopicPartition(TOPIC, p) for p in range(PARTS)])
            await c.seek_to_beginning()
            deadline = time.monotonic() + TIMEOUT
            while len(got) < len(scenario.committed) and time.monotonic() < deadline:
                for msgs in (await c.getmany(timeout_ms=500)).values():
                    got += [(m.partition, m.offset, m.value) for m in msgs]
            end = time.monotonic() + 1.0
            while time.monotonic() < end:
                for msgs in (await c.getmany(timeout_ms=200)).values():
                    got += [(m.partition, m.offset, m.value) for m in msgs]
        finally:
            await c.stop()
        return got
    got = asyncio.run(asyncio.wait_for(run(), 2 * TIMEOUT))
    assert ordered(got) == ordered(scenario.committed)


# ------------------------------------------------- the aborted list, batch by batch
def _batch(base: int, pid: int, transactional: bool = True) -> bytes:
    """A RecordBatch v2 header with no records (what the aborted list reads of a batch)."""
    import struct
    from shmq.ringlog.txn import ATTR_TRANSACTIONAL
    attrs = ATTR_TRANSACTIONAL if transactional else 0
    return struct.pack(">qiibIhiqqqhii", base, 49, 0, 2, 0, attrs, 0, 0, 0, pid, 0, 0, 0)


def _marker(marker: int, base: int, pid: int) -> bytes:
    import struct
    from shmq.ringlog.txn import control_batch
    return struct.pack(">q", base) + control_batch(marker, pid, 0)[8:]


@pytest.mark.parametrize("start, want", [(10, [(7, 10)]), (12, [(7, 12)]), (13, [(7, 13)]), (14, [])])
def test_aborted_list_has_one_entry_per_aborted_transaction(start: int, want: List[Tuple[int, int]]) -> None:
    """pid 7: an aborted transaction in two runs (10, 12) around a plain batch
    (11), its ABORT at 13, then a committed one (14, COMMIT at 15). librdkafka
    pops one entry per ABORT marker, so the list names each aborted
    transaction once, a fetch starting at its marker included."""
    import numpy as np
    from shmq.kafka.api_data import _aborted_transactions, _Part
    from shmq.ringlog.txn import ABORT, COMMIT
    log = {10: _batch(10, 7), 11: _batch(11, -1, False), 12: _batch(12, 7), 13: _marker(ABORT, 13, 7),
           14: _batch(14, 7), 15: _marker(COMMIT, 15, 7)}
    runs = np.array([[7, 10, 10], [7, 12, 12]], dtype=np.int64)

    class Txn:
        seen = 2
        index = object()

        def aborted_runs(self, lo: int, hi: int) -> Any:
            return runs[(runs[:, 2] >= lo) & (runs[:, 1] <= hi)]
    p = _Part(TOPIC, 0, start, 1 << 20, True)
    p.txn = Txn()  # type: ignore[assignment]
    p.chunks = [b for off, b in sorted(log.items()) if off >= start]
    assert [(e["producer_id"], e["first_offset"]) for e in _aborted_transactions(p)] == want
