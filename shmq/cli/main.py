"""`shmq` command line: one subcommand per job; each lives in its own module."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    return run_demo(producers=args.producers, consumers=args.consumers, count=args.count,
                    value_size=args.value_size, root=args.root)


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
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
