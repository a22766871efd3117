"""`shmq mirror`: copy topics between shmq and a Kafka-protocol cluster (shmq/mirror.py)."""
from __future__ import annotations

import argparse
from typing import Any, Dict


def _config(items: Any) -> Dict[str, str]:
    out = {}
    for item in items or ():
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise ValueError(f"--kafka-config {item!r}: expected KEY=VALUE (a librdkafka property)")
        out[k] = v
    return out


def run(args: argparse.Namespace) -> int:
    from ..mirror import run_mirror
    if (args.to_url and args.to_root) or (args.from_url and args.from_root):
        raise ValueError("--to-root goes with --from, --from-root with --to (the shmq side of the copy)")
    return run_mirror(args.from_url, args.to_url, args.topics, args.to_root or args.from_root or args.root,
                      name=args.name, progress_interval=args.progress_interval,
                      transactional=False if args.no_transactions else None,
                      kafka_config=_config(args.kafka_config))


def add_parser(sub: "argparse._SubParsersAction") -> argparse.ArgumentParser:
    m = sub.add_parser(
        "mirror", help="copy topics continuously to or from a Kafka cluster",
        description="Copy topics continuously between this shmq root and a Kafka-protocol cluster, partition p "
                    "to partition p, keeping keys, values, headers and timestamps, creating missing topics. "
                    "Resumes after a crash (even kill -9) with nothing lost and nothing duplicated. "
                    "--to uses a transactional producer; on a cluster without transactions (or with "
                    "--no-transactions) it falls back to an idempotent producer, and then records the "
                    "cluster received but had not acknowledged when the mirror died may be copied twice.")
    way = m.add_mutually_exclusive_group(required=True)
    way.add_argument("--from", dest="from_url", metavar="kafka://HOST:PORT", help="copy from this cluster into shmq")
    way.add_argument("--to", dest="to_url", metavar="kafka://HOST:PORT", help="copy from shmq into this cluster")
    m.add_argument("--topics", required=True,
                   help="comma-separated regular expressions matched against whole topic names ('orders.*')")
    m.add_argument("--to-root", default=None, help="shmq root to copy into (with --from; default --root)")
    m.add_argument("--from-root", default=None, help="shmq root to copy from (with --to; default --root)")
    m.add_argument("--name", default="default",
                   help="mirror name: Kafka group and transactional id shmq-mirror-NAME (default: default)")
    m.add_argument("--progress-interval", type=float, default=5.0, help="seconds between progress lines (0: none)")
    m.add_argument("--no-transactions", action="store_true", help="--to: idempotent producer, no transactions")
    m.add_argument("--kafka-config", action="append", metavar="KEY=VALUE",
                   help="extra librdkafka property for the Kafka clients (repeatable)")
    m.set_defaults(func=run)
    return m
