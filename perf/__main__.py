"""``python -m perf``: shmq against its peers, same workloads, one run (see perf/suite.py)."""
import sys

from .suite import main

if __name__ == "__main__":
    sys.exit(main())
