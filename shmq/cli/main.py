"""`shmq` command line: one subcommand per job; each lives in its own module."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(producers=args.producers, consumers=args.consumers, count=args.count,
                    value_size=args.value_size, root=args.root)


def _dump_log(args: argparse.Namespace) -> int:
    from .dump_log import dump
    return dump(args.path, slot=args.slot, records=args.records, as_json=args.json)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shmq", description="A Kafka-style message broker for one host.")
    p.add_argument("--root", default=None, help="root directory (default $SHMQ_ROOT or /dev/shm/shmq-<uid>)")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="producer and consumer processes with a verified summary")
    d.add_argument("--producers", type=int, default=2)
    d.add_argument("--consumers", type=int, default=2)
    d.add_argument("--count", type=int, default=200_000, help="records per producer")
    d.add_argument("--value-size", type=int, default=64)
    d.set_defaults(func=_demo)
    from .commands import add_parsers
    add_parsers(sub)
    from .bench import add_parser as add_bench  # shmq bench: the suite in perf/
    add_bench(sub)
    from .mirror import add_parser as add_mirror  # shmq mirror: to and from a Kafka cluster
    add_mirror(sub)
    dl = sub.add_parser("dump-log", help="frames and batches of a partition log, like kafka-dump-log")
    dl.add_argument("path", help="partition directory (<root>/data/<replica>/<topic>-<partition>)")
    dl.add_argument("--slot", type=int, default=None, help="only this ring slot")
    dl.add_argument("--records", action="store_true", help="print every record too")
    dl.add_argument("--json", action="store_true", help="one JSON object per line")
    dl.set_defaults(func=_dump_log)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from ..errors import ShmqError
    try:
        return int(args.func(args) or 0)
    except ShmqError as e:
        print(f"shmq {args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:   # e.g. dump-log of a path that is no partition log
        print(f"shmq {args.command}: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
