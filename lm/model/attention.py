"""Causal self-attention (multi-head, grouped- or multi-query) and its implementations.

`attend` is the one place scores are computed, with the implementation the runtime chose
(`resolve`): XLA's `jax.nn.dot_product_attention` everywhere, cuDNN's fused flash attention
on NVIDIA GPUs, Pallas splash attention on TPUs (lm.model.splash). The `Attention` module
adds the projections, RoPE and the KV cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model import splash
from lm.model.layers import (Kernels, apply_rope, drop, dropout_seed, norm_saved, normal_init,
                             rope_frequencies, zeros_init)

IMPLEMENTATIONS = ("xla", "cudnn", splash.NAME)
# Activations a remat policy may keep (lm.model.transformer.REMAT_SAVES): the projections
# after RoPE, and attend's output (splash: the kernel's output and log-sum-exp).
QKV_NAMES = ("query", "key", "value")
ATTENTION_OUT = "attention_out"
# cuDNN's fused attention keeps its output and softmax statistics for the backward pass as the
# outputs of this JAX primitive, which carry no checkpoint name: policies saving ATTENTION_OUT
# save them (lm.model.transformer.saving), or a remat'd block would run the kernel's forward again.
CUDNN_FORWARD = "dot_product_attention_fwd_wrapper"


def resolve(name: str, dtype, head_dim: int, packed: bool, platform: str, seq_len: int = 0,
            dropout: float = 0.0) -> str:
    """The implementation of model.attention=xla|cudnn|splash|auto on `platform` (the runtime's devices).

    `auto` picks cuDNN's fused flash attention on a GPU where it applies (bf16/fp16, head
    width a multiple of 8 up to 128, no packed-document mask), splash on a TPU for sequences
    of whole 128-wide tiles (`seq_len`; 0: unknown), and XLA everywhere else. Only XLA drops
    attention probabilities: with model.attention_dropout (`dropout`) > 0 `auto` picks it, and
    an explicit cudnn or splash is refused.
    """
    if name == "cudnn" and platform != "gpu":
        raise LMError(f"model.attention=cudnn needs an NVIDIA GPU but this is {platform}; use auto or xla.")
    if name == splash.NAME and platform != "tpu":
        raise LMError(f"model.attention=splash is a TPU kernel but this is {platform}; use auto or xla.")
    if dropout and name in ("cudnn", splash.NAME):
        raise LMError(f"model.attention={name} cannot drop attention probabilities but model.attention_dropout is "
                      f"{dropout}; set model.attention=auto (XLA attention, which can) or model.attention_dropout=0.")
    if name != "auto":
        return name
    if dropout:
        return "xla"
    if platform == "tpu":
        return splash.NAME if seq_len and seq_len % splash.LANES == 0 else "xla"
    fused_ok = jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if platform == "gpu" and fused_ok and not packed else "xla"


class ProbabilityDropout(NamedTuple):
    """Dropout on attention probabilities: the `rate`, the seed of its `hashed_bits` mask, and where
    the scores dropped sit in the whole [T, S] score matrix (`start`: a query block's first query and
    key; `whole`: (T, S); () for the whole matrix), so a block draws the whole matrix's mask there."""

    rate: float
    seed_2: jax.Array
    start: tuple[int, int] = (0, 0)
    whole: tuple[int, int] = ()


