"""FLOPs per token against hand counts, the peak table, and the CPU probe."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from lm.config import ModelConfig
from lm.observe.flops import cpu_matmul_probe, flops_per_token, matmul_params, mfu, peak_flops, table_peak
from lm.model.transformer import Transformer
from lm.training.step import init_params


def test_flops_per_token_matches_hand_count_for_tiny_gpt():
    cfg = ModelConfig(vocab_size=259, n_layers=2, d_model=64, n_heads=4)  # d_ff 256, tied head
    per_layer = 4 * 64 * 64 + 2 * 64 * 256  # q, k, v, out + up, down
    n = 2 * per_layer + 64 * 259  # + the head matmul (tied, still computed)
    assert n == 114_880
    assert flops_per_token(cfg, seq_len=32) == 6 * n + 6 * 2 * 32 * 64  # causal attention: 6 L T d
    assert flops_per_token(cfg, seq_len=32) == 713_856


def test_flops_per_token_counts_gqa_and_swiglu():
    cfg = ModelConfig(vocab_size=100, n_layers=3, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48, mlp="swiglu")
    attention = 32 * 32 + 2 * 32 * 16 + 32 * 32  # k and v project to 2 heads x 8
    mlp = 3 * 32 * 48
    assert flops_per_token(cfg, seq_len=10) == 6 * (3 * (attention + mlp) + 32 * 100) + 6 * 3 * 10 * 32


def test_flops_per_token_counts_windows_and_explicit_head_width():
    cfg = ModelConfig(vocab_size=100, n_layers=2, d_model=32, n_heads=4, d_head=12, d_ff=48, mlp="geglu",
                      position="rope", sliding_window=4, sliding_layers="1,0")
    attention = 32 * 48 + 2 * 32 * 48 + 48 * 32  # 4 heads x 12, also for k and v (no GQA)
    mlp = 3 * 32 * 48  # gated: gate, up, down
    # layer 0 (window 4 of 16): 4 - 16 / 32 = 3.5 keys on average, layer 1: 16 / 2 = 8
    assert flops_per_token(cfg, seq_len=16) == 6 * (2 * (attention + mlp) + 32 * 100) + 12 * (3.5 + 8) * 48


@pytest.mark.parametrize("overrides", [{}, {"mlp": "swiglu", "n_kv_heads": 1, "tie_embeddings": False},
                                       {"mlp": "geglu", "d_head": 12, "qk_norm": "head", "qkv_bias": True}])
def test_matmul_params_equal_the_model_kernels(overrides):
    cfg = dataclasses.replace(ModelConfig(vocab_size=61, n_layers=2, d_model=32, n_heads=4, max_seq_len=16),
                              **overrides)
    params = init_params(Transformer(cfg), jax.random.key(0), 8)
    kernels = sum(int(np.prod(leaf.shape)) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                  if "kernel" in jax.tree_util.keystr(path))
    tied_head = 32 * 61 if cfg.tie_embeddings else 0
    assert matmul_params(cfg) == kernels + tied_head


def test_peak_table_matches_kinds_and_dtypes():
    assert table_peak("NVIDIA H100 80GB HBM3", "bfloat16") == 989e12
    assert table_peak("NVIDIA H100 PCIe", "bfloat16") == 756e12
    assert table_peak("TPU v5 lite", "bfloat16") == 197e12
    assert table_peak("TPU v5", "float32") == 459e12
    assert table_peak("NVIDIA A100-SXM4-40GB", "float32") == 156e12
    assert table_peak("Some Future Chip", "bfloat16") is None


def test_cpu_peak_is_a_cached_measurement_shared_by_devices():
    probe = cpu_matmul_probe()
    assert 1e8 < probe < 1e14
    assert cpu_matmul_probe() == probe  # measured once
    assert cpu_matmul_probe(refresh=True) >= probe  # measured again, the best kept
    probe = cpu_matmul_probe()
    total, source = peak_flops(jax.devices("cpu"), "float32")
    assert total == probe and source.startswith("measured")
    assert mfu(1000.0, 2e6, total) == pytest.approx(2e9 / probe)
    assert mfu(1000.0, 2e6, None) is None
