"""benchmarks/gpu.sh on the CPU: every stage's config and XLA flags are valid, and a dry run with tiny
shapes writes its JSON lines and table without TFDS, grain, tensorboardX or TensorFlow."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from lm.config import load_config
from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu_bench.py")
gpu_bench = sys.modules["gpu_bench"] = importlib.util.module_from_spec(spec)  # (dataclasses look it up)
spec.loader.exec_module(gpu_bench)
DRY_STAGES = ["lm_gpt2_b32", "torch_gpt2_b32", "hlo_gpt2_b32", "shakespeare_char"]  # one of each kind


def test_every_stage_has_a_valid_config_and_xla_flags_this_jax_parses():
    for stage in gpu_bench.STAGES:
        if stage.kind != "torch":
            load_config(ROOT / stage.args[0], stage.args[1:])  # a mistyped override fails here, not on the GPU
    flags = " ".join(s.xla_flags for s in gpu_bench.STAGES if s.xla_flags)
    assert "--xla_gpu_enable_triton_gemm=false" in flags
    # XLA parses XLA_FLAGS when a backend starts, aborting on a flag it does not know
    result = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, text=True,
                            env={**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.slow
def test_dry_run_writes_json_lines_and_the_table(tmp_path):
    blocked = tmp_path / "blocked"
    for module in ("tensorflow_datasets", "grain", "tensorboardX", "tensorflow"):  # absent on the GPU machine
        (blocked / module).mkdir(parents=True)
        (blocked / module / "__init__.py").write_text(f"raise ImportError('{module} is not installed here')\n")
    env = {**os.environ, "LM_GPU_BENCH_DRY": "1", "OUT": str(tmp_path / "out"), "PYTHONPATH": str(blocked)}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), *DRY_STAGES], env=env, cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in (tmp_path / "out" / "gpu_bench.jsonl").read_text().splitlines()]
    assert lines[0]["stage"] == "machine" and lines[0]["dry_run"]
    by_stage = {line["stage"]: line for line in lines[1:]}
    assert list(by_stage) == DRY_STAGES
    assert all(line["status"] == "ok" for line in by_stage.values()), [line.get("error") for line in lines[1:]]
    assert by_stage["lm_gpt2_b32"]["result"]["tokens_per_sec"] > 0
    assert by_stage["torch_gpt2_b32"]["result"]["flops_per_token"] > 0
    recipe = by_stage["shakespeare_char"]["result"]
    assert recipe["steps_done"] == 2 and recipe["eval"]["step"] == 2 and recipe["val_loss"]
    assert (tmp_path / "out" / "shakespeare_char-metrics.jsonl").exists()
    assert list((tmp_path / "out" / "hlo-hlo_gpt2_b32").glob("*jit_train_step*after_optimizations.txt"))
    table = result.stdout[result.stdout.index("stage  "):].splitlines()
    assert table[0].split()[:6] == ["stage", "tokens/s", "step", "ms", "MFU", "peak"]
    rows = {row.split()[0]: row for row in table[1:]}
    assert list(rows) == [s.name for s in gpu_bench.STAGES]
    assert "1.00" in rows["torch_gpt2_b32"].split() and "not selected" in rows["ab_unrolled"]
