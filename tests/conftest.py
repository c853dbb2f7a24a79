"""Shared fixtures: the corpora packaged with lm (no network, nothing outside the checkout) and tiny configs."""

from __future__ import annotations

import os
import pathlib
import shutil
import tempfile

# Tests run on the CPU (fake devices where they need several), also where libtpu (the `tpu`
# extra, for lm.aot) or a GPU is installed; subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole run, this process, pytest-xdist's workers (they
# inherit it) and every subprocess: the tests compile the same tiny steps many times. Kept out of
# the user's ~/.cache/lm/jax (test_train checks that one). lm aot's TPU compiles bypass it.
_OWN_CACHE = None if "JAX_COMPILATION_CACHE_DIR" in os.environ else tempfile.mkdtemp(prefix="lm-test-jax-cache-")
if _OWN_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")

# The tests compile hundreds of tiny steps and run few of each: LLVM's optimisation of XLA:CPU's
# code costs them more than it saves (the suite ~20% faster on 2 cores without it). Programs a test
# compares with each other are built alike (subprocesses inherit it); users' runs keep XLA's default.
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from lm.config import load_config  # noqa: E402
from lm.data import packaged  # noqa: E402
from lm.parallel.cpu import usable_cores  # noqa: E402

# In-process tests see one CPU device whatever the machine's cores; train.py subprocesses
# split the cores as users' runs do (lm.parallel.cpu), and test_parallel asks for 8 devices.
jax.config.update("jax_num_cpu_devices", 1)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = packaged.path("builtin:tinyshakespeare")  # the file inside the installed package
GRIMM = packaged.path("builtin:grimm_tales")


@pytest.fixture(scope="session")
def shakespeare() -> pathlib.Path:
    return SHAKESPEARE


@pytest.fixture(scope="session")
def grimm() -> pathlib.Path:
    return GRIMM


@pytest.fixture
def tiny_config(tmp_path, shakespeare):
    """configs/tiny.yaml (on the packaged Shakespeare text) in a fresh run_dir, plus any overrides."""

    def make(*overrides: str, run_dir: pathlib.Path | None = None):
        return load_config(ROOT / "configs" / "tiny.yaml", [f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: a worker per usable core, at most 8 (each holds a JAX runtime and its compiles)."""
    return min(8, usable_cores())


def pytest_sessionfinish(session, exitstatus) -> None:
    """The process that made the run's compilation cache (not an xdist worker) removes it."""
    if _OWN_CACHE:
        shutil.rmtree(_OWN_CACHE, ignore_errors=True)
