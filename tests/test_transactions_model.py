"""Property test: random interleavings of begin / send / commit / abort /
crash of two transactional producers, each in its own process, and a plain
one, against a model of what each isolation level must return. A crash is a
new process with the same transactional id taking over, the old one either
SIGKILLed or left running as a zombie (its next send and its commit then
fail with ProducerFenced and nothing it wrote is visible). One coordinator
process for all examples, a fresh topic per example."""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import ShmqError

PARTS = 2
TIDS = 2

EXAMPLES = 100
KINDS = ["begin"] * 3 + ["send"] * 8 + ["commit", "abort", "crash"] + ["plain"] * 2
OPS = st.tuples(st.sampled_from(KINDS), st.integers(0, TIDS - 1), st.integers(0, PARTS - 1))


class Model:
    """Each partition: the records in append order, each (value, owner) where
    owner is None (plain) or (tid, transaction number); plus each
    transaction's fate: "open", "commit" or "abort"."""

    def __init__(self) -> None:
        self.parts: List[List[Tuple[bytes, Optional[Tuple[int, int]]]]] = [[] for _ in range(PARTS)]
        self.fate: Dict[Tuple[int, int], str] = {}
        self.current: Dict[int, Optional[int]] = {k: None for k in range(TIDS)}
        self.count = 0

    def committed_view(self, p: int) -> List[bytes]:
        recs = self.parts[p]
        stop = next((i for i, (_v, o) in enumerate(recs) if o is not None and self.fate[o] == "open"), len(recs))
        return [v for v, o in recs[:stop] if o is None or self.fate[o] == "commit"]


def _worker(root: str, tid: str, conn: Any) -> None:
    """A transactional producer run by commands from the test over a pipe;
    each answer is "ok" or the name of the error raised."""
    p = Producer(root, transactional_id=tid)
    p.init_transactions()
    conn.send("ok")
    calls = {"begin": p.begin_transaction, "commit": p.commit_transaction, "abort": p.abort_transaction,
             "send": lambda topic, v, part: p.send(topic, v, partition=part)}
    while True:
        op, args = conn.recv()
        try:
            calls[op](*args)
            conn.send("ok")
        except ShmqError as e:
            conn.send(type(e).__name__)


class Instance:
    """One process of a transactional id (started with init_transactions done)."""

    def __init__(self, root: str, tid: str) -> None:
        self.conn, child = mp.get_context("fork").Pipe()
        self.proc = mp.get_context("fork").Process(target=_worker, args=(root, tid, child), daemon=True)
        self.proc.start()
        child.close()
        self._answer("init_transactions")

    def _answer(self, what: str) -> str:
        assert self.conn.poll(30), f"the producer process did not answer {what} within 30 s"
        return self.conn.recv()

    def __call__(self, op: str, *args: Any) -> str:
        self.conn.send((op, args))
        return self._answer(op)

    def kill(self) -> None:
        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.join(5)
        self.conn.close()


def read_all(root: str, topic: str, isolation: str, p: int, want: int) -> List[bytes]:
    c = Consumer(root=root, isolation_level=isolation, auto_offset_reset="earliest")
    c.assign([TopicPartition(topic, p)])
    out: List[bytes] = []
    try:
        for _ in range(20):
            got = c.consume(1000, timeout=0.05 if len(out) < want else 0.01)
            out.extend(m.value for m in got)
            if len(out) >= want and not got:
                break
    finally:
        c.close()
    return out


@pytest.fixture(scope="module")
def txn_root(module_root: str) -> str:
    return module_root


_example = [0]


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=10, max_size=40))
def test_random_interleavings_match_the_model(txn_root: str, ops: List[Tuple]) -> None:  # type: ignore[type-arg]
    _example[0] += 1
    topic = f"model-{_example[0]}"
    with Admin(txn_root) as admin:
        admin.create_topic(topic, PARTS, config={"segment_bytes": 1 << 20, "segment_count": 4})
    model = Model()
    procs: List[Instance] = []

    def start(k: int) -> Instance:
        procs.append(Instance(txn_root, f"{topic}-tid-{k}"))
        return procs[-1]

    prods = {k: start(k) for k in range(TIDS)}
    plain = Producer(txn_root)
    n_txn = 0
    try:
        for op in ops:
            kind = op[0]
            if kind == "plain":
                v = b"p%d" % model.count
                model.count += 1
                plain.send(topic, v, partition=op[2])
                model.parts[op[2]].append((v, None))
                continue
            k = op[1]
            cur = model.current[k]
            if kind == "begin":
                if cur is None:
                    assert prods[k]("begin") == "ok"
                    n_txn += 1
                    model.current[k] = n_txn
                    model.fate[(k, n_txn)] = "open"
                else:
                    assert prods[k]("begin") == "IllegalState"
            elif kind == "send":
                v = b"t%d" % model.count
                model.count += 1
                if cur is None:
                    assert prods[k]("send", topic, v, op[2]) == "IllegalState"
                else:
                    assert prods[k]("send", topic, v, op[2]) == "ok"
                    model.parts[op[2]].append((v, (k, cur)))
            elif kind in ("commit", "abort"):
                if cur is None:
                    assert prods[k](kind) == "IllegalState"
                else:
                    assert prods[k](kind) == "ok"
                    model.fate[(k, cur)] = kind
                    model.current[k] = None
            elif kind == "crash":
                old = prods[k]
                event(f"crash: {'SIGKILL' if op[2] == 0 else 'zombie'}, {'in' if cur is not None else 'outside'} "
                      f"a transaction")
                if op[2] == 0:
                    old.kill()                           # SIGKILLed, mid-transaction or not
                prods[k] = start(k)                      # init_transactions: the old transaction is aborted
                if cur is not None:
                    model.fate[(k, cur)] = "abort"
                    model.current[k] = None
                if op[2] == 1:                           # the old process lives on as a zombie
                    if cur is None:
                        assert old("begin") == "ok"
                    assert old("send", topic, b"zombie", 0) == "ProducerFenced"
                    assert old("commit") == "ProducerFenced"
                    old.kill()
        for p in range(PARTS):
            everything = [v for v, _o in model.parts[p]]
            assert read_all(txn_root, topic, "read_uncommitted", p, len(everything)) == everything
            committed = model.committed_view(p)
            assert read_all(txn_root, topic, "read_committed", p, len(committed)) == committed
    finally:
        for inst in procs:
            inst.kill()
        plain.close()
