"""``python -m shmq.coordinator --root R [--standby] [--daemon]``

Runs a coordinator in the foreground (as ``shmq serve`` will). ``--standby``
waits for the root's lock instead of exiting when another coordinator is
active. ``--daemon`` detaches (double fork, new session, stdio to
``<root>/coordinator.log``, working directory ``/``) and returns once the
detached coordinator serves (0), found another one active (3) or failed to
start (1; the cause is in the log): this is how a client starts the embedded
coordinator. Exit status in the foreground: 0 after a clean stop, 3 if another
coordinator is active (without ``--standby``).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

from ..root import Root
from .server import Coordinator, install_signal_handlers

LOG_LIMIT = 16 << 20


READY, OTHER_ACTIVE, STANDBY = b"R", b"3", b"S"


def _daemonize(root: Root) -> int:
    """Detach; returns (in the detached process) the pipe on which it reports
    how its start went. The starting process waits for that report and exits
    with 0 (serving or standing by), 3 (another is active) or 1 (it died)."""
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        with os.fdopen(r, "rb") as f:
            word = f.read(1)
        os._exit({READY: 0, STANDBY: 0, OTHER_ACTIVE: 3}.get(word, 1))
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    try:
        if os.path.getsize(root.log_path) > LOG_LIMIT:
            os.unlink(root.log_path)
    except OSError:
        pass
    fd = os.open(root.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    os.close(null)
    os.chdir("/")
    return w


def _report(fd: int, word: bytes) -> None:
    try:
        os.write(fd, word)
        os.close(fd)
    except OSError:
        pass


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shmq.coordinator", description=__doc__.split("\n")[0])
    ap.add_argument("--root", default=None, help="root directory (default: $SHMQ_ROOT or /dev/shm/shmq-<user>)")
    ap.add_argument("--standby", action="store_true", help="wait to take over when the active coordinator dies")
    ap.add_argument("--daemon", action="store_true", help="detach and log to <root>/coordinator.log")
    ap.add_argument("--idle-exit-ms", type=int, default=0, metavar="MS",
                    help="exit once no client has been connected for this long (default 0: never)")
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--kafka", metavar="HOST:PORT", default=None,
                    help="run a Kafka protocol listener there (else as the root's setting says, if it has one)")
    ap.add_argument("--kafka-advertise", metavar="HOST", default=None)
    args = ap.parse_args(argv)
    if args.idle_exit_ms < 0:
        ap.error(f"--idle-exit-ms must be >= 0, got {args.idle_exit_ms}")
    os.umask(0o077)
    root = Root(args.root)
    report = _daemonize(root) if args.daemon else -1
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [pid {os.getpid()}] %(name)s: %(message)s")
    coord = Coordinator(root, idle_exit_ms=args.idle_exit_ms)
    coord.kafka_listen, coord.kafka_advertise = args.kafka, args.kafka_advertise
    install_signal_handlers(coord)
    if report < 0:
        return 0 if coord.run(standby=args.standby) else 3
    if args.standby:
        _report(report, STANDBY)
    # Any failure before on_ready closes the pipe unreported: the starter exits 1.
    active = coord.run(standby=args.standby, on_ready=lambda: _report(report, READY))
    if not active:
        _report(report, OTHER_ACTIVE)
    return 0 if active else 3


if __name__ == "__main__":
    sys.exit(main())
