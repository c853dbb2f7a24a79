"""Splash attention (the TPU kernel) run on the CPU through Pallas' interpreter, against XLA attention."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model import splash
from lm.model.attention import attend, resolve
from lm.model.layers import Kernels
from lm.model.transformer import Transformer
from lm.parallel.mesh import AXES
from lm.training.step import init_params

T = 256  # two 128-wide tiles each way: tiles on, below and above the diagonal


def kernel(block: int = 128) -> splash.Splash:
    """The kernel as the runtime builds it: under shard_map over a (one-device) data x fsdp x tensor mesh."""
    mesh = jax.make_mesh((1, 1, 1), AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3)
    return splash.Splash(block, block, mesh, ("data", "fsdp"), "tensor", interpret=True)


def qkv(n_heads: int, kv_heads: int, dtype, head_dim: int = 64):
    keys = jax.random.split(jax.random.key(0), 3)
    shapes = [(2, T, n_heads, head_dim), (2, T, kv_heads, head_dim), (2, T, kv_heads, head_dim)]
    return [jax.random.normal(key, shape).astype(dtype) for key, shape in zip(keys, shapes)]


PACKED = jnp.asarray(np.stack([np.repeat([0, 1, 2], [100, 60, 96]), np.zeros(T, int)]))  # row 2: one document


@pytest.mark.parametrize("heads,segments,dtype,tol", [
    ((2, 2), None, "float32", 2e-5),  # multi-head
    ((4, 2), PACKED, "float32", 2e-5),  # grouped-query, packed documents
    ((2, 1), PACKED, "bfloat16", 5e-2),  # multi-query, bf16: a few bf16 ulps of O(1) values
])
def test_forward_and_gradients_match_xla(heads, segments, dtype, tol):
    q, k, v = qkv(*heads, dtype)
    cotangent = jax.random.normal(jax.random.key(1), q.shape).astype(dtype)

    def run(implementation):
        @jax.jit
        def f(q, k, v, cotangent):
            out, pullback = jax.vjp(lambda *qkv: attend(*qkv, segment_ids_BxT=segments,
                                                         implementation=implementation), q, k, v)
            return out, *pullback(cotangent)
        return [np.asarray(x, np.float32) for x in f(q, k, v, cotangent)]

    ours, reference = run(kernel()), run("xla")
    assert np.abs(reference[0]).max() > 0.1 and np.abs(reference[2]).max() > 0.1
    for name, a, b in zip(("out", "dq", "dk", "dv"), ours, reference):
        np.testing.assert_allclose(a, b, atol=tol * max(1.0, np.abs(b).max()), rtol=0, err_msg=name)


@pytest.mark.parametrize("window,softcap", [(40, None), (130, 2.0)])
def test_sliding_window_and_soft_cap_match_xla(window, softcap):
    """The hooks for Mistral/Gemma-style layers: a local mask and capped logits, forward and dq."""
    q, k, v = qkv(4, 2, "float32")

    def run(implementation):
        @jax.jit
        def f(q):
            out, pullback = jax.vjp(lambda q: attend(q, k, v, window=window, softcap=softcap, scale=0.1,
                                                     segment_ids_BxT=PACKED, implementation=implementation), q)
            return out, pullback(jnp.ones_like(out))[0]
        return [np.asarray(x) for x in f(q)]

    for a, b in zip(run(kernel()), run("xla")):
        np.testing.assert_allclose(a, b, atol=2e-5, rtol=0)


def test_transformer_with_splash_matches_xla():
    """The whole model (RoPE, GQA, packed rows) with the kernel the runtime builds: logits agree."""
    cfg = ModelConfig(vocab_size=64, n_layers=1, d_model=128, n_heads=2, n_kv_heads=1, max_seq_len=T,
                      position="rope", init_std=0.1)
    params = init_params(Transformer(cfg), jax.random.key(0), 8)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, T)))
    logits = {name: jax.jit(Transformer(cfg, kernels=Kernels(attention=impl)).apply)({"params": params}, tokens,
                                                                                     None, PACKED)
              for name, impl in (("xla", "xla"), ("splash", kernel()))}
    assert np.abs(logits["xla"]).max() > 0.1
    np.testing.assert_allclose(logits["splash"], logits["xla"], atol=2e-5, rtol=0)


def test_a_block_keeping_only_its_floor_has_the_gradients_of_one_keeping_everything():
    """model.remat=none with a fused kernel keeps only the floor (lm.model.transformer.FLOOR_SAVES) and
    recomputes norms, RoPE and the SwiGLU's activation in the backward pass: the same gradients as
    XLA's attention, which keeps everything."""
    cfg = ModelConfig(vocab_size=64, n_layers=2, d_model=128, n_heads=2, n_kv_heads=1, max_seq_len=T, position="rope",
                      norm="rmsnorm", mlp="swiglu", use_bias=False, init_std=0.1)
    params = init_params(Transformer(cfg), jax.random.key(0), 8)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, T)))

    def grads(impl):
        model = Transformer(cfg, kernels=Kernels(attention=impl))
        return jax.jit(jax.grad(lambda p: model.apply({"params": p}, tokens, None, PACKED).std()))(params)

    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), grads(kernel()), grads("xla"))


def test_uneven_batches_and_tiles():
    """A batch the mesh cannot split (initialisation's one row) goes to XLA; tiles shrink to divide T."""
    spec = dataclasses.replace(kernel(), mesh=jax.sharding.AbstractMesh((2, 1, 1), AXES))  # data=2
    assert splash.applies(spec, 2, 256) and not splash.applies(spec, 1, 256) and not splash.applies(spec, 2, 200)
    assert [splash.tile(t, 512) for t in (128, 384, 640, 1024, 8192)] == [128, 384, 128, 512, 512]
    assert splash.causal_pairs(1024, 512) == 1024 * 1536 // 2  # the diagonal tiles are computed whole


def test_auto_picks_splash_on_tpu_only_for_whole_tiles():
    assert resolve("auto", "bfloat16", 64, True, "tpu", seq_len=1024) == "splash"
    assert resolve("auto", "bfloat16", 64, False, "tpu", seq_len=100) == "xla"
    assert resolve("auto", "bfloat16", 64, False, "tpu") == "xla"  # length unknown (e.g. an imported model)
    assert resolve("auto", "bfloat16", 64, False, "gpu", seq_len=1024) == "cudnn"
    assert resolve("auto", "bfloat16", 64, False, "cpu", seq_len=1024) == "xla"
    with pytest.raises(LMError, match="splash is a TPU kernel"):
        resolve("splash", "bfloat16", 64, False, "cpu", seq_len=1024)
