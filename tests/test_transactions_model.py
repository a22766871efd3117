"""Property test: random interleavings of begin / send / commit / abort /
crash (a new instance of the transactional id takes over) of two
transactional producers and a plain one, against a model of what each
isolation level must return. One coordinator process for all examples, a
fresh topic per example."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shmq import Admin, Consumer, Producer, TopicPartition
from shmq.errors import IllegalState

PARTS = 2
TIDS = 2

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


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(OPS, min_size=10, max_size=40))
def test_random_interleavings_match_the_model(txn_root: str, ops: List[Tuple]) -> None:  # type: ignore[type-arg]
    _example[0] += 1
    topic = f"model-{_example[0]}"
    with Admin(txn_root) as admin:
        admin.create_topic(topic, PARTS, config={"segment_bytes": 1 << 20, "segment_count": 4})
    model = Model()
    prods = {}
    for k in range(TIDS):
        prods[k] = Producer(txn_root, transactional_id=f"{topic}-tid-{k}")
        prods[k].init_transactions()
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
                    prods[k].begin_transaction()
                    n_txn += 1
                    model.current[k] = n_txn
                    model.fate[(k, n_txn)] = "open"
                else:
                    with pytest.raises(IllegalState):
                        prods[k].begin_transaction()
            elif kind == "send":
                v = b"t%d" % model.count
                model.count += 1
                if cur is None:
                    with pytest.raises(IllegalState):
                        prods[k].send(topic, v, partition=op[2])
                else:
                    prods[k].send(topic, v, partition=op[2])
                    model.parts[op[2]].append((v, (k, cur)))
            elif kind in ("commit", "abort"):
                if cur is None:
                    with pytest.raises(IllegalState):
                        (prods[k].commit_transaction if kind == "commit" else prods[k].abort_transaction)()
                else:
                    (prods[k].commit_transaction if kind == "commit" else prods[k].abort_transaction)()
                    model.fate[(k, cur)] = kind
                    model.current[k] = None
            elif kind == "crash":
                prods[k].close()
                prods[k] = Producer(txn_root, transactional_id=f"{topic}-tid-{k}")
                prods[k].init_transactions()             # the predecessor's transaction is aborted
                if cur is not None:
                    model.fate[(k, cur)] = "abort"
                    model.current[k] = None
        for p in range(PARTS):
            everything = [v for v, _o in model.parts[p]]
            assert read_all(txn_root, topic, "read_uncommitted", p, len(everything)) == everything
            committed = model.committed_view(p)
            assert read_all(txn_root, topic, "read_committed", p, len(committed)) == committed
    finally:
        for prod in prods.values():
            prod.close()
        plain.close()
