"""Causal self-attention (multi-head, grouped- or multi-query) and its implementations.

`attend` is the one place scores are computed, with the implementation the runtime chose
(`resolve`): XLA's `jax.nn.dot_product_attention` everywhere, cuDNN's fused flash attention
on NVIDIA GPUs. The `Attention` module adds the projections, RoPE and the KV cache.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.layers import Kernels, apply_rope, make_norm, normal_init, rope_frequencies, zeros_init

IMPLEMENTATIONS = ("xla", "cudnn")


def resolve(name: str, dtype, head_dim: int, packed: bool, platform: str) -> str:
    """The implementation of model.attention=xla|cudnn|auto on `platform` (the runtime's devices).

    `auto` picks cuDNN's fused flash attention on a GPU where it applies (bf16/fp16, head
    width a multiple of 8 up to 128, no packed-document mask), and XLA everywhere else.
    """
    if name == "cudnn" and platform != "gpu":
        raise LMError(f"model.attention=cudnn needs an NVIDIA GPU but this is {platform}; use auto or xla.")
    if name != "auto":
        return name
    fused_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if platform == "gpu" and fused_ok and not packed else "xla"


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS=None, *, causal: bool = True,
           window: int | None = None, scale: float | None = None, implementation: str = "xla") -> jax.Array:
    """softmax(scale * q k^T) v over the keys each query may see: [B, T, N, H].

    `causal` hides later keys (query i sees keys j <= i); `window` W (with `causal`) also hides
    keys W or more positions back (visible iff i - W < j <= i); `mask_Bx1xTxS` (True = visible)
    hides more, e.g. other documents of a packed row, or cache slots not yet written.
    `scale` defaults to 1 / sqrt(H).
    """
    if window is not None and not causal:
        raise ValueError("attend: a sliding window needs causal=True (put it in the mask otherwise)")
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, scale=scale,
                                        is_causal=causal, local_window_size=None if window is None else (window - 1, 0),
                                        implementation=implementation)


class Attention(nn.Module):
    """Causal self-attention with n_kv_heads <= n_heads (multi-head, grouped- or multi-query).

    Block `layer` of the stack decides the layer's sliding window and RoPE (ModelConfig.layer_window,
    layer_rope). Queries and keys are optionally normalised before RoPE (model.qk_norm: per head,
    or over all heads' projection as OLMo 2 does). With `decode=True` keys and values are kept in a
    "cache" collection ([B, S, K, H] plus a write index): each call appends its T positions and
    attends to everything cached so far (within the window), so generating one token costs one
    position. `model.init` on a [B, S] input sizes it.
    """

    cfg: ModelConfig
    decode: bool = False
    kernels: Kernels = Kernels()
    layer: int = 0

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
        cfg = self.cfg
        N, K, H = cfg.n_heads, cfg.kv_heads, cfg.head_dim

        def project(features, names, name, bias):
            return nn.DenseGeneral(
                features, use_bias=bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                kernel_init=normal_init(cfg.init_std, ("embed",) + names),
                bias_init=zeros_init(names), dot_general=self.kernels.dot_general, name=name)(x_BxTxD)

        in_bias = cfg.use_bias or cfg.qkv_bias
        q_BxTxNxH = self._qk_norm(project((N, H), ("heads", "head_dim"), "query", in_bias), "query_norm")
        k_BxTxKxH = self._qk_norm(project((K, H), ("kv_heads", "head_dim"), "key", in_bias), "key_norm")
        v_BxTxKxH = project((K, H), ("kv_heads", "head_dim"), "value", in_bias)
        rope = cfg.layer_rope(self.layer)
        if rope is not None:
            inv_freq_F = rope_frequencies(cfg, *rope)
            q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, inv_freq_F)
            k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, inv_freq_F)
        window = cfg.layer_window(self.layer)
        scale = cfg.attn_scale_dim ** -0.5 if cfg.attn_scale_dim else None
        if self.decode:  # one query position per step: memory-bound, and the cache mask is arbitrary
            k_BxSxKxH, v_BxSxKxH, mask_1x1xTxS = self._extend_cache(k_BxTxKxH, v_BxTxKxH, window)
            out_BxTxNxH = attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_1x1xTxS, causal=False, scale=scale)
        else:
            out_BxTxNxH = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, window=window, scale=scale,
                                 implementation=self.kernels.attention)
        return nn.DenseGeneral(
            x_BxTxD.shape[-1], axis=(-2, -1), use_bias=cfg.use_bias, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layers), ("heads", "head_dim", "embed")),
            bias_init=zeros_init(("embed",)), dot_general=self.kernels.dot_general, name="out")(out_BxTxNxH)

    def _qk_norm(self, x_BxTxNxH, name: str):
        """model.qk_norm of queries or keys: per head (over H), over all heads (N x H), or none."""
        if self.cfg.qk_norm == "head":
            return make_norm(self.cfg, name)(x_BxTxNxH)
        if self.cfg.qk_norm == "all":
            flat_BxTxNH = x_BxTxNxH.reshape(x_BxTxNxH.shape[:2] + (-1,))
            return make_norm(self.cfg, name)(flat_BxTxNH).reshape(x_BxTxNxH.shape)
        return x_BxTxNxH

    def _extend_cache(self, k_BxTxKxH, v_BxTxKxH, window: int | None):
        """Writes this chunk at the cache index; returns all cached keys/values [B, S, K, H] and the mask
        (slot j visible to the query at position i iff j <= i, and i - window < j on a sliding layer)."""
        key = self.variable("cache", "cached_key", jnp.zeros, k_BxTxKxH.shape, k_BxTxKxH.dtype)
        value = self.variable("cache", "cached_value", jnp.zeros, v_BxTxKxH.shape, v_BxTxKxH.dtype)
        index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
        start, T, S = index.value, k_BxTxKxH.shape[1], key.value.shape[1]
        key.value = jax.lax.dynamic_update_slice(key.value, k_BxTxKxH.astype(key.value.dtype), (0, start, 0, 0))
        value.value = jax.lax.dynamic_update_slice(value.value, v_BxTxKxH.astype(value.value.dtype), (0, start, 0, 0))
        index.value = start + T
        slot_1xS, query_Tx1 = jnp.arange(S)[None, :], start + jnp.arange(T)[:, None]
        visible_TxS = slot_1xS <= query_Tx1
        if window is not None:
            visible_TxS &= slot_1xS > query_Tx1 - window
        return key.value, value.value, visible_TxS[None, None]
