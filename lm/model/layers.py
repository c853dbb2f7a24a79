"""Transformer layers as small Flax Linen modules: positions, norms, feed-forward.

Every parameter carries logical axis names (`nn.with_logical_partitioning`), which
`lm.parallel.mesh` maps onto the device mesh. Shapes are named in variables: B batch,
T length, D model width, N query heads, K key/value heads, H head width, F hidden width.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from lm.config import ModelConfig
from lm.model.splash import Splash


@dataclasses.dataclass(frozen=True)
class Kernels:
    """How the model's heavy operations run. The runtime picks them for its platform
    (lm.training.runtime.platform_kernels); the model never asks which platform it is on."""

    attention: str | Splash = "xla"  # "xla", "cudnn", or the splash kernel with its mesh (lm.model.splash)
    dot_general: Callable | None = None  # of every Dense projection; None: lax.dot_general
    query_block: int = 0  # XLA causal attention this many queries at a time (lm.model.attention.attend); 0: all

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


def rope_frequencies(cfg: ModelConfig, theta: float, scaled: bool) -> np.ndarray:
    """The inverse frequencies [H/2] of RoPE with base `theta`, after cfg.rope_scaling when `scaled`.

    linear: all divided by rope_factor. llama3 (Llama 3.1): wavelengths longer than
    rope_original_max_len / rope_low_freq_factor are divided by rope_factor, those shorter than
    rope_original_max_len / rope_high_freq_factor kept, the band between interpolated smoothly.
    Computed in float64, then used in float32.
    """
    half = cfg.head_dim // 2
    inv_freq = theta ** (-np.arange(half, dtype=np.float64) / half)
    if scaled and cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif scaled and cfg.rope_scaling == "llama3":
        low, high, old_len = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
        smooth = np.clip((old_len * inv_freq / (2 * math.pi) - low) / (high - low), 0.0, 1.0)
        inv_freq = (1 - smooth) * inv_freq / cfg.rope_factor + smooth * inv_freq
    return inv_freq.astype(np.float32)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_F: np.ndarray) -> jax.Array:
    """Rotary position embedding, in the rotate-half layout Llama uses."""
    half = x_BxTxNxH.shape[-1] // 2
    angles_BxTx1xF = (positions_BxT[..., None].astype(jnp.float32) * jnp.asarray(inv_freq_F))[:, :, None, :]
    cos, sin = jnp.cos(angles_BxTx1xF), jnp.sin(angles_BxTx1xF)
    x = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x_BxTxNxH.dtype)


class RMSNorm(nn.Module):
    """x / rms(x) * scale over the last axis, statistics in float32; with `plus_one` the
    factor is (1 + scale), scale starting at 0 (Gemma)."""

    epsilon: float
    dtype: str
    param_dtype: str
    plus_one: bool = False

    @nn.compact
    def __call__(self, x):
        init = zeros_init(("norm",)) if self.plus_one else ones_init(("norm",))
        scale = self.param("scale", init, (x.shape[-1],), self.param_dtype).astype(jnp.float32)
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
        return (y * (1.0 + scale if self.plus_one else scale)).astype(self.dtype)


# Activations a remat policy may keep (lm.model.transformer): every norm's input, and the
# feed-forward's projections (gated: gate and up) and the hidden activation the down projection reads.
NORM_INPUT = "norm_input"
MLP_GATE, MLP_UP, MLP_HIDDEN = "mlp_gate", "mlp_up", "mlp_hidden"


def make_norm(cfg: ModelConfig, name: str) -> nn.Module:
    """LayerNorm (optionally without bias) or RMSNorm (scale, or 1 + scale); statistics in float32."""
    if cfg.norm != "layernorm":
        return RMSNorm(cfg.norm_eps, cfg.dtype, cfg.param_dtype, plus_one=cfg.norm == "rmsnorm_plus_one", name=name)
    return nn.LayerNorm(epsilon=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype, use_bias=cfg.use_bias,
                        scale_init=ones_init(("norm",)), bias_init=zeros_init(("norm",)), name=name)


def norm_saved(cfg: ModelConfig, name: str, x):
    """make_norm(cfg, name) applied to x, its input named for remat policies (NORM_INPUT)."""
    return make_norm(cfg, name)(checkpoint_name(x, NORM_INPUT))


class MLP(nn.Module):
    """Feed-forward: GELU (GPT-2), SwiGLU (Llama) or GeGLU with the tanh GELU (Gemma)."""

    cfg: ModelConfig
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, x_BxTxD):
        cfg = self.cfg

        def dense(features, names, std, name):
            return nn.Dense(features, use_bias=cfg.use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                            kernel_init=normal_init(std, names), bias_init=zeros_init(names[-1:]),
                            dot_general=self.kernels.dot_general, name=name)

        up_BxTxF = checkpoint_name(dense(cfg.ff_dim, ("embed", "mlp"), cfg.init_std, "up")(x_BxTxD), MLP_UP)
        if cfg.mlp in ("swiglu", "geglu"):
            gate_BxTxF = checkpoint_name(dense(cfg.ff_dim, ("embed", "mlp"), cfg.init_std, "gate")(x_BxTxD), MLP_GATE)
            act = nn.silu if cfg.mlp == "swiglu" else functools.partial(nn.gelu, approximate=True)
            h_BxTxF = act(gate_BxTxF) * up_BxTxF
        else:
            h_BxTxF = nn.gelu(up_BxTxF, approximate=True)
        h_BxTxF = checkpoint_name(h_BxTxF, MLP_HIDDEN)
        down_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        return dense(x_BxTxD.shape[-1], ("mlp", "embed"), down_std, "down")(h_BxTxF)


def _mix32(x):
    """A 32-bit integer finaliser (xor-shift-multiply): every input bit flips about half the output bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def hashed_bits(shape: tuple[int, ...], seed_2: jax.Array, start: tuple[int, ...] = (),
                whole: tuple[int, ...] = ()) -> jax.Array:
    """32 pseudo-random bits per element of `shape`: a hash of (seed, element index).

    About a dozen integer operations per element, fused into whatever consumes them, where
    threefry takes about fifty; the index is built from per-axis iotas so a sharded array
    hashes its own slice without gathering. A block of a larger array (its first element at
    `start` of an array of shape `whole`) draws exactly that array's bits there. Arrays of
    2**32 elements or more also hash their leading axes' index, so no two elements share bits.
    """
    start, whole = start or (0,) * len(shape), whole or shape
    index, trailing, stride = jnp.zeros(shape, jnp.uint32), None, 1
    for axis in reversed(range(len(shape))):
        if stride * whole[axis] > 2**32 and trailing is None:  # the flat index would wrap: count the rest apart
            trailing, index, stride = index, jnp.zeros(shape, jnp.uint32), 1
        position = jax.lax.broadcasted_iota(jnp.uint32, shape, axis) + jnp.uint32(start[axis])
        index = index + position * jnp.uint32(stride % 2**32)  # 2**32 only before leading axes of size 1
        stride *= whole[axis]
    if trailing is None:
        return _mix32(_mix32(index ^ seed_2[0]) ^ seed_2[1])
    return _mix32(_mix32(_mix32(trailing ^ seed_2[0]) ^ seed_2[1]) ^ _mix32(index ^ jnp.uint32(0x9E3779B9)))


