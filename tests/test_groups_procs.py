"""Consumer groups with real processes: throughput and ordering, a SIGKILLed
member, a member joining a busy group, and membership churn.

Every consumer process writes a log (one line per event, CLOCK_MONOTONIC
timestamps, comparable across processes):
``A topic partition gen ts`` assigned, ``R topic partition ts`` revoked (in
on_revoke, before the acknowledgement), ``L ...`` lost, ``M partition offset key
seq ts`` a record processed, ``C partition offset ts`` committed (after the
records before it were written), ``J ts`` subscribing, ``X ts`` closing.
"""
from __future__ import annotations

import collections
import glob
import multiprocessing as mp
import os
import random
import signal
import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

from shmq.admin import Admin
from shmq.root import Root

TOPIC = "work"
CFG = {"segment_bytes": 1 << 20, "segment_count": 4}


# ------------------------------------------------------------------ workers
def consumer_proc(root: str, group: str, name: str, out: str, stop: Any, opts: Optional[Dict[str, Any]] = None
                  ) -> None:
    """A group member that logs what it does (see the module doc)."""
    from shmq import errors
    from shmq.consumer import Consumer
    opts = dict(opts or {})
    commit_every = opts.pop("commit_every", 0.02)
    f = open(os.path.join(out, f"{name}.log"), "a", buffering=1 << 16)
    c = Consumer(group_id=group, root=root, auto_offset_reset="earliest", enable_auto_commit=False,
                 client_id=name, **opts)

    def on_assign(tps: List[Any]) -> None:
        now = time.monotonic()
        for tp in tps:
            f.write(f"A {tp.topic} {tp.partition} {c._gens.get(tp)} {now}\n")
        f.flush()

    def on_revoke(tps: List[Any]) -> None:
        f.flush()
        pos = {tp: c.position(tp) for tp in tps}
        c.commit(offsets=pos, asynchronous=True)
        now = time.monotonic()
        for tp in tps:
            f.write(f"C {tp.partition} {pos[tp]} {now}\nR {tp.topic} {tp.partition} {now}\n")
        f.flush()

    def on_lost(tps: List[Any]) -> None:
        now = time.monotonic()
        for tp in tps:
            f.write(f"L {tp.topic} {tp.partition} {now}\n")
        # A stale member's commits must be rejected.
        try:
            c.commit(offsets=last_pos or {tp: 0 for tp in tps}, asynchronous=False)
            f.write("CO\n")
        except errors.CommitFailed:
            f.write("CF\n")
        f.flush()

    last_pos: Dict[Any, int] = {}
    f.write(f"J {time.monotonic()}\n")
    c.subscribe([TOPIC], on_assign=on_assign, on_revoke=on_revoke, on_lost=on_lost)
    next_commit = time.monotonic() + commit_every
    while not stop.is_set():
        msgs = c.consume(500, timeout=0.05)
        if msgs:
            now = time.monotonic()
            for m in msgs:
                f.write(f"M {m.partition} {m.offset} {m.key.decode()} {m.value.decode().rsplit(':', 1)[1]} {now}\n")
                last_pos[(m.topic, m.partition)] = m.offset + 1
            f.flush()
        if time.monotonic() >= next_commit:
            f.flush()
            pos = {}
            for tp in c.assignment():
                try:
                    pos[tp] = c.position(tp)
                except Exception:
                    pass
            if pos:
                try:
                    c.commit(offsets=pos, asynchronous=True)
                    now = time.monotonic()
                    f.write("".join(f"C {tp.partition} {o} {now}\n" for tp, o in pos.items()))
                except errors.CommitFailed:
                    f.write("CF\n")
            next_commit = time.monotonic() + commit_every
    f.write(f"X {time.monotonic()}\n")
    f.flush()
    c.close(autocommit=False)
    f.close()


def producer_proc(root: str, name: str, count: int, seconds: float) -> None:
    """``count`` keyed records (200 keys, per-key sequence numbers) over about ``seconds``."""
    from shmq.producer import Producer
    p = Producer(root)
    keys = [f"{name}-k{i}" for i in range(200)]
    seq = [0] * len(keys)
    t0 = time.monotonic()
    chunk = 100
    for i in range(0, count, chunk):
        for j in range(i, min(count, i + chunk)):
            k = j % len(keys)
            p.send(TOPIC, f"{name}:{seq[k]}".encode(), key=keys[k].encode())
            seq[k] += 1
        ahead = t0 + seconds * (i + chunk) / count - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    p.flush()
    p.close()


