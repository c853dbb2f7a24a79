"""The activation floor: what a train step must keep for its backward pass, counted per device.

For each block, a backward pass needs what it cannot recompute without a matmul: every
norm's input, q, k and v (after RoPE), the attention output and its softmax statistics
(one float32 log-sum-exp per query head and token), and the feed-forward's projections
(gated: gate, up and their product; GELU: up and its activation), in the compute dtype;
norms, RoPE and activation functions are recomputed from these. A remat policy keeps less
across the layers and recomputes the rest one block at a time (that block's full set is
counted once more). The loss keeps the final norm's input and the logits of one slice of the
cross-entropy (all of them when it is not tiled) as the head computes them, in the compute
dtype: their float32 cast, like the softmax, is elementwise and recomputed. Parameters, optimizer
state and gradients are not activations and are not counted here.

`lm aot` prints this beside the compiler's temporaries, so a step's distance from it shows.
"""

from __future__ import annotations

import jax.numpy as jnp

from lm.config import ModelConfig

LOGSUMEXP_BYTES = 4  # float32, per query head and token


def _split(width: int, tensor: int) -> int:
    """A width the tensor axis shards when it divides it (lm.parallel.mesh), else whole."""
    return width // tensor if width % tensor == 0 else width


def layer_bytes_per_token(cfg: ModelConfig, tensor: int = 1) -> dict[str, int]:
    """Bytes one block must keep per token with nothing recomputed but elementwise work, by kind."""
    b = jnp.dtype(cfg.dtype).itemsize
    d, q = cfg.d_model, _split(cfg.n_heads * cfg.head_dim, tensor)
    kv, heads = _split(cfg.kv_heads * cfg.head_dim, tensor), _split(cfg.n_heads, tensor)
    norms = 4 if cfg.norm_placement == "sandwich" else 2
    qk_norm_inputs = q + kv if cfg.qk_norm != "none" else 0
    f = _split(cfg.ff_dim, tensor)
    return {
        "norm_inputs": (norms * d + qk_norm_inputs) * b,
        "qkv": (q + 2 * kv) * b,
        "attention_out": q * b + heads * LOGSUMEXP_BYTES,
        "mlp": (3 if cfg.mlp in ("swiglu", "geglu") else 2) * f * b,
    }


def _kept_per_token(cfg: ModelConfig, remat: str, full: dict[str, int], tensor: int) -> int:
    """Bytes per token one block keeps across the layers under `remat` (model.remat)."""
    b = jnp.dtype(cfg.dtype).itemsize
    block_input = cfg.d_model * b
    if remat in ("none", "everything_saveable"):
        return sum(full.values())
    if remat == "save_qkv_attn":
        return block_input + full["qkv"] + full["attention_out"]
    if remat == "save_qkv":
        return block_input + full["qkv"]
    if remat.startswith("dots"):  # every projection's output: q, k, v, attention out, feed-forward in and out
        f = _split(cfg.ff_dim, tensor)
        ff_in = 2 * f if cfg.mlp in ("swiglu", "geglu") else f
        return block_input + full["qkv"] + (2 * cfg.d_model + ff_in) * b
    return block_input  # block, nothing_saveable


def activation_floor(cfg: ModelConfig, tokens: int, loss_tokens: int, remat: str | None = None,
                     tensor: int = 1) -> dict[str, int]:
    """Bytes of activations a train step must hold at its peak on one device, by part.

    `tokens`: one micro-batch's tokens on the device; `loss_tokens`: tokens in one slice of the
    cross-entropy (`tokens` when it is whole); `remat`: model.remat (default cfg.remat);
    `tensor`: the mesh's tensor axis, which splits heads, the feed-forward width and vocabulary.
    """
    full = layer_bytes_per_token(cfg, tensor)
    kept = _kept_per_token(cfg, remat or cfg.remat, full, tensor)
    recomputed = sum(full.values()) - kept if kept < sum(full.values()) else 0
    b = jnp.dtype(cfg.dtype).itemsize
    return {
        "layers": cfg.n_layers * kept * tokens,
        "recomputed_block": recomputed * tokens,
        "loss": (cfg.d_model * tokens + loss_tokens * _split(cfg.vocab_size, tensor)) * b,
    }
