"""`shmq bench`: shmq against its peers, same workloads, one run (the suite lives in perf/).

Registered in shmq/cli/main.py with ``from .bench import add_parser as add_bench; add_bench(sub)``.
"""
from __future__ import annotations

import argparse
import os
import sys


def _import_suite():
    """perf/ sits next to the shmq package in a source checkout (it is not installed)."""
    try:
        from perf import suite
    except ImportError:
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        if not os.path.isfile(os.path.join(here, "perf", "suite.py")):
            raise
        sys.path.insert(0, here)
        from perf import suite
    return suite


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    b = sub.add_parser("bench", help="benchmark shmq against mp.Queue, Pipe, faster-fifo, pyzmq, Redis, posix_ipc",
                       description="Runs the same workloads on shmq and on each installed peer in fresh "
                                   "processes; prints figures and ratios, writes JSON and (with the plot extra) "
                                   "PNG charts. Peers come with the bench extra: pip install 'shmq[bench,plot]'.")
    try:
        _import_suite().add_arguments(b)
    except ImportError as e:  # an installed shmq without the perf/ sources
        b.add_argument("rest", nargs=argparse.REMAINDER)
        b.set_defaults(bench_error=str(e))
    b.set_defaults(func=run)
    return b


def run(args: argparse.Namespace) -> int:
    if getattr(args, "bench_error", None):
        print(f"shmq bench: the benchmark suite (perf/) is not available: {args.bench_error}; "
              f"run it from a source checkout", file=sys.stderr)
        return 2
    # the suite makes a private root per run; the global --root is not used
    return _import_suite().run(args)
