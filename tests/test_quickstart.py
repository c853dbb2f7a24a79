"""A newcomer's machine: the packaged corpora, the installed metadata, and a run that prints only its own lines."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import subprocess
import sys

import pytest

from lm.config import load_config
from lm.data import packaged
from lm.data.text import read_text
from lm.errors import LMError
from tests.conftest import ROOT


def test_packaged_corpora_are_installed_and_checked():
    for name, corpus in packaged.CORPORA.items():
        path = packaged.path(packaged.SCHEME + name)
        data = path.read_bytes()
        assert len(data) == corpus.size and hashlib.sha256(data).hexdigest() == corpus.sha256
        assert "site-packages" in str(path) or path.is_relative_to(ROOT / "lm")  # package data inside lm, nothing beside the checkout
    cfg = load_config(ROOT / "configs" / "shakespeare_cpu.yaml")
    assert cfg.data.text_file == "builtin:tinyshakespeare" and read_text(cfg.data).startswith("First Citizen:")
    with pytest.raises(LMError, match="lm data list"):
        packaged.path("builtin:nope")


def test_the_quickstart_configs_need_no_network():
    for name in ("tiny", "shakespeare_cpu", "shakespeare_char", "grimm_spm"):
        text_file = load_config(ROOT / "configs" / f"{name}.yaml").data.text_file
        assert packaged.is_packaged(text_file), name


def test_the_tpu_extra_is_jax_tpu_in_the_same_range():
    requires = importlib.metadata.requires("lm")
    tpu = [r for r in requires if r.endswith('extra == "tpu"')]
    core = [r for r in requires if r.startswith("jax") and "extra" not in r]
    assert tpu == [core[0].replace("jax", "jax[tpu]", 1) + '; extra == "tpu"'], (tpu, core)


def test_lm_data_list_names_the_packaged_corpora():
    result = subprocess.run([sys.executable, "-m", "lm.data", "list"], cwd=ROOT, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "builtin:tinyshakespeare" in result.stdout and "Gutenberg" in result.stdout


@pytest.mark.slow
def test_train_prints_only_its_own_lines_with_every_extra_installed(tmp_path):
    """No libtpu start-up errors where libtpu is installed but there is no TPU (JAX_PLATFORMS left unset)."""
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    result = subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.yaml", f"run_dir={tmp_path}",
                             "train.steps=2", "optim.warmup_steps=1", "log.every=1", "eval.every=0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert result.stdout.splitlines()[0].endswith("parameters (adamw) | float32 compute, xla attention")  # the banner first
