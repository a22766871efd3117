"""``python -m shmq.replica --root R --id N``: one replica process (started by the coordinator;
SIGTERM or SIGINT stop it cleanly)."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from typing import Any, List, Optional

from ..root import Root
from .process import ReplicaProcess


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m shmq.replica", description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--id", type=int, required=True)
    ap.add_argument("--log-level", default="INFO")
    args = ap.parse_args(argv)
    os.umask(0o077)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s [replica {args.id} pid {os.getpid()}] %(name)s: %(message)s")
    proc = ReplicaProcess(Root(args.root, create=False), args.id)

    def stop(signum: int, frame: Any) -> None:
        # Not proc.stop() here: the handler may interrupt the main thread inside
        # an Event's lock; a thread sets the events instead.
        threading.Thread(target=proc.stop, name="shmq-replica-stop", daemon=True).start()
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    return proc.run()


if __name__ == "__main__":
    sys.exit(main())
