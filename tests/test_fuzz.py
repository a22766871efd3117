"""The C core under AddressSanitizer + UndefinedBehaviorSanitizer: every fuzz
harness of tests/fuzz/ (see its README) is built with the sanitizers, replays
its regression corpus (tests/fuzz/corpus/<harness>/) and mutates its seeds
for a bounded time; any sanitizer report, crash or hang fails the test and
leaves the input in the test's crash directory.

``SHMQ_FUZZ_SECONDS`` (default 10 per harness) sets the budget and
``SHMQ_FUZZ_SEED`` the PRNG seed (default: the day number, printed, so a
failure is reproducible and CI covers a new stretch every day).

Without a compiler that links ``-fsanitize=address,undefined`` (gcc needs
libasan and libubsan: on Debian/Ubuntu they come with ``gcc`` through
libgcc-<version>-dev) the test is skipped on a developer's machine, but on CI
(``CI`` set to true, as GitHub Actions, GitLab and most runners do) it fails
with the reason: a CI that cannot build the sanitizers must not pass."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
FUZZ = os.path.join(HERE, "fuzz")
HARNESSES = sorted(f[5:-2] for f in os.listdir(FUZZ)
                   if f.startswith("fuzz_") and f.endswith(".c") and f not in ("fuzz_common.c", "fuzz_driver.c"))
SECONDS = float(os.environ.get("SHMQ_FUZZ_SECONDS", "10"))
SEED = int(os.environ.get("SHMQ_FUZZ_SEED", str(int(time.time()) // 86400)))
SAN_ENV = {"ASAN_OPTIONS": "detect_leaks=1:abort_on_error=0:allocator_may_return_null=0",
           "UBSAN_OPTIONS": "print_stacktrace=1:halt_on_error=1"}


def on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("true", "1", "yes")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    out = str(tmp_path_factory.mktemp("fuzz-build"))
    r = subprocess.run(["sh", os.path.join(FUZZ, "build.sh"), out], capture_output=True, text=True, timeout=600)
    if r.returncode == 77:
        reason = f"no sanitizer build here: {r.stderr.strip()} (install gcc with libasan and libubsan, or clang)"
        if on_ci():
            pytest.fail(f"CI must run the fuzz harnesses under ASan + UBSan; {reason}")
        pytest.skip(reason)
    assert r.returncode == 0, r.stdout + r.stderr
    yield out


def test_every_harness_is_covered() -> None:
    assert HARNESSES == ["batch", "frames", "log", "pstate", "unblock"]
    for h in HARNESSES:
        assert os.path.isdir(os.path.join(FUZZ, "corpus", h)), f"tests/fuzz/corpus/{h} is missing"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("harness", HARNESSES)
def test_harness_runs_clean_under_asan_and_ubsan(built: str, harness: str, tmp_path: Path) -> None:
    corpus = os.path.join(FUZZ, "corpus", harness)
    kept = [f for f in os.listdir(corpus) if not f.startswith(".")]
    cmd = [os.path.join(built, f"fuzz_{harness}"), "--seconds", str(SECONDS), "--seed", str(SEED),
           "--crash-dir", str(tmp_path), corpus]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS + 240, env={**os.environ, **SAN_ENV})
    crashes = os.listdir(tmp_path)
    assert r.returncode == 0 and not crashes, (
        f"fuzz_{harness} (seed {SEED}) failed with {r.returncode}; inputs saved: {crashes}; "
        f"copy them to tests/fuzz/corpus/{harness}/ once fixed\n{r.stderr[-6000:]}")
    m = re.search(r"(\d+) seeds, (\d+) replayed, (\d+) mutated inputs", r.stderr)
    assert m, r.stderr
    assert int(m.group(2)) == len(kept), r.stderr
    assert int(m.group(3)) > 0 or SECONDS == 0, r.stderr
    print(r.stderr.strip())


@pytest.mark.timeout(120)
@pytest.mark.parametrize("ci", ["true", ""])
def test_no_sanitizer_compiler_fails_on_ci_and_skips_elsewhere(ci: str, tmp_path: Path) -> None:
    # A PATH with the tools build.sh needs but no C compiler at all.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("sh", "dirname", "basename", "mkdir", "rm"):
        found = shutil.which(tool)
        assert found, tool
        (bin_dir / tool).symlink_to(found)
    env = {k: v for k, v in os.environ.items() if k not in ("CC", "LIBFUZZER_CC", "CI")}
    env.update(PATH=str(bin_dir), CI=ci, SHMQ_FUZZ_SECONDS="0")
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs",
                        f"{os.path.abspath(__file__)}::test_harness_runs_clean_under_asan_and_ubsan[batch]"],
                       capture_output=True, text=True, timeout=100, env=env, cwd=str(tmp_path))
    out = r.stdout + r.stderr
    assert "no C compiler here links -fsanitize=address,undefined" in out, out
    if ci:
        assert r.returncode == 1 and "CI must run the fuzz harnesses under ASan + UBSan" in out, out
    else:
        assert r.returncode == 0 and "1 skipped" in out, out
