"""The decoder-only Transformer: embeddings, blocks (pre-, post- or sandwich-norm), final norm, output head."""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from lm.config import ModelConfig
from lm.errors import LMError
from lm.model.attention import ATTENTION_OUT, CUDNN_FORWARD, QKV_NAMES, Attention
from lm.model.layers import (MLP, MLP_GATE, MLP_HIDDEN, MLP_UP, NORM_INPUT, Dropout, Kernels, make_norm, norm_saved,
                             normal_init, sinusoidal_BxTxD)


class Block(nn.Module):
    """One attention + MLP block; model.norm_placement puts the norms around each branch f:
    pre: x + f(norm(x)); post: x + norm(f(x)) (OLMo 2); sandwich: x + norm(f(norm(x))) (Gemma).
    `layer` (its index) decides its window and RoPE. Returns (x, None) so nn.scan can stack it."""

    cfg: ModelConfig
    deterministic: bool = True
    decode: bool = False
    activation_sharding: jax.sharding.Sharding | None = None
    kernels: Kernels = Kernels()
    layer: int = 0

    @nn.compact
    def __call__(self, x_BxTxD, positions_BxT, segment_ids_BxT):
        cfg = self.cfg
        x_BxTxD = constrain(x_BxTxD, self.activation_sharding)
        drop = Dropout(cfg.dropout, deterministic=self.deterministic)
        attn = Attention(cfg, self.decode, self.kernels, self.layer, self.deterministic, name="attn")
        x_BxTxD = x_BxTxD + drop(self._branch("attn", lambda h: attn(h, positions_BxT, segment_ids_BxT), x_BxTxD))
        mlp = MLP(cfg, self.kernels, name="mlp")
        return x_BxTxD + drop(self._branch("mlp", mlp, x_BxTxD)), None

    def _branch(self, name: str, f, x_BxTxD):
        """f with the norms model.norm_placement puts around it (named NAME_norm before, NAME_post_norm after)."""
        placement = self.cfg.norm_placement
        if placement != "post":
            x_BxTxD = norm_saved(self.cfg, f"{name}_norm", x_BxTxD)
        h_BxTxD = f(x_BxTxD)
        if placement != "pre":
            h_BxTxD = norm_saved(self.cfg, f"{name}_post_norm", h_BxTxD)
        return h_BxTxD


def constrain(x_BxTxD: jax.Array, sharding: jax.sharding.Sharding | None) -> jax.Array:
    """Pins activations to be split by batch, so FSDP gathers weights, never activations.

    A batch the sharding cannot split evenly (init traces one row) is left to the compiler.
    """
    if sharding is None:
        return x_BxTxD
    n = len(sharding.device_set)
    batch_shards = n // sharding.shard_shape((n,) + x_BxTxD.shape[1:])[0]
    if x_BxTxD.shape[0] % batch_shards:
        return x_BxTxD
    return jax.lax.with_sharding_constraint(x_BxTxD, sharding)


# model.remat policies of our own: the named activations (lm.model.attention, lm.model.layers) a
# block keeps for its backward pass; everything else in the block is recomputed.
REMAT_SAVES = {
    "save_qkv": QKV_NAMES,
    "save_qkv_attn": QKV_NAMES + (ATTENTION_OUT,),
}
# All a block's backward pass needs that is costly to recompute: every norm's input, q, k, v, the
# attention output and statistics, the feed-forward's projections and hidden activation. Norms,
# RoPE, activation functions and dtype casts are recomputed from these (elementwise work).
FLOOR_SAVES = (NORM_INPUT,) + QKV_NAMES + (ATTENTION_OUT, MLP_GATE, MLP_UP, MLP_HIDDEN)
FUSED_ATTENTION = ("cudnn", "splash")  # whose saved values are named (XLA's attention keeps unnamed probabilities)


def saving(names: tuple[str, ...]):
    """The checkpoint policy keeping `names` (with ATTENTION_OUT: cuDNN attention's saved outputs too)."""
    by_name = jax.checkpoint_policies.save_only_these_names(*names)
    if ATTENTION_OUT not in names:
        return by_name
    return lambda prim, *args, **params: by_name(prim, *args, **params) or prim.name == CUDNN_FORWARD


def _block_class(cfg: ModelConfig, kernels: Kernels) -> type[nn.Module]:
    """Block under cfg.remat. With a fused attention kernel, model.remat=none keeps FLOOR_SAVES
    only: no float32 copies of bf16 activations, nothing kept twice."""
    if cfg.remat == "none":
        if kernels.attention_name not in FUSED_ATTENTION:
            return Block
        policy = saving(FLOOR_SAVES)
    elif cfg.remat == "block":
        policy = None
    elif cfg.remat in REMAT_SAVES:
        policy = saving(REMAT_SAVES[cfg.remat])
    else:
        policy = getattr(jax.checkpoint_policies, cfg.remat)
    return nn.remat(Block, policy=policy, prevent_cse=not cfg.scan_layers)


