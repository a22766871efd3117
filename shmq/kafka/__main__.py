"""``python -m shmq.kafka --root R --listen HOST:PORT``: run a Kafka listener
in the foreground until SIGTERM/SIGINT. Prints ``listening on HOST:PORT``
(the bound port when 0 was asked) on stdout once it accepts connections."""
from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from typing import List, Optional, Tuple


def parse_address(text: str) -> Tuple[str, int]:
    """``HOST:PORT``, ``:PORT`` or ``PORT`` (host defaults to loopback)."""
    from .server import DEFAULT_PORT
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    try:
        p = int(port) if port else DEFAULT_PORT
    except ValueError:
        raise SystemExit(f"shmq: --kafka takes HOST:PORT, got {text!r}") from None
    if not 0 <= p <= 65535:
        raise SystemExit(f"shmq: port {p} is out of range")
    return host, p


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shmq.kafka", description="Kafka protocol listener for a shmq root")
    ap.add_argument("--root", default=None)
    ap.add_argument("--listen", default="127.0.0.1:9092", help="HOST:PORT to bind (default 127.0.0.1:9092)")
    ap.add_argument("--advertise", default=None, help="host name given to clients in Metadata")
    ap.add_argument("--sasl-users", default=None,
                    help="SASL/PLAIN credentials file (default: <root>/kafka-users if it exists)")
    ap.add_argument("--no-auto-create", action="store_true", help="refuse Metadata/Produce for missing topics")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--supervised", action="store_true",
                    help="the coordinator-run listener: hold <root>/kafka-listener.lock, exit if another holds it")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from ..errors import ShmqError
    from .server import KafkaListener
    host, port = parse_address(args.listen)
    if args.supervised:
        from ..root import Root
        from .supervisor import take_lock
        if take_lock(Root(args.root)) is None:       # the fd stays open (and locked) until exit
            print("shmq kafka listener: another coordinator-run listener serves this root", file=sys.stderr)
            return 3
    try:
        listener = KafkaListener(args.root, host, port, advertised_host=args.advertise, sasl_users=args.sasl_users,
                                 auto_create_topics=not args.no_auto_create)
    except (ShmqError, OSError) as e:
        print(f"shmq kafka listener: {e}", file=sys.stderr)
        return 1

    def stop(signum: int, frame: object) -> None:
        listener.close()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    faulthandler.register(signal.SIGUSR1, all_threads=True)    # kill -USR1: every thread's stack on stderr
    print(f"listening on {listener.host}:{listener.port}" + (" (SASL/PLAIN)" if listener.users else ""), flush=True)
    listener.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
