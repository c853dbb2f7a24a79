"""model.attention=xla|cudnn|auto: how `auto` chooses, and every kernel this platform has agrees."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.attention import attend, resolve as attention_impl
from lm.model.transformer import Transformer
from lm.training.runtime import platform_kernels
from lm.training.step import init_params
from tests.conftest import ROOT


def test_auto_choice():
    assert attention_impl("auto", "bfloat16", 64, False, platform="gpu") == "cudnn"
    assert attention_impl("auto", "float16", 128, False, platform="gpu") == "cudnn"
    assert attention_impl("auto", "float32", 64, False, platform="gpu") == "xla"  # cuDNN flash: half precision only
    assert attention_impl("auto", "bfloat16", 12, False, platform="gpu") == "xla"  # head width not a multiple of 8
    assert attention_impl("auto", "bfloat16", 256, False, platform="gpu") == "xla"
    assert attention_impl("auto", "bfloat16", 64, True, platform="gpu") == "xla"  # packed-document mask
    for platform in ("cpu", "tpu"):
        assert attention_impl("auto", "bfloat16", 64, False, platform=platform) == "xla"
    assert attention_impl("xla", "bfloat16", 64, False, platform="gpu") == "xla"
    assert attention_impl("cudnn", "bfloat16", 64, False, platform="gpu") == "cudnn"
    with pytest.raises(LMError, match="cudnn needs an NVIDIA GPU"):
        attention_impl("cudnn", "bfloat16", 64, False, platform="cpu")


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-5), ("bfloat16", 0.1)])
def test_available_kernels_agree(dtype, tol):
    """Logits of every kernel usable here equal XLA's (bf16 tolerance: a few bf16 ulps of O(1) logits)."""
    kernels = ["xla", "auto"] + (["cudnn"] if jax.default_backend() == "gpu" and dtype == "bfloat16" else [])
    base = ModelConfig(vocab_size=64, n_layers=1, d_model=64, n_heads=4, n_kv_heads=2, max_seq_len=32,
                       position="rope", init_std=0.1, dtype=dtype)
    params = init_params(Transformer(base), jax.random.key(0), 8)
    tokens_BxT = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 32)))
    segments_BxT = jnp.asarray(np.repeat([[0, 1]], 16, axis=1).repeat(2, axis=0))
    outputs = {}
    for kernel in kernels:
        cfg = dataclasses.replace(base, attention=kernel)
        model = Transformer(cfg, kernels=platform_kernels(cfg, jax.default_backend(), packed=True))
        outputs[kernel] = [np.asarray(jax.jit(model.apply)({"params": params}, tokens_BxT, None, seg), np.float32)
                           for seg in (None, segments_BxT)]
    assert np.abs(outputs["xla"][0]).max() > 0.1
    for kernel in kernels[1:]:
        for ours, reference in zip(outputs[kernel], outputs["xla"]):
            np.testing.assert_allclose(ours, reference, atol=tol, rtol=0)


def naive_attention(q, k, v, visible_TxS, scale):
    """softmax over the visible keys, spelled out: [B, T, N, H] (k, v with K heads repeated to N)."""
    groups = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
    logits = jnp.einsum("btnh,bsnh->bnts", q, k) * scale
    weights = jax.nn.softmax(jnp.where(visible_TxS, logits, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", weights, v)


@pytest.mark.parametrize("window,scale", [(None, None), (3, None), (1, None), (5, 0.5)])
def test_attend_windows_and_scales_like_the_definition(window, scale):
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(0), 3), [(2, 9, 4, 8), (2, 9, 2, 8), (2, 9, 2, 8)]))
    i, j = np.arange(9)[:, None], np.arange(9)[None, :]
    visible = (j <= i) & ((i - (window or 99)) < j)
    expected = naive_attention(q, k, v, visible, scale or 8 ** -0.5)
    np.testing.assert_allclose(attend(q, k, v, window=window, scale=scale), expected, atol=1e-5)
    if window == 1:  # each query sees only itself
        np.testing.assert_allclose(attend(q, k, v, window=1), jnp.repeat(v, 2, axis=2), atol=1e-5)


@pytest.mark.parametrize("window,softcap,packed", [(None, None, False), (40, None, True), (None, 5.0, True)])
def test_query_blocks_compute_the_same_attention_and_gradients(window, softcap, packed):
    """attend(query_block=Q) (the CPU's causal path: keys above the diagonal skipped) against the
    whole score matrix, over a length that is no multiple of Q, windows reaching back over blocks."""
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(1), 3), [(2, 90, 4, 8), (2, 90, 2, 8), (2, 90, 2, 8)]))
    segments = jnp.repeat(jnp.array([[0, 1, 1, 2, 3, 3], [0, 0, 0, 1, 1, 1]]), 15, axis=1) if packed else None

    def loss(q, block):
        out = attend(q, k, v, window=window, softcap=softcap, segment_ids_BxT=segments, query_block=block)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    (_, whole), grad_whole = jax.value_and_grad(loss, has_aux=True)(q, 0)
    (_, blocked), grad_blocked = jax.value_and_grad(loss, has_aux=True)(q, 32)
    np.testing.assert_allclose(blocked, whole, atol=2e-6)
    np.testing.assert_allclose(grad_blocked, grad_whole, atol=2e-6)
    assert platform_kernels(ModelConfig(), "cpu").query_block > 0 == platform_kernels(ModelConfig(), "gpu").query_block


def attention_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "benchmarks/attention_check.py", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_attention_check_reports_the_bf16_error_against_float32():
    done = attention_check("--implementation", "xla", "--batch", "1", "configs/tiny.yaml")
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["shape"] == [1, 32, 4, 4, 16]  # tiny: batch, seq_len, heads, kv heads, head width
    xla = result["xla"]
    assert 0 < xla["max_abs_err_out"] < 0.05 and 0 < xla["max_abs_err_grad"] < 0.05  # bf16, not exact
    assert xla["fwd_bwd_ms"] > 0


def test_attention_check_asks_for_a_gpu_for_cudnn():
    done = attention_check("configs/tiny.yaml")
    assert done.returncode != 0 and "needs an NVIDIA GPU" in done.stderr