# ------------------------------------------------------------------ helpers
def parse(out: str) -> Dict[str, Dict[str, Any]]:
    res = {}
    for path in glob.glob(os.path.join(out, "*.log")):
        name = os.path.basename(path)[:-4]
        d: Dict[str, Any] = {"M": [], "A": [], "R": [], "L": [], "C": [], "X": None, "CF": 0, "CO": 0}
        with open(path) as f:
            for line in f:
                w = line.split()
                if not w or (len(w) < 2 and w[0] not in ("CF", "CO")):
                    continue
                try:
                    if w[0] == "M":
                        d["M"].append((int(w[1]), int(w[2]), w[3], int(w[4]), float(w[5])))
                    elif w[0] in ("A",):
                        d["A"].append(((w[1], int(w[2])), float(w[4])))
                    elif w[0] in ("R", "L"):
                        d[w[0]].append(((w[1], int(w[2])), float(w[3])))
                    elif w[0] == "C":
                        d["C"].append((int(w[1]), int(w[2]), float(w[3])))
                    elif w[0] in ("X", "J"):
                        d[w[0]] = float(w[1])
                    elif w[0] in ("CF", "CO"):
                        d[w[0]] += 1
                except (ValueError, IndexError):
                    pass                        # a line cut by SIGKILL
        res[name] = d
    return res


def wait_all_committed(admin: Admin, group: str, timeout: float) -> Dict[Tuple[str, int], int]:
    deadline = time.monotonic() + timeout
    while True:
        d = admin.describe_group(group)
        ends = {p.partition: p.end_offset for p in admin.describe_topic(TOPIC).partitions}
        com = {p.partition: p.committed for p in d.partitions}
        if all(com.get(p) == e for p, e in ends.items()):
            return ends
        if time.monotonic() > deadline:
            raise AssertionError(f"not everything committed after {timeout}s: committed {com}, ends {ends}")
        time.sleep(0.1)


def check_complete_and_ordered(logs: Dict[str, Dict[str, Any]], ends: Dict[int, int]) -> Dict[int, collections.Counter]:
    """Every offset consumed; per-key sequences increase in each member's log; returns duplicate counts."""
    seen: Dict[int, collections.Counter] = {p: collections.Counter() for p in ends}
    for d in logs.values():
        for p, off, _key, _seq, _ts in d["M"]:
            seen[p][off] += 1
    for p, e in ends.items():
        missing = [o for o in range(e) if seen[p][o] == 0]
        assert not missing, f"partition {p}: {len(missing)} offsets never consumed, first {missing[:5]}"
    # Per-key order: by offset within each partition, a key's sequence numbers increase.
    by_off: Dict[int, Dict[int, Tuple[str, int]]] = {p: {} for p in ends}
    for d in logs.values():
        for p, off, key, seq, _ts in d["M"]:
            by_off[p][off] = (key, seq)
    for p, m in by_off.items():
        last2: Dict[str, int] = {}
        for off in sorted(m):
            key, seq = m[off]
            assert seq == last2.get(key, -1) + 1, f"partition {p} offset {off}: key {key} seq {seq} after {last2.get(key)}"
            last2[key] = seq
    return {p: collections.Counter({o: n for o, n in c.items() if n > 1}) for p, c in seen.items()}


def owned_at_end(d: Dict[str, Any]) -> set:
    own: set = set()
    ev = [(ts, "A", tp) for tp, ts in d["A"]] + [(ts, "R", tp) for tp, ts in d["R"]] + \
        [(ts, "R", tp) for tp, ts in d["L"]]
    for ts, kind, tp in sorted(ev):
        (own.add if kind == "A" else own.discard)(tp)
    return own


@pytest.fixture
def env(shm_dir: str, reaper):  # type: ignore[no-untyped-def]
    yield from group_env(shm_dir, reaper)


def group_env(shm_dir: str, reaper):  # type: ignore[no-untyped-def]
    """(root, admin, log dir); kills the test's processes and the coordinator afterwards."""
    admin = Admin(shm_dir)
    out = os.path.join(shm_dir, "logs")
    os.mkdir(out)
    try:
        yield shm_dir, admin, out
    finally:
        admin.close()
        reaper.cleanup()
        pid = Root(shm_dir).coordinator_pid()
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def assignment_of(admin: Admin, group: str) -> Dict[str, set]:
    d = admin.describe_group(group)
    return {m.client_id: set(m.assignment) for m in d.members}


