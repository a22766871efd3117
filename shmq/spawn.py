"""Starting shmq's own processes (the coordinator, replica processes).

Theory of operation: such a process must import the very ``shmq`` its
starter imported, whatever the starter's working directory, ``sys.path`` or
environment. ``python -m`` would put the working directory first on
``sys.path``, so a client run from a directory holding a ``shmq`` source
tree (a checkout, a stale copy) would start a coordinator that imports that
tree instead, or fails to import. So a child:

* runs with the working directory ``/`` (and ``-P`` where Python has it,
  3.11+: no unsafe path is prepended at all);
* finds this ``shmq`` first: the directory holding this package is put in
  front of ``PYTHONPATH`` unless it is a site-packages directory (an installed
  package is found there anyway, and a site-packages directory in front of
  the standard library could shadow it).

When a child fails to start, ``log_tail`` gives the last lines of its log for
the error the user sees.
"""
from __future__ import annotations

import os
import site
import sys
from typing import Dict, List

__all__ = ["CHILD_CWD", "python_argv", "child_env", "log_tail"]

CHILD_CWD = "/"
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_argv(module: str, *args: str) -> List[str]:
    """The command line running ``python -m module args`` with a safe ``sys.path``."""
    safe = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe, "-m", module, *args]


def _site_dirs() -> List[str]:
    dirs = []
    try:
        dirs += site.getsitepackages()
    except AttributeError:           # a virtualenv's old site.py
        pass
    try:
        dirs.append(site.getusersitepackages())
    except AttributeError:
        pass
    return [os.path.realpath(d) for d in dirs]


def child_env() -> Dict[str, str]:
    """The environment of a child: ours, with this ``shmq`` first on ``PYTHONPATH``."""
    env = dict(os.environ)
    if os.path.realpath(_PACKAGE_PARENT) not in _site_dirs():
        rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != _PACKAGE_PARENT]
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_PARENT, *rest])
    return env


def log_tail(path: str, lines: int = 15, max_bytes: int = 8192) -> str:
    """The last ``lines`` lines of the log at ``path`` (at most ``max_bytes`` read),
    indented for an error message; a note if it cannot be read."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        return f"  (no log: {e.strerror})"
    try:
        size = os.fstat(fd).st_size
        os.lseek(fd, max(0, size - max_bytes), os.SEEK_SET)
        data = os.read(fd, max_bytes)
    finally:
        os.close(fd)
    text = data.decode("utf-8", "replace").splitlines()[-lines:]
    return "\n".join("  " + line[:300] for line in text) if text else "  (the log is empty)"
