"""The transaction coordinator: Kafka's transaction state machine, inside the coordinator.

Theory of operation. Each ``transactional_id`` has one entry in the store
(``Store.transactions``, journaled with the rest of the metadata as ``txn``
records holding the whole new entry): producer id and epoch, state,
``transaction_timeout_ms``, and for the transaction in progress the
partitions it wrote (each with the log end offset when it was added: no
record of the transaction is below it) and the offsets it commits per group.

States (Kafka's)::

    Empty --add partitions / offsets--> Ongoing --end_txn--> PrepareCommit --> CompleteCommit
                                           |                 PrepareAbort  --> CompleteAbort
                                           +--timeout, newer instance--> PrepareAbort (epoch bumped)

* The decision (Prepare*) is journaled before any marker is written; the
  markers, aborted ranges, offsets and the Complete* record follow. A
  coordinator that finds a Prepare* entry at start-up (its predecessor died
  in between) completes it before it serves anyone; doing a step twice is
  harmless (a second marker is one more control batch, an aborted run is
  published once, offsets are the same values).
* Producers append their records themselves, as soon as they are sent
  (Kafka's way), after the transaction's row in the partition's
  transaction index (``shmq/native/txn_index.h``) is open at the log end:
  ``add_partitions`` opens it for the producer (and registers the
  partition for the transactional id, for good), and the LSO readers stop
  at is the lowest open row. At completion an abort publishes the offset
  runs of the transaction's batches (found by scanning the log from the
  row's offset) before its marker; the row closes after the marker.
* A transaction on registered partitions alone, with no offsets, is run by
  the producer itself (its rows, its COMMIT markers through the
  producer-state table, then its rows closed): no call here. What is left
  of one whose producer went away (timeout, new instance) is ended by
  ``_end_stale_rows``; an abort, a new partition or offsets bring the
  transaction here, and its open rows with it (``_with_rows``).
* Fencing: ``init_producer_id`` of a new instance, or the timeout, bumps
  the epoch, fences the producer id at that epoch in the producer-state
  table and the row of every partition it ever added (an older instance's
  next append there fails with ``ProducerFenced``; before it can write
  elsewhere it must add the partition, which fails the same way) and only
  then scans and aborts.
* Offsets committed in a transaction are checked against the owner
  generation of each partition in the offsets table when sent and again at
  commit: a partition given to another member meanwhile turns the commit
  into an abort (``CommitFailed``), so two members never both commit
  output for the same input.

All methods run under the coordinator's lock.
"""
from __future__ import annotations

import copy
import logging
import os
import signal
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

from ..errors import (CommitFailed, ConcurrentTransactions, InvalidProducerIdMapping, InvalidRequest,
                      InvalidTxnState, LeaderNotAvailable, OffsetOutOfRange, ProducerFenced, ShmqError,
                      UnknownTopicOrPartition)
from ..native import lib
from ..ringlog import PartitionLog
from ..ringlog.producer_state import ProducerStateTable
from ..ringlog.txn import ABORT, COMMIT, TxnIndex, aborted_runs, commit_marker_in, control_batch
from ..root import Root, validate_group
from .durable import DurableStore

__all__ = ["TransactionCoordinator", "EMPTY", "ONGOING", "PREPARE_COMMIT", "PREPARE_ABORT", "COMPLETE_COMMIT",
           "COMPLETE_ABORT", "CRASH_ENV"]

log = logging.getLogger("shmq.coordinator.transactions")

EMPTY, ONGOING = "Empty", "Ongoing"
PREPARE_COMMIT, PREPARE_ABORT = "PrepareCommit", "PrepareAbort"
COMPLETE_COMMIT, COMPLETE_ABORT = "CompleteCommit", "CompleteAbort"
OPEN_STATES = (ONGOING, PREPARE_COMMIT, PREPARE_ABORT)
MAX_TIMEOUT_MS = 900_000           # Kafka's transaction.max.timeout.ms
# Fault injection for tests: the coordinator SIGKILLs itself right after it
# journaled the decision of this transactional id (before any marker).
CRASH_ENV = "SHMQ_TEST_TXN_CRASH_AFTER_DECISION"
SCAN_CHUNK = 1 << 20

