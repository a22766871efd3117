"""Faults: producers that die or stop between claim and commit, garbage in
the shared files, readers that fall behind an overwriting ring, producers
that wait on a full blocking ring.

Dead and stopped producers are made with the C core's fault-injection
switch, read from the environment when a process opens the log:
SHMQ_FAULT_INJECT=kill_after_claim:N (SIGKILL after this process's Nth claim:
header claimed, batch written, commit not done), stop_after_claim:N (SIGSTOP
at the same point), kill_before_header:N (SIGKILL after the fetch-add, before
the header CAS), stop_after_add:N (SIGSTOP once, right after the fetch-add
of the claim that would be the Nth, before the producer checks the slot's
generation again).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import random
import re
import signal
import struct
import time
import traceback
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import psutil
import pytest

from shmq.errors import (CorruptRecord, KafkaStorageError, KafkaTimeoutError, OffsetOutOfRange)
from shmq.native import lib
from shmq.ringlog import PartitionLog

CTX = mp.get_context("fork")
VALUE = struct.Struct("<IQ")  # producer id, sequence
UNBLOCK_MS = 200
SEEDS = int(os.environ.get("SHMQ_TEST_GARBAGE_SEEDS", "100"))


# ------------------------------------------------------------- processes

def _producer(path: str, pid: int, count: int, fault: Optional[str], q: Any, go: Any) -> None:
    """Append `count` records (pid, seq), pacing a little so the log keeps
    growing for a while; report the offsets append returned."""
    if fault:
        os.environ["SHMQ_FAULT_INJECT"] = fault
    log = PartitionLog(path)
    go.wait(30)
    offs = []
    for seq in range(count):
        offs.append(log.append(VALUE.pack(pid, seq)))
        if seq % 25 == 24:
            time.sleep(0.001)
    q.put(("producer", pid, offs))


def _collector(path: str, housekeeper_mode: bool, q: Any, stop: Any, budget: float) -> None:
    """Read from offset 0 until told to stop and caught up. With a
    housekeeper, read without waiting (so never unblocking by itself);
    otherwise use blocking reads, which pad over dead claims themselves.
    Reports every (offset, pid, seq) and the longest stall: time spent stuck
    at one position while the log end was beyond it."""
    try:
        log = PartitionLog(path)
        r = log.reader(0, check_crc=True)
        offs: List[int] = []
        vals: List[bytes] = []
        stuck_since: Optional[float] = None
        max_stall = 0.0
        deadline = time.monotonic() + budget
        while time.monotonic() < deadline:
            if housekeeper_mode:
                recs = r.read(4096)
                if not recs:
                    time.sleep(0.001)
            else:
                recs = r.read(4096, timeout=0.05)
            now = time.monotonic()
            if recs:
                offs.extend(x.offset for x in recs)
                vals.extend(x.value for x in recs)
                if stuck_since is not None:
                    max_stall = max(max_stall, now - stuck_since)
                    stuck_since = None
            elif log.end_offset > r.position:
                if stuck_since is None:
                    stuck_since = now
            else:
                stuck_since = None
                if stop.is_set() and r.position >= log.end_offset:
                    break
        q.put(("reader", offs, b"".join(vals), max_stall, r.position))
    except BaseException:  # noqa: BLE001
        q.put(("reader-error", traceback.format_exc()))


def _gather(q: Any, kinds: Dict[str, int], deadline: float, tick: Any = None) -> List[tuple]:
    out: List[tuple] = []
    want = sum(kinds.values())
    while len(out) < want and time.monotonic() < deadline:
        if tick is not None:
            tick()
        try:
            item = q.get(timeout=0.005 if tick else 0.2)
        except queue.Empty:
            continue
        assert item[0] != "reader-error", item[1]
        out.append(item)
    assert len(out) == want, f"only {[o[0] for o in out]} reported"
    return out


def _check_reader(reader: tuple, producers: Dict[int, List[int]], end: int) -> Tuple[set, np.ndarray, np.ndarray]:
    """Common checks; returns (missing offsets, pids, seqs) of what the reader saw."""
    _, offs, blob, max_stall, position = reader
    offs = np.asarray(offs, dtype=np.int64)
    vals = np.frombuffer(blob, dtype=np.uint8).reshape(len(offs), VALUE.size)
    pids = vals[:, :4].copy().view("<u4").ravel()
    seqs = vals[:, 4:].copy().view("<u8").ravel()
    assert (np.diff(offs) > 0).all(), "offsets strictly increasing"
    assert position == end
    for pid, returned in producers.items():
        mine = pids == pid
        assert offs[mine].tolist() == returned, f"producer {pid}: records at the offsets append returned"
        assert seqs[mine].tolist() == list(range(len(returned)))
    missing = set(range(end)) - set(offs.tolist())
    return missing, pids, seqs


def _await_self_stop(pid: int) -> psutil.Process:
    """Wait (20 s at most) until process pid has SIGSTOPped itself."""
    proc = psutil.Process(pid)
    deadline = time.monotonic() + 20
    while proc.status() != psutil.STATUS_STOPPED:
        assert time.monotonic() < deadline, "the producer never stopped itself"
        time.sleep(0.002)
    return proc


# ------------------------------------------------------ dead claims

@pytest.mark.timeout(60)
@pytest.mark.parametrize("fault", ["kill_after_claim", "kill_before_header"])
@pytest.mark.parametrize("housekeeper", [True, False], ids=["housekeeper", "reader-unblocks"])
def test_dead_claim_is_skipped_within_unblock_timeout_and_nothing_else_moves(shm_dir, reaper, fault,
                                                                              housekeeper):
    path = os.path.join(shm_dir, "dead-0")
    log = PartitionLog.create(path, segment_bytes=1 << 20, segment_count=4, unblock_timeout_ms=UNBLOCK_MS)
    q, go, stop = CTX.Queue(), CTX.Event(), CTX.Event()
    n_victim = 700  # dies at its 700th claim: 699 records committed
    victim = reaper.start(_producer, path, 9, 100_000, f"{fault}:{n_victim}", q, go)
    survivors = [reaper.start(_producer, path, p, 6000, None, q, go) for p in (1, 2)]
    reader = reaper.start(_collector, path, housekeeper, q, stop, 40)
    padded = 0

    def tick() -> None:
        nonlocal padded
        if housekeeper:
            padded += log.housekeep()
        if all(not s.is_alive() for s in survivors):
            stop.set()

    go.set()
    got = _gather(q, {"producer": 2, "reader": 1}, time.monotonic() + 45, tick)
    victim.join(5)
    assert victim.exitcode == -signal.SIGKILL
    producers = {item[1]: item[2] for item in got if item[0] == "producer"}
    rd = next(item for item in got if item[0] == "reader")
    end = log.end_offset
    assert end == 2 * 6000 + n_victim  # the dead claim's offset was assigned
    missing, pids, seqs = _check_reader(rd, producers, end)
    # the victim's committed records, in order; its dead claim is simply absent
    assert seqs[pids == 9].tolist() == list(range(n_victim - 1))
    assert len(missing) == 1, missing
    dead = missing.pop()
    assert not any(dead in offs for offs in producers.values())
    # later records kept their offsets (checked above) and some came after the dead claim
    assert max(max(o) for o in producers.values()) > dead
    # the reader moved past the dead claim within 5 x the unblock timeout
    assert rd[3] < 5 * UNBLOCK_MS / 1000, f"stalled {rd[3]:.3f}s"
    print(f"{fault}: dead claim at {dead} of {end}, longest reader stall {rd[3] * 1000:.0f} ms, padded {padded}")
    if housekeeper:
        assert padded >= 1
    reader.join(5)
    log.close()


@pytest.mark.timeout(60)
def test_stopped_producer_is_fenced_and_appends_again_at_a_later_offset(shm_dir, reaper):
    path = os.path.join(shm_dir, "stopped-0")
    log = PartitionLog.create(path, segment_bytes=1 << 20, segment_count=4, unblock_timeout_ms=UNBLOCK_MS)
    q, go, stop = CTX.Queue(), CTX.Event(), CTX.Event()
    n_stop = 500
    victim = reaper.start(_producer, path, 9, 1500, f"stop_after_claim:{n_stop}", q, go)
    survivors = [reaper.start(_producer, path, p, 6000, None, q, go) for p in (1, 2)]
    reader = reaper.start(_collector, path, True, q, stop, 40)
    go.set()
    proc = _await_self_stop(victim.pid)
    # the housekeeper pads over the stopped producer's claim
    padded = 0
    t0 = time.monotonic()
    while padded == 0:
        assert time.monotonic() - t0 < 5 * UNBLOCK_MS / 1000, "not padded within 5 x the unblock timeout"
        padded += log.housekeep()
        time.sleep(0.002)
    assert proc.status() == psutil.STATUS_STOPPED
    os.kill(victim.pid, signal.SIGCONT)

    def tick() -> None:
        log.housekeep()
        if all(not s.is_alive() for s in survivors) and not victim.is_alive():
            stop.set()

    got = _gather(q, {"producer": 3, "reader": 1}, time.monotonic() + 40, tick)
    victim.join(5)
    assert victim.exitcode == 0
    producers = {item[1]: item[2] for item in got if item[0] == "producer"}
    rd = next(item for item in got if item[0] == "reader")
    end = log.end_offset
    assert end == 2 * 6000 + 1500 + 1  # one offset went to the fenced first attempt
    missing, pids, seqs = _check_reader(rd, producers, end)  # every record exactly once, where append said
    assert len(missing) == 1, missing
    first_attempt = missing.pop()
    retried = producers[9][n_stop - 1]  # the record whose claim was fenced
    assert retried > first_attempt, "appended again at a later offset"
    assert (seqs[pids == 9] == n_stop - 1).sum() == 1
    reader.join(5)
    log.close()


@pytest.mark.timeout(60)
def test_producer_stopped_between_its_add_and_check_while_the_ring_turns_appends_in_the_new_segment(
        shm_dir, reaper):
    """A producer stops right after its fetch-add on the active segment; the
    overwriting ring then turns a whole lap and the same slot is ACTIVE again
    (a new generation, few records). Resumed, the producer must not take its
    old position as a claim in the new generation (it would write a frame
    into bytes another producer claims, losing one of the two): its add is
    void and it appends again at the log end. Every record is read back at
    the offset its append returned, CRCs checked, nothing reported corrupt."""
    path = os.path.join(shm_dir, "lapped-0")
    segs = 4
    log = PartitionLog.create(path, segment_bytes=64 << 10, segment_count=segs, overflow="overwrite",
                              unblock_timeout_ms=UNBLOCK_MS)
    q, go = CTX.Queue(), CTX.Event()
    n_stop = 300  # the first segment holds ~680 of the victim's records: the stop is mid-segment
    victim = reaper.start(_producer, path, 9, n_stop + 1, f"stop_after_add:{n_stop}", q, go)
    go.set()
    _await_self_stop(victim.pid)
    hdr = lib.shmq_log_header(log._h)
    assert int(hdr.active_seq) == 0
    # Other records, of another size (so frames of the two never line up),
    # until the victim's slot holds segment `segs` with a few records.
    mine: Dict[int, int] = {}
    seq = 0
    while int(hdr.active_seq) < segs:
        mine[log.append(struct.pack("<Q", seq) * 6)] = seq
        seq += 1
    for _ in range(10):
        mine[log.append(struct.pack("<Q", seq) * 6)] = seq
        seq += 1
    os.kill(victim.pid, signal.SIGCONT)
    kind, pid, offs = q.get(timeout=20)
    victim.join(10)
    assert victim.exitcode == 0 and kind == "producer"
    late = offs[n_stop]
    assert late >= max(mine), "the resumed append lands at the log end"
    for _ in range(800):  # fill the new segment past where the victim had stopped
        mine[log.append(struct.pack("<Q", seq) * 6)] = seq
        seq += 1
    r = log.reader(log.start_offset, check_crc=True)
    seen = {}
    while True:
        recs = r.read(4096)
        if not recs:
            break
        seen.update((x.offset, x.value) for x in recs)
    assert r.position == log.end_offset
    assert seen[late] == VALUE.pack(9, n_stop)
    for off, s in mine.items():
        if off >= log.start_offset:
            assert seen.get(off) == struct.pack("<Q", s) * 6, f"record at offset {off}"
    log.close()


# ------------------------------------------------------------ garbage

def _fill_offsets(log: PartitionLog, n: int, rng: random.Random) -> None:
    """Records whose values encode their own offset (varied sizes, keys,
    headers, batches), with timestamps = offset."""
    i = 0
    while i < n:
        if rng.random() < 0.3:
            k = rng.randint(1, 12)
            vals = [struct.pack("<Q", i + j) * rng.randint(1, 6) for j in range(k)]
            assert log.append_batch(vals, timestamp_ms=1000 + i) == i
            i += k
        else:
            v = struct.pack("<Q", i) * rng.randint(1, 20)
            hdrs = [("h", b"x" * rng.randint(0, 9))] if rng.random() < 0.3 else None
            assert log.append(v, key=b"k%d" % i if rng.random() < 0.5 else None, headers=hdrs,
                              timestamp_ms=1000 + i) == i
            i += 1


def _value_ok(off: int, value: Optional[bytes]) -> bool:
    return value is not None and len(value) % 8 == 0 and len(value) > 0 and \
        value == struct.pack("<Q", off) * (len(value) // 8)


def _garbage_reader(path: str, seed: int, q: Any) -> None:
    """Read everything, seek around, seek by time; report what happened."""
    rng = random.Random(seed)
    try:
        log = PartitionLog(path)
        start, end = log.start_offset, log.end_offset
        checked = 0
        wrong: List[str] = []
        r = log.reader(start, check_crc=True)
        for _ in range(2000):
            recs = r.read(rng.choice([1, 7, 100, 4096]))
            if not recs and r.position < end:
                # garbage may look like a claim in flight: a blocking read
                # waits out the unblock timeout and pads over it
                recs = r.read(100, timeout=0.3)
            if not recs:
                if r.position < end:  # nothing, no error, yet records are there
                    wrong.append(f"read stalls at {r.position} below the end {end}")
                break
            for x in recs:
                checked += 1
                # a batch's records share the timestamp of its first offset
                if not _value_ok(x.offset, x.value) or not 0 <= 1000 + x.offset - x.timestamp_ms < 12:
                    wrong.append(f"offset {x.offset}: {x.value!r:.40}")
        for _ in range(5):
            off = rng.randint(start, max(start, end - 1))
            r.seek(off)
            recs = r.read(5) or r.read(5, timeout=0.3)
            if not recs and off < end:
                wrong.append(f"seek {off}: read stalls below the end {end}")
            for x in recs:
                checked += 1
                if not _value_ok(x.offset, x.value) or x.offset < off:
                    wrong.append(f"seek {off} -> offset {x.offset}: {x.value!r:.40}")
        ts = rng.randint(900, 1000 + end + 10)
        found = r.seek_to_time(ts)
        # the first record with timestamp >= ts: records of a batch share the
        # timestamp of its first offset, so it is the next batch's when ts
        # falls inside one
        expect = start if ts <= 1000 + start else min(end, ts - 1000)
        recs = r.read(3) or r.read(3, timeout=0.3)
        if not expect <= found <= min(end, expect + 11):
            wrong.append(f"seek_to_time {ts} -> {found}, expected about {expect}")
        if not recs and found < end:
            wrong.append(f"seek_to_time {ts} -> {found}: read stalls below the end {end}")
        for k, x in enumerate(recs):
            checked += 1
            if not _value_ok(x.offset, x.value) or x.offset != found + k:
                wrong.append(f"seek_to_time {ts} -> {found}, offset {x.offset}")
        q.put(("ok" if not wrong else "wrong", checked, wrong[:5]))
    except (CorruptRecord, OffsetOutOfRange, KafkaStorageError) as e:
        q.put(("error", type(e).__name__, str(e), e.offset))
    except BaseException:  # noqa: BLE001
        q.put(("exception", traceback.format_exc()))


def _scribble(path: str, name: str, lo: int, hi: int, rng: random.Random) -> None:
    """Overwrite a few random runs of bytes in [lo, hi) of a file, with
    plain file writes (as a buggy or hostile process could)."""
    with open(os.path.join(path, name), "r+b") as f:
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(lo, max(lo + 1, hi))
            f.seek(at)
            f.write(rng.randbytes(rng.randint(1, 48)))


def _plausible_entries(path: str, name: str, seg: int, interval: int, words: int, rng: random.Random) -> None:
    with open(os.path.join(path, name), "r+b") as f:
        for _ in range(rng.randint(1, 3)):
            f.seek(rng.randrange(seg // interval) * 8 * words)
            entry = ((rng.randrange(seg // 8) + 1) << 32) | rng.randrange(400)
            f.write(struct.pack("<QQ", 1000 + rng.randrange(800), entry) if words == 2 else struct.pack("<Q", entry))


def _committed_bytes(path: str, slot: int, cap: int) -> int:
    with open(os.path.join(path, f"{slot}.log"), "rb") as f:
        seg = f.read()
    pos = 0
    while pos + 8 <= cap:
        (word,) = struct.unpack_from("<Q", seg, pos)
        length = word & 0xFFFFFFFF
        if length == 0 or length >= 1 << 31:
            break
        pos += length
    return pos


@pytest.mark.timeout(150)
@pytest.mark.parametrize("where", ["segment", "index", "timeindex", "control-block"])
def test_garbage_in_shared_files_is_a_clear_error_never_a_crash(shm_dir, reaper, where):
    outcomes: Dict[str, int] = {}
    seg, slots, interval = 8192, 4, 256
    for seed in range(SEEDS):
        rng = random.Random(seed * 7919 + len(where))
        path = os.path.join(shm_dir, f"garbage-{seed}")
        log = PartitionLog.create(path, segment_bytes=seg, segment_count=slots, index_interval_bytes=interval,
                                  unblock_timeout_ms=50)
        _fill_offsets(log, rng.randint(50, 700), rng)
        log.close()
        slot = rng.randrange(slots)
        if where == "segment":
            _scribble(path, f"{slot}.log", 0, _committed_bytes(path, slot, seg), rng)
        elif where == "index":
            if seed % 2:
                _scribble(path, f"{slot}.index", 0, (seg // interval) * 8, rng)
            else:  # entries that look right: (position / 8 + 1) << 32 | relative offset
                _plausible_entries(path, f"{slot}.index", seg, interval, 1, rng)
        elif where == "timeindex":
            if seed % 2:
                _scribble(path, f"{slot}.timeindex", 0, (seg // interval) * 16, rng)
            else:  # (timestamp, entry) pairs that look right
                _plausible_entries(path, f"{slot}.timeindex", seg, interval, 2, rng)
        else:
            _scribble(path, "partition.ctl", 512, 512 + slots * 128, rng)
        q = CTX.Queue()
        p = reaper.start(_garbage_reader, path, seed, q)
        try:
            res = q.get(timeout=20)
        except queue.Empty:
            res = ("hang",)
        p.join(5)
        assert p.exitcode is not None, f"seed {seed}: the reader hangs"
        assert p.exitcode >= 0, f"seed {seed}: the reader died by signal {-p.exitcode}"
        assert res[0] in ("ok", "error"), f"seed {seed}: {res}"
        if res[0] == "error":
            _, cls, msg, offset = res
            assert f"garbage-{seed}" in msg, msg
            assert re.search(r"offset -?\d+", msg), msg
        outcomes[res[0] if res[0] == "ok" else res[1]] = outcomes.get(res[0] if res[0] == "ok" else res[1], 0) + 1
        for name in os.listdir(path):
            os.unlink(os.path.join(path, name))
        os.rmdir(path)
    print(where, outcomes)
    if where in ("segment", "control-block"):
        # (index garbage may well be harmless: a reader that checks what it
        # finds there reads correct data; "ok" means every value was right)
        assert sum(v for k, v in outcomes.items() if k != "ok") >= 10, f"garbage mostly undetected: {outcomes}"


# ------------------------------------------------- overflow policies

def _offset_producer(path: str, seconds: float, q: Any) -> None:
    log = PartitionLog(path)
    i = log.end_offset
    t_end = time.monotonic() + seconds
    while time.monotonic() < t_end:
        for _ in range(50):
            assert log.append(struct.pack("<Q", i) * (1 + i % 7)) == i
            i += 1
    q.put(("producer", i))


def _slow_reader(path: str, rid: int, seconds: float, q: Any) -> None:
    rng = random.Random(rid)
    try:
        log = PartitionLog(path)

        def earliest() -> Any:
            # auto_offset_reset=earliest; the start may be recycled again
            # before the seek lands when the ring turns this fast: retry
            for _ in range(1000):
                try:
                    return log.reader(log.start_offset)
                except OffsetOutOfRange:
                    continue
            raise AssertionError("could never seek to the log start")

        r = earliest()
        checked = resets = 0
        wrong: List[str] = []
        last = -1
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            try:
                recs = r.read(rng.choice([1, 5, 64, 4096]), timeout=0.01)
            except OffsetOutOfRange as e:
                assert "ring-0" in str(e)
                resets += 1
                r = earliest()
                last = -1
                continue
            for x in recs:
                checked += 1
                if not _value_ok(x.offset, x.value) or x.offset <= last:
                    wrong.append(f"offset {x.offset} after {last}: {x.value!r:.40}")
                last = x.offset
            if rng.random() < 0.3:
                time.sleep(rng.random() * 0.004)  # fall behind now and then
        q.put(("reader", rid, checked, resets, wrong[:5]))
    except BaseException:  # noqa: BLE001
        q.put(("reader-error", traceback.format_exc()))


@pytest.mark.timeout(60)
def test_reader_behind_an_overwriting_ring_gets_out_of_range_never_recycled_bytes(shm_dir, reaper):
    path = os.path.join(shm_dir, "ring-0")
    log = PartitionLog.create(path, segment_bytes=8192, segment_count=3, overflow="overwrite")
    q = CTX.Queue()
    prod = reaper.start(_offset_producer, path, 4.0, q)
    readers = [reaper.start(_slow_reader, path, rid, 4.0, q) for rid in range(3)]
    got = _gather(q, {"x": 4}, time.monotonic() + 30)
    prod.join(5)
    for r in readers:
        r.join(5)
    assert prod.exitcode == 0
    results = [g for g in got if g[0] == "reader"]
    for _, rid, checked, resets, wrong in results:
        assert wrong == [], f"reader {rid} got recycled or misplaced bytes: {wrong}"
        assert checked > 1000
    assert sum(r[3] for r in results) > 0, "no reader ever fell behind: the test proves nothing"
    end = next(g[1] for g in got if g[0] == "producer")
    assert log.end_offset == end and log.start_offset > 0
    with pytest.raises(OffsetOutOfRange):
        log.reader(0)
    log.close()


@pytest.mark.timeout(30)
def test_full_blocking_ring_times_out_then_continues_when_readers_move(shm_dir):
    log = PartitionLog.create(os.path.join(shm_dir, "bounded-0"), segment_bytes=4096, segment_count=3,
                              overflow="block")
    log.set_slowest_position(0)
    n = 0
    t0 = time.monotonic()
    with pytest.raises(KafkaTimeoutError) as ei:
        while True:
            assert log.append(b"%08d" % n, timeout=0.2) == n
            n += 1
            assert time.monotonic() - t0 < 10
    waited = time.monotonic() - t0
    assert "bounded-0" in str(ei.value)
    assert n > 60, "three 4 KiB segments hold many small records"
    assert log.end_offset == n
    assert 0.2 <= waited < 2.0
    # still full: a batch times out too, quickly
    t1 = time.monotonic()
    with pytest.raises(KafkaTimeoutError):
        log.append_batch([b"x"] * 3, timeout=0.05)
    assert time.monotonic() - t1 < 1.0
    assert log.end_offset == n
    # the slowest reader moves past the oldest segment: room again
    recs = log.reader(0).read(10_000)
    assert [r.value for r in recs] == [b"%08d" % i for i in range(n)]
    log.set_slowest_position(n)
    assert log.append(b"after", timeout=0.2) == n
    assert log.start_offset > 0, "the oldest segment was recycled only now"
    # nothing the readers still needed was lost
    assert [r.offset for r in log.reader(log.start_offset).read(10_000)][-1] == n


def _blocked_producer(path: str, count: int, q: Any) -> None:
    log = PartitionLog(path)
    for i in range(count):
        assert log.append(b"%08d" % i) == i  # waits without limit when full
        if i % 20 == 0:
            q.put(("progress", i))
    q.put(("done", count))


@pytest.mark.timeout(60)
def test_producer_blocked_on_full_ring_goes_on_as_the_reader_reports_progress(shm_dir, reaper):
    path = os.path.join(shm_dir, "bounded-1")
    log = PartitionLog.create(path, segment_bytes=4096, segment_count=3, overflow="block")
    log.set_slowest_position(0)
    q = CTX.Queue()
    total = 3000
    p = reaper.start(_blocked_producer, path, total, q)
    # it fills the ring and blocks
    stalled_at = -1
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        e1 = log.end_offset
        time.sleep(0.3)
        if log.end_offset == e1 and e1 > 0:
            stalled_at = e1
            break
    assert stalled_at > 0 and p.is_alive()
    assert stalled_at < total
    # a reader consumes and reports its position; the producer follows
    r = log.reader(0)
    seen = 0
    deadline = time.monotonic() + 30
    while seen < total and time.monotonic() < deadline:
        recs = r.read(100, timeout=0.05)
        for x in recs:
            assert x.offset == seen and x.value == b"%08d" % seen
            seen += 1
        log.set_slowest_position(r.position)
    assert seen == total
    p.join(10)
    assert p.exitcode == 0
    log.close()
