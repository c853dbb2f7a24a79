"""Ahead-of-time TPU compiles on a CPU-only machine (needs the `tpu` extra: libtpu)."""

from __future__ import annotations

import json
import os

import pytest

from lm.cli import main as cli_main
from lm.config import load_config

# Before any jax backend starts: no TPU is used, so let libtpu load beside other processes.
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from lm.tools import aot  # noqa: E402
from lm.errors import LMError  # noqa: E402

TOPOLOGY = "v5e:2x2"  # 4 chips of 16 GiB
# The tiny model, widened so TPU tile padding (8 x 128) does not dominate its few kilobytes.
TILE_FRIENDLY = ("model.d_model=256", "model.n_heads=2", "model.vocab_size=512")


@pytest.fixture(scope="module")
def reports(tmp_path_factory, request):
    """Compiles each tiny-config variant once per module."""
    from tests.conftest import ROOT, SHAKESPEARE

    text = SHAKESPEARE
    cache = {}

    def report(*overrides: str) -> dict:
        if overrides not in cache:
            cfg = load_config(ROOT / "configs" / "tiny.yaml", [f"data.text_file={text}", *TILE_FRIENDLY, *overrides])
            cache[overrides] = aot.analyse(cfg, TOPOLOGY)
        return cache[overrides]

    return report


def test_tiny_compiles_for_data_and_fsdp_meshes(reports):
    data = reports()
    fsdp = reports("parallel.data=1", "parallel.fsdp=-1")
    assert data["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1} and data["device_kind"].startswith("TPU v5")
    assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    for r in (data, fsdp):
        assert r["fits"] and 0 < r["hbm_needed_bytes"] < r["hbm_capacity_bytes"] == 16 * aot.GIB
        assert r["estimated_step_s"] > 0 and 0 < r["estimated_mfu"] < 1
    # FSDP keeps a quarter of the parameters and Adam moments on each chip; data parallelism all of them.
    state_bytes = 3 * 4 * data["params"]
    assert data["hbm_argument_bytes"] >= state_bytes > 2 * fsdp["hbm_argument_bytes"]
    # cost_analysis reports one chip's share: times 4 chips it is the model's FLOPs (plus softmax, norms, AdamW).
    for r in (data, fsdp):
        assert 1.0 < r["compiler_flops_per_step"] / r["model_flops_per_step"] < 1.5


def test_memory_grows_with_batch(reports):
    small, large = reports("train.seq_len=64"), reports("train.seq_len=64", "train.batch_size=1024")
    # 256 rows per chip: float32 logits alone are 256 x 64 x 512 x 4 bytes = 32 MiB.
    assert large["hbm_temp_bytes"] > 10 * small["hbm_temp_bytes"]
    assert large["hbm_needed_bytes"] > small["hbm_needed_bytes"] + 32 * 2**20
    assert large["hbm_argument_bytes"] > small["hbm_argument_bytes"]  # the batch itself is an argument
    assert large["model_flops_per_step"] == 128 * small["model_flops_per_step"]


@pytest.mark.slow
def test_scanned_accumulated_step_is_costed_like_the_unrolled_one(reports):
    """XLA counts a loop body once; the extrapolated cost must match a loop-free compile."""
    unrolled = reports("model.n_layers=3", "train.batch_size=16")
    looped = reports("model.n_layers=3", "train.batch_size=16", "model.scan_layers=true", "train.grad_accum_steps=2")
    assert unrolled["cost_source"] == "the compiled step" and looped["cost_source"] != unrolled["cost_source"]
    assert looped["compiler_flops_per_step"] == pytest.approx(unrolled["compiler_flops_per_step"], rel=0.05)


def test_oversized_config_does_not_fit(shakespeare, capsys):
    # Float32 logits alone: 4096 x 64 x 65536 x 4 bytes = 64 GiB, 16 GiB per chip, plus their gradients.
    cli_main(["aot", "--config", "configs/tiny.yaml", "--topology", TOPOLOGY, "--json", f"data.text_file={shakespeare}",
              "model.vocab_size=65536", "train.batch_size=4096", "train.seq_len=64"])
    r = json.loads(capsys.readouterr().out)
    assert not r["fits"] and r["hbm_needed_bytes"] > r["hbm_capacity_bytes"]
    advice = " ".join(r["suggestions"])
    assert "train.grad_accum_steps" in advice and "model.remat=block" in advice and "parallel.fsdp=-1" in advice
    assert "DOES NOT FIT" in aot.format_report(r)


def test_bad_topology_and_missing_libtpu_are_one_line_errors(monkeypatch):
    with pytest.raises(LMError, match="GENERATION:SHAPE"):
        aot.topology_devices("v9:2x2")
    with pytest.raises(LMError, match="libtpu rejected"):
        aot.topology_devices("v5e:3x3")
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LMError, match=r"pip install"):
        aot.topology_devices("v5e:2x2")
