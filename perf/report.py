"""The report: machine and versions, tables of figures and of ratios, the
issue's targets, a JSON document and (with the ``plot`` extra) PNG charts."""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Dict, List, Optional, Sequence

from .workloads import TOPOLOGY_LABEL, size_label

try:  # the machine helpers of the log benchmark (owned there; same figures in both reports)
    from .bench_log import cpu_busy_seconds, loadavg, machine_info as _base_machine_info
except Exception:  # pragma: no cover - keep the suite usable if that module moves
    def cpu_busy_seconds() -> float:
        return float("nan")

    def loadavg() -> str:
        try:
            with open("/proc/loadavg") as f:
                return " ".join(f.read().split()[:3])
        except OSError:
            return "?"

    def _base_machine_info() -> Dict[str, Any]:
        return {"cpu": platform.processor(), "cpus": os.cpu_count(), "usable_cpus": os.cpu_count(),
                "python": platform.python_version(), "kernel": platform.release(), "machine": platform.machine()}


def machine_info(peers: Sequence[Any]) -> Dict[str, Any]:
    info = dict(_base_machine_info())
    versions: Dict[str, str] = {"python": info.get("python", "?")}
    for p in peers:
        try:
            versions.update(p.versions())
        except Exception as e:
            versions[p.name] = f"? ({e})"
    info["versions"] = versions
    info["date_utc"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return info


def header(info: Dict[str, Any], suite: Any) -> str:
    v = info.get("versions", {})
    lines = [f"shmq bench -- {info['date_utc']}",
             f"machine: {info.get('cpu', '?')}, {info.get('cpus', '?')} CPUs ({info.get('usable_cpus', '?')} usable), "
             f"{info.get('machine', '?')}, Linux {info.get('kernel', '?')}; load average {loadavg()}",
             "versions: " + ", ".join(f"{k} {x}" for k, x in v.items()),
             f"mode: {suite.scale}, {suite.repeats} repeat(s){' after a warm-up' if suite.warmup else ''}, median; "
             f"bound {suite.args.timeout:.0f} s per run; {len(suite.workloads)} workloads x "
             f"{len(suite.peers)} systems"]
    return "\n".join(lines)


# ------------------------------------------------------------------ document

def document(info: Dict[str, Any], suite: Any, results: List[Dict[str, Any]]) -> Dict[str, Any]:
    rows = []
    order = {w.key(): i for i, w in enumerate(suite.workloads)}
    porder = {p.name: i for i, p in enumerate(suite.peers)}
    results = sorted(results, key=lambda r: (order.get(r["workload"]["key"], 1 << 30), porder.get(r["peer"], 99)))
    for r in results:
        row = {"peer": r["peer"], "workload": r["workload"], "key": r["workload"]["key"]}
        if "skipped" in r:
            row["skipped"] = r["skipped"]
        else:
            row.update(count=r["count"], summary=r["summary"], runs=r["runs"])
        rows.append(row)
    _ratios(rows)
    doc = {"machine": info, "mode": suite.scale, "repeats": suite.repeats, "warmup": suite.warmup,
           "timeout_s": suite.args.timeout, "skipped_peers": suite.skipped,
           "peers": {p.name: {"label": p.label, "single_api": p.single_api, "batch_api": p.batch_api,
                              "group_note": p.group_note} for p in suite.peers},
           "rows": rows}
    doc["targets"] = targets(rows)
    return doc


def _ratios(rows: List[Dict[str, Any]]) -> None:
    """shmq / peer on the same workload key: rate for throughput, p50 (and p99) for latency."""
    shmq = {r["key"]: r.get("summary", {}) for r in rows if r["peer"] == "shmq" and "summary" in r}
    for r in rows:
        s = shmq.get(r["key"])
        if r["peer"] == "shmq" or s is None or "summary" not in r:
            continue
        mine = r["summary"]
        if r["workload"]["kind"] == "tput":
            if s.get("rate") and mine.get("rate"):
                r["ratio"] = s["rate"] / mine["rate"]
        else:
            for m in ("p50", "p99", "p999"):
                if s.get(m) and mine.get(m):
                    r[f"ratio_{m}"] = s[m] / mine[m]


def _find(rows: List[Dict[str, Any]], peer: str, key: str) -> Optional[Dict[str, Any]]:
    for r in rows:
        if r["peer"] == peer and r["key"] == key and "summary" in r:
            return r["summary"]
    return None


def targets(rows: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """The issue's targets, checked against this run."""
    out = []

    def add(what: str, have: Optional[float], want: str, met: Optional[bool]) -> None:
        out.append({"target": what, "have": have, "want": want, "met": met})

    k1 = "tput 1:1 64 B single"
    s = _find(rows, "shmq", k1)
    for peer, factor in (("pyzmq", 2.0), ("mp.Queue", 10.0)):
        p = _find(rows, peer, k1)
        if s and p and s.get("rate") and p.get("rate"):
            ratio = s["rate"] / p["rate"]
            add(f"64 B 1->1 single-record: shmq >= {factor:g}x {peer}", ratio, f">= {factor:g}x", ratio >= factor)
        else:
            add(f"64 B 1->1 single-record: shmq >= {factor:g}x {peer}", None, f">= {factor:g}x", None)
    b = _find(rows, "shmq", "tput 1:1 64 B batch")
    add("64 B 1->1 batch: >= 20 M records/s", b.get("rate") if b else None, ">= 20,000,000/s",
        (b["rate"] >= 20e6) if b and b.get("rate") else None)
    for rate in ("10k/s", "100k/s"):
        sp = _find(rows, "shmq", f"lat {rate} 64 B spin")
        add(f"latency p50 at {rate}, spinning consumer < 3 us", sp.get("p50") if sp else None, "< 3 us",
            (sp["p50"] < 3.0) if sp and sp.get("p50") else None)
        bl = _find(rows, "shmq", f"lat {rate} 64 B block")
        px = _find(rows, "posix_ipc", f"lat {rate} 64 B block")
        if bl and px and bl.get("p50") and px.get("p50"):
            add(f"latency p50 at {rate}, blocking consumer <= posix_ipc", bl["p50"], f"<= {px['p50']:.1f} us",
                bl["p50"] <= px["p50"])
        else:
            add(f"latency p50 at {rate}, blocking consumer <= posix_ipc", bl.get("p50") if bl else None,
                "<= posix_ipc", None)
    behind = []
    for r in rows:
        if r["peer"] == "shmq":
            continue
        if "ratio" in r and r["ratio"] < 1.0:
            behind.append(f"{r['key']} vs {r['peer']}: {r['ratio']:.2f}x")
        if "ratio_p50" in r and r["ratio_p50"] > 1.0:
            behind.append(f"{r['key']} vs {r['peer']}: p50 {r['ratio_p50']:.2f}x")
    add("shmq ahead of every peer in every row", float(len(behind)), "0 rows behind", not behind)
    out[-1]["behind"] = behind
    return out


# -------------------------------------------------------------------- render

def _rate(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v >= 1e6:
        return f"{v / 1e6:.2f} M"
    if v >= 1e3:
        return f"{v / 1e3:.1f} k"
    return f"{v:.0f}"


def _num(v: Optional[float], fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _status(row: Dict[str, Any]) -> str:
    if "skipped" in row:
        return "skipped: " + row["skipped"]
    s = row["summary"]
    out = []
    if s.get("lossy"):
        out.append("LOSSY")
    if s.get("partial"):
        out.append("PARTIAL")
    if not out:
        out.append(f"ok {s['ok_runs']}/{s['runs']}")
    if s.get("notes"):
        out.append(s["notes"][0][:60])
    return " ".join(out)


def _table(head: List[str], lines: List[List[str]], right: Sequence[int]) -> List[str]:
    widths = [max(len(x[i]) for x in lines + [head]) for i in range(len(head))]

    def fmt(cells: List[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in lines]


def _label(peer: str, kind_mode: str, peers: Dict[str, Any]) -> str:
    return peers.get(peer, {}).get("label", peer)


def render(doc: Dict[str, Any]) -> str:
    rows = doc["rows"]
    peers = doc["peers"]
    out: List[str] = []
    m = doc["machine"]
    out.append(f"shmq vs peers -- {m.get('date_utc')} -- {doc['mode']} mode, {doc['repeats']} repeat(s)"
               f"{' after a warm-up' if doc['warmup'] else ''}, medians; fresh processes per run; "
               f"bound {doc['timeout_s']:.0f} s per run")
    out.append(f"machine: {m.get('cpu')}, {m.get('cpus')} CPUs, Linux {m.get('kernel')}; load average before "
               f"{m.get('load_before')}, after {m.get('load_after')}; whole machine busy "
               f"{m.get('machine_busy_cpus')} CPUs on average during the run (ours included)")
    out.append("versions: " + ", ".join(f"{k} {v}" for k, v in m.get("versions", {}).items()))
    for name, why in doc.get("skipped_peers", {}).items():
        out.append(f"SKIPPED {name}: {why}")
    out.append("")

    # throughput figures
    keys = list(dict.fromkeys(r["key"] for r in rows if r["workload"]["kind"] == "tput"))
    if keys:
        out.append("THROUGHPUT (messages/s received and checked; CPU = all processes incl. server, per message; "
                   "RSS = peak per process)")
        head = ["workload", "system", "msg/s", "MB/s", "CPU us/msg", "RSS prod/cons MiB", "shmq/x", "status"]
        lines = []
        for key in keys:
            for r in [r for r in rows if r["key"] == key]:
                s = r.get("summary", {})
                ratio = r.get("ratio")
                lines.append([key, _label(r["peer"], "", peers), _rate(s.get("rate")),
                              _num(s.get("mb_s"), "{:.0f}"), _num(s.get("cpu_us_per_msg")),
                              ("-" if not s else f"{s.get('producer_max_rss_mib', 0):.0f} / "
                                                 f"{s.get('consumer_max_rss_mib', 0):.0f}"),
                              "" if r["peer"] == "shmq" else (_num(ratio, "{:.2f}x")), _status(r)])
        tbl = _table(head, lines, right=(2, 3, 4, 5, 6))
        out += tbl[:2]
        prev = None
        for key, line in zip([ln[0] for ln in lines], tbl[2:]):
            if prev is not None and key != prev:
                out.append("")
            prev = key
            out.append(line)
        out.append("")

        # ratio matrix
        peer_names = [p for p in peers if p != "shmq"]
        out.append("RATIOS shmq / peer, throughput (> 1: shmq faster; '.' not run)")
        head = ["workload", "shmq msg/s"] + [peers[p]["label"] for p in peer_names]
        lines = []
        for key in keys:
            s = _find(rows, "shmq", key)
            cells = [key, _rate(s.get("rate")) if s else "-"]
            for p in peer_names:
                r = next((x for x in rows if x["key"] == key and x["peer"] == p), None)
                if r is None or "skipped" in r:
                    cells.append(".")
                else:
                    flag = "!" if r["summary"].get("lossy") or r["summary"].get("partial") else ""
                    cells.append(_num(r.get("ratio"), "{:.2f}") + flag)
            lines.append(cells)
        out += _table(head, lines, right=range(1, len(head)))
        out.append("('!': that peer lost messages or was cut at the bound in at least one run)")
        out.append("")

    lkeys = list(dict.fromkeys(r["key"] for r in rows if r["workload"]["kind"] == "lat"))
    if lkeys:
        out.append("ONE-WAY LATENCY, 1 producer -> 1 consumer, paced (microseconds; first 5 % dropped; "
                   "shmq/x on p50 and p99: < 1 means shmq lower)")
        head = ["workload", "system", "p50", "p99", "p99.9", "max", "sent/s", "CPU us/msg", "shmq/x p50",
                "shmq/x p99", "status"]
        lines = []
        for key in lkeys:
            for r in [r for r in rows if r["key"] == key]:
                s = r.get("summary", {})
                lines.append([key, _label(r["peer"], "", peers), _num(s.get("p50"), "{:.1f}"),
                              _num(s.get("p99"), "{:.1f}"), _num(s.get("p999"), "{:.1f}"),
                              _num(s.get("max"), "{:.0f}"), _rate(s.get("sent_rate")),
                              _num(s.get("cpu_us_per_msg")),
                              "" if r["peer"] == "shmq" else _num(r.get("ratio_p50"), "{:.2f}"),
                              "" if r["peer"] == "shmq" else _num(r.get("ratio_p99"), "{:.2f}"), _status(r)])
        tbl = _table(head, lines, right=range(2, 10))
        out += tbl[:2]
        prev = None
        for key, line in zip([ln[0] for ln in lines], tbl[2:]):
            if prev is not None and key != prev:
                out.append("")
            prev = key
            out.append(line)
        out.append("")

    out.append("TARGETS (issue 5, this run)")
    for t in doc["targets"]:
        met = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        have = t["have"]
        if have is None:
            hv = "-"
        elif "ratio" in t["target"] or "x " in t["target"]:
            hv = f"{have:.2f}x"
        elif "records/s" in t["target"]:
            hv = f"{have / 1e6:.2f} M/s"
        elif "latency" in t["target"]:
            hv = f"{have:.1f} us"
        else:
            hv = f"{have:.0f}"
        out.append(f"  {t['target']:58s} {hv:>12s}  want {t['want']:16s} {met}")
        for b in t.get("behind", [])[:40]:
            out.append(f"      behind: {b}")
    out.append("")
    out.append("NOTES")
    out.append("  single = one message per API call on both sides; batch = the system's batch API:")
    for name, p in peers.items():
        api = p["single_api"] + (f"; batch: {p['batch_api']}" if p["batch_api"] else "")
        grp = f"; group: {p['group_note']}" if p["group_note"] else ""
        out.append(f"    {p['label']}: {api}{grp}")
    out.append("  1:2g for mp.Queue, faster-fifo and posix_ipc: two consumers compete on one queue.")
    out.append("  shmq topics: overflow=overwrite with a ring sized to hold the whole run (no recycling); "
               "Redis: private redis-server on a Unix socket, TCP off, no RDB/AOF; fewer messages (20 %).")
    return "\n".join(out)


# --------------------------------------------------------------------- plots

def plots(doc: Dict[str, Any], where: str) -> List[str]:
    """PNG charts (throughput by value size per topology and mode; latency CDFs);
    [] with a message when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no charts: matplotlib is not installed (pip install 'shmq[plot]')")
        return []
    os.makedirs(where, exist_ok=True)
    rows = doc["rows"]
    peers = doc["peers"]
    made = []
    palette = plt.get_cmap("tab10")
    color = {p: palette(i % 10) for i, p in enumerate(peers)}

    def legend(fig: Any, names: List[str]) -> None:
        from matplotlib.patches import Patch
        fig.legend(handles=[Patch(color=color[p], label=peers[p]["label"]) for p in names],
                   loc="lower center", ncol=len(names), fontsize=8, frameon=False)
    tput = [r for r in rows if r["workload"]["kind"] == "tput" and "summary" in r]
    combos = sorted({(r["workload"]["topology"], r["workload"]["mode"]) for r in tput})
    if combos:
        topos = [t for t in ("1:1", "2:1", "1:2g") if any(c[0] == t for c in combos)]
        modes = [m for m in ("single", "batch") if any(c[1] == m for c in combos)]
        fig, axes = plt.subplots(len(modes), len(topos), figsize=(4.6 * len(topos), 3.8 * len(modes) + 0.6),
                                 squeeze=False)
        for ax in axes.flat:
            ax.set_visible(False)
        for topo, mode in combos:
            ax = axes[modes.index(mode)][topos.index(topo)]
            ax.set_visible(True)
            sub = [r for r in tput if r["workload"]["topology"] == topo and r["workload"]["mode"] == mode]
            sizes = sorted({r["workload"]["size"] for r in sub})
            names = [p for p in peers if any(r["peer"] == p for r in sub)]
            width = 0.8 / max(1, len(names))
            for j, p in enumerate(names):
                ys = [next((r["summary"].get("rate", 0) for r in sub if r["peer"] == p and
                            r["workload"]["size"] == s), 0) for s in sizes]
                ax.bar([i + j * width for i in range(len(sizes))], ys, width, color=color[p])
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(sizes))])
            ax.set_xticklabels([size_label(s) for s in sizes])
            ax.set_yscale("log")
            ax.set_title(f"{TOPOLOGY_LABEL.get(topo, topo)}, {mode}", fontsize=9)
            ax.set_ylabel("messages/s (log)")
            ax.grid(axis="y", alpha=0.3)
        legend(fig, [p for p in peers if any(r["peer"] == p for r in tput)])
        fig.suptitle("Throughput by value size (received and checked)", fontsize=10)
        fig.tight_layout(rect=(0, 0.05, 1, 1))
        path = os.path.join(where, "shmq-bench-throughput.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    lat = [r for r in rows if r["workload"]["kind"] == "lat" and "summary" in r and "cdf" in r["summary"]]
    lkeys = list(dict.fromkeys(r["key"] for r in lat))
    if lkeys:
        fig, axes = plt.subplots(1, len(lkeys), figsize=(4.2 * len(lkeys), 4.2), squeeze=False)
        for ax, key in zip(axes[0], lkeys):
            for r in [r for r in lat if r["key"] == key]:
                c = r["summary"]["cdf"]
                ax.plot(c["us"], c["q"], color=color[r["peer"]], lw=2.2 if r["peer"] == "shmq" else 1)
            ax.set_xscale("log")
            ax.set_xlabel("one-way latency, us (log)")
            ax.set_ylabel("percentile")
            ax.set_title(key, fontsize=9)
            ax.grid(alpha=0.3)
        legend(fig, [p for p in peers if any(r["peer"] == p for r in lat)])
        fig.suptitle("One-way latency CDF, 1 producer -> 1 consumer, paced", fontsize=10)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        path = os.path.join(where, "shmq-bench-latency-cdf.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made