def balanced(admin: Admin, group: str, members: int, partitions: int = 8) -> bool:
    d = admin.describe_group(group)
    sizes = sorted(len(m.assignment) for m in d.members)
    return (len(d.members) == members and sum(sizes) == partitions and sizes[-1] - sizes[0] <= 1
            and not any(m.revoking for m in d.members))


def wait_for(cond, timeout: float, what: str) -> float:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)
    return time.monotonic() - t0


# -------------------------------------------------------------------- tests
@pytest.mark.timeout(120)
def test_four_members_two_producers_200k_and_a_sigkilled_member(env, reaper) -> None:  # type: ignore[no-untyped-def]
    root, admin, out = env
    admin.create_topic(TOPIC, 8, CFG)
    stop = mp.get_context("fork").Event()
    # The victim (m1) commits only every 300 ms, so that it dies with an uncommitted span.
    members = {f"m{i}": reaper.start(consumer_proc, root, "g4", f"m{i}", out, stop,
                                     {"commit_every": 0.3 if i == 1 else 0.02}) for i in range(4)}
    wait_for(lambda: balanced(admin, "g4", 4), 30, "4 members owning 8 partitions")
    a0 = assignment_of(admin, "g4")
    assert all(len(a) == 2 for a in a0.values()), a0
    prods = [reaper.start(producer_proc, root, f"p{i}", 100_000, 5.0) for i in range(2)]
    time.sleep(2.0)
    victim = "m1"
    moved = a0[victim]
    t_kill = time.monotonic()
    os.kill(members[victim].pid, signal.SIGKILL)
    reassigned = wait_for(lambda: balanced(admin, "g4", 3), 10, "the victim's partitions to be reassigned")
    for p in prods:
        p.join(60)
        assert p.exitcode == 0
    ends = wait_all_committed(admin, "g4", 60)
    assert sum(ends.values()) == 200_000
    stop.set()
    for n, m in members.items():
        if n != victim:
            m.join(20)
    logs = parse(out)
    dups = check_complete_and_ordered(logs, ends)
    # Duplicates only in the victim's partitions, from its uncommitted span.
    v = logs[victim]
    last_commit = {p: max((o for pp, o, _ts in v["C"] if pp == p), default=0) for _t, p in moved}
    v_max = {p: max((o for pp, o, *_ in v["M"] if pp == p), default=-1) for _t, p in moved}
    for p, c in dups.items():
        if not c:
            continue
        assert (TOPIC, p) in moved, f"duplicates in partition {p} that did not move: {sorted(c)[:5]}"
        assert min(c) >= last_commit[p] and max(c) <= v_max[p], (p, min(c), max(c), last_commit[p], v_max[p])
    first = min(ts for n, d in logs.items() if n != victim for p, _o, _k, _s, ts in d["M"]
                if (TOPIC, p) in moved and ts > t_kill)
    ndup = sum(sum(c.values()) - len(c) for c in dups.values())
    print(f"\nSIGKILL -> partitions reassigned (seen by admin): {reassigned * 1000:.1f} ms; "
          f"kill -> first record consumed from a moved partition: {(first - t_kill) * 1000:.1f} ms; "
          f"duplicates: {ndup} (uncommitted span)")


