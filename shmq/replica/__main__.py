"""``python -m shmq.replica --root R --id N``: one replica process (started by the coordinator)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional

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
    return ReplicaProcess(Root(args.root, create=False), args.id).run()


if __name__ == "__main__":
    sys.exit(main())
