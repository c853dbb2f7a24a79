"""model.attention=xla|cudnn|auto: how `auto` chooses, every kernel this platform has agrees, and
model.attention_dropout drops attention probabilities (XLA only)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model import attention
from lm.model.attention import ProbabilityDropout, attend, resolve as attention_impl
from lm.model.transformer import Transformer
from lm.training.runtime import platform_kernels, platform_model
from lm.training.step import init_params, init_state, train_step
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


@pytest.mark.parametrize("window,softcap,packed,rate", [(None, None, False, 0), (40, None, True, 0),
                                                       (None, 5.0, True, 0), (40, None, True, 0.3)])
def test_query_blocks_compute_the_same_attention_and_gradients(window, softcap, packed, rate):
    """attend(query_block=Q) (the CPU's causal path: keys above the diagonal skipped) against the
    whole score matrix, over a length that is no multiple of Q, windows reaching back over blocks;
    with attention dropout each block draws the whole matrix's mask at its place."""
    q, k, v = (jax.random.normal(key, shape) for key, shape in zip(
        jax.random.split(jax.random.key(1), 3), [(2, 90, 4, 8), (2, 90, 2, 8), (2, 90, 2, 8)]))
    segments = jnp.repeat(jnp.array([[0, 1, 1, 2, 3, 3], [0, 0, 0, 1, 1, 1]]), 15, axis=1) if packed else None
    dropout = ProbabilityDropout(rate, jnp.array([3, 5], jnp.uint32)) if rate else None

    def loss(q, block):
        out = attend(q, k, v, window=window, softcap=softcap, segment_ids_BxT=segments, query_block=block,
                     dropout=dropout)
        return (out * jnp.cos(jnp.arange(out.size).reshape(out.shape))).sum(), out

    (_, whole), grad_whole = jax.value_and_grad(loss, has_aux=True)(q, 0)
    (_, blocked), grad_blocked = jax.value_and_grad(loss, has_aux=True)(q, 32)
    np.testing.assert_allclose(blocked, whole, atol=2e-6)
    np.testing.assert_allclose(grad_blocked, grad_whole, atol=2e-6)
    assert platform_kernels(ModelConfig(), "cpu").query_block > 0 == platform_kernels(ModelConfig(), "gpu").query_block


def test_attention_dropout_drops_probabilities_at_its_rate_independently():
    """With values one-hot per key position the output is the attention probabilities themselves:
    each visible one is dropped with probability `rate` or scaled by 1 / (1 - rate); heads, batch
    rows and seeds draw independent masks; the same seed draws the same mask."""
    B, T, N, K, rate = 8, 64, 4, 2, 0.25
    q = jnp.zeros((B, T, N, T))  # equal logits: weight 1 / (i + 1) on each key j <= i
    v = jnp.broadcast_to(jnp.eye(T)[None, :, None, :], (B, T, K, T))

    def weights(seed):
        return np.asarray(attend(q, v, v, dropout=ProbabilityDropout(rate, jnp.array(seed, jnp.uint32))))

    w = weights([1, 2])
    visible = np.broadcast_to(np.tril(np.ones((T, T), bool))[None, :, None, :], w.shape)
    kept = w[visible] != 0
    assert abs(kept.mean() - (1 - rate)) < 0.01  # about 66,000 visible probabilities
    uniform = np.broadcast_to(1 / np.arange(1, T + 1)[None, :, None, None], w.shape)[visible]
    np.testing.assert_allclose(w[visible][kept], uniform[kept] / (1 - rate), rtol=1e-5)
    assert (w[~visible] == 0).all()
    agree = rate ** 2 + (1 - rate) ** 2  # how often two independent masks agree
    m, other = w != 0, weights([1, 3]) != 0
    for a, b, where in [(m[:, :, 0], m[:, :, 1], visible[:, :, 0]), (m[:, :, 0], m[:, :, 2], visible[:, :, 0]),
                        (m[0], m[1], visible[0]), (m, other, visible)]:  # heads (same, other kv head), rows, seeds
        assert abs((a == b)[where].mean() - agree) < 0.02
    assert (weights([1, 2]) == w).all()


def test_attention_dropout_needs_xla_and_auto_picks_it():
    for platform, fast in (("gpu", "cudnn"), ("tpu", "splash")):
        assert attention_impl("auto", "bfloat16", 64, False, platform, seq_len=1024) == fast
        assert attention_impl("auto", "bfloat16", 64, False, platform, seq_len=1024, dropout=0.2) == "xla"
        with pytest.raises(LMError, match=f"model.attention={fast} cannot drop .* model.attention_dropout is 0.2; "
                                          "set model.attention=auto"):
            attention_impl(fast, "bfloat16", 64, False, platform, seq_len=1024, dropout=0.2)
    cfg = ModelConfig(n_heads=2, d_model=128, attention_dropout=0.1)
    assert platform_kernels(cfg, "gpu").attention_name == "xla"
    assert platform_kernels(dataclasses.replace(cfg, attention_dropout=0.0), "gpu").attention_name == "cudnn"


def test_dtype_and_attention_auto_resolve_per_platform():
    """model.dtype=auto: bf16 compute (float32 parameters) on GPU and TPU, float32 on CPU, as the
    runtime hands it to the model; a dtype named in the config is kept."""
    cfg = ModelConfig(n_heads=2, d_model=128)
    assert (cfg.dtype, cfg.attention, cfg.param_dtype) == ("auto", "auto", "float32")
    for platform, dtype, kernel in (("gpu", "bfloat16", "cudnn"), ("tpu", "bfloat16", "splash"),
                                    ("cpu", "float32", "xla")):
        assert platform_model(cfg, platform).dtype == dtype
        assert platform_model(cfg, platform).param_dtype == "float32"
        assert platform_kernels(cfg, platform, seq_len=1024).attention_name == kernel
    assert platform_model(dataclasses.replace(cfg, dtype="float32"), "gpu").dtype == "float32"
    assert platform_kernels(dataclasses.replace(cfg, dtype="float32"), "gpu").attention_name == "xla"


def test_attention_dropout_masks_differ_by_step_layer_and_device(monkeypatch):
    """Every attention dropout mask's seed comes from the "dropout" rng: another for each layer
    (with and without nn.scan), each step and each device of a per-device step; none when deterministic."""
    seeds = []
    real_drop = attention.drop

    def recording_drop(x, rate, seed_2, *args):
        jax.debug.callback(lambda s: seeds.append(tuple(np.asarray(s).tolist())), seed_2)
        return real_drop(x, rate, seed_2, *args)

    monkeypatch.setattr(attention, "drop", recording_drop)
    tokens = jnp.zeros((2, 8), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens}
    for scan in (False, True):
        cfg = ModelConfig(vocab_size=32, n_layers=2, d_model=16, n_heads=2, max_seq_len=8, attention_dropout=0.5,
                          scan_layers=scan)
        model, tx = Transformer(cfg), optax.sgd(0.1)
        state = jax.jit(lambda rng: init_state(model, tx, rng, 8))(jax.random.key(0))
        step = functools.partial(train_step, model=model, tx=tx, schedule=lambda s: 0.1, seed=0)
        jax.block_until_ready(jax.jit(step)(state, batch))
        if not scan:  # deterministic passes draw nothing and compute as without dropout; another step, other devices
            plain = Transformer(dataclasses.replace(cfg, attention_dropout=0.0))
            np.testing.assert_array_equal(model.apply({"params": state.params}, tokens),
                                          plain.apply({"params": state.params}, tokens))
            jax.block_until_ready(jax.jit(step)(state.replace(step=jnp.int32(1)), batch))
            per_device = jax.vmap(functools.partial(step, axis_name="d"), in_axes=(None, 0), axis_name="d")
            jax.block_until_ready(jax.jit(per_device)(state, jax.tree.map(lambda x: x.reshape(2, 1, 8), batch)))
        assert len(seeds) == (8 if not scan else 2)  # 2 layers x (step 0, step 1, device 0, device 1)
        assert len(set(seeds)) == len(seeds)
        seeds.clear()


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
