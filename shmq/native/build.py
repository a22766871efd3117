"""cffi build script for the C core (API mode, compiled at install).

The public headers in this directory are the single source of truth: their
declarations are fed to ``ffi.cdef`` after dropping preprocessor lines other
than plain integer ``#define``s, so Python and C cannot drift apart.
"""
from __future__ import annotations

import pathlib
import re

from cffi import FFI

HERE = pathlib.Path(__file__).resolve().parent
HEADERS = ["record_batch.h", "log.h", "producer_state.h", "lifeline.h", "txn_index.h"]
# Every C file of the core, in a stable order. fastpath*.c is the CPython
# extension of the per-record path, built separately (it includes Python.h).
SOURCES = sorted(p.name for p in HERE.glob("*.c") if not p.name.startswith("fastpath"))

_INT_DEFINE = re.compile(r"^#define\s+[A-Z_][A-Z0-9_]*\s+\(?-?(0x[0-9A-Fa-f]+|\d+)[uUlL]*\)?\s*$")


def _cdef_text(header: str) -> str:
    lines = []
    for line in (HERE / header).read_text().splitlines():
        if line.startswith("#"):
            line = re.sub(r"/\*.*?\*/", "", line).rstrip()
        if line.startswith("#") and not _INT_DEFINE.match(line):
            continue
        lines.append(line)
    return "\n".join(lines)


def make_ffi() -> FFI:
    ffi = FFI()
    for header in HEADERS:
        if (HERE / header).exists():
            ffi.cdef(_cdef_text(header))
    # setuptools wants paths relative to setup.py (the project root).
    sources = [f"shmq/native/{s}" for s in SOURCES]
    ffi.set_source(
        "shmq.native._shmq",
        "\n".join(f'#include "{h}"' for h in HEADERS if (HERE / h).exists()),
        sources=sources,
        include_dirs=["shmq/native"],
        extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror",
                            "-Wno-unused-parameter", "-fno-strict-aliasing"],
    )
    return ffi


ffibuilder = make_ffi()

if __name__ == "__main__":
    import os

    os.chdir(HERE.parent.parent)
    ffibuilder.compile(tmpdir=".", verbose=True)
