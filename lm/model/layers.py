"""Transformer layers as small Flax Linen modules: positions, norms, feed-forward.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), which
`lm.parallel.mesh` maps onto the device mesh. Shapes are named in variables: B batch,
T length, D model width, N query heads, K key/value heads, H head width, F hidden width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.model.splash import Splash


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How the model's heavy operations run. The runtime picks them for its platform
    (lm.training.runtime.platform_kernels); the model never asks which platform it is on."""

    attention: str | Splash = "xla"  # "xla", "cudnn", or the splash kernel with its mesh (lm.model.splash)
    dot_general: Callable | None = None  # of every Dense projection; None: lax.dot_general

    @property
    def attention_name(self) -> str:
        """The resolved implementation's name (lm.model.attention.IMPLEMENTATIONS)."""
        return getattr(self.attention, "name", self.attention)


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


class MLP(nn.Module):
    """Feed-forward: GELU (GPT-2) or SwiGLU (Llama)."""

    cfg: ModelConfig
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg

        def dense(features, names, std, name):
            return nn.Dense(features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            kernel_init=normal_init(std, names), bias_init=zeros_init(names[-1:]),
                            dot_general=self.kernels.dot_general, name=name)

        up = dense(cfg.ff_dim, ("embed", "mlp"), cfg.init_std, "up")
        if cfg.mlp == "swiglu":
            gate = dense(cfg.ff_dim, ("embed", "mlp"), cfg.init_std, "gate")
            h_BxTxF = nn.silu(gate(x_BxTxD)) * up(x_BxTxD)
        else:
            h_BxTxF = nn.gelu(up(x_BxTxD), approximate=True)
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return dense(x_BxTxD.shape[-1], ("mlp", "embed"), down_std, "down")(h_BxTxF)
