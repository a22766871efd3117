# Only here because pyproject.toml alone cannot carry cffi_modules and ext_modules.
#
# Two front doors to one C core (shmq/native/*.c): the cffi module binds its
# whole API; the _fastpath extension (fastpath.c, the CPython C API) carries
# the per-record path and is compiled from the same core sources. It is
# optional: where it cannot be built shmq runs without it (as with
# SHMQ_FASTPATH=0).
import importlib.util
import os

from setuptools import Extension, setup

NATIVE = "shmq/native"


def _core_sources() -> list:
    """The core's C files, from the one list the cffi build script keeps."""
    spec = importlib.util.spec_from_file_location("_shmq_build", f"{NATIVE}/build.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    return [f"{NATIVE}/{name}" for name in build.SOURCES]


CORE = _core_sources()

fastpath = Extension(
    "shmq.native._fastpath",
    sources=[f"{NATIVE}/fastpath.c"] + CORE,
    include_dirs=[NATIVE],
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                        "-Wno-missing-field-initializers", "-fno-strict-aliasing", "-fvisibility=hidden"],
    optional=os.environ.get("SHMQ_FASTPATH_REQUIRED") != "1",
)

setup(cffi_modules=[f"{NATIVE}/build.py:ffibuilder"], ext_modules=[fastpath])
