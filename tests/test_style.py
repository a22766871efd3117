"""Lint: the package, its tests and benchmarks pass ruff (config in pyproject.toml)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.timeout(120)
def test_ruff_finds_nothing() -> None:
    exe = shutil.which("ruff") or os.path.join(os.path.dirname(sys.executable), "ruff")
    if not os.path.exists(exe):
        pytest.skip("ruff is not installed (pip install -e '.[test]' installs it)")
    r = subprocess.run([exe, "check", "shmq", "tests", "perf"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