@pytest.mark.timeout(120)
def test_member_joining_a_busy_group_does_not_stop_the_others(env, reaper) -> None:  # type: ignore[no-untyped-def]
    root, admin, out = env
    admin.create_topic(TOPIC, 8, CFG)
    stop = mp.get_context("fork").Event()
    for i in range(3):
        reaper.start(consumer_proc, root, "gj", f"m{i}", out, stop)
    wait_for(lambda: balanced(admin, "gj", 3), 30, "3 members")
    before = assignment_of(admin, "gj")
    prods = [reaper.start(producer_proc, root, f"p{i}", 40_000, 4.0) for i in range(2)]
    time.sleep(1.5)
    t_join = time.monotonic()
    reaper.start(consumer_proc, root, "gj", "m3", out, stop)
    wait_for(lambda: balanced(admin, "gj", 4), 20, "the 4th member's partitions")
    after = assignment_of(admin, "gj")
    for p in prods:
        p.join(60)
    ends = wait_all_committed(admin, "gj", 60)
    stop.set()
    time.sleep(0.5)
    logs = parse(out)
    check_complete_and_ordered(logs, ends)
    a3 = [ts for tp, ts in logs["m3"]["A"]]
    join_ms = (min(a3) - t_join) * 1000
    join_rpc_ms = (min(a3) - logs["m3"]["J"]) * 1000
    # Members that kept partitions: largest gap between records of kept partitions around the join.
    gaps, base = {}, {}

    def largest_gap(n: str, kept: set, t0: float, t1: float) -> float:
        ts = sorted(t for p, _o, _k, _s, t in logs[n]["M"] if p in kept and t0 <= t <= t1)
        assert ts, f"{n} consumed nothing from its kept partitions {kept} in [{t0}, {t1}]"
        return max(b - a for a, b in zip(ts, ts[1:])) * 1000 if len(ts) > 1 else 0.0

    for n in ("m0", "m1", "m2"):
        kept = {p for t, p in before[n] & after[n]}
        gaps[n] = largest_gap(n, kept, t_join - 0.1, t_join + 0.9)
        base[n] = largest_gap(n, kept, t_join - 1.1, t_join - 0.1)
        # It never got a revocation of a kept partition.
        assert not [tp for tp, _ts in logs[n]["R"] if tp in before[n] & after[n]]
    moved = sum(len(before[n] - after[n]) for n in before)
    print(f"\njoin: subscribe() -> first partition assigned to the new member {join_rpc_ms:.1f} ms "
          f"(fork -> assigned {join_ms:.0f} ms); "
          f"{moved} partitions moved; largest gap between records of the members keeping their partitions, "
          f"in the second after the join (ms): " + ", ".join(f"{n}={g:.1f}" for n, g in gaps.items())
          + "; in the second before it (baseline): " + ", ".join(f"{n}={g:.1f}" for n, g in base.items()))
    assert max(gaps.values()) < 1000, gaps


@pytest.mark.timeout(120)
def test_churn_no_partition_has_two_owners(env, reaper) -> None:  # type: ignore[no-untyped-def]
    root, admin, out = env
    admin.create_topic(TOPIC, 8, CFG)
    ctx = mp.get_context("fork")
    rnd = random.Random(4)
    live: Dict[str, Tuple[Any, Any]] = {}
    ended: Dict[str, float] = {}             # killed members: end of ownership
    n = 0

    def start() -> None:
        nonlocal n
        ev = ctx.Event()
        name = f"c{n}"
        n += 1
        live[name] = (reaper.start(consumer_proc, root, "gc", name, out, ev,
                                   {"heartbeat_interval_ms": 500}), ev)

    for _ in range(4):
        start()
    prods = [reaper.start(producer_proc, root, f"p{i}", 30_000, 8.0) for i in range(2)]
    t_end = time.monotonic() + 10.0
    while time.monotonic() < t_end:
        time.sleep(rnd.uniform(0.1, 0.4))
        if len(live) < 3 or (len(live) < 20 and rnd.random() < 0.55):
            start()
        else:
            name = rnd.choice(sorted(live))
            proc, ev = live.pop(name)
            if rnd.random() < 0.3:
                ended[name] = time.monotonic()
                os.kill(proc.pid, signal.SIGKILL)
            else:
                ev.set()
    for p in prods:
        p.join(60)
    ends = wait_all_committed(admin, "gc", 90)
    for _name, (proc, ev) in live.items():
        ev.set()
    for _name, (proc, ev) in live.items():
        proc.join(20)
    logs = parse(out)
    check_complete_and_ordered(logs, ends)
    # Ownership intervals per partition from every member's log.
    intervals: Dict[Tuple[str, int], List[Tuple[float, float, str]]] = collections.defaultdict(list)
    for name, d in logs.items():
        end_all = ended.get(name) or d["X"] or time.monotonic()
        ev_ = sorted([(ts, 0, tp) for tp, ts in d["A"]] + [(ts, 1, tp) for tp, ts in d["R"] + d["L"]])
        start_: Dict[Any, float] = {}
        for ts, kind, tp in ev_:
            if kind == 0:
                start_[tp] = ts
            elif tp in start_:
                intervals[tp].append((start_.pop(tp), ts, name))
        for tp, ts in start_.items():
            intervals[tp].append((ts, end_all, name))
    worst_unowned = 0.0
    for tp, iv in intervals.items():
        iv.sort()
        for (s1, e1, n1), (s2, e2, n2) in zip(iv, iv[1:]):
            assert s2 >= e1, f"{tp}: {n1} owned it until {e1:.4f} but {n2} got it at {s2:.4f}"
            worst_unowned = max(worst_unowned, s2 - e1)
    print(f"\nchurn: {n} members started, {len(ended)} SIGKILLed; "
          f"{sum(len(v) for v in intervals.values())} ownership intervals, never two owners; "
          f"longest unowned gap {worst_unowned * 1000:.0f} ms")
    assert worst_unowned < 5.0