class Head(nn.Module):
    """The output layer: final hidden states [B, T, D] -> logits [B, T, vocab_size].

    Untied, it owns the [D, vocab] kernel ("head"); tied, it is handed the token embedding.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BxTxD, embedding_VxD=None):
        cfg = self.cfg
        if embedding_VxD is None:
            w_DxV = self.param("kernel", normal_init(cfg.init_std, ("embed", "vocab")), (cfg.d_model, cfg.vocab_size),
                               jnp.dtype(cfg.param_dtype))
        else:
            w_DxV = embedding_VxD.T
        x_BxTxD, w_DxV = nn.dtypes.promote_dtype(x_BxTxD, w_DxV, dtype=cfg.dtype)
        return jnp.dot(x_BxTxD, w_DxV)


def computed(cfg: ModelConfig) -> ModelConfig:
    """`cfg` as the model computes it: model.dtype=auto is the runtime's to resolve per platform
    (lm.training.runtime.platform_model); a model built without the runtime computes it in float32."""
    return dataclasses.replace(cfg, dtype="float32") if cfg.dtype == "auto" else cfg


def head_logits(cfg: ModelConfig, params, x_BxTxD) -> jax.Array:
    """The Transformer's output layer on hidden states from `Transformer(..., head=False)`."""
    cfg = computed(cfg)
    if cfg.tie_embeddings:
        return Head(cfg).apply({"params": {}}, x_BxTxD, params["token_embed"]["embedding"])
    return Head(cfg).apply({"params": params["head"]}, x_BxTxD)


class Transformer(nn.Module):
    """Maps token ids [B, T] to next-token logits [B, T, vocab_size].

    `positions_BxT` (default 0..T-1) and `segment_ids_BxT` (documents packed in one row
    never attend to each other) serve packed batches. `decode=True` keeps a KV cache
    (see lm.model.attention.Attention) for generation; pass the absolute positions then.
    `activation_sharding` (set by lm.training.runtime on a mesh) lays out every [B, T, D] block
    input; `kernels` (also the runtime's) says how attention and the projections run.
    `head=False` returns the final hidden states [B, T, D] instead, for a loss that applies
    the output layer in chunks (`head_logits`).
    """

    cfg: ModelConfig
    decode: bool = False
    activation_sharding: jax.sharding.Sharding | None = None
    kernels: Kernels = Kernels()

    @nn.compact
    def __call__(self, tokens_BxT, positions_BxT=None, segment_ids_BxT=None, deterministic: bool = True,
                 head: bool = True):
        cfg = computed(self.cfg)
        if positions_BxT is None:
            positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)

        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         embedding_init=normal_init(cfg.init_std, ("vocab", "embed")), name="token_embed")
        x_BxTxD = embed(tokens_BxT)
        if cfg.scale_embeddings:
            x_BxTxD = x_BxTxD * jnp.asarray(cfg.d_model ** 0.5, x_BxTxD.dtype)
        if cfg.position == "learned":
            x_BxTxD += nn.Embed(cfg.max_seq_len, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                                embedding_init=normal_init(cfg.init_std, ("position", "embed")),
                                name="pos_embed")(positions_BxT)
        elif cfg.position == "sinusoidal":
            x_BxTxD += sinusoidal_BxTxD(positions_BxT, cfg.d_model).astype(x_BxTxD.dtype)
        x_BxTxD = Dropout(cfg.dropout, deterministic=deterministic)(x_BxTxD)
        block_args = (cfg, deterministic, self.decode, self.activation_sharding, self.kernels)

        block = _block_class(cfg, self.kernels)
        if cfg.scan_layers:
            if not cfg.uniform_layers:  # validate() says so for configs; this guards hand-built ones
                raise LMError("model.scan_layers=true needs identical blocks (same window and RoPE); "
                              "set model.scan_layers=false.")
            stack = nn.scan(block, variable_axes={"params": 0, "cache": 0}, split_rngs={"params": True, "dropout": True},
                            in_axes=(nn.broadcast, nn.broadcast), length=cfg.n_layers,
                            metadata_params={nn.PARTITION_NAME: "layers"})
            x_BxTxD, _ = stack(*block_args, name="blocks")(x_BxTxD, positions_BxT, segment_ids_BxT)
        else:
            for i in range(cfg.n_layers):
                x_BxTxD, _ = block(*block_args, layer=i, name=f"block_{i}")(x_BxTxD, positions_BxT, segment_ids_BxT)

        x_BxTxD = make_norm(cfg, "final_norm")(constrain(x_BxTxD, self.activation_sharding))
        if not head:
            return x_BxTxD
        return Head(cfg, name="head" if not cfg.tie_embeddings else None)(
            x_BxTxD, embed.embedding if cfg.tie_embeddings else None)


def count_params(params) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(params))
