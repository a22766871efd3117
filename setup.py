# Only here because pyproject.toml alone cannot carry cffi_modules and ext_modules.
#
# Two front doors to one C core (shmq/native/*.c): the cffi module binds its
# whole API; the _fastpath extension (fastpath.c, the CPython C API) carries
# the per-record path and is compiled from the same core sources. It is
# optional: where it cannot be built shmq runs without it (as with
# SHMQ_FASTPATH=0).
import glob
import os

from setuptools import Extension, setup

NATIVE = "shmq/native"
CORE = sorted(p for p in glob.glob(f"{NATIVE}/*.c")
              if not os.path.basename(p).startswith(("fastpath", "_")))

fastpath = Extension(
    "shmq.native._fastpath",
    sources=[f"{NATIVE}/fastpath.c"] + CORE,
    include_dirs=[NATIVE],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-fno-strict-aliasing", "-fvisibility=hidden"],
    optional=os.environ.get("SHMQ_FASTPATH_REQUIRED") != "1",
)

setup(cffi_modules=[f"{NATIVE}/build.py:ffibuilder"], ext_modules=[fastpath])
