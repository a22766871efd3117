"""Smoke test of the benchmark suite (perf/): it runs, every message is
checked, and the results have the expected structure. Speed is never asserted."""
from __future__ import annotations

import argparse
import json
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from perf import suite  # noqa: E402
from perf.peers import PEERS  # noqa: E402
from perf.workloads import Workload, all_workloads  # noqa: E402


def test_workload_checksums_add_up() -> None:
    w = Workload("tput", "2:1", 64, "batch", count=16384 * 2, batch=8192)
    assert sum(w.per_producer()) == w.count
    for wl in all_workloads("quick"):
        assert wl.count > 0 and wl.count % (wl.producers * max(1, wl.batch)) == 0, wl
    assert {w.key() for w in all_workloads("smoke")} == {w.key() for w in all_workloads("full")}


@pytest.mark.timeout(60)
def test_smoke_run_has_expected_structure(tmp_path, shm_dir) -> None:
    out = tmp_path / "bench.json"
    rc = suite.main(["--smoke", "--quiet", "--no-plots", "--peers", "mp.Queue",
                     "--sizes", "64", "--topologies", "1:2g", "--rates", "10000",
                     "--timeout", "15", "--workdir", shm_dir, "--json", str(out)])
    assert rc == 0
    doc = json.loads(out.read_text())
    assert {"machine", "rows", "targets", "peers", "mode"} <= set(doc)
    assert doc["mode"] == "smoke"
    assert "python" in doc["machine"]["versions"] and doc["machine"]["load_before"]
    keys = {r["key"] for r in doc["rows"]}
    assert {"tput 1:2g 64 B single", "tput 1:2g 64 B batch", "lat 10k/s 64 B spin", "lat 10k/s 64 B block"} <= keys
    by = {(r["peer"], r["key"]): r for r in doc["rows"]}
    # every system ran or says why not
    for r in doc["rows"]:
        assert "summary" in r or r.get("skipped"), r
    assert "no batch API" in by[("mp.Queue", "tput 1:2g 64 B batch")]["skipped"]
    for key in ("tput 1:2g 64 B single", "tput 1:2g 64 B batch"):
        s = by[("shmq", key)]["summary"]
        assert s["runs"] == 1 and not s["partial"] and not s["lossy"], s
        assert s["rate"] > 0 and s["cpu_us_per_msg"] > 0 and s["consumer_max_rss_mib"] > 0
        run = by[("shmq", key)]["runs"][0]
        assert run["ok"] and run["got"] == by[("shmq", key)]["count"]
    r = by[("mp.Queue", "tput 1:2g 64 B single")]
    assert r["summary"]["ok_runs"] == 1 and r["ratio"] > 0
    for mode in ("spin", "block"):
        s = by[("shmq", f"lat 10k/s 64 B {mode}")]["summary"]
        assert s["ok_runs"] == 1, s
        assert s["p50"] <= s["p99"] <= s["p999"] <= s["max"]
        assert len(s["cdf"]["q"]) == len(s["cdf"]["us"])
    assert [t["target"] for t in doc["targets"]][:3] and all("met" in t for t in doc["targets"])
    # every run removed its private directory (and so its root; teardown stopped the coordinator first)
    assert os.listdir(shm_dir) == []


def test_cli_parser_registers_bench() -> None:
    from shmq.cli import bench
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="command")
    bench.add_parser(sub)
    args = ap.parse_args(["bench", "--quick", "--peers", "pyzmq", "--json", "x.json"])
    assert args.quick and args.peers == "pyzmq" and args.func is bench.run
    assert set(PEERS) >= {"shmq", "mp.Queue", "mp.Pipe", "faster-fifo", "pyzmq", "redis", "posix_ipc"}


@pytest.mark.timeout(120)
def test_replication_benchmark_smoke() -> None:
    from perf import bench_replication as br
    send = br.bench_send(2, "all", 300)
    assert send["rate"] > 0 and send["p99_us"] >= send["p50_us"] > 0
    fo = br.bench_failover(1)
    assert fo["kills"] == 1 and len(fo["all_ms"]) == 1


@pytest.mark.timeout(120)
def test_kafka_benchmark_smoke() -> None:
    pytest.importorskip("confluent_kafka")
    pytest.importorskip("kio")
    from perf import bench_kafka as bk
    with bk.ShmqListener() as bootstrap:
        prod = bk.bench_produce(bootstrap, 2000, 64)
        cons = bk.bench_consume(bootstrap, 2000, 64)
    assert prod["rate"] > 0 and prod["p99_us"] >= prod["p50_us"] > 0
    assert 0 < cons["records"] <= 2000 and cons["rate"] > 0


@pytest.mark.timeout(120)
def test_safety_benchmark_runs_both_modes_and_the_safe_one_delivers_everything() -> None:
    from perf import bench_safety
    for batch, size, n in ((False, 64, 20_000), (True, 64, 100_000)):
        rate, delivered = bench_safety.run_once("safe", n, size, batch)
        assert delivered == n and rate > 0
        rate, delivered = bench_safety.run_once("unsafe", n, size, batch)
        assert 0 < delivered <= n and rate > 0
