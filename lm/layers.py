"""Transformer layers as small Flax Linen modules: positions, norms, attention, feed-forward.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), which
`lm.sharding` maps onto the device mesh. Shapes are named in variables: B batch,
T length, D model width, N query heads, K key/value heads, H head width, F hidden width.
"""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.errors import LMError


def normal_init(std: float, names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), names)


def zeros_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), names)


def ones_init(names: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.ones_init(), names)


def sinusoidal_BxTxD(positions_BxT: jax.Array, d_model: int) -> jax.Array:
    """The fixed sin/cos position encoding of 'Attention Is All You Need'."""
    half = d_model // 2
    freqs_F = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxTxF = positions_BxT[..., None].astype(jnp.float32) * freqs_F
    enc = jnp.concatenate([jnp.sin(angles_BxTxF), jnp.cos(angles_BxTxF)], axis=-1)
    return jnp.pad(enc, ((0, 0), (0, 0), (0, d_model - 2 * half)))


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, in the rotate-half layout Llama uses."""
    half = x_BxTxNxH.shape[-1] // 2
    inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles_BxTx1xF = (positions_BxT[..., None].astype(jnp.float32) * inv_freq)[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xF), jnp.sin(angles_BxTx1xF)
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """Pre-norm layer: LayerNorm (optionally without bias) or RMSNorm; statistics in float32."""
    common = dict(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                  scale_init=ones_init(("norm",)), name=name)
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(**common)
    return nn.LayerNorm(use_bias=cfg.use_bias, bias_init=zeros_init(("norm",)), **common)


def attention_impl(name: str, dtype, head_dim: int, has_mask: bool, platform: str | None = None) -> str:
    """The `jax.nn.dot_product_attention` implementation for model.attention=xla|cudnn|auto.

    `auto` picks cuDNN's fused flash attention on a GPU where it applies (bf16/fp16, head
    width a multiple of 8 up to 128, no packed-document mask), and XLA everywhere else.
    """
    platform = platform or jax.default_backend()
    if name == "cudnn" and platform != "gpu":
        raise LMError(f"model.attention=cudnn needs an NVIDIA GPU but this is {platform}; use auto or xla.")
    if name != "auto":
        return name
    fused_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if platform == "gpu" and fused_ok and not has_mask else "xla"


class Attention(nn.Module):
    """Causal self-attention with n_kv_heads <= n_heads (multi-head, grouped- or multi-query).

    With `decode=True` keys and values are kept in a "cache" collection ([B, S, K, H] plus
    a write index): each call appends its T positions and attends to everything cached so
    far, so generating one token costs one position. `model.init` on a [B, S] input sizes it.
    """

    cfg: ModelConfig
    decode: bool = False
    dot_general: Callable | None = None  # of the projections; None: lax.dot_general

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
        cfg = self.cfg
        N, K, H = cfg.n_heads, cfg.kv_heads, cfg.head_dim

        def project(features, names, name):
            return nn.DenseGeneral(
                features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=normal_init(cfg.init_std, ("embed",) + names),
                bias_init=zeros_init(names), dot_general=self.dot_general, name=name)(x_BxTxD)

        q_BxTxNxH = project((N, H), ("heads", "head_dim"), "query")
        k_BxTxKxH = project((K, H), ("kv_heads", "head_dim"), "key")
        v_BxTxKxH = project((K, H), ("kv_heads", "head_dim"), "value")
        if cfg.position == "rope":
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
            k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
        if self.decode:
            k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT = self._extend_cache(k_BxTxKxH, v_BxTxKxH)
            impl = "xla"  # one query position per step: memory-bound, and the mask is arbitrary
        else:
            impl = attention_impl(cfg.attention, cfg.dtype, H, mask_Bx1xTxT is not None)
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask_Bx1xTxT, is_causal=not self.decode,
            implementation=impl)
        return nn.DenseGeneral(
            x_BxTxD.shape[-1], axis=(-2, -1), use_bias=cfg.use_bias, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layers), ("heads", "head_dim", "embed")),
            bias_init=zeros_init(("embed",)), dot_general=self.dot_general, name="out")(out_BxTxNxH)

    def _extend_cache(self, k_BxTxKxH, v_BxTxKxH):
        """Writes this chunk at the cache index; returns all cached keys/values [B, S, K, H] and the mask."""
        key = self.variable("cache", "cached_key", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
        value = self.variable("cache", "cached_value", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start, T, S = index.value, k_BxTxKxH.shape[1], key.value.shape[1]
        key.value = jax.lax.dynamic_update_slice(key.value, k_BxTxKxH.astype(key.value.dtype), (0, start, 0, 0))
        value.value = jax.lax.dynamic_update_slice(value.value, v_BxTxKxH.astype(value.value.dtype), (0, start, 0, 0))
        index.value = start + T
        mask_1x1xTxS = (jnp.arange(S)[None, :] <= start + jnp.arange(T)[:, None])[None, None]
        return key.value, value.value, mask_1x1xTxS


class MLP(nn.Module):
    """Feed-forward: GELU (GPT-2) or SwiGLU (Llama)."""

    cfg: ModelConfig
    dot_general: Callable | None = None  # of the projections; None: lax.dot_general

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg

        def dense(features, names, std, name):
            return nn.Dense(features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            kernel_init=normal_init(std, names), bias_init=zeros_init(names[-1:]),
                            dot_general=self.dot_general, name=name)

        up = dense(cfg.ff_dim, ("embed", "mlp"), cfg.init_std, "up")
        if cfg.mlp == "swiglu":
            gate = dense(cfg.ff_dim, ("embed", "mlp"), cfg.init_std, "gate")
            h_BxTxF = nn.silu(gate(x_BxTxD)) * up(x_BxTxD)
        else:
            h_BxTxF = nn.gelu(up(x_BxTxD), approximate=True)
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return dense(x_BxTxD.shape[-1], ("mlp", "embed"), down_std, "down")(h_BxTxF)