LeaderLog = Callable[[str, int], Optional[PartitionLog]]


def _now_ms() -> int:
    return time.time_ns() // 1_000_000


def _tp(key: str) -> Tuple[str, int]:
    topic, _, p = key.rpartition("/")
    return topic, int(p)


class TransactionCoordinator:
    """Transactions of one root (see the module doc)."""

    def __init__(self, root: Root, db: DurableStore, leader_log: LeaderLog,
                 commit_offsets: Callable[[str, List[List[Any]]], None],
                 owner_generation: Callable[[str, str, int], int]) -> None:
        self.root = root
        self.db = db
        self._leader_log = leader_log
        self._commit_offsets = commit_offsets
        self._owner_generation = owner_generation
        self._indexes: Dict[Tuple[str, int], TxnIndex] = {}

    @property
    def txns(self) -> Dict[str, Dict[str, Any]]:
        return self.db.store.transactions

    # ------------------------------------------------------------ helpers
    def _index(self, topic: str, partition: int) -> TxnIndex:
        idx = self._indexes.get((topic, partition))
        if idx is None:
            self.root.makedirs(self.root.txn_dir)
            opened = TxnIndex.open(self.root.txn_index_path(topic, partition), create=True)
            assert opened is not None
            idx = self._indexes[(topic, partition)] = opened
        return idx

    def _journal(self, tid: str, txn: Optional[Dict[str, Any]], extra: Optional[List[Dict[str, Any]]] = None) -> None:
        self.db.commit([*(extra or []), {"op": "txn", "tid": tid, "txn": txn}])

    def _check(self, tid: Any, producer_id: Any, epoch: Any) -> Dict[str, Any]:
        if not isinstance(tid, str) or not tid:
            raise InvalidRequest(f"transactional_id must be a non-empty str, got {tid!r}")
        txn = self.txns.get(tid)
        if txn is None or txn["pid"] != producer_id:
            raise InvalidProducerIdMapping(f"transactional id {tid!r} is not mapped to producer id {producer_id} "
                                           f"(call init_transactions first)")
        if epoch != txn["epoch"]:
            raise ProducerFenced(f"transactional id {tid!r}: producer epoch {epoch} is not the current one "
                                 f"({txn['epoch']}): a newer instance took over or the transaction timed out")
        return txn

    def _keys(self, txn: Dict[str, Any]) -> List[str]:
        """Every partition where ``txn``'s producer may have a row: the ones it
        ever added (``registered``) and the open transaction's."""
        return sorted(set(txn.get("registered", ())) | set(txn["partitions"]))

    def _open_rows(self, txn: Dict[str, Any]) -> Dict[str, Tuple[int, int, int]]:
        """``{key: (epoch, first_offset, start_ms)}`` of the producer's open
        rows: the partitions of a transaction it runs itself (or of one the
        coordinator runs for it)."""
        out: Dict[str, Tuple[int, int, int]] = {}
        for key in self._keys(txn):
            topic, p = _tp(key)
            try:
                self.db.store.check_partition(topic, p)
            except UnknownTopicOrPartition:
                continue
            row = self._index(topic, p).row(txn["pid"])
            if row is not None and row[1] >= 0:
                out[key] = row
        return out

    # ------------------------------------------------------------ start-up
    def recover(self) -> None:
        """Finish what a predecessor decided, then publish every partition's LSO."""
        self.root.makedirs(self.root.txn_dir)   # read_committed readers make their indexes in it
        for tid, txn in list(self.txns.items()):
            if txn["state"] in (PREPARE_COMMIT, PREPARE_ABORT):
                log.info("completing transaction %r (%s) left by the previous coordinator", tid, txn["state"])
                try:
                    self._complete(tid)
                except ShmqError as e:
                    log.warning("completing transaction %r failed (retried): %s", tid, e)
        keys: Set[str] = {k for t in self.txns.values() for k in self._keys(t)}
        for name in os.listdir(self.root.txn_dir):
            topic, _, p = name.rpartition("-")
            if topic and p.isdigit():
                keys.add(f"{topic}/{p}")
        for key in sorted(keys):                 # a row writer may have died mid-change
            topic, p = _tp(key)
            try:
                self.db.store.check_partition(topic, p)
            except UnknownTopicOrPartition:
                continue
            self._index(topic, p).refresh_lso()

    def topic_deleted(self, name: str, partitions: int) -> None:
        """Forget the indexes of a deleted topic (a new topic of that name starts clean)."""
        for p in range(partitions):
            idx = self._indexes.pop((name, p), None)
            if idx is not None:
                idx.close()
            try:
                os.unlink(self.root.txn_index_path(name, p))
            except FileNotFoundError:
                pass

    # ---------------------------------------------------------- operations
    def init_producer_id(self, tid: Any, timeout_ms: Any) -> Tuple[int, int]:
        """Kafka's InitProducerId with a transactional id: finish or abort (and
        fence) the previous instance's transaction, then a bumped epoch."""
        if not isinstance(tid, str) or not tid:
            raise InvalidRequest(f"transactional_id must be a non-empty str, got {tid!r}")
        if not isinstance(timeout_ms, int) or isinstance(timeout_ms, bool) or not 1 <= timeout_ms <= MAX_TIMEOUT_MS:
            raise InvalidRequest(f"transaction_timeout_ms={timeout_ms!r} must be an int in [1, {MAX_TIMEOUT_MS}]")
        txn = self.txns.get(tid)
        if txn is not None and txn["state"] == ONGOING:
            self._fence_and_abort(tid, f"a new instance of {tid!r} called init_transactions")
        elif txn is not None and txn["state"] in (PREPARE_COMMIT, PREPARE_ABORT):
            self._complete(tid)
        registered = self.txns[tid].get("registered", []) if txn is not None else []
        rec = self.db.store.prepare_allocate_producer_id(tid)
        if rec["epoch"] > 32766:                     # the epoch is an int16: start over with a new id
            rec = self.db.store.prepare_allocate_producer_id(None)
            rec["transactional_id"] = tid
        new = {"pid": rec["producer_id"], "epoch": rec["epoch"], "state": EMPTY, "timeout_ms": timeout_ms,
               "partitions": {}, "offsets": {}, "start_ms": 0, "updated_ms": _now_ms(), "registered": registered}
        self._journal(tid, new, [rec])
        self._fence(new)
        self._end_stale_rows(tid)                    # an older instance's own transaction ends here
        return new["pid"], new["epoch"]

    def registered(self, tid: str) -> List[str]:
        """The partitions ``tid``'s producer may run its own transactions on
        (``"topic/partition"``): every one it ever added."""
        txn = self.txns.get(tid)
        return list(txn.get("registered", [])) if txn is not None else []

    def add_partitions(self, tid: Any, producer_id: Any, epoch: Any, partitions: Any) -> None:
        """Kafka's AddPartitionsToTxn: the producer may append to these next."""
        txn = self._check(tid, producer_id, epoch)
        if not isinstance(partitions, list) or not all(
                isinstance(tp, (list, tuple)) and len(tp) == 2 for tp in partitions):
            raise InvalidRequest("partitions must be a list of [topic, partition]")
        if txn.get("registered"):
            self._end_stale_rows(tid)                # a fenced instance's rows stand in the way
        new = self._begin(tid, txn)
        added: List[Tuple[str, int, int]] = []
        for topic, p in partitions:
            self.db.store.check_partition(topic, p)
            key = f"{topic}/{p}"
            if key in new["partitions"]:
                continue
            plog = self._leader_log(topic, p)
            if plog is None:
                raise LeaderNotAvailable(f"{topic}-{p} has no leader right now", topic=topic, partition=p)
            if not os.path.exists(os.path.join(plog.path, "producer.state")):
                ProducerStateTable.create(plog.path).close()   # unreplicated logs get one on first use
            start = plog.end_offset
            new["partitions"][key] = start
            if key not in new.setdefault("registered", []):
                new["registered"] = sorted([*new["registered"], key])
            added.append((topic, p, start))
        if added or new is not txn:
            self._journal(tid, new)
        # Journaled first: a successor knows the transaction before any reader
        # relies on the LSO, and the producer appends only after the answer.
        for topic, p, start in added:
            if not self._index(topic, p).open_row(new["pid"], new["epoch"], start, new["start_ms"]):
                raise ConcurrentTransactions(f"{topic}-{p}: a transaction of an older instance of {tid!r} is "
                                             f"still being ended; retry", topic=topic, partition=p)

    def add_offsets(self, tid: Any, producer_id: Any, epoch: Any, group_id: Any) -> None:
        """Kafka's AddOffsetsToTxn: the transaction will commit offsets of ``group_id``."""
        txn = self._check(tid, producer_id, epoch)
        validate_group(group_id)
        new = self._begin(tid, txn)
        if group_id not in new["offsets"]:
            new["offsets"][group_id] = {}
            self._journal(tid, new)
        elif new is not txn:
            self._journal(tid, new)

    def txn_offset_commit(self, tid: Any, producer_id: Any, epoch: Any, group_id: Any, offsets: Any,
                          generations: Any = None) -> None:
        """Kafka's TxnOffsetCommit: ``offsets`` ``[[topic, partition, offset, metadata]]``
        become the group's committed offsets when the transaction commits.
        ``generations`` ``{"topic/partition": generation}``: the generation in
        which the sending member owns each partition (absent: 0, no member)."""
        self.add_offsets(tid, producer_id, epoch, group_id)
        txn = self.txns[tid]
        if not isinstance(offsets, list):
            raise InvalidRequest("offsets must be a list of [topic, partition, offset, metadata]")
        gens = generations or {}
        if not isinstance(gens, dict):
            raise InvalidRequest("generations must be an object {\"topic/partition\": generation}")
        new = copy.deepcopy(txn)
        pending = new["offsets"][group_id]
        for item in offsets:
            if not isinstance(item, (list, tuple)) or len(item) not in (3, 4):
                raise InvalidRequest(f"each offset is [topic, partition, offset, metadata], got {item!r}")
            topic, p, off = item[0], item[1], item[2]
            meta = item[3] if len(item) == 4 and item[3] is not None else ""
            self.db.store.check_partition(topic, p)
            if not isinstance(off, int) or isinstance(off, bool) or off < 0:
                raise InvalidRequest(f"offset for {topic}-{p} must be a non-negative int, got {off!r}", topic=topic)
            if not isinstance(meta, str):
                raise InvalidRequest(f"offset metadata for {topic}-{p} must be a str", topic=topic)
            key = f"{topic}/{p}"
            gen = gens.get(key, 0)
            have = self._owner_generation(group_id, topic, p)
            if gen != have:
                raise CommitFailed(f"group {group_id!r}: {topic}-{p} is owned in generation {have}, not {gen}: "
                                   f"this member may not commit it (abort the transaction)", topic=topic, partition=p)
            pending[key] = [off, meta, gen]
        self._journal(tid, new)

    def end_txn(self, tid: Any, producer_id: Any, epoch: Any, commit: Any) -> None:
        """Kafka's EndTxn: commit or abort; returns once the markers are written."""
        if not isinstance(commit, bool):
            raise InvalidRequest(f"commit must be a bool, got {commit!r}")
        txn = self._check(tid, producer_id, epoch)
        state = txn["state"]
        done, prepared = (COMPLETE_COMMIT, PREPARE_COMMIT) if commit else (COMPLETE_ABORT, PREPARE_ABORT)
        rows = ({k: r for k, r in self._open_rows(txn).items() if r[0] == txn["epoch"]}
                if state not in OPEN_STATES and txn.get("registered") else {})
        if rows:
            state = ONGOING                         # one the producer began itself (its rows are open)
        elif state in (EMPTY, done):
            return                                  # nothing written, or a retry of a completed request
        if state == prepared:
            self._complete(tid)                     # a retry after the coordinator died mid-way
            return
        if state != ONGOING:
            # The other decision was taken (or is being completed): the transaction is over.
            if state in (PREPARE_COMMIT, PREPARE_ABORT):
                self._complete(tid)
            raise InvalidTxnState(f"transactional id {tid!r}: cannot {'commit' if commit else 'abort'}: the "
                                  f"transaction ended with {'commit' if 'Commit' in state else 'abort'} ({state})")
        failed: Optional[ShmqError] = None
        if commit:
            failed = self._stale_offsets(txn)
            if failed is not None:
                commit = False
        new = copy.deepcopy(txn)
        new["state"] = PREPARE_COMMIT if commit else PREPARE_ABORT
        new["updated_ms"] = _now_ms()
        self._with_rows(new)
        self._journal(tid, new)                     # the decision is durable before any marker
        if os.environ.get(CRASH_ENV) == tid:
            log.warning("%s=%s: dying between the decision and the markers", CRASH_ENV, tid)
            os.kill(os.getpid(), signal.SIGKILL)
        self._complete(tid)
        if failed is not None:
            raise failed

    def tick(self) -> bool:
        """Abort transactions past their timeout; retry completions that
        failed. Returns whether any transaction is still open."""
        now = _now_ms()
        running = False
        for tid, txn in list(self.txns.items()):
            try:
                if txn["state"] == ONGOING and now - txn["start_ms"] > txn["timeout_ms"]:
                    self._fence_and_abort(tid, f"transaction_timeout_ms={txn['timeout_ms']} passed")
                elif txn["state"] in (PREPARE_COMMIT, PREPARE_ABORT):
                    self._complete(tid)
                elif txn["state"] not in OPEN_STATES and txn.get("registered"):
                    # Transactions the producer runs itself: rows of an older
                    # epoch (a fenced instance's) or open past the timeout.
                    rows = self._open_rows(txn)
                    if any(e == txn["epoch"] and now - start > txn["timeout_ms"] for e, _f, start in rows.values()):
                        # Its producer went away (or is too slow): fence it, then end its transaction.
                        rec = self.db.store.prepare_allocate_producer_id(tid)
                        new = copy.deepcopy(txn)
                        new.update(epoch=rec["epoch"], updated_ms=now)
                        self._journal(tid, new, [rec])
                        log.info("ending the transaction producer %d of %r ran itself: transaction_timeout_ms=%d "
                                 "passed", new["pid"], tid, new["timeout_ms"])
                        self._fence(new)
                        rows = self._open_rows(new)
                    if any(e < self.txns[tid]["epoch"] for e, _f, _s in rows.values()):
                        self._end_stale_rows(tid)
                    else:
                        running = running or bool(rows)
            except ShmqError as e:
                log.warning("transaction %r: %s (retried)", tid, e)
        return running or any(t["state"] in OPEN_STATES for t in self.txns.values())

    def describe(self) -> List[Dict[str, Any]]:
        """Open transactions (for ``status``)."""
        now = _now_ms()
        out = []
        for tid, t in sorted(self.txns.items()):
            keys, state, start = dict(t["partitions"]), t["state"], t["start_ms"]
            if state not in OPEN_STATES:
                rows = self._open_rows(t) if t.get("registered") else {}
                if not rows:
                    continue
                keys, state = rows, ONGOING             # one its producer runs itself
                start = min(r[2] for r in rows.values())
            out.append({"transactional_id": tid, "producer_id": t["pid"], "epoch": t["epoch"], "state": state,
                        "age_ms": now - start, "timeout_ms": t["timeout_ms"],
                        "partitions": sorted(f"{_tp(k)[0]}-{_tp(k)[1]}" for k in keys),
                        "groups": sorted(t["offsets"])})
        return out

    def close(self) -> None:
        for idx in self._indexes.values():
            idx.close()
        self._indexes.clear()

    # ----------------------------------------------------------- internals
    def _begin(self, tid: str, txn: Dict[str, Any]) -> Dict[str, Any]:
        """The entry to change: the same dict copied if Ongoing, else a new transaction."""
        if txn["state"] == ONGOING:
            return copy.deepcopy(txn)
        if txn["state"] in (PREPARE_COMMIT, PREPARE_ABORT):
            raise ConcurrentTransactions(f"transactional id {tid!r}: the previous transaction is still completing")
        return {**txn, "state": ONGOING, "start_ms": _now_ms(), "updated_ms": _now_ms(), "partitions": {},
                "offsets": {}}

    def _stale_offsets(self, txn: Dict[str, Any]) -> Optional[ShmqError]:
        for group, offs in txn["offsets"].items():
            for key, (_off, _meta, gen) in offs.items():
                topic, p = _tp(key)
                try:
                    have = self._owner_generation(group, topic, p)
                except UnknownTopicOrPartition:
                    continue
                if have != gen:
                    return CommitFailed(f"group {group!r}: {topic}-{p} was given to another member (generation "
                                        f"{have}, the transaction's offsets are of generation {gen}); the "
                                        f"transaction was aborted", topic=topic, partition=p)
        return None

    def _fence_and_abort(self, tid: str, why: str) -> None:
        """Bump the epoch (the old instance is fenced everywhere), then abort."""
        txn = self.txns[tid]
        rec = self.db.store.prepare_allocate_producer_id(tid)
        new = copy.deepcopy(txn)
        self._with_rows(new)                        # rows of its epoch the producer opened itself
        new.update(epoch=rec["epoch"], state=PREPARE_ABORT, updated_ms=_now_ms())
        self._journal(tid, new, [rec])
        log.info("aborting transaction of %r (producer %d): %s", tid, new["pid"], why)
        self._fence(new)
        self._complete(tid)

    def _fence(self, txn: Dict[str, Any], keys: Optional[List[str]] = None, strict: bool = False) -> None:
        """Fence the producer id at ``txn``'s epoch in the row and the
        producer-state table of every partition it may write (or of ``keys``):
        an older instance can no longer open a transaction there, its next
        append or marker fails with ``ProducerFenced``, and none is in flight
        once this returns (the table's entry lock). A partition without a
        leader now keeps its row fenced and its table as it is (``strict``:
        ``LeaderNotAvailable``; whoever scans a partition fences it so first)."""
        for key in self._keys(txn) if keys is None else keys:
            topic, p = _tp(key)
            try:
                self.db.store.check_partition(topic, p)
            except UnknownTopicOrPartition:
                continue
            self._index(topic, p).fence_row(txn["pid"], txn["epoch"])
            try:
                plog = self._leader_log_or_none(topic, p)
            except LeaderNotAvailable:
                if strict:
                    raise
                continue
            if plog is None or not os.path.exists(os.path.join(plog.path, "producer.state")):
                continue
            table = ProducerStateTable(plog.path)
            try:
                table.fence(txn["pid"], txn["epoch"], timeout=5.0)
            except ProducerFenced:
                pass                                # already fenced higher
            finally:
                table.close()

    def _with_rows(self, txn: Dict[str, Any]) -> bool:
        """Add the producer's open rows to ``txn``'s partitions (with their
        first offsets); True if any was missing."""
        changed = False
        for key, (e, first, _start) in self._open_rows(txn).items():
            if e == txn["epoch"] and key not in txn["partitions"]:
                txn["partitions"][key] = first
                changed = True
        return changed

    def _end_stale_rows(self, tid: str) -> None:
        """End the transactions an older instance of ``tid`` was running itself
        and did not finish (its rows are open at an older epoch). The current
        epoch is fenced first (``_fence``: no record, marker or row of the older
        instance can follow), then the decision is the one the producer took:
        a COMMIT marker of its epoch in any of those partitions means commit
        (it closes no row before every marker is written), else abort. No
        journal record is needed: doing this again finds the same markers and
        decides the same, and the rows close last."""
        txn = self.txns[tid]
        pid, current = txn["pid"], txn["epoch"]
        rows = {k: r for k, r in self._open_rows(txn).items() if r[0] < current}
        if not rows:
            return
        self._fence(txn, sorted(rows), strict=True)
        committed = False
        for key, (epoch, first, _start) in sorted(rows.items()):
            topic, p = _tp(key)
            plog = self._leader_log_or_none(topic, p)
            if plog is not None and self._scan(plog, first, pid, commit_epoch=epoch)[1]:
                committed = True
                break
        log.info("%s the transaction producer %d (epoch %s) of %r ran itself and left open",
                 "committing" if committed else "aborting", pid, sorted({r[0] for r in rows.values()}), tid)
        marker = control_batch(COMMIT if committed else ABORT, pid, current)
        for key, (epoch, first, _start) in sorted(rows.items()):
            topic, p = _tp(key)
            plog = self._leader_log_or_none(topic, p)
            if plog is None:
                continue
            if not committed:
                runs = self._scan(plog, first, pid)[0]
                if runs:
                    self._index(topic, p).add_aborted(pid, runs)
            plog.append_raw(marker, timeout=5.0)
            self._index(topic, p).close_row(pid, epoch)

    def _leader_log_or_none(self, topic: str, p: int) -> Optional[PartitionLog]:
        try:
            self.db.store.check_partition(topic, p)
        except UnknownTopicOrPartition:
            return None
        plog = self._leader_log(topic, p)
        if plog is None:
            raise LeaderNotAvailable(f"{topic}-{p} has no leader: the transaction's markers wait for one",
                                     topic=topic, partition=p)
        return plog

    def _complete(self, tid: str) -> None:
        """Markers (and for an abort, the aborted runs first), offsets, then Complete*."""
        txn = self.txns[tid]
        commit = txn["state"] == PREPARE_COMMIT
        pid, epoch = txn["pid"], txn["epoch"]
        marker = control_batch(COMMIT if commit else ABORT, pid, epoch)
        for key, start in sorted(txn["partitions"].items()):
            topic, p = _tp(key)
            plog = self._leader_log_or_none(topic, p)
            if plog is None:
                continue                            # the topic was deleted
            if not commit:
                self._fence(txn, [key], strict=True)   # no record of its epoch can follow the scan
                runs = self._scan(plog, start, pid)[0]
                if runs:
                    self._index(topic, p).add_aborted(pid, runs)
            plog.append_raw(marker, timeout=5.0)
            self._index(topic, p).close_row(pid, epoch)    # after its marker: the LSO moves on
        if commit:
            for group, offs in txn["offsets"].items():
                items = []
                for key, (off, meta, _gen) in offs.items():
                    topic, p = _tp(key)
                    try:
                        self.db.store.check_partition(topic, p)
                    except UnknownTopicOrPartition:
                        continue
                    items.append([topic, p, off, meta])
                if items:
                    self._commit_offsets(group, items)
        new = copy.deepcopy(txn)
        new.update(state=COMPLETE_COMMIT if commit else COMPLETE_ABORT, partitions={}, offsets={},
                   updated_ms=_now_ms())
        self._journal(tid, new)

    def _scan(self, plog: PartitionLog, start: int, pid: int, commit_epoch: int = -1
              ) -> Tuple[List[Tuple[int, int]], bool]:
        """Offset runs of ``pid``'s transactional batches from ``start`` to the
        log end, and whether a COMMIT marker of ``pid`` at ``commit_epoch`` is among them."""
        end = plog.end_offset
        try:
            reader = plog.reader(max(start, plog.start_offset), tether=False)
        except OffsetOutOfRange:
            return [], False
        try:
            return self._scan_from(reader, plog, end, pid, commit_epoch)
        finally:
            reader.close()

    def _scan_from(self, reader: Any, plog: PartitionLog, end: int, pid: int, commit_epoch: int
                   ) -> Tuple[List[Tuple[int, int]], bool]:
        buf = bytearray(max(SCAN_CHUNK, plog.max_frame_bytes))
        runs: List[Tuple[int, int]] = []
        committed = False
        deadline = time.monotonic() + plog.config.unblock_timeout_ms / 1000 + 5.0
        while reader.position < end:
            n = reader.read_frames(buf)
            if n == 0:
                # A claim still open below the end: wait for its commit, or pad it after the unblock timeout.
                if time.monotonic() > deadline:
                    raise LeaderNotAvailable(f"{plog.name}: offset {reader.position} stayed incomplete while "
                                             f"aborting a transaction", topic=plog.topic, partition=plog.partition)
                rc = lib.shmq_log_unblock_cursor(plog._h, reader._cur, reader._unblock)
                if rc < 0:
                    plog._fail(rc, "unblock while aborting a transaction")
                time.sleep(0.001)
                continue
            got = aborted_runs(buf, n, pid)
            if got and runs and got[0][0] == runs[-1][1] + 1:
                runs[-1] = (runs[-1][0], got[0][1])      # a run split by the chunk boundary
                got = got[1:]
            runs.extend(got)
            committed = committed or (commit_epoch >= 0 and commit_marker_in(buf, n, pid, commit_epoch))
        return runs, committed
