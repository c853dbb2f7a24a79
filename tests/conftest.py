"""Shared fixtures: the real text corpora in ../shared/data and tiny configs."""

from __future__ import annotations

import os
import pathlib

# Tests run on the CPU (fake devices where they need several), also where libtpu (the `tpu`
# extra, for lm.aot) or a GPU is installed; subprocesses inherit this.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import pytest

from lm.config import load_config

# In-process tests see one CPU device whatever the machine's cores; train.py subprocesses
# split the cores as users' runs do (lm.cpu_devices), and test_parallel asks for 8 devices.
jax.config.update("jax_num_cpu_devices", 1)

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def shared_file(name: str) -> pathlib.Path:
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is absent (the project expects ../shared/data beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shakespeare() -> pathlib.Path:
    return shared_file("tinyshakespeare.txt")


@pytest.fixture(scope="session")
def grimm() -> pathlib.Path:
    return shared_file("grimm_tales.txt")


@pytest.fixture
def tiny_config(tmp_path, shakespeare):
    """configs/tiny.yaml on the Shakespeare text, in a fresh run_dir, plus any overrides."""

    def make(*overrides: str, run_dir: pathlib.Path | None = None):
        return load_config(ROOT / "configs" / "tiny.yaml",
                           [f"data.text_file={shakespeare}", f"run_dir={run_dir or tmp_path / 'run'}", *overrides])

    return make