def _saveable(x_BxTxNxH: jax.Array, name: str) -> jax.Array:
    """x, named for remat policies with its heads merged: [B, T, N * H] (TPU tiles would pad a
    64-wide head dimension to 128 lanes, doubling what the policy keeps)."""
    return checkpoint_name(x_BxTxNxH.reshape(x_BxTxNxH.shape[:2] + (-1,)), name).reshape(x_BxTxNxH.shape)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS=None, *, causal: bool = True,
           window: int | None = None, scale: float | None = None, softcap: float | None = None,
           segment_ids_BxT=None, implementation: str | splash.Splash = "xla", query_block: int = 0,
           dropout: ProbabilityDropout | None = None) -> jax.Array:
    """softmax(scale * q k^T) v over the keys each query may see: [B, T, N, H].

    `causal` hides later keys (query i sees keys j <= i); `window` W (with `causal`) also hides
    keys W or more positions back (visible iff i - W < j <= i); `segment_ids_BxT` (documents
    packed in one row, T == S) hides other documents; `mask_Bx1xTxS` (True = visible) hides
    more, e.g. cache slots not yet written. `scale` defaults to 1 / sqrt(H). `softcap` c
    squashes the scaled logits to c * tanh(logits / c) (Gemma 2). `implementation`: "xla",
    "cudnn", or a `Splash` (causal only, no `mask_Bx1xTxS`; a batch the mesh cannot split
    evenly falls back to XLA). `query_block` Q > 0 (XLA, causal self-attention of at least 2Q
    positions) takes the queries Q at a time against only the keys they can see, skipping
    the scores above the diagonal (and before a window). `dropout` (XLA only) drops probabilities.
    """
    if window is not None and not causal:
        raise ValueError("attend: a sliding window needs causal=True (put it in the mask otherwise)")
    if dropout is not None and implementation != "xla":
        raise ValueError("attend: only XLA attention drops probabilities (lm.model.attention.resolve picks it)")
    scale = q_BxTxNxH.shape[-1] ** -0.5 if scale is None else scale
    if isinstance(implementation, splash.Splash):
        if not causal or mask_Bx1xTxS is not None:
            raise ValueError("attend: splash attention is causal self-attention; pass segment_ids_BxT, not a mask")
        if splash.applies(implementation, q_BxTxNxH.shape[0], q_BxTxNxH.shape[1]):
            # The kernel names its own output and log-sum-exp: all its backward pass needs.
            return splash.splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, window=window,
                                           scale=scale, softcap=softcap, spec=implementation,
                                           checkpoint_name=ATTENTION_OUT)
        implementation = "xla"
    T = q_BxTxNxH.shape[1]
    if implementation == "xla" and causal and mask_Bx1xTxS is None and query_block and T >= 2 * query_block:
        return _by_query_blocks(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, query_block, window=window, scale=scale,
                                softcap=softcap, segment_ids_BxT=segment_ids_BxT, dropout=dropout)
    if segment_ids_BxT is not None:
        same_doc_Bx1xTxT = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
        mask_Bx1xTxS = same_doc_Bx1xTxT if mask_Bx1xTxS is None else mask_Bx1xTxS & same_doc_Bx1xTxT
    if softcap is not None or dropout is not None:
        out_BxTxNxH = _explicit(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal, window, scale, softcap, dropout)
    else:
        out_BxTxNxH = jax.nn.dot_product_attention(
            q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, scale=scale, is_causal=causal,
            local_window_size=None if window is None else (window - 1, 0), implementation=implementation)
    if implementation == "cudnn":  # saved as the kernel's own outputs (CUDNN_FORWARD): named, they would be kept twice
        return out_BxTxNxH
    return _saveable(out_BxTxNxH, ATTENTION_OUT)


def _by_query_blocks(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, block: int, *, window, scale, softcap,
                     segment_ids_BxT, dropout) -> jax.Array:
    """Causal self-attention computed Q = `block` queries at a time, each block against the keys
    it can see (from its window's first block to its own last position), with an explicit mask
    (and, with `dropout`, the whole score matrix's dropout mask at the block's place)."""
    T = q_BxTxNxH.shape[1]
    out = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        first = 0 if window is None else max(0, start - window + 1) // block * block
        i_Qx1, j_1xS = jnp.arange(start, stop)[:, None], jnp.arange(first, stop)[None, :]
        visible_QxS = (j_1xS <= i_Qx1) & (i_Qx1 - (window or T + 1) < j_1xS)
        mask_Bx1xQxS = visible_QxS[None, None]
        if segment_ids_BxT is not None:
            mask_Bx1xQxS = mask_Bx1xQxS & (segment_ids_BxT[:, None, start:stop, None]
                                           == segment_ids_BxT[:, None, None, first:stop])
        block_dropout = None if dropout is None else dropout._replace(start=(start, first), whole=(T, T))
        out.append(attend(q_BxTxNxH[:, start:stop], k_BxTxKxH[:, first:stop], v_BxTxKxH[:, first:stop],
                          mask_Bx1xQxS, causal=False, scale=scale, softcap=softcap, dropout=block_dropout))
    return jnp.concatenate(out, axis=1)