def dropout_seed(module: nn.Module) -> jax.Array:
    """Two words of `module`'s "dropout" rng: the seed of its `hashed_bits` masks (a function of
    the run's seed, step, device and the module's place in the model)."""
    return jax.random.bits(module.make_rng("dropout"), (2,), jnp.uint32)


def drop(x: jax.Array, rate: float, seed_2: jax.Array, start: tuple[int, ...] = (),
         whole: tuple[int, ...] = ()) -> jax.Array:
    """Inverted dropout of `x` by the `hashed_bits` mask of `seed_2` (`start`, `whole`: see there):
    each element zeroed with probability `rate`, the rest scaled by 1 / (1 - rate)."""
    threshold = jnp.uint32(min(round(rate * 2**32), 2**32 - 1))
    keep = hashed_bits(x.shape, seed_2, start, whole) >= threshold
    return jnp.where(keep, x * jnp.asarray(1.0 / (1.0 - rate), x.dtype), jnp.zeros((), x.dtype))


class Dropout(nn.Module):
    """Inverted dropout: zeroes each element with probability `rate`, scales the rest by 1 / (1 - rate).

    The keep mask is `hashed_bits` seeded by two words of the "dropout" rng, so masks are a
    function of that rng (exact resume) at a fraction of threefry's cost.
    """

    rate: float
    deterministic: bool = True

    @nn.compact
    def __call__(self, x):
        if self.deterministic or self.rate == 0.0:
            return x
        return drop(x, self.rate, dropout_seed(self))
