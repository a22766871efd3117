"""Run every workload on shmq and on each peer: fresh processes per run, a
warm-up, repeats, medians, a hard bound per run.

One run of (peer, workload):

1. the parent makes a private directory under /dev/shm and the peer's channel
   in it (a fresh shmq root + topic, a queue, a private redis-server, ...);
2. it starts fresh consumer and producer processes (``forkserver``: every child
   is forked from a clean server process that only imported the benchmark, so
   its RSS is its own); each opens the channel, reports ready and waits;
3. on "go" the producers send, the consumers receive and check every message
   (count + checksum of the tags); each child measures its own CPU time
   (``getrusage``) and peak RSS and writes a result file;
4. the parent joins them until the bound, kills what is left (the run is then
   PARTIAL: the consumers' progress counters give what arrived), adds the CPU
   time of the system's server process (redis-server, shmq coordinator), tears
   the channel down and removes the directory.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from .peers import PEERS, Handle, Peer
from .workloads import (PRODUCER_SHIFT, SENTINEL, U64, U64x2, ChildResult, Workload, all_workloads)

perf_ns = time.perf_counter_ns
RECV_T = 0.1
IDLE_STOP = 5      # receives timed out in a row, every producer done: the consumer stops (no end marker came)
# shared int64 progress slots: [0..3] received per consumer, [4..7] producers done
P_GOT, P_DONE = 0, 4

_CTX: Optional[Any] = None


def context() -> Any:
    global _CTX
    if _CTX is None:
        try:
            _CTX = mp.get_context("forkserver")
            _CTX.set_forkserver_preload(["perf.suite"])
        except ValueError:  # pragma: no cover - no forkserver on this platform
            _CTX = mp.get_context("spawn")
    return _CTX


# ================================================================ children

def child_main(peer_name: str, env: Dict[str, Any], wd: Dict[str, Any], role: str, idx: int, shared: Any,
               ready: Any, go: Any, result_path: str) -> None:
    w = Workload(**{k: v for k, v in wd.items() if k != "key"})
    res = ChildResult(role, idx)
    lat: List[int] = []
    h: Optional[Handle] = None
    try:
        peer = PEERS[peer_name]
        h = peer.producer(env, w, idx) if role == "producer" else peer.consumer(env, w, idx)
        ready.release()
        if not go.wait(120):
            raise RuntimeError("no go signal")
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        res.t_start = perf_ns()
        if role == "producer":
            produce(h, w, idx, res)
            h.close()
            res.t_end = perf_ns()
            shared[P_DONE + idx] = 1
        else:
            consume(h, w, idx, res, shared, lat)
            shared[P_GOT + idx] = res.count
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        res.cpu_s = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        if role == "consumer":
            h.close()
    except BaseException as e:  # report, never hang the parent
        res.error = f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=6)}"
        try:
            ready.release()
        except Exception:
            pass
    res.maxrss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = asdict(res)
    out["checksum"] = res.checksum & SENTINEL
    if lat:
        np.save(result_path + ".npy", np.asarray(lat, dtype=np.int64))
    with open(result_path + ".tmp", "w") as f:
        json.dump(out, f)
    os.replace(result_path + ".tmp", result_path)


def produce(h: Handle, w: Workload, idx: int, res: ChildResult) -> None:
    n = w.per_producer()[idx]
    base = idx << PRODUCER_SHIFT
    sends = h.sends
    k = len(sends)
    pack = U64.pack
    if w.kind == "lat":
        _paced(sends[0], w, n, base)
    elif w.mode == "single":
        tail = bytes(w.size - 8)
        if k == 1:
            s = sends[0]
            for i in range(base, base + n):
                s(pack(i) + tail)
        else:   # message i to channel i % k, without an index per message
            for i, s in zip(range(base, base + n), itertools.cycle(sends)):
                s(pack(i) + tail)
    else:
        rows = w.batch
        batches = h.batches
        nb = n // rows
        if h.batch_numpy:
            arr = np.zeros((rows, w.size), dtype=np.uint8)
            arr[:, 8:] = 0
            col = arr[:, :8].view("<u8")[:, 0]
            seq = np.arange(rows, dtype=np.uint64)
            for b in range(nb):
                np.add(seq, base + b * rows, out=col)
                batches[b % k](arr)
        else:
            tail = bytes(w.size - 8)
            for b in range(nb):
                first = base + b * rows
                batches[b % k]([pack(i) + tail for i in range(first, first + rows)])
        left = n - nb * rows
        for i in range(base + nb * rows, base + n):  # not a whole batch (only if counts were odd)
            sends[0](pack(i) + bytes(w.size - 8))
        assert left >= 0
    res.count = n
    end = pack(SENTINEL) + bytes(w.size - 8)
    per_channel = -(-w.consumers // k)
    for s in sends:
        for _ in range(per_channel):
            s(end)


def _paced(send: Any, w: Workload, n: int, base: int) -> None:
    tail = bytes(w.size - 16)
    pack = U64x2.pack
    interval = int(1e9 / w.rate)
    nxt = perf_ns() + interval
    for i in range(base, base + n):
        now = perf_ns()
        while now < nxt:
            now = perf_ns()
        if now - nxt > 20 * interval:   # descheduled far behind: do not burst to catch up
            nxt = now
        nxt += interval
        send(pack(i, perf_ns()) + tail)


def consume(h: Handle, w: Workload, idx: int, res: ChildResult, shared: Any, lat: List[int]) -> None:
    need = w.producers if w.consumers == 1 else 1
    st = {"got": 0, "sum": 0, "sent": 0, "idle": 0, "t_idle": 0}

    def stop_on_idle() -> bool:
        """A receive timed out: stop if every producer is done and nothing came for two timeouts."""
        if st["idle"] == 0:
            st["t_idle"] = perf_ns() - int(RECV_T * 1e9)
        st["idle"] += 1
        if st["idle"] >= IDLE_STOP and all(shared[P_DONE + i] for i in range(w.producers)):
            res.t_end = st["t_idle"]
            res.error = None
            res.exit = "idle"
            return True
        return False

    u = U64.unpack_from
    if w.kind == "lat":
        _consume_latency(h, w, res, need, lat, shared, idx)
        return
    if w.mode == "batch" or h.recv is None:
        _consume_batches(h, w, idx, res, shared, need, st, stop_on_idle)
        return
    got = s = sent = 0
    recv, k = h.recv, h.unwrap
    prog = shared
    slot = P_GOT + idx
    while True:
        m = recv(RECV_T)
        if m is None:
            st["got"], st["sum"] = got, s
            prog[slot] = got
            if stop_on_idle():
                break
            continue
        st["idle"] = 0
        x = u(m if k is None else m[k])[0]
        if x == SENTINEL:
            sent += 1
            if sent >= need:
                res.t_end = perf_ns()
                break
            continue
        s += x
        got += 1
        if not got & 1023:
            prog[slot] = got
    res.count, res.checksum, res.sentinels = got, s, sent


def _consume_batches(h: Handle, w: Workload, idx: int, res: ChildResult, shared: Any, need: int,
                     st: Dict[str, int], stop_on_idle: Any) -> None:
    got = s = sent = 0
    u = U64.unpack_from
    recv_batch = h.recv_batch
    slot = P_GOT + idx
    while True:
        b = recv_batch(RECV_T)
        if b is None:
            shared[slot] = got
            if stop_on_idle():
                break
            continue
        st["idle"] = 0
        if isinstance(b, np.ndarray):
            tags = np.ascontiguousarray(b[:, :8]).view("<u8").ravel()
            ns = int(np.count_nonzero(tags == SENTINEL))
            if ns:
                tags = tags[tags != SENTINEL]
            s += int(tags.sum(dtype=np.uint64))
            got += len(tags)
        else:
            xs = [u(v)[0] for v in b]
            ns = xs.count(SENTINEL)
            if ns:
                xs = [x for x in xs if x != SENTINEL]
            s += sum(xs)
            got += len(xs)
        shared[slot] = got
        if ns:
            sent += ns
            if sent > need and h.requeue is not None and w.consumers > 1:
                end = U64.pack(SENTINEL) + bytes(w.size - 8)
                for _ in range(sent - need):
                    h.requeue(end)
                sent = need
            if sent >= need:
                res.t_end = perf_ns()
                break
    res.count, res.checksum, res.sentinels = got, s, sent


def _consume_latency(h: Handle, w: Workload, res: ChildResult, need: int, lat: List[int], shared: Any,
                     idx: int) -> None:
    u = U64x2.unpack_from
    k = h.unwrap
    got = s = sent = 0
    append = lat.append
    spin = w.consumer == "spin"
    if spin:
        recv = h.recv_nowait
    elif h.recv is not None:
        recv = h.recv
    else:                               # batch-only consumer (Redis): every value of a batch
        rb = h.recv_batch
        pending: List[Any] = []

        def recv(timeout: float) -> Any:
            if not pending:
                b = rb(timeout)
                if not b:
                    return None
                pending.extend(reversed(b))
            return pending.pop()
    if recv is None:
        raise RuntimeError("no receive for this consumer mode")
    while True:
        m = recv() if spin else recv(RECV_T)
        if m is None:
            continue
        now = perf_ns()
        x, ts = u(m if k is None else m[k])
        if x == SENTINEL:
            sent += 1
            if sent >= need:
                break
            continue
        append(now - ts)
        s += x
        got += 1
        if not got & 255:
            shared[P_GOT + idx] = got
    res.t_end = perf_ns()
    res.count, res.checksum, res.sentinels = got, s, sent


# ================================================================== parent

def _cpu_of(pids: Sequence[int]) -> Dict[int, float]:
    import psutil
    out = {}
    for pid in pids:
        try:
            t = psutil.Process(pid).cpu_times()
            out[pid] = t.user + t.system
        except psutil.Error:
            pass
    return out


def _rss_of(pids: Sequence[int]) -> Dict[int, int]:
    import psutil
    out = {}
    for pid in pids:
        try:
            out[pid] = psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return out


def run_once(peer: Peer, w: Workload, timeout: float, base: Optional[str] = None) -> Dict[str, Any]:
    """One run in fresh processes; returns its figures (see the module doc)."""
    ctx = context()
    if base is None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = tempfile.mkdtemp(prefix="shmq-bench-", dir=base)
    out: Dict[str, Any] = {"n": w.count}
    procs: List[Any] = []
    env: Optional[Dict[str, Any]] = None
    t_begin = time.monotonic()
    try:
        env = peer.setup(w, tmp, ctx)
        shared = ctx.RawArray("q", 8)
        ready, go = ctx.Semaphore(0), ctx.Event()
        deadline = time.monotonic() + timeout
        # consumers first, and ready (bound, subscribed) before any producer connects
        for group in ([("consumer", i) for i in range(w.consumers)], [("producer", i) for i in range(w.producers)]):
            for role, i in group:
                path = os.path.join(tmp, f"{role}-{i}.json")
                p = ctx.Process(target=child_main, args=(peer.name, env, w.as_dict(), role, i, shared, ready, go,
                                                         path), daemon=True, name=f"bench-{peer.name}-{role}-{i}")
                p.start()
                procs.append((role, i, p, path))
            for _ in group:
                if not ready.acquire(timeout=max(0.1, deadline - time.monotonic())):
                    raise TimeoutError("children did not get ready")
        time.sleep(0.05 if w.consumers > 1 else 0.01)   # let sockets finish connecting (zmq)
        server = peer.server_pids(env)
        cpu0 = _cpu_of(server)
        t_go = time.monotonic()
        go.set()
        run_deadline = t_go + timeout
        for _, _, p, _ in procs:
            p.join(max(0.0, run_deadline - time.monotonic()))
        killed = [f"{r}-{i}" for r, i, p, _ in procs if p.is_alive()]
        elapsed = time.monotonic() - t_go
        cpu1 = _cpu_of(server)
        srv_rss = _rss_of(server)
        for _, _, p, _ in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results = []
        for role, i, p, path in procs:
            try:
                with open(path) as f:
                    r = json.load(f)
                if os.path.exists(path + ".npy"):
                    r["latency_ns"] = np.load(path + ".npy")
                results.append(r)
            except (OSError, ValueError):
                results.append({"role": role, "index": i, "error": f"no result (exit code {p.exitcode})"})
        out.update(_figures(w, results, shared, killed, elapsed, sum(cpu1.get(p, 0) - c for p, c in cpu0.items()),
                            srv_rss))
    except Exception as e:
        out.update(partial=True, ok=False, error=f"{type(e).__name__}: {e}")
    finally:
        for _, _, p, _ in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        if env is not None:
            try:
                peer.teardown(env)
            except Exception as e:
                out.setdefault("error", f"teardown: {type(e).__name__}: {e}")
        shutil.rmtree(tmp, ignore_errors=True)
    out["wall_s"] = time.monotonic() - t_begin
    return out


def _figures(w: Workload, results: List[Dict[str, Any]], shared: Any, killed: List[str], elapsed: float,
             server_cpu: float, server_rss: Dict[int, int]) -> Dict[str, Any]:
    cons = [r for r in results if r["role"] == "consumer"]
    prods = [r for r in results if r["role"] == "producer"]
    errors = [f"{r['role']}-{r['index']}: {r['error']}" for r in results if r.get("error")]
    got = sum(r.get("count", 0) for r in cons) if not killed else sum(int(shared[P_GOT + i])
                                                                      for i in range(w.consumers))
    checksum = sum(r.get("checksum", 0) for r in cons) & SENTINEL
    f: Dict[str, Any] = {"got": got, "partial": bool(killed or errors)}
    if killed:
        f["killed"] = killed
    if errors:
        f["errors"] = errors
    f["ok"] = (not f["partial"]) and got == w.count and checksum == w.expected_checksum()
    f["lossy"] = (not f["partial"]) and not f["ok"]
    exits = sorted({r.get("exit", "?") for r in cons})
    if exits != ["end-marker"]:
        f["consumer_exit"] = exits
    if f["lossy"]:
        f["check"] = (f"received {got} of {w.count}, checksum {'ok' if checksum == w.expected_checksum() else 'BAD'}"
                      f", consumers stopped by {'/'.join(exits)}")
    t0 = min((r["t_start"] for r in prods if r.get("t_start")), default=0)
    t1 = max((r["t_end"] for r in cons if r.get("t_end")), default=0)
    if f["partial"] or not (t1 > t0 > 0):
        f["rate"] = got / elapsed if elapsed > 0 else 0.0
    else:
        f["rate"] = got / ((t1 - t0) / 1e9)
    f["mb_s"] = f["rate"] * w.size / 1e6
    cpu = sum(r.get("cpu_s", 0.0) for r in results) + max(0.0, server_cpu)
    if got:
        f["cpu_us_per_msg"] = cpu * 1e6 / got
        f["cpu_us_per_msg_by_role"] = {
            "producers": sum(r.get("cpu_s", 0.0) for r in prods) * 1e6 / got,
            "consumers": sum(r.get("cpu_s", 0.0) for r in cons) * 1e6 / got,
            "server": max(0.0, server_cpu) * 1e6 / got}
    f["rss_mib"] = {f"{r['role']}-{r['index']}": round(r.get("maxrss_kb", 0) / 1024, 1) for r in results}
    for pid, rss in server_rss.items():
        f["rss_mib"][f"server-{pid}"] = round(rss / 2**20, 1)
    f["producer_max_rss_mib"] = max((r.get("maxrss_kb", 0) / 1024 for r in prods), default=0.0)
    f["consumer_max_rss_mib"] = max((r.get("maxrss_kb", 0) / 1024 for r in cons), default=0.0)
    if w.kind == "lat":
        arrs = [r["latency_ns"] for r in cons if "latency_ns" in r]
        lat = np.concatenate(arrs) if arrs else np.zeros(0, dtype=np.int64)
        lat = lat[int(len(lat) * 0.05):] / 1000.0      # drop the first 5 % (warm-up), in us
        if len(lat):
            p50, p99, p999 = np.percentile(lat, [50, 99, 99.9])
            f.update(p50=float(p50), p99=float(p99), p999=float(p999), max=float(lat.max()))
            qs = np.concatenate([np.linspace(0, 99, 100), 99 + 0.9 * np.linspace(0, 1, 10)[1:], [99.95, 100]])
            f["cdf"] = {"q": [round(float(q), 3) for q in qs],
                        "us": [round(float(v), 3) for v in np.percentile(lat, qs)]}
        pt = [(r["t_start"], r["t_end"]) for r in prods if r.get("t_end")]
        if pt:
            f["sent_rate"] = w.count / ((max(e for _, e in pt) - min(s for s, _ in pt)) / 1e9)
    return f


# ---------------------------------------------------------------- driver

METRICS_TPUT = ("rate", "mb_s", "cpu_us_per_msg", "producer_max_rss_mib", "consumer_max_rss_mib")
METRICS_LAT = ("p50", "p99", "p999", "max", "cpu_us_per_msg", "producer_max_rss_mib", "consumer_max_rss_mib",
               "sent_rate")


def summarize(runs: List[Dict[str, Any]], kind: str) -> Dict[str, Any]:
    """Medians over the runs that completed (all runs if none did)."""
    good = [r for r in runs if r.get("ok")] or runs
    out: Dict[str, Any] = {"runs": len(runs), "ok_runs": sum(1 for r in runs if r.get("ok")),
                           "partial": any(r.get("partial") for r in runs),
                           "lossy": any(r.get("lossy") for r in runs)}
    for m in (METRICS_TPUT if kind == "tput" else METRICS_LAT):
        vals = [r[m] for r in good if isinstance(r.get(m), (int, float)) and not math.isnan(r[m])]
        if vals:
            out[m] = statistics.median(vals)
    if kind == "lat":
        cdfs = [r["cdf"] for r in good if "cdf" in r]
        if cdfs:
            mid = sorted(cdfs, key=lambda c: c["us"][50])[len(cdfs) // 2]
            out["cdf"] = mid
    notes = sorted({r.get("check") or (r.get("error") or "").split("\n")[0] for r in runs
                    if r.get("check") or r.get("error")} |
                   {e.split("\n")[0] for r in runs for e in r.get("errors", [])})
    if notes:
        out["notes"] = notes[:4]
    return out


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.scale = "smoke" if args.smoke else ("quick" if args.quick else "full")
        self.repeats = args.repeats or (1 if self.scale != "full" else 3)
        self.warmup = (not args.no_warmup) and self.scale == "full"
        wanted = [p.strip() for p in args.peers.split(",")] if args.peers else list(PEERS)
        unknown = [p for p in wanted if p not in PEERS]
        if unknown:
            raise SystemExit(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
        if "shmq" not in wanted:
            wanted.insert(0, "shmq")
        self.peers = [PEERS[p] for p in wanted]
        kinds = tuple(k for k in ("tput", "lat") if k in (args.kinds or "tput,lat").split(","))
        sizes = tuple(int(s) for s in args.sizes.split(",")) if args.sizes else (64, 1024, 65536)
        topos = tuple(args.topologies.split(",")) if args.topologies else ("1:1", "2:1", "1:2g")
        rates = tuple(int(r) for r in args.rates.split(",")) if args.rates else (10_000, 100_000)
        self.workloads = all_workloads(self.scale, sizes, topos, rates, kinds)
        if args.match:
            self.workloads = [w for w in self.workloads if args.match in w.key()]
        self.skipped: Dict[str, str] = {}
        self.results: List[Dict[str, Any]] = []

    def say(self, msg: str) -> None:
        if not self.args.quiet:
            print(msg, file=sys.stderr, flush=True)

    def plan(self) -> List[tuple]:
        todo = []
        for p in self.peers:
            why = p.check()
            if why:
                self.skipped[p.name] = why
        for w in self.workloads:
            for p in self.peers:
                if p.name in self.skipped:
                    continue
                why = p.unsupported(w)
                if not why and w.kind == "lat" and w.consumer == "spin" and not p.has_nowait:
                    why = "no non-blocking receive"
                if why:
                    self.results.append(self._skip_row(p, w, why))
                    continue
                todo.append((p, w))
        return todo

    def _skip_row(self, p: Peer, w: Workload, why: str) -> Dict[str, Any]:
        return {"peer": p.name, "workload": w.as_dict(), "skipped": why}

    def run(self) -> List[Dict[str, Any]]:
        todo = self.plan()
        for name, why in self.skipped.items():
            self.say(f"skipping {name}: {why}")
        t0 = time.monotonic()
        for k, (p, w) in enumerate(todo, 1):
            wl = w if p.count_scale == 1.0 else w.scaled(p.count_scale)
            runs = []
            if self.warmup:
                warm = run_once(p, wl.scaled(0.1), self.args.timeout, self.args.workdir or None)
                if w.kind == "tput" and warm.get("ok") and warm.get("rate"):
                    # size the measured runs to about --seconds each (never more than the workload's count)
                    wl = wl.with_count(min(wl.count, max(wl.count * 0.05, warm["rate"] * self.args.seconds)))
            for _ in range(self.repeats):
                runs.append(run_once(p, wl, self.args.timeout, self.args.workdir or None))
            summ = summarize(runs, w.kind)
            self.results.append({"peer": p.name, "workload": w.as_dict(), "count": wl.count,
                                 "summary": summ, "runs": [{k2: v for k2, v in r.items() if k2 != "cdf"}
                                                            for r in runs]})
            self.say(f"[{k:3d}/{len(todo)} {time.monotonic() - t0:6.1f}s] {w.key():34s} {p.name:12s} "
                     f"{_brief(summ, w.kind)}")
        return self.results


def _brief(s: Dict[str, Any], kind: str) -> str:
    flag = " PARTIAL" if s.get("partial") else ""
    flag += " LOSSY" if s.get("lossy") else ""
    if kind == "tput":
        r = s.get("rate")
        txt = "-" if r is None else f"{r / 1e6:8.3f} M msg/s"
        cpu = s.get("cpu_us_per_msg")
        if cpu is not None:
            txt += f"  {cpu:7.2f} us CPU/msg"
    else:
        txt = " ".join(f"{k}={s[k]:.1f}us" for k in ("p50", "p99", "p999", "max") if k in s) or "-"
    if s.get("notes"):
        txt += "  (" + s["notes"][0][:100] + ")"
    return txt + flag


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="small counts, every workload once (< 3 minutes)")
    ap.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=0, help="measured runs per figure (default 3; 1 with --quick)")
    ap.add_argument("--seconds", type=float, default=1.0,
                    help="full mode: size each measured throughput run to about this long, from the warm-up rate")
    ap.add_argument("--no-warmup", action="store_true", help="skip the warm-up run before each figure")
    ap.add_argument("--timeout", type=float, default=60.0, help="hard bound on every run, seconds (default 60)")
    ap.add_argument("--workdir", default="", help="where each run makes its private directory (default /dev/shm)")
    ap.add_argument("--peers", default="", help=f"comma-separated subset of: {', '.join(PEERS)} (shmq always runs)")
    ap.add_argument("--kinds", default="", help="tput,lat (default both)")
    ap.add_argument("--sizes", default="", help="value sizes in bytes, default 64,1024,65536")
    ap.add_argument("--topologies", default="", help="1:1,2:1,1:2g (default all)")
    ap.add_argument("--rates", default="", help="paced rates for latency, default 10000,100000")
    ap.add_argument("--match", default="", help="only workloads whose name contains this")
    ap.add_argument("--json", default="shmq-bench.json", help="write the results here (default shmq-bench.json)")
    ap.add_argument("--plots", default="", help="directory for PNG charts (needs the plot extra; default: next to "
                                                "the JSON file)")
    ap.add_argument("--no-plots", action="store_true", help="do not draw charts")
    ap.add_argument("--quiet", action="store_true", help="no progress lines")


def run(args: argparse.Namespace) -> int:
    from . import report
    suite = Suite(args)
    info = report.machine_info([p for p in suite.peers if p.name not in suite.skipped])
    load0 = report.loadavg()
    busy0 = report.cpu_busy_seconds()
    started = time.time()
    suite.say(report.header(info, suite))
    results = suite.run()
    elapsed = time.time() - started
    info["load_before"], info["load_after"] = load0, report.loadavg()
    info["elapsed_s"] = round(elapsed, 1)
    info["machine_busy_cpus"] = round((report.cpu_busy_seconds() - busy0) / max(elapsed, 1e-9), 2)
    doc = report.document(info, suite, results)
    text = report.render(doc)
    print(text)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=_json_default)
        print(f"wrote {args.json}")
    if not args.no_plots:
        where = args.plots or (os.path.dirname(os.path.abspath(args.json)) if args.json else ".")
        made = report.plots(doc, where)
        for m in made:
            print(f"wrote {m}")
    return 0


def _json_default(o: Any) -> Any:
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    return str(o)


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m perf", description="shmq against its peers, same workloads, one run")
    add_arguments(ap)
    return run(ap.parse_args(argv))