def _explicit(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_Bx1xTxS, causal, window, scale, cap,
              dropout: ProbabilityDropout | None) -> jax.Array:
    """attend spelled out in XLA, for what jax.nn.dot_product_attention cannot do: soft-capped
    logits (`cap`), dropout on the probabilities (`dropout`)."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    logits_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) * scale
    if cap is not None:
        logits_BxKxGxTxS = cap * jnp.tanh(logits_BxKxGxTxS / cap)
    i, j = jnp.arange(T)[:, None], jnp.arange(S)[None, :]
    visible_Bx1x1xTxS = jnp.ones((1, 1, 1, T, S), bool)
    if causal:
        visible_Bx1x1xTxS = visible_Bx1x1xTxS & (j <= i) & (i - (window or S + T) < j)
    if mask_Bx1xTxS is not None:
        visible_Bx1x1xTxS = visible_Bx1x1xTxS & mask_Bx1xTxS[:, :, None]
    logits_BxKxGxTxS = jnp.where(visible_Bx1x1xTxS, logits_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    weights_BxKxGxTxS = jax.nn.softmax(logits_BxKxGxTxS, axis=-1)
    if dropout is not None:  # indexed as [B, N, T, S] (head n = k * G + g), the block placed in the whole
        weights_BxKxGxTxS = drop(weights_BxKxGxTxS, dropout.rate, dropout.seed_2, (0, 0, 0) + dropout.start,
                                 (B, K, N // K) + (dropout.whole or (T, S)))
    return jnp.einsum("bkgts,bskh->btkgh", weights_BxKxGxTxS.astype(v_BxSxKxH.dtype), v_BxSxKxH).reshape(B, T, N, H)


class Attention(nn.Module):
    """Causal self-attention with n_kv_heads <= n_heads (multi-head, grouped- or multi-query).

    Block `layer` of the stack decides the layer's sliding window and RoPE (ModelConfig.layer_window,
    layer_rope). Queries and keys are optionally normalised before RoPE (model.qk_norm: per head,
    or over all heads' projection as OLMo 2 does). With `decode=True` keys and values are kept in a
    "cache" collection ([B, S, K, H] plus a write index): each call appends its T positions and
    attends to everything cached so far (within the window), so generating one token costs one
    position. `model.init` on a [B, S] input sizes it. Unless `deterministic`, model.attention_dropout
    drops attention probabilities (masks drawn from the "dropout" rng, like lm.model.layers.Dropout).
    """

    cfg: ModelConfig
    decode: bool = False
    kernels: Kernels = Kernels()
    layer: int = 0
    deterministic: bool = True

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT=None):
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
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = (_saveable(x, name) for x, name in
                                           zip((q_BxTxNxH, k_BxTxKxH, v_BxTxKxH), QKV_NAMES))
        window = cfg.layer_window(self.layer)
        scale = cfg.attn_scale_dim ** -0.5 if cfg.attn_scale_dim else None
        if self.decode:  # one query position per step: memory-bound, and the cache mask is arbitrary
            k_BxSxKxH, v_BxSxKxH, mask_1x1xTxS = self._extend_cache(k_BxTxKxH, v_BxTxKxH, window)
            out_BxTxNxH = attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask_1x1xTxS, causal=False, scale=scale)
        else:
            dropout = None
            if not self.deterministic and cfg.attention_dropout > 0:
                dropout = ProbabilityDropout(cfg.attention_dropout, dropout_seed(self))
            out_BxTxNxH = attend(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, window=window, scale=scale,
                                 segment_ids_BxT=segment_ids_BxT, implementation=self.kernels.attention,
                                 query_block=self.kernels.query_block, dropout=dropout)
        return nn.DenseGeneral(
            x_BxTxD.shape[-1], axis=(-2, -1), use_bias=cfg.use_bias, dtype=cfg.dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=normal_init(cfg.init_std / math.sqrt(2 * cfg.n_layers), ("heads", "head_dim", "embed")),
            bias_init=zeros_init(("embed",)), dot_general=self.kernels.dot_general, name="out")(out_BxTxNxH)

    def _qk_norm(self, x_BxTxNxH, name: str):
        """model.qk_norm of queries or keys: per head (over H), over all heads (N x H), or none."""
        if self.cfg.qk_norm == "head":
            return norm_saved(self.cfg, name, x_BxTxNxH)
        if self.cfg.qk_norm == "all":
            flat_BxTxNH = x_BxTxNxH.reshape(x_BxTxNxH.shape[:2] + (-1,))
            return norm_saved(self.cfg, name, flat_BxTxNH).reshape(x_BxTxNxH.shape)
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
